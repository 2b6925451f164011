"""SSD (Mamba-2) on the CPU: the token-by-token recurrence, parallel over (batch, head) rows.

On a CPU the recurrence costs fewer FLOPs than the chunked "duality" form (about
4*P*N per token and head forward, against the chunk-size-dependent matmul work),
so there are no chunks in the forward. ``chunk_size`` is the checkpoint interval
of the backward: the forward of the backward stores the state every chunk_size
steps (memory B*H*P*N*ceil(L/chunk_size)), then each chunk is recomputed and
walked in reverse with a per-thread buffer of chunk_size+1 states.

Work decomposition: one prange iteration owns one (b, h) row and keeps its P x N
state in a private array. The forward stores it as (N, P) so that both the
update and y_t = h_t C_t are vector loops over p; the reverse pass keeps states
and their gradient as (P, N) so that dB, dC and the dA term are vector loops over
n, and only dx needs a dot product over n. Sums over rows (dB/dC over the heads
of a group, dA/dD/ddt_bias over the batch) go to per-row buffers and are reduced
afterwards, so no two threads write the same element.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ._common import cast_out, compute_dtype, to_compute

_NO_LIMIT = (0.0, math.inf)


@numba.njit(inline="always")
def _effective_dt(raw, softplus, clamp, lo, hi, one):
    """dt' from dt + dt_bias, and d dt' / d raw (0 where the clamp bites)."""
    d = raw
    slope = one
    if softplus and raw <= 20.0:
        e = np.exp(raw)
        d = np.log1p(e)
        slope = one / (one + one / e)
    if clamp:
        if d < lo:
            d = lo
            slope = slope - slope
        elif d > hi:
            d = hi
            slope = slope - slope
    return d, slope


@numba.njit(inline="always")
def _dot(a, b, n, z):
    """sum(a[:n] * b[:n]) with eight partial sums (a single running sum is latency bound); z is a typed 0."""
    s0 = z; s1 = z; s2 = z; s3 = z; s4 = z; s5 = z; s6 = z; s7 = z  # noqa: E702
    i = 0
    while i + 8 <= n:
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
        i += 8
    while i < n:
        s0 += a[i] * b[i]
        i += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(x, dt, A, B, C, D, dt_bias, reset, softplus, clamp, lo, hi, one, z, has_z,
                    initial, has_initial, ends, checkpoint_every, want_out, out, final, varlen, checkpoints):
    """out (b, l, h, p) = gated y (skipped unless want_out); final (b, h, p, n); varlen (s, h, p, n)
    for row b = 0; checkpoints (b*h, c, p, n) = state before steps 0, k, 2k, ... (k = checkpoint_every)
    when c > 0."""
    batch, length, nheads, headdim = x.shape
    dstate = B.shape[3]
    heads_per_group = nheads // B.shape[2]
    store_checkpoints = checkpoints.shape[1] > 0
    for row in numba.prange(batch * nheads):
        b = row // nheads
        h = row % nheads
        g = h // heads_per_group
        a_log = A[h]
        zero = one - one
        state = np.empty((dstate, headdim), dtype=x.dtype)  # (n, p): vector loops over p
        for p in range(headdim):
            for n in range(dstate):
                state[n, p] = initial[b, h, p, n] if has_initial else zero
        x_dt = np.empty(headdim, dtype=x.dtype)
        y = np.empty(headdim, dtype=x.dtype)
        next_end = 0
        for t in range(length):
            if store_checkpoints and t % checkpoint_every == 0:
                for p in range(headdim):
                    for n in range(dstate):
                        checkpoints[row, t // checkpoint_every, p, n] = state[n, p]
            d, _ = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
            decay = np.exp(d * a_log)
            if reset[b, t]:
                state[:, :] = zero
                decay = zero
            for p in range(headdim):
                x_dt[p] = d * x[b, t, h, p]
                y[p] = zero
            for n in range(dstate):
                b_n = B[b, t, g, n]
                if want_out:
                    c_n = C[b, t, g, n]
                    for p in range(headdim):
                        s = decay * state[n, p] + b_n * x_dt[p]
                        state[n, p] = s
                        y[p] += c_n * s
                else:
                    for p in range(headdim):
                        state[n, p] = decay * state[n, p] + b_n * x_dt[p]
            if want_out:
                for p in range(headdim):
                    v = y[p] + D[h, p] * x[b, t, h, p]
                    if has_z:
                        zv = z[b, t, h, p]
                        v = v * (zv / (one + np.exp(-zv)))
                    out[b, t, h, p] = v
            while next_end < ends.shape[0] and ends[next_end] == t:
                for p in range(headdim):
                    for n in range(dstate):
                        varlen[next_end, h, p, n] = state[n, p]
                next_end += 1
        for p in range(headdim):
            for n in range(dstate):
                final[b, h, p, n] = state[n, p]


@numba.njit(inline="always")
def _advance(before, after, x_t, B_t, d, decay, new_sequence):
    """after = decay * before + d * x_t B_t^T, states (p, n); before is ignored at a sequence start."""
    for p in range(before.shape[0]):
        x_dt = d * x_t[p]
        if new_sequence:
            for n in range(before.shape[1]):
                after[p, n] = B_t[n] * x_dt
        else:
            for n in range(before.shape[1]):
                after[p, n] = decay * before[p, n] + B_t[n] * x_dt


@numba.njit(parallel=True, cache=True, fastmath=False)
def _backward_kernel(x, dt, A, B, C, D, dt_bias, reset, softplus, clamp, lo, hi, one, z, has_z,
                     dout, y, dfinal, has_dfinal, checkpoint_every, block, checkpoints,
                     dx, ddt, dB_heads, dC_heads, dz, dD_rows, dA_rows, ddt_bias_rows, dinitial):
    """Reverse pass. y (b, l, h, p) is the ungated output; checkpoints from _forward_kernel.

    Each chunk of checkpoint_every steps is recomputed twice: once to keep the state
    every ``block`` steps, then block by block into a buffer of block+1 states that
    stays in cache while the block is walked in reverse (a whole chunk of states
    would not fit in cache).

    Writes dx, ddt, dz and dinitial (b, h, p, n) directly, dB/dC per head (b, l, h, n),
    and per-row partial sums dD_rows (b*h, p), dA_rows (b*h,), ddt_bias_rows (b*h,).
    """
    batch, length, nheads, headdim = x.shape
    dstate = B.shape[3]
    heads_per_group = nheads // B.shape[2]
    nchunks = checkpoints.shape[1]
    blocks_per_chunk = -(-min(checkpoint_every, length) // block)
    for row in numba.prange(batch * nheads):
        b = row // nheads
        h = row % nheads
        g = h // heads_per_group
        a_log = A[h]
        zero = one - one
        block_starts = np.empty((blocks_per_chunk, headdim, dstate), dtype=x.dtype)
        # states[j] = state before step j of the current block, (p, n) layout
        states = np.empty((block + 1, headdim, dstate), dtype=x.dtype)
        dstate_t = np.empty((headdim, dstate), dtype=x.dtype)  # dL/dh_t, times carry below
        for p in range(headdim):
            for n in range(dstate):
                dstate_t[p, n] = dfinal[b, h, p, n] if has_dfinal else zero
        carry = one  # the gradient reaching h_{t-1} is carry * dstate_t
        dy = np.empty(headdim, dtype=x.dtype)
        dy_B = np.empty(headdim, dtype=x.dtype)
        dB_t = np.empty(dstate, dtype=x.dtype)
        dC_t = np.empty(dstate, dtype=x.dtype)
        decay_terms = np.empty(dstate, dtype=x.dtype)
        dA_sum = zero
        ddt_bias_sum = zero
        for p in range(headdim):
            dD_rows[row, p] = zero
        for chunk in range(nchunks - 1, -1, -1):
            t0 = chunk * checkpoint_every
            steps = min(checkpoint_every, length - t0)
            nblocks = -(-steps // block)
            block_starts[0, :, :] = checkpoints[row, chunk]
            for blk in range(1, nblocks):
                block_starts[blk, :, :] = block_starts[blk - 1]
                for t in range(t0 + (blk - 1) * block, t0 + blk * block):
                    d, _ = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
                    _advance(block_starts[blk], block_starts[blk], x[b, t, h], B[b, t, g], d,
                             np.exp(d * a_log), reset[b, t])
            for blk in range(nblocks - 1, -1, -1):
                t_begin = t0 + blk * block
                t_end = min(t_begin + block, t0 + steps)
                states[0, :, :] = block_starts[blk]
                for t in range(t_begin, t_end):
                    d, _ = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
                    _advance(states[t - t_begin], states[t - t_begin + 1], x[b, t, h], B[b, t, g], d,
                             np.exp(d * a_log), reset[b, t])
                for t in range(t_end - 1, t_begin - 1, -1):
                    k = t - t_begin
                    d, slope = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
                    decay = np.exp(d * a_log)
                    for p in range(headdim):
                        g_out = dout[b, t, h, p]
                        if has_z:
                            zv = z[b, t, h, p]
                            sig = one / (one + np.exp(-zv))
                            dz[b, t, h, p] = g_out * y[b, t, h, p] * (sig * (one + zv * (one - sig)))
                            g_out = g_out * (zv * sig)
                        dy[p] = g_out
                        dD_rows[row, p] += g_out * x[b, t, h, p]
                    for n in range(dstate):
                        dB_t[n] = zero
                        dC_t[n] = zero
                        decay_terms[n] = zero
                    for p in range(headdim):
                        dy_p = dy[p]
                        x_p = x[b, t, h, p]
                        for n in range(dstate):
                            # dL/dh_t = (what h_{t+1} sends back) + (what y_t sends back)
                            grad = carry * dstate_t[p, n] + C[b, t, g, n] * dy_p
                            dstate_t[p, n] = grad
                            dB_t[n] += grad * x_p
                            dC_t[n] += dy_p * states[k + 1, p, n]
                            decay_terms[n] += grad * states[k, p, n]
                        dy_B[p] = _dot(dstate_t[p], B[b, t, g], dstate, zero)
                    ddt_eff = zero
                    for p in range(headdim):
                        dx[b, t, h, p] = D[h, p] * dy[p] + d * dy_B[p]
                        ddt_eff += x[b, t, h, p] * dy_B[p]
                    for n in range(dstate):
                        dB_heads[b, t, h, n] = d * dB_t[n]
                        dC_heads[b, t, h, n] = dC_t[n]
                    if reset[b, t]:
                        # h_t did not depend on h_{t-1}: nothing flows back across the reset.
                        dstate_t[:, :] = zero
                        carry = one
                    else:
                        through_decay = zero
                        for n in range(dstate):
                            through_decay += decay_terms[n]
                        through_decay = through_decay * decay
                        ddt_eff += a_log * through_decay
                        dA_sum += d * through_decay
                        carry = decay
                    draw = ddt_eff * slope
                    ddt[b, t, h] = draw
                    ddt_bias_sum += draw
        for p in range(headdim):
            for n in range(dstate):
                dinitial[b, h, p, n] = carry * dstate_t[p, n]
        dA_rows[row] = dA_sum
        ddt_bias_rows[row] = ddt_bias_sum


def _resets(seq_idx, cu_seqlens, batch, length):
    """(b, l) bool: True where a new sequence starts (never at t = 0)."""
    reset = np.zeros((batch, length), dtype=np.bool_)
    if seq_idx is not None:
        reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    elif cu_seqlens is not None:
        reset[0, np.asarray(cu_seqlens[1:-1], dtype=np.int64)] = True
    return reset


def _common_arguments(cdt, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, seq_idx, cu_seqlens):
    """The arguments both kernels start with, in the compute dtype; absent options become neutral values."""
    batch, length, nheads, headdim = x.shape
    D_full = np.zeros((nheads, headdim), dtype=cdt)  # per head or per channel -> per channel
    if D is not None:
        D_full[...] = to_compute(D, cdt).reshape(nheads, -1)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return (
        to_compute(x, cdt), to_compute(dt, cdt), to_compute(A, cdt), to_compute(B, cdt), to_compute(C, cdt),
        D_full, to_compute(dt_bias, cdt) if dt_bias is not None else np.zeros(nheads, dtype=cdt),
        _resets(seq_idx, cu_seqlens, batch, length),
        bool(dt_softplus), (lo, hi) != _NO_LIMIT, cdt.type(lo), cdt.type(hi), cdt.type(1),
    )


def _optional(a, cdt, ndim):
    """(array in the compute dtype, True), or (a dummy, False) for an absent option."""
    if a is None:
        return np.zeros((1,) * ndim, dtype=cdt), False
    return to_compute(a, cdt), True


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False, state_dtype=None):
    """Numba SSD forward; arguments already validated by ssmcore.ops.ssd.ssd."""
    cdt = compute_dtype(x, dt, B, C, z)
    batch, length, nheads, headdim = x.shape
    dstate = B.shape[3]
    ends = (np.asarray(cu_seqlens[1:], dtype=np.int64) - 1) if return_varlen_states else np.zeros(0, np.int64)
    out = np.empty((batch, length, nheads, headdim), dtype=cdt)
    final = np.empty((batch, nheads, headdim, dstate), dtype=cdt)
    varlen = np.empty((ends.shape[0], nheads, headdim, dstate), dtype=cdt)
    _forward_kernel(*_common_arguments(cdt, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, seq_idx, cu_seqlens),
                    *_optional(z, cdt, 4), *_optional(initial_states, cdt, 4), ends, 1, True, out, final, varlen,
                    np.zeros((0, 0, 0, 0), dtype=cdt))
    state_dtype = cdt if state_dtype is None else np.dtype(state_dtype)
    result = [cast_out(out, x.dtype)]
    if return_final_states:
        result.append(cast_out(final, state_dtype))
    if return_varlen_states:
        result.append(cast_out(varlen, state_dtype))
    return result[0] if len(result) == 1 else tuple(result)


def ssd_bwd(dout, x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
            dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None, dfinal_states=None):
    """Numba SSD backward; returns the gradients in SSDGrads order (dx, ddt, dA, dB, dC, dD, dz,
    ddt_bias, dinitial_states), None for absent inputs, each in its input's dtype."""
    cdt = compute_dtype(x, dt, B, C, z, dout)
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    rows = batch * nheads
    common = _common_arguments(cdt, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit, seq_idx, cu_seqlens)
    z_c, has_z = _optional(z, cdt, 4)

    # Forward again for the checkpoints that seed the reverse pass, and (without the gate) the y
    # that dz needs.
    y = np.empty((batch, length, nheads, headdim) if has_z else (1, 1, 1, 1), dtype=cdt)
    checkpoints = np.empty((rows, -(-length // chunk_size), headdim, dstate), dtype=cdt)
    _forward_kernel(*common, z_c, False, *_optional(initial_states, cdt, 4), np.zeros(0, np.int64), chunk_size,
                    has_z, y, np.empty((batch, nheads, headdim, dstate), dtype=cdt),
                    np.empty((0, nheads, headdim, dstate), dtype=cdt), checkpoints)

    dx = np.empty((batch, length, nheads, headdim), dtype=cdt)
    ddt = np.empty((batch, length, nheads), dtype=cdt)
    dB_heads = np.empty((batch, length, nheads, dstate), dtype=cdt)
    dC_heads = np.empty((batch, length, nheads, dstate), dtype=cdt)
    dz = np.empty((batch, length, nheads, headdim) if has_z else (1, 1, 1, 1), dtype=cdt)
    dD_rows = np.empty((rows, headdim), dtype=cdt)
    dA_rows = np.empty(rows, dtype=cdt)
    ddt_bias_rows = np.empty(rows, dtype=cdt)
    dinitial = np.empty((batch, nheads, headdim, dstate), dtype=cdt)
    # Blocks of about sqrt(chunk_size) steps keep the recomputed states in cache.
    block = max(1, math.isqrt(chunk_size))
    _backward_kernel(*common, z_c, has_z, to_compute(dout, cdt), y, *_optional(dfinal_states, cdt, 4),
                     chunk_size, block, checkpoints,
                     dx, ddt, dB_heads, dC_heads, dz, dD_rows, dA_rows, ddt_bias_rows, dinitial)

    def per_group(a):
        return a.reshape(batch, length, ngroups, nheads // ngroups, dstate).sum(axis=3)

    dD = None
    if D is not None:
        dD = dD_rows.reshape(batch, nheads, headdim).sum(axis=0)
        if D.ndim == 1:
            dD = dD.sum(axis=1)
    return (
        cast_out(dx, x.dtype),
        cast_out(ddt, dt.dtype),
        cast_out(dA_rows.reshape(batch, nheads).sum(axis=0), A.dtype),
        cast_out(per_group(dB_heads), B.dtype),
        cast_out(per_group(dC_heads), C.dtype),
        cast_out(dD, D.dtype) if D is not None else None,
        cast_out(dz, z.dtype) if z is not None else None,
        cast_out(ddt_bias_rows.reshape(batch, nheads).sum(axis=0), dt_bias.dtype) if dt_bias is not None else None,
        cast_out(dinitial, initial_states.dtype) if initial_states is not None else None,
    )
