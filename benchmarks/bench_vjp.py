"""Forward vs forward+VJP time of onnxsal's gradient graph, and of onnx-ad's reverse graph.

    .venv-bench/bin/python benchmarks/bench_vjp.py [--nets resnet50,vgg16,mobilenet_v2,demo] [--batches 1,16] [--kernel]

The gradient is taken w.r.t. the input image for one logit per sample (what saliency,
SmoothGrad and IG need). Goal: forward+VJP <= 2.5x forward at batch 16.

For the torchvision networks the same ratio is measured for PyTorch's own autograd (input
gradient only, parameters frozen), as a reference for what a mature reverse mode achieves on
the same network and machine. Forward and forward+VJP runs are interleaved (see
`timeit_side_by_side`), so each ratio sees the same machine load. ``--kernel`` adds the ratio
of ONNX Runtime's summed kernel times (see `common.kernel_ms`): on a small model the wall-time
ratio moves with thread-pool behaviour (each session's idle workers spin and take a core from
the other), the kernel ratio does not. onnx-ad's reverse graph joins the same alternation (and,
with ``--kernel``, the same profile), so all three see the same load.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import onnx
import onnxruntime as ort

from common import PPOCR, kernel_ms, machine, model_size, onnx_path, table, timeit_side_by_side, torch_net

from onnxsal.graph.autodiff import vjp
from onnxsal.graph.surgery import expose
from onnxsal.model import load


def session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_ad_graph(fwd: onnx.ModelProto, x: str, y: str, batch: int):
    """onnx-ad's reverse graph; it needs every shape declared, so the batch is fixed per graph."""
    from onnx import shape_inference
    from onnx_ad import reverse

    fixed = onnx.ModelProto.FromString(fwd.SerializeToString())
    for vi in list(fixed.graph.input) + list(fixed.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = batch
    del fixed.graph.value_info[:]
    return reverse(shape_inference.infer_shapes(fixed), inputs=[x], outputs=[y], layout="onnx")


def torch_ratio(net_name: str, x: np.ndarray, repeat: int) -> tuple[float, float]:
    """PyTorch forward (no grad) and forward + input-gradient times, interleaved, in seconds."""
    import torch

    net = torch_net(net_name)
    for p in net.parameters():
        p.requires_grad_(False)
    xt = torch.tensor(x)

    def forward():
        with torch.no_grad():
            net(xt)

    def forward_backward():
        xg = xt.clone().requires_grad_(True)
        net(xg)[:, 0].sum().backward()

    return tuple(timeit_side_by_side([forward, forward_backward], repeat))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="resnet50,vgg16,mobilenet_v2,demo")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-onnx-ad", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--kernel", action="store_true", help="also the ratio of summed kernel times")
    args = ap.parse_args()
    import os

    threads = args.threads or os.cpu_count()
    if not args.no_torch:
        import torch

        torch.set_num_threads(threads)
    rows = []
    header = HEADER[:5] + (KERNEL if args.kernel else []) + HEADER[5:7] + (["onnx-ad kernel ratio"] if args.kernel else []) + HEADER[7:]
    print(f"# {machine()}; {threads} threads; median of {args.repeat} runs", flush=True)
    for net in args.nets.split(","):
        m = load(onnx_path(net), size=model_size(net))
        x_name, y = m.input.name, m.logits
        fwd_model = expose(m.proto, [y])
        vjp_model = vjp(m.proto, y, [x_name])
        for b in (int(v) for v in args.batches.split(",")):
            # Sessions per batch size, closed before the kernel profile opens its own: VGG16's at
            # batch 16 (onnx-ad's above all) do not fit in memory twice over.
            fwd, bwd = session(fwd_model, threads), session(vjp_model, threads)
            ad = ad_model = None
            if not args.no_onnx_ad:
                try:
                    ad_model = onnx_ad_graph(fwd_model, x_name, y, b)
                    ad = session(ad_model, threads)
                except Exception as exc:  # report, keep going
                    ad = ad_model = None
                    print(f"onnx-ad failed on {net}: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            shape = (b, 3) + m.input.size if m.input.layout == "NCHW" else (b,) + m.input.size + (3,)
            x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
            seed = np.zeros_like(fwd.run([y], {x_name: x})[0])     # the logits' own shape (a detector's is a map)
            seed.reshape(b, -1)[:, 0] = 1
            contenders = [lambda: fwd.run(None, {x_name: x}), lambda: bwd.run(None, {x_name: x, f"grad_{y}": seed})]
            jobs = [(fwd_model, {x_name: x}), (vjp_model, {x_name: x, f"grad_{y}": seed})]
            if ad_model is not None:
                # onnx-ad's graph takes the seed with a trailing axis; it joins the same alternation
                ad_feeds = {x_name: x}
                for inp in ad.get_inputs():
                    if inp.name != x_name:
                        ad_feeds[inp.name] = seed[..., None]
                contenders.append(lambda: ad.run(None, ad_feeds))
                jobs.append((ad_model, ad_feeds))
            times = timeit_side_by_side(contenders, args.repeat)
            del contenders
            fwd = bwd = ad = None
            t_f, t_b = times[0], times[1]
            row = [net, b, t_f * 1e3, t_b * 1e3, t_b / t_f]
            kernels = []
            if args.kernel:
                runs = max(3, min(15, int(3.0 / max(t_b, 1e-3))))
                kernels = kernel_ms(jobs, threads, runs)
                row += [kernels[0], kernels[1], kernels[1] / kernels[0]]
            if ad_model is not None:
                row += [times[2] * 1e3, times[2] / t_f] + ([kernels[2] / kernels[0]] if args.kernel else [])
            else:
                row += ["-", "-"] + (["-"] if args.kernel else [])
            if not args.no_torch and net != "demo" and net not in PPOCR:
                t_tf, t_tb = torch_ratio(net, x, args.repeat)
                row += [t_tf * 1e3, t_tb * 1e3, t_tb / t_tf]
            else:
                row += ["-", "-", "-"]
            rows.append(row)
            print(table(header, [row]).splitlines()[-1], flush=True)
    print()
    print(table(header, rows))


HEADER = ["net", "batch", "forward ms", "fwd+VJP ms", "onnxsal ratio", "onnx-ad ms", "onnx-ad ratio",
          "torch fwd ms", "torch fwd+bwd ms", "torch ratio"]
KERNEL = ["fwd kernels ms", "fwd+VJP kernels ms", "kernel ratio"]


if __name__ == "__main__":
    main()
