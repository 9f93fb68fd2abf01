"""Labels and preprocessing from the files a Hugging Face export leaves beside the model.

``optimum-cli export onnx`` (and ``save_pretrained`` next to a ``torch.onnx`` export) writes
``config.json`` (``id2label``, ``model_type``) and ``preprocessor_config.json`` (rescale factor,
mean, std, size) into the model's folder. Read from there, such a model explains without flags,
as one carrying onnxsal's own metadata does. The model's metadata and the caller's arguments win.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

from .preprocess import Preprocess

PRESET = "preprocessor_config.json"


@dataclass(frozen=True)
class Sidecar:
    preprocess: Optional[Preprocess] = None
    labels: Optional[list[str]] = None
    model_type: Optional[str] = None


def _read(folder: str, name: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, name), encoding="utf-8-sig") as f:   # JSON in UTF-8, a BOM allowed
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _labels(config: dict) -> Optional[list[str]]:
    """``id2label`` as a list, when its keys are 0..n-1 (JSON writes them as strings)."""
    raw = config.get("id2label")
    if not isinstance(raw, dict) or not raw:
        return None
    try:
        by_index = {int(k): str(v) for k, v in raw.items()}
    except (TypeError, ValueError):
        return None
    if sorted(by_index) != list(range(len(by_index))):
        return None
    return [by_index[i] for i in range(len(by_index))]


def _preprocess(proc: dict) -> Optional[Preprocess]:
    """Rescale, then normalise, as the image processor does; its fixed ``size`` when it gives one
    (a ``shortest_edge`` resize and crop is left to the model's own input size)."""
    try:
        scale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
        normalise = proc.get("do_normalize", True)
        mean = tuple(float(v) for v in proc["image_mean"]) if normalise and "image_mean" in proc else (0.0, 0.0, 0.0)
        std = tuple(float(v) for v in proc["image_std"]) if normalise and "image_std" in proc else (1.0, 1.0, 1.0)
        size = proc.get("size")
        hw = (int(size["height"]), int(size["width"])) if isinstance(size, dict) and {"height", "width"} <= set(size) \
            else None
    except (TypeError, ValueError, KeyError):
        return None
    if len(mean) != len(std) or not all(s > 0 for s in std):
        return None
    return Preprocess(preset=PRESET, color="RGB", scale=scale, mean=mean, std=std, size=hw)


def read_sidecar(model_path: str) -> Sidecar:
    """What ``config.json`` and ``preprocessor_config.json`` beside ``model_path`` say (empty when absent)."""
    if not model_path or model_path == "<memory>":
        return Sidecar()
    folder = os.path.dirname(os.path.abspath(model_path))
    config = _read(folder, "config.json") or {}
    proc = _read(folder, PRESET)
    model_type = config.get("model_type")
    return Sidecar(_preprocess(proc) if proc else None, _labels(config),
                   model_type if isinstance(model_type, str) else None)
