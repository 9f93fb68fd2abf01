"""Graphs whose slice bounds, pads or even ranks are only known at run time, against finite differences.

Exporters write these: torch.onnx's ``chunk`` (ShuffleNet's channel split) and Swin's window
padding compute Slice/Pad bounds from Shape; torch.onnx's multi-head attention builds a reshape
target that ONNX shape inference cannot follow; tf2onnx crops with ends of 2^31 - 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_vjp
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.normalize import infer, opset_of, tensor_shapes

R = np.random.default_rng(7)
I64 = np.int64


def rnd(*shape):
    return R.standard_normal(shape)


def _vi(name, shape, et=TensorProto.DOUBLE):
    return helper.make_tensor_value_info(name, et, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs,
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("starts,ends", [([1, -3], [5, 100]), ([-100, 0], [2, -1]), ([4, 2], [2, 5]),
                                         ([0, 7], [6, 9])])
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_slice_bounds_fed_at_run_time(starts, ends, dtype):
    """Starts and ends as graph inputs: negative, clamped, empty and past-the-end bounds."""
    et = TensorProto.INT64 if dtype == np.int64 else TensorProto.INT32
    m = _model([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])],
               [_vi("x", ["N", 6, 5]), _vi("s", [2], et), _vi("e", [2], et)], [_vi("y", None)],
               {"a": np.array([1, 2], dtype)})
    feeds = {"x": rnd(3, 6, 5), "s": np.array(starts, dtype), "e": np.array(ends, dtype)}
    check_vjp(m, "y", ["x"], feeds)


def test_chunk_with_computed_half():
    """torch.onnx's x.chunk(2, dim=1) on a channel count read at run time, halves swapped."""
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "one"], ["c"], axis=0),
        helper.make_node("Div", ["c", "two"], ["half"]),
        helper.make_node("Unsqueeze", ["half", "ax0"], ["half1"]),
        helper.make_node("Slice", ["x", "zero1", "half1", "ax1"], ["lo"]),
        helper.make_node("Slice", ["x", "half1", "big", "ax1"], ["hi"]),
        helper.make_node("Tanh", ["lo"], ["tlo"]),
        helper.make_node("Concat", ["hi", "tlo"], ["y"], axis=1),
    ]
    inits = {"one": np.array(1, I64), "two": np.array(2, I64), "ax0": np.array([0], I64),
             "zero1": np.array([0], I64), "ax1": np.array([1], I64), "big": np.array([2 ** 63 - 1], I64)}
    m = _model(nodes, [_vi("x", ["N", 6, 4])], [_vi("y", ["N", 6, 4])], inits)
    check_vjp(m, "y", ["x"], {"x": rnd(2, 6, 4)})


def test_slice_end_past_a_run_time_axis_clamps():
    """An end of 2^31 - 1 on the batch axis is 'to the end', not a size to subtract (tf2onnx crops)."""
    m = _model([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], [_vi("x", ["N", 3, 4])],
               [_vi("y", None)], {"s": np.array([0, 1, 1], I64), "e": np.array([2 ** 31 - 1] * 3, I64),
                                  "a": np.array([0, 1, 2], I64)})
    check_vjp(m, "y", ["x"], {"x": rnd(2, 3, 4)})
    m2 = _model([helper.make_node("Slice", ["x", "s", "e", "a"], ["y"])], [_vi("x", ["N", 3])],
                [_vi("y", None)], {"s": np.array([1], I64), "e": np.array([2 ** 31 - 1], I64),
                                   "a": np.array([0], I64)})
    check_vjp(m2, "y", ["x"], {"x": rnd(4, 3)})


def test_runtime_slice_with_a_step_is_refused_by_name():
    m = _model([helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"], name="strided")],
               [_vi("x", ["N", 6]), _vi("s", [1], TensorProto.INT64)], [_vi("y", None)],
               {"e": np.array([6], I64), "a": np.array([1], I64), "t": np.array([2], I64)})
    with pytest.raises(UnsupportedOpError, match="Slice.*strided.*step 2"):
        vjp(m, "y", ["x"])


@pytest.mark.parametrize("mode,pads,where", [("reflect", [1, 0, 0, 1], "static size on axis 0"),
                                             ("edge", None, "edge Pad with pads computed at run time")])
def test_copying_pad_needs_known_sizes(mode, pads, where):
    """Reflect/edge/wrap pads copy inputs by position, so the rule needs the axis size and the pads."""
    inits = {"p": np.array(pads, I64)} if pads else {}
    inputs = [_vi("x", ["N", 4])] + ([] if pads else [_vi("p", [4], TensorProto.INT64)])
    m = _model([helper.make_node("Pad", ["x", "p"], ["y"], mode=mode, name="mirror")], inputs, [_vi("y", None)], inits)
    with pytest.raises(UnsupportedOpError, match=f"Pad.*mirror.*{where}"):
        vjp(m, "y", ["x"])


@pytest.mark.parametrize("pads", [[0, 1, 2, 0, 2, 1], [0, -1, 2, 0, 1, -2], [0, 0, 0, 0, 0, 0]])
def test_pad_amounts_fed_at_run_time(pads):
    m = _model([helper.make_node("Pad", ["x", "p"], ["y"], mode="constant")],
               [_vi("x", ["N", 4, 5]), _vi("p", [6], TensorProto.INT64)], [_vi("y", None)])
    check_vjp(m, "y", ["x"], {"x": rnd(2, 4, 5), "p": np.array(pads, I64)})


def test_pad_amounts_at_run_time_on_some_axes():
    """Opset 18 Pad with an axes input: the rule spreads the crops back over every axis."""
    m = _model([helper.make_node("Pad", ["x", "p", "", "a"], ["y"], mode="constant")],
               [_vi("x", ["N", 4, 5]), _vi("p", [2], TensorProto.INT64)], [_vi("y", None)],
               {"a": np.array([2], I64)}, opset=18)
    for pads in ([1, 2], [-1, 3], [2, -2]):
        check_vjp(m, "y", ["x"], {"x": rnd(2, 4, 5), "p": np.array(pads, I64)})


def _lost_rank_model():
    """y = Gather(Transpose(Reshape(tanh(x), target)), 1) with a target shape inference cannot follow.

    The target is Shape(x)[0 : c1 % c2] ++ [2, -1]: the Mod hides the slice's end, so the rank
    of everything after the Reshape is unknown to ONNX shape inference, as in torch.onnx's
    multi-head attention.
    """
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Shape", ["t"], ["sh"]),
        helper.make_node("Mod", ["c1", "c2"], ["end"]),
        helper.make_node("Slice", ["sh", "zero", "end"], ["lead"]),
        helper.make_node("Concat", ["lead", "tail"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["r"]),
        helper.make_node("Transpose", ["r"], ["tr"], perm=[1, 0, 2]),
        helper.make_node("Gather", ["tr", "idx"], ["y"], axis=0),
    ]
    inits = {"c1": np.array([3], I64), "c2": np.array([2], I64), "zero": np.array([0], I64),
             "tail": np.array([2, -1], I64), "idx": np.array(1, I64)}
    return _model(nodes, [_vi("x", ["N", 4, 3])], [_vi("y", None)], inits)


def test_ranks_lost_by_shape_inference_are_probed():
    m = _lost_rank_model()
    shapes = tensor_shapes(infer(m))
    assert shapes.get("r", (0, None))[1] is None        # inference really loses it
    check_vjp(m, "y", ["x"], {"x": rnd(3, 4, 3)})


@pytest.mark.parametrize("idx", [np.array([3, 0, 3, -1], I64), np.array([[1, -5], [4, 1]], I64), np.array(2, I64),
                                 np.array([[0, 2]], np.int32)])
@pytest.mark.parametrize("axis", [1, 2])
def test_gather_indices_fed_at_run_time(idx, axis):
    """torch.onnx's dynamo exporter writes ``as_strided`` as a Gather on indices built from the
    batch size; repeats add up, negative indices count from the end."""
    et = TensorProto.INT64 if idx.dtype == np.int64 else TensorProto.INT32
    m = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=axis)],
               [_vi("x", ["N", 5, 5]), _vi("i", list(idx.shape), et)], [_vi("y", None)], opset=18)
    check_vjp(m, "y", ["x"], {"x": rnd(2, 5, 5), "i": idx})


def test_run_time_gather_indices_upgrade_the_model_to_opset_16():
    """Their adjoint adds repeats with ScatterND's reduction, which opset 16 brought; a model at 13
    (an NMS export's Gather at the picked indices) is upgraded for it, and only such a model."""
    m = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1, name="take")],
               [_vi("x", ["N", 5]), _vi("i", [3], TensorProto.INT64)], [_vi("y", None)], opset=13)
    assert opset_of(vjp(m, "y", ["x"])) == 16
    check_vjp(m, "y", ["x"], {"x": rnd(2, 5), "i": np.array([1, 4, 1], np.int64)})
    fixed = _model([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)],
                   [_vi("x", ["N", 5])], [_vi("y", None)], opset=13)
    fixed.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 1], np.int64), "i"))
    assert opset_of(vjp(fixed, "y", ["x"])) == 13          # constant repeats: a one-hot product
