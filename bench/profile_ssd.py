"""Where the SSD's GPU time goes, kernel by kernel, ours vs the peer's mamba_chunk_scan_combined (GPU machine).

    python3 bench/profile_ssd.py [--shape 8,4096,64,64,128] [--reps 5] [--top 30]

The shape and inputs of bench/gpu_ssd.py (bf16 x / B / C, fp32 dt / A / D / dt_bias, dt_softplus, chunk 256, no z).
torch.profiler (CUPTI) records every kernel of `reps` calls after a warm-up (the peer's Triton autotune included),
our CuPy launches as well as the peer's Triton ones; printed per call: forward kernels, then forward+backward
kernels (the backward's alone = the difference), GPU us and launches per call, and the kernel sums.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ssd import make_inputs, peer  # noqa: E402


def profile_calls(fn, reps):
    import torch
    from profile_decode import kernel_times
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return {k: (t / reps, c / reps) for k, (t, c) in kernel_times(prof, width=60).items()}


def show(title, per, top):
    total = sum(t for t, _ in per.values())
    print(f"\n{title}: kernel sum {total:.1f} us per call")
    for k, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {t:9.1f} us  x{c:5.1f}  {k}")
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,4096,64,64,128", help="B,L,H,P,N")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))

    import ssmcore

    x = make_inputs(*shape)
    dout = make_inputs(*shape, seed=1)["x"]

    def ours_fwd():
        ssmcore.ssd(**x, chunk_size=256, dt_softplus=True)

    def ours_fwd_bwd():
        ssmcore.ssd(**x, chunk_size=256, dt_softplus=True)
        ssmcore.ssd_bwd(dout, **x, chunk_size=256, dt_softplus=True)

    sums = {}
    print(f"shape B,L,H,P,N = {shape}, chunk 256, bf16, {args.reps} calls each")
    sums["ours fwd"] = show("ours: forward", profile_calls(ours_fwd, args.reps), args.top)
    sums["ours fwd+bwd"] = show("ours: forward + backward", profile_calls(ours_fwd_bwd, args.reps), args.top)
    pf, pfb = peer(x)
    if pf is not None:
        sums["peer fwd"] = show("peer: forward", profile_calls(pf, args.reps), args.top)
        sums["peer fwd+bwd"] = show("peer: forward + backward", profile_calls(pfb, args.reps), args.top)
    print("\nkernel sums (us per call): " + ", ".join(f"{k} {v:.1f}" for k, v in sums.items()))
    if pf is not None:
        print(f"backward alone: ours {sums['ours fwd+bwd'] - sums['ours fwd']:.1f}, "
              f"peer {sums['peer fwd+bwd'] - sums['peer fwd']:.1f}")


if __name__ == "__main__":
    main()
