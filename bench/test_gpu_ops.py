"""GPU op benchmarks, ours vs the peer (mamba_ssm 2.3.2.post1 + causal_conv1d 1.7.0) on the same tensors.

    pytest bench/test_gpu_ops.py --benchmark-group-by=group

Both sides are called through the same drop-in signature (``ssmcore.adapters.torch.<name>`` vs
the peer's function of that name) on torch CUDA tensors: bf16 activations, fp32 parameters,
random inputs, rotated among copies when a set fits in L2. Forward+backward runs autograd
(``torch.autograd.grad``) through each side's own backward. Shapes: docs/PERFORMANCE.md, plus
sweeps over L and N (scan B1 D4096; ssd B2 H64 P64 G1, chunk 256). extra_info: see bench/_timing.py.
The `host_overhead` group times back-to-back eager calls at tiny shapes (target <= 25 us per call).
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from bench import _timing as T

BF16, F32 = torch.bfloat16, torch.float32


def _dtype():
    return BF16 if T.device() == "cuda" else F32  # the Numba backend in smoke mode: float32


def randn(*shape, dtype=None, scale=1.0, grad=False):
    t = (torch.randn(shape, device=T.device(), dtype=F32) * scale).to(dtype or _dtype())
    return t.requires_grad_(grad)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def copies(make, size_of):
    """Input sets for rotation: as many as copies_for(bytes of one set) says."""
    first = make(0)
    return [first] + [make(seed) for seed in range(1, T.copies_for(size_of(first)))]


def fwd_calls(fn, sets):
    return T.rotating([(lambda s=s: fn(**s["args"])) for s in sets])


def fwd_bwd_calls(fn, sets, outputs=lambda out: out):
    def one(s):
        out = outputs(fn(**s["args"]))
        return torch.autograd.grad(out, s["leaves"], s["dout"])

    return T.rotating([(lambda s=s: one(s)) for s in sets])


def run_pair(benchmark, ours, peer_name, make, size_of, *, backward=False, outputs=lambda out: out, **counts):
    """Build input copies, our callable and the peer's, and measure."""
    sets = copies(make, size_of)
    module, name = peer_name
    peer_fn = T.peer(module, name) if T.device() == "cuda" else None
    build = (lambda f: fwd_bwd_calls(f, sets, outputs)) if backward else (lambda f: fwd_calls(f, sets))
    note = "" if peer_fn is not None else (T.peer_error(module, name) or "peer not run on CPU (smoke mode)")
    return T.measure(benchmark, build(ours), build(peer_fn) if peer_fn is not None else None,
                     peer_missing=f"{module}.{name}: {note}", **counts)


def _ours(name):
    import ssmcore.adapters.torch as adapter

    return getattr(adapter, name)


# ------------------------------------------------------------------------------------ selective scan

SCAN_PEER = ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn")


def scan_inputs(b, d, l, n, grad=False):
    def make(seed):
        torch.manual_seed(seed)
        dt = torch.exp(torch.rand(d, device=T.device()) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        args = dict(
            u=randn(b, d, l, grad=grad), delta=randn(b, d, l, scale=0.1, grad=grad),
            A=(-torch.arange(1, n + 1, device=T.device(), dtype=F32).repeat(d, 1)).requires_grad_(grad),
            B=randn(b, n, l, grad=grad), C=randn(b, n, l, grad=grad),
            D=randn(d, dtype=F32, grad=grad), z=randn(b, d, l, grad=grad),
            delta_bias=(dt + torch.log(-torch.expm1(-dt))).requires_grad_(grad), delta_softplus=True,
        )
        leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
        return dict(args=args, leaves=leaves, dout=randn(b, d, l) if grad else None)

    return make


def scan_counts(b, d, l, n, backward):
    act, bc = b * d * l * 2, b * n * l * 2
    fwd = 4 * act + 2 * bc
    if backward:
        return dict(nbytes=fwd + 7 * act + 4 * bc, exps=2 * b * d * l * n)
    return dict(nbytes=fwd, exps=b * d * l * n)


SCAN_MAIN = [(8, 4096, 2048, 16), (1, 4096, 2048, 16), (1, 4096, 16384, 16)]
SCAN_SWEEP = [(1, 4096, l, n) for n in (16, 64) for l in (512, 1024, 2048, 4096, 8192, 16384)]
SCAN_SMOKE = (1, 8, 16, 4)


def _scan_shape(shape):
    return T.pick(shape, SCAN_SMOKE)


def _sid(shape):
    return "B{}-D{}-L{}-N{}".format(*shape)


@pytest.mark.parametrize("shape", SCAN_MAIN, ids=_sid)
@pytest.mark.benchmark(group="selective_scan fwd")
def test_selective_scan_fwd(benchmark, shape):
    b, d, l, n = _scan_shape(shape)
    run_pair(benchmark, _ours("selective_scan_fn"), SCAN_PEER, scan_inputs(b, d, l, n), nbytes_of,
             **scan_counts(b, d, l, n, False))


@pytest.mark.parametrize("shape", SCAN_MAIN[:1], ids=_sid)
@pytest.mark.benchmark(group="selective_scan fwd+bwd")
def test_selective_scan_fwd_bwd(benchmark, shape):
    b, d, l, n = _scan_shape(shape)
    run_pair(benchmark, _ours("selective_scan_fn"), SCAN_PEER, scan_inputs(b, d, l, n, grad=True), nbytes_of,
             backward=True, **scan_counts(b, d, l, n, True))


@pytest.mark.parametrize("shape", SCAN_SWEEP, ids=_sid)
@pytest.mark.benchmark(group="selective_scan fwd sweep")
def test_selective_scan_sweep(benchmark, shape):
    b, d, l, n = _scan_shape(shape)
    info = run_pair(benchmark, _ours("selective_scan_fn"), SCAN_PEER, scan_inputs(b, d, l, n), nbytes_of,
                    **scan_counts(b, d, l, n, False))
    info.update(sweep="scan", L=shape[2], N=shape[3])


def nbytes_of(s):
    return nbytes(s["args"].values())


# ------------------------------------------------------------------------------------ SSD (Mamba-2)

SSD_PEER = ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")


def ssd_inputs(b, l, h, p, n, g=1, chunk=256, grad=False):
    def make(seed):
        torch.manual_seed(seed)
        args = dict(
            x=randn(b, l, h, p, grad=grad), dt=randn(b, l, h, scale=0.5, grad=grad),
            A=(-torch.exp(randn(h, dtype=F32, scale=0.5))).detach().requires_grad_(grad),
            B=randn(b, l, g, n, grad=grad), C=randn(b, l, g, n, grad=grad), chunk_size=min(chunk, l),
            D=randn(h, dtype=F32, grad=grad), dt_bias=randn(h, dtype=F32, scale=0.1, grad=grad), dt_softplus=True,
        )
        leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
        return dict(args=args, leaves=leaves, dout=randn(b, l, h, p) if grad else None)

    return make


def ssd_counts(b, l, h, p, n, g=1, chunk=256, backward=False):
    q = min(chunk, l)
    chunks = b * math.ceil(l / q)
    flops = chunks * (g * 2 * q * q * n + h * (2 * q * q * p + 4 * q * n * p))
    nbytes_fwd = 2 * b * l * h * p * 2 + 2 * b * l * g * n * 2 + b * l * h * 2
    return dict(nbytes=3 * nbytes_fwd if backward else nbytes_fwd, flops=3 * flops if backward else flops)


SSD_MAIN = (8, 4096, 64, 64, 128)
SSD_SWEEP = [(2, l, 64, 64, n) for n in (64, 128, 256) for l in (512, 2048, 16384)]
SSD_SMOKE = (1, 32, 2, 4, 8)


def _did(shape):
    return "B{}-L{}-H{}-P{}-N{}".format(*shape)


def _ssd_shape(shape):
    return T.pick(shape, SSD_SMOKE)


@pytest.mark.benchmark(group="ssd fwd")
def test_ssd_fwd(benchmark):
    shape = _ssd_shape(SSD_MAIN)
    run_pair(benchmark, _ours("mamba_chunk_scan_combined"), SSD_PEER, ssd_inputs(*shape), nbytes_of,
             **ssd_counts(*shape))


@pytest.mark.benchmark(group="ssd fwd+bwd")
def test_ssd_fwd_bwd(benchmark):
    shape = _ssd_shape(SSD_MAIN)
    run_pair(benchmark, _ours("mamba_chunk_scan_combined"), SSD_PEER, ssd_inputs(*shape, grad=True), nbytes_of,
             backward=True, **ssd_counts(*shape, backward=True))


@pytest.mark.parametrize("shape", SSD_SWEEP, ids=_did)
@pytest.mark.benchmark(group="ssd fwd sweep")
def test_ssd_sweep(benchmark, shape):
    real = _ssd_shape(shape)
    info = run_pair(benchmark, _ours("mamba_chunk_scan_combined"), SSD_PEER, ssd_inputs(*real), nbytes_of,
                    **ssd_counts(*real))
    info.update(sweep="ssd", L=shape[1], N=shape[4])


# ------------------------------------------------------------------------------------ causal conv1d

CONV_PEER = ("causal_conv1d", "causal_conv1d_fn")


def conv_inputs(b, d, l, w, grad=False):
    def make(seed):
        torch.manual_seed(seed)
        args = dict(x=randn(b, d, l, grad=grad), weight=randn(d, w, dtype=F32, grad=grad),
                    bias=randn(d, dtype=F32, grad=grad), activation="silu")
        leaves = [v for v in args.values() if isinstance(v, torch.Tensor)]
        return dict(args=args, leaves=leaves, dout=randn(b, d, l) if grad else None)

    return make


CONV_MAIN = (8, 4096, 2048, 4)
CONV_SMOKE = (1, 8, 16, 4)


@pytest.mark.benchmark(group="causal_conv1d fwd")
def test_causal_conv1d_fwd(benchmark):
    b, d, l, w = T.pick(CONV_MAIN, CONV_SMOKE)
    run_pair(benchmark, _ours("causal_conv1d_fn"), CONV_PEER, conv_inputs(b, d, l, w), nbytes_of,
             nbytes=2 * b * d * l * 2)


@pytest.mark.benchmark(group="causal_conv1d fwd+bwd")
def test_causal_conv1d_fwd_bwd(benchmark):
    b, d, l, w = T.pick(CONV_MAIN, CONV_SMOKE)
    run_pair(benchmark, _ours("causal_conv1d_fn"), CONV_PEER, conv_inputs(b, d, l, w, grad=True), nbytes_of,
             backward=True, nbytes=2 * b * d * l * 2 + 3 * b * d * l * 2)


# ------------------------------------------------------------------------------------ decode steps

STATE_PEER = ("mamba_ssm.ops.triton.selective_state_update", "selective_state_update")
CONV_UPDATE_PEER = ("causal_conv1d", "causal_conv1d_update")


def state_update_inputs(b, h, p, n, state_dtype=F32):
    def make(seed):
        torch.manual_seed(seed)
        dev = T.device()
        args = dict(
            state=randn(b, h, p, n, dtype=state_dtype), x=randn(b, h, p),
            dt=randn(b, h, 1).expand(b, h, p), A=(-torch.exp(torch.randn(h, 1, 1, device=dev))).expand(h, p, n),
            B=randn(b, 1, n), C=randn(b, 1, n), D=torch.randn(h, 1, device=dev).expand(h, p),
            dt_bias=torch.randn(h, 1, device=dev).expand(h, p), dt_softplus=True,
        )
        return dict(args=args)

    return make


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.benchmark(group="selective_state_update")
def test_selective_state_update(benchmark, state_dtype):
    b, h, p, n = T.pick((64, 64, 64, 128), (2, 2, 4, 8))
    dtype = getattr(torch, state_dtype) if T.device() == "cuda" else F32
    state_bytes = b * h * p * n * torch.tensor([], dtype=dtype).element_size()
    run_pair(benchmark, _ours("selective_state_update"), STATE_PEER, state_update_inputs(b, h, p, n, dtype),
             nbytes_of, nbytes=2 * state_bytes)


@pytest.mark.benchmark(group="causal_conv1d_update")
def test_causal_conv1d_update(benchmark):
    b, d, w = T.pick((64, 8192, 4), (2, 8, 4))

    def make(seed):
        torch.manual_seed(seed)
        return dict(args=dict(x=randn(b, d), conv_state=randn(b, d, w - 1), weight=randn(d, w, dtype=F32),
                              bias=None, activation="silu"))

    run_pair(benchmark, _ours("causal_conv1d_update"), CONV_UPDATE_PEER, make, nbytes_of,
             nbytes=2 * b * d * 2 + 2 * b * d * (w - 1) * 2)


# ------------------------------------------------------------------------------------ norms

NORM_PEER = ("mamba_ssm.ops.triton.layer_norm", "rms_norm_fn")


def norm_inputs(rows, width, grad=False):
    def make(seed):
        torch.manual_seed(seed)
        args = dict(x=randn(rows, width, grad=grad), weight=randn(width, dtype=F32, grad=grad), bias=None,
                    residual=randn(rows, width, dtype=F32, grad=grad), prenorm=True, residual_in_fp32=True,
                    eps=1e-5)
        leaves = [args["x"], args["weight"], args["residual"]]
        dout = (randn(rows, width), randn(rows, width, dtype=F32)) if grad else None
        return dict(args=args, leaves=leaves, dout=dout)

    return make


@pytest.mark.benchmark(group="rms_norm fused add")
def test_rms_norm_fused_add(benchmark):
    rows, width = T.pick((16384, 2560), (8, 32))
    run_pair(benchmark, _ours("rms_norm_fn"), NORM_PEER, norm_inputs(rows, width), nbytes_of,
             nbytes=rows * width * (2 + 4 + 2 + 4))


@pytest.mark.benchmark(group="rms_norm fused add fwd+bwd")
def test_rms_norm_fused_add_fwd_bwd(benchmark):
    rows, width = T.pick((16384, 2560), (8, 32))
    run_pair(benchmark, _ours("rms_norm_fn"), NORM_PEER, norm_inputs(rows, width, grad=True), nbytes_of,
             backward=True, outputs=lambda out: list(out), nbytes=rows * width * (12 + 2 + 4 + 2 + 4 + 2 + 4))


# ------------------------------------------------------------------------------------ eager host overhead

TINY = {
    "selective_scan_fn": (SCAN_PEER, lambda: scan_inputs(1, 64, 16, 4)),
    "mamba_chunk_scan_combined": (SSD_PEER, lambda: ssd_inputs(1, 16, 2, 16, 16, chunk=16)),
    "causal_conv1d_fn": (CONV_PEER, lambda: conv_inputs(1, 64, 16, 4)),
    "causal_conv1d_update": (CONV_UPDATE_PEER, None),
    "selective_state_update": (STATE_PEER, lambda: state_update_inputs(1, 2, 16, 16)),
    "rms_norm_fn": (NORM_PEER, lambda: norm_inputs(1, 64)),
}


@pytest.mark.parametrize("op", list(TINY))
@pytest.mark.benchmark(group="host_overhead")
def test_host_overhead(benchmark, op):
    peer_name, factory = TINY[op]
    if factory is None:
        def make(seed):
            return dict(args=dict(x=randn(1, 64), conv_state=randn(1, 64, 3), weight=randn(64, 4, dtype=F32),
                                  bias=None, activation="silu"))
    else:
        make = factory()
    sets = [make(0)]  # one set: the point is the host's time per call, not the GPU's
    module, name = peer_name
    peer_fn = T.peer(module, name) if T.device() == "cuda" else None
    note = "" if peer_fn is not None else (T.peer_error(module, name) or "peer not run on CPU (smoke mode)")
    T.measure(benchmark, fwd_calls(_ours(op), sets), fwd_calls(peer_fn, sets) if peer_fn is not None else None,
              mode="host", round_s=0.01, peer_missing=f"{module}.{name}: {note}", extra=dict(target_us=25.0))
