"""Float64 reference for one decode step of the selective state space recurrence.

Letters: B batch, D channels, N state size, G groups, H heads, P head dim.
Per channel (or per head row (h, p)) with its group's B and C vectors:

    dt    = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
    state = exp(dt * A) * state + dt * B * x
    out   = <C, state> + D * x,  times silu(z) when z is given
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One recurrence step in float64, without touching the inputs.

    Without heads: state (Bs, D, N), x/dt/z (B, D), A (D, N), B/C (B, N) or (B, G, N), D/dt_bias (D,).
    With heads: state (Bs, H, P, N), x/dt/z (B, H, P), A (H, P, N), B/C (B, G, N), D/dt_bias (H, P).
    Row b uses state[state_batch_indices[b]] (state[b] without indices); a negative index is
    padding: output 0, no state row changes. Returns (out shaped like x, new_state).
    """
    new_state = _f64(state).copy()
    x, dt, A, z = _f64(x), _f64(dt), _f64(A), _f64(z)
    B, C, D, dt_bias = _f64(B), _f64(C), _f64(D), _f64(dt_bias)
    n_batch = x.shape[0]
    # Each row's channels: (D,) without heads, (H, P) with heads; group g covers a block of
    # consecutive rows along the first channel axis.
    n_first = x.shape[1]
    out = np.zeros(x.shape)
    for b in range(n_batch):
        row = b if state_batch_indices is None else int(state_batch_indices[b])
        if row < 0:
            continue
        delta = dt[b] + (0.0 if dt_bias is None else dt_bias)
        if dt_softplus:
            delta = np.where(delta > 20.0, delta, np.log1p(np.exp(np.minimum(delta, 20.0))))
        for i in range(n_first):
            b_vec = B[b] if B.ndim == 2 else B[b, i // (n_first // B.shape[1])]
            c_vec = C[b] if C.ndim == 2 else C[b, i // (n_first // C.shape[1])]
            dt_i = delta[i][..., None]  # (1,) or (P, 1)
            x_i = x[b, i][..., None]
            h = np.exp(dt_i * A[i]) * new_state[row, i] + dt_i * b_vec * x_i
            new_state[row, i] = h
            y = np.sum(h * c_vec, axis=-1)
            if D is not None:
                y = y + D[i] * x[b, i]
            if z is not None:
                y = y * z[b, i] / (1.0 + np.exp(-z[b, i]))
            out[b, i] = y
    return out, new_state
