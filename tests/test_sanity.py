"""Sanity checks: the similarity measures against hand-computed values and scikit-image, the weight
randomisation (exactly the intended initializers, nothing else, input untouched), and the paper's
result on the demo model."""

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tiny
from onnxsal import Explainer
from onnxsal.cli import main
from onnxsal.evaluate import similarity as sim
from onnxsal.evaluate.randomize import blocks_of, cascade, draw_like, randomize, weight_layers
from onnxsal.evaluate.sanity import SanityReport, Step, sanity_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "demo", "demo_shapes.onnx")
DEMO_IMAGES = os.path.join(ROOT, "models", "demo", "images")


def inits(proto):
    return {i.name: numpy_helper.to_array(i).copy() for i in proto.graph.initializer}


# similarity ---------------------------------------------------------------------------------

def test_rankdata_averages_ties():
    assert sim.rankdata(np.array([10, 20, 20, 5])).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_spearman_hand_values():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([[1.0, 3.0], [2.0, 4.0]])
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) with d = (0, -1, 1, 0): 1 - 12 / 60
    assert sim.spearman(a, b) == pytest.approx(0.8)
    assert sim.spearman(a, -a) == pytest.approx(-1.0)
    signed = np.array([[-3.0, 1.0], [2.0, -4.0]])
    assert sim.spearman_abs(signed, np.abs(signed)) == pytest.approx(1.0)
    # signed ranks (2, 3, 4, 1) vs (3, 1, 2, 4): d = (-1, 2, 2, -3), sum d^2 = 18 -> 1 - 108/60
    assert sim.spearman(signed, np.abs(signed)) == pytest.approx(1 - 6 * 18 / 60)


def test_correlation_with_a_constant_map_is_zero():
    a = np.arange(16.0).reshape(4, 4)
    assert sim.spearman(a, np.zeros((4, 4))) == 0.0
    assert sim.pearson(np.ones(5), np.ones(5)) == 1.0


def test_ssim_of_constant_maps_in_closed_form():
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    c1 = 0.01 ** 2
    # no variance: only the luminance term (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) is left
    assert sim.ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1))
    rng = np.random.default_rng(0)
    x = rng.random((20, 24))
    assert sim.ssim(x, x) == pytest.approx(1.0)


def test_hog_of_a_vertical_edge_by_hand():
    img = np.zeros((24, 24))
    img[:, 12:] = 1.0
    f = sim.hog(img)
    # one block of 3x3 cells; central differences are 1 on columns 11 and 12 (orientation 0),
    # so the middle cell column has 2*8/64 = 0.25 in bin 0 of its three cells; L2 -> 0.577,
    # clipped to 0.2, renormalised -> 1/sqrt(3)
    expected = np.zeros((3, 3, 9))
    expected[:, 1, 0] = 1 / np.sqrt(3)
    assert f.shape == (81,)
    np.testing.assert_allclose(f, expected.ravel(), atol=1e-6)


def test_ssim_and_hog_match_scikit_image():
    skimage = pytest.importorskip("skimage")
    from skimage.feature import hog
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(1)
    for shape in [(64, 64), (40, 57)]:
        a = rng.random(shape)
        b = np.clip(a + rng.normal(0, 0.3, shape), 0, 1)
        ref = structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert sim.ssim(a, b) == pytest.approx(ref, abs=1e-10)
        np.testing.assert_allclose(sim.hog(a), hog(a), atol=1e-6)
    assert skimage is not None


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    a = rng.integers(0, 5, (8, 8)).astype(float)   # many ties
    b = rng.random((8, 8))
    assert sim.spearman(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0])


# randomisation ------------------------------------------------------------------------------

def test_weight_layers_of_the_tiny_net_in_topological_order():
    layers = weight_layers(tiny.conv_net())
    assert [layer.name for layer in layers] == ["conv1", "conv2", "fc"]
    assert [layer.initializers for layer in layers] == [("w1", "b1"), ("w2", "b2"), ("wf", "bf")]
    steps = cascade(layers)
    assert [[x.name for x in s] for s in steps] == [["fc"], ["fc", "conv2"], ["fc", "conv2", "conv1"]]


def test_a_deformable_convolution_is_a_weight_layer():
    """Its weight and bias are drawn; the Conv that predicts its offsets is a layer of its own."""
    rng = np.random.default_rng(0)
    arrays = {"w_off": rng.normal(0, 0.3, (18, 3, 3, 3)), "w": rng.normal(0, 1, (4, 3, 3, 3)), "b": rng.normal(0, 1, 4),
              "wf": rng.normal(0, 1, (5, 4)), "hw": np.array([2, 3])}
    nodes = [helper.make_node("Conv", ["image", "w_off"], ["off"], pads=[1, 1, 1, 1], name="offsets"),
             helper.make_node("DeformConv", ["image", "w", "off", "b"], ["d"], pads=[1, 1, 1, 1], name="deform"),
             helper.make_node("ReduceMean", ["d", "hw"], ["m"], keepdims=0, name="mean"),
             helper.make_node("Gemm", ["m", "wf"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "dcn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5])],
                              [numpy_helper.from_array(v.astype(np.int64 if k == "hw" else np.float32), k)
                               for k, v in arrays.items()])
    layers = weight_layers(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]))
    assert [(layer.name, layer.initializers) for layer in layers] == [("offsets", ("w_off",)), ("deform", ("w", "b")),
                                                                      ("fc", ("wf",))]


def bn_matmul_net() -> onnx.ModelProto:
    """Conv + unfolded BatchNorm, MatMul (transposed weight) + bias Add, a constant scalar Mul."""
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(0, 1, (4, 3, 3, 3)), "gamma": rng.normal(1, 0.1, 4), "beta": rng.normal(0, 0.1, 4),
        "mu": rng.normal(0, 0.1, 4), "var": rng.uniform(0.5, 1.5, 4), "wt": rng.normal(0, 1, (5, 4)),
        "bias": rng.normal(0, 1, 5), "half": np.array(0.5),
    }
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mu", "var"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Transpose", ["wt"], ["wtt"], perm=[1, 0], name="tw"),
        helper.make_node("MatMul", ["f", "wtt"], ["mm"], name="fc"),
        helper.make_node("Add", ["mm", "bias"], ["a"], name="fc_bias"),
        helper.make_node("Mul", ["a", "half"], ["logits"], name="scale"),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, 5])],
                              [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="onnxsal.preprocess", value=json.dumps({"preset": "unit"}))
    onnx.checker.check_model(model)
    return model


def test_conv_and_its_batchnorm_are_one_layer_and_constants_are_left_alone():
    layers = weight_layers(bn_matmul_net())
    assert [(x.name, x.nodes, x.initializers) for x in layers] == [
        ("conv", ("conv", "bn"), ("w", "gamma", "beta")),     # running mean/var are statistics, not weights
        ("fc", ("fc", "fc_bias"), ("wt", "bias")),             # traced through the Transpose; "half" is a constant
    ]


@pytest.mark.parametrize("which", [[0], [1], [0, 1]])
def test_randomize_touches_exactly_the_intended_initializers(which):
    model = bn_matmul_net()
    before = model.SerializeToString()
    layers = weight_layers(model)
    chosen = [layers[i] for i in which]
    new = randomize(model, chosen, seed=3)
    assert model.SerializeToString() == before            # the input proto is not modified
    old, now = inits(model), inits(new)
    intended = {name for layer in chosen for name in layer.initializers}
    changed = {k for k in old if not np.array_equal(old[k], now[k])}
    assert changed == intended
    for k in intended:
        assert now[k].dtype == old[k].dtype and now[k].shape == old[k].shape
    # the graph itself is the same
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in model.graph.node]
    # seeded: the same draw twice, a layer's draw independent of the others randomised with it
    again = inits(randomize(model, chosen, seed=3))
    assert all(np.array_equal(again[k], now[k]) for k in now)
    alone = inits(randomize(model, [chosen[-1]], seed=3))
    assert all(np.array_equal(alone[k], now[k]) for k in chosen[-1].initializers)


def test_new_weights_follow_each_tensors_mean_and_std():
    rng = np.random.default_rng(0)
    w = rng.normal(0.3, 2.0, (64, 32, 3, 3)).astype(np.float32)
    new = draw_like(w, np.random.default_rng(1))
    assert new.dtype == np.float32 and new.shape == w.shape
    assert new.mean() == pytest.approx(w.mean(), abs=0.05)
    assert new.std() == pytest.approx(w.std(), rel=0.03)
    assert abs(np.corrcoef(new.ravel(), w.ravel())[0, 1]) < 0.05
    const = draw_like(np.zeros(10, np.float32), np.random.default_rng(1))
    assert np.ptp(const) > 0   # a constant tensor still changes


def test_quantised_weights_are_layers_and_are_drawn_on_their_grid(tmp_path):
    """A QDQ model's weights are integers behind DequantizeLinear: they are its layers' weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    onnx.save(tiny.conv_net(batch=1, softmax=False), tmp_path / "float.onnx")

    class Images(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"image": np.random.default_rng(k).standard_normal((1, 3, 16, 16)).astype(np.float32)}
                            for k in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), Images(), quant_format=QuantFormat.QDQ)
    model = onnx.load(tmp_path / "q.onnx")
    layers = weight_layers(model)
    assert [x.op_type for x in layers] == ["Conv", "Conv", "Gemm"]
    old = inits(model)
    assert all(old[w].dtype.kind in "iu" for x in layers for w in x.initializers)
    new = inits(randomize(model, layers[-1:], seed=1))
    for w in layers[-1].initializers:
        info = np.iinfo(old[w].dtype)
        assert new[w].dtype == old[w].dtype and not np.array_equal(new[w], old[w])
        assert new[w].min() >= info.min and new[w].max() <= info.max
    assert all(np.array_equal(new[w], old[w]) for x in layers[:-1] for w in x.initializers)
    weights8 = np.random.default_rng(0).integers(-100, 100, 4096).astype(np.int8)
    drawn = draw_like(weights8, np.random.default_rng(2))
    assert drawn.dtype == np.int8 and drawn.std() == pytest.approx(weights8.std(), rel=0.05)


def test_dynamically_quantised_weights_are_layers(tmp_path):
    """quantize_dynamic's ConvInteger/MatMulInteger weights, as onnxsal writes them (a Cast and a
    zero point subtracted before a float Conv or MatMul), are the layers' weights too."""
    from onnxruntime.quantization import quantize_dynamic

    from onnxsal.model import load

    onnx.save(tiny.conv_net(batch=1, softmax=False), tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dyn.onnx"))
    model = load(str(tmp_path / "dyn.onnx")).proto
    layers = weight_layers(model)
    assert [x.op_type for x in layers] == ["Conv", "Conv", "MatMul"]
    old = inits(model)
    assert all(old[w].dtype == np.int8 for x in layers for w in x.initializers[:1])
    new = inits(randomize(model, layers[:1], seed=1))
    assert not np.array_equal(new[layers[0].initializers[0]], old[layers[0].initializers[0]])


def test_blocks_keep_order_and_cover_every_layer():
    layers = list(range(10))
    blocks = blocks_of(layers, 4)
    assert len(blocks) == 4 and sum(blocks, []) == layers
    assert blocks_of(layers, None) == [[i] for i in layers]


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_sanity_check_on_the_tiny_net_leaves_the_model_file_unchanged(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), path)
    digest = sha(path)
    ex = Explainer(str(path), "cpu")
    proto_before = ex.model.proto.SerializeToString()
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    rep = sanity_check(ex, [x], ["saliency", "occlusion"], options={"occlusion": {"window": 4}})
    assert sha(path) == digest
    assert ex.model.proto.SerializeToString() == proto_before
    assert [(s.mode, s.index, s.layers) for s in rep.steps] == [
        ("cascading", 1, ("fc",)), ("cascading", 2, ("fc", "conv2")), ("cascading", 3, ("fc", "conv2", "conv1")),
        ("independent", 1, ("fc",)), ("independent", 2, ("conv2",)), ("independent", 3, ("conv1",))]
    for m in rep.methods:
        # the first cascading step and the first independent step are the same model
        np.testing.assert_allclose(rep.scores[(m, 0)], rep.scores[(m, 3)])
        assert rep.scores[(m, 2)].shape == (1, 4)
        assert np.all(np.abs(rep.scores[(m, 2)]) <= 1.0 + 1e-9)


def test_sanity_check_on_an_nhwc_model():
    ex = Explainer(tiny.conv_net(layout="NHWC", size=16), "cpu")
    x = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    rep = sanity_check(ex, [x], ["gradcam"], modes=("cascading",))
    assert [layer.name for layer in rep.layers] == ["conv1", "conv2", "fc"]
    assert rep.original["gradcam"].shape == (1, 16, 16) and len(rep.verdicts()) == 1


def test_the_permuted_model_reads_the_same_several_layers():
    """A CAM over several layers runs over the same layers on the permuted-label model, not its default."""
    ex = Explainer(tiny.conv_net(size=16), "cpu")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    twin = Explainer(tiny.conv_net(size=16), "cpu")
    rep = sanity_check(ex, [x], ["gradcam"], modes=(), permuted=twin, layer=["relu1", "relu2"])
    np.testing.assert_allclose(rep.scores[("gradcam", 0)], 1.0, atol=1e-6)
    assert rep.original["gradcam"].shape == (1, 16, 16)


def test_a_figure_that_cannot_be_written_is_an_output_error(tmp_path):
    from onnxsal.errors import OutputError
    from onnxsal.evaluate.sanity import figure

    ex = Explainer(tiny.conv_net(size=16), "cpu")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    rep = sanity_check(ex, [x], ["saliency"], modes=("cascading",), max_steps=1)
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(OutputError, match=r"cannot write '.*plain/fig.png': Not a directory"):
        figure(str(tmp_path / "plain" / "fig.png"), rep)
    figure(str(tmp_path / "fig.png"), rep)
    assert (tmp_path / "fig.png").stat().st_size > 0
    from onnxsal.evaluate.commands import curves_figure
    from onnxsal.evaluate.faithfulness import evaluate

    scores = evaluate(ex, [x], ["saliency"], step=64)
    with pytest.raises(OutputError, match=r"cannot write '.*plain/curves.png': Not a directory"):
        curves_figure(str(tmp_path / "plain" / "curves.png"), scores)


def test_identical_models_are_perfectly_similar():
    ex = Explainer(tiny.conv_net(size=16), "cpu")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    twin = Explainer(tiny.conv_net(size=16), "cpu")       # the "permuted" model is the same model
    rep = sanity_check(ex, [x], ["saliency"], modes=(), permuted=twin)
    assert [s.mode for s in rep.steps] == ["data"]
    np.testing.assert_allclose(rep.scores[("saliency", 0)], 1.0, atol=1e-6)
    (v,) = rep.verdicts()
    assert v.mode == "data" and not v.passed and "1.00 >= 0.5 on the permuted-label model" in v.text


def test_verdict_asks_whether_the_map_changes_within_the_top_half():
    steps = [Step("cascading", i + 1, f"l{i}", tuple(f"l{j}" for j in range(i + 1))) for i in range(5)]
    rep = SanityReport("m", ["a", "b", "c"], ["x", "y"], [None] * 5, steps, 0.5, {})
    # mean Spearman(abs) per step: the verdict looks at steps 1 and 2 (5 // 2)
    curves = {"a": [0.9, 0.25, 0.8, 0.8, 0.8],     # changes at step 2: pass
              "b": [0.3, 0.9, 0.9, 0.9, 0.9],      # changes at step 1: pass
              "c": [0.9, 0.55, 0.1, 0.0, 0.0]}     # changes only at step 3: fail
    for m, curve in curves.items():
        for k, v in enumerate(curve):
            rep.scores[(m, k)] = np.array([[0, v - 0.05, 0, 0], [0, v + 0.05, 0, 0]])
    a, b, c = rep.verdicts()
    assert (a.passed, round(a.value, 3), a.depth, a.limit, a.total) == (True, 0.25, 2, 2, 5)
    assert (b.passed, round(b.value, 3), b.depth) == (True, 0.3, 1)
    assert (c.passed, round(c.value, 3)) == (False, 0.55)
    assert "0.25 < 0.5" in a.text and "top 2 of 5" in a.text
    assert ">= 0.5" in c.text and "lowest 0.55" in c.text


# the command --------------------------------------------------------------------------------

def test_sanity_command_writes_tables_figure_csv_json(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), path)
    digest = sha(path)
    Image.fromarray((np.random.default_rng(0).random((24, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "cat.png")
    out = tmp_path / "o"
    code = main(["sanity", str(path), str(tmp_path / "cat.png"), "-m", "saliency", "-m", "occlusion",
                 "-O", "window=4", "--out", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0
    assert sha(path) == digest
    assert sorted(os.listdir(out)) == ["sanity.csv", "sanity.json", "sanity_cat.png"]
    assert "verdicts" in text and "Spearman(abs)" in text and ("< 0.5" in text or ">= 0.5" in text)
    summary = json.loads((out / "sanity.json").read_text())
    assert summary["threshold"] == 0.5 and summary["verdict_measure"] == "spearman_abs"
    assert [layer["name"] for layer in summary["layers"]] == ["conv1", "conv2", "fc"]
    assert len(summary["methods"]["saliency"]["cascading"]) == 3
    lines = (out / "sanity.csv").read_text().splitlines()
    assert lines[0].startswith("method,mode,step,label,layers,image,spearman")
    assert len(lines) == 1 + 2 * 6


def test_sanity_command_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), path)
    code = main(["sanity", str(path), str(tmp_path / "none.png"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "image not found" in err and len(err.splitlines()) == 1
    code = main(["sanity", str(path), str(tmp_path), "--mode", "sideways"])
    assert code != 0 and "--mode" in capsys.readouterr().err


# the paper's result on the demo model -------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(DEMO), reason="demo model not built")
def test_demo_model_reproduces_the_paper():
    """Vanilla gradients and Grad-CAM change when the model is randomised; Guided Backprop does not."""
    ex = Explainer(DEMO, "cpu")
    images = [os.path.join(DEMO_IMAGES, f) for f in ("00_circle.png", "01_square.png", "02_triangle.png", "03_cross.png")]
    rep = sanity_check(ex, images, ["gradcam", "saliency", "guidedbackprop"], modes=("cascading",))
    verdicts = {v.method: v for v in rep.verdicts()}
    assert verdicts["gradcam"].passed and verdicts["saliency"].passed
    assert not verdicts["guidedbackprop"].passed


PERMUTED = os.path.join(ROOT, "models", "demo", "demo_shapes_permuted.onnx")


@pytest.mark.skipif(not os.path.exists(PERMUTED), reason="permuted-label demo model not built")
def test_demo_maps_change_on_the_permuted_label_model():
    ex = Explainer(DEMO, "cpu")
    twin = Explainer(PERMUTED, "cpu")
    images = [os.path.join(DEMO_IMAGES, f) for f in ("00_circle.png", "01_square.png", "02_triangle.png", "03_cross.png")]
    rep = sanity_check(ex, images, ["gradcam", "saliency"], modes=(), permuted=twin)
    assert all(v.mode == "data" and v.passed for v in rep.verdicts())
