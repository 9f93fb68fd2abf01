"""Derive models from one model: expose inner tensors, split at a tensor, replace a tensor.

All keep the original nodes untouched (so exposed activations are bit-for-bit
those of the model) and prune what the new outputs do not need, so a head or
tail costs only its own share of the forward pass.
"""

from __future__ import annotations

import copy
import os
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import LayerError, MethodError, ModelError
from .normalize import BATCH, opset_of, tensor_shapes


def _value_info(model: onnx.ModelProto, name: str, shapes: dict) -> onnx.ValueInfoProto:
    """The typed value info of `name`, its batch dimension symbolic."""
    if name not in shapes:
        producers = {o for n in model.graph.node for o in n.output}
        if name not in producers and name not in {i.name for i in model.graph.input}:
            raise LayerError(f"tensor {name!r} does not exist in the model")
        return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    elem, shape = shapes[name]
    if shape is None:
        return helper.make_tensor_value_info(name, elem, None)
    dims = list(shape)              # None marks an unknown dimension
    if dims:
        dims[0] = BATCH
    return helper.make_tensor_value_info(name, elem, dims)


def needed_nodes(graph: onnx.GraphProto, outputs: Iterable[str], given: set[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """Nodes needed to compute `outputs` from `given` tensors; also the graph inputs that are reached."""
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    keep: set[int] = set()
    reached: set[str] = set()
    stack = list(outputs)
    seen: set[str] = set()
    index = {id(n): k for k, n in enumerate(graph.node)}
    while stack:
        t = stack.pop()
        if t in seen or t == "":
            continue
        seen.add(t)
        if t in given or t in inits:
            continue
        node = producer.get(t)
        if node is None:
            reached.add(t)
            continue
        keep.add(index[id(node)])
        stack.extend(node.input)
        for attr in node.attribute:  # subgraph captures (If/Loop bodies)
            if attr.type == onnx.AttributeProto.GRAPH:
                stack.extend(_outer_names(attr.g))
    return [graph.node[k] for k in sorted(keep)], reached


def _outer_names(g: onnx.GraphProto) -> list[str]:
    local = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    return [i for n in g.node for i in n.input if i not in local]


def _rebuild(model: onnx.ModelProto, nodes, inputs, outputs) -> onnx.ModelProto:
    used = {i for n in nodes for i in n.input} | {o.name for o in outputs}
    for n in nodes:
        for attr in n.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used.update(_outer_names(attr.g))
    g = model.graph
    graph = helper.make_graph(
        [copy.deepcopy(n) for n in nodes],
        g.name,
        inputs,
        outputs,
        initializer=[i for i in g.initializer if i.name in used],
        value_info=[v for v in g.value_info if v.name in used],
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.producer_name = "onnxsal"
    return out


def as_proto(model: Union[onnx.ModelProto, str, os.PathLike, object]) -> onnx.ModelProto:
    """The public graph functions' model: an onnx.ModelProto, an ONNX file's path, or a loaded
    onnxsal Model (its ``proto``)."""
    if isinstance(model, (str, os.PathLike)):
        from ..model import read_proto

        return read_proto(model)
    proto = model if isinstance(model, onnx.ModelProto) else getattr(model, "proto", None)
    if not isinstance(proto, onnx.ModelProto):
        raise ModelError(f"a model is an ONNX file's path or an onnx.ModelProto, not {type(model).__name__}")
    return proto


def given_names(names: Union[str, Sequence[str]], what: str = "tensors") -> list[str]:
    """Tensor names as given: one name is a list of one, not one name per letter, and anything but
    names (an index, a Layer's position) is a LayerError naming what was given."""
    listed = [names] if isinstance(names, str) else names
    if not isinstance(listed, (list, tuple)) or not all(isinstance(n, str) for n in listed):
        raise LayerError(f"{what} are named by strings (one name or a list of names), not {names!r}")
    return list(listed)


def _given(model: Union[onnx.ModelProto, str, os.PathLike], names: Union[str, Sequence[str]]
           ) -> tuple[onnx.ModelProto, list[str]]:
    return as_proto(model), given_names(names)


def _cut_at(at: object) -> str:
    if not isinstance(at, str):
        raise LayerError(f"the tensor to cut at is one name, not {at!r}")
    return at


def expose(model: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """The model with `tensors` as its outputs, in that order, and nothing else computed."""
    model, tensors = _given(model, tensors)
    g = model.graph
    shapes = tensor_shapes(model)
    outputs = [_value_info(model, t, shapes) for t in tensors]
    inits = {i.name for i in g.initializer}
    nodes, reached = needed_nodes(g, tensors, set())
    inputs = [i for i in g.input if i.name not in inits and (i.name in reached or i.name in tensors)]
    return _rebuild(model, nodes, inputs, outputs)


def split(model: onnx.ModelProto, at: str, outputs: Sequence[str]) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Head (inputs -> `at`) and tail (`at` -> `outputs`); tail(head(x)) == model(x).

    Raises LayerError when the tail still needs a model input, i.e. a path from
    the input reaches the outputs around `at` (a skip connection across it).
    """
    model, outputs, at = *_given(model, outputs), _cut_at(at)
    head = expose(model, [at])
    g = model.graph
    inits = {i.name for i in g.initializer}
    nodes, reached = needed_nodes(g, outputs, {at})
    graph_inputs = {i.name for i in g.input if i.name not in inits}
    leaks = sorted(reached & graph_inputs)
    if leaks:
        raise LayerError(f"cannot split at {at!r}: the outputs also depend on {', '.join(leaks)} through other paths")
    shapes = tensor_shapes(model)
    tail = _rebuild(model, nodes, [_value_info(model, at, shapes)], [_value_info(model, o, shapes) for o in outputs])
    return head, tail


def replace(model: onnx.ModelProto, at: str, outputs: Sequence[str]) -> onnx.ModelProto:
    """The model computing `outputs` with tensor `at` given as an input instead of computed.

    Every path through `at` sees the given value; paths around it (a skip connection across
    it) still run from the model's own inputs, which stay inputs when they are needed.  Where
    `at` cuts the network in two this is `split`'s tail.
    """
    model, outputs, at = *_given(model, outputs), _cut_at(at)
    g = model.graph
    inits = {i.name for i in g.initializer}
    shapes = tensor_shapes(model)
    given = _value_info(model, at, shapes)
    nodes, reached = needed_nodes(g, outputs, {at})
    if at not in outputs and not any(at in n.input for n in nodes):
        raise LayerError(f"{', '.join(outputs)} do not depend on {at!r}")
    inputs = [given] + [i for i in g.input if i.name not in inits and i.name in reached and i.name != at]
    return _rebuild(model, nodes, inputs, [_value_info(model, o, shapes) for o in outputs])


REST = "onnxsal_rest"


def with_rest_head(model: onnx.ModelProto, logits: str) -> str:
    """Append ``logits + LogSoftmax(logits)`` (ShapleyCAM's ReST target: the logit minus the cross
    entropy) to ``model`` in place, as a new output; returns its name."""
    shape = next((v.type.tensor_type.shape for v in model.graph.output if v.name == logits), None)
    if shape is not None and len(shape.dim) not in (0, 2):
        raise MethodError("the ReST target needs a classifier's (N, classes) logits; use rest=False")
    ls = REST + "_logsoftmax"
    model.graph.node.extend([helper.make_node("LogSoftmax", [logits], [ls], axis=-1, name=ls),
                             helper.make_node("Add", [logits, ls], [REST], name=REST)])
    model.graph.output.append(helper.make_tensor_value_info(REST, onnx.TensorProto.FLOAT, None))
    return REST


def subgraphs(graph: onnx.GraphProto):
    """Every If/Loop/Scan body inside ``graph``, nested ones included."""
    for node in graph.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                yield sub
                yield from subgraphs(sub)


def tensor_names(graph: onnx.GraphProto) -> set:
    """Every name a new tensor must not take: inputs, initializers and node outputs."""
    return {i.name for i in graph.input} | {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}


class FreshNames:
    """``<prefix><k>_<hint>`` names that nothing in ``used`` has; each one handed out joins ``used``
    (pass one set to several of these to keep their names apart)."""

    def __init__(self, used: set, prefix: str) -> None:
        self.used, self.prefix, self.count = used, prefix, 0

    def __call__(self, hint: str) -> str:
        while True:
            self.count += 1
            name = f"{self.prefix}{self.count}_{hint}"
            if name not in self.used:
                self.used.add(name)
                return name


class ReadableNames:
    """``name`` itself, or ``name_2``, ``name_3``... when it is taken: for nodes written in place of
    others, whose names should still read like the model's own. Node names count as taken too."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used = tensor_names(graph) | {n.name for n in graph.node}

    def __call__(self, name: str) -> str:
        k, out = 1, name
        while out in self.used:
            k += 1
            out = f"{name}_{k}"
        self.used.add(out)
        return out


class Appender:
    """Nodes and constants added to ``model``'s graph in place, under readable fresh names: for the
    scores onnxsal builds on a model's outputs (a class's best kept detection, a keypoint's
    confidence, a cosine similarity)."""

    def __init__(self, model: onnx.ModelProto, prefix: str) -> None:
        self.g, self.prefix, self.opset = model.graph, prefix, opset_of(model)
        self.fresh = ReadableNames(model.graph)

    def const(self, values, dtype=np.float32) -> str:
        name = self.fresh(f"{self.prefix}_const")
        self.g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name

    def op(self, op_type: str, inputs: list, out: str = "", **attrs) -> str:
        """One node; its output ``out`` (made fresh) or a fresh name after the op."""
        res = self.fresh(out) if out else self.fresh(f"{self.prefix}_{op_type.lower()}")
        self.g.node.append(helper.make_node(op_type, inputs, [res], name=self.fresh(f"onnxsal_{op_type.lower()}"),
                                            **attrs))
        return res

    def declare(self, name: str, elem_type: int, dims: list, batch_of: str, output: bool = False) -> None:
        """Type ``name`` as (N, *dims), its batch dimension (symbol or value) that of ``batch_of``; as
        the graph's first output with ``output``, else as value_info."""
        vi = helper.make_tensor_value_info(name, elem_type, [None] + list(dims))
        batch = next((v.type.tensor_type.shape.dim[0] for v in list(self.g.output) + list(self.g.value_info)
                      if v.name == batch_of and v.type.tensor_type.shape.dim), None)
        if batch is not None:
            vi.type.tensor_type.shape.dim[0].CopyFrom(batch)
        if output:
            self.g.output.insert(0, vi)
        else:
            self.g.value_info.append(vi)

    def reduce(self, op_type: str, x: str, axes: list, keepdims: int = 1, out: str = "") -> str:
        """A reduction in the model's opset form: axes an input (ReduceSum from 13, the rest from 18)."""
        if op_type == "ReduceSum" or self.opset >= 18:
            return self.op(op_type, [x, self.const(axes, np.int64)], out, keepdims=keepdims)
        return self.op(op_type, [x], out, axes=axes, keepdims=keepdims)


MS = "com.microsoft"      # ONNX Runtime's own op domain


def op_key(node: onnx.NodeProto, sep: str = ":") -> str:
    """``Conv`` for a default-domain op, ``com.microsoft<sep>FusedConv`` for another domain's."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}{sep}{node.op_type}"


def constant_ints(node: onnx.NodeProto, index: int, attr: str, consts) -> Optional[list[int]]:
    """An ints operand that old opsets give as attribute ``attr`` and new ones as constant input
    ``index`` (a reduction's axes); None when absent or computed at run time. ``consts``: a
    name -> array lookup (``simplify.constants``)."""
    value = next((list(a.ints) for a in node.attribute if a.name == attr), None)
    if value is None and len(node.input) > index and node.input[index]:
        held = consts.get(node.input[index])
        value = None if held is None else np.ravel(held).tolist()
    return None if value is None else [int(v) for v in value]


def node_attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def text_attr(node: onnx.NodeProto, name: str, default: str) -> str:
    """A string attribute as ``str``: ONNX stores it as bytes, and an absent or empty one reads as ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = onnx.helper.get_attribute_value(a)
            return (value.decode() if isinstance(value, bytes) else str(value)) or default
    return default


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere it appears in the (top-level) graph."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.name == old:
            vi.name = new


class Refused(Exception):
    """The node cannot be written out (`write_out`); the message says why."""


class Emitter:
    """Appends nodes and constants under one name prefix: the ops one node is written out as."""

    def __init__(self, prefix: str, taken: set) -> None:
        self.name, self.nodes, self.inits = FreshNames(taken, prefix + "/"), [], []

    def const(self, arr: np.ndarray, hint: str = "c") -> str:
        n = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), n))
        return n

    def op(self, op_type: str, inputs: list, n_out: int = 1, out: Optional[list] = None, **attrs):
        outs = out or [self.name(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_node"), **attrs))
        return outs[0] if n_out == 1 else outs


def write_out(model: onnx.ModelProto, wanted: Callable[[onnx.NodeProto], bool], prefix: str, failing: str,
              write: Callable[[onnx.NodeProto, "Emitter"], None]) -> dict:
    """Replace, in place, each default-domain node ``wanted`` picks by the nodes ``write`` emits
    for it (the ops a fused node stands for, before differentiation); a node ``write`` refuses
    stays. Returns {node name: "<op> with <why> <failing>"} for those."""
    g = model.graph
    taken = tensor_names(g)
    nodes, refused = [], {}
    for k, node in enumerate(g.node):
        if wanted(node) and node.domain in ("", "ai.onnx"):
            em = Emitter(f"{prefix}{k}", taken)
            try:
                write(node, em)
            except Refused as why:
                refused[node.name or node.output[0]] = f"{node.op_type} with {why} {failing}"
            else:
                nodes += em.nodes
                g.initializer.extend(em.inits)
                continue
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return refused
