"""Makes the committed k-quant GGUF files of tests/compiler/test_gguf_kquant_families.py: for each
family, a tiny transformers model (2 layers) with widths that are multiples of 256 (k-quants' super-block,
so llama.cpp keeps q4_k / q6_k rather than falling back to q5_0 / q8_0), trained 100 Adam steps
on TEXT (so that greedy choices have margins larger than quantization noise), written as an f32
GGUF laid out as llama.cpp's converter writes it (tests/support/hf_gguf.py: write_gguf), then
quantized to Q4_K_M by llama.cpp's own quantizer (bench/quant.py: requantize, llama_model_quantize).

Writes, per family, `<family>/q4_k_m.gguf` and `<family>/config.json` (the transformers config
the oracle reads the file with): 0.5-0.7 MB a family, 3.7 MB in all (hidden and ffn 256; an
ffn of 512 made 5.2 MB). The models learn TEXT from its first position on, so prompts that start
elsewhere get no clear greedy choices. Seeded and deterministic. To rerun (needs llama-cpp-python):

    pip install -e ".[peers]"
    cd /tmp && python /work/main/tests/data/kquant_families/make.py [family ...]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt2"]
SIZES = dict(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64)
TEXT = ("the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
        "sphinx of black quartz, judge my vow!")       # 123 tokens, inside the 128 positions
STEPS = 100


def encode(text: str) -> list[int]:
    """Printable ASCII as tokens 0..94 (' ' is 0), inside the vocabulary of 96."""
    return [ord(c) - 32 for c in text]


def make(arch: str, out: Path = HERE) -> Path:
    import torch
    from hf_gguf import hf_model, resized, write_gguf

    from isthmus.bench.quant import requantize

    model = resized(hf_model(arch), seed=0, **SIZES)
    ids = torch.tensor([encode(TEXT)])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
    print(f"{arch}: loss {loss.item():.3f} after {STEPS} steps")
    model.eval()
    folder = out / arch
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = write_gguf(model, Path(tmp) / "f32.gguf", arch)
        requantize(f32, folder / "q4_k_m.gguf", "Q4_K_M")
    return folder / "q4_k_m.gguf"


if __name__ == "__main__":
    import collections

    from isthmus.compiler.frontends.gguf import read_gguf

    for arch in sys.argv[1:] or FAMILIES:
        path = make(arch)
        types = collections.Counter(read_gguf(path).tensor_types.values())
        print(f"{path.relative_to(HERE)}  {path.stat().st_size:>8} bytes  {dict(types)}")
