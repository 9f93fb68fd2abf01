"""A softmax written out by hand, ``exp(z) / exp(z).sum(1, keepdim=True)`` (and its stable form
with ``z - z.max()`` first), exports as Exp, ReduceSum and Div rather than a Softmax node. Read as
the output itself, its probabilities were scored as the "logits": the default score's gradient was
that of p, not of z. Its logits are now ``z``, as for a Softmax node; checked against
torch.autograd of z[c] and of p[c] on a classifier and on a per-pixel network."""

import warnings

import numpy as np
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
