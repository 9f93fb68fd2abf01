"""Gradient-weighted CAMs: one forward+VJP run gives the layer's activations A and gradients G.

A and G are (T, K, h, w) maps; a transformer's token layer is laid out as its patch grid first
(``Layer.grid``), so every formula below serves ViTs unchanged.

Grad-CAM    (Selvaraju et al. 2017): w_k = mean_ij G_k;            map = ReLU(sum_k w_k A_k)
Grad-CAM++  (Chattopadhay et al. 2018): a = G^2 / (2 G^2 + sum_ij A * G^3); w_k = sum_ij a ReLU(G_k)
XGrad-CAM   (Fu et al. 2020): w_k = sum_ij (G_k A_k) / (sum_ij A_k + eps)
LayerCAM    (Jiang et al. 2021): map = ReLU(sum_k ReLU(G_k) * A_k)
HiResCAM    (Draelos & Carin 2020): map = ReLU(sum_k G_k * A_k), element-wise, no spatial averaging
Grad-CAM element-wise (pytorch-grad-cam): map = ReLU(sum_k ReLU(G_k * A_k))
Eigen-CAM   (Muhammad & Yeasin 2020): the first principal component of the layer's positions x channels
            matrix (A, class-agnostic; EigenGrad-CAM: G * A), projected back onto the positions
FEM         (Fuad et al. 2020): w_k = share of A_k's positions above mean + k std; map = ReLU(sum_k w_k A_k)
KPCA-CAM    (Karmani et al. 2024): Eigen-CAM with kernel PCA (scikit-learn's KernelPCA, sigmoid kernel)
ShapleyCAM  (Cai et al. 2025): w_k = mean_ij (G - H A / 2)_k, H the Hessian of the score w.r.t. the layer
            (a Hessian-vector product: the VJP graph differentiated again); by default the score is the
            ReST target, logit + log-softmax, as pytorch-grad-cam's ClassifierOutputReST
Guided Grad-CAM: |Guided Backprop| (max over channels) times the upsampled Grad-CAM.
The eps = 1e-7 guards follow pytorch-grad-cam, so maps agree with it to float precision.
``eigen_smooth`` (as pytorch-grad-cam's) replaces each channel sum by the first principal component
of the weighted activations, as Eigen-CAM does for the plain ones; ``aug_smooth`` averages the maps
of six mirrored and rescaled copies of the input.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional

import numpy as np

from ..context import Context
from ..errors import MethodError
from ..postprocess import normalize, resize
from . import method

EPS = 1e-7


def layer_grads(ctx: Context, seeds: Optional[np.ndarray] = None, score: Optional[str] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(T, K, h, w) activations and gradients of each target's score w.r.t. the layer.

    The activations come from the forward pass that chose the targets; the gradients from the
    VJP of the network after the layer alone (``Engine.layer_gradients``). ``seeds``/``score``
    replace the targets' cotangent rows and the scored tensor (Finer-CAM's own score).
    """
    shared = ctx.together.of(ctx.layer.tensor) if ctx.together is not None and seeds is None and score is None \
        else None                  # several layers: one pass gave every layer's gradients
    seeds = ctx.seeds if seeds is None else seeds
    acts = np.repeat(ctx.activations(), len(seeds), axis=0)
    g = shared if shared is not None else ctx.engine.layer_gradients(
        acts, seeds, ctx.layer.tensor, ctx.x, score=score or ctx.score, progress=ctx.progress)
    return ctx.layer.grid(acts), ctx.layer.grid(g)


def gradcam_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return g.mean(axis=(2, 3))


def gradcampp_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    g2 = g * g
    g3 = g2 * g
    denom = 2 * g2 + a.sum(axis=(2, 3), keepdims=True) * g3 + EPS
    alpha = np.where(g != 0, g2 / denom, 0.0)
    return (alpha * np.maximum(g, 0)).sum(axis=(2, 3))


def xgradcam_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    return (g * a / (a.sum(axis=(2, 3), keepdims=True) + EPS)).sum(axis=(2, 3))


AUGMENTATIONS = [(flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1)]


def retargeted(ctx: Context, x: np.ndarray) -> Context:
    """``ctx`` for another input ``x``, with the same classes' targets. A target read off the image's
    own output (a segmentation class's pixels, a detector's box) is read off ``x``'s: in a mirrored
    image the clean image's mask, anchor or detection row points at the wrong place. A class a
    detector did not keep in ``x`` scores nothing there; a weights target stays as given. The pass
    that reads the output also gives the layer's activations."""
    from ..engine import make_targets
    from ..errors import TargetError

    m = ctx.model
    if m.dense is None and m.detection is None:
        return replace(ctx, x=x, acts=None, info={})
    layer = [ctx.layer.tensor] if ctx.layer is not None else []
    logits, out, *acts = ctx.engine.outputs(x, [m.logits, m.output] + layer)
    row = (logits if m.activation is None else out).reshape(-1)
    found = []
    for t in ctx.targets:
        try:
            found.append(t if t.index < 0 else make_targets(m, [t.index], ctx.score, row, t.region)[0])
        except TargetError:
            found.append(replace(t, seed=np.zeros_like(t.seed)))
    return replace(ctx, x=x, acts=acts[0] if acts else None, info={}, targets=found)


def augmented(ctx: Context, fn: Callable[[Context], np.ndarray]) -> np.ndarray:
    """pytorch-grad-cam's ``aug_smooth``: the mean of the normalised maps of the input mirrored or
    not and scaled by 0.9, 1 and 1.1 (its ttach transforms), each mirrored back; the same classes,
    each found again in its copy (``retargeted``)."""
    axis = 2 if ctx.nhwc else 3
    maps = []
    for flip, factor in AUGMENTATIONS:
        x = ctx.x * np.float32(factor)
        x = np.ascontiguousarray(np.flip(x, axis)).astype(np.float32) if flip else x.astype(np.float32)
        m = normalize(resize(fn(retargeted(ctx, x)), ctx.input_size))
        maps.append(m[..., ::-1] if flip else m)
    return np.mean(maps, axis=0).astype(np.float32)


def channel_sum(m: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    """(T, K, h, w) weighted activations -> (T, h, w) maps: ReLU of the channel sum or, with
    ``eigen_smooth`` (pytorch-grad-cam's option), of their first principal component."""
    if eigen_smooth:
        return projected(m)
    return np.maximum(m.sum(axis=1), 0).astype(np.float32)


def by_channel(weights: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable:
    """A weighting of whole channels (Grad-CAM's family) as weighted activations w_k * A_k."""
    return lambda a, g: weights(a, g)[:, :, None, None] * a


def gradient_cam(name: str, weigh: Callable[[np.ndarray, np.ndarray], np.ndarray], doc: str) -> None:
    """Register a CAM that sums (or, with eigen_smooth, projects) ``weigh(A, G)`` over channels."""
    def cam(ctx: Context, eigen_smooth: bool = False, aug_smooth: bool = False) -> np.ndarray:
        if aug_smooth:
            return augmented(ctx, lambda c: cam(c, eigen_smooth))
        a, g = layer_grads(ctx)
        return channel_sum(weigh(a, g), eigen_smooth)

    cam.__doc__ = doc
    method(name, family="cam", needs_layer=True)(cam)


# (A, G) -> the weighted activations each gradient CAM sums over channels; Finer-CAM reuses them as its base.
WEIGHINGS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "gradcam": by_channel(gradcam_weights),
    "gradcam++": by_channel(gradcampp_weights),
    "xgradcam": by_channel(xgradcam_weights),
    "layercam": lambda a, g: np.maximum(g, 0) * a,
    "hirescam": lambda a, g: g * a,
    "gradcamelementwise": lambda a, g: np.maximum(g * a, 0),
}
for _name, _doc in [
        ("gradcam", "Grad-CAM: channels weighted by their spatially averaged gradient."),
        ("gradcam++", "Grad-CAM++: channels weighted by alpha-weighted positive gradients."),
        ("xgradcam", "XGrad-CAM: channels weighted by activation-normalised gradient x activation."),
        ("layercam", "LayerCAM: activations weighted element-wise by their positive gradients."),
        ("hirescam", "HiResCAM: activations times their gradients, summed over channels without averaging first."),
        ("gradcamelementwise", "Grad-CAM element-wise: the positive part of each activation x gradient product, "
                               "summed over channels.")]:
    gradient_cam(_name, WEIGHINGS[_name], _doc)


@method("shapleycam", family="cam", needs_layer=True)
def shapleycam(ctx: Context, rest: bool = True, eigen_smooth: bool = False, aug_smooth: bool = False) -> np.ndarray:
    """ShapleyCAM: channels weighted by the spatial mean of G - H A / 2, H the score's Hessian at the layer."""
    if aug_smooth:
        return augmented(ctx, lambda c: shapleycam(c, rest, eigen_smooth))
    acts = np.repeat(ctx.activations(), len(ctx.seeds), axis=0)
    g, hv = ctx.engine.layer_hvp(acts, ctx.seeds, ctx.layer.tensor, ctx.x, score=ctx.score, rest=bool(rest),
                                 progress=ctx.progress)
    a, g, hv = ctx.layer.grid(acts), ctx.layer.grid(g), ctx.layer.grid(hv)
    w = (g - 0.5 * hv).mean(axis=(2, 3))
    return channel_sum(w[:, :, None, None] * a, eigen_smooth)


def first_component(m: np.ndarray) -> np.ndarray:
    """(K, h, w) -> (h, w): each position's score on the first principal component of its channel vector.

    The positions are the samples and the channels the variables, centred per channel, as
    pytorch-grad-cam's ``get_2d_projection``.  A principal component has no sign of its own (LAPACK
    picks one), so the projection is oriented to correlate positively with the channel sum of ``m``:
    the map then shows where the layer responds, and the same input always gives the same map.
    """
    k = m.shape[0]
    rows = m.reshape(k, -1).T.astype(np.float64)
    rows = rows - rows.mean(axis=0)
    # the projection is u_1 * s_1 of the SVD; the smaller Gram matrix's top eigenpair gives it
    # without the full SVD (2048 channels x 49 positions: 19 ms -> under 1 ms)
    if rows.shape[0] <= rows.shape[1]:
        vals, vecs = np.linalg.eigh(rows @ rows.T)
        proj = vecs[:, -1] * np.sqrt(max(vals[-1], 0.0))
    else:
        proj = rows @ np.linalg.eigh(rows.T @ rows)[1][:, -1]
    total = m.reshape(k, -1).sum(axis=0)
    if np.dot(proj, total - total.mean()) < 0:
        proj = -proj
    return proj.reshape(m.shape[1:])


def projected(maps: np.ndarray) -> np.ndarray:
    return np.maximum(np.stack([first_component(m) for m in maps]), 0).astype(np.float32)


@method("eigencam", family="cam", needs_layer=True, gradient_free=True)
def eigencam(ctx: Context, aug_smooth: bool = False) -> np.ndarray:
    """Eigen-CAM: the first principal component of the layer's activations (no gradients, class-agnostic)."""
    if aug_smooth:
        return augmented(ctx, eigencam)
    return class_agnostic(ctx, first_component)


def class_agnostic(ctx: Context, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """ReLU of ``reduce`` of the input's (K, h, w) activations, the same map for every target."""
    a = ctx.layer.grid(ctx.activations())[0]
    cam = np.maximum(reduce(a), 0).astype(np.float32)
    return np.repeat(cam[None], len(ctx.targets), axis=0)


@method("eigengradcam", family="cam", needs_layer=True)
def eigengradcam(ctx: Context, aug_smooth: bool = False) -> np.ndarray:
    """EigenGrad-CAM: the first principal component of activations x gradients (class-specific)."""
    if aug_smooth:
        return augmented(ctx, eigengradcam)
    a, g = layer_grads(ctx)
    return projected(g * a)


@method("fem", family="cam", needs_layer=True, gradient_free=True)
def fem(ctx: Context, k: float = 2.0, aug_smooth: bool = False) -> np.ndarray:
    """FEM (Fuad et al. 2020): each channel weighted by the share of its positions above its mean + k
    standard deviations (no gradients, the same map for every class)."""
    if aug_smooth:
        return augmented(ctx, lambda c: fem(c, k))

    def weighted(a: np.ndarray) -> np.ndarray:
        # float32 statistics, as pytorch-grad-cam's: a threshold computed in float64 can put a
        # position that sits on it on the other side
        th = a.mean(axis=(1, 2), keepdims=True) + np.float32(k) * a.std(axis=(1, 2), keepdims=True)
        return np.einsum("k,khw->hw", (a > th).mean(axis=(1, 2)), a.astype(np.float64))

    return class_agnostic(ctx, weighted)


KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def kernel_component(m: np.ndarray, kernel: str = "sigmoid", gamma: Optional[float] = None, degree: int = 3,
                     coef0: float = 1.0) -> np.ndarray:
    """(K, h, w) -> (h, w): the positions' scores on the first kernel principal component.

    As pytorch-grad-cam's ``get_2d_projection_kernel`` (scikit-learn's ``KernelPCA``, one
    component): positions are the samples, centred per channel; the kernel matrix is centred
    in feature space, and its top eigenvector, signed so its largest entry is positive (the
    ``svd_flip`` rule), times the square root of its eigenvalue is the projection. Written
    with NumPy's ``eigh`` so that onnxsal does not need scikit-learn; the positions number
    a few hundred at most, so the dense eigensolver is cheap.
    """
    x = m.reshape(m.shape[0], -1).T.astype(np.float64)
    x = x - x.mean(axis=0)
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    dot = x @ x.T
    if kernel == "sigmoid":
        km = np.tanh(g * dot + coef0)
    elif kernel == "rbf":
        sq = np.diag(dot)
        km = np.exp(-g * np.maximum(sq[:, None] + sq[None, :] - 2 * dot, 0))
    elif kernel == "poly":
        km = (g * dot + coef0) ** degree
    elif kernel == "linear":
        km = dot
    else:                                   # cosine
        norm = np.sqrt(np.diag(dot))
        norm[norm == 0] = 1.0
        km = dot / norm[:, None] / norm[None, :]
    col = km.mean(axis=0)
    kc = km - col[None, :] - col[:, None] + col.mean()
    vals, vecs = np.linalg.eigh((kc + kc.T) / 2)
    top = vecs[:, -1]
    if top[np.argmax(np.abs(top))] < 0:
        top = -top
    return (top * np.sqrt(max(vals[-1], 0.0))).reshape(m.shape[1:])


@method("kpcacam", family="cam", needs_layer=True, gradient_free=True)
def kpcacam(ctx: Context, kernel: str = "sigmoid", gamma: Optional[float] = None, aug_smooth: bool = False
            ) -> np.ndarray:
    """KPCA-CAM (Karmani et al. 2024): Eigen-CAM with kernel PCA (no gradients, the same map for every class)."""
    if kernel not in KERNELS:
        raise MethodError(f"kpcacam kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    if gamma is not None and not gamma > 0:
        raise MethodError(f"kpcacam gamma must be positive, not {gamma!r}")
    if aug_smooth:
        return augmented(ctx, lambda c: kpcacam(c, kernel, gamma))
    return class_agnostic(ctx, lambda a: kernel_component(a, kernel, gamma))


def finer_seed(logits: np.ndarray, main: int, alpha: float, comparison: tuple) -> np.ndarray:
    """d f / d logits for Finer-CAM's score f = sum_j p_j (o_m - alpha o_j) / (sum_j p_j + 1e-9), p = softmax(o),
    j over the classes ranked `comparison` by |o - o_m| (rank 0 is m itself; pytorch-grad-cam's
    FinerWeightedTarget). The VJP only needs this vector, computed here in float64."""
    o = logits.astype(np.float64)
    order = np.argsort(np.abs(o - o[main]), kind="stable")
    js = [int(order[r]) for r in comparison if r < len(o)]
    p = np.exp(o - o.max())
    p /= p.sum()
    inside = np.zeros_like(o)
    inside[js] = 1.0
    diff = o[main] - alpha * o                          # o_m - alpha o_j, per j
    s = float(p[js].sum())
    n = float((p[js] * diff[js]).sum())
    # dS/do_k = p_k [k in J] - p_k S;  dN/do_k = p_k [k in J] (diff_k - alpha) - p_k N + [k = m] S
    ds = p * inside - p * s
    dn = p * inside * (diff - alpha) - p * n
    dn[main] += s
    return ((dn * (s + 1e-9) - n * ds) / (s + 1e-9) ** 2).astype(np.float32)


@method("finercam", family="cam", needs_layer=True)
def finercam(ctx: Context, alpha: float = 1.0, comparison: str = "1,2,3", base: str = "gradcam",
             eigen_smooth: bool = False) -> np.ndarray:
    """Finer-CAM: Grad-CAM, or the chosen base CAM, of the target's logit against the classes closest to it, weighted by their probabilities.

    The score is pytorch-grad-cam's FinerWeightedTarget; ``comparison`` ranks classes by how close
    their logits are to the target's (rank 0 is the target itself), ``alpha`` scales them; ``base``
    is its ``base_method``.
    """
    if base not in WEIGHINGS:
        raise MethodError(f"finercam's base must be one of {', '.join(WEIGHINGS)}, not {base!r}")
    try:
        ranks = tuple(int(r) for r in str(comparison).split(",") if r.strip())
    except ValueError:
        ranks = ()
    if not ranks or min(ranks) < 0:
        raise MethodError(f"comparison must be comma-separated ranks >= 0, not {comparison!r}")
    if ctx.model.binary or ctx.model.dense is not None or ctx.model.detection is not None:
        raise MethodError("finercam compares the classes of a classifier; this model's output is "
                          + ("a single unit" if ctx.model.binary else "a map per class" if ctx.model.dense is not None
                             else "a detector's boxes"))
    if any(t.index < 0 for t in ctx.targets):
        raise MethodError("finercam builds its own score from a class; give a class index, not weights")
    seeds = np.stack([finer_seed(ctx.logits(), t.index, float(alpha), ranks) for t in ctx.targets])
    a, g = layer_grads(ctx, seeds, score="logit")        # the seeds are gradients w.r.t. the logits
    return channel_sum(WEIGHINGS[base](a, g), eigen_smooth)


@method("guidedgradcam", family="cam", needs_layer=True)
def guidedgradcam(ctx: Context) -> np.ndarray:
    """Guided Grad-CAM: Guided Backprop (max |.| over channels) times the upsampled Grad-CAM."""
    from .gradients import guided_grads, reduce_channels

    a, g = layer_grads(ctx)
    cam = normalize(resize(channel_sum(by_channel(gradcam_weights)(a, g), False), ctx.input_size))
    gb = reduce_channels(guided_grads(ctx), "max_abs")
    return (gb * cam).astype(np.float32)
