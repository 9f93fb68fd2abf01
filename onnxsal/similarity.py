"""The cosine similarity of a model's output to a reference's, as a score of its own.

An embedding model (face recognition, re-identification, an image encoder) has no classes: what a
user asks is why two images match. pytorch-grad-cam's ``SimilarityToConceptTarget`` scores the
cosine similarity between an input's embedding and a concept's; the same score here is a head added
to the graph, ``sim = <e, r> / max(|e| |r|, 1e-8)`` (PyTorch's ``cosine_similarity``), with the
reference ``r`` a constant. Being in the graph, it is differentiated like any output: each input a
method runs (a noisy copy, a point on Integrated Gradients' path) scores its own similarity, the
completeness gap is the similarity's, and ``export`` writes it into the explainer graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import TargetError
from .graph.normalize import opset_of
from .graph.surgery import ReadableNames

EPS = 1e-8        # torch.nn.functional.cosine_similarity's


def reference_vector(values: np.ndarray, width: int, what: str) -> np.ndarray:
    """``values`` as a finite, non-zero vector of ``width`` entries, or a typed error naming why."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size != width:
        raise TargetError(f"{what} holds {v.size} values; the model's output per image holds {width}")
    if not np.isfinite(v).all() or not np.any(v):
        raise TargetError(f"{what} must be finite and not all zero")
    return v


def with_similarity(proto: onnx.ModelProto, output: str, reference: np.ndarray) -> tuple[onnx.ModelProto, str]:
    """A copy of ``proto`` with one more output, (N, 1): each image's cosine similarity of
    ``output`` (flattened after the batch axis) to ``reference``. Returns the copy and the name."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    fresh = ReadableNames(g)
    opset = opset_of(out)
    unit = (reference / np.linalg.norm(reference)).astype(np.float32)

    def const(values, dtype=np.float32) -> str:
        name = fresh("onnxsal_similarity_const")
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(op_type: str, inputs: list, name: str = "", **attrs) -> str:
        res = name or fresh(f"onnxsal_similarity_{op_type.lower()}")
        g.node.append(helper.make_node(op_type, inputs, [res], name=fresh(f"onnxsal_{op_type.lower()}"), **attrs))
        return res

    def row_sum(x: str, name: str = "") -> str:
        if opset >= 13:
            return op("ReduceSum", [x, const([1], np.int64)], name, keepdims=1)
        return op("ReduceSum", [x], name, axes=[1], keepdims=1)

    e = op("Flatten", [output], axis=1)
    norm = op("Sqrt", [row_sum(op("Mul", [e, e]))])
    sim = fresh("similarity")
    op("Div", [row_sum(op("Mul", [e, const(unit[None, :])])), op("Max", [norm, const(EPS)])], sim)
    g.output.insert(0, helper.make_tensor_value_info(sim, onnx.TensorProto.FLOAT, [None, 1]))
    batch = next((vi.type.tensor_type.shape.dim[0] for vi in list(g.output) + list(g.value_info)
                  if vi.name == output and vi.type.tensor_type.shape.dim), None)
    if batch is not None:
        g.output[0].type.tensor_type.shape.dim[0].CopyFrom(batch)
    return out, sim
