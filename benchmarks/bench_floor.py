"""How low forward+VJP / forward could go on ONNX Runtime's CPU kernels: the gradient graph with
its routing made free, timed beside the real one and the forward pass.

    cd benchmarks && ../.venv-bench/bin/python bench_floor.py [--nets resnet50,vgg16,mobilenet_v2,demo] [--batch 16]

The "free routing" graph is onnxsal's own VJP graph with three rules swapped for this call
(``vjp(..., rules=...)``): ``Relu`` and ``Clip`` pass the gradient through without their masks,
and ``MaxPool`` copies each window's gradient over the window (``Tile``) instead of routing it to
the window's maximum. What is left is the forward pass and the adjoint of every convolution, in
the formulations the real graph uses (flipped-kernel ``Conv`` for stride 1, the spread for strided
depthwise layers, ``ConvTranspose`` elsewhere, each the fastest form measured). Its gradient is
wrong; its time is what an exact gradient graph built from these convolutions costs at least, so
its ratio is a floor for the goal of forward+VJP <= 2.5x forward. All three graphs' kernel times
come from one alternating profile (``common.kernel_ms``), the wall times from one interleaved
timing.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx

from common import kernel_ms, machine, model_size, onnx_path, table, timeit_side_by_side
from bench_vjp import session

from onnxsal.graph.autodiff import RuleContext, vjp
from onnxsal.graph.rules import blocked
from onnxsal.graph.rules.conv import interleave_zeros, ints_attr, spatial_sizes
from onnxsal.graph.surgery import expose
from onnxsal.model import load


def pass_through(ctx: RuleContext, gy: list) -> list:
    """The gradient as it came: an activation whose mask costs nothing."""
    return [gy[0]] + [None] * (len(ctx.inputs) - 1)


def copied_pool(ctx: RuleContext, gy: list) -> list:
    """Each window's gradient copied over the window, as if its argmax cost a memory copy.

    ``Tile`` by the pool's strides is a plain copy in ONNX Runtime: the demo model's whole graph
    took 6.5-6.8 ms of kernel time with it at batch 16, against 7.3-7.4 ms with the strided
    layers' spread (``interleave_zeros``) to each window's first position. It fits when the
    pooled grid tiles the input, as in every goal network's pools; elsewhere that spread stands in.
    """
    x = ctx.inputs[0]
    nsp = len(ctx.shape(x)) - 2
    strides = ints_attr(ctx, "strides", nsp, 1)
    h_in, h_out = spatial_sizes(ctx, x, nsp), spatial_sizes(ctx, ctx.outputs[0], nsp)
    if all(h == s * o for h, s, o in zip(h_in, strides, h_out)):
        return [ctx.op("Tile", [gy[0], ctx.const(np.array([1, 1] + strides, np.int64))])]
    spread = interleave_zeros(ctx, gy[0], strides, ctx.shape(x)[1])
    tail = [h - (s * (o - 1) + 1) for h, s, o in zip(h_in, strides, h_out)]
    if any(tail):     # the input rows and columns past the last window's start
        spread = ctx.op("Pad", [spread, ctx.const(np.array([0] * (nsp + 2) + [0, 0] + tail, np.int64))])
    return [blocked.bridge(ctx, spread)]


FREE = {"Relu": pass_through, "Clip": pass_through, "MaxPool": copied_pool}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="resnet50,vgg16,mobilenet_v2,demo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    threads = os.cpu_count()
    header = ["net", "batch", "forward ms", "fwd+VJP ms", "ratio", "free routing ms", "floor ratio",
              "fwd kernels ms", "fwd+VJP kernels ms", "kernel ratio", "free routing kernels ms", "kernel floor ratio"]
    print(f"# {machine()}; {threads} threads; median of {args.repeat} runs", flush=True)
    rows = []
    for net in args.nets.split(","):
        m = load(onnx_path(net), size=model_size(net))
        x_name, y = m.input.name, m.logits
        graphs: list[onnx.ModelProto] = [expose(m.proto, [y]), vjp(m.proto, y, [x_name]),
                                          vjp(m.proto, y, [x_name], rules=FREE)]
        x = np.random.default_rng(0).normal(size=(args.batch, 3) + m.input.size).astype(np.float32)
        sessions = [session(g, threads) for g in graphs]
        seed = np.zeros_like(sessions[0].run([y], {x_name: x})[0])
        seed.reshape(args.batch, -1)[:, 0] = 1
        feeds = [{x_name: x}] + [{x_name: x, f"grad_{y}": seed}] * 2
        wall = timeit_side_by_side([lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)], args.repeat)
        sessions = None
        runs = max(3, min(15, int(3.0 / max(wall[1], 1e-3))))
        kern = kernel_ms(list(zip(graphs, feeds)), threads, runs)
        row = [net, args.batch, wall[0] * 1e3, wall[1] * 1e3, wall[1] / wall[0], wall[2] * 1e3, wall[2] / wall[0],
               kern[0], kern[1], kern[1] / kern[0], kern[2], kern[2] / kern[0]]
        rows.append(row)
        print(table(header, [row]).splitlines()[-1], flush=True)
    print()
    print(table(header, rows))


if __name__ == "__main__":
    main()
