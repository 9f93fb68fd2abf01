"""Networks whose layers torch.onnx's dynamo exporter writes as single ONNX ops that the gradient
graph takes apart, explained against torch.autograd:

* a GFNet-style network (global filter layers: rfft2, a learned complex weight per frequency,
  irfft2), whose torch.fft calls become DFT nodes (rule: onnxsal/graph/rules/spectral.py);
* a deformable-convolution network (torchvision's DeformConv2d with offset groups, a modulation
  mask and two weight groups), whose deform_conv2d becomes one DeformConv node (written out as
  GridSample and Conv in the gradient graph: onnxsal/graph/deform.py). The TorchScript exporter
  has no symbolic for it.

    .venv-bench/bin/python benchmarks/dynamo_ops_check.py

The test suite's environment has neither the dynamo exporter (onnxscript) nor torchvision; its
tests build the same nodes by hand and check them against finite differences of ONNX Runtime's
own kernels. Here the exporter writes them. For three seeds (weights and image) this prints, per
class, max |onnxsal - torch| / max |torch| of the saliency maps against torch.autograd in float64
on the same network.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnxsal  # noqa: E402


class GlobalFilter(nn.Module):
    def __init__(self, c: int, h: int, w: int):
        super().__init__()
        self.h, self.w = h, w
        self.weight = nn.Parameter(torch.randn(c, h, w // 2 + 1, 2) * 0.5)

    def forward(self, x):
        f = torch.fft.rfft2(x, dim=(2, 3), norm="ortho") * torch.view_as_complex(self.weight)
        return torch.fft.irfft2(f, s=(self.h, self.w), dim=(2, 3), norm="ortho")


class GFNetLike(nn.Module):
    """A patch embedding, two residual global-filter blocks with a pointwise MLP, a linear head."""

    def __init__(self, seed: int, classes: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.filters = nn.ModuleList(GlobalFilter(16, 8, 8) for _ in range(2))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Conv2d(16, 32, 1), nn.GELU(), nn.Conv2d(32, 16, 1)) for _ in range(2))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = self.embed(x)
        for f, mlp in zip(self.filters, self.mlps):
            h = h + f(h)
            h = h + mlp(h)
        return self.head(h.mean(dim=(2, 3)))


class DCNLike(nn.Module):
    """A stem, a convolution that predicts two offset groups' offsets and mask, a deformable
    convolution in two weight groups, a linear head."""

    def __init__(self, seed: int, classes: int = 5):
        from torchvision.ops import DeformConv2d

        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.predict = nn.Conv2d(8, 2 * 9 * 2 + 2 * 9, 3, padding=1)
        nn.init.normal_(self.predict.weight, std=0.3)        # offsets of a pixel or two, not ~0
        self.deform = DeformConv2d(8, 12, 3, padding=1, groups=2)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        p = self.predict(h)
        y = torch.relu(self.deform(h, p[:, :36], torch.sigmoid(p[:, 36:])))
        return self.head(y.mean(dim=(2, 3)))


NETS = {"GFNet-style (DFT)": GFNetLike, "deformable (DeformConv)": DCNLike}


def main() -> None:
    print("| network | seed | class | saliency error vs torch.autograd (float64) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for (name, build), seed in ((n, s) for n in NETS.items() for s in range(3)):
            net = build(seed).eval()
            path = os.path.join(tmp, f"net{seed}.onnx")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), path, input_names=["x"], output_names=["logits"],
                                  dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("n")}}, verbose=False)
            ex = onnxsal.Explainer(path, "cpu", preprocess="raw")
            x = np.random.default_rng(seed).standard_normal((1, 3, 32, 32)).astype(np.float32)
            ref = net.double()
            for c in range(5):
                xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
                ref(xt)[0, c].backward()
                want = np.abs(xt.grad.numpy()[0]).max(axis=0)
                got = ex.explain(x, "saliency", c).raw[0]
                print(f"| {name} | {seed} | {c} | {np.abs(got - want).max() / want.max():.2g} |", flush=True)


if __name__ == "__main__":
    main()
