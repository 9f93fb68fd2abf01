"""Single-stage detectors' outputs: boxes with a confidence per class, or final detections.

Ultralytics' YOLOv8/YOLO11 heads (and the segmentation, pose and oriented-box heads built on them)
export one tensor of shape (N, 4 + classes [+ extra], anchors): rows 0-3 a box (centre x, y, width,
height in input pixels), then a sigmoid confidence per class, then, for those heads, mask
coefficients, keypoints or an angle. Read as a classifier, its flattened row picks a box coordinate as the
"top class" (a coordinate of 480 beats any confidence), so such an output is recognised from the
graph itself: a Concat on the row axis whose input right after four box rows is a Sigmoid.

A class target then scores that class's confidence at its most confident anchor, the box a
detector would report for it; pytorch-grad-cam's detection recipes score a chosen box the same way.

Exported with its non-maximum suppression (or an NMS-free head's top-k), the output is instead a
list of final detections, (N, kept, 6 + extra); only the file's metadata says so reliably, and a
class target scores its most confident kept detection, or is refused when there is none.

SSD-style heads (SSD, UltraFace, RetinaFace; RetinaNet without its NMS; BlazeFace) output each
anchor's class probabilities, a softmax with the background first, a sigmoid per class or one raw
logit, beside (N, anchors, 4 [+ keypoints]) boxes whose form the graph does not tell; a class
target scores its probability (a raw logit as it is) at its most probable anchor.

Hugging Face's set-prediction detectors (DETR, YOLOS, RT-DETR...) output (N, queries, classes [+ 1])
logits beside (N, queries, 4) boxes; the export folder's config.json says whether a softmax with a
"no object" class or a sigmoid per class reads them. A class target scores its logit at the query
most probably of that class.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import onnx

from .graph.columns import RESHAPES, ColumnTrace
from .labelled import ClassBest
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
        """(classes,) each class's highest confidence and the anchor that has it (every class has one)."""
        conf = self.confidences(row)
        anchors = conf.argmax(axis=1)
        return conf[np.arange(self.classes), anchors], anchors

    def box(self, row: np.ndarray, anchor: int) -> np.ndarray:
        """(4,) the box of ``anchor``: centre x, y, width, height."""
        return np.asarray(row).reshape(self.rows, self.anchors)[:BOX_ROWS, anchor]

    def seed(self, cls: int, anchor: int) -> np.ndarray:
        """A flattened one-hot row at class ``cls``'s confidence at ``anchor``."""
        return _one_hot(self.rows, self.anchors, self.first + cls, anchor)

    def where(self, seed: np.ndarray) -> int:
        """The anchor a seed scores."""
        return int(np.argmax(seed)) % self.anchors

    def describe(self) -> str:
        return f"a detector's {self.anchors} boxes, {self.classes} classes: a class target scores its most confident box"

    def box_note(self, row: np.ndarray, cls: int, anchor: int, boxes: Optional[np.ndarray] = None) -> str:
        x, y, w, h = self.box(row, anchor)
        conf = float(self.confidences(row)[cls, anchor])
        return f"anchor {anchor}, centre ({x:.0f}, {y:.0f}), {w:.0f}x{h:.0f} px, confidence {conf:.3g}"


@dataclass(frozen=True)
class DetectionList:
    """(N, kept, rows) final detections, one per row: a box (4 values), its score, its class index,
    then the head's extras (mask coefficients, keypoints, angle). Ultralytics writes these with
    ``nms=True`` (NonMaxSuppression inside the graph) and, with ``nms=False``, for its NMS-free heads
    (YOLO26, YOLOv10); rows the detector did not fill hold a score of 0."""

    classes: int
    kept: int
    rows: int
    corners: bool = True        # x1, y1, x2, y2; else centre x, y, width, height (oriented boxes, RT-DETR)
    fractions: bool = False     # box values are fractions of the image's width and height (RT-DETR)

    def _table(self, row: np.ndarray) -> np.ndarray:
        return np.asarray(row).reshape(self.kept, self.rows)

    def best(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes,) each class's highest score among the kept detections (0 with none) and the
        detection that has it (-1 with none)."""
        t = self._table(row)
        scores, ids = t[:, 4], np.rint(t[:, 5]).astype(np.int64)
        values = np.zeros(self.classes, np.float64)
        where = np.full(self.classes, -1, np.int64)
        for k in np.argsort(-scores, kind="stable"):
            c = ids[k]
            if scores[k] > 0 and 0 <= c < self.classes and where[c] < 0:
                values[c], where[c] = scores[k], k
        return values, where

    def seed(self, cls: int, k: int) -> np.ndarray:
        """A flattened one-hot row at detection ``k``'s score."""
        return _one_hot(self.kept, self.rows, k, 4)

    def follow(self, cls: int, row: np.ndarray) -> np.ndarray:
        """The seed of class ``cls``'s most confident kept detection in ``row``, zeros with none.

        A row index names no detection of its own: the list is sorted by score, so in a noisy copy,
        on Integrated Gradients' path or in a mirrored image, row k is usually another detection,
        often of another class. Each input therefore scores its own best detection of the class."""
        values, where = self.best(row)
        return self.seed(cls, int(where[cls])) if where[cls] >= 0 else np.zeros(self.kept * self.rows, np.float32)

    def where(self, seed: np.ndarray) -> int:
        return int(np.argmax(seed)) // self.rows

    def describe(self) -> str:
        return (f"a detector's final detections, up to {self.kept}, {self.classes} classes: a class target scores "
                "its most confident detection")

    def box_note(self, row: np.ndarray, cls: int, k: int, boxes: Optional[np.ndarray] = None) -> str:
        a, b, c, d, score = self._table(row)[k, :5]
        f = ".3f" if self.fractions else ".0f"
        box = (f"corners ({a:{f}}, {b:{f}})-({c:{f}}, {d:{f}})" if self.corners else
               f"centre ({a:{f}}, {b:{f}}), {c:{f}}x{d:{f}}")
        return f"detection {k}, {box}{' of the image' if self.fractions else ''}, score {score:.3g}"


def _one_hot(rows: int, cols: int, row: int, col: int) -> np.ndarray:
    """A flattened (rows, cols) seed scoring one entry."""
    s = np.zeros((rows, cols), np.float32)
    s[row, col] = 1.0
    return s.reshape(-1)


def ranked(det: "Detection", row: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Each class's best score in ``row`` and the classes the detector found there, best first: the
    default targets and ``top`` both."""
    values, where = det.best(row)
    return values, [int(c) for c in np.argsort(-values, kind="stable") if where[c] >= 0]


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


# Hugging Face set-prediction detectors by config.json's model_type: a softmax over the classes and a
# last "no object" class, or a sigmoid per class with none
SOFTMAX_QUERIES = {"detr", "conditional_detr", "yolos", "table-transformer", "dab-detr"}
SIGMOID_QUERIES = {"deformable_detr", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "dino"}


@dataclass(frozen=True)
class QueryOutput:
    """(N, queries, width) class scores beside an (N, queries, 4) output of boxes (centre x, y, width,
    height). ``reading`` says how a query's row gives its classes' probabilities: a set-prediction
    detector's logits (DETR and its kin) through a ``softmax`` whose last column is "no object", or a
    ``sigmoid`` each, with boxes as fractions of the image; or the confidences themselves
    (``scores``: a YOLOv5-style detector's anchors, objectness x class confidence), with boxes in
    input pixels."""

    classes: int
    queries: int
    width: int
    reading: str               # "softmax", "sigmoid" or "scores"
    boxes: Optional[str]       # the boxes output (None: the graph leaves them undecoded)
    source: str = ""           # where "scores" come from in the file's own output
    first: int = 0             # the column of class 0 (1: an SSD-style head's background comes first)
    boxes_as_given: bool = False   # box values whose form the graph does not tell (an SSD-style head's)

    def probabilities(self, row: np.ndarray) -> np.ndarray:
        """(queries, classes) each query's probability of each class."""
        z = np.asarray(row, np.float64).reshape(self.queries, self.width)
        if self.reading == "softmax":
            e = np.exp(z - z.max(axis=1, keepdims=True))
            return (e / e.sum(axis=1, keepdims=True))[:, self.first:self.first + self.classes]
        z = z[:, self.first:self.first + self.classes]
        return 0.5 * (1.0 + np.tanh(0.5 * z)) if self.reading == "sigmoid" else z     # no overflow at -800

    def best(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes,) each class's highest probability and the query that has it. The query is picked
        by the log-probability or logit, which keep their order where the probability rounds to 1
        (MediaPipe's BlazePalm gives logits near 1300: every sigmoid is 1, and the first would win)."""
        z = np.asarray(row, np.float64).reshape(self.queries, self.width)
        if self.reading == "softmax":
            top = z.max(axis=1, keepdims=True)
            z = z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True))
        queries = z[:, self.first:self.first + self.classes].argmax(axis=0)
        return self.probabilities(row)[queries, np.arange(self.classes)], queries

    def seed(self, cls: int, query: int) -> np.ndarray:
        """A flattened one-hot row at ``query``'s score of ``cls``."""
        return _one_hot(self.queries, self.width, query, self.first + cls)

    def where(self, seed: np.ndarray) -> int:
        return int(np.argmax(seed)) // self.width

    def describe(self) -> str:
        if self.boxes_as_given:
            what = "logit" if self.reading == "sigmoid" else "probability"
            return (f"a detector's {self.queries} anchors, {self.classes} class{'es' * (self.classes != 1)} "
                    f"({self.source}; boxes in {self.boxes}): a class target scores its {what} at its most "
                    "probable anchor")
        if self.reading == "scores":
            return (f"a detector's {self.queries} anchors, {self.classes} classes ({self.source}): a class target "
                    "scores its confidence at its most confident anchor")
        return (f"a detector's {self.queries} queries, {self.classes} classes: a class target scores its logit at "
                "its most probable query")

    def box_note(self, row: np.ndarray, cls: int, query: int, boxes: Optional[np.ndarray] = None) -> str:
        p = float(self.probabilities(row)[query, cls])
        if self.boxes_as_given:
            box = "" if boxes is None else ", box " + ", ".join(
                f"{v:.3g}" for v in np.asarray(boxes).reshape(self.queries, -1)[query, :4])
            return f"anchor {query}, probability {p:.3g}{box}"
        pixels = self.reading == "scores"
        unit, what = ("anchor", "confidence") if pixels else ("query", "probability")
        if boxes is None:
            undecoded = " (the graph leaves its box undecoded)" if self.boxes is None else ""
            return f"{unit} {query}, {what} {p:.3g}{undecoded}"
        x, y, w, h = np.asarray(boxes).reshape(self.queries, 4)[query]
        if pixels:
            return f"{unit} {query}, centre ({x:.0f}, {y:.0f}), {w:.0f}x{h:.0f} px, {what} {p:.3g}"
        return f"{unit} {query}, centre ({x:.3f}, {y:.3f}), {w:.3f}x{h:.3f} of the image, {what} {p:.3g}"


def find_queries(proto: onnx.ModelProto, output: str, shape: Optional[tuple], shapes: dict,
                 model_type: Optional[str]) -> Optional[QueryOutput]:
    """A Hugging Face set-prediction detector: the scored (N, Q, K) logits, another output (N, Q, 4),
    and a config.json whose model_type says how its classes are read."""
    if model_type not in SOFTMAX_QUERIES | SIGMOID_QUERIES:
        return None
    if shape is None or len(shape) != 3 or None in shape[1:]:
        return None
    for vi in proto.graph.output:
        s = _shape(shapes, vi.name)
        if vi.name == output or s is None or len(s) != 3 or s[2] != 4:
            continue
        if s[1] is None:          # a query count inference lost (DETR's): read off one run
            from .graph.probe import probe_shapes

            s = probe_shapes(proto, [vi.name]).get(vi.name, (0, s))[1]
        if s is not None and s[1] == shape[1]:
            softmax = model_type in SOFTMAX_QUERIES
            return QueryOutput(int(shape[2]) - softmax, int(shape[1]), int(shape[2]),
                               "softmax" if softmax else "sigmoid", vi.name)
    return None


@dataclass(frozen=True)
class AnchorRows:
    """An (N, anchors, 4 + [objectness] + classes [+ extra]) output: a box (centre x, y, width,
    height in pixels), then sigmoid confidences; with ``objectness`` the confidence a detector
    reports for a class is objectness x that class's (YOLOv5, YOLOv7, YOLOX)."""

    classes: int
    anchors: int
    objectness: bool
    decoded: bool = True       # the box columns are centre and size in pixels, not a conv's raw output


def find_anchor_rows(proto: onnx.ModelProto, output: str, shapes: dict,
                     names: Optional[int] = None) -> Optional[AnchorRows]:
    """The layout of a YOLOv5-style output, traced from the graph: four box columns computed from
    the network, then columns that are a Sigmoid's outputs moved into place.

    Column 4 is objectness when it is a one-column Sigmoid of its own (YOLOX), or when the Sigmoid
    it comes from also made the box (YOLOv5, YOLOv7: one Sigmoid over every column, then a Split).
    A Sigmoid that makes exactly the columns from 4 on is read by ``names``, the file's class count,
    when it tells; without it as class confidences (a transposed YOLOv8 output)."""
    shape = _shape(shapes, output)
    if shape is not None and len(shape) != 3:
        return None
    trace = ColumnTrace.around(proto, output, shapes)
    if trace is None:
        return None
    shape = _shape(trace.shapes, output)
    if shape is None or len(shape) != 3 or None in shape[1:] or shape[2] < BOX_ROWS + 2 or shape[1] < 2:
        return None
    box, sigmoids = [], []          # each column's source: (op type, tensor, its column there, its width)
    for c in range(int(shape[2])):
        src = trace.source(output, 2, c)
        sigmoid = src is not None and src[0] == "Sigmoid"
        if c < BOX_ROWS:
            if src is None or sigmoid:
                return None              # a box column is computed, and no sigmoid's output
            box.append(src)
        elif sigmoid:
            sigmoids.append(src)
        else:
            break                        # mask coefficients, keypoints...
    run = len(sigmoids)
    if run < 2:
        return None
    first, second = sigmoids[:2]
    objectness = first[2] > 0 or (first[1] != second[1] and first[3] == 1)
    if names in (run - 1, run):
        objectness = names == run - 1
    decoded = not all(b[0] == "Conv" for b in box)       # YOLOX's export leaves it raw by default
    return AnchorRows(run - objectness, int(shape[1]), objectness, decoded)


def add_anchor_scores(proto: onnx.ModelProto, output: str, rows: AnchorRows) -> tuple[QueryOutput, str]:
    """Append to ``proto`` the (N, anchors, classes) confidences a detector reports and the (N,
    anchors, 4) boxes, as tensors of the graph: the confidences are what a class target scores, so
    Integrated Gradients' path and the exported graph see the product, not one factor of it."""
    from onnx import helper, numpy_helper

    from .graph.surgery import ReadableNames

    g = proto.graph
    fresh = ReadableNames(g)

    def const(values) -> str:
        name = fresh("onnxsal_anchor_const")
        g.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
        return name

    def columns(lo: int, hi: int, name: Optional[str] = None) -> str:
        out = name or fresh(f"{output}_columns_{lo}_{hi}")
        g.node.append(helper.make_node("Slice", [output, const([lo]), const([hi]), const([2])], [out],
                                       name=fresh(f"onnxsal_slice_{lo}_{hi}")))
        return out

    boxes = columns(0, BOX_ROWS, fresh("onnxsal_boxes")) if rows.decoded else None
    first = BOX_ROWS + rows.objectness
    if rows.objectness:
        scores = fresh("onnxsal_confidences")
        g.node.append(helper.make_node("Mul", [columns(BOX_ROWS, first), columns(first, first + rows.classes)],
                                       [scores], name=fresh("onnxsal_objectness_times_class")))
    else:
        scores = columns(first, first + rows.classes, fresh("onnxsal_confidences"))
    vi = next((vi for vi in list(g.output) + list(g.value_info) if vi.name == output
               and len(vi.type.tensor_type.shape.dim) == 3), None)
    for name, width in ((boxes, BOX_ROWS), (scores, rows.classes)):
        if name is None:
            continue
        made = g.value_info.add()
        if vi is None:
            made.CopyFrom(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, rows.anchors, width]))
            continue
        made.CopyFrom(vi)                 # the output's type and batch dimension
        made.name = name
        made.type.tensor_type.shape.dim[2].Clear()
        made.type.tensor_type.shape.dim[2].dim_value = width
    source = (f"objectness x class: {output}'s column {BOX_ROWS} times columns {first}-{first + rows.classes - 1}"
              if rows.objectness else f"{output}'s columns {first}-{first + rows.classes - 1}")
    return QueryOutput(rows.classes, rows.anchors, rows.classes, "scores", boxes, source), scores


def _confidence_kind(proto: onnx.ModelProto, tensor: str, shapes: dict, producer: dict) -> Optional[str]:
    """"softmax" when ``tensor`` is a Softmax over its last axis (values moved on unchanged),
    "sigmoid" when it is a Sigmoid's output, else None."""
    node = producer.get(tensor)
    while node is not None and node.op_type in RESHAPES:
        node = producer.get(node.input[0])
    if node is None:
        return None
    if node.op_type == "Sigmoid":
        return "sigmoid"
    if node.op_type != "Softmax":
        return None
    shape = _shape(shapes, node.output[0]) or _shape(shapes, node.input[0])
    flat = producer.get(node.input[0])
    if shape is None and flat is not None and flat.op_type == "Flatten":     # the version converter's form
        inner = _shape(shapes, flat.input[0])
        if inner is None:                 # behind a run-time reshape target: read off one run
            from .graph.probe import probe_shapes

            inner = probe_shapes(proto, [flat.input[0]]).get(flat.input[0], (0, None))[1]
        at = next((a.i for a in flat.attribute if a.name == "axis"), 1)
        shape = (None, inner[-1]) if inner is not None and at in (-1, len(inner) - 1) else None
    own = _shape(shapes, tensor)
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    # over the last axis, and over as many values as the tensor's rows (an old-opset Softmax over
    # axis 1 of (N, anchors, classes) comes out of the version converter as one over anchors x classes)
    last = shape is not None and axis in (-1, len(shape) - 1) and own is not None and shape[-1] == own[-1]
    return "softmax" if last else None


@dataclass(frozen=True)
class AnchorPair:
    """An SSD-style head's two outputs (SSD, UltraFace, RetinaFace, RetinaNet without its NMS,
    BlazeFace): ``scores`` holds each anchor's class confidences, a softmax whose column 0 is the
    background, a sigmoid per class, or one raw logit (``kind``); ``boxes`` the (N, anchors, 4
    [+ keypoints]) boxes, one of the outputs ``beside`` it."""

    scores: str
    boxes: str
    kind: str                  # "softmax", "sigmoid" or "logit"
    anchors: int
    width: int
    beside: tuple

    def reading(self) -> QueryOutput:
        """A class target scores the reported probability (the logit, for a raw one) at the class's
        most probable anchor, as for the YOLO heads. The box values are reported as the file gives
        them: corners or a centre, fractions or pixels, or offsets from priors that a caller decodes,
        nothing in the graph says which."""
        background = self.kind == "softmax"
        source = {"softmax": f"{self.scores}: a softmax per anchor, column 0 the background",
                  "sigmoid": f"{self.scores}: a sigmoid per anchor and class",
                  "logit": f"{self.scores}: one logit per anchor, read through a sigmoid"}[self.kind]
        return QueryOutput(self.width - background, self.anchors, self.width,
                           "sigmoid" if self.kind == "logit" else "scores", self.boxes, source,
                           first=int(background), boxes_as_given=True)


def anchor_pair(proto: onnx.ModelProto, shapes: dict) -> Optional[AnchorPair]:
    """An output of per-anchor confidences, (N, anchors, classes), a softmax or sigmoid each or one
    raw logit per anchor (BlazeFace, BlazePalm), and an (N, anchors, 4 [+ keypoints]) output that is
    none of them, at the same anchor count; a box output of exactly four columns is preferred. Its
    confidences are scored whichever output comes first: RetinaFace and BlazeFace list their boxes
    first, and a landmarks output first is passed over the same way."""
    outputs = [vi.name for vi in proto.graph.output]
    if len(outputs) < 2:          # no pair: a single output needs no run to say so
        return None
    producer = {o: n for n in proto.graph.node for o in n.output}
    found = {o: _shape(shapes, o) for o in outputs}
    if any(s is not None and len(s) == 3 and s[1] is None for s in found.values()):
        from .graph.probe import probe_shapes     # an anchor count inference lost: read off one run

        probed = probe_shapes(proto, [o for o, s in found.items() if s is None or len(s) == 3])
        found.update({o: probed[o][1] for o in probed})
    rows = {o: s for o, s in found.items() if s is not None and len(s) == 3 and None not in s[1:] and s[1] >= 2}
    kinds = {o: _confidence_kind(proto, o, shapes, producer) for o in rows}
    for o, s in rows.items():
        if kinds[o] is None and s[2] == 1:
            kinds[o] = "logit"
    for scores, s in rows.items():
        kind = kinds[scores]
        if kind is None or kind == "softmax" and s[2] < 2 or kind == "sigmoid" and s[2] == BOX_ROWS:
            continue      # four sigmoids per row may be boxes in fractions of the image (DETR's pred_boxes)
        boxes = [o for o, b in rows.items() if kinds[o] is None and b[1] == s[1] and b[2] >= BOX_ROWS]
        if boxes:
            box = min(boxes, key=lambda o: rows[o][2] != BOX_ROWS)
            return AnchorPair(scores, box, kind, int(s[1]), int(s[2]), tuple(boxes))
    return None


def find_detection_list(meta: dict, shape: Optional[tuple]) -> Optional[DetectionList]:
    """An Ultralytics export's final detections, from its metadata: such a graph ends in TopK or
    NonMaxSuppression and padding, which say nothing reliable about the columns. RT-DETR's decoder
    always ends so."""
    if meta.get("author") != "Ultralytics" or meta.get("task") not in ("detect", "segment", "pose", "obb"):
        return None
    if shape is None or len(shape) != 3 or None in shape[1:] or shape[2] < 6:
        return None
    rtdetr = meta.get("head") == "RTDETRDecoder"      # always final: centre, size as fractions, score, class
    args, names = _literal(meta, "args"), _ultralytics_names(meta)
    nms = isinstance(args, dict) and args.get("nms") is True
    if not (nms or rtdetr or meta.get("end2end") == "True") or not names:
        return None
    return DetectionList(len(names), int(shape[1]), int(shape[2]), corners=meta.get("task") != "obb" and not rtdetr,
                         fractions=rtdetr)


Detection = Union[DetectionOutput, DetectionList, QueryOutput, ClassBest]


def _value_outputs(node: onnx.NodeProto) -> list[str]:
    """The outputs through which ``node`` passes values on, not only indices or shapes: an NMS
    export reaches its output from the image's Shape too, around every conv."""
    from .graph.autodiff import NON_DIFFERENTIABLE

    if node.op_type in NON_DIFFERENTIABLE or node.op_type == "NonMaxSuppression":
        return []
    if node.op_type == "TopK":
        return [node.output[0]]
    if node.op_type == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), 0)
        if to not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                      onnx.TensorProto.BFLOAT16):
            return []
    return [o for o in node.output if o]


LEARNED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "ConvInteger", "MatMulInteger", "QLinearConv",
           "QLinearMatMul"}


def score_maps(proto: onnx.ModelProto, scores: str) -> set[str]:
    """The tensors a detector's scores are made from with no learned op between: its class maps
    (a head conv's output, their sigmoid), and what an NMS list gathers beside them. A CAM there
    weighs the scores by their own gradients, so a single-scale head's class map is no default layer."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen, todo = {scores}, [scores]
    while todo:
        t = todo.pop()
        node = producer.get(t)
        if node is None or node.op_type in LEARNED or t not in _value_outputs(node):
            continue        # a shape or indices (a Shape of a backbone map, an NMS's picks) pass no values
        for i in node.input:
            if i and i not in seen:
                seen.add(i)
                todo.append(i)
    return seen


def dominating(proto: onnx.ModelProto, tensors: Sequence[str], source: str, target: str) -> Optional[str]:
    """The last of ``tensors`` (in graph order) that every path from ``source`` to ``target`` passes.

    A detector's heads read several scales, so its last conv map feeds one scale's anchors only and
    a box at another scale gets no gradient there; the last map every anchor depends on serves all.
    """
    carried = [(n, _value_outputs(n)) for n in proto.graph.node]

    def reaches(blocked: str) -> bool:
        live = {source}
        for n, outs in carried:      # graph order is topological
            if outs and any(i in live for i in n.input if i):
                live.update(o for o in outs if o != blocked)
        return target in live

    for t in reversed(list(tensors)):
        if t != target and not reaches(t):
            return t
    return None


def ultralytics_metadata(meta: dict) -> tuple[Optional[Preprocess], Optional[list[str]]]:
    """Preprocessing and class names from an Ultralytics export's metadata (RGB scaled to [0, 1] at
    its ``imgsz``; ``names`` a Python dict literal), so its files explain without flags, a dynamic
    size one too."""
    if meta.get("author") != "Ultralytics" and not _yolov5_file(meta):
        return None, None
    spec = make_spec("unit", None, None, None, None)
    size = _literal(meta, "imgsz")
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        spec = dataclasses.replace(spec, size=tuple(size))
    return spec, _ultralytics_names(meta)


def _yolov5_file(meta: dict) -> bool:
    """YOLOv5's export.py writes only ``stride`` and ``names`` (RGB in [0, 1] too)."""
    return "author" not in meta and isinstance(_literal(meta, "stride"), int) and _ultralytics_names(meta) is not None


def _literal(meta: dict, key: str):
    """A metadata value Ultralytics writes as a Python literal, or None."""
    try:
        return ast.literal_eval(meta.get(key, ""))
    except (ValueError, SyntaxError):
        return None


def _ultralytics_names(meta: dict) -> Optional[list[str]]:
    """The class names, when ``names`` maps 0..n-1 to them (or lists them)."""
    names = _literal(meta, "names")
    if isinstance(names, (list, tuple)):          # YOLOv5's from a YAML: a list
        names = dict(enumerate(names))
    if not isinstance(names, dict) or not names or sorted(names) != list(range(len(names))):
        return None
    return [str(names[i]) for i in range(len(names))]
