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

from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import TargetError
from .graph.surgery import Appender, rename_tensor

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
    if _held(proto.graph) is not None:
        raise TargetError("the model already scores a similarity; start again from the model itself")
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    a = Appender(out, "onnxsal_similarity")
    unit = (reference / np.linalg.norm(reference)).astype(np.float32)
    out.graph.initializer.append(numpy_helper.from_array(unit[None, :], REFERENCE))
    e = a.op("Flatten", [output], axis=1)
    dot = a.reduce("ReduceSum", a.op("Mul", [e, REFERENCE]), [1])
    sim = a.op("Div", [dot, _row_norms(a, e)], "similarity")
    a.declare(sim, onnx.TensorProto.FLOAT, [1], output, output=True)
    return out, sim


def _held(graph: onnx.GraphProto) -> Optional[onnx.TensorProto]:
    """The similarity head's reference constant, None when the graph scores no similarity."""
    return next((t for t in graph.initializer if t.name == REFERENCE), None)


def holds_reference(graph: onnx.GraphProto) -> bool:
    return _held(graph) is not None


def as_input(model: onnx.ModelProto, name: str = "reference", source: str = "") -> None:
    """Turn the similarity head's constant reference into a graph input ``name``, (1, D) or one row
    per image, any non-zero vectors: the graph computes their unit vectors where the constant stood,
    so the forward pass and its gradient both read the references fed at run time. ``source``: the
    rows to normalise when they are not the input itself (the input's rows repeated for the stacked
    copies an exported SmoothGrad or IG runs). The nodes are appended: the caller sorts the graph."""
    width = reference_width(model.graph)
    model.graph.initializer.remove(_held(model.graph))
    model.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["R", width]))
    rows = source or name
    a = Appender(model, "onnxsal_reference")
    rename_tensor(model.graph, REFERENCE, a.op("Div", [rows, _row_norms(a, rows)], "unit_reference"))


def _row_norms(a: Appender, rows: str) -> str:
    """Each row's L2 norm of a (N, D) tensor, at least EPS (as cosine_similarity clamps it), (N, 1)."""
    return a.op("Max", [a.op("Sqrt", [a.reduce("ReduceSum", a.op("Mul", [rows, rows]), [1])]), a.const(EPS)])


def reference_width(graph: onnx.GraphProto) -> int:
    """The width D of the similarity head's reference, which the model must have."""
    held = _held(graph)
    if held is None:
        raise TargetError("a reference input needs a model that scores a similarity (Explainer.like)")
    return int(held.dims[-1])
