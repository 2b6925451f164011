"""causal_conv1d (+ backward) and causal_conv1d_update against the float64 reference,
finite differences, torch autograd through a plain loop, and their own invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmcore
from ssmcore import reference
from helpers import DTYPES, TOL, assert_close, assert_grad_close, numeric_grad, randn


# ---------------------------------------------------------------- input builders

def make_x(rng, n_batch, n_chan, length, dtype="float32", channel_last=False):
    """x (B, D, L), stored (B, L, D) when channel_last."""
    if channel_last:
        return randn(rng, (n_batch, length, n_chan), dtype).transpose(0, 2, 1)
    return randn(rng, (n_batch, n_chan, length), dtype)


def random_seq_idx(rng, n_batch, length, padding=True, dtype=np.int32):
    """Non-decreasing sequence ids per row (random boundaries); with padding some segments are -1."""
    rows = []
    for _ in range(n_batch):
        ids = np.cumsum(rng.random(length) < 0.15)
        if padding and ids.max() > 0:
            ids[np.isin(ids, rng.choice(ids.max() + 1, size=max(1, ids.max() // 3), replace=False))] = -1
        rows.append(ids)
    return np.array(rows, dtype=dtype)


def conv_args(rng, n_batch, n_chan, length, width, dtype="float32", channel_last=False):
    x = make_x(rng, n_batch, n_chan, length, dtype, channel_last)
    param_dtype = "float64" if dtype == "float64" else "float32"
    weight = randn(rng, (n_chan, width), param_dtype, scale=0.5)
    bias = randn(rng, (n_chan,), param_dtype)
    init = randn(rng, (n_batch, n_chan, width - 1), dtype)
    return x, weight, bias, init


def is_channel_last(a):
    return a.strides[1] < a.strides[2]


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("width", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("length", [1, 2, 3, 17, 129, 1030])
def test_forward_matches_reference(rng, length, width):
    for channel_last in (False, True):
        x, weight, bias, init = conv_args(rng, 2, 5, length, width, channel_last=channel_last)
        for kwargs in ({}, {"bias": bias, "activation": "silu"}, {"activation": "swish", "initial_states": init}):
            out = ssmcore.causal_conv1d(x, weight, **kwargs)
            assert out.dtype == np.float32 and out.shape == x.shape
            if length > 1:
                assert is_channel_last(out) == channel_last
            assert_close(out, reference.causal_conv1d(x, weight, **kwargs), "float32", name=str(kwargs))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_dtypes(rng, dtype):
    for channel_last in (False, True):
        x, weight, bias, init = conv_args(rng, 2, 6, 129, 4, dtype, channel_last)
        seq_idx = random_seq_idx(rng, 2, 129)
        for param_dtype in dict.fromkeys((dtype, "float32")):
            w, b = weight.astype(DTYPES[param_dtype]), bias.astype(DTYPES[param_dtype])
            out, final = ssmcore.causal_conv1d(x, w, b, "silu", seq_idx, init, return_final_states=True)
            ref_out, ref_final = reference.causal_conv1d(x, w, b, "silu", seq_idx, init, return_final_states=True)
            assert out.dtype == DTYPES[dtype] and final.dtype == DTYPES[dtype]
            assert_close(out, ref_out, dtype, name="out")
            np.testing.assert_array_equal(final.astype(np.float64), ref_final)
        # float32 initial states with low-precision x: final states take the initial states' dtype
        _, final = ssmcore.causal_conv1d(x, weight, initial_states=init.astype(np.float32), return_final_states=True)
        assert final.dtype == np.float32


def test_seq_idx_padding_and_final_states_exact(rng):
    width, length = 4, 12
    x, weight, bias, init = conv_args(rng, 3, 4, length, width, "float64")
    seq_idx = np.array([
        [0] * 5 + [1] * 7,            # last sequence covers the last W-1 positions
        [0] * 10 + [2] * 2,           # last sequence shorter than W-1
        [3] * 8 + [-1] * 4,           # ends in padding
    ], np.int32)
    out, final = ssmcore.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
    assert_close(out, reference.causal_conv1d(x, weight, bias, "silu", seq_idx, init), "float64")
    assert (out[2, :, 8:] == 0).all(), "padding outputs must be exactly 0"
    np.testing.assert_array_equal(final[0], x[0, :, -3:])
    np.testing.assert_array_equal(final[1], np.concatenate([np.zeros((4, 1)), x[1, :, -2:]], axis=1))
    np.testing.assert_array_equal(final[2], 0)
    # Position 5 of row 0 starts sequence 1: only its own tap counts.
    pre = bias + weight[:, 3] * x[0, :, 5]
    np.testing.assert_allclose(out[0, :, 5], pre / (1 + np.exp(-pre)), rtol=1e-12)
    # Row 0 position 1 (sequence 0) reads two initial states.
    pre = (bias + weight[:, 0] * init[0, :, 1] + weight[:, 1] * init[0, :, 2] + weight[:, 2] * x[0, :, 0]
           + weight[:, 3] * x[0, :, 1])
    np.testing.assert_allclose(out[0, :, 1], pre / (1 + np.exp(-pre)), rtol=1e-12)


def test_final_states_short_sequence_from_initial_states(rng):
    # L < W-1: final states mix initial states and x, exactly.
    x, weight, _, init = conv_args(rng, 2, 3, 2, 7, "float32", channel_last=True)
    _, final = ssmcore.causal_conv1d(x, weight, initial_states=init, return_final_states=True)
    np.testing.assert_array_equal(final, np.concatenate([init, x], axis=2)[:, :, -6:])


@pytest.mark.parametrize("channel_last", [False, True])
def test_packed_sequences_equal_separate_runs(rng, channel_last):
    width, lengths = 4, [5, 1, 23, 2, 40]
    total = sum(lengths)
    x, weight, bias, init = conv_args(rng, 1, 6, total, width, "float64", channel_last)
    seq_idx = np.repeat(np.arange(len(lengths)), lengths)[None].astype(np.int64)
    out, final = ssmcore.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
    start = 0
    for i, n in enumerate(lengths):
        piece = np.ascontiguousarray(x[:, :, start:start + n])
        alone, alone_final = ssmcore.causal_conv1d(piece, weight, bias, "silu", initial_states=init if i == 0 else None,
                                                   return_final_states=True)
        np.testing.assert_allclose(out[:, :, start:start + n], alone, rtol=1e-12, atol=1e-14)
        start += n
    np.testing.assert_array_equal(final, alone_final)


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("split", [1, 2, 7, 64, 65, 150])
def test_chunked_prefill_equals_one_pass(rng, channel_last, split):
    width, length = 4, 200
    x, weight, bias, init = conv_args(rng, 2, 5, length, width, "float32", channel_last)
    # Sequence boundaries away from the split: continuing across a boundary would need the
    # caller to drop the state (initial states belong to the sequence of t = 0).
    seq_idx = np.zeros((2, length), np.int32)
    seq_idx[1, split + 5:] = 1
    seq_idx[0, :max(split - 10, 0)] = -1
    full, full_final = ssmcore.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
    a, a_final = ssmcore.causal_conv1d(x[:, :, :split], weight, bias, "silu", seq_idx[:, :split], init, True)
    b, b_final = ssmcore.causal_conv1d(x[:, :, split:], weight, bias, "silu", seq_idx[:, split:], a_final, True)
    np.testing.assert_array_equal(np.concatenate([a, b], axis=2), full)
    np.testing.assert_array_equal(b_final, full_final)


# ---------------------------------------------------------------- backward

def torch_causal_conv1d(x, weight, bias, activation, seq_idx, init):
    """Plain torch loop over time: the autograd oracle."""
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    padded = torch.cat([init, x], dim=2)
    outs = []
    for t in range(length):
        acc = bias.expand(n_batch, n_chan)
        for k in range(width):
            term = weight[:, k] * padded[:, :, t + k]
            if seq_idx is not None:
                same = seq_idx[:, max(t + k - (width - 1), 0)] == seq_idx[:, t]
                term = torch.where(same[:, None], term, torch.zeros_like(term))
            acc = acc + term
        if activation is not None:
            acc = torch.nn.functional.silu(acc)
        if seq_idx is not None:
            acc = torch.where((seq_idx[:, t] >= 0)[:, None], acc, torch.zeros_like(acc))
        outs.append(acc)
    out = torch.stack(outs, dim=2)
    final = padded[:, :, length:]
    if seq_idx is not None:
        ids = torch.cat([seq_idx[:, :1].expand(n_batch, width - 1), seq_idx], dim=1)[:, length:]
        last = seq_idx[:, -1:]
        keep = (ids == last) & (last >= 0)
        final = torch.where(keep[:, None, :], final, torch.zeros_like(final))
    return out, final


def torch_grads(dout, x, weight, bias, activation, seq_idx, init, dfinal):
    leaves = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, weight, bias, init)]
    seq = None if seq_idx is None else torch.tensor(seq_idx.astype(np.int64))
    out, final = torch_causal_conv1d(*leaves[:3], activation, seq, leaves[3])
    loss = (out * torch.tensor(np.asarray(dout, np.float64))).sum() + (final * torch.tensor(np.asarray(dfinal, np.float64))).sum()
    loss.backward()
    return [leaf.grad.numpy() for leaf in leaves]


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("width", [1, 2, 4, 7])
@pytest.mark.parametrize("length", [1, 3, 17, 150])
def test_backward_matches_torch_autograd(rng, channel_last, width, length):
    x, weight, bias, init = conv_args(rng, 2, 5, length, width, "float64", channel_last)
    seq_idx = random_seq_idx(rng, 2, length)
    dout = randn(rng, x.shape, "float64")
    dfinal = randn(rng, init.shape, "float64")
    for activation, seq in ((None, None), ("silu", seq_idx)):
        grads = ssmcore.causal_conv1d_bwd(dout, x, weight, bias, activation, seq, init, dfinal)
        expected = torch_grads(dout, x, weight, bias, activation, seq, init, dfinal)
        for name, got, want in zip(grads._fields, grads, expected):
            assert_close(got, want, "float64", name=name)
        if length > 1:
            assert is_channel_last(grads.dx) == channel_last


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("width,length", [(1, 4), (3, 1), (4, 17), (7, 5)])
def test_backward_finite_differences(rng, channel_last, width, length):
    x, weight, bias, init = conv_args(rng, 2, 3, length, width, "float64", channel_last)
    # numeric_grad perturbs a C-contiguous array in place: x is a view of it.
    x_store = x.transpose(0, 2, 1) if channel_last else x
    seq_idx = random_seq_idx(rng, 2, length)
    dout = randn(rng, x.shape, "float64")
    dfinal = randn(rng, init.shape, "float64")

    def loss_terms():
        out, final = reference.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
        return np.concatenate([out.ravel(), final.ravel()])

    grads = ssmcore.causal_conv1d_bwd(dout, x, weight, bias, "silu", seq_idx, init, dfinal)
    weights = np.concatenate([dout.ravel(), dfinal.ravel()])
    for name, arr in (("dx", x_store), ("dweight", weight), ("dbias", bias), ("dinitial_states", init)):
        numeric = numeric_grad(loss_terms, arr, weights, max_points=12, rng=rng)
        if arr is x_store and channel_last:
            numeric = numeric.transpose(0, 2, 1)
        assert_grad_close(getattr(grads, name), numeric, name=name)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_dtypes(rng, dtype):
    for channel_last in (False, True):
        x, weight, bias, init = conv_args(rng, 2, 6, 129, 4, dtype, channel_last)
        seq_idx = random_seq_idx(rng, 2, 129)
        dout = randn(rng, x.shape, dtype)
        dfinal = randn(rng, init.shape, dtype)
        grads = ssmcore.causal_conv1d_bwd(dout, x, weight, bias, "silu", seq_idx, init, dfinal)
        expected = torch_grads(dout, x, weight, bias, "silu", seq_idx, init, dfinal)
        for name, got, want, inp in zip(grads._fields, grads, expected, (x, weight, bias, init)):
            assert got.dtype == inp.dtype, name
            scale = max(1.0, float(np.abs(want).max()))  # dweight/dbias sum B*L terms
            rtol, atol = TOL[dtype]
            assert_close(got, want, dtype, rtol=rtol, atol=atol * scale, name=name)


def test_backward_optional_inputs_give_none(rng):
    x, weight, _, _ = conv_args(rng, 2, 3, 9, 4)
    dout = randn(rng, x.shape)
    grads = ssmcore.causal_conv1d_bwd(dout, x, weight)
    assert grads.dbias is None and grads.dinitial_states is None
    # Absent bias and initial states act as zeros.
    expected = torch_grads(dout, x, weight, np.zeros(3), None, None, np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    assert_close(grads.dx, expected[0], "float32")
    assert_close(grads.dweight, expected[1], "float32")


# ---------------------------------------------------------------- decode update

def update_case(rng, n_batch, n_chan, width, state_len, n_new, pool=None, dtype="float32", state_dtype="float32"):
    shape = (n_batch, n_chan) if n_new is None else (n_batch, n_chan, n_new)
    x = randn(rng, shape, dtype)
    conv_state = randn(rng, (pool or n_batch, n_chan, state_len), state_dtype)
    weight = randn(rng, (n_chan, width), "float32", scale=0.5)
    bias = randn(rng, (n_chan,), "float32")
    return x, conv_state, weight, bias


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("n_new", [None, 1, 3, 9])
def test_update_matches_reference(rng, circular, width, n_new):
    for state_len in dict.fromkeys((width - 1, width + 2)):
        x, conv_state, weight, bias = update_case(rng, 3, 5, width, state_len, n_new, pool=6)
        indices = np.array([4, -1, 0], np.int32)
        seqlens = np.array([0, 3, 17], np.int32) if circular else None
        ref_out, ref_state = reference.causal_conv1d_update(x, conv_state, weight, bias, "silu", seqlens, indices)
        state = conv_state.copy()
        out = ssmcore.causal_conv1d_update(x, state, weight, bias, "silu", seqlens, indices)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert_close(out, ref_out, "float32")
        np.testing.assert_array_equal(state, ref_state)
        assert (out[1] == 0).all()
        np.testing.assert_array_equal(state[[1, 2, 3, 5]], conv_state[[1, 2, 3, 5]])


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("step", [1, 3])
@pytest.mark.parametrize("width", [1, 2, 4])
def test_update_step_by_step_equals_full_conv(rng, circular, step, width):
    length, state_len = 20, width - 1 + (2 if circular else 0)
    x, weight, bias, _ = conv_args(rng, 2, 4, length, width, "float64")
    full, full_final = ssmcore.causal_conv1d(x, weight, bias, "silu", return_final_states=True)
    state = np.zeros((2, 4, state_len))
    outs = []
    for t in range(0, length, step):
        seqlens = np.full(2, t, np.int32) if circular else None
        outs.append(ssmcore.causal_conv1d_update(x[:, :, t:t + step], state, weight, bias, "silu", seqlens))
    np.testing.assert_allclose(np.concatenate(outs, axis=2), full, rtol=1e-12, atol=1e-14)
    if circular:
        order = [(length - (width - 1) + i) % state_len for i in range(width - 1)]
        np.testing.assert_array_equal(state[:, :, order], full_final)
    else:
        np.testing.assert_array_equal(state, full_final)


@pytest.mark.parametrize("state_dtype", list(DTYPES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_update_dtypes(rng, dtype, state_dtype):
    x, conv_state, weight, bias = update_case(rng, 3, 7, 4, 5, 2, pool=4, dtype=dtype, state_dtype=state_dtype)
    indices = np.array([2, 0, -1], np.int64)
    for seqlens in (None, np.array([6, 0, 1], np.int64)):
        state = conv_state.copy()
        ref_out, ref_state = reference.causal_conv1d_update(x, conv_state, weight, bias, None, seqlens, indices)
        out = ssmcore.causal_conv1d_update(x, state, weight, bias, None, seqlens, indices)
        assert out.dtype == x.dtype and state.dtype == conv_state.dtype
        worst = dtype if TOL[dtype] > TOL[state_dtype] else state_dtype
        assert_close(out, ref_out, worst)
        # The state holds copies of inputs: exactly the inputs rounded to the state dtype.
        np.testing.assert_array_equal(state, ref_state.astype(state.dtype))


def test_update_is_in_place_on_torch_tensors(rng):
    x, conv_state, weight, bias = update_case(rng, 2, 3, 4, 3, None)
    state_t = torch.from_numpy(conv_state.copy())
    out = ssmcore.causal_conv1d_update(torch.from_numpy(x), state_t, torch.from_numpy(weight))
    ref_out, ref_state = reference.causal_conv1d_update(x, conv_state, weight)
    assert isinstance(out, np.ndarray)
    assert_close(out, ref_out, "float32")
    np.testing.assert_array_equal(state_t.numpy(), ref_state)


# ---------------------------------------------------------------- hypothesis sweeps

@settings(max_examples=20)
@given(n_batch=st.integers(1, 3), n_chan=st.integers(1, 9), length=st.integers(1, 80), width=st.integers(1, 8),
       channel_last=st.booleans(), use_seq=st.booleans(), use_init=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_forward_sweep(n_batch, n_chan, length, width, channel_last, use_seq, use_init, seed):
    rng = np.random.default_rng(seed)
    x, weight, bias, init = conv_args(rng, n_batch, n_chan, length, width, "float64", channel_last)
    seq_idx = random_seq_idx(rng, n_batch, length) if use_seq else None
    init = init if use_init else None
    out, final = ssmcore.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
    ref_out, ref_final = reference.causal_conv1d(x, weight, bias, "silu", seq_idx, init, return_final_states=True)
    assert_close(out, ref_out, "float64")
    np.testing.assert_array_equal(final, ref_final)


@settings(max_examples=20)
@given(n_batch=st.integers(1, 4), n_chan=st.integers(1, 6), width=st.integers(1, 6), extra=st.integers(0, 3),
       n_new=st.integers(1, 7), circular=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_update_sweep(n_batch, n_chan, width, extra, n_new, circular, seed):
    rng = np.random.default_rng(seed)
    x, conv_state, weight, bias = update_case(rng, n_batch, n_chan, width, width - 1 + extra, n_new,
                                              pool=n_batch + 2, dtype="float64", state_dtype="float64")
    indices = rng.permutation(n_batch + 2)[:n_batch] - (rng.random(n_batch) < 0.3) * 100
    seqlens = rng.integers(0, 50, n_batch) if circular else None
    ref_out, ref_state = reference.causal_conv1d_update(x, conv_state, weight, bias, "silu", seqlens, indices)
    out = ssmcore.causal_conv1d_update(x, conv_state, weight, bias, "silu", seqlens, indices)
    assert_close(out, ref_out, "float64")
    np.testing.assert_array_equal(conv_state, ref_state)


# ---------------------------------------------------------------- inputs unmodified

def test_inputs_unmodified(rng):
    x, weight, bias, init = conv_args(rng, 2, 4, 33, 4, "float32", channel_last=True)
    seq_idx = random_seq_idx(rng, 2, 33)
    dout, dfinal = randn(rng, x.shape), randn(rng, init.shape)
    args = (dout, x, weight, bias, seq_idx, init, dfinal)
    copies = [a.copy() for a in args]
    ssmcore.causal_conv1d(x, weight, bias, "silu", seq_idx, init, True)
    ssmcore.causal_conv1d_bwd(dout, x, weight, bias, "silu", seq_idx, init, dfinal)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)
    xu, conv_state, weight, bias = update_case(rng, 2, 4, 4, 3, 2, pool=3)
    indices, seqlens = np.array([2, 0], np.int32), np.array([5, 1], np.int32)
    args = (xu, weight, bias, indices, seqlens)
    copies = [a.copy() for a in args]
    ssmcore.causal_conv1d_update(xu, conv_state, weight, bias, "silu", seqlens, indices)
    for a, c in zip(args, copies):
        np.testing.assert_array_equal(a, c)


# ---------------------------------------------------------------- errors

def _conv_kwargs(rng, **override):
    x, weight, bias, init = conv_args(rng, 2, 3, 8, 4)
    kwargs = dict(x=x, weight=weight, bias=bias, activation="silu", seq_idx=np.zeros((2, 8), np.int32),
                  initial_states=init)
    kwargs.update(override)
    return kwargs


@pytest.mark.parametrize("name,value,error", [
    ("x", [[[1.0]]], TypeError),
    ("x", np.zeros((2, 3), np.float32), ValueError),
    ("x", np.zeros((2, 3, 8), np.int32), TypeError),
    ("x", np.zeros((2, 3, 0), np.float32), ValueError),
    ("weight", np.zeros((3, 0), np.float32), ValueError),
    ("weight", np.zeros((3, 65), np.float32), ValueError),
    ("weight", np.zeros((4, 4), np.float32), ValueError),
    ("weight", np.zeros((3, 4), np.float16), TypeError),
    ("weight", np.zeros((3,), np.float32), ValueError),
    ("bias", np.zeros((4,), np.float32), ValueError),
    ("bias", np.zeros((3,), np.int64), TypeError),
    ("activation", "relu", ValueError),
    ("seq_idx", np.zeros((2, 7), np.int32), ValueError),
    ("seq_idx", np.zeros((2, 8), np.float32), TypeError),
    ("initial_states", np.zeros((2, 3, 4), np.float32), ValueError),
    ("initial_states", np.zeros((2, 3, 3), np.float16), TypeError),
])
def test_forward_errors(rng, name, value, error):
    with pytest.raises(error, match=rf"^{name}:"):
        ssmcore.causal_conv1d(**_conv_kwargs(rng, **{name: value}))


def test_forward_flag_error(rng):
    with pytest.raises(TypeError, match=r"^return_final_states:"):
        ssmcore.causal_conv1d(**_conv_kwargs(rng), return_final_states="yes")


@pytest.mark.parametrize("name,value,error", [
    ("dout", np.zeros((2, 3, 9), np.float32), ValueError),
    ("dout", np.zeros((2, 3, 8), np.int32), TypeError),
    ("dfinal_states", np.zeros((2, 3, 2), np.float32), ValueError),
    ("weight", np.zeros((3, 70), np.float32), ValueError),
    ("activation", "gelu", ValueError),
])
def test_backward_errors(rng, name, value, error):
    kwargs = _conv_kwargs(rng)
    kwargs.update(dout=np.ones((2, 3, 8), np.float32), dfinal_states=np.ones((2, 3, 3), np.float32))
    kwargs[name] = value
    with pytest.raises(error, match=rf"^{name}:"):
        ssmcore.causal_conv1d_bwd(**kwargs)


@pytest.mark.parametrize("name,value,error", [
    ("x", np.zeros((2, 3, 1, 1), np.float32), ValueError),
    ("x", np.zeros((2, 3, 0), np.float32), ValueError),
    ("x", np.zeros((2, 3), np.int8), TypeError),
    ("conv_state", np.zeros((4, 3, 2), np.float32), ValueError),
    ("conv_state", np.zeros((4, 5, 3), np.float32), ValueError),
    ("conv_state", np.zeros((4, 3, 3), np.int32), TypeError),
    ("conv_state", np.broadcast_to(np.zeros(3, np.float32), (4, 3, 3)), ValueError),
    ("weight", np.zeros((3, 65), np.float32), ValueError),
    ("bias", np.zeros((2,), np.float32), ValueError),
    ("activation", "tanh", ValueError),
    ("cache_seqlens", np.array([0, -1], np.int32), ValueError),
    ("cache_seqlens", np.array([0.0, 1.0]), TypeError),
    ("cache_seqlens", np.array([0, 1, 2], np.int32), ValueError),
    ("conv_state_indices", np.array([0, 4], np.int32), ValueError),
    ("conv_state_indices", np.array([1, 1], np.int32), ValueError),
    ("conv_state_indices", np.array([0, 1], np.float32), TypeError),
])
def test_update_errors(rng, name, value, error):
    kwargs = dict(x=randn(rng, (2, 3)), conv_state=randn(rng, (4, 3, 3)), weight=randn(rng, (3, 4)),
                  bias=randn(rng, (3,)), activation="silu", cache_seqlens=np.array([0, 1], np.int32),
                  conv_state_indices=np.array([0, 3], np.int32))
    kwargs[name] = value
    before = kwargs["conv_state"].copy()
    with pytest.raises(error, match=rf"^{name}:"):
        ssmcore.causal_conv1d_update(**kwargs)
    np.testing.assert_array_equal(kwargs["conv_state"], before)


def test_update_pool_size_needs_indices(rng):
    with pytest.raises(ValueError, match=r"^conv_state:"):
        ssmcore.causal_conv1d_update(randn(rng, (2, 3)), randn(rng, (4, 3, 3)), randn(rng, (3, 4)))
