"""Models whose image comes in flat or without a channel axis, given a standard image input.

An MNIST-style classifier takes ``(N, 784)`` or ``(N, 28, 28)``; the rest of onnxsal (preprocessing,
masked batches, CAM layers, ``export``) works on ``(N, C, H, W)``. Rather than a second path through
every method, such a model gets a new 1-channel NCHW input with a ``Reshape`` to what it took in
front, once, at load: the gradient flows through the ``Reshape`` to the new input, and the maps
come out at H × W. A flat input's H × W is ``--size``, or the square root when its length is a
square (784 = 28 × 28).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError, SizeError
from .normalize import FLOAT_TYPES, static_dims
from .surgery import ReadableNames


def needs_image_input(model: onnx.ModelProto) -> Optional[onnx.ValueInfoProto]:
    """The model's one input when it is a float ``(N, D)`` or ``(N, H, W)``; None otherwise."""
    stored = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in stored]
    if len(inputs) != 1:
        return None
    dims = static_dims(inputs[0])
    if inputs[0].type.tensor_type.elem_type not in FLOAT_TYPES or dims is None or len(dims) not in (2, 3):
        return None
    if len(dims) == 2 and dims[0] in (None, 1) and dims[1] is not None and dims[1] < 16:
        return None          # a few features per row: not an image
    if dims[0] not in (None, 1) or any(d is not None and d <= 4 for d in dims[1:]):
        # (3, 224, 224) or (224, 224, 3): an image without a batch axis, not a batch of grey images
        raise ModelError(f"input {inputs[0].name!r} {dims} has no batch axis that onnxsal can tell; it needs "
                         "(N, C, H, W), (N, H, W, C), (N, H, W) or (N, H*W): re-export the model with a batch axis")
    return inputs[0]


def as_image(model: onnx.ModelProto, vi: onnx.ValueInfoProto,
             size: Optional[Sequence[int]]) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` with a ``(N, 1, H, W)`` input in front of ``vi``, its flat or channel-less
    one (`needs_image_input`), and a note that says how it was read."""
    dims = static_dims(vi)
    if len(dims) == 3:
        h, w = (dims[1], dims[2]) if None not in dims[1:] else (tuple(size) if size else (None, None))
        if h is None:
            raise SizeError(f"input {vi.name!r} {dims} has a dynamic size; give one with --size HxW (API: size=(H, W))")
        target = [0, h, w]
        how = f"read the {h}x{w} input {vi.name!r} as a 1-channel image"
    else:
        length = dims[1]
        if length is None:
            raise SizeError(f"input {vi.name!r} is flat with a free length; onnxsal needs an image input")
        if size:
            h, w = size
        elif math.isqrt(length) ** 2 == length:
            h = w = math.isqrt(length)
        else:
            raise SizeError(f"no image-like input: {vi.name!r} is flat ({length} values); if it is an image, "
                            "give its size with --size HxW")
        if h * w != length:
            raise SizeError(f"input {vi.name!r} has {length} values, not {h}x{w} = {h * w}")
        target = [0, length]
        how = f"read the flat input {vi.name!r} ({length} values) as a 1-channel {h}x{w} image"
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = ReadableNames(g)
    image, shape = names(f"{vi.name}_image"), names(f"{vi.name}_shape")
    new = helper.make_tensor_value_info(image, vi.type.tensor_type.elem_type,
                                        [vi.type.tensor_type.shape.dim[0].dim_param or dims[0] or "N", 1, h, w])
    g.input.remove(next(i for i in g.input if i.name == vi.name))
    g.input.insert(0, new)
    g.initializer.append(numpy_helper.from_array(np.asarray(target, np.int64), shape))
    g.node.insert(0, helper.make_node("Reshape", [image, shape], [vi.name], name=names(f"{vi.name}/Reshape")))
    return out, how
