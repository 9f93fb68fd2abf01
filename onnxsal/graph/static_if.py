"""If nodes whose condition the shapes alone decide, replaced by the branch they always take.

torch.onnx's TorchScript exporter writes ``x.squeeze(1)`` of a size it cannot see as
``If(Shape(x)[1] == 1, Squeeze(x), Identity(x))`` (``nn.LocalResponseNorm`` and ``F.pad`` of an
unsqueezed tensor do this). The branches read ``x`` without listing it as an input, and no rule can
differentiate an If; but a condition computed from shapes only is fixed once the model's sizes are,
so the If is that branch's nodes. The condition is read off two runs of a stand-in input (batch 1
and 2, ``probe.steady_values``), and only where it depends on the input through ``Shape`` or
``Size`` alone, never on its values.
"""

from __future__ import annotations

import copy

import onnx
from onnx import helper

from .probe import steady_values

SHAPE_READERS = ("Shape", "Size")


def _shape_only(producer: dict, inputs: set, name: str) -> bool:
    """Whether `name` depends on the graph's `inputs` through Shape/Size nodes only (constants and
    initializers are fine): its value then follows from the sizes, not from any pixel."""
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in inputs:
            return False
        node = producer.get(t)
        if node is None or node.op_type in SHAPE_READERS:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        stack.extend(node.input)
    return True


def _holds_control_flow(node: onnx.NodeProto) -> bool:
    """Whether a branch of `node` holds a node with bodies of its own (left as it is)."""
    bodies = [b for a in node.attribute for b in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))]
    return any(x.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for b in bodies for m in b.node for x in m.attribute)


def _inline(node: onnx.NodeProto, body: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The branch's nodes with its own tensors renamed under the If's name, then Identity nodes
    from its outputs to the If's; its initializers become Constant nodes."""
    prefix = f"{node.name or node.output[0]}/inlined/"
    local = {t.name for t in body.initializer} | {o for n in body.node for o in n.output if o}
    rename = {t: prefix + t for t in local}
    out = [helper.make_node("Constant", [], [rename[t.name]], value=t) for t in body.initializer]
    for n in body.node:
        m = copy.deepcopy(n)
        m.input[:] = [rename.get(i, i) for i in m.input]
        m.output[:] = [rename.get(o, o) for o in m.output]
        m.name = prefix + (n.name or n.output[0])
        out.append(m)
    for src, dst in zip(body.output, node.output):
        out.append(helper.make_node("Identity", [rename.get(src.name, src.name)], [dst], name=prefix + dst))
    return out


def inline_static_ifs(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every top-level If whose condition the shapes decide replaced by its branch
    (a copy; the model itself where there is none). Branches that hold control flow of their own
    are left, as are conditions the stand-in runs do not fix."""
    graph = model.graph
    ifs = [n for n in graph.node if n.op_type == "If" and n.domain in ("", "ai.onnx") and not _holds_control_flow(n)]
    if ifs:
        producer = {o: n for n in graph.node for o in n.output}
        inputs = {i.name for i in graph.input} - {t.name for t in graph.initializer}
        ifs = [n for n in ifs if _shape_only(producer, inputs, n.input[0])]
    if not ifs:
        return model
    values = steady_values(model, [n.input[0] for n in ifs])
    chosen = {id(n): values[n.input[0]] for n in ifs if n.input[0] in values and values[n.input[0]].size == 1}
    if not chosen:
        return model
    out = copy.deepcopy(model)
    nodes = []
    for original, node in zip(graph.node, out.graph.node):
        if id(original) not in chosen:
            nodes.append(node)
            continue
        branch = "then_branch" if bool(chosen[id(original)].reshape(())) else "else_branch"
        body = next(a.g for a in node.attribute if a.name == branch)
        nodes.extend(_inline(node, body))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
