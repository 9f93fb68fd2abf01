"""Hessian-vector products: the VJP graph differentiated a second time.

``g(a) = d<grad_y, y>/da`` is itself a graph of ONNX ops (the forward pass after ``a``, then the
backward pass), so the same builder differentiates it again: the VJP of ``g`` with cotangent
``v`` is ``H v`` (``H`` symmetric), the Hessian of the score with respect to ``a`` applied to
``v``. ShapleyCAM weighs a layer's channels with ``g - H a / 2``.

Masks of piecewise-linear ops (ReLU steps, max-pool routing) are constant almost everywhere, so
their rules give them no gradient; the curvature comes from smooth ops (softmax, sigmoid, GELU,
normalisations) on the path. Every backward op must have a rule of its own, as every forward op
must for a first derivative: the first pass therefore takes LayerNormalization's statistics from
elementwise ops and reductions, not from the statistics outputs of a second LayerNormalization,
which have no rule.
"""

from __future__ import annotations

import onnx

from .autodiff import GRAD_PREFIX, vjp
from .surgery import rename_tensor

FIRST = "onnxsal_first_grad_"


def first_grad_name(a: str) -> str:
    """Name of the first-order gradient of ``a`` in the graph :func:`hvp` builds."""
    return FIRST + a


def hvp(model: onnx.ModelProto, y: str, a: str, outputs=()) -> onnx.ModelProto:
    """Graph with inputs (model inputs, ``grad_<y>``, ``grad_<first_grad_name(a)>``) and outputs
    (``first_grad_name(a)`` = d<grad_y, y>/da, ``outputs``, ``grad_<a>`` = H v), where ``v`` is
    the second cotangent (fed as ``grad_<first_grad_name(a)>``, shaped like ``a``)."""
    from .rules.norm import layer_normalization_primitive

    first = vjp(model, y, [a], outputs=list(outputs), rules={"LayerNormalization": layer_normalization_primitive})
    rename_tensor(first.graph, GRAD_PREFIX + a, first_grad_name(a))
    return vjp(first, first_grad_name(a), [a], outputs=[y, *outputs], simplify=False)
