"""CPU end to end (this 2-core machine, float32): the 130M config's prefill and greedy generation.

    pytest bench/test_cpu_e2e.py

docs/PERFORMANCE.md CPU rows: 130M config (d_model 768, 24 layers, random weights), generate batch 1,
prompt 32 + 64 new tokens (target >= 50 tok/s); prefill 1 x 512 (target <= 1200 ms).
extra_info: tokens_per_s.
"""

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model():
    from ssmcore.adapters.torch import MambaConfig, MambaLMHeadModel
    from ssmcore.adapters.torch.cli_generate import PRESETS

    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(**PRESETS["mamba-130m"]), device="cpu", dtype=torch.float32).eval()


def _ids(batch, length):
    return torch.randint(1, 1000, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.benchmark(group="cpu e2e")
def test_cpu_prefill_130m(benchmark, model):
    ids = _ids(1, 512)

    def run():
        with torch.no_grad():
            return model(ids, num_last_tokens=1).logits

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    benchmark.extra_info.update(tokens_per_s=512 / benchmark.stats.stats.median, target_us=1200e3)


@pytest.mark.benchmark(group="cpu e2e")
def test_cpu_generate_130m(benchmark, model):
    ids = _ids(1, 32)

    def run():
        with torch.no_grad():
            return model.generate(ids, max_length=32 + 64, top_k=1)

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    benchmark.extra_info.update(tokens_per_s=64 / benchmark.stats.stats.median)
