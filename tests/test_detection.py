"""Single-stage detectors (Ultralytics' YOLOv8/YOLO11 head layout): a class target scores its
confidence at its most confident anchor.

The networks here copy that head: two scales, a box branch read through a distribution (DFL: a
softmax over bins and a 1x1 conv that takes its mean), a sigmoid class branch, concatenated on the
row axis as (N, 4 + classes [+ extra], anchors). The larger scale's head reads the stride-2 map
directly, so the stride-4 map is not on every path. Maps are checked against torch.autograd of the
same element of the output and against the CAM formulas on PyTorch's activations and gradients.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import MethodError

from test_gradient_methods import ref_cams

CLASSES, BINS, SIZE = 3, 4, 16


class TinyDetector(nn.Module):
    def __init__(self, extra: int = 0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU())     # stride 2
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU())     # stride 4
        self.box = nn.ModuleList(nn.Conv2d(8, 4 * BINS, 1) for _ in range(2))
        self.cls = nn.ModuleList(nn.Conv2d(8, CLASSES, 1) for _ in range(2))
        self.mask = nn.ModuleList(nn.Conv2d(8, extra, 1) for _ in range(2)) if extra else None
        self.dfl = nn.Conv2d(BINS, 1, 1, bias=False)
        with torch.no_grad():
            self.dfl.weight.copy_(torch.arange(BINS, dtype=torch.float32).view(1, BINS, 1, 1))
        self.register_buffer("stride", torch.cat([torch.full(((SIZE // 2) ** 2,), 2.0), torch.full(((SIZE // 4) ** 2,), 4.0)]))

    def forward(self, x):
        p1 = self.down1(self.stem(x))
        p2 = self.down2(p1)
        n = x.shape[0]
        box = torch.cat([b(p).flatten(2) for b, p in zip(self.box, (p1, p2))], 2)
        cls = torch.cat([c(p).flatten(2) for c, p in zip(self.cls, (p1, p2))], 2)
        a = box.shape[2]
        dist = self.dfl(box.view(n, 4, BINS, a).transpose(2, 1).softmax(1)).view(n, 4, a)
        out = torch.cat([dist * self.stride, cls.sigmoid()], 1)
        if self.mask is not None:
            out = torch.cat([out, torch.cat([m(p).flatten(2) for m, p in zip(self.mask, (p1, p2))], 2)], 1)
        return out


def export(net: nn.Module, path, dynamic_size: bool = False, dynamic_batch: bool = False) -> onnx.ModelProto:
    axes = {"images": {**({0: "n"} if dynamic_batch else {}), **({2: "h", 3: "w"} if dynamic_size else {})}} \
        if dynamic_size or dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=["images"],
                          output_names=["output0"], opset_version=17, dynamo=False, dynamic_axes=axes)
    return onnx.load(str(path))


@pytest.fixture(scope="module", params=[0, 2], ids=["detect", "with_mask_rows"])
def det(request, tmp_path_factory):
    torch.manual_seed(request.param)
    net = TinyDetector(request.param).eval()
    model = export(net, tmp_path_factory.mktemp("det") / "det.onnx")
    x = np.random.default_rng(request.param).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, model, x


def node_output(model: onnx.ModelProto, name_part: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.op_type == "Conv" and name_part in n.name)


def test_the_detection_output_is_recognised(det):
    net, model, _ = det
    m = onnxsal.load(model, preprocess=None)
    anchors = (SIZE // 2) ** 2 + (SIZE // 4) ** 2
    assert (m.detection.classes, m.detection.anchors, m.detection.first) == (CLASSES, anchors, 4)
    assert m.detection.rows == 4 + CLASSES + (net.mask[0].out_channels if net.mask is not None else 0)
    assert m.n_targets == CLASSES
    # the DFL conv runs over (bins, 4 sides, anchors): no image map
    assert node_output(model, "dfl") not in [la.tensor for la in m.layers]
    # the last conv on every path to every anchor: the stride-2 map, not the stride-4 head's
    assert m.default_layer.tensor == node_output(model, "down1")
    assert m.layers[-1].tensor != m.default_layer.tensor


def test_a_classifier_output_is_no_detection():
    from tiny import conv_net

    assert onnxsal.load(conv_net()).detection is None


def reference(net: nn.Module, x: np.ndarray, cls: int):
    """torch.autograd of class ``cls``'s confidence at its most confident anchor, with the stride-2
    map's activations and gradients."""
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    h = net.down1[0].register_forward_hook(keep)
    xt = torch.tensor(x, requires_grad=True)
    out = net(xt)
    anchor = int(out[0, 4 + cls].argmax())
    out[0, 4 + cls, anchor].backward()
    h.remove()
    return out.detach().numpy()[0], anchor, xt.grad.numpy()[0], store["a"].detach().numpy()[0], store["a"].grad.numpy()[0]


def test_class_targets_score_their_best_box(det):
    net, model, x = det
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    out, *_ = reference(net, x[:1], 0)
    best = out[4:4 + CLASSES].max(axis=1)
    for cls in range(CLASSES):
        out, anchor, gx, a, g = reference(net, x[:1], cls)
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())
        cx, cy, w, h = out[:4, anchor]
        assert f"anchor {anchor}, centre ({cx:.0f}, {cy:.0f}), {w:.0f}x{h:.0f} px" in sal.notes[0]
        expected = ref_cams(a, g)
        for name in ("gradcam", "gradcam++", "layercam", "hirescam"):
            got = ex.explain(x[:1], name, cls).raw[0]
            np.testing.assert_allclose(got, expected[name], rtol=1e-3, atol=1e-4 * np.abs(expected[name]).max() + 1e-12,
                                       err_msg=f"{name} class {cls}")
        ig = ex.explain(x[:1], "ig", cls, steps=16)
        assert abs(ig.info["completeness_gap"][0]) < 1e-2 * max(abs(out[4 + cls, anchor] - 0.5), 1e-3) + 1e-3
    # the default target: the class whose best box is most confident; top() ranks classes so
    res = ex.explain(x[:1], "saliency", top_k=2)
    order = np.argsort(-best, kind="stable")
    assert [t.index for t in res.targets] == list(order[:2])
    top = res.top(CLASSES)
    assert [t["index"] for t in top] == list(order)
    np.testing.assert_allclose([t["score"] for t in top], best[order], rtol=1e-5)


def test_each_image_of_a_batch_scores_its_own_box(det):
    """The second image's best anchor differs from the first's; its map follows its own."""
    net, model, x = det
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    results = ex.explain_batch(x, "saliency", targets=[1, 1])
    for k in range(2):
        _, _, gx, _, _ = reference(net, x[k:k + 1], 1)
        np.testing.assert_allclose(results[k].raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())


def test_exported_graph_of_a_detector_equals_explain(det):
    """The exported graph picks each image's anchor with an in-graph ArgMax of its clean rows."""
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    _, model, x = det
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    targets = np.array([2, 0], np.int64)
    for method in ("gradcam", "saliency", "smoothgrad", "ig"):
        opts = {"noise_level": 0.0, "n_samples": 2} if method == "smoothgrad" else {}
        sess = ort.InferenceSession(export_graph(model, method, **opts).SerializeToString())
        logits, maps = sess.run(["logits", "map"], {"images": x, "target": targets})
        assert logits.shape == (2, ex.model.detection.rows, ex.model.detection.anchors)
        for k in range(2):
            ref = ex.explain(x[k:k + 1], "saliency" if method == "smoothgrad" else method, int(targets[k]),
                             **({"steps": 32} if method == "ig" else {}))
            np.testing.assert_allclose(maps[k], ref.map, atol=1e-5, err_msg=f"{method} image {k}")


def test_faithfulness_scores_the_class_best_box(det):
    from onnxsal.evaluate.faithfulness import probabilities

    net, model, x = det
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    with torch.no_grad():
        out = net(torch.tensor(x)).numpy()
    np.testing.assert_allclose(probabilities(ex, x, 2), out[:, 4 + 2].max(axis=1), rtol=1e-5)


def test_classifier_only_methods_refuse_a_detector(det):
    _, model, x = det
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    with pytest.raises(MethodError, match="detector's boxes"):
        ex.explain(x[:1], "finercam")
    with pytest.raises(MethodError, match="ReST"):
        ex.explain(x[:1], "shapleycam")


def with_ultralytics_metadata(model: onnx.ModelProto, names: str) -> onnx.ModelProto:
    for k, v in {"author": "Ultralytics", "task": "detect", "imgsz": f"[{SIZE}, {SIZE}]", "names": names}.items():
        model.metadata_props.add(key=k, value=v)
    return model


def test_an_ultralytics_file_explains_without_flags(tmp_path, capsys):
    """Ultralytics writes its class names as a Python dict and its input size; its pixels are RGB in
    [0, 1]. A dynamic-size export takes that size."""
    from PIL import Image

    torch.manual_seed(0)
    net = TinyDetector().eval()
    path = tmp_path / "yolo.onnx"
    model = with_ultralytics_metadata(export(net, path, dynamic_size=True), "{0: 'person', 1: 'bicycle', 2: 'car'}")
    onnx.save(model, str(path))
    m = onnxsal.load(str(path))
    assert m.labels == ["person", "bicycle", "car"] and m.input.size == (SIZE, SIZE)
    assert m.preprocess.preset == "unit"
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    res = onnxsal.Explainer(str(path), "cpu").explain(str(tmp_path / "img.png"), "saliency", "car")
    x = torch.tensor(rgb.transpose(2, 0, 1)[None] / 255.0, dtype=torch.float32, requires_grad=True)
    out = net(x)
    out[0, 4 + 2, int(out[0, 4 + 2].argmax())].backward()
    np.testing.assert_allclose(res.raw[0], x.grad.abs().amax(dim=1)[0].numpy(), rtol=1e-4, atol=1e-7)
    assert main(["inspect", str(path)]) == 0
    assert f"a detector's {(SIZE // 2) ** 2 + (SIZE // 4) ** 2} boxes, 3 classes" in capsys.readouterr().out
    assert main(["explain", str(path), str(tmp_path / "img.png"), "-t", "bicycle", "-o", str(tmp_path / "out"),
                 "-q"]) == 0
    assert (tmp_path / "out" / "img.gradcam.png").exists()


def test_odd_ultralytics_names_are_ignored():
    from onnxsal.detection import ultralytics_metadata

    assert ultralytics_metadata({"author": "Ultralytics", "names": "{1: 'a'}"})[1] is None
    assert ultralytics_metadata({"author": "Ultralytics", "names": "not python"})[1] is None
    assert ultralytics_metadata({"author": "someone", "names": "{0: 'a'}"}) == (None, None)


class TinyFinal(nn.Module):
    """TinyDetector's output as final detections (Ultralytics' NMS-free heads): the ``keep`` best
    (anchor, class) scores, each row x1, y1, x2, y2, score, class; rows scoring below ``floor`` are
    zeroed, as an NMS export pads the detections it did not keep."""

    def __init__(self, keep: int = 12, floor: float = 0.0):
        super().__init__()
        self.det = TinyDetector()
        with torch.no_grad():                  # confidences spread over (0, 1)
            for c in self.det.cls:
                c.weight.mul_(8)
        self.keep, self.floor = keep, floor

    def forward(self, x):
        y = self.det(x)
        boxes, scores = y[:, :4].transpose(1, 2), y[:, 4:4 + CLASSES].transpose(1, 2)
        boxes = torch.cat([boxes[..., :2] - boxes[..., 2:] / 2, boxes[..., :2] + boxes[..., 2:] / 2], -1)
        top, idx = scores.flatten(1).topk(self.keep)
        anchor = torch.div(idx, CLASSES, rounding_mode="floor")
        picked = boxes.gather(1, anchor.unsqueeze(-1).expand(-1, -1, 4))
        out = torch.cat([picked, top[..., None], (idx - anchor * CLASSES)[..., None].float()], -1)
        return out * (top > self.floor)[..., None].float() if self.floor else out


@pytest.fixture(scope="module", params=[0.0, 0.7], ids=["nms_free", "padded"])
def final(request, tmp_path_factory):
    torch.manual_seed(3)
    net = TinyFinal(floor=request.param).eval()
    path = tmp_path_factory.mktemp("final") / "final.onnx"
    model = export(net, path, dynamic_batch=True)     # the batch read off the image's Shape: a path around every conv
    for k, v in {"author": "Ultralytics", "task": "detect", "end2end": "True", "imgsz": f"[{SIZE}, {SIZE}]",
                 "names": "{0: 'person', 1: 'bicycle', 2: 'car'}", "args": "{'nms': False}"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, model, x, str(path)


def final_reference(net, x, cls):
    """torch.autograd of class ``cls``'s most confident kept detection's score (None: no such row)."""
    xt = torch.tensor(x, requires_grad=True)
    out = net(xt)
    rows = out[0].detach().numpy()
    mine = [k for k in range(len(rows)) if rows[k, 4] > 0 and int(round(rows[k, 5])) == cls]
    if not mine:
        return rows, None, None
    k = max(mine, key=lambda r: rows[r, 4])
    out[0, k, 4].backward()
    return rows, k, xt.grad.numpy()[0]


def test_final_detections_score_a_class_best_row(final):
    from onnxsal.errors import TargetError

    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    d = ex.model.detection
    assert (d.classes, d.kept, d.rows) == (CLASSES, 12, 6)
    assert ex.model.default_layer.tensor == node_output(model, "down1")
    present, best = [], {}
    for cls in range(CLASSES):
        rows, k, gx = final_reference(net, x[:1], cls)
        if k is None:
            with pytest.raises(TargetError, match=f"class {['person', 'bicycle', 'car'][cls]} has no detection"):
                ex.explain(x[:1], "saliency", cls)
            continue
        present.append(cls)
        best[cls] = rows[k, 4]
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())
        a, b, c, e = rows[k, :4]
        assert f"detection {k}, corners ({a:.0f}, {b:.0f})-({c:.0f}, {e:.0f})" in sal.notes[0]
    assert present
    res = ex.explain(x[:1], "saliency", top_k=CLASSES)        # only the classes the detector kept
    assert [t.index for t in res.targets] == sorted(present, key=lambda c: -best[c])
    assert [t["index"] for t in res.top(CLASSES)] == [t.index for t in res.targets]
    np.testing.assert_allclose([t["score"] for t in res.top(CLASSES)], [best[t.index] for t in res.targets], rtol=1e-5)


def test_the_fixtures_cover_a_missing_class(final):
    """The padded fixture keeps no detection of some class (its target is refused, not guessed); the
    other keeps every class."""
    net, _, x, _ = final
    missing = [c for c in range(CLASSES) if final_reference(net, x[:1], c)[1] is None]
    assert bool(missing) == bool(net.floor)


def test_exported_graph_of_final_detections_equals_explain(final):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    for method in ("gradcam", "saliency", "ig"):
        sess = ort.InferenceSession(export_graph(model, method).SerializeToString())
        for cls in range(CLASSES):
            _, maps = sess.run(["logits", "map"], {"images": x, "target": np.full(2, cls, np.int64)})
            for k in range(2):
                if final_reference(net, x[k:k + 1], cls)[1] is None:
                    assert not maps[k].any(), f"{method}: class {cls} has no detection, so no map"
                    continue
                ref = ex.explain(x[k:k + 1], method, cls, **({"steps": 32} if method == "ig" else {}))
                np.testing.assert_allclose(maps[k], ref.map, atol=1e-5, err_msg=f"{method} class {cls} image {k}")


def test_noisy_copies_score_their_own_detection_of_the_class(final):
    """Rows are sorted by score, so in a noisy copy row k is mostly another detection, often of
    another class: SmoothGrad averages the gradients of each copy's own best detection of the class
    (none in a copy: nothing from it)."""
    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    n, level = 8, 0.3
    noise = np.random.default_rng(0).normal(0.0, level * float(x[:1].max() - x[:1].min()),
                                            (n,) + x.shape[1:]).astype(np.float32)
    moved = 0
    for cls in range(CLASSES):
        clean_k = final_reference(net, x[:1], cls)[1]
        if clean_k is None:
            continue
        total = np.zeros(x.shape[1:])
        for i in range(n):
            _, k, gx = final_reference(net, x[:1] + noise[i:i + 1], cls)
            moved += k != clean_k
            total += 0 if gx is None else gx
        got = ex.explain(x[:1], "smoothgrad", cls, n_samples=n, noise_level=level, seed=0).raw[0]
        want = np.abs(total / n).max(axis=0)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max(), err_msg=f"class {cls}")
    assert moved, "no copy moved its detection: the check would not tell"


def best_score(net, x, cls) -> float:
    """Class ``cls``'s most confident kept detection's score in ``x`` (0 with none)."""
    with torch.no_grad():
        rows = net(torch.tensor(x)).numpy()[0]
    return max([r[4] for r in rows if r[4] > 0 and int(round(r[5])) == cls], default=0.0)


def test_occlusion_scores_each_masked_image_own_detection(final):
    """Occluding the detected object reorders the list: each masked image's own best detection of the
    class is scored, not whatever row the clean image had it at."""
    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    half = SIZE // 2
    for cls in range(CLASSES):
        base = best_score(net, x[:1], cls)
        if not base:
            continue
        want = np.zeros((SIZE, SIZE), np.float32)
        for y0 in (0, half):
            for x0 in (0, half):
                masked = x[:1].copy()
                masked[..., y0:y0 + half, x0:x0 + half] = 0
                want[y0:y0 + half, x0:x0 + half] = base - best_score(net, masked, cls)
        got = ex.explain(x[:1], "occlusion", cls, window=half, stride=half).raw[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"class {cls}")


def test_layer_ig_path_points_score_their_own_detection(final):
    """Layer IG puts points a0 + alpha (a - a0) in place of the stride-2 map; each point scores the
    class's best detection in the output the network makes from it."""
    from onnxsal.methods.gradients import ig_path

    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    conv, steps, moved = net.det.down1[0], 8, 0
    alphas, weights = ig_path(steps, "gausslegendre")
    with torch.no_grad():
        a, a0 = conv(net.det.stem(torch.tensor(x[:1]))), conv(net.det.stem(torch.zeros(1, 3, SIZE, SIZE)))
    for cls in range(CLASSES):
        k0 = final_reference(net, x[:1], cls)[1]
        if k0 is None:
            continue
        total = torch.zeros_like(a)
        for alpha, w in zip(alphas, weights):
            point = (a0 + float(alpha) * (a - a0)).requires_grad_(True)
            hook = conv.register_forward_hook(lambda m, i, o, p=point: p)
            out = net(torch.tensor(x[:1]))
            hook.remove()
            rows = out[0].detach().numpy()
            mine = [k for k in range(len(rows)) if rows[k, 4] > 0 and int(round(rows[k, 5])) == cls]
            if mine:
                k = max(mine, key=lambda r: rows[r, 4])
                moved += k != k0
                out[0, k, 4].backward()
                total += float(w) * point.grad
        want = ((a - a0) * total).sum(dim=1)[0].numpy()
        got = ex.explain(x[:1], "layerig", cls, steps=steps, baseline="zero").raw[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=f"class {cls}")
    # the padded fixture keeps the class's row along the path, and drops it near the baseline instead
    assert moved or net.floor, "no path point moved the detection: the check would not tell"


def test_final_detections_from_the_command_line(final, tmp_path, capsys):
    from PIL import Image

    net, _, _, path = final
    assert main(["inspect", path]) == 0
    assert "final detections, up to 12, 3 classes" in capsys.readouterr().out
    rgb = np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    with torch.no_grad():
        rows = net(torch.tensor(rgb.transpose(2, 0, 1)[None] / 255.0, dtype=torch.float32)).numpy()[0]
    kept = {int(round(r[5])) for r in rows if r[4] > 0}
    for cls, name in enumerate(["person", "bicycle", "car"]):
        code = main(["explain", path, str(tmp_path / "img.png"), "-t", name, "-m", "saliency", "-o",
                     str(tmp_path / "out"), "-q"])
        err = capsys.readouterr().err
        assert (code == 0) == (cls in kept), err
        if cls not in kept:
            assert f"class {name} has no detection in this image" in err and len(err.strip().splitlines()) == 1


def test_faithfulness_of_final_detections(final):
    from onnxsal.evaluate.faithfulness import probabilities

    net, model, x, _ = final
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    with torch.no_grad():
        out = net(torch.tensor(x)).numpy()
    for cls in range(CLASSES):
        want = [max([r[4] for r in img if r[4] > 0 and int(round(r[5])) == cls], default=0.0) for img in out]
        np.testing.assert_allclose(probabilities(ex, x, cls), want, rtol=1e-5)


def test_final_detections_need_the_metadata(final):
    """Without Ultralytics' metadata nothing says which column is the score: read as flat scores."""
    _, model, _, _ = final
    bare = onnx.ModelProto.FromString(model.SerializeToString())
    del bare.metadata_props[:]
    assert onnxsal.load(bare).detection is None


class DetectionsWithoutBatch(nn.Module):
    """torchvision's detectors' output form: the one image's kept boxes (K, 4), labels and scores,
    filtered by score (NonZero), with no batch axis."""

    def __init__(self):
        super().__init__()
        self.det = TinyDetector()

    def forward(self, x):
        y = self.det(x)[0]
        scores, labels = y[4:].max(0)
        keep = scores > 0.5
        return y[:4].t()[keep], labels[keep], scores[keep]


def test_a_detection_list_without_a_batch_axis_is_refused(tmp_path, capsys):
    """Read as rows per image, its boxes were "4 classes" and its gradient graph failed in ONNX Runtime."""
    from onnxsal.errors import ModelError

    torch.manual_seed(0)
    path = tmp_path / "lists.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(DetectionsWithoutBatch().eval(), (torch.randn(1, 3, SIZE, SIZE),), str(path),
                          input_names=["images"], output_names=["boxes", "labels", "scores"], opset_version=17,
                          dynamo=False)
    with pytest.raises(ModelError, match="'boxes' .* lists detections along its first axis .*NonZero"):
        onnxsal.Explainer(str(path), "cpu", preprocess="raw")
    assert main(["inspect", str(path)]) != 0
    err = capsys.readouterr().err
    assert "not one row per image" in err and len(err.strip().splitlines()) == 1


def test_which_ultralytics_files_hold_final_detections():
    from onnxsal.detection import DetectionList, find_detection_list

    base = {"author": "Ultralytics", "task": "detect", "names": "{0: 'a', 1: 'b'}", "args": "{'nms': None}",
            "end2end": "False"}
    assert find_detection_list(base, (1, 300, 6)) is None                       # no NMS, no end-to-end head
    assert find_detection_list({**base, "args": "{'nms': True}"}, (1, 300, 6)) == DetectionList(2, 300, 6)
    assert find_detection_list({**base, "end2end": "True", "task": "obb"}, (1, 300, 7)) == \
        DetectionList(2, 300, 7, corners=False)
    assert find_detection_list({**base, "head": "RTDETRDecoder"}, (1, 300, 6)) == \
        DetectionList(2, 300, 6, corners=False, fractions=True)                 # RT-DETR: always final
    assert find_detection_list({**base, "end2end": "True"}, (1, 84, 525, 1)) is None
    assert find_detection_list({**base, "end2end": "True", "task": "classify"}, (1, 300, 6)) is None
    assert find_detection_list({**base, "end2end": "True", "author": "someone"}, (1, 300, 6)) is None


class TinyDetr(nn.Module):
    """DETR's output form: (N, queries, classes [+ no object]) logits from learned queries attending
    to a conv map, beside (N, queries, 4) sigmoid boxes."""

    def __init__(self, width: int, queries: int = 6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
        self.queries = nn.Parameter(torch.randn(queries, 16))
        self.cls = nn.Linear(16, width)
        self.box = nn.Linear(16, 4)

    def forward(self, x):
        feats = self.stem(x).flatten(2).transpose(1, 2)                            # (N, hw, 16)
        attn = torch.softmax(self.queries @ feats.transpose(1, 2) / 4.0, dim=-1)   # (N, Q, hw)
        h = attn @ feats
        return self.cls(h) * 3.0, self.box(h).sigmoid()


@pytest.fixture(scope="module", params=["detr", "deformable_detr"])
def queries(request, tmp_path_factory):
    """DETR reads its logits with a softmax and a last "no object" class, Deformable DETR with a
    sigmoid per class; config.json's model_type says which."""
    import json

    softmax = request.param == "detr"
    torch.manual_seed(4)
    net = TinyDetr(CLASSES + softmax).eval()
    folder = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(folder / "model.onnx"), input_names=["pixel_values"],
                          output_names=["logits", "pred_boxes"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "n"}})
    (folder / "config.json").write_text(json.dumps({"model_type": request.param,
                                                    "id2label": {"0": "person", "1": "bicycle", "2": "car"}}))
    x = np.random.default_rng(4).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, str(folder / "model.onnx"), x, softmax


def query_probabilities(logits: np.ndarray, softmax: bool) -> np.ndarray:
    z = logits.astype(np.float64)
    if softmax:
        e = np.exp(z - z.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True))[..., :CLASSES]
    return 1 / (1 + np.exp(-z))


def test_query_detectors_score_a_class_at_its_most_probable_query(queries):
    net, path, x, softmax = queries
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    d = ex.model.detection
    assert (d.classes, d.queries, d.width, d.reading, d.boxes) == \
        (CLASSES, 6, CLASSES + softmax, "softmax" if softmax else "sigmoid", "pred_boxes")
    assert ex.model.labels == ["person", "bicycle", "car"]
    with torch.no_grad():
        logits, boxes = (t.numpy() for t in net(torch.tensor(x[:1])))
    probs = query_probabilities(logits[0], softmax)
    for cls in range(CLASSES):
        q = int(probs[:, cls].argmax())
        xt = torch.tensor(x[:1], requires_grad=True)
        net(xt)[0][0, q, cls].backward()
        res = ex.explain(x[:1], "saliency", cls)
        gx = xt.grad.numpy()[0]
        np.testing.assert_allclose(res.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())
        cx, cy, w, h = boxes[0, q]
        assert f"query {q}, centre ({cx:.3f}, {cy:.3f}), {w:.3f}x{h:.3f} of the image" in res.notes[0]
    res = ex.explain(x[:1], "saliency", top_k=CLASSES)
    order = list(np.argsort(-probs.max(axis=0), kind="stable"))
    assert [t.index for t in res.targets] == order
    np.testing.assert_allclose([t["score"] for t in res.top(CLASSES)], probs.max(axis=0)[order], rtol=1e-5)


def test_exported_graph_of_a_query_detector_equals_explain(queries):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    _, path, x, _ = queries
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    for method in ("gradcam", "saliency", "ig"):
        sess = ort.InferenceSession(export_graph(path, method).SerializeToString())
        for cls in range(CLASSES):
            _, maps = sess.run(["logits", "map"], {"pixel_values": x, "target": np.full(2, cls, np.int64)})
            for k in range(2):
                ref = ex.explain(x[k:k + 1], method, cls, **({"steps": 32} if method == "ig" else {}))
                np.testing.assert_allclose(maps[k], ref.map, atol=1e-5, err_msg=f"{method} class {cls} image {k}")


def test_query_detectors_need_their_model_type(queries, tmp_path):
    """Without config.json nothing says whether a softmax or a sigmoid reads the logits."""
    import shutil

    _, path, _, _ = queries
    shutil.copy(path, tmp_path / "model.onnx")
    assert onnxsal.load(str(tmp_path / "model.onnx")).detection is None
