"""Input-gradient methods, all on one VJP graph (rows = samples x targets, seeds = one-hot rows).

Saliency          (Simonyan et al. 2014): max over channels of |dS/dx| (signed: channel sum).
SmoothGrad        (Smilkov et al. 2017): mean gradient over n noisy copies, noise sd = level * (max - min);
                  nt_type="smoothgrad_sq" averages the squared gradients, "vargrad" (Adebayo et al. 2018)
                  takes their variance, with Captum's NoiseTunnel definitions.
Integrated Grads  (Sundararajan et al. 2017): (x - x0) * integral of dS/dx along x0 -> x, by quadrature
                  (Gauss-Legendre by default, as Captum; trapezoid/midpoint/left/right on request;
                  our trapezoid weights sum to 1, Captum's "riemann_trapezoid" ones to (n-1)/n).
Input x Gradient  (Shrikumar et al. 2016).
Guided Backprop   (Springenberg et al. 2015): ReLUs pass only positive gradients where the input was positive.
Deconvnet         (Zeiler & Fergus 2014): ReLUs pass only positive gradients, whatever the input was.
DeepLIFT          (Shrikumar et al. 2017, Rescale rule, as Captum's DeepLift): (x - x0) times the
                  multipliers of a backward pass where each nonlinearity's derivative is its ratio
                  of differences between input and baseline; sums to S(x) - S(x0).
GradientSHAP      (Lundberg & Lee 2017, as Captum's GradientShap): mean over samples of
                  (x + e - b) * dS/dx at b + a (x + e - b), with b drawn from a set of baselines,
                  a ~ U(0, 1) and e the SmoothGrad noise: expected gradients, a stochastic IG.
Attributions are (T, C, H, W); maps reduce the channels ("max_abs", "sum", "abs_sum").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import numpy as np

from ..context import Context
from ..errors import MethodError
from ..postprocess import smooth as gaussian_smooth
from . import method

REDUCTIONS = ("max_abs", "sum", "abs_sum")
NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


def reduce_channels(attr: np.ndarray, how: str) -> np.ndarray:
    if how == "max_abs":
        return np.abs(attr).max(axis=1)
    if how == "sum":
        return attr.sum(axis=1)
    if how == "abs_sum":
        return np.abs(attr).sum(axis=1)
    raise MethodError(f"reduce must be one of {', '.join(REDUCTIONS)}, not {how!r}")


def input_grads(ctx: Context, xs: np.ndarray, rules=None, rules_name: str = "") -> np.ndarray:
    """Gradients for inputs xs (S, ...) for every target: (T, S, C, H, W), channels first."""
    t, s = len(ctx.targets), len(xs)
    xb = np.tile(xs, (t,) + (1,) * (xs.ndim - 1))                 # target-major rows
    seeds = np.repeat(ctx.seeds, s, axis=0)
    name = ctx.model.input.name
    g = ctx.gradients(xb.astype(np.float32), seeds, wrt=[name], rules=rules, rules_name=rules_name,
                      clean_row=0 if xs is ctx.x else None)["grad_" + name]
    g = ctx.channels_first(g)
    return g.reshape((t, s) + g.shape[1:])


def _x(ctx: Context) -> np.ndarray:
    return ctx.channels_first(ctx.x)


def vanilla_attr(ctx: Context) -> np.ndarray:
    return input_grads(ctx, ctx.x)[:, 0]


def input_noise(ctx: Context, rng: np.random.Generator, n: int, level: float) -> np.ndarray:
    """(n, ...) Gaussian noise, sd = level * (max - min) of x, in the model's layout.  Drawn
    channels-first, so a seed gives the same noise whatever the model's layout."""
    ctx.hold(n, "noisy copies of the input and their gradients")
    sigma = level * float(ctx.x.max() - ctx.x.min())
    return ctx.model_layout(rng.normal(0.0, sigma, (n,) + _x(ctx).shape[1:]).astype(np.float32))


def report_completeness(ctx: Context, attr: np.ndarray, difference: np.ndarray) -> None:
    """Record sum(attr) - (S(x) - S(x0)) per target: 0 for a method that is complete."""
    ctx.info["completeness_gap"] = [float(v) for v in attr.reshape(len(attr), -1).sum(axis=1) - difference]
    ctx.info["score_difference"] = [float(v) for v in difference]


def smoothgrad_attr(ctx: Context, n_samples: int, noise_level: float, seed: Optional[int],
                    noise: Optional[np.ndarray] = None, nt_type: str = "smoothgrad") -> np.ndarray:
    """(T, C, H, W): the mean, mean square or variance of the gradients at the noisy copies."""
    check_nt_type(nt_type)
    if noise is None:
        noise = input_noise(ctx, ctx.rng(seed), n_samples, noise_level)
    return aggregate(input_grads(ctx, ctx.x + noise), nt_type)


def check_nt_type(nt_type: str) -> None:
    """Refuse an unknown aggregation before any gradient is computed."""
    if nt_type not in NT_TYPES:
        raise MethodError(f"nt_type must be one of {', '.join(NT_TYPES)}, not {nt_type!r}")


def aggregate(samples: np.ndarray, nt_type: str) -> np.ndarray:
    """(T, S, ...) values at S noisy copies -> (T, ...): their mean, mean square or variance (NoiseTunnel's types)."""
    check_nt_type(nt_type)
    if nt_type == "smoothgrad":
        return samples.mean(axis=1)
    g64 = samples.astype(np.float64)      # E[g^2] - E[g]^2 cancels; float64 keeps the variance's digits
    sq = (g64 * g64).mean(axis=1)
    if nt_type == "smoothgrad_sq":
        return sq.astype(np.float32)
    return np.maximum(sq - g64.mean(axis=1) ** 2, 0).astype(np.float32)


def tunnelled(ctx: Context, attr_fn, nt_samples: int, nt_level: float, nt_type: str, seed: Optional[int]) -> np.ndarray:
    """Captum's NoiseTunnel around any attribution ``attr_fn(ctx) -> (T, C, H, W)``: the attributions
    of ``nt_samples`` noisy copies of x (SmoothGrad's noise), aggregated by ``nt_type``; 0 samples: none.
    Baselines stay those of the clean input, as NoiseTunnel perturbs the inputs only."""
    if nt_samples < 0 or nt_level < 0:
        raise MethodError("nt_samples and nt_level must be >= 0")
    check_nt_type(nt_type)
    if nt_samples == 0:
        return attr_fn(ctx)
    noise = input_noise(ctx, ctx.rng(seed), int(nt_samples), float(nt_level))
    per = [attr_fn(replace(ctx, x=(ctx.x + noise[i:i + 1]).astype(np.float32), info={}, clean=None))
           for i in range(int(nt_samples))]
    return aggregate(np.stack(per, axis=1), nt_type)


# NumPy's leggauss solves an n x n eigenproblem: 2.7 s and 128 MB at 4096 nodes, minutes and GBs beyond;
# a Gauss-Legendre rule is exact for polynomials of degree 2n - 1, so more nodes than this add nothing.
MAX_GAUSS_NODES = 4096


def ig_path(steps: int, rule: str, more: str = "; rule=trapezoid, midpoint, left or right take more"
            ) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes alpha in [0, 1] and weights for the path integral (``more``: what to say
    where Gauss-Legendre's node count runs out)."""
    if steps < 1:
        raise MethodError("steps must be at least 1")
    if rule == "gausslegendre":
        if steps > MAX_GAUSS_NODES:
            raise MethodError(f"Gauss-Legendre takes at most {MAX_GAUSS_NODES} steps, not {steps} (its nodes cost "
                              f"time cubic in the count){more}")
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return 0.5 * (nodes + 1), 0.5 * weights
    if rule == "trapezoid":
        if steps < 2:
            raise MethodError("the trapezoid rule needs at least 2 steps")
        alphas = np.linspace(0, 1, steps)
        w = np.full(steps, 1.0 / (steps - 1))
        w[[0, -1]] /= 2
        return alphas, w
    if rule in ("left", "right", "midpoint"):
        shift = {"left": 0.0, "right": 1.0, "midpoint": 0.5}[rule]
        return (np.arange(steps) + shift) / steps, np.full(steps, 1.0 / steps)
    raise MethodError(f"rule must be gausslegendre, trapezoid, midpoint, left or right, not {rule!r}")


def baseline_for(ctx: Context, baseline: Union[str, float, np.ndarray], blur_sigma: float) -> np.ndarray:
    if isinstance(baseline, np.ndarray):
        b = np.asarray(baseline, np.float32)
        if b.size != ctx.x.size:
            raise MethodError(f"baseline has shape {b.shape}; the input has {ctx.x.shape}")
        return b.reshape(ctx.x.shape)
    if isinstance(baseline, (int, float)):
        return np.full_like(ctx.x, float(baseline))
    if baseline == "zero":
        return np.zeros_like(ctx.x)
    if baseline == "black":
        spec = ctx.model.preprocess
        if spec is None:
            return np.zeros_like(ctx.x)
        value = (0.0 - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
        shape = (1, -1, 1, 1) if not ctx.nhwc else (1, 1, 1, -1)
        return np.broadcast_to(value.reshape(shape), ctx.x.shape).astype(np.float32).copy()
    if baseline == "blur":
        x = _x(ctx)
        b = gaussian_smooth(x, blur_sigma)
        return b.transpose(0, 2, 3, 1).copy() if ctx.nhwc else b.astype(np.float32)
    raise MethodError(f"baseline must be zero, black, blur, a number or an array, not {baseline!r}")


def baselines_for(ctx: Context, baseline, blur_sigma: float) -> np.ndarray:
    """(K, ...) baselines in the model's layout: one per named or numeric entry, or the rows of an array.

    A comma-separated string ("zero,blur") or a list names several; an array whose size is a
    multiple of the input's is read as that many baselines.
    """
    if isinstance(baseline, np.ndarray) and baseline.size != ctx.x.size:
        if baseline.size % ctx.x.size:
            raise MethodError(f"baselines have shape {baseline.shape}; each must have the input's shape {ctx.x.shape}")
        return np.asarray(baseline, np.float32).reshape((-1,) + ctx.x.shape[1:])
    if isinstance(baseline, str) and "," in baseline:
        baseline = [b.strip() for b in baseline.split(",")]
    entries = baseline if isinstance(baseline, (list, tuple)) else [baseline]
    if not entries:
        raise MethodError("give at least one baseline")
    return np.concatenate([baseline_for(ctx, _number_or_name(b), blur_sigma) for b in entries])


def _number_or_name(b):
    try:
        return float(b) if isinstance(b, str) else b
    except ValueError:
        return b


def gradientshap_attr(ctx: Context, n_samples: int, noise_level: float, baseline, blur_sigma: float,
                      seed: Optional[int], draws: Optional[tuple] = None) -> np.ndarray:
    """(T, C, H, W) GradientSHAP attributions; ``draws`` = (noise, baseline rows, alphas) replaces the RNG."""
    bases = baselines_for(ctx, baseline, blur_sigma)
    if draws is None:
        rng = ctx.rng(seed)
        noise = input_noise(ctx, rng, n_samples, noise_level)
        draws = noise, rng.integers(0, len(bases), n_samples), rng.random(n_samples)
    noise, rows, alphas = draws
    xn = ctx.x + noise
    b = bases[np.asarray(rows)]
    a = np.asarray(alphas, np.float32).reshape((-1,) + (1,) * (ctx.x.ndim - 1))
    grads = input_grads(ctx, (b + a * (xn - b)).astype(np.float32))       # (T, S, C, H, W)
    return (grads * ctx.channels_first(xn - b)[None]).mean(axis=1)


def ig_attr(ctx: Context, steps: int, baseline, rule: str, blur_sigma: float) -> np.ndarray:
    x0 = baseline_for(ctx, baseline, blur_sigma)
    alphas, weights = ig_path(int(steps), rule)
    ctx.hold(len(alphas), "path points and their gradients")
    path = x0 + alphas.reshape((-1,) + (1,) * (ctx.x.ndim - 1)).astype(np.float32) * (ctx.x - x0)
    grads = input_grads(ctx, path.astype(np.float32))           # (T, S, C, H, W)
    avg = np.einsum("s,ts...->t...", weights.astype(np.float32), grads)
    attr = ctx.channels_first(ctx.x - x0) * avg
    # completeness: sum(attr) should equal S(x) - S(x0)
    s = ctx.scores(np.concatenate([ctx.x, x0]), clean_row=0)
    report_completeness(ctx, attr, s[0] - s[1])
    return attr


def guided_grads(ctx: Context) -> np.ndarray:
    from ..graph.rules.activations import GUIDED_RULES

    return input_grads(ctx, ctx.x, rules=GUIDED_RULES, rules_name="guided")[:, 0]


def deconv_grads(ctx: Context) -> np.ndarray:
    from ..graph.rules.activations import DECONV_RULES

    return input_grads(ctx, ctx.x, rules=DECONV_RULES, rules_name="deconv")[:, 0]


@method("saliency", family="gradient")
def saliency(ctx: Context, reduce: str = "max_abs") -> np.ndarray:
    """Vanilla gradient: max over channels of |dS/dx| (reduce="sum" keeps the sign)."""
    return reduce_channels(vanilla_attr(ctx), reduce)


@method("smoothgrad", family="gradient")
def smoothgrad(ctx: Context, n_samples: int = 20, noise_level: float = 0.15, seed: Optional[int] = 0,
               reduce: str = "max_abs", nt_type: str = "smoothgrad") -> np.ndarray:
    """SmoothGrad: the gradient averaged over noisy copies of the input."""
    if n_samples < 1 or noise_level < 0:
        raise MethodError("smoothgrad needs n_samples >= 1 and noise_level >= 0")
    attr = smoothgrad_attr(ctx, int(n_samples), float(noise_level), seed, nt_type=str(nt_type))
    return reduce_channels(attr, reduce)


@method("ig", family="gradient")
def integrated_gradients(ctx: Context, steps: int = 50, baseline: Union[str, float] = "zero",
                         rule: str = "gausslegendre", blur_sigma: float = 5.0, reduce: str = "sum",
                         nt_samples: int = 0, nt_level: float = 0.15, nt_type: str = "smoothgrad",
                         nt_seed: Optional[int] = 0) -> np.ndarray:
    """Integrated Gradients: (x - x0) times the mean gradient on the straight path from the baseline."""
    x0 = baseline_for(ctx, baseline, blur_sigma)
    attr = tunnelled(ctx, lambda c: ig_attr(c, steps, x0, rule, blur_sigma), nt_samples, nt_level, nt_type, nt_seed)
    return reduce_channels(attr, reduce)


@method("gradientshap", family="gradient")
def gradient_shap(ctx: Context, n_samples: int = 20, noise_level: float = 0.0, baseline: Union[str, float] = "zero",
                  blur_sigma: float = 5.0, seed: Optional[int] = 0, reduce: str = "sum") -> np.ndarray:
    """GradientSHAP: input-minus-baseline times the gradient at random points between a baseline and the input."""
    if n_samples < 1 or noise_level < 0:
        raise MethodError("gradientshap needs n_samples >= 1 and noise_level >= 0")
    attr = gradientshap_attr(ctx, int(n_samples), float(noise_level), baseline, float(blur_sigma), seed)
    return reduce_channels(attr, reduce)


def deeplift_attr(ctx: Context, baseline, blur_sigma: float) -> np.ndarray:
    """(T, C, H, W) DeepLIFT attributions, averaged over the baselines when there are several
    (Captum's DeepLiftShap); each target and baseline runs as one input + baseline pair of rows."""
    from ..graph.rules.deeplift import DEEPLIFT_RULES

    bases = baselines_for(ctx, baseline, blur_sigma)
    name, y = ctx.model.input.name, ctx.model.score_tensor(ctx.score)
    attr = np.zeros((len(ctx.targets),) + _x(ctx).shape[1:], np.float64)
    expected = np.zeros(len(ctx.targets))
    for x0 in bases:
        pair = np.concatenate([ctx.x, x0[None]]).astype(np.float32)
        for t, row in enumerate(ctx.seeds):      # both rows get the target's cotangent, as in Captum
            out = ctx.gradients(pair, np.stack([row, row]), [name], rules=DEEPLIFT_RULES, rules_name="deeplift",
                                clean_row=0, whole=True, follow=False)
            attr[t] += ctx.channels_first(ctx.x - x0[None])[0] * ctx.channels_first(out["grad_" + name][:1])[0]
            scores = out[y].reshape(2, -1) @ row.reshape(-1)      # the pass's own scores: S(x), S(x0)
            expected[t] += (scores[0] - scores[1]) / len(bases)
    attr = (attr / len(bases)).astype(np.float32)
    report_completeness(ctx, attr, expected)
    return attr


@method("deeplift", family="gradient")
def deeplift(ctx: Context, baseline: Union[str, float] = "zero", blur_sigma: float = 5.0,
             reduce: str = "sum", nt_samples: int = 0, nt_level: float = 0.15, nt_type: str = "smoothgrad",
             nt_seed: Optional[int] = 0) -> np.ndarray:
    """DeepLIFT (Rescale): differences from a baseline pushed back with ratio-of-differences multipliers."""
    bases = baselines_for(ctx, baseline, blur_sigma)
    attr = tunnelled(ctx, lambda c: deeplift_attr(c, bases, blur_sigma), nt_samples, nt_level, nt_type, nt_seed)
    return reduce_channels(attr, reduce)


@method("inputxgradient", family="gradient")
def input_x_gradient(ctx: Context, reduce: str = "sum", nt_samples: int = 0, nt_level: float = 0.15,
                     nt_type: str = "smoothgrad", nt_seed: Optional[int] = 0) -> np.ndarray:
    """Input x Gradient: the input times its gradient."""
    attr = tunnelled(ctx, lambda c: _x(c) * vanilla_attr(c), nt_samples, nt_level, nt_type, nt_seed)
    return reduce_channels(attr, reduce)


@method("guidedbackprop", family="gradient")
def guided_backprop(ctx: Context, reduce: str = "max_abs", nt_samples: int = 0, nt_level: float = 0.15,
                    nt_type: str = "smoothgrad", nt_seed: Optional[int] = 0) -> np.ndarray:
    """Guided Backprop: gradients through ReLUs that pass only positive signals both ways."""
    return reduce_channels(tunnelled(ctx, guided_grads, nt_samples, nt_level, nt_type, nt_seed), reduce)


@method("deconvnet", family="gradient")
def deconvnet(ctx: Context, reduce: str = "max_abs", nt_samples: int = 0, nt_level: float = 0.15,
              nt_type: str = "smoothgrad", nt_seed: Optional[int] = 0) -> np.ndarray:
    """Deconvnet: gradients through ReLUs that pass only positive signals, ignoring the forward mask."""
    return reduce_channels(tunnelled(ctx, deconv_grads, nt_samples, nt_level, nt_type, nt_seed), reduce)
