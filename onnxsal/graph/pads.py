"""Zero pads that a convolution can take as its own, folded into it before differentiating.

Keras writes ``ZeroPadding2D`` before each strided "valid" convolution (MobileNetV2's depthwise
layers). tf2onnx leaves it as a ``Pad`` followed by a transpose to NHWC and one back, where the
converter asked for the padding layer's output (the layer map); other files put the pair around
the ``Pad``. ONNX Runtime folds such a pad into the
convolution in a forward pass, but the gradient graph differentiates the nodes as written: a
``Slice`` per pad, outside ONNX Runtime's blocked layout, with a layout conversion on each side
and a gradient that is computed over the padded size first. Folded here, the convolution's own
rule crops its gradient, and the transposes around the pad go with it.

Only constant pads of zero on the spatial axes are folded, into a Conv whose pads are explicit
(or VALID), and only where the intermediate tensors have no other reader and no name the caller
keeps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from .surgery import node_attrs, text_attr


def _zero_pads(node: onnx.NodeProto, consts) -> Optional[list[int]]:
    """The begin-then-end pads of a constant Pad of zeros, or None for anything else."""
    if node.op_type != "Pad" or node.domain not in ("", "ai.onnx"):
        return None
    if text_attr(node, "mode", "constant") != "constant":
        return None
    attrs = node_attrs(node)
    if "pads" in attrs:                                   # opsets 1-10
        pads, value = attrs["pads"], attrs.get("value", 0.0)
    else:
        if len(node.input) > 3 and node.input[3]:        # axes (opset 18): left as written
            return None
        p = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if p is None:
            return None
        pads = [int(v) for v in np.asarray(p).reshape(-1)]
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            v = consts.get(node.input[2])
            if v is None or np.asarray(v).size != 1:
                return None
            value = float(np.asarray(v).reshape(()))
    if value != 0.0 or any(v < 0 for v in pads):
        return None
    return list(pads)


def _inverse(first: onnx.NodeProto, second: onnx.NodeProto) -> bool:
    """Whether the Transpose ``second`` undoes the Transpose ``first``."""
    p1, p2 = (list(node_attrs(n).get("perm", [])) for n in (first, second))
    return bool(p1) and len(p1) == len(p2) and all(p1[p2[i]] == i for i in range(len(p1)))


def fold_zero_pads(graph: onnx.GraphProto, protected: set, consts) -> int:
    """Fold zero Pads into the Conv that reads them (through a transpose pair, if any); returns how
    many were folded. ``consts`` reads constant values by name (``simplify.constants``)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def only_reader(t: str) -> Optional[onnx.NodeProto]:
        users = readers.get(t, [])
        return users[0] if len(users) == 1 and t not in protected else None

    dead: set[int] = set()
    folded = 0
    for pad in graph.node:
        pads = _zero_pads(pad, consts)
        if pads is None or id(pad) in dead:
            continue
        rank = len(pads) // 2
        source, out, drop = pad.input[0], pad.output[0], [pad]
        before = producer.get(source)
        after = only_reader(out)
        if before is not None and before.op_type == "Transpose" and after is not None and after.op_type == "Transpose" \
                and only_reader(before.output[0]) is pad:
            # Transpose -> Pad -> Transpose back: the pad on the first transpose's input instead
            p1 = list(node_attrs(before).get("perm", []))
            if len(p1) == rank and _inverse(before, after):
                moved = [0] * (2 * rank)
                for j in range(rank):
                    moved[p1[j]], moved[rank + p1[j]] = pads[j], pads[rank + j]
                pads, source, out = moved, before.input[0], after.output[0]
                drop = [before, pad, after]
                after = only_reader(out)
        # Pad -> Transpose -> Transpose back -> Conv: tf2onnx's pair around the padding layer's own
        # (NHWC) output, which is left once that output is no longer a graph output
        if after is not None and after.op_type == "Transpose":
            back = only_reader(after.output[0])
            if back is not None and back.op_type == "Transpose" and _inverse(after, back):
                drop += [after, back]
                out = back.output[0]
                after = only_reader(out)
        conv = after
        if conv is None or conv.op_type != "Conv" or conv.input[0] != out or rank < 3:
            continue
        if any(pads[k] or pads[rank + k] for k in (0, 1)):        # batch or channel pads
            continue
        auto = text_attr(conv, "auto_pad", "NOTSET")
        if auto not in ("NOTSET", "VALID"):
            continue
        own = list(node_attrs(conv).get("pads", [0] * (2 * (rank - 2)))) if auto == "NOTSET" else [0] * (2 * (rank - 2))
        s = rank - 2
        merged = [own[k] + pads[2 + k] for k in range(s)] + [own[s + k] + pads[rank + 2 + k] for k in range(s)]
        kept = [a for a in conv.attribute if a.name not in ("pads", "auto_pad")]
        del conv.attribute[:]
        conv.attribute.extend(kept)
        conv.attribute.append(onnx.helper.make_attribute("pads", merged))
        conv.input[0] = source
        dead.update(id(n) for n in drop)
        folded += 1
    if dead:
        nodes = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(nodes)
    return folded
