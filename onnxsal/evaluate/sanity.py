"""Sanity checks for saliency maps (Adebayo et al. 2018): does the map depend on the model?

A map that stays the same when the model's weights are replaced by random ones
cannot be explaining what the model learned. Three tests:

* cascading randomisation: re-initialise the layers from the logits downwards,
  cumulatively, and compare each map with the original one;
* independent randomisation: one layer (or block) at a time, the rest intact;
* data randomisation: the same architecture trained on permuted labels
  (given as a second model file), compared on the same target class.

Maps are compared at the model's input resolution with the paper's four
measures (see `similarity`).

The verdict asks how deep the randomisation must go before the map changes.
A method passes when its mean absolute-value Spearman rank correlation with
the original map falls below a threshold (default 0.5, printed beside each
verdict) at some step that randomises at most the top half of the weight
layers (rounded down). Why not simply the fully randomised model: the paper's
finding is that Guided Backprop ignores the *upper* layers, where the class is
decided, because it mostly reconstructs the input through the lowest ones.
Once the first convolution is random too, every method's map changes, so the
end of the cascade cannot tell a method that explains the model from one that
explains the image. On the demo model (five weight layers, twelve images,
seed 0) the mean Spearman(abs) after randomising the logits, then also conv4,
reads -0.32, 0.34 for Grad-CAM; 0.72, 0.28 for gradients; 0.83, 0.69 for
Guided Backprop, whose maps only change once conv1 is random (0.13).
Below 0.5, a rank correlation no longer means "mostly the same ordering".
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..engine import check_region
from ..errors import LayerError, MethodError, ModelError, OutputError
from ..explainer import Explainer
from ..methods import number_option
from ..postprocess import finish, resize
from ..preprocess import Prepared, run_names
from .arguments import explainer, image_list, method_names, method_options, names_of, progress_report
from .randomize import WeightLayer, block_label, blocks_of, cascade, randomize, weight_layers
from .similarity import MEASURES, compare

DEFAULT_THRESHOLD = 0.5
VERDICT_MEASURE = "spearman_abs"
MODES = ("cascading", "independent")
Report = Callable[[int, int, str], None]   # (done, total, what is running)


@dataclass(frozen=True)
class Step:
    """One randomised model: which test, its position, and what was randomised."""

    mode: str                    # "cascading", "independent" or "data"
    index: int                   # 1-based within the mode
    label: str                   # for tables and figure columns
    layers: tuple[str, ...]      # names of the randomised layers (empty for "data")


@dataclass
class Verdict:
    """A method's verdict on one test, with the number and the threshold that decided it."""

    method: str
    mode: str                    # "cascading" or "data"
    passed: bool
    value: float                 # mean Spearman(abs) over images at the deciding step
    threshold: float
    depth: int = 0               # cascading: layers random at the deciding step
    limit: int = 0               # cascading: at most this many (the top half)
    total: int = 0               # cascading: weight layers in the model

    @property
    def text(self) -> str:
        word = "PASS" if self.passed else "FAIL"
        if self.mode == "data":
            sign = "<" if self.passed else ">="
            return f"{word}: Spearman(abs) {self.value:.2f} {sign} {self.threshold:g} on the permuted-label model"
        if self.passed:
            return (f"{word}: Spearman(abs) {self.value:.2f} < {self.threshold:g} with the top {self.depth} "
                    f"of {self.total} layers random (needed within the top {self.limit})")
        return (f"{word}: Spearman(abs) >= {self.threshold:g} (lowest {self.value:.2f}) while up to the top "
                f"{self.limit} of {self.total} layers are random")


@dataclass
class SanityReport:
    """Every map and every similarity of one sanity run."""

    model: str
    methods: list[str]
    images: list[str]
    layers: list[WeightLayer]
    steps: list[Step]
    threshold: float
    targets: dict                                  # image -> target label
    original: dict = field(default_factory=dict)   # method -> (I, H, W) [0, 1] maps at the input size
    maps: dict = field(default_factory=dict)       # (method, step index in `steps`) -> (I, H, W)
    scores: dict = field(default_factory=dict)     # (method, step index) -> (I, 4) in MEASURES order
    displays: list = field(default_factory=list)   # uint8 RGB per image (None for arrays)
    region: str = ""                               # a per-pixel model's class pixels (engine.REGIONS)

    def steps_of(self, mode: str) -> list[int]:
        return [k for k, s in enumerate(self.steps) if s.mode == mode]

    def mean(self, method: str, k: int) -> dict[str, float]:
        return dict(zip(MEASURES, self.scores[(method, k)].mean(axis=0).tolist()))

    def std(self, method: str, k: int) -> dict[str, float]:
        return dict(zip(MEASURES, self.scores[(method, k)].std(axis=0).tolist()))

    def curve(self, method: str, mode: str = "cascading") -> list[float]:
        """Mean Spearman(abs) over images, step by step."""
        col = MEASURES.index(VERDICT_MEASURE)
        return [float(self.scores[(method, k)][:, col].mean()) for k in self.steps_of(mode)]

    def verdicts(self) -> list[Verdict]:
        """Per method: the cascading verdict, then the data randomisation one if that test ran.

        Cascading: the lowest mean Spearman(abs) over the steps that randomise at most the top
        half of the layers (rounded down, at least one step) must fall below the threshold,
        i.e. the map must change before randomisation reaches the lower half of the network.
        """
        out = []
        ks = self.steps_of("cascading")
        if ks:
            limit = verdict_step(len(ks))
            for m in self.methods:
                curve = self.curve(m)[:limit]
                best = int(np.argmin(curve))
                passed = curve[best] < self.threshold
                if passed:  # report the first step that changed the map
                    best = next(i for i, v in enumerate(curve) if v < self.threshold)
                out.append(Verdict(m, "cascading", passed, curve[best], self.threshold,
                                   len(self.steps[ks[best]].layers), len(self.steps[ks[limit - 1]].layers),
                                   len(self.layers)))
        if self.steps_of("data"):
            for m in self.methods:
                value = self.curve(m, "data")[0]
                out.append(Verdict(m, "data", value < self.threshold, value, self.threshold))
        return out

    def rows(self) -> list[dict]:
        """One row per method, step and image (the CSV)."""
        out = []
        for (m, k), values in sorted(self.scores.items(), key=lambda kv: (self.methods.index(kv[0][0]), kv[0][1])):
            s = self.steps[k]
            for img, row in zip(self.images, values):
                out.append({"method": m, "mode": s.mode, "step": s.index, "label": s.label,
                            "layers": " ".join(s.layers), "image": img,
                            **{name: round(float(v), 6) for name, v in zip(MEASURES, row)}})
        return out

    def summary(self) -> dict:
        """Means, spreads and verdicts (the JSON)."""
        methods = {}
        for m in self.methods:
            entry: dict = {}
            for mode in ("cascading", "independent", "data"):
                ks = self.steps_of(mode)
                if ks:
                    entry[mode] = [{"step": self.steps[k].index, "label": self.steps[k].label,
                                    "layers": list(self.steps[k].layers),
                                    "mean": _rounded(self.mean(m, k)), "std": _rounded(self.std(m, k))} for k in ks]
            entry["verdicts"] = {v.mode: {"passed": v.passed, "value": round(v.value, 4), "text": v.text}
                                 for v in self.verdicts() if v.method == m}
            methods[m] = entry
        return {"model": self.model, "images": self.images, "targets": self.targets,
                **({"region": self.region} if self.region else {}), "threshold": self.threshold,
                "verdict_measure": VERDICT_MEASURE, "measures": list(MEASURES),
                "layers": [{"name": layer.name, "op": layer.op_type, "nodes": list(layer.nodes),
                            "initializers": list(layer.initializers)} for layer in self.layers],
                "methods": methods}


def verdict_step(n_steps: int) -> int:
    """The last cascading step the verdict looks at (1-based): the top half of the steps, rounded down."""
    return max(1, n_steps // 2)


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def variant(ex: Explainer, proto, note: str) -> Explainer:
    """An Explainer on a modified copy of `ex`'s model, with the same input, layers and preprocessing."""
    model = dataclasses.replace(ex.model, light=proto, path=f"{ex.model.path} ({note})")
    return Explainer(model, ex.device, preprocess=ex.model.preprocess, batch_size=ex.engine.batch_size,
                     memory_mb=ex.runtime.memory_mb, threads=ex.runtime.threads)


def sanity_check(ex: Explainer, images: Sequence[Union[Prepared, str, os.PathLike, np.ndarray]],
                 methods: Sequence[str], *, modes: Sequence[str] = MODES, permuted: Optional[Explainer] = None,
                 seed: int = 0, max_steps: Optional[int] = 16, target=None, layer: Optional[str] = None,
                 score: str = "logit", region: str = "won", options: Optional[dict[str, dict]] = None,
                 threshold: float = DEFAULT_THRESHOLD, like=None, progress: Optional[Report] = None) -> SanityReport:
    """Run the randomisation tests for `methods` on `images` and compare every map with the original.

    `options` maps a method name to its options. The target of each image is fixed on the
    original model (its top class unless `target` is given) and kept for every randomised
    model, as in the paper. `permuted`: an Explainer on the same architecture trained on
    permuted labels, for the data randomisation test. `region`: a per-pixel model's class pixels,
    as ``Explainer.explain`` takes it. `like`: a reference (an image or an output vector) whose cosine
    similarity is scored, as ``Explainer.like``; each randomised model scores its own outputs of the
    image and of a reference image, so a reference image's embedding is randomised with the model
    while a reference vector stays fixed, like a fixed target class.
    """
    ex, progress = explainer(ex), progress_report(progress)
    if permuted is not None:
        explainer(permuted, "permuted")
    methods = method_names(methods)
    images = image_list(images)
    options = method_options(options, methods)
    modes = names_of(modes, "modes")
    if number_option("seed", seed, int, False) < 0:
        raise MethodError(f"seed must be 0 or more, not {seed}")
    if max_steps is not None and number_option("max_steps", max_steps, int, False) < 1:
        raise MethodError(f"max_steps must be at least 1 (None: one step per layer), not {max_steps}")
    if not -1 <= number_option("threshold", threshold, float, False) <= 1:
        raise MethodError(f"threshold is a Spearman rank correlation, between -1 and 1, not {threshold}")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise MethodError(f"unknown randomisation mode {bad[0]!r}; use cascading and/or independent")
    base, ex = ex, (ex if like is None else ex.like(like))
    check_region(ex.model, region)
    prepared = [p if isinstance(p, Prepared) else ex.prepare(p) for p in images]
    layers = weight_layers(base.model.light)
    if not layers and modes:
        raise ModelError("the model has no float weight initializers (Conv, Gemm, MatMul...) to randomise")
    top_down = list(reversed(layers))
    blocks = blocks_of(top_down, max_steps)
    steps: list[Step] = []
    models: list[Callable[[], Explainer]] = []
    if "cascading" in modes:
        for i, group in enumerate(cascade(layers, max_steps), 1):
            label = block_label(blocks[i - 1])
            steps.append(Step("cascading", i, label if i == 1 else "+" + label, tuple(x.name for x in group)))
            models.append(_maker(base, group, layers, seed, f"cascading randomisation step {i}", like))
    if "independent" in modes:
        for i, block in enumerate(blocks, 1):
            steps.append(Step("independent", i, block_label(block), tuple(x.name for x in block)))
            models.append(_maker(base, block, layers, seed, f"independent randomisation of {block_label(block)}", like))
    if permuted is not None:
        steps.append(Step("data", 1, "permuted labels", ()))
        models.append(lambda: permuted if like is None else permuted.like(like))

    names = run_names(list(images))
    total = (1 + len(steps)) * len(prepared) * len(methods)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)

    report = SanityReport(base.model.path, methods, names, layers, steps, threshold, {},
                          displays=[p.display for p in prepared], region=region if ex.model.dense else "")
    size = ex.model.input.size
    originals: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in methods}
    fixed: list[int] = []
    for p, name in zip(prepared, names):
        t = target
        for m in methods:
            res = ex.explain(p, m, t, layer=layer, score=score, region=region, **options.get(m, {}))
            t = res.targets[0].index           # the first method fixes the class for all the others
            originals[m].append(_pair(res.raw[:1], size))
            tick(f"{name}: {m} (original model)")
        fixed.append(int(t))
        report.targets[name] = ex.model.label(int(t))
    for m in methods:
        report.original[m] = np.stack([b for _, b in originals[m]])
    for k, (step, make) in enumerate(zip(steps, models)):
        vex = make()
        for m in methods:
            maps, values = [], []
            for i, p in enumerate(prepared):
                what = f"{names[i]}: {m} ({step.mode} {step.label})"
                res = vex.explain(p, m, fixed[i], layer=layer if step.mode != "data" else _layer_in(vex, layer),
                                  score=score, region=region, **options.get(m, {}))
                raw, norm = _pair(res.raw[:1], size)
                ref_raw, ref_norm = originals[m][i]
                measured = compare(ref_raw, raw, ref_norm, norm)
                values.append([measured[key] for key in MEASURES])
                maps.append(norm)
                tick(what)
            report.maps[(m, k)] = np.stack(maps)
            report.scores[(m, k)] = np.asarray(values, np.float64)
        del vex
    return report


def _maker(ex: Explainer, group: Sequence[WeightLayer], layers: Sequence[WeightLayer], seed: int,
           note: str, like=None) -> Callable[[], Explainer]:
    """Build the randomised model only when its step runs, so one copy of the weights is alive at a
    time; with ``like``, its similarity head goes on after the weights are drawn, so the head's
    reference is never one of them."""
    def make() -> Explainer:
        vex = variant(ex, randomize(ex.model.light, group, seed, all_layers=layers), note)
        return vex if like is None else vex.like(like)
    return make


def _layer_in(ex: Explainer, layer: Union[str, Sequence[str], None]) -> Union[str, Sequence[str], None]:
    """The CAM layer (or layers) chosen on the original model, if the permuted-label model has them all;
    else its default."""
    if layer is None:
        return None
    try:
        for name in layer if isinstance(layer, (list, tuple)) else [layer]:
            ex.model.find_layer(name)
        return layer
    except LayerError:
        return None


def _pair(raw: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The method's own map and its [0, 1] version, both at the model's input size."""
    return resize(raw, size)[0].astype(np.float64), finish(raw, size)[0]


# figure -------------------------------------------------------------------------------------

def figure(path: str, report: SanityReport, image: int = 0, cmap: str = "gray") -> None:
    """The paper's figure for one image: a row per method, the original map, then the map after
    each cascading step (and the permuted-label model's), with the input image on the left.
    The column that decides the verdict has its title in bold."""
    from matplotlib.figure import Figure

    cols = [k for k, s in enumerate(report.steps) if s.mode in ("cascading", "data")]
    casc = report.steps_of("cascading")
    decisive = casc[verdict_step(len(casc)) - 1] if casc else None
    titles = ["input", "original"] + [report.steps[k].label for k in cols]
    n_rows, n_cols = len(report.methods), len(titles)
    panel, head, side = 1.5, 0.75, 0.35
    width, height = panel * n_cols + side, panel * n_rows + head
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=side / width, right=0.995, top=1 - head / height, bottom=0.01, wspace=0.04, hspace=0.05)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    display = report.displays[image] if report.displays else None
    verdicts = {v.method: v for v in report.verdicts() if v.mode == "cascading"}
    for r, m in enumerate(report.methods):
        panels = [report.original[m][image]] + [report.maps[(m, k)][image] for k in cols]
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                if display is not None:
                    ax.imshow(display)
                label = m + (f"\n{'pass' if verdicts[m].passed else 'FAIL'}" if m in verdicts else "")
                ax.set_ylabel(label, fontsize=9)
            else:
                ax.imshow(panels[c - 1], cmap=cmap, vmin=0, vmax=1)
            if r == 0:
                bold = c >= 2 and cols[c - 2] == decisive
                ax.set_title(_wrap(titles[c]), fontsize=7, fontweight="bold" if bold else "normal")
    name = report.images[image]
    fig.suptitle(f"{name} ({report.targets[name]}): cascading randomisation from the logits", fontsize=9,
                 y=1 - 0.12 / height, va="top")
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:           # a folder that is not there, a full disk: named, as Explanation.save does
        raise OutputError(f"cannot write {path!r}: {exc.strerror or exc}") from exc


def _wrap(text: str, width: int = 18) -> str:
    if len(text) <= width:
        return text
    cut = text.rfind("/", 0, width)
    cut = cut + 1 if cut > 0 else width
    return text[:cut] + "\n" + _wrap(text[cut:], width)
