"""selective_state_update on the GPU (CuPy backend) against the float64 reference and the Numba backend.

Both forms (without heads: Mamba-1; with heads: Mamba-2), groups, a stride-0 A, strided x/dt/z
(slices of a projection), a state pool with padding rows, float32/float16/bfloat16 states, and
D/dt_bias omitted. The output and the new state are compared with ssmcore.reference; rows the
step must not touch are checked bit for bit.
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
