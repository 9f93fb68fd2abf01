"""Models exported in training mode, written so that each image is scored as on its own.

``torch.onnx.export(..., training=TrainingMode.TRAINING)`` (or a model left in ``train()``)
writes ``BatchNormalization`` with ``training_mode=1``: it normalises by the statistics of its
batch, so an image's score depends on the other images run with it, and onnxsal's batched runs
(SmoothGrad's copies, Score-CAM's masked images) would mix them. Scored alone, at batch 1, the
statistics are the image's own per channel: that is ``InstanceNormalization`` with the same scale,
bias and epsilon (for a rank-2 input, the mean of one row is the row itself and the output is the
bias). This module writes it so, once, at load, which keeps every image's score what it is at batch
1, in any batch. The running-statistics outputs are dropped. A ``Dropout`` in training mode drops at
random on every run; it is run as at inference instead, since a map of a random function explains
nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .normalize import _const_values, inferred_dims
from .surgery import ReadableNames, node_attrs


def training_ops(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that `as_scored_alone` rewrites, in graph order."""
    consts = _constants(model.graph)
    return [n.name or n.output[0] for n in model.graph.node if _batch_statistics(n) or _dropping(n, consts)]


def as_scored_alone(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with training-mode BatchNormalization and Dropout rewritten (see above);
    ``model`` itself when it has none."""
    if not training_ops(model):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = _constants(g)
    names = ReadableNames(g)
    ranks = {k: len(v) for k, v in inferred_dims(out).items()}
    dropped: set[str] = set()
    nodes = []
    for n in g.node:
        if _batch_statistics(n):
            dropped.update(o for o in n.output[1:] if o)
            x, scale, bias = n.input[:3]
            if ranks.get(x, 4) >= 3:
                eps = float(node_attrs(n).get("epsilon", 1e-5))
                nodes.append(helper.make_node("InstanceNormalization", [x, scale, bias], [n.output[0]],
                                              name=n.name or names(f"{n.output[0]}/InstanceNormalization"),
                                              epsilon=eps))
            else:       # (N, C): alone, each row is its own mean, and only the bias is left
                zero = names(f"{n.output[0]}_zero")
                nodes.append(helper.make_node("Sub", [x, x], [zero], name=names(f"{zero}/Sub")))
                nodes.append(helper.make_node("Add", [zero, bias], [n.output[0]], name=n.name or names(f"{n.output[0]}/Add")))
        elif _dropping(n, consts):
            dropped.update(o for o in n.output[1:] if o)
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    keep = [o for o in g.output if o.name not in dropped]
    del g.output[:]
    g.output.extend(keep)
    return out


def _batch_statistics(n: onnx.NodeProto) -> bool:
    return n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and bool(
        node_attrs(n).get("training_mode", 0))


def _dropping(n: onnx.NodeProto, consts: dict) -> bool:
    """A Dropout whose training_mode input is a constant True."""
    if n.op_type != "Dropout" or n.domain not in ("", "ai.onnx") or len(n.input) < 3 or not n.input[2]:
        return False
    flag = consts.get(n.input[2])
    return flag is not None and bool(np.asarray(flag).reshape(-1)[0])


def _constants(g: onnx.GraphProto) -> dict:
    """Boolean constants (a Dropout's training_mode flag) by name."""
    return {k: numpy_helper.to_array(t) for k, t in _const_values(g).items() if t.data_type == onnx.TensorProto.BOOL}
