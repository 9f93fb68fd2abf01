"""QOperator-form quantised models, rewritten into QDQ form so that their gradients exist.

ONNX Runtime's quantiser writes a model in one of two forms. In QDQ form the float ops stay and
``QuantizeLinear`` / ``DequantizeLinear`` pairs sit around them; the straight-through rules in
``rules/quant.py`` differentiate that. In the older QOperator form every op computes on the
integers themselves (``QLinearConv``, ``QLinearMatMul``, and ``com.microsoft`` ``QGemm``,
``QLinearAdd``...), and no float tensor joins the input to the score. Each such op is the float op
between a dequantisation of its inputs and a quantisation of its output, up to the rounding of
its integer arithmetic; this module writes it that way, once, at load. ONNX Runtime fuses the
pairs back into its integer kernels when it runs the forward pass. Ops that only move or select
integers (``MaxPool``, ``Reshape``, ``Flatten``...) get the same treatment with their input's scale,
which leaves their values exact. The integer arithmetic of the original can round one step apart
from float arithmetic at a few positions; `tests/test_quantized.py` measures it.
"""

from __future__ import annotations

from typing import Optional

import onnx
from onnx import TensorProto, helper

from ..errors import ModelError
from .surgery import MS, ReadableNames, node_attrs, op_key
# Ops on quantised tensors that only move or select values: op(q) == Q(op(DQ(q))) exactly.
# Pad fills with its constant, moved to the float grid; Resize (nearest; a linear one rounds its
# interpolation once, as the integer kernel does) and Split's several outputs keep the input's grid.
MOVERS = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Identity",
          "DepthToSpace", "SpaceToDepth", "Gather", "Expand", "Tile", "Pad", "Split", "Resize",
          "ReduceMax", "ReduceMin"}


def qoperator_ops(model: onnx.ModelProto) -> list[str]:
    """The QOperator op types in the top-level graph that `to_qdq` rewrites, sorted."""
    return sorted({n.op_type for n in model.graph.node if op_key(n) in _REWRITES})


def moved_integers(model: onnx.ModelProto) -> bool:
    """Whether an op of `MOVERS` moves a quantiser's integers (a TFLite export's ``Squeeze`` between
    a QuantizeLinear and its DequantizeLinear): no float tensor then joins the two."""
    quantised = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for n in model.graph.node:
        if n.op_type in MOVERS and n.domain in ("", "ai.onnx") and n.input and n.input[0] in quantised:
            return True
    return False


def to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its QOperator ops in QDQ form, and the integers that plain ops move
    moved as floats on their grid; ``model`` itself if it has neither."""
    if not qoperator_ops(model) and not moved_integers(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    w = _Writer(g)
    for node in g.node:
        rewrite = _REWRITES.get(op_key(node))
        if rewrite is not None:
            rewrite(w, node)
        elif node.op_type in MOVERS and node.domain in ("", "ai.onnx") and node.input and node.input[0] in w.grid:
            _mover(w, node)
        else:
            if node.op_type == "QuantizeLinear" and len(node.input) > 1 and w.dims.get(node.input[1], ()) in ((), (1,)):
                w.grid[node.output[0]] = (node.input[1], node.input[2] if len(node.input) > 2 else "")
            w.nodes.append(node)
    del g.node[:]
    g.node.extend(w.nodes)
    kept = [vi for vi in g.value_info if vi.name not in w.retyped]
    del g.value_info[:]
    g.value_info.extend(kept)
    return out


class _Writer:
    """The rewritten node list, and the (scale, zero point) names of every quantised tensor."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.unique = ReadableNames(graph)
        self.nodes: list[onnx.NodeProto] = []
        self.grid: dict[str, tuple[str, str]] = {}
        self.dequantised: dict[tuple, str] = {}
        self.dims = {t.name: tuple(t.dims) for t in graph.initializer}
        self.retyped: set[str] = set()          # integer outputs now written as floats
        self._one = ""

    def one(self) -> str:
        """A float 1: the scale that dequantises integers to their own values."""
        if not self._one:
            self._one = self.add("Constant", [], hint="one", value=helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
        return self._one

    def add(self, op_type: str, inputs: list, outputs: Optional[list] = None, hint: str = "", **attrs) -> str:
        """One node; its output is ``outputs`` or a name made from ``hint``."""
        outs = outputs or [self.unique(hint or op_type)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.unique(f"{outs[0]}/{op_type}"), **attrs))
        return outs[0]

    def dq(self, q: str, scale: str, zero: str, axis: Optional[int] = None) -> str:
        """``q``'s float values (one DequantizeLinear per tensor and grid, shared by its consumers)."""
        key = (q, scale, zero, axis)
        if key not in self.dequantised:
            attrs = {} if axis is None else {"axis": axis}
            self.dequantised[key] = self.add("DequantizeLinear", [q, scale] + ([zero] if zero else []),
                                             hint=q + "_dequantized", **attrs)
        return self.dequantised[key]

    def float_name(self, q: str) -> str:
        """The float result that ``q`` quantises: ``conv_output_0`` for ``conv_output_0_quantized``."""
        return self.unique(q[:-len("_quantized")] if q.endswith("_quantized") else q + "_float")

    def q(self, x: str, scale: str, zero: str, out: str) -> None:
        self.add("QuantizeLinear", [x, scale] + ([zero] if zero else []), [out])
        self.grid[out] = (scale, zero)

    def bias(self, b: str, scale_a: str, scale_b: str) -> str:
        """An int32 bias on the grid of the product of two scales, in float."""
        scale = self.add("Mul", [scale_a, scale_b], hint=b + "_scale")
        return self.add("Mul", [self.add("Cast", [b], hint=b + "_cast", to=TensorProto.FLOAT), scale],
                        hint=b + "_dequantized")


def _opt(node: onnx.NodeProto, i: int) -> str:
    return node.input[i] if len(node.input) > i else ""


def _qlinear_conv(w: _Writer, n: onnx.NodeProto) -> None:
    """QLinearConv(x, xs, xz, W, Ws, Wz, ys, yz, B) = Q(Conv(DQ(x), DQ(W) per output channel, B · xs · Ws))."""
    x = w.dq(n.input[0], n.input[1], n.input[2])
    wt = w.dq(n.input[3], n.input[4], n.input[5], axis=0)
    ins = [x, wt] + ([w.bias(n.input[8], n.input[1], n.input[4])] if _opt(n, 8) else [])
    w.q(w.add("Conv", ins, outputs=[w.float_name(n.output[0])], **node_attrs(n)), n.input[6], n.input[7], n.output[0])


def _qlinear_matmul(w: _Writer, n: onnx.NodeProto) -> None:
    a = w.dq(n.input[0], n.input[1], n.input[2])
    b = w.dq(n.input[3], n.input[4], n.input[5])
    w.q(w.add("MatMul", [a, b], outputs=[w.float_name(n.output[0])]), n.input[6], n.input[7], n.output[0])


def _qgemm(w: _Writer, n: onnx.NodeProto) -> None:
    """com.microsoft QGemm(A, As, Az, B, Bs, Bz, C, ys, yz): a float output when ys is absent."""
    at = node_attrs(n)
    a = w.dq(n.input[0], n.input[1], n.input[2])
    b = w.dq(n.input[3], n.input[4], n.input[5], axis=0 if at.get("transB", 0) else 1)
    ins = [a, b] + ([w.bias(n.input[6], n.input[1], n.input[4])] if _opt(n, 6) else [])
    gemm = {k: v for k, v in at.items() if k in ("alpha", "transA", "transB")}
    if _opt(n, 7):
        w.q(w.add("Gemm", ins, outputs=[w.float_name(n.output[0])], **gemm), n.input[7], _opt(n, 8), n.output[0])
    else:
        w.add("Gemm", ins, [n.output[0]], **gemm)


def _binary(op: str):
    def rewrite(w: _Writer, n: onnx.NodeProto) -> None:
        """com.microsoft QLinear{Add,Mul}(A, As, Az, B, Bs, Bz, Cs, Cz)."""
        a = w.dq(n.input[0], n.input[1], _opt(n, 2))
        b = w.dq(n.input[3], n.input[4], _opt(n, 5))
        w.q(w.add(op, [a, b], outputs=[w.float_name(n.output[0])]), n.input[6], _opt(n, 7), n.output[0])
    return rewrite


def _unary(op: str, keep: tuple = ()):
    def rewrite(w: _Writer, n: onnx.NodeProto) -> None:
        """com.microsoft QLinear{op}(X, Xs, Xz, Ys, Yz) with the float op's attributes."""
        attrs = {k: v for k, v in node_attrs(n).items() if k in keep}
        x = w.dq(n.input[0], n.input[1], _opt(n, 2))
        w.q(w.add(op, [x], outputs=[w.float_name(n.output[0])], **attrs), n.input[3], _opt(n, 4), n.output[0])
    return rewrite


def _global_average_pool(w: _Writer, n: onnx.NodeProto) -> None:
    if node_attrs(n).get("channels_last", 0):
        raise ModelError(f"node {n.name!r}: a channels-last QLinearGlobalAveragePool is not one onnxsal can rewrite")
    _unary("GlobalAveragePool")(w, n)


def _dynamic_quantize(w: _Writer, n: onnx.NodeProto) -> None:
    """y, s, z = DynamicQuantizeLinear(x): s and z stay its outputs (computed from each input, they
    carry no gradient: the grid is held where the input put it), and y is QuantizeLinear(x, s, z),
    the same integers with the straight-through gradient."""
    y, scale, zero = (o or w.unique(f"{n.input[0]}_{k}") for o, k in zip(n.output, ("dynamic", "scale", "zero")))
    w.nodes.append(helper.make_node("DynamicQuantizeLinear", [n.input[0]], [w.unique(f"{y}_unused"), scale, zero],
                                    name=n.name))
    if y:
        w.q(n.input[0], scale, zero, y)


def _integer_product(op: str):
    def rewrite(w: _Writer, n: onnx.NodeProto) -> None:
        """{op}Integer(A, B, Az, Bz): the float {op} of A - Az and B - Bz, whose values are the int32
        result's. A is an activation on a quantiser's grid (its gradient passes straight through the
        DequantizeLinear); B is the quantised weight, per-tensor or per output channel."""
        a = w.dq(n.input[0], w.one(), _opt(n, 2))
        b = w.add("Cast", [n.input[1]], hint=n.input[1] + "_float", to=TensorProto.FLOAT)
        if _opt(n, 3):
            zero = w.add("Cast", [n.input[3]], hint=n.input[3] + "_float", to=TensorProto.FLOAT)
            rank = len(w.dims.get(n.input[1], ()))
            if op == "Conv" and rank > 1:             # a zero point per output channel, along axis 0
                zero = w.add("Reshape", [zero, w.add("Constant", [], hint=n.input[3] + "_shape",
                                                     value=helper.make_tensor("s", TensorProto.INT64, [rank],
                                                                              [-1] + [1] * (rank - 1)))])
            b = w.add("Sub", [b, zero], hint=n.input[1] + "_centred")
        attrs = node_attrs(n) if op == "Conv" else {}
        w.add(op, [a, b], [n.output[0]], **attrs)
        w.retyped.add(n.output[0])
    return rewrite


def _concat(w: _Writer, n: onnx.NodeProto) -> None:
    """com.microsoft QLinearConcat(Ys, Yz, X1, X1s, X1z, X2, ...)."""
    parts = [w.dq(n.input[k], n.input[k + 1], n.input[k + 2]) for k in range(2, len(n.input), 3)]
    w.q(w.add("Concat", parts, outputs=[w.float_name(n.output[0])], axis=node_attrs(n)["axis"]), n.input[0], n.input[1], n.output[0])


def _mover(w: _Writer, n: onnx.NodeProto) -> None:
    """A node that only moves integers, run on their float values and requantised on the same grid."""
    scale, zero = w.grid[n.input[0]]
    rest = list(n.input[1:])
    if n.op_type == "Pad" and (not n.attribute or node_attrs(n).get("mode", b"constant") in (b"constant", "constant")):
        fill = rest[1] if len(rest) > 1 and rest[1] else None      # the integer it pads with, 0 when absent
        filled = w.add("Cast", [fill], hint=n.output[0] + "_fill", to=TensorProto.FLOAT) if fill else None
        if zero:
            zf = w.add("Cast", [zero], hint=n.output[0] + "_zero", to=TensorProto.FLOAT)
            filled = w.add("Sub", [filled, zf], hint=n.output[0] + "_fill") if filled else \
                w.add("Neg", [zf], hint=n.output[0] + "_fill")
        if filled is not None:
            rest = [rest[0], w.add("Mul", [filled, scale], hint=n.output[0] + "_fill")] + rest[2:]
    x = w.dq(n.input[0], scale, zero)
    if n.op_type == "MaxPool" and len(n.output) > 1 and n.output[1]:
        floats = [w.float_name(n.output[0]), n.output[1]]           # the indices stay as they are
    else:
        floats = [w.float_name(o) if o else "" for o in n.output]
    w.add(n.op_type, [x] + rest, outputs=floats, **node_attrs(n))
    for f, o in zip(floats, n.output):
        if o and f != o:
            w.q(f, scale, zero, o)


_REWRITES = {
    "QLinearConv": _qlinear_conv, "QLinearMatMul": _qlinear_matmul, f"{MS}:QGemm": _qgemm,
    f"{MS}:QLinearAdd": _binary("Add"), f"{MS}:QLinearMul": _binary("Mul"),
    f"{MS}:QLinearGlobalAveragePool": _global_average_pool,
    f"{MS}:QLinearAveragePool": _unary("AveragePool", ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape",
                                                       "pads", "strides")),
    f"{MS}:QLinearSigmoid": _unary("Sigmoid"), f"{MS}:QLinearLeakyRelu": _unary("LeakyRelu", ("alpha",)),
    f"{MS}:QLinearSoftmax": _unary("Softmax", ("axis",)), f"{MS}:QLinearConcat": _concat,
    "DynamicQuantizeLinear": _dynamic_quantize, "ConvInteger": _integer_product("Conv"),
    "MatMulInteger": _integer_product("MatMul"),
}
