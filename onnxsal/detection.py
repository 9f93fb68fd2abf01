"""Single-stage detectors' outputs: one box and one confidence per class for each anchor.

Ultralytics' YOLOv8/YOLO11 heads (and the segmentation and pose heads built on them) export
one tensor of shape (N, 4 + classes [+ extra], anchors): rows 0-3 a box (centre x, y, width,
height in input pixels), then a sigmoid confidence per class, then, for those heads, mask
coefficients or keypoints. Read as a classifier, its flattened row picks a box coordinate as the
"top class" (a coordinate of 480 beats any confidence), so such an output is recognised from the
graph itself: a Concat on the row axis whose input right after four box rows is a Sigmoid.

A class target then scores that class's confidence at its most confident anchor, the box a
detector would report for it; pytorch-grad-cam's detection recipes score a chosen box the same way.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx

from .preprocess import Preprocess, make_spec

BOX_ROWS = 4


@dataclass(frozen=True)
class DetectionOutput:
    """Rows ``first .. first + classes`` of an (N, rows, anchors) output are class confidences."""

    classes: int
    anchors: int
    rows: int
    first: int = BOX_ROWS

    def confidences(self, row: np.ndarray) -> np.ndarray:
        """A flattened output row as (classes, anchors)."""
        return np.asarray(row).reshape(self.rows, self.anchors)[self.first:self.first + self.classes]

    def best(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes,) each class's highest confidence and the anchor that has it."""
        conf = self.confidences(row)
        anchors = conf.argmax(axis=1)
        return conf[np.arange(self.classes), anchors], anchors

    def box(self, row: np.ndarray, anchor: int) -> np.ndarray:
        """(4,) the box of ``anchor``: centre x, y, width, height."""
        return np.asarray(row).reshape(self.rows, self.anchors)[:BOX_ROWS, anchor]

    def seed(self, cls: int, anchor: int) -> np.ndarray:
        """A flattened one-hot row at class ``cls``'s confidence at ``anchor``."""
        s = np.zeros((self.rows, self.anchors), np.float32)
        s[self.first + cls, anchor] = 1.0
        return s.reshape(-1)


def _shape(shapes: dict, name: str) -> Optional[tuple]:
    return shapes.get(name, (0, None))[1]


def find_detection(proto: onnx.ModelProto, output: str, shapes: dict) -> Optional[DetectionOutput]:
    """The detection layout of ``output`` when its graph writes one (see the module docstring)."""
    shape = _shape(shapes, output)
    if shape is None or len(shape) != 3 or None in shape[1:] or shape[2] < 2:
        return None
    producer = {o: n for n in proto.graph.node for o in n.output}

    def parts(t: str) -> list[str]:
        """The row blocks ``t`` concatenates, nested Concats on the row axis opened."""
        n = producer.get(t)
        if n is None or n.op_type != "Concat":
            return [t]
        axis = next((a.i for a in n.attribute if a.name == "axis"), None)
        rank = len(_shape(shapes, t) or ())
        if axis is None or axis % max(rank, 1) != 1 or rank != 3:
            return [t]
        return [p for i in n.input for p in parts(i)]

    blocks = parts(output)
    if len(blocks) < 2:
        return None
    start = 0
    for b in blocks:
        s = _shape(shapes, b)
        if s is None or len(s) != 3 or s[1] is None:
            return None
        n = producer.get(b)
        if start == BOX_ROWS and n is not None and n.op_type == "Sigmoid":
            return DetectionOutput(int(s[1]), int(shape[2]), int(shape[1]))
        start += int(s[1])
        if start > BOX_ROWS:
            return None
    return None


def dominating(proto: onnx.ModelProto, tensors: Sequence[str], source: str, target: str) -> Optional[str]:
    """The last of ``tensors`` (in graph order) that every path from ``source`` to ``target`` passes.

    A detector's heads read several scales, so its last conv map feeds one scale's anchors only and
    a box at another scale gets no gradient there; the last map every anchor depends on serves all.
    """
    nodes = list(proto.graph.node)

    def reaches(blocked: str) -> bool:
        live = {source}
        for n in nodes:              # graph order is topological
            if any(i in live for i in n.input if i):
                live.update(o for o in n.output if o != blocked)
        return target in live

    for t in reversed(list(tensors)):
        if t != target and not reaches(t):
            return t
    return None


def ultralytics_metadata(meta: dict) -> tuple[Optional[Preprocess], Optional[list[str]]]:
    """Preprocessing and class names from an Ultralytics export's metadata (RGB scaled to [0, 1] at
    its ``imgsz``; ``names`` a Python dict literal), so its files explain without flags, a dynamic
    size one too."""
    if meta.get("author") != "Ultralytics":
        return None, None
    labels = None
    try:
        names = ast.literal_eval(meta.get("names", ""))
        if isinstance(names, dict) and sorted(names) == list(range(len(names))):
            labels = [str(names[i]) for i in range(len(names))]
    except (ValueError, SyntaxError):
        pass
    spec = make_spec("unit", None, None, None, None)
    try:
        size = ast.literal_eval(meta.get("imgsz", ""))
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
            spec = dataclasses.replace(spec, size=tuple(size))
    except (ValueError, SyntaxError):
        pass
    return spec, labels
