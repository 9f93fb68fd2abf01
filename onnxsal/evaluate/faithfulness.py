"""Does removing what the map calls important change the prediction? Deletion and insertion.

Petsiuk et al. 2018 ("RISE"): pixels are taken in decreasing order of
saliency, `step` at a time. Deletion replaces them by a substrate and watches
the target's probability fall (a small area under the curve is good);
insertion starts from a blurred copy, puts the original pixels back in the same
order and watches it rise (a large area is good). The area is the trapezoid
rule over the fraction of pixels changed, on [0, 1].

Everything happens in the model's input space, at its input size:
* the order comes from the method's map resized to the input size (ties go to
  the first pixel in raster order, so a flat region is taken top to bottom);
* the deletion substrate is by default a black image pushed through the
  model's preprocessing (the paper's "black"); ``zero`` is an all-zero tensor,
  i.e. the dataset mean colour for mean/std preprocessing (what RISE's code does);
* the insertion start is a Gaussian blur of the input with sigma a fixed
  fraction of the input size (see `BLUR_FRACTION`), strong enough to erase a
  shape's outline at any resolution;
* the probability is the model's softmax over its last axis (per step, for a text recogniser's
  (N, steps, characters)), or sigmoid for a single-unit output and for each class of a model that
  ends in a sigmoid over its classes, computed from its logits, so models that end without an
  activation are scored the same way; a detector's best box, a segment's mean over its pixels (those
  its target scores: the pixels it wins in the original image, or all of them); a heatmap's value at
  the original peak as the model outputs it; a score onnxsal adds (a SimCC keypoint's confidence, a
  cosine similarity) as it is.
Each curve is one batched run of all its steps.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import ImageError, MethodError
from ..engine import check_region, make_targets
from ..explainer import Explainer
from ..methods import number_option
from ..postprocess import resize, smooth
from ..preprocess import Prepared, run_names
from .arguments import explainer, image_list, method_names, method_options, progress_report
from .localization import TOLERANCE, energy_inside, load_mask, pointing_hit

STEPS_AT_224 = 224          # the paper: 224 pixels a step on 224x224 images, i.e. 224 steps
BLUR_FRACTION = 1 / 16      # insertion start: sigma = min(H, W) / 16 (4 px at 64, 14 px at 224)
SUBSTRATES = ("black", "zero", "blur")
CHUNK = 64                  # rows built and run at a time, to bound memory on large inputs
Report = Callable[[int, int, str], None]


def default_step(size: tuple[int, int]) -> int:
    """Pixels per step giving the paper's 224 steps whatever the input size."""
    return max(1, int(round(size[0] * size[1] / STEPS_AT_224)))


def pixel_order(saliency: np.ndarray) -> np.ndarray:
    """(H, W) rank of each pixel: 0 for the most salient; ties keep raster order."""
    flat = np.asarray(saliency, np.float64).ravel()
    order = np.argsort(-flat, kind="stable")
    rank = np.empty(flat.size, np.int64)
    rank[order] = np.arange(flat.size)
    return rank.reshape(np.shape(saliency))


def fractions(n_pixels: int, step: int) -> np.ndarray:
    """Fraction of pixels changed after each step, 0 first and 1 last."""
    counts = np.minimum(np.arange(0, n_pixels + step, step), n_pixels)
    counts = counts[np.r_[True, counts[1:] != counts[:-1]]]
    return counts / n_pixels


def auc(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoid area under y(x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2)


def probabilities(ex: Explainer, xb: np.ndarray, target: int, pixels: Optional[np.ndarray] = None,
                  region: str = "won") -> np.ndarray:
    """(N,) probability of `target` for a batch: softmax of the logits, or sigmoid for one unit
    and for each class of a multi-label model (one that ends in a sigmoid over its classes); for a
    detector, the confidence of the class's most confident box; for a per-pixel model, the class's
    mean probability over ``pixels``, those its target scores in the original image
    (``segment_pixels``), or with ``region="peak"`` its map's value at that one pixel as the model
    outputs it: a keypoint heatmap's confidence, which a softmax over keypoints would flatten."""
    m = ex.model
    if m.dense is not None and region == "peak":
        if pixels is None:
            raise ValueError("a heatmap's peak value needs the peak's pixel (segment_pixels)")
        (out,) = ex.engine.outputs(xb, [m.output])
        z = out.reshape(len(xb), -1).astype(np.float64)
        return np.stack([m.dense.maps(r)[target][pixels].mean() for r in z])
    (logits,) = ex.engine.outputs(xb, [m.logits])
    z = logits.reshape(len(xb), -1).astype(np.float64)
    if m.detection is not None:         # a detector: the class's best box, wherever it moves to (0 when gone)
        return np.stack([m.detection.best(r)[0][target] for r in z])
    if m.dense is not None:             # a segment: its pixels stay those of the original image
        if pixels is None:
            raise ValueError("a per-pixel model's probabilities need the class's pixels (segment_pixels)")
        return np.stack([m.dense.probability(m.dense.maps(r), target)[pixels].mean() for r in z])
    if m.score_as_is:                   # a keypoint's confidence, a similarity: no softmax makes them probabilities
        return (z[:, 0] if target == 1 else -z[:, 0]) if z.shape[1] == 1 else z[:, target]
    if z.shape[1] == 1:
        p1 = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return p1 if target == 1 else 1.0 - p1
    if m.activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z[:, target]))
    # over the last axis of more than one value (a conv head's (N, C, 1, 1) over C): a text
    # recogniser's (N, steps, characters) has a softmax per step
    dims = [d for d in np.shape(logits)[1:] if d != 1]
    z = z.reshape(len(xb), -1, dims[-1])
    if m.activation is None and (z >= 0).all() and np.allclose(z.sum(axis=2), 1.0, rtol=0, atol=1e-4):
        # probabilities already, made by no final Softmax node (an ensemble's mean of softmaxes)
        return z.reshape(len(xb), -1)[:, target]
    e = np.exp(z - z.max(axis=2, keepdims=True))
    return (e / e.sum(axis=2, keepdims=True)).reshape(len(xb), -1)[:, target]


def _spatial(masks: np.ndarray, nhwc: bool) -> np.ndarray:
    return masks[:, :, :, None] if nhwc else masks[:, None, :, :]


def substrate(ex: Explainer, x: np.ndarray, kind: str, blur_sigma: Optional[float] = None) -> np.ndarray:
    """The tensor that replaces pixels: a black image, zeros, or a blurred copy of `x`."""
    nhwc = ex.model.input.layout == "NHWC"
    if kind == "zero":
        return np.zeros_like(x)
    if kind == "black":
        spec = ex.model.preprocess
        if spec is None:
            return np.zeros_like(x)
        value = (0.0 * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        shape = (1, 1, 1, -1) if nhwc else (1, -1, 1, 1)
        return np.broadcast_to(value.reshape(shape), x.shape).astype(np.float32).copy()
    if kind == "blur":
        sigma = float(blur_sigma) if blur_sigma else min(ex.model.input.size) * BLUR_FRACTION
        chw = x.transpose(0, 3, 1, 2) if nhwc else x
        b = smooth(chw.astype(np.float32), sigma)
        return np.ascontiguousarray(b.transpose(0, 2, 3, 1) if nhwc else b, dtype=np.float32)
    raise MethodError(f"substrate must be one of {', '.join(SUBSTRATES)}, not {kind!r}")


def segment_pixels(ex: Explainer, x: np.ndarray, target: int, region: str = "won") -> Optional[np.ndarray]:
    """A per-pixel model's pixels that class ``target``'s target scores in ``x``'s own output, as
    ``explain`` picks them for ``region`` (``engine.REGIONS``); None for other models."""
    m = ex.model
    if m.dense is None:
        return None
    check_region(m, region)
    logits, out = ex.engine.outputs(np.asarray(x, np.float32)[:1], [m.logits, m.output])
    row = (logits if m.activation is None else out).reshape(-1)
    (t,) = make_targets(m, [int(target)], row=row, region=region)
    return m.dense.maps(t.seed)[int(target)] != 0


def curve(ex: Explainer, first: np.ndarray, rest: np.ndarray, rank: np.ndarray, step: int, target: int,
          pixels: Optional[np.ndarray] = None, region: str = "won") -> np.ndarray:
    """Probabilities as the pixels of rank < k take their value from `first` and the others from
    `rest`, for k = 0, step, 2 step, ..., all: deletion is (substrate, x), insertion (x, start).
    ``pixels``, ``region``: a per-pixel model's class pixels (``segment_pixels``) and how they were picked."""
    n = rank.size
    counts = np.rint(fractions(n, step) * n).astype(np.int64)
    nhwc = ex.model.input.layout == "NHWC"
    out = []
    for s in range(0, len(counts), CHUNK):
        c = counts[s:s + CHUNK]
        masks = (rank[None] < c[:, None, None]).astype(np.float32)      # 1 where `first` shows
        m = _spatial(masks, nhwc)
        xb = (first * m + rest * (1 - m)).astype(np.float32)
        out.append(probabilities(ex, xb, target, pixels, region))
    return np.concatenate(out)


@dataclass
class Curves:
    x: np.ndarray            # fraction of pixels changed
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        return auc(self.x, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.x, self.insertion)


def deletion_insertion(ex: Explainer, x: np.ndarray, saliency: np.ndarray, target: int, *,
                       step: Optional[int] = None, deletion: str = "black", insertion: str = "blur",
                       blur_sigma: Optional[float] = None, region: str = "won") -> Curves:
    """Both curves for one input `x` (1, ...) and a map at the model's input size; ``region``: the
    pixels of a per-pixel model's class that its probability is read over, as ``explain`` takes it."""
    size = ex.model.input.size
    if np.shape(saliency) != tuple(size):
        raise ImageError(f"the map is {np.shape(saliency)}; deletion and insertion need it at the input size {size}")
    step = int(step) if step else default_step(size)
    if step < 1:
        raise MethodError("step must be at least 1 pixel")
    rank = pixel_order(saliency)
    x = np.asarray(x, np.float32)
    xs = fractions(rank.size, step)
    pixels = segment_pixels(ex, x, target, region)
    dele = curve(ex, substrate(ex, x, deletion, blur_sigma), x, rank, step, target, pixels, region)
    ins = curve(ex, x, substrate(ex, x, insertion, blur_sigma), rank, step, target, pixels, region)
    return Curves(xs, dele, ins)


# the whole evaluation -----------------------------------------------------------------------

@dataclass
class Scored:
    """One method on one image."""

    image: str
    method: str
    target: int
    label: str
    deletion: float
    insertion: float
    hit: Optional[bool]
    energy: Optional[float]
    seconds: float           # the explanation itself, not the metrics
    curves: Curves = field(repr=False)


METRICS = {  # name -> (column, higher is better)
    "deletion": ("deletion AUC", False),
    "insertion": ("insertion AUC", True),
    "hit": ("pointing game", True),
    "energy": ("energy PG", True),
}


@dataclass
class EvaluationReport:
    model: str
    methods: list[str]
    images: list[str]
    settings: dict
    results: list[Scored] = field(default_factory=list)

    def of(self, method: str) -> list[Scored]:
        return [r for r in self.results if r.method == method]

    def stats(self, method: str) -> dict[str, tuple[float, float]]:
        """metric -> (mean, std) over the images that have it."""
        out = {}
        rs = self.of(method)
        for key in METRICS:
            vals = [float(getattr(r, key)) for r in rs if getattr(r, key) is not None]
            if vals:
                out[key] = (float(np.mean(vals)), float(np.std(vals)))
        out["seconds"] = (float(np.mean([r.seconds for r in rs])), float(np.std([r.seconds for r in rs])))
        return out

    def ranked(self) -> list[tuple[str, float]]:
        """Methods by their mean rank over the metrics measured (1 = best on every one)."""
        stats = {m: self.stats(m) for m in self.methods}
        keys = [k for k in METRICS if all(k in stats[m] for m in self.methods)]
        ranks = {m: [] for m in self.methods}
        for k in keys:
            higher = METRICS[k][1]
            vals = np.array([stats[m][k][0] for m in self.methods])
            ranks_k = _rank(-vals if higher else vals)
            for m, r in zip(self.methods, ranks_k):
                ranks[m].append(r)
        mean_rank = {m: float(np.mean(r)) if r else 0.0 for m, r in ranks.items()}
        return sorted(mean_rank.items(), key=lambda kv: (kv[1], self.methods.index(kv[0])))

    def rows(self) -> list[dict]:
        return [{"image": r.image, "method": r.method, "target": r.target, "label": r.label,
                 "deletion_auc": round(r.deletion, 6), "insertion_auc": round(r.insertion, 6),
                 "pointing_hit": "" if r.hit is None else int(r.hit),
                 "energy_pg": "" if r.energy is None else round(r.energy, 6),
                 "seconds": round(r.seconds, 4)} for r in self.results]

    def summary(self) -> dict:
        methods = {}
        for m, mean_rank in self.ranked():
            st = self.stats(m)
            rs = self.of(m)
            methods[m] = {"mean_rank": round(mean_rank, 3), "images": len(rs),
                          **{k: {"mean": round(v[0], 4), "std": round(v[1], 4)} for k, v in st.items()},
                          "curves": {"x": rs[0].curves.x.round(6).tolist(),
                                     "deletion": np.mean([r.curves.deletion for r in rs], axis=0).round(5).tolist(),
                                     "insertion": np.mean([r.curves.insertion for r in rs], axis=0).round(5).tolist()}}
        return {"model": self.model, "images": self.images, "settings": self.settings, "methods": methods}


def _rank(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    from .similarity import rankdata

    return rankdata(values)


def _checked_masks(masks: Sequence, names: Sequence[str], prepared: Sequence[Prepared], size: tuple) -> list:
    """Each mask (an array, or a file's path read by ``load_mask``) a 2-D array of the size its
    image's maps come at (the image's own, or the model's input for a tensor), with an object in it."""
    out = []
    for mask, name, p in zip(masks, names, prepared):
        if isinstance(mask, (str, os.PathLike)):
            mask = load_mask(mask)
        out.append(mask)
        if mask is None:
            continue
        a = np.asarray(mask) if isinstance(mask, (np.ndarray, list, tuple)) or hasattr(mask, "__array__") else None
        if a is None or a.ndim != 2 or a.dtype.kind not in "biuf":
            what = type(mask).__name__ if a is None else f"an array of shape {a.shape} and dtype {a.dtype}"
            raise ImageError(f"the mask of {name} must be a 2-D array of the image's size, not {what}")
        h, w = p.display.shape[:2] if p.display is not None else size
        if a.shape != (h, w):
            raise ImageError(f"the mask of {name} is {a.shape[1]}x{a.shape[0]} pixels but the image is {w}x{h}: "
                             "masks must have the image's size")
        if not a.any():
            raise ImageError(f"the mask of {name} is empty: the pointing game needs an object in it")
    return out


def evaluate(ex: Explainer, images: Sequence[Union[Prepared, str, os.PathLike, np.ndarray]], methods: Sequence[str], *,
             masks: Optional[Sequence[Optional[np.ndarray]]] = None, step: Optional[int] = None,
             deletion: str = "black", insertion: str = "blur", blur_sigma: Optional[float] = None,
             tolerance: float = TOLERANCE, target=None, layer: Optional[str] = None, score: str = "logit",
             region: str = "won", options: Optional[dict[str, dict]] = None,
             progress: Optional[Report] = None) -> EvaluationReport:
    """Deletion/insertion AUC for every method on every image, and the pointing games where a mask is given.

    The target of an image is fixed by the first method (the model's top class unless
    `target` is given) and shared by all methods, so they explain the same decision. `region`: a
    per-pixel model's class pixels, as ``Explainer.explain`` takes it; the curves read the class over
    the same pixels.
    """
    ex, progress = explainer(ex), progress_report(progress)
    methods = method_names(methods)
    images = image_list(images)
    options = method_options(options, methods)
    if masks is not None and not isinstance(masks, (list, tuple)):
        raise ImageError(f"masks are a list with one mask (or None) per image, not {type(masks).__name__}")
    if masks is not None and len(masks) != len(images):
        raise ImageError(f"{len(masks)} masks for {len(images)} images; give one per image (None where an image "
                         "has none)")
    for kind in (deletion, insertion):
        if not isinstance(kind, str) or kind not in SUBSTRATES:
            raise MethodError(f"substrate must be one of {', '.join(SUBSTRATES)}, not {kind!r}")
    if step is not None and number_option("step", step, int, False) < 1:
        raise MethodError(f"step must be at least 1 pixel, not {step}")
    if blur_sigma is not None and number_option("blur_sigma", blur_sigma, float, False) <= 0:
        raise MethodError(f"blur_sigma must be above 0 (None: the input size / 16), not {blur_sigma}")
    if number_option("tolerance", tolerance, float, False) < 0:
        raise MethodError(f"tolerance is a distance in pixels, 0 or more, not {tolerance}")
    check_region(ex.model, region)
    size = ex.model.input.size
    step = int(step) if step else default_step(size)
    report = EvaluationReport(ex.model.path, methods, [], {
        "step": step, "steps": len(fractions(size[0] * size[1], step)) - 1, "input_size": list(size),
        "deletion_substrate": deletion, "insertion_start": insertion,
        "blur_sigma": float(blur_sigma) if blur_sigma else min(size) * BLUR_FRACTION,
        "tolerance": tolerance, "score": _score_read(ex, region)} | ({"region": region} if ex.model.dense else {}))
    names = run_names(images)
    prepared = [item if isinstance(item, Prepared) else ex.prepare(item) for item in images]
    if masks is not None:              # before any work: the pointing game would fail after the curves
        masks = _checked_masks(masks, names, prepared, size)
    total = len(images) * len(methods)
    done = 0
    for i, (p, name) in enumerate(zip(prepared, names)):
        report.images.append(name)
        mask = masks[i] if masks is not None else None
        t = target
        for m in methods:
            if progress:
                progress(done, total, f"{name}: {m}")
            start = time.perf_counter()
            res = ex.explain(p, m, t, layer=layer, score=score, region=region, **options.get(m, {}))
            seconds = time.perf_counter() - start
            t = res.targets[0].index
            at_input = resize(res.raw[:1], size)[0]
            curves = deletion_insertion(ex, p.tensor, at_input, t, step=step, deletion=deletion,
                                        insertion=insertion, blur_sigma=blur_sigma, region=region)
            hit = energy = None
            if mask is not None:
                full = resize(at_input[None], res.maps.shape[-2:])[0]
                hit = pointing_hit(full, mask, tolerance)
                energy = energy_inside(full, mask)
            report.results.append(Scored(name, m, t, res.targets[0].label, curves.deletion_auc, curves.insertion_auc,
                                         hit, energy, seconds, curves))
            done += 1
            if progress:
                progress(done, total, f"{name}: {m}")
    return report


def _score_read(ex: Explainer, region: str) -> str:
    """What the curves read, for the report."""
    if ex.model.dense is not None and region == "peak":
        return "the target class's map at its peak, as the model outputs it"
    if ex.model.score_as_is:
        return "the target's score as the model gives it"
    return "probability of the target class"
