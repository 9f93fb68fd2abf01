"""How alike two images are to an embedding model: the cosine similarity of their outputs,
pytorch-grad-cam's ``SimilarityToConceptTarget``, added to the graph as a score of its own.

Maps are checked against torch.autograd of ``torch.nn.functional.cosine_similarity`` of the two
embeddings, and against the CAM formulas on PyTorch's activations and gradients, on two networks.
"""

import copy
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import TargetError

from hooks import kept, varied_batch_norm
from test_gradient_methods import assert_cams

DIM = 16


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, DIM))

    def forward(self, x):
        return self.head(self.body(x))


class Residual(nn.Module):
    """A BatchNorm residual block, and an embedding the exporter leaves (N, DIM, 1, 1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.body = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, DIM, 1))

    def forward(self, x):
        h = self.stem(x)
        return self.head(self.body(h + self.block(h)))


NETS = {"plain": Plain, "residual": Residual}


def exported(kind: str, folder) -> tuple[nn.Module, str]:
    torch.manual_seed(6)
    net = NETS[kind]().eval()
    varied_batch_norm(net)
    path = str(folder / "embed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.randn(1, 3, 16, 16), path, input_names=["image"], output_names=["embedding"],
                          opset_version=13, dynamo=False, dynamic_axes={"image": {0: "n"}})
    return net, path


@pytest.fixture(scope="module", params=list(NETS))
def embedder(request, tmp_path_factory):
    net, path = exported(request.param, tmp_path_factory.mktemp(request.param))
    rng = np.random.default_rng(6)
    x, ref = rng.standard_normal((2, 2, 3, 16, 16)).astype(np.float32)
    return request.param, net, path, x, ref


def embed(net, ref) -> torch.Tensor:
    """``ref``'s embedding, a constant (as the reference is to onnxsal)."""
    with torch.no_grad():
        return net(torch.tensor(ref)).flatten(1)


def cosine(net, x, ref):
    """The similarity of ``x``'s embedding to ``ref``'s (an image, or its embedding)."""
    r = ref if isinstance(ref, torch.Tensor) else embed(net, ref)
    return torch.nn.functional.cosine_similarity(net(x).flatten(1), r)


def test_saliency_and_cams_match_torch_autograd_of_the_cosine_similarity(embedder):
    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw").like(ref[:1])
    layer = net.body[-1] if kind == "plain" else net.body
    xt, r = torch.tensor(x[:1], requires_grad=True), embed(net, ref[:1])
    with kept(layer) as store:
        c = cosine(net, xt, r)
    c.sum().backward()
    g = xt.grad.numpy()[0]
    res = ex.explain(x[:1], "saliency")
    assert res.targets[0].label == "similarity" and res.targets[0].index == 1
    np.testing.assert_allclose(res.raw[0], np.abs(g).max(axis=0), rtol=1e-4, atol=1e-6 * np.abs(g).max())
    np.testing.assert_allclose(res.top(1)[0]["score"], float(c.detach()), rtol=1e-5)
    assert_cams(ex, x[:1], "similarity", store["a"].detach().numpy()[0], store["a"].grad.numpy()[0], kind)
    assert ex.model.default_layer.tensor == next(n.output[0] for n in reversed(onnx.load(path).graph.node)
                                                 if n.op_type == "Relu")


def test_a_reference_vector_gives_the_reference_image_s_maps(embedder):
    kind, net, path, x, ref = embedder
    base = onnxsal.Explainer(path, "cpu", preprocess="raw")
    vector = base.predict(ref[:1])
    a = base.like(ref[:1]).explain(x[:1], "gradcam")
    b = base.like(vector).explain(x[:1], "gradcam")
    np.testing.assert_allclose(a.raw, b.raw, rtol=1e-5, atol=1e-7)
    row = base.like(vector[None]).explain(x[:1], "gradcam")          # (1, D), as predict's batch of one
    np.testing.assert_allclose(row.raw, b.raw, rtol=1e-5, atol=1e-7)
    assert b.notes[-1] == "scored the cosine similarity of output 'embedding' to the reference vector"


def test_integrated_gradients_are_complete_on_the_similarity(embedder):
    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw").like(ref[:1])
    with torch.no_grad():
        change = float(cosine(net, torch.tensor(x[:1]), ref[:1]) - cosine(net, torch.zeros(1, 3, 16, 16), ref[:1]))
    res = ex.explain(x[:1], "ig", "similarity", steps=512)
    assert abs(res.info["completeness_gap"][0]) < 2e-3 * abs(change) + 1e-6, (res.info["completeness_gap"], change)


def test_each_image_of_a_batch_scores_its_own_similarity_and_export_agrees(embedder):
    import onnxruntime as ort

    from onnxsal.export import export

    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw").like(ref[:1])
    results = ex.explain_batch(x, "saliency", targets="similarity")
    sess = ort.InferenceSession(export(ex.model, "saliency").SerializeToString())
    scores, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([1, 1], np.int64)})
    for k in range(2):
        xt = torch.tensor(x[k:k + 1], requires_grad=True)
        cosine(net, xt, ref[:1]).sum().backward()
        g = np.abs(xt.grad.numpy()[0]).max(axis=0)
        np.testing.assert_allclose(results[k].raw[0], g, rtol=1e-4, atol=1e-6 * g.max())
        np.testing.assert_allclose(maps[k], results[k].map, atol=1e-5)
        np.testing.assert_allclose(scores[k, 0], float(cosine(net, torch.tensor(x[k:k + 1]), ref[:1]).detach()), rtol=1e-5)


def test_bad_references_are_refused(embedder):
    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    with pytest.raises(TargetError, match="holds 5 values; the model's output per image holds 16"):
        ex.like(np.ones(5, np.float32))
    with pytest.raises(TargetError, match="finite and not all zero"):
        ex.like(np.zeros(DIM, np.float32))


def test_cli_explains_how_alike_two_images_are(embedder, tmp_path, capsys):
    from PIL import Image

    kind, net, path, x, ref = embedder
    rng = np.random.default_rng(1)
    for name in ("probe", "ref"):
        Image.fromarray(rng.uniform(0, 255, (16, 16, 3)).astype(np.uint8)).save(tmp_path / f"{name}.png")
    assert main(["explain", path, str(tmp_path / "probe.png"), "--like", str(tmp_path / "ref.png"),
                 "--preprocess", "unit", "-o", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "probe.json").read_text())
    x, r = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.float32).transpose(2, 0, 1)[None] / 255
            for n in ("probe", "ref"))
    with torch.no_grad():
        want = float(cosine(net, torch.tensor(x), r))
    assert summary["top"][0]["label"] == "similarity"
    np.testing.assert_allclose(summary["top"][0]["score"], want, rtol=1e-4)
    assert "scored the cosine similarity of output 'embedding' to ref.png's output" in summary["notes"]
    assert summary["model"] == str(path)              # the file explained, not the derived graph
    assert main(["explain", path, str(tmp_path / "probe.png"), "--preprocess", "unit", "-m", "saliency",
                 "-o", str(tmp_path / "out"), "-q"]) == 0
    plain = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert list(plain["methods"]) == ["saliency"]     # scored otherwise: the similarity run's maps are not kept
    assert main(["explain", path, str(tmp_path / "probe.png"), "--preprocess", "unit", "-m", "gradcam",
                 "-o", str(tmp_path / "out"), "-q"]) == 0
    assert sorted(json.loads((tmp_path / "out" / "probe.json").read_text())["methods"]) == ["gradcam", "saliency"]
    np.save(tmp_path / "short.npy", np.ones(3, np.float32))
    assert main(["explain", path, str(tmp_path / "probe.png"), "--like", str(tmp_path / "short.npy"),
                 "--preprocess", "unit", "-o", str(tmp_path / "out")]) == 2
    assert "holds 3 values" in capsys.readouterr().err


def test_deletion_and_insertion_read_the_similarity_itself(embedder):
    from onnxsal.evaluate.faithfulness import probabilities

    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw").like(ref[:1])
    with torch.no_grad():
        c = cosine(net, torch.tensor(x), ref[:1]).numpy()
    np.testing.assert_allclose(probabilities(ex, x, 1), c, rtol=1e-5)
    np.testing.assert_allclose(probabilities(ex, x, 0), -c, rtol=1e-5)


def test_evaluate_reads_the_similarity_and_its_maps(embedder):
    from onnxsal.evaluate.faithfulness import evaluate

    kind, net, path, x, ref = embedder
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw").like(ref[:1])
    rep = evaluate(ex, [x[:1]], ["saliency"], step=64)
    with torch.no_grad():
        c = float(cosine(net, torch.tensor(x[:1]), ref[:1]))
    r = rep.results[0]
    assert r.target == (1 if c > 0 else 0) and rep.settings["score"] == "the target's score as the model gives it"
    assert r.curves.deletion[0] == pytest.approx(c if c > 0 else -c, rel=1e-5)    # nothing deleted yet


@pytest.mark.parametrize("reference", ["image", "vector"])
def test_sanity_randomises_the_model_not_the_reference_vector(reference, tmp_path):
    """Each randomised model scores the similarity of its own embeddings: of the image and, for a
    reference image, of the reference too; a reference vector stays as given, like a fixed class.
    Checked against torch.autograd on the same randomised weights."""
    from onnxsal.evaluate.randomize import cascade, randomize, weight_layers
    from onnxsal.evaluate.sanity import sanity_check
    from onnxsal.graph.weights import array as weight_array
    from onnxsal.postprocess import normalize

    net, path = exported("plain", tmp_path)       # initializers named as the module's parameters
    rng = np.random.default_rng(2)
    x, ref = rng.standard_normal((2, 1, 3, 16, 16)).astype(np.float32)
    base = onnxsal.Explainer(path, "cpu", preprocess="raw")
    like = ref if reference == "image" else base.predict(ref)
    san = sanity_check(base, [x], ["saliency"], modes=("cascading",), max_steps=2, target="similarity", like=like)
    layers = weight_layers(base.model.light)
    for k, group in enumerate([[]] + cascade(layers, 2)):
        twin = copy.deepcopy(net)
        if group:
            drawn = randomize(base.model.light, group, 0, all_layers=layers)
            state = {i.name: torch.tensor(weight_array(i)) for i in drawn.graph.initializer}
            twin.load_state_dict({name: state[name] for name in twin.state_dict()})
        xt = torch.tensor(x, requires_grad=True)
        r = embed(twin if reference == "image" else net, ref)
        cosine(twin, xt, r).sum().backward()
        want = normalize(np.abs(xt.grad.numpy()[0]).max(axis=0)[None])[0]
        got = san.original["saliency"][0] if k == 0 else san.maps[("saliency", k - 1)][0]
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"step {k}")
        assert k == 0 or np.abs(got - san.original["saliency"][0]).max() > 0.05       # the weights did change
    assert san.model == path


def test_cli_evaluate_sanity_and_export_take_a_reference(embedder, tmp_path, capsys):
    import onnxruntime as ort
    from PIL import Image

    kind, net, path, x, ref = embedder
    rng = np.random.default_rng(1)
    for name in ("probe", "ref"):
        Image.fromarray(rng.uniform(0, 255, (16, 16, 3)).astype(np.uint8)).save(tmp_path / f"{name}.png")
    probe, like = str(tmp_path / "probe.png"), ["--like", str(tmp_path / "ref.png"), "--preprocess", "unit", "-q"]
    assert main(["evaluate", path, probe, "--step", "64", "-o", str(tmp_path / "e")] + like) == 0
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    x, r = (np.asarray(Image.open(tmp_path / f"{n}.png"), np.float32).transpose(2, 0, 1)[None] / 255
            for n in ("probe", "ref"))
    with torch.no_grad():
        c = float(cosine(net, torch.tensor(x), r))
    assert report["methods"]["gradcam"]["curves"]["deletion"][0] == pytest.approx(abs(c), rel=1e-4)
    assert main(["sanity", path, probe, "-m", "saliency", "--max-steps", "2", "--mode", "cascading",
                 "-o", str(tmp_path / "s")] + like) == 0
    assert json.loads((tmp_path / "s" / "sanity.json").read_text())["targets"]["probe"] in ("similarity",
                                                                                           "dissimilarity")
    out = str(tmp_path / "like.explain.onnx")
    assert main(["export", path, "-m", "saliency", "-o", out] + like[:4]) == 0
    sess = ort.InferenceSession(out)
    scores, _ = sess.run(["logits", "map"], {"image": x, "target": np.array([1], np.int64)})
    assert scores[0, 0] == pytest.approx(c, rel=1e-4)
    capsys.readouterr()
    np.save(tmp_path / "short.npy", np.ones(3, np.float32))
    assert main(["evaluate", path, probe, "-o", str(tmp_path / "e"), "--like", str(tmp_path / "short.npy"),
                 "--preprocess", "unit"]) == 2
    assert "holds 3 values" in capsys.readouterr().err


def test_the_exported_graph_can_take_the_reference_as_an_input(embedder):
    """One exported graph for any reference fed at run time: its maps and scores are those of the
    explainer holding each reference, for a reference image's output and for an arbitrary vector."""
    import onnxruntime as ort

    from onnxsal.errors import MethodError
    from onnxsal.export import export

    kind, net, path, x, ref = embedder
    base = onnxsal.Explainer(path, "cpu", preprocess="raw")
    held = base.like(np.ones(DIM, np.float32))
    references = [base.predict(ref[:1]), np.random.default_rng(7).standard_normal(DIM).astype(np.float32) * 3]
    for method in ("saliency", "gradcam", "ig"):
        graph = export(held.model, method, reference_input=True, steps=16)
        assert [i.name for i in graph.graph.input] == ["image", "target", "reference"]
        sess = ort.InferenceSession(graph.SerializeToString())
        got = []
        for r in references:
            scores, maps = sess.run(["logits", "map"], {"image": x, "target": np.array([1, 0], np.int64),
                                                        "reference": r[None]})
            with torch.no_grad():
                want = torch.nn.functional.cosine_similarity(net(torch.tensor(x)).flatten(1), torch.tensor(r[None]))
            np.testing.assert_allclose(scores[:, 0], want.numpy(), rtol=1e-5, err_msg=method)
            fixed = ort.InferenceSession(export(base.like(r).model, method, steps=16).SerializeToString())
            np.testing.assert_allclose(maps, fixed.run(["map"], {"image": x, "target": np.array([1, 0], np.int64)})[0],
                                       atol=1e-5, err_msg=method)
            got.append(maps)
        assert np.abs(got[0] - got[1]).max() > 1e-2          # the reference fed does change the maps
    want = base.like(references[1]).explain(x[:1], "saliency", "similarity").map
    sess = ort.InferenceSession(export(held.model, "saliency", reference_input=True).SerializeToString())
    np.testing.assert_allclose(sess.run(["map"], {"image": x[:1], "target": np.array([1], np.int64),
                                                  "reference": references[1][None]})[0][0], want, atol=1e-5)
    with pytest.raises(MethodError, match="a reference input needs a model that scores a similarity"):
        export(path, "saliency", reference_input=True)
    with pytest.raises(TargetError, match="already scores a similarity"):
        held.like(np.ones(1, np.float32))


def test_cli_export_like_input(embedder, tmp_path, capsys):
    import onnxruntime as ort

    kind, net, path, x, ref = embedder
    out = str(tmp_path / "any.explain.onnx")
    assert main(["export", path, "-m", "gradcam", "--like", "input", "-o", out]) == 0
    assert f"+ reference (1 or N, {DIM})" in capsys.readouterr().out
    sess = ort.InferenceSession(out)
    r = np.random.default_rng(3).standard_normal((1, DIM)).astype(np.float32)
    scores, _ = sess.run(["logits", "map"], {"image": x, "target": np.array([1, 1], np.int64), "reference": r})
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(net(torch.tensor(x)).flatten(1), torch.tensor(r))
    np.testing.assert_allclose(scores[:, 0], want.numpy(), rtol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "gradcam", "ig", "layerig", "fullgrad", "shapleycam"])
def test_each_image_can_bring_its_own_reference(embedder, method):
    """A (N, D) reference input pairs each image with its own reference, in the methods that run
    one row per image and in those that stack copies (IG's path points, LayerIG's): each image's
    map and score are those of the graph holding its reference, run on it alone."""
    import onnxruntime as ort

    from onnxsal.export import export

    kind, net, path, x, ref = embedder
    base = onnxsal.Explainer(path, "cpu", preprocess="raw")
    refs = np.stack([base.predict(ref[:1]), np.random.default_rng(9).standard_normal(DIM).astype(np.float32)])
    graph = export(base.like(np.ones(DIM, np.float32)).model, method, reference_input=True, steps=8)
    sess = ort.InferenceSession(graph.SerializeToString())
    targets = np.array([1, 0], np.int64)
    scores, maps = sess.run(["logits", "map"], {"image": x, "target": targets, "reference": refs})
    for k in range(2):
        alone = ort.InferenceSession(export(base.like(refs[k]).model, method, steps=8).SerializeToString())
        s1, m1 = alone.run(["logits", "map"], {"image": x[k:k + 1], "target": targets[k:k + 1]})
        np.testing.assert_allclose(scores[k], s1[0], rtol=1e-5, err_msg=f"{method} image {k}")
        np.testing.assert_allclose(maps[k], m1[0], atol=1e-5, err_msg=f"{method} image {k}")
    with torch.no_grad():
        want = torch.nn.functional.cosine_similarity(net(torch.tensor(x)).flatten(1), torch.tensor(refs))
    np.testing.assert_allclose(scores[:, 0], want.numpy(), rtol=1e-5)
    with pytest.raises(Exception, match=f"Name:'reference_must_be_1_or_N_rows_of_{DIM}'"):   # 3 for 2 images
        sess.run(["logits", "map"], {"image": x, "target": targets, "reference": np.concatenate([refs, refs[:1]])})
    with pytest.raises(Exception, match=f"(?s)input: reference .*Got: {DIM - 1} Expected: {DIM}"):   # its own check
        sess.run(["logits", "map"], {"image": x, "target": targets, "reference": refs[:, :-1]})
