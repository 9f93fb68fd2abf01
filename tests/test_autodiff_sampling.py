"""AffineGrid and GridSample: one-node graphs against central differences, and a spatial
transformer network against torch.autograd."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradcheck import assert_matches_torch, check_vjp, one_node_model, run
from onnxsal import Explainer
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load

R = np.random.default_rng(7)


def _grid(n, h, w, spread=1.25, dtype=np.float64):
    """Sampling points over and beyond [-1, 1], kept off the pixel lattice so that no difference
    step crosses a corner (where bilinear sampling has a kink)."""
    return R.uniform(-spread, spread, (n, h, w, 2)).astype(dtype)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample_against_finite_differences(mode, padding, align_corners):
    # reflection: points up to three image widths out, folded back several times
    x, g = R.standard_normal((2, 3, 5, 6)), _grid(2, 4, 7, spread=3.0 if padding == "reflection" else 1.25)
    m = one_node_model("GridSample", {"x": x, "g": g},
                       {"mode": mode, "padding_mode": padding, "align_corners": align_corners}, opset=20)
    out = check_vjp(m, "y", ["x", "g"], {"x": x, "g": g})
    assert np.abs(out["grad_x"]).max() > 0
    if mode == "linear":
        assert np.abs(out["grad_g"]).max() > 0
    else:
        assert not out["grad_g"].any()          # a nearest read moves by jumps: 0 almost everywhere


def test_grid_sample_opset_16_in_float32_with_a_constant_grid():
    x = R.standard_normal((1, 2, 6, 4)).astype(np.float32)
    m = one_node_model("GridSample", {"x": x}, {"mode": "bilinear"}, initializers={"g": _grid(1, 3, 5, dtype=np.float32)},
                       opset=16)
    check_vjp(m, "y", ["x"], {"x": x})


@pytest.mark.parametrize("align_corners", [0, 1])
@pytest.mark.parametrize("size", [[2, 3, 4, 5], [2, 3, 3, 4, 5]])
def test_affine_grid_against_finite_differences(align_corners, size):
    k = len(size) - 2
    theta = R.standard_normal((2, k, k + 1))
    m = one_node_model("AffineGrid", {"theta": theta}, {"align_corners": align_corners},
                       initializers={"size": np.array(size, np.int64)}, opset=20)
    check_vjp(m, "y", ["theta"], {"theta": theta})


@pytest.mark.parametrize("attrs,why", [
    ({"mode": "cubic"}, "mode 'cubic'"),
])
def test_grid_sample_refuses_what_it_cannot_differentiate(attrs, why):
    m = one_node_model("GridSample", {"x": R.standard_normal((1, 1, 4, 4)), "g": _grid(1, 2, 2)}, attrs, opset=20)
    with pytest.raises(UnsupportedOpError, match=why) as ei:
        vjp(m, "y", ["x"])
    assert "GridSample" in str(ei.value)


class SpatialTransformer(nn.Module):
    """The PyTorch tutorial's spatial transformer classifier: a small network predicts an affine map,
    the image is resampled there, and a classifier reads the result."""

    def __init__(self, mode: str, padding: str, align_corners: bool) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.sampling = dict(mode=mode, padding_mode=padding, align_corners=align_corners)
        self.localization = nn.Sequential(nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(6, 8, 3),
                                          nn.MaxPool2d(2), nn.ReLU())
        self.fc_loc = nn.Sequential(nn.Linear(8 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 6))
        with torch.no_grad():           # near the identity, as the tutorial starts it, plus a turn
            self.fc_loc[2].weight.mul_(0.1)
            self.fc_loc[2].bias.copy_(torch.tensor([0.9, 0.3, 0.1, -0.25, 1.1, -0.05]))
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        theta = self.fc_loc(self.localization(x).flatten(1)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=self.sampling["align_corners"])
        x = F.grid_sample(x, grid, **self.sampling)
        return self.head(self.features(x).mean((2, 3)))


@pytest.mark.parametrize("mode,padding,align_corners", [("bilinear", "zeros", False), ("bilinear", "border", True),
                                                        ("nearest", "zeros", False), ("bilinear", "reflection", False)])
def test_spatial_transformer_against_torch_autograd(tmp_path, mode, padding, align_corners):
    net = SpatialTransformer(mode, padding, align_corners).eval()
    path = str(tmp_path / "stn.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 1, 24, 24),), path, input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=20, dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    m = load(path)
    vm = vjp(m.proto, m.logits, [m.input.name])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 24, 24)).astype(np.float32)
    cot = rng.standard_normal((3, 10)).astype(np.float32)
    out = run(vm, {"x": x, f"grad_{m.logits}": cot})
    assert_matches_torch(out, m.logits, f"grad_{m.input.name}", net, x, cot)
    # Grad-CAM after the resampling: the layer's gradient reaches it through the grid too
    res = Explainer(m, preprocess="unit").explain(x[:1], method="gradcam")
    assert np.ptp(res.map) > 0
