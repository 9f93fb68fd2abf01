"""Seconds per map on models exported at a fixed batch of 1, batched as onnxsal now runs them and
one row per run as they ran before their batch could be freed.

    .venv-bench/bin/python benchmarks/bench_static_batch.py [--nets vit_b_16,swin_t,convnext_tiny,resnet18]
    .venv-bench/bin/python benchmarks/bench_static_batch.py --torchscript --nets vit_b_16,swin_t

Each torchvision network (random weights) is exported the way ``torch.onnx.export(net, (x,),
opset_version=23)`` writes it by default: the dynamo exporter at batch 1 without
``dynamic_shapes``. Its ``Reshape`` targets carry that batch (``allowzero=1``), ViT-B/16 runs
attention with the batch merged into the heads, and ConvNeXt reads its pooled features back
from a flattened batch. onnxsal traces the batch through these (`onnxsal/graph/batch_axis.py`)
and runs many rows per run; before, the first run of several rows failed and every later run
took one row. ``batch_size=1`` reproduces that. Both settings run the same model, alternating,
so each pair sees the same machine load; the maps agree to float rounding (checked here too).

``--torchscript`` exports with the TorchScript exporter instead (``dynamo=False``, opset 17), whose
ViT and Swin build reshape targets and window paddings from ``Shape`` at run time; they ran one
row per run until the trace read those shape values from one run of the file.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

import zoo_check
from common import machine, table, timeit_side_by_side

import onnxsal


def static_export(name: str, dynamo: bool = True) -> str:
    zoo_check.STATIC, zoo_check.OPSET = True, (23 if dynamo else None)
    size = zoo_check.torchvision_size(name)
    cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"zoo_{name}_{size}{'_dynamo' if dynamo else ''}.onnx")
    return zoo_check.export_once(zoo_check.torchvision_net(name), path, size, dynamo=dynamo)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="vit_b_16,swin_t,convnext_tiny,resnet18")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--masks", type=int, default=256, help="RISE masks (forward passes only)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--torchscript", action="store_true", help="the TorchScript exporter (dynamo=False)")
    args = ap.parse_args()
    print(f"# {machine()}; median of {args.repeat} interleaved runs", flush=True)
    header = ["net", "method", "s per map, batched", "s per map, one row per run", "speed-up", "max rel. difference"]
    rows = []
    for net in args.nets.split(","):
        path = static_export(net, dynamo=not args.torchscript)
        batched = onnxsal.Explainer(path, "cpu", preprocess="raw")
        one = onnxsal.Explainer(path, "cpu", preprocess="raw", batch_size=1)
        x = np.random.default_rng(0).random((1, 3) + batched.model.input.size, dtype=np.float32)
        for method, opts, n in (("smoothgrad", {"n_samples": args.samples, "seed": 0}, args.samples),
                                ("rise", {"n_masks": args.masks, "seed": 0}, args.masks)):
            def run(ex, method=method, opts=opts):
                return ex.explain(x, method, target=0, **opts)
            a, b = run(batched), run(one)
            assert not any("one row" in note for note in a.notes), a.notes
            t_batched, t_one = timeit_side_by_side([lambda: run(batched), lambda: run(one)], args.repeat)
            diff = float(np.abs(a.raw - b.raw).max() / max(np.abs(b.raw).max(), 1e-30))
            rows.append([net, f"{method} ({n})", t_batched, t_one, t_one / t_batched, diff])
            print(table(header, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(header, rows))


if __name__ == "__main__":
    main()
