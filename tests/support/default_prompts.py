"""The prompts whose 20-token greedy continuations of the default model every target (numba, the NPU on
core, chip and edge, its quantized weights) is checked against the reference on."""

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
