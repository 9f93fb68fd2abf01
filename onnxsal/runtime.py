"""The one place that creates ONNX Runtime sessions and runs batches.

Sessions are cached per derived graph (forward, exposed, VJP...), so a second
explanation on the same model pays no graph-building or session cost.
`device="auto"` tries CUDA and checks what ONNX Runtime really gave us:
onnxruntime-gpu silently falls back to CPU when CUDA/cuDNN libraries are
missing, and a user must be told which device ran.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import DeviceError, ModelError
from .graph.normalize import tensor_shapes
from .graph.weights import for_session

Progress = Callable[[int, int], None]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _preload_cuda() -> None:
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception:
        pass


class Runtime:
    """Sessions for one device, cached by key; batched runs under a memory budget."""

    def __init__(self, device: str = "auto", threads: Optional[int] = None, memory_mb: int = 1024) -> None:
        self.requested = device
        self.threads = threads or _cores()
        self.memory_mb = memory_mb
        self._sessions: dict[str, ort.InferenceSession] = {}
        self.one_row = False          # a session fell back to one row per run (see run_batched)
        self.one_image = False        # the model reads across its batch: every run takes one row
        self.fixed_rows = 0           # the batch the model's file fixed (0: free), for padded runs
        self.padded = False           # a session ran padded to `fixed_rows` (see run_batched)
        self.device = "cpu"
        self._providers: list = ["CPUExecutionProvider"]
        self._device_id = 0
        self._choose(device)

    def _choose(self, device: str) -> None:
        if device is not None and not isinstance(device, str):
            raise DeviceError(f"device is a name (auto, cpu, cuda or cuda:N), not {type(device).__name__} {device!r}")
        device = (device or "auto").lower()
        if device == "cpu":
            return
        if not (device == "auto" or device == "cuda" or device.startswith("cuda:")):
            raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
        if device.startswith("cuda:"):       # the spelling first: it is wrong on any machine
            number = device.split(":", 1)[1]
            if not number.isdigit():
                raise DeviceError(f"bad device {device!r}; use cuda:N with N a GPU number from 0")
            self._device_id = int(number)
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            if device == "auto":
                return
            raise DeviceError("CUDA was requested but this onnxruntime has no CUDA provider; install onnxsal[gpu]")
        _preload_cuda()
        if self._probe_cuda():
            self._providers = [("CUDAExecutionProvider", {"device_id": self._device_id}), "CPUExecutionProvider"]
            self.device = f"cuda:{self._device_id}"
        elif device != "auto":
            raise DeviceError("CUDA was requested but onnxruntime could not start it (CUDA 13 / cuDNN 9 libraries not found)")

    def _probe_cuda(self) -> bool:
        """Run a one-node graph on CUDA and check the provider really took it."""
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        try:
            sess = ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=[("CUDAExecutionProvider", {"device_id": self._device_id})])
            return "CUDAExecutionProvider" in sess.get_providers()
        except Exception:
            return False

    def session(self, key: str, build: Callable[[], onnx.ModelProto]) -> ort.InferenceSession:
        """The cached session for `key`, building its model with `build()` the first time."""
        sess = self._sessions.get(key)
        if sess is None:
            model, arrays = for_session(build())
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 4     # ONNX Runtime's failures come back as exceptions, said in one line
            shapes = tensor_shapes(model)
            dense = _row_matrix_bytes(model, arrays, shapes) > PREPACK_LIMIT
            if dense:
                opts.add_session_config_entry("session.disable_prepacking", "1")
            sess = open_session(model, arrays, opts, self._providers)
            rows = _row_bytes(model, shapes)
            sess._onnxsal_per_sample = max(sum(rows), 1)  # type: ignore[attr-defined]
            # Large dense layers are read once per run: fewer, fuller runs beat cache locality there.
            sess._onnxsal_largest_row = 0 if dense else max(rows, default=1)  # type: ignore[attr-defined]
            self._sessions[key] = sess
        return sess

    def batch_size(self, sess: ort.InferenceSession, requested: Optional[int] = None) -> int:
        """Rows per run: `requested`, else what the memory budget allows, and on CPU no more than
        keeps the largest activation of a run within CPU_CHUNK_BYTES (see there)."""
        if self.one_image or getattr(sess, "_onnxsal_one_row", False):
            return 1
        if requested:
            return max(1, int(requested))
        per = getattr(sess, "_onnxsal_per_sample", 0) or 1
        rows = max(1, min(64, (self.memory_mb * 2**20) // per))
        largest = getattr(sess, "_onnxsal_largest_row", 0)
        if self.device == "cpu" and largest:
            rows = min(rows, max(CPU_CHUNK_MIN_ROWS, CPU_CHUNK_BYTES // largest))
        return int(rows)

    def run_batched(self, sess: ort.InferenceSession, batched: dict, fixed: Optional[dict] = None,
                    outputs: Optional[Sequence[str]] = None, batch_size: Optional[int] = None,
                    progress: Optional[Progress] = None, whole: bool = False) -> list[np.ndarray]:
        """Run `batched` feeds (same leading size) in chunks; `fixed` feeds are broadcast to each chunk.

        A run of several rows that fails is run again one row at a time, and so is every later run
        of that session. Where one row fails too and the file fixed a larger batch (`fixed_rows`),
        every run takes exactly that many rows, the last row repeated to fill them. `whole` (rows
        that must run together) raises instead."""
        n = len(next(iter(batched.values())))
        pad_to = getattr(sess, "_onnxsal_pad_rows", 0)
        bs = pad_to or equal_chunks(n, self.batch_size(sess, batch_size))
        parts: list[list[np.ndarray]] = []
        start = 0
        while start < n:
            stop = min(n, start + bs)
            rows = max(pad_to, stop - start)           # rows in this run, padding included
            feeds = {k: _fill(v[start:stop], rows) for k, v in batched.items()}
            for k, v in (fixed or {}).items():
                feeds[k] = np.broadcast_to(v, (rows,) + v.shape[1:]).copy() if v.shape[0] == 1 else v
            try:
                # a run of several rows may fail where one row runs (see below): ONNX Runtime's own
                # error line for it would only alarm, since the rows are run again one at a time
                recoverable = rows > 1 or (self.fixed_rows > 1 and not pad_to)
                got = sess.run(list(outputs) if outputs else None, feeds, _QUIET if recoverable else None)
                if rows > 1 and any(np.ndim(v) == 0 or len(v) != rows for v in got):
                    # rows in, another number out: the graph fixed its batch where onnxsal could not free it
                    raise ValueError("a batched run returned another number of rows")
                parts.append([v[:stop - start] for v in got])
            except Exception as exc:
                if whole and self.fixed_rows > 1 and rows != self.fixed_rows:
                    raise ModelError(f"this method runs {rows} rows together, and the model's graph may run only at "
                                     f"the batch of {self.fixed_rows} its file fixes: {ort_reason(exc)}") from exc
                if whole or pad_to:
                    raise _unrunnable(exc, pad_to) from exc
                if stop - start == 1:
                    if self.fixed_rows <= 1:
                        raise _unrunnable(exc, 0) from exc
                    # a file that fixed a batch of several rows where onnxsal cannot free it: it
                    # runs at that batch alone, so every run fills it
                    pad_to = sess._onnxsal_pad_rows = self.fixed_rows  # type: ignore[attr-defined]
                    self.padded = True
                    bs = pad_to
                    continue
                # an export that baked a batch of 1 into its graph where onnxsal cannot free it (a
                # reshape that merges the batch with attention heads): one row per run from here on
                sess._onnxsal_one_row = True  # type: ignore[attr-defined]
                self.one_row = True
                bs = 1
                continue
            if progress:
                progress(stop, n)
            start = stop
        return [np.concatenate([p[i] for p in parts], axis=0) for i in range(len(parts[0]))]


def _fill(rows: np.ndarray, size: int) -> np.ndarray:
    """`rows`, its last row repeated up to `size` rows."""
    if len(rows) >= size:
        return rows
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def ort_reason(exc: Exception) -> str:
    """ONNX Runtime's reason, without its status prefix and, where it failed a check of its own
    (`file.h:88 signature condition was false. message`), without the C++ location and condition
    when a message follows them: that is the part a user can act on."""
    line = next((part.strip() for part in str(exc).splitlines() if part.strip()), type(exc).__name__)
    line = _STATUS.sub("", line)
    check = _CHECK.search(line)
    if check and check.group(2).strip():
        line = line[:check.start()] + check.group(2).strip()
    return line


_STATUS = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_CHECK = re.compile(r"/onnxruntime_src/\S+:\d+ (.*) was false\.(.*)$")


def _unrunnable(exc: Exception, padded: int) -> ModelError:
    """ONNX Runtime's failure of a run as one line."""
    how = f" at the batch of {padded} its file fixes" if padded else ""
    return ModelError(f"ONNX Runtime could not run the model{how}: {ort_reason(exc)}")


PREPACK_LIMIT = 64 << 20
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4

# On CPU a run's rows are capped so that its largest activation stays near 16 MiB: a layer's output
# is then still in the processor's cache when the next layer reads it. Measured on 2 cores, per map,
# against runs of every row the memory budget allows (benchmarks/bench_chunks.py): MobileNetV2's
# SmoothGrad, IG and RISE ran 1.02-1.34x faster at 4 rows a run across four runs (its expanded
# activations are 4.8 MB a row), ResNet-50's the same within noise at 5 rows (3.2 MB a row); on raw
# sessions 8 rows were slower than 4 on both. The floor keeps a few rows per run where one row alone
# is that large. Graphs with more than PREPACK_LIMIT of dense weights that multiply one row per
# sample are left uncapped: each run reads them once, and VGG16 (480 MB of them) ran its SmoothGrad
# 8 % slower at 4 rows than at 7. GPUs keep the memory budget's batches.
CPU_CHUNK_BYTES = 16 << 20
CPU_CHUNK_MIN_ROWS = 4


def open_session(model: onnx.ModelProto, arrays: dict[str, np.ndarray], opts: ort.SessionOptions,
                 providers: list) -> ort.InferenceSession:
    """A session on a graph split by `weights.for_session`: its large weights `arrays` go in as
    external initializers, which ONNX Runtime uses in place on CPU instead of parsing a serialised
    copy; the session keeps them alive."""
    values = [ort.OrtValue.ortvalue_from_numpy(a if a.flags.c_contiguous else a.copy(order="C")) for a in arrays.values()]
    if values:
        opts.add_external_initializers(list(arrays), values)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    except Exception as exc:        # the graph breaks one of ONNX Runtime's own rules (a pad as large as its kernel)
        raise ModelError(f"ONNX Runtime could not load the model: {ort_reason(exc)}") from exc
    sess._onnxsal_weights = values  # type: ignore[attr-defined]
    return sess


def _row_matrix_bytes(model: onnx.ModelProto, arrays: dict, shapes: Optional[dict] = None) -> int:
    """Bytes of constant weight matrices that only ever multiply one row per sample (2-D Gemm/MatMul).

    ONNX Runtime repacks every constant GEMM operand when a session starts. For a classifier's
    fully connected layers (VGG16: 480 MB) that costs 1-2 s per session and buys nothing: with a
    few rows per run the product is bound by reading the weight once. Above PREPACK_LIMIT the
    session skips packing (measured: VGG16 runs equally fast, sessions start 1-2 s sooner).
    Matrices that multiply many rows (a transformer's tokens) are not counted; they gain from it.
    """
    shapes = tensor_shapes(model) if shapes is None else shapes
    total = 0
    for n in model.graph.node:
        if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in arrays:
            a_shape = shapes.get(n.input[0], (0, None))[1]
            if n.op_type == "Gemm" or (a_shape is not None and len(a_shape) == 2):
                total += arrays[n.input[1]].nbytes
    return total


def _row_bytes(model: onnx.ModelProto, shapes: dict) -> list[int]:
    """Each intermediate tensor's size per sample. Their sum is a rough peak-memory bound for one
    batch row; the largest is what a run streams through the cache."""
    inits = {i.name for i in model.graph.initializer}
    return [int(np.prod([d or 1 for d in shape[1:]])) * 4
            for name, (_, shape) in shapes.items() if name not in inits and shape]


def equal_chunks(n: int, cap: int) -> int:
    """Rows per run for ``n`` rows in equal runs under ``cap``: 20 rows at cap 16 run as 10 + 10, not 16 + 4."""
    return -(-n // -(-n // cap))
