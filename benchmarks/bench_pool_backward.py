"""The backward of a max pool whose windows tile the input (kernel == stride, VGG's and the demo
model's 2x2 pools), three exact ways, at the sizes those models run at batch 16:

    cd benchmarks && ../.venv-bench/bin/python bench_pool_backward.py

* indices (what the gradient graph runs): ``MaxPool`` with its ``Indices`` output, then
  ``MaxUnpool`` writes each output's gradient at its window's first maximum;
* phases: the k x k strided ``Slice`` phases of ``x`` compared with ``y``, each phase keeping
  the positions no earlier phase matched (``Equal``, ``Not``, ``And``, ``Or``), the gradient
  put there (``Where``), and the phases laid back with ``Concat`` + ``DepthToSpace``;
* blocks: each window laid out as a last axis (``Reshape``, ``Transpose``), ``ArgMax``, the
  gradient put at the argmax (``Equal`` with a ``Range``, ``Where``), and laid back.

All three give the first maximum of a window PyTorch's ``max_pool2d`` picks, ties included: the
input holds a block of equal values, and each way must match the indices one exactly before it is
timed (median of 10 runs after 2 warm-ups, 2 threads). The input is made by a ``Relu`` inside the
graph, as a pool's input is in a network.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

BIG = 1 << 62


def _graph(nodes: list, consts: dict, c: int, h: int, k: int) -> ort.InferenceSession:
    nodes = [helper.make_node("Relu", ["x0"], ["x"]),
             helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[k, k])] + nodes
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [None, c, h, h]),
                                           helper.make_tensor_value_info("g", TensorProto.FLOAT, [None, c, h // k, h // k])],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.asarray(v), n) for n, v in consts.items()])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])


def indices(c: int, h: int, k: int) -> ort.InferenceSession:
    return _graph([helper.make_node("MaxPool", ["x"], ["y2", "i"], kernel_shape=[k, k], strides=[k, k]),
                   helper.make_node("Shape", ["x"], ["shape"]),
                   helper.make_node("MaxUnpool", ["g", "i", "shape"], ["dx"], kernel_shape=[k, k], strides=[k, k])],
                  {}, c, h, k)


def phases(c: int, h: int, k: int) -> ort.InferenceSession:
    consts = {"end": np.array([BIG, BIG], np.int64), "axes": np.array([2, 3], np.int64),
              "steps": np.array([k, k], np.int64), "zero": np.float32(0)}
    nodes, parts, found = [], [], None
    offsets = [(a, b) for a in range(k) for b in range(k)]
    for a, b in offsets:
        p = f"{a}_{b}"
        consts[f"start{p}"] = np.array([a, b], np.int64)
        nodes.append(helper.make_node("Slice", ["x", f"start{p}", "end", "axes", "steps"], [f"x{p}"]))
        nodes.append(helper.make_node("Equal", [f"x{p}", "y"], [f"eq{p}"]))
        if found is None:
            first, found = f"eq{p}", f"eq{p}"
        else:
            nodes += [helper.make_node("Not", [found], [f"free{p}"]),
                      helper.make_node("And", [f"eq{p}", f"free{p}"], [f"first{p}"]),
                      helper.make_node("Or", [found, f"eq{p}"], [f"found{p}"])]
            first, found = f"first{p}", f"found{p}"
        nodes.append(helper.make_node("Where", [first, "g", "zero"], [f"g{p}"]))
        parts.append(f"g{p}")
    nodes += [helper.make_node("Concat", parts, ["stacked"], axis=1),
              helper.make_node("DepthToSpace", ["stacked"], ["dx"], blocksize=k, mode="DCR")]
    return _graph(nodes, consts, c, h, k)


def blocks(c: int, h: int, k: int) -> ort.InferenceSession:
    o = h // k
    consts = {"six": np.array([0, c, o, k, o, k], np.int64), "five": np.array([0, c, o, o, k * k], np.int64),
              "back": np.array([0, c, o, o, k, k], np.int64), "four": np.array([0, c, h, h], np.int64),
              "taps": np.arange(k * k, dtype=np.int64), "last": np.array([-1], np.int64), "zero": np.float32(0)}
    nodes = [helper.make_node("Reshape", ["x", "six"], ["x6"]),
             helper.make_node("Transpose", ["x6"], ["xt"], perm=[0, 1, 2, 4, 3, 5]),
             helper.make_node("Reshape", ["xt", "five"], ["xw"]),
             helper.make_node("ArgMax", ["xw"], ["am"], axis=-1, keepdims=1, select_last_index=0),
             helper.make_node("Equal", ["am", "taps"], ["hit"]),
             helper.make_node("Unsqueeze", ["g", "last"], ["g5"]),
             helper.make_node("Where", ["hit", "g5", "zero"], ["gw"]),
             helper.make_node("Reshape", ["gw", "back"], ["g6"]),
             helper.make_node("Transpose", ["g6"], ["gt"], perm=[0, 1, 2, 4, 3, 5]),
             helper.make_node("Reshape", ["gt", "four"], ["dx"])]
    return _graph(nodes, consts, c, h, k)


def _time(sess: ort.InferenceSession, feeds: dict, runs: int = 10) -> tuple[float, np.ndarray]:
    for _ in range(2):
        out = sess.run(None, feeds)[0]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3, out


def row(n: int, c: int, h: int, k: int = 2) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c, h, h)).astype(np.float32)
    x[:, :, : 2 * k + 1, : 2 * k + 1] = 0.5      # windows of equal values, one cut by the window grid
    feeds = {"x0": x, "g": rng.standard_normal((n, c, h // k, h // k)).astype(np.float32)}
    base, want = _time(indices(c, h, k), feeds)
    cells = [f"{k}x{k}, {c} channels at {h}x{h}", f"{base:.1f}"]
    for build in (phases, blocks):
        ms, got = _time(build(c, h, k), feeds)
        np.testing.assert_array_equal(got, want)
        cells.append(f"{ms:.1f}")
    return cells


def main() -> None:
    print("| pool (backward of), batch 16 | indices + MaxUnpool ms | phases ms | blocks + ArgMax ms |")
    print("|---|---|---|---|")
    for c, h in ((16, 64), (32, 32), (64, 224), (128, 112), (256, 56), (512, 28), (512, 14)):
        print("| " + " | ".join(row(16, c, h)) + " |", flush=True)


if __name__ == "__main__":
    main()
