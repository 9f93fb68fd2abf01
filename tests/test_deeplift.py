"""DeepLIFT (Rescale) against Captum's DeepLift, rule for rule, and its summation to delta."""

import numpy as np
import pytest
import torch

import onnxsal
from onnxsal.errors import MethodError

import tiny
from test_autodiff_models import build, export

nn = torch.nn


def captum_deeplift(net, x, x0, target):
    from captum.attr import DeepLift

    return DeepLift(net).attribute(torch.tensor(x), baselines=torch.tensor(x0), target=target).detach().numpy()[0]


def check(ex, net, x, x0, target, baseline):
    ref = captum_deeplift(net, x, x0, target)
    res = ex.explain(x, "deeplift", target=target, baseline=baseline)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(res.raw[0], ref.sum(axis=0), atol=1e-4 * scale)
    # summation to delta: the attributions add up to the score difference
    assert abs(res.info["completeness_gap"][0]) < 1e-4 * max(1.0, abs(res.info["score_difference"][0]))


@pytest.mark.parametrize("seed,size", [(3, 16), (11, 20)])
def test_tiny_relu_nets(seed, size):
    model = tiny.conv_net(seed=seed, size=size, classes=5)
    x = np.random.default_rng(seed).random((1, 3, size, size)).astype(np.float32)
    x0 = np.zeros_like(x)
    ex = onnxsal.Explainer(model, "cpu")
    for target in (0, 3):
        check(ex, tiny.torch_module(model), x, x0, target, "zero")
    # a baseline equal to the input on half the image: many units have no difference there
    same = x.copy()
    same[..., : size // 2] = 0
    check(ex, tiny.torch_module(model), x, same, 1, same)


class OverlapPool(nn.Module):
    """ResNet's stem pooling (3x3, stride 2, padding 1: windows overlap) between ReLU convs."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                               nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16 * 16, 10))

    def forward(self, x):
        return self.f(x)


class ConvPool(nn.Module):
    """Max pools and ReLUs, each between convolutions (no two nonlinearities adjacent)."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                               nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(8 * 8 * 8, 10))

    def forward(self, x):
        return self.f(x)


def exported(tmp_path, name):
    torch.manual_seed(0)
    net = build("vgg") if name == "vgg" else {"overlap": OverlapPool, "convpool": ConvPool}[name]().eval()
    model = export(net, tmp_path / "m.onnx", dynamic=True)
    return net, onnxsal.Explainer(model, "cpu", preprocess="raw")


def test_max_pool_rule_is_captums_formula(tmp_path):
    """Where no ReLU feeds a max pool, every rule meets Captum's hook for hook: equal maps."""
    net, ex = exported(tmp_path, "convpool")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    check(ex, net, x, np.zeros_like(x), 4, "zero")
    x0 = (rng.standard_normal(x.shape) * 0.5).astype(np.float32)
    check(ex, net, x, x0, 7, x0)


@pytest.mark.parametrize("name", ["vgg", "overlap"])
def test_relu_into_max_pool_sums_to_delta(tmp_path, name):
    """A ReLU feeding a max pool: onnxsal chains the two rules' multipliers, so the attributions
    sum to S(x) - S(x0); Captum's ReLU hook sees the max pool's plain gradient instead of its
    DeepLIFT one, so its maps differ a little and, on the VGG-like net, miss the sum."""
    net, ex = exported(tmp_path, name)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for target in (4, 7):
        res = ex.explain(x, "deeplift", target=target)
        assert abs(res.info["completeness_gap"][0]) < 1e-5 * max(1.0, abs(res.info["score_difference"][0]))
        ref = captum_deeplift(net, x, np.zeros_like(x), target).sum(axis=0)
        assert np.corrcoef(res.raw[0].ravel(), ref.ravel())[0, 1] > 0.99


def test_deeplift_is_not_the_gradient():
    """On a ReLU net the multipliers differ from the gradient wherever a unit crosses zero between
    baseline and input, so DeepLIFT is not Input x Gradient (which a broken rule swap would give)."""
    model = tiny.conv_net(seed=3, size=16)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(3).random((1, 3, 16, 16)).astype(np.float32)
    dl = ex.explain(x, "deeplift", target=1).raw
    ixg = ex.explain(x, "inputxgradient", target=1).raw
    assert np.abs(dl - ixg).max() > 1e-3 * np.abs(ixg).max()
    with pytest.raises(MethodError, match="baseline"):
        ex.explain(x, "deeplift", baseline="grey")


@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_sums_to_delta_through_residuals_batchnorm_and_relu6(tmp_path, name):
    """Residual adds and folded BatchNorm are linear; ReLU6 (Clip) takes the Rescale rule."""
    net = build(name)
    ex = onnxsal.Explainer(export(net, tmp_path / "m.onnx", dynamic=True), "cpu", preprocess="raw")
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    res = ex.explain(x, "deeplift", target=2, baseline="blur")
    assert abs(res.info["completeness_gap"][0]) < 1e-5 * max(1.0, abs(res.info["score_difference"][0]))
    assert abs(res.info["score_difference"][0]) > 1e-4        # a real difference, not 0 = 0


def test_several_baselines_average_like_deepliftshap():
    from captum.attr import DeepLiftShap

    model = tiny.conv_net(seed=11, size=20, classes=5)
    net = tiny.torch_module(model)
    rng = np.random.default_rng(4)
    x = rng.random((1, 3, 20, 20)).astype(np.float32)
    bases = rng.random((3, 3, 20, 20)).astype(np.float32) * 0.5
    ex = onnxsal.Explainer(model, "cpu")
    res = ex.explain(x, "deeplift", target=2, baseline=bases)
    ref = DeepLiftShap(net).attribute(torch.tensor(x), baselines=torch.tensor(bases), target=2).detach().numpy()[0]
    np.testing.assert_allclose(res.raw[0], ref.sum(axis=0), atol=1e-4 * np.abs(ref).max())
    assert abs(res.info["completeness_gap"][0]) < 1e-4 * max(1.0, abs(res.info["score_difference"][0]))
    named = ex.explain(x, "deeplift", target=2, baseline="zero,blur")
    one = [ex.explain(x, "deeplift", target=2, baseline=b).raw for b in ("zero", "blur")]
    np.testing.assert_allclose(named.raw, (one[0] + one[1]) / 2, atol=1e-6)


def test_max_pool_with_indices_output_is_refused_by_name():
    from gradcheck import one_node_model
    from onnxsal.errors import UnsupportedOpError
    from onnxsal.graph.autodiff import vjp
    from onnxsal.graph.rules.deeplift import DEEPLIFT_RULES

    x = np.random.default_rng(0).random((2, 2, 4, 4)).astype(np.float32)
    m = one_node_model("MaxPool", {"x": x}, {"kernel_shape": [2, 2], "strides": [2, 2]}, n_out=2)
    with pytest.raises(UnsupportedOpError, match="Indices"):
        vjp(m, "y0", ["x"], rules=DEEPLIFT_RULES)
