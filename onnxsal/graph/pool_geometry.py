"""Pooling windows as ONNX Runtime lays them out, where that differs from ONNX's shape inference.

Two readings part ways (ONNX 1.23's inference against ONNX Runtime's CPU kernels, which follow
PyTorch on the first):

* ``ceil_mode=1``: ONNX Runtime drops a last window that would start in the end padding (the
  rule of onnx/onnx#5741); ONNX's inference still counts it. ``MaxPool(k=2, s=2, pads=(0, 1),
  ceil_mode=1)`` over 8 positions gives 4, where inference says 5.
* ``auto_pad=SAME_*`` with a dilation: ONNX Runtime sizes the padding from the undilated kernel
  and then applies the dilated one, so the output is not ``ceil(H / s)``.

A gradient built on the inferred sizes would then refuse a valid cotangent or mis-shape a window
sum, and ONNX Runtime's own load-time inference (ONNX's) would clash with any size onnxsal gets
right. ``normalize`` therefore rewrites such nodes with explicit pads that give the runtime's
windows under ``ceil_mode=0`` (``explicit_pads``), where both readings agree.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

POOLS = ("MaxPool", "AveragePool", "LpPool")


def runtime_window(h: int, k: int, s: int, d: int, pad_begin: int, pad_end: int, auto_pad: str,
                   ceil_mode: int) -> tuple[int, int, int]:
    """(begin pad, end pad, output size) along one axis of ``h`` positions, as ONNX Runtime's
    ``PoolAttributes`` computes them."""
    if auto_pad == "VALID":
        pad_begin = pad_end = 0
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        needed = (-(-h // s) - 1) * s + k - h              # the undilated kernel, as the runtime does
        half = int((needed + (auto_pad == "SAME_LOWER")) / 2)   # C++ division: toward zero
        pad_begin, pad_end = half, needed - half
    span = h + pad_begin + pad_end - d * (k - 1) - 1
    out = int(span / s) + 1
    if ceil_mode:
        out = math.ceil(span / s) + 1
        if (out - 1) * s >= h + pad_begin:                 # the last window starts in the end padding
            out -= 1
    return pad_begin, pad_end, out


def may_differ(attrs: dict) -> bool:
    """Whether ONNX's inference may size this pool's output otherwise than the runtime: ceil mode,
    or SAME padding with a dilation (the runtime's pads are then not ONNX's). Elsewhere both read
    the pads the same way (``tests/test_pool_windows.py`` checks every configuration of a grid)."""
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    dilations = [int(v) for v in attrs.get("dilations") or []]
    same = auto_pad in ("SAME_UPPER", "SAME_LOWER")
    return bool(int(attrs.get("ceil_mode", 0))) or same and any(d != 1 for d in dilations)


def node_windows(attrs: dict, in_sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """``runtime_window`` per spatial axis of a pooling node, from its attributes."""
    kernel = [int(v) for v in attrs["kernel_shape"]]
    n = len(kernel)
    strides = [int(v) for v in attrs.get("strides") or [1] * n]
    dilations = [int(v) for v in attrs.get("dilations") or [1] * n]
    pads = [int(v) for v in attrs.get("pads") or [0] * (2 * n)]
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    return [runtime_window(h, k, s, d, pads[i], pads[n + i], auto_pad, int(attrs.get("ceil_mode", 0)))
            for i, (h, k, s, d) in enumerate(zip(in_sizes, kernel, strides, dilations))]


def pads_movable(op_type: str, attrs: dict, argmax: bool = False) -> bool:
    """Whether a pool's pads can become a Pad node before it with the same values: a max pool
    (padding at -inf) that does not report its argmax positions, a sum of powers (padding at 0:
    |0|^p adds nothing), or an average that counts its padding."""
    if op_type == "MaxPool":
        return not argmax
    return op_type == "LpPool" or op_type == "AveragePool" and int(attrs.get("count_include_pad", 0)) == 1


def explicit_pads(attrs: dict, in_sizes: Sequence[int]) -> Optional[list[int]]:
    """Explicit pads under which ``ceil_mode=0`` gives the runtime's windows and ONNX's inference
    agrees: the begin pads it applies and end pads cut or grown to end at its last window. Every
    window then reads the same input positions, so MaxPool and LpPool compute the same values. So
    does AveragePool with ``count_include_pad=1``: the runtime counts a window's cells up to the end
    pad, and no window of these ends past the new one (over 15552 one-axis configurations, the
    rewritten pool gave the original's values wherever the sizes differed). None where the runtime
    would refuse such pads (at least the kernel's size, or negative: a SAME pool whose stride
    exceeds its kernel)."""
    kernel = [int(v) for v in attrs["kernel_shape"]]
    n = len(kernel)
    strides = [int(v) for v in attrs.get("strides") or [1] * n]
    dilations = [int(v) for v in attrs.get("dilations") or [1] * n]
    begins, ends = [], []
    for (pb, _, out), h, k, s, d in zip(node_windows(attrs, in_sizes), in_sizes, kernel, strides, dilations):
        dk = d * (k - 1) + 1
        pe = max(0, (out - 1) * s + dk - h - pb)
        if pb < 0 or pe >= k or (h + pb + pe - dk) // s + 1 != out:
            return None
        begins.append(pb)
        ends.append(pe)
    return begins + ends

