"""GGUF block formats: decode and prefill of isthmus's numba target against llama.cpp on the same
files, one file per llama.cpp quantization type, each pair of engines in its own processes taking
turns (model.py's harness), best of the rounds.

The files are made by llama.cpp's own quantizer (`llama_model_quantize`, the `peers` extra) and kept
in isthmus's cache (bench/ beside models/), so a second run starts at once:
  - a synthetic Llama whose widths are multiples of 256 (hidden 1024, ffn 2816, 8 layers, GQA 16/4,
    random f16 weights, a byte-level vocabulary of 261 tokens), so each type is stored as itself,
    as in the 7B-class files people download: Q4_K_M (q4_k with q6_k for V, half of ffn_down and the
    output), Q5_K_M, Q6_K, Q3_K_M, Q2_K, Q5_0, Q5_1;
  - the default model (SmolLM2-135M-Instruct) requantized to Q4_K_M: its width, 576, is not a
    multiple of 256, so llama.cpp stores most of it as q5_0 (V as q8_0) and only ffn_down as
    q4_k/q6_k.
"""

from __future__ import annotations

import collections
import ctypes
import os
from pathlib import Path

from isthmus.bench.measure import Row

SYNTH = dict(n_layers=8, hidden=1024, ffn=2816, n_heads=16, n_kv_heads=4, head_dim=64, context_length=2048)
SYNTH_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q5_0", "Q5_1")
PREFILL, DECODE = 38, 64


def quant(quick: bool = False, log=print) -> list[Row]:
    from isthmus.bench.model import engines, measure
    from isthmus.models import DEFAULT_MODEL, is_pulled

    cases = [("synthetic Llama", t) for t in (SYNTH_TYPES[:1] if quick else SYNTH_TYPES)] + [(DEFAULT_MODEL, "Q4_K_M")]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return [Row("quant", f"decode {t}", name, "numba", None, "llama.cpp", None, "tok/s", True,
                    note="llama-cpp-python not installed (pip install -e '.[peers]'): it makes the files")
                for name, t in cases]
    rows = []
    for name, qtype in cases:
        if name == DEFAULT_MODEL and not is_pulled():
            rows.append(Row("quant", f"decode {qtype}", name, "numba", None, "llama.cpp", None, "tok/s", True,
                            note=f"{DEFAULT_MODEL} not pulled: run `isthmus pull`"))
            continue
        path = quantized_file(name, qtype, log)
        types = ", ".join(f"{t.lower()} x{c}" for t, c in tensor_types(path).most_common() if t != "F32")
        workers, missing = engines(path, log=log)
        try:
            got = measure(workers, prefill=(PREFILL,), n_decode=DECODE, rounds=3 if quick else 5, log=log)
        finally:
            for w in workers.values():
                w.close()
        ours, theirs = got["isthmus numba"], got.get("llama.cpp")
        for case, key in ((f"decode {qtype}", "decode"), (f"prefill {qtype}", f"prefill {PREFILL}")):
            rows.append(Row("quant", case, name, "numba", ours[key], "llama.cpp", theirs and theirs[key], "tok/s",
                            True, note=missing.get("llama.cpp", types)))
    return rows


def tensor_types(path) -> collections.Counter:
    from isthmus.compiler.frontends.gguf import read_gguf

    return collections.Counter(read_gguf(path).tensor_types.values())


def quantized_file(name: str, qtype: str, log=print) -> Path:
    """The cached file of model `name` ("synthetic Llama" or the default model) as llama.cpp's `qtype`."""
    from isthmus.models import DEFAULT_MODEL, REGISTRY, cache_path, home

    folder = home() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    stem = "smollm2" if name == DEFAULT_MODEL else "synthetic"
    path = folder / f"{stem}-{qtype.lower()}.gguf"
    if not path.exists():
        if stem == "smollm2":
            src, made = cache_path(REGISTRY[DEFAULT_MODEL]), False
        else:
            src, made = folder / "synthetic-f16.gguf", True
            log(f"  writing {src.name}")
            synthetic_f16(src)
        log(f"  quantizing {path.name} with llama.cpp")
        partial = path.with_suffix(".partial")
        requantize(src, partial, qtype)
        partial.rename(path)        # a run stopped half-way leaves no file that looks complete
        if made:
            src.unlink()
    return path


_QUIET = None


def requantize(src, dst, qtype: str):
    """`src` (any GGUF) written as llama.cpp's `qtype` ("Q4_K_M", "Q6_K", ...) to `dst`."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    p.allow_requantize = True
    p.nthread = os.cpu_count() or 1
    global _QUIET
    if _QUIET is None:           # kept: llama.cpp holds the pointer
        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())      # its per-tensor log would fill the bench's output
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src} -> {qtype}")
    return dst


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def synthetic_f16(path, seed: int = 0):
    """A random Llama (SYNTH) with a byte-level vocabulary (three chat tokens, the 256 bytes, two merges)."""
    import gguf
    import numpy as np

    from isthmus.compiler.frontends.tokenizer import _byte_alphabet

    c = SYNTH
    alphabet = _byte_alphabet()
    tokens = SPECIALS + [alphabet[b] for b in range(256)] + ["".join(m.split(" ")) for m in MERGES]
    V, D, F, H, KVH, hd = len(tokens), c["hidden"], c["ffn"], c["n_heads"], c["n_kv_heads"], c["head_dim"]
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
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
