"""CuPy launcher for the SSD (Mamba-2) backward (kernels in ssd_bwd.cu; the math in its header).

Arguments arrive validated by ssmcore.ops.ssd.ssd_bwd. The backward recomputes what it needs
from the inputs (chunk cumsum, chunk states, chunk-start states by state passing, y for dz), so
it needs nothing saved from the forward. x, B, C, dout and z are read in their dtype when they
share one (else all as float32); dt, A, D, dt_bias, initial_states and dfinal_states as float32
(float64 parameters are accepted; their gradients come back in float64, computed in float32).
The chunk matrix products run on tensor cores (ssdb_mm: bf16/f16 operands for 16-bit inputs,
3xTF32 for float32 inputs, fp32 accumulation); the rest is fp32 SIMT. Every output element has a
single writer and the sums over batch, chunks and the heads of a group are taken afterwards, so
results are deterministic (no atomics).

chunk_size: a speed/memory knob only (results do not depend on it beyond rounding). The chunk is
capped at 256 and at L. Scratch (float32): v1-v3 keep two (Q x Q) matrices per chunk (C_t . B_s per
group, dy_t . x_s per head) and per-head dB / dC: about B*L*H*(Q + 4P + 2N) + 2*B*nc*H*P*N floats
(~7 GB at B8 L4096 H64 P64 N128); v4 (16-bit inputs) keeps the Q x Q matrices per group only and no
per-head (B, L, H, N) or hC / dhB buffers: about B*L*H*(P + 18) + 2*B*nc*H*P*N + 2*B*nc*G*Q*Q floats
(~1.3 GB there, plus the outputs).

Speed knob: the environment variable SSMCORE_SSD_BWD_IMPL (read at each call): v4 (default; for 16-bit
x/B/C/dout on CUDA, otherwise it runs v3), v5 (experimental: v4 with two reworked kernels; falls back like v4),
v3, v2 or v1 (the previous kernels, kept for comparison; see IMPL_ENV below). Under v4 the p sums (no z) come
from ssdb_tp6 (SSMCORE_SSD_BWD_TP6=0: v4's two ssdb_h4 kernels). Session 7's cp.async-pipelined kernels are on by
default where their layout rules hold (H200, B8 L4096 H64 P64 N128 bf16: backward 10466 -> 6966 us): dx by ssdb_dx7
instead of ssdb_h4<T, 3> (2371 -> 1057 us; SSMCORE_SSD_BWD_DX7=0 off), the chunk states by ssdb_st7 instead of
ssdb_h4<T, 4 / 5> (1009 + 822 -> 284 + 282; SSMCORE_SSD_BWD_ST7=0 off), the p sums (no z) by ssdb_tp7 instead of
ssdb_tp6 (1731 -> 781; SSMCORE_SSD_BWD_TP7=0 off), F with the dcs row / column sums by ssdb_g7<T, 0> instead of
ssdb_g4<T, 0> (1984 -> 518) and dC / dB by ssdb_g7b<T, 1 / 2> instead of ssdb_g4<T, 1 / 2> (690 + 905 -> 378 + 372;
SSMCORE_SSD_BWD_G7=0 off; module attributes g7_in_v4 and g7_kinds): backward 6908 -> 4585 us (H200 run 4).
Session 8 (SSDB8a): under v4 without z the fp32 dy (ssdb_dy8) is made only when a fallback kernel reads it
(SSMCORE_SSD_BWD_LAZY_DY=0: always), and <dh_c, h0_c> comes from the reverse ssdb_pass2 as per-warp partials summed
by ssdb_dt4 instead of ssdb_fro (SSMCORE_SSD_BWD_FRO=0: ssdb_fro). Session 8 (SSDB8c): on the ssdb_st7 path the
fp32 chunk-start states come from the forward's ssd_states_passing_v8 (fp32 starts) where its rules hold, in place of
ssdb_st7<T, 0> + the forward ssdb_pass2 (SSMCORE_SSD_BWD_V8H0=0: those again; see v8h0_in_v4).
"""

from __future__ import annotations

import math
import os

import cupy
import numpy as np

from . import _arrays, _runtime
from . import state_space_duality as _fwd
from ._arrays import NULL, cdiv, ptr

FAMILY = "ssd_bwd"
_TYPES = ("float", "half_t", "bf16_t")
_THREADS = 128
_MAX_CHUNK = 256  # also SSDB_DCS_MAXQ of ssd_bwd.cu
_DCS_THREADS = 256  # ssdb_dcs2 / ssdb_fro blocks (SSDB_DCS_THREADS / SSDB_RED_THREADS)
_WARP = 32  # SSM_WARP_SIZE on CUDA (v4, the only user of the fused <dh, h0> partials, is CUDA only)
# Session 8 (helper SSDB8a): under v4, ssdb_fro is fused into the reverse ssdb_pass2 (per-warp partials of <dh, h0>,
# summed by ssdb_dt4) when P * N % 128 == 0 and the rows are aligned. SSMCORE_SSD_BWD_FRO=0: ssdb_fro as before (a
# module attribute).
fuse_fro_in_v4 = os.environ.get("SSMCORE_SSD_BWD_FRO", "1") != "0"
# Session 8 (SSDB8a): under v4 without z the fp32 dy (ssdb_dy8) is made only for a fallback kernel that reads it (see
# fp32_dy in ssd_bwd). SSMCORE_SSD_BWD_LAZY_DY=0: always made, as before (a module attribute).
lazy_dy_in_v4 = os.environ.get("SSMCORE_SSD_BWD_LAZY_DY", "1") != "0"
_NO_LIMIT = (0.0, math.inf)

# Tensor-core path (ssdb_mm) by default; False: the plain SIMT kernels (the reference for the former).
USE_TENSOR_CORES = True
_MM_TILE = 64
_MM3_THREADS = 256  # ssdb_mm3 blocks (MM3_THREADS of ssd_bwd.cu)
# Speed knob, read at each call: SSMCORE_SSD_BWD_IMPL=v1 selects the previous kernels (operand tiles
# filled along the tile axes whatever the global layout, ssdb_dcs with one thread per position,
# ssdb_dt's serial <dh, h0> loop); v2 fills every operand tile along its contiguous global axis, and
# uses ssdb_dcs2 (a block per chunk) and ssdb_fro (a block per chunk); v3 is v2 with ssdb_mm3
# for the products (chunk scalars in shared memory, all loads of a K slice in flight, register
# double-buffering, the output tiles of a chunk-head in consecutive blocks), ssdb_pass2 (float4, 8
# chunks' loads in flight) for the state passing and ssdb_dcs3 (8 loads in flight per walk). Same math,
# bitwise equal to v2.
# v4 (16-bit x/B/C/dout on CUDA; otherwise v3): the decayed dy.x^T matrices stay on chip (ssdb_g4<T, 0> sums
# them over the group's heads into F and reduces the per-head row / column sums for ssdb_dcs4), dB and dC are
# computed once per group (ssdb_g4<T, 1/2>, the state terms as one GEMM over the group's heads), so the
# (B, nc, H, Q, Q) DX buffer and the per-head (B, L, H, N) dB / dC buffers are gone.
IMPL_ENV = "SSMCORE_SSD_BWD_IMPL"
# v5 (experimental, not the default): v4 with ssdb_g4<T, 8> (KIND 0 with k-pair 32-bit shared stores,
# double-buffered slices with one barrier per slice, the decay factored per thread when safe) and ssdb_h4<T, 11>
# (KIND 3 likewise, the decay factored per block when safe) in place of ssdb_g4<T, 0> / ssdb_h4<T, 3>.
IMPLS = ("v1", "v2", "v3", "v4", "v5")
DEFAULT_IMPL = "v4"
# ssdb_tp6<T> (session 6, helper SSDB6): without z, ssdb_h4<T, 6> and <T, 7> (the two p sums) in one launch, a block
# per (b, c, group, 64 x 64 tile) looping over a run of the group's heads with the head-independent C_t / B_t
# panels staged once. H200 run 2 (B8 L4096 H64 P64 N128 bf16): 1724 us against 2288; the session's other two
# head-looping kernels (dx, chunk states: "v6") were slower than v4's (2513 vs 2366, 3320 vs 1829 us) and are gone.
# SSMCORE_SSD_BWD_TP6=0: v4's two kernels. A module attribute (benchmarks flip it in-process).
tp6_in_v4 = os.environ.get("SSMCORE_SSD_BWD_TP6", "1") != "0"
# ssdb_dx7<T> (session 7, helper SSDB7): v4's dx kernel ssdb_h4<T, 3> with a 3-stage cp.async pipeline (16-bit dy,
# fp32 CB and dh copied global -> shared without register staging), ldmatrix fragments, the decay applied to the A
# fragments in registers; 4 warps of 16 rows x 64 columns. Needs P % 8 == N % 8 == Q % 4 == 0 and 16-byte aligned
# x / B / dout (z) / dx rows; otherwise (and under v5) ssdb_h4<T, 3> runs. Not the default until measured:
# SSMCORE_SSD_BWD_DX7=0 turns it off (a module attribute: benchmarks and tests flip it in-process).
dx7_in_v4 = os.environ.get("SSMCORE_SSD_BWD_DX7", "1") != "0"
_DX7_THREADS = 128
_DX7_STAGES = 3  # SSDB_DX7_STAGES of ssd_bwd.cu
_DX7_STAGE_BYTES = 15360  # DX7_STAGE_BYTES


def _dx7_smem(Q):
    """ssdb_dx7's dynamic shared memory in bytes (stages + the chunk's cs / seg / decay table, padded, + a flag)."""
    return _DX7_STAGES * _DX7_STAGE_BYTES + (cdiv(Q, 64) * 64 + 32) * 12 + 16


def _dx7_ok(P, N, Q, *arrays):
    return P % 8 == 0 and N % 8 == 0 and Q % 4 == 0 and _arrays.aligned16(*arrays)


# ssdb_st7<T, 0 / 1> (session 7): the chunk states S / Gl of ssdb_h4<T, 4 / 5> on the same pipeline (4 stages of
# [32 positions][64] tiles for both operands, ldsm_x4_trans fragments, the position factor on the A fragments).
# Needs P % 8 == N % 8 == 0 and aligned rows (else ssdb_h4<T, 4 / 5>). SSMCORE_SSD_BWD_ST7=0 turns it off.
st7_in_v4 = os.environ.get("SSMCORE_SSD_BWD_ST7", "1") != "0"
# Session 8 (helper SSDB8c), on the ssdb_st7 path: the fp32 chunk-start states h0 from the forward's
# ssd_states_passing_v8 (chunk states + state passing in one kernel; fp32 starts) after the forward's
# ssd_chunk_cumsum (its own dt' / dacs / seg layout), in place of ssdb_st7<T, 0> + the forward ssdb_pass2, where
# the forward's v8 rules hold (_fwd._v8_ok: fwd_path v8 / v8d, v4 layout rules, the grid threshold
# _fwd.v8_min_threads), Q in {64, 128, 256} and no cu_seqlens. The same h0 up to fp32 summation order.
# SSMCORE_SSD_BWD_V8H0=0 turns it off (a module attribute).
v8h0_in_v4 = os.environ.get("SSMCORE_SSD_BWD_V8H0", "1") != "0"
_ST7_STAGES = 4  # SSDB_ST7_STAGES
_ST7_STAGE_BYTES = 9216  # ST7_STAGE_BYTES


def _st7_smem(Q):
    """ssdb_st7's dynamic shared memory in bytes."""
    return _ST7_STAGES * _ST7_STAGE_BYTES + (cdiv(Q, 64) * 64 + 32) * 4


# ssdb_tp7<T> (session 7): ssdb_tp6's two p sums (no z) per head on ssdb_dx7's phase-2 pipeline (grid y: termp /
# statep). Needs P % 8 == N % 8 == 0 and aligned rows (else tp6 / h4). SSMCORE_SSD_BWD_TP7=0 turns it off.
tp7_in_v4 = os.environ.get("SSMCORE_SSD_BWD_TP7", "1") != "0"
# Session 8 (helper SSDB8b), on the ssdb_tp7 path (tp7_in_v4 and its layout rules): termp by ssdb_tp8<T> (a block per
# (b, c, h, p tile) over the whole chunk, h0 rounded to T once in shared memory; tp8_in_v4, needs _tp8_smem(N) <=
# _TP8_MAX_SMEM) and statep from ssdb_dx7's phase-2 accumulator (dx7_statep, when ssdb_dx7 runs); ssdb_tp7 then takes
# what is left (grid y 1, or nothing). Same values as ssdb_tp7. SSMCORE_SSD_BWD_TP8=0 turns both off (session 7's
# ssdb_tp7 for both sums), SSMCORE_SSD_BWD_DX7SP=0 / 1 the second alone. Module attributes (benchmarks flip them).
tp8_in_v4 = os.environ.get("SSMCORE_SSD_BWD_TP8", "1") != "0"
dx7_statep = os.environ.get("SSMCORE_SSD_BWD_DX7SP", os.environ.get("SSMCORE_SSD_BWD_TP8", "1")) != "0"
_TP8_THREADS = 256
_TP8_STAGES = 3  # SSDB_TP8_STAGES
_TP8_STAGE_BYTES = 20480  # TP8_STAGE_BYTES
_TP8_MAX_SMEM = 113 * 1024  # 2 blocks per SM


def _tp8_smem(N):
    """ssdb_tp8's dynamic shared memory in bytes (stages of C + the h0 tile in T, [64][N rounded to 32, + 8])."""
    return _TP8_STAGES * _TP8_STAGE_BYTES + 64 * (cdiv(N, 32) * 32 + 8) * 2


# ssdb_g7<T, 0 / 1 / 2> (session 7, helper SSDB7b): ssdb_g4<T, 0 / 1 / 2> (F with the per-head row / column sums;
# dC / dB per group) on the cp.async / ldmatrix pipeline. On by default, SSMCORE_SSD_BWD_G7=0 turns it off (module
# attributes: g7_in_v4, and g7_kinds = the KINDs it replaces, for benchmarks). Needs P % 8 == N % 8 == 0,
# Q % 8 == 0 and 16-byte aligned rows (else ssdb_g4).
g7_in_v4 = os.environ.get("SSMCORE_SSD_BWD_G7", "1") != "0"
g7_kinds = (0, 1, 2)
_G7_SMEM = 3 * 10240 + 18432 + 2 * 6 * 64 * 4 + 2 * 64 * 4 + 2 * 4 * 64 * 4 + 16  # G7_SMEM of ssd_bwd.cu
_G7B_SMEM = 3 * 14848  # SSDB_G7_STAGES * G7B_STAGE_BYTES (ssdb_g7b<T, 1 / 2>: dC / dB)

_G4_TILE = 64  # G4_TILE of ssd_bwd.cu
_G4_THREADS = 256  # NTH of ssdb_g4 / ssdb_h4
_G4_TARGET_BLOCKS = 800  # ssdb_g4<T, 1/2> blocks wanted (~2 waves of 3 blocks per SM on 132 SMs)
_TP6_TARGET_BLOCKS = 2048  # ssdb_tp6 blocks wanted (the group's heads split over grid y until there are this many)
_TP6_MAX_SMEM = 113 * 1024  # past this (under 2 blocks per SM) v4's ssdb_h4<T, 6 / 7> run instead


def _tp6_smem(N):
    """ssdb_tp6's dynamic shared memory in bytes (the formula of ssd_bwd.cu)."""
    return (2 * cdiv(N, 32) + 2) * 64 * 40 * 2 + 2 * 64 * 17 * 4


def _impl():
    v = os.environ.get(IMPL_ENV, DEFAULT_IMPL).strip().lower()
    return v if v in IMPLS else DEFAULT_IMPL


_MM = {"cb": 0, "dxdot": 1, "states": 2, "gl": 3, "hc": 4, "dhb": 5, "dx": 6, "dz": 7, "dc": 8, "db": 9}

INSTANTIATIONS = ["ssdb_cumsum", "ssdb_cumsum4", "ssdb_pass", "ssdb_pass2", "ssdb_dt", "ssdb_dt4", "ssdb_fro"] + [
    f"{k}<{t}>" for k in ("ssdb_dy", "ssdb_cb", "ssdb_dx_dot", "ssdb_states", "ssdb_dx", "ssdb_dbc", "ssdb_dcs",
                          "ssdb_dcs2", "ssdb_dcs3")
    for t in _TYPES
] + [f"ssdb_mm<{t}, {k}>" for t in _TYPES for k in range(10)] + [
    f"ssdb_mm3<{t}, {k}>" for t in _TYPES for k in range(10)] + ["ssdb_fac4"] + [
    f"ssdb_g4<{t}, {k}>" for t in _TYPES[1:] for k in range(3)] + [
    f"ssdb_h4<{t}, {k}>" for t in _TYPES[1:] for k in range(3, 8)] + [
    f"ssdb_{k}<{t}, {v}>" for t in _TYPES[1:] for k, v in (("g4", 8), ("h4", 11))] + [
    f"ssdb_dcs4<{t}>" for t in _TYPES[1:]] + [
    f"ssdb_dy8<{t}>" for t in _TYPES] + [f"ssdb_tp6<{t}>" for t in _TYPES[1:]] + [
    f"ssdb_{k}<{t}>" for t in _TYPES[1:] for k in ("dx7", "dy8t")] + [
    f"ssdb_st7<{t}, {k}>" for t in _TYPES[1:] for k in (0, 1)] + [
    f"ssdb_tp{k}<{t}>" for t in _TYPES[1:] for k in (7, 8)] + [
    f"ssdb_g7<{t}, 0>" for t in _TYPES[1:]] + [f"ssdb_g7b<{t}, {k}>" for t in _TYPES[1:] for k in (1, 2)]


# Session 8 (helper OVH8): under v4 the launcher's CuPy ops (zeros for seg / Df / the absent dt_bias, the D store, the
# sums of the dA / ddt_bias / dD partials and of the head-split dB / dC partials, the fp32 -> T casts) are small kernels
# (ssdb_fill32, ssdb_dexp, ssdb_seg, ssdb_rsum, ssdb_ssum at the end of ssd_bwd.cu), so that a call is only cupy.empty
# allocations and launches and the torch adapter's launch plans can record and replay it (adapters/torch/_plans.py).
# The sums run in a fixed order (deterministic; dA / ddt_bias / dD round differently from CuPy's sums in the last
# bits, dB / dC / casts are bitwise CuPy's for up to 2 head splits). SSMCORE_SSD_BWD_KOPS=0: the CuPy ops (a module
# attribute; the cu_seqlens form of seg and float64 parameters keep CuPy ops either way).
kops_in_v4 = os.environ.get("SSMCORE_SSD_BWD_KOPS", "1") != "0"
INSTANTIATIONS += ["ssdb_fill32", "ssdb_dexp", "ssdb_seg<int>", "ssdb_seg<long long>"] + [
    f"ssdb_{k}<{t}>" for k in ("rsum", "ssum") for t in _TYPES]
_RSUM_THREADS = 256  # SSDB_RSUM_THREADS / SSDB_SEG_THREADS of ssd_bwd.cu
_OUT_DTYPES = ("float32", "float16", "bfloat16")  # what ssdb_rsum / ssdb_ssum write


def _v4_prep(dt_bias, D, seq_idx, cu_seqlens, batch, L, H, P):
    """(biasf, Df, seg) for the v4 path by kernels (see kops_in_v4): dt_bias as float32 (zeros when absent), D
    expanded to (H, P) float32 (zeros when absent), seg (B, L) int32 (see ssd_bwd.cu's header)."""
    if dt_bias is not None:
        biasf = _f32(dt_bias)
    else:
        biasf = cupy.empty((H,), cupy.float32)
        _launch("ssdb_fill32", H, (biasf, np.int64(H), np.uint32(0)))
    Df = cupy.empty((H, P), cupy.float32)
    Dc = _f32(D)
    _launch("ssdb_dexp", H * P, (ptr(Dc), Df, np.int32(H), np.int32(P), np.int32(D is not None and D.size != H)))
    seg = cupy.empty((batch, L), cupy.int32)
    if seq_idx is not None and seq_idx.dtype in (cupy.int32, cupy.int64):
        seq = cupy.ascontiguousarray(seq_idx)  # (the array itself when contiguous)
        _launch_grid(f"ssdb_seg<{_runtime.ctype(seq.dtype)}>", (batch,), (seq, seg, np.int64(L)),
                     threads=_RSUM_THREADS)
        return biasf, Df, seg
    _launch("ssdb_fill32", batch * L, (seg, np.int64(batch * L), np.uint32(0)))
    if seq_idx is not None and L > 1:  # (another integer dtype: CuPy)
        seg[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(cupy.int32).cumsum(axis=1).astype(cupy.int32)
    elif seq_idx is None and cu_seqlens is not None and cu_seqlens.shape[0] > 2:  # (CuPy, not recordable)
        starts = cupy.zeros((L,), cupy.int32)
        starts[cu_seqlens[1:-1].astype(cupy.int64)] = 1
        seg[0] = starts.cumsum().astype(cupy.int32)
    return biasf, Df, seg


def _rsum(src, shape, like, n_lo, R1, R2, s1, s_hi, s2):
    """ssdb_rsum: out[o] (o = o_hi * n_lo + o_lo) = the sum over r1 < R1, r2 < R2 of
    src[r1 * s1 + o_hi * s_hi + r2 * s2 + o_lo] in a fixed order, in ``like``'s dtype (float32 for other dtypes)."""
    out = cupy.empty(shape, like.dtype if like.dtype.name in _OUT_DTYPES else cupy.float32)
    if out.size:
        _launch_grid(f"ssdb_rsum<{_runtime.ctype(out.dtype)}>", (out.size,),
                     (src, out, np.int32(n_lo), np.int64(R1), np.int64(R2), np.int64(s1), np.int64(s_hi),
                      np.int64(s2)), threads=_RSUM_THREADS)
    return out


def _ssum(parts, splits, dtype, shape):
    """ssdb_ssum: the sum of ``splits`` leading float32 slices of ``parts`` (in order), each of ``shape``, in ``dtype``
    (splits 1: a cast)."""
    out = cupy.empty(shape, dtype)
    n = out.size
    # 4 elements per thread
    _launch(f"ssdb_ssum<{_runtime.ctype(out.dtype)}>", cdiv(n, 4), (parts, out, np.int64(n), np.int32(splits)))
    return out


def _launch(name, n, args):
    """One thread per element of n (a 1-d grid of _THREADS-thread blocks)."""
    if n <= 0:
        return
    blocks = cdiv(n, _THREADS)
    if blocks >= 2**31:
        raise ValueError(f"ssd_bwd: problem too large for one launch ({n} threads)")
    _launch_grid(name, (blocks,), args)


def _mm(kind, T, rows, cols, per, batch, args, v3=False):
    """One ssdb_mm launch: a 64 x 64 tile of the rows x cols output per block, per (chunk, head|group, batch).
    v3: ssdb_mm3, the tiles of one (chunk, head|group) in consecutive blocks of grid x."""
    tiles = cdiv(rows, _MM_TILE) * cdiv(cols, _MM_TILE)
    grid = (per * tiles, 1, batch) if v3 else (per, tiles, batch)
    if min(grid) == 0:
        return
    if grid[2] > 65535:
        raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
    if grid[0] >= 2**31 or (not v3 and grid[1] > 65535):
        raise ValueError(f"ssd_bwd: problem too large for one launch ({per} chunk-heads x {tiles} tiles)")
    _launch_grid(f"ssdb_mm{'3' if v3 else ''}<{T}, {_MM[kind]}>", grid, args,
                 threads=_MM3_THREADS if v3 else _THREADS)


def _launch_grid(name, grid, args, threads=_THREADS, shared_mem=0):
    """Every launch goes through here (bench/gpu_ssd_bwd.py times the kernels by wrapping it)."""
    _runtime.launch(_runtime.function(FAMILY, name), grid, (threads,), args, shared_mem=shared_mem)


def _f32(a):
    return None if a is None else _arrays.contiguous(a, cupy.float32)


def ssd_bwd(dout, x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
            dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None, dfinal_states=None):
    """CuPy SSD backward; returns (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states) (SSDGrads
    order), None for absent inputs, each in its input's dtype."""
    _arrays.check_kernel_dtypes(dout=dout, x=x, B=B, C=C, z=z)
    batch, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    Q = max(1, min(int(chunk_size), _MAX_CHUNK, L))
    nc = cdiv(L, Q)
    f32, i32, i64 = np.float32, np.int32, np.int64

    # One element type for the (B, L, ...) streams.
    acts = [a for a in (x, B, C, dout, z) if a is not None]
    if all(a.dtype == x.dtype for a in acts):
        ct = x.dtype
    else:
        ct = cupy.float32
    xs, Bs, Cs, douts, zs = (_arrays.contiguous(a, ct) for a in (x, B, C, dout, z))
    T = _runtime.ctype(xs.dtype)
    impl = _impl()
    v2 = impl != "v1"  # v3 keeps v2's coalesced staging, ssdb_dcs2 and ssdb_fro
    # ssdb_mm3 addresses operand elements with 32-bit offsets from a chunk's first row: v2 beyond that, and on
    # ROCm (hipcc: ssdb_mm3 spills there, 230-390 VGPRs).
    v3 = impl in ("v3", "v4", "v5") and Q * max(H * P, G * N, Q) < 2**31 and not _runtime.is_hip()
    # v4: 16-bit streams only (float32 keeps v3's 3xTF32 products); 32-bit offsets within a chunk-group.
    v4 = (impl in ("v4", "v5") and v3 and USE_TENSOR_CORES and T in ("half_t", "bf16_t")
          and Q * H * P < 2**31 and batch * nc * H * cdiv(Q, _G4_TILE) * Q < 2**31)
    v5 = v4 and impl == "v5"

    kops = v4 and kops_in_v4  # session 8 (OVH8): kernels in place of CuPy ops (see kops_in_v4)
    bc_splits = 1  # (kops: head splits of the dB / dC partials left for ssdb_ssum)
    dtf = _f32(dt)
    Af = _f32(A)
    if kops:  # seg: sequence number of each position (monotone)
        biasf, Df, seg = _v4_prep(dt_bias, D, seq_idx, cu_seqlens, batch, L, H, P)
    else:
        biasf = _f32(dt_bias) if dt_bias is not None else cupy.zeros((H,), cupy.float32)
        Df = cupy.zeros((H, P), cupy.float32)
    if D is not None and not kops:
        Df[...] = _f32(D).reshape(H, -1)
    initf = _f32(initial_states)
    dfinf = _f32(dfinal_states)

    # seg: sequence number of each position (monotone).
    if not kops:  # (else made by _v4_prep)
        seg = cupy.zeros((batch, L), cupy.int32)
    if kops:
        pass
    elif seq_idx is not None and L > 1:
        seg[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(cupy.int32).cumsum(axis=1).astype(cupy.int32)
    elif cu_seqlens is not None and cu_seqlens.shape[0] > 2:
        starts = cupy.zeros((L,), cupy.int32)
        starts[cu_seqlens[1:-1].astype(cupy.int64)] = 1
        seg[0] = starts.cumsum().astype(cupy.int32)

    # dt', its slope and the chunk-local cumsum of dt' * A: (B, H, L).
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    clamp = (lo, hi) != _NO_LIMIT
    dtp = cupy.empty((batch, H, L), cupy.float32)
    slope = cupy.empty((batch, H, L), cupy.float32)
    cs = cupy.empty((batch, H, L), cupy.float32)
    cs_args = (dtf, Af, biasf, i32(bool(dt_softplus)), i32(clamp), f32(lo if clamp else 0.0),
               f32(hi if clamp else 0.0), dtp, slope, cs, i32(batch), i64(L), i32(H), i32(Q), i32(nc))
    if v4:  # a block per (b, c, h), the chunk cumsum as a block scan
        if batch * nc * H >= 2**31:
            raise ValueError(f"ssd_bwd: problem too large for one launch ({batch * nc * H} chunks)")
        _launch_grid("ssdb_cumsum4", (batch * nc * H,), cs_args, threads=_MAX_CHUNK)
    else:
        _launch("ssdb_cumsum", batch * H * nc, cs_args)

    # dy = dout * silu(z).
    n_x = batch * L * H * P
    dy = None  # the fp32 dy: see fp32_dy below

    def fp32_dy():
        """The fp32 dy, made (ssdb_dy8 / ssdb_dy) at the first call. Every kernel that reads the fp32 dy takes it
        from here or runs after the eager call below; under v4 without z it is deferred (session 8, SSDB8a): the
        default kernels read the 16-bit dout (== dy exactly) instead, so ssdb_dy8 runs only for a fallback
        (ssdb_h4, ssdb_tp6, ssdb_g4) that reads the fp32 dy."""
        nonlocal dy
        if dy is None:
            dy = cupy.empty((batch, L, H, P), cupy.float32)
            if v4:
                vec = n_x % 8 == 0 and _arrays.aligned16(douts, zs, dy)
                _launch(f"ssdb_dy8<{T}>", cdiv(n_x, 8), (douts, ptr(zs), dy, i64(n_x), i32(vec)))
            else:
                _launch(f"ssdb_dy<{T}>", n_x, (douts, ptr(zs), dy, i64(n_x)))
        return dy

    # ssdb_dx7 (dx): dy as its 16-bit mma operand too: dout itself without z, else a T copy from ssdb_dy8t.
    dx7 = v4 and not v5 and dx7_in_v4 and _dx7_ok(P, N, Q, xs, Bs, douts, zs)
    st7 = v4 and not v5 and st7_in_v4 and _dx7_ok(P, N, 4, xs, Bs, Cs, douts, zs)
    # ssdb_g7<T, 0> (F, experimental): the same 16-bit dy operand.
    g7f = v4 and not v5 and g7_in_v4 and 0 in g7_kinds and _dx7_ok(P, 8, Q, xs, douts, zs)
    g7bc = v4 and not v5 and g7_in_v4 and _dx7_ok(P, N, Q, xs, Bs, Cs, douts, zs)
    g7c = g7bc and 1 in g7_kinds  # ssdb_g7b<T, 1> for ssdb_g4<T, 1> (dC: dy is its operand)
    g7b = g7bc and 2 in g7_kinds
    dyt = None
    if dx7 or st7 or g7f or g7c:
        dyt = douts if z is None else cupy.empty((batch, L, H, P), xs.dtype)
    if v4 and dyt is not None and z is not None:
        dy = cupy.empty((batch, L, H, P), cupy.float32)
        vec = n_x % 8 == 0 and _arrays.aligned16(douts, zs, dy, dyt)
        _launch(f"ssdb_dy8t<{T}>", cdiv(n_x, 8), (douts, ptr(zs), dy, dyt, i64(n_x), i32(vec)))
    elif not (v4 and z is None and lazy_dy_in_v4):  # with z (dz, the dcs p sums, ...) and outside v4 all read it
        fp32_dy()

    dims = (i32(batch), i64(L), i32(H), i32(G), i32(P), i32(N), i32(Q), i32(nc))
    cb = cupy.empty((batch, nc, G, Q, Q), cupy.float32)
    # v4: F (per group, the head sum of d_s E_h) in place of DX (per head).
    dxd = cupy.empty((batch, nc, G if v4 else H, Q, Q), cupy.float32)
    h0 = cupy.empty((batch, nc, H, P, N), cupy.float32)
    dh = cupy.empty((batch, nc, H, P, N), cupy.float32)
    dinit = cupy.empty((batch, H, P, N), cupy.float32) if initial_states is not None else None
    dx = cupy.empty((batch, L, H, P), xs.dtype if v4 else cupy.float32)  # v4: written in x's dtype
    dz = cupy.empty((batch, L, H, P), cupy.float32) if z is not None else None
    # v4 without z: the p sums that hC / dhB feed are reduced in ssdb_h4<T, 6 / 7> (no (B, L, H, P) buffers).
    lean = v4 and z is None
    hC = None if lean else cupy.empty((batch, L, H, P), cupy.float32)
    dhB = None if lean else cupy.empty((batch, L, H, P), cupy.float32)
    dBh = cupy.empty((batch, L, G if v4 else H, N), cupy.float32)
    dCh = cupy.empty((batch, L, G if v4 else H, N), cupy.float32)
    pass_args = (cs, seg, i32(batch), i64(L), i32(H), i32(P * N), i32(Q), i32(nc))
    fuse_fro = v4 and fuse_fro_in_v4  # ssdb_fro's sums from the reverse ssdb_pass2 (frop) where it can
    frop = None

    if USE_TENSOR_CORES:
        def mm(kind, rows, cols, out, per=nc * H):
            # dy: None only under v4 without z, where mm runs only KIND cb (B and C only)
            _mm(kind, T, rows, cols, per, batch, (xs, Bs, Cs, ptr(douts), ptr(zs), ptr(dy), Df, dtp, cs, seg, cb, dxd,
                                                  h0, dh, ptr(hC), out) + dims + (i32(v2),), v3=v3)

        def state_pass(reverse, buf, init, dinit_, other=None):
            """other (h0, for the reverse pass under v4): ssdb_fro fused into ssdb_pass2 where it can be (the
            per-warp partials of <dh_c, h0_c> returned, (B * nc * H, P * N / 128)); None when it is not."""
            # ssdb_pass2 needs float4 rows: PN % 4 == 0 and 16-byte aligned pointers (init may be a caller's view).
            aligned = P * N % 4 == 0 and _arrays.aligned16(buf, init, dinit_)
            if v3 and aligned:
                frop = None
                if other is not None and P * N % (4 * _WARP) == 0 and _arrays.aligned16(other):
                    frop = cupy.empty((batch * nc * H, P * N // (4 * _WARP)), cupy.float32)
                args = (i32(reverse), buf, ptr(init), ptr(dinit_), ptr(other if frop is not None else None),
                        ptr(frop)) + pass_args
                _launch("ssdb_pass2", batch * H * (P * N // 4), args)
                return frop
            _launch("ssdb_pass", batch * H * P * N, (i32(reverse), buf, ptr(init), ptr(dinit_)) + pass_args)
            return None

        def h4(kind, rows, cols, out, aux=None):
            grid = (nc * H * cdiv(rows, _G4_TILE) * cdiv(cols, _G4_TILE), 1, batch)
            if grid[2] > 65535:
                raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
            if grid[0] >= 2**31:
                raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * H} chunk-heads)")
            _launch_grid(f"ssdb_h4<{T}, {kind}>", grid, (xs, Bs, Cs, fp32_dy(), Df, dtp, cs, seg, cb, h0, dh, out,
                                                         ptr(aux))
                         + dims, threads=_G4_THREADS)

        def st7_(kind, src, W, out):
            grid = (nc * H * cdiv(P, _G4_TILE) * cdiv(N, _G4_TILE), 1, batch)
            if grid[2] > 65535:
                raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
            if grid[0] >= 2**31:
                raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * H} chunk-heads)")
            _launch_grid(f"ssdb_st7<{T}, {kind}>", grid, (src, W, dtp, cs, seg, out) + dims, threads=_DX7_THREADS,
                         shared_mem=_st7_smem(Q))

        def tp6(termp_, statep_):
            # A block per (c, g, row tile, column tile) and a run of hps heads of the group (grid y).
            tiles = nc * G * cdiv(Q, _G4_TILE) * cdiv(P, _G4_TILE)
            hpg = H // G
            hps = cdiv(hpg, max(1, min(hpg, cdiv(_TP6_TARGET_BLOCKS, tiles * batch))))
            grid = (tiles, cdiv(hpg, hps), batch)
            if grid[2] > 65535:
                raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
            if grid[0] >= 2**31:
                raise ValueError(f"ssd_bwd: problem too large for one launch ({tiles} tiles)")
            _launch_grid(f"ssdb_tp6<{T}>", grid, (xs, Bs, Cs, fp32_dy(), h0, dh, termp_, statep_) + dims + (i32(hps),),
                         threads=_G4_THREADS, shared_mem=_tp6_smem(N))

        mm("cb", Q, Q, cb, per=nc * G)
        if not v4:
            mm("dxdot", Q, Q, dxd)
        v8h0 = (st7 and v8h0_in_v4 and cu_seqlens is None and Q in (64, 128, 256) and H <= 65535
                and _fwd._v8_ok(xs, zs, Bs, Cs, initf, Q))
        if v8h0:  # session 8 (SSDB8c): h0 by the forward's fused states + passing kernel, fp32 starts
            seq8 = _fwd._seq_ids(seq_idx, None, L)
            dtp8, dacs8, seg8 = _fwd._chunk_cumsum(dtf, Af, biasf, dt_softplus, dt_limit, seq8, Q)
            _fwd._states_passing_v8(xs, Bs, dtp8, dacs8, seg8, initf, Q, starts=h0)
            del dtp8, dacs8, seg8, seq8
        elif st7:
            st7_(0, xs, Bs, h0)
        elif v4:
            h4(4, P, N, h0)
        else:
            mm("states", P, N, h0)
        if not v8h0:
            state_pass(0, h0, initf, None)
        if st7:
            st7_(1, dyt, Cs, dh)
        elif v4:
            h4(5, P, N, dh)
        elif not v4:
            mm("gl", P, N, dh)
        # v4: ssdb_fro's <dh_c, h0_c> as per-warp partials from the reverse pass (h0 is final by now)
        frop = state_pass(1, dh, dfinf, dinit, other=h0 if fuse_fro else None)
        statep_dx7 = None  # ssdb_dx7's statep output (session 8)
        if lean:  # hC / dhB only feed ssdb_dcs4's p sums: reduced in ssdb_h4 instead
            ntp = cdiv(P, _G4_TILE)
            termp = cupy.empty((batch, nc, H, ntp, Q), cupy.float32)
            statep = cupy.empty((batch, nc, H, ntp, Q), cupy.float32)
            if v4 and not v5 and tp7_in_v4 and _dx7_ok(P, N, 4, xs, Bs, Cs, douts):
                # dout (== dy without z) read in T; session 8: termp by ssdb_tp8, statep by ssdb_dx7 (below)
                tp8 = tp8_in_v4 and _tp8_smem(N) <= _TP8_MAX_SMEM
                statep_dx7 = statep if dx7 and dx7_statep else None
                if batch > 65535:
                    raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
                if nc * H * cdiv(Q, _G4_TILE) * cdiv(P, _G4_TILE) >= 2**31:
                    raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * H} chunk-heads)")
                if tp8:
                    _launch_grid(f"ssdb_tp8<{T}>", (nc * H * cdiv(P, _G4_TILE), 1, batch),
                                 (Cs, douts, h0, termp) + dims, threads=_TP8_THREADS, shared_mem=_tp8_smem(N))
                ys = int(not tp8) + int(statep_dx7 is None)
                if ys:
                    grid = (nc * H * cdiv(Q, _G4_TILE) * cdiv(P, _G4_TILE), ys, batch)
                    _launch_grid(f"ssdb_tp7<{T}>", grid, (xs, Bs, Cs, douts, h0, dh, NULL if tp8 else termp,
                                                          statep if statep_dx7 is None else NULL) + dims,
                                 threads=_DX7_THREADS, shared_mem=_DX7_STAGES * _DX7_STAGE_BYTES)
            elif v4 and not v5 and tp6_in_v4 and _tp6_smem(N) <= _TP6_MAX_SMEM:
                # both in one launch, heads looped over the C / B panels
                tp6(termp, statep)
            else:
                h4(6, Q, P, termp)
                h4(7, Q, P, statep)
        else:
            mm("hc", Q, P, hC)
            mm("dhb", Q, P, dhB)
        if v4:  # dx, and the dD partial sums per (b, c, h, 64-row tile) when D is given
            dDp = cupy.empty((batch, nc, H, cdiv(Q, _G4_TILE), P), cupy.float32) if D is not None else None
            if dx7:  # the pipelined form of ssdb_h4<T, 3>
                grid = (nc * H * cdiv(Q, _G4_TILE) * cdiv(P, _G4_TILE), 1, batch)
                if grid[2] > 65535:
                    raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
                if grid[0] >= 2**31:
                    raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * H} chunk-heads)")
                dy_ep = dy if z is not None else None  # without z the epilogue reads dout (== dy) in T
                _launch_grid(f"ssdb_dx7<{T}>", grid, (xs, Bs, dyt, ptr(dy_ep), Df, dtp, cs, seg, cb, dh, dx, ptr(dDp),
                                                      ptr(statep_dx7)) + dims,
                             threads=_DX7_THREADS, shared_mem=_dx7_smem(Q))
            else:
                h4(11 if v5 else 3, Q, P, dx, dDp)
        else:
            mm("dx", Q, P, dx)
        if z is not None:
            mm("dz", Q, P, dz)
        if v4:
            nt = cdiv(Q, _G4_TILE)
            fcC = cupy.empty((batch, H, L), cupy.float32)
            fcB = cupy.empty((batch, H, L), cupy.float32)
            _launch("ssdb_fac4", batch * H * L, (dtp, cs, seg, fcC, fcB, i32(batch), i64(L), i32(H), i32(Q)))
            rowp = cupy.empty((batch, nc, H, nt, Q), cupy.float32)
            colp = cupy.empty((batch, nc, H, nt, Q), cupy.float32)
            g4_args = (dtp, cs, seg, cb, dxd, h0, dh, fcC, fcB)  # after (xs, Bs, Cs, fp32_dy())
            tail = (rowp, colp) + dims

            def g4(kind, tiles, out, splits=1):
                grid = (nc * G * tiles, splits, batch)
                if grid[2] > 65535:
                    raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
                if grid[0] >= 2**31:
                    raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * G} chunk-groups)")
                if (kind == 1 and g7c) or (kind == 2 and g7b):  # the pipelined forms (same grid and outputs)
                    _launch_grid(f"ssdb_g7b<{T}, {kind}>", grid, (xs, Bs, Cs, dyt, dxd, h0, dh, fcC, fcB, out) + dims,
                                 threads=_DX7_THREADS, shared_mem=_G7B_SMEM)
                    return
                _launch_grid(f"ssdb_g4<{T}, {kind}>", grid, (xs, Bs, Cs, fp32_dy()) + g4_args + (out,) + tail,
                             threads=_G4_THREADS)

            if g7f:  # the pipelined form of ssdb_g4<T, 0>
                grid = (nc * G * (nt * (nt + 1) // 2), 1, batch)
                if grid[2] > 65535:
                    raise ValueError(f"x: expected a batch of at most 65535 rows on the GPU, got {batch}")
                if grid[0] >= 2**31:
                    raise ValueError(f"ssd_bwd: problem too large for one launch ({nc * G} chunk-groups)")
                _launch_grid(f"ssdb_g7<{T}, 0>", grid, (xs, dyt, dtp, cs, seg, cb, dxd, rowp, colp) + dims,
                             threads=_DX7_THREADS, shared_mem=_G7_SMEM)
            else:
                g4(8 if v5 else 0, nt * (nt + 1) // 2, NULL)
            # dC / dB: split the group's heads over grid y when the (chunk, group, tile) blocks are too few to fill
            # the GPU (small batch x length); the partials are summed here.
            tiles = nt * cdiv(N, _G4_TILE)
            splits = max(1, min(H // G, cdiv(_G4_TARGET_BLOCKS, nc * G * tiles * batch)))
            if splits > 1:
                parts = cupy.empty((2, splits, batch, L, G, N), cupy.float32)
                g4(1, tiles, parts[0], splits)
                g4(2, tiles, parts[1], splits)
                if kops:  # summed (in order) and cast by ssdb_ssum at the end
                    dCh, dBh, bc_splits = parts[0], parts[1], splits
                else:
                    dCh, dBh = parts[0].sum(axis=0), parts[1].sum(axis=0)
            else:
                g4(1, tiles, dCh)
                g4(2, tiles, dBh)
        else:
            mm("dc", Q, N, dCh)
            mm("db", Q, N, dBh)
    else:
        _launch(f"ssdb_cb<{T}>", cb.size, (Bs, Cs, cb, i32(batch), i64(L), i32(G), i32(N), i32(Q), i32(nc)))
        _launch(f"ssdb_dx_dot<{T}>", dxd.size, (dy, xs, dxd, i32(batch), i64(L), i32(H), i32(P), i32(Q), i32(nc)))
        _launch(f"ssdb_states<{T}>", h0.size, (i32(0), xs, dy, Bs, dtp, cs, seg, h0) + dims)
        _launch("ssdb_pass", batch * H * P * N, (i32(0), h0, ptr(initf), NULL) + pass_args)
        _launch(f"ssdb_states<{T}>", dh.size, (i32(1), xs, dy, Cs, dtp, cs, seg, dh) + dims)
        _launch("ssdb_pass", batch * H * P * N, (i32(1), dh, ptr(dfinf), ptr(dinit)) + pass_args)
        _launch(f"ssdb_dx<{T}>", n_x, (xs, Bs, Cs, douts, ptr(zs), dy, Df, dtp, cs, seg, cb, h0, dh, dx, ptr(dz), hC,
                                       dhB) + dims)
        _launch(f"ssdb_dbc<{T}>", dBh.size, (xs, Bs, Cs, dy, dtp, cs, seg, dxd, h0, dh, dBh, dCh) + dims)

    dcs = cupy.empty((batch, H, L), cupy.float32)
    ddir = cupy.empty((batch, H, L), cupy.float32)
    est = cupy.empty((batch, H, L), cupy.float32)
    dcs_args = (xs, dy, dtp, cs, seg, cb, dxd, hC, dhB, dcs, ddir, est, i32(batch), i64(L), i32(H), i32(G),
                i32(P), i32(Q), i32(nc))
    fro = None
    if v2:
        if batch * nc * H >= 2**31:
            raise ValueError(f"ssd_bwd: problem too large for one launch ({batch * nc * H} chunks)")
        if v4:
            tp = (termp, statep, i32(termp.shape[3])) if hC is None else (NULL, NULL, i32(0))
            # dy is read only without termp (hC given: with z)
            _launch_grid(f"ssdb_dcs4<{T}>", (batch * nc * H,), (xs, fp32_dy() if hC is not None else NULL, dtp, cs,
                                                                seg, rowp, colp, ptr(hC), ptr(dhB))
                         + tp + (dcs, ddir, est, i32(batch), i64(L), i32(H), i32(P), i32(Q), i32(nc)),
                         threads=_DCS_THREADS)
        else:
            _launch_grid(f"ssdb_dcs{'3' if v3 else '2'}<{T}>", (batch * nc * H,), dcs_args, threads=_DCS_THREADS)
        if frop is not None:  # summed by ssdb_dt4
            fro = frop
        else:
            fro = cupy.empty((batch * nc * H, 1), cupy.float32)
            _launch_grid("ssdb_fro", (batch * nc * H,), (h0, dh, fro, i32(P * N)), threads=_DCS_THREADS)
    else:
        _launch(f"ssdb_dcs<{T}>", batch * H * L, dcs_args)
    ddt = cupy.empty((batch, L, H), cupy.float32)
    dA_part = cupy.empty((batch * nc, H), cupy.float32)
    dtb_part = cupy.empty((batch * nc, H), cupy.float32)
    if v4:  # a block per (b, c, h): scan + tree sums
        _launch_grid("ssdb_dt4", (batch * nc * H,), (Af, dtp, slope, cs, seg, dcs, ddir, est, fro, ddt, dA_part,
                                                     dtb_part, i32(batch), i64(L), i32(H), i32(Q), i32(nc),
                                                     i32(fro.shape[1])),
                     threads=_MAX_CHUNK)
    else:
        _launch("ssdb_dt", batch * H * nc, (Af, dtp, slope, cs, seg, dcs, ddir, est, h0, dh, ptr(fro), ddt, dA_part,
                                            dtb_part, i32(batch), i64(L), i32(H), i32(P * N), i32(Q), i32(nc)))

    def cast(a, like):
        if a.dtype == like.dtype:
            return a
        if kops and a.dtype == cupy.float32 and like.dtype.name in _OUT_DTYPES and a.flags.c_contiguous:
            return _ssum(a, 1, like.dtype, a.shape)  # (OVH8: a kernel, recordable)
        return a.astype(like.dtype)

    if kops:  # dB / dC: the head-split partials summed and cast by one kernel each (B, C in T under v4)
        dB, dC = (_ssum(a, bc_splits, like.dtype, (batch, L, G, N)) for a, like in ((dBh, B), (dCh, C)))
    elif v4:  # dB / dC already summed over the group's heads
        dB, dC = dBh, dCh
    else:
        hpg = H // G
        dB = dBh.reshape(batch, L, G, hpg, N).sum(axis=3)
        dC = dCh.reshape(batch, L, G, hpg, N).sum(axis=3)
    dD = None
    if D is not None and kops:  # the same partial sums by ssdb_rsum, in D's dtype
        ntl = dDp.shape[3]
        if D.ndim == 1:  # (H,): over (b, c), tiles and p
            dD = _rsum(dDp, (H,), D, 1, batch * nc, ntl * P, H * ntl * P, ntl * P, 1)
        else:  # (H, P): over (b, c) and tiles
            dD = _rsum(dDp, (H, P), D, P, batch * nc, ntl, H * ntl * P, ntl * P, P)
        dD = cast(dD, D)
    elif D is not None and v4:  # (B, nc, H, tiles, P) partial sums of dy x from ssdb_h4<T, 3>
        dD = dDp.sum(axis=(0, 1, 3))
        if D.ndim == 1:
            dD = dD.sum(axis=1)
        dD = cast(dD, D)
    elif D is not None:
        dD = (dy * xs.astype(cupy.float32)).reshape(batch * L, H, P).sum(axis=0)
        if D.ndim == 1:
            dD = dD.sum(axis=1)
        dD = cast(dD, D)
    return (
        cast(dx, x),
        cast(ddt, dt),
        cast(_rsum(dA_part, (H,), A, 1, batch * nc, 1, H, 1, 0) if kops else dA_part.sum(axis=0), A),
        cast(dB, B),
        cast(dC, C),
        dD,
        cast(dz, z) if z is not None else None,
        cast(_rsum(dtb_part, (H,), dt_bias, 1, batch * nc, 1, H, 1, 0) if kops else dtb_part.sum(axis=0), dt_bias)
        if dt_bias is not None else None,
        cast(dinit, initial_states) if initial_states is not None else None,
    )
