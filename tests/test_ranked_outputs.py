"""Classifiers exported with their top-k: the file outputs the k best values (and their class
indices), not a score per class. Read as they are, the k values were k "classes" naming ranks: class
0 was whichever class came first in each image, and a class index of k or more was out of range.
onnxsal scores the tensor the TopK ranks, every class in its own column.

Maps are checked against torch.autograd of the class's logit (before the softmax the TopK ranks)
and against the CAM formulas on PyTorch's activations and gradients, on two networks.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import TargetError

from hooks import kept, varied_batch_norm
from test_gradient_methods import assert_cams

CLASSES, K = 10, 3


class Plain(nn.Module):
    """Conv, ReLU, pool, linear: the softmax's probabilities ranked, values and indices both out."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, CLASSES))

    def forward(self, x):
        return torch.softmax(self.head(self.body(x)), dim=1).topk(K, dim=1)


class RuntimeFlatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class Residual(nn.Module):
    """A residual block with BatchNorm; the raw logits ranked, indices listed first. Its flatten
    takes the batch from the tensor's shape at run time, which hides the logits' width from shape
    inference."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.body = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), RuntimeFlatten(), nn.Linear(8, CLASSES))

    def forward(self, x):
        h = self.stem(x)
        values, indices = self.head(self.body(h + self.block(h))).topk(K, dim=1)
        return indices, values


NETS = {"plain": (Plain, ("probs", "classes"), "softmax"), "residual": (Residual, ("classes", "logits"), None)}


def export(net: nn.Module, path, names) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(path), input_names=["image"], output_names=list(names),
                          opset_version=13, dynamo=False, dynamic_axes={"image": {0: "n"}, **{k: {0: "n"} for k in names}})
    return str(path)


def logits_of(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The scores the network's TopK ranks, before its softmax."""
    return net.head(net.body(x) if isinstance(net, Plain) else net.body(net.stem(x) + net.block(net.stem(x))))


@pytest.fixture(scope="module", params=list(NETS))
def ranked(request, tmp_path_factory):
    build, names, _ = NETS[request.param]
    torch.manual_seed(3)
    net = build().eval()
    varied_batch_norm(net)
    path = export(net, tmp_path_factory.mktemp(request.param) / "model.onnx", names)
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return request.param, net, path, x


def test_the_ranked_scores_are_scored(ranked):
    kind, net, path, _ = ranked
    _, names, activation = NETS[kind]
    m = onnxsal.load(path, preprocess=None)
    top = next(n for n in onnx.load(path).graph.node if n.op_type == "TopK")
    assert m.output == top.input[0] and m.num_classes == m.n_targets == CLASSES
    assert m.activation == activation
    values = names[0] if kind == "plain" else names[1]
    assert m.output_note.startswith(f"{values} lists the top {K} of {CLASSES} class scores")


def test_every_class_matches_torch_autograd(ranked):
    """Classes outside the top k included: each has its own column, whatever its rank."""
    kind, net, path, x = ranked
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    layer = net.body[-1] if kind == "plain" else net.body
    with torch.no_grad():
        ranks = logits_of(net, torch.tensor(x[:1]))[0].argsort(descending=True).numpy()
    for cls in (int(ranks[0]), int(ranks[1]), int(ranks[-1])):
        xt = torch.tensor(x[:1], requires_grad=True)
        with kept(layer) as store:
            logits_of(net, xt)[0, cls].backward()
        gx = xt.grad.numpy()[0]
        sal = ex.explain(x[:1], "saliency", cls)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max(),
                                   err_msg=f"{kind} class {cls}")
        a, g = store["a"].detach().numpy()[0], store["a"].grad.numpy()[0]
        assert_cams(ex, x[:1], cls, a, g, f"{kind} class {cls}", layer=ex.model.default_layer.tensor)


def test_default_target_and_top_name_classes_not_ranks(ranked):
    kind, net, path, x = ranked
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        logits = logits_of(net, torch.tensor(x))
    for k in range(2):
        order = logits[k].argsort(descending=True).numpy()
        res = ex.explain(x[k:k + 1], "saliency")
        assert res.targets[0].index == int(order[0])
        assert [t["index"] for t in res.top(CLASSES)] == [int(c) for c in order]
        assert any("top 3 of 10" in n for n in res.notes)


def test_a_class_past_the_model_s_classes_is_refused(ranked):
    kind, _, path, x = ranked
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with pytest.raises(TargetError):
        ex.explain(x[:1], "saliency", CLASSES)


def test_the_exported_graph_scores_classes(ranked):
    import onnxruntime as ort

    from onnxsal.export import export as export_graph

    kind, _, path, x = ranked
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([CLASSES - 1, 2], np.int64)
    sess = ort.InferenceSession(export_graph(path, "gradcam").SerializeToString())
    scores, maps = sess.run(["logits", "map"], {"image": x, "target": targets})
    assert scores.shape == (2, CLASSES)
    for k in range(2):
        np.testing.assert_allclose(maps[k], ex.explain(x[k:k + 1], "gradcam", int(targets[k])).map, atol=1e-5)


def test_cli_names_the_ranked_scores(ranked, tmp_path, capsys):
    kind, _, path, _ = ranked
    assert main(["inspect", path]) == 0
    shown = capsys.readouterr().out
    assert f"({CLASSES} classes)" in shown and f"top {K} of {CLASSES} class scores" in shown
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "black.png")
    assert main(["explain", path, str(tmp_path / "black.png"), "--target", str(CLASSES), "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 2
    assert "out of range" in capsys.readouterr().err


def hand_topk(path) -> str:
    """A TopK over logits whose width hides behind a reshape target computed with Max."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             nh.from_array(rng.standard_normal((4, 10)).astype(np.float32), "fc"),
             nh.from_array(np.array([0], np.int64), "zero"), nh.from_array(np.array([1], np.int64), "one"),
             nh.from_array(np.array([-1], np.int64), "minus"), nh.from_array(np.array([3], np.int64), "k"),
             nh.from_array(np.array([-1, -1], np.int64), "floor")]
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Relu", ["c"], ["r"]),
             h.make_node("GlobalAveragePool", ["r"], ["g"]), h.make_node("Shape", ["g"], ["s"]),
             h.make_node("Slice", ["s", "zero", "one"], ["n"]), h.make_node("Concat", ["n", "minus"], ["t0"], axis=0),
             h.make_node("Max", ["t0", "floor"], ["t"]), h.make_node("Reshape", ["g", "t"], ["flat"]),
             h.make_node("MatMul", ["flat", "fc"], ["logits"]),
             h.make_node("TopK", ["logits", "k"], ["values", "indices"], axis=-1)]
    graph = h.make_graph(nodes, "hand", [h.make_tensor_value_info("x", T.FLOAT, ["n", 3, 8, 8])],
                         [h.make_tensor_value_info("values", T.FLOAT, ["n", 3]),
                          h.make_tensor_value_info("indices", T.INT64, ["n", 3])], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 13)]), path)
    return path


def test_class_count_hidden_from_shape_inference_is_read_off_a_run(tmp_path):
    m = onnxsal.load(hand_topk(str(tmp_path / "hand.onnx")), preprocess=None)
    assert m.output == "logits" and m.num_classes == 10
    assert m.output_note.startswith("values lists the top 3 of 10 class scores")


def test_topk_over_other_axes_is_left_as_it_is(tmp_path):
    """A TopK over anchors of (N, anchors, classes), or over a batch, ranks no classes of one image."""

    class Anchors(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            per_anchor = self.conv(x).flatten(2).transpose(1, 2)          # (N, 256, 4)
            return per_anchor.topk(5, dim=1).values                        # (N, 5, 4)

    class Batch(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x):
            return self.body(x).topk(1, dim=0).values                     # (1, 4): the batch's best

    for net, name in ((Anchors(), "a"), (Batch(), "b")):
        m = onnxsal.load(export(net.eval(), tmp_path / f"{name}.onnx", ("best",)), preprocess=None)
        assert m.output == "best" and not m.output_note, name
