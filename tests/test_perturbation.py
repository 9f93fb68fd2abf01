"""Perturbation methods against direct re-computations of their formulas.

On the tiny model the reference forward pass is NumPy (float64) and the reference
resize is PyTorch's bilinear interpolation; on the demo model the reference runs the
plain model in ONNX Runtime with masks built here.
"""

import os

import numpy as np
import onnxruntime as ort
import pytest

import onnxsal
from onnxsal.errors import MethodError

import tiny

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "demo", "demo_shapes.onnx")


def torch_bilinear(a: np.ndarray, size) -> np.ndarray:
    import torch

    t = torch.tensor(a[None].astype(np.float32))
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()


def ref_scorecam(forward, x, acts, target, weighting="softmax", channels=None):
    """Score-CAM from the paper's definition; `forward(batch) -> logits`."""
    if channels is not None:
        acts = acts[channels]
    up = torch_bilinear(acts, x.shape[2:])
    scores = []
    for k in range(len(acts)):
        m = up[k]
        if m.max() == m.min():
            scores.append(None)
            continue
        m = (m - m.min()) / (m.max() - m.min())
        scores.append(forward(x * m[None, None])[0, target])
    s = np.array([v if v is not None else -np.inf for v in scores], np.float64)
    if weighting == "softmax":
        w = np.exp(s - s.max())
        w /= w.sum()
    else:
        w = np.where(np.isfinite(s), s, 0)
    return np.maximum(np.einsum("k,khw->hw", w, acts), 0)


@pytest.fixture(scope="module")
def tiny_case():
    model = tiny.conv_net(size=16, seed=3)
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    return model, x, onnxsal.Explainer(model, "cpu")


def test_scorecam_matches_reference(tiny_case):
    model, x, ex = tiny_case
    fwd = lambda b: tiny.numpy_forward(model, b)["logits"]
    acts = tiny.numpy_forward(model, x)["relu2"][0]
    for weighting in ("softmax", "score"):
        res = ex.explain(x, "scorecam", top_k=2, weighting=weighting)
        for t, target in enumerate(res.targets):
            ref = ref_scorecam(fwd, x, acts, target.index, weighting)
            np.testing.assert_allclose(res.raw[t], ref, rtol=1e-4, atol=1e-5)


def test_scorecam_at_earlier_layer_and_faster_variant(tiny_case):
    model, x, ex = tiny_case
    fwd = lambda b: tiny.numpy_forward(model, b)["logits"]
    acts = tiny.numpy_forward(model, x)["relu1"][0]
    res = ex.explain(x, "scorecam", target=1, layer="relu1")
    np.testing.assert_allclose(res.raw[0], ref_scorecam(fwd, x, acts, 1), rtol=1e-4, atol=1e-5)
    acts2 = tiny.numpy_forward(model, x)["relu2"][0]
    top = np.argsort(-acts2.reshape(6, -1).std(axis=1))[:3]
    res = ex.explain(x, "fasterscorecam", target=0, max_n=3)
    np.testing.assert_allclose(res.raw[0], ref_scorecam(fwd, x, acts2, 0, channels=np.sort(top)), rtol=1e-4, atol=1e-5)


def test_occlusion_matches_captum(tiny_case):
    import torch
    from captum.attr import Occlusion

    model, x, ex = tiny_case
    net = tiny.torch_module(model)
    res = ex.explain(x, "occlusion", target=2, window=4, stride=2)
    ref = Occlusion(net).attribute(torch.tensor(x), sliding_window_shapes=(3, 4, 4), strides=(3, 2, 2),
                                   baselines=0, target=2)[0, 0].detach().numpy()
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-4, atol=1e-5)


def test_occlusion_baseline_and_uncovered_pixels(tiny_case):
    model, x, ex = tiny_case
    res = ex.explain(x, "occlusion", target=0, window=5, stride=5, baseline=0.5)   # windows at 0, 5, 10 cover 0..14
    fwd = lambda b: tiny.numpy_forward(model, b)["logits"][:, 0]
    base = fwd(x)[0]
    ref = np.zeros((16, 16))
    for y in (0, 5, 10):
        for xx in (0, 5, 10):
            occ = x.copy()
            occ[:, :, y:y + 5, xx:xx + 5] = 0.5
            ref[y:y + 5, xx:xx + 5] = base - fwd(occ)[0]
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-4, atol=1e-5)
    assert np.all(res.raw[0][15, :] == 0) and np.all(res.raw[0][:, 15] == 0)


def test_rise_is_score_weighted_mean_of_its_masks(tiny_case):
    from onnxsal.methods.perturbation import rise_masks

    model, x, ex = tiny_case
    res = ex.explain(x, "rise", target=1, n_masks=64, cells=4, p=0.5, seed=7)
    masks = rise_masks(64, (16, 16), 4, 0.5, np.random.default_rng(7))
    assert masks.shape == (64, 16, 16) and masks.min() >= 0 and masks.max() <= 1
    scores = tiny.numpy_forward(model, x * masks[:, None])["logits"][:, 1]
    ref = np.einsum("n,nhw->hw", scores, masks) / (64 * 0.5)
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-4, atol=1e-5)
    again = ex.explain(x, "rise", target=1, n_masks=64, cells=4, p=0.5, seed=7)
    np.testing.assert_array_equal(again.raw, res.raw)


def test_rise_masks_keep_probability():
    from onnxsal.methods.perturbation import rise_masks

    m = rise_masks(2000, (32, 32), 8, 0.3, np.random.default_rng(0))
    assert abs(m.mean() - 0.3) < 0.02


def test_nchw_and_nhwc_give_the_same_maps():
    """Every registered method, two targets: the same network in either layout gives the same maps."""
    a = onnxsal.Explainer(tiny.conv_net("NCHW", seed=5), "cpu")
    b = onnxsal.Explainer(tiny.conv_net("NHWC", seed=5), "cpu")
    x = np.random.default_rng(1).random((1, 3, 16, 16)).astype(np.float32)
    quick = {"occlusion": {"window": 4}, "rise": {"n_masks": 50}, "ig": {"steps": 8}, "smoothgrad": {"n_samples": 4}}
    for method in onnxsal.methods():
        opts = quick.get(method, {})
        ra = a.explain(x, method, top_k=2, **opts)
        rb = b.explain(x.transpose(0, 2, 3, 1), method, top_k=2, **opts)
        assert ra.maps.shape == (2, 16, 16) and np.isfinite(ra.maps).all(), method
        np.testing.assert_allclose(ra.maps, rb.maps, atol=1e-4, err_msg=method)


def test_unknown_method_and_option(tiny_case):
    _, x, ex = tiny_case
    with pytest.raises(MethodError, match="unknown method 'nosuch'"):
        ex.explain(x, "nosuch")
    with pytest.raises(MethodError, match="no option"):
        ex.explain(x, "occlusion", windw=3)


@pytest.mark.skipif(not os.path.exists(DEMO), reason="demo model not built")
def test_demo_model_scorecam_and_occlusion_against_plain_runs():
    from onnxsal.graph.surgery import expose

    ex = onnxsal.Explainer(DEMO, "cpu")
    m = ex.model
    img = os.path.join(os.path.dirname(DEMO), "images")
    path = os.path.join(img, sorted(os.listdir(img))[0])
    x = ex.prepare(path).tensor
    sess = ort.InferenceSession(expose(m.proto, [m.logits, m.default_layer.tensor]).SerializeToString())
    fwd = lambda b: np.concatenate([sess.run(None, {m.input.name: b[i:i + 16]})[0] for i in range(0, len(b), 16)])
    logits, acts = sess.run(None, {m.input.name: x})
    target = int(np.argmax(logits))
    res = ex.explain(x, "scorecam")
    assert res.target.index == target
    ref = ref_scorecam(fwd, x, acts[0], target)
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    res = ex.explain(x, "occlusion", window=8, stride=8)
    H, W = m.input.size
    ref = np.zeros((H, W))
    base = fwd(x)[0, target]
    for y in range(0, H - 7, 8):
        for xx in range(0, W - 7, 8):
            occ = x.copy()
            occ[:, :, y:y + 8, xx:xx + 8] = 0
            ref[y:y + 8, xx:xx + 8] = base - fwd(occ)[0, target]
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-3, atol=1e-4)
