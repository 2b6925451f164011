"""ssd / ssd_bwd (Mamba-2) against independent oracles.

Oracles: the float64 token-by-token recurrence (ssmcore.reference.state_space_duality.ssd), the
paper's chunked algorithm (ssd_minimal), central finite differences in float64,
and torch autograd through a plain torch loop written here.
"""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmcore
from helpers import DTYPES, TOL, assert_close, assert_grad_close, f64, numeric_grad, randn
from ssmcore.reference.state_space_duality import discretize, segsum, ssd_minimal, ssd_minimal_discrete
from ssmcore.reference.state_space_duality import ssd as ssd_ref

GRAD_NAMES = ("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_states")
INPUT_OF = dict(dx="x", ddt="dt", dA="A", dB="B", dC="C", dD="D", dz="z", ddt_bias="dt_bias",
                dinitial_states="initial_states")


def make_inputs(rng, b=2, l=17, h=4, p=3, g=2, n=5, dtype="float32", param_dtype="float32", D=None, z=False,
                dt_bias=False, initial_states=False, seq_idx=False, dt_positive=True):
    """Random inputs for ssd (never zeros). D: None, "head" or "channel"."""
    dt = rng.uniform(0.05, 1.0, (b, l, h)) if dt_positive else rng.standard_normal((b, l, h))
    args = dict(
        x=randn(rng, (b, l, h, p), dtype),
        dt=dt.astype(DTYPES[dtype]),
        A=(-np.exp(rng.uniform(-1.5, 0.5, h))).astype(DTYPES[param_dtype]),
        B=randn(rng, (b, l, g, n), dtype),
        C=randn(rng, (b, l, g, n), dtype),
    )
    if D == "head":
        args["D"] = randn(rng, (h,), param_dtype)
    elif D == "channel":
        args["D"] = randn(rng, (h, p), param_dtype)
    if z:
        args["z"] = randn(rng, (b, l, h, p), dtype)
    if dt_bias:
        args["dt_bias"] = randn(rng, (h,), param_dtype, scale=0.5)
    if initial_states:
        args["initial_states"] = randn(rng, (b, h, p, n), param_dtype)
    if seq_idx:
        args["seq_idx"] = np.sort(rng.integers(0, 4, (b, l)), axis=1).astype(np.int32)
    return args


def reference(args, **options):
    return ssd_ref(**args, **options)


# ----------------------------------------------------------------------------- references


def test_segsum_against_naive_sums(rng):
    a = rng.standard_normal((2, 3, 6))
    got = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[..., j + 1:i + 1].sum(axis=-1) if j <= i else np.full((2, 3), -np.inf)
            np.testing.assert_allclose(got[..., i, j], want, rtol=1e-12, atol=1e-12)


def test_segsum_is_stable_for_large_cumulative_sums():
    a = np.full(4, 1e17)
    a[3] = 1.0  # cumsum differences would lose this entirely
    assert segsum(a)[3, 2] == 1.0


def test_discretize(rng):
    x, dt, A = rng.standard_normal((2, 3, 4, 5)), rng.random((2, 3, 4)), -rng.random(4)
    X, A_bar = discretize(x, dt, A)
    np.testing.assert_allclose(X, x * dt[..., None])
    np.testing.assert_allclose(A_bar, A * dt)


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 64, 256])
def test_chunked_reference_matches_recurrence(rng, chunk_size):
    args = make_inputs(rng, b=2, l=67, h=4, p=3, g=2, n=5, dtype="float64", D="channel", initial_states=True)
    want_out, want_final = reference(args, return_final_states=True)
    out, final = ssd_minimal(args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size, D=args["D"],
                             initial_states=args["initial_states"])
    assert_close(out, want_out, "float64", name="out")
    assert_close(final, want_final, "float64", name="final")


def test_chunked_reference_same_for_every_chunk_size(rng):
    args = make_inputs(rng, b=1, l=50, h=2, p=2, g=1, n=3, dtype="float64", D="head")
    results = [ssd_minimal(args["x"], args["dt"], args["A"], args["B"], args["C"], cs, D=args["D"])
               for cs in (1, 3, 16, 64, 256)]
    for out, final in results[1:]:
        np.testing.assert_allclose(out, results[0][0], rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(final, results[0][1], rtol=1e-11, atol=1e-12)


def test_minimal_discrete_on_discretized_inputs(rng):
    args = make_inputs(rng, b=2, l=24, h=3, p=2, g=3, n=4, dtype="float64", initial_states=True)
    X, A_bar = discretize(args["x"], args["dt"], args["A"])
    Y, final = ssd_minimal_discrete(X, A_bar, args["B"], args["C"], 8, initial_states=args["initial_states"])
    want_out, want_final = reference(args, return_final_states=True)
    assert_close(Y, want_out, "float64", name="Y")
    assert_close(final, want_final, "float64", name="final")


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("l", [1, 2, 3, 17, 129])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_lengths(rng, l, dtype):
    args = make_inputs(rng, b=2, l=l, h=4, p=5, g=2, n=7, dtype=dtype, D="head")
    out, final = ssmcore.ssd(**args, return_final_states=True)
    want_out, want_final = reference(args, return_final_states=True)
    assert out.dtype == DTYPES[dtype] and final.dtype == np.dtype(dtype)
    assert_close(out, want_out, dtype, name="out")
    assert_close(final, want_final, dtype, name="final")


def test_forward_long_sequence(rng):
    args = make_inputs(rng, b=1, l=1100, h=2, p=3, g=1, n=4, dtype="float32", D="channel", z=True,
                       dt_bias=True, initial_states=True)
    args["dt"] = (args["dt"] * 0.2).astype(np.float32)
    out, final = ssmcore.ssd(**args, chunk_size=64, dt_softplus=True, return_final_states=True)
    want_out, want_final = reference(args, dt_softplus=True, return_final_states=True)
    assert_close(out, want_out, "float32", name="out")
    assert_close(final, want_final, "float32", name="final")


@pytest.mark.parametrize("n", [1, 16, 64, 128, 256])
@pytest.mark.parametrize("groups", ["one", "two", "per_head"])
def test_forward_state_sizes_and_groups(rng, n, groups):
    h = 4
    g = {"one": 1, "two": 2, "per_head": h}[groups]
    args = make_inputs(rng, b=1, l=9, h=h, p=2, g=g, n=n, dtype="float32", D="head", initial_states=True)
    out, final = ssmcore.ssd(**args, return_final_states=True)
    want_out, want_final = reference(args, return_final_states=True)
    assert_close(out, want_out, "float32", name="out")
    assert_close(final, want_final, "float32", name="final")


OPTION_SETS = {
    "D_head": (dict(D="head"), {}),
    "D_channel": (dict(D="channel"), {}),
    "z": (dict(z=True), {}),
    "dt_bias": (dict(dt_bias=True, dt_positive=False), {}),
    "softplus": (dict(dt_positive=False), dict(dt_softplus=True)),
    "bias_softplus": (dict(dt_bias=True, dt_positive=False), dict(dt_softplus=True)),
    "dt_limit": (dict(dt_bias=True, dt_positive=False), dict(dt_softplus=True, dt_limit=(0.2, 0.9))),
    "dt_limit_no_softplus": (dict(dt_positive=False), dict(dt_limit=(-0.1, 0.5))),
    "negative_dt_unclamped": (dict(dt_positive=False), {}),
    "initial_states": (dict(initial_states=True), {}),
    "seq_idx": (dict(seq_idx=True), {}),
    "seq_idx_initial_states": (dict(seq_idx=True, initial_states=True), {}),
    "everything": (dict(D="channel", z=True, dt_bias=True, initial_states=True, seq_idx=True, dt_positive=False),
                   dict(dt_softplus=True, dt_limit=(0.05, 1.5))),
}


@pytest.mark.parametrize("option_set", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_options(rng, option_set, dtype):
    input_options, call_options = OPTION_SETS[option_set]
    args = make_inputs(rng, b=2, l=29, h=4, p=3, g=2, n=6, dtype=dtype, **input_options)
    out, final = ssmcore.ssd(**args, **call_options, chunk_size=8, return_final_states=True)
    want_out, want_final = reference(args, **call_options, return_final_states=True)
    assert_close(out, want_out, dtype, name="out")
    assert_close(final, want_final, dtype, name="final")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_dtypes(rng, dtype):
    args = make_inputs(rng, b=2, l=33, h=4, p=4, g=2, n=8, dtype=dtype, D="channel", z=True, dt_bias=True,
                       initial_states=True, seq_idx=True, dt_positive=False)
    opts = dict(dt_softplus=True, dt_limit=(0.01, 2.0))
    out, final = ssmcore.ssd(**args, **opts, return_final_states=True)
    want_out, want_final = reference(args, **opts, return_final_states=True)
    assert out.dtype == DTYPES[dtype]
    assert final.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(out, want_out, dtype, name="out")
    assert_close(final, want_final, dtype, name="final")


def test_dt_float32_with_half_x(rng):
    args = make_inputs(rng, l=11, dtype="bfloat16")
    args["dt"] = rng.uniform(0.05, 1.0, args["dt"].shape).astype(np.float32)
    assert_close(ssmcore.ssd(**args), reference(args), "bfloat16")


def test_cu_seqlens_varlen_states(rng):
    args = make_inputs(rng, b=1, l=40, h=4, p=3, g=2, n=5, dtype="float64", D="head", initial_states=True)
    cu = np.array([0, 7, 8, 25, 40], dtype=np.int32)
    out, final, varlen = ssmcore.ssd(**args, cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    want = reference(args, cu_seqlens=cu, return_final_states=True, return_varlen_states=True)
    for got, exp, name in zip((out, final, varlen), want, ("out", "final", "varlen")):
        assert_close(got, exp, "float64", name=name)
    assert varlen.shape == (4, 4, 3, 5)
    # Only varlen states, and cu_seqlens as int64 with an explicit consistent seq_idx.
    seq_idx = np.repeat(np.arange(4), np.diff(cu))[None].astype(np.int64)
    out2, varlen2 = ssmcore.ssd(**args, cu_seqlens=cu.astype(np.int64), seq_idx=seq_idx, return_varlen_states=True)
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(varlen2, varlen)


def test_packed_sequences_equal_separate_runs(rng):
    lengths = [5, 1, 12, 7]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args = make_inputs(rng, b=1, l=int(cu[-1]), h=4, p=3, g=2, n=5, dtype="float64", D="channel", z=True,
                       dt_bias=True, initial_states=True, dt_positive=False)
    opts = dict(dt_softplus=True)
    seq_idx = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int32)
    packed, varlen = ssmcore.ssd(**args, **opts, cu_seqlens=cu, return_varlen_states=True)
    packed_seq, final = ssmcore.ssd(**args, **opts, seq_idx=seq_idx, return_final_states=True)
    np.testing.assert_array_equal(packed, packed_seq)
    for s in range(len(lengths)):
        part = {k: (v[:, cu[s]:cu[s + 1]] if k in ("x", "dt", "B", "C", "z") else v) for k, v in args.items()}
        if s > 0:  # initial states feed only the first sequence
            del part["initial_states"]
        alone, alone_final = ssmcore.ssd(**part, **opts, return_final_states=True)
        np.testing.assert_allclose(packed[:, cu[s]:cu[s + 1]], alone, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(varlen[s], alone_final[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(final[0], varlen[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state_dtype", ["float16", "bfloat16", "float32", "float64"])
def test_state_dtype(rng, state_dtype):
    args = make_inputs(rng, b=1, l=12, dtype="float32", initial_states=True)
    cu = np.array([0, 5, 12], dtype=np.int32)
    dtype = DTYPES[state_dtype]
    out, final, varlen = ssmcore.ssd(**args, cu_seqlens=cu, return_final_states=True, return_varlen_states=True,
                                     state_dtype=dtype)
    _, want_final, want_varlen = reference(args, cu_seqlens=cu, return_final_states=True,
                                           return_varlen_states=True)
    assert final.dtype == np.dtype(dtype) and varlen.dtype == np.dtype(dtype)
    tol = "float32" if state_dtype == "float64" else state_dtype
    assert_close(final, want_final, tol, name="final")
    assert_close(varlen, want_varlen, tol, name="varlen")
    # also by name and as a torch dtype
    for spelling in (state_dtype, getattr(torch, state_dtype)):
        assert ssmcore.ssd(**args, return_final_states=True, state_dtype=spelling)[1].dtype == np.dtype(dtype)


def test_float32_inputs_give_float32_states_and_float64_inputs_float64(rng):
    args = make_inputs(rng, l=5, dtype="float64")
    assert ssmcore.ssd(**args, return_final_states=True)[1].dtype == np.float64
    args = make_inputs(rng, l=5, dtype="float16")
    assert ssmcore.ssd(**args, return_final_states=True)[1].dtype == np.float32


def test_forward_does_not_depend_on_chunk_size(rng):
    args = make_inputs(rng, b=2, l=45, dtype="float64", D="head", z=True, seq_idx=True, initial_states=True)
    outs = [ssmcore.ssd(**args, chunk_size=cs, return_final_states=True) for cs in (1, 3, 16, 64, 256)]
    for out, final in outs[1:]:
        np.testing.assert_allclose(out, outs[0][0], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(final, outs[0][1], rtol=1e-13, atol=1e-13)


def test_empty_length(rng):
    args = make_inputs(rng, b=2, l=0, dtype="float32", initial_states=True)
    out, final = ssmcore.ssd(**args, return_final_states=True)
    assert out.shape == (2, 0, 4, 3)
    np.testing.assert_array_equal(final, args["initial_states"])
    grads = ssmcore.ssd_bwd(np.zeros((2, 0, 4, 3), np.float32), **args,
                            dfinal_states=np.ones((2, 4, 3, 5), np.float32))
    np.testing.assert_array_equal(grads.dinitial_states, np.ones((2, 4, 3, 5)))
    np.testing.assert_array_equal(grads.dA, np.zeros(4))


def test_torch_tensors_through_dlpack(rng):
    args = make_inputs(rng, l=6, dtype="float32", D="head")
    out = ssmcore.ssd(**{k: torch.from_numpy(v) for k, v in args.items()})
    assert isinstance(out, np.ndarray)
    assert_close(out, reference(args), "float32")


# ----------------------------------------------------------------------------- backward


def _probe_all_gradients(rng, args, opts, chunk_size, dfinal=True, points=12):
    """ssd_bwd against central differences of sum(out * dout) + sum(final_states * dfinal_states)."""
    b, _, h, p = args["x"].shape
    dout = rng.standard_normal(args["x"].shape)
    dfinal_states = rng.standard_normal((b, h, p, args["B"].shape[3]))
    if not dfinal:
        dfinal_states[...] = 0.0
    grads = ssmcore.ssd_bwd(dout, **args, **opts, chunk_size=chunk_size,
                            dfinal_states=dfinal_states if dfinal else None)

    def f():
        out, final = ssmcore.ssd(**args, **opts, chunk_size=chunk_size, return_final_states=True)
        return np.concatenate([out.ravel(), final.ravel()])

    weights = np.concatenate([dout.ravel(), dfinal_states.ravel()])
    for name in GRAD_NAMES:
        inp = args.get(INPUT_OF[name])
        if inp is None:
            assert getattr(grads, name) is None, name
            continue
        assert getattr(grads, name).shape == inp.shape and getattr(grads, name).dtype == inp.dtype, name
        numeric = numeric_grad(f, inp, weights, eps=1e-6, max_points=points, rng=rng)
        assert_grad_close(getattr(grads, name), numeric, rtol=1e-5, atol=1e-7, name=name)


@pytest.mark.parametrize("case", ["everything", "D_head_no_bias", "cu_seqlens_clamped", "plain"])
def test_backward_finite_differences(rng, case):
    if case == "everything":
        args = make_inputs(rng, b=2, l=19, h=4, p=3, g=2, n=4, dtype="float64", param_dtype="float64",
                           D="channel", z=True, dt_bias=True, initial_states=True, seq_idx=True, dt_positive=False)
        opts = dict(dt_softplus=True)
        _probe_all_gradients(rng, args, opts, chunk_size=4)
    elif case == "D_head_no_bias":
        args = make_inputs(rng, b=2, l=13, h=2, p=2, g=1, n=3, dtype="float64", param_dtype="float64",
                           D="head", initial_states=True)
        _probe_all_gradients(rng, args, {}, chunk_size=5, dfinal=False)
    elif case == "cu_seqlens_clamped":
        args = make_inputs(rng, b=1, l=21, h=3, p=2, g=3, n=3, dtype="float64", param_dtype="float64",
                           D="channel", z=True, dt_bias=True, initial_states=True, dt_positive=False)
        opts = dict(dt_softplus=True, dt_limit=(0.3, 1.2), cu_seqlens=np.array([0, 4, 5, 21], np.int64))
        _probe_all_gradients(rng, args, opts, chunk_size=3, points=20)
    else:
        args = make_inputs(rng, b=1, l=7, h=2, p=2, g=2, n=2, dtype="float64", param_dtype="float64")
        _probe_all_gradients(rng, args, {}, chunk_size=256)


def test_backward_clamped_dt_has_zero_gradient(rng):
    args = make_inputs(rng, b=1, l=30, dtype="float64", dt_positive=False, dt_bias=True)
    lo, hi = 0.4, 0.9
    grads = ssmcore.ssd_bwd(rng.standard_normal(args["x"].shape), **args, dt_softplus=True, dt_limit=(lo, hi))
    raw = args["dt"] + args["dt_bias"]
    soft = np.log1p(np.exp(raw))
    clamped = (soft < lo) | (soft > hi)
    assert clamped.any() and (~clamped).any()
    assert (grads.ddt[clamped] == 0).all()
    assert (grads.ddt[~clamped] != 0).all()


def torch_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
              initial_states=None, seq_idx=None):
    """The SSD recurrence as a plain torch loop (autograd gives the oracle gradients)."""
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)
    C = C.repeat_interleave(heads_per_group, dim=2)
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)  # threshold 20: identity above, like the op
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(*dt_limit)
    decay = torch.exp(dt * A)
    state = initial_states if initial_states is not None else x.new_zeros(batch, nheads, headdim, B.shape[-1])
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)
            state = state * same[:, None, None, None]
        state = decay[:, t, :, None, None] * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, state


def _torch_grads(args, opts, dout, dfinal):
    leaves = {k: torch.tensor(f64(v), requires_grad=True) for k, v in args.items() if k != "seq_idx"}
    seq_idx = torch.from_numpy(args["seq_idx"].astype(np.int64)) if "seq_idx" in args else None
    out, final = torch_ssd(**leaves, seq_idx=seq_idx, **opts)
    loss = (out * torch.from_numpy(f64(dout))).sum() + (final * torch.from_numpy(f64(dfinal))).sum()
    loss.backward()
    return {name: leaves[INPUT_OF[name]].grad.numpy() for name in GRAD_NAMES if INPUT_OF[name] in leaves}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_against_torch_autograd(rng, dtype):
    args = make_inputs(rng, b=2, l=23, h=4, p=3, g=2, n=6, dtype=dtype, D="channel", z=True, dt_bias=True,
                       initial_states=True, seq_idx=True, dt_positive=False)
    opts = dict(dt_softplus=True, dt_limit=(0.05, 1.5))
    dout = randn(rng, args["x"].shape, dtype)
    dfinal = randn(rng, args["initial_states"].shape, "float32")
    grads = ssmcore.ssd_bwd(dout, **args, **opts, chunk_size=5, dfinal_states=dfinal)
    want = _torch_grads(args, opts, dout, dfinal)
    for name, expected in want.items():
        got = getattr(grads, name)
        assert got.dtype == args[INPUT_OF[name]].dtype, name
        # A gradient is rounded to its input's dtype (float32 for the parameters); those that sum
        # over length and batch (dA, dD, ddt_bias) collect more rounding.
        rtol, atol = TOL[got.dtype.name]
        scale = 4.0 if name in ("dA", "dD", "ddt_bias") else 1.0
        assert_close(got, expected, rtol=rtol * scale, atol=atol * scale, name=name)


def test_backward_does_not_depend_on_chunk_size(rng):
    args = make_inputs(rng, b=2, l=70, h=2, p=3, g=1, n=4, dtype="float64", D="head", z=True, dt_bias=True,
                       initial_states=True, seq_idx=True, dt_positive=False)
    dout = rng.standard_normal(args["x"].shape)
    dfinal = rng.standard_normal(args["initial_states"].shape)
    results = [ssmcore.ssd_bwd(dout, **args, dt_softplus=True, chunk_size=cs, dfinal_states=dfinal)
               for cs in (1, 3, 16, 64, 256)]
    for grads in results[1:]:
        for name in GRAD_NAMES:
            np.testing.assert_allclose(getattr(grads, name), getattr(results[0], name), rtol=1e-12, atol=1e-12,
                                       err_msg=name)


def test_backward_packed_equals_separate(rng):
    lengths = [6, 2, 9]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    args = make_inputs(rng, b=1, l=int(cu[-1]), h=2, p=2, g=1, n=3, dtype="float64", D="head", z=True,
                       initial_states=True)
    dout = rng.standard_normal(args["x"].shape)
    packed = ssmcore.ssd_bwd(dout, **args, cu_seqlens=cu, chunk_size=4)
    per_time = {"dx": "x", "ddt": "dt", "dB": "B", "dC": "C", "dz": "z"}
    dA = np.zeros_like(packed.dA)
    for s in range(len(lengths)):
        sl = slice(cu[s], cu[s + 1])
        part = {k: (v[:, sl] if k in per_time.values() else v) for k, v in args.items()}
        if s > 0:
            del part["initial_states"]
        alone = ssmcore.ssd_bwd(dout[:, sl], **part, chunk_size=4)
        for name in per_time:
            np.testing.assert_allclose(getattr(packed, name)[:, sl], getattr(alone, name), rtol=1e-12, atol=1e-12)
        if s == 0:
            np.testing.assert_allclose(packed.dinitial_states, alone.dinitial_states, rtol=1e-12, atol=1e-12)
        dA += alone.dA
    np.testing.assert_allclose(packed.dA, dA, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- hypothesis sweeps


@st.composite
def ssd_cases(draw):
    h = draw(st.sampled_from([1, 2, 3, 4]))
    g = draw(st.sampled_from([d for d in range(1, h + 1) if h % d == 0]))
    shape = dict(b=draw(st.integers(1, 2)), l=draw(st.integers(1, 40)), h=h, g=g,
                 p=draw(st.integers(1, 5)), n=draw(st.integers(1, 9)))
    inputs = dict(D=draw(st.sampled_from([None, "head", "channel"])), z=draw(st.booleans()),
                  dt_bias=draw(st.booleans()), initial_states=draw(st.booleans()), seq_idx=draw(st.booleans()),
                  dt_positive=draw(st.booleans()))
    calls = dict(dt_softplus=draw(st.booleans()), chunk_size=draw(st.integers(1, 50)))
    if draw(st.booleans()):
        calls["dt_limit"] = (0.1, 0.8)
    return shape, inputs, calls, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=20)
@given(ssd_cases())
def test_hypothesis_forward(case):
    shape, inputs, calls, seed = case
    args = make_inputs(np.random.default_rng(seed), dtype="float32", **shape, **inputs)
    out, final = ssmcore.ssd(**args, **calls, return_final_states=True)
    want_out, want_final = reference(args, **calls, return_final_states=True)
    assert_close(out, want_out, "float32", name="out")
    assert_close(final, want_final, "float32", name="final")


@settings(max_examples=10)
@given(ssd_cases())
def test_hypothesis_backward(case):
    shape, inputs, calls, seed = case
    rng = np.random.default_rng(seed)
    args = make_inputs(rng, dtype="float64", param_dtype="float64", **shape, **inputs)
    args.setdefault("initial_states", rng.standard_normal((shape["b"], shape["h"], shape["p"], shape["n"])))
    dout = rng.standard_normal(args["x"].shape)
    dfinal = rng.standard_normal(args["initial_states"].shape)
    opts = {k: v for k, v in calls.items() if k != "chunk_size"}
    grads = ssmcore.ssd_bwd(dout, **args, **calls, dfinal_states=dfinal)
    for name, expected in _torch_grads(args, opts, dout, dfinal).items():
        assert_close(getattr(grads, name), expected, "float64", rtol=1e-8, atol=1e-9, name=name)


# ----------------------------------------------------------------------------- selective_scan agreement


def test_agrees_with_selective_scan(rng):
    if not (pathlib.Path(ssmcore.__file__).parent / "ops" / "scan.py").exists():
        pytest.skip("ssmcore.ops.scan (selective_scan) is not there yet")
    b, l, h, p, g, n = 2, 21, 4, 3, 2, 5
    args = make_inputs(rng, b=b, l=l, h=h, p=p, g=g, n=n, dtype="float32", D="channel", z=True, dt_bias=True,
                       initial_states=True, dt_positive=False)
    out, final = ssmcore.ssd(**args, dt_softplus=True, return_final_states=True)

    def channels(a):  # (b, l, h, p) -> (b, h*p, l)
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1).reshape(b, h * p, l))

    u_out, last_state = ssmcore.selective_scan(
        channels(args["x"]),
        np.ascontiguousarray(np.repeat(args["dt"].transpose(0, 2, 1), p, axis=1)),
        np.ascontiguousarray(np.repeat(args["A"], p)[:, None] * np.ones(n, np.float32)),
        np.ascontiguousarray(args["B"].transpose(0, 2, 3, 1)),
        np.ascontiguousarray(args["C"].transpose(0, 2, 3, 1)),
        D=args["D"].reshape(h * p),
        z=channels(args["z"]),
        delta_bias=np.repeat(args["dt_bias"], p),
        delta_softplus=True,
        initial_state=args["initial_states"].reshape(b, h * p, n),
        return_last_state=True,
    )
    assert_close(u_out, channels(out), "float32", name="out")
    assert_close(last_state, final.reshape(b, h * p, n), "float32", name="last_state")


# ----------------------------------------------------------------------------- errors


def _valid(rng, **kw):
    return make_inputs(rng, b=1, l=6, h=4, p=3, g=2, n=5, dtype="float32", D="head", z=True, dt_bias=True,
                       initial_states=True, seq_idx=True, **kw)


SHAPE_ERRORS = {
    "x": lambda a: a["x"][..., 0],
    "dt": lambda a: a["dt"][:, :-1],
    "A": lambda a: a["A"][:-1],
    "B": lambda a: a["B"][:, :, :, :-1][..., None],
    "C": lambda a: a["C"][:, :, :, :-1],
    "D": lambda a: np.ones((4, 2), np.float32),
    "z": lambda a: a["z"][:, 1:],
    "dt_bias": lambda a: a["dt_bias"][None],
    "initial_states": lambda a: a["initial_states"][..., :-1],
    "seq_idx": lambda a: a["seq_idx"][:, :-1],
}


@pytest.mark.parametrize("name", list(SHAPE_ERRORS))
def test_error_wrong_shape(rng, name):
    args = _valid(rng)
    args[name] = SHAPE_ERRORS[name](args)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ssmcore.ssd(**args)


def test_error_wrong_D_rank(rng):
    args = _valid(rng)
    args["D"] = np.ones((4, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"^D:"):
        ssmcore.ssd(**args)


DTYPE_ERRORS = {
    "x": np.int32,
    "dt": np.float16,  # neither x's dtype (float32) nor float32
    "A": np.float16,
    "B": np.int64,
    "C": np.complex64,
    "D": np.float16,
    "z": np.float64,  # not x's dtype
    "dt_bias": np.int32,
    "initial_states": np.float16,
    "seq_idx": np.float32,
}


@pytest.mark.parametrize("name", list(DTYPE_ERRORS))
def test_error_wrong_dtype(rng, name):
    args = _valid(rng)
    args[name] = args[name].astype(DTYPE_ERRORS[name])
    with pytest.raises(TypeError, match=rf"^{name}:"):
        ssmcore.ssd(**args)


def test_error_not_an_array(rng):
    args = _valid(rng)
    args["B"] = args["B"].tolist()
    with pytest.raises(TypeError, match=r"^B:"):
        ssmcore.ssd(**args)


def test_error_groups_must_divide_heads(rng):
    args = make_inputs(rng, h=4, g=3)
    with pytest.raises(ValueError, match=r"^B:.*divides"):
        ssmcore.ssd(**args)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                               (True, TypeError)])
def test_error_chunk_size(rng, chunk_size, error):
    with pytest.raises(error, match=r"^chunk_size:"):
        ssmcore.ssd(**_valid(rng), chunk_size=chunk_size)
    with pytest.raises(error, match=r"^chunk_size:"):
        args = _valid(rng)
        ssmcore.ssd_bwd(args["x"], **args, chunk_size=chunk_size)


@pytest.mark.parametrize("dt_limit, error", [((1.0, 0.5), ValueError), ((math.nan, 1.0), ValueError),
                                             ((0.0, math.nan), ValueError), ((0.1,), TypeError),
                                             (0.5, TypeError), (("a", 1.0), TypeError)])
def test_error_dt_limit(rng, dt_limit, error):
    with pytest.raises(error, match=r"^dt_limit:"):
        ssmcore.ssd(**_valid(rng), dt_limit=dt_limit)


@pytest.mark.parametrize("cu, msg", [([0, 3, 3, 6], "increasing"), ([0, 4, 2, 6], "increasing"),
                                     ([0, 3, 5], "end at L"), ([1, 3, 6], "start at 0"), ([0], "shape"),
                                     ([[0, 6]], "shape")])
def test_error_cu_seqlens_values(rng, cu, msg):
    args = _valid(rng)
    del args["seq_idx"]
    with pytest.raises(ValueError, match=rf"^cu_seqlens:.*{msg}"):
        ssmcore.ssd(**args, cu_seqlens=np.array(cu, np.int32))


def test_error_cu_seqlens_batch_and_dtype(rng):
    args = make_inputs(rng, b=2, l=6)
    with pytest.raises(ValueError, match=r"^cu_seqlens:.*B == 1"):
        ssmcore.ssd(**args, cu_seqlens=np.array([0, 2, 6], np.int32))
    args = make_inputs(rng, b=1, l=6)
    with pytest.raises(TypeError, match=r"^cu_seqlens:"):
        ssmcore.ssd(**args, cu_seqlens=np.array([0, 2, 6], np.float32))


def test_error_varlen_states_need_cu_seqlens(rng):
    with pytest.raises(ValueError, match=r"^return_varlen_states:"):
        ssmcore.ssd(**_valid(rng), return_varlen_states=True)


@pytest.mark.parametrize("name", ["dt_softplus", "return_final_states", "return_varlen_states"])
def test_error_flags_must_be_bool(rng, name):
    with pytest.raises(TypeError, match=rf"^{name}:"):
        ssmcore.ssd(**_valid(rng), **{name: "yes"})


@pytest.mark.parametrize("state_dtype", [np.int32, "complex64", "nonsense", 1.0, torch.int8])
def test_error_state_dtype(rng, state_dtype):
    with pytest.raises(TypeError, match=r"^state_dtype:"):
        ssmcore.ssd(**_valid(rng), state_dtype=state_dtype)


def test_error_backward_arguments(rng):
    args = _valid(rng)
    with pytest.raises(ValueError, match=r"^dout:"):
        ssmcore.ssd_bwd(args["x"][:, :-1], **args)
    with pytest.raises(TypeError, match=r"^dout:"):
        ssmcore.ssd_bwd(args["x"].astype(np.int32), **args)
    with pytest.raises(ValueError, match=r"^dfinal_states:"):
        ssmcore.ssd_bwd(args["x"], **args, dfinal_states=args["initial_states"][0])
    with pytest.raises(TypeError, match=r"^dout:"):
        ssmcore.ssd_bwd(None, **args)


# ----------------------------------------------------------------------------- inputs untouched


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inputs_not_modified(rng, dtype):
    args = make_inputs(rng, b=2, l=15, dtype=dtype, param_dtype=dtype if dtype == "float64" else "float32",
                       D="channel", z=True, dt_bias=True, initial_states=True, seq_idx=True, dt_positive=False)
    dout = randn(rng, args["x"].shape, dtype)
    dfinal = randn(rng, args["initial_states"].shape, dtype)
    copies = {k: v.copy() for k, v in args.items()}
    dout_copy, dfinal_copy = dout.copy(), dfinal.copy()
    ssmcore.ssd(**args, dt_softplus=True, chunk_size=4, return_final_states=True)
    ssmcore.ssd_bwd(dout, **args, dt_softplus=True, chunk_size=4, dfinal_states=dfinal)
    for k, v in args.items():
        np.testing.assert_array_equal(v, copies[k], err_msg=k)
    np.testing.assert_array_equal(dout, dout_copy)
    np.testing.assert_array_equal(dfinal, dfinal_copy)
