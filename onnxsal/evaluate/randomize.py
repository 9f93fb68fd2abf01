"""Re-initialise a model's weights, layer by layer, for the model-randomisation sanity check.

A "layer" is a node that owns trained float weights (Conv, Gemm, MatMul,
BatchNormalization, ...). A normalisation or bias-Add node that directly and
only follows such a node belongs to it: a Conv and its unfolded BatchNorm are
one layer, as in the paper's Inception blocks, and a model whose exporter
folded the BatchNorm into the Conv gets the same layers.

Randomising works on a copy of the ModelProto's initializers; the nodes, the
input model and its file are never touched. New values are drawn from a normal
distribution with each tensor's own mean and standard deviation, so the scale
of activations stays plausible and the only thing destroyed is what training
learned. The draw for a layer depends only on (seed, the layer's position), so
the cascading and the independent test use the same random weights for it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelError
from ..graph.normalize import FLOAT_TYPES
from ..graph.weights import array as tensor_value

# op type -> input positions that hold trained parameters (None: any initializer input)
WEIGHT_INPUTS: dict[str, Optional[tuple[int, ...]]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": None, "MatMul": None, "Einsum": None,
    # a deformable convolution's weights and bias; its offsets and mask are computed (by a Conv,
    # a layer of its own)
    "DeformConv": (1, 3),
    # running mean and variance are statistics of the layer below, not trained weights;
    # a variance drawn from a normal could also be negative and make the layer undefined
    "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,),
    "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
}
# ops that join the layer they directly follow (its bias, scale or normalisation)
FOLLOWERS = {"Add", "Mul", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization"}
# ops between an initializer (their first input) and the node that uses it (exporters transpose or
# cast weights; a quantised model dequantises its integer weights; a dynamically quantised one, as
# onnxsal rewrites it, casts them and subtracts their zero point)
WEIGHT_PATH = {"Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "DequantizeLinear",
               "Sub"}


@dataclass(frozen=True)
class WeightLayer:
    """One layer of the randomisation: its node(s) and the initializers it owns."""

    name: str                  # the main node's name (or op_type#index when unnamed)
    op_type: str
    nodes: tuple[str, ...]     # names of the nodes merged into this layer
    initializers: tuple[str, ...]
    position: int              # index of the main node in the graph (topological order)

    @property
    def short(self) -> str:
        """A label short enough for a figure column: the last two parts of a path-like name."""
        parts = [p for p in self.name.replace("::", "/").split("/") if p]
        return "/".join(parts[-2:]) if parts else self.name


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}#{index}"


def weight_layers(proto: onnx.ModelProto) -> list[WeightLayer]:
    """The model's weight layers in topological order (input side first)."""
    g = proto.graph
    quantised = {n.input[0] for n in g.node if n.op_type in ("DequantizeLinear", "Cast")}   # integer weights
    inits = {i.name: i for i in g.initializer if i.data_type in FLOAT_TYPES or i.name in quantised}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def source(name: str) -> Optional[str]:
        """The float initializer `name` comes from, through transposes and casts."""
        seen = 0
        while name not in inits:
            node = producer.get(name)
            if node is None or node.op_type not in WEIGHT_PATH or seen > 8:
                return None
            name, seen = node.input[0], seen + 1
        return name

    def owned(node: onnx.NodeProto, positions: Optional[tuple[int, ...]]) -> list[str]:
        idx = range(len(node.input)) if positions is None else [p for p in positions if p < len(node.input)]
        found = [source(node.input[p]) for p in idx if node.input[p]]
        return [f for f in found if f is not None]

    layers: list[WeightLayer] = []
    taken: set[str] = set()
    merged: set[int] = set()
    index = {id(n): k for k, n in enumerate(g.node)}
    for k, node in enumerate(g.node):
        if k in merged or node.op_type not in WEIGHT_INPUTS:
            continue
        weights = [w for w in owned(node, WEIGHT_INPUTS[node.op_type]) if w not in taken]
        if not weights:
            continue
        names = [_node_name(node, k)]
        out = node.output[0]
        while True:  # absorb a bias Add / scale Mul / normalisation that only this layer feeds
            users = consumers.get(out, [])
            if len(users) != 1 or users[0].op_type not in FOLLOWERS:
                break
            nxt = users[0]
            positions = WEIGHT_INPUTS.get(nxt.op_type, None)
            extra = [w for w in owned(nxt, positions) if w not in taken and w not in weights
                     and int(np.prod(inits[w].dims)) > 1]  # a scalar Add/Mul is a constant, not a weight
            if not extra:
                break
            weights += extra
            merged.add(index[id(nxt)])
            names.append(_node_name(nxt, index[id(nxt)]))
            out = nxt.output[0]
        taken.update(weights)
        layers.append(WeightLayer(names[0], node.op_type, tuple(names), tuple(dict.fromkeys(weights)), k))
    return layers


def draw_like(tensor: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New values from N(mean, std) of the tensor itself, in its dtype and shape.

    A constant tensor (std 0, e.g. an untouched bias) gets std |mean|, or 0.01 when that is 0
    too, so that randomising it still changes it. A quantised model's integer weights are drawn the
    same way on their own grid (rounded, within the type's range; their scale stays).
    """
    t = np.asarray(tensor, np.float64)
    mean = float(t.mean()) if t.size else 0.0
    std = float(t.std()) if t.size > 1 else 0.0
    if std == 0.0:
        std = abs(mean) or (0.01 if tensor.dtype.kind == "f" else 1.0)
    drawn = rng.normal(mean, std, t.shape)
    if tensor.dtype.kind in "iu":
        info = np.iinfo(tensor.dtype)
        drawn = np.clip(np.round(drawn), info.min, info.max)
    return drawn.astype(tensor.dtype)


def randomize(proto: onnx.ModelProto, layers: Iterable[WeightLayer], seed: int = 0,
              all_layers: Optional[Sequence[WeightLayer]] = None) -> onnx.ModelProto:
    """A copy of `proto` whose `layers` have freshly drawn weights; nothing else differs.

    The random stream of a layer is keyed by its position among `all_layers` (default:
    every weight layer of the model), so a layer gets the same weights whichever other
    layers are randomised with it.
    """
    layers = list(layers)
    everything = list(all_layers) if all_layers is not None else weight_layers(proto)
    key = {layer.position: i for i, layer in enumerate(everything)}
    new = copy.deepcopy(proto)
    by_name = {init.name: init for init in new.graph.initializer}
    for layer in layers:
        if layer.position not in key:
            raise ModelError(f"layer {layer.name!r} is not one of the model's weight layers")
        rng = np.random.default_rng([int(seed), key[layer.position]])
        for name in layer.initializers:
            init = by_name.get(name)
            if init is None:
                raise ModelError(f"initializer {name!r} of layer {layer.name!r} is not in the model")
            values = tensor_value(init)
            init.CopyFrom(numpy_helper.from_array(draw_like(values, rng), name))
    return new


def cascade(layers: Sequence[WeightLayer], max_steps: Optional[int] = None) -> list[list[WeightLayer]]:
    """Cumulative groups from the logits down: [[last], [last, last-1], ..., all].

    With more layers than `max_steps`, consecutive layers are randomised together in
    blocks of near-equal size, so a deep model gives a readable figure; the last step
    always randomises every layer.
    """
    top_down = list(reversed(layers))
    blocks = blocks_of(top_down, max_steps)
    steps, acc = [], []
    for b in blocks:
        acc = acc + b
        steps.append(list(acc))
    return steps


def blocks_of(layers: Sequence[WeightLayer], max_steps: Optional[int]) -> list[list[WeightLayer]]:
    """Split `layers` (in the given order) into at most `max_steps` contiguous blocks."""
    n = len(layers)
    if not max_steps or max_steps >= n:
        return [[layer] for layer in layers]
    edges = np.linspace(0, n, int(max_steps) + 1).round().astype(int)
    return [list(layers[a:b]) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def block_label(block: Sequence[WeightLayer]) -> str:
    """How a block is named in tables and figures: its layer, or its first..last layers."""
    if len(block) == 1:
        return block[0].short
    return f"{block[0].short}..{block[-1].short} ({len(block)})"
