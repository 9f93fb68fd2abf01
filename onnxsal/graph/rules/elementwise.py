"""VJP rules for elementwise arithmetic (numpy broadcasting) and pass-through ops.

Notation: ``gy`` is the upstream gradient dL/dy, ``gx`` = dL/dx.  Broadcast
inputs get their gradient summed back to their own shape (``unbroadcast``),
which emits nothing when no broadcasting happened.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ..autodiff import FLOAT_TYPES, RuleContext, vjp_rule

Grads = list  # list[str | None]


def _const_or_none(ctx: RuleContext, name: str) -> Optional[np.ndarray]:
    return ctx.const_value(name)


@vjp_rule("Identity", "Dropout")
def identity(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x (Dropout at inference too): gx = gy."""
    return [gy[0]] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("Add")
def add(ctx: RuleContext, gy: Grads) -> Grads:
    """y = a + b: ga = unbroadcast(gy), gb = unbroadcast(gy)."""
    g = gy[0]
    a, b = ctx.inputs
    return [ctx.unbroadcast(g, a) if ctx.needs_grad(0) else None,
            ctx.unbroadcast(g, b) if ctx.needs_grad(1) else None]


@vjp_rule("Sub")
def sub(ctx: RuleContext, gy: Grads) -> Grads:
    """y = a - b: ga = unbroadcast(gy), gb = -unbroadcast(gy) (negate after reducing: fewer elements)."""
    g = gy[0]
    a, b = ctx.inputs
    ga = ctx.unbroadcast(g, a) if ctx.needs_grad(0) else None
    gb = ctx.op("Neg", [ctx.unbroadcast(g, b)]) if ctx.needs_grad(1) else None
    return [ga, gb]


@vjp_rule("Mul")
def mul(ctx: RuleContext, gy: Grads) -> Grads:
    """y = a * b: ga = unbroadcast(gy * b), gb = unbroadcast(gy * a)."""
    g = gy[0]
    a, b = ctx.inputs
    ga = ctx.unbroadcast(_scaled(ctx, g, b), a) if ctx.needs_grad(0) else None
    gb = ctx.unbroadcast(_scaled(ctx, g, a), b) if ctx.needs_grad(1) else None
    return [ga, gb]


def _scaled(ctx: RuleContext, g: str, factor: str) -> str:
    """g * factor, skipping the multiplication by a constant 1."""
    v = ctx.const_value(factor)
    if v is not None and v.size >= 1 and np.all(v == 1) and v.ndim == 0:
        return g
    return ctx.op("Mul", [g, factor])


@vjp_rule("Div")
def div(ctx: RuleContext, gy: Grads) -> Grads:
    """y = a / b: ga = unbroadcast(gy / b), gb = -unbroadcast(gy * y / b).

    A constant divisor becomes a precomputed reciprocal (Mul is cheaper than
    Div); a dynamic one is inverted once, at its own (often small) size.
    """
    g = gy[0]
    a, b = ctx.inputs
    y = ctx.outputs[0]
    bv = ctx.const_value(b)
    if bv is not None:
        rb = ctx.const((1.0 / bv.astype(np.float64)), like=y)
    else:
        rb = ctx.op("Reciprocal", [b])
    t = ctx.op("Mul", [g, rb])
    ga = ctx.unbroadcast(t, a) if ctx.needs_grad(0) else None
    gb = None
    if ctx.needs_grad(1):
        gb = ctx.op("Neg", [ctx.unbroadcast(ctx.op("Mul", [t, y]), b)])
    return [ga, gb]


@vjp_rule("Neg")
def neg(ctx: RuleContext, gy: Grads) -> Grads:
    """y = -x: gx = -gy."""
    return [ctx.op("Neg", [gy[0]])]


@vjp_rule("Exp")
def exp(ctx: RuleContext, gy: Grads) -> Grads:
    """y = exp(x): gx = gy * y (reuses the forward output)."""
    return [ctx.op("Mul", [gy[0], ctx.outputs[0]])]


@vjp_rule("Log")
def log(ctx: RuleContext, gy: Grads) -> Grads:
    """y = log(x): gx = gy / x."""
    return [ctx.op("Div", [gy[0], ctx.inputs[0]])]


@vjp_rule("Sqrt")
def sqrt(ctx: RuleContext, gy: Grads) -> Grads:
    """y = sqrt(x): gx = gy * 0.5 / y."""
    y = ctx.outputs[0]
    return [ctx.op("Div", [ctx.op("Mul", [gy[0], ctx.const(0.5, like=y)]), y])]


@vjp_rule("Reciprocal")
def reciprocal(ctx: RuleContext, gy: Grads) -> Grads:
    """y = 1/x: gx = -gy * y^2."""
    y = ctx.outputs[0]
    return [ctx.op("Neg", [ctx.op("Mul", [gy[0], ctx.op("Mul", [y, y])])])]


@vjp_rule("Abs")
def abs_(ctx: RuleContext, gy: Grads) -> Grads:
    """y = |x|: gx = gy * sign(x)."""
    return [ctx.op("Mul", [gy[0], ctx.op("Sign", [ctx.inputs[0]])])]


@vjp_rule("Pow")
def pow_(ctx: RuleContext, gy: Grads) -> Grads:
    """y = a^p: ga = gy * p * a^(p-1); gp = gy * y * ln(a) (only if p is differentiable).

    Common constant exponents get cheap forms: p=2 -> 2a, p=0.5 -> 0.5/y, p=1 -> 1.
    """
    g = gy[0]
    a, p = ctx.inputs
    y = ctx.outputs[0]
    ga = gp = None
    if ctx.needs_grad(0):
        pv = ctx.const_value(p)
        if pv is not None and pv.size == 1:
            e = float(pv.reshape(-1)[0])
            if e == 1.0:
                local = None
            elif e == 2.0:
                local = ctx.op("Mul", [a, ctx.const(2.0, like=y)])
            elif e == 0.5:
                local = ctx.op("Div", [ctx.const(0.5, like=y), y])
            elif e == 0.0:
                return [ctx.zeros_like(a), None]
            else:
                local = ctx.op("Mul", [ctx.op("Pow", [a, ctx.const(e - 1.0, like=y)]), ctx.const(e, like=y)])
            ga = g if local is None else ctx.op("Mul", [g, local])
        else:
            pf = p if ctx.elem_type(p) == ctx.elem_type(y) else ctx.op("Cast", [p], to=ctx.elem_type(y))
            pm1 = ctx.op("Sub", [pf, ctx.const(1.0, like=y)])
            local = ctx.op("Mul", [ctx.op("Pow", [a, pm1]), pf])
            ga = ctx.op("Mul", [g, local])
        ga = ctx.unbroadcast(ga, a)
    if ctx.needs_grad(1):
        gp = ctx.unbroadcast(ctx.op("Mul", [ctx.op("Mul", [g, y]), ctx.op("Log", [a])]), p)
    return [ga, gp]


@vjp_rule("Erf")
def erf(ctx: RuleContext, gy: Grads) -> Grads:
    """y = erf(x): gx = gy * 2/sqrt(pi) * exp(-x^2)."""
    x = ctx.inputs[0]
    y = ctx.outputs[0]
    e = ctx.op("Exp", [ctx.op("Mul", [ctx.op("Mul", [x, x]), ctx.const(-1.0, like=y)])])
    return [ctx.op("Mul", [gy[0], ctx.op("Mul", [e, ctx.const(2.0 / math.sqrt(math.pi), like=y)])])]


@vjp_rule("Cast")
def cast(ctx: RuleContext, gy: Grads) -> Grads:
    """y = cast(x): gx = cast(gy) back to x's float type (no gradient through integer casts)."""
    x = ctx.inputs[0]
    et = ctx.elem_type(x)
    if et not in FLOAT_TYPES:
        return [None]
    if et == ctx.elem_type(ctx.outputs[0]):
        return [gy[0]]
    return [ctx.op("Cast", [gy[0]], to=et)]


@vjp_rule("Sum")
def sum_(ctx: RuleContext, gy: Grads) -> Grads:
    """y = sum_i x_i (broadcasting): gx_i = unbroadcast(gy)."""
    return [ctx.unbroadcast(gy[0], x) if ctx.needs_grad(i) else None for i, x in enumerate(ctx.inputs)]


@vjp_rule("Mean")
def mean(ctx: RuleContext, gy: Grads) -> Grads:
    """y = (1/n) sum_i x_i: gx_i = unbroadcast(gy / n)."""
    g = ctx.op("Mul", [gy[0], ctx.const(1.0 / len(ctx.inputs), like=ctx.outputs[0])])
    return [ctx.unbroadcast(g, x) if ctx.needs_grad(i) else None for i, x in enumerate(ctx.inputs)]


@vjp_rule("Max", "Min")
def max_min(ctx: RuleContext, gy: Grads) -> Grads:
    """y = max_i x_i (or min): gx_i = unbroadcast(gy * [x_i == y] / #ties).

    Tied inputs share the gradient equally, as in PyTorch's maximum/minimum, so the gradients
    still sum to gy; with one input the rule is the identity.
    """
    y = ctx.outputs[0]
    if len(ctx.inputs) == 1:
        return [gy[0]]
    masks = [ctx.op("Cast", [ctx.op("Equal", [x, y])], to=ctx.elem_type(y)) for x in ctx.inputs]
    share = ctx.op("Div", [gy[0], ctx.op("Sum", masks)])
    return [ctx.unbroadcast(ctx.op("Mul", [share, m]), x) if ctx.needs_grad(i) else None
            for i, (x, m) in enumerate(zip(ctx.inputs, masks))]


@vjp_rule("Where")
def where(ctx: RuleContext, gy: Grads) -> Grads:
    """y = where(c, a, b): ga = unbroadcast(gy * c), gb = unbroadcast(gy * (1 - c))."""
    c, a, b = ctx.inputs
    y = ctx.outputs[0]
    g = gy[0]
    ga = gb = None
    if ctx.needs_grad(1):
        m = ctx.op("Cast", [c], to=ctx.elem_type(y))
        ga = ctx.unbroadcast(ctx.op("Mul", [g, m]), a)
    if ctx.needs_grad(2):
        m = ctx.op("Cast", [ctx.op("Not", [c])], to=ctx.elem_type(y))
        gb = ctx.unbroadcast(ctx.op("Mul", [g, m]), b)
    return [None, ga, gb]


@vjp_rule("Mod")
def mod(ctx: RuleContext, gy: Grads) -> Grads:
    """y = fmod(a, b) = a - b * trunc(a / b) (a float Mod has ``fmod=1``; torch.fmod): ga = gy,
    gb = -gy * trunc(a / b), as PyTorch's fmod backward.

    The quotient is read back from the forward output, q = round((a - y) / b): a / b computed
    again may round across an integer (0.3 / 0.1 is 2.9999999999999996), and the q that made y
    is the one whose derivative it is.
    """
    a, b = ctx.inputs
    g = gy[0]
    ga = ctx.unbroadcast(g, a) if ctx.needs_grad(0) else None
    gb = None
    if ctx.needs_grad(1):
        q = ctx.op("Round", [ctx.op("Div", [ctx.op("Sub", [a, ctx.outputs[0]]), b])])
        gb = ctx.op("Neg", [ctx.unbroadcast(ctx.op("Mul", [g, q]), b)])
    return [ga, gb]


@vjp_rule("Sin")
def sin(ctx: RuleContext, gy: Grads) -> Grads:
    """y = sin(x): gx = gy * cos(x)."""
    return [ctx.op("Mul", [gy[0], ctx.op("Cos", [ctx.inputs[0]])])]


@vjp_rule("Cos")
def cos(ctx: RuleContext, gy: Grads) -> Grads:
    """y = cos(x): gx = -gy * sin(x)."""
    return [ctx.op("Neg", [ctx.op("Mul", [gy[0], ctx.op("Sin", [ctx.inputs[0]])])])]


def _scaled(ctx: RuleContext, g: str, factor: str, divide: bool = False, negate: bool = False) -> str:
    out = ctx.op("Div" if divide else "Mul", [g, factor])
    return ctx.op("Neg", [out]) if negate else out


@vjp_rule("Tan")
def tan(ctx: RuleContext, gy: Grads) -> Grads:
    """y = tan(x): gx = gy (1 + y^2)."""
    y = ctx.outputs[0]
    return [_scaled(ctx, gy[0], ctx.op("Add", [ctx.op("Mul", [y, y]), ctx.const(1.0, like=y)]))]


@vjp_rule("Sinh", "Cosh")
def sinh_cosh(ctx: RuleContext, gy: Grads) -> Grads:
    """y = sinh(x): gx = gy cosh(x); y = cosh(x): gx = gy sinh(x)."""
    other = "Cosh" if ctx.node.op_type == "Sinh" else "Sinh"
    return [_scaled(ctx, gy[0], ctx.op(other, [ctx.inputs[0]]))]


@vjp_rule("Atan", "Asin", "Acos", "Asinh", "Acosh", "Atanh")
def inverse_trig(ctx: RuleContext, gy: Grads) -> Grads:
    """The inverse functions: gx = gy / d, with d = 1 + x^2 (Atan), sqrt(1 - x^2) (Asin; Acos
    negated), sqrt(x^2 + 1) (Asinh), sqrt(x^2 - 1) (Acosh), 1 - x^2 (Atanh)."""
    x, op = ctx.inputs[0], ctx.node.op_type
    sq, one = ctx.op("Mul", [x, x]), ctx.const(1.0, like=x)
    d = {"Atan": lambda: ctx.op("Add", [sq, one]),
         "Asin": lambda: ctx.op("Sqrt", [ctx.op("Sub", [one, sq])]),
         "Acos": lambda: ctx.op("Sqrt", [ctx.op("Sub", [one, sq])]),
         "Asinh": lambda: ctx.op("Sqrt", [ctx.op("Add", [sq, one])]),
         "Acosh": lambda: ctx.op("Sqrt", [ctx.op("Sub", [sq, one])]),
         "Atanh": lambda: ctx.op("Sub", [one, sq])}[op]()
    return [_scaled(ctx, gy[0], d, divide=True, negate=op == "Acos")]


@vjp_rule("Sign", "Floor", "Ceil", "Round", "Hardmax")
def piecewise_constant(ctx: RuleContext, gy: Grads) -> Grads:
    """Piecewise constant: the derivative is 0 wherever it exists, as in training frameworks."""
    return [ctx.zeros_like(ctx.inputs[0])]
