"""Decode-step kernels on the GPU: selective_state_update and causal_conv1d_update, ours (each kernel
variant) against the peer, at the decode shapes of the Mamba-1 2.8B and Mamba-2 2.7B configs.

    python3 bench/gpu_decode_kernels.py [--quick] [--reps 20]

Inputs are laid out as the models' step() passes them: x / z / B / C / dt are slices of the in_proj
(or x_proj) output row, Mamba-2's per-head dt, A, D and dt_bias are stride-0 views, bf16
activations, float32 parameters, bf16 or float32 state. The state is rotated over enough copies
that the calls do not find it in L2 (up to 24 copies; at batch 1 it still fits).

Two numbers per row, both pure GPU time: ``kernel`` = the kernels' summed time per call from
torch.profiler (what bench/profile_decode.py reports), ``graph`` = per call of a CUDA graph
replaying `reps` calls back to back (CUDA events; includes the gaps between launches). ``floor``
= state read + written once (plus x/out) at 4.8 TB/s. Variants of ours: state_update ``v1`` (the
first kernel) and ``v2`` (tiles, all loads in flight; the default), ``v2 R<n>`` forcing its rows
per thread; conv_update ``v1`` (copy of the strided x + the general loop) and ``v2`` (strided x,
register window). The peer: mamba_ssm.ops.triton.selective_state_update and
causal_conv1d.causal_conv1d_update. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import math
import sys
import types
from collections import defaultdict
from pathlib import Path

import cupy
import torch
from torch.profiler import ProfilerActivity, profile

import ssmcore
from ssmcore.backends.cupy import conv as cupy_conv
from ssmcore.backends.cupy import state_update as cupy_ssu

ROOT = Path(__file__).resolve().parents[1]
HBM = 4.8e12
ROWS = []


# --- the peer -------------------------------------------------------------------------------------


def _peer_ssu():
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        return selective_state_update
    except Exception as err:  # noqa: BLE001 - compiled parts of mamba_ssm missing: load the Triton file alone
        first = err
    for key in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
        del sys.modules[key]
    trees = sorted(glob.glob(str(ROOT / ".peers" / "mamba_ssm-*" / "mamba_ssm")))
    if trees:
        stub = types.ModuleType("mamba_ssm")
        stub.__path__ = [trees[-1]]
        sys.modules["mamba_ssm"] = stub
        try:
            return importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update
        except Exception as err:  # noqa: BLE001
            first = err
    print(f"peer selective_state_update: not available ({type(first).__name__}: {first})")
    return None


def _peer_conv_update():
    try:
        from causal_conv1d import causal_conv1d_update

        return causal_conv1d_update
    except Exception as err:  # noqa: BLE001
        print(f"peer causal_conv1d_update: not available ({type(err).__name__}: {err})")
        return None


# --- timing ---------------------------------------------------------------------------------------


def _on_torch_stream(fn):
    """fn run with CuPy launching on torch's current stream (so a torch graph capture records it)."""
    def run():
        with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
            fn()
    return run


def kernel_us(fns, calls=60):
    """Summed GPU kernel time per call (torch.profiler), cycling through fns (one per state copy)."""
    for f in fns[:3]:
        f()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            fns[i % len(fns)]()
        torch.cuda.synchronize()
    total = 0.0
    names = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            total += t
            names[ev.key[:48]] += t / calls
    return total / calls, dict(names)


def graph_us(fns, reps, trials=10):
    """Per-call time of a CUDA graph holding `reps` back-to-back calls (cycling through fns)."""
    # Warm-up and capture on one side stream: CuPy's memory pool keeps its free blocks per stream, so the
    # allocations during the capture (out, v1's copy) reuse the warm-up's blocks instead of calling cudaMalloc.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:2]:
            f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def report(name, variant, nbytes, fns, reps):
    try:
        k_us, kernels = kernel_us(fns)
    except Exception as err:  # noqa: BLE001 - one failure must not hide the other rows
        print(f"  {name} {variant}: failed: {type(err).__name__}: {err}")
        return
    try:
        g_us = graph_us(fns, reps)
    except Exception as err:  # noqa: BLE001
        print(f"  ({name} {variant}: graph capture failed: {type(err).__name__}: {err})")
        g_us = math.nan
    floor = nbytes / HBM * 1e6
    ROWS.append({"shape": name, "variant": variant, "kernel_us": round(k_us, 2), "graph_us": round(g_us, 2),
                 "floor_us": round(floor, 2), "kernels": {k: round(v, 2) for k, v in kernels.items()}})
    print(f"{name:46s} {variant:10s} kernel {k_us:8.2f} us  graph {g_us:8.2f} us  floor {floor:7.2f} us "
          f"({floor / k_us:4.0%})  [{', '.join(k for k in kernels)[:60]}]", flush=True)


def _copies(state_bytes, quick):
    return 1 if quick else max(1, min(24, math.ceil(200e6 / state_bytes)))


# --- state update ---------------------------------------------------------------------------------


def bench_ssu_mamba2(batch, state_dtype, peer, reps, quick, heads=80, hdim=64, n_state=128, label="mamba2-2.7b"):
    dev, bf = "cuda", torch.bfloat16
    d_ssm = heads * hdim
    width = 2 * d_ssm + 2 * n_state + heads  # zxbcdt row (ngroups 1), as Mamba2.step splits it
    proj = torch.randn(batch, width, device=dev, dtype=bf)
    proj[:, -heads:] = proj[:, -heads:].abs() * 0.1 - 2.0  # dt before softplus
    A_h = -torch.rand(heads, device=dev) * 4 - 0.5
    D_h, bias_h = torch.randn(heads, device=dev), torch.randn(heads, device=dev) * 0.3
    state_bytes = batch * heads * hdim * n_state * (2 if state_dtype == torch.bfloat16 else 4)
    states = [torch.randn(batch, heads, hdim, n_state, device=dev).to(state_dtype)
              for _ in range(_copies(state_bytes, quick))]
    shape = (batch, heads, hdim)

    def torch_args(st):
        x = proj[:, d_ssm:2 * d_ssm].reshape(shape)
        B = proj[:, 2 * d_ssm:2 * d_ssm + n_state].reshape(batch, 1, n_state)
        C = proj[:, 2 * d_ssm + n_state:2 * d_ssm + 2 * n_state].reshape(batch, 1, n_state)
        dt = proj[:, -heads:][:, :, None].expand(shape)
        return (st, x, dt, A_h[:, None, None].expand(heads, hdim, n_state), B, C,
                D_h[:, None].expand(heads, hdim), None, bias_h[:, None].expand(heads, hdim))

    cproj, cA, cD, cbias = (cupy.from_dlpack(t) for t in (proj, A_h, D_h, bias_h))
    cstates = [cupy.from_dlpack(s) for s in states]

    def cupy_args(st):
        x = cproj[:, d_ssm:2 * d_ssm].reshape(shape)
        B = cproj[:, 2 * d_ssm:2 * d_ssm + n_state].reshape(batch, 1, n_state)
        C = cproj[:, 2 * d_ssm + n_state:2 * d_ssm + 2 * n_state].reshape(batch, 1, n_state)
        dt = cupy.broadcast_to(cproj[:, -heads:][:, :, None], shape)
        return (st, x, dt, cupy.broadcast_to(cA[:, None, None], (heads, hdim, n_state)), B, C,
                cupy.broadcast_to(cD[:, None], (heads, hdim)), None, cupy.broadcast_to(cbias[:, None], (heads, hdim)))

    name = f"ssu {label} B{batch} H{heads} P{hdim} N{n_state} {str(state_dtype)[6:]} state"
    nbytes = 2 * state_bytes + 2 * 2 * batch * d_ssm
    _ours_variants(name, nbytes, [cupy_args(s) for s in cstates], reps, state_dtype == torch.bfloat16)
    if peer is not None:
        targs = [torch_args(s) for s in states]
        report(name, "peer", nbytes,
               [lambda a=a: peer(*a[:7], z=a[7], dt_bias=a[8], dt_softplus=True) for a in targs], reps)


def bench_ssu_mamba1(batch, state_dtype, peer, reps, quick, d_inner=5120, n_state=16, dt_rank=160):
    dev, bf = "cuda", torch.bfloat16
    xz = torch.randn(batch, 2 * d_inner, device=dev, dtype=bf)
    x_dbl = torch.randn(batch, dt_rank + 2 * n_state, device=dev, dtype=bf)
    dt = (torch.rand(batch, d_inner, device=dev) * 0.5 - 3).to(bf)  # F.linear output: contiguous
    A = -torch.rand(d_inner, n_state, device=dev) * 4 - 0.5
    D, bias = torch.randn(d_inner, device=dev), torch.randn(d_inner, device=dev) * 0.3
    state_bytes = batch * d_inner * n_state * (2 if state_dtype == torch.bfloat16 else 4)
    states = [torch.randn(batch, d_inner, n_state, device=dev).to(state_dtype)
              for _ in range(_copies(state_bytes, quick))]

    def args(st, xz, x_dbl, dt, A, D, bias):
        return (st, xz[:, :d_inner], dt, A, x_dbl[:, dt_rank:dt_rank + n_state], x_dbl[:, dt_rank + n_state:], D,
                xz[:, d_inner:], bias)

    name = f"ssu mamba-2.8b B{batch} D{d_inner} N{n_state} {str(state_dtype)[6:]} state"
    nbytes = 2 * state_bytes + 4 * 2 * batch * d_inner
    cvals = [cupy.from_dlpack(t) for t in (xz, x_dbl, dt, A, D, bias)]
    _ours_variants(name, nbytes, [args(cupy.from_dlpack(s), *cvals) for s in states], reps,
                   state_dtype == torch.bfloat16, a_scalar=False)
    if peer is not None:
        targs = [args(s, xz, x_dbl, dt, A, D, bias) for s in states]
        report(name, "peer", nbytes,
               [lambda a=a: peer(*a[:7], z=a[7], dt_bias=a[8], dt_softplus=True) for a in targs], reps)


def _ours_variants(name, nbytes, arg_sets, reps, state16, a_scalar=True):
    saved = cupy_ssu.impl, cupy_ssu.rows_override
    max_rows = cupy_ssu._max_rows(state16, True, a_scalar)
    variants = [("v1", "v1", 0), ("v2", "v2", 0)] + [
        (f"v2 R{r}", "v2", r) for r in (1, 2, 4) if r <= max_rows]
    try:
        for label, impl, rows in variants:
            def call(a, impl=impl, rows=rows):
                cupy_ssu.impl, cupy_ssu.rows_override = impl, rows
                ssmcore.selective_state_update(*a[:7], z=a[7], dt_bias=a[8], dt_softplus=True)
            report(name, label, nbytes, [_on_torch_stream(lambda a=a, c=call: c(a)) for a in arg_sets], reps)
    finally:
        cupy_ssu.impl, cupy_ssu.rows_override = saved


# --- conv update ----------------------------------------------------------------------------------


def bench_conv_update(batch, label, channels, row_width, offset, peer, reps, quick, width=4):
    dev, bf = "cuda", torch.bfloat16
    proj = torch.randn(batch, row_width, device=dev, dtype=bf)
    weight, bias = torch.randn(channels, width, device=dev), torch.randn(channels, device=dev)
    state_bytes = batch * channels * width * 2
    states = [torch.randn(batch, channels, width, device=dev).to(bf) for _ in range(_copies(state_bytes, quick))]
    name = f"conv_update {label} B{batch} D{channels} W{width}"
    nbytes = 2 * state_bytes + 2 * 2 * batch * channels
    cproj, cw, cb = (cupy.from_dlpack(t) for t in (proj, weight, bias))
    saved = cupy_conv.update_path
    try:
        for path in ("v1", "v2"):
            def call(st, path=path):
                cupy_conv.update_path = path
                ssmcore.causal_conv1d_update(cproj[:, offset:offset + channels], st, cw, cb, "silu")
            report(name, path, nbytes, [_on_torch_stream(lambda s=cupy.from_dlpack(s), c=call: c(s)) for s in states],
                   reps)
    finally:
        cupy_conv.update_path = saved
    if peer is not None:
        report(name, "peer", nbytes,
               [lambda s=s: peer(proj[:, offset:offset + channels], s, weight, bias, "silu") for s in states], reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one state copy, batch 64 only")
    parser.add_argument("--reps", type=int, default=20)
    opts = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}; state_update impl default {cupy_ssu.impl}, "
          f"conv update_path default {cupy_conv.update_path}")
    peer, peer_conv = _peer_ssu(), _peer_conv_update()
    batches = (64,) if opts.quick else (64, 1)
    with torch.no_grad():
        for batch in batches:
            for sd in (torch.bfloat16, torch.float32):
                bench_ssu_mamba2(batch, sd, peer, opts.reps, opts.quick)
                bench_ssu_mamba1(batch, sd, peer, opts.reps, opts.quick)
        if not opts.quick:  # the PERFORMANCE.md table's shape
            bench_ssu_mamba2(64, torch.float32, peer, opts.reps, opts.quick, heads=64, label="table")
        for batch in batches:
            # Mamba-1: x = first half of the xz row; Mamba-2: xBC after z in the zxbcdt row (ngroups 1).
            bench_conv_update(batch, "mamba-2.8b", 5120, 2 * 5120, 0, peer_conv, opts.reps, opts.quick)
            bench_conv_update(batch, "mamba2-2.7b", 5120 + 256, 2 * 5120 + 256 + 80, 5120, peer_conv, opts.reps,
                              opts.quick)
    print("JSON " + json.dumps({"bench": "gpu_decode_kernels", "rows": ROWS}))


if __name__ == "__main__":
    main()
