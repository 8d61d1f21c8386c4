"""The default model end to end: prefill and decode tokens/s of isthmus's numba target against
llama.cpp (llama-cpp-python, the `peers` extra), each in its own process (bench/isolated.py).

Same GGUF (SmolLM2-135M-Instruct), same token ids (from isthmus's tokenizer of that GGUF, sent to
both), greedy. Prefill is one step over exactly n prompt tokens on a fresh cache; decode is n greedy
steps after the chat prompt. The engines take turns, one at a time (round 1: isthmus then llama.cpp;
round 2: llama.cpp then isthmus; ...); each figure is the best of the rounds. llama.cpp runs with
n_threads = n_threads_batch = the cores and its defaults otherwise; isthmus with its own.
"""

from __future__ import annotations

import os
import time

import numpy as np

from isthmus.bench.measure import Row

PROMPT = "Explain in a few sentences why the sky is blue."
PREFILL = (38, 271)          # a short chat turn, a longer prompt
DECODE = 64


def prompt_ids(tok, n: int) -> list[int]:
    text = ("The history of the printing press begins in the fifteenth century, when movable type "
            "changed how books were made and read across Europe. ") * 40
    ids = tok.encode(text)
    assert len(ids) >= n, f"the benchmark prompt has {len(ids)} tokens, fewer than {n}"
    return ids[:n]


def chat_ids(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True))


class Tokenizer:
    """The benchmark's token ids, from isthmus's tokenizer of the model (a path, or a loaded model)."""

    def __init__(self, model):
        import isthmus

        self.model = model if hasattr(model, "graph") else isthmus.load(str(model))
        self.tokenizer = self.model.tokenizer

    def ids(self, n: int) -> list[int]:
        return prompt_ids(self.tokenizer, n)

    def chat(self) -> list[int]:
        return chat_ids(self.tokenizer)


class IsthmusEngine(Tokenizer):
    """A compiled target with its kernels loaded and buffers bound. Timed methods return seconds,
    measured in this process."""

    def __init__(self, model, target: str = "numba"):
        import isthmus

        super().__init__(model)
        self.exe = isthmus.compile(self.model, target=target)
        self.exe.decoder().step(self.ids(8))

    def prefill(self, ids) -> float:
        d = self.exe.decoder()
        t0 = time.perf_counter()
        d.step(ids)
        return time.perf_counter() - t0

    def decode(self, chat, n: int) -> float:
        """Seconds of n greedy steps after prefilling `chat` (not timed)."""
        d = self.exe.decoder()
        tok = int(np.argmax(d.step(chat)))
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(d.step([tok])))
        return time.perf_counter() - t0

    def greedy(self, ids, n: int) -> list[int]:
        d = self.exe.decoder()
        out = [int(np.argmax(d.step(ids)))]
        while len(out) < n:
            out.append(int(np.argmax(d.step(out[-1:]))))
        return out

    def close(self) -> None:
        pass


class LlamaCppEngine:
    """llama.cpp with one thread per core; ImportError without llama-cpp-python (the `peers` extra)."""

    def __init__(self, path, warm_ids=None):
        from llama_cpp import Llama

        threads = os.cpu_count() or 1
        self.llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                         verbose=False)
        self.llm.eval(warm_ids or [1, 2, 3, 4, 5, 6, 7, 8])

    def prefill(self, ids) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t0

    def logits(self) -> np.ndarray:
        """The last evaluated token's logits (`Llama.scores` holds them only with logits_all=True,
        which would compute the logits of every prompt token)."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))

    def decode(self, chat, n: int) -> float:
        llm = self.llm
        llm.reset()
        llm.eval(chat)
        t0 = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(self.logits()))])
        return time.perf_counter() - t0

    def greedy(self, ids, n: int) -> list[int]:
        """n greedy tokens after `ids` (to check both engines continue the prompt alike)."""
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(self.logits())))
            self.llm.eval(out[-1:])
        return out

    def close(self) -> None:
        self.llm.close()


def engines(path, names=("isthmus numba", "llama.cpp"), log=print) -> tuple[dict, dict]:
    """({name: Worker} of the engines that start, each built in its own process; {name: why not} of
    those that do not: a peer not installed). Names: "isthmus <target>" or "llama.cpp"."""
    from isthmus.bench.isolated import Worker

    workers, missing = {}, {}
    try:
        for name in names:
            log(f"  starting {name}")
            try:
                if name == "llama.cpp":
                    workers[name] = Worker("isthmus.bench.model:LlamaCppEngine", str(path))
                else:
                    workers[name] = Worker("isthmus.bench.model:IsthmusEngine", str(path), name.split()[1])
            except ImportError:
                missing[name] = "llama-cpp-python not installed (pip install -e '.[peers]')"
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers, missing


def measure(workers: dict, prefill=PREFILL, n_decode: int = DECODE, rounds: int = 5, log=print) -> dict:
    """{name: {"prefill N": tok/s, ..., "decode": tok/s}}, the best of `rounds` interleaved rounds.
    The token ids come from the first isthmus engine's tokenizer; every engine gets the same."""
    from isthmus.bench.isolated import interleave

    tokenizer_side = next(w for n, w in workers.items() if n.startswith("isthmus"))
    ids = {n: tokenizer_side.call("ids", n) for n in prefill}
    chat = tokenizer_side.call("chat")

    def step(name, w):
        figures = {f"prefill {n}": n / w.call("prefill", ids[n]) for n in prefill}
        figures["decode"] = n_decode / w.call("decode", chat, n_decode)
        log(f"  {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()) + " tok/s")
        return figures

    runs = interleave(workers, step, rounds)
    return {name: {k: max(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def model(quick: bool = False, log=print) -> list[Row]:
    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, is_pulled

    rounds = 3 if quick else 5
    cases = [("prefill", f"{n}-token prompt", f"prefill {n}") for n in PREFILL] + \
            [("decode", f"{DECODE} tokens", "decode")]
    if not is_pulled():
        return [Row("model", case, shape, "numba", None, "llama.cpp", None, "tok/s", True,
                    note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`") for case, shape, _ in cases]
    workers, missing = engines(cache_path(REGISTRY[DEFAULT_MODEL]), log=log)
    try:
        got = measure(workers, rounds=rounds, log=log)
    finally:
        for w in workers.values():
            w.close()
    ours, theirs = got["isthmus numba"], got.get("llama.cpp")
    return [Row("model", case, shape, "numba", ours[key], "llama.cpp", theirs and theirs[key], "tok/s", True,
                note=missing.get("llama.cpp", "")) for case, shape, key in cases]
