"""Selective scan on the GPU (CuPy backend) against float64 oracles and the Numba backend.

Forward: vs ssmcore.reference.selective_scan (float64 on the same, dtype-rounded inputs). Backward:
every gradient vs a float64 NumPy reverse mode of the recurrence written below (a loop over time,
independent of the kernels). test_matches_numba_backend compares forward and backward with the
Numba backend on the same inputs. Both lane layouts (wide: several state entries per lane; narrow:
one per lane, for batch 1) are forced in turn, since most shapes here are too small to pick both.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import DTYPES, TOL, assert_close, f64, randn

import ssmcore
from ssmcore import reference

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

OPTIONS = ("D", "z", "delta_bias", "initial_state")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
GPU_DTYPES = ("float32", "float16", "bfloat16")


@pytest.fixture(params=["wide", "narrow"])
def layout(request):
    """Force the wide (S = 4 or 8 state entries per lane) or the narrow (S = 1 or 2) lane layout."""
    from ssmcore.backends.cupy import scan as gpu_scan

    gpu_scan.force_states_per_lane = {"wide": 4, "narrow": 1}[request.param]
    yield request.param
    gpu_scan.force_states_per_lane = None


def make_inputs(rng, batch, channels, length, N, *, B_kind="BNL", C_kind="BNL", dtype="float32",
                options=OPTIONS):
    """NumPy keyword arguments of selective_scan: random, never zero, a decaying recurrence."""

    def bc(kind):
        if kind == "DN":
            return randn(rng, (channels, N), "float32")
        if kind == "BNL":
            return randn(rng, (batch, N, length), dtype)
        return randn(rng, (batch, kind, N, length), dtype)

    args = dict(
        u=randn(rng, (batch, channels, length), dtype),
        delta=(0.5 * rng.random((batch, channels, length)) + 0.05).astype(DTYPES[dtype]),
        A=(-rng.random((channels, N)) - 0.05).astype(np.float32),
        B=bc(B_kind),
        C=bc(C_kind),
        D=randn(rng, (channels,), "float32"),
        z=randn(rng, (batch, channels, length), dtype),
        delta_bias=(0.25 * rng.random(channels) + 0.05).astype(np.float32),
        initial_state=randn(rng, (batch, channels, N), "float32"),
    )
    for name in OPTIONS:
        if name not in options:
            args[name] = None
    return args


def to_gpu(args):
    return {n: None if a is None else cupy.asarray(a) for n, a in args.items()}


def host(a):
    return None if a is None else cupy.asnumpy(a)


def check_forward(args, dtype, softplus=True):
    """GPU forward (out, last_state) vs the float64 reference."""
    out, last = ssmcore.selective_scan(**to_gpu(args), delta_softplus=softplus, return_last_state=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == args["u"].dtype
    assert last.dtype == np.float32
    ref_out, ref_last = reference.selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    assert_close(host(out), ref_out, dtype, name="out vs reference")
    assert_close(host(last), ref_last, dtype, name="last_state vs reference")
    return out


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def reference_grads(args, softplus, dout, dlast):
    """Float64 NumPy reverse mode of the recurrence (a loop over time), in GRAD_NAMES order."""
    a = {n: None if x is None else f64(x) for n, x in args.items()}
    u, A = a["u"], a["A"]
    batch, channels, length = u.shape
    x = a["delta"] if a["delta_bias"] is None else a["delta"] + a["delta_bias"][:, None]
    dt = _softplus(x) if softplus else x
    slope = np.where(x > 20, 1.0, _sigmoid(x)) if softplus else np.ones_like(x)

    def per_channel(X):  # broadcastable to (B, D, N, L)
        if X.ndim == 2:
            return X[None, :, :, None]
        if X.ndim == 3:
            return X[:, None]
        return np.repeat(X, channels // X.shape[1], axis=1)

    Bc, Cc = per_channel(a["B"]), per_channel(a["C"])
    at = lambda X, t: X[..., min(t, X.shape[-1] - 1)]
    h = np.zeros((batch, channels, A.shape[1])) if a["initial_state"] is None else a["initial_state"].copy()
    states = [h]
    for t in range(length):
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * at(Bc, t)
        states.append(h)
    y = np.stack([np.sum(at(Cc, t) * states[t + 1], -1) for t in range(length)], -1)
    Dp = np.zeros(channels) if a["D"] is None else a["D"]
    y = y + Dp[:, None] * u
    dy = f64(dout)
    dz = None
    if a["z"] is not None:
        zs = a["z"]
        sig = _sigmoid(zs)
        dz = dy * y * sig * (1 + zs * (1 - sig))
        dy = dy * zs * sig
    g = np.zeros_like(h) if dlast is None else f64(dlast).copy()
    du = Dp[:, None] * dy
    ddt = np.zeros_like(u)
    dA = np.zeros_like(A)
    dBc = np.zeros(np.broadcast_shapes(Bc.shape[:3], (batch, channels, A.shape[1])) + (length,))
    dCc = np.zeros_like(dBc)
    for t in range(length - 1, -1, -1):
        g = g + at(Cc, t) * dy[:, :, t, None]
        decay = np.exp(dt[:, :, t, None] * A)
        w = g * decay * states[t]
        dA += np.sum(w * dt[:, :, t, None], axis=0)
        gB = np.sum(g * at(Bc, t), -1)
        du[:, :, t] += dt[:, :, t] * gB
        ddt[:, :, t] = np.sum(w * A, -1) + u[:, :, t] * gB
        dBc[..., t] = g * (dt[:, :, t] * u[:, :, t])[..., None]
        dCc[..., t] = states[t + 1] * dy[:, :, t, None]
        g = g * decay

    def fold(dX, X):  # back to X's shape: sum over what X is shared by
        if X.ndim == 2:
            return dX.sum(axis=(0, 3))
        if X.ndim == 3:
            return dX.sum(axis=1)
        return dX.reshape(batch, X.shape[1], channels // X.shape[1], *dX.shape[2:]).sum(axis=2)

    ddelta = ddt * slope
    return (
        du, ddelta, dA, fold(dBc, a["B"]), fold(dCc, a["C"]),
        None if a["D"] is None else np.sum(dy * u, axis=(0, 2)),
        dz,
        None if a["delta_bias"] is None else ddelta.sum(axis=(0, 2)),
        None if a["initial_state"] is None else g,
    )


def assert_grads_close(grads, expected, args, dtype, what=""):
    """Gradients are sums over time, batch or channels: the absolute tolerance scales with the
    largest magnitude of each gradient (at least 1); rtol/atol are twice the forward's, as the
    reference package's own tests allow for gradients."""
    rtol, atol = TOL[dtype]
    for name, g, e in zip(GRAD_NAMES, grads, expected):
        if args[name] is None:
            assert g is None, name
            continue
        assert isinstance(g, cupy.ndarray), name
        assert g.shape == args[name].shape and g.dtype == args[name].dtype, name
        e = f64(e)
        scale = max(1.0, float(np.abs(e).max()))
        assert_close(host(g).astype(np.float64) / scale, e / scale, dtype, rtol=2 * rtol, atol=2 * atol,
                     name=f"{what}d{name}")


def check_backward(args, dtype, softplus=True, rng=None, with_dlast=True):
    """GPU gradients (dtype and shape of each input) vs the float64 reverse mode above."""
    rng = rng or np.random.default_rng(0)
    dout = randn(rng, args["u"].shape, dtype)
    dlast = randn(rng, args["u"].shape[:2] + (args["A"].shape[1],), "float32") if with_dlast else None
    grads = ssmcore.selective_scan_bwd(cupy.asarray(dout), **to_gpu(args), delta_softplus=softplus,
                                       dlast_state=None if dlast is None else cupy.asarray(dlast))
    assert_grads_close(grads, reference_grads(args, softplus, dout, dlast), args, dtype)
    return grads


# --- forward and backward over lengths, state sizes, layouts ------------------------------------------


LENGTH_KINDS = {1: ("BNL", "DN"), 2: ("DN", 2), 3: (2, "BNL"), 17: ("BNL", "BNL"), 129: ("DN", "DN"),
                2049: (2, 2)}


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("length", list(LENGTH_KINDS))
def test_lengths(rng, layout, dtype, length):
    B_kind, C_kind = LENGTH_KINDS[length]
    args = make_inputs(rng, 2, 6, length, 16, B_kind=B_kind, C_kind=C_kind, dtype=dtype)
    check_forward(args, dtype)
    check_backward(args, dtype, rng=rng)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("N", [1, 5, 16, 17, 64, 100, 256])
def test_state_sizes(rng, layout, dtype, N):
    args = make_inputs(rng, 2, 6, 70, N, B_kind="BNL", C_kind=3, dtype=dtype)
    check_forward(args, dtype)
    check_backward(args, dtype, rng=rng)


KINDS = ("DN", "BNL", 2, 4)


@pytest.mark.parametrize("B_kind, C_kind", list(itertools.product(KINDS, KINDS)))
def test_B_C_kinds(rng, layout, B_kind, C_kind):
    args = make_inputs(rng, 2, 8, 45, 7, B_kind=B_kind, C_kind=C_kind, dtype="float32")
    check_forward(args, "float32")
    check_backward(args, "float32", rng=rng)


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("options", [(), OPTIONS] + [(o,) for o in OPTIONS])
def test_options(rng, softplus, options):
    args = make_inputs(rng, 2, 6, 40, 16, B_kind="BNL", C_kind=2 if "D" in options else "BNL",
                       options=options)
    check_forward(args, "float32", softplus)
    check_backward(args, "float32", softplus, rng=rng, with_dlast="initial_state" in options)


def test_softplus_threshold(rng):
    args = make_inputs(rng, 1, 4, 30, 8)
    args["delta"][..., ::3] += 25.0  # softplus(x) = x for x > 20
    args["A"] *= 0.01
    check_forward(args, "float32")
    check_backward(args, "float32", rng=rng)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch_one_long(rng, dtype):
    """Batch 1, few channels: the narrow layout with up to 32 lanes per row, automatically chosen."""
    args = make_inputs(rng, 1, 24, 3001, 16, dtype=dtype)
    check_forward(args, dtype)
    check_backward(args, dtype, rng=rng)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_batch(rng, dtype):
    """Many (b, d) rows: the wide layout is chosen automatically; grouped B."""
    args = make_inputs(rng, 32, 1024, 24, 16, B_kind=4, C_kind="BNL", dtype=dtype)
    check_forward(args, dtype)
    check_backward(args, dtype, rng=rng)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_numba_backend(rng, layout, dtype):
    """Same inputs, same dtype, same float32 math: the GPU and the CPU backend agree."""
    args = make_inputs(rng, 2, 12, 300, 16, B_kind=3, C_kind="DN", dtype=dtype)
    dout = randn(rng, args["u"].shape, dtype)
    dlast = randn(rng, (2, 12, 16), "float32")
    out, last = ssmcore.selective_scan(**to_gpu(args), delta_softplus=True, return_last_state=True)
    cpu_out, cpu_last = ssmcore.selective_scan(**args, delta_softplus=True, return_last_state=True)
    assert_close(host(out), f64(cpu_out), dtype, name="out vs numba")
    assert_close(host(last), cpu_last, dtype, name="last_state vs numba")
    grads = ssmcore.selective_scan_bwd(cupy.asarray(dout), **to_gpu(args), delta_softplus=True,
                                       dlast_state=cupy.asarray(dlast))
    cpu_grads = ssmcore.selective_scan_bwd(dout, **args, delta_softplus=True, dlast_state=dlast)
    assert_grads_close(grads, cpu_grads, args, dtype, "vs numba ")


def test_chunked_continuation(rng):
    """[0, L) equals [0, k) then [k, L) continued from the first part's last state, on the GPU."""
    args = make_inputs(rng, 2, 8, 300, 16, B_kind=2, C_kind="BNL")
    g = to_gpu(args)
    full, full_last = ssmcore.selective_scan(**g, delta_softplus=True, return_last_state=True)
    k = 131
    cut = lambda a, s: a[..., s] if a is not None and a.ndim > 2 and a.shape[-1] == 300 else a
    head = {n: cut(a, slice(0, k)) for n, a in g.items()}
    tail = {n: cut(a, slice(k, None)) for n, a in g.items()}
    out1, last1 = ssmcore.selective_scan(**head, delta_softplus=True, return_last_state=True)
    tail["initial_state"] = last1
    out2, last2 = ssmcore.selective_scan(**tail, delta_softplus=True, return_last_state=True)
    assert_close(host(cupy.concatenate([out1, out2], axis=-1)), host(full), "float32", name="out")
    assert_close(host(last2), host(full_last), "float32", name="last_state")


def test_non_contiguous_and_unmodified(rng):
    args = make_inputs(rng, 2, 8, 33, 6, B_kind=2, C_kind="DN")
    g = to_gpu(args)
    g["u"] = cupy.ascontiguousarray(g["u"].transpose(0, 2, 1)).transpose(0, 2, 1)
    g["B"] = cupy.asfortranarray(g["B"])
    before = {n: host(a).copy() for n, a in g.items() if a is not None}
    out = ssmcore.selective_scan(**g, delta_softplus=True)
    ssmcore.selective_scan_bwd(cupy.ones_like(out), **g, delta_softplus=True)
    assert_close(host(out), reference.selective_scan(**args, delta_softplus=True), "float32")
    for n, a in before.items():
        np.testing.assert_array_equal(host(g[n]), a, err_msg=n)


def test_nan_propagates(rng):
    args = make_inputs(rng, 1, 3, 40, 4)
    args["u"][0, 1, 20] = np.nan
    out = host(ssmcore.selective_scan(**to_gpu(args)))
    assert np.isnan(out[0, 1, 20:]).all()
    assert np.isfinite(out[0, 0]).all() and np.isfinite(out[0, 2]).all() and np.isfinite(out[0, 1, :20]).all()


def test_float64_rejected(rng):
    args = make_inputs(rng, 1, 2, 5, 3, B_kind="DN", C_kind="DN")
    g = to_gpu(args)
    g["u"] = g["u"].astype(cupy.float64)
    g["delta"] = g["delta"].astype(cupy.float64)
    g["z"] = g["z"].astype(cupy.float64)
    with pytest.raises(TypeError, match=r"^u:"):
        ssmcore.selective_scan(**g)


# --- deterministic backward ---------------------------------------------------------------------------


@pytest.mark.parametrize("B_kind, C_kind, N", [("BNL", 2, 16), (2, 4, 16), ("DN", "BNL", 64)])
def test_backward_deterministic(rng, monkeypatch, layout, B_kind, C_kind, N):
    """SSMCORE_DETERMINISTIC=1: input-dependent dB/dC (summed over channels, row tiles and groups)
    come out bitwise equal on every run and still match the float64 reverse mode. N = 64 with the
    narrow layout takes the one-copy (phased) shared-memory path."""
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")
    batch, channels, length = 2, 96, 37  # several row tiles per group in both layouts
    args = make_inputs(rng, batch, channels, length, N, B_kind=B_kind, C_kind=C_kind, dtype="float32")
    first = check_backward(args, "float32", rng=np.random.default_rng(5))
    same = np.random.default_rng(5)  # the draws check_backward made
    dout = cupy.asarray(randn(same, args["u"].shape, "float32"))
    dlast = cupy.asarray(randn(same, (batch, channels, N), "float32"))
    for _ in range(2):
        again = ssmcore.selective_scan_bwd(dout, **to_gpu(args), delta_softplus=True, dlast_state=dlast)
        for name, a, b in zip(GRAD_NAMES, first, again):
            np.testing.assert_array_equal(host(a), host(b), err_msg=f"d{name} differs between runs")


# --- CUDA graphs ----------------------------------------------------------------------------------


def test_cuda_graph_capture_and_replay(rng):
    """Forward and backward captured in one graph on a side stream replay on new inputs."""
    args = make_inputs(rng, 2, 64, 200, 16, B_kind="BNL", C_kind=2, dtype="bfloat16")
    g = to_gpu(args)
    dout = cupy.asarray(randn(rng, args["u"].shape, "bfloat16"))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):  # compile and fill the memory pool outside the capture
            ssmcore.selective_scan(**g, delta_softplus=True, return_last_state=True)
            ssmcore.selective_scan_bwd(dout, **g, delta_softplus=True)
        stream.synchronize()
        stream.begin_capture()
        out, last = ssmcore.selective_scan(**g, delta_softplus=True, return_last_state=True)
        grads = ssmcore.selective_scan_bwd(dout, **g, delta_softplus=True)
        graph = stream.end_capture()
    fresh = make_inputs(rng, 2, 64, 200, 16, B_kind="BNL", C_kind=2, dtype="bfloat16")
    for n, a in fresh.items():
        g[n][...] = cupy.asarray(a)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    stream.synchronize()
    ref_out, ref_last = reference.selective_scan(**fresh, delta_softplus=True, return_last_state=True)
    assert_close(host(out), ref_out, "bfloat16", name="replayed out")
    assert_close(host(last), ref_last, "bfloat16", name="replayed last_state")
    assert_grads_close(grads, reference_grads(fresh, True, host(dout), None), fresh, "bfloat16", "replayed ")


# --- 64-bit offsets -------------------------------------------------------------------------------


@pytest.mark.slow
def test_forward_beyond_int32_offsets():
    """B * D * L > 2**31: rows at the far end of u are right (checked against the reference)."""
    batch, channels, length, N = 2, 16384, 65600, 2
    assert batch * channels * length > 2**31
    rs = cupy.random.RandomState(7)
    u = rs.standard_normal((batch, channels, length), dtype=cupy.float32).astype(DTYPES["bfloat16"])
    delta = (rs.random_sample((batch, channels, length), dtype=cupy.float32) * 0.5).astype(DTYPES["bfloat16"])
    A = -(rs.random_sample((channels, N), dtype=cupy.float32) + 0.05)
    B = rs.standard_normal((batch, N, length), dtype=cupy.float32).astype(DTYPES["bfloat16"])
    C = rs.standard_normal((batch, N, length), dtype=cupy.float32).astype(DTYPES["bfloat16"])
    Dp = rs.standard_normal(channels, dtype=cupy.float32)
    out, last = ssmcore.selective_scan(u, delta, A, B, C, D=Dp, delta_softplus=True, return_last_state=True)
    cupy.cuda.Device().synchronize()
    for b, d in [(0, 0), (1, channels // 2), (1, channels - 1)]:
        row = dict(u=host(u[b:b + 1, d:d + 1]), delta=host(delta[b:b + 1, d:d + 1]), A=host(A[d:d + 1]),
                   B=host(B[b:b + 1]), C=host(C[b:b + 1]), D=host(Dp[d:d + 1]))
        ref_out, ref_last = reference.selective_scan(**row, delta_softplus=True, return_last_state=True)
        assert_close(host(out[b:b + 1, d:d + 1]), ref_out, "bfloat16", name=f"out[{b}, {d}]")
        assert_close(host(last[b:b + 1, d:d + 1]), ref_last, "bfloat16", name=f"last[{b}, {d}]")


# --- the time-parallel forward (scan_fwd_tp) ---------------------------------------------------------


@pytest.mark.parametrize("tp_states,prefetch", [(1, False), (2, False), (4, False), (1, True), (2, True),
                                                (4, True)])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("length,N,B_kind,C_kind", [(1, 5, "BNL", "DN"), (17, 16, "DN", 2), (264, 17, 2, "BNL"),
                                                    (1030, 3, "BNL", "BNL"), (2056, 4, "DN", "DN"),
                                                    (40, 256, "BNL", 2)])
def test_time_parallel_forward(rng, monkeypatch, tp_states, prefetch, dtype, length, N, B_kind, C_kind):
    """scan_fwd_tp forced: steps split over a block's threads (8 each, chunks of 1024), the maps
    scanned across lanes, warps and chunks; N not a multiple of the states per barrier; lengths
    inside one warp, across warps, across chunks, unaligned (element loads); all options, then none;
    with and without the B / C prefetch of the next state entries."""
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "fwd_kernel", "tp")
    monkeypatch.setattr(gpu_scan, "tp_states", tp_states)
    monkeypatch.setattr(gpu_scan, "tp_prefetch", prefetch)
    check_forward(make_inputs(rng, 2, 4, length, N, B_kind=B_kind, C_kind=C_kind, dtype=dtype), dtype)
    check_forward(make_inputs(rng, 1, 2, length, N, B_kind=B_kind, C_kind=C_kind, dtype=dtype, options=()),
                  dtype, softplus=False)


# --- kernel versions: v3 (default) and v2 (SSMCORE_SCAN_FWD_IMPL / SSMCORE_SCAN_BWD_IMPL=v2) -----------


@pytest.mark.parametrize("impl", ["v2", "v3"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("forced, batch, channels, length, N, B_kind, C_kind, options", [
    (4, 2, 8, 37, 16, "BNL", "DN", OPTIONS),       # S4 R4: the B8 benchmark layout, several tiles + tail
    (4, 1, 4, 21, 8, 2, "BNL", ("z",)),            # S4 R2: 64 rows per block, the 3-blocks register cap
    (1, 2, 6, 70, 17, "DN", 2, ()),                # S1 R32: N padded, no options
    (None, 1, 5, 9, 3, "BNL", "BNL", OPTIONS),     # R = 1 (N <= 4): v3 falls back to v2 in both passes
    (4, 1, 2, 19, 100, "BNL", "DN", ("D", "delta_bias")),  # S4 R32, large N (dB/dC copies do not fit)
])
def test_kernel_versions(rng, monkeypatch, impl, dtype, forced, batch, channels, length, N, B_kind, C_kind,
                         options):
    """Both forward and backward versions, chosen per call by their environment variables, against the
    float64 oracles; lengths that end inside a tile; constant, shared and grouped B/C."""
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setenv("SSMCORE_SCAN_FWD_IMPL", impl)
    monkeypatch.setenv("SSMCORE_SCAN_BWD_IMPL", impl)
    monkeypatch.setattr(gpu_scan, "force_states_per_lane", forced)
    args = make_inputs(rng, batch, channels, length, N, B_kind=B_kind, C_kind=C_kind, dtype=dtype,
                       options=options)
    check_forward(args, dtype)
    check_backward(args, dtype, rng=rng)
    check_forward(args, dtype, softplus=False)


def test_kernel_versions_agree(rng, monkeypatch):
    """v2 and v3 compute the same states (same step order and exps; only the softplus / silu
    evaluation differs): forward outputs, last states and every gradient agree closely."""
    from ssmcore.backends.cupy import scan as gpu_scan

    args = to_gpu(make_inputs(rng, 2, 8, 45, 16, B_kind=2, C_kind="BNL", dtype="float32"))
    dout = cupy.asarray(randn(rng, (2, 8, 45), "float32"))
    dlast = cupy.asarray(randn(rng, (2, 8, 16), "float32"))
    results = {}
    for impl in ("v2", "v3"):
        monkeypatch.setattr(gpu_scan, "fwd_impl", impl)
        monkeypatch.setattr(gpu_scan, "bwd_impl", impl)
        out, last = ssmcore.selective_scan(**args, delta_softplus=True, return_last_state=True)
        grads = ssmcore.selective_scan_bwd(dout, **args, delta_softplus=True, dlast_state=dlast)
        results[impl] = [host(out), host(last)] + [host(g) for g in grads]
    for name, a, b in zip(("out", "last") + GRAD_NAMES, results["v2"], results["v3"]):
        scale = max(1.0, float(np.abs(a).max()))
        np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=2e-5, err_msg=name)


def test_kernel_version_knob_rejects_unknown(rng, monkeypatch):
    from ssmcore.backends.cupy import scan as gpu_scan

    monkeypatch.setattr(gpu_scan, "force_states_per_lane", 4)  # the lanes kernels, not scan_fwd_tp
    args = to_gpu(make_inputs(rng, 1, 4, 8, 16))
    monkeypatch.setenv("SSMCORE_SCAN_FWD_IMPL", "v9")
    with pytest.raises(ValueError, match="SSMCORE_SCAN_FWD_IMPL"):
        ssmcore.selective_scan(**args)
    monkeypatch.setenv("SSMCORE_SCAN_FWD_IMPL", "v3")
    monkeypatch.setenv("SSMCORE_SCAN_BWD_IMPL", "v1")
    with pytest.raises(ValueError, match="SSMCORE_SCAN_BWD_IMPL"):
        ssmcore.selective_scan_bwd(args["u"], **args)
