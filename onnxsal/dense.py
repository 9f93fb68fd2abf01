"""Per-pixel outputs: a segmentation model's class maps, or one map (a binary segmentation, a salient
object, a depth map), and how a file's output is read as such.

A class index scores its map over the pixels the model assigns to it (pytorch-grad-cam's
SemanticSegmentationTarget with the predicted mask). Which axis holds the classes follows the
input's layout unless only the other order puts the input's grid on the spatial axes; one map's
pixels are those above 0.5 after a Sigmoid, above 0 as logits; maps that each come out of a Sigmoid
(a multi-label segmentation, sigmoid heatmaps) are each their own probability, a class's pixels
those of its map above 0.5, wherever other classes overlap them; one map with its channel axis
squeezed away gets the axis back in the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import onnx

from .graph.columns import RESHAPES

MOVES = RESHAPES | {"Transpose"}      # a map moved on unchanged, or to channels-last
# a map resampled to another grid: linear and nearest sampling keep a Sigmoid's maps probabilities
# and a Softmax's summing to 1 at each pixel (a head that activates, then upsamples to the input)
RESAMPLES = {"Resize", "Upsample"}


@dataclass(frozen=True)
class DenseOutput:
    """A per-pixel output: `classes` maps of height x width (a segmentation model's logits), laid
    out (C, H, W), or (H, W, C) when ``channels_last`` (see `find_dense`)."""

    classes: int
    height: int
    width: int
    channels_last: bool
    threshold: float = 0.0     # one map, or maps after a Sigmoid (0.5): a class's pixels are those above this
    softmaxed: bool = False    # the maps are a Softmax's output that stays in the scores (one behind a resize)

    @property
    def independent(self) -> bool:
        """Whether each map is read on its own: one map, or maps each after a Sigmoid, where a
        softmax or an argmax over the classes would tie classes that the model did not tie."""
        return self.classes == 1 or self.threshold == 0.5

    def maps(self, row: np.ndarray) -> np.ndarray:
        """A flattened output row as (classes, height * width)."""
        r = np.asarray(row).reshape(-1)
        return r.reshape(self.height * self.width, self.classes).T if self.channels_last else r.reshape(self.classes, -1)

    def won(self, maps: np.ndarray) -> np.ndarray:
        """(classes, height * width) whether each class has each pixel: the class whose map is highest
        there, or for a single map (a person, a salient object, a lesion) its pixels above the
        threshold, since an argmax over one map gives the class every pixel, background included
        (and the same for each of several maps after a Sigmoid, whose classes may overlap)."""
        if self.independent:
            return maps > self.threshold
        return np.arange(self.classes)[:, None] == maps.argmax(axis=0)[None, :]

    def probability(self, maps: np.ndarray, cls: int) -> np.ndarray:
        """(height * width) class ``cls``'s probability at each pixel: a softmax over the classes
        there, or one map's sigmoid (the map itself when it is one already, as each map after a
        Sigmoid is)."""
        z = np.asarray(maps, np.float64)
        if self.threshold == 0.5 or self.softmaxed:
            return z[cls]
        if self.classes == 1:
            return 0.5 * (1.0 + np.tanh(0.5 * z[0]))
        e = np.exp(z - z.max(axis=0, keepdims=True))
        return e[cls] / e.sum(axis=0)

    def pixels(self, maps: np.ndarray, cls: int) -> np.ndarray:
        """(height * width) the pixels class ``cls`` wins, every pixel when it wins none: what its
        target scores."""
        won = self.won(maps)[cls]
        return won if won.any() else np.ones_like(won)

    def describe(self) -> str:
        if self.classes == 1:
            what = "a probability after a Sigmoid" if self.threshold == 0.5 else "logits"
            return (f"one map, {self.height}x{self.width}, {what}: its target scores the map over its pixels above "
                    f"{self.threshold:g}")
        order = ", classes last" if self.channels_last else ""
        pixels = "where it is above 0.5 (each map after a Sigmoid)" if self.independent else "it wins"
        return (f"{self.classes} classes per pixel, {self.height}x{self.width}{order}: a class target scores its map "
                f"over the pixels {pixels} (--region peak: its highest pixel, for keypoint heatmaps)")

    def flat(self, maps: np.ndarray) -> np.ndarray:
        """(classes, height * width) back to a flattened output row."""
        return np.ascontiguousarray(maps.T if self.channels_last else maps).reshape(-1)


def made_by(proto: onnx.ModelProto, tensor: str) -> Optional[str]:
    """The op type of the node whose output ``tensor`` is, moved on unchanged (or transposed) or
    resampled to another grid; None for a graph input or constant."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get(tensor)
    while node is not None and node.op_type in MOVES | RESAMPLES:
        node = producer.get(node.input[0])
    return None if node is None else node.op_type


def on_grid(hw: Sequence, size: tuple) -> bool:
    """Whether h x w is the input's height x width at one whole stride (2 x 2 pixels at least)."""
    (h, w), (height, width) = hw, size
    return min(h, w) >= 2 and not height % h and not width % w and height // h == width // w


_PER_PIXEL = {"Sigmoid", "Relu", "Clip", "Tanh", "Identity"}


def squeezed_map(proto: onnx.ModelProto, tensor: str, shapes: dict, hw: tuple, size: tuple) -> bool:
    """Whether an (N, h, w) output is one map: h x w the input's grid at a whole stride, and the
    tensor made from a one-channel 4-D map of that grid (its axis squeezed or reshaped away, then
    perhaps a per-pixel activation). An (N, steps, characters) or (N, tokens, C) output does not
    come from such a map."""
    h, w = hw
    if not on_grid(hw, size):
        return False
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get(tensor)
    while node is not None and node.op_type in _PER_PIXEL:
        node = producer.get(node.input[0])
    if node is None:
        return False
    source = node.input[0]            # a Squeeze, Reshape, Gather or ReduceX of the one-channel map
    dims = shapes.get(source, (0, None))[1]
    if dims is None:
        from .graph.normalize import inferred_dims

        dims = inferred_dims(proto).get(source)
    return dims is not None and len(dims) == 4 and tuple(dims[1:]) in ((1, h, w), (h, w, 1))


def unsqueezed(proto: onnx.ModelProto, tensor: str, layout: str) -> str:
    """Add ``tensor`` with its channel axis back (axis 1, or 3 for NHWC) to ``proto``; its name."""
    from .graph.surgery import Appender

    a = Appender(proto, "onnxsal_channel_axis")
    return a.op("Unsqueeze", [tensor, a.const([1 if layout == "NCHW" else 3], np.int64)], "onnxsal_map")


_RESIZING = {"Resize", "Upsample", "Add", "Sum", "Identity", "Transpose", "Cast"}


def resized_from(proto: onnx.ModelProto, tensor: str) -> set[str]:
    """The tensors ``tensor`` is made from by resizing and summing alone (the class maps of a
    segmentation head before its upsampling), ``tensor`` included."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen, todo = {tensor}, [tensor]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.op_type not in _RESIZING:
            continue
        for i in node.input[:1] if node.op_type in ("Resize", "Upsample") else node.input:
            if i and i not in seen:
                seen.add(i)
                todo.append(i)
    return seen


def find_dense(proto: onnx.ModelProto, logits: str, out_shape: tuple, layout: str, size: tuple) -> Optional[DenseOutput]:
    """The per-pixel reading of a 4-D output (N, C, h, w) or (N, h, w, C), None when its maps are
    a single pixel."""
    if len(out_shape) != 4:
        return None
    # the input's layout, unless only the other order fits its grid (a PyTorch model that permutes
    # its class maps last)
    last = layout == "NHWC"
    if not on_grid(out_shape[1:3] if last else out_shape[2:], size) and \
            on_grid(out_shape[2:] if last else out_shape[1:3], size):
        last = not last
    c, h, w = (out_shape[3], out_shape[1], out_shape[2]) if last else out_shape[1:]
    if h * w <= 1:
        return None
    maker = made_by(proto, logits)
    return DenseOutput(int(c), int(h), int(w), last, 0.5 if maker == "Sigmoid" else 0.0,
                       softmaxed=c > 1 and maker == "Softmax")
