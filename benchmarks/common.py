"""Shared pieces of the benchmark scripts: reference networks, ONNX export, timing, tables.

The networks are torchvision's (random init, with non-trivial batch-norm statistics so
activations do not vanish), exported once with torch.onnx into benchmarks/.cache/.
These scripts run in the benchmark environment (`make bench-env`), which has torchvision,
Captum and pytorch-grad-cam beside onnxsal.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
DEMO = os.path.join(HERE, "..", "models", "demo", "demo_shapes.onnx")
# Trained PaddlePaddle models (paddle2onnx) that the rapidocr-onnxruntime wheel ships, with the input
# size each runs at here: PP-OCR's text-angle classifier (a MobileNetV3), its DBNet text detector
# and its SVTR recogniser. `make bench-env` installs the wheel without its dependencies.
PPOCR = {"ppocr_cls": ("ch_ppocr_mobile_v2.0_cls_infer.onnx", (48, 192)),
         "ppocr_det": ("ch_PP-OCRv4_det_infer.onnx", (96, 192)),
         "ppocr_rec": ("ch_PP-OCRv4_rec_infer.onnx", (48, 320))}


def ppocr_path(name: str) -> str:
    """The file of one of PPOCR's models inside the installed rapidocr-onnxruntime package."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("PP-OCR's models come from the rapidocr-onnxruntime wheel: "
                         "pip install --no-deps rapidocr-onnxruntime==1.4.4 (make bench-env does)")
    return os.path.join(list(spec.submodule_search_locations)[0], "models", PPOCR[name][0])


def model_size(name: str):
    """The input size to load a benchmark network at: PP-OCR's have dynamic sizes."""
    return PPOCR[name][1] if name in PPOCR else None


def torch_net(name: str, seed: int = 0):
    """A torchvision classifier with random weights, small random biases and calibrated BN statistics."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1, generator=gen)
                mod.running_var.uniform_(0.5, 1.5, generator=gen)
                mod.weight.uniform_(0.5, 1.5, generator=gen)
                mod.bias.normal_(0, 0.1, generator=gen)
            elif isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)) and mod.bias is not None:
                mod.bias.normal_(0, 0.01, generator=gen)
    return net


def onnx_path(name: str, size: int = 224) -> str:
    """Export (once) the torchvision network `name` with a dynamic batch; the demo model is bundled."""
    if name == "demo":
        return DEMO
    if name in PPOCR:
        return ppocr_path(name)
    import torch

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"{name}_{size}.onnx")
    if not os.path.exists(path):
        net = torch_net(name)
        x = torch.randn(1, 3, size, size)
        torch.onnx.export(net, (x,), path, input_names=["image"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, dynamo=False)
    return path


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    return timeit_side_by_side([fn], repeat, warmup)[0]


def timeit_side_by_side(fns: list[Callable[[], object]], repeat: int = 5, warmup: int = 1) -> list[float]:
    """Median wall time of each of `fns` in seconds, the calls interleaved round by round.

    On a shared machine the load drifts over seconds; alternating the contenders gives each
    the same drift, so their ratio is steadier than with one block of runs after the other.
    Every other round runs them in reverse order, so that none always runs first (after the
    Python-side work between rounds) or always right after the same neighbour.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeat):
        order = list(range(len(fns)))
        for i in order if r % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


def kernel_ms(jobs: list, threads: int, runs: int = 5, warmup: int = 2) -> list[float]:
    """Median per-run sum of ONNX Runtime's node kernel times, in ms, for each (model, feeds) job.

    Wall time on a small, shared machine also carries what happens between kernels: thread
    wake-ups, and the spinning worker threads of another session stealing a core. Kernel time
    is the cost of the graph itself, so a ratio of kernel times is steadier than one of wall
    times. The jobs' runs alternate, as in `timeit_side_by_side`; their worker threads do not
    spin while idle, so one job's pool cannot slow another's kernels.
    """
    import json
    import tempfile

    import onnxruntime as ort

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for k, (model, feeds) in enumerate(jobs):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.enable_profiling = True
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")   # idle sessions leave the cores alone
            opts.profile_file_prefix = os.path.join(tmp, f"prof{k}")
            sessions.append((ort.InferenceSession(model.SerializeToString(), opts,
                                                  providers=["CPUExecutionProvider"]), feeds))
        for _ in range(warmup + runs):
            for sess, feeds in sessions:
                sess.run(None, feeds)
        for sess, _ in sessions:
            with open(sess.end_profiling()) as f:
                events = json.load(f)
            windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run"][warmup:]
            nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            out.append(statistics.median(sum(e["dur"] for e in nodes if a <= e["ts"] <= b) for a, b in windows) / 1e3)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64))[0, 1])


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    import platform

    import onnxruntime

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime {onnxruntime.__version__}"


def onnx2torch_float64(full, input_name: str, shape: tuple):
    """onnx2torch's conversion of ``full`` (a model with its weights inside) in float64, as an
    independent autodiff reference for files no installed framework wrote. onnx2torch wants the
    weights as initializers and a shape on every tensor, which converters' files often lack
    (Constant nodes; reshape targets that stop shape inference): both are supplied, the shapes from
    one run at ``shape`` (dims after the first kept, the first named "N")."""
    import onnx
    import onnxruntime as ort
    from onnx2torch import convert

    full = onnx.ModelProto.FromString(full.SerializeToString())
    for n in [n for n in full.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        t = onnx.TensorProto()
        t.CopyFrom(n.attribute[0].t)
        t.name = n.output[0]
        full.graph.initializer.append(t)
        full.graph.node.remove(n)
    outs = [o for n in full.graph.node for o in n.output]
    probe = onnx.ModelProto.FromString(full.SerializeToString())
    del probe.graph.output[:]
    probe.graph.output.extend([onnx.ValueInfoProto(name=o) for o in outs])
    vals = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {input_name: np.zeros(shape, np.float32)})
    del full.graph.value_info[:]
    for o, v in zip(outs, vals):
        full.graph.value_info.append(onnx.helper.make_tensor_value_info(
            o, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), ["N"] + list(v.shape[1:])))
    return convert(full).eval().double()
