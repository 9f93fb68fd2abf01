"""SimCC pose heads (RTMPose, as MMPose, rtmlib and mmdeploy export it): two outputs, (N, K, W·r)
and (N, K, H·r), each keypoint's x and its y as a classification over sub-pixel bins (r = 2 by
default). Read as a classifier, the first output's flattened row made each (keypoint, x-bin) pair a
"class": class 5 was keypoint 0 at x = 2.5 px.

RTMPose decodes a keypoint at the two argmaxes, with the confidence ``0.5 · (max x-bin + max y-bin)``
(MMPose's ``get_simcc_maximum``). onnxsal adds that confidence to the graph, (N, K), and scores it:
keypoint k is a class, its score what the pose model reports for it, its gradient that of the two
peak bins, picked again in every input a method runs.
"""

from __future__ import annotations

from typing import Optional

import onnx

from .graph.normalize import FLOAT_TYPES
from .graph.surgery import Appender


def find_simcc(proto: onnx.ModelProto, shapes: dict, size: tuple[int, int]) -> Optional[tuple[str, str, int, float]]:
    """(x output, y output, keypoints, bins per pixel) when two float outputs are (N, K, W·r) and
    (N, K, H·r) for the input's (H, W) and one whole r ≥ 1."""
    h, w = size
    found = {}
    for vi in proto.graph.output:
        s = shapes.get(vi.name, (0, None))[1]
        if vi.type.tensor_type.elem_type in FLOAT_TYPES and s is not None and len(s) == 3:
            found[vi.name] = s
    if len(found) < 2:
        return None
    if any(None in s[1:] for s in found.values()):     # a keypoint count behind a run-time reshape: one run
        from .graph.probe import probe_shapes

        probed = probe_shapes(proto, list(found))
        found = {o: probed.get(o, (0, s))[1] for o, s in found.items()}
    rows = [(o, int(s[1]), int(s[2])) for o, s in found.items() if s is not None and None not in s[1:]]
    for x, k, lx in rows:
        for y, k2, ly in rows:
            if y != x and k2 == k and lx >= w and lx * h == ly * w and lx % w == 0:
                return x, y, k, lx / w
    return None


def add_keypoint_scores(proto: onnx.ModelProto, x: str, y: str, keypoints: int) -> str:
    """Append ``0.5 · (max over x-bins + max over y-bins)``, (N, K), to ``proto``; return its name."""
    a = Appender(proto, "onnxsal_simcc")
    peaks = [a.reduce("ReduceMax", t, [2], keepdims=0, out=f"{t}_peak") for t in (x, y)]
    scores = a.op("Mul", [a.op("Add", peaks), a.const(0.5)], "keypoint_scores")
    a.declare(scores, onnx.TensorProto.FLOAT, [keypoints], x)
    return scores
