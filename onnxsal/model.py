"""Load an ONNX file and describe it as an image classifier.

Everything a method needs to know about a model is decided here, once: which
input is the image and in which layout, which tensor holds the logits (the
input of a final Softmax/Sigmoid: the framework-agnostic form of "swap the
last activation for a linear one"), and which conv layers a CAM can use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from .dense import DenseOutput, find_dense, resized_from, squeezed_map, unsqueezed
from .detection import (Detection, QueryOutput, add_anchor_scores, anchor_pair, dominating, find_anchor_rows,
                        find_detection, find_detection_list, find_queries, score_maps, ultralytics_metadata)
from .errors import ImageError, LayerError, MissingFileError, ModelError, OutputError, SizeError
from .graph.normalize import (FLOAT_TYPES, free_negative_dims, infer, normalize_traced, static_dims, tensor_shapes,
                              upgrade_opset, without_weight_data)
from .graph.columns import RESHAPES
from .graph.contrib import expand, fused_ops
from .graph.fixed import Value, hold
from .graph.image_input import as_image, needs_image_input
from .graph.functions import inline as inline_functions
from .graph.integer_input import as_real, integer_image_input, pixel_preprocess
from .graph.training import as_scored_alone, training_ops
from .graph.written import written_activations
from .graph.precision import LIFTED_NAMES, source_types, to_float32
from .graph.qoperator import qoperator_ops, to_qdq
from .graph.simplify import constants, drop_float_casts
from .graph.surgery import constant_ints
from .graph.weights import WeightStore, attach, detach
from .labelled import add_class_best, labelled_lists
from .simcc import add_keypoint_scores, find_simcc
from .preprocess import Preprocess, parse_size
from .sidecar import Sidecar, read_sidecar

CONV_OPS = {"Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "FusedConv", "DeformConv"}
# Ops that keep a conv's spatial map and are commonly fused with it; their output is also a candidate.
FOLLOWERS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish",
             "Tanh", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "Mul", "Add", "Gelu"}
PASSTHROUGH = RESHAPES - {"Unsqueeze"}      # an output moved on from the final activation

META_PREPROCESS = "onnxsal.preprocess"
META_LABELS = "onnxsal.labels"
META_LAYERS = "onnxsal.layers"


@dataclass(frozen=True)
class ImageInput:
    name: str
    layout: str  # "NCHW" or "NHWC"
    channels: int
    height: Optional[int]
    width: Optional[int]
    elem_type: int

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.height), int(self.width))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Layer:
    """A tensor a CAM can read: a conv map (N, C, h, w), or a transformer's tokens (N, T, C).

    For tokens, ``prefix`` leading tokens (class, distillation) are dropped and the remaining
    ``h*w`` are the patch grid, row by row -- pytorch-grad-cam's ``reshape_transform`` for ViTs,
    decided here from the shapes instead of written by the user.
    """

    tensor: str
    node: str
    op_type: str
    shape: tuple  # (C, h, w)
    prefix: Optional[int] = None   # token layers only

    @property
    def tokens(self) -> bool:
        return self.prefix is not None

    def grid(self, a: np.ndarray) -> np.ndarray:
        """This layer's values (N, ...) as (N, C, h, w) maps."""
        if not self.tokens:
            return a
        c, h, w = self.shape
        return np.ascontiguousarray(a[:, self.prefix:, :].reshape(len(a), h, w, c).transpose(0, 3, 1, 2))


@dataclass
class Model:
    """A loaded, normalised model and what onnxsal found in it.

    `light` is the graph every derived graph starts from: its large weights are placeholders
    whose arrays live in `weights` (see graph/weights.py), so deriving a graph or starting a
    session never copies them. `proto` is the same model with its weights inside.
    """

    light: onnx.ModelProto
    weights: WeightStore = field(repr=False)
    path: str
    input: ImageInput
    output: str          # the tensor onnxsal scores by default after the activation is removed
    logits: str
    activation: Optional[str]  # "softmax", "sigmoid" or None
    num_classes: int
    layers: list[Layer]
    preprocess: Optional[Preprocess]
    labels: Optional[list[str]]
    metadata: dict = field(default_factory=dict)
    layer_aliases: dict = field(default_factory=dict)
    dense: Optional[DenseOutput] = None      # set for per-pixel outputs; a class index then names a class map
    detection: Optional[Detection] = None    # set for detectors' outputs; a class names its best box
    lifted_from: tuple[str, ...] = ()        # the file's float types that run in float32 here (graph/precision.py)
    expanded: tuple[str, ...] = ()           # ONNX Runtime fused op types written as standard ops (graph/contrib.py)
    quantisers: int = 0                      # QuantizeLinear nodes on activations (QDQ form; graph/rules/quant.py)
    qoperator: tuple[str, ...] = ()          # QOperator op types rewritten into QDQ form (graph/qoperator.py)
    functions: tuple[str, ...] = ()          # the file's own functions, written out at load (graph/functions.py)
    training: tuple[str, ...] = ()           # training-mode BatchNorm/Dropout nodes, as at batch 1 (graph/training.py)
    read_as: str = ""                        # how an integer, flat or channel-less input is read (graph/integer_input.py, image_input.py)
    one_image: tuple[str, ...] = ()          # ops of a batch-1 export that read across the batch (normalize.one_image_ops)
    fixed_batch: int = 0                     # the batch size the file fixes (0: free); onnxsal frees it
    output_note: str = ""                    # how the scored tensor stands to the file's output, when not the output itself
    score_as_is: bool = False                # a score onnxsal added (a keypoint's confidence, a similarity): no softmax
    written: tuple[str, ...] = ()            # activations written out by hand, read as their op (graph/written.py)
    _full: Optional[onnx.ModelProto] = field(default=None, init=False, repr=False, compare=False)

    @property
    def proto(self) -> onnx.ModelProto:
        """The normalised model, self-contained (weights inline); built on first use."""
        if self._full is None:
            self._full = attach(self.light)
        return self._full

    @cached_property
    def default_layer(self) -> Optional[Layer]:
        """The last conv layer, unless it is the scored tensor itself (a segmentation model's class
        maps, also when only a Transpose to NHWC follows them): a CAM there weighs the scores by their
        own gradients, so the one before serves."""
        d = self.dense
        maps = (d.classes, d.height, d.width) if d is not None else None
        feeding = _ancestors(self.light, self.logits)      # a multi-task model's other heads have convs too
        # a segmentation head's class maps before they are resized to the output (torchvision's FCN,
        # DeepLabV3 and LR-ASPP) are the scores too, at a lower resolution
        scores = resized_from(self.light, self.logits) if d is not None else set()
        inner = [la for la in self.layers if la.tensor not in (self.logits, self.output) and tuple(la.shape) != maps
                 and la.tensor in feeding and not (la.tensor in scores and la.shape[0] == d.classes)]
        if self.detection is not None:          # a single-scale head's class maps are the scores too
            made = score_maps(self.light, self.logits)
            inner = [la for la in inner if la.tensor not in made]
        if (self.detection is not None or d is not None) and inner:
            # the last map that every anchor's score, or every pixel's, depends on: a detector's heads
            # read several scales, a segmentation head a skip branch (LR-ASPP, a U-Net's decoder)
            last = dominating(self.light, [la.tensor for la in inner], self.input.name, self.logits)
            if last is not None:
                return next(la for la in inner if la.tensor == last)
        return inner[-1] if inner else next((la for la in reversed(self.layers) if la.tensor in feeding), None)

    @property
    def binary(self) -> bool:
        """A single-unit output is a binary classifier: class 1 scores +logit, class 0 -logit."""
        return self.num_classes == 1

    @property
    def n_targets(self) -> int:
        if self.dense is not None:
            return self.dense.classes
        if self.detection is not None:
            return self.detection.classes
        return 2 if self.binary else self.num_classes

    def score_tensor(self, score: str) -> str:
        return self.output if score == "probability" else self.logits

    def find_layer(self, name: Optional[str]) -> Layer:
        """Resolve a tensor name, node name, or framework layer name (from metadata) to a candidate layer."""
        if name is None:
            if not self.layers:
                raise LayerError(
                    "this model has no conv layers with a spatial map, so CAM methods cannot run; "
                    "use occlusion, rise or a gradient method such as saliency"
                )
            return self.default_layer
        if isinstance(name, Layer):            # one of `layers` (or inspect's), passed back as it is
            name = name.tensor
        if not isinstance(name, str):
            raise LayerError(f"a layer is named by its tensor, node or framework layer name, not {type(name).__name__}")
        name = self.layer_aliases.get(name, name)
        for layer in self.layers:
            if name in (layer.tensor, layer.node):
                return layer
        # any 4-D tensor in the graph is allowed, even if it is not a default candidate
        shapes = tensor_shapes(self.light)
        producer = {o: n for n in self.light.graph.node for o in n.output}
        by_node = {n.name: n for n in self.light.graph.node if n.name}
        tensor = name
        if name in by_node:
            tensor = by_node[name].output[0]
        if tensor in producer:
            shape = shapes.get(tensor, (None, None))[1]
            if shape is None or None in shape[1:]:     # lost by shape inference: read it off a run
                from .graph.probe import probe_shapes

                shape = probe_shapes(self.light, [tensor]).get(tensor, (None, shape))[1]
            node = producer[tensor]
            if shape is not None and len(shape) == 4:
                if None in shape[1:]:
                    raise LayerError(f"layer {name!r} has a map of unknown size {tuple(shape[1:])}; "
                                     f"candidates: {self._candidates()}")
                if channels_last(shape, self.input.size):
                    return Layer(tensor, node.name, node.op_type, (int(shape[3]), int(shape[1]), int(shape[2])), 0)
                return Layer(tensor, node.name, node.op_type, tuple(shape[1:]))
            tokens = _token_layer(tensor, node, shape, self.input.size)
            if tokens is not None:
                return tokens
            raise LayerError(f"layer {name!r} is neither a 4-D activation nor (N, tokens, C) patch tokens "
                             f"(shape {shape}); candidates: {self._candidates()}")
        raise LayerError(f"unknown layer {name!r}; candidates: {self._candidates()}")

    def token_layers(self) -> list[Layer]:
        """A transformer's normalised token maps (LayerNormalization outputs on the patch grid), in
        graph order: where pytorch-grad-cam's ViT recipe reads (the last block's first norm).
        Never a default: only the class token reaches the head after the last block, so the
        right one depends on the architecture; give it with ``--layer``."""
        shapes = tensor_shapes(self.light)
        norms = [n for n in self.light.graph.node if n.op_type == "LayerNormalization"]
        # a ViT exported with a dynamic height and width interpolates its position embeddings to
        # sizes computed from Shape, which inference does not follow: read the token counts off a run
        lost = [n.output[0] for n in norms if _unknown_tokens(shapes.get(n.output[0], (0, None))[1])]
        if lost:
            from .graph.probe import probe_shapes

            shapes.update(probe_shapes(self.light, lost))
        found = (_token_layer(n.output[0], n, shapes.get(n.output[0], (0, None))[1], self.input.size)
                 for n in norms)
        return [layer for layer in found if layer is not None]

    def _candidates(self) -> str:
        if not self.layers:
            return "none (the model has no conv layers)"
        names = [layer.tensor for layer in self.layers]
        if len(names) > 12:
            names = names[:3] + ["..."] + names[-8:]
        return ", ".join(names)

    def label(self, index: int) -> str:
        if self.binary:
            return (self.labels[index] if self.labels and len(self.labels) == 2 else str(index))
        if self.labels and index < len(self.labels):
            return self.labels[index]
        return str(index)


def _ancestors(proto: onnx.ModelProto, tensor: str) -> set[str]:
    """The tensors ``tensor`` is computed from, itself included (through If/Loop bodies too)."""
    from .graph.surgery import needed_nodes

    nodes, _ = needed_nodes(proto.graph, [tensor], set())
    return {tensor} | {o for n in nodes for o in n.output}


def read_proto(path: Union[str, os.PathLike]) -> onnx.ModelProto:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelError(f"{path} is a directory, not an ONNX file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelError(f"{path} is not a readable ONNX model (corrupt or truncated protobuf): {type(exc).__name__}") from exc
    _load_external_weights(proto, path)
    if not proto.graph.node:
        raise ModelError(f"{path} is not an ONNX model (no graph nodes found)")
    try:   # large weights are checked when detach decodes them; here they would be serialised once more
        onnx.checker.check_model(without_weight_data(proto))
    except Exception as exc:
        raise ModelError(f"{path} fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    return proto


def write_proto(proto: onnx.ModelProto, path: Union[str, os.PathLike]) -> str:
    """Write a model file whole or not at all (through ``<path>.part``), making its folder; a path
    the system refuses is an OutputError. ``export`` and the converters write through here."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"cannot write the model to {path!r}: it is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write the model to {path!r}: cannot make the output folder {folder!r}: "
                          f"{exc.strerror or exc}") from exc
    tmp = path + ".part"
    try:
        with open(tmp, "wb") as f:
            f.write(proto.SerializeToString())
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write the model to {path!r}: {exc.strerror or exc}") from exc
    return path


def _load_external_weights(proto: onnx.ModelProto, path: str) -> None:
    """Weights saved beside the model (``save_as_external_data``, as models over 2 GB must be): a
    missing or short data file is named, not reported as a corrupt model."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    external = [t for t in proto.graph.initializer if uses_external_data(t)]
    if not external:
        return
    base = os.path.dirname(os.path.abspath(path))
    for t in external:
        info = {e.key: e.value for e in t.external_data}
        data = os.path.join(base, info.get("location", ""))
        if not os.path.isfile(data):
            raise MissingFileError(f"the weights of {path} are in {info.get('location')!r}, which is not next to it")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > os.path.getsize(data):
            raise ModelError(f"{data} is shorter than the weights {path} expects in it ({os.path.getsize(data)} bytes, "
                             f"{end} needed): truncated")
    try:
        load_external_data_for_model(proto, base)
    except Exception as exc:
        raise ModelError(f"cannot read the weights of {path} from their external file: {type(exc).__name__}: {exc}") from exc


def _find_image_input(proto: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, str]:
    inits = {i.name for i in proto.graph.initializer}
    candidates = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if tt.elem_type not in FLOAT_TYPES:
            continue
        dims = static_dims(vi) or []
        if len(dims) != 4:
            continue
        if dims[1] in (1, 3) and dims[3] not in (1, 3):
            candidates.append((vi, "NCHW"))
        elif dims[3] in (1, 3):
            candidates.append((vi, "NHWC"))
        elif dims[1] in (1, 3):
            candidates.append((vi, "NCHW"))
    others = [vi.name for vi in proto.graph.input if vi.name not in inits and vi.name not in {c[0].name for c in candidates}]
    if not candidates and len(others) == 1:
        # one 4-D float input with another channel count (RGBA, multispectral bands): the smaller of
        # axes 1 and 3 is the channels; such a model takes preprocessed .npy input, not image files
        vi = next(v for v in proto.graph.input if v.name == others[0])
        dims = static_dims(vi) or []
        if vi.type.tensor_type.elem_type in FLOAT_TYPES and len(dims) == 4:
            layout = _channel_axis(dims)
            if layout is not None:
                return vi, layout
    if not candidates:
        desc = ", ".join(f"{vi.name}{_dims(vi)}" for vi in proto.graph.input if vi.name not in inits)
        raise ModelError(f"no image-like input (4-D float with 1 or 3 channels) in the model; inputs: {desc}")
    if len(candidates) > 1 or others:
        names = [c[0].name for c in candidates] + others
        raise ModelError(f"the model has several inputs ({', '.join(names)}); onnxsal explains one image input and "
                         "holds the others at values you give: --feed NAME=VALUE (API: fixed_inputs={NAME: value})")
    return candidates[0]


def _channel_axis(dims: list) -> Optional[str]:
    """NCHW or NHWC when one of axes 1 and 3 is known and smaller than the other two; else None."""
    def smaller(axis: int) -> bool:
        c = dims[axis]
        return c is not None and all(d is None or c < d for k, d in enumerate(dims[1:], 1) if k != axis)

    return "NCHW" if smaller(1) else "NHWC" if smaller(3) else None


def _dims(vi: onnx.ValueInfoProto) -> str:
    return "[" + ",".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in vi.type.tensor_type.shape.dim) + "]"


def _fix_size(proto: onnx.ModelProto, name: str, layout: str, size: tuple[int, int]) -> None:
    for vi in proto.graph.input:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            axes = (2, 3) if layout == "NCHW" else (1, 2)
            for ax, v in zip(axes, size):
                if dims[ax].HasField("dim_value") and dims[ax].dim_value != v:
                    raise SizeError(f"the model's input is fixed at {dims[axes[0]].dim_value}x{dims[axes[1]].dim_value}, not {size[0]}x{size[1]}")
                dims[ax].Clear()
                dims[ax].dim_value = v


def _final_node(proto: onnx.ModelProto, output: str) -> tuple[Optional[onnx.NodeProto], set]:
    """The node that makes ``output`` before the moves and quantiser pairs after it, and the tensors
    whose shape a Reshape on the way restores (Reshape(y, Shape(x)))."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get(output)
    restored = set()
    while node is not None and (node.op_type in PASSTHROUGH or _requantised(node, producer)):
        if node.op_type == "DequantizeLinear":         # a quantiser pair after the softmax (TFLite's output)
            node = producer[node.input[0]]
        if node.op_type == "Reshape" and len(node.input) > 1:
            src = producer.get(node.input[1])
            if src is not None and src.op_type == "Shape":
                restored.add(src.input[0])
        node = producer.get(node.input[0])
    return node, restored


def _find_logits(proto: onnx.ModelProto, output: str) -> tuple[str, Optional[str], str]:
    """The logits and the final activation that ``output`` is made by, and, when that output holds
    log-probabilities, a note naming the tensor and what makes them ("" otherwise)."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    shapes = tensor_shapes(proto)
    node, restored = _final_node(proto, output)
    if node is None:
        return output, None, ""
    logged = f"{node.output[0]} holds log-probabilities (a final LogSoftmax)" if node.op_type == "LogSoftmax" else ""
    if _log_of_softmax(node, producer):      # log(softmax(z)) in two ops: LogSoftmax's logits
        logged = f"{node.output[0]} holds log-probabilities (a Log of a Softmax)"
        node = producer[node.input[0]]
    if node.op_type in ("Softmax", "LogSoftmax"):
        logits = node.input[0]
        flat = producer.get(logits)
        # An old-opset Softmax over the last axis of a (N, T, C) output comes out of the version
        # converter as Flatten -> Softmax -> Reshape back; the logits are the tensor before the
        # Flatten, whose first axis is the batch.
        if flat is not None and flat.op_type == "Flatten" and flat.input[0] in restored:
            logits = flat.input[0]
        return logits, "softmax", logged
    if node.op_type == "Sigmoid":
        # one unit: a binary classifier; (N, C): a multi-label one, each class its own logit
        shape = shapes.get(node.input[0], (0, None))[1]
        if shape is not None and (int(np.prod([d for d in shape[1:] if d])) == 1 or len(shape) == 2):
            return node.input[0], "sigmoid", ""
    return output, None, ""


def _log_of_softmax(node: onnx.NodeProto, producer: dict) -> bool:
    """Whether ``node`` is a ``Log`` of a ``Softmax``'s output, a LogSoftmax written as two ops."""
    src = producer.get(node.input[0]) if node.op_type == "Log" else None
    return src is not None and src.op_type == "Softmax"


def probabilities_of(proto: onnx.ModelProto, output: str) -> str:
    """``Exp`` of a log-probability output, added to ``proto``'s graph; its name."""
    from .graph.surgery import Appender

    a = Appender(proto, "onnxsal_probabilities")
    p = a.op("Exp", [output], "probabilities")
    vi = next((v for v in list(proto.graph.output) + list(proto.graph.value_info) if v.name == output), None)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        dims = [d.dim_value or None for d in vi.type.tensor_type.shape.dim][1:]
        a.declare(p, onnx.TensorProto.FLOAT, dims, output, output=True)
    else:
        proto.graph.output.insert(0, onnx.helper.make_tensor_value_info(p, onnx.TensorProto.FLOAT, None))
    return p


def _ranked_from(proto: onnx.ModelProto, output: str, shapes: dict) -> Optional[tuple[str, str]]:
    """The (N, C) scores a TopK over the classes ranks, when ``output`` is its values, with a note.

    Read as they are, the k values are k "classes" that name ranks: class 0 would be whichever class
    came first in each image, a class index of k or more out of range. The ranked scores hold every
    class in its own column, and their gradient at a listed class is the value's."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    t, node = output, producer.get(output)
    while node is not None and node.op_type == "Identity":
        t, node = node.input[0], producer.get(node.input[0])
    if node is None or node.op_type != "TopK" or node.output[0] != t:
        return None
    axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
    shape = shapes.get(node.input[0], (0, None))[1] or shapes.get(output, (0, None))[1]    # the same rank
    if shape is None or len(shape) != 2 or axis not in (-1, 1):
        return None
    shape = shapes.get(node.input[0], (0, None))[1]
    if shape is None or shape[1] is None:     # a file without inferred shapes, or a reshape read at run time
        from .graph.probe import probe_shapes

        shape = probe_shapes(proto, [node.input[0]]).get(node.input[0], (0, None))[1]
    if shape is None or shape[1] is None:
        return None
    largest = next((a.i for a in node.attribute if a.name == "largest"), 1)
    k = shapes.get(output, (0, None))[1]
    listed = f"the {'top' if largest else 'bottom'} {k[1] if k and k[1] else 'k'}"
    return node.input[0], (f"{output} lists {listed} of {shape[1]} class scores (TopK {node.name or t!r}); "
                           "onnxsal scores all of them, before the TopK")


def _requantised(node: onnx.NodeProto, producer: dict) -> bool:
    """A DequantizeLinear of a QuantizeLinear: the same values, on a grid."""
    return node.op_type == "DequantizeLinear" and getattr(producer.get(node.input[0]), "op_type", "") == "QuantizeLinear"


def token_grid(shape: Sequence, size: tuple[int, int]) -> Optional[tuple[int, int, int]]:
    """(prefix, h, w) when a (N, T, C) shape is 0-2 leading tokens and an h x w patch grid with the
    input's aspect ratio (ViT: 1 class token; DeiT: class + distillation), else None."""
    if len(shape) != 3 or not isinstance(shape[1], int) or not isinstance(shape[2], int):
        return None
    height, width = size
    for prefix in (1, 0, 2):
        n = shape[1] - prefix
        h = int(round(np.sqrt(n * height / width))) if n > 0 else 0
        if h > 1 and n % h == 0 and (n // h) * height == h * width:
            return prefix, h, n // h
    return None


def _like_image(h, w, size: tuple[int, int]) -> bool:
    """Whether an h x w map has the input's aspect ratio (within the rounding of strided layers)."""
    if not isinstance(h, int) or not isinstance(w, int) or h < 1 or w < 1:
        return False
    height, width = size
    return abs(h / w - height / width) <= 0.2 * height / width


def channels_last(shape: Sequence, size: tuple[int, int]) -> bool:
    """A 4-D activation laid out (N, h, w, C): its axes 1-2, not 2-3, have the input's aspect ratio.

    Swin keeps its features this way (pytorch-grad-cam needs a ``reshape_transform`` there); an
    NCHW map whose channel count happens to fit is read as NCHW, as before.
    """
    return not _like_image(shape[2], shape[3], size) and _like_image(shape[1], shape[2], size)


def _unknown_tokens(shape: Optional[Sequence]) -> bool:
    """Whether a LayerNormalization output could be (N, T, C) tokens whose T or C inference lost."""
    return shape is None or (len(shape) == 3 and None in shape[1:])


def _token_layer(tensor: str, node: onnx.NodeProto, shape: Optional[Sequence],
                 size: tuple[int, int]) -> Optional[Layer]:
    """``tensor`` as a token layer when its (N, T, C) shape holds a patch grid, else None."""
    grid = token_grid(shape, size) if shape is not None else None
    if grid is None:
        return None
    prefix, h, w = grid
    return Layer(tensor, node.name, node.op_type, (int(shape[2]), h, w), prefix)


def _spatial_mean(node: onnx.NodeProto, consts) -> bool:
    """A ReduceMean over the two spatial axes of an NCHW map: how torch.onnx's dynamo exporter
    writes ``adaptive_avg_pool2d(x, 1)``."""
    if node.op_type != "ReduceMean":
        return False
    axes = constant_ints(node, 1, "axes", consts)
    return axes is not None and sorted(a % 4 for a in axes) == [2, 3]


def _could_be_grid(shape: tuple, size: tuple[int, int]) -> bool:
    """Whether a conv output's (h, w) can be the input's grid, strided: its aspect ratio within 8x of
    the input's, or one axis pooled away (a text recogniser's 1 x w). A detector's box head runs a
    1x1 conv over (4 sides, anchors), say 4 x 8400 from 640 x 640, which is no image map. Looser than
    `_like_image`, which tells a layout apart and so needs the ratio itself."""
    h, w = shape[1], shape[2]
    if h == 1 or w == 1:
        return True
    ratio = (h / w) / (size[0] / size[1])
    return 1 / 8 <= ratio <= 8


def _find_layers(proto: onnx.ModelProto, size: tuple[int, int]) -> list[Layer]:
    shapes = tensor_shapes(proto)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def spatial(t: str) -> Optional[tuple]:
        shape = shapes.get(t, (0, None))[1]
        if shape is None or len(shape) != 4 or None in shape[1:]:
            return None
        return tuple(shape[1:]) if shape[2] * shape[3] > 1 else None

    layers: list[Layer] = []
    seen: set[str] = set()
    for node in proto.graph.node:
        if node.op_type not in CONV_OPS:
            continue
        t = node.output[0]
        shape = spatial(t)
        if shape is None or not _could_be_grid(shape, size):
            continue
        chain = [(t, node)]
        while True:  # follow single-consumer elementwise followers (BN, ReLU) that keep the shape
            users = consumers.get(t, [])
            if len(users) == 1 and users[0].op_type == "QuantizeLinear":
                # a QDQ pair: its float output is the activation the network carries on (with a ReLU
                # that the quantiser absorbed, the conv's own output is the pre-activation)
                users = consumers.get(users[0].output[0], [])
                if len(users) != 1 or users[0].op_type != "DequantizeLinear":
                    break
            elif len(users) != 1 or users[0].op_type not in FOLLOWERS:
                break
            nxt = users[0].output[0]
            if spatial(nxt) != shape:
                break
            chain.append((nxt, users[0]))
            t = nxt
        for tensor, n in chain:
            if tensor not in seen:
                seen.add(tensor)
                layers.append(Layer(tensor, n.name, n.op_type, shape))
    # A channels-last model (Swin) transposes its last features to NCHW for the global pool: that
    # map is the classic CAM layer, and no convolution produces it.
    producer = {o: n for n in proto.graph.node for o in n.output}
    consts = constants(proto.graph)
    for node in proto.graph.node:
        if not (node.op_type in ("GlobalAveragePool", "GlobalMaxPool") or _spatial_mean(node, consts)):
            continue
        t = node.input[0]
        src = producer.get(t)
        if src is None or src.op_type != "Transpose" or t in seen:
            continue
        if spatial(t) is None:      # shifted windows' run-time pads hide the sizes from inference
            from .graph.probe import probe_shapes

            shapes.update(probe_shapes(proto, [t]))
        if spatial(t) is not None:
            seen.add(t)
            layers.append(Layer(t, src.name, src.op_type, spatial(t)))
    # keep topological order of producers
    order = {o: k for k, n in enumerate(proto.graph.node) for o in n.output}
    layers.sort(key=lambda layer: order[layer.tensor])
    return layers


def _scored_output(proto: onnx.ModelProto, head: Optional[str] = None,
                   layout: str = "NCHW") -> tuple[str, Optional[str]]:
    """``head`` when given (a multi-task model's outputs), else the first floating-point output:
    classifiers often list an integer label (an ArgMax) first. A full-integer model (a TFLite
    export) quantises its scores: such an output is scored at the float values it quantises. An
    output that is only an ArgMax's label is scored at what it picks from; the second value names
    that output (None otherwise)."""
    outputs = {vi.name: vi for vi in proto.graph.output}
    if head is not None:
        if head not in outputs:
            raise ModelError(f"the model has no output {head!r}; its outputs: {', '.join(outputs)}")
        if outputs[head].type.tensor_type.elem_type not in FLOAT_TYPES:
            inner = _quantised_from(proto, head)
            if inner is not None:
                return inner, None
            picked = _argmax_from(proto, head, layout)
            if picked is None:
                raise ModelError(f"output {head!r} is not floating point; it cannot be scored")
            return picked, head
        return head, None
    for vi in proto.graph.output:
        if not vi.type.HasField("tensor_type") or vi.type.tensor_type.elem_type in FLOAT_TYPES:
            return vi.name, None
    for vi in proto.graph.output:
        inner = _quantised_from(proto, vi.name)
        if inner is not None:
            return inner, None
    for vi in proto.graph.output:
        picked = _argmax_from(proto, vi.name, layout)
        if picked is not None:
            return picked, vi.name
    names = ", ".join(f"{vi.name} ({onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name})"
                      for vi in proto.graph.output)
    raise ModelError(f"the model has no floating-point output to score; its outputs: {names}")


def _argmax_from(proto: onnx.ModelProto, output: str, layout: str) -> Optional[str]:
    """The scores an integer ``output`` is the ArgMax of over their class axis (a file that outputs
    only its label, or a segmentation mask): every class has its own column there. None for an
    ArgMax over another axis: a keypoint model's peak positions over its flattened heatmaps, (N, K,
    h·w), name no class, nor do a recogniser's characters per step tell them apart from those."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get(output)
    while node is not None and node.op_type in ("Identity", "Cast", "Squeeze", "Unsqueeze"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "ArgMax":
        return None
    rank = len(tensor_shapes(infer(proto)).get(node.input[0], (0, ()))[1] or ())
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    channels = (3, -1) if layout == "NHWC" else (1,)
    classes = {2: (1, -1), 4: channels}.get(rank, ())      # (N, C), a map per class
    return node.input[0] if axis in classes else None


def _refuse_detection_lists(proto: onnx.ModelProto, output: str, image: onnx.ValueInfoProto) -> None:
    """A detector that returns its detections without a batch axis (torchvision's Faster R-CNN, SSD,
    RetinaNet: boxes (K, 4), labels (K,), scores (K,) for the one image it takes) has no row per image
    to score; read as one, its boxes became "4 classes" and its gradient graph failed at run time.
    Such an output's first axis is a size of its own, computed after a NonMaxSuppression or NonZero."""
    vi = next((v for v in proto.graph.output if v.name == output), None)
    if vi is None or not vi.type.tensor_type.HasField("shape") or not vi.type.tensor_type.shape.dim:
        return
    first = vi.type.tensor_type.shape.dim[0]
    batch = image.type.tensor_type.shape.dim[0] if image.type.tensor_type.shape.dim else None
    if not first.dim_param or batch is not None and batch.dim_param == first.dim_param:
        return
    producer = {o: n for n in proto.graph.node for o in n.output}
    seen, todo = set(), [output]
    while todo:
        t = todo.pop()
        n = producer.get(t)
        if n is None or t in seen:
            continue
        seen.add(t)
        if n.op_type in ("NonMaxSuppression", "NonZero"):
            dims = ", ".join(d.dim_param or str(d.dim_value) for d in vi.type.tensor_type.shape.dim)
            raise ModelError(f"output {output!r} ({dims}) lists detections along its first axis (after "
                             f"{n.op_type} {n.name or n.output[0]!r}), not one row per image, so onnxsal cannot "
                             "score its classes; export the detector without its post-processing (its raw "
                             "head outputs)")
        todo.extend(i for i in n.input if i)


def _quantised_from(proto: onnx.ModelProto, output: str) -> Optional[str]:
    """The float tensor that a QuantizeLinear turns into integer output ``output``, or None."""
    node = next((n for n in proto.graph.node if output in n.output), None)
    return node.input[0] if node is not None and node.op_type == "QuantizeLinear" else None


def _activation_quantisers(proto: onnx.ModelProto) -> int:
    """QuantizeLinear nodes whose input is computed, not a stored weight."""
    stored = {i.name for i in proto.graph.initializer}
    stored.update(n.output[0] for n in proto.graph.node if n.op_type == "Constant")
    return sum(n.op_type == "QuantizeLinear" and n.input[0] not in stored for n in proto.graph.node)


def _metadata(proto: onnx.ModelProto) -> dict:
    return {p.key: p.value for p in proto.metadata_props}


def read_labels(labels: Union[str, os.PathLike, Sequence, None]) -> Optional[list[str]]:
    """Class names as a list. A string is read as ``--labels`` reads it, a file with one name per
    line or the names as ``a,b,c``: taken as a sequence, it would name each class by one letter."""
    if labels is None or isinstance(labels, str) and not labels:
        return None
    if isinstance(labels, (str, os.PathLike)):
        text = os.fspath(labels)
        if os.path.exists(text):
            with open(text, encoding="utf-8-sig") as f:   # a BOM (Windows editors write one) is no part of a name
                return [line.strip() for line in f if line.strip()]
        if "," in text:
            return [part.strip() for part in text.split(",") if part.strip()]
        raise MissingFileError(f"labels file not found: {text} (or give them comma-separated: --labels cat,dog)")
    if not isinstance(labels, (Sequence, np.ndarray)):
        raise ModelError(f"labels are a list of class names, a labels file or 'a,b,c', not {type(labels).__name__}")
    return [str(x) for x in labels]


def checked_size(size: Union[str, Sequence[int], None]) -> Optional[tuple[int, int]]:
    """(H, W) as whole numbers from 1; a string as ``--size`` reads it ('224x224', '96')."""
    if size is None or isinstance(size, str):
        return parse_size(size)
    hw = tuple(size) if isinstance(size, (Sequence, np.ndarray)) else None
    if hw is None or len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
                                             for v in hw):
        raise SizeError(f"size is (H, W) in whole pixels from 1, or 'HxW', not {size!r}")
    return int(hw[0]), int(hw[1])


def physical_memory() -> Optional[int]:
    """The machine's memory in bytes; None where the system does not say (not POSIX)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _check_fits(hw: Sequence[int], channels) -> None:
    """A size asked for a dynamic input must leave room for the network's activations, which take
    many times the input: past a quarter of the machine's memory for the input alone, the run
    would end with the system killing the process, not with an error."""
    memory = physical_memory()
    if memory is None:
        return
    c = channels if isinstance(channels, int) and channels > 0 else 3
    need = int(hw[0]) * int(hw[1]) * c * 4
    if need > memory // 4:
        raise SizeError(f"a {hw[0]}x{hw[1]} input holds {need / 2 ** 30:.1f} GiB as float32, more than a quarter "
                        f"of this machine's {memory / 2 ** 30:.0f} GiB, before any activation; ask for a smaller size")


def load(model: Union[str, os.PathLike, onnx.ModelProto, "Model"], size: Optional[Sequence[int]] = None,
         preprocess: Optional[Preprocess] = None, labels: Optional[Sequence[str]] = None,
         fixed_inputs: Optional[Mapping[str, Value]] = None, head: Optional[str] = None) -> Model:
    """Read, check, normalise and describe a model. `size` fixes a dynamic H, W; `fixed_inputs` holds
    inputs besides the image at given values (graph/fixed.py); `head` names the output to score."""
    if isinstance(model, Model):
        return model
    size, labels = checked_size(size), read_labels(labels)
    if isinstance(preprocess, str):               # a preset's name, as Explainer and --preprocess take it
        preprocess = Preprocess.from_preset(preprocess)
    elif preprocess is not None and not isinstance(preprocess, Preprocess):
        raise ImageError(f"preprocess is a preset name or a Preprocess, not {type(preprocess).__name__}")
    if isinstance(model, (bytes, bytearray)):   # a serialised model, as onnxruntime.InferenceSession takes one
        try:
            model = onnx.ModelProto.FromString(bytes(model))
        except Exception as exc:
            raise ModelError(f"the bytes given are not a readable ONNX model: {type(exc).__name__}") from exc
    if isinstance(model, onnx.ModelProto):
        proto, path = model, "<memory>"
        if not proto.graph.node:
            raise ModelError("the model given has no graph nodes")
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        proto = read_proto(path)
    else:
        raise ModelError(f"a model is an ONNX file's path, an onnx.ModelProto or its bytes, not {type(model).__name__}")
    proto = free_negative_dims(proto)             # a -1 written for a dynamic dim (graph/normalize.py)
    own = tuple(sorted({f.name for f in proto.functions}))
    if own:                                     # the model's own functions, written out (graph/functions.py)
        proto = inline_functions(proto)
    if fixed_inputs:
        proto = hold(proto, fixed_inputs)      # a copy: the caller's proto stays as it was
    read_as = []
    pixels = integer_image_input(proto)
    if pixels is not None:                     # uint8 pixels: a float input of real values (graph/integer_input.py)
        proto, how = as_real(proto, pixels)
        read_as.append(how)
    flat = needs_image_input(proto)
    if flat is not None:                       # (N, 784) or (N, 28, 28): an NCHW input in front (graph/image_input.py)
        proto, how = as_image(proto, flat, size)
        read_as.append(how)
    meta = _metadata(proto)
    vi, layout = _find_image_input(proto)
    dims = static_dims(vi)
    fixed_batch = dims[0] or 0
    channels = dims[1] if layout == "NCHW" else dims[3]
    elem_type = vi.type.tensor_type.elem_type
    lift = source_types(proto, elem_type)
    if pixels is not None:                          # the file's own input type, for export to take again
        elem_type = pixels.type.tensor_type.elem_type
    if lift:                                        # a half-precision model runs in float32 (graph/precision.py)
        if proto is model:                          # the caller's own proto stays as it was
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        to_float32(proto, lift)
    fused = fused_ops(proto)                        # ONNX Runtime's fused ops, as standard ops (graph/contrib.py)
    qoperator = qoperator_ops(proto)                # integer ops, as float ops between quantisers (graph/qoperator.py)
    upgraded, written = written_activations(upgrade_opset(proto))   # 1 / (1 + exp(-z)) as a Sigmoid (graph/written.py)
    trained = tuple(training_ops(upgraded))         # training-mode nodes, scored as at batch 1 (graph/training.py)
    light, store = detach(to_qdq(expand(as_scored_alone(upgraded))))   # the weights leave the graph once, here

    spec = preprocess
    if spec is None and META_PREPROCESS in meta:
        try:
            spec = Preprocess.from_json(meta[META_PREPROCESS])
        except Exception as exc:
            raise ModelError(f"the model's {META_PREPROCESS} metadata is not valid: {exc}") from exc
    if spec is None and pixels is not None:
        spec = pixel_preprocess(pixels.type.tensor_type.elem_type)
    foreign_spec, foreign_labels = ultralytics_metadata(meta)
    side = read_sidecar(path) if foreign_spec is None else Sidecar()   # a Hugging Face export's folder
    if spec is None:
        spec = foreign_spec or side.preprocess
    hw = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    if None in hw:
        want = tuple(size) if size else (tuple(spec.size) if spec is not None and spec.size else None)
        if want is None:
            raise SizeError(f"input {vi.name!r} has a dynamic size {_dims(vi)}; give one with --size HxW (API: size=(H, W))")
        _check_fits(want, channels)
        _fix_size(light, vi.name, layout, want)  # type: ignore[arg-type]
        hw = want
    elif size is not None and tuple(size) != tuple(hw):
        raise SizeError(f"the model's input is fixed at {hw[0]}x{hw[1]}, not {size[0]}x{size[1]}")

    aliases = {}
    if META_LAYERS in meta:
        try:
            aliases = dict(json.loads(meta[META_LAYERS]))
        except Exception:
            aliases = {}
    proto, across = normalize_traced(light)
    drop_float_casts(proto, keep={str(t) for t in aliases.values()})   # a lifted file's casts to its half type among them
    one_image = tuple(across)
    graph_out, argmaxed = _scored_output(proto, head, layout)
    pair = anchor_pair(proto, tensor_shapes(proto))    # an SSD-style head's confidences and boxes
    if head is None and pair is not None and graph_out in pair.beside:
        graph_out = pair.scores   # not its boxes when its confidences come in another output
    shapes = tensor_shapes(proto)
    lists = labelled_lists(proto, shapes)          # final detections: scores beside their class indices
    listed = None
    if lists is not None and (head is None or head in lists.outputs):
        listed, graph_out = add_class_best(proto, lists)
        shapes = tensor_shapes(proto)
    output_note = ""
    simcc = find_simcc(proto, shapes, hw) if listed is None and pair is None else None    # a SimCC head's x, y bins
    if simcc is not None and head is not None and head not in simcc[:2]:
        simcc = None                            # another output named
    if simcc is not None:
        graph_out = add_keypoint_scores(proto, simcc[0], simcc[1], simcc[2])
        shapes = tensor_shapes(proto)
        output_note = (f"{simcc[0]} and {simcc[1]} are SimCC keypoint coordinates ({simcc[2]} keypoints, "
                       f"{simcc[3]:g} bins per pixel): a keypoint scores 0.5 x (its highest x-bin + its highest "
                       "y-bin), its confidence as RTMPose decodes it")
    _refuse_detection_lists(light, graph_out, vi)
    ranked = _ranked_from(proto, graph_out, shapes)
    if ranked is not None:                     # a classifier's top-k values: its classes, not their ranks
        graph_out, output_note = ranked
    logits, activation, logged = _find_logits(proto, graph_out)
    if logged and listed is None:
        # log-probabilities: what the model's probability, its top classes and --score probability
        # read is their exp (scored as log p, a target's gradient would be that of log p, not of p)
        graph_out = probabilities_of(proto, graph_out)
        shapes = tensor_shapes(proto)
        output_note = "; ".join(filter(None, [output_note, f"{logged}: onnxsal reads their exp, the probabilities"]))
    out_shape = shapes.get(logits, (0, None))[1]
    if out_shape is None or None in out_shape[1:]:
        proto = infer(proto)
        shapes = tensor_shapes(proto)
        out_shape = shapes.get(logits, (0, None))[1]
    if out_shape is None or None in out_shape[1:]:
        # a reshape target computed at run time (paddle2onnx's Shape -> Slice -> Concat) hides it from
        # inference: one small run of the model tells
        from .graph.probe import probe_shapes

        out_shape = probe_shapes(proto, [logits]).get(logits, (0, None))[1]
    if out_shape is None or None in out_shape[1:]:
        raise ModelError(f"cannot tell the number of classes: output {graph_out!r} has an unknown shape")
    if len(out_shape) == 3 and activation is None and squeezed_map(proto, logits, shapes, tuple(out_shape[1:]), hw):
        # one map with its channel axis squeezed away (a salient object's, a person's, a depth map):
        # read as one, not as h x w "classes"; the axis is put back in the graph, so every per-pixel
        # path (targets, export) sees the usual 4-D map
        logits = graph_out = unsqueezed(proto, logits, layout)
        out_shape = (out_shape[0], 1, *out_shape[1:]) if layout == "NCHW" else (*out_shape, 1)
    num_classes = int(np.prod(out_shape[1:]))
    dense = find_dense(proto, logits, tuple(out_shape), layout, hw)      # a map per class (dense.py)
    detection = listed if listed is not None else None if dense is not None else \
        find_detection(proto, logits, shapes) or find_detection_list(meta, tuple(out_shape)) or \
        find_queries(proto, logits, tuple(out_shape), shapes, side.model_type)
    if detection is None and dense is None:       # YOLOv5-style anchors: the confidences, added to the graph
        rows = find_anchor_rows(proto, logits, shapes, len(foreign_labels) if foreign_labels else None)
        if rows is not None:
            detection, logits = add_anchor_scores(proto, logits, rows)
            graph_out, num_classes = logits, rows.anchors * rows.classes
    if detection is None and dense is None and pair is not None and pair.scores == graph_out:
        detection = pair.reading()                # SSD-style anchors: the probabilities, beside the boxes
        logits, activation, num_classes = graph_out, None, detection.queries * detection.width

    if argmaxed is not None:                  # only the prediction was an output: the scores it picks from
        count = dense.classes if dense is not None else num_classes
        output_note = (f"{argmaxed} is the ArgMax of {count} class scores ({graph_out}); onnxsal scores them, "
                       "every class its own")
    label_list = list(labels) if labels else None
    if label_list is not None:       # a labels file off by one (a background line) would name every class wrongly
        want = detection.classes if detection is not None else num_classes
        fits = {want} | ({2} if want == 1 else set())     # a single sigmoid unit: names for 0 and 1
        if isinstance(detection, QueryOutput) and detection.first:
            fits.add(detection.width)                       # the background column named too
        if len(label_list) not in fits:
            raise ModelError(f"{len(label_list)} labels given, but the model scores {want} classes")
    if label_list is None and META_LABELS in meta:
        try:
            label_list = [str(x) for x in json.loads(meta[META_LABELS])]
        except Exception as exc:
            raise ModelError(f"the model's {META_LABELS} metadata is not a JSON list: {exc}") from exc
    if label_list is None:
        label_list = foreign_labels
    if label_list is not None and isinstance(detection, QueryOutput) and detection.first and \
            len(label_list) == detection.width:      # a label list that names the background column too
        label_list = label_list[detection.first:]
    if label_list is None and side.labels is not None and \
            len(side.labels) == (detection.classes if detection is not None else num_classes):
        label_list = side.labels
    image = ImageInput(vi.name, layout, int(channels), int(hw[0]), int(hw[1]), elem_type)
    if spec is not None:
        spec = spec.fitted(layout, (image.height, image.width), image.channels)
    return Model(proto, store, path, image, graph_out, logits, activation, num_classes,
                 _find_layers(proto, image.size), spec, label_list, meta, aliases, dense, detection,
                 tuple(sorted(LIFTED_NAMES[t] for t in lift)), tuple(fused), _activation_quantisers(light),
                 tuple(qoperator), own, trained, "; ".join(read_as), one_image, fixed_batch, output_note,
                 simcc is not None, tuple(written))
