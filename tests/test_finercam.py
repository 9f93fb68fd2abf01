"""Finer-CAM: pytorch-grad-cam's FinerWeightedTarget written again in PyTorch, differentiated by
autograd, against onnxsal's closed-form cotangent and its maps."""

import numpy as np
import pytest
import torch

import onnxsal
from onnxsal.errors import MethodError
from onnxsal.methods.cam import finer_seed

import tiny
from test_gradient_methods import ref_cams


def finer_target(out: torch.Tensor, main: int, alpha: float, ranks) -> torch.Tensor:
    """FinerWeightedTarget on one output row, with its comparison classes picked as FinerCAM does."""
    order = np.argsort(np.abs(out.detach().numpy() - out.detach().numpy()[main]), kind="stable")
    comp = [int(order[r]) for r in ranks]
    prob = torch.softmax(out, dim=-1)
    num = sum(prob[j] * (out[main] - alpha * out[j]) for j in comp)
    return num / (sum(prob[j] for j in comp) + 1e-9)


@pytest.mark.parametrize("alpha,ranks", [(1.0, (1, 2, 3)), (0.6, (1, 2)), (2.0, (0, 3))])
def test_seed_is_the_gradient_of_the_finer_score(alpha, ranks):
    rng = np.random.default_rng(int(alpha * 10))
    for _ in range(3):
        logits = rng.normal(0, 2, 8).astype(np.float32)
        main = int(rng.integers(0, 8))
        o = torch.tensor(logits.astype(np.float64), requires_grad=True)
        finer_target(o, main, alpha, ranks).backward()
        np.testing.assert_allclose(finer_seed(logits, main, alpha, ranks), o.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer,index,base", [("relu2", 3, "gradcam"), ("relu1", 1, "gradcam"),
                                              ("relu2", 3, "layercam"), ("relu1", 1, "gradcam++"),
                                              ("relu2", 3, "xgradcam")])
def test_maps_equal_the_base_cam_of_the_finer_score(layer, index, base):
    model = tiny.conv_net(seed=11, size=20, classes=6)
    net = tiny.torch_module(model)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(4).random((1, 3, 20, 20)).astype(np.float32)
    for target in (None, 2):
        store = {}

        def keep(_, __, out):
            out.retain_grad()
            store["a"] = out

        h = net[index].register_forward_hook(keep)
        out = net(torch.tensor(x))[0]
        main = int(out.argmax()) if target is None else target
        finer_target(out, main, 1.0, (1, 2, 3)).backward()
        h.remove()
        expected = ref_cams(store["a"].detach().numpy()[0], store["a"].grad.numpy()[0])[base]
        res = ex.explain(x, "finercam", target=target, layer=layer, base=base)
        assert res.targets[0].index == main
        np.testing.assert_allclose(res.raw[0], expected, rtol=1e-3, atol=1e-4 * max(np.abs(expected).max(), 1e-6))


def test_refusals():
    model = tiny.conv_net(seed=11, size=20, classes=6)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(4).random((1, 3, 20, 20)).astype(np.float32)
    with pytest.raises(MethodError, match="ranks"):
        ex.explain(x, "finercam", comparison="a,b")
    with pytest.raises(MethodError, match="base must be one of"):
        ex.explain(x, "finercam", base="scorecam")
    with pytest.raises(MethodError, match="not weights"):
        ex.explain(x, "finercam", target=np.ones(6, np.float32))
