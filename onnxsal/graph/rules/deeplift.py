"""DeepLIFT's Rescale rule as swap-in VJP rules (``vjp(..., rules=DEEPLIFT_RULES)``).

The VJP graph runs one batch of ``2N`` rows: the inputs, then their baselines.  Linear ops keep
their gradients (they are already exact for differences); each nonlinearity replaces its
derivative by the ratio of differences between the two halves::

    m = (f(z) - f(z0)) / (z - z0)      (the plain gradient where |z - z0| < 1e-10)

applied to both halves alike, and max pooling routes ``dy * (output difference)`` through the
argmax positions and divides by the input difference: Captum's DeepLift formulas, rule for rule.
Chained exactly, the multipliers make the attributions sum to ``S(x) - S(x0)`` on networks of
elementwise activations, max pooling and linear layers (Captum's hooks lose that where a ReLU feeds
a pool directly; see the README).  Softmax, products of activations and ops without a rule here
keep their ordinary gradient, as in Captum.
"""

from __future__ import annotations

import numpy as np

from ...errors import UnsupportedOpError
from ..autodiff import VJP_RULES, RuleContext
from .pool import max_pool_indices, route_to_argmax

EPS = 1e-10
Grads = list


def _halves(ctx: RuleContext, t: str) -> tuple[str, str]:
    """The first and second half of ``t`` along the batch axis."""
    n = ctx.op("Div", [ctx.op("Slice", [ctx.shape_of(t), ctx.const([0]), ctx.const([1])]), ctx.const([2])])
    big = ctx.const([np.iinfo(np.int64).max])
    zero = ctx.const([0])
    return ctx.op("Slice", [t, zero, n, zero]), ctx.op("Slice", [t, n, big, zero])


def _twice(ctx: RuleContext, t: str) -> str:
    return ctx.op("Concat", [t, t], axis=0)


def _pairs(ctx: RuleContext, t: str) -> str:
    """``t`` viewed as (2, M): row 0 the input half, row 1 the baseline half (a free Reshape)."""
    return ctx.op("Reshape", [t, ctx.const(np.asarray([2, -1], np.int64))])


def _difference(ctx: RuleContext, t: str) -> str:
    """(1, M): input half minus baseline half, in one pass (a K=2 MatMul instead of two Slices and a Sub)."""
    return ctx.op("MatMul", [ctx.const(np.asarray([[1.0, -1.0]]), like=t), _pairs(ctx, t)])


def _ratio(ctx: RuleContext, out_delta: str, in_delta: str) -> tuple[str, str]:
    """(out_delta / in_delta, [|in_delta| < eps] as 0/1), both (1, M); the ratio is 0 where the mask is 1."""
    y = ctx.outputs[0]
    small = ctx.op("Less", [ctx.op("Abs", [in_delta]), ctx.const(EPS, like=y)])
    ratio = ctx.op("Div", [out_delta, ctx.op("Where", [small, ctx.const(1.0, like=y), in_delta])])
    return ratio, ctx.op("Cast", [small], to=ctx.elem_type(y))


def _select(ctx: RuleContext, small: str, plain: str, rescaled: str, like: str) -> str:
    """``plain`` where the input delta is below eps, else ``rescaled`` (both (2, M)), as
    rescaled + small * (plain - rescaled): three light passes instead of one Where, which ORT's
    CPU kernels run several times slower than a Mul."""
    mixed = ctx.op("Add", [rescaled, ctx.op("Mul", [small, ctx.op("Sub", [_pairs(ctx, plain), rescaled])])])
    return ctx.op("Reshape", [mixed, ctx.shape_of(like)])


def rescale(ctx: RuleContext, gy: Grads) -> Grads:
    """Elementwise nonlinearity y = f(z): gz = gy * (f(z) - f(z0)) / (z - z0), per half."""
    grads = VJP_RULES[ctx.node.op_type](ctx, gy)
    if grads[0] is None:
        return grads
    ratio, small = _ratio(ctx, _difference(ctx, ctx.outputs[0]), _difference(ctx, ctx.inputs[0]))
    rescaled = ctx.op("Mul", [_pairs(ctx, gy[0]), ratio])
    return [_select(ctx, small, grads[0], rescaled, ctx.inputs[0])] + list(grads[1:])


def max_pool(ctx: RuleContext, gy: Grads) -> Grads:
    """Captum's DeepLift max pooling: with ``m = max(y, y0)``, the output deltas ``m - y0`` (input
    rows) and ``y - m`` (baseline rows) times gy are routed to each half's argmax positions,
    summed over the halves, and divided by the input delta."""
    if len(ctx.outputs) > 1 and ctx.outputs[1]:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(DeepLIFT with MaxPool's Indices output)")
    if gy[0] is None or not ctx.needs_grad(0):
        return [None]
    idx = max_pool_indices(ctx)                # one indices pass for both routings
    plain = route_to_argmax(ctx, gy[0], idx)
    y_in, y_ref = _halves(ctx, ctx.outputs[0])
    top = ctx.op("Max", [y_in, y_ref])
    out_delta = ctx.op("Concat", [ctx.op("Sub", [top, y_ref]), ctx.op("Sub", [y_in, top])], axis=0)
    routed = _pairs(ctx, route_to_argmax(ctx, ctx.op("Mul", [gy[0], out_delta]), idx))
    summed = ctx.op("ReduceSum", [routed, ctx.const(np.asarray([0], np.int64))], keepdims=1)   # (1, M)
    ratio, small = _ratio(ctx, summed, _difference(ctx, ctx.inputs[0]))
    return [_select(ctx, small, plain, _twice(ctx, ratio), ctx.inputs[0])]


NONLINEAR = ("Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "Tanh", "Softplus", "Softsign",
             "Mish", "Gelu", "HardSigmoid", "HardSwish", "Clip", "ThresholdedRelu", "Erf")
DEEPLIFT_RULES: dict[str, object] = {op: rescale for op in NONLINEAR} | {"MaxPool": max_pool}
