"""How many rows a run takes: the memory budget everywhere, and on CPU a cap from the largest activation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxsal
from onnxsal import runtime as rt_mod
from onnxsal.graph.surgery import expose
from onnxsal.model import load
from onnxsal.runtime import Runtime

import tiny

SIZE = 64
ROW = 4 * SIZE * SIZE * 4          # conv1's output, 4 channels at 64x64: the largest tensor of a row


def _session(rt: Runtime):
    m = load(tiny.conv_net(size=SIZE))
    return rt.session("expose", lambda: expose(m.light, [m.logits]))


@pytest.mark.parametrize("cache_rows, memory_mb, device, expected", [
    (10, 1024, "cpu", 10),         # the cache cap
    (2, 1024, "cpu", 4),           # never under the floor of 4 rows
    (10, 1024, "cuda:0", 64),      # GPUs keep the memory budget's batches
    (10, 0, "cpu", 1),             # a budget smaller than a row still runs one row
])
def test_rows_per_run(monkeypatch, cache_rows, memory_mb, device, expected):
    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", cache_rows * ROW)
    rt = Runtime("cpu", memory_mb=memory_mb)
    sess = _session(rt)
    assert sess._onnxsal_largest_row == ROW
    rt.device = device
    assert rt.batch_size(sess) == expected
    assert rt.batch_size(sess, 7) == 7                     # an explicit batch size wins


def test_chunked_runs_give_the_same_maps(monkeypatch):
    """SmoothGrad's 12 noisy copies run as 3 runs of 4 rows under the cache cap; the map is the one
    a single run of 12 gives."""
    model = tiny.conv_net(size=SIZE)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    single = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=12)
    whole = single.explain(x, "smoothgrad", target=1, n_samples=12, seed=3).raw

    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", 1)
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    runs = []
    session = ex.engine.runtime.session

    def counting(key, build):
        sess = session(key, build)
        if key.startswith("vjp:") and not hasattr(sess, "_counted"):
            run = sess.run
            sess.run = lambda *a, **k: runs.append(len(a[1][ex.model.input.name])) or run(*a, **k)
            sess._counted = True
        return sess

    ex.engine.runtime.session = counting
    chunked = ex.explain(x, "smoothgrad", target=1, n_samples=12, seed=3).raw
    assert runs == [4, 4, 4]
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_graphs_with_large_dense_weights_are_not_capped(monkeypatch):
    """Dense weights over PREPACK_LIMIT are read once per run: such graphs keep the budget's batches."""
    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(rt_mod, "PREPACK_LIMIT", 0)              # the tiny classifier's Gemm counts as large
    rt = Runtime("cpu")
    assert rt.batch_size(_session(rt)) == 64


def _one_image_model():
    """A graph written for one image: ``x.squeeze(0)`` drops the batch, and nothing brings it back."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"axes": np.array([0], np.int64), "flat": np.array([1, 128], np.int64),
             "w": rng.standard_normal((128, 3)).astype(np.float32) * 0.1,
             "k": rng.standard_normal((8, 3, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             helper.make_node("Squeeze", ["c", "axes"], ["s"]),
             helper.make_node("Softmax", ["s"], ["attn"], axis=-1),
             helper.make_node("Reshape", ["attn", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    g = helper.make_graph(nodes, "one_image", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_graph_that_takes_one_image_runs_at_batch_1_and_then_one_row_at_a_time(capfd):
    import onnxruntime as ort

    from gradcheck import check_vjp
    from onnxsal.graph.normalize import normalize

    model = _one_image_model()
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    free = normalize(model)
    onnx.checker.check_model(free)
    got = ort.InferenceSession(free.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    check_vjp(free, "logits", ["x"], {"x": x})
    capfd.readouterr()
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    res = ex.explain(x, method="smoothgrad", n_samples=6, target=1)
    assert any("one row at a time" in n for n in res.notes)
    assert "Non-zero status code" not in capfd.readouterr().err      # the failed batched run is not logged
    one = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=1).explain(x, method="smoothgrad", n_samples=6,
                                                                                    target=1)
    np.testing.assert_allclose(res.map, one.map, atol=1e-6)
    assert not any("one row at a time" in n for n in one.notes)


def test_rows_that_must_run_together_are_not_split():
    from onnxsal.runtime import Runtime

    m = load(_one_image_model())
    rt = Runtime("cpu")
    sess = rt.session("fwd", lambda: expose(m.light, [m.logits]))
    x = np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(Exception):
        rt.run_batched(sess, {"x": x}, whole=True)
    assert rt.run_batched(sess, {"x": x})[0].shape == (2, 3) and rt.one_row


def test_a_run_that_returns_another_number_of_rows_is_run_again_row_by_row():
    """A batch-1 graph that pools over its batch axis returns one row for any batch, without an error."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {"axes": np.array([0], np.int64), "k": np.random.default_rng(0).standard_normal((3, 3, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             helper.make_node("ReduceMean", ["c", "axes"], ["y"], keepdims=1)]
    g = helper.make_graph(nodes, "pooled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    rt = Runtime("cpu")
    sess = rt.session("pooled", lambda: model)
    x = np.random.default_rng(1).standard_normal((3, 3, 2, 2)).astype(np.float32)
    got = rt.run_batched(sess, {"x": x})[0]
    assert got.shape == (3, 3, 2, 2) and rt.one_row
    for i in range(3):
        np.testing.assert_allclose(got[i], sess.run(None, {"x": x[i:i + 1]})[0][0], rtol=1e-6)


@pytest.mark.parametrize("fixed_rows, said", [(0, "could not run the model: "),
                                              (4, "could not run the model at the batch of 4 its file fixes: ")])
def test_a_run_onnx_runtime_cannot_do_raises_a_model_error_in_one_line(fixed_rows, said):
    """A graph that fails at every batch (a reshape of 3 values into 7): one row, and for a file
    fixed at 4 rows the filled run too, fail; the API gets a ModelError with ONNX Runtime's reason."""
    from onnx import TensorProto, helper, numpy_helper

    from onnxsal.errors import ModelError

    g = helper.make_graph([helper.make_node("Reshape", ["x", "t"], ["y"])], "broken",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.array([7], np.int64), "t")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    rt = Runtime("cpu")
    rt.fixed_rows = fixed_rows
    sess = rt.session("broken", lambda: model)
    with pytest.raises(ModelError, match=said) as err:
        rt.run_batched(sess, {"x": np.zeros((2, 3), np.float32)})
    assert "\n" not in str(err.value)


def test_a_graph_onnx_runtime_refuses_to_load_is_a_model_error_in_one_line(tmp_path, capfd):
    """An average pool that does not count its padding, with a pad as large as its kernel: ONNX
    allows it, ONNX Runtime refuses it when the session starts (and onnxsal cannot move such pads
    into a Pad node). The API gets a ModelError with the runtime's reason, without its C++ location,
    and nothing else reaches the terminal."""
    from onnxsal.errors import ModelError

    path = tmp_path / "refused.onnx"
    onnx.save(tiny.refused_pool_net(), path)
    ex = onnxsal.Explainer(str(path), preprocess="unit")
    capfd.readouterr()
    with pytest.raises(ModelError) as err:
        ex.explain(np.zeros((16, 16, 3), np.uint8), method="saliency")
    assert str(err.value) == ("ONNX Runtime could not load the model: Exception during initialization: "
                              "Pad should be smaller than kernel.")
    assert capfd.readouterr() == ("", "")


def test_a_free_batch_graph_that_reduces_over_its_batch_runs_each_image_alone():
    """`x / mean(|x|)` with no axes averages over the batch too. The file's batch is free, so no
    trace reads it; the load check of two images together against each alone catches it, and a run
    of several rows (SmoothGrad's copies, IG's path) then gives each row its own value, as the
    model gives an image alone. A graph that keeps its rows apart is not pinned."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(2).standard_normal((4, 3 * 8 * 8)).astype(np.float32)
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("ReduceMean", ["a"], ["m"], keepdims=0),
             helper.make_node("Div", ["x", "m"], ["n"]), helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [numpy_helper.from_array(w, "w")])
    ex = onnxsal.Explainer(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "cpu", preprocess="raw")
    assert ex.model.one_image == ("a run of two images differed from each image run alone",)
    x = np.random.default_rng(3).random((3, 3, 8, 8)).astype(np.float32)
    seeds = np.eye(4, dtype=np.float32)[[0, 1, 2]]
    together = ex.engine.gradients(x, seeds, wrt=["x"])
    for k in range(3):
        alone = ex.engine.gradients(x[k:k + 1], seeds[k:k + 1], wrt=["x"])
        np.testing.assert_allclose(together["grad_x"][k], alone["grad_x"][0], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(together["y"][k], alone["y"][0], rtol=1e-5)
    notes = ex.explain(x[:1], "saliency", target=0).notes
    assert ("the model's graph reads across its batch (a run of two images differed from each image run alone): "
            "each image is scored as on its own, so every run took one row") in notes
    kept_apart = onnxsal.Explainer(tiny.conv_net(size=16), "cpu")
    assert kept_apart.model.one_image == () and not kept_apart.engine.runtime._sessions   # the screen spared it the runs
