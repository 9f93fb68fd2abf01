"""ONNX Runtime's fused ops, written back as the standard ops they stand for.

A model saved from an ONNX Runtime session (``SessionOptions.optimized_model_filepath``, as
deployment scripts do to skip the optimiser at start-up) carries ``com.microsoft`` ops: a
``FusedConv`` for every convolution with its activation, ``QuickGelu`` for every SiLU,
``FusedMatMul``, ``BiasGelu`` and ``SkipLayerNormalization`` in transformers. The autodiff has
rules for standard ops, and the layer finder looks for ``Conv``; rather than a second rule per
fused op, each one is expanded once, at load, into the ops it fuses. The expanded graph computes
the same function (ONNX Runtime fuses it again when it builds a session), every existing rule
applies to it, and the fused node's output keeps its name, so a CAM layer is the same tensor as
in the unfused model. Ops of ONNX Runtime's hardware-specific layouts (``com.microsoft.nchwc``,
written at the highest optimisation level) are not expanded; the autodiff names them.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelError
from .normalize import opset_of, without_weight_data
from .surgery import MS, FreshNames, ReadableNames, node_attrs
EXPANDED = ("BiasGelu", "FastGelu", "FusedConv", "FusedGemm", "FusedMatMul", "Gelu", "QuickGelu",
            "SkipLayerNormalization")


def fused_ops(model: onnx.ModelProto) -> list[str]:
    """The ``com.microsoft`` op types in the top-level graph that `expand` writes out, sorted."""
    return sorted({n.op_type for n in model.graph.node if n.domain == MS and n.op_type in EXPANDED})


def expand(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every fused op of `EXPANDED` replaced; ``model`` itself if it has none.

    Expects a default-domain opset of at least 13 (``normalize.upgrade_opset``), so that the
    emitted ``Clip`` takes its bounds as inputs and ``Einsum`` exists.
    """
    if not fused_ops(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    ranks = _ranks(out) if any(n.op_type == "FusedMatMul" for n in g.node) else {}
    e = _Emitter(g, opset_of(out))
    for node in g.node:
        if node.domain == MS and node.op_type in EXPANDED:
            _EXPANDERS[node.op_type](e, node, ranks)
        else:
            e.nodes.append(node)
    del g.node[:]
    g.node.extend(e.nodes)
    g.initializer.extend(e.initializers)
    if not any(n.domain == MS for n in g.node):
        keep = [imp for imp in out.opset_import if imp.domain != MS]
        del out.opset_import[:]
        out.opset_import.extend(keep)
    return out


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks that shape inference finds before the first fused op; later ones stay unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weight_data(model))
    except Exception:
        return {}
    g = inferred.graph
    ranks = {i.name: len(i.dims) for i in model.graph.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            ranks[vi.name] = len(tt.shape.dim)
    return ranks


class _Emitter:
    """Collects the replacement nodes and their scalar constants, with names nothing else has."""

    def __init__(self, graph: onnx.GraphProto, opset: int) -> None:
        self.unique = ReadableNames(graph)
        self.fresh = FreshNames(self.unique.used, "onnxsal_ms/")
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, value: float, hint: str) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], source: onnx.NodeProto, output: Optional[str] = None,
           **attrs) -> str:
        """Emit one node named after the fused one (``<name>/Conv``); its output is ``output`` (the
        fused node's own) or ``<name>/Conv_output_0``."""
        base = f"{source.name or source.output[0]}/{op_type}"
        out = output or self.unique(base + "_output_0")
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.unique(base), **attrs))
        return out


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _activation(e: _Emitter, node: onnx.NodeProto, kind: str, params: list[float], x: str, y: str) -> None:
    """``y = kind(x)`` with ONNX Runtime's parameter order (alpha, beta; Clip's min, max)."""
    if not kind:
        e.op("Identity", [x], node, y)
    elif kind in ("Relu", "Sigmoid", "Tanh"):
        e.op(kind, [x], node, y)
    elif kind == "LeakyRelu":
        e.op(kind, [x], node, y, alpha=float(params[0]) if params else 0.01)
    elif kind == "HardSigmoid":
        alpha, beta = (list(params) + [0.2, 0.5][len(params):])[:2]
        e.op(kind, [x], node, y, alpha=float(alpha), beta=float(beta))
    elif kind == "Clip" and len(params) >= 2:
        e.op(kind, [x, e.const(params[0], "clip_min"), e.const(params[1], "clip_max")], node, y)
    else:
        raise ModelError(f"node {node.name or node.output[0]!r}: {MS} {node.op_type} with activation {kind!r} "
                         f"{list(params)} is not one onnxsal can write as standard ops")


def _fused_conv(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    """``act(Conv(X, W, B) + Z)``: the optional fourth input is a tensor summed in before the activation."""
    a = node_attrs(node)
    kind, params = _text(a.pop("activation", "")), list(a.pop("activation_params", []))
    ins = list(node.input)
    z = ins[3] if len(ins) > 3 and ins[3] else None
    conv = e.op("Conv", ins[:2] + ([ins[2]] if len(ins) > 2 and ins[2] else []), node, None, **a)
    if z:
        conv = e.op("Add", [conv, z], node)
    _activation(e, node, kind, params, conv, node.output[0])


def _fused_gemm(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    a = node_attrs(node)
    kind = _text(a.pop("activation", ""))
    params = [a.pop(k) for k in ("activation_alpha", "activation_beta", "activation_gamma") if k in a]
    _activation(e, node, kind, params, e.op("Gemm", list(node.input), node, None, **a), node.output[0])


def _fused_matmul(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    """``alpha · op(A) @ op(B)``: op moves the first (batch) axis before the last two
    (``transBatch*``), then swaps the last two (``trans*``)."""
    a = node_attrs(node)
    alpha = float(a.get("alpha", 1.0))
    operands = []
    for x, tb, t in ((node.input[0], a.get("transBatchA", 0), a.get("transA", 0)),
                     (node.input[1], a.get("transBatchB", 0), a.get("transB", 0))):
        if tb or t:
            r = ranks.get(x)
            if r is None and tb:
                raise ModelError(f"node {node.name or node.output[0]!r}: {MS} FusedMatMul moves the batch axis of "
                                 f"{x!r}, whose rank shape inference cannot tell")
            if r is None:       # the last two axes swapped, whatever the rank
                x = e.op("Einsum", [x], node, None, equation="...ij->...ji")
            else:
                perm = list(range(r))
                if tb:
                    perm = perm[1:r - 1] + [0, r - 1]
                if t:
                    perm[-2], perm[-1] = perm[-1], perm[-2]
                x = e.op("Transpose", [x], node, None, perm=perm)
        operands.append(x)
    if alpha == 1.0:
        e.op("MatMul", operands, node, node.output[0])
    else:
        e.op("Mul", [e.op("MatMul", operands, node), e.const(alpha, "alpha")], node, node.output[0])


def _gelu(e: _Emitter, node: onnx.NodeProto, x: str) -> None:
    """0.5 · x · (1 + erf(x / √2)), the exact GELU, as torch.onnx writes it."""
    erf = e.op("Erf", [e.op("Div", [x, e.const(np.sqrt(2.0), "sqrt2")], node)], node)
    half_x = e.op("Mul", [x, e.const(0.5, "half")], node)
    e.op("Mul", [half_x, e.op("Add", [erf, e.const(1.0, "one")], node)], node, node.output[0])


def _plain_gelu(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    _gelu(e, node, node.input[0])


def _bias_gelu(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    _gelu(e, node, e.op("Add", list(node.input[:2]), node))


def _fast_gelu(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    """0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³))), x the input plus the optional bias."""
    x = node.input[0]
    if len(node.input) > 1 and node.input[1]:
        x = e.op("Add", [x, node.input[1]], node)
    cube = e.op("Mul", [e.op("Mul", [x, x], node), x], node)
    inner = e.op("Add", [x, e.op("Mul", [cube, e.const(0.044715, "c")], node)], node)
    th = e.op("Tanh", [e.op("Mul", [inner, e.const(np.sqrt(2.0 / np.pi), "k")], node)], node)
    half_x = e.op("Mul", [x, e.const(0.5, "half")], node)
    e.op("Mul", [half_x, e.op("Add", [th, e.const(1.0, "one")], node)], node, node.output[0])


def _quick_gelu(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    """x · sigmoid(alpha · x); ONNX Runtime writes SiLU as alpha = 1."""
    x = node.input[0]
    alpha = float(node_attrs(node).get("alpha", 1.702))
    scaled = x if alpha == 1.0 else e.op("Mul", [x, e.const(alpha, "alpha")], node)
    e.op("Mul", [x, e.op("Sigmoid", [scaled], node)], node, node.output[0])


def _skip_layer_norm(e: _Emitter, node: onnx.NodeProto, ranks: dict) -> None:
    """LayerNorm over the last axis of input + skip (+ bias), scaled by gamma (+ beta).

    Outputs: the normalised tensor, then the optional mean, inverse standard deviation and the
    sum itself (which the next block's residual reads).
    """
    ins = list(node.input) + [""] * (5 - len(node.input))
    x, skip, gamma, beta, bias = ins[:5]
    eps = float(node_attrs(node).get("epsilon", 1e-12))
    outs = list(node.output) + [""] * (4 - len(node.output))
    s = e.op("Add", [x, skip], node, None if (bias or not outs[3]) else outs[3])
    if bias:
        s = e.op("Add", [s, bias], node, outs[3] or None)
    if e.opset >= 17:
        stats = [o or "" for o in outs[1:3]]
        while stats and not stats[-1]:
            stats.pop()
        n_out = [outs[0]] + stats
        name = e.unique(f"{node.name or outs[0]}/LayerNormalization")
        e.nodes.append(helper.make_node("LayerNormalization", [s, gamma] + ([beta] if beta else []), n_out,
                                        name=name, axis=-1, epsilon=eps))
        return
    if outs[1] or outs[2]:
        raise ModelError(f"node {node.name or outs[0]!r}: {MS} SkipLayerNormalization's statistics outputs need "
                         "opset 17 (LayerNormalization)")
    mean = e.op("ReduceMean", [s], node, None, axes=[-1], keepdims=1)
    d = e.op("Sub", [s, mean], node)
    var = e.op("ReduceMean", [e.op("Mul", [d, d], node)], node, None, axes=[-1], keepdims=1)
    std = e.op("Sqrt", [e.op("Add", [var, e.const(eps, "eps")], node)], node)
    scaled = e.op("Mul", [e.op("Div", [d, std], node), gamma], node, None if beta else outs[0])
    if beta:
        e.op("Add", [scaled, beta], node, outs[0])


_EXPANDERS = {
    "BiasGelu": _bias_gelu, "FastGelu": _fast_gelu, "FusedConv": _fused_conv, "FusedGemm": _fused_gemm,
    "FusedMatMul": _fused_matmul, "Gelu": _plain_gelu, "QuickGelu": _quick_gelu,
    "SkipLayerNormalization": _skip_layer_norm,
}
