"""GPU timings of the conv, decode-step and norm kernels at the PERFORMANCE.md shapes.

    python3 bench/gpu_mamba1_misc.py [--quick]

For each op: the median time of ``triton.testing.do_bench`` (each call timed alone, L2 cleared
between calls, host overhead included where the GPU waits for it) and the median time of a CUDA
graph replaying the op 20 times (pure GPU time), the bytes the op must move, the fraction of the
copy-bandwidth floor (4.27 TB/s, measured on the H200) that the graph time reaches, and the
peer's do_bench time and the ratio peer / ours when the peer imports. The peer is causal-conv1d
(``import causal_conv1d``) and mamba-ssm; when ``import mamba_ssm`` fails for want of its
compiled extensions, its Triton kernels (state update, norms) are loaded from the unpacked
source tree in .peers/ without running the package's __init__.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import math
import statistics
import sys
import types
from pathlib import Path

import cupy
import ml_dtypes
import numpy as np
import torch
import triton.testing

import ssmcore

BANDWIDTH = 4.27e12  # bytes/s, device-to-device copy (read + write) on the H200
ROOT = Path(__file__).resolve().parents[1]
BF16 = ml_dtypes.bfloat16


# --- the peer -------------------------------------------------------------------------------------


def _peer_conv():
    try:
        import causal_conv1d

        return causal_conv1d
    except Exception as err:  # not installed or its extension is not built
        print(f"peer causal_conv1d: not available ({type(err).__name__}: {err})")
        return None


def _peer_triton(module: str):
    """A mamba_ssm Triton module, from the installed package or from the source tree in .peers/."""
    try:
        return importlib.import_module(f"mamba_ssm.{module}")
    except Exception as err:
        first_error = err
    for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        del sys.modules[key]  # a half-imported package from the failed attempt
    trees = sorted(glob.glob(str(ROOT / ".peers" / "mamba_ssm-*" / "mamba_ssm")))
    if not trees:
        print(f"peer mamba_ssm.{module}: not available ({type(first_error).__name__}: {first_error})")
        return None
    stub = types.ModuleType("mamba_ssm")
    stub.__path__ = [trees[-1]]  # subpackages import without the package __init__ (compiled imports)
    sys.modules["mamba_ssm"] = stub
    try:
        return importlib.import_module(f"mamba_ssm.{module}")
    except Exception as err:
        print(f"peer mamba_ssm.{module}: not available ({type(err).__name__}: {err})")
        return None


# --- timing ---------------------------------------------------------------------------------------


def do_bench_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph_us(fn, reps: int = 20, trials: int = 15) -> float:
    """Median GPU time of fn from a CUDA graph holding `reps` back-to-back calls."""
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        fn()
        stream.synchronize()
        stream.begin_capture()
        for _ in range(reps):
            fn()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        times = []
        for _ in range(trials):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3 / reps)
    return statistics.median(times)


ROWS = []


def report(name: str, nbytes: float, ours, peer=None):
    """Time ours (and the peer) and print one line."""
    ours_bench = do_bench_us(ours)
    try:
        ours_graph = graph_us(ours)
    except Exception as err:  # a capture failure must not hide the other numbers
        print(f"  ({name}: graph capture failed: {type(err).__name__}: {err})")
        ours_graph = math.nan
    floor = nbytes / BANDWIDTH * 1e6
    peer_us = do_bench_us(peer) if peer is not None else math.nan
    ratio = peer_us / ours_bench if peer is not None else math.nan
    ROWS.append((name, ours_bench, ours_graph, nbytes, floor, peer_us, ratio))
    line = (f"{name:44s} ours {ours_bench:8.1f} us (graph {ours_graph:8.1f} us)  {nbytes / 1e6:8.1f} MB  "
            f"floor {floor:7.1f} us = {floor / ours_graph:5.0%} of it")
    if peer is not None:
        line += f"  peer {peer_us:8.1f} us  peer/ours {ratio:5.2f}x"
    print(line, flush=True)


def randn(shape, dtype=np.float32, scale=1.0):
    """A CuPy array of standard normal data in dtype (never zeros)."""
    a = cupy.random.standard_normal(shape, dtype=cupy.float32) * scale
    return a.astype(dtype)


def torch_view(a):
    return None if a is None else torch.from_dlpack(a)


# --- the benchmarks -------------------------------------------------------------------------------


def bench_conv(quick: bool):
    peer = _peer_conv()
    batch, channels, length, width = (8, 4096, 2048, 4) if not quick else (2, 1024, 2048, 4)
    x = randn((batch, channels, length), BF16)
    weight, bias = randn((channels, width)), randn(channels)
    io = 2 * x.size * 2
    tx, tw, tb = torch_view(x), torch_view(weight), torch_view(bias)
    report(f"causal_conv1d fwd silu B{batch} D{channels} L{length} W{width}", io,
           lambda: ssmcore.causal_conv1d(x, weight, bias, "silu"),
           (lambda: peer.causal_conv1d_fn(tx, tw, tb, activation="silu")) if peer else None)
    conv_backend = importlib.import_module("ssmcore.backends.cupy.conv")
    default_fwd = (conv_backend.fwd_path, conv_backend.fwd_words, conv_backend.fwd_positions)
    # Every forward kernel of the common case, the default's row above: conv_fwd_ws with 2 / 4
    # / 8 words per thread (session 4 / 6), conv_fwd_vec with 8 / 16 positions per thread (before).
    for variant in (("ws", 2, 8), ("ws", 4, 8), ("ws", 8, 8), ("vec", 4, 8), ("vec", 4, 16)):
        if variant != default_fwd and not (variant[0] == default_fwd[0] == "vec" and variant[2] == default_fwd[2]):
            conv_backend.fwd_path, conv_backend.fwd_words, conv_backend.fwd_positions = variant
            label = (f"fwd_path ws, {variant[1]} words" if variant[0] == "ws"
                     else f"fwd_path vec, {variant[2]} positions")
            report(f"  variant: {label}", io, lambda: ssmcore.causal_conv1d(x, weight, bias, "silu"))
    conv_backend.fwd_path, conv_backend.fwd_words, conv_backend.fwd_positions = default_fwd
    # Session 7: conv_fwd_ws with evict-first loads / stores (SSMCORE_CONV_FWD_HINT=1), 8 and 4 words; the peer again.
    for words in (0, 4):
        with _knobs(conv_backend, fwd_hint=True, fwd_words=words):
            report(f"  variant: fwd_path ws, hint 1, {'default' if not words else words} words", io,
                   lambda: ssmcore.causal_conv1d(x, weight, bias, "silu"),
                   (lambda: peer.causal_conv1d_fn(tx, tw, tb, activation="silu")) if peer and not words else None)
    xl = randn((batch, length, channels), BF16).transpose(0, 2, 1)
    txl = torch_view(xl)
    report("  same, channel-last x", io, lambda: ssmcore.causal_conv1d(xl, weight, bias, "silu"),
           (lambda: peer.causal_conv1d_fn(txl, tw, tb, activation="silu")) if peer else None)
    dout = randn(x.shape, BF16)
    tdout = torch_view(dout)
    peer_bwd = None
    if peer is not None:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function

        peer_bwd = lambda: causal_conv1d_bwd_function(tx, tw, tb, tdout, None, None, None, None, False, True)
    # Floor: x and dout read, dx written once (the fused path; "split" also writes and rereads a
    # float32 dpre: + 8 bytes per element).
    report("causal_conv1d bwd silu (same shape)", 3 * x.size * 2,
           lambda: ssmcore.causal_conv1d_bwd(dout, x, weight, bias, "silu"), peer_bwd)
    default_bwd, default_cl = (conv_backend.bwd_path, conv_backend.bwd_words), conv_backend.cl_path
    for variant in (("ws", 2), ("ws", 4), ("fused", 4), ("split", 4)):
        if variant != default_bwd and not (variant[0] == default_bwd[0] != "ws"):
            conv_backend.bwd_path, conv_backend.bwd_words = variant
            label = f"bwd_path ws, {variant[1]} words" if variant[0] == "ws" else f"bwd_path {variant[0]}"
            report(f"  variant: {label}", 3 * x.size * 2,
                   lambda: ssmcore.causal_conv1d_bwd(dout, x, weight, bias, "silu"))
    conv_backend.bwd_path, conv_backend.bwd_words = default_bwd
    doutl = randn((batch, length, channels), BF16).transpose(0, 2, 1)
    peer_bwd_cl = None
    if peer is not None:
        tdoutl = torch_view(doutl)
        peer_bwd_cl = lambda: causal_conv1d_bwd_function(txl, tw, tb, tdoutl, None, None, None, None, False, True)
        try:
            peer_bwd_cl()
        except Exception as err:  # noqa: BLE001 - the peer may not take this layout
            print(f"peer channel-last bwd: {type(err).__name__}: {err}")
            peer_bwd_cl = None
    report("  bwd, channel-last x and dout", 3 * x.size * 2,
           lambda: ssmcore.causal_conv1d_bwd(doutl, xl, weight, bias, "silu"), peer_bwd_cl)
    default_cl_bwd = conv_backend.cl_bwd
    for kernel in ("walk", "tile"):  # conv_bwd_cl_walk (session 4) / conv_bwd_cl_tile (session 3)
        if kernel != default_cl_bwd:
            conv_backend.cl_bwd = kernel
            report(f"  variant: cl_bwd {kernel}", 3 * x.size * 2,
                   lambda: ssmcore.causal_conv1d_bwd(doutl, xl, weight, bias, "silu"))
    conv_backend.cl_bwd = default_cl_bwd
    for path in ("tile", "old"):
        if path != default_cl:
            conv_backend.cl_path = path
            report(f"  variant: cl_path {path}, fwd", io, lambda: ssmcore.causal_conv1d(xl, weight, bias, "silu"))
            report(f"  variant: cl_path {path}, bwd", 3 * x.size * 2,
                   lambda: ssmcore.causal_conv1d_bwd(doutl, xl, weight, bias, "silu"))
    conv_backend.cl_path = default_cl
    n_dec, dec_channels = 64, 8192
    xd, state = randn((n_dec, dec_channels), BF16), randn((n_dec, dec_channels, width - 1), BF16)
    wd = randn((dec_channels, width))
    txd, tstate, twd = torch_view(xd), torch_view(state), torch_view(wd)
    report(f"causal_conv1d_update B{n_dec} D{dec_channels} W{width}", xd.size * 2 * 2 + state.size * 2 * 2,
           lambda: ssmcore.causal_conv1d_update(xd, state, wd, None, "silu"),
           (lambda: peer.causal_conv1d_update(txd, tstate, twd, None, "silu")) if peer else None)


def bench_state_update(quick: bool):
    peer = _peer_triton("ops.triton.selective_state_update")
    batch, heads, head_dim, n_state = (64, 64, 64, 128) if not quick else (16, 64, 64, 128)
    state = randn((batch, heads, head_dim, n_state), np.float32)
    x = randn((batch, heads, head_dim), BF16)
    dt = cupy.broadcast_to(randn((batch, heads, 1), BF16), (batch, heads, head_dim))  # Mamba-2: per head
    A = cupy.broadcast_to(-cupy.exp(randn((heads, 1, 1))), (heads, head_dim, n_state))
    B, C = randn((batch, 1, n_state), BF16), randn((batch, 1, n_state), BF16)
    D = cupy.broadcast_to(randn((heads, 1)), (heads, head_dim))
    dt_bias = cupy.broadcast_to(randn((heads, 1)), (heads, head_dim))
    nbytes = 2 * state.nbytes
    t = {n: torch_view(a) for n, a in dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, dt_bias=dt_bias).items()}
    step = lambda: ssmcore.selective_state_update(state, x, dt, A, B, C, D, None, dt_bias, True)  # noqa: E731
    peer_step = ((lambda: peer.selective_state_update(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"],
                                                      None, t["dt_bias"], True)) if peer else None)
    report(f"selective_state_update B{batch} H{heads} P{head_dim} N{n_state} f32 state", nbytes, step, peer_step)
    # Rows per thread of state_update_v2 (SSMCORE_STATE_UPDATE_ROWS; automatic = 2 here; 4 is session 7's
    # float32-state variant) and the v1 kernel; the peer timed again next to "rows 4" and "v3".
    su_backend = importlib.import_module("ssmcore.backends.cupy.state_update")
    # v3 = state_update_v3 (session 7: persistent grid, the next tile's loads before this tile's shuffles).
    variants = (("rows 1", dict(rows_override=1)), ("rows 4", dict(rows_override=4)), ("v1 kernel", dict(impl="v1")),
                ("v3", dict(impl="v3")), ("v3, rows 1", dict(impl="v3", rows_override=1)),
                ("v3, rows 4", dict(impl="v3", rows_override=4)))
    for label, knobs in variants:
        with _knobs(su_backend, **knobs):
            report(f"  variant: {label}", nbytes, step, peer_step if label in ("rows 4", "v3") else None)
    state16 = randn((batch, heads, head_dim, n_state), BF16)
    t16 = torch_view(state16)
    report("  same, bf16 state", 2 * state16.nbytes,
           lambda: ssmcore.selective_state_update(state16, x, dt, A, B, C, D, None, dt_bias, True),
           (lambda: peer.selective_state_update(t16, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"],
                                                None, t["dt_bias"], True)) if peer else None)
    with _knobs(su_backend, impl="v3"):
        report("  variant: v3, bf16 state", 2 * state16.nbytes,
               lambda: ssmcore.selective_state_update(state16, x, dt, A, B, C, D, None, dt_bias, True))
    channels = 5120  # Mamba-1 2.8B: d_inner 5120, d_state 16
    s1 = randn((batch, channels, 16), np.float32)
    x1, dt1, z1 = (randn((batch, channels), BF16) for _ in range(3))
    A1, B1, C1, D1 = -cupy.exp(randn((channels, 16))), randn((batch, 16), BF16), randn((batch, 16), BF16), randn(channels)
    report(f"selective_state_update B{batch} D{channels} N16 (Mamba-1)", 2 * s1.nbytes,
           lambda: ssmcore.selective_state_update(s1, x1, dt1, A1, B1, C1, D1, z1, D1, True))


def bench_norms(quick: bool):
    ln = _peer_triton("ops.triton.layer_norm")
    gated = _peer_triton("ops.triton.layernorm_gated")
    rows, width = (16384, 2560) if not quick else (4096, 2560)
    x, residual = randn((rows, width), BF16), randn((rows, width), np.float32)
    weight = randn(width)
    tx, tres, tw = torch_view(x), torch_view(residual), torch_view(weight)
    fused_bytes = x.size * (2 + 4 + 2 + 4)
    fused = lambda: ssmcore.rms_norm(x, weight, None, residual, 1e-5, True, True)  # noqa: E731
    peer_fused = ((lambda: ln.rms_norm_fn(tx, tw, None, residual=tres, prenorm=True, residual_in_fp32=True,
                                          eps=1e-5)) if ln else None)
    norm_backend = importlib.import_module("ssmcore.backends.cupy.norm")
    report(f"rms_norm + residual, f32 residual out {rows}x{width}", fused_bytes, fused, peer_fused)
    new_row = ROWS[-1]
    # The old forward (norm_fwd, SSMCORE_NORM_FWD=v1) next to the default (norm_fwd2), the peer timed again.
    with _knobs(norm_backend, fwd_impl="v1"):
        report("  variant: v1 (norm_fwd, before session 7)", fused_bytes, fused, peer_fused)
        old_row = ROWS[-1]
        default_threads = norm_backend._MAX_ROW_THREADS
        norm_backend._MAX_ROW_THREADS = 256  # 2560 channels: 2 chunks x 160 threads instead of 1 x 320
        report("  variant: v1, 2 register chunks per thread", fused_bytes, fused)
        norm_backend._MAX_ROW_THREADS = default_threads
    # norm_fwd2's knobs (SSMCORE_NORM_FWD2_NV / _GRID / _HINT); the default is nv 1, persistent, hint 1.
    for knobs in (dict(fwd2_nv="2"), dict(fwd2_grid="full"), dict(fwd2_hint=False),
                  dict(fwd2_nv="2", fwd2_grid="full"), dict(fwd2_nv="2", fwd2_hint=False)):
        with _knobs(norm_backend, fwd_impl="v2", **knobs):
            label = ", ".join(f"{k.removeprefix('fwd2_')} {v}" for k, v in knobs.items())
            report(f"  variant: v2, {label}", fused_bytes, fused)
    print(f"  fused add fwd, do_bench us: ours-old (v1) {old_row[1]:.1f} | ours-new (default) {new_row[1]:.1f} | "
          f"peer {new_row[5]:.1f} / {old_row[5]:.1f} (timed twice) | best variant "
          f"{min(r[1] for r in ROWS if r[0].startswith('  variant: v2')):.1f}", flush=True)
    res16 = randn((rows, width), BF16)
    tres16 = torch_view(res16)
    report("  same, bf16 residual in/out", x.size * 2 * 4,
           lambda: ssmcore.rms_norm(x, weight, None, res16, 1e-5, True, False),
           (lambda: ln.rms_norm_fn(tx, tw, None, residual=tres16, prenorm=True, eps=1e-5)) if ln else None)
    report("  first layer: no residual in, f32 residual out", x.size * (2 + 2 + 4),
           lambda: ssmcore.rms_norm(x, weight, None, None, 1e-5, True, True),
           (lambda: ln.rms_norm_fn(tx, tw, None, residual=None, prenorm=True, residual_in_fp32=True, eps=1e-5))
           if ln else None)
    report(f"layer_norm + residual + bias {rows}x{width}", x.size * (2 + 4 + 2 + 4),
           lambda: ssmcore.layer_norm(x, weight, weight, residual, 1e-5, True, True),
           (lambda: ln.layer_norm_fn(tx, tw, tw, residual=tres, prenorm=True, residual_in_fp32=True, eps=1e-5))
           if ln else None)
    dy, dres = randn((rows, width), BF16), randn((rows, width), np.float32)
    report("rms_norm_bwd (+ dresidual_out, f32 residual)", x.size * (2 + 2 + 4 + 4 + 2 + 4),
           lambda: ssmcore.rms_norm_bwd(dy, x, weight, None, residual, 1e-5, dres))
    d_inner = 5120  # Mamba-2 2.7B: d_inner 5120, one group
    xg, zg = randn((rows, d_inner), BF16), randn((rows, d_inner), BF16)
    wg = randn(d_inner)
    txg, tzg, twg = torch_view(xg), torch_view(zg), torch_view(wg)
    report(f"gated_rms_norm {rows}x{d_inner} (norm before gate)", xg.size * 2 * 3,
           lambda: ssmcore.gated_rms_norm(xg, wg, zg, 1e-5, None, True),
           (lambda: gated.rmsnorm_fn(txg, twg, None, z=tzg, eps=1e-5, norm_before_gate=True)) if gated else None)
    dyg = randn((rows, d_inner), BF16)
    report("gated_rms_norm_bwd", xg.size * 2 * 5, lambda: ssmcore.gated_rms_norm_bwd(dyg, xg, wg, zg))
    # v1 (SSMCORE_GATED_NORM=v1) next to the default in the same process.
    with _gated_impl(norm_backend, "v1"):
        report("  variant: v1 kernels (gated_fwd)", xg.size * 2 * 3,
               lambda: ssmcore.gated_rms_norm(xg, wg, zg, 1e-5, None, True))
        report("  variant: v1 kernels (gated_bwd)", xg.size * 2 * 5,
               lambda: ssmcore.gated_rms_norm_bwd(dyg, xg, wg, zg))
    # The Mamba2 block's norm (bench/profile_block.py: B8 L2048 d_inner 2048, one group, norm after the gate);
    # the peer's backward is layernorm_gated._layer_norm_bwd with the rstd of its forward.
    d_inner = 2048
    xg, zg, dyg = randn((rows, d_inner), BF16), randn((rows, d_inner), BF16), randn((rows, d_inner), BF16)
    wg = randn(d_inner)
    txg, tzg, twg, tdyg = torch_view(xg), torch_view(zg), torch_view(wg), torch_view(dyg)
    report(f"gated_rms_norm {rows}x{d_inner} (gate first, Mamba2)", xg.size * 2 * 3,
           lambda: ssmcore.gated_rms_norm(xg, wg, zg, 1e-5, None, False),
           (lambda: gated.rmsnorm_fn(txg, twg, None, z=tzg, eps=1e-5, norm_before_gate=False)) if gated else None)
    peer_bwd = None
    if gated:
        _, _, trstd = gated._layer_norm_fwd(txg, twg, None, 1e-5, z=tzg, norm_before_gate=False, is_rms_norm=True)
        peer_bwd = lambda: gated._layer_norm_bwd(tdyg, txg, twg, None, 1e-5, None, trstd, z=tzg,  # noqa: E731
                                                 norm_before_gate=False, is_rms_norm=True)
    report(f"gated_rms_norm_bwd {rows}x{d_inner} (gate first)", xg.size * 2 * 5,
           lambda: ssmcore.gated_rms_norm_bwd(dyg, xg, wg, zg, 1e-5, None, False), peer_bwd)
    with _gated_impl(norm_backend, "v1"):
        report("  variant: v1 kernels (gated_fwd)", xg.size * 2 * 3,
               lambda: ssmcore.gated_rms_norm(xg, wg, zg, 1e-5, None, False))
        report("  variant: v1 kernels (gated_bwd)", xg.size * 2 * 5,
               lambda: ssmcore.gated_rms_norm_bwd(dyg, xg, wg, zg, 1e-5, None, False))


@contextlib.contextmanager
def _knobs(module, **attrs):
    """Set module attributes (a backend's knobs) for the duration."""
    old = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


@contextlib.contextmanager
def _gated_impl(norm_backend, impl: str):
    """norm_backend.gated_impl = impl for the duration (the SSMCORE_GATED_NORM knob's module attribute)."""
    old, norm_backend.gated_impl = norm_backend.gated_impl, impl
    try:
        yield
    finally:
        norm_backend.gated_impl = old


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke test)")
    parser.add_argument("--only", choices=["conv", "state_update", "norm"], action="append")
    args = parser.parse_args(argv)
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"{props['name'].decode()}  ssmcore {ssmcore.__version__}  cupy {cupy.__version__}  torch {torch.__version__}")
    for name, fn in (("conv", bench_conv), ("state_update", bench_state_update), ("norm", bench_norms)):
        if args.only and name not in args.only:
            continue
        try:
            fn(args.quick)
        except Exception as err:  # keep the other families' numbers
            print(f"{name}: FAILED {type(err).__name__}: {err}", flush=True)
    print("\nop | ours do_bench us | ours graph us | MB | floor us | floor/graph | peer us | peer/ours")
    for name, ob, og, nb, fl, pu, ra in ROWS:
        print(f"{name.strip()} | {ob:.1f} | {og:.1f} | {nb / 1e6:.1f} | {fl:.1f} | {fl / og:.0%} | {pu:.1f} | {ra:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
