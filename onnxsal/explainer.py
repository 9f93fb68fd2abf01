"""The Python API: ``Explainer(model).explain(image, method=...) -> Explanation``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import onnx
from PIL import Image

from .methods import check_options, get as get_method, methods as method_names, number_option
from .context import Context, JointGradients, TooManyRows
from .engine import Engine, Target, check_region, make_targets
from .errors import ImageError, LayerError, MethodError, ModelError, OutputError, TargetError
from .detection import Detection, QueryOutput, ranked
from .labelled import ClassBest
from .model import DenseOutput, Layer, Model, load
from .postprocess import finish, resize
from .preprocess import Prepared, Preprocess, make_spec, prepare
from .runtime import Progress, Runtime

ImageLike = Union[str, os.PathLike, bytes, "BinaryIO", np.ndarray, "Image.Image"]  # noqa: F821

# CAMs that read one layer only: every other CAM averages several, as pytorch-grad-cam's BaseCAM
# subclasses do; Guided Grad-CAM multiplies one CAM by Guided Backprop, Captum's Layer IG takes one layer
ONE_LAYER = frozenset({"guidedgradcam", "layerig"})

EPS_SCALE = 1e-7            # pytorch-grad-cam's guard in scale_cam_image


def combine_layers(maps: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """One map from each layer's (T, h, w) maps, as pytorch-grad-cam combines its target layers: each
    map's positive part min-maxed (with its 1e-7 guard) at its own resolution and resized to the
    input, the mean over the layers, min-maxed again. A layer at a finer resolution thus sharpens
    the map without outweighing the coarse one: every layer counts alike."""
    def scaled(m: np.ndarray) -> np.ndarray:
        flat = m.reshape(len(m), -1)
        flat = flat - flat.min(axis=1, keepdims=True)
        return (flat / (EPS_SCALE + flat.max(axis=1, keepdims=True))).reshape(m.shape)

    per = [resize(scaled(np.maximum(m.astype(np.float64), 0)), size) for m in maps]
    return scaled(np.maximum(np.mean(per, axis=0), 0)).astype(np.float32)


@dataclass
class Explanation:
    """Maps for one input, one method, one or more targets."""

    maps: np.ndarray            # (T, H, W) float32 in [0, 1] at the original image size
    raw: np.ndarray             # (T, h, w) float32, the method's own output before post-processing
    targets: list[Target]
    method: str
    options: dict
    layer: Union[str, list, None]   # the layer's tensor; a list of them for a CAM over several layers
    scores: np.ndarray          # (C,) the model's output row on the input (probabilities when it has a softmax)
    logits: np.ndarray          # (C,) the scored logits
    seconds: float
    name: str = "image"
    image: Optional[np.ndarray] = field(default=None, repr=False)   # uint8 RGB for overlays
    notes: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    model_path: str = ""
    input_size: tuple = ()
    labels: Optional[list] = field(default=None, repr=False)
    dense: Optional[DenseOutput] = field(default=None, repr=False)   # per-pixel models
    detection: Optional[Detection] = field(default=None, repr=False)   # detectors
    probability: bool = False    # a single unit through a sigmoid: class 0 scores 1 - p, not -p
    region: str = "won"          # a per-pixel model's class pixels (engine.REGIONS)

    @property
    def map(self) -> np.ndarray:
        return self.maps[0]

    @property
    def target(self) -> Target:
        return self.targets[0]

    def top(self, k: int = 5) -> list[dict]:
        """The k highest-scoring classes; for a per-pixel model, those covering most pixels, the
        score being their share of the pixels; for a detector, each class's best box's confidence."""
        k = number_option("k", k, int, False, error=TargetError)
        if k < 1:
            raise TargetError(f"top takes k from 1, not {k}")
        if self.dense is not None and self.region == "peak":     # heatmaps: by their peaks
            values, order = class_peaks(self.dense, self.scores)
        elif self.dense is not None:
            values, order = class_shares(self.dense, self.scores)
        elif self.detection is not None:        # the classes it found, by their best box
            values, order = ranked(self.detection, self.scores)
        elif self.scores.size == 1:             # a single unit: class 1 is its value, class 0 the other side
            v = float(self.scores.reshape(-1)[0])
            values = np.array([1.0 - v if self.probability else -v, v])
            order = np.argsort(-values, kind="stable")
        else:
            values, order = self.scores, np.argsort(-self.scores, kind="stable")
        order = order[:k]
        return [{"index": int(i), "label": (self.labels[i] if self.labels and i < len(self.labels) else str(i)),
                 "score": float(values[i])} for i in order]

    def summary(self) -> dict:
        return {
            "model": self.model_path,
            "input_size": list(self.input_size),
            "top": self.top(5),
            "targets": [{"index": t.index, "label": t.label} for t in self.targets],
            "method": self.method,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "layer": self.layer,
            "seconds": round(self.seconds, 4),
            "notes": self.notes,
            **({"info": {k: _jsonable(v) for k, v in self.info.items()}} if self.info else {}),
        }

    def _score_of(self, t: Target) -> float:
        if t.index < 0 or self.dense is not None or self.detection is not None:     # the score as explained
            row = self.logits if self.options.get("score", "logit") == "logit" else self.scores
            value = float(np.dot(t.seed, row.reshape(-1)) + t.offset)
            if t.index >= 0 and self.dense is not None:   # a class map: its mean over the class's pixels
                value /= max(float(t.seed.sum()), 1.0)
            return value
        row = self.scores.reshape(-1)
        if len(row) == 1:  # binary single unit
            return float(row[0] if t.index == 1 else (1 - row[0] if self.probability else -row[0]))
        return float(row[t.index])

    def method_summary(self) -> dict:
        s = self.summary()
        return {k: s[k] for k in ("targets", "layer", "options", "seconds") if k in s} | (
            {"info": s["info"]} if "info" in s else {})

    def save(self, out_dir: Union[str, os.PathLike], cmap: str = "jet", alpha: float = 0.5) -> list[str]:
        """Write <name>.<method>.png (overlay with colorbar) and .npy (the maps), and add this
        method's entry to <name>.json (model, input size, top-5, and one entry per method)."""
        from .render import check_style

        check_style(cmap, alpha)
        if not isinstance(out_dir, (str, os.PathLike)):
            raise OutputError(f"save takes a folder's path, not {type(out_dir).__name__}")
        try:
            return self._write(os.fspath(out_dir), cmap, alpha)
        except OSError as exc:
            raise OutputError(f"cannot write the results to {os.fspath(out_dir)!r}: {exc.strerror or exc}") from exc

    def _write(self, out_dir: str, cmap: str, alpha: float) -> list[str]:
        from .render import save_overlay

        os.makedirs(out_dir, exist_ok=True)
        base = os.path.join(out_dir, self.name)
        stem = f"{base}.{self.method}"
        titles = [f"{self.method}: {t.label} ({self._score_of(t):.3g})" for t in self.targets]
        save_overlay(stem + ".png", self.image, self.maps, titles, cmap=cmap, alpha=alpha)
        np.save(stem + ".npy", self.maps[0] if len(self.maps) == 1 else self.maps)
        summary = {k: v for k, v in self.summary().items() if k in ("model", "input_size", "top", "notes")}
        summary["methods"] = {}
        if os.path.exists(base + ".json"):
            try:
                with open(base + ".json") as f:
                    old = json.load(f)
                if old.get("model") == self.model_path and _classes(old.get("top")) == _classes(summary["top"]):
                    summary["methods"] = old.get("methods", {})    # an earlier run on the same scores
            except (OSError, ValueError):
                pass
        summary["methods"][self.method] = self.method_summary()
        with open(base + ".json", "w") as f:
            json.dump(summary, f, indent=2)
        return [stem + ".png", stem + ".npy", base + ".json"]


def _classes(top: object) -> list:
    """The (index, label) pairs of a summary's top classes: a run scoring something else (a --like
    reference) lists other ones, and its methods must not join this summary."""
    return [(t.get("index"), t.get("label")) for t in top if isinstance(t, dict)] if isinstance(top, list) else []


def class_shares(dense: DenseOutput, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C,) the share of pixels each class wins (``DenseOutput.won``), and the classes in order of
    that share, ties (classes that win no pixel) by their mean score."""
    maps = dense.maps(row)
    shares = dense.won(maps).mean(axis=1)
    return shares, np.lexsort((-maps.mean(axis=1), -shares))


def class_peaks(dense: DenseOutput, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C,) each class map's highest value (a keypoint heatmap's peak), and the classes in that order."""
    peaks = dense.maps(row).max(axis=1)
    return peaks, np.argsort(-peaks, kind="stable")


def box_notes(m: Model, targets: Sequence[Target], row: np.ndarray, boxes: Optional[np.ndarray] = None) -> list[str]:
    """Which box each class target scored: without it a detector's map has no object to point at."""
    d = m.detection
    notes = []
    for t in targets:
        if t.index < 0:
            continue
        notes.append(f"class {t.label}: its most confident box, {d.box_note(row, t.index, d.where(t.seed), boxes)}")
    return notes


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist() if v.size <= 16 else f"array{list(v.shape)}"
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _flat_map_notes(targets: Sequence[Target], raw: np.ndarray, cam: bool) -> list[str]:
    """A map with one value everywhere normalises to a blank image that looks like a result: say so."""
    notes = []
    rows = raw.reshape(len(raw), -1) if raw.size and raw.ndim >= 2 and len(raw) == len(targets) else []
    for t, r in zip(targets, rows):
        if np.ptp(r) != 0:
            continue
        if r[0] == 0:
            notes.append(f"the map for {t.label!r} is 0 everywhere: a blank map, not a faint one"
                         + (" (the layer holds no positive evidence for it)" if cam else ""))
        else:
            notes.append(f"the map for {t.label!r} holds one value everywhere ({float(r[0]):.3g}): every pixel counts "
                         "alike, and the normalised map shows 0")
    return notes


def _check_scores(logits: np.ndarray, out: np.ndarray) -> None:
    """A NaN in the model's output leaves no score to explain, and would sort first among classes."""
    for row in (logits, out):
        bad = int(np.isnan(row).sum())
        if bad:
            raise ModelError(f"the model's output for this input holds NaN ({bad} of {row.size} values): there is "
                             "no score to explain")


def input_rows(images: Any) -> list:
    """Single inputs of a batch: an (N, ...) array's rows, or a list's items. One path, PIL image
    or Prepared stands for itself: a string read as a sequence would be one letter per image."""
    if isinstance(images, (str, os.PathLike, Image.Image, Prepared)):
        return [images]
    if isinstance(images, np.ndarray):
        if images.ndim < 2:
            raise ImageError(f"a batch array needs a leading batch axis; it has shape {images.shape}")
        return [images[i:i + 1] for i in range(len(images))]
    if not isinstance(images, (Sequence, Iterable)):
        raise ImageError(f"images are a list of inputs or an (N, ...) array, not {type(images).__name__}")
    return list(images)


class Explainer:
    """Loads a model once; explains any number of inputs with any method.

    `preprocess` is a preset name, a Preprocess, or None to use the model's metadata;
    `mean`/`std`/`scale`/`bgr` override single fields of it. `fixed_inputs` gives values to a
    model's inputs besides the image, held constant (Captum's ``additional_forward_args``); `head`
    names the output to score in a model with several.
    """

    def __init__(self, model: Union[str, os.PathLike, onnx.ModelProto, Model], device: str = "auto", *,
                 preprocess: Union[str, Preprocess, None] = None, size: Optional[Sequence[int]] = None,
                 labels: Optional[Sequence[str]] = None, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, scale: Optional[float] = None, bgr: Optional[bool] = None,
                 batch_size: Optional[int] = None, memory_mb: int = 2048, threads: Optional[int] = None,
                 fixed_inputs: Optional[Mapping[str, Any]] = None, head: Optional[str] = None) -> None:
        for name, value in (("batch_size", batch_size), ("threads", threads), ("memory_mb", memory_mb)):
            if value is not None and number_option(name, value, int, False) < 1:
                raise MethodError(f"{name} must be at least 1, not {value}")
        if preprocess is not None and not isinstance(preprocess, (str, Preprocess)):
            raise ImageError(f"preprocess is a preset name or a Preprocess, not {type(preprocess).__name__}")
        self.runtime = Runtime(device, threads=threads, memory_mb=memory_mb)
        self.model = load(model, size=size, labels=labels, fixed_inputs=fixed_inputs, head=head)
        base = preprocess if isinstance(preprocess, Preprocess) else self.model.preprocess
        spec = make_spec(preprocess if isinstance(preprocess, str) else None, mean, std, scale, bgr, base=base)
        if spec is not None:
            spec = spec.fitted(self.model.input.layout, self.model.input.size, self.model.input.channels)
        self.model.preprocess = spec
        self.engine = Engine(self.model, self.runtime, batch_size)
        self.engine.pin_mixed_rows()

    @property
    def device(self) -> str:
        """The device that really runs the sessions (after any CUDA fallback)."""
        return self.runtime.device

    def prepare(self, image: ImageLike) -> Prepared:
        inp = self.model.input
        return prepare(image, self.model.preprocess, layout=inp.layout, channels=inp.channels, size=inp.size)

    def predict(self, image: Union[ImageLike, Prepared]) -> np.ndarray:
        """The model's output row (probabilities when it ends in a softmax)."""
        p = image if isinstance(image, Prepared) else self.prepare(image)
        (out,) = self.engine.outputs(p.tensor, [self.model.output])
        return out.reshape(-1)

    def like(self, reference: Union[ImageLike, Prepared, np.ndarray]) -> "Explainer":
        """An explainer of how alike an input is to ``reference``: its score is the cosine
        similarity of the two images' outputs (an embedding model's vectors), target "similarity"
        (1) or "dissimilarity" (0, its negative), by default the one its sign says. ``reference``
        is an image (file, array, PIL image) or a vector of the output's width, (D,) or (1, D) (an
        embedding kept from before). pytorch-grad-cam's ``SimilarityToConceptTarget``."""
        from .similarity import reference_vector, with_similarity

        m = self.model
        if isinstance(reference, np.ndarray) and (reference.ndim == 1 or reference.ndim == 2 and len(reference) == 1):
            vector, what = reference_vector(reference, m.num_classes, "the reference vector"), "the reference vector"
        else:
            row = self.predict(reference)
            name = os.path.basename(os.fspath(reference)) if isinstance(reference, (str, os.PathLike)) else \
                "the reference image"
            vector, what = reference_vector(row, row.size, name), f"{name}'s"
        proto, head = with_similarity(m.proto, m.output, vector)
        other = Explainer(proto, self.runtime.requested, preprocess=m.preprocess, size=m.input.size,
                          labels=["dissimilarity", "similarity"], batch_size=self.engine.batch_size, head=head,
                          memory_mb=self.runtime.memory_mb, threads=self.runtime.threads)
        other.model.output_note = (f"scored the cosine similarity of output {m.output!r} to {what}"
                                   + (" output" if what.endswith("'s") else ""))
        other.model.score_as_is = True
        other.model.path = m.path             # the summary names the file, not the derived graph
        return other

    def targets(self, scores: np.ndarray, target: Union[int, str, Sequence[Union[int, str]], np.ndarray, None],
                top_k: int, score: str, region: str = "won") -> list[Target]:
        m = self.model
        check_region(m, region)
        if isinstance(target, np.ndarray) and target.dtype.kind == "f":
            return [self._weights_target(target, score)]
        if target is None:
            if m.binary:
                prob = float(scores.reshape(-1)[0])
                first = 1 if (prob > (0.5 if m.activation == "sigmoid" else 0.0)) else 0
                order = [first, 1 - first]
            elif m.dense is not None and region == "peak":     # the highest peaks first
                order = list(class_peaks(m.dense, scores)[1])
            elif m.dense is not None:      # the classes covering most pixels first
                order = list(class_shares(m.dense, scores)[1])
            elif m.detection is not None:  # the classes whose best box is most confident first
                order = ranked(m.detection, scores)[1]
                if not order:
                    raise TargetError("the detector kept no detection in this image, so there is no class to "
                                      "explain; give --target-weights to score any value of its output")
            else:
                order = list(np.argsort(-scores.reshape(-1), kind="stable"))
            indices = order[:top_k]          # top_k checked by explain, before any work
        else:
            items = list(target) if isinstance(target, (list, tuple)) else (
                list(target.reshape(-1)) if isinstance(target, np.ndarray) else [target])
            if not items:
                raise TargetError("give at least one target (a class index or label), or none for the top classes")
            indices = [self._resolve(t) for t in items]
        return make_targets(m, indices, score, row=scores, region=region)

    def _weights_target(self, w: np.ndarray, score: str) -> Target:
        """Score = sum(w * output row): pytorch-grad-cam's SemanticSegmentationTarget is a class
        channel's mask, Captum's tuple targets are one-hot arrays."""
        n = self.model.num_classes
        if w.size != n:
            raise TargetError(f"target weights hold {w.size} values (shape {list(w.shape)}); the model's "
                              f"{'probabilities' if score == 'probability' else 'logits'} per image hold {n}")
        if not np.isfinite(w).all():
            raise TargetError("target weights must be finite")
        if not w.any():        # a score of 0 for every input: every gradient map would be blank
            raise TargetError("target weights are all zero; the score would be 0 for every input")
        return Target(-1, "weights", w.astype(np.float32).reshape(-1))

    def _resolve(self, t: Union[int, str, np.integer]) -> int:
        m = self.model
        n = m.n_targets
        if isinstance(t, str) and not t.lstrip("-").isdigit():
            if m.labels and t in m.labels:
                return m.labels.index(t)
            known = f"; labels: {', '.join(m.labels[:20])}" if m.labels else " (the model has no labels; use an index)"
            raise TargetError(f"unknown target label {t!r}{known}")
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (str, int, float, np.integer, np.floating)) or (
                isinstance(t, (float, np.floating)) and not float(t).is_integer()):
            raise TargetError(f"target {t!r} is not a class index or label")
        i = int(t)
        if not 0 <= i < n:
            raise TargetError(f"target {i} is out of range: the model has {n} classes (0..{n - 1})")
        return i

    @cached_property
    def _token_layers(self) -> list[Layer]:
        """The model's transformer token layers that come after every conv candidate."""
        order = {o: k for k, n in enumerate(self.model.light.graph.node) for o in n.output}
        last_conv = max((order[c.tensor] for c in self.model.layers), default=-1)
        return [t for t in self.model.token_layers() if order[t.tensor] > last_conv]

    def explain_batch(self, images: Union[np.ndarray, Sequence[Union[ImageLike, Prepared]]], method: str = "gradcam",
                      targets: Union[None, int, str, Sequence[Union[int, str, None]]] = None,
                      **kwargs) -> list[Explanation]:
        """Explain each image of a batch, as pytorch-grad-cam's ``cam(input_tensor, targets)`` and
        Captum's ``attribute(inputs, target=...)`` take one: an (N, ...) array of preprocessed
        inputs, or a list of files, arrays or PIL images. ``targets``: None (each image's top
        class), one class for all, or one per image. Other arguments as for `explain`. Each image
        is explained on its own, so its maps equal those of `explain`; stack them with
        ``np.stack([e.map for e in results])``. ``target=``, Captum's spelling, is taken too."""
        if "target" in kwargs:
            if targets is not None:
                raise TargetError("give targets= or target=, not both")
            targets = kwargs.pop("target")
        rows = input_rows(images)
        per = list(targets) if isinstance(targets, (list, tuple)) else [targets] * len(rows)
        if len(per) != len(rows):
            raise TargetError(f"{len(per)} targets for {len(rows)} images; give one per image, or one for all")
        return [self.explain(row, method, t, **kwargs) for row, t in zip(rows, per)]

    def _layers(self, spec, layer) -> list[Layer]:
        """The layers a method reads: none for one that explains the input itself, one by default, and
        for a CAM any number, as pytorch-grad-cam's ``target_layers`` (see ``combine_layers``)."""
        if not (spec.needs_layer or layer is not None and spec.family == "cam"):
            return []
        if not isinstance(layer, (list, tuple)):
            return [self.model.find_layer(layer)]
        if not layer:
            raise LayerError("give at least one layer (or none, for the default)")
        found = list({la.tensor: la for la in map(self.model.find_layer, layer)}.values())
        if len(found) > 1 and spec.name in ONE_LAYER:
            several = [n for n in method_names() if get_method(n).family == "cam" and n not in ONE_LAYER]
            raise LayerError(f"{spec.name} reads one layer; several layers are averaged for {', '.join(several)}")
        return found

    def explain(self, image: Union[ImageLike, Prepared], method: str = "gradcam", target=None, *, top_k: int = 1,
                layer: Union[str, Layer, Sequence[str], None] = None, score: str = "logit", smooth: Optional[float] = None,
                region: str = "won", progress: Optional[Progress] = None, **options) -> Explanation:
        """Explain one input. `target`: class index, label or a list of them; default the top `top_k` classes.
        A float array shaped like one output row is a weighting instead: score = sum(target * output).
        `region`: which pixels of a per-pixel model's class map a class scores: "won" (those it wins in
        the image's output), "peak" (its highest: a keypoint heatmap's) or "all". `layer`: a CAM's layer, or
        a list of them, combined as pytorch-grad-cam's ``target_layers`` (``combine_layers``)."""
        spec = get_method(method)
        opts = check_options(spec, options)
        top_k = number_option("top_k", top_k, int, False, error=TargetError)
        if top_k < 1:
            raise TargetError(f"top_k must be at least 1, not {top_k}")
        if top_k > 1 and target is not None:       # one of them would be ignored
            raise TargetError(f"give a target or top_k={top_k}, not both: top_k picks the classes itself")
        if smooth is not None:
            smooth = number_option("smooth", smooth, float, False)
            if smooth < 0:
                raise MethodError(f"smooth is a Gaussian sigma in pixels, >= 0, not {smooth}")
        if not isinstance(score, str) or score not in ("logit", "probability"):
            raise TargetError(f"score must be 'logit' or 'probability', not {score!r}")
        if progress is not None and not callable(progress):
            raise MethodError(f"progress is a function called with (done, total), not {type(progress).__name__}")
        prepared = image if isinstance(image, Prepared) else self.prepare(image)
        m = self.model
        layers = self._layers(spec, layer)
        the_layer: Optional[Layer] = layers[0] if layers else None
        start = time.perf_counter()
        # With the targets given, a gradient method's own pass usually has the scores of x (Context.clean),
        # so the forward pass that would pick the targets is skipped (ResNet-50 saliency: 0.26 -> 0.12 s).
        lazy = spec.family == "gradient" and target is not None and the_layer is None and (
            m.dense is None and m.detection is None or isinstance(target, np.ndarray))  # a class's pixels or box need the output
        logits = out = None
        acts: list = []
        boxes = None
        if not lazy:
            extra = [m.detection.boxes] if isinstance(m.detection, (QueryOutput, ClassBest)) and m.detection.boxes \
                else []  # box notes
            wanted = [m.logits, m.output] + extra + [la.tensor for la in layers]
            logits, out, *acts = self.engine.outputs(prepared.tensor, wanted)   # one forward pass for all of them
            logits, out = logits.reshape(-1), out.reshape(-1)
            _check_scores(logits, out)
            if extra:
                boxes = acts.pop(0)
        targets = self.targets(None if lazy else logits if m.activation is None else out, target, top_k, score, region)
        per_layer, infos = [], []
        together = JointGradients(self.engine, prepared.tensor, {la.tensor: a for la, a in zip(layers, acts)},
                                  np.stack([t.seed for t in targets]).astype(np.float32), score, progress) \
            if len(layers) > 1 else None
        for i, the_one in enumerate(layers or [None]):
            ctx = Context(self.engine, prepared.tensor, targets, the_one, score, progress,
                          acts=acts[i] if i < len(acts) else None, clean=None if lazy else (logits, out),
                          together=together)
            try:
                per_layer.append(np.asarray(spec.fn(ctx, **opts), np.float32))
            except MemoryError as exc:   # NumPy's own message names an array shape, not the setting behind it
                given = ", ".join(f"{k}={v}" for k, v in options.items()) or "its defaults"
                why = f"would run out of memory with {given}: {exc}" if isinstance(exc, TooManyRows) else \
                    f"ran out of memory with {given}: it holds all its noisy copies, path points or masks of the image at once"
                raise MethodError(f"{spec.name} {why}; ask for fewer") from exc
            infos.append(ctx.info)
        raw = per_layer[0] if len(per_layer) == 1 else combine_layers(per_layer, m.input.size)
        info = infos[0] if len(infos) == 1 else {k: [i.get(k) for i in infos] for k in dict.fromkeys(
            k for i in infos for k in i)}     # several layers: each reported number per layer, in order
        if lazy:
            ctx.logits()                  # the method's own pass had them, or a forward pass fills them now
            logits, out = ctx.clean
            _check_scores(logits, out)
        maps = finish(raw, m.input.size, smooth)
        if prepared.display is not None and prepared.display.shape[:2] != tuple(m.input.size):
            maps = np.clip(resize(maps, prepared.display.shape[:2]), 0, 1)
        seconds = time.perf_counter() - start
        notes = list(prepared.notes)
        if m.activation is not None and score == "logit":
            notes.append(f"scored the logits before the final {m.activation} ({m.logits!r})")
        elif m.activation is None and score == "probability" and not m.score_as_is:
            notes.append("the model's output ends in no softmax or sigmoid, so the probability scored is the "
                         "output as it is")
        if m.detection is not None:
            notes.extend(box_notes(m, targets, logits if score == "logit" else out, boxes))
        if m.lifted_from:
            notes.append(f"the model's {' and '.join(m.lifted_from)} tensors run in float32 here")
        if m.read_as:
            notes.append(m.read_as)
        if m.output_note:
            notes.append(m.output_note)
        if m.training:
            notes.append(f"the model was exported in training mode ({len(m.training)} BatchNormalization/Dropout "
                         "nodes): each image is scored as on its own, at batch 1; export after model.eval() to use "
                         "the running statistics")
        if m.one_image:
            why = "it was exported for one image at a time" if m.fixed_batch else "each image is scored as on its own"
            notes.append(f"the model's graph reads across its batch ({m.one_image[0]}): {why}, so every run took "
                         "one row")
        elif self.runtime.padded:
            notes.append(f"the model's graph only runs at the batch of {m.fixed_batch} its file fixes (onnxsal "
                         f"cannot free it), so every run was filled to {m.fixed_batch} rows")
        elif self.runtime.one_row:
            notes.append("the model's graph only runs one image at a time (its export fixed a batch of 1 "
                         "where onnxsal cannot free it), so batched runs went one row at a time")
        tokens = self._token_layers if layer is None and the_layer is not None and spec.family == "cam" else []
        if tokens:
            # a ViT's norms run norm1, norm2 per block, then a final norm: the last block's norm1 is the
            # last one whose patch tokens still reach the class token (through the last attention)
            hint = tokens[-3] if len(tokens) >= 3 else tokens[0]
            notes.append(f"the default layer {the_layer.tensor!r} comes before this transformer's blocks; "
                         f"give a token layer with --layer, e.g. {hint.tensor!r}")
        if not np.isfinite(raw).all():
            raise ImageError(f"{spec.name} produced non-finite values on this input")
        notes.extend(_flat_map_notes(targets, raw, spec.family == "cam"))
        if layer is not None and the_layer is None:     # said, not refused: one --layer serves several methods
            named = ", ".join(map(str, layer)) if isinstance(layer, (list, tuple)) else repr(layer)
            notes.append(f"{spec.name} explains the input itself; it does not use the layer {named}")
        settings = dict(opts)
        if smooth:
            settings["smooth"] = smooth
        settings["score"] = score
        if m.dense is not None:
            settings["region"] = region
        chosen = None if not layers else layers[0].tensor if len(layers) == 1 else [la.tensor for la in layers]
        return Explanation(maps, raw, targets, spec.name, settings, chosen,
                           out, logits, seconds, prepared.name, prepared.display, notes, info,
                           m.path, m.input.size, m.labels if not m.binary else (m.labels or ["0", "1"]), m.dense,
                           m.detection, m.binary and m.activation == "sigmoid", region)
