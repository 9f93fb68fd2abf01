"""Draw maps over images with matplotlib colormaps (jet by default, as users know it)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

MIN_PANEL = 320  # small inputs (a 64x64 image) are drawn larger so the map is readable


def check_style(cmap: str, alpha: float = 0.5) -> None:
    """Refuse a colormap matplotlib does not know, or an opacity outside [0, 1], before any work:
    matplotlib's own errors come late (at the first figure) and span several lines."""
    import matplotlib

    from .errors import OutputError

    if not isinstance(cmap, str) or cmap not in matplotlib.colormaps:
        common = ("jet", "viridis", "inferno", "magma", "turbo", "gray", "hot", "coolwarm", "RdBu")
        known = ", ".join(n for n in common if n in matplotlib.colormaps)
        raise OutputError(f"unknown colormap {cmap!r}; matplotlib's include {known} (and each with _r, reversed)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) or not 0 <= alpha <= 1:
        raise OutputError(f"alpha is the overlay's opacity, between 0 and 1, not {alpha!r}")


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
    for ax, m, title in zip(axes, maps, titles):
        if image is not None:
            ax.imshow(image)
            ax.imshow(m, cmap=cmap, alpha=alpha, vmin=0, vmax=1)
        else:
            ax.imshow(m, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.88, top=0.92, bottom=0.02, wspace=0.03)
    cax = fig.add_axes((0.9, 0.08, 0.025, 0.8))
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), cax=cax)  # opaque, unlike the overlay
    fig.savefig(path, dpi=dpi)
