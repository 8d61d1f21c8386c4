"""`isthmus chat` with no prompt: the interactive session, driven through a pseudo-terminal (pexpect),
and piped stdin as one prompt.

The quick tests use a tiny random chat model (context window 256) on the reference target; what
the session sends each turn is checked through `--verbose`'s prompt eval count against the count
of the conversation built by hand. The slow ones use the pulled default model, greedily.
"""

import os
import re
import subprocess
import sys

import pytest

pexpect = pytest.importorskip("pexpect")

from tiny_models import write_tiny_chat_gguf  # tests/support, on pythonpath  # noqa: E402

PROMPT = ">>> "
COUNT = re.compile(r"prompt eval count:\s+(\d+) token")


def _default_sigint():
    # a shell that runs pytest in the background starts it with SIGINT ignored, and every child
    # inherits that: the session under test gets the default a terminal's user has
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(cwd, *args, timeout=60):
    env = dict(os.environ, TERM="dumb")    # readline without terminal escape sequences
    child = pexpect.spawn(sys.executable, ["-m", "isthmus.cli", "chat", *map(str, args)], cwd=str(cwd), env=env,
                          encoding="utf-8", codec_errors="replace", timeout=timeout, dimensions=(24, 2000),
                          preexec_fn=_default_sigint)
    return child


def finish(child, timeout=30):
    child.expect(pexpect.EOF, timeout=timeout)
    child.close()
    return child.exitstatus


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """The tiny chat model's file and an in-process oracle: the prompt length and greedy reply for
    a conversation built by hand."""
    import isthmus

    path = write_tiny_chat_gguf(tmp_path_factory.mktemp("chat") / "tiny-chat.gguf")
    exe = isthmus.compile(isthmus.load(path), target="reference")

    def turn(*texts, replies=()):
        """`texts` are the user's messages; the assistant's replies between them are `replies`."""
        messages = []
        for i, t in enumerate(texts):
            messages.append({"role": "user", "content": t})
            if i < len(texts) - 1:
                messages.append({"role": "assistant", "content": replies[i]})
        stream = isthmus.chat(exe, messages, max_tokens=8)
        return len(stream.prompt_ids), "".join(stream)

    return path, turn


@pytest.fixture
def session(tiny_chat, tmp_path):
    path, _ = tiny_chat
    child = spawn(tmp_path, "--model", path, "--target", "reference", "--max-tokens", "8", "--verbose")
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def say(child, text):
    """Send one message; the prompt eval count of its turn (None if nothing was sent) and the output."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    m = COUNT.search(child.before)
    return (int(m.group(1)) if m else None), child.before


def test_second_turn_carries_the_first_then_bye(session, tiny_chat):
    _, turn = tiny_chat
    n1, a1 = turn("hello there")
    n2, _ = turn("hello there", "and again", replies=[a1])
    alone, _ = turn("and again")
    assert n2 != alone
    assert say(session, "hello there")[0] == n1
    assert say(session, "and again")[0] == n2       # the whole conversation went to the model
    session.sendline("/bye")
    assert finish(session) == 0


def test_clear_forgets_and_help_lists_the_commands(session, tiny_chat):
    _, turn = tiny_chat
    say(session, "hello there")
    _, out = say(session, "/?")
    for cmd in ("/bye", "/clear", "/help", "Ctrl + d"):
        assert cmd in out
    _, out = say(session, "/clear")
    assert "Cleared" in out
    assert say(session, "and again")[0] == turn("and again")[0]
    _, out = say(session, "/nope")
    assert "Unknown command '/nope'" in out
    session.sendline('"""line one')                 # a message of two lines, as ollama takes them
    session.expect_exact("... ")
    again = turn("and again")[1]
    assert say(session, 'line two"""')[0] == turn("and again", "line one\nline two", replies=[again])[0]
    session.sendline("/bye")
    assert finish(session) == 0


def test_ctrl_c_at_the_prompt_hints_and_ctrl_d_exits(session, tiny_chat):
    _, turn = tiny_chat
    session.sendintr()
    session.expect_exact("Use Ctrl + d or /bye to exit.")
    session.expect_exact(PROMPT)
    assert session.isalive()
    assert say(session, "hello there")[0] == turn("hello there")[0]   # still a working session
    session.sendeof()
    assert finish(session) == 0


def test_a_full_context_drops_the_oldest_turns_and_a_too_long_message_is_refused(session, tiny_chat):
    _, turn = tiny_chat
    a, b, too_long = "x" * 100, "y" * 100, "z" * 300
    n_a, reply_a = turn(a)
    n_b, reply_b = turn(b)
    # both turns leave no room for a reply of 8 in the window of 256; the second alone does
    assert turn(a, b, replies=[reply_a])[0] + 8 > 256 >= n_b + 8
    assert say(session, a)[0] == n_a
    n, out = say(session, b)
    assert "dropped the oldest 1 turn(s)" in out and n == n_b
    n, out = say(session, too_long)
    assert n is None and "context window is 256; nothing was sent" in out and "Traceback" not in out
    assert say(session, "hi")[0] == turn(b, "hi", replies=[reply_b])[0]   # the refused message left no trace
    session.sendeof()
    assert finish(session) == 0


def test_piped_stdin_is_one_prompt(tiny_chat, tmp_path):
    path, turn = tiny_chat
    cmd = [sys.executable, "-m", "isthmus.cli", "chat", "--model", str(path), "--target", "reference",
           "--max-tokens", "8"]
    piped = subprocess.run(cmd, input="hello there\n", capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == turn("hello there")[1] + "\n"     # what `isthmus chat "hello there"` answers
    for empty in ("", "  \n\n"):
        r = subprocess.run(cmd, input=empty, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "the prompt is empty" in r.stderr


# -- the default model --------------------------------------------------------------------------

@pytest.mark.slow
def test_two_turns_on_the_default_model_remember_the_name(default_model_path, tmp_path):
    child = spawn(tmp_path, "--max-tokens", "40", timeout=300)   # the first run may compile the kernels
    child.expect_exact(PROMPT)
    child.sendline("My name is Ada. Please remember it.")
    child.expect_exact(PROMPT, timeout=120)
    child.sendline("What did I say my name was?")
    child.expect_exact(PROMPT, timeout=120)
    second = child.before.split("What did I say my name was?", 1)[1]
    assert "Ada" in second, second
    child.sendline("/bye")
    assert finish(child) == 0


@pytest.mark.slow
def test_ctrl_c_stops_only_the_reply_and_drops_that_turn(default_model_path, tmp_path):
    child = spawn(tmp_path, "--max-tokens", "2000", "--verbose", timeout=300)
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about a dragon who learns to cook.")
    child.expect_exact("learns to cook.")                 # the echo of the line
    child.expect(r"\w+\W+\w+\W+\w+\W+\w+", timeout=120)  # the reply is streaming
    child.sendintr()
    child.expect_exact(PROMPT, timeout=10)                # long before 2000 tokens
    assert "prompt eval count" not in child.before        # that reply did not finish
    n_after, _ = say(child, "Hi")
    say(child, "/clear")
    n_fresh, _ = say(child, "Hi")
    assert n_after == n_fresh                             # the interrupted turn is not in the history
    child.sendeof()
    assert finish(child) == 0


@pytest.mark.slow
def test_piped_question_on_the_default_model(default_model_path, tmp_path):
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", "chat"], input="What is the capital of France?\n",
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_a_sealed_package_chats_interactively(tiny_chat, tmp_path, monkeypatch):
    """`chat --sealed` with no prompt: the session runs inside the simulated enclave for every turn."""
    from isthmus.cli import main

    path, turn = tiny_chat
    monkeypatch.setenv("ISTHMUS_HOME", str(tmp_path / "home"))    # the spawned process inherits it
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "-o", "owner.key"]) == 0
    assert main(["seal", str(path), "--tenant", "acme", "--owner-key", "owner.key", "-o", "m.isth",
                 "--target", "reference"]) == 0
    child = spawn(tmp_path, "--sealed", "m.isth", "--target", "reference", "--max-tokens", "8", "--verbose")
    child.expect_exact(PROMPT)
    n1, a1 = turn("hello there")
    n, out = say(child, "hello there")
    assert n == n1 and "unseal duration" in out     # the enclave's load is reported with the first turn
    assert say(child, "and again")[0] == turn("hello there", "and again", replies=[a1])[0]
    child.sendline("/bye")
    assert finish(child) == 0
