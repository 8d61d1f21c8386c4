"""The modeled NPU: config, instruction table, encoding, assembler, builder, simulator, timing, traces.

See docs/npu.md. Entry points: `isthmus.npu.builder.ProgramBuilder` (emit programs),
`isthmus.npu.asm` (text <-> Program <-> bytes), `isthmus.npu.sim.run` (execute and time a program).
"""
