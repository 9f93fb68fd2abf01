"""LSTM, GRU and RNN nodes, unrolled into per-step ops before differentiation.

Whole networks (a CRNN-style text recogniser, a batch-first GRU, Sequencer-style token
mixing) exported by torch.onnx are checked against torch.autograd; single nodes with the
attributes PyTorch never writes (peepholes, reverse direction, initial states, batch-first
layout, GRU's reset gate before the product) against finite differences of ONNX Runtime's own
fused kernel, which also pins the unrolled forward pass to the operator's definition.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_vjp, derived_grads, run
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp

torch = pytest.importorskip("torch")
nn = torch.nn

R = np.random.default_rng(11)
F32 = np.float32


class CRNN(nn.Module):
    """Convolutions down to one row, then a two-layer bidirectional LSTM over the columns."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d((32, 2)))
        self.rnn = nn.LSTM(8, 6, num_layers=2, bidirectional=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        f = self.conv(x).squeeze(2).permute(2, 0, 1)          # (W, N, C)
        y, _ = self.rnn(f)
        return self.head(y.mean(dim=0))


class GRUNet(nn.Module):
    """A batch-first GRU whose last hidden state is the feature (PyTorch's GRU resets before the product)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, 4)
        self.rnn = nn.GRU(8, 5, batch_first=True)
        self.head = nn.Linear(5, 10)

    def forward(self, x):
        f = self.conv(x).flatten(2).transpose(1, 2)            # (N, tokens, C)
        _, h = self.rnn(f)
        return self.head(torch.sigmoid(h[-1]))


class MixerRNN(nn.Module):
    """Sequencer-style token mixing: a bidirectional RNN along rows, one along columns."""

    def __init__(self, d=8):
        super().__init__()
        self.patch = nn.Conv2d(3, d, 8, 8)
        self.rows = nn.RNN(d, 4, bidirectional=True, batch_first=True)
        self.cols = nn.RNN(d, 4, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        p = self.patch(x).permute(0, 2, 3, 1)                  # (N, H, W, d)
        n, hh, ww, d = p.shape
        rows, _ = self.rows(p.reshape(n * hh, ww, d))
        cols, _ = self.cols(p.transpose(1, 2).reshape(n * ww, hh, d))
        feat = torch.cat([rows.reshape(n, -1, 8).mean(1), cols.reshape(n, -1, 4).mean(1)], dim=1)
        return self.head(feat)


NETS = {"crnn": CRNN, "gru": GRUNet, "mixer": MixerRNN}


def _export(net: nn.Module, path) -> onnx.ModelProto:
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamo=False, dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load(str(path))


@pytest.mark.parametrize("name", list(NETS))
def test_recurrent_nets_match_torch_autograd(tmp_path, name):
    torch.manual_seed(3)
    net = NETS[name]().eval()
    model = _export(net, tmp_path / "m.onnx")
    ops = {n.op_type for n in model.graph.node}
    assert ops & {"LSTM", "GRU", "RNN"}
    vm = vjp(model, "logits", ["input"])
    assert not {n.op_type for n in vm.graph.node} & {"LSTM", "GRU", "RNN"}
    rng = np.random.default_rng(5)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 32, 32)).astype(F32)
        cot = rng.standard_normal((batch, 10)).astype(F32)
        xt = torch.tensor(x, requires_grad=True)
        y = net(xt)
        (y * torch.tensor(cot)).sum().backward()
        out = run(vm, {"input": x, "grad_logits": cot})
        ref = xt.grad.numpy()
        assert np.abs(out["logits"] - y.detach().numpy()).max() <= 1e-5 * np.abs(y.detach().numpy()).max()
        assert np.abs(out["grad_input"] - ref).max() <= 1e-4 * np.abs(ref).max(), f"batch {batch}"


# ---- single nodes, against ONNX Runtime's fused kernel ------------------------------------------------

def _node_model(op, attrs, hidden, steps=4, batch=3, size=5, layout=0, bias=True, peep=False, init=False,
                dirs=1):
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    inits = {"W": R.standard_normal((dirs, gates * hidden, size)) * 0.5,
             "R": R.standard_normal((dirs, gates * hidden, hidden)) * 0.5}
    names = ["x" if layout else "xt", "W", "R"]
    if bias:
        inits["B"] = R.standard_normal((dirs, 2 * gates * hidden)) * 0.3
    names.append("B" if bias else "")
    names.append("")                                             # sequence_lens
    feeds = {"x": R.standard_normal((batch, steps, size)).astype(F32)}       # batch first, as a model's input
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(feeds["x"].shape))]
    state_shape = (batch, dirs, hidden) if layout else (dirs, batch, hidden)
    if init:
        for k in ("h0",) + (("c0",) if op == "LSTM" else ()):
            feeds[k] = R.standard_normal(state_shape).astype(F32)
            inputs.append(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(state_shape)))
        names += ["h0"] + (["c0"] if op == "LSTM" else [])
    if peep:
        names += [""] * (7 - len(names))
        inits["P"] = R.standard_normal((dirs, 3 * hidden)) * 0.5
        names.append("P")
    outs = ["y", "y_h"] + (["y_c"] if op == "LSTM" else [])
    nodes = [] if layout else [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2])]
    nodes.append(helper.make_node(op, names, outs, hidden_size=hidden, layout=layout, **attrs))
    g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
                          [numpy_helper.from_array(v.astype(F32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m, feeds


SINGLE = [
    ("LSTM", {}, {}),
    ("LSTM", {"direction": "reverse"}, {"peep": True, "init": True}),
    ("LSTM", {"direction": "bidirectional"}, {"dirs": 2, "layout": 1, "init": True}),
    ("GRU", {"linear_before_reset": 0}, {"init": True}),
    ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}, {"dirs": 2}),
    ("RNN", {"activations": ["Relu"]}, {"bias": False}),
    ("RNN", {"direction": "reverse"}, {"layout": 1, "init": True}),
]


def _as_layout0(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same computation with a layout-0 node between Transposes: ONNX Runtime's CPU kernels
    refuse batch-first (layout 1) recurrent nodes, so they are checked through this twin."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = m.graph.node[-1]
    for a in node.attribute:
        if a.name == "layout":
            a.i = 0
    pre = [helper.make_node("Transpose", [node.input[0]], ["x_tbi"], perm=[1, 0, 2])]
    node.input[0] = "x_tbi"
    for k in (5, 6):
        if len(node.input) > k and node.input[k]:
            pre.append(helper.make_node("Transpose", [node.input[k]], [node.input[k] + "_dbh"], perm=[1, 0, 2]))
            node.input[k] += "_dbh"
    post = []
    for k, o in enumerate(node.output):
        node.output[k] = o + "_l0"
        post.append(helper.make_node("Transpose", [o + "_l0"], [o], perm=[2, 0, 1, 3] if k == 0 else [1, 0, 2]))
    nodes = pre + list(m.graph.node) + post
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


@pytest.mark.parametrize("op,attrs,kw", SINGLE, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(SINGLE)])
@pytest.mark.parametrize("out", ["y", "y_h"])
def test_single_recurrent_node(op, attrs, kw, out):
    model, feeds = _node_model(op, attrs, 3, **kw)
    wrt = [k for k in feeds]
    runnable = _as_layout0(model) if kw.get("layout") else model
    fused = run(runnable, feeds)[out]
    unrolled = run(vjp(model, out, wrt), {**feeds, "grad_" + out: np.zeros_like(fused)})[out]
    assert np.abs(unrolled - fused).max() <= 1e-5 * max(1.0, np.abs(fused).max())
    check_vjp(runnable, out, wrt, feeds)
    if runnable is not model:               # the batch-first node itself gives the twin's gradients
        cot = R.standard_normal(fused.shape).astype(F32)
        got, ref = derived_grads(model, out, wrt, feeds, cot), derived_grads(runnable, out, wrt, feeds, cot)
        for k in wrt:
            assert np.abs(got["grad_" + k] - ref["grad_" + k]).max() <= 1e-5 * np.abs(ref["grad_" + k]).max()


def test_lstm_cell_output_and_both_states():
    model, feeds = _node_model("LSTM", {"direction": "bidirectional"}, 2, dirs=2, init=True, peep=True)
    check_vjp(model, "y_c", list(feeds), feeds)


@pytest.mark.parametrize("attrs,kw,why", [
    ({"clip": 2.0}, {}, "clip"),
    ({"activations": ["HardSigmoid", "Tanh", "Tanh"]}, {}, "activations"),
])
def test_refused_recurrent_nodes_name_the_reason(attrs, kw, why):
    model, _ = _node_model("LSTM", attrs, 3, **kw)
    with pytest.raises(UnsupportedOpError, match=f"LSTM.*{why}"):
        vjp(model, "y", ["x"])


def test_run_time_sequence_length_is_refused():
    model, _ = _node_model("GRU", {}, 3)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    with pytest.raises(UnsupportedOpError, match="GRU.*sequence length only known at run time"):
        vjp(model, "y", ["x"])


def test_weights_computed_from_constants_are_folded():
    """torch.onnx's dynamo exporter reorders PyTorch's gate blocks into ONNX's with Slices and a
    Concat on the weight initializers; those fold to constants, so the node still unrolls."""
    model, feeds = _node_model("LSTM", {}, 3)
    g = model.graph
    lstm = g.node[-1]
    h = 3
    cuts = [(0, h), (2 * h, 3 * h), (h, 2 * h), (3 * h, 4 * h)]
    nodes = []
    for k, (a, b) in enumerate(cuts):
        g.initializer.extend([numpy_helper.from_array(np.array([a], np.int64), f"s{k}"),
                              numpy_helper.from_array(np.array([b], np.int64), f"e{k}")])
        nodes.append(helper.make_node("Slice", ["W", f"s{k}", f"e{k}", "ax1"], [f"w{k}"]))
    g.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    nodes.append(helper.make_node("Concat", [f"w{k}" for k in range(4)], ["W_onnx"], axis=1))
    lstm.input[1] = "W_onnx"
    rest = list(g.node)
    del g.node[:]
    g.node.extend(nodes + rest)
    vm = vjp(model, "y", ["x"])
    assert "LSTM" not in {n.op_type for n in vm.graph.node}
    check_vjp(model, "y", ["x"], feeds)


def test_methods_and_export_on_a_recurrent_model(tmp_path):
    """The explainer and the exported graph on a CRNN: saliency is PyTorch's max |gradient| over
    channels, and the standalone graph (LSTMs unrolled inside) gives the engine's maps."""
    import onnxruntime as ort

    import onnxsal
    from onnxsal.export import export

    torch.manual_seed(2)
    net = CRNN().eval()
    _export(net, tmp_path / "crnn.onnx")
    ex = onnxsal.Explainer(str(tmp_path / "crnn.onnx"), "cpu", preprocess="raw")
    x = np.random.default_rng(8).standard_normal((1, 3, 32, 32)).astype(F32)
    xt = torch.tensor(x, requires_grad=True)
    net(xt)[0, 4].backward()
    ref = np.abs(xt.grad.numpy()[0]).max(axis=0)
    res = ex.explain(x, "saliency", target=4)
    np.testing.assert_allclose(res.raw[0], ref, atol=1e-4 * ref.max(), rtol=1e-3)
    for method in ("saliency", "gradcam"):
        sess = ort.InferenceSession(export(str(tmp_path / "crnn.onnx"), method).SerializeToString())
        _, maps = sess.run(None, {"input": x, "target": np.array([4], np.int64)})
        np.testing.assert_allclose(maps[0], ex.explain(x, method, target=4).map, atol=1e-5)
