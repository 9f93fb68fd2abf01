"""Activations written out by hand, replaced by the one op they compute.

``1 / (1 + exp(-z))`` and ``exp(z) / exp(z).sum(1, keepdim=True)`` in a model's own code export
as four or five elementwise nodes, not as a ``Sigmoid`` or a ``Softmax``. Everything that reads a
model's head looks for the op: the logits before the final activation, a per-pixel map's
threshold (a sigmoid map's pixels are those above 0.5), a detector's scores. Rather than teach
each reader every spelling, each spelling is replaced once, at load, by the op; the rest of the
graph and every tensor name stay as they were.

The op is also the better derivative: the written sigmoid's backward multiplies 0 by
``exp(-z)``, which overflows to infinity below z = -88 in float32, so its gradient there is NaN.

Only the class axis is read as a softmax (axis 1, or -1 for classes last), as a single axis: a
map normalised over its pixels (a soft-argmax keypoint head) is no class activation and stays
as written.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from .simplify import constants
from .surgery import constant_ints, node_attrs


def written_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with each hand-written sigmoid and class softmax replaced by its op, and one
    note per replacement, naming the node; ``model`` itself when it has none."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    held = constants(g)
    found = []
    for n in g.node:
        z = _sigmoid_input(n, producer, held)
        if z is not None:
            found.append((n, onnx.helper.make_node("Sigmoid", [z], [n.output[0]], name=n.name)))
            continue
        za = _softmax_input(n, producer, held)
        if za is not None:
            found.append((n, onnx.helper.make_node("Softmax", [za[0]], [n.output[0]], name=n.name, axis=za[1])))
    if not found:
        return model, []
    pieces = set()
    for old, new in found:
        pieces |= _pieces(old, new.input[0], producer)
    replaced = {id(old): new for old, new in found}
    nodes = [replaced.get(id(n), n) for n in g.node]
    outputs = {o.name for o in g.output}
    while True:              # drop the pieces nothing reads any more; a piece another node reads stays
        read = {i for n in nodes for i in n.input} | outputs
        keep = [n for n in nodes if id(n) not in pieces or any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            break
        nodes = keep
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    notes = [f"a {new.op_type} written out by hand at {old.name or old.output[0]}, read as one" for old, new in found]
    return out, notes


def _pieces(last: onnx.NodeProto, z: str, producer: dict) -> set:
    """The ids of the nodes between ``z`` and a written activation's ``last`` node."""
    found, todo = set(), [i for i in last.input if i != z]
    while todo:
        n = producer.get(todo.pop())
        if n is not None and n.op_type in _PIECES and id(n) not in found:
            found.add(id(n))
            todo += [i for i in n.input if i != z]
    return found


_PIECES = {"Neg", "Exp", "Add", "Sub", "ReduceSum", "ReduceMax"}


def _is_one(name: str, held: dict) -> bool:
    v = held.get(name)
    return v is not None and v.size == 1 and float(np.asarray(v).reshape(-1)[0]) == 1.0


def _made(name: str, op_type: str, producer: dict) -> Optional[onnx.NodeProto]:
    n = producer.get(name)
    return n if n is not None and n.op_type == op_type else None


def _one_plus(name: str, producer: dict, held: dict) -> Optional[str]:
    """t when ``name`` is 1 + t (either order)."""
    add = _made(name, "Add", producer)
    if add is None or len(add.input) != 2:
        return None
    a, b = add.input
    return b if _is_one(a, held) else a if _is_one(b, held) else None


def _sigmoid_input(n: onnx.NodeProto, producer: dict, held: dict) -> Optional[str]:
    """z when ``n`` ends 1 / (1 + exp(-z)) (a Reciprocal, or a Div of 1) or exp(z) / (1 + exp(z))."""
    if n.op_type == "Reciprocal":
        den = n.input[0]
    elif n.op_type == "Div" and len(n.input) == 2 and _is_one(n.input[0], held):
        den = n.input[1]
    elif n.op_type == "Div" and len(n.input) == 2:
        e = _made(n.input[0], "Exp", producer)
        return e.input[0] if e is not None and _one_plus(n.input[1], producer, held) == n.input[0] else None
    else:
        return None
    t = _one_plus(den, producer, held)
    e = _made(t, "Exp", producer) if t is not None else None
    neg = _made(e.input[0], "Neg", producer) if e is not None else None
    return neg.input[0] if neg is not None else None


def _softmax_input(n: onnx.NodeProto, producer: dict, held: dict) -> Optional[tuple[str, int]]:
    """(z, axis) when ``n`` ends exp(z) / sum(exp(z)) over one class axis, 1 or -1 (``z - max z``
    first, in the stable form, which is the same softmax)."""
    if n.op_type != "Div" or len(n.input) != 2:
        return None
    e, red = _made(n.input[0], "Exp", producer), _made(n.input[1], "ReduceSum", producer)
    if e is None or red is None or red.input[0] != n.input[0]:
        return None
    axes = constant_ints(red, 1, "axes", held)
    if not int(node_attrs(red).get("keepdims", 1)) or axes is None or len(axes) != 1 or axes[0] not in (1, -1):
        return None
    z = e.input[0]
    sub = _made(z, "Sub", producer)
    top = _made(sub.input[1], "ReduceMax", producer) if sub is not None else None
    if top is not None and top.input[0] == sub.input[0] and constant_ints(top, 1, "axes", held) == axes:
        z = sub.input[0]
    return z, axes[0]
