"""Inference-time graph simplifications that make the backward pass cheaper.

Every forward node on the differentiable path costs backward nodes too.
Identity and inference Dropout cost nothing forward but add bookkeeping;
a BatchNormalization right after a Conv is an affine map per channel that can
live inside the Conv's weights, so folding it removes a full-size elementwise
pass in both directions (most of a ResNet's non-conv backward work); so can a
product with a constant per channel right after a Conv.  A
hard-sigmoid or hard-swish that an exporter spelled out in four elementwise
ops becomes one HardSigmoid (and the Mul of hard-swish), which also makes
plain forward passes faster: the engine's forward graphs go through here too.

Tensor names the caller wants to keep (``keep``, plus graph inputs and
outputs) survive: a removed Identity whose output is kept renames its producer
instead, a folded Conv takes the BatchNorm's output name (so the post-BN
activation keeps its name), and a kept pre-BN Conv output blocks the fold.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Optional

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import weights
from .normalize import opset_of, tensor_shapes
from .pads import fold_zero_pads
from .surgery import FreshNames, rename_tensor, subgraphs, tensor_names

PREFIX = "onnxsal_fold/"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            if i:
                out.setdefault(i, []).append(node)
    return out


def _subgraph_reads(graph: onnx.GraphProto) -> set:
    """Names read inside If/Loop/Scan bodies: renaming them is not worth the risk."""
    return {i for sg in subgraphs(graph) for n in sg.node for i in n.input}


def _is_inference_dropout(node: onnx.NodeProto, consts: dict) -> bool:
    if node.op_type != "Dropout":
        return False
    if len(node.output) > 1 and node.output[1]:
        return False
    if len(node.input) > 2 and node.input[2]:
        t = consts.get(node.input[2])
        return t is not None and not bool(np.asarray(t).reshape(-1)[0])
    return True


class _Consts:
    """Initializer and Constant values by name, decoded only when asked (weights can be GBs)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._protos = {init.name: init for init in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self._protos[node.output[0]] = node.attribute[0].t
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str) -> Optional[np.ndarray]:
        if name not in self._arrays:
            proto = self._protos.get(name)
            if proto is None:
                return None
            self._arrays[name] = weights.array(proto)
        return self._arrays[name]


def constants(graph: onnx.GraphProto) -> _Consts:
    """Initializer and Constant values of ``graph`` by name, each decoded when first asked for."""
    return _Consts(graph)


def evaluate_node(node: onnx.NodeProto, values: list, opset: int) -> Optional[list[np.ndarray]]:
    """The outputs of one default-domain ``node`` on constant ``values`` (None for an omitted
    input), by ONNX's reference implementation; None when it cannot run. Constant folding for
    what exporters leave unfolded: pad amounts, slice axes, reordered recurrent weights."""
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    fed = {f"i{k}": v for k, v in enumerate(values) if v is not None}
    one = helper.make_node(node.op_type, [f"i{k}" if v is not None else "" for k, v in enumerate(values)],
                           [f"o{k}" for k in range(len(node.output))],
                           **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    graph = helper.make_graph(
        [one], "fold",
        [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape) for k, v in fed.items()],
        [helper.make_tensor_value_info(f"o{k}", TensorProto.UNDEFINED, None) for k in range(len(node.output))])
    try:
        outs = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).run(None, fed)
    except Exception:
        return None
    return [np.asarray(v) for v in outs]


# Ops that shape- and weight-sized arithmetic goes through when an exporter skips constant folding
FOLDABLE = {"Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Gather", "Slice", "Split", "Add", "Sub", "Mul", "Div",
            "Neg", "Mod", "Identity", "Min", "Max", "Abs", "Range", "ConstantOfShape", "Expand", "Equal", "Where",
            "Not", "Less", "Greater", "Transpose", "Tile", "Flatten", "Shape", "Size"}
MAX_FOLD_DEPTH = 32


class Folder:
    """Values of tensors computed from constants alone, found on demand by walking back through
    FOLDABLE producers and evaluating one node at a time (``evaluate_node``), memoised in ``cache``.

    ``leaf(name)`` gives a constant's value (None for anything else); ``admit(name)`` may refuse
    a tensor before its producer is visited, and ``accept(value)`` an evaluated output, which is
    then not kept. The VJP builder folds small integer tensors (pad amounts, slice axes) and float
    ones of at most a few elements (a Resize's scales behind a Cast), and refuses larger floats at
    once; the recurrent unrolling folds reordered weights.
    """

    def __init__(self, graph: onnx.GraphProto, opset: int, leaf: Callable[[str], Optional[np.ndarray]],
                 cache: Optional[dict] = None, admit: Optional[Callable[[str], bool]] = None,
                 accept: Optional[Callable[[np.ndarray], bool]] = None) -> None:
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.opset, self.leaf, self.admit, self.accept = opset, leaf, admit, accept
        self.cache: dict[str, np.ndarray] = {} if cache is None else cache

    def get(self, name: str, depth: int = 0) -> Optional[np.ndarray]:
        value = self.cache.get(name)
        if value is None:
            value = self.leaf(name)
        if value is not None:
            return value
        node = self.producer.get(name)
        if (node is None or node.op_type not in FOLDABLE or node.domain not in ("", "ai.onnx")
                or depth > MAX_FOLD_DEPTH or (self.admit is not None and not self.admit(name))):
            return None
        values = []
        for i in node.input:
            v = self.get(i, depth + 1) if i else None
            if i and v is None:
                return None
            values.append(v)
        outs = evaluate_node(node, values, self.opset)
        if outs is None or (self.accept is not None and not all(self.accept(v) for v in outs)):
            return None
        self.cache.update(zip(node.output, outs))
        return self.cache.get(name)


def _remove_passthrough(graph: onnx.GraphProto, protected: set,
                        passes: Optional[Callable[[onnx.NodeProto], bool]] = None) -> None:
    """Drop the nodes that pass their first input through unchanged (Identity, inference Dropout, or
    what ``passes`` says), keeping every protected name: readers of a dropped output read its source,
    or the source takes a protected output's name."""
    consts = constants(graph)
    if passes is None:
        passes = lambda node: node.op_type == "Identity" or _is_inference_dropout(node, consts)  # noqa: E731
    risky = _subgraph_reads(graph)
    graph_inputs = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    keep_nodes = []
    alias: dict[str, str] = {}          # readers of a removed output read its source; applied in one pass

    def flush() -> None:
        if alias:
            for other in graph.node:
                for k, i in enumerate(other.input):
                    if i in alias:
                        other.input[k] = alias[i]
            alias.clear()

    for node in list(graph.node):
        if not passes(node):
            keep_nodes.append(node)
            continue
        src, dst = alias.get(node.input[0], node.input[0]), node.output[0]
        if dst in risky or src in risky:
            keep_nodes.append(node)
        elif dst not in protected:
            alias[dst] = src
        elif src not in protected and src not in graph_inputs:
            flush()
            rename_tensor(graph, src, dst)               # producer and other readers take dst's name
        else:
            keep_nodes.append(node)
    flush()
    del graph.node[:]
    graph.node.extend(keep_nodes)


def drop_float_casts(model: onnx.ModelProto, keep: Iterable[str] = ()) -> int:
    """Remove the Casts to float32 of float32 tensors; returns how many.

    A half-precision file lifted to float32 (graph/precision.py, or the converters for a file ONNX
    Runtime cannot run in its type) keeps its casts between the half type and float32 (a Keras
    mixed-precision policy computes each batch norm in float32, with a cast on either side) as
    float32-to-float32 copies. Besides a pass each, forward and backward, they cut a convolution
    off from its batch norm and activation, so the default CAM layer was the bare convolution where
    the float32 network's is its activation. Types come from the graph's inferred value_info: a
    Cast whose input type is unknown stays."""
    g = model.graph
    types = {name: elem for name, (elem, _) in tensor_shapes(model).items()}

    def same_type(node: onnx.NodeProto) -> bool:
        return (node.op_type == "Cast" and _attr(node, "to", None) == TensorProto.FLOAT
                and types.get(node.input[0]) == TensorProto.FLOAT)

    before = len(g.node)
    protected = set(keep) | {o.name for o in g.output} | {i.name for i in g.input}
    _remove_passthrough(g, protected, same_type)
    return before - len(g.node)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _per_channel(v: np.ndarray, channels: int, rank: int) -> Optional[np.ndarray]:
    """``v`` as one value per output channel of a rank-``rank`` Conv output, or None when its
    broadcast would reach another axis (a (C,) vector aligns with the width, not the channels)."""
    if v.dtype.kind != "f" or v.ndim > rank:
        return None
    shape = (1,) * (rank - v.ndim) + v.shape
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(v.reshape(-1).astype(np.float64), (channels,))


def _conv_affine(node: onnx.NodeProto, value: Callable[[str], Optional[np.ndarray]]) -> Optional[tuple]:
    """(the Conv output ``node`` reads, its per-channel scale, and the (mean, bias) to apply after
    it, or None for a plain product) when ``node`` is an inference BatchNormalization or a product
    with a constant, else None. The scale's shape is checked against the Conv by the caller."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "BatchNormalization":
        if _attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
            return None
        stats = [value(n) for n in node.input[1:5]]
        if any(v is None for v in stats):
            return None
        scale, bias, mean, var = (v.astype(np.float64) for v in stats)
        return node.input[0], scale / np.sqrt(var + float(_attr(node, "epsilon", 1e-5))), (mean, bias)
    if node.op_type == "Mul" and len(node.input) == 2:
        for c, k in (node.input, node.input[::-1]):
            v = value(k)
            if v is not None and c != k:
                return c, v, None
    return None


def _fold_into_conv(graph: onnx.GraphProto, protected: set) -> None:
    """A BatchNormalization, or a product with a constant per output channel, right after a Conv
    goes into the Conv's weights and bias; the Conv takes its output name.

    tf2onnx leaves a Keras batch norm's scale as such a ``Mul`` (52 of them in Keras's
    MobileNetV2). ONNX Runtime fuses either into the Conv in a forward pass, but the backward would
    still scale every gradient in a pass of its own. A sum needs no fold: its backward passes the
    gradient through, and ONNX Runtime fuses a constant one into the Conv's bias. Weights this pass
    wrote are read back by name, so a batch norm and a product after it both fold."""
    consts = constants(graph)
    cons = _consumers(graph)
    risky = _subgraph_reads(graph)
    producer = {o: n for n in graph.node for o in n.output}
    fresh = FreshNames(tensor_names(graph), PREFIX)
    folded: dict[str, np.ndarray] = {}          # weights and biases written by this pass, by name

    def value(name: str) -> Optional[np.ndarray]:
        return folded[name] if name in folded else consts.get(name) if name else None

    dead = set()
    new_inits = []
    for node in graph.node:
        found = _conv_affine(node, value)
        if found is None:
            continue
        c, s, shift = found
        conv = producer.get(c)
        if conv is None or conv.op_type != "Conv" or c in protected or c in risky or len(cons.get(c, [])) != 1:
            continue
        w = value(conv.input[1])
        has_b = len(conv.input) > 2 and bool(conv.input[2])
        b = value(conv.input[2]) if has_b else None
        if w is None or (has_b and b is None):
            continue
        m = w.shape[0]
        if shift is None:                       # a product: one value per channel, no wider type
            s = _per_channel(s, m, w.ndim)
            if s is None or np.result_type(found[1].dtype, w.dtype) != w.dtype:
                continue
        elif s.shape != (m,):
            continue
        w_new = (w.astype(np.float64) * s.reshape((m,) + (1,) * (w.ndim - 1))).astype(w.dtype)
        b0 = b.astype(np.float64) if b is not None else np.zeros(m)
        if shift is not None:
            mean, bias = shift
            b_new = ((b0 - mean) * s + bias).astype(w.dtype)
        else:
            b_new = (b0 * s).astype(w.dtype) if b is not None else None
        inputs = [conv.input[0]]
        for array, stem in ((w_new, "W"), (b_new, "B")):
            if array is None:
                continue
            name = fresh(stem)
            folded[name] = array
            new_inits.append(numpy_helper.from_array(array, name))
            inputs.append(name)
        del conv.input[:]
        conv.input.extend(inputs)
        conv.output[0] = node.output[0]
        producer[node.output[0]] = conv
        dead.add(id(node))
    if not dead:
        return
    nodes = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input}
    graph.initializer.extend(t for t in new_inits if t.name in used)


def _scalar(consts: Folder, name: str, rank: int = 0) -> Optional[float]:
    """The float value of a one-element constant of at most ``rank`` dimensions (more would
    broadcast its partner to a higher rank), else None."""
    v = consts.get(name) if name else None
    ok = v is not None and v.size == 1 and v.dtype.kind == "f" and v.ndim <= rank
    return float(v.reshape(())) if ok else None


def _scalar_folder(graph: onnx.GraphProto, opset: int) -> Folder:
    """Scalar constants, folded through the Cast/Identity chains that unfolded exports leave.

    Only tensors that shape inference knows to hold one element are followed, so
    a walk never wanders up a chain of activations."""
    single = {vi.name for vi in graph.value_info
              if vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") and d.dim_value == 1 for d in vi.type.tensor_type.shape.dim)}
    return Folder(graph, opset, constants(graph).get, admit=single.__contains__, accept=lambda v: v.size == 1)


def _scaled_by_sixth(node: onnx.NodeProto, t: str, consts: Folder, rank: int) -> bool:
    """``node`` is ``t / 6`` or ``t * (1/6)`` (either operand order for the product)."""
    if node.op_type == "Div" and list(node.input[:1]) == [t]:
        return _scalar(consts, node.input[1], rank) == 6.0
    if node.op_type == "Mul" and t in node.input:
        other = node.input[1] if node.input[0] == t else node.input[0]
        c = _scalar(consts, other, rank)
        return c is not None and abs(c * 6.0 - 1.0) < 1e-6
    return False


def _fuse_hard_sigmoid(graph: onnx.GraphProto, opset: int, protected: set) -> None:
    """``Clip(x + 3, 0, 6) / 6`` becomes ``HardSigmoid(x; 1/6, 1/2)``, also inside ``x * Clip(x + 3, 0, 6) / 6``.

    Exporters that know no hard-swish op (paddle2onnx, tf2onnx for Keras's
    MobileNetV3) spell it out in four elementwise ops.  Each one costs a pass
    forward and more backward, and none of them stays in ONNX Runtime's blocked
    CPU layout, so every one adds layout conversions around it.  One
    HardSigmoid (an opset-6 op, so any model can take it) and one Mul replace
    them; their rules give the same derivative, with the same one-sided values
    at x = +-3, and the values differ from the original only by float rounding
    (x/6 + 1/2 against (x + 3)/6).
    """
    consts = _scalar_folder(graph, opset)
    cons = _consumers(graph)
    risky = _subgraph_reads(graph)
    producer = consts.producer
    shapes = {vi.name: vi for vi in list(graph.value_info) + list(graph.input)}
    fresh = FreshNames(tensor_names(graph), PREFIX)

    def rank(t: str) -> int:
        """x's known rank (0 when unknown: then only rank-0 constants qualify)."""
        vi = shapes.get(t)
        known = vi is not None and vi.type.tensor_type.HasField("shape")
        return len(vi.type.tensor_type.shape.dim) if known else 0

    def takes_hard_sigmoid(t: str) -> bool:
        """ONNX Runtime's CPU build has HardSigmoid for float and float16 only (not double)."""
        vi = shapes.get(t)
        return vi is not None and vi.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)

    def private(t: str) -> Optional[onnx.NodeProto]:
        """The one consumer of ``t``, when nothing else may see ``t``."""
        readers = cons.get(t, [])
        return readers[0] if len(readers) == 1 and t not in protected and t not in risky else None

    dead: set = set()
    replace: dict[int, list[onnx.NodeProto]] = {}
    for clip in graph.node:
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx") or len(clip.input) != 3:
            continue
        if _scalar(consts, clip.input[1]) != 0.0 or _scalar(consts, clip.input[2]) != 6.0:
            continue
        add = producer.get(clip.input[0])
        if add is None or add.op_type != "Add" or private(clip.input[0]) is not clip or id(add) in dead:
            continue
        three = [k for k, i in enumerate(add.input) if _scalar(consts, i, rank(add.input[1 - k])) == 3.0]
        if len(three) != 1:
            continue
        x = add.input[1 - three[0]]
        if not takes_hard_sigmoid(x):
            continue
        r = rank(x)
        nxt = private(clip.output[0])
        if nxt is None or id(nxt) in dead:
            continue
        if _scaled_by_sixth(nxt, clip.output[0], consts, r):          # h = Clip(x + 3, 0, 6) / 6
            gone, h, prod = [add, clip, nxt], nxt.output[0], private(nxt.output[0])
            swish = prod is not None and prod.op_type == "Mul" and sorted(prod.input) == sorted([x, h])
            out = prod.output[0] if swish else h
        elif nxt.op_type == "Mul" and sorted(nxt.input) == sorted([x, clip.output[0]]):
            div = private(nxt.output[0])                              # x * Clip(x + 3, 0, 6) / 6
            if div is None or not _scaled_by_sixth(div, nxt.output[0], consts, r):
                continue
            gone, h, prod, swish, out = [add, clip, nxt], None, div, True, div.output[0]
        else:
            continue
        if swish:
            if id(prod) in dead:
                continue
            gone.append(prod)
            if h is None:
                h = fresh("hard_sigmoid")
                if x in shapes:                       # h is shaped like x: keep what the rules read off it
                    vi = copy.deepcopy(shapes[x])
                    vi.name = h
                    graph.value_info.append(vi)
            fused = [onnx.helper.make_node("HardSigmoid", [x], [h], alpha=1.0 / 6.0, beta=0.5),
                     onnx.helper.make_node("Mul", [x, h], [out])]
        else:
            fused = [onnx.helper.make_node("HardSigmoid", [x], [out], alpha=1.0 / 6.0, beta=0.5)]
        dead.update(id(n) for n in gone)
        replace[id(gone[-1])] = fused             # in the last one's place: x and the consts come earlier
    if not dead:
        return
    nodes = []
    for n in graph.node:
        if id(n) in replace:
            nodes.extend(replace[id(n)])
        elif id(n) not in dead:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused(graph: onnx.GraphProto) -> None:
    read = {i for n in graph.node for i in n.input} | _subgraph_reads(graph) | {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    for k in range(len(graph.initializer) - 1, -1, -1):     # delete in place: weights are not copied
        if graph.initializer[k].name not in read and graph.initializer[k].name not in inputs:
            del graph.initializer[k]
    produced = {o for n in graph.node for o in n.output} | inputs
    vis = [v for v in graph.value_info if v.name in produced]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def simplify(model: onnx.ModelProto, keep: Optional[Iterable[str]] = ()) -> onnx.ModelProto:
    """Copy of ``model`` without Identity/inference Dropout, with Conv+BatchNorm folded and
    spelled-out hard activations fused.

    Graph inputs, graph outputs and ``keep`` keep their names and values
    (folding is exact up to float rounding of the new weights).
    """
    return simplify_inplace(copy.deepcopy(model), keep)


def simplify_inplace(model: onnx.ModelProto, keep: Optional[Iterable[str]] = ()) -> onnx.ModelProto:
    """``simplify`` on a model the caller owns: no copy of (possibly huge) weights."""
    g = model.graph
    protected = set(keep or ()) | {o.name for o in g.output} | {i.name for i in g.input}
    _remove_passthrough(g, protected)
    fold_zero_pads(g, protected, constants(g))
    _fuse_hard_sigmoid(g, opset_of(model), protected)
    _fold_into_conv(g, protected)   # after the fusion, whose patterns read a Conv's output too
    _drop_unused(g)
    return model
