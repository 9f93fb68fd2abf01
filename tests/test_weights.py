"""Weights kept beside the graph: placeholders, the store, sessions fed with external initializers.

The whole suite runs with every float weight detached (conftest); these tests check the
mechanism itself and that both sides of the size threshold give identical results.
"""

import gc

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import tiny
from onnxsal import Explainer, errors
from onnxsal.graph import weights
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


def inits(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def float_bytes(model, at_least: int = 0):
    """Bytes held inline by the initializers of ``at_least`` bytes or more."""
    sizes = [len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer]
    return sum(b for b in sizes if b >= at_least)


def test_detach_leaves_placeholders_and_attach_restores_every_tensor():
    model = tiny.conv_net(size=16)
    before = model.SerializeToString()
    light, store = weights.detach(model, min_bytes=0)
    assert model.SerializeToString() == before                       # the given proto is untouched
    assert set(store) == {"w1", "w2", "wf"}          # a bias of a few floats stays inline (INLINE_BYTES)
    assert float_bytes(light) == sum(inits(model)[k].nbytes for k in ("b1", "b2", "bf")) < 3 * weights.INLINE_BYTES
    assert all(weights.is_placeholder(t) == (t.name in store) for t in light.graph.initializer)
    full = weights.attach(light)
    assert all(not weights.is_placeholder(t) for t in full.graph.initializer)
    a, b = inits(full), inits(model)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [n.SerializeToString() for n in full.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert full.metadata_props == model.metadata_props


def test_threshold_keeps_small_and_integer_tensors_inline():
    model = tiny.conv_net(size=16)
    light, store = weights.detach(model, min_bytes=4 * 6 * 4 * 3 * 3)  # w2 and larger
    assert set(store) == {"w2"}
    shape_const = numpy_helper.from_array(np.zeros(100000, np.int64), "big_ints")
    model.graph.initializer.append(shape_const)
    light, store = weights.detach(model, min_bytes=0)
    assert "big_ints" not in store                                      # integer tensors feed shape logic


def test_a_placeholder_follows_a_renamed_tensor_and_fails_clearly_once_released():
    light, store = weights.detach(tiny.conv_net(size=16), min_bytes=0)
    t = next(t for t in light.graph.initializer if t.name == "w1")
    t.name = "renamed"
    np.testing.assert_array_equal(weights.array(t), store["w1"])
    del store
    gc.collect()
    with pytest.raises(errors.ModelError, match="no longer available"):
        weights.array(t)


def test_sessions_get_large_inline_constants_as_external_arrays():
    m = load(tiny.conv_net(size=16))
    g = vjp(m.light, m.logits, [m.input.name])
    added = [t.name for t in g.graph.initializer if not weights.is_placeholder(t)]
    assert added                                                         # the VJP's own constants are inline
    # a large constant a rule adds (a flipped kernel, an interpolation matrix), read by the gradient
    a = np.linspace(-1, 1, 3 * 8, dtype=np.float32).reshape(3, 8)        # 96 bytes each
    g.graph.initializer.extend([numpy_helper.from_array(a, "added_matrix"), numpy_helper.from_array(a.T.copy(), "back")])
    seed_in = f"grad_{m.logits}"
    for n in g.graph.node:
        n.input[:] = ["seed_mixed" if i == seed_in else i for i in n.input]
    g.graph.node.insert(0, onnx.helper.make_node("MatMul", ["seed_wide", "back"], ["seed_mixed"]))
    g.graph.node.insert(0, onnx.helper.make_node("MatMul", [seed_in, "added_matrix"], ["seed_wide"]))
    light, arrays = weights.for_session(g, min_bytes=0)
    assert float_bytes(light, weights.INLINE_BYTES) == 0 < float_bytes(light)     # scalars and biases stay
    assert set(arrays) == {t.name for t in g.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and
                           (weights.is_placeholder(t) or weights.array(t).nbytes >= weights.INLINE_BYTES)}
    assert {"added_matrix", "back"} <= set(arrays) and all(name not in arrays for name in added)
    opts = ort.SessionOptions()
    opts.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    sess = ort.InferenceSession(light.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(weights.attach(g).SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((3, 3, 16, 16)).astype(np.float32)
    seed = np.eye(3, dtype=np.float32)
    feeds = {m.input.name: x, f"grad_{m.logits}": seed}
    for a, b in zip(sess.run(None, feeds), ref.run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_model_proto_is_self_contained_and_equal_to_the_light_graph_with_its_weights():
    m = load(tiny.conv_net(size=16))
    assert float_bytes(m.light, weights.INLINE_BYTES) == 0
    full = m.proto
    assert m.proto is full                                               # built once
    assert float_bytes(full) > 0
    x = np.random.default_rng(1).random((2, 3, 16, 16)).astype(np.float32)
    out = ort.InferenceSession(full.SerializeToString(), providers=["CPUExecutionProvider"]).run(["probs"], {"image": x})[0]
    np.testing.assert_allclose(out, tiny.numpy_forward(tiny.conv_net(size=16), x)["probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "gradcam", "ig", "occlusion"])
def test_maps_are_identical_with_weights_inside_or_beside_the_graph(method, monkeypatch):
    x = np.random.default_rng(2).random((1, 3, 16, 16)).astype(np.float32)
    opts = {"window": 4} if method == "occlusion" else {}
    maps = []
    for limit in (0, 1 << 40):
        monkeypatch.setattr(weights, "MIN_BYTES", limit)
        ex = Explainer(tiny.conv_net(size=16), "cpu")
        maps.append(ex.explain(x, method, **opts).maps)
    np.testing.assert_array_equal(maps[0], maps[1])


def test_a_corrupt_large_initializer_is_a_model_error(tmp_path):
    model = tiny.conv_net(size=16)
    w = next(t for t in model.graph.initializer if t.name == "w2")
    w.raw_data = w.raw_data[:-8]                                         # truncated data, shape unchanged
    with pytest.raises(errors.ModelError, match="'w2' is corrupt"):
        load(model)


def test_only_matrices_that_multiply_one_row_per_sample_count_against_packing():
    from onnx import TensorProto, helper

    from onnxsal.runtime import _row_matrix_bytes

    w2d, w3d = np.ones((6, 5), np.float32), np.ones((5, 4), np.float32)
    nodes = [helper.make_node("MatMul", ["rows", "w2d"], ["a"]),          # (N, 6) @ (6, 5): one row per sample
             helper.make_node("MatMul", ["tokens", "w3d"], ["b"]),        # (N, T, 5) @ (5, 4): many rows
             helper.make_node("Gemm", ["a", "w3d"], ["c"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["N", 6]),
                                       helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", 7, 5])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("b", "c")],
                          [numpy_helper.from_array(w2d, "w2d"), numpy_helper.from_array(w3d, "w3d")])
    model = helper.make_model(g)
    assert _row_matrix_bytes(model, {"w2d": w2d, "w3d": w3d}) == w2d.nbytes + w3d.nbytes   # MatMul 2-D + Gemm
    assert _row_matrix_bytes(model, {"w3d": w3d}) == w3d.nbytes                            # only what is external


def test_models_with_an_external_data_file_or_initializers_listed_as_inputs(tmp_path):
    x = np.random.default_rng(3).random((1, 3, 16, 16)).astype(np.float32)
    want = Explainer(tiny.conv_net(size=16), "cpu").explain(x, "saliency").maps
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="tiny.data", size_threshold=0)
    np.testing.assert_array_equal(Explainer(str(path), "cpu").explain(x, "saliency").maps, want)
    old = tiny.conv_net(size=16)                     # IR 3 style: every initializer is also a graph input
    for t in old.graph.initializer:
        old.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    np.testing.assert_array_equal(Explainer(old, "cpu").explain(x, "saliency").maps, want)
