"""CuPy launcher for the SSD forward (kernels in ssd.cu): the chunked form on tensor cores.

Arguments arrive validated by ssmcore.ops.ssd. Pipeline (each step a separate kernel and a
helper function below, reused by the backward for recomputation):

    _chunk_cumsum   dt' and the within-chunk cumulative decay (float32), sequence starts
    _chunk_states   each chunk's own end state (float32, B x nc x H x P x N)
    _state_passing  -> the state at the start of every chunk (in place) and the final state
    _chunk_scan     out = (intra-chunk C B^T masked/decayed . dt' x + decayed C h_prev + D x) * silu(z)
    _varlen_states  the state at the end of each sequence of cu_seqlens
    (_states_and_passing_v6: _chunk_states + _state_passing, with v6 also _chunk_cumsum, in one
    kernel: SSMCORE_SSD_FWD=v6, v6s; N % 128 == 0 only; _states_passing_v8: the same pair in one kernel
    whose blocks each walk all chunks of one (b, h, tile): SSMCORE_SSD_FWD=v8, v8d)

Chunk size: the kernels use Q in {64, 128, 256}; ``_internal_chunk`` picks the one nearest to
chunk_size on a log scale (the result does not depend on it beyond rounding). Element types:
x, z, B and C run in x's dtype when B and C share it, else all in float32; dt in its own dtype
(x's or float32); A, D, dt_bias and initial_states as float32. seq_idx (or the sequences of
cu_seqlens) enter as "sequence starts": any change of seq_idx resets the state, as in the
reference recurrence, even when seq_idx is not sorted.

Strided inputs: x, z, B and C may be views whose two innermost dimensions are C-contiguous (for example
Mamba-2's in_proj / conv output split into z | x | B | C): the v4 kernels read them through their batch and
position strides (multiples of 16 bytes, 16-byte aligned data), other paths copy them. dt may have any batch /
position strides (heads contiguous) on every path.
"""

from __future__ import annotations

import math
import os

import cupy
import numpy as np

from . import _arrays, _runtime
from ._arrays import cdiv, ptr

FAMILY = "ssd"
_TYPES = ("float", "half_t", "bf16_t")

INSTANTIATIONS = (
    ["ssd_broadcast_heads"]
    + [f"ssd_mma_selftest<{t}>" for t in _TYPES]
    + [f"ssd_chunk_cumsum<{t}>" for t in _TYPES]
    + [f"ssd_chunk_states<{t}>" for t in _TYPES]
    + ["ssd_state_passing"]
    + [f"ssd_chunk_scan<{t}>" for t in _TYPES]
    + [f"ssd_varlen_states<{t}>" for t in _TYPES]
    + [f"ssd_chunk_states_v2<{t}>" for t in _TYPES]
    + ["ssd_state_passing_v2<1>", "ssd_state_passing_v2<4>"]
    + [f"ssd_chunk_scan_v2<{t}>" for t in _TYPES]
    + [f"ssd_chunk_states_v3<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_cb_v3<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_scan_v3<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_cb_v4<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_states_v4<{t}>" for t in _TYPES[1:]]
    + [f"ssd_state_passing_v4<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_scan_v4<{t}, {p}>" for t in _TYPES[1:] for p in ("float", t)]
    + [f"ssd_chunk_scan_v5<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_states_v6<{t}, {w}>" for t in _TYPES[1:] for w in (2,)]
    + [f"ssd_chunk_scan_v7<{t}, {wm}, float, 3, 1>" for t in _TYPES[1:] for wm in (16, 32)]
    + [f"ssd_chunk_scan_v7<bf16_t, {wm}, bf16_t, {ns}, 1>" for wm in (16, 32) for ns in (3, 4)]
    + [f"ssd_chunk_scan_v7<bf16_t, 16, bf16_t, {ns}, 2>" for ns in (3, 4)]
    + ["ssd_chunk_cb_v7b<bf16_t>"]
    + [f"ssd_state_passing_v7b<{t}>" for t in _TYPES[1:]]
    + [f"ssd_chunk_states_v7<{t}>" for t in _TYPES[1:]]
    + [f"ssd_states_passing_v8<{t}, {wn}, {ns}, {t}>" for t in _TYPES[1:] for wn in (64, 128) for ns in (4, 8)]
    # fp32 starts: the backward's chunk-start states (state_space_duality_bwd.v8h0_in_v4; session 8, SSDB8c)
    + [f"ssd_states_passing_v8<{t}, {wn}, {ns}, float>" for t in _TYPES[1:] for wn in (64, 128) for ns in (4, 8)]
)

# Kernel generation: "v8" (default since session 8, see below), "v7m" (session 7's default), "v5" (session 6's default), "v4" (ldmatrix fragments, no transposed staging, chunk_scan's decayed C B^T
# operand built in registers, strided x / z / B / C rows read in place: 16-bit types with P, N multiples of 8
# and 16-byte aligned rows, else v3's rules), "v3" (chunk_scan from C B^T computed once per chunk and group, batched and
# prefetched loads; 16-bit types with 16-byte aligned rows, else v2's chunk_scan), "v2" (whole-N staging in
# chunk_scan, float4 + prefetched state passing; H200 session 4: bitwise equal to v1, main shape 4068 us vs
# v1's 5879) or "v1" (the first tensor-core kernels). All three give bitwise equal results. A module
# attribute so that a benchmark can flip it in-process.
fwd_path = os.environ.get("SSMCORE_SSD_FWD", "v8")
# "v5": v4 with ssd_chunk_scan_v5 (cp.async staging, x slices double-buffered, 16 warps per SM) where the
# 16-bit chunk-start states apply, else exactly v4. H200 session 6 run 1 (B8 L4096 H64 P64 N128 bf16): chunk scan
# stage 1151 -> 861 us, forward 1552 -> 1272 us (reference 1136); GPU tests passed with it.
# "v6": v5 with chunk_states and state passing fused into ssd_chunk_states_v6 (cp.async staging of the whole
# chunk, the passing as a chain over chunks in the epilogue: no fp32 own-states buffer, no passing kernel) where
# v5's 16-bit chunk-start states apply and no varlen states are asked for; else exactly v5. Its blocks own 64 x 128
# (p, n) tiles when N % 128 == 0, else 64 x 64, and it also does chunk_cumsum's work (no cumsum kernel); "v6n": v6
# with 64 x 64 tiles always; "v6s": v6 after the separate cumsum kernel. H200 session 6 run 3 (main shape): v6
# 1392 us, v6s 1387, v6n 1553 against v5 1267 (the fused kernel 573-758 us against states + passing 528): slower,
# so not the default; and the 64 x 64-tile form (v6n, and v6 when N % 128 != 0) failed its large-shape GPU tests
# (final states off v4's passing at B2 L1000 H8 N128 and B3 L4100 H16 N128, chunk 256), not understood yet: v6n
# is gone and v6 / v6s run only where N % 128 == 0 (64 x 128 tiles, whose tests passed), else v5.
_V6 = ("v6", "v6s")
# "v7": v5 with ssd_chunk_scan_v7 (a 3-stage cp.async pipeline over K tiles of 32: the state term C h_prev^T, then
# the intra-chunk term with the fp32 C B^T tiles staged through shared memory and decayed / masked in A-fragment
# registers; 128 x 64 (t, p) tiles of 4 warps, 64 x 64 when Q == 64) where v5's chunk scan runs (16-bit elements,
# P and N multiples of 8, 16-bit chunk-start states; else exactly what v5 does: float32, odd P / N, misaligned rows,
# varlen states and ROCm run v5's fallbacks); "v7m": v7 with 64 x 64 tiles always; "v7s": v7 with chunk_states by
# ssd_chunk_states_v7 (v4's tiles and rounding, a 4-stage cp.async pipeline, the weights applied to the A
# fragments: the same products and mma sequence as v4's, so v4's states expected bitwise; the tests allow 1e-5)
# where v4's chunk_states runs. H200 session 7 (main shape, same process): v5 1267 / 1267 us, v7 1285, v7s 1270, v7m
# 1251 / 1223 (runs 1 / 4; reference 1135 / 1142; bitwise v5's output): v7m is the default.
# "v7b" / "v7bm" / "v7bs" (session 7, helper SSDF7b): v7 / v7m / v7s with the C B^T tiles in bfloat16 for bfloat16
# inputs (ssd_chunk_cb_v7b rounds the fp32 sums once; the scan decays / masks them in fp32 and rounds again, as
# before): half the kernel's largest L2 stream (the per-head re-read of C B^T, ~1.3 of ~3.3 GB at the main shape)
# and half its A stages. float16 inputs keep fp32 C B^T (a 16-bit C B^T could overflow float16), i.e. run v7 / v7m
# / v7s exactly. "v7b4" / "v7bm4": v7b / v7bm with 4 pipeline stages instead of 3 (16-bit C B^T only: 63.5 / 43 KB
# of shared memory at Q 256). "v7bh" / "v7bh4": v7bm (64-row tiles, 16-bit C B^T; 3 / 4 stages) with blocks of 8 warps
# over 2 heads of one group that share the staged C / C B^T tiles (L2 bytes per head at the main shape ~288 -> ~216
# KB; 2 blocks = 16 warps per SM as v7bm); where the heads per group are odd or the input is float16: v7bm's kernel
# with 1 head per block. All v7b* also run the state passing as ssd_state_passing_v7b (v4's chain with 16 chunks'
# loads in flight per thread instead of 8: same arithmetic, bitwise the same starts / final states; float16 too).
# NOT the default (not yet measured).
_V7B = ("v7b", "v7bm", "v7bs", "v7b4", "v7bm4", "v7bh", "v7bh4")
# "v8" / "v8d" (session 8, helper SSDF8): v7m with chunk_states + state passing in ONE kernel without inter-block
# synchronisation, ssd_states_passing_v8: a block per (b, h, 64 p x 128 n tile; 64 x 64 when N <= 64) walks all
# chunks in order, its accumulators being the running state (writes the 16-bit chunk-start states and the final
# state; no fp32 own-states buffer, no passing kernel). v8: 4 cp.async stages, v8d: 8 (2 blocks of 256 threads per
# SM either way: 54 or 106 KB of shared memory each at N 128). Applies where v4's 16-bit starts apply, no varlen
# states are asked for and the grid has at least ``v8_min_threads`` threads (env SSMCORE_SSD_V8_MIN_THREADS;
# default 384 per SM: the chain is serial over chunks, so the grid is B * H * tiles blocks whatever L; the main
# shape B8 H64 P64 N128 has 512 blocks of 256 threads); else exactly v7m. Same values as v7m up to fp32 summation
# order (the chunk's products are summed onto the decayed carry): starts within one rounding of T. The default
# since session 8: H200 run 4 (main shape, same process) forward v8 1080.9 us, v8d 1083.0, v7m 1235.1, reference
# 1134.8 (states + passing 413 -> 263 us); its GPU tests passed (tests/gpu/test_ssd_gpu.py -k v8: 17 passed).
_V8 = ("v8", "v8d")
v8_min_threads = (int(os.environ["SSMCORE_SSD_V8_MIN_THREADS"]) if os.environ.get("SSMCORE_SSD_V8_MIN_THREADS")
                  else None)  # None: 384 x the SM count; the tests set 0
_V7 = ("v7", "v7m", "v7s") + _V7B + _V8
_V4 = ("v4", "v5") + _V6 + _V7
_V5 = ("v5",) + _V6 + _V7

_NO_LIMIT = (0.0, math.inf)


def _internal_chunk(chunk_size: int) -> int:
    """The kernels' chunk length Q: 64, 128 or 256, the nearest to chunk_size on a log scale."""
    return min((64, 128, 256), key=lambda q: abs(math.log(q) - math.log(max(1, chunk_size))))


def _f32(a):
    """A C-contiguous float32 copy-or-view of a parameter array; None stays None."""
    return None if a is None else _arrays.contiguous(a, cupy.float32)


def _seq_ids(seq_idx, cu_seqlens, length):
    """(B, L) int64 sequence ids, or None when every row is one sequence."""
    if seq_idx is not None and seq_idx.dtype == cupy.int32 and seq_idx.size:
        # widened by a kernel, not CuPy's astype: a launch plan can record it (session 8, helper OVH8)
        src = cupy.ascontiguousarray(seq_idx)
        out = cupy.empty(src.shape, cupy.int64)
        _runtime.launch(_runtime.function(FAMILY, "ssd_widen_seq"), (cdiv(out.size, 256),), (256,),
                        (src, out, np.int64(out.size)))
        return out
    if seq_idx is not None:
        return _arrays.contiguous(seq_idx, cupy.int64)
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens.get() if hasattr(cu_seqlens, "get") else cu_seqlens, dtype=np.int64)
        if cu.shape[0] <= 2:
            return None
        ids = np.repeat(np.arange(cu.shape[0] - 1, dtype=np.int64), np.diff(cu))
        return cupy.asarray(ids.reshape(1, length))
    return None


INSTANTIATIONS += ["ssd_widen_seq"]  # (session 8, OVH8: _seq_ids)


def _row_strides(a):
    """(batch, position) element strides of a (B, L, ...) array whose trailing dimensions are C-contiguous."""
    item = a.itemsize
    return (a.strides[0] // item if a.shape[0] > 1 else 0), (a.strides[1] // item if a.shape[1] > 1 else 0)


def _rows_view(a, vec16=False):
    """a (B, L, ...) itself when its trailing dimensions are C-contiguous (and, with vec16, its batch and
    position strides are multiples of 16 bytes and its data 16-byte aligned), else a C-contiguous copy.
    The kernels that take row strides read it through (_row_strides(a))."""
    if a is None:
        return None
    item, ok = a.itemsize, True
    expect = item
    for n, st in zip(reversed(a.shape[2:]), reversed(a.strides[2:])):
        if n > 1 and st != expect:
            ok = False
        expect *= n
    for n, st in zip(a.shape[:2], a.strides[:2]):
        if n > 1 and (st <= 0 or st % item or (vec16 and st % 16)):
            ok = False
    if ok and vec16 and not _arrays.aligned16(a):
        ok = False
    return a if ok else cupy.ascontiguousarray(a)


def _cumsum_buffers(batch, length, nheads, Q, seq):
    """Uninitialised (dtp, dacs, seg) of _chunk_cumsum's shapes (seg None when seq is None)."""
    nc = cdiv(length, Q)
    return (cupy.empty((batch, nheads, nc * Q), cupy.float32), cupy.empty((batch, nheads, nc * Q), cupy.float32),
            None if seq is None else cupy.empty((batch, nc * Q), cupy.int32))


def _chunk_cumsum(dt, A, dt_bias, dt_softplus, dt_limit, seq, Q):
    """dt (B, L, H) -> (dtp, dacs, seg). dt may be a strided view (heads contiguous: _rows_view).

    dtp, dacs: (B, H, nc*Q) float32, dt' and the inclusive within-chunk cumulative sum of dt' * A
    (padding past L: dt' = 0, the sum constant). seg: (B, nc*Q) int32, the within-chunk index of
    the latest sequence start at or before each position (-1: none), or None when seq is None.
    seq: (B, L) int64 sequence ids or None. A, dt_bias: float32 contiguous (dt_bias may be None).
    """
    batch, length, nheads = dt.shape
    nc = cdiv(length, Q)
    dtp = cupy.empty((batch, nheads, nc * Q), cupy.float32)
    dacs = cupy.empty((batch, nheads, nc * Q), cupy.float32)
    seg = None if seq is None else cupy.empty((batch, nc * Q), cupy.int32)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = (lo, hi) != _NO_LIMIT
    kernel = _runtime.function(FAMILY, f"ssd_chunk_cumsum<{_arrays.kernel_type('dt', dt)}>")
    sdb, sdl = _row_strides(dt)
    _runtime.launch(kernel, (nc, nheads, batch), (Q,),
                    (dt, np.int64(sdb), np.int64(sdl), A, ptr(dt_bias), ptr(seq), np.int32(length), np.int32(nheads),
                     np.int32(Q),
                     np.int32(bool(dt_softplus)), np.int32(clamp), np.float32(lo if clamp else 0.0),
                     np.float32(hi if clamp else 0.0), dtp, dacs, ptr(seg)))
    return dtp, dacs, seg


_MAX_SHARED = {}


def _max_shared() -> int:
    """Dynamic shared memory a block may opt in to on the current device (less 2 KiB for static)."""
    try:
        dev = cupy.cuda.runtime.getDevice()
    except Exception:  # noqa: BLE001 - the CPU emulator (no device; its shared memory is 256 KiB)
        return 227 * 1024 - 2048
    if dev not in _MAX_SHARED:
        # cudaDevAttrMaxSharedMemoryPerBlockOptin = 97; AMD: 64 KiB of LDS per workgroup
        limit = 64 * 1024 if _runtime.is_hip() else int(cupy.cuda.runtime.deviceGetAttribute(97, dev))
        _MAX_SHARED[dev] = limit - 2048
    return _MAX_SHARED[dev]


def _vec(x, B, C=None) -> int:
    """1 when the kernels may stage x/B/C rows with 16-byte loads (P and N multiples of 8, aligned)."""
    return int(x.shape[3] % 8 == 0 and B.shape[3] % 8 == 0 and _arrays.aligned16(x, B, C))


def _v4_ok(*arrays) -> bool:
    """The v4 kernels apply: 16-bit elements, last dimension a multiple of 8, 16-byte aligned rows
    (views from _rows_view(.., vec16=True) or contiguous arrays). Not on ROCm: hipcc spills the v4 kernels
    heavily (gfx90a: 0.8-1 KB per thread), so SSMCORE_SSD_FWD=v4 runs v3 there."""
    if _runtime.is_hip():
        return False
    for a in arrays:
        if a is None:
            continue
        if a.itemsize != 2 or a.shape[-1] % 8 or not _arrays.aligned16(a):
            return False
        if any(st % 16 for n, st in zip(a.shape[:2], a.strides[:2]) if n > 1):
            return False
        if a.strides[-1] != 2 or (a.shape[-2] > 1 and a.strides[-2] != 2 * a.shape[-1]):
            return False
    return True


def _contiguous_rows(*arrays):
    """C-contiguous versions (the v1-v3 kernels index rows as contiguous)."""
    return tuple(None if a is None else cupy.ascontiguousarray(a) for a in arrays)


def _chunk_states(x, B, dtp, dacs, seg, Q):
    """Each chunk's own contribution to its end state: (B, nc, H, P, N) float32.

    x (B, L, H, P) and B (B, L, G, N), same dtype, C-contiguous or (v4) strided views from _rows_view;
    dtp/dacs/seg from _chunk_cumsum.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    states = cupy.empty((batch, nc, nheads, headdim, dstate), cupy.float32)
    blocks = cdiv(headdim, 64) * cdiv(dstate, 64) * nheads * nc
    if fwd_path in _V4 and _v4_ok(x, B):
        name = "ssd_chunk_states_v7" if fwd_path in ("v7s", "v7bs") else "ssd_chunk_states_v4"
        kernel = _runtime.function(FAMILY, f"{name}<{_arrays.kernel_type('x', x)}>")
        sxb, sxl = _row_strides(x)
        sbb, sbl = _row_strides(B)
        _runtime.launch(kernel, (blocks, batch), (128,),
                        (x, np.int64(sxb), np.int64(sxl), B, np.int64(sbb), np.int64(sbl), dtp, dacs, ptr(seg),
                         np.int32(length), np.int32(nheads), np.int32(ngroups), np.int32(headdim), np.int32(dstate),
                         np.int32(Q), np.int32(nc), states))
        return states
    x, B = _contiguous_rows(x, B)
    if fwd_path in ("v3",) + _V4 and x.itemsize == 2 and _vec(x, B):
        kernel = _runtime.function(FAMILY, f"ssd_chunk_states_v3<{_arrays.kernel_type('x', x)}>")
        _runtime.launch(kernel, (blocks, batch), (128,),
                        (x, B, dtp, dacs, ptr(seg), np.int32(length), np.int32(nheads), np.int32(ngroups),
                         np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc), states))
        return states
    name = "ssd_chunk_states" if fwd_path == "v1" else "ssd_chunk_states_v2"
    kernel = _runtime.function(FAMILY, f"{name}<{_arrays.kernel_type('x', x)}>")
    _runtime.launch(kernel, (blocks, batch), (128,),
                    (x, B, dtp, dacs, ptr(seg), np.int32(length), np.int32(nheads), np.int32(ngroups),
                     np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc), np.int32(_vec(x, B)), states))
    return states


def _state_passing(states, dacs, seg, initial_states, Q):
    """Turns states (B, nc, H, P, N) float32 from _chunk_states, in place, into the state at the
    start of each chunk; returns the final state (B, H, P, N) float32. initial_states: float32
    contiguous (B, H, P, N) or None."""
    batch, nc, nheads, headdim, dstate = states.shape
    final = cupy.empty((batch, nheads, headdim, dstate), cupy.float32)
    pn = headdim * dstate
    if fwd_path != "v1":
        v = 4 if pn % 4 == 0 and _arrays.aligned16(initial_states) else 1
        kernel = _runtime.function(FAMILY, f"ssd_state_passing_v2<{v}>")
        grid = (cdiv(pn, 256 * v), nheads, batch)
    else:
        kernel = _runtime.function(FAMILY, "ssd_state_passing")
        grid = (cdiv(pn, 256), nheads, batch)
    _runtime.launch(kernel, grid, (256,),
                    (states, dacs, ptr(seg), ptr(initial_states), np.int32(nheads), np.int32(pn), np.int32(Q),
                     np.int32(nc), final))
    return final


def _state_passing_v4(states, dacs, seg, initial_states, Q, dtype):
    """Like _state_passing, but the chunk-start states go to a new (B, nc, H, P, N) array in ``dtype``
    (x's 16-bit type; chunk_scan rounds them to it anyway) and states is left as it is. Returns
    (final float32, starts). Needs P * N % 4 == 0 and 16-byte aligned initial_states."""
    batch, nc, nheads, headdim, dstate = states.shape
    final = cupy.empty((batch, nheads, headdim, dstate), cupy.float32)
    starts = cupy.empty(states.shape, dtype)
    pn = headdim * dstate
    name = "ssd_state_passing_v7b" if fwd_path in _V7B else "ssd_state_passing_v4"
    kernel = _runtime.function(FAMILY, f"{name}<{_arrays.kernel_type('x', starts)}>")
    _runtime.launch(kernel, (cdiv(pn, 1024), nheads, batch), (256,),
                    (states, dacs, ptr(seg), ptr(initial_states), np.int32(nheads), np.int32(pn), np.int32(Q),
                     np.int32(nc), starts, final))
    return final, starts


def _states_v6_ok(x, z, B, C, initial_states, Q) -> bool:
    """ssd_chunk_states_v6 applies: the v4 pipeline with 16-bit chunk-start states (see _v4_starts_ok; P and N
    are multiples of 8 there) and fp32 initial_states 8-byte aligned (float2 reads)."""
    return (fwd_path in _V6 and _v4_ok(x, z, B, C) and _arrays.aligned16(initial_states)
            and B.shape[3] % 128 == 0 and _scan_v4_smem(B.shape[3]) <= _max_shared()
            and _states_v6_smem(Q, _states_v6_wn(B.shape[3])) <= _max_shared())


def _states_v6_wn(dstate):
    """ssd_chunk_states_v6's tile width in 64-column units: 2 (64 x 128, 8 warps) when N % 128 == 0 (v6)."""
    return 2 if dstate % 128 == 0 else 1  # 1: only reached by the tests of the (unused) 64 x 64 form


def _states_v6_smem(Q, wn):
    return Q * (72 + 64 * wn + 8) * 2


def _states_and_passing_v6(x, B, dtp, dacs, seg, initial_states, Q, cumsum=None):
    """_chunk_states + _state_passing_v4 in one kernel (ssd_chunk_states_v6): (final float32 (B, H, P, N),
    starts (B, nc, H, P, N) in x's dtype), the same values. x, B as for _chunk_states (v4 rules must hold).

    cumsum: None (dtp, dacs, seg from _chunk_cumsum) or (dt, A, dt_bias, dt_softplus, dt_limit, seq) as for
    _chunk_cumsum: then the kernel does its work too and fills dtp, dacs and seg (buffers of _chunk_cumsum's
    shapes; seg None when seq is None) for _chunk_scan."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    wn = _states_v6_wn(dstate)
    tiles = cdiv(headdim, 64) * cdiv(dstate, 64 * wn)
    blocks = tiles * nheads * batch * nc
    if blocks >= 2**31:
        raise ValueError(f"x: too many (chunk, head, tile) blocks for the GPU kernels: {blocks}")
    final = cupy.empty((batch, nheads, headdim, dstate), cupy.float32)
    starts = cupy.empty((batch, nc, nheads, headdim, dstate), x.dtype)
    sync = cupy.zeros(1 + batch * nheads * tiles, cupy.int32)  # ticket counter, then a flag per tile
    sxb, sxl = _row_strides(x)
    sbb, sbl = _row_strides(B)
    if cumsum is None:
        cs = (_arrays.NULL, np.int32(0), np.int64(0), np.int64(0), _arrays.NULL, _arrays.NULL, _arrays.NULL,
              np.int32(0), np.int32(0), np.float32(0.0), np.float32(0.0))
    else:
        dt, A, dt_bias, dt_softplus, dt_limit, seq = cumsum
        lo, hi = float(dt_limit[0]), float(dt_limit[1])
        clamp = (lo, hi) != _NO_LIMIT
        sdb, sdl = _row_strides(dt)
        cs = (dt, np.int32(dt.dtype == cupy.float32), np.int64(sdb), np.int64(sdl), A, ptr(dt_bias), ptr(seq),
              np.int32(bool(dt_softplus)), np.int32(clamp), np.float32(lo if clamp else 0.0),
              np.float32(hi if clamp else 0.0))
    kernel = _runtime.function(FAMILY, f"ssd_chunk_states_v6<{_arrays.kernel_type('x', x)}, {wn}>")
    _runtime.launch(kernel, (blocks,), (128 * wn,),
                    (x, np.int64(sxb), np.int64(sxl), B, np.int64(sbb), np.int64(sbl), dtp, dacs, ptr(seg),
                     ptr(initial_states), np.int32(batch), np.int32(length), np.int32(nheads), np.int32(ngroups),
                     np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc), sync, starts, final) + cs,
                    shared_mem=_states_v6_smem(Q, wn))
    return final, starts


def _v8_tile(dstate) -> int:
    """ssd_states_passing_v8's n-tile width: 128 (256 threads) when N > 64, else 64 (128 threads)."""
    return 128 if dstate > 64 else 64


def _v8_smem(dstate) -> int:
    wn = _v8_tile(dstate)
    return (8 if fwd_path == "v8d" else 4) * 32 * (72 + wn + 8) * 2 + 2048


_SMS = {}


def _v8_threads_needed() -> int:
    """The fewest grid threads for which ssd_states_passing_v8 runs (v8_min_threads, else 384 per SM)."""
    if v8_min_threads is not None:
        return int(v8_min_threads)
    try:
        dev = cupy.cuda.runtime.getDevice()
    except Exception:  # noqa: BLE001 - the CPU emulator
        return 0
    if dev not in _SMS:
        _SMS[dev] = int(cupy.cuda.runtime.deviceGetAttribute(16, dev))  # cudaDevAttrMultiProcessorCount
    return 384 * _SMS[dev]


def _v8_ok(x, z, B, C, initial_states, Q) -> bool:
    """ssd_states_passing_v8 applies (fwd_path v8 / v8d): v4's 16-bit-starts rules (_v4_starts_ok; P, N multiples
    of 8, aligned rows), and a grid of at least _v8_threads_needed() threads."""
    if fwd_path not in _V8 or not _v4_ok(x, z, B, C) or not _arrays.aligned16(initial_states):
        return False
    batch, _, nheads, headdim = x.shape
    dstate = B.shape[3]
    if _scan_v4_smem(dstate) > _max_shared() or _v8_smem(dstate) > _max_shared():
        return False
    wn = _v8_tile(dstate)
    blocks = batch * nheads * cdiv(headdim, 64) * cdiv(dstate, wn)
    return blocks < 2**31 and blocks * 2 * wn >= _v8_threads_needed()


def _states_passing_v8(x, B, dtp, dacs, seg, initial_states, Q, starts=None):
    """_chunk_states + _state_passing_v4 in one kernel (ssd_states_passing_v8): (final float32 (B, H, P, N),
    starts (B, nc, H, P, N) in x's dtype). x, B as for _chunk_states (v4 rules must hold: _v8_ok).
    starts: None (a new array in x's dtype) or a C-contiguous float32 (B, nc, H, P, N) array written in place
    (unrounded fp32 starts: the backward's h0, session 8 SSDB8c)."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    wn = _v8_tile(dstate)
    ns = 8 if fwd_path == "v8d" else 4
    blocks = batch * nheads * cdiv(headdim, 64) * cdiv(dstate, wn)
    final = cupy.empty((batch, nheads, headdim, dstate), cupy.float32)
    typ = _arrays.kernel_type("x", x)
    # the starts' type always named (hiprtc finds no kernel for a name that leaves a defaulted argument out)
    name = f"ssd_states_passing_v8<{typ}, {wn}, {ns}, {typ}>"
    if starts is None:
        starts = cupy.empty((batch, nc, nheads, headdim, dstate), x.dtype)
    else:
        if (starts.dtype != cupy.float32 or starts.shape != (batch, nc, nheads, headdim, dstate)
                or not starts.flags.c_contiguous):
            raise ValueError("starts: expected a C-contiguous float32 (B, nc, H, P, N) array")
        name = f"ssd_states_passing_v8<{typ}, {wn}, {ns}, float>"
    sxb, sxl = _row_strides(x)
    sbb, sbl = _row_strides(B)
    kernel = _runtime.function(FAMILY, name)
    _runtime.launch(kernel, (blocks,), (2 * wn,),
                    (x, np.int64(sxb), np.int64(sxl), B, np.int64(sbb), np.int64(sbl), dtp, dacs, ptr(seg),
                     ptr(initial_states), np.int32(length), np.int32(nheads), np.int32(ngroups), np.int32(headdim),
                     np.int32(dstate), np.int32(Q), np.int32(nc), starts, final),
                    shared_mem=_v8_smem(dstate))
    return final, starts


def _v4_starts_ok(x, z, B, C, states, initial_states) -> bool:
    """The v4 pipeline with 16-bit chunk-start states applies (see _state_passing_v4, _chunk_scan)."""
    return (fwd_path in _V4 and _v4_ok(x, z, B, C) and (states.shape[3] * states.shape[4]) % 4 == 0
            and _arrays.aligned16(initial_states) and _scan_v4_smem(B.shape[3]) <= _max_shared())


def _scan_v4_smem(dstate):
    ldc = cdiv(dstate, 32) * 32 + 8
    return 64 * (max(ldc, 72) + ldc) * 2


def _scan_v5_smem(dstate, Q):
    ldc = cdiv(dstate, 32) * 32 + 8
    return 2 * 64 * max(ldc, 72) * 2 + 2 * 64 * 72 * 2 + (2 * Q + 64) * 4


def _scan_v7_wm(Q):
    """ssd_chunk_scan_v7's rows per warp: 32 (128-row tiles) for "v7" when Q >= 128, else 16 (64-row tiles)."""
    return 32 if fwd_path in ("v7", "v7s", "v7b", "v7bs", "v7b4") and Q >= 128 else 16


def _scan_v7_cb16(x) -> bool:
    """ssd_chunk_scan_v7 reads 16-bit C B^T tiles ("v7b*" with bfloat16 inputs)."""
    return fwd_path in _V7B and _arrays.kernel_type("x", x) == "bf16_t"


def _scan_v7_stages(cb16) -> int:
    """ssd_chunk_scan_v7's pipeline depth: 4 for "v7b4" / "v7bm4" with 16-bit C B^T, else 3."""
    return 4 if cb16 and fwd_path in ("v7b4", "v7bm4", "v7bh4") else 3


def _scan_v7_heads(cb16, nheads, ngroups) -> int:
    """ssd_chunk_scan_v7's heads per block: 2 for "v7bh" / "v7bh4" (16-bit C B^T, even heads per group), else 1."""
    return 2 if cb16 and fwd_path in ("v7bh", "v7bh4") and (nheads // ngroups) % 2 == 0 else 1


def _scan_v7_smem(Q, wm, cb_bytes=4, stages=3, heads=1):
    """stages x (4 wm x max(32 C B^T (fp32 or 16-bit), 40 T of C) | 64 x 40 T) plus the chunk's dacs / dt' (Q
    floats each)."""
    return stages * (4 * wm * max(32 * cb_bytes, 40 * 2) + heads * 64 * 40 * 2) + heads * 2 * Q * 4


def _passing_for_scan(states, dacs, seg, initial_states, Q, x, z, B, C, keep_f32=False):
    """State passing feeding _chunk_scan: (final, prev). prev is x-typed chunk-start states (v4) unless
    keep_f32 (the varlen states need the fp32 ones) or v4 does not apply: then states, turned in place."""
    if not keep_f32 and _v4_starts_ok(x, z, B, C, states, initial_states):
        return _state_passing_v4(states, dacs, seg, initial_states, Q, x.dtype)
    return _state_passing(states, dacs, seg, initial_states, Q), states


def _chunk_scan(x, z, B, C, dtp, dacs, seg, prev, D, Q):
    """out (B, L, H, P) in x's dtype from the chunk-start states prev (B, nc, H, P, N) float32, or in
    x's dtype from _state_passing_v4 (then the v4 kernels must apply: see _passing_for_scan).

    D: (H, P) float32 contiguous or None; z like x or None.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    blocks = cdiv(headdim, 64) * (Q // 64) * nheads * nc
    if prev.dtype != cupy.float32 or (fwd_path in _V4 and _v4_ok(x, z, B, C)):
        smem = _scan_v4_smem(dstate)
        if smem <= _max_shared():
            if (fwd_path in _V7 and prev.dtype != cupy.float32
                    and max(_scan_v7_smem(Q, _scan_v7_wm(Q)), _scan_v7_smem(Q, _scan_v7_wm(Q), 2, 4, 2)) <= _max_shared()):
                return _chunk_scan_v7(x, z, B, C, dtp, dacs, seg, prev, D, Q, cdiv(dstate, 32) * 32 + 8)
            # v5 copies D with 16-byte cp.async: a user's (H, P) view may start off the boundary
            v5 = (fwd_path in _V5 and prev.dtype != cupy.float32 and _arrays.aligned16(D)
                  and _scan_v5_smem(dstate, Q) <= _max_shared())
            return _chunk_scan_v4(x, z, B, C, dtp, dacs, seg, prev, D, Q, cdiv(dstate, 32) * 32 + 8,
                                  _scan_v5_smem(dstate, Q) if v5 else smem, v5)
    x, z, B, C = _contiguous_rows(x, z, B, C)
    # The block's C tile in dynamic shared memory: 64 rows of roundup(N, 32) + pad (conflict-free rows).
    ldc = cdiv(dstate, 32) * 32 + (8 if x.itemsize == 2 else 4)
    smem = 64 * ldc * x.itemsize
    name = "ssd_chunk_scan"
    if fwd_path != "v1":
        # v2/v3 also keep h_prev / B_s (64 x ldc) and M, X_s (64 x 72|68) there; v1 when that does not fit.
        smem_v2 = 2 * 64 * (ldc + (72 if x.itemsize == 2 else 68)) * x.itemsize
        if smem_v2 <= _max_shared():
            name, smem = "ssd_chunk_scan_v2", smem_v2
            if fwd_path in ("v3",) + _V4 and x.itemsize == 2 and _vec(x, B, C):
                return _chunk_scan_v3(x, z, B, C, dtp, dacs, seg, prev, D, Q, ldc, smem)
    out = cupy.empty(x.shape, x.dtype)
    kernel = _runtime.function(FAMILY, f"{name}<{_arrays.kernel_type('x', x)}>")
    _runtime.launch(kernel, (blocks, batch), (128,),
                    (x, ptr(z), B, C, dtp, dacs, ptr(seg), prev, ptr(D), np.int32(length), np.int32(nheads),
                     np.int32(ngroups), np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc),
                     np.int32(_vec(x, B, C)), np.int32(ldc), out), shared_mem=smem)
    return out


def _chunk_scan_v3(x, z, B, C, dtp, dacs, seg, prev, D, Q, ldc, smem):
    """_chunk_scan through C B^T tiles computed once per (batch, chunk, group): ssd_chunk_cb_v3 writes
    the 64 x 64 tiles on and below each chunk's diagonal (float32), ssd_chunk_scan_v3 consumes them."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    t4 = Q // 64
    ntri = t4 * (t4 + 1) // 2
    typ = _arrays.kernel_type("x", x)
    cb = cupy.empty((batch, nc, ngroups, ntri, 64, 64), cupy.float32)
    _runtime.launch(_runtime.function(FAMILY, f"ssd_chunk_cb_v3<{typ}>"), (nc * ngroups * ntri, batch), (128,),
                    (B, C, np.int32(length), np.int32(ngroups), np.int32(dstate), np.int32(Q), np.int32(nc),
                     np.int32(ldc), cb), shared_mem=2 * 64 * ldc * x.itemsize)
    out = cupy.empty(x.shape, x.dtype)
    blocks = cdiv(headdim, 64) * t4 * nheads * nc
    _runtime.launch(_runtime.function(FAMILY, f"ssd_chunk_scan_v3<{typ}>"), (blocks, batch), (128,),
                    (x, ptr(z), C, dtp, dacs, ptr(seg), prev, ptr(D), cb, np.int32(length), np.int32(nheads),
                     np.int32(ngroups), np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc),
                     np.int32(ldc), out), shared_mem=smem)
    return out


def _chunk_scan_v4(x, z, B, C, dtp, dacs, seg, prev, D, Q, ldc, smem, v5=False):
    """_chunk_scan with the v4 kernels: ssd_chunk_cb_v4 (v3's lower-triangular fp32 C B^T tiles, strided
    B / C) then ssd_chunk_scan_v4 (strided x / z / C, out contiguous), or with v5 (prev in x's type)
    ssd_chunk_scan_v5 (same arguments and grid)."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    t4 = Q // 64
    ntri = t4 * (t4 + 1) // 2
    typ = _arrays.kernel_type("x", x)
    sbb, sbl = _row_strides(B)
    scb, scl = _row_strides(C)
    cb = cupy.empty((batch, nc, ngroups, ntri, 64, 64), cupy.float32)
    _runtime.launch(_runtime.function(FAMILY, f"ssd_chunk_cb_v4<{typ}>"), (nc * ngroups * ntri, batch), (128,),
                    (B, np.int64(sbb), np.int64(sbl), C, np.int64(scb), np.int64(scl), np.int32(length),
                     np.int32(ngroups), np.int32(dstate), np.int32(Q), np.int32(nc), np.int32(ldc), cb),
                    shared_mem=2 * 64 * ldc * 2)
    out = cupy.empty(x.shape, x.dtype)
    sxb, sxl = _row_strides(x)
    szb, szl = _row_strides(z) if z is not None else (0, 0)
    blocks = cdiv(headdim, 64) * t4 * nheads * nc
    ptyp = "float" if prev.dtype == cupy.float32 else typ
    name = f"ssd_chunk_scan_v5<{typ}>" if v5 else f"ssd_chunk_scan_v4<{typ}, {ptyp}>"
    _runtime.launch(_runtime.function(FAMILY, name), (blocks, batch), (128,),
                    (x, np.int64(sxb), np.int64(sxl), ptr(z), np.int64(szb), np.int64(szl), C, np.int64(scb),
                     np.int64(scl), dtp, dacs, ptr(seg), prev, ptr(D), cb, np.int32(length), np.int32(nheads),
                     np.int32(ngroups), np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc),
                     np.int32(ldc), out), shared_mem=smem)
    return out


def _chunk_scan_v7(x, z, B, C, dtp, dacs, seg, prev, D, Q, ldc):
    """_chunk_scan with ssd_chunk_cb_v4 (v4's lower-triangular fp32 C B^T tiles) then ssd_chunk_scan_v7 (the
    pipelined kernel; prev in x's 16-bit type from _state_passing_v4, strided x / z / C, out contiguous)."""
    batch, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nc = cdiv(length, Q)
    t4 = Q // 64
    ntri = t4 * (t4 + 1) // 2
    typ = _arrays.kernel_type("x", x)
    sbb, sbl = _row_strides(B)
    scb, scl = _row_strides(C)
    cb16 = _scan_v7_cb16(x)
    cb = cupy.empty((batch, nc, ngroups, ntri, 64, 64), x.dtype if cb16 else cupy.float32)
    cb_name = f"ssd_chunk_cb_v7b<{typ}>" if cb16 else f"ssd_chunk_cb_v4<{typ}>"
    _runtime.launch(_runtime.function(FAMILY, cb_name), (nc * ngroups * ntri, batch), (128,),
                    (B, np.int64(sbb), np.int64(sbl), C, np.int64(scb), np.int64(scl), np.int32(length),
                     np.int32(ngroups), np.int32(dstate), np.int32(Q), np.int32(nc), np.int32(ldc), cb),
                    shared_mem=2 * 64 * ldc * 2)
    out = cupy.empty(x.shape, x.dtype)
    sxb, sxl = _row_strides(x)
    szb, szl = _row_strides(z) if z is not None else (0, 0)
    wm = _scan_v7_wm(Q)
    tc, ns, hb = (typ if cb16 else "float"), _scan_v7_stages(cb16), _scan_v7_heads(cb16, nheads, ngroups)
    blocks = cdiv(headdim, 64) * (Q // (4 * wm)) * (nheads // hb) * nc
    _runtime.launch(_runtime.function(FAMILY, f"ssd_chunk_scan_v7<{typ}, {wm}, {tc}, {ns}, {hb}>"), (blocks, batch),
                    (128 * hb,),
                    (x, np.int64(sxb), np.int64(sxl), ptr(z), np.int64(szb), np.int64(szl), C, np.int64(scb),
                     np.int64(scl), dtp, dacs, ptr(seg), prev, ptr(D), cb, np.int32(length), np.int32(nheads),
                     np.int32(ngroups), np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(nc), out),
                    shared_mem=_scan_v7_smem(Q, wm, 2 if cb16 else 4, ns, hb))
    return out


def _varlen_states(x, B, dtp, dacs, seg, prev, cu_seqlens, Q):
    """The state at the end of each sequence of cu_seqlens (batch 1): (S, H, P, N) float32."""
    _, length, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    x, B = _contiguous_rows(x, B)
    cu = np.asarray(cu_seqlens.get() if hasattr(cu_seqlens, "get") else cu_seqlens, dtype=np.int64)
    ends = cupy.asarray(cu[1:] - 1)
    nseq = ends.shape[0]
    out = cupy.empty((nseq, nheads, headdim, dstate), cupy.float32)
    kernel = _runtime.function(FAMILY, f"ssd_varlen_states<{_arrays.kernel_type('x', x)}>")
    _runtime.launch(kernel, (cdiv(headdim * dstate, 128), nheads, nseq), (128,),
                    (x, B, dtp, dacs, ptr(seg), prev, ends, np.int32(length), np.int32(nheads), np.int32(ngroups),
                     np.int32(headdim), np.int32(dstate), np.int32(Q), np.int32(cdiv(length, Q)), out))
    return out


def _prepare(x, dt, A, B, C, D, z, dt_bias, initial_states):
    """Arrays in the kernels' types (see the module docstring). x, z, B, C: strided views where the v4
    kernels can read them in place (_rows_view), else C-contiguous; dt: heads contiguous, any row strides."""
    _arrays.check_kernel_dtypes(x=x, dt=dt, B=B, C=C, z=z)
    work = x.dtype if (B.dtype == x.dtype and C.dtype == x.dtype) else cupy.dtype(cupy.float32)
    if fwd_path in _V4 and work.itemsize == 2 and not _runtime.is_hip():
        x, z, B, C = (None if a is None else _rows_view(a, vec16=True) for a in (x, z, B, C))
    else:
        x, z, B, C = (_arrays.contiguous(a, work) for a in (x, z, B, C))
    dt_type = dt.dtype if dt.dtype in (x.dtype, cupy.float32) else cupy.dtype(cupy.float32)
    dt = _rows_view(dt if dt.dtype == dt_type else dt.astype(dt_type))
    nheads, headdim = x.shape[2], x.shape[3]
    D_full = None
    if D is not None:
        D_full = _f32(D)
        if D_full.ndim == 1:
            per_head, D_full = D_full, cupy.empty((nheads, headdim), cupy.float32)
            if D_full.size:
                _runtime.launch(_runtime.function(FAMILY, "ssd_broadcast_heads"), (cdiv(D_full.size, 256),), (256,),
                                (per_head, D_full, np.int32(nheads), np.int32(headdim)))
    return x, dt, _f32(A), B, C, D_full, z, _f32(dt_bias), _f32(initial_states)


def _grid_limits(x, cu_seqlens, return_varlen_states):
    """Launch-grid limits (grid y/z dimensions < 2**16)."""
    batch, _, nheads, _ = x.shape
    if batch > 65535:
        raise ValueError(f"x: expected a batch of at most 65535 on the GPU, got {batch}")
    if nheads > 65535:
        raise ValueError(f"x: expected at most 65535 heads on the GPU, got {nheads}")
    if return_varlen_states and cu_seqlens.shape[0] - 1 > 65535:
        raise ValueError(f"cu_seqlens: expected at most 65535 sequences on the GPU, got {cu_seqlens.shape[0] - 1}")


def _cast_state(a, state_dtype):
    if state_dtype is None or a.dtype == state_dtype:
        return a
    return a.astype(state_dtype)


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False, state_dtype=None):
    """CuPy SSD forward; arguments already validated by ssmcore.ops.ssd.ssd (same returns)."""
    _grid_limits(x, cu_seqlens, return_varlen_states)
    out_dtype = x.dtype
    xk, dtk, Ak, Bk, Ck, Dk, zk, biask, initk = _prepare(x, dt, A, B, C, D, z, dt_bias, initial_states)
    batch, length, nheads, headdim = x.shape
    dstate = B.shape[3]
    if length == 0:
        out = cupy.empty(x.shape, out_dtype)
        final = initk.copy() if initk is not None else cupy.zeros((batch, nheads, headdim, dstate), cupy.float32)
        varlen = cupy.zeros((0, nheads, headdim, dstate), cupy.float32)
    else:
        Q = _internal_chunk(chunk_size)
        seq = _seq_ids(seq_idx, cu_seqlens, length)
        if not return_varlen_states and _states_v6_ok(xk, zk, Bk, Ck, initk, Q):
            if fwd_path == "v6s":
                dtp, dacs, seg = _chunk_cumsum(dtk, Ak, biask, dt_softplus, dt_limit, seq, Q)
                cumsum = None
            else:  # the states kernel does the cumsum's work
                dtp, dacs, seg = _cumsum_buffers(batch, length, nheads, Q, seq)
                cumsum = (dtk, Ak, biask, dt_softplus, dt_limit, seq)
            final, prev = _states_and_passing_v6(xk, Bk, dtp, dacs, seg, initk, Q, cumsum)
        elif not return_varlen_states and _v8_ok(xk, zk, Bk, Ck, initk, Q):
            dtp, dacs, seg = _chunk_cumsum(dtk, Ak, biask, dt_softplus, dt_limit, seq, Q)
            final, prev = _states_passing_v8(xk, Bk, dtp, dacs, seg, initk, Q)
        else:
            dtp, dacs, seg = _chunk_cumsum(dtk, Ak, biask, dt_softplus, dt_limit, seq, Q)
            states = _chunk_states(xk, Bk, dtp, dacs, seg, Q)
            final, prev = _passing_for_scan(states, dacs, seg, initk, Q, xk, zk, Bk, Ck,
                                            keep_f32=return_varlen_states)
        out = _chunk_scan(xk, zk, Bk, Ck, dtp, dacs, seg, prev, Dk, Q)
        if out.dtype != out_dtype:
            out = out.astype(out_dtype)
        varlen = _varlen_states(xk, Bk, dtp, dacs, seg, states, cu_seqlens, Q) if return_varlen_states else None
    result = [out]
    if return_final_states:
        result.append(_cast_state(final, state_dtype))
    if return_varlen_states:
        result.append(_cast_state(varlen, state_dtype))
    return result[0] if len(result) == 1 else tuple(result)
