"""Peak GPU memory of the Mamba and Mamba2 blocks' forward+backward at the issue-5 benchmark shape (B8 L2048
d_model 1024, fp32 parameters under bf16 autocast, as bench/profile_block.py measures it), and the
memory-saving fused paths' gradients against the unfused path (autograd through the separate ops).

Predictions (bench/NOTES.md, session 6, helper MEM6; CPU accounting of tests/test_fused_memory.py, which
reproduced the session-5 measurement 825 MiB of the Mamba block to 1 MiB): Mamba 632 MiB (was 825, reference
764), Mamba2 ~850 (model 867, which overestimated the session-5 Mamba2 block by 20 MiB; was 1103, reference 942).
Session 7 (helper MB7): the Mamba block keeps the scan's checkpoints from the forward (64 MiB at this shape, which
existed at the scan backward, the peak, anyway) and sums dW_out in float32 (+4 MiB there): ~633-640 MiB predicted.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - the gpu marker skips these without a GPU
    pytest.skip("needs a GPU", allow_module_level=True)

from ssmcore.adapters.torch.modules import Mamba, Mamba2  # noqa: E402

CUDA = torch.device("cuda")
# MiB above the inputs, module and parameters: the prediction plus ~5 % (the bound the test holds), and the
# reference package's measurement at the same setting (H200, session 5), which the issue asks not to pass.
BOUND = {"Mamba": 665, "Mamba2": 900}
REFERENCE = {"Mamba": 764, "Mamba2": 942}


def make(kind, d_model, **kw):
    torch.manual_seed(0)
    if kind == "Mamba":
        return Mamba(d_model, d_state=16, device=CUDA, **kw)
    return Mamba2(d_model, d_state=128, headdim=64, chunk_size=256, device=CUDA, **kw)


def step(module, x, g, autocast=True):
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = module(x)
    return (out,) + torch.autograd.grad(out, [x] + params, g)


@pytest.mark.parametrize("kind", ["Mamba", "Mamba2"])
def test_block_peak_memory_at_the_benchmark_shape(kind):
    """Peak above the inputs no more than the reference's (the issue's target), and nothing of a step left
    allocated after it (a step that kept memory until a later call or the garbage collector would also make
    the peak look smaller than it is)."""
    import gc

    module = make(kind, 1024)
    x = torch.randn(8, 2048, 1024, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    for _ in range(3):  # the third call replays the launch plans recorded on the second
        step(module, x, g)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step(module, x, g)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    del result
    torch.cuda.synchronize()
    left = (torch.cuda.memory_allocated() - before) / 2**20
    print(f"{kind}: peak {peak:.1f} MiB above the inputs (prediction {BOUND[kind]}, reference {REFERENCE[kind]}), "
          f"{left:.1f} MiB left after the step")
    assert abs(left) < 1, f"{kind}: {left:.1f} MiB still allocated after a step whose results were dropped"
    assert peak <= REFERENCE[kind], f"{kind}: peak {peak:.1f} MiB, the reference's {REFERENCE[kind]}"


def _close(a, b, rel):
    scale = max(b.abs().max().item(), 1e-6)
    return (a.float() - b.float()).abs().max().item() <= rel * scale


@pytest.mark.parametrize("autocast", [True, False], ids=["bf16_autocast", "fp32"])
@pytest.mark.parametrize("kind", ["Mamba", "Mamba2"])
def test_fused_block_gradients_match_unfused(kind, autocast):
    """Output and every gradient of the fused path (recomputing backward, intermediates dropped early, Mamba's
    in_proj halves apart) against autograd through the separate ops, B3 L300 d_model 256."""
    kw = dict(use_fast_path=False) if kind == "Mamba" else dict(use_mem_eff_path=False)
    fused, plain = make(kind, 256), make(kind, 256, **kw)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 300, 256, device=CUDA, requires_grad=True)
    g = torch.randn_like(x)
    rel = 3e-2 if autocast else 1e-3
    names = ["out", "x"] + [n for n, p in fused.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, step(fused, x, g, autocast), step(plain, x, g, autocast)):
        assert _close(a, b, rel), f"{kind} {name}: max diff {(a.float() - b.float()).abs().max().item():.3g}"


def test_mamba_in_proj_apart_matches_one_xz(monkeypatch):
    """Mamba's fast path with x and z apart (default) against one xz (SSMCORE_INPROJ_APART=0), bf16 autocast."""
    module = make("Mamba", 256)
    x = torch.randn(2, 512, 256, device=CUDA, requires_grad=True)
    g = torch.randn_like(x)
    apart = step(module, x, g)
    monkeypatch.setenv("SSMCORE_INPROJ_APART", "0")
    one = step(module, x, g)
    for a, b in zip(apart, one):
        assert _close(a, b, 2e-2)


def _launched_kernels(monkeypatch, fn):
    """Names of the CuPy kernels ``fn()`` launches (a patched launch also turns the launch plans off)."""
    from ssmcore.backends.cupy import _runtime

    launched = []
    original = _runtime.launch

    def recording(kernel, *args, **kwargs):
        launched.append(kernel)
        return original(kernel, *args, **kwargs)

    monkeypatch.setattr(_runtime, "launch", recording)
    result = fn()
    torch.cuda.synchronize()
    monkeypatch.setattr(_runtime, "launch", original)
    names = {id(k): key[1] for key, k in _runtime._FUNCTIONS.items()}
    return result, [names.get(id(k), "?") for k in launched]


@pytest.mark.parametrize("shape", [(2, 512, 256), (1, 333, 64)], ids=["B2_L512", "B1_L333"])
def test_mamba_kept_checkpoints_skip_the_backward_scan_forward(monkeypatch, shape):
    """Session 7: with SSMCORE_MAMBA_CKPT=1 (opt-in) the fused Mamba path keeps the scan's state checkpoints from
    the forward (one scan forward per training step instead of two) and gives bitwise the same output and gradients
    as recomputing them (the default; the output pass forced to the lanes kernel, which the kept-checkpoint pass uses: the
    time-parallel one that small grids otherwise get rounds differently)."""
    from ssmcore.adapters.torch import fused
    from ssmcore.backends.cupy import scan

    monkeypatch.setattr(scan, "fwd_kernel", "lanes")
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")  # dB / dC summed in a fixed order: bitwise comparable
    batch, length, d_model = shape
    module = make("Mamba", d_model)
    x = torch.randn(batch, length, d_model, device=CUDA, requires_grad=True)
    g = torch.randn_like(x)
    results = {}
    for keep in (True, False):
        monkeypatch.setattr(fused, "keep_checkpoints", keep)
        results[keep], names = _launched_kernels(monkeypatch, lambda: step(module, x, g))
        forwards = [n for n in names if n.startswith("scan_fwd")]
        assert len(forwards) == (1 if keep else 2), names
        assert sum(n.startswith("scan_bwd") for n in names) == 1, names
    for a, b in zip(results[True], results[False]):
        assert torch.equal(a, b)
    # launch plans on (launch not patched): the kept-checkpoint forward is recorded on its second call and
    # replayed from the third, with the same results
    monkeypatch.setattr(fused, "keep_checkpoints", True)
    for _ in range(3):
        replayed = step(module, x, g)
    for a, b in zip(replayed, results[True]):
        assert torch.equal(a, b)
    from ssmcore.adapters.torch import _plans

    print("kept-checkpoint forward plans:", [type(p).__name__ + (f" ({p.reason})" if hasattr(p, "reason") else "")
                                             for _, p in _plans.plans_of("mamba_inner_scan_fwd_ckpt")])
