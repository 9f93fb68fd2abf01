"""Detectors exported with their NonMaxSuppression, whose final detections come as separate
outputs: integer class indices beside their scores. mmdeploy's layout (``dets`` (N, K, 5): a box and
its score; ``labels`` (N, K)) and the EfficientNMS layout (``num_dets``, ``boxes``, ``scores``,
``labels``, K fixed). Read as a classifier, the first float output's flattened row made each box
value a "class"; before that, ``dets``' unknown K stopped the load.

A class target scores the class's most confident kept detection. NMS always keeps the most
confident box of each class, so the reference is torch.autograd of the class's highest score over
the anchors, with no NMS on the PyTorch side; the CAMs are checked against their formulas on
PyTorch's activations and gradients.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import TargetError
from onnxsal.labelled import ClassBest

from hooks import kept, varied_batch_norm
from test_gradient_methods import assert_cams

SIZE, CLASSES, KEEP = 32, 3, 20


class NMS(torch.autograd.Function):
    """ONNX's NonMaxSuppression in the graph; in the trace, any selection of the right form."""

    @staticmethod
    def forward(ctx, boxes, scores, most, iou, threshold):
        n, c, a = scores.shape
        return torch.tensor([[b, k, j] for b in range(n) for k in range(c) for j in range(min(3, a))], dtype=torch.long)

    @staticmethod
    def symbolic(g, boxes, scores, most, iou, threshold):
        return g.op("NonMaxSuppression", boxes, scores, most, iou, threshold)


class Detector(nn.Module):
    """A backbone, a sigmoid per class and a box per cell, then the NMS and one of the two output
    layouts. ``residual`` puts a BatchNorm residual block in the backbone; ``empty`` gives the last
    class a bias so low that no box of it passes the NMS's score threshold."""

    def __init__(self, layout: str, residual: bool = False, empty: bool = False):
        super().__init__()
        self.layout = layout
        layers = [nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()]
        self.residual = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)) if residual else None
        self.body = nn.Sequential(*layers)
        self.last = nn.ReLU()
        self.cls = nn.Conv2d(16, CLASSES, 1)
        self.reg = nn.Conv2d(16, 4, 1)
        if empty:
            with torch.no_grad():
                self.cls.bias[-1] = -30.0

    def features(self, x):
        f = self.body(x)
        return self.last(f + self.residual(f) if self.residual is not None else f)

    def head(self, x):
        """(N, anchors, classes) scores and (N, anchors, 4) corner boxes in pixels."""
        f = self.features(x)
        scores = self.cls(f).sigmoid().flatten(2).permute(0, 2, 1)
        d = self.reg(f).flatten(2).permute(0, 2, 1)
        centre = d[..., :2] * 4 + 16
        half = d[..., 2:].exp() * 4
        return scores, torch.cat([centre - half, centre + half], -1)

    def forward(self, x):
        n = x.shape[0]
        scores, boxes = self.head(x)
        per_class = scores.permute(0, 2, 1)                             # (N, classes, anchors)
        sel = NMS.apply(boxes, per_class, torch.LongTensor([200]), torch.tensor([0.5]), torch.tensor([0.05]))
        bi, ci, ai = sel[:, 0], sel[:, 1], sel[:, 2]
        s = per_class[bi, ci, ai]
        b = boxes[bi, ai]
        mine = bi.unsqueeze(0) == torch.arange(n).unsqueeze(1)         # (N, selected): this image's
        if self.layout == "mmdeploy":         # as mmdeploy's select_nms_index writes it
            dets = torch.cat([b, s.unsqueeze(1)], 1).unsqueeze(0).repeat(n, 1, 1)
            dets = dets.where(mine.unsqueeze(-1), dets.new_zeros(1))
            labels = ci.unsqueeze(0).repeat(n, 1).where(mine, ci.new_ones(1) * -1)
            dets = torch.cat((dets, dets.new_zeros((n, 1, 5))), 1)
            labels = torch.cat((labels, labels.new_zeros((n, 1))), 1)
            size = torch.tensor([dets.shape[1]]) if not torch.onnx.is_in_onnx_export() else \
                torch.tensor(dets.shape[1]).unsqueeze(0)
            k = torch.where(torch.tensor([KEEP]) < size, torch.tensor([KEEP]), size)
            _, top = dets[:, :, -1].topk(k if torch.onnx.is_in_onnx_export() else int(k), dim=1)
            rows = torch.arange(n).view(-1, 1).expand_as(top)
            return dets[rows, top], labels[rows, top]
        # EfficientNMS: num_dets, then K boxes, scores and labels per image, zeros after the last
        ranked = torch.cat([torch.where(mine, s.unsqueeze(0), s.new_zeros(1)), s.new_zeros((n, KEEP))], 1)
        values, top = ranked.topk(KEEP, dim=1)
        padded_boxes = torch.cat([b, b.new_zeros((KEEP, 4))], 0)
        padded_labels = torch.cat([ci, ci.new_zeros(KEEP)], 0)
        return ((values > 0).sum(1, keepdim=True).to(torch.int32), padded_boxes[top], values,
                padded_labels[top].to(torch.int32))


LAYOUTS = {"mmdeploy": (("dets", "labels"), 11), "efficientnms": (("num_dets", "boxes", "scores", "labels"), 17)}


def export(net: nn.Module, path) -> str:
    names, opset = LAYOUTS[net.layout]
    dyn = {"input": {0: "batch"}, **{k: {0: "batch", 1: "num_dets"} for k in names if k != "num_dets"}}
    if net.layout == "efficientnms":
        dyn = {"input": {0: "batch"}, **{k: {0: "batch"} for k in names}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.rand(1, 3, SIZE, SIZE),), str(path), input_names=["input"],
                          output_names=list(names), opset_version=opset, dynamo=False, dynamic_axes=dyn)
    return str(path)


def detector(layout: str, residual: bool = False, empty: bool = False, seed: int = 0) -> Detector:
    torch.manual_seed(seed)
    net = Detector(layout, residual, empty).eval()
    varied_batch_norm(net)           # the residual block's; the others have none
    return net


@pytest.fixture(scope="module", params=[("mmdeploy", False), ("efficientnms", True)], ids=["mmdeploy", "efficientnms"])
def det(request, tmp_path_factory):
    layout, residual = request.param
    net = detector(layout, residual)
    path = export(net, tmp_path_factory.mktemp(layout) / "model.onnx")
    x = np.random.default_rng(7).uniform(0, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    return layout, net, path, x


def reference(net: Detector, x: np.ndarray, cls: int):
    """Class ``cls``'s highest score over the anchors (the box NMS keeps first), its anchor and box,
    and torch.autograd of it: input gradient, and the last backbone map's activations and gradient."""
    xt = torch.tensor(x, requires_grad=True)
    with kept(net.last) as store:
        scores, boxes = net.head(xt)
    anchor = int(scores[0, :, cls].argmax())
    scores[0, anchor, cls].backward()
    return (float(scores[0, anchor, cls].detach()), boxes[0, anchor].detach().numpy(), xt.grad.numpy()[0],
            store["a"].detach().numpy()[0], store["a"].grad.numpy()[0])


def last_relu(path: str) -> str:
    return next(n.output[0] for n in reversed(onnx.load(path).graph.node) if n.op_type == "Relu")


def test_the_outputs_are_read_as_final_detections(det):
    layout, _, path, _ = det
    m = onnxsal.load(path, preprocess=None)
    assert isinstance(m.detection, ClassBest) and m.detection.classes == CLASSES == m.n_targets
    assert m.activation is None and m.output == m.logits
    scores = "dets" if layout == "mmdeploy" else "scores"
    assert m.detection.describe().startswith(f"a detector's final detections ({'column 4 of ' * (layout == 'mmdeploy')}"
                                             f"{scores} by labels, after NonMaxSuppression")
    assert m.default_layer.tensor == last_relu(path)


def test_each_class_scores_its_most_confident_detection(det):
    layout, net, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    layer = last_relu(path)
    for cls in range(CLASSES):
        score, box, gx, a, g = reference(net, x[:1], cls)
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max(),
                                   err_msg=f"{layout} class {cls}")
        assert sal.notes[0] == (f"class {cls}: its most confident box, score {score:.3g}, box "
                                + ", ".join(f"{v:.4g}" for v in box) + " (as the file gives it)")
        assert_cams(ex, x[:1], cls, a, g, f"{layout} class {cls}", layer=layer)


def test_default_target_and_top_rank_classes_by_their_best_detection(det):
    layout, net, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = net.head(torch.tensor(x[:1]))[0][0].max(dim=0).values.numpy()
    order = [int(c) for c in np.argsort(-best, kind="stable")]
    res = ex.explain(x[:1], "saliency")
    assert res.targets[0].index == order[0]
    assert [t["index"] for t in res.top(CLASSES)] == order
    np.testing.assert_allclose([t["score"] for t in res.top(CLASSES)], best[order], rtol=1e-5)


def test_each_image_of_a_batch_scores_its_own_detection(det):
    """mmdeploy's rows of the other image hold a label of -1 and zeros."""
    layout, net, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    results = ex.explain_batch(x, "saliency", targets=[1, 1])
    for k in range(2):
        _, _, gx, _, _ = reference(net, x[k:k + 1], 1)
        np.testing.assert_allclose(results[k].raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max())


def test_integrated_gradients_are_complete_on_the_score(det):
    """The baseline's own most confident box of the class is the path's other end."""
    layout, net, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        clean = net.head(torch.tensor(x[:1]))[0][0, :, 0].max()
        base = net.head(torch.zeros(1, 3, SIZE, SIZE))[0][0, :, 0].max()
    res = ex.explain(x[:1], "ig", 0, steps=1024)
    change = float(clean - base)
    assert abs(res.info["completeness_gap"][0]) < 2e-3 * abs(change) + 1e-6, (layout, res.info["completeness_gap"], change)


def test_the_exported_graph_picks_each_image_s_detection(det):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    layout, _, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([2, 0], np.int64)
    for method in ("gradcam", "saliency"):
        sess = ort.InferenceSession(export_graph(path, method).SerializeToString())
        scores, maps = sess.run(["logits", "map"], {"input": x, "target": targets})
        assert scores.shape == (2, CLASSES)
        for k in range(2):
            np.testing.assert_allclose(maps[k], ex.explain(x[k:k + 1], method, int(targets[k])).map, atol=1e-5,
                                       err_msg=f"{layout} {method} image {k}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_class_without_a_kept_detection_is_refused(layout, tmp_path):
    net = detector(layout, empty=True)
    path = export(net, tmp_path / "model.onnx")
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)
    with pytest.raises(TargetError, match="class 2 has no detection in this image"):
        ex.explain(x, "saliency", CLASSES - 1)
    assert [t["index"] for t in ex.explain(x, "saliency").top(CLASSES)] != [] and \
        CLASSES - 1 not in [t["index"] for t in ex.explain(x, "saliency").top(CLASSES)]


def test_cli_reads_the_detections(det, tmp_path, capsys):
    layout, _, path, _ = det
    assert main(["inspect", path]) == 0
    assert "final detections" in capsys.readouterr().out
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3))).astype(np.uint8)).save(tmp_path / "i.png")
    assert main(["explain", path, str(tmp_path / "i.png"), "-m", "gradcam", "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 0
    assert main(["explain", path, str(tmp_path / "i.png"), "-t", str(CLASSES), "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 2


def test_outputs_without_declared_dims_are_matched_by_a_run(tmp_path):
    """A file that declares no K (or names it apart in each output) is read off one run; another
    (N, anchors) float output beside it, whose dims are not declared either, is no score list."""
    path = export(detector("mmdeploy"), tmp_path / "model.onnx")
    model = onnx.load(path)
    nms = next(n for n in model.graph.node if n.op_type == "NonMaxSuppression")
    model.graph.node.append(onnx.helper.make_node("ReduceMax", [nms.input[1]], ["best_class"], axes=[1], keepdims=0))
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info("best_class", onnx.TensorProto.FLOAT, [None, None]))
    for vi in model.graph.output:
        for d in vi.type.tensor_type.shape.dim:
            d.Clear()
    onnx.save(model, str(tmp_path / "bare.onnx"))
    m = onnxsal.load(str(tmp_path / "bare.onnx"), preprocess=None)
    assert isinstance(m.detection, ClassBest) and m.detection.source.startswith("column 4 of dets by labels")


def test_faithfulness_reads_the_class_s_best_kept_score(det):
    """Deletion and insertion read the class's best kept score in each image, not a softmax of the
    per-class scores."""
    from onnxsal.evaluate.faithfulness import probabilities as faithful

    layout, net, path, x = det
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        best = net.head(torch.tensor(x))[0][:, :, 1].max(dim=1).values.numpy()
    np.testing.assert_allclose(faithful(ex, x, 1), best, rtol=1e-5)
