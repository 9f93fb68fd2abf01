"""Pooling windows: onnxsal's reading of ONNX Runtime's against the runtime itself, over every
one-axis configuration in a grid (MaxPool, AveragePool with and without its padding counted,
LpPool; sizes 1-9, kernels 1-3, strides 1-3, dilations 1-2, pads 0-2, ceil mode, every auto_pad;
about 10 s).

For each configuration the runtime accepts: ``pool_geometry.node_windows`` gives the runtime's
output size, and where ONNX's shape inference gives another, ``may_differ`` flags it and
``normalize``'s rewrite gives the runtime's values (or leaves the node alone where no explicit pads
can, which the gradient then refuses by name).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxsal.graph.normalize import normalize
from onnxsal.graph.pool_geometry import explicit_pads, may_differ, node_windows, pads_movable


def _model(op: str, attrs: dict, h: int) -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], **attrs)], "pool",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def configurations():
    for op in ("MaxPool", "AveragePool", "LpPool"):
        for h, k, s, d, pb, pe, ceil, auto_pad, counted in itertools.product(
                range(1, 10), range(1, 4), range(1, 4), (1, 2), range(3), range(3), (0, 1),
                ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"), (0, 1)):
            if (auto_pad != "NOTSET" and (pb or pe)) or (op != "AveragePool" and counted):
                continue
            attrs = dict(kernel_shape=[k], strides=[s], dilations=[d], ceil_mode=ceil)
            attrs.update(pads=[pb, pe]) if auto_pad == "NOTSET" else attrs.update(auto_pad=auto_pad)
            if op == "AveragePool":
                attrs["count_include_pad"] = counted
            if op == "LpPool":
                attrs["p"] = 2
            yield op, h, attrs


def test_pool_windows_are_the_runtime_s():
    rng = np.random.default_rng(0)
    counts = dict(configurations=0, refused_by_the_runtime=0, inference_differs=0, rewritten=0, left=0)
    mismatches = []
    for op, h, attrs in configurations():
        counts["configurations"] += 1
        x = rng.standard_normal((1, 1, h)).astype(np.float32)
        model = _model(op, attrs, h)
        try:
            want = _run(model, x)
        except Exception:
            counts["refused_by_the_runtime"] += 1
            continue
        if want.size == 0:
            continue
        if node_windows(attrs, [h])[0][2] != want.shape[2]:
            mismatches.append(("size", op, h, attrs, want.shape))
            continue
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output[0]
            size = inferred.type.tensor_type.shape.dim[2].dim_value
        except Exception:
            size = None
        if size == want.shape[2]:
            continue
        counts["inference_differs"] += 1
        got = _run(normalize(model), x)
        counts["rewritten" if explicit_pads(attrs, [h]) is not None else "left"] += 1
        if not may_differ(attrs) or got.shape != want.shape or np.abs(got - want).max() > 1e-6:
            mismatches.append(("values", op, h, attrs, want.ravel(), got.ravel()))
    assert not mismatches, mismatches[:5]
    # ONNX Runtime 1.32 and ONNX 1.23: 1126 configurations sized otherwise by inference, 1089 of them rewritten
    assert counts["inference_differs"] > 1000 and counts["rewritten"] > 1000 and counts["left"] < 50, counts


def _reference(op: str, attrs: dict, x: np.ndarray) -> np.ndarray:
    """One axis of a pool with explicit pads and no ceil mode, from its definition: the cells of
    each window that fall inside the input, their max, their root sum of squares, or their sum over
    the kernel's size (an average that counts its padding)."""
    (k,), (s,), (d,), (pb, pe) = attrs["kernel_shape"], attrs["strides"], attrs["dilations"], attrs["pads"]
    h = x.size
    out = []
    for start in range(-pb, h + pe - d * (k - 1), s):
        cells = [x[i] for i in range(start, start + d * k, d) if 0 <= i < h]
        if op == "MaxPool":
            out.append(max(cells, default=-np.inf))
        elif op == "LpPool":
            out.append(np.sqrt(sum(c * c for c in cells)))
        else:
            out.append(sum(cells) / k)
    return np.array(out, np.float32)


def test_pads_as_wide_as_the_kernel_move_into_a_pad_node():
    """ONNX allows a pad as large as the kernel (torch.onnx writes one at opsets before 10 for a
    ceil-mode pool), ONNX Runtime refuses it: `normalize` moves such pads into a Pad node where the
    pool gives the same values, and leaves the others to the runtime's refusal."""
    rng = np.random.default_rng(1)
    moved = kept = 0
    for op, h, attrs in configurations():
        if attrs.get("ceil_mode") or "pads" not in attrs or max(attrs["pads"]) < attrs["kernel_shape"][0]:
            continue
        model = _model(op, attrs, h)
        x = rng.standard_normal((1, 1, h)).astype(np.float32)
        with pytest.raises(Exception, match="Pad should be smaller than kernel"):
            _run(model, x)
        normal = normalize(model)
        if not pads_movable(op, attrs):
            assert [n.op_type for n in normal.graph.node] == [op]
            kept += 1
            continue
        assert [n.op_type for n in normal.graph.node] == ["Pad", op], (op, h, attrs)
        if op == "MaxPool":     # its argmax positions would count the Pad node's cells: left as it is
            with_argmax = _model(op, attrs, h)
            with_argmax.graph.node[0].output.append("i")
            assert [n.op_type for n in normalize(with_argmax).graph.node] == [op]
        want = _reference(op, attrs, x[0, 0])
        got = _run(normal, x)
        if op == "MaxPool":     # a window wholly in the padding: ONNX Runtime gives -inf or the lowest float
            got = np.where(got <= np.finfo(np.float32).min, -np.inf, got)
        np.testing.assert_allclose(got.ravel(), want, rtol=1e-6, atol=1e-6, err_msg=str((op, h, attrs)))
        moved += 1
    assert moved > 2000 and kept > 600, (moved, kept)      # 2106 and 702

