"""Numba kernels for the norm family: RMSNorm / LayerNorm with fused residual add, gated RMSNorm.

Work decomposition: the (..., D) inputs are flattened to (rows, D) and the rows are cut into at
most MAX_BLOCKS blocks of consecutive rows; one ``prange`` iteration owns one block and a few
scratch rows of D values, which stay in L1/L2 while a row is read, reduced and written. Memory
traffic is one read of each input row and one write of each output row. Backward kernels write
their dweight/dbias contributions into a per-block partial row (no two iterations share one),
summed afterwards; the fixed block count keeps the result independent of the thread count.

Reductions use four independent accumulators so that float32 sums are not one long chain of
dependent adds (fastmath is off, so LLVM may not reorder them itself).

Every kernel is generic over the compute dtype (float32, or float64 for float64 activations);
typed constants come in through the small ``consts`` array, because literals are float64 in
Numba and would silently promote float32 math.
"""

from __future__ import annotations

import numba
import numpy as np

from ._common import cast_out, compute_dtype, to_compute

# At most this many blocks of rows (bounds the memory of the backward's partial sums) ...
MAX_BLOCKS = 64
# ... and at least this many rows per block when there are enough rows.
MIN_ROWS_PER_BLOCK = 16


def _blocks(rows: int) -> tuple[int, int]:
    """(number of blocks, rows per block) for ``rows`` rows; the kernels derive the same count."""
    rows_per_block = max(MIN_ROWS_PER_BLOCK, -(-rows // MAX_BLOCKS))
    return -(-rows // rows_per_block), rows_per_block


def _consts(dtype, channels: int, eps: float):
    """[0, 1, channels per statistic, eps] in the compute dtype."""
    return np.array([0.0, 1.0, channels, eps], dtype=dtype)


# --- row reductions -----------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=False)
def _sum(v, zero):
    a0 = a1 = a2 = a3 = zero
    n = v.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        a0 += v[j]
        a1 += v[j + 1]
        a2 += v[j + 2]
        a3 += v[j + 3]
    for j in range(n4, n):
        a0 += v[j]
    return (a0 + a1) + (a2 + a3)


@numba.njit(cache=True, fastmath=False)
def _sum_sq_centered(v, center, zero):
    """sum((v - center)**2)."""
    a0 = a1 = a2 = a3 = zero
    n = v.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        t0 = v[j] - center
        t1 = v[j + 1] - center
        t2 = v[j + 2] - center
        t3 = v[j + 3] - center
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
    for j in range(n4, n):
        t0 = v[j] - center
        a0 += t0 * t0
    return (a0 + a1) + (a2 + a3)


@numba.njit(cache=True, fastmath=False)
def _dot(u, v, zero):
    a0 = a1 = a2 = a3 = zero
    n = u.shape[0]
    n4 = n - n % 4
    for j in range(0, n4, 4):
        a0 += u[j] * v[j]
        a1 += u[j + 1] * v[j + 1]
        a2 += u[j + 2] * v[j + 2]
        a3 += u[j + 3] * v[j + 3]
    for j in range(n4, n):
        a0 += u[j] * v[j]
    return (a0 + a1) + (a2 + a3)


@numba.njit(cache=True, fastmath=False)
def _mean_rstd(row, consts, subtract_mean):
    """(mean, 1/sqrt(var + eps)) of one row; mean is 0 and var the mean square for RMSNorm."""
    zero, one, size, eps = consts[0], consts[1], consts[2], consts[3]
    mean = zero
    if subtract_mean:
        mean = _sum(row, zero) / size
    var = _sum_sq_centered(row, mean, zero) / size
    return mean, one / np.sqrt(var + eps)


@numba.njit(cache=True, fastmath=False)
def _load_sum(x, residual, has_residual, r, row):
    """row = x[r] + residual[r] (in the compute dtype)."""
    if has_residual:
        for j in range(row.shape[0]):
            row[j] = x[r, j] + residual[r, j]
    else:
        for j in range(row.shape[0]):
            row[j] = x[r, j]


# --- RMSNorm / LayerNorm -------------------------------------------------------------------------


@numba.njit(parallel=True, cache=True, fastmath=False)
def _norm_fwd_kernel(x, residual, weight, bias, consts, rows_per_block, subtract_mean, has_residual, has_bias,
                     store_s, y, s):
    rows, d = x.shape
    nblocks = -(-rows // rows_per_block)
    for blk in numba.prange(nblocks):
        scratch = np.empty(d, dtype=consts.dtype)
        for r in range(blk * rows_per_block, min(rows, (blk + 1) * rows_per_block)):
            row = s[r] if store_s else scratch
            _load_sum(x, residual, has_residual, r, row)
            mean, rstd = _mean_rstd(row, consts, subtract_mean)
            if has_bias:
                for j in range(d):
                    y[r, j] = (row[j] - mean) * rstd * weight[j] + bias[j]
            else:
                for j in range(d):
                    y[r, j] = (row[j] - mean) * rstd * weight[j]


@numba.njit(parallel=True, cache=True, fastmath=False)
def _norm_bwd_kernel(dy, x, residual, weight, dresidual_out, consts, rows_per_block, subtract_mean, has_residual,
                     has_bias, has_dresidual_out, ds, dweight_part, dbias_part):
    rows, d = x.shape
    zero, size = consts[0], consts[2]
    nblocks = -(-rows // rows_per_block)
    for blk in numba.prange(nblocks):
        xhat = np.empty(d, dtype=consts.dtype)
        wdy = np.empty(d, dtype=consts.dtype)
        for r in range(blk * rows_per_block, min(rows, (blk + 1) * rows_per_block)):
            _load_sum(x, residual, has_residual, r, xhat)
            mean, rstd = _mean_rstd(xhat, consts, subtract_mean)
            for j in range(d):
                xhat[j] = (xhat[j] - mean) * rstd
                wdy[j] = weight[j] * dy[r, j]
            c1 = _dot(xhat, wdy, zero) / size
            c2 = _sum(wdy, zero) / size if subtract_mean else zero
            for j in range(d):
                ds[r, j] = (wdy[j] - (xhat[j] * c1 + c2)) * rstd
                dweight_part[blk, j] += dy[r, j] * xhat[j]
            if has_dresidual_out:
                for j in range(d):
                    ds[r, j] += dresidual_out[r, j]
            if has_bias:
                for j in range(d):
                    dbias_part[blk, j] += dy[r, j]


def _rows_or_empty(a, d, dtype):
    """``a`` as a (rows, d) array in the compute dtype, or a (0, d) placeholder for None."""
    return np.empty((0, d), dtype) if a is None else to_compute(a, dtype).reshape(-1, d)


def _vector_or_empty(a, dtype):
    return np.empty(0, dtype) if a is None else to_compute(a, dtype)


def _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, subtract_mean):
    d = x.shape[-1]
    dtype = compute_dtype(x, residual)
    x2 = to_compute(x, dtype).reshape(-1, d)
    rows = x2.shape[0]
    y = np.empty((rows, d), dtype)
    s = np.empty((rows if prenorm else 0, d), dtype)
    _norm_fwd_kernel(
        x2, _rows_or_empty(residual, d, dtype), to_compute(weight, dtype), _vector_or_empty(bias, dtype),
        _consts(dtype, d, eps), _blocks(rows)[1], subtract_mean, residual is not None, bias is not None,
        prenorm, y, s,
    )
    y = cast_out(y, x.dtype).reshape(x.shape)
    if not prenorm:
        return y
    s_dtype = np.dtype(np.float32) if residual_in_fp32 else (residual if residual is not None else x).dtype
    return y, cast_out(s, s_dtype).reshape(x.shape)


def _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, subtract_mean):
    d = x.shape[-1]
    dtype = compute_dtype(dy, x, residual, dresidual_out)
    x2 = to_compute(x, dtype).reshape(-1, d)
    rows = x2.shape[0]
    nblocks, rows_per_block = _blocks(rows)
    ds = np.empty((rows, d), dtype)
    dweight_part = np.zeros((nblocks, d), dtype)
    dbias_part = np.zeros((nblocks if bias is not None else 0, d), dtype)
    _norm_bwd_kernel(
        to_compute(dy, dtype).reshape(-1, d), x2, _rows_or_empty(residual, d, dtype), to_compute(weight, dtype),
        _rows_or_empty(dresidual_out, d, dtype), _consts(dtype, d, eps), rows_per_block, subtract_mean,
        residual is not None, bias is not None, dresidual_out is not None, ds, dweight_part, dbias_part,
    )
    ds = ds.reshape(x.shape)
    dx = cast_out(ds, x.dtype)
    dresidual = None if residual is None else cast_out(ds, residual.dtype)
    if dresidual is dx:
        dresidual = dx.copy()
    dweight = cast_out(dweight_part.sum(axis=0), weight.dtype)
    dbias = None if bias is None else cast_out(dbias_part.sum(axis=0), bias.dtype)
    return dx, dweight, dbias, dresidual


def rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, subtract_mean=False)


def layer_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, subtract_mean=True)


def rms_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    return _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, subtract_mean=False)


def layer_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    return _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, subtract_mean=True)


# --- gated RMSNorm -------------------------------------------------------------------------------


@numba.njit(cache=True, fastmath=False)
def _load_gate(x, z, has_z, norm_before_gate, one, r, v, gate, dgate):
    """gate = silu(z[r]) and dgate = silu'(z[r]) (1 and 0 without z); v = x[r] (times gate after the norm)."""
    for j in range(v.shape[0]):
        if has_z:
            zj = z[r, j]
            sig = one / (one + np.exp(-zj))
            gate[j] = zj * sig
            dgate[j] = sig * (one + zj * (one - sig))
        else:
            gate[j] = one
            dgate[j] = one - one
        v[j] = x[r, j] if norm_before_gate else x[r, j] * gate[j]


@numba.njit(parallel=True, cache=True, fastmath=False)
def _gated_fwd_kernel(x, z, weight, consts, group_size, rows_per_block, has_z, norm_before_gate, y):
    rows, d = x.shape
    zero, one, size, eps = consts[0], consts[1], consts[2], consts[3]
    nblocks = -(-rows // rows_per_block)
    for blk in numba.prange(nblocks):
        v = np.empty(d, dtype=consts.dtype)
        gate = np.empty(d, dtype=consts.dtype)
        dgate = np.empty(d, dtype=consts.dtype)
        for r in range(blk * rows_per_block, min(rows, (blk + 1) * rows_per_block)):
            _load_gate(x, z, has_z, norm_before_gate, one, r, v, gate, dgate)
            for start in range(0, d, group_size):
                stop = start + group_size
                rstd = one / np.sqrt(_sum_sq_centered(v[start:stop], zero, zero) / size + eps)
                if norm_before_gate:
                    for j in range(start, stop):
                        y[r, j] = v[j] * rstd * weight[j] * gate[j]
                else:
                    for j in range(start, stop):
                        y[r, j] = v[j] * rstd * weight[j]


@numba.njit(parallel=True, cache=True, fastmath=False)
def _gated_bwd_kernel(dy, x, z, weight, consts, group_size, rows_per_block, has_z, norm_before_gate, dx, dz,
                      dweight_part):
    rows, d = x.shape
    zero, one, size, eps = consts[0], consts[1], consts[2], consts[3]
    nblocks = -(-rows // rows_per_block)
    for blk in numba.prange(nblocks):
        vhat = np.empty(d, dtype=consts.dtype)
        gate = np.empty(d, dtype=consts.dtype)
        dgate = np.empty(d, dtype=consts.dtype)
        dvhat = np.empty(d, dtype=consts.dtype)
        for r in range(blk * rows_per_block, min(rows, (blk + 1) * rows_per_block)):
            _load_gate(x, z, has_z, norm_before_gate, one, r, vhat, gate, dgate)
            for start in range(0, d, group_size):
                stop = start + group_size
                rstd = one / np.sqrt(_sum_sq_centered(vhat[start:stop], zero, zero) / size + eps)
                for j in range(start, stop):
                    vhat[j] = vhat[j] * rstd
                    if norm_before_gate:
                        dvhat[j] = dy[r, j] * weight[j] * gate[j]
                        dweight_part[blk, j] += dy[r, j] * vhat[j] * gate[j]
                        if has_z:
                            dz[r, j] = dy[r, j] * vhat[j] * weight[j] * dgate[j]
                    else:
                        dvhat[j] = dy[r, j] * weight[j]
                        dweight_part[blk, j] += dy[r, j] * vhat[j]
                c1 = _dot(vhat[start:stop], dvhat[start:stop], zero) / size
                for j in range(start, stop):
                    dv = (dvhat[j] - vhat[j] * c1) * rstd
                    if norm_before_gate:
                        dx[r, j] = dv
                    else:
                        dx[r, j] = dv * gate[j]
                        if has_z:
                            dz[r, j] = dv * x[r, j] * dgate[j]


def gated_rms_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    dtype = compute_dtype(x, z)
    x2 = to_compute(x, dtype).reshape(-1, d)
    rows = x2.shape[0]
    y = np.empty((rows, d), dtype)
    _gated_fwd_kernel(
        x2, _rows_or_empty(z, d, dtype), to_compute(weight, dtype), _consts(dtype, group_size, eps), group_size,
        _blocks(rows)[1], z is not None, norm_before_gate, y,
    )
    return cast_out(y, x.dtype).reshape(x.shape)


def gated_rms_norm_bwd(dy, x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    dtype = compute_dtype(dy, x, z)
    x2 = to_compute(x, dtype).reshape(-1, d)
    rows = x2.shape[0]
    nblocks, rows_per_block = _blocks(rows)
    dx = np.empty((rows, d), dtype)
    dz = np.empty((rows if z is not None else 0, d), dtype)
    dweight_part = np.zeros((nblocks, d), dtype)
    _gated_bwd_kernel(
        to_compute(dy, dtype).reshape(-1, d), x2, _rows_or_empty(z, d, dtype), to_compute(weight, dtype),
        _consts(dtype, group_size, eps), group_size, rows_per_block, z is not None, norm_before_gate, dx, dz,
        dweight_part,
    )
    dx = cast_out(dx, x.dtype).reshape(x.shape)
    dz = None if z is None else cast_out(dz, z.dtype).reshape(x.shape)
    return dx, cast_out(dweight_part.sum(axis=0), weight.dtype), dz
