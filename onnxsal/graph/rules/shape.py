"""VJP rules for ops that move, select or replicate elements without arithmetic.

Their adjoints are the "opposite" data movement: Reshape back, the inverse
Transpose, Pad for Slice, Slice for Pad/Concat, Concat for Split, sums for
broadcasts.  Static sizes (from shape inference) become constants; a size that
is only known at run time (the batch axis) is read with Shape so one derived
graph serves every batch size.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
from onnx import TensorProto, helper

from ...errors import OpsetTooOldError, UnsupportedOpError
from ..autodiff import INT64_MAX, RuleContext, vjp_rule

Grads = list
Dim = Union[int, str]   # a static size, or the name of a runtime 1-D int64 tensor of one element

BIG = 2 ** 62           # ends at or beyond this are "to the end" (INT64_MAX); smaller ends past an axis clamp


def _unsupported(ctx: RuleContext, why: str) -> UnsupportedOpError:
    return UnsupportedOpError(ctx.node.op_type, ctx.node.name, f"({why})")


def _needs_16(ctx: RuleContext, why: str) -> OpsetTooOldError:
    """Scatters add up repeated indices from opset 16: the autodiff upgrades the model then."""
    return OpsetTooOldError(ctx.node.op_type, ctx.node.name, f"({why})", 16)


def _dim(ctx: RuleContext, x: str, axis: int) -> Dim:
    """Size of ``x`` along ``axis``: an int when static, else a runtime [1]-shaped tensor."""
    s = ctx.shape(x)
    if s is not None and s[axis] is not None:
        return int(s[axis])
    return ctx.op("Slice", [ctx.shape_of(x), ctx.const([axis]), ctx.const([axis + 1])])


def _vec(ctx: RuleContext, parts: list[Dim]) -> str:
    """1-D int64 tensor from static ints and runtime [1]-tensors (one Concat at most)."""
    if all(isinstance(p, (int, np.integer)) for p in parts):
        return ctx.const(np.asarray(parts, dtype=np.int64))
    if len(parts) == 1:
        return parts[0]
    names = [ctx.const([int(p)]) if isinstance(p, (int, np.integer)) else p for p in parts]
    return ctx.op("Concat", names, axis=0)


def _sub(ctx: RuleContext, a: Dim, b: Dim) -> Dim:
    if isinstance(a, int) and isinstance(b, int):
        return a - b
    return ctx.op("Sub", [_vec(ctx, [a]), _vec(ctx, [b])])


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _rank(ctx: RuleContext, x: str) -> int:
    r = ctx.rank(x)
    if r is None:
        raise _unsupported(ctx, f"rank of {x!r} unknown")
    return r


def _pad(ctx: RuleContext, g: str, rank: int, before: dict, after: dict) -> str:
    """Zero-pad ``g``: ``before``/``after`` map axis -> amount (int or runtime tensor)."""
    if not any((isinstance(v, str) or v != 0) for v in list(before.values()) + list(after.values())):
        return g
    pads = [before.get(i, 0) for i in range(rank)] + [after.get(i, 0) for i in range(rank)]
    return ctx.op("Pad", [g, _vec(ctx, pads)], mode="constant")


# ---- pure reshapes ---------------------------------------------------------------------

@vjp_rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x with another shape (same elements in the same order): gx = reshape(gy, shape(x))."""
    return [ctx.reshape_like(gy[0], ctx.inputs[0])] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("Transpose")
def transpose(ctx: RuleContext, gy: Grads) -> Grads:
    """y = transpose(x, p): gx = transpose(gy, p^-1)."""
    perm = ctx.attr("perm")
    if perm is None:
        r = _rank(ctx, ctx.inputs[0])
        perm = list(range(r))[::-1]
    inv = list(np.argsort(perm))
    if inv == list(range(len(inv))):
        return [gy[0]]
    return [ctx.op("Transpose", [gy[0]], perm=[int(i) for i in inv])]


# ---- joining and splitting -------------------------------------------------------------

@vjp_rule("Concat")
def concat(ctx: RuleContext, gy: Grads) -> Grads:
    """y = concat(x_0..x_n, axis): gx_i = gy[..., off_i : off_i + len_i, ...] (one Slice per needed input)."""
    g = gy[0]
    r = _rank(ctx, ctx.outputs[0])
    axis = _norm_axis(int(ctx.attr("axis")), r)
    out: list = []
    offset: Dim = 0
    for i, x in enumerate(ctx.inputs):
        size = _dim(ctx, x, axis)
        end = size + offset if isinstance(size, int) and isinstance(offset, int) else \
            ctx.op("Add", [_vec(ctx, [offset]), _vec(ctx, [size])])
        if ctx.needs_grad(i):
            out.append(ctx.op("Slice", [g, _vec(ctx, [offset]), _vec(ctx, [end]), ctx.const([axis])]))
        else:
            out.append(None)
        offset = end
    return out


@vjp_rule("Split")
def split(ctx: RuleContext, gy: Grads) -> Grads:
    """(y_0..y_n) = split(x, axis): gx = concat(gy_0..gy_n), zeros for outputs without gradient."""
    r = _rank(ctx, ctx.inputs[0])
    axis = _norm_axis(int(ctx.attr("axis", 0)), r)
    parts = [g if g is not None else ctx.zeros_like(o) for g, o in zip(gy, ctx.outputs)]
    res = parts[0] if len(parts) == 1 else ctx.op("Concat", parts, axis=axis)
    return [res] + [None] * (len(ctx.inputs) - 1)


# ---- selecting -------------------------------------------------------------------------

def _const_input(ctx: RuleContext, i: int, what: str) -> Optional[np.ndarray]:
    if len(ctx.inputs) <= i or not ctx.inputs[i]:
        return None
    v = ctx.const_value(ctx.inputs[i])
    if v is None:
        raise _unsupported(ctx, f"{what} computed at run time")
    return v


def _scatter_axis(ctx: RuleContext, g: str, axis: int, index: np.ndarray, size: int) -> str:
    """Adjoint of Gather(axis, index) for unique ``index`` into an axis of static ``size``.

    Appends one zero slice to ``g`` and gathers: position d takes slice j when
    index[j] == d, the zero slice otherwise.  Two ops, any batch size.
    """
    n = len(index)
    if n == size and np.array_equal(index, np.arange(size)):
        return g
    r = _rank(ctx, g)
    if n and np.array_equal(index, np.arange(index[0], index[0] + n)):
        return _pad(ctx, g, r, {axis: int(index[0])}, {axis: size - int(index[0]) - n})
    padded = _pad(ctx, g, r, {}, {axis: 1})
    where = np.full(size, n, dtype=np.int64)
    where[index] = np.arange(n)
    return ctx.op("Gather", [padded, ctx.const(where)], axis=axis)


def _int64(ctx: RuleContext, t: str) -> str:
    """A run-time index tensor as int64 (exporters also write int32)."""
    return t if ctx.elem_type(t) == TensorProto.INT64 else ctx.op("Cast", [t], to=TensorProto.INT64)


def _from_end(ctx: RuleContext, i: str, dim: str) -> str:
    """Run-time indices with the negative ones counted from the end of an axis of size ``dim``."""
    return ctx.op("Where", [ctx.op("Less", [i, ctx.const(0)]), ctx.op("Add", [i, dim]), i])


def _runtime_int(ctx: RuleContext, vec: str, j: int) -> str:
    """Element ``j`` of a run-time int vector as a [1]-shaped int64 tensor."""
    return _int64(ctx, ctx.op("Slice", [vec, ctx.const([j]), ctx.const([j + 1])]))


def _slice_begin(ctx: RuleContext, start: Union[int, str], dim: Dim) -> Dim:
    """Where a unit-step Slice starts: ``start`` (+ dim when negative) clamped to [0, dim]."""
    if isinstance(start, int) and isinstance(dim, int):
        return slice(start, None).indices(dim)[0]
    if isinstance(start, int) and start >= 0:
        return start if isinstance(dim, int) else ctx.op("Min", [_vec(ctx, [start]), dim])
    s, d = _vec(ctx, [start]), _vec(ctx, [dim])
    # a constant start here is negative: from the end of a run-time axis
    shifted = ctx.op("Add", [s, d]) if isinstance(start, int) else _from_end(ctx, s, d)
    return ctx.op("Min", [ctx.op("Max", [shifted, ctx.const([0])]), d])


def _unit_slice_pads(ctx: RuleContext, axis: int, start: Union[int, str], dim: Dim) -> tuple[Dim, Dim]:
    """Zeros before and after a unit-step slice's gradient on ``axis``: the clamped start, and what
    the slice's own length leaves (an end past the axis clamps, so it is never read)."""
    begin = _slice_begin(ctx, start, dim)
    return begin, _sub(ctx, _sub(ctx, dim, begin), _dim(ctx, ctx.outputs[0], axis))


def _slice_runtime(ctx: RuleContext, g: str, r: int, starts: Optional[np.ndarray], axes: list[int],
                   steps: list[int]) -> str:
    """Adjoint of a unit-step Slice whose starts or ends are computed at run time (``starts`` given
    when they are constant).

    The gradient is ``gy`` padded back: ``begin`` zeros in front (the clamped
    start) and ``dim - begin - len`` behind, where ``len`` is the slice's own
    length along the axis.  Ends are never needed, so only the starts are read.
    """
    before: dict = {}
    after: dict = {}
    for j, (a, st) in enumerate(zip(axes, steps)):
        if st != 1:
            raise _unsupported(ctx, f"step {st} with starts or ends computed at run time")
        a = _norm_axis(a, r)
        start = int(starts[j]) if starts is not None else _runtime_int(ctx, ctx.inputs[1], j)
        before[a], after[a] = _unit_slice_pads(ctx, a, start, _dim(ctx, ctx.inputs[0], a))
    return _pad(ctx, g, r, before, after)


@vjp_rule("Slice")
def slice_(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x[starts:ends:steps] on some axes: gx = zeros with gy scattered back.

    Unit steps become one Pad (works with run-time sizes, and with starts and
    ends computed at run time, as exporters emit for ``chunk`` and window
    partitions); other steps, negative ones included, place each axis with
    Pad + Gather (static size and constant bounds needed).
    """
    x = ctx.inputs[0]
    r = _rank(ctx, x)
    starts = _const_or_runtime(ctx, 1)
    ends = _const_or_runtime(ctx, 2)
    axes = _const_input(ctx, 3, "Slice axes")
    steps = _const_input(ctx, 4, "Slice steps")
    if axes is None:                  # the bounds' length says how many leading axes are sliced
        known = [v for v in (starts, ends) if not isinstance(v, str)]
        n = len(known[0].reshape(-1)) if known else _static_len(ctx, ctx.inputs[1])
        if n is None:
            raise _unsupported(ctx, "Slice starts and ends computed at run time, with no axes given")
        axes = np.arange(n)
    axes = [int(v) for v in axes.reshape(-1)]
    steps = [int(v) for v in steps.reshape(-1)] if steps is not None else [1] * len(axes)
    g = gy[0]
    if isinstance(starts, str) or isinstance(ends, str):
        res = _slice_runtime(ctx, g, r, None if isinstance(starts, str) else starts.reshape(-1), axes, steps)
        return [res] + [None] * (len(ctx.inputs) - 1)
    starts = [int(v) for v in starts.reshape(-1)]
    ends = [int(v) for v in ends.reshape(-1)]
    shape = ctx.shape(x) or (None,) * r
    before: dict = {}
    after: dict = {}
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = _norm_axis(a, r)
        d = shape[a]
        if d is not None:
            idx = np.arange(*slice(s, e, st).indices(d))
            if len(idx) == 0:
                return [ctx.zeros_like(x)] + [None] * (len(ctx.inputs) - 1)
            if st == 1:
                before[a], after[a] = int(idx[0]), int(d - idx[-1] - 1)
            else:
                g = _scatter_axis(ctx, g, a, idx, d)
            continue
        if st != 1:
            raise _unsupported(ctx, f"step {st} on axis {a} whose size is only known at run time")
        if s == 0 and e >= BIG:
            continue                      # the whole axis
        # exporters also write ends such as INT32_MAX, which clamp to the run-time size
        before[a], after[a] = _unit_slice_pads(ctx, a, s, _dim(ctx, x, a))
    return [_pad(ctx, g, r, before, after)] + [None] * (len(ctx.inputs) - 1)


def _const_or_runtime(ctx: RuleContext, i: int):
    """A constant input's value, else its name (computed at run time)."""
    v = ctx.const_value(ctx.inputs[i])
    return ctx.inputs[i] if v is None else v


def _static_len(ctx: RuleContext, vec: str) -> Optional[int]:
    s = ctx.shape(vec)
    return None if s is None or len(s) != 1 or s[0] is None else int(s[0])


@vjp_rule("Pad")
def pad(ctx: RuleContext, gy: Grads) -> Grads:
    """y = pad(x, constant): gx = gy with the padding sliced off (negative pads, i.e. crops, re-padded)."""
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise _unsupported(ctx, f"Pad mode {mode!r}")
    x = ctx.inputs[0]
    r = _rank(ctx, x)
    axes = _const_input(ctx, 3, "Pad axes")
    axes = [_norm_axis(int(a), r) for a in axes.reshape(-1)] if axes is not None else list(range(r))
    k = len(axes)
    g = gy[0]
    pads = _const_or_runtime(ctx, 1)
    if isinstance(pads, str):
        if mode != "constant":
            raise _unsupported(ctx, f"{mode} Pad with pads computed at run time")
        return [_unpad_runtime(ctx, g, pads, axes)] + [None] * (len(ctx.inputs) - 1)
    pads = [int(v) for v in pads.reshape(-1)]
    if mode != "constant":
        for j in reversed(range(k)):       # separable: undo the axes' pads one at a time
            if pads[j] or pads[j + k]:
                g = _unpad_copies(ctx, g, x, axes[j], pads[j], pads[j + k], mode)
        return [g] + [None] * (len(ctx.inputs) - 1)
    sl_axes, sl_starts, sl_ends = [], [], []
    neg_before, neg_after = {}, {}
    for j, a in enumerate(axes):
        b, e = pads[j], pads[j + k]
        if b > 0 or e > 0:
            sl_axes.append(a)
            sl_starts.append(max(b, 0))
            sl_ends.append(-e if e > 0 else INT64_MAX)
        if b < 0:
            neg_before[a] = -b
        if e < 0:
            neg_after[a] = -e
    if sl_axes:
        g = ctx.op("Slice", [g, ctx.const(sl_starts), ctx.const(sl_ends), ctx.const(sl_axes)])
    g = _pad(ctx, g, r, neg_before, neg_after)
    return [g] + [None] * (len(ctx.inputs) - 1)


def _source_runs(source: np.ndarray) -> list[tuple[int, int, int]]:
    """Split output positions into maximal runs (start, stop, step) whose source index moves by a
    constant step of +1, -1 or 0; a lone position is a run of step +1."""
    runs, i, m = [], 0, len(source)
    while i < m:
        step = int(source[i + 1] - source[i]) if i + 1 < m else 1
        if step not in (-1, 0, 1):
            step = 1
        j = i + 1
        while j < m and source[j] - source[j - 1] == step:
            j += 1
        if j == i + 1:
            step = 1
        runs.append((i, j, step))
        i = j
    return runs


def _unpad_copies(ctx: RuleContext, g: str, x: str, axis: int, before: int, after: int, mode: str) -> str:
    """Adjoint of a reflect, edge or wrap Pad along one axis: every input element receives the
    gradients of all the output positions that copy it.

    The copy map comes from ``np.pad`` on the indices (ONNX's mode names are numpy's), after the
    crops of negative pads, as ONNX Runtime orders them: a wrap pad then copies the cropped axis's
    far end, not the original's.
    Output positions split into runs that copy consecutive, reversed or repeated (edge) inputs;
    each run becomes a slice of ``g`` (reversed, or summed for an edge run) zero-padded to the
    input's length at the place it came from, and the runs add up.
    """
    shape = ctx.shape(x)
    n = None if shape is None else shape[axis]
    if n is None:
        raise _unsupported(ctx, f"{mode} Pad needs a static size on axis {axis}")
    n = int(n)
    kept = np.arange(n)[max(-before, 0): n - max(-after, 0)]
    source = np.pad(kept, (max(before, 0), max(after, 0)), mode=mode)
    r = _rank(ctx, g)
    total = None
    for i, j, step in _source_runs(source):
        length = j - i
        if step == 1:
            piece = ctx.op("Slice", [g, ctx.const([i]), ctx.const([j]), ctx.const([axis])])
            lo = int(source[i])
        elif step == -1:
            end = i - 1 if i > 0 else int(np.iinfo(np.int64).min)   # through index 0
            piece = ctx.op("Slice", [g, ctx.const([j - 1]), ctx.const([end]), ctx.const([axis]), ctx.const([-1])])
            lo = int(source[j - 1])
        else:
            piece = ctx.reduce_sum(ctx.op("Slice", [g, ctx.const([i]), ctx.const([j]), ctx.const([axis])]), [axis])
            lo, length = int(source[i]), 1
        part = _pad(ctx, piece, r, {axis: lo}, {axis: n - lo - length})
        total = part if total is None else ctx.op("Add", [total, part])
    return total


def _unpad_runtime(ctx: RuleContext, g: str, pads: str, axes: list[int]) -> str:
    """Adjoint of a constant Pad whose pads are computed at run time (shifted windows pad this way).

    Slice off the positive pads, then zero-pad back what negative pads cropped:
    gx = Pad(gy[max(b, 0) : len - max(e, 0)], max(-b, 0), max(-e, 0)) on each padded axis.
    """
    k = len(axes)
    p = _int64(ctx, pads)
    zero = ctx.const([0])
    begin = ctx.op("Slice", [p, ctx.const([0]), ctx.const([k])])
    end = ctx.op("Slice", [p, ctx.const([k]), ctx.const([2 * k])])
    sizes = ctx.op("Gather", [ctx.shape_of(ctx.outputs[0]), ctx.const(np.asarray(axes, np.int64))], axis=0)
    starts = ctx.op("Max", [begin, zero])
    ends = ctx.op("Sub", [sizes, ctx.op("Max", [end, zero])])
    cut = ctx.op("Slice", [g, starts, ends, ctx.const(np.asarray(axes, np.int64))])
    crops = ctx.op("Concat", [ctx.op("Max", [ctx.op("Neg", [begin]), zero]),
                              ctx.op("Max", [ctx.op("Neg", [end]), zero])], axis=0)
    r = _rank(ctx, g)
    if axes != list(range(r)):          # Pad takes axes only from opset 18: spread to all axes
        where = np.asarray(axes + [a + r for a in axes], np.int64)
        crops = ctx.op("ScatterElements", [ctx.const(np.zeros(2 * r, np.int64)), ctx.const(where), crops], axis=0)
    return ctx.op("Pad", [cut, crops], mode="constant")


def _scatter_runtime(ctx: RuleContext, g: str, x: str, axis: int, flat: Union[np.ndarray, str], r: int) -> str:
    """Adjoint of Gather (ScatterND into zeros) when the axis size or the indices are only known at
    run time; ``g`` holds the gathered slices along ``axis``, ``flat`` their indices (a (k, 1)
    tensor name when computed at run time, which may repeat, so those always add up)."""
    unique = not isinstance(flat, str) and len(np.unique(flat)) == len(flat)
    if not unique and ctx.opset < 16:
        raise _needs_16(ctx, "repeated or run-time Gather indices on this axis need opset 16 to add up")
    perm = [axis] + [a for a in range(r) if a != axis]
    inv = [int(v) for v in np.argsort(perm)]
    front = (lambda t: t) if axis == 0 else (lambda t: ctx.op("Transpose", [t], perm=perm))
    zeros = front(ctx.zeros_like(x))
    attrs = {} if unique else {"reduction": "add"}
    where = flat if isinstance(flat, str) else ctx.const(flat.reshape(-1, 1))
    res = ctx.op("ScatterND", [zeros, where, front(g)], **attrs)
    return res if axis == 0 else ctx.op("Transpose", [res], perm=inv)


def _gather_runtime(ctx: RuleContext, g: str, x: str, ind: str, axis: int, r: int) -> str:
    """Adjoint of Gather whose indices are computed at run time (torch.onnx's ``as_strided``).

    The index dims of ``gy`` collapse into one axis of unknown length, negative indices
    count from the end, and ScatterND adds every slice into zeros shaped like ``x``.
    """
    q = ctx.rank(ind)
    if q is None:
        raise _unsupported(ctx, f"rank of the run-time Gather indices {ind!r} unknown")
    fixed = _from_end(ctx, _int64(ctx, ind), _vec(ctx, [_dim(ctx, x, axis)]))
    col = ctx.op("Reshape", [fixed, ctx.const([-1, 1])])
    if q != 1:
        g = ctx.op("Reshape", [g, _vec(ctx, [_dim(ctx, x, a) for a in range(axis)] + [-1] +
                                       [_dim(ctx, x, a) for a in range(axis + 1, r)])])
    return _scatter_runtime(ctx, g, x, axis, col, r)


@vjp_rule("Gather")
def gather(ctx: RuleContext, gy: Grads) -> Grads:
    """y = take(x, idx, axis): gx = scatter-add of gy into zeros shaped like x.

    Constant scalar and unique indices cost a Pad (+ Gather); repeated ones sum
    through a one-hot matrix product along the axis; indices computed at run
    time scatter-add with ScatterND (opset 16).
    """
    x, ind = ctx.inputs[0], ctx.inputs[1]
    idx = ctx.const_value(ind)
    r = _rank(ctx, x)
    axis = _norm_axis(int(ctx.attr("axis", 0)), r)
    if idx is None:
        return [_gather_runtime(ctx, gy[0], x, ind, axis, r), None]
    shape = ctx.shape(x) or (None,) * r
    d = shape[axis]
    g = gy[0]
    idx = idx.astype(np.int64)
    if idx.ndim == 0:
        i = int(idx)
        gu = ctx.unsqueeze(g, [axis])
        if i < 0:             # counted from the end: -i - 1 entries after it, whatever the axis's size
            return [_pad(ctx, gu, r, {axis: _sub(ctx, _dim(ctx, x, axis), -i)}, {axis: -i - 1}), None]
        dim = d if d is not None else _dim(ctx, x, axis)
        return [_pad(ctx, gu, r, {axis: i}, {axis: _sub(ctx, _sub(ctx, dim, i), 1)}), None]
    flat = (np.where(idx < 0, idx + d, idx) if d is not None else idx).reshape(-1)
    n = flat.size
    if idx.ndim != 1:
        target = [_dim(ctx, x, a) for a in range(axis)] + [n] + [_dim(ctx, x, a) for a in range(axis + 1, r)]
        g = ctx.op("Reshape", [g, _vec(ctx, target)])
    if d is None:
        return [_scatter_runtime(ctx, g, x, axis, flat, r), None]
    if len(np.unique(flat)) == n:
        return [_scatter_axis(ctx, g, axis, flat, d), None]
    onehot = np.zeros((n, d))
    onehot[np.arange(n), flat] = 1.0
    perm = [a for a in range(r) if a != axis] + [axis]
    inv = [int(v) for v in np.argsort(perm)]
    moved = ctx.op("Transpose", [g], perm=perm)
    prod = ctx.op("MatMul", [moved, ctx.const(onehot, like=ctx.outputs[0])])
    return [ctx.op("Transpose", [prod], perm=inv), None]


# ---- reductions and broadcasts --------------------------------------------------------

def _reduce_axes(ctx: RuleContext, r: int) -> Optional[list[int]]:
    """Normalised reduction axes; None means "no reduction" (noop_with_empty_axes)."""
    axes = ctx.attr("axes")
    if axes is None and len(ctx.inputs) > 1 and ctx.inputs[1]:
        axes = _const_input(ctx, 1, "reduction axes")
        axes = [int(a) for a in axes.reshape(-1)]
    if not axes:
        if int(ctx.attr("noop_with_empty_axes", 0)):
            return None
        return list(range(r))
    return sorted(_norm_axis(int(a), r) for a in axes)


def _kept_dims(ctx: RuleContext, axes: list[int], *tensors: str) -> list[str]:
    """Reduced tensors (gy, y) with the reduced axes back as size 1, so they broadcast against x."""
    if int(ctx.attr("keepdims", 1)):
        return list(tensors)
    return [ctx.unsqueeze(t, axes) for t in tensors]


def _expand_back(ctx: RuleContext, gk: str, x: str) -> str:
    """Broadcast a keepdims-shaped gradient to x's shape (the one place a full tensor is built)."""
    return ctx.op("Expand", [gk, ctx.shape_of(x)])


def _runtime_axes(ctx: RuleContext) -> bool:
    """Whether the reduction axes are an input computed at run time (the RMSNormalization body's
    ``Range(rank + axis, rank)``)."""
    return ctx.attr("axes") is None and len(ctx.inputs) > 1 and bool(ctx.inputs[1]) \
        and ctx.const_value(ctx.inputs[1]) is None


def _reduce_back_at_runtime(ctx: RuleContext, g: str, x: str, y: str) -> str:
    """ReduceSum/ReduceMean's gradient with run-time axes: the dropped axes put back by
    ``Unsqueeze`` (which takes its axes as an input too), 1/n as Size(y)/Size(x), then Expand.
    Empty axes, either way ``noop_with_empty_axes`` reads them, need no branch: a full reduction's
    gradient is a scalar and the no-op's has x's shape, and both expand to x."""
    if not int(ctx.attr("keepdims", 1)):
        g = ctx.op("Unsqueeze", [g, ctx.inputs[1]])
    if ctx.node.op_type == "ReduceMean":
        et = ctx.elem_type(y)
        g = ctx.op("Mul", [g, ctx.op("Div", [ctx.op("Cast", [ctx.op("Size", [y])], to=et),
                                             ctx.op("Cast", [ctx.op("Size", [x])], to=et)])])
    return _expand_back(ctx, g, x)


@vjp_rule("ReduceSum", "ReduceMean")
def reduce_sum_mean(ctx: RuleContext, gy: Grads) -> Grads:
    """y = sum_axes x (mean: divided by n = prod of reduced sizes): gx = expand(gy [/ n]) to x's shape.

    The 1/n scaling happens before the Expand, on the small tensor.
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    if _runtime_axes(ctx):
        return [_reduce_back_at_runtime(ctx, gy[0], x, y)] + [None] * (len(ctx.inputs) - 1)
    r = _rank(ctx, x)
    axes = _reduce_axes(ctx, r)
    g = gy[0]
    if axes is None:
        return [g] + [None] * (len(ctx.inputs) - 1)
    if not int(ctx.attr("keepdims", 1)):
        g = ctx.unsqueeze(g, axes)
    if ctx.node.op_type == "ReduceMean":
        shape = ctx.shape(x)
        if shape is not None and all(shape[a] is not None for a in axes):
            n = int(np.prod([shape[a] for a in axes]))
            if n != 1:
                g = ctx.op("Mul", [g, ctx.const(1.0 / n, like=y)])
        else:
            et = ctx.elem_type(y)
            ratio = ctx.op("Div", [ctx.op("Cast", [ctx.op("Size", [y])], to=et),
                                   ctx.op("Cast", [ctx.op("Size", [x])], to=et)])
            g = ctx.op("Mul", [g, ratio])
    return [_expand_back(ctx, g, x)] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("ReduceMax", "ReduceMin")
def reduce_max_min(ctx: RuleContext, gy: Grads) -> Grads:
    """y = max_axes x: gx = gy * [x == y] / #ties (broadcast back over the axes).

    Tied maxima share the gradient equally, as in PyTorch's amax and TensorFlow's reduce_max
    (a whole row of zeros after a ReLU is the usual tie).
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        return [gy[0]] + [None] * (len(ctx.inputs) - 1)
    g, yk = _kept_dims(ctx, axes, gy[0], y)
    m = ctx.op("Cast", [ctx.op("Equal", [x, yk])], to=ctx.elem_type(y))
    share = ctx.op("Div", [g, ctx.reduce_sum(m, axes, keepdims=True)])
    return [ctx.op("Mul", [m, share])] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("Expand")
def expand(ctx: RuleContext, gy: Grads) -> Grads:
    """y = broadcast(x, shape): gx = sum of gy over the broadcast axes."""
    return [ctx.unbroadcast(gy[0], ctx.inputs[0]), None]


@vjp_rule("Tile")
def tile(ctx: RuleContext, gy: Grads) -> Grads:
    """y = tile(x, reps): view gy as [r_0, d_0, r_1, d_1, ...] and sum over the r axes."""
    x = ctx.inputs[0]
    reps_value = ctx.const_value(ctx.inputs[1])
    r = _rank(ctx, x)
    if reps_value is None:                # repeats computed at run time (GCViT's global queries)
        pairs = ctx.op("Concat", [ctx.unsqueeze(_int64(ctx, ctx.inputs[1]), [1]),
                                  ctx.unsqueeze(ctx.shape_of(x), [1])], axis=1)
        target = ctx.op("Reshape", [pairs, ctx.const([-1])])
    else:
        reps = [int(v) for v in reps_value.reshape(-1)]
        if all(v == 1 for v in reps):
            return [gy[0], None]
        parts: list[Dim] = []
        for a, rep in enumerate(reps):
            parts += [rep, _dim(ctx, x, a)]
        target = _vec(ctx, parts)
    g = ctx.op("Reshape", [gy[0], target])
    return [ctx.reduce_sum(g, [2 * a for a in range(r)], keepdims=False), None]


def _scatter_vjp(ctx: RuleContext, gy: Grads, gather: str, **attrs) -> Grads:
    """y = data with ``updates`` written (or added) at ``indices``: the updates' gradient is gy
    read back there (``gather``, the scatter's own reading op); the data's is gy, with the written
    positions zeroed when the scatter replaces rather than adds.  Product and min/max reductions
    are refused.

    A replacing scatter with repeated indices keeps one of the updates written to a place (ONNX
    leaves which to the runtime; ONNX Runtime's CPU kernel keeps the last), and only that one gets
    the place's gradient: the scatter itself, run on the updates' own positions, says which won."""
    reduction = ctx.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise _unsupported(ctx, f"{ctx.node.op_type} reduction {reduction!r}")
    data, ind, upd = ctx.inputs[:3]
    gd = gu = None
    if ctx.needs_grad(0):
        gd = gy[0] if reduction == "add" else ctx.op(ctx.node.op_type, [gy[0], ind, ctx.zeros_like(upd)], **attrs)
    if ctx.needs_grad(2):
        gu = ctx.op(gather, [gy[0], ind], **attrs)
        if reduction == "none" and not _distinct_targets(ctx, gather, **attrs):
            gu = ctx.op("Mul", [gu, _won(ctx, gather, **attrs)])
    return [gd, None, gu]


def _distinct_targets(ctx: RuleContext, gather: str, **attrs) -> bool:
    """Whether constant indices write each place at most once (a repeated place needs ``_won``)."""
    ind = ctx.const_value(ctx.inputs[1])
    if ind is None:
        return False
    ind = np.asarray(ind, np.int64)
    shape = ctx.shape(ctx.inputs[0])
    if gather == "GatherND":                    # each index tuple (last axis) addresses one slice
        tuples = ind.reshape(-1, ind.shape[-1]) if ind.ndim else ind.reshape(1, -1)
        sizes = None if shape is None else shape[:tuples.shape[1]]
        if (tuples < 0).any():                  # -1 and size - 1 are one place, where the size is known
            if sizes is None or any(v is None for v in sizes):
                return False
            tuples = np.where(tuples < 0, tuples + np.asarray(sizes, np.int64), tuples)
        return len(np.unique(tuples, axis=0)) == len(tuples)
    axis = _norm_axis(int(attrs.get("axis", 0)), ind.ndim)
    size = None if shape is None or len(shape) != ind.ndim else shape[axis]
    if (ind < 0).any() and size is None:
        return False
    places = np.stack(np.meshgrid(*[np.arange(n) for n in ind.shape], indexing="ij"), -1)
    places[..., axis] = np.where(ind < 0, ind + (size or 0), ind)
    places = places.reshape(-1, ind.ndim)
    return len(np.unique(places, axis=0)) == len(places)


def _won(ctx: RuleContext, gather: str, **attrs) -> str:
    """1 where an update is the one its place keeps, else 0 (float, the updates' shape): each
    update's own position written by the same scatter, then read back at its place."""
    data, ind, upd = ctx.inputs[:3]
    ids = ctx.op("Reshape", [ctx.op("Range", [ctx.const(np.int64(0)), ctx.op("Size", [upd]), ctx.const(np.int64(1))]),
                             ctx.shape_of(upd)])
    blank = ctx.op("ConstantOfShape", [ctx.shape_of(data)], value=helper.make_tensor("v", TensorProto.INT64, [1], [-1]))
    kept = ctx.op(gather, [ctx.op(ctx.node.op_type, [blank, ind, ids], **attrs), ind], **attrs)
    return ctx.op("Cast", [ctx.op("Equal", [kept, ids])], to=ctx.elem_type(upd) or TensorProto.FLOAT)


@vjp_rule("ScatterND")
def scatter_nd(ctx: RuleContext, gy: Grads) -> Grads:
    """ScatterND (a slice assignment such as ``x[:, :, 1:] = ...``): see ``_scatter_vjp``."""
    return _scatter_vjp(ctx, gy, "GatherND")


@vjp_rule("ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")
def reduce_norms(ctx: RuleContext, gy: Grads) -> Grads:
    """The smooth reductions, each gx = expand(gy) * dy/dx with y broadcast back where it appears:

    ReduceL1 ``sign(x)``; ReduceL2 ``x / y`` (0 where y = 0, where every x is 0, as PyTorch's norm);
    ReduceSumSquare ``2x``; ReduceLogSumExp ``exp(x - y)``.
    """
    x, y = ctx.inputs[0], ctx.outputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        raise _unsupported(ctx, "noop_with_empty_axes=1 with no axes")
    g, yk = _kept_dims(ctx, axes, gy[0], y)
    op = ctx.node.op_type
    if op == "ReduceL1":
        d = ctx.op("Sign", [x])
    elif op == "ReduceSumSquare":
        d = ctx.op("Mul", [x, ctx.const(2.0, like=y)])
    elif op == "ReduceL2":
        tiny = float(np.finfo(np.float32).tiny)
        g = ctx.op("Div", [g, ctx.op("Max", [yk, ctx.const(tiny, like=y)])])
        d = x
    else:
        d = ctx.op("Exp", [ctx.op("Sub", [x, yk])])
    return [ctx.op("Mul", [d, g])] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("ReduceLogSum")
def reduce_log_sum(ctx: RuleContext, gy: Grads) -> Grads:
    """y = log(sum_axes x): gx = expand(gy / sum), the sum taken again rather than read as exp(y)."""
    x = ctx.inputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        raise _unsupported(ctx, "noop_with_empty_axes=1 with no axes")
    (g,) = _kept_dims(ctx, axes, gy[0])
    g = ctx.op("Div", [g, ctx.reduce_sum(x, axes, keepdims=True)])
    return [_expand_back(ctx, g, x)] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("ReduceProd")
def reduce_prod(ctx: RuleContext, gy: Grads) -> Grads:
    """y = prod_axes x: gx = gy * the product of the other entries, exact where entries are 0.

    ``y / x`` would divide by zero; instead the zeros are counted per reduced group: with none, an
    entry's cofactor is p / x (p the product of the group); with one, the zero entry's is the
    product of the rest and every other entry's is 0; with two or more, all are 0.
    """
    x = ctx.inputs[0]
    axes = _reduce_axes(ctx, _rank(ctx, x))
    if axes is None:
        raise _unsupported(ctx, "noop_with_empty_axes=1 with no axes")
    (g,) = _kept_dims(ctx, axes, gy[0])
    zero = ctx.op("Equal", [x, ctx.const(0.0, like=x)])
    zeros = ctx.reduce_sum(ctx.op("Cast", [zero], to=ctx.elem_type(x)), axes, keepdims=True)
    safe = ctx.op("Where", [zero, ctx.const(1.0, like=x), x])
    kept = [safe, ctx.const(np.asarray(axes, np.int64))] if ctx.opset >= 18 else [safe]
    prod = ctx.op("ReduceProd", kept, keepdims=1, **({} if ctx.opset >= 18 else {"axes": axes}))
    own = ctx.op("Equal", [zeros, ctx.const(1.0, like=x)])          # the group's one zero is this entry
    none = ctx.op("Equal", [zeros, ctx.const(0.0, like=x)])
    ok = ctx.op("Or", [ctx.op("And", [zero, own]), ctx.op("And", [ctx.op("Not", [zero]), none])])
    cofactor = ctx.op("Where", [ok, ctx.op("Div", [prod, safe]), ctx.const(0.0, like=x)])
    return [ctx.op("Mul", [cofactor, g])] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("SpaceToDepth")
def space_to_depth(ctx: RuleContext, gy: Grads) -> Grads:
    """A permutation of elements: its transpose is its inverse, DepthToSpace in DCR order."""
    return [ctx.op("DepthToSpace", [gy[0]], blocksize=int(ctx.attr("blocksize")), mode="DCR")]


@vjp_rule("DepthToSpace")
def depth_to_space(ctx: RuleContext, gy: Grads) -> Grads:
    """A permutation of elements; the inverse of DCR order is SpaceToDepth.

    CRD order reads channel ``c*b^2 + i*b + j`` where DCR reads ``(i*b + j)*C' + c``, so its
    inverse is SpaceToDepth followed by that fixed channel permutation (a constant Gather).
    """
    b = int(ctx.attr("blocksize"))
    g = ctx.op("SpaceToDepth", [gy[0]], blocksize=b)
    if ctx.attr("mode", "DCR") == "DCR":
        return [g]
    shape = ctx.shape(ctx.inputs[0])
    if shape is None or len(shape) != 4 or shape[1] is None:
        raise _unsupported(ctx, "CRD mode needs a static channel count")
    c_out = int(shape[1]) // (b * b)
    k, c = np.meshgrid(np.arange(b * b), np.arange(c_out))    # position c*b^2 + k reads DCR channel k*C' + c
    return [ctx.op("Gather", [g, ctx.const((k * c_out + c).reshape(-1).astype(np.int64))], axis=1)]


@vjp_rule("GatherElements")
def gather_elements(ctx: RuleContext, gy: Grads) -> Grads:
    """y[i] = x[..., idx[i], ...] along ``axis``: gx = scatter-add of gy at idx into zeros like x.

    Repeated indices must add up, which ScatterElements does from opset 16 (``reduction="add"``);
    below that only constant indices that never repeat along the axis are exact.
    """
    x, ind = ctx.inputs[0], ctx.inputs[1]
    axis = int(ctx.attr("axis", 0))
    attrs = {"axis": axis}
    if ctx.opset >= 16:
        attrs["reduction"] = "add"
    else:
        idx = ctx.const_value(ind)
        if idx is None:
            raise _needs_16(ctx, "indices computed at run time need opset >= 16 to add up repeats")
        dim = (ctx.shape(x) or [None] * idx.ndim)[axis]
        moved = np.moveaxis(np.where(idx < 0, idx + (dim or 0), idx), axis, -1).reshape(-1, idx.shape[axis])
        if any(len(np.unique(row)) != row.size for row in moved):
            raise _needs_16(ctx, "repeated indices need opset >= 16 to add up")
    return [ctx.op("ScatterElements", [ctx.zeros_like(x), ind, gy[0]], **attrs), None]


@vjp_rule("TopK")
def top_k(ctx: RuleContext, gy: Grads) -> Grads:
    """values = x at the top k indices along ``axis``: gx = gy scattered back there (the indices of
    one slice never repeat); the indices output carries no gradient."""
    x = ctx.inputs[0]
    g = gy[0] if gy[0] is not None else ctx.zeros_like(ctx.outputs[0])
    return [ctx.op("ScatterElements", [ctx.zeros_like(x), ctx.outputs[1], g], axis=int(ctx.attr("axis", -1))), None]


@vjp_rule("CumSum")
def cum_sum(ctx: RuleContext, gy: Grads) -> Grads:
    """y_i = sum of x_j for j up to i (or from i, ``reverse``; without i, ``exclusive``): each x_j
    reaches the y_i on the other side, so gx is the sum of gy the other way, as exclusive as y."""
    return [ctx.op("CumSum", [gy[0], ctx.inputs[1]], exclusive=int(ctx.attr("exclusive", 0)),
                   reverse=1 - int(ctx.attr("reverse", 0))), None]


@vjp_rule("ReverseSequence")
def reverse_sequence(ctx: RuleContext, gy: Grads) -> Grads:
    """y = each batch entry's first ``sequence_lens[b]`` steps reversed (tf.reverse_sequence, a
    bidirectional RNN's backward pass as tf2onnx may write it): a permutation that is its own
    inverse, so gx is gy reversed the same way."""
    return [ctx.op("ReverseSequence", [gy[0], ctx.inputs[1]], batch_axis=int(ctx.attr("batch_axis", 1)),
                   time_axis=int(ctx.attr("time_axis", 0))), None]


@vjp_rule("Trilu")
def trilu(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x with the entries outside a triangle zeroed: gx = gy with the same entries zeroed."""
    k = [i for i in ctx.inputs[1:2] if i]
    return [ctx.op("Trilu", [gy[0]] + k, upper=int(ctx.attr("upper", 1)))] + [None] * (len(ctx.inputs) - 1)


@vjp_rule("ScatterElements")
def scatter_elements(ctx: RuleContext, gy: Grads) -> Grads:
    """ScatterElements along ``axis`` (max-pool gradients scatter this way, so a second derivative
    passes through here): see ``_scatter_vjp``."""
    return _scatter_vjp(ctx, gy, "GatherElements", axis=int(ctx.attr("axis", 0)))


@vjp_rule("Compress")
def compress(ctx: RuleContext, gy: Grads) -> Grads:
    """y = the slices of x along ``axis`` (of x flattened, without one) where the condition is
    true: gx = gy written back at those places, zeros elsewhere. The places are distinct, so a
    plain ScatterElements (opset 11) does it; a condition shorter than the axis drops the rest.
    """
    x, cond = ctx.inputs[:2]
    g = gy[0]
    kept = ctx.op("Reshape", [ctx.op("NonZero", [cond]), ctx.const([-1])])
    axis = ctx.attr("axis")
    if axis is None:
        flat = ctx.op("Reshape", [ctx.zeros_like(x), ctx.const([-1])])
        return [ctx.op("Reshape", [ctx.op("ScatterElements", [flat, kept, g], axis=0), ctx.shape_of(x)]), None]
    r = _rank(ctx, x)
    axis = _norm_axis(int(axis), r)
    along = ctx.op("Reshape", [kept, ctx.const([-1 if a == axis else 1 for a in range(r)])])
    where = ctx.op("Expand", [along, ctx.shape_of(g)])
    return [ctx.op("ScatterElements", [ctx.zeros_like(x), where, g], axis=axis), None]


@vjp_rule("GatherND")
def gather_nd(ctx: RuleContext, gy: Grads) -> Grads:
    """y = x read at index tuples: gx = gy scatter-added at them into zeros like x (opset 16).

    With ``batch_dims`` b (tf2onnx writes ``tf.gather(..., batch_dims=b)`` this way), each tuple
    indexes its own batch entry: the entry's b coordinates are put in front of every tuple, which
    makes them plain tuples into all of x, and ScatterND takes no batch_dims."""
    if ctx.opset < 16:
        raise _needs_16(ctx, "GatherND needs opset >= 16 to add up repeated indices")
    x, ind = ctx.inputs[:2]
    batch = int(ctx.attr("batch_dims", 0))
    if batch:
        ind = _with_batch_coordinates(ctx, x, ind, batch)
    return [ctx.op("ScatterND", [ctx.zeros_like(x), ind, gy[0]], reduction="add"), None]


def _with_batch_coordinates(ctx: RuleContext, x: str, ind: str, batch: int) -> str:
    """GatherND's indices (B1..Bb, ..., k) with each entry's batch coordinates in front: (B1..Bb, ..., b + k)."""
    q = ctx.rank(ind)
    if q is None:
        raise _unsupported(ctx, f"rank of the GatherND indices {ind!r} unknown")
    lead = ctx.op("Slice", [ctx.shape_of(ind), ctx.const([0]), ctx.const([-1])])   # the tuples' grid
    parts = []
    for a in range(batch):
        size = _dim(ctx, x, a)
        count = ctx.const(np.array(size, np.int64)) if isinstance(size, int) else ctx.squeeze(size, [0])
        along = ctx.op("Range", [ctx.const(np.array(0, np.int64)), count, ctx.const(np.array(1, np.int64))])
        placed = ctx.op("Reshape", [along, ctx.const([-1 if k == a else 1 for k in range(q - 1)])])
        parts.append(ctx.unsqueeze(ctx.op("Expand", [placed, lead]), [q - 1]))
    return ctx.op("Concat", parts + [ind], axis=-1)
