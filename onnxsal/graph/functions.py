"""Standard ops that the ONNX spec defines as functions of other ops, written out as those ops.

Opset 23 added ``Attention`` and ``RMSNormalization``, and ``torch.onnx.export(..., opset_version=23)``
writes them for every ``scaled_dot_product_attention`` and ``nn.RMSNorm``. The spec defines each
such op by a function body of simpler ops (built for the node's attributes and input types), and
ONNX ships those bodies (``OpSchema.get_context_dependent_function``). An op that onnxsal has no
rule for, but that has such a body, is replaced by it, once, at load: the body's ops all have rules,
so the gradient follows the spec's own definition instead of a hand-written rule per new op.
The replacement runs through ONNX's own inliner (``onnx.inliner``), which renames the body's
tensors and resolves its attribute references.

Ops with a rule keep it (their rules are cheaper than their bodies), and so do ops without a
gradient (``DynamicQuantizeLinear``'s scale is held: ``qoperator.py``).
"""

from __future__ import annotations

from typing import Collection, Optional

import onnx
from onnx import defs, helper, inliner, shape_inference

from ..errors import ModelError
from .normalize import opset_of

DOMAIN = "onnxsal.spec_function"       # where the bodies sit while the inliner replaces their nodes
ROUNDS = 4                             # a body may use other function ops (Attention's CastLike)


def _schema(op_type: str, opset: int) -> Optional[defs.OpSchema]:
    try:
        return defs.get_schema(op_type, opset, "")
    except defs.SchemaError:
        return None


def _has_body(schema: Optional[defs.OpSchema]) -> bool:
    return schema is not None and (schema.has_function or schema.has_context_dependent_function)


def function_ops(model: onnx.ModelProto, ruled: Optional[Collection[str]] = None) -> list[str]:
    """The op types in the top-level graph that `inline` writes out, sorted: calls of the model's
    own functions, and default-domain ops with a spec body that are not in ``ruled``."""
    opset = opset_of(model)
    local = {(f.domain, f.name) for f in model.functions}
    return sorted({n.op_type for n in model.graph.node if (n.domain, n.op_type) in local
                   or n.domain in ("", "ai.onnx") and _spelled(n.op_type, opset, ruled)})


def _spelled(op_type: str, opset: int, ruled: Optional[Collection[str]]) -> bool:
    return ruled is not None and op_type not in ruled and _has_body(_schema(op_type, opset))


def inline(model: onnx.ModelProto, ruled: Optional[Collection[str]] = None) -> onnx.ModelProto:
    """A copy of ``model`` with the model's own functions and each op of `function_ops` written
    out; ``model`` itself when there is none. ``ruled`` are the op types to keep (those with a
    VJP rule); None keeps every standard op and writes out only the model's own functions."""
    out = model
    for _ in range(ROUNDS):
        if not out.functions and not function_ops(out, ruled):
            break
        out = _inline_once(out, ruled)
    return out


def _inline_once(model: onnx.ModelProto, ruled: Optional[Collection[str]]) -> onnx.ModelProto:
    """Every function call written out by ONNX's inliner, which also converts a body written for
    another opset to the model's."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model = model_copy
    opset = opset_of(model)
    spelled = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and _spelled(n.op_type, opset, ruled)]
    if spelled:
        inferred = shape_inference.infer_shapes(model)
        g = inferred.graph
        types = {vi.name: vi.type for vi in list(g.input) + list(g.value_info) + list(g.output)}
        for init in g.initializer:
            types.setdefault(init.name, helper.make_tensor_type_proto(init.data_type, list(init.dims)))
        have = {imp.domain for imp in model.opset_import}
        for k, node in enumerate(spelled):
            schema = _schema(node.op_type, opset)
            _with_defaults(schema, node)
            body = _body(schema, node, types, opset)
            body.domain, body.name = DOMAIN, f"{node.op_type}_{k}"
            node.domain, node.op_type = DOMAIN, body.name
            model.functions.append(body)
            for imp in body.opset_import:
                if imp.domain not in have:
                    model.opset_import.append(imp)
                    have.add(imp.domain)
        if DOMAIN not in have:
            model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    called = {(f.domain, f.name) for f in model.functions}
    out = inliner.inline_local_functions(model)
    left = sorted({n.op_type for n in out.graph.node if (n.domain, n.op_type) in called})
    if left:                       # the inliner skips a function written for another opset: convert it
        try:
            out = inliner.inline_local_functions(shape_inference.infer_shapes(model), convert_version=True)
        except RuntimeError as exc:
            raise ModelError(f"cannot write out the model's function {left[0]!r} for the model's opset "
                             f"{opset}: {str(exc).splitlines()[0]}") from exc
    del out.functions[:]
    used = {n.domain for n in out.graph.node} | {"", "ai.onnx"}
    keep = [imp for imp in out.opset_import if imp.domain in used or imp.domain not in {d for d, _ in called}]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    return out


def _with_defaults(schema: defs.OpSchema, node: onnx.NodeProto) -> None:
    """Write the schema's default of every attribute the node leaves out: the inliner drops a
    reference to an absent attribute, which would leave the body's op at its own default."""
    given = {a.name for a in node.attribute}
    for name, spec in schema.attributes.items():
        default = spec.default_value
        if name not in given and default is not None and default.type != onnx.AttributeProto.UNDEFINED:
            attr = onnx.AttributeProto()
            attr.CopyFrom(default)
            attr.name = name
            node.attribute.append(attr)


def _body(schema: defs.OpSchema, node: onnx.NodeProto, types: dict, opset: int) -> onnx.FunctionProto:
    """The spec's body of ``node`` for the model's opset: its plain function, or the one built for
    its attributes and input types. A body holds for the opsets from its own version up to the
    next one, so it is labelled with the model's."""
    body = onnx.FunctionProto()
    if schema.has_context_dependent_function:
        arg_types = [types[i].SerializeToString() if i in types else onnx.TypeProto().SerializeToString()
                     for i in node.input]
        body.ParseFromString(schema.get_context_dependent_function_with_opset_version(
            opset, node.SerializeToString(), arg_types))
    else:
        body.ParseFromString(schema.get_function_with_opset_version(opset))
    imports = [imp for imp in body.opset_import if imp.domain not in ("", "ai.onnx")]
    del body.opset_import[:]
    body.opset_import.extend(imports + [helper.make_opsetid("", opset)])
    return body
