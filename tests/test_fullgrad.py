"""FullGrad against pytorch-grad-cam's formula, recomputed from PyTorch's own gradients.

The reference follows pytorch-grad-cam's ``FullGrad`` step by step: gradients of every
``Conv2d`` with a bias and every ``BatchNorm2d`` output (module hooks), |bias x gradient| and
|input x gradient| normalised and resized *one channel at a time* (PyTorch's bilinear resize,
which equals OpenCV's INTER_LINEAR), summed, normalised.  onnxsal sums each layer's normalised
channels before a single resize, so the test also checks that shortcut.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import onnxsal
from onnxsal.methods.fullgrad import bias_layers


def conv_bn(cin, cout, stride=1, bias=False):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU())


class Residual(nn.Module):
    """Bias-free convolutions with batch norms, a strided 1x1 shortcut and a residual add (ResNet's layout)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a = conv_bn(8, 16, stride=2)
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.b(self.a(x)) + self.down(x))
        return self.head(x.mean(dim=(2, 3)))


class Plain(nn.Module):
    """Convolutions with their own biases, one followed by a batch norm (two bias layers), max pooling."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                                      conv_bn(8, 16, bias=True), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, 1, 1), nn.ReLU())
        self.head = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def randomised(net: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def export(net: nn.Module, path, fold: bool, size: tuple = (16, 16)) -> onnx.ModelProto:
    """``fold``: the exporter folds each BatchNorm into its Conv (as torch.onnx does by default in eval mode)."""
    mode = torch.onnx.TrainingMode.EVAL if fold else torch.onnx.TrainingMode.PRESERVE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, *size),), str(path), input_names=["input"], output_names=["logits"],
                          opset_version=17, dynamo=False, training=mode, do_constant_folding=fold)
    return onnx.load(str(path))


def residual_case(tmp_path, seed: int):
    """A randomised Residual net, its unfolded export's explainer, and the ONNX name of net.a's
    output: a layer that does not cut the network (the shortcut from the stem goes around it)."""
    net = randomised(Residual(), seed=seed)
    model = export(net, tmp_path / "m.onnx", fold=False)
    relu_a = [n for n in model.graph.node if n.op_type == "Relu"][1].output[0]     # the stem's, then a's
    return net, onnxsal.Explainer(model, "cpu"), relu_a


def reference(net: nn.Module, x: np.ndarray, target: int, eigen_smooth: bool = False) -> np.ndarray:
    """pytorch-grad-cam's FullGrad map, one channel at a time (with ``eigen_smooth``, its principal
    component of the component maps at 1/8 size)."""
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and m.bias is not None]
    grads = {}

    def keep(mod, _, out):
        out.register_hook(lambda g: grads.__setitem__(mod, g.detach().numpy().astype(np.float64)))

    hooks = [m.register_forward_hook(keep) for m in layers]
    xt = torch.tensor(x, requires_grad=True)
    net(xt)[0, target].backward()
    for h in hooks:
        h.remove()

    def bias_of(m):
        if isinstance(m, nn.BatchNorm2d):
            return (m.bias - m.running_mean * m.weight / torch.sqrt(m.running_var + m.eps)).detach().numpy()
        return m.bias.detach().numpy()

    def scaled(maps):        # (K, h, w) -> (K, H, W), each channel normalised and then resized
        maps = maps - maps.min(axis=(1, 2), keepdims=True)
        maps = maps / (1e-7 + maps.max(axis=(1, 2), keepdims=True))
        return F.interpolate(torch.tensor(maps)[None], size=x.shape[2:], mode="bilinear",
                             align_corners=False)[0].numpy()

    inputs = scaled(np.abs(xt.grad.numpy()[0] * x[0]).astype(np.float64))
    per_layer = [scaled(np.abs(bias_of(m)[:, None, None] * grads[m][0])).sum(axis=0) for m in layers]
    if eigen_smooth:        # the components, each scaled to 1/8 size, their first principal component
        comps = np.concatenate([inputs, np.stack(per_layer)])
        size = (x.shape[2] // 8, x.shape[3] // 8)
        comps = comps - comps.min(axis=(1, 2), keepdims=True)
        comps = comps / (1e-7 + comps.max(axis=(1, 2), keepdims=True))
        small = F.interpolate(torch.tensor(comps)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()
        rows = small.reshape(len(small), -1).T
        rows = rows - rows.mean(axis=0)
        proj = rows @ np.linalg.svd(rows, full_matrices=False)[2][0]
        total_small = small.reshape(len(small), -1).sum(axis=0)
        if np.dot(proj, total_small - total_small.mean()) < 0:      # the sign onnxsal (and Eigen-CAM) picks
            proj = -proj
        total = scaled(proj.reshape(size)[None])[0]      # then aggregate_multi_layers scales once more
    else:
        total = inputs.sum(axis=0) + sum(per_layer)
    total -= total.min()
    return total / (1e-7 + total.max())


CASES = [(Residual, False), (Residual, True), (Plain, False)]


@pytest.mark.parametrize("cls,fold", CASES, ids=["residual", "residual-folded", "plain"])
def test_fullgrad_matches_reference(tmp_path, cls, fold):
    net = randomised(cls(), seed=3)
    ex = onnxsal.Explainer(export(net, tmp_path / "m.onnx", fold), "cpu")
    rng = np.random.default_rng(0)
    for target in (0, 2):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        ours = ex.explain(x, "fullgrad", target=target).map
        np.testing.assert_allclose(ours, reference(net, x, target), atol=2e-5)


@pytest.mark.parametrize("cls,size", [(Residual, (48, 40)), (Plain, (16, 16))])
def test_fullgrad_eigen_smooth_matches_reference(tmp_path, cls, size):
    net = randomised(cls(), seed=5)
    ex = onnxsal.Explainer(export(net, tmp_path / "m.onnx", False, size), "cpu")
    rng = np.random.default_rng(1)
    for target in (1, 2):
        x = rng.standard_normal((1, 3) + size).astype(np.float32)
        ours = ex.explain(x, "fullgrad", target=target, eigen_smooth=True).map
        np.testing.assert_allclose(ours, reference(net, x, target, eigen_smooth=True), atol=1e-4)
        assert np.abs(ours - ex.explain(x, "fullgrad", target=target).map).max() > 1e-2


def test_bias_layers_follow_the_modules(tmp_path):
    """Unfolded: every biased Conv2d and BatchNorm2d is a layer, with pytorch-grad-cam's bias."""
    net = randomised(Plain(), seed=1)
    layers = bias_layers(onnxsal.load(export(net, tmp_path / "m.onnx", fold=False)))
    mods = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert len(layers) == len(mods) == 4
    bn = mods[2]
    want = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    np.testing.assert_allclose(layers[2].bias, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(layers[1].bias, mods[1].bias.detach().numpy())


def _bn_model(as_mul_add: bool) -> onnx.ModelProto:
    """Conv -> batch norm -> Relu -> Conv(bias) -> Relu -> pool -> Gemm, the norm either as a
    BatchNormalization node or as tf2onnx writes a Keras one: Mul by gamma / sigma, Add of the bias."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(8)
    arr = lambda a, n: numpy_helper.from_array(np.asarray(a, np.float32), n)  # noqa: E731
    gamma, beta, mu, var = rng.uniform(0.5, 1.5, 6), rng.uniform(-0.5, 0.5, 6), rng.uniform(-0.3, 0.3, 6), rng.uniform(0.5, 1.5, 6)
    inits = [arr(rng.normal(0, 0.5, (6, 3, 3, 3)), "w1"), arr(rng.normal(0, 0.3, (8, 6, 3, 3)), "w2"),
             arr(rng.uniform(-0.5, 0.5, 8), "b2"), arr(rng.normal(0, 1, (4, 8)), "wf")]
    if as_mul_add:
        s = gamma / np.sqrt(var + 1e-5)
        inits += [arr(s.reshape(1, 6, 1, 1), "s"), arr((beta - mu * s).reshape(1, 6, 1, 1), "t")]
        norm = [helper.make_node("Mul", ["c1", "s"], ["m1"]), helper.make_node("Add", ["m1", "t"], ["n1"])]
    else:
        inits += [arr(gamma, "g"), arr(beta, "be"), arr(mu, "mu"), arr(var, "var")]
        norm = [helper.make_node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["n1"], epsilon=1e-5)]
    nodes = [helper.make_node("Conv", ["image", "w1"], ["c1"], pads=[1, 1, 1, 1]), *norm,
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]), helper.make_node("GlobalAveragePool", ["r2"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["flat"]), helper.make_node("Gemm", ["flat", "wf"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_batch_norm_written_as_mul_and_add_is_the_same_layer():
    plain, split = (onnxsal.Explainer(_bn_model(f), "cpu", preprocess="raw") for f in (False, True))
    lp, ls = bias_layers(plain.model), bias_layers(split.model)
    assert [len(layer.bias) for layer in lp] == [len(layer.bias) for layer in ls] == [6, 8]
    np.testing.assert_allclose(lp[0].bias, ls[0].bias, rtol=1e-5, atol=1e-6)
    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12)).astype(np.float32)
    for target in (0, 3):
        np.testing.assert_allclose(plain.explain(x, "fullgrad", target=target).map,
                                   split.explain(x, "fullgrad", target=target).map, atol=1e-5)
