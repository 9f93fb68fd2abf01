"""A Hugging Face export's folder: config.json (id2label) and preprocessor_config.json (rescale,
mean, std, size) beside the model give its labels and preprocessing, as optimum-cli writes them."""

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.sidecar import read_sidecar

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
LABELS = ["tabby", "tiger", "lion"]


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


def hf_folder(tmp_path, net, processor=None, config=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(tmp_path / "model.onnx"), input_names=["pixel_values"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"pixel_values": {0: "n", 2: "h", 3: "w"}})
    config = config if config is not None else {
        "model_type": "vit", "id2label": {"2": "lion", "0": "tabby", "1": "tiger"}}     # JSON keeps this order
    processor = processor if processor is not None else {
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "do_normalize": True, "image_mean": MEAN,
        "image_std": STD, "do_resize": True, "size": {"height": 8, "width": 8}, "image_processor_type": "ViTImageProcessor"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(processor))
    return str(tmp_path / "model.onnx")


def test_labels_preprocessing_and_size_come_from_the_folder(tmp_path, capsys):
    net = classifier()
    path = hf_folder(tmp_path, net)
    m = onnxsal.load(path)          # a dynamic size: preprocessor_config.json's size fixes it
    assert m.labels == LABELS and m.input.size == (8, 8)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    res = onnxsal.Explainer(path, "cpu").explain(str(tmp_path / "img.png"), "saliency", "lion")
    x = (rgb / 255.0 - np.array(MEAN)) / np.array(STD)
    xt = torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32, requires_grad=True)
    net(xt)[0, 2].backward()
    np.testing.assert_allclose(res.raw[0], xt.grad.abs().amax(dim=1)[0].numpy(), rtol=1e-4, atol=1e-7)
    assert res.targets[0].label == "lion"
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "preprocessor_config.json (RGB" in out and "tabby, tiger, lion" in out


def test_the_model_metadata_and_the_caller_win(tmp_path):
    path = hf_folder(tmp_path, classifier())
    model = onnx.load(path)
    model.metadata_props.add(key="onnxsal.labels", value=json.dumps(["a", "b", "c"]))
    model.metadata_props.add(key="onnxsal.preprocess", value=json.dumps({"preset": "imagenet", "size": [8, 8]}))
    onnx.save(model, path)
    m = onnxsal.load(path)
    assert m.labels == ["a", "b", "c"] and m.preprocess.preset == "imagenet"
    ex = onnxsal.Explainer(path, "cpu", preprocess="unit", labels=["x", "y", "z"])
    assert ex.model.preprocess.preset == "unit" and ex.model.labels == ["x", "y", "z"]


@pytest.mark.parametrize("config,processor", [
    ({"id2label": {"0": "a", "2": "c"}}, {"image_mean": [0.5], "image_std": [0.0]}),     # gaps; a zero std
    ({"id2label": ["a", "b", "c"]}, {"rescale_factor": "x"}),                             # not a dict; not a number
    ({"id2label": {"0": "a", "1": "b"}}, {"size": {"shortest_edge": 224}}),               # 2 labels for 3 classes
])
def test_odd_folders_are_ignored(tmp_path, config, processor):
    path = hf_folder(tmp_path, classifier(), processor, config)
    side = read_sidecar(path)
    m = onnxsal.load(path, size=(8, 8))
    assert m.labels is None
    if "size" in processor:            # a shortest-edge resize: the model's own size, the processor's values
        assert side.preprocess is not None and side.preprocess.size is None
    else:
        assert side.preprocess is None and m.preprocess is None


def test_a_bom_is_read_past(tmp_path):
    """Files saved by Windows editors start with a byte-order mark, which json.load refuses."""
    path = hf_folder(tmp_path, classifier())
    for name in ("config.json", "preprocessor_config.json"):
        text = (tmp_path / name).read_text()
        (tmp_path / name).write_bytes(("\ufeff" + text).encode("utf-8"))
    side = read_sidecar(path)
    assert side.labels == LABELS and side.preprocess is not None and list(side.preprocess.mean) == MEAN


def test_broken_json_is_ignored(tmp_path):
    path = hf_folder(tmp_path, classifier())
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    assert read_sidecar(path).labels is None and read_sidecar(path).preprocess is None
    assert read_sidecar("<memory>").labels is None


def test_rescale_and_normalise_switches(tmp_path):
    path = hf_folder(tmp_path, classifier(), {"do_rescale": False, "do_normalize": False, "image_mean": MEAN,
                                              "image_std": STD, "size": {"height": 8, "width": 8}})
    spec = read_sidecar(path).preprocess
    assert spec.scale == 1.0 and spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    spec = read_sidecar(hf_folder(tmp_path, classifier(), {"image_mean": MEAN, "image_std": STD})).preprocess
    assert spec.scale == pytest.approx(1 / 255) and spec.mean == tuple(MEAN) and spec.std == tuple(STD)
