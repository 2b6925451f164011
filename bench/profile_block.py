"""Where a block's forward+backward GPU time goes, ours vs the peer (GPU machine; data for block/training speed).

    python3 bench/profile_block.py [--batch 8] [--length 2048] [--d-model 1024] [--top 22] [--who ours peer]
    python3 bench/profile_block.py --kinds Mamba --who ours ours-ckpt peer   # scan checkpoints kept or not
    python3 bench/profile_block.py --conv   # causal_conv1d_fn fwd+bwd: where the time outside the kernels goes

The setting of bench/test_gpu_blocks.py: Mamba (d_state 16) and Mamba2 (H32 P64 N128, chunk 256), fp32 parameters
under bf16 autocast, torch.autograd.grad of the output w.r.t. input and parameters. Prints wall time per
forward+backward (CUDA events, median of 10), the sum of kernel times (torch.profiler), the kernels by GPU time,
ours next to the peer's, and peak memory above the inputs. "ours" runs the defaults; "ours-ckpt" keeps the Mamba-1
fused path's scan checkpoints from the forward (SSMCORE_MAMBA_CKPT=1, opt-in), "ours-recompute" recomputes them in
the backward (SSMCORE_MAMBA_CKPT=0, the default).

--conv: the suite's causal_conv1d fwd+bwd row (B8 D4096 L2048 W4 bf16, fp32 weight and bias, silu), per call: CUDA-event
time at that shape, host time at a tiny shape (back-to-back calls, the GPU idle: what the big shape hides or not), the
kernel sum, for ours through the eager autograd.Function (session 7) and through the custom op's own autograd, and
the peer; plus the launch-plan refusals.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from profile_decode import kernel_times  # bench/ is the script's folder
from torch.profiler import ProfilerActivity, profile


def make(kind, d_model, peer):
    kw = dict(d_model=d_model, d_state=16) if kind == "Mamba" else dict(d_model=d_model, d_state=128, headdim=64,
                                                                         chunk_size=256)
    torch.manual_seed(0)
    if peer:
        import importlib

        mod = importlib.import_module("mamba_ssm.modules.mamba_simple" if kind == "Mamba" else "mamba_ssm.modules.mamba2")
        return getattr(mod, kind)(**kw, device="cuda")
    import ssmcore.adapters.torch as adapter

    return getattr(adapter, kind)(**kw, device="cuda")


def step_fn(module, x, g):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        return torch.autograd.grad(out, [x] + params, g)

    return run


def _ours_variant(who):
    """Set ours' knobs for a row name ("ours": defaults, "ours-ckpt", "ours-recompute")."""
    from ssmcore.adapters.torch import fused

    fused.keep_checkpoints = {"ours-ckpt": True, "ours-recompute": False}.get(who)


def conv_report(top):
    import ssmcore.adapters.torch as adapter
    from ssmcore.adapters.torch import _plans, functional

    def inputs(b, d, length):
        x = torch.randn(b, d, length, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(d, 4, device="cuda", requires_grad=True)
        bias = torch.randn(d, device="cuda", requires_grad=True)
        return x, w, bias, torch.randn_like(x)

    def call(fn, x, w, bias, g):
        return lambda: torch.autograd.grad(fn(x, w, bias, activation="silu"), [x, w, bias], g)

    sides = {"ours (autograd.Function)": (adapter.causal_conv1d_fn, True),
             "ours (custom op autograd)": (adapter.causal_conv1d_fn, False)}
    try:
        from causal_conv1d import causal_conv1d_fn as peer_fn

        sides["peer"] = (peer_fn, None)
    except Exception as err:  # noqa: BLE001
        print(f"peer unavailable: {type(err).__name__}: {err}"[:200])
    original = functional._eager_autograd
    big, tiny = inputs(8, 4096, 2048), inputs(1, 64, 64)
    for name, (fn, function_path) in sides.items():
        if function_path is not None:
            functional._eager_autograd = original if function_path else (lambda *t: False)
        try:
            run = call(fn, *big)
            wall, gpu, launches, peak, per = measure(run, top)
            host_call = call(fn, *tiny)
            for _ in range(20):
                host_call()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                host_call()
            host = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            print(f"\ncausal_conv1d fwd+bwd B8 D4096 L2048 W4, {name}: wall {wall:7.1f} us, kernel sum {gpu:7.1f} us, "
                  f"{launches} launches; host per call (B1 D64 L64) {host:6.1f} us")
            for kname, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
                print(f"   {t:8.1f} {c:4d}  {kname}")
        finally:
            functional._eager_autograd = original
    print(f"\nlaunch plans: {_plans.STATS}; refused: {_plans.REFUSED}")


def measure(fn, top):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    wall = sorted(times)[5]
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    left = (torch.cuda.memory_allocated() - before) / 2**20
    if abs(left) >= 1:
        print(f"  ({left:.0f} MiB still allocated after the step)")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = kernel_times(prof, 80)
    return wall, sum(t for t, _ in per.values()), sum(c for _, c in per.values()), peak, per


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--kinds", nargs="+", default=["Mamba", "Mamba2"])
    ap.add_argument("--who", nargs="+", default=["ours", "peer"], help="ours, ours-ckpt, ours-recompute and/or peer")
    ap.add_argument("--conv", action="store_true", help="the causal_conv1d fwd+bwd report instead of the blocks")
    args = ap.parse_args()
    if args.conv:
        conv_report(args.top)
        return
    for kind in args.kinds:
        x = torch.randn(args.batch, args.length, args.d_model, device="cuda", dtype=torch.bfloat16,
                        requires_grad=True)
        g = torch.randn_like(x)
        rows = {}
        for who in args.who:
            try:
                if who != "peer":
                    _ours_variant(who)
                module = make(kind, args.d_model, who == "peer")
            except Exception as err:  # noqa: BLE001
                print(f"{kind} {who}: unavailable: {type(err).__name__}: {err}"[:300])
                continue
            rows[who] = measure(step_fn(module, x, g), args.top)
            del module
            torch.cuda.empty_cache()
        print(f"\n{kind} B{args.batch} L{args.length} d_model {args.d_model}: forward+backward")
        for who, (wall, gpu, launches, peak, _) in rows.items():
            print(f"  {who}: wall {wall:8.0f} us, kernel sum {gpu:8.0f} us, {launches} launches, peak {peak:7.0f} MiB")
        for who, (*_, per) in rows.items():
            for name, (t, c) in sorted(per.items(), key=lambda kv: -kv[1][0])[:args.top]:
                print(f"  {who} {t:8.1f} {c:4d}  {name}")


if __name__ == "__main__":
    main()
