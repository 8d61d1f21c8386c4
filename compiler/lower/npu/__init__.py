"""The NPU lowering: a graph lowered to programs for the modeled NPU (isthmus.npu).

target.py            the `npu` target: `lower_npu`, the executable, the decoder runtime (chunk buckets)
llama_matcher.py     recognises a Llama decoder graph
chunk_program.py     the decoder's chunk programs: one per (new tokens, KV window) bucket; the HBM image
op_runner.py         the per-op lowering of any graph: segments, one program per input shapes
op_kernels.py        its node kernels: elementwise, casts, data movement, reductions (the strided loop)
op_kernels_tensor.py its node kernels on the tensor engine: linear, matmul, rope, attention
resident_kernels.py  linear layers with fused epilogues, rmsnorm, on SBUF-resident activations
attention.py         rotary embedding by a rotation matmul; flash attention with an online softmax
weights.py           packed weights (packing kernel: kernels/numba/weight_pack.py), the SBUF weight ring
emitter.py, tiles.py the emitter: tiles, on-chip allocation, the engine schedule and its semaphores
profile_tables.py    per-op profile tables and figures (`isthmus profile`)
"""
