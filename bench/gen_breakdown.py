"""Where generation time goes, ours vs the peer (GPU machine; data for the generation-speed work).

    python3 bench/gen_breakdown.py [--layers 64] [--batch 1 64] [--prompt 128] [--new 256]

For the Mamba-1 2.8B / Mamba-2 2.7B configs (random weights, bf16) and each batch, both models in one process:
- generate: wall time of ``model.generate(ids, max_length=prompt + new, top_k=1, cg=True)`` (warm: graph captured by
  a first call), median of 3;
- prefill: wall time of one prompt forward through a fresh inference cache (what generate's first step does);
- replay: one CUDA-graph replay of the decode step (back-to-back replays, CUDA events);
- rest per step: (generate - prefill) / (new - 1) - replay: the decode loop's cost outside the graph.
Also counts the synchronising torch calls of one of our generate calls (torch.cuda.set_sync_debug_mode).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from profile_decode import build, graph_step_us  # bench/ is the script's folder


def wall(fn, reps=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def sync_count(fn):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where = {}
    for w in caught:
        key = str(w.message).splitlines()[0][:80] + f" @ {w.filename.rsplit('/', 2)[-1]}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return where


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=64)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--arch", nargs="+", default=["mamba1", "mamba2"])
    args = ap.parse_args()
    from ssmcore.adapters.torch import InferenceParams

    max_length = args.prompt + args.new
    for arch in args.arch:
        ours, peer = build(arch, args.layers, torch.bfloat16)
        vocab = ours.config.vocab_size
        for batch in args.batch:
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(1, min(1000, vocab), (batch, args.prompt), generator=g).cuda()
            rows = {}
            for who, model, pcls in (("ours", ours, InferenceParams), ("peer", *(peer or (None, None)))):
                if model is None:
                    continue

                def gen(model=model):
                    with torch.no_grad():
                        return model.generate(ids, max_length=max_length, top_k=1, cg=True)

                def prefill(model=model, pcls=pcls):
                    with torch.no_grad():
                        params = pcls(max_seqlen=max_length, max_batch_size=batch)
                        return model(ids, inference_params=params, num_last_tokens=1).logits

                t_gen = wall(gen)
                t_pre = wall(prefill)
                t_rep = graph_step_us(model, pcls, ids, max_length, replays=30)
                rest = (t_gen - t_pre) / (args.new - 1) - t_rep
                rows[who] = (t_gen, t_pre, t_rep, rest)
                print(f"{arch} b{batch} {who}: generate {t_gen / 1e3:8.1f} ms ({batch * args.new / t_gen * 1e6:8.0f} tok/s)"
                      f"  prefill {t_pre / 1e3:7.1f} ms  replay {t_rep:7.1f} us/step  rest {rest:7.1f} us/step",
                      flush=True)
            if "ours" in rows:
                where = sync_count(lambda: ours.generate(ids, max_length=max_length, top_k=1, cg=True))
                print(f"{arch} b{batch} ours: synchronising torch calls in one generate: {sum(where.values())}")
                for k, v in sorted(where.items(), key=lambda kv: -kv[1])[:8]:
                    print(f"   {v:5d}  {k}")
        del ours, peer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
