"""Float64 reference of the selective scan (Mamba-1), a plain loop over time.

Letters: B batch, D channels, L length, N state size, G groups.
"""

from __future__ import annotations

import numpy as np


def _softplus(x):
    return np.where(x > 20, x, np.log1p(np.exp(np.minimum(x, 20))))


def _per_channel(X, channels):
    """B or C as an array that broadcasts to (B, D, N, L)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 2:  # (D, N): one matrix for every batch entry and step
        return X[None, :, :, None]
    if X.ndim == 3:  # (B, N, L): shared by all channels
        return X[:, None]
    return np.repeat(X, channels // X.shape[1], axis=1)  # (B, G, N, L): channel d uses group d // (D / G)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Selective scan in float64.

    u, delta (B, D, L); A (D, N); B, C (D, N), (B, N, L) or (B, G, N, L); D, delta_bias (D,);
    z (B, D, L); initial_state (B, D, N). Returns out (B, D, L) float64, or (out, last_state (B, D, N)).

        dt_t = softplus(delta_t + delta_bias) (or without softplus)
        h_t  = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   h_{-1} = initial_state or 0
        y_t  = <C_t, h_t> + D u_t;   out_t = y_t silu(z_t)
    """
    u = np.asarray(u, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    batch, channels, length = u.shape
    dt = delta if delta_bias is None else delta + np.asarray(delta_bias, dtype=np.float64)[:, None]
    if delta_softplus:
        dt = _softplus(dt)
    B_all = _per_channel(B, channels)
    C_all = _per_channel(C, channels)
    if initial_state is None:
        h = np.zeros((batch, channels, A.shape[1]))
    else:
        h = np.array(initial_state, dtype=np.float64)
    y = np.empty((batch, channels, length))
    for t in range(length):
        B_t = B_all[..., min(t, B_all.shape[-1] - 1)]
        C_t = C_all[..., min(t, C_all.shape[-1] - 1)]
        h = np.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * B_t
        y[:, :, t] = np.sum(C_t * h, axis=-1)
    if D is not None:
        y = y + np.asarray(D, dtype=np.float64)[:, None] * u
    if z is not None:
        z = np.asarray(z, dtype=np.float64)
        y = y * (z / (1 + np.exp(-z)))
    return (y, h) if return_last_state else y
