"""SSD-style detectors: each anchor's class confidences in one output, a softmax whose column 0 is
the background (SSD, UltraFace, RetinaFace), a sigmoid per class (RetinaNet exported without its
NMS) or one raw logit (BlazeFace), beside an (N, anchors, 4 [+ keypoints]) output of boxes. Read as a classifier, such an output's flattened
row made every (anchor, class) pair a "class", background included.

A class target scores the probability the detector reports for it (BlazeFace's logit) at its most
probable anchor.
Maps are checked against torch.autograd of that probability and against the CAM formulas on
PyTorch's activations and gradients.
"""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main

from hooks import kept
from test_gradient_methods import ref_cams

SIZE, PER_CELL = 16, 2
ANCHORS = PER_CELL * ((SIZE // 2) ** 2 + (SIZE // 4) ** 2)


class AnchorHead(nn.Module):
    """Two scales, ``PER_CELL`` anchors per cell, a 3x3 conv per scale for the classes and for the
    box, each permuted to (N, h, w, k * width) and viewed as (N, anchors, width), as these detectors'
    PyTorch code writes it. ``decode`` turns the offsets into corners (fractions of the image) with
    the priors, as UltraFace's and pytorch-ssd's exports do; RetinaFace's returns them raw."""

    def __init__(self, width: int, act: str = "softmax", order=("scores", "boxes"), decode: bool = True,
                 landmarks: int = 0, box_width: int = 4):
        super().__init__()
        self.width, self.act, self.order, self.decode, self.box_width = width, act, order, decode, box_width
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.down1 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.cls = nn.ModuleList(nn.Conv2d(8, PER_CELL * width, 3, padding=1) for _ in range(2))
        self.reg = nn.ModuleList(nn.Conv2d(8, PER_CELL * box_width, 3, padding=1) for _ in range(2))
        self.lmk = nn.ModuleList(nn.Conv2d(8, PER_CELL * landmarks, 1) for _ in range(2)) if landmarks else None
        priors = [[(j + .5) / n, (i + .5) / n, s * (k + 1) / SIZE, s * (k + 1) / SIZE]
                  for s, n in ((2, SIZE // 2), (4, SIZE // 4)) for i in range(n) for j in range(n) for k in range(PER_CELL)]
        self.register_buffer("priors", torch.tensor(priors))

    def per_anchor(self, heads, maps, width):
        n = maps[0].shape[0]
        return torch.cat([h(p).permute(0, 2, 3, 1).reshape(n, -1, width) for h, p in zip(heads, maps)], 1)

    def forward(self, x):
        p1 = self.down1(self.stem(x))
        maps = (p1, self.down2(p1))
        conf = self.per_anchor(self.cls, maps, self.width)
        loc = self.per_anchor(self.reg, maps, self.box_width)
        scores = {"softmax": lambda: torch.softmax(conf, dim=2), "sigmoid": lambda: torch.sigmoid(conf),
                  "logit": lambda: conf}[self.act]()
        outs = {"scores": scores, "boxes": loc}
        if self.decode:
            centre = self.priors[:, :2] + loc[..., :2] * 0.1 * self.priors[:, 2:]
            size = self.priors[:, 2:] * torch.exp(loc[..., 2:] * 0.2)
            outs["boxes"] = torch.cat([centre - size / 2, centre + size / 2], -1)
        if self.lmk is not None:
            outs["landmarks"] = self.per_anchor(self.lmk, maps, self.lmk[0].out_channels // PER_CELL)
        return tuple(outs[k] for k in self.order)


# kind: (network, output names in the file, the scores output, classes, column of class 0)
KINDS = {
    "ultraface": (lambda: AnchorHead(2), ("scores", "boxes"), "scores", 1, 1),
    "ssd": (lambda: AnchorHead(4), ("scores", "boxes"), "scores", 3, 1),
    "retinaface": (lambda: AnchorHead(2, order=("boxes", "scores", "landmarks"), decode=False, landmarks=10),
                   ("loc", "conf", "landms"), "conf", 1, 1),
    "retinanet": (lambda: AnchorHead(3, act="sigmoid", order=("boxes", "scores"), decode=False),
                  ("boxes", "scores"), "scores", 3, 0),
    # MediaPipe's: a box and six keypoints per anchor first, then one raw logit per anchor
    "blazeface": (lambda: AnchorHead(1, act="logit", order=("boxes", "scores"), decode=False, box_width=16),
                  ("regressors", "classificators"), "classificators", 1, 0),
}


def export(net: nn.Module, path, names, metadata: dict | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=["input"],
                          output_names=list(names), opset_version=13, dynamo=False,
                          dynamic_axes={"input": {0: "n"}, **{k: {0: "n"} for k in names}})
    model = onnx.load(str(path))
    for k, v in (metadata or {}).items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture(scope="module", params=list(KINDS))
def head(request, tmp_path_factory):
    kind = request.param
    build, names, scores, classes, first = KINDS[kind]
    torch.manual_seed(5)
    net = build().eval()
    path = export(net, tmp_path_factory.mktemp(kind) / "model.onnx", names)
    x = np.random.default_rng(5).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return kind, net, path, x


def probabilities(net: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """(N, anchors, classes) the probability the detector reports for each class."""
    _, names, scores, classes, first = KINDS[kind]
    out = net(x)
    return out[names.index(scores)][..., first:first + classes]


def reported(kind: str, scored: np.ndarray) -> np.ndarray:
    """What the detector reports for a scored value: a raw logit's probability is its sigmoid."""
    return 1.0 / (1.0 + np.exp(-scored)) if kind == "blazeface" else scored


def boxes_of(net: nn.Module, x: torch.Tensor, kind: str) -> np.ndarray:
    _, names, scores, _, _ = KINDS[kind]
    box_name = next(n for n in names if n != scores)
    return net(x)[names.index(box_name)].detach().numpy()


def reference(net: nn.Module, x: np.ndarray, cls: int, kind: str):
    """torch.autograd of class ``cls``'s probability at its most probable anchor, with the stride-2
    map's activations (after its ReLU) and gradients."""
    xt = torch.tensor(x, requires_grad=True)
    with kept(net.down1) as store:
        p = probabilities(net, xt, kind)[0, :, cls]
    anchor = int(p.argmax())
    p[anchor].backward()
    return float(p[anchor].detach()), anchor, xt.grad.numpy()[0], store["a"].detach().numpy()[0], store["a"].grad.numpy()[0]


def test_the_head_is_read_as_a_detector(head):
    kind, net, path, _ = head
    _, names, scores, classes, first = KINDS[kind]
    m = onnxsal.load(path, preprocess=None)
    d = m.detection
    assert (d.classes, d.queries, d.width, d.first) == (classes, ANCHORS, classes + first, first)
    assert m.output == m.logits == scores            # RetinaFace's and RetinaNet's boxes come first
    assert d.boxes == next(n for n in names if n != scores)
    assert m.n_targets == classes and m.activation is None
    relu = next(n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Relu" and "down1" in n.name)
    assert m.default_layer.tensor == relu            # the last map every anchor depends on


def test_class_targets_score_the_reported_probability(head):
    kind, net, path, x = head
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    box = boxes_of(net, torch.tensor(x[:1]), kind)[0]
    for cls in range(KINDS[kind][3]):
        p, anchor, gx, a, g = reference(net, x[:1], cls, kind)
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max(),
                                   err_msg=f"{kind} class {cls}")
        values = ", ".join(f"{v:.3g}" for v in box[anchor][:4])
        assert sal.notes[0].endswith(f"anchor {anchor}, probability {reported(kind, p):.3g}, box {values}")
        expected = ref_cams(a, g)
        for name in ("gradcam", "gradcam++", "layercam", "xgradcam"):
            got = ex.explain(x[:1], name, cls).raw[0]
            np.testing.assert_allclose(got, expected[name], rtol=1e-3, atol=1e-4 * np.abs(expected[name]).max() + 1e-12,
                                       err_msg=f"{kind} {name} class {cls}")


def test_default_targets_and_top_rank_classes_by_their_best_anchor(head):
    kind, net, path, x = head
    classes = KINDS[kind][3]
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = probabilities(net, torch.tensor(x[:1]), kind)[0].max(dim=0).values.numpy()
    order = list(np.argsort(-best, kind="stable"))
    res = ex.explain(x[:1], "saliency", top_k=min(2, classes))
    assert [t.index for t in res.targets] == order[:min(2, classes)]
    assert [t["index"] for t in res.top(classes)] == order
    np.testing.assert_allclose([t["score"] for t in res.top(classes)], reported(kind, best[order]), rtol=1e-5)


def test_integrated_gradients_are_complete_on_the_probability(head):
    """The ReLU kinks make the Riemann sum converge slowly (0.6 % at 64 steps, 0.02 % at 1024)."""
    kind, net, path, x = head
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        clean = probabilities(net, torch.tensor(x[:1]), kind)[0]
        base = probabilities(net, torch.zeros(1, 3, SIZE, SIZE), kind)[0]
    cls = KINDS[kind][3] - 1
    anchor = int(clean[:, cls].argmax())
    res = ex.explain(x[:1], "ig", cls, steps=1024)
    change = float(clean[anchor, cls] - base[anchor, cls])
    assert abs(res.info["completeness_gap"][0]) < 1e-3 * abs(change) + 1e-7, (kind, res.info["completeness_gap"], change)


def test_each_image_of_a_batch_scores_its_own_anchor(head):
    kind, net, path, x = head
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    results = ex.explain_batch(x, "saliency", targets=[0, 0])
    refs = [reference(net, x[k:k + 1], 0, kind) for k in range(2)]
    assert refs[0][1] != refs[1][1]
    for k in range(2):
        gx = refs[k][2]
        np.testing.assert_allclose(results[k].raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())


def test_exported_graph_of_anchor_classes_equals_explain(head):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    kind, _, path, x = head
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([KINDS[kind][3] - 1, 0], np.int64)
    for method in ("gradcam", "saliency", "ig"):
        sess = ort.InferenceSession(export_graph(path, method).SerializeToString())
        scores, maps = sess.run(["logits", "map"], {"input": x, "target": targets})
        assert scores.shape == (2, ANCHORS, KINDS[kind][3] + KINDS[kind][4])
        for k in range(2):
            ref = ex.explain(x[k:k + 1], method, int(targets[k]), **({"steps": 32} if method == "ig" else {}))
            np.testing.assert_allclose(maps[k], ref.map, atol=1e-5, err_msg=f"{kind} {method} image {k}")


def test_faithfulness_reads_the_reported_probability(head):
    from onnxsal.evaluate.faithfulness import probabilities as faithful

    kind, net, path, x = head
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = probabilities(net, torch.tensor(x), kind)[:, :, 0].max(dim=1).values.numpy()
    np.testing.assert_allclose(faithful(ex, x, 0), reported(kind, best), rtol=1e-5)


def test_a_label_list_that_names_the_background_drops_it(tmp_path):
    torch.manual_seed(5)
    path = export(AnchorHead(4), tmp_path / "ssd.onnx", ("scores", "boxes"))
    assert onnxsal.load(path, labels=["BACKGROUND", "cat", "dog", "car"]).labels == ["cat", "dog", "car"]
    assert onnxsal.load(path, labels=["cat", "dog", "car"]).labels == ["cat", "dog", "car"]


def test_the_box_output_is_the_one_of_four_values(tmp_path):
    """Landmarks listed first, boxes last: the landmarks are passed over as the scored output and
    the four-value output gives the note's box."""
    torch.manual_seed(5)
    net = AnchorHead(2, order=("landmarks", "scores", "boxes"), decode=False, landmarks=10)
    m = onnxsal.load(export(net, tmp_path / "lm.onnx", ("landms", "conf", "loc")))
    assert (m.output, m.detection.boxes) == ("conf", "loc")


def test_a_chosen_head_is_scored_as_asked(tmp_path):
    """``head=`` picks the boxes themselves: scored as they are, not switched to the confidences."""
    torch.manual_seed(5)
    build, names, *_ = KINDS["retinaface"]
    m = onnxsal.load(export(build(), tmp_path / "rf.onnx", names), head="loc")
    assert m.output == "loc" and m.detection is None and m.num_classes == ANCHORS * 4


class Recogniser(nn.Module):
    """A text recogniser's (N, steps, characters) softmax: no box output beside it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return torch.softmax(self.conv(x).mean(dim=2).permute(0, 2, 1), dim=2)


class TwoTaskRecogniser(Recogniser):
    """Two per-step softmaxes, one of them four wide: no box output either."""

    def __init__(self):
        super().__init__()
        self.four = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return super().forward(x), torch.softmax(self.four(x).mean(dim=2).permute(0, 2, 1), dim=2)


class AnchorAxisSoftmax(AnchorHead):
    """A softmax over the anchors, not over each anchor's classes."""

    def forward(self, x):
        scores, boxes = super().forward(x)
        return torch.softmax(torch.log(scores), dim=1), boxes


class FlatSoftmax(AnchorHead):
    """A softmax over every anchor and class at once, viewed back as (N, anchors, classes)."""

    def forward(self, x):
        scores, boxes = super().forward(x)
        flat = torch.softmax(torch.log(scores).reshape(-1, ANCHORS * self.width), dim=1)
        return flat.reshape(-1, ANCHORS, self.width), boxes


def test_outputs_that_are_no_anchor_head_are_left_as_they_were(tmp_path):
    torch.manual_seed(5)
    m = onnxsal.load(export(Recogniser(), tmp_path / "rec.onnx", ("probs",)))
    assert m.detection is None and m.num_classes == SIZE * 6
    m = onnxsal.load(export(TwoTaskRecogniser(), tmp_path / "two.onnx", ("chars", "kinds")))
    assert m.detection is None and m.num_classes == SIZE * 6
    for net in (AnchorAxisSoftmax(3), FlatSoftmax(3)):
        m = onnxsal.load(export(net, tmp_path / "axis.onnx", ("scores", "boxes")))
        assert m.detection is None and m.num_classes == ANCHORS * 3, type(net).__name__


def test_cli_reads_the_confidences_not_the_boxes_listed_first(tmp_path, capsys):
    """RetinaFace lists its box offsets first: inspect and explain score its face probability."""
    from PIL import Image

    torch.manual_seed(5)
    build, names, *_ = KINDS["retinaface"]
    net = build().eval()
    path = export(net, tmp_path / "rf.onnx", names)
    rgb = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "face.png")
    assert main(["inspect", path]) == 0
    assert f"a detector's {ANCHORS} anchors, 1 class (conf: a softmax per anchor, column 0 the background; boxes " \
        "in loc)" in capsys.readouterr().out
    assert main(["explain", path, str(tmp_path / "face.png"), "-m", "saliency", "--preprocess", "unit", "-o",
                 str(tmp_path / "out"), "-q"]) == 0
    res = np.load(tmp_path / "out" / "face.saliency.npy")
    x = torch.tensor(rgb.transpose(2, 0, 1)[None] / 255.0, dtype=torch.float32, requires_grad=True)
    p = probabilities(net, x, "retinaface")[0, :, 0]
    p[int(p.argmax())].backward()
    ref = x.grad.abs().amax(dim=1)[0].numpy()
    np.testing.assert_allclose(res, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-4)
    summary = json.loads((tmp_path / "out" / "face.json").read_text())
    assert any(f"anchor {int(p.argmax())}, probability" in n for n in summary["notes"])


def test_four_sigmoids_per_row_are_not_taken_for_classes(tmp_path):
    """DETR's pred_boxes are four sigmoids per query beside raw logits: a four-class sigmoid head
    with raw boxes has the same shapes and ops, so neither is read as an anchor head."""
    torch.manual_seed(5)
    m = onnxsal.load(export(AnchorHead(4, act="sigmoid", order=("boxes", "scores"), decode=False),
                            tmp_path / "four.onnx", ("boxes", "scores")))
    assert m.detection is None and m.output == "boxes"


def test_an_old_opset_softmax_is_read_by_what_it_normalises(tmp_path):
    """Before opset 13 a Softmax flattens its input at ``axis``: axis 2 of (N, anchors, classes) is
    each anchor's classes (UltraFace's own file is opset 9), axis 1 all anchors and classes at once."""
    torch.manual_seed(5)
    net = AnchorHead(4).eval()          # the "ssd" kind's head
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(tmp_path / "op11.onnx"), input_names=["input"],
                          output_names=["scores", "boxes"], opset_version=11, dynamo=False,
                          dynamic_axes={"input": {0: "n"}})
    model = onnx.load(str(tmp_path / "op11.onnx"))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    assert [(a.name, a.i) for a in softmax.attribute] == [("axis", 2)]
    m = onnxsal.load(str(tmp_path / "op11.onnx"))
    assert (m.detection.classes, m.detection.first) == (3, 1)
    x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    _, _, gx, _, _ = reference(net, x, 1, "ssd")
    sal = onnxsal.Explainer(str(tmp_path / "op11.onnx"), "cpu", preprocess="raw").explain(x, "saliency", 1)
    np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())
    softmax.attribute[0].i = 1
    onnx.save(model, str(tmp_path / "axis1.onnx"))
    m = onnxsal.load(str(tmp_path / "axis1.onnx"))
    assert m.detection is None and m.num_classes == ANCHORS * 4


def test_an_anchor_count_hidden_by_a_dynamic_size_is_read_off_a_run(tmp_path):
    """Exported with a dynamic height and width, the anchor count is unknown until the size is
    given; the pair is found from one run at that size."""
    torch.manual_seed(5)
    build, names, *_ = KINDS["retinaface"]
    net = build().eval()
    path = tmp_path / "dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, SIZE, SIZE),), str(path), input_names=["input"], output_names=list(names),
                          opset_version=13, dynamo=False,
                          dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, **{k: {0: "n", 1: "a"} for k in names}})
    declared = {vi.name: vi.type.tensor_type.shape.dim[1] for vi in onnx.load(str(path)).graph.output}
    assert all(d.dim_param for d in declared.values())
    m = onnxsal.load(str(path), size=(SIZE, SIZE))
    assert (m.output, m.detection.boxes, m.detection.queries) == ("conf", "loc", ANCHORS)
    x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    _, _, gx, _, _ = reference(net, x, 0, "retinaface")
    sal = onnxsal.Explainer(str(path), "cpu", preprocess="raw", size=(SIZE, SIZE)).explain(x, "saliency", 0)
    np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())


def test_the_anchor_is_picked_by_its_logit_where_probabilities_round_to_one(tmp_path):
    """MediaPipe's BlazePalm gives logits near 1300 on some images: every sigmoid is then 1, and the
    first anchor would win a pick by probability, in explain and in the exported graph alike."""
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    torch.manual_seed(5)
    build, names, *_ = KINDS["blazeface"]
    net = build().eval()
    with torch.no_grad():
        for conv in net.cls:
            conv.bias += 1000.0
    path = export(net, tmp_path / "loud.onnx", names)
    x = np.random.default_rng(5).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.tensor(x))[1][0, :, 0].numpy()
    assert logits.min() > 50 and int(logits.argmax()) != 0
    _, anchor, gx, _, _ = reference(net, x, 0, "blazeface")
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    sal = ex.explain(x, "saliency", 0)
    assert f"anchor {anchor}, probability 1," in sal.notes[0]
    np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())
    sess = ort.InferenceSession(export_graph(path, "saliency").SerializeToString())
    _, maps = sess.run(["logits", "map"], {"input": x, "target": np.array([0], np.int64)})
    np.testing.assert_allclose(maps[0], sal.map, atol=1e-5)
