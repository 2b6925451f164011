"""selective_state_update on the GPU (CuPy backend) against the float64 reference and the Numba backend.

Both forms (without heads: Mamba-1; with heads: Mamba-2), groups, a stride-0 A, strided x/dt/z
(slices of a projection), a state pool with padding rows, float32/float16/bfloat16 states, and
D/dt_bias omitted. The output and the new state are compared with ssmcore.reference; rows the
step must not touch are checked bit for bit. Both kernels: the default state_update_v2 runs
wherever the layout allows it (test_step included); the v2 tests also run the v1 kernel on the
same inputs (states equal bit for bit), force every rows-per-thread count, and use the layout of
Mamba2.step.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, TOL, assert_close, f64, randn

import ssmcore
from ssmcore import reference
from ssmcore.backends import numba as cpu

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def make_inputs(rng, heads, batch, n_state, x_dtype, state_dtype, *, pool_extra=0, options=True,
                scalar_A=False, groups=2):
    """Keyword arguments (NumPy) of selective_state_update; x, dt and z are strided views."""
    channels = (4, 6) if heads else (8,)
    state = randn(rng, (batch + pool_extra,) + channels + (n_state,), state_dtype)
    def wide(dtype, scale=1.0, positive=False):  # a strided view: every other entry of a wider array
        a = rng.standard_normal((batch,) + channels[:-1] + (2 * channels[-1],)) * scale
        return (np.abs(a) + 0.05 if positive else a).astype(DTYPES[dtype])[..., 1::2]


    if heads:
        if scalar_A:
            A = np.broadcast_to((-np.exp(randn(rng, (channels[0], 1, 1), "float32"))), channels + (n_state,))
        else:
            A = -np.exp(randn(rng, channels + (n_state,), "float32"))
        B = randn(rng, (batch, groups, n_state), x_dtype)
    else:
        A = -np.exp(randn(rng, channels + (n_state,), "float32"))
        B = randn(rng, (batch, n_state), x_dtype)  # one group, (B, N)
    return dict(
        state=state,
        x=wide(x_dtype),
        dt=wide(x_dtype, 0.5, positive=True),  # a time step (also without softplus)
        A=A,
        B=B,
        C=randn(rng, (batch, groups, n_state), x_dtype),
        D=randn(rng, channels, "float32") if options else None,
        z=wide(x_dtype) if options else None,
        dt_bias=randn(rng, channels, "float32", 0.3) if options else None,
    )


def run_gpu(args, softplus, indices):
    g = {n: gpu(a) for n, a in args.items()}
    for n in ("x", "dt", "z"):  # keep the strided layouts of x, dt, z on the device
        if args[n] is not None:
            wide = cupy.zeros(args[n].shape[:-1] + (2 * args[n].shape[-1],), args[n].dtype)
            wide[..., 1::2] = gpu(np.ascontiguousarray(args[n]))
            g[n] = wide[..., 1::2]
    if args["A"].strides[-1] == 0:
        g["A"] = cupy.broadcast_to(gpu(np.ascontiguousarray(args["A"][..., :1])), args["A"].shape)
    out = ssmcore.selective_state_update(**g, dt_softplus=softplus, state_batch_indices=gpu(indices))
    return out, g["state"]


@pytest.mark.parametrize("heads", [False, True], ids=["mamba1", "mamba2"])
@pytest.mark.parametrize("n_state", [16, 20, 128, 256])
@pytest.mark.parametrize("x_dtype,state_dtype", [("float32", "float32"), ("bfloat16", "float32"),
                                                 ("bfloat16", "bfloat16"), ("float16", "float16"),
                                                 ("float32", "bfloat16")])
@pytest.mark.parametrize("batch", [1, 64])
def test_step(rng, heads, n_state, x_dtype, state_dtype, batch):
    for pool_extra, options, scalar_A, softplus in [(0, True, False, True), (3, False, True, False),
                                                    (2, True, True, True)]:
        args = make_inputs(rng, heads, batch, n_state, x_dtype, state_dtype, pool_extra=pool_extra,
                           options=options, scalar_A=scalar_A and heads)
        indices = None
        if pool_extra:
            indices = rng.permutation(batch + pool_extra)[:batch].astype(np.int32)
            indices[0] = -1
        out, state = run_gpu(args, softplus, indices)
        ref_out, ref_state = reference.selective_state_update(**args, dt_softplus=softplus,
                                                              state_batch_indices=indices)
        assert out.dtype == args["x"].dtype and out.shape == args["x"].shape
        assert state.dtype == args["state"].dtype
        worst = x_dtype if TOL[x_dtype] > TOL[state_dtype] else state_dtype
        assert_close(host(out), ref_out, worst, name=f"out (pool {pool_extra}, options {options})")
        assert_close(host(state), ref_state, state_dtype, name="state")
        if indices is not None:
            untouched = sorted(set(range(batch + pool_extra)) - set(indices[indices >= 0].tolist()))
            np.testing.assert_array_equal(f64(host(state)[untouched]), f64(args["state"][untouched]))
            assert float(np.abs(f64(host(out))[0]).max()) == 0.0, "padding row outputs 0"


def test_decode_sequence_matches_recurrence(rng):
    """Forty steps in a row on a float32 state stay on the float64 recurrence."""
    args = make_inputs(rng, True, 8, 64, "float32", "float32")
    g = {n: gpu(np.ascontiguousarray(a)) for n, a in args.items()}
    state = f64(args["state"])
    for _ in range(40):
        xs = randn(rng, args["x"].shape, "float32")
        g["x"][...] = gpu(xs)
        out = ssmcore.selective_state_update(**g, dt_softplus=True)
        ref_out, state = reference.selective_state_update(**{**args, "state": state, "x": xs}, dt_softplus=True)
    assert_close(host(out), ref_out, "float32", name="out after 40 steps")
    assert_close(host(g["state"]), state, "float32", name="state after 40 steps")


def test_matches_cpu_backend(rng):
    args = make_inputs(rng, True, 16, 128, "bfloat16", "bfloat16", pool_extra=4)
    indices = rng.permutation(20)[:16].astype(np.int32)
    indices[3] = -1
    out, state = run_gpu(args, True, indices)
    cpu_state = args["state"].copy()
    cpu_out = cpu.selective_state_update(**{**args, "state": cpu_state}, dt_softplus=True,
                                         state_batch_indices=indices)
    assert_close(host(out), cpu_out, "bfloat16", name="out vs CPU backend")
    assert_close(host(state), cpu_state, "bfloat16", name="state vs CPU backend")


def test_float64_is_cpu_only(rng):
    args = make_inputs(rng, False, 2, 16, "float32", "float32")
    g = {n: gpu(np.ascontiguousarray(a)) for n, a in args.items()}
    g["state"] = g["state"].astype(cupy.float64)
    with pytest.raises(TypeError, match=r"^state:"):
        ssmcore.selective_state_update(**g)


def test_cuda_graph_capture_and_replay(rng):
    """One decode step captured on a side stream; two replays advance the state twice."""
    args = make_inputs(rng, True, 64, 128, "bfloat16", "float32")
    args = {n: None if a is None else np.ascontiguousarray(a) for n, a in args.items()}
    g = {n: gpu(a) for n, a in args.items()}
    state0 = args["state"].copy()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):
            ssmcore.selective_state_update(**g, dt_softplus=True)
        g["state"][...] = gpu(state0)
        stream.synchronize()
        stream.begin_capture()
        out = ssmcore.selective_state_update(**g, dt_softplus=True)
        graph = stream.end_capture()
    xs = randn(rng, args["x"].shape, "bfloat16")
    g["x"][...] = gpu(xs)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    graph.launch(stream)
    stream.synchronize()
    step = {**args, "x": xs}
    _, s1 = reference.selective_state_update(**step, dt_softplus=True)
    ref_out, s2 = reference.selective_state_update(**{**step, "state": s1}, dt_softplus=True)
    assert_close(host(out), ref_out, "bfloat16", name="replayed out")
    assert_close(host(g["state"]), s2, "float32", name="state after two replays")


# ---- the two kernels (state_update_v2, the default where the layout allows it, and state_update) ----

from ssmcore.backends.cupy import state_update as cupy_ssu  # noqa: E402


@pytest.fixture
def kernel_impl():
    """Restores the backend's kernel choice after a test switches it."""
    saved = cupy_ssu.impl, cupy_ssu.rows_override
    yield cupy_ssu
    cupy_ssu.impl, cupy_ssu.rows_override = saved


def _run_both(kernel_impl, args, softplus, indices, rows=0):
    """(out, state) of the v1 kernel and of v2 (rows per thread forced when rows > 0), and the v2 launch count."""
    results = {}
    calls = []
    original = cupy_ssu._launch_v2
    for impl in ("v1", "v2"):
        kernel_impl.impl, kernel_impl.rows_override = impl, rows
        cupy_ssu._launch_v2 = lambda *a, **k: (calls.append(impl), original(*a, **k))[1]
        try:
            results[impl] = run_gpu(args, softplus, indices)
        finally:
            cupy_ssu._launch_v2 = original
    return results, calls


@pytest.mark.parametrize("rows", [0, 1, 2, 4])
@pytest.mark.parametrize("case", [
    # heads, batch, (H, P) or (D,), N, groups, x dtype, state dtype, scalar A, pool extra
    (True, 3, (4, 5), 128, 2, "bfloat16", "bfloat16", True, 2),
    (True, 2, (3, 8), 64, 1, "bfloat16", "float32", True, 0),
    (True, 2, (2, 7), 32, 1, "float16", "float32", True, 1),    # float32 state, rows 4 (a session 7 variant)
    (True, 2, (2, 3), 24, 2, "float32", "float16", False, 1),   # N / 8 = 3 chunks: a lane idle per row
    (True, 1, (2, 4), 256, 1, "bfloat16", "bfloat16", True, 0),  # 32 lanes per row
    (False, 3, (70,), 16, 1, "bfloat16", "bfloat16", False, 2),  # partial tiles
    (False, 2, (300,), 16, 3, "float32", "float32", False, 0),   # groups over channels, partial tiles
    (False, 2, (9,), 8, 1, "float32", "bfloat16", False, 1),
], ids=lambda c: "-".join(str(v) for v in c) if isinstance(c, tuple) else str(c))
def test_v2_matches_v1_and_reference(rng, kernel_impl, case, rows):
    heads, batch, channels, n_state, groups, x_dtype, state_dtype, scalar_A, pool_extra = case
    state = randn(rng, (batch + pool_extra,) + channels + (n_state,), state_dtype)
    wide = lambda dtype, scale=1.0: (rng.standard_normal((batch,) + channels[:-1] + (2 * channels[-1],))  # noqa: E731
                                     * scale).astype(DTYPES[dtype])[..., 1::2]
    if scalar_A:
        A = np.broadcast_to(-np.exp(randn(rng, (channels[0], 1, 1), "float32")), channels + (n_state,))
    else:
        A = -np.exp(randn(rng, channels + (n_state,), "float32"))
    B = randn(rng, (batch, groups, n_state), x_dtype)
    if not heads and groups == 1:
        B = B[:, 0]
    args = dict(state=state, x=wide(x_dtype), dt=np.abs(wide(x_dtype, 0.5)) + 0.01, A=A, B=B,
                C=randn(rng, (batch, groups, n_state), x_dtype), D=randn(rng, channels, "float32"),
                z=wide(x_dtype), dt_bias=randn(rng, channels, "float32", 0.3))
    args["dt"] = np.ascontiguousarray(args["dt"])
    indices = None
    if pool_extra:
        indices = rng.permutation(batch + pool_extra)[:batch].astype(np.int32)
        indices[-1] = -1
    results, calls = _run_both(kernel_impl, args, True, indices, rows)
    assert calls == ["v2"], "the v2 kernel ran for this layout"
    ref_out, ref_state = reference.selective_state_update(**args, dt_softplus=True, state_batch_indices=indices)
    worst = x_dtype if TOL[x_dtype] > TOL[state_dtype] else state_dtype
    out1, state1 = (host(a) for a in results["v1"])
    out2, state2 = (host(a) for a in results["v2"])
    assert_close(out2, ref_out, worst, name="v2 out")
    assert_close(state2, ref_state, state_dtype, name="v2 state")
    # Same per-entry math in the same order: the states agree bit for bit; out sums in another order.
    np.testing.assert_array_equal(f64(state2), f64(state1))
    assert_close(out2, f64(out1), "float32" if x_dtype == "float32" else x_dtype, name="v2 out vs v1")
    if indices is not None:
        untouched = sorted(set(range(batch + pool_extra)) - set(indices[indices >= 0].tolist()))
        np.testing.assert_array_equal(f64(state2[untouched]), f64(state[untouched]))
        assert float(np.abs(f64(out2)[-1]).max()) == 0.0, "padding row outputs 0"


V3_CASES = [  # batch, (H, P), N, groups, x dtype, state dtype, pool extra (A a per-head scalar: v3's layout)
    (3, (4, 5), 128, 2, "bfloat16", "bfloat16", 2),
    (2, (3, 8), 64, 1, "bfloat16", "float32", 0),
    (2, (2, 7), 32, 1, "float16", "float32", 1),
    (1, (2, 4), 256, 1, "bfloat16", "bfloat16", 0),
    (3, (5, 3), 16, 1, "float32", "float16", 1),
]


@pytest.mark.parametrize("rows", [0, 1, 2, 4])
@pytest.mark.parametrize("case", V3_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_v3_matches_v2_and_reference(rng, kernel_impl, monkeypatch, case, rows):
    """state_update_v3 (persistent grid; here one block walks every tile, prefetching the next) against the
    reference and bit for bit against v2's state (same per-entry math)."""
    from ssmcore.backends.cupy import _arrays

    batch, channels, n_state, groups, x_dtype, state_dtype, pool_extra = case
    state = randn(rng, (batch + pool_extra,) + channels + (n_state,), state_dtype)
    A = np.broadcast_to(-np.exp(randn(rng, (channels[0], 1, 1), "float32")), channels + (n_state,))
    args = dict(state=state, x=randn(rng, (batch,) + channels, x_dtype),
                dt=np.abs(randn(rng, (batch,) + channels, x_dtype, 0.5)) + 0.01, A=A,
                B=randn(rng, (batch, groups, n_state), x_dtype), C=randn(rng, (batch, groups, n_state), x_dtype),
                D=randn(rng, channels, "float32"), z=randn(rng, (batch,) + channels, x_dtype),
                dt_bias=randn(rng, channels, "float32", 0.3))
    indices = None
    if pool_extra:
        indices = rng.permutation(batch + pool_extra)[:batch].astype(np.int32)
        indices[-1] = -1
    monkeypatch.setattr(_arrays, "sm_count", lambda: 1)
    monkeypatch.setattr(cupy_ssu, "_resident_blocks", lambda kernel: 1)
    names = []
    original = cupy_ssu._runtime.function
    monkeypatch.setattr(cupy_ssu._runtime, "function",
                        lambda family, name, *a, **k: (names.append(name), original(family, name, *a, **k))[1])
    results = {}
    for impl in ("v2", "v3"):
        kernel_impl.impl, kernel_impl.rows_override = impl, rows
        results[impl] = run_gpu(args, True, indices)
    assert any(n.startswith("state_update_v3<") for n in names), names
    ref_out, ref_state = reference.selective_state_update(**args, dt_softplus=True, state_batch_indices=indices)
    worst = x_dtype if TOL[x_dtype] > TOL[state_dtype] else state_dtype
    out2, state2 = (host(a) for a in results["v2"])
    out3, state3 = (host(a) for a in results["v3"])
    assert_close(out3, ref_out, worst, name="v3 out")
    assert_close(state3, ref_state, state_dtype, name="v3 state")
    np.testing.assert_array_equal(f64(state3), f64(state2))
    np.testing.assert_array_equal(f64(out3), f64(out2))  # same shuffle order as v2
    if indices is not None:
        untouched = sorted(set(range(batch + pool_extra)) - set(indices[indices >= 0].tolist()))
        np.testing.assert_array_equal(f64(state3[untouched]), f64(state[untouched]))
        assert float(np.abs(f64(out3)[-1]).max()) == 0.0, "padding row outputs 0"


def test_v2_index_past_pool_is_padding(rng, kernel_impl):
    """An index >= the pool size (host checks are skipped while a graph is captured) reads and writes nothing."""
    args = make_inputs(rng, True, 3, 128, "bfloat16", "bfloat16", scalar_A=True)
    g = {n: gpu(np.ascontiguousarray(a)) for n, a in args.items()}
    before = host(g["state"]).copy()
    out = cupy.empty(args["x"].shape, args["x"].dtype)
    indices = cupy.asarray(np.array([2, 7, -1], np.int32))
    kernel_impl.impl = "v2"
    # The backend entry point directly: the op layer would reject index 7 outside a graph capture.
    out = cupy_ssu.selective_state_update(g["state"], g["x"], g["dt"], g["A"], g["B"], g["C"], g["D"], g["z"],
                                          g["dt_bias"], True, indices)
    after = host(g["state"])
    np.testing.assert_array_equal(f64(after[:2]), f64(before[:2]))
    assert not np.array_equal(f64(after[2]), f64(before[2]))
    assert float(np.abs(f64(host(out))[1:]).max()) == 0.0


def test_v2_mamba2_decode_layout(rng, kernel_impl):
    """The layout of Mamba2.step: x, B, C, dt slices of one projection row, per-head dt / A / D / dt_bias
    as stride-0 views, bf16 state; v2 against the reference."""
    batch, heads, hdim, n_state = 5, 8, 16, 32  # a projection row of 328 elements: 16-byte aligned rows
    d_ssm = heads * hdim
    proj = randn(rng, (batch, 2 * d_ssm + 2 * n_state + heads), "bfloat16")
    state = randn(rng, (batch, heads, hdim, n_state), "bfloat16")
    g_proj, g_state = gpu(proj), gpu(state)
    z, x, B, C, dt = (g_proj[:, a:b] for a, b in [(0, d_ssm), (d_ssm, 2 * d_ssm), (2 * d_ssm, 2 * d_ssm + n_state),
                                                  (2 * d_ssm + n_state, 2 * d_ssm + 2 * n_state),
                                                  (2 * d_ssm + 2 * n_state, None)])
    A_h = -np.exp(randn(rng, (heads,), "float32"))
    D_h, bias_h = randn(rng, (heads,), "float32"), randn(rng, (heads,), "float32", 0.3)
    shape = (batch, heads, hdim)
    kernel_impl.impl = "v2"
    calls = []
    original = cupy_ssu._launch_v2
    cupy_ssu._launch_v2 = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        out = ssmcore.selective_state_update(
            g_state, x.reshape(shape), cupy.broadcast_to(dt[:, :, None], shape),
            cupy.broadcast_to(gpu(A_h)[:, None, None], (heads, hdim, n_state)),
            B.reshape(batch, 1, n_state), C.reshape(batch, 1, n_state),
            cupy.broadcast_to(gpu(D_h)[:, None], (heads, hdim)), z=z.reshape(shape),
            dt_bias=cupy.broadcast_to(gpu(bias_h)[:, None], (heads, hdim)), dt_softplus=True)
    finally:
        cupy_ssu._launch_v2 = original
    assert calls == [1]
    h = lambda a: np.ascontiguousarray(host(a))  # noqa: E731
    ref_out, ref_state = reference.selective_state_update(
        state, h(x).reshape(shape), np.broadcast_to(h(dt)[:, :, None], shape),
        np.broadcast_to(A_h[:, None, None], (heads, hdim, n_state)), h(B).reshape(batch, 1, n_state),
        h(C).reshape(batch, 1, n_state), np.broadcast_to(D_h[:, None], (heads, hdim)), z=h(z).reshape(shape),
        dt_bias=np.broadcast_to(bias_h[:, None], (heads, hdim)), dt_softplus=True)
    assert_close(host(out), ref_out, "bfloat16", name="out")
    assert_close(host(g_state), ref_state, "bfloat16", name="state")
