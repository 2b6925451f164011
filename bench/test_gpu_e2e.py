"""End to end, ours vs the peer: prefill, a training step, generation (random-weight published configs, bf16).

    pytest bench/test_gpu_e2e.py

- prefill: ``model(input_ids, num_last_tokens=1)`` under no_grad, Mamba-1 2.8B / Mamba-2 2.7B,
  1 x 2048 and 8 x 2048 tokens; extra_info ``tokens_per_s`` / ``peer_tokens_per_s``.
- training step: 370M configs, fp32 parameters, AdamW, bf16 autocast, 8 x 2048 tokens, loss = next
  token cross entropy; tokens/s.
- generation: 2.8B / 2.7B, bf16 weights, random prompt of 128 tokens + 256 new, greedy,
  ``model.generate(input_ids, max_length=384, cg=True)`` (the peer: mamba_ssm's MambaLMHeadModel
  and its generate with cg=True), batch 1 and 64; tokens/s = batch x 256 / wall time of the call
  (prefill included, CUDA-graph capture excluded by a warm-up call).
Each run is seconds long: one synchronised call per round (timing 'wall').
"""

from __future__ import annotations

import copy
import gc

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from bench import _timing as T

PEER_MODEL = ("mamba_ssm.models.mixer_seq_simple", "MambaLMHeadModel")
PEER_CONFIG = ("mamba_ssm.models.config_mamba", "MambaConfig")
BIG = {"mamba1": "mamba-2.8b", "mamba2": "mamba2-2.7b"}
MID = {"mamba1": "mamba-370m", "mamba2": "mamba2-370m"}
SMOKE_CFG = {"mamba1": dict(d_model=32, n_layer=2, vocab_size=64, ssm_cfg={}, pad_vocab_size_multiple=8),
             "mamba2": dict(d_model=32, n_layer=2, vocab_size=64, pad_vocab_size_multiple=8,
                            ssm_cfg={"layer": "Mamba2", "headdim": 8, "d_state": 8, "chunk_size": 16})}


def _config(arch, preset):
    from ssmcore.adapters.torch.cli_generate import PRESETS

    return copy.deepcopy(T.pick(PRESETS[preset], SMOKE_CFG[arch]))


def _models(arch, preset, dtype):
    """(ours, peer or None, note): random-initialised models of one config on the device."""
    from ssmcore.adapters.torch import MambaConfig, MambaLMHeadModel

    dev = T.device()
    torch.manual_seed(0)
    ours = MambaLMHeadModel(MambaConfig(**_config(arch, preset)), device=dev, dtype=dtype)
    peer_cls, peer_cfg = (T.peer(*PEER_MODEL), T.peer(*PEER_CONFIG)) if dev == "cuda" else (None, None)
    if peer_cls is None or peer_cfg is None:
        note = T.peer_error(*PEER_MODEL) or T.peer_error(*PEER_CONFIG) or "peer not run on CPU (smoke mode)"
        return ours, None, f"{PEER_MODEL[0]}: {note}"
    try:
        torch.manual_seed(0)
        return ours, peer_cls(peer_cfg(**_config(arch, preset)), device=dev, dtype=dtype), ""
    except Exception as err:  # noqa: BLE001
        return ours, None, f"peer failed to build: {type(err).__name__}: {err}"[:300]


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _release_memory():
    yield
    _free()  # models and optimizer states of the test just run


def _act_dtype():
    return torch.bfloat16 if T.device() == "cuda" else torch.float32


def _tokens(batch, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(1000, vocab), (batch, length), generator=g).to(T.device())


def _wall_pair(benchmark, ours, peer, note, tokens, extra):
    info = T.measure(benchmark, ours, peer, mode="wall", rounds=3, peer_missing=note, extra=extra)
    info["tokens_per_s"] = tokens / (info["ours_us"] * 1e-6)
    info["peer_tokens_per_s"] = tokens / (info["peer_us"] * 1e-6) if info["peer_us"] else None
    return info


@pytest.fixture(scope="module")
def big_models():
    cache = {}

    def get(arch):
        if arch not in cache:  # both pairs stay (4 x ~5.5 GB): prefill and generate share them
            cache[arch] = _models(arch, BIG[arch], _act_dtype())
        return cache[arch]

    yield get
    cache.clear()
    _free()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.benchmark(group="prefill")
def test_prefill(benchmark, big_models, arch, batch):
    ours_model, peer_model, note = big_models(arch)
    batch, length = T.pick((batch, 2048), (batch, 32))
    ids = _tokens(batch, length, ours_model.config.vocab_size)

    def run(model):
        def call():
            with torch.no_grad():
                return model(ids, num_last_tokens=1).logits
        return call

    _wall_pair(benchmark, run(ours_model), run(peer_model) if peer_model is not None else None, note,
               batch * length, dict(config=BIG[arch], batch=batch, length=length))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.benchmark(group="generate")
def test_generate(benchmark, big_models, arch, batch):
    ours_model, peer_model, note = big_models(arch)
    prompt, new = T.pick((128, 256), (8, 8))
    ids = _tokens(batch, prompt, ours_model.config.vocab_size)
    cg = T.device() == "cuda"

    def run(model):
        def call():
            with torch.no_grad():
                return model.generate(ids, max_length=prompt + new, top_k=1, cg=cg)
        return call

    _wall_pair(benchmark, run(ours_model), run(peer_model) if peer_model is not None else None, note,
               batch * new, dict(config=BIG[arch], batch=batch, prompt=prompt, new_tokens=new, cg=cg))


@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
@pytest.mark.benchmark(group="training step")
def test_training_step(benchmark, arch):
    ours_model, peer_model, note = _models(arch, MID[arch], torch.float32)
    batch, length = T.pick((8, 2048), (2, 32))
    ids = _tokens(batch, length + 1, ours_model.config.vocab_size)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if T.device() == "cuda" else None

    def run(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=T.device() == "cuda")

        def call():
            if autocast is not None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(inputs).logits
            else:
                logits = model(inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return call

    _wall_pair(benchmark, run(ours_model), run(peer_model) if peer_model is not None else None, note,
               batch * length, dict(config=MID[arch], batch=batch, length=length))
