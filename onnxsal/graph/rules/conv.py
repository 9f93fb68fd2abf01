"""VJP rules for Conv and ConvTranspose, plus the window geometry the pooling rules share.

Both ops are linear in their data input, so the input gradient is the adjoint
(transpose) of the same linear map, applied to the upstream gradient ``dy``:

* ``Conv`` with weight ``W`` of shape ``(M, C/g, k...)``::

      y[n, m, o] = sum_{c, j} W[m, c, j] * x[n, grp(m)*C/g + c, o*s - pb + j*d]

  has the adjoint ``ConvTranspose(dy, W)`` with the same strides, dilations,
  group and pads.  The ConvTranspose weight layout ``(C_in, C_out/g, k...)``
  read with ``C_in = M`` (channels of ``dy``) and ``C_out = C`` is exactly
  Conv's ``(M, C/g, k...)``, for every ``group`` (depthwise included), so the
  forward weight tensor is reused as is.

* ``ConvTranspose`` is by definition the adjoint of a Conv with its weight, so
  its input gradient is ``Conv(dy, W)`` with the same attributes.

Speed.  ORT's CPU ConvTranspose is a GEMM followed by col2im and runs about
1.3-2x slower than a Conv of the same size (and up to 5x slower for depthwise
kernels on small feature maps).  When every stride is 1 the adjoint is itself a
plain convolution: ``dx = Conv(dy, W')`` with ``W'[c, m] = flip(W[m, c])``
(spatially flipped, in/out channels swapped inside each group) and pads
``dk - 1 - p``.  When ``W`` is a constant that flipped weight is computed once
with numpy and stored as a new initializer, so stride-1 layers (most of
ResNet, VGG and all of MobileNet's depthwise stride-1 layers) run their
backward at forward cost.  Strided depthwise layers do the same on ``dy``
spread onto the stride grid (see :func:`_blocked_depthwise`).  Other strided
layers use ConvTranspose, and so do 2-D layers with fewer than 8 input
channels (see :func:`_few_channels`).

Exact sizes.  A strided window loses the ``r = (H + pb + pe - dk) mod s``
trailing input positions no window reaches; ConvTranspose restores them with
``output_padding``.  :func:`transpose_geometry` derives the ConvTranspose
pads/output_padding that map ``Ho`` back to exactly ``H`` from the begin pad
alone, which also covers ``auto_pad`` and pooling's ``ceil_mode`` windows.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ...errors import UnsupportedOpError
from ..autodiff import RuleContext, vjp_rule
from . import blocked

INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------------------
# Window geometry (shared with pool.py).


def ints_attr(ctx: RuleContext, name: str, n: int, default: int) -> list[int]:
    """An INTS attribute as a list of ``n`` Python ints, ``default`` everywhere when absent."""
    v = ctx.attr(name)
    if v is None or len(v) == 0:
        return [default] * n
    return [int(t) for t in v]


def dilated(k: int, d: int) -> int:
    """Extent ``(k - 1) * d + 1`` of a kernel of size ``k`` with dilation ``d``."""
    return (k - 1) * d + 1


def begin_end_pads(ctx: RuleContext, in_sizes: Sequence[Optional[int]], kernel: Sequence[int],
                   strides: Sequence[int], dilations: Sequence[int]) -> tuple[list[int], list[Optional[int]]]:
    """Per spatial dim, the pads a Conv/pooling node applies before and after its input.

    ``auto_pad=SAME_*`` follows the ONNX definition: the output has
    ``ceil(H / s)`` positions and the total pad ``(ceil(H/s) - 1) * s + dk - H``
    (at least 0) is split evenly, the odd unit going to the end for
    ``SAME_UPPER`` and to the start for ``SAME_LOWER``.  For stride 1 the total
    is ``dk - 1`` whatever ``H`` is, so unknown sizes are fine there; otherwise
    an unknown ``H`` gives ``None`` for the end pad (the begin pad, which is all
    the gradient needs, is then unknown too and the caller must refuse).
    """
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        pads = ints_attr(ctx, "pads", 2 * n, 0)
        return pads[:n], pads[n:]
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, f"(unknown auto_pad {auto_pad!r})")
    begin: list[int] = []
    end: list[Optional[int]] = []
    for h, k, s, d in zip(in_sizes, kernel, strides, dilations):
        dk = dilated(k, d)
        if s == 1:
            total = dk - 1
        elif h is None:
            raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                     "(auto_pad SAME with stride > 1 needs static spatial sizes)")
        else:
            total = max(0, (-(-h // s) - 1) * s + dk - h)
        small = total // 2
        b = small if auto_pad == "SAME_UPPER" else total - small
        begin.append(b)
        end.append(total - b)
    return begin, end


def transpose_geometry(in_size: Optional[int], out_size: Optional[int], k: int, s: int, d: int,
                       pb: int, pe: Optional[int]) -> tuple[int, int, int]:
    """ConvTranspose (begin pad, end pad, output_padding) that is the exact adjoint of a window op.

    A window op (Conv, MaxPool, AveragePool) reads input position
    ``o*s - pb + j*d`` for output ``o`` and tap ``j``.  ConvTranspose with the
    same stride/dilation scatters output ``o`` tap ``j`` to full position
    ``o*s + j*d`` and crops ``pb`` at the start, so the begin pad carries over
    unchanged.  Its length is ``s*(Ho-1) + dk - pb - pe_t + op``; asking for
    ``H`` gives ``pe_t - op = e`` with ``e = s*(Ho-1) + dk - pb - H``.  ``e >= 0``
    crops the taps that fell in the end padding (or beyond it, for
    ``ceil_mode`` windows); ``e < 0`` means the last ``-e`` input positions were
    never read (stride remainder) and ``output_padding = -e`` restores them as
    zeros.  With stride 1, ``e`` equals the forward end pad, so no static size
    is needed.
    """
    dk = dilated(k, d)
    if in_size is not None and out_size is not None:
        e = s * (out_size - 1) + dk - pb - in_size
    elif s == 1 and pe is not None:
        e = pe
    elif in_size is not None and pe is not None:
        out_size = (in_size + pb + pe - dk) // s + 1
        e = s * (out_size - 1) + dk - pb - in_size
    else:
        raise ValueError("static spatial sizes are needed for strided windows")
    if e >= 0:
        return pb, e, 0
    return pb, 0, -e


def spatial_sizes(ctx: RuleContext, name: str, n: int) -> list[Optional[int]]:
    """Static sizes of the last ``n`` dims of ``name`` (``None`` where unknown)."""
    shp = ctx.shape(name)
    if shp is None or len(shp) < n:
        return [None] * n
    return list(shp[len(shp) - n:])


def flipped_conv_weight(w: np.ndarray, group: int) -> np.ndarray:
    """Weight ``W'`` of the stride-1 Conv equal to the adjoint of ``Conv(., W, group)``.

    ``W`` is ``(M, C/g, k...)``; ``W'`` is ``(C, M/g, k...)`` with
    ``W'[grp*C/g + c, m, j] = W[grp*M/g + m, c, k-1-j]``: channels swapped inside
    each group and every spatial axis reversed (correlation's adjoint is
    correlation with the reversed kernel).
    """
    m, cg = w.shape[:2]
    ks = w.shape[2:]
    mg = m // group
    wt = w.reshape((group, mg, cg) + ks).swapaxes(1, 2).reshape((group * cg, mg) + ks)
    flip = (slice(None), slice(None)) + (slice(None, None, -1),) * len(ks)
    return np.ascontiguousarray(wt[flip])


def _refuse_weight_grads(ctx: RuleContext) -> None:
    if ctx.needs_grad(1):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                 "(gradient with respect to the weight tensor is not supported)")


def _bias_grad(ctx: RuleContext, dy: str, nsp: int) -> Optional[str]:
    """``db[m] = sum over batch and space of dy[:, m]`` (the bias is broadcast there)."""
    if len(ctx.inputs) > 2 and ctx.needs_grad(2):
        return ctx.reduce_sum(dy, [0] + list(range(2, 2 + nsp)), keepdims=False)
    return None


def _n_spatial(ctx: RuleContext, w: str) -> int:
    ws = ctx.shape(w)
    if ws is None:
        cv = ctx.const_value(w)
        ws = None if cv is None else cv.shape
    if ws is not None:
        return len(ws) - 2
    r = ctx.rank(ctx.inputs[0])
    if r is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown rank of the input and weight)")
    return r - 2


def _kernel(ctx: RuleContext, w: str, nsp: int) -> list[int]:
    k = ctx.attr("kernel_shape")
    if k:
        return [int(v) for v in k]
    ws = ctx.shape(w)
    if ws is None or any(v is None for v in ws[2:]):
        cv = ctx.const_value(w)
        ws = None if cv is None else cv.shape
    if ws is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(unknown kernel shape)")
    return [int(v) for v in ws[2:]]


# ---------------------------------------------------------------------------------------
# Conv.


def _start(ctx: RuleContext, gy: list[Optional[str]]) -> tuple[list[Optional[str]], Optional[str], int]:
    """What Conv and ConvTranspose share: refuse weight gradients, form the bias gradient."""
    res: list[Optional[str]] = [None] * len(ctx.inputs)
    dy = gy[0]
    if dy is None:
        return res, None, 0
    _refuse_weight_grads(ctx)
    nsp = _n_spatial(ctx, ctx.inputs[1])
    if len(res) > 2:
        res[2] = _bias_grad(ctx, dy, nsp)
    return res, dy, nsp


def _few_channels(w: np.ndarray, group: int) -> bool:
    """Whether the gradient has fewer channels than ORT's CPU block (an image's 3, say).

    ORT pads such a convolution's output channels up to its block size, so the
    flipped-kernel Conv does 8/3 of the work for an RGB input gradient.  There
    ConvTranspose is measured faster (1.3x at 64x64, 1.65x at 224x224 for the
    first layer's gradient) and also skips two layout conversions.
    """
    return len(w.shape) == 4 and group == 1 and w.shape[1] < blocked.BLOCK


def _blocked_depthwise(ctx: RuleContext, w: np.ndarray, group: int, dy: str) -> bool:
    """Whether a strided layer is depthwise (one filter per channel) with a channel count ORT blocks.

    ORT's CPU ConvTranspose loops over groups with a tiny GEMM and col2im each, so a
    depthwise one runs 2-5x slower than the forward layer (MobileNetV2, batch 16: 37 ms
    against 4 ms for its 96-channel stride-2 layer).  Spreading ``dy`` onto the stride
    grid (:func:`interleave_zeros`) and correlating with the flipped kernel at stride 1
    does ``s^2`` times the multiply-adds, but a depthwise layer is bound by memory and
    that convolution stays in the blocked layout: measured 1.1-1.3x faster per layer,
    counting the 1x1 convolutions either side (96 channels at 112x112 to 576 at 14x14,
    batch 16; ``benchmarks/bench_depthwise_grad.py``).  Dense layers would pay the
    ``s^2`` in real compute, so they keep ConvTranspose.
    """
    return w.ndim == 4 and w.shape[1] == 1 and w.shape[0] == group and blocked.channels(ctx, dy) == group


def interleave_zeros(ctx: RuleContext, dy: str, strides: list[int], c: int) -> str:
    """``u[.., o*s] = dy[.., o]`` and zero between: length ``s*(Ho-1) + 1`` per spatial dim.

    A 1x1 ConvTranspose with unit weights is exactly this (each output position
    receives at most one product ``dy * 1``), and ORT runs it at memory speed.
    """
    ones = ctx.const(np.ones((c, 1) + (1,) * len(strides), np.float32), like=dy)
    return ctx.op("ConvTranspose", [dy, ones], kernel_shape=[1] * len(strides), strides=strides, group=c)


@vjp_rule("Conv")
def conv(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = Conv^T dy``: a flipped-weight Conv for stride 1, else ConvTranspose(dy, W).

    Few-channel gradients (an RGB image's) take ConvTranspose at stride 1 too;
    strided depthwise layers take the flipped-weight Conv on zero-interleaved ``dy``.

    See the module docstring for why both are the exact adjoint; the bias
    gradient is ``dy`` summed over batch and space.  Weight gradients are not
    formed: saliency needs input and activation gradients only.
    """
    res, dy, nsp = _start(ctx, gy)
    if dy is None or not ctx.needs_grad(0):
        return res
    x, w = ctx.inputs[0], ctx.inputs[1]

    kernel = _kernel(ctx, w, nsp)
    strides = ints_attr(ctx, "strides", nsp, 1)
    dilations = ints_attr(ctx, "dilations", nsp, 1)
    group = int(ctx.attr("group", 1))
    h_in = spatial_sizes(ctx, x, nsp)
    h_out = spatial_sizes(ctx, ctx.outputs[0], nsp)
    pb, pe = begin_end_pads(ctx, h_in, kernel, strides, dilations)
    try:
        geo = [transpose_geometry(h, ho, k, s, d, b, e)
               for h, ho, k, s, d, b, e in zip(h_in, h_out, kernel, strides, dilations, pb, pe)]
    except ValueError:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                 "(strided Conv needs static spatial sizes of its input and output)") from None

    wv = ctx.const_value(w)
    strided = any(s > 1 for s in strides)
    if wv is not None and not _few_channels(wv, group) and (not strided or _blocked_depthwise(ctx, wv, group, dy)):
        # Correlate (the zero-interleaved) dy with the flipped kernel; pads dk-1-pb before,
        # dk-1-e after, where e = s*(Ho-1) + dk - pb - H (negative e: output_padding -e).
        q_begin = [dilated(k, d) - 1 - g[0] for k, d, g in zip(kernel, dilations, geo)]
        q_end = [dilated(k, d) - 1 - g[1] + g[2] for k, d, g in zip(kernel, dilations, geo)]
        if min(q_begin + q_end) >= 0:
            u = interleave_zeros(ctx, dy, strides, group) if strided else dy
            wf = ctx.const(flipped_conv_weight(np.asarray(wv), group), like=dy)
            res[0] = ctx.op("Conv", [u, wf], kernel_shape=kernel, dilations=dilations,
                            pads=q_begin + q_end, group=group)
            return res

    dx = ctx.op("ConvTranspose", [dy, w], kernel_shape=kernel, strides=strides, dilations=dilations,
                group=group, pads=[g[0] for g in geo] + [g[1] for g in geo], output_padding=[g[2] for g in geo])
    res[0] = blocked.bridge(ctx, dx)
    return res


# ---------------------------------------------------------------------------------------
# ConvTranspose.


def _conv_transpose_begin_pads(ctx: RuleContext, h_in: list[Optional[int]], kernel: list[int],
                               strides: list[int], dilations: list[int], out_pad: list[int]
                               ) -> tuple[list[int], list[Optional[int]]]:
    """Begin pads and output lengths of a ConvTranspose, as ONNX (and ORT) define them.

    With explicit pads the output is ``s*(H-1) + op + dk - pb - pe``.  With
    ``output_shape`` or ``auto_pad=SAME_*`` (target ``H*s``) the total pad is
    ``max(0, s*(H-1) + op + dk - target)``; SAME_UPPER puts the smaller half at
    the start, everything else the larger half.
    """
    n = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET") or "NOTSET"
    out_shape = ctx.attr("output_shape")
    if not out_shape and auto_pad in ("NOTSET", "VALID"):
        pads = ints_attr(ctx, "pads", 2 * n, 0) if auto_pad == "NOTSET" else [0] * (2 * n)
        outs = [None if h is None else s * (h - 1) + op + dilated(k, d) - pads[i] - pads[n + i]
                for i, (h, k, s, d, op) in enumerate(zip(h_in, kernel, strides, dilations, out_pad))]
        return pads[:n], outs
    if any(h is None for h in h_in):
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name,
                                 "(output_shape/auto_pad needs static spatial sizes)")
    targets = [int(v) for v in out_shape][-n:] if out_shape else [h * s for h, s in zip(h_in, strides)]
    begin = []
    for h, k, s, d, op, t in zip(h_in, kernel, strides, dilations, out_pad, targets):
        total = max(0, s * (h - 1) + op + dilated(k, d) - t)
        begin.append(total // 2 if auto_pad == "SAME_UPPER" else total - total // 2)
    return begin, list(targets)


@vjp_rule("ConvTranspose")
def conv_transpose(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """``dx = Conv(dy, W)`` with the same strides, dilations, group and begin pads.

    ConvTranspose writes input ``i`` tap ``j`` to output ``i*s + j*d - pb``, so
    its adjoint reads exactly there: a Conv whose begin pad is ``pb``.  The
    end pad is chosen so the Conv produces at least ``H`` positions,
    ``max(0, s*(H-1) + dk - pb - Ho)``; output positions added by
    ``output_padding`` (or a larger ``output_shape``) are read by no input, and
    any surplus Conv output they cause is sliced off.
    """
    res, dy, nsp = _start(ctx, gy)
    if dy is None or not ctx.needs_grad(0):
        return res
    x, w = ctx.inputs[0], ctx.inputs[1]

    kernel = _kernel(ctx, w, nsp)
    strides = ints_attr(ctx, "strides", nsp, 1)
    dilations = ints_attr(ctx, "dilations", nsp, 1)
    out_pad = ints_attr(ctx, "output_padding", nsp, 0)
    group = int(ctx.attr("group", 1))
    h_in = spatial_sizes(ctx, x, nsp)
    pb, h_out = _conv_transpose_begin_pads(ctx, h_in, kernel, strides, dilations, out_pad)
    explicit = ints_attr(ctx, "pads", 2 * nsp, 0)
    explicit_mode = not ctx.attr("output_shape") and (ctx.attr("auto_pad", "NOTSET") or "NOTSET") == "NOTSET"

    conv_end, surplus = [], []
    for i, (h, ho, k, s, d, b, op) in enumerate(zip(h_in, h_out, kernel, strides, dilations, pb, out_pad)):
        dk = dilated(k, d)
        # Ho + pb + pe_c - dk = s*(H-1) + extra: the Conv then yields H + extra // s positions.
        if explicit_mode:
            pe = explicit[nsp + i]
            pe_c = max(0, pe - op)
            extra = max(op - pe, 0)
        else:
            full = s * (h - 1) + dk - b - ho       # end pad that lands exactly on H
            pe_c = max(0, full)
            extra = pe_c - full
        conv_end.append(pe_c)
        surplus.append(extra // s)

    dx = ctx.op("Conv", [dy, w], kernel_shape=kernel, strides=strides, dilations=dilations, group=group,
                pads=list(pb) + conv_end)
    cut = [i for i, v in enumerate(surplus) if v > 0]
    if cut:
        dx = ctx.op("Slice", [dx,
                              ctx.const(np.zeros(len(cut), np.int64)),
                              ctx.const(np.asarray([-surplus[i] for i in cut], np.int64)),
                              ctx.const(np.asarray([2 + i for i in cut], np.int64))])
    res[0] = dx
    return res


@vjp_rule("Col2Im")
def col2im(ctx: RuleContext, gy: list[Optional[str]]) -> list[Optional[str]]:
    """y = fold(x): blocks of x summed into an image (VOLO's outlook attention, F.fold).

    Its adjoint is unfold (im2col) of gy with the same block shape, pads, strides and
    dilations, which is a grouped convolution with one-hot kernels: output channel
    ``c*K + j`` of group ``c`` reads kernel position ``j`` (row-major), the order of
    Col2Im's ``C*K`` input channels; the output grid flattened row-major is its ``L`` axis.
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    image = ctx.const_value(ctx.inputs[1])
    block = ctx.const_value(ctx.inputs[2])
    if image is None or block is None:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(Col2Im image or block shape computed at run time)")
    block = [int(v) for v in block.reshape(-1)]
    nsp, k = len(block), int(np.prod(block))
    ck = (ctx.shape(x) or (None, None))[1]
    if ck is None or ck % k:
        raise UnsupportedOpError(ctx.node.op_type, ctx.node.name, "(Col2Im needs a static channel count)")
    c = ck // k
    onehot = np.eye(k, dtype=np.float64).reshape((k, 1) + tuple(block))
    w = ctx.const(np.tile(onehot, (c,) + (1,) * (nsp + 1)), like=y)
    cols = ctx.op("Conv", [gy[0], w], kernel_shape=block, group=c, strides=ints_attr(ctx, "strides", nsp, 1),
                  dilations=ints_attr(ctx, "dilations", nsp, 1), pads=ints_attr(ctx, "pads", 2 * nsp, 0))
    target = ctx.op("Concat", [ctx.op("Slice", [ctx.shape_of(cols), ctx.const([0]), ctx.const([2])]),
                               ctx.const([-1])], axis=0)
    return [ctx.op("Reshape", [cols, target]), None, None]
