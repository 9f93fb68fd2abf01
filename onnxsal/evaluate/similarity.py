"""How alike are two saliency maps? The four measures of the sanity-check paper.

Adebayo et al. 2018, "Sanity Checks for Saliency Maps", compare a map with the
map of a randomised model by Spearman rank correlation (with and without
absolute values), SSIM, and the Pearson correlation of HOG features. All four
are written here in NumPy so the engine needs neither SciPy nor scikit-image;
SSIM and HOG follow scikit-image's definitions (the ones the paper used) so
numbers are comparable with published ones, and the tests check that.

Every function takes two 2-D maps of the same shape. A correlation with a
constant map is undefined; it is reported as 0 ("no relation"), except that two
identical constant maps correlate 1, so a map that collapses to a constant
counts as changed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

MEASURES = ("spearman", "spearman_abs", "ssim", "hog")


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"maps must be 2-D and of one shape, got {a.shape} and {b.shape}")
    return a, b


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a flat array, ties sharing their average rank (SciPy's 'average')."""
    v = np.asarray(values).ravel()
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    # start of each run of equal values, and its average rank
    starts = np.flatnonzero(np.r_[True, sorted_v[1:] != sorted_v[:-1]])
    ends = np.r_[starts[1:], len(v)]
    avg = (starts + ends + 1) / 2.0          # mean of ranks starts+1 .. ends
    ranks = np.empty(len(v), np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two flat vectors; 0 when one is constant (1 if both are and are equal)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    da, db = a - a.mean(), b - b.mean()
    na, nb = np.sqrt((da * da).sum()), np.sqrt((db * db).sum())
    if na == 0 or nb == 0:
        return 1.0 if (na == 0 and nb == 0 and np.array_equal(a, b)) else 0.0
    return float(np.clip((da * db).sum() / (na * nb), -1.0, 1.0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation: Pearson on average ranks."""
    a, b = _check(a, b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return pearson(a, b)
    return pearson(rankdata(a), rankdata(b))


def spearman_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman on absolute values: a sign flip of the attribution is no change."""
    a, b = _check(a, b)
    return spearman(np.abs(a), np.abs(b))


# SSIM ---------------------------------------------------------------------------------------

def _gaussian_kernel(sigma: float, truncate: float = 3.5) -> np.ndarray:
    """SciPy's gaussian_filter kernel: radius int(truncate * sigma + 0.5)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation with edge mirroring (SciPy 'reflect' = NumPy 'symmetric')."""
    r = len(kernel) // 2
    out = np.pad(img, ((r, r), (0, 0)), mode="symmetric")
    out = sum(kernel[i] * out[i:i + img.shape[0]] for i in range(len(kernel)))
    out = np.pad(out, ((0, 0), (r, r)), mode="symmetric")
    return sum(kernel[i] * out[:, i:i + img.shape[1]] for i in range(len(kernel)))


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> float:
    """Structural similarity (Wang et al. 2004) with the Gaussian window of the original paper.

    Same as scikit-image ``structural_similarity(a, b, data_range=1, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``: the mean of the SSIM image after cropping the
    half-window border where the filter sees mirrored pixels. Maps are compared in [0, 1].
    """
    a, b = _check(a, b)
    kernel = _gaussian_kernel(sigma)
    win = len(kernel)
    if min(a.shape) < win:
        raise ValueError(f"SSIM needs maps of at least {win}x{win} pixels, got {a.shape}")
    mu_a, mu_b = _filter(a, kernel), _filter(b, kernel)
    var_a = _filter(a * a, kernel) - mu_a * mu_a
    var_b = _filter(b * b, kernel) - mu_b * mu_b
    cov = _filter(a * b, kernel) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    pad = (win - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())


# HOG ----------------------------------------------------------------------------------------

def hog(img: np.ndarray, orientations: int = 9, cell: int = 8, block: int = 3, eps: float = 1e-5) -> np.ndarray:
    """Histogram of oriented gradients (Dalal & Triggs 2005) as scikit-image computes it by default.

    Central-difference gradients (zero on the border), unsigned orientations in [0, 180)
    binned without interpolation, per-cell mean magnitude, overlapping blocks of
    `block` x `block` cells normalised with L2-Hys (clip at 0.2). Returns the flat feature vector.
    """
    img = np.asarray(img, np.float64)
    g_row = np.zeros_like(img)
    g_col = np.zeros_like(img)
    g_row[1:-1, :] = img[2:, :] - img[:-2, :]
    g_col[:, 1:-1] = img[:, 2:] - img[:, :-2]
    magnitude = np.hypot(g_col, g_row)
    orientation = np.rad2deg(np.arctan2(g_row, g_col)) % 180
    n_cr, n_cc = img.shape[0] // cell, img.shape[1] // cell
    if n_cr < block or n_cc < block:
        raise ValueError(f"HOG needs maps of at least {block * cell}x{block * cell} pixels, got {img.shape}")
    width = 180.0 / orientations
    bins = np.minimum((orientation // width).astype(int), orientations - 1)
    mag = magnitude[:n_cr * cell, :n_cc * cell].reshape(n_cr, cell, n_cc, cell)
    bin_ = bins[:n_cr * cell, :n_cc * cell].reshape(n_cr, cell, n_cc, cell)
    hist = np.stack([np.where(bin_ == i, mag, 0.0).sum(axis=(1, 3)) for i in range(orientations)], axis=-1)
    hist /= cell * cell
    n_br, n_bc = n_cr - block + 1, n_cc - block + 1
    blocks = np.empty((n_br, n_bc, block, block, orientations))
    for r in range(n_br):
        for c in range(n_bc):
            v = hist[r:r + block, c:c + block]
            v = v / np.sqrt((v * v).sum() + eps * eps)
            v = np.minimum(v, 0.2)
            blocks[r, c] = v / np.sqrt((v * v).sum() + eps * eps)
    return blocks.ravel()


def hog_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the two maps' HOG features (the paper's fourth measure)."""
    a, b = _check(a, b)
    return pearson(hog(a), hog(b))


FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "spearman": spearman, "spearman_abs": spearman_abs, "ssim": ssim, "hog": hog_pearson,
}


def compare(raw_a: np.ndarray, raw_b: np.ndarray, map_a: np.ndarray, map_b: np.ndarray) -> dict[str, float]:
    """All four measures: rank correlations on the signed maps, SSIM and HOG on the [0, 1] maps.

    Rank correlations use the method's own (possibly signed) output, where "with absolute
    values" means something; SSIM and HOG compare images, so they take the normalised
    maps a user looks at.
    """
    map_a, map_b = _at_least(map_a, MIN_SIDE), _at_least(map_b, MIN_SIDE)
    return {"spearman": spearman(raw_a, raw_b), "spearman_abs": spearman_abs(raw_a, raw_b),
            "ssim": ssim(map_a, map_b), "hog": hog_pearson(map_a, map_b)}


MIN_SIDE = 24   # HOG's 3x3 blocks of 8 px cells; SSIM's window is 11 px


def _at_least(m: np.ndarray, side: int) -> np.ndarray:
    """Small maps (a 16x16 input) are upsampled for SSIM and HOG, whose windows need `side` pixels."""
    h, w = np.shape(m)
    if min(h, w) >= side:
        return m
    from ..postprocess import resize

    k = side / min(h, w)
    return resize(np.asarray(m, np.float32), (int(np.ceil(h * k)), int(np.ceil(w * k))))
