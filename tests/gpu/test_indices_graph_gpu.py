"""selective_state_update with state_batch_indices when the host index checks cannot run.

During CUDA-graph capture the op skips its host-side index checks (they would sync the stream), so
the kernel itself must treat an index outside [0, Bs) as padding: output 0, no state row read or
written. Tested two ways: with the checks switched off (runs in the CPU emulator too) and by
capturing the step with an index array in a CUDA graph and replaying it on new indices (GPU only).
Outputs and states are compared with the float64 reference; rows past the pool are sentinels that
must not change.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from helpers import TOL, assert_close, f64, randn

import ssmcore
from ssmcore import reference

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def make_step(rng, heads, batch, pool_rows, n_state, x_dtype, state_dtype, sentinel_rows=3):
    """NumPy inputs of one step; "buffer" holds the pool followed by sentinel rows."""
    channels = (4, 6) if heads else (8,)
    groups = 2 if heads else 1
    return dict(
        buffer=randn(rng, (pool_rows + sentinel_rows,) + channels + (n_state,), state_dtype),
        x=randn(rng, (batch,) + channels, x_dtype),
        dt=(np.abs(randn(rng, (batch,) + channels, "float32", 0.5)) + 0.05).astype(randn(rng, 1, x_dtype).dtype),
        A=-np.exp(randn(rng, channels + (n_state,), "float32")),
        B=randn(rng, (batch, groups, n_state), x_dtype),
        C=randn(rng, (batch, groups, n_state), x_dtype),
        D=randn(rng, channels, "float32"),
        z=randn(rng, (batch,) + channels, x_dtype),
        dt_bias=randn(rng, channels, "float32", 0.3),
    )


def expectation(args, pool_rows, indices):
    """Reference (out, new pool) with every index outside [0, pool_rows) made padding (-1)."""
    bad = (indices < 0) | (indices >= pool_rows)
    safe = np.where(bad, -1, indices).astype(np.int64)
    rest = {k: v for k, v in args.items() if k != "buffer"}
    out, state = reference.selective_state_update(args["buffer"][:pool_rows], **rest, dt_softplus=True,
                                                  state_batch_indices=safe)
    return out, state, bad


def check(args, pool_rows, indices, out, gbuf, x_dtype, state_dtype):
    ref_out, ref_state, bad = expectation(args, pool_rows, indices)
    got = f64(host(out))
    assert float(np.abs(got[bad]).max()) == 0.0, "rows with an index outside the pool output 0"
    worst = x_dtype if TOL[x_dtype] > TOL[state_dtype] else state_dtype
    assert_close(got, ref_out, worst, name="out")
    after = host(gbuf)
    assert_close(after[:pool_rows], ref_state, state_dtype, name="pool")
    untouched = sorted(set(range(pool_rows)) - set(indices[~bad].tolist()))
    np.testing.assert_array_equal(f64(after[untouched]), f64(args["buffer"][untouched]))
    np.testing.assert_array_equal(f64(after[pool_rows:]), f64(args["buffer"][pool_rows:]),
                                  err_msg="wrote past the pool")


@pytest.mark.parametrize("heads", [False, True], ids=["mamba1", "mamba2"])
@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
def test_unchecked_indices_stay_in_bounds(rng, monkeypatch, heads, index_dtype):
    """The host checks switched off (as during capture): out-of-pool indices are padding rows."""
    for module in ("ssmcore._checks",):
        monkeypatch.setattr(importlib.import_module(module), "stream_capturing", lambda xp: True)
    batch, pool_rows = 6, 5
    args = make_step(rng, heads, batch, pool_rows, 16, "bfloat16", "float32")
    far = 2**32 + 2 if index_dtype == "int64" else pool_rows + 100  # int64: would wrap to 2 as int32
    indices = np.array([2, pool_rows, -1, far, 0, -9], dtype=index_dtype)
    gbuf = gpu(args["buffer"])
    g = {k: gpu(v) for k, v in args.items() if k != "buffer"}
    out = ssmcore.selective_state_update(gbuf[:pool_rows], **g, dt_softplus=True, state_batch_indices=gpu(indices))
    check(args, pool_rows, indices, out, gbuf, "bfloat16", "float32")


def test_checked_indices_still_raise(rng):
    """Outside capture the host checks run as before."""
    args = make_step(rng, False, 3, 4, 16, "float32", "float32")
    g = {k: gpu(v) for k, v in args.items() if k != "buffer"}
    with pytest.raises(ValueError, match=r"^state_batch_indices:"):
        ssmcore.selective_state_update(gpu(args["buffer"])[:4], **g, state_batch_indices=gpu(np.array([0, 4, 1], np.int32)))


@pytest.mark.parametrize("heads,index_dtype,state_dtype", [(False, "int32", "float32"), (True, "int64", "bfloat16"),
                                                           (True, "int32", "float32")])
def test_cuda_graph_step_with_indices(rng, heads, index_dtype, state_dtype):
    """A step with state_batch_indices captured in a CUDA graph; the replay uses new indices, one of
    them outside the pool, and new inputs."""
    batch, pool_rows = 8, 11
    args = make_step(rng, heads, batch, pool_rows, 64, "bfloat16", state_dtype)
    gbuf = gpu(args["buffer"])
    g = {k: gpu(v) for k, v in args.items() if k != "buffer"}
    gidx = gpu(rng.permutation(pool_rows)[:batch].astype(index_dtype))
    cupy.cuda.Device().synchronize()  # the copies above ran on the null stream, which a non-blocking stream ignores
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):  # compile and fill the memory pool outside the capture
            ssmcore.selective_state_update(gbuf[:pool_rows], **g, dt_softplus=True, state_batch_indices=gidx)
        gbuf[...] = gpu(args["buffer"])
        stream.synchronize()
        stream.begin_capture()
        out = ssmcore.selective_state_update(gbuf[:pool_rows], **g, dt_softplus=True, state_batch_indices=gidx)
        graph = stream.end_capture()
    fresh = make_step(rng, heads, batch, pool_rows, 64, "bfloat16", state_dtype)
    for k in ("buffer", "A", "D", "dt_bias"):  # captured as they were
        fresh[k] = args[k]
    for k in ("x", "dt", "B", "C", "z"):
        g[k][...] = gpu(fresh[k])
    indices = rng.permutation(pool_rows)[:batch].astype(index_dtype)
    indices[2] = pool_rows + 1
    indices[5] = -1
    gidx[...] = gpu(indices)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    stream.synchronize()
    check(fresh, pool_rows, indices, out, gbuf, "bfloat16", state_dtype)
