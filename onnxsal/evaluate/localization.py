"""Does the map point at the object? Pointing game and energy-based pointing game.

Pointing game (Zhang et al. 2016, "Top-down Neural Attention by Excitation
Backprop"): a hit when the map's maximum lies within `tolerance` pixels
(15 in the paper) of the object's mask. The tolerance is in pixels of the
original image, so maps and masks are compared at the image's own size.

Energy-based pointing game (Wang et al. 2020, Score-CAM): the share of the
map's positive energy that falls inside the mask. It uses the positive part of
the method's own map, not its min-max version, which would give every pixel
the map's minimum as a floor and count it as energy.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from ..errors import ImageError, MissingFileError
from ..preprocess import read_npy

TOLERANCE = 15
MASK_SUFFIXES = (".png", ".bmp", ".gif", ".tif", ".tiff", ".jpg", ".jpeg", ".webp", ".npy")


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, tolerance: float = TOLERANCE) -> bool:
    """True when the map's maximum is within `tolerance` pixels (Euclidean, inclusive) of a mask pixel.

    A constant map points nowhere and is a miss; ties between maxima go to the first in
    raster order, as ``argmax`` does.
    """
    saliency, mask = _check(saliency, mask)
    if not mask.any():
        raise ImageError("the mask is empty: the pointing game needs an object")
    if np.ptp(saliency) == 0:
        return False
    py, px = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
    ys, xs = np.nonzero(mask)
    d2 = (ys - py) ** 2 + (xs - px) ** 2
    return bool(np.sqrt(float(d2.min())) <= float(tolerance))


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """sum(max(map, 0) inside the mask) / sum(max(map, 0)); 0 for a map with no positive value."""
    saliency, mask = _check(saliency, mask)
    pos = np.maximum(np.asarray(saliency, np.float64), 0.0)
    total = pos.sum()
    return float(pos[mask].sum() / total) if total > 0 else 0.0


def _check(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    saliency = np.asarray(saliency)
    mask = np.asarray(mask).astype(bool)
    if saliency.shape != mask.shape:
        raise ImageError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the map is "
                         f"{saliency.shape[1]}x{saliency.shape[0]}: masks must have the image's size")
    return saliency, mask


def load_mask(path: Union[str, os.PathLike]) -> np.ndarray:
    """A binary mask from an image (brighter than half its brightest pixel, in greyscale) or a .npy array (non-zero).

    Half the brightest pixel, not a fixed 127, so that masks stored as 0/1 (as segmentation
    datasets often are) or as 16-bit 0/65535 read the same as 0/255 ones; a JPEG's
    compression noise around black stays below it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"mask not found: {path}")
    if path.endswith(".npy"):
        arr = np.squeeze(read_npy(path, "mask", ImageError))
        if arr.ndim != 2:
            raise ImageError(f"mask {path} has shape {arr.shape}; expected a 2-D array")
        return arr != 0
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            levels = np.asarray(im if im.mode.startswith(("I", "F")) else im.convert("L"), dtype=np.float64)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot read mask {path} as an image ({type(exc).__name__})") from exc
    if levels.ndim != 2 or not np.isfinite(levels).all():
        raise ImageError(f"mask {path} is not a finite greyscale image")
    top = levels.max() if levels.size else 0.0
    return levels > top / 2 if top > 0 else np.zeros(levels.shape, bool)


def find_mask(folder: Union[str, os.PathLike], name: str) -> Optional[str]:
    """The mask for image `name` (its file stem) in `folder`: same stem, any image suffix."""
    folder = os.fspath(folder)
    for suffix in MASK_SUFFIXES:
        path = os.path.join(folder, name + suffix)
        if os.path.exists(path):
            return path
    return None
