"""The default model end to end: prefill and decode tokens/s of isthmus's numba target against
llama.cpp (llama-cpp-python, the `peers` extra) and isthmus's numpy reference target.

Same GGUF (SmolLM2-135M-Instruct), same prompt tokens, greedy, in one process: prefill is one step
over an n-token prompt (best of a few, fresh cache each); decode is n greedy steps after a short
chat prompt.
"""

from __future__ import annotations

import os
import time

import numpy as np

from isthmus.bench.measure import Row

PROMPT = "Explain in a few sentences why the sky is blue."


def prompt_ids(tok, n: int) -> list[int]:
    text = ("The history of the printing press begins in the fifteenth century, when movable type "
            "changed how books were made and read across Europe. ") * 40
    ids = tok.encode(text)
    assert len(ids) >= n, f"the benchmark prompt has {len(ids)} tokens, fewer than {n}"
    return ids[:n]


def chat_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))


class IsthmusEngine:
    """A compiled target with its kernels loaded and buffers bound."""

    def __init__(self, model, target: str):
        import isthmus

        self.exe = isthmus.compile(model, target=target)
        self.exe.decoder().step(prompt_ids(model.tokenizer, 8))

    def prefill(self, ids) -> None:
        self.exe.decoder().step(ids)

    def decode(self, chat, n: int) -> float:
        """Seconds of n greedy steps after prefilling `chat` (not timed)."""
        d = self.exe.decoder()
        tok = int(np.argmax(d.step(chat)))
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(d.step([tok])))
        return time.perf_counter() - t0

    def close(self) -> None:
        pass


class LlamaCppEngine:
    """llama.cpp with one thread per core; ImportError without llama-cpp-python (the `peers` extra)."""

    def __init__(self, path, tokenizer):
        from llama_cpp import Llama

        threads = os.cpu_count() or 1
        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False)
        self.llm.eval(prompt_ids(tokenizer, 8))

    def prefill(self, ids) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def decode(self, chat, n: int) -> float:
        llm = self.llm
        llm.reset()
        llm.eval(chat)
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return time.perf_counter() - t0

    def close(self) -> None:
        self.llm.close()        # its worker threads would otherwise compete with what runs next


def rates(engine, ids, chat, n_decode: int, rounds: int = 3) -> tuple[float, float]:
    """(prefill tok/s, best of `rounds` over `ids`; decode tok/s of n_decode greedy steps after `chat`)."""
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        engine.prefill(ids)
        best = min(best, time.perf_counter() - t0)
    return len(ids) / best, n_decode / engine.decode(chat, n_decode)


def e2e(quick: bool = False, log=print) -> list[Row]:
    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, is_pulled

    path = cache_path(REGISTRY[DEFAULT_MODEL]) if is_pulled() else None
    n_prefill, n_decode = (64, 16) if quick else (256, 64)
    shapes = (f"{n_prefill}-token prompt", f"{n_decode} tokens")
    if path is None:
        return [Row("e2e", case, shape, "numba", None, "llama.cpp", None, "tok/s", True,
                    note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`")
                for case, shape in zip(("prefill", "decode"), shapes)]
    from isthmus.compiler.frontends import load_model

    model = load_model(path)
    ids, chat = prompt_ids(model.tokenizer, n_prefill), chat_ids(model.tokenizer)
    log("  isthmus numba")
    ours = rates(IsthmusEngine(model, "numba"), ids, chat, n_decode)
    log("  isthmus reference")
    ref = rates(IsthmusEngine(model, "reference"), ids, chat, n_decode, rounds=1 if quick else 2)
    log("  llama.cpp")
    try:
        engine = LlamaCppEngine(path, model.tokenizer)
    except ImportError:
        llama = None
    else:
        try:
            llama = rates(engine, ids, chat, n_decode)
        finally:
            engine.close()
    rows = []
    for i, (case, shape) in enumerate(zip(("prefill", "decode"), shapes)):
        rows.append(Row("e2e", case, shape, "numba", ours[i], "llama.cpp", llama and llama[i], "tok/s", True,
                        note="" if llama else "llama-cpp-python not installed (pip install -e '.[peers]')"))
        rows.append(Row("e2e", case, shape, "numba", ours[i], "isthmus reference", ref[i], "tok/s", True))
    return rows
