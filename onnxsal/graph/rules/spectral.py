"""VJP rule for DFT (``torch.fft`` in a dynamo export: global filter layers, Fourier convolutions).

A DFT is linear, so its gradient is its adjoint applied to the output's gradient, with a
complex number's real and imaginary parts read as two real numbers (as PyTorch does). The adjoint
of ``y = F x`` is ``F^H g``, and ``F^H = N * IDFT``: the backward is one more DFT the other way,
scaled. The variants change what lies around it:

* a real input (last axis 1) takes the real part of the result;
* a one-sided spectrum (RFFT) holds the first ``N // 2 + 1`` bins only: the bins it leaves out
  are no outputs, so their gradient is zero (padding, not the conjugate symmetry);
* ``dft_length`` pads the signal with zeros or cuts it first: the gradient is cut or padded back;
* the IRFFT (``onesided`` with ``inverse``) builds a real signal from the bins and their mirror
  images: each bin between the first and the Nyquist one counts twice, so its gradient is the
  RFFT of ``g`` times ``2 / N``, and ``1 / N`` at those two (whose imaginary parts the forward
  ignores, and the RFFT of a real ``g`` is real there).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ...errors import UnsupportedOpError
from ..autodiff import RuleContext, vjp_rule

Grads = list


def _unsupported(ctx: RuleContext, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(ctx.node.op_type, ctx.node.name, f"({why})")


def _axis(ctx: RuleContext, rank: int) -> int:
    """The transformed axis: an attribute before opset 20 (default 1), a constant input since (-2)."""
    if ctx.opset < 20:
        axis = int(ctx.attr("axis", 1))
    else:
        given = ctx.inputs[2] if len(ctx.inputs) > 2 and ctx.inputs[2] else None
        v = ctx.const_value(given) if given else np.array(-2)
        if v is None:
            raise _unsupported(ctx, "axis computed at run time")
        axis = int(np.asarray(v).reshape(-1)[0])
    return axis + rank if axis < 0 else axis


def _length(ctx: RuleContext) -> Optional[int]:
    given = ctx.inputs[1] if len(ctx.inputs) > 1 and ctx.inputs[1] else None
    if given is None:
        return None
    v = ctx.const_value(given)
    if v is None:
        raise _unsupported(ctx, "dft_length computed at run time")
    return int(np.asarray(v).reshape(-1)[0])


def _dft(ctx: RuleContext, g: str, axis: int, inverse: int, onesided: int = 0) -> str:
    """A DFT of ``g`` over ``axis`` in the model's opset form, at g's own length."""
    if ctx.opset < 20:
        return ctx.op("DFT", [g], axis=axis, inverse=inverse, onesided=onesided)
    return ctx.op("DFT", [g, "", ctx.const(np.array(axis, np.int64))], inverse=inverse, onesided=onesided)


def _resized(ctx: RuleContext, g: str, rank: int, axis: int, have: int, want: int) -> str:
    """``g`` cut to, or padded with zeros at the end up to, ``want`` entries along ``axis``."""
    if want < have:
        return ctx.op("Slice", [g, ctx.const([0]), ctx.const([want]), ctx.const([axis])])
    if want > have:
        pads = [0] * (2 * rank)
        pads[rank + axis] = want - have
        return ctx.op("Pad", [g, ctx.const(np.array(pads, np.int64))], mode="constant")
    return g


def _scaled(ctx: RuleContext, g: str, factor) -> str:
    return ctx.op("Mul", [g, ctx.const(np.asarray(factor, np.float64), like=g)])


@vjp_rule("DFT")
def dft(ctx: RuleContext, gy: Grads) -> Grads:
    """y = DFT(x) over one axis (forward or inverse, one-sided or not, any length): gx is the
    adjoint transform of gy; see the module's docstring."""
    x = ctx.inputs[0]
    shape = ctx.shape(x)
    if shape is None:
        raise _unsupported(ctx, f"rank of {x!r} unknown")
    rank = len(shape)
    axis = _axis(ctx, rank)
    have = shape[axis]
    if have is None:
        raise _unsupported(ctx, "signal length known only at run time")
    inverse, onesided = int(ctx.attr("inverse", 0)), int(ctx.attr("onesided", 0))
    g = gy[0]
    if onesided and inverse:                         # IRFFT: complex bins in, a real signal out
        n = _length(ctx) or 2 * (have - 1)
        if have != n // 2 + 1:
            raise _unsupported(ctx, f"an inverse one-sided DFT of {have} bins to {n} samples")
        weights = np.full(have, 2.0 / n)
        weights[0] = 1.0 / n
        if n % 2 == 0:
            weights[-1] = 1.0 / n
        spectrum = _dft(ctx, g, axis, inverse=0, onesided=1)
        return [_scaled(ctx, spectrum, weights.reshape([-1] + [1] * (rank - 1 - axis)))] + [None] * (len(ctx.inputs) - 1)
    n = _length(ctx) or have
    if onesided:                                     # the bins past N // 2 are no outputs
        g = _resized(ctx, g, rank, axis, n // 2 + 1, n)
    back = _dft(ctx, g, axis, inverse=1 - inverse)
    gx = _scaled(ctx, back, float(n) if not inverse else 1.0 / n)
    if shape[-1] == 1:                               # a real signal: the real part
        gx = ctx.op("Slice", [gx, ctx.const([0]), ctx.const([1]), ctx.const([rank - 1])])
    return [_resized(ctx, gx, rank, axis, n, have)] + [None] * (len(ctx.inputs) - 1)
