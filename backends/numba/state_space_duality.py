"""SSD (Mamba-2) on the CPU: the token-by-token recurrence, parallel over (batch, head) rows.

On a CPU the recurrence costs fewer FLOPs than the chunked "duality" form (about
4*P*N per token and head forward, with no chunk_size-dependent matmul work), so the
forward has no chunks. ``chunk_size`` is the checkpoint interval of the backward:
a first pass stores the state every chunk_size steps (B*H*P*N*ceil(L/chunk_size)
values), then each chunk is recomputed in blocks of about sqrt(chunk_size) steps
and walked in reverse; each thread holds about 2*sqrt(chunk_size) states, so the
backward never holds O(B*H*P*N*L).

Work decomposition: one prange iteration owns one (b, h) row and keeps its P x N
state in a private array. The forward stores it as (N, P) so that both the
update and y_t = h_t C_t are vector loops over p; the reverse pass keeps states
and their gradient as (P, N) so that dB, dC and the dA term are vector loops over
n, and only dx needs a dot product over n. Sums over rows (dB/dC over the heads
of a group, dA/dD/ddt_bias over the batch) go to per-row buffers and are reduced
afterwards, so no two threads write the same element.

Measured on the 2-core development machine (float32, B=1 L=2048 H=24 P=64 N=128,
CPU time of both threads, the machine shared): forward ~35 ms, ~65 ms with z (the
scalar exp of silu(z) is half of it); backward ~210 ms. The dot product of the
backward vectorised with reassociation only (``_dot``) took the backward from
~260 ms; reading only h_{t-1} in the reverse walk saved ~12% of its main loop.
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


@numba.njit(cache=True, fastmath={"reassoc"})
def _dot(a, b, zero):
    """sum(a * b) of two 1-d arrays; zero is a 0 of their dtype.

    The only fast-math flag is reassociation, so that the sum vectorises (five times
    faster than a scalar chain); it changes the rounding of the sum and nothing else
    (NaN and inf propagate as usual).
    """
    s = zero
    for i in range(a.shape[0]):
        s += a[i] * b[i]
    return s


@numba.njit(parallel=True, cache=True, fastmath=False)
def _forward_kernel(x, dt, A, B, C, D, dt_bias, reset, softplus, clamp, lo, hi, one, gate, has_gate,
                    initial, has_initial, ends, checkpoint_every, want_out, out, final, varlen, checkpoints):
    """out (b, l, h, p) = y * gate (gate = silu(z), when has_gate; out is skipped unless want_out);
    final (b, h, p, n); varlen (s, h, p, n) for row b = 0; checkpoints (b*h, c, p, n) = state before
    steps 0, k, 2k, ... (k = checkpoint_every) when c > 0."""
    batch, length, nheads, headdim = x.shape
    dstate = B.shape[3]
    heads_per_group = nheads // B.shape[2]
    store_checkpoints = checkpoints.shape[1] > 0
    for row in numba.prange(batch * nheads):
        b = row // nheads
        h = row % nheads
        g = h // heads_per_group
        A_h = A[h]
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
            decay = np.exp(d * A_h)
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
                    if has_gate:
                        v = v * gate[b, t, h, p]
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
def _backward_kernel(x, dt, A, B, C, D, dt_bias, reset, softplus, clamp, lo, hi, one, z, sigmoid_z, has_z,
                     dout, y, dfinal, has_dfinal, checkpoint_every, block, checkpoints,
                     dx, ddt, dB_heads, dC_heads, dz, dD_rows, dA_rows, ddt_bias_rows, dinitial):
    """Reverse pass. z, sigmoid(z) and y (b, l, h, p), the ungated output, are read only when has_z;
    checkpoints (b*h, c, p, n) from _forward_kernel.

    Each chunk of checkpoint_every steps is recomputed twice: once to keep the state
    every ``block`` steps, then block by block into a buffer of ``block`` states that
    stays in cache while the block is walked in reverse (a whole chunk of states
    would not fit in cache). The walk reads only h_{t-1}: with h_t = a h_{t-1} + dt x B^T,
    dC_t = h_t^T dy = a h_{t-1}^T dy + dt (x . dy) B_t, one state stream less.

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
        A_h = A[h]
        zero = one - one
        block_starts = np.empty((blocks_per_chunk, headdim, dstate), dtype=x.dtype)
        before = np.empty((block, headdim, dstate), dtype=x.dtype)  # h_{t-1} of each step of a block
        grad_state = np.empty((headdim, dstate), dtype=x.dtype)  # dL/dh_t (times carry, see below)
        for p in range(headdim):
            for n in range(dstate):
                grad_state[p, n] = dfinal[b, h, p, n] if has_dfinal else zero
        carry = one  # the gradient reaching h_{t-1} through the decay is carry * grad_state
        dy = np.empty(headdim, dtype=x.dtype)
        dy_B = np.empty(headdim, dtype=x.dtype)
        dB_t = np.empty(dstate, dtype=x.dtype)
        dy_before = np.empty(dstate, dtype=x.dtype)  # h_{t-1}^T dy
        decay_terms = np.empty(dstate, dtype=x.dtype)  # sums over p of dL/dh_t * h_{t-1}
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
                             np.exp(d * A_h), reset[b, t])
            for blk in range(nblocks - 1, -1, -1):
                t_begin = t0 + blk * block
                t_end = min(t_begin + block, t0 + steps)
                before[0, :, :] = block_starts[blk]
                for t in range(t_begin, t_end - 1):
                    d, _ = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
                    _advance(before[t - t_begin], before[t - t_begin + 1], x[b, t, h], B[b, t, g], d,
                             np.exp(d * A_h), reset[b, t])
                for t in range(t_end - 1, t_begin - 1, -1):
                    h_before = before[t - t_begin]
                    d, slope = _effective_dt(dt[b, t, h] + dt_bias[h], softplus, clamp, lo, hi, one)
                    decay = np.exp(d * A_h)
                    dy_x = zero
                    for p in range(headdim):
                        g_out = dout[b, t, h, p]
                        if has_z:
                            zv = z[b, t, h, p]
                            sig = sigmoid_z[b, t, h, p]
                            dz[b, t, h, p] = g_out * y[b, t, h, p] * (sig * (one + zv * (one - sig)))
                            g_out = g_out * (zv * sig)
                        dy[p] = g_out
                        dD_rows[row, p] += g_out * x[b, t, h, p]
                        dy_x += g_out * x[b, t, h, p]
                    for n in range(dstate):
                        dB_t[n] = zero
                        dy_before[n] = zero
                        decay_terms[n] = zero
                    for p in range(headdim):
                        dy_p = dy[p]
                        x_p = x[b, t, h, p]
                        for n in range(dstate):
                            # dL/dh_t = (what h_{t+1} sends back) + (what y_t sends back)
                            grad = carry * grad_state[p, n] + C[b, t, g, n] * dy_p
                            grad_state[p, n] = grad
                            dB_t[n] += grad * x_p
                            dy_before[n] += dy_p * h_before[p, n]
                            decay_terms[n] += grad * h_before[p, n]
                        dy_B[p] = _dot(grad_state[p], B[b, t, g], zero)
                    ddt_eff = zero
                    for p in range(headdim):
                        dx[b, t, h, p] = D[h, p] * dy[p] + d * dy_B[p]
                        ddt_eff += x[b, t, h, p] * dy_B[p]
                    new_sequence = reset[b, t]
                    for n in range(dstate):
                        dB_heads[b, t, h, n] = d * dB_t[n]
                        from_input = B[b, t, g, n] * (d * dy_x)
                        dC_heads[b, t, h, n] = from_input if new_sequence else decay * dy_before[n] + from_input
                    if new_sequence:
                        # h_t did not depend on h_{t-1}: nothing flows back across the reset.
                        grad_state[:, :] = zero
                        carry = one
                    else:
                        through_decay = zero
                        for n in range(dstate):
                            through_decay += decay_terms[n]
                        through_decay = through_decay * decay
                        ddt_eff += A_h * through_decay
                        dA_sum += d * through_decay
                        carry = decay
                    draw = ddt_eff * slope
                    ddt[b, t, h] = draw
                    ddt_bias_sum += draw
        for p in range(headdim):
            for n in range(dstate):
                dinitial[b, h, p, n] = carry * grad_state[p, n]
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
        D_c = to_compute(D, cdt)
        D_full[...] = D_c[:, None] if D_c.ndim == 1 else D_c  # (also for nheads == 0)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    return (
        to_compute(x, cdt), to_compute(dt, cdt), to_compute(A, cdt), to_compute(B, cdt), to_compute(C, cdt),
        D_full, to_compute(dt_bias, cdt) if dt_bias is not None else np.zeros(nheads, dtype=cdt),
        _resets(seq_idx, cu_seqlens, batch, length),
        bool(dt_softplus), (lo, hi) != _NO_LIMIT, cdt.type(lo), cdt.type(hi), cdt.type(1),
    )


def _sigmoid(z):
    """1 / (1 + e^-z) in z's dtype. NumPy's vectorised exp: the kernels' scalar exp per element of z
    took half of the forward."""
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-z))


def _silu(z):
    return z * _sigmoid(z)


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
                    *_optional(None if z is None else _silu(to_compute(z, cdt)), cdt, 4),
                    *_optional(initial_states, cdt, 4), ends, 1, True, out, final, varlen,
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
    sigmoid_z = _sigmoid(z_c) if has_z else z_c

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
    _backward_kernel(*common, z_c, sigmoid_z, has_z, to_compute(dout, cdt), y, *_optional(dfinal_states, cdt, 4),
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
