"""Launch plans in a Mamba-2 block's training step (session 8, helper OVH8).

The fused Mamba-2 mixer (adapters/torch/fused.py, MambaSplitConv1dScanCombinedFn) under bf16 autocast: after two
steps every op of the step has a plan (the SSD backward included: its v4 path is kernels only since session 8), and
the replayed steps' outputs and gradients are bitwise those of the same steps with the fast path off. Prints the
plan statistics and refusals (``-s``) for the lead's run.
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - the gpu marker skips these without a GPU
    pytest.skip("needs a GPU", allow_module_level=True)

from ssmcore.adapters.torch import _plans  # noqa: E402
from ssmcore.adapters.torch.modules import Mamba2  # noqa: E402

CUDA = torch.device("cuda")


@contextlib.contextmanager
def fastpath(on: bool):
    was = _plans.ENABLED
    _plans.ENABLED = on
    try:
        yield
    finally:
        _plans.ENABLED = was


def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _step(block, x, on, seq_idx=None):
    block.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    with fastpath(on), torch.autocast("cuda", dtype=torch.bfloat16):
        y = block(xi, seq_idx=seq_idx)
    (y.float().square().mean()).backward()
    return [y, xi.grad] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("kind", ["per_head_D", "per_channel_D_groups", "packed"])
def test_mamba2_training_step_replays_bitwise(kind):
    torch.manual_seed(0)
    seq_idx = None
    if kind == "per_head_D":  # the profile_train "small" block: d_state 64, headdim 64, one group, chunk 128
        block = Mamba2(256, d_state=64, headdim=64, chunk_size=128, layer_idx=0, device=CUDA)
        batch, length = 4, 512
    elif kind == "packed":  # packed sequences: the SSD's seg from ssdb_seg (the conv's seq_idx paths take no plan)
        block = Mamba2(256, d_state=64, headdim=64, chunk_size=128, layer_idx=0, device=CUDA)
        batch, length = 2, 400
        seq_idx = torch.zeros(batch, length, dtype=torch.int32, device=CUDA)
        seq_idx[0, 100:] = 1
        seq_idx[0, 250:] = 2
        seq_idx[1, 37:] = 4
    else:
        block = Mamba2(192, d_state=32, headdim=32, ngroups=2, D_has_hdim=True, chunk_size=128, layer_idx=0,
                       device=CUDA)
        batch, length = 2, 300
    g = torch.Generator(device=CUDA)
    _plans.clear()
    stats0 = dict(_plans.STATS)
    for seed in range(4):
        g.manual_seed(seed)
        x = torch.randn(batch, length, block.d_model, device=CUDA, generator=g)
        got = _step(block, x, True, seq_idx)
        want = _step(block, x, False, seq_idx)
        for i, (a, b) in enumerate(zip(got, want)):
            assert (a is None) == (b is None), i
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, i
                assert torch.equal(_bits(a), _bits(b)), (seed, i, (a.float() - b.float()).abs().max().item())
    stats = {k: _plans.STATS[k] - stats0[k] for k in stats0}
    print(f"\n{kind}: plan STATS {stats}; REFUSED {_plans.REFUSED}")
    plans = [p for _, p in _plans.plans_of("ssd_bwd") if isinstance(p, _plans._Plan)]
    assert plans, ("no ssd_bwd plan", _plans.REFUSED)
    assert "ssd_bwd" not in _plans.REFUSED, _plans.REFUSED
    assert stats["hits"] > 0
