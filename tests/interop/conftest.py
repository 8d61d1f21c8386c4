"""Fixtures for the serving tests: a tiny chat model WITH a tokenizer (tests/support/tiny_models.py:
a random-weight Llama written as GGUF with a byte-level BPE vocabulary and a ChatML template), and
live uvicorn servers on 127.0.0.1.

Helpers hang off fixtures (`live.start(app)`, `tiny_chat.expected(...)`): with
--import-mode=importlib, only tests/support is importable from tests.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tiny_models import write_tiny_chat_gguf  # tests/support, on pythonpath

KEYS = {"acme": "sk-test-acme-0123456789", "limited": "sk-test-limited-0123456789",
        "other": "sk-test-other-0123456789", "admin": "sk-test-admin-0123456789"}
MODEL_ID = "tiny-chat"


class TinyChat:
    """The tiny model compiled for the reference target, with an oracle for what it should say."""

    def __init__(self, path):
        import isthmus
        self.path = path
        self.model = isthmus.load(path)
        self.exe = isthmus.compile(self.model, target="reference")
        self.tokenizer = self.model.tokenizer

    def prompt_ids(self, messages):
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def expected(self, messages, **kwargs):
        """The reply, unbatched, through the runtime's own generation loop (the batching oracle)."""
        import isthmus
        stream = isthmus.chat(self.exe, messages, **kwargs)
        text = "".join(stream)
        return text, stream.stats

    def engine(self, **kwargs):
        from isthmus.runtime.engine import Engine
        return Engine(self.exe, name=MODEL_ID, **kwargs)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    return TinyChat(write_tiny_chat_gguf(tmp_path_factory.mktemp("tiny-chat") / "tiny-chat.gguf"))


class LiveServer:
    """uvicorn on 127.0.0.1 at an ephemeral port, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    @property
    def state(self):
        return self.app.state.isthmus

    def client(self, key="acme", **kwargs):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEYS.get(key, key), max_retries=0,
                             timeout=kwargs.pop("timeout", 60), **kwargs)

    def async_client(self, key="acme", **kwargs):
        import openai
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEYS.get(key, key), max_retries=0,
                                  timeout=kwargs.pop("timeout", 120), **kwargs)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def live():
    """`live.start(app)` starts a server that is stopped at the end of the session."""
    servers = []

    class Starter:
        @staticmethod
        def start(app) -> LiveServer:
            s = LiveServer(app)
            servers.append(s)
            return s

        @staticmethod
        def stop(s: LiveServer) -> None:
            servers.remove(s)
            s.stop()

    yield Starter
    for s in servers:
        s.stop()


def tenants_doc():
    from isthmus.interop.tenants import hash_key
    return {"tenants": [
        {"id": "acme", "api_key_sha256": [hash_key(KEYS["acme"])], "models": ["*"]},
        {"id": "limited", "api_key_sha256": [hash_key(KEYS["limited"])], "models": ["*"],
         "requests_per_second": 0.001, "burst": 1},
        {"id": "other", "api_key_sha256": [hash_key(KEYS["other"])], "models": ["someone-elses-model"]},
    ], "admin": {"api_key_sha256": [hash_key(KEYS["admin"])]}}


@pytest.fixture(scope="session")
def server(live, tiny_chat):
    """The tiny chat model behind the full app with three tenants (see KEYS)."""
    from isthmus.interop.app import Limits, create_app
    from isthmus.interop.tenants import Tenants

    engine = tiny_chat.engine(max_batch=8, max_waiting=4)
    app = create_app({MODEL_ID: engine}, tenants=Tenants.from_config(tenants_doc()), limits=Limits(64 << 10))
    s = live.start(app)
    s.engine, s.keys, s.model_id, s.tiny = engine, KEYS, MODEL_ID, tiny_chat
    return s


@pytest.fixture
def client(server):
    return server.client()
