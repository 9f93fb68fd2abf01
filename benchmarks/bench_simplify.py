"""What the graph simplifier buys plain forward passes: the model's own graph against onnxsal's
simplified one (Conv+BatchNorm folded, spelled-out hard activations fused into HardSigmoid).

    cd benchmarks && ../.venv-bench/bin/python bench_simplify.py [--nets ppocr_cls,ppocr_det,ppocr_rec]
        [--onnx path.onnx:HxW ...]

For each network: the forward pass's summed kernel time at batch 16, both graphs alternating in one
profile, then the wall time per map of the perturbation methods (one forward pass per mask, window
or channel) with the engine running either graph, alternating run by run, and the largest
difference between the two maps (in [0, 1]). A map whose raw values are as small as the logits'
float rounding (random weights on a random input, where occlusion changes nothing) is noise in
both graphs, and differs accordingly. ONNX Runtime folds BatchNorm into Conv itself, so the gain comes
from the fused hard activations; a network without them should read about 1.00.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from common import PPOCR, kernel_ms, machine, model_size, onnx_path, table

import onnxsal
from onnxsal.graph.simplify import simplify
from onnxsal.graph.surgery import expose
from onnxsal.graph.weights import attach


METHOD_HEADER = ["net", "method", "model's graph s", "simplified s", "speed-up", "largest raw value", "max map diff"]


def text_image() -> str:
    """A line of dark text on a light page, the kind of input PP-OCR's models are trained on (its
    [-1, 1] scaling is the "tf" preprocessing); the other networks' random weights do not mind."""
    import tempfile

    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (384, 96), (236, 232, 220))
    ImageDraw.Draw(page).text((16, 20), "onnxsal 42", fill=(20, 20, 30), font=ImageFont.load_default(size=52))
    path = os.path.join(tempfile.mkdtemp(), "text.png")
    page.save(path)
    return path


def nets(args) -> list[tuple[str, str, tuple]]:
    out = [(n, onnx_path(n), model_size(n)) for n in args.nets.split(",") if n]
    for spec in args.onnx:
        path, size = spec.rsplit(":", 1)
        out.append((os.path.basename(path), path, tuple(int(v) for v in size.split("x"))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default=",".join(PPOCR))
    ap.add_argument("--onnx", action="append", default=[], help="another model, as path.onnx:HxW")
    ap.add_argument("--methods", default="scorecam,rise,occlusion")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    threads = args.threads or os.cpu_count()
    print(f"# {machine()}; {threads} threads; median of {args.repeat} runs", flush=True)
    fwd_rows, method_rows = [], []
    image = text_image()
    for name, path, size in nets(args):
        raw = onnxsal.Explainer(path, size=size, preprocess="tf", threads=threads)
        fused = onnxsal.Explainer(path, size=size, preprocess="tf", threads=threads)
        raw.engine.simplify = False
        m = raw.model
        graph = attach(expose(m.proto, [m.logits]))
        c = m.input.channels
        shape = (16, c) + m.input.size if m.input.layout == "NCHW" else (16,) + m.input.size + (c,)
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        k_raw, k_fused = kernel_ms([(graph, {m.input.name: x}), (simplify(graph), {m.input.name: x})], threads, runs=10)
        fwd_rows.append([name, 16, k_raw, k_fused, k_raw / k_fused])
        print(table(["net", "batch", "model's graph kernels ms", "simplified kernels ms", "speed-up"],
                    [fwd_rows[-1]]).splitlines()[-1], flush=True)
        for method in args.methods.split(","):
            runs = {"raw": [], "fused": []}
            maps = {}
            for ex in (raw, fused):                  # build the sessions outside the timing
                ex.explain(image, method=method, target=0)
            for _ in range(args.repeat):
                for key, ex in (("raw", raw), ("fused", fused)):
                    t = time.perf_counter()
                    maps[key] = ex.explain(image, method=method, target=0)
                    runs[key].append(time.perf_counter() - t)
            a, b = statistics.median(runs["raw"]), statistics.median(runs["fused"])
            method_rows.append([name, method, a, b, a / b, float(np.abs(maps["raw"].raw).max()),
                                float(np.abs(maps["raw"].map - maps["fused"].map).max())])
            print(table(METHOD_HEADER,
                        [method_rows[-1]]).splitlines()[-1], flush=True)
    print()
    print(table(["net", "batch", "model's graph kernels ms", "simplified kernels ms", "speed-up"], fwd_rows))
    print()
    print(table(METHOD_HEADER, method_rows))


if __name__ == "__main__":
    main()
