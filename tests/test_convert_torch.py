"""`onnxsal convert torch` against torch.autograd on the same module.

The network has what trips converters up: BatchNorm after every conv (which the
exporter would fuse away), ReLU(inplace=True) shared between two calls in a
residual block, and a final softmax. References are computed in PyTorch with
forward hooks and autograd; maps are compared at the layer's own resolution.
"""

import json
import os
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import onnxsal  # noqa: E402
from onnxsal.cli import main as cli_main  # noqa: E402
from onnxsal.methods.gradients import smoothgrad_attr  # noqa: E402

NET = textwrap.dedent('''
    import torch
    from torch import nn


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(c)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(y)) + x)


    class Net(nn.Module):
        def __init__(self, classes=5):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
            self.layer1 = Block(16)
            self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.layer2 = Block(32)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes), nn.Softmax(dim=1))

        def forward(self, x):
            return self.head(self.layer2(torch.relu(self.down(self.layer1(self.stem(x))))))


    def make():
        torch.manual_seed(0)
        net = Net()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, or BatchNorm is the identity
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
        return net.eval()
''')
LAST, EARLIER = "layer2", "layer1.bn2"
SIZE = 32


def pearson(a, b):
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "net.py"
    path.write_text(NET)
    return path


@pytest.fixture(scope="module")
def net(net_file):
    from converters.torch import load_factory

    return load_factory(f"{net_file}:make")


@pytest.fixture(scope="module")
def converted(net, tmp_path_factory):
    from converters.torch import convert

    out = tmp_path_factory.mktemp("onnx") / "net.onnx"
    return convert(net, out, input_shape=(1, 3, SIZE, SIZE), preprocess="imagenet", labels=list("abcde"))


@pytest.fixture(scope="module")
def explainer(converted):
    return onnxsal.Explainer(converted.path, "cpu")


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).normal(0, 1, (1, 3, SIZE, SIZE)).astype(np.float32)


def logits_of(net, xt):
    """The scores onnxsal explains: the input of the final softmax."""
    return net.head[:-1](net.layer2(torch.relu(net.down(net.layer1(net.stem(xt))))))


def torch_layer(net, name, x, target):
    """Activations of module `name` (its last call) and d logit / d activations, by autograd."""
    module = net.get_submodule(name)
    seen = {}

    def hook(_m, _i, out):
        out = out.clone()           # what the module returned, before any in-place op after it
        out.retain_grad()
        seen["a"] = out
        return out

    h = module.register_forward_hook(hook)
    try:
        logits_of(net, torch.tensor(x))[:, target].sum().backward()
    finally:
        h.remove()
    return seen["a"].detach().numpy(), seen["a"].grad.numpy()


def torch_input_grad(net, x, target):
    xt = torch.tensor(x, requires_grad=True)
    logits_of(net, xt)[:, target].sum().backward()
    return xt.grad.numpy()


def test_output_matches_torch(net, converted):
    xb = np.random.default_rng(1).normal(0, 1, (4, 3, SIZE, SIZE)).astype(np.float32)
    got = ort.InferenceSession(converted.path).run(None, {"input": xb})[0]
    with torch.no_grad():
        want = net(torch.tensor(xb)).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert converted.check <= 1e-4
    assert not net.training


def test_metadata_and_module_map(converted):
    proto = onnx.load(converted.path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["onnxsal.preprocess"])["preset"] == "imagenet"
    assert json.loads(meta["onnxsal.labels"]) == list("abcde")
    layers = json.loads(meta["onnxsal.layers"])
    source = json.loads(meta["onnxsal.source"])
    assert source["framework"] == "pytorch" and "torch" in source["versions"]
    # the conv before each batch norm keeps its own tensor, and a shared in-place ReLU maps to its last call
    assert layers["layer1.conv1"] != layers["layer1.bn1"]
    assert layers["layer1"] == layers["layer1.relu"]
    assert "head.3" not in layers            # 2-D outputs are not layers
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.name for o in proto.graph.output] == ["output"]


@pytest.mark.parametrize("layer", [LAST, EARLIER, "layer1.conv1"])
def test_layer_gradients_match_autograd(net, explainer, x, layer):
    tensor = explainer.model.find_layer(layer).tensor
    seeds = np.zeros((1, 5), np.float32)
    seeds[0, 2] = 1
    out = explainer.engine.gradients(x, seeds, wrt=[tensor], extra=[tensor])
    a, g = torch_layer(net, layer, x, 2)
    assert rel_err(out[tensor], a) <= 1e-4
    assert rel_err(out["grad_" + tensor], g) <= 1e-4


def test_input_gradient_matches_autograd(net, explainer, x):
    got = explainer.explain(x, "saliency", target=1, reduce="sum").raw[0]
    want = torch_input_grad(net, x, 1)[0].sum(axis=0)
    assert rel_err(got, want) <= 1e-4


def ref_cam(a, g, method):
    a, g = a[0].astype(np.float64), g[0].astype(np.float64)
    if method == "gradcam":
        w = g.mean(axis=(1, 2))
    else:
        g2, g3 = g ** 2, g ** 3
        alpha = np.where(g != 0, g2 / (2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3 + 1e-7), 0)
        w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2))
    return np.maximum(np.einsum("k,khw->hw", w, a), 0)


@pytest.mark.parametrize("layer", [LAST, EARLIER])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_cams_match_autograd(net, explainer, x, layer, method):
    ours = explainer.explain(x, method, target=2, layer=layer).raw[0]
    ref = ref_cam(*torch_layer(net, layer, x, 2), method)
    assert pearson(ours, ref) >= 0.99


@pytest.mark.parametrize("layer", [LAST, EARLIER])
@pytest.mark.parametrize("max_n", [0, 6], ids=["scorecam", "fasterscorecam"])
def test_scorecam_matches_torch(net, explainer, x, layer, max_n):
    """Softmax-weighted Score-CAM (the paper's, pytorch-grad-cam's), masks by F.interpolate."""
    import torch.nn.functional as F

    if max_n:
        ours = explainer.explain(x, "fasterscorecam", target=2, layer=layer, max_n=max_n).raw[0]
    else:
        ours = explainer.explain(x, "scorecam", target=2, layer=layer).raw[0]
    a, _ = torch_layer(net, layer, x, 2)
    a = torch.tensor(a)
    if max_n:
        keep = torch.sort(torch.argsort(-a[0].flatten(1).std(dim=1, unbiased=False), stable=True)[:max_n]).values
        a = a[:, keep]
    up = F.interpolate(a, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0]
    lo, hi = up.flatten(1).min(1).values, up.flatten(1).max(1).values
    masks = (up - lo[:, None, None]) / (hi - lo)[:, None, None]
    with torch.no_grad():
        scores = logits_of(net, torch.tensor(x) * masks[:, None])[:, 2]
    ref = torch.relu(torch.einsum("k,khw->hw", torch.softmax(scores, 0), a[0])).numpy()
    assert pearson(ours, ref) >= 0.99


def test_smoothgrad_matches_autograd_with_identical_noise(net, explainer, x):
    from onnxsal.context import Context

    n, level = 6, 0.15
    noise = np.random.default_rng(2).normal(0, level * float(x.max() - x.min()), (n,) + x.shape[1:]).astype(np.float32)
    ctx = Context(explainer.engine, x, explainer.targets(explainer.predict(x), [3], 1, "logit"), None)
    ours = np.abs(smoothgrad_attr(ctx, n, level, None, noise=noise)).max(axis=1)[0]
    ref = np.abs(torch_input_grad(net, x + noise, 3).mean(axis=0)).max(axis=0)
    assert pearson(ours, ref) >= 0.99
    assert rel_err(ours, ref) <= 1e-4


def test_cli_convert_torch_and_explain(net_file, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    rc = cli_main(["convert", "torch", f"{net_file}:make", "--input-shape", "1,3,32,32", "-o", str(out),
                   "--preprocess", "imagenet", "--labels", "a,b,c,d,e"])
    assert rc == 0 and out.exists()
    assert "mapped to ONNX tensors" in capsys.readouterr().out
    image = os.path.join(os.path.dirname(__file__), "..", "models", "demo", "images", "00_circle.png")
    rc = cli_main(["explain", str(out), image, "-m", "gradcam", "--layer", LAST, "-o", str(tmp_path), "-q"])
    assert rc == 0
    assert rc == 0 and (tmp_path / "00_circle.gradcam.png").exists()


def test_factory_errors(net_file, tmp_path):
    assert cli_main(["convert", "torch", f"{net_file}:nope", "--input-shape", "1,3,32,32", "-o", str(tmp_path / "a.onnx")]) == 2
    assert cli_main(["convert", "torch", str(tmp_path / "none.py:make"), "--input-shape", "1,3,32,32",
                     "-o", str(tmp_path / "a.onnx")]) == 2
    assert cli_main(["convert", "torch", f"{net_file}:make", "--input-shape", "1,2", "-o", str(tmp_path / "a.onnx")]) == 2


def test_api_accepts_a_module_and_an_importable_factory(tmp_path):
    from converters.torch import convert, load_factory

    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2), nn.Softmax(1))
    res = convert(seq, tmp_path / "seq.onnx", input_shape=(1, 1, 12, 12), preprocess="unit", labels=["no", "yes"])
    assert res.check <= 1e-4 and "0" in res.layers
    assert isinstance(load_factory("torch.nn:Identity"), nn.Identity)


@pytest.mark.parametrize("args,message", [
    (["--input-shape", "1,3,x,32"], "--input-shape takes numbers separated by commas, not '1,3,x,32'"),
    (["--input-shape", "1,1,32,32"], "the module fails on an input of shape (1, 1, 32, 32): RuntimeError"),
    (["--input-shape", "1,3,32,32", "--scale", "nan"], "--scale must be finite"),
    (["--input-shape", "1,3,32,32", "--preprocess", "imagenet", "--mean", "0,inf,0"], "--scale must be finite"),
    (["--input-shape", "1,3,32,32", "--scale", "0"], "--scale non-zero"),
])
def test_bad_conversion_settings_are_one_line(net_file, tmp_path, capsys, args, message):
    out = tmp_path / "a.onnx"
    assert cli_main(["convert", "torch", f"{net_file}:make", "-o", str(out)] + args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "unexpected" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("opset", ["16", "21", "99"])
def test_an_opset_the_exporter_does_not_write_is_refused_first(net_file, tmp_path, capfd, opset):
    """Past the exporter's newest opset, torch.onnx would print its whole graph on stdout (from C++)."""
    assert cli_main(["convert", "torch", f"{net_file}:make", "-o", str(tmp_path / "a.onnx"), "--input-shape",
                     "1,3,32,32", "--opset", opset]) == 2
    out, err = capfd.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, (out, err)
    assert ("use 17 to 20" if opset != "16" else "opset 16 is too old") in err


def test_a_failed_export_prints_one_line_and_no_graph(tmp_path, capfd):
    """An op the exporter cannot write: one error line, and none of torch.onnx's graph dump on stdout."""
    (tmp_path / "fft.py").write_text(
        "import torch\n"
        "class F(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.c = torch.nn.Conv2d(3, 2, 3)\n"
        "    def forward(self, x):\n"
        "        return torch.fft.fft2(self.c(x)).abs().mean((2, 3))\n"
        "def make():\n"
        "    return F()\n")
    assert cli_main(["convert", "torch", f"{tmp_path / 'fft.py'}:make", "-o", str(tmp_path / "a.onnx"),
                     "--input-shape", "1,3,16,16"]) == 2
    out, err = capfd.readouterr()
    assert out == "", out[:300]
    assert "torch.onnx.export failed: UnsupportedOperatorError" in err and "fft_fft2" in err
    assert len(err.strip().splitlines()) == 1, err
    print("stdout still works")
    assert capfd.readouterr().out == "stdout still works\n"


def test_input_shapes_take_commas_spaces_or_x():
    from converters.metadata import numbers

    for given in ("1,3,32,32", "1, 3, 32, 32", "1 3 32 32", "1x3x32x32", (1, 3, 32, 32), [1.0, 3, 32, 32],
                  np.array([1, 3, 32, 32])):
        assert numbers(given, "--input-shape", int) == [1, 3, 32, 32]
    assert numbers("0.5", "--mean") == [0.5] and numbers(0.5, "--mean") == [0.5]


SEQ = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize("kwargs,error,message", [
    ({"input_shape": (1, 3, 32.5, 32)}, "ConversionError", "takes whole numbers, not"),
    ({"input_shape": (1, 3, True, 32)}, "ConversionError", "takes numbers, not"),
    ({"input_shape": "1,3,-32,32"}, "ConversionError", "takes N,C,H,W, not 1,3,-32,32"),
    ({"mean": ["a", 0, 0]}, "ConversionError", "--mean takes numbers"),
    ({"scale": "x"}, "ConversionError", "--scale takes one number, not 'x'"),
    ({"scale": "1,2"}, "ConversionError", "--scale takes one number, not '1,2'"),
    ({"bgr": "no"}, "ConversionError", "--bgr is True or False, not 'no'"),
    ({"opset": "17"}, "ConversionError", "opset is a whole number, not '17'"),
    ({"check_inputs": np.zeros((2, 3, 16, 16), np.float32)}, "ConversionError", "check_inputs have shape"),
    ({"check_inputs": np.full((1, 3, 32, 32), np.nan, np.float32)}, "ConversionError", "must hold finite numbers"),
    ({"output": "{tmp}"}, "OutputError", "it is a folder"),
    ({"output": "{tmp}/plain/m.onnx"}, "OutputError", "cannot write the model to"),
])
def test_conversion_arguments_of_the_wrong_kind(tmp_path, kwargs, error, message):
    """Settings given from Python are read as the CLI reads them, and refused in one typed error."""
    import onnxsal.errors as errors
    from converters.torch import convert

    (tmp_path / "plain").write_text("a file, not a folder")
    given = {"input_shape": (1, 3, 32, 32), **{k: v.format(tmp=tmp_path) if isinstance(v, str) and k == "output"
                                                 else v for k, v in kwargs.items()}}
    output = given.pop("output", None)
    with pytest.raises(getattr(errors, error), match=message):
        convert(SEQ, output, **given)


def test_the_output_path_is_tried_before_the_export(tmp_path, monkeypatch):
    """A path that cannot be written stops the conversion before torch.onnx runs, and leaves no folder."""
    import torch

    from converters.torch import convert
    from onnxsal.errors import ConversionError, OutputError

    (tmp_path / "plain").write_text("a file, not a folder")

    def never(*args, **kwargs):
        raise AssertionError("exported before trying the output path")

    monkeypatch.setattr(torch.onnx, "export", never)
    with pytest.raises(OutputError, match="cannot write the model to .*cannot make the output folder"):
        convert(SEQ, tmp_path / "plain" / "m.onnx", input_shape=(1, 3, 32, 32))
    with pytest.raises(ConversionError, match="torch.onnx.export failed: AssertionError: exported before"):
        convert(SEQ, tmp_path / "new" / "deep" / "m.onnx", input_shape=(1, 3, 32, 32))
    assert not (tmp_path / "new").exists()


def test_conversion_settings_as_strings_mean_what_the_cli_means(tmp_path):
    from converters.torch import convert

    a = convert(SEQ, tmp_path / "a.onnx", input_shape="1,3,32,32", mean="0.5", std="0.25,0.25,0.25", labels="no,yes")
    b = convert(SEQ, tmp_path / "b.onnx", input_shape=(1, 3, 32, 32), mean=[0.5], std=[0.25] * 3, labels=["no", "yes"])
    meta = [{p.key: p.value for p in onnx.load(tmp_path / f"{n}.onnx").metadata_props} for n in "ab"]
    assert meta[0]["onnxsal.preprocess"] == meta[1]["onnxsal.preprocess"] and meta[0]["onnxsal.labels"] == \
        meta[1]["onnxsal.labels"]
    assert json.loads(meta[0]["onnxsal.preprocess"])["mean"] == [0.5] and a.check is not None and b.check is not None


def test_a_failed_check_says_by_how_much_and_how_to_convert_anyway(tmp_path, monkeypatch):
    from converters import metadata
    from converters.torch import convert
    from onnxsal.errors import ConversionError

    monkeypatch.setattr(metadata, "compare", lambda a, b: 1.01e-4)
    with pytest.raises(ConversionError, match=r"ONNX Runtime and PyTorch disagree by 0.000101 \(relative to the output's "
                                              r"scale; the check allows 0.0001\) on the check input; --no-check "
                                              r"\(check=False\) converts without it$"):
        convert(SEQ, tmp_path / "a.onnx", input_shape=(1, 3, 12, 12), preprocess="unit")
    assert not (tmp_path / "a.onnx").exists()
    assert convert(SEQ, tmp_path / "a.onnx", input_shape=(1, 3, 12, 12), preprocess="unit", check=False).check is None


@pytest.mark.parametrize("dtype,act,kept", [("float16", nn.GELU, True), ("float16", nn.CELU, False),
                                            ("bfloat16", nn.GELU, False), ("float64", nn.GELU, False)],
                         ids=["float16", "float16-celu", "bfloat16", "float64"])
def test_a_module_in_another_float_type_converts_and_explains(tmp_path, dtype, act, kept):
    """``module.half()``, ``.bfloat16()`` or ``.double()`` is traced on an example of its own type (a
    float32 example failed in its first convolution). A file ONNX Runtime's CPU build runs keeps its
    type and is checked on float16 inputs; one it does not (no bfloat16 or float64 convolution, and
    torch.onnx writes a float16 ``Celu``, which ONNX defines for float32 only) is written lifted to
    float32, as onnxsal runs it, with a note. The input gradient is torch.autograd's on the float32
    network with the weights rounded to that type."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), act(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.7)
    half = net.to(getattr(torch, dtype))
    from converters.torch import convert

    res = convert(half, tmp_path / "m.onnx", input_shape=(1, 3, 16, 16), preprocess="raw")
    elem = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16,
            "float64": onnx.TensorProto.DOUBLE}[dtype]
    written = res.proto.graph.input[0].type.tensor_type.elem_type
    lifted = [n for n in res.notes if n.startswith(f"ONNX Runtime cannot run the model in {dtype} (")]
    if kept:
        assert written == elem and not lifted
    else:
        assert written == onnx.TensorProto.FLOAT and lifted and lifted[0].endswith("; the file holds it in float32")
        assert not {t.data_type for t in res.proto.graph.initializer} & {elem}
    if act is nn.CELU:
        assert "Celu" in lifted[0]
    assert res.check <= {"float16": 1e-2, "bfloat16": 5e-2, "float64": 1e-4}[dtype]

    ref = half.float()
    x = torch.from_numpy(np.random.default_rng(5).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)).requires_grad_()
    cot = torch.from_numpy(np.random.default_rng(6).normal(size=(2, 4)).astype(np.float32))
    (ref(x) * cot).sum().backward()
    want = x.grad.numpy()
    ex = onnxsal.Explainer(res.path, "cpu")
    name = ex.model.input.name
    got = ex.engine.gradients(x.detach().numpy(), cot.numpy(), [name])[f"grad_{name}"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")   # the asymmetric case, on purpose
def test_a_dilated_same_convolution_converts(tmp_path, capfd):
    """torch.onnx writes ``padding="same"`` with a dilation as ``auto_pad=SAME_UPPER``, which ONNX
    Runtime refuses to run ("Dilation not supported"): the conversion check failed on it, and printed
    ONNX Runtime's own error log besides. The file now holds PyTorch's explicit pads."""
    from converters.torch import convert

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding="same", dilation=2), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                        nn.Conv2d(4, 4, 2, padding="same", dilation=3), nn.Flatten(), nn.LazyLinear(5)).eval()
    net(torch.zeros(1, 3, 12, 12))
    capfd.readouterr()
    res = convert(net, tmp_path / "m.onnx", input_shape=(1, 3, 12, 12), preprocess="raw")
    assert capfd.readouterr().err == ""
    assert not [n for n in res.proto.graph.node if n.op_type == "Conv" and
                any(a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER") for a in n.attribute)]
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    cot = torch.randn(2, 5)
    (net(x) * cot).sum().backward()
    ex = onnxsal.Explainer(res.path, "cpu")
    name = ex.model.input.name
    got = ex.engine.gradients(x.detach().numpy(), cot.numpy(), [name])[f"grad_{name}"]
    assert np.abs(got - x.grad.numpy()).max() <= 1e-4 * np.abs(x.grad.numpy()).max()
