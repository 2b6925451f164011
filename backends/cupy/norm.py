"""CuPy launchers for the norm family (kernels in norm.cu): rms_norm, layer_norm, gated_rms_norm.

Arguments arrive validated by ssmcore.ops.norm. Rows are the flattened leading dims of x
(..., D); the gated norm's rows are its groups. The row type TX is x's dtype; residual, s, dy,
dresidual_out and z are read/written either in x's dtype or in float32 (any other dtype is
converted to float32 first, and results converted back). Weights and biases are passed as
float32; dweight/dbias come back in their inputs' dtypes.
"""

from __future__ import annotations

import math
import os

import cupy
import numpy as np

from . import _arrays, _runtime
from ._arrays import cdiv, ptr

FAMILY = "norm"
_TYPES = ("float", "half_t", "bf16_t")
_NV_FWD = (1, 2, 4)  # register-held chunks per thread; 0 = streaming (very long rows)
_NV_BWD = (1, 2)
# NV = 2 spills a few bytes (16-bit types), still far cheaper than streaming a 5120-wide group.
_NV_GATED_BWD = (1, 2)
# gated_bwd2's register chunks per thread: 16-bit x takes 2 from 64 chunks (512 channels) on, which holds more rows
# per SM than 1 (sm_90: 80 registers, 128 threads per 2048-wide group, 6 rows per SM instead of 4). NV 1 is
# compiled for 512 threads at 64 registers, NV 2 for 384 at 80 (320 at 96 with float32 z / dy; float32 x: NV 1
# only, NV 2 would spill). Longer groups (16-bit over 6144 channels, 5120 with float32 streams, float32 over 4096)
# take v1's kernels.
_NV_GATED2 = (1, 2)
_NV2_MIN_CHUNKS = 64
_NV2_MAX_THREADS = {False: 384, True: 320}  # by float32 z / dy streams
_MAX_ROW_THREADS = 512
# norm_fwd (v1) rows take 2 register chunks per thread once they pass 256 threads (2048 channels; 4 chunks up to 512
# threads before the streaming kernel, as other kernels): H200, session 7
# run 2, fused add + RMSNorm 16384 x 2560 with an fp32 residual: 127.5 us (graph 124.1) vs 131.4 (127.6) with 320
# threads x 1 chunk; the reference 124.6.
_MAX_FWD_ROW_THREADS = 256

# gated_rms_norm kernels: "v2" (gated_fwd2 / gated_bwd2: all of a row's loads before its reduction, one reduction
# in the backward, norm_before_gate compiled in) or "v1" (gated_fwd / gated_bwd, kept for side-by-side timing).
# The module attribute wins when set (benchmarks); else SSMCORE_GATED_NORM, read on every call.
gated_impl = None


def _gated_impl() -> str:
    impl = gated_impl or os.environ.get("SSMCORE_GATED_NORM", "v2")
    if impl not in ("v1", "v2"):
        raise ValueError(f"SSMCORE_GATED_NORM: expected 'v1' or 'v2', got {impl!r}")
    return impl


# rms_norm / layer_norm forward kernels: "v1" (norm_fwd, the default) or "v2" (norm_fwd2: persistent grid, the next
# row's loads in flight while a row is reduced and stored, 16-byte accesses only, evict-first cache hints; rows with
# D % 8 == 0, 16-byte aligned, at most 2 chunks per thread; measured slower on the H200, session 7 run 2: 139.9 vs
# 131.4 us at 16384 x 2560, every knob setting 128.7-137.5 in graph replay vs v1's 127.6; kept as a knob).
# Module attributes win when set (benchmarks); else the environment, read on every call:
#   SSMCORE_NORM_FWD = v1 | v2; SSMCORE_NORM_FWD2_NV = 1 (1 chunk per thread while a row fits in 512 threads)
#   | 2 (2 chunks per thread first); SSMCORE_NORM_FWD2_GRID = persistent | full (one row per slot);
#   SSMCORE_NORM_FWD2_HINT = 1 | 0 (evict-first loads and stores).
fwd_impl = None
fwd2_nv = None
fwd2_grid = None
fwd2_hint = None
_NV_FWD2 = (1, 2)


def _knob(attr, env: str, default: str, allowed) -> str:
    value = str(attr if attr is not None else os.environ.get(env, default))
    if value not in allowed:
        raise ValueError(f"{env}: expected one of {sorted(allowed)}, got {value!r}")
    return value


def _fwd2_config():
    """(use v2, NV order, persistent grid, hint) from the knobs."""
    impl = _knob(fwd_impl, "SSMCORE_NORM_FWD", "v1", ("v1", "v2"))
    nv = _knob(fwd2_nv, "SSMCORE_NORM_FWD2_NV", "1", ("1", "2"))
    grid = _knob(fwd2_grid, "SSMCORE_NORM_FWD2_GRID", "persistent", ("persistent", "full"))
    hint = _knob(None if fwd2_hint is None else int(bool(fwd2_hint)), "SSMCORE_NORM_FWD2_HINT", "1", ("0", "1"))
    return impl == "v2", ((1, 2) if nv == "1" else (2, 1)), grid == "persistent", hint == "1"


INSTANTIATIONS = (
    [f"norm_fwd<{t}, {nv}, {rms}>" for t in _TYPES for nv in (0,) + _NV_FWD for rms in ("true", "false")]
    + [f"norm_fwd2<{t}, {nv}, {rms}, {hint}>" for t in _TYPES for nv in _NV_FWD2 for rms in ("true", "false")
       for hint in ("true", "false")]
    + [f"norm_bwd<{t}, {nv}, {rms}>" for t in _TYPES for nv in (0,) + _NV_BWD for rms in ("true", "false")]
    + [f"gated_fwd<{t}, {nv}>" for t in _TYPES for nv in (0,) + _NV_FWD]
    + [f"gated_bwd<{t}, {nv}>" for t in _TYPES for nv in (0,) + _NV_GATED_BWD]
    + [f"gated_fwd2<{t}, {nv}, {nbg}>" for t in _TYPES for nv in _NV_FWD for nbg in ("true", "false")]
    + [f"gated_bwd2<{t}, {ts}, {nv}, {nbg}>" for t in _TYPES for ts in dict.fromkeys((t, "float"))
       for nv in _NV_GATED2 if nv == 1 or t != "float" for nbg in ("true", "false")]
    + [f"column_sum<{t}>" for t in _TYPES]
)


def _row_layout(n: int, nv_choices, max_threads: int | None = None) -> tuple[int, int, int]:
    """(NV, threads per row, rows per block) for rows of n elements in 8-element chunks."""
    cap = _MAX_ROW_THREADS if max_threads is None else max_threads
    chunks = cdiv(n, 8)
    for nv in nv_choices:
        threads = cdiv(chunks, nv)
        if threads <= cap:
            break
    else:
        nv, threads = 0, cap
    warp = _arrays.warp_size()
    if threads <= warp:
        tpr = 1 << (threads - 1).bit_length()
    else:
        tpr = cdiv(threads, warp) * warp
    return nv, tpr, max(1, 256 // tpr)


def _bwd_grid(rows: int, tpr: int, rows_per_block: int, ngroups: int) -> int:
    """Persistent grid for a backward: enough blocks to fill the GPU, slots a multiple of ngroups."""
    per_sm = max(1, 2048 // (tpr * rows_per_block))
    target = max(1, min(cdiv(rows, rows_per_block), _arrays.sm_count() * per_sm))
    step = ngroups // math.gcd(ngroups, rows_per_block)
    return step * cdiv(target, step)


def _column_sum(part, like):
    """Sum the (P, D) float32 partials over P into a (D,) array of like's dtype."""
    n_part, d = part.shape
    out = cupy.empty(d, like.dtype)
    kernel = _runtime.function(FAMILY, f"column_sum<{_arrays.kernel_type('weight', like)}>")
    _runtime.launch(kernel, (cdiv(d, 32),), (32, 8), (part, np.int64(n_part), np.int32(d), out))
    return out


def _check_rows(rows: int, x) -> None:
    """The gated kernels index groups with 32-bit arithmetic."""
    if rows >= 2**31:
        raise ValueError(f"x: expected fewer than 2**31 groups of channels on the GPU, got shape {tuple(x.shape)}")


def _cast(a, dtype):
    return a if a is None or a.dtype == dtype else a.astype(dtype)


# --- rms_norm / layer_norm ----------------------------------------------------------------------


def _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, rms):
    _arrays.check_kernel_dtypes(x=x, weight=weight, bias=bias, residual=residual)
    tx = _arrays.kernel_type("x", x)
    d = x.shape[-1]
    rows = x.size // d
    s_dtype = cupy.dtype(cupy.float32) if residual_in_fp32 else (residual if residual is not None else x).dtype
    y = cupy.empty(x.shape, x.dtype)
    s = None
    if prenorm:
        s_kernel_dtype = s_dtype if s_dtype in (x.dtype, cupy.float32) else cupy.dtype(cupy.float32)
        s = cupy.empty(x.shape, s_kernel_dtype)
    if rows:
        x2 = _arrays.contiguous(x)
        res, res_f32 = _arrays.row_stream(residual, x.dtype)
        w = _arrays.contiguous(weight, cupy.float32)
        b = _arrays.contiguous(bias, cupy.float32)
        vec = d % 8 == 0 and _arrays.aligned16(x2, res, w, b, y, s)
        use_v2, nv_order, persistent, hint = _fwd2_config()
        nv, tpr, rpb = _row_layout(d, nv_order)
        if use_v2 and vec and nv > 0:
            kernel = _runtime.function(
                FAMILY, f"norm_fwd2<{tx}, {nv}, {'true' if rms else 'false'}, {'true' if hint else 'false'}>")
            grid = cdiv(rows, rpb)
            if persistent:
                per_sm = min(32, _resident_blocks(kernel, tpr * rpb))
                grid = min(grid, _arrays.sm_count() * per_sm)
            _runtime.launch(
                kernel, (grid,), (tpr, rpb),
                (x2, ptr(res), np.int32(res_f32), w, ptr(b), y, ptr(s),
                 np.int32(s is not None and s.dtype == cupy.float32), np.int64(rows), np.int32(d), np.float32(eps)),
            )
            return y if not prenorm else (y, _cast(s, s_dtype))
        nv, tpr, rpb = _row_layout(d, _NV_FWD, min(_MAX_ROW_THREADS, _MAX_FWD_ROW_THREADS))
        if nv == 0:  # past 4 chunks x 256 threads: the usual cap before the streaming kernel
            nv, tpr, rpb = _row_layout(d, _NV_FWD)
        kernel = _runtime.function(FAMILY, f"norm_fwd<{tx}, {nv}, {'true' if rms else 'false'}>")
        _runtime.launch(
            kernel, (cdiv(rows, rpb),), (tpr, rpb),
            (x2, ptr(res), np.int32(res_f32), w, ptr(b), y, ptr(s), np.int32(s is not None and s.dtype == cupy.float32),
             np.int64(rows), np.int32(d), np.float32(eps), np.int32(vec)),
        )
    if not prenorm:
        return y
    return y, _cast(s, s_dtype)


def _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, rms):
    _arrays.check_kernel_dtypes(dy=dy, x=x, weight=weight, bias=bias, residual=residual, dresidual_out=dresidual_out)
    tx = _arrays.kernel_type("x", x)
    d = x.shape[-1]
    rows = x.size // d
    dx = cupy.empty(x.shape, x.dtype)
    dres = None
    if residual is not None:
        dres = cupy.empty(x.shape, residual.dtype if residual.dtype in (x.dtype, cupy.float32) else cupy.float32)
    nv, tpr, rpb = _row_layout(d, _NV_BWD)
    grid = _bwd_grid(rows, tpr, rpb, 1)
    alloc = cupy.zeros if nv == 0 or not rows else cupy.empty  # the streaming kernel accumulates in place
    dw_part = alloc((grid * rpb, d), cupy.float32)
    db_part = None if bias is None else alloc((grid * rpb, d), cupy.float32)
    if rows:
        x2 = _arrays.contiguous(x)
        dy2, dy_f32 = _arrays.row_stream(dy, x.dtype)
        res, res_f32 = _arrays.row_stream(residual, x.dtype)
        dro, dro_f32 = _arrays.row_stream(dresidual_out, x.dtype)
        w = _arrays.contiguous(weight, cupy.float32)
        vec = d % 8 == 0 and _arrays.aligned16(x2, dy2, res, dro, w, dx, dres)
        kernel = _runtime.function(FAMILY, f"norm_bwd<{tx}, {nv}, {'true' if rms else 'false'}>")
        _runtime.launch(
            kernel, (grid,), (tpr, rpb),
            (dy2, np.int32(dy_f32), x2, ptr(res), np.int32(res_f32), w, ptr(dro), np.int32(dro_f32), dx, ptr(dres),
             np.int32(dres is not None and dres.dtype == cupy.float32), dw_part, ptr(db_part), np.int64(rows),
             np.int32(d), np.float32(eps), np.int32(vec)),
        )
    dweight = _column_sum(dw_part, weight)
    dbias = None if bias is None else _column_sum(db_part, bias)
    return dx, dweight, dbias, None if residual is None else _cast(dres, residual.dtype)


def rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, rms=True)


def layer_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    return _norm_fwd(x, weight, bias, residual, eps, prenorm, residual_in_fp32, rms=False)


def rms_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    return _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, rms=True)


def layer_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    return _norm_bwd(dy, x, weight, bias, residual, eps, dresidual_out, rms=False)


# --- gated_rms_norm -----------------------------------------------------------------------------


def _rows(a, dtype=None):
    """(array, row stride in elements) for a gated-norm input stream: a itself when its last axis is unit-stride and
    its leading axes collapse into one row axis with a single stride >= the row length (e.g. a channel slice of
    wider rows), else a C-contiguous copy (in dtype when given and different). None stays (None, 0)."""
    if a is None:
        return None, 0
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    d, item = a.shape[-1], a.itemsize
    if a.size and a.strides[-1] == item and all(st % item == 0 for st in a.strides):
        dims = [(n, st // item) for n, st in zip(a.shape[:-1], a.strides[:-1]) if n != 1]
        stride = dims[-1][1] if dims else d
        if stride >= d and all(dims[k][1] == dims[k + 1][0] * dims[k + 1][1] for k in range(len(dims) - 1)):
            return a, stride
    return cupy.ascontiguousarray(a), d


def _row_stream(a, row_dtype):
    """As _arrays.row_stream (row_dtype or float32, 1 if float32), with the row stride of _rows."""
    if a is None:
        return None, 0, 0
    a, stride = _rows(a, None if a.dtype in (row_dtype, cupy.float32) else cupy.float32)
    return a, int(a.dtype == cupy.float32), stride


def gated_rms_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    _arrays.check_kernel_dtypes(x=x, weight=weight, z=z)
    tx = _arrays.kernel_type("x", x)
    d = x.shape[-1]
    group = d if group_size is None else group_size
    rows = (x.size // d) * (d // group)
    _check_rows(rows, x)
    y = cupy.empty(x.shape, x.dtype)
    if rows:
        x2, x_rs = _rows(x)
        z2, z_f32, z_rs = _row_stream(z, x.dtype)
        w = _arrays.contiguous(weight, cupy.float32)
        nv, tpr, rpb = _row_layout(group, _NV_FWD)
        vec = (group % 8 == 0 and _arrays.aligned16(x2, z2, w, y) and x_rs * x.itemsize % 16 == 0
               and z_rs * (4 if z_f32 else x.itemsize) % 16 == 0)
        args = (x2, np.int64(x_rs), ptr(z2), np.int32(z_f32), np.int64(z_rs), w, y, np.int64(rows), np.int32(group),
                np.int32(d // group), np.float32(eps), np.int32(vec))
        if nv > 0 and _gated_impl() == "v2":
            kernel = _runtime.function(FAMILY, f"gated_fwd2<{tx}, {nv}, {'true' if norm_before_gate else 'false'}>")
        else:
            kernel = _runtime.function(FAMILY, f"gated_fwd<{tx}, {nv}>")
            args += (np.int32(bool(norm_before_gate)),)
        _runtime.launch(kernel, (cdiv(rows, rpb),), (tpr, rpb), args)
    return y


_RESIDENT: dict = {}


def _resident_blocks(kernel, threads: int) -> int:
    """Blocks of `threads` threads one multiprocessor holds at once, from the kernel's register count (64 K
    registers, 64 warps per SM, registers given out per warp in units of 256); 2048 threads' worth when unknown."""
    key = (id(kernel), threads)
    if key not in _RESIDENT:
        warp = _arrays.warp_size()
        warps = cdiv(threads, warp)
        try:
            per_warp = -(-max(int(kernel.num_regs), 1) * warp // 256) * 256
            _RESIDENT[key] = max(1, min(64 // warps, 65536 // (per_warp * warps)))
        except Exception:  # an attribute the runtime does not report (HIP, the emulator)
            _RESIDENT[key] = max(1, 2048 // (warps * warp))
    return _RESIDENT[key]  # kernels are cached in _runtime, so id is stable


def gated_rms_norm_bwd(dy, x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    _arrays.check_kernel_dtypes(dy=dy, x=x, weight=weight, z=z)
    d = x.shape[-1]
    group = d if group_size is None else group_size
    wide = x.dtype != cupy.float32 and cdiv(group, 8) >= _NV2_MIN_CHUNKS
    nv, tpr, rpb = _row_layout(group, (2,) if wide else (1,))
    if nv == 0 or _gated_impl() == "v1":
        return _gated_bwd_v1(dy, x, weight, z, eps, group_size, norm_before_gate)
    z2, z_f32, z_rs = _row_stream(z, x.dtype)
    dy2, dy_f32, dy_rs = _row_stream(dy, x.dtype)
    # One stream type per kernel (a float32 z with a 16-bit dy, or the reverse, stays on v1), and NV 2's bound.
    if (z is not None and z_f32 != dy_f32) or (nv == 2 and tpr * rpb > _NV2_MAX_THREADS[bool(dy_f32)]):
        return _gated_bwd_v1(dy, x, weight, z, eps, group_size, norm_before_gate)
    tx = _arrays.kernel_type("x", x)
    ngroups = d // group
    rows = (x.size // d) * ngroups
    _check_rows(rows, x)
    dx = cupy.empty(x.shape, x.dtype)
    dz = None if z is None else cupy.empty(x.shape, z2.dtype)
    ts = "float" if dy_f32 else tx
    kernel = _runtime.function(FAMILY, f"gated_bwd2<{tx}, {ts}, {nv}, {'true' if norm_before_gate else 'false'}>")
    # Persistent grid: as many blocks as the GPU holds at once (none waits for a second wave), at most one per
    # rpb rows; slots (grid * rpb) a multiple of ngroups so that each slot sees one group.
    smem = rpb * nv * tpr * 32  # the slots' running dweight sums (float32)
    per_sm = min(_resident_blocks(kernel, tpr * rpb), (228 << 10) // (smem + 1024))  # sm_90: 228 KB, 1 KB reserved
    target = max(1, min(cdiv(rows, rpb), _arrays.sm_count() * per_sm))
    step = ngroups // math.gcd(ngroups, rpb)
    grid = step * cdiv(target, step)
    dw_part = cupy.empty((grid * rpb // ngroups, d), cupy.float32)  # every slot writes its whole partial row
    if rows:
        x2, x_rs = _rows(x)
        w = _arrays.contiguous(weight, cupy.float32)
        vec = (group % 8 == 0 and _arrays.aligned16(x2, dy2, z2, w, dx, dz) and x_rs * x.itemsize % 16 == 0
               and z_rs * (4 if z_f32 else x.itemsize) % 16 == 0 and dy_rs * (4 if dy_f32 else x.itemsize) % 16 == 0)
        _runtime.launch(
            kernel, (grid,), (tpr, rpb),
            (dy2, np.int64(dy_rs), x2, np.int64(x_rs), ptr(z2), np.int64(z_rs), w, dx, ptr(dz), dw_part,
             np.int64(rows), np.int32(group), np.int32(ngroups), np.float32(eps), np.int32(vec)),
            shared_mem=smem,
        )
    else:
        dw_part.fill(0)
    return dx, _column_sum(dw_part, weight), None if z is None else _cast(dz, z.dtype)


def _gated_bwd_v1(dy, x, weight, z, eps, group_size, norm_before_gate):
    _arrays.check_kernel_dtypes(dy=dy, x=x, weight=weight, z=z)
    tx = _arrays.kernel_type("x", x)
    d = x.shape[-1]
    group = d if group_size is None else group_size
    ngroups = d // group
    rows = (x.size // d) * ngroups
    _check_rows(rows, x)
    dx = cupy.empty(x.shape, x.dtype)
    z2, z_f32, z_rs = _row_stream(z, x.dtype)
    dz = None if z is None else cupy.empty(x.shape, z2.dtype)
    nv, tpr, rpb = _row_layout(group, _NV_GATED_BWD)
    grid = _bwd_grid(rows, tpr, rpb, ngroups)
    dw_part = (cupy.zeros if nv == 0 or not rows else cupy.empty)((grid * rpb // ngroups, d), cupy.float32)
    if rows:
        x2, x_rs = _rows(x)
        dy2, dy_f32, dy_rs = _row_stream(dy, x.dtype)
        w = _arrays.contiguous(weight, cupy.float32)
        vec = (group % 8 == 0 and _arrays.aligned16(x2, dy2, z2, w, dx, dz) and x_rs * x.itemsize % 16 == 0
               and z_rs * (4 if z_f32 else x.itemsize) % 16 == 0 and dy_rs * (4 if dy_f32 else x.itemsize) % 16 == 0)
        kernel = _runtime.function(FAMILY, f"gated_bwd<{tx}, {nv}>")
        _runtime.launch(
            kernel, (grid,), (tpr, rpb),
            (dy2, np.int32(dy_f32), np.int64(dy_rs), x2, np.int64(x_rs), ptr(z2), np.int32(z_f32), np.int64(z_rs), w,
             dx, ptr(dz), dw_part, np.int64(rows), np.int32(group), np.int32(ngroups), np.float32(eps),
             np.int32(vec), np.int32(bool(norm_before_gate))),
        )
    return dx, _column_sum(dw_part, weight), None if z is None else _cast(dz, z.dtype)
