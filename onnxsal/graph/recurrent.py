"""LSTM, GRU and RNN nodes rewritten as the per-step ops they stand for, so the autodiff can
differentiate them with its ordinary rules.

An ONNX recurrent node runs a whole sequence inside one kernel, so no VJP rule can be written
for it from outside: its gradient needs every step's gates. Unrolled, each step is a MatMul, a
few elementwise ops and Splits, all of which have rules; the unrolled graph is exactly the ONNX
operator's definition (gate order iofc / zrh, both biases, peepholes, reverse and bidirectional
directions, batch-first layout), so forward values agree with the fused kernel to float rounding.

This needs a sequence length known when the graph is built (an image model's sequence is a
feature map's width) and constant weights. Variable ``sequence_lens``, ``input_forget``, the
``clip`` of the cell and activations other than Sigmoid, Tanh and Relu are refused; the reason
reaches the user through the autodiff's UnsupportedOpError for that node.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .normalize import _infer_inplace, opset_of, tensor_shapes
from .simplify import Folder, constants
from .surgery import Emitter, Refused, node_attrs, text_attr, write_out

RECURRENT = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
ACTIVATIONS = ("Sigmoid", "Tanh", "Relu")


def _unroll(node: onnx.NodeProto, consts: Folder, shapes: dict, em: Emitter) -> None:
    op = node.op_type
    a = node_attrs(node)
    hidden = int(a.get("hidden_size", 0))
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[text_attr(node, "direction", "forward")]
    layout = int(a.get("layout", 0))
    if a.get("clip") is not None:
        raise Refused("a cell clip")
    if int(a.get("input_forget", 0)):
        raise Refused("input_forget")
    acts = [v.decode() if isinstance(v, bytes) else v for v in a.get("activations", [])] or \
        DEFAULT_ACTS[op] * len(dirs)
    if any(v not in ACTIVATIONS for v in acts):
        raise Refused(f"activations {acts} (only {', '.join(ACTIVATIONS)} are unrolled)")
    per_dir = len(DEFAULT_ACTS[op])
    ins = list(node.input) + [""] * (8 - len(node.input))
    x = ins[0]
    w, r = consts.get(ins[1]), consts.get(ins[2])
    if w is None or r is None:
        raise Refused("weights computed at run time")
    b = consts.get(ins[3]) if ins[3] else None
    if ins[3] and b is None:
        raise Refused("a bias computed at run time")
    if ins[4]:
        lens = consts.get(ins[4])
        if lens is None:
            raise Refused("sequence_lens given at run time")
    shape = (shapes.get(x) or (None, None))[1]
    t_axis = 1 if layout else 0
    if shape is None or len(shape) != 3 or shape[t_axis] is None:
        raise Refused("a sequence length only known at run time")
    steps = int(shape[t_axis])
    if ins[4] and not np.all(lens == steps):
        raise Refused("sequences of different lengths (sequence_lens)")
    peep = consts.get(ins[7]) if op == "LSTM" and ins[7] else None
    if op == "LSTM" and ins[7] and peep is None:
        raise Refused("peepholes computed at run time")
    ng, h = GATES[op], hidden

    xs = em.op("Transpose", [x], perm=[1, 0, 2]) if layout else x               # (T, B, I)
    axis0 = em.const(np.array([0]))                    # the time axis: Squeeze and Unsqueeze of every step
    batch = em.op("Slice", [em.op("Shape", [xs]), em.const(np.array([1])), em.const(np.array([2]))])
    zeros_bh = em.op("ConstantOfShape", [em.op("Concat", [batch, em.const(np.array([h]))], axis=0)],
                     value=numpy_helper.from_array(np.zeros(1, w.dtype)))

    def act(name: str, t: str) -> str:
        return em.op(name, [t])

    def initial(k: int, d: int) -> str:
        src = ins[5 + k]
        if not src:
            return zeros_bh
        if layout:       # (B, D, H)
            return em.op("Squeeze", [em.op("Slice", [src, em.const(np.array([d])), em.const(np.array([d + 1])),
                                                      em.const(np.array([1]))]), em.const(np.array([1]))])
        return em.op("Squeeze", [em.op("Slice", [src, em.const(np.array([d])), em.const(np.array([d + 1]))]),
                                 em.const(np.array([0]))])

    ys, hs, cs = [], [], []
    lbr = int(a.get("linear_before_reset", 0))
    for d, backwards in enumerate(dirs):
        f, g2, h2 = (acts[d * per_dir:(d + 1) * per_dir] + [None, None])[:3]
        rd = r[d]
        bw = b[d][:ng * h] if b is not None else np.zeros(ng * h, w.dtype)
        br = b[d][ng * h:] if b is not None else np.zeros(ng * h, w.dtype)
        fold = bw + br
        if op == "GRU":
            fold[2 * h:] = bw[2 * h:]              # the candidate's recurrent bias stays with the reset gate
        xw = em.op("Add", [em.op("MatMul", [xs, em.const(w[d].T.copy(), "wt")]), em.const(fold, "bias")])
        parts = em.op("Split", [xw, em.const(np.ones(steps, np.int64))], n_out=steps, axis=0) if steps > 1 else [xw]
        x_t = [em.op("Squeeze", [p, axis0]) for p in parts]
        # per-direction constants, shared by every step
        if op == "GRU" and not lbr:
            rt, rt_h = em.const(rd[:2 * h].T.copy(), "rt"), em.const(rd[2 * h:].T.copy(), "rt_h")
        else:
            rt, rt_h = em.const(rd.T.copy(), "rt"), None
        cuts = {k: em.const(np.full(k, h, np.int64)) for k in (2, 3, 4)}
        peeps = [em.const(peep[d][k * h:(k + 1) * h], "peep") for k in range(3)] if peep is not None else None
        rbh = em.const(br[2 * h:], "rbh") if op == "GRU" else None
        h_prev = initial(0, d)
        c_prev = initial(1, d) if op == "LSTM" else None
        out = [None] * steps
        for t in (reversed(range(steps)) if backwards else range(steps)):
            recur = em.op("MatMul", [h_prev, rt])
            if op == "RNN":
                h_new = act(f, em.op("Add", [x_t[t], recur]))
            elif op == "LSTM":
                gi, go, gf, gc = em.op("Split", [em.op("Add", [x_t[t], recur]), cuts[4]], n_out=4, axis=1)
                if peeps is not None:
                    gi = em.op("Add", [gi, em.op("Mul", [peeps[0], c_prev])])
                    gf = em.op("Add", [gf, em.op("Mul", [peeps[2], c_prev])])
                c_new = em.op("Add", [em.op("Mul", [act(f, gf), c_prev]), em.op("Mul", [act(f, gi), act(g2, gc)])])
                if peeps is not None:
                    go = em.op("Add", [go, em.op("Mul", [peeps[1], c_new])])
                h_new = em.op("Mul", [act(f, go), act(h2, c_new)])
                c_prev = c_new
            else:                                   # GRU, gates z, r, h
                xz, xr, xh = em.op("Split", [x_t[t], cuts[3]], n_out=3, axis=1)
                if lbr:
                    hz, hr, hh = em.op("Split", [recur, cuts[3]], n_out=3, axis=1)
                else:
                    hz, hr = em.op("Split", [recur, cuts[2]], n_out=2, axis=1)
                z = act(f, em.op("Add", [xz, hz]))
                rg = act(f, em.op("Add", [xr, hr]))
                if lbr:
                    cand = em.op("Add", [xh, em.op("Mul", [rg, em.op("Add", [hh, rbh])])])
                else:
                    cand = em.op("Add", [xh, em.op("Add", [em.op("MatMul", [em.op("Mul", [rg, h_prev]), rt_h]), rbh])])
                hc = act(g2, cand)
                h_new = em.op("Add", [hc, em.op("Mul", [z, em.op("Sub", [h_prev, hc])])])
            out[t] = h_new
            h_prev = h_new
        ys.append(em.op("Concat", [em.op("Unsqueeze", [o, axis0]) for o in out], axis=0)
                  if steps > 1 else em.op("Unsqueeze", [out[0], axis0]))
        hs.append(h_prev)
        cs.append(c_prev)

    def stack(items: list, axis: int) -> str:
        us = [em.op("Unsqueeze", [i, em.const(np.array([axis]))]) for i in items]
        return us[0] if len(us) == 1 else em.op("Concat", us, axis=axis)

    outs = list(node.output) + [""] * (3 - len(node.output))
    if outs[0]:
        y = stack(ys, 1)                                                    # (T, D, B, H)
        em.op("Transpose" if layout else "Identity", [y], out=[outs[0]], **({"perm": [2, 0, 1, 3]} if layout else {}))
    for k, items in ((1, hs), (2, cs)):
        if outs[k]:
            s = stack(items, 0)                                             # (D, B, H)
            em.op("Transpose" if layout else "Identity", [s], out=[outs[k]], **({"perm": [1, 0, 2]} if layout else {}))


def _time_axis_unknown(node: onnx.NodeProto, shapes: dict) -> bool:
    layout = int(node_attrs(node).get("layout", 0))
    shape = (shapes.get(node.input[0]) or (None, None))[1]
    return shape is None or len(shape) != 3 or shape[1 if layout else 0] is None


def has_recurrent(model: onnx.ModelProto) -> bool:
    return any(n.op_type in RECURRENT and n.domain in ("", "ai.onnx") for n in model.graph.node)


def unroll(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Rewrite every recurrent node that can be unrolled, in place; returns the model (shapes
    inferred again) and {node name: reason} for the ones left as they were."""
    g = model.graph
    # weights may be computed from constants: the dynamo exporter reorders PyTorch's gate blocks
    # into ONNX's with Slice/Concat
    consts = Folder(g, opset_of(model), constants(g).get)
    shapes = tensor_shapes(model)
    lost = [n.input[0] for n in g.node if n.op_type in RECURRENT and _time_axis_unknown(n, shapes)]
    if lost:                  # the sequence length is often behind a reshape inference cannot follow
        from .probe import probe_shapes

        shapes.update(probe_shapes(model, lost))
    refused = write_out(model, lambda n: n.op_type in RECURRENT, "onnxsal_rnn", "cannot be unrolled",
                        lambda node, em: _unroll(node, consts, shapes, em))
    return _infer_inplace(model), refused
