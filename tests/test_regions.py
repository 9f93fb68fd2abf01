"""Which pixels of a per-pixel class map a class target scores (``region``): those the class wins
(the segmentation default), its peak (a keypoint heatmap's: pose models output one map per
keypoint, mostly near zero, where the pixels a keypoint "wins" are noise away from its peak), or
all of them. Checked against torch.autograd of the map's maximum and of its sum, on a heatmap head
and on one that permutes its maps channels last.
"""

import copy
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


def exported(net: nn.Module, path, output: str) -> str:
    """``net`` written by the TorchScript exporter, input "image" (batch free) of SIZE x SIZE."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, SIZE, SIZE), str(path), input_names=["image"], output_names=[output],
                          opset_version=13, dynamo=False, dynamic_axes={"image": {0: "n"}})
    return str(path)


@pytest.fixture(scope="module", params=[False, True], ids=["nchw", "channels-last"])
def pose(request, tmp_path_factory):
    torch.manual_seed(8)
    net = Heatmaps(request.param).eval()
    with torch.no_grad():            # keypoint 0 covers the most pixels, keypoint 1 has the highest peak
        net.head.bias.copy_(torch.tensor([0.0, -1.0, 0.0, -0.5]))
        net.head.weight[1] *= 10.0
    path = exported(net, tmp_path_factory.mktemp("pose") / "pose.onnx", "heatmaps")
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


def torch_maps(net, x) -> np.ndarray:
    with torch.no_grad():
        return net.maps(torch.tensor(x)).numpy()          # (N, K, h, w) whichever way the file lays them out


@pytest.mark.parametrize("region", ["peak", "all", "won"])
def test_deletion_and_insertion_read_the_pixels_the_region_scores(pose, region):
    """The curves read the class over the pixels its target scored in the original image: the
    heatmap's value at the original peak as the model gives it, or a softmax over the keypoints
    averaged over every pixel or over those the keypoint wins."""
    from onnxsal.evaluate.faithfulness import deletion_insertion, probabilities, segment_pixels

    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    own = torch_maps(net, x[:1])[0].reshape(KEYPOINTS, -1)
    rng = np.random.default_rng(3)
    xb = (x[:1] + rng.standard_normal((3,) + x.shape[1:])).astype(np.float32)
    maps = torch_maps(net, xb).reshape(3, KEYPOINTS, -1)
    e = np.exp(maps - maps.max(axis=1, keepdims=True))
    soft = e / e.sum(axis=1, keepdims=True)
    for k in range(KEYPOINTS):
        pixels = {"peak": np.arange(own.shape[1]) == own[k].argmax(), "all": np.ones(own.shape[1], bool),
                  "won": own.argmax(axis=0) == k}[region]
        if not pixels.any():
            continue
        np.testing.assert_array_equal(segment_pixels(ex, x[:1], k, region), pixels, err_msg=f"keypoint {k}")
        want = maps[:, k, pixels][:, 0] if region == "peak" else soft[:, k, pixels].mean(axis=1)
        np.testing.assert_allclose(probabilities(ex, xb, k, pixels, region), want, rtol=1e-5, atol=1e-7,
                                   err_msg=f"keypoint {k}")
    k = 1
    curves = deletion_insertion(ex, x[:1], rng.random((SIZE, SIZE)), k, step=32, region=region)
    start = own[k].max() if region == "peak" else probabilities(ex, x[:1], k, segment_pixels(ex, x[:1], k, region),
                                                                region)[0]
    assert curves.deletion[0] == pytest.approx(float(start), rel=1e-5)      # nothing deleted yet: the image's own


def test_evaluate_and_sanity_explain_and_read_the_region(pose):
    """`evaluate` and `sanity` take the region as `explain` does: the maps they rank and compare are
    the region's (torch.autograd of the peak), and the curves read the peak."""
    from onnxsal.evaluate.faithfulness import deletion_insertion, evaluate
    from onnxsal.evaluate.randomize import cascade, randomize, weight_layers
    from onnxsal.evaluate.sanity import sanity_check
    from onnxsal.graph.weights import array as weight_array
    from onnxsal.postprocess import normalize

    net, path, x = pose
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    rep = evaluate(ex, [x[:1]], ["saliency"], target=1, step=64, region="peak")
    assert rep.settings["region"] == "peak" and "peak" in rep.settings["score"]
    curves = rep.results[0].curves
    assert curves.deletion[0] == pytest.approx(float(torch_maps(net, x[:1])[0, 1].max()), rel=1e-5)
    gx = gradient(net, x[:1], 1, "peak")[0]
    want = deletion_insertion(ex, x[:1], np.abs(gx).max(axis=0), 1, step=64, region="peak")   # the peak's map's order
    np.testing.assert_allclose(curves.deletion, want.deletion, rtol=1e-6)
    np.testing.assert_allclose(curves.insertion, want.insertion, rtol=1e-6)
    san = sanity_check(ex, [x[:1]], ["saliency"], modes=("cascading",), target=1, region="peak", max_steps=2)
    np.testing.assert_allclose(san.original["saliency"][0], normalize(np.abs(gx).max(axis=0)[None])[0], atol=1e-5)
    layers = weight_layers(ex.model.light)
    for k, group in enumerate(cascade(layers, 2)):     # each randomised model's map is its own peak's too
        drawn = randomize(ex.model.light, group, 0, all_layers=layers)
        twin = copy.deepcopy(net)
        state = {i.name: torch.tensor(weight_array(i)) for i in drawn.graph.initializer}
        twin.load_state_dict({name: state[name] for name in twin.state_dict()})
        gx = gradient(twin, x[:1], 1, "peak")[0]
        assert np.abs(san.maps[("saliency", k)][0] - san.original["saliency"][0]).max() > 0.05
        np.testing.assert_allclose(san.maps[("saliency", k)][0], normalize(np.abs(gx).max(axis=0)[None])[0],
                                   atol=1e-5, err_msg=f"step {k}")


def test_cli_evaluate_and_sanity_take_a_region(pose, tmp_path, capsys):
    from PIL import Image

    net, path, x = pose
    Image.fromarray(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.uint8)).save(tmp_path / "p.png")
    common = ["--preprocess", "unit", "-t", "1", "-q"]
    assert main(["evaluate", path, str(tmp_path / "p.png"), "--region", "peak", "--step", "64",
                 "-o", str(tmp_path / "e")] + common) == 0
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert report["settings"]["region"] == "peak"
    assert main(["sanity", path, str(tmp_path / "p.png"), "--region", "all", "-m", "saliency", "--max-steps", "2",
                 "--mode", "cascading", "-o", str(tmp_path / "s")] + common) == 0
    assert json.loads((tmp_path / "s" / "sanity.json").read_text())["region"] == "all"
    capsys.readouterr()
    assert main(["evaluate", path, str(tmp_path / "p.png"), "--region", "tip", "-o", str(tmp_path / "e")] + common) == 2
    assert "region must be one of won, peak, all, not 'tip'" in capsys.readouterr().err


class Activated(nn.Module):
    def __init__(self, act: str):
        super().__init__()
        torch.manual_seed(9)
        self.net = Heatmaps()
        self.act = act

    def forward(self, x):
        y = self.net.maps(x)
        return torch.sigmoid(y) if self.act == "sigmoid" else torch.softmax(y, dim=1)


@pytest.mark.parametrize("act", ["sigmoid", "softmax"])
def test_a_peak_is_the_activated_map_s_as_explain_picks_it(act, tmp_path):
    """After a final activation, the peak is the activated map's highest pixel (as ``explain``
    picks it; a softmax over the maps moves it) and the curves read the activated value there."""
    from onnxsal.evaluate.faithfulness import probabilities, segment_pixels

    net = Activated(act).eval()
    path = exported(net, tmp_path / f"{act}.onnx", "maps")
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    assert ex.model.activation == (None if act == "sigmoid" else act)   # sigmoid maps are scored as they are
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        out = net(torch.tensor(x)).numpy().reshape(3, KEYPOINTS, -1)
        logits = net.net.maps(torch.tensor(x)).numpy().reshape(3, KEYPOINTS, -1)
    moved = 0
    for k in range(KEYPOINTS):
        peak = int(out[0, k].argmax())
        moved += peak != int(logits[0, k].argmax())
        pixels = segment_pixels(ex, x[:1], k, "peak")
        assert np.flatnonzero(pixels).tolist() == [peak]
        np.testing.assert_allclose(probabilities(ex, x, k, pixels, "peak"), out[:, k, peak], rtol=1e-5)
        assert ex.explain(x[:1], "saliency", k, region="peak").targets[0].seed.reshape(KEYPOINTS, -1)[k, peak] == 1
    assert moved or act == "sigmoid"          # the check tells the two readings apart


@pytest.fixture(scope="module")
def multilabel(tmp_path_factory):
    """Maps each after a Sigmoid (a multi-label segmentation): classes overlap; keypoint 1's blob is
    made strong, so an argmax over the classes would take pixels away from the others."""
    net = Activated("sigmoid").eval()
    with torch.no_grad():
        net.net.head.bias.copy_(torch.tensor([0.5, 1.0, 0.0, -0.5]))
    path = exported(net, tmp_path_factory.mktemp("multilabel") / "multilabel.onnx", "masks")
    x = np.random.default_rng(5).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    return net, path, x


def test_a_sigmoid_map_s_pixels_are_those_above_one_half(multilabel):
    """Each class's pixels are those where its own map is above 0.5, overlaps included:
    torch.autograd of the class map's sum over them; the curves read its mean there as it is."""
    from onnxsal.evaluate.faithfulness import probabilities, segment_pixels

    net, path, x = multilabel
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    assert ex.model.dense.independent and "above 0.5" in ex.model.dense.describe()
    with torch.no_grad():
        out = net(torch.tensor(x)).numpy()
    above = out[0] > 0.5
    overlap = above.sum(axis=0) > 1
    assert overlap.any() and (above.reshape(KEYPOINTS, -1).any(axis=1)).sum() >= 3     # the check sees overlaps
    for k in range(KEYPOINTS):
        pixels = above[k] if above[k].any() else np.ones_like(above[k])
        xt = torch.tensor(x[:1], requires_grad=True)
        (net(xt)[0, k] * torch.tensor(pixels, dtype=torch.float32)).sum().backward()
        g = np.abs(xt.grad.numpy()[0]).max(axis=0)
        res = ex.explain(x[:1], "saliency", k)
        np.testing.assert_allclose(res.raw[0], g, rtol=1e-4, atol=1e-6 * g.max(), err_msg=f"class {k}")
        np.testing.assert_array_equal(segment_pixels(ex, x[:1], k), pixels.reshape(-1))
        np.testing.assert_allclose(probabilities(ex, x, k, pixels.reshape(-1)), out[:, k][:, pixels].mean(axis=1),
                                   rtol=1e-5)
    shares = above.reshape(KEYPOINTS, -1).mean(axis=1)
    top = ex.explain(x[:1], "saliency", top_k=KEYPOINTS).targets
    assert [t.index for t in top] == list(np.lexsort((-out[0].reshape(KEYPOINTS, -1).mean(axis=1), -shares)))


def test_the_exported_graph_takes_a_sigmoid_map_s_own_pixels(multilabel):
    import onnxruntime as ort

    from onnxsal.export import export

    net, path, x = multilabel
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    sess = ort.InferenceSession(export(path, "saliency").SerializeToString())
    for targets in ([0, 3], [1, 2]):
        _, maps = sess.run(["logits", "map"], {"image": x, "target": np.array(targets, np.int64)})
        for k in range(2):
            want = ex.explain(x[k:k + 1], "saliency", targets[k]).map
            np.testing.assert_allclose(maps[k], want, atol=1e-5, err_msg=f"image {k} class {targets[k]}")
