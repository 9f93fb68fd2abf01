"""tf.gather(..., batch_dims=1) as tf2onnx writes it (a GatherND with batch_dims): a token-selection
network (each image keeps its own top-5 tokens of a conv feature map) converted by tf2onnx, its
saliency against tf.GradientTape of each class's logit."""

import numpy as np
import onnx
import pytest


def test_top_k_tokens_per_image_against_gradient_tape(tmp_path):
    tf = pytest.importorskip("tensorflow")
    tf2onnx = pytest.importorskip("tf2onnx")
    import onnxsal

    tf.random.set_seed(0)
    conv, dense = tf.keras.layers.Conv2D(6, 3, padding="same"), tf.keras.layers.Dense(4)
    conv.build((None, 8, 8, 3))
    dense.build((None, 6))

    @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.float32, name="image")])
    def net(x):
        tokens = tf.reshape(tf.nn.relu(conv(x)), [-1, 64, 6])
        top = tf.math.top_k(tf.reduce_sum(tokens, axis=-1), k=5).indices
        return dense(tf.reduce_mean(tf.gather(tokens, top, batch_dims=1), axis=1))

    proto, _ = tf2onnx.convert.from_function(net, input_signature=net.input_signature, opset=17)
    assert any(n.op_type == "GatherND" and any(a.name == "batch_dims" and a.i == 1 for a in n.attribute)
               for n in proto.graph.node)
    path = str(tmp_path / "tokens.onnx")
    onnx.save(proto, path)
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 3)).astype(np.float32)
    for c in range(4):
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = net(xt)[0, c]
        want = np.abs(tape.gradient(y, xt).numpy()[0]).max(axis=-1)
        np.testing.assert_allclose(ex.explain(x, "saliency", c).raw[0], want, rtol=1e-4, atol=1e-6 * want.max())
