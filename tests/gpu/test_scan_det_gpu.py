"""Deterministic dB/dC of the selective scan backward (CuPy backend), the v2 path (2026-11-29, session 5).

scan_bwd stores each block's sums of input-dependent dB/dC into slice blockIdx.x of a (grid, N, L)
buffer and bc_slice_sum adds the slices of each (batch, group) in a fixed order, writing B/C's dtype.
Checked here on small shapes (they run in the CPU emulator too):
* bc_slice_sum alone against NumPy float32 sums made in the documented order (bitwise), for slice
  counts below, at and above its 8 row-threads, with scalar and float4 columns and a 16-bit output;
* the whole backward: v2 is bitwise equal run to run, bitwise equal to the v1 path (session 4's
  (P, B, G, N, L) slices + column_sum + cast: the same additions in the same order), and within the
  usual tolerance of the default (atomic) mode, which test_scan_gpu checks against float64; every
  other gradient is bitwise the default's. Ungrouped, grouped and mixed B/C, narrow and wide lanes,
  1 to 9 blocks per group.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
from helpers import DTYPES, TOL, randn

import ssmcore

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _host(a):
    return None if a is None else np.asarray(cupy.asnumpy(a))


def _fixed_order(part):
    """(B, G, P, N, L) float32 -> (B, G, N, L) float32 summed as bc_slice_sum documents: row-thread y
    adds p = y, y + 8, ... from 0, then the 8 partial sums are added in order from 0."""
    part = part.astype(np.float32)
    P = part.shape[2]
    partial = []
    for y in range(8):
        s = np.zeros(part.shape[:2] + part.shape[3:], np.float32)
        for p in range(y, P, 8):
            s = s + part[:, :, p]
        partial.append(s)
    total = np.zeros_like(partial[0])
    for s in partial:
        total = total + s
    return total


@pytest.mark.parametrize("P", [1, 3, 8, 19])
@pytest.mark.parametrize("N, L, dtype", [(3, 37, "float32"), (4, 37, "float32"), (2, 50, "bfloat16")])
def test_slice_sum_fixed_order(rng, P, N, L, dtype):
    """Both tensors of one launch (different group and slice counts) match the documented order
    bitwise; N * L = 111 takes the scalar kernel, 148 and 100 the float4 one."""
    from ssmcore.backends.cupy import scan as gpu_scan

    parts_host = [randn(rng, (2, 3, P, N, L), "float32", 4.0), randn(rng, (2, 1, P + 2, N, L), "float32")]
    parts = [cupy.asarray(p) for p in parts_host]
    a = types.SimpleNamespace(n_states=N, length=L)
    outs = gpu_scan._slice_sums(a, parts, DTYPES[dtype])
    for part, out in zip(parts_host, outs):
        assert out.shape == part.shape[:2] + part.shape[3:] and out.dtype == DTYPES[dtype]
        expect = _fixed_order(part).astype(DTYPES[dtype])
        np.testing.assert_array_equal(_host(out).view(np.uint8), expect.view(np.uint8))
    # One tensor alone (the other B/C constant), either position.
    for keep in (0, 1):
        only = [p if i == keep else None for i, p in enumerate(parts)]
        outs1 = gpu_scan._slice_sums(a, only, DTYPES[dtype])
        assert outs1[1 - keep] is None
        np.testing.assert_array_equal(_host(outs1[keep]).view(np.uint8), _host(outs[keep]).view(np.uint8))


def _inputs(rng, batch, channels, length, N, B_kind, C_kind, dtype):
    def bc(kind):
        if kind == "DN":
            return randn(rng, (channels, N), "float32")
        if kind == "BNL":
            return randn(rng, (batch, N, length), dtype)
        return randn(rng, (batch, kind, N, length), dtype)

    return dict(
        u=randn(rng, (batch, channels, length), dtype),
        delta=(0.5 * rng.random((batch, channels, length)) + 0.05).astype(DTYPES[dtype]),
        A=(-rng.random((channels, N)) - 0.05).astype(np.float32),
        B=bc(B_kind), C=bc(C_kind),
        D=randn(rng, (channels,), "float32"),
        z=randn(rng, (batch, channels, length), dtype),
        delta_bias=(0.25 * rng.random(channels) + 0.05).astype(np.float32),
        initial_state=randn(rng, (batch, channels, N), "float32"),
    )


@pytest.mark.parametrize("B_kind, C_kind, N, lanes, dtype", [
    ("BNL", "BNL", 16, 1, "bfloat16"),  # S1 R16 (the timing test's layout): 9 blocks per group, float4 sums
    ("BNL", "BNL", 3, 1, "float32"),    # N * L odd: scalar sums, 3 blocks per group
    ("BNL", 4, 8, 1, "float32"),        # dB over 8 blocks (4 block groups x 2 tiles), dC over 2
    (2, "BNL", 4, 1, "float16"),
    ("DN", 2, 16, 4, "bfloat16"),       # wide S4 R4, constant B
])
def test_backward_v2_bitwise_and_close(rng, monkeypatch, B_kind, C_kind, N, lanes, dtype):
    from ssmcore.backends.cupy import scan as gpu_scan

    batch, channels, length = 2, 72, 37
    args = {n: None if x is None else cupy.asarray(x)
            for n, x in _inputs(rng, batch, channels, length, N, B_kind, C_kind, dtype).items()}
    dout = cupy.asarray(randn(rng, (batch, channels, length), dtype))
    dlast = cupy.asarray(randn(rng, (batch, channels, N), "float32"))
    monkeypatch.setattr(gpu_scan, "force_states_per_lane", lanes)
    monkeypatch.delenv("SSMCORE_DETERMINISTIC", raising=False)

    def run():
        return [_host(g) for g in ssmcore.selective_scan_bwd(dout, **args, delta_softplus=True, dlast_state=dlast)]

    default = run()
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")
    monkeypatch.setattr(gpu_scan, "det_impl", "v1")
    v1 = run()
    monkeypatch.setattr(gpu_scan, "det_impl", "v2")
    calls = []
    slice_sums = gpu_scan._slice_sums
    monkeypatch.setattr(gpu_scan, "_slice_sums", lambda *a: calls.append(1) or slice_sums(*a))
    v2 = run()
    again = run()
    assert len(calls) == 2, "the deterministic v2 path did not run"
    rtol, atol = TOL[dtype]
    for name, d, a, b, c in zip(GRAD_NAMES, default, v1, v2, again):
        assert b.dtype == d.dtype and b.shape == d.shape, name
        np.testing.assert_array_equal(b.view(np.uint8), c.view(np.uint8), err_msg=f"d{name}: v2 differs between runs")
        np.testing.assert_array_equal(b.view(np.uint8), a.view(np.uint8), err_msg=f"d{name}: v2 != v1")
        if name in ("B", "C") and args[name].ndim > 2:
            bf, df = b.astype(np.float64), d.astype(np.float64)
            scale = max(1.0, float(np.abs(df).max()))
            np.testing.assert_allclose(bf, df, rtol=2 * rtol, atol=2 * atol * scale, err_msg=f"d{name} vs default")
        else:
            np.testing.assert_array_equal(b.view(np.uint8), d.view(np.uint8), err_msg=f"d{name}: not the default's")


def test_det_impl_knob(monkeypatch):
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "det_impl", None)
    monkeypatch.setenv("SSMCORE_SCAN_DET_IMPL", "v3")
    with pytest.raises(ValueError, match=r"^SSMCORE_SCAN_DET_IMPL:"):
        gpu_scan._det_impl()
    monkeypatch.delenv("SSMCORE_SCAN_DET_IMPL")
    assert gpu_scan._det_impl() == "v2"
