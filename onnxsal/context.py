"""What a method sees: one preprocessed input, its targets, the chosen layer, and the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

from .detection import DetectionList
from .engine import Engine, Target, score_rows
from .model import Layer, Model, physical_memory
from .runtime import Progress


class TooManyRows(MemoryError):
    """Refused before the allocation (``Context.hold``); the explainer names the setting behind it."""


@dataclass
class Context:
    engine: Engine
    x: np.ndarray                 # (1, C, H, W) or (1, H, W, C): the model's own layout
    targets: list[Target]
    layer: Optional[Layer]
    score: str = "logit"
    progress: Optional[Progress] = None
    info: dict = field(default_factory=dict)   # numbers a method reports back (e.g. IG's completeness gap)
    acts: Optional[np.ndarray] = None          # the layer's activations, when already computed
    clean: Optional[tuple] = None              # (logits, output) of x itself, when a gradient pass had them
    together: Optional["JointGradients"] = None  # a CAM over several layers: their gradients from one pass

    @property
    def model(self) -> Model:
        return self.engine.model

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input.size

    @property
    def nhwc(self) -> bool:
        return self.model.input.layout == "NHWC"

    @property
    def seeds(self) -> np.ndarray:
        return np.stack([t.seed for t in self.targets]).astype(np.float32)

    def hold(self, rows: int, what: str, copies: Optional[int] = None, row_size: Optional[int] = None) -> None:
        """Refuse, before drawing them, more rows than memory holds at once: `copies` float32 arrays
        of `rows` rows of `row_size` elements (the input's size; by default the rows and one gradient
        per target). Past half the machine's memory NumPy's allocation may still succeed, and
        the system then kills the process as the rows are written: no MemoryError names the setting."""
        memory = physical_memory()
        copies = 1 + len(self.targets) if copies is None else copies
        need = int(rows) * int(row_size or self.x.size) * 4 * copies
        if memory is not None and need > memory // 2:
            raise TooManyRows(f"{rows} {what} would take {need / 2 ** 30:.1f} GiB, more than half of this "
                              f"machine's {memory / 2 ** 30:.0f} GiB")

    def spatial(self, masks: np.ndarray) -> np.ndarray:
        """(K, H, W) spatial masks shaped to broadcast against a (K, ...) input batch."""
        return masks[:, :, :, None] if self.nhwc else masks[:, None, :, :]

    def channels_first(self, g: np.ndarray) -> np.ndarray:
        """An input-shaped array as (N, C, H, W), whatever the model's layout."""
        return g.transpose(0, 3, 1, 2) if self.nhwc else g

    def model_layout(self, a: np.ndarray) -> np.ndarray:
        """An (N, C, H, W) array in the model's own input layout: the inverse of channels_first."""
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)) if self.nhwc else a

    def blend(self, masks: np.ndarray, baseline: "float | np.ndarray" = 0.0) -> np.ndarray:
        """x where the mask is 1, baseline where it is 0: (K, ...) inputs for K masks."""
        m = self.spatial(masks.astype(np.float32))
        return (self.x * m + np.asarray(baseline, np.float32) * (1 - m)).astype(np.float32)

    def scores(self, xb: np.ndarray, clean_row: Optional[int] = None) -> np.ndarray:
        """(N, T) target scores for a batch of inputs; ``clean_row`` as in ``gradients``."""
        m = self.model
        logits, out = self.engine.outputs(xb, [m.logits, m.output], self.progress)
        if clean_row is not None:
            self.clean = (logits[clean_row].reshape(-1), out[clean_row].reshape(-1))
        return score_rows(out if m.score_tensor(self.score) == m.output else logits, self.targets, m.detection)

    def logits(self) -> np.ndarray:
        """(C,) logits of x: from the pass that picked the targets, else from a forward pass now."""
        if self.clean is None:
            logits, out = self.engine.outputs(self.x, [self.model.logits, self.model.output])
            self.clean = (logits.reshape(-1), out.reshape(-1))
        return self.clean[0]

    def activations(self) -> np.ndarray:
        """(1, K, h, w) activations of the chosen layer for the input (from the first forward pass)."""
        if self.acts is None:
            (self.acts,) = self.engine.outputs(self.x, [self.layer.tensor])
        return self.acts

    def gradients(self, xb: np.ndarray, seed_rows: np.ndarray, wrt: Sequence[str], extra: Sequence[str] = (),
                  rules: Optional[Mapping] = None, rules_name: str = "", clean_row: Optional[int] = None,
                  whole: bool = False, follow: bool = True) -> dict[str, np.ndarray]:
        """Forward + VJP (see Engine.gradients); the pass also returns the logits and the output.

        ``clean_row``: a row of ``xb`` that is ``x`` itself, whose logits and output the explainer
        then reports instead of running a forward pass of its own. ``follow``: a detector's final
        detections re-pick each class target's detection in each row (see ``DetectionList.follow``).
        """
        m = self.model
        y = m.score_tensor(self.score)
        if follow:
            seed_rows = self.followed(xb, seed_rows)
        outs = list(extra) + [t for t in dict.fromkeys((m.logits, m.output)) if t != y and t not in extra]
        res = self.engine.gradients(xb, seed_rows, wrt, score=self.score, extra=outs, rules=rules,
                                    rules_name=rules_name, progress=self.progress, whole=whole)
        if clean_row is not None:
            self.clean = (res[m.logits][clean_row].reshape(-1), res[m.output][clean_row].reshape(-1))
        return res

    def followed(self, xb: np.ndarray, seed_rows: np.ndarray, layer_acts: Optional[np.ndarray] = None
                 ) -> np.ndarray:
        """``seed_rows`` with each class target of a final-detection list re-picked in its own row of
        ``xb``; the rows that are ``x`` itself, and weights targets, keep theirs. With ``layer_acts``
        (the layer's activations on ``x``), ``xb`` holds the layer's activations, not inputs."""
        det = self.model.detection
        if not isinstance(det, DetectionList):
            return seed_rows
        classes = [next((t.index for t in self.targets if t.index >= 0 and np.array_equal(t.seed, s)), -1)
                   for s in seed_rows]
        own = self.x[0] if layer_acts is None else layer_acts[0]
        rows = [r for r, c in enumerate(classes) if c >= 0 and not np.array_equal(xb[r], own)]
        if not rows:
            return seed_rows
        y = self.model.score_tensor(self.score)
        (out,) = (self.engine.outputs(xb[rows], [y], self.progress) if layer_acts is None else
                  self.engine.outputs_given(self.layer.tensor, xb[rows], self.x, [y]))
        seed_rows = np.array(seed_rows, np.float32, copy=True)
        for r, row in zip(rows, out):
            seed_rows[r] = det.follow(classes[r], row.reshape(-1))
        return seed_rows

    def rng(self, seed: Optional[int]) -> np.random.Generator:
        return np.random.default_rng(seed)


@dataclass
class JointGradients:
    """The targets' gradients w.r.t. several layers, from one pass through the network after the first
    (``Engine.layers_gradients``), made at the first layer's request and read by the others."""
    engine: Engine
    x: np.ndarray
    acts: dict                    # layer tensor -> (1, ...) activations of x
    seeds: np.ndarray
    score: str
    progress: Optional[Progress] = None
    grads: Optional[dict] = None
    tried: bool = False

    def of(self, layer: str) -> Optional[np.ndarray]:
        """(T, ...) gradients at ``layer``; None where one pass cannot serve the layers (the method then
        runs its own pass per layer)."""
        if not self.tried:
            self.tried = True
            rows = {t: np.repeat(a, len(self.seeds), axis=0) for t, a in self.acts.items()}
            self.grads = self.engine.layers_gradients(rows, self.seeds, list(self.acts), self.x, score=self.score,
                                                      progress=self.progress)
        return None if self.grads is None else self.grads[layer]
