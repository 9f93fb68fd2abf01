"""Tiny hand-built ONNX models with known weights, for tests that recompute everything in NumPy."""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_net(layout: str = "NCHW", size: int = 16, classes: int = 3, seed: int = 0, softmax: bool = True,
             batch: Optional[int] = None, metadata: bool = True, channels: int = 3) -> onnx.ModelProto:
    """Conv(3->4)-Relu-Conv(4->6)-Relu-GAP-Flatten-Gemm(6->classes)[-Softmax]; NHWC adds a leading Transpose."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (4, channels, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 4).astype(np.float32)
    w2 = rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 6).astype(np.float32)
    wf = rng.normal(0, 1.0, (classes, 6)).astype(np.float32)
    bf = rng.normal(0, 0.1, classes).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (wf, "wf"), (bf, "bf")]]
    nodes = []
    x = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["image_nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "image_nchw"
    nodes += [
        helper.make_node("Conv", [x, "w1", "b1"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("Conv", ["relu1", "w2", "b2"], ["conv2"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["relu2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], transB=1, name="fc"),
    ]
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"))
        out = "probs"
    shape = [batch, channels, size, size] if layout == "NCHW" else [batch, size, size, channels]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if metadata:
        meta = {"onnxsal.preprocess": json.dumps({"preset": "unit"}),
                "onnxsal.labels": json.dumps([f"class{i}" for i in range(classes)])}
        for k, v in meta.items():
            model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    return model


def refused_pool_net() -> onnx.ModelProto:
    """Conv then an average pool that does not count its padding, with a pad as large as its kernel:
    ONNX allows it, ONNX Runtime refuses to load it, and no Pad node can stand in for those pads."""
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]),
                           helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], pads=[0, 0, 2, 2]),
                           helper.make_node("ReduceMean", ["p"], ["y"], axes=[2, 3], keepdims=0)], "refused",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def dense_net(size: int = 8, classes: int = 3, seed: int = 0) -> onnx.ModelProto:
    """No conv layer at all: Flatten-Gemm-Softmax."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.1, (classes, 3 * size * size)).astype(np.float32)
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "dense", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, size, size])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, classes])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="onnxsal.preprocess", value=json.dumps({"preset": "unit"}))
    return model


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int, stride: int) -> np.ndarray:
    n, c, h, wd = x.shape
    m, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (h + 2 * pad - kh) // stride + 1
    ow = (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, m, oh, ow), np.float64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
            out += np.einsum("nchw,mc->nmhw", patch, w[:, :, i, j])
    return out + b[None, :, None, None]


def numpy_forward(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Independent float64 forward pass of `conv_net` (NCHW input), every named tensor."""
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer}
    x = np.asarray(x, np.float64)
    t = {"conv1": _conv2d(x, w["w1"], w["b1"], 1, 1)}
    t["relu1"] = np.maximum(t["conv1"], 0)
    t["conv2"] = _conv2d(t["relu1"], w["w2"], w["b2"], 1, 2)
    t["relu2"] = np.maximum(t["conv2"], 0)
    t["flat"] = t["relu2"].mean(axis=(2, 3))
    t["logits"] = t["flat"] @ w["wf"].T + w["bf"]
    e = np.exp(t["logits"] - t["logits"].max(axis=1, keepdims=True))
    t["probs"] = e / e.sum(axis=1, keepdims=True)
    return t


def torch_module(model: onnx.ModelProto):
    """The same network as `conv_net` in PyTorch (NCHW, logits out), for autograd/Captum references."""
    import torch
    from torch import nn

    w = {i.name: torch.tensor(numpy_helper.to_array(i)) for i in model.graph.initializer}
    c1 = nn.Conv2d(w["w1"].shape[1], 4, 3, padding=1)
    c2 = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    fc = nn.Linear(6, w["wf"].shape[0])
    with torch.no_grad():
        for mod, (wk, bk) in ((c1, ("w1", "b1")), (c2, ("w2", "b2")), (fc, ("wf", "bf"))):
            mod.weight.copy_(w[wk])
            mod.bias.copy_(w[bk])
    net = nn.Sequential(c1, nn.ReLU(), c2, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    return net.eval()
