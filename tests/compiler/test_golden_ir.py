"""The IR of a tiny Llama after canonicalize and after the fusion pass, pinned as text.

A change to a frontend, a pass or the fusion rules that alters what the kernel targets receive
shows up here as a diff to read. After an intended change, regenerate the files and review the diff:
    python tests/compiler/test_golden_ir.py
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
# One layer, GQA (4 query heads on 2 KV heads), q8_0 linears, GGUF's interleaved rope layout.
CONFIG = dict(n_layers=1, hidden=64, ffn=128, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=96,
              rms_eps=1e-5, rope_theta=10000.0, context_length=64)
PINNED = ("canonicalize", "fusion")


def dumps() -> dict[str, str]:
    from tiny_models import tiny_llama_model

    from isthmus.compiler.ir_text import print_graph
    from isthmus.compiler.passes.pipeline import FUSED_PIPELINE, run_pipeline

    model = tiny_llama_model(CONFIG, quant="q8_0", layout="interleaved", name="tiny-llama")
    got = {}
    run_pipeline(model.graph, FUSED_PIPELINE,
                 on_pass=lambda name, g: got.__setitem__(name, print_graph(g)) if name in PINNED else None)
    return got


def test_tiny_llama_ir_after_canonicalize_and_fusion():
    for name, text in dumps().items():
        want = (GOLDEN / f"tiny_llama.{name}.ir").read_text()
        if text != want:
            diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True),
                                                f"golden/tiny_llama.{name}.ir", f"IR after {name}"))
            raise AssertionError(f"the IR after {name} changed (regenerate with "
                                 f"`python tests/compiler/test_golden_ir.py` if intended):\n{diff}")


def test_the_golden_fusion_ir_is_the_canonical_ir_plus_its_groups():
    got = dumps()
    groups = [line for line in got["fusion"].splitlines() if line.startswith("  # ")]
    assert [line for line in got["fusion"].splitlines() if not line.startswith("  # ")] == \
        got["canonicalize"].splitlines()                     # fusion is an analysis: nodes unchanged
    assert groups[0] == "  # fusion: 7 kernel calls for 28 nodes"
    assert "epilogue=qkv norm" in groups[2] and "%present_key.0, %present_value.0" in groups[2]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parents[1] / "support"))
    GOLDEN.mkdir(exist_ok=True)
    for name, text in dumps().items():
        (GOLDEN / f"tiny_llama.{name}.ir").write_text(text)
        print(f"wrote {GOLDEN / f'tiny_llama.{name}.ir'}")
