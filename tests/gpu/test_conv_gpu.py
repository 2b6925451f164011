"""Causal conv1d on the GPU (CuPy backend) against float64 oracles and the Numba backend.

Forward outputs are compared with ssmcore.reference.causal_conv1d (float64 on the same
dtype-rounded inputs) with the reference package's tolerances; final states and decode states
are copies of inputs, so they must equal the CPU backend's exactly. Backward gradients are
compared with a float64 NumPy reverse mode written below (padded-window form, independent of
both backends). Widths 1..4 run the specialised kernels, 5 and 7 the generic one; lengths cover
a single position, partial and several 1024-position chunks; x comes contiguous and
channel-last.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from helpers import TOL, assert_close, f64, randn

import ssmcore
from ssmcore import reference
from ssmcore.backends import numba as cpu

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

GPU_DTYPES = ("float32", "float16", "bfloat16")
# The reference package's conv tolerances (float16 from the shared table).
CONV_TOL = {"float32": (3e-4, 1e-3), "float16": TOL["float16"], "bfloat16": (1e-2, 5e-2)}


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def make_x(rng, batch, channels, length, dtype, channel_last):
    if channel_last:
        return randn(rng, (batch, length, channels), dtype).transpose(0, 2, 1)
    return randn(rng, (batch, channels, length), dtype)


def to_gpu_layout(x):
    """A CuPy copy of x with the same memory layout (contiguous or channel-last)."""
    if x.ndim == 3 and x.strides[1] < x.strides[2]:
        return cupy.asarray(np.ascontiguousarray(x.transpose(0, 2, 1))).transpose(0, 2, 1)
    return cupy.asarray(x)


def make_seq_idx(rng, batch, length):
    """Three or so packed sequences per row, the last two positions padding (when L > 4)."""
    seq = np.zeros((batch, length), np.int32)
    for b in range(batch):
        if length > 1:
            cuts = np.sort(rng.choice(np.arange(1, length), size=min(3, length - 1), replace=False))
            for i, c in enumerate(cuts):
                seq[b, c:] = i + 1
        if length > 4:
            seq[b, -2:] = -1
    return seq


def conv_grads(dout, x, weight, bias=None, activation=None, seq_idx=None, initial_states=None, dfinal_states=None):
    """Float64 (dx, dweight, dbias, dinitial_states) by reverse mode over the padded window."""
    x, weight, dout = f64(x), f64(weight), f64(dout)
    batch, channels, length = x.shape
    width = weight.shape[1]
    init = np.zeros((batch, channels, width - 1)) if initial_states is None else f64(initial_states)
    window = np.concatenate([init, x], axis=2)  # (B, D, L + W - 1)
    if seq_idx is None:
        ids = np.zeros((batch, length + width - 1), np.int64)
    else:
        ids = np.concatenate([np.repeat(seq_idx[:, :1], width - 1, axis=1), seq_idx], axis=1).astype(np.int64)
    own = ids[:, width - 1:]  # id of each output position
    match = [(ids[:, k:k + length] == own)[:, None, :] for k in range(width)]
    pre = np.zeros_like(x) + (0.0 if bias is None else f64(bias)[None, :, None])
    for k in range(width):
        pre += weight[None, :, k, None] * window[:, :, k:k + length] * match[k]
    dpre = np.where((own >= 0)[:, None, :], dout, 0.0)
    if activation is not None:
        sig = 1.0 / (1.0 + np.exp(-pre))
        dpre = dpre * sig * (1.0 + pre * (1.0 - sig))
    dwindow = np.zeros_like(window)
    dweight = np.zeros_like(weight)
    for k in range(width):
        dwindow[:, :, k:k + length] += weight[None, :, k, None] * dpre * match[k]
        dweight[:, k] = np.sum(dpre * window[:, :, k:k + length] * match[k], axis=(0, 2))
    if dfinal_states is not None and width > 1:
        last = ids[:, -1]
        for i in range(width - 1):
            keep = (last >= 0) & (ids[:, length + i] == last)
            dwindow[:, :, length + i] += f64(dfinal_states)[:, :, i] * keep[:, None]
    dbias = None if bias is None else dpre.sum(axis=(0, 2))
    dinit = None if initial_states is None else dwindow[:, :, : width - 1]
    return dwindow[:, :, width - 1:], dweight, dbias, dinit


OPTION_SETS = [  # (activation, seq_idx, initial_states dtype, bias)
    (None, False, None, True),
    ("silu", True, "x", False),
    ("silu", False, "float32", True),
    ("swish", True, None, True),
]


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
@pytest.mark.parametrize("batch,channels,length", [(1, 1, 1), (1, 3, 17), (2, 40, 3), (2, 24, 1030), (16, 8, 520),
                                                   (1, 8, 2048)])
def test_forward_and_backward(rng, dtype, width, channel_last, batch, channels, length):
    x = make_x(rng, batch, channels, length, dtype, channel_last)
    weight = randn(rng, (channels, width), dtype if dtype == "bfloat16" else "float32")
    rtol, atol = CONV_TOL[dtype]
    for activation, use_seq, init_dtype, use_bias in OPTION_SETS:
        bias = randn(rng, channels, "float32") if use_bias else None
        seq_idx = make_seq_idx(rng, batch, length) if use_seq else None
        init = None
        if init_dtype is not None:
            init = randn(rng, (batch, channels, width - 1), dtype if init_dtype == "x" else init_dtype)
        gx = to_gpu_layout(x)
        args = (gpu(weight), gpu(bias), activation, gpu(seq_idx), gpu(init))
        out, final = ssmcore.causal_conv1d(gx, *args, return_final_states=True)
        what = f"W{width} act {activation} seq {use_seq} init {init_dtype} bias {use_bias}"
        assert out.dtype == x.dtype and out.shape == x.shape
        if channel_last and channels > 1 and length > 1:
            assert out.strides[1] < out.strides[2], "out keeps x's channel-last layout"
        ref_out, ref_final = reference.causal_conv1d(x, weight, bias, activation, seq_idx, init, True)
        assert_close(host(out), ref_out, dtype, rtol=rtol, atol=atol, name=f"out ({what})")
        assert final.dtype == (init if init is not None else x).dtype
        np.testing.assert_array_equal(f64(host(final)), ref_final, err_msg=f"final_states ({what})")
        np.testing.assert_array_equal(f64(host(ssmcore.causal_conv1d(gx, *args))), f64(host(out)))

        dout = randn(rng, x.shape, dtype)
        dfinal = randn(rng, (batch, channels, width - 1), "float32")
        grads = ssmcore.causal_conv1d_bwd(gpu(dout), gx, *args, dfinal_states=gpu(dfinal))
        want = conv_grads(dout, x, weight, bias, activation, seq_idx, init, dfinal)
        for name, g, w, like in zip(grads._fields, grads, want, (x, weight, bias, init)):
            if w is None:
                assert g is None, name
                continue
            assert g.dtype == like.dtype, f"{name}: dtype {g.dtype}, expected {like.dtype}"
            scale = max(1.0, float(np.abs(w).max(initial=0.0)))
            assert_close(host(g), w, dtype, rtol=2 * rtol, atol=2 * atol * scale, name=f"{name} ({what})")
        if channel_last and channels > 1 and length > 1:
            assert grads.dx.strides[1] < grads.dx.strides[2], "dx keeps x's layout"


def test_odd_strides(rng):
    """x neither contiguous nor channel-last (every other channel of a wider array) is right."""
    wide = randn(rng, (2, 10, 33), "bfloat16")
    weight = randn(rng, (5, 4), "float32")
    out = ssmcore.causal_conv1d(gpu(wide)[:, ::2], gpu(weight), activation="silu")
    ref = reference.causal_conv1d(wide[:, ::2], weight, activation="silu")
    assert_close(host(out), ref, "bfloat16", *CONV_TOL["bfloat16"])


def test_inputs_not_modified(rng):
    x, weight = randn(rng, (2, 16, 100), "bfloat16"), randn(rng, (16, 4), "float32")
    init, dout = randn(rng, (2, 16, 3), "bfloat16"), randn(rng, (2, 16, 100), "bfloat16")
    g = [gpu(a) for a in (x, weight, init, dout)]
    ssmcore.causal_conv1d(g[0], g[1], None, "silu", None, g[2], True)
    ssmcore.causal_conv1d_bwd(g[3], g[0], g[1], None, "silu", None, g[2])
    for a, b in zip((x, weight, init, dout), g):
        np.testing.assert_array_equal(f64(host(b)), f64(a))


# --- decode -------------------------------------------------------------------------------------


UPDATE_CASES = [  # (batch, channels, width, state_len, new tokens)
    (1, 7, 4, 3, 1), (5, 64, 4, 3, 1), (3, 33, 4, 8, 3), (2, 16, 1, 0, 2), (4, 8, 2, 1, 5), (2, 9, 7, 6, 2),
]


@pytest.mark.parametrize("dtype,state_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("bfloat16", "float32"), ("float16", "float16"),
                                               ("float32", "bfloat16")])
@pytest.mark.parametrize("mode", ["shift", "circular", "pool"])
@pytest.mark.parametrize("case", UPDATE_CASES)
def test_update(rng, dtype, state_dtype, mode, case):
    batch, channels, width, state_len, n_new = case
    x = randn(rng, (batch, channels, n_new) if n_new > 1 else (batch, channels), dtype)
    pool_rows = batch + 3 if mode == "pool" else batch
    # A strided view into a wider buffer: updated in place through its strides.
    buffer = randn(rng, (pool_rows, channels, state_len + 2), state_dtype)
    weight, bias = randn(rng, (channels, width), "float32"), randn(rng, channels, "float32")
    cache_seqlens = indices = None
    if mode == "circular" and state_len > 0:
        cache_seqlens = rng.integers(0, 50, batch).astype(np.int32)
    if mode == "pool":
        indices = rng.permutation(pool_rows)[:batch].astype(np.int32)
        indices[0] = -1
    gbuf = gpu(buffer)
    gstate = gbuf[:, :, 1:1 + state_len]
    out = ssmcore.causal_conv1d_update(gpu(x), gstate, gpu(weight), gpu(bias), "silu", gpu(cache_seqlens), gpu(indices))
    cpu_state = buffer[:, :, 1:1 + state_len].copy()
    cpu_out = cpu.causal_conv1d_update(x, cpu_state, weight, bias, "silu", cache_seqlens, indices)
    ref_out, ref_state = reference.causal_conv1d_update(x, buffer[:, :, 1:1 + state_len], weight, bias, "silu",
                                                         cache_seqlens, indices)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(host(out), ref_out, dtype, *CONV_TOL[dtype], name="out")
    np.testing.assert_array_equal(f64(host(gstate)), f64(cpu_state), err_msg="state differs from the CPU backend")
    assert_close(host(gstate), ref_state, state_dtype, name="state vs reference")
    edges = host(gbuf)
    np.testing.assert_array_equal(f64(edges[:, :, 0]), f64(buffer[:, :, 0]))  # outside the view: untouched
    np.testing.assert_array_equal(f64(edges[:, :, -1]), f64(buffer[:, :, -1]))
    if indices is not None:
        untouched = sorted(set(range(pool_rows)) - set(indices[indices >= 0].tolist()))
        np.testing.assert_array_equal(f64(edges[untouched]), f64(buffer[untouched]))
        assert float(np.abs(f64(host(out))[0]).max()) == 0.0, "padding rows output 0"
    np.testing.assert_allclose(f64(cpu_out), f64(host(out)), rtol=CONV_TOL[dtype][0] * 4, atol=CONV_TOL[dtype][1])


def test_matches_cpu_backend(rng):
    """Forward with final states through both backends: final states equal, outputs close."""
    for channel_last in (False, True):
        x = make_x(rng, 3, 40, 300, "bfloat16", channel_last)
        weight, init = randn(rng, (40, 4), "bfloat16"), randn(rng, (3, 40, 3), "bfloat16")
        seq_idx = make_seq_idx(rng, 3, 300)
        out, final = ssmcore.causal_conv1d(to_gpu_layout(x), gpu(weight), None, "silu", gpu(seq_idx), gpu(init), True)
        cout, cfinal = cpu.causal_conv1d(x, weight, None, "silu", seq_idx, init, True)
        np.testing.assert_array_equal(host(final), cfinal)
        assert_close(host(out), cout, "bfloat16", *CONV_TOL["bfloat16"], name="out vs CPU backend")


# --- CUDA graphs ---------------------------------------------------------------------------------


def test_cuda_graph_capture_and_replay(rng):
    """Prefill forward/backward and a decode step captured on a side stream replay on new inputs."""
    shapes = {"x": (2, 64, 300), "dout": (2, 64, 300), "init": (2, 64, 3), "xd": (4, 64)}
    fresh = lambda: {n: randn(rng, s, "bfloat16") for n, s in shapes.items()}
    data = fresh()
    g = {n: gpu(a) for n, a in data.items()}
    weight, bias = randn(rng, (64, 4), "float32"), randn(rng, 64, "float32")
    gw, gb = gpu(weight), gpu(bias)
    state0 = randn(rng, (4, 64, 3), "float32")
    gstate = gpu(state0)

    def step():
        out, final = ssmcore.causal_conv1d(g["x"], gw, gb, "silu", None, g["init"], True)
        grads = ssmcore.causal_conv1d_bwd(g["dout"], g["x"], gw, gb, "silu", None, g["init"])
        dec = ssmcore.causal_conv1d_update(g["xd"], gstate, gw, gb, "silu")
        return out, final, grads, dec

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):
            step()
        stream.synchronize()
        gstate[...] = gpu(state0)
        stream.synchronize()
        stream.begin_capture()
        out, final, grads, dec = step()
        graph = stream.end_capture()
    data = fresh()
    for n, a in data.items():
        g[n][...] = gpu(a)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    graph.launch(stream)  # the decode step runs twice on the state
    stream.synchronize()
    ref_out, ref_final = reference.causal_conv1d(data["x"], weight, bias, "silu", None, data["init"], True)
    assert_close(host(out), ref_out, "bfloat16", *CONV_TOL["bfloat16"], name="replayed out")
    np.testing.assert_array_equal(f64(host(final)), ref_final)
    want = conv_grads(data["dout"], data["x"], weight, bias, "silu", None, data["init"])
    for name, got, w in zip(grads._fields, grads, want):
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        assert_close(host(got), w, "bfloat16", rtol=2e-2, atol=0.1 * scale, name=f"replayed {name}")
    _, state1 = reference.causal_conv1d_update(data["xd"], state0, weight, bias, "silu")
    ref_dec, state2 = reference.causal_conv1d_update(data["xd"], state1, weight, bias, "silu")
    assert_close(host(dec), ref_dec, "bfloat16", *CONV_TOL["bfloat16"], name="replayed decode out")
    np.testing.assert_array_equal(f64(host(gstate)), state2.astype(np.float32))


# --- 64-bit offsets -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("channel_last", [False, True], ids=["contiguous", "channel_last"])
def test_beyond_int32_offsets(channel_last):
    """B * D * L > 2**31: rows at the far end of x are right (checked against NumPy in float64)."""
    batch, channels, length, width = 2, 1024, 2**20 + 8, 4
    assert batch * channels * length > 2**31
    rs = cupy.random.RandomState(7)
    shape = (batch, length, channels) if channel_last else (batch, channels, length)
    gx = rs.standard_normal(shape, dtype=cupy.float32).astype(ml_dtypes.bfloat16)
    if channel_last:
        gx = gx.transpose(0, 2, 1)
    weight = np.random.default_rng(1).standard_normal((channels, width)).astype(np.float32)
    out = ssmcore.causal_conv1d(gx, gpu(weight), None, "silu")
    for b, d in [(1, channels - 1), (1, channels // 2), (0, 3)]:
        row = f64(host(gx[b, d]))
        pad = np.concatenate([np.zeros(width - 1), row])
        pre = sum(weight[d, k] * pad[k:k + length] for k in range(width))
        want = pre / (1.0 + np.exp(-pre))
        assert_close(host(out[b, d]), want, "bfloat16", *CONV_TOL["bfloat16"], name=f"row ({b}, {d})")
    del gx, out


# --- Index arrays the host does not check (CUDA-graph capture) -------------------------------------


def _unchecked(monkeypatch):
    """Make the ops believe the stream is capturing: the host index checks are skipped."""
    import importlib
    for module in ("ssmcore._checks", "ssmcore.ops.conv"):
        monkeypatch.setattr(importlib.import_module(module), "stream_capturing", lambda xp: True)


def _update_expectation(x, state, weight, bias, cache_seqlens, indices):
    """Reference result with every row the kernel must treat as padding marked -1."""
    pool_rows = state.shape[0]
    bad = (indices < 0) | (indices >= pool_rows)
    if cache_seqlens is not None:
        bad |= cache_seqlens < 0
    safe_idx = np.where(bad, -1, indices).astype(np.int64)
    safe_len = None if cache_seqlens is None else np.where(bad, 0, cache_seqlens).astype(np.int64)
    return reference.causal_conv1d_update(x, state, weight, bias, "silu", safe_len, safe_idx), bad


@pytest.mark.parametrize("index_dtype", ["int32", "int64"])
@pytest.mark.parametrize("circular", [False, True], ids=["shift", "circular"])
def test_update_unchecked_indices_stay_in_bounds(rng, monkeypatch, index_dtype, circular):
    """Without the host checks (as during capture), indices >= Bs or < -1 and negative cache_seqlens
    make a padding row: output 0, no state row read or written, nothing past the pool touched."""
    _unchecked(monkeypatch)
    batch, channels, width, state_len, pool_rows = 6, 24, 4, 5, 5
    indices = np.array([3, pool_rows, -7, 0, 2**31 + 1 if index_dtype == "int64" else pool_rows + 40, 4],
                       dtype=index_dtype)
    cache_seqlens = np.array([7, 3, 1, -4, 2, 11], dtype=index_dtype) if circular else None
    x = randn(rng, (batch, channels, 2), "bfloat16")
    weight, bias = randn(rng, (channels, width), "float32"), randn(rng, channels, "float32")
    # The pool is the head of a bigger buffer: rows past it are sentinels that must not change.
    buffer = randn(rng, (pool_rows + 3, channels, state_len), "float32")
    gbuf = gpu(buffer)
    out = ssmcore.causal_conv1d_update(gpu(x), gbuf[:pool_rows], gpu(weight), gpu(bias), "silu",
                                       gpu(cache_seqlens), gpu(indices))
    (ref_out, ref_state), bad = _update_expectation(x, buffer[:pool_rows], weight, bias, cache_seqlens, indices)
    assert bad.sum() == (4 if circular else 3)
    got = f64(host(out))
    assert float(np.abs(got[bad]).max()) == 0.0, "unchecked bad rows output 0"
    assert_close(got, ref_out, "bfloat16", *CONV_TOL["bfloat16"], name="out")
    after = host(gbuf)
    np.testing.assert_array_equal(after[:pool_rows], ref_state.astype(np.float32))
    np.testing.assert_array_equal(after[pool_rows:], buffer[pool_rows:], err_msg="wrote past the pool")


def test_cuda_graph_update_with_indices(rng):
    """causal_conv1d_update with conv_state_indices and cache_seqlens captured in a CUDA graph (no host
    sync in the checks); the replay reads the index arrays as they are then, an out-of-pool index
    included (a padding row)."""
    batch, channels, width, state_len, pool_rows = 4, 64, 4, 6, 7
    weight, bias = randn(rng, (channels, width), "float32"), randn(rng, channels, "float32")
    gw, gb = gpu(weight), gpu(bias)
    state0 = randn(rng, (pool_rows, channels, state_len), "bfloat16")
    gstate = gpu(state0)
    gx = gpu(randn(rng, (batch, channels), "bfloat16"))
    gidx = gpu(np.array([1, 4, -1, 6], dtype=np.int32))
    glen = gpu(np.array([0, 5, 2, 9], dtype=np.int32))
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):  # compile and fill the memory pool outside the capture
            ssmcore.causal_conv1d_update(gx, gstate, gw, gb, "silu", glen, gidx)
        gstate[...] = gpu(state0)
        stream.synchronize()
        stream.begin_capture()
        out = ssmcore.causal_conv1d_update(gx, gstate, gw, gb, "silu", glen, gidx)
        graph = stream.end_capture()
    x = randn(rng, (batch, channels), "bfloat16")
    indices = np.array([5, pool_rows + 3, 0, 2], dtype=np.int32)  # row 1 is outside the pool
    cache_seqlens = np.array([3, 1, 8, 13], dtype=np.int32)
    gx[...] = gpu(x)
    gidx[...] = gpu(indices)
    glen[...] = gpu(cache_seqlens)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    stream.synchronize()
    (ref_out, ref_state), bad = _update_expectation(x, state0, weight, bias, cache_seqlens, indices)
    assert bad.tolist() == [False, True, False, False]
    assert float(np.abs(f64(host(out))[1]).max()) == 0.0
    assert_close(host(out), ref_out, "bfloat16", *CONV_TOL["bfloat16"], name="replayed out")
    np.testing.assert_array_equal(f64(host(gstate)), ref_state.astype(ml_dtypes.bfloat16).astype(np.float64))


# --- deterministic backward ------------------------------------------------------------------------


@pytest.mark.parametrize("length", [300, 2048 + 40])
def test_backward_bitwise_reproducible(rng, length):
    """dweight/dbias are sums over batch and time of per-block partials added by column_sum in a
    fixed order (no atomics, so in every mode): two runs agree bit for bit."""
    x = randn(rng, (2, 8, length), "bfloat16")
    dout = randn(rng, x.shape, "bfloat16")
    weight, bias = randn(rng, (8, 4), "float32"), randn(rng, 8, "float32")
    init = randn(rng, (2, 8, 3), "bfloat16")
    g = [gpu(a) for a in (dout, x, weight, bias, init)]
    runs = [ssmcore.causal_conv1d_bwd(g[0], g[1], g[2], g[3], "silu", None, g[4]) for _ in range(3)]
    for again in runs[1:]:
        for name, a, b in zip(runs[0]._fields, runs[0], again):
            np.testing.assert_array_equal(f64(host(a)), f64(host(b)), err_msg=f"{name} differs between runs")


# --- the fused contiguous backward and the channel-last tile kernels (and the paths they replace) ---


@pytest.mark.parametrize("path", ["ws2", "ws4", "ws8", "ws4h", "ws8h", "new", "cltile", "old"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("channel_last,shape", [(False, (2, 3, 16)), (False, (1, 2, 1040)),
                                                (True, (2, 24, 70)), (True, (1, 72, 9))],
                         ids=["contig-short", "contig-2chunks", "cl-2tiles", "cl-2ctiles"])
def test_fast_paths(rng, monkeypatch, path, dtype, width, channel_last, shape):
    """conv_fwd_ws / conv_bwd_ws ("ws2", "ws4": 2 or 4 words per thread; contiguous, L % 8 == 0:
    several warp segments, the last one partial; "ws8": 8 words, the forward only; "ws4h", "ws8h": the forward with
    evict-first cache hints, session 7's SSMCORE_CONV_FWD_HINT), conv_fwd_vec / conv_bwd_fused ("new"),
    conv_fwd_cl_tile / conv_bwd_cl_walk ("new", channel-last, D % 8 == 0) and conv_bwd_cl_tile
    ("cltile"): partial channel and time tiles, several chunks, initial states of x's dtype and
    dfinal_states, against the float64 oracles; "old" runs the paths they replace."""
    conv_backend = pytest.importorskip("ssmcore.backends.cupy.conv")
    ws = path.startswith("ws")
    if channel_last and ws:
        pytest.skip("the warp-strided kernels take contiguous x only (channel-last is covered by new/old)")
    if path == "cltile" and not channel_last:
        pytest.skip("cltile differs from new in the channel-last backward only")
    monkeypatch.setattr(conv_backend, "cl_bwd", "tile" if path == "cltile" else "walk")
    monkeypatch.setattr(conv_backend, "fwd_path", "ws" if ws else "vec")
    monkeypatch.setattr(conv_backend, "bwd_path", "ws" if ws else "fused" if path == "new" else "split")
    monkeypatch.setattr(conv_backend, "cl_path", "old" if path == "old" else "tile")
    monkeypatch.setattr(conv_backend, "fwd_hint", path.endswith("h"))
    if ws:
        monkeypatch.setattr(conv_backend, "fwd_words", int(path[2]))
        monkeypatch.setattr(conv_backend, "bwd_words", min(4, int(path[2])))
    batch, channels, length = shape
    x = make_x(rng, batch, channels, length, dtype, channel_last)
    weight = randn(rng, (channels, width), "float32")
    rtol, atol = CONV_TOL[dtype]
    for activation, use_init, use_bias in (("silu", True, True), (None, False, False)):
        bias = randn(rng, channels, "float32") if use_bias else None
        init = randn(rng, (batch, channels, width - 1), dtype) if use_init else None
        gx = to_gpu_layout(x)
        args = (gpu(weight), gpu(bias), activation, None, gpu(init))
        out, final = ssmcore.causal_conv1d(gx, *args, return_final_states=True)
        what = f"W{width} act {activation} init {use_init}"
        ref_out, ref_final = reference.causal_conv1d(x, weight, bias, activation, None, init, True)
        assert_close(host(out), ref_out, dtype, rtol=rtol, atol=atol, name=f"out ({what})")
        np.testing.assert_array_equal(f64(host(final)), ref_final, err_msg=f"final_states ({what})")
        # The second option set takes a float32 dout (the kernels' other dout stream type).
        dout_dtype = dtype if activation else "float32"
        dout = to_gpu_layout(make_x(rng, batch, channels, length, dout_dtype, channel_last))
        dfinal = randn(rng, (batch, channels, width - 1), "float32")
        grads = ssmcore.causal_conv1d_bwd(dout, gx, *args, dfinal_states=gpu(dfinal))
        want = conv_grads(host(dout), x, weight, bias, activation, None, init, dfinal)
        for name, g, w, like in zip(grads._fields, grads, want, (x, weight, bias, init)):
            if w is None:
                assert g is None, name
                continue
            assert g.dtype == like.dtype, f"{name}: dtype {g.dtype}, expected {like.dtype}"
            scale = max(1.0, float(np.abs(w).max(initial=0.0)))
            assert_close(host(g), w, dtype, rtol=2 * rtol, atol=2 * atol * scale, name=f"{name} ({what})")


@pytest.mark.parametrize("dtype,state_dtype", [("bfloat16", "bfloat16"), ("float32", "float32"),
                                               ("float16", "bfloat16")])
@pytest.mark.parametrize("width,state_len", [(4, 4), (4, 3), (2, 1), (3, 8), (4, 9)])
def test_update_strided_x_both_paths(rng, monkeypatch, dtype, state_dtype, width, state_len):
    """x a slice of a projection row (as in Mamba.step): read through its strides, no copy ("v2"), and the
    register path (one token, state_len <= 8) agrees with the general loop ("v1"): states bit for bit."""
    from ssmcore.backends.cupy import conv as cupy_conv

    batch, channels = 3, 40
    proj = randn(rng, (batch, 2 * channels + 8), dtype)
    state0 = randn(rng, (batch + 2, channels, state_len), state_dtype)
    weight, bias = randn(rng, (channels, width), "float32"), randn(rng, channels, "float32")
    indices = np.array([4, -1, 0], np.int32)
    results = {}
    for path in ("v1", "v2"):
        monkeypatch.setattr(cupy_conv, "update_path", path)
        gstate = gpu(state0)
        x = gpu(proj)[:, channels + 3:2 * channels + 3]  # row stride 2 * channels + 8, offset 3
        out = ssmcore.causal_conv1d_update(x, gstate, gpu(weight), gpu(bias), "silu", None, gpu(indices))
        results[path] = host(out), host(gstate)
    xs = proj[:, channels + 3:2 * channels + 3]
    ref_out, ref_state = reference.causal_conv1d_update(xs, state0, weight, bias, "silu", None, indices)
    for path, (out, state) in results.items():
        assert_close(out, ref_out, dtype, *CONV_TOL[dtype], name=f"{path} out")
        assert_close(state, ref_state, state_dtype, name=f"{path} state")
        assert float(np.abs(f64(out[1])).max()) == 0.0
    np.testing.assert_array_equal(f64(results["v2"][1]), f64(results["v1"][1]))
    np.testing.assert_array_equal(f64(results["v2"][1][[1, 3]]), f64(state0[[1, 3]]))  # rows not in indices
