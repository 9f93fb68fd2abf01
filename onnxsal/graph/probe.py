"""Shapes that static inference leaves unknown, read off two small runs of the model.

Some exporters build reshape targets from ``Shape -> Slice -> Concat`` chains whose
bounds are themselves computed (torch.onnx's multi-head attention does this); ONNX's
shape inference, data propagation included, then loses even the rank of every tensor
after them. A VJP rule needs at least the rank (to build a Pad or a permutation), so
instead of refusing such a model, the part of it that computes those tensors runs
once at batch 1 and once at batch 2 on a seeded random input: a dimension equal in
both runs is static, one that differs follows the batch and stays unknown.

This runs only when a tensor on the differentiated path has no rank, costs two
forward passes of a single image, and gives up quietly (the rule then reports the
unknown rank) when an input is not floating point (its values could decide shapes), has
free dimensions besides the batch, or the model does not run.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .weights import for_session

Shape = tuple[Optional[int], ...]


def _feeds(model: onnx.ModelProto, batch: int) -> Optional[dict[str, np.ndarray]]:
    """A seeded image-like input per graph input at ``batch``; None when that cannot stand in."""
    inits = {i.name for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif k == 0:
                dims.append(batch)
            else:
                return None
        dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if not np.issubdtype(dtype, np.floating):
            return None     # an index or size input: a made-up value could change the shapes
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype)
    return feeds


def probe_shapes(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, tuple[int, Shape]]:
    """Name -> (elem_type, shape with None for batch-dependent dims) for each tensor that runs."""
    return probe(model, names)[0]


def probe(model: onnx.ModelProto, shapes_of: Sequence[str], values_of: Sequence[str] = ()
          ) -> tuple[dict[str, tuple[int, Shape]], dict[str, np.ndarray]]:
    """``probe_shapes`` of ``shapes_of``, and the values at batch 1 of ``values_of`` (the indices a
    ScatterND writes, built from shapes at run time), from one session; both empty when the model
    cannot run on a stand-in input."""
    names = list(dict.fromkeys(list(shapes_of) + list(values_of)))
    runs = _runs(model, names, (1, 2) if shapes_of else (1,))   # a second batch tells which dims follow it
    if runs is None:
        return {}, {}
    shapes, wanted = {}, set(shapes_of)
    for name, a, b in zip(names, *runs) if shapes_of else ():
        a, b = np.asarray(a), np.asarray(b)
        if name in wanted and a.ndim == b.ndim:
            shape = tuple(int(p) if p == q else None for p, q in zip(a.shape, b.shape))
            shapes[name] = (helper.np_dtype_to_tensor_dtype(a.dtype), shape)
    values = set(values_of)
    return shapes, {n: np.asarray(v) for n, v in zip(names, runs[0]) if n in values}


def steady_values(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The values of `names` that are the same at batch 1 and batch 2 of a stand-in input (for
    tensors computed from shapes alone, which the caller must make sure of: a value computed from
    the input's data would be the stand-in's)."""
    runs = _runs(model, list(dict.fromkeys(names)), (1, 2))
    if runs is None or len(runs[1]) != len(runs[0]):
        return {}
    return {n: np.asarray(a) for n, a, b in zip(dict.fromkeys(names), *runs)
            if np.shape(a) == np.shape(b) and np.array_equal(a, b)}


def _runs(model: onnx.ModelProto, names: list[str], batches: Sequence[int]) -> Optional[list[list]]:
    """`names`' values from one session of the model exposing them, one list per batch; None when
    the model cannot run on a stand-in input."""
    import onnxruntime as ort

    from ..runtime import open_session
    from .surgery import expose

    if not names:
        return None
    try:
        light, arrays = for_session(expose(model, names))
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = 1
        sess = open_session(light, arrays, opts, ["CPUExecutionProvider"])
        runs: list[list] = []
        for batch in batches:
            feeds = _feeds(light, batch)
            if feeds is None:
                return None
            try:
                runs.append(sess.run(names, feeds))
            except Exception:
                if batch == batches[0]:
                    raise
                # a graph that only runs one image at a time (its export fixed the batch where
                # onnxsal could not free it): the engine runs it row by row, so the one-row
                # shapes are its shapes; only the leading axis is left free
                runs.append([np.empty((0,) + np.shape(v)[1:], np.asarray(v).dtype) if np.ndim(v) else v
                             for v in runs[0]])
    except Exception:
        return None
    return runs


def type_proto(elem_type: int, shape: Shape) -> onnx.TypeProto:
    return helper.make_tensor_type_proto(elem_type or TensorProto.FLOAT, list(shape))


def at_file_batch(model: onnx.ModelProto, dims_of: Sequence[str], values_of: Sequence[str],
                  types: Optional[dict[str, int]] = None) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """One run of a graph whose inputs fix every dim (an export at a fixed batch) on a seeded random
    input: the dims of the tensors `dims_of` (only their shapes leave the run) and the values of
    the tensors `values_of` (int64 unless `types` says otherwise). Empty when it cannot run: an
    input that is not floating point or has a free dim, or a run that fails."""
    import onnxruntime as ort

    from ..runtime import open_session

    feeds = _feeds(model, 0)
    if feeds is None or any(0 in np.shape(v) for v in feeds.values()):
        return {}, {}
    light, arrays = for_session(model)
    light = copy.deepcopy(light) if light is model else light
    g = light.graph
    shape_of = {t: f"onnxsal_probe/{t}/shape" for t in dict.fromkeys(dims_of)}
    g.node.extend(helper.make_node("Shape", [t], [o], name=o) for t, o in shape_of.items())
    names = list(shape_of.values()) + list(dict.fromkeys(values_of))
    del g.output[:]
    g.output.extend(helper.make_tensor_value_info(o, (types or {}).get(o, TensorProto.INT64), None) for o in names)
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        got = open_session(light, arrays, opts, ["CPUExecutionProvider"]).run(names, feeds)
    except Exception:
        return {}, {}
    by_name = dict(zip(names, got))
    return ({t: tuple(int(d) for d in by_name[o]) for t, o in shape_of.items()},
            {v: np.asarray(by_name[v]) for v in values_of})
