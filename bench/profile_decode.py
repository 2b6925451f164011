"""Where a decode step's GPU time goes, ours vs the peer: torch.profiler over eager decode steps of the
Mamba-1 2.8B / Mamba-2 2.7B configs cut to a few layers (random weights, bf16).

    python3 bench/profile_decode.py [--layers 4] [--steps 20] [--batch 1 64]

Prints, per model and batch, the GPU time of one decode step (sum of kernel times, so host overhead and
launch gaps are excluded: this is what a CUDA-graph replay costs at best) and the kernels that make it up,
ours next to the peer's, per layer. For the gaps between kernels, compare with bench/test_gpu_e2e.py's
tokens/s (CUDA graphs).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch.profiler import ProfilerActivity, profile

PRESET = {"mamba1": "mamba-2.8b", "mamba2": "mamba2-2.7b"}


def build(arch, layers, dtype):
    from ssmcore.adapters.torch import MambaConfig, MambaLMHeadModel
    from ssmcore.adapters.torch.cli_generate import PRESETS

    cfg = copy.deepcopy(PRESETS[PRESET[arch]])
    cfg["n_layer"] = layers
    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(**copy.deepcopy(cfg)), device="cuda", dtype=dtype)
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as PeerConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as PeerModel
        from mamba_ssm.utils.generation import InferenceParams as PeerParams

        torch.manual_seed(0)
        peer = (PeerModel(PeerConfig(**copy.deepcopy(cfg)), device="cuda", dtype=dtype), PeerParams)
    except Exception as err:  # noqa: BLE001
        print(f"peer unavailable: {type(err).__name__}: {err}")
        peer = None
    return ours, peer


def kernel_times(prof, width=70) -> dict:
    """{kernel name (first `width` characters): (GPU us, launches)} of a finished torch.profiler run."""
    per = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type == torch.autograd.DeviceType.CUDA:
            old_t, old_c = per.get(ev.key[:width], (0.0, 0))
            per[ev.key[:width]] = (old_t + t, old_c + ev.count)
    return per


def step_kernels(model, params_cls, batch, steps, vocab):
    """{kernel name: GPU us per decode step}, total us per step."""
    ids = torch.randint(1, min(1000, vocab), (batch, 16), device="cuda")
    params = params_cls(max_seqlen=16 + 3 * steps + 8, max_batch_size=batch)
    with torch.no_grad():
        model(ids, inference_params=params, num_last_tokens=1)
        params.seqlen_offset += ids.shape[1]
        tok = ids[:, -1:]
        for _ in range(3):  # warm-up steps (compiles, allocator)
            model(tok, inference_params=params, num_last_tokens=1)
            params.seqlen_offset += 1
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                model(tok, inference_params=params, num_last_tokens=1)
                params.seqlen_offset += 1
            torch.cuda.synchronize()
    per = {k: (t / steps, c / steps) for k, (t, c) in kernel_times(prof).items()}
    return per, sum(t for t, _ in per.values())


def graph_step_us(model, params_cls, ids, max_length=64, replays=50):
    """Mean time of one CUDA-graph replay of the decode step after the prompt ``ids`` (B, L), in a cache of
    ``max_length``, over `replays` back-to-back replays (CUDA events), us."""
    batch = ids.shape[0]
    params = params_cls(max_seqlen=max_length, max_batch_size=batch)
    tok = ids[:, -1:].clone()
    with torch.no_grad():
        model(ids, inference_params=params, num_last_tokens=1)
        params.seqlen_offset = ids.shape[1]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(tok, inference_params=params, num_last_tokens=1)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(tok, inference_params=params, num_last_tokens=1)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(end) * 1e3 / replays
    del graph, params
    torch.cuda.empty_cache()
    return us


def prefill_kernels(model, batch, length, vocab, reps=3):
    """({kernel: (GPU us per forward, launches)}, GPU us total, wall us per forward) of a no-grad prefill."""
    import time

    ids = torch.randint(1, min(1000, vocab), (batch, length), device="cuda")
    with torch.no_grad():
        for _ in range(2):
            model(ids, num_last_tokens=1)
        torch.cuda.synchronize()
        walls = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids, num_last_tokens=1)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(ids, num_last_tokens=1)
            torch.cuda.synchronize()
    per = kernel_times(prof)
    return per, sum(t for t, _ in per.values()), sorted(walls)[len(walls) // 2] * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prefill", type=int, default=2048, help="also profile a 1 x PREFILL forward (0: skip)")
    args = ap.parse_args()
    from ssmcore.adapters.torch import InferenceParams

    for arch in ("mamba1", "mamba2"):
        ours, peer = build(arch, args.layers, torch.bfloat16)
        vocab = ours.config.vocab_size
        for batch in args.batch:
            o, o_total = step_kernels(ours, InferenceParams, batch, args.steps, vocab)
            p, p_total = step_kernels(peer[0], peer[1], batch, args.steps, vocab) if peer else ({}, float("nan"))
            print(f"\n{arch} ({PRESET[arch]} config, {args.layers} layers), batch {batch}: GPU us per decode step "
                  f"ours {o_total:.1f} ({sum(c for _, c in o.values()):.0f} launches) vs peer {p_total:.1f} "
                  f"({sum(c for _, c in p.values()):.0f}); per layer {o_total / args.layers:.1f} vs "
                  f"{p_total / args.layers:.1f}. Kernels: us per step, launches per step")
            for who, table in (("ours", o), ("peer", p)):
                for name, (t, c) in sorted(table.items(), key=lambda kv: -kv[1][0])[:16]:
                    print(f"  {who} {t:8.1f} {c:5.0f}  {name}")
        for batch in args.batch:
            try:
                ids = torch.randint(1, min(1000, vocab), (batch, 16), device="cuda")
                o_g = graph_step_us(ours, InferenceParams, ids)
                p_g = graph_step_us(peer[0], peer[1], ids) if peer else float("nan")
                print(f"\n{arch}, batch {batch}: CUDA-graph replay of one decode step ({args.layers} layers) ours "
                      f"{o_g:.1f} us vs peer {p_g:.1f} us")
            except Exception as err:  # noqa: BLE001
                print(f"{arch}, batch {batch}: graph replay failed: {type(err).__name__}: {err}")
        if args.prefill:
            o, o_gpu, o_wall = prefill_kernels(ours, 1, args.prefill, vocab)
            p, p_gpu, p_wall = prefill_kernels(peer[0], 1, args.prefill, vocab) if peer else ({}, float("nan"),
                                                                                               float("nan"))
            print(f"\n{arch}, prefill 1 x {args.prefill}, {args.layers} layers: wall us ours {o_wall:.0f} vs peer "
                  f"{p_wall:.0f}; GPU kernel sum ours {o_gpu:.0f} vs peer {p_gpu:.0f} (wall >> GPU: host-bound)")
            for who, table in (("ours", o), ("peer", p)):
                for name, (t, c) in sorted(table.items(), key=lambda kv: -kv[1][0])[:12]:
                    print(f"  {who} {t:8.1f} {c:5d}  {name}")
        del ours, peer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
