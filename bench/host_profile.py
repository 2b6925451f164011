"""Python-level profile of eager CUDA calls at tiny shapes (GPU machine; data for the host-overhead work).

    python3 bench/host_profile.py [--number 300] [--top 25]

For each drop-in call (tiny tensors, so the GPU time is negligible): wall us per call, then cProfile's top
functions by own time (tottime, us per call) over `number` calls. Also the forward of a small Mamba and Mamba2
block (no_grad and with backward) — the prefill/training path.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def per_call_us(fn, number):
    for _ in range(5):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    _sync()
    return (time.perf_counter() - t0) / number * 1e6


def profile(name, fn, number, top):
    us = per_call_us(fn, number)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(number):
        fn()
    prof.disable()
    _sync()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append((tt / number * 1e6, ct / number * 1e6, nc / number, f"{file.rsplit('/', 2)[-2:]}:{line}:{func}"))
    rows.sort(key=lambda r: -r[0])
    print(f"\n== {name}: {us:.1f} us per call (wall, no profiler); top by own time (us/call own, cum, calls/call)")
    for tt, ct, nc, where in rows[:top]:
        print(f"  {tt:8.2f} {ct:8.2f} {nc:6.1f}  {where}")


def enqueue_and_wall(fn, reps=5):
    """(us to return from fn without waiting for the GPU, us until the GPU is done), medians."""
    for _ in range(2):
        fn()
    _sync()
    enq, wall = [], []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        _sync()
        t2 = time.perf_counter()
        enq.append(t1 - t0)
        wall.append(t2 - t0)
    return sorted(enq)[reps // 2] * 1e6, sorted(wall)[reps // 2] * 1e6


def prefill_blocks(dev, length, top):
    """Mamba-1 2.8B / Mamba-2 2.7B sized blocks (d_model 2560), bf16, one 1 x length forward under no_grad: time to
    enqueue vs wall (enqueue ~ wall: host-bound or a sync inside), ours vs the peer; then our cProfile."""
    bf = torch.bfloat16
    for kind, kw in (("Mamba", dict(d_state=16)), ("Mamba2", dict(d_state=128, headdim=64, chunk_size=256))):
        h = torch.randn(1, length, 2560, device=dev, dtype=bf)
        for who in ("ours", "peer"):
            try:
                if who == "ours":
                    import ssmcore.adapters.torch as adapter
                    cls = getattr(adapter, kind)
                else:
                    import importlib
                    cls = getattr(importlib.import_module("mamba_ssm.modules.mamba_simple" if kind == "Mamba"
                                                          else "mamba_ssm.modules.mamba2"), kind)
            except Exception as err:  # noqa: BLE001
                print(f"{kind} {who}: unavailable ({type(err).__name__})")
                continue
            torch.manual_seed(0)
            block = cls(d_model=2560, device=dev, dtype=bf, **kw)

            def call(block=block):
                with torch.no_grad():
                    return block(h)
            enq, wall = enqueue_and_wall(call)
            print(f"\n{kind}(d_model=2560) 1x{length} forward no_grad, {who}: enqueue {enq:8.0f} us, wall {wall:8.0f} us")
            if who == "ours":
                profile(f"{kind}(d_model=2560) 1x{length} forward no_grad (ours)", call, 10, top)
            del block
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=300)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prefill", type=int, default=2048, help="block prefill length (0: skip)")
    args = ap.parse_args()
    from ssmcore.adapters.torch import Mamba, Mamba2
    from ssmcore.adapters.torch import functional as F

    dev = torch.device(args.device)
    if args.prefill:
        prefill_blocks(dev, args.prefill, args.top)
    bf = torch.bfloat16
    D, N, L = 16, 8, 4
    u = torch.randn(1, D, L, device=dev, dtype=bf)
    delta = torch.rand(1, D, L, device=dev, dtype=bf)
    A = -torch.rand(D, N, device=dev)
    Bm = torch.randn(1, N, L, device=dev, dtype=bf)
    Cm = torch.randn(1, N, L, device=dev, dtype=bf)
    Dv = torch.randn(D, device=dev)
    db = torch.randn(D, device=dev)
    x = torch.randn(1, D, L, device=dev, dtype=bf)
    w = torch.randn(D, 4, device=dev, dtype=bf)
    H, P, G = 2, 8, 1
    xs = torch.randn(1, L, H, P, device=dev, dtype=bf)
    dts = torch.rand(1, L, H, device=dev, dtype=bf)
    As = -torch.rand(H, device=dev)
    Bs = torch.randn(1, L, G, N, device=dev, dtype=bf)
    Cs = torch.randn(1, L, G, N, device=dev, dtype=bf)
    xn = torch.randn(4, 64, device=dev, dtype=bf)
    wn = torch.randn(64, device=dev, dtype=bf)
    with torch.no_grad():
        profile("selective_scan_fn (no_grad)", lambda: F.selective_scan_fn(u, delta, A, Bm, Cm, Dv, None, db, True),
                args.number, args.top)
        profile("causal_conv1d_fn (no_grad)", lambda: F.causal_conv1d_fn(x, w, None, activation="silu"),
                args.number, args.top)
        profile("mamba_chunk_scan_combined (no_grad)",
                lambda: F.mamba_chunk_scan_combined(xs, dts, As, Bs, Cs, chunk_size=16), args.number, args.top)
        profile("rms_norm_fn (no_grad)", lambda: F.rms_norm_fn(xn, wn, None), args.number, args.top)
    ug = u.clone().requires_grad_(True)

    def scan_fb():
        F.selective_scan_fn(ug, delta, A, Bm, Cm, Dv, None, db, True).float().sum().backward()
    profile("selective_scan_fn forward+backward", scan_fb, args.number // 3, args.top)
    for cls, kw in ((Mamba, {}), (Mamba2, dict(headdim=16, d_state=16, chunk_size=16))):
        torch.manual_seed(0)
        block = cls(d_model=64, device=dev, dtype=bf, **kw)
        h = torch.randn(1, 32, 64, device=dev, dtype=bf)
        with torch.no_grad():
            profile(f"{cls.__name__}(d_model=64) forward 1x32 no_grad", lambda: block(h), args.number // 3, args.top)
        hg = h.clone().requires_grad_(True)
        profile(f"{cls.__name__}(d_model=64) forward+backward 1x32", lambda: block(hg).float().sum().backward(),
                args.number // 6, args.top)


if __name__ == "__main__":
    main()
