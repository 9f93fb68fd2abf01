"""Perturbation methods: batched masked forward passes, no gradients needed.

Score-CAM:  Wang et al. 2020, "Score-CAM: Score-Weighted Visual Explanations for CNNs".
Faster-Score-CAM: the channel-pruned variant of tf-keras-vis (channels of highest
activation standard deviation).
Ablation-CAM: Desai & Ramaswamy 2020, with pytorch-grad-cam's ablation value.
Occlusion:  Zeiler & Fergus 2014, with Captum's averaging over overlapping windows.
RISE:       Petsiuk et al. 2018, "RISE: Randomized Input Sampling for Explanation".
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..context import Context
from ..engine import score_rows
from ..errors import MethodError
from ..postprocess import resize
from . import method


def _channel_masks(acts: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Each channel upsampled to the input and min-max normalised; also which channels are not constant."""
    up = resize(acts, size)                              # (K, H, W)
    lo = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - lo
    live = span[:, 0, 0] > 0
    masks = np.where(span > 0, (up - lo) / np.where(span > 0, span, 1), 0.0).astype(np.float32)
    return masks, live


def _score_cam(ctx: Context, channels: Optional[np.ndarray], weighting: str) -> np.ndarray:
    if weighting not in ("softmax", "score"):
        raise MethodError(f"weighting must be 'softmax' or 'score', not {weighting!r}")
    acts = ctx.layer.grid(ctx.activations())[0]          # (K, h, w)
    if channels is not None:
        acts = acts[channels]
    masks, live = _channel_masks(acts, ctx.input_size)
    scores = np.zeros((len(acts), len(ctx.targets)), np.float32)
    if live.any():
        scores[live] = ctx.scores(ctx.blend(masks[live]))   # (K_live, T)
    if weighting == "softmax":
        s = np.where(live[:, None], scores, -np.inf)
        s = s - s.max(axis=0, keepdims=True)
        w = np.exp(s)
        w = w / w.sum(axis=0, keepdims=True)
    else:
        w = np.where(live[:, None], scores, 0.0)
    cam = np.einsum("kt,khw->thw", w.astype(np.float32), acts)
    return np.maximum(cam, 0)


@method("scorecam", family="cam", needs_layer=True, gradient_free=True)
def scorecam(ctx: Context, weighting: str = "softmax") -> np.ndarray:
    """Score-CAM: each channel masks the input; the target's score on the masked input weights the channel.

    weighting="softmax" (the paper, pytorch-grad-cam) normalises the scores over channels;
    "score" uses them as they are (tf-keras-vis).
    """
    return _score_cam(ctx, None, weighting)


@method("fasterscorecam", family="cam", needs_layer=True, gradient_free=True)
def fasterscorecam(ctx: Context, max_n: int = 10, weighting: str = "softmax") -> np.ndarray:
    """Faster-Score-CAM: Score-CAM over the max_n channels whose activations vary most."""
    if max_n < 1:
        raise MethodError("max_n must be at least 1")
    acts = ctx.layer.grid(ctx.activations())[0]
    std = acts.reshape(len(acts), -1).std(axis=1)
    channels = np.sort(np.argsort(-std, kind="stable")[:max_n])
    return _score_cam(ctx, channels, weighting)


ABLATION_OFFSET = 1e7
ABLATION_CHUNK_BYTES = 64 << 20


def ablated_scores(ctx: Context, value: float, channels: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """(T,) target scores with the layer as it is, and (K', T) with each of ``channels`` (default:
    all K) in turn set to `value`.

    Only the part of the network after the layer runs (``Engine.outputs_given``), all channels
    as batches of one cached session; a skip connection around the layer still reads the input.
    """
    raw = ctx.activations()                           # (1, K, h, w), or (1, T, C) for tokens
    axis = raw.ndim - 1 if ctx.layer.tokens else 1
    channels = np.arange(raw.shape[axis]) if channels is None else np.asarray(channels, np.int64)
    k = len(channels)
    y = ctx.model.score_tensor(ctx.score)
    step = max(1, ABLATION_CHUNK_BYTES // max(raw.nbytes, 1))
    scores = []
    done = 0
    for start in range(0, max(k, 1), step):           # one pass at least: the layer as it is
        chans = channels[start:start + step]
        batch = np.repeat(raw, len(chans), axis=0)
        np.moveaxis(batch, axis, 1)[np.arange(len(chans)), chans] = value    # a view: writes into batch
        if start == 0:
            batch = np.concatenate([raw, batch])         # the layer as it is, first
        # progress over all k + 1 rows, not per chunk
        report = (lambda n, _, base=done: ctx.progress(base + n, k + 1)) if ctx.progress else None
        (out,) = ctx.engine.outputs_given(ctx.layer.tensor, batch, ctx.x, [y], report)
        scores.append(score_rows(out, ctx.targets, ctx.model.detection))
        done += len(out)
    s = np.concatenate(scores)
    return s[0], s[1:]


def channels_worth_ablating(acts: np.ndarray, ratio: float) -> np.ndarray:
    """pytorch-grad-cam's experimental ranking for ``ratio_channels_to_ablate`` < 1 on (K, h, w)
    activations: a mask of the positions where |Eigen-CAM|, min-max scaled, exceeds 0.01; each
    channel scored by the share of its |activation| - min inside the mask; the int(K * ratio)
    highest- and as many lowest-scoring channels kept (dead channels score NaN and sort last, as
    there; ablating one changes nothing)."""
    from .cam import first_component

    k = acts.shape[0]
    proj = np.abs(first_component(acts))
    proj = proj - proj.min()
    mask = proj / proj.max() > 0.01 if proj.max() > 0 else np.zeros_like(proj, bool)
    mag = np.abs(acts.astype(np.float32))
    mag = mag - mag.reshape(k, -1).min(axis=1)[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mag = mag / mag.reshape(k, -1).max(axis=1)[:, None, None]
        scores = ((mask * mag).reshape(k, -1).sum(axis=1) / mag.reshape(k, -1).sum(axis=1)).astype(np.float32)
    order = np.argsort(scores)
    n = int(k * ratio)
    return np.unique(np.concatenate([order[::-1][:n], order[:n]]))


@method("ablationcam", family="cam", needs_layer=True, gradient_free=True)
def ablationcam(ctx: Context, ratio_channels_to_ablate: float = 1.0) -> np.ndarray:
    """Ablation-CAM: each channel weighted by the relative drop of the target's score when the channel is switched off.

    w_k = (S - S_k) / S, map = ReLU(sum_k w_k A_k).  A channel is switched off by setting it to 0
    when the layer's smallest activation is 0 (after a ReLU), else to that minimum minus 1e7: the
    value pytorch-grad-cam gives the first copy of each batch (each further copy gets 1e7 less,
    so its weights would depend on its batch size).  A score of exactly 0 divides by 1.  With
    ``ratio_channels_to_ablate`` < 1 only the channels pytorch-grad-cam's ranking keeps are ablated
    (``channels_worth_ablating``); the others weigh 0, as there.
    """
    ratio = float(ratio_channels_to_ablate)
    if not 0 < ratio <= 1:
        raise MethodError(f"ratio_channels_to_ablate must be in (0, 1], not {ratio_channels_to_ablate!r}")
    raw = ctx.activations()
    lo = float(raw.min())
    value = 0.0 if lo == 0 else lo - ABLATION_OFFSET
    acts = ctx.layer.grid(raw)[0]
    chans = None if ratio == 1.0 else channels_worth_ablating(acts, ratio)
    base, ablated = ablated_scores(ctx, value, chans)
    denom = np.where(base == 0, 1.0, base)
    w = np.zeros((acts.shape[0], len(base)), np.float64)
    w[slice(None) if chans is None else chans] = (base[None, :] - ablated) / denom[None, :]       # (K, T)
    ctx.info["ablated_channels"] = int(acts.shape[0] if chans is None else len(chans))
    return np.maximum(np.einsum("kt,khw->thw", w.astype(np.float32), acts), 0)


def window_starts(n: int, window: int, stride: int) -> np.ndarray:
    return np.arange(0, n - window + 1, stride)


@method("occlusion", family="perturbation", gradient_free=True)
def occlusion(ctx: Context, window: Optional[int] = None, stride: Optional[int] = None, baseline: float = 0.0) -> np.ndarray:
    """Occlusion: slide a window of `baseline` over the input; a pixel's value is the mean score drop
    over every window covering it (Captum's definition). Pixels no window covers get 0."""
    H, W = ctx.input_size
    window = int(window if window is not None else max(2, min(H, W) // 7))    # 0 is a bad window, not "auto"
    stride = int(stride if stride is not None else max(1, window // 2))
    if window < 1 or stride < 1 or window > min(H, W):
        raise MethodError(f"occlusion window must be between 1 and {min(H, W)} and stride >= 1")
    ys, xs = window_starts(H, window, stride), window_starts(W, window, stride)
    ctx.hold(len(ys) * len(xs), "occluded copies of the input", 2)
    masks = np.ones((len(ys) * len(xs), H, W), np.float32)
    k = 0
    for y in ys:
        for x in xs:
            masks[k, y:y + window, x:x + window] = 0
            k += 1
    base = ctx.scores(ctx.x)[0]                           # (T,)
    drops = base[None, :] - ctx.scores(ctx.blend(masks, baseline))   # (K, T)
    covered = 1 - masks
    total = np.einsum("kt,khw->thw", drops.astype(np.float32), covered)
    count = covered.sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)


def rise_masks(n: int, size: tuple[int, int], s: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """N smooth masks: random s x s binary grids, bilinearly upsampled to (s+1) cells, randomly shifted crops."""
    H, W = size
    ch, cw = int(np.ceil(H / s)), int(np.ceil(W / s))
    grids = (rng.random((n, s, s)) < p).astype(np.float32)
    up = resize(grids, ((s + 1) * ch, (s + 1) * cw))
    dy = rng.integers(0, ch, n)
    dx = rng.integers(0, cw, n)
    return np.stack([up[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(n)]).astype(np.float32)


@method("rise", family="perturbation", gradient_free=True)
def rise(ctx: Context, n_masks: int = 1000, cells: int = 8, p: float = 0.5, seed: Optional[int] = 0) -> np.ndarray:
    """RISE: the score-weighted mean of random smooth masks, divided by the keep probability p."""
    if not 0 < p <= 1 or cells < 1 or n_masks < 1:
        raise MethodError("rise needs 0 < p <= 1, cells >= 1, n_masks >= 1")
    if cells > max(ctx.input_size):             # finer than a pixel: each mask would be a pixel grid anyway
        raise MethodError(f"rise's cells must be at most the input's larger side, {max(ctx.input_size)}, not {cells}")
    ctx.hold(n_masks, "masked copies of the input", 2)
    masks = rise_masks(int(n_masks), ctx.input_size, int(cells), float(p), ctx.rng(seed))
    scores = ctx.scores(ctx.blend(masks))                 # (N, T)
    return (np.einsum("nt,nhw->thw", scores.astype(np.float32), masks) / (n_masks * p)).astype(np.float32)
