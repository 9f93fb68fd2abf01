"""PyTorch modules -> explainable ONNX, through torch.onnx.export (the TorchScript exporter).

Why the TorchScript exporter: in torch 2.13 the default (dynamo) exporter needs
onnxscript, one more pinned dependency, and gains nothing for the feed-forward
image models onnxsal explains.

The layer map comes from forward hooks: a probe run finds every submodule whose
output is a 4-D tensor; the exported wrapper returns a clone of each as an extra
output, so the exporter keeps that tensor (a Conv is not fused with the
BatchNorm after it when you may want the conv's output) and `strip_outputs`
learns its ONNX name. The clone matters for in-place ops: torchvision's
``ReLU(inplace=True)`` overwrites the BatchNorm output it consumes, and the
hook must see the value the module returned, as pytorch-grad-cam's hooks do.
A module called several times (a shared ReLU) maps to its last call.

PyTorch is imported only inside these functions.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import sys
import time
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx

from onnxsal.errors import ConversionError, MissingFileError
from onnxsal.model import read_labels
from onnxsal.graph.normalize import dilated_same_convs
from onnxsal.outputs import check_model_path

from . import metadata

OPSET = 17
LAYER_PREFIX = "onnxsal_layer:"
PACKAGES = ("torch", "onnx", "numpy")


def import_torch():
    try:
        import torch
    except ImportError as exc:
        raise ConversionError("converting PyTorch models needs torch: pip install 'onnxsal[torch]'") from exc
    return torch


def load_factory(spec: str):
    """The module named by "path/to/file.py:factory" or "package.module:factory".

    `factory` may be a module instance, a class or a function; classes and functions
    are called with no arguments. Dotted attributes (``models:resnet.make``) work.
    """
    torch = import_torch()
    if ":" not in spec:
        raise ConversionError(f"expected module.py:factory or package.module:factory, not {spec!r}")
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py") or os.path.sep in where:
        if not os.path.exists(where):
            raise MissingFileError(f"module file not found: {where}")
        folder = os.path.dirname(os.path.abspath(where))
        name = "onnxsal_factory_" + os.path.splitext(os.path.basename(where))[0]
        loader = importlib.util.spec_from_file_location(name, where)
        mod = importlib.util.module_from_spec(loader)  # type: ignore[arg-type]
        sys.path.insert(0, folder)  # so the file can import its neighbours
        try:
            loader.loader.exec_module(mod)  # type: ignore[union-attr]
        except Exception as exc:
            raise ConversionError(f"importing {where} failed: {type(exc).__name__}: {metadata.first_line(exc)}") from exc
        finally:
            sys.path.remove(folder)
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as exc:
            raise ConversionError(f"cannot import {where}: {metadata.first_line(exc)}") from exc
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConversionError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise ConversionError(f"{spec} is neither a torch.nn.Module nor a function returning one")
        try:
            obj = obj()
        except Exception as exc:
            raise ConversionError(f"calling {spec}() failed: {type(exc).__name__}: {metadata.first_line(exc)}") from exc
    if not isinstance(obj, torch.nn.Module):
        raise ConversionError(f"{spec} returned {type(obj).__name__}, not a torch.nn.Module")
    return obj


def _shape(input_shape: Optional[Sequence[int]]) -> tuple:
    if input_shape is None:
        raise ConversionError("give the example input shape, e.g. --input-shape 1,3,224,224")
    dims = tuple(metadata.numbers(input_shape, "--input-shape", int))
    if len(dims) == 3:
        dims = (1,) + dims
    if len(dims) != 4 or min(dims) <= 0:
        raise ConversionError(f"--input-shape takes N,C,H,W, not {','.join(map(str, dims))}")
    return dims


def _module_dtype(torch, module):
    """The floating type the module computes in: its first floating parameter's (or buffer's), so a
    ``module.half()`` is traced and checked on float16 inputs, not refused for a float32 example."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _first_tensor(torch, out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ConversionError(f"the module returns {type(out).__name__}; onnxsal needs a tensor of scores")


class _Capture:
    """Forward hooks that keep a clone of each named module's latest 4-D output."""

    def __init__(self, torch, module, names: Optional[list[str]] = None) -> None:
        self.torch = torch
        self.values: dict[str, Any] = {}
        self.handles = []
        wanted = set(names) if names is not None else None
        for name, sub in module.named_modules():
            if name and (wanted is None or name in wanted):
                self.handles.append(sub.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, self.torch.Tensor) and output.dim() == 4:
                self.values[name] = output.clone()
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _wrapper(torch, module, names: list[str]):
    """A module returning (scores, *layer outputs) for the export."""

    class Wide(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.capture = _Capture(torch, module, names)

        def forward(self, x):
            self.capture.values.clear()
            y = _first_tensor(torch, self.inner(x))
            return (y,) + tuple(self.capture.values[n] for n in names)

    return Wide()


def _unwrap_names(graph: onnx.GraphProto) -> None:
    """Drop the wrapper's "/inner" scope from node and tensor names, so they read as the user's module."""
    def fix(name: str) -> str:
        return "/" + name[len("/inner/"):] if name.startswith("/inner/") else name

    for node in graph.node:
        node.name = fix(node.name)
        node.input[:] = [fix(i) for i in node.input]
        node.output[:] = [fix(o) for o in node.output]
    for vi in list(graph.value_info) + list(graph.output):
        vi.name = fix(vi.name)


def _probe(torch, module, example) -> list[str]:
    """Names of submodules whose (last) output on `example` is 4-D, in the order they first ran."""
    cap = _Capture(torch, module)
    try:
        with torch.no_grad():
            module(example)
    finally:
        cap.remove()
    return list(cap.values)


def _newest_opset(torch: Any) -> int:
    """The newest opset torch.onnx's TorchScript exporter writes (20 in torch 2.13 and 2.14)."""
    try:
        from torch.onnx import _constants

        return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):    # a private module: a later torch may move it
        return 20


def convert(module, output: Union[str, os.PathLike, None] = None, *, input_shape: Sequence[int],
            preprocess: Optional[str] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, scale: Optional[float] = None, bgr: Optional[bool] = None,
            labels: Union[str, Sequence[str], None] = None, opset: int = OPSET, layers: bool = True,
            check: bool = True, check_inputs: Optional[np.ndarray] = None, source: Optional[str] = None) -> metadata.Conversion:
    """Convert a torch.nn.Module to ONNX with a dynamic batch and onnxsal's metadata; write `output` if given.

    The module is put in eval mode. The conversion fails if ONNX Runtime and PyTorch
    differ by more than 1e-4 (relative to the output's scale) on a random batch of two
    plus `check_inputs`.
    """
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise ConversionError(f"expected a torch.nn.Module, not {type(module).__name__}")
    opset = metadata.check_opset(opset, _newest_opset(torch), "torch.onnx's TorchScript exporter")
    if output is not None:
        check_model_path(output)                # before the conversion, which can take a minute
    start = time.perf_counter()
    shape = _shape(input_shape)
    if shape[1] in (1, 3):
        layout, channels, size = "NCHW", shape[1], shape[2:]
    elif shape[3] in (1, 3):
        layout, channels, size = "NHWC", shape[3], shape[1:3]
    else:
        raise ConversionError(f"input shape {shape} has no 1- or 3-channel axis; onnxsal explains images")
    spec = metadata.preprocess_spec(preprocess, mean, std, scale, bgr, layout=layout, size=size, channels=channels)
    label_list = read_labels(labels)
    module.eval()
    gen = torch.Generator().manual_seed(0)
    dtype = _module_dtype(torch, module)
    example = torch.randn(shape, generator=gen).to(dtype)
    notes: list[str] = []

    try:
        names = _probe(torch, module, example) if layers else []
    except Exception as exc:          # the module's own forward pass, on the example input
        raise ConversionError(f"the module fails on an input of shape {tuple(shape)}: {type(exc).__name__}: "
                              f"{metadata.first_line(exc)}") from exc
    wide = _wrapper(torch, module, names).eval()  # a train-mode wrapper would put the module back in train mode
    extra = {LAYER_PREFIX + n: n for n in names}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), metadata.quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(wide, (example,), buffer, dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"] + list(extra),
                              dynamic_axes={"input": {0: metadata.BATCH}, "output": {0: metadata.BATCH}},
                              do_constant_folding=True)
    except Exception as exc:
        raise ConversionError(f"torch.onnx.export failed: {type(exc).__name__}: {metadata.first_line(exc)}") from exc
    finally:
        wide.capture.remove()
    # torch.onnx writes nn.Conv2d(padding="same", dilation=2) as auto_pad=SAME_UPPER, which ONNX Runtime refuses
    proto = dilated_same_convs(onnx.load_from_string(buffer.getvalue()))
    del buffer
    _unwrap_names(proto.graph)
    found, skipped = metadata.strip_outputs(proto, extra, channels_last=False)
    if skipped:
        notes.append(f"no tensor left for modules {metadata.some_names(skipped)}; they are left out of the layer map")
    metadata.finish_graph(proto, label_list)
    half, _ = metadata.settle_precision(proto, notes)

    diff = None
    if check:
        x = torch.randn((2,) + shape[1:], generator=gen).numpy()
        if spec is not None:
            x = np.clip(x, -2.5, 2.5)  # roughly the range of normalised pixels
        x = metadata.with_check_inputs(x, check_inputs, np.float32)
        with torch.no_grad():
            want = _first_tensor(torch, module(torch.from_numpy(x).to(dtype))).float().numpy()
        diff = metadata.check_outputs(half, metadata.run_onnx(proto, x), want, "PyTorch")
    seconds = time.perf_counter() - start
    info = {
        "framework": "pytorch",
        "model": source or type(module).__name__,
        "converter": "onnxsal convert torch (torch.onnx.export, TorchScript exporter)",
        "opset": opset,
        "versions": metadata.versions(PACKAGES),
    }
    if diff is not None:
        info["check_max_rel_diff"] = float(f"{diff:.3g}")
    metadata.annotate(proto, preprocess=spec, labels=label_list, layers=found, source=info)
    path = metadata.save(proto, output) if output is not None else None
    return metadata.Conversion(proto, path, found, diff, seconds, notes)
