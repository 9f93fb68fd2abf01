"""Attribution in a layer's own space: Layer Integrated Gradients (Captum's LayerIntegratedGradients).

Layer IG: IG along the straight path from a0, the layer's activations on the baseline input, to
a, those on the input:  attr = (a - a0) * integral over alpha of dS/da at a0 + alpha (a - a0).
Each path point replaces the layer's output in a forward + VJP of the network after the layer
(``Engine.layer_gradients``); a skip connection around the layer reads the input itself, as
Captum's hook leaves it.  The map sums the attributions over channels (``reduce``), and the
completeness gap sum(attr) - (S(a) - S(a0)) is reported, both scores taken with the layer set.
"""

from __future__ import annotations

from typing import Union

import numpy as np

from ..context import Context
from ..engine import score_rows
from . import method
from .gradients import baseline_for, ig_path, reduce_channels, report_completeness


def layer_ig_attr(ctx: Context, steps: int, baseline, rule: str, blur_sigma: float) -> np.ndarray:
    """(T, ...) attributions in the layer's own layout: (T, K, h, w), or (T, tokens, C)."""
    a = ctx.activations()
    x0 = baseline_for(ctx, baseline, blur_sigma)
    (a0,) = ctx.engine.outputs(x0, [ctx.layer.tensor])
    alphas, weights = ig_path(int(steps), rule)
    ctx.hold(len(alphas) * len(ctx.targets), "path points in the layer (a set per target) and their gradients", 2, a.size)
    path = (a0 + alphas.reshape((-1,) + (1,) * (a.ndim - 1)).astype(np.float32) * (a - a0)).astype(np.float32)
    t, s = len(ctx.targets), len(path)
    rows = np.tile(path, (t,) + (1,) * (a.ndim - 1))                     # target-major rows
    seeds = ctx.followed(rows, np.repeat(ctx.seeds, s, axis=0), layer_acts=a)   # a detection list: per path point
    g = ctx.engine.layer_gradients(rows, seeds, ctx.layer.tensor, ctx.x,
                                   score=ctx.score, progress=ctx.progress).reshape((t, s) + a.shape[1:])
    attr = (a - a0) * np.einsum("s,ts...->t...", weights.astype(np.float32), g)
    y = ctx.model.score_tensor(ctx.score)
    (out,) = ctx.engine.outputs_given(ctx.layer.tensor, np.concatenate([a, a0]), ctx.x, [y])
    scores = score_rows(out, ctx.targets, ctx.model.detection)
    report_completeness(ctx, attr, scores[0] - scores[1])
    return attr.astype(np.float32)


@method("layerig", family="cam", needs_layer=True)
def layer_integrated_gradients(ctx: Context, steps: int = 50, baseline: Union[str, float] = "zero",
                               rule: str = "gausslegendre", blur_sigma: float = 5.0, reduce: str = "sum") -> np.ndarray:
    """Layer Integrated Gradients: IG in the layer's activations, from the baseline input's to the input's."""
    return reduce_channels(ctx.layer.grid(layer_ig_attr(ctx, steps, baseline, rule, blur_sigma)), reduce)
