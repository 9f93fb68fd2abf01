"""One explanation from a cold start: a fresh process that loads the model and makes one map.

    .venv-bench/bin/python benchmarks/bench_cold.py [--nets resnet50,vgg16] [--repeat 3]

This is what `onnxsal explain model.onnx image.png` costs, and what a script costs that builds a
torchvision network from saved weights and calls pytorch-grad-cam or Captum once. Each run is a
new Python process; the contenders alternate run by run and the table gives medians of: imports,
model load (torch: build the network and load its state dict; onnxsal: read, check and describe
the ONNX file), the first map (onnxsal builds its derived graphs and sessions here), and the
whole process's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from common import CACHE, machine, onnx_path, table, torch_net

ONNXSAL = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, onnxsal
t1 = time.perf_counter()
ex = onnxsal.Explainer(sys.argv[1], "cpu", preprocess="raw")
t2 = time.perf_counter()
x = np.load(sys.argv[2])
ex.explain(x, sys.argv[3], target=int(sys.argv[4]))
t3 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2]))
"""

TORCH = """
import json, sys, time
t0 = time.perf_counter()
import numpy as np, torch, torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from captum.attr import Saliency
t1 = time.perf_counter()
torch.set_num_threads(int(sys.argv[5]))
net = getattr(torchvision.models, sys.argv[1])(weights=None).eval()
net.load_state_dict(torch.load(sys.argv[6]))
t2 = time.perf_counter()
x = torch.tensor(np.load(sys.argv[2]))
target = int(sys.argv[4])
if sys.argv[3] == "gradcam":
    layer = net.layer4[-1] if hasattr(net, "layer4") else net.features[-1]
    GradCAM(model=net, target_layers=[layer])(input_tensor=x, targets=[ClassifierOutputTarget(target)])
else:
    Saliency(net).attribute(x, target=target, abs=True)
t3 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1, t3 - t2]))
"""


def run(code: str, args: list[str]) -> list[float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    phases = json.loads(out.stdout.strip().splitlines()[-1])
    return phases + [time.perf_counter() - t]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="resnet50,vgg16")
    ap.add_argument("--methods", default="gradcam,saliency")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch

    threads = os.cpu_count() or 1
    print(f"# {machine()}; torch {torch.__version__}; median of {args.repeat} fresh processes each", flush=True)
    rows = []
    for net_name in args.nets.split(","):
        path = onnx_path(net_name)
        weights = os.path.join(CACHE, f"{net_name}.pt")
        net = torch_net(net_name)                      # the same weights the ONNX file was exported with
        if not os.path.exists(weights):
            torch.save(net.state_dict(), weights)
        x = np.random.default_rng(0).normal(size=(1, 3, 224, 224)).astype(np.float32)
        xpath = os.path.join(CACHE, "cold_input.npy")
        np.save(xpath, x)
        with torch.no_grad():
            target = int(net(torch.tensor(x)).argmax())
        for method in args.methods.split(","):
            ref = "pytorch-grad-cam" if method == "gradcam" else "Captum"
            ours, theirs = [], []
            for _ in range(args.repeat):
                ours.append(run(ONNXSAL, [path, xpath, method, str(target)]))
                theirs.append(run(TORCH, [net_name, xpath, method, str(target), str(threads), weights]))
            for who, runs in ((ref, theirs), ("onnxsal", ours)):
                med = [statistics.median(r[i] for r in runs) for i in range(4)]
                rows.append([net_name, method, who] + med)
            rows[-1].append(rows[-2][-1] / rows[-1][-1])
            rows[-2].append("")
            print("\n".join(table(HEADER, rows[-2:]).splitlines()[-2:]), flush=True)
    print()
    print(table(HEADER, rows))


HEADER = ["net", "method", "library", "imports s", "load s", "first map s", "process s", "speed-up"]


if __name__ == "__main__":
    main()
