"""Causal depthwise conv1d on the CPU: prefill forward/backward and decode update.

Both prefill kernels read a padded input ``window`` = concat(initial_states or 0, x) along
time (length L + W - 1), so output t reads window entries t .. t + W - 1. ``seq_pad``
(B, L + W - 1) is the sequence id of each window entry (the initial states carry the id of
t = 0): a tap counts iff ``seq_pad[b, t + k] == seq_pad[b, t + W - 1]``, and an output whose
own id is negative (padding) is 0.

Two work decompositions, one per memory layout of x, so the innermost loop is unit-stride:
- contiguous x (B, D, L): one (b, d) row per prange iteration; the row copies its window
  into a local buffer, then loops taps outside, time inside.
- channel-last x (a (B, L, D) array transposed): one (b, chunk of TIME_CHUNK steps) per
  iteration, channels innermost. (Blocks of channels walking all of t ran 20-30x slower:
  each step touched a few lines 4*D bytes apart.)

Backward recomputes the pre-activation, scatters dpre into ``dwindow`` entries owned by the
iteration (dx and dinitial_states) and writes dweight/dbias as per-iteration partials summed
afterwards, so no two iterations write one place. final_states and their gradient are
W-1 entries per row, handled in NumPy.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np

from ssmcore.backends.numba._common import cast_out, compute_dtype, pool_rows, to_compute, write_back

# Time steps per iteration of the channel-last kernels; >= MAX_WIDTH - 1, so the first chunk
# owns every window entry that comes from the initial states.
TIME_CHUNK = 64


class _Prefill(NamedTuple):
    """Compute-dtype inputs of a prefill kernel, in its layout."""

    dtype: np.dtype
    channel_last: bool
    x: np.ndarray  # (B, D, L) rows, or (B, L, D) channel-last
    weight: np.ndarray  # (D, W) rows, or (W, D)
    bias: np.ndarray  # (D,), zeros when absent
    init: np.ndarray  # (B, D, W-1) rows, or (B, W-1, D); zeros when absent
    seq_pad: np.ndarray  # (B, L + W - 1) int64, or (1, 1) when unused
    has_seq: bool


def _channel_last(x) -> bool:
    """True when channels are x's fastest axis (a (B, L, D) array transposed)."""
    _, n_chan, length = x.shape
    return n_chan > 1 and length > 1 and abs(x.strides[1]) < abs(x.strides[2])


def _time_major(a, dtype):
    """A C-contiguous (B, L, D) copy/view of a (B, D, L) array."""
    return to_compute(a.transpose(0, 2, 1), dtype)


def _prefill(x, weight, bias, seq_idx, initial_states) -> _Prefill:
    dtype = compute_dtype(x)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    channel_last = _channel_last(x)
    init = np.zeros((n_batch, n_chan, width - 1), dtype) if initial_states is None else initial_states
    if seq_idx is None:
        seq_pad = np.zeros((1, 1), np.int64)
    else:
        seq_pad = np.empty((n_batch, length + width - 1), np.int64)
        seq_pad[:, : width - 1] = seq_idx[:, :1]
        seq_pad[:, width - 1 :] = seq_idx
    bias = np.zeros(n_chan, dtype) if bias is None else to_compute(bias, dtype)
    if channel_last:
        return _Prefill(dtype, True, _time_major(x, dtype), to_compute(weight.T, dtype), bias,
                        _time_major(init, dtype), seq_pad, seq_idx is not None)
    return _Prefill(dtype, False, to_compute(x, dtype), to_compute(weight, dtype), bias, to_compute(init, dtype),
                    seq_pad, seq_idx is not None)


def _from_kernel_layout(a, channel_last):
    """A kernel-layout result as a (B, D, ...) array."""
    return a.transpose(0, 2, 1) if channel_last else a


def _final_keep(seq_idx, width):
    """(B, W-1) mask of the final-state entries that belong to the sequence of position L-1."""
    length = seq_idx.shape[1]
    ids = np.concatenate([np.repeat(seq_idx[:, :1], width - 1, axis=1), seq_idx], axis=1)[:, length:]
    last = seq_idx[:, -1:]
    return (ids == last) & (last >= 0)


def _final_states(x, initial_states, seq_idx, width, dtype):
    """The last W-1 entries of concat(initial_states or 0, x); those outside the sequence of position L-1 are 0."""
    n_batch, n_chan, length = x.shape
    init = np.zeros((n_batch, n_chan, width - 1), dtype) if initial_states is None else initial_states
    tail = np.concatenate([init, x[:, :, length - min(length, width - 1):]], axis=2).astype(dtype)
    tail = tail[:, :, tail.shape[2] - (width - 1):]
    if seq_idx is not None:
        tail = np.where(_final_keep(seq_idx, width)[:, None, :], tail, 0).astype(dtype)
    return tail


@numba.njit(inline="always")
def _row_taps_valid(seq_pad, has_seq, b, t, k, width):
    # Whether output t of row b reads its tap k (and is not padding).
    if not has_seq:
        return True
    sid = seq_pad[b, t + width - 1]
    return sid >= 0 and seq_pad[b, t + k] == sid


@numba.njit(parallel=True, cache=True, fastmath=False)
def _fwd_rows(x, weight, bias, init, seq_pad, has_seq, silu, one, out):
    # x, out: (B, D, L); one (b, d) row per iteration.
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    for r in numba.prange(n_batch * n_chan):
        b = r // n_chan
        d = r - b * n_chan
        window = np.empty(length + width - 1, x.dtype)
        window[: width - 1] = init[b, d]
        window[width - 1 :] = x[b, d]
        acc = np.empty(length, x.dtype)
        acc[:] = bias[d]
        for k in range(width):
            wk = weight[d, k]
            for t in range(length):
                if _row_taps_valid(seq_pad, has_seq, b, t, k, width):
                    acc[t] += wk * window[t + k]
        for t in range(length):
            v = acc[t]
            if silu:
                v = v / (one + np.exp(-v))
            if has_seq and seq_pad[b, t + width - 1] < 0:
                v = one - one
            out[b, d, t] = v


@numba.njit(inline="always")
def _fill_window_chunk(window, x, init, b, c0, c1):
    # window[c - c0] = padded input row c, for c in [c0, c1).
    width_m1 = init.shape[1]
    for c in range(c0, c1):
        if c < width_m1:
            window[c - c0] = init[b, c]
        else:
            window[c - c0] = x[b, c - width_m1]


@numba.njit(parallel=True, cache=True, fastmath=False)
def _fwd_time_chunks(x, weight, bias, init, seq_pad, has_seq, silu, one, out):
    # x, out: (B, L, D); weight (W, D); init (B, W-1, D); one (b, chunk of time) per iteration.
    n_batch, length, n_chan = x.shape
    width = weight.shape[0]
    n_chunks = (length + TIME_CHUNK - 1) // TIME_CHUNK
    for r in numba.prange(n_batch * n_chunks):
        b = r // n_chunks
        t0 = (r - b * n_chunks) * TIME_CHUNK
        t1 = min(t0 + TIME_CHUNK, length)
        window = np.empty((t1 - t0 + width - 1, n_chan), x.dtype)
        _fill_window_chunk(window, x, init, b, t0, t1 + width - 1)
        for t in range(t0, t1):
            o = out[b, t]
            sid = seq_pad[b, t + width - 1] if has_seq else 0
            if sid < 0:
                o[:] = 0
                continue
            o[:] = bias
            for k in range(width):
                if has_seq and seq_pad[b, t + k] != sid:
                    continue
                wk = weight[k]
                row = window[t - t0 + k]
                for d in range(n_chan):
                    o[d] += wk[d] * row[d]
            if silu:
                for d in range(n_chan):
                    o[d] = o[d] / (one + np.exp(-o[d]))


@numba.njit(parallel=True, cache=True, fastmath=False)
def _bwd_rows(dout, x, weight, bias, init, seq_pad, has_seq, silu, one, dx, dinit, dweight_parts, dbias_parts):
    # Layouts as _fwd_rows; dinit (B, D, W-1); per-row partials dweight_parts (B, D, W), dbias_parts (B, D).
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    for r in numba.prange(n_batch * n_chan):
        b = r // n_chan
        d = r - b * n_chan
        window = np.empty(length + width - 1, x.dtype)
        window[: width - 1] = init[b, d]
        window[width - 1 :] = x[b, d]
        # dpre holds the pre-activation first, then its gradient.
        dpre = np.empty(length, x.dtype)
        dpre[:] = bias[d]
        for k in range(width):
            wk = weight[d, k]
            for t in range(length):
                if _row_taps_valid(seq_pad, has_seq, b, t, k, width):
                    dpre[t] += wk * window[t + k]
        db = one - one
        for t in range(length):
            g = dout[b, d, t]
            if silu:
                sig = one / (one + np.exp(-dpre[t]))
                g = g * sig * (one + dpre[t] * (one - sig))
            if has_seq and seq_pad[b, t + width - 1] < 0:
                g = one - one
            dpre[t] = g
            db += g
        dwindow = np.zeros(length + width - 1, x.dtype)
        for k in range(width):
            wk = weight[d, k]
            dw = one - one
            for t in range(length):
                if _row_taps_valid(seq_pad, has_seq, b, t, k, width):
                    dw += dpre[t] * window[t + k]
                    dwindow[t + k] += dpre[t] * wk
            dweight_parts[b, d, k] = dw
        dinit[b, d] = dwindow[: width - 1]
        dx[b, d] = dwindow[width - 1 :]
        dbias_parts[b, d] = db


@numba.njit(parallel=True, cache=True, fastmath=False)
def _bwd_time_chunks(dout, x, weight, bias, init, seq_pad, has_seq, silu, one, dx, dinit, dweight_parts,
                     dbias_parts):
    # Layouts as _fwd_time_chunks; dinit (B, W-1, D); partials per (b, chunk): dweight_parts
    # (B * n_chunks, D, W), dbias_parts (B * n_chunks, D). A chunk [t0, t1) owns the dwindow
    # entries of dx[t0:t1] (plus all of dinit for the first chunk); they gather dpre from
    # outputs t0 .. t1 + W - 2, so dpre is recomputed over that halo.
    n_batch, length, n_chan = x.shape
    width = weight.shape[0]
    n_chunks = (length + TIME_CHUNK - 1) // TIME_CHUNK
    for r in numba.prange(n_batch * n_chunks):
        b = r // n_chunks
        t0 = (r - b * n_chunks) * TIME_CHUNK
        t1 = min(t0 + TIME_CHUNK, length)
        t_end = min(t1 + width - 1, length)
        window = np.empty((t_end - t0 + width - 1, n_chan), x.dtype)
        _fill_window_chunk(window, x, init, b, t0, t_end + width - 1)
        dpre = np.zeros((t_end - t0, n_chan), x.dtype)
        pre = np.empty(n_chan, x.dtype)
        dw = np.zeros((width, n_chan), x.dtype)
        db = np.zeros(n_chan, x.dtype)
        for t in range(t0, t_end):
            sid = seq_pad[b, t + width - 1] if has_seq else 0
            if sid < 0:
                continue
            pre[:] = bias
            for k in range(width):
                if has_seq and seq_pad[b, t + k] != sid:
                    continue
                wk = weight[k]
                row = window[t - t0 + k]
                for d in range(n_chan):
                    pre[d] += wk[d] * row[d]
            g = dpre[t - t0]
            for d in range(n_chan):
                g[d] = dout[b, t, d]
                if silu:
                    sig = one / (one + np.exp(-pre[d]))
                    g[d] = g[d] * sig * (one + pre[d] * (one - sig))
            if t < t1:
                for d in range(n_chan):
                    db[d] += g[d]
                for k in range(width):
                    if has_seq and seq_pad[b, t + k] != sid:
                        continue
                    row = window[t - t0 + k]
                    for d in range(n_chan):
                        dw[k, d] += g[d] * row[d]
        # Window entry c is read by outputs t = c - k (k < W) with the tap k.
        c0 = 0 if t0 == 0 else t0 + width - 1
        acc = np.empty(n_chan, x.dtype)
        for c in range(c0, t1 + width - 1):
            acc[:] = 0
            for k in range(width):
                t = c - k
                if t < t0 or t >= t_end:
                    continue
                if has_seq and (seq_pad[b, t + width - 1] < 0 or seq_pad[b, c] != seq_pad[b, t + width - 1]):
                    continue
                wk = weight[k]
                g = dpre[t - t0]
                for d in range(n_chan):
                    acc[d] += g[d] * wk[d]
            if c < width - 1:
                dinit[b, c] = acc
            else:
                dx[b, c - (width - 1)] = acc
        dweight_parts[r] = dw.T
        dbias_parts[r] = db


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                  return_final_states=False):
    k = _prefill(x, weight, bias, seq_idx, initial_states)
    fwd = _fwd_time_chunks if k.channel_last else _fwd_rows
    out = np.empty(k.x.shape, k.dtype)
    fwd(k.x, k.weight, k.bias, k.init, k.seq_pad, k.has_seq, activation is not None, k.dtype.type(1), out)
    out = cast_out(_from_kernel_layout(out, k.channel_last), x.dtype)
    if not return_final_states:
        return out
    state_dtype = (initial_states if initial_states is not None else x).dtype
    return out, _final_states(x, initial_states, seq_idx, weight.shape[1], state_dtype)


def causal_conv1d_bwd(dout, x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                      dfinal_states=None):
    k = _prefill(x, weight, bias, seq_idx, initial_states)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    if k.channel_last:
        bwd, doutk = _bwd_time_chunks, _time_major(dout, k.dtype)
        n_parts = n_batch * ((length + TIME_CHUNK - 1) // TIME_CHUNK)
    else:
        bwd, doutk, n_parts = _bwd_rows, to_compute(dout, k.dtype), n_batch
    dxk = np.empty(k.x.shape, k.dtype)
    dinitk = np.empty(k.init.shape, k.dtype)
    dweight_parts = np.empty((n_parts, n_chan, width), k.dtype)
    dbias_parts = np.empty((n_parts, n_chan), k.dtype)
    bwd(doutk, k.x, k.weight, k.bias, k.init, k.seq_pad, k.has_seq, activation is not None, k.dtype.type(1),
        dxk, dinitk, dweight_parts, dbias_parts)
    dx = _from_kernel_layout(dxk, k.channel_last)
    dinit = _from_kernel_layout(dinitk, k.channel_last)
    if dfinal_states is not None:
        # final entry i is padded-input entry L + i: from the initial states while L + i < W - 1.
        dfinal = to_compute(dfinal_states, k.dtype)
        if seq_idx is not None:
            dfinal = np.where(_final_keep(seq_idx, width)[:, None, :], dfinal, 0)
        n_from_init = max(0, width - 1 - length)
        dinit[:, :, length:] += dfinal[:, :, :n_from_init]
        dx[:, :, length - (width - 1) + n_from_init:] += dfinal[:, :, n_from_init:]
    return (
        cast_out(dx, x.dtype),
        cast_out(dweight_parts.sum(axis=0), weight.dtype),
        None if bias is None else cast_out(dbias_parts.sum(axis=0), bias.dtype),
        None if initial_states is None else np.ascontiguousarray(cast_out(dinit, initial_states.dtype)),
    )


@numba.njit(parallel=True, cache=True, fastmath=False)
def _update_kernel(x, state, slots, weight, bias, seqlens, circular, silu, one, out):
    n_batch, n_chan, n_new = x.shape
    width = weight.shape[1]
    state_len = state.shape[2]
    for r in numba.prange(n_batch * n_chan):
        b = r // n_chan
        d = r - b * n_chan
        slot = slots[b]
        if slot < 0:
            for j in range(n_new):
                out[b, d, j] = 0
            continue
        row = state[slot, d]
        w = weight[d]
        for j in range(n_new):
            xj = x[b, d, j]
            acc = bias[d] + w[width - 1] * xj
            if circular:
                pos = seqlens[b] + j
                for k in range(width - 1):
                    acc += w[k] * row[(pos - (width - 1) + k + state_len) % state_len]
                if state_len > 0:
                    row[pos % state_len] = xj
            else:
                for k in range(width - 1):
                    acc += w[k] * row[state_len - (width - 1) + k]
                if state_len > 0:
                    for i in range(state_len - 1):
                        row[i] = row[i + 1]
                    row[state_len - 1] = xj
            if silu:
                acc = acc / (one + np.exp(-acc))
            out[b, d, j] = acc


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    dtype = compute_dtype(x, conv_state)
    x3 = x[:, :, None] if x.ndim == 2 else x
    n_batch, n_chan, _ = x3.shape
    state, slots, touched = pool_rows(conv_state, conv_state_indices, n_batch, dtype)
    circular = cache_seqlens is not None
    seqlens = cache_seqlens.astype(np.int64) if circular else np.zeros(1, np.int64)
    w = to_compute(weight, dtype)
    b = np.zeros(n_chan, dtype) if bias is None else to_compute(bias, dtype)
    out = np.empty(x3.shape, dtype)
    _update_kernel(to_compute(x3, dtype), state, slots, w, b, seqlens, circular, activation is not None,
                   dtype.type(1), out)
    write_back(conv_state, state, touched)
    return cast_out(out.reshape(x.shape), x.dtype)
