"""Batched decode engines for benchmarks/bench_batched_decode.py, each built in its own worker
process (isolated.py): isthmus's numba target stepping B sequences with `decode_batch`, and
llama.cpp decoding B sequences in one `llama_decode` batch (its own batched decode)."""

from __future__ import annotations

import os
import time

PROMPT = 30


class IsthmusBatch:
    def __init__(self, path):
        import isthmus
        self.exe = isthmus.compile(isthmus.load(str(path)), target="numba")

    def rate(self, b: int, steps: int) -> float:
        decs = [self.exe.decoder() for _ in range(b)]
        for d in decs:
            d.step(list(range(10, 10 + PROMPT)))
        tokens = [5] * b

        def step():
            if b == 1:
                decs[0].step(tokens)
            else:
                self.exe.decode_batch(decs, tokens)
        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        return b * steps / (time.perf_counter() - t0)

    def close(self):
        pass


class LlamaCppBatch:
    """llama.cpp's own batched decode: one `llama_decode` per step over B sequences."""

    def __init__(self, path):
        import llama_cpp

        threads = os.cpu_count() or 1
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = 4096, 512, 32
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        self.batch = llama_cpp.llama_batch_init(512, 0, 32)

    def _decode(self, items):
        """items: (token, position, sequence, wants logits)."""
        lib, bt = self.lib, self.batch
        bt.n_tokens = len(items)
        for i, (tok, pos, seq, logits) in enumerate(items):
            bt.token[i], bt.pos[i], bt.n_seq_id[i] = tok, pos, 1
            bt.seq_id[i][0], bt.logits[i] = seq, logits
        if lib.llama_decode(self.ctx, bt) != 0:
            raise RuntimeError("llama_decode failed")

    def rate(self, b: int, steps: int) -> float:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        for s in range(b):
            self._decode([(10 + i, i, s, i == PROMPT - 1) for i in range(PROMPT)])
        pos = PROMPT
        self._decode([(5, pos, s, True) for s in range(b)])
        pos += 1
        t0 = time.perf_counter()
        for _ in range(steps):
            self._decode([(5, pos, s, True) for s in range(b)])
            pos += 1
        return b * steps / (time.perf_counter() - t0)

    def close(self):
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class InvariantPrefill:
    """A prompt read whole by the default model compiled with or without `batch_invariant`
    (benchmarks/bench_batch_invariant.py), in a worker process of its own."""

    def __init__(self, path, target, invariant):
        import isthmus
        self.exe = isthmus.compile(isthmus.load(str(path)), target=target, batch_invariant=invariant)

    def seconds(self, n: int) -> float:
        import time

        import numpy as np
        ids = np.random.default_rng(n).integers(100, 20000, n).tolist()
        d = self.exe.decoder()
        t0 = time.perf_counter()
        d.step(ids)
        return time.perf_counter() - t0

    def chunking_matters(self, n: int) -> bool:
        import numpy as np
        ids = np.random.default_rng(n).integers(100, 20000, n).tolist()
        whole, parts = self.exe.decoder(), self.exe.decoder()
        a = whole.step(ids).copy()
        for i in range(0, n, 16):
            b = parts.step(ids[i:i + 16])
        return not np.array_equal(a, b)

    def close(self):
        pass
