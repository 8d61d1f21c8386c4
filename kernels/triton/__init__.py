"""Triton kernels (NVIDIA GPUs; also TRITON_INTERPRET=1 on CPU tensors, which is how CI tests them).

One module per op family, each holding its kernels and the Python wrapper that picks their
launch shape; every wrapper takes torch tensors (f32, f16 or bf16; f32 accumulation) and
matches the op's numpy reference in isthmus.compiler.ops:

    norm         rmsnorm / layernorm, optionally fused with the residual add
    softmax      row softmax (whole row in registers, or looped for long rows)
    rope         rotary embedding, interleaved and half layouts, written anywhere (a KV-cache slice)
    elementwise  swiglu (also on a fused gate|up buffer), silu / gelu / sigmoid, binary ops
    attention    causal flash prefill and split-KV decode over a KV cache, grouped-query heads
    matmul       tiled matmul (autotuned) and a matrix-vector kernel; `linear` reads w[out, in]
    qmatmul      GGUF q4_0 / q4_1 / q8_0 weights, repacked once, dequantized in registers
    embedding    float or quantized table lookups

_util holds the launch helper (autotuned on a GPU, fixed configs under the interpreter) and
_aot compiles every launch for a GPU on a machine without one (benchmarks/gpu_check.py
--compile-only). Importing this package imports neither torch nor triton.
"""
