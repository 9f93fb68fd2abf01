"""VJP rules for Conv, ConvTranspose, pooling, normalisation and Resize.

Each op is checked two independent ways:

* central finite differences of the forward model in ORT (``check_vjp``).
  Most of these ops are linear in ``x`` (Conv, ConvTranspose, AveragePool,
  BatchNormalization, Resize), so a large step ``eps = 1`` is exact up to
  float32 rounding and the tolerance can be tight; max pooling is piecewise
  linear and is fed values spaced further apart than ``2 * eps``, so no
  difference step crosses a switch of the winning index; the normalisations
  are smooth and get the default float32 tolerance (or float64 where ORT has
  a double kernel).
* PyTorch autograd in float64 on the same weights, which must agree with the
  float32 ONNX result to 1e-4 of the gradient's scale.

Resize is also checked against the exact Jacobian of ORT's own forward
(probed with a batch of one-hot images), which pins down nearest-neighbour
tie rounding where a float replay of the spec and ORT disagree.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper
import torch
import torch.nn.functional as F

from gradcheck import check_vjp, derived_grads, one_node_model, run
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.autodiff import VJP_RULES
from onnxsal.graph.normalize import normalize, tensor_shapes
from onnxsal.graph.rules import conv, norm, pool, resize
from onnxsal.graph.rules.conv import flipped_conv_weight
from onnxsal.graph.rules.resize import interpolation_matrix

F32 = np.float32
LINEAR = dict(eps=1.0, rtol=1e-4, atol=1e-5)      # FD of a linear map: exact up to rounding
PIECEWISE = dict(eps=1e-2, rtol=1e-3, atol=1e-4)  # max pooling on well-separated values

torch.set_grad_enabled(True)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(1000 + seed)


def _spread(shape: tuple, seed: int = 0) -> np.ndarray:
    """Distinct values 0.05 apart in random order: no max pooling tie within a 1e-2 difference step."""
    n = int(np.prod(shape))
    return (_rng(seed).permutation(n).reshape(shape) * 0.05 - n * 0.025).astype(F32)


def _torch_grad(fn, x: np.ndarray, cot: np.ndarray) -> np.ndarray:
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = fn(xt)
    y.backward(torch.tensor(cot, dtype=torch.float64))
    return xt.grad.numpy()


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def assert_close_rel(got: np.ndarray, ref: np.ndarray, rtol: float = 1e-4) -> None:
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= rtol * scale, f"max abs err {err:.3g} vs scale {scale:.3g}"


def check_torch(model: onnx.ModelProto, feeds: dict, fn, rtol: float = 1e-4, seed: int = 0,
                outputs_match: bool = True) -> dict:
    """Derived gradient of ``x`` against PyTorch's for a random cotangent; forward must agree too (the
    model as onnxsal loads it: ONNX Runtime runs some nodes only in that form)."""
    x = feeds["x"]
    y = run(normalize(model), feeds)["y"]
    cot = _rng(seed + 7).standard_normal(y.shape).astype(y.dtype)
    got = derived_grads(model, "y", ["x"], feeds, cot)
    if outputs_match:
        with torch.no_grad():
            y_ref = fn(_t(x)).numpy()
        assert_close_rel(y, y_ref, 1e-5)
    assert_close_rel(got["grad_x"], _torch_grad(fn, x, cot), rtol)
    return got


def _rename_first_output(model: onnx.ModelProto) -> onnx.ModelProto:
    """Multi-output models from ``one_node_model`` name outputs y0, y1...; call the first one y."""
    model.graph.node[0].output[0] = "y"
    model.graph.output[0].name = "y"
    return model


def backward_ops(model: onnx.ModelProto, y: str = "y", wrt=("x",)) -> list[str]:
    """Op types the rules emitted (the builder's final Identity per gradient output left out)."""
    vm = vjp(model, y, list(wrt))
    return [n.op_type for n in vm.graph.node if n.name.startswith("onnxsal_bw/") and n.op_type != "Identity"]


def run_batches(model: onnx.ModelProto, make_x, fn, batches=(1, 3), seed: int = 0) -> None:
    """One derived graph (built at batch 2), run at other batch sizes against PyTorch."""
    vm = vjp(model, "y", ["x"])
    onnx.checker.check_model(vm)
    for b in batches:
        x = make_x(b)
        with torch.no_grad():
            y_ref = fn(_t(x)).numpy()
        cot = _rng(seed + 500 + b).standard_normal(y_ref.shape).astype(x.dtype)
        out = run(vm, {"x": x, "grad_y": cot})
        assert out["grad_x"].shape == x.shape
        assert_close_rel(out["y"], y_ref, 1e-5)
        assert_close_rel(out["grad_x"], _torch_grad(fn, x, cot))


def test_rules_registered():
    for module, ops in ((conv, ["Conv", "ConvTranspose"]),
                        (pool, ["MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
                                "GlobalLpPool"]),
                        (norm, ["BatchNormalization", "InstanceNormalization", "LayerNormalization", "LRN",
                               "GroupNormalization"]),
                        (resize, ["Resize"])):
        for op in ops:
            assert VJP_RULES[op].__module__ == module.__name__


# ---------------------------------------------------------------------------------------
# Conv


CONV_CASES = [
    # id, C, M, (H, W), kernel, attrs, group
    ("pads_asym", 3, 4, (7, 6), (3, 3), dict(pads=[1, 0, 2, 1]), 1),
    ("s2_pads_asym_odd", 3, 4, (7, 6), (3, 3), dict(strides=[2, 2], pads=[1, 0, 2, 1]), 1),
    ("s2_remainder", 2, 3, (8, 9), (3, 2), dict(strides=[2, 3]), 1),
    ("groups2_s23", 4, 6, (8, 7), (3, 3), dict(strides=[2, 3]), 2),
    ("groups2_s1", 4, 6, (6, 5), (3, 3), dict(pads=[1, 1, 1, 1]), 2),
    ("depthwise_s2", 4, 4, (9, 9), (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 4),
    ("depthwise_mult2", 3, 6, (7, 7), (3, 3), dict(pads=[1, 1, 1, 1]), 3),
    ("depthwise_dil2", 4, 4, (9, 8), (3, 3), dict(dilations=[2, 2], pads=[2, 2, 2, 2]), 4),
    ("dil2_s2", 3, 4, (11, 10), (3, 3), dict(dilations=[2, 2], strides=[2, 2], pads=[1, 2, 0, 1]), 1),
    ("same_upper_s2", 3, 4, (9, 8), (3, 2), dict(auto_pad="SAME_UPPER", strides=[2, 2]), 1),
    ("same_lower_s2", 3, 4, (9, 8), (3, 2), dict(auto_pad="SAME_LOWER", strides=[2, 2]), 1),
    ("same_lower_s1", 3, 4, (9, 8), (3, 2), dict(auto_pad="SAME_LOWER"), 1),
    ("same_upper_s1_even_k", 3, 4, (6, 5), (4, 2), dict(auto_pad="SAME_UPPER"), 1),
    ("valid_s23", 3, 4, (9, 8), (3, 2), dict(auto_pad="VALID", strides=[2, 3]), 1),
    ("k1_s2", 4, 5, (7, 7), (1, 1), dict(strides=[2, 2]), 1),
    ("k7_s2_p3", 3, 4, (15, 13), (7, 7), dict(strides=[2, 2], pads=[3, 3, 3, 3]), 1),
    ("pad_exceeds_kernel", 2, 3, (5, 5), (2, 2), dict(pads=[2, 2, 2, 2]), 1),
    # 8+ input channels, stride 1, one group: the flipped-kernel Conv (fewer channels take ConvTranspose)
    ("c8_pads_asym", 8, 4, (7, 6), (3, 3), dict(pads=[1, 0, 2, 1]), 1),
    ("c8_same_upper_even_k", 8, 4, (6, 5), (4, 2), dict(auto_pad="SAME_UPPER"), 1),
    ("c8_dil2", 8, 3, (9, 8), (3, 3), dict(dilations=[2, 2], pads=[2, 1, 2, 1]), 1),
    ("c8_pad_exceeds_kernel", 8, 3, (5, 5), (2, 2), dict(pads=[2, 2, 2, 2]), 1),
    # strided depthwise, 8/16 channels: flipped-kernel Conv on zero-interleaved dy
    ("dw8_s2", 8, 8, (9, 9), (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 8),
    ("dw8_s2_even", 8, 8, (10, 10), (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 8),
    ("dw8_s2_remainder", 8, 8, (11, 12), (3, 3), dict(strides=[2, 2], pads=[1, 1, 0, 0]), 8),
    ("dw16_s23_k5", 16, 16, (13, 11), (5, 3), dict(strides=[2, 3], pads=[2, 1, 2, 1]), 16),
    ("dw8_s2_dil2", 8, 8, (12, 11), (3, 3), dict(strides=[2, 2], dilations=[2, 2], pads=[2, 1, 1, 2]), 8),
    ("dw8_same_upper_s2", 8, 8, (9, 8), (4, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2]), 8),
    ("dw8_valid_s3", 8, 8, (10, 11), (3, 3), dict(auto_pad="VALID", strides=[3, 3]), 8),
    ("dw8_s2_pad_exceeds_kernel", 8, 8, (6, 6), (2, 2), dict(strides=[2, 2], pads=[2, 2, 2, 2]), 8),
    # SAME with a dilation, which ONNX Runtime refuses to run: given ONNX's explicit pads at load
    ("same_upper_s1_dil23", 3, 4, (9, 8), (3, 2), dict(auto_pad="SAME_UPPER", dilations=[2, 3]), 1),
    ("same_lower_s2_dil2", 3, 4, (9, 8), (3, 3), dict(auto_pad="SAME_LOWER", strides=[2, 2], dilations=[2, 2]), 1),
    ("same_upper_s2_dil2", 3, 4, (9, 8), (3, 3), dict(auto_pad="SAME_UPPER", strides=[2, 2], dilations=[2, 2]), 1),
    ("dw8_same_upper_s1_dil2", 8, 8, (9, 8), (3, 3), dict(auto_pad="SAME_UPPER", dilations=[2, 2]), 8),
]


def _torch_conv(w: np.ndarray, b, attrs: dict, group: int, hw: tuple, kernel: tuple):
    """PyTorch function equal to ONNX Conv with these attributes (explicit padding via F.pad)."""
    n = len(kernel)
    s = attrs.get("strides", [1] * n)
    d = attrs.get("dilations", [1] * n)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto == "VALID":
        pb, pe = [0] * n, [0] * n
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        pb, pe = [], []
        for h, k, st, dl in zip(hw, kernel, s, d):
            total = max(0, (-(-h // st) - 1) * st + (k - 1) * dl + 1 - h)
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pb.append(lo)
            pe.append(total - lo)
    else:
        p = attrs.get("pads", [0] * 2 * n)
        pb, pe = p[:n], p[n:]
    tpad = []
    for i in reversed(range(n)):
        tpad += [pb[i], pe[i]]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    wt = _t(w)
    bt = None if b is None else _t(b)
    return lambda xt: conv(F.pad(xt, tpad), wt, bt, stride=s, dilation=d, groups=group)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv(case):
    name, c, m, hw, kernel, attrs, group = case
    rng = _rng(1)
    x = rng.standard_normal((2, c) + hw).astype(F32)
    w = rng.standard_normal((m, c // group) + kernel).astype(F32)
    b = rng.standard_normal(m).astype(F32)
    model = one_node_model("Conv", {"x": x}, dict(attrs, group=group), {"w": w, "b": b})
    check_vjp(model, "y", ["x"], {"x": x}, **LINEAR)
    check_torch(model, {"x": x}, _torch_conv(w, b, attrs, group, hw, kernel))


def test_conv_formulation():
    """Stride 1 with a constant weight: a flipped-kernel Conv; strided: ConvTranspose on the same weight."""
    rng = _rng(2)
    x = rng.standard_normal((1, 4, 8, 8)).astype(F32)
    w = rng.standard_normal((6, 2, 3, 3)).astype(F32)
    s1 = one_node_model("Conv", {"x": x}, dict(pads=[1, 1, 1, 1], group=2), {"w": w})
    assert backward_ops(s1) == ["Conv"]
    s2 = one_node_model("Conv", {"x": x}, dict(pads=[1, 1, 1, 1], strides=[2, 2], group=2), {"w": w})
    ops = backward_ops(s2)
    assert ops == ["ConvTranspose"]
    vm = vjp(s2, "y", ["x"])
    ct = [n for n in vm.graph.node if n.op_type == "ConvTranspose"][0]
    assert ct.input[1] == "w"  # the forward weight itself, no copy
    # fewer input channels than ORT's CPU block (an RGB image): ConvTranspose even at stride 1
    x3 = rng.standard_normal((1, 3, 8, 8)).astype(F32)
    rgb = one_node_model("Conv", {"x": x3}, dict(pads=[1, 1, 1, 1]), {"w": rng.standard_normal((8, 3, 3, 3)).astype(F32)})
    assert backward_ops(rgb) == ["ConvTranspose"]
    x8 = rng.standard_normal((1, 8, 8, 8)).astype(F32)
    wide = one_node_model("Conv", {"x": x8}, dict(pads=[1, 1, 1, 1]), {"w": rng.standard_normal((4, 8, 3, 3)).astype(F32)})
    assert backward_ops(wide) == ["Conv"]
    # strided depthwise with a blocked channel count: unit 1x1 ConvTranspose spreads dy, flipped Conv at stride 1
    dw = one_node_model("Conv", {"x": x8}, dict(pads=[1, 1, 1, 1], strides=[2, 2], group=8),
                        {"w": rng.standard_normal((8, 1, 3, 3)).astype(F32)})
    vm = vjp(dw, "y", ["x"])
    bw = [n for n in vm.graph.node if n.name.startswith("onnxsal_bw/") and n.op_type != "Identity"]
    assert [n.op_type for n in bw] == ["ConvTranspose", "Conv"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bw[0].attribute}
    assert attrs["kernel_shape"] == [1, 1] and attrs["strides"] == [2, 2]
    # ... but pads beyond the kernel (dk-1-pb < 0) or channels ORT does not block keep ConvTranspose on W
    big_pad = one_node_model("Conv", {"x": x8}, dict(pads=[3, 3, 3, 3], strides=[2, 2], group=8),
                             {"w": rng.standard_normal((8, 1, 3, 3)).astype(F32)})
    assert [n.input[1] for n in vjp(big_pad, "y", ["x"]).graph.node if n.op_type == "ConvTranspose"] == ["w"]
    assert backward_ops(s2) == ["ConvTranspose"]


def test_flipped_weight_matches_transpose():
    """``Conv(., flipped W)`` with pads dk-1-p equals ConvTranspose(., W) for any group."""
    rng = _rng(3)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float64)
    wf = flipped_conv_weight(w, 3)
    dy = rng.standard_normal((1, 6, 5, 4))
    ref = F.conv_transpose2d(_t(dy), _t(w), groups=3, padding=(1, 0)).numpy()
    got = F.conv2d(_t(dy), _t(wf), groups=3, padding=(1, 1)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_conv_1d_and_3d():
    rng = _rng(4)
    x = rng.standard_normal((2, 3, 11)).astype(F32)
    w = rng.standard_normal((4, 3, 3)).astype(F32)
    attrs = dict(strides=[2], pads=[1, 0])
    m = one_node_model("Conv", {"x": x}, attrs, {"w": w})
    check_vjp(m, "y", ["x"], {"x": x}, **LINEAR)
    check_torch(m, {"x": x}, _torch_conv(w, None, attrs, 1, (11,), (3,)))
    x3 = rng.standard_normal((1, 2, 5, 6, 5)).astype(F32)
    w3 = rng.standard_normal((3, 2, 3, 3, 3)).astype(F32)
    attrs3 = dict(strides=[2, 1, 2], pads=[1, 1, 0, 0, 1, 1])
    m3 = one_node_model("Conv", {"x": x3}, attrs3, {"w": w3})
    check_torch(m3, {"x": x3}, _torch_conv(w3, None, attrs3, 1, (5, 6, 5), (3, 3, 3)))


def test_conv_runtime_weight_and_bias_grad():
    """A weight that is not a constant uses ConvTranspose at stride 1 too; the bias gradient is dy summed."""
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 6, 5)).astype(F32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    b = rng.standard_normal(4).astype(F32)
    m = one_node_model("Conv", {"x": x, "w": w, "b": b}, dict(pads=[1, 1, 1, 1]))
    assert backward_ops(m)[-1] == "ConvTranspose"
    check_vjp(m, "y", ["x", "b"], {"x": x, "w": w, "b": b}, **LINEAR)
    with pytest.raises(UnsupportedOpError):
        vjp(m, "y", ["x", "w"])


def test_conv_batches():
    rng = _rng(6)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    attrs = dict(strides=[2, 2], pads=[1, 0, 1, 1])
    m = one_node_model("Conv", {"x": rng.standard_normal((2, 3, 9, 8)).astype(F32)}, attrs, {"w": w})
    run_batches(m, lambda b: rng.standard_normal((b, 3, 9, 8)).astype(F32),
                _torch_conv(w, None, attrs, 1, (9, 8), (3, 3)))


# ---------------------------------------------------------------------------------------
# ConvTranspose


CT_CASES = [
    # id, C, M/g, (H, W), kernel, attrs, group
    ("s2_p1_op1", 3, 2, (4, 5), (3, 3), dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]), 1),
    ("s1_pads", 3, 2, (4, 5), (3, 3), dict(pads=[1, 0, 2, 1]), 1),
    ("groups2_s23_dil", 4, 3, (4, 3), (3, 2), dict(strides=[2, 3], dilations=[2, 1]), 2),
    ("depthwise_s2", 4, 1, (5, 5), (4, 4), dict(strides=[2, 2], pads=[1, 1, 1, 1]), 4),
    ("s3_op2_pad1", 2, 2, (3, 4), (3, 3), dict(strides=[3, 3], pads=[1, 1, 0, 0], output_padding=[2, 1]), 1),
    ("same_upper_s2", 2, 3, (4, 5), (3, 3), dict(strides=[2, 2], auto_pad="SAME_UPPER"), 1),
    ("same_lower_s2", 2, 3, (4, 5), (4, 3), dict(strides=[2, 2], auto_pad="SAME_LOWER"), 1),
    ("output_shape", 1, 2, (3, 3), (3, 3), dict(strides=[3, 2], output_shape=[10, 8]), 1),
    ("output_shape_larger", 2, 2, (3, 4), (3, 3), dict(strides=[2, 2], output_shape=[8, 10]), 1),
]


def _with_input(model: onnx.ModelProto, x: np.ndarray) -> onnx.ModelProto:
    """The same one-node model rebuilt for input ``x`` (another batch size)."""
    node = model.graph.node[0]
    return one_node_model(node.op_type, {"x": x},
                          {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
                          {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer},
                          node_inputs=list(node.input), opset=model.opset_import[0].version)


def _ort_forward_adjoint_check(model: onnx.ModelProto, x: np.ndarray, seed: int = 0) -> None:
    """Derived gradient == J^T cot, with J the exact Jacobian of ORT's forward (linear ops only).

    J is probed in one run on a batch of one-hot inputs; row k is the response to e_k.
    """
    n = x[0].size
    basis = np.eye(n, dtype=x.dtype).reshape((n,) + x.shape[1:])
    jac = run(_with_input(model, basis), {"x": basis})["y"].reshape(n, -1).astype(np.float64)
    m1 = _with_input(model, x[:1])
    y = run(m1, {"x": x[:1]})["y"]
    cot = _rng(seed).standard_normal(y.shape).astype(x.dtype)
    g = derived_grads(m1, "y", ["x"], {"x": x[:1]}, cot)["grad_x"]
    assert_close_rel(g.reshape(-1), jac @ cot.reshape(-1).astype(np.float64), 1e-5)


@pytest.mark.parametrize("case", CT_CASES, ids=[c[0] for c in CT_CASES])
def test_conv_transpose(case):
    name, c, mg, hw, kernel, attrs, group = case
    rng = _rng(7)
    x = rng.standard_normal((2, c) + hw).astype(F32)
    w = rng.standard_normal((c, mg) + kernel).astype(F32)
    model = one_node_model("ConvTranspose", {"x": x}, dict(attrs, group=group), {"w": w})
    check_vjp(model, "y", ["x"], {"x": x}, **LINEAR)
    _ort_forward_adjoint_check(model, x)
    if "auto_pad" in attrs or "output_shape" in attrs:
        return  # PyTorch has no equivalent padding rule; the two checks above are exact already
    n = len(kernel)
    p = attrs.get("pads", [0] * 2 * n)
    fn = lambda xt: F.conv_transpose2d(  # noqa: E731
        xt, _t(w), stride=attrs.get("strides", 1), dilation=attrs.get("dilations", 1), groups=group,
        output_padding=attrs.get("output_padding", 0), padding=0)[
        (..., ) + tuple(slice(p[i], (xt.shape[2 + i] - 1) * attrs.get("strides", [1] * n)[i]
                              + attrs.get("output_padding", [0] * n)[i]
                              + (kernel[i] - 1) * attrs.get("dilations", [1] * n)[i] + 1 - p[n + i])
                        for i in range(n))]
    check_torch(model, {"x": x}, fn)


def test_conv_transpose_batches():
    rng = _rng(8)
    w = rng.standard_normal((3, 2, 3, 3)).astype(F32)
    attrs = dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 0])
    m = one_node_model("ConvTranspose", {"x": rng.standard_normal((2, 3, 4, 5)).astype(F32)}, attrs, {"w": w})
    fn = lambda xt: F.conv_transpose2d(xt, _t(w), stride=2, padding=1, output_padding=(1, 0))  # noqa: E731
    run_batches(m, lambda b: rng.standard_normal((b, 3, 4, 5)).astype(F32), fn)


# ---------------------------------------------------------------------------------------
# MaxPool


MAXPOOL_CASES = [
    # id, (H, W), attrs, torch fn, opset
    ("2x2_s2", (8, 6), dict(kernel_shape=[2, 2], strides=[2, 2]), lambda t: F.max_pool2d(t, 2, 2), 17),
    ("2x2_s2_odd", (7, 5), dict(kernel_shape=[2, 2], strides=[2, 2]), lambda t: F.max_pool2d(t, 2, 2), 17),
    ("2x3_s23_tiled_odd", (7, 8), dict(kernel_shape=[2, 3], strides=[2, 3]),
     lambda t: F.max_pool2d(t, (2, 3), (2, 3)), 17),
    ("2x2_s2_ceil_partial", (7, 5), dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
     lambda t: F.max_pool2d(t, 2, 2, ceil_mode=True), 17),
    ("2x2_s3_gapped", (8, 7), dict(kernel_shape=[2, 2], strides=[3, 3]), lambda t: F.max_pool2d(t, 2, 3), 17),
    ("3x3_s2_p1", (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     lambda t: F.max_pool2d(t, 3, 2, 1), 17),
    ("3x3_s2_p1_opset13", (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     lambda t: F.max_pool2d(t, 3, 2, 1), 13),
    ("3x3_s2_ceil", (8, 7), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
     lambda t: F.max_pool2d(t, 3, 2, ceil_mode=True), 17),
    ("3x3_s2_p1_ceil", (8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
     lambda t: F.max_pool2d(t, 3, 2, 1, ceil_mode=True), 17),
    ("3x3_s1_p1", (6, 5), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
     lambda t: F.max_pool2d(t, 3, 1, 1), 17),
    ("3x3_s1_opset13", (6, 5), dict(kernel_shape=[3, 3], strides=[1, 1]), lambda t: F.max_pool2d(t, 3, 1), 13),
    ("2x2_dil2", (7, 6), dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2]),
     lambda t: F.max_pool2d(t, 2, 1, dilation=2), 17),
    ("3x2_s21", (7, 6), dict(kernel_shape=[3, 2], strides=[2, 1]), lambda t: F.max_pool2d(t, (3, 2), (2, 1)), 17),
    ("same_upper_s2", (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
     lambda t: F.max_pool2d(F.pad(t, (0, 1, 1, 1), value=-1e9), 3, 2), 17),
    # ceil mode whose last window would start in the end padding: dropped, 5x7 -> 3x4 (inference says 4x5)
    ("2x2_s2_p1_ceil_drops_last", (5, 7), dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
     lambda t: F.max_pool2d(t, 2, 2, 1, ceil_mode=True), 17),
    ("3x2_s2_ceil_end_pad_only", (7, 8), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=1),
     lambda t: F.max_pool2d(F.pad(t, (0, 1, 0, 1), value=-1e9), (3, 2), 2, ceil_mode=True)[..., :4, :4], 17),
    # SAME with a dilation: the runtime pads for the undilated kernel (1 here), 7x8 -> 6x7, not 7x8
    ("same_lower_dil2", (7, 8), dict(kernel_shape=[2, 2], strides=[1, 1], dilations=[2, 2], auto_pad="SAME_LOWER"),
     lambda t: F.max_pool2d(F.pad(t, (1, 0, 1, 0), value=-1e9), 2, 1, dilation=2), 12),
]


@pytest.mark.parametrize("case", MAXPOOL_CASES, ids=[c[0] for c in MAXPOOL_CASES])
def test_max_pool(case):
    name, hw, attrs, fn, opset = case
    x = _spread((2, 3) + hw)
    model = one_node_model("MaxPool", {"x": x}, attrs, opset=opset)
    check_vjp(model, "y", ["x"], {"x": x}, **PIECEWISE)
    check_torch(model, {"x": x}, fn)


def test_max_pool_formulations():
    x = _spread((1, 2, 8, 8))
    tiled = backward_ops(one_node_model("MaxPool", {"x": x}, dict(kernel_shape=[2, 2], strides=[2, 2])))
    assert tiled.count("MaxUnpool") == 1 and "MaxPool" in tiled and "ScatterElements" not in tiled
    gapped = backward_ops(one_node_model("MaxPool", {"x": x}, dict(kernel_shape=[2, 2], strides=[3, 3])))
    assert gapped.count("MaxUnpool") == 1 and "MaxPool" in gapped
    x7 = _spread((1, 2, 7, 7))          # a partial last window: ORT's MaxUnpool refuses it, the scatter does not
    ceil = backward_ops(one_node_model("MaxPool", {"x": x7}, dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)))
    assert ceil.count("ScatterElements") == 1 and "MaxUnpool" not in ceil
    overlap = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    vm = vjp(one_node_model("MaxPool", {"x": x}, overlap), "y", ["x"])
    sc = [n for n in vm.graph.node if n.op_type == "ScatterElements"]
    assert len(sc) == 1 and any(a.name == "reduction" and a.s == b"add" for a in sc[0].attribute)
    old = backward_ops(one_node_model("MaxPool", {"x": x}, overlap, opset=13))
    assert old.count("ScatterElements") == 4  # 2 x 2 phase classes, each a plain scatter


def test_max_pool_reuses_forward_indices():
    x = _spread((2, 3, 7, 6))
    model = _rename_first_output(
        one_node_model("MaxPool", {"x": x}, dict(kernel_shape=[3, 3], strides=[2, 2]), n_out=2))
    ops = backward_ops(model)
    assert "MaxPool" not in ops
    check_vjp(model, "y", ["x"], {"x": x}, **PIECEWISE)


def test_max_pool_ties_route_like_pytorch():
    """Windows of equal values (post-ReLU zeros): one winner per window, the same one PyTorch picks."""
    x = np.maximum(_rng(9).standard_normal((2, 3, 9, 8)), 0).astype(F32)
    x[0, 0, :5, :5] = 0
    for attrs, fn in ((dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                       lambda t: F.max_pool2d(t, 3, 2, 1)),
                      (dict(kernel_shape=[2, 2], strides=[2, 2]), lambda t: F.max_pool2d(t, 2, 2))):
        check_torch(one_node_model("MaxPool", {"x": x}, attrs), {"x": x}, fn, rtol=1e-6)
    check_torch(one_node_model("GlobalMaxPool", {"x": x}, {}), {"x": x},
                lambda t: F.adaptive_max_pool2d(t, 1), rtol=1e-6)


def test_max_pool_1d_and_batches():
    x1 = _spread((2, 3, 9))
    m1 = one_node_model("MaxPool", {"x": x1}, dict(kernel_shape=[2], strides=[2]))
    check_torch(m1, {"x": x1}, lambda t: F.max_pool1d(t, 2, 2))
    run_batches(m1, lambda b: _spread((b, 3, 9), seed=b), lambda t: F.max_pool1d(t, 2, 2))
    x = _spread((2, 3, 11))
    m = one_node_model("MaxPool", {"x": x}, dict(kernel_shape=[3], strides=[2], pads=[1, 1]))
    check_vjp(m, "y", ["x"], {"x": x}, **PIECEWISE)
    check_torch(m, {"x": x}, lambda t: F.max_pool1d(t, 3, 2, 1))
    m2 = one_node_model("MaxPool", {"x": _spread((2, 3, 9, 9))},
                        dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    run_batches(m2, lambda b: _spread((b, 3, 9, 9), seed=b), lambda t: F.max_pool2d(t, 3, 2, 1))


# ---------------------------------------------------------------------------------------
# AveragePool and the global pools


AVGPOOL_CASES = [
    ("2x2_s2", (8, 6), dict(kernel_shape=[2, 2], strides=[2, 2]), lambda t: F.avg_pool2d(t, 2, 2), 17),
    ("3x3_s2_p1_excl", (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
     lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False), 17),
    ("3x3_s2_p1_incl", (9, 8), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1),
     lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=True), 17),
    ("3x3_s2_p1_ceil_excl", (8, 7), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
     lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False), 17),
    ("3x3_s2_p1_ceil_incl", (8, 7),
     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
     lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=True), 17),
    ("3x3_s2_ceil_nopad", (8, 8), dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
     lambda t: F.avg_pool2d(t, 3, 2, ceil_mode=True), 17),
    ("3x3_s1_p1_excl", (6, 5), dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1]),
     lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False), 17),
    ("k1_s1", (5, 5), dict(kernel_shape=[1, 1]), lambda t: F.avg_pool2d(t, 1), 17),
    ("pads_asym_incl", (7, 6), dict(kernel_shape=[3, 2], strides=[2, 2], pads=[0, 1, 2, 0], count_include_pad=1),
     lambda t: F.avg_pool2d(F.pad(t, (1, 0, 0, 2)), (3, 2), 2), 17),
    ("dil2", (8, 7), dict(kernel_shape=[2, 2], strides=[1, 2], dilations=[2, 2]), None, 19),
    ("same_upper_s2", (9, 8), dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"), None, 17),
    ("same_lower_s2_incl", (9, 7), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER",
                                       count_include_pad=1), None, 17),
    ("valid_s2", (9, 7), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"), None, 17),
    ("2x2_s2_p1_ceil_drops_last_incl", (5, 7),
     dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1),
     lambda t: F.avg_pool2d(t, 2, 2, 1, ceil_mode=True, count_include_pad=True), 17),
    ("2x2_s2_p1_ceil_drops_last_excl", (5, 7), dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1),
     lambda t: F.avg_pool2d(t, 2, 2, 1, ceil_mode=True, count_include_pad=False), 17),
    ("same_lower_dil2_incl", (7, 8), dict(kernel_shape=[3, 2], strides=[1, 2], dilations=[1, 2], auto_pad="SAME_LOWER",
                                          count_include_pad=1), None, 19),
]


@pytest.mark.parametrize("case", AVGPOOL_CASES, ids=[c[0] for c in AVGPOOL_CASES])
def test_average_pool(case):
    name, hw, attrs, fn, opset = case
    x = _rng(10).standard_normal((2, 3) + hw).astype(F32)
    model = one_node_model("AveragePool", {"x": x}, attrs, opset=opset)
    check_vjp(model, "y", ["x"], {"x": x}, **LINEAR)
    _ort_forward_adjoint_check(model, x)
    if fn is not None:
        check_torch(model, {"x": x}, fn)


def test_pools_keep_the_runtime_s_windows_where_inference_sizes_them_otherwise():
    """normalize rewrites such a pool with explicit pads: the same values (the divisor of a pool that
    counts its padding scaled back in), sizes that ONNX's inference and ONNX Runtime agree on, and a
    rule-independent rewrite only where one is needed."""
    x = _rng(14).standard_normal((2, 3, 5, 7)).astype(F32)
    for op, extra in (("MaxPool", {}), ("AveragePool", {"count_include_pad": 1}), ("AveragePool", {}),
                      ("LpPool", {"p": 2})):
        m = one_node_model(op, {"x": x}, dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1,
                                               **extra), opset=18)
        assert [d.dim_value for d in m.graph.output[0].type.tensor_type.shape.dim] == [2, 3, 4, 5]   # inference
        want = run(m, {"x": x})["y"]
        assert want.shape == (2, 3, 3, 4)
        nm = normalize(m)
        assert tensor_shapes(nm)["y"][1][1:] == (3, 3, 4)
        pool = next(n for n in nm.graph.node if n.op_type == op)
        assert {a.name: helper.get_attribute_value(a) for a in pool.attribute}["pads"] == [1, 1, 0, 0]
        assert not any(a.name == "ceil_mode" for a in pool.attribute)
        np.testing.assert_allclose(run(nm, {"x": x})["y"], want, rtol=1e-6, atol=1e-7)
    plain = one_node_model("MaxPool", {"x": x}, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1))
    assert normalize(plain).graph.node[0].attribute == plain.graph.node[0].attribute    # sizes agree: left alone
    # a file whose writer ran ONNX's inference declares the wrong sizes on the tensors after the pool too
    pool = helper.make_node("MaxPool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    graph = helper.make_graph([pool, helper.make_node("Relu", ["p"], ["r"]), helper.make_node("Neg", ["r"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 5, 7])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    declared = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert {vi.name: vi.type.tensor_type.shape.dim[3].dim_value for vi in declared.graph.value_info} == {"p": 5, "r": 5}
    assert {k: v[1][1:] for k, v in tensor_shapes(normalize(declared)).items() if k in "pr"} == {"p": (3, 3, 4),
                                                                                                "r": (3, 3, 4)}
    check_vjp(declared, "y", ["x"], {"x": x}, **PIECEWISE)


def test_average_pool_1d_and_batches():
    x = _rng(11).standard_normal((2, 3, 10)).astype(F32)
    m = one_node_model("AveragePool", {"x": x}, dict(kernel_shape=[3], strides=[2], pads=[1, 1], ceil_mode=1))
    check_vjp(m, "y", ["x"], {"x": x}, **LINEAR)
    check_torch(m, {"x": x}, lambda t: F.avg_pool1d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False))
    attrs = dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    m2 = one_node_model("AveragePool", {"x": _rng(12).standard_normal((2, 3, 8, 7)).astype(F32)}, attrs)
    run_batches(m2, lambda b: _rng(b).standard_normal((b, 3, 8, 7)).astype(F32),
                lambda t: F.avg_pool2d(t, 3, 2, 1, ceil_mode=True, count_include_pad=False))


@pytest.mark.parametrize("dtype", [np.float32])
def test_global_average_pool(dtype):
    x = _rng(13).standard_normal((2, 3, 5, 4)).astype(dtype)
    m = one_node_model("GlobalAveragePool", {"x": x}, {})
    check_vjp(m, "y", ["x"], {"x": x}, eps=1.0, rtol=1e-5, atol=1e-6)
    check_torch(m, {"x": x}, lambda t: F.adaptive_avg_pool2d(t, 1))
    run_batches(m, lambda b: _rng(b).standard_normal((b, 3, 5, 4)).astype(dtype),
                lambda t: F.adaptive_avg_pool2d(t, 1))


def _lp_sum(t, p: int, k, s, pad=(0, 0), ceil=False, dilation=1):
    """PyTorch's reference for ONNX LpPool: (sum over the window of |x|^p)^(1/p), zero padding."""
    u = t.abs() ** p
    summed = F.avg_pool2d(u, k, s, pad, ceil_mode=ceil, count_include_pad=True) * (k[0] * k[1]) if dilation == 1 \
        else F.conv2d(u.reshape(-1, 1, *u.shape[2:]), torch.ones(1, 1, *k, dtype=u.dtype), stride=s, padding=pad,
                      dilation=dilation).reshape(u.shape[0], u.shape[1], -1, 1)
    return summed ** (1.0 / p)


LPPOOL_CASES = [
    ("p2_2x2_s2", 2, dict(kernel_shape=[2, 2], strides=[2, 2], p=2), lambda t: _lp_sum(t, 2, (2, 2), 2), 17),
    ("p3_3x3_s2_p1", 3, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], p=3),
     lambda t: _lp_sum(t, 3, (3, 3), 2, (1, 1)), 17),
    ("p1_3x2_s1", 1, dict(kernel_shape=[3, 2], p=1), lambda t: _lp_sum(t, 1, (3, 2), 1), 17),
    ("p2_3x3_s2_ceil", 2, dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1, p=2), None, 18),
    ("p2_same_upper", 2, dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER", p=2), None, 17),
    ("p3_ceil_drops_last", 3, dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, p=3),
     lambda t: _lp_sum(t, 3, (2, 2), 2, (1, 1), ceil=True), 18),
]


@pytest.mark.parametrize("case", LPPOOL_CASES, ids=[c[0] for c in LPPOOL_CASES])
def test_lp_pool(case):
    name, p, attrs, fn, opset = case
    x = _rng(20).uniform(0.2, 1.5, (2, 3, 8, 7)).astype(F32) * np.where(_rng(21).random((2, 3, 8, 7)) < 0.5, -1, 1)
    model = one_node_model("LpPool", {"x": x.astype(F32)}, attrs, opset=opset)
    check_vjp(model, "y", ["x"], {"x": x.astype(F32)}, eps=1e-3, rtol=1e-2, atol=1e-3)
    if fn is not None:
        check_torch(model, {"x": x.astype(F32)}, fn)


def test_lp_pool_of_a_window_of_zeros_passes_zero():
    x = _rng(24).uniform(0.2, 1.5, (1, 2, 4, 4)).astype(F32)
    x[0, 0, :2, :2] = 0                    # one whole window of zeros: its norm's gradient is 0, not NaN
    for p in (2, 3):
        m = one_node_model("LpPool", {"x": x}, dict(kernel_shape=[2, 2], strides=[2, 2], p=p))
        got = derived_grads(m, "y", ["x"], {"x": x}, np.ones((1, 2, 2, 2), F32))["grad_x"]
        assert np.isfinite(got).all() and not got[0, 0, :2, :2].any() and got[0, 1].all()


@pytest.mark.parametrize("p", [1, 2, 3])
def test_global_lp_pool(p):
    x = (_rng(22).uniform(0.2, 1.5, (2, 3, 5, 4)) * np.where(_rng(23).random((2, 3, 5, 4)) < 0.5, -1, 1)).astype(F32)
    m = one_node_model("GlobalLpPool", {"x": x}, {"p": p})
    check_torch(m, {"x": x}, lambda t: (t.abs() ** p).sum(dim=(2, 3), keepdim=True) ** (1.0 / p))
    zero = np.zeros_like(x)
    zero[0, 0] = x[0, 0]            # a channel of zeros: the norm's gradient there is 0, not NaN
    got = derived_grads(m, "y", ["x"], {"x": zero}, np.ones((2, 3, 1, 1), F32))["grad_x"]
    assert np.isfinite(got).all() and not got[1].any()


def test_global_max_pool():
    x = _spread((2, 3, 5, 4))
    m = one_node_model("GlobalMaxPool", {"x": x}, {})
    check_vjp(m, "y", ["x"], {"x": x}, **PIECEWISE)
    check_torch(m, {"x": x}, lambda t: F.adaptive_max_pool2d(t, 1))
    x1 = _spread((2, 3, 7))
    check_torch(one_node_model("GlobalMaxPool", {"x": x1}, {}), {"x": x1}, lambda t: F.adaptive_max_pool1d(t, 1))
    run_batches(m, lambda b: _spread((b, 3, 5, 4), seed=b), lambda t: F.adaptive_max_pool2d(t, 1))


# ---------------------------------------------------------------------------------------
# Normalisation


def _bn_params(c: int, dtype, seed: int = 14) -> dict:
    rng = _rng(seed)
    return dict(s=rng.uniform(0.5, 2, c).astype(dtype), b=rng.standard_normal(c).astype(dtype),
                m=rng.standard_normal(c).astype(dtype), v=rng.uniform(0.5, 2, c).astype(dtype))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3), (2, 3, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batch_norm(shape, dtype):
    x = _rng(15).standard_normal(shape).astype(dtype)
    p = _bn_params(shape[1], dtype)
    m = one_node_model("BatchNormalization", {"x": x}, dict(epsilon=1e-3), p)
    check_vjp(m, "y", ["x"], {"x": x}, eps=1.0, rtol=1e-5, atol=1e-6)
    check_torch(m, {"x": x}, lambda t: F.batch_norm(t, _t(p["m"]), _t(p["v"]), _t(p["s"]), _t(p["b"]),
                                                     training=False, eps=1e-3))
    assert backward_ops(m) == ["Mul"]


def test_batch_norm_runtime_params_and_refusals():
    x = _rng(16).standard_normal((2, 3, 4, 4)).astype(F32)
    p = _bn_params(3, F32)
    m = one_node_model("BatchNormalization", {"x": x, "s": p["s"]}, {}, {k: p[k] for k in "bmv"},
                       node_inputs=["x", "s", "b", "m", "v"])
    check_vjp(m, "y", ["x"], {"x": x, "s": p["s"]}, eps=1.0, rtol=1e-4, atol=1e-5)
    with pytest.raises(UnsupportedOpError):
        vjp(m, "y", ["x", "s"])
    run_batches(one_node_model("BatchNormalization", {"x": x}, {}, p),
                lambda b: _rng(b).standard_normal((b, 3, 4, 4)).astype(F32),
                lambda t: F.batch_norm(t, _t(p["m"]), _t(p["v"]), _t(p["s"]), _t(p["b"]), training=False, eps=1e-5))


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 7)])
def test_instance_norm(shape):
    x = _rng(17).standard_normal(shape).astype(F32)
    rng = _rng(18)
    s, b = rng.uniform(0.5, 2, shape[1]).astype(F32), rng.standard_normal(shape[1]).astype(F32)
    m = one_node_model("InstanceNormalization", {"x": x}, dict(epsilon=1e-3), dict(s=s, b=b))
    check_vjp(m, "y", ["x"], {"x": x})
    fn = lambda t: F.instance_norm(t, weight=_t(s), bias=_t(b), eps=1e-3)  # noqa: E731
    check_torch(m, {"x": x}, fn)
    run_batches(m, lambda k: _rng(k).standard_normal((k,) + shape[1:]).astype(F32), fn)


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size):
    """Cross-channel LRN (AlexNet/GoogLeNet): finite differences and PyTorch.  ORT runs odd sizes
    only, where PyTorch's window and ONNX's agree (for even ones they differ by one channel)."""
    x = (_rng(30 + size).standard_normal((2, 7, 5, 4)) * 2).astype(F32)
    attrs = dict(size=size, alpha=0.6, beta=0.75, bias=1.5)
    m = one_node_model("LRN", {"x": x}, attrs)
    check_vjp(m, "y", ["x"], {"x": x})
    fn = lambda t: F.local_response_norm(t, size, alpha=0.6, beta=0.75, k=1.5)  # noqa: E731
    check_torch(m, {"x": x}, fn)
    run_batches(m, lambda k: _rng(k).standard_normal((k,) + x.shape[1:]).astype(F32), fn)


def _lrn_numpy(x, size, alpha, beta, bias):
    lo = (size - 1) // 2
    sq = np.pad(x ** 2, [(0, 0), (lo, size - 1 - lo), (0, 0), (0, 0)])
    s = sum(sq[:, k:k + x.shape[1]] for k in range(size))
    return x * (bias + alpha / size * s) ** -beta


@pytest.mark.parametrize("size", [2, 4])
def test_lrn_even_size_backward_against_numpy(size):
    """ORT refuses even LRN sizes, where the window is lopsided (one more channel after than
    before).  The backward nodes read x and the cotangent only, so with the forward node made an
    Identity the derived graph still runs, and its gradient is compared with float64 central
    differences of a NumPy LRN."""
    x = _rng(40 + size).standard_normal((1, 5, 2, 2))
    attrs = dict(size=size, alpha=0.6, beta=0.75, bias=1.5)
    vm = vjp(one_node_model("LRN", {"x": x.astype(F32)}, attrs), "y", ["x"])
    for node in vm.graph.node:
        if node.op_type == "LRN":
            node.op_type = "Identity"
            del node.attribute[:]
    cot = _rng(50 + size).standard_normal(x.shape)
    got = run(vm, {"x": x.astype(F32), "grad_y": cot.astype(F32)})["grad_x"]
    ref = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[i] = 1e-6
        ref[i] = np.sum(cot * (_lrn_numpy(x + e, size, 0.6, 0.75, 1.5) - _lrn_numpy(x - e, size, 0.6, 0.75, 1.5))) / 2e-6
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime_scale", [False, True])
def test_group_norm(runtime_scale):
    """GroupNormalization (opset 21, one scale per channel) against finite differences and PyTorch."""
    shape, groups = (2, 6, 5, 4), 3
    x = (_rng(60).standard_normal(shape) * 2 + 1).astype(F32)
    rng = _rng(61)
    s, b = rng.uniform(0.5, 2, shape[1]).astype(F32), rng.standard_normal(shape[1]).astype(F32)
    feeds = {"x": x, "s": s, "b": b} if runtime_scale else {"x": x}
    m = one_node_model("GroupNormalization", feeds, dict(num_groups=groups, epsilon=1e-3),
                       {} if runtime_scale else dict(s=s, b=b), opset=21)
    check_vjp(m, "y", ["x"], feeds)
    check_torch(m, feeds, lambda t: F.group_norm(t, groups, _t(s), _t(b), eps=1e-3))


LN_CASES = [(-1, True, np.float64), (-2, True, np.float64), (1, False, np.float32), (-1, True, np.float32),
            (2, False, np.float64)]


@pytest.mark.parametrize("axis,bias,dtype", LN_CASES)
def test_layer_norm(axis, bias, dtype):
    shape = (2, 3, 4, 5)
    x = _rng(19).standard_normal(shape).astype(dtype)
    ax = axis % len(shape)
    rng = _rng(20)
    inits = {"s": rng.uniform(0.5, 2, shape[ax:]).astype(dtype)}
    if bias:
        inits["b"] = rng.standard_normal(shape[ax:]).astype(dtype)
    m = one_node_model("LayerNormalization", {"x": x}, dict(axis=axis, epsilon=1e-3), inits)
    check_vjp(m, "y", ["x"], {"x": x})
    fn = lambda t: F.layer_norm(t, shape[ax:], _t(inits["s"]),  # noqa: E731
                                _t(inits["b"]) if bias else None, eps=1e-3)
    check_torch(m, {"x": x}, fn)
    if dtype == np.float32:
        run_batches(m, lambda k: _rng(k).standard_normal((k,) + shape[1:]).astype(dtype), fn)


def test_layer_norm_reuses_forward_statistics():
    x = _rng(21).standard_normal((2, 6, 8)).astype(np.float64)
    s = _rng(22).uniform(0.5, 2, (8,)).astype(np.float64)
    m = _rename_first_output(one_node_model("LayerNormalization", {"x": x}, dict(axis=-1), {"s": s}, n_out=3))
    assert "LayerNormalization" not in backward_ops(m)
    check_vjp(m, "y", ["x"], {"x": x})


# ---------------------------------------------------------------------------------------
# Resize


def _resize_model(x: np.ndarray, attrs: dict, scales=None, sizes=None, opset: int = 19) -> onnx.ModelProto:
    if scales is not None:
        return one_node_model("Resize", {"x": x}, attrs,
                              {"roi": np.zeros(0, F32), "scales": np.asarray(scales, F32)},
                              node_inputs=["x", "roi", "scales"], opset=opset)
    return one_node_model("Resize", {"x": x}, attrs, {"sizes": np.asarray(sizes, np.int64)},
                          node_inputs=["x", "", "", "sizes"], opset=opset)


def _resize_jacobian_check(x: np.ndarray, attrs: dict, scales=None, sizes=None, seed: int = 0) -> None:
    """Derived gradient == J^T cot, with J the exact Jacobian of ORT's own Resize (one-hot probes)."""
    n = x[0].size
    basis = np.eye(n, dtype=F32).reshape((n,) + x.shape[1:])
    bsizes = None if sizes is None else [n] + list(sizes[1:])
    jac = run(_resize_model(basis, attrs, scales, bsizes), {"x": basis})["y"].reshape(n, -1).astype(np.float64)
    model = _resize_model(x[:1], attrs, scales, None if sizes is None else [1] + list(sizes[1:]))
    y = run(model, {"x": x[:1]})["y"]
    cot = _rng(seed).standard_normal(y.shape).astype(F32)
    g = derived_grads(model, "y", ["x"], {"x": x[:1]}, cot)["grad_x"]
    assert_close_rel(g.reshape(-1), jac @ cot.reshape(-1).astype(np.float64), 1e-5)


RESIZE_CASES = [
    # id, attrs, scales, sizes (for a (2, 3, 5, 6) input)
    ("nearest_s2_asym_floor", dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [1, 1, 2, 2], None),
    ("nearest_s2_half_pixel", dict(mode="nearest"), [1, 1, 2, 2], None),
    ("nearest_s3_half_pixel_ceil", dict(mode="nearest", nearest_mode="round_prefer_ceil"), [1, 1, 3, 3], None),
    ("nearest_sizes_align", dict(mode="nearest", coordinate_transformation_mode="align_corners"), None,
     [2, 3, 9, 4]),
    ("nearest_sizes_asym_tie", dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                    nearest_mode="round_prefer_ceil"), None, [2, 3, 7, 4]),
    ("nearest_down", dict(mode="nearest"), [1, 1, 0.6, 0.5], None),
    ("linear_s2_half_pixel", dict(mode="linear"), [1, 1, 2, 2], None),
    ("linear_s2_pytorch_half_pixel", dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
     [1, 1, 2, 2], None),
    ("linear_sizes_align", dict(mode="linear", coordinate_transformation_mode="align_corners"), None,
     [2, 3, 9, 11]),
    ("linear_sizes_asym", dict(mode="linear", coordinate_transformation_mode="asymmetric"), None, [2, 3, 8, 4]),
    ("linear_scales_frac", dict(mode="linear"), [1, 1, 1.5, 0.7], None),
    ("linear_h_only", dict(mode="linear"), [1, 1, 2, 1], None),
    ("cubic_half_pixel", dict(mode="cubic"), [1, 1, 2, 2], None),
    ("cubic_exclude_outside", dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5), None, [2, 3, 8, 9]),
    ("linear_antialias_down", dict(mode="linear", antialias=1), None, [2, 3, 3, 4]),
    ("linear_half_pixel_symmetric", dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"),
     [1, 1, 1.5, 2], None),
]


@pytest.mark.parametrize("case", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize(case):
    name, attrs, scales, sizes = case
    x = _rng(23).standard_normal((2, 3, 5, 6)).astype(F32)
    model = _resize_model(x, attrs, scales, sizes)
    check_vjp(model, "y", ["x"], {"x": x}, **LINEAR)
    _resize_jacobian_check(x, attrs, scales, sizes)


TORCH_RESIZE = [
    (dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"), [1, 1, 2, 3],
     lambda t: F.interpolate(t, scale_factor=(2, 3), mode="nearest")),
    (dict(mode="linear"), [1, 1, 2, 2],
     lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)),
    (dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"), [1, 1, 0.5, 0.5],
     lambda t: F.interpolate(t, scale_factor=0.5, mode="bilinear", align_corners=False)),
    (dict(mode="linear", coordinate_transformation_mode="align_corners"), [1, 1, 2, 2],
     lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)),
    (dict(mode="cubic"), [1, 1, 2, 2],
     lambda t: F.interpolate(t, scale_factor=2, mode="bicubic", align_corners=False)),
]


@pytest.mark.parametrize("attrs,scales,fn", TORCH_RESIZE, ids=["nearest", "bilinear", "bilinear_down",
                                                                "bilinear_align", "bicubic"])
def test_resize_vs_torch(attrs, scales, fn):
    x = _rng(24).standard_normal((2, 3, 6, 8)).astype(F32)
    m = _resize_model(x, attrs, scales)
    check_torch(m, {"x": x}, fn)
    run_batches(m, lambda b: _rng(b).standard_normal((b, 3, 6, 8)).astype(F32), fn)


def test_resize_formulations():
    x = _rng(25).standard_normal((1, 2, 4, 5)).astype(F32)
    block = _resize_model(x, dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                  nearest_mode="floor"), [1, 1, 2, 2])
    assert backward_ops(block) == ["Reshape", "ReduceSum"]
    default = _resize_model(x, dict(mode="nearest"), [1, 1, 2, 2])
    assert backward_ops(default) == ["Reshape", "ReduceSum"]
    lin = backward_ops(_resize_model(x, dict(mode="linear"), [1, 1, 2, 2]))
    assert lin.count("MatMul") == 2 and lin.count("Resize") == 2
    same = _resize_model(x, dict(mode="linear"), [1, 1, 1, 1])
    assert backward_ops(same) == []


def test_resize_refusals():
    x = _rng(26).standard_normal((1, 2, 4, 5)).astype(F32)
    crop = one_node_model("Resize", {"x": x}, dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize"),
                          {"roi": np.asarray([0, 0, 0, 0, 1, 1, 1, 1], F32), "scales": np.asarray([1, 1, 2, 2], F32)},
                          node_inputs=["x", "roi", "scales"], opset=19)
    with pytest.raises(UnsupportedOpError):
        vjp(crop, "y", ["x"])


def test_interpolation_matrix_replays_integer_scales():
    """The numpy replay matches ORT exactly where the rule relies on it (integer factors)."""
    for ctm in ("asymmetric", "half_pixel", "pytorch_half_pixel", "align_corners"):
        for nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
            for mode in ("nearest", "linear"):
                for f in (2, 3, 4):
                    n = 5
                    x = np.eye(n, dtype=F32).reshape(n, 1, 1, n)
                    y = run(_resize_model(x, dict(mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nm),
                                          [1, 1, 1, f]), {"x": x})["y"].reshape(n, n * f)
                    a = interpolation_matrix(n, n * f, float(f), mode, ctm, nm)
                    np.testing.assert_allclose(a.T, y, atol=1e-6, err_msg=f"{mode} {ctm} {nm} x{f}")


def test_resize_other_ranks_and_opset13():
    """Axes other than the last two go through Transpose + MatMul; opset 13 (no antialias/axes attributes)."""
    x5 = _rng(27).standard_normal((1, 2, 3, 4, 3)).astype(F32)
    _resize_jacobian_check(x5, dict(mode="linear"), scales=[1, 1, 2, 1.5, 2])
    x3 = _rng(28).standard_normal((2, 3, 5)).astype(F32)
    _resize_jacobian_check(x3, dict(mode="nearest"), scales=[1, 1, 2.5])
    x4 = _rng(29).standard_normal((2, 3, 5, 6)).astype(F32)
    m = _resize_model(x4, dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
                      [1, 1, 2, 2], opset=13)
    check_torch(m, {"x": x4}, lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False))


def _col2im_case(image, block, strides, pads, dilations, c=3, batch=2):
    nsp = len(block)
    grid = [(image[i] + pads[i] + pads[i + nsp] - dilations[i] * (block[i] - 1) - 1) // strides[i] + 1
            for i in range(nsp)]
    x = _rng(len(block) + sum(pads)).standard_normal((batch, c * int(np.prod(block)), int(np.prod(grid))))
    model = one_node_model("Col2Im", {"x": x.astype(F32)}, dict(strides=strides, pads=pads, dilations=dilations),
                           {"im": np.array(image, np.int64), "bs": np.array(block, np.int64)},
                           node_inputs=["x", "im", "bs"], opset=18)
    return model, x.astype(F32)


@pytest.mark.parametrize("image,block,strides,pads,dilations", [
    ((7, 8), (2, 3), (2, 1), (1, 1, 1, 1), (1, 2)),
    ((6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((5, 9), (1, 2), (1, 3), (0, 0, 0, 0), (1, 1)),
])
def test_col2im_matches_torch_fold(image, block, strides, pads, dilations):
    """Col2Im (F.fold, VOLO's outlook attention): its adjoint is unfold as a one-hot grouped conv."""
    model, x = _col2im_case(image, block, strides, pads, dilations)
    check_torch(model, {"x": x}, lambda t: F.fold(t, image, block, dilation=dilations, padding=pads[:2],
                                                  stride=strides))


def test_col2im_asymmetric_pads_against_finite_differences():
    model, x = _col2im_case((6, 7), (3, 2), (2, 2), (1, 0, 2, 1), (1, 1))
    check_vjp(model, "y", ["x"], {"x": x})


def test_col2im_with_a_run_time_image_shape_is_refused_by_name():
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Col2Im", ["x", "im", "bs"], ["y"], name="fold")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 12, 9]),
                                        helper.make_tensor_value_info("im", TensorProto.INT64, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([2, 2], np.int64), "bs")])
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError, match="Col2Im.*fold.*image or block shape computed at run time"):
        vjp(m, "y", ["x"])


def test_a_pool_that_cannot_be_rewritten_is_refused_by_name():
    """Where no explicit pads give the runtime's windows (here the end pads would be 2, and the
    runtime takes pads below the kernel's 2 only), the gradient would declare sizes the runtime's
    load-time inference contradicts: refused, named. The forward pass still runs as the file has it."""
    x = _rng(14).standard_normal((2, 3, 5, 7)).astype(F32)
    attrs = dict(kernel_shape=[2, 2], strides=[2, 2], dilations=[4, 4], auto_pad="SAME_UPPER", ceil_mode=1)
    for op in ("MaxPool", "AveragePool"):
        m = one_node_model(op, {"x": x}, attrs, opset=19)
        assert run(normalize(m), {"x": x})["y"].shape == (2, 3, 2, 3)
        with pytest.raises(UnsupportedOpError, match=rf"'{op}'.*ONNX's shape inference sizes its output \[3, 4\] "
                                                     r"and ONNX Runtime \[2, 3\], and no explicit padding"):
            vjp(m, "y", ["x"])
