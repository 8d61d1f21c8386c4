"""Recognise a Llama-family decoder graph (the structure `frontends/llama.py` builds, as GGUF and
safetensors checkpoints import) so the NPU lowering can compile it as one resident program with a
KV cache in HBM. Anything that deviates returns None and takes the per-op path.

The matcher follows values, not names: embedding -> per layer [rmsnorm -> q/k/v linears ->
reshape/transpose -> rope(q), rope(k) -> concat with past_key/past_value -> attention ->
transpose/reshape -> o linear -> residual add -> rmsnorm -> gate/up linears -> swiglu -> down
linear -> residual add] -> rmsnorm -> logits linear. It records each layer's weights and the
names of the nodes they came from (instruction labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.compiler.ir import Graph, Node, Value


@dataclass
class LayerSpec:
    index: int
    attn_norm: Node
    q: Node
    k: Node
    v: Node
    q_rope: Node
    k_rope: Node
    k_cat: Node
    v_cat: Node
    attn: Node
    o: Node
    attn_res: Node
    ffn_norm: Node
    gate: Node
    up: Node
    swiglu: Node
    down: Node
    ffn_res: Node


@dataclass
class LlamaSpec:
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rope_layout: str
    embed: Node
    layers: list[LayerSpec] = field(default_factory=list)
    final_norm: Node | None = None
    head: Node | None = None
    logits: Value | None = None
    scale: float = 0.0


def _only_user(users, v: Value, op: str) -> Node | None:
    us = users.get(v, [])
    return us[0] if len(us) == 1 and us[0].op == op else None


def _users_of(users, v: Value, op: str) -> list[Node]:
    return [n for n in users.get(v, []) if n.op == op]


def _static(*vals: Value) -> bool:
    return all(isinstance(d, int) for v in vals for d in v.shape)


def _heads_chain(users, lin: Node, n: int, hd: int) -> Value | None:
    """linear -> reshape [0, 0, n, hd] -> transpose [0, 2, 1, 3]: the [b, n, s, hd] value."""
    r = _only_user(users, lin.outputs[0], "reshape")
    if r is None or list(r.attrs["shape"]) != [0, 0, n, hd]:
        return None
    t = _only_user(users, r.outputs[0], "transpose")
    if t is None or list(t.attrs["perm"]) != [0, 2, 1, 3]:
        return None
    return t.outputs[0]


def _linear_weight(n: Node, out: int, inp: int) -> bool:
    return (n.op == "linear" and len(n.inputs) == 2 and n.inputs[1].is_constant
            and tuple(n.inputs[1].shape) == (out, inp))


def match_llama(graph: Graph) -> LlamaSpec | None:
    try:
        return _match(graph)
    except (KeyError, IndexError, AttributeError, TypeError, ValueError):
        return None


def _match(graph: Graph) -> LlamaSpec | None:
    if graph.decoder is None:
        return None
    d = graph.decoder.resolve(graph)
    users = graph.users()
    ids, pos = d.input_ids, d.position_ids
    if pos is None:
        return None
    embeds = _users_of(users, ids, "embedding")
    if len(embeds) != 1 or not embeds[0].inputs[0].is_constant:
        return None
    emb = embeds[0]
    vocab, hidden = emb.inputs[0].shape
    x = emb.outputs[0]
    layers: list[LayerSpec] = []
    spec = None
    while True:
        norms = _users_of(users, x, "rmsnorm")
        if len(norms) != 1 or not norms[0].inputs[1].is_constant:
            return None
        norm = norms[0]
        h = norm.outputs[0]
        lins = _users_of(users, h, "linear")
        if len(lins) == 1 and len(users.get(h, [])) == 1:             # the final norm and the logits head
            head = lins[0]
            if not _linear_weight(head, vocab, hidden) or head.outputs[0] is not d.logits:
                return None
            spec.final_norm, spec.head, spec.logits = norm, head, head.outputs[0]
            break
        if len(lins) != 3 or len(users[h]) != 3:
            return None
        # q, k, v in graph order; their output widths give the head counts
        q, k, v = sorted(lins, key=graph.nodes.index)
        q_rope_in = None
        for n in (q, k, v):
            if len(n.inputs) != 2 or not n.inputs[1].is_constant:
                return None
        t_q = _only_user(users, q.outputs[0], "reshape")
        hd = t_q.attrs["shape"][3]
        H, G = q.inputs[1].shape[0] // hd, k.inputs[1].shape[0] // hd
        if spec is None:
            spec = LlamaSpec(hidden, 0, H, G, hd, vocab, 0.0, "", emb)
        elif (spec.heads, spec.kv_heads, spec.head_dim) != (H, G, hd):
            return None
        if not (_linear_weight(q, H * hd, hidden) and _linear_weight(k, G * hd, hidden)
                and _linear_weight(v, G * hd, hidden)):
            return None
        qh, kh, vh = _heads_chain(users, q, H, hd), _heads_chain(users, k, G, hd), _heads_chain(users, v, G, hd)
        if qh is None or kh is None or vh is None:
            return None
        q_rope_in = qh
        q_rope, k_rope = _only_user(users, q_rope_in, "rope"), _only_user(users, kh, "rope")
        if q_rope is None or k_rope is None or q_rope.inputs[1] is not pos or k_rope.inputs[1] is not pos:
            return None
        if q_rope.attrs != k_rope.attrs or q_rope.attrs["dim"] not in (0, hd) or q_rope.attrs["factors"]:
            return None
        spec.rope_theta, spec.rope_layout = float(q_rope.attrs["theta"]), q_rope.attrs["layout"]
        k_cat, v_cat = _only_user(users, k_rope.outputs[0], "concat"), _only_user(users, vh, "concat")
        if k_cat is None or v_cat is None or k_cat.attrs["axis"] != 2 or v_cat.attrs["axis"] != 2:
            return None
        if k_cat.inputs[1] is not k_rope.outputs[0] or v_cat.inputs[1] is not vh:
            return None
        attns = [n for n in users.get(q_rope.outputs[0], []) if n.op == "attention"]
        if len(attns) != 1:
            return None
        attn = attns[0]
        if attn.inputs[1:] != [k_cat.outputs[0], v_cat.outputs[0]] or not attn.attrs["causal"] or len(attn.inputs) != 3 \
                or attn.attrs["softcap"] or attn.attrs["window"]:
            return None
        spec.scale = float(attn.attrs["scale"]) or 1.0 / float(hd) ** 0.5
        t = _only_user(users, attn.outputs[0], "transpose")
        if t is None or list(t.attrs["perm"]) != [0, 2, 1, 3]:
            return None
        r = _only_user(users, t.outputs[0], "reshape")
        if r is None or list(r.attrs["shape"]) != [0, 0, H * hd]:
            return None
        o = _only_user(users, r.outputs[0], "linear")
        if o is None or not _linear_weight(o, hidden, H * hd):
            return None
        res = _only_user(users, o.outputs[0], "add")
        if res is None or set(res.inputs) != {x, o.outputs[0]}:
            return None
        x1 = res.outputs[0]
        norms2 = _users_of(users, x1, "rmsnorm")
        if len(norms2) != 1 or len(users[x1]) != 2:
            return None
        n2 = norms2[0]
        lins2 = _users_of(users, n2.outputs[0], "linear")
        if len(lins2) != 2:
            return None
        sw = _only_user(users, lins2[0].outputs[0], "swiglu")
        if sw is None or _only_user(users, lins2[1].outputs[0], "swiglu") is not sw:
            return None
        gate = next(n for n in lins2 if n.outputs[0] is sw.inputs[0])
        up = next(n for n in lins2 if n.outputs[0] is sw.inputs[1])
        F = gate.inputs[1].shape[0]
        if spec.ffn and spec.ffn != F:
            return None
        spec.ffn = F
        if not (_linear_weight(gate, F, hidden) and _linear_weight(up, F, hidden)):
            return None
        down = _only_user(users, sw.outputs[0], "linear")
        if down is None or not _linear_weight(down, hidden, F):
            return None
        res2 = _only_user(users, down.outputs[0], "add")
        if res2 is None or set(res2.inputs) != {x1, down.outputs[0]}:
            return None
        layers.append(LayerSpec(len(layers), norm, q, k, v, q_rope, k_rope, k_cat, v_cat, attn, o, res, n2, gate,
                                up, sw, down, res2))
        x = res2.outputs[0]
    if spec is None or not layers:
        return None
    spec.layers = layers
    # layer i appends to the interface's cache pair i, and the graph returns nothing else
    caches = [(L.k_cat.inputs[0], L.v_cat.inputs[0], L.k_cat.outputs[0], L.v_cat.outputs[0]) for L in layers]
    if len(caches) != len(d.kv) or any(a is not b for c, k in zip(caches, d.kv) for a, b in zip(c, k)) \
            or len(graph.outputs) != 1 + 2 * len(layers):
        return None
    if not _static(*(n.inputs[1] for L in layers for n in (L.q, L.k, L.v, L.o, L.gate, L.up, L.down))):
        return None
    return spec
