# Row softmax of x[128, 64] (f32), one row per partition:
#   y = exp(x - max(x)) / sum(exp(x - max(x)))
# Run it:  isthmus npu run examples/npu/softmax.s --trace softmax.json
# SBUF layout per partition: x at 0x0 (64 f32), max/-max/sum/1/sum at 0x100..0x10c, e at 0x200.
.hbm 65536
.tensor x f32[128,64] 0x0 input
.tensor y f32[128,64] 0x8000 output

dma_copy sbuf.f32[0:128]{64:1}, hbm.f32[128*64]{64:1}, queue=0 @"load x"
sem_signal engine=dma0, sem=0                                   # x is in SBUF

sem_wait engine=vector, sem=0, value=1
tensor_reduce sbuf.f32[0:128]+0x100{1:1}, sbuf.f32[0:128]{64:1}, op=max @"softmax.max"
tensor_scalar sbuf.f32[0:128]+0x104{1:1}, sbuf.f32[0:128]+0x100{1:1}, op=mul, scalar=-1.0 @"softmax.max"
sem_signal engine=vector, sem=1                                 # -max is ready

# e = exp(x * 1 + (-max)), and its row sum fused into the same instruction
sem_wait engine=act, sem=1, value=1
activate sbuf.f32[0:128]+0x200{64:1}, sbuf.f32[0:128]{64:1}, func=exp, bias=sbuf.f32[0:128]+0x104{1:1}, accum=sbuf.f32[0:128]+0x108{1:1} @"softmax.exp"
activate sbuf.f32[0:128]+0x10c{1:1}, sbuf.f32[0:128]+0x108{1:1}, func=reciprocal @"softmax.exp"
sem_signal engine=act, sem=2

sem_wait engine=vector, sem=2, value=1
tensor_scalar sbuf.f32[0:128]+0x200{64:1}, sbuf.f32[0:128]+0x200{64:1}, op=mul, scalar=sbuf.f32[0:128]+0x10c{1:1} @"softmax.norm"
sem_signal engine=vector, sem=3

sem_wait engine=dma1, sem=3, value=1
dma_copy hbm.f32[128*64]+0x8000{64:1}, sbuf.f32[0:128]+0x200{64:1}, queue=1 @"store y"
