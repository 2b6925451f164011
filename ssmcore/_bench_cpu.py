"""``ssmcore bench-cpu``: the CPU selective scan against what transformers runs without kernels.

The peer is a PyTorch loop over L in the style of transformers' Mamba slow path:
discretise A and B*u for all steps at once, then one state update and one
contraction with C per step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def make_inputs(batch, dim, seqlen, dstate, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return dict(
        u=rng.standard_normal((batch, dim, seqlen)).astype(f32),
        delta=(rng.standard_normal((batch, dim, seqlen)) * 0.5).astype(f32),
        A=-np.exp(rng.standard_normal((dim, dstate)) * 0.5).astype(f32),
        B=rng.standard_normal((batch, dstate, seqlen)).astype(f32),
        C=rng.standard_normal((batch, dstate, seqlen)).astype(f32),
        D=rng.standard_normal(dim).astype(f32),
        z=rng.standard_normal((batch, dim, seqlen)).astype(f32),
        delta_bias=(rng.standard_normal(dim) * 0.1).astype(f32),
    )


def torch_loop_scan(u, delta, A, B, C, D, z, delta_bias):
    import torch

    dt = torch.nn.functional.softplus(delta + delta_bias[:, None])  # (B, D, L)
    dA = torch.exp(A[None, :, None, :] * dt[..., None])  # (B, D, L, N)
    dBu = dt[..., None] * B[:, None].transpose(-1, -2) * u[..., None]  # (B, D, L, N)
    state = torch.zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = dA[:, :, t] * state + dBu[:, :, t]
        ys.append(torch.matmul(state, C[:, :, t, None])[..., 0])
    y = torch.stack(ys, dim=-1) + u * D[:, None]
    return y * torch.nn.functional.silu(z)


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


_FIRST_CALL = """
import time, numpy as np
start = time.perf_counter()
import ssmcore
from ssmcore._bench_cpu import make_inputs
x = make_inputs(1, 8, 16, 4)
ssmcore.selective_scan(**x, delta_softplus=True)
print(time.perf_counter() - start)
"""


def cache_latency():
    """Seconds of import + first selective_scan call in a new process: cold cache, then warm."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in range(2):
            out = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True)
            runs.append(float(out.stdout.strip().splitlines()[-1]))
    return runs


def main(args) -> int:
    import ssmcore

    x = make_inputs(args.batch, args.dim, args.seqlen, args.dstate)
    shape = f"B={args.batch} D={args.dim} L={args.seqlen} N={args.dstate} float32, z/D/delta_bias/softplus"
    ssmcore.selective_scan(**x, delta_softplus=True)  # compile / load from cache
    ours = _median_time(lambda: ssmcore.selective_scan(**x, delta_softplus=True), args.repeats)
    print(f"selective_scan fwd {shape}")
    print(f"  ssmcore (numba, {os.cpu_count()} cores): {ours * 1e3:9.1f} ms")
    if not args.no_torch:
        try:
            import torch
        except ImportError:
            print("  torch loop: skipped (torch is not installed)")
        else:
            tx = {k: torch.from_numpy(v) for k, v in x.items()}
            with torch.no_grad():
                peer = _median_time(lambda: torch_loop_scan(**tx), max(1, min(args.repeats, 3)))
                ref = torch_loop_scan(**tx).numpy()
            got = ssmcore.selective_scan(**x, delta_softplus=True)
            err = float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))
            print(f"  torch loop over L (torch {torch.__version__}, {torch.get_num_threads()} threads): {peer * 1e3:9.1f} ms")
            print(f"  speed-up: {peer / ours:.1f}x   (max |diff| / max |ref| = {err:.2e})")
    if not args.no_cache_test:
        cold, warm = cache_latency()
        print(f"new process, import + first call: {cold:.2f} s with an empty kernel cache, {warm:.2f} s with it cached")
    return 0
