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

chunk_size: a speed/memory knob only (results do not depend on it beyond rounding). The
backward keeps two float32 (Q x Q) matrices per chunk (C_t . B_s per group, dy_t . x_s per
head), so the chunk is capped at 256 and at L. Scratch: about B*L*H*(Q + 4P + 2N) + 2*B*nc*H*P*N
floats (2 GiB of DX plus ~2.7 GiB at B8 L4096 H64 P64 N128).

Speed knob: the environment variable SSMCORE_SSD_BWD_IMPL (read at each call): v3 (default), v2 or v1
(the previous kernels, kept for comparison; see IMPL_ENV below).
"""

from __future__ import annotations

import math
import os

import cupy
import numpy as np

from . import _arrays, _runtime
from ._arrays import NULL, cdiv, ptr

FAMILY = "ssd_bwd"
_TYPES = ("float", "half_t", "bf16_t")
_THREADS = 128
_MAX_CHUNK = 256  # also SSDB_DCS_MAXQ of ssd_bwd.cu
_DCS_THREADS = 256  # ssdb_dcs2 / ssdb_fro blocks (SSDB_DCS_THREADS / SSDB_RED_THREADS)
_NO_LIMIT = (0.0, math.inf)

# Tensor-core path (ssdb_mm) by default; False: the plain SIMT kernels (the reference for the former).
USE_TENSOR_CORES = True
_MM_TILE = 64
_MM3_THREADS = 256  # ssdb_mm3 blocks (MM3_THREADS of ssd_bwd.cu)
# Speed knob, read at each call: SSMCORE_SSD_BWD_IMPL=v1 selects the previous kernels (operand tiles
# filled along the tile axes whatever the global layout, ssdb_dcs with one thread per position,
# ssdb_dt's serial <dh, h0> loop); v2 fills every operand tile along its contiguous global axis, and
# uses ssdb_dcs2 (a block per chunk) and ssdb_fro (a block per chunk); v3 (default) is v2 with ssdb_mm3
# for the products (chunk scalars in shared memory, all loads of a K slice in flight, register
# double-buffering, the output tiles of a chunk-head in consecutive blocks), ssdb_pass2 (float4, 8
# chunks' loads in flight) for the state passing and ssdb_dcs3 (8 loads in flight per walk). Same math,
# bitwise equal to v2.
IMPL_ENV = "SSMCORE_SSD_BWD_IMPL"
IMPLS = ("v1", "v2", "v3")


def _impl():
    v = os.environ.get(IMPL_ENV, "v3").strip().lower()
    return v if v in IMPLS else "v3"


_MM = {"cb": 0, "dxdot": 1, "states": 2, "gl": 3, "hc": 4, "dhb": 5, "dx": 6, "dz": 7, "dc": 8, "db": 9}

INSTANTIATIONS = ["ssdb_cumsum", "ssdb_pass", "ssdb_pass2", "ssdb_dt", "ssdb_fro"] + [
    f"{k}<{t}>" for k in ("ssdb_dy", "ssdb_cb", "ssdb_dx_dot", "ssdb_states", "ssdb_dx", "ssdb_dbc", "ssdb_dcs",
                          "ssdb_dcs2", "ssdb_dcs3")
    for t in _TYPES
] + [f"ssdb_mm<{t}, {k}>" for t in _TYPES for k in range(10)] + [
    f"ssdb_mm3<{t}, {k}>" for t in _TYPES for k in range(10)]


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


def _launch_grid(name, grid, args, threads=_THREADS):
    """Every launch goes through here (bench/gpu_ssd_bwd.py times the kernels by wrapping it)."""
    _runtime.launch(_runtime.function(FAMILY, name), grid, (threads,), args)


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
    v3 = impl == "v3" and Q * max(H * P, G * N, Q) < 2**31 and not _runtime.is_hip()

    dtf = _f32(dt)
    Af = _f32(A)
    biasf = _f32(dt_bias) if dt_bias is not None else cupy.zeros((H,), cupy.float32)
    Df = cupy.zeros((H, P), cupy.float32)
    if D is not None:
        Df[...] = _f32(D).reshape(H, -1)
    initf = _f32(initial_states)
    dfinf = _f32(dfinal_states)

    # seg: sequence number of each position (monotone).
    seg = cupy.zeros((batch, L), cupy.int32)
    if seq_idx is not None and L > 1:
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
    _launch("ssdb_cumsum", batch * H * nc,
            (dtf, Af, biasf, i32(bool(dt_softplus)), i32(clamp), f32(lo if clamp else 0.0),
             f32(hi if clamp else 0.0), dtp, slope, cs, i32(batch), i64(L), i32(H), i32(Q), i32(nc)))

    # dy = dout * silu(z).
    n_x = batch * L * H * P
    dy = cupy.empty((batch, L, H, P), cupy.float32)
    _launch(f"ssdb_dy<{T}>", n_x, (douts, ptr(zs), dy, i64(n_x)))

    dims = (i32(batch), i64(L), i32(H), i32(G), i32(P), i32(N), i32(Q), i32(nc))
    cb = cupy.empty((batch, nc, G, Q, Q), cupy.float32)
    dxd = cupy.empty((batch, nc, H, Q, Q), cupy.float32)
    h0 = cupy.empty((batch, nc, H, P, N), cupy.float32)
    dh = cupy.empty((batch, nc, H, P, N), cupy.float32)
    dinit = cupy.empty((batch, H, P, N), cupy.float32) if initial_states is not None else None
    dx = cupy.empty((batch, L, H, P), cupy.float32)
    dz = cupy.empty((batch, L, H, P), cupy.float32) if z is not None else None
    hC = cupy.empty((batch, L, H, P), cupy.float32)
    dhB = cupy.empty((batch, L, H, P), cupy.float32)
    dBh = cupy.empty((batch, L, H, N), cupy.float32)
    dCh = cupy.empty((batch, L, H, N), cupy.float32)
    pass_args = (cs, seg, i32(batch), i64(L), i32(H), i32(P * N), i32(Q), i32(nc))

    if USE_TENSOR_CORES:
        def mm(kind, rows, cols, out, per=nc * H):
            _mm(kind, T, rows, cols, per, batch, (xs, Bs, Cs, ptr(douts), ptr(zs), dy, Df, dtp, cs, seg, cb, dxd, h0,
                                                  dh, hC, out) + dims + (i32(v2),), v3=v3)

        def state_pass(reverse, buf, init, dinit_):
            # ssdb_pass2 needs float4 rows: PN % 4 == 0 and 16-byte aligned pointers (init may be a caller's view).
            aligned = P * N % 4 == 0 and _arrays.aligned16(buf, init, dinit_)
            args = (i32(reverse), buf, ptr(init), ptr(dinit_)) + pass_args
            if v3 and aligned:
                _launch("ssdb_pass2", batch * H * (P * N // 4), args)
            else:
                _launch("ssdb_pass", batch * H * P * N, args)

        mm("cb", Q, Q, cb, per=nc * G)
        mm("dxdot", Q, Q, dxd)
        mm("states", P, N, h0)
        state_pass(0, h0, initf, None)
        mm("gl", P, N, dh)
        state_pass(1, dh, dfinf, dinit)
        mm("hc", Q, P, hC)
        mm("dhb", Q, P, dhB)
        mm("dx", Q, P, dx)
        if z is not None:
            mm("dz", Q, P, dz)
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
        _launch_grid(f"ssdb_dcs{'3' if v3 else '2'}<{T}>", (batch * nc * H,), dcs_args, threads=_DCS_THREADS)
        fro = cupy.empty((batch * nc * H,), cupy.float32)
        _launch_grid("ssdb_fro", (batch * nc * H,), (h0, dh, fro, i32(P * N)), threads=_DCS_THREADS)
    else:
        _launch(f"ssdb_dcs<{T}>", batch * H * L, dcs_args)
    ddt = cupy.empty((batch, L, H), cupy.float32)
    dA_part = cupy.empty((batch * nc, H), cupy.float32)
    dtb_part = cupy.empty((batch * nc, H), cupy.float32)
    _launch("ssdb_dt", batch * H * nc, (Af, dtp, slope, cs, seg, dcs, ddir, est, h0, dh, ptr(fro), ddt, dA_part,
                                        dtb_part, i32(batch), i64(L), i32(H), i32(P * N), i32(Q), i32(nc)))

    def cast(a, like):
        return a.astype(like.dtype) if a.dtype != like.dtype else a

    hpg = H // G
    dB = dBh.reshape(batch, L, G, hpg, N).sum(axis=3)
    dC = dCh.reshape(batch, L, G, hpg, N).sum(axis=3)
    dD = None
    if D is not None:
        dD = (dy * xs.astype(cupy.float32)).reshape(batch * L, H, P).sum(axis=0)
        if D.ndim == 1:
            dD = dD.sum(axis=1)
        dD = cast(dD, D)
    return (
        cast(dx, x),
        cast(ddt, dt),
        cast(dA_part.sum(axis=0), A),
        cast(dB, B),
        cast(dC, C),
        dD,
        cast(dz, z) if z is not None else None,
        cast(dtb_part.sum(axis=0), dt_bias) if dt_bias is not None else None,
        cast(dinit, initial_states) if initial_states is not None else None,
    )
