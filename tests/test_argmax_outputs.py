"""Models exported with only their prediction: an ArgMax over the classes (a classifier's label,
a segmentation model's mask). Such a file has no floating-point output, and was refused. The
scores the ArgMax picks from hold every class; onnxsal scores them, with a note.

Maps are checked against torch.autograd of the scores before the ArgMax (the logits before a
softmax), on a classifier, a residual classifier whose label keeps its axis, and a segmentation
network whose mask is (N, H, W).
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import ModelError

from hooks import varied_batch_norm

CLASSES = 5


class Label(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))

    def logits(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        return torch.softmax(self.logits(x), 1).argmax(1).to(torch.int32)          # a Cast after the ArgMax


class KeptAxis(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))

    def logits(self, x):
        h = self.stem(x)
        return self.head(h + self.block(h))

    def forward(self, x):
        return self.logits(x).argmax(1, keepdim=True)


class Mask(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(8, CLASSES, 1))

    def logits(self, x):
        return self.net(x)

    def forward(self, x):
        return self.logits(x).argmax(1)


NETS = {"label": Label, "kept_axis": KeptAxis, "mask": Mask}


def export(net: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"],
                          output_names=["prediction"], opset_version=13, dynamo=False,
                          dynamic_axes={"image": {0: "n"}, "prediction": {0: "n"}})
    return str(path)


@pytest.fixture(scope="module", params=list(NETS))
def predicted(request, tmp_path_factory):
    torch.manual_seed(4)
    net = NETS[request.param]().eval()
    varied_batch_norm(net)
    path = export(net, tmp_path_factory.mktemp(request.param) / "model.onnx")
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16)).astype(np.float32)
    return request.param, net, path, x


def test_the_scores_the_argmax_picks_from_are_scored(predicted):
    kind, _, path, _ = predicted
    m = onnxsal.load(path, preprocess=None)
    arg = next(n for n in onnx.load(path).graph.node if n.op_type == "ArgMax")
    assert m.output == arg.input[0] and m.n_targets == CLASSES
    assert (m.dense is not None) == (kind == "mask")
    assert m.output_note.startswith(f"prediction is the ArgMax of {CLASSES} class scores")


def test_each_class_matches_torch_autograd(predicted):
    kind, net, path, x = predicted
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        logits = net.logits(torch.tensor(x))
    for cls in range(CLASSES):
        xt = torch.tensor(x, requires_grad=True)
        z = net.logits(xt)
        if kind == "mask":
            won = (logits.argmax(1) == cls).float()
            score = (z[:, cls] * won).sum() if won.any() else z[:, cls].sum()
        else:
            score = z[0, cls]
        score.backward()
        g = xt.grad.numpy()[0]
        got = ex.explain(x, "saliency", cls).raw[0]
        np.testing.assert_allclose(got, np.abs(g).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(g).max(),
                                   err_msg=f"{kind} class {cls}")


def test_the_default_target_is_the_model_s_prediction(predicted):
    kind, net, path, x = predicted
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    res = ex.explain(x, "gradcam")
    with torch.no_grad():
        pred = net(torch.tensor(x)).numpy().reshape(-1)
    if kind != "mask":
        assert res.targets[0].index == int(pred[0])
    assert any(n.startswith("prediction is the ArgMax") for n in res.notes)


def test_exported_and_cli(predicted, tmp_path, capsys):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    kind, _, path, x = predicted
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    sess = ort.InferenceSession(export_graph(path, "saliency").SerializeToString())
    _, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([3], np.int64)})
    np.testing.assert_allclose(maps[0], ex.explain(x, "saliency", 3).map, atol=1e-5)
    assert main(["inspect", path]) == 0
    assert "ArgMax" in capsys.readouterr().out


class Peaks(nn.Module):
    """A keypoint model's peaks: each heatmap's brightest pixel, over the flattened map or a row."""

    def __init__(self, flat: bool):
        super().__init__()
        self.flat = flat
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        maps = self.conv(x)
        return maps.reshape(1, 2, 256).argmax(2) if self.flat else maps.argmax(3)


@pytest.mark.parametrize("flat", [True, False], ids=["flattened", "rows"])
def test_an_argmax_over_another_axis_is_still_refused(flat, tmp_path):
    """The position of the brightest pixel names no class."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Peaks(flat).eval(), (torch.randn(1, 3, 16, 16),), str(tmp_path / "peak.onnx"),
                          input_names=["image"], output_names=["peaks"], opset_version=13, dynamo=False)
    with pytest.raises(ModelError, match="no floating-point output to score"):
        onnxsal.load(str(tmp_path / "peak.onnx"), preprocess=None)


def test_a_head_naming_the_label_scores_what_it_picks_from(tmp_path):
    """A multi-task file's label output named with --head: its ArgMax's scores, as without --head."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.age, self.kind = nn.Linear(4, 1), nn.Linear(4, CLASSES)

        def forward(self, x):
            f = self.body(x)
            return self.age(f), self.kind(f).argmax(1)

    path = str(tmp_path / "two.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Two().eval(), torch.randn(1, 3, 16, 16), path, input_names=["image"],
                          output_names=["age", "kind"], opset_version=13, dynamo=False)
    m = onnxsal.load(path, head="kind", preprocess=None)
    arg = next(n for n in onnx.load(path).graph.node if n.op_type == "ArgMax")
    assert m.output == arg.input[0] and m.num_classes == CLASSES
    assert m.output_note.startswith(f"kind is the ArgMax of {CLASSES} class scores")
    assert onnxsal.load(path, preprocess=None).output == "age"
