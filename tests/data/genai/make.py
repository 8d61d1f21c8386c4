"""Makes the onnxruntime-genai exports in this folder: the tiny Llama "llama-hd16" of
tests/support/onnx_exports.py (3 query heads and 1 kv head of 16: onnxruntime's
GroupQueryAttention needs head sizes that are multiples of 16) through the model builder,
fp32 and int4 (MatMulNBits, block 32, accuracy level 4), execution provider cpu, beside the
source checkpoint (the transformers oracle of the tests); and int4-shared, the same model with
tied embeddings built with shared_embeddings=true (GatherBlockQuantized on the lm_head's blocks).

    pip install onnxruntime-genai          # 0.18; its builder runs on transformers 5
    python tests/data/genai/make.py
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))

from onnx_exports import export_genai, hf_model  # noqa: E402


def main():
    model = hf_model("llama-hd16")
    for d in ("source", "fp32", "int4", "int4-shared", "cache"):
        shutil.rmtree(HERE / d, ignore_errors=True)
    for precision in ("fp32", "int4"):
        export_genai(model, HERE, precision)
    # tied embeddings shared as int4 blocks: GatherBlockQuantized reads the lm_head's MatMulNBits weight
    tied = HERE / "tied"
    export_genai(hf_model("llama-hd16", tied=True), tied, "int4", "shared_embeddings=true")
    (tied / "int4").rename(HERE / "int4-shared")
    shutil.rmtree(tied)
    shutil.rmtree(HERE / "cache", ignore_errors=True)


if __name__ == "__main__":
    main()
