"""Models whose image has other than 1 or 3 channels (RGBA, multispectral bands), given as arrays."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from gradcheck import run
from onnxsal import Explainer
from onnxsal.errors import ImageError, ModelError
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


class Bands(nn.Module):
    def __init__(self, bands: int, channels_last: bool):
        super().__init__()
        torch.manual_seed(0)
        self.last = channels_last
        self.conv = nn.Conv2d(bands, 8, 3, padding=1)
        self.head = nn.Linear(8, 6)

    def forward(self, x):
        if self.last:
            x = x.permute(0, 3, 1, 2)
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def export(net, shape, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, *shape),), str(path), input_names=["bands"], output_names=["y"],
                          dynamo=False, opset_version=17, dynamic_axes={"bands": {0: "N"}, "y": {0: "N"}})
    return str(path)


@pytest.mark.parametrize("bands,channels_last", [(4, False), (13, False), (4, True)])
def test_band_images_explain_from_arrays(tmp_path, bands, channels_last):
    net = Bands(bands, channels_last).eval()
    shape = (24, 24, bands) if channels_last else (bands, 24, 24)
    m = load(export(net, shape, tmp_path / "m.onnx"))
    assert (m.input.layout, m.input.channels, m.input.size) == ("NHWC" if channels_last else "NCHW", bands, (24, 24))
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    cot = np.random.default_rng(1).standard_normal((2, 6)).astype(np.float32)
    out = run(vjp(m.proto, m.logits, ["bands"]), {"bands": x, "grad_y": cot})
    xt = torch.tensor(x, requires_grad=True)
    (net(xt) * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out["grad_bands"], xt.grad.numpy(), rtol=1e-4, atol=1e-7)
    ex = Explainer(m)
    for method in ("saliency", "gradcam", "rise"):
        assert ex.explain(x[:1], method=method).map.shape == (24, 24)
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(tmp_path / "rgb.png")
    want = f"(1, 24, 24, {bands})" if channels_last else f"(1, {bands}, 24, 24)"
    with pytest.raises(ImageError, match=rf"takes {bands} channels.*\.npy \(or array\) of shape {want.replace('(', '[(]').replace(')', '[)]')}"):
        Explainer(m, preprocess="unit").explain(str(tmp_path / "rgb.png"), method="saliency")


def test_an_input_whose_channel_axis_cannot_be_told_is_refused(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])])
    with pytest.raises(ModelError, match="no image-like input"):
        load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
