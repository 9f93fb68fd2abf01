"""Keras (.keras, legacy .h5) and TensorFlow SavedModel folders -> explainable ONNX, through tf2onnx.

The route, and why each step is there:

1. The model is traced as one TensorFlow function with a dynamic batch
   (NHWC input). For Functional/Sequential models the function also returns
   every layer with a 4-D output, so tf2onnx keeps those exact tensors (a
   BatchNormalization is not folded into the conv whose output you may want
   to explain) and `metadata.strip_outputs` can name them afterwards: that
   is what makes ``--layer block5_conv3`` mean what ``penultimate_layer``
   means in tf-keras-vis.
2. Variables are frozen into constants (tf2onnx's large-model freezer), then
   every float constant of 1 MiB or more is lifted out of the graph and
   replaced by a placeholder of the same shape. tf2onnx converts a graph that
   holds no big weights; the weights come back afterwards as ONNX
   initializers, and the small ops tf2onnx put on them (kernel transposes)
   are folded in NumPy. tf2onnx's optimizer passes copy every constant they
   touch into new protobuf messages; with the big weights inside, converting
   VGG16 (138M parameters) went past 21 GB, and the lifted route stays under
   4 GB. Small models have no constant that large and take tf2onnx's plain path.
3. Extra layer outputs are stripped, the metadata written, and the ONNX output
   compared with Keras's on a random input before the file is written.

TensorFlow is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from typing import Any, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import numpy_helper

from onnxsal.errors import ConversionError, MissingFileError
from onnxsal.model import read_labels
from onnxsal.outputs import check_model_path
from onnxsal.graph.integer_input import PIXEL_TYPES

from . import metadata

OPSET = 17
LIFT_BYTES = 1 << 20       # float constants at least this large travel around tf2onnx (step 2)
# image inputs onnxsal takes as integers (onnxsal/graph/integer_input.py)
PIXEL_DTYPES = {np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in PIXEL_TYPES}
LAYER_PREFIX = "onnxsal_layer:"
KERAS_EXTS = (".keras", ".h5", ".hdf5")
PACKAGES = ("tensorflow-cpu", "tensorflow", "keras", "tf2onnx", "onnx", "numpy", "protobuf")


def import_tensorflow():
    """Import TensorFlow and Keras with the settings conversion and reference tests need.

    oneDNN is switched off (unless the caller chose): TensorFlow 2.21 with oneDNN
    crashes computing gradients through Conv2D ("double free or corruption"),
    and its reordered sums differ from the reference in the last bits.
    """
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
        import keras
    except ImportError as exc:
        raise ConversionError("converting Keras models needs TensorFlow: pip install 'onnxsal[keras]'") from exc
    tf.get_logger().setLevel("ERROR")
    return tf, keras


@contextlib.contextmanager
def _pad_fusion_keeps_explicit_pads():
    """tf2onnx merges a zero Pad into the Conv2D after it unless the convolution pads itself "SAME";
    a dilated "same" convolution, which TensorFlow writes as SpaceToBatchND -> Conv2D -> BatchToSpaceND,
    has by then become a Conv2D with EXPLICIT pads, and the merge replaces those pads with the Pad's
    (``ZeroPadding2D`` before ``Conv2D(padding="same", dilation_rate=2)`` gave wrong sizes or values).
    While the rewriter runs, such convolutions read as "SAME", so it leaves their Pad as a node."""
    from tf2onnx import tfonnx

    original = tfonnx.rewrite_conv2d_with_pad

    def rewrite(g, ops):
        explicit = [op for op in ops if op.type == "Conv2D" and op.get_attr_value("padding") == b"EXPLICIT"]
        for op in explicit:
            op.set_attr("padding", "SAME")
        try:
            return original(g, ops)
        finally:
            for op in explicit:
                op.set_attr("padding", "EXPLICIT")

    tfonnx.rewrite_conv2d_with_pad = rewrite
    try:
        yield
    finally:
        tfonnx.rewrite_conv2d_with_pad = original


@contextlib.contextmanager
def _quiet_ctx():
    """Silence Keras's "structure of `inputs` doesn't match" notes, which are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*structure of `inputs` doesn't match.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="keras")
        yield


@contextlib.contextmanager
def _quiet_tf2onnx():
    """tf2onnx logs its optimisers' failures with whole tracebacks and goes on (it cannot fold a
    bfloat16 constant); what matters in the result, the conversion's own checks name in one line."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def load(path: Union[str, os.PathLike]):
    """A Keras model from .keras/.h5, or the serving signature of a SavedModel folder."""
    tf, keras = import_tensorflow()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingFileError(f"model not found: {path}")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ConversionError(f"{path} is a folder without saved_model.pb, so not a SavedModel")
        try:
            return tf.saved_model.load(path)
        except Exception as exc:
            raise ConversionError(f"cannot load the SavedModel {path}: {type(exc).__name__}: {metadata.first_line(exc)}") from exc
    if not path.lower().endswith(KERAS_EXTS):
        raise ConversionError(f"{path}: expected a .keras or .h5 file or a SavedModel folder")
    try:
        with _quiet_ctx():
            return keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ConversionError(f"cannot load {path} with Keras {keras.__version__}: {type(exc).__name__}: "
                              f"{metadata.first_line(exc)}") from exc


def _as_shape(input_shape: Optional[Sequence[int]]) -> Optional[tuple]:
    """(H, W, C) from 3 numbers or (N, H, W, C) from 4."""
    if input_shape is None:
        return None
    dims = tuple(metadata.numbers(input_shape, "--input-shape", int))
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) != 3 or min(dims) <= 0:
        raise ConversionError(f"--input-shape for Keras takes H,W,C or N,H,W,C, not {','.join(map(str, dims))}")
    return dims


def _ensure_called(model, shape: Optional[tuple]):
    """Keras 3 refuses to trace a model that has never been called: build it on zeros first."""
    try:
        ready = bool(model.inputs)
    except (AttributeError, ValueError):
        ready = False
    if ready and model.built:
        return
    if shape is None:
        raise ConversionError("the model has never been called, so its input shape is unknown; "
                              "give --input-shape H,W,C")
    try:
        with _quiet_ctx():
            model(np.zeros((1,) + shape, np.float32), training=False)
    except Exception as exc:
        raise ConversionError(f"calling the model on a {shape} input failed: {metadata.first_line(exc)}") from exc


def _image_shape(model, given: Optional[tuple]) -> tuple:
    """(H, W, C) of the image input; None entries where the model accepts any size."""
    try:
        inputs = list(model.inputs)
    except (AttributeError, ValueError):
        inputs = []
    if len(inputs) > 1:
        raise ConversionError(f"the model has {len(inputs)} inputs; onnxsal explains single-image-input models")
    if inputs:
        dims = tuple(inputs[0].shape)[1:]
        if len(dims) != 3:
            raise ConversionError(f"the model's input has shape {tuple(inputs[0].shape)}; expected (batch, H, W, C)")
        if given is not None:
            for have, want in zip(dims, given):
                if have is not None and have != want:
                    raise ConversionError(f"--input-shape {given} does not match the model's input {dims}")
            return given
        return dims
    if given is None:
        raise ConversionError("cannot tell the model's input shape; give --input-shape H,W,C")
    return given


def _outputs(model) -> list:
    """The model's outputs as a list: a legacy .h5 model's `model.output` can itself be a list."""
    try:
        outs = model.outputs
    except (AttributeError, ValueError):
        return []
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if len(outs) > 1:
        raise ConversionError(f"the model has {len(outs)} outputs; onnxsal explains single-output classifiers")
    return outs


def _spatial_layers(model) -> list:
    """Top-level layers with one 4-D output: the tensors CAM methods can use, in model order."""
    keras = import_tensorflow()[1]
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            out = layer.output
        except (AttributeError, ValueError):
            continue  # layers called several times have no single output
        if isinstance(out, (list, tuple)) or len(out.shape) != 4:
            continue
        found.append(layer)
    return found


def _export_model(model, layers: bool):
    """The model plus one extra output per 4-D layer, and the names of those outputs."""
    keras = import_tensorflow()[1]
    outs = _outputs(model)
    if not layers or not outs:
        return model, []
    chosen = [layer for layer in _spatial_layers(model) if not any(layer.output is o for o in outs)]
    if not chosen:
        return model, []
    try:
        with _quiet_ctx():
            wide = keras.Model(model.inputs, outs + [layer.output for layer in chosen], name=model.name)
    except Exception:
        return model, []  # e.g. a nested graph Keras cannot re-wire: fall back to matching names
    return wide, [layer.name for layer in chosen]


def _erfc(ctx, node, name, args) -> None:
    """tf2onnx handler for TensorFlow's ``Erfc`` (its exact GELU), which ONNX lacks: ``1 - Erf(x)``.

    A handler rather than a rewrite of the finished graph, so the constant takes ``x``'s own type
    (float16 under a mixed-precision policy) and tf2onnx does not report the op as unsupported."""
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(name + "_one"), np.array(1, dtype))
    node.type = "Erf"
    ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(name + "_erfc"),
                                  inputs=[one.output[0], node.output[0]])


def _allow_inlining(graph_def) -> None:
    """Let TensorFlow's function inliner flatten calls compiled with XLA.

    Keras 3 runs grouped convolutions on CPU inside ``tf.function(jit_compile=True)``
    (ConvNeXt's depthwise layers are such convolutions); the frozen graph keeps each as a
    ``StatefulPartitionedCall`` marked ``_XlaMustCompile``, which the inliner skips and
    tf2onnx cannot convert. Without the mark the call is inlined like any other.
    """
    marks = ("_XlaMustCompile", "_XlaCompile", "_noinline")

    def clear(attrs) -> None:
        for key in marks:
            if key in attrs:
                del attrs[key]

    for node in [*graph_def.node, *(n for fn in graph_def.library.function for n in fn.node_def)]:
        if node.op in ("PartitionedCall", "StatefulPartitionedCall"):
            clear(node.attr)
    for fn in graph_def.library.function:
        clear(fn.attr)


# TensorFlow resizes that return float32 whatever their input's type.
FLOAT32_RESIZES = ("ResizeBilinear", "ResizeBicubic", "ResizeArea", "ScaleAndTranslate")


def _resize_from_float32(graph_def) -> None:
    """Feed each float32-returning resize a float32 input.

    Under a mixed-precision policy Keras resizes a float16 tensor, and TensorFlow's bilinear,
    bicubic and area resizes return float32 anyway; tf2onnx's ``Resize`` keeps its input's type,
    so the float32 ops after it met a float16 tensor and ONNX Runtime refused the graph. A cast in
    front gives the same values: float16 to float32 is exact, and these kernels compute in float32.
    """
    from tensorflow.core.framework import types_pb2

    for node in list(graph_def.node):
        if node.op in FLOAT32_RESIZES and node.attr["T"].type != types_pb2.DT_FLOAT:
            cast = graph_def.node.add()
            cast.name = node.name + "/onnxsal_float32"
            cast.op = "Cast"
            cast.input.append(node.input[0])
            cast.attr["SrcT"].type = node.attr["T"].type
            cast.attr["DstT"].type = types_pb2.DT_FLOAT
            node.input[0] = cast.name
            node.attr["T"].type = types_pb2.DT_FLOAT


def _lift_weights(graph_def, min_bytes: int):
    """Replace big float constants by placeholders; return the new GraphDef and {name: (bytes, shape, dtype)}."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2

    lifted: dict[str, tuple[bytes, list[int], Any]] = {}
    floats = {tf.float32.as_datatype_enum: np.float32, tf.float16.as_datatype_enum: np.float16,
              tf.float64.as_datatype_enum: np.float64}
    new = graph_pb2.GraphDef()
    new.versions.CopyFrom(graph_def.versions)
    new.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        tensor = node.attr["value"].tensor if node.op == "Const" else None
        if tensor is not None and tensor.dtype in floats and len(tensor.tensor_content) >= min_bytes:
            shape = [d.size for d in tensor.tensor_shape.dim]
            lifted[node.name] = (tensor.tensor_content, shape, floats[tensor.dtype])
            ph = new.node.add()
            ph.name = node.name
            ph.op = "Placeholder"
            ph.attr["dtype"].type = tensor.dtype
            ph.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
        else:
            new.node.add().CopyFrom(node)
    return new, lifted


def _restore_weights(proto: onnx.ModelProto, lifted: dict) -> None:
    """Turn the placeholders tf2onnx made graph inputs back into initializers."""
    graph = proto.graph
    keep = []
    for vi in graph.input:
        key = vi.name.rsplit(":", 1)[0]
        if key in lifted:
            data, shape, dtype = lifted.pop(key)
            init = graph.initializer.add()
            init.name = vi.name
            init.data_type = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
            init.dims.extend(shape)
            init.raw_data = data
        else:
            keep.append(vi)
    if len(keep) != len(graph.input):
        del graph.input[:]
        graph.input.extend(keep)


def fold_constants(proto: onnx.ModelProto, roots: set[str]) -> int:
    """Evaluate, in NumPy, nodes whose inputs all derive from `roots` initializers; return how many.

    Only what was computed from lifted weights is folded, so a model converted on
    tf2onnx's plain path is left exactly as tf2onnx made it.
    """
    from onnx.reference import ReferenceEvaluator

    graph = proto.graph
    values = {i.name: i for i in graph.initializer}
    derived = set(roots)
    folded: list[int] = []
    new_inits = []
    for k, node in enumerate(graph.node):
        ins = [i for i in node.input if i]
        if node.op_type in ("Constant",) or not ins or not any(i in derived for i in ins):
            continue
        if not all(i in values for i in ins) or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            continue
        feeds = {i: numpy_helper.to_array(values[i]) for i in ins}
        results = ReferenceEvaluator(node).run(None, feeds)
        for name, value in zip(node.output, results):
            tensor = numpy_helper.from_array(np.asarray(value), name)
            values[name] = tensor
            new_inits.append(tensor)
            derived.add(name)
        folded.append(k)
    if folded:
        gone = set(folded)
        nodes = [n for k, n in enumerate(graph.node) if k not in gone]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend(new_inits)
        metadata.prune(graph)
    return len(folded)


def _channels_first_tensors(proto: onnx.ModelProto) -> dict[str, bool]:
    """Which 4-D tensors are channels-first, by propagating layouts from the NHWC input and the convs."""
    nchw_ops = {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "BatchNormalization", "GlobalAveragePool",
                "GlobalMaxPool", "LRN", "InstanceNormalization", "Resize", "DepthToSpace", "SpaceToDepth"}
    layout: dict[str, bool] = {i.name: False for i in proto.graph.input}
    for node in proto.graph.node:
        known = [layout[i] for i in node.input if i in layout]
        if node.op_type in nchw_ops:
            value: Optional[bool] = True
        elif node.op_type == "Transpose" and known:
            perm = _perm(node)
            value = (not known[0]) if perm in ([0, 3, 1, 2], [0, 2, 3, 1]) else None
        elif node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "ReduceMean", "MatMul", "Gemm"):
            value = None
        else:
            value = known[0] if known else None
        if value is not None:
            for o in node.output:
                layout[o] = value
    return layout


def _perm(node: onnx.NodeProto) -> Optional[list[int]]:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def match_scopes(proto: onnx.ModelProto) -> dict[str, str]:
    """Best-effort layer map from TensorFlow name scopes, for graphs with no Keras layer objects.

    Node names look like "StatefulPartitionedCall/model_1/block5_conv3/Relu": the
    scope right after the prefix all named nodes share is the layer, and the last
    channels-first 4-D tensor produced inside it stands for the layer's output.
    Keras 3 traces scopes with a "_1" suffix; when every layer scope carries one, it
    is dropped. Layers whose ops tf2onnx fused away (a conv followed by batch norm)
    are missing.
    """
    from onnxsal.graph.normalize import infer, tensor_shapes

    shapes = tensor_shapes(infer(proto))
    layout = _channels_first_tensors(proto)
    paths = [node.name.split("/") for node in proto.graph.node if "/" in node.name]
    if not paths:
        return {}
    prefix = 0
    while all(len(p) > prefix + 1 and p[prefix] == paths[0][prefix] for p in paths):
        prefix += 1
    scopes: dict[str, str] = {}
    for node in proto.graph.node:
        parts = node.name.split("/")
        if len(parts) < prefix + 2 or parts[:prefix] != paths[0][:prefix]:
            continue
        out = node.output[0]
        shape = shapes.get(out, (0, None))[1]
        if shape is None or len(shape) != 4 or not layout.get(out):
            continue
        scopes[parts[prefix]] = out
    if scopes and all(re.search(r"_\d+$", s) for s in scopes):
        return {re.sub(r"_\d+$", "", s): t for s, t in scopes.items()}
    return scopes


def _concrete(tf, model, shape: tuple, input_name: str, dtype: np.dtype):
    spec = tf.TensorSpec((None,) + tuple(shape), tf.as_dtype(dtype), name=input_name)
    fn = tf.function(lambda x: model(x, training=False))
    with _quiet_ctx():
        return fn.get_concrete_function(spec)


def _signature(loaded, shape: Optional[tuple]):
    """The serving signature of a SavedModel, its input shape, a way to call it on a batch, and its
    input's dtype."""
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if not sigs:
        raise ConversionError("the SavedModel has no signatures to convert")
    fn = sigs.get("serving_default") or next(iter(sigs.values()))
    args, kwargs = fn.structured_input_signature
    specs = list(args) + list(kwargs.values())
    if len(specs) != 1:
        raise ConversionError(f"the SavedModel's signature takes {len(specs)} inputs; onnxsal explains single-image-input models")
    dims = tuple(specs[0].shape)[1:]
    if len(dims) != 3:
        raise ConversionError(f"the SavedModel's input has shape {tuple(specs[0].shape)}; expected (batch, H, W, C)")
    if shape is not None:
        dims = shape
    key = next(iter(kwargs)) if kwargs else None

    def call(x):
        out = fn(**{key: x}) if key else fn(x)
        if isinstance(out, dict):
            if len(out) != 1:
                raise ConversionError(f"the SavedModel returns {len(out)} outputs; onnxsal explains single-output classifiers")
            out = next(iter(out.values()))
        return np.asarray(out)

    return fn, dims, call, specs[0].dtype


def _pixel_dtype(dtype) -> np.dtype:
    """The input's integer pixel type when it takes one (``Input(dtype="uint8")``), else float32.

    A model of uint8 pixels traced with a float32 signature would cast its input to uint8 inside the
    graph, and no gradient crosses that cast; traced with its own type, onnxsal reads the pixels as
    real values (onnxsal/graph/integer_input.py)."""
    try:
        found = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
    except TypeError:
        return np.dtype(np.float32)
    return found if found in PIXEL_DTYPES else np.dtype(np.float32)


def _check_input(shape: tuple, spec, dtype: np.dtype = np.dtype(np.float32)) -> np.ndarray:
    """Two random images in pixel range, preprocessed as the metadata says (or in [-1, 1] without it);
    for a model of integer pixels, two images of them over the type's range."""
    rng = np.random.default_rng(0)
    h, w, c = (d or 32 for d in shape)
    if dtype != np.float32:
        info = np.iinfo(dtype)
        return rng.integers(info.min, int(info.max) + 1, (2, h, w, c)).astype(dtype)
    if spec is None:
        return rng.uniform(-1, 1, (2, h, w, c)).astype(np.float32)
    pixels = rng.uniform(0, 255, (2, h, w, c)).astype(np.float32)
    mean = np.asarray(spec.mean if c == 3 else [np.mean(spec.mean)], np.float32)
    std = np.asarray(spec.std if c == 3 else [np.mean(spec.std)], np.float32)
    if spec.color == "BGR" and c == 3:
        pixels = pixels[..., ::-1]
    return ((pixels * np.float32(spec.scale) - mean) / std).astype(np.float32)


def convert(model: Union[str, os.PathLike, Any], output: Union[str, os.PathLike, None] = None, *,
            preprocess: Optional[str] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, scale: Optional[float] = None, bgr: Optional[bool] = None,
            labels: Union[str, Sequence[str], None] = None, input_shape: Optional[Sequence[int]] = None,
            opset: int = OPSET, layers: bool = True, check: bool = True,
            check_inputs: Optional[np.ndarray] = None, lift_bytes: int = LIFT_BYTES) -> metadata.Conversion:
    """Convert a Keras model (object or .keras/.h5 path) or a SavedModel folder to ONNX.

    Writes `output` when given. `check_inputs` (N, H, W, C), already preprocessed,
    are added to the random check input; the conversion fails if ONNX Runtime and
    TensorFlow differ by more than 1e-4 relative to the output's scale.
    """
    tf, keras = import_tensorflow()
    import tf2onnx
    from tf2onnx import tf_loader
    from tf2onnx.graph import GraphUtil

    opset = metadata.check_opset(opset, max(tf2onnx.constants.OPSET_TO_IR_VERSION), "tf2onnx")
    if output is not None:
        check_model_path(output)                # before the conversion, which can take a minute
    start = time.perf_counter()
    notes: list[str] = []
    source_path = None
    if isinstance(model, (str, os.PathLike)):
        source_path = os.fspath(model)
        model = load(source_path)
    shape = _as_shape(input_shape)
    label_list = read_labels(labels)

    is_keras = isinstance(model, keras.Model)
    extra_names: list[str] = []
    if is_keras:
        _ensure_called(model, shape)
        shape = _image_shape(model, shape)
        wide, extra_names = _export_model(model, layers)
        input_name = _input_name(model)
        dtype = _pixel_dtype(model.inputs[0].dtype if getattr(model, "inputs", None) else None)
        cf = _concrete(tf, wide, shape, input_name, dtype)
        call = lambda x: _keras_predict(model, x)  # noqa: E731
        name = model.name
    else:
        cf, shape, call, input_dtype = _signature(model, shape)
        dtype = _pixel_dtype(input_dtype)
        input_name = "input"
        name = os.path.basename(os.path.normpath(source_path)) if source_path else "saved_model"
    channels = shape[2]
    if channels not in (1, 3):
        raise ConversionError(f"the input has {channels} channels; onnxsal explains 1- or 3-channel images")
    spec = metadata.preprocess_spec(preprocess, mean, std, scale, bgr, layout="NHWC",
                                    size=shape[:2] if None not in shape[:2] else None, channels=channels)

    # The function's own arguments come first; tensors it captures (a Normalization layer's mean and
    # variance, say) follow them and are frozen into constants with the variables.
    n_args = len(tf.nest.flatten(cf.structured_input_signature))
    inputs = [t.name for t in cf.inputs[:n_args] if t.dtype != tf.resource]
    outputs = [t.name for t in cf.outputs if t.dtype != tf.resource]
    if len(inputs) != 1:
        raise ConversionError(f"the traced model takes {len(inputs)} tensors; expected one image")
    if not is_keras and len(outputs) != 1:
        raise ConversionError(f"the SavedModel returns {len(outputs)} tensors; onnxsal explains single-output classifiers")
    out_name = _output_name(model) if is_keras else "output"
    rename = {inputs[0]: input_name, outputs[0]: out_name}
    extra = {}
    for tensor, layer in zip(outputs[1:], extra_names):
        rename[tensor] = LAYER_PREFIX + layer
        extra[LAYER_PREFIX + layer] = layer

    try:
        frozen = tf_loader.convert_variables_to_constants_large_model(cf)
        frozen = tf_loader.fix_freezing_errors_part2(frozen)
        del cf
        graph_def, lifted = _lift_weights(frozen, lift_bytes)
        _allow_inlining(graph_def)
        _resize_from_float32(graph_def)
        del frozen
        weights = [k + ":0" for k in lifted]
        with _quiet_ctx(), _quiet_tf2onnx(), _pad_fusion_keeps_explicit_pads():
            proto, _ = tf2onnx.convert.from_graph_def(graph_def, name=name, input_names=inputs + weights,
                                                      output_names=outputs, opset=opset, tensors_to_rename=rename,
                                                      custom_op_handlers={"Erfc": (_erfc, [])})
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"tf2onnx could not convert the model: {type(exc).__name__}: {metadata.first_line(exc)}") from exc
    del graph_def
    if lifted:
        roots = set(weights)
        _restore_weights(proto, lifted)
        n = fold_constants(proto, roots)
        notes.append(f"{len(roots)} weight tensors of {lift_bytes >> 20} MiB or more kept out of tf2onnx; "
                     f"{n} ops on them folded")

    half, retyped = metadata.settle_precision(proto, notes)   # a bfloat16 policy's file mixes float16 casts in
    if retyped:
        # tf2onnx's transpose optimiser stops at the mixed casts of a bfloat16 policy and leaves its
        # layers channels-last; on the float32 network it completes, as for any other model
        with _quiet_tf2onnx():
            proto = GraphUtil.optimize_model_proto(proto)
    found, skipped = metadata.strip_outputs(proto, extra, channels_last=True)
    if layers and not extra_names:
        found = match_scopes(proto)
        if found:
            notes.append("layer names matched from TensorFlow name scopes (best effort: fused layers are missing)")
    if skipped:
        notes.append(f"no channels-first tensor for layers {metadata.some_names(skipped)}; they are left out of the layer map")
    metadata.finish_graph(proto, label_list)

    diff = None
    if check:
        x = _check_input(shape, spec, dtype)
        x = metadata.with_check_inputs(x, check_inputs, dtype)
        diff = metadata.check_outputs(half, metadata.run_onnx(proto, x), call(x), "TensorFlow")
    seconds = time.perf_counter() - start
    source = {
        "framework": "keras" if is_keras else "tensorflow-savedmodel",
        "model": os.path.basename(os.path.normpath(source_path)) if source_path else name,
        "converter": "onnxsal convert keras (tf2onnx)",
        "opset": opset,
        "versions": metadata.versions(PACKAGES),
    }
    if source_path:
        source["sha256"] = metadata.sha256(source_path)
    if diff is not None:
        source["check_max_rel_diff"] = float(f"{diff:.3g}")
    metadata.annotate(proto, preprocess=spec, labels=label_list, layers=found, source=source)
    path = metadata.save(proto, output) if output is not None else None
    return metadata.Conversion(proto, path, found, diff, seconds, notes)


def _input_name(model) -> str:
    try:
        name = model.inputs[0].name
    except (AttributeError, IndexError, ValueError):
        return "input"
    name = re.sub(r"[^A-Za-z0-9_.]", "_", str(name).split(":")[0])
    return name or "input"


def _output_name(model) -> str:
    names = getattr(model, "output_names", None)
    if names and isinstance(names, (list, tuple)) and isinstance(names[0], str):
        return names[0]
    return "output"


def _keras_predict(model, x: np.ndarray) -> np.ndarray:
    with _quiet_ctx():
        out = model(x, training=False)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return np.asarray(out)


def calibrate(model, images: np.ndarray, bias_scale: float = 0.02, seed: int = 0) -> None:
    """Make a randomly initialised Keras model non-degenerate, in place, for tests and benchmarks.

    Fresh Keras models are poor test subjects: zero biases are folded away by the
    converter (so the bias paths are never exercised), and with batch-norm statistics
    at 0/1, MobileNetV2's activations shrink to about 1e-17 by the last layer. This
    gives every bias small random values and sets each BatchNormalization's moving
    mean/variance to the statistics of its own input on `images`: one forward pass in
    training mode with momentum 0 does exactly that, layer after layer.
    """
    tf, keras = import_tensorflow()
    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        bias = getattr(layer, "bias", None)
        if bias is not None and not isinstance(layer, keras.layers.BatchNormalization):
            bias.assign(rng.normal(0, bias_scale, tuple(bias.shape)).astype(np.float32))
    norms = [layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    kept = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    try:
        with _quiet_ctx():
            model(tf.constant(images, tf.float32), training=True)
    finally:
        for layer, momentum in zip(norms, kept):
            layer.momentum = momentum


def _all_layers(model) -> list:
    found = []
    for layer in getattr(model, "layers", []):
        found.append(layer)
        if hasattr(layer, "layers"):
            found.extend(_all_layers(layer))
    return found
