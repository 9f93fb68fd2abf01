"""Gradient methods against independent references.

Tiny models: activations and gradients come from PyTorch autograd on the same
weights, and the CAM formulas are re-written here in NumPy; IG, Input x Gradient
and Guided Backprop are compared with Captum. Demo model: the ONNX gradient is
checked against central differences of the plain forward pass along random
directions, then the CAM formulas are recomputed from it.
"""

import os

import numpy as np
import pytest
import torch

import onnxsal
from onnxsal.methods.gradients import gradientshap_attr, ig_attr, smoothgrad_attr

import tiny

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "demo", "demo_shapes.onnx")


def torch_layer_grads(net, x, layer_index, target):
    """Activations of net[layer_index] and d logit[target] / d activations."""
    xt = torch.tensor(x)
    acts = {}

    def hook(_, __, out):
        out.retain_grad()
        acts["a"] = out

    h = net[layer_index].register_forward_hook(hook)
    net(xt)[0, target].backward()
    h.remove()
    return acts["a"].detach().numpy()[0], acts["a"].grad.numpy()[0]


def ref_cams(a, g):
    eps = 1e-7
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    out = {}
    w = g64.mean(axis=(1, 2))
    out["gradcam"] = np.maximum(np.einsum("k,khw->hw", w, a64), 0)
    g2, g3 = g64 ** 2, g64 ** 3
    alpha = np.where(g64 != 0, g2 / (2 * g2 + a64.sum(axis=(1, 2))[:, None, None] * g3 + eps), 0)
    w = (alpha * np.maximum(g64, 0)).sum(axis=(1, 2))
    out["gradcam++"] = np.maximum(np.einsum("k,khw->hw", w, a64), 0)
    w = (g64 * a64).sum(axis=(1, 2)) / (a64.sum(axis=(1, 2)) + eps)
    out["xgradcam"] = np.maximum(np.einsum("k,khw->hw", w, a64), 0)
    out["layercam"] = np.maximum((np.maximum(g64, 0) * a64).sum(axis=0), 0)
    out["hirescam"] = np.maximum((g64 * a64).sum(axis=0), 0)
    out["gradcamelementwise"] = np.maximum(g64 * a64, 0).sum(axis=0)
    out["eigencam"] = np.maximum(ref_principal_projection(a64), 0)
    out["eigengradcam"] = np.maximum(ref_principal_projection(g64 * a64), 0)
    return out


CAMS = ("gradcam", "gradcam++", "layercam", "xgradcam")


def assert_cams(ex, x, target, a, g, what: str, names=CAMS, **kwargs) -> None:
    """Each CAM in ``names`` of ``ex`` on ``x`` for ``target`` (further ``explain`` arguments in
    ``kwargs``) against ``ref_cams`` of the layer's activations ``a`` and gradients ``g``."""
    expected = ref_cams(a, g)
    for name in names:
        got = ex.explain(x, name, target, **kwargs).raw[0]
        np.testing.assert_allclose(got, expected[name], rtol=1e-3, atol=1e-4 * np.abs(expected[name]).max() + 1e-12,
                                   err_msg=f"{what} {name}")


def ref_weighted(a, g):
    """Each channel-weighted CAM's (K, h, w) weighted activations, before the channel sum."""
    eps = 1e-7
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    g2, g3 = g64 ** 2, g64 ** 3
    alpha = np.where(g64 != 0, g2 / (2 * g2 + a64.sum(axis=(1, 2))[:, None, None] * g3 + eps), 0)
    weights = {"gradcam": g64.mean(axis=(1, 2)),
               "gradcam++": (alpha * np.maximum(g64, 0)).sum(axis=(1, 2)),
               "xgradcam": (g64 * a64).sum(axis=(1, 2)) / (a64.sum(axis=(1, 2)) + eps)}
    out = {k: w[:, None, None] * a64 for k, w in weights.items()}
    out.update(layercam=np.maximum(g64, 0) * a64, hirescam=g64 * a64, gradcamelementwise=np.maximum(g64 * a64, 0))
    return out


def ref_principal_projection(m):
    """Scores on the first right singular vector of the centred positions x channels matrix (a full
    SVD; onnxsal takes an eigenpair of the smaller Gram matrix), signed to correlate positively
    with the channel sum."""
    k = m.shape[0]
    rows = m.reshape(k, -1).T
    rows = rows - rows.mean(axis=0)
    _, sv, vt = np.linalg.svd(rows)
    assert sv[0] > 1.005 * sv[1], "no clear first component: the comparison would be ill-posed"
    proj = rows @ vt[0]
    total = m.reshape(k, -1).sum(axis=0)
    return (proj if proj @ (total - total.mean()) >= 0 else -proj).reshape(m.shape[1:])


@pytest.mark.parametrize("shape", [(50, 5, 5), (4, 8, 8), (7, 2, 3)])
def test_first_component_both_gram_sides(shape):
    """More channels than positions and the other way round take different eigenproblems."""
    from onnxsal.methods.cam import first_component

    m = np.random.default_rng(len(shape) + shape[0]).random(shape) ** 3
    np.testing.assert_allclose(first_component(m), ref_principal_projection(m), atol=1e-9 * np.abs(m).max() * m.size)


MODELS = [dict(seed=3, size=16), dict(seed=11, size=20, classes=5)]


@pytest.fixture(scope="module", params=range(len(MODELS)), ids=["tiny16", "tiny20"])
def case(request):
    kw = MODELS[request.param]
    model = tiny.conv_net(**kw)
    size = kw["size"]
    x = np.random.default_rng(request.param).random((1, 3, size, size)).astype(np.float32)
    return model, x, onnxsal.Explainer(model, "cpu"), tiny.torch_module(model)


@pytest.mark.parametrize("layer,index", [("relu2", 3), ("relu1", 1)])
def test_cams_match_numpy_formulas_on_torch_gradients(case, layer, index):
    model, x, ex, net = case
    for target in (0, 2):
        a, g = torch_layer_grads(net, x, index, target)
        ref = ref_cams(a, g)
        for name, expected in ref.items():
            res = ex.explain(x, name, target=target, layer=layer)
            scale = max(np.abs(expected).max(), 1e-6)
            np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * scale, rtol=1e-3, err_msg=name)


def ref_layers_combined(cams, size):
    """pytorch-grad-cam's aggregate over target layers, written out with PyTorch's own bilinear resize
    (align_corners=False, as cv2.resize): per layer ReLU, min-max with a 1e-7 guard, resize; then
    the mean over the layers, min-maxed again."""
    def scaled(m):
        m = m - m.min()
        return m / (1e-7 + m.max())

    per = []
    for cam in cams:
        c = torch.tensor(scaled(np.maximum(cam, 0)))[None, None]
        per.append(torch.nn.functional.interpolate(c, size=size, mode="bilinear", align_corners=False)[0, 0].numpy())
    return scaled(np.maximum(np.mean(per, axis=0), 0))


@pytest.mark.parametrize("name", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcamelementwise",
                                  "eigencam"])
def test_a_cam_over_several_layers_is_pytorch_grad_cams_mean_of_scaled_maps(case, name):
    """layer=[a, b] as pytorch-grad-cam's target_layers=[a, b]: each layer's CAM from torch.autograd's
    activations and gradients, combined as its BaseCAM does."""
    model, x, ex, net = case
    for target in (0, 2):
        cams = [ref_cams(*torch_layer_grads(net, x, index, target))[name] for index in (1, 3)]
        res = ex.explain(x, name, target=target, layer=["relu1", "relu2"])
        assert res.layer == ["relu1", "relu2"] and res.raw.shape == (1,) + x.shape[2:]
        np.testing.assert_allclose(res.raw[0], ref_layers_combined(cams, x.shape[2:]), atol=2e-5, err_msg=name)
        one = ex.explain(x, name, target=target, layer=["relu2", "relu2"])    # one layer, named twice
        assert one.layer == "relu2"
        np.testing.assert_array_equal(one.raw, ex.explain(x, name, target=target, layer="relu2").raw)


def test_several_layers_take_their_gradients_from_one_pass(case, monkeypatch):
    """One backward pass serves every layer (as pytorch-grad-cam's); where it cannot, each layer runs
    its own, with the same maps."""
    from onnxsal.engine import Engine

    model, x, ex, net = case
    joint = {name: ex.explain(x, name, target=[0, 2], layer=["relu1", "relu2"]).raw
             for name in ("gradcam", "layercam", "eigengradcam")}
    calls = []
    own = Engine.layers_gradients

    def counted(self, *args, **kwargs):
        calls.append(1)
        return own(self, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("a layer ran its own gradient pass")

    monkeypatch.setattr(Engine, "layers_gradients", counted)
    monkeypatch.setattr(Engine, "layer_gradients", never)
    again = ex.explain(x, "gradcam", target=[0, 2], layer=["relu2", "relu1"])
    assert len(calls) == 1
    monkeypatch.undo()
    monkeypatch.setattr(Engine, "layers_gradients", lambda *args, **kwargs: None)     # no joint pass
    for name, raw in joint.items():
        np.testing.assert_allclose(ex.explain(x, name, target=[0, 2], layer=["relu1", "relu2"]).raw, raw,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(again.raw, joint["gradcam"], atol=1e-6)


def test_a_layer_with_a_blank_map_counts_as_zeros():
    """A layer whose CAM is nowhere positive adds zeros to the mean (the 1e-7 guard), not NaN."""
    from onnxsal.explainer import combine_layers

    rng = np.random.default_rng(0)
    live = rng.random((2, 4, 4)).astype(np.float32)
    got = combine_layers([np.full((2, 8, 8), -1.0, np.float32), live], (8, 8))
    alone = ref_layers_combined([live[1]], (8, 8))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[1], alone, atol=1e-6)


def test_several_layers_only_where_pytorch_grad_cam_takes_them(case):
    from onnxsal.errors import LayerError

    model, x, ex, net = case
    for name in ("guidedgradcam", "layerig"):
        with pytest.raises(LayerError, match=f"{name} reads one layer; several layers are averaged for ablationcam"):
            ex.explain(x, name, target=0, layer=["relu1", "relu2"])
    with pytest.raises(LayerError, match="give at least one layer"):
        ex.explain(x, "gradcam", target=0, layer=[])
    with pytest.raises(LayerError, match="unknown layer 'nope'"):
        ex.explain(x, "gradcam", target=0, layer=["relu1", "nope"])
    res = ex.explain(x, "scorecam", target=0, layer=("relu1", "relu2"))   # a gradient-free CAM as well
    per = [ex.explain(x, "scorecam", target=0, layer=la).raw[0] for la in ("relu1", "relu2")]
    np.testing.assert_allclose(res.raw[0], ref_layers_combined(per, x.shape[2:]), atol=2e-5)
    assert ex.explain(x, "saliency", target=0, layer=["relu1", "relu2"]).notes[-1].endswith(
        "does not use the layer relu1, relu2")


def test_eigen_smooth_is_the_principal_component_of_the_weighted_activations(case):
    model, x, ex, net = case
    a, g = torch_layer_grads(net, x, 3, 1)
    for name, m in ref_weighted(a, g).items():
        expected = np.maximum(ref_principal_projection(m), 0)
        res = ex.explain(x, name, target=1, layer="relu2", eigen_smooth=True)
        np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * max(np.abs(expected).max(), 1e-6), err_msg=name)
        plain = ex.explain(x, name, target=1, layer="relu2")
        np.testing.assert_allclose(plain.raw[0], np.maximum(m.sum(axis=0), 0), atol=1e-4 * np.abs(m).sum(axis=0).max(),
                                   err_msg=name)


@pytest.mark.parametrize("name", ["gradcam", "layercam", "eigencam"])
def test_aug_smooth_averages_mirrored_and_scaled_copies(case, name):
    from onnxsal.postprocess import normalize, resize

    model, x, ex, net = case
    size = x.shape[2:]
    expected = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xa = x * np.float32(factor)
            xa = np.ascontiguousarray(xa[..., ::-1]) if flip else xa
            m = normalize(resize(ex.explain(xa, name, target=2, layer="relu2").raw, size))
            expected.append(m[..., ::-1] if flip else m)
    got = ex.explain(x, name, target=2, layer="relu2", aug_smooth=True)
    np.testing.assert_allclose(got.raw, np.mean(expected, axis=0), atol=1e-5)
    # the mirror follows the layout: the same network in NHWC gives the same map
    nhwc = onnxsal.Explainer(tiny.conv_net("NHWC", **MODELS[0]), "cpu")
    if x.shape[2] == MODELS[0]["size"]:
        other = nhwc.explain(x.transpose(0, 2, 3, 1), name, target=2, layer="relu2", aug_smooth=True)
        np.testing.assert_allclose(other.raw, got.raw, atol=1e-5)


def test_saliency_and_input_x_gradient(case):
    from captum.attr import InputXGradient, Saliency

    model, x, ex, net = case
    xt = torch.tensor(x)
    grad = Saliency(net).attribute(xt, target=1, abs=False).detach().numpy()[0]
    res = ex.explain(x, "saliency", target=1)
    np.testing.assert_allclose(res.raw[0], np.abs(grad).max(axis=0), atol=1e-5)
    res = ex.explain(x, "saliency", target=1, reduce="sum")
    np.testing.assert_allclose(res.raw[0], grad.sum(axis=0), atol=1e-5)
    ixg = InputXGradient(net).attribute(xt, target=1).detach().numpy()[0]
    res = ex.explain(x, "inputxgradient", target=1)
    np.testing.assert_allclose(res.raw[0], ixg.sum(axis=0), atol=1e-5)


def test_integrated_gradients_match_captum_and_are_complete(case):
    from captum.attr import IntegratedGradients

    model, x, ex, net = case
    ref = IntegratedGradients(net).attribute(torch.tensor(x), target=0, n_steps=32, method="gausslegendre")
    res = ex.explain(x, "ig", target=0, steps=32)
    np.testing.assert_allclose(res.raw[0], ref.detach().numpy()[0].sum(axis=0), atol=1e-5)
    gap = res.info["completeness_gap"][0]
    assert abs(gap) < 1e-2 * max(1.0, abs(res.info["score_difference"][0]))
    ref = IntegratedGradients(net).attribute(torch.tensor(x), target=0, n_steps=16, method="riemann_trapezoid")
    res = ex.explain(x, "ig", target=0, steps=16, rule="trapezoid")
    # Captum's trapezoid weights are 1/n (ends 1/2n), summing to (n-1)/n; onnxsal's sum to 1
    np.testing.assert_allclose(res.raw[0], ref.detach().numpy()[0].sum(axis=0) * 16 / 15, atol=1e-5)


def test_smoothgrad_with_identical_noise(case):
    from onnxsal.context import Context
    from onnxsal.engine import make_targets

    model, x, ex, net = case
    noise = np.random.default_rng(5).normal(0, 0.1, (6,) + x.shape[1:]).astype(np.float32)
    ctx = Context(ex.engine, x, make_targets(ex.model, [2]), None)
    got = smoothgrad_attr(ctx, 6, 0.0, None, noise=noise)[0]
    xt = torch.tensor(x + noise, requires_grad=True)
    net(xt)[:, 2].sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy().mean(axis=0), atol=1e-5)
    res = ex.explain(x, "smoothgrad", target=2, n_samples=6, seed=1)
    again = ex.explain(x, "smoothgrad", target=2, n_samples=6, seed=1)
    np.testing.assert_array_equal(res.raw, again.raw)


@pytest.mark.parametrize("nt_type", ["smoothgrad_sq", "vargrad"])
def test_smoothgrad_variants_with_identical_noise(case, nt_type):
    from onnxsal.context import Context
    from onnxsal.engine import make_targets

    model, x, ex, net = case
    noise = np.random.default_rng(7).normal(0, 0.2, (8,) + x.shape[1:]).astype(np.float32)
    ctx = Context(ex.engine, x, make_targets(ex.model, [1]), None)
    got = smoothgrad_attr(ctx, 8, 0.0, None, noise=noise, nt_type=nt_type)[0]
    xt = torch.tensor(x + noise, requires_grad=True)
    net(xt)[:, 1].sum().backward()
    g = xt.grad.numpy().astype(np.float64)
    expected = (g ** 2).mean(axis=0) if nt_type == "smoothgrad_sq" else g.var(axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=1e-4)
    res = ex.explain(x, "smoothgrad", target=1, n_samples=4, nt_type=nt_type)
    assert (res.raw >= 0).all() and res.options["nt_type"] == nt_type
    with pytest.raises(onnxsal.errors.MethodError, match="nt_type"):
        ex.explain(x, "smoothgrad", nt_type="mean")


def test_gradientshap_against_torch_autograd_and_ig(case):
    from onnxsal.context import Context
    from onnxsal.engine import make_targets

    model, x, ex, net = case
    rng = np.random.default_rng(9)
    bases = np.stack([np.zeros_like(x[0]), rng.random(x.shape[1:]).astype(np.float32)])
    n = 10
    draws = (rng.normal(0, 0.1, (n,) + x.shape[1:]).astype(np.float32), rng.integers(0, 2, n), rng.random(n))
    ctx = Context(ex.engine, x, make_targets(ex.model, [0, 2]), None)
    got = gradientshap_attr(ctx, n, 0.0, bases, 0.0, None, draws=draws)
    xn = x + draws[0]
    b = bases[draws[1]]
    points = torch.tensor(b + draws[2].astype(np.float32)[:, None, None, None] * (xn - b), requires_grad=True)
    for row, target in enumerate((0, 2)):
        points.grad = None
        net(points)[:, target].sum().backward()
        expected = (points.grad.numpy() * (xn - b)).mean(axis=0)
        np.testing.assert_allclose(got[row], expected, atol=1e-5 * max(1.0, np.abs(expected).max()))
    # one baseline, no noise and the midpoint nodes as the "random" points: IG's midpoint rule
    mid = (np.zeros((n,) + x.shape[1:], np.float32), np.zeros(n, int), (np.arange(n) + 0.5) / n)
    shap = gradientshap_attr(ctx, n, 0.0, "zero", 0.0, None, draws=mid)
    np.testing.assert_allclose(shap, ig_attr(ctx, n, "zero", "midpoint", 0.0), atol=1e-6)
    res = ex.explain(x, "gradientshap", target=0, n_samples=6, baseline="zero,0.5,blur", noise_level=0.05)
    assert res.raw.shape == (1,) + x.shape[2:] and np.isfinite(res.raw).all()
    with pytest.raises(onnxsal.errors.MethodError, match="baseline"):
        ex.explain(x, "gradientshap", baseline="zero,grey")


def test_deconvnet_matches_captum(case):
    from captum.attr import Deconvolution

    model, x, ex, net = case
    for target in (0, 2):
        ref = Deconvolution(net).attribute(torch.tensor(x), target=target).detach().numpy()[0]
        res = ex.explain(x, "deconvnet", target=target, reduce="sum")
        np.testing.assert_allclose(res.raw[0], ref.sum(axis=0), atol=1e-5)
        res = ex.explain(x, "deconvnet", target=target)
        np.testing.assert_allclose(res.raw[0], np.abs(ref).max(axis=0), atol=1e-5)


def test_guided_backprop_matches_captum(case):
    from captum.attr import GuidedBackprop

    model, x, ex, net = case
    ref = GuidedBackprop(net).attribute(torch.tensor(x), target=1).detach().numpy()[0]
    res = ex.explain(x, "guidedbackprop", target=1, reduce="sum")
    np.testing.assert_allclose(res.raw[0], ref.sum(axis=0), atol=1e-5)
    res = ex.explain(x, "guidedgradcam", target=1)
    assert res.raw.shape == (1,) + x.shape[2:] and np.isfinite(res.raw).all()


def test_top_k_targets_are_batched_rows(case):
    model, x, ex, net = case
    res = ex.explain(x, "gradcam", top_k=3)
    assert [t.index for t in res.targets] == list(np.argsort(-res.logits)[:3])
    for t, target in enumerate(res.targets):
        single = ex.explain(x, "gradcam", target=target.index)
        np.testing.assert_allclose(res.raw[t], single.raw[0], atol=1e-6)


def test_probability_score_uses_softmax_output(case):
    model, x, ex, net = case
    res = ex.explain(x, "saliency", target=1, score="probability", reduce="sum")
    xt = torch.tensor(x, requires_grad=True)
    torch.softmax(net(xt), dim=1)[0, 1].backward()
    np.testing.assert_allclose(res.raw[0], xt.grad.numpy()[0].sum(axis=0), atol=1e-6)


@pytest.mark.skipif(not os.path.exists(DEMO), reason="demo model not built")
def test_demo_model_gradients_and_cams_against_torch_autograd():
    """The demo model's ONNX graph re-run op by op in PyTorch gives the reference gradients."""
    import onnx_torch
    from onnxsal.context import Context
    from onnxsal.engine import make_targets
    from onnxsal.methods.cam import layer_grads
    from onnxsal.methods.gradients import vanilla_attr

    ex = onnxsal.Explainer(DEMO, "cpu")
    m = ex.model
    img = os.path.join(os.path.dirname(DEMO), "images")
    layer = m.default_layer.tensor
    for name in sorted(os.listdir(img))[:2]:
        x = ex.prepare(os.path.join(img, name)).tensor
        xt = torch.tensor(x, requires_grad=True)
        env = onnx_torch.run(m.proto, {m.input.name: xt})
        env[layer].retain_grad()
        target = int(env[m.logits].argmax())
        env[m.logits][0, target].backward()
        ctx = Context(ex.engine, x, make_targets(m, [target]), m.default_layer)
        grad = vanilla_attr(ctx)[0]
        ref = xt.grad.numpy()[0]
        assert np.abs(grad - ref).max() <= 1e-4 * np.abs(ref).max()
        a, g = layer_grads(ctx)
        ref_g = env[layer].grad.numpy()[0]
        assert np.abs(g[0] - ref_g).max() <= 1e-4 * np.abs(ref_g).max()
        for method, expected in ref_cams(env[layer].detach().numpy()[0], ref_g).items():
            out = ex.explain(x, method, target=target)
            np.testing.assert_allclose(out.raw[0], expected, atol=1e-4 * max(np.abs(expected).max(), 1e-6),
                                       rtol=1e-3, err_msg=method)


def test_tail_gradients_equal_whole_model_gradients_also_across_skip_connections():
    """CAMs differentiate only the network after the layer; a skip connection around the layer
    runs forward from the input, so the gradient is the whole model's."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxsal.context import Context
    from onnxsal.engine import make_targets
    from onnxsal.methods.cam import layer_grads

    model = tiny.conv_net(seed=7)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(3).random((1, 3, 16, 16)).astype(np.float32)
    ctx = Context(ex.engine, x, make_targets(ex.model, [0, 2]), ex.model.find_layer("relu1"))
    a, g = layer_grads(ctx)
    whole = ctx.gradients(np.repeat(x, 2, axis=0), ctx.seeds, wrt=["relu1"], extra=["relu1"])
    np.testing.assert_allclose(g, whole["grad_relu1"], atol=1e-6)
    np.testing.assert_allclose(a, whole["relu1"], atol=1e-6)

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 3, 3)).astype(np.float32), "w2")
    wf = numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "wf")
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c2", "r1"], ["sum"]),          # the skip crosses c2
             helper.make_node("Relu", ["sum"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]),
             helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])], [w1, w2, wf])
    res_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    res_model.ir_version = 8
    ex = onnxsal.Explainer(res_model, "cpu", preprocess="raw")
    x = rng.random((1, 3, 8, 8)).astype(np.float32)
    ctx = Context(ex.engine, x, make_targets(ex.model, [1]), ex.model.find_layer("c2"))
    a, g = layer_grads(ctx)       # the skip from r1 around c2 runs forward from the input
    whole = ctx.gradients(x, ctx.seeds, wrt=["c2"], extra=["c2"])
    np.testing.assert_allclose(g, whole["grad_c2"], atol=1e-6)
    # d logit / d c2 = d logit / d sum: the tail from "sum" is cut cleanly, so compare with it
    sum_acts = ex.engine.outputs(x, ["sum"])[0]
    ref = ex.engine.layer_gradients(sum_acts, ctx.seeds, "sum", x)
    np.testing.assert_allclose(g, ref, atol=1e-6)
    # the skip's value matters: with another input under the same c2, the gradient changes
    other = ex.engine.layer_gradients(a, ctx.seeds, "c2", rng.random((1, 3, 8, 8)).astype(np.float32))
    assert np.abs(other - g).max() > 1e-3


@pytest.mark.parametrize("name", ["saliency", "deeplift", "guidedbackprop", "smoothgrad", "ig"])
def test_given_target_skips_the_forward_pass_but_not_the_scores(case, name, monkeypatch):
    """With the target given, single-pass gradient methods report the scores of their own pass
    (no separate forward pass); the others run one afterwards. Either way: the same scores and maps."""
    model, x, ex, net = case
    picked = ex.explain(x, name, top_k=1)
    calls = []
    real = ex.engine.outputs
    monkeypatch.setattr(ex.engine, "outputs", lambda *a, **k: calls.append(a) or real(*a, **k))
    given = ex.explain(x, name, target=picked.targets[0].index)
    np.testing.assert_allclose(given.logits, picked.logits, atol=1e-5)
    np.testing.assert_allclose(given.scores, picked.scores, atol=1e-6)
    np.testing.assert_allclose(given.raw, picked.raw, atol=1e-6)
    forward_passes = [c for c in calls if ex.model.logits in c[1]]
    assert len(forward_passes) == (0 if name in ("saliency", "deeplift", "guidedbackprop") else 1)


@pytest.mark.parametrize("layer,index", [("relu2", 3), ("relu1", 1)])
def test_fem_and_kpcacam_match_their_references(case, layer, index):
    """FEM against pytorch-grad-cam's formula in NumPy; KPCA-CAM against scikit-learn's KernelPCA
    (what pytorch-grad-cam calls) on PyTorch's activations, for every kernel."""
    from sklearn.decomposition import KernelPCA

    model, x, ex, net = case
    a, _ = torch_layer_grads(net, x, index, 0)
    th = a.mean(axis=(1, 2), keepdims=True) + 2 * a.std(axis=(1, 2), keepdims=True)
    w = (a > th).mean(axis=(1, 2))
    expected = np.maximum((w[:, None, None] * a).sum(axis=0), 0)
    res = ex.explain(x, "fem", target=0, layer=layer)
    np.testing.assert_allclose(res.raw[0], expected, atol=1e-5 * max(expected.max(), 1e-6))
    assert ex.explain(x, "fem", target=0, layer=layer, k=0.5).raw.max() > 0
    rows = a.reshape(a.shape[0], -1).T
    rows = rows - rows.mean(axis=0)
    for kernel, gamma in (("sigmoid", None), ("rbf", None), ("poly", 0.01), ("linear", None), ("cosine", None)):
        ref = KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform(rows.astype(np.float64))
        expected = np.maximum(ref[:, 0].reshape(a.shape[1:]), 0)
        got = ex.explain(x, "kpcacam", target=2, layer=layer, kernel=kernel, gamma=gamma).raw[0]
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(np.abs(expected).max(), 1e-6), err_msg=kernel)
    with pytest.raises(onnxsal.errors.MethodError, match="kernel"):
        ex.explain(x, "kpcacam", layer=layer, kernel="laplacian")
    with pytest.raises(onnxsal.errors.MethodError, match="gamma"):
        ex.explain(x, "kpcacam", layer=layer, gamma=-1.0)


def test_explain_batch_equals_one_explain_per_image():
    import onnxsal
    import tiny
    from onnxsal.errors import TargetError

    ex = onnxsal.Explainer(tiny.conv_net(size=16), "cpu", preprocess="unit")
    x = np.random.default_rng(0).random((3, 3, 16, 16)).astype(np.float32)
    for method, targets in (("gradcam", [2, 0, 1]), ("saliency", 1), ("ig", None)):
        got = ex.explain_batch(x, method, targets)
        per = targets if isinstance(targets, list) else [targets] * 3
        for i, res in enumerate(got):
            want = ex.explain(x[i:i + 1], method, per[i])
            np.testing.assert_array_equal(res.map, want.map)
            assert res.targets[0].index == want.targets[0].index
    assert [r.targets[0].index for r in ex.explain_batch(x, "gradcam", [2, 0, 1])] == [2, 0, 1]
    with pytest.raises(TargetError, match="2 targets for 3 images"):
        ex.explain_batch(x, "gradcam", [1, 2])
    from onnxsal.errors import ImageError

    with pytest.raises(ImageError, match=r"holds a batch of 3 images.*explain_batch takes a batch"):
        ex.explain(x, "gradcam")
    with pytest.raises(ImageError, match="needs a leading batch axis"):
        ex.explain_batch(np.zeros(3, np.float32), "gradcam")
