"""Models that take their image as uint8 pixels (preprocessing exported inside the model)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from gradcheck import assert_matches_torch, run, session
from onnxsal import Explainer
from onnxsal.errors import ModelError
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


class PixelNet(nn.Module):
    """Takes uint8 pixels, NCHW or NHWC, and normalises them itself, as deployment exports do."""

    def __init__(self, channels_last: bool, pad: bool = False) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.channels_last, self.pad = channels_last, pad
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        x = x[:, :, 1:, :]                          # an integer Slice before the Cast
        if self.pad:
            x = nn.functional.pad(x, (1, 1, 0, 1), value=7)
        x = (x.float() / 255.0 - 0.45) / 0.226
        return self.head(self.features(x).mean((2, 3)))


def export(net: nn.Module, shape: tuple, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(shape, dtype=torch.uint8),), str(path), input_names=["pixels"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}})
    return str(path)


@pytest.mark.parametrize("channels_last,pad", [(False, False), (True, False), (True, True)])
def test_uint8_input_is_read_as_real_pixels(tmp_path, channels_last, pad):
    net = PixelNet(channels_last, pad).eval()
    shape = (1, 17, 16, 3) if channels_last else (1, 3, 17, 16)
    path = export(net, shape, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.index("Slice") < ops.index("Cast") and ("Pad" in ops) == pad     # the pixels move as integers first
    m = load(path)
    assert m.input.name == "pixels" and m.input.layout == ("NHWC" if channels_last else "NCHW")
    assert m.input.size == (17, 16) and "uint8 input 'pixels' as real pixel values" in m.read_as
    assert m.preprocess is not None and m.preprocess.preset == "raw"           # no flags needed
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3,) + shape[1:]).astype(np.uint8)
    # on the image's own pixels the rewritten model is the file, bit for bit
    ref = session(onnx.load(path)).run(None, {"pixels": pixels})[0]
    vm = vjp(m.proto, m.logits, [m.input.name])
    cot = rng.standard_normal((3, 5)).astype(np.float32)
    out = run(vm, {"pixels": pixels.astype(np.float32), f"grad_{m.logits}": cot})
    np.testing.assert_array_equal(out[m.logits], ref)
    # between them it is the same arithmetic on real values: gradients against torch.autograd,
    # at noisy (non-integer) pixels as SmoothGrad and Integrated Gradients feed them
    for x in (pixels.astype(np.float32), pixels + rng.uniform(-20, 20, pixels.shape).astype(np.float32)):
        out = run(vm, {"pixels": x, f"grad_{m.logits}": cot})
        assert_matches_torch(out, m.logits, "grad_pixels", net, x, cot)


def test_uint8_model_explains_an_image_file_without_flags(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from onnxsal.cli import app

    path = export(PixelNet(True).eval(), (1, 17, 16, 3), tmp_path / "m.onnx")
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 30, 3)).astype(np.uint8)).save(image)
    res = CliRunner().invoke(app, ["explain", path, str(image), "-m", "gradcam", "-m", "ig", "-m", "scorecam",
                                   "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "read the uint8 input 'pixels' as real pixel values" in res.output
    maps = [np.load(tmp_path / "out" / f"img.{m}.npy") for m in ("gradcam", "ig", "scorecam")]
    assert all(a.shape == (40, 30) and np.ptp(a) > 0 for a in maps)      # at the image's own size
    res = CliRunner().invoke(app, ["inspect", path])
    assert res.exit_code == 0 and "as real pixel values" in res.output and "raw (RGB" in res.output


def _dequantising_model(elem=TensorProto.UINT8, opset=17) -> onnx.ModelProto:
    """A full-integer export's front: the pixels go straight into DequantizeLinear."""
    rng = np.random.default_rng(2)
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    inits = {"s": np.array(0.02, np.float32), "z": np.array(3 if np.issubdtype(np_type, np.unsignedinteger) else -5, np_type),
             "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "fc": rng.standard_normal((4, 2)).astype(np.float32)}
    nodes = [helper.make_node("DequantizeLinear", ["pixels", "s", "z"], ["x"]),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", elem, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("elem", [TensorProto.UINT8, TensorProto.INT8])
def test_integers_come_back_rounded_where_the_model_computes_on_them(elem):
    proto = _dequantising_model(elem)
    m = load(proto)
    assert "rounded back to" in m.read_as
    lo, hi = (0, 256) if elem == TensorProto.UINT8 else (-128, 128)
    rng = np.random.default_rng(4)
    pixels = rng.integers(lo, hi, (2, 3, 8, 8)).astype(helper.tensor_dtype_to_np_dtype(elem))
    x = pixels.astype(np.float32) + rng.uniform(-0.45, 0.45, pixels.shape).astype(np.float32)
    x[0, 0, 0, :2] = [lo - 9.0, hi + 30.0]            # beyond the type: saturates, as storing it would
    stored = np.clip(np.round(x), lo, hi - 1).astype(pixels.dtype)
    ref = session(proto).run(None, {"pixels": stored})[0]
    vm = vjp(m.proto, m.logits, [m.input.name])
    cot = np.ones((2, 2), np.float32)
    out = run(vm, {"pixels": x, f"grad_{m.logits}": cot})
    np.testing.assert_array_equal(out[m.logits], ref)
    # straight through the rounding, zero where it saturated: the float model's gradient at the stored pixels
    xt = torch.tensor((stored.astype(np.float32) - float(numpy_helper.to_array(proto.graph.initializer[1]))) * 0.02,
                      requires_grad=True)
    w = torch.tensor(numpy_helper.to_array(proto.graph.initializer[2]))
    fc = torch.tensor(numpy_helper.to_array(proto.graph.initializer[3]))
    y = torch.relu(nn.functional.conv2d(xt, w, padding=1)).mean((2, 3)) @ fc
    y.sum().backward()
    want = xt.grad.numpy() * 0.02
    want[0, 0, 0, :2] = 0.0
    np.testing.assert_allclose(out["grad_pixels"], want, rtol=1e-4, atol=1e-7)


def test_16_bit_pixels_that_reach_integer_ops_before_opset_21_are_refused():
    with pytest.raises(ModelError, match=r"the uint16 input 'pixels' reaches DequantizeLinear node '' as integers.*"
                                         r"from opset 21 \(the model has 17\)"):
        load(_dequantising_model(TensorProto.UINT16))
    m = load(_dequantising_model(TensorProto.UINT16, opset=21))
    assert "rounded back to uint16" in m.read_as


def test_integer_inputs_that_are_no_image_keep_their_error():
    g = helper.make_graph([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 128])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128])])
    with pytest.raises(ModelError, match="no image-like input"):
        load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("method", ["gradcam", "ig"])
def test_exported_explainer_takes_the_models_uint8_pixels(tmp_path, method):
    from onnxsal.export import export as export_explainer

    path = export(PixelNet(True).eval(), (1, 17, 16, 3), tmp_path / "m.onnx")
    graph = export_explainer(path, method)
    assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [TensorProto.UINT8, TensorProto.INT64]
    pixels = np.random.default_rng(5).integers(0, 256, (2, 17, 16, 3)).astype(np.uint8)
    logits, maps = session(graph).run(["logits", "map"], {"pixels": pixels, "target": np.array([1, 4], np.int64)})
    np.testing.assert_array_equal(logits, session(onnx.load(path)).run(None, {"pixels": pixels})[0])
    ex = Explainer(path, "cpu")
    for i, t in enumerate([1, 4]):
        res = ex.explain(pixels[i:i + 1].astype(np.float32), method, target=t, **({"steps": 32} if method == "ig" else {}))
        np.testing.assert_allclose(maps[i], res.map, atol=1e-5)


def test_int8_pixels_default_to_the_image_shifted_by_128():
    """TFLite's int8 image inputs hold pixel - 128 (the quantisation of [0, 1] or [-1, 1] inputs)."""
    from PIL import Image

    from onnxsal.preprocess import prepare

    m = load(_dequantising_model(TensorProto.INT8))
    assert m.preprocess.preset == "raw" and m.preprocess.mean == (128.0,) * 3
    grey = Image.new("RGB", (8, 8), (0, 128, 255))
    x = prepare(grey, m.preprocess, layout="NCHW", channels=3, size=(8, 8)).tensor
    assert x[0, :, 0, 0].tolist() == [-128.0, 0.0, 127.0]
    assert load(_dequantising_model(TensorProto.UINT16, opset=21)).preprocess is None     # no convention: --preprocess
