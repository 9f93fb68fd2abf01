"""Half-precision models, explained in float32.

Images, seeds and cotangents enter every derived graph as float32, and each method does its
arithmetic in float32. A model converted to float16 (onnxconverter-common's
``convert_float_to_float16``, with or without ``keep_io_types``) or to bfloat16 would need every
feed, every layer's activations and every cotangent in its own type; and a gradient in float16
underflows where saliency needs its small values (a float16 has 10 bits of mantissa and nothing
below 6e-8). So such a model is lifted to float32 once, when it is loaded: its weights keep their
values exactly (every float16 and bfloat16 is a float32), its arithmetic runs in float32, and its
scores differ from the half-precision model's by that model's own rounding. A model whose image
input is float64 is brought down to float32 the same way, since ONNX Runtime's CPU build has no
float64 convolution.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .surgery import subgraphs
from .weights import array

HALF = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
LIFTED_NAMES = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
# Ops whose output type is an attribute rather than an input's type.
_DTYPE_ATTRS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                "RandomUniformLike": "dtype", "EyeLike": "dtype", "Bernoulli": "dtype"}
_TENSOR_ATTRS = {"Constant": "value", "ConstantOfShape": "value"}


def source_types(model: onnx.ModelProto, image_type: int) -> set[int]:
    """The float types to lift to float32: half types wherever they occur, float64 when the image is float64."""
    found: set[int] = set()
    if image_type in HALF + (TensorProto.DOUBLE,):
        found.add(image_type)
    for g in _graphs(model.graph):
        found.update(t.data_type for t in g.initializer if t.data_type in HALF)
        found.update(t for _, t in _typed_attributes(g) if t in HALF)
    return found


def to_float32(model: onnx.ModelProto, types: set[int]) -> None:
    """Rewrite ``model`` in place so that every tensor of a type in ``types`` is float32."""
    for g in _graphs(model.graph):
        for i, t in enumerate(g.initializer):
            if t.data_type in types:
                g.initializer[i].CopyFrom(_lifted(t))
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            tt = vi.type.tensor_type
            if tt.elem_type in types:
                tt.elem_type = TensorProto.FLOAT
        for a, t in list(_typed_attributes(g)):
            if t not in types:
                continue
            if a.type == onnx.AttributeProto.INT:
                a.i = TensorProto.FLOAT
            else:
                a.t.CopyFrom(_lifted(a.t))


def _typed_attributes(graph: onnx.GraphProto):
    """(attribute, the tensor type it sets) for each node attribute that sets one: a dtype or a value."""
    for n in graph.node:
        for a in n.attribute:
            if a.name == _DTYPE_ATTRS.get(n.op_type):
                yield a, a.i
            elif a.name == _TENSOR_ATTRS.get(n.op_type):
                yield a, a.t.data_type


def _lifted(t: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array(t), dtype=np.float32), t.name)


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If, Loop, Scan bodies) inside it."""
    yield graph
    yield from subgraphs(graph)
