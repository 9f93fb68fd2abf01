"""Models with inputs besides the image, held at given values (Captum's additional_forward_args)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from gradcheck import run
from hooks import kept
from onnxsal import Explainer
from onnxsal.errors import ModelError
from onnxsal.graph.autodiff import vjp
from onnxsal.model import load


class WithMetadata(nn.Module):
    """Image features concatenated with per-image metadata before the head, scaled by a temperature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 + 4, 5)

    def forward(self, image, meta, temperature):
        f = torch.relu(self.conv(image)).mean((2, 3))
        return self.head(torch.cat([f, meta], 1)) / temperature


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    net = WithMetadata().eval()
    path = tmp_path_factory.mktemp("fixed") / "meta.onnx"
    args = (torch.randn(1, 3, 16, 16), torch.randn(1, 4), torch.tensor([2.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, args, str(path), input_names=["image", "meta", "temperature"], output_names=["logits"],
                          opset_version=17, dynamo=False,
                          dynamic_axes={"image": {0: "N"}, "meta": {0: "N"}, "logits": {0: "N"}})
    return net, str(path)


META = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)


def test_held_inputs_give_torch_gradients_at_any_batch(exported):
    """The per-image metadata is repeated along the batch; the temperature is a constant."""
    net, path = exported
    m = load(path, fixed_inputs={"meta": META, "temperature": [1.5]})
    assert m.input.name == "image" and [i.name for i in m.proto.graph.input] == ["image"]
    vm = vjp(m.proto, m.logits, ["image"])
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)
        cot = rng.standard_normal((batch, 5)).astype(np.float32)
        out = run(vm, {"image": x, "grad_logits": cot})
        xt = torch.tensor(x, requires_grad=True)
        y = net(xt, torch.tensor(META).expand(batch, -1), torch.tensor([1.5]))
        (y * torch.tensor(cot)).sum().backward()
        np.testing.assert_allclose(out["logits"], y.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["grad_image"], xt.grad.numpy(), rtol=1e-4, atol=1e-7)


def test_explainer_and_batched_methods_see_the_held_values(exported):
    net, path = exported
    ex = Explainer(path, preprocess="raw", fixed_inputs={"meta": META, "temperature": 1.5})
    image = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    res = ex.explain(image, method="smoothgrad", n_samples=6)      # six noisy rows in one run
    assert np.ptp(res.map) > 0
    with torch.no_grad():
        want = net(torch.tensor(image), torch.tensor(META), torch.tensor([1.5])).numpy()[0]
    assert res.targets[0].index == int(np.argmax(want))
    other = Explainer(path, preprocess="raw", fixed_inputs={"meta": -3 * META, "temperature": 1.5})
    assert not np.allclose(other.explain(image, method="saliency").raw, ex.explain(image, method="saliency").raw)


def test_bad_held_inputs_are_model_errors(exported):
    _, path = exported
    with pytest.raises(ModelError, match="several inputs.*--feed NAME=VALUE"):
        load(path)
    with pytest.raises(ModelError, match="no input 'metadata'; its inputs: image, meta, temperature"):
        load(path, fixed_inputs={"metadata": META, "temperature": 1.0})
    with pytest.raises(ModelError, match=r"'meta' has shape \(1, 3\); the input is \[\?, 4\]"):
        load(path, fixed_inputs={"meta": META[:, :3], "temperature": 1.0})
    with pytest.raises(ModelError, match="inputs left are image, temperature"):
        load(path, fixed_inputs={"meta": META})
    for bad in (np.nan, np.inf):        # a NaN held value gives NaN scores, and maps normalised from them
        with pytest.raises(ModelError, match="the value for input 'temperature' holds NaN or infinite values"):
            load(path, fixed_inputs={"meta": META, "temperature": bad})


def test_cli_feed_from_numbers_and_npy(exported, tmp_path, capsys):
    from onnxsal.cli import main

    _, path = exported
    np.save(tmp_path / "meta.npy", META)
    np.save(tmp_path / "image.npy", np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32))
    code = main(["explain", path, str(tmp_path / "image.npy"), "-m", "gradcam", "--feed", f"meta={tmp_path / 'meta.npy'}",
                 "--feed", "temperature=1.5", "--out", str(tmp_path / "out"), "-q"])
    assert code == 0 and (tmp_path / "out" / "image.gradcam.npy").exists()
    code = main(["export", path, "-m", "saliency", "-o", str(tmp_path / "x.onnx"), "--feed", "meta=0.5,-1,2,0.25",
                 "--feed", "temperature=1.5"])
    assert code == 0
    assert [i.name for i in onnx.load(tmp_path / "x.onnx").graph.input] == ["image", "target"]
    assert main(["inspect", path, "--feed", "meta=1,2", "--feed", "temperature=1"]) == 2
    assert "the input is [?, 4]" in capsys.readouterr().err


class TwoHeads(nn.Module):
    """A multi-task network: an age regression first, then gender logits behind a softmax."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.age = nn.Linear(8, 1)
        self.gender = nn.Linear(8, 2)

    def forward(self, image):
        f = torch.relu(self.conv(image)).mean((2, 3))
        return self.age(f), torch.softmax(self.gender(f), 1)


def test_head_picks_the_output_to_score(tmp_path):
    from onnxsal.cli import main

    net = TwoHeads().eval()
    path = str(tmp_path / "heads.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, input_names=["image"], output_names=["age", "gender"],
                          opset_version=17, dynamo=False, dynamic_axes={"image": {0: "N"}})
    assert load(path).output == "age"
    m = load(path, head="gender")
    assert m.output == "gender" and m.activation == "softmax" and m.num_classes == 2
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    cot = np.random.default_rng(1).standard_normal((2, 2)).astype(np.float32)
    out = run(vjp(m.proto, m.logits, ["image"]), {"image": x, f"grad_{m.logits}": cot})
    xt = torch.tensor(x, requires_grad=True)
    f = torch.relu(net.conv(xt)).mean((2, 3))
    (net.gender(f) * torch.tensor(cot)).sum().backward()       # the logits before the softmax
    np.testing.assert_allclose(out["grad_image"], xt.grad.numpy(), rtol=1e-4, atol=1e-7)
    with pytest.raises(ModelError, match="no output 'sex'; its outputs: age, gender"):
        load(path, head="sex")
    np.save(tmp_path / "x.npy", x[:1])
    assert main(["explain", path, str(tmp_path / "x.npy"), "--head", "gender", "-m", "gradcam", "--target", "1",
                 "--out", str(tmp_path / "out"), "-q"]) == 0


class BranchedHeads(nn.Module):
    """Each head with a conv branch of its own: the last conv in the file feeds the second head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.age_conv, self.gender_conv = (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2))
        self.age, self.gender = nn.Linear(8, 1), nn.Linear(8, 2)

    def forward(self, image):
        h = torch.relu(self.stem(image))
        return self.age(self.age_conv(h).mean((2, 3))), self.gender(self.gender_conv(h).mean((2, 3)))


def test_the_default_cam_layer_feeds_the_scored_head(tmp_path):
    """Grad-CAM on each head, by default at the last conv layer that head is computed from: the
    last conv of the file belongs to the other head, whose map the scored head has no gradient on."""
    from test_gradient_methods import ref_cams

    net = BranchedHeads().eval()
    path = str(tmp_path / "branched.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), path, input_names=["image"], output_names=["age", "gender"],
                          opset_version=17, dynamo=False, dynamic_axes={"image": {0: "N"}})
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for head, conv, target in ((None, net.age_conv, 1), ("gender", net.gender_conv, 0)):
        ex = Explainer(path, "cpu", preprocess="raw", **({"head": head} if head else {}))
        assert ex.model.default_layer.tensor.startswith(f"/{'gender' if head else 'age'}_conv/")
        with kept(conv) as store:
            outs = net(torch.tensor(x))
        score = outs[1][0, target] if head else outs[0][0, 0] * (1 if target == 1 else -1)
        score.backward()
        expected = ref_cams(store["a"].detach().numpy()[0], store["a"].grad.numpy()[0])["gradcam"]
        got = ex.explain(x, "gradcam", target).raw[0]
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-5 * expected.max() + 1e-12)
