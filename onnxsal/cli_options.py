"""Options every command that loads a model and runs methods shares (explain, sanity, evaluate).

Declared once so the flags, defaults and help read the same everywhere. This module imports
nothing from the CLI, so command modules outside cli.py can use it without an import cycle.
"""

from __future__ import annotations

import typer

TARGET = typer.Option(None, "--target", "-t", help="class index or label (default: the top class)")
LAYER = typer.Option(None, "--layer", "-l", help="layer tensor, node or framework layer name for CAM methods")
LAYERS = typer.Option([], "--layer", "-l", help="layer tensor, node or framework layer name for CAM methods; "
                      "repeat it to average a CAM over several layers, as pytorch-grad-cam's target_layers")

SCORE = typer.Option("logit", help="logit (final softmax/sigmoid removed) or probability")
OPTION = typer.Option([], "--option", "-O", help="method option key=value, e.g. -O window=16")
REGION = typer.Option("won", "--region", help="per-pixel outputs: the pixels a class target scores: won (those "
                      "the class wins), peak (its highest pixel: a keypoint heatmap's) or all")
LIKE = typer.Option(None, "--like", help="reference image (or .npy of its output vector): score = cosine "
                    "similarity of each image's output to it (embedding models)")
HEAD = typer.Option(None, "--head", help="the model output to score, for models with several "
                    "(default: the first floating-point one)")
FEED = typer.Option([], "--feed", help="a model input besides the image, held at a value: NAME=1.5,2 or NAME=file.npy; "
                    "repeatable")
OUT_DIR = typer.Option("out", "--out", "-o", help="output folder")
PREPROCESS = typer.Option(None, help="preset: imagenet, caffe, tf, unit, raw (overrides metadata)")
MEAN = typer.Option(None, help="per-channel mean, e.g. 0.485,0.456,0.406")
STD = typer.Option(None, help="per-channel std")
SCALE = typer.Option(None, help="pixel scale applied before mean/std, e.g. 0.00392")
BGR = typer.Option(None, "--bgr/--rgb", help="channel order")
SIZE = typer.Option(None, help="input size HxW for models with a dynamic size")
LABELS = typer.Option(None, help="text file with one label per line, or a,b,c")
DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N")
BATCH_SIZE = typer.Option(None, help="rows per ONNX Runtime run (default: from a memory budget)")
QUIET = typer.Option(False, "--quiet", "-q", help="print nothing but errors")


def one_or_many(given: list) -> "str | list | None":
    """A repeatable option's values as the API takes them: none, one value, or the list."""
    return None if not given else given[0] if len(given) == 1 else list(given)
