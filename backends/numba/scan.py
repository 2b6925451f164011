"""Selective scan (Mamba-1) on the CPU: Numba kernels and their launchers.

Work decomposition
- Forward: one ``prange`` iteration per (b, d) row. A row walks time once and keeps its state h (N
  values) in a small buffer; per step the loop over n (exp, state update) runs over contiguous
  memory and vectorises, then y_t = <C_t, h_t> is a short reduction over n.
- B and C reach the kernels as 4-d (Bb, Gx, Lx, N) arrays, N innermost: a constant (D, N) matrix is
  viewed as (1, D, 1, N) and indexed with batch and time multipliers 0, input-dependent (B, N, L) and
  (B, G, N, L) arrays are transposed once to (B, 1, L, N) / (B, G, L, N). One kernel covers every
  combination of constant / input-dependent / grouped B and C.
- exp: this machine's Numba has no SVML, so ``math.exp`` in the n loop stays scalar. float32 uses a
  Cephes-style polynomial (``_exp``) that LLVM vectorises; float64 keeps ``math.exp``.
- Backward: per row, a forward pass keeps the state only at chunk boundaries (every ``_CHUNK`` steps);
  then the chunks are walked in reverse, each one recomputed into a (_CHUNK, N) buffer, while the
  adjoint g_t = dLoss/dh_t is carried back in time. Per task: O(N * L / _CHUNK + _CHUNK * N) floats.
- Backward reductions without races: a task owns a block of channels that never straddles a group of
  an input-dependent B or C, so it sums the channels' dB/dC into its own partial slot
  (B, tasks per batch, L, N); dA, dD, ddelta_bias and constant dB/dC are written per (b, d). NumPy sums
  the partials afterwards (over the slots of a group, over the batch).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ._common import cast_out, compute_dtype, to_compute

# Steps between stored states in the backward pass.
_CHUNK = 64
# Backward tasks per thread we aim for (load balance with static scheduling).
_TASKS_PER_THREAD = 4

_EXP_HI = np.float32(88.72283)  # exp(x) overflows float32 above this
_EXP_LO = np.float32(-87.33654)  # exp(x) < FLT_MIN below this: returns 0 (flushes the subnormal range)


# ----------------------------------------------------------------------------- scalar helpers


def _exp(x):
    """exp(x) that LLVM can vectorise in float32 (accurate to about 1 ulp)."""
    raise NotImplementedError


def _softplus_slope(x):
    """(softplus(x), d softplus / dx); softplus(x) = x for x > 20."""
    raise NotImplementedError


def _sigmoid(x):
    raise NotImplementedError


def _zero_one(a):
    """0 and 1 of the array's element type (accumulators and constants keep the array's precision)."""
    raise NotImplementedError


@intrinsic
def _bits_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        value = args[0]
        if bits.bitwidth > 32:
            value = builder.trunc(value, ir.IntType(32))
        return builder.bitcast(value, context.get_value_type(types.float32))

    return types.float32(bits), codegen


@overload(_exp)
def _exp_impl(x):
    if x == types.float64:
        return lambda x: math.exp(x)
    if x != types.float32:
        return None
    f = np.float32

    def impl(x):
        # x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact k ln2), exp(r) by the Cephes
        # polynomial, 2**k from exponent bits in two halves so that k = 128 does not overflow.
        xc = min(max(x, _EXP_LO), _EXP_HI)
        k = math.floor(xc * f(1.4426950408889634) + f(0.5))
        r = xc - k * f(0.693359375) - k * f(-2.12194440e-4)
        p = f(1.9875691500e-4)
        p = p * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        p = p * r * r + r + f(1.0)
        ki = np.int64(k)
        half = ki >> 1
        y = p * _bits_as_float32((half + 127) << 23) * _bits_as_float32((ki - half + 127) << 23)
        if x > _EXP_HI:
            y = f(np.inf)
        if x < _EXP_LO:
            y = f(0.0)
        if x != x:
            y = x
        return y

    return impl


@overload(_softplus_slope)
def _softplus_slope_impl(x):
    if not isinstance(x, types.Float):
        return None
    one = as_dtype(x).type(1)
    threshold = as_dtype(x).type(20)

    def impl(x):
        if x > threshold:
            return x, one
        e = math.exp(x)
        return math.log1p(e), e / (one + e)

    return impl


@overload(_sigmoid)
def _sigmoid_impl(x):
    if not isinstance(x, types.Float):
        return None
    one = as_dtype(x).type(1)
    return lambda x: one / (one + math.exp(-x))


@overload(_zero_one)
def _zero_one_impl(a):
    zero, one = as_dtype(a.dtype).type(0), as_dtype(a.dtype).type(1)
    return lambda a: (zero, one)


# ----------------------------------------------------------------------------- kernels


@njit(parallel=True, cache=True, fastmath=False)
def _scan_fwd_kernel(u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z,
                     delta_bias, has_bias, softplus, h0, has_h0, out, last_state):
    nb, nd, L = u.shape
    N = A.shape[1]
    zero = _zero_one(u)[0]
    for row in prange(nb * nd):
        b = row // nd
        d = row - b * nd
        a = A[d]
        h = np.empty_like(a)
        if has_h0:
            h[:] = h0[b, d]
        else:
            h[:] = zero
        B_row = Bm[b * B_var, d // B_cpg]
        C_row = Cm[b * C_var, d // C_cpg]
        bias = delta_bias[d] if has_bias else zero
        for t in range(L):
            x = u[b, d, t]
            dt = delta[b, d, t] + bias
            if softplus:
                dt = _softplus_slope(dt)[0]
            b_t = B_row[t * B_var]
            c_t = C_row[t * C_var]
            dt_x = dt * x
            for n in range(N):
                h[n] = _exp(dt * a[n]) * h[n] + dt_x * b_t[n]
            y = zero
            for n in range(N):
                y += c_t[n] * h[n]
            if has_D:
                y += Dp[d] * x
            if has_z:
                zt = z[b, d, t]
                y = y * (zt * _sigmoid(zt))
            out[b, d, t] = y
        last_state[b, d] = h


@njit(parallel=True, cache=True, fastmath=False)
def _scan_bwd_kernel(dout, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z,
                     delta_bias, has_bias, softplus, h0, has_h0, dlast, has_dlast,
                     group, blocks, chunk,
                     du, ddelta, dz, dA_part, dB_const, dB_slots, dC_const, dC_slots, dD_part,
                     dbias_part, dh0):
    nb, nd, L = u.shape
    N = A.shape[1]
    zero, one = _zero_one(u)
    n_groups = nd // group
    tasks_per_batch = n_groups * blocks
    n_chunks = (L + chunk - 1) // chunk
    for task in prange(nb * tasks_per_batch):
        b = task // tasks_per_batch
        slot = task - b * tasks_per_batch
        first = (slot // blocks) * group
        block = slot % blocks
        d_begin = first + (block * group) // blocks
        d_end = first + ((block + 1) * group) // blocks
        # Per-task buffers, reused for every channel of the block.
        chunk_start = np.empty((max(n_chunks, 1), N), A.dtype)
        states = np.empty((chunk, N), A.dtype)
        decays = np.empty((chunk, N), A.dtype)
        dts = np.empty(chunk, A.dtype)
        slopes = np.empty(chunk, A.dtype)
        h = np.empty(N, A.dtype)
        carry = np.empty(N, A.dtype)
        dA_row = np.empty(N, A.dtype)
        for d in range(d_begin, d_end):
            a = A[d]
            B_row = Bm[b * B_var, d // B_cpg]
            C_row = Cm[b * C_var, d // C_cpg]
            dB_rows = dB_slots[b, slot] if B_var else dB_const[b, d]
            dC_rows = dC_slots[b, slot] if C_var else dC_const[b, d]
            bias = delta_bias[d] if has_bias else zero
            D_d = Dp[d] if has_D else zero
            # Forward, keeping the state at the start of each chunk (the last chunk is redone below).
            if has_h0:
                h[:] = h0[b, d]
            else:
                h[:] = zero
            for c in range(n_chunks - 1):
                chunk_start[c] = h
                for t in range(c * chunk, (c + 1) * chunk):
                    dt = delta[b, d, t] + bias
                    if softplus:
                        dt = _softplus_slope(dt)[0]
                    b_t = B_row[t * B_var]
                    dt_x = dt * u[b, d, t]
                    for n in range(N):
                        h[n] = _exp(dt * a[n]) * h[n] + dt_x * b_t[n]
            if n_chunks > 0:
                chunk_start[n_chunks - 1] = h
            # Reverse: recompute a chunk's states, then carry the adjoint back through it.
            if has_dlast:
                carry[:] = dlast[b, d]
            else:
                carry[:] = zero
            dA_row[:] = zero
            dD_sum = zero
            dbias_sum = zero
            for c in range(n_chunks - 1, -1, -1):
                t0 = c * chunk
                steps = min(chunk, L - t0)
                h[:] = chunk_start[c]
                for j in range(steps):
                    t = t0 + j
                    dt = delta[b, d, t] + bias
                    slope = one
                    if softplus:
                        dt, slope = _softplus_slope(dt)
                    dts[j] = dt
                    slopes[j] = slope
                    b_t = B_row[t * B_var]
                    dt_x = dt * u[b, d, t]
                    for n in range(N):
                        e = _exp(dt * a[n])
                        decays[j, n] = e
                        h[n] = e * h[n] + dt_x * b_t[n]
                        states[j, n] = h[n]
                for j in range(steps - 1, -1, -1):
                    t = t0 + j
                    x = u[b, d, t]
                    dt = dts[j]
                    b_t = B_row[t * B_var]
                    c_t = C_row[t * C_var]
                    h_t = states[j]
                    h_prev = states[j - 1] if j > 0 else chunk_start[c]
                    dy = dout[b, d, t]
                    if has_z:
                        y = zero
                        for n in range(N):
                            y += c_t[n] * h_t[n]
                        if has_D:
                            y += D_d * x
                        zt = z[b, d, t]
                        sig = _sigmoid(zt)
                        dz[b, d, t] = dy * y * (sig * (one + zt * (one - sig)))
                        dy = dy * (zt * sig)
                    du_t = zero
                    if has_D:
                        dD_sum += dy * x
                        du_t = dy * D_d
                    dt_x = dt * x
                    dB_t = dB_rows[t * B_var]
                    dC_t = dC_rows[t * C_var]
                    g_dot_B = zero
                    g_dot_Ah = zero
                    for n in range(N):
                        g = carry[n] + c_t[n] * dy
                        dC_t[n] += dy * h_t[n]
                        dB_t[n] += g * dt_x
                        w = g * decays[j, n] * h_prev[n]
                        dA_row[n] += w * dt
                        g_dot_Ah += w * a[n]
                        g_dot_B += g * b_t[n]
                        carry[n] = g * decays[j, n]
                    du[b, d, t] = du_t + dt * g_dot_B
                    ddt = (g_dot_Ah + x * g_dot_B) * slopes[j]
                    ddelta[b, d, t] = ddt
                    dbias_sum += ddt
            dA_part[b, d] = dA_row
            dD_part[b, d] = dD_sum
            dbias_part[b, d] = dbias_sum
            dh0[b, d] = carry


# ----------------------------------------------------------------------------- launchers


def _bc_layout(X, nd, dtype):
    """B or C as a (Bb, Gx, Lx, N) array with N innermost, its 0/1 batch-and-time multiplier and the
    number of channels that share one of its groups."""
    if X.ndim == 2:  # (D, N) constant
        return to_compute(X, dtype).reshape(1, nd, 1, X.shape[1]), 0, 1
    if X.ndim == 3:  # (B, N, L): one group
        X = X[:, None]
    groups = X.shape[1]
    return np.ascontiguousarray(X.transpose(0, 1, 3, 2), dtype=dtype), 1, nd // groups


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dtype):
    """Arguments shared by both kernels, in compute dtype; absent options become 1-element dummies."""
    nd = u.shape[1]
    N = A.shape[1]
    Bm, B_var, B_cpg = _bc_layout(B, nd, dtype)
    Cm, C_var, C_cpg = _bc_layout(C, nd, dtype)
    vec = np.zeros(1, dtype)
    seq = np.zeros((1, 1, 1), dtype)
    state = np.zeros((1, 1, max(N, 1)), dtype)
    return (
        to_compute(u, dtype), to_compute(delta, dtype), to_compute(A, dtype),
        Bm, B_var, B_cpg, Cm, C_var, C_cpg,
        vec if D is None else to_compute(D, dtype), D is not None,
        seq if z is None else to_compute(z, dtype), z is not None,
        vec if delta_bias is None else to_compute(delta_bias, dtype), delta_bias is not None,
        state if initial_state is None else to_compute(initial_state, dtype), initial_state is not None,
    )


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Numba forward of ``ssmcore.selective_scan`` (arguments already validated)."""
    dtype = compute_dtype(u)
    nb, nd, L = u.shape
    inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dtype)
    out = np.empty((nb, nd, L), dtype)
    last_state = np.empty((nb, nd, A.shape[1]), dtype)
    (u_, delta_, A_, Bm, B_var, B_cpg, Cm, C_var, C_cpg, D_, has_D, z_, has_z, bias_, has_bias,
     h0_, has_h0) = inputs
    _scan_fwd_kernel(u_, delta_, A_, Bm, B_var, B_cpg, Cm, C_var, C_cpg, D_, has_D, z_, has_z,
                     bias_, has_bias, bool(delta_softplus), h0_, has_h0, out, last_state)
    out = cast_out(out, u.dtype)
    return (out, last_state) if return_last_state else out


def _task_blocks(nb, nd, B, C):
    """(group, blocks): tasks own channel blocks that stay inside one group of every input-dependent
    B/C ("group" channels each, split in "blocks" pieces), enough of them to keep all threads busy."""
    group = 0
    for X in (B, C):
        if X.ndim > 2:
            group = math.gcd(group, nd // (1 if X.ndim == 3 else X.shape[1]))
    if group == 0:  # no input-dependent B/C: one channel per task
        return 1, 1
    want = _TASKS_PER_THREAD * numba.get_num_threads()
    per_batch_groups = nb * (nd // group)
    blocks = min(group, max(1, -(-want // max(per_batch_groups, 1))))
    return group, blocks


def _reduce_bc_grad(X, const_part, slots, nd):
    """dB or dC in X's layout from the kernel's partial sums."""
    if X.ndim == 2:
        return const_part[:, :, 0].sum(axis=0)
    nb, n_slots, L, N = slots.shape
    groups = 1 if X.ndim == 3 else X.shape[1]
    grad = slots.reshape(nb, groups, n_slots // groups, L, N).sum(axis=2).transpose(0, 1, 3, 2)
    return grad[:, 0] if X.ndim == 3 else grad


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, dlast_state=None):
    """Numba backward of ``ssmcore.selective_scan``: a tuple (du, ddelta, dA, dB, dC, dD, dz,
    ddelta_bias, dinitial_state), None for inputs that were None."""
    dtype = compute_dtype(u)
    nb, nd, L = u.shape
    N = A.shape[1]
    inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, dtype)
    group, blocks = _task_blocks(nb, nd, B, C)
    n_slots = (nd // group) * blocks if nd else 0
    du = np.empty((nb, nd, L), dtype)
    ddelta = np.empty((nb, nd, L), dtype)
    dz = np.empty((nb, nd, L), dtype) if z is not None else np.empty((1, 1, 1), dtype)
    dA_part = np.empty((nb, nd, N), dtype)
    dD_part = np.empty((nb, nd), dtype)
    dbias_part = np.empty((nb, nd), dtype)
    dh0 = np.empty((nb, nd, N), dtype)
    const_shape, slots_shape, unused = (nb, nd, 1, N), (nb, n_slots, L, N), (1, 1, 1, max(N, 1))
    dB_const = np.zeros(const_shape if B.ndim == 2 else unused, dtype)
    dB_slots = np.zeros(slots_shape if B.ndim > 2 else unused, dtype)
    dC_const = np.zeros(const_shape if C.ndim == 2 else unused, dtype)
    dC_slots = np.zeros(slots_shape if C.ndim > 2 else unused, dtype)
    dlast = np.zeros((1, 1, max(N, 1)), dtype) if dlast_state is None else to_compute(dlast_state, dtype)
    _scan_bwd_kernel(to_compute(dout, dtype), *inputs[:15], bool(delta_softplus), *inputs[15:],
                     dlast, dlast_state is not None, group, blocks, _CHUNK,
                     du, ddelta, dz, dA_part, dB_const, dB_slots, dC_const, dC_slots, dD_part,
                     dbias_part, dh0)
    return (
        cast_out(du, u.dtype),
        cast_out(ddelta, delta.dtype),
        cast_out(dA_part.sum(axis=0), A.dtype),
        cast_out(_reduce_bc_grad(B, dB_const, dB_slots, nd), B.dtype),
        cast_out(_reduce_bc_grad(C, dC_const, dC_slots, nd), C.dtype),
        None if D is None else cast_out(dD_part.sum(axis=0), D.dtype),
        None if z is None else cast_out(dz, z.dtype),
        None if delta_bias is None else cast_out(dbias_part.sum(axis=0), delta_bias.dtype),
        None if initial_state is None else cast_out(dh0, initial_state.dtype),
    )
