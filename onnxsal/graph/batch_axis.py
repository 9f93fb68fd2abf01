"""Where the batch lies in each tensor of a graph exported at a fixed batch size.

An exporter that traces a model at batch 1 writes that 1 into its Reshape targets, and the
dynamo exporter also moves and merges the batch: torchvision's ViT runs its attention
sequence first on ``(197, 12, 64)`` tensors, the batch merged with the twelve heads, and
its ConvNeXt flattens the pooled features to ``(768,)`` before reading them back with a
``Gather``. Freeing such a batch means knowing, for each reshaped tensor, which axis holds
it. This module traces the batch from the graph's inputs, op by op, through the shapes the
file itself declares at its fixed batch.

A tensor's batch lies in one axis: at batch ``n`` that axis is ``n`` times its size in the
file, and every other axis keeps its size. Inside that axis the batch is one factor of a
row-major product; ``inner`` is the size of the part after it, within one sample (1 for a
plain batch axis, 12 for ``(N*12, 197, 64)``, 1 again for ``(197*N, 768)``). Where an op's
effect on the batch cannot be told (an op without a rule here, attributes that are not
constants), its outputs are LOST and their reshapes keep the older leading-axis rule in
`normalize.dynamic_batch`. Where an op reads across the batch (a mean over it, a pick of
one row), that is noted in ``across``: at batch 1 the op is harmless, at any other batch it
would mix the samples, so such a model runs one image at a time.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx

from . import weights

LOST = -1       # computed from the batch, axis unknown
SHAPE = -2      # a shape value computed from a batched tensor (Shape, Size): no batch axis of its own

_ELEMENTWISE = {
    "Abs", "Acos", "Acosh", "Add", "And", "Asin", "Asinh", "Atan", "Atanh", "BitShift", "Cast", "CastLike",
    "Ceil", "Celu", "Clip", "Cos", "Cosh", "DequantizeLinear", "Div", "Dropout", "Elu", "Equal", "Erf", "Exp",
    "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "Max", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "Not", "Or",
    "Pow", "PRelu", "QuantizeLinear", "Reciprocal", "Relu", "Round", "Selu", "Shrink", "Sigmoid", "Sign", "Sin",
    "Sinh", "Softplus", "Softsign", "Sqrt", "Sub", "Sum", "Swish", "Tan", "Tanh", "ThresholdedRelu", "Where",
    "Xor",
}
# Ops that treat axis 0 as the batch (NCHW and friends): the batch must already be there.
_BATCH_FIRST = {
    "AveragePool", "BatchNormalization", "Col2Im", "Conv", "ConvInteger", "ConvTranspose", "DepthToSpace",
    "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GridSample", "GroupNormalization",
    "InstanceNormalization", "LpPool", "LRN", "MaxPool", "MaxRoiPool", "QLinearConv", "SpaceToDepth",
}
_ONE_AXIS = {"Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LpNormalization": -1, "TopK": -1}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


class Tracer:
    """Batch axes by tensor name, for a graph exported at a fixed batch (`batch`, 1 unless told)
    whose `sources` hold it on axis 0.

    Tensors computed only from stored constants have no entry; those computed from another
    graph input (a mask, a lookup table) are LOST, since the caller feeds them as they are.

    At batch 1 a Reshape often cannot tell where the batch goes: ``(197, 1, 12, 64)`` to
    ``(197, 768)`` may put it inside the 197 or in front of the 768, and only the ops after it
    tell which one the model means (here a Gemm that needs all 768). So each such Reshape is a
    choice point: the trace takes its first reading, and when an op downstream loses the batch
    it goes back to the latest choice that op depends on and takes the next reading. Every
    reading keeps each sample's elements in place, so a wrong one can only lose the batch,
    never mix samples.
    """

    def __init__(self, graph: onnx.GraphProto, dims: dict, consts: dict, sources: list[str], batch: int = 1):
        self.dims, self.consts, self.batch = dims, consts, batch
        self.per_sample: dict[str, tuple[int, int]] = {}   # set by normalize.batch_tracer
        self.producer = {o: n for n in graph.node for o in n.output if o}
        stored = {i.name for i in graph.initializer}
        start = {vi.name: (LOST, 0) for vi in graph.input if vi.name not in stored}
        start.update({s: (0, 1) for s in sources})
        # name -> (axis, inner): the batch's axis, and the size of the part of that axis inside one sample
        self.where: dict[str, tuple[int, int]] = dict(start)
        self.depends: dict[str, frozenset] = {}  # name -> the choice points it depends on
        nodes = list(graph.node)
        choices: dict[int, list] = {}            # node index -> [readings, taken, state before it]
        steps = 20 * len(nodes) + 10000          # a search budget; past it, the readings in hand stay
        settled: set = set()                     # choice points held at their first reading
        across: dict[int, str] = {}              # node index -> how it reads across the batch
        i = 0
        while i < len(nodes):
            node = nodes[i]
            steps -= 1
            self.reason = ""
            ins = [self.where.get(n) if n else None for n in node.input]
            if all(v is None for v in ins):
                if self.copies_per_sample(node):
                    self.where[node.output[0]] = (0, 1)      # a stored tensor repeated for each sample
                i += 1
                continue
            dep = frozenset().union(*[self.depends.get(n, frozenset()) for n in node.input if n])
            readings = self._readings(node, ins)
            if len(readings) > 1 and i in settled:
                out = readings[:1]
            elif len(readings) > 1:
                if i not in choices:
                    choices[i] = [readings, 0, (dict(self.where), dict(self.depends))]
                out = [readings[choices[i][1]]]
                dep = dep | {i}
            else:
                out = readings or self._outputs(node, ins)
            if self.reason and not readings:
                across[i] = f"{node.op_type} {node.name or node.output[0]!r} {self.reason}"
            else:
                across.pop(i, None)
            known = [v for v in ins if v is not None]
            if out[0][0] == LOST and steps > 0 and all(v[0] != LOST for v in known) and any(v[0] >= 0 for v in known):
                # the batch is lost here: take the next reading of the latest choice this depends on
                open_points = [k for k in sorted(dep, reverse=True)
                               if k not in settled and choices[k][1] + 1 < len(choices[k][0])]
                if open_points or dep - settled:
                    if open_points:
                        k = open_points[0]
                        choices[k][1] += 1
                    else:
                        # no reading keeps the batch past this op: its choices go back to their
                        # first readings, for good, and the trace runs again from the earliest
                        k = min(dep - settled)
                        settled |= dep
                    self.where, self.depends = dict(choices[k][2][0]), dict(choices[k][2][1])
                    for later in [c for c in choices if c > k or (c == k and k in settled)]:
                        del choices[later]
                    i = k
                    continue
            for name, v in zip(node.output, out):
                if name:
                    self.where[name] = v
                    if dep:
                        self.depends[name] = dep
            i += 1
        self.across = [across[k] for k in sorted(across)]   # ops that would mix the samples of a batch

    @property
    def axes(self) -> dict[str, int]:
        """Tensor name -> the batch's axis (LOST, SHAPE as for `where`)."""
        return {k: v[0] for k, v in self.where.items()}

    def _outputs(self, node: onnx.NodeProto, ins: list) -> list[tuple[int, int]]:
        n_out = len(node.output)
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return [(LOST, 0)] * n_out                  # a subgraph may read batched tensors by name
        data = [v for v in ins if v is not None and v[0] >= 0]
        if len({inner for _, inner in data}) > 1:       # two layouts of the batch would mix samples
            return [(a, 0) for a in self._across(node, "combines two layouts of the batch")]
        inner = data[0][1] if data else 0
        try:
            axes = self._rule(node, [None if v is None else v[0] for v in ins])
        except (KeyError, IndexError, TypeError, ValueError):
            axes = [LOST] * n_out
        if node.op_type == "Gather" and axes[0] >= 0 and ins[0] is not None and ins[0][0] == axes[0]:
            inner = 1                                   # one row read out of a flattened batch
        return [(a, inner if a >= 0 else 0) for a in axes]

    def _readings(self, node: onnx.NodeProto, ins: list) -> list[tuple[int, int]]:
        """The places a Reshape or Flatten may put the batch, best first; [] for other ops."""
        if node.op_type not in ("Reshape", "Flatten") or ins[0] is None or ins[0][0] < 0:
            return []
        if any(v is not None and v[0] != SHAPE for v in ins[1:]):
            return [(LOST, 0)]                          # a target computed from the data
        # A target computed at run time from shapes (TorchScript's ``unflatten``) is read, like a
        # stored one, through the shapes the file declares at its fixed batch: normalize then
        # stores that shape with the batch's axis left free.
        try:
            before, after = self.shape(node.input[0]), self.shape(node.output[0])
        except KeyError:
            return [(LOST, 0)]
        a, inner = ins[0]
        stride = inner * int(np.prod(before[a + 1:]))   # elements from one sample to the next
        found = []
        for j in range(len(after)):
            per = int(np.prod(after[j + 1:]))
            # axis j holds the whole batch, each sample as `stride // per` consecutive entries
            if 0 not in after and stride % per == 0 and after[j] % (self.batch * (stride // per)) == 0:
                found.append((j, stride // per))
        # an axis that is the batch alone first, the one nearest the batch's own axis (``(1, 96, 56, 56)``
        # to ``(1, 1, 96, 3136)`` keeps it first, the size-1 heads after it); then the batch as the
        # outer factor of a later axis (``bsz * heads``)
        alone = [after[j] == self.batch and k == 1 for j, k in found]
        order = sorted(range(len(found)), key=lambda i: (not alone[i], abs(found[i][0] - a) if alone[i] else -found[i][0]))
        return [found[i] for i in order] or [(LOST, 0)]

    # -- helpers ------------------------------------------------------------------------
    def shape(self, name: str) -> list:
        """The file's static dims of `name`; KeyError when any is unknown."""
        d = self.dims[name]
        if d is None or any(v is None for v in d):
            raise KeyError(name)
        return list(d)

    def const(self, name: str) -> np.ndarray:
        return weights.array(self.consts[name])

    def ints(self, node: onnx.NodeProto, index: int, attr: str) -> Optional[list[int]]:
        """An ints operand given as attribute (old opsets) or constant input (new ones)."""
        if len(node.input) > index and node.input[index]:
            return [int(v) for v in self.const(node.input[index]).reshape(-1)]
        value = _attr(node, attr)
        return None if value is None else [int(v) for v in value]

    def ints_or_floats(self, node: onnx.NodeProto, index: int) -> Optional[list]:
        """A constant operand's values, None when the input is absent or empty."""
        if len(node.input) <= index or not node.input[index]:
            return None
        values = self.const(node.input[index]).reshape(-1)
        return None if values.size == 0 else values.tolist()

    def copies_per_sample(self, node: onnx.NodeProto) -> bool:
        """Whether `node`, computed from constants alone, is an Expand that repeats a stored tensor
        once per sample of the file's batch (``rel_indices.expand(B, -1, -1, -1)``, ConViT's
        positions; ``cls_token.expand(B, -1, -1)``): its axis 0 is the batch, and the copies are
        made for the batch the graph gets (normalize)."""
        if self.batch == 1 or node.op_type != "Expand" or len(node.input) < 2 or node.input[1] not in self.consts:
            return False
        out = self.dims.get(node.output[0]) or ()
        return len(out) >= 2 and out[0] == self.batch and self._repeats_along(node, 0)

    def _repeats_along(self, node: onnx.NodeProto, axis: int) -> bool:
        """Whether the Expand `node` repeats its input along its output's `axis` (the input has
        size 1 there, or no such axis)."""
        try:
            src, out = self.shape(node.input[0]), self.shape(node.output[0])
        except KeyError:
            return False
        k = axis - (len(out) - len(src))          # Expand aligns its input to the output's last axes
        return k < 0 or src[k] == 1

    def same_in_each_sample(self, name: str, axis: int) -> bool:
        """Whether `name`, computed from constants alone, holds the same values at every index of
        `axis` (a class token the file stores, or expands, to its fixed batch)."""
        if self.batch == 1:
            return True
        if name in self.consts:
            values = self.const(name)
            return copies_equal(values, axis, values.shape[axis])
        node = self.producer.get(name)
        return node is not None and node.op_type == "Expand" and self._repeats_along(node, axis)

    def _across(self, node: onnx.NodeProto, why: str) -> list[int]:
        """LOST, noting that the op reads across the batch: at any other batch it would mix samples."""
        self.reason = why
        return [LOST] * len(node.output)

    def _keeps(self, src: str, a: int, out: str, b: int) -> int:
        """`b` when `out`'s axis `b` has `src`'s axis `a` size (the op did not grow the batch axis)."""
        return b if self.shape(src)[a] == self.shape(out)[b] else LOST

    # -- rules ----------------------------------------------------------------------------
    def _rule(self, node: onnx.NodeProto, ins: list) -> list[int]:
        op, n_out = node.op_type, len(node.output)
        lost = [LOST] * n_out
        traced = [(name, a) for name, a in zip(node.input, ins) if a is not None]
        if any(a == LOST for _, a in traced):
            return lost
        if op in ("Shape", "Size"):
            return [SHAPE] * n_out
        data = [(name, a) for name, a in traced if a != SHAPE]
        if not data:
            return [SHAPE] * n_out if op not in ("ConstantOfShape", "Expand", "Range", "Tile") else lost
        out = node.output[0]
        x, a = data[0]
        if op in _ELEMENTWISE:
            rank = len(self.shape(out))
            found = {b + rank - len(self.shape(name)) for name, b in data}
            if len(found) != 1:
                return lost
            b = found.pop()
            return [self._keeps(x, a, out, b)] + [LOST] * (n_out - 1)
        if op in _BATCH_FIRST or op == "Attention" or op == "AffineGrid":
            if any(b != 0 for _, b in data):
                return self._across(node, "treats axis 0 as the batch")
            if op == "AffineGrid" and x != node.input[0]:
                return lost
            return [0] * n_out                    # AffineGrid's size input follows theta (normalize)
        if op == "Resize":
            if x != node.input[0] or len(data) > 1:
                return lost
            scales = self.ints_or_floats(node, 2)
            sizes = self.ints_or_floats(node, 3)
            axes = list(_attr(node, "axes", None) or range(len(self.shape(x))))
            axes = [v % len(self.shape(x)) for v in axes]
            if a not in axes:
                return [a]
            k = axes.index(a)
            if (sizes is not None and sizes[k] == self.shape(x)[a]) or (sizes is None and scales is not None
                                                                          and scales[k] == 1):
                return [a]                        # normalize makes a size of the batch follow it
            return self._across(node, "resizes the batch axis")
        if op in _ONE_AXIS or op in ("ArgMax", "ArgMin", "CumSum"):
            rank = len(self.shape(x))
            if op == "CumSum":
                axis = int(self.const(node.input[1]).reshape(-1)[0])
            else:
                axis = int(_attr(node, "axis", _ONE_AXIS.get(op, 0)))
            if axis % rank == a:
                return self._across(node, "works along the batch axis")
            if len(data) > 1:
                return lost
            if op in ("ArgMax", "ArgMin") and not _attr(node, "keepdims", 1):
                return [a - (axis % rank < a)]
            return [a] * n_out
        if op in ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
            rank = len(self.shape(x))
            axis = int(_attr(node, "axis", -1)) % rank
            if a >= axis:
                return self._across(node, "normalises over the batch axis")
            return [a] + [a] * (n_out - 1) if x == node.input[0] else lost
        if op in _REDUCE:
            rank = len(self.shape(x))
            axes = self.ints(node, 1, "axes")
            if not axes:
                if _attr(node, "noop_with_empty_axes", 0):
                    return [a]
                return self._across(node, "reduces over every axis, the batch's too")
            axes = sorted(v % rank for v in axes)
            if a in axes:
                return self._across(node, "reduces over the batch axis")
            if x != node.input[0]:
                return lost
            return [a if _attr(node, "keepdims", 1) else a - sum(v < a for v in axes)]
        if op == "Transpose":
            rank = len(self.shape(x))
            perm = list(_attr(node, "perm", list(range(rank))[::-1]))
            return [perm.index(a)]
        if op == "Squeeze":
            shape = self.shape(x)
            axes = self.ints(node, 1, "axes")
            axes = [v % len(shape) for v in axes] if axes else [k for k, d in enumerate(shape) if d == 1]
            return lost if a in axes else [a - sum(v < a for v in axes)]
        if op == "Unsqueeze":
            rank = len(self.shape(out))
            axes = {v % rank for v in self.ints(node, 1, "axes") or []}
            kept = [p for p in range(rank) if p not in axes]
            return [kept[a]]
        if op == "Expand":
            rank = len(self.shape(out))
            return [self._keeps(x, a, out, a + rank - len(self.shape(x)))] if x == node.input[0] else lost
        if op == "Concat":
            rank = len(self.shape(out))
            axis = int(_attr(node, "axis")) % rank
            if axis == a:
                return self._across(node, "concatenates along the batch axis")
            return lost if any(b != a for _, b in data) else [a]
        if op == "Split":
            axis = int(_attr(node, "axis", 0)) % len(self.shape(x))
            if axis == a:
                return self._across(node, "splits the batch axis")
            return lost if x != node.input[0] else [a] * n_out
        if op == "Slice":
            if x != node.input[0]:
                return lost
            shape = self.shape(x)
            starts, ends = self.ints(node, 1, "starts"), self.ints(node, 2, "ends")
            axes = self.ints(node, 3, "axes") or list(range(len(starts)))
            steps = self.ints(node, 4, "steps") or [1] * len(starts)
            for s, e, ax, st in zip(starts, ends, axes, steps):
                if ax % len(shape) == a and not (st == 1 and s in (0, -shape[a]) and e >= shape[a]):
                    return self._across(node, "slices the batch axis")
            return [a]
        if op == "Pad":
            if x != node.input[0]:
                return lost
            rank = len(self.shape(x))
            pads = self.ints(node, 1, "pads")
            axes = self.ints(node, 3, "axes") if len(node.input) > 3 and node.input[3] else list(range(rank))
            k = [v % rank for v in axes].index(a) if a in [v % rank for v in axes] else None
            if k is not None and (pads[k] or pads[k + len(axes)]):
                return self._across(node, "pads the batch axis")
            return [a]
        if op == "Tile":
            if x != node.input[0]:
                return lost
            return [a] if self.ints(node, 1, "repeats")[a] == 1 else self._across(node, "repeats the batch")
        if op == "Gather":
            rank = len(self.shape(node.input[0]))
            axis = int(_attr(node, "axis", 0)) % rank
            if len(data) > 1:
                return lost
            if x == node.input[1]:            # batched indices into a table: an embedding
                return [axis + a]
            if axis == a:
                if _strided_gather(self, node, a) is None:
                    return self._across(node, "picks along the batch axis")
                return [a]
            return [a if a < axis else a + len(self.shape(node.input[1])) - 1]
        if op == "MatMul":
            ra, rb, rank = len(self.shape(node.input[0])), len(self.shape(node.input[1])), len(self.shape(out))
            if min(ra, rb) < 2:
                return lost
            found = set()
            for name, b in data:       # both operands batched: the batch is one of their batch axes
                r = ra if name == node.input[0] else rb
                row, col = (rank - 2, LOST) if name == node.input[0] else (LOST, rank - 1)
                found.add(row if b == r - 2 else col if b == r - 1 else b + rank - r)
            if LOST in found or (len(data) > 1 and found & {rank - 2, rank - 1}):
                return self._across(node, "multiplies along the batch axis")
            return [found.pop()] if len(found) == 1 else lost
        if op in ("LSTM", "GRU", "RNN"):
            first = bool(_attr(node, "layout", 0))      # batch-first (layout 1) or sequence-first
            if x != node.input[0]:
                return lost
            if a != (0 if first else 1):
                return self._across(node, "runs its recurrence along the batch axis")
            # Y (T, dirs, N, H) or (N, T, dirs, H); Y_h, Y_c (dirs, N, H) or (N, dirs, H). Constant
            # initial states of zeros are dropped by normalize (absent states are zeros of any batch)
            return [0 if first else 2] + [0 if first else 1] * (n_out - 1)
        if op == "Einsum":
            b = _einsum_axis(self, node, ins)
            return [b] if b != LOST or not self.reason else self._across(node, self.reason)
        if op == "Gemm":
            if x != node.input[0] or len(data) > 1:
                return lost
            if a != (1 if _attr(node, "transA", 0) else 0):
                return self._across(node, "multiplies along the batch axis")
            return [0]
        return lost
def copies_equal(values: np.ndarray, axis: int, copies: int, inner: int = 1) -> bool:
    """Whether `values` holds `copies` equal runs of `inner` entries along `axis` (whose size is
    copies × inner): one copy per sample of a batch."""
    split = values.reshape(values.shape[:axis] + (copies, inner) + values.shape[axis + 1:])
    return bool(np.array_equal(split, np.broadcast_to(split.take([0], axis=axis), split.shape)))


def _strided_gather(tracer: Tracer, node: onnx.NodeProto, a: int) -> Optional[np.ndarray]:
    """The indices of a Gather that reads the same entries out of each sample of a flattened
    batch, shaped ``(1, ...)`` (the first sample's), or None.

    The dynamo exporter lowers ``as_strided`` to ``Reshape(x, [-1])`` and a ``Gather`` of
    constant indices shaped ``(batch, ...)``: row k reads entries of sample k alone, at the same
    places as row 0 does in sample 0. It runs as that read on every sample of any batch.
    """
    name = node.input[1]
    if name not in tracer.consts:
        return None
    idx = tracer.const(name)
    size = tracer.shape(node.input[0])[a]
    row = size // tracer.batch                  # one sample's entries
    if tracer.where[node.input[0]] != (a, row) or row * tracer.batch != size:
        return None                         # the batch is not the whole of that axis
    if idx.ndim < 1 or idx.shape[0] != tracer.batch or idx.size == 0:
        return None
    idx = np.where(idx < 0, idx + size, idx).astype(np.int64)
    first = idx[:1]
    if first.min() < 0 or first.max() >= row:
        return None
    shifts = (np.arange(tracer.batch) * row).reshape((-1,) + (1,) * (idx.ndim - 1))
    return first if np.array_equal(idx, first + shifts) else None


def _einsum_axis(tracer: Tracer, node: onnx.NodeProto, ins: list) -> int:
    """The output axis of an Einsum's batch: its letter, when every operand that has the letter
    is batched there and the output keeps it."""
    equation = _attr(node, "equation").decode() if isinstance(_attr(node, "equation"), bytes) else _attr(node, "equation")
    equation = equation.replace(" ", "")
    if "..." in equation or "->" not in equation:
        return LOST
    terms, result = equation.split("->")
    terms = terms.split(",")
    letters = {terms[k][a] for k, a in enumerate(ins) if a is not None and a >= 0}
    if len(letters) != 1 or any(a == SHAPE for a in ins if a is not None):
        return LOST
    letter = letters.pop()
    for term, a in zip(terms, ins):
        if letter in term and (a is None or term.index(letter) != a or term.count(letter) > 1):
            return LOST
    if letter not in result:
        if tracer is not None:
            tracer.reason = "sums over the batch axis"
        return LOST
    return result.index(letter)


# Ops whose `axis` attribute, at 0, makes them work along the batch of a free-batch graph.
_AXIS_OPS = {"Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "TopK", "Concat", "Split", "Gather",
             "GatherElements", "ScatterElements", "CumSum", "ArgMax", "ArgMin", "Flatten", "LayerNormalization"}


def may_mix_rows(graph: onnx.GraphProto, ranks: dict[str, int], consts: dict) -> Optional[str]:
    """The first node of a graph with a free batch that could read across it, or None: a reduction
    over every axis or over axis 0 (``x / x.abs().mean()`` without a dim), an op along axis 0, a
    Transpose that moves it, a stored Reshape target that does not keep it first. `ranks`: inputs'
    ranks where known; `consts`: name -> TensorProto of constants.

    A screen, not a trace: it decides whether the load-time run of two images together against
    each alone is worth its cost (a session and three runs). A Reshape whose target is computed
    (``Shape`` -> ``Gather``, as exporters write a free batch) passes it."""
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        data = node.input[0] if node.input else ""
        rank = ranks.get(data)
        if not data or data in consts or (rank is not None and rank <= 1):
            continue                                   # stored tensors and shape arithmetic
        if op in _REDUCE:
            axes = _attr(node, "axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                t = consts.get(node.input[1])
                axes = None if t is None else [int(v) for v in onnx.numpy_helper.to_array(t).ravel()]
                if t is None:
                    return f"{op} {node.name!r}"               # axes computed at run time
            if not axes:
                if not _attr(node, "noop_with_empty_axes", 0):
                    return f"{op} {node.name!r}"
            elif any(v == 0 or (rank is not None and v == -rank) for v in axes):
                return f"{op} {node.name!r}"
        elif op in _AXIS_OPS:
            axis = _attr(node, "axis", _ONE_AXIS.get(op, 0) if op != "Flatten" else 1)
            if axis == 0 or (rank is not None and axis == -rank):
                return f"{op} {node.name!r}"
        elif op == "Transpose":
            perm = _attr(node, "perm")
            if perm is None or perm[0] != 0:
                return f"{op} {node.name!r}"
        elif op == "Reshape" and len(node.input) > 1:
            t = consts.get(node.input[1])
            if t is not None:
                target = onnx.numpy_helper.to_array(t).ravel()
                if target.size and int(target[0]) not in (0, -1):
                    return f"{op} {node.name!r}"
    return None
