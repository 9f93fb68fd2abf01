"""Captum's NoiseTunnel around IG, DeepLIFT, Input x Gradient and Guided Backprop (``nt_samples``).

The reference runs Captum's own attribution on each noisy copy (the noise drawn as onnxsal draws
it, with the same seed) and aggregates with NoiseTunnel's definitions in NumPy: the mean, the
mean of squares, or the variance of the per-copy attributions.
"""

import numpy as np
import pytest
import torch
from captum.attr import DeepLift, GuidedBackprop, InputXGradient, IntegratedGradients

import onnxsal
from onnxsal.context import Context
from onnxsal.errors import MethodError
from onnxsal.methods.gradients import input_noise

import tiny


def aggregate(per: np.ndarray, nt_type: str) -> np.ndarray:
    per = per.astype(np.float64)
    if nt_type == "smoothgrad":
        return per.mean(axis=0)
    if nt_type == "smoothgrad_sq":
        return (per ** 2).mean(axis=0)
    return (per ** 2).mean(axis=0) - per.mean(axis=0) ** 2


CAPTUM = {
    "ig": lambda net, x, t: IntegratedGradients(net).attribute(x, target=t, n_steps=8, method="gausslegendre"),
    "deeplift": lambda net, x, t: DeepLift(net).attribute(x, baselines=torch.zeros_like(x), target=t),
    "inputxgradient": lambda net, x, t: InputXGradient(net).attribute(x, target=t),
    "guidedbackprop": lambda net, x, t: GuidedBackprop(net).attribute(x, target=t),
}


@pytest.mark.parametrize("method", sorted(CAPTUM))
@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
def test_noise_tunnel_matches_captum_per_copy(method, nt_type):
    model = tiny.conv_net(seed=5, size=16)
    net = tiny.torch_module(model)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    n, level, seed, target = 5, 0.2, 7, 1
    noise = input_noise(Context(ex.engine, x, [], None), np.random.default_rng(seed), n, level)
    per = np.stack([CAPTUM[method](net, torch.tensor(x + noise[i:i + 1]), target).detach().numpy()[0]
                    for i in range(n)])
    expected = aggregate(per, nt_type)
    expected = np.abs(expected).max(axis=0) if method == "guidedbackprop" else expected.sum(axis=0)
    opts = {"steps": 8} if method == "ig" else {}
    got = ex.explain(x, method, target=target, nt_samples=n, nt_level=level, nt_seed=seed, nt_type=nt_type, **opts).raw[0]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * scale)


def test_no_samples_is_the_plain_method_and_bad_options_are_refused():
    model = tiny.conv_net(seed=5, size=16)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    plain = ex.explain(x, "ig", target=0, steps=8)
    assert "completeness_gap" in plain.info
    np.testing.assert_array_equal(ex.explain(x, "ig", target=0, steps=8, nt_samples=0).raw, plain.raw)
    noisy = ex.explain(x, "ig", target=0, steps=8, nt_samples=3)
    assert np.abs(noisy.raw - plain.raw).max() > 1e-6
    np.testing.assert_allclose(noisy.scores, plain.scores, rtol=1e-6)          # scores are the clean input's
    with pytest.raises(MethodError, match="nt_type"):
        ex.explain(x, "ig", nt_samples=2, nt_type="smooth")
    with pytest.raises(MethodError, match=">= 0"):
        ex.explain(x, "inputxgradient", nt_samples=-1)
