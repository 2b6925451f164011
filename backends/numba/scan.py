"""Selective scan (Mamba-1) on the CPU: Numba kernels and their launchers.

Work decomposition
- Forward: one ``prange`` iteration per (b, d) row. A row first computes dt for all its steps (a loop
  without a dependence between steps, so softplus vectorises), then walks time keeping its state h
  (N values) in a small buffer: per step the loop over n (exp, state update) runs over contiguous
  memory and vectorises, and y_t = <C_t, h_t> is a vector dot product (``_dot``). D * u and the
  silu(z) gate are applied afterwards in vectorised loops over the row.
- B and C reach the kernels as 4-d (Bb, Gx, Lx, N) arrays, N innermost: a constant (D, N) matrix is
  viewed as (1, D, 1, N) and indexed with batch and time multipliers 0, input-dependent (B, N, L) and
  (B, G, N, L) arrays are transposed once to (B, 1, L, N) / (B, G, L, N). One kernel covers every
  combination of constant / input-dependent / grouped B and C.
- Vectorisation without fastmath (kernels keep IEEE semantics, NaN/inf propagate): this Numba has no
  SVML, so ``math.exp`` would stay scalar; float32 uses polynomial ``_exp``/``_log1p`` that LLVM
  vectorises (about 1 ulp), float64 keeps ``math``. error_model="numpy" keeps Python's
  ZeroDivisionError check (a branch) out of the loops. ``_dot`` sums in a fixed vector order.
- Backward: per row, a forward pass keeps the state only at chunk boundaries (every ``_CHUNK`` steps);
  then the chunks are walked in reverse, each one recomputed into (_CHUNK, N) buffers of states and
  decays, while the adjoint g_t = dLoss/dh_t is carried back in time. Per task the buffers hold
  O(N * L / _CHUNK + _CHUNK * N + L) floats; nothing of size B * D * N * L is stored.
- Backward reductions without races: a task owns a block of channels that never straddles a group of
  an input-dependent B or C, and sums its channels' dB/dC into its own partial slot (B, slots, L, N);
  slots per group are few (enough tasks for the threads), so the partials are at most the size of the
  finest-grouped B/C input. dA, dD, ddelta_bias and constant dB/dC are written per (b, d) row. NumPy
  sums the partials afterwards (over the slots of a group, over the batch).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ._common import cast_out, compute_dtype, to_compute

# Steps between stored states in the backward pass.
_CHUNK = 64
# Backward tasks per thread we aim for (load balance with static scheduling).
_TASKS_PER_THREAD = 4

# _exp clamps its argument to [-104, 89]: exp(-104) rounds to 0 and exp(89) to inf in float32.
_EXP_LO = np.float32(-104.0)
_EXP_HI = np.float32(89.0)


# ----------------------------------------------------------------------------- scalar helpers


def _exp(x):
    """exp(x) that LLVM can vectorise in float32 (about 1 ulp; inf, -inf, NaN and subnormal results
    as IEEE exp gives them)."""
    raise NotImplementedError


def _log1p(x):
    """log(1 + x) for finite x >= 0 that LLVM can vectorise in float32 (accurate to about 1 ulp)."""
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


@intrinsic
def _times_exp2(typingctx, p, k):
    """p * 2**k for a float32 k holding an integer in [-252, 254]: 2**k from exponent bits in 32-bit
    integer math (Numba would widen it to 64 bits, halving the vector width), applied as two factors
    so that neither overflows the exponent field and p * 2**k rounds only once."""
    if p != types.float32 or k != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        f32 = context.get_value_type(types.float32)
        ki = builder.fptosi(args[1], i32)
        half = builder.ashr(ki, ir.Constant(i32, 1))

        def pow2(e):
            biased = builder.add(e, ir.Constant(i32, 127))
            return builder.bitcast(builder.shl(biased, ir.Constant(i32, 23)), f32)

        return builder.fmul(builder.fmul(args[0], pow2(half)), pow2(builder.sub(ki, half)))

    return types.float32(p, k), codegen


@intrinsic
def _float32_bits(typingctx, value):
    """The bits of a float32 as an int32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(value), codegen


@intrinsic
def _dot(typingctx, x, y):
    """sum_n x[n] y[n] of two contiguous 1-d arrays of one float type, in a fixed order that
    vectorises without fastmath: lane-wise sums over blocks of one 512-bit vector, a halving tree
    over the lanes, then the tail in sequence. (Numba's sequential sum would not vectorise, and at
    N = 16 the reduction would cost more than the exp and state update together.)"""
    if not (isinstance(x, types.Array) and x == y and x.ndim == 1 and x.layout == "C"
            and isinstance(x.dtype, types.Float)):
        return None
    lanes = 512 // x.dtype.bitwidth

    def codegen(context, builder, signature, args):
        ftype = context.get_value_type(x.dtype)
        vtype = ir.VectorType(ftype, lanes)
        xs = context.make_array(x)(context, builder, args[0])
        ys = context.make_array(y)(context, builder, args[1])
        size = builder.extract_value(xs.shape, 0)
        blocks = builder.udiv(size, ir.Constant(size.type, lanes))
        acc = cgutils.alloca_once_value(builder, ir.Constant(vtype, None))
        with cgutils.for_range(builder, blocks) as loop:
            offset = builder.mul(loop.index, ir.Constant(size.type, lanes))
            vx = builder.load(builder.bitcast(builder.gep(xs.data, [offset]), vtype.as_pointer()), align=4)
            vy = builder.load(builder.bitcast(builder.gep(ys.data, [offset]), vtype.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(vx, vy)), acc)
        total = builder.load(acc)
        width = lanes
        while width > 1:
            width //= 2
            mask = ir.VectorType(ir.IntType(32), width)
            low = builder.shuffle_vector(total, total, ir.Constant(mask, list(range(width))))
            high = builder.shuffle_vector(total, total, ir.Constant(mask, list(range(width, 2 * width))))
            total = builder.fadd(low, high)
        result = cgutils.alloca_once_value(builder, builder.extract_element(total, ir.Constant(ir.IntType(32), 0)))
        start = builder.mul(blocks, ir.Constant(size.type, lanes))
        with cgutils.for_range_slice(builder, start, size, ir.Constant(size.type, 1)) as (index, _):
            product = builder.fmul(builder.load(builder.gep(xs.data, [index])),
                                   builder.load(builder.gep(ys.data, [index])))
            builder.store(builder.fadd(builder.load(result), product), result)
        return builder.load(result)

    return x.dtype(x, y), codegen


@overload(_exp)
def _exp_impl(x):
    if x == types.float64:
        return lambda x: math.exp(x)
    if x != types.float32:
        return None
    f = np.float32

    def impl(x):
        # x = k ln2 + r with |r| <= ln2 / 2 (ln2 split in two for an exact k ln2), exp(r) by the Cephes
        # polynomial, times 2**k, which overflows to inf / underflows to subnormals and 0 by itself.
        xc = min(max(x, _EXP_LO), _EXP_HI)
        k = np.floor(xc * f(1.4426950408889634) + f(0.5))
        r = xc - k * f(0.693359375) - k * f(-2.12194440e-4)
        p = f(1.9875691500e-4)
        p = p * r + f(1.3981999507e-3)
        p = p * r + f(8.3334519073e-3)
        p = p * r + f(4.1665795894e-2)
        p = p * r + f(1.6666665459e-1)
        p = p * r + f(5.0000001201e-1)
        p = p * r * r + r + f(1.0)
        y = _times_exp2(p, k)
        return x if x != x else y

    return impl


@overload(_log1p, inline="always")
def _log1p_impl(x):
    if x == types.float64:
        return lambda x: math.log1p(x)
    if x != types.float32:
        return None
    f = np.float32

    def impl(x):
        # w = 1 + x = 2**k m with m in [sqrt(1/2), sqrt(2)) (musl's offset trick, no branch), log(m) by
        # the Cephes polynomial in m - 1, then log1p(x) = log(w) + (x - (w - 1)) / w corrects the
        # rounding of 1 + x. Domain: 0 <= x < inf (NaN propagates).
        w = f(1.0) + x
        bits = np.int64(_float32_bits(w)) + (0x3F800000 - 0x3F3504F3)
        k = f((bits >> 23) - 127)
        r = _bits_as_float32((bits & 0x7FFFFF) + 0x3F3504F3) - f(1.0)
        r2 = r * r
        p = f(7.0376836292e-2)
        p = p * r - f(1.1514610310e-1)
        p = p * r + f(1.1676998740e-1)
        p = p * r - f(1.2420140846e-1)
        p = p * r + f(1.4249322787e-1)
        p = p * r - f(1.6668057665e-1)
        p = p * r + f(2.0000714765e-1)
        p = p * r - f(2.4999993993e-1)
        p = p * r + f(3.3333331174e-1)
        y = p * r * r2 + k * f(-2.12194440e-4) - f(0.5) * r2 + r + k * f(0.693359375)
        return y + (x - (w - f(1.0))) / w

    return impl


@overload(_softplus_slope, inline="always")
def _softplus_slope_impl(x):
    if not isinstance(x, types.Float):
        return None
    zero, one = as_dtype(x).type(0), as_dtype(x).type(1)
    threshold = as_dtype(x).type(20)
    huge = as_dtype(x).type(1e30)

    def impl(x):
        # Branch-free (this is inlined into vectorised loops): above the threshold, `above` is huge,
        # so e = 0, softplus = max(x, 0) = x and the slope clips to 1; at or below it, above = 0 and
        # max(x, log1p(exp(x))) = log1p(exp(x)).
        above = max(x - threshold, zero) * huge
        e = _exp(min(x, threshold) - above)
        return max(x, _log1p(e)), min(e / (one + e) + above, one)

    return impl


@overload(_sigmoid, inline="always")
def _sigmoid_impl(x):
    if not isinstance(x, types.Float):
        return None
    one = as_dtype(x).type(1)
    return lambda x: one / (one + _exp(-x))


@overload(_zero_one, inline="always")
def _zero_one_impl(a):
    zero, one = as_dtype(a.dtype).type(0), as_dtype(a.dtype).type(1)
    return lambda a: (zero, one)


# ----------------------------------------------------------------------------- kernels


@njit(cache=True, error_model="numpy")
def _row_steps(delta, bias, softplus, dt_row, slope_row):
    """dt for every step of one row (and d dt / d(delta + bias) when slope_row has room), in
    loops without a dependence between steps, so that they vectorise."""
    if not softplus:
        for t in range(delta.size):
            dt_row[t] = delta[t] + bias
    elif slope_row.size:
        for t in range(delta.size):
            dt_row[t], slope_row[t] = _softplus_slope(delta[t] + bias)
    else:
        for t in range(delta.size):
            dt_row[t] = _softplus_slope(delta[t] + bias)[0]


@njit(cache=True, error_model="numpy")
def _fwd_row(b, d, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z, delta_bias,
             has_bias, softplus, h0, has_h0, out, last_state):
    """One (b, d) row of the forward: out[b, d] and last_state[b, d]."""
    zero = _zero_one(u)[0]
    a = A[d]
    u_row = u[b, d]
    out_row = out[b, d]
    dt_row = np.empty_like(u_row)
    _row_steps(delta[b, d], delta_bias[d] if has_bias else zero, softplus, dt_row, dt_row[:0])
    h = np.empty_like(a)
    if has_h0:
        h[:] = h0[b, d]
    else:
        h[:] = zero
    B_row = Bm[b * B_var, d // B_cpg]
    C_row = Cm[b * C_var, d // C_cpg]
    for t in range(u_row.size):
        dt = dt_row[t]
        dt_x = dt * u_row[t]
        b_t = B_row[t * B_var]
        for n in range(a.size):
            h[n] = _exp(dt * a[n]) * h[n] + dt_x * b_t[n]
        out_row[t] = _dot(C_row[t * C_var], h)
    last_state[b, d] = h
    if has_D:
        D_d = Dp[d]
        for t in range(u_row.size):
            out_row[t] += D_d * u_row[t]
    if has_z:
        z_row = z[b, d]
        for t in range(u_row.size):
            out_row[t] *= z_row[t] * _sigmoid(z_row[t])


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_fwd_kernel(u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z,
                     delta_bias, has_bias, softplus, h0, has_h0, out, last_state):
    nb, nd = u.shape[:2]
    for row in prange(nb * nd):
        _fwd_row(row // nd, row % nd, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z,
                 has_z, delta_bias, has_bias, softplus, h0, has_h0, out, last_state)


@njit(cache=True, error_model="numpy")
def _bwd_row(b, d, slot, dout, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z,
             delta_bias, has_bias, softplus, h0, has_h0, dlast, has_dlast, buffers,
             du, ddelta, dz, dA_part, dB_const, dB_slots, dC_const, dC_slots, dD_part, dbias_part, dh0):
    """One (b, d) row of the backward. Its dB/dC go to partial slot ``slot`` when B/C are
    input-dependent, to dB_const[b, d] / dC_const[b, d] when they are constant."""
    chunk_start, states, decays, dt_row, slope_row, gate_row, g, w, h, carry, dA_row = buffers
    zero, one = _zero_one(u)
    chunk = states.shape[0]
    L = u.shape[2]
    N = A.shape[1]
    n_chunks = (L + chunk - 1) // chunk
    a = A[d]
    u_row = u[b, d]
    dout_row = dout[b, d]
    B_row = Bm[b * B_var, d // B_cpg]
    C_row = Cm[b * C_var, d // C_cpg]
    dB_rows = dB_slots[b, slot] if B_var else dB_const[b, d]
    dC_rows = dC_slots[b, slot] if C_var else dC_const[b, d]
    D_d = Dp[d] if has_D else zero
    _row_steps(delta[b, d], delta_bias[d] if has_bias else zero, softplus, dt_row,
               slope_row if softplus else slope_row[:0])
    if has_z:
        # out = y * silu(z): dy = dout * silu(z); dz = dout * y * silu'(z), y recomputed below.
        z_row = z[b, d]
        dz_row = dz[b, d]
        for t in range(L):
            sig = _sigmoid(z_row[t])
            gate_row[t] = z_row[t] * sig
            dz_row[t] = dout_row[t] * (sig * (one + z_row[t] * (one - sig)))
    # Forward, keeping the state at the start of each chunk (the last chunk is redone below).
    if has_h0:
        h[:] = h0[b, d]
    else:
        h[:] = zero
    for c in range(n_chunks - 1):
        chunk_start[c] = h
        for t in range(c * chunk, (c + 1) * chunk):
            dt = dt_row[t]
            b_t = B_row[t * B_var]
            dt_x = dt * u_row[t]
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
            dt = dt_row[t]
            b_t = B_row[t * B_var]
            dt_x = dt * u_row[t]
            for n in range(N):
                e = _exp(dt * a[n])
                decays[j, n] = e
                h[n] = e * h[n] + dt_x * b_t[n]
                states[j, n] = h[n]
        for j in range(steps - 1, -1, -1):
            t = t0 + j
            x = u_row[t]
            dt = dt_row[t]
            b_t = B_row[t * B_var]
            c_t = C_row[t * C_var]
            h_t = states[j]
            h_prev = states[j - 1] if j > 0 else chunk_start[c]
            dy = dout_row[t]
            if has_z:
                y = _dot(c_t, h_t)
                if has_D:
                    y += D_d * x
                dz_row[t] *= y
                dy = dy * gate_row[t]
            du_t = zero
            if has_D:
                dD_sum += dy * x
                du_t = dy * D_d
            dt_x = dt * x
            dB_t = dB_rows[t * B_var]
            dC_t = dC_rows[t * C_var]
            decay = decays[j]
            # g = dLoss/dh_t; w = g * dh_t/d(dt A), the part of g that flows into dA and dt.
            for n in range(N):
                g[n] = carry[n] + c_t[n] * dy
                dC_t[n] += dy * h_t[n]
                dB_t[n] += g[n] * dt_x
                w[n] = g[n] * decay[n] * h_prev[n]
                dA_row[n] += w[n] * dt
                carry[n] = g[n] * decay[n]
            g_dot_B = _dot(g, b_t)
            du[b, d, t] = du_t + dt * g_dot_B
            ddt = (_dot(w, a) + x * g_dot_B) * slope_row[t]
            ddelta[b, d, t] = ddt
            dbias_sum += ddt
    dA_part[b, d] = dA_row
    dD_part[b, d] = dD_sum
    dbias_part[b, d] = dbias_sum
    dh0[b, d] = carry


@njit(parallel=True, cache=True, fastmath=False, error_model="numpy")
def _scan_bwd_kernel(dout, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D, z, has_z,
                     delta_bias, has_bias, softplus, h0, has_h0, dlast, has_dlast,
                     group, blocks, chunk,
                     du, ddelta, dz, dA_part, dB_const, dB_slots, dC_const, dC_slots, dD_part,
                     dbias_part, dh0):
    nb, nd, L = u.shape
    N = A.shape[1]
    tasks_per_batch = (nd // group) * blocks
    n_chunks = (L + chunk - 1) // chunk
    for task in prange(nb * tasks_per_batch):
        # Channels [d_begin, d_end): piece `block` of `blocks` of a group of `group` channels.
        b = task // tasks_per_batch
        slot = task - b * tasks_per_batch
        first = (slot // blocks) * group
        block = slot % blocks
        d_begin = first + (block * group) // blocks
        d_end = first + ((block + 1) * group) // blocks
        # Per-task buffers, reused for every channel of the block.
        buffers = (
            np.empty((max(n_chunks, 1), N), A.dtype),  # state at the start of each chunk
            np.empty((chunk, N), A.dtype),  # states of the chunk being reversed
            np.empty((chunk, N), A.dtype),  # exp(dt A) of the chunk being reversed
            np.empty(L, A.dtype),  # dt
            np.ones(L, A.dtype),  # d dt / d(delta + delta_bias)
            np.empty(L if has_z else 0, A.dtype),  # silu(z)
            np.empty(N, A.dtype),  # g
            np.empty(N, A.dtype),  # w
            np.empty(N, A.dtype),  # h
            np.empty(N, A.dtype),  # adjoint carried to the previous step
            np.empty(N, A.dtype),  # dA of the row
        )
        for d in range(d_begin, d_end):
            _bwd_row(b, d, slot, dout, u, delta, A, Bm, B_var, B_cpg, Cm, C_var, C_cpg, Dp, has_D,
                     z, has_z, delta_bias, has_bias, softplus, h0, has_h0, dlast, has_dlast, buffers,
                     du, ddelta, dz, dA_part, dB_const, dB_slots, dC_const, dC_slots, dD_part,
                     dbias_part, dh0)


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
