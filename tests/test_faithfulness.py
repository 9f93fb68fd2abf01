"""Deletion/insertion AUC and the pointing games against closed-form values on tiny cases, the
`evaluate` command end to end, and Grad-CAM's pointing game on the demo model."""

import glob
import json
import math
import os
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import tiny
from onnxsal import Explainer
from onnxsal.cli import main
from onnxsal.errors import ImageError
from onnxsal.evaluate.faithfulness import (auc, default_step, deletion_insertion, evaluate, fractions, pixel_order,
                                           probabilities, substrate)
from onnxsal.evaluate.localization import energy_inside, load_mask, pointing_hit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "models", "demo", "demo_shapes.onnx")

C = math.log(3.0)   # sigmoid(C) = 3/4, sigmoid(2C) = 9/10, sigmoid(0) = 1/2
REGION = [(1, 2), (3, 0)]


def region_model(layout: str = "NCHW", head: str = "softmax") -> onnx.ModelProto:
    """4x4 one-channel input; logits = (C * sum of the two REGION pixels, 0).

    So p(class 0) = sigmoid(C * pixels of the region still showing): 9/10, 3/4 or 1/2.
    head: softmax (two logits), none (two logits, no activation), sigmoid (one unit).
    """
    w = np.zeros((2, 16), np.float32)
    for r, c in REGION:
        w[0, r * 4 + c] = C
    nodes = []
    x = "image"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["image"], ["chw"], perm=[0, 3, 1, 2]))
        x = "chw"
    nodes.append(helper.make_node("Flatten", [x], ["flat"]))
    if head == "sigmoid":
        w = w[:1]
    nodes.append(helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1))
    out, n_out = "logits", len(w)
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
        out = "probs"
    elif head == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", ["logits"], ["probs"]))
        out = "probs"
    shape = [None, 1, 4, 4] if layout == "NCHW" else [None, 4, 4, 1]
    graph = helper.make_graph(nodes, "region", [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None, n_out])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key="onnxsal.preprocess", value=json.dumps({"preset": "unit"}))
    onnx.checker.check_model(model)
    return model


def region_first_map() -> np.ndarray:
    """Region pixels most salient, then everything else in raster order."""
    m = np.linspace(1.0, 0.0, 16).reshape(4, 4) * 0.5
    m[REGION[0]], m[REGION[1]] = 2.0, 1.0
    return m


# building blocks ----------------------------------------------------------------------------

def test_order_fractions_and_trapezoid():
    rank = pixel_order(np.array([[0.1, 0.9], [0.5, 0.5]]))
    assert rank.tolist() == [[3, 0], [1, 2]]                 # ties keep raster order
    assert fractions(16, 3).tolist() == [0, 3 / 16, 6 / 16, 9 / 16, 12 / 16, 15 / 16, 1]
    assert fractions(16, 16).tolist() == [0, 1]
    assert auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    assert default_step((224, 224)) == 224 and default_step((64, 64)) == 18


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("head", ["softmax", "none", "sigmoid"])
def test_deletion_and_insertion_in_closed_form(layout, head):
    ex = Explainer(region_model(layout, head), "cpu")
    x = np.ones((1, 1, 4, 4) if layout == "NCHW" else (1, 4, 4, 1), np.float32)
    target = 1 if head == "sigmoid" else 0
    c = deletion_insertion(ex, x, region_first_map(), target, step=1, deletion="black", insertion="zero")
    # deletion: both region pixels first -> 9/10, 3/4, then 1/2 for the 14 remaining steps
    np.testing.assert_allclose(c.deletion, [0.9, 0.75] + [0.5] * 15, atol=1e-6)
    assert c.deletion_auc == pytest.approx(((0.9 + 0.75) / 2 + (0.75 + 0.5) / 2 + 14 * 0.5) / 16)   # 0.528125
    # insertion from zeros: 1/2, then 3/4, then 9/10 to the end
    np.testing.assert_allclose(c.insertion, [0.5, 0.75] + [0.9] * 15, atol=1e-6)
    assert c.insertion_auc == pytest.approx(((0.5 + 0.75) / 2 + (0.75 + 0.9) / 2 + 14 * 0.9) / 16)  # 0.878125


def test_a_step_that_does_not_divide_the_image():
    ex = Explainer(region_model(), "cpu")
    c = deletion_insertion(ex, np.ones((1, 1, 4, 4), np.float32), region_first_map(), 0, step=3, deletion="zero")
    assert c.x.tolist() == [0, 3 / 16, 6 / 16, 9 / 16, 12 / 16, 15 / 16, 1]
    # the whole region goes in the first step: 0.9 then 0.5 flat
    assert c.deletion_auc == pytest.approx(3 / 16 * (0.9 + 0.5) / 2 + 13 / 16 * 0.5)             # 0.5375


def test_the_worst_order_deletes_the_region_last():
    ex = Explainer(region_model(), "cpu")
    worst = -region_first_map()
    c = deletion_insertion(ex, np.ones((1, 1, 4, 4), np.float32), worst, 0, step=1, deletion="zero")
    np.testing.assert_allclose(c.deletion, [0.9] * 15 + [0.75, 0.5], atol=1e-6)
    assert c.deletion_auc == pytest.approx((14 * 0.9 + (0.9 + 0.75) / 2 + (0.75 + 0.5) / 2) / 16)   # 0.878125


def test_substrates():
    ex = Explainer(tiny.conv_net(size=16), "cpu", preprocess="imagenet")
    x = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    black = substrate(ex, x, "black")
    np.testing.assert_allclose(black[0, :, 5, 7], -np.array([0.485, 0.456, 0.406]) / np.array([0.229, 0.224, 0.225]),
                               rtol=1e-6)
    assert not substrate(ex, x, "zero").any()
    flat = np.full_like(x, 0.3)
    np.testing.assert_allclose(substrate(ex, flat, "blur"), flat, atol=1e-6)   # a blur keeps a flat image
    blurred = substrate(ex, x, "blur")
    assert blurred.std() < 0.5 * x.std()


# pointing games -----------------------------------------------------------------------------

def square_mask() -> np.ndarray:
    mask = np.zeros((40, 40), bool)
    mask[18:23, 5:21] = True          # rows 18..22, columns 5..20
    return mask


@pytest.mark.parametrize("point,distance", [
    ((20, 35), 15.0),                  # 15 columns right of column 20
    ((20, 36), 16.0),
    ((31, 32), 15.0),                  # 9 rows below row 22, 12 columns right of column 20: a 9-12-15 triangle
    ((32, 32), math.hypot(10, 12)),
])
def test_pointing_game_tolerance(point, distance):
    m = np.zeros((40, 40))
    m[point] = 1.0
    assert pointing_hit(m, square_mask(), 15) is (distance <= 15)
    assert pointing_hit(m, square_mask(), distance) is True            # the tolerance is inclusive
    assert pointing_hit(m, square_mask(), distance - 0.01) is False


def test_pointing_game_inside_and_degenerate_maps():
    m = np.zeros((40, 40))
    m[20, 10] = 1.0
    assert pointing_hit(m, square_mask(), 0)
    assert not pointing_hit(np.ones((40, 40)), square_mask())          # a constant map points nowhere
    with pytest.raises(ImageError, match="empty"):
        pointing_hit(m, np.zeros((40, 40), bool))
    with pytest.raises(ImageError, match="image's size"):
        pointing_hit(m, np.zeros((20, 40), bool))


def test_energy_pointing_game_by_hand():
    m = np.zeros((40, 40))
    m[20, 10], m[19, 6] = 3.0, 1.0      # inside the mask: 4
    m[0, 0], m[39, 39] = 2.5, 1.5       # outside: 4
    m[5, 5] = -10.0                     # negative evidence is not energy
    assert energy_inside(m, square_mask()) == pytest.approx(0.5)
    assert energy_inside(-np.ones((40, 40)), square_mask()) == 0.0


def test_load_mask_png_and_npy(tmp_path):
    mask = square_mask()
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    np.save(tmp_path / "m.npy", mask.astype(np.uint8))
    assert np.array_equal(load_mask(tmp_path / "m.png"), mask)
    assert np.array_equal(load_mask(tmp_path / "m.npy"), mask)
    # 0/1, 16-bit 0/65535 and 16-bit 0/1 label masks, a red object on black, a JPEG's noise around black
    Image.fromarray(mask.astype(np.uint8)).save(tmp_path / "m01.png")
    Image.fromarray(mask.astype(np.uint16) * 65535).save(tmp_path / "m16.png")
    Image.fromarray(mask.astype(np.uint16)).save(tmp_path / "m16_01.png")
    red = np.zeros(mask.shape + (3,), np.uint8)
    red[mask] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=60)
    for name in ("m01.png", "m16.png", "m16_01.png", "red.png"):
        assert np.array_equal(load_mask(tmp_path / name), mask), name
    assert (load_mask(tmp_path / "m.jpg") != mask).mean() < 0.01
    Image.fromarray(np.zeros(mask.shape, np.uint8)).save(tmp_path / "black.png")
    assert not load_mask(tmp_path / "black.png").any()
    (tmp_path / "png.npy").write_bytes((tmp_path / "m.png").read_bytes())     # named .npy, but a PNG
    np.savez(tmp_path / "both.npz", mask=mask)
    os.replace(tmp_path / "both.npz", tmp_path / "both.npy")
    for name, says in (("png.npy", "not a .npy file"), ("both.npy", "a .npz archive")):
        with pytest.raises(ImageError, match=f"cannot read mask .*{name}: it is {says}"):
            load_mask(tmp_path / name)


# the whole evaluation and the command -------------------------------------------------------

def test_evaluate_scores_every_method_and_image():
    ex = Explainer(tiny.conv_net(size=16), "cpu")
    rng = np.random.default_rng(0)
    xs = [rng.random((1, 3, 16, 16)).astype(np.float32) for _ in range(2)]
    masks = [np.zeros((16, 16), bool) for _ in xs]
    for m in masks:
        m[4:12, 4:12] = True
    rep = evaluate(ex, xs, ["saliency", "occlusion"], masks=masks, step=8, options={"occlusion": {"window": 4}})
    assert len(rep.results) == 4 and rep.images == ["array", "array_2"]
    for r in rep.results:
        assert 0 <= r.deletion <= 1 and 0 <= r.insertion <= 1 and r.hit in (True, False) and 0 <= r.energy <= 1
        assert len(r.curves.x) == 16 * 16 // 8 + 1
    # every method explains the same class of an image
    assert len({(r.image, r.target) for r in rep.results}) == 2
    assert [m for m, _ in rep.ranked()] == sorted(rep.methods, key=lambda m: dict(rep.ranked())[m])


@pytest.fixture()
def folder(tmp_path):
    model = tmp_path / "tiny.onnx"
    onnx.save(tiny.conv_net(size=16), model)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "images" / f"{name}.png")
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 8:24] = 255
        Image.fromarray(mask).save(tmp_path / "masks" / f"{name}.png")
    return tmp_path, str(model)


def test_evaluate_command_writes_csv_json_and_curves(folder, capsys):
    tmp, model = folder
    out = tmp / "o"
    code = main(["evaluate", model, str(tmp / "images"), "-m", "gradcam", "-m", "occlusion", "-O", "window=4",
                 "--masks", str(tmp / "masks"), "--out", str(out), "--device", "cpu", "--step", "16"])
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(out)) == ["curves.png", "evaluation.csv", "evaluation.json"]
    assert "pointing game" in text and "deletion AUC" in text and "rank" in text
    lines = (out / "evaluation.csv").read_text().splitlines()
    assert lines[0] == "image,method,target,label,deletion_auc,insertion_auc,pointing_hit,energy_pg,seconds"
    assert len(lines) == 1 + 2 * 2
    summary = json.loads((out / "evaluation.json").read_text())
    assert set(summary["methods"]) == {"gradcam", "occlusion"}
    assert summary["settings"]["step"] == 16 and summary["settings"]["steps"] == 16
    g = summary["methods"]["gradcam"]
    assert set(g) >= {"deletion", "insertion", "hit", "energy", "mean_rank", "curves"}
    assert len(g["curves"]["x"]) == 17


def test_images_with_the_same_name_in_two_folders_are_named_by_folder(folder):
    """As `explain` names its outputs: ``cats/a.png`` and ``dogs/a.png`` are ``cats_a`` and ``dogs_a``."""
    from onnxsal.preprocess import run_names

    tmp, model = folder
    for kind in ("cats", "dogs"):
        (tmp / kind).mkdir()
        shutil.copy(tmp / "images" / "a.png", tmp / kind / "a.png")
    files = [str(tmp / "cats" / "a.png"), str(tmp / "dogs" / "a.png")]
    rep = evaluate(Explainer(model, "cpu"), files, ["saliency"], step=128)
    assert rep.images == ["cats_a", "dogs_a"]
    arr = np.zeros((1, 3, 16, 16), np.float32)
    assert run_names(files + [arr, arr, str(tmp / "images" / "b.png")]) == ["cats_a", "dogs_a", "array", "array_2", "b"]


def test_evaluate_command_errors_are_one_line(folder, capsys):
    tmp, model = folder
    os.remove(tmp / "masks" / "b.png")
    code = main(["evaluate", model, str(tmp / "images"), "--masks", str(tmp / "masks"), "--out", str(tmp / "o")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "no mask for b.png" in err and len(err.splitlines()) == 1
    code = main(["evaluate", model, str(tmp / "images"), "--substrate", "grey"])
    assert code != 0 and "--substrate" in capsys.readouterr().err
    Image.fromarray(np.full((16, 32), 255, np.uint8)).save(tmp / "masks" / "b.png")
    code = main(["evaluate", model, str(tmp / "images"), "--masks", str(tmp / "masks"), "--out", str(tmp / "o")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "the mask of b is 32x16 pixels but the image is 32x32" in err
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp / "masks" / "b.png")     # nothing to point at
    code = main(["evaluate", model, str(tmp / "images"), "--masks", str(tmp / "masks"), "--out", str(tmp / "o"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: the mask of b is empty: the pointing game needs an object in it\n"
    assert not (tmp / "o").exists()


# the demo model -----------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(DEMO), reason="demo model not built")
def test_gradcam_points_at_the_shapes_of_the_demo_model():
    ex = Explainer(DEMO, "cpu")
    images = sorted(glob.glob(os.path.join(ROOT, "models", "demo", "images", "*.png")))
    masks = [load_mask(p.replace(os.sep + "images" + os.sep, os.sep + "masks" + os.sep)) for p in images]
    rep = evaluate(ex, images, ["gradcam"], masks=masks, step=256)     # 16 steps: the AUCs are not under test
    hits = [r.hit for r in rep.results]
    assert len(hits) == 12 and np.mean(hits) >= 0.95
    assert [r.label for r in rep.results] == [os.path.basename(p)[3:-4] for p in images]


def test_multi_label_sigmoid_scores_each_class_logit_and_its_own_probability(tmp_path):
    """A sigmoid over several classes (CheXNet-style multi-label): each class scores its logit,
    and the faithfulness curves read that class's sigmoid, not a softmax across the classes."""
    import warnings

    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
                        nn.Sigmoid()).eval()
    path = str(tmp_path / "multilabel.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["p"], dynamic_axes={"x": {0: "N"}})
    ex = Explainer(path, "cpu", preprocess="unit")
    m = ex.model
    assert m.activation == "sigmoid" and m.num_classes == 5 and not m.binary and m.logits != m.output
    x = np.random.default_rng(0).random((3, 3, 12, 12)).astype(np.float32)
    xt = torch.tensor(x, requires_grad=True)
    logits = net[:-1](xt)
    logits[:, 2].sum().backward()
    cot = np.zeros((3, 5), np.float32)
    cot[:, 2] = 1
    got = ex.engine.gradients(x, cot, ["x"])["grad_x"]
    assert np.abs(got - xt.grad.numpy()).max() / np.abs(xt.grad.numpy()).max() < 1e-4
    np.testing.assert_allclose(probabilities(ex, x, 2), torch.sigmoid(logits[:, 2]).detach().numpy(), rtol=1e-5)
    res = ex.explain(x[:1], "saliency", target=2)
    assert any("before the final sigmoid" in n for n in res.notes)


def _torch_export(net, path: str, size: tuple, output: str) -> str:
    """``net`` written by the TorchScript exporter: input "x" (batch free) of ``size`` (C, H, W)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, *size), path, input_names=["x"], output_names=[output], dynamo=False,
                          dynamic_axes={"x": {0: "n"}})
    return path


def _segmenter(tmp_path, classes: int, last: bool = False, act: str = "", resized: bool = False) -> str:
    """A small per-pixel network exported by torch: ``classes`` maps, after a final ``act``
    ("sigmoid", "softmax" over the classes, or none), permuted channels last when ``last``; with
    ``resized`` the maps are made at half the input's grid and the activation's output is upsampled
    (bilinear) to it, as a head that activates before it resizes."""

    import torch
    from torch import nn

    torch.manual_seed(classes)

    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2 if resized else 1), nn.ReLU(),
                                     nn.Conv2d(8, classes, 3, padding=1))

        def forward(self, x):
            y = self.net(x)
            y = torch.sigmoid(y) if act == "sigmoid" else torch.softmax(y, dim=1) if act == "softmax" else y
            if resized:
                y = nn.functional.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
            return y.permute(0, 2, 3, 1) if last else y

    return _torch_export(Seg().eval(), str(tmp_path / f"seg{classes}{'l' * last}{act}{'r' * resized}.onnx"),
                         (3, 12, 12), "maps")


@pytest.mark.parametrize("classes,last,act,resized", [
    (3, False, "", False), (4, True, "", False), (1, False, "sigmoid", False), (1, False, "", False),
    (1, False, "sigmoid", True), (3, False, "sigmoid", True), (3, True, "softmax", True)],
    ids=["3-classes", "channels-last", "one-map-sigmoid", "one-map-logits", "one-map-sigmoid-resized",
         "sigmoid-maps-resized", "softmax-resized"])
def test_a_segment_s_probability_is_its_mean_over_the_original_pixels(classes, last, act, resized, tmp_path):
    """Read as a classifier, a segmentation model's probability was a softmax over every value of
    every map, at one position: deletion and insertion curves near 0 whatever the map. Maps a
    Sigmoid or a Softmax made are probabilities as they are, also when resized after it: a second
    softmax would squeeze them, and "above 0" would give a sigmoid map every pixel."""
    from onnxsal.evaluate.faithfulness import probabilities, segment_pixels

    ex = Explainer(_segmenter(tmp_path, classes, last, act, resized), "cpu", preprocess="raw")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    xb = np.concatenate([x, rng.standard_normal((2, 3, 12, 12)).astype(np.float32)])
    sess = __import__("onnxruntime").InferenceSession(ex.model.path)
    out = sess.run(None, {"x": xb})[0].astype(np.float64)
    maps = out.transpose(0, 3, 1, 2) if last else out                 # (N, C, h, w)
    target = classes - 1
    if act == "sigmoid":                 # each map its own probability, its pixels those above 0.5
        p, own = maps[:, target], maps[0, target] > 0.5
    elif classes == 1:
        p, own = 1 / (1 + np.exp(-maps[:, 0])), maps[0, 0] > 0.0
    else:
        e = np.exp(maps - maps.max(axis=1, keepdims=True))
        p = maps[:, target] if act == "softmax" else e[:, target] / e.sum(axis=1)
        own = maps[0].argmax(axis=0) == target
    assert 0 < own.mean() < 1 or not resized               # the check tells "above 0.5" from every pixel
    own = own if own.any() else np.ones_like(own)
    np.testing.assert_array_equal(segment_pixels(ex, x, target), own.reshape(-1))
    np.testing.assert_allclose(probabilities(ex, xb, target, segment_pixels(ex, x, target)),
                               p.reshape(3, -1)[:, own.reshape(-1)].mean(axis=1), rtol=1e-5)
    curves = deletion_insertion(ex, x, rng.random((12, 12)), target, step=16)
    np.testing.assert_allclose(curves.deletion[0], p[0][own].mean(), rtol=1e-5)     # nothing deleted yet
    np.testing.assert_allclose(curves.insertion[-1], p[0][own].mean(), rtol=1e-5)   # everything back
    if resized:          # and explain scores the map over those pixels: central differences of that sum
        eps = 1e-2
        res = ex.explain(x, "saliency", target)
        flat = own.reshape(-1)

        def score(batch):
            o = sess.run(None, {"x": batch.astype(np.float32)})[0].astype(np.float64)
            o = o.transpose(0, 3, 1, 2) if last else o
            return o[:, target].reshape(len(batch), -1)[:, flat].sum(axis=1)

        steps = np.eye(x.size, dtype=np.float64).reshape(-1, *x.shape[1:]) * eps
        grad = ((score(x + steps) - score(x - steps)) / (2 * eps)).reshape(x.shape[1:])
        np.testing.assert_allclose(res.raw[0], np.abs(grad).max(axis=0), rtol=2e-2, atol=2e-3 * np.abs(grad).max())


def test_a_class_that_wins_no_pixel_is_read_over_every_pixel():
    """As its target scores it (its map over every pixel)."""
    from onnxsal.dense import DenseOutput

    d = DenseOutput(2, 2, 2, False)
    maps = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert d.pixels(maps, 0).tolist() == [True] * 4 and d.pixels(maps, 1).tolist() == [True] * 4
    maps[1, 2] = 5.0
    assert d.pixels(maps, 1).tolist() == [False, False, True, False]


def test_a_recogniser_s_probability_is_its_softmax_at_its_step(tmp_path):
    """(N, steps, characters) with a softmax per step: a (step, character) target's probability is
    that step's softmax, not one over every value of every step."""

    import torch
    from torch import nn

    from onnxsal.evaluate.faithfulness import probabilities

    torch.manual_seed(0)

    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)

        def forward(self, x):
            feats = self.conv(x).mean(2).permute(0, 2, 1)        # (N, 8 steps, 6 characters)
            return torch.softmax(feats, dim=2)

    net = Rec().eval()
    ex = Explainer(_torch_export(net, str(tmp_path / "rec.onnx"), (3, 4, 8), "probs"), "cpu", preprocess="raw")
    xb = np.random.default_rng(0).standard_normal((3, 3, 4, 8)).astype(np.float32)
    with torch.no_grad():
        p = net(torch.tensor(xb)).numpy()
    for step, char in ((0, 0), (5, 3), (7, 5)):
        np.testing.assert_allclose(probabilities(ex, xb, step * 6 + char), p[:, step, char], rtol=1e-5)


def test_a_conv_head_s_probability_is_its_softmax_over_the_classes():
    """(N, C, 1, 1) logits: the softmax runs over the C classes, not the last axis of one value."""
    from onnxsal.evaluate.faithfulness import probabilities

    w = np.random.default_rng(1).standard_normal((5, 1, 4, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Conv", ["image", "w"], ["logits"])], "head",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 1, 4, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 5, 1, 1])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ex = Explainer(model, "cpu", preprocess="raw")
    xb = np.random.default_rng(2).standard_normal((2, 1, 4, 4)).astype(np.float32)
    z = np.einsum("nchw,kchw->nk", xb.astype(np.float64), w.astype(np.float64))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities(ex, xb, 3), p[:, 3], rtol=1e-5)


def test_probabilities_made_without_a_final_softmax_are_read_as_they_are(tmp_path):
    """An ensemble's mean of two softmaxes ends in a Div, not a Softmax: its rows are
    probabilities already, and a softmax of them would flatten every curve towards 1/C."""

    import torch
    from torch import nn

    from onnxsal.evaluate.faithfulness import probabilities

    torch.manual_seed(1)

    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
            self.b = nn.Sequential(nn.Conv2d(3, 4, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

        def forward(self, x):
            return (torch.softmax(self.a(x) * 4, 1) + torch.softmax(self.b(x) * 4, 1)) / 2

    net = Ensemble().eval()
    ex = Explainer(_torch_export(net, str(tmp_path / "ens.onnx"), (3, 8, 8), "p"), "cpu", preprocess="raw")
    assert ex.model.activation is None
    xb = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        p = net(torch.tensor(xb)).numpy()
    np.testing.assert_allclose(probabilities(ex, xb, 2), p[:, 2], rtol=1e-5)
