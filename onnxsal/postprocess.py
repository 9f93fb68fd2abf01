"""Shared map post-processing: resize, smooth, normalise.

Resizing and smoothing are done with small dense matrices applied on both
sides of the map (rows then columns). That is exact half-pixel bilinear
interpolation (what PyTorch's ``interpolate(align_corners=False)`` and ONNX
``Resize`` do), batches over many maps at once, and needs no SciPy/OpenCV.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np


@lru_cache(maxsize=64)
def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) half-pixel linear interpolation weights, edges clamped."""
    m = np.zeros((n_out, n_in), np.float32)
    if n_in == 1:
        m[:, 0] = 1.0
        return m
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)
    return m


def resize(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., h, w) maps to (..., H, W)."""
    h, w = maps.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return maps.astype(np.float32, copy=False)
    mh, mw = interp_matrix(H, h), interp_matrix(W, w)
    return np.einsum("Hh,...hw,Ww->...HW", mh, maps.astype(np.float32), mw, optimize=True)


@lru_cache(maxsize=32)
def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur operator, truncated at 4 sigma, edges replicated."""
    radius = max(1, int(4 * sigma + 0.5))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    m = np.zeros((n, n), np.float32)
    for i in range(n):
        idx = np.clip(i + offsets, 0, n - 1)
        np.add.at(m[i], idx, kernel)
    return m


def smooth(maps: np.ndarray, sigma: Optional[float]) -> np.ndarray:
    if not sigma or sigma <= 0:
        return maps
    h, w = maps.shape[-2:]
    gh, gw = gaussian_matrix(h, float(sigma)), gaussian_matrix(w, float(sigma))
    return np.einsum("Hh,...hw,Ww->...HW", gh, maps, gw, optimize=True)


def normalize(maps: np.ndarray) -> np.ndarray:
    """Min-max each map to [0, 1]; a constant map becomes zeros (nothing stands out)."""
    maps = np.asarray(maps, np.float32)
    flat = maps.reshape(maps.shape[0], -1) if maps.ndim > 2 else maps.reshape(1, -1)
    lo = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - lo
    out = np.where(span > 0, (flat - lo) / np.where(span > 0, span, 1), 0.0)
    return out.reshape(maps.shape).astype(np.float32)


def finish(raw: np.ndarray, input_size: tuple[int, int], sigma: Optional[float] = None) -> np.ndarray:
    """Raw (T, h, w) maps -> (T, H, W) in [0, 1] at the model's input size."""
    return normalize(smooth(resize(raw, input_size), sigma))
