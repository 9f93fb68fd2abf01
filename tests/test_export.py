"""The exported explainer graph runs in plain ONNX Runtime and gives onnxsal's maps."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

import onnxsal
from onnxsal.cli import main
from onnxsal.export import export

import tiny

DEMO = os.path.join(os.path.dirname(__file__), "..", "models", "demo", "demo_shapes.onnx")


def run(graph, x, target):
    sess = ort.InferenceSession(graph.SerializeToString())
    return sess.run(["logits", "map"], {"image": x, "target": np.asarray(target, np.int64)})


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "gradcamelementwise", "shapleycam", "layerig",
                                    "saliency", "ig", "inputxgradient", "fullgrad"])
def test_exported_maps_equal_engine_maps(layout, method):
    model = tiny.conv_net(layout, seed=4)
    ex = onnxsal.Explainer(model, "cpu")
    x = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    if layout == "NHWC":
        x = x.transpose(0, 2, 3, 1).copy()
    logits, maps = run(export(model, method), x, [1, 2])
    assert maps.shape == (2, 16, 16) and logits.shape == (2, 3)
    for i, t in enumerate([1, 2]):
        res = ex.explain(x[i:i + 1], method, target=t, **({"steps": 32} if method in ("ig", "layerig") else {}))
        np.testing.assert_allclose(maps[i], res.map, atol=1e-5)
        np.testing.assert_allclose(logits[i], res.logits, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam", "shapleycam", "layerig", "saliency", "ig", "smoothgrad", "fullgrad"])
def test_one_target_serves_every_image(method):
    """target [c] for N images is target [c] * N, as explain_batch takes one target for all."""
    graph = export(tiny.conv_net(size=16, seed=4), method, n_samples=4, noise_level=0.0)
    x = np.random.default_rng(0).random((3, 3, 16, 16)).astype(np.float32)
    logits_one, maps_one = run(graph, x, [2])
    logits_all, maps_all = run(graph, x, [2, 2, 2])
    assert maps_one.shape == (3, 16, 16)
    np.testing.assert_allclose(maps_one, maps_all, atol=1e-6)
    np.testing.assert_allclose(logits_one, logits_all, atol=1e-6)
    with pytest.raises(Exception, match="Name:'target_must_be_one_or_one_per_image'"):  # neither one nor N
        run(graph, x, [2, 1])


@pytest.mark.parametrize("method", ["gradcam", "ig"])
@pytest.mark.parametrize("classes,softmax", [(3, True), (1, False)])
def test_a_target_out_of_range_fails_in_onnx_runtime(method, classes, softmax):
    """A one-hot row of class 99 is all zeros: without the check a service got a blank map and no
    error (and a single unit's 2t - 1 scored 5 as 9 times the logit). ONNX Runtime's error names
    the check that failed."""
    graph = export(tiny.conv_net(size=16, classes=classes, softmax=softmax), method)
    n = max(classes, 2)                                   # a single unit: classes 0 and 1
    x = np.random.default_rng(0).random((2, 3, 16, 16)).astype(np.float32)
    _, maps = run(graph, x, [0, n - 1])
    assert maps.shape == (2, 16, 16) and maps.reshape(2, -1).max(axis=1).min() > 0
    for target, check in (([n, 0], f"target_must_be_below_{n}"), ([0, 99], f"target_must_be_below_{n}"),
                          ([-1, 0], "target_must_be_0_or_more"), ([0, -n - 1], f"target_must_be_below_{n}")):
        with pytest.raises(Exception, match=f"Name:'{check}'.*out of data bounds"):
            run(graph, x, target)


def test_exported_smoothgrad_is_noisy_saliency():
    model = tiny.conv_net(seed=4)
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    _, sal = run(export(model, "saliency"), x, [1])
    _, quiet = run(export(model, "smoothgrad", noise_level=0.0, n_samples=4), x, [1])
    np.testing.assert_allclose(quiet, sal, atol=1e-6)
    logits, noisy = run(export(model, "smoothgrad", n_samples=64), x, [1])
    ref = onnxsal.Explainer(model, "cpu").explain(x, "smoothgrad", target=1, n_samples=64).map
    assert np.corrcoef(noisy.ravel(), ref.ravel())[0, 1] > 0.8


@pytest.mark.skipif(not os.path.exists(DEMO), reason="demo model not built")
def test_cli_export_runs_without_onnxsal(tmp_path):
    out = tmp_path / "demo.gradcam.onnx"
    assert main(["export", DEMO, "-m", "gradcam", "-o", str(out)]) == 0
    ex = onnxsal.Explainer(DEMO, "cpu")
    img = os.path.join(os.path.dirname(DEMO), "images")
    x = ex.prepare(os.path.join(img, sorted(os.listdir(img))[0])).tensor
    np.save(tmp_path / "x.npy", x)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, onnxruntime as ort
        sess = ort.InferenceSession({str(out)!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        logits, m = sess.run(None, {{"image": x, "target": np.array([int(sys.argv[1])], np.int64)}})
        assert "onnxsal" not in sys.modules
        np.save({str(tmp_path / 'map.npy')!r}, m)
    """)
    target = int(np.argmax(ex.predict(x)))
    r = subprocess.run([sys.executable, "-I", "-c", script, str(target)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ref = ex.explain(x, "gradcam", target=target).map
    np.testing.assert_allclose(np.load(tmp_path / "map.npy")[0], ref, atol=1e-5)


def test_export_refuses_unknown_method(tmp_path):
    from onnxsal.errors import MethodError

    with pytest.raises(MethodError, match="export supports"):
        export(tiny.conv_net(), "rise")


@pytest.mark.parametrize("as_mul_add", [False, True], ids=["batchnorm", "mul-add"])
def test_exported_fullgrad_with_batch_norm_layers(as_mul_add):
    from test_fullgrad import _bn_model

    model = _bn_model(as_mul_add)
    x = np.random.default_rng(3).standard_normal((1, 3, 12, 12)).astype(np.float32)
    _, maps = run(export(model, "fullgrad"), x, [2])
    ref = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, "fullgrad", target=2).map
    np.testing.assert_allclose(maps[0], ref, atol=1e-5)


def test_exported_layer_ig_refuses_a_layer_with_a_skip_connection_around_it(vit):
    """Layer IG's graph runs images and baselines to the layer and the path points after it, so a tail
    that also reads the input around the layer (a residual connection) cannot be batched that way."""
    from onnxsal.errors import LayerError

    _, model, ln1 = vit
    with pytest.raises(LayerError, match="other paths"):
        export(model, "layerig", ln1.output[0])


def test_a_free_batch_model_that_reads_across_its_batch_exports_no_stacked_method(tmp_path, capsys):
    """SmoothGrad's and IG's exported graphs run their copies of the image as rows of one batch; a
    model whose graph averages over the whole batch would mix them, so export refuses those and
    says how to use the single-pass ones."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(2).standard_normal((4, 3 * 8 * 8)).astype(np.float32)
    nodes = [helper.make_node("Abs", ["image"], ["a"]), helper.make_node("ReduceMean", ["a"], ["m"], keepdims=0),
             helper.make_node("Div", ["image", "m"], ["n"]), helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["y"], transB=1)]
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnxsal.errors.MethodError, match=r"reads across its batch \(a run of two images differed "
                       r"from each image run alone\); export gradcam or saliency, and give the exported graph one "
                       r"image per run"):
        export(model, "ig")
    x = np.random.default_rng(1).random((1, 3, 8, 8)).astype(np.float32)
    _, maps = run(export(model, "saliency"), x, [2])
    np.testing.assert_allclose(maps[0], onnxsal.Explainer(model, "cpu").explain(x, "saliency", target=2).map,
                               atol=1e-6)
