"""A model that ends in a LogSoftmax (``log_softmax`` in PyTorch, torchvision-style training
scripts that pair it with NLLLoss): its output is log-probabilities. Its logits are the
LogSoftmax's input, as for a Softmax; what ``top``, ``predict`` and ``--score probability`` read
is their exp, the probabilities. Scored as log p, a target's gradient was that of log p while
the summary called it a probability, and the top classes were listed at negative "scores".
Checked against torch.autograd of softmax(z)[c] and of z[c] on a classifier and on a per-pixel
network."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def logits(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        return torch.log_softmax(self.logits(x), dim=1)


class Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def logits(self, x):
        return self.body(x)

    def forward(self, x):
        return torch.log_softmax(self.logits(x), dim=1)


class TwoOps(Classifier):
    """log(softmax(z)) written as two ops, as a hand-written log-likelihood head exports."""

    def forward(self, x):
        return torch.log(torch.softmax(self.logits(x), dim=1))


NETS = {"classifier": Classifier, "segmenter": Segmenter, "log-of-softmax": TwoOps}


@pytest.fixture(scope="module", params=list(NETS))
def logsoftmax(request, tmp_path_factory):
    net = NETS[request.param]().eval()
    path = str(tmp_path_factory.mktemp(request.param) / "logp.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["logp"],
                          opset_version=13, dynamo=False, dynamic_axes={"x": {0: "n"}})
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    return request.param, net, path, x


def gradient(net, x, score):
    xt = torch.tensor(x, requires_grad=True)
    score(net, xt).backward()
    return np.abs(xt.grad.numpy()[0]).max(axis=0)


def test_the_output_read_is_the_probabilities(logsoftmax):
    kind, net, path, x = logsoftmax
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    m = ex.model
    assert m.activation == "softmax" and m.output != "logp" and m.logits != "logp"
    made = "a Log of a Softmax" if kind == "log-of-softmax" else "a final LogSoftmax"
    assert f"logp holds log-probabilities ({made}): onnxsal reads their exp" in m.output_note
    with torch.no_grad():
        p = torch.softmax(net.logits(torch.tensor(x[:1])), dim=1).numpy()[0]
    np.testing.assert_allclose(ex.predict(x[:1]), p.reshape(-1), rtol=1e-5, atol=1e-7)
    res = ex.explain(x[:1], "saliency")
    if kind != "segmenter":
        order = np.argsort(-p, kind="stable")
        assert [t["index"] for t in res.top(5)] == order.tolist()
        np.testing.assert_allclose([t["score"] for t in res.top(5)], p[order], rtol=1e-5)
    assert any("reads their exp" in n for n in res.notes)


@pytest.mark.parametrize("score", ["logit", "probability"])
def test_each_score_s_gradient_matches_torch_autograd(logsoftmax, score):
    kind, net, path, x = logsoftmax
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        z = net.logits(torch.tensor(x[:1]))[0]
    for c in range(z.shape[0]):
        own = (z.argmax(dim=0) == c).float() if kind == "segmenter" else None
        if own is not None and not own.any():
            own = torch.ones_like(own)

        def scored(n, xt):
            v = n.logits(xt)[0] if score == "logit" else torch.softmax(n.logits(xt), dim=1)[0]
            return v[c] if own is None else (v[c] * own).sum()

        want = gradient(net, x[:1], scored)
        got = ex.explain(x[:1], "saliency", c, score=score).raw[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max(), err_msg=f"{score} class {c}")


def test_integrated_gradients_are_complete_on_the_probability(logsoftmax):
    kind, net, path, x = logsoftmax
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        z = net.logits(torch.tensor(x[:1]))[0]
        c = int(z.reshape(z.shape[0], -1).mean(dim=1).argmax())
        own = (z.argmax(dim=0) == c).float() if kind == "segmenter" else torch.ones(())
        p = torch.softmax(net.logits(torch.tensor(np.concatenate([x[:1], np.zeros_like(x[:1])]))), dim=1)
        change = float((p[0, c] * own).sum() - (p[1, c] * own).sum())
    res = ex.explain(x[:1], "ig", c, score="probability", steps=256)
    assert abs(res.info["completeness_gap"][0]) < 2e-3 * abs(change) + 1e-6, (res.info["completeness_gap"], change)


def test_cli_summary_lists_probabilities(logsoftmax, tmp_path):
    from PIL import Image

    kind, net, path, x = logsoftmax
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (16, 16, 3)).astype(np.uint8)).save(tmp_path / "a.png")
    assert main(["explain", path, str(tmp_path / "a.png"), "--preprocess", "unit", "-q", "-o", str(tmp_path)]) == 0
    top = json.loads((tmp_path / "a.json").read_text())["top"]
    assert all(0 <= t["score"] <= 1 for t in top)


def test_a_log_of_anything_else_is_the_output_itself(tmp_path):
    """Only a Log of a Softmax is read as log-probabilities: log(1 + relu(z)) stays the output."""
    class Logged(Classifier):
        def forward(self, x):
            return torch.log(1 + torch.relu(self.logits(x)))

    net = Logged().eval()
    path = str(tmp_path / "logged.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 16, 16), path, input_names=["x"], output_names=["out"],
                          opset_version=13, dynamo=False)
    m = onnxsal.load(path)
    assert m.output == "out" and m.activation is None and not m.output_note
