"""ShapleyCAM: the layer's gradient minus half its Hessian applied to the activations, from the VJP
graph differentiated a second time; checked against PyTorch's double backward (pytorch-grad-cam's
own recipe: ``autograd.grad(grads, activations, grad_outputs=activations)``) on two networks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import onnxsal
from onnxsal.graph.second import first_grad_name, hvp
from onnxsal.graph.surgery import expose

from gradcheck import run
from test_autodiff_models import build, export, probe_tensor


def torch_shapley(net, x: np.ndarray, target: int, rest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(map before upsampling, H A) for one image, as pytorch-grad-cam computes them."""
    store = {}
    h = net.probe.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    z = net(torch.tensor(x))
    h.remove()
    a = store["a"]
    score = (z + torch.log_softmax(z, dim=-1))[:, target] if rest else z[:, target]
    g, = torch.autograd.grad(score.sum(), a, create_graph=True)
    hv, = torch.autograd.grad(g, a, grad_outputs=a.detach(), allow_unused=True)
    hv = torch.zeros_like(a) if hv is None else hv
    w = (g - 0.5 * hv).mean(dim=(2, 3))
    cam = torch.relu((w[:, :, None, None] * a).sum(dim=1))
    return cam[0].detach().numpy(), hv.detach().numpy()


@pytest.fixture(scope="module", params=["vgg", "resnet"])
def net_model(request, tmp_path_factory):
    torch.manual_seed(0)
    net = build(request.param)
    model = export(net, tmp_path_factory.mktemp(request.param) / "m.onnx", dynamic=True)
    return net, model, probe_tensor(net, model)


def test_hessian_vector_product_matches_double_backward(net_model):
    """The raw product: H A at the layer, for two classes at once (VGG's goes through a max pool's unpool)."""
    net, model, layer = net_model
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    a = run(expose(model, [layer]), {"input": x})[layer]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    from onnxsal.graph.surgery import with_rest_head

    y = with_rest_head(m, "logits")
    seeds = np.zeros((2, 10), np.float32)
    seeds[0, 2] = seeds[1, 7] = 1
    out = run(hvp(m, y, layer), {"input": x, "grad_" + y: seeds, "grad_" + first_grad_name(layer): a})
    for row, c in enumerate((2, 7)):
        _, ref = torch_shapley(net, x[row:row + 1], c)
        got = out["grad_" + layer][row:row + 1]
        assert np.abs(ref).max() > 1e-6
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


@pytest.mark.parametrize("rest", [True, False])
def test_shapleycam_maps_match_pytorch(net_model, rest):
    net, model, layer = net_model
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for target in (0, 5):
        ref, _ = torch_shapley(net, x, target, rest)
        res = ex.explain(x, "shapleycam", target=target, layer=layer, rest=rest)
        assert res.raw.shape == (1,) + ref.shape
        np.testing.assert_allclose(res.raw[0], ref, atol=1e-4 * max(np.abs(ref).max(), 1e-6), rtol=1e-3)
    if not rest:      # piecewise linear after the layer: no curvature, so the map is Grad-CAM's
        np.testing.assert_allclose(res.raw, ex.explain(x, "gradcam", target=5, layer=layer).raw, rtol=1e-5,
                                   atol=1e-7)


def test_shapleycam_differs_from_gradcam_with_the_rest_target(net_model):
    """The Hessian term matters: with ReST the map is not Grad-CAM's on the same target."""
    net, model, layer = net_model
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    _, hv = torch_shapley(net, x, 5)
    assert np.abs(hv).max() > 1e-6
    s = ex.explain(x, "shapleycam", target=5, layer=layer).raw
    g = ex.explain(x, "gradcam", target=5, layer=layer).raw
    assert not np.allclose(s, g, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("target", [0, 6])
def test_shapleycam_on_transformer_tokens(vit, target):
    """A ViT block's first LayerNorm output as the layer: the Hessian runs through LayerNorm, GELU and
    softmax attention. Reference: the same recipe with pytorch-grad-cam's ViT reshape (class token
    dropped, 4 x 4 grid)."""
    net, model, ln1 = vit
    x = np.random.default_rng(9).standard_normal((1, 3, 32, 32)).astype(np.float32)
    store = {}
    h = net.ln1.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    z = net(torch.tensor(x))
    h.remove()
    a = store["a"]
    g, = torch.autograd.grad((z + torch.log_softmax(z, dim=-1))[:, target].sum(), a, create_graph=True)
    hv, = torch.autograd.grad(g, a, grad_outputs=a.detach())
    grid = lambda t: t[0, 1:].reshape(4, 4, -1).permute(2, 0, 1).detach().numpy()  # noqa: E731
    assert np.abs(hv.detach().numpy()).max() > 1e-6
    w = (grid(g) - 0.5 * grid(hv)).mean(axis=(1, 2))
    ref = np.maximum(np.einsum("k,khw->hw", w, grid(a)), 0)
    res = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, "shapleycam", target=target,
                                                                      layer=ln1.output[0])
    np.testing.assert_allclose(res.raw[0], ref, atol=1e-4 * max(np.abs(ref).max(), 1e-6), rtol=1e-3)


def test_first_order_graph_keeps_the_fused_layer_norm(vit):
    """Only a graph that is differentiated twice pays for the elementwise LayerNorm statistics."""
    from onnxsal.graph.autodiff import vjp

    _, model, ln1 = vit
    once = vjp(model, "logits", [ln1.input[0]])
    assert sum(n.op_type == "LayerNormalization" for n in once.graph.node) > sum(
        n.op_type == "LayerNormalization" for n in model.graph.node)


def test_switch_options_take_true_or_false(net_model):
    """``rest="no"`` would be truthy: switches refuse anything but a boolean."""
    from onnxsal.errors import MethodError

    _, model, layer = net_model
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.zeros((1, 3, 32, 32), np.float32)
    with pytest.raises(MethodError, match="rest is true or false"):
        ex.explain(x, "shapleycam", layer=layer, rest="no")
    with pytest.raises(MethodError, match="eigen_smooth is true or false"):
        ex.explain(x, "gradcam", layer=layer, eigen_smooth=1)


def test_rest_target_needs_a_classifier(tmp_path):
    """A per-pixel model has no (N, classes) logits for ReST: a clear MethodError; rest=False runs."""
    import warnings

    from onnxsal.errors import MethodError
    from test_target_weights import seg_net

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(seg_net(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "seg.onnx"), input_names=["image"],
                          output_names=["masks"], opset_version=17, dynamo=False)
    ex = onnxsal.Explainer(str(tmp_path / "seg.onnx"), "cpu", preprocess="raw")
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with pytest.raises(MethodError, match="ReST target needs a classifier"):
        ex.explain(x, "shapleycam")
    assert np.isfinite(ex.explain(x, "shapleycam", rest=False).map).all()
