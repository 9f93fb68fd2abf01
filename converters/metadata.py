"""What every converter writes into the ONNX file, and the graph finishing they share.

A converted model must explain with no flags: `onnxsal.model.load` reads the
preprocessing, the labels and the framework-layer-name -> tensor map from the
metadata written here. The layer map is built the same way for every
framework: the converter exports each layer's output as an extra graph output
(so the exporter keeps that exact tensor alive and names it), then
`strip_outputs` removes those outputs again and remembers which tensor each
one was. No framework is imported in this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import sys
from importlib import metadata as importlib_metadata
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import onnx

from onnxsal.errors import ConversionError
from onnxsal.model import META_LABELS, META_LAYERS, META_PREPROCESS, write_proto
from onnxsal.graph.precision import LIFTED_NAMES, source_types, to_float32
from onnxsal.graph.surgery import rename_tensor
from onnxsal.preprocess import PRESETS, Preprocess, make_spec
from onnxsal.values import Numbers, number, numbers as read_numbers, switch

META_SOURCE = "onnxsal.source"
BATCH = "batch"
# ONNX-side tolerance of the conversion check: ORT vs. the framework on the same input.
CHECK_TOLERANCE = 1e-4
# The same for a graph that computes in a half type (a Keras mixed-precision policy): each side rounds
# every layer to the type's 11 (float16) or 8 (bfloat16) bits, in its own order, so a faithful
# conversion of one convolution already reads 2e-4. A converter's faults read far above both.
HALF_TOLERANCES = {onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}


def half_type(proto: onnx.ModelProto) -> Optional[int]:
    """The narrowest half type the graph computes in (weights, casts, constants), or None."""
    found = source_types(proto, proto.graph.input[0].type.tensor_type.elem_type) & set(HALF_TOLERANCES)
    return max(found, key=HALF_TOLERANCES.get) if found else None


def check_tolerance(half: Optional[int]) -> float:
    """How far ONNX Runtime may read from the framework: 1e-4, or more for a half-precision model."""
    return CHECK_TOLERANCE if half is None else HALF_TOLERANCES[half]


def check_outputs(half: Optional[int], got: np.ndarray, want: np.ndarray, framework: str) -> float:
    """The conversion check: ONNX Runtime's output `got` against the framework's `want` on the same
    input, for a model that computes in the `half` type (`half_type`) or in float32; returns their
    difference, or raises ConversionError past the tolerance.

    A converter's faults read far above the tolerance (0.27 for tf2onnx's lost padding); a value
    just above it can be float32 rounding in a network that cancels much (stacked normalisations),
    which the user may judge and convert anyway."""
    computes_in = f" for a model that computes in {LIFTED_NAMES[half]}" if half is not None else ""
    diff = compare(got, want)
    if math.isinf(diff):
        side = framework if not np.isfinite(np.asarray(want, np.float64)).all() else "ONNX Runtime"
        other = "ONNX Runtime" if side == framework else framework
        raise ConversionError(f"on the check input {side} gives NaN or infinite outputs where {other}'s are "
                              f"finite{computes_in}; --no-check (check=False) converts without the check")
    tolerance = check_tolerance(half)
    if diff > tolerance:
        raise ConversionError(f"ONNX Runtime and {framework} disagree by {diff:.3g} (relative to the output's "
                              f"scale; the check allows {tolerance:g}{computes_in}) on the check input; "
                              "--no-check (check=False) converts without it")
    return diff


@dataclass
class Conversion:
    """What a converter produced and what it found on the way."""

    proto: onnx.ModelProto
    path: Optional[str]
    layers: dict[str, str]
    check: Optional[float]           # max relative difference ONNX vs framework on the check input
    seconds: float
    notes: list[str] = field(default_factory=list)


def some_names(names: Sequence[str], shown: int = 8) -> str:
    """The first few of `names` and how many more: a ConvNeXt leaves some ninety layers unmapped,
    and a note that lists them all fills the terminal."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: framework errors can run to pages."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


def numbers(values: Numbers, what: str, kind: type = float) -> Optional[list]:
    """Numbers as the CLI writes them ('1,3,224,224', '224x224', '1 3 224 224') or as Python gives
    them (:func:`onnxsal.values.numbers`), refused as a ConversionError."""
    return read_numbers(values, what, ConversionError, kind)


def check_opset(opset: int, newest: int, exporter: str) -> int:
    """An opset from 17 to the newest the exporter writes, checked before the export: past it,
    tf2onnx warns on stderr and torch.onnx prints its whole graph on stdout before failing."""
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)):
        raise ConversionError(f"opset is a whole number, not {opset!r}")
    if opset < 17:
        raise ConversionError(f"opset {opset} is too old; onnxsal converts with opset 17 or newer")
    newest = min(newest, onnx.defs.onnx_opset_version())
    if opset > newest:
        raise ConversionError(f"opset {opset} is newer than {exporter} writes here; use 17 to {newest}")
    return int(opset)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Standard output silenced at the file descriptor for the duration: torch.onnx's C++ side
    prints the whole TorchScript graph there when an export fails, which Python's own redirection
    does not catch. Nothing onnxsal prints runs inside."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def with_check_inputs(x: np.ndarray, check_inputs: Optional[np.ndarray], dtype) -> np.ndarray:
    """The random check batch plus the user's own inputs, which must be finite and shaped like one
    example input (or a batch of them): a NaN on both sides would pass any comparison."""
    if check_inputs is None:
        return x
    extra = np.asarray(check_inputs)
    one = tuple(x.shape[1:])
    if extra.shape != one and tuple(extra.shape[1:]) != one:
        raise ConversionError(f"check_inputs have shape {extra.shape}; the example input is {one}, "
                              f"so give {one} or (N, {', '.join(map(str, one))})")
    if extra.dtype.kind not in "biuf" or not np.isfinite(extra.astype(np.float64)).all():
        raise ConversionError("check_inputs must hold finite numbers")
    return np.concatenate([x, extra.astype(dtype).reshape((-1,) + one)])


def preprocess_spec(preset: Optional[str] = None, mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None, scale: Optional[float] = None,
                    bgr: Optional[bool] = None, *, layout: str, size: Optional[Sequence[int]] = None,
                    channels: int = 3) -> Optional[Preprocess]:
    """The spec to store, or None when the user gave nothing (explain then asks for --preprocess).

    Values are checked here, at conversion, so a bad spec never reaches a file.
    """
    if preset is not None and preset not in PRESETS:
        raise ConversionError(f"unknown preprocessing preset {preset!r}; choose from {', '.join(PRESETS)}")
    mean, std = numbers(mean, "--mean"), numbers(std, "--std")
    scale = number(scale, "--scale", ConversionError)
    bgr = switch(bgr, "--bgr", ConversionError)
    spec = make_spec(preset, mean, std, scale, bgr)
    if spec is None:
        return None
    for what, values in (("mean", spec.mean), ("std", spec.std)):
        if len(values) not in (1, 3):
            raise ConversionError(f"--{what} takes 1 or 3 numbers, not {len(values)}")
    if any(v == 0 for v in spec.std):
        raise ConversionError("--std values must be non-zero")
    if not all(math.isfinite(v) for v in (*spec.mean, *spec.std, spec.scale)) or spec.scale == 0:
        raise ConversionError(f"--mean, --std and --scale must be finite, and --scale non-zero: mean "
                              f"{list(spec.mean)}, std {list(spec.std)}, scale {spec.scale}")
    spec = spec.replace(layout=layout, size=tuple(int(v) for v in size) if size else None)
    if channels == 1:
        spec = spec.replace(color="L")
    return spec


def versions(packages: Iterable[str]) -> dict[str, str]:
    """Installed versions of the packages that produced the file, for provenance."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return found


def sha256(path: Union[str, os.PathLike]) -> str:
    """Digest of a source file (a folder's files in sorted order), so a converted model names its origin."""
    digest = hashlib.sha256()
    path = os.fspath(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for name in files:
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _perm(node: onnx.NodeProto) -> Optional[list[int]]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def resolve_tensor(graph: onnx.GraphProto, tensor: str, channels_last: bool) -> Optional[str]:
    """The channels-first tensor behind an exported layer output, or None if there is none.

    Exporters hand an extra output through Identity nodes, and tf2onnx through a
    Transpose back to NHWC from the NCHW tensor it computes internally; onnxsal's
    layers are (N, C, h, w), so the tensor it wants is the one before those.
    """
    producers = _producers(graph)
    node = producers.get(tensor)
    while node is not None and node.op_type == "Identity":
        tensor = node.input[0]
        node = producers.get(tensor)
    if not channels_last:
        return tensor
    if node is not None and node.op_type == "Transpose" and _perm(node) == [0, 2, 3, 1]:
        return node.input[0]
    return None


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes, initializers and value_info that no graph output needs any more."""
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            for a in node.attribute:  # subgraphs read outer names implicitly
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(i for n in a.g.node for i in n.input)
    keep.reverse()
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    if len(inits) != len(graph.initializer):
        kept = {i.name for i in inits}
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name not in kept:
                del graph.initializer[i]
    produced = {o for n in graph.node for o in n.output}
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name not in produced:
            del graph.value_info[i]


def strip_outputs(proto: onnx.ModelProto, extra: dict[str, str], channels_last: bool) -> tuple[dict[str, str], list[str]]:
    """Remove the extra layer outputs; return ({layer name: tensor}, [layers with no usable tensor]).

    `extra` maps each extra graph-output name to the framework layer it came from.
    """
    graph = proto.graph
    layers: dict[str, str] = {}
    skipped: list[str] = []
    for out in graph.output:
        if out.name in extra:
            tensor = resolve_tensor(graph, out.name, channels_last)
            if tensor is None:
                skipped.append(extra[out.name])
            else:
                layers[extra[out.name]] = tensor
    keep = [o for o in graph.output if o.name not in extra]
    del graph.output[:]
    graph.output.extend(keep)
    prune(graph)
    # a layer whose tensor only fed its own extra output (so it was pruned) has nothing left to point at
    alive = {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    for name in [k for k, t in layers.items() if t not in alive]:
        skipped.append(name)
        del layers[name]
    # exporters may have named the tensor itself after the (now removed) output: give it the layer's name
    renamed: dict[str, str] = {}
    for layer, tensor in layers.items():
        if tensor in extra:
            if tensor not in renamed:
                new = layer if layer not in alive else f"{layer}:output"
                rename_tensor(graph, tensor, new)
                alive.add(new)
                renamed[tensor] = new
            layers[layer] = renamed[tensor]
    return layers, skipped


def name_batch(proto: onnx.ModelProto) -> None:
    """Call the leading dimension of the image input and of the outputs "batch"."""
    inits = {i.name for i in proto.graph.initializer}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        if vi.name in inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH


def annotate(proto: onnx.ModelProto, *, preprocess: Optional[Preprocess], labels: Optional[Sequence[str]],
             layers: dict[str, str], source: dict) -> None:
    """Write the onnxsal.* metadata keys (replacing any earlier ones)."""
    entries = {META_SOURCE: json.dumps(source, sort_keys=True)}
    if preprocess is not None:
        entries[META_PREPROCESS] = preprocess.to_json()
    if labels:
        entries[META_LABELS] = json.dumps(list(labels))
    if layers:
        entries[META_LAYERS] = json.dumps(layers)
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def check_labels(labels: Optional[Sequence[str]], num_classes: int) -> None:
    if labels and len(labels) != num_classes and not (num_classes == 1 and len(labels) == 2):
        raise ConversionError(f"{len(labels)} labels given but the model has {num_classes} outputs")


def finish_graph(proto: onnx.ModelProto, labels: Optional[Sequence[str]]) -> int:
    """Name the batch dimension and check the labels against the output width; returns that width."""
    name_batch(proto)
    num_classes = int(np.prod([d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:]]) or 0)
    check_labels(labels, num_classes)
    return num_classes


def _session(proto: onnx.ModelProto):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4            # its failures reach the user as ConversionError's one line
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def settle_precision(proto: onnx.ModelProto, notes: list[str]) -> tuple[Optional[int], bool]:
    """The half type the converted model computes in, for the check's tolerance (`half_type`), and
    whether the graph was lifted to float32.

    A graph in float16, bfloat16 or float64 that ONNX Runtime's CPU build does not load as it is
    (it has no bfloat16 or float64 convolution; torch.onnx writes float16 `Celu`s, which ONNX defines
    for float32 only; tf2onnx types a bfloat16 model's casts as float16) is lifted to float32 in
    place, as onnxsal runs it anyway (graph/precision.py), and `notes` says why."""
    from onnxsal.runtime import ort_reason

    half = half_type(proto)
    types = source_types(proto, proto.graph.input[0].type.tensor_type.elem_type)
    if not types:
        return half, False
    try:
        _session(proto)
        return half, False
    except Exception as exc:
        reason = ort_reason(exc)
        reason = reason if len(reason) <= 160 else reason[:157] + "..."
    lifted = onnx.ModelProto()
    lifted.CopyFrom(proto)
    to_float32(lifted, types)
    try:
        _session(lifted)
    except Exception:
        return half, False           # not a matter of types: the check names what fails
    proto.CopyFrom(lifted)
    names = " and ".join(sorted(LIFTED_NAMES[t] for t in types))
    notes.append(f"ONNX Runtime cannot run the model in {names} ({reason}); the file holds it in float32")
    return half, True


def run_onnx(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output of the converted model on `x` (float32, cast for a float16 input), in ONNX
    Runtime on the CPU."""
    from onnxsal.runtime import ort_reason

    unknown = sorted({n.op_type for n in proto.graph.node if n.domain in ("", "ai.onnx")
                      and not onnx.defs.has(n.op_type)})
    if unknown:
        raise ConversionError(f"the converted graph still holds ops ONNX does not define: {', '.join(unknown)}")
    if proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16:
        x = x.astype(np.float16)
    try:
        session = _session(proto)
        return session.run([proto.graph.output[0].name], {session.get_inputs()[0].name: x})[0]
    except Exception as exc:
        raise ConversionError(f"ONNX Runtime cannot run the converted model: {ort_reason(exc)}") from exc


def compare(got: np.ndarray, want: np.ndarray) -> float:
    """Largest difference relative to the output's scale (absolute for outputs of magnitude <= 1).

    Equal infinities or NaNs on both sides agree (an exponential that overflows float16 in both);
    a value finite on one side only is an infinite difference."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ConversionError(f"the ONNX output has shape {got.shape}, the framework's {want.shape}")
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    finite = np.isfinite(got) & np.isfinite(want)
    if not (same | finite).all():
        return math.inf
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.abs(want[finite]).max()))
    return float(np.abs(got[finite] - want[finite]).max() / scale)


def save(proto: onnx.ModelProto, path: Union[str, os.PathLike]) -> str:
    """Check and write the model in one file (weights inline; the protobuf limit is 2 GB)."""
    path = os.fspath(path)
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ConversionError(f"the converted model fails the ONNX checker: {str(exc).splitlines()[0]}") from exc
    if proto.ByteSize() >= 2 ** 31:
        raise ConversionError("the converted model is larger than 2 GB, which one ONNX file cannot hold")
    return write_proto(proto, path)
