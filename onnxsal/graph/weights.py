"""Large initializers kept beside the graph instead of inside it.

Every explanation derives graphs from the loaded model (exposed activations, a VJP, a tail
cut at a layer) and gives each one to ONNX Runtime. With the weights inside the ModelProto,
each derivation copies them and each session serialises and re-parses them: for a VGG16
(550 MB of weights) that was about 20 s around a 0.8 s explanation, and several copies of
the weights in memory at once.

So a loaded model's large float initializers become placeholders: the same name, type and
shape, ``data_location = EXTERNAL``, and a reference to a `WeightStore` that holds the arrays.
Graph code copies only placeholders; `array` reads any initializer's value whether it is a
placeholder or not; sessions receive the arrays as external initializers (`for_session`),
which ONNX Runtime uses in place on CPU; `attach` gives back a self-contained ModelProto for
anything that leaves the process (a saved file, a user's ModelProto).
"""

from __future__ import annotations

import itertools
import weakref
from typing import Optional

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError

LOCATION = "onnxsal:weights"
MIN_BYTES = 65536     # smaller tensors stay inline: copying them costs nothing
# Below this a tensor always stays inline, whatever MIN_BYTES is set to: ONNX Runtime's shape
# inference reads a Resize's float scales by value at session creation, and refuses external ones.
INLINE_BYTES = 64
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_stores: "weakref.WeakValueDictionary[str, WeightStore]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)


class WeightStore(dict):
    """Initializer arrays by name, for the placeholders that point at this store."""

    def __init__(self) -> None:
        super().__init__()
        self.id = f"{next(_ids)}"
        _stores[self.id] = self


def shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` without its graph's initializers (nodes, types, metadata all kept)."""
    out = onnx.ModelProto()
    for fd, value in model.ListFields():
        if fd.name != "graph":
            _copy_field(out, fd, value)
    for fd, value in model.graph.ListFields():
        if fd.name != "initializer":
            _copy_field(out.graph, fd, value)
    return out


def _copy_field(msg, fd, value) -> None:
    repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
    if repeated:
        getattr(msg, fd.name).extend(value)
    elif fd.type == fd.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _nbytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def is_placeholder(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == LOCATION for e in t.external_data)


def _placeholder(name: str, data_type: int, dims, store: Optional[WeightStore]) -> TensorProto:
    t = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
    t.external_data.add(key="location", value=LOCATION)
    if store is not None:   # the name too: graph code may rename the tensor, the store keeps its key
        t.external_data.add(key="store", value=store.id)
        t.external_data.add(key="name", value=name)
    return t


def _large(t: TensorProto, min_bytes: Optional[int]) -> bool:
    limit = MIN_BYTES if min_bytes is None else min_bytes
    return t.data_type in _FLOATS and t.data_location != TensorProto.EXTERNAL and _nbytes(t) >= max(limit, INLINE_BYTES)


def _take_out(model: onnx.ModelProto, take, store: Optional[WeightStore]) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` whose initializers that `take` picks are placeholders, and their arrays."""
    light, arrays = shell(model), {}
    for t in model.graph.initializer:
        if take(t):
            arrays[t.name] = a = array(t)
            light.graph.initializer.append(_placeholder(t.name, t.data_type, a.shape, store))
        else:
            light.graph.initializer.append(t)
    return light, arrays


def detach(model: onnx.ModelProto, min_bytes: Optional[int] = None) -> tuple[onnx.ModelProto, WeightStore]:
    """A copy of `model` whose large float initializers are placeholders, and the store holding them.

    `model` itself is left as it was. Small initializers (shape tensors, scalars) stay inline,
    since shape inference and graph passes read them directly.
    """
    store = WeightStore()
    light, arrays = _take_out(model, lambda t: _large(t, min_bytes), store)
    for a in arrays.values():
        a.flags.writeable = False
    store.update(arrays)
    return light, store


def array(t: TensorProto) -> np.ndarray:
    """The value of any initializer or Constant tensor, placeholder or not (read-only if a placeholder)."""
    if not is_placeholder(t):
        try:
            return numpy_helper.to_array(t)
        except Exception as exc:
            raise ModelError(f"initializer {t.name!r} is corrupt (its data does not fit its shape "
                             f"{list(t.dims)}): {type(exc).__name__}") from exc
    entries = {e.key: e.value for e in t.external_data}
    store = _stores.get(entries.get("store", ""))
    key = entries.get("name", t.name)
    if store is None or key not in store:
        raise ModelError(f"the weights of {t.name!r} are no longer available (their model was released)")
    return store[key]


def attach(model: onnx.ModelProto) -> onnx.ModelProto:
    """A self-contained copy of `model`: every placeholder replaced by its tensor."""
    if not any(is_placeholder(t) for t in model.graph.initializer):
        return model
    out = shell(model)
    for t in model.graph.initializer:
        out.graph.initializer.append(numpy_helper.from_array(array(t), t.name) if is_placeholder(t) else t)
    return out


def for_session(model: onnx.ModelProto, min_bytes: Optional[int] = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """What a session is built from: the graph with no large tensor inside, and those tensors' arrays.

    Placeholders resolve through their store; large inline initializers (such as the flipped
    kernels a VJP adds) are taken out too, so no weight is serialised and parsed again.
    """
    light, arrays = _take_out(model, lambda t: is_placeholder(t) or _large(t, min_bytes), None)
    return (light, arrays) if arrays else (model, arrays)
