"""torch.distributed on CPU: DDP and FSDP2 training of tiny LMs, tensor-parallel Mamba2, each on 2
gloo processes (torch.multiprocessing spawn, localhost, a free port) against one unsharded process.

One spawn of 2 workers (module fixture) runs every check, as spawning and importing take most of
the time; a worker computes the 1-process reference itself (same seed, full batch) and asserts.
Each test reports its check's outcome on both ranks, with the worker's traceback on failure.
A collective left waiting by a failed check on the other rank times out after 60 s.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
RTOL, ATOL = 1e-5, 1e-6  # float32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(rank)
                results[name] = "ok"
            except Exception:  # noqa: BLE001 - reported by the test of this check
                results[name] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    mp.spawn(_worker, args=(_free_port(), out_dir), nprocs=WORLD, join=True)
    ranks = []
    for rank in range(WORLD):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def _expect_ok(outcomes, name):
    failures = [f"rank {r}:\n{o.get(name, 'not run')}" for r, o in enumerate(outcomes) if o.get(name) != "ok"]
    assert not failures, "\n".join(failures)


def _close(name, actual, expected, rtol=RTOL, atol=ATOL):
    actual, expected = actual.detach().float(), expected.detach().float()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{name}: max abs diff {err:.3e} > {bound:.3e}"


# ---------------------------------------------------------------------------------- data parallel


def _lm(arch: str):
    from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel
    ssm = ({"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8, "expand": 2}
           if arch == "mamba2" else {"layer": "Mamba1", "d_state": 8, "expand": 2})
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=61, ssm_cfg=ssm, pad_vocab_size_multiple=8)
    torch.manual_seed(1234)
    return MambaLMHeadModel(cfg)


def _batches(steps, batch, seqlen, vocab=61):
    g = torch.Generator().manual_seed(99)
    return [torch.randint(0, vocab, (batch, seqlen + 1), generator=g) for _ in range(steps)]


def _loss(model, tokens):
    logits = model(tokens[:, :-1]).logits[..., :61]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 61), tokens[:, 1:].reshape(-1))


def _optimizer(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _train_reference(arch, data):
    model = _lm(arch)
    opt = _optimizer(model.parameters())
    losses = []
    for tokens in data:
        opt.zero_grad()
        loss = _loss(model, tokens)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


def _ddp_case(rank, arch, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP
    data = _batches(steps, batch=4, seqlen=13)
    ref_model, ref_losses = _train_reference(arch, data)
    model = DDP(_lm(arch))
    opt = _optimizer(model.parameters())
    half = data[0].shape[0] // WORLD
    for step, tokens in enumerate(data):
        opt.zero_grad()
        loss = _loss(model, tokens[rank * half:(rank + 1) * half])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        _close(f"{arch} loss at step {step}", mean / WORLD, torch.tensor(ref_losses[step]))
    ref = dict(ref_model.named_parameters())
    for name, p in model.module.named_parameters():
        _close(f"{arch} {name} after {steps} steps", p, ref[name])


def _ddp_worker(rank):
    _ddp_case(rank, "mamba2", 3)
    _ddp_case(rank, "mamba", 3)


def test_ddp_two_processes_match_one_process_full_batch(outcomes):
    _expect_ok(outcomes, "ddp")


def _fsdp2_worker(rank):
    from torch.distributed.fsdp import fully_shard
    data = _batches(2, batch=4, seqlen=11)
    ref_model, ref_losses = _train_reference("mamba2", data)
    model = _lm("mamba2")
    for layer in model.backbone.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = _optimizer(model.parameters())
    half = data[0].shape[0] // WORLD
    for step, tokens in enumerate(data):
        opt.zero_grad()
        loss = _loss(model, tokens[rank * half:(rank + 1) * half])
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        _close(f"fsdp2 loss at step {step}", mean / WORLD, torch.tensor(ref_losses[step]))
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert type(p).__name__ == "DTensor", f"{name}: not sharded by fully_shard"
        _close(f"fsdp2 {name}", p.full_tensor(), ref[name])


def test_fsdp2_fully_shard_matches_unsharded_training(outcomes):
    _expect_ok(outcomes, "fsdp2")


# ---------------------------------------------------------------------------------- tensor parallel

TP_CASES = [
    # (mixer kwargs, sequence_parallel, pass seqlen (flattened (B*L, D) input))
    ({"use_mem_eff_path": True}, True, False),
    ({"use_mem_eff_path": True}, False, False),
    ({"use_mem_eff_path": False, "bias": True, "d_ssm": 32, "D_has_hdim": True}, True, True),
    ({"use_mem_eff_path": False, "rmsnorm": False, "ngroups": 4}, False, False),
    ({"use_mem_eff_path": True, "bias": True, "norm_before_gate": True}, True, True),
]


def _mamba2(process_group=None, sequence_parallel=True, seed=7, **kw):
    from ssmcore.adapters.torch.modules import Mamba2
    kw = {"d_model": 32, "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8, "expand": 2, **kw}
    torch.manual_seed(seed)
    return Mamba2(process_group=process_group, sequence_parallel=sequence_parallel, layer_idx=0, **kw)


def _randomize(module):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype) + (0.5 if p.dim() == 1 else 0.0))


def _tp_pair(kw, seq_par):
    from ssmcore.adapters.torch.distributed import shard_mamba2_state_dict
    full = _mamba2(**kw)
    _randomize(full)
    group = dist.group.WORLD
    tp = _mamba2(process_group=group, sequence_parallel=seq_par, seed=100 + dist.get_rank(), **kw)
    tp.load_state_dict(shard_mamba2_state_dict(full.state_dict(), full, dist.get_rank(), WORLD))
    return full, tp


def _tp_worker(rank):
    from ssmcore.adapters.torch.distributed import (
        ColumnParallelLinear, RowParallelLinear, gather_mamba2_state_dict)
    batch, seqlen, dim = 2, 13, 32
    for kw, seq_par, flat in TP_CASES:
        case = f"{kw} sequence_parallel={seq_par} flat={flat}"
        full, tp = _tp_pair(kw, seq_par)
        assert isinstance(tp.in_proj, ColumnParallelLinear) and isinstance(tp.out_proj, RowParallelLinear)
        g = torch.Generator().manual_seed(11)
        u = torch.randn(batch, seqlen, dim, generator=g)
        w = torch.randn(batch, seqlen, dim, generator=g)
        if flat:
            u, w = u.reshape(batch * seqlen, dim), w.reshape(batch * seqlen, dim)
        extra = {"seqlen": seqlen} if flat else {}

        u_full = u.clone().requires_grad_()
        out_full = full(u_full, **extra)
        (out_full * w).sum().backward()

        rows = u.shape[0] // WORLD
        mine = slice(rank * rows, (rank + 1) * rows) if seq_par else slice(None)
        u_tp = u[mine].clone().requires_grad_()
        out_tp = tp(u_tp, **extra)
        (out_tp * w[mine]).sum().backward()

        _close(f"out {case}", out_tp, out_full[mine])
        _close(f"u.grad {case}", u_tp.grad, u_full.grad[mine])
        grads = {n: p.grad for n, p in tp.named_parameters()}
        gathered = gather_mamba2_state_dict(grads, tp, dist.group.WORLD)
        for name, p in full.named_parameters():
            if name == "out_proj.bias" and rank != 0:
                assert name not in gathered, "out_proj.bias must live on rank 0 only"
                continue
            _close(f"{name}.grad {case}", gathered[name], p.grad)
        # The per-rank parameters have the reference's TP names and shapes.
        shapes = {n: tuple(p.shape) for n, p in tp.named_parameters()}
        heads = full.nheads // WORLD
        assert shapes["A_log"] == shapes["dt_bias"] == (heads,), case
        assert shapes["in_proj.weight"] == (full.in_proj.weight.shape[0] // WORLD, dim), case
        assert shapes["out_proj.weight"] == (dim, full.out_proj.weight.shape[1] // WORLD), case


def test_tensor_parallel_mamba2_matches_unsharded(outcomes):
    _expect_ok(outcomes, "tp")


def _tp_step_worker(rank):
    from ssmcore.adapters.torch.inference import InferenceParams
    batch, prompt, new, dim = 3, 7, 3, 32
    kw = {"use_mem_eff_path": False, "bias": True}
    full, tp = _tp_pair(kw, seq_par=False)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(batch, prompt + new, dim, generator=g)
    cache_full, cache_tp = InferenceParams(prompt + new, batch), InferenceParams(prompt + new, batch)
    with torch.no_grad():
        _close("prefill", tp(u[:, :prompt], inference_params=cache_tp),
               full(u[:, :prompt], inference_params=cache_full))
        for t in range(prompt, prompt + new):
            cache_full.seqlen_offset = cache_tp.seqlen_offset = t
            _close(f"step {t}", tp(u[:, t:t + 1], inference_params=cache_tp),
                   full(u[:, t:t + 1], inference_params=cache_full))
        conv_state, ssm_state = cache_tp.key_value_memory_dict[0]
        assert ssm_state.shape == (batch, full.nheads // WORLD, full.headdim, full.d_state)
        seq_tp = _mamba2(process_group=dist.group.WORLD, sequence_parallel=True, **kw)
        with pytest.raises(ValueError, match="^inference_params:"):
            seq_tp(u[:, :prompt], inference_params=InferenceParams(prompt, batch))
        with pytest.raises(ValueError, match="^ngroups:"):
            _mamba2(process_group=dist.group.WORLD, ngroups=1)


def test_tensor_parallel_mamba2_inference_cache(outcomes):
    _expect_ok(outcomes, "tp_step")


CHECKS = {"ddp": _ddp_worker, "fsdp2": _fsdp2_worker, "tp": _tp_worker, "tp_step": _tp_step_worker}
