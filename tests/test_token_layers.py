"""CAMs on a transformer's tokens: the patch grid is recovered from the shapes (class token
dropped), and each CAM equals its formula on PyTorch's activations and gradients laid out the
same way (pytorch-grad-cam's ViT ``reshape_transform``)."""

import numpy as np
import onnx
import pytest
import torch

import onnxsal
from onnxsal.errors import LayerError
from onnxsal.export import export as export_graph
from onnxsal.model import load, token_grid

from test_gradient_methods import ref_cams


def torch_tokens(net, x, target):
    """ln1's output and its gradient, as (C, h, w) maps: class token dropped, 4x4 grid."""
    store = {}

    def hook(_, __, out):
        out.retain_grad()
        store["a"] = out

    h = net.ln1.register_forward_hook(hook)
    net(torch.tensor(x))[0, target].backward()
    h.remove()
    grid = lambda t: t[0, 1:].reshape(4, 4, -1).permute(2, 0, 1).detach().numpy()  # noqa: E731
    return grid(store["a"]), grid(store["a"].grad)


def test_token_grid_shapes():
    assert token_grid((None, 197, 768), (224, 224)) == (1, 14, 14)      # ViT-B/16
    assert token_grid((None, 198, 384), (224, 224)) == (2, 14, 14)      # DeiT, distilled
    assert token_grid((None, 196, 768), (224, 224)) == (0, 14, 14)      # no class token
    assert token_grid((None, 281, 64), (224, 320)) == (1, 14, 20)       # the input's aspect ratio
    assert token_grid((None, 12, 64), (224, 224)) is None               # 12, 11, 10: no square grid
    assert token_grid((None, 17, 32, 1), (32, 32)) is None


def test_cams_on_vit_tokens_match_numpy_formulas(vit):
    net, model, ln1 = vit
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for target in (0, 7):
        a, g = torch_tokens(net, x, target)
        for name, expected in ref_cams(a, g).items():
            res = ex.explain(x, name, target=target, layer=ln1.output[0])
            assert res.raw.shape == (1, 4, 4), name
            scale = max(np.abs(expected).max(), 1e-6)
            np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * scale, rtol=1e-3, err_msg=name)
    res = ex.explain(x, "scorecam", layer=ln1.name, top_k=2)          # by node name; masked passes
    assert res.maps.shape == (2, 32, 32) and np.isfinite(res.maps).all()


def test_token_layers_are_listed_and_refused_where_unsupported(vit):
    _, model, ln1 = vit
    m = load(model)
    tokens = m.token_layers()
    assert tokens[0].tensor == ln1.output[0] and tokens[0].prefix == 1 and tokens[0].shape == (32, 4, 4)
    with pytest.raises(LayerError, match="neither a 4-D activation nor"):
        m.find_layer(m.logits)


def exported_maps(model, method: str, layer: str, x: np.ndarray, targets) -> tuple:
    import onnxruntime as ort

    sess = ort.InferenceSession(export_graph(model, method, layer).SerializeToString())
    image = sess.get_inputs()[0].name
    return sess.run(None, {image: x, "target": np.asarray(targets, np.int64)})


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam", "shapleycam"])
def test_exported_cams_on_transformer_tokens(vit, method):
    """The standalone graph lays the tokens out as the patch grid (class token dropped) in-graph."""
    _, model, ln1 = vit
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.random.default_rng(5).standard_normal((2, 3, 32, 32)).astype(np.float32)
    _, maps = exported_maps(model, method, ln1.output[0], x, [1, 6])
    for i, t in enumerate((1, 6)):
        res = ex.explain(x[i:i + 1], method, target=t, layer=ln1.output[0])
        np.testing.assert_allclose(maps[i], res.map, atol=1e-5)


def test_default_layer_on_a_transformer_notes_the_token_layers(vit):
    _, model, ln1 = vit
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    x = np.zeros((1, 3, 32, 32), np.float32)
    res = ex.explain(x, "gradcam")
    assert any(ln1.output[0] in n and "--layer" in n for n in res.notes)
    assert not any("--layer" in n for n in ex.explain(x, "gradcam", layer=ln1.output[0]).notes)


class ChannelsLast(torch.nn.Module):
    """Swin's layout: patch features kept (N, h, w, C) through norm and MLP, transposed to NCHW only
    for the global pool -- the map pytorch-grad-cam reads with a ``reshape_transform``."""

    def __init__(self, d=16, pool="gap"):
        super().__init__()
        self.pool = pool
        self.patch = torch.nn.Conv2d(3, d, 4, 4)
        self.norm = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        self.head = torch.nn.Linear(d, 5)

    def forward(self, x):
        t = self.patch(x).permute(0, 2, 3, 1)
        t = self.norm(t + self.mlp(t))
        maps = t.permute(0, 3, 1, 2)
        if self.pool == "mean":                     # exported as ReduceMean over axes 2, 3
            return self.head(maps.mean(dim=(2, 3)))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(maps, 1).flatten(1))


@pytest.mark.parametrize("pool", ["gap", "mean"])
def test_channels_last_maps_default_and_by_name(tmp_path, pool):
    """The transposed map before the pool (GlobalAveragePool, or a ReduceMean over the spatial axes)
    is the default layer, and an (N, h, w, C) map given by name is read channels-last: every CAM
    equals its formula on PyTorch's tensors permuted to (C, h, w)."""
    torch.manual_seed(0)
    net = ChannelsLast(pool=pool).eval()
    path = tmp_path / "cl.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 24),), str(path), input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False, dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    m = load(str(path))
    default = m.default_layer
    assert default.op_type == "Transpose" and default.shape == (16, 8, 6) and not default.tokens
    norm = next(n for n in m.light.graph.node if n.op_type == "LayerNormalization")
    by_name = m.find_layer(norm.output[0])
    assert by_name.prefix == 0 and by_name.shape == (16, 8, 6)

    store = {}

    def hook(_, __, out):
        out.retain_grad()
        store["a"] = out

    h = net.norm.register_forward_hook(hook)
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 24)).astype(np.float32)
    target = 2
    net(torch.tensor(x))[0, target].backward()
    h.remove()
    a = store["a"][0].permute(2, 0, 1).detach().numpy()
    g = store["a"].grad[0].permute(2, 0, 1).numpy()
    ex = onnxsal.Explainer(str(path), "cpu", preprocess="raw")
    _, maps = exported_maps(str(path), "gradcam", norm.output[0], x, [target])   # channels-last, in-graph
    np.testing.assert_allclose(maps[0], ex.explain(x, "gradcam", target=target, layer=norm.output[0]).map, atol=1e-5)
    for layer in (None, norm.output[0]):              # both read the same values
        for name, expected in ref_cams(a, g).items():
            res = ex.explain(x, name, target=target, layer=layer)
            assert res.raw.shape == (1, 8, 6), name
            scale = max(np.abs(expected).max(), 1e-6)
            np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * scale, rtol=1e-3, err_msg=f"{name} {layer}")


class ViTInterpolated(torch.nn.Module):
    """A ViT that resizes its position embeddings to the patch grid of each input (HF's
    ``interpolate_pos_encoding``): exported with a dynamic height and width, the token count comes
    from sizes computed from ``Shape``, which ONNX shape inference does not follow."""

    def __init__(self, d=32):
        super().__init__()
        from test_autodiff_models import Attention

        self.patch = torch.nn.Conv2d(3, d, 8, 8)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = torch.nn.Parameter(torch.randn(1, 1 + 4 * 4, d) * 0.1)
        self.ln1 = torch.nn.LayerNorm(d)
        self.attn = Attention(d, 4)
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, 10)

    def forward(self, x):
        p = self.patch(x)
        grid = self.pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, size=(x.shape[2] // 8, x.shape[3] // 8), mode="bilinear")
        pos = torch.cat([self.pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        t = p.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + pos
        t = t + self.attn(self.ln1(t))
        return self.head(self.ln(t)[:, 0])


def test_token_layers_of_a_dynamic_size_transformer(tmp_path):
    """The token counts that inference loses are read off one run at the size given: the token
    layers are listed (before, none was) and every CAM there equals its formula on PyTorch's tensors."""
    torch.manual_seed(0)
    net = ViTInterpolated().eval()
    path = str(tmp_path / "vit_hw.onnx")
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), path, input_names=["input"], output_names=["logits"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}, "logits": {0: "N"}})
    ln1 = next(n for n in onnx.load(path).graph.node if n.op_type == "LayerNormalization")
    for size in ((32, 32), (48, 32)):
        h, w = size[0] // 8, size[1] // 8
        tokens = load(path, size=size).token_layers()
        assert [t.tensor for t in tokens] == [ln1.output[0], tokens[1].tensor] and len(tokens) == 2
        assert tokens[0].prefix == 1 and tokens[0].shape == (32, h, w)
        ex = onnxsal.Explainer(path, "cpu", size=size, preprocess="raw")
        assert any(ln1.output[0] in n for n in ex.explain(np.zeros((1, 3) + size, np.float32), "gradcam").notes)
        x = np.random.default_rng(6).standard_normal((1, 3) + size).astype(np.float32)
        store = {}

        def hook(_, __, out):
            out.retain_grad()
            store["a"] = out

        handle = net.ln1.register_forward_hook(hook)
        net(torch.tensor(x))[0, 4].backward()
        handle.remove()
        grid = lambda t: t[0, 1:].reshape(h, w, -1).permute(2, 0, 1).detach().numpy()  # noqa: E731
        for name, expected in ref_cams(grid(store["a"]), grid(store["a"].grad)).items():
            res = ex.explain(x, name, target=4, layer=ln1.output[0])
            assert res.raw.shape == (1, h, w), name
            scale = max(np.abs(expected).max(), 1e-6)
            np.testing.assert_allclose(res.raw[0], expected, atol=1e-4 * scale, rtol=1e-3, err_msg=f"{name} {size}")
