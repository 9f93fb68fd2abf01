"""Opset-23 ops that the ONNX spec defines by function bodies (Attention, RMSNormalization):
differentiated through those bodies, against central differences and against torch.autograd."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from gradcheck import assert_matches_torch, check_vjp, one_node_model, run
from onnxsal import Explainer
from onnxsal.graph.autodiff import vjp
from onnxsal.graph.functions import function_ops, inline
from onnxsal.model import load

R = np.random.default_rng(11)


def rnd(*shape):
    return R.standard_normal(shape)


@pytest.mark.parametrize("inputs,attrs", [
    ({"q": rnd(2, 3, 4, 5), "k": rnd(2, 3, 6, 5), "v": rnd(2, 3, 6, 7)}, {}),
    ({"q": rnd(1, 2, 4, 5), "k": rnd(1, 2, 4, 5), "v": rnd(1, 2, 4, 5)}, {"is_causal": 1, "scale": 0.3}),
    ({"q": rnd(2, 4, 3, 5), "k": rnd(2, 2, 6, 5), "v": rnd(2, 2, 6, 5)}, {"softcap": 2.5}),          # grouped heads
    ({"q": rnd(2, 4, 12), "k": rnd(2, 5, 12), "v": rnd(2, 5, 9)}, {"q_num_heads": 3, "kv_num_heads": 3}),
    ({"q": rnd(1, 2, 4, 5), "k": rnd(1, 2, 6, 5), "v": rnd(1, 2, 6, 5), "mask": rnd(4, 6)}, {}),
])
def test_attention_against_finite_differences(inputs, attrs):
    m = one_node_model("Attention", inputs, attrs, opset=23)
    out = check_vjp(m, "y", list(inputs), inputs)
    assert all(np.abs(out[f"grad_{k}"]).max() > 0 for k in inputs)


def test_attention_with_a_boolean_mask():
    q, k, v = rnd(1, 2, 3, 4), rnd(1, 2, 5, 4), rnd(1, 2, 5, 4)
    mask = R.random((3, 5)) > 0.3
    mask[:, 0] = True
    m = one_node_model("Attention", {"q": q, "k": k, "v": v}, {}, initializers={"mask": mask}, opset=23)
    out = check_vjp(m, "y", ["q", "k", "v"], {"q": q, "k": k, "v": v})
    # masked keys get no attention, so their values get no gradient
    assert not out["grad_v"][:, :, ~mask.any(axis=0)].any()


@pytest.mark.parametrize("shape,attrs", [((2, 3, 5), {}), ((2, 4, 3, 3), {"axis": 1, "epsilon": 1e-3})])
def test_rms_normalization_against_finite_differences(shape, attrs):
    axis = attrs.get("axis", -1)
    x, scale = rnd(*shape), rnd(*shape[axis:])
    m = one_node_model("RMSNormalization", {"x": x, "scale": scale}, attrs, opset=23)
    check_vjp(m, "y", ["x", "scale"], {"x": x, "scale": scale})


def test_ops_with_rules_keep_them():
    m = one_node_model("LayerNormalization", {"x": rnd(2, 3)}, {}, initializers={"s": rnd(3)}, opset=23)
    ruled = {"LayerNormalization"}
    assert function_ops(m, ruled) == [] and inline(m, ruled) is m
    assert function_ops(m, set()) == ["LayerNormalization"]


def _transformer(path) -> tuple[str, dict]:
    """Patch embedding, then an RMSNorm'd self-attention block in the opset-23 ops, then a mean-pooled
    head: what torch.onnx writes for such a model at opset 23."""
    rng = np.random.default_rng(0)
    w = {"patch": rng.standard_normal((16, 3, 4, 4)).astype(np.float32) * 0.2,
         "norm": rng.uniform(0.5, 1.5, 16).astype(np.float32),
         "qkv": rng.standard_normal((16, 48)).astype(np.float32) * 0.3,
         "head": rng.standard_normal((16, 5)).astype(np.float32) * 0.3}
    c = {"tok_shape": np.array([0, 16, -1], np.int64), "one": np.array([1], np.int64), "split": np.array([16] * 3, np.int64)}
    nodes = [helper.make_node("Conv", ["x", "patch"], ["emb"], strides=[4, 4], name="patch_embed"),
             helper.make_node("Reshape", ["emb", "tok_shape"], ["emb_flat"]),
             helper.make_node("Transpose", ["emb_flat"], ["tokens"], perm=[0, 2, 1]),
             helper.make_node("RMSNormalization", ["tokens", "norm"], ["normed"], epsilon=1e-5, name="rms"),
             helper.make_node("MatMul", ["normed", "qkv"], ["qkv_out"]),
             helper.make_node("Split", ["qkv_out", "split"], ["q", "k", "v"], axis=2),
             helper.make_node("Attention", ["q", "k", "v"], ["attended"], q_num_heads=4, kv_num_heads=4, name="attn"),
             helper.make_node("Add", ["tokens", "attended"], ["block"]),
             helper.make_node("ReduceMean", ["block", "one"], ["pooled"], keepdims=0),
             helper.make_node("MatMul", ["pooled", "head"], ["logits"])]
    inits = [numpy_helper.from_array(v, k) for k, v in {**w, **c}.items()]
    g = helper.make_graph(nodes, "vit", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path), w


def _torch_transformer(x: torch.Tensor, w: dict) -> torch.Tensor:
    t = {k: torch.tensor(v) for k, v in w.items()}
    tokens = F.conv2d(x, t["patch"], stride=4).flatten(2).transpose(1, 2)
    normed = tokens / torch.sqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-5) * t["norm"]
    q, k, v = (p.reshape(x.shape[0], -1, 4, 4).transpose(1, 2) for p in (normed @ t["qkv"]).split(16, dim=2))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], -1, 16)
    return (tokens + attended).mean(1) @ t["head"]


def test_opset_23_transformer_against_torch_autograd(tmp_path):
    path, w = _transformer(tmp_path / "vit.onnx")
    m = load(path)
    vm = vjp(m.proto, m.logits, ["x", "tokens"])
    assert not {"Attention", "RMSNormalization"} & {n.op_type for n in vm.graph.node}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    cot = rng.standard_normal((3, 5)).astype(np.float32)
    out = run(vm, {"x": x, "grad_logits": cot})
    assert_matches_torch(out, "logits", "grad_x", lambda t: _torch_transformer(t, w), x, cot)
    from typer.testing import CliRunner

    from onnxsal.cli import app

    res = CliRunner().invoke(app, ["inspect", path])
    assert "functions Attention, RMSNormalization differentiated through their ONNX function bodies" in res.output
    # the methods on top, with the token layer as a CAM layer
    ex = Explainer(m, preprocess="unit")
    for method, kw in (("ig", {}), ("gradcam", {"layer": "tokens"})):
        assert np.ptp(ex.explain(x[:1], method=method, **kw).map) > 0


@pytest.mark.parametrize("op,inputs,attrs,opset", [
    ("Swish", {"x": rnd(3, 4)}, {}, 24),                         # alpha left at the schema's default
    ("Swish", {"x": rnd(3, 4)}, {"alpha": 0.7}, 24),
    ("MeanVarianceNormalization", {"x": rnd(2, 3, 4, 5).astype(np.float32)}, {}, 17),  # axes left at [0, 2, 3]
    ("MeanVarianceNormalization", {"x": rnd(2, 3, 4).astype(np.float32)}, {"axes": [1]}, 17),
    ("ReduceLogSum", {"x": np.abs(rnd(3, 4)) + 0.5}, {"keepdims": 0}, 18),
])
def test_other_function_ops_against_finite_differences(op, inputs, attrs, opset):
    m = one_node_model(op, inputs, attrs, opset=opset)
    assert function_ops(m, set()) == [op]
    check_vjp(m, "y", list(inputs), inputs)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x))) + x


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.blocks, self.head = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Sequential(_Block(), _Block()), \
            torch.nn.Linear(8, 4)
        for b in self.blocks:
            b.norm.running_mean.uniform_(-0.2, 0.2)
            b.norm.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_models_own_functions_are_written_out(tmp_path):
    """torch.onnx's export_modules_as_functions writes each block as a function of the model's own;
    ONNX Runtime runs it, and onnxsal used to crash on it with a raw runtime error."""
    import warnings

    net, path = _Net().eval(), str(tmp_path / "blocks.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), path, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], export_modules_as_functions={_Block}, dynamic_axes={"x": {0: "N"}})
    assert len(onnx.load(path).functions) == 1
    m = load(path)
    assert not m.proto.functions and m.default_layer.tensor == "/blocks/blocks.1/_Block_output_0"
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    cot = rng.standard_normal((2, 4)).astype(np.float32)
    out = run(vjp(m.proto, m.logits, ["x"]), {"x": x, f"grad_{m.logits}": cot})
    assert_matches_torch(out, m.logits, "grad_x", net, x, cot)
    assert np.ptp(Explainer(m, preprocess="unit").explain(x[:1], method="gradcam").map) > 0
    from typer.testing import CliRunner

    from onnxsal.cli import app

    res = CliRunner().invoke(app, ["inspect", path])
    assert res.exit_code == 0 and "functions the model's own _Block written out" in res.output, res.output


def test_a_function_written_for_another_opset_is_converted():
    """A local function at opset 13 (ReduceMean's axes an attribute) in an opset-18 model (an input)."""
    body = helper.make_function("mine", "CentreRows", ["X"], ["Y"],
                                [helper.make_node("ReduceMean", ["X"], ["M"], axes=[-1]),
                                 helper.make_node("Sub", ["X", "M"], ["Y"])], [helper.make_opsetid("", 13)])
    g = helper.make_graph([helper.make_node("CentreRows", ["x"], ["c"], domain="mine"),
                           helper.make_node("Mul", ["c", "c"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])])
    model = helper.make_model(g, functions=[body], opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("mine", 1)])
    flat = inline(model)
    assert not flat.functions and [n.op_type for n in flat.graph.node] == ["Constant", "ReduceMean", "Sub", "Mul"]
    check_vjp(flat, "y", ["x"], {"x": rnd(2, 5).astype(np.float32)})


def test_rotary_embedding_against_finite_differences():
    x = rnd(2, 3, 4, 8).astype(np.float32)                           # (batch, heads, sequence, head size)
    angles = R.uniform(0, 3, (6, 4)).astype(np.float32)
    m = one_node_model("RotaryEmbedding", {"x": x}, {}, opset=23,
                       initializers={"cos": np.cos(angles), "sin": np.sin(angles), "pos": np.array([[0, 2, 3, 5]] * 2)})
    assert function_ops(m, set()) == ["RotaryEmbedding"]
    check_vjp(m, "y", ["x"], {"x": x})


def test_a_function_the_converter_cannot_lift_is_a_model_error():
    """A local function at opset 8 that uses ImageScaler (no schema after opset 9) in an opset-17 model."""
    from onnxsal.errors import ModelError

    body = helper.make_function("mine", "Scale", ["X"], ["Y"], [helper.make_node("ImageScaler", ["X"], ["Y"], scale=2.0)],
                                [helper.make_opsetid("", 8)])
    g = helper.make_graph([helper.make_node("Scale", ["x"], ["y"], domain="mine")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 2, 2])])
    model = helper.make_model(g, functions=[body], opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("mine", 1)])
    with pytest.raises(ModelError, match="cannot write out the model's function 'Scale' for the model's opset 17"):
        inline(model)
