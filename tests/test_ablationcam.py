"""Ablation-CAM against PyTorch: the same channels switched off by a forward hook, one pass each.

Covers layers after a ReLU (ablated to 0) and before one, a layer inside a residual block (the
skip connection around it still reads the input), and a transformer's token layer: a LayerNorm
output, negative in places, so a channel is switched off in every token at its minimum minus 1e7.
"""

import numpy as np
import pytest
import torch

import onnxsal

import tiny
from test_fullgrad import residual_case


def reference_channels(acts: np.ndarray, ratio: float) -> np.ndarray:
    """pytorch-grad-cam's AblationLayer.activations_to_be_ablated, re-stated: the SVD projection of
    the centred (positions x channels) matrix, |.|, min-max, > 0.01; channel scores; top and bottom."""
    k = acts.shape[0]
    rows = acts.reshape(k, -1).T
    rows = rows - rows.mean(axis=0)
    proj = np.abs(rows @ np.linalg.svd(rows, full_matrices=True)[2][0, :])
    proj = proj - proj.min()
    mask = (proj / proj.max() > 0.01).reshape(acts.shape[1:])
    scores = []
    for ch in acts:
        n = np.abs(ch)
        n = n - n.min()
        with np.errstate(invalid="ignore", divide="ignore"):
            n = n / np.max(n)
            scores.append((mask * n).sum() / n.sum())
    order = list(np.argsort(np.float32(scores)))
    m = int(k * ratio)
    return np.unique(order[::-1][:m] + order[:m])


def torch_ablation_cam(net, module, x, target, axis=1, grid=lambda a: a[0], ratio=1.0):
    """ReLU(sum_k (S - S_k) / S * A_k), S_k the target's logit with channel k of module's output switched
    off; with ``ratio`` < 1 only ``reference_channels`` are, the others weigh 0."""
    store = {}
    h = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        base = float(net(torch.tensor(x))[0, target])
    h.remove()
    a = store["a"]
    lo = float(a.min())
    value = 0.0 if lo == 0 else lo - 1e7
    weights = []
    chosen = set(range(a.shape[axis])) if ratio == 1.0 else set(reference_channels(grid(a.numpy()), ratio).tolist())
    for k in range(a.shape[axis]):
        if k not in chosen:
            weights.append(0.0)
            continue

        def ablate(m, i, o, k=k):
            o = o.clone()
            o.select(axis, k).fill_(value)
            return o

        h = module.register_forward_hook(ablate)
        with torch.no_grad():
            weights.append((base - float(net(torch.tensor(x))[0, target])) / base)
        h.remove()
    acts = grid(a.numpy()).astype(np.float64)
    return np.maximum(np.einsum("k,khw->hw", np.array(weights), acts), 0)


def check(ex, net, module, x, layer, targets, ratio=1.0, **kw):
    for target in targets:
        expected = torch_ablation_cam(net, module, x, target, ratio=ratio, **kw)
        got = ex.explain(x, "ablationcam", target=target, layer=layer, ratio_channels_to_ablate=ratio).raw[0]
        scale = max(np.abs(expected).max(), 1e-6)
        np.testing.assert_allclose(got, expected, atol=2e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("layer,index", [("relu2", 3), ("relu1", 1), ("conv2", 2)])
def test_matches_torch_on_tiny_nets(layer, index):
    for seed, size in ((3, 16), (11, 20)):
        model = tiny.conv_net(seed=seed, size=size, classes=5)
        net = tiny.torch_module(model)
        ex = onnxsal.Explainer(model, "cpu")
        x = np.random.default_rng(seed).random((1, 3, size, size)).astype(np.float32)
        check(ex, net, net[index], x, layer, (0, 3))


def test_layer_inside_a_residual_block(tmp_path):
    """net.a's output does not cut the network: the shortcut from the stem goes around it."""
    net, ex, relu_a = residual_case(tmp_path, seed=4)
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    check(ex, net, net.a, x, relu_a, (0, 4))


def test_transformer_token_layer(vit):
    net, model, ln1 = vit
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    grid = lambda a: a[0, 1:].reshape(4, 4, -1).transpose(2, 0, 1)  # noqa: E731  (class token dropped)
    check(ex, net, net.ln1, x, ln1.output[0], (0, 7), axis=2, grid=grid)


def test_progress_counts_every_row_once(monkeypatch):
    """Channels run in chunks; the progress callback still sees one count from 0 to K + 1."""
    import importlib

    pert = importlib.import_module("onnxsal.methods.perturbation")

    monkeypatch.setattr(pert, "ABLATION_CHUNK_BYTES", 1)            # one channel per chunk
    model = tiny.conv_net(seed=3, size=16)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    seen = []
    chunked = ex.explain(x, "ablationcam", target=1, layer="relu2", progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (7, 7) and [d for d, _ in seen] == sorted(d for d, _ in seen)     # relu2 has 6 channels
    monkeypatch.undo()
    np.testing.assert_allclose(chunked.raw, ex.explain(x, "ablationcam", target=1, layer="relu2").raw, rtol=1e-6)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4])
def test_ratio_channels_to_ablate(ratio):
    """Only the channels pytorch-grad-cam's ranking keeps are ablated (and fewer passes run)."""
    model = tiny.conv_net(seed=11, size=20, classes=5)
    net = tiny.torch_module(model)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(11).random((1, 3, 20, 20)).astype(np.float32)
    check(ex, net, net[3], x, "relu2", (0, 3), ratio=ratio)
    res = ex.explain(x, "ablationcam", layer="relu2", ratio_channels_to_ablate=ratio)
    assert res.info["ablated_channels"] < ex.model.find_layer("relu2").shape[0]
    with pytest.raises(onnxsal.errors.MethodError, match="ratio_channels_to_ablate"):
        ex.explain(x, "ablationcam", ratio_channels_to_ablate=0)
