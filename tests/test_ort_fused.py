"""Models saved by ONNX Runtime's optimiser: its com.microsoft fused ops, written back as standard ops.

Each expansion is checked against ONNX Runtime's own kernel for the fused op (the same graph run
as saved), and its gradient against central differences of that kernel; whole networks, saved at
the extended optimisation level, against torch.autograd on the network itself.
"""

from __future__ import annotations

import collections
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from gradcheck import derived_grads
from onnxsal import Explainer
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.contrib import expand, fused_ops
from onnxsal.graph.normalize import upgrade_opset
from onnxsal.model import load

sys.path.insert(0, os.path.dirname(__file__))
import test_autodiff_models as zoo  # noqa: E402

MS = "com.microsoft"


def ms_model(op_type: str, inputs: dict, attrs: dict | None = None, inits: dict | None = None,
             node_inputs: list | None = None, outputs: tuple = ("y",), opset: int = 17,
             known_ranks: bool = True) -> onnx.ModelProto:
    """One com.microsoft node; without ``known_ranks`` its inputs come out of an Identity whose
    output type is not declared, so the expansion cannot read their rank."""
    inits = inits or {}
    names = list(node_inputs) if node_inputs is not None else list(inputs) + list(inits)
    nodes = []
    if not known_ranks:
        renamed = []
        for n in names:
            if n in inputs:
                nodes.append(helper.make_node("Identity", [n], [n + "_id"]))
                renamed.append(n + "_id")
            else:
                renamed.append(n)
        names = renamed
    nodes.append(helper.make_node(op_type, names, list(outputs), name="fused", domain=MS, **(attrs or {})))
    g_in = [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape) if known_ranks else None)
            for k, v in inputs.items()]
    g_out = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs if o]
    graph = helper.make_graph(nodes, "fused", g_in, g_out,
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)],
                             ir_version=8)


def run(model: onnx.ModelProto, feeds: dict) -> list:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL    # ORT's kernel, as saved
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def standard(model: onnx.ModelProto) -> onnx.ModelProto:
    out = expand(upgrade_opset(model))
    assert not any(n.domain == MS for n in out.graph.node)
    return out


rng = np.random.default_rng(0)


def r(*shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CONV = dict(X=r(2, 8, 7, 6))
CASES = {
    "conv_relu": (("FusedConv", CONV, dict(activation="Relu", pads=[1, 1, 1, 1]), dict(W=r(4, 8, 3, 3), B=r(4)))),
    "conv_clip": (("FusedConv", CONV, dict(activation="Clip", activation_params=[0.0, 0.6], strides=[2, 2]),
                   dict(W=r(4, 8, 3, 3), B=r(4)))),
    "conv_hardsigmoid_depthwise": (("FusedConv", CONV, dict(activation="HardSigmoid", activation_params=[1 / 6, 0.5],
                                                            group=8, pads=[1, 0, 1, 2]),
                                    dict(W=r(8, 1, 3, 3), B=r(8)))),
    "conv_leaky_nobias": (("FusedConv", CONV, dict(activation="LeakyRelu", activation_params=[0.1], dilations=[2, 1]),
                           dict(W=r(4, 8, 3, 2)))),
    "conv_sigmoid_sum": (("FusedConv", dict(X=r(2, 8, 7, 6), Z=r(2, 4, 7, 6)),
                          dict(activation="Sigmoid", auto_pad="SAME_UPPER"), dict(W=r(4, 8, 3, 3), B=r(4)),
                          ["X", "W", "B", "Z"])),
    "conv_tanh": (("FusedConv", CONV, dict(activation="Tanh", kernel_shape=[1, 1]), dict(W=r(4, 8, 1, 1), B=r(4)))),
    "gemm_relu": (("FusedGemm", dict(A=r(5, 6)), dict(activation="Relu", transB=1, alpha=0.7, beta=1.3),
                   dict(B=r(3, 6), C=r(3)))),
    "gemm_leaky_transA": (("FusedGemm", dict(A=r(6, 5)), dict(activation="LeakyRelu", activation_alpha=0.2, transA=1),
                           dict(B=r(6, 3), C=r(1, 3)))),
    "gemm_tanh": (("FusedGemm", dict(A=r(5, 6)), dict(activation="Tanh"), dict(B=r(6, 3), C=r(3)))),
    "matmul_alpha_transB": (("FusedMatMul", dict(A=r(2, 3, 4, 5), B=r(2, 3, 6, 5)), dict(alpha=0.125, transB=1))),
    "matmul_transA_broadcast": (("FusedMatMul", dict(A=r(3, 5, 4), B=r(5, 6)), dict(transA=1))),
    "matmul_transBatchA": (("FusedMatMul", dict(A=r(4, 3, 5), B=r(3, 5, 6)), dict(transBatchA=1))),
    "matmul_transBatchA_rank4": (("FusedMatMul", dict(A=r(3, 4, 2, 5), B=r(4, 2, 5, 6)), dict(transBatchA=1))),
    "matmul_transBatchB_transB": (("FusedMatMul", dict(A=r(3, 4, 5), B=r(6, 3, 5)), dict(transBatchB=1, transB=1))),
    "gelu": (("Gelu", dict(X=r(3, 7, scale=2)), {})),
    "bias_gelu": (("BiasGelu", dict(X=r(3, 7, scale=2)), {}, dict(bias=r(7)))),
    "fast_gelu": (("FastGelu", dict(X=r(3, 7, scale=2)), {})),
    "fast_gelu_bias": (("FastGelu", dict(X=r(3, 7, scale=2)), {}, dict(bias=r(7)))),
    "quick_gelu": (("QuickGelu", dict(X=r(3, 7, scale=2)), dict(alpha=1.702))),
    "silu": (("QuickGelu", dict(X=r(3, 7, scale=2)), dict(alpha=1.0))),
    "skip_ln": (("SkipLayerNormalization", dict(X=r(2, 3, 8), S=r(2, 3, 8)), dict(epsilon=1e-5),
                 dict(gamma=r(8), beta=r(8)))),
    "skip_ln_bias_sum": (("SkipLayerNormalization", dict(X=r(2, 3, 8), S=r(2, 3, 8)), dict(epsilon=1e-5),
                          dict(gamma=r(8), beta=r(8), bias=r(8)), None, ("y", "", "", "sum"))),
    "skip_ln_gamma_only": (("SkipLayerNormalization", dict(X=r(2, 3, 8), S=r(2, 3, 8)), {}, dict(gamma=r(8)))),
}


def build(case: str, opset: int = 17, known_ranks: bool = True) -> tuple[onnx.ModelProto, dict]:
    op, inputs, attrs, *rest = CASES[case]
    inits = rest[0] if rest else None
    node_inputs = rest[1] if len(rest) > 1 else None
    outputs = rest[2] if len(rest) > 2 else ("y",)
    return ms_model(op, inputs, attrs, inits, node_inputs, outputs, opset, known_ranks), inputs


@pytest.mark.parametrize("case", sorted(CASES))
def test_expansion_computes_what_onnxruntime_computes(case):
    model, feeds = build(case)
    want = run(model, feeds)
    got = run(standard(model), feeds)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["matmul_transA_broadcast", "matmul_alpha_transB", "skip_ln", "skip_ln_bias_sum"])
def test_expansion_without_known_ranks_or_at_opset_13(case):
    """Unknown ranks take the Einsum form; below opset 17 the layer norm is spelled out."""
    model, feeds = build(case, known_ranks=False)
    np.testing.assert_allclose(run(standard(model), feeds)[0], run(model, feeds)[0], rtol=1e-5, atol=1e-5)
    model13, _ = build(case, opset=13)
    if case.startswith("skip_ln"):
        assert "LayerNormalization" not in {n.op_type for n in standard(model13).graph.node}
    for g, w in zip(run(standard(model13), feeds), run(model13, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def numeric_vjp(model: onnx.ModelProto, feeds: dict, x: str, cot: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Central differences of <cot, y> in ONNX Runtime's own fused kernel, entry by entry."""
    g = np.zeros_like(feeds[x], dtype=np.float64)
    for i in np.ndindex(feeds[x].shape):
        plus, minus = dict(feeds), dict(feeds)
        plus[x] = feeds[x].copy()
        minus[x] = feeds[x].copy()
        plus[x][i] += eps
        minus[x][i] -= eps
        g[i] = (np.sum(run(model, plus)[0].astype(np.float64) * cot)
                - np.sum(run(model, minus)[0].astype(np.float64) * cot)) / (2 * eps)
    return g


@pytest.mark.parametrize("case", ["conv_clip", "conv_hardsigmoid_depthwise", "conv_sigmoid_sum", "gemm_leaky_transA",
                                  "matmul_transBatchB_transB", "bias_gelu", "fast_gelu_bias", "silu",
                                  "skip_ln_bias_sum"])
def test_gradient_of_the_expansion_against_the_fused_kernel(case):
    model, feeds = build(case)
    y = run(model, feeds)[0]
    cot = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    wrt = list(feeds)
    got = derived_grads(standard(model), "y", wrt, feeds, cot)
    for x in wrt:
        want = numeric_vjp(model, feeds, x, cot)
        err = np.abs(got["grad_" + x] - want).max() / max(np.abs(want).max(), 1e-6)
        assert err < 3e-3, (x, err)


def test_unknown_activation_is_a_model_error_naming_the_node():
    from onnxsal.errors import ModelError

    model, _ = build("conv_relu")
    model.graph.node[0].attribute[0].s = b"Softplus"
    with pytest.raises(ModelError, match="'fused'.*FusedConv with activation 'Softplus'"):
        standard(model)


# whole networks, as ONNX Runtime saves them -----------------------------------------------------

class SiLUNet(nn.Module):
    """EfficientNet's pieces: conv + SiLU (QuickGelu once saved), a sigmoid gate, and a scaled,
    transposed product over positions (FusedMatMul)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.gate = nn.Conv2d(16, 16, 1)
        self.q = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(16, 10)
        self.probe = self.dw

    def forward(self, x):
        x = nn.functional.silu(self.stem(x))
        x = nn.functional.silu(self.dw(x))
        x = x * torch.sigmoid(self.gate(x.mean((2, 3), keepdim=True)))
        t = self.q(x).flatten(2)                                     # (b, 8, n)
        att = torch.softmax(t.transpose(1, 2) @ t * 0.25, dim=-1)    # (b, n, n)
        mixed = x.flatten(2) @ att.transpose(1, 2)                   # (b, 16, n)
        return self.head(mixed.mean(2))


NETS = {"vgg": False, "resnet": False, "mobilenetv2": False, "se_hard": False, "vit": True, "silu": True}


def saved_by_ort(path: str) -> str:
    out = path.replace(".onnx", "_ort.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = out
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            net = SiLUNet().eval() if name == "silu" else zoo.build(name)
            path = str(tmp_path_factory.mktemp(name) / "m.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                zoo.export(net, path, NETS[name])
            cache[name] = (net, path, saved_by_ort(path))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(NETS))
def test_saved_networks_match_torch_autograd(saved, name):
    net, _, path = saved(name)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node if n.domain == MS)
    assert ops, "ONNX Runtime fused nothing"
    m = load(path)
    assert list(m.expanded) == sorted(ops)
    vm = vjp(m.proto, m.logits, [m.input.name])
    rngx = np.random.default_rng(3)
    x = rngx.standard_normal((1, 3, 32, 32)).astype(np.float32)
    cot = rngx.standard_normal((1, 10)).astype(np.float32)
    y_t, gx_t, _ = zoo.torch_grads(net, x, cot)
    out = dict(zip([o.name for o in vm.graph.output],
                   run(vm, {m.input.name: x, f"grad_{m.logits}": cot})))
    assert zoo.rel_err(out[m.logits], y_t) < zoo.TOL
    assert zoo.rel_err(out[f"grad_{m.input.name}"], gx_t) < zoo.TOL


def test_the_fused_ops_seen_in_saved_networks(saved):
    seen = set()
    for name in NETS:
        seen |= set(fused_ops(onnx.load(saved(name)[2])))
    assert {"FusedConv", "FusedGemm", "BiasGelu", "QuickGelu", "FusedMatMul"} <= seen


@pytest.mark.parametrize("name", ["mobilenetv2", "silu"])
def test_saved_network_keeps_its_layers_and_maps(saved, name):
    _, plain, opt = saved(name)
    a, b = Explainer(plain, size=(32, 32), preprocess="raw"), Explainer(opt, size=(32, 32), preprocess="raw")
    image = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert b.model.layers[-1].tensor == a.model.layers[-1].tensor
    for method in ("gradcam", "saliency", "scorecam"):
        ma, mb = a.explain(image, method=method), b.explain(image, method=method)
        np.testing.assert_allclose(mb.map, ma.map, atol=2e-5, err_msg=method)


def test_cli_names_the_fused_ops_and_a_hardware_layout_op(saved, tmp_path):
    from typer.testing import CliRunner

    from onnxsal.cli import app

    _, plain, opt = saved("resnet")
    res = CliRunner().invoke(app, ["inspect", opt])
    assert res.exit_code == 0 and "fused ops FusedConv (ONNX Runtime's), run as the standard ops they fuse" in res.output
    # the highest level writes ONNX Runtime's blocked layout for this machine's vector width
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "all.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(plain, so, providers=["CPUExecutionProvider"])
    if not any(n.domain == "com.microsoft.nchwc" for n in onnx.load(so.optimized_model_filepath).graph.node):
        pytest.skip("no blocked layout on this machine")
    with pytest.raises(UnsupportedOpError, match=r"'com\.microsoft\.nchwc\.\w+'"):
        m = load(so.optimized_model_filepath)
        vjp(m.proto, m.logits, [m.input.name])
