"""Half-precision and float64 models are explained in float32 (graph/precision.py).

The reference is the same torch network with every weight rounded to float16, differentiated by
torch.autograd in float64: lifting the converted model to float32 must give that function's
gradient, to float32 rounding. The networks are ones whose constants are all exact in float16: the
conversion rounds a GELU's or an attention scale's constants too, and the torch network would no
longer be the same function."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, numpy_helper
from onnxconverter_common import float16

import onnxsal
from onnxsal.errors import ModelError
from onnxsal.model import load

import tiny
from test_autodiff_models import build, export, rel_err


def _rounded(net: torch.nn.Module) -> torch.nn.Module:
    """The net as its float16 conversion holds it: weights and statistics rounded, in float64."""
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return net.double()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    cache = {}

    def get(name: str, keep_io_types: bool):
        if (name, keep_io_types) not in cache:
            net = build(name)
            model = export(net, tmp_path_factory.mktemp(name) / "m.onnx", dynamic=True)
            cache[name, keep_io_types] = (_rounded(net), float16.convert_float_to_float16(model, keep_io_types=keep_io_types))
        return cache[name, keep_io_types]

    return get


def _matches_rounded_net(model16: onnx.ModelProto, net: torch.nn.Module, images: int, seed: int):
    """The lifted model's logits and input gradient against torch.autograd on `net` (the network with
    its weights rounded to float16, in float64); returns the images and onnxsal's outputs."""
    ex = onnxsal.Explainer(model16, "cpu", preprocess="raw")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((images, 3, 32, 32)).astype(np.float32)
    seeds = rng.standard_normal((images, 10)).astype(np.float32)
    out = ex.engine.gradients(x, seeds, wrt=["input"])
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    logits = net(xt)
    (logits * torch.tensor(seeds, dtype=torch.float64)).sum().backward()
    assert rel_err(out["logits"], logits.detach().numpy()) < 1e-5
    assert rel_err(out["grad_input"], xt.grad.numpy()) < 1e-4
    return x, out


CASES = [("resnet", False), ("resnet", True), ("mobilenetv2", False), ("vgg", True)]


@pytest.mark.parametrize("name,keep_io_types", CASES, ids=[f"{n}{'-keep_io' if k else ''}" for n, k in CASES])
def test_float16_model_gradient_is_its_float32_lift(converted, name, keep_io_types):
    net, model16 = converted(name, keep_io_types)
    in_type = model16.graph.input[0].type.tensor_type.elem_type
    assert in_type == (TensorProto.FLOAT if keep_io_types else TensorProto.FLOAT16)
    x, out = _matches_rounded_net(model16, net, images=3, seed=3)

    # and it is the converted model: ONNX Runtime running it in float16 gives the same logits to its rounding
    sess = ort.InferenceSession(model16.SerializeToString(), providers=["CPUExecutionProvider"])
    half = sess.run(None, {"input": x if keep_io_types else x.astype(np.float16)})[0].astype(np.float32)
    assert rel_err(half, out["logits"]) < 1e-2


def test_float16_cam_through_the_layer_graphs(converted, tmp_path):
    """Grad-CAM reads a layer's activations and differentiates the rest from them: both run on the
    lifted graph and match the float32 export of the rounded network."""
    net, model16 = converted("resnet", True)
    reference = export(net.float(), tmp_path / "rounded.onnx", dynamic=True)
    net.double()
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    maps = [onnxsal.Explainer(m, "cpu", preprocess="raw").explain(x, "gradcam", target=2) for m in (model16, reference)]
    assert maps[0].layer == maps[1].layer
    assert rel_err(maps[0].raw, maps[1].raw) < 1e-4


def _retyped(model: onnx.ModelProto, dtype, elem_type: int) -> onnx.ModelProto:
    """The tiny net with every float weight and its input and outputs in another float type."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for t in out.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for vi in list(out.graph.input) + list(out.graph.output):
        vi.type.tensor_type.elem_type = elem_type
    return out


@pytest.mark.parametrize("dtype,elem_type", [("bfloat16", TensorProto.BFLOAT16), (np.float64, TensorProto.DOUBLE)],
                         ids=["bfloat16", "float64"])
def test_bfloat16_and_float64_models_run_in_float32(dtype, elem_type):
    """ONNX Runtime's CPU build runs neither a bfloat16 nor a float64 convolution; their float32 lift
    explains them, equal to the float32 net with the same (rounded) weights."""
    import ml_dtypes

    dtype = getattr(ml_dtypes, dtype) if isinstance(dtype, str) else dtype
    base = tiny.conv_net(size=16)
    other = _retyped(base, dtype, elem_type)
    rounded = _retyped(other, np.float32, TensorProto.FLOAT)
    x = np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)
    got = [onnxsal.Explainer(m, "cpu", preprocess="raw") for m in (other, rounded)]
    assert load(other).input.elem_type == elem_type
    for method in ("saliency", "gradcam", "scorecam"):
        a, b = (e.explain(x, method, target=1).raw for e in got)
        np.testing.assert_array_equal(a, b)


def test_corrupt_float16_weight_is_a_model_error():
    model = _retyped(tiny.conv_net(size=16), np.float16, TensorProto.FLOAT16)
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-2]
    with pytest.raises(ModelError, match="corrupt"):
        load(model)


def test_cli_explains_a_float16_file_and_inspect_says_so(tmp_path, capsys):
    from PIL import Image

    from onnxsal.cli import main

    path = str(tmp_path / "half.onnx")
    onnx.save(float16.convert_float_to_float16(tiny.conv_net(size=16)), path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["inspect", path]) == 0
    assert "float16 tensors, run in float32" in capsys.readouterr().out
    assert main(["explain", path, str(tmp_path / "x.png"), "-m", "gradcam", "-m", "saliency", "-o", str(tmp_path / "out"), "-q"]) == 0
    assert np.isfinite(np.load(tmp_path / "out" / "x.saliency.npy")).all()
    summary = json.loads((tmp_path / "out" / "x.json").read_text())
    assert "the model's float16 tensors run in float32 here" in summary["notes"]


def test_keep_io_types_conversion_is_named_too(converted, capsys, tmp_path):
    """A float32 input in front of a float16 network: inspect and the notes still say what runs."""
    from onnxsal.cli import main

    _, model16 = converted("resnet", True)
    path = str(tmp_path / "keep_io.onnx")
    onnx.save(model16, path)
    assert load(path).lifted_from == ("float16",)
    assert main(["inspect", path]) == 0
    assert "float16 tensors, run in float32" in capsys.readouterr().out
    assert load(tiny.conv_net(size=16)).lifted_from == ()


def test_float16_weights_behind_casts():
    """A float32 network storing its weights in float16, each behind a Cast to float: the same maps
    as the float32 network with the rounded weights, and the note names the float16 tensors."""
    base = tiny.conv_net(size=16)
    stored = onnx.ModelProto()
    stored.CopyFrom(base)
    casts = []
    for t in stored.graph.initializer:
        casts.append(onnx.helper.make_node("Cast", [t.name + "_h"], [t.name], to=TensorProto.FLOAT))
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name + "_h"))
    nodes = casts + list(stored.graph.node)
    del stored.graph.node[:]
    stored.graph.node.extend(nodes)
    rounded = _retyped(_retyped(base, np.float16, TensorProto.FLOAT16), np.float32, TensorProto.FLOAT)
    x = np.random.default_rng(2).random((1, 3, 16, 16), dtype=np.float32)
    a, b = (onnxsal.Explainer(m, "cpu", preprocess="raw").explain(x, "gradcam", target=0) for m in (stored, rounded))
    np.testing.assert_allclose(a.raw, b.raw, rtol=1e-6, atol=1e-7)
    assert "the model's float16 tensors run in float32 here" in a.notes


class _Resampled(torch.nn.Module):
    """Upsampled by 1.5, a scale that the output and input sizes do not give back (16 / 11)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 4, 3, stride=3, padding=1)
        self.up = torch.nn.Upsample(scale_factor=1.5, mode="bilinear")
        self.head = torch.nn.Linear(4 * 16 * 16, 10)

    def forward(self, x):
        return self.head(self.up(torch.relu(self.c1(x))).flatten(1))


def test_float16_resize_reads_its_scales_through_the_conversion_s_cast(tmp_path):
    """onnxconverter_common keeps a Resize in float32 and casts its float16 scales to it: the
    gradient must use those scales (1.5), not the ratio of the sizes, as the runtime does."""
    torch.manual_seed(0)
    net = _Resampled().eval()
    model16 = float16.convert_float_to_float16(export(net, tmp_path / "m.onnx", dynamic=True))
    resize = next(n for n in model16.graph.node if n.op_type == "Resize")
    assert any(n.op_type == "Cast" and n.output[0] == resize.input[2] for n in model16.graph.node)
    _matches_rounded_net(model16, _rounded(net), images=2, seed=5)


def test_casts_around_an_op_kept_in_float32_leave_with_the_lift():
    """A half-precision file that keeps some ops in float32 (a Keras mixed-precision policy's batch
    norms; onnxconverter_common's ``op_block_list``) casts around them, and lifted, those casts copy
    float32 to float32. They go at load: the last Relu is the default CAM layer, as in the float32
    file, not the bare convolution that the first cast cut off from it."""
    base = tiny.conv_net(size=16)
    mixed = float16.convert_float_to_float16(base, op_block_list=["Relu"])
    assert len([n for n in mixed.graph.node if n.op_type == "Cast"]) >= 4
    rounded = _retyped(_retyped(base, np.float16, TensorProto.FLOAT16), np.float32, TensorProto.FLOAT)
    a, b = (onnxsal.Explainer(m, "cpu", preprocess="raw") for m in (mixed, rounded))
    assert not [n for n in a.model.light.graph.node if n.op_type == "Cast"]
    assert (a.model.default_layer.node, a.model.default_layer.op_type) == (b.model.default_layer.node, "Relu")
    x = np.random.default_rng(5).random((1, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(a.explain(x, "gradcam", target=1).raw, b.explain(x, "gradcam", target=1).raw,
                               rtol=1e-6, atol=1e-7)


def test_a_cast_from_another_type_or_to_a_graph_output_stays():
    """Only float32-to-float32 casts go, and an output keeps its name: a file whose scores are a Cast
    of the logits still scores that output."""
    from onnxsal.graph.simplify import drop_float_casts

    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    n = onnx.helper.make_tensor_value_info("n", TensorProto.INT64, [1, 2])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
    nodes = [onnx.helper.make_node("Cast", ["x"], ["a"], to=TensorProto.FLOAT),
             onnx.helper.make_node("Cast", ["n"], ["b"], to=TensorProto.FLOAT),
             onnx.helper.make_node("Add", ["a", "b"], ["s"]),
             onnx.helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x, n], [y])))
    assert drop_float_casts(model) == 2
    assert [(nd.op_type, list(nd.input), list(nd.output)) for nd in model.graph.node] == [
        ("Cast", ["n"], ["b"]), ("Add", ["x", "b"], ["y"])]
