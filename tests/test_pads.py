"""Zero pads folded into the convolution that reads them before differentiating (graph/pads.py):
the same values and the same input gradient as torch's F.pad then conv2d, without the Pad, its
Slice in the backward, or the transposes tf2onnx leaves around a padding layer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from gradcheck import run
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.simplify import simplify

PADS = [0, 0, 1, 0, 0, 0, 2, 1]          # NCHW begin then end: top 1, bottom 2, right 1
NHWC = [0, 1, 0, 0, 0, 2, 1, 0]          # the same pads on the NHWC tensor


def _model(form: str, *, value: float = 0.0, mode: str = "constant", pads=PADS, auto_pad: str = "NOTSET",
           second_reader: bool = False, opset: int = 17, cin: int = 2) -> onnx.ModelProto:
    """x (1, 2, 7, 6) -> [transposes] -> Pad -> [transposes] -> Conv(2 -> 3, 3x3, stride 2) -> Relu."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((3, cin, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")]
    nodes = []
    src = "x"
    if form == "transposed":           # Transpose -> Pad (NHWC) -> Transpose back
        nodes.append(helper.make_node("Transpose", ["x"], ["x_nhwc"], perm=[0, 2, 3, 1]))
        src, pads = "x_nhwc", NHWC if pads is PADS else pads
    if opset < 11:
        nodes.append(helper.make_node("Pad", [src], ["p"], pads=pads, mode=mode, value=value))
    else:
        inits += [numpy_helper.from_array(np.array(pads, np.int64), "pads"),
                  numpy_helper.from_array(np.array(value, np.float32), "value")]
        nodes.append(helper.make_node("Pad", [src, "pads", "value"], ["p"], mode=mode))
    out = "p"
    if form == "transposed":
        nodes.append(helper.make_node("Transpose", ["p"], ["p_nchw"], perm=[0, 3, 1, 2]))
        out = "p_nchw"
    elif form == "pair after":         # Pad -> Transpose -> Transpose back (a padding layer's output)
        nodes += [helper.make_node("Transpose", ["p"], ["p_nhwc"], perm=[0, 2, 3, 1]),
                  helper.make_node("Transpose", ["p_nhwc"], ["p_back"], perm=[0, 3, 1, 2])]
        out = "p_back"
    conv = {"pads": [0, 1, 1, 0]} if auto_pad == "NOTSET" else {"auto_pad": auto_pad}
    nodes += [helper.make_node("Conv", [out, "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], **conv),
              helper.make_node("Relu", ["c"], ["y" if not second_reader else "r"])]
    if second_reader:
        nodes += [helper.make_node("ReduceMean", [out], ["m"], axes=[1, 2, 3], keepdims=1),
                  helper.make_node("Add", ["r", "m"], ["y"])]
    g = helper.make_graph(nodes, "pad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 7, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _torch_grad(model: onnx.ModelProto, x: np.ndarray, cot: np.ndarray) -> np.ndarray:
    """torch.autograd through F.pad (top 1, bottom 2, right 1) and conv2d with the Conv's own pads."""
    w, b = (torch.tensor(numpy_helper.to_array(model.graph.initializer[k]), dtype=torch.float64) for k in (0, 1))
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    padded = F.pad(F.pad(xt, (0, 1, 1, 2)), (1, 0, 0, 1))       # then the Conv's pads: left 1, bottom 1
    y = torch.relu(F.conv2d(padded, w, b, stride=2))
    (y * torch.tensor(cot, dtype=torch.float64)).sum().backward()
    return xt.grad.numpy()


@pytest.mark.parametrize("form,opset", [("plain", 17), ("plain", 10), ("transposed", 17), ("pair after", 17)])
def test_a_zero_pad_goes_into_the_convolution(form, opset):
    m = _model(form, opset=opset)
    s = simplify(m)
    assert _ops(s) == ["Conv", "Relu"]
    assert list(next(a.ints for a in s.graph.node[0].attribute if a.name == "pads")) == [1, 1, 3, 1]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(run(s, {"x": x})["y"], run(m, {"x": x})["y"], rtol=1e-6, atol=1e-6)
    cot = rng.standard_normal(run(m, {"x": x})["y"].shape).astype(np.float32)
    backward = vjp(m, "y", ["x"])
    assert "Pad" not in _ops(backward) and "Slice" not in _ops(backward)
    got = run(backward, {"x": x, "grad_y": cot})["grad_x"]
    want = _torch_grad(m, x, cot)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("case", ["value 1", "reflect", "channel pad", "same conv", "second reader", "kept"])
def test_a_pad_the_convolution_cannot_take_stays(case):
    """A non-zero or reflected pad is not a convolution's zero padding; a channel pad changes the
    convolution's input channels; a SAME convolution computes its own pads; a padded tensor read
    elsewhere, or asked for by name, keeps its value."""
    kwargs = {"value 1": {"value": 1.0}, "reflect": {"mode": "reflect"},
              "channel pad": {"pads": [0, 1, 0, 0, 0, 0, 0, 0], "cin": 3},
              "same conv": {"auto_pad": "SAME_UPPER"}, "second reader": {"second_reader": True}}.get(case, {})
    m = _model("plain", **kwargs)
    s = simplify(m, keep=["p"] if case == "kept" else ())
    assert "Pad" in _ops(s)
    x = np.random.default_rng(2).standard_normal((1, 2, 7, 6)).astype(np.float32)
    np.testing.assert_allclose(run(s, {"x": x})["y"], run(m, {"x": x})["y"], rtol=1e-6, atol=1e-6)

