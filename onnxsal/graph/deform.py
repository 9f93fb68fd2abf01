"""DeformConv nodes rewritten as the sampling and convolution they stand for, so the autodiff can
differentiate them with its ordinary rules.

A deformable convolution (``torchvision.ops.deform_conv2d``, opset 19's ``DeformConv``) reads each
kernel tap at its regular place plus a learned offset, bilinearly, times an optional mask, and
then sums the taps with the weights. Written out, the reads are one ``GridSample`` per offset
group (every tap's positions stacked along the grid's rows; bilinear, zeros outside, as the
operator reads a position beyond the border), the mask a product, and the sum a 1x1 ``Conv`` of
the taps stacked as channels. Those ops have rules, so the gradient reaches the image, the offsets
and the mask. The rewrite lives in the gradient graph only: forward passes keep the fused kernel.

It needs the input's and the offsets' spatial sizes when the graph is built; without them the
node is refused, with that reason.
"""

from __future__ import annotations

import numpy as np
import onnx

from .normalize import _infer_inplace, opset_of, tensor_shapes
from .surgery import Emitter, Refused, node_attrs, write_out


DEFORM = ("DeformConv",)


def has_deform(model: onnx.ModelProto) -> bool:
    return any(n.op_type in DEFORM and n.domain in ("", "ai.onnx") for n in model.graph.node)


def expand(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Rewrite every DeformConv whose sizes are known, in place; returns the model (shapes
    inferred again) and {node name: reason} for the ones left as they were."""
    shapes, opset = tensor_shapes(model), opset_of(model)
    refused = write_out(model, lambda n: n.op_type in DEFORM, "onnxsal_deform", "cannot be written out",
                        lambda node, em: _expand(node, shapes, em, opset))
    return _infer_inplace(model), refused


def _static(shapes: dict, name: str, what: str) -> tuple:
    dims = (shapes.get(name) or (None, None))[1]
    if dims is None or len(dims) != 4 or any(d is None for d in dims[1:]):
        raise Refused(f"{what} of unknown size")
    return dims


def _expand(node: onnx.NodeProto, shapes: dict, em: Emitter, opset: int) -> None:
    a = node_attrs(node)
    x, w, offset = node.input[:3]
    bias = node.input[3] if len(node.input) > 3 and node.input[3] else None
    mask = node.input[4] if len(node.input) > 4 and node.input[4] else None
    _, c, h, wd = _static(shapes, x, "an input")
    _, _, oh, ow = _static(shapes, offset, "offsets")
    oc, _, kh, kw = _static(shapes, w, "weights")
    groups, og = int(a.get("group", 1)), int(a.get("offset_group", 1))
    sh, sw = (int(v) for v in a.get("strides", [1, 1]))
    dh, dw = (int(v) for v in a.get("dilations", [1, 1]))
    top, left = (int(v) for v in a.get("pads", [0, 0, 0, 0])[:2])
    taps = kh * kw
    dt = np.float32
    # each tap's regular place, in input pixels: rows (taps, oh), columns (taps, ow)
    ti, tj = np.divmod(np.arange(taps), kw)
    rows = (np.arange(oh)[None] * sh - top + ti[:, None] * dh).astype(dt)
    cols = (np.arange(ow)[None] * sw - left + tj[:, None] * dw).astype(dt)
    # offsets (N, og * taps * 2, oh, ow), (dy, dx) per tap -> (N * og, taps, oh, ow) each
    pairs = em.op("Reshape", [offset, em.const(np.array([-1, og, taps, 2, oh, ow], np.int64))])
    dy, dx = (em.op("Reshape", [em.op("Gather", [pairs, em.const(np.array(i, np.int64))], axis=3),
                                em.const(np.array([-1, taps, oh, ow], np.int64))]) for i in (0, 1))
    # GridSample's normalised coordinates (align_corners=0): u = (2 p + 1) / size - 1
    at_row = em.op("Add", [dy, em.const(rows[:, :, None])])
    at_col = em.op("Add", [dx, em.const(cols[:, None, :])])
    gy = em.op("Sub", [em.op("Mul", [at_row, em.const(np.array(2.0 / h, dt))]), em.const(np.array(1.0 - 1.0 / h, dt))])
    gx = em.op("Sub", [em.op("Mul", [at_col, em.const(np.array(2.0 / wd, dt))]), em.const(np.array(1.0 - 1.0 / wd, dt))])
    last = em.const(np.array([-1], np.int64))
    grid = em.op("Concat", [em.op("Unsqueeze", [gx, last]), em.op("Unsqueeze", [gy, last])], axis=-1)
    grid = em.op("Reshape", [grid, em.const(np.array([-1, taps * oh, ow, 2], np.int64))])
    # the input's channels in offset groups: (N * og, C / og, H, W), sampled at every tap
    split = em.op("Reshape", [x, em.const(np.array([-1, c // og, h, wd], np.int64))])
    read = em.op("GridSample", [split, grid], mode="linear" if opset >= 20 else "bilinear",
                 padding_mode="zeros", align_corners=0)
    read = em.op("Reshape", [read, em.const(np.array([-1, og, c // og, taps, oh, ow], np.int64))])
    if mask is not None:       # (N, og * taps, oh, ow): one weight per tap and place, shared by the group
        m = em.op("Reshape", [mask, em.const(np.array([-1, og, 1, taps, oh, ow], np.int64))])
        read = em.op("Mul", [read, m])
    stacked = em.op("Reshape", [read, em.const(np.array([-1, c * taps, oh, ow], np.int64))])   # taps as channels
    flat_w = em.op("Reshape", [w, em.const(np.array([oc, -1, 1, 1], np.int64))])
    em.op("Conv", [stacked, flat_w] + ([bias] if bias else []), out=[node.output[0]], group=groups)
