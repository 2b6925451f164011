"""One decode step of the selective SSM recurrence on the CPU, state updated in place.

Both forms run one kernel on the heads layout: without heads, state (Bs, D, N) is viewed as
(Bs, D, 1, N) (every channel a head of dim 1), x (B, D) as (B, D, 1), A (D, N) as (D, 1, N),
B/C (B, N) as (B, 1, N). One (b, h) pair per prange iteration owns state[slot, h] (P x N):
it reads and writes it once, so no two iterations touch the same memory. A keeps its
strides (a stride-0 per-head broadcast is not materialised).
"""

from __future__ import annotations

import numba
import numpy as np

from ssmcore.backends.numba._common import cast_out, compute_dtype, pool_rows, to_compute, write_back


@numba.njit(parallel=True, cache=True, fastmath=False)
def _state_update_kernel(state, slots, x, dt, A, B, C, D, has_D, z, has_z, dt_bias, softplus, one, out):
    n_batch, n_heads, head_dim = x.shape
    n_state = state.shape[3]
    heads_per_b = n_heads // B.shape[1]
    heads_per_c = n_heads // C.shape[1]
    for r in numba.prange(n_batch * n_heads):
        b = r // n_heads
        h = r - b * n_heads
        slot = slots[b]
        if slot < 0:
            for p in range(head_dim):
                out[b, h, p] = 0
            continue
        b_vec = B[b, h // heads_per_b]
        c_vec = C[b, h // heads_per_c]
        for p in range(head_dim):
            delta = dt[b, h, p] + dt_bias[h, p]
            if softplus and delta <= 20:
                delta = np.log1p(np.exp(delta))
            xv = x[b, h, p]
            dx = delta * xv
            h_row = state[slot, h, p]
            a_row = A[h, p]
            y = one - one
            for n in range(n_state):
                s = h_row[n] * np.exp(delta * a_row[n]) + dx * b_vec[n]
                h_row[n] = s
                y += s * c_vec[n]
            if has_D:
                y += D[h, p] * xv
            if has_z:
                zv = z[b, h, p]
                y = y * zv / (one + np.exp(-zv))
            out[b, h, p] = y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    dtype = compute_dtype(state, x, dt, B, C, z)
    out_shape, out_dtype = x.shape, x.dtype
    work, slots, touched = pool_rows(state, state_batch_indices, x.shape[0], dtype)
    if state.ndim == 3:
        # No heads: each channel is a head of dim 1.
        work4 = work[:, :, None, :]
        x, dt, A = x[:, :, None], dt[:, :, None], A[:, None, :]
        z = None if z is None else z[:, :, None]
        D = None if D is None else D[:, None]
        dt_bias = None if dt_bias is None else dt_bias[:, None]
        B = B[:, None, :] if B.ndim == 2 else B
        C = C[:, None, :] if C.ndim == 2 else C
    else:
        work4 = work
    heads = x.shape[1:]
    out = np.empty(x.shape, dtype)
    _state_update_kernel(
        work4, slots, to_compute(x, dtype), to_compute(dt, dtype), np.asarray(A, dtype),
        to_compute(B, dtype), to_compute(C, dtype),
        np.zeros((1, 1), dtype) if D is None else to_compute(D, dtype), D is not None,
        np.zeros((1, 1, 1), dtype) if z is None else to_compute(z, dtype), z is not None,
        np.zeros(heads, dtype) if dt_bias is None else to_compute(dt_bias, dtype),
        dt_softplus, dtype.type(1), out,
    )
    write_back(state, work, touched)
    return cast_out(out.reshape(out_shape), out_dtype)
