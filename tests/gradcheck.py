"""Finite-difference checks of onnxsal's VJP graphs, shared by the autodiff tests.

The reference is the FORWARD model run in ONNX Runtime: the gradient of
``f(x) = sum(c * y(x))`` for a random cotangent ``c`` is compared with central
differences of ``f``.  That keeps the check independent of any rule and of any
training framework.

Tolerances (what the checks can honestly promise):

* float64: eps = 1e-6, rtol = 1e-6 relative to the largest gradient entry.
  Central differences are exact to O(eps^2) ~ 1e-12 and rounding adds
  ~1e-16 / eps ~ 1e-10, so 1e-6 leaves room for ops with large curvature.
* float32: eps = 1e-2, rtol = 1e-2.  Rounding alone is ~1e-7 / eps ~ 1e-5 of
  ``|f|`` and curvature adds O(eps^2); 1e-2 is the honest single precision bound.

Inputs must stay away from kinks (Relu at 0, Clip bounds, max ties): a
difference step that crosses one measures neither side's derivative.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxsal.graph.autodiff import vjp
from onnxsal.graph.normalize import normalize, tensor_shapes

DEFAULTS = {
    np.dtype(np.float64): dict(eps=1e-6, rtol=1e-6, atol=1e-9),
    np.dtype(np.float32): dict(eps=1e-2, rtol=1e-2, atol=1e-4),
}

FULL_LIMIT = 64      # tensors with at most this many elements are checked entry by entry
SUBSET = 50          # otherwise: this many random entries plus one random direction


def one_node_model(op_type: str, inputs: Mapping[str, np.ndarray], attrs: Optional[Mapping] = None,
                   initializers: Optional[Mapping[str, np.ndarray]] = None, n_out: int = 1, opset: int = 17,
                   node_inputs: Optional[Sequence[str]] = None, domain: str = "") -> onnx.ModelProto:
    """A model with one node; graph inputs are ``inputs``, constants are ``initializers``.

    Element types follow the arrays (pick float64 where ORT's kernel supports
    double, float32 otherwise).  Node inputs are ``node_inputs`` when given
    ('' for an absent optional input), else the inputs then the initializers in
    dict order.  Outputs are named ``y`` (one) or ``y0``, ``y1``... (several).
    """
    attrs = dict(attrs or {})
    initializers = dict(initializers or {})
    names = list(node_inputs) if node_inputs is not None else list(inputs) + list(initializers)
    outs = ["y"] if n_out == 1 else [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, names, outs, name=f"{op_type.lower()}_0", domain=domain or None, **attrs)
    g_in = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
            for k, v in inputs.items()]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    types = {vi.name: vi.type for vi in g_in}
    for t in inits:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    schema = onnx.defs.get_schema(op_type, opset, domain)
    inferred = onnx.shape_inference.infer_node_outputs(
        schema, node, types, {t.name: t for t in inits},
        opset_imports=[helper.make_opsetid(domain, opset)])
    g_out = []
    for o in outs:
        vi = onnx.ValueInfoProto()
        vi.name = o
        if o in inferred and inferred[o].tensor_type.HasField("shape"):
            vi.type.CopyFrom(inferred[o])
        elif g_in:                      # no shape inferred (a function op): the first input's type
            vi.type.CopyFrom(g_in[0].type)
        else:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
        g_out.append(vi)
    graph = helper.make_graph([node], f"one_{op_type}", g_in, g_out, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(domain, opset)])
    model.ir_version = 10 if opset >= 21 else 8
    onnx.checker.check_model(model)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict:
    """Run ``model`` in ORT on CPU; returns output name -> array."""
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    res = sess.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, res))


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """The forward model with ``names`` (any tensors) as its only outputs."""
    m = normalize(model)
    types = tensor_shapes(m)
    del m.graph.output[:]
    for n in names:
        et = types.get(n, (TensorProto.FLOAT, None))[0]
        m.graph.output.append(helper.make_tensor_value_info(n, et, None))
    return m


def derived_grads(model: onnx.ModelProto, y: str, wrt: Sequence[str], feeds: Mapping[str, np.ndarray],
                  cot: np.ndarray, rules=None, outputs: Sequence[str] = ()) -> dict:
    """Build the VJP model, check it, run it with cotangent ``cot``."""
    vm = vjp(model, y, wrt, rules=rules, outputs=outputs)
    onnx.checker.check_model(vm)
    return run(vm, {**feeds, "grad_" + y: cot})


def check_vjp(model: onnx.ModelProto, y: str, wrt: Sequence[str], feeds: Mapping[str, np.ndarray], *,
              eps: Optional[float] = None, rtol: Optional[float] = None, atol: Optional[float] = None,
              seed: int = 0, rules=None, forward_atol: float = 1e-6) -> dict:
    """Assert that onnxsal's ``grad_<x>`` matches finite differences for every x in ``wrt``.

    ``wrt`` must be graph inputs (they are what a difference can perturb). ``forward_atol`` bounds
    the derived graph's own ``y`` against the model's: wider where the gradient graph computes an
    op written out (DeformConv's sampling), not by its fused kernel.
    Returns the derived graph's outputs for further checks.
    """
    rng = np.random.default_rng(seed)
    fwd = session(expose(model, [y]))
    feeds = {k: np.asarray(v) for k, v in feeds.items()}
    wanted = {i.name for i in fwd.get_inputs()}

    def f_y(fd: Mapping[str, np.ndarray]) -> np.ndarray:
        return fwd.run([y], {k: v for k, v in fd.items() if k in wanted})[0]

    y0 = f_y(feeds)
    cot = rng.standard_normal(y0.shape).astype(y0.dtype)
    got = derived_grads(model, y, wrt, feeds, cot, rules=rules)
    np.testing.assert_allclose(got[y], y0, rtol=1e-6, atol=forward_atol)
    c64 = cot.astype(np.float64)

    def f(fd: Mapping[str, np.ndarray]) -> float:
        return float(np.sum(c64 * f_y(fd).astype(np.float64)))

    for x in wrt:
        assert x in feeds, f"check_vjp can only perturb graph inputs, not {x!r}"
        x0 = feeds[x]
        d = DEFAULTS[np.dtype(x0.dtype)]
        e = eps if eps is not None else d["eps"]
        rt = rtol if rtol is not None else d["rtol"]
        at = atol if atol is not None else d["atol"]
        g = got["grad_" + x].astype(np.float64)
        assert g.shape == x0.shape, f"grad_{x} has shape {g.shape}, input has {x0.shape}"

        def f_at(delta: np.ndarray) -> float:
            return f({**feeds, x: (x0.astype(np.float64) + delta).astype(x0.dtype)})

        n = x0.size
        idx = np.arange(n) if n <= FULL_LIMIT else rng.choice(n, SUBSET, replace=False)
        fd = np.empty(len(idx))
        for k, i in enumerate(idx):
            delta = np.zeros(n)
            delta[i] = e
            delta = delta.reshape(x0.shape)
            fd[k] = (f_at(delta) - f_at(-delta)) / (2 * e)
        sel = g.reshape(-1)[idx]
        scale = max(np.abs(g).max(), np.abs(fd).max(), 1e-30)
        bad = np.abs(sel - fd) > at + rt * scale
        assert not bad.any(), (
            f"grad_{x} differs from finite differences at {int(bad.sum())} of {len(idx)} entries; "
            f"max abs err {np.abs(sel - fd).max():.3g}, scale {scale:.3g}\n"
            f"derived: {sel[bad][:8]}\nnumeric: {fd[bad][:8]}")
        if n > FULL_LIMIT:
            direction = rng.standard_normal(x0.shape)
            direction /= np.abs(direction).max()
            num = (f_at(e * direction) - f_at(-e * direction)) / (2 * e)
            ana = float(np.sum(g * direction))
            dscale = max(float(np.sum(np.abs(g * direction))), 1e-30)
            assert abs(num - ana) <= at + rt * dscale, (
                f"grad_{x}: directional derivative {ana:.6g} vs numeric {num:.6g} (scale {dscale:.3g})")
    return got


def assert_matches_torch(out: Mapping[str, np.ndarray], logits: str, grad: str, net, x: np.ndarray,
                         cot: np.ndarray, tol: float = 1e-4) -> np.ndarray:
    """A VJP graph's outputs (``out[logits]``, ``out[grad]``) against torch.autograd on ``net`` at
    ``x`` with cotangent ``cot``: logits to 1e-5, the gradient to ``tol`` of its largest entry.
    Returns torch's gradient."""
    import torch

    xt = torch.tensor(x, requires_grad=True)
    y = net(xt)
    (y * torch.tensor(cot)).sum().backward()
    np.testing.assert_allclose(out[logits], y.detach().numpy(), rtol=1e-5, atol=1e-5)
    g = xt.grad.numpy()
    assert np.abs(g).max() > 0
    assert np.abs(out[grad] - g).max() / np.abs(g).max() < tol
    return g
