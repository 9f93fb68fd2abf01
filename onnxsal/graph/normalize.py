"""Bring any ONNX model into the one form the rest of onnxsal works on.

Every derived graph (exposed outputs, VJP, split) starts from a normalised
model, so the rules and methods can rely on: a default-domain opset of at
least 13 (axes as inputs for Squeeze/Unsqueeze/ReduceSum, Softmax on one
axis), a symbolic batch dimension (masked inputs and noisy copies run in
batches through the same graph), and inferred shapes on every tensor.
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference, version_converter

from ..errors import ModelError
from . import batch_axis, weights
from .pool_geometry import POOLS, explicit_pads, may_differ, node_windows, pads_movable
from .static_if import inline_static_ifs

MIN_OPSET = 13
BATCH = "N"
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

Shape = tuple  # tuple of int | None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def upgrade_opset(model: onnx.ModelProto, to: int = MIN_OPSET) -> onnx.ModelProto:
    """Old opsets flatten Softmax to 2-D and pass axes as attributes; lift them once here (to a
    later opset where a gradient needs one of its op forms)."""
    if opset_of(model) >= to:
        return model
    try:
        out = version_converter.convert_version(_standard_ops(model), to)
    except Exception as exc:  # the converter raises bare RuntimeErrors
        raise ModelError(f"model uses opset {opset_of(model)} and could not be upgraded to {to}: {exc}") from exc
    out.ir_version = max(out.ir_version, 7)    # opset 13's: the weights need not be inputs (normalize drops them)
    return out


# Experimental ops of opsets 1-9, dropped at opset 10 (the ONNX model zoo's emotion-ferplus-8 and
# tinyyolov2-8 scale their input with ImageScaler): ONNX Runtime still runs them, but the version
# converter has no schema for them. Each is written as the elementwise ops it computes.
INT64_END = 2**63 - 1
EXPERIMENTAL = ("ImageScaler", "Affine", "ScaledTanh", "ParametricSoftplus", "Crop")


def _per_activation(n: onnx.NodeProto) -> bool:
    """A BatchNormalization of opsets 1-8 with ``spatial=0``: statistics per activation, (C, H, W),
    which opset 9 dropped and the version converter refuses."""
    return n.op_type == "BatchNormalization" and any(a.name == "spatial" and a.i == 0 for a in n.attribute)


def _idle_pad_value(n: onnx.NodeProto) -> bool:
    """A Pad of opsets 2-10 in reflect or edge mode with a ``value`` attribute, which those modes
    ignore: the version converter keeps the attribute, which opset 11's Pad does not have, so the
    upgraded graph would not load ("Unrecognized attribute: value")."""
    from .surgery import node_attrs

    if n.op_type != "Pad":
        return False
    a = node_attrs(n)
    return "value" in a and a.get("mode", b"constant") not in (b"constant", "constant")


def _standard_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with its `EXPERIMENTAL` ops and per-activation BatchNormalizations written
    as standard ops, and idle Pad values dropped (``_idle_pad_value``); ``model`` itself when it has
    none."""
    if not any((n.op_type in EXPERIMENTAL or _per_activation(n) or _idle_pad_value(n)) and n.domain in ("", "ai.onnx")
               for n in model.graph.node):
        return model
    out = copy.deepcopy(model)
    g = out.graph
    legacy = {"broadcast": 1} if opset_of(model) < 7 else {}     # before opset 7, Add and Mul broadcast on request
    nodes = []
    k = 0

    def const(value, shape=()) -> str:
        nonlocal k
        k += 1
        name = f"onnxsal_experimental/const_{k}"
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).reshape(shape), name))
        if opset_of(model) < 7 or out.ir_version < 4:   # initializers listed as inputs, as old models must
            g.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape)))
        return name

    def op(op_type: str, inputs: list, output: str = "", **attrs) -> str:
        nonlocal k
        k += 1
        output = output or f"onnxsal_experimental/t_{k}"
        nodes.append(onnx.helper.make_node(op_type, inputs, [output], name=f"onnxsal_experimental/{op_type}_{k}",
                                           **attrs))
        return output

    for n in g.node:
        if _idle_pad_value(n) and n.domain in ("", "ai.onnx"):
            kept = [x for x in n.attribute if x.name != "value"]
            del n.attribute[:]
            n.attribute.extend(kept)
        if (n.op_type not in EXPERIMENTAL and not _per_activation(n)) or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        x, y = n.input[0], n.output[0]
        if n.op_type == "BatchNormalization":       # (x - mean) / sqrt(var + eps) * scale + bias, per activation
            scale, bias, mean, var = n.input[1:5]
            std = op("Sqrt", [op("Add", [var, const(a.get("epsilon", 1e-5))], **legacy)])
            op("Add", [op("Mul", [op("Sub", [x, mean], **legacy), op("Div", [scale, std])], **legacy), bias], y, **legacy)
        elif n.op_type == "ImageScaler":              # y = scale x + bias[c]
            bias = a.get("bias", [0.0])
            scaled = op("Mul", [x, const(a.get("scale", 1.0))], **legacy)
            op("Add", [scaled, const(bias, (1, len(bias), 1, 1))], y, **legacy)
        elif n.op_type == "Affine":                 # y = alpha x + beta
            op("Add", [op("Mul", [x, const(a.get("alpha", 1.0))], **legacy), const(a.get("beta", 0.0))], y, **legacy)
        elif n.op_type == "ScaledTanh":             # y = alpha tanh(beta x)
            op("Mul", [op("Tanh", [op("Mul", [x, const(a.get("beta", 1.0))], **legacy)]), const(a.get("alpha", 1.0))],
               y, **legacy)
        elif n.op_type == "Crop":                   # border (left, top, right, bottom), or a size from left, top
            left, top, right, bottom = (list(a.get("border", [])) + [0, 0, 0, 0])[:4]
            if "scale" in a:
                h, w = a["scale"]
                ends = [top + h, left + w]
            else:
                ends = [-bottom if bottom else INT64_END, -right if right else INT64_END]
            op("Slice", [x], y, starts=[top, left], ends=ends, axes=[2, 3])
        else:                                       # ParametricSoftplus: y = alpha ln(exp(beta x) + 1)
            op("Mul", [op("Softplus", [op("Mul", [x, const(a.get("beta", 1.0))], **legacy)]), const(a.get("alpha", 1.0))],
               y, **legacy)
    del g.node[:]
    g.node.extend(nodes)
    return out


def constant_fills(model: onnx.ModelProto) -> onnx.ModelProto:
    """The experimental ``ConstantFill`` of opsets 1-9 written as ``ConstantOfShape``. torch.onnx
    writes ``torch.ones_like`` and ``full_like`` so at opsets 7 and 8; the version converter passes
    the node through, and neither ONNX Runtime ("not a registered function/op") nor shape inference
    knows it, so everything after it had no shape. Its output's shape is the input's values
    (``input_as_shape=1``), the input's shape, or the ``shape`` attribute, then ``extra_shape``."""
    from .surgery import ReadableNames, node_attrs

    if not any(n.op_type == "ConstantFill" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    model = copy.deepcopy(model)
    g = model.graph
    names = ReadableNames(g)
    nodes = []
    for n in g.node:
        if n.op_type != "ConstantFill" or n.domain not in ("", "ai.onnx"):
            nodes.append(n)
            continue
        a = node_attrs(n)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(int(a.get("dtype", onnx.TensorProto.FLOAT)))
        value = numpy_helper.from_array(np.array([a.get("value", 0.0)], dtype))
        base = n.name or n.output[0]
        extra = [int(v) for v in a.get("extra_shape") or []]
        if not n.input or not n.input[0]:
            shape = [int(v) for v in a.get("shape") or []] + extra
            nodes.append(onnx.helper.make_node("Constant", [], [n.output[0]], name=base, value=numpy_helper.from_array(
                np.full(shape, a.get("value", 0.0), dtype))))
            continue
        shape = names(base + "/shape")
        if int(a.get("input_as_shape", 0)):
            nodes.append(onnx.helper.make_node("Cast", [n.input[0]], [shape], name=shape, to=onnx.TensorProto.INT64))
        else:
            nodes.append(onnx.helper.make_node("Shape", [n.input[0]], [shape], name=shape))
        if extra:
            stored, full = names(base + "/extra_shape"), names(base + "/full_shape")
            g.initializer.append(numpy_helper.from_array(np.array(extra, np.int64), stored))
            nodes.append(onnx.helper.make_node("Concat", [shape, stored], [full], name=full, axis=0))
            shape = full
        nodes.append(onnx.helper.make_node("ConstantOfShape", [shape], [n.output[0]], name=base, value=value))
    del g.node[:]
    g.node.extend(nodes)
    return model


def _const_values(graph: onnx.GraphProto) -> dict:
    vals = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            vals[node.output[0]] = node.attribute[0].t
    return vals


def _fixed_batch(g: onnx.GraphProto) -> tuple:
    """(the batch size the file fixes or None, the first input that fixes it, the leading dims of
    inputs and outputs that hold it, those inputs' names)."""
    init_names = {i.name for i in g.initializer}
    inputs = {vi.name for vi in g.input}
    fixed, first, freed, sources = None, None, [], []
    for vi in list(g.input) + list(g.output):
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        dims = tt.shape.dim if tt is not None and tt.HasField("shape") else []
        if len(dims) >= 2 and dims[0].HasField("dim_value"):
            # The first input fixes the batch size; a second input with another
            # leading size (a lookup table, a mask) has no batch axis to free.
            fixed = fixed or dims[0].dim_value
            first = first or (vi.name if vi.name in inputs else None)
            if dims[0].dim_value == fixed:
                freed.append(dims[0])
                if vi.name in inputs:
                    sources.append(vi.name)
    return fixed, first, freed, sources


def batch_tracer(model: onnx.ModelProto) -> Optional[batch_axis.Tracer]:
    """The batch traced through a graph whose inputs fix a batch size; None for a graph with a
    free batch, or when shape inference cannot read the file's shapes.

    The trace reads the graph with its shape values stored as the file fixes them
    (`_shapes_stored`): TorchScript sizes Swin's window padding and ViT's class token from
    ``Shape`` at run time, and only their values at the file's batch tell whether they pad or
    repeat the batch. The graph itself keeps computing them at run time, from the batch it gets."""
    fixed, first, _, sources = _fixed_batch(model.graph)
    if not (fixed and first):
        return None
    view, static = _shapes_stored(model)
    if not static:
        return None
    tracer = batch_axis.Tracer(view.graph, static, _const_values(view.graph), sources, fixed)
    tracer.per_sample = _stored_per_sample(view, tracer)
    return tracer


def _stored_per_sample(view: onnx.ModelProto, tracer: batch_axis.Tracer) -> dict[str, tuple[int, int]]:
    """Tensors computed from constants alone that meet the batch holding a copy per sample of the
    file's batch, and the same copy for each: name -> (the batch's axis in it, entries per sample).

    An exporter at a fixed batch N bakes N into what it computes from stored tensors: XCiT's
    positional encoding ``.repeat(N, 1, 1, 1)``, CaiT's class token expanded and folded into a
    stored (N, 1, 192), EdgeNeXt's sine encoding of an (N, H, W) grid, Sequencer2D's zero LSTM
    states for N times the rows. At batch N they broadcast or match; at any other batch they fail.
    One run of the file gives their values; those with equal copies are rebuilt from the first
    copy for the batch the graph gets (normalize.dynamic_batch). At a batch of 1 only recurrent
    states need it: anything else of one copy broadcasts."""
    found: dict[str, tuple[int, int]] = {}
    for node in view.graph.node:
        out = tracer.where.get(node.output[0]) if node.output else None
        if out is None or out[0] < 0 or node.op_type == "Concat":      # Concat: its own rule
            continue
        b, inner = out
        try:
            rank, size = len(tracer.shape(node.output[0])), tracer.shape(node.output[0])[b]
        except KeyError:
            continue
        for i, name in enumerate(node.input):
            if not name or name in tracer.where or name in found or name not in tracer.dims:
                continue
            d = tracer.dims[name]
            if d is None or any(v is None for v in d):
                continue
            if node.op_type in ("LSTM", "GRU", "RNN"):
                if i not in (5, 6) or (name in tracer.consts and not tracer.const(name).any()):
                    continue                      # stored zeros: dropped (_follow_batch)
                k = 0 if batch_axis._attr(node, "layout", 0) else 1        # states (dirs, N, H)
                x = tracer.where.get(node.input[0])
                if x is None or x[0] < 0:
                    continue
                inner, size = x[1], tracer.shape(node.input[0])[x[0]]
            elif tracer.batch == 1:
                continue
            else:
                k = b - (rank - len(d))           # broadcasting aligns the last axes
            if 0 <= k < len(d) and d[k] == size == tracer.batch * inner:
                found[name] = (k, inner)
    if not found or tracer.batch == 1:
        return found
    from .probe import at_file_batch

    types = {k: v[0] for k, v in tensor_shapes(infer(view)).items() if k in found}
    _, values = at_file_batch(view, [], list(found), types)
    same = {}
    for name, (k, inner) in found.items():
        v = values.get(name)
        if v is not None and batch_axis.copies_equal(v, k, tracer.batch, inner):
            same[name] = (k, inner)
    return same


def _shapes_stored(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """A copy of `model` with each ``Shape`` and ``Size`` stored as the constant it is at the file's
    own input dims and the integer arithmetic on them folded, and the dims of every tensor.

    Shape inference cannot size a tensor padded by amounts computed from shapes (it does not
    evaluate Swin's ``Mod``), nor anything after it; one run of the file at its fixed batch
    (`probe.at_file_batch`) reads those dims and the shape values. Without a run (an input that
    is not floating point), the view is the model and the dims are inference's."""
    dims = inferred_dims(model)
    pieces = [n.output[0] for n in model.graph.node
              if n.op_type in ("Shape", "Size") and n.domain in ("", "ai.onnx") and n.output]
    unknown = [o for n in model.graph.node for o in n.output
               if o and (dims.get(o) is None or any(v is None for v in dims[o]))]
    if not pieces and not unknown:
        return model, dims
    from .probe import at_file_batch

    sizes, values = at_file_batch(model, unknown, pieces)
    if not sizes and not values:
        return model, dims
    stored = _stored_as_constants(model, {k: v.astype(np.int64) for k, v in values.items()})
    return fold_integer_constants(stored), {**dims, **sizes}


def dynamic_batch(model: onnx.ModelProto, tracer: Optional[batch_axis.Tracer] = None) -> onnx.ModelProto:
    """Make dim 0 of inputs and outputs symbolic, and the graph's shape constants follow it.

    Exporters often bake a batch of 1 into the graph (``Reshape(x, [1, -1])``). Where the
    batch lies in each reshaped tensor is traced from the inputs (`batch_axis.Tracer`): the
    dynamo exporter moves it (torchvision's ViT runs attention sequence first, the batch on
    axis 1) and merges it with other axes (``(197, 12, 64)``, the batch and twelve heads in
    one). A Reshape whose batch is traced gets the file's own output shape as its target,
    with -1 on the axis that holds the batch. Constants that the file concatenates with a
    batch of 1 (a class token) are expanded to the batch, and a ``Gather`` that reads one row
    out of a flattened batch (the exporter's ``as_strided``) reads that row from every one.

    Where the tracer loses the batch, a target's leading 1 becomes 0 ("copy this dim from the
    input", the default ``allowzero=0`` meaning) when the reshaped tensor's own first axis is
    the batch, and the image input's batch size read at run time otherwise. Only tensors
    computed from the graph's inputs carry a batch: a constant's leading 1 (ONNX Runtime's
    dynamic quantiser reshapes each bias to ``(1, C, 1, 1)``) is a broadcast axis and stays.
    """
    model = copy.deepcopy(model)
    g = model.graph
    init_names = {i.name for i in g.initializer}
    consts = _const_values(g)
    fixed, first, freed, _ = _fixed_batch(g)
    if fixed is None:
        return model
    leading = {}            # Reshape targets that start with the batch, read before any is rewritten
    for n in g.node:
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in consts:
            target = weights.array(consts[n.input[1]])
            if target.reshape(-1)[:1].tolist() == [fixed]:
                leading[n.input[1]] = target.copy()
    if tracer is None:
        tracer = batch_tracer(model)
    # the file's own shapes
    static = tracer.dims if tracer is not None else inferred_dims(model) if first and leading else {}
    axes = tracer.axes if tracer is not None else {}
    for dim in freed:
        dim.Clear()
        dim.dim_param = BATCH
    batched = {vi.name for vi in g.input if vi.name not in init_names}   # tensors computed from the inputs
    nodes: list[onnx.NodeProto] = []
    batch_size = ""
    batched_targets: dict[str, str] = {}
    made: dict[tuple, str] = {}

    def constant(values: np.ndarray, name: str) -> str:
        key = (name.split("/")[0], values.dtype.str, values.shape, values.tobytes())
        if key not in made:
            made[key] = f"onnxsal_batch/{name}_{len(made)}"
            g.initializer.append(numpy_helper.from_array(values, made[key]))
        return made[key]

    def run_time_batch() -> str:
        nonlocal batch_size
        if not batch_size:
            batch_size = f"onnxsal_batch/{first}_batch_size"
            nodes.append(onnx.helper.make_node("Shape", [first], [f"onnxsal_batch/{first}_shape"],
                                               name=f"onnxsal_batch/{first}_shape/Shape"))
            for k, v in (("zero", 0), ("one", 1)):
                g.initializer.append(numpy_helper.from_array(np.array([v], np.int64), f"{batch_size}_{k}"))
            nodes.append(onnx.helper.make_node("Slice", [f"onnxsal_batch/{first}_shape", f"{batch_size}_zero",
                                                         f"{batch_size}_one"], [batch_size], name=f"{batch_size}/Slice"))
        return batch_size

    per_sample: dict[str, str] = {}

    def one_copy_per_sample(name: str) -> str:
        """`name` (a copy per sample of the file's batch, all equal) rebuilt for the batch at run time."""
        if name not in per_sample:
            k, inner = tracer.per_sample[name]
            rank = len(tracer.shape(name))
            first, reps = f"onnxsal_batch/{name}_one_sample", f"onnxsal_batch/{name}_repeats"
            nodes.append(_first_sample(name, k, inner, first, constant))
            nodes.append(onnx.helper.make_node("Concat", _batch_at(k, rank, constant, run_time_batch), [reps],
                                               axis=0, name=f"{reps}/Concat"))
            per_sample[name] = f"onnxsal_batch/{name}_per_sample"
            nodes.append(onnx.helper.make_node("Tile", [first, reps], [per_sample[name]],
                                               name=f"{per_sample[name]}/Tile"))
        return per_sample[name]

    for node in g.node:
        if any(i in batched for i in node.input):
            batched.update(node.output)
        if tracer is not None and tracer.per_sample and node.op_type != "Concat":
            for k, name in enumerate(node.input):
                if name in tracer.per_sample:
                    node.input[k] = one_copy_per_sample(name)
        if tracer is not None and _follow_batch(node, axes, tracer, nodes, constant, run_time_batch, consts):
            continue
        target = node.input[1] if node.op_type == "Reshape" and len(node.input) > 1 else ""
        allowzero = any(a.name == "allowzero" and a.i == 1 for a in node.attribute)
        shape = leading.get(target) if target in leading and node.input[0] in batched and not allowzero else None
        if shape is None or shape.ndim != 1 or shape.size < 2:
            nodes.append(node)      # a bias reshaped to (1, C, 1, 1) has no batch to copy
            continue
        shape = shape.copy()
        own = static.get(node.input[0])
        if own and own[0] == fixed:        # else the batch size read at run time: equal to the file at batch 1
            shape[0] = 0
            # a new constant: the exporter may share this one with an Expand, where 0 is no copy
            node.input[1] = constant(shape.astype(np.int64), f"{target}_batch_copied")
        else:
            if target not in batched_targets:      # one per shape constant, shared by its Reshapes
                rest, joined = f"onnxsal_batch/{target}_after_batch", f"onnxsal_batch/{target}_batched"
                batched_targets[target] = joined
                g.initializer.append(numpy_helper.from_array(shape[1:].astype(np.int64), rest))
                nodes.append(onnx.helper.make_node("Concat", [run_time_batch(), rest], [joined], axis=0,
                                                   name=f"{joined}/Concat"))
            node.input[1] = batched_targets[target]
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return model


def one_image_ops(model: onnx.ModelProto) -> list[str]:
    """The ops of a graph exported at batch 1 that read across its batch (a mean over axis 0, a
    pick of row 0), described; [] when it has none or a free batch.

    At batch 1 such an op is harmless; at any other batch it would mix the samples without an
    error, so such a graph must run one image at a time."""
    tracer = batch_tracer(model)
    return tracer.across if tracer is not None else []


def _follow_batch(node: onnx.NodeProto, axes: dict, tracer: "batch_axis.Tracer", nodes: list, constant,
                  run_time_batch, stored: dict) -> bool:
    """Rewrite `node` (appending it to `nodes`) so that it follows a batch traced through it.
    `stored`: the graph's own constants (the trace's also hold the shape values at the file's dims).

    False, with nothing appended, when the node needs no rewrite or the tracer lost the batch."""
    op, out = node.op_type, node.output[0] if node.output else ""
    a, b = axes.get(node.input[0], None) if node.input else None, axes.get(out, None)
    if op == "Expand" and a is None and b == 0 and tracer.copies_per_sample(node):
        # a stored tensor repeated for each sample of the file's batch: for each of the batch it gets
        rest = tracer.const(node.input[1]).astype(np.int64).reshape(-1)[1:]
        shape = f"onnxsal_batch/{node.name or out}_per_sample"
        nodes.append(onnx.helper.make_node("Concat", [run_time_batch(), constant(rest, "per_sample")], [shape],
                                           axis=0, name=f"{shape}/Concat"))
        node.input[1] = shape
        nodes.append(node)
        return True
    if op == "Concat":
        a = b                                     # its first input may be the stored one
    if a is None or b is None or a < 0 or b < 0:
        return False
    if op == "Reshape":
        plain = tracer.dims[node.input[0]][0] == tracer.batch and a == 0 and b == 0
        own = node.input[1] in stored                 # the leading-axis rule rewrites only those
        target = tracer.const(node.input[1]).reshape(-1) if own else None
        allowzero = any(x.name == "allowzero" and x.i == 1 for x in node.attribute)
        if plain and own and target[:1].tolist() == [tracer.batch] and not allowzero:
            return False                          # the leading-axis rule writes 0 there, as before
        shape = np.array(tracer.shape(out), np.int64)
        shape[b] = -1
        node.input[1] = constant(shape, f"{node.input[1]}_at_{b}")
    elif op == "Expand" and node.input[1] in tracer.consts:
        shape = tracer.const(node.input[1]).astype(np.int64).reshape(-1)
        k = b - (len(tracer.shape(out)) - shape.size)       # the shape is aligned to the output's last axes
        if k < 0 or shape[k] == 1:
            return False
        shape = shape.copy()
        shape[k] = 1                              # expanding the batch axis to its own size
        node.input[1] = constant(shape, f"{node.input[1]}_at_{b}")
    elif op in ("Resize", "AffineGrid") and b >= 0:
        k = 3 if op == "Resize" else 1           # Resize's sizes, AffineGrid's size: the batch's own size
        if len(node.input) <= k or not node.input[k] or node.input[k] not in tracer.consts:
            return False
        sizes = tracer.const(node.input[k]).astype(np.int64).reshape(-1)
        if sizes.size == 0:
            return False
        axes = [v % len(tracer.shape(out)) for v in (batch_axis._attr(node, "axes", None) or range(sizes.size))]
        if b not in axes:
            return False
        j = axes.index(b)
        batch = f"onnxsal_batch/{node.name or out}_batch"
        nodes.append(onnx.helper.make_node("Shape", [node.input[0]], [f"{batch}_shape"], name=f"{batch}/Shape"))
        nodes.append(onnx.helper.make_node("Slice", [f"{batch}_shape", constant(np.array([a], np.int64), "at"),
                                                     constant(np.array([a + 1], np.int64), "at")], [batch],
                                           name=f"{batch}/Slice"))
        parts = ([constant(sizes[:j], "sizes")] if j else []) + [batch] + \
            ([constant(sizes[j + 1:], "sizes")] if j + 1 < sizes.size else [])
        joined = f"onnxsal_batch/{node.name or out}_sizes"
        nodes.append(onnx.helper.make_node("Concat", parts, [joined], axis=0, name=f"{joined}/Concat"))
        node.input[k] = joined
    elif op in ("LSTM", "GRU", "RNN"):
        states = [k for k in (5, 6) if len(node.input) > k and node.input[k]]
        stored = [k for k in states if node.input[k] in tracer.consts]
        if not stored or len(stored) < len(states) or any(tracer.const(node.input[k]).any() for k in stored):
            return False
        for k in stored:              # zeros for a batch of 1: absent states are zeros for any batch
            node.input[k] = ""
        while node.input and not node.input[-1]:
            node.input.pop()
    elif op == "Concat":
        rank = len(tracer.shape(out))
        stored = [i for i in node.input if i and i not in axes]         # computed from constants alone
        if (not stored or any(tracer.shape(i)[b] != tracer.batch for i in node.input)
                or not all(tracer.same_in_each_sample(i, b) for i in stored)):
            return False
        shape_name = f"onnxsal_batch/{node.name or out}_batch_shape"
        nodes.append(onnx.helper.make_node("Concat", _batch_at(b, rank, constant, run_time_batch), [shape_name],
                                           axis=0, name=f"{shape_name}/Concat"))
        for k, name in enumerate(node.input):
            if name in stored:               # a class token, stored for the file's batch
                expanded = f"onnxsal_batch/{name}_to_batch_{k}_{node.name or out}"
                one = name
                if tracer.batch > 1:         # the same in each sample: the first one's
                    one = f"onnxsal_batch/{name}_first_{k}_{node.name or out}"
                    nodes.append(_first_sample(name, b, 1, one, constant))
                nodes.append(onnx.helper.make_node("Expand", [one, shape_name], [expanded], name=f"{expanded}/Expand"))
                node.input[k] = expanded
    elif op == "Gather" and a == b and node.input[1] not in axes:
        idx = batch_axis._strided_gather(tracer, node, a)
        axis = int(batch_axis._attr(node, "axis", 0)) % len(tracer.shape(node.input[0]))
        if idx is None or axis != a:
            return False
        data = tracer.shape(node.input[0])
        rows = f"onnxsal_batch/{node.input[0]}_rows"
        split = np.array(data[:a] + [-1, data[a] // tracer.batch] + data[a + 1:], np.int64)
        nodes.append(onnx.helper.make_node("Reshape", [node.input[0], constant(split, "rows")], [rows],
                                           name=f"{rows}/Reshape"))
        node.input[0], node.input[1] = rows, constant(idx[0].astype(np.int64), "row_indices")
        for attr in node.attribute:
            if attr.name == "axis":
                attr.i = a + 1
        if not any(attr.name == "axis" for attr in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("axis", a + 1))
    else:
        return False
    nodes.append(node)
    return True


def _batch_at(axis: int, rank: int, constant, run_time_batch) -> list[str]:
    """The pieces of a shape of ones with the batch at run time on `axis` (Concat them on axis 0):
    the repeats or the expanded shape of a tensor stored for one sample."""
    ones = np.ones(rank, np.int64)
    return ([constant(ones[:axis], "ones")] if axis else []) + [run_time_batch()] + \
        ([constant(ones[axis + 1:], "ones")] if axis + 1 < rank else [])


def _first_sample(name: str, axis: int, inner: int, out: str, constant) -> onnx.NodeProto:
    """A Slice of `name`'s first sample (its first `inner` entries along `axis`) into `out`."""
    at = lambda v: constant(np.array([v], np.int64), "at")  # noqa: E731
    return onnx.helper.make_node("Slice", [name, at(0), at(inner), at(axis)], [out], name=f"{out}/Slice")


def inferred_dims(model: onnx.ModelProto) -> dict:
    """Tensor name -> dims as the file declares and infers them (before the batch is freed), with
    shape values propagated (a Reshape whose target is sliced from a ``Shape`` gets its dims)."""
    light = without_weight_data(model)
    for data_prop in (True, False):
        try:
            inferred = shape_inference.infer_shapes(light, data_prop=data_prop)
        except Exception:
            continue
        return {k: v[1] for k, v in tensor_shapes(inferred).items() if v[1] is not None}
    return {}


SMALL_CONST = 4096   # initializers up to this many elements may matter to data propagation
_INTEGER_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)


def without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with large initializers turned into typed graph inputs.

    Shape inference and the checker serialise the whole model; for a VGG16 that
    is half a gigabyte of weights they only need the shapes of.  Small constants
    stay, since data propagation reads shape tensors.
    """
    light = weights.shell(model)
    g, lg = model.graph, light.graph
    inputs = {i.name for i in g.input}
    for init in g.initializer:
        if int(np.prod(init.dims)) <= SMALL_CONST:
            lg.initializer.append(init)
        elif init.name not in inputs:
            lg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _infer_shapes(model: onnx.ModelProto, data_prop: bool) -> None:
    light = shape_inference.infer_shapes(without_weight_data(model), data_prop=data_prop)
    del model.graph.value_info[:]
    model.graph.value_info.extend(light.graph.value_info)
    del model.graph.output[:]
    model.graph.output.extend(light.graph.output)


def dilated_same_convs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Conv nodes with ``auto_pad=SAME_*`` and a dilation, given the explicit pads ONNX defines for
    them. ONNX Runtime refuses to run such a node ("Dilation not supported for AutoPadType"), and
    torch.onnx writes ``nn.Conv2d(padding="same", dilation=2)`` so; the pads are PyTorch's too (the
    odd unit at the end for SAME_UPPER). A stride above 1 needs the input's static size."""
    from .surgery import node_attrs

    def same_dilated(n: onnx.NodeProto) -> bool:
        attrs = node_attrs(n)
        return n.op_type == "Conv" and n.domain in ("", "ai.onnx") and attrs.get("auto_pad") in (b"SAME_UPPER", b"SAME_LOWER") \
            and any(int(d) != 1 for d in attrs.get("dilations") or [])
    todo = [i for i, n in enumerate(model.graph.node) if same_dilated(n)]
    if not todo:
        return model
    shapes = None
    model = copy.deepcopy(model)
    weight_dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for i in todo:
        node = model.graph.node[i]
        attrs = node_attrs(node)
        kernel = [int(k) for k in attrs.get("kernel_shape") or []]
        if not kernel:                                   # read off the weight's shape
            w = weight_dims.get(node.input[1])
            if w is None:
                continue
            kernel = [int(k) for k in w[2:]]
        n = len(kernel)
        strides = [int(s) for s in attrs.get("strides") or [1] * n]
        dilations = [int(d) for d in attrs.get("dilations")]
        sizes: list = [None] * n
        if any(s != 1 for s in strides):
            if shapes is None:
                try:
                    shapes = tensor_shapes(shape_inference.infer_shapes(without_weight_data(model)))
                except Exception:
                    shapes = {}
            x = shapes.get(node.input[0], (0, None))[1]
            if x is None or len(x) != n + 2 or any(v is None for v in x[2:]):
                continue                                 # left as it is: the runtime's own error follows
            sizes = list(x[2:])
        begin, end = [], []
        for k, s, d, h in zip(kernel, strides, dilations, sizes):
            dk = d * (k - 1) + 1
            total = dk - 1 if s == 1 else max(0, (-(-h // s) - 1) * s + dk - h)
            b = total // 2 if attrs["auto_pad"] == b"SAME_UPPER" else total - total // 2
            begin.append(b)
            end.append(total - b)
        kept = {k: v for k, v in attrs.items() if k != "auto_pad"}
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in {**kept, "pads": begin + end}.items())
    return model


def runtime_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pooling nodes whose windows ONNX's inference and ONNX Runtime size differently, rewritten
    with explicit pads where both agree (``pool_geometry``). One node per pass, in graph order: a
    pool after a rewritten one sees its true input size only in the next pass's inference."""
    from .surgery import node_attrs

    pools = [i for i, n in enumerate(model.graph.node) if n.op_type in POOLS and n.domain in ("", "ai.onnx")
             and may_differ(node_attrs(n))]
    copied = False
    for _ in range(len(pools)):
        try:
            shapes = tensor_shapes(shape_inference.infer_shapes(without_weight_data(model)))
        except Exception:
            return model
        for i in pools:
            node = model.graph.node[i]
            x, y = shapes.get(node.input[0], (0, None))[1], shapes.get(node.output[0], (0, None))[1]
            attrs = node_attrs(node)
            n = len(attrs.get("kernel_shape") or [])
            if not n or x is None or y is None or len(x) != n + 2 or len(y) != n + 2 \
                    or any(v is None for v in x[2:]):
                continue
            try:
                sizes = [out for _, _, out in node_windows(attrs, x[2:])]
                pads = explicit_pads(attrs, x[2:])
            except (ValueError, ZeroDivisionError):       # attributes the runtime refuses anyway
                continue
            if list(y[2:]) == sizes or pads is None:
                continue
            if not copied:
                # and forget the sizes the file declares for its outputs: a writer that ran ONNX's inference
                # wrote the wrong ones there, and a declared output wins over an inferred one (inner tensors'
                # declared sizes are inferred afresh)
                model, copied = copy.deepcopy(model), True
                for vi in model.graph.output:
                    vi.type.tensor_type.ClearField("shape")
            _rewrite_pool(model.graph.node[i], attrs, pads)
            break
        else:
            return model
    return model


def wide_pool_pads(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pools with a pad at least as large as their kernel, their pads moved into a Pad node before
    them. ONNX allows such pads and ONNX Runtime refuses them ("Pad should be smaller than
    kernel"): torch.onnx writes ``nn.MaxPool2d(2, 2, padding=1, ceil_mode=True)`` so at opsets
    before 10, which have no ceil mode, where the last window keeps a place in the end padding.
    A pool whose pads cannot move (``pool_geometry.pads_movable``) is left as it is, and ONNX
    Runtime's refusal follows."""
    from .surgery import ReadableNames, node_attrs

    def wide(n: onnx.NodeProto) -> Optional[dict]:
        if n.op_type not in POOLS or n.domain not in ("", "ai.onnx"):
            return None
        attrs = node_attrs(n)
        kernel = [int(k) for k in attrs.get("kernel_shape") or []]
        pads = [int(p) for p in attrs.get("pads") or []]
        auto_pad = attrs.get("auto_pad", b"NOTSET") or b"NOTSET"
        if auto_pad not in (b"NOTSET", "NOTSET") or int(attrs.get("ceil_mode", 0)) or len(pads) != 2 * len(kernel):
            return None
        as_wide = any(p >= kernel[i % len(kernel)] for i, p in enumerate(pads))
        return attrs if as_wide and pads_movable(n.op_type, attrs, _argmax(n)) else None
    todo = [(i, attrs) for i, n in enumerate(model.graph.node) if (attrs := wide(n)) is not None]
    if not todo:
        return model
    model = copy.deepcopy(model)
    g = model.graph
    elem = {}
    if any(g.node[i].op_type == "MaxPool" for i, _ in todo):
        try:
            elem = {k: t for k, (t, _) in tensor_shapes(shape_inference.infer_shapes(without_weight_data(model))).items()}
        except Exception:
            pass
    names = ReadableNames(g)
    added: list[tuple[int, onnx.NodeProto]] = []
    for i, attrs in todo:
        node = g.node[i]
        if node.op_type == "MaxPool":
            dtype = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
                     onnx.TensorProto.DOUBLE: np.float64}.get(elem.get(node.input[0]))
            if dtype is None:
                continue                                  # no -inf to pad with that is known to fit
        n = len(attrs["kernel_shape"])
        pads = [0, 0] + [int(p) for p in attrs["pads"][:n]] + [0, 0] + [int(p) for p in attrs["pads"][n:]]
        base = names(f"{node.name or node.output[0]}/pads")
        inputs = [node.input[0], names(base + "/amounts")]
        g.initializer.append(numpy_helper.from_array(np.array(pads, np.int64), inputs[1]))
        if node.op_type == "MaxPool":
            inputs.append(names(base + "/value"))
            g.initializer.append(numpy_helper.from_array(np.array(-np.inf, dtype), inputs[2]))
        added.append((i, onnx.helper.make_node("Pad", inputs, [base], name=base, mode="constant")))
        node.input[0] = base
        for a in node.attribute:
            if a.name == "pads":
                a.ints[:] = [0] * (2 * n)
    for i, pad in reversed(added):
        g.node.insert(i, pad)
    return model


def _argmax(node: onnx.NodeProto) -> bool:
    return len(node.output) > 1 and bool(node.output[1])


def _rewrite_pool(node: onnx.NodeProto, attrs: dict, pads: list[int]) -> None:
    """`node` with explicit `pads` and ``ceil_mode=0`` (``pool_geometry.explicit_pads``)."""
    attrs = {k: v for k, v in attrs.items() if k not in ("auto_pad", "ceil_mode", "pads")}
    del node.attribute[:]
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in {**attrs, "pads": pads}.items())


def _infer_inplace(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        _infer_shapes(model, data_prop=True)
    except Exception:
        try:
            _infer_shapes(model, data_prop=False)
        except Exception:
            pass
    return model


def infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of ``model`` with inferred shapes (with data propagation when that works)."""
    return _infer_inplace(copy.deepcopy(model))


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Upgrade the opset, fold integer constants, free the batch dimension, infer shapes. Idempotent."""
    return normalize_traced(model)[0]


def normalize_traced(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """`normalize`'s model, and the ops the batch trace found reading across the batch
    (`one_image_ops`), from the one trace that frees it."""
    folded = upgrade_opset(model)
    for rewrite in (constant_fills, fold_integer_constants, dilated_same_convs, runtime_pools, wide_pool_pads):
        folded = rewrite(folded)
    tracer = batch_tracer(folded)
    free = dynamic_batch(folded, tracer)          # dynamic_batch already copied
    out = _infer_inplace(_weights_not_inputs(free))
    inlined = inline_static_ifs(out)              # reads the If's condition at batch 1 and 2: the batch free
    if inlined is not out:
        out = _infer_inplace(inlined)
    return out, (tracer.across if tracer is not None else [])


def fold_integer_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model (a copy, when anything folds) with small integer tensors computed from constants
    alone stored as constants.

    TorchScript exports compute shape pieces from constants (``Mod(2, 3)`` for an axis, then a
    Reshape of it), which ONNX's shape inference does not evaluate: the ``Slice`` of a ``Shape``
    that takes them has an unknown length, every Reshape after it an unknown rank, and the
    gradient rules need ranks (nn.MultiheadAttention's ``unflatten`` in a ViT exported at a fixed
    batch was refused for it). Evaluated once here, they are ordinary constants."""
    from .simplify import FOLDABLE, evaluate_node

    g = model.graph
    values: dict[str, np.ndarray] = {}
    for name, t in _const_values(g).items():
        if t.data_type in _INTEGER_TYPES and int(np.prod(t.dims)) <= SMALL_CONST and not weights.is_placeholder(t):
            values[name] = numpy_helper.to_array(t)
    outputs = {o.name for o in g.output}
    folded: dict[str, np.ndarray] = {}
    opset = opset_of(model)
    for node in g.node:
        if (node.op_type not in FOLDABLE or node.op_type in ("Shape", "Size") or node.domain not in ("", "ai.onnx")
                or not node.input or any(i and i not in values for i in node.input)
                or any(o in outputs for o in node.output)):
            continue
        outs = evaluate_node(node, [values.get(i) if i else None for i in node.input], opset)
        if outs is None or not all(v.dtype.kind in "iub" and v.size <= SMALL_CONST for v in outs):
            continue
        for name, v in zip(node.output, outs):
            values[name] = folded[name] = np.asarray(v)
    return _stored_as_constants(model, folded) if folded else model


def _stored_as_constants(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `model` with the tensors `values` stored as initializers and the nodes that
    computed them removed."""
    model = copy.deepcopy(model)
    g = model.graph
    kept = [n for n in g.node if not any(o in values for o in n.output)]
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in values.items())
    return model


def _weights_not_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop, in place, the graph inputs that are initializers too (``keep_initializers_as_inputs``,
    or any file of IR version 3): as constants, ONNX Runtime folds and fuses them."""
    if model.ir_version < 4:
        return model
    stored = {i.name for i in model.graph.initializer}
    if any(vi.name in stored for vi in model.graph.input):
        kept = [vi for vi in model.graph.input if vi.name not in stored]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return model


def free_negative_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every declared dim below 0 made a free one. Some converters (paddle2onnx's
    older releases: PP-OCR's direction classifier) write a dynamic dim as -1, which read as a size
    made a run at "the file's batch" fail inside NumPy with a negative dimension. The caller's proto
    is copied, not changed."""
    g = model.graph

    def negative(vi: onnx.ValueInfoProto) -> list:
        tt = vi.type.tensor_type
        return [d for d in tt.shape.dim if d.HasField("dim_value") and d.dim_value < 0] if tt.HasField("shape") else []

    if not any(negative(vi) for vi in list(g.input) + list(g.output) + list(g.value_info)):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    count = 0
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in negative(vi):
            d.Clear()
            d.dim_param = f"free_{count}"
            count += 1
    return out


def static_dims(vi: onnx.ValueInfoProto) -> Optional[list]:
    """A value's declared dims, None for a free one; None when it declares no shape."""
    tt = vi.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] if tt.HasField("shape") else None


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, Shape]]:
    """Name -> (onnx elem_type, shape with None for unknown dims) for every typed tensor."""
    out: dict[str, tuple[int, Shape]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        shape: Optional[tuple] = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        out[vi.name] = (tt.elem_type, shape)
    for init in g.initializer:
        out[init.name] = (init.data_type, tuple(init.dims))
    return out
