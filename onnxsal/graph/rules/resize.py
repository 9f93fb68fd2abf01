"""VJP rule for Resize (nearest, linear, cubic), by separable interpolation matrices.

Every Resize mode (antialiased or not) is separable and linear in ``x``: along each
resized axis ``i`` it multiplies by a fixed ``(m_i, n_i)`` matrix ``A_i``
(output size by input size), ``y = x x_1 A_1 x_2 A_2 ...``.  The adjoint is
``dx = dy x_1 A_1^T x_2 A_2^T ...``: one MatMul per resized axis with a
constant matrix.  This is exact for every coordinate transformation mode,
non-integer scales, downscaling and ``align_corners`` edges at once.

Where the matrices come from.  Nearest-neighbour rounding makes ``A`` depend
on the last bit of the runtime's float arithmetic (ORT's CPU kernel and a
float32 replay of the ONNX formulas disagree on a few exact half-way ties
for non-integer ratios).  So the matrix is computed BY THE RUNTIME, in the
graph: ``A = Resize(I_n)`` with the forward's own mode, transformation and
rounding attributes and the axis's scale (or size), applied to the identity
matrix along the one axis.  Its inputs are constants, so ORT folds it once at
session creation; the backward pass only sees a constant MatMul.  The numpy
replay (:func:`interpolation_matrix`) is kept for what must be known at build
time: recognising the block structure below, and axes whose length does not
change (a same-shape Resize of ``I_n`` would be short-cut to a copy).

Block fast path.  Nearest upsampling by an integer factor ``f`` in which every
input pixel owns a contiguous block of exactly ``f`` outputs (``A =
kron(I, 1_f)``; e.g. ``asymmetric`` with ``floor``, PyTorch's ``nearest``,
or the ONNX default ``half_pixel`` with ``round_prefer_floor`` for even
``f``) has a cheaper adjoint: reshape
``dy`` to ``(..., n, f)`` and sum each block.  For an integer factor the float32
replay is exact (every rounding-critical coordinate is a representable
multiple of 1/2, so division rounds to it exactly), so the structure read off
the numpy matrix is the runtime's.

Static input and output sizes of the resized axes are required (they are,
after onnxsal's normalisation, for image models of a fixed input size).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from onnx import TensorProto

from ...errors import UnsupportedOpError
from ..autodiff import RuleContext, vjp_rule

F32 = np.float32


def _source_coords(o: np.ndarray, scale: float, n_in: int, n_out: int, mode: str) -> np.ndarray:
    """Input coordinate of each output index ``o`` (float32 arithmetic, as in ORT)."""
    o = o.astype(F32)
    s = F32(scale)
    half = F32(0.5)
    if mode == "half_pixel":
        return (o + half) / s - half
    if mode == "pytorch_half_pixel":
        return (o + half) / s - half if n_out > 1 else np.zeros_like(o)
    if mode == "asymmetric":
        return o / s
    if mode == "tf_half_pixel_for_nearest":
        return (o + half) / s
    if mode == "align_corners":
        if n_out == 1:
            return np.zeros_like(o)
        return o * F32(n_in - 1) / F32(n_out - 1)
    if mode == "half_pixel_symmetric":
        # float32 for the offset, then the rest in double (ORT's literal 0.5 is a double).
        adjustment = F32(n_out) / (s * F32(n_in))
        center = F32(n_in) / F32(2)
        offset = center * (F32(1) - adjustment)
        return (np.float64(offset) + (o.astype(np.float64) + 0.5) / np.float64(s) - 0.5).astype(F32)
    raise ValueError(mode)


def _round_half_away(v: np.ndarray) -> np.ndarray:
    return np.sign(v) * np.floor(np.abs(v) + 0.5)


def _nearest_index(x: np.ndarray, nearest_mode: str) -> np.ndarray:
    """Index picked by ``nearest_mode`` (C++ ``std::round`` rounds halves away from zero)."""
    if nearest_mode == "round_prefer_floor":
        trunc = np.trunc(x)
        is_half = x == trunc + F32(0.5)
        return np.where(is_half, trunc, _round_half_away(x)).astype(np.int64)
    if nearest_mode == "round_prefer_ceil":
        return _round_half_away(x).astype(np.int64)
    if nearest_mode == "floor":
        return np.floor(x).astype(np.int64)
    if nearest_mode == "ceil":
        return np.ceil(x).astype(np.int64)
    raise ValueError(nearest_mode)


def _cubic_coeffs(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic weights for taps at offsets -1, 0, 1, 2 from ``floor(x)``; ``t = x - floor(x)``."""
    a = F32(a)
    s1, s0, s2, s3 = t + 1, t, 1 - t, 2 - t
    c0 = ((a * s1 - 5 * a) * s1 + 8 * a) * s1 - 4 * a
    c1 = ((a + 2) * s0 - (a + 3)) * s0 * s0 + 1
    c2 = ((a + 2) * s2 - (a + 3)) * s2 * s2 + 1
    c3 = ((a * s3 - 5 * a) * s3 + 8 * a) * s3 - 4 * a
    return np.stack([c0, c1, c2, c3], axis=1).astype(F32)


def interpolation_matrix(n_in: int, n_out: int, scale: float, mode: str, ctm: str,
                         nearest_mode: str = "round_prefer_floor", cubic_a: float = -0.75,
                         exclude_outside: int = 0) -> np.ndarray:
    """The ``(n_out, n_in)`` matrix ``A`` of one axis: ``y[o] = sum_i A[o, i] x[i]``.

    * nearest: one 1 per row at the index ``nearest_mode`` picks, clamped to the input;
    * linear: source coordinate clamped to ``[0, n-1]``, weights ``1 - t`` and ``t``
      on ``floor`` and ``floor + 1`` (the upper tap clamped, so edges weigh 1);
    * cubic: Keys weights on four taps, out-of-range taps clamped to the edge, or
      dropped and the row renormalised with ``exclude_outside``.

    A scale of exactly 1 on an axis of unchanged length is the identity (ORT
    skips the coordinate transform there).
    """
    o = np.arange(n_out)
    a = np.zeros((n_out, n_in), np.float64)
    if scale == 1.0 and n_in == n_out:
        return np.eye(n_in)
    x = _source_coords(o, scale, n_in, n_out, ctm)
    if mode == "nearest":
        idx = np.clip(_nearest_index(x, nearest_mode), 0, n_in - 1)
        a[o, idx] = 1.0
    elif mode == "linear":
        xc = np.clip(x, F32(0), F32(n_in - 1))
        lo = np.minimum(xc.astype(np.int64), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        t = (xc - lo.astype(F32)).astype(np.float64)
        np.add.at(a, (o, lo), 1.0 - t)
        np.add.at(a, (o, hi), t)
    elif mode == "cubic":
        fl = np.floor(x)
        w = _cubic_coeffs((x - fl).astype(F32), cubic_a).astype(np.float64)
        taps = fl.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
        if exclude_outside:
            w = np.where((taps >= 0) & (taps < n_in), w, 0.0)
            w = w / w.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, n_in - 1)
        for j in range(4):
            np.add.at(a, (o, taps[:, j]), w[:, j])
    else:
        raise ValueError(mode)
    return a


def _block_factor(a: np.ndarray) -> Optional[int]:
    """``f`` if ``a == kron(I_n, ones((f, 1)))`` (each input repeated ``f`` times in order), else None."""
    m, n = a.shape
    if m % n or m == n:
        return None
    f = m // n
    return f if np.array_equal(a, np.kron(np.eye(n), np.ones((f, 1)))) else None


def _scales(ctx: RuleContext, in_shape: tuple, out_shape: Optional[tuple]
            ) -> tuple[list[float], list[Optional[int]], bool]:
    """Per-axis (scale, output size) as the runtime uses them, and whether sizes drove them.

    Given ``scales``, the transform uses those values and the output size is
    ``floor(n * scale)``; given ``sizes``, the scale is ``float32(m) / float32(n)``.
    Scales computed from constants (a float16 file's, behind a Cast) count as
    constants. When neither is known the statically inferred output shape
    stands in for ``sizes``: exact for sizes-driven resizes and for scales
    computed at run time as output over input size (torch.onnx's ``size=`` at
    opsets 9 and 10), a reading of the ratio for any other scale.
    """
    rank = len(in_shape)
    axes = ctx.attr("axes")
    axes = list(range(rank)) if not axes else [int(a) % rank for a in axes]
    sc = ctx.const_value(ctx.inputs[2]) if len(ctx.inputs) > 2 and ctx.inputs[2] else None
    sz = ctx.const_value(ctx.inputs[3]) if len(ctx.inputs) > 3 and ctx.inputs[3] else None
    scales = [1.0] * rank
    sizes = list(in_shape)
    if sc is not None and sc.size > 0:
        for a, s in zip(axes, sc.astype(F32).ravel()):
            scales[a] = float(s)
            if in_shape[a] is not None:
                sizes[a] = int(np.floor(in_shape[a] * F32(s)))
        if out_shape is not None:
            sizes = [o if o is not None else s for o, s in zip(out_shape, sizes)]
        return scales, sizes, False
    if sz is not None and sz.size > 0:
        policy = ctx.attr("keep_aspect_ratio_policy", "stretch") or "stretch"
        if policy != "stretch":
            raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                     f"(keep_aspect_ratio_policy={policy!r} is not supported)")
        for a, m in zip(axes, sz.ravel()):
            sizes[a] = int(m)
    elif out_shape is not None:
        sizes = [o if o is not None else i for o, i in zip(out_shape, in_shape)]
    else:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(output size unknown at build time)")
    for a in range(rank):
        if sizes[a] is not None and in_shape[a] is not None and sizes[a] != in_shape[a]:
            scales[a] = float(F32(sizes[a]) / F32(in_shape[a]))
    return scales, sizes, True


def _runtime_matrix(ctx: RuleContext, n: int, m: int, scale: float, by_sizes: bool, transpose: bool,
                    like: str) -> str:
    """``A`` (``(m, n)``), or ``A^T`` when ``transpose``, as the runtime's own Resize of ``I_n``.

    The identity is resized along axis 0 (giving ``A``: row ``o`` holds the
    weights of output ``o``) or along axis 1 (giving ``A^T``), with the
    forward's attributes and this axis's scale or size; the other axis keeps
    scale 1, which every mode maps to the identity.
    """
    attrs = {a.name: ctx.attr(a.name) for a in ctx.node.attribute
             if a.name not in ("axes", "keep_aspect_ratio_policy")}
    eye = ctx.const(np.eye(n, dtype=np.float32), dtype=np.float32)
    if by_sizes:
        sizes = [n, m] if transpose else [m, n]
        ins = [eye, "", "", ctx.const(np.asarray(sizes, np.int64))]
    else:
        scales = [1.0, scale] if transpose else [scale, 1.0]
        ins = [eye, "", ctx.const(np.asarray(scales, np.float32), dtype=np.float32)]
    mat = ctx.op("Resize", ins, **attrs)
    et = ctx.elem_type(like)
    if et not in (TensorProto.FLOAT, TensorProto.UNDEFINED):
        mat = ctx.op("Cast", [mat], to=et)
    return mat


@vjp_rule("Resize")
def resize(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = dy x_i A_i^T`` over the resized axes (see the module docstring).

    Last axis: ``MatMul(g, A)`` maps ``(..., m)`` to ``(..., n)``; second-last:
    ``MatMul(A^T, g)`` maps ``(..., m, W)`` to ``(..., n, W)``; any other axis is
    transposed to the end first.  A Resize whose output shape equals its input
    shape is a copy (ORT short-cuts it), so its gradient is ``dy`` itself.
    ``antialias=1`` (linear/cubic) is covered by the runtime-built matrices,
    since the antialiasing filter is separable too.  Refused:
    ``tf_crop_and_resize`` (roi-dependent) and aspect-ratio policies other than
    ``stretch``.
    """
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return res
    x = ctx.inputs[0]
    mode = ctx.attr("mode", "nearest") or "nearest"
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel") or "half_pixel"
    nearest_mode = ctx.attr("nearest_mode", "round_prefer_floor") or "round_prefer_floor"
    if ctm == "tf_crop_and_resize":
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(tf_crop_and_resize is not supported)")
    antialias = bool(int(ctx.attr("antialias", 0) or 0)) and mode != "nearest"
    if mode not in ("nearest", "linear", "cubic"):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, f"(unknown mode {mode!r})")
    in_shape = ctx.shape(x)
    if in_shape is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown input rank)")
    rank = len(in_shape)
    scales, sizes, by_sizes = _scales(ctx, in_shape, ctx.shape(ctx.outputs[0]))
    if all(o == i and (o is not None or sc == 1.0) for i, o, sc in zip(in_shape, sizes, scales)):
        res[0] = dy
        return res

    # Per resized axis: ("block", f) or ("matrix", numpy A or None for the runtime-built one).
    plan: dict[int, tuple[str, object]] = {}
    for a in range(rank):
        n, m = in_shape[a], sizes[a]
        if scales[a] == 1.0 and (n is None or m is None or n == m):
            continue
        if n is None or m is None:
            raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                     f"(axis {a} is resized but its size is not static)")
        if antialias:
            # The antialiasing filter exists only in the runtime; an equal-length axis would be a copy there.
            if n == m:
                raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                         f"(antialias with a non-unit scale on equal-length axis {a})")
            plan[a] = ("matrix", None)
            continue
        mat = interpolation_matrix(n, m, scales[a], mode, ctm, nearest_mode,
                                   float(ctx.attr("cubic_coeff_a", -0.75)), int(ctx.attr("exclude_outside", 0)))
        f = m // n if m % n == 0 else 0
        if (mode == "nearest" and f >= 2 and scales[a] == float(f)
                and ctm in ("asymmetric", "half_pixel", "pytorch_half_pixel") and _block_factor(mat) == f):
            plan[a] = ("block", f)
        elif n != m:
            plan[a] = ("matrix", None)
        elif not np.array_equal(mat, np.eye(n)):
            plan[a] = ("matrix", mat)
    if not plan:
        res[0] = dy
        return res

    lead = min(plan)
    if sorted(plan) == list(range(lead, rank)) and all(k == "block" for k, _ in plan.values()):
        # Block-sum: (..., n1*f1, n2*f2) -> (..., n1, f1, n2, f2) -> sum over the f axes.
        shape = [0] * lead
        red = []
        for a in range(lead, rank):
            shape += [in_shape[a], plan[a][1]]
            red.append(len(shape) - 1)
        g = ctx.op("Reshape", [dy, ctx.const(np.asarray(shape, np.int64))])
        res[0] = ctx.reduce_sum(g, red, keepdims=False)
        return res

    g = dy
    for a in sorted(plan, reverse=True):
        n, m = in_shape[a], sizes[a]
        kind, mat = plan[a]
        if kind == "block":
            mat = np.kron(np.eye(n), np.ones((plan[a][1], 1)))
        second_last = a == rank - 2
        if mat is None:
            amat = _runtime_matrix(ctx, n, m, scales[a], by_sizes, transpose=second_last, like=dy)
        else:
            amat = ctx.const(np.ascontiguousarray(mat.T) if second_last else mat, like=dy)
        if a == rank - 1:
            g = ctx.op("MatMul", [g, amat])
        elif second_last:
            g = ctx.op("MatMul", [amat, g])
        else:
            perm = [i for i in range(rank) if i != a] + [a]
            inv = [int(i) for i in np.argsort(perm)]
            t = ctx.op("MatMul", [ctx.op("Transpose", [g], perm=perm), amat])
            g = ctx.op("Transpose", [t], perm=inv)
    res[0] = g
    return res
