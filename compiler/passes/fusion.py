"""Fusion: partition a graph's nodes into the groups a kernel target runs as one kernel call.

The last pass of the kernel targets' pipelines (numba, triton; see passes/pipeline.py). It is an
analysis: the nodes are left as they are, so the IR stays that of the op table and the reference
interpreter can still run it, and the groups are recorded on the graph (`graph.fusion`), where
the text form prints them (`isthmus compile --dump-ir`, `ISTHMUS_DUMP=dir`) and both lowerings
read them through one plan (compiler/lower/plan.py).

Groups, in graph order, covering every node exactly once:

  linear      rmsnorm prologue (when its output feeds only this group's linears)
              -> one or more sibling linears reading the same input (Q/K/V, gate/up), stacked
                 into one weight by the backend when `stacked` (compiler/quant.py:packable_together),
                 with their constant biases if any (`biases`)
              -> epilogue: "add" (a residual added to a single linear's output), "swiglu"
                 (silu(first) * second, two siblings), or "qkv" (below), or none
  qkv         the epilogue of a 3-sibling linear whose outputs are split into heads
              (reshape [0, 0, n, hd] [-> rmsnorm per Q and K head: `head_norms`] -> transpose
              [0, 2, 1, 3]), Q and K rotated by one rope (or neither: `rope` None),
              K and V appended to the KV cache (concat(past, new, axis=2), past a cache input of
              the graph's DecoderInterface): the group outputs
              the rotated Q and the two present caches, which a backend keeps in place
  attention   attention (no mask input) -> transpose [0, 2, 1, 3] -> reshape [0, 0, heads * hd]:
              the kernel writes the token-major layout the next linear reads
  embedding   embedding of a constant table
  op          any other node, alone

`Group.attrs` carries what the kernel needs (eps, epilogue, heads, rope attributes); values are
the graph's own `Value`s, so a lowering maps them to buffers by identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from isthmus.compiler.ir import Graph, Node, Value
from isthmus.compiler.quant import packable_together


@dataclass(eq=False)
class Group:
    kind: str
    nodes: list[Node]
    inputs: list[Value]            # values read from outside the group (constants included)
    outputs: list[Value]           # values defined here and read outside (or graph outputs)
    attrs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.nodes[-1].outputs[0].name

    def __repr__(self) -> str:
        return f"Group({self.kind}: {', '.join(n.op for n in self.nodes)} -> {', '.join(v.name for v in self.outputs)})"


def _single_user(v: Value, users, graph_outs) -> Node | None:
    us = users.get(v, [])
    return us[0] if len(us) == 1 and v not in graph_outs else None


def _heads_chain(y: Value, users, graph_outs, pasts):
    """y -> reshape [0, 0, n, hd] [-> rmsnorm over each head] -> transpose [0, 2, 1, 3] [-> rope]
    [-> concat(past, ., axis=2)], past one of the decoder interface's cache inputs."""
    r = _single_user(y, users, graph_outs)
    if r is None or r.op != "reshape" or list(r.attrs["shape"][:2]) != [0, 0] or len(r.attrs["shape"]) != 4:
        return None
    n, hd = r.attrs["shape"][2:]
    if not (isinstance(n, int) and isinstance(hd, int) and n > 0 and hd > 0):
        return None
    t = _single_user(r.outputs[0], users, graph_outs)
    norm = None
    if (t is not None and t.op == "rmsnorm" and t.inputs[0] is r.outputs[0] and t.inputs[1].is_constant
            and tuple(t.inputs[1].shape) == (hd,)):        # Qwen3's and Gemma 3's per-head Q/K norm
        norm, t = t, _single_user(t.outputs[0], users, graph_outs)
    if t is None or t.op != "transpose" or list(t.attrs["perm"] or []) != [0, 2, 1, 3]:
        return None
    chain = {"nodes": [r, t] if norm is None else [r, norm, t], "heads": n, "hd": hd, "norm": norm, "rope": None,
             "concat": None, "out": t.outputs[0]}
    nxt = _single_user(t.outputs[0], users, graph_outs)
    if nxt is not None and nxt.op == "rope" and nxt.inputs[0] is t.outputs[0]:
        chain["rope"] = nxt
        chain["nodes"].append(nxt)
        chain["out"] = nxt.outputs[0]
        nxt = _single_user(nxt.outputs[0], users, graph_outs)
    # the KV append: concat(past, new) along the sequence axis
    cat_users = users.get(chain["out"], [])
    if (len(cat_users) == 1 and cat_users[0].op == "concat" and cat_users[0].attrs["axis"] in (2, -2)
            and len(cat_users[0].inputs) == 2 and cat_users[0].inputs[1] is chain["out"]
            and chain["out"] not in graph_outs and cat_users[0].inputs[0] in pasts):
        chain["concat"] = cat_users[0]
        chain["nodes"].append(cat_users[0])
        chain["out"] = cat_users[0].outputs[0]
    return chain


def _match_qkv(lins, users, graph_outs, pasts):
    if len(lins) != 3:
        return None
    chains = [_heads_chain(n.outputs[0], users, graph_outs, pasts) for n in lins]
    if any(c is None for c in chains):
        return None
    q, k, v = chains
    if not (q["concat"] is None and k["concat"] is not None and v["concat"] is not None
            and v["rope"] is None and q["hd"] == k["hd"] == v["hd"] and k["heads"] == v["heads"]
            and q["heads"] % k["heads"] == 0):
        return None
    rq, rk = q["rope"], k["rope"]
    if rq is None and rk is not None:
        return None
    nq, nk = q["norm"], k["norm"]
    if v["norm"] is not None or (nq is None) != (nk is None) or (nq is not None and nq.attrs != nk.attrs):
        return None
    if rk is not None and (rk.attrs != rq.attrs or rk.inputs[1] is not rq.inputs[1]):
        return None
    return {"q_heads": q["heads"], "kv_heads": k["heads"], "head_dim": q["hd"],
            "rope": dict(rq.attrs) if rq is not None else None,       # None: no rotary (GPT-2)
            "rope_k": rk is not None, "positions": rq.inputs[1] if rq is not None else None,
            "head_norms": None if nq is None else (nq.inputs[1], nk.inputs[1], float(nq.attrs["eps"])),
            "past": (k["concat"].inputs[0], v["concat"].inputs[0]),
            "nodes": q["nodes"] + k["nodes"] + v["nodes"], "outs": [q["out"], k["out"], v["out"]]}


def _linear_ok(n: Node) -> bool:
    """A linear with a constant 2-D weight and, if any, a constant bias (Qwen2's Q/K/V, GPT-2's)."""
    w = n.inputs[1] if len(n.inputs) >= 2 else None
    return (n.op == "linear" and len(n.inputs) in (2, 3) and w.is_constant and len(w.shape) == 2
            and (len(n.inputs) == 2 or (n.inputs[2].is_constant and tuple(n.inputs[2].shape) == (w.shape[0],)
                                        and n.inputs[2].dtype in ("f32", "f16"))))


def fusion(graph: Graph) -> Graph:
    """The pipeline pass: record the groups on the graph (graph.fusion); nodes unchanged."""
    graph.fusion = fuse(graph)
    return graph


def groups_of(graph: Graph) -> list[Group]:
    """The groups the fusion pass recorded on this graph, or fused now (a graph lowered directly)."""
    return graph.fusion if graph.fusion is not None else fuse(graph)


def fuse(graph: Graph) -> list[Group]:
    users = graph.users()
    graph_outs = set(graph.outputs)
    pasts = set(graph.decoder.resolve(graph).pasts) if graph.decoder is not None else set()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    taken: set[int] = set()
    groups: list[tuple[int, Group]] = []

    def claim(kind, nodes, outputs, attrs):
        for n in nodes:
            taken.add(id(n))
        nodes = sorted(nodes, key=lambda n: order[id(n)])
        inside = {v for n in nodes for v in n.outputs}
        seen, ins = set(), []
        for n in nodes:
            for v in n.inputs:
                if v not in inside and v not in seen:
                    seen.add(v)
                    ins.append(v)
        groups.append((order[id(nodes[-1])], Group(kind, nodes, ins, outputs, attrs)))

    # linear groups, keyed by the shared input
    for node in graph.nodes:
        if id(node) in taken or not _linear_ok(node):
            continue
        x = node.inputs[0]
        lins = [u for u in users.get(x, []) if _linear_ok(u) and id(u) not in taken
                and u.inputs[1].shape[1] == node.inputs[1].shape[1]]
        if node not in lins:
            lins = [node]
        biases = [n.inputs[2] if len(n.inputs) == 3 else None for n in lins]
        attrs = {"linears": lins, "weights": [n.inputs[1] for n in lins], "epilogue": None, "norm": None,
                 "biases": biases if any(b is not None for b in biases) else None,
                 # one weight stacked by rows, or (mixed block formats: a Q4_K_M file's q4_k Q/K beside
                 # a q6_k V) one matmul per sibling into its columns of the group's output
                 "stacked": packable_together([n.inputs[1].data for n in lins])}
        nodes = list(lins)
        outputs = [n.outputs[0] for n in lins]
        qkv = _match_qkv(lins, users, graph_outs, pasts)
        if qkv is not None:
            attrs["epilogue"] = "qkv"
            attrs["qkv"] = qkv
            nodes += qkv["nodes"]
            outputs = qkv["outs"]
        elif len(lins) == 2 and attrs["biases"] is None:    # swiglu runs inside the matmul: before a bias
            sw = [u for u in users.get(lins[0].outputs[0], []) if u.op == "swiglu"]
            if (sw and sw[0].inputs[0] is lins[0].outputs[0] and sw[0].inputs[1] is lins[1].outputs[0]
                    and all(_single_user(n.outputs[0], users, graph_outs) is sw[0] for n in lins)
                    and sw[0].outputs[0].shape == lins[0].outputs[0].shape):
                attrs["epilogue"] = "swiglu"
                nodes.append(sw[0])
                outputs = [sw[0].outputs[0]]
        elif len(lins) == 1:
            y = lins[0].outputs[0]
            add = _single_user(y, users, graph_outs)
            if add is not None and add.op == "add" and add.outputs[0].shape == y.shape:
                other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
                if other is not y and other.shape == y.shape and other.dtype == "f32":
                    attrs["epilogue"] = "add"
                    attrs["residual"] = other
                    nodes.append(add)
                    outputs = [add.outputs[0]]
        # rmsnorm prologue: its output feeds only these linears
        p = x.producer
        if (p is not None and p.op == "rmsnorm" and id(p) not in taken and x not in graph_outs
                and {id(u) for u in users.get(x, [])} <= {id(n) for n in lins}
                and p.inputs[1].is_constant):
            attrs["norm"] = p
            nodes.insert(0, p)
        claim("linear", nodes, outputs, attrs)

    for node in graph.nodes:
        if id(node) in taken:
            continue
        if node.op == "attention" and len(node.inputs) == 3:
            t = _single_user(node.outputs[0], users, graph_outs)
            r = _single_user(t.outputs[0], users, graph_outs) if t is not None and t.op == "transpose" else None
            hq, hd = node.inputs[0].shape[1], node.inputs[0].shape[3]
            if (r is not None and r.op == "reshape" and list(t.attrs["perm"] or []) == [0, 2, 1, 3]
                    and isinstance(hq, int) and isinstance(hd, int) and list(r.attrs["shape"]) == [0, 0, hq * hd]):
                claim("attention", [node, t, r], [r.outputs[0]], {"node": node})
                continue
        if node.op == "embedding" and node.inputs[0].is_constant:
            claim("embedding", [node], [node.outputs[0]], {"node": node})
            continue
        claim("op", [node], list(node.outputs), {"node": node})

    return _topological([g for _, g in sorted(groups, key=lambda g: g[0])])


def _topological(groups: list[Group]) -> list[Group]:
    """Groups in an order where each runs after the producers of its inputs (stable otherwise)."""
    made = {v: g for g in groups for n in g.nodes for v in n.outputs}
    done: set[int] = set()
    out: list[Group] = []
    pending = list(groups)
    while pending:
        for i, g in enumerate(pending):
            if all(id(made[v]) in done for v in g.inputs if v in made and made[v] is not g):
                out.append(g)
                done.add(id(g))
                del pending[i]
                break
        else:
            raise RuntimeError("fusion made a cycle between groups")
    return out


def format_groups(groups: list[Group]) -> str:
    """One line per group: index, kind (epilogue, norm prologue), its ops and the values it defines."""
    lines = []
    for i, g in enumerate(groups):
        extra = f" epilogue={g.attrs['epilogue']}" if g.kind == "linear" and g.attrs.get("epilogue") else ""
        extra += " norm" if g.kind == "linear" and g.attrs.get("norm") is not None else ""
        extra += " bias" if g.kind == "linear" and g.attrs.get("biases") else ""
        extra += " unstacked" if g.kind == "linear" and not g.attrs.get("stacked", True) else ""
        lines.append(f"group {i} {g.kind}{extra}: {' '.join(n.op for n in g.nodes)} -> "
                     f"{', '.join('%' + v.name for v in g.outputs)}")
    return "\n".join(lines) + "\n"
