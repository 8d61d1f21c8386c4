"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) end to end; n/a until `isthmus pull`.

`Throughput`: tokens per second of a 128-token prefill (best of 3, fresh KV cache each) and of
32 greedy decode steps after a short chat prompt, for isthmus's numba and reference targets and
llama.cpp (llama-cpp-python, the `peers` extra; n/a without it) on the same GGUF and tokens.
`ColdStart`: a new process to the first token's logits (import, load, compile for the default
target, prefill the chat prompt), with numba's kernel cache warm. `Compile`: `isthmus.compile`
alone, per target, in a new process with the model already loaded.
benchmarks/bench_e2e_numba.py prints the longer comparison table (256-token prefill, 64 decode
steps, `isthmus chat --verbose`, peak memory).
"""

from __future__ import annotations

import functools
import time

ENGINES = ["isthmus-numba", "isthmus-reference", "llama.cpp"]
PREFILL, DECODE = 128, 32


def model_path() -> str:
    from isthmus.models import is_pulled, pull

    if not is_pulled():
        raise NotImplementedError("the default model is not pulled (isthmus pull)")
    return str(pull(progress=False))


@functools.cache
def _model():
    import isthmus
    return isthmus.load(model_path())


@functools.cache
def engine(name: str):
    """isthmus.bench.model's engines, the ones `isthmus bench` compares (built once per process)."""
    from isthmus.bench.model import IsthmusEngine, LlamaCppEngine

    if name == "llama.cpp":
        try:
            return LlamaCppEngine(model_path(), _model().tokenizer)
        except ImportError:
            raise NotImplementedError("llama-cpp-python is not installed (the `peers` extra)") from None
    return IsthmusEngine(_model(), name.split("-")[1])


class Throughput:
    params = [ENGINES]
    param_names = ["engine"]
    timeout = 300

    def setup(self, name):
        from isthmus.bench.model import chat_ids, prompt_ids

        self.engine = engine(name)
        tok = _model().tokenizer
        self.ids, self.chat = prompt_ids(tok, PREFILL), chat_ids(tok)

    def track_prefill_tokens_per_second(self, name):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            self.engine.prefill(self.ids)
            best = min(best, time.perf_counter() - t0)
        return len(self.ids) / best

    track_prefill_tokens_per_second.unit = "tokens/s"

    def track_decode_tokens_per_second(self, name):
        return DECODE / self.engine.decode(self.chat, DECODE)

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
