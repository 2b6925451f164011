"""Selective scan on the GPU with strided inputs: u, delta, z and dout read through their (batch,
channel) strides (L stride 1) must give bitwise the results of the same values made contiguous,
forward and backward, without copying them and without modifying them.

Layouts: MambaInnerFn's (delta = (D, B*L) viewed (B, D, L): strides (L, B*L, 1); z = the second half
of xz (2D, B, L) permuted; dout_y = W^T dout^T viewed the same way; B/C = x_dbl columns, N-contiguous,
which are copied), the old dout_y (D contiguous: copied), channels reversed (negative stride), a
batch-broadcast (stride 0) delta, rows whose strides break the time-parallel kernel's 16-byte vector
loads (copied there), odd L, batch 1, groups, all three kernel dtypes. The backward runs with
SSMCORE_DETERMINISTIC=1 so input-dependent dB/dC are summed in a fixed order (bitwise comparable).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, randn

import ssmcore

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

GPU_DTYPES = ("float32", "float16", "bfloat16")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def _host(a):
    return None if a is None else np.array(cupy.asnumpy(a))


def _mamba_inputs(rng, batch, channels, length, N, dtype, groups=None, dout_layout="new"):
    """GPU (strided views, contiguous copies) of MambaInnerFn-like scan inputs, plus dout both ways."""
    dt = DTYPES[dtype]
    R = 3
    u = cupy.asarray(randn(rng, (batch, channels, length), dtype))
    # delta: (D, B*L) -> (D, B, L) -> (B, D, L), strides (L, B*L, 1).
    delta_buf = cupy.asarray((0.5 * rng.random((channels, batch * length)) + 0.05).astype(dt))
    delta = delta_buf.reshape(channels, batch, length).transpose(1, 0, 2)
    # z: second half of xz (2D, B, L) permuted to (B, 2D, L).
    xz = cupy.asarray(randn(rng, (2 * channels, batch, length), dtype)).transpose(1, 0, 2)
    z = xz[:, channels:, :]
    # B, C: columns of x_dbl (B*L, R + 2N) -> (B, N, L) (or (B, G, N, L)), N-contiguous.
    G = groups or 1
    x_dbl = cupy.asarray(randn(rng, (batch * length, R + 2 * G * N), dtype))
    B = x_dbl[:, R:R + G * N].reshape(batch, length, G * N).transpose(0, 2, 1)
    C = x_dbl[:, R + G * N:].reshape(batch, length, G * N).transpose(0, 2, 1)
    if groups:
        B = B.reshape(batch, G, N, length)
        C = C.reshape(batch, G, N, length)
    # dout_y: new layout (D, B*L) -> (B, D, L) with L contiguous, old one (B*L, D) -> (B, D, L).
    if dout_layout == "new":
        dout = cupy.asarray(randn(rng, (channels, batch * length), dtype)).reshape(channels, batch, length)
        dout = dout.transpose(1, 0, 2)
    else:
        dout = cupy.asarray(randn(rng, (batch * length, channels), dtype)).reshape(batch, length, channels)
        dout = dout.transpose(0, 2, 1)
    views = dict(
        u=u, delta=delta, B=B, C=C, z=z,
        A=cupy.asarray((-rng.random((channels, N)) - 0.05).astype(np.float32)),
        D=cupy.asarray(randn(rng, (channels,), "float32")),
        delta_bias=cupy.asarray((0.25 * rng.random(channels) + 0.05).astype(np.float32)),
        initial_state=cupy.asarray(randn(rng, (batch, channels, N), "float32")),
    )
    return views, dout


def _contiguous(args):
    return {n: None if a is None else cupy.ascontiguousarray(cupy.asarray(_host(a))) for n, a in args.items()}


def _run(args, dout, softplus=True):
    out, last = ssmcore.selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    grads = ssmcore.selective_scan_bwd(dout, **args, delta_softplus=softplus, dlast_state=last)
    return [_host(out), _host(last)] + [_host(g) for g in grads]


def _assert_same(strided, flat, what=""):
    names = ["out", "last_state"] + [f"d{n}" for n in GRAD_NAMES]
    for name, a, b in zip(names, strided, flat):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=f"{name} {what}")


@pytest.fixture
def det(monkeypatch):
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")


@pytest.fixture
def copies(monkeypatch):
    """ids of the arrays the scan launcher copied contiguous (through _arrays.contiguous)."""
    from ssmcore.backends.cupy import scan as gpu_scan

    seen = []
    orig = gpu_scan._arrays.contiguous

    def spy(a, dtype=None):
        r = orig(a, dtype)
        if a is not None and r is not a:
            seen.append(id(a))
        return r

    monkeypatch.setattr(gpu_scan._arrays, "contiguous", spy)
    return seen


def _check(args, dout, *, softplus=True, no_copy=(), copies=None):
    before = {n: _host(a).copy() for n, a in args.items() if a is not None}
    dout_before = _host(dout).copy()
    got = _run(args, dout, softplus)
    if copies is not None:
        for name, a in no_copy:
            assert id(a) not in copies, f"{name} was copied"
    flat = _contiguous(args)
    want = _run(flat, cupy.ascontiguousarray(cupy.asarray(dout_before)), softplus)
    _assert_same(got, want)
    for n, a in before.items():
        np.testing.assert_array_equal(_host(args[n]), a, err_msg=f"{n} modified")
    np.testing.assert_array_equal(_host(dout), dout_before, err_msg="dout modified")
    return got


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("fwd", ["lanes", "tp"])
def test_mamba_inner_layouts(rng, det, copies, monkeypatch, dtype, fwd):
    """MambaInnerFn's delta / z / dout_y views: no copies, bitwise the contiguous results (odd L)."""
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "fwd_kernel", fwd)
    args, dout = _mamba_inputs(rng, 2, 5, 19, 5, dtype)
    assert not args["delta"].flags.c_contiguous and not args["z"].flags.c_contiguous
    _check(args, dout, copies=copies,
           no_copy=[("delta", args["delta"]), ("z", args["z"]), ("dout", dout)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_one_groups_vector_rows(rng, det, copies, monkeypatch, dtype):
    """Batch 1, 2 groups of B and C, L % 8 == 0: the time-parallel forward's vector loads through
    strided rows (strides multiples of 8 elements), no copies; and the lanes kernels."""
    from ssmcore.backends.cupy import scan as gpu_scan

    args, dout = _mamba_inputs(rng, 1, 8, 24, 4, dtype, groups=2)
    for fwd in ("tp", "lanes"):
        monkeypatch.setattr(gpu_scan, "fwd_kernel", fwd)
        copies.clear()
        _check(args, dout, copies=copies,
               no_copy=[("delta", args["delta"]), ("z", args["z"]), ("dout", dout)])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_unaligned_rows_and_old_dout_layout(rng, det, monkeypatch, dtype):
    """Rows 2 elements into a wider buffer (strides not multiples of 8, base not 16-byte aligned: the
    time-parallel kernel copies them for its vector loads, the lanes kernels read them as they are)
    and the old dout_y layout (D contiguous, copied)."""
    from ssmcore.backends.cupy import scan as gpu_scan

    args, dout = _mamba_inputs(rng, 2, 3, 16, 3, dtype, dout_layout="old")
    wide = cupy.asarray(randn(rng, (2, 3, 19), dtype))
    args["u"] = wide[:, :, 2:18]
    for fwd in ("tp", "lanes"):
        monkeypatch.setattr(gpu_scan, "fwd_kernel", fwd)
        _check(args, dout)


def test_negative_and_zero_strides(rng, det, copies):
    """Channels reversed (negative channel stride) and a delta broadcast over the batch (stride 0)."""
    args, dout = _mamba_inputs(rng, 2, 4, 11, 6, "float32")
    args["z"] = args["z"][:, ::-1, :]
    args["delta"] = cupy.broadcast_to(args["delta"][:1], args["delta"].shape)
    args["u"] = args["u"][:, ::-1, :]
    got = _check(args, dout, copies=copies,
                 no_copy=[("z", args["z"]), ("u", args["u"]), ("delta", args["delta"])])
    assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("impl", ["v2", "v3"])
def test_kernel_versions(rng, det, monkeypatch, impl):
    """The v2 forward (scan_fwd) and backward (-DSCAN_BWD_V=2) read strided inputs too; both lane
    layouts (wide S4 / narrow S1)."""
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "fwd_kernel", "lanes")
    monkeypatch.setattr(gpu_scan, "fwd_impl", impl)
    monkeypatch.setattr(gpu_scan, "bwd_impl", impl)
    args, dout = _mamba_inputs(rng, 2, 6, 13, 4, "bfloat16")
    for forced in (4, 1):
        monkeypatch.setattr(gpu_scan, "force_states_per_lane", forced)
        _check(args, dout)


def test_strided_knob_off_is_identical(rng, det, copies, monkeypatch):
    """SSMCORE_SCAN_STRIDED=0 (copy every non-contiguous input, as before) gives the same bits."""
    args, dout = _mamba_inputs(rng, 2, 3, 9, 2, "bfloat16")
    new = _run(args, dout)
    monkeypatch.setenv("SSMCORE_SCAN_STRIDED", "0")
    copies.clear()
    old = _run(args, dout)
    assert id(args["delta"]) in copies and id(dout) in copies
    _assert_same(new, old, "(SSMCORE_SCAN_STRIDED=0)")
