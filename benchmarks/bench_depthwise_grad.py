"""Input gradient of strided depthwise convolutions: grouped ConvTranspose against spread + flipped Conv.

    .venv-bench/bin/python benchmarks/bench_depthwise_grad.py [--net mobilenet_v2] [--batch 16] [--runs 6]

Two tables, both from ONNX Runtime's summed kernel times (`common.kernel_ms`, sessions alternating):

* single layers shaped like MobileNetV2's stride-2 depthwise layers, the gradient sitting between
  two 1x1 convolutions as it does in a network: ``ConvTranspose(dy, W, group=C)`` against the
  rule's formulation (a unit 1x1 ConvTranspose spreading ``dy`` onto the stride grid, then the
  flipped kernel at stride 1);
* the whole network's forward + VJP graph built with and without that formulation.
"""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from common import kernel_ms, machine, onnx_path, table

from onnxsal.graph.autodiff import vjp
from onnxsal.graph.rules import conv as conv_rules
from onnxsal.graph.surgery import expose
from onnxsal.model import load

LAYERS = [(96, 112), (144, 56), (192, 28), (576, 14)]   # (channels, input size) of MobileNetV2's stride-2 layers


def layer_models(c: int, h: int, batch: int, seed: int = 0):
    """(ConvTranspose model, spread + flipped Conv model, feeds) for a 3x3 stride-2 pad-1 depthwise layer."""
    rng = np.random.default_rng(seed)
    ho = (h + 2 - 3) // 2 + 1
    w = rng.normal(size=(c, 1, 3, 3)).astype(np.float32)
    p = (rng.normal(size=(c, c, 1, 1)) * 0.1).astype(np.float32)
    inits = {"W": w, "Wf": conv_rules.flipped_conv_weight(w, c), "P": p, "one": np.ones((c, 1, 1, 1), np.float32)}

    def model(middle):
        nodes = [helper.make_node("Conv", ["dy0", "P"], ["dy"], kernel_shape=[1, 1])] + middle + [
            helper.make_node("Conv", ["g", "P"], ["out"], kernel_shape=[1, 1])]
        used = {i for n in nodes for i in n.input}
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("dy0", TensorProto.FLOAT, ["N", c, ho, ho])],
                                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    pb, pe, op = conv_rules.transpose_geometry(h, ho, 3, 2, 1, 1, 1)
    transpose = model([helper.make_node("ConvTranspose", ["dy", "W"], ["g"], kernel_shape=[3, 3], strides=[2, 2],
                                        pads=[pb, pb, pe, pe], output_padding=[op, op], group=c)])
    q_begin, q_end = 2 - pb, 2 - pe + op
    spread = model([helper.make_node("ConvTranspose", ["dy", "one"], ["u"], kernel_shape=[1, 1], strides=[2, 2], group=c),
                    helper.make_node("Conv", ["u", "Wf"], ["g"], kernel_shape=[3, 3], group=c,
                                     pads=[q_begin, q_begin, q_end, q_end])])
    feeds = {"dy0": rng.normal(size=(batch, c, ho, ho)).astype(np.float32)}
    return transpose, spread, feeds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print(f"# {machine()}; {args.threads} threads; batch {args.batch}; median of {args.runs} alternating runs", flush=True)

    rows = []
    for c, h in LAYERS:
        transpose, spread, feeds = layer_models(c, h, args.batch)
        a, b = (ort.InferenceSession(mm.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
                for mm in (transpose, spread))
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), "the two formulations disagree"
        t, s = kernel_ms([(transpose, feeds), (spread, feeds)], args.threads, args.runs)
        rows.append([f"{c} ch, {h}x{h}", t, s, t / s])
    print(table(["layer (with a 1x1 conv either side)", "ConvTranspose ms", "spread + Conv ms", "speed-up"], rows), flush=True)

    m = load(onnx_path(args.net))
    x_name, y = m.input.name, m.logits
    x = np.random.default_rng(0).normal(size=(args.batch, 3) + m.input.size).astype(np.float32)
    seed = np.zeros((args.batch, m.num_classes), np.float32)
    seed[:, 0] = 1
    new = vjp(m.proto, y, [x_name])
    keep = conv_rules._blocked_depthwise
    conv_rules._blocked_depthwise = lambda *a: False
    try:
        old = vjp(m.proto, y, [x_name])
    finally:
        conv_rules._blocked_depthwise = keep
    feeds = {x_name: x, f"grad_{y}": seed}
    fwd, o, n = kernel_ms([(expose(m.proto, [y]), {x_name: x}), (old, feeds), (new, feeds)], args.threads, args.runs)
    print()
    print(table(["net", "forward ms", "fwd+VJP, ConvTranspose ms", "ratio", "fwd+VJP, spread + Conv ms", "ratio"],
                [[args.net, fwd, o, o / fwd, n, n / fwd]]))


if __name__ == "__main__":
    main()
