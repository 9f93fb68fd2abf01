"""Graphs exported at a batch of 1 run at any batch: the batch is traced through moves and merges.

Each graph here copies a pattern torch.onnx's dynamo exporter writes when a model is exported at
batch 1 without ``dynamic_shapes``: targets with ``allowzero=1``, attention run sequence first
with the batch merged into the heads, a class token concatenated with a batch of 1, and the
``as_strided`` read of a flattened batch. The reference is the file itself, run one row at a time.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxsal
from onnxsal.cli import main
from onnxsal.errors import MethodError, ModelError
from onnxsal.export import export
from onnxsal.graph import batch_axis
from onnxsal.graph.normalize import (_const_values, inferred_dims, normalize, one_image_ops, tensor_shapes,
                                     upgrade_opset)

from gradcheck import check_vjp

RNG = np.random.default_rng(0)


def _model(nodes, inits: dict, x_shape, out_shape, opset: int = 17) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "batch1", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _w(*shape) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _reshape(x: str, target: str, out: str) -> onnx.NodeProto:
    return helper.make_node("Reshape", [x, target], [out], allowzero=1)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _per_row(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return np.concatenate([_run(model, x[i:i + 1]) for i in range(len(x))])


def _smoothgrad_both_ways(model: onnx.ModelProto):
    """SmoothGrad's eight noisy copies as the engine runs them, and one row per run; the maps agree."""
    x = RNG.standard_normal([d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]).astype(np.float32)
    res = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, method="smoothgrad", n_samples=8, target=1)
    one = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=1).explain(x, method="smoothgrad",
                                                                                  n_samples=8, target=1)
    np.testing.assert_allclose(res.raw, one.raw, rtol=1e-5, atol=1e-7)
    return res


def vit_like(n: int = 1) -> onnx.ModelProto:
    """Patches, a class token, one attention block run sequence first (the batch on axis 1 and
    merged into the heads, (5, 2n, 4) for 5 tokens and 2 heads), and the class token's head."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"patch": _w(8, 3, 4, 4), "cls": _w(1, 1, 8), "cls_shape": i64(n, 1, 8), "wq": _w(8, 8), "wk": _w(8, 8),
             "wv": _w(8, 8), "wo": _w(8, 8), "head": _w(8, 3), "to_tokens": i64(n, 8, 4), "heads": i64(5, 2 * n, 4),
             "split": i64(n, 2, 5, 4), "joined": i64(5 * n, 8), "seq": i64(5, n, 8), "zero": np.array(0, np.int64),
             "scale": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "patch"], ["c"], strides=[4, 4]),           # (1, 8, 2, 2)
             _reshape("c", "to_tokens", "t"),                                           # (1, 8, 4)
             helper.make_node("Transpose", ["t"], ["tok"], perm=[0, 2, 1]),              # (1, 4, 8)
             helper.make_node("Expand", ["cls", "cls_shape"], ["cls1"]),                 # (1, 1, 8)
             helper.make_node("Concat", ["cls1", "tok"], ["seq_first"], axis=1),         # (1, 5, 8)
             helper.make_node("Transpose", ["seq_first"], ["s"], perm=[1, 0, 2])]        # (5, 1, 8)
    for w in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["s", f"w{w}"], [f"{w}0"]),                 # (5, 1, 8)
                  _reshape(f"{w}0", "heads", f"{w}1"),                                    # (5, 2, 4): batch x heads
                  helper.make_node("Transpose", [f"{w}1"], [f"{w}2"], perm=[1, 0, 2]),    # (2, 5, 4)
                  _reshape(f"{w}2", "split", f"{w}3")]                                    # (1, 2, 5, 4)
    nodes += [helper.make_node("Transpose", ["k3"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q3", "kt"], ["scores0"]),
              helper.make_node("Mul", ["scores0", "scale"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
              helper.make_node("MatMul", ["attn", "v3"], ["ctx"]),                        # (1, 2, 5, 4)
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[2, 0, 1, 3]),       # (5, 1, 2, 4)
              _reshape("ctx_t", "joined", "flat"),                                        # (5, 8): tokens x batch
              helper.make_node("Gemm", ["flat", "wo"], ["o"]),
              _reshape("o", "seq", "o3"),                                                 # (5, 1, 8)
              helper.make_node("Add", ["o3", "s"], ["res"]),
              helper.make_node("Transpose", ["res"], ["batch_first"], perm=[1, 0, 2]),    # (1, 5, 8)
              helper.make_node("Gather", ["batch_first", "zero"], ["cls_out"], axis=1),    # (1, 8)
              helper.make_node("MatMul", ["cls_out", "head"], ["logits"])]
    return _model(nodes, inits, (n, 3, 8, 8), (n, 3))


def strided_head(n: int = 1) -> onnx.ModelProto:
    """ConvNeXt's head as the dynamo exporter writes it: the pooled (n, 6, 1, 1) features flattened
    to (6n,) and read back by a Gather of constant indices shaped (n, 6, 1, 1), row k reading sample k."""
    inits = {"k": _w(6, 3, 3, 3), "axes": np.array([-1, -2], np.int64), "flat": np.array([-1], np.int64),
             "idx": np.arange(6 * n, dtype=np.int64).reshape(n, 6, 1, 1), "rows": np.array([n, 6], np.int64),
             "fc": _w(6, 4)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["pooled"], keepdims=1),
             helper.make_node("Reshape", ["pooled", "flat"], ["f"]),
             helper.make_node("Gather", ["f", "idx"], ["strided"], axis=0),
             helper.make_node("Tanh", ["strided"], ["t"]),
             _reshape("t", "rows", "r"),
             helper.make_node("MatMul", ["r", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 5, 5), (n, 4), opset=18)


def einsum_windows(n: int = 1) -> onnx.ModelProto:
    """MaxViT's window attention: the batch kept on axis 0 of 5-D tensors, scores by an Einsum."""
    inits = {"k": _w(4, 3, 1, 1), "win": np.array([n, 2, 2, 4, 4], np.int64), "fc": _w(64, 2),
             "flat": np.array([n, 64], np.int64)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),                                   # (1, 4, 4, 4)
             _reshape("c", "win", "w"),                                                   # (1, 2, 2, 4, 4)
             helper.make_node("Einsum", ["w", "w"], ["s"], equation="bghid,bghjd->bghij"),
             helper.make_node("Softmax", ["s"], ["a"], axis=-1),
             helper.make_node("Einsum", ["a", "w"], ["o"], equation="bghij,bghjd->bghid"),
             _reshape("o", "flat", "f"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 2), opset=17)


def resized_gate(n: int = 1) -> onnx.ModelProto:
    """GhostNetV2's gate: pooled, squashed, and resized back with ``sizes`` that name the file's batch.
    At batch 3 an unchanged Resize would squeeze the gates to one row and broadcast it: no error."""
    inits = {"k": _w(4, 3, 3, 3), "sizes": np.array([n, 4, 4, 4], np.int64), "w": _w(64, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["p"], ["g"]),
             helper.make_node("Resize", ["g", "", "", "sizes"], ["up"], mode="nearest"),
             helper.make_node("Mul", ["c", "up"], ["gated"]),
             helper.make_node("Flatten", ["gated"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=18)


def spatial_transformer(n: int = 1) -> onnx.ModelProto:
    """An affine grid whose ``size`` input names the file's batch, and a theta reshaped to (n, 2, 3)."""
    inits = {"w": _w(48, 6) * 0.1, "eye": np.array([1, 0, 0, 0, 1, 0], np.float32), "theta_shape":
             np.array([n, 2, 3], np.int64), "size": np.array([n, 3, 4, 4], np.int64), "fc": _w(48, 3)}
    nodes = [helper.make_node("Flatten", ["x"], ["xf"]),
             helper.make_node("MatMul", ["xf", "w"], ["t0"]),
             helper.make_node("Add", ["t0", "eye"], ["t1"]),
             _reshape("t1", "theta_shape", "theta"),
             helper.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=0),
             helper.make_node("GridSample", ["x", "grid"], ["s"], align_corners=0),
             helper.make_node("Flatten", ["s"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=20)


def one_head_pooling(n: int = 1) -> onnx.ModelProto:
    """MViTv2's attention with one head: (1, 8, 4, 4) to (1, 1, 8, 16), where the batch may stay on
    axis 0 or move to the size-1 heads axis; later (1, 16, 1, 8) to (1, 16, 8) needs it on axis 0."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(8, 3, 1, 1), "heads": i64(n, 1, 8, 16), "tokens": i64(n, 16, 8), "wq": _w(8, 8), "wo": _w(8, 8),
             "fc": _w(128, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             _reshape("c", "heads", "h"),                                                # (1, 1, 8, 16)
             helper.make_node("Transpose", ["h"], ["t"], perm=[0, 1, 3, 2]),             # (1, 1, 16, 8)
             helper.make_node("MatMul", ["t", "wq"], ["q"]),
             helper.make_node("Transpose", ["t"], ["kt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]),                             # (1, 1, 16, 16)
             helper.make_node("Softmax", ["s"], ["a"], axis=-1),
             helper.make_node("MatMul", ["a", "t"], ["o"]),                              # (1, 1, 16, 8)
             helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),            # (1, 16, 1, 8)
             _reshape("ot", "tokens", "r"),                                               # (1, 16, 8)
             helper.make_node("MatMul", ["r", "wo"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3))


def row_lstm(n: int = 1) -> onnx.ModelProto:
    """Sequencer2D's mixing: a bidirectional LSTM along the columns, the batch merged with the rows
    ((4, 1, 4, 8) to (4, 4, 8)), and zero initial states stored for that batch of 1."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(8, 3, 1, 1), "seq": i64(4, 4 * n, 8), "flat": i64(n, 192), "fc": _w(192, 3),
             "W": _w(2, 24, 8).astype(np.float32), "R": _w(2, 24, 6).astype(np.float32),
             "B": (RNG.standard_normal((2, 48)) * 0.1).astype(np.float32),
             "h0": np.zeros((2, 4 * n, 6), np.float32), "c0": np.zeros((2, 4 * n, 6), np.float32)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),                                   # (1, 8, 4, 4)
             helper.make_node("Transpose", ["c"], ["t"], perm=[3, 0, 2, 1]),               # (W, 1, H, C)
             _reshape("t", "seq", "s"),                                                    # (W, 1*H, C)
             helper.make_node("LSTM", ["s", "W", "R", "B", "", "h0", "c0"], ["y"], hidden_size=6,
                              direction="bidirectional"),                                  # (4, 2, 4, 6)
             helper.make_node("Transpose", ["y"], ["yt"], perm=[2, 0, 1, 3]),              # (1*H, W, 2, 6)
             _reshape("yt", "flat", "f"),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3))


def expanded_merge(n: int = 1) -> onnx.ModelProto:
    """A per-group mean expanded back over its group, the batch merged with two groups: the Expand's
    shape names the merged axis's size at batch 1, (2, 4, 16)."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(8, 3, 1, 1), "groups": i64(2 * n, 4, 16), "last": i64(-1), "full": i64(2 * n, 4, 16),
             "flat": i64(n, 128), "w": _w(128, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             _reshape("c", "groups", "g"),                                                # (2N, 4, 16)
             helper.make_node("ReduceMean", ["g", "last"], ["m"], keepdims=1),
             helper.make_node("Expand", ["m", "full"], ["e"]),
             helper.make_node("Sub", ["g", "e"], ["d"]),
             _reshape("d", "flat", "f"),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=18)


def merged_heads(n: int = 1) -> onnx.ModelProto:
    """The batch and two heads merged into one axis, (2, 4, 16), then split again by (1, 2, 4, 16)."""
    inits = {"merge": np.array([2 * n, 4, 16], np.int64), "split": np.array([n, 2, 4, 16], np.int64),
             "flat": np.array([n, 128], np.int64), "w": _w(128, 3), "k": _w(8, 3, 1, 1)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             helper.make_node("Reshape", ["c", "merge"], ["heads"]),
             helper.make_node("Softmax", ["heads"], ["attn"], axis=-1),
             helper.make_node("Reshape", ["attn", "split"], ["split_heads"]),
             helper.make_node("Tanh", ["heads"], ["values"]),               # a second user of the same target
             helper.make_node("Reshape", ["values", "split"], ["split_values"]),
             helper.make_node("Mul", ["split_heads", "split_values"], ["mixed"]),
             helper.make_node("Reshape", ["mixed", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3))


def _at_file_batch(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The file's own outputs for the rows of `x`, run in runs of the batch it fixes (the last
    one filled with copies of its last row)."""
    n = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    out = []
    for start in range(0, len(x), n):
        rows = x[start:start + n]
        filled = np.concatenate([rows, np.repeat(rows[-1:], n - len(rows), axis=0)])
        out.append(_run(model, filled)[:len(rows)])
    return np.concatenate(out)


def shape_sized_windows(n: int = 1) -> onnx.ModelProto:
    """Swin's window attention as the TorchScript exporter writes it at a fixed batch: the padding
    to whole windows computed from ``Shape`` with a ``Mod`` (which shape inference does not
    evaluate, so nothing after it has known dims), and reshape targets concatenated from the
    file's batch and sizes read off shapes at run time."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(4, 3, 1, 1), "win": i64(4), "one": np.array(1, np.int64), "two": np.array(2, np.int64),
             "win_s": np.array(4, np.int64),
             "zero4": i64(0, 0, 0, 0),
             "zero1": i64(0), "ax0": i64(0), "batch": i64(n), "four": i64(4), "tok": i64(-1, 16, 4),
             "hw": i64(1, 2), "zeros2": i64(0, 0), "wq": _w(4, 4), "fc": _w(144, 3), "flat": i64(n, 144)}
    def piece(tensor: str, axis: str, out: str, per_window: bool) -> list:   # noqa: E306
        nodes = [helper.make_node("Shape", [tensor], [f"{out}_s"]),
                 helper.make_node("Gather", [f"{out}_s", axis], [f"{out}_g"], axis=0)]
        if per_window:
            nodes.append(helper.make_node("Div", [f"{out}_g", "win_s"], [f"{out}_d"]))
        return nodes + [helper.make_node("Unsqueeze", [f"{out}_d" if per_window else f"{out}_g", "ax0"], [out])]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),                                 # (n, 4, 6, 6)
             helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),             # (n, 6, 6, 4)
             *piece("t", "two", "w", False),                                            # (1,): 6
             helper.make_node("Mod", ["w", "win"], ["r"]),
             helper.make_node("Sub", ["win", "r"], ["p0"]),
             helper.make_node("Mod", ["p0", "win"], ["p"]),                               # 2: pad to 8
             helper.make_node("Concat", ["zero4", "zero1", "p", "p", "zero1"], ["pads"], axis=0),
             helper.make_node("Pad", ["t", "pads"], ["padded"]),                          # (n, 8, 8, 4)
             *piece("padded", "one", "nh", True),
             helper.make_node("Concat", ["batch", "nh", "win", "nh", "win", "four"], ["split_t"], axis=0),
             helper.make_node("Reshape", ["padded", "split_t"], ["split"]),               # (n, 2, 4, 2, 4, 4)
             helper.make_node("Transpose", ["split"], ["wins"], perm=[0, 1, 3, 2, 4, 5]),
             helper.make_node("Reshape", ["wins", "tok"], ["tokens"]),                    # (4n, 16, 4)
             helper.make_node("MatMul", ["tokens", "wq"], ["q"]),
             helper.make_node("Transpose", ["tokens"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
             helper.make_node("MatMul", ["attn", "tokens"], ["mixed"]),                   # (4n, 16, 4)
             helper.make_node("Concat", ["batch", "nh", "nh", "win", "win", "four"], ["back_t"], axis=0),
             helper.make_node("Reshape", ["mixed", "back_t"], ["back"]),                  # (n, 2, 2, 4, 4, 4)
             helper.make_node("Transpose", ["back"], ["merged"], perm=[0, 1, 3, 2, 4, 5]),
             *piece("padded", "one", "h", False),
             helper.make_node("Concat", ["batch", "h", "h", "four"], ["image_t"], axis=0),
             helper.make_node("Reshape", ["merged", "image_t"], ["image"]),               # (n, 8, 8, 4)
             helper.make_node("Shape", ["t"], ["ts"]),
             helper.make_node("Gather", ["ts", "hw"], ["ends"], axis=0),
             helper.make_node("Slice", ["image", "zeros2", "ends", "hw"], ["cropped"]),   # (n, 6, 6, 4)
             helper.make_node("Reshape", ["cropped", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 6, 6), (n, 3))


def expanded_positions(n: int = 1) -> onnx.ModelProto:
    """ConViT's gated positional attention: stored relative positions expanded to the file's batch
    (``rel_indices.expand(B, -1, -1, -1)``), projected and squashed without any input data, then
    mixed with the image's own attention scores."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(4, 3, 2, 2), "to_tokens": i64(n, 4, 4), "rel": RNG.standard_normal((1, 4, 4, 3)).astype(np.float32),
             "rel_shape": i64(n, 4, 4, 3), "pos": _w(3, 2), "wq": _w(4, 4), "gate": np.float32(0.3),
             "flat": i64(n, 16), "fc": _w(16, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], strides=[2, 2]),                 # (n, 4, 2, 2)
             helper.make_node("Reshape", ["c", "to_tokens"], ["t0"]),                      # (n, 4, 4)
             helper.make_node("Transpose", ["t0"], ["t"], perm=[0, 2, 1]),                 # (n, 4 tokens, 4)
             helper.make_node("MatMul", ["t", "wq"], ["q"]),
             helper.make_node("Transpose", ["t"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),                          # (n, 4, 4)
             helper.make_node("Unsqueeze", ["scores", "one"], ["s4"]),                     # (n, 4, 1, 4)
             helper.make_node("Expand", ["rel", "rel_shape"], ["rel_n"]),                  # (n, 4, 4, 3): stored only
             helper.make_node("MatMul", ["rel_n", "pos"], ["p"]),                          # (n, 4, 4, 2)
             helper.make_node("Softmax", ["p"], ["ps"], axis=2),
             helper.make_node("Mul", ["ps", "gate"], ["pg"]),
             helper.make_node("Transpose", ["pg"], ["pt"], perm=[0, 1, 3, 2]),             # (n, 4, 2, 4)
             helper.make_node("Add", ["s4", "pt"], ["mixed"]),                             # (n, 4, 2, 4)
             helper.make_node("Softmax", ["mixed"], ["a"], axis=-1),
             helper.make_node("ReduceSum", ["a", "one"], ["r"], keepdims=0),               # (n, 4, 4)
             helper.make_node("MatMul", ["r", "t"], ["o"]),                                # (n, 4, 4)
             helper.make_node("Reshape", ["o", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    inits["one"] = i64(2)
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=18)


def baked_batch(n: int = 1) -> onnx.ModelProto:
    """What an exporter at a fixed batch computes from stored tensors with that batch in it: a sine
    encoding repeated per sample (XCiT's ``.repeat(N, 1, 1, 1)``), a token folded into a stored
    (N, 1, 4) (CaiT), and zero LSTM states built by ``ConstantOfShape`` for N times the rows."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(4, 3, 1, 1), "pe": RNG.standard_normal((1, 4, 2, 2)).astype(np.float32),
             "reps": i64(n, 1, 1, 1), "tok": np.repeat(_w(1, 1, 4), n, axis=0), "to_tokens": i64(n, 4, 4),
             "grid": i64(n, 2, 2, 4), "seq": i64(2, 2 * n, 4), "state": i64(1, 2 * n, 3), "W": _w(1, 12, 4),
             "R": _w(1, 12, 3), "back": i64(2, 1, n, 2, 3), "flat": i64(n, 12), "fc": _w(12, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], strides=[2, 2]),                 # (n, 4, 2, 2)
             helper.make_node("Tile", ["pe", "reps"], ["pe_n"]),                          # (n, 4, 2, 2): stored only
             helper.make_node("Sin", ["pe_n"], ["enc"]),
             helper.make_node("Add", ["c", "enc"], ["h"]),
             helper.make_node("Reshape", ["h", "to_tokens"], ["t0"]),                      # (n, 4, 4)
             helper.make_node("Transpose", ["t0"], ["t"], perm=[0, 2, 1]),                 # (n, 4 tokens, 4)
             helper.make_node("Add", ["t", "tok"], ["u"]),                                 # tok: (n, 1, 4) stored
             helper.make_node("Reshape", ["u", "grid"], ["g"]),                            # (n, rows, cols, 4)
             helper.make_node("Transpose", ["g"], ["v"], perm=[2, 0, 1, 3]),               # (cols, n, rows, 4)
             helper.make_node("Reshape", ["v", "seq"], ["s"]),                             # (2, n*2 rows, 4)
             helper.make_node("ConstantOfShape", ["state"], ["h0"]),                       # zeros (1, 2n, 3)
             helper.make_node("LSTM", ["s", "W", "R", "", "", "h0", "h0"], ["y"], hidden_size=3),   # (2, 1, 2n, 3)
             helper.make_node("Reshape", ["y", "back"], ["y5"]),                           # (cols, 1, n, rows, 3)
             helper.make_node("Transpose", ["y5"], ["yt"], perm=[2, 3, 0, 1, 4]),          # (n, rows, cols, 1, 3)
             helper.make_node("Reshape", ["yt", "flat"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=18)


def shared_target_fold(n: int = 1) -> onnx.ModelProto:
    """MobileViT-V2 as the dynamo exporter writes it: one stored shape serves a Reshape's target and
    an Expand's shape (a 0 that copies the batch in the one would empty the other), and the patches
    are folded back into a map by ``Col2Im``, then viewed with ``allowzero=1``."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(8, 3, 1, 1), "tokens": i64(n, 8, 16), "last": i64(2), "image": i64(8, 8), "block": i64(2, 2),
             "flat": i64(n, 128), "w": _w(128, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             helper.make_node("Reshape", ["c", "tokens"], ["t"]),                   # (N, 8, 16)
             helper.make_node("ReduceSum", ["t", "last"], ["s"], keepdims=1),
             helper.make_node("Expand", ["s", "tokens"], ["e"]),                    # the same stored shape
             helper.make_node("Mul", ["t", "e"], ["p"]),
             helper.make_node("Col2Im", ["p", "image", "block"], ["folded"], strides=[2, 2]),   # (N, 2, 8, 8)
             _reshape("folded", "flat", "f"),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return _model(nodes, inits, (n, 3, 4, 4), (n, 3), opset=18)


@pytest.mark.parametrize("file_batch", [1, 4])
@pytest.mark.parametrize("build", [vit_like, strided_head, einsum_windows, merged_heads, resized_gate,
                                   spatial_transformer, one_head_pooling, row_lstm, expanded_merge,
                                   shape_sized_windows, expanded_positions, baked_batch, shared_target_fold])
def test_a_graph_exported_at_a_fixed_batch_runs_each_row_as_the_file_does(build, file_batch):
    """Exported at batch 1 or 4 (the targets, the class token, the strided indices and the sizes
    written for that batch), run at batch 3 and 1."""
    model = build(file_batch)
    x = RNG.standard_normal((3,) + tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)[1:])
    x = x.astype(np.float32)
    with pytest.raises(Exception):
        _run(model, x)                                   # the file itself takes its own batch only
    free = normalize(model)
    onnx.checker.check_model(free)
    np.testing.assert_allclose(_run(free, x), _at_file_batch(model, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_run(free, x[1:2]), _at_file_batch(model, x[1:2]), rtol=1e-5, atol=1e-6)
    check_vjp(free, "logits", ["x"], {"x": x})


def test_the_tracer_reads_each_reshape_as_the_ops_after_it_need():
    """(5, 1, 8) to (5, 2, 4) puts the batch in front of the heads; (5, 1, 2, 4) to (5, 8) puts it
    inside the tokens, since the Gemm after it needs all 8 features: the second reading there."""
    model = upgrade_opset(vit_like())
    tracer = batch_axis.Tracer(model.graph, inferred_dims(model), _const_values(model.graph), ["x"])
    assert tracer.where["s"] == (1, 1)          # sequence first
    assert tracer.where["q1"] == (1, 2)         # (5, N*2, 4): the batch outside the two heads
    assert tracer.where["q3"] == (0, 1)
    assert tracer.where["flat"] == (0, 1)       # (5*N, 8): the batch inside the five tokens
    assert tracer.where["cls_out"] == (0, 1)
    # of two size-1 axes the batch takes the one nearest its own: (1, 8, 4, 4) to (1, 1, 8, 16) keeps it first
    model = upgrade_opset(one_head_pooling())
    tracer = batch_axis.Tracer(model.graph, inferred_dims(model), _const_values(model.graph), ["x"])
    assert tracer.where["h"] == (0, 1) and tracer.where["r"] == (0, 1)


@pytest.mark.parametrize("target, want", [((8, 3), (0, 2)), ((24,), (0, 6)), ((4, 2, 3), (0, 1)),
                                          ((2, 12), (batch_axis.LOST, 0)), ((3, 8), (batch_axis.LOST, 0))])
def test_a_reading_at_a_fixed_batch_holds_every_sample(target, want):
    """At a fixed batch of 4, (4, 6) reshaped to (2, 12) would put two samples in one row, and
    (3, 8) splits them across rows: neither is a reading, though each keeps a sample's elements
    together at batch 1."""
    model = _model([helper.make_node("Reshape", ["x", "t"], ["logits"])], {"t": np.array(target, np.int64)},
                   (4, 6), target)
    tracer = batch_axis.Tracer(model.graph, inferred_dims(model), _const_values(model.graph), ["x"], batch=4)
    assert tracer.where["logits"] == want


def unfreeable_batch_4() -> onnx.ModelProto:
    """A file fixed at batch 4 whose batch the trace loses (an Einsum with an ellipsis) before a
    Reshape that merges it with the channels, (4, 8, 1, 1) to (32, 1): it runs at batch 4 alone."""
    inits = {"k": _w(8, 3, 3, 3), "merge": np.array([32, -1], np.int64), "rows": np.array([4, 8], np.int64),
             "fc": _w(8, 5)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Tanh", ["c"], ["r"]),         # smooth: central differences hold everywhere
             helper.make_node("Einsum", ["r"], ["e"], equation="...ij->...ij"),
             helper.make_node("GlobalAveragePool", ["e"], ["p"]),
             helper.make_node("Reshape", ["p", "merge"], ["m"]),
             helper.make_node("Reshape", ["m", "rows"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    return _model(nodes, inits, (4, 3, 8, 8), (4, 5))


def test_stored_copies_per_sample_are_rebuilt_only_when_all_equal():
    """The encoding, token and zero states baked for a batch of 4 hold equal copies; a stored
    (4, 1, 4) with a different row per sample is not one copy per sample and stays as it is."""
    from onnxsal.graph.normalize import batch_tracer, fold_integer_constants

    model = baked_batch(4)
    assert set(batch_tracer(fold_integer_constants(upgrade_opset(model))).per_sample) == {"enc", "tok", "h0"}
    for init in model.graph.initializer:
        if init.name == "tok":
            init.CopyFrom(numpy_helper.from_array(_w(4, 1, 4), "tok"))
    assert set(batch_tracer(fold_integer_constants(upgrade_opset(model))).per_sample) == {"enc", "h0"}


def test_a_file_whose_fixed_batch_cannot_be_freed_runs_filled_to_that_batch():
    """Every run takes the file's 4 rows, the last image repeated to fill them; the gradient is the
    file's own (central differences, all channels of a pixel moved at once for the summed map)."""
    model = unfreeable_batch_4()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    res = ex.explain(x, method="saliency", target=2, reduce="sum")
    assert any("filled to 4 rows" in n for n in res.notes)
    eps, moved = 1e-3, []
    for i in range(8):
        for j in range(8):
            for sign in (1, -1):
                xp = x[0].copy()
                xp[:, i, j] += sign * eps
                moved.append(xp)
    scores = _at_file_batch(model, np.stack(moved))[:, 2].reshape(64, 2)
    want = ((scores[:, 0] - scores[:, 1]) / (2 * eps)).reshape(8, 8)
    np.testing.assert_allclose(res.raw[0], want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    smooth = ex.explain(x, method="smoothgrad", n_samples=6, target=2)
    one = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=1).explain(x, method="smoothgrad",
                                                                                 n_samples=6, target=2)
    np.testing.assert_allclose(smooth.raw, one.raw, rtol=1e-5, atol=1e-7)
    # the exported explainer takes any batch, which this graph cannot: refused, not written broken
    with pytest.raises(MethodError, match="only at the batch of 4"):
        export(model, "gradcam")
    # DeepLIFT's input and baseline rows must run together: a typed error, not ONNX Runtime's
    with pytest.raises(ModelError, match="runs 2 rows together.*batch of 4"):
        ex.explain(x, method="deeplift", target=2)


def test_the_exported_explainer_of_a_freed_fixed_batch_runs_at_any_batch():
    model = vit_like(4)
    graph = export(model, "smoothgrad", n_samples=4)
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    logits, maps = sess.run(None, {"x": x, "target": np.array([0, 2], np.int64)})
    np.testing.assert_allclose(logits, _at_file_batch(model, x), rtol=1e-5, atol=1e-6)
    assert maps.shape == (2, 8, 8) and np.isfinite(maps).all()


def test_explanations_of_a_batch_1_export_run_batched_and_match_one_row_runs():
    res = _smoothgrad_both_ways(vit_like())
    assert not any("one row" in n or "one image at a time" in n for n in res.notes)


def test_a_batch_the_graph_reads_across_stays_one_row_at_a_time():
    """``x.squeeze(0)`` in a model written for one image: no reading of the batch survives it."""
    inits = {"k": _w(4, 3, 1, 1), "axes": np.array([0], np.int64), "flat": np.array([1, 64], np.int64),
             "w": _w(64, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]),
             helper.make_node("Squeeze", ["c", "axes"], ["s"]),
             helper.make_node("Relu", ["s"], ["r"]),
             _reshape("r", "flat", "f"),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    model = _model(nodes, inits, (1, 3, 4, 4), (1, 3))
    tracer = batch_axis.Tracer(upgrade_opset(model).graph, inferred_dims(model), _const_values(model.graph), ["x"])
    assert tracer.axes["s"] == batch_axis.LOST and tracer.axes["logits"] == batch_axis.LOST
    res = _smoothgrad_both_ways(model)
    assert any("one row at a time" in n for n in res.notes)


@pytest.mark.parametrize("equation, ins, want", [
    ("bij,jk->bik", [0, None], 0),          # a weight on one side
    ("bghij,bghjd->bghid", [0, 0], 0),
    ("ibj,jk->kbi", [1, None], 1),
    ("bij,bjk->ik", [0, 0], batch_axis.LOST),        # sums over the batch
    ("bij,bjk->bik", [0, None], batch_axis.LOST),    # a stored operand with the batch's letter
    ("bij,bjk->bik", [0, 1], batch_axis.LOST),       # two operands batched on different letters
    ("...ij,jk->...ik", [0, None], batch_axis.LOST),
])
def test_an_einsum_keeps_the_batch_only_on_its_own_letter(equation, ins, want):
    node = helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)
    assert batch_axis._einsum_axis(None, node, ins) == want


def _reads_across(kind: str) -> onnx.ModelProto:
    """A graph written for one image that reads across its batch without failing at another one:
    ``c + c.mean(0)`` or ``c + c[0]``. At batch 1 both are the file's function; at batch 4 they
    would mix the four samples."""
    inits = {"k": _w(4, 3, 1, 1), "axes": np.array([0], np.int64), "zero": np.array(0, np.int64), "w": _w(64, 3)}
    if kind == "mean":
        across = [helper.make_node("ReduceMean", ["c", "axes"], ["m"], keepdims=1)]
    else:
        across = [helper.make_node("Gather", ["c", "zero"], ["row"], axis=0),
                  helper.make_node("Unsqueeze", ["row", "axes"], ["m"])]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"]), *across,
             helper.make_node("Add", ["c", "m"], ["s"]),
             helper.make_node("Tanh", ["s"], ["t"]),
             helper.make_node("Flatten", ["t"], ["f"]),          # runs at any batch: nothing fails
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    return _model(nodes, inits, (1, 3, 4, 4), (1, 3), opset=18)


@pytest.mark.parametrize("kind, op", [("mean", "ReduceMean"), ("row", "Gather")])
def test_a_graph_that_reads_across_its_batch_runs_every_image_alone(kind, op, tmp_path, capsys):
    model = _reads_across(kind)
    found = one_image_ops(upgrade_opset(model))
    assert len(found) == 1 and found[0].startswith(op)
    res = _smoothgrad_both_ways(model)
    assert any("reads across its batch" in n for n in res.notes)
    with pytest.raises(MethodError, match="reads across its batch"):
        export(model, "smoothgrad")
    assert export(model, "saliency") is not None
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["inspect", str(tmp_path / "m.onnx")]) == 0
    assert f"one image at a time: the graph reads across its batch ({op}" in capsys.readouterr().out


def test_ordinary_graphs_read_nothing_across_their_batch():
    for build in (vit_like, strided_head, einsum_windows, merged_heads, resized_gate, spatial_transformer,
                  one_head_pooling, row_lstm, expanded_merge):
        assert one_image_ops(upgrade_opset(build())) == []


def test_a_mix_the_trace_cannot_see_is_caught_by_one_run_at_load():
    """An op the trace does not follow (an Einsum with an ellipsis) hides a Resize whose sizes name the
    batch of 1: at batch 4 it would squeeze the gates to one row without an error. The Explainer runs
    two images together and alone once, sees them differ, and runs one image at a time."""
    inits = {"k": _w(4, 3, 3, 3), "sizes": np.array([1, 4, 4, 4], np.int64), "w": _w(64, 3)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Einsum", ["p"], ["q"], equation="...hw->...hw"),
             helper.make_node("Sigmoid", ["q"], ["g"]),
             helper.make_node("Resize", ["g", "", "", "sizes"], ["up"], mode="nearest"),
             helper.make_node("Mul", ["c", "up"], ["gated"]),
             helper.make_node("Flatten", ["gated"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    model = _model(nodes, inits, (1, 3, 4, 4), (1, 3), opset=18)
    assert one_image_ops(upgrade_opset(model)) == []            # the trace lost the batch at the Einsum
    res = _smoothgrad_both_ways(model)
    assert any("a run of two images differed from each image run alone" in n for n in res.notes)
    with pytest.raises(MethodError, match="a run of two images differed"):
        export(model, "ig")


def _shape_pieces(batch_free: bool) -> onnx.ModelProto:
    """A reshape target cut out of the tensor's own shape at a position the graph computes: from
    constants alone (``Mod(2, 3)``, as TorchScript writes nn.MultiheadAttention's ``unflatten``),
    or, after a ``squeeze(0)`` that pins the graph to one image, from the shape itself."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = {"k": _w(8, 3, 1, 1), "start": i64(0), "axis0": i64(0), "three": np.array(3, np.int64),
             "idx0": np.array(0, np.int64)}
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"])]                                  # (1, 8, 4, 4)
    if batch_free:                      # t (1, 8, 16); r (1, 8, 2, 8)
        inits.update({"flat3": i64(1, 8, 16), "two": np.array(2, np.int64), "rest": i64(2, 8),
                      "flatw": i64(1, 16), "w": _w(16, 3)})
        nodes += [_reshape("c", "flat3", "t"),
                  helper.make_node("Mod", ["two", "three"], ["m"])]                        # 2, from constants
    else:                               # t (8, 4, 4); r (8, 4, 4)
        inits.update({"rest": i64(-1), "flatw": i64(1, 16), "w": _w(16, 3)})
        nodes += [helper.make_node("Squeeze", ["c", "axis0"], ["t"]),
                  helper.make_node("Shape", ["t"], ["ts"]),
                  helper.make_node("Gather", ["ts", "idx0"], ["g"]),
                  helper.make_node("Mod", ["g", "three"], ["m"])]                          # 2, from the shape
    nodes += [helper.make_node("Unsqueeze", ["m", "axis0"], ["end"]),
              helper.make_node("Shape", ["t"], ["shape"]),
              helper.make_node("Slice", ["shape", "start", "end"], ["head"]),
              helper.make_node("Concat", ["head", "rest"], ["target"], axis=0),
              helper.make_node("Reshape", ["t", "target"], ["r"]),
              helper.make_node("ReduceSum", ["r", "start"], ["s"], keepdims=0, noop_with_empty_axes=0)
              if not batch_free else helper.make_node("ReduceSum", ["r", "last"], ["s"], keepdims=0),
              helper.make_node("Tanh", ["s"], ["th"]),
              helper.make_node("Reshape", ["th", "flatw"], ["f"]),
              helper.make_node("MatMul", ["f", "w"], ["logits"])]
    inits["last"] = i64(-1)
    return _model(nodes, inits, (1, 3, 4, 4), (1, 3), opset=18)


def test_shape_pieces_computed_from_constants_are_folded_so_ranks_are_known():
    model = _shape_pieces(batch_free=True)
    shapes = tensor_shapes(normalize(model))
    assert shapes["r"][1] == (None, 8, 2, 8)             # without the fold its rank is unknown
    x = RNG.standard_normal((3, 3, 4, 4)).astype(np.float32)
    free = normalize(model)
    np.testing.assert_allclose(_run(free, x), _per_row(model, x), rtol=1e-5, atol=1e-6)
    check_vjp(free, "logits", ["x"], {"x": x})


def test_a_graph_pinned_to_one_image_gets_its_shapes_from_a_one_image_run():
    """The shape pieces depend on the shape itself, so nothing folds them and inference loses the rank;
    the run at batch 2 that would tell which axes follow the batch fails, since the graph squeezes
    its batch. It runs one image at a time, so the one-image run's shapes are its shapes."""
    model = _shape_pieces(batch_free=False)
    x = RNG.standard_normal((1, 3, 4, 4)).astype(np.float32)
    g = onnxsal.vjp(normalize(model), "logits", ["x"])         # refused before: "rank of 'r' unknown"
    sess = ort.InferenceSession(g.SerializeToString(), providers=["CPUExecutionProvider"])
    grad = sess.run(["grad_x"], {"x": x, "grad_logits": np.eye(3, dtype=np.float32)[1:2]})[0]
    want = np.zeros_like(x)                                   # central differences of the file, one image each
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += 1e-2
        down[i] -= 1e-2
        want[i] = (_run(model, up)[0, 1] - _run(model, down)[0, 1]) / 2e-2
    np.testing.assert_allclose(grad, want, rtol=2e-2, atol=2e-3 * np.abs(want).max())
    res = onnxsal.Explainer(model, "cpu", preprocess="raw").explain(x, method="saliency", target=1)
    one = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=1).explain(x, method="saliency", target=1)
    np.testing.assert_allclose(res.raw, one.raw, rtol=1e-6)


@pytest.mark.parametrize("nodes,flagged", [
    ([("ReduceMean", ["x"], {"keepdims": 0})], True),                       # every axis, the batch's too
    ([("ReduceMean", ["x"], {"axes": [2, 3]})], False),
    ([("ReduceSum", ["x"], {"axes": [-4]})], True),
    ([("Shape", ["x"], {}), ("Gather", ["o0", "zero"], {"axis": 0})], False),   # shape arithmetic
    ([("Softmax", ["x"], {"axis": 0})], True),
    ([("Softmax", ["x"], {"axis": 1})], False),
    ([("Transpose", ["x"], {"perm": [1, 0, 2, 3]})], True),
    ([("Transpose", ["x"], {"perm": [0, 2, 3, 1]})], False),
    ([("Reshape", ["x", "one_row"], {})], True),
    ([("Reshape", ["x", "rows"], {})], False),
    ([("Flatten", ["x"], {"axis": 0})], True),
    ([("Flatten", ["x"], {})], False),
])
def test_the_screen_for_free_batch_graphs_that_could_mix_rows(nodes, flagged):
    """`may_mix_rows` decides whether a free-batch model gets the load-time check of two images run
    together against each alone: only graphs with a node that could read across the batch do."""
    from onnx import numpy_helper

    from onnxsal.graph.batch_axis import may_mix_rows

    consts = {"zero": numpy_helper.from_array(np.array(0, np.int64), "zero"),
              "one_row": numpy_helper.from_array(np.array([1, -1], np.int64), "one_row"),
              "rows": numpy_helper.from_array(np.array([0, -1], np.int64), "rows")}
    g = helper.make_graph([helper.make_node(op, ins, [f"o{k}"], name=f"n{k}", **attrs)
                           for k, (op, ins, attrs) in enumerate(nodes)], "g", [], [])
    found = may_mix_rows(g, {"x": 4, "o0": 1}, consts)
    assert (found is not None) == flagged, found
