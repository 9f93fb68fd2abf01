"""CAM methods: onnxsal (ONNX Runtime) against pytorch-grad-cam (PyTorch), same network and layer.

    .venv-bench/bin/python benchmarks/bench_cam.py [--net resnet50] [--scorecam-net mobilenet_v2] [--two-layers]

The gradient CAMs (Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Grad-CAM element-wise,
EigenGrad-CAM, Finer-CAM, ShapleyCAM with its ReST target) and the gradient-free Eigen-CAM, FEM and KPCA-CAM run on `--net` at its last block, FullGrad on all
of `--net`'s biased convolutions and batch norms; Score-CAM and Ablation-CAM (one forward pass
per channel) run on the smaller `--scorecam-net`. Prints seconds per map,
speed-up and the Pearson correlation of the two maps.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench_captum import test_image
from common import machine, onnx_path, pearson, table, timeit_side_by_side, torch_net

import onnxsal


def last_block(net):
    if hasattr(net, "layer4"):
        return net.layer4[-1]
    return net.features[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="resnet50")
    ap.add_argument("--scorecam-net", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--ablation-ratio", type=float, default=1.0, help="Ablation-CAM's ratio_channels_to_ablate")
    ap.add_argument("--two-layers", action="store_true", help="also Grad-CAM and LayerCAM over the last two stages "
                    "(pytorch-grad-cam's target_layers=[layer3[-1], layer4[-1]]; ResNets)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    from pytorch_grad_cam import (FEM, AblationCAM, EigenCAM, EigenGradCAM, FinerCAM, FullGrad, GradCAM, GradCAMElementWise,
                                  GradCAMPlusPlus, HiResCAM, KPCA_CAM, LayerCAM, ScoreCAM, ShapleyCAM, XGradCAM)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    print(f"# {machine()}; torch {torch.__version__}; median of {args.repeat} interleaved runs", flush=True)
    rows = []
    x = test_image(args.size)
    plan = [(args.net, "gradcam", GradCAM), (args.net, "gradcam++", GradCAMPlusPlus), (args.net, "xgradcam", XGradCAM),
            (args.net, "layercam", LayerCAM), (args.net, "hirescam", HiResCAM),
            (args.net, "gradcamelementwise", GradCAMElementWise), (args.net, "eigencam", EigenCAM),
            (args.net, "eigengradcam", EigenGradCAM), (args.net, "fem", FEM), (args.net, "kpcacam", KPCA_CAM),
            (args.net, "finercam", FinerCAM), (args.net, "shapleycam", ShapleyCAM), (args.net, "fullgrad", FullGrad),
            (args.scorecam_net, "scorecam", ScoreCAM), (args.scorecam_net, "ablationcam", AblationCAM)]
    if args.methods:
        plan = [p for p in plan if p[1] in args.methods.split(",")]
    cache = {}
    for name, method, cls in plan:
        if name not in cache:
            cache[name] = (torch_net(name), onnxsal.Explainer(onnx_path(name, args.size), "cpu", preprocess="raw"))
        net, ex = cache[name]
        xt = torch.tensor(x)
        target = int(net(xt).argmax())
        # FullGrad takes every biased conv and batch norm instead of a target layer
        extra = {"ratio_channels_to_ablate": args.ablation_ratio} if method == "ablationcam" else {}
        cam = cls(model=net, target_layers=[] if method == "fullgrad" else [last_block(net)], **extra)
        targets = [ClassifierOutputReST(target) if method == "shapleycam" else ClassifierOutputTarget(target)]
        slow = method in ("scorecam", "ablationcam")     # one masked or ablated pass per channel
        repeat = 1 if slow else args.repeat
        ex.explain(x, method, target=target, **extra)  # ONNX Runtime sessions are built once, outside the timing
        if method == "finercam":     # it builds its own target around the main class
            reference = lambda: cam(input_tensor=xt, target_idx=target)  # noqa: E731
        else:
            reference = lambda: cam(input_tensor=xt, targets=targets)  # noqa: E731
        t_ref, t_ours = timeit_side_by_side([reference, lambda: ex.explain(x, method, target=target, **extra)],
                                            repeat, warmup=0 if slow else 1)
        ref = reference()[0]
        ours = ex.explain(x, method, target=target, **extra).map
        where = "all bias layers" if method == "fullgrad" else f"{ex.model.default_layer.shape[0]} ch"
        rows.append([f"{method} ({name}, {where})", t_ref, t_ours, t_ref / t_ours, pearson(ours, ref)])
        print(rows[-1], flush=True)
        getattr(cam, "base_cam", cam).activations_and_grads.release()     # FinerCAM wraps a Grad-CAM
    if args.two_layers:
        rows += two_layer_rows(args, x, cache, {"gradcam": GradCAM, "layercam": LayerCAM}, ClassifierOutputTarget)
    print(table(["method", "pytorch-grad-cam s", "onnxsal s", "speed-up", "Pearson"], rows))


def stage_output(ex, stage: str) -> str:
    """The ONNX tensor of a ResNet stage's last block output (torch.onnx names it <stage>.<i>/relu_2)."""
    return [la.tensor for la in ex.model.layers if la.tensor.startswith(f"/{stage}/") and
            la.tensor.endswith("relu_2/Relu_output_0")][-1]


def two_layer_rows(args, x, cache, classes: dict, target_cls) -> list:
    """A CAM averaged over two target layers, on both sides; also the largest difference of the maps."""
    import numpy as np

    if args.net not in cache:
        cache[args.net] = (torch_net(args.net), onnxsal.Explainer(onnx_path(args.net, args.size), "cpu",
                                                                     preprocess="raw"))
    net, ex = cache[args.net]
    xt = torch.tensor(x)
    target = int(net(xt).argmax())
    layers = [stage_output(ex, "layer3"), stage_output(ex, "layer4")]
    rows = []
    for method, cls in classes.items():
        cam = cls(model=net, target_layers=[net.layer3[-1], net.layer4[-1]])
        reference = lambda: cam(input_tensor=xt, targets=[target_cls(target)])  # noqa: E731
        ours = lambda: ex.explain(x, method, target=target, layer=layers)  # noqa: E731
        ours()
        t_ref, t_ours = timeit_side_by_side([reference, ours], args.repeat, warmup=1)
        ref, got = reference()[0], ours().map
        rows.append([f"{method} (layer3 + layer4)", t_ref, t_ours, t_ref / t_ours, pearson(got, ref)])
        print(rows[-1], f"max |difference| {float(np.abs(got - ref).max()):.2e}", flush=True)
        cam.activations_and_grads.release()
    return rows


if __name__ == "__main__":
    main()
