"""Final detections as separate outputs after a detector's own NonMaxSuppression: integer class
indices, (N, K), beside their scores.

Two layouts carry them. mmdeploy's end-to-end files (MMDetection's RetinaNet, SSD, YOLOX, RTMDet...
for ONNX Runtime) output ``dets`` (N, K, 5), each row a box and then its score (a rotated box's
five values, then the score, for MMRotate), and ``labels`` (N, K). The TensorRT EfficientNMS layout,
which mmyolo and several YOLO exporters also write for ONNX Runtime, outputs ``num_dets`` (N, 1),
``boxes`` (N, K, 4), ``scores`` (N, K) and ``labels`` (N, K). Rows the detector did not fill hold a
score of 0 (and, in mmdeploy's, a label of -1 or 0).

Read as a classifier, the first float output's flattened row made each box value a "class". Only
the labels say which class a score belongs to, so onnxsal adds to the graph, from those outputs,
each class's best score among the kept detections, (N, classes), 0 where the detector kept none,
and the box of that detection. That tensor is what a class target scores: its gradient is the
score's at the class's most confident detection, and each input (a noisy copy, a point on
Integrated Gradients' path, the exported graph's own image) picks its own, as the detector would.
The class count is read off the NonMaxSuppression's scores input, (N, classes, boxes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import onnx

from .graph.normalize import FLOAT_TYPES

INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                 onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}

Dim = Union[int, str, None]


@dataclass(frozen=True)
class LabelledLists:
    """Which outputs hold the scores, their class indices and their boxes (see the module docstring)."""

    scores: str
    column: Optional[int]     # the score's column in ``scores`` (mmdeploy's dets), None: the output is the scores
    labels: str
    boxes: Optional[str]      # (N, K, width) rows whose first ``box_values`` values are the box
    box_values: int
    classes: int
    nms: str                  # the NonMaxSuppression node, by name or output

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(o for o in (self.scores, self.boxes, self.labels) if o))


@dataclass(frozen=True)
class ClassBest:
    """(N, classes) each class's best score among the kept detections (0 with none), and beside it
    the (N, classes, width) rows of those detections' boxes, both added to the graph."""

    classes: int
    boxes: Optional[str]
    box_values: int
    source: str

    def best(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes,) each class's best score and where it is (the class's own column; -1 with none)."""
        values = np.asarray(row, np.float64).reshape(self.classes)
        return values, np.where(values != 0, np.arange(self.classes), -1)

    def seed(self, cls: int, where: int) -> np.ndarray:
        s = np.zeros(self.classes, np.float32)
        s[cls] = 1.0
        return s

    def where(self, seed: np.ndarray) -> int:
        return int(np.argmax(seed))

    def describe(self) -> str:
        return (f"a detector's final detections ({self.source}), {self.classes} classes: a class target scores its "
                "most confident kept detection")

    def box_note(self, row: np.ndarray, cls: int, where: int, boxes: Optional[np.ndarray] = None) -> str:
        score = float(np.asarray(row).reshape(self.classes)[cls])
        if boxes is None:
            return f"score {score:.3g}"
        values = np.asarray(boxes).reshape(self.classes, -1)[cls, :self.box_values]
        return f"score {score:.3g}, box {', '.join(f'{v:.4g}' for v in values)} (as the file gives it)"


def _declared(vi: onnx.ValueInfoProto) -> Optional[tuple[Dim, ...]]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim)


def _nms_above(proto: onnx.ModelProto, tensor: str) -> Optional[onnx.NodeProto]:
    """The NonMaxSuppression that ``tensor`` is computed from, if any."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen, todo = set(), [tensor]
    while todo:
        n = producer.get(todo.pop())
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "NonMaxSuppression":
            return n
        todo.extend(i for i in n.input if i)
    return None


def labelled_lists(proto: onnx.ModelProto, shapes: dict) -> Optional[LabelledLists]:
    """An integer (N, K) output computed after a NonMaxSuppression, beside float scores at the same
    K: an (N, K) output of their own, else the last column of (N, K, 5 | 6) rows. K and the widths
    are read as the file declares them, else off one run (exporters name the same K apart, or lose
    a width)."""
    outs = {vi.name: (vi.type.tensor_type.elem_type, _declared(vi)) for vi in proto.graph.output}
    labels = [o for o, (t, s) in outs.items() if t in INTEGER_TYPES and s is not None and len(s) == 2]
    floats = [o for o, (t, s) in outs.items() if t in FLOAT_TYPES and s is not None and len(s) in (2, 3)]
    if not labels or not floats:
        return None
    for lab in labels:
        nms = _nms_above(proto, lab)
        if nms is None or len(nms.input) < 2:
            continue
        declared = {o: outs[o][1] for o in [lab] + floats}
        found = _pick(lab, declared, loose=False)
        if found is None:
            from .graph.probe import probe_shapes

            probed = {o: s for o, (_, s) in probe_shapes(proto, [lab] + floats).items()}
            found = _pick(lab, probed, loose=True) if lab in probed else None
        classes = _class_count(proto, nms, shapes) if found is not None else None
        if classes is not None:
            return LabelledLists(**found, labels=lab, classes=classes, nms=nms.name or nms.output[0])
    return None


def _pick(labels: str, shapes: dict, loose: bool) -> Optional[dict]:
    """Which outputs of ``shapes`` hold the scores (and their column) and the boxes beside
    ``labels``. ``loose``: a K that varies with the batch in a run (None) matches another such."""
    k = shapes[labels][1]
    if k is None and not loose:
        return None
    same = {o: s for o, s in shapes.items() if o != labels and s is not None and len(s) in (2, 3) and s[1] == k}
    own = [o for o, s in same.items() if len(s) == 2]
    rows = [o for o, s in same.items() if len(s) == 3 and isinstance(s[2], int) and s[2] >= 4]
    if own:
        box = next(iter(rows), None)
        return dict(scores=own[0], column=None, boxes=box, box_values=4 if box is not None else 0)
    rows = [o for o in rows if same[o][2] in (5, 6)]
    if rows:
        width = int(same[rows[0]][2])
        return dict(scores=rows[0], column=width - 1, boxes=rows[0], box_values=width - 1)
    return None


def _class_count(proto: onnx.ModelProto, nms: onnx.NodeProto, shapes: dict) -> Optional[int]:
    """Axis 1 of the NonMaxSuppression's scores, (N, classes, boxes)."""
    shape = shapes.get(nms.input[1], (0, None))[1]
    if shape is None or len(shape) != 3 or shape[1] is None:
        from .graph.probe import probe_shapes

        shape = probe_shapes(proto, [nms.input[1]]).get(nms.input[1], (0, None))[1]
    return int(shape[1]) if shape is not None and len(shape) == 3 and shape[1] else None


def add_class_best(proto: onnx.ModelProto, lists: LabelledLists) -> tuple[ClassBest, str]:
    """Append to ``proto`` each class's best kept score, (N, classes), and its detection's box row,
    (N, classes, width); return the reading and the scores tensor.

    A score where the labels say class c, else -inf; the maximum over the K detections; 0 where the
    class has no detection at all (a Where on whether any label is c, so no -inf reaches an output
    and the gradient of an absent class is 0). Padding rows hold a score of 0, so a class the
    detector did not keep reads 0 either way."""
    from onnx import helper

    from .graph.surgery import Appender

    a = Appender(proto, "onnxsal_class_best")
    g = proto.graph
    float_type = next((vi.type.tensor_type.elem_type for vi in g.output if vi.name == lists.scores),
                      onnx.TensorProto.FLOAT)
    real = helper.tensor_dtype_to_np_dtype(float_type)
    scores = lists.scores
    if lists.column is not None:
        scores = a.op("Gather", [scores, a.const(lists.column, np.int64)], axis=2)
    labels = a.op("Cast", [lists.labels], to=onnx.TensorProto.INT64)
    hit = a.op("Equal", [a.op("Unsqueeze", [labels, a.const([2], np.int64)]),
                         a.const(np.arange(lists.classes).reshape(1, 1, -1), np.int64)])         # (N, K, classes)
    masked = a.op("Where", [hit, a.op("Unsqueeze", [scores, a.const([2], np.int64)]), a.const(-np.inf, real)])
    found = a.op("Cast", [a.reduce("ReduceMax", a.op("Cast", [hit], to=float_type), [1], keepdims=0)],
                 to=onnx.TensorProto.BOOL)
    best = a.op("Where", [found, a.reduce("ReduceMax", masked, [1], keepdims=0), a.const(0.0, real)],
                "onnxsal_class_best")
    boxes = None
    if lists.boxes is not None:
        pick = a.op("Unsqueeze", [a.op("ArgMax", [masked], axis=1, keepdims=0), a.const([2], np.int64)])  # (N, classes, 1)
        width = a.op("Gather", [a.op("Shape", [lists.boxes]), a.const([2], np.int64)])
        spread = a.op("Expand", [pick, a.op("Concat", [a.op("Shape", [best]), width], axis=0)])
        boxes = a.op("GatherElements", [lists.boxes, spread], "onnxsal_class_best_boxes", axis=1)
    a.declare(best, float_type, [lists.classes], lists.labels)
    if boxes is not None:
        a.declare(boxes, float_type, [lists.classes, None], lists.labels)
    where = f"column {lists.column} of {lists.scores}" if lists.column is not None else lists.scores
    source = f"{where} by {lists.labels}, after NonMaxSuppression {lists.nms!r}"
    return ClassBest(lists.classes, boxes, lists.box_values, source), best
