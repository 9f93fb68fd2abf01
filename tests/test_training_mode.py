"""Models exported in training mode: BatchNormalization by batch statistics, Dropout that drops."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from gradcheck import run, session
from onnxsal import Explainer
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


def _net() -> nn.Module:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3), nn.Conv2d(8, 6, 3),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


def test_training_mode_model_scores_each_image_as_at_batch_1(tmp_path):
    net, path = _net(), str(tmp_path / "train.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.train(), (torch.randn(1, 3, 12, 12),), path, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}})
    modes = [helper.get_attribute_value(a) for n in onnx.load(path).graph.node if n.op_type == "BatchNormalization"
             for a in n.attribute if a.name == "training_mode"]
    assert modes == [1, 1]
    m = load(path)
    assert len(m.training) == 3 and m.default_layer.tensor.endswith("Relu_output_0")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    cot = rng.standard_normal((3, 4)).astype(np.float32)
    out = run(vjp(m.proto, m.logits, ["x"]), {"x": x, f"grad_{m.logits}": cot})
    # the reference: each image alone through the network in training mode (batch statistics of one
    # image), with its dropout off
    net.train()
    net[3].eval()
    for i in range(3):
        xt = torch.tensor(x[i:i + 1], requires_grad=True)
        y = net(xt)
        (y * torch.tensor(cot[i:i + 1])).sum().backward()
        np.testing.assert_allclose(out[m.logits][i:i + 1], y.detach().numpy(), rtol=1e-5, atol=1e-5)
        g = xt.grad.numpy()
        assert np.abs(out["grad_x"][i:i + 1] - g).max() / np.abs(g).max() < 1e-4
    res = Explainer(m, preprocess="unit").explain(x[:1], method="smoothgrad", n_samples=4)
    assert any("exported in training mode" in n for n in res.notes)


def test_a_rank_2_batch_norm_alone_leaves_its_bias():
    rng = np.random.default_rng(1)
    inits = {"w": rng.standard_normal((12, 5)).astype(np.float32), "s": rng.uniform(0.5, 1.5, 5).astype(np.float32),
             "b": rng.standard_normal(5).astype(np.float32), "mean": np.zeros(5, np.float32),
             "var": np.ones(5, np.float32), "shape": np.array([0, -1], np.int64)}
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["h"]),
             helper.make_node("BatchNormalization", ["h", "s", "b", "mean", "var"], ["y", "rm", "rv"], training_mode=1)]
    g = helper.make_graph(nodes, "bn1d", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5]),
                           helper.make_tensor_value_info("rm", TensorProto.FLOAT, [5]),
                           helper.make_tensor_value_info("rv", TensorProto.FLOAT, [5])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 3, 2, 2)).astype(np.float32)
    m = load(model)
    assert [o.name for o in m.proto.graph.output] == ["y"]
    got = run(m.proto, {"x": x})["y"]
    np.testing.assert_allclose(got, session(model).run(["y"], {"x": x})[0], atol=1e-4)     # its rounding of 0
    np.testing.assert_array_equal(got[0], inits["b"])
