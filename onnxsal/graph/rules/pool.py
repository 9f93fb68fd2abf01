"""VJP rules for MaxPool, AveragePool, LpPool, their global forms, and MaxUnpool.

Max pooling routes each output's gradient to the ONE input position that
won the window (``dx[argmax(o)] += dy[o]``), exactly like PyTorch's
``max_pool2d`` backward.  The winner is taken from MaxPool's own ``Indices``
output rather than recovered by comparing ``x`` with an upsampled ``y``: a
mask ``x == y`` gives every tied position the full gradient, and ties are the
rule, not the exception, after a ReLU (whole windows of zeros).  The index
route is exact with ties and costs one extra pooling pass plus one scatter
(a MaxUnpool where windows do not overlap).

Average pooling is linear: ``y = D^-1 S x`` with ``S`` the 0/1 window-sum
operator and ``D`` the per-output divisor, so ``dx = S^T (D^-1 dy)``.  ``S^T``
is a ConvTranspose with a kernel of ones, run on the ``(N*C, 1, ...)`` view
of ``dy`` with a single ``(1, 1, k...)`` kernel, so it needs no channel count
and no per-channel weight tensor (measured on par with a ``group=C`` kernel).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Optional

import numpy as np
from onnx import helper

from ...errors import UnsupportedOpError
from ..autodiff import RuleContext, vjp_rule
from . import blocked
from ..pool_geometry import node_windows
from ..surgery import node_attrs
from .conv import INT64_MAX, dilated, ints_attr, spatial_sizes, transpose_geometry


def _pool_params(ctx: RuleContext, x: str) -> tuple[int, list[int], list[int], list[int]]:
    kernel = ctx.attr("kernel_shape")
    if not kernel:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(missing kernel_shape)")
    kernel = [int(k) for k in kernel]
    n = len(kernel)
    return n, kernel, ints_attr(ctx, "strides", n, 1), ints_attr(ctx, "dilations", n, 1)


def _flat(ctx: RuleContext, t: str) -> str:
    return ctx.op("Reshape", [t, ctx.const(np.asarray([-1], np.int64))])


# ---------------------------------------------------------------------------------------
# MaxPool.


def max_pool_indices(ctx: RuleContext) -> str:
    """Flat argmax indices of the forward MaxPool: its own 2nd output, or a re-run that has one.

    ORT's indices are row-major offsets into the whole input (batch and channel
    included, padding excluded), i.e. positions in ``Reshape(x, [-1])``.  The
    re-run forces ``storage_order=0`` so that holds whatever the forward asked.
    """
    if len(ctx.outputs) > 1 and ctx.outputs[1] and int(ctx.attr("storage_order", 0)) == 0:
        return ctx.outputs[1]
    attrs = {}
    for a in ctx.node.attribute:
        if a.name != "storage_order":
            attrs[a.name] = helper.get_attribute_value(a)
    _, idx = ctx.op("MaxPool", [ctx.inputs[0]], n_out=2, **attrs)
    return idx


@vjp_rule("MaxPool")
def max_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = zeros(x).flat; dx[I[o]] += dy[o]`` with ``I`` the MaxPool indices.

    Windows overlap when ``stride < dilated kernel``; an input then can win
    several windows and the scatter must accumulate.  Three exact forms:

    * non-overlapping windows: indices are unique, so ``MaxUnpool`` (opset >= 11,
      explicit pads, floor mode, no dilation) or else a plain ScatterElements;
    * overlapping, opset >= 16: ScatterElements with ``reduction="add"``;
    * overlapping, opset < 16 (no scatter reduction): split the outputs into
      ``a = ceil(dk / s)`` phase classes per axis (``o mod a``).  Windows of one
      class are ``a*s >= dk`` apart, hence disjoint, so each class is a plain
      scatter; the ``prod(a)`` partial gradients are summed.

    For windows that tile the input (kernel == stride, as in VGG) two other
    forms are exact too: a block form (each window laid out as a last axis,
    ArgMax, Where) and a phase form (the k*k strided slices compared with
    ``y``, each keeping what no earlier phase matched).  Both do more passes
    over the input than the Indices pass plus MaxUnpool and run about 3x
    slower on ORT's CPU (``benchmarks/bench_pool_backward.py``), so every
    case goes through the indices.
    """
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x = ctx.inputs[0]
    h_in = spatial_sizes(ctx, x, len(_pool_params(ctx, x)[1]))
    if all(v is not None for v in h_in):
        _check_sizes(ctx, _runtime_windows(ctx, h_in)[2])
    return [route_to_argmax(ctx, dy, max_pool_indices(ctx))]


def route_to_argmax(ctx: RuleContext, dy: str, idx: str) -> str:
    """``dx = zeros(x).flat; dx[idx[o]] += dy[o]``: the scatter of the MaxPool rule (see there),
    for callers that route several tensors through one set of indices (DeepLIFT)."""
    x = ctx.inputs[0]
    n, kernel, strides, dilations = _pool_params(ctx, x)
    phases = [-(-dilated(k, d) // s) for k, s, d in zip(kernel, strides, dilations)]
    disjoint = all(a == 1 for a in phases)
    explicit = ctx.attr("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not ctx.attr("ceil_mode", 0)
    if disjoint and explicit and ctx.opset >= 11 and all(d == 1 for d in dilations):
        # Unique indices: MaxUnpool is exactly this scatter, at about a third of its cost on ORT's CPU.
        # ORT refuses an output_shape smaller than (out-1)*s + k - pads, which ceil_mode and auto_pad allow.
        pads = ctx.attr("pads") or [0] * (2 * n)
        return ctx.op("MaxUnpool", [dy, idx, ctx.shape_of(x)], kernel_shape=kernel, strides=strides,
                      pads=[int(p) for p in pads])
    zeros = _flat(ctx, ctx.zeros_like(x))
    if disjoint:
        dx = ctx.op("ScatterElements", [zeros, _flat(ctx, idx), _flat(ctx, dy)], axis=0)
    elif ctx.opset >= 16:
        dx = ctx.op("ScatterElements", [zeros, _flat(ctx, idx), _flat(ctx, dy)], axis=0, reduction="add")
    else:
        parts = []
        for offs in itertools.product(*[range(a) for a in phases]):
            starts = ctx.const(np.asarray(offs, np.int64))
            ends = ctx.const(np.full(n, INT64_MAX, np.int64))
            axes = ctx.const(np.arange(2, 2 + n, dtype=np.int64))
            steps = ctx.const(np.asarray(phases, np.int64))
            i_p = ctx.op("Slice", [idx, starts, ends, axes, steps])
            g_p = ctx.op("Slice", [dy, starts, ends, axes, steps])
            parts.append(ctx.op("ScatterElements", [zeros, _flat(ctx, i_p), _flat(ctx, g_p)], axis=0))
        dx = parts[0] if len(parts) == 1 else ctx.op("Sum", parts)
    return ctx.op("Reshape", [dx, ctx.shape_of(x)])


@vjp_rule("GlobalMaxPool")
def global_max_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx[n, c, argmax_hw x[n, c]] = dy[n, c]``, zero elsewhere.

    ArgMax (first index on ties, as PyTorch's max pooling) over the flattened
    spatial axis gives one winner per ``(n, c)``; one ScatterElements on the
    ``(N, C, H*W)`` view writes the gradient there.
    """
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x = ctx.inputs[0]
    nc_flat = ctx.const(np.asarray([0, 0, -1], np.int64))
    x3 = ctx.op("Reshape", [x, nc_flat])
    arg = ctx.op("ArgMax", [x3], axis=2, keepdims=1, select_last_index=0)
    dy3 = ctx.op("Reshape", [dy, nc_flat])
    dx3 = ctx.op("ScatterElements", [ctx.zeros_like(x3), arg, dy3], axis=2)
    return [ctx.op("Reshape", [dx3, ctx.shape_of(x)])]


# ---------------------------------------------------------------------------------------
# Average pooling.


def _window_counts(in_size: int, out_size: int, k: int, s: int, d: int, pb: int) -> np.ndarray:
    """Per output position, how many window taps ``o*s - pb + j*d`` land inside ``[0, H)``."""
    o = np.arange(out_size)[:, None]
    pos = o * s - pb + np.arange(k)[None, :] * d
    return ((pos >= 0) & (pos < in_size)).sum(axis=1)


@vjp_rule("AveragePool")
def average_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = S^T (dy / D)``: scale by the divisor, then a ConvTranspose with a kernel of ones.

    The divisor ``D[o]`` depends on ``count_include_pad`` and, with
    ``ceil_mode``, on how a runtime clips the last window; rather than encode
    one reading of the spec, the rule derives ``1/D`` from the op itself:
    ``AveragePool(ones)[o] = c[o] / D[o]`` where ``c[o]`` (taps inside the
    input) is pure geometry, so ``1/D = AveragePool(ones) / c``.  That pool runs
    on a constant ``(1, 1, H, W)`` tensor, which ORT folds at load time.
    ``S^T`` uses :func:`~onnxsal.graph.rules.conv.transpose_geometry` so pads,
    strides, dilations and ceil_mode windows map back to exactly ``H``.
    """
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x = ctx.inputs[0]
    w = _windows(ctx)
    h_in, h_out, kernel, strides, dilations, pb = w.h_in, w.h_out, w.kernel, w.strides, w.dilations, w.pb
    n = len(kernel)

    counts = np.ones((1, 1) + tuple(h_out))
    for i, (h, ho, k, s, d, b) in enumerate(zip(h_in, h_out, kernel, strides, dilations, pb)):
        shape = [1] * (2 + n)
        shape[2 + i] = ho
        counts = counts * _window_counts(h, ho, k, s, d, b).reshape(shape)
    inv_counts = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)

    attrs = node_attrs(ctx.node)
    ones = ctx.const(np.ones((1, 1) + tuple(h_in)), like=dy)
    inv_div = ctx.op("Mul", [ctx.op("AveragePool", [ones], **attrs), ctx.const(inv_counts, like=dy)])
    g = ctx.op("Mul", [dy, inv_div])

    return [_window_sum_transposed(ctx, g, x, w)]


@dataclass(frozen=True)
class _Windows:
    """A pool's window geometry along its spatial axes: sizes in and out, and its attributes."""

    h_in: list[int]
    h_out: list[int]
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    pb: list[int]          # pads at the beginning and at the end (auto_pad resolved)
    pe: list[int]


def _windows(ctx: RuleContext) -> _Windows:
    """The pool node's window geometry as ONNX Runtime lays it out (``pool_geometry``: its ceil-mode
    and dilated SAME windows are not those of ONNX's inference); static input sizes are required."""
    x = ctx.inputs[0]
    n, kernel, strides, dilations = _pool_params(ctx, x)
    h_in = spatial_sizes(ctx, x, n)
    if any(v is None for v in h_in):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(needs static spatial sizes)")
    pb, pe, h_out = _runtime_windows(ctx, h_in)
    _check_sizes(ctx, h_out)
    return _Windows(h_in, h_out, kernel, strides, dilations, pb, pe)


def _runtime_windows(ctx: RuleContext, h_in: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Begin pads, end pads and output sizes per spatial axis, as ONNX Runtime computes them."""
    return tuple(list(v) for v in zip(*node_windows(node_attrs(ctx.node), h_in)))     # type: ignore[return-value]


def _check_sizes(ctx: RuleContext, h_out: list[int]) -> None:
    """Refuse a pool whose output the graph's inferred shapes size otherwise than ONNX Runtime does:
    ``normalize`` rewrites such pools with explicit pads, so one left is a pool it could not (its
    pads would reach the kernel's size or start below 0), and every size the gradient declares would
    clash."""
    inferred = spatial_sizes(ctx, ctx.outputs[0], len(h_out))
    if all(v is not None for v in inferred) and list(inferred) != list(h_out):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                 f"(ONNX's shape inference sizes its output {inferred} and ONNX Runtime {h_out}, "
                                 "and no explicit padding reconciles them)")


def _window_sum_transposed(ctx: RuleContext, g: str, x: str, w: _Windows) -> str:
    """``S^T g``: each output's value added back to every input position of its window, as a
    ConvTranspose with a kernel of ones on the ``(N*C, 1, ...)`` view (see the module docstring)."""
    n, kernel, strides, dilations = len(w.kernel), w.kernel, w.strides, w.dilations
    geo = [transpose_geometry(h, ho, k, s, d, b, e)
           for h, ho, k, s, d, b, e in zip(w.h_in, w.h_out, kernel, strides, dilations, w.pb, w.pe)]
    g1 = ctx.op("Reshape", [g, ctx.const(np.asarray([-1, 1] + [0] * n, np.int64))])
    ones_k = ctx.const(np.ones((1, 1) + tuple(kernel)), like=g)
    dx1 = ctx.op("ConvTranspose", [g1, ones_k], kernel_shape=kernel, strides=strides, dilations=dilations,
                 pads=[t[0] for t in geo] + [t[1] for t in geo], output_padding=[t[2] for t in geo])
    return ctx.op("Reshape", [dx1, ctx.shape_of(x)])


# ---------------------------------------------------------------------------------------
# Lp pooling: y = (S |x|^p)^(1/p), the window sums S of average pooling without the divisor.


def _lp_factors(ctx: RuleContext, dy: str, x: str, y: str) -> tuple[str, str]:
    """``dy * y^(1-p)`` (0 where a window is all zeros, as ReduceL2's rule) and
    ``sign(x) |x|^(p-1)``: their product through S^T is the gradient."""
    p = float(ctx.attr("p", 2))
    if p == 1.0:
        return dy, ctx.op("Sign", [x])
    positive, safe = _nonzero_norm(ctx, y)
    scale = ctx.op("Where", [positive, ctx.op("Pow", [safe, ctx.const(1.0 - p, like=y)]), ctx.const(0.0, like=y)])
    return ctx.op("Mul", [dy, scale]), _signed_power(ctx, x, p - 1.0)


def _nonzero_norm(ctx: RuleContext, y: str) -> tuple[str, str]:
    """``[y > 0]`` and ``y`` with 1 where it is 0: a norm to divide by (its windows of zeros pass 0)."""
    positive = ctx.op("Greater", [y, ctx.const(0.0, like=y)])
    return positive, ctx.op("Where", [positive, y, ctx.const(1.0, like=y)])


def _signed_power(ctx: RuleContext, t: str, e: float) -> str:
    """``sign(t) |t|^e`` (``t`` itself for e = 1)."""
    if e == 1.0:
        return t
    return ctx.op("Mul", [ctx.op("Sign", [t]), ctx.op("Pow", [ctx.op("Abs", [t]), ctx.const(e, like=t)])])


@vjp_rule("LpPool")
def lp_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = S^T(dy y^(1-p)) sign(x) |x|^(p-1)``, with S^T as in average pooling's rule."""
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x, y = ctx.inputs[0], ctx.outputs[0]
    g, local = _lp_factors(ctx, dy, x, y)
    spread = _window_sum_transposed(ctx, g, x, _windows(ctx))
    return [ctx.op("Mul", [spread, local])]


@vjp_rule("GlobalLpPool")
def global_lp_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """One window over all spatial positions: ``dx = dy sign(x) (|x| / y)^(p-1)``, the ratio taken
    first so that a tiny norm cannot overflow; 0 where the norm is 0 (every x there is 0)."""
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x, y = ctx.inputs[0], ctx.outputs[0]
    p = float(ctx.attr("p", 2))
    if p == 1.0:
        return [ctx.op("Mul", [ctx.op("Expand", [dy, ctx.shape_of(x)]), ctx.op("Sign", [x])])]
    ratio = ctx.op("Div", [x, _nonzero_norm(ctx, y)[1]])      # |ratio| <= 1; x = 0 wherever y = 0
    return [ctx.op("Mul", [dy, _signed_power(ctx, ratio, p - 1.0)])]


@vjp_rule("GlobalAveragePool")
def global_average_pool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = broadcast(dy) / (H*W...)``: every position gets an equal share.

    The constant ``1/HW`` is folded in when the spatial size is static; otherwise
    it is ``Size(dy) / Size(x)`` at run time.  Scaling ``dy`` before the Expand
    touches ``N*C`` values instead of ``N*C*H*W``.
    """
    dy = gy[0]
    if dy is None or not ctx.needs_grad(0):
        return [None]
    x = ctx.inputs[0]
    shp = ctx.shape(x)
    if shp is not None and len(shp) > 2 and all(v is not None for v in shp[2:]):
        inv = ctx.const(1.0 / float(np.prod(shp[2:])), like=dy)
    else:
        size_dy = ctx.op("Cast", [ctx.op("Size", [dy])], to=ctx.elem_type(dy) or 1)
        size_x = ctx.op("Cast", [ctx.op("Size", [x])], to=ctx.elem_type(dy) or 1)
        inv = ctx.op("Div", [size_dy, size_x])
    dx = ctx.op("Expand", [ctx.op("Mul", [dy, inv]), ctx.shape_of(x)])
    ctx.set_shape(dx, x)     # Expand's output shape is data-dependent: tell the bridge
    return [blocked.bridge(ctx, dx)]


@vjp_rule("MaxUnpool")
def max_unpool(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """y = zeros with x written at the flat (whole-tensor) ``indices``: gx = gy read back there.
    (The max-pool gradient unpools, so a second derivative passes through here.)"""
    flat = ctx.op("Reshape", [gy[0], ctx.const(np.asarray([-1], np.int64))])
    return [ctx.op("Gather", [flat, ctx.inputs[1]], axis=0), None, None]
