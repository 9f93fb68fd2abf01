"""How many rows a run takes: the memory budget everywhere, and on CPU a cap from the largest activation."""

from __future__ import annotations

import numpy as np
import pytest

import onnxsal
from onnxsal import runtime as rt_mod
from onnxsal.graph.surgery import expose
from onnxsal.model import load
from onnxsal.runtime import Runtime

import tiny

SIZE = 64
ROW = 4 * SIZE * SIZE * 4          # conv1's output, 4 channels at 64x64: the largest tensor of a row


def _session(rt: Runtime):
    m = load(tiny.conv_net(size=SIZE))
    return rt.session("expose", lambda: expose(m.light, [m.logits]))


@pytest.mark.parametrize("cache_rows, memory_mb, device, expected", [
    (10, 1024, "cpu", 10),         # the cache cap
    (2, 1024, "cpu", 4),           # never under the floor of 4 rows
    (10, 1024, "cuda:0", 64),      # GPUs keep the memory budget's batches
    (10, 0, "cpu", 1),             # a budget smaller than a row still runs one row
])
def test_rows_per_run(monkeypatch, cache_rows, memory_mb, device, expected):
    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", cache_rows * ROW)
    rt = Runtime("cpu", memory_mb=memory_mb)
    sess = _session(rt)
    assert sess._onnxsal_largest_row == ROW
    rt.device = device
    assert rt.batch_size(sess) == expected
    assert rt.batch_size(sess, 7) == 7                     # an explicit batch size wins


def test_chunked_runs_give_the_same_maps(monkeypatch):
    """SmoothGrad's 12 noisy copies run as 3 runs of 4 rows under the cache cap; the map is the one
    a single run of 12 gives."""
    model = tiny.conv_net(size=SIZE)
    x = np.random.default_rng(0).random((1, 3, SIZE, SIZE), dtype=np.float32)
    single = onnxsal.Explainer(model, "cpu", preprocess="raw", batch_size=12)
    whole = single.explain(x, "smoothgrad", target=1, n_samples=12, seed=3).raw

    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", 1)
    ex = onnxsal.Explainer(model, "cpu", preprocess="raw")
    runs = []
    session = ex.engine.runtime.session

    def counting(key, build):
        sess = session(key, build)
        if key.startswith("vjp:") and not hasattr(sess, "_counted"):
            run = sess.run
            sess.run = lambda *a, **k: runs.append(len(a[1][ex.model.input.name])) or run(*a, **k)
            sess._counted = True
        return sess

    ex.engine.runtime.session = counting
    chunked = ex.explain(x, "smoothgrad", target=1, n_samples=12, seed=3).raw
    assert runs == [4, 4, 4]
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-7)


def test_graphs_with_large_dense_weights_are_not_capped(monkeypatch):
    """Dense weights over PREPACK_LIMIT are read once per run: such graphs keep the budget's batches."""
    monkeypatch.setattr(rt_mod, "CPU_CHUNK_BYTES", 1)
    monkeypatch.setattr(rt_mod, "PREPACK_LIMIT", 0)              # the tiny classifier's Gemm counts as large
    rt = Runtime("cpu")
    assert rt.batch_size(_session(rt)) == 64
