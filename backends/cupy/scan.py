"""CuPy launchers for the selective scan (kernels in scan.cu): selective_scan, selective_scan_bwd.

Arguments arrive validated by ssmcore.ops.scan. u, delta, z, dout and input-dependent B/C share
the activation dtype (the kernel element type T); A, D, delta_bias, initial_state, dlast_state and
constant (D, N) B/C are passed as float32. Each launch picks a lane layout (S state entries per lane,
R lanes per row, S * R = N rounded up to a power of two): few lanes per row when there are many
(b, d) rows, up to 32 when there are few (batch 1), so the grid fills the GPU either way.
"""

from __future__ import annotations

import math
import os

import cupy
import numpy as np

from ssmcore._determinism import deterministic

from . import _arrays, _runtime
from ._arrays import NULL, cdiv, ptr

FAMILY = "scan"
_TYPES = ("float", "half_t", "bf16_t")
_THREADS = 128
_MAX_N = 256

# (S, R) layouts: for each padded N a "wide" one (more exps per lane) and a "narrow" one (more lanes
# per row, for few rows).
_LAYOUTS = ((1, 1), (2, 1), (1, 2), (4, 1), (1, 4), (4, 2), (1, 8), (4, 4), (1, 16), (4, 8),
            (1, 32), (4, 16), (2, 32), (4, 32), (8, 32))

INSTANTIATIONS = [f"scan_fwd<{t}, {s}, {r}>" for t in _TYPES for s, r in _LAYOUTS] + [
    f"scan_fwd3<{t}, {s}, {r}>" for t in _TYPES for s, r in _LAYOUTS if r >= 2] + [
    f"scan_fwd_tp<{t}, {nb}, {pf}>" for t in _TYPES for nb in (1, 2, 4) for pf in (0, 1)] + [
    f"scan_bwd<{t}, {s}, {r}>" for t in _TYPES for s, r in _LAYOUTS
] + ["column_sum<float>"] + [f"bc_slice_sum<{t}, {v}>" for t in _TYPES for v in (1, 4)]

# Rows * lanes per row at or above which the wide layout keeps the GPU busy (per multiprocessor).
_WIDE_THREADS_PER_SM = 512
# The wide layout is chosen when its threads number at least this many per SM (a little under 512: B8 D2048 N16,
# 16384 rows = 496 per SM on 132 SMs, is the Mamba block's shape; there S4 R4 ran the forward in 331 us against
# S1 R16's 529 and fwd+bwd in 2388 against 3397: bench/NOTES.md, session 8 run 1).
_WIDE_MIN_THREADS_PER_SM = 480
# Benchmarks may force a layout: S (the state entries per lane) or None.
force_states_per_lane = None
# Speed variant of the backward: blocks per SM its registers are capped for (__launch_bounds__
# minBlocks; 2 = up to 255 registers, 3 = 168 with a few spilled bytes at S4 R4). Read once from
# SSMCORE_SCAN_BWD_MIN_BLOCKS; benchmarks set it directly. 0 (the default since 2026-11-29) =
# automatic: 3 when the grid has at least _MB3_BLOCKS_PER_SM blocks per SM (H200, bf16 N16: B8
# D4096 L2048, 1024 blocks, fwd+bwd 8301 -> 7154 us with 3), else 2 (B1 D4096, 512 blocks:
# 1740 us with 2, 1845 with 3).
bwd_min_blocks = int(os.environ.get("SSMCORE_SCAN_BWD_MIN_BLOCKS", "0"))
_MB3_BLOCKS_PER_SM = 6


# Backward kernel version: "v3" (default: the chunk's global loads issued together, SFU-only gate math,
# dB/dC block sums in per-warp shared copies without shared atomics) or "v2" (session 3's kernel,
# compiled with -DSCAN_BWD_V=2). Layouts whose v3 shared memory would pass 48 KiB (one lane per row)
# compile as v2 either way. The module attribute wins when set (benchmarks); else
# SSMCORE_SCAN_BWD_IMPL, read on every call.
bwd_impl = None


def _bwd_impl() -> str:
    impl = bwd_impl or os.environ.get("SSMCORE_SCAN_BWD_IMPL", "v3")
    if impl not in ("v2", "v3"):
        raise ValueError(f"SSMCORE_SCAN_BWD_IMPL: expected 'v2' or 'v3', got {impl!r}")
    return impl


# Layouts whose v3 backward spills inside the chunk loop when capped at 168 registers (NVRTC sm_90, bf16:
# 100-250 bytes): the automatic choice keeps them at 2 blocks per SM.
_V3_MB3_SPILLS = frozenset({(1, 8), (2, 32), (4, 32), (8, 32)})


def _bwd_min_blocks(grid_blocks: int, layout=None, impl: str = "v2") -> int:
    if bwd_min_blocks:
        return bwd_min_blocks
    if impl == "v3" and layout in _V3_MB3_SPILLS:
        return 2
    return 3 if grid_blocks >= _MB3_BLOCKS_PER_SM * _arrays.sm_count() else 2


# Output forward kernel: "lanes" (scan_fwd, sequential in time per lane), "tp" (scan_fwd_tp, time
# split over a block's threads, one block per row) or "auto" (tp where the lanes layout would be
# the narrow one: batch 1 at D4096 N16). SSMCORE_SCAN_FWD overrides it; benchmarks set it directly.
fwd_kernel = os.environ.get("SSMCORE_SCAN_FWD", "auto")
# State entries scan_fwd_tp scans per block barrier (1: 90 registers, 2: 126, 4: 182 at sm_90).
# States per thread in scan_fwd_tp. H200 (bench/NOTES.md, run 4): B1 D4096 N16 L2048 tp1 240 us, tp2 262,
# tp4 434; L16384 tp1 2467, tp2 2789.
tp_states = int(os.environ.get("SSMCORE_SCAN_TP_STATES", "1"))
# scan_fwd_tp's B / C prefetch (PF, session 6: the next state entries' rows loaded before the current ones'
# scan and barrier). H200 run 2, B1 D4096 L2048 N16: tp1 243 -> 189 us, tp2 267 -> 211; on by default,
# SSMCORE_SCAN_TP_PREFETCH=0 turns it off.
tp_prefetch = os.environ.get("SSMCORE_SCAN_TP_PREFETCH", "1") == "1"


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _layout(n_states: int, rows: int) -> tuple[int, int]:
    """(S, R) for N state entries and B*D rows."""
    npad = _pow2_ceil(max(n_states, 1))
    wide = max(min(npad, 4), npad // 32)
    narrow = max(1, wide // 4, npad // 32)
    forced = force_states_per_lane
    if forced is not None and (forced, npad // forced) in _LAYOUTS:
        s = forced
    elif rows * (npad // wide) >= _arrays.sm_count() * _WIDE_MIN_THREADS_PER_SM:
        s = wide
    else:
        s = narrow
    return s, npad // s


def _chunk(s: int, r: int) -> int:
    """Cfg<S, R>::kChunk of scan.cu: steps between checkpoints (the kernels trap on a mismatch)."""
    rows = _THREADS // r
    return min(64 // s, 32, max(8, 512 // rows))


# Strided inputs: u, delta, z (and the backward's dout) go to the kernels as they are when their L stride is
# one element, with their (batch, channel) strides in elements (views such as MambaInnerFn's delta and z,
# (L, B*L, 1), need no copy); other layouts are copied contiguous first. SSMCORE_SCAN_STRIDED=0 copies
# every non-contiguous one, as before 2026-11-29 (read on every call; the module attribute wins when set).
strided = None


def _strided() -> bool:
    if strided is not None:
        return bool(strided)
    return os.environ.get("SSMCORE_SCAN_STRIDED", "1") != "0"


_NO_STRIDES = (np.int64(0), np.int64(0))


def _rows(x, allow_strided: bool):
    """(kernel array, (stride_b, stride_d) in elements as np.int64) of a (B, D, L) input; None -> (None, 0s)."""
    if x is None:
        return None, _NO_STRIDES
    nb, nd, length = x.shape
    item = x.dtype.itemsize
    sb, sd, sl = x.strides
    if not (allow_strided and (sl == item or length <= 1) and sb % item == 0 and sd % item == 0):
        x = _arrays.contiguous(x)
        sb, sd = x.strides[0], x.strides[1]
    # A size-1 dimension's stride is never used: 0 keeps the vector-load checks simple.
    return x, (np.int64(sb // item if nb > 1 else 0), np.int64(sd // item if nd > 1 else 0))


def _vec_strides(*strides) -> bool:
    """Every (stride_b, stride_d) a multiple of 8 elements (16-byte rows for 16-bit types)."""
    return all(int(s) % 8 == 0 for pair in strides for s in pair)


class _Args:
    """Kernel-ready arrays and sizes shared by the forward and the backward."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, initial_state):
        _arrays.check_kernel_dtypes(u=u, delta=delta, z=z)
        self.batch, self.channels, self.length = (int(x) for x in u.shape)
        self.n_states = int(A.shape[1])
        if self.n_states > _MAX_N:
            raise ValueError(
                f"A: the GPU kernels support N <= {_MAX_N} state entries, got N={self.n_states} "
                f"(shape {tuple(A.shape)})"
            )
        self.T = _runtime.ctype(u.dtype)
        allow = _strided()
        self.u, self.su = _rows(u, allow)
        self.delta, self.sdelta = _rows(delta, allow)
        self.z, self.sz = _rows(z, allow)
        self.A = _arrays.contiguous(A, cupy.float32)
        self.D = _arrays.contiguous(D, cupy.float32)
        self.delta_bias = _arrays.contiguous(delta_bias, cupy.float32)
        self.initial_state = _arrays.contiguous(initial_state, cupy.float32)
        self.B, self.var_B, self.groups_B = self._bc(B)
        self.C, self.var_C, self.groups_C = self._bc(C)
        groups = self.groups_B * self.groups_C // math.gcd(self.groups_B, self.groups_C)
        self.block_groups = groups
        self.channels_per_block_group = self.channels // groups
        rows = self.batch * self.channels
        self.S, self.R = _layout(self.n_states, rows)
        self.chunk = _chunk(self.S, self.R)
        self.n_chunks = cdiv(self.length, self.chunk)
        self.np = self.S * self.R
        rows_per_block = _THREADS // self.R
        self.row_tiles = cdiv(self.channels_per_block_group, rows_per_block)
        self.grid = (self.batch * groups * self.row_tiles,)

    @staticmethod
    def _bc(X):
        """(kernel array, input-dependent, groups)."""
        if X.ndim == 2:
            return _arrays.contiguous(X, cupy.float32), False, 1
        return _arrays.contiguous(X), True, (1 if X.ndim == 3 else int(X.shape[1]))

    def flags(self, softplus: bool, det: int = 0) -> np.int32:
        """det: 0, _DET (deterministic dB/dC slices by block) or _DET | _DET_V1 (session 4's layout)."""
        return np.int32(int(bool(softplus)) | (2 if self.var_B else 0) | (4 if self.var_C else 0) | int(det))

    def sizes(self, softplus: bool, det: int = 0):
        return (
            np.int32(self.length), np.int32(self.channels), np.int32(self.n_states),
            np.int32(self.channels_per_block_group), np.int32(self.block_groups),
            np.int32(self.groups_B if self.var_B else 1), np.int32(self.groups_C if self.var_C else 1),
            np.int32(self.row_tiles), self.flags(softplus, det), np.int32(self.n_chunks),
        )

    def empty(self) -> bool:
        return self.batch * self.channels * self.length == 0


# Lanes forward kernel (the output pass and the backward's checkpoint pass): "v3" (scan_fwd3, the
# default: branch-free staging, double-buffered tiles, one barrier per tile, output written by the
# reducing lanes) or "v2" (scan_fwd, the kernel measured in session 3). Layouts with one lane per row
# (R = 1, N <= 4) always take v2 (v3's double buffers would pass 48 KiB of shared memory). The
# module attribute wins when set (benchmarks); else SSMCORE_SCAN_FWD_IMPL, read on every call.
fwd_impl = None


def _fwd_impl() -> str:
    impl = fwd_impl or os.environ.get("SSMCORE_SCAN_FWD_IMPL", "v3")
    if impl not in ("v2", "v3"):
        raise ValueError(f"SSMCORE_SCAN_FWD_IMPL: expected 'v2' or 'v3', got {impl!r}")
    return impl


def _forward(a: _Args, softplus, out=None, last=None, ckpt=None):
    name = "scan_fwd3" if a.R >= 2 and _fwd_impl() == "v3" else "scan_fwd"
    kernel = _runtime.function(FAMILY, f"{name}<{a.T}, {a.S}, {a.R}>")
    _runtime.launch(kernel, a.grid, (_THREADS,), (
        a.u, a.delta, a.A, a.B, a.C, ptr(a.D), ptr(a.z), ptr(a.delta_bias), ptr(a.initial_state),
        ptr(out), ptr(last), ptr(ckpt), *a.sizes(softplus), *a.su, *a.sdelta, *a.sz,
    ))


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """CuPy forward of ``ssmcore.selective_scan`` (arguments already validated)."""
    a = _Args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    out = cupy.empty((a.batch, a.channels, a.length), u.dtype)
    last = cupy.empty((a.batch, a.channels, a.n_states), cupy.float32) if return_last_state else None
    if a.empty():
        if last is not None:
            last[...] = 0 if a.initial_state is None else a.initial_state
    elif _use_time_parallel(a):
        prefetch = int(bool(tp_prefetch) and a.n_states > 0)  # N = 0: no B / C row to fetch
        kernel = _runtime.function(FAMILY, f"scan_fwd_tp<{a.T}, {tp_states}, {prefetch}>")
        if a.length % 8 == 0:
            # Vector loads need 16-byte rows: a strided input whose rows are not gets copied contiguous.
            for name, sname in (("u", "su"), ("delta", "sdelta"), ("z", "sz")):
                x = getattr(a, name)
                if x is not None and not (_vec_strides(getattr(a, sname)) and _arrays.aligned16(x)):
                    x, st = _rows(x, False)
                    setattr(a, name, x)
                    setattr(a, sname, st)
        vec = a.length % 8 == 0 and _arrays.aligned16(a.u, a.delta, a.z, out, a.B if a.var_B else None,
                                                       a.C if a.var_C else None) and _vec_strides(a.su, a.sdelta, a.sz)
        _runtime.launch(kernel, (a.batch * a.channels,), (_THREADS,), (
            a.u, a.delta, a.A, a.B, a.C, ptr(a.D), ptr(a.z), ptr(a.delta_bias), ptr(a.initial_state),
            out, ptr(last), np.int32(a.length), np.int32(a.channels), np.int32(a.n_states),
            np.int32(a.groups_B if a.var_B else 1), np.int32(a.groups_C if a.var_C else 1),
            a.flags(delta_softplus), np.int32(vec), *a.su, *a.sdelta, *a.sz,
        ))
    else:
        _forward(a, delta_softplus, out=out, last=last)
    return (out, last) if return_last_state else out


def selective_scan_checkpoints(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The forward's output and the backward's state checkpoints in one pass of the lanes kernel (arguments
    already validated): (out (B, D, L) in u's dtype, ckpt). Passing ckpt to :func:`selective_scan_bwd` with the
    same inputs skips its checkpoint pass (a second scan forward); ckpt is (B, L / chunk, D, N padded) float32,
    chunk 16-32 steps: 2-4 bytes per (b, d, t) at N = 16, one bf16 activation's size at B8 D2048 L2048 (torch's
    fused Mamba-1 path keeps it from the forward to the backward)."""
    a = _Args(u, delta, A, B, C, D, z, delta_bias, None)
    out = cupy.empty((a.batch, a.channels, a.length), u.dtype)
    ckpt = cupy.empty((a.batch, a.n_chunks, a.channels, a.np), cupy.float32)
    if not a.empty():
        _forward(a, delta_softplus, out=out, ckpt=ckpt)
    return out, ckpt


_TP_MAX_LENGTH = 4096
# N = 16: fewer than 1056 rows on the H200's 132 SMs. Session 6 (H200 run 2, B1 D4096 L2048 N16 bf16): the v3
# lanes forward 140 us against scan_fwd_tp 243 us (189 with its prefetch; reference 160), so 4096 rows no longer
# take the time-parallel kernel (the threshold was a quarter of the wide-layout one, 5280 rows, from session 4's
# v2 lanes kernel, 280 us there).
_TP_LANES_PER_SM = _WIDE_THREADS_PER_SM // 16


def _use_time_parallel(a: _Args) -> bool:
    """scan_fwd_tp (one block per row, time split over its threads) for the output forward?"""
    if fwd_kernel == "tp":
        return True
    if fwd_kernel == "lanes" or force_states_per_lane is not None:
        return False
    # auto: where the lane layouts fall back to the narrow one (too few rows to fill the GPU), and only up
    # to L 4096: on the H200 (run 4) the time-parallel kernel won at B1 L2048 (240 vs 280 us) but lost at
    # L16384 (2467 vs 2214 us), where the lanes kernel's serial loop is long enough to hide its latency.
    if a.length > _TP_MAX_LENGTH:
        return False
    # The lanes kernel (checkpoint pass) at B8 D2048 L2048 N16 (16384 rows) took 355 us against the
    # time-parallel kernel's 913 us (H200, session 5, bench/profile_block.py), and since session 6 the lanes
    # forward wins at B1 D4096 (4096 rows) too (140 vs 243 us): the time-parallel kernel is left to grids of a
    # few hundred rows (rows x lanes per row against a sixteenth of the wide-layout threshold).
    npad = _pow2_ceil(max(a.n_states, 1))
    wide = max(min(npad, 4), npad // 32)
    return a.batch * a.channels * (npad // wide) < _arrays.sm_count() * _TP_LANES_PER_SM


def _cast(x, dtype):
    return x if x.dtype == dtype else x.astype(dtype)


# Deterministic dB/dC (flags of scan_bwd): _DET alone = "v2" (the default since 2026-11-29, session 5):
# block k of the grid stores its sums to slice k of a (grid, N, L) float32 buffer = (B, G, P, N, L) with
# P = blocks per (batch entry, group), one bc_slice_sum launch adds the P slices of both dB and dC in a
# fixed order and writes them in B/C's dtype. _DET | _DET_V1 = "v1" (session 4): slices laid out as
# (P, B, G, N, L), whose index scan_bwd computed with three integer divisions per stored value (~90
# instructions, on the latency-bound chunk loop's critical path at one block per SM), then one
# column_sum per tensor and a cast. SSMCORE_SCAN_DET_IMPL picks (read on every call); the module
# attribute wins when set (benchmarks).
_DET, _DET_V1 = 8, 16
det_impl = None


def _det_impl() -> str:
    impl = det_impl or os.environ.get("SSMCORE_SCAN_DET_IMPL", "v2")
    if impl not in ("v1", "v2"):
        raise ValueError(f"SSMCORE_SCAN_DET_IMPL: expected 'v1' or 'v2', got {impl!r}")
    return impl


def _bc_grad_buffer(a: _Args, var: bool, groups: int, det: int):
    if not var:
        return cupy.zeros((a.batch, a.channels, a.n_states), cupy.float32)
    shape = (a.batch, groups, a.n_states, a.length)
    blocks_per_group = a.block_groups // groups * a.row_tiles
    if det & _DET_V1:
        return cupy.empty((blocks_per_group,) + shape, cupy.float32)
    if det:
        return cupy.empty((a.batch, groups, blocks_per_group, a.n_states, a.length), cupy.float32)
    return cupy.zeros(shape, cupy.float32)


def _slice_sums(a: _Args, parts, dtype):
    """Deterministic v2: each (B, G, P, N, L) float32 buffer of parts (None where B/C is not input-dependent)
    -> (B, G, N, L) in dtype, the P slices added in a fixed order; one launch for all of them."""
    outs = [None if p is None else cupy.empty(p.shape[:2] + p.shape[3:], dtype) for p in parts]
    pairs = [(p, o) for p, o in zip(parts, outs) if p is not None] + [(None, None)]
    (p0, o0), (p1, o1) = pairs[0], pairs[1]
    cols = a.n_states * a.length
    if cols == 0:
        return outs
    vec = 4 if cols % 4 == 0 else 1  # float4 columns (buffers are 256-byte aligned, slices cols * 4 bytes)
    xb = cdiv(cols, 32 * vec)  # blocks per (batch entry, group)
    nbg0 = p0.shape[0] * p0.shape[1]
    nbg1 = 0 if p1 is None else p1.shape[0] * p1.shape[1]
    kernel = _runtime.function(FAMILY, f"bc_slice_sum<{_runtime.ctype(dtype)}, {vec}>")
    _runtime.launch(kernel, ((nbg0 + nbg1) * xb,), (32, 8), (
        p0, o0, np.int32(p0.shape[2]), np.int64(nbg0), ptr(p1), ptr(o1),
        np.int32(1 if p1 is None else p1.shape[2]), np.int64(cols), np.int64(xb),
    ))
    return outs


def _fixed_order_sum(part):
    """part (P, ...) float32 -> sum over P, every column added in the same order on every run."""
    out = cupy.empty(part.shape[1:], cupy.float32)
    if part.shape[0] == 1:
        out[...] = part[0]
        return out
    cols = out.size
    if cols >= 2**31:
        raise ValueError(f"B: deterministic dB/dC support fewer than 2**31 (B, G, N, L) entries, got {out.shape}")
    _runtime.launch(_runtime.function(FAMILY, "column_sum<float>"), (cdiv(cols, 32),), (32, 8),
                    (part, np.int64(part.shape[0]), np.int32(cols), out))
    return out


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, dlast_state=None, ckpt=None):
    """CuPy backward of ``ssmcore.selective_scan``: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias,
    dinitial_state), each in its input's dtype, None for inputs that were None. ckpt: the checkpoints of
    :func:`selective_scan_checkpoints` for these inputs (no initial_state), or None to compute them here."""
    _arrays.check_kernel_dtypes(dout=dout)
    a = _Args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dout, sdout = _rows(dout, _strided())
    nb, nd, L, N = a.batch, a.channels, a.length, a.n_states
    f32 = cupy.float32
    du = cupy.empty((nb, nd, L), u.dtype)
    ddelta = cupy.empty((nb, nd, L), delta.dtype)
    dz = cupy.empty((nb, nd, L), z.dtype) if z is not None else None
    dA_part = cupy.zeros((nb, nd, N), f32)
    # Input-dependent dB/dC: global atomics into (B, G, N, L), or in deterministic mode one slice per
    # block, (B, G, blocks per group, N, L), summed in a fixed order by bc_slice_sum (v1: (blocks per
    # group, B, G, N, L) and column_sum; see _DET).
    det = 0
    if deterministic() and (a.var_B or a.var_C) and not a.empty():
        det = _DET | (_DET_V1 if _det_impl() == "v1" else 0)
    dB_buf = _bc_grad_buffer(a, a.var_B, a.groups_B, det)
    dC_buf = _bc_grad_buffer(a, a.var_C, a.groups_C, det)
    dD_part = cupy.zeros((nb, nd), f32) if D is not None else None
    dbias_part = cupy.zeros((nb, nd), f32) if delta_bias is not None else None
    dlast = _arrays.contiguous(dlast_state, f32)
    if initial_state is None:
        dh0 = None
    elif a.empty():
        dh0 = cupy.zeros((nb, nd, N), f32) if dlast is None else dlast.copy()
    else:
        dh0 = cupy.empty((nb, nd, N), f32)
    if not a.empty():
        if (ckpt is None or initial_state is not None or ckpt.dtype != f32
                or ckpt.shape != (nb, a.n_chunks, nd, a.np)):
            ckpt = cupy.empty((nb, a.n_chunks, nd, a.np), f32)
            _forward(a, delta_softplus, ckpt=ckpt)
        impl = _bwd_impl()
        min_blocks = _bwd_min_blocks(a.grid[0], (a.S, a.R), impl)
        options = () if min_blocks == 2 else (f"-DSCAN_BWD_MIN_BLOCKS={int(min_blocks)}",)
        if impl == "v2":
            options += ("-DSCAN_BWD_V=2",)
        kernel = _runtime.function(FAMILY, f"scan_bwd<{a.T}, {a.S}, {a.R}>", options)
        _runtime.launch(kernel, a.grid, (_THREADS,), (
            dout, a.u, a.delta, a.A, a.B, a.C, ptr(a.D), ptr(a.z),
            ptr(a.delta_bias), ckpt, ptr(dlast), du, ddelta, ptr(dz), dA_part, dB_buf, dC_buf,
            ptr(dD_part), ptr(dbias_part), ptr(dh0), *a.sizes(delta_softplus, det), *sdout, *a.su,
            *a.sdelta, *a.sz,
        ))
        if det & _DET_V1:
            dB_buf = _fixed_order_sum(dB_buf) if a.var_B else dB_buf
            dC_buf = _fixed_order_sum(dC_buf) if a.var_C else dC_buf
        elif det:
            sums = _slice_sums(a, (dB_buf if a.var_B else None, dC_buf if a.var_C else None), u.dtype)
            dB_buf = sums[0] if a.var_B else dB_buf
            dC_buf = sums[1] if a.var_C else dC_buf
    dB = dB_buf.reshape(B.shape) if a.var_B else dB_buf.sum(axis=0)
    dC = dC_buf.reshape(C.shape) if a.var_C else dC_buf.sum(axis=0)
    return (
        du,
        ddelta,
        _cast(dA_part.sum(axis=0), A.dtype),
        _cast(dB, B.dtype),
        _cast(dC, C.dtype),
        None if D is None else _cast(dD_part.sum(axis=0), D.dtype),
        dz,
        None if delta_bias is None else _cast(dbias_part.sum(axis=0), delta_bias.dtype),
        None if initial_state is None else _cast(dh0, initial_state.dtype),
    )
