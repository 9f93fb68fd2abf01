"""SmoothGrad, Integrated Gradients, GradientSHAP, Layer IG and DeepLIFT: onnxsal (ONNX Runtime) against Captum.

    .venv-bench/bin/python benchmarks/bench_captum.py [--net resnet50] [--samples 20] [--steps 50]

Both sides get the same image, target and settings; SmoothGrad's and GradientSHAP's agreement is
measured with identical random draws (Captum's Saliency at onnxsal's points), IG is deterministic
on both sides.
Goal: onnxsal >= 2x faster, Pearson >= 0.99.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from common import machine, onnx_path, pearson, table, timeit_side_by_side, torch_net

import onnxsal
from onnxsal.context import Context
from onnxsal.engine import make_targets
from onnxsal.methods.gradients import smoothgrad_attr


def test_image(size: int) -> np.ndarray:
    """A deterministic, structured image (smooth blobs), preprocessed as ImageNet would be."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((3, size, size), np.float32)
    for _ in range(6):
        cy, cx, r = rng.random(3)
        img += (np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r)) * rng.normal(1, 0.5, (3, 1, 1))).astype(np.float32)
    return img[None]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--deeplift-net", default="vgg16")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"# {machine()}; torch {torch.__version__}; {args.net} {args.size}x{args.size}; median of {args.repeat} interleaved runs", flush=True)

    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    net = torch_net(args.net)
    ex = onnxsal.Explainer(onnx_path(args.net, args.size), "cpu", preprocess="raw")
    x = test_image(args.size)
    xt = torch.tensor(x)
    target = int(net(xt).argmax())
    level = 0.15
    sigma = level * float(x.max() - x.min())
    rows = []

    # SmoothGrad
    def captum_sg():
        return NoiseTunnel(Saliency(net)).attribute(xt, nt_type="smoothgrad", nt_samples=args.samples, stdevs=sigma,
                                                    target=target, abs=False)

    def onnxsal_sg():
        return ex.explain(x, "smoothgrad", target=target, n_samples=args.samples, noise_level=level)

    t_c, t_o = timeit_side_by_side([captum_sg, onnxsal_sg], args.repeat)
    noise = np.random.default_rng(1).normal(0, sigma, (args.samples,) + x.shape[1:]).astype(np.float32)
    ctx = Context(ex.engine, x, make_targets(ex.model, [target]), None)
    ours = smoothgrad_attr(ctx, args.samples, level, None, noise=noise)[0]
    ref = Saliency(net).attribute(torch.tensor(x + noise), target=target, abs=False).detach().numpy().mean(axis=0)
    rows.append([f"SmoothGrad ({args.samples} samples)", t_c, t_o, t_c / t_o, pearson(ours, ref),
                 pearson(np.abs(ours).max(axis=0), np.abs(ref).max(axis=0))])

    # Integrated Gradients
    def captum_ig():
        return IntegratedGradients(net).attribute(xt, target=target, n_steps=args.steps, method="gausslegendre")

    def onnxsal_ig():
        return ex.explain(x, "ig", target=target, steps=args.steps)

    t_c, t_o = timeit_side_by_side([captum_ig, onnxsal_ig], args.repeat)
    ref = captum_ig().detach().numpy()[0]
    from onnxsal.methods.gradients import ig_attr

    ours = ig_attr(ctx, args.steps, "zero", "gausslegendre", 5.0)[0]
    rows.append([f"Integrated Gradients ({args.steps} steps)", t_c, t_o, t_c / t_o, pearson(ours, ref),
                 pearson(ours.sum(axis=0), ref.sum(axis=0))])

    # GradientSHAP: baselines zero and blurred input, SmoothGrad-style noise on the input
    from captum.attr import GradientShap
    from onnxsal.methods.gradients import baselines_for, gradientshap_attr

    bases = baselines_for(ctx, "zero,blur", 5.0)

    def captum_gs():
        return GradientShap(net).attribute(xt, baselines=torch.tensor(bases), n_samples=args.samples,
                                           stdevs=sigma, target=target)

    def onnxsal_gs():
        return ex.explain(x, "gradientshap", target=target, n_samples=args.samples, noise_level=level,
                          baseline="zero,blur")

    t_c, t_o = timeit_side_by_side([captum_gs, onnxsal_gs], args.repeat)
    rng = np.random.default_rng(2)
    draws = (rng.normal(0, sigma, (args.samples,) + x.shape[1:]).astype(np.float32),
             rng.integers(0, len(bases), args.samples), rng.random(args.samples))
    ours = gradientshap_attr(ctx, args.samples, level, bases, 5.0, None, draws=draws)[0]
    xn = x + draws[0]
    b = bases[draws[1]]
    points = b + draws[2].astype(np.float32)[:, None, None, None] * (xn - b)
    g = Saliency(net).attribute(torch.tensor(points), target=target, abs=False).detach().numpy()
    ref = (g * (xn - b)).mean(axis=0)
    rows.append([f"GradientSHAP ({args.samples} samples)", t_c, t_o, t_c / t_o, pearson(ours, ref),
                 pearson(ours.sum(axis=0), ref.sum(axis=0))])

    # Layer IG at the last block (onnxsal's default layer there), zero baseline
    from captum.attr import LayerIntegratedGradients

    block = net.layer4[-1] if hasattr(net, "layer4") else net.features[-1]

    def captum_lig():
        return LayerIntegratedGradients(net, block).attribute(xt, target=target, n_steps=args.steps,
                                                              method="gausslegendre")

    def onnxsal_lig():
        return ex.explain(x, "layerig", target=target, steps=args.steps)

    t_c, t_o = timeit_side_by_side([captum_lig, onnxsal_lig], args.repeat)
    ref = captum_lig().detach().numpy()[0]
    ours = onnxsal_lig()
    from onnxsal.methods.layer import layer_ig_attr

    lig_ctx = Context(ex.engine, x, make_targets(ex.model, [target]), ex.model.default_layer)
    attr = layer_ig_attr(lig_ctx, args.steps, "zero", "gausslegendre", 5.0)[0]
    rows.append([f"Layer IG ({args.steps} steps, last block)", t_c, t_o, t_c / t_o, pearson(attr, ref),
                 pearson(ours.raw[0], ref.sum(axis=0))])

    # DeepLIFT against a zero baseline (one input + baseline pair through the rule-swapped VJP).
    # Captum's hooks need every ReLU module used once and not in place: torchvision's ResNet reuses
    # one ReLU per block, so this row runs on --deeplift-net (VGG16) with in-place ReLUs turned off.
    from captum.attr import DeepLift
    from onnxsal.methods.gradients import deeplift_attr

    dl_net = torch_net(args.deeplift_net)
    for mod in dl_net.modules():
        if isinstance(mod, torch.nn.ReLU):
            mod.inplace = False
    dl_ex = onnxsal.Explainer(onnx_path(args.deeplift_net, args.size), "cpu", preprocess="raw")
    dl_target = int(dl_net(xt).argmax())
    zeros = torch.zeros_like(xt)

    def captum_dl():
        return DeepLift(dl_net).attribute(xt, baselines=zeros, target=dl_target)

    def onnxsal_dl():
        return dl_ex.explain(x, "deeplift", target=dl_target)

    t_c, t_o = timeit_side_by_side([captum_dl, onnxsal_dl], args.repeat)
    ref = captum_dl().detach().numpy()[0]
    dl_ctx = Context(dl_ex.engine, x, make_targets(dl_ex.model, [dl_target]), None)
    ours = deeplift_attr(dl_ctx, "zero", 5.0)[0]
    rows.append([f"DeepLIFT ({args.deeplift_net}, zero baseline)", t_c, t_o, t_c / t_o, pearson(ours, ref),
                 pearson(ours.sum(axis=0), ref.sum(axis=0))])
    print(table(["method", "Captum s", "onnxsal s", "speed-up", "Pearson (attr)", "Pearson (map)"], rows))


if __name__ == "__main__":
    main()
