"""Where a column of an output comes from: the node that computes it, through the ops that only move
values into place.

A detector's output is often assembled from several heads: a box from decoding arithmetic, then
confidences that a Sigmoid made and Split, Slice, Reshape, Transpose and Concat moved into their
columns. Reading which node made each column is how onnxsal tells such an output's layout from the
graph, with no framework to ask (see ``onnxsal.detection``).

The trace follows one column (an index on one axis) backwards: a Concat or Split on that axis shifts
it by the widths before it, a Slice by its start and step, a Transpose moves it to another axis, a
Reshape to the input axis of the same size with as many values after it, and a ScatterND that writes
into the tensor sends it to its ``data`` input unless its indices write that column (then the column
counts as computed by the ScatterND). Sizes that static inference leaves unknown, and the indices
of a ScatterND, are read off one run of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper

# ops that pass one tensor's values on unchanged and in order, only viewed in another shape
RESHAPES = frozenset({"Identity", "Dropout", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# ops that move values without computing new ones
MOVES = ("Identity", "Dropout", "Transpose", "Concat", "Split", "Slice", "Reshape", "Flatten", "Squeeze",
         "Unsqueeze", "ScatterND")

Source = tuple[str, str, int, int]     # (op type, its output tensor, the column there, that axis's width)


def _attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    if a is None:
        return default
    return list(a.ints) if a.type == onnx.AttributeProto.INTS else a.i


def _shape(shapes: dict, name: str) -> Optional[tuple]:
    return shapes.get(name, (0, None))[1]


def _int_constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Small integer constants (Slice bounds) by name."""
    ints = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
    out = {t.name: numpy_helper.to_array(t).reshape(-1) for t in proto.graph.initializer
           if t.data_type in ints and not t.external_data}
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value" and \
                n.attribute[0].t.data_type in ints:
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t).reshape(-1)
    return out


@dataclass
class ColumnTrace:
    producer: dict                  # tensor -> the node that makes it
    shapes: dict                    # tensor -> (elem type, shape), as tensor_shapes gives
    consts: dict                    # integer constants by name
    written: dict                   # a ScatterND's output -> its indices, read off one run

    @classmethod
    def around(cls, proto: onnx.ModelProto, output: str, shapes: dict) -> Optional["ColumnTrace"]:
        """A trace of ``output``'s columns, or None when no Sigmoid's values reach it by moves alone
        (so a classifier costs no run)."""
        producer = {o: n for n in proto.graph.node for o in n.output}
        cone, todo, sigmoid = set(), [output], False
        while todo:
            t = todo.pop()
            n = producer.get(t)
            if t in cone or n is None:
                continue
            cone.update(n.output if n.op_type == "Split" else [t])     # a Split's offsets: its other outputs
            sigmoid |= n.op_type == "Sigmoid"
            if n.op_type in MOVES:
                todo.extend(i for i in (n.input if n.op_type == "Concat" else n.input[:1]) if i)
        if not sigmoid:
            return None
        scatters = {n.output[0]: n.input[1] for n in proto.graph.node if n.op_type == "ScatterND" and n.output[0] in cone}
        unknown = [t for t in cone if _shape(shapes, t) is None or None in _shape(shapes, t)[1:]]
        written = {}
        if unknown or scatters:           # reshape targets computed at run time, ScatterND indices: one run tells
            from .probe import probe

            found, values = probe(proto, unknown, list(scatters.values()))
            shapes = {**shapes, **found}
            written = {t: values[i] for t, i in scatters.items() if i in values}
        return cls(producer, shapes, _int_constants(proto), written)

    def _width(self, t: str, axis: int, rank: int) -> Optional[int]:
        return (_shape(self.shapes, t) or (None,) * rank)[axis]

    def source(self, t: str, axis: int, col: int, depth: int = 0) -> Optional[Source]:
        """The node that computes column ``col`` of ``t`` on ``axis``; None where the trace loses it
        (a size, bound or index unknown, a graph input)."""
        n = self.producer.get(t)
        shape = _shape(self.shapes, t)
        if n is None or shape is None or depth > 64:
            return None
        rank = len(shape)
        axis %= max(rank, 1)
        op = n.op_type
        if op not in MOVES:
            return (op, t, col, shape[axis]) if shape[axis] is not None else None
        deeper = depth + 1
        if op in ("Identity", "Dropout"):
            return self.source(n.input[0], axis, col, deeper)
        if op == "Transpose":
            perm = _attr(n, "perm", list(range(rank))[::-1])
            return self.source(n.input[0], perm[axis], col, deeper)
        if op == "ScatterND":
            idx = self.written.get(t)
            if idx is None or shape[axis] is None:
                return None
            if idx.shape[-1] <= axis or col in {int(v) % shape[axis] for v in np.unique(idx[..., axis])}:
                return (op, t, col, shape[axis])           # written by the updates
            return self.source(n.input[0], axis, col, deeper)
        if op == "Concat":
            along = _attr(n, "axis", 0) % rank
            if along != axis:                              # the scales' rows: all computed alike
                found = [self.source(i, axis, col, deeper) for i in n.input]
                return found[0] if found and None not in found and len({f[0] for f in found}) == 1 else None
            for i in n.input:
                width = self._width(i, axis, rank)
                if width is None:
                    return None
                if col < width:
                    return self.source(i, axis, col, deeper)
                col -= width
            return None
        if op == "Split":
            if _attr(n, "axis", 0) % rank == axis:
                for o in n.output[:list(n.output).index(t)]:
                    width = self._width(o, axis, rank)
                    if width is None:
                        return None
                    col += width
            return self.source(n.input[0], axis, col, deeper)
        if op == "Slice":
            col = self._slice(n, axis, col, rank)
            return None if col is None else self.source(n.input[0], axis, col, deeper)
        # Reshape, Flatten, Squeeze, Unsqueeze: the input axis of that size with as many values after it
        src = _shape(self.shapes, n.input[0])
        after = list(shape[axis + 1:])
        if src is None or shape[axis] is None or None in after:
            return None
        for j, d in enumerate(src):
            rest = list(src[j + 1:])
            if d == shape[axis] and None not in rest and int(np.prod(rest)) == int(np.prod(after)):
                return self.source(n.input[0], j, col, deeper)
        return None

    def _slice(self, n: onnx.NodeProto, axis: int, col: int, rank: int) -> Optional[int]:
        """The input column a Slice's output column ``col`` on ``axis`` reads."""
        size = self._width(n.input[0], axis, rank)
        if size is None:
            return None
        if len(n.input) > 1:
            vals = [self.consts.get(i) if i else None for i in n.input[1:]] + [None] * 4
            starts, ends, axes, steps = vals[:4]
            given = [bool(i) for i in n.input[1:]] + [False] * 4
            if starts is None or ends is None or given[2] and axes is None or given[3] and steps is None:
                return None
        else:                                              # opset < 10: attributes
            starts, ends, axes, steps = _attr(n, "starts"), _attr(n, "ends"), _attr(n, "axes"), None
        axes = [int(a) % rank for a in (range(len(starts)) if axes is None else axes)]
        if axis not in axes:
            return col
        k = axes.index(axis)
        start, step = int(starts[k]), 1 if steps is None else int(steps[k])
        if step <= 0:
            return None
        start = min(max(start + size if start < 0 else start, 0), size)
        return start + col * step
