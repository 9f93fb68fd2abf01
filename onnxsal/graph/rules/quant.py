"""QuantizeLinear and DequantizeLinear: the gradient passed straight through the rounding.

A quantised model in QDQ form (ONNX Runtime's static quantiser, torch.onnx's export of fake
quantisation) rounds each quantised activation to its grid: ``q = saturate(round(x / s) + z)``
and back, ``x' = (q - z) · s``. Rounding is a step function, so its derivative is zero wherever
it exists, and a saliency map of it would be zeros. Quantisation-aware training has the same
problem and passes the gradient straight through instead, inside the range the integer type can
hold and zero outside it (PyTorch's ``fake_quantize`` backward; Bengio et al. 2013). These rules
do the same: the pair's gradient is the upstream gradient times ``[qmin <= round(x / s) + z <=
qmax]``, and a quantised model is explained as its float network with the quantised weights
(which are constants, so never differentiated) and its clipped activations passing nothing. A
ReLU that the quantiser folded into a uint8 range with zero point 0 thus keeps its mask.

The integer tensor between the two is treated as the real number it stands for: the builder
gives its gradient a float type (``INTEGER_CARRIERS`` in autodiff.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleContext, vjp_rule
from .activations import DECONV_RULES, GUIDED_RULES
from .shape import _unsupported

Grads = list

# integer type -> (qmin, qmax) it saturates to
RANGES = {
    TensorProto.UINT8: (0, 255), TensorProto.INT8: (-128, 127), TensorProto.UINT16: (0, 65535),
    TensorProto.INT16: (-32768, 32767), TensorProto.UINT4: (0, 15), TensorProto.INT4: (-8, 7),
}


def _along(ctx: RuleContext, t: str, like: str) -> str:
    """A scale or zero point shaped to broadcast against ``like``: a scalar as it is, a 1-D
    per-channel tensor along the node's ``axis`` (default 1)."""
    shape = ctx.shape(t)
    if shape is not None and len(shape) == 0:
        return t
    if shape is not None and len(shape) == 1 and shape[0] == 1 and ctx.attr("axis") is None:
        return t
    rank = ctx.rank(like)
    if rank is None or shape is None or len(shape) != 1:
        raise _unsupported(ctx, "per-channel quantisation needs the ranks of its tensor and a 1-D scale")
    axis = int(ctx.attr("axis", 1)) % rank
    return ctx.unsqueeze(t, [k for k in range(rank) if k != axis])


def _zero_point(ctx: RuleContext) -> tuple[Optional[str], int]:
    """The node's zero point (None when absent) and the integer type it quantises to."""
    zero_point = ctx.inputs[2] if len(ctx.inputs) > 2 and ctx.inputs[2] else None
    qtype = ctx.elem_type(zero_point) if zero_point else int(ctx.attr("output_dtype", 0)) or TensorProto.UINT8
    return zero_point, qtype


@vjp_rule("DequantizeLinear")
def dequantize_linear(ctx: RuleContext, gy: Grads) -> Grads:
    """x = (q - z) · s, so the gradient reaching q (as a real number) is g · s."""
    if ctx.attr("block_size"):
        raise _unsupported(ctx, "blocked quantisation")
    scale = _along(ctx, ctx.inputs[1], ctx.inputs[0])
    return [ctx.op("Mul", [gy[0], scale]), None, None]


@vjp_rule("QuantizeLinear")
def quantize_linear(ctx: RuleContext, gy: Grads) -> Grads:
    """q = saturate(round(x / s) + z): g / s where round(x / s) + z lies within the type's range, else 0."""
    return _straight_through(ctx, gy[0], masked=True)


def _relu_like(ctx: RuleContext) -> bool:
    """The quantiser maps real 0 to its smallest integer, so it clips every negative input to 0: a ReLU.

    ONNX Runtime's quantiser removes a ReLU (or a Clip at 0) in front of such a quantiser, since the
    quantiser does its work; Guided Backprop and the deconvnet then have to find it here.
    """
    zero_point, qtype = _zero_point(ctx)
    z = ctx.const_value(zero_point) if zero_point else np.zeros(1)
    return qtype in RANGES and z is not None and bool(np.all(np.asarray(z) == RANGES[qtype][0]))


def guided_quantize_linear(ctx: RuleContext, gy: Grads) -> Grads:
    """Guided Backprop: a ReLU-like quantiser passes only positive gradients, inside its range."""
    g = ctx.op("Relu", [gy[0]]) if _relu_like(ctx) else gy[0]
    return _straight_through(ctx, g, masked=True)


def deconv_quantize_linear(ctx: RuleContext, gy: Grads) -> Grads:
    """Deconvnet: a ReLU-like quantiser passes the positive gradients, ignoring the forward values."""
    if not _relu_like(ctx):
        return _straight_through(ctx, gy[0], masked=True)
    return _straight_through(ctx, ctx.op("Relu", [gy[0]]), masked=False)


GUIDED_RULES["QuantizeLinear"] = guided_quantize_linear
DECONV_RULES["QuantizeLinear"] = deconv_quantize_linear


def _straight_through(ctx: RuleContext, g: str, masked: bool) -> Grads:
    """g / s, times the in-range mask when ``masked``."""
    if ctx.attr("block_size"):
        raise _unsupported(ctx, "blocked quantisation")
    x = ctx.inputs[0]
    zero_point, qtype = _zero_point(ctx)
    if qtype not in RANGES:
        raise _unsupported(ctx, f"quantisation to {TensorProto.DataType.Name(qtype)}")
    qmin, qmax = RANGES[qtype]
    scale = _along(ctx, ctx.inputs[1], x)
    passed = ctx.op("Div", [g, scale])
    if not masked:
        return [passed, None, None]
    grid = ctx.op("Round", [ctx.op("Div", [x, scale])])
    if zero_point:
        z = ctx.op("Cast", [_along(ctx, zero_point, x)], to=ctx.elem_type(x))
        grid = ctx.op("Add", [grid, z])
    inside = ctx.op("And", [ctx.op("GreaterOrEqual", [grid, ctx.const(np.float32(qmin), like=x)]),
                            ctx.op("LessOrEqual", [grid, ctx.const(np.float32(qmax), like=x)])])
    return [ctx.op("Mul", [passed, ctx.op("Cast", [inside], to=ctx.elem_type(x))]), None, None]
