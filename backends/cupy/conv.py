"""CuPy launchers for the causal depthwise conv1d (kernels in conv.cu).

Arguments arrive validated by ssmcore.ops.conv. Widths 1..4 run kernels specialised on W;
wider ones (up to 64) a generic kernel. x may be contiguous (B, D, L) or channel-last (a
(B, L, D) array transposed): both have their own forward kernel and the output keeps x's
layout; other strides are made contiguous. The backward kernels take contiguous inputs (a
channel-last x is copied), and dx is returned in x's layout. Weights and biases are passed as
float32; seq_idx, cache_seqlens and conv_state_indices as int32.
"""

from __future__ import annotations

import os

import cupy
import numpy as np

from . import _arrays, _runtime
from ._arrays import cdiv, ptr

FAMILY = "conv"
_TYPES = ("float", "half_t", "bf16_t")
_WIDTHS = (0, 1, 2, 3, 4)  # 0 = any width up to 64, chosen at run time
_CHUNK = 1024  # positions per block of the contiguous backward kernels (128 threads x 8)
_CL_STEPS = 8  # time steps per thread of the channel-last kernel
# Positions per thread of conv_fwd_vec (the contiguous, aligned, no-seq_idx, W <= 4 forward):
# 8, 16 or 32, with 2048 / fwd_positions threads per block.
# 8 since 2026-11-29 (H200: 77.9 us vs 93.6 us for 16 at B8 D4096 L2048 W4 bf16);
# SSMCORE_CONV_FWD_POSITIONS overrides it (benchmarks set the attribute directly).
fwd_positions = int(os.environ.get("SSMCORE_CONV_FWD_POSITIONS", "8"))
# Forward of that common case: "ws" (conv_fwd_ws, session 4: a warp owns fwd_words x 512 bytes of a
# row, each warp load one contiguous 512-byte span, all of a thread's words in flight at once) or
# "vec" (conv_fwd_vec with fwd_positions, the default before session 4). (Session 6 tried a persistent-grid
# form of conv_fwd_ws that loads a warp's next segment before storing the current one: 78.0 us against 75.5 at
# B8 D4096 L2048 W4 bf16 on the H200, removed.)
fwd_path = os.environ.get("SSMCORE_CONV_FWD", "ws")
# 16-byte words per thread: 2, 4 or 8, or 0 = by row length: 8 where a row fills a warp's 8 words
# (32 x 8 x 16 bytes = 2048 positions of 16-bit data), else 4 (session 6, H200 run 3, B8 D4096 L2048 W4 bf16:
# 2 words 85.3 us, 4 words 75.5, 8 words 72.4; reference 72.2).
fwd_words = int(os.environ.get("SSMCORE_CONV_FWD_WORDS", "0"))
# conv_fwd_ws with evict-first loads of x and stores of out (ld/st.global.cs; 4 or 8 words): session 7's
# variant, off by default. The attribute wins when set (benchmarks); else SSMCORE_CONV_FWD_HINT (0 | 1), read per call.
fwd_hint = None


def _fwd_hint() -> bool:
    value = str(int(bool(fwd_hint)) if fwd_hint is not None else os.environ.get("SSMCORE_CONV_FWD_HINT", "0"))
    if value not in ("0", "1"):
        raise ValueError(f"SSMCORE_CONV_FWD_HINT: expected '0' or '1', got {value!r}")
    return value == "1"


def _fwd_words(x) -> int:
    if fwd_words:
        return fwd_words
    return 8 if x.shape[2] * x.itemsize >= _arrays.warp_size() * 8 * 16 else 4

# Backward of the common contiguous case (L % 8 == 0, aligned, no seq_idx, W <= 4): "fused" (one
# kernel: x, dout read once, dx written once) or "split" (conv_bwd_dpre + conv_bwd_dx through a
# float32 dpre, the only path before 2026-11-29 and still the one for every other case).
# "ws" (conv_bwd_ws, session 4: the warp-strided layout of conv_fwd_ws, x and dout words all in flight
# at once, warps independent, no __syncthreads) is the default since session 4.
bwd_path = os.environ.get("SSMCORE_CONV_BWD", "ws")
bwd_words = int(os.environ.get("SSMCORE_CONV_BWD_WORDS", "4"))  # 2 or 4 words of x (and dout) per thread
# Channel-last x (D % 8 == 0, aligned, no seq_idx, W <= 4, initial states absent or of x's dtype):
# "tile" (shared-memory tiles, forward and backward) or "old" (conv_fwd_cl forward; the backward
# copies x to contiguous and dx back).
cl_path = os.environ.get("SSMCORE_CONV_CL", "tile")
# The channel-last backward kernel when cl_path is "tile": "walk" (conv_bwd_cl_walk, session 4: sliding
# register windows, ~3 shared-memory accesses per position instead of ~11) or "tile" (conv_bwd_cl_tile).
cl_bwd = os.environ.get("SSMCORE_CONV_CL_BWD", "walk")
# causal_conv1d_update: "v2" reads x through its strides (no copy of a strided x) and keeps a one-token
# shift window's state row in registers; "v1" copies x to contiguous and runs the general loop.
update_path = os.environ.get("SSMCORE_CONV_UPDATE", "v2")

INSTANTIATIONS = (
    [f"conv_fwd<{t}, {w}, 8>" for t in _TYPES for w in _WIDTHS]
    + [f"conv_fwd_vec<{t}, {w}, {e}>" for t in _TYPES for w in (1, 2, 3, 4) for e in (8, 16, 32)]
    + [f"{k}<{t}, {w}>" for k in ("conv_fwd_cl", "conv_bwd_dpre", "conv_bwd_dx") for t in _TYPES for w in _WIDTHS]
    + [f"{k}<{t}, {w}>" for k in ("conv_bwd_fused", "conv_fwd_cl_tile", "conv_bwd_cl_tile") for t in _TYPES
       for w in (1, 2, 3, 4)]
    + [f"conv_bwd_cl_walk<{t}, {w}>" for t in _TYPES for w in (1, 2, 3, 4)]
    + [f"conv_fwd_ws<{t}, {w}, {n}, {h}>" for t in _TYPES for w in (1, 2, 3, 4) for n in (2, 4, 8)
       for h in ("false", "true") if h == "false" or n >= 4]
    + [f"conv_bwd_ws<{t}, {w}, {n}>" for t in _TYPES for w in (1, 2, 3, 4) for n in (2, 4)]
    + [f"conv_update<{tx}, {ts}>" for tx in _TYPES for ts in _TYPES]
    + [f"conv_param_sum<{tw}, {tb}>" for tw in _TYPES for tb in _TYPES]
)


def _width_arg(width: int) -> int:
    return width if width <= 4 else 0


def _channel_last(x) -> bool:
    """True when channels are x's fastest axis (a (B, L, D) array transposed), as on the CPU."""
    _, n_chan, length = x.shape
    return n_chan > 1 and length > 1 and abs(x.strides[1]) < abs(x.strides[2])


def _int32(a):
    return None if a is None else cupy.ascontiguousarray(a, dtype=cupy.int32)


def _indices32(a, n_rows):
    """Pool indices as int32; int64 ones are clipped to [-1, n_rows] first (no host sync) so that a
    value past 2**31 cannot wrap into a valid row: the kernel treats -1 and n_rows as padding."""
    if a is not None and a.dtype.itemsize > 4:
        a = a.clip(-1, n_rows)
    return _int32(a)


def _param(a):
    return _arrays.contiguous(a, cupy.float32)


_CL_TL, _CL_THREADS = 64, 128  # time steps and threads of a channel-last tile block (CL_TL, CL_NT)


def _rows_in_place(x) -> bool:
    """A channel-last x (B, D, L) whose rows the tile kernels can read in place with 16-byte loads: unit channel
    stride, and data, row (time) and batch strides on 16-byte boundaries (the rows may be wider than D)."""
    s_b, s_c, s_t = x.strides
    return (s_c == x.itemsize and s_t > 0 and s_t % 16 == 0 and _arrays.aligned16(x)
            and (x.shape[0] == 1 or (s_b >= 0 and s_b % 16 == 0)))


def _cl_tile_ok(vec, seq, wa, init, init_f32) -> bool:
    return cl_path == "tile" and vec and seq is None and wa > 0 and (init is None or not init_f32)


_WS_THREADS = 128  # CONV_WS_THREADS


def _ws_layout(x, words):
    """(segments per row, warps, blocks) of conv_fwd_ws / conv_bwd_ws: a warp owns a segment of
    warp size x words x 16 bytes of one row."""
    n_batch, n_chan, length = x.shape
    warp = _arrays.warp_size()
    nseg = cdiv(length, warp * words * (16 // x.itemsize))
    nwarps = n_batch * n_chan * nseg
    if nwarps >= 2**32:
        raise ValueError(f"x: {nwarps} warp segments do not fit the 32-bit warp index")
    return nseg, nwarps, cdiv(nwarps, _WS_THREADS // warp)


def _cl_grid(x):
    n_batch, n_chan, length = x.shape
    return (cdiv(n_chan, 128 // x.itemsize), cdiv(length, _CL_TL), n_batch)


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                  return_final_states=False):
    _arrays.check_kernel_dtypes(x=x, weight=weight, bias=bias, initial_states=initial_states)
    t = _arrays.kernel_type("x", x)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    channel_last = _channel_last(x)
    w, b, seq = _param(weight), _param(bias), _int32(seq_idx)
    init, init_f32 = _arrays.row_stream(initial_states, x.dtype)
    final_dtype = (initial_states if initial_states is not None else x).dtype
    final = cupy.empty((n_batch, n_chan, width - 1), final_dtype) if return_final_states else None
    final_arg = final if final is not None and width > 1 else None
    silu = np.int32(activation is not None)
    wa = _width_arg(width)
    if channel_last:
        out_store = cupy.empty((n_batch, length, n_chan), x.dtype)
        out = out_store.transpose(0, 2, 1)
        vec = n_chan % 8 == 0 and _rows_in_place(x) and _arrays.aligned16(out_store)
        if x.size and _cl_tile_ok(vec, seq, wa, init, init_f32):
            # The tile kernel reads x's rows where they are (a channel slice of wider rows needs no copy).
            item = x.itemsize
            _runtime.launch(
                _runtime.function(FAMILY, f"conv_fwd_cl_tile<{t}, {wa}>"), _cl_grid(x), (_CL_THREADS,),
                (x, w, ptr(b), ptr(init), out_store, ptr(final_arg),
                 np.int32(final is not None and final.dtype == cupy.float32), np.int32(n_chan), np.int64(length),
                 silu, np.int64(x.strides[0] // item if n_batch > 1 else 0), np.int64(x.strides[2] // item)),
            )
        elif x.size:
            xs = cupy.ascontiguousarray(x.transpose(0, 2, 1))  # (B, L, D): no copy for a true channel-last x
            vec = n_chan % 8 == 0 and _arrays.aligned16(xs, out_store)
            kernel = _runtime.function(FAMILY, f"conv_fwd_cl<{t}, {wa}>")
            grid = (cdiv(n_chan, 256), cdiv(length, 4 * _CL_STEPS), n_batch)
            _runtime.launch(
                kernel, grid, (32, 4),
                (xs, w, ptr(b), ptr(seq), ptr(init), np.int32(init_f32), out_store, ptr(final_arg),
                 np.int32(final is not None and final.dtype == cupy.float32), np.int32(n_chan), np.int64(length),
                 np.int32(width), silu, np.int32(vec)),
            )
    else:
        xs = cupy.ascontiguousarray(x)
        out = cupy.empty(x.shape, x.dtype)
        final_f32 = np.int32(final is not None and final.dtype == cupy.float32)
        vec = length % 8 == 0 and _arrays.aligned16(xs, out, seq)
        if x.size and vec and seq is None and wa and fwd_path == "ws":
            words = _fwd_words(xs)
            nseg, nwarps, blocks = _ws_layout(xs, words)
            hint = "true" if words >= 4 and _fwd_hint() else "false"
            kernel = _runtime.function(FAMILY, f"conv_fwd_ws<{t}, {wa}, {words}, {hint}>")
            _runtime.launch(
                kernel, (blocks,), (_WS_THREADS,),
                (xs, w, ptr(b), ptr(init), np.int32(init_f32), out, ptr(final_arg), final_f32, np.int32(n_chan),
                 np.int64(length), np.uint32(nseg), np.uint32(nwarps), silu),
            )
        elif x.size and vec and seq is None and wa:
            nchunks = cdiv(length, 2048)
            kernel = _runtime.function(FAMILY, f"conv_fwd_vec<{t}, {wa}, {fwd_positions}>")
            _runtime.launch(
                kernel, (n_batch * n_chan * nchunks,), (2048 // fwd_positions,),
                (xs, w, ptr(b), ptr(init), np.int32(init_f32), out, ptr(final_arg), final_f32, np.int32(n_chan),
                 np.int64(length), np.int64(nchunks), silu),
            )
        elif x.size:
            nchunks = cdiv(length, 1024)
            kernel = _runtime.function(FAMILY, f"conv_fwd<{t}, {wa}, 8>")
            _runtime.launch(
                kernel, (n_batch * n_chan * nchunks,), (128,),
                (xs, w, ptr(b), ptr(seq), ptr(init), np.int32(init_f32), out, ptr(final_arg), final_f32,
                 np.int32(n_chan), np.int64(length), np.int32(width), np.int64(nchunks), silu, np.int32(vec)),
            )
    return (out, final) if return_final_states else out


def _param_grads(part, weight, bias):
    """dweight, dbias from the per-block partials part (rows, D * (W + 1)), added in a fixed order and written
    in the parameters' dtypes (kernel dtypes: checked by the callers) by one kernel, conv_param_sum: whole fresh
    allocations, which the torch adapter's launch plans can record."""
    n_chan, width = weight.shape
    dweight = cupy.empty((n_chan, width), weight.dtype)
    dbias = None if bias is None else cupy.empty(n_chan, bias.dtype)
    tw = _arrays.kernel_type("weight", weight)
    tb = tw if bias is None else _arrays.kernel_type("bias", bias)
    _runtime.launch(
        _runtime.function(FAMILY, f"conv_param_sum<{tw}, {tb}>"), (cdiv(n_chan * (width + 1), 32),), (32, 8),
        (part, np.int64(part.shape[0]), np.int32(n_chan), np.int32(width), dweight, ptr(dbias)),
    )
    return dweight, dbias


def _bwd_cl_tile(dout, x, weight, bias, activation, seq_idx, initial_states, dfinal_states):
    """The channel-last backward through conv_bwd_cl_tile, or None when its conditions fail."""
    t = _arrays.kernel_type("x", x)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    wa = _width_arg(width)
    xs = cupy.ascontiguousarray(x.transpose(0, 2, 1))  # (B, L, D): no copy for a true channel-last x
    gs = cupy.ascontiguousarray(dout.transpose(0, 2, 1))
    init, init_f32 = _arrays.row_stream(initial_states, x.dtype)
    dx_store = cupy.empty((n_batch, length, n_chan), x.dtype)
    vec = n_chan % 8 == 0 and _arrays.aligned16(xs, gs, dx_store)
    if not _cl_tile_ok(vec, seq_idx, wa, init, init_f32):
        return None
    w, b = _param(weight), _param(bias)
    dfinal, dfinal_f32 = _arrays.row_stream(dfinal_states, x.dtype) if width > 1 else (None, 0)
    dinit = None if initial_states is None else cupy.empty(initial_states.shape, init.dtype)
    grid = _cl_grid(x)
    part = cupy.empty((n_batch * grid[1], n_chan * (width + 1)), cupy.float32)
    _runtime.launch(
        _runtime.function(FAMILY, f"conv_bwd_cl_{'walk' if cl_bwd == 'walk' else 'tile'}<{t}, {wa}>"), grid,
        (_CL_THREADS,),
        (xs, gs, w, ptr(b), ptr(init), ptr(dfinal), np.int32(dfinal_f32), dx_store,
         ptr(dinit if width > 1 else None), np.int32(init_f32), part, np.int32(n_chan), np.int64(length),
         np.int64(grid[1]), np.int32(activation is not None)),
    )
    if dinit is not None and width == 1:
        dinit.fill(0)
    dweight, dbias = _param_grads(part, weight, bias)
    return dx_store.transpose(0, 2, 1), dweight, dbias, dinit


def causal_conv1d_bwd(dout, x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                      dfinal_states=None):
    _arrays.check_kernel_dtypes(dout=dout, x=x, weight=weight, bias=bias, initial_states=initial_states,
                                dfinal_states=dfinal_states)
    t = _arrays.kernel_type("x", x)
    n_batch, n_chan, length = x.shape
    width = weight.shape[1]
    wa = _width_arg(width)
    channel_last = _channel_last(x)
    if channel_last and x.size and cl_path == "tile" and dout.dtype == x.dtype:
        done = _bwd_cl_tile(dout, x, weight, bias, activation, seq_idx, initial_states, dfinal_states)
        if done is not None:
            return done
    xs = cupy.ascontiguousarray(x)
    g, g_f32 = _arrays.row_stream(dout, x.dtype)
    w, b, seq = _param(weight), _param(bias), _int32(seq_idx)
    init, init_f32 = _arrays.row_stream(initial_states, x.dtype)
    dfinal, dfinal_f32 = _arrays.row_stream(dfinal_states, x.dtype) if width > 1 else (None, 0)
    dx = cupy.empty(x.shape, x.dtype)
    dinit = None if initial_states is None else cupy.empty(initial_states.shape, init.dtype)
    nchunks = cdiv(length, _CHUNK)
    silu = np.int32(activation is not None)
    fused = ws = False
    if x.size:
        vec = length % 8 == 0 and _arrays.aligned16(xs, g, dx, seq)  # a fresh dpre is aligned
        grid = (n_batch * n_chan * nchunks,)
        ws = bwd_path == "ws" and vec and seq is None and wa > 0
        fused = bwd_path == "fused" and vec and seq is None and wa > 0
        dpre = None if fused or ws else cupy.empty(x.shape, cupy.float32)
    part = None if ws else cupy.empty((n_batch * nchunks, n_chan * (width + 1)), cupy.float32)
    if ws:  # partials per warp segment instead of per 1024-position chunk
        nseg, nwarps, blocks = _ws_layout(xs, bwd_words)
        part = cupy.empty((n_batch * nseg, n_chan * (width + 1)), cupy.float32)
        _runtime.launch(
            _runtime.function(FAMILY, f"conv_bwd_ws<{t}, {wa}, {bwd_words}>"), (blocks,), (_WS_THREADS,),
            (xs, g, np.int32(g_f32), w, ptr(b), ptr(init), np.int32(init_f32), ptr(dfinal), np.int32(dfinal_f32),
             dx, ptr(dinit if width > 1 else None), np.int32(init_f32), part, np.int32(n_chan), np.int64(length),
             np.uint32(nseg), np.uint32(nwarps), silu),
        )
    elif fused:
        _runtime.launch(
            _runtime.function(FAMILY, f"conv_bwd_fused<{t}, {wa}>"), grid, (128,),
            (xs, g, np.int32(g_f32), w, ptr(b), ptr(init), np.int32(init_f32), ptr(dfinal), np.int32(dfinal_f32),
             dx, ptr(dinit if width > 1 else None), np.int32(init_f32), part, np.int32(n_chan), np.int64(length),
             np.int64(nchunks), silu),
        )
    elif x.size:
        _runtime.launch(
            _runtime.function(FAMILY, f"conv_bwd_dpre<{t}, {wa}>"), grid, (128,),
            (xs, g, np.int32(g_f32), w, ptr(b), ptr(seq), ptr(init), np.int32(init_f32), dpre, part,
             np.int32(n_chan), np.int64(length), np.int32(width), np.int64(nchunks), silu, np.int32(vec)),
        )
        _runtime.launch(
            _runtime.function(FAMILY, f"conv_bwd_dx<{t}, {wa}>"), grid, (128,),
            (dpre, w, ptr(seq), ptr(dfinal), np.int32(dfinal_f32), dx, ptr(dinit if width > 1 else None),
             np.int32(init_f32), np.int32(n_chan), np.int64(length), np.int32(width), np.int64(nchunks), np.int32(vec)),
        )
    else:
        part.fill(0)
        if dinit is not None:
            dinit.fill(0)
    dweight, dbias = _param_grads(part, weight, bias)
    if channel_last:
        dx_store = cupy.empty((n_batch, length, n_chan), x.dtype)
        dx_store[...] = dx.transpose(0, 2, 1)
        dx = dx_store.transpose(0, 2, 1)
    if dinit is not None and dinit.dtype != initial_states.dtype:
        dinit = dinit.astype(initial_states.dtype)
    return dx, dweight, dbias, dinit


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    _arrays.check_kernel_dtypes(x=x, conv_state=conv_state, weight=weight, bias=bias)
    tx = _arrays.kernel_type("x", x)
    ts = _arrays.kernel_type("conv_state", conv_state)
    x3 = x[:, :, None] if x.ndim == 2 else x
    if update_path == "v1":
        x3 = cupy.ascontiguousarray(x3)
    n_batch, n_chan, n_new = x3.shape
    width = weight.shape[1]
    out = cupy.empty(x3.shape, x.dtype)
    if x3.size:
        item = conv_state.itemsize
        strides = [np.int64(s // item) for s in conv_state.strides]
        x_strides = [np.int64(s // x3.itemsize) for s in x3.strides]
        kernel = _runtime.function(FAMILY, f"conv_update<{tx}, {ts}>")
        _runtime.launch(
            kernel, (cdiv(n_batch * n_chan, 128),), (128,),
            (x3, *x_strides, conv_state, *strides, _param(weight), ptr(_param(bias)), ptr(_int32(cache_seqlens)),
             ptr(_indices32(conv_state_indices, conv_state.shape[0])), out, np.int32(n_batch), np.int32(n_chan),
             np.int32(n_new), np.int32(width), np.int32(conv_state.shape[2]), np.int32(activation is not None),
             np.int32(conv_state.shape[0]), np.int32(update_path != "v1")),
        )
    return out.reshape(x.shape)
