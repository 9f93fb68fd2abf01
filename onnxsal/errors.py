"""Typed errors: every failure a user can cause maps to one of these.

The CLI turns any ``OnnxsalError`` into one readable line and a non-zero exit,
so the message must stand on its own: say what was wrong and what to do.
"""

from __future__ import annotations


class OnnxsalError(Exception):
    """Base of every error onnxsal raises on purpose."""


class MissingFileError(OnnxsalError, FileNotFoundError):
    """A path the user gave does not exist."""


class ModelError(OnnxsalError):
    """The model file is not ONNX, is corrupt, or cannot be explained as an image model."""


class ImageError(OnnxsalError):
    """The image cannot be read or does not fit the model's input."""


class SizeError(ModelError):
    """The model's input size is dynamic and nothing says which size to use."""


class MethodError(OnnxsalError):
    """Unknown method name or bad method options."""


class LayerError(OnnxsalError):
    """Unknown layer, or a layer-based method on a model without conv layers."""


class TargetError(OnnxsalError):
    """Target class out of range or unknown label."""


class UnsupportedOpError(OnnxsalError):
    """The autodiff has no rule for an op on the path from the input to the score."""

    def __init__(self, op_type: str, node_name: str, where: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        self.where = where
        msg = f"cannot differentiate op {op_type!r} (node {node_name!r})"
        if where:
            msg += f" {where}"
        super().__init__(msg)


class OpsetTooOldError(UnsupportedOpError):
    """A rule's backward needs an op form of a later opset than the model's (a scatter that adds
    repeated indices: opset 16). The autodiff then upgrades the model and builds again."""

    def __init__(self, op_type: str, node_name: str, where: str, opset: int) -> None:
        self.opset = opset
        super().__init__(op_type, node_name, where)


class OutputError(OnnxsalError):
    """A result cannot be written where the user asked (a folder that cannot be made, no permission,
    a full disk)."""


class DeviceError(OnnxsalError):
    """The requested execution device is not available."""


class ConversionError(OnnxsalError):
    """A framework model could not be converted to ONNX."""
