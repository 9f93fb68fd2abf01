"""Loading and inspection: input layout, logits behind the softmax, candidate layers, bad models."""


import numpy as np
import onnx
import pytest

import onnxsal
from onnxsal.errors import LayerError, MissingFileError, ModelError, SizeError
from onnxsal.model import load

import tiny


def test_finds_input_logits_and_layers():
    m = load(tiny.conv_net())
    assert (m.input.name, m.input.layout, m.input.channels, m.input.size) == ("image", "NCHW", 3, (16, 16))
    assert m.output == "probs" and m.logits == "logits" and m.activation == "softmax"
    assert m.num_classes == 3 and m.labels == ["class0", "class1", "class2"]
    assert [layer.tensor for layer in m.layers] == ["conv1", "relu1", "conv2", "relu2"]
    assert m.default_layer.tensor == "relu2" and m.default_layer.shape == (6, 8, 8)


def test_nhwc_layout_detected():
    m = load(tiny.conv_net("NHWC"))
    assert m.input.layout == "NHWC" and m.input.channels == 3 and m.input.size == (16, 16)


def test_no_softmax_scores_output_itself():
    m = load(tiny.conv_net(softmax=False))
    assert m.logits == m.output == "logits" and m.activation is None


def test_layer_by_node_name_and_unknown_layer_lists_candidates():
    m = load(tiny.conv_net())
    assert m.find_layer("conv2").tensor == "conv2"
    with pytest.raises(LayerError, match="unknown layer 'nope'.*relu2"):
        m.find_layer("nope")


def test_batch_made_dynamic(tmp_path):
    m = load(tiny.conv_net(batch=1))
    dims = m.proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")


def test_dynamic_size_needs_a_size():
    model = tiny.conv_net(metadata=False)
    for ax in (2, 3):
        d = model.graph.input[0].type.tensor_type.shape.dim[ax]
        d.Clear()
        d.dim_param = "hw"
    with pytest.raises(SizeError, match="--size"):
        load(model)
    assert load(model, size=(20, 24)).input.size == (20, 24)


def test_missing_corrupt_and_non_onnx_files(tmp_path):
    with pytest.raises(MissingFileError):
        load(tmp_path / "none.onnx")
    good = tmp_path / "good.onnx"
    onnx.save(tiny.conv_net(), good)
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError):
        load(truncated)
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model")
    with pytest.raises(ModelError):
        load(text)


def test_model_without_image_input():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])])
    with pytest.raises(ModelError, match="no image-like input"):
        load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


def test_cam_on_dense_model_suggests_other_methods():
    ex = onnxsal.Explainer(tiny.dense_net(), "cpu")
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(LayerError, match="occlusion"):
        ex.explain(x, "scorecam")
    assert ex.explain(x, "occlusion").map.shape == (8, 8)


def test_split_is_exact():
    from onnxsal.graph.surgery import split
    import onnxruntime as ort

    m = load(tiny.conv_net())
    x = np.random.default_rng(1).random((3, 3, 16, 16)).astype(np.float32)
    full = ort.InferenceSession(m.proto.SerializeToString()).run(["probs"], {"image": x})[0]
    for at in ("relu1", "conv2", "relu2"):
        head, tail = split(m.proto, at, ["probs"])
        a = ort.InferenceSession(head.SerializeToString()).run(None, {"image": x})[0]
        y = ort.InferenceSession(tail.SerializeToString()).run(None, {at: a})[0]
        np.testing.assert_array_equal(y, full)


def test_split_refuses_when_a_path_bypasses_the_layer():
    from onnx import TensorProto, helper
    from onnxsal.graph.surgery import split

    w = onnx.numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [w])
    with pytest.raises(LayerError, match="other paths"):
        split(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), "c", ["y"])


def test_replace_keeps_paths_around_the_layer():
    """y = conv(x) + x with c replaced: the given c reaches y, the skip still reads the input x."""
    from onnx import TensorProto, helper
    import onnxruntime as ort

    w = onnx.numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    replaced = onnxsal.replace(model, "c", ["y"])
    assert [i.name for i in replaced.graph.input] == ["c", "x"]
    assert [n.op_type for n in replaced.graph.node] == ["Add"]
    rng = np.random.default_rng(0)
    c, x = rng.random((2, 1, 3, 4, 4)).astype(np.float32)
    (y,) = ort.InferenceSession(replaced.SerializeToString()).run(None, {"c": c, "x": x})
    np.testing.assert_array_equal(y, c + x)
    m = load(tiny.conv_net())                      # where the layer cuts the network, no image input is left
    assert [i.name for i in onnxsal.replace(m.proto, "relu1", ["probs"]).graph.input] == ["relu1"]
    with pytest.raises(LayerError, match="do not depend"):
        onnxsal.replace(m.proto, "relu1", ["conv1"])          # conv1 comes before relu1


def test_expose_gives_model_activations():
    from onnxsal.graph.surgery import expose
    import onnxruntime as ort

    m = load(tiny.conv_net())
    x = np.random.default_rng(2).random((2, 3, 16, 16)).astype(np.float32)
    sess = ort.InferenceSession(expose(m.proto, ["relu1", "logits"]).SerializeToString())
    relu1, logits = sess.run(None, {"image": x})
    ref = tiny.numpy_forward(m.proto, x)
    np.testing.assert_allclose(relu1, ref["relu1"], atol=1e-4)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4)


def test_model_without_final_activation_explains():
    ex = onnxsal.Explainer(tiny.conv_net(softmax=False), "cpu")
    res = ex.explain(np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32), "gradcam")
    np.testing.assert_array_equal(res.scores, res.logits)


def _paddle_reshape(x: str, out: str, rest: list[int]) -> tuple[list, list]:
    """paddle2onnx's reshape of ``x`` to (N, *rest), with N read at run time through an int32
    Cast (Shape -> Cast -> Slice -> Cast -> Concat), where ONNX's shape inference stops:
    the nodes and their constants."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Shape", [x], [out + "_shp"]),
             helper.make_node("Cast", [out + "_shp"], [out + "_shp32"], to=TensorProto.INT32),
             helper.make_node("Slice", [out + "_shp32", out + "_zero", out + "_one"], [out + "_n32"]),
             helper.make_node("Cast", [out + "_n32"], [out + "_n64"], to=TensorProto.INT64),
             helper.make_node("Concat", [out + "_n64", out + "_rest"], [out + "_target"], axis=0),
             helper.make_node("Reshape", [x, out + "_target"], [out])]
    inits = [numpy_helper.from_array(np.array([0], np.int32), out + "_zero"),
             numpy_helper.from_array(np.array([1], np.int32), out + "_one"),
             numpy_helper.from_array(np.array(rest, np.int64), out + "_rest")]
    return nodes, inits


def test_class_count_read_off_a_run_when_inference_loses_it():
    """paddle2onnx flattens the pooled features with a target built from Shape -> Cast(int32) ->
    Slice -> Cast(int64) -> Concat, where ONNX's shape inference stops; one run of the model tells."""
    from onnx import TensorProto, helper, numpy_helper

    base = tiny.conv_net(metadata=False, softmax=False)
    g = base.graph
    nodes = [n for n in g.node if n.op_type not in ("Flatten", "Gemm")]
    nodes += [
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wt"], ["mm"]),
        helper.make_node("Add", ["mm", "bf"], ["scores"]),
    ]
    reshape, consts = _paddle_reshape("scores", "logits", [-1])
    nodes += reshape + [helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    wf = numpy_helper.to_array(next(i for i in g.initializer if i.name == "wf"))
    inits = [i for i in g.initializer if i.name != "wf"] + [numpy_helper.from_array(wf.T.copy(), "wt")] + consts
    graph = helper.make_graph(nodes, "p", list(g.input), [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    dims = {v.name: v.type.tensor_type.shape.dim for v in inferred.graph.value_info}["logits"]
    assert not dims[1].HasField("dim_value")
    m = load(model, preprocess=onnxsal.Preprocess(preset="unit"))
    assert m.logits == "logits" and m.num_classes == 3


def test_old_opset_softmax_over_a_sequence_keeps_its_logits_batched():
    """A (N, T, C) output with Softmax over C at opset 11 comes out of the version converter as
    Flatten -> Softmax -> Reshape back (PP-OCR's recogniser). The logits are the (N, T, C) tensor
    before the Flatten, not the (N*T, C) one after it, so class t*C + c is step t's class c."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    T, C = 4, 5
    nodes = [helper.make_node("Conv", ["image", "w"], ["feat"], strides=[4, 4]),          # (N, C, 1, T)
             helper.make_node("Squeeze", ["feat"], ["seq"], axes=[2]),
             helper.make_node("Transpose", ["seq"], ["tcs"], perm=[0, 2, 1])]           # (N, T, C)
    # paddle2onnx's reshape to (N, -1, C): the version converter then knows no rank and takes
    # the Flatten path
    reshape, consts = _paddle_reshape("tcs", "tc", [-1, C])
    nodes += reshape + [helper.make_node("Softmax", ["tc"], ["probs"], axis=2)]
    graph = helper.make_graph(nodes, "rec", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 4, 4 * T])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [None, T, C])],
                              [numpy_helper.from_array(rng.normal(0, 1, (C, 3, 4, 4)).astype(np.float32), "w")] + consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 6
    m = load(model, preprocess=onnxsal.Preprocess(preset="unit"))
    assert "Flatten" in [n.op_type for n in m.proto.graph.node]
    assert m.logits == "tc" and m.num_classes == T * C
    ex = onnxsal.Explainer(model, "cpu", preprocess="unit")
    x = rng.random((1, 3, 4, 4 * T)).astype(np.float32)
    res = ex.explain(x, "saliency", target=T * C - 1, reduce="sum")
    w = numpy_helper.to_array(graph.initializer[0])
    want = np.zeros_like(x[0])
    want[:, :, 4 * (T - 1):] = w[C - 1]           # the last step's last class reads the last window
    np.testing.assert_allclose(res.raw[0], want.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_batch_freed_only_where_a_tensor_carries_it():
    """A leading 1 in a Reshape target is the batch only for tensors computed from the input: ONNX
    Runtime's dynamic quantiser reshapes each bias to (1, C, 1, 1), a broadcast axis."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {"W": rng.standard_normal((2, 3, 3, 3)), "b": rng.standard_normal(2), "bshape": np.array([1, 2, 1, 1]),
             "flat": np.array([1, -1]), "Wfc": rng.standard_normal((2 * 16 * 16, 5))}
    nodes = [helper.make_node("Conv", ["image", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["b", "bshape"], ["b4"]),
             helper.make_node("Add", ["c", "b4"], ["cb"]),
             helper.make_node("Relu", ["cb"], ["r"]),
             helper.make_node("Reshape", ["r", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "Wfc"], ["logits"])]
    g = helper.make_graph(nodes, "fixed", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
                          [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind == "i" else np.float32), k)
                           for k, v in inits.items()])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    m = load(model)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    batched = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    one = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = batched.run(None, {"image": x})[0]
    want = np.concatenate([one.run(None, {"image": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_integer_label_output_listed_first_is_not_scored():
    """Exports that list an ArgMax label before the probabilities: the probabilities are the output."""
    from onnx import TensorProto, helper

    from onnxsal import Explainer

    plain = tiny.conv_net()
    labelled = tiny.conv_net()
    g = labelled.graph
    g.node.append(helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0))
    outs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])] + list(g.output)
    del g.output[:]
    g.output.extend(outs)
    m = load(labelled)
    assert (m.output, m.logits, m.num_classes) == ("probs", "logits", 3)
    image = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for method in ("saliency", "scorecam", "rise"):
        a = Explainer(labelled).explain(image, method=method).map
        b = Explainer(plain).explain(image, method=method).map
        np.testing.assert_array_equal(a, b)
    only_label = tiny.conv_net()
    only_label.graph.node.append(helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0))
    del only_label.graph.output[:]
    only_label.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
    m = load(only_label)                         # the label alone: the scores its ArgMax picks from
    assert (m.output, m.logits, m.num_classes) == ("probs", "logits", 3)
    assert m.output_note.startswith("label is the ArgMax of 3 class scores (probs)")
    rounded = tiny.conv_net()                    # integers that are no ArgMax's pick name no class
    rounded.graph.node.append(helper.make_node("Cast", ["probs"], ["label"], to=TensorProto.INT64))
    del rounded.graph.output[:]
    rounded.graph.output.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N", 3]))
    with pytest.raises(ModelError, match=r"no floating-point output to score; its outputs: label \(int64\)"):
        load(rounded)


def test_weights_in_an_external_file(tmp_path):
    """Models over 2 GB must keep their weights beside them: read them, and name a missing or short file."""
    import onnxruntime as ort

    model = tiny.conv_net()
    onnx.save(tiny.conv_net(), tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)      # (saving this way moves a proto's weights out)
    m = load(tmp_path / "ext.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    inline = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    loaded = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(loaded.run(["probs"], {"image": x})[0], inline.run(["probs"], {"image": x})[0])
    data = (tmp_path / "ext.weights").read_bytes()
    (tmp_path / "ext.weights").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="shorter than the weights .* truncated"):
        load(tmp_path / "ext.onnx")
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(MissingFileError, match="are in 'ext.weights', which is not next to it"):
        load(tmp_path / "ext.onnx")


@pytest.mark.parametrize("op,attrs,opset", [
    ("ImageScaler", {"scale": 1 / 255, "bias": [-0.5, 0.1, 0.2]}, 8),
    ("ImageScaler", {"scale": 2.0, "bias": [1.0, 2.0, 3.0]}, 6),
    ("Affine", {"alpha": 0.5, "beta": -1.0}, 8),
    ("ScaledTanh", {"alpha": 2.0, "beta": 0.7}, 8),
    ("ParametricSoftplus", {"alpha": 1.5, "beta": 0.8}, 8),
    ("Crop", {"border": [1, 0, 0, 2]}, 8),
    ("Crop", {"border": [1, 1, 0, 0], "scale": [2, 3]}, 8),
])
def test_experimental_ops_of_old_opsets_are_written_as_standard_ones(op, attrs, opset):
    """The ONNX model zoo's emotion-ferplus-8 scales its input with ImageScaler, dropped at opset 10;
    the version converter has no schema for it, so these are written out before upgrading."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gradcheck import check_vjp

    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node(op, ["x"], ["s"], **attrs), helper.make_node("Conv", ["s", "w"], ["y"])]
    g = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                         helper.make_tensor_value_info("w", TensorProto.FLOAT, [2, 3, 1, 1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 3
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = load(model)
    assert op not in {n.op_type for n in m.proto.graph.node}
    got = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    check_vjp(m.proto, "y", ["x"], {"x": x})


@pytest.mark.parametrize("attrs,source", [({"value": 2.0}, "x"), ({"value": 0.5, "input_as_shape": 1}, "shape"),
                                          ({"value": -3.0, "input_as_shape": 1, "extra_shape": [4]}, "shape3"),
                                          ({"value": 1.5, "shape": [1, 3, 4, 4]}, None)])
def test_constant_fill_of_old_opsets_becomes_constant_of_shape(attrs, source):
    """torch.onnx writes `torch.ones_like` at opsets 7 and 8 as the experimental ConstantFill, which
    ONNX Runtime does not run: each of its forms is written as a ConstantOfShape of that shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gradcheck import check_vjp

    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape"], ["shape3"], starts=[0], ends=[3])]
    nodes.append(helper.make_node("ConstantFill", [source] if source else [], ["fill"], **attrs))
    nodes.append(helper.make_node("Mul", ["x", "fill"], ["xf"]))
    nodes.append(helper.make_node("Mul", ["xf", "x"], ["y"]))
    g = helper.make_graph(nodes, "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    x = np.random.default_rng(4).standard_normal((1, 3, 4, 4)).astype(np.float32)
    with pytest.raises(Exception, match="ConstantFill"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    m = load(model)
    assert "ConstantFill" not in {n.op_type for n in m.proto.graph.node}
    got = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, x * x * attrs["value"], rtol=1e-6)
    check_vjp(m.proto, "y", ["x"], {"x": x})


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_an_old_pad_s_idle_value_does_not_survive_the_upgrade(mode):
    """A Pad of opsets 2-10 may carry a `value` that its reflect or edge mode ignores; the version
    converter keeps it, and opset 11's Pad has no such attribute, so the upgraded graph would not load."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gradcheck import check_vjp

    g = helper.make_graph([helper.make_node("Pad", ["x"], ["y"], pads=[0, 0, 1, 2, 0, 0, 2, 1], mode=mode, value=0.5)],
                          "old", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 2)])
    model.ir_version = 3
    x = np.random.default_rng(6).standard_normal((1, 3, 4, 5)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = load(model)
    got = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, want)
    check_vjp(m.proto, "y", ["x"], {"x": x})


def test_per_activation_batch_norm_of_old_opsets_is_written_out():
    """BatchNormalization with spatial=0 (opsets 1-8: statistics per activation) has no opset-9 form."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from gradcheck import check_vjp

    rng = np.random.default_rng(5)
    stats = {"s": rng.uniform(0.5, 1.5, (3, 4, 4)), "b": rng.standard_normal((3, 4, 4)),
             "m": rng.standard_normal((3, 4, 4)) * 0.1, "v": rng.uniform(0.5, 1.5, (3, 4, 4))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in stats.items()]
    g = helper.make_graph([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0,
                                            epsilon=1e-3)], "old",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])] +
                          [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, [3, 4, 4]) for i in inits],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    m = load(model)
    assert [i.name for i in m.proto.graph.input] == ["x"]     # the statistics are constants, not inputs, now
    got = ort.InferenceSession(m.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    out = check_vjp(m.proto, "y", ["x"], {"x": x})
    assert np.abs(out["grad_x"]).max() > 0


def test_weights_kept_as_inputs_become_constants(tmp_path):
    """torch.onnx's keep_initializers_as_inputs lists every weight as a graph input too; ONNX Runtime
    then neither folds nor fuses them. onnxsal keeps them as constants only."""
    import warnings

    import torch
    import torch.nn as nn

    from gradcheck import assert_matches_torch, run
    from onnxsal.graph.autodiff import vjp

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), path, dynamo=False, opset_version=17,
                          keep_initializers_as_inputs=True, input_names=["x"], output_names=["y"])
    assert len(onnx.load(path).graph.input) > 1
    m = load(path)
    assert [i.name for i in m.proto.graph.input] == ["x"]
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    cot = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    out = run(vjp(m.proto, m.logits, ["x"]), {"x": x, f"grad_{m.logits}": cot})
    for p in net.parameters():
        p.requires_grad_(False)
    assert_matches_torch(out, m.logits, "grad_x", net, x, cot)


def test_a_dim_written_as_minus_one_is_free(tmp_path):
    """paddle2onnx's older releases write a dynamic batch as -1 (PP-OCR's direction classifier): read
    as a size, the run that reads shapes at the file's batch failed inside NumPy."""
    import warnings

    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return torch.softmax(self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], -1)), 1)

    path = tmp_path / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(path), input_names=["x"], output_names=["p"],
                          opset_version=13, dynamo=False, dynamic_axes={"x": {0: "n"}, "p": {0: "n"}})
    model = onnx.load(str(path))
    assert any(n.op_type == "Shape" for n in model.graph.node)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    want = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, "gradcam", 1).raw
    for vi in (model.graph.input[0], model.graph.output[0]):
        d = vi.type.tensor_type.shape.dim[0]
        d.Clear()
        d.dim_value = -1
    kept = model.SerializeToString()
    got = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, "gradcam", 1).raw
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert model.SerializeToString() == kept              # the caller's proto as it was
