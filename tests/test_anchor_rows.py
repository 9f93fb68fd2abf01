"""Detectors whose output is a row per anchor, (N, anchors, 4 + [objectness] + classes [+ extra]):
YOLOv5 and YOLOv7 (one Sigmoid over every column, then a Split), YOLOX (objectness and classes
each their own Sigmoid, decoded after a transpose), and a YOLOv8 output transposed to this form.

Such a detector reports objectness x class confidence, which is no element of its output; onnxsal
adds that product to the graph and scores it, at the anchor where it is highest. Maps are checked
against torch.autograd of the same product and against the CAM formulas on PyTorch's activations
and gradients.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main

from test_detection import SIZE, TinyDetector
from test_gradient_methods import ref_cams

CLASSES, NA = 3, 2


class Backbone(nn.Module):
    """Two scales: the stride-4 map is read from the stride-2 one, so only the stride-2 map is on
    every path to every anchor."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.SiLU())

    def scales(self, x):
        p1 = self.down1(self.stem(x))
        return ((p1, 2), (self.down2(p1), 4))


def grid(ny: int, nx: int) -> torch.Tensor:
    gy, gx = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    return torch.stack((gx, gy), -1).float()


class TinyYolo5(Backbone):
    """YOLOv5's Detect head as its export writes it: per scale a 1x1 conv viewed as (N, anchors,
    ny, nx, 5 + classes), one Sigmoid, a Split (2, 2, classes + 1), xy and wh decoded, a Concat on
    the last axis, flattened; then the scales. ``masks`` > 0 is YOLOv5-seg's Segment head: the Split
    first, a Sigmoid of the objectness and class block alone, mask coefficients after it."""

    def __init__(self, masks: int = 0):
        super().__init__()
        self.masks, self.no = masks, 5 + CLASSES + masks
        self.heads = nn.ModuleList(nn.Conv2d(8, NA * self.no, 1) for _ in range(2))
        self.register_buffer("anchors", torch.tensor([[[2.0, 3.0], [4.0, 5.0]], [[6.0, 7.0], [8.0, 9.0]]]))

    def forward(self, x):
        z = []
        for i, (p, stride) in enumerate(self.scales(x)):
            bs, _, ny, nx = p.shape
            y = self.heads[i](p).view(bs, NA, self.no, ny, nx).permute(0, 1, 3, 4, 2)
            g, anchor_grid = grid(ny, nx).view(1, 1, ny, nx, 2) - 0.5, self.anchors[i].view(1, NA, 1, 1, 2)
            if self.masks:
                xy, wh, conf, mask = y.split((2, 2, CLASSES + 1, self.masks), 4)
                xy, wh = (xy.sigmoid() * 2 + g) * stride, (wh.sigmoid() * 2) ** 2 * anchor_grid
                y = torch.cat((xy, wh, conf.sigmoid(), mask), 4)
            else:
                xy, wh, conf = y.sigmoid().split((2, 2, CLASSES + 1), 4)
                xy, wh = (xy * 2 + g) * stride, (wh * 2) ** 2 * anchor_grid
                y = torch.cat((xy, wh, conf), 4)
            z.append(y.reshape(bs, NA * ny * nx, self.no))
        return torch.cat(z, 1)


class TinyYolo5InPlace(TinyYolo5):
    """YOLOv5's Detect head exported with ``--inplace`` (and YOLOv5 before 7.0): one Sigmoid over
    every column, then the box decoded into its first four columns by slice assignment, which
    torch.onnx writes as ScatterND."""

    def forward(self, x):
        z = []
        for i, (p, stride) in enumerate(self.scales(x)):
            bs, _, ny, nx = p.shape
            y = self.heads[i](p).view(bs, NA, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous().sigmoid()
            if not torch.onnx.is_in_onnx_export():
                y = y.clone()                # torch.autograd needs the sigmoid's output as it was
            g, anchor_grid = grid(ny, nx).view(1, 1, ny, nx, 2) - 0.5, self.anchors[i].view(1, NA, 1, 1, 2)
            y[..., 0:2] = (y[..., 0:2] * 2 + g) * stride
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * anchor_grid
            z.append(y.view(bs, -1, self.no))
        return torch.cat(z, 1)


class TinyYolox(Backbone):
    """YOLOX's head in decode-in-inference form: per scale cat(box, obj.sigmoid(), cls.sigmoid()) on
    the channels, flattened, the scales concatenated, transposed to (N, anchors, 5 + classes), then
    the box decoded and the rest sliced through. ``decode=False`` is its export's default: the rows
    as the head computes them, the box a conv's raw output."""

    def __init__(self, decode: bool = True):
        super().__init__()
        self.decode = decode
        self.reg = nn.ModuleList(nn.Conv2d(8, 4, 1) for _ in range(2))
        self.obj = nn.ModuleList(nn.Conv2d(8, 1, 1) for _ in range(2))
        self.cls = nn.ModuleList(nn.Conv2d(8, CLASSES, 1) for _ in range(2))
        cells = [(SIZE // s, s) for s in (2, 4)]
        self.register_buffer("grids", torch.cat([grid(n, n).view(-1, 2) for n, _ in cells]))
        self.register_buffer("strides", torch.cat([torch.full((n * n, 1), float(s)) for n, s in cells]))

    def forward(self, x):
        outs = [torch.cat([self.reg[i](p), self.obj[i](p).sigmoid(), self.cls[i](p).sigmoid()], 1)
                for i, (p, _) in enumerate(self.scales(x))]
        o = torch.cat([t.flatten(start_dim=2) for t in outs], dim=2).permute(0, 2, 1)
        if not self.decode:
            return o
        return torch.cat([(o[..., 0:2] + self.grids) * self.strides, torch.exp(o[..., 2:4]) * self.strides,
                          o[..., 4:]], dim=-1)


class TransposedV8(nn.Module):
    """A YOLOv8-style output (N, 4 + classes, anchors) transposed to (N, anchors, 4 + classes): class
    confidences without objectness."""

    def __init__(self):
        super().__init__()
        self.net = TinyDetector()
        self.down1 = self.net.down1

    def forward(self, x):
        return self.net(x).permute(0, 2, 1)


ANCHORS = {"yolov5": NA * ((SIZE // 2) ** 2 + (SIZE // 4) ** 2), "yolov5_seg": NA * ((SIZE // 2) ** 2 + (SIZE // 4) ** 2),
           "yolov5_inplace": NA * ((SIZE // 2) ** 2 + (SIZE // 4) ** 2),
           "yolox": (SIZE // 2) ** 2 + (SIZE // 4) ** 2, "yolox_raw": (SIZE // 2) ** 2 + (SIZE // 4) ** 2,
           "yolov8_transposed": (SIZE // 2) ** 2 + (SIZE // 4) ** 2}
YOLOV5_NAMES = {"stride": "4", "names": "{0: 'person', 1: 'bicycle', 2: 'car'}"}


def build(kind: str) -> nn.Module:
    return {"yolov5": TinyYolo5, "yolov5_seg": lambda: TinyYolo5(masks=2), "yolov5_inplace": TinyYolo5InPlace,
            "yolox": TinyYolox,
            "yolox_raw": lambda: TinyYolox(decode=False), "yolov8_transposed": TransposedV8}[kind]()


def export(net: nn.Module, path, metadata: dict | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=["images"],
                          output_names=["output0"], opset_version=12, dynamo=False,
                          dynamic_axes={"images": {0: "n"}, "output0": {0: "n"}})
    model = onnx.load(str(path))
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module", params=["yolov5", "yolov5_seg", "yolov5_inplace", "yolox", "yolox_raw",
                                        "yolov8_transposed"])
def rows(request, tmp_path_factory):
    """The network, its file (YOLOv5's with the metadata its export writes), a batch of two, and
    whether the detector has objectness."""
    kind = request.param
    torch.manual_seed(3)
    net = build(kind).eval()
    path = export(net, tmp_path_factory.mktemp(kind) / "model.onnx", YOLOV5_NAMES if kind.startswith("yolov5") else None)
    x = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return kind, net, path, x, kind != "yolov8_transposed"


def confidences(out: torch.Tensor, objectness: bool) -> torch.Tensor:
    """(N, anchors, classes) what the detector reports for each class."""
    return out[..., 4:5] * out[..., 5:5 + CLASSES] if objectness else out[..., 4:4 + CLASSES]


def reference(net: nn.Module, x: np.ndarray, cls: int, objectness: bool):
    """torch.autograd of class ``cls``'s reported confidence at its most confident anchor, with the
    stride-2 map's activations and gradients."""
    store = {}

    def keep(_, __, out):
        out.retain_grad()
        store["a"] = out

    h = net.down1[0].register_forward_hook(keep)
    xt = torch.tensor(x, requires_grad=True)
    out = net(xt)
    conf = confidences(out, objectness)[0, :, cls]
    anchor = int(conf.argmax())
    conf[anchor].backward()
    h.remove()
    return (out.detach().numpy()[0], anchor, xt.grad.numpy()[0], store["a"].detach().numpy()[0],
            store["a"].grad.numpy()[0])


def test_the_rows_are_read_as_a_detector(rows):
    kind, net, path, _, objectness = rows
    m = onnxsal.load(path, preprocess=None)
    d = m.detection
    assert (d.classes, d.queries, d.reading) == (CLASSES, ANCHORS[kind], "scores")
    assert ("objectness x class" in d.source) == objectness
    assert m.n_targets == CLASSES
    conv = next(n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Conv" and "down1" in n.name)
    assert m.default_layer.tensor == conv           # the last map every anchor depends on
    if kind.startswith("yolov5"):
        assert m.labels == ["person", "bicycle", "car"] and m.preprocess.preset == "unit"


def test_class_targets_score_the_reported_confidence(rows):
    kind, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    for cls in range(CLASSES):
        out, anchor, gx, a, g = reference(net, x[:1], cls, objectness)
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max(),
                                   err_msg=f"{kind} class {cls}")
        cx, cy, w, h = out[anchor, :4]
        conf = out[anchor, 4] * out[anchor, 5 + cls] if objectness else out[anchor, 4 + cls]
        box = "" if kind == "yolox_raw" else f"centre ({cx:.0f}, {cy:.0f}), {w:.0f}x{h:.0f} px, "
        undecoded = " (the graph leaves its box undecoded)" if kind == "yolox_raw" else ""
        assert f"anchor {anchor}, {box}confidence {conf:.3g}{undecoded}" in sal.notes[0]
        expected = ref_cams(a, g)
        for name in ("gradcam", "gradcam++", "layercam", "hirescam"):
            got = ex.explain(x[:1], name, cls).raw[0]
            np.testing.assert_allclose(got, expected[name], rtol=1e-3, atol=1e-4 * np.abs(expected[name]).max() + 1e-12,
                                       err_msg=f"{kind} {name} class {cls}")


def test_integrated_gradients_integrate_the_product(rows):
    """IG's attributions sum to the change of objectness x class along the path: a cotangent fixed
    at the input (the product's gradient there) would not."""
    kind, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        clean = confidences(net(torch.tensor(x[:1])), objectness)[0]
        base = confidences(net(torch.zeros(1, 3, SIZE, SIZE)), objectness)[0]
    cls = 1
    anchor = int(clean[:, cls].argmax())
    res = ex.explain(x[:1], "ig", cls, steps=64)
    change = float(clean[anchor, cls] - base[anchor, cls])
    assert abs(res.info["completeness_gap"][0]) < 2e-3 * abs(change) + 1e-6, (kind, res.info["completeness_gap"], change)


def test_aug_smooth_finds_the_class_again_in_each_copy(rows):
    """pytorch-grad-cam's aug_smooth mirrors the image: the clean image's anchor then looks at the
    wrong place, so each copy scores the class's best anchor in its own output."""
    from onnxsal.postprocess import normalize, resize

    kind, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    cls, maps, moved = 1, [], False
    clean_anchor = reference(net, x[:1], cls, objectness)[1]
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xa = x[:1] * np.float32(factor)
            xa = np.ascontiguousarray(xa[..., ::-1]) if flip else xa
            _, anchor, _, a, g = reference(net, xa.astype(np.float32), cls, objectness)
            moved |= anchor != clean_anchor
            m = normalize(resize(ref_cams(a, g)["gradcam"][None], (SIZE, SIZE)))[0]
            maps.append(m[..., ::-1] if flip else m)
    assert moved, "no copy moved its best anchor: the check would not tell"
    got = ex.explain(x[:1], "gradcam", cls, aug_smooth=True).raw[0]
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=1e-4)


def test_default_targets_and_top_rank_classes_by_their_best_anchor(rows):
    kind, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = confidences(net(torch.tensor(x[:1])), objectness)[0].max(dim=0).values.numpy()
    order = list(np.argsort(-best, kind="stable"))
    res = ex.explain(x[:1], "saliency", top_k=2)
    assert [t.index for t in res.targets] == order[:2]
    assert [t["index"] for t in res.top(CLASSES)] == order
    np.testing.assert_allclose([t["score"] for t in res.top(CLASSES)], best[order], rtol=1e-5)


def test_each_image_of_a_batch_scores_its_own_anchor(rows):
    kind, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    results = ex.explain_batch(x, "saliency", targets=[2, 2])
    anchors = [reference(net, x[k:k + 1], 2, objectness)[1] for k in range(2)]
    assert anchors[0] != anchors[1]
    for k in range(2):
        _, _, gx, _, _ = reference(net, x[k:k + 1], 2, objectness)
        np.testing.assert_allclose(results[k].raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())


def test_exported_graph_of_anchor_rows_equals_explain(rows):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    kind, _, path, x, _ = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([2, 0], np.int64)
    for method in ("gradcam", "saliency", "ig"):
        sess = ort.InferenceSession(export_graph(path, method).SerializeToString())
        scores, maps = sess.run(["logits", "map"], {"images": x, "target": targets})
        assert scores.shape == (2, ANCHORS[kind], CLASSES)
        for k in range(2):
            ref = ex.explain(x[k:k + 1], method, int(targets[k]), **({"steps": 32} if method == "ig" else {}))
            np.testing.assert_allclose(maps[k], ref.map, atol=1e-5, err_msg=f"{kind} {method} image {k}")


def test_faithfulness_reads_the_reported_confidence(rows):
    from onnxsal.evaluate.faithfulness import probabilities

    _, net, path, x, objectness = rows
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = confidences(net(torch.tensor(x)), objectness)[:, :, 2].max(dim=1).values.numpy()
    np.testing.assert_allclose(probabilities(ex, x, 2), best, rtol=1e-5)


def test_the_class_count_decides_a_whole_sigmoid_block(tmp_path):
    """YOLOv5-seg's objectness and classes are one Sigmoid of their own, as a transposed YOLOv8's
    classes are: only the file's class names tell them apart. Without them the block is classes."""
    torch.manual_seed(3)
    net = build("yolov5_seg").eval()
    m = onnxsal.load(export(net, tmp_path / "bare.onnx"))
    assert (m.detection.classes, "objectness" in m.detection.source) == (CLASSES + 1, False)
    m = onnxsal.load(export(net, tmp_path / "named.onnx", YOLOV5_NAMES))
    assert (m.detection.classes, "objectness" in m.detection.source) == (CLASSES, True)
    names = {"stride": "4", "names": "['a', 'b', 'c', 'd']"}     # as many names as the block: no objectness
    m = onnxsal.load(export(net, tmp_path / "four.onnx", names))
    assert (m.detection.classes, m.labels) == (CLASSES + 1, ["a", "b", "c", "d"])


def test_the_graph_alone_finds_objectness(tmp_path):
    """Without metadata: YOLOv5's objectness shares its Sigmoid with the box, YOLOX's is a Sigmoid of
    one column of its own."""
    for kind in ("yolov5", "yolov5_inplace", "yolox"):
        torch.manual_seed(3)
        m = onnxsal.load(export(build(kind).eval(), tmp_path / f"{kind}.onnx"))
        assert (m.detection.classes, "objectness" in m.detection.source, m.labels) == (CLASSES, True, None), kind


def test_other_three_axis_outputs_are_not_anchor_rows(tmp_path):
    """Every column a sigmoid (a multi-label output per token), or none: no box to read."""

    class Tokens(nn.Module):
        def __init__(self, sigmoid_box: bool):
            super().__init__()
            self.conv, self.sigmoid_box = nn.Conv2d(3, 9, 4, stride=4), sigmoid_box

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)
            return t.sigmoid() if self.sigmoid_box else torch.cat([t[..., :4] * 2, t[..., 4:]], -1)

    for sigmoid_box in (True, False):
        path = export(Tokens(sigmoid_box).eval(), tmp_path / f"tokens{sigmoid_box}.onnx")
        assert onnxsal.load(path).detection is None


def test_a_yolov5_file_explains_from_the_command_line(tmp_path, capsys):
    """YOLOv5's export writes its class names and stride; its pixels are RGB in [0, 1]."""
    from PIL import Image

    torch.manual_seed(3)
    net = build("yolov5").eval()
    path = export(net, tmp_path / "yolov5.onnx", YOLOV5_NAMES)
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    assert main(["inspect", path]) == 0
    assert f"a detector's {ANCHORS['yolov5']} anchors, 3 classes (objectness x class" in capsys.readouterr().out
    assert main(["explain", path, str(tmp_path / "img.png"), "-m", "saliency", "-t", "car", "-o",
                 str(tmp_path / "out"), "-q"]) == 0
    res = np.load(tmp_path / "out" / "img.saliency.npy")
    x = torch.tensor(rgb.transpose(2, 0, 1)[None] / 255.0, dtype=torch.float32, requires_grad=True)
    conf = confidences(net(x), True)[0, :, 2]
    conf[int(conf.argmax())].backward()
    ref = x.grad.abs().amax(dim=1)[0].numpy()
    np.testing.assert_allclose(res, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-4)
