"""The torch adapter on CUDA tensors: opcheck of every custom op, modules in every dtype and under autocast,
torch.compile (inductor, fullgraph) against eager, and CUDA agreement with the CPU (Numba) path.

Oracles: the same module run on CPU float64 (the Numba backend, itself tested against float64 references),
and ``torch.library.opcheck`` for the registrations on CUDA.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - the gpu marker skips these without a GPU
    pytest.skip("needs a GPU", allow_module_level=True)

from ssmcore.adapters.torch import ops  # noqa: E402
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel  # noqa: E402
from ssmcore.adapters.torch.modules import Mamba, Mamba2  # noqa: E402

CUDA = torch.device("cuda")
F32 = torch.float32
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def randn(*shape, dtype=F32, scale=1.0, grad=False):
    return (torch.randn(*shape, device=CUDA) * scale).to(dtype).requires_grad_(grad)


def negative(*shape, grad=False):
    return (-0.1 - 1.4 * torch.rand(*shape, device=CUDA)).requires_grad_(grad)


def detach(*ts):
    return [None if t is None else t.detach() for t in ts]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- opcheck on CUDA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_selective_scan_cuda(options):
    b, d, n, length = 2, 8, 4, 37
    u, delta = randn(b, d, length, grad=True), randn(b, d, length, scale=0.5, grad=True)
    A = negative(d, n, grad=True)
    B = randn(b, n, length, grad=True) if options else randn(d, n, grad=True)
    C = randn(b, 2, n, length, grad=True) if options else randn(b, n, length, grad=True)
    D, z, bias = (randn(d, grad=True), randn(b, d, length, grad=True), randn(d, scale=0.5, grad=True)) if options \
        else (None, None, None)
    initial = randn(b, d, n, grad=True) if options else None
    opcheck(ops.selective_scan_fwd, (u, delta, A, B, C, D, z, bias, initial, options))
    dlast = randn(b, d, n) if options else None
    opcheck(ops.selective_scan_bwd, (randn(b, d, length), *detach(u, delta, A, B, C, D, z, bias, initial), dlast,
                                     options))


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_causal_conv1d_cuda(options):
    x, weight = randn(2, 16, 33, grad=True), randn(16, 4, grad=True)
    bias = randn(16, grad=True) if options else None
    initial = randn(2, 16, 3, grad=True) if options else None
    seq_idx = torch.tensor([[0] * 10 + [1] * 23, [0] * 33], dtype=torch.int32, device=CUDA) if options else None
    act = "silu" if options else None
    opcheck(ops.causal_conv1d_fwd, (x, weight, bias, seq_idx, initial, act, options))
    dfinal = randn(2, 16, 3) if options else None
    opcheck(ops.causal_conv1d_bwd, (randn(2, 16, 33), *detach(x, weight, bias, seq_idx, initial), dfinal, act))


def test_opcheck_decode_ops_cuda():
    conv_state, weight = randn(3, 16, 5), randn(16, 4)
    indices = torch.tensor([2, -1], dtype=torch.int32, device=CUDA)
    opcheck(ops.causal_conv1d_update, (randn(2, 16), conv_state, weight, None, "silu", None, indices))
    opcheck(ops.causal_conv1d_update, (randn(3, 16, 2), conv_state, weight, randn(16), None,
                                       torch.tensor([0, 3, 9], dtype=torch.int32, device=CUDA), None))
    state = randn(2, 4, 8, 16)
    x, dt = randn(2, 4, 8), randn(2, 4, 8)
    A = negative(4)[:, None, None].expand(4, 8, 16)
    B, C = randn(2, 2, 16), randn(2, 2, 16)
    opcheck(ops.selective_state_update, (state, x, dt, A, B, C, randn(4, 8), randn(2, 4, 8), randn(4, 8), True, None))


def _ssd_kernel_available():
    try:
        import ssmcore.backends.cupy as gpu
        gpu.ssd  # noqa: B018 - the lazy import raises NotImplementedError without the kernel
        gpu.ssd_bwd  # noqa: B018
        return True
    except NotImplementedError:
        return False


needs_ssd = pytest.mark.skipif(not _ssd_kernel_available(), reason="the CuPy ssd kernels are not built yet")


@needs_ssd
@pytest.mark.parametrize("options", [True, False])
def test_opcheck_ssd_cuda(options):
    b, length, h, p, g, n = 2, 70, 4, 16, 2, 16
    x, dt = randn(b, length, h, p, grad=True), randn(b, length, h, scale=0.5, grad=True)
    A = negative(h, grad=True)
    B, C = randn(b, length, g, n, grad=True), randn(b, length, g, n, grad=True)
    D, z, dt_bias = (randn(h, p, grad=True), randn(b, length, h, p, grad=True), randn(h, scale=0.5, grad=True)) \
        if options else (None, None, None)
    initial = randn(b, h, p, n, grad=True) if options else None
    seq_idx = torch.tensor([[0] * 30 + [1] * 40, [0] * 70], dtype=torch.int32, device=CUDA) if options else None
    opcheck(ops.ssd_fwd, (x, dt, A, B, C, 64, D, z, dt_bias, initial, seq_idx, None, options, 0.0, float("inf"),
                          False))
    dfinal = randn(b, h, p, n) if options else None
    opcheck(ops.ssd_bwd, (randn(b, length, h, p), *detach(x, dt, A, B, C), 64, *detach(D, z, dt_bias, initial),
                          seq_idx, None, dfinal, options, 0.0, float("inf")))


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("options", [True, False])
def test_opcheck_norms_cuda(kind, options):
    fwd, bwd = getattr(ops, f"{kind}_fwd"), getattr(ops, f"{kind}_bwd")
    x, weight = randn(2, 3, 64, grad=True), randn(64, grad=True)
    bias = randn(64, grad=True) if options else None
    residual = randn(2, 3, 64, dtype=torch.bfloat16, grad=True) if options else None
    opcheck(fwd, (x, weight, bias, residual, 1e-5, options, options))
    dres = randn(2, 3, 64) if options else None
    opcheck(bwd, (randn(2, 3, 64), *detach(x, weight, bias, residual), 1e-5, dres))


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_gated_rms_norm_cuda(options):
    x, weight = randn(3, 64, grad=True), randn(64, grad=True)
    z = randn(3, 64, grad=True) if options else None
    group_size = 16 if options else None
    opcheck(ops.gated_rms_norm_fwd, (x, weight, z, 1e-5, group_size, not options))
    opcheck(ops.gated_rms_norm_bwd, (randn(3, 64), *detach(x, weight, z), 1e-5, group_size, not options))


# --- modules on CUDA vs the same module on CPU ---------------------------------------------------------


def _mixer(kind, dtype=F32, device="cpu"):
    torch.manual_seed(3)
    if kind == "mamba":
        return Mamba(64, d_state=16, dtype=dtype, device=device)
    return Mamba2(128, d_state=32, headdim=32, chunk_size=64, dtype=dtype, device=device)


def _needs(kind):
    if kind == "mamba2" and not _ssd_kernel_available():
        pytest.skip("the CuPy ssd kernels are not built yet")


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_module_cuda_float32_matches_cpu_float64(kind):
    _needs(kind)
    ref = _mixer(kind).double()
    gpu = _mixer(kind, device="cuda")
    gpu.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    u = torch.randn(2, 77, ref.d_model if hasattr(ref, "d_model") else 64, dtype=torch.float64, requires_grad=True)
    want = ref(u)
    want.pow(2).sum().backward()
    ug = u.detach().float().cuda().requires_grad_(True)
    out = gpu(ug)
    out.pow(2).sum().backward()
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ug.grad.double().cpu(), u.grad, rtol=5e-3, atol=5e-3)
    refp = dict(ref.named_parameters())
    for name, p in gpu.named_parameters():
        g, w = p.grad.double().cpu(), refp[name].grad
        err = (g - w).norm() / (w.norm() + 1e-12)
        assert err < 5e-3, f"grad of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_module_cuda_half_precision_tracks_float32(kind, dtype):
    _needs(kind)
    ref, low = _mixer(kind, device="cuda"), _mixer(kind, dtype, device="cuda")
    low.load_state_dict(ref.state_dict())
    d_model = 64 if kind == "mamba" else 128
    u = torch.randn(4, 300, d_model, device=CUDA, dtype=dtype, requires_grad=True)
    out = low(u)
    assert out.dtype == dtype
    want = ref(u.detach().float())
    err = (out.float() - want).norm() / want.norm()
    assert err < (0.03 if dtype == torch.bfloat16 else 0.005), err
    out.float().pow(2).sum().backward()
    assert u.grad.dtype == dtype and torch.isfinite(u.grad).all()
    for name, p in low.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_module_cuda_autocast_bfloat16(kind):
    _needs(kind)
    module = _mixer(kind, device="cuda")
    d_model = 64 if kind == "mamba" else 128
    u = torch.randn(2, 100, d_model, device=CUDA, requires_grad=True)
    want = module(u).detach()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(u)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).norm() / want.norm() < 0.03
    out.float().pow(2).sum().backward()
    assert u.grad.dtype == torch.float32
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_compile_fullgraph_inductor_cuda_matches_eager(kind):
    _needs(kind)
    module = _mixer(kind, device="cuda")
    d_model = 64 if kind == "mamba" else 128
    u = torch.randn(2, 129, d_model, device=CUDA, requires_grad=True)
    want = module(u)
    want_grad, = torch.autograd.grad(want.pow(2).sum(), u)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(u)
    grad, = torch.autograd.grad(out.pow(2).sum(), u)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_lm_cuda_logits_match_cpu(arch):
    _needs(arch)
    layer = {"layer": "Mamba1"} if arch == "mamba" else {"layer": "Mamba2", "headdim": 16, "chunk_size": 32}
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=101, ssm_cfg=layer, pad_vocab_size_multiple=8)
    torch.manual_seed(7)
    cpu = MambaLMHeadModel(cfg)
    gpu = MambaLMHeadModel(cfg, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    ids = torch.randint(0, 101, (2, 50))
    want = cpu(ids).logits
    got = gpu(ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


# --- the bridge's results -------------------------------------------------------------------------------


def test_op_outputs_are_plain_tensors_in_torch_memory():
    """CUDA results come back as tensors over blocks of torch's allocator (no DLPack): not views (so autograd
    lets a caller change them in place), not aliasing an input or each other, freed back to torch's pool."""
    from ssmcore.adapters.torch import functional as Fn

    b, d, n, length = 2, 8, 4, 37
    u, delta = randn(b, d, length, grad=True), randn(b, d, length, scale=0.5, grad=True)
    A, B, C = negative(d, n, grad=True), randn(b, n, length, grad=True), randn(b, n, length, grad=True)
    out, last = Fn.selective_scan_fn(u, delta, A, B, C, delta_softplus=True, return_last_state=True)
    assert not out._is_view() and not last._is_view()
    assert out.untyped_storage().data_ptr() != last.untyped_storage().data_ptr()
    assert all(out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in (u, delta, A, B, C))
    expected = out.detach().clone()
    out.mul_(2.0)  # in place on a custom-op output under autograd: allowed
    (out.sum() + last.sum()).backward()
    assert torch.equal(out.detach(), 2 * expected)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (u, delta, A, B, C))
    before = torch.cuda.memory_allocated()
    for _ in range(20):
        with torch.no_grad():
            Fn.selective_scan_fn(u, delta, A, B, C, delta_softplus=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 4096  # results given back to torch's pool
