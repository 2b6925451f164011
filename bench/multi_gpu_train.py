"""Multi-GPU run of issue 11: DDP training of a Mamba-2 LM and tensor-parallel Mamba2, via torchrun.

    export NCCL_NVLS_ENABLE=0          # NVLink multicast off (the device tool's KINDS.md requires it)
    torchrun --standalone --nproc_per_node=1 bench/multi_gpu_train.py ddp --out $OUT   # 1 GPU
    torchrun --standalone --nproc_per_node=2 bench/multi_gpu_train.py ddp --out $OUT   # 2 GPUs
    torchrun --standalone --nproc_per_node=2 bench/multi_gpu_train.py tp --out $OUT
    python bench/multi_gpu_train.py compare $OUT/ddp_ws1.json $OUT/ddp_ws2.json

On CPU (gloo, tiny sizes, as the CPU check of this script):

    torchrun --standalone --nproc_per_node=2 bench/multi_gpu_train.py ddp --device cpu --backend gloo --tiny
    torchrun --standalone --nproc_per_node=2 bench/multi_gpu_train.py tp --device cpu --backend gloo --tiny

ddp: MambaLMHeadModel with Mamba-2 blocks (``ssmcore train``'s presets, default "small"), bf16
autocast on CUDA (float32 master weights, AdamW, grad clip 1.0, constant lr), DistributedDataParallel.
Every step draws the same global batch on every rank (fixed seed; byte-level windows of the Python
standard library, or uniform random bytes with ``--data random``); rank r trains on its
1/world block, so 1 and 2 processes see the same data and their loss curves agree within bf16 noise.
Prints the global mean loss per step and tokens/s (global tokens per second, steps after
``--warmup``); writes ``$OUT/ddp_ws<world>.json``.

tp: a Mamba2 mixer, unsharded on every rank (same seed) and tensor-parallel over all ranks
(``process_group``, sequence_parallel on and off) loaded with the unsharded weights' slices. Forward
and backward in float32: max abs difference of the output, the input gradient and every gathered
parameter gradient to the unsharded module. Then tokens/s of forward+backward in ``--dtype``
(bfloat16 on CUDA) for the TP module on all ranks vs the unsharded module on one GPU. Writes
``$OUT/tp_ws<world>.json``.

compare: loss curves of two ddp JSON files (max and mean abs difference per step) and the
tokens/s ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["ddp", "tp", "compare"])
    p.add_argument("files", nargs="*", help="compare: two ddp JSON files")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--backend", default=None, help="nccl (cuda, default) or gloo (cpu, default)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON (default $OUT or .)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU check")
    p.add_argument("--seed", type=int, default=0)
    # ddp
    p.add_argument("--preset", default="small", help="ssmcore train preset: tiny, small, base")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of tokens/s")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step over all ranks")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--data", default="stdlib", choices=["stdlib", "random"])
    # tp
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tp-seqlen", type=int, default=2048)
    p.add_argument("--dtype", default=None, help="tp timing dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args(argv)


def _setup(args):
    backend = args.backend or ("nccl" if args.device == "cuda" else "gloo")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off unless the caller says otherwise
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        device = torch.device("cpu")
    return rank, world, device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _log(rank, *msg):
    if rank == 0:
        print(*msg, flush=True)


def _write(args, name, result, rank):
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out / name}", flush=True)


def _env():
    return {"torch": torch.__version__, "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
            "command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ---------------------------------------------------------------------------------- ddp


def run_ddp(args):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ssmcore.adapters.torch import train as T
    from ssmcore.adapters.torch.models import MambaLMHeadModel

    rank, world, device = _setup(args)
    preset = "tiny" if args.tiny else args.preset
    spec = T.CONFIGS[preset]
    config = T.model_config(preset, "mamba2")
    if args.tiny:
        config.d_model, config.n_layer = 64, 2
        config.ssm_cfg.update(d_state=16, headdim=16, chunk_size=16)
    seq_len = args.seq_len or (64 if args.tiny else spec["seq_len"])
    global_batch = args.global_batch or (4 if args.tiny else spec["batch_size"])
    lr = args.lr or spec["lr"]
    if global_batch % world:
        raise ValueError(f"--global-batch: must be divisible by the world size {world}, got {global_batch}")
    local_batch = global_batch // world

    if args.data == "stdlib":
        data, _, description = T.load_corpus("python-stdlib", seq_len)
    else:
        data = torch.randint(0, 256, (1 << 22,), generator=torch.Generator().manual_seed(args.seed),
                             dtype=torch.uint8)
        description = "uniform random bytes"
    torch.manual_seed(args.seed)
    model = MambaLMHeadModel(config, device=device)  # same seed: same initial weights on every rank
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = T.make_optimizer(model, lr, 0.1, device)
    data_rng = torch.Generator().manual_seed(args.seed)
    _log(rank, f"ddp: world {world} ({dist.get_backend()}), {n_params:,} parameters, preset {preset}, "
               f"global batch {global_batch} x {seq_len}, {description}")

    losses, step_times = [], []
    for step in range(args.steps):
        inputs, targets = T.sample_batch(data, global_batch, seq_len, data_rng)  # same on every rank
        mine = slice(rank * local_batch, (rank + 1) * local_batch)
        inputs, targets = inputs[mine].to(device), targets[mine].to(device)
        _sync(device)
        t0 = time.perf_counter()
        with T._autocast(device):
            loss = T.lm_loss(ddp, inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        mean = mean.item() / world
        _sync(device)
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(mean):
            raise FloatingPointError(f"loss: became {mean} at step {step}")
        losses.append(mean)
        _log(rank, f"step {step:4d}  loss {mean:.4f}  {global_batch * seq_len / step_times[-1]:,.0f} tok/s")
    timed = step_times[args.warmup:] or step_times
    tokens_per_s = global_batch * seq_len * len(timed) / sum(timed)
    _log(rank, f"ddp world {world}: {tokens_per_s:,.0f} tokens/s (global), final loss {losses[-1]:.4f}")
    _write(args, f"ddp_ws{world}.json", {
        "mode": "ddp", "world_size": world, "backend": dist.get_backend(), "device": str(device),
        "preset": preset, "d_model": config.d_model, "n_layer": config.n_layer, "parameters": n_params,
        "global_batch": global_batch, "seq_len": seq_len, "lr": lr, "data": description,
        "autocast": "bfloat16" if device.type == "cuda" else None, "losses": losses,
        "step_times_s": step_times, "tokens_per_s": tokens_per_s, **_env()}, rank)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- tp


def _mixer_kwargs(args):
    if args.tiny:
        return {"d_model": 32, "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    return {"d_model": args.d_model, "d_state": 128, "headdim": 64, "ngroups": 8, "chunk_size": 256}


def _tp_check(args, rank, world, device, sequence_parallel, use_mem_eff_path):
    """Max abs differences of TP vs unsharded (float32) forward and backward."""
    from ssmcore.adapters.torch.distributed import gather_mamba2_state_dict, shard_mamba2_state_dict
    from ssmcore.adapters.torch.modules import Mamba2

    kw = {**_mixer_kwargs(args), "layer_idx": 0, "use_mem_eff_path": use_mem_eff_path, "device": device}
    torch.manual_seed(args.seed)
    full = Mamba2(**kw)
    tp = Mamba2(process_group=dist.group.WORLD, sequence_parallel=sequence_parallel, **kw)
    tp.load_state_dict(shard_mamba2_state_dict(full.state_dict(), full, rank, world))
    batch = max(world, 2) if args.tiny else args.batch
    seqlen = 13 if args.tiny else min(args.tp_seqlen, 1024)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    u = torch.randn(batch, seqlen, kw["d_model"], generator=g).to(device)
    w = torch.randn(batch, seqlen, kw["d_model"], generator=g).to(device)
    u_full = u.clone().requires_grad_()
    out_full = full(u_full)
    (out_full * w).sum().backward()
    rows = batch // world
    mine = slice(rank * rows, (rank + 1) * rows) if sequence_parallel else slice(None)
    u_tp = u[mine].clone().requires_grad_()
    out_tp = tp(u_tp)
    (out_tp * w[mine]).sum().backward()
    grads = gather_mamba2_state_dict({n: p.grad for n, p in tp.named_parameters()}, tp, dist.group.WORLD)
    diff = {"out": (out_tp - out_full[mine]).abs().max().item(), "out_scale": out_full.abs().max().item(),
            "u_grad": (u_tp.grad - u_full.grad[mine]).abs().max().item()}
    for name, p in full.named_parameters():
        if name in grads:
            diff[f"{name}.grad"] = (grads[name] - p.grad).abs().max().item()
    local = torch.tensor([max(v for k, v in diff.items() if k != "out_scale")], device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    diff["max_over_ranks"] = local.item()
    return diff


def _time_fwd_bwd(module, u, iters, device, warmup=3):
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        x = u.detach().requires_grad_()
        module(x).float().square().mean().backward()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def run_tp(args):
    from ssmcore.adapters.torch.modules import Mamba2

    rank, world, device = _setup(args)
    result = {"mode": "tp", "world_size": world, "backend": dist.get_backend(), "device": str(device),
              "mixer": _mixer_kwargs(args), "checks": {}, **_env()}
    for seq_par in (True, False):
        for mem_eff in (True, False):
            key = f"sequence_parallel={seq_par},use_mem_eff_path={mem_eff}"
            try:
                result["checks"][key] = _tp_check(args, rank, world, device, seq_par, mem_eff)
                _log(rank, f"tp check {key}: max abs diff {result['checks'][key]['max_over_ranks']:.3e} "
                           f"(output scale {result['checks'][key]['out_scale']:.3e})")
            except Exception as exc:  # keep going: the JSON says what failed
                result["checks"][key] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
                _log(rank, f"tp check {key}: FAILED {type(exc).__name__}: {exc}")

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batch = max(world, 2) if args.tiny else args.batch
    seqlen = 32 if args.tiny else args.tp_seqlen
    kw = {**_mixer_kwargs(args), "layer_idx": 0, "device": device, "dtype": dtype}
    iters = 2 if args.tiny else args.iters
    timing = {"dtype": str(dtype), "batch": batch, "seqlen": seqlen}
    try:
        torch.manual_seed(args.seed)
        u = torch.randn(batch, seqlen, kw["d_model"], device=device, dtype=dtype)
        full = Mamba2(**kw)
        t_full = _time_fwd_bwd(full, u, iters, device)
        timing["unsharded_1gpu_s"] = t_full
        timing["unsharded_tokens_per_s"] = batch * seqlen / t_full
        for seq_par in (True, False):
            tp = Mamba2(process_group=dist.group.WORLD, sequence_parallel=seq_par, **kw)
            rows = batch // world
            u_tp = u[rank * rows:(rank + 1) * rows] if seq_par else u
            dist.barrier()
            t_tp = _time_fwd_bwd(tp, u_tp, iters, device)
            t = torch.tensor([t_tp], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            name = "tp_seqpar" if seq_par else "tp"
            timing[f"{name}_s"] = t.item()
            timing[f"{name}_tokens_per_s"] = batch * seqlen / t.item()
        _log(rank, f"tp timing ({dtype}, {batch} x {seqlen}, fwd+bwd): unsharded 1 GPU "
                   f"{timing['unsharded_tokens_per_s']:,.0f} tok/s; "
                   f"TP x{world} {timing['tp_tokens_per_s']:,.0f} tok/s; "
                   f"TP x{world} sequence_parallel {timing['tp_seqpar_tokens_per_s']:,.0f} tok/s")
    except Exception as exc:
        timing["error"] = f"{type(exc).__name__}: {exc}"
        timing["traceback"] = traceback.format_exc()
        _log(rank, f"tp timing FAILED {type(exc).__name__}: {exc}")
    result["timing"] = timing
    _write(args, f"tp_ws{world}.json", result, rank)
    dist.destroy_process_group()


def run_compare(args):
    if len(args.files) != 2:
        raise SystemExit("compare: give two ddp JSON files")
    a, b = (json.loads(Path(f).read_text()) for f in args.files)
    n = min(len(a["losses"]), len(b["losses"]))
    diffs = [abs(x - y) for x, y in zip(a["losses"][:n], b["losses"][:n])]
    print(f"{n} steps: loss |diff| max {max(diffs):.4g}, mean {sum(diffs) / n:.4g}; "
          f"final {a['losses'][n - 1]:.4f} (world {a['world_size']}) "
          f"vs {b['losses'][n - 1]:.4f} (world {b['world_size']})")
    print(f"tokens/s: {a['tokens_per_s']:,.0f} (world {a['world_size']}) vs {b['tokens_per_s']:,.0f} "
          f"(world {b['world_size']}), ratio {b['tokens_per_s'] / a['tokens_per_s']:.2f}")


def main(argv=None):
    args = _args(argv)
    {"ddp": run_ddp, "tp": run_tp, "compare": run_compare}[args.mode](args)


if __name__ == "__main__":
    main()
