"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end; n/a until `isthmus pull`.

`Prefill`: tokens per second of one step over exactly 38 and 271 prompt tokens (best of 3, fresh KV
cache each); `Decode`: of 64 greedy steps after a short chat prompt; for isthmus's numba and
reference targets and llama.cpp (llama-cpp-python, the `peers` extra; n/a without it) on the same
GGUF and the same token ids. asv runs each benchmark in a process of its own; the engine runs in a
worker process of its own too (isthmus.bench.isolated), with the OpenMP runtime's settings removed
from its environment: llama.cpp with n_threads = the cores and its defaults otherwise, isthmus with
its own. `ColdStart`: a new process to the first token's logits (import, load, compile for the
default target, prefill the chat prompt), with numba's kernel cache warm. `Compile`:
`isthmus.compile` alone, per target, in a new process with the model already loaded.
`isthmus bench --only model` and benchmarks/bench_e2e_numba.py interleave the engines in one run.
"""

from __future__ import annotations

ENGINES = ["isthmus-numba", "isthmus-reference", "llama.cpp"]
PREFILL, DECODE = [38, 271], 64


def model_path() -> str:
    from isthmus.models import is_pulled, pull

    if not is_pulled():
        raise NotImplementedError("the default model is not pulled (isthmus pull)")
    return str(pull(progress=False))


class _Engine:
    """Setup: the engine in its worker, and the token ids from isthmus's tokenizer (for llama.cpp,
    from a tokenizer worker that ends before llama.cpp starts); teardown ends the worker."""
    params = [ENGINES]
    param_names = ["engine"]
    timeout = 300

    def setup(self, name, *_):
        from isthmus.bench.isolated import Worker

        path, self.engine = model_path(), None
        if name == "llama.cpp":
            with Worker("isthmus.bench.model:Tokenizer", path) as tokenizer:
                self.ids, self.chat = {n: tokenizer.call("ids", n) for n in PREFILL}, tokenizer.call("chat")
            try:
                self.engine = Worker("isthmus.bench.model:LlamaCppEngine", path)
            except ImportError:
                raise NotImplementedError("llama-cpp-python is not installed (the `peers` extra)") from None
        else:
            self.engine = Worker("isthmus.bench.model:IsthmusEngine", path, name.split("-")[1])
            try:
                self.ids, self.chat = {n: self.engine.call("ids", n) for n in PREFILL}, self.engine.call("chat")
            except BaseException:
                self.teardown()
                raise

    def teardown(self, *_):
        if self.engine is not None:
            self.engine.close()


class Prefill(_Engine):
    params = [ENGINES, PREFILL]
    param_names = ["engine", "tokens"]

    def track_prefill_tokens_per_second(self, name, tokens):
        return tokens / min(self.engine.call("prefill", self.ids[tokens]) for _ in range(3))

    track_prefill_tokens_per_second.unit = "tokens/s"


class Decode(_Engine):
    def track_decode_tokens_per_second(self, name):
        return DECODE / self.engine.call("decode", self.chat, DECODE)

    track_decode_tokens_per_second.unit = "tokens/s"


class ColdStart:
    rounds, repeat, timeout = 1, 3, 600

    def setup(self):
        self.path = model_path()

    def timeraw_cold_start(self):
        return f"""
        import isthmus
        from isthmus.bench.model import chat_ids
        model = isthmus.load({self.path!r})
        isthmus.compile(model).decoder().step(chat_ids(model.tokenizer))
        """


class Compile:
    params = [["numba", "reference", "npu"]]
    param_names = ["target"]
    rounds, repeat, timeout = 1, 3, 600

    def setup(self, target):
        self.path = model_path()

    def timeraw_compile(self, target):
        return f"isthmus.compile(model, target={target!r})", f"import isthmus\nmodel = isthmus.load({self.path!r})"
