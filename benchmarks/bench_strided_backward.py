"""The input gradient of ResNet-50's strided layers, three ways, at batch 16: what the gradient
graph runs (``ConvTranspose``) against two rewrites into stride-1 convolutions.

    cd benchmarks && ../.venv-bench/bin/python bench_strided_backward.py

* polyphase: one stride-1 ``Conv`` whose output channels are the s x s phases of the strided
  output (each phase's kernel the taps of its parity, flipped), then ``DepthToSpace`` and a crop;
* for 1x1 layers, a low-resolution 1x1 ``Conv`` (transposed weights) and a spread of its output
  onto the stride grid (``Reshape``, a 6-D ``Pad``, ``Reshape``).

Each rewrite is checked against ``ConvTranspose``'s output before it is timed (median of 10 runs
after 2 warm-ups, 2 threads, one-node graphs). Sizes: ``conv1`` (7x7, 3 channels), the 3x3
stride-2 convolutions and the 1x1 stride-2 downsamples of ResNet-50 at 224x224.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def _session(nodes: list, consts: dict, shape: list) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("dy", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("dx", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in consts.items()])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])


def _time(sess: ort.InferenceSession, dy: np.ndarray, runs: int = 10) -> tuple[float, np.ndarray]:
    for _ in range(2):
        out = sess.run(None, {"dy": dy})[0]
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"dy": dy})
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3, out


def _polyphase(w: np.ndarray, k: int, s: int) -> np.ndarray:
    """(C * s * s, M, kp, kp) weights: output channel c * s * s + ry * s + rx is phase (ry, rx) of
    input channel c, from the taps j = s * t + r, flipped so that a correlation applies them."""
    m, c = w.shape[:2]
    kp = -(-k // s)
    out = np.zeros((c * s * s, m, kp, kp), np.float32)
    for jy in range(k):
        for jx in range(k):
            phase = (jy % s) * s + jx % s
            out[np.arange(c) * s * s + phase, :, kp - 1 - jy // s, kp - 1 - jx // s] = w[:, :, jy, jx].T
    return out


def strided(n: int, m: int, c: int, h: int, k: int, s: int, p: int) -> list:
    rng = np.random.default_rng(0)
    dy = rng.standard_normal((n, m, h, h)).astype(np.float32)
    w = (rng.standard_normal((m, c, k, k)) * 0.1).astype(np.float32)
    extra = h * s - ((h - 1) * s - 2 * p + k)
    base, want = _time(_session([helper.make_node("ConvTranspose", ["dy", "w"], ["dx"], strides=[s, s], pads=[p] * 4,
                                                  output_padding=[extra, extra])], {"w": w}, list(dy.shape)), dy)
    kp = -(-k // s)
    nodes = [helper.make_node("Conv", ["dy", "wp"], ["c"], pads=[kp - 1] * 4),
             helper.make_node("DepthToSpace", ["c"], ["d"], blocksize=s, mode="CRD"),
             helper.make_node("Slice", ["d", "start", "end", "axes"], ["dx"])]
    consts = {"wp": _polyphase(w, k, s), "start": np.array([p, p], np.int64),
              "end": np.array([p + h * s] * 2, np.int64), "axes": np.array([2, 3], np.int64)}
    poly, got = _time(_session(nodes, consts, list(dy.shape)), dy)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    row = [f"{k}x{k} s{s}, {m}->{c} at {h}x{h}", f"{base:.1f}", f"{poly:.1f}", "-"]
    if k == 1:
        nodes = [helper.make_node("Conv", ["dy", "wt"], ["c"]), helper.make_node("Reshape", ["c", "six"], ["c6"]),
                 helper.make_node("Pad", ["c6", "pads"], ["p6"]), helper.make_node("Reshape", ["p6", "four"], ["dx"])]
        consts = {"wt": np.ascontiguousarray(w.transpose(1, 0, 2, 3)), "six": np.array([n, c, h, 1, h, 1], np.int64),
                  "pads": np.array([0] * 9 + [1, 0, 1], np.int64), "four": np.array([n, c, h * 2, h * 2], np.int64)}
        spread, got = _time(_session(nodes, consts, list(dy.shape)), dy)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
        row[3] = f"{spread:.1f}"
    return row


def main() -> None:
    print("| layer (backward of) | ConvTranspose ms | polyphase Conv + DepthToSpace ms | 1x1 Conv + spread ms |")
    print("|---|---|---|---|")
    for args in ((16, 64, 3, 112, 7, 2, 3), (16, 128, 128, 28, 3, 2, 1), (16, 256, 256, 14, 3, 2, 1),
                 (16, 512, 512, 7, 3, 2, 1), (16, 512, 256, 28, 1, 2, 0), (16, 1024, 512, 14, 1, 2, 0),
                 (16, 2048, 1024, 7, 1, 2, 0)):
        print("| " + " | ".join(strided(*args)) + " |", flush=True)


if __name__ == "__main__":
    main()
