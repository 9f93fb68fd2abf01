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

from .errors import TargetError
from .graph.surgery import Appender

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
    a = Appender(out, "onnxsal_similarity")
    unit = (reference / np.linalg.norm(reference)).astype(np.float32)
    e = a.op("Flatten", [output], axis=1)
    norm = a.op("Sqrt", [a.reduce("ReduceSum", a.op("Mul", [e, e]), [1])])
    dot = a.reduce("ReduceSum", a.op("Mul", [e, a.const(unit[None, :])]), [1])
    sim = a.op("Div", [dot, a.op("Max", [norm, a.const(EPS)])], "similarity")
    a.declare(sim, onnx.TensorProto.FLOAT, [1], output, output=True)
    return out, sim
