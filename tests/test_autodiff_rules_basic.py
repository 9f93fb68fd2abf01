"""Every elementwise, activation, linear and shape VJP rule against finite differences.

Arrays are float64 where ORT has a double kernel for the op (tight check,
rtol 1e-6) and float32 otherwise (rtol 1e-2); see tests/gradcheck.py.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_vjp, derived_grads, one_node_model, run
from onnxsal.errors import LayerError, UnsupportedOpError
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.rules.activations import DECONV_RULES, GUIDED_RULES

R = np.random.default_rng(1234)


def rnd(*shape, dtype=np.float64, lo=None):
    """Normal samples; with ``lo``, samples kept at least ``lo`` away from zero (no kink crossing)."""
    a = R.standard_normal(shape)
    if lo is not None:
        a = np.where(np.abs(a) < lo, np.sign(a + 1e-12) * lo + a, a)
    return a.astype(dtype)


def kinked(*shape, kinks, scale=1.0, gap=0.05, dtype=np.float64):
    """Normal samples times ``scale``, each kept at least ``gap`` from every kink, so the finite
    differences never straddle one whatever the generator's state."""
    a = R.standard_normal(shape) * scale
    for k in kinks:
        near = np.abs(a - k) < gap
        a = np.where(near, k + np.where(a >= k, gap, -gap) * 2, a)
    return a.astype(dtype)


def _off_integer(a: np.ndarray, gap: float = 0.2) -> np.ndarray:
    """``a`` moved so its fractional part lies in [gap, 1 - gap]: a quotient fmod never jumps near."""
    whole = np.trunc(a)
    frac = np.clip(np.abs(a - whole), gap, 1 - gap)
    return whole + np.sign(a + 1e-12) * frac


def pos(*shape, dtype=np.float64):
    return (R.random(shape) + 0.5).astype(dtype)


def case(op, inputs, attrs=None, inits=None, wrt=None, node_inputs=None, opset=17, n_out=1, y="y", id=None, **kw):
    """One finite-difference case; ``kw`` goes to check_vjp (eps, rtol, atol)."""
    return pytest.param(dict(op=op, inputs=inputs, attrs=attrs or {}, inits=inits or {}, wrt=wrt or list(inputs),
                             node_inputs=node_inputs, opset=opset, n_out=n_out, y=y, kw=kw), id=id or op)


def _run_case(c):
    m = one_node_model(c["op"], c["inputs"], c["attrs"], c["inits"], n_out=c["n_out"], opset=c["opset"],
                       node_inputs=c["node_inputs"])
    check_vjp(m, c["y"], c["wrt"], c["inputs"], **c["kw"])


F32 = np.float32
I64 = np.int64

_MOD_B = pos(2, 3) * np.where(R.random((2, 3)) < 0.5, -1.0, 1.0)
_MOD_Q = _off_integer(rnd(2, 3) * 3)
_MOD_COL = np.array([[0.5], [-1.5], [2.5]])

ELEMENTWISE = [
    case("Add", {"a": rnd(2, 3, 4), "b": rnd(2, 3, 4)}, id="add-same"),
    case("Add", {"a": rnd(2, 1, 4), "b": rnd(3, 1)}, id="add-both-broadcast"),
    case("Add", {"a": rnd(2, 3, 4)}, inits={"b": rnd(4)}, id="add-const"),
    case("Sub", {"a": rnd(2, 3, 4), "b": rnd(4)}, id="sub-broadcast"),
    case("Sub", {"a": rnd(3, 1), "b": rnd(2, 3, 4)}, id="sub-broadcast-left"),
    case("Mul", {"a": rnd(2, 3, 4), "b": rnd(2, 3, 4)}, id="mul-same"),
    case("Mul", {"a": rnd(2, 3, 4, 5), "b": rnd(2, 3, 1, 1)}, id="mul-se-style"),
    case("Mul", {"a": rnd(1, 4), "b": rnd(3, 1)}, id="mul-outer"),
    case("Div", {"a": rnd(2, 3, 4), "b": pos(2, 3, 4)}, id="div-same"),
    case("Div", {"a": rnd(2, 3, 4), "b": pos(3, 1)}, id="div-broadcast"),
    case("Div", {"a": pos(3, 1), "b": pos(2, 3, 4)}, id="div-broadcast-left"),
    case("Div", {"a": rnd(2, 3)}, inits={"b": pos(3)}, id="div-const"),
    case("Neg", {"x": rnd(2, 3)}),
    case("Exp", {"x": rnd(2, 3)}),
    case("Log", {"x": pos(2, 3)}),
    case("Sqrt", {"x": pos(2, 3)}),
    case("Reciprocal", {"x": pos(2, 3)}),
    case("Abs", {"x": rnd(2, 3, lo=0.1)}),
    case("Pow", {"x": pos(2, 3)}, inits={"p": np.array(2.0)}, id="pow-2"),
    case("Pow", {"x": pos(2, 3)}, inits={"p": np.array(0.5)}, id="pow-half"),
    case("Pow", {"x": pos(2, 3)}, inits={"p": np.array(3.0)}, id="pow-3"),
    case("Pow", {"x": pos(2, 3)}, inits={"p": np.array(-1.5)}, id="pow-neg"),
    case("Pow", {"x": pos(2, 3), "p": rnd(3)}, id="pow-both"),
    case("Erf", {"x": rnd(2, 3, dtype=F32)}),
    case("Cast", {"x": rnd(2, 3)}, {"to": TensorProto.FLOAT}, id="cast-f64-f32", eps=1e-2,
         rtol=1e-4, atol=1e-6),
    case("Cast", {"x": rnd(2, 3)}, {"to": TensorProto.DOUBLE}, id="cast-noop"),
    case("Identity", {"x": rnd(2, 3)}),
    case("Dropout", {"x": rnd(2, 3)}, {"seed": 0}),
    case("Sum", {"a": rnd(2, 3), "b": rnd(3), "c": rnd(2, 1)}),
    case("Mean", {"a": rnd(2, 3, dtype=F32), "b": rnd(3, dtype=F32), "c": rnd(2, 1, dtype=F32)}),
    case("Max", {"a": rnd(2, 3), "b": rnd(3)}),
    case("Min", {"a": rnd(2, 3), "b": rnd(2, 3)}),
    case("Max", {"a": rnd(2, 3), "b": rnd(3), "c": rnd(2, 1)}, id="max-three"),
    case("Max", {"a": rnd(2, 3)}, id="max-one"),
    case("Where", {"a": rnd(2, 3), "b": rnd(3)}, inits={"c": R.random((2, 3)) > 0.5},
         node_inputs=["c", "a", "b"]),
    case("Sin", {"x": rnd(2, 3)}),
    case("Cos", {"x": rnd(2, 3)}),
    case("Sign", {"x": rnd(2, 3, lo=0.1)}),
    # steps at the integers (Round's at the halves): the samples stay 0.2 away from them
    case("Floor", {"x": _off_integer(rnd(2, 3) * 3)}),
    case("Ceil", {"x": _off_integer(rnd(2, 3) * 3).astype(F32)}),
    case("Round", {"x": (_off_integer(rnd(2, 3) * 3) + 0.5).astype(F32)}),
]

ACTIVATIONS = [
    case("Relu", {"x": rnd(2, 3, 4, lo=0.05)}),
    case("LeakyRelu", {"x": rnd(2, 3, lo=0.05)}, {"alpha": 0.2}),
    case("PRelu", {"x": rnd(2, 3, 4, lo=0.05)}, inits={"s": rnd(3, 1)}, id="prelu-const-slope"),
    case("PRelu", {"x": rnd(2, 3, 4, lo=0.05), "s": rnd(3, 1)}, id="prelu-slope-grad"),
    case("Elu", {"x": rnd(2, 3, lo=0.05, dtype=F32)}, {"alpha": 0.7}),
    case("Selu", {"x": rnd(2, 3, lo=0.05, dtype=F32)}),
    case("Softplus", {"x": rnd(2, 3, dtype=F32)}),
    case("Sigmoid", {"x": rnd(2, 3)}),
    case("Tanh", {"x": rnd(2, 3)}),
    case("HardSigmoid", {"x": kinked(4, 8, kinks=(-1.6, 2.4), scale=3, dtype=F32)}, {"alpha": 0.25, "beta": 0.4}),
    case("HardSwish", {"x": kinked(4, 8, kinks=(-3, 3), scale=3, dtype=F32)}),
    case("Clip", {"x": kinked(3, 8, kinks=(0, 6), scale=4)}, inits={"lo": np.array(0.0), "hi": np.array(6.0)},
         id="clip-relu6"),
    case("Clip", {"x": kinked(3, 8, kinks=(-0.5,))}, inits={"lo": np.array(-0.5)}, node_inputs=["x", "lo"],
         id="clip-min-only"),
    case("Clip", {"x": kinked(3, 8, kinks=(0.5,))}, inits={"hi": np.array(0.5)}, node_inputs=["x", "", "hi"],
         id="clip-max-only"),
    case("Clip", {"x": kinked(3, 8, kinks=(0, 6), scale=4, dtype=F32)}, {"min": 0.0, "max": 6.0}, opset=10,
         id="clip-attrs-opset10"),
    case("Softmax", {"x": rnd(2, 3, 4)}, {"axis": -1}, id="softmax-last"),
    case("Softmax", {"x": rnd(2, 3, 4)}, {"axis": 1}, id="softmax-mid"),
    case("Softmax", {"x": rnd(2, 3, 4)}, {"axis": 0}, id="softmax-first"),
    case("LogSoftmax", {"x": rnd(2, 3, 4)}, {"axis": -1}, id="logsoftmax-last"),
    case("LogSoftmax", {"x": rnd(2, 3, 4)}, {"axis": 1}, id="logsoftmax-mid"),
    case("Gelu", {"x": rnd(2, 5, dtype=F32)}, opset=20, id="gelu-erf"),
    case("Gelu", {"x": rnd(2, 5, dtype=F32)}, {"approximate": "tanh"}, opset=20, id="gelu-tanh"),
    case("Mish", {"x": rnd(2, 5, dtype=F32) * 2}, opset=18),
    case("Softsign", {"x": rnd(2, 5, dtype=F32, lo=0.05)}),
    case("Celu", {"x": rnd(2, 5, dtype=F32, lo=0.05)}, {"alpha": 0.6}),
    case("ThresholdedRelu", {"x": kinked(3, 5, kinks=(0.4,), scale=2, dtype=F32)}, {"alpha": 0.4}),
    case("Shrink", {"x": kinked(3, 5, kinks=(-0.6, 0.6), scale=2, dtype=F32)}, {"bias": 0.3, "lambd": 0.6}),
]

LINEAR = [
    *[case("Gemm", {"a": rnd(*((4, 3) if ta else (3, 4))), "b": rnd(*((5, 4) if tb else (4, 5))), "c": rnd(5)},
           {"transA": ta, "transB": tb, "alpha": 0.7, "beta": 1.3}, id=f"gemm-tA{ta}-tB{tb}")
      for ta in (0, 1) for tb in (0, 1)],
    case("Gemm", {"a": rnd(3, 4), "c": rnd(3, 1)}, {"transB": 1}, inits={"b": rnd(5, 4)},
         node_inputs=["a", "b", "c"], id="gemm-linear-layer"),
    case("Gemm", {"a": rnd(3, 4), "b": rnd(4, 5)}, id="gemm-no-c"),
    case("MatMul", {"a": rnd(3, 4), "b": rnd(4, 5)}, id="matmul-2d"),
    case("MatMul", {"a": rnd(2, 3, 4), "b": rnd(2, 4, 5)}, id="matmul-batched"),
    case("MatMul", {"a": rnd(2, 3, 4), "b": rnd(4, 5)}, id="matmul-nd-2d"),
    case("MatMul", {"a": rnd(3, 4), "b": rnd(2, 4, 5)}, id="matmul-2d-nd"),
    case("MatMul", {"a": rnd(2, 1, 3, 4), "b": rnd(3, 4, 5)}, id="matmul-broadcast-batch"),
    case("MatMul", {"a": rnd(4), "b": rnd(2, 4, 5)}, id="matmul-1d-left"),
    case("MatMul", {"a": rnd(2, 3, 4), "b": rnd(4)}, id="matmul-1d-right"),
    case("MatMul", {"a": rnd(4), "b": rnd(4)}, id="matmul-1d-1d"),
]

SHAPE = [
    case("Flatten", {"x": rnd(2, 3, 4)}, {"axis": 1}),
    case("Flatten", {"x": rnd(2, 3, 4)}, {"axis": 2}, id="flatten-2"),
    case("Reshape", {"x": rnd(2, 3, 4)}, inits={"s": np.array([0, 4, -1], I64)}),
    case("Transpose", {"x": rnd(2, 3, 4)}, {"perm": [1, 2, 0]}),
    case("Transpose", {"x": rnd(2, 3, 4)}, id="transpose-default"),
    case("Squeeze", {"x": rnd(2, 1, 4)}, inits={"a": np.array([1], I64)}),
    case("Unsqueeze", {"x": rnd(2, 4)}, inits={"a": np.array([0, 3], I64)}),
    case("Concat", {"a": rnd(2, 3, 4), "b": rnd(2, 2, 4), "c": rnd(2, 1, 4)}, {"axis": 1}),
    case("Concat", {"a": rnd(2, 3)}, {"axis": 0}, inits={"k": rnd(1, 3)}, node_inputs=["k", "a"],
         id="concat-const-token"),
    case("Split", {"x": rnd(2, 7)}, {"axis": 1}, inits={"s": np.array([2, 4, 1], I64)}, n_out=3, y="y1",
         id="split-uneven-middle"),
    case("Split", {"x": rnd(2, 7, 3)}, {"axis": -2}, inits={"s": np.array([3, 4], I64)}, n_out=2, y="y0",
         id="split-first"),
    case("Split", {"x": rnd(2, 6)}, {"axis": 1, "num_outputs": 3}, n_out=3, opset=18, y="y2",
         id="split-num-outputs"),
    case("Slice", {"x": rnd(2, 6, 5)}, inits={"s": np.array([1, 0], I64), "e": np.array([5, -1], I64),
                                             "a": np.array([1, 2], I64)}, id="slice-basic"),
    case("Slice", {"x": rnd(2, 9, 5)}, inits={"s": np.array([1], I64), "e": np.array([9], I64),
                                             "a": np.array([1], I64), "t": np.array([3], I64)}, id="slice-step3"),
    case("Slice", {"x": rnd(2, 6, 5)}, inits={"s": np.array([-1, 4], I64), "e": np.array([-100, 0], I64),
                                             "a": np.array([1, -1], I64), "t": np.array([-2, -1], I64)},
         id="slice-negative-steps"),
    case("Slice", {"x": rnd(3, 6)}, inits={"s": np.array([1], I64), "e": np.array([2 ** 63 - 1], I64),
                                          "a": np.array([0], I64)}, id="slice-batch-axis"),
    case("Pad", {"x": rnd(2, 3, 4)}, inits={"p": np.array([0, 1, 2, 0, 2, 1], I64)}),
    case("Pad", {"x": rnd(2, 3, 4)}, inits={"p": np.array([0, -1, 2, 0, 1, -1], I64)}, id="pad-negative"),
    case("Pad", {"x": rnd(2, 3, 4)}, inits={"p": np.array([1, 2], I64), "v": np.array(0.5), "a": np.array([2], I64)},
         node_inputs=["x", "p", "v", "a"], opset=18, id="pad-axes-value"),
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "reflect"}, inits={"p": np.array([0, 0, 2, 1, 0, 0, 1, 3], I64)},
         id="pad-reflect"),
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "edge"}, inits={"p": np.array([0, 0, 3, 0, 0, 1, 2, 2], I64)},
         id="pad-edge"),
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "reflect"}, inits={"p": np.array([1, 2], I64), "a": np.array([-1], I64)},
         node_inputs=["x", "p", "", "a"], opset=18, id="pad-reflect-axes"),
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "wrap"}, inits={"p": np.array([0, 0, 2, 3, 0, 0, 4, 1], I64)},
         opset=19, id="pad-wrap"),
    # crops first, then wraps what is left (ONNX Runtime's order): the pad copies the cropped axis's far end
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "wrap"}, inits={"p": np.array([0, 0, 2, -1, 0, 0, -1, 3], I64)},
         opset=19, id="pad-wrap-crops"),
    case("Pad", {"x": rnd(2, 3, 5, 4)}, {"mode": "reflect"}, inits={"p": np.array([0, 0, -2, 1, 0, 0, 1, -1], I64)},
         id="pad-reflect-crops"),
    case("Pad", {"x": rnd(3, 2)}, {"mode": "edge"}, inits={"p": np.array([0, 2, 0, 3], I64)}, id="pad-edge-short-axis"),
    case("Tile", {"x": rnd(2, 3), "r": np.array([3, 2], I64)}, wrt=["x"], id="tile-runtime-repeats"),
    case("ScatterND", {"x": rnd(2, 4, 3), "u": rnd(2, 3)}, inits={"i": np.array([[1, 2], [0, 0]], I64)},
         node_inputs=["x", "i", "u"], id="scatternd-rows"),
    case("ScatterND", {"x": rnd(4, 3), "u": rnd(2)}, inits={"i": np.array([[3, 1], [0, 2]], I64)},
         node_inputs=["x", "i", "u"], id="scatternd-elements"),
    case("ScatterND", {"x": rnd(4, 3), "u": rnd(3, 3)}, {"reduction": "add"},
         inits={"i": np.array([[1], [3], [1]], I64)}, node_inputs=["x", "i", "u"], opset=16, id="scatternd-add-repeats"),
    case("ScatterElements", {"x": rnd(3, 4), "u": rnd(2, 4)}, {"axis": 0},
         inits={"i": np.array([[2, 0, 1, 2], [0, 1, 2, 1]], I64)}, node_inputs=["x", "i", "u"], id="scatter-elements"),
    case("ScatterElements", {"x": rnd(3, 4), "u": rnd(3, 2)}, {"axis": 1, "reduction": "add"},
         inits={"i": np.array([[1, 1], [0, 3], [2, 2]], I64)}, node_inputs=["x", "i", "u"], opset=16,
         id="scatter-elements-add-repeats"),
    # a replacing scatter that writes a place twice keeps the last update there: only it gets the gradient
    # (-1 and 2 are one place on an axis of 3, whose size the batch-free graph leaves unknown)
    case("ScatterElements", {"x": rnd(3, 4), "u": rnd(3, 2)}, {"axis": 1},
         inits={"i": np.array([[1, 1], [0, 3], [2, -2]], I64)}, node_inputs=["x", "i", "u"], id="scatter-elements-repeats"),
    case("ScatterElements", {"x": rnd(3, 4), "u": rnd(2, 4)}, {"axis": 0},
         inits={"i": np.array([[2, 0, 1, 2], [-1, 1, 2, 1]], I64)}, node_inputs=["x", "i", "u"],
         id="scatter-elements-repeats-axis0"),
    case("ScatterND", {"x": rnd(4, 3), "u": rnd(3, 3)}, inits={"i": np.array([[1], [3], [-3]], I64)},
         node_inputs=["x", "i", "u"], id="scatternd-repeats"),
    case("ScatterND", {"x": rnd(4, 3), "u": rnd(3)}, inits={"i": np.array([[0, 1], [2, 2], [0, 1]], I64)},
         node_inputs=["x", "i", "u"], id="scatternd-repeated-elements"),
    case("ScatterElements", {"x": rnd(3, 4), "i": np.array([[1, 1], [0, 3], [2, 2]], I64), "u": rnd(3, 2)}, {"axis": 1},
         wrt=["x", "u"], id="scatter-elements-runtime-indices"),
    # batch_dims (tf.gather(..., batch_dims=b) through tf2onnx): each entry's own tuples, repeats included
    case("GatherND", {"x": rnd(3, 4, 2)}, {"batch_dims": 1}, inits={"i": np.array([[[1], [3], [1]], [[0], [0], [2]],
                                                                                  [[3], [2], [1]]], I64)},
         opset=16, id="gathernd-batch-dims-1"),
    case("GatherND", {"x": rnd(2, 3, 4, 5)}, {"batch_dims": 2}, inits={"i": np.array(
        [[[[1, 4], [1, 4]], [[0, 0], [3, 2]], [[2, 1], [0, 3]]], [[[3, 3], [1, 0]], [[2, 2], [2, 2]], [[0, 4], [1, 1]]]],
        I64)}, opset=16, id="gathernd-batch-dims-2"),
    case("GatherND", {"x": rnd(3, 4, 2)}, {"batch_dims": 1}, inits={"i": np.array([[2, 1], [0, 0], [3, 1]], I64)},
         opset=16, id="gathernd-batch-dims-scalar-reads"),
    case("GatherND", {"x": rnd(3, 4, 2)}, inits={"i": np.array([[1, 2], [0, 0], [1, 2]], I64)}, opset=16,
         id="gathernd-repeats"),
    case("MaxUnpool", {"x": rnd(2, 2, 2, 3, dtype=F32)}, {"kernel_shape": [2, 2], "strides": [2, 2]},
         inits={"i": (np.arange(2 * 2 * 2 * 3).reshape(2, 2, 2, 3) * 4 + R.integers(0, 4, (2, 2, 2, 3))).astype(I64)},
         id="maxunpool"),
    case("MaxUnpool", {"x": rnd(2, 2, 2, 3, dtype=F32)}, {"kernel_shape": [3, 3], "strides": [2, 2]},
         inits={"i": R.permutation(2 * 2 * 5 * 7)[:24].reshape(2, 2, 2, 3).astype(I64)}, id="maxunpool-overlapping"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, inits={"i": np.array(3, I64)}, id="gather-scalar"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, inits={"i": np.array(-1, I64)}, id="gather-scalar-neg"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, inits={"i": np.array([4, 0, 2], I64)}, id="gather-unique"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, inits={"i": np.array([1, 2, 3], I64)}, id="gather-range"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 2}, inits={"i": np.array([[0, 2], [2, -3]], I64)},
         id="gather-repeated-2d"),
    case("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, inits={"i": np.array([[0, 4], [3, 1]], I64)},
         id="gather-unique-2d"),
    case("Gather", {"x": rnd(6, 3)}, {"axis": 0}, inits={"i": np.array([1, 5], I64)}, id="gather-batch-axis"),
    case("Gather", {"x": rnd(6, 3)}, {"axis": 0}, inits={"i": np.array([1, -1, 1], I64)},
         id="gather-batch-axis-repeated"),
    case("Gather", {"x": rnd(6, 3)}, {"axis": 0}, inits={"i": np.array(2, I64)}, id="gather-batch-axis-scalar"),
    case("ReduceSum", {"x": rnd(2, 3, 4)}, {"keepdims": 1}, inits={"a": np.array([1], I64)}, id="rsum-keep"),
    case("ReduceSum", {"x": rnd(2, 3, 4)}, {"keepdims": 0}, inits={"a": np.array([-1, 1], I64)}, id="rsum-nokeep"),
    case("ReduceSum", {"x": rnd(2, 3, 4)}, {"keepdims": 0}, id="rsum-all"),
    case("ReduceSum", {"x": rnd(2, 3, 4)}, {"noop_with_empty_axes": 1}, id="rsum-noop"),
    case("ReduceMean", {"x": rnd(2, 3, 4)}, {"axes": [2], "keepdims": 1}, id="rmean-keep"),
    case("ReduceMean", {"x": rnd(2, 3, 4)}, {"axes": [0, 2], "keepdims": 0}, id="rmean-nokeep"),
    case("ReduceMean", {"x": rnd(2, 3, 4)}, {"keepdims": 1}, inits={"a": np.array([2, 1], I64)}, opset=18,
         id="rmean-opset18-input"),
    case("ReduceMax", {"x": rnd(2, 3, 4)}, {"axes": [1], "keepdims": 0}, id="rmax"),
    case("ReduceMin", {"x": rnd(2, 3, 4)}, {"axes": [2], "keepdims": 1}, id="rmin"),
    case("Expand", {"x": rnd(3, 1)}, inits={"s": np.array([2, 3, 4], I64)}),
    case("Expand", {"x": rnd(2, 3, 4)}, inits={"s": np.array([3, 1], I64)}, id="expand-noop"),
    case("Tile", {"x": rnd(2, 3)}, inits={"r": np.array([2, 3], I64)}),
    case("ReduceL2", {"x": rnd(2, 3, 4)}, {"keepdims": 0}, inits={"a": np.array([1, 2], I64)}, opset=18, id="rl2"),
    case("ReduceL1", {"x": rnd(2, 3, 4, lo=0.05)}, {"axes": [1], "keepdims": 1}, id="rl1"),
    case("ReduceSumSquare", {"x": rnd(2, 3, 4)}, {"axes": [0, 2], "keepdims": 0}, id="rsumsq"),
    case("ReduceLogSumExp", {"x": rnd(2, 3, 4)}, {"axes": [-1], "keepdims": 1}, id="rlogsumexp"),
    case("ReduceLogSumExp", {"x": rnd(2, 3, 4)}, {"keepdims": 0}, id="rlogsumexp-all"),
    case("ReduceLogSum", {"x": pos(2, 3, 4)}, {"axes": [1], "keepdims": 0}, id="rlogsum"),
    case("ReduceLogSum", {"x": pos(2, 3, 4)}, {"keepdims": 1}, inits={"a": np.array([0, 2], I64)}, opset=18,
         id="rlogsum-opset18-input"),
    case("ReverseSequence", {"x": rnd(5, 3, 2)}, {"batch_axis": 1, "time_axis": 0},
         inits={"lens": np.array([5, 2, 1], I64)}, id="reverse-sequence-time-major"),
    case("ReverseSequence", {"x": rnd(3, 4, 2)}, {"batch_axis": 0, "time_axis": 1},
         inits={"lens": np.array([4, 3, 0], I64)}, id="reverse-sequence-batch-major"),
    # fmod: a / b kept 0.2 or more from every integer, where y jumps by b; divisors of both signs
    case("Mod", {"a": _MOD_Q * _MOD_B, "b": _MOD_B}, {"fmod": 1}, id="mod-fmod"),
    case("Mod", {"a": _off_integer(rnd(2, 3, 4) * 3) * 0.7}, {"fmod": 1}, inits={"b": np.array(0.7)},
         id="mod-fmod-const-divisor"),
    case("Mod", {"a": _off_integer(rnd(2, 3, 4) * 3) * _MOD_COL, "b": _MOD_COL}, {"fmod": 1},
         id="mod-fmod-broadcast-divisor"),
    case("Compress", {"x": rnd(2, 4, 3)}, {"axis": 1}, inits={"c": np.array([True, False, True, True])},
         id="compress-axis"),
    case("Compress", {"x": rnd(2, 3, 4)}, {"axis": -1}, inits={"c": np.array([False, True])},
         id="compress-short-condition"),
    case("Compress", {"x": rnd(2, 3, 2)}, inits={"c": np.array([1, 0, 0, 1, 1, 0, 1, 1, 0], dtype=bool)},
         id="compress-flat"),
    case("Compress", {"x": rnd(3, 2), "c": np.array([True, False, True])}, {"axis": 0}, wrt=["x"],
         id="compress-runtime-condition"),
    case("ReduceProd", {"x": rnd(2, 3, 4)}, {"axes": [2], "keepdims": 1}, id="rprod"),
    case("ReduceProd", {"x": rnd(2, 3, 4)}, {"keepdims": 0}, inits={"a": np.array([0, 1], I64)}, opset=18,
         id="rprod-opset18-input"),
    # groups (rows) with no zero, one zero and two zeros: the zero's cofactor is the rest's product
    case("ReduceProd", {"x": np.array([[1.5, -2.0, 0.5], [0.0, 3.0, -1.5], [0.0, 2.0, 0.0]])},
         {"axes": [1], "keepdims": 0}, id="rprod-zeros"),
    case("DepthToSpace", {"x": rnd(2, 8, 3, 2, dtype=F32)}, {"blocksize": 2, "mode": "DCR"}, id="d2s-dcr"),
    case("DepthToSpace", {"x": rnd(2, 18, 2, 3, dtype=F32)}, {"blocksize": 3, "mode": "CRD"}, id="d2s-crd"),
    case("SpaceToDepth", {"x": rnd(2, 3, 4, 6, dtype=F32)}, {"blocksize": 2}, id="s2d"),
    case("GatherElements", {"x": rnd(3, 4)}, {"axis": 1}, inits={"i": np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]], I64)},
         id="gather-elements-repeats"),
    case("GatherElements", {"x": rnd(3, 4)}, {"axis": 0}, inits={"i": np.array([[2, 0, 1, 0], [0, 1, 2, 1]], I64)},
         opset=13, id="gather-elements-unique-opset13"),
    case("Einsum", {"a": rnd(2, 3, 4), "b": rnd(2, 4, 5)}, {"equation": "bij,bjk->bik"}, opset=13, id="einsum-bmm"),
    case("Einsum", {"a": rnd(2, 3, 4, 5), "b": rnd(2, 3, 6, 5)}, {"equation": "bhid,bhjd->bhij"}, opset=13,
         id="einsum-attention"),
    case("Einsum", {"a": rnd(3, 4), "b": rnd(4, 5)}, {"equation": "ij,jk"}, opset=13, id="einsum-implicit"),
    case("Einsum", {"a": rnd(3, 4), "b": rnd(5)}, {"equation": "ij,k->jk"}, opset=13, id="einsum-lonely-sum"),
    case("Einsum", {"a": rnd(2, 1, 3, 4), "b": rnd(1, 5, 4, 6)}, {"equation": "...ij,...jk->...ik"}, opset=13,
         id="einsum-ellipsis-broadcast"),
    case("Einsum", {"a": rnd(2, 3, 4)}, {"equation": "abc->ca"}, opset=13, id="einsum-one-operand"),
]


TRIGONOMETRY = [          # float32: ONNX Runtime has no double kernels for these
    case("Tan", {"x": (rnd(2, 3) * 0.5).astype(F32)}),
    case("Sinh", {"x": rnd(2, 3).astype(F32)}),
    case("Cosh", {"x": rnd(2, 3).astype(F32)}),
    case("Atan", {"x": rnd(2, 3).astype(F32)}),
    case("Asin", {"x": (np.tanh(rnd(2, 3)) * 0.9).astype(F32)}),
    case("Acos", {"x": (np.tanh(rnd(2, 3)) * 0.9).astype(F32)}),
    case("Asinh", {"x": rnd(2, 3).astype(F32)}),
    case("Acosh", {"x": (1.2 + np.abs(rnd(2, 3))).astype(F32)}),
    case("Atanh", {"x": (np.tanh(rnd(2, 3)) * 0.9).astype(F32)}),
]


@pytest.mark.parametrize("c", TRIGONOMETRY)
def test_trigonometry(c):
    _run_case(c)


SELECTIONS = [
    case("TopK", {"x": rnd(3, 6)}, {"axis": 1}, inits={"k": np.array([2], I64)}, n_out=2, y="y0", id="topk-largest"),
    case("TopK", {"x": rnd(4, 3, 2)}, {"axis": 0, "largest": 0, "sorted": 0}, inits={"k": np.array([3], I64)},
         n_out=2, y="y0", id="topk-smallest-axis0"),
    case("CumSum", {"x": rnd(3, 5)}, inits={"axis": np.array(1, I64)}, id="cumsum"),
    case("CumSum", {"x": rnd(3, 5)}, {"exclusive": 1, "reverse": 1}, inits={"axis": np.array(-2, I64)},
         id="cumsum-exclusive-reverse"),
    case("Trilu", {"x": rnd(2, 4, 5)}, id="trilu-upper"),
    case("Trilu", {"x": rnd(2, 4, 5)}, {"upper": 0}, inits={"k": np.array(-1, I64)}, id="trilu-lower-k"),
    case("LpNormalization", {"x": rnd(3, 4, 2).astype(F32)}, {"axis": 1}, id="lpnorm-l2"),
    case("LpNormalization", {"x": rnd(3, 5, lo=0.1).astype(F32)}, {"p": 1}, id="lpnorm-l1"),
]


@pytest.mark.parametrize("c", SELECTIONS)
def test_selections(c):
    _run_case(c)


@pytest.mark.parametrize("c", ELEMENTWISE)
def test_elementwise(c):
    _run_case(c)


@pytest.mark.parametrize("c", ACTIVATIONS)
def test_activations(c):
    _run_case(c)


@pytest.mark.parametrize("c", LINEAR)
def test_linear(c):
    _run_case(c)


@pytest.mark.parametrize("c", SHAPE)
def test_shape(c):
    _run_case(c)


# ---- graphs, not single ops -----------------------------------------------------------------

def _graph(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, et=TensorProto.DOUBLE):
    return helper.make_tensor_value_info(name, et, shape)


@pytest.mark.parametrize("index", [-1, -3, 0, 2])
def test_gather_scalar_on_an_axis_of_run_time_size(index):
    """x[:, -1] on a sequence whose length the file leaves open (a token axis at a free image
    width): one gradient graph, checked at two lengths."""
    m = one_node_model("Gather", {"x": rnd(2, 5, 3)}, {"axis": 1}, {"i": np.array(index, I64)})
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "t"
    for length in (5, 8):
        x = rnd(2, length, 3)
        check_vjp(m, "y", ["x"], {"x": x})


def test_gather_nd_batch_dims_at_a_free_batch():
    """The batch coordinates come from the run's own batch size: one gradient graph, two batches."""
    x, i = rnd(3, 4, 2), np.array([[[1], [3]], [[0], [0]], [[3], [2]]], I64)
    m = one_node_model("GatherND", {"x": x, "i": i}, {"batch_dims": 1}, opset=16)
    for vi in m.graph.input:
        vi.type.tensor_type.shape.dim[0].dim_param = "n"
    m.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "n"
    for n in (3, 5):
        feeds = {"x": rnd(n, 4, 2), "i": R.integers(0, 4, (n, 2, 1)).astype(I64)}
        check_vjp(m, "y", ["x"], feeds)


def test_fanout_accumulates_and_intermediate_outputs():
    """x used three times (two branches + residual): the gradients must add up."""
    nodes = [helper.make_node("Tanh", ["x"], ["t"]), helper.make_node("Sigmoid", ["x"], ["s"]),
             helper.make_node("Mul", ["t", "s"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    m = _graph(nodes, [_vi("x", [2, 3])], [_vi("y", [2, 3])])
    x = rnd(2, 3)
    check_vjp(m, "y", ["x"], {"x": x})
    out = derived_grads(m, "y", ["x", "t"], {"x": x}, np.ones((2, 3)), outputs=["s"])
    assert list(out) == ["y", "s", "grad_x", "grad_t"]
    np.testing.assert_allclose(out["grad_t"], out["s"])


def test_unsupported_op_names_op_and_node():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"),
             helper.make_node("Det", ["r"], ["c"], name="the_det"),
             helper.make_node("Neg", ["c"], ["y"], name="last")]
    m = _graph(nodes, [_vi("x", [2, 3, 3])], [_vi("y", [2])])
    with pytest.raises(UnsupportedOpError) as ei:
        vjp(m, "y", ["x"])
    msg = str(ei.value)
    assert ei.value.op_type == "Det" and ei.value.node_name == "the_det"
    assert "'Det'" in msg and "the_det" in msg and "node 2 of 3" in msg and "'x'" in msg


def test_unknown_names_raise_layer_error():
    m = one_node_model("Relu", {"x": rnd(2, 3)}, {})
    for kwargs in (dict(y="nope", wrt=["x"]), dict(y="y", wrt=["nope"]), dict(y="y", wrt=["x"], outputs=["nope"])):
        with pytest.raises(LayerError, match="nope"):
            vjp(m, **kwargs)


def test_unreached_input_gets_zeros():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["z"], ["w"])]
    m = _graph(nodes, [_vi("x", [2, 3]), _vi("z", [2, 4])], [_vi("y", [2, 3]), _vi("w", [2, 4])])
    out = derived_grads(m, "y", ["x", "z"], {"x": rnd(2, 3), "z": rnd(2, 4)}, np.ones((2, 3)))
    assert out["grad_z"].shape == (2, 4) and not out["grad_z"].any()


def test_opset11_softmax_flattening_semantics():
    """Opset 11 Softmax normalises over all axes from ``axis`` on (a 2-D flatten), not one axis."""
    nodes = [helper.make_node("Softmax", ["x"], ["y"], axis=1)]
    m = _graph(nodes, [_vi("x", [2, 3, 4])], [_vi("y", [2, 3, 4])], opset=11)
    x = rnd(2, 3, 4)
    y = run(m, {"x": x})["y"]
    np.testing.assert_allclose(y.reshape(2, -1).sum(1), 1.0)   # flattening semantics really are in play
    check_vjp(m, "y", ["x"], {"x": x})


def test_rules_override_guided_backprop():
    x = rnd(2, 3, 4, lo=0.05)
    m = one_node_model("Relu", {"x": x}, {})
    cot = rnd(2, 3, 4)
    g = derived_grads(m, "y", ["x"], {"x": x}, cot, rules=GUIDED_RULES)["grad_x"]
    np.testing.assert_array_equal(g, np.maximum(cot, 0) * (x > 0))
    g = derived_grads(m, "y", ["x"], {"x": x}, cot, rules=DECONV_RULES)["grad_x"]
    np.testing.assert_array_equal(g, np.maximum(cot, 0))
    g = derived_grads(m, "y", ["x"], {"x": x}, cot)["grad_x"]            # the override did not stick
    np.testing.assert_array_equal(g, cot * (x > 0))


def test_guided_clip():
    x = rnd(3, 8) * 4
    m = one_node_model("Clip", {"x": x}, {}, {"lo": np.array(0.0), "hi": np.array(6.0)})
    cot = rnd(3, 8)
    g = derived_grads(m, "y", ["x"], {"x": x}, cot, rules=GUIDED_RULES)["grad_x"]
    np.testing.assert_array_equal(g, np.maximum(cot, 0) * ((x > 0) & (x < 6)))


def _conv_free_net(batch: int):
    """x[N,3,4] -> MatMul -> Relu -> Softmax(axis 1) with a constant weight: batch axis is free."""
    w = numpy_helper.from_array(rnd(4, 5), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Softmax", ["r"], ["y"], axis=1)]
    return _graph(nodes, [_vi("x", [batch, 3, 4])], [_vi("y", [batch, 3, 5])], [w])


def test_same_graph_any_batch():
    m = _conv_free_net(1)
    vm = vjp(m, "y", ["x"])
    onnx.checker.check_model(vm)
    x5 = rnd(5, 3, 4)
    c5 = rnd(5, 3, 5)
    g5 = run(vm, {"x": x5, "grad_y": c5})["grad_x"]
    for i in (0, 3):
        g1 = run(vm, {"x": x5[i:i + 1], "grad_y": c5[i:i + 1]})["grad_x"]
        np.testing.assert_allclose(g5[i:i + 1], g1, rtol=1e-12, atol=1e-12)
    check_vjp(m, "y", ["x"], {"x": x5})


def test_shape_subgraph_dynamic_reshape():
    """Reshape to [N, -1] built from Shape -> Gather -> Concat: the shape path carries no gradient."""
    nodes = [
        helper.make_node("Tanh", ["x"], ["t"]),
        helper.make_node("Shape", ["t"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["t", "target"], ["f"]),
        helper.make_node("Cast", ["sh"], ["shf"], to=TensorProto.DOUBLE),
        helper.make_node("ReduceSum", ["shf"], ["shs"], keepdims=1),
        helper.make_node("Mul", ["f", "shs"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, I64), "zero"), numpy_helper.from_array(np.array([0], I64), "ax0"),
             numpy_helper.from_array(np.array([-1], I64), "minus1")]
    m = _graph(nodes, [_vi("x", ["N", 3, 4])], [_vi("y", ["N", 12])], inits)
    for b in (1, 3):
        check_vjp(m, "y", ["x"], {"x": rnd(b, 3, 4)})


def test_result_has_documented_interface():
    m = _conv_free_net(2)
    vm = vjp(m, "y", ["x", "h"], outputs=["r"])
    assert [i.name for i in vm.graph.input] == ["x", "grad_y"]
    assert [o.name for o in vm.graph.output] == ["y", "r", "grad_x", "grad_h"]
    gy = vm.graph.input[1].type.tensor_type
    assert gy.elem_type == TensorProto.DOUBLE
    assert not gy.shape.dim[0].HasField("dim_value")             # batch dim symbolic
    assert [d.dim_value for d in gy.shape.dim[1:]] == [3, 5]
    names = {n.name for n in vm.graph.node} | {o for n in vm.graph.node for o in n.output}
    new = names - {"h", "r", "y", ""} - {o.name for o in vm.graph.output}
    assert all(n.startswith("onnxsal_bw/") for n in new if n)


def test_relu_backward_has_no_where_and_add_no_reducesum():
    """The fast forms: Relu via Sign*Mul, equal-shape Add/Mul without any ReduceSum."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "x"], ["a"]),
             helper.make_node("Mul", ["a", "x"], ["y"])]
    m = _graph(nodes, [_vi("x", ["N", 3])], [_vi("y", ["N", 3])])
    vm = vjp(m, "y", ["x"])
    ops = [n.op_type for n in vm.graph.node]
    assert "Where" not in ops and "ReduceSum" not in ops and "Div" not in ops


def test_readme_lists_every_rule():
    """The README's list of covered ops is the registry, no more and no less."""
    import os
    import re

    from onnxsal.graph.autodiff import VJP_RULES

    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = text[text.index("Covered ops"):text.index("Shape-only subgraphs carry no gradient")]
    listed = set(re.findall(r"\b([A-Z][A-Za-z0-9]+)\b", section))
    missing = sorted(set(VJP_RULES) - listed)
    assert not missing, f"README does not list {missing}"
    from onnxsal.graph.deform import DEFORM           # written out before differentiation, not a rule
    from onnxsal.graph.recurrent import RECURRENT     # unrolled before differentiation, not a rule

    from onnxsal.graph.qoperator import _REWRITES     # integer ops rewritten into QDQ form at load

    bodies = {s.name for s in onnx.defs.get_all_schemas() if s.has_function or s.has_context_dependent_function}
    unknown = sorted(op for op in listed - set(VJP_RULES) - set(RECURRENT) - set(DEFORM) - bodies - set(_REWRITES)
                     if op in _onnx_ops())
    assert not unknown, f"README lists ops without a rule or a spec body (graph/functions.py): {unknown}"


def _onnx_ops() -> set:
    return {s.name for s in onnx.defs.get_all_schemas()}


def test_max_min_ties_share_the_gradient_like_pytorch():
    """Finite differences cannot see ties; PyTorch's amax/maximum split the gradient evenly."""
    import torch

    x = np.array([[[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [2.0, -1.0, 2.0, 2.0]]] * 2)
    cot = R.standard_normal((2, 3))
    m = one_node_model("ReduceMax", {"x": x}, {"axes": [2], "keepdims": 0})
    got = derived_grads(m, "y", ["x"], {"x": x}, cot)["grad_x"]
    xt = torch.tensor(x, requires_grad=True)
    (torch.amax(xt, dim=2) * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), atol=1e-12)

    a = np.array([[1.0, 2.0, 3.0], [0.0, 5.0, -1.0]])
    b = np.array([1.0, 4.0, 3.0])
    cot = R.standard_normal((2, 3))
    for op, fn in (("Max", torch.maximum), ("Min", torch.minimum)):
        m = one_node_model(op, {"a": a, "b": b})
        got = derived_grads(m, "y", ["a", "b"], {"a": a, "b": b}, cot)
        at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        (fn(at, bt) * torch.tensor(cot)).sum().backward()
        np.testing.assert_allclose(got["grad_a"], at.grad.numpy(), atol=1e-12, err_msg=op)
        np.testing.assert_allclose(got["grad_b"], bt.grad.numpy(), atol=1e-12, err_msg=op)


@pytest.mark.parametrize("op,inputs,attrs,inits,opset,why", [
    ("Einsum", {"a": rnd(3, 3)}, {"equation": "ii->i"}, {}, 13, "repeated label"),
    ("Einsum", {"a": rnd(2, 3, 4)}, {"equation": "...ij->ij"}, {}, 13, "summed out"),
    ("ReduceL2", {"x": rnd(2, 3)}, {"noop_with_empty_axes": 1}, {}, 18, "noop_with_empty_axes"),
    ("ReduceProd", {"x": rnd(2, 3)}, {"noop_with_empty_axes": 1}, {}, 18, "noop_with_empty_axes"),
])
def test_new_rules_refuse_what_they_cannot_differentiate(op, inputs, attrs, inits, opset, why):
    m = one_node_model(op, inputs, attrs, inits, opset=opset)
    with pytest.raises(UnsupportedOpError, match=why) as ei:
        vjp(m, "y", list(inputs))
    assert op in str(ei.value)


@pytest.mark.parametrize("node,inits,opset,y_shape,why", [
    (helper.make_node("ScatterND", ["x", "i", "u"], ["y"], reduction="mul", name="n"),
     {"i": np.array([[1]], I64), "u": np.ones((1, 3))}, 18, [4, 3], "ScatterND reduction 'mul'"),
    (helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], reduction="max", name="n"),
     {"i": np.zeros((1, 3), I64), "u": np.ones((1, 3))}, 18, [4, 3], "ScatterElements reduction 'max'"),
])
def test_scatter_and_gather_nd_refusals_name_the_reason(node, inits, opset, y_shape, why):
    m = _graph([node], [_vi("x", [4, 3])], [_vi("y", y_shape)],
               [numpy_helper.from_array(v, k) for k, v in inits.items()], opset=opset)
    with pytest.raises(UnsupportedOpError, match=f"'n'.*{re.escape(why)}"):
        vjp(m, "y", ["x"])


def test_repeated_gather_indices_at_opset_13_add_up_at_opset_16():
    """Repeated indices' adjoint is a scatter that adds them, which opset 16 brought: a model at 13
    is upgraded for its gradient graph, and the repeats add up."""
    from onnxsal.graph.normalize import opset_of

    x = rnd(3, 4)
    m = one_node_model("GatherElements", {"x": x}, {"axis": 1}, {"i": np.array([[0, 0], [1, 2], [3, 3]], I64)},
                       opset=13)
    assert opset_of(vjp(m, "y", ["x"])) == 16
    check_vjp(m, "y", ["x"], {"x": x})
    x = rnd(4, 3)
    m = _graph([helper.make_node("GatherND", ["x", "i"], ["y"])], [_vi("x", [4, 3])], [_vi("y", [3, 3])],
               [numpy_helper.from_array(np.array([[1], [1], [3]], I64), "i")], opset=13)
    check_vjp(m, "y", ["x"], {"x": x})


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
@pytest.mark.parametrize("op, exact", [
    ("Sigmoid", lambda x: np.exp(x - 2 * np.logaddexp(0, x))),
    ("Tanh", lambda x: 4 * np.exp(2 * x - 2 * np.logaddexp(0, 2 * x))),
])
def test_saturated_sigmoid_and_tanh_keep_their_derivative(op, exact, dtype, rtol):
    """Far into both tails: ONNX Runtime's float sigmoid is 0 below -18 and off by whole percents
    below -10 (double: 0 below -37), and y (1 - y) or 1 - y^2 cancels in the upper tail, so a
    derivative taken from the output loses every digit there. Each entry must match the exact
    derivative to a few ulps, relative."""
    x = np.concatenate([np.linspace(-40, 40, 81), [-17.3, -12.5, 9.7, 15.2]]).astype(dtype)
    m = one_node_model(op, {"x": x})
    got = derived_grads(m, "y", ["x"], {"x": x}, np.ones_like(x))["grad_x"]
    want = exact(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=0)


def test_distinct_scatter_places_need_no_winner_check():
    """Constant indices that write each place once are read back as they are; repeated or run-time
    ones add the check of which update each place kept."""
    x, u = rnd(3, 4), rnd(2, 4)
    ops = {}
    for name, i in (("distinct", [[2, 0, 1, 2], [0, 1, 2, 1]]), ("repeated", [[2, 0, 1, 2], [2, 1, 2, 1]])):
        m = one_node_model("ScatterElements", {"x": x, "u": u}, {"axis": 0}, {"i": np.array(i, I64)},
                           node_inputs=["x", "i", "u"])
        ops[name] = [n.op_type for n in vjp(m, "y", ["x", "u"]).graph.node]
    assert "Equal" not in ops["distinct"] and ops["repeated"].count("Equal") == 1


def test_control_flow_that_reads_the_input_is_refused_not_skipped():
    """An If's branches read outer tensors without listing them as inputs. Such a node on the path
    was invisible: the gradient came out as zeros. One whose condition depends on the input's values
    is now on the path, and refused by name; one whose condition is fixed is its branch
    (``static_if``); an If that reads no tensor on the path is no obstacle."""
    x = rnd(2, 3)
    then_branch = helper.make_graph([helper.make_node("Neg", ["t"], ["a"])], "then", [],
                                    [helper.make_tensor_value_info("a", TensorProto.DOUBLE, None)])
    else_branch = helper.make_graph([helper.make_node("Identity", ["t"], ["b"])], "else", [],
                                    [helper.make_tensor_value_info("b", TensorProto.DOUBLE, None)])
    nodes = [helper.make_node("Exp", ["x"], ["t"]), helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["u"], name="data_if", then_branch=then_branch, else_branch=else_branch),
             helper.make_node("Mul", ["u", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3])],
                              [numpy_helper.from_array(np.array(0.0), "zero")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match=r"cannot differentiate op 'If' \(node 'data_if'\)"):
        vjp(m, "y", ["x"])
    fixed = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Size", ["shape"], ["rank"]),
             helper.make_node("Equal", ["rank", "two"], ["c"])]
    m1 = helper.make_model(helper.make_graph(nodes[:1] + fixed + nodes[3:], "g", list(graph.input), list(graph.output),
                                             [numpy_helper.from_array(np.array(2, np.int64), "two")]),
                           opset_imports=[helper.make_opsetid("", 17)])
    assert "If" not in [n.op_type for n in vjp(m1, "y", ["x"]).graph.node]
    cot = rnd(2, 3)
    got = derived_grads(m1, "y", ["x"], {"x": x}, cot)      # the then branch: y = -exp(x) * x
    np.testing.assert_allclose(got["y"], -np.exp(x) * x, rtol=1e-12)
    np.testing.assert_allclose(got["grad_x"], -cot * np.exp(x) * (1 + x), rtol=1e-10)
    batch = [helper.make_node("Shape", ["x"], ["shape"]), helper.make_node("Gather", ["shape", "zero_i"], ["n"]),
             helper.make_node("Equal", ["n", "one_i"], ["c"])]      # x.squeeze(0): fixed only for one batch
    m3 = helper.make_model(helper.make_graph(nodes[:1] + batch + nodes[3:], "g", list(graph.input), list(graph.output),
                                             [numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
                                              numpy_helper.from_array(np.array(1, np.int64), "one_i")]),
                           opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(UnsupportedOpError, match=r"cannot differentiate op 'If' \(node 'data_if'\)"):
        vjp(m3, "y", ["x"])
    const_branch = helper.make_graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones((2, 3))))],
                                     "then", [], [helper.make_tensor_value_info("k", TensorProto.DOUBLE, None)])
    nodes[3] = helper.make_node("If", ["c"], ["u"], name="constant_if", then_branch=const_branch, else_branch=const_branch)
    m2 = helper.make_model(helper.make_graph(nodes, "g", list(graph.input), list(graph.output), list(graph.initializer)),
                           opset_imports=[helper.make_opsetid("", 17)])
    check_vjp(m2, "y", ["x"], {"x": x})


def test_clip_bounds_computed_from_the_input_get_their_gradient():
    """``x.clamp(min=-1, max=x.abs().mean())``: the upper bound depends on x, so the places it clips
    pass their gradient to it (torch.clamp's), and through it back to every x."""
    x = rnd(3, 4) * 2
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMean", ["a"], ["m"], keepdims=0),
             helper.make_node("Neg", ["m"], ["lo"]), helper.make_node("Clip", ["x", "lo", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [3, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    check_vjp(m, "y", ["x"], {"x": x})
    cot = rnd(3, 4)
    got = derived_grads(m, "y", ["x"], {"x": x}, cot)["grad_x"]
    import torch

    xt = torch.tensor(x, requires_grad=True)
    bound = xt.abs().mean()
    (torch.clamp(xt, min=-bound, max=bound) * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
