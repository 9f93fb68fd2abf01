"""Turn image files into model input tensors.

Pillow decodes and resizes; a `Preprocess` spec says how pixels become
numbers. The spec travels inside the ONNX file (metadata key
``onnxsal.preprocess``), written by the converters, so ``explain`` needs no
flags for converted models.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, MissingFileError, OnnxsalError, SizeError
from .values import number, numbers, switch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# preset -> (color order, scale, mean, std); tensor = (pixels * scale - mean) / std, channels in color order
PRESETS: dict[str, tuple[str, float, tuple, tuple]] = {
    "imagenet": ("RGB", 1 / 255, IMAGENET_MEAN, IMAGENET_STD),
    "caffe": ("BGR", 1.0, CAFFE_MEAN_BGR, (1.0, 1.0, 1.0)),
    "tf": ("RGB", 1 / 127.5, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    "unit": ("RGB", 1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "raw": ("RGB", 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class Preprocess:
    """How to turn an RGB image into the model's input tensor."""

    preset: Optional[str] = "raw"
    layout: str = "NCHW"
    size: Optional[tuple] = None       # (H, W)
    color: str = "RGB"                 # RGB, BGR or L (grayscale)
    scale: float = 1.0
    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Preprocess":
        if not isinstance(name, str) or name not in PRESETS:
            raise ImageError(f"unknown preprocessing preset {name!r}; choose from {', '.join(PRESETS)}")
        color, scale, mean, std = PRESETS[name]
        spec = cls(preset=name, color=color, scale=scale, mean=tuple(mean), std=tuple(std))
        return spec.replace(**overrides)

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        data = json.loads(text)
        base = cls.from_preset(data["preset"]) if data.get("preset") in PRESETS else cls()
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in fields}
        return base.replace(**kw)

    def to_json(self) -> str:
        return json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()})

    def replace(self, **kw) -> "Preprocess":
        kw = {k: v for k, v in kw.items() if v is not None}
        for k in ("mean", "std", "size"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return dataclasses.replace(self, **kw)

    def fitted(self, layout: str, size: tuple, channels: int) -> "Preprocess":
        """The spec bound to a model's actual input: its layout, size and channel count."""
        if self.color not in ("RGB", "BGR", "L"):
            raise ImageError(f"color is RGB, BGR or L (grey), not {self.color!r}")
        if self.preset is not None and not isinstance(self.preset, str):
            raise ImageError(f"preset is a name (or None), not {self.preset!r}")
        color = self.color
        if channels == 1:
            color = "L"
        elif color == "L":
            color = "RGB"
        mean, std = numbers(self.mean, "mean", ImageError), numbers(self.std, "std", ImageError)
        _check_numbers("mean", mean, channels, zero=True)
        _check_numbers("std", std, channels, zero=False)
        scale = number(self.scale, "scale", ImageError)
        if not (np.isfinite(scale) and scale != 0):
            raise ImageError(f"scale multiplies the pixels and must be finite and non-zero, not {self.scale}")
        if channels == 1:
            mean, std = (float(np.mean(mean)),), (float(np.mean(std)),)
        return dataclasses.replace(self, layout=layout, size=tuple(size), color=color, mean=tuple(mean), std=tuple(std),
                                   scale=scale)

    def describe(self) -> str:
        name = self.preset or "custom"
        return f"{name} ({self.color}, x*{self.scale:.6g}, mean {list(self.mean)}, std {list(self.std)})"

    def to_tensor(self, image: Image.Image) -> np.ndarray:
        """(1, C, H, W) or (1, H, W, C) float32 from a PIL image (resized to the model size)."""
        img = image if image.mode == "F" else image.convert("L" if self.color == "L" else "RGB")
        if self.size is not None:
            h, w = self.size
            if img.size != (w, h):
                img = img.resize((int(w), int(h)), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
        if x.ndim == 2:
            x = x[:, :, None]
        if x.shape[2] == 1 and self.color != "L":
            x = np.repeat(x, 3, axis=2)
        if self.color == "BGR":
            x = x[:, :, ::-1]
        x = (x * np.float32(self.scale) - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x[None], dtype=np.float32)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy")


def collect_images(items: Sequence[str]) -> list[str]:
    """Files as given; folders expanded to their image files, sorted by name."""
    out: list[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise MissingFileError(f"no image files in folder {item}")
            out += found
        elif not os.path.exists(item):
            raise MissingFileError(f"image not found: {item}")
        else:
            out.append(item)
    return out


def output_names(paths: Sequence[str]) -> dict[str, str]:
    """The stem each input's outputs are named by (`run_names`), by path."""
    unique = list(dict.fromkeys(os.fspath(p) for p in paths))
    return dict(zip(unique, run_names(unique)))


def run_names(items: Sequence) -> list[str]:
    """Names no two images of one run share: a file's stem, or, where two files share one
    (``cats/001.png`` and ``dogs/001.png``), its folder and stem (``cats_001``); a prepared image's
    own name; "array" and "image" for arrays and PIL images, as `prepare` names them; numbered on a
    clash that remains (``array_2``)."""
    paths = {os.fspath(i) for i in items if isinstance(i, (str, os.PathLike))}
    shared = Counter(_stem(p) for p in paths)
    out: list[str] = []
    taken: set[str] = set()
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            path = os.fspath(item)
            own = _stem(path)
            folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
            if shared[own] > 1 and folder:
                own = f"{folder}_{own}"
        else:
            own = item.name if isinstance(item, Prepared) else "array" if isinstance(item, np.ndarray) else "image"
        chosen, k = own, 2
        while chosen in taken:
            chosen, k = f"{own}_{k}", k + 1
        taken.add(chosen)
        out.append(chosen)
    return out


def load_image(path: Union[str, os.PathLike, bytes, bytearray, BinaryIO]) -> Image.Image:
    """Decode any format Pillow reads and honour EXIF orientation; the modes as `displayable`. Besides
    a path, an encoded file's bytes or an open binary file (an upload a service holds) are read."""
    if isinstance(path, (bytes, bytearray)):
        path, what = io.BytesIO(path), "the image bytes"
    elif hasattr(path, "read"):
        what = "the image file given"
    else:
        path = what = os.fspath(path)
        if not os.path.exists(path):
            raise MissingFileError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():     # a 100-megapixel photo is an image, not an attack
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                frames = getattr(im, "n_frames", 1)
                img = ImageOps.exif_transpose(im) or im
                img = img.copy()
    except Image.DecompressionBombError as exc:
        raise ImageError(f"cannot read {what}: {str(exc).rstrip('.')} (Pillow's guard); downscale it first") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        detail = str(exc) if isinstance(path, str) else str(exc).split(" <_io.")[0]   # no object address
        raise ImageError(f"cannot read {what} as an image ({type(exc).__name__}: {detail[:80]})") from exc
    img = displayable(img, what)
    img.info["frames"] = frames          # an animation or a stack: its first frame is read
    return img


def displayable(img: Image.Image, what: str = "the image") -> Image.Image:
    """RGB, L, or F on the 0-255 scale: alpha flattened onto white (``info["flattened"]`` says when
    a pixel was transparent at all), greyscale with alpha still greyscale, deep greyscale as
    `_grey_levels`."""
    if img.mode.startswith(("I", "F")):
        return _grey_levels(img, what)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        grey = img.mode == "LA"
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("L" if grey else "RGB")
        img.info["flattened"] = rgba.getchannel("A").getextrema()[0] < 255
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    return img


def _grey_levels(img: Image.Image, what: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as an ``F`` image on the 0-255 scale.

    Pillow's own ``convert`` clips these modes to 255 instead of scaling them, which would turn
    a 16-bit X-ray into a white square; ``F`` keeps the extra depth through the resize. Only a
    range that says its own scale is taken: 0-65535 for integers, 0-1 for floats.
    """
    levels = np.asarray(img, dtype=np.float64)
    lo, hi = (float(levels.min()), float(levels.max())) if levels.size else (0.0, 0.0)
    if img.mode == "F":
        full = 1.0
    elif img.mode.startswith("I;16") or (lo >= 0 and hi <= 65535):
        full = 65535.0
    else:
        full = None
    if full is None or not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > full:
        kind = "floating-point" if img.mode == "F" else "32-bit integer"
        want = "0 to 1" if img.mode == "F" else "0 to 65535"
        raise ImageError(f"{what} is a {kind} image with values from {lo:g} to {hi:g}, outside {want}, so its "
                         "brightness scale is unknown; save it as an 8- or 16-bit image or give a preprocessed .npy")
    return Image.fromarray((levels * (255.0 / full)).astype(np.float32), mode="F")


@dataclass
class Prepared:
    """One input ready for the model, with what is needed to draw results on it."""

    tensor: np.ndarray                 # (1, ...) in the model's layout
    display: Optional[np.ndarray]      # uint8 (h, w, 3) at the original size, for overlays
    name: str                          # stem used for output files
    notes: list = field(default_factory=list)


def read_npy(path: str, what: str, error: type) -> np.ndarray:
    """A .npy file's array (no pickles); a missing file or unreadable data is a one-line `error`.

    The header is read first: without it ``np.load`` takes any other file for a pickle and
    answers with advice about ``allow_pickle``, which misleads for a PNG given by mistake."""
    if not os.path.exists(path):
        raise MissingFileError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if head != b"\x93NUMPY":
            kind = "a .npz archive (save one array with np.save)" if head.startswith(b"PK") else \
                "not a .npy file (no NumPy header)"
            raise error(f"cannot read {what} {path}: it is {kind}")
        return np.load(path, allow_pickle=False)
    except OnnxsalError:
        raise
    except Exception as exc:
        raise error(f"cannot read {what} {path} as a NumPy array: {type(exc).__name__}: {exc}") from exc


def prepare(source: Union[str, os.PathLike, bytes, BinaryIO, np.ndarray, Image.Image], spec: Optional[Preprocess], *,
            layout: str, channels: int, size: tuple) -> Prepared:
    """Load an image file (by path, bytes or open file), a PIL image, or an already preprocessed array
    into model input."""
    notes: list[str] = []
    encoded = isinstance(source, (bytes, bytearray)) or hasattr(source, "read")   # an upload's bytes or file
    if not encoded and not isinstance(source, (str, os.PathLike, np.ndarray, Image.Image)):
        if not hasattr(source, "__array__"):      # a torch or JAX tensor, a TF eager tensor: NumPy reads them
            raise ImageError(f"an input is an image file's path, bytes or open file, a PIL image or an array, "
                             f"not {type(source).__name__}")
        source = np.asarray(source)
    if isinstance(source, np.ndarray) and source.size == 0:
        raise ImageError(f"array input is empty (shape {source.shape})")
    if isinstance(source, (str, os.PathLike)) and os.fspath(source).endswith(".npy"):
        path = os.fspath(source)
        arr = read_npy(path, "input", ImageError)
        return Prepared(_check_array(arr, layout, channels, size), None, _stem(path), ["input taken as already preprocessed"])
    if isinstance(source, np.ndarray) and source.dtype == np.uint8:
        # an image's pixels, as np.asarray(Image.open(...)) gives them (a batch of one too): taken as-is
        # they would feed 0-255 to a float model (silently, when it is channels-last and of the same size)
        pixels = source[0] if source.ndim == 4 and len(source) == 1 else source
        # with alpha too (RGBA, grey + alpha), unless the model itself takes that many channels
        alpha = pixels.ndim == 3 and pixels.shape[2] in (2, 4) and pixels.shape[2] != channels
        if pixels.ndim == 2 or pixels.ndim == 3 and pixels.shape[2] in (1, 3) or alpha:
            source = Image.fromarray(pixels[:, :, 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
            notes.append("took the uint8 (H, W[, C]) array as an image's pixels")
    if isinstance(source, np.ndarray):
        return Prepared(_check_array(source, layout, channels, size), None, "array", notes)
    if channels not in (1, 3):
        raise ImageError(f"this model takes {channels} channels and an image file gives 1 or 3; give the input "
                         f"as a preprocessed .npy (or array) of shape {_wanted(layout, channels, size)}")
    if isinstance(source, Image.Image):
        img, name = displayable(source), "image"
    else:
        img, name = load_image(source), "image" if encoded else _stem(os.fspath(source))
        if img.info.get("frames", 1) > 1:
            notes.append(f"read the first of the image's {img.info['frames']} frames")
    if spec is None:
        raise ImageError("the model carries no preprocessing metadata; give --preprocess (imagenet, caffe, tf, unit, raw) "
                         "or explicit --mean/--std/--scale")
    grey = img.mode in ("L", "F")
    if img.info.get("flattened"):
        notes.append("flattened the image's transparent pixels onto white")
    if img.mode == "F":
        notes.append("read the image's full depth and scaled it to 0-255")
    if channels == 1 and not grey:
        notes.append("converted the RGB image to grayscale for this 1-channel model")
    elif channels == 3 and grey:
        notes.append("converted the grayscale image to RGB for this 3-channel model")
    display = np.asarray((img.convert("L") if img.mode == "F" else img).convert("RGB"), dtype=np.uint8)
    return Prepared(spec.to_tensor(img), display, name, notes)


def _check_numbers(name: str, values: Sequence[float], channels: int, zero: bool) -> None:
    """A mean or std fits the model's channels (one value each, or one for all; three, the presets'
    count, for a grey model, which takes their average) and holds finite values (a std also
    non-zero)."""
    fits = len(values) in (1, 3, channels)
    ok = all(np.isfinite(v) and (zero or v != 0) for v in values)
    if not fits or not ok:
        what = "finite" if zero else "finite, non-zero"
        raise ImageError(f"{name} must hold {what} values, one per channel ({channels}) or one for all, "
                         f"not {list(values)}")


def _stem(path: str) -> str:
    base = os.path.basename(path)
    return base.rsplit(".", 1)[0] if "." in base else base


def _wanted(layout: str, channels: int, size: tuple) -> tuple:
    h, w = size
    return (1, channels, h, w) if layout == "NCHW" else (1, h, w, channels)


def _check_array(arr: np.ndarray, layout: str, channels: int, size: tuple) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise ImageError(f"array input has dtype {arr.dtype}; expected numbers")
    want = _wanted(layout, channels, size)[1:]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim == 4 and arr.shape[0] > 1 and tuple(arr.shape[1:]) == want:
        raise ImageError(f"array input holds a batch of {arr.shape[0]} images; explain takes one (1, "
                         f"{', '.join(map(str, want))}) (in Python, explain_batch takes a batch)")
    if arr.ndim != 4 or arr.shape[0] != 1 or tuple(arr.shape[1:]) != want:
        raise ImageError(f"array input has shape {tuple(np.shape(arr))}; the model takes (1, {', '.join(map(str, want))}) ({layout})")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():      # a NaN pixel would give a NaN score, and a map read from nothing
        raise ImageError(f"array input holds {int(np.sum(~np.isfinite(out)))} NaN or infinite values")
    return out


def parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    try:
        parts = [int(p) for p in text.lower().replace(",", "x").split("x")]
    except ValueError:
        raise SizeError(f"--size must look like 224x224, not {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise SizeError(f"--size must look like 224x224, not {text!r}")
    return parts[0], parts[1]


def make_spec(preset: Optional[str] = None, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              scale: Optional[float] = None, bgr: Optional[bool] = None, base: Optional[Preprocess] = None) -> Optional[Preprocess]:
    """Combine metadata (`base`) with user overrides; None when nothing is known. The overrides are
    read as the CLI writes them too ('0.5,0.4,0.3'), and anything else is an ImageError."""
    mean, std = numbers(mean, "mean", ImageError), numbers(std, "std", ImageError)
    scale, bgr = number(scale, "scale", ImageError), switch(bgr, "bgr", ImageError)
    spec = Preprocess.from_preset(preset) if preset else base
    if spec is None and any(v is not None for v in (mean, std, scale, bgr)):
        spec = Preprocess.from_preset("raw")
    if spec is None:
        return None
    color = None if bgr is None else ("BGR" if bgr else "RGB")
    return spec.replace(mean=mean, std=std, scale=scale, color=color, preset=spec.preset if preset is None and mean is None and std is None and scale is None else (preset or "custom"))
