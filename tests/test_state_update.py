"""selective_state_update against the float64 reference and against the full selective-scan
recurrence run step by step, in both forms (channels, heads), every dtype and option."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmcore
from ssmcore import reference
from helpers import DTYPES, TOL, assert_close, randn


def make_case(rng, heads, n_batch=3, pool=None, channels=8, n_heads=4, head_dim=3, n_state=16, groups=2,
              dtype="float32", state_dtype="float32", scalar_a=True):
    """Random inputs of one step. Without heads ``groups=0`` gives (B, N) B/C."""
    param = "float64" if dtype == "float64" else "float32"
    if heads:
        rows = (n_heads, head_dim)
        if scalar_a:  # Mamba-2: one negative A per head, broadcast with stride 0
            A = np.broadcast_to(-np.exp(randn(rng, (n_heads, 1, 1), param, 0.5)), (n_heads, head_dim, n_state))
        else:
            A = -np.exp(randn(rng, (n_heads, head_dim, n_state), param, 0.5))
    else:
        rows = (channels,)
        A = -np.exp(randn(rng, (channels, n_state), param, 0.5))
    bc_shape = (n_batch, groups, n_state) if groups else (n_batch, n_state)
    return dict(
        state=randn(rng, (pool or n_batch, *rows, n_state), state_dtype),
        x=randn(rng, (n_batch, *rows), dtype),
        dt=randn(rng, (n_batch, *rows), dtype, 0.5),
        A=A,
        B=randn(rng, bc_shape, dtype),
        C=randn(rng, bc_shape, dtype),
        D=randn(rng, rows, param),
        z=randn(rng, (n_batch, *rows), dtype),
        dt_bias=randn(rng, rows, param, 0.5),
    )


def run_both(case, **options):
    """(out, new_state) of the op (on a copy of the state) and of the reference."""
    state = case["state"].copy()
    args = {**case, **options, "state": state}
    out = ssmcore.selective_state_update(**args)
    ref_out, ref_state = reference.selective_state_update(**{**args, "state": case["state"]})
    return out, state, ref_out, ref_state


OPTIONS = [
    {},
    {"dt_softplus": True},
    {"D": None, "z": None, "dt_bias": None},
    {"D": None, "dt_softplus": True},
    {"dt_bias": None, "z": None},
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("groups", [0, 1, 2])
def test_no_heads_matches_reference(rng, groups, options):
    case = make_case(rng, heads=False, groups=groups, channels=8)
    out, state, ref_out, ref_state = run_both(case, **options)
    assert out.shape == case["x"].shape and out.dtype == np.float32
    assert_close(out, ref_out, "float32", name="out")
    assert_close(state, ref_state, "float32", name="state")


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("groups,scalar_a", [(1, True), (2, True), (4, False)])
def test_heads_matches_reference(rng, groups, scalar_a, options):
    case = make_case(rng, heads=True, groups=groups, scalar_a=scalar_a)
    assert (case["A"].strides[1:] == (0, 0)) == scalar_a
    out, state, ref_out, ref_state = run_both(case, **options)
    assert out.shape == case["x"].shape and out.dtype == np.float32
    assert_close(out, ref_out, "float32", name="out")
    assert_close(state, ref_state, "float32", name="state")


@pytest.mark.parametrize("heads", [False, True])
def test_batch_indices_and_padding(rng, heads):
    case = make_case(rng, heads=heads, n_batch=4, pool=7)
    case["state_batch_indices"] = np.array([5, -1, 0, 2], np.int32)
    out, state, ref_out, ref_state = run_both(case, dt_softplus=True)
    assert_close(out, ref_out, "float32")
    assert_close(state, ref_state, "float32")
    assert (out[1] == 0).all()
    untouched = [1, 3, 4, 6]
    np.testing.assert_array_equal(state[untouched], case["state"][untouched])


@pytest.mark.parametrize("state_dtype", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("heads", [False, True])
def test_dtypes(rng, heads, dtype, state_dtype):
    case = make_case(rng, heads=heads, n_batch=3, pool=4, dtype=dtype, state_dtype=state_dtype)
    case["state_batch_indices"] = np.array([3, -1, 1], np.int64)
    out, state, ref_out, ref_state = run_both(case, dt_softplus=True)
    assert out.dtype == DTYPES[dtype] and state.dtype == DTYPES[state_dtype]
    worst = dtype if TOL[dtype] > TOL[state_dtype] else state_dtype
    assert_close(out, ref_out, worst, name="out")
    assert_close(state, ref_state, worst, name="state")
    np.testing.assert_array_equal(state[[0, 2]], case["state"][[0, 2]])


@pytest.mark.parametrize("state_dtype", ["float16", "bfloat16"])
def test_low_precision_state_is_rounded_once(rng, state_dtype):
    # The state is updated in float32 and rounded to its dtype once: it equals the float32
    # result rounded, not a result accumulated in low precision.
    case = make_case(rng, heads=True, state_dtype=state_dtype)
    out, state, _, _ = run_both(case, dt_softplus=True)
    wide = {**case, "state": case["state"].astype(np.float32)}
    wide_out = ssmcore.selective_state_update(**wide, dt_softplus=True)
    np.testing.assert_array_equal(state, wide["state"].astype(DTYPES[state_dtype]))
    np.testing.assert_array_equal(out, wide_out)


def test_softplus_threshold():
    # state 0, A 0, B = C = x = 1: out = dt' exactly.
    state = np.zeros((2, 1, 1))
    dt = np.array([[25.0], [1.0]])
    ones = np.ones((2, 1))
    out = ssmcore.selective_state_update(state, ones, dt, np.zeros((1, 1)), ones, ones, dt_softplus=True)
    assert out[0, 0] == 25.0  # softplus(v) = v for v > 20, not log1p(exp(25)) = 25 + 1.4e-11
    np.testing.assert_allclose(out[1, 0], np.log1p(np.e), rtol=1e-15)
    np.testing.assert_array_equal(state[:, 0, 0], out[:, 0])


def scan_recurrence(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None):
    """The selective-scan recurrence over a whole sequence, float64, without heads.

    u, delta (B, D, L); A (D, N); B, C (B, G, N, L). Returns (y (B, D, L), h_L (B, D, N)).
    """
    n_batch, n_chan, length = u.shape
    groups = B.shape[1]
    h = np.zeros((n_batch, n_chan, A.shape[1])) if h0 is None else h0.astype(np.float64)
    y = np.zeros(u.shape)
    group_of = np.arange(n_chan) // (n_chan // groups)
    for t in range(length):
        dt = delta[:, :, t] + (0.0 if delta_bias is None else delta_bias)
        if delta_softplus:
            dt = np.where(dt > 20, dt, np.log1p(np.exp(np.minimum(dt, 20))))
        b_t = B[..., t][:, group_of]
        c_t = C[..., t][:, group_of]
        h = np.exp(dt[..., None] * A) * h + dt[..., None] * b_t * u[:, :, t, None]
        y[:, :, t] = np.sum(h * c_t, axis=-1)
        if D is not None:
            y[:, :, t] += D * u[:, :, t]
        if z is not None:
            y[:, :, t] *= z[:, :, t] / (1 + np.exp(-z[:, :, t]))
    return y, h


@pytest.mark.parametrize("groups", [1, 2])
def test_steps_equal_scan_recurrence_no_heads(rng, groups):
    n_batch, n_chan, n_state, length = 2, 6, 8, 25
    u = randn(rng, (n_batch, n_chan, length), "float64")
    delta = randn(rng, (n_batch, n_chan, length), "float64", 0.5)
    A = -np.exp(randn(rng, (n_chan, n_state), "float64", 0.5))
    B = randn(rng, (n_batch, groups, n_state, length), "float64")
    C = randn(rng, (n_batch, groups, n_state, length), "float64")
    D, bias = randn(rng, (n_chan,), "float64"), randn(rng, (n_chan,), "float64")
    z = randn(rng, (n_batch, n_chan, length), "float64")
    h0 = randn(rng, (n_batch, n_chan, n_state), "float64")
    y, h_last = scan_recurrence(u, delta, A, B, C, D, z, bias, True, h0)
    state = h0.copy()
    for t in range(length):
        out = ssmcore.selective_state_update(state, u[:, :, t], delta[:, :, t], A, B[..., t], C[..., t], D,
                                             z[:, :, t], bias, dt_softplus=True)
        np.testing.assert_allclose(out, y[:, :, t], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state, h_last, rtol=1e-10, atol=1e-12)


def test_steps_equal_scan_recurrence_heads(rng):
    # Mamba-2: a head's P rows share dt and A; the heads form must equal the channel form
    # of the recurrence with D = H*P channels and groups over heads.
    n_batch, n_heads, head_dim, n_state, groups, length = 2, 4, 3, 8, 2, 12
    n_chan = n_heads * head_dim
    u = randn(rng, (n_batch, n_chan, length), "float64")
    dt_head = randn(rng, (n_batch, n_heads, length), "float64", 0.5)
    delta = np.repeat(dt_head, head_dim, axis=1)
    a_head = -np.exp(randn(rng, (n_heads,), "float64", 0.5))
    B = randn(rng, (n_batch, groups, n_state, length), "float64")
    C = randn(rng, (n_batch, groups, n_state, length), "float64")
    D = randn(rng, (n_heads,), "float64")
    y, h_last = scan_recurrence(u, delta, np.repeat(a_head, head_dim)[:, None] * np.ones(n_state), B, C,
                                np.repeat(D, head_dim), delta_softplus=True)
    state = np.zeros((n_batch, n_heads, head_dim, n_state))
    A = np.broadcast_to(a_head[:, None, None], (n_heads, head_dim, n_state))
    D_hp = np.broadcast_to(D[:, None], (n_heads, head_dim))
    for t in range(length):
        x_t = u[:, :, t].reshape(n_batch, n_heads, head_dim)
        dt_t = np.broadcast_to(dt_head[:, :, t, None], (n_batch, n_heads, head_dim))
        out = ssmcore.selective_state_update(state, x_t, dt_t, A, B[..., t], C[..., t], D_hp, dt_softplus=True)
        np.testing.assert_allclose(out.reshape(n_batch, n_chan), y[:, :, t], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.reshape(n_batch, n_chan, n_state), h_last, rtol=1e-10, atol=1e-12)


def test_in_place_on_torch_tensors(rng):
    case = make_case(rng, heads=True, n_batch=2)
    ref_out, ref_state = reference.selective_state_update(**case)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in case.items()}
    state_t = tensors["state"].clone()
    out = ssmcore.selective_state_update(**{**tensors, "state": state_t})
    assert isinstance(out, np.ndarray)
    assert_close(out, ref_out, "float32")
    assert_close(state_t.numpy(), ref_state, "float32")


@settings(max_examples=20)
@given(heads=st.booleans(), n_batch=st.integers(1, 4), extra_rows=st.integers(0, 2), n_heads=st.sampled_from([1, 2, 4, 6]),
       head_dim=st.integers(1, 5), n_state=st.integers(1, 40), groups=st.sampled_from([0, 1, 2]),
       softplus=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_sweep(heads, n_batch, extra_rows, n_heads, head_dim, n_state, groups, softplus, seed):
    rng = np.random.default_rng(seed)
    if heads:
        groups = max(groups, 1)
    if groups and n_heads % groups:
        groups = 1
    case = make_case(rng, heads, n_batch=n_batch, pool=n_batch + extra_rows, channels=n_heads, n_heads=n_heads,
                     head_dim=head_dim, n_state=n_state, groups=groups, dtype="float64", state_dtype="float64")
    indices = rng.permutation(n_batch + extra_rows)[:n_batch]
    indices[rng.random(n_batch) < 0.25] = -1
    case["state_batch_indices"] = indices
    out, state, ref_out, ref_state = run_both(case, dt_softplus=softplus)
    assert_close(out, ref_out, "float64")
    assert_close(state, ref_state, "float64")


@pytest.mark.parametrize("heads", [False, True])
def test_inputs_unmodified(rng, heads):
    case = make_case(rng, heads=heads, n_batch=3, pool=4)
    case["state_batch_indices"] = np.array([3, -1, 1], np.int32)
    copies = {k: np.array(v) for k, v in case.items() if k != "state"}
    ssmcore.selective_state_update(**case, dt_softplus=True)
    for k, v in copies.items():
        np.testing.assert_array_equal(case[k], v, err_msg=k)


def _bad(case, **changes):
    return {**case, **changes}


@pytest.mark.parametrize("heads", [False, True])
def test_errors(rng, heads):
    case = make_case(rng, heads=heads, n_batch=2, pool=3)
    case["state_batch_indices"] = np.array([0, 2], np.int32)
    rows = case["x"].shape[1:]
    n_state = case["A"].shape[-1]
    bad = [
        ("state", np.zeros((3, 2), np.float32), ValueError),
        ("state", case["state"].astype(np.int32), TypeError),
        ("state", np.broadcast_to(case["state"][:1], case["state"].shape), ValueError),
        ("state", [1.0], TypeError),
        ("x", case["x"][:, :1], ValueError),
        ("x", case["x"].astype(np.int64), TypeError),
        ("dt", case["dt"][:1], ValueError),
        ("A", case["A"][..., :-1], ValueError),
        ("A", np.asarray(case["A"], np.float16), TypeError),
        ("B", np.zeros((2, 3, n_state), np.float32), ValueError),  # groups do not divide
        ("B", np.zeros((2, 2, n_state + 1), np.float32), ValueError),
        ("B", np.zeros((2, 2, 2, n_state), np.float32), ValueError),
        ("C", np.zeros((2, 2, n_state), np.int32), TypeError),
        ("D", np.zeros((5,), np.float32), ValueError),
        ("D", np.zeros(rows, np.float16), TypeError),
        ("z", case["z"][..., :1], ValueError),
        ("dt_bias", np.zeros(rows + (1,), np.float32), ValueError),
        ("dt_softplus", "yes", TypeError),
        ("state_batch_indices", np.array([0, 3], np.int32), ValueError),
        ("state_batch_indices", np.array([2, 2], np.int32), ValueError),
        ("state_batch_indices", np.array([0, 1, 2], np.int32), ValueError),
        ("state_batch_indices", np.array([0.0, 1.0]), TypeError),
    ]
    if heads:
        bad.append(("B", np.zeros((2, n_state), np.float32), ValueError))  # heads need (B, G, N)
    for name, value, error in bad:
        before = case["state"].copy()
        with pytest.raises(error, match=rf"^{name}:"):
            ssmcore.selective_state_update(**_bad(case, **{name: value}))
        np.testing.assert_array_equal(case["state"], before)


def test_pool_size_needs_indices(rng):
    case = make_case(rng, heads=False, n_batch=2, pool=3)
    with pytest.raises(ValueError, match=r"^state:"):
        ssmcore.selective_state_update(**case)
