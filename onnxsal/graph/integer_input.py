"""Models that take their image as integers, given a float input that carries real pixel values.

A model exported with its preprocessing inside (``x.float() / 255`` in PyTorch, a Keras ``Input``
of dtype uint8) takes uint8 pixels, so a service can feed the decoded image as it is. No gradient
exists with respect to integers, and the perturbation methods blend images into values between
them. The integers are the pixel format, not part of what the model computes: its first step
turns them into floats. So such a model gets a float input in their place, once, at load:

- ops that only move pixels (``Transpose``, ``Reshape``, ``Slice``, ``Pad``...) run on the real
  values, and a ``Cast`` to a float type takes them as they are. On an image's own integer pixels
  this is the model, bit for bit; between them it is the same arithmetic on real numbers.
- an op that computes on the integers themselves (a ``DequantizeLinear``, a ``QLinearConv``) gets
  them back from a ``QuantizeLinear`` with scale 1, which rounds and saturates as storing the
  values in the model's type would; its gradient is the straight-through one of ``rules/quant.py``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from ..preprocess import Preprocess
from .normalize import FLOAT_TYPES, opset_of, static_dims
from .qoperator import MOVERS
from .surgery import ReadableNames, node_attrs, rename_tensor

# pixel types, and the opset from which QuantizeLinear can write each (for ops that need the integers)
PIXEL_TYPES = {TensorProto.UINT8: 10, TensorProto.INT8: 10, TensorProto.UINT16: 21, TensorProto.INT16: 21}


def pixel_preprocess(elem_type: int) -> Optional[Preprocess]:
    """The preprocessing an integer image input implies, when its type has a convention: uint8
    holds the decoded image's own 0-255 values, int8 the pixel minus 128 (TFLite's quantisation of
    a [0, 1] or [-1, 1] input); None for 16-bit types, whose scale varies."""
    if elem_type == TensorProto.UINT8:
        return Preprocess.from_preset("raw")
    if elem_type == TensorProto.INT8:
        return Preprocess.from_preset("raw", mean=(128.0,) * 3)
    return None


def integer_image_input(model: onnx.ModelProto) -> Optional[onnx.ValueInfoProto]:
    """The model's one input when it holds 8- or 16-bit integers of rank 2 to 4; None otherwise."""
    stored = {i.name for i in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in stored]
    if len(inputs) != 1 or inputs[0].type.tensor_type.elem_type not in PIXEL_TYPES:
        return None
    dims = static_dims(inputs[0])
    return inputs[0] if dims is not None and 2 <= len(dims) <= 4 else None


def as_real(model: onnx.ModelProto, vi: onnx.ValueInfoProto) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` whose integer input ``vi`` is a float32 input of the same shape (see the
    module docstring), and a note that says how it was read."""
    elem = vi.type.tensor_type.elem_type
    type_name = helper.tensor_dtype_to_np_dtype(elem).name
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    names = ReadableNames(g)
    in_subgraphs = _names_in_subgraphs(g)
    graph_outputs = {o.name for o in g.output}
    real = {vi.name: names(f"{vi.name}_real")}      # integer tensor -> the float tensor of its real values
    materialised: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    scale = zero = ""

    def integers(name: str, user: str) -> None:
        """Bring back integer tensor ``name`` for ``user``: QuantizeLinear(real, 1, 0)."""
        nonlocal scale, zero
        if name in materialised:
            return
        if opset_of(model) < PIXEL_TYPES[elem]:
            raise ModelError(f"the {type_name} input {vi.name!r} reaches {user} as integers; onnxsal reads {type_name} "
                             f"pixels through a Cast to float or ops that only move them, or through QuantizeLinear "
                             f"from opset {PIXEL_TYPES[elem]} (the model has {opset_of(model)})")
        if not scale:
            scale, zero = names(f"{vi.name}_unit_scale"), names(f"{vi.name}_zero")
            g.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), scale))
            g.initializer.append(numpy_helper.from_array(np.array(0, helper.tensor_dtype_to_np_dtype(elem)), zero))
        nodes.append(helper.make_node("QuantizeLinear", [real[name], scale, zero], [name],
                                      name=names(f"{name}/QuantizeLinear")))
        materialised.add(name)

    needed = graph_outputs | in_subgraphs       # read as integers where the node walk cannot see it

    def kept_as_integers(name: str) -> None:
        if name in needed:
            integers(name, f"the graph output {name!r}" if name in graph_outputs else "a subgraph")

    kept_as_integers(vi.name)
    for node in g.node:
        data = [i for i in node.input if i in real]
        if not data:
            nodes.append(node)
            continue
        attrs = node_attrs(node)
        if node.domain in ("", "ai.onnx") and node.op_type == "Cast" and attrs.get("to") in FLOAT_TYPES:
            nodes.append(helper.make_node("Cast", [real[node.input[0]]], list(node.output), name=node.name, to=attrs["to"]))
        elif node.domain in ("", "ai.onnx") and node.op_type in MOVERS and data == [node.input[0]] \
                and not (node.op_type == "Pad" and attrs.get("mode", b"constant") not in (b"constant", "constant")):
            rest = list(node.input[1:])
            if node.op_type == "Pad" and len(rest) > 1 and rest[1]:      # the integer it fills with, as a real value
                rest[1] = names(f"{node.output[0]}_fill")
                nodes.append(helper.make_node("Cast", [node.input[2]], [rest[1]], name=names(f"{rest[1]}/Cast"),
                                              to=TensorProto.FLOAT))
            outs = []
            for k, o in enumerate(node.output):
                if o and not (node.op_type == "MaxPool" and k == 1):       # MaxPool's indices stay integers
                    real[o] = names(f"{o}_real")
                    outs.append(real[o])
                else:
                    outs.append(o)
            nodes.append(helper.make_node(node.op_type, [real[node.input[0]]] + rest, outs,
                                          name=node.name or names(f"{outs[0]}/{node.op_type}"), **attrs))
            for o in node.output:
                if o in real:
                    kept_as_integers(o)
        else:
            for i in data:
                integers(i, f"{node.op_type} node {node.name!r}")
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    gone = set(real) - materialised
    kept = [v for v in g.value_info if v.name not in gone]
    del g.value_info[:]
    g.value_info.extend(kept)
    shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
             for d in vi.type.tensor_type.shape.dim]
    k = next(i for i, x in enumerate(g.input) if x.name == vi.name)
    g.input.remove(g.input[k])
    g.input.insert(k, helper.make_tensor_value_info(real[vi.name], TensorProto.FLOAT, shape))
    if vi.name not in in_subgraphs:          # the float input keeps the model's input name
        if vi.name in materialised:
            rename_tensor(g, vi.name, names(f"{vi.name}_{type_name}"))
        rename_tensor(g, real[vi.name], vi.name)
    how = f"read the {type_name} input {vi.name!r} as real pixel values (float32)"
    if materialised:
        how += f", rounded back to {type_name} where the model computes on the integers"
    return out, how


def _names_in_subgraphs(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name that the bodies of If/Loop/Scan nodes read."""
    found: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                for n in sub.node:
                    found.update(n.input)
                found |= _names_in_subgraphs(sub)
    return found
