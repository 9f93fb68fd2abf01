"""VJP rules for BatchNormalization (inference), InstanceNormalization and LayerNormalization.

Only the data input gets a gradient: scale, bias and running statistics are
weights, and saliency never differentiates with respect to weights.  A rule
asked for one of those refuses loudly rather than return a wrong zero.

Normalisation over a set of axes ``A`` (``m`` elements each)::

    xhat = (x - mean_A(x)) * rstd,   rstd = 1 / sqrt(var_A(x) + eps)
    y    = scale * xhat + bias

has, with ``g = dy * scale``, the well-known input gradient::

    dx = rstd * (g - mean_A(g) - xhat * mean_A(g * xhat))

(the two subtracted terms are the derivatives through the mean and through
the variance).  Inference BatchNormalization uses fixed statistics, so it is
a per-channel affine map and its gradient a single Mul.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import TensorProto

from ...errors import UnsupportedOpError
from ..autodiff import RuleContext, vjp_rule


def _refuse_weight_grads(ctx: RuleContext, first_weight: int = 1) -> None:
    for i in range(first_weight, len(ctx.inputs)):
        if ctx.needs_grad(i):
            raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                     f"(gradient with respect to input {i} ({ctx.inputs[i]!r}), a weight, "
                                     "is not supported)")


def _reduce_mean(ctx: RuleContext, x: str, axes: list[int]) -> str:
    """ReduceMean keeping dims, with axes as an attribute before opset 18 and an input from 18 on."""
    if ctx.opset >= 18:
        return ctx.op("ReduceMean", [x, ctx.const(np.asarray(axes, np.int64))], keepdims=1)
    return ctx.op("ReduceMean", [x], axes=list(axes), keepdims=1)


def _channel_view(ctx: RuleContext, v: str, rank: int) -> str:
    """A per-channel vector ``(C,)`` reshaped to ``(C, 1, ..., 1)`` so it broadcasts on axis 1."""
    return ctx.unsqueeze(v, list(range(1, rank - 1)))


def _normalized_backward(ctx: RuleContext, g: str, xhat: str, rstd: str, axes: list[int]) -> str:
    """``rstd * (g - mean(g) - xhat * mean(g * xhat))`` over ``axes``."""
    mg = _reduce_mean(ctx, g, axes)
    mgx = _reduce_mean(ctx, ctx.op("Mul", [g, xhat]), axes)
    inner = ctx.op("Sub", [ctx.op("Sub", [g, mg]), ctx.op("Mul", [xhat, mgx])])
    return ctx.op("Mul", [inner, rstd])


def _wants_data_grad(ctx: RuleContext, gy: list[Optional[str]]) -> bool:
    """Whether the data input needs a gradient; a weight that needs one is refused first."""
    if gy[0] is None:
        return False
    _refuse_weight_grads(ctx)
    return ctx.needs_grad(0)


def _times_channel_scale(ctx: RuleContext, dy: str, scale: str, rank: int) -> str:
    """``dy * scale`` with a per-channel scale on axis 1 (folded into a constant when it is one)."""
    sv = ctx.const_value(scale)
    if sv is None:
        return ctx.op("Mul", [dy, _channel_view(ctx, scale, rank)])
    if np.all(sv == 1):
        return dy
    return ctx.op("Mul", [dy, ctx.const(sv.reshape((-1,) + (1,) * (rank - 2)), like=dy)])


def _standardized(ctx: RuleContext, x: str, axes: list[int], eps: float) -> tuple[str, str]:
    """(xhat, rstd) over ``axes``, recomputed from ``x``: mean, centred x, variance, 1/sqrt."""
    xc = ctx.op("Sub", [x, _reduce_mean(ctx, x, axes)])
    var = _reduce_mean(ctx, ctx.op("Mul", [xc, xc]), axes)
    rstd = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(eps, like=x)])])])
    return ctx.op("Mul", [xc, rstd]), rstd


def _is_ones(ctx: RuleContext, name: str) -> bool:
    v = ctx.const_value(name)
    return v is not None and bool(np.all(v == 1))


@vjp_rule("BatchNormalization")
def batch_normalization(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """Inference mode: ``y = x * a + b`` per channel, ``a = scale / sqrt(var + eps)``, so ``dx = dy * a``.

    With constant scale and variance (the normal case) ``a`` is computed once in
    float64 numpy and stored shaped ``(C, 1, ..., 1)``: the whole backward is one
    broadcast Mul.  Otherwise ``a`` is built from the tensors at run time.
    Training mode (batch statistics, extra outputs) is refused: an exported
    inference model never uses it, and its gradient is a different formula.
    """
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    dy = gy[0]
    if dy is None:
        return res
    if int(ctx.attr("training_mode", 0)) or any(o for o in ctx.outputs[1:]):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(training mode is not supported)")
    _refuse_weight_grads(ctx)
    if not ctx.needs_grad(0):
        return res
    x, scale, var = ctx.inputs[0], ctx.inputs[1], ctx.inputs[4]
    eps = float(ctx.attr("epsilon", 1e-5))
    rank = ctx.rank(x) or ctx.rank(dy)
    if rank is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown input rank)")
    sv, vv = ctx.const_value(scale), ctx.const_value(var)
    if sv is not None and vv is not None:
        a = sv.astype(np.float64) / np.sqrt(vv.astype(np.float64) + eps)
        a = ctx.const(a.reshape((-1,) + (1,) * (rank - 2)), like=dy)
    else:
        a = ctx.op("Div", [scale, ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(eps, like=var)])])])
        a = _channel_view(ctx, a, rank)
    res[0] = ctx.op("Mul", [dy, a])
    return res


@vjp_rule("InstanceNormalization")
def instance_normalization(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """Normalisation over the spatial axes ``2..r-1`` of each ``(n, c)``; see the module formula.

    The statistics are recomputed from ``x`` (ONNX InstanceNormalization does
    not output them): mean, centred ``x``, variance, ``rstd`` -- a handful of
    elementwise passes, comparable to the forward op.
    """
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    if not _wants_data_grad(ctx, gy):
        return res
    x, scale, dy = ctx.inputs[0], ctx.inputs[1], gy[0]
    rank = ctx.rank(x) or ctx.rank(dy)
    if rank is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown input rank)")
    axes = list(range(2, rank))
    xhat, rstd = _standardized(ctx, x, axes, float(ctx.attr("epsilon", 1e-5)))
    res[0] = _normalized_backward(ctx, _times_channel_scale(ctx, dy, scale, rank), xhat, rstd, axes)
    return res


@vjp_rule("LayerNormalization")
def layer_normalization(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """Normalisation over axes ``axis..r-1``; see the module formula.

    ``xhat`` and ``rstd`` come from one fused op: the forward's own ``Mean`` /
    ``InvStdDev`` outputs when it has them, else a second LayerNormalization
    with a scale of ones and no bias, whose outputs are ``xhat``, the mean and
    ``rstd``.  The statistics are in ``stash_type`` precision (float32 for
    half inputs) and are cast to the gradient's type when they differ.
    Gradients flowing into the ``Mean``/``InvStdDev`` outputs themselves are
    refused (no exported model differentiates through them).
    """
    return _layer_normalization(ctx, gy, primitive=False)


def layer_normalization_primitive(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """The same gradient with ``xhat`` and ``rstd`` computed from elementwise ops and reductions
    only, never from a LayerNormalization's statistics outputs (which have no rule): the form a
    graph that is differentiated a second time needs (``graph.second``)."""
    return _layer_normalization(ctx, gy, primitive=True)


def _layer_normalization(ctx: RuleContext, gy: list[Optional[str]], primitive: bool) -> list[Optional[str]]:
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    dy = gy[0]
    if any(g is not None for g in gy[1:]):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                 "(gradient through the Mean/InvStdDev outputs is not supported)")
    if dy is None:
        return res
    _refuse_weight_grads(ctx)
    if not ctx.needs_grad(0):
        return res
    x, scale = ctx.inputs[0], ctx.inputs[1]
    rank = ctx.rank(x) or ctx.rank(dy)
    if rank is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown input rank)")
    axis = int(ctx.attr("axis", -1))
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    eps = float(ctx.attr("epsilon", 1e-5))
    stash = int(ctx.attr("stash_type", 1))

    outs = ctx.outputs
    has_stats = len(outs) > 2 and bool(outs[1]) and bool(outs[2]) and not primitive
    x_shape = ctx.shape(x)
    norm_shape = None if x_shape is None or primitive else x_shape[axis:]
    if has_stats:
        mean, rstd = outs[1], outs[2]
        xhat = None
    elif norm_shape is not None and all(v is not None for v in norm_shape):
        ones = ctx.const(np.ones(norm_shape), like=x)
        xhat, mean, rstd = ctx.op("LayerNormalization", [x, ones], n_out=3, axis=axis, epsilon=eps,
                                  stash_type=stash)
    else:
        xc = ctx.op("Sub", [x, _reduce_mean(ctx, x, axes)])
        var = _reduce_mean(ctx, ctx.op("Mul", [xc, xc]), axes)
        rstd = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [var, ctx.const(eps, like=x)])])])
        xhat = ctx.op("Mul", [xc, rstd])
        mean = None
    et = ctx.elem_type(dy) or TensorProto.FLOAT
    if ctx.elem_type(rstd) not in (et, TensorProto.UNDEFINED):
        rstd = ctx.op("Cast", [rstd], to=et)
        if mean is not None and xhat is None:
            mean = ctx.op("Cast", [mean], to=et)
    if xhat is None:
        xhat = ctx.op("Mul", [ctx.op("Sub", [x, mean]), rstd])

    g = dy if _is_ones(ctx, scale) else ctx.op("Mul", [dy, scale])
    res[0] = _normalized_backward(ctx, g, xhat, rstd, axes)
    return res


def _channel_window_sum(ctx: RuleContext, t: str, size: int, before: int, after: int) -> str:
    """out[:, c] = sum of t[:, c - before .. c + after] (zero outside), as a Conv over the
    (N, 1, C, ...) view: a kernel of ones along the channel axis, 1 along the others."""
    r = ctx.rank(t)
    u = ctx.unsqueeze(t, [1])
    spatial = r - 1                                    # C and the image axes
    kernel = ctx.const(np.ones((1, 1, size) + (1,) * (spatial - 1)), like=t)
    pads = [before] + [0] * (spatial - 1) + [after] + [0] * (spatial - 1)
    return ctx.squeeze(ctx.op("Conv", [u, kernel], pads=pads), [1])


@vjp_rule("LRN")
def lrn(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """Local response normalisation across channels (AlexNet, GoogLeNet)::

        y_c = x_c * D_c^-beta,   D_c = bias + alpha/size * sum_{c' in W(c)} x_c'^2,
        W(c) = [c - floor((size-1)/2), c + ceil((size-1)/2)]

    gives ``dx_j = gy_j D_j^-beta - (2 alpha beta / size) x_j sum_{c: j in W(c)} gy_c x_c D_c^(-beta-1)``.
    The window sum and its transpose (the same window, mirrored) are convolutions with a
    kernel of ones over the channel axis.
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    if ctx.rank(x) is None or ctx.rank(x) < 3:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(needs a known rank of at least 3)")
    size = int(ctx.attr("size"))
    alpha, beta, bias = float(ctx.attr("alpha", 1e-4)), float(ctx.attr("beta", 0.75)), float(ctx.attr("bias", 1.0))
    lo = (size - 1) // 2
    hi = size - 1 - lo
    c = lambda v: ctx.const(v, like=y)  # noqa: E731
    s = _channel_window_sum(ctx, ctx.op("Mul", [x, x]), size, lo, hi)
    d = ctx.op("Add", [ctx.op("Mul", [s, c(alpha / size)]), c(bias)])
    d_mb = ctx.op("Pow", [d, c(-beta)])
    g = gy[0]
    u = ctx.op("Div", [ctx.op("Mul", [ctx.op("Mul", [g, x]), d_mb]), d])
    v = _channel_window_sum(ctx, u, size, hi, lo)
    back = ctx.op("Mul", [ctx.op("Mul", [x, v]), c(2.0 * alpha * beta / size)])
    return [ctx.op("Sub", [ctx.op("Mul", [g, d_mb]), back])]


@vjp_rule("GroupNormalization")
def group_normalization(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """Normalisation over each group of ``C/G`` consecutive channels and the spatial axes.

    ``g = dy * scale`` per channel, then the module formula on the ``(N, G, C/G * spatial)``
    view, with the statistics recomputed from ``x``.  Opset 18's form, with one scale per group,
    was withdrawn from ONNX (its checker refuses it) and is refused here too.
    """
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    if not _wants_data_grad(ctx, gy):
        return res
    x, scale, dy = ctx.inputs[0], ctx.inputs[1], gy[0]
    groups = int(ctx.attr("num_groups"))
    shape = ctx.shape(x)
    if shape is None or len(shape) < 3 or shape[1] is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(needs a known rank and channel count)")
    rank, channels = len(shape), int(shape[1])
    if (ctx.shape(scale) or (channels,))[0] != channels:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(one scale per group: opset 18's withdrawn form)")
    view = ctx.const(np.asarray([0, groups, -1], np.int64))
    g = ctx.op("Reshape", [_times_channel_scale(ctx, dy, scale, rank), view])
    xhat, rstd = _standardized(ctx, ctx.op("Reshape", [x, view]), [2], float(ctx.attr("epsilon", 1e-5)))
    res[0] = ctx.op("Reshape", [_normalized_backward(ctx, g, xhat, rstd, [2]), ctx.shape_of(x)])
    return res


@vjp_rule("LpNormalization")
def lp_normalization(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """y = x / n along ``axis``, n = ||x||_p (p = 2 or 1; an embedding head's L2 normalisation):
    ``dx = (gy - s * <gy, y>) / n`` with s = y for p = 2 and s = sign(x) for p = 1 (the sum over
    the axis). ONNX Runtime divides by n itself, so a zero row stays as it computes it."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    rank = ctx.rank(x)
    if rank is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(needs a known rank)")
    axis = int(ctx.attr("axis", -1)) % rank
    p = int(ctx.attr("p", 2))
    if p not in (1, 2):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, f"(p = {p}; ONNX defines 1 and 2)")
    n = ctx.op("Sqrt", [ctx.reduce_sum(ctx.op("Mul", [x, x]), [axis])]) if p == 2 else \
        ctx.reduce_sum(ctx.op("Abs", [x]), [axis])
    s = y if p == 2 else ctx.op("Sign", [x])
    along = ctx.reduce_sum(ctx.op("Mul", [gy[0], y]), [axis])
    return [ctx.op("Div", [ctx.op("Sub", [gy[0], ctx.op("Mul", [s, along])]), n])]
