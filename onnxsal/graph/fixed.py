"""Inputs besides the image, held at values the user gives (Captum's ``additional_forward_args``).

A model may take more than the image: a temperature, a mask, per-image metadata concatenated
before the head. onnxsal explains the image; every other input is baked into the graph as a
constant, so each derived graph (VJP, split, masked batches, ``export``) sees one image input and
the rules never differentiate the held values. A value given for one image (leading dimension 1)
of an input whose leading dimension is the batch is repeated along the run's batch with an
``Expand`` on the image's batch size, so noisy copies and masked batches each get it.
"""

from __future__ import annotations

import os
from typing import Mapping, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError
from .normalize import static_dims
from .surgery import ReadableNames

Value = Union[np.ndarray, float, int, list, str, os.PathLike]


def parse_value(text: str) -> np.ndarray:
    """A command-line value: a .npy file, or numbers separated by commas."""
    if text.endswith(".npy"):
        from ..preprocess import read_npy

        return read_npy(text, "input value", ModelError)
    try:
        return np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise ModelError(f"an input value is a .npy file or numbers separated by commas, not {text!r}") from None


def hold(model: onnx.ModelProto, values: Mapping[str, Value]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs in ``values`` are constants; the one input left is the image's."""
    if not isinstance(values, Mapping):
        raise ModelError(f"fixed inputs map each input's name to its value, not {type(values).__name__}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name for i in g.initializer}
    declared = {vi.name: vi for vi in g.input if vi.name not in inits}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ModelError(f"the model has no input {', '.join(map(repr, unknown))}; its inputs: {', '.join(declared)}")
    left = [name for name in declared if name not in values]
    if len(left) != 1:
        raise ModelError(f"with {', '.join(values)} held, the model's inputs left are {', '.join(left) or 'none'}; "
                         "onnxsal explains exactly one image input")
    image = left[0]
    names = ReadableNames(g)
    image_dims = static_dims(declared[image]) or [None]
    front: list[onnx.NodeProto] = []
    for name, raw in values.items():
        vi = declared[name]
        tt = vi.type.tensor_type
        array = parse_value(os.fspath(raw)) if isinstance(raw, (str, os.PathLike)) else np.asarray(raw)
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = static_dims(vi)
        array = _shaped(name, array.astype(dtype), dims)
        if array.dtype.kind == "f" and not np.isfinite(array).all():   # NaN scores would follow, not an error
            raise ModelError(f"the value for input {name!r} holds NaN or infinite values")
        per_image = (dims is not None and len(dims) >= 2 and array.shape[0] == 1
                     and (dims[0] is None or dims[0] == image_dims[0]))
        g.input.remove(vi)
        if not per_image:
            g.initializer.append(numpy_helper.from_array(array, name))
            continue
        one, first, rest = names(f"{name}_one_image"), names(f"{name}_axis0"), names(f"{name}_rest_shape")
        g.initializer.append(numpy_helper.from_array(array, one))
        g.initializer.append(numpy_helper.from_array(np.asarray([0], np.int64), first))
        g.initializer.append(numpy_helper.from_array(np.asarray(array.shape[1:], np.int64), rest))
        shape, batch, target = names(f"{name}_image_shape"), names(f"{name}_batch"), names(f"{name}_shape")
        front += [helper.make_node("Shape", [image], [shape], name=names(f"{name}/Shape")),
                  helper.make_node("Gather", [shape, first], [batch], name=names(f"{name}/Gather"), axis=0),
                  helper.make_node("Concat", [batch, rest], [target], name=names(f"{name}/Concat"), axis=0),
                  helper.make_node("Expand", [one, target], [name], name=names(f"{name}/Expand"))]
    nodes = front + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return out


def _shaped(name: str, array: np.ndarray, dims) -> np.ndarray:
    """``array`` in the input's declared shape: the numbers of a flat list laid out in it when its
    size fits, a free leading dimension taken as 1."""
    if dims is None:
        return array
    want = [1 if (d is None and k == 0) else d for k, d in enumerate(dims)]
    if None not in want and array.shape != tuple(want) and array.size == int(np.prod(want)):
        return array.reshape(want)
    fits = len(array.shape) == len(dims) and all(d is None or d == s for d, s in zip(dims, array.shape))
    if not fits:
        shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        raise ModelError(f"the value for input {name!r} has shape {tuple(array.shape)}; the input is {shown}")
    return array
