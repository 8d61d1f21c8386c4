"""ONNX decoders as people publish them, end to end: import, run, generate and chat.

Export kinds (folders as the exporter leaves them, model.onnx beside config.json and the tokenizer):
- dynamo: `torch.onnx.export(dynamo=True)` of `transformers` models (input_ids + attention_mask ->
  logits, no cache), made here from tiny random configs (tests/support/onnx_exports.py);
- optimum: optimum-onnx's text-generation-with-past exports (past_key_values.N.key/value in,
  present.N.key/value out, attention_mask and position_ids), committed in tests/data/optimum
  with their source checkpoints (optimum-onnx needs transformers < 4.58; see make.py there).
Oracles that share no code with isthmus: onnxruntime on the same file (logits, and the caches of
several decode steps, within 1e-4 of the logits' range) and transformers on the source model
(identical greedy 20-token continuations; the models are trained a few steps so that greedy
margins are clear).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import isthmus  # noqa: E402
from isthmus.compiler.batch import plan_for  # noqa: E402
from isthmus.compiler.frontends import load_model  # noqa: E402
from isthmus.compiler.ir import verify  # noqa: E402
from isthmus.compiler.ir_text import parse_graph, print_graph  # noqa: E402
from isthmus.compiler.kv_cache import FunctionalDecoder  # noqa: E402
from isthmus.runtime.generate import generate  # noqa: E402
from isthmus.runtime.sampling import SamplingParams  # noqa: E402
from cli_runner import run  # noqa: E402
from onnx_exports import VOCAB, export_dynamo, hf_greedy, hf_model, hf_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data" / "optimum"
KINDS = ["dynamo-llama", "dynamo-gpt2", "optimum-llama", "optimum-gpt2"]
TOL = 1e-4          # of the logits' range
TARGETS = ["reference", "numba"]


@pytest.fixture(scope="module", params=KINDS)
def export(request, tmp_path_factory):
    """(kind, export folder, the transformers model it was exported from, the isthmus Model)."""
    kind, arch = request.param.split("-")
    if kind == "dynamo":
        source = hf_model(arch)
        folder = export_dynamo(source, tmp_path_factory.mktemp(request.param))
    else:
        folder = DATA / arch
        source = transformers.AutoModelForCausalLM.from_pretrained(DATA / f"{arch}-source", dtype=torch.float32).eval()
    return request.param, folder, source, load_model(folder)


@pytest.fixture(scope="module")
def compiled(export):
    return {t: isthmus.compile(export[3], target=t) for t in TARGETS}


def test_the_decoder_record_names_the_exporters_inputs(export):
    kind, folder, source, model = export
    d = model.graph.decoder
    assert d.input_ids == "input_ids" and d.logits == "logits" and d.attention_mask == "attention_mask"
    if kind.startswith("dynamo"):
        assert d.position_ids is None and d.kv == ()
    else:
        assert d.position_ids == "position_ids"
        assert [(c.past_key, c.present_value) for c in d.kv] == \
            [(f"past_key_values.{i}.key", f"present.{i}.value") for i in range(2)]
    # the record prints and parses back with the graph
    again = parse_graph(print_graph(model.graph), {v.name: v.data for v in model.graph.constants})
    verify(again)
    assert again.decoder == d


def test_config_tokenizer_and_template_come_from_the_folder(export):
    kind, folder, source, model = export
    assert model.format == "onnx" and model.config["context_length"] == 128
    assert model.config["eos_token_id"] == 2 and model.config["bos_token_id"] == 1
    hf_tok = hf_tokenizer()
    messages = [{"role": "user", "content": "hello world"}]
    assert model.tokenizer.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    text = "the quick brown fox, café 日本語 🙂"
    assert model.tokenizer.encode(text) == hf_tok(text)["input_ids"]


def _ort_feeds(sess, ids, mask, past=None):
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {i.name: i for i in sess.get_inputs()}
    if "position_ids" in names:
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        feeds["position_ids"] = pos[:, -ids.shape[1]:]
    for n, i in names.items():
        if n.startswith("past_key_values"):
            shape = [ids.shape[0] if d == "batch_size" else 0 if isinstance(d, str) else d for d in i.shape]
            feeds[n] = np.zeros(shape, np.float32) if past is None else past[n.replace("past_key_values", "present")]
    return feeds


@pytest.mark.parametrize("target", TARGETS)
def test_logits_and_caches_match_onnxruntime(export, compiled, target):
    """A left-padded batch of 2, then (with a cache) three decode steps fed the presents back."""
    kind, folder, _, _ = export
    exe = compiled[target]
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, (2, 7)).astype(np.int64)
    mask = np.ones((2, 7), np.int64)
    mask[1, :3] = 0
    feeds, steps = _ort_feeds(sess, ids, mask), 3 if kind.startswith("optimum") else 1
    for _ in range(steps):
        theirs = dict(zip(names, sess.run(names, feeds)))
        ours = exe.run(feeds)
        span = np.ptp(theirs["logits"])
        for name in names:
            assert ours[name].shape == theirs[name].shape, name
            assert np.abs(ours[name] - theirs[name]).max() <= TOL * span, name
        nxt = theirs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        feeds = _ort_feeds(sess, nxt, mask, theirs)


@pytest.mark.parametrize("target", TARGETS)
def test_greedy_continuations_match_transformers(export, compiled, target):
    _, _, source, _ = export
    exe = compiled[target]
    rng = np.random.default_rng(3)
    for n in (1, 6, 23):
        ids = rng.integers(3, VOCAB, n).tolist()
        ours = list(generate(exe, ids, SamplingParams(max_tokens=20), stop_ids=()))
        assert ours == hf_greedy(source, ids, 20), n


def test_generation_feeds_the_mask_and_batching_declines(export, compiled):
    """Generation feeds the attention mask as ones over the cached and new positions; batched
    decoding and the numba in-place cache, which feed ids and positions only, decline the graph."""
    kind, _, _, _ = export
    assert plan_for(compiled["reference"]) is None
    assert isinstance(compiled["numba"].decoder(), FunctionalDecoder)
    dec = compiled["reference"].decoder()
    first = dec.step([5, 6, 7])
    second = dec.step([8])
    assert dec.length == 4 and first.shape == second.shape == (VOCAB,)


def test_chat_cli_matches_transformers(export, capsys):
    kind, folder, source, _ = export
    rc, out, err = run(capsys, "chat", "--model", folder, "hello world", "--max-tokens", "12")
    assert rc == 0, err
    tok = hf_tokenizer()
    # the rendered template encoded as plain text (with the BOS the tokenizer's post-processor adds), as isthmus does
    text = tok.apply_chat_template([{"role": "user", "content": "hello world"}], tokenize=False,
                                   add_generation_prompt=True)
    prompt = tok(text)["input_ids"]
    with torch.no_grad():
        gen = source.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, pad_token_id=0)
    want = tok.decode(gen[0, len(prompt):], skip_special_tokens=True)
    assert out.rstrip("\n") == want.rstrip("\ufffd")


def test_run_cli_passes_the_onnxruntime_check(export, capsys, tmp_path):
    _, folder, _, _ = export
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 5)).astype(np.int64)
    np.savez(tmp_path / "in.npz", **_ort_feeds(sess, ids, np.ones((2, 5), np.int64)))
    rc, out, err = run(capsys, "run", folder / "model.onnx", "--inputs", tmp_path / "in.npz",
                       "--check", "onnxruntime", "--target", "numba")
    assert rc == 0 and "PASS" in out, out + err


def test_verify_checks_the_attention_mask(export):
    """The record's mask must name a graph input of integers [batch, past+seq]."""
    from dataclasses import replace

    from isthmus.compiler.ir import clone
    from isthmus.errors import IRError

    g = clone(export[3].graph)
    g.decoder = replace(g.decoder, attention_mask="input_ids_missing")
    with pytest.raises(IRError, match=r"attention mask\) %input_ids_missing is not a graph input"):
        verify(g)
    g.decoder = replace(g.decoder, attention_mask="logits")
    with pytest.raises(IRError, match="is not a graph input"):
        verify(g)
