"""Dead code elimination: drop nodes and constants nothing reaches from the outputs."""

from isthmus.compiler.ir import Graph


def dce(g: Graph) -> Graph:
    live = {id(v) for v in g.outputs}
    kept = []
    for node in reversed(g.nodes):
        if any(id(v) in live for v in node.outputs):
            kept.append(node)
            live.update(id(v) for v in node.inputs)
    g.nodes = kept[::-1]
    g.constants = [v for v in g.constants if id(v) in live]
    g.rebuild_names()
    return g
