"""ONNX decoders as people publish them, end to end: import, run, generate and chat.

Export kinds (folders as the exporter leaves them, model.onnx beside config.json and the tokenizer):
- dynamo: `torch.onnx.export(dynamo=True)` of `transformers` models (input_ids + attention_mask ->
  logits, no cache), made here from tiny random configs (tests/support/onnx_exports.py);
- dynamocache: the same exporter on a decoder step with its cache (input_ids, attention_mask,
  position_ids, past_key.N / past_value.N -> logits, present_key.N / present_value.N);
- optimum: optimum-onnx's text-generation-with-past exports (past_key_values.N.key/value in,
  present.N.key/value out, attention_mask and position_ids), committed in tests/data/optimum
  with their source checkpoints (optimum-onnx needs transformers < 4.58; see make.py there);
- genai: onnxruntime-genai's model builder, fp32 and int4 (com.microsoft GroupQueryAttention with
  its rotary, MatMulNBits, SkipSimplifiedLayerNormalization), committed in tests/data/genai
  (make.py there; a slow test rebuilds them with the installed builder).
Oracles that share no code with isthmus: onnxruntime on the same file (logits, and the caches of
several decode steps, within 1e-4 of the logits' range; int4 within 2 %, as onnxruntime runs
MatMulNBits at accuracy level 4 on int8 activations, and within 1e-4 of a copy set to accuracy
level 0) and transformers on the source model (identical greedy 20-token continuations; for int4,
onnxruntime's exact computation decoding with the cache; the models are trained a few steps so
that greedy margins are clear).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
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
from onnx_exports import VOCAB, exported, hf_model, hf_tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
KINDS = ["dynamo-llama", "dynamo-gpt2", "dynamocache-llama", "dynamocache-gpt2", "optimum-llama", "optimum-gpt2",
         "genai-fp32", "genai-int4", "genai-int4shared"]
TOL = 1e-4          # of the logits' range
# genai int4 against onnxruntime as published: MatMulNBits at accuracy_level 4 quantizes the
# activations to int8 (isthmus computes with the exactly dequantized weights in f32)
INT4_TOL = 2e-2
TARGETS = ["reference", "numba", "npu"]   # triton: see docs/models.md


@dataclass
class Export:
    kind: str
    folder: Path           # as the exporter left it
    model: object          # the isthmus Model loaded from it
    source: object         # the transformers model it was exported from
    exact: Path            # an ONNX file onnxruntime computes as exactly as isthmus (the oracle)

    @property
    def onnx(self) -> Path:
        return self.folder / "model.onnx"


def _exact_copy(folder: Path, tmp: Path) -> Path:
    """The int4 model with MatMulNBits at accuracy_level 0 (f32 activations): onnxruntime's
    exact computation with the dequantized weights, what isthmus computes."""
    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    onnx.save(model, str(tmp / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return tmp / "model.onnx"


@pytest.fixture(scope="module", params=KINDS)
def export(request, tmp_path_factory):
    kind, variant = request.param.split("-")
    tmp = tmp_path_factory.mktemp(request.param)
    if kind.startswith("dynamo"):
        folder, source = exported(kind, variant, tmp_path_factory)
    else:
        folder = DATA / kind / variant.replace("int4shared", "int4-shared")
        src = DATA / kind / ("source" if kind == "genai" else f"{variant}-source")
        source = None if "int4" in variant else \
            transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    exact = _exact_copy(folder, tmp) if "int4" in request.param else folder / "model.onnx"
    return Export(request.param, folder, load_model(folder), source, exact)


@pytest.fixture(scope="module")
def compiled(export):
    return {t: isthmus.compile(export.model, target=t) for t in TARGETS}


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _ort_feeds(sess, ids, mask, past=None, head_size=None):
    feeds = {"input_ids": ids, "attention_mask": mask}
    names = {i.name: i for i in sess.get_inputs()}
    if "position_ids" in names:
        pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
        feeds["position_ids"] = pos[:, -ids.shape[1]:]
    for n, i in names.items():
        if n.startswith("past_"):
            batch, heads, _, dim = i.shape
            shape = [ids.shape[0], heads, 0, dim if isinstance(dim, int) else head_size]
            present = n.replace("past_key_values", "present") if n.startswith("past_key_values") else "present" + n[4:]
            feeds[n] = np.zeros(shape, np.float32) if past is None else past[present]
    return feeds


def _head_size(e: Export):
    g = e.model.graph
    return next((v.shape[3] for n in g.nodes if n.op == "concat" for v in n.outputs
                 if g.decoder.kv and v.type.rank == 4 and isinstance(v.shape[3], int)), None)


def oracle_greedy(e: Export, ids: list[int], n: int, eos: int | None = None) -> list[int]:
    """The greedy continuation: transformers on the source model, or for int4 weights (which the
    source does not have) onnxruntime's exact computation, decoding with the cache."""
    if "int4" not in e.kind:
        with torch.no_grad():
            out = e.source.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n,
                                    eos_token_id=eos, pad_token_id=0, **({} if eos is not None else {"min_new_tokens": n}))
        return out[0, len(ids):].tolist()
    sess, names = _session(e.exact), None
    names = [o.name for o in sess.get_outputs()]
    x, mask, past, got = np.asarray([ids], np.int64), np.ones((1, len(ids)), np.int64), None, []
    while len(got) < n:
        out = dict(zip(names, sess.run(names, _ort_feeds(sess, x, mask, past, _head_size(e)))))
        got.append(int(out["logits"][0, -1].argmax()))
        if got[-1] == eos:
            break
        x, mask, past = np.asarray([[got[-1]]], np.int64), np.ones((1, mask.shape[1] + 1), np.int64), out
    return got


def test_the_decoder_record_names_the_exporters_inputs(export):
    d = export.model.graph.decoder
    assert d.input_ids == "input_ids" and d.logits == "logits" and d.attention_mask == "attention_mask"
    if export.kind.startswith("dynamo-"):
        assert d.position_ids is None and d.kv == ()
    elif export.kind.startswith("dynamocache"):
        assert d.position_ids == "position_ids"
        assert [(c.past_key, c.present_value) for c in d.kv] == [(f"past_key.{i}", f"present_value.{i}") for i in range(2)]
    else:
        assert d.position_ids == ("position_ids" if export.kind.startswith("optimum") else None)
        assert [(c.past_key, c.present_value) for c in d.kv] == \
            [(f"past_key_values.{i}.key", f"present.{i}.value") for i in range(2)]
    # the record prints and parses back with the graph
    g = export.model.graph
    again = parse_graph(print_graph(g), {v.name: v.data for v in g.constants})
    verify(again)
    assert again.decoder == d


def test_config_tokenizer_and_template_come_from_the_folder(export):
    model = export.model
    assert model.format == "onnx" and model.config["context_length"] == 128
    assert model.config["eos_token_id"] == 2 and model.config["bos_token_id"] == 1
    hf_tok = hf_tokenizer()
    messages = [{"role": "user", "content": "hello world"}]
    assert model.tokenizer.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    text = "the quick brown fox, café 日本語 🙂"
    assert model.tokenizer.encode(text) == hf_tok(text)["input_ids"]


def test_canonicalisation_gives_the_fused_ops(export):
    """Each export kind's decomposed or com.microsoft blocks become the same fused ops."""
    hist = isthmus.compile(export.model, target="reference").graph.op_histogram()
    assert hist["attention"] == 2 and "softmax" not in hist and "matmul" not in hist
    if "gpt2" in export.kind:
        assert hist["layernorm"] == 5 and hist["gelu"] == 2 and hist["linear"] == 9
        return
    assert hist["rmsnorm"] == 5 and hist["rope"] == 4 and hist["swiglu"] == 2
    assert hist["linear"] == (11 if export.kind.startswith("genai") else 15)


@pytest.mark.parametrize("target", TARGETS[:2])
def test_logits_and_caches_match_onnxruntime(export, compiled, target):
    """A batch of 2 with a padded row (left padding; right padding for GroupQueryAttention, which
    takes a row's length from the mask), then, with a cache, three decode steps fed the presents back."""
    exe = compiled[target]
    head = _head_size(export)
    for path, tol in ((export.exact, TOL), (export.onnx, INT4_TOL if "int4" in export.kind else TOL)):
        sess = _session(path)
        names = [o.name for o in sess.get_outputs()]
        ids = np.random.default_rng(0).integers(3, VOCAB, (2, 7)).astype(np.int64)
        mask = np.ones((2, 7), np.int64)
        if export.kind.startswith("genai"):
            mask[1, 4:] = 0         # GroupQueryAttention reads a row's length from the mask: right padding
        else:
            mask[1, :3] = 0
        feeds = _ort_feeds(sess, ids, mask, head_size=head)
        for _ in range(3 if export.model.graph.decoder.kv else 1):
            theirs = dict(zip(names, sess.run(names, feeds)))
            ours = exe.run(feeds)
            span = np.ptp(theirs["logits"])
            for name in names:
                assert ours[name].shape == theirs[name].shape, name
                assert np.abs(ours[name] - theirs[name]).max() <= tol * span, (path, name)
            nxt = theirs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
            feeds = _ort_feeds(sess, nxt, mask, theirs)


@pytest.mark.parametrize("target", TARGETS)
def test_greedy_continuations_match_the_oracle(export, compiled, target):
    exe = compiled[target]
    rng = np.random.default_rng(3)
    for n in (1, 23) if target != "npu" else (6,):      # the NPU simulator is the slow one
        ids = rng.integers(3, VOCAB, n).tolist()
        ours = list(generate(exe, ids, SamplingParams(max_tokens=20), stop_ids=()))
        assert ours == oracle_greedy(export, ids, 20), n


def test_generation_feeds_the_mask_and_batching_declines(export, compiled):
    """Generation feeds the attention mask as ones over the cached and new positions; batched
    decoding and the numba in-place cache, which feed ids and positions only, decline the graph."""
    assert plan_for(compiled["reference"]) is None
    assert isinstance(compiled["numba"].decoder(), FunctionalDecoder)
    dec = compiled["reference"].decoder()
    first = dec.step([5, 6, 7])
    second = dec.step([8])
    assert dec.length == 4 and first.shape == second.shape == (VOCAB,)


def test_chat_cli_matches_the_oracle(export, capsys):
    prompt = "the quick brown"
    rc, out, err = run(capsys, "chat", "--model", export.folder, prompt, "--max-tokens", "12")
    assert rc == 0, err
    tok = hf_tokenizer()
    # the rendered template encoded as plain text (with the BOS the tokenizer's post-processor adds), as isthmus does
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    want = tok.decode(oracle_greedy(export, ids, 12, eos=2), skip_special_tokens=True)
    assert out.endswith("\n") and out[:-1].rstrip("\ufffd") == want.rstrip("\ufffd")   # the CLI ends the reply with a newline


def test_run_cli_passes_the_onnxruntime_check(export, capsys, tmp_path):
    sess = _session(export.exact)
    ids = np.random.default_rng(1).integers(3, VOCAB, (2, 5)).astype(np.int64)
    np.savez(tmp_path / "in.npz", **_ort_feeds(sess, ids, np.ones((2, 5), np.int64), head_size=_head_size(export)))
    rc, out, err = run(capsys, "run", export.exact, "--inputs", tmp_path / "in.npz",
                       "--check", "onnxruntime", "--target", "numba")
    assert rc == 0 and "PASS" in out, out + err


def test_verify_checks_the_attention_mask(export):
    """The record's mask must name a graph input."""
    from dataclasses import replace

    from isthmus.compiler.ir import clone
    from isthmus.errors import IRError

    g = clone(export.model.graph)
    g.decoder = replace(g.decoder, attention_mask="input_ids_missing")
    with pytest.raises(IRError, match=r"attention mask\) %input_ids_missing is not a graph input"):
        verify(g)
    g.decoder = replace(g.decoder, attention_mask="logits")
    with pytest.raises(IRError, match="is not a graph input"):
        verify(g)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_the_installed_genai_builder_still_gives_what_isthmus_reads(precision, tmp_path):
    """Rebuilds the committed genai export with the builder installed here (about 10 s)."""
    pytest.importorskip("onnxruntime_genai")
    from onnx_exports import export_genai

    folder = export_genai(hf_model("llama-hd16"), tmp_path, precision)
    e = Export(f"genai-{precision}", folder, load_model(folder), None,
               _exact_copy(folder, tmp_path) if precision == "int4" else folder / "model.onnx")
    exe = isthmus.compile(e.model, target="numba")
    sess = _session(e.exact)
    names = [o.name for o in sess.get_outputs()]
    feeds = _ort_feeds(sess, np.asarray([[5, 6, 7, 8]], np.int64), np.ones((1, 4), np.int64), head_size=_head_size(e))
    theirs, ours = sess.run(names, feeds), exe.run(feeds)
    for name, want in zip(names, theirs):
        assert np.abs(ours[name] - want).max() <= TOL * np.ptp(theirs[0]), name


def _edited_genai(tmp_path, edit) -> Path:
    """A copy of the genai int4 export with `edit(node)` applied to its com.microsoft nodes."""
    import shutil

    folder = Path(shutil.copytree(DATA / "genai" / "int4", tmp_path / "edited"))
    model = onnx.load(str(folder / "model.onnx"))
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            edit(node)
    (folder / "model.onnx.data").unlink()
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return folder


def _set(name, value):
    def edit(node):
        for a in node.attribute:
            if a.name == name:
                a.CopyFrom(onnx.helper.make_attribute(name, value))
    return edit


@pytest.mark.parametrize("name,value,needle", [("local_window_size", 4, "local_window_size 4"),
                                               ("softcap", 30.0, "softcap"), ("bits", 3, "3-bit weights")])
def test_what_the_microsoft_ops_do_not_implement_is_one_line(tmp_path, capsys, name, value, needle):
    from cli_runner import one_line_error

    folder = _edited_genai(tmp_path, _set(name, value))
    rc, out, err = run(capsys, "info", folder)
    one_line_error(rc, err, needle, "node /model/layers.0/")


def test_chat_without_a_tokenizer_is_one_line(tmp_path, capsys):
    import shutil

    from cli_runner import one_line_error

    folder = Path(shutil.copytree(DATA / "optimum" / "gpt2", tmp_path / "no_tokenizer"))
    (folder / "tokenizer.json").unlink()
    rc, out, err = run(capsys, "chat", "--model", folder, "hello")
    one_line_error(rc, err, "tokenizer")
