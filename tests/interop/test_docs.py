"""Every ```bash and ```python example in docs/api.md runs against a live server and succeeds.

The tiny test model is served under the default model's id so the examples run as written; only
the port changes (127.0.0.1:8000 -> the ephemeral one).
"""

import json
import re
import subprocess
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
BLOCKS = re.findall(r"```(bash|python)\n(.*?)```", DOC.read_text(), re.S)
KEY, APP_SECRET = "sk-docs-0123456789", "docs-app-secret"


@pytest.fixture(scope="module")
def docs_server(live, tiny_chat):
    from isthmus.interop.app import create_app
    from isthmus.interop.tenants import Tenants, hash_key
    from isthmus.interop.webhook import WhatsAppAdapter, WhatsAppConfig

    class Platform:
        def __init__(self):
            self.sent = []

        async def send_text(self, *args):
            self.sent.append(args)

        async def aclose(self):
            pass

    platform = Platform()
    wa = WhatsAppAdapter(WhatsAppConfig(verify_token="v", app_secret=APP_SECRET,
                                        phone_numbers={"106540352242922": "acme"}, max_tokens=8), outbound=platform)
    tenants = Tenants.from_config({"tenants": [{"id": "acme", "api_key_sha256": [hash_key(KEY)]}]})
    s = live.start(create_app({"smollm2-135m-instruct": tiny_chat.engine()}, tenants=tenants, whatsapp=wa))
    s.platform = platform
    return s


def test_the_doc_has_examples_of_both_kinds():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("bash") >= 4 and kinds.count("python") >= 3


@pytest.mark.parametrize("kind,code", BLOCKS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(BLOCKS)])
def test_doc_example_runs(docs_server, kind, code, monkeypatch, capsys):
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{docs_server.port}")
    monkeypatch.setenv("ISTHMUS_API_KEY", KEY)
    monkeypatch.setenv("WHATSAPP_APP_SECRET", APP_SECRET)
    if kind == "python":
        exec(compile(code, str(DOC), "exec"), {"__name__": "__docs__"})
        assert capsys.readouterr().out.strip()
        return
    r = subprocess.run(["bash", "-eo", "pipefail", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    if out.startswith("{"):
        doc = json.loads(out)
        assert "error" not in doc, doc
        if "accepted" in doc:
            assert doc["accepted"] == 1
    else:
        assert out.endswith("data: [DONE]") and '"choices":[]' in out
