"""A single-unit output: a binary classifier (class 1 its value, class 0 the other side), read
through its sigmoid or as a raw logit. ``top`` and the JSON summary listed the unit as "class 0"
with class 1's score, whatever the model said."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import onnxsal


def unit_net(sigmoid: bool, bias: float) -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))
    with torch.no_grad():
        net[-1].bias.fill_(bias)
    return nn.Sequential(net, nn.Sigmoid()).eval() if sigmoid else net.eval()


@pytest.mark.parametrize("sigmoid", [True, False], ids=["sigmoid", "logit"])
@pytest.mark.parametrize("bias", [3.0, -3.0, 0.2])
def test_top_names_each_side_with_its_own_score(sigmoid, bias, tmp_path):
    net = unit_net(sigmoid, bias)
    path = str(tmp_path / "unit.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 8, 8), path, input_names=["x"], output_names=["y"], dynamo=False)
    x = np.zeros((1, 3, 8, 8), np.float32)
    with torch.no_grad():
        v = float(net(torch.tensor(x)))
    other = 1 - v if sigmoid else -v         # a raw logit of 0.2 is no probability
    res = onnxsal.Explainer(path, "cpu", preprocess="raw", labels=["cat", "dog"]).explain(x, "saliency")
    want = [{"index": 1, "label": "dog", "score": v}, {"index": 0, "label": "cat", "score": other}]
    want = sorted(want, key=lambda d: -d["score"])
    got = res.top(2)
    assert [d["index"] for d in got] == [d["index"] for d in want]
    np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], rtol=1e-5, atol=1e-6)
    assert res.targets[0].index == want[0]["index"]            # the predicted side is explained
    summary = res.summary()
    assert summary["top"][0]["label"] == want[0]["label"]
    both = onnxsal.Explainer(path, "cpu", preprocess="raw", labels=["cat", "dog"]).explain(x, "saliency", [0, 1])
    np.testing.assert_allclose([both._score_of(t) for t in both.targets], [other, v], rtol=1e-5, atol=1e-6)  # titles


@pytest.mark.parametrize("sigmoid", [True, False], ids=["sigmoid", "logit"])
def test_the_exported_graph_scores_either_side(sigmoid, tmp_path):
    """Its cotangent was a one-hot over one unit: class 1 got none (an empty map) and class 0
    scored +logit."""
    import onnxruntime as ort

    from onnxsal.export import export

    path = str(tmp_path / "unit.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(unit_net(sigmoid, 0.5), torch.randn(1, 3, 8, 8), path, input_names=["x"], output_names=["y"],
                          dynamo=False, dynamic_axes={"x": {0: "n"}})
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([1, 0], np.int64)
    for method in ("saliency", "gradcam", "ig"):
        sess = ort.InferenceSession(export(path, method).SerializeToString())
        _, maps = sess.run(["logits", "map"], {"x": x, "target": targets})
        wants = [ex.explain(x[k:k + 1], method, int(targets[k]), **({"steps": 32} if method == "ig" else {})).map
                 for k in range(2)]
        assert all(w.max() > 0 for w in wants) or method == "gradcam" and max(w.max() for w in wants) > 0
        for k in range(2):         # one side's Grad-CAM may be negative everywhere: all zero after its ReLU
            np.testing.assert_allclose(maps[k], wants[k], atol=1e-5, err_msg=f"{method} image {k}")
