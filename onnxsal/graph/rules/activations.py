"""VJP rules for activations, plus the Relu modifiers of Guided Backprop and deconvnet.

Masks are computed from the forward OUTPUT where that is equivalent (Relu:
[x>0] == [y>0]), so the pre-activation tensor need not be kept.  On image
tensors (float32 NCHW with a static, block-aligned channel count) the Relu and
Clip masks are depthwise-conv steps (see ``blocked``), which keep ORT's CPU
backward in its blocked layout; elsewhere they are Cast(compare) * gy: in ORT's
CPU kernels a compare and a bool->float Cast each cost about half a Mul, while
Sign and Where are 7-8x slower than a Mul.
These rules run once per activation layer, so their cost is most of the
backward pass outside the convolutions.  At a kink the gradient is the
one-sided value training frameworks use (Relu'(0) = 0, strict Clip bounds).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleContext, vjp_rule
from . import blocked

Grads = list


def _mask(ctx: RuleContext, cond: str, like: str) -> str:
    return ctx.op("Cast", [cond], to=ctx.elem_type(like))


def _positive(ctx: RuleContext, t: str) -> str:
    """[t > 0] as 0/1 in t's float type."""
    c = blocked.channels(ctx, t)
    if c is not None:
        return blocked.step(ctx, t, c)
    return _mask(ctx, ctx.op("Greater", [t, ctx.const(0.0, like=t)]), t)


@vjp_rule("Relu")
def relu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = max(x, 0): gx = gy * [x > 0] = gy * [y > 0]."""
    return [ctx.op("Mul", [gy[0], _positive(ctx, ctx.outputs[0])])]


def guided_relu(ctx: RuleContext, gy: Grads) -> Grads:
    """Guided Backprop: gx = gy * [x > 0] * [gy > 0] = relu(gy) * [y > 0]."""
    return [ctx.op("Mul", [ctx.op("Relu", [gy[0]]), _positive(ctx, ctx.outputs[0])])]


def deconv_relu(ctx: RuleContext, gy: Grads) -> Grads:
    """Deconvnet ("rectified" backward): gx = gy * [gy > 0] = relu(gy), ignoring the forward mask."""
    return [ctx.op("Relu", [gy[0]])]


def _clip_bounds(ctx: RuleContext) -> tuple:
    """(min, max) of a Clip: tensor names or None; attrs (opset < 11) become constants."""
    lo = ctx.inputs[1] if len(ctx.inputs) > 1 and ctx.inputs[1] else None
    hi = ctx.inputs[2] if len(ctx.inputs) > 2 and ctx.inputs[2] else None
    y = ctx.outputs[0]
    if lo is None and ctx.attr("min") is not None:
        lo = ctx.const(float(ctx.attr("min")), like=y)
    if hi is None and ctx.attr("max") is not None:
        hi = ctx.const(float(ctx.attr("max")), like=y)
    return lo, hi


def _clip_mask(ctx: RuleContext) -> str | None:
    """[min < y < max] as a 0/1 float tensor (strict, like hardtanh/ReLU6 in training frameworks)."""
    y = ctx.outputs[0]
    lo, hi = _clip_bounds(ctx)
    m = _blocked_clip_mask(ctx, y, lo, hi)
    if m is not None:
        return m
    conds = []
    if lo is not None:
        conds.append(ctx.op("Greater", [y, lo]))
    if hi is not None:
        conds.append(ctx.op("Less", [y, hi]))
    if not conds:
        return None
    c = conds[0] if len(conds) == 1 else ctx.op("And", conds)
    return _mask(ctx, c, y)


def _blocked_clip_mask(ctx: RuleContext, y: str, lo: str | None, hi: str | None) -> str | None:
    """The Clip mask as blocked steps when the bounds are scalar constants and ``y`` is an image tensor."""
    c = blocked.channels(ctx, y)
    if c is None or (lo is None and hi is None):
        return None
    bounds = [(b, sign) for b, sign in ((lo, 1.0), (hi, -1.0)) if b is not None]
    values = [ctx.const_value(b) for b, _ in bounds]
    if any(v is None or v.size != 1 for v in values):
        return None                       # a bound computed at run time, or not a scalar
    steps = [blocked.step(ctx, y, c, sign=sign, at=float(v.reshape(()))) for v, (_, sign) in zip(values, bounds)]
    if None in steps:
        return None
    return steps[0] if len(steps) == 1 else ctx.op("Mul", steps)


@vjp_rule("Clip")
def clip(ctx: RuleContext, gy: Grads) -> Grads:
    """y = min(max(x, lo), hi): gx = gy * [lo < x < hi]. A bound that is itself computed from the
    input (``x.clamp(max=x.abs().mean())``) gets the gradient of the places it clipped, as
    torch.clamp's: glo = sum(gy * [x < lo]), ghi = sum(gy * [x > hi])."""
    m = _clip_mask(ctx)
    grads = [gy[0] if m is None else ctx.op("Mul", [gy[0], m])]
    for i, beyond in ((1, "Less"), (2, "Greater")):
        if not ctx.needs_grad(i):
            grads.append(None)
            continue
        bound = ctx.inputs[i]
        where = ctx.op("Cast", [ctx.op(beyond, [ctx.inputs[0], bound])], to=ctx.elem_type(gy[0]) or TensorProto.FLOAT)
        total = ctx.op("ReduceSum", [ctx.op("Mul", [gy[0], where])], keepdims=0)
        grads.append(ctx.op("Reshape", [total, ctx.shape_of(bound)]))
    return grads


def guided_clip(ctx: RuleContext, gy: Grads) -> Grads:
    """Guided Backprop through ReLU6-style Clip: gx = relu(gy) * [lo < x < hi]."""
    g = ctx.op("Relu", [gy[0]])
    m = _clip_mask(ctx)
    return [g if m is None else ctx.op("Mul", [g, m])]


def deconv_clip(ctx: RuleContext, gy: Grads) -> Grads:
    """Deconvnet through Clip: gx = relu(gy)."""
    return [ctx.op("Relu", [gy[0]])]


GUIDED_RULES = {"Relu": guided_relu, "Clip": guided_clip}
DECONV_RULES = {"Relu": deconv_relu, "Clip": deconv_clip}


@vjp_rule("LeakyRelu")
def leaky_relu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x if x > 0 else a*x: gx = gy * (a + (1 - a) [x > 0])."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    a = float(ctx.attr("alpha", 0.01))
    m = _mask(ctx, ctx.op("Greater", [x, ctx.const(0.0, like=y)]), y)
    f = ctx.op("Add", [ctx.op("Mul", [m, ctx.const(1.0 - a, like=y)]), ctx.const(a, like=y)])
    return [ctx.op("Mul", [gy[0], f])]


@vjp_rule("PRelu")
def prelu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x if x > 0 else s*x: gx = gy * (s + (1 - s)[x > 0]); gs = unbroadcast(gy * x * [x <= 0])."""
    x, s = ctx.inputs[0], ctx.inputs[1]
    y = ctx.outputs[0]
    g = gy[0]
    pos = _mask(ctx, ctx.op("Greater", [x, ctx.const(0.0, like=y)]), y)
    gx = gs = None
    if ctx.needs_grad(0):
        one_minus_s = ctx.op("Sub", [ctx.const(1.0, like=y), s])
        f = ctx.op("Add", [ctx.op("Mul", [pos, one_minus_s]), s])
        gx = ctx.op("Mul", [g, f])
    if ctx.needs_grad(1):
        neg = ctx.op("Sub", [ctx.const(1.0, like=y), pos])
        gs = ctx.unbroadcast(ctx.op("Mul", [ctx.op("Mul", [g, x]), neg]), s)
    return [gx, gs]


@vjp_rule("Elu")
def elu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x if x > 0 else a(e^x - 1): gx = gy * (1 if x > 0 else y + a)."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    a = float(ctx.attr("alpha", 1.0))
    return [ctx.op("Mul", [gy[0], _select(ctx, _positive(ctx, x), ctx.const(1.0, like=y),
                                          ctx.op("Add", [y, ctx.const(a, like=y)]))])]


def _select(ctx: RuleContext, m: str, a: str, b: str) -> str:
    """m * a + (1 - m) * b for a 0/1 mask m, as b + m * (a - b): the Where-free select."""
    return ctx.op("Add", [b, ctx.op("Mul", [m, ctx.op("Sub", [a, b])])])


@vjp_rule("Selu")
def selu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = g*x if x > 0 else g*a(e^x - 1): gx = gy * (g if x > 0 else y + g*a)."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    a = float(ctx.attr("alpha", 1.67326319217681884765625))
    gam = float(ctx.attr("gamma", 1.05070102214813232421875))
    neg = ctx.op("Add", [y, ctx.const(a * gam, like=y)])
    return [ctx.op("Mul", [gy[0], _select(ctx, _positive(ctx, x), ctx.const(gam, like=y), neg)])]


def _logistic_slope(ctx: RuleContext, x: str, tanh: bool) -> str:
    """sigmoid'(x) = t / (1 + t)^2 with t = e^-|x| (tanh'(x) = 4 t / (1 + t)^2 with t = e^-2|x|).

    Not y (1 - y) or 1 - y^2 from the forward output: ONNX Runtime's sigmoid is accurate in
    absolute terms only, so below x = -10 its float output is off by whole percents, below -18
    it is 0 (double: below -20 and -37), and near y = 1 both products cancel. A saturated
    sigmoid or tanh (a detector's background pixels, a confident gate) then got a derivative
    wrong by up to 100%. e^-|x| never overflows and nothing here cancels.
    """
    a = ctx.op("Abs", [x])
    t = ctx.op("Exp", [ctx.op("Neg", [ctx.op("Add", [a, a]) if tanh else a])])
    s = ctx.op("Add", [t, ctx.const(1.0, like=x)])
    num = ctx.op("Mul", [t, ctx.const(4.0, like=x)]) if tanh else t
    return ctx.op("Div", [num, ctx.op("Mul", [s, s])])


@vjp_rule("Sigmoid")
def sigmoid(ctx: RuleContext, gy: Grads) -> Grads:
    """y = 1/(1+e^-x): gx = gy * y (1 - y), computed from x (see ``_logistic_slope``)."""
    return [ctx.op("Mul", [gy[0], _logistic_slope(ctx, ctx.inputs[0], tanh=False)])]


@vjp_rule("Tanh")
def tanh(ctx: RuleContext, gy: Grads) -> Grads:
    """y = tanh(x): gx = gy * (1 - y^2), computed from x (see ``_logistic_slope``)."""
    return [ctx.op("Mul", [gy[0], _logistic_slope(ctx, ctx.inputs[0], tanh=True)])]


@vjp_rule("Softplus")
def softplus(ctx: RuleContext, gy: Grads) -> Grads:
    """y = log(1 + e^x): gx = gy * sigmoid(x)."""
    return [ctx.op("Mul", [gy[0], ctx.op("Sigmoid", [ctx.inputs[0]])])]


@vjp_rule("HardSigmoid")
def hard_sigmoid(ctx: RuleContext, gy: Grads) -> Grads:
    """y = max(0, min(1, a*x + b)): gx = gy * a * [0 < y < 1]."""
    y = ctx.outputs[0]
    a = float(ctx.attr("alpha", 0.2))
    inside = ctx.op("And", [ctx.op("Greater", [y, ctx.const(0.0, like=y)]),
                            ctx.op("Less", [y, ctx.const(1.0, like=y)])])
    m = ctx.op("Mul", [_mask(ctx, inside, y), ctx.const(a, like=y)])
    return [ctx.op("Mul", [gy[0], m])]


@vjp_rule("HardSwish")
def hard_swish(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x * max(0, min(1, x/6 + 1/2)): gx = gy * (0 if x < -3; x/3 + 1/2 if x <= 3; 1 otherwise).

    The boundaries follow the usual training-framework convention (the
    derivative is discontinuous at x = +-3).  On image tensors the slope is
    three blocked depthwise convolutions: the ramp clipped to [-1/2, 3/2] plus
    the two half-steps that bring its ends to 0 and 1.
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    c = blocked.channels(ctx, x)
    if c is not None:
        below = blocked.step(ctx, x, c, sign=-1.0, at=-3.0, height=0.5)
        above = blocked.step(ctx, x, c, at=3.0, height=0.5)
        if below is not None and above is not None:
            ramp = blocked.ramp(ctx, x, c, 1.0 / 3.0, 0.5, -0.5, 1.5)
            d = ctx.op("Sub", [ctx.op("Add", [ramp, below]), above])
            return [ctx.op("Mul", [gy[0], d])]
    lin = ctx.op("Add", [ctx.op("Mul", [x, ctx.const(1.0 / 3.0, like=y)]), ctx.const(0.5, like=y)])
    above = ctx.op("Greater", [x, ctx.const(3.0, like=y)])
    below = ctx.op("Less", [x, ctx.const(-3.0, like=y)])
    middle = _mask(ctx, ctx.op("Not", [ctx.op("Or", [above, below])]), y)
    d = ctx.op("Add", [ctx.op("Mul", [lin, middle]), _mask(ctx, above, y)])
    return [ctx.op("Mul", [gy[0], d])]


@vjp_rule("Softmax")
def softmax(ctx: RuleContext, gy: Grads) -> Grads:
    """y = softmax(x, axis): gx = y * (gy - sum(gy * y, axis))."""
    y = ctx.outputs[0]
    axis = _axis(ctx, y)
    s = ctx.reduce_sum(ctx.op("Mul", [gy[0], y]), [axis], keepdims=True)
    return [ctx.op("Mul", [y, ctx.op("Sub", [gy[0], s])])]


@vjp_rule("LogSoftmax")
def log_softmax(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x - logsumexp(x, axis): gx = gy - exp(y) * sum(gy, axis)."""
    y = ctx.outputs[0]
    axis = _axis(ctx, y)
    s = ctx.reduce_sum(gy[0], [axis], keepdims=True)
    return [ctx.op("Sub", [gy[0], ctx.op("Mul", [ctx.op("Exp", [y]), s])])]


def _axis(ctx: RuleContext, y: str) -> int:
    """The softmax axis, non-negative (opset >= 13 semantics: one axis, default -1)."""
    axis = int(ctx.attr("axis", -1))
    if axis < 0:
        r = ctx.rank(y)
        if r is None:
            return axis
        axis += r
    return axis


@vjp_rule("Gelu")
def gelu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x Phi(x) (exact): gx = gy * (Phi(x) + x phi(x)); tanh form differentiated exactly too."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    approx = ctx.attr("approximate", "none")
    c = lambda v: ctx.const(v, like=y)  # noqa: E731
    if approx == "tanh":
        k = float(np.sqrt(2.0 / np.pi))
        x2 = ctx.op("Mul", [x, x])
        inner = ctx.op("Mul", [ctx.op("Mul", [x, c(k)]), ctx.op("Add", [c(1.0), ctx.op("Mul", [x2, c(0.044715)])])])
        t = ctx.op("Tanh", [inner])
        dinner = ctx.op("Mul", [c(k), ctx.op("Add", [c(1.0), ctx.op("Mul", [x2, c(3 * 0.044715)])])])
        sech2 = ctx.op("Sub", [c(1.0), ctx.op("Mul", [t, t])])
        d = ctx.op("Add", [ctx.op("Mul", [ctx.op("Add", [c(1.0), t]), c(0.5)]),
                           ctx.op("Mul", [ctx.op("Mul", [ctx.op("Mul", [x, c(0.5)]), sech2]), dinner])])
    else:
        cdf = ctx.op("Mul", [ctx.op("Add", [ctx.op("Erf", [ctx.op("Mul", [x, c(1.0 / np.sqrt(2.0))])]), c(1.0)]),
                             c(0.5)])
        pdf = ctx.op("Mul", [ctx.op("Exp", [ctx.op("Mul", [ctx.op("Mul", [x, x]), c(-0.5)])]),
                             c(1.0 / np.sqrt(2.0 * np.pi))])
        d = ctx.op("Add", [cdf, ctx.op("Mul", [x, pdf])])
    return [ctx.op("Mul", [gy[0], d])]


@vjp_rule("Mish")
def mish(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x tanh(softplus(x)): gx = gy * (t + x (1 - t^2) sigmoid(x)), t = tanh(softplus(x)) recomputed."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    t = ctx.op("Tanh", [ctx.op("Softplus", [x])])
    sech2 = ctx.op("Sub", [ctx.const(1.0, like=y), ctx.op("Mul", [t, t])])
    d = ctx.op("Add", [t, ctx.op("Mul", [ctx.op("Mul", [x, sech2]), ctx.op("Sigmoid", [x])])])
    return [ctx.op("Mul", [gy[0], d])]


@vjp_rule("Softsign")
def softsign(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x / (1 + |x|): gx = gy / (1 + |x|)^2."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    den = ctx.op("Add", [ctx.const(1.0, like=y), ctx.op("Abs", [x])])
    return [ctx.op("Div", [gy[0], ctx.op("Mul", [den, den])])]


@vjp_rule("Celu")
def celu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = max(0, x) + min(0, a(e^(x/a) - 1)): gx = gy * (1 if x > 0 else y/a + 1)."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    a = float(ctx.attr("alpha", 1.0))
    neg = ctx.op("Add", [ctx.op("Mul", [y, ctx.const(1.0 / a, like=y)]), ctx.const(1.0, like=y)])
    return [ctx.op("Mul", [gy[0], _select(ctx, _positive(ctx, x), ctx.const(1.0, like=y), neg)])]


@vjp_rule("ThresholdedRelu")
def thresholded_relu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x if x > a else 0: gx = gy * [x > a]."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    a = float(ctx.attr("alpha", 1.0))
    return [ctx.op("Mul", [gy[0], _mask(ctx, ctx.op("Greater", [x, ctx.const(a, like=y)]), y)])]


@vjp_rule("Shrink")
def shrink(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x -+ bias outside [-lambd, lambd], 0 inside: gx = gy * [|x| > lambd]."""
    x, y = ctx.inputs[0], ctx.outputs[0]
    lam = float(ctx.attr("lambd", 0.5))
    outside = ctx.op("Or", [ctx.op("Greater", [x, ctx.const(lam, like=x)]),
                            ctx.op("Less", [x, ctx.const(-lam, like=x)])])
    return [ctx.op("Mul", [gy[0], _mask(ctx, outside, y)])]
