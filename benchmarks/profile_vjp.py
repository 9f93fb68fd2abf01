"""Where a goal network's forward and VJP graphs spend their time, per op type, from ONNX Runtime's
profiler (kernel ms per run, mean over 5 runs after 2 warm-ups, 2 threads).

    cd benchmarks && ../.venv-bench/bin/python profile_vjp.py resnet50 [batch] [--order priority] [--nodes N]

Networks as in bench_vjp.py (resnet50, vgg16, mobilenet_v2, demo); batch 16 unless given. ORT's
blocked-layout ops count under their own names (a Conv fused with its Clip reads as Conv).

The VJP graph's time is also split between the forward's own nodes (the same node names as in the
forward graph) and the nodes the gradient adds: a forward node can cost more inside the VJP graph,
e.g. a convolution that adds its residual input in place has to copy that input first when the
backward still reads it. ``--order priority`` runs both graphs with ONNX Runtime's priority-based
execution order instead of its default one, to compare the two.
"""

from __future__ import annotations

import argparse
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


def per_node(model, feeds: dict, priority: bool, runs: int = 5) -> dict[tuple[str, str], float]:
    """Kernel ms per run of each (node name, op type), from ONNX Runtime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        if priority:
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][2:]
    times: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in windows):
            times[(e["name"][: -len("_kernel_time")], e["args"]["op_name"])] += e["dur"] / 1e3 / runs
    return times


def by_op(times: dict[tuple[str, str], float]) -> collections.Counter:
    out: collections.Counter = collections.Counter()
    for (_, op), t in times.items():
        out[op] += t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("net")
    ap.add_argument("batch", nargs="?", type=int, default=16)
    ap.add_argument("--order", choices=["default", "priority"], default="default")
    ap.add_argument("--nodes", type=int, default=0, help="also the N forward nodes that cost most more in the VJP graph")
    args = ap.parse_args()
    net, batch, priority = args.net, args.batch, args.order == "priority"
    m = load(onnx_path(net), size=model_size(net))
    x_name, y = m.input.name, m.logits
    fwd, bwd = expose(m.proto, [y]), vjp(m.proto, y, [x_name])
    x = np.random.default_rng(0).normal(size=(batch, 3) + m.input.size).astype(np.float32)
    seed = np.zeros_like(ort.InferenceSession(fwd.SerializeToString()).run([y], {x_name: x})[0])
    seed.reshape(batch, -1)[:, 0] = 1
    fn, vn = per_node(fwd, {x_name: x}, priority), per_node(bwd, {x_name: x, f"grad_{y}": seed}, priority)
    # ORT names the layout reorders it adds by counter, so equal names there are not the same node.
    shared = {key for key in fn if key in vn and not key[1].startswith("Reorder")}
    own = sum(vn[key] for key in shared)
    f, v = by_op(fn), by_op(vn)
    print(f"{net} at batch {batch}, {'priority-based' if priority else 'default'} execution order: "
          f"forward {sum(f.values()):.1f} ms, forward + VJP {sum(v.values()):.1f} ms, "
          f"ratio {sum(v.values()) / sum(f.values()):.2f}; in the VJP graph the forward's own nodes take "
          f"{own:.1f} ms and the gradient's {sum(v.values()) - own:.1f} ms")
    print("| op | forward ms | forward + VJP ms |")
    print("|---|---|---|")
    for op, t in v.most_common():
        if t >= 0.05:
            print(f"| {op} | {f.get(op, 0.0):.1f} | {t:.1f} |")
    if args.nodes:
        grown = sorted(((vn[key] - t, key, t) for key, t in fn.items() if key in shared), reverse=True)[: args.nodes]
        print("| forward node | op | forward ms | in the VJP graph ms |")
        print("|---|---|---|---|")
        for _, (name, op), t in grown:
            print(f"| {name} | {op} | {t:.1f} | {vn[(name, op)]:.1f} |")


if __name__ == "__main__":
    main()
