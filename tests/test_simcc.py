"""SimCC pose heads (RTMPose): (N, K, W·r) x-bins and (N, K, H·r) y-bins per keypoint. Read as a
classifier, each (keypoint, x-bin) pair was a "class". A keypoint now scores its confidence as
RTMPose decodes it, 0.5 · (highest x-bin + highest y-bin).

Maps are checked against torch.autograd of that confidence and against the CAM formulas on
PyTorch's activations and gradients, on two networks (non-square inputs, 2 and 3 bins per pixel).
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main

from hooks import kept, varied_batch_norm
from test_gradient_methods import assert_cams

K = 5


class Plain(nn.Module):
    """RTMPose's head, cut down: a final conv to K maps, flattened, then one linear layer per axis."""

    def __init__(self, h: int = 32, w: int = 24, ratio: int = 2):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.final = nn.Conv2d(8, K, 1)
        self.mlp_x = nn.Linear((h // 4) * (w // 4), w * ratio)
        self.mlp_y = nn.Linear((h // 4) * (w // 4), h * ratio)

    def forward(self, x):
        f = self.final(self.body(x)).flatten(2)
        return self.mlp_x(f), self.mlp_y(f)


class Residual(Plain):
    """A BatchNorm residual block in the backbone, a wider input and 3 bins per pixel."""

    def __init__(self):
        super().__init__(16, 32, 3)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        h = self.body(x)
        f = self.final(torch.relu(h + self.block(h))).flatten(2)
        return self.mlp_x(f), self.mlp_y(f)


NETS = {"plain": (Plain, (32, 24)), "residual": (Residual, (16, 32))}


@pytest.fixture(scope="module", params=list(NETS))
def pose(request, tmp_path_factory):
    build, (h, w) = NETS[request.param]
    torch.manual_seed(9)
    net = build().eval()
    varied_batch_norm(net)
    path = str(tmp_path_factory.mktemp(request.param) / "rtmpose.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, h, w), path, input_names=["input"], output_names=["simcc_x", "simcc_y"],
                          opset_version=13, dynamo=False, dynamic_axes={"input": {0: "n"}})
    x = np.random.default_rng(9).standard_normal((2, 3, h, w)).astype(np.float32)
    return request.param, net, path, x


def confidence(net, x) -> torch.Tensor:
    sx, sy = net(x)
    return 0.5 * (sx.max(dim=2).values + sy.max(dim=2).values)


def test_the_keypoints_are_the_classes(pose):
    kind, _, path, _ = pose
    m = onnxsal.load(path, preprocess=None)
    assert m.num_classes == m.n_targets == K and m.activation is None and m.output == m.logits
    ratio = 2 if kind == "plain" else 3
    assert m.output_note.startswith(f"simcc_x and simcc_y are SimCC keypoint coordinates ({K} keypoints, {ratio} bins")
    assert m.default_layer.tensor == "/final/Conv_output_0"
    named = onnxsal.load(path, preprocess=None, head="simcc_y")        # either output named: the same reading
    assert named.num_classes == K and named.score_as_is


def test_each_keypoint_matches_torch_autograd(pose):
    kind, net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    for k in range(K):
        xt = torch.tensor(x[:1], requires_grad=True)
        with kept(net.final) as store:
            c = confidence(net, xt)[0, k]
        c.backward()
        g = xt.grad.numpy()[0]
        res = ex.explain(x[:1], "saliency", k)
        np.testing.assert_allclose(res.raw[0], np.abs(g).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(g).max(),
                                   err_msg=f"{kind} keypoint {k}")
        assert_cams(ex, x[:1], k, store["a"].detach().numpy()[0], store["a"].grad.numpy()[0], f"{kind} keypoint {k}")


def test_top_and_the_default_rank_keypoints_by_confidence(pose):
    kind, net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw", labels=[f"joint{k}" for k in range(K)])
    with torch.no_grad():
        conf = confidence(net, torch.tensor(x[:1]))[0].numpy()
    order = [int(k) for k in np.argsort(-conf, kind="stable")]
    res = ex.explain(x[:1], "saliency")
    assert res.targets[0].index == order[0] and res.targets[0].label == f"joint{order[0]}"
    assert [t["index"] for t in res.top(K)] == order
    np.testing.assert_allclose([t["score"] for t in res.top(K)], conf[order], rtol=1e-5)


def test_integrated_gradients_are_complete_on_the_confidence(pose):
    kind, net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        change = float(confidence(net, torch.tensor(x[:1]))[0, 2] - confidence(net, torch.zeros_like(torch.tensor(x[:1])))[0, 2])
    res = ex.explain(x[:1], "ig", 2, steps=2048)          # the argmax bins move along the path: slow to converge
    assert abs(res.info["completeness_gap"][0]) < 2e-3 * abs(change) + 1e-6, (res.info["completeness_gap"], change)


def test_the_exported_graph_and_the_cli(pose, tmp_path):
    import onnxruntime as ort
    from PIL import Image

    from onnxsal.export import export

    kind, net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([K - 1, 0], np.int64)
    for method in ("saliency", "gradcam"):
        sess = ort.InferenceSession(export(path, method).SerializeToString())
        scores, maps = sess.run(["logits", "map"], {"input": x, "target": targets})
        assert scores.shape == (2, K)
        for k in range(2):
            np.testing.assert_allclose(maps[k], ex.explain(x[k:k + 1], method, int(targets[k])).map, atol=1e-5)
    h, w = x.shape[2:]
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (h, w, 3)).astype(np.uint8)).save(tmp_path / "p.png")
    assert main(["explain", path, str(tmp_path / "p.png"), "-t", str(K - 1), "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 0
    assert main(["explain", path, str(tmp_path / "p.png"), "-t", str(K), "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 2


def test_bins_that_do_not_fit_the_input_are_left_alone(tmp_path):
    """Two (N, K, L) outputs whose lengths are no whole multiple of the input's width and height."""

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, K, 3, padding=1)
            self.a, self.b = nn.Linear(64, 50), nn.Linear(64, 60)

        def forward(self, x):
            f = self.conv(x).flatten(2)
            return self.a(f), self.b(f)

    path = str(tmp_path / "other.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Other().eval(), torch.randn(1, 3, 8, 8), path, input_names=["input"], output_names=["a", "b"],
                          dynamo=False)
    m = onnxsal.load(path, preprocess=None)
    assert m.output == "a" and not m.output_note


def test_deletion_and_insertion_read_the_confidence_itself(pose):
    """Not a softmax across the keypoints, which would make them compete."""
    from onnxsal.evaluate.faithfulness import probabilities

    kind, net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        conf = confidence(net, torch.tensor(x)).numpy()
    np.testing.assert_allclose(probabilities(ex, x, 3), conf[:, 3], rtol=1e-5)
