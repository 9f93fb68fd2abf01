"""DFT's VJP (torch.fft in a dynamo export) against finite differences and against torch.autograd.

A DFT is linear, so central differences are exact at any step: eps = 1 keeps ONNX Runtime's own
rounding in its DFT kernel (about 1e-8 of the values, in double too) from swamping the check.
The whole-network check builds a global filter layer (GFNet: rfft2, a learned complex weight per
frequency, irfft2) with the nodes torch.onnx's dynamo exporter writes for it (DFT at opset 20
with its length and axis inputs, the complex product over the last axis) and compares it with
the same layer in PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gradcheck import check_vjp, one_node_model
from onnxsal.errors import UnsupportedOpError
from onnxsal.graph.autodiff import vjp

R = np.random.default_rng(17)
I64 = np.int64


def sig(*shape):
    return R.standard_normal(shape)


def case(x, attrs=None, opset=20, length=None, axis=None, id=None):
    return pytest.param(dict(x=x, attrs=attrs or {}, opset=opset, length=length, axis=axis), id=id)


CASES = [
    case(sig(2, 6, 1), {"axis": 1}, opset=17, id="fft-real-opset17"),
    case(sig(2, 6, 2), {"axis": 1, "inverse": 1}, opset=17, id="ifft-complex-opset17"),
    case(sig(2, 7, 1), {"axis": 1, "onesided": 1}, opset=17, id="rfft-odd-opset17"),
    case(sig(2, 3, 6, 2), {"axis": 2}, opset=17, id="fft-axis-2-opset17"),
    case(sig(2, 3, 6, 1), {"onesided": 1}, id="rfft-default-axis"),
    case(sig(2, 5, 4, 2), {}, axis=1, id="fft-complex-axis-1"),
    case(sig(2, 5, 4, 2), {"inverse": 1}, axis=-3, id="ifft-negative-axis"),
    case(sig(2, 6, 1), {"onesided": 1}, length=9, axis=1, id="rfft-zero-padded"),
    case(sig(2, 6, 2), {}, length=4, axis=1, id="fft-cut"),
    case(sig(2, 6, 2), {"inverse": 1}, length=8, axis=1, id="ifft-zero-padded"),
    case(sig(2, 4, 2), {"onesided": 1, "inverse": 1}, axis=1, id="irfft-default-length"),
    case(sig(2, 4, 2), {"onesided": 1, "inverse": 1}, length=7, axis=1, id="irfft-odd-length"),
    case(sig(2, 3, 5, 2), {"onesided": 1, "inverse": 1}, length=8, id="irfft-last-axis"),
]


def _model(c):
    inputs, inits, names = {"x": c["x"]}, {}, ["x"]
    if c["length"] is not None or c["axis"] is not None:
        names.append("")
        if c["length"] is not None:
            inits["n"], names[1] = np.array(c["length"], I64), "n"
        if c["axis"] is not None:
            inits["a"] = np.array(c["axis"], I64)
            names.append("a")
    return one_node_model("DFT", inputs, c["attrs"], inits, opset=c["opset"], node_inputs=names)


@pytest.mark.parametrize("c", CASES)
def test_dft_against_finite_differences(c):
    check_vjp(_model(c), "y", ["x"], {"x": c["x"]}, eps=1.0, rtol=1e-6, atol=1e-9)


def test_an_irfft_whose_bins_do_not_match_its_length_is_refused():
    """4 bins to 10 samples: the signal's mirror images would overlap or leave gaps, in a way ONNX
    Runtime's kernel and NumPy's irfft do not agree on; refused by name rather than guessed."""
    m = _model(dict(x=sig(2, 4, 2), attrs={"onesided": 1, "inverse": 1}, opset=20, length=10, axis=1))
    with pytest.raises(UnsupportedOpError, match=r"DFT.*4 bins to 10 samples"):
        vjp(m, "y", ["x"])


def _global_filter_graph(weight: np.ndarray, conv: np.ndarray, fc: np.ndarray) -> onnx.ModelProto:
    """image -> Conv -> h + irfft2(rfft2(h) * w) -> Relu -> mean -> Gemm, as the dynamo exporter
    writes it (norm="ortho" as a division by sqrt(H W) on each side)."""
    hh, ww = 16, 16
    nodes, k = [], [0]

    def op(t, ins, **a):
        k[0] += 1
        out = f"t{k[0]}"
        nodes.append(helper.make_node(t, ins, [out], **a))
        return out

    h = op("Conv", ["image", "conv_w"], pads=[1, 1, 1, 1])
    signal = op("Unsqueeze", [h, "last"])                                   # (N, C, H, W, 1)
    f = op("DFT", [signal, "len_w", "ax3"], onesided=1)                       # rfft over W
    f = op("DFT", [f, "len_h", "ax2"])                                      # fft over H
    f = op("Div", [f, "root"])
    re, im = op("Slice", [f, "z0", "z1", "ax4"]), op("Slice", [f, "z1", "z2", "ax4"])
    wr, wi = op("Slice", ["filt", "z0", "z1", "axm1"]), op("Slice", ["filt", "z1", "z2", "axm1"])
    pr = op("Sub", [op("Mul", [re, wr]), op("Mul", [im, wi])])
    pi = op("Add", [op("Mul", [re, wi]), op("Mul", [im, wr])])
    p = op("Concat", [pr, pi], axis=-1)
    g = op("DFT", [p, "", "ax2"], inverse=1)                                # ifft over H
    g = op("DFT", [g, "len_w", "ax3"], inverse=1, onesided=1)               # irfft over W
    g = op("Mul", [op("Squeeze", [g, "last"]), "root"])
    y = op("Relu", [op("Add", [h, g])])
    pooled = op("ReduceMean", [y, "hw"], keepdims=0)
    nodes.append(helper.make_node("Gemm", [pooled, "fc_w"], ["logits"], transB=1))
    consts = {"conv_w": conv, "filt": weight, "fc_w": fc, "root": np.array(np.sqrt(hh * ww), np.float32),
              "last": np.array([4], I64), "len_w": np.array(ww, I64), "len_h": np.array(hh, I64),
              "ax2": np.array(2, I64), "ax3": np.array(3, I64), "ax4": np.array([4], I64),
              "axm1": np.array([-1], I64), "z0": np.array([0], I64), "z1": np.array([1], I64),
              "z2": np.array([2], I64), "hw": np.array([2, 3], I64)}
    graph = helper.make_graph(nodes, "gfnet_block",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, hh, ww])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, fc.shape[0]])],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_a_global_filter_layer_against_torch_autograd(tmp_path):
    import onnxruntime as ort

    import onnxsal

    rng = np.random.default_rng(3)
    conv = (rng.standard_normal((6, 3, 3, 3)) * 0.3).astype(np.float32)
    weight = rng.standard_normal((6, 16, 9, 2)).astype(np.float32)
    fc = rng.standard_normal((4, 6)).astype(np.float32)
    path = str(tmp_path / "gf.onnx")
    onnx.save(_global_filter_graph(weight, conv, fc), path)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)

    def net(xt):
        h = torch.nn.functional.conv2d(xt, torch.tensor(conv, dtype=torch.float64), padding=1)
        f = torch.fft.rfft2(h, dim=(2, 3), norm="ortho") * torch.view_as_complex(torch.tensor(weight, dtype=torch.float64))
        y = torch.relu(h + torch.fft.irfft2(f, s=(16, 16), dim=(2, 3), norm="ortho"))
        return y.mean(dim=(2, 3)) @ torch.tensor(fc, dtype=torch.float64).T

    with torch.no_grad():               # the graph is the layer
        np.testing.assert_allclose(ort.InferenceSession(path).run(None, {"image": x})[0],
                                   net(torch.tensor(x, dtype=torch.float64)).numpy(), rtol=1e-4, atol=1e-5)
    ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
    for c in range(4):
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        net(xt)[0, c].backward()
        want = np.abs(xt.grad.numpy()[0]).max(axis=0)
        np.testing.assert_allclose(ex.explain(x, "saliency", c).raw[0], want, rtol=1e-4, atol=1e-5 * want.max())
