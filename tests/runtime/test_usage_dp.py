"""Differentially private usage statistics: the serving hook counts completed requests, exports are
calibrated by OpenDP, and the per-tenant budget is enforced and survives restarts."""

import datetime as dt
import json
import sqlite3

import httpx
import pytest

pytest.importorskip("opendp")

from isthmus.cli import main
from isthmus.runtime.privacy import BudgetExceededError, PrivacyError, UsageStats
from live_server import live_server  # tests/support
from tiny_models import write_tiny_chat_gguf  # tests/support

DAY = dt.date(2026, 12, 1)
NOON = dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc).timestamp()
CLOCK = lambda: NOON + 86400          # noqa: E731  (the day after, so nothing is past retention)


@pytest.fixture
def stats(tmp_path):
    s = UsageStats(tmp_path / "usage", clock=CLOCK)
    yield s
    s.close()


def test_budget_is_enforced_per_day_and_persists_across_restarts(tmp_path, stats):
    stats.record("acme", "alice", NOON, 1, 50)
    stats.export("acme", 0.6, DAY, DAY)
    with pytest.raises(BudgetExceededError, match="spent epsilon 0.6 of its budget 1 on 2026-12-01"):
        stats.export("acme", 0.5, DAY, DAY + dt.timedelta(days=1))
    assert stats.spent("acme") == {"2026-12-01": 0.6}          # the refused export charged nothing
    stats.export("acme", 0.4, DAY + dt.timedelta(days=1), DAY + dt.timedelta(days=1))   # another day: its own budget
    stats.export("beta", 1.0, DAY, DAY)                          # another tenant: its own budget
    stats.close()

    again = UsageStats(tmp_path / "usage", clock=CLOCK)         # a restart
    assert again.spent("acme") == {"2026-12-01": 0.6, "2026-12-02": 0.4}
    with pytest.raises(BudgetExceededError):
        again.export("acme", 0.5, DAY, DAY)
    again.export("acme", 0.4, DAY, DAY)                          # exactly up to the budget is allowed
    again.set_budget("acme", 2.0)
    again.export("acme", 1.0, DAY, DAY)
    assert again.spent("acme")["2026-12-01"] == pytest.approx(2.0)
    again.close()


def test_noise_is_calibrated_by_opendp_to_the_clamped_sensitivity(stats):
    doc = stats.export("acme", 0.8, DAY, DAY, max_messages=10, max_tokens=500)
    share = 0.8 / 4
    q = doc["queries"]
    for name in ("users", "messages", "tokens", "messages_by_hour"):
        assert q[name]["epsilon"] <= share + 1e-12
    # discrete Laplace scale = sensitivity / epsilon share (OpenDP's binary search lands on it)
    assert q["users"]["scale"] == pytest.approx(1 / share, rel=1e-3)
    assert q["messages"]["scale"] == pytest.approx(10 / share, rel=1e-3)
    assert q["tokens"]["scale"] == pytest.approx(500 / share, rel=1e-3)
    assert q["messages_by_hour"]["scale"] == pytest.approx(10 / share, rel=1e-3)
    assert doc["days"][0]["day"] == "2026-12-01" and len(doc["days"][0]["messages_by_hour"]) == 24


def test_one_user_contributes_at_most_the_bounds(stats):
    for _ in range(40):                                         # one heavy user at 03:00, one light at 12:00
        stats.record("acme", "heavy", NOON - 9 * 3600, 1, 1000)
    stats.record("acme", "light", NOON, 1, 7)
    stats.set_budget("acme", 100.0)
    day = stats.export("acme", 100.0, DAY, DAY, max_messages=5, max_tokens=10)["days"][0]  # almost no noise
    assert abs(day["users"] - 2) <= 1
    assert abs(day["messages"] - 6) <= 2                          # 5 (clamped from 40) + 1
    assert abs(day["tokens"] - 17) <= 3                           # 10 (clamped from 40000) + 7
    assert abs(day["messages_by_hour"][3] - 5) <= 2 and abs(day["messages_by_hour"][12] - 1) <= 2
    rows = sqlite3.connect(stats.dir / "usage.sqlite3").execute("SELECT DISTINCT user FROM counts").fetchall()
    assert len(rows) == 2 and not any(r[0] in ("heavy", "light") for r in rows)     # ids kept as keyed digests


def test_bad_parameters_are_refused(stats):
    for eps in (0, -1, float("nan"), float("inf"), 101):
        with pytest.raises(PrivacyError, match="epsilon"):
            stats.export("acme", eps, DAY, DAY)
    with pytest.raises(PrivacyError, match="days"):
        stats.export("acme", 0.1, DAY, DAY - dt.timedelta(days=1))
    with pytest.raises(PrivacyError, match="max_tokens"):
        stats.export("acme", 0.1, DAY, DAY, max_tokens=0)
    assert stats.spent("acme") == {}


def test_the_server_counts_each_completed_request(tmp_path):
    """The hook (ServerState.record_usage) against a live uvicorn server: non-streamed and streamed."""
    import isthmus
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key
    from isthmus.runtime.engine import Engine

    exe = isthmus.compile(isthmus.load(write_tiny_chat_gguf(tmp_path / "tiny-chat.gguf")), target="reference")
    usage = UsageStats(tmp_path / "usage")
    tenants = Tenants.from_config({"tenants": [{"id": "acme", "api_key_sha256": [hash_key("sk-acme-0123456789")]}]})
    app = create_app({"tiny-chat": Engine(exe, name="tiny-chat")}, tenants=tenants, usage=usage)
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    auth = {"Authorization": "Bearer sk-acme-0123456789"}
    with live_server(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200
        total = r.json()["usage"]["total_tokens"]
        with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True, "user": "u-42"},
                          headers=auth, timeout=60) as s:
            assert s.status_code == 200 and "[DONE]" in s.read().decode()
        assert httpx.post(url + "/v1/chat/completions", json={**body, "model": "nope"}, headers=auth).status_code == 404
    rows = sqlite3.connect(usage.dir / "usage.sqlite3").execute(
        "SELECT tenant, user, messages, tokens FROM counts ORDER BY tokens DESC").fetchall()
    assert len(rows) == 2 and all(r[0] == "acme" and r[2] == 1 for r in rows)    # two users: the key, and u-42
    assert rows[0][3] == total or rows[1][3] == total       # the key's request: exactly the usage it was told
    usage.close()


def test_isthmus_usage_export_and_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    UsageStats.local().record("acme", "alice", NOON, 2, 30)
    assert main(["usage", "export", "--tenant", "acme", "--epsilon", "0.7", "--from", "2026-12-01",
                 "-o", "out.json"]) == 0
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["tenant"] == "acme" and doc["spent"] == {"2026-12-01": 0.7} and "OpenDP" in doc["mechanism"]
    capsys.readouterr()
    assert main(["usage", "export", "--tenant", "acme", "--epsilon", "0.7", "--from", "2026-12-01"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget" in err[0] and "refused" in err[0], err
    assert main(["usage", "budget", "--tenant", "acme"]) == 0
    assert "2026-12-01 spent 0.7, left 0.3" in capsys.readouterr().out
    assert main(["usage", "export", "--tenant", "acme", "--epsilon", "0.1", "--from", "Dec 1"]) == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err
    events = [json.loads(x)["event"] for x in (tmp_path / "home" / "audit" / "audit.jsonl").read_text().splitlines()]
    assert events == ["usage-release"]
    assert main(["audit", "verify"]) == 0


def test_without_opendp_the_export_is_one_line_and_charges_nothing(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(sys.modules, "opendp.prelude", None)        # as if the privacy extra were not installed
    assert main(["usage", "export", "--tenant", "acme", "--epsilon", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'isthmus[privacy]'" in err[0], err
    assert UsageStats.local().spent("acme") == {}
