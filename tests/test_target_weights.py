"""Weighted targets: score = sum(w * output), e.g. a class channel's mask on a segmentation model
(pytorch-grad-cam's SemanticSegmentationTarget).

Gradient methods are checked against torch.autograd of the weighted sum; perturbation methods
against the same model with the weighted sum built into its graph and an ordinary class target.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import TargetError

from hooks import kept
from test_gradient_methods import ref_cams


def seg_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 3, 1)).eval()


def exported(net: nn.Module, path, output: str) -> str:
    """``net`` written to ``path`` by the TorchScript exporter: input "image" (1, 3, 16, 16)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"], output_names=[output],
                          opset_version=17, dynamo=False)
    return str(path)


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    net = seg_net()
    path = tmp_path_factory.mktemp("seg") / "seg.onnx"
    exported(net, str(path), "masks")
    weights = np.zeros((3, 16, 16), np.float32)
    weights[1, 3:9, 5:12] = 1.0                      # class 1 inside a box
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    return net, onnx.load(str(path)), weights, x


def with_score_head(model: onnx.ModelProto, weights: np.ndarray) -> onnx.ModelProto:
    """The model plus an output 'score' (N, 1) = sum(weights * masks), in its own graph."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    g = m.graph
    g.initializer.extend([numpy_helper.from_array(weights[None], "w_head"),
                          numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes_head")])
    g.node.extend([helper.make_node("Mul", ["masks", "w_head"], ["weighted"]),
                   helper.make_node("ReduceSum", ["weighted", "axes_head"], ["score"], keepdims=0),
                   helper.make_node("Unsqueeze", ["score", "axes_one"], ["score2"])])
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axes_one"))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("score2", TensorProto.FLOAT, [1, 1]))
    return m


def test_gradients_and_cams_match_torch(seg):
    net, model, weights, x = seg
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    xt = torch.tensor(x, requires_grad=True)
    with kept(net[3]) as store:
        out = net(xt)
    (out * torch.tensor(weights)).sum().backward()
    sal = ex.explain(x, "saliency", target=weights)
    np.testing.assert_allclose(sal.raw[0], xt.grad.abs().amax(dim=1)[0].numpy(), rtol=1e-4, atol=1e-6)
    assert sal.targets[0].label == "weights"
    relu2 = [n for n in model.graph.node if n.op_type == "Relu"][1].output[0]
    expected = ref_cams(store["a"].detach().numpy()[0], store["a"].grad.numpy()[0])
    for name in ("gradcam", "layercam", "hirescam"):
        got = ex.explain(x, name, target=weights, layer=relu2).raw[0]
        np.testing.assert_allclose(got, expected[name], rtol=1e-3, atol=1e-4 * np.abs(expected[name]).max(), err_msg=name)


@pytest.mark.parametrize("method,opts", [("occlusion", {"window": 4}), ("scorecam", {}), ("ablationcam", {}),
                                         ("ig", {"steps": 8})])
def test_weights_equal_the_score_built_into_the_graph(seg, method, opts):
    _, model, weights, x = seg
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    headed = onnxsal.Explainer(with_score_head(model, weights), "cpu", preprocess="raw")
    relu2 = [n for n in model.graph.node if n.op_type == "Relu"][1].output[0]
    layer = {"layer": relu2} if method.endswith("cam") else {}
    ours = ex.explain(x, method, target=weights, **layer, **opts)
    ref = headed.explain(x, method, target=1, **layer, **opts)      # one output unit: class 1 is +output
    np.testing.assert_allclose(ours.raw, ref.raw, rtol=1e-4, atol=1e-5 * np.abs(ref.raw).max())


def test_bad_weights_are_refused(seg, tmp_path, capsys):
    _, model, weights, x = seg
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    with pytest.raises(TargetError, match="hold 10 values"):
        ex.explain(x, "saliency", target=np.ones(10, np.float32))
    bad = weights.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(TargetError, match="finite"):
        ex.explain(x, "saliency", target=bad)
    path = tmp_path / "seg.onnx"
    onnx.save(model, str(path))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", weights)
    base = ["explain", str(path), str(tmp_path / "x.npy"), "-m", "saliency", "--out", str(tmp_path / "out")]
    assert main(base + ["--target-weights", str(tmp_path / "nope.npy")]) != 0
    assert main(base + ["--target-weights", str(tmp_path / "w.npy"), "--target", "1"]) != 0
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    assert main(base + ["--target-weights", str(tmp_path / "junk.npy")]) != 0
    err = capsys.readouterr().err
    assert "not found" in err and "not both" in err and "cannot read" in err and "Traceback" not in err
    assert main(base + ["--target-weights", str(tmp_path / "w.npy")]) == 0
    assert (tmp_path / "out" / "x.saliency.png").exists()


def test_default_layer_is_not_the_scored_maps(seg):
    _, model, weights, x = seg
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    relu2 = [n for n in model.graph.node if n.op_type == "Relu"][1].output[0]
    assert ex.model.layers[-1].tensor == ex.model.logits          # the 1x1 classifier's output is a candidate
    assert ex.model.default_layer.tensor == relu2
    res = ex.explain(x, "gradcam", target=weights)
    assert res.layer == relu2


def test_cams_on_the_scored_maps_themselves(seg):
    """--layer may name the output tensor: its gradient is the seed itself, so Grad-CAM weighs
    each class map by the mean of its weights."""
    _, model, weights, x = seg
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    res = ex.explain(x, "gradcam", target=weights, layer=ex.model.logits)
    (masks,) = ex.engine.outputs(x, [ex.model.logits])
    expected = np.maximum(np.einsum("k,khw->hw", weights.mean(axis=(1, 2)), masks[0]), 0)
    np.testing.assert_allclose(res.raw[0], expected, rtol=1e-5, atol=1e-6)
    abl = ex.explain(x, "ablationcam", target=weights, layer=ex.model.logits)
    assert np.isfinite(abl.raw).all()


def nhwc_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same network taking and giving (N, H, W, C): Transposes around the NCHW graph."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    g = m.graph
    for node in g.node:
        node.input[:] = ["image_nchw" if i == "image" else i for i in node.input]
        node.output[:] = ["masks_nchw" if o == "masks" else o for o in node.output]
    g.node.insert(0, helper.make_node("Transpose", ["image"], ["image_nchw"], perm=[0, 3, 1, 2]))
    g.node.append(helper.make_node("Transpose", ["masks_nchw"], ["masks"], perm=[0, 2, 3, 1]))
    del g.input[:], g.output[:], g.value_info[:]
    g.input.append(helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 16, 16, 3]))
    g.output.append(helper.make_tensor_value_info("masks", TensorProto.FLOAT, [1, 16, 16, 3]))
    return m


def test_class_index_on_a_per_pixel_model_scores_its_predicted_pixels(seg):
    """On a (C, H, W) output a class index is pytorch-grad-cam's SemanticSegmentationTarget with the
    predicted mask of that class; the default target is the class that wins most pixels."""
    _, model, _, x = seg
    ex = onnxsal.Explainer(with_bias(model, class_=2, delta=0.3), "cpu", preprocess="raw")   # class 2 wins a few pixels
    assert ex.model.dense is not None and ex.model.n_targets == 3
    out = ex.engine.outputs(x, [ex.model.logits])[0][0]
    predicted = out.argmax(axis=0)
    counts = np.bincount(predicted.ravel(), minlength=3)
    assert counts.min() > 0
    for c in range(3):
        w = np.zeros_like(out)
        w[c] = predicted == c
        for name in ("saliency", "gradcam"):
            np.testing.assert_allclose(ex.explain(x, name, target=c).raw, ex.explain(x, name, target=w).raw,
                                       rtol=1e-5, atol=1e-7, err_msg=name)
    res = ex.explain(x, "gradcam")
    assert res.targets[0].index == int(counts.argmax())
    top = res.top(3)
    assert [t["index"] for t in top] == list(np.argsort(-counts, kind="stable"))
    np.testing.assert_allclose([t["score"] for t in top], np.sort(counts)[::-1] / predicted.size)
    with pytest.raises(TargetError, match="out of range"):
        ex.explain(x, "gradcam", target=3)


def test_a_class_that_wins_no_pixel_scores_its_whole_map(seg):
    _, model, _, x = seg
    shifted = with_bias(model, class_=2, delta=-50.0)          # class 2 never wins now
    ex2 = onnxsal.Explainer(shifted, "cpu", preprocess="raw")
    assert ex2.explain(x, "gradcam").top(3)[-1] == {"index": 2, "label": "2", "score": 0.0}
    whole = np.zeros((3, 16, 16), np.float32)
    whole[2] = 1.0
    np.testing.assert_allclose(ex2.explain(x, "saliency", target=2).raw, ex2.explain(x, "saliency", target=whole).raw,
                               rtol=1e-5, atol=1e-7)


def with_bias(model: onnx.ModelProto, class_: int, delta: float) -> onnx.ModelProto:
    """The model with `delta` added to one class's logits (the last Conv's bias)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    last = [n for n in m.graph.node if n.op_type == "Conv"][-1]
    init = next(i for i in m.graph.initializer if i.name == last.input[2])
    b = numpy_helper.to_array(init).copy()
    b[class_] += delta
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    return m


def test_per_pixel_targets_do_not_depend_on_the_layout(seg):
    """The NHWC twin ends in a Transpose after its class maps; its default CAM layer is still the
    one before them, and its class targets the same pixels."""
    _, model, _, x = seg
    a = onnxsal.Explainer(model, "cpu", preprocess="raw")
    b = onnxsal.Explainer(nhwc_twin(model), "cpu", preprocess="raw")
    assert b.model.dense.channels_last and b.model.dense.classes == 3
    xt = x.transpose(0, 2, 3, 1).copy()
    for name in ("saliency", "gradcam", "occlusion"):
        opts = {"window": 4} if name == "occlusion" else {}
        ra, rb = a.explain(x, name, top_k=2, **opts), b.explain(xt, name, top_k=2, **opts)
        assert [t.index for t in ra.targets] == [t.index for t in rb.targets]
        np.testing.assert_allclose(ra.maps, rb.maps, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_exported_graph_of_a_per_pixel_model_equals_explain(seg, layout):
    """In the exported graph the class mask comes from an in-graph ArgMax of the clean rows."""
    import onnxruntime as ort

    from onnxsal.export import export

    _, model, _, x = seg
    model = with_bias(model, class_=2, delta=0.3)               # every class wins some pixels
    if layout == "NHWC":
        model, x = nhwc_twin(model), x.transpose(0, 2, 3, 1).copy()
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    for method in ("gradcam", "saliency", "ig", "fullgrad", "smoothgrad"):
        opts = {"noise_level": 0.0, "n_samples": 2} if method == "smoothgrad" else {}
        graph = export(model, method, **opts)
        sess = ort.InferenceSession(graph.SerializeToString())
        for c in range(3):
            logits, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([c], np.int64)})
            ref = ex.explain(x, "saliency" if method == "smoothgrad" else method, target=c,
                             **({"steps": 32} if method == "ig" else {}))
            np.testing.assert_allclose(maps[0], ref.map, atol=1e-5, err_msg=f"{method} class {c}")
            np.testing.assert_allclose(logits.reshape(-1), ref.logits, atol=1e-5)


def test_inspect_of_a_per_pixel_model(seg, tmp_path, capsys):
    _, model, _, _ = seg
    path = tmp_path / "seg.onnx"
    onnx.save(model, str(path))
    assert main(["inspect", str(path)]) == 0
    assert "3 classes per pixel, 16x16" in capsys.readouterr().out


def test_finercam_refuses_a_per_pixel_model(seg):
    from onnxsal.errors import MethodError

    _, model, _, x = seg
    with pytest.raises(MethodError, match="map per class"):
        onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, "finercam")


def test_aug_smooth_reads_each_copy_own_pixels_of_the_class(seg):
    """aug_smooth mirrors the image: the class's pixels are those its own output assigns to it there
    (the clean image's mask would score the mirrored pixels of another region)."""
    from onnxsal.postprocess import normalize, resize

    _, model, _, x = seg
    ex = onnxsal.Explainer(with_bias(model, class_=2, delta=0.3), "cpu", preprocess="raw")
    cls, maps = 2, []
    clean = ex.engine.outputs(x, [ex.model.logits])[0][0].argmax(axis=0) == cls
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xa = np.ascontiguousarray((x * np.float32(factor))[..., ::-1] if flip else x * np.float32(factor))
            own = ex.engine.outputs(xa.astype(np.float32), [ex.model.logits])[0][0].argmax(axis=0) == cls
            w = np.zeros((3, 16, 16), np.float32)
            w[cls] = own
            m = normalize(resize(ex.explain(xa.astype(np.float32), "layercam", target=w).raw, (16, 16)))[0]
            maps.append(m[..., ::-1] if flip else m)
            if flip:
                assert not np.array_equal(own, clean)       # the mirrored copy's pixels are others
    got = ex.explain(x, "layercam", cls, aug_smooth=True).raw[0]
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=1e-5)


class BinarySeg(nn.Module):
    """One map: a person, a salient object or a lesion against the rest, through a sigmoid or as logits."""

    def __init__(self, sigmoid: bool, squeeze: bool = False):
        super().__init__()
        torch.manual_seed(4)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))
        self.sigmoid, self.squeeze = sigmoid, squeeze

    def forward(self, x):
        y = self.body(x)
        y = torch.sigmoid(y) if self.sigmoid else y
        return y.squeeze(1) if self.squeeze else y


@pytest.mark.parametrize("sigmoid,squeeze", [(True, False), (False, False), (True, True)])
def test_a_single_map_scores_the_pixels_above_its_threshold(tmp_path, capsys, sigmoid, squeeze):
    """An argmax over one map gives it every pixel, background included: its pixels are those above
    0.5 after a sigmoid, above 0 as logits, as a binary segmentation recipe masks them. A map whose
    channel axis the model squeezes away, (N, H, W), is one map too, not H x W "classes"."""
    import onnxruntime as ort

    from onnxsal.export import export

    net = BinarySeg(sigmoid, squeeze).eval()
    path = str(tmp_path / "binary.onnx")
    exported(net, path, "mask")
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    assert ex.model.dense.classes == 1 and ex.model.dense.threshold == (0.5 if sigmoid else 0.0)
    assert ex.model.n_targets == 1 and ex.model.default_layer.shape == (8, 16, 16)
    assert main(["inspect", path]) == 0
    what = "a probability after a Sigmoid" if sigmoid else "logits"
    assert f"(one map, 16x16, {what}: its target scores the map over its pixels above {0.5 if sigmoid else 0:g})" \
        in capsys.readouterr().out
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    pixels = (lambda t: t[0]) if squeeze else (lambda t: t[0, 0])
    with torch.no_grad():
        out = pixels(net(torch.tensor(x))).numpy()
    fg = out > (0.5 if sigmoid else 0.0)
    assert 0 < fg.sum() < fg.size, "the check needs pixels on both sides"
    xt = torch.tensor(x, requires_grad=True)
    (pixels(net(xt)) * torch.tensor(fg, dtype=torch.float32)).sum().backward()
    ref = np.abs(xt.grad.numpy()[0]).max(axis=0)
    res = ex.explain(x, "saliency")
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-4, atol=1e-6 * ref.max())
    assert res.top(1)[0]["score"] == pytest.approx(fg.mean())
    sess = ort.InferenceSession(export(path, "saliency").SerializeToString())
    _, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([0], np.int64)})
    np.testing.assert_allclose(maps[0], res.map, atol=1e-5)
    # a map with no pixel above its threshold is scored whole, as a class that wins no pixel is
    with torch.no_grad():
        net.body[2].bias -= 50.0
    exported(net, path, "mask")
    xt = torch.tensor(x, requires_grad=True)
    y = pixels(net(xt))
    assert not bool((y > (0.5 if sigmoid else 0.0)).any())
    y.sum().backward()
    ref = np.abs(xt.grad.numpy()[0]).max(axis=0)
    res = onnxsal.Explainer(path, "cpu", preprocess="raw").explain(x, "saliency")
    np.testing.assert_allclose(res.raw[0], ref, rtol=1e-4, atol=1e-6 * ref.max())
    assert res.top(1)[0]["score"] == 0.0


class TokensFromAColumn(nn.Module):
    """(N, 16 steps, 16 characters) from a conv pooled over the height and transposed: the input's
    grid by its numbers, but no squeezed map."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.conv(x).mean(dim=2).permute(0, 2, 1))


def test_a_sequence_with_the_grid_s_numbers_is_no_map(tmp_path):
    path = str(tmp_path / "tokens.onnx")
    exported(TokensFromAColumn().eval(), path, "chars")
    m = onnxsal.load(path)
    assert m.dense is None and m.num_classes == 16 * 16 and m.output == "chars"


class ClassesLast(nn.Module):
    """seg_net's class maps permuted to (N, H, W, C) behind an NCHW input."""

    def __init__(self):
        super().__init__()
        self.net = seg_net()

    def forward(self, x):
        return self.net(x).permute(0, 2, 3, 1)


def test_class_maps_permuted_last_behind_an_nchw_input(seg, tmp_path):
    """Read in the input's layout, (N, 16, 16, 3) was 16 classes of 16 x 3 maps; only (16, 16) is
    the input's grid, so the classes are the last axis."""
    import onnxruntime as ort

    from onnxsal.export import export

    _, model, _, x = seg
    path = str(tmp_path / "last.onnx")
    exported(ClassesLast().eval(), path, "masks")
    a = onnxsal.Explainer(with_bias(model, class_=2, delta=0.3), "cpu", preprocess="raw")
    last = onnx.load(path)
    conv = [n for n in last.graph.node if n.op_type == "Conv"][-1]
    init = next(i for i in last.graph.initializer if i.name == conv.input[2])
    b = numpy_helper.to_array(init).copy()
    b[2] += 0.3
    init.CopyFrom(numpy_helper.from_array(b, init.name))
    ex = onnxsal.Explainer(last, "cpu", preprocess="raw")
    assert (ex.model.dense.classes, ex.model.dense.channels_last, ex.model.n_targets) == (3, True, 3)
    for c in range(3):
        for name in ("saliency", "gradcam"):
            np.testing.assert_allclose(ex.explain(x, name, target=c).raw, a.explain(x, name, target=c).raw,
                                       rtol=1e-5, atol=1e-7, err_msg=f"{name} class {c}")
    assert [t["index"] for t in ex.explain(x, "saliency").top(3)] == [t["index"] for t in a.explain(x, "saliency").top(3)]
    sess = ort.InferenceSession(export(last, "gradcam").SerializeToString())
    _, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([1], np.int64)})
    np.testing.assert_allclose(maps[0], a.explain(x, "gradcam", target=1).map, atol=1e-5)


class LowResClasses(nn.Module):
    """torchvision's FCN/DeepLabV3 head in small: class maps at stride 2 from a 1x1 conv, then resized
    to the input; ``skip`` adds LR-ASPP's second branch, class maps of a stride-4 map resized and
    added to those of the stride-2 one."""

    def __init__(self, skip: bool):
        super().__init__()
        torch.manual_seed(6)
        self.skip = skip
        self.low = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.low_classes = nn.Conv2d(8, 3, 1)
        self.high = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.high_classes = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        low = self.low(x)
        if self.skip:
            high = nn.functional.interpolate(self.high_classes(self.high(low)), size=low.shape[-2:], mode="bilinear")
            maps = self.low_classes(low) + high
        else:
            maps = self.low_classes(self.head(low))
        return nn.functional.interpolate(maps, size=x.shape[-2:], mode="bilinear")


@pytest.mark.parametrize("skip", [False, True])
def test_the_default_layer_of_a_segmentation_head_is_no_class_map(tmp_path, skip):
    """Class maps at a lower resolution, resized to the output, are the scores themselves (Grad-CAM
    there weighs a class's map by its own gradient); with a skip branch, a map on one branch misses
    the other's part: the default is the last map every pixel's score depends on."""
    net = LowResClasses(skip).eval()
    path = str(tmp_path / "lowres.onnx")
    exported(net, path, "masks")
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    hooked = net.low if skip else net.head
    relu = next(n.output[0] for n in onnx.load(path).graph.node
                if n.op_type == "Relu" and n.name.startswith("/low/" if skip else "/head/"))
    assert ex.model.default_layer.tensor == relu
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with kept(hooked) as store:
        out = net(torch.tensor(x))
    predicted = out[0].argmax(dim=0)
    cls = int(torch.bincount(predicted.reshape(-1), minlength=3).argmax())
    (out[0, cls] * (predicted == cls)).sum().backward()
    expected = ref_cams(store["a"].detach().numpy()[0], store["a"].grad.numpy()[0])["gradcam"]
    got = ex.explain(x, "gradcam", target=cls).raw[0]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * expected.max() + 1e-12)
