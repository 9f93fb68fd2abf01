"""The blocked-layout backward pieces: exact masks, exact bridges, declared gradient shapes.

On float32 image tensors with a block-aligned channel count the Relu and Clip
masks are depthwise-conv steps and strided-conv / global-pool gradients pass
through an identity conv (``onnxsal.graph.rules.blocked``).  These tests pin
that the path is taken and that it is bit-exact against the plain formula,
including the values where a scaled step could go wrong: the smallest normal
float, values one ulp inside a Clip bound, the bounds themselves, huge and
infinite activations.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_vjp, derived_grads, one_node_model, run
from onnxsal.graph.autodiff import vjp

TINY = np.finfo(np.float32).tiny                       # 2^-126, the smallest normal float32
BIG = np.finfo(np.float32).max


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _probe(values: list[float], c: int, rng: np.random.Generator) -> np.ndarray:
    """(2, c, 4, 4) float32 with the given values placed among random normals."""
    x = rng.standard_normal((2, c, 4, 4)).astype(np.float32)
    flat = x.reshape(-1)
    flat[: len(values)] = np.asarray(values, np.float32)
    rng.shuffle(flat)
    return flat.reshape(x.shape)


def _vjp_of(model: onnx.ModelProto, x: np.ndarray, cot: np.ndarray) -> tuple[np.ndarray, onnx.ModelProto]:
    vm = vjp(model, "y", ["x"])
    return derived_grads(model, "y", ["x"], {"x": x}, cot)["grad_x"], vm


def test_relu_mask_is_exact_on_aligned_channels():
    rng = np.random.default_rng(0)
    edge = [0.0, -0.0, TINY, 2 * TINY, -TINY, 1e-30, 1.0, 3e38, BIG, -BIG, np.inf, -np.inf]
    x = _probe(edge, 8, rng)
    model = one_node_model("Relu", {"x": x})
    cot = rng.standard_normal(x.shape).astype(np.float32)
    g, vm = _vjp_of(model, x, cot)
    assert "Greater" not in _ops(vm) and "Conv" in _ops(vm)       # the blocked step was used
    np.testing.assert_array_equal(g, cot * (x > 0))


def test_relu_mask_falls_back_on_unaligned_channels():
    rng = np.random.default_rng(1)
    x = _probe([0.0, TINY / 4, 1.0], 3, rng)                       # a subnormal: the plain path is exact
    model = one_node_model("Relu", {"x": x})
    cot = rng.standard_normal(x.shape).astype(np.float32)
    g, vm = _vjp_of(model, x, cot)
    assert "Greater" in _ops(vm) and "Conv" not in _ops(vm)
    np.testing.assert_array_equal(g, cot * (x > 0))


@pytest.mark.parametrize("lo,hi", [(0.0, 6.0), (-1.0, 1.0), (0.5, 1e30), (-3.0, None), (None, 6.0)])
def test_clip_mask_is_exact_on_aligned_channels(lo, hi):
    rng = np.random.default_rng(2)
    f32 = np.float32
    edge = [0.0, TINY, -TINY, 1e30, -1e30, np.inf, -np.inf]
    for b in (lo, hi):
        if b:                   # next to 0 lie subnormals: see test_positive_subnormals_get_a_partial_mask
            edge += [b, np.nextafter(f32(b), f32(np.inf)), np.nextafter(f32(b), f32(-np.inf))]
    x = _probe(edge, 16, rng)
    bounds = {}
    names = ["x", "", ""]
    if lo is not None:
        bounds["lo"], names[1] = np.asarray(lo, np.float32), "lo"
    if hi is not None:
        bounds["hi"], names[2] = np.asarray(hi, np.float32), "hi"
    model = one_node_model("Clip", {"x": x}, initializers=bounds, node_inputs=names)
    cot = rng.standard_normal(x.shape).astype(np.float32)
    g, vm = _vjp_of(model, x, cot)
    assert "Less" not in _ops(vm) and "Greater" not in _ops(vm)
    y = np.clip(x, -np.inf if lo is None else f32(lo), np.inf if hi is None else f32(hi))
    inside = np.ones(x.shape, bool)
    if lo is not None:
        inside &= y > f32(lo)
    if hi is not None:
        inside &= y < f32(hi)
    np.testing.assert_array_equal(g, cot * inside)


def test_hard_swish_slope_is_exact_on_aligned_channels():
    """PyTorch's convention: 0 below -3, x/3 + 1/2 on [-3, 3] (so -1/2 and 3/2 at the ends), 1 above."""
    rng = np.random.default_rng(7)
    f32 = np.float32
    edge = [0.0, -0.0, TINY, 1e30, -1e30, np.inf, -np.inf, 1.5, -1.5]
    for b in (-3.0, 3.0):
        edge += [b, np.nextafter(f32(b), f32(np.inf)), np.nextafter(f32(b), f32(-np.inf))]
    x = _probe(edge, 16, rng) * f32(2)
    x.reshape(-1)[: len(edge)] = np.asarray(edge, f32)
    model = one_node_model("HardSwish", {"x": x}, opset=17)
    cot = rng.standard_normal(x.shape).astype(np.float32)
    g, vm = _vjp_of(model, x, cot)
    assert "Less" not in _ops(vm) and "Greater" not in _ops(vm)
    x64 = x.astype(np.float64)
    slope = np.where(x64 < -3, 0.0, np.where(x64 <= 3, x64 / 3 + 0.5, 1.0))
    # float32 rounding of x/3 + 1/2 (a few 1e-8), far below the jumps of 1/2 at the kinks
    np.testing.assert_allclose(g, cot * slope, rtol=1e-6, atol=2e-7 * np.abs(cot).max())


def test_positive_subnormals_get_a_partial_mask():
    """The documented limit of the scaled step: 0 < t < 2^-126 gives t * 2^126, not 1."""
    rng = np.random.default_rng(6)
    sub = np.float32(2.0 ** -140)
    x = _probe([sub], 8, rng)
    model = one_node_model("Relu", {"x": x})
    cot = np.ones(x.shape, np.float32)
    g, _ = _vjp_of(model, x, cot)
    np.testing.assert_array_equal(g[x == sub], np.float32(2.0 ** -14))
    np.testing.assert_array_equal(g[x != sub], (x > 0)[x != sub].astype(np.float32))


def _conv_gap_model(stride: int) -> onnx.ModelProto:
    """x -> Conv(8->16, 3x3, stride) -> Relu -> GlobalAveragePool -> y, dynamic batch."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], strides=[stride] * 2, pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "conv_gap",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 9, 9])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 1, 1])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("stride", [1, 2])
def test_bridged_gradients_match_finite_differences(stride):
    model = _conv_gap_model(stride)
    x = np.random.default_rng(4).standard_normal((2, 8, 9, 9)).astype(np.float32)
    vm = vjp(model, "y", ["x"])
    identities = [n for n in vm.graph.node if n.op_type == "Conv" and n.input[1] not in ("w",)
                  and any(a.name == "group" and a.i == 16 for a in n.attribute)]
    assert identities, "expected a depthwise bridge or mask conv on the 16-channel gradient"
    if stride == 2:
        assert "ConvTranspose" in _ops(vm)
    check_vjp(model, "y", ["x"], {"x": x}, eps=1e-2, rtol=2e-2, atol=1e-4)


def test_gradients_declare_their_tensors_shapes():
    """Each gradient is typed like its forward tensor, batch symbol included."""
    model = _conv_gap_model(1)
    vm = vjp(model, "y", ["x"])
    declared = {vi.name: [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]
                for vi in vm.graph.value_info}
    shapes = list(declared.values())
    assert ["N", 16, 9, 9] in shapes               # the gradient at the conv / relu outputs
    x = np.random.default_rng(5).standard_normal((3, 8, 9, 9)).astype(np.float32)
    out = run(vm, {"x": x, "grad_y": np.ones((3, 16, 1, 1), np.float32)})
    assert out["grad_x"].shape == x.shape            # the declared shapes hold at another batch size
