"""Derived graphs of one model, built on demand and cached with their sessions.

Methods never touch ONNX Runtime directly: they ask this engine for the outputs
of a batch of inputs, for exposed activations, or for gradients seeded by
cotangent rows. Each request maps to one cached derived graph, simplified first
(``graph.simplify``): a MobileNetV3 whose exporter spelled out its hard-swish
runs its forward passes about 1.5x faster for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import onnx

from .detection import DetectionList
from .errors import TargetError, UnsupportedOpError
from .graph.simplify import simplify_inplace
from .graph.surgery import expose, replace
from .model import Model
from .runtime import Progress, Runtime


@dataclass(frozen=True)
class Target:
    """What is scored: score = offset + <seed, output row>. A class index becomes a one-hot seed."""

    index: int
    label: str
    seed: np.ndarray = field(repr=False, compare=False)
    offset: float = 0.0
    region: str = "won"     # a per-pixel class's pixels: those it wins, its peak, or all (REGIONS)


# Which pixels of a per-pixel class map a class target scores: those the class wins in the image's
# output (a segment, pytorch-grad-cam's SemanticSegmentationTarget with the predicted mask), its
# highest pixel (a keypoint heatmap's peak), or every pixel (the whole map).
REGIONS = ("won", "peak", "all")


def check_region(model: Model, region: str) -> None:
    """A typed error for a region that is none of REGIONS, or one given for no per-pixel output."""
    if not isinstance(region, str) or region not in REGIONS:      # an array cannot be tested with `in`
        raise TargetError(f"region must be one of {', '.join(REGIONS)}, not {region!r}")
    if region != "won" and model.dense is None:
        raise TargetError(f"region {region!r} picks pixels of a per-pixel output (segmentation maps, keypoint "
                          "heatmaps); this model's output has none")


class Engine:
    def __init__(self, model: Model, runtime: Runtime, batch_size: Optional[int] = None,
                 simplify: bool = True) -> None:
        self.model = model
        self.runtime = runtime
        self.batch_size = batch_size
        self.simplify = simplify          # False: forward passes run the model's own graph (benchmarks compare)
        self._joint: dict[tuple, Optional[tuple]] = {}   # layers_gradients: (first, rest, tail), or None

    def _forward_graph(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return simplify_inplace(model) if self.simplify else model

    # forward ---------------------------------------------------------------------------------
    def outputs(self, x: np.ndarray, tensors: Sequence[str], progress: Optional[Progress] = None) -> list[np.ndarray]:
        """Values of `tensors` for a batch of inputs (run in chunks), one per requested name."""
        unique = list(dict.fromkeys(tensors))
        key = "expose:" + "|".join(unique)
        sess = self.runtime.session(key, lambda: self._forward_graph(expose(self.model.light, unique)))
        values = self.runtime.run_batched(sess, {self.model.input.name: x}, outputs=unique,
                                          batch_size=self.batch_size, progress=progress)
        by_name = dict(zip(unique, values))
        return [by_name[t] for t in tensors]

    def pin_mixed_rows(self) -> None:
        """Run every image alone when the model reads across its batch: the ops the trace names
        (``model.one_image``), or two images that give other values together than alone
        (`rows_independent`). The trace runs only where the file fixed its batch; a file with a
        free batch can still reduce over it (``x / x.abs().mean()`` without a dim), and SmoothGrad's
        copies or IG's path would then mix in one run."""
        m = self.model
        self.runtime.fixed_rows = m.fixed_batch
        if not m.one_image and (m.fixed_batch or self._may_mix_rows()) and not self.rows_independent():
            m.one_image = ("a run of two images differed from each image run alone",)
        self.runtime.one_image = bool(m.one_image)

    def _may_mix_rows(self) -> bool:
        """Whether a graph with a free batch has a node that could read across it (`may_mix_rows`):
        the check of `rows_independent` costs a session and three runs, so it runs only then."""
        from .graph.batch_axis import may_mix_rows
        from .graph.normalize import _const_values, tensor_shapes

        g = self.model.light.graph
        ranks = {k: len(v) for k, (_, v) in tensor_shapes(self.model.light).items() if v is not None}
        return may_mix_rows(g, ranks, _const_values(g)) is not None

    def rows_independent(self) -> bool:
        """Whether two random inputs run together give what each gives alone (checked once per model).

        onnxsal frees a fixed batch by tracing it through the graph (`graph/batch_axis.py`); an op the
        trace cannot follow may still read across the rows of a run without any error (a resize to a
        size that names the batch of 1), and a free batch is not traced at all."""
        i = self.model.input
        shape = (2, i.channels, i.height, i.width) if i.layout == "NCHW" else (2, i.height, i.width, i.channels)
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        (together,) = self.outputs(x, [self.model.output])
        alone = np.concatenate([self.outputs(x[k:k + 1], [self.model.output])[0] for k in range(2)])
        scale = float(np.nanmax(np.abs(alone), initial=0.0)) or 1.0
        return bool(np.allclose(together, alone, rtol=1e-3, atol=1e-4 * scale, equal_nan=True))

    def outputs_given(self, layer: str, acts: np.ndarray, x: np.ndarray, tensors: Sequence[str],
                      progress: Optional[Progress] = None) -> list[np.ndarray]:
        """Values of `tensors` for a batch of the layer's activations put in place of what the
        input makes of them; paths around the layer run from `x` (one row, shared by the batch)."""
        unique = list(dict.fromkeys(tensors))
        key = f"replace:{layer}|" + "|".join(unique)
        sess = self.runtime.session(key, lambda: self._forward_graph(replace(self.model.light, layer, unique)))
        values = self.runtime.run_batched(sess, {layer: acts}, fixed=self._around(sess, x), outputs=unique,
                                          batch_size=self.batch_size, progress=progress)
        by_name = dict(zip(unique, values))
        return [by_name[t] for t in tensors]

    # gradients -------------------------------------------------------------------------------
    def gradients(self, x: np.ndarray, seeds: np.ndarray, wrt: Sequence[str], *, score: str = "logit",
                  extra: Sequence[str] = (), rules: Optional[Mapping] = None, rules_name: str = "",
                  progress: Optional[Progress] = None, whole: bool = False) -> dict[str, np.ndarray]:
        """Forward + VJP for a batch: `seeds` (N, C) are the cotangent rows of the score tensor.

        Returns {tensor: value} for the score tensor and `extra`, and {"grad_<x>": value} for `wrt`.
        `whole` runs the rows as one batch, never in chunks: rules that pair rows (DeepLIFT's
        input and baseline halves) need them together.
        """
        y = self.model.score_tensor(score)
        wrt, extra = list(wrt), list(extra)
        key = f"vjp:{y}|{','.join(wrt)}|{','.join(extra)}|{rules_name}"
        sess = self.runtime.session(key, lambda: gradient_graph(self.model.light, y, wrt, rules=rules, outputs=extra))
        names = [o.name for o in sess.get_outputs()]
        cot = sess.get_inputs()
        grad_in = next(i for i in cot if i.name != self.model.input.name)
        seeds = seed_rows(seeds, grad_in.shape)
        results = self.runtime.run_batched(sess, {self.model.input.name: x, grad_in.name: seeds},
                                           outputs=names, batch_size=len(x) if whole else self.batch_size,
                                           progress=progress, whole=whole)
        return dict(zip(names, results))


    def layer_gradients(self, acts: np.ndarray, seeds: np.ndarray, layer: str, x: np.ndarray, *,
                        score: str = "logit", progress: Optional[Progress] = None) -> np.ndarray:
        """d score / d layer at a batch of the layer's activations, through the network after it.

        Only the nodes after the layer are differentiated: a CAM's forward pass up to the layer has
        already run (to pick the targets), and Layer IG moves the activations along a path. Paths
        around the layer (a skip connection across it) run forward from `x` (one row, shared).
        """
        y = self.model.score_tensor(score)
        key = f"replacevjp:{y}|{layer}"
        sess = self.runtime.session(key, lambda: gradient_graph(replace(self.model.light, layer, [y]), y, [layer]))
        names = [o.name for o in sess.get_outputs()]
        grad_in = next(i for i in sess.get_inputs() if i.name == "grad_" + y)
        out = self.runtime.run_batched(sess, {layer: acts.astype(np.float32), grad_in.name: seed_rows(seeds, grad_in.shape)},
                                       fixed=self._around(sess, x), outputs=names, batch_size=self.batch_size,
                                       progress=progress)
        return dict(zip(names, out))["grad_" + layer]

    def layers_gradients(self, acts: Mapping[str, np.ndarray], seeds: np.ndarray, layers: Sequence[str], x: np.ndarray, *,
                         score: str = "logit", progress: Optional[Progress] = None) -> Optional[dict[str, np.ndarray]]:
        """d score / d each of several layers from one pass, as one backward pass gives pytorch-grad-cam
        every target layer's gradient: the network after the first layer (in graph order), fed that
        layer's activations (``acts`` by layer, one row per seed), differentiated w.r.t. it and the
        later layers it computes. None when a later layer is not computed there (it does not reach
        the score): the caller then takes each layer's own pass."""
        y = self.model.score_tensor(score)
        asked = (y,) + tuple(sorted(layers))
        if asked not in self._joint:       # ordered and cut once per set of layers; the tail kept with its session
            order = {o: i for i, n in enumerate(self.model.light.graph.node) for o in n.output}
            first, *rest = sorted(layers, key=lambda t: order.get(t, -1))
            tail = replace(self.model.light, first, [y])
            made = {o for n in tail.graph.node for o in n.output}
            self._joint[asked] = (first, rest, tail) if all(t in made for t in rest) else None
        if self._joint[asked] is None:
            return None
        first, rest, tail = self._joint[asked]
        key = f"replacevjp:{y}|{first}|" + "|".join(rest)
        sess = self.runtime.session(key, lambda: gradient_graph(tail, y, [first] + rest))
        names = [o.name for o in sess.get_outputs()]
        grad_in = next(i for i in sess.get_inputs() if i.name == "grad_" + y)
        feed = {first: acts[first].astype(np.float32), grad_in.name: seed_rows(seeds, grad_in.shape)}
        out = self.runtime.run_batched(sess, feed, fixed=self._around(sess, x), outputs=names,
                                       batch_size=self.batch_size, progress=progress)
        found = dict(zip(names, out))
        return {t: found["grad_" + t] for t in layers}

    def layer_hvp(self, acts: np.ndarray, seeds: np.ndarray, layer: str, x: np.ndarray, *, score: str = "logit",
                  rest: bool = True, progress: Optional[Progress] = None) -> tuple[np.ndarray, np.ndarray]:
        """(d S / d layer, H a): the score's gradient at the layer and its Hessian there applied to
        the activations themselves (ShapleyCAM), through the network after the layer.

        With ``rest`` the score is ShapleyCAM's ReST target, the logit plus its log-softmax
        (pytorch-grad-cam's ``ClassifierOutputReST``), written into the graph so its curvature is
        differentiated; otherwise the configured score, whose Hessian is zero on a network that is
        piecewise linear after the layer.
        """
        from .graph.second import first_grad_name, hvp
        from .graph.surgery import REST, with_rest_head

        y = self.model.logits if rest else self.model.score_tensor(score)
        scored = REST if rest else y
        key = f"hvp:{y}|{layer}|{rest}"

        def build():
            tail = replace(self.model.light, layer, [y])
            if rest:
                with_rest_head(tail, y)
            return hvp(tail, scored, layer)

        sess = self.runtime.session(key, build)
        names = [o.name for o in sess.get_outputs()]
        grad_in = next(i for i in sess.get_inputs() if i.name == "grad_" + scored)
        a = acts.astype(np.float32)
        out = self.runtime.run_batched(sess, {layer: a, grad_in.name: seed_rows(seeds, grad_in.shape),
                                              "grad_" + first_grad_name(layer): a},
                                       fixed=self._around(sess, x), outputs=names, batch_size=self.batch_size,
                                       progress=progress)
        res = dict(zip(names, out))
        return res[first_grad_name(layer)], res["grad_" + layer]

    def _around(self, sess, x: np.ndarray) -> Optional[dict]:
        """The image feed of a replaced-layer graph (one row, shared), when a path around the layer needs it."""
        image = self.model.input.name
        return {image: x} if any(i.name == image for i in sess.get_inputs()) else None


def gradient_graph(model: onnx.ModelProto, y: str, wrt: Sequence[str], **kwargs) -> onnx.ModelProto:
    """``graph.autodiff.vjp``; an op it cannot differentiate names, besides the op and node, the
    methods that still explain the model (forward passes only)."""
    from .graph.autodiff import vjp

    try:
        return vjp(model, y, wrt, **kwargs)
    except UnsupportedOpError as exc:
        from .methods import gradient_free

        raise UnsupportedOpError(exc.op_type, exc.node_name, f"{exc.where}; methods without gradients still "
                                 f"explain this model: {', '.join(gradient_free())}") from None


def seed_rows(seeds: np.ndarray, cotangent_shape: Sequence) -> np.ndarray:
    """(N, C) seed rows shaped like the score tensor's cotangent input, e.g. (N, C, 1, 1)."""
    tail = tuple(d if isinstance(d, int) and d > 0 else 1 for d in cotangent_shape[1:])
    return np.asarray(seeds, np.float32).reshape((len(seeds),) + tail)


def score_rows(out: np.ndarray, targets: Sequence[Target], detection=None) -> np.ndarray:
    """(N, T) each target's score in each output row. With a final-detection list (``detection``),
    a class target scores the class's most confident kept detection in each row, 0 with none: its
    seed's row names no detection of its own once the input changes (see ``DetectionList.follow``)."""
    flat = out.reshape(len(out), -1)
    seeds = np.stack([t.seed for t in targets]).astype(np.float32)
    offsets = np.array([t.offset for t in targets], np.float32)
    scores = flat @ seeds.T + offsets
    if isinstance(detection, DetectionList):
        best = np.stack([detection.best(row)[0] for row in flat])
        for j, t in enumerate(targets):
            if t.index >= 0:
                scores[:, j] = best[:, t.index]
    return scores


def make_targets(model: Model, indices: Sequence[int], score: str = "logit",
                 row: Optional[np.ndarray] = None, region: str = "won") -> list[Target]:
    """Seeds for class indices. Binary single-unit models: class 1 = +output, class 0 = -output
    (and 1 - p for probabilities, so class 0's probability is scored).

    Per-pixel models (``model.dense``): class c scores the sum of its map over the pixels the
    model assigns to c in ``row`` (its output on the input; a single map's pixels above its
    threshold), pytorch-grad-cam's segmentation recipe; over every pixel when it assigns none.
    Detectors (``model.detection``): class c scores its confidence at its most confident anchor in
    ``row``, or its most confident final detection.
    """
    if model.detection is not None:
        if row is None:
            raise ValueError("a detector's class targets need its output row")
        values, where = model.detection.best(row)
        for i in indices:
            if where[i] < 0:
                found = [f"{model.label(c)} ({values[c]:.3g})" for c in np.argsort(-values)[:5] if where[c] >= 0]
                raise TargetError(f"class {model.label(int(i))} has no detection in this image; the detector kept "
                                  + (", ".join(found) if found else "none"))
        return [Target(int(i), model.label(int(i)), model.detection.seed(int(i), int(where[i]))) for i in indices]
    if model.dense is not None:
        if row is None:
            raise ValueError("a per-pixel model's class targets need its output row")
        maps = model.dense.maps(row)
        won = model.dense.won(maps)
        out = []
        for i in indices:
            seed = np.zeros(maps.shape, np.float32)
            if region == "peak":
                seed[int(i), int(np.argmax(maps[int(i)]))] = 1.0
            elif region == "all" or not won[i].any():
                seed[int(i)] = 1.0
            else:
                seed[int(i)] = won[i]
            out.append(Target(int(i), model.label(int(i)), model.dense.flat(seed), region=region))
        return out
    out = []
    for i in indices:
        if model.binary:
            seed = np.array([1.0 if i == 1 else -1.0], np.float32)
            offset = 1.0 if (i == 0 and score == "probability") else 0.0
            out.append(Target(int(i), model.label(int(i)), seed, offset))
        else:
            seed = np.zeros(model.num_classes, np.float32)
            seed[i] = 1.0
            out.append(Target(int(i), model.label(int(i)), seed))
    return out
