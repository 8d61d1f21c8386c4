"""ONNX frontend: `load_onnx(path) -> Graph`.

Covers what `torch.onnx.export(..., dynamo=True)` and optimum emit for Llama- and GPT-2-style
decoders (the op table is in `onnx_ops.py`, one handler per ONNX op).

- Initializers become constants by reference: external data is memory-mapped read-only
  (a file beside the model, never outside its folder), inline raw data is viewed, not copied.
- Graph inputs keep their names; a dim_param becomes a symbolic dim ("seq"). Graph outputs
  keep their ONNX names and every node's `source` is the ONNX node name.
- Shape arithmetic (`Shape -> Gather -> Concat -> Reshape`) is evaluated while importing:
  the importer tracks the value of every small integer tensor as a vector of dims, ints or
  symbols, so a Reshape or Expand whose target depends on "seq" still gets a static
  attribute (0 copies a dim, -1 infers one). Tensors whose *size* depends on a symbol
  (`Range`, `ConstantOfShape`) are built at run time from `shape` nodes.
- Every op the table lacks is reported at once in one `UnsupportedError`; an unreadable
  file is a one-line `ModelFormatError`.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from isthmus.compiler.ir import DecoderInterface, Graph, KVLayer, Value, numpy_dtype
from isthmus.compiler.ops import get_op
from isthmus.compiler.ops.registry import add_dims
from isthmus.errors import IRError, ModelFormatError, UnsupportedError

# ONNX TensorProto element types -> IR element types
DTYPES = {1: "f32", 10: "f16", 11: "f64", 7: "i64", 6: "i32", 3: "i8", 2: "u8", 9: "bool"}
FOLD_LIMIT = 1 << 12     # results of at most this many elements are computed while importing
KNOWN_LIMIT = 64         # integer/bool tensors up to this size have their values (dims) tracked


def load_onnx(path) -> Graph:
    path = Path(path)
    return _Importer(_read(path), path).run()


def load_onnx_model(path):
    """A `Model`: the graph, and for a decoder what generation needs from the files an exporter
    writes beside it (see `onnx_model`)."""
    path = Path(path)
    return onnx_model(load_onnx(path), str(path), path.parent)


def onnx_model(graph: Graph, where: str, folder):
    """The Model of an imported graph. For a decoder, `folder` (a Path, or an in-memory folder)
    may hold config.json (+ generation_config.json: Optimum, torch exports saved with
    `save_pretrained`) or genai_config.json (onnxruntime-genai), which give the context length
    and the end tokens, and tokenizer.json + tokenizer_config.json (or chat_template.jinja),
    which give the tokenizer and the chat template. The graph alone decides the numbers: a
    config is read for generation only."""
    from isthmus.compiler.frontends import Model

    if graph.decoder is None:
        return Model(graph, where, "onnx")
    from isthmus.compiler.frontends.safetensors import _chat_template, _read_json

    logits = graph.decoder.resolve(graph).logits
    vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
    config = _decoder_config(folder, vocab)
    tokenizer = None
    if (folder / "tokenizer.json").exists():
        from isthmus.compiler.frontends.hf_tokenizer import tokenizer_from_hf

        tok_path = folder / "tokenizer_config.json"
        tok_config = _read_json(tok_path) if tok_path.exists() else {}
        if not isinstance(tok_config, dict):
            raise ModelFormatError(f"{tok_path}: expected a JSON object")
        config["chat_template"] = _chat_template(folder, tok_config)
        tokenizer = tokenizer_from_hf(folder, tok_config, bos_id=config.get("bos_token_id"),
                                      eos_id=config.get("eos_token_id"), stop_ids=config.get("stop_token_ids", []),
                                      chat_template=config["chat_template"], vocab_size=vocab)
    return Model(graph, where, "onnx", config, tokenizer)


def _decoder_config(folder, vocab: int | None) -> dict:
    """name, context_length, bos/eos/stop token ids from config.json or genai_config.json, if any."""
    from isthmus.compiler.frontends.safetensors import _add_generation_stops, _read_json, _token_ids

    config: dict = {}
    limit = vocab if vocab is not None else 1 << 31
    hf, genai = folder / "config.json", folder / "genai_config.json"
    if hf.exists():
        cfg = _read_json(hf)
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{hf}: expected a JSON object")
        where = str(hf)
        ctx = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in cfg), None)
    elif genai.exists():
        top = _read_json(genai)
        cfg = top.get("model") if isinstance(top, dict) else None
        if not isinstance(cfg, dict):
            raise ModelFormatError(f"{genai}: expected a JSON object with a \"model\" object")
        where = str(genai)
        ctx = cfg.get("context_length")
    else:
        return config
    if ctx is not None and (type(ctx) is not int or ctx <= 0):
        raise ModelFormatError(f"{where}: the context length is {ctx!r}, expected a positive integer")
    eos = _token_ids(cfg.get("eos_token_id"), "eos_token_id", limit, where)
    bos = _token_ids(cfg.get("bos_token_id"), "bos_token_id", limit, where)
    config.update(name=folder.name if hasattr(folder, "name") else str(folder), context_length=ctx,
                  vocab_size=limit, bos_token_id=bos[0] if bos else None, eos_token_id=eos[0] if eos else None,
                  stop_token_ids=eos[1:])
    if hf.exists():
        _add_generation_stops(folder, config)
    if vocab is None:
        config.pop("vocab_size")
    return config


def decoder_by_names(g: Graph) -> DecoderInterface | None:
    """The decoder interface of an exported graph, read from its naming convention: `input_ids`
    (and `position_ids`, `attention_mask`) in, `logits` out, and each past cache input returned
    as the output of the same suffix: `past_key*` / `past_value*` -> `present_key*` /
    `present_value*` (torch.onnx), `past_key_values.N.key` / `.value` -> `present.N.key` / `.value`
    (Optimum, onnxruntime-genai). None when the graph does not follow it."""
    ins = [v.name for v in g.inputs]
    outs = {v.name for v in g.outputs}
    if "input_ids" not in ins or "logits" not in outs:
        return None
    kv = []
    for k in (n for n in ins if n.startswith("past_key") and not n.startswith("past_key_values.")):
        v = "past_value" + k[len("past_key"):]
        pk, pv = "present" + k[len("past"):], "present" + v[len("past"):]
        if v not in ins or pk not in outs or pv not in outs:
            return None
        kv.append(KVLayer(k, v, pk, pv))
    for k in (n for n in ins if n.startswith("past_key_values.") and n.endswith(".key")):
        layer = k[len("past_key_values."):-len(".key")]
        v, pk, pv = f"past_key_values.{layer}.value", f"present.{layer}.key", f"present.{layer}.value"
        if v not in ins or pk not in outs or pv not in outs:
            return None
        kv.append(KVLayer(k, v, pk, pv))
    extras = [n for n in ("position_ids", "attention_mask") if n in ins]
    fed = {"input_ids", *extras} | {n for c in kv for n in (c.past_key, c.past_value)}
    if set(ins) - fed:      # an input generation would not know how to feed (token_type_ids, ...)
        return None
    return DecoderInterface("input_ids", "logits", "position_ids" if "position_ids" in ins else None, tuple(kv),
                            "attention_mask" if "attention_mask" in ins else None)


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120]}" if text else type(e).__name__


def _read(path: Path):
    if not path.exists():
        raise ModelFormatError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: not a file")
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeError, ValueError... on bad bytes
        raise ModelFormatError(f"{path}: not a valid ONNX model ({_short(e)})") from None
    if not model.HasField("graph") or not model.graph.output or not model.opset_import:
        raise ModelFormatError(f"{path}: not a valid ONNX model (no graph, outputs or opset)")
    return model


# -- dims arithmetic on the values of shape tensors ------------------------------------------
# A dim is an int, a symbol string ("seq", "past+seq", "batch*seq") or None (unknown).

def _mono(d):
    """A dim as a monomial (coefficient, sorted symbols), or None."""
    if isinstance(d, (int, np.integer)):
        return int(d), ()
    if not isinstance(d, str):
        return None
    coef, syms = 1, []
    for f in d.split("*"):
        if f.lstrip("-").isdigit():
            coef *= int(f)
        else:
            syms.append(f)
    return coef, tuple(sorted(syms))


def _from_mono(coef: int, syms: tuple) -> object:
    if not syms or coef == 0:
        return coef
    return "*".join(list(syms) + ([str(coef)] if coef != 1 else []))


def dim_mul(a, b):
    ma, mb = _mono(a), _mono(b)
    if ma is None or mb is None:
        return None
    if (ma[1] and "+" in a and mb != (1, ())) or (mb[1] and "+" in b and ma != (1, ())):
        return None   # "past+seq" * 2 has no spelling in the dim language
    return _from_mono(ma[0] * mb[0], tuple(sorted(ma[1] + mb[1])))


def dim_div(a, b):
    ma, mb = _mono(a), _mono(b)
    if ma is None or mb is None or mb[0] == 0:
        return None
    rest = list(ma[1])
    for s in mb[1]:
        if s not in rest:
            return None
        rest.remove(s)
    if ma[0] % mb[0] and (rest or mb[1]):
        return None
    q = int(ma[0] / mb[0]) if not rest else ma[0] // mb[0]   # integer Div truncates toward zero
    return _from_mono(q, tuple(rest))


def dim_add(a, b):
    if a is None or b is None:
        return None
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) + int(b)
    if "*" in f"{a}{b}":
        return None
    return add_dims(a, b)


def dim_sub(a, b):
    if a is None or b is None:
        return None
    if isinstance(b, (int, np.integer)):
        return dim_add(a, -int(b))
    if a == b:
        return 0
    if isinstance(a, str) and "*" not in a + b:
        terms = a.split("+")
        for t in b.split("+"):
            if t not in terms:
                return None
            terms.remove(t)
        return add_dims(*[int(t) if t.lstrip("-").isdigit() else t for t in terms]) if terms else 0
    return None


def dim_minmax(fn):
    def op(a, b):
        if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
            return fn(int(a), int(b))
        return a if a == b and a is not None else None
    return op


def dim_equal(a, b):
    if a is None or b is None:
        return None
    if a == b:
        return True
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return False
    n = b if isinstance(a, str) else a
    return False if isinstance(n, (int, np.integer)) and n < 0 else None   # a symbol is a size, never < 0


DIM_OPS = {"Add": dim_add, "Sub": dim_sub, "Mul": dim_mul, "Div": dim_div,
           "Max": dim_minmax(max), "Min": dim_minmax(min), "Equal": dim_equal}


def all_ints(a) -> bool:
    return a is not None and all(isinstance(d, (int, np.integer)) for d in np.asarray(a, dtype=object).flat)


def dims_product(dims):
    out = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


# -- the importer ---------------------------------------------------------------------------

class _Importer:
    def __init__(self, model, path: Path):
        self.model, self.path = model, path
        self.folder = path.resolve().parent
        self.g = Graph(model.graph.name or path.stem)
        self.env: dict[str, Value] = {}
        self.known: dict[int, np.ndarray] = {}   # id(Value) -> its value as an object array of dims
        self._mmaps: dict[Path, mmap.mmap] = {}
        self.opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)

    def fail(self, msg: str):
        raise ModelFormatError(f"{self.path}: {msg}")

    def run(self) -> Graph:
        from isthmus.compiler.frontends.onnx_ops import HANDLERS

        gp = self.model.graph
        self._check(gp, HANDLERS)
        inits = {t.name for t in gp.initializer}
        for vi in gp.input:
            if vi.name not in inits:
                self.env[vi.name] = self.g.add_input(vi.name, *self._input_type(vi))
        for t in gp.initializer:
            self.env[t.name] = self.g.add_constant(t.name, self.tensor(t))
        for i, node in enumerate(gp.node):
            self._convert(node, node.name or f"{node.op_type}#{i}", HANDLERS)
        outputs = []
        for vi in gp.output:
            if vi.name not in self.env:
                self.fail(f"graph output {vi.name!r} is never computed")
            if not isinstance(self.env[vi.name], Value):
                what = "a tensor sequence" if isinstance(self.env[vi.name], list) else "a reshape merging dynamic dims"
                raise UnsupportedError(f"{self.path.name}: graph output {vi.name!r} is {what}")
            outputs.append(self._named(self.env[vi.name], vi.name))
        self.g.set_outputs(outputs)
        self.g.decoder = decoder_by_names(self.g)
        self.g.rebuild_names()
        return self.g

    def _convert(self, node, where: str, handlers):
        from isthmus.compiler.frontends.onnx_ops import MergedView, NodeContext

        try:
            ctx = NodeContext(self, node, where)
            if node.op_type != "SequenceAt" and any(isinstance(v, list) for v in ctx.ins):
                ctx.unsupported("a tensor sequence as input (only SequenceAt reads one)")
            if node.op_type not in ("Transpose", "Reshape", "Gather") and any(isinstance(v, MergedView) for v in ctx.ins):
                merged = next(v for v in ctx.ins if isinstance(v, MergedView))
                ctx.unsupported(f"an input of shape {list(merged.shape)} (a reshape merging the leading dims "
                                f"{list(merged.value.shape[:merged.k])}, which isthmus keeps apart)")
            outs = handlers[(node.domain or "", node.op_type)](ctx)
        except IRError as e:
            raise ModelFormatError(f"{self.path}: node {where} ({node.op_type}): {e}") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            # a required attribute missing, an attribute of the wrong kind, an input left out...
            raise ModelFormatError(f"{self.path}: node {where} ({node.op_type}) is malformed ({_short(e)})") from None
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        for name, v in zip(node.output, outs):
            if name:
                self.env[name] = v

    def _check(self, gp, handlers):
        """Malformed structure -> ModelFormatError; every unsupported op at once -> UnsupportedError."""
        defined = {vi.name for vi in gp.input} | {t.name for t in gp.initializer}
        missing: dict[str, list[str]] = {}
        for i, node in enumerate(gp.node):
            where = node.name or f"{node.op_type}#{i}"
            for name in node.input:
                if name and name not in defined:
                    self.fail(f"node {where} ({node.op_type}) uses {name!r} before it is defined")
            defined.update(o for o in node.output if o)
            key = (node.domain or "", node.op_type)
            if key not in handlers:
                op = node.op_type if key[0] in ("", "ai.onnx") else f"{key[0]}.{node.op_type}"
                missing.setdefault(op, []).append(where)
        if gp.sparse_initializer:
            missing.setdefault("sparse initializer", []).extend(t.values.name for t in gp.sparse_initializer)
        if missing:
            listed = "; ".join(f"{op} (node{'s' if len(ns) > 1 else ''} {', '.join(ns)})"
                               for op, ns in missing.items())
            raise UnsupportedError(f"{self.path.name}: unsupported ONNX op{'s' if len(missing) > 1 else ''}: "
                                   f"{listed}")

    def _input_type(self, vi):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type not in DTYPES:
            raise UnsupportedError(f"{self.path.name}: graph input {vi.name!r} has an unsupported type")
        if not tt.HasField("shape"):
            raise UnsupportedError(f"{self.path.name}: graph input {vi.name!r} has no rank")
        dims = []
        for i, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                # Optimum names a dim "past_sequence_length + sequence_length": the IR spells sums without spaces
                dims.append("".join(d.dim_param.split()) or f"{vi.name}_dim{i}")
        return dims, DTYPES[tt.elem_type]

    def tensor(self, t) -> np.ndarray:
        """An initializer or Constant tensor as a read-only array; external data memory-mapped."""
        import onnx

        if t.data_type not in DTYPES:
            name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() \
                else str(t.data_type)
            raise UnsupportedError(f"{self.path.name}: tensor {t.name!r} has element type {name}, "
                                   f"which isthmus does not support")
        dtype = numpy_dtype(DTYPES[t.data_type]).newbyteorder("<")
        shape = tuple(int(d) for d in t.dims)
        if any(d < 0 for d in shape):
            self.fail(f"tensor {t.name!r} has a negative dim {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if t.data_location == onnx.TensorProto.EXTERNAL:
            buf = self._external(t, nbytes)
        elif t.HasField("raw_data"):
            buf = t.raw_data
            if len(buf) != nbytes:
                self.fail(f"tensor {t.name!r} holds {len(buf)} bytes, its shape {shape} needs {nbytes}")
        else:
            try:
                arr = onnx.numpy_helper.to_array(t)
            except Exception as e:
                self.fail(f"tensor {t.name!r} is malformed ({_short(e)})")
            if arr.shape != shape:
                self.fail(f"tensor {t.name!r} holds {arr.size} values, its shape is {shape}")
            return arr
        return np.frombuffer(buf, dtype=dtype, count=math.prod(shape)).reshape(shape)

    def _external(self, t, nbytes: int):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not isinstance(loc, str):
            self.fail(f"tensor {t.name!r}: bad external data location")
        file = (self.folder / loc).resolve()
        if not loc or self.folder not in file.parents:
            self.fail(f"tensor {t.name!r}: external data location {loc!r} is outside the model's folder")
        if not file.is_file():
            self.fail(f"tensor {t.name!r}: external data file {loc!r} is missing")
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", nbytes))
        except ValueError:
            self.fail(f"tensor {t.name!r}: bad external data offset or length")
        if length != nbytes or offset < 0 or offset + nbytes > file.stat().st_size:
            self.fail(f"tensor {t.name!r}: external data {loc!r} is truncated or does not match the shape")
        if nbytes == 0:
            return b""
        if file not in self._mmaps:
            with open(file, "rb") as f:
                self._mmaps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self._mmaps[file])[offset:offset + nbytes]

    def _named(self, v: Value, name: str) -> Value:
        """A graph output must carry its ONNX name; an aliased input or constant gets an identity node."""
        if v.name == name:
            return v
        out = self.g.add("reshape", [v], {"shape": [0] * v.type.rank}, name=name, source=name)
        if out.name != name:
            self.fail(f"graph output name {name!r} is taken")
        return out

    # -- values of small integer tensors --------------------------------------------------------

    def value_of(self, v: Value | None):
        """The value of `v` as an object array of dims (ints, symbols, None), if known."""
        if v is None:
            return None
        if id(v) in self.known:
            return self.known[id(v)]
        if v.is_constant and isinstance(v.data, np.ndarray) and v.dtype in ("i64", "i32", "bool") \
                and v.data.size <= KNOWN_LIMIT:
            return np.asarray(v.data).astype(object)
        return None

    def add(self, op: str, inputs: list[Value], attrs: dict, *, name: str, source: str, known=None):
        """Append a node, or a constant when its result is known: from `known(*values)` (dims) or,
        when every input is a constant and the result is small, from the op's reference."""
        opdef = get_op(op)
        attrs = opdef.complete_attrs(attrs, where=source)
        types = opdef.infer([v.type for v in inputs], attrs, where=source)
        if known is not None and len(types) == 1 and types[0].dtype in ("i64", "i32", "bool"):
            vals = [self.value_of(v) for v in inputs]
            result = None
            if all(x is not None for x in vals):
                try:
                    result = known(*vals)
                except (ValueError, TypeError, IndexError):
                    result = None
            if result is not None:
                result = np.asarray(result, dtype=object)
                if all_ints(result) and types[0].is_static and result.shape == types[0].shape:
                    return self.g.add_constant(name, result.astype(numpy_dtype(types[0].dtype)))
                if types[0].rank <= 1 and result.size <= KNOWN_LIMIT:
                    out = self.g.add(op, inputs, attrs, name=name, source=source)
                    self.known[id(out)] = result
                    return out
        if inputs and all(v.is_constant and isinstance(v.data, np.ndarray) for v in inputs) \
                and all(t.is_static and math.prod(t.shape) <= FOLD_LIMIT for t in types):
            try:
                result = opdef.reference(*(v.data for v in inputs), **attrs)
            except Exception:   # e.g. an index out of range: leave it to run time to report
                result = None
            if result is not None:
                results = [np.asarray(r) for r in (result if len(types) > 1 else (result,))]
                if all(r.shape == t.shape and r.dtype == numpy_dtype(t.dtype) for r, t in zip(results, types)):
                    outs = [self.g.add_constant(name if len(types) == 1 else f"{name}.{i}", r)
                            for i, r in enumerate(results)]
                    return outs[0] if len(outs) == 1 else outs
        return self.g.add(op, inputs, attrs, name=name, source=source)
