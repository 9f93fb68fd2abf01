"""Layer Integrated Gradients against Captum's LayerIntegratedGradients on the same weights.

Covers a layer whose tail is nonlinear (a conv + ReLU after it), a layer inside a residual block
(Captum's hook replaces only the layer's output; the skip connection reads the input), a blurred
baseline, several targets, and the completeness gap.
"""

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients

import onnxsal
from onnxsal.methods.gradients import baseline_for
from onnxsal.context import Context
from onnxsal.engine import make_targets

import tiny
from test_fullgrad import residual_case


def captum_layer_ig(net, module, x, x0, target, steps):
    """Captum's attributions and its convergence delta."""
    lig = LayerIntegratedGradients(net, module)
    attr, delta = lig.attribute(torch.tensor(x), baselines=torch.tensor(x0), target=target, n_steps=steps,
                                method="gausslegendre", return_convergence_delta=True)
    return attr.detach().numpy()[0], float(delta[0])


def check(ex, net, module, x, layer, steps=16, baseline="zero", same_delta=True):
    """``same_delta``: the layer cuts the network, so Captum's delta (which scores the baseline
    input itself) is the same quantity as onnxsal's gap (which sets the layer to a0)."""
    x0 = baseline_for(Context(ex.engine, x, [], None), baseline, 5.0)
    for target in (0, 3):
        attr, delta = captum_layer_ig(net, module, x, x0, target, steps)
        expected = attr.sum(axis=0)
        res = ex.explain(x, "layerig", target=target, layer=layer, steps=steps, baseline=baseline)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * scale, rtol=1e-3)
        gap, diff = res.info["completeness_gap"][0], res.info["score_difference"][0]
        if same_delta:
            assert abs(gap - delta) <= 1e-4 * abs(diff) + 1e-6
        assert abs(gap) <= 0.1 * abs(diff) + 1e-5      # 16 Gauss-Legendre nodes on a piecewise-linear path


@pytest.mark.parametrize("baseline", ["zero", "blur"])
def test_matches_captum_on_a_plain_net(baseline):
    model = tiny.conv_net(seed=3, size=16, classes=5)
    net = tiny.torch_module(model)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    check(ex, net, net[1], x, "relu1", baseline=baseline)


def test_matches_captum_inside_a_residual_block(tmp_path):
    net, ex, relu_a = residual_case(tmp_path, seed=5)
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    check(ex, net, net.a, x, relu_a, same_delta=False)


def test_two_targets_in_one_call_equal_separate_calls():
    model = tiny.conv_net(seed=4, size=16, classes=5)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    both = ex.explain(x, "layerig", target=[1, 4], layer="relu1", steps=8)
    for k, t in enumerate((1, 4)):
        one = ex.explain(x, "layerig", target=t, layer="relu1", steps=8)
        np.testing.assert_allclose(both.raw[k], one.raw[0], rtol=1e-5, atol=1e-6)
    assert len(make_targets(ex.model, [1, 4])) == len(both.info["completeness_gap"]) == 2


def test_matches_captum_on_transformer_tokens(vit):
    """A token layer: attributions per token and channel, the class token dropped for the map."""
    net, model, ln1 = vit
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for target in (1, 6):
        attr, _ = captum_layer_ig(net, net.ln1, x, np.zeros_like(x), target, 16)
        expected = attr[1:].reshape(4, 4, -1).sum(axis=-1)
        got = ex.explain(x, "layerig", target=target, layer=ln1.output[0], steps=16).raw[0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())
