"""Makes the Optimum exports in this folder: tiny Llama (GQA) and GPT-2 decoders from
tests/support/onnx_exports.py:hf_model, exported by optimum-onnx with task
text-generation-with-past (inputs input_ids, attention_mask, position_ids,
past_key_values.N.key/value; outputs logits, present.N.key/value), beside the source
checkpoint each was exported from (the transformers oracle of the tests).

optimum-onnx 0.1 needs transformers < 4.58, which the dev environment (transformers 5) cannot
hold, so the exports are committed (about 1 MB) and remade with packages kept apart:

    pip install --target /tmp/optpkgs --no-deps optimum-onnx==0.1.0 optimum==2.1.0 \\
        transformers==4.57.6 tokenizers==0.22.2 huggingface_hub==0.36.2
    PYTHONPATH=/tmp/optpkgs python tests/data/optimum/make.py
"""

import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "support"))

from onnx_exports import hf_model, save_beside  # noqa: E402


def main():
    import transformers
    from optimum.exporters.onnx import main_export

    print("transformers", transformers.__version__)
    for arch in ("llama", "gpt2"):
        src, out = HERE / f"{arch}-source", HERE / arch
        for d in (src, out):
            shutil.rmtree(d, ignore_errors=True)
        model = hf_model(arch)
        model.save_pretrained(src)
        save_beside(model, src)
        main_export(str(src), output=str(out), task="text-generation-with-past")
        for extra in ("special_tokens_map.json",):
            for d in (src, out):
                (d / extra).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
