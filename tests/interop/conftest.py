"""Fixtures for the serving tests: a tiny chat model WITH a tokenizer (a random-weight Llama written as
GGUF with a byte-level BPE vocabulary and a ChatML template), and live uvicorn servers on 127.0.0.1.

Helpers hang off fixtures (`live.start(app)`, `tiny_chat.expected(...)`) because tests import no
modules from tests/ (pytest runs with --import-mode=importlib).
"""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "i n", "Ġ a", "e r", "o n"]
TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONFIG = dict(n_layers=2, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, head_dim=16, context_length=256)
KEYS = {"acme": "sk-test-acme-0123456789", "limited": "sk-test-limited-0123456789",
        "other": "sk-test-other-0123456789"}
MODEL_ID = "tiny-chat"


def _byte_alphabet():
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return [spelled[b] for b in range(256)]


def write_tiny_chat_gguf(path, seed=0):
    """A 2-layer random Llama with a real (tiny) tokenizer and chat template, as a GGUF file."""
    import gguf

    tokens = SPECIALS + _byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    V, D, F = len(tokens), CONFIG["hidden"], CONFIG["ffn"]
    H, KVH, hd = CONFIG["n_heads"], CONFIG["n_kv_heads"], CONFIG["head_dim"]
    rng = np.random.default_rng(seed)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-chat")
    w.add_uint32("llama.context_length", CONFIG["context_length"])
    w.add_uint32("llama.embedding_length", D)
    w.add_uint32("llama.block_count", CONFIG["n_layers"])
    w.add_uint32("llama.feed_forward_length", F)
    w.add_uint32("llama.attention.head_count", H)
    w.add_uint32("llama.attention.head_count_kv", KVH)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", TEMPLATE)
    out = mat(V, D, 4.0)           # sharp logits: greedy choices are far from ties
    out[2] *= 0.3                  # <|im_end|> is rare, so replies run to max_tokens mostly
    tensors = {"token_embd.weight": rng.standard_normal((V, D)).astype(np.float32),
               "output_norm.weight": np.ones(D, np.float32), "output.weight": out}
    for i in range(CONFIG["n_layers"]):
        p = f"blk.{i}"
        tensors.update({
            f"{p}.attn_norm.weight": np.ones(D, np.float32), f"{p}.ffn_norm.weight": np.ones(D, np.float32),
            f"{p}.attn_q.weight": mat(H * hd, D), f"{p}.attn_k.weight": mat(KVH * hd, D),
            f"{p}.attn_v.weight": mat(KVH * hd, D), f"{p}.attn_output.weight": mat(D, H * hd),
            f"{p}.ffn_gate.weight": mat(F, D), f"{p}.ffn_up.weight": mat(F, D), f"{p}.ffn_down.weight": mat(D, F)})
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
        from isthmus.interop.scheduler import Engine
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
    ]}


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
