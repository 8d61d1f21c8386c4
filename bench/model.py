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


def isthmus_rates(model, target: str, n_prefill: int, n_decode: int, rounds: int = 3) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of `target` on `model`."""
    import isthmus

    exe = isthmus.compile(model, target=target)
    ids = prompt_ids(model.tokenizer, n_prefill)
    exe.decoder().step(ids[:8])                     # warm: kernels loaded, buffers bound
    best = float("inf")
    for _ in range(rounds):
        d = exe.decoder()
        t0 = time.perf_counter()
        d.step(ids)
        best = min(best, time.perf_counter() - t0)
    d = exe.decoder()
    tok = int(np.argmax(d.step(chat_ids(model.tokenizer))))
    d.step([tok])
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(d.step([tok])))
    return n_prefill / best, n_decode / (time.perf_counter() - t0)


def llama_cpp_rates(path, tokenizer, n_prefill: int, n_decode: int, rounds: int = 3) -> tuple[float, float] | None:
    """The same through llama.cpp with one thread per core; None when llama-cpp-python is absent."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    threads = os.cpu_count() or 1
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512,
                verbose=False)
    try:
        return _llama_cpp_rates(llm, tokenizer, n_prefill, n_decode, rounds)
    finally:
        llm.close()           # its worker threads would otherwise go on competing with what runs next


def _llama_cpp_rates(llm, tokenizer, n_prefill, n_decode, rounds):
    ids = prompt_ids(tokenizer, n_prefill)
    llm.eval(ids[:8])
    best = float("inf")
    for _ in range(rounds):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        best = min(best, time.perf_counter() - t0)
    llm.reset()
    llm.eval(chat_ids(tokenizer))
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    llm.eval([tok])
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    return n_prefill / best, n_decode / (time.perf_counter() - t0)


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
    log("  isthmus numba")
    ours = isthmus_rates(model, "numba", n_prefill, n_decode)
    log("  isthmus reference")
    ref = isthmus_rates(model, "reference", n_prefill, n_decode, rounds=1 if quick else 2)
    log("  llama.cpp")
    llama = llama_cpp_rates(path, model.tokenizer, n_prefill, n_decode)
    rows = []
    for i, (case, shape) in enumerate(zip(("prefill", "decode"), shapes)):
        rows.append(Row("e2e", case, shape, "numba", ours[i], "llama.cpp", llama and llama[i], "tok/s", True,
                        note="" if llama else "llama-cpp-python not installed (pip install -e '.[peers]')"))
        rows.append(Row("e2e", case, shape, "numba", ours[i], "isthmus reference", ref[i], "tok/s", True))
    return rows
