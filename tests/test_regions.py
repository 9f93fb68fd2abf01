"""Which pixels of a per-pixel class map a class target scores (``region``): those the class wins
(the segmentation default), its peak (a keypoint heatmap's: pose models output one map per
keypoint, mostly near zero, where the pixels a keypoint "wins" are noise away from its peak), or
all of them. Checked against torch.autograd of the map's maximum and of its sum, on a heatmap head
and on one that permutes its maps channels last.
"""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import TargetError

from hooks import kept
from test_gradient_methods import assert_cams, ref_cams

KEYPOINTS, SIZE = 4, 16


class Heatmaps(nn.Module):
    """A stride-2 backbone and a 1x1 conv to one heatmap per keypoint, as SimpleBaseline's head."""

    def __init__(self, last: bool = False):
        super().__init__()
        self.last = last
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Conv2d(8, KEYPOINTS, 1)

    def maps(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        y = self.maps(x)
        return y.permute(0, 2, 3, 1) if self.last else y


@pytest.fixture(scope="module", params=[False, True], ids=["nchw", "channels-last"])
def pose(request, tmp_path_factory):
    torch.manual_seed(8)
    net = Heatmaps(request.param).eval()
    with torch.no_grad():            # keypoint 0 covers the most pixels, keypoint 1 has the highest peak
        net.head.bias.copy_(torch.tensor([0.0, -1.0, 0.0, -0.5]))
        net.head.weight[1] *= 10.0
    path = str(tmp_path_factory.mktemp("pose") / "pose.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, SIZE, SIZE), path, input_names=["image"], output_names=["heatmaps"],
                          opset_version=13, dynamo=False, dynamic_axes={"image": {0: "n"}})
    x = np.random.default_rng(8).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, path, x


INNER = "/body/body.1/Relu_output_0"     # before the stride-2 conv: right before the 1x1 head, every
# region's Grad-CAM is the same map up to a scale (the head's weights times the pixel count)


def gradient(net, x, k: int, region: str):
    """torch.autograd of keypoint ``k``'s peak or map sum: the input's gradient, and the first
    ReLU's activations and gradient."""
    xt = torch.tensor(x, requires_grad=True)
    with kept(net.body[1]) as store:
        m = net.maps(xt)[0, k]
    (m.max() if region == "peak" else m.sum()).backward()
    return xt.grad.numpy()[0], store["a"].detach().numpy()[0], store["a"].grad.numpy()[0]


@pytest.mark.parametrize("region", ["peak", "all"])
def test_each_keypoint_matches_torch_autograd(pose, region):
    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    for k in range(KEYPOINTS):
        gx, a, g = gradient(net, x[:1], k, region)
        sal = ex.explain(x[:1], "saliency", k, region=region)
        np.testing.assert_allclose(sal.raw[0], np.abs(gx).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(gx).max(),
                                   err_msg=f"{region} keypoint {k}")
        assert_cams(ex, x[:1], k, a, g, f"{region} keypoint {k}", names=("gradcam", "gradcam++", "layercam"),
                    region=region, layer=INNER)
        assert sal.options["region"] == region


def test_peaks_rank_the_keypoints(pose):
    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with torch.no_grad():
        peaks = net.maps(torch.tensor(x[:1]))[0].flatten(1).max(dim=1).values.numpy()
    order = [int(k) for k in np.argsort(-peaks, kind="stable")]
    res = ex.explain(x[:1], "saliency", region="peak", top_k=KEYPOINTS)
    assert [t.index for t in res.targets] == order
    shares = [t.index for t in ex.explain(x[:1], "saliency", top_k=KEYPOINTS).targets]
    assert shares != order                            # the pixels each keypoint wins rank them otherwise
    assert [t["index"] for t in res.top(KEYPOINTS)] == order
    np.testing.assert_allclose([t["score"] for t in res.top(KEYPOINTS)], peaks[order], rtol=1e-5)
    assert res._score_of(res.targets[0]) == pytest.approx(float(peaks[order[0]]), rel=1e-5)


@pytest.mark.parametrize("region", ["peak", "all", "won"])
def test_the_exported_graph_picks_the_same_pixels(pose, region):
    import onnxruntime as ort

    from onnxsal.export import export

    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    targets = np.array([KEYPOINTS - 1, 1], np.int64)
    for method in ("saliency", "gradcam"):
        sess = ort.InferenceSession(export(path, method, region=region).SerializeToString())
        _, maps = sess.run(["logits", "map"], {"image": x, "target": targets})
        for k in range(2):
            want = ex.explain(x[k:k + 1], method, int(targets[k]), region=region).map
            np.testing.assert_allclose(maps[k], want, atol=1e-5, err_msg=f"{region} {method} image {k}")


def test_a_region_needs_a_per_pixel_output(tmp_path):
    from onnxsal.export import export

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    path = str(tmp_path / "cls.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 8, 8), path, input_names=["image"], output_names=["logits"], dynamo=False)
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    x = np.zeros((1, 3, 8, 8), np.float32)
    with pytest.raises(TargetError, match="region 'peak' picks pixels of a per-pixel output"):
        ex.explain(x, "saliency", 0, region="peak")
    with pytest.raises(TargetError, match="region must be one of won, peak, all, not 'max'"):
        ex.explain(x, "saliency", 0, region="max")
    with pytest.raises(TargetError, match="per-pixel output"):
        export(path, "gradcam", region="all")


def test_cli_region(pose, tmp_path):
    from PIL import Image

    net, path, x = pose
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)).save(tmp_path / "p.png")
    assert main(["explain", path, str(tmp_path / "p.png"), "--region", "peak", "-t", "2", "--preprocess", "unit",
                 "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "p.json").read_text())
    assert summary["methods"]["gradcam"]["options"]["region"] == "peak"
    assert main(["export", path, "-m", "saliency", "--region", "peak", "-o", str(tmp_path / "p.explain.onnx")]) == 0
    assert main(["export", path, "-m", "saliency", "--region", "tip", "-o", str(tmp_path / "x.onnx")]) == 2


def test_aug_smooth_finds_each_copy_s_own_peak(pose):
    """A mirrored copy's peak is elsewhere: each copy scores its own, as pytorch-grad-cam's
    aug_smooth would with a target that reads the copy's output."""
    from onnxsal.postprocess import normalize, resize

    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    maps = []
    for flip in (False, True):
        for factor in (0.9, 1.0, 1.1):
            xa = x[:1] * np.float32(factor)
            xa = np.ascontiguousarray(xa[..., ::-1]) if flip else xa
            _, a, g = gradient(net, xa.astype(np.float32), 2, "peak")
            m = normalize(resize(ref_cams(a, g)["gradcam"][None], (SIZE, SIZE)))[0]
            maps.append(m[..., ::-1] if flip else m)
    got = ex.explain(x[:1], "gradcam", 2, region="peak", aug_smooth=True, layer=INNER).raw[0]
    won = ex.explain(x[:1], "gradcam", 2, region="won", aug_smooth=True, layer=INNER).raw[0]
    assert np.abs(won - got).max() > 1e-2            # the check tells the regions apart
    np.testing.assert_allclose(got, np.mean(maps, axis=0), atol=1e-4)
