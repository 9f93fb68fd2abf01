"""Draw maps over images with matplotlib colormaps (jet by default, as users know it)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

import matplotlib

matplotlib.use("Agg")
from matplotlib import colormaps  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .postprocess import resize  # noqa: E402

MIN_PANEL = 320  # small inputs (a 64x64 image) are drawn larger so the map is readable


def colorize(map01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) in [0, 1] -> uint8 RGB."""
    rgba = colormaps[cmap](np.clip(map01, 0, 1))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, map01: np.ndarray, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """Blend a colorized map onto a uint8 RGB image of the same size."""
    heat = colorize(map01, cmap).astype(np.float32)
    out = (1 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(out, 0, 255).astype(np.uint8)


def save_overlay(path: str, image: Optional[np.ndarray], maps: np.ndarray, titles: Sequence[str],
                 cmap: str = "jet", alpha: float = 0.5) -> None:
    """One panel per map (the image with the map over it) and a shared colorbar, saved as PNG."""
    maps = np.asarray(maps)
    if maps.ndim == 2:
        maps = maps[None]
    k, h, w = maps.shape
    scale = max(1.0, MIN_PANEL / max(h, w))
    dpi = 100
    panel_w, panel_h = w * scale / dpi, h * scale / dpi
    fig = Figure(figsize=(panel_w * k + 0.9, panel_h + 0.45), dpi=dpi)
    axes = fig.subplots(1, k, squeeze=False)[0]
    im = None
    for ax, m, title in zip(axes, maps, titles):
        if image is not None:
            ax.imshow(image)
            im = ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        else:
            im = ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.88, top=0.92, bottom=0.02, wspace=0.03)
    cax = fig.add_axes((0.9, 0.08, 0.025, 0.8))
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax)  # opaque, unlike the overlay
    fig.savefig(path, dpi=dpi)


def side_by_side(path: str, image: Optional[np.ndarray], rows: Sequence[tuple[str, np.ndarray]], cmap: str = "jet") -> None:
    """A grid: one row per method, one column per map (used by the sanity check figure)."""
    n_rows = len(rows)
    n_cols = max(len(m) for _, m in rows)
    fig = Figure(figsize=(1.8 * n_cols + 0.8, 1.9 * n_rows), dpi=100)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for r, (label, maps) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c < len(maps):
                m = maps[c]
                if image is not None:
                    ax.imshow(image)
                    ax.imshow(resize(m[None], image.shape[:2])[0], cmap=cmap, alpha=0.5, vmin=0, vmax=1)
                else:
                    ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
        axes[r][0].text(-0.08, 0.5, label, transform=axes[r][0].transAxes, rotation=90, va="center", ha="right", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
