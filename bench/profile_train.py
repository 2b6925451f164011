"""Where a training step's time goes (GPU machine): host-bound or GPU-bound, and which calls cost the host time.

    python3 bench/profile_train.py [--preset small] [--arch mamba2] [--batch 32] [--seq-len 512] [--top 25] [--peer]

The step of `ssmcore train` and bench/multi_gpu_train.py (one process, no DDP): MambaLMHeadModel of a preset, bf16
autocast, fp32 master weights, fused AdamW, grad clip 1.0, random byte batches. Prints per step: wall time (synced,
median), the time until the Python step returns without waiting for the GPU (enqueue), the GPU kernel sum and the
number of kernel launches (torch.profiler), then the host's top functions by own time (cProfile) and the top CPU ops.
Enqueue close to wall = host-bound (the GPU waits for launches); kernel sum close to wall = GPU-bound.
--peer: the same step with mamba_ssm's MambaLMHeadModel (same config) for comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script only


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def build(preset, arch, peer):
    from ssmcore.adapters.torch import train as T

    config = T.model_config(preset, arch)
    torch.manual_seed(0)
    if peer:
        from mamba_ssm.models.config_mamba import MambaConfig as PC
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as PM

        pc = PC(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size,
                d_intermediate=config.d_intermediate, tie_embeddings=config.tie_embeddings,
                ssm_cfg=dict(config.ssm_cfg), rms_norm=config.rms_norm, residual_in_fp32=config.residual_in_fp32,
                fused_add_norm=config.fused_add_norm, pad_vocab_size_multiple=config.pad_vocab_size_multiple)
        model = PM(pc, device=DEV)
    else:
        from ssmcore.adapters.torch.models import MambaLMHeadModel

        model = MambaLMHeadModel(config, device=DEV)
    opt = T.make_optimizer(model, 1e-3, 0.1, torch.device(DEV))
    return model, opt, T


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--arch", default="mamba2")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--peer", action="store_true")
    a = p.parse_args(argv)
    for who in ("ours", "peer") if a.peer else ("ours",):
        run(a, who == "peer")


def run(a, peer):
    from torch.profiler import ProfilerActivity, profile

    model, opt, T = build(a.preset, a.arch, peer)
    spec = T.CONFIGS[a.preset]
    batch, seq_len = a.batch or spec["batch_size"], a.seq_len or spec["seq_len"]
    gen = torch.Generator(device=DEV).manual_seed(0)
    ids = torch.randint(0, 256, (batch, seq_len + 1), device=DEV, generator=gen)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def step():
        with T._autocast(torch.device(DEV)):
            loss = T.lm_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for _ in range(5):
        step()
    _sync()
    walls, enq = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        _sync()
        enq.append(t1 - t0)
        walls.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        for _ in range(3):
            step()
        _sync()
    gpu_us, launches, kernels = 0.0, 0, {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us += t
            launches += ev.count
            kernels[ev.key[:70]] = kernels.get(ev.key[:70], 0.0) + t
    name = "peer (mamba_ssm)" if peer else "ours"
    wall, en = statistics.median(walls) * 1e3, statistics.median(enq) * 1e3
    print(f"\n=== {name}: preset {a.preset} {a.arch}, batch {batch} x {seq_len}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    print(f"step: wall {wall:.1f} ms, enqueue {en:.1f} ms, GPU kernel sum {gpu_us / 3e3:.1f} ms, "
          f"{launches / 3:.0f} kernel launches; {batch * seq_len / wall * 1e3:,.0f} tokens/s")
    print("top GPU kernels (ms per step):")
    for k, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {t / 3e3:8.2f}  {k}")
    print("top CPU ops by self time (ms per step):")
    rows = [ev for ev in prof.key_averages() if ev.device_type == torch.autograd.DeviceType.CPU]
    rows.sort(key=lambda ev: -ev.self_cpu_time_total)
    for ev in rows[:a.top]:
        print(f"  {ev.self_cpu_time_total / 3e3:8.2f}  x{ev.count / 3:7.1f}  {ev.key[:80]}")
    cp = cProfile.Profile()
    cp.enable()
    for _ in range(3):
        step()
    cp.disable()
    _sync()
    stats = []
    for (file, line, func), (_cc, nc, tt, ct, _callers) in pstats.Stats(cp).stats.items():
        stats.append((tt / 3e-3, ct / 3e-3, nc / 3, f"{'/'.join(file.rsplit('/', 2)[-2:])}:{line}:{func}"))
    stats.sort(key=lambda r: -r[0])
    print("host, cProfile by own time (ms per step own, cumulative, calls per step):")
    for tt, ct, nc, where in stats[:a.top]:
        print(f"  {tt:8.2f} {ct:8.2f} {nc:8.1f}  {where}")
    if not peer:
        from ssmcore.adapters.torch import _plans

        print(f"launch plans: {_plans.STATS}; refused: {_plans.REFUSED or 'none'}")
    del model, opt
    _sync()


if __name__ == "__main__":
    main()
