"""Decode (and prefill) of a llama.cpp Q4_K_M file: isthmus's numba target against llama.cpp on the
same file, each engine in its own process, interleaved rounds, best of each (bench/model.py's
harness, the one `isthmus bench` uses for the default model).

    python benchmarks/bench_kquant_decode.py [FILE.gguf ...] [--synthetic [--q4-1]] [--rounds N]
    python benchmarks/bench_kquant_decode.py --matvec      # per block format: one decode matvec

Without FILE it makes one: the default model (SmolLM2-135M-Instruct, q4_1/q8_0) requantized by
llama.cpp's own quantizer to Q4_K_M (llama_model_quantize, allow_requantize). Its width, 576, is not
a multiple of 256, so llama.cpp stores most matrices as q5_0 (and V as q8_0) and only ffn_down
as q4_k/q6_k. `--synthetic` instead writes a random-weight Llama whose widths are multiples of 256
(hidden 1024, ffn 2816, 8 layers, GQA 16/4, tests/support's byte-level chat vocabulary) as f16 and
quantizes that to Q4_K_M: q4_k and q6_k throughout, as in the 7B-class files people download.
The script prints the file's type counts with the figures.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import tempfile


def requantize(src: str, dst: str, ftype_name: str = "LLAMA_FTYPE_MOSTLY_Q4_K_M") -> str:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, ftype_name)
    p.allow_requantize = True
    p.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src}")
    return dst


SYNTH = dict(n_layers=8, hidden=1024, ffn=2816, n_heads=16, n_kv_heads=4, head_dim=64, context_length=2048)


def synthetic_f16(path: str, seed: int = 0) -> str:
    """A random Llama (SYNTH) with the byte-level BPE chat vocabulary of tests/support/tiny_models.py."""
    import sys

    import gguf
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))
    from tiny_models import MERGES, SPECIALS, TEMPLATE, byte_alphabet

    c = SYNTH
    tokens = SPECIALS + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES]
    V, D, F, H, KVH, hd = len(tokens), c["hidden"], c["ffn"], c["n_heads"], c["n_kv_heads"], c["head_dim"]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synthetic-llama")
    for key, val in (("context_length", c["context_length"]), ("embedding_length", D), ("block_count", c["n_layers"]),
                     ("feed_forward_length", F), ("attention.head_count", H), ("attention.head_count_kv", KVH)):
        w.add_uint32(f"llama.{key}", val)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_uint32("general.file_type", 1)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_string("tokenizer.chat_template", TEMPLATE)

    def mat(rows, cols, scale=1.0):
        return (scale * rng.standard_normal((rows, cols), np.float32) / np.sqrt(cols)).astype(np.float16)

    out = mat(V, D, 4.0)
    out[2] *= 0.1                   # <|im_end|> rare: decode runs its full length
    w.add_tensor("token_embd.weight", rng.standard_normal((V, D), np.float32).astype(np.float16))
    w.add_tensor("output_norm.weight", np.ones(D, np.float32))
    w.add_tensor("output.weight", out)
    for i in range(c["n_layers"]):
        p = f"blk.{i}"
        for name, arr in ((f"{p}.attn_norm.weight", np.ones(D, np.float32)), (f"{p}.ffn_norm.weight", np.ones(D, np.float32)),
                          (f"{p}.attn_q.weight", mat(H * hd, D)), (f"{p}.attn_k.weight", mat(KVH * hd, D)),
                          (f"{p}.attn_v.weight", mat(KVH * hd, D)), (f"{p}.attn_output.weight", mat(D, H * hd)),
                          (f"{p}.ffn_gate.weight", mat(F, D)), (f"{p}.ffn_up.weight", mat(F, D)),
                          (f"{p}.ffn_down.weight", mat(D, F))):
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


MATVEC_TYPES = ("q4_1", "q8_0", "q4_k", "q5_k", "q6_k", "q5_0", "q5_1", "q3_k", "q2_k", "iq4_nl")


def matvec(rows: int = 2816, cols: int = 1024, copies: int = 24, rounds: int = 10) -> None:
    """One decode-sized matvec (1 x cols by W[rows, cols]) per block format, the weights made by
    llama.cpp's quantizer (q4_1 and q8_0 by isthmus's, bit for bit the same): `copies` distinct
    copies cycled so that together they exceed the caches, as a model's layers do; best of `rounds`
    interleaved rounds."""
    import sys
    import time

    import numpy as np
    from gguf import GGMLQuantizationType as T

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))
    import ggml_ref
    from isthmus.compiler.quant import QuantizedArray, quantize
    from isthmus.kernels.numba import linear

    rng = np.random.default_rng(0)
    wf = rng.standard_normal((rows, cols)).astype(np.float32)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    sets = {}
    for name in MATVEC_TYPES:
        qa = (quantize(wf, name) if name in ("q4_1", "q8_0")
              else QuantizedArray(name, wf.shape, ggml_ref.quantize(wf, T[name.upper()])))
        calls = []
        for _ in range(copies):
            p = linear.pack(qa)
            calls.append(linear.matvec_call(x, p, np.zeros((1, rows), np.float32), linear.Workspace()))
            calls[-1][0](*calls[-1][1])
        sets[name] = (calls, p.nbytes)
    best = dict.fromkeys(sets, float("inf"))
    for _ in range(rounds):
        for name, (calls, _) in sets.items():
            t0 = time.perf_counter()
            for fn, a in calls:
                fn(*a)
            best[name] = min(best[name], (time.perf_counter() - t0) / copies)
    print(f"decode matvec {rows}x{cols}, {copies} copies cycled, best of {rounds} rounds (load {os.getloadavg()[0]:.2f})")
    for name, (calls, nbytes) in sets.items():
        print(f"  {name:7s} {best[name] * 1e6:7.1f} us   {nbytes / best[name] / 1e9:5.1f} GB/s of weights   "
              f"{best[name] / best['q4_1']:.2f}x q4_1's time")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="*", help="GGUF files; several are measured in the same interleaved rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=38)
    ap.add_argument("--synthetic", action="store_true", help="a random Llama with widths multiple of 256")
    ap.add_argument("--q4-1", action="store_true", help="with --synthetic: also the same weights as Q4_1")
    ap.add_argument("--matvec", action="store_true", help="per block format: one decode matvec, no model")
    args = ap.parse_args()
    if args.matvec:
        return matvec()
    from isthmus.bench.isolated import Worker, interleave
    from isthmus.compiler.frontends.gguf import read_gguf

    paths = list(args.files)
    tmp = tempfile.gettempdir()
    if args.synthetic:
        for ftype, tag in [("LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_m")] + ([("LLAMA_FTYPE_MOSTLY_Q4_1", "q4_1")] if args.q4_1 else []):
            path = os.path.join(tmp, f"isthmus-synthetic-{tag}.gguf")
            if not os.path.exists(path):
                src = synthetic_f16(os.path.join(tmp, "isthmus-synthetic.f16.gguf"))
                requantize(src, path, ftype)
                os.remove(src)
            paths.append(path)
    if not paths:
        from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path

        path = os.path.join(tmp, "isthmus-smollm2-q4_k_m.gguf")
        if not os.path.exists(path):
            requantize(str(cache_path(REGISTRY[DEFAULT_MODEL])), path)
        paths.append(path)
    workers = {}
    try:
        for path in paths:
            types = collections.Counter(read_gguf(path).tensor_types.values())
            tag = os.path.basename(path)
            print(f"{tag}: " + ", ".join(f"{n} x{c}" for n, c in types.most_common()))
            workers[f"isthmus {tag}"] = Worker("isthmus.bench.model:IsthmusEngine", path, "numba")
            workers[f"llama.cpp {tag}"] = Worker("isthmus.bench.model:LlamaCppEngine", path)
        side = {os.path.basename(p): workers[f"isthmus {os.path.basename(p)}"] for p in paths}
        ids = {tag: w.call("ids", args.prefill) for tag, w in side.items()}
        chat = {tag: w.call("chat") for tag, w in side.items()}

        def step(name, w):
            tag = name.split(" ", 1)[1]
            return {"prefill": args.prefill / w.call("prefill", ids[tag]),
                    "decode": args.decode / w.call("decode", chat[tag], args.decode)}

        runs = interleave(workers, step, args.rounds)
    finally:
        for w in workers.values():
            w.close()
    best = {name: {k: max(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for path in paths:
        tag = os.path.basename(path)
        ours, theirs = best[f"isthmus {tag}"], best[f"llama.cpp {tag}"]
        for key in ours:
            print(f"{tag:34s} {key:8s} isthmus {ours[key]:8.1f} tok/s   llama.cpp {theirs[key]:8.1f} tok/s   "
                  f"ratio {ours[key] / theirs[key]:.2f}x")


if __name__ == "__main__":
    main()
