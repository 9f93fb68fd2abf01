"""Activations written out by hand export as elementwise nodes, not as a Sigmoid or a Softmax:
``1 / (1 + exp(-z))``, ``exp(z) / (1 + exp(z))``, ``exp(z) / exp(z).sum(1, keepdim=True)`` (and
its stable form with ``z - z.max()`` first). Read as the output itself, a softmax's probabilities
were scored as the "logits", and a sigmoid map's pixels were all of them ("above 0"). Each is
read as its op (graph/written.py); checked against torch.autograd of z and of the activation, on
classifiers, multi-label heads and per-pixel networks."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal


class Written(nn.Module):
    def __init__(self, stable: bool, dense: bool):
        super().__init__()
        torch.manual_seed(7)
        self.stable, self.dense = stable, dense
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1) if dense else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                                    nn.Linear(8, 5))

    def logits(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        z = self.logits(x)
        if self.stable:
            z = z - z.max(dim=1, keepdim=True).values
        e = torch.exp(z)
        return e / e.sum(dim=1, keepdim=True)


def export(net: nn.Module, path: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["p"], opset_version=13,
                          dynamo=False, dynamic_axes={"x": {0: "n"}})
    return path


@pytest.mark.parametrize("dense", [False, True], ids=["classifier", "per-pixel"])
@pytest.mark.parametrize("stable", [False, True], ids=["plain", "stable"])
def test_the_logits_are_those_before_the_written_softmax(stable, dense, tmp_path):
    net = Written(stable, dense).eval()
    ex = onnxsal.Explainer(export(net, str(tmp_path / "w.onnx")), "cpu", preprocess="raw")
    assert ex.model.activation == "softmax" and ex.model.output == "p" and ex.model.logits != "p"
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        z = net.logits(torch.tensor(x))[0]
    for score in ("logit", "probability"):
        for c in range(z.shape[0]):
            own = (z.argmax(dim=0) == c).float() if dense else None
            if own is not None and not own.any():
                own = torch.ones_like(own)
            xt = torch.tensor(x, requires_grad=True)
            v = net.logits(xt)[0] if score == "logit" else torch.softmax(net.logits(xt), dim=1)[0]
            (v[c] if own is None else (v[c] * own).sum()).backward()
            want = np.abs(xt.grad.numpy()[0]).max(axis=0)
            got = ex.explain(x, "saliency", c, score=score).raw[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max(), err_msg=f"{score} class {c}")
    assert any("before the final softmax" in n for n in ex.explain(x, "saliency").notes)


def test_a_division_by_a_sum_without_exp_is_the_output_itself(tmp_path):
    """x / sum(x) (a normalisation of positive values) is no softmax: the output stays the score."""
    class Normalised(Written):
        def forward(self, x):
            z = torch.relu(self.logits(x)) + 1
            return z / z.sum(dim=1, keepdim=True)

    m = onnxsal.load(export(Normalised(False, False).eval(), str(tmp_path / "n.onnx")))
    assert m.activation is None and m.logits == "p"


def test_a_softmax_over_a_map_s_pixels_is_no_class_activation(tmp_path):
    """A spatial softmax (each map normalised over its pixels, as a soft-argmax keypoint head does)
    is left as the output: the classes do not compete there."""
    class Spatial(Written):
        def forward(self, x):
            e = torch.exp(self.logits(x))
            return e / e.sum(dim=(2, 3), keepdim=True)

    m = onnxsal.load(export(Spatial(False, True).eval(), str(tmp_path / "s.onnx")))
    assert m.activation is None and m.logits == "p" and m.dense is not None


SIGMOIDS = {
    "reciprocal": lambda z: torch.reciprocal(1 + torch.exp(-z)),
    "divide": lambda z: 1 / (torch.exp(-z) + 1),
    "exp-ratio": lambda z: torch.exp(z) / (1 + torch.exp(z)),
}


class WrittenSigmoid(nn.Module):
    """A backbone, then ``units`` logits (a binary or multi-label classifier) or ``units`` maps
    (``dense``), through a sigmoid spelled out as ``spelling``."""

    def __init__(self, spelling: str, units: int, dense: bool = False, scale: float = 1.0, shift: float = 0.0):
        super().__init__()
        torch.manual_seed(3)
        self.spelling, self.scale, self.shift = spelling, scale, shift
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, units, 1) if dense else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                                        nn.Linear(8, units))

    def logits(self, x):
        return self.head(self.body(x)) * self.scale + self.shift

    def forward(self, x):
        return SIGMOIDS[self.spelling](self.logits(x))


X = np.random.default_rng(5).standard_normal((1, 3, 16, 16)).astype(np.float32)


def _torch_saliency(f, c, own=None):
    xt = torch.tensor(X, requires_grad=True)
    v = f(xt)[0]
    (v[c] if own is None else (v[c] * own).sum()).backward()
    return np.abs(xt.grad.numpy()[0]).max(axis=0)


@pytest.mark.parametrize("units", [1, 3], ids=["binary", "multi-label"])
@pytest.mark.parametrize("spelling", list(SIGMOIDS))
def test_a_written_sigmoid_s_logits_are_z(spelling, units, tmp_path):
    net = WrittenSigmoid(spelling, units).eval()
    ex = onnxsal.Explainer(export(net, str(tmp_path / "s.onnx")), "cpu", preprocess="raw")
    m = ex.model
    assert m.activation == "sigmoid" and m.output == "p" and m.logits != "p"
    assert m.written and "Sigmoid" in m.written[0]
    assert not any(n.op_type in ("Exp", "Reciprocal", "Neg") for n in m.light.graph.node)   # the pieces are gone
    for c in range(units):
        for score, f in (("logit", net.logits), ("probability", lambda x: torch.sigmoid(net.logits(x)))):
            want = _torch_saliency(f, c)
            got = ex.explain(X, "saliency", c, score=score).raw[0]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max(), err_msg=f"{score} {c}")


@pytest.mark.parametrize("maps", [1, 3])
@pytest.mark.parametrize("spelling", list(SIGMOIDS))
def test_written_sigmoid_maps_pixels_are_those_above_one_half(spelling, maps, tmp_path):
    """(N, maps, H, W): a map's pixels are where its own p > 0.5 (a binary segmentation's
    foreground; each of several maps on its own), not every pixel nor an argmax over the maps."""
    net = WrittenSigmoid(spelling, maps, dense=True, scale=4.0, shift=-1.0 if maps == 1 else 0.0).eval()
    ex = onnxsal.Explainer(export(net, str(tmp_path / "m.onnx")), "cpu", preprocess="raw")
    c = maps - 1
    with torch.no_grad():
        p = torch.sigmoid(net.logits(torch.tensor(X)))[0]
    own = (p[c] > 0.5).float()
    assert 0 < own.mean() < 1                          # the check tells "above 0.5" from every pixel
    if maps > 1:
        assert (own != (p.argmax(dim=0) == c).float()).any()     # and from the maps' argmax
    want = _torch_saliency(lambda x: torch.sigmoid(net.logits(x)), c, own)
    got = ex.explain(X, "saliency", c).raw[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())


def test_a_shift_by_another_axis_max_is_kept(tmp_path):
    """softmax over the classes of z - max over the rows is no softmax of z: the logits are
    z - max, as written (the stable form subtracts the max over the softmax's own axis)."""
    class Shifted(Written):
        def forward(self, x):
            z = self.logits(x)
            z = z - z.max(dim=2, keepdim=True).values
            e = torch.exp(z)
            return e / e.sum(dim=1, keepdim=True)

    net = Shifted(False, True).eval()
    ex = onnxsal.Explainer(export(net, str(tmp_path / "shifted.onnx")), "cpu", preprocess="raw")
    assert ex.model.activation == "softmax"
    with torch.no_grad():
        z = net.logits(torch.tensor(X))
        z = (z - z.max(dim=2, keepdim=True).values)[0]
    own = (z.argmax(dim=0) == 1).float()
    want = _torch_saliency(lambda x: net.logits(x) - net.logits(x).max(dim=2, keepdim=True).values, 1, own)
    got = ex.explain(X, "saliency", 1, score="logit").raw[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())


def test_a_saturated_written_sigmoid_has_a_finite_gradient(tmp_path):
    """Written out, the sigmoid's backward is 0 * exp(-z) = 0 * inf = NaN where z < -88; read as
    a Sigmoid it is y (1 - y), 0 there."""
    net = WrittenSigmoid("divide", 1, scale=-1e4).eval()
    with torch.no_grad():
        z = float(net.logits(torch.tensor(X))[0, 0])
    assert z < -100
    ex = onnxsal.Explainer(export(net, str(tmp_path / "s.onnx")), "cpu", preprocess="raw")
    got = ex.explain(X, "saliency", 0, score="probability").raw[0]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _torch_saliency(lambda x: torch.sigmoid(net.logits(x)), 0), atol=1e-30)


@pytest.mark.parametrize("form", ["two-plus", "not-negated", "ratio-of-others"])
def test_other_spellings_are_the_output_itself(form, tmp_path):
    """1 / (2 + exp(-z)), 1 / (1 + exp(z)) and exp(z) / (1 + exp(w)) are no sigmoid of z."""
    class Other(WrittenSigmoid):
        def forward(self, x):
            z = self.logits(x)
            if form == "two-plus":
                return 1 / (2 + torch.exp(-z))
            if form == "not-negated":
                return 1 / (1 + torch.exp(z))
            return torch.exp(z) / (1 + torch.exp(z * 2))

    m = onnxsal.load(export(Other("divide", 3).eval(), str(tmp_path / "o.onnx")))
    assert m.activation is None and m.logits == "p" and not m.written


def test_a_piece_another_node_reads_stays(tmp_path):
    """exp(-z) also read elsewhere (a second output here) keeps its node; the sigmoid still reads z."""
    class Shared(WrittenSigmoid):
        def forward(self, x):
            e = torch.exp(-self.logits(x))
            return 1 / (1 + e), e

    path = str(tmp_path / "shared.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Shared("divide", 3).eval(), torch.randn(1, 3, 16, 16), path, input_names=["x"],
                          output_names=["p", "e"], opset_version=13, dynamo=False, dynamic_axes={"x": {0: "n"}})
    m = onnxsal.load(path, head="p")
    assert m.activation == "sigmoid" and any(n.op_type == "Exp" for n in m.light.graph.node)


def test_inspect_says_what_it_read(tmp_path):
    from typer.testing import CliRunner

    from onnxsal.cli import app

    path = export(WrittenSigmoid("reciprocal", 1).eval(), str(tmp_path / "s.onnx"))
    res = CliRunner().invoke(app, ["inspect", path])
    assert res.exit_code == 0, res.output
    assert "a Sigmoid written out by hand at" in res.output and "before the final sigmoid" in res.output


def test_a_softmax_along_a_map_s_rows_is_no_class_activation(tmp_path):
    """One axis, but not the classes' (a soft-argmax along each row of each map): left as written."""
    class Rows(Written):
        def forward(self, x):
            e = torch.exp(self.logits(x))
            return e / e.sum(dim=3, keepdim=True)

    m = onnxsal.load(export(Rows(False, True).eval(), str(tmp_path / "rows.onnx")))
    assert m.activation is None and m.logits == "p" and not m.written


W = np.random.default_rng(4).standard_normal((3, 12)).astype(np.float32)


def _gemm_head(path: str, tail: list) -> str:
    """image (N, 3, 2, 2) -> Flatten -> Gemm -> z (N, 3), then ``tail`` (nodes from z to p)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Gemm", ["flat", "w"], ["z"], transB=1)]
    graph = helper.make_graph(nodes + tail, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 2, 2])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])],
                              [numpy_helper.from_array(W, "w"), numpy_helper.from_array(np.array(1.0, np.float32), "one"),
                               numpy_helper.from_array(np.array([1], np.int64), "classes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_a_division_of_one_reads_as_the_reciprocal(tmp_path):
    """Div(1, 1 + exp(-z)), as converters other than torch.onnx write 1 / t: the logits are z, a
    Gemm's output, whose gradient is the Gemm's row of weights."""
    from onnx import helper

    tail = [helper.make_node("Neg", ["z"], ["nz"]), helper.make_node("Exp", ["nz"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["den"]), helper.make_node("Div", ["one", "den"], ["p"])]
    ex = onnxsal.Explainer(_gemm_head(str(tmp_path / "div.onnx"), tail), "cpu", preprocess="raw")
    assert ex.model.activation == "sigmoid" and ex.model.logits == "z"
    x = np.random.default_rng(5).standard_normal((1, 3, 2, 2)).astype(np.float32)
    for c in range(3):
        got = ex.explain(x, "saliency", c, score="logit").raw[0]
        np.testing.assert_allclose(got, np.abs(W[c].reshape(3, 2, 2)).max(axis=0), rtol=1e-6)


def test_a_sum_without_its_axis_is_no_softmax(tmp_path):
    """exp(z) / ReduceSum(exp(z), keepdims=0): the (N,) sums broadcast along the classes, so each
    column is divided by another image's sum; only one image at a time makes it a softmax."""
    from onnx import helper

    tail = [helper.make_node("Exp", ["z"], ["e"]), helper.make_node("ReduceSum", ["e", "classes"], ["s"], keepdims=0),
            helper.make_node("Div", ["e", "s"], ["p"])]
    m = onnxsal.load(_gemm_head(str(tmp_path / "flat.onnx"), tail))
    assert m.activation is None and m.logits == "p" and not m.written
