"""Backward pieces that let ONNX Runtime's CPU build keep the backward in its blocked layout.

ORT's CPU execution provider runs 2-D convolutions in a channel-blocked layout
(NCHWc).  A tensor stays blocked only while its consumers are convolutions,
pools, Relu/Sigmoid/Tanh, or Add/Sum/Mul of blocked tensors whose shapes it can
prove equal; any other consumer (Greater, Cast, Expand, ConvTranspose, ...)
costs a full conversion back (``ReorderOutput``) and another one into the next
convolution (``ReorderInput``).  In a backward pass every activation mask sits
between two convolutions, so a Greater/Cast mask costs three conversions per
layer: measured on ResNet-50 they took as long as the masks themselves, and the
residual gradient sums fell out of the blocked layout for good.

Three pieces, all depthwise 1x1 convolutions (which ORT blocks, fusing a Clip):

* :func:`step` gives ``[a*t + b > 0]`` as ``Clip((a*t + b) * 2^k, 0, 1)``.  With
  ``k`` large enough that the smallest positive value ``a*t + b`` can take,
  times ``2^k``, reaches 1, this is the exact 0/1 step; power-of-two scales
  add no rounding.  For ``[t > 0]`` the smallest positive float32 is a
  subnormal (``2^-149``), beyond any float32 scale, so ``k = 126`` covers every
  normal float and a positive subnormal ``t`` (below 1.2e-38) gets the partial
  mask ``t * 2^126`` instead of 1.
* :func:`ramp` is ``Clip(a*t + b, lo, hi)``, a piecewise-linear slope (HardSwish's).
* :func:`bridge` is an exact identity (unit weights, no bias) that moves a
  gradient made by a non-blocked op (ConvTranspose, Expand) into the blocked
  layout, so the sums and masks downstream of it stay blocked.

ORT blocks a convolution only when the channel count is a multiple of its block
size, so all three apply to float32 rank-4 tensors with a static channel count that
is a multiple of 8 (the smallest block size); elsewhere callers keep the plain
form.  On other execution providers each costs one light elementwise pass,
like the ops it replaces.  The autodiff declares every gradient's shape (equal
to its tensor's) so ORT can prove the Mul/Add operands equal-shaped.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import TensorProto

from ..autodiff import RuleContext

BLOCK = 8
_F32_MAX = float(np.finfo(np.float32).max)


def channels(ctx: RuleContext, t: str) -> Optional[int]:
    """Static channel count of a float32 NCHW tensor that ORT could block, else None."""
    if ctx.elem_type(t) != TensorProto.FLOAT:
        return None
    shp = ctx.shape(t)
    if shp is None or len(shp) != 4 or shp[1] is None or shp[1] % BLOCK:
        return None
    return int(shp[1])


def _depthwise(ctx: RuleContext, t: str, c: int, weight: float, bias: float = 0.0) -> str:
    w = ctx.const(np.full((c, 1, 1, 1), weight, np.float32))
    inputs = [t, w]
    if bias:
        inputs.append(ctx.const(np.full((c,), bias, np.float32)))
    return ctx.op("Conv", inputs, kernel_shape=[1, 1], group=c)


def _scale_exponent(gap: float) -> int:
    """Smallest k with gap * 2^k >= 1 (k <= 126 keeps 2^k a normal float32)."""
    return min(126, int(np.ceil(-np.log2(gap))))


def step(ctx: RuleContext, t: str, c: int, *, sign: float = 1.0, at: float = 0.0,
         height: float = 1.0) -> Optional[str]:
    """``height * [sign * (t - at) > 0]`` as float32, blocked; None when no exact scale exists.

    ``gap`` is the distance from ``at`` to the nearest float32 on the positive
    side; every ``t`` with ``sign*(t - at) > 0`` is at least that far, so a scale
    of ``1/gap`` lifts it to 1 or more (rounding cannot push it below a
    representable 1).  A product that overflows to +-inf still clips to 1 or 0;
    only the bias ``-sign*at*2^k`` must stay finite.  A ``height`` of at most 1
    is the Clip's upper bound, so a scaled step costs nothing more.
    """
    at32 = np.float32(at)
    nxt = np.nextafter(at32, np.float32(np.inf if sign > 0 else -np.inf))
    gap = abs(float(nxt) - float(at32))
    k = _scale_exponent(gap)
    s = float(2.0 ** k)
    if abs(at) * s >= _F32_MAX / 4:
        return None
    z = _depthwise(ctx, t, c, sign * s, -sign * at * s)
    return ctx.op("Clip", [z, ctx.const(0.0, like=t), ctx.const(height, like=t)])


def ramp(ctx: RuleContext, t: str, c: int, scale: float, offset: float, lo: float, hi: float) -> str:
    """``Clip(scale * t + offset, lo, hi)`` as one blocked depthwise convolution with a fused Clip."""
    return ctx.op("Clip", [_depthwise(ctx, t, c, scale, offset), ctx.const(lo, like=t), ctx.const(hi, like=t)])


def bridge(ctx: RuleContext, g: str) -> str:
    """``g`` unchanged, but produced by a convolution ORT can block (see the module docstring)."""
    c = channels(ctx, g)
    return g if c is None else _depthwise(ctx, g, c, 1.0)
