"""CLI command `convert` (registered on the main app by onnxsal.cli); frameworks are imported only when it runs.

    onnxsal convert keras MODEL(.keras|.h5|SavedModel folder) -o out.onnx [--preprocess tf] [--labels f.txt]
    onnxsal convert torch module.py:factory --input-shape 1,3,224,224 -o out.onnx [--preprocess imagenet]
"""

from __future__ import annotations

from typing import Optional

import typer


convert_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Convert a Keras or PyTorch model to ONNX with onnxsal's metadata.")

PREPROCESS_HELP = "preset stored in the file: imagenet, caffe, tf, unit, raw (explain then needs no flag)"


def _report(result, output: str) -> None:
    from onnxsal.cli import out

    check = f"; ONNX Runtime vs framework: {result.check:.2g} (relative)" if result.check is not None else ""
    out.print(f"wrote {output} in {result.seconds:.1f}s{check}")
    if result.layers:
        names = list(result.layers)
        shown = ", ".join(names if len(names) <= 6 else names[:3] + ["..."] + names[-2:])
        out.print(f"  layers    {len(names)} mapped to ONNX tensors ({shown}); use them with --layer")
    for note in result.notes:
        out.print(f"  note: {note}", style="dim")


@convert_app.command("keras")
def keras_command(
    model: str = typer.Argument(..., help=".keras or .h5 file, or a TensorFlow SavedModel folder"),
    output: str = typer.Option(..., "--output", "-o", help="ONNX file to write"),
    preprocess: Optional[str] = typer.Option(None, help=PREPROCESS_HELP),
    mean: Optional[str] = typer.Option(None, help="per-channel mean after scaling, e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, help="per-channel std"),
    scale: Optional[float] = typer.Option(None, help="pixel scale before mean/std, e.g. 0.00392"),
    bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="channel order the model expects"),
    labels: Optional[str] = typer.Option(None, help="text file with one label per line, or a,b,c"),
    input_shape: Optional[str] = typer.Option(None, help="H,W,C for models without a fixed input shape"),
    opset: int = typer.Option(17, help="ONNX opset (17 or newer)"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="map Keras layer names to ONNX tensors"),
    check: bool = typer.Option(True, "--check/--no-check", help="compare ONNX Runtime with TensorFlow on a random input"),
) -> None:
    """Keras (.keras, legacy .h5) or SavedModel -> ONNX via tf2onnx, NHWC input with a dynamic batch."""
    from .keras import convert

    result = convert(model, output, preprocess=preprocess, mean=mean, std=std,
                     scale=scale, bgr=bgr, labels=labels, input_shape=input_shape,
                     opset=opset, layers=layers, check=check)
    _report(result, output)


@convert_app.command("torch")
def torch_command(
    factory: str = typer.Argument(..., help="module.py:factory or package.module:factory returning a torch.nn.Module"),
    output: str = typer.Option(..., "--output", "-o", help="ONNX file to write"),
    input_shape: str = typer.Option(..., help="example input shape N,C,H,W, e.g. 1,3,224,224"),
    preprocess: Optional[str] = typer.Option(None, help=PREPROCESS_HELP),
    mean: Optional[str] = typer.Option(None, help="per-channel mean after scaling, e.g. 0.485,0.456,0.406"),
    std: Optional[str] = typer.Option(None, help="per-channel std"),
    scale: Optional[float] = typer.Option(None, help="pixel scale before mean/std, e.g. 0.00392"),
    bgr: Optional[bool] = typer.Option(None, "--bgr/--rgb", help="channel order the model expects"),
    labels: Optional[str] = typer.Option(None, help="text file with one label per line, or a,b,c"),
    opset: int = typer.Option(17, help="ONNX opset (17 or newer)"),
    layers: bool = typer.Option(True, "--layers/--no-layers", help="map module names to ONNX tensors"),
    check: bool = typer.Option(True, "--check/--no-check", help="compare ONNX Runtime with PyTorch on a random input"),
) -> None:
    """PyTorch module -> ONNX via torch.onnx.export, with a dynamic batch."""
    from .torch import convert, load_factory

    module = load_factory(factory)
    result = convert(module, output, input_shape=input_shape, preprocess=preprocess,
                     mean=mean, std=std, scale=scale, bgr=bgr,
                     labels=labels, opset=opset, layers=layers, check=check, source=factory)
    _report(result, output)


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.add_typer(convert_app, name="convert")
