"""Reverse-mode autodiff over ONNX graphs: the backward pass is more ONNX nodes.

Gradient saliency methods need d(score)/d(input) and d(score)/d(activation).
Rather than depend on a training framework at run time, onnxsal appends a
vector-Jacobian product (VJP) subgraph to the forward graph, so one ORT session
computes the forward activations, the score and its gradients in one run, at
any batch size.

Each forward op type has a *rule* (see ``rules/``): given the upstream
gradient of every node output, it emits nodes computing the gradient of every
node input.  ``vjp`` finds the nodes that lie between the requested inputs and
``y``, calls the rules in reverse topological order and sums the gradients of
tensors consumed several times.

Rules care about speed: the derived graph should cost a small multiple of the
forward pass, so they reuse forward outputs, multiply by cast masks instead of
``Where``, and avoid ``ReduceSum`` when no broadcasting happened.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LayerError, OpsetTooOldError, UnsupportedOpError
from . import deform, functions, recurrent
from .normalize import FLOAT_TYPES, normalize, opset_of, upgrade_opset
from .simplify import Folder
from .surgery import FreshNames, op_key
from . import weights

Rule = Callable[["RuleContext", "list[str | None]"], "list[str | None]"]

VJP_RULES: dict[str, Rule] = {}

PREFIX = "onnxsal_bw/"
GRAD_PREFIX = "grad_"
INT64_MAX = np.iinfo(np.int64).max
SMALL_FLOAT = 16          # elements: a float tensor computed from constants that the builder folds


# Ops whose outputs never carry gradient even when fed by a differentiable
# tensor: shape queries, constants, random draws and piecewise-constant maps
# (their derivative is zero almost everywhere, as in every training framework).
NON_DIFFERENTIABLE = {
    "Shape", "Size", "Constant", "ConstantOfShape", "EyeLike",
    "RandomNormalLike", "RandomUniformLike", "RandomNormal", "RandomUniform", "Multinomial",
    "ArgMax", "ArgMin", "NonZero", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf",
    "Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor",
    "OneHot", "Range", "Hardmax",
    "DynamicQuantizeLinear",     # its scale and zero point: the grid is held where each input put it (qoperator.py)
}
# Ops whose integer outputs still carry a gradient: a quantiser's, passed straight through (rules/quant.py).
INTEGER_CARRIERS = {"QuantizeLinear"}


def vjp_rule(*op_types: str) -> Callable[[Rule], Rule]:
    """Register a rule for one or more default-domain op types."""

    def register(fn: Rule) -> Rule:
        for op_type in op_types:
            VJP_RULES[op_type] = fn
        return fn

    return register


def _np_dtype(elem_type: int) -> np.dtype:
    return helper.tensor_dtype_to_np_dtype(elem_type)


def _dims(tp: Optional[onnx.TypeProto]) -> Optional[tuple]:
    """Static shape of a tensor type: dim_value, the dim_param string, or None."""
    if tp is None or not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    out = []
    for d in tp.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return tuple(out)


class _Builder:
    """State shared by every rule during one ``vjp`` call: new nodes, constants, types."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = opset_of(model)
        g = model.graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.types: dict[str, onnx.TypeProto] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self.types[vi.name] = vi.type
        self.consts: dict[str, np.ndarray] = {}
        self._const_protos: dict[str, TensorProto] = {}
        for init in g.initializer:
            self._const_protos[init.name] = init
            self.types[init.name] = helper.make_tensor_type_proto(init.data_type, list(init.dims))
        for node in g.node:
            if node.op_type == "Constant" and node.attribute:
                a = node.attribute[0]
                if a.name == "value":
                    self._const_protos[node.output[0]] = a.t
                    self.types[node.output[0]] = helper.make_tensor_type_proto(a.t.data_type, list(a.t.dims))
                elif a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                    arr = np.asarray(helper.get_attribute_value(a),
                                     dtype=np.float32 if "float" in a.name else np.int64)
                    self.consts[node.output[0]] = arr
                    self.types[node.output[0]] = helper.make_tensor_type_proto(
                        helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        self.used = {n for n in self.types}
        for node in g.node:
            self.used.update(node.input)
            self.used.update(node.output)
            self.used.add(node.name)
        # Small integer tensors (pad amounts, slice axes) and tiny float ones (a Resize's scales
        # behind a Cast, as float16 conversions write them) fold; larger float ones are weights.
        self._folder = Folder(g, self.opset, self._leaf, cache=self.consts, admit=self._foldable,
                              accept=lambda v: v.size <= (4096 if v.dtype.kind in "iub" else SMALL_FLOAT))
        self.fresh = FreshNames(self.used, PREFIX)
        self._shape_cache: dict[str, str] = {}
        self._scalar_cache: dict[tuple, str] = {}

    def _foldable(self, name: str) -> bool:
        if self.elem_type(name) not in FLOAT_TYPES:
            return True
        shape = self.shape(name)
        return shape is not None and None not in shape and int(np.prod(shape)) <= SMALL_FLOAT

    def const_value(self, name: str) -> Optional[np.ndarray]:
        """A constant's value, or that of a small integer tensor computed from constants only
        (exporters that skip constant folding pass slice axes and pad amounts as
        ``Unsqueeze(Constant)`` and the like; rules need them as values)."""
        return self._folder.get(name)

    def _leaf(self, name: str) -> Optional[np.ndarray]:
        proto = self._const_protos.get(name)
        if proto is None:
            return None
        arr = weights.array(proto)
        self.consts[name] = arr
        return arr

    def add_const(self, arr: np.ndarray, hint: str = "const") -> str:
        key = None
        if arr.size <= 16:
            key = (arr.dtype.str, arr.shape, arr.tobytes())
            if key in self._scalar_cache:
                return self._scalar_cache[key]
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.consts[name] = arr
        self.types[name] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        if key is not None:
            self._scalar_cache[key] = name
        return name

    def emit(self, op_type: str, inputs: list[str], n_out: int, domain: str, attrs: dict) -> list[str]:
        outs = [self.fresh(op_type) for _ in range(n_out)]
        clean = {}
        for k, v in attrs.items():
            if isinstance(v, np.ndarray):
                v = numpy_helper.from_array(v)
            elif isinstance(v, (np.integer,)):
                v = int(v)
            elif isinstance(v, (np.floating,)):
                v = float(v)
            clean[k] = v
        node = helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type + "_node"),
                                domain=domain or None, **clean)
        self.nodes.append(node)
        self._infer(node, domain)
        return outs

    def _infer(self, node: onnx.NodeProto, domain: str) -> None:
        """Record output types of an emitted node, so later rules know its shape."""
        if domain not in ("", "ai.onnx"):
            return
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
            in_types = {n: self.types[n] for n in node.input if n and n in self.types}
            data = {n: self._data_proto(n) for n in node.input if n and self._is_small_const(n)}
            res = onnx.shape_inference.infer_node_outputs(
                schema, node, in_types, data, opset_imports=[helper.make_opsetid("", self.opset)])
        except Exception:
            return
        for name, tp in res.items():
            self.types[name] = tp

    def _is_small_const(self, name: str) -> bool:
        """Shape-like constants help inference; weights would only cost a serialisation."""
        if name in self.consts:
            return self.consts[name].size <= 4096
        proto = self._const_protos.get(name)
        return proto is not None and int(np.prod(proto.dims)) <= 4096

    def _data_proto(self, name: str) -> TensorProto:
        proto = self._const_protos.get(name)
        if proto is not None and not weights.is_placeholder(proto):
            return proto
        return numpy_helper.from_array(self.const_value(name), name)

    def elem_type(self, name: str) -> int:
        tp = self.types.get(name)
        if tp is None or not tp.HasField("tensor_type"):
            return TensorProto.UNDEFINED
        return tp.tensor_type.elem_type

    def shape(self, name: str) -> Optional[tuple]:
        dims = _dims(self.types.get(name))
        if dims is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in dims)

    def dims(self, name: str) -> Optional[tuple]:
        return _dims(self.types.get(name))

    def shape_of(self, name: str) -> str:
        if name not in self._shape_cache:
            self._shape_cache[name] = self.emit("Shape", [name], 1, "", {})[0]
        return self._shape_cache[name]


class RuleContext:
    """What a rule sees: the forward node, and helpers that emit backward nodes."""

    def __init__(self, builder: _Builder, node: onnx.NodeProto, live: set) -> None:
        self._b = builder
        self._live = live
        self.node = node
        self.inputs: list[str] = list(node.input)
        self.outputs: list[str] = list(node.output)
        self.opset: int = builder.opset

    # ---- reading the forward graph -------------------------------------------------
    def attr(self, name: str, default=None):
        """Attribute as a Python value (str decoded, tensors as numpy), or ``default``."""
        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                if isinstance(v, bytes):
                    return v.decode("utf-8")
                if isinstance(v, TensorProto):
                    return numpy_helper.to_array(v)
                if isinstance(v, list):
                    return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v]
                return v
        return default

    def needs_grad(self, i: int) -> bool:
        """Whether input i lies on the differentiated path (rules skip the other inputs' work)."""
        return i < len(self.inputs) and bool(self.inputs[i]) and self.inputs[i] in self._live

    def shape(self, name: str) -> Optional[tuple]:
        """Static shape from inference; None for unknown dims (or None if even the rank is unknown)."""
        return self._b.shape(name)

    def dims(self, name: str) -> Optional[tuple]:
        """Like ``shape`` but symbolic dims keep their name (two equal names are equal dims)."""
        return self._b.dims(name)

    def rank(self, name: str) -> Optional[int]:
        s = self._b.shape(name)
        return None if s is None else len(s)

    def elem_type(self, name: str) -> int:
        return self._b.elem_type(name)

    def const_value(self, name: str) -> Optional[np.ndarray]:
        """Value of an initializer or Constant output; None for anything computed at run time."""
        if not name:
            return None
        return self._b.const_value(name)

    # ---- emitting ----------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs):
        """Emit one backward node with fresh output names; returns the name (or list of names)."""
        outs = self._b.emit(op_type, inputs, n_out, domain, attrs)
        return outs[0] if n_out == 1 else outs

    def const(self, value, like: Optional[str] = None, dtype=None) -> str:
        """A new initializer (small ones are shared).

        With ``dtype`` the value is cast to it.  Otherwise float values, and any
        number when ``like`` is a float tensor, take ``like``'s element type
        (float32 without ``like``); integers without ``like`` become int64.
        """
        arr = np.asarray(value)
        if dtype is not None:
            arr = arr.astype(dtype)
        else:
            et = self._b.elem_type(like) if like is not None else TensorProto.UNDEFINED
            if et in FLOAT_TYPES and arr.dtype.kind in "fiub":
                arr = arr.astype(_np_dtype(et))
            elif arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            elif arr.dtype.kind in "iu":
                arr = arr.astype(np.int64)
        return self._b.add_const(arr)

    def shape_of(self, name: str) -> str:
        """Run-time Shape(name), emitted once per tensor."""
        return self._b.shape_of(name)

    def set_shape(self, t: str, like: str) -> None:
        """Record that ``t`` has ``like``'s shape where inference cannot see it (e.g. an Expand)."""
        if like in self._b.types:
            self._b.types[t] = self._b.types[like]

    def reduce_sum(self, x: str, axes: list[int], keepdims: bool = True) -> str:
        """ReduceSum in the opset-13+ form (axes as input); empty ``axes`` means nothing to reduce."""
        if not axes:
            return x
        return self.op("ReduceSum", [x, self.const(np.asarray(sorted(axes), dtype=np.int64))],
                       keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        """Unsqueeze in the opset-13+ form (axes as input)."""
        if not axes:
            return x
        return self.op("Unsqueeze", [x, self.const(np.asarray(axes, dtype=np.int64))])

    def squeeze(self, x: str, axes: list[int]) -> str:
        """Squeeze in the opset-13+ form (axes as input)."""
        if not axes:
            return x
        return self.op("Squeeze", [x, self.const(np.asarray(axes, dtype=np.int64))])

    def reshape_like(self, g: str, like: str) -> str:
        """Reshape ``g`` to the runtime shape of ``like`` (skipped when static shapes already agree)."""
        sg, sl = self._b.dims(g), self._b.dims(like)
        if sg is not None and sl is not None and sg == sl and all(d is not None for d in sg):
            return g
        return self.op("Reshape", [g, self.shape_of(like)])

    def unbroadcast(self, g: str, like: str) -> str:
        """Sum ``g`` over the axes numpy broadcasting added to reach it from ``like``.

        A no-op (no node at all) when the static shapes agree; unknown dims on
        both sides are assumed equal, since the derived graph must serve every
        batch size and broadcasting along the batch axis is what Expand is for.
        """
        sg, sl = self._b.dims(g), self._b.dims(like)
        if sl is None:
            raise UnsupportedOpError(self.node.op_type, self.node.name,
                                     f"(unknown rank of {like!r}, needed to undo broadcasting)")
        if sg is None:
            # Without a known rank of g the only safe assumption is "no broadcasting".
            return g
        lead = len(sg) - len(sl)
        axes = list(range(lead))
        keep, ambiguous = [], []
        for i, dl in enumerate(sl):
            dg = sg[lead + i]
            if dl == 1 and dg != 1:
                keep.append(lead + i)
            elif dl == dg or isinstance(dl, int):
                continue                     # equal, or g broadcast to like's static size
            elif isinstance(dl, str) and dg is None or dl is None and isinstance(dg, str) or isinstance(dg, int):
                ambiguous.append((lead + i, i))   # like's run-time size may be 1 or g's size
        if not axes and not keep and not ambiguous:
            return g
        r = g
        for ax, i in ambiguous:
            r = self._sum_to_runtime_size(r, ax, like, i, len(sg))   # keeps the rank
        if keep and axes:
            # one pass over the big tensor; dropping the leading unit axes is free
            return self.squeeze(self.reduce_sum(r, axes + keep, keepdims=True), axes)
        if keep:
            return self.reduce_sum(r, keep, keepdims=True)
        return self.reduce_sum(r, axes, keepdims=False) if axes else r

    def _sum_to_runtime_size(self, g: str, ax: int, like: str, i: int, rank: int) -> str:
        """Sum axis ``ax`` of g down to like's run-time size L there, which is g's size or 1.

        Viewing the axis as [L, G/L] and summing the second part covers both
        cases without a branch: a no-op when L == G, the full sum when L == 1.
        """
        sl = self.op("Slice", [self.shape_of(like), self.const([i]), self.const([i + 1])])
        sg = self.shape_of(g)
        parts = []
        if ax > 0:
            parts.append(self.op("Slice", [sg, self.const([0]), self.const([ax])]))
        parts += [sl, self.const([-1])]
        if ax + 1 < rank:
            parts.append(self.op("Slice", [sg, self.const([ax + 1]), self.const([rank])]))
        split = self.op("Reshape", [g, self.op("Concat", parts, axis=0)])
        return self.reduce_sum(split, [ax + 1], keepdims=False)

    def zeros_like(self, name: str) -> str:
        """Zeros of name's run-time shape and element type (ConstantOfShape, no input data read)."""
        et = self._b.elem_type(name)
        if et == TensorProto.UNDEFINED:
            et = TensorProto.FLOAT
        value = np.zeros((1,), dtype=_np_dtype(et))
        return self.op("ConstantOfShape", [self.shape_of(name)], value=value)


# ---------------------------------------------------------------------------------------
# The vjp driver.


def _is_float(builder: _Builder, name: str) -> bool:
    et = builder.elem_type(name)
    return et == TensorProto.UNDEFINED or et in FLOAT_TYPES


def _all_names(graph: onnx.GraphProto) -> set:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def _check_names(graph: onnx.GraphProto, y: str, wrt: Sequence[str], outputs: Sequence[str]) -> None:
    names = _all_names(graph)
    for kind, items in (("output", [y]), ("input", list(wrt)), ("extra output", list(outputs))):
        for n in items:
            if n not in names:
                raise LayerError(f"unknown tensor {n!r} (asked as gradient {kind}); it is not in the model graph")


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs, and the outer names its If/Loop/Scan bodies capture,
    which are inputs too though the node does not list them (torch.onnx writes ``x.squeeze(1)`` of an
    unknown size as an If whose branches read ``x``)."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            local = {i.name for i in body.input} | {i.name for i in body.initializer} | {o for n in body.node for o in n.output}
            names += [i for i in (r for n in body.node for r in _reads(n)) if i not in local]
    return names


def _path(graph: onnx.GraphProto, builder: _Builder, y: str, wrt: Sequence[str]) -> tuple[list[int], set]:
    """Indices of the nodes between ``wrt`` and ``y``, and the tensors on that path."""
    reach = set(wrt)
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        if any(i in reach for i in _reads(node)):
            for o in node.output:
                if o and (_is_float(builder, o) or node.op_type in INTEGER_CARRIERS):
                    reach.add(o)
    live = {y} & reach
    on_path: list[int] = []
    for idx in range(len(graph.node) - 1, -1, -1):
        node = graph.node[idx]
        if not any(o in live for o in node.output if o):
            continue
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        ins = [i for i in _reads(node) if i in reach]
        if not ins:
            continue
        on_path.append(idx)
        live.update(ins)
    on_path.reverse()
    return on_path, live


def _float_type(tp: onnx.TypeProto) -> onnx.TypeProto:
    """A gradient's type: its tensor's, in float32 where the tensor holds a quantiser's integers."""
    if not tp.HasField("tensor_type") or tp.tensor_type.elem_type in FLOAT_TYPES:
        return tp
    out = onnx.TypeProto()
    out.CopyFrom(tp)
    out.tensor_type.elem_type = TensorProto.FLOAT
    return out


def _integer_break(graph: onnx.GraphProto, builder: _Builder, y: str, wrt: Sequence[str]) -> Optional[tuple]:
    """(node, input) where the only value path from ``wrt`` to ``y`` turns into integers, if it does.

    A score that depends on the input only through integer tensors (a QOperator-quantised
    model's ``QLinearConv``, a ``Cast`` to uint8) would get a gradient of zeros: an answer that
    looks like a map and says nothing. Shape computations and the comparison ops of
    ``NON_DIFFERENTIABLE`` are not value paths.
    """
    floats, any_kind = set(wrt), set(wrt)
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE or not any(i in any_kind for i in node.input if i):
            continue
        any_kind.update(o for o in node.output if o)
        if any(i in floats for i in node.input if i):
            floats.update(o for o in node.output if o and (_is_float(builder, o) or node.op_type in INTEGER_CARRIERS))
    if y not in any_kind:
        return None
    ancestors = {y}
    for node in reversed(graph.node):
        if any(o in ancestors for o in node.output if o) and node.op_type not in NON_DIFFERENTIABLE:
            ancestors.update(i for i in node.input if i in any_kind)
    for node in graph.node:
        if node.op_type in NON_DIFFERENTIABLE:
            continue
        src = next((i for i in node.input if i in floats), None)
        if src is not None and any(o in ancestors and o not in floats for o in node.output if o):
            return node, src
    return None


def _value_info(name: str, tp: Optional[onnx.TypeProto], fallback_elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    vi = onnx.ValueInfoProto()
    vi.name = name
    if tp is not None and tp.HasField("tensor_type") and tp.tensor_type.elem_type:
        vi.type.CopyFrom(tp)
    else:
        vi.type.tensor_type.elem_type = fallback_elem
    return vi


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers no graph output depends on (dropped model outputs leave dead ends)."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs may read outer-scope names
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    for sn in sub.node:
                        needed.update(sn.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    input_names = {i.name for i in graph.input}
    for k in range(len(graph.initializer) - 1, -1, -1):     # in place: weights are not copied
        if graph.initializer[k].name not in needed and graph.initializer[k].name not in input_names:
            del graph.initializer[k]
    out_names = {o.name for o in graph.output}
    produced = {o for n in graph.node for o in n.output}
    vis = [v for v in graph.value_info if v.name in produced and v.name not in out_names]
    del graph.value_info[:]
    graph.value_info.extend(vis)


def _set_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    g = model.graph
    infos = {vi.name: vi for vi in list(g.input) + list(g.value_info) + list(g.output)}
    for init in g.initializer:
        infos.setdefault(init.name, helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    new = []
    for n in dict.fromkeys(names):
        vi = onnx.ValueInfoProto()
        if n in infos:
            vi.CopyFrom(infos[n])
        else:
            vi.name = n
            vi.type.tensor_type.elem_type = TensorProto.UNDEFINED
        new.append(vi)
    kept = {vi.name for vi in new}
    known = {vi.name for vi in g.value_info}
    g.value_info.extend(vi for vi in g.output if vi.name not in kept and vi.name not in known)
    del g.output[:]
    g.output.extend(new)


def spelled_ops(model: onnx.ModelProto) -> list[str]:
    """The standard ops of ``model`` without a rule that `vjp` writes out as their spec bodies."""
    from . import rules as _load_rules  # noqa: F401  (registers the rules)

    return functions.function_ops(model, _ruled())


def _ruled() -> set[str]:
    """The standard ops that keep their own node: those with a rule, and those without a gradient."""
    return VJP_RULES.keys() | NON_DIFFERENTIABLE


def vjp(model: onnx.ModelProto, y: str, wrt: Sequence[str], *, rules: Optional[Mapping[str, Rule]] = None,
        outputs: Sequence[str] = (), simplify: bool = True) -> onnx.ModelProto:
    """Model computing ``y``, the tensors in ``outputs`` and d<grad_y, y>/d x for every x in ``wrt``.

    The returned graph takes the original inputs plus ``grad_<y>`` (the cotangent, shaped like
    ``y``) and outputs ``y``, then ``outputs``, then ``grad_<x>`` per ``wrt`` entry. ``rules``
    replaces registered rules for this call only (Guided Backprop swaps the Relu rule).
    ``simplify`` folds BatchNorm into Conv and drops Identity/Dropout first, which roughly halves
    backward cost on ResNet-style models without changing any kept tensor.

    A model whose backward needs a later opset's op form (a Gather at indices computed at run
    time, as after a NonMaxSuppression, is adjoint to a scatter that adds repeats: opset 16) is
    upgraded to that opset, and only then: every other model keeps its own.
    """
    try:
        return _vjp(model, y, wrt, rules=rules, outputs=outputs, simplify=simplify)
    except OpsetTooOldError as exc:
        if opset_of(model) >= exc.opset:
            raise
        try:
            upgraded = upgrade_opset(model, exc.opset)
        except Exception:
            raise exc from None
        return _vjp(upgraded, y, wrt, rules=rules, outputs=outputs, simplify=simplify)


def _vjp(model: onnx.ModelProto, y: str, wrt: Sequence[str], *, rules: Optional[Mapping[str, Rule]] = None,
         outputs: Sequence[str] = (), simplify: bool = True) -> onnx.ModelProto:
    """``vjp`` at the model's own opset."""
    from . import rules as _load_rules  # noqa: F401  (registers the rules)

    wrt = list(wrt)
    outputs = list(outputs)
    original = model
    model = normalize(model)
    spelled = functions.inline(model, _ruled())        # Attention, RMSNormalization, the model's own functions
    if spelled is not model:
        model = normalize(spelled)
    if model is original:             # everything below edits the model in place
        model = copy.deepcopy(model)
    _check_names(model.graph, y, wrt, outputs)
    refused: dict[str, str] = {}
    if recurrent.has_recurrent(model):
        model, refused = recurrent.unroll(model)
    if deform.has_deform(model):
        model, also = deform.expand(model)
        refused.update(also)
    if len(set(wrt)) != len(wrt):
        raise LayerError(f"duplicate tensors in gradient inputs {wrt!r}")
    _set_outputs(model, [y, *outputs])   # unrequested model outputs must not block simplification
    if simplify:
        from .simplify import simplify_inplace

        model = simplify_inplace(model, keep=[y, *wrt, *outputs])
    table: dict[str, Rule] = dict(VJP_RULES)
    if rules:
        table.update(rules)

    b = _Builder(model)
    g = model.graph
    if not _is_float(b, y):
        raise LayerError(f"tensor {y!r} is not floating point; cannot differentiate it")
    on_path, live = _path(g, b, y, wrt)
    if y not in live:
        broken = _integer_break(g, b, y, wrt)
        if broken is not None:
            node, src = broken
            kind = helper.tensor_dtype_to_np_dtype(b.elem_type(next(o for o in node.output if o))).name
            raise UnsupportedOpError(op_key(node, "."),
                                     node.name or node.output[0],
                                     f"on the path from {', '.join(repr(w) for w in wrt)} to {y!r}: it turns {src!r} "
                                     f"into {kind} values, and the score depends on the input only through them, so "
                                     "every gradient would be zero"
                                     + ("; a model quantised in QDQ form (QuantizeLinear/DequantizeLinear around float "
                                        "ops) keeps its gradients" if node.op_type.startswith(("QLinear", "QGemm"))
                                        or node.op_type.endswith("Integer") else ""))

    src = ", ".join(repr(w) for w in wrt)
    for k, idx in enumerate(on_path):
        node = g.node[idx]
        key = op_key(node)
        if key not in table:
            name = node.name or f"#{idx} ({node.op_type})"
            why = refused.get(node.name or node.output[0])
            raise UnsupportedOpError(op_key(node, "."), name,
                                     f"on the path from {src} to {y!r} (node {k + 1} of {len(on_path)})"
                                     + (f": {why}" if why else ""))

    _probe_unknown_ranks(model, b, [g.node[idx] for idx in on_path], live)

    grad_y = GRAD_PREFIX + y
    if grad_y in b.used:
        raise LayerError(f"the model already has a tensor named {grad_y!r}; cannot name the cotangent input")
    b.used.add(grad_y)
    y_type = b.types.get(y)
    b.types[grad_y] = y_type if y_type is not None else helper.make_tensor_type_proto(TensorProto.FLOAT, None)

    grads: dict[str, list[str]] = {y: [grad_y]}
    declared: list[str] = []      # gradients whose shape is their tensor's, written out as value_info

    def total(name: str) -> Optional[str]:
        parts = grads.get(name)
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        op = "Add" if len(parts) == 2 else "Sum"
        s = b.emit(op, parts, 1, "", {})[0]
        grads[name] = [s]
        return s

    for idx in reversed(on_path):
        node = g.node[idx]
        gys = []
        for o in node.output:
            t = total(o) if o in live else None
            if t is not None and o in b.types:
                b.types[t] = _float_type(b.types[o])   # a gradient has its tensor's shape: keep the better-known dims
                declared.append(t)
            gys.append(t)
        if all(t is None for t in gys):
            continue
        key = op_key(node)
        ctx = RuleContext(b, node, live)
        res = table[key](ctx, gys)
        if len(res) < len(node.input):
            res = list(res) + [None] * (len(node.input) - len(res))
        for i, gx in enumerate(res):
            if gx is None or not ctx.needs_grad(i):
                continue
            grads.setdefault(node.input[i], []).append(gx)

    out_names = [y, *outputs]
    grad_outs = []
    for x in wrt:
        gx = total(x)
        name = GRAD_PREFIX + x
        if name in b.used and name != grad_y:
            raise LayerError(f"the model already has a tensor named {name!r}")
        if gx is None:
            et = b.elem_type(x) if b.elem_type(x) != TensorProto.UNDEFINED else TensorProto.FLOAT
            shape = b.shape_of(x)
            b.nodes.append(helper.make_node("ConstantOfShape", [shape], [name], name=b.fresh("zeros_node"),
                                            value=numpy_helper.from_array(np.zeros((1,), _np_dtype(et)))))
        elif gx != name:           # gx == name: x is y itself, and its gradient the cotangent input
            b.nodes.append(helper.make_node("Identity", [gx], [name], name=b.fresh("out_node")))
        grad_outs.append(name)

    new = model
    ng = new.graph
    ng.node.extend(b.nodes)
    ng.initializer.extend(b.initializers)
    ng.input.append(_value_info(grad_y, y_type))
    del ng.output[:]
    seen = set()
    for n in out_names:
        if n in seen:
            continue
        seen.add(n)
        ng.output.append(_value_info(n, b.types.get(n)))
    for x, n in zip(wrt, grad_outs):
        ng.output.append(_value_info(n, b.types.get(x)))
    _prune(ng)
    _declare_shapes(ng, b, declared)
    return new


def _probe_unknown_ranks(model: onnx.ModelProto, b: _Builder, nodes: Sequence[onnx.NodeProto], live: set) -> None:
    """Fill in shapes that inference lost on the path by running the model (see ``probe``).

    A tensor counts as lost when its rank, or a dimension other than the first, is unknown:
    rules need ranks, and strided windows need static spatial sizes.
    """
    def lost(t: str) -> bool:
        s = b.shape(t)
        return s is None or any(d is None for d in s[1:])

    # every input, not only the differentiated ones: a Gather's rule needs its run-time indices' rank
    unknown = list(dict.fromkeys(t for node in nodes for t in [*node.input, *node.output] if t and lost(t)))
    if not unknown:
        return
    from .probe import probe_shapes, type_proto

    for name, (et, shape) in probe_shapes(model, unknown).items():
        known = b.shape(name)
        if known is not None and len(known) == len(shape):   # inference's dims stand; fill the gaps
            shape = tuple(k if k is not None else p for k, p in zip(known, shape))
        b.types[name] = type_proto(b.elem_type(name) or et, shape)


def _declare_shapes(graph: onnx.GraphProto, b: _Builder, names: Sequence[str]) -> None:
    """value_info for each gradient, typed like its forward tensor (symbolic batch name included).

    A runtime can then prove a gradient and a forward-derived mask equal-shaped
    (same dims, same batch symbol), which ONNX Runtime's CPU build needs to run
    their product in its blocked layout (see ``rules.blocked``).
    """
    io = {v.name for v in graph.input} | {v.name for v in graph.output} | {v.name for v in graph.value_info}
    produced = {o for n in graph.node for o in n.output}
    for name in dict.fromkeys(names):
        tp = b.types.get(name)
        if name in io or name not in produced or tp is None or not tp.HasField("tensor_type"):
            continue
        if not tp.tensor_type.HasField("shape"):
            continue
        vi = onnx.ValueInfoProto()
        vi.name = name
        vi.type.CopyFrom(tp)
        graph.value_info.append(vi)
