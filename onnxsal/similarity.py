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
from onnx import TensorProto, helper, numpy_helper

from .errors import TargetError
from .graph.surgery import Appender

EPS = 1e-8        # torch.nn.functional.cosine_similarity's
REFERENCE = "onnxsal_similarity_reference"     # the reference's unit vector, (1, D): a constant, or computed
# from the exported graph's `reference` input (`as_input`)


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
    a = Appender(out, "onnxsal_similarity")
    unit = (reference / np.linalg.norm(reference)).astype(np.float32)
    e = a.op("Flatten", [output], axis=1)
    norm = a.op("Sqrt", [a.reduce("ReduceSum", a.op("Mul", [e, e]), [1])])
    if any(t.name == REFERENCE for t in out.graph.initializer):
        raise TargetError("the model already scores a similarity; start again from the model itself")
    out.graph.initializer.append(numpy_helper.from_array(unit[None, :], REFERENCE))
    dot = a.reduce("ReduceSum", a.op("Mul", [e, REFERENCE]), [1])
    sim = a.op("Div", [dot, a.op("Max", [norm, a.const(EPS)])], "similarity")
    a.declare(sim, onnx.TensorProto.FLOAT, [1], output, output=True)
    return out, sim


def as_input(graph: onnx.GraphProto, name: str = "reference", source: str = "") -> None:
    """Turn the similarity head's constant reference into a graph input ``name``, (1, D) or one row
    per image, any non-zero vectors: the graph computes their unit vectors where the constant stood,
    so the forward pass and its gradient both read the references fed at run time. ``source``: the
    rows to normalise when they are not the input itself (the input's rows repeated for the stacked
    copies an exported SmoothGrad or IG runs); the caller then sorts the graph."""
    held = next((t for t in graph.initializer if t.name == REFERENCE), None)
    if held is None:
        raise TargetError("a reference input needs a model that scores a similarity (Explainer.like)")
    width = int(held.dims[-1])
    graph.initializer.remove(held)
    graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["R", width]))
    rows = source or name

    def const(value, dtype=np.float32) -> str:
        t = numpy_helper.from_array(np.asarray(value, dtype), f"{REFERENCE}/{len(graph.initializer)}")
        graph.initializer.append(t)
        return t.name

    def node(op: str, inputs: list, out: str, **attrs) -> str:
        graph.node.insert(0, helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    # inserted at the front in reverse order of use, so the graph stays topologically sorted
    norm = f"{REFERENCE}/norm"
    node("Div", [rows, f"{REFERENCE}/floor"], REFERENCE)
    node("Max", [norm, const(EPS)], f"{REFERENCE}/floor")
    node("Sqrt", [f"{REFERENCE}/square_sum"], norm)
    node("ReduceSum", [f"{REFERENCE}/square", const([1], np.int64)], f"{REFERENCE}/square_sum", keepdims=1)
    node("Mul", [rows, rows], f"{REFERENCE}/square")


def reference_width(graph: onnx.GraphProto) -> int:
    """The width D of the similarity head's reference, which the model must have."""
    held = next((t for t in graph.initializer if t.name == REFERENCE), None)
    if held is None:
        raise TargetError("a reference input needs a model that scores a similarity (Explainer.like)")
    return int(held.dims[-1])
