"""FullGrad (Srinivas & Fleuret 2019), with pytorch-grad-cam's ``FullGrad`` definitions.

    map = sum_c psi(|x_c * dS/dx_c|) + sum_l sum_c psi(|b_lc * dS/dz_lc|)

over the input's channels c and every bias layer l: each 2-D convolution with a bias, each batch
norm, whose bias is beta - mu * gamma / sqrt(var + eps) (the paper's own extractor), and each Add
of a per-channel constant to an image tensor (the form tf2onnx gives a Keras batch norm: Mul by
gamma / sigma, then Add of that same bias); z_l is the layer's output. psi min-max normalises one channel's map, (m - min) / (1e-7 + max - min), and
resizes it bilinearly to the input size. One forward + VJP run gives dS/dx and every dS/dz_l.

Resizing is linear, so the normalised channels of a layer are summed at the layer's own
resolution and resized once: ResNet-50's 53 layers then cost 53 resizes instead of one per
channel (26,560), with the same sum.

A convolution with its own bias followed by a batch norm is two layers, as in pytorch-grad-cam;
asking for the convolution's output keeps the two from being folded into one. A model whose
exporter already folded them has one layer there, with the folded bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..context import Context
from ..graph.normalize import tensor_shapes
from ..graph.simplify import constants
from ..model import Model
from ..postprocess import resize
from . import method

EPS = 1e-7


@dataclass(frozen=True)
class BiasLayer:
    tensor: str          # the layer's output z
    bias: np.ndarray     # (K,) the bias added to each of its channels


def bias_layers(model: Model) -> list[BiasLayer]:
    """The model's bias layers in graph order: 2-D convolutions with a constant bias, batch norms,
    and Adds of a per-channel constant to a (N, C, h, w) tensor."""
    g = model.light.graph
    consts = constants(g)
    shapes = tensor_shapes(model.light)
    out = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "BatchNormalization", "Add"):
            continue
        if node.op_type == "Add":
            bias = _channel_constant(node, consts, shapes)
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1], (0, None))[1]
            if w is None or len(w) != 4 or len(node.input) < 3 or not node.input[2]:
                continue
            bias = consts.get(node.input[2])
        else:
            shape = shapes.get(node.output[0], (0, None))[1]
            stats = [consts.get(name) for name in node.input[1:5]]
            if shape is None or len(shape) != 4 or any(s is None for s in stats):
                continue
            scale, beta, mean, var = (np.asarray(s, np.float64) for s in stats)
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            bias = beta - mean * scale / np.sqrt(var + eps)
        if bias is not None:
            out.append(BiasLayer(node.output[0], np.asarray(bias, np.float64).reshape(-1)))
    return out


def _channel_constant(node, consts, shapes) -> "np.ndarray | None":
    """The constant of ``tensor + c`` when c holds one value per channel of a rank-4 tensor, else None."""
    shape = shapes.get(node.output[0], (0, None))[1]
    if shape is None or len(shape) != 4 or not shape[1]:
        return None
    values = [consts.get(i) for i in node.input]
    if sum(v is not None for v in values) != 1:
        return None
    c = next(v for v in values if v is not None)
    if tuple(c.shape) not in ((shape[1], 1, 1), (1, shape[1], 1, 1)):
        return None
    return c


def _min_max(m: np.ndarray) -> np.ndarray:
    """Each (h, w) map of (..., h, w) shifted to 0 and divided by 1e-7 + its maximum (pytorch-grad-cam's scale)."""
    m = m - m.min(axis=(-2, -1), keepdims=True)
    return m / (EPS + m.max(axis=(-2, -1), keepdims=True))


def scaled_channel_sum(m: np.ndarray) -> np.ndarray:
    """(T, K, h, w) -> (T, h, w): each channel min-max normalised over its positions, then summed."""
    return _min_max(m).sum(axis=1)


def _eigen_smoothed(parts: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's FullGrad ``eigen_smooth``: the (T, M, H, W) component maps (the input term's
    channels and each layer's sum), each normalised and shrunk to 1/8 of the input size, replaced by
    their first principal component (oriented as Eigen-CAM's), normalised and resized back."""
    from .cam import first_component

    small = resize(_min_max(parts), (max(1, size[0] // 8), max(1, size[1] // 8)))
    proj = np.stack([first_component(m) for m in small.astype(np.float64)])
    return resize(_min_max(proj).astype(np.float32), size)


@method("fullgrad", family="gradient")
def fullgrad(ctx: Context, eigen_smooth: bool = False) -> np.ndarray:
    """FullGrad: normalised |input x gradient| plus normalised |bias x gradient| of every conv and batch-norm layer."""
    layers = bias_layers(ctx.model)
    name = ctx.model.input.name
    xb = np.repeat(ctx.x, len(ctx.targets), axis=0)
    out = ctx.gradients(xb, ctx.seeds, wrt=[name] + [layer.tensor for layer in layers], clean_row=0)
    x = ctx.channels_first(ctx.x).astype(np.float64)
    gx = ctx.channels_first(out["grad_" + name]).astype(np.float64)
    per_layer = [scaled_channel_sum(np.abs(layer.bias[None, :, None, None] * out["grad_" + layer.tensor]
                                           .astype(np.float64))) for layer in layers]
    if eigen_smooth:                   # the input term keeps one map per channel
        parts = [_min_max(np.abs(x * gx))] + [resize(s.astype(np.float32), ctx.input_size)[:, None] for s in per_layer]
        return _eigen_smoothed(np.concatenate(parts, axis=1).astype(np.float32), ctx.input_size)
    by_size: dict[tuple, np.ndarray] = {}
    for s in per_layer:
        by_size[s.shape[1:]] = by_size.get(s.shape[1:], 0) + s
    total = scaled_channel_sum(np.abs(x * gx))
    for s in by_size.values():
        total = total + resize(s.astype(np.float32), ctx.input_size)
    return total.astype(np.float32)
