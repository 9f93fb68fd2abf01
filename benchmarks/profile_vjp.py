"""Where a goal network's forward and VJP graphs spend their time, per op type, from ONNX Runtime's
profiler (kernel ms per run, mean over 5 runs after 2 warm-ups, 2 threads).

    cd benchmarks && ../.venv-bench/bin/python profile_vjp.py resnet50 [batch]

Networks as in bench_vjp.py (resnet50, vgg16, mobilenet_v2, demo); batch 16 unless given. ORT's
blocked-layout ops count under their own names (a Conv fused with its Clip reads as Conv).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from common import model_size, onnx_path  # noqa: E402
from onnxsal import load  # noqa: E402
from onnxsal.graph.autodiff import vjp  # noqa: E402
from onnxsal.graph.surgery import expose  # noqa: E402


def per_op(model, feeds: dict, runs: int = 5) -> collections.Counter:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][2:]
    times = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in windows):
            times[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return times


def main() -> None:
    net = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    m = load(onnx_path(net), size=model_size(net))
    x_name, y = m.input.name, m.logits
    fwd, bwd = expose(m.proto, [y]), vjp(m.proto, y, [x_name])
    x = np.random.default_rng(0).normal(size=(batch, 3) + m.input.size).astype(np.float32)
    seed = np.zeros_like(ort.InferenceSession(fwd.SerializeToString()).run([y], {x_name: x})[0])
    seed.reshape(batch, -1)[:, 0] = 1
    f, v = per_op(fwd, {x_name: x}), per_op(bwd, {x_name: x, f"grad_{y}": seed})
    print(f"{net} at batch {batch}: forward {sum(f.values()):.1f} ms, forward + VJP {sum(v.values()):.1f} ms, "
          f"ratio {sum(v.values()) / sum(f.values()):.2f}")
    print("| op | forward ms | forward + VJP ms |")
    print("|---|---|---|")
    for op, t in v.most_common():
        if t >= 0.05:
            print(f"| {op} | {f.get(op, 0.0):.1f} | {t:.1f} |")


if __name__ == "__main__":
    main()
