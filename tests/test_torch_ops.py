"""The torch adapter's op layer: custom ops, autograd, fake tensors, compile, drop-in functions (CPU).

Oracles: plain torch formulas written below (float64 autograd gives the reference gradients),
``torch.library.opcheck`` for the registrations, and eager results for ``torch.compile``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from helpers import TOL  # noqa: E402

from ssmcore.adapters.torch import (  # noqa: E402
    _bridge,
    causal_conv1d_fn,
    causal_conv1d_update,
    layer_norm_fn,
    mamba_chunk_scan_combined,
    ops,
    rms_norm_fn,
    rmsnorm_fn,
    selective_scan_fn,
    selective_state_update,
)

F64 = torch.float64
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


@pytest.fixture
def gen(rng):
    """A torch generator seeded from the test's rng fixture (reproducible, different per test)."""
    return torch.Generator().manual_seed(int(rng.integers(2**31)))


def randn(gen, *shape, dtype=F64, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype)
    return t.requires_grad_(grad)


def negative(gen, *shape, dtype=F64, grad=False):
    """Decay rates in [-1.5, -0.1]: a stable recurrence."""
    t = (-0.1 - 1.4 * torch.rand(*shape, generator=gen, dtype=F64)).to(dtype)
    return t.requires_grad_(grad)


def assert_close(actual, expected, dtype="float64", name=""):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def grads_of(fn, inputs, upstream):
    """Gradients of sum(out_i * upstream_i) w.r.t. the inputs that require grad (None elsewhere)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((out * up).sum() for out, up in zip(outs, upstream))
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad(loss, wanted))
    return outs, [next(grads) if isinstance(t, torch.Tensor) and t.requires_grad else None for t in inputs]


def check_against(fn, ref, inputs, names, gen, dtype="float64"):
    """fn and ref agree on outputs and on the gradients of every input that requires grad."""
    probe = fn(*inputs)
    probe = probe if isinstance(probe, tuple) else (probe,)
    upstream = [randn(gen, *o.shape, dtype=o.dtype) for o in probe]
    outs, grads = grads_of(fn, inputs, upstream)
    ref_outs, ref_grads = grads_of(ref, inputs, upstream)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        assert o.dtype == r.dtype, f"output {i}: dtype {o.dtype} != {r.dtype}"
        assert_close(o, r, dtype, name=f"output {i}")
    for name, g, r in zip(names, grads, ref_grads):
        if r is not None:
            assert g is not None and g.dtype == r.dtype, f"d{name}: {None if g is None else g.dtype} != {r.dtype}"
            assert_close(g, r, dtype, name=f"d{name}")


# --- plain torch references -------------------------------------------------------------------------


def ref_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None):
    batch, dim, length = u.shape
    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = F.softplus(dt)

    def per_channel(X):  # -> (B, D, N, L)
        if X.dim() == 2:
            return X[None, :, :, None].expand(batch, dim, X.shape[1], length)
        if X.dim() == 3:
            return X[:, None].expand(batch, dim, *X.shape[1:])
        return X.repeat_interleave(dim // X.shape[1], dim=1)

    Bx, Cx = per_channel(B), per_channel(C)
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


def ref_causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None):
    batch, dim, length = x.shape
    width = weight.shape[1]
    init = torch.zeros(batch, dim, width - 1, dtype=x.dtype) if initial_states is None else initial_states
    padded = torch.cat([init, x], -1)
    windows = padded.unfold(-1, width, 1)  # (B, D, L, W)
    if seq_idx is not None:
        seq = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], -1).unfold(-1, width, 1)
        same = (seq == seq[..., -1:]).to(x.dtype)  # (B, L, W): taps inside the sequence of position t
        windows = windows * same[:, None]
    out = (windows * weight[:, None, :]).sum(-1)
    if bias is not None:
        out = out + bias[:, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    if seq_idx is not None:
        out = out * (seq_idx >= 0)[:, None].to(x.dtype)
    return (out, padded[..., length:]) if return_final_states else out


def ref_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=False,
            dt_limit=(0.0, float("inf"))):
    batch, length, heads, headdim = x.shape
    dt = dt if dt_bias is None else dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, float("inf")):
        dt = dt.clamp(*dt_limit)
    Bh = B.repeat_interleave(heads // B.shape[2], dim=2)
    Ch = C.repeat_interleave(heads // C.shape[2], dim=2)
    h = x.new_zeros(batch, heads, headdim, B.shape[-1]) if initial_states is None else initial_states
    ys = []
    for t in range(length):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = (h * Ch[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + (D[:, None] if D.dim() == 1 else D) * x[:, t]
        ys.append(y)
    out = torch.stack(ys, 1)
    if z is not None:
        out = out * F.silu(z)
    return out, h


def ref_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=False, is_rms_norm=False):
    s = x if residual is None else x + residual
    centered = s if is_rms_norm else s - s.mean(-1, keepdim=True)
    y = centered * torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight
    y = y if bias is None else y + bias
    return (y, s) if prenorm else y


def ref_gated(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    group_size = x.shape[-1] if group_size is None else group_size
    if z is not None and not norm_before_gate:
        x = x * F.silu(z)
    groups = x.unflatten(-1, (-1, group_size))
    y = (groups * torch.rsqrt((groups * groups).mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    if bias is not None:
        y = y + bias
    if z is not None and norm_before_gate:
        y = y * F.silu(z)
    return y


# --- inputs -------------------------------------------------------------------------------------------


def scan_inputs(gen, batch=2, dim=4, length=9, N=3, B_kind="BNL", C_kind="BGNL", options=True, dtype=F64,
                grad=True):
    param = F64 if dtype == F64 else torch.float32
    shapes = {"DN": (dim, N), "BNL": (batch, N, length), "BGNL": (batch, 2, N, length)}
    kind_dtype = {"DN": param, "BNL": dtype, "BGNL": dtype}
    return [
        randn(gen, batch, dim, length, dtype=dtype, grad=grad),
        randn(gen, batch, dim, length, dtype=dtype, scale=0.5, grad=grad),
        negative(gen, dim, N, dtype=param, grad=grad),
        randn(gen, *shapes[B_kind], dtype=kind_dtype[B_kind], grad=grad),
        randn(gen, *shapes[C_kind], dtype=kind_dtype[C_kind], grad=grad),
        randn(gen, dim, dtype=param, grad=grad) if options else None,
        randn(gen, batch, dim, length, dtype=dtype, grad=grad) if options else None,
        randn(gen, dim, dtype=param, scale=0.5, grad=grad) if options else None,
    ]


def ssd_inputs(gen, batch=2, length=11, heads=4, headdim=3, groups=2, N=5, options=True, dtype=F64, grad=True):
    param = F64 if dtype == F64 else torch.float32
    return [
        randn(gen, batch, length, heads, headdim, dtype=dtype, grad=grad),
        randn(gen, batch, length, heads, dtype=dtype, scale=0.5, grad=grad),
        negative(gen, heads, dtype=param, grad=grad),
        randn(gen, batch, length, groups, N, dtype=dtype, grad=grad),
        randn(gen, batch, length, groups, N, dtype=dtype, grad=grad),
        randn(gen, heads, headdim, dtype=param, grad=grad) if options else None,
        randn(gen, batch, length, heads, headdim, dtype=dtype, grad=grad) if options else None,
        randn(gen, heads, dtype=param, scale=0.5, grad=grad) if options else None,
    ]


# --- the bridge ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_bridge_round_trip_is_zero_copy_and_bit_exact(gen, dtype):
    t = randn(gen, 3, 5, dtype=TORCH_DTYPES[dtype])[:, 1:4]  # a strided view
    a = _bridge.to_array("t", t)
    assert a.dtype.name == dtype and a.shape == (3, 3)
    assert a.__array_interface__["data"][0] == t.data_ptr()  # same memory, no copy
    back = _bridge.to_tensor(np.ascontiguousarray(a))
    assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.contiguous().view(torch.uint8))
    a[0, 0] = 7  # writes land in the tensor (the in-place decode ops rely on it)
    assert t[0, 0].item() == 7


def test_fresh_outputs_never_alias_inputs_or_each_other(gen):
    x = randn(gen, 4, 3)
    view = _bridge.to_array("x", x)
    other = np.ones(5)
    out = _bridge.fresh_outputs((view[1:], other, other, None), (x,), x.device)
    assert torch.equal(out[0], x[1:]) and out[0].data_ptr() != x[1:].data_ptr()
    assert out[1].data_ptr() == other.__array_interface__["data"][0]  # kept: owns its memory
    assert out[2].data_ptr() != out[1].data_ptr() and torch.equal(out[1], out[2])
    assert out[3].shape == (0,)


def test_cuda_view_geometry_without_a_gpu():
    """The CuPy view of a CUDA tensor: pointer, shape, dtype and byte strides of the tensor (no launch)."""
    cupy = pytest.importorskip("cupy")
    for base, strides in ((torch.zeros(2, 6, dtype=torch.bfloat16)[:, 1:5], (12, 2)),
                          (torch.zeros(3, 5, dtype=torch.float32), (20, 4))):

        class FakeCudaTensor:  # the attributes _cupy_view reads, from a real (CPU) tensor
            device = torch.device("cuda", 0)
            dtype, shape = base.dtype, base.shape
            data_ptr, stride, element_size, numel = base.data_ptr, base.stride, base.element_size, base.numel
            is_contiguous = base.is_contiguous

            @staticmethod
            def get_device():
                return 0

        view = _bridge._cupy_view("x", FakeCudaTensor())
        assert isinstance(view, cupy.ndarray) and view.dtype == _bridge._NP_DTYPES[base.dtype]
        assert view.shape == tuple(base.shape) and view.strides == strides and view.data.ptr == base.data_ptr()


def test_every_export_resolves():
    import ssmcore.adapters.torch as adapter

    missing = [name for name in adapter.__all__ if getattr(adapter, name, None) is None]
    assert not missing
    assert set(ops.__dict__) >= {"selective_scan_fwd", "ssd_bwd", "causal_conv1d_update", "gated_rms_norm_fwd"}


# --- opcheck: schema, fake tensors, autograd registration, AOT dispatch -----------------------------------

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


@pytest.mark.parametrize("B_kind,C_kind,options", [("BNL", "BGNL", True), ("DN", "BNL", False)])
def test_opcheck_selective_scan(gen, B_kind, C_kind, options):
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(gen, B_kind=B_kind, C_kind=C_kind, options=options,
                                                      dtype=torch.float32)
    initial = randn(gen, 2, 4, 3, dtype=torch.float32, grad=True) if options else None
    opcheck(ops.selective_scan_fwd, (u, delta, A, B, C, D, z, delta_bias, initial, options))
    dout, dlast = randn(gen, *u.shape, dtype=torch.float32), randn(gen, 2, 4, 3, dtype=torch.float32)
    detached = [None if t is None else t.detach() for t in (u, delta, A, B, C, D, z, delta_bias, initial)]
    opcheck(ops.selective_scan_bwd, (dout, *detached, dlast if options else None, options))


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_causal_conv1d(gen, options):
    f32 = torch.float32
    x, weight = randn(gen, 2, 5, 7, dtype=f32, grad=True), randn(gen, 5, 4, dtype=f32, grad=True)
    bias = randn(gen, 5, dtype=f32, grad=True) if options else None
    initial = randn(gen, 2, 5, 3, dtype=f32, grad=True) if options else None
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.int32) if options else None
    act = "silu" if options else None
    opcheck(ops.causal_conv1d_fwd, (x, weight, bias, seq_idx, initial, act, options))
    dfinal = randn(gen, 2, 5, 3, dtype=f32) if options else None
    detached = [None if t is None else t.detach() for t in (x, weight, bias, seq_idx, initial)]
    opcheck(ops.causal_conv1d_bwd, (randn(gen, 2, 5, 7, dtype=f32), *detached, dfinal, act))


def test_opcheck_decode_ops(gen):
    f32 = torch.float32
    conv_state, weight = randn(gen, 3, 4, 5, dtype=f32), randn(gen, 4, 4, dtype=f32)
    indices = torch.tensor([2, -1], dtype=torch.int32)
    opcheck(ops.causal_conv1d_update, (randn(gen, 2, 4, dtype=f32), conv_state, weight, None, "silu", None, indices))
    opcheck(ops.causal_conv1d_update, (randn(gen, 3, 4, 2, dtype=f32), conv_state, weight, randn(gen, 4, dtype=f32),
                                       None, torch.tensor([0, 3, 9], dtype=torch.int32), None))
    state = randn(gen, 2, 4, 3, 5, dtype=f32)
    x, dt = randn(gen, 2, 4, 3, dtype=f32), randn(gen, 2, 4, 3, dtype=f32)
    A = negative(gen, 4, dtype=f32)[:, None, None].expand(4, 3, 5)  # a stride-0 per-head A
    B, C = randn(gen, 2, 2, 5, dtype=f32), randn(gen, 2, 2, 5, dtype=f32)
    opcheck(ops.selective_state_update, (state, x, dt, A, B, C, randn(gen, 4, 3, dtype=f32), randn(gen, 2, 4, 3, dtype=f32),
                                         randn(gen, 4, 3, dtype=f32), True, None))


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_ssd(gen, options):
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(gen, options=options, dtype=torch.float32)
    initial = randn(gen, 2, 4, 3, 5, dtype=torch.float32, grad=True) if options else None
    seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 11], dtype=torch.int32) if options else None
    opcheck(ops.ssd_fwd, (x, dt, A, B, C, 4, D, z, dt_bias, initial, seq_idx, None, options, 0.0, float("inf"), False))
    detached = [None if t is None else t.detach() for t in (x, dt, A, B, C)]
    rest = [None if t is None else t.detach() for t in (D, z, dt_bias, initial)]
    dfinal = randn(gen, 2, 4, 3, 5, dtype=torch.float32) if options else None
    opcheck(ops.ssd_bwd, (randn(gen, *x.shape, dtype=torch.float32), *detached, 4, *rest, seq_idx, None, dfinal,
                          options, 0.0, float("inf")))


def test_opcheck_ssd_varlen_states(gen):
    x, dt, A, B, C, *_ = ssd_inputs(gen, batch=1, options=False, dtype=torch.float32)
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    seq_idx = torch.tensor([[0] * 4 + [1] * 7], dtype=torch.int32)
    opcheck(ops.ssd_fwd, (x, dt, A, B, C, 8, None, None, None, None, seq_idx, cu_seqlens, True, 0.0, float("inf"),
                          True))


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("options", [True, False])
def test_opcheck_norms(gen, kind, options):
    f32 = torch.float32
    fwd, bwd = getattr(ops, f"{kind}_fwd"), getattr(ops, f"{kind}_bwd")
    x, weight = randn(gen, 2, 3, 8, dtype=f32, grad=True), randn(gen, 8, dtype=f32, grad=True)
    bias = randn(gen, 8, dtype=f32, grad=True) if options else None
    residual = randn(gen, 2, 3, 8, dtype=torch.bfloat16, grad=True) if options else None
    opcheck(fwd, (x, weight, bias, residual, 1e-5, options, options))
    detached = [None if t is None else t.detach() for t in (x, weight, bias, residual)]
    dres = randn(gen, 2, 3, 8, dtype=f32) if options else None
    opcheck(bwd, (randn(gen, 2, 3, 8, dtype=f32), *detached, 1e-5, dres))


@pytest.mark.parametrize("options", [True, False])
def test_opcheck_gated_rms_norm(gen, options):
    f32 = torch.float32
    x, weight = randn(gen, 3, 8, dtype=f32, grad=True), randn(gen, 8, dtype=f32, grad=True)
    z = randn(gen, 3, 8, dtype=f32, grad=True) if options else None
    group_size = 4 if options else None
    opcheck(ops.gated_rms_norm_fwd, (x, weight, z, 1e-5, group_size, not options))
    detached = [None if t is None else t.detach() for t in (x, weight, z)]
    opcheck(ops.gated_rms_norm_bwd, (randn(gen, 3, 8, dtype=f32), *detached, 1e-5, group_size, not options))


# --- drop-in functions vs plain torch, float64, gradients included ------------------------------------------


@pytest.mark.parametrize("B_kind,C_kind", [("DN", "DN"), ("BNL", "BNL"), ("BGNL", "DN"), ("BNL", "BGNL")])
@pytest.mark.parametrize("options", [True, False])
def test_selective_scan_fn_matches_torch(gen, B_kind, C_kind, options):
    inputs = scan_inputs(gen, B_kind=B_kind, C_kind=C_kind, options=options)
    initial = randn(gen, 2, 4, 3, grad=True) if options else None
    args = (*inputs, options, True, initial)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus", "return_last_state",
             "initial_state")
    check_against(selective_scan_fn, ref_selective_scan, args, names, gen)


def test_selective_scan_fn_return_convention(gen):
    inputs = scan_inputs(gen, options=False, grad=False)
    out = selective_scan_fn(*inputs)
    assert isinstance(out, torch.Tensor) and out.shape == inputs[0].shape
    out2, last = selective_scan_fn(*inputs, return_last_state=True)
    assert torch.equal(out, out2) and last.shape == (2, 4, 3)


@pytest.mark.parametrize("options", [True, False])
@pytest.mark.parametrize("channel_last", [True, False])
def test_causal_conv1d_fn_matches_torch(gen, options, channel_last):
    x = randn(gen, 2, 13, 5).transpose(1, 2) if channel_last else randn(gen, 2, 5, 13)
    x.requires_grad_(True)
    weight, bias = randn(gen, 5, 4, grad=True), (randn(gen, 5, grad=True) if options else None)
    initial = randn(gen, 2, 5, 3, grad=True) if options else None
    args = (x, weight, bias, None, initial, True, None, "silu" if options else None)
    names = ("x", "weight", "bias", "seq_idx", "initial_states")
    check_against(causal_conv1d_fn, ref_causal_conv1d, args, names, gen)
    out = causal_conv1d_fn(x, weight, bias)
    assert out.stride() == x.stride()  # the output keeps x's layout


def test_causal_conv1d_fn_seq_idx_matches_torch(gen):
    x, weight, bias = randn(gen, 2, 3, 10, grad=True), randn(gen, 3, 3, grad=True), randn(gen, 3, grad=True)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [-1, -1, 0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.int32)
    args = (x, weight, bias, seq_idx, None, False, None, "swish")
    check_against(causal_conv1d_fn, ref_causal_conv1d, args, ("x", "weight", "bias"), gen)


def test_causal_conv1d_fn_writes_final_states_out(gen):
    x, weight = randn(gen, 2, 5, 6), randn(gen, 5, 3)
    final_states_out = torch.zeros(2, 5, 2, dtype=F64)
    out, final = causal_conv1d_fn(x, weight, return_final_states=True, final_states_out=final_states_out)
    assert final is final_states_out and torch.equal(final, x[..., -2:])
    assert isinstance(causal_conv1d_fn(x, weight), torch.Tensor)


@pytest.mark.parametrize("options", [True, False])
def test_mamba_chunk_scan_combined_matches_torch(gen, options):
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(gen, options=options)
    if not options:
        D = randn(gen, 4, grad=True)  # the (H,) form
    initial = randn(gen, 2, 4, 3, 5, grad=True) if options else None
    seq_idx = torch.tensor([[0] * 4 + [1] * 7, [0] * 11], dtype=torch.int32) if options else None
    dt_limit = (0.05, 2.0) if options else (0.0, float("inf"))

    def fn(x, dt, A, B, C, D, z, dt_bias, initial):
        return mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, z=z, dt_bias=dt_bias, initial_states=initial,
                                         seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
                                         return_final_states=True)

    def ref(x, dt, A, B, C, D, z, dt_bias, initial):
        return ref_ssd(x, dt, A, B, C, D, z, dt_bias, initial, seq_idx, dt_softplus=True, dt_limit=dt_limit)

    args = (x, dt, A, B, C, D, z, dt_bias, initial)
    check_against(fn, ref, args, ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"), gen)


def test_mamba_chunk_scan_combined_return_conventions(gen):
    x, dt, A, B, C, *_ = ssd_inputs(gen, batch=1, options=False, grad=False)
    cu_seqlens = torch.tensor([0, 4, 11], dtype=torch.int32)
    seq_idx = torch.tensor([[0] * 4 + [1] * 7], dtype=torch.int32)
    out = mamba_chunk_scan_combined(x, dt, A, B, C, 8, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    assert isinstance(out, torch.Tensor)
    out2, varlen = mamba_chunk_scan_combined(x, dt, A, B, C, 8, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                             return_varlen_states=True)
    out3, final, varlen3 = mamba_chunk_scan_combined(x, dt, A, B, C, 8, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                                     return_final_states=True, return_varlen_states=True)
    ref_out, ref_final = ref_ssd(x, dt, A, B, C, seq_idx=seq_idx)
    _, ref_first = ref_ssd(x[:, :4], dt[:, :4], A, B[:, :4], C[:, :4])
    for got, want in ((out, ref_out), (out2, ref_out), (out3, ref_out), (final, ref_final)):
        assert_close(got, want)
    assert varlen.shape == (2, 4, 3, 5) and torch.equal(varlen, varlen3)
    assert_close(varlen[0], ref_first[0])
    assert_close(varlen[1], ref_final[0])


@pytest.mark.parametrize("is_rms_norm", [True, False])
@pytest.mark.parametrize("prenorm,with_residual,with_bias", [(True, True, True), (False, False, True),
                                                             (True, False, False), (False, True, False)])
def test_layer_norm_fn_matches_torch(gen, is_rms_norm, prenorm, with_residual, with_bias):
    x, weight = randn(gen, 2, 3, 16, grad=True), randn(gen, 16, grad=True)
    bias = randn(gen, 16, grad=True) if with_bias else None
    residual = randn(gen, 2, 3, 16, grad=True) if with_residual else None

    def fn(x, weight, bias, residual):
        if is_rms_norm:
            return rms_norm_fn(x, weight, bias, residual=residual, prenorm=prenorm, eps=1e-5)
        return layer_norm_fn(x, weight, bias, residual=residual, prenorm=prenorm, eps=1e-5)

    def ref(x, weight, bias, residual):
        return ref_norm(x, weight, bias, residual, 1e-5, prenorm, is_rms_norm)

    check_against(fn, ref, (x, weight, bias, residual), ("x", "weight", "bias", "residual"), gen)


def test_norm_fn_residual_dtypes_follow_the_reference(gen):
    x, weight = randn(gen, 3, 8, dtype=torch.bfloat16), randn(gen, 8, dtype=torch.float32)
    _, s = rms_norm_fn(x, weight, None, prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.float32  # no residual: residual_in_fp32 decides
    _, s = rms_norm_fn(x, weight, None, residual=x.clone(), prenorm=True, residual_in_fp32=True)
    assert s.dtype == torch.bfloat16  # an explicit residual keeps its dtype
    y, s = layer_norm_fn(x, weight, None, prenorm=True)
    assert y.dtype == s.dtype == torch.bfloat16 and torch.equal(s, x) and s.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("with_z,with_bias,group_size", [(True, False, 4), (True, True, None), (False, True, 8),
                                                        (False, False, None)])
def test_rmsnorm_fn_gated_matches_torch(gen, norm_before_gate, with_z, with_bias, group_size):
    x, weight = randn(gen, 2, 3, 16, grad=True), randn(gen, 16, grad=True)
    bias = randn(gen, 16, grad=True) if with_bias else None
    z = randn(gen, 2, 3, 16, grad=True) if with_z else None

    def fn(x, weight, bias, z):
        return rmsnorm_fn(x, weight, bias, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)

    def ref(x, weight, bias, z):
        return ref_gated(x, weight, bias, z, 1e-5, group_size, norm_before_gate)

    check_against(fn, ref, (x, weight, bias, z), ("x", "weight", "bias", "z"), gen)


# --- decode ops: in place, vs plain torch ----------------------------------------------------------------------


def test_selective_state_update_matches_torch_in_place(gen):
    state = randn(gen, 3, 4, 2, 5)
    x, dt, z = randn(gen, 2, 4, 2), randn(gen, 2, 4, 2), randn(gen, 2, 4, 2)
    A = negative(gen, 4, 2, 5)
    B, C, D, dt_bias = randn(gen, 2, 2, 5), randn(gen, 2, 2, 5), randn(gen, 4, 2), randn(gen, 4, 2)
    indices = torch.tensor([2, 0], dtype=torch.int32)
    expected_state = state.clone()
    rows = expected_state[indices.long()]
    step = F.softplus(dt + dt_bias)[..., None]
    Bh, Ch = B.repeat_interleave(2, dim=1)[:, :, None], C.repeat_interleave(2, dim=1)[:, :, None]
    rows = torch.exp(step * A) * rows + step * Bh * x[..., None]
    expected_state[indices.long()] = rows
    expected = ((rows * Ch).sum(-1) + D * x) * F.silu(z)
    out = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                 state_batch_indices=indices)
    assert_close(out, expected, name="out")
    assert_close(state, expected_state, name="state")  # row 1 untouched, rows 0 and 2 stepped


def test_causal_conv1d_update_matches_torch_in_place(gen):
    conv_state, weight, bias = randn(gen, 2, 3, 4), randn(gen, 3, 4), randn(gen, 3)
    x = randn(gen, 2, 3)
    window = torch.cat([conv_state, x[..., None]], -1)
    expected = F.silu((window[..., -4:] * weight).sum(-1) + bias)
    expected_state = window[..., 1:].clone()
    out = causal_conv1d_update(x, conv_state, weight, bias, "silu")
    assert out.shape == x.shape
    assert_close(out, expected, name="out")
    assert torch.equal(conv_state, expected_state)


# --- low-precision tensors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_round_trip(gen, dtype):
    """Each drop-in on bf16/fp16 activations: outputs and gradients in that dtype, and equal (up to the
    final rounding) to the same call on the float32 upcast of the same values."""
    u, delta, A, B, C, D, z, delta_bias = scan_inputs(gen, grad=False)
    xs, dt, As, Bs, Cs, *_ = ssd_inputs(gen, options=False, grad=False)
    w_conv, w_norm = randn(gen, 5, 4, dtype=torch.float32), randn(gen, 16, dtype=torch.float32)
    low = {"u": u, "delta": delta, "B": B, "C": C, "z": z, "xs": xs, "dt": dt, "Bs": Bs, "Cs": Cs,
           "x_conv": randn(gen, 2, 5, 9), "x_norm": randn(gen, 2, 16)}
    low = {name: t.to(TORCH_DTYPES[dtype]) for name, t in low.items()}
    A, D, delta_bias, As = A.float(), D.float(), delta_bias.float(), As.float()

    def run(a):
        outs = (
            selective_scan_fn(a["u"], a["delta"], A, a["B"], a["C"], D, a["z"], delta_bias, True),
            causal_conv1d_fn(a["x_conv"], w_conv, activation="silu"),
            mamba_chunk_scan_combined(a["xs"], a["dt"], As, a["Bs"], a["Cs"], 4, dt_softplus=True),
            rms_norm_fn(a["x_norm"], w_norm, None),
            rmsnorm_fn(a["x_norm"], w_norm, None, z=a["x_norm"], group_size=8),
        )
        grads = torch.autograd.grad(sum((o.float() * o.float()).sum() for o in outs), list(a.values()))
        return outs, grads

    got_outs, got_grads = run({name: t.clone().requires_grad_(True) for name, t in low.items()})
    ref_outs, ref_grads = run({name: t.float().requires_grad_(True) for name, t in low.items()})
    for i, (got, ref) in enumerate(zip(got_outs, ref_outs)):
        assert got.dtype == TORCH_DTYPES[dtype], f"output {i}: dtype {got.dtype}"
        assert_close(got, ref, dtype, name=f"output {i}")
    for name, got, ref in zip(low, got_grads, ref_grads):
        assert got.dtype == TORCH_DTYPES[dtype], f"d{name}: dtype {got.dtype}"
        error = (got.double() - ref.double()).norm() / ref.double().norm()
        assert error < 10 * TOL[dtype][0], f"d{name}: relative error {error:.3g}"


# --- torch.compile -----------------------------------------------------------------------------------------------------


def mamba_like(x, conv_weight, conv_bias, delta, A, B, C, D):
    xc = causal_conv1d_fn(x, conv_weight, conv_bias, activation="silu")
    y, last = selective_scan_fn(xc, delta, A, B, C, D, z=x, delta_softplus=True, return_last_state=True)
    return y * 2.0, last


@pytest.mark.parametrize("backend", [
    "aot_eager",
    # Inductor adds ~80 s of cold C++ compilation on 2 cores; run it with `pytest -m slow`.
    pytest.param("inductor", marks=pytest.mark.slow),
])
def test_compile_fullgraph_matches_eager(request, gen, backend):
    if backend == "inductor" and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("inductor compiles C++ for ~80 s cold; select it with -m slow")
    torch._dynamo.reset()
    x = randn(gen, 2, 4, 9, dtype=torch.float32, grad=True)
    args = (x, randn(gen, 4, 3, dtype=torch.float32, grad=True), randn(gen, 4, dtype=torch.float32, grad=True),
            *scan_inputs(gen, dtype=torch.float32)[1:6])
    compiled = torch.compile(mamba_like, fullgraph=True, backend=backend)
    upstream = [randn(gen, 2, 4, 9, dtype=torch.float32), randn(gen, 2, 4, 3, dtype=torch.float32)]
    outs, grads = grads_of(compiled, args, upstream)
    ref_outs, ref_grads = grads_of(mamba_like, args, upstream)
    for got, want in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def mamba2_like(x, dt, A, B, C, D, z, norm_weight, residual, dt_bias):
    y, final = mamba_chunk_scan_combined(x, dt, A, B, C, 4, D=D, dt_bias=dt_bias, dt_softplus=True,
                                         return_final_states=True)
    y = rmsnorm_fn(y.flatten(-2), norm_weight, None, z=z.flatten(-2), group_size=6)
    hidden, residual = rms_norm_fn(y, norm_weight, None, residual=residual, prenorm=True, residual_in_fp32=True)
    return hidden, residual, final


def test_compile_fullgraph_ssd_and_norms_match_eager(gen):
    torch._dynamo.reset()
    x, dt, A, B, C, D, z, dt_bias = ssd_inputs(gen, dtype=torch.float32)
    args = (x, dt, A, B, C, D, z, randn(gen, 12, dtype=torch.float32, grad=True),
            randn(gen, 2, 11, 12, dtype=torch.float32, grad=True), dt_bias)
    compiled = torch.compile(mamba2_like, fullgraph=True, backend="aot_eager")
    upstream = [randn(gen, 2, 11, 12, dtype=torch.float32), randn(gen, 2, 11, 12, dtype=torch.float32),
                randn(gen, 2, 4, 3, 5, dtype=torch.float32)]
    outs, grads = grads_of(compiled, args, upstream)
    ref_outs, ref_grads = grads_of(mamba2_like, args, upstream)
    for got, want in zip((*outs, *grads), (*ref_outs, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --- errors from the core reach the caller, naming the argument ----------------------------------------------------------


def test_errors_name_the_argument(gen):
    u, delta, A, B, C, *_ = scan_inputs(gen, options=False, grad=False)
    with pytest.raises(ValueError, match=r"^delta:"):
        selective_scan_fn(u, delta[:, :, :-1], A, B, C)
    with pytest.raises(TypeError, match=r"^A:"):
        selective_scan_fn(u, delta, A.half(), B, C)
    with pytest.raises(TypeError, match=r"^delta:"):
        selective_scan_fn(u, delta.numpy(), A, B, C)
    x, weight = randn(gen, 2, 5, 6), randn(gen, 5, 3)
    with pytest.raises(ValueError, match=r"^activation:"):
        causal_conv1d_fn(x, weight, activation="relu")
    with pytest.raises(ValueError, match=r"^weight:"):
        causal_conv1d_fn(x, weight[:4])
    xs, dt, As, Bs, Cs, *_ = ssd_inputs(gen, options=False, grad=False)
    with pytest.raises(ValueError, match=r"^chunk_size:"):
        mamba_chunk_scan_combined(xs, dt, As, Bs, Cs, 0)
    with pytest.raises(TypeError, match=r"^dt_limit:"):
        mamba_chunk_scan_combined(xs, dt, As, Bs, Cs, 4, dt_limit=(0.0, "big"))
    with pytest.raises(ValueError, match=r"^cu_seqlens:"):
        mamba_chunk_scan_combined(xs, dt, As, Bs, Cs, 4, return_varlen_states=True)
    with pytest.raises(ValueError, match=r"^dropout_p:"):
        rms_norm_fn(x, torch.ones(6, dtype=F64), None, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"^eps:"):
        layer_norm_fn(x, torch.ones(6, dtype=F64), None, eps=-1.0)
    with pytest.raises(ValueError, match=r"^group_size:"):
        rmsnorm_fn(x, torch.ones(6, dtype=F64), None, group_size=4)
    state = randn(gen, 2, 4, 3)
    with pytest.raises(ValueError, match=r"^state_batch_indices:"):
        selective_state_update(state, randn(gen, 2, 4), randn(gen, 2, 4), negative(gen, 4, 3), randn(gen, 2, 3),
                               randn(gen, 2, 3), state_batch_indices=torch.tensor([0, 5], dtype=torch.int32))
    before = state.clone()
    with pytest.raises(ValueError, match=r"^x:"):
        selective_state_update(state, randn(gen, 2, 5), randn(gen, 2, 4), negative(gen, 4, 3), randn(gen, 2, 3),
                               randn(gen, 2, 3))
    assert torch.equal(state, before)  # nothing written on error
