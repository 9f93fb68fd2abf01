"""Keras models under a mixed-precision policy (``mixed_float16``, ``mixed_bfloat16``).

Such a model keeps float32 variables and computes its layers in the half type; tf2onnx folds
each layer's weight cast, so the ONNX file holds half-precision weights and ops. onnxsal runs it
lifted to float32 (graph/precision.py), which is the float32 model with those rounded weights: the
reference here is that model, built from the same config under the float32 policy, and its
GradientTape gradient. The conversion check compares ONNX Runtime with TensorFlow's half-precision
run, so its tolerance follows the type the graph computes in.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from onnx import TensorProto, helper

import onnxsal

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tf():
    from converters.keras import import_tensorflow

    tf, _ = import_tensorflow()
    return tf


def _float32_policy(config):
    """A model config with every layer's dtype policy set to float32."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "DTypePolicyMap"):
            return "float32"
        return {k: "float32" if k == "dtype" and isinstance(v, (str, dict)) else _float32_policy(v)
                for k, v in config.items()}
    if isinstance(config, list):
        return [_float32_policy(v) for v in config]
    return config


def _half_model(policy: str):
    """Conv, exact GELU, bilinear upsampling (a float32-returning TensorFlow resize), separable conv,
    batch norm (computed in float32 by Keras), average pool, and a float32 head. Smooth throughout:
    the file's GELU multiplies by 1/sqrt(2) rounded to the half type (4e-5 apart from the float32
    network), which would flip a ReLU or a max pool near a tie."""
    import keras

    layers = keras.layers
    keras.mixed_precision.set_global_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        inp = keras.Input((12, 12, 3))
        x = layers.Conv2D(8, 3, padding="same")(inp)
        x = layers.Activation("gelu")(x)
        x = layers.UpSampling2D(2, interpolation="bilinear")(x)
        x = layers.SeparableConv2D(8, 3, strides=2, padding="same")(x)
        bn = layers.BatchNormalization()
        x = bn(x, training=False)
        rng = np.random.default_rng(1)
        bn.set_weights([rng.uniform(0.5, 1.5, 8), rng.uniform(-0.2, 0.2, 8), rng.uniform(-0.3, 0.3, 8),
                        rng.uniform(0.5, 2, 8)])
        x = layers.AveragePooling2D(2)(x)
        x = layers.GlobalAveragePooling2D()(x)
        return keras.Model(inp, layers.Dense(4, dtype="float32")(x))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _rounded_float32_model(model, half):
    """The same network under the float32 policy, with each half-precision layer's weights rounded to
    ``half`` as tf2onnx folds them; Keras's normalisation layers compute in float32 and keep theirs."""
    import keras

    ref = keras.Model.from_config(_float32_policy(model.get_config()))
    for mine, theirs in zip(model.layers, ref.layers):
        weights = mine.get_weights()
        if mine.compute_dtype != "float32" and "Normalization" not in type(mine).__name__:
            weights = [w.astype(half).astype(np.float32) for w in weights]
        theirs.set_weights(weights)
    assert all(layer.compute_dtype == "float32" for layer in ref.layers)
    return ref


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_model_converts_and_its_gradient_matches_the_float32_network(tf, tmp_path, caplog, policy):
    """Without the fixes the float16 file did not run (the GELU's ``1 - Erf`` subtracted a float16
    tensor from a float32 one, and tf2onnx's ``Resize`` returned float16 where TensorFlow's returns
    float32), the check refused a faithful conversion at 2e-4, and the bfloat16 file mixed float16
    casts with bfloat16 weights, which ONNX Runtime refused."""
    import ml_dtypes

    from converters.keras import convert

    half = {"mixed_float16": np.float16, "mixed_bfloat16": ml_dtypes.bfloat16}[policy]
    model = _half_model(policy)
    caplog.clear()
    res = convert(model, tmp_path / "m.onnx", preprocess="raw")
    # tf2onnx logged tracebacks (it cannot fold bfloat16 constants) and "Erfc is not supported"
    assert not [r for r in caplog.records if r.name.startswith("tf2onnx")]
    assert res.check <= {"mixed_float16": 1e-2, "mixed_bfloat16": 5e-2}[policy]
    types = {t.data_type for t in res.proto.graph.initializer}
    if policy == "mixed_float16":
        assert TensorProto.FLOAT16 in types
    else:   # tf2onnx types the casts float16 and the constants bfloat16: the file is lifted to float32
        assert not types & {TensorProto.FLOAT16, TensorProto.BFLOAT16}
        assert [n for n in res.notes if n.startswith("ONNX Runtime cannot run the model in bfloat16")]
    # tf2onnx's transpose optimiser stopped at the bfloat16 file's mixed casts, which left half the
    # layers channels-last (out of the layer map) behind four more transposes than the float16 file's
    assert sorted(res.layers) == sorted(layer.name for layer in model.layers[1:-2]), res.notes

    ex = onnxsal.Explainer(res.path, "cpu")
    # Keras computes the batch norm in float32, with casts on either side that copy float32 once
    # lifted: they cut the convolution off from it, and the default CAM layer was that convolution
    bn = next(layer.name for layer in model.layers if type(layer).__name__ == "BatchNormalization")
    assert ex.model.default_layer.tensor == res.layers[bn]
    x0 = np.random.default_rng(3).uniform(0, 1, (2, 12, 12, 3)).astype(np.float32)
    cot = np.random.default_rng(4).normal(size=(2, 4)).astype(np.float32)
    name = ex.model.input.name
    got = ex.engine.gradients(x0, cot, [name])[f"grad_{name}"]

    ref = _rounded_float32_model(model, half)
    xt = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        score = tf.reduce_sum(ref(xt, training=False) * cot)
    want = tape.gradient(score, xt).numpy()
    assert np.abs(got - want).max() <= 2e-4 * np.abs(want).max()
    cam = ex.explain(x0[:1], "gradcam")
    assert np.isfinite(cam.raw).all() and cam.raw.max() > 0


def _graph(cast_to: int):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    nodes = [helper.make_node("Cast", ["x"], ["h"], to=cast_to), helper.make_node("Cast", ["h"], ["y"], to=1)]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]))


@pytest.mark.parametrize("cast_to,tolerance,name", [(TensorProto.FLOAT, 1e-4, None),
                                                    (TensorProto.FLOAT16, 1e-2, "float16"),
                                                    (TensorProto.BFLOAT16, 5e-2, "bfloat16")])
def test_check_tolerance_follows_the_type_the_graph_computes_in(cast_to, tolerance, name):
    from converters import metadata
    from onnxsal.errors import ConversionError

    half = metadata.half_type(_graph(cast_to))
    assert metadata.check_tolerance(half) == tolerance
    want = np.array([[1.0, 2.0]])
    assert metadata.check_outputs(half, want * (1 + 0.9 * tolerance), want, "PyTorch") == pytest.approx(
        0.9 * tolerance)
    allows = f"allows {tolerance:g}" + (f" for a model that computes in {name})" if name else ")")
    with pytest.raises(ConversionError, match=r"disagree by .*" + re.escape(allows)):
        metadata.check_outputs(half, want * (1 + 1.1 * tolerance), want, "PyTorch")


def test_check_reads_non_finite_outputs():
    """Equal infinities or NaNs on both sides agree; a value finite on one side only is a refusal that
    says which side, instead of a NaN difference that passed any tolerance."""
    from converters import metadata
    from onnxsal.errors import ConversionError

    half = metadata.half_type(_graph(TensorProto.FLOAT16))
    finite = np.array([[1.0, 2.0]])
    both = np.array([[np.inf, np.nan]])
    assert metadata.check_outputs(half, both, both.copy(), "TensorFlow") == 0.0
    assert metadata.check_outputs(half, np.array([[np.inf, 2.0]]), np.array([[np.inf, 2.0]]), "TensorFlow") == 0.0
    with pytest.raises(ConversionError, match="^on the check input TensorFlow gives NaN or infinite outputs where "
                                              "ONNX Runtime's are finite for a model that computes in float16;"):
        metadata.check_outputs(half, finite, np.array([[np.nan, 2.0]]), "TensorFlow")
    with pytest.raises(ConversionError, match="^on the check input ONNX Runtime gives NaN or infinite outputs "
                                              "where TensorFlow's are finite"):
        metadata.check_outputs(half, np.array([[1.0, -np.inf]]), finite, "TensorFlow")
