"""CuPy launcher for selective_state_update (kernel in state_update.cu).

Arguments arrive validated by ssmcore.ops.state_update. The form without heads runs as heads
of dim P = 1. No argument is copied: the kernel reads every array through its strides
(16-byte accesses where the n axis is unit-stride and aligned) and updates ``state`` in place.
B and C are read in their dtype when they share one (else both as float32); x, dt and z in
theirs; A, D and dt_bias are float32.

Two kernels (state_update.cu): ``state_update_v2`` (default; tiles of channels of one batch row,
all loads in flight, one exp per row for a per-head A) where the vector layout holds and N <= 256,
else ``state_update``. ``SSMCORE_STATE_UPDATE=v1`` (or assigning ``impl``) forces the latter.
"""

from __future__ import annotations

import os

import cupy
import numpy as np

from . import _arrays, _runtime
from ._arrays import cdiv, ptr

FAMILY = "state_update"
_TYPES = ("float", "half_t", "bf16_t")
_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
_THREADS = 128
_F32 = np.dtype(np.float32)


def _max_rows(state16: bool, bc16: bool, a_scalar: bool) -> int:
    """v2's rows per thread: 64 bytes of state in flight per thread within the register budget
    (an A chunk per row when A varies along n, wider B/C chunks and a float32 state cost registers)."""
    if a_scalar:
        return 4 if state16 and bc16 else 2
    return 2 if state16 else 1


def _max_override(state16: bool, bc16: bool, a_scalar: bool) -> int:
    """The most rows per thread SSMCORE_STATE_UPDATE_ROWS may ask for: _max_rows, and 4 for a float32 state with
    16-bit B/C and a per-head A (session 7: 128 bytes of state in flight per thread, v2 at (128, 6), v3 at (128, 5);
    a variant for timing, not the automatic choice)."""
    return 4 if (not state16 and bc16 and a_scalar) else _max_rows(state16, bc16, a_scalar)


INSTANTIATIONS = (
    [f"state_update<{ts}, {tb}, {v}>" for ts in _TYPES for tb in _TYPES for v in ("true", "false")]
    + [f"state_update_v2<{ts}, {tb}, {r}, {a}>" for ts in _TYPES for tb in _TYPES for a in ("true", "false")
       for r in (1, 2, 4) if r <= _max_override(ts != "float", tb != "float", a == "true")]
    + [f"state_update_v3<{ts}, {tb}, {r}>" for ts in _TYPES for tb in _TYPES
       for r in (1, 2, 4) if r <= _max_override(ts != "float", tb != "float", True)]
)

# "v2": state_update_v2, tiles of rows with every load issued up front, where the layout allows it (vector
# layout, N % 8 == 0, N <= 256); "v1": always the first kernel; "v3" (session 7): state_update_v3, v2's tiles
# on a persistent grid with the next tile's loads issued before the current tile's stores, where A is a
# per-head scalar (else v2); "auto" (default): v3 for a float32 state with a per-head A, else v2 (H200, session 7
# run 2, B64 H64 P64 N128: f32 state graph replay 72.2 us with v3 vs 76.8 with v2, reference 79.1 (do_bench);
# bf16 state 49.1 vs 43.0: v2 stays). Read at import; benchmarks switch it by assigning this attribute.
impl = os.environ.get("SSMCORE_STATE_UPDATE", "auto")
# v2's / v3's rows per thread (1, 2 or 4, at most _max_override(...)); 0 = automatic.
rows_override = int(os.environ.get("SSMCORE_STATE_UPDATE_ROWS", "0"))
_V2_THREADS = 128  # SSU2_THREADS


def _strides(a, ndim):
    """Element strides of a, or zeros for None."""
    if a is None:
        return (0,) * ndim
    return tuple(s // a.itemsize for s in a.strides)


def _vec_ok(a, n_axis_stride, other_strides) -> bool:
    """16-byte accesses along n: unit stride, every row start 16-byte aligned."""
    per = 16 // a.itemsize
    return n_axis_stride == 1 and _arrays.aligned16(a) and all(s % per == 0 for s in other_strides)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    _arrays.check_kernel_dtypes(state=state, x=x, dt=dt, B=B, C=C, z=z)
    for name, a in (("A", A), ("D", D), ("dt_bias", dt_bias)):
        if a is not None and a.dtype != _F32:
            raise TypeError(f"{name}: expected dtype float32 on the GPU, got {a.dtype.name}")
    ts = _arrays.kernel_type("state", state)
    if B.dtype != C.dtype:
        B, C = B.astype(cupy.float32), C.astype(cupy.float32)
    tb = _arrays.kernel_type("B", B)
    n_state = state.shape[-1]
    if state.ndim == 4:
        n_batch, n_heads, head_dim = x.shape
        st_state, st_x, st_dt, st_z = _strides(state, 4), _strides(x, 3), _strides(dt, 3), _strides(z, 3)
        st_a, st_d, st_db = _strides(A, 3), _strides(D, 2), _strides(dt_bias, 2)
    else:  # no heads: channel d is head d of dim 1
        n_batch, n_heads = x.shape
        head_dim = 1
        (sb, sd, sn) = _strides(state, 3)
        st_state = (sb, sd, 0, sn)
        st_x, st_dt, st_z = (_strides(a, 2) + (0,) for a in (x, dt, z))
        ad, an = _strides(A, 2)
        st_a = (ad, 0, an)
        st_d, st_db = (_strides(a, 1) + (0,) for a in (D, dt_bias))
    st_b, st_c = _strides_bc(B), _strides_bc(C)
    groups = next((a.shape[1] for a in (B, C) if a.ndim == 3), 1)
    out = cupy.empty(x.shape, x.dtype)
    rows = n_batch * n_heads * head_dim
    if rows == 0:
        return out
    warp = _arrays.warp_size()
    if rows >= 2**31:
        raise ValueError(f"x: expected fewer than 2**31 (batch, channel) rows on the GPU, got shape {tuple(x.shape)}")
    # Threads per state row: each thread takes two 8-entry chunks per iteration.
    tpr = min(warp, 1 << max(0, (cdiv(n_state, 16) - 1).bit_length()))
    rows_per_block = _THREADS // tpr
    vec = (
        n_state % 8 == 0
        and _vec_ok(state, st_state[3], st_state[:3])
        and (st_a[2] == 0 or _vec_ok(A, st_a[2], st_a[:2]))
        and _vec_ok(B, st_b[2], st_b[:2])
        and _vec_ok(C, st_c[2], st_c[:2])
    )
    indices = state_batch_indices
    if indices is not None and indices.dtype.itemsize > 4:  # no int64 value may wrap into a valid row
        indices = indices.clip(-1, state.shape[0])
    indices = None if indices is None else cupy.ascontiguousarray(indices, dtype=cupy.int32)
    if vec and impl != "v1" and 0 < n_state <= 8 * 32:
        _launch_v2(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, indices, out, ts, tb, n_batch, n_heads,
                   head_dim, n_state, groups, st_state, st_x, st_dt, st_z, st_a, st_b, st_c, st_d, st_db)
        return out
    kernel = _runtime.function(FAMILY, f"state_update<{ts}, {tb}, {'true' if vec else 'false'}>")
    strides = st_state + st_x + st_dt + st_z + st_a + st_b + st_c + st_d + st_db
    _runtime.launch(
        kernel, (cdiv(rows, rows_per_block),), (tpr, rows_per_block),
        (state, x, np.int32(_arrays.dtype_code(x, _CODES)), dt, np.int32(_arrays.dtype_code(dt, _CODES)), A, B, C,
         ptr(D), ptr(z), np.int32(_arrays.dtype_code(z, _CODES) if z is not None else 0), ptr(dt_bias), ptr(indices),
         out,
         np.int32(n_batch), np.int32(n_heads), np.int32(head_dim), np.int32(n_state),
         np.int32(n_heads // groups), np.int32(bool(dt_softplus)), np.int32(state.shape[0]),
         *(np.int64(s) for s in strides)),
    )
    return out


def _strides_bc(a):
    """(batch, group, n) element strides of B or C given as (B, N) (one group) or (B, G, N)."""
    s = _strides(a, a.ndim)
    return (s[0], 0, s[1]) if a.ndim == 2 else s


def _launch_v2(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, indices, out, ts, tb, n_batch, n_heads,
               head_dim, n_state, groups, st_state, st_x, st_dt, st_z, st_a, st_b, st_c, st_d, st_db):
    """state_update_v2: tiles of channels of one (batch row, group); R rows per thread."""
    tpr_log2 = max(0, (n_state // 8 - 1).bit_length())
    rows_per_step = _V2_THREADS >> tpr_log2
    a_scalar = st_a[2] == 0
    # R state chunks per thread: 64 bytes of state in flight per thread, fewer when A is loaded per
    # entry (its chunk takes 8 registers per row); fewer again while the grid would not fill the GPU.
    rows_per_thread = _max_rows(state.itemsize == 2, B.itemsize == 2, a_scalar)
    rows_per_thread = min(rows_per_thread, 1 << tpr_log2)  # each row's scalars come from one of its lanes
    channels_per_group = n_heads * head_dim // groups
    min_blocks = 2 * _arrays.sm_count()
    if rows_override:
        rows_per_thread = min(rows_override, _max_override(state.itemsize == 2, B.itemsize == 2, a_scalar),
                              1 << tpr_log2)
        min_blocks = 0
    while True:
        tiles = cdiv(channels_per_group, rows_per_step * rows_per_thread)
        if rows_per_thread == 1 or n_batch * groups * tiles >= min_blocks:
            break
        rows_per_thread //= 2
    grid = n_batch * groups * tiles
    if a_scalar and (impl == "v3" or (impl == "auto" and state.itemsize == 4)):
        kernel = _runtime.function(FAMILY, f"state_update_v3<{ts}, {tb}, {rows_per_thread}>")
        grid = min(grid, _arrays.sm_count() * _resident_blocks(kernel))
    else:
        kernel = _runtime.function(
            FAMILY, f"state_update_v2<{ts}, {tb}, {rows_per_thread}, {'true' if a_scalar else 'false'}>")
    strides = (st_state[:3] + st_x + st_dt + st_z + st_a[:2] + st_b[:2] + st_c[:2] + st_d + st_db)
    _runtime.launch(
        kernel, (grid,), (_V2_THREADS,),
        (state, x, np.int32(_arrays.dtype_code(x, _CODES)), dt, np.int32(_arrays.dtype_code(dt, _CODES)), A, B, C,
         ptr(D), ptr(z), np.int32(_arrays.dtype_code(z, _CODES) if z is not None else 0), ptr(dt_bias), ptr(indices),
         out,
         np.int32(n_batch), np.int32(n_heads), np.int32(head_dim), np.int32(n_state),
         np.int32(channels_per_group), np.int32(groups), np.int32(tiles), np.int32(tpr_log2),
         np.int32(bool(dt_softplus)), np.int32(state.shape[0]),
         *(np.int64(s) for s in strides)),
    )


_RESIDENT: dict = {}


def _resident_blocks(kernel) -> int:
    """Blocks of _V2_THREADS threads one multiprocessor holds at once, from the kernel's register count (64 K
    registers, registers given out per warp in units of 256, at most 2048 threads); 8 when unknown."""
    key = id(kernel)  # kernels are cached in _runtime, so id is stable
    if key not in _RESIDENT:
        warp = _arrays.warp_size()
        warps = cdiv(_V2_THREADS, warp)
        try:
            per_warp = -(-max(int(kernel.num_regs), 1) * warp // 256) * 256
            _RESIDENT[key] = max(1, min(2048 // _V2_THREADS, 65536 // (per_warp * warps)))
        except Exception:  # an attribute the runtime does not report (HIP, the emulator)
            _RESIDENT[key] = 8
    return _RESIDENT[key]
