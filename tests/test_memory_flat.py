"""Generating 10,000 tokens keeps memory flat (CPU): the number of live Python objects and the process
RSS are sampled every 1,000 tokens through a streamer and must not grow beyond what the returned
tokens themselves need (generate keeps one small token tensor per step to return them). The GPU twin
(torch.cuda.memory_allocated) is tests/gpu/test_hostile_gpu.py::test_generation_gpu_memory_is_flat.
(tracemalloc is not used: it makes the 10,000 steps about 3x slower.)"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

from ssmcore.adapters.torch.generation import generate
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel

TOKENS = 10_000
EVERY = 1_000
CONFIGS = {
    "mamba1": dict(d_model=8, n_layer=1, ssm_cfg=dict(d_state=4, d_conv=3, expand=2)),
    "mamba2": dict(d_model=16, n_layer=1, ssm_cfg=dict(layer="Mamba2", d_state=8, d_conv=3, expand=2, headdim=8,
                                                       chunk_size=8)),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _Sampler:
    """A streamer that records (tokens so far, live gc-tracked objects, RSS) every EVERY tokens."""

    def __init__(self):
        self.count = -1  # the first put() is the prompt
        self.samples = []

    def put(self, tokens):
        self.count += 1
        if self.count and self.count % EVERY == 0:
            self.samples.append((self.count, len(gc.get_objects()), _rss_bytes()))

    def end(self):
        pass


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) for RSS")
@pytest.mark.parametrize("kind", [
    "mamba1", pytest.param("mamba2", marks=pytest.mark.slow)])  # one kind by default: keep the run short
def test_generation_memory_is_flat(kind, request):
    if kind == "mamba2" and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("slow: select with -m slow")
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(vocab_size=32, tie_embeddings=True, **CONFIGS[kind])).eval()
    prompt = torch.randint(0, 32, (1, 5))
    with torch.no_grad():
        generate(model, prompt, max_length=5 + 50)  # warm up: kernels compiled, allocator primed
    gc.collect()
    sampler = _Sampler()
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(model, prompt, max_length=5 + TOKENS, top_k=0, temperature=1.0, streamer=sampler,
                       generator=torch.Generator().manual_seed(1))
    elapsed = time.perf_counter() - start
    assert out.shape == (1, 5 + TOKENS)
    counts = [c for c, _, _ in sampler.samples]
    assert counts == list(range(EVERY, TOKENS + 1, EVERY))
    # From the 2nd sample on (after the first 1,000 steps have settled any lazy allocation).
    _, py0, rss0 = sampler.samples[1]
    py_growth = max(p for _, p, _ in sampler.samples[1:]) - py0
    rss_growth = max(r for _, _, r in sampler.samples[1:]) - rss0
    steps = TOKENS - 2 * EVERY
    report = (f"{kind}: {elapsed:.1f}s, +{py_growth} Python objects, RSS +{rss_growth / 1024:.0f} KiB over "
              f"{steps} tokens; samples (tokens, objects, RSS KiB) "
              f"{[(c, p, r // 1024) for c, p, r in sampler.samples]}")
    print(report)
    # One token tensor per step is kept for the result (about 0.6 KiB of RSS with its storage);
    # a cache or state that grew per token (even one small tensor more) would exceed these bounds.
    assert py_growth <= 1.2 * steps + 200, report
    assert rss_growth < 2 * 1024 * 1024 + 800 * steps, report
