"""Float64 references for the causal depthwise convolution (prefill and decode).

Letters: B batch, D channels, L length, W conv width. The convolution reads, for
output time t, the inputs at t - (W-1) .. t of the same channel:

    out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W-1) + k])

Inputs before t = 0 come from ``initial_states`` (else 0). With ``seq_idx`` a tap
whose input lies in another sequence than t contributes 0, and padding positions
(seq_idx < 0) output 0.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _activate(v, activation):
    if activation in ("silu", "swish"):
        return v / (1.0 + np.exp(-v))
    return v


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                  return_final_states=False):
    """Causal depthwise conv1d in float64.

    x (B, D, L), weight (D, W), bias (D,), seq_idx (B, L), initial_states (B, D, W-1).
    Returns out (B, D, L), or (out, final_states (B, D, W-1)) with return_final_states:
    the last W-1 entries of concat(initial_states or 0, x) along time, with entries outside
    the sequence of position L-1 (or anywhere when L-1 is padding) set to 0.
    """
    x = _f64(x)
    weight = _f64(weight)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    bias = np.zeros(n_chan) if bias is None else _f64(bias)
    init = np.zeros((n_batch, n_chan, width - 1)) if initial_states is None else _f64(initial_states)
    out = np.zeros((n_batch, n_chan, length))
    final = np.zeros((n_batch, n_chan, width - 1))

    def seq_of(b, s):
        """Sequence id of input position s (s < 0: the initial states, sequence of t = 0)."""
        if seq_idx is None:
            return 0
        return int(seq_idx[b, max(s, 0)])

    def inputs(b, s):
        """The (D,) inputs at position s (s < 0: from the initial states)."""
        return x[b, :, s] if s >= 0 else init[b, :, width - 1 + s]

    for b in range(n_batch):
        for t in range(length):
            sid = seq_of(b, t)
            if sid < 0:
                continue
            acc = bias.copy()
            for k in range(width):
                s = t - (width - 1) + k
                if seq_of(b, s) == sid:
                    acc += weight[:, k] * inputs(b, s)
            out[b, :, t] = _activate(acc, activation)
        last = seq_of(b, length - 1)
        for i in range(width - 1):
            s = length - (width - 1) + i
            if last >= 0 and seq_of(b, s) == last:
                final[b, :, i] = inputs(b, s)
    return (out, final) if return_final_states else out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """One or a few decode steps of the causal conv, in float64, without touching the inputs.

    x (B, D) or (B, D, Lnew), conv_state (Bs, D, state_len), weight (D, W), bias (D,),
    cache_seqlens (B,), conv_state_indices (B,). Returns (out shaped like x, new_conv_state).
    Shift form: the state holds the last state_len inputs, oldest first. Circular form: the
    state is a ring whose entry (cache_seqlens[b] - 1 - i) % state_len holds the input i+1
    steps back; new token j goes to (cache_seqlens[b] + j) % state_len.
    """
    x = _f64(x)
    weight = _f64(weight)
    new_state = _f64(conv_state).copy()
    x3 = x[:, :, None] if x.ndim == 2 else x
    n_batch, n_chan, n_new = x3.shape
    width = weight.shape[1]
    state_len = new_state.shape[2]
    bias = np.zeros(n_chan) if bias is None else _f64(bias)
    out = np.zeros(x3.shape)
    for b in range(n_batch):
        row = b if conv_state_indices is None else int(conv_state_indices[b])
        if row < 0:
            continue
        if cache_seqlens is None:
            history = new_state[row]  # positions -state_len .. -1, oldest first
        else:
            c = int(cache_seqlens[b])
            history = new_state[row][:, [(c - state_len + i) % state_len for i in range(state_len)]]
        stream = np.concatenate([history, x3[b]], axis=1)
        for j in range(n_new):
            t = state_len + j
            window = stream[:, t - (width - 1): t + 1]
            out[b, :, j] = _activate(bias + np.sum(weight * window, axis=1), activation)
        if state_len == 0:
            continue
        if cache_seqlens is None:
            new_state[row] = stream[:, -state_len:]
        else:
            for j in range(n_new):
                new_state[row][:, (c + j) % state_len] = x3[b, :, j]
    return (out[:, :, 0] if x.ndim == 2 else out), new_state
