"""Models that take their image flat, (N, H*W), or without a channel axis, (N, H, W)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradcheck import run
from onnxsal import Explainer
from onnxsal.errors import SizeError
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


def mlp(inputs: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def export(net: nn.Module, example: torch.Tensor, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=["y"], dynamo=False,
                          opset_version=17, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return str(path)


@pytest.mark.parametrize("shape,size", [((784,), None), ((28, 28), None), ((16 * 49,), (16, 49))])
def test_flat_and_channel_less_inputs_read_as_images(tmp_path, shape, size):
    net = mlp(int(np.prod(shape)))
    path = export(net, torch.randn(1, *shape), tmp_path / "m.onnx")
    m = load(path, size=size)
    h, w = size or (28, 28)
    assert (m.input.layout, m.input.channels, m.input.size) == ("NCHW", 1, (h, w))
    assert "1-channel" in m.read_as
    vm = vjp(m.proto, m.logits, [m.input.name])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, h, w)).astype(np.float32)
    cot = rng.standard_normal((3, 10)).astype(np.float32)
    out = run(vm, {m.input.name: x, f"grad_{m.logits}": cot})
    xt = torch.tensor(x.reshape(3, *shape), requires_grad=True)
    y = net(xt)
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out[m.logits], y.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[f"grad_{m.input.name}"], xt.grad.numpy().reshape(3, 1, h, w), rtol=1e-4, atol=1e-7)
    res = Explainer(m, preprocess="unit").explain(x[:1], method="occlusion", window=4, stride=4)
    assert res.map.shape == (h, w) and any(m.read_as in n for n in res.notes)


def test_flat_inputs_without_a_size_that_fits_are_size_errors(tmp_path):
    path = export(mlp(100 * 3 + 1), torch.randn(1, 301), tmp_path / "m.onnx")
    with pytest.raises(SizeError, match=r"no image-like input: 'x' is flat \(301 values\); if it is an image, give its"):
        load(path)
    with pytest.raises(SizeError, match="has 301 values, not 10x30 = 300"):
        load(path, size=(10, 30))


@pytest.mark.parametrize("dims", [[3, 224, 224], [224, 224, 3], [224, 224], [None, 28, 3]])
def test_inputs_without_a_batch_axis_are_refused(dims):
    from onnx import TensorProto, helper

    from onnxsal.errors import ModelError

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    with pytest.raises(ModelError, match="no batch axis that onnxsal can tell"):
        load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_a_few_features_per_row_are_no_image():
    from onnx import TensorProto, helper

    from onnxsal.errors import ModelError

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])])
    with pytest.raises(ModelError, match=r"no image-like input .*x\[\?,4\]"):
        load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
