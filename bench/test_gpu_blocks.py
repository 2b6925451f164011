"""Mamba and Mamba2 block forward+backward, ours vs the peer, time and peak GPU memory.

    pytest bench/test_gpu_blocks.py

d_model 1024 (Mamba: d_state 16; Mamba2: H32 P64 N128, chunk 256), B8 L2048, fp32 parameters
under bf16 autocast (docs/PERFORMANCE.md). Forward+backward is ``torch.autograd.grad`` of the
block output with respect to the input and every parameter. extra_info adds ``ours_peak_mib`` /
``peer_peak_mib``: torch.cuda.max_memory_allocated during one forward+backward above what was
allocated before it (inputs and parameters excluded), and ``memory_ratio`` (peer / ours, >= 1 means
we use no more).
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

from bench import _timing as T

D_MODEL, BATCH, LENGTH = 1024, 8, 2048
PEERS = {"Mamba": ("mamba_ssm.modules.mamba_simple", "Mamba"), "Mamba2": ("mamba_ssm.modules.mamba2", "Mamba2")}


def _kwargs(kind, d_model):
    if kind == "Mamba":
        return dict(d_model=d_model, d_state=16 if d_model >= 64 else 4)
    return dict(d_model=d_model, d_state=128 if d_model >= 64 else 8, headdim=64 if d_model >= 64 else 8,
                chunk_size=256 if d_model >= 64 else 16)


def _autocast():
    if T.device() == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # smoke mode: float32 on the CPU


def _step(module, x, g):
    params = [p for p in module.parameters() if p.requires_grad]

    def run():
        with _autocast():
            out = module(x)
        return torch.autograd.grad(out, [x] + params, g)

    return run


def _calls(module, xs, gs):
    return T.rotating([_step(module, x, g) for x, g in zip(xs, gs)])


def peak_mib(fn) -> float | None:
    if T.device() != "cuda":
        return None
    T.sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    T.sync()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("kind", ["Mamba", "Mamba2"])
@pytest.mark.benchmark(group="block fwd+bwd")
def test_block_fwd_bwd(benchmark, kind):
    import ssmcore.adapters.torch as adapter

    dev = T.device()
    d_model, batch, length = T.pick((D_MODEL, BATCH, LENGTH), (32, 1, 32))
    torch.manual_seed(0)
    ours_mod = getattr(adapter, kind)(**_kwargs(kind, d_model), device=dev)
    act = torch.bfloat16 if dev == "cuda" else torch.float32
    n = T.copies_for(batch * length * d_model * 2 * 2)
    xs = [torch.randn(batch, length, d_model, device=dev, dtype=act).requires_grad_(True) for _ in range(n)]
    gs = [torch.randn(batch, length, d_model, device=dev, dtype=act) for _ in range(n)]
    ours = _calls(ours_mod, xs, gs)
    T.first_call(ours)
    # The second call of an op key records its launch plan (adapters/torch/_plans.py), with a higher transient
    # peak; the steady state (what every later training step sees) is the third call's.
    recording_peak = peak_mib(_step(ours_mod, xs[0], gs[0]))
    ours_peak = peak_mib(_step(ours_mod, xs[0], gs[0]))

    module, name = PEERS[kind]
    peer_cls = T.peer(module, name) if dev == "cuda" else None
    peer_fn, peer_peak, note = None, None, ""
    if peer_cls is not None:
        try:
            torch.manual_seed(0)
            peer_mod = peer_cls(**_kwargs(kind, d_model), device=dev)
            peer_fn = _calls(peer_mod, xs, gs)
            for _ in range(3):  # Triton autotune (Mamba2) outside the timing
                peer_fn()
            peer_peak = peak_mib(_step(peer_mod, xs[0], gs[0]))
        except Exception as err:  # noqa: BLE001 - keep our number
            peer_fn, note = None, f"peer failed: {type(err).__name__}: {err}"[:300]
    else:
        note = T.peer_error(module, name) or "peer not run on CPU (smoke mode)"
    info = T.measure(benchmark, ours, peer_fn, peer_missing=f"{module}.{name}: {note}", round_s=0.05,
                     extra=dict(d_model=d_model, batch=batch, length=length))
    info.update(ours_peak_mib=ours_peak, peer_peak_mib=peer_peak, ours_recording_call_peak_mib=recording_peak,
                memory_ratio=(peer_peak / ours_peak) if (peer_peak and ours_peak) else None)
