#!/usr/bin/env python
"""Build the bundled demo model ``models/demo/demo_shapes.onnx``.

The script is self-contained and seeded; it runs on the CPU in one to two
minutes.  It

1. generates a synthetic image classification set whose class-deciding region
   is known: one filled target shape per image (``circle``, ``square``,
   ``triangle`` or ``cross``) drawn on a textured background with one to three
   thin distractors (lines, zigzags, dot clusters, open arcs) that cannot be
   mistaken for a class shape, together with a binary mask of the target;
2. trains a small CNN (four 3x3 conv blocks, global average pooling, linear
   classifier) on 64x64 images with the "imagenet" preprocessing;
3. exports it to ONNX (opset 17, dynamic batch axis, softmax as the last
   node, batch norm folded into the convolutions), checks it with
   ``onnx.checker`` and against PyTorch with ONNX Runtime;
4. stores the preprocessing, labels and provenance as metadata_props;
5. writes twelve held-out 128x128 images (three per class) with their masks.

Usage::

    .venv/bin/python models/make_demo.py                     # default build
    .venv/bin/python models/make_demo.py --permute-labels    # randomised-label twin

The generator can be imported (``make_sample``, ``make_dataset``,
``preprocess``) so that tests can regenerate data with ground-truth masks.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABELS = ["circle", "square", "triangle", "cross"]
MODEL_SIZE = 64  # model input height and width
HELDOUT_SIZE = 128  # held-out images are drawn larger than the model input
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = 1.0 / 255.0

PREPROCESS = {
    "preset": "imagenet",
    "layout": "NCHW",
    "size": [MODEL_SIZE, MODEL_SIZE],
    "color": "RGB",
    "scale": SCALE,
    "mean": list(MEAN),
    "std": list(STD),
}

DEFAULT_OUT = Path(__file__).resolve().parent / "demo"


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background, float32 HxWx3 in 0..255.

    Smooth colour noise, optionally overlaid with stripes and a linear
    gradient.  All spatial frequencies are defined relative to a 64 px frame
    so that a background drawn at 128 px looks like an upscaled 64 px one.
    """
    k = size / 64.0
    base = rng.uniform(40, 215, 3)
    grid = int(rng.integers(3, 9))
    noise = base + rng.normal(0, 1, (grid, grid, 3)) * rng.uniform(15, 40)
    small = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
    img = np.asarray(small.resize((size, size), Image.BICUBIC), np.float32).copy()

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / k  # 64-px units
    if rng.random() < 0.5:  # stripes
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(5, 14)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction) + 1e-6
        img += wave[..., None] * direction * rng.uniform(10, 30)
    if rng.random() < 0.5:  # gradient
        theta = rng.uniform(0, 2 * math.pi)
        ramp = ((xx - 32) * math.cos(theta) + (yy - 32) * math.sin(theta)) / 45.0
        img += ramp[..., None] * rng.uniform(-45, 45, 3)
    return img


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _shape_outline(label: int, r: float, angle: float) -> np.ndarray | None:
    """Polygon vertices (relative to the centre) or None for the circle."""
    if label == 0:
        return None
    if label == 1:  # square, half side 0.85 r
        h = 0.85 * r
        pts = np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    elif label == 2:  # equilateral triangle, circumradius 1.1 r
        R = 1.1 * r
        a = np.deg2rad([-90.0, 30.0, 150.0])
        pts = np.stack([R * np.cos(a), R * np.sin(a)], 1)
        pts[:, 1] += 0.25 * R  # centre the bounding box vertically
    else:  # plus-shaped cross, arms of half length r and half width 0.33 r
        a, t = r, 0.33 * r
        pts = np.array([[-t, -a], [t, -a], [t, -t], [a, -t], [a, t], [t, t],
                        [t, a], [-t, a], [-t, t], [-a, t], [-a, -t], [-t, -t]])
    return _rotate(pts, angle)


def _draw_distractor(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int,
                     colour: tuple) -> None:
    """One thin distractor: never a filled, closed shape of target size."""
    k = size / 64.0
    kind = int(rng.integers(4))
    width = max(1, int(round(k * rng.choice([1, 1, 2]))))
    if kind == 0:  # straight line
        p = rng.uniform(0, size, 2)
        length = rng.uniform(12, 40) * k
        a = rng.uniform(0, 2 * math.pi)
        q = p + length * np.array([math.cos(a), math.sin(a)])
        draw.line([tuple(p), tuple(q)], fill=colour, width=width)
    elif kind == 1:  # open zigzag
        p = rng.uniform(0, size, 2)
        a = rng.uniform(0, 2 * math.pi)
        pts = [tuple(p)]
        for i in range(int(rng.integers(3, 6))):
            step = rng.uniform(4, 8) * k
            turn = a + (1 if i % 2 else -1) * rng.uniform(0.6, 1.1)
            p = p + step * np.array([math.cos(turn), math.sin(turn)])
            pts.append(tuple(p))
        draw.line(pts, fill=colour, width=width)
    elif kind == 2:  # cluster of small dots
        c = rng.uniform(4, 60, 2) * k
        for _ in range(int(rng.integers(2, 6))):
            p = c + rng.normal(0, 5, 2) * k
            rad = rng.uniform(0.8, 1.8) * k
            draw.ellipse([p[0] - rad, p[1] - rad, p[0] + rad, p[1] + rad], fill=colour)
    else:  # open arc
        c = rng.uniform(0, 64, 2) * k
        rad = rng.uniform(5, 12) * k
        start = rng.uniform(0, 360)
        span = rng.uniform(60, 200)
        draw.arc([c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad], start, start + span,
                 fill=colour, width=width)


def make_sample(rng: np.random.Generator, size: int = MODEL_SIZE, label: int | None = None):
    """Draw one image.

    Returns ``(image, mask, label)``: ``image`` uint8 HxWx3 RGB, ``mask`` bool
    HxW (True on the target shape, the only region that decides the class) and
    ``label`` an index into ``LABELS``.  Geometry is defined on a 64 px frame
    and scaled by ``size / 64``.
    """
    k = size / 64.0
    if label is None:
        label = int(rng.integers(len(LABELS)))
    bg = _background(rng, size)

    # Target geometry: extent ~14-26 px on the 64 px frame, fully inside.
    extent = rng.uniform(14, 26)
    r = extent / 2 * k
    angle = 0.0 if label == 0 else rng.uniform(-25, 25) * math.pi / 180
    outline = _shape_outline(label, r, angle)
    if outline is None:
        lo, hi = np.array([-r, -r]), np.array([r, r])
    else:
        lo, hi = outline.min(0), outline.max(0)
    margin = 1.0 * k
    centre = np.array([rng.uniform(margin - lo[i], size - 1 - margin - hi[i]) for i in range(2)])

    mask_img = Image.new("L", (size, size), 0)
    mdraw = ImageDraw.Draw(mask_img)
    if outline is None:
        box = [centre[0] - r, centre[1] - r, centre[0] + r, centre[1] + r]
        mdraw.ellipse(box, fill=255)
    else:
        poly = [tuple(p) for p in outline + centre]
        mdraw.polygon(poly, fill=255)
    mask = np.asarray(mask_img) > 0

    # Target colour: far from the background under the shape.
    under = bg[mask].mean(0)
    for _ in range(100):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - under) > 110:
            break
    else:
        colour = np.where(under > 127, 20.0, 235.0)
    colour = tuple(int(c) for c in colour)

    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        dcol = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_distractor(draw, rng, size, dcol)
    if outline is None:
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon(poly, fill=colour)

    arr = np.asarray(img, np.float32)
    arr = arr + rng.normal(0, rng.uniform(2, 8), arr.shape)
    image = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    return image, mask, label


def make_dataset(n: int, size: int = MODEL_SIZE, seed: int = 0, draw_size: int | None = None):
    """``n`` samples with balanced, shuffled labels.

    Returns ``(images uint8 NxHxWx3, masks bool NxHxW, labels int64 N)``.
    With ``draw_size`` (e.g. 128) the samples are drawn at that size and
    resized to ``size`` (image: bilinear; mask: bilinear then > 0.5), the path
    a larger photo takes before it reaches the model.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(LABELS))
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), bool)
    draw = draw_size or size
    for i, lab in enumerate(labels):
        image, mask, _ = make_sample(rng, draw, int(lab))
        if draw != size:
            image = resize_image(image, size)
            m = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BILINEAR)
            mask = np.asarray(m) > 0.5
        images[i], masks[i] = image, mask
    return images, masks, labels.astype(np.int64)


def resize_image(image: np.ndarray, size: int = MODEL_SIZE) -> np.ndarray:
    """Bilinear resize of a uint8 HxWx3 image (Pillow)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 NxHxWx3 RGB -> float32 NCHW with the "imagenet" preset."""
    x = images.astype(np.float32) * np.float32(SCALE)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------
# Model, training, export
# ---------------------------------------------------------------------------

def build_model():
    """The classifier (returns logits).  Layers are named so that the exported
    graph reads ``/conv4/Conv``, ``/relu4/Relu``, ``/gap/GlobalAveragePool``..."""
    from collections import OrderedDict

    import torch.nn as nn

    layers = []
    for i, (cin, cout, pool) in enumerate([(3, 16, True), (16, 32, True), (32, 64, False),
                                           (64, 64, False)], start=1):
        layers += [(f"conv{i}", nn.Conv2d(cin, cout, 3, padding=1, bias=False)),
                   (f"bn{i}", nn.BatchNorm2d(cout)),
                   (f"relu{i}", nn.ReLU())]
        if pool:
            layers.append((f"pool{i}", nn.MaxPool2d(2)))  # 64 -> 32 -> 16
    layers += [("gap", nn.AdaptiveAvgPool2d(1)),  # last conv block: 64 x 16 x 16
               ("flatten", nn.Flatten(1)),
               ("fc", nn.Linear(64, len(LABELS)))]
    return nn.Sequential(OrderedDict(layers))


def _with_softmax(model):
    """The exported network: the classifier followed by a final Softmax."""
    from collections import OrderedDict

    import torch.nn as nn

    return nn.Sequential(OrderedDict(list(model.named_children()) + [("softmax", nn.Softmax(dim=1))]))


def _accuracy(model, x, y, batch=256):
    import torch
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def train(images, labels, val_images, val_labels, epochs, seed, batch=64, lr=3e-3, log=print):
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = build_model()
    x = torch.from_numpy(preprocess(images))
    y = torch.from_numpy(labels)
    xv = torch.from_numpy(preprocess(val_images))
    yv = torch.from_numpy(val_labels)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # mirror: labels are flip-invariant
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        acc = _accuracy(model, xv, yv)
        log(f"  epoch {epoch + 1}/{epochs}: train loss {total / len(x):.4f}, held-out accuracy {acc:.4f}")
    model.eval()
    return model, acc


def export_onnx(model, path: Path, metadata: dict, log=print):
    import onnx
    import onnxruntime as ort
    import torch

    wrapped = _with_softmax(model).eval()
    dummy = torch.zeros(2, 3, MODEL_SIZE, MODEL_SIZE)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is intended
        torch.onnx.export(
            wrapped, (dummy,), str(path),
            dynamo=False, opset_version=17, do_constant_folding=True,
            input_names=["image"], output_names=["probabilities"],
            dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}},
        )
    proto = onnx.load(str(path))
    # Folded conv weights come out as "onnx::Conv_NN": name them after their
    # layer (only initializers read by that one node).
    uses = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    inits = {init.name: init for init in proto.graph.initializer}
    renames = {}
    for node in proto.graph.node:
        if node.op_type != "Conv":
            continue
        layer = node.name.strip("/").split("/")[0]
        for j, suffix in ((1, "weight"), (2, "bias")):
            old = node.input[j] if j < len(node.input) else ""
            new = f"{layer}.{suffix}"
            if old in inits and uses[old] == 1 and new not in inits:
                renames[old] = new
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for j, name in enumerate(node.input):
            node.input[j] = renames.get(name, name)
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))

    # ONNX Runtime vs PyTorch on fresh data.
    imgs, _, _ = make_dataset(32, MODEL_SIZE, seed=12345)
    x = preprocess(imgs)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], {"image": x})[0]
    with torch.no_grad():
        ref = wrapped(torch.from_numpy(x)).numpy()
        ref_logits = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - ref).max())
    log(f"  ORT vs torch max |diff| on probabilities: {diff:.2e}")
    if diff >= 1e-4:
        raise SystemExit(f"ONNX Runtime output differs from PyTorch ({diff:.2e} >= 1e-4)")
    return sess, ref_logits


def _predict(sess, images_uint8):
    return sess.run(["probabilities"], {"image": preprocess(images_uint8)})[0]


def _box_half(image):
    """2x2 average (bilinear resize without antialiasing, half-pixel centres)."""
    h, w = image.shape[:2]
    x = image.astype(np.float32).reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def write_heldout(sess, out: Path, seed: int, per_class: int = 3, log=print):
    """Draw 128 px held-out images; keep those the model classifies correctly
    after a bilinear resize to 64 px (and a plain 2x2 average)."""
    img_dir, mask_dir = out / "images", out / "masks"
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for d in (img_dir, mask_dir):
        for f in d.glob("*.png"):
            f.unlink()
    rng = np.random.default_rng(seed)
    n = per_class * len(LABELS)
    tried = rejected = 0
    results = []
    for i in range(n):
        label = i % len(LABELS)
        while True:
            tried += 1
            image, mask, _ = make_sample(rng, HELDOUT_SIZE, label)
            p_bil = _predict(sess, resize_image(image)[None])[0]
            p_box = _predict(sess, _box_half(image)[None])[0]
            if p_bil.argmax() == label and p_box.argmax() == label:
                break
            rejected += 1
        name = f"{i:02d}_{LABELS[label]}.png"
        Image.fromarray(image).save(img_dir / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / name)
        results.append((name, float(p_bil[label])))
    log(f"  held-out: {n}/{n} correct after bilinear resize {HELDOUT_SIZE}->{MODEL_SIZE} "
        f"({tried} drawn, {rejected} redrawn)")
    for name, p in results:
        log(f"    {name:18s} p(true) = {p:.4f}")
    return tried, rejected


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default models/demo)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train", type=int, default=5000, help="number of training images")
    ap.add_argument("--val", type=int, default=1000, help="number of held-out validation images")
    ap.add_argument("--permute-labels", action="store_true",
                    help="train on randomly permuted labels (data randomisation sanity check); "
                         "writes demo_shapes_permuted.onnx and no images")
    args = ap.parse_args(argv)

    import torch

    t0 = time.time()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    n_big = args.train * 3 // 10
    log(f"generating {args.train} training images ({args.train - n_big} drawn at {MODEL_SIZE} px, "
        f"{n_big} drawn at {HELDOUT_SIZE} px and resized) and {args.val} validation images")
    tr_img, _, tr_lab = make_dataset(args.train - n_big, MODEL_SIZE, seed=args.seed * 1000 + 1)
    big_img, _, big_lab = make_dataset(n_big, MODEL_SIZE, seed=args.seed * 1000 + 5,
                                       draw_size=HELDOUT_SIZE)
    tr_img = np.concatenate([tr_img, big_img])
    tr_lab = np.concatenate([tr_lab, big_lab])
    va_img, _, va_lab = make_dataset(args.val, MODEL_SIZE, seed=args.seed * 1000 + 2)
    if args.permute_labels:
        tr_lab = np.random.default_rng(args.seed * 1000 + 3).permutation(tr_lab)
        log("training labels randomly permuted")

    log(f"training for {args.epochs} epochs")
    model, acc = train(tr_img, tr_lab, va_img, va_lab, args.epochs, args.seed, log=log)
    log(f"held-out validation accuracy: {acc:.4f} ({args.val} images drawn at {MODEL_SIZE} px)")
    n_big_val = args.val // 2
    vb_img, _, vb_lab = make_dataset(n_big_val, MODEL_SIZE, seed=args.seed * 1000 + 6,
                                     draw_size=HELDOUT_SIZE)
    acc_big = _accuracy(model, torch.from_numpy(preprocess(vb_img)), torch.from_numpy(vb_lab))
    log(f"held-out accuracy on images drawn at {HELDOUT_SIZE} px, resized to {MODEL_SIZE}: "
        f"{acc_big:.4f} ({n_big_val} images)")
    if not args.permute_labels and acc < 0.97:
        raise SystemExit(f"validation accuracy {acc:.4f} < 0.97")

    name = "demo_shapes_permuted.onnx" if args.permute_labels else "demo_shapes.onnx"
    path = args.out / name
    metadata = {
        "onnxsal.preprocess": json.dumps(PREPROCESS),
        "onnxsal.labels": json.dumps(LABELS),
        "onnxsal.source": json.dumps({"framework": "torch", "torch": torch.__version__,
                                      "script": "models/make_demo.py"}),
    }
    if args.permute_labels:
        metadata["onnxsal.note"] = json.dumps("trained on randomly permuted labels")
    log(f"exporting {path}")
    sess, _ = export_onnx(model, path, metadata, log=log)
    size = path.stat().st_size
    log(f"  {path.name}: {size} bytes")
    if size >= 2 * 1024 * 1024:
        raise SystemExit(f"{path} is {size} bytes (>= 2 MB)")

    if not args.permute_labels:
        write_heldout(sess, args.out, seed=args.seed * 1000 + 4, log=log)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
