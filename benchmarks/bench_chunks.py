"""Seconds per map of batched methods, with the engine's CPU row cap and without it.

    .venv-bench/bin/python benchmarks/bench_chunks.py [--nets resnet50,mobilenet_v2,vgg16,demo]

On CPU the engine runs at most as many rows at once as keep a run's largest activation near
`onnxsal.runtime.CPU_CHUNK_BYTES` (at least 4 rows); without the cap a run takes every row the
memory budget allows (SmoothGrad's 20 noisy copies in one run on MobileNetV2). Both settings run
the same explainer and session, alternating, so each pair sees the same machine load; the maps
are the same to float rounding (checked here too).
"""

from __future__ import annotations

import argparse

import numpy as np

from common import machine, onnx_path, table, timeit_side_by_side

import onnxsal
from onnxsal import runtime


def uncapped(fn):
    """`fn` run with the CPU row cap lifted (the memory budget alone sizes the runs)."""
    def run():
        saved = runtime.CPU_CHUNK_BYTES
        runtime.CPU_CHUNK_BYTES = 1 << 62
        try:
            return fn()
        finally:
            runtime.CPU_CHUNK_BYTES = saved
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="resnet50,mobilenet_v2,vgg16,demo")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--masks", type=int, default=256, help="RISE masks (forward passes only)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"# {machine()}; median of {args.repeat} interleaved runs", flush=True)
    header = ["net", "method", "rows per run", "rows per run, uncapped", "s per map", "s per map, uncapped",
              "speed-up", "max rel. difference"]
    rows = []
    for net in args.nets.split(","):
        ex = onnxsal.Explainer(onnx_path(net), "cpu", preprocess="raw")
        x = np.random.default_rng(0).random((1, 3) + ex.model.input.size, dtype=np.float32)
        rt = ex.engine.runtime
        for method, opts, n, graph in (("smoothgrad", {"n_samples": args.samples, "seed": 0}, args.samples, "vjp:"),
                                       ("ig", {"steps": args.steps}, args.steps, "vjp:"),
                                       ("rise", {"n_masks": args.masks}, args.masks, "expose:")):
            def capped(method=method, opts=opts):
                return ex.explain(x, method, target=0, **opts).raw
            a, b = capped(), uncapped(capped)()
            t_cap, t_unc = timeit_side_by_side([capped, uncapped(capped)], args.repeat)
            sess = next(s for k, s in rt._sessions.items() if k.startswith(graph))
            per = rt.batch_size(sess)
            whole = uncapped(lambda: rt.batch_size(sess))()
            diff = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
            rows.append([net, f"{method} ({n})", runtime.equal_chunks(n, per), runtime.equal_chunks(n, whole),
                         t_cap, t_unc, t_unc / t_cap, diff])
            print(table(header, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(header, rows))


if __name__ == "__main__":
    main()
