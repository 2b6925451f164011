"""The torch adapter's nn.Modules and language model against plain-torch references written here.

Each reference below is a direct transcription of the model's math (a sequential scan over time,
explicit attention, explicit norms) on the parameters by their reference-package names, so it
checks names and shapes as well as numbers. Most comparisons run in float64, where the modules
must agree to ~1e-9; gradients come from torch autograd through the reference.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ssmcore.adapters.torch.fused import mamba_inner_fn
from ssmcore.adapters.torch.inference import InferenceParams
from ssmcore.adapters.torch.models import MambaConfig, MambaLMHeadModel
from ssmcore.adapters.torch.modules import (
    MHA,
    Block,
    GatedMLP,
    Mamba,
    Mamba2,
    Mamba2Simple,
    RMSNorm,
    RMSNormGated,
)

F64 = dict(rtol=1e-8, atol=1e-9)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_f64(module: nn.Module, scale=0.5):
    """The module in float64 (A_log and D included) with random values in every parameter
    (the initialisation leaves some at exactly 0 or 1, which hides errors)."""
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.rand_like(p) * 1.5 - 1.0)
            elif name.endswith(("dt_bias", "dt_proj.bias")):
                p.copy_(torch.randn_like(p) - 1.0)
            else:
                p.copy_(torch.randn_like(p) * scale)
    return module


def assert_grads_match(module, ref_params, **tol):
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(p.grad, ref_params[name].grad, **tol, msg=lambda m: f"grad of {name}: {m}")


def detached_params(module):
    return {k: v.detach().clone().requires_grad_(True) for k, v in module.named_parameters()}


# ------------------------------------------------------------------------------------ references


def ref_rms(x, weight, eps, groups=1):
    """RMSNorm with statistics per group of channels."""
    shape = x.shape
    xg = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)
    return xg.reshape(shape) * weight


def ref_causal_conv(x, weight, bias, initial=None):
    """x (B, L, C); weight (C, 1, W): out[t] = bias + sum_k w[k] * x[t - W + 1 + k] (zeros or initial before 0)."""
    width = weight.shape[-1]
    batch, length, channels = x.shape
    past = torch.zeros(batch, width - 1, channels, dtype=x.dtype) if initial is None else initial.transpose(1, 2)
    padded = torch.cat([past, x], dim=1)
    out = sum(weight[:, 0, k] * padded[:, k:k + length] for k in range(width))
    return out + bias if bias is not None else out


def ref_mamba(p, h, initial=None):
    """Mamba-1 mixer on parameters ``p`` (reference names); h (B, L, D). Returns (out, (conv_state, ssm_state))."""
    d_inner, d_state = p["A_log"].shape
    rank = p["dt_proj.weight"].shape[1]
    xz = F.linear(h, p["in_proj.weight"], p.get("in_proj.bias"))
    x_in, z = xz.chunk(2, dim=-1)
    conv_initial = None if initial is None else initial[0][:, :, 1:]
    x = F.silu(ref_causal_conv(x_in, p["conv1d.weight"], p.get("conv1d.bias"), conv_initial))
    dt, B, C = F.linear(x, p["x_proj.weight"]).split([rank, d_state, d_state], dim=-1)
    dt = F.softplus(F.linear(dt, p["dt_proj.weight"], p["dt_proj.bias"]))
    A = -torch.exp(p["A_log"])
    state = torch.zeros(h.shape[0], d_inner, d_state, dtype=h.dtype) if initial is None else initial[1]
    ys = []
    for t in range(h.shape[1]):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
        ys.append((state * C[:, t, None, :]).sum(-1) + p["D"] * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    history = x_in if initial is None else torch.cat([initial[0].transpose(1, 2), x_in], dim=1)
    conv_state = F.pad(history.transpose(1, 2), (p["conv1d.weight"].shape[-1] - history.shape[1], 0))
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias")), (conv_state, state)


def ref_ssd_scan(x, dt, A, B, C, D, initial=None):
    """Mamba-2 recurrence: x (B, L, H, P), dt (B, L, H) (already softplus'ed), B/C (B, L, G, N)."""
    batch, length, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)
    C = C.repeat_interleave(heads_per_group, dim=2)
    D = D.reshape(nheads, -1)
    state = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=x.dtype) if initial is None else initial
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + D * x[:, t])
    return torch.stack(ys, dim=1), state


def ref_mamba2(p, u, headdim, ngroups=1, rmsnorm=True, norm_before_gate=False, dt_limit=(0.0, math.inf),
               norm_groups=None, initial=None, dt_presoftplus=True):
    """Mamba-2 mixer on parameters ``p``; u (B, L, D). Returns (out, (conv_state, ssm_state))."""
    nheads = p["A_log"].shape[0]
    d_ssm = nheads * headdim
    conv_dim = p["conv1d.weight"].shape[0]
    d_state = (conv_dim - d_ssm) // (2 * ngroups)
    zxbcdt = F.linear(u, p["in_proj.weight"], p.get("in_proj.bias"))
    d_mlp = (zxbcdt.shape[-1] - 2 * d_ssm - 2 * ngroups * d_state - nheads) // 2
    z0, x0, z, xBC_in, dt = zxbcdt.split([d_mlp, d_mlp, d_ssm, conv_dim, nheads], dim=-1)
    conv_initial = None if initial is None else initial[0][:, :, 1:]
    xBC = F.silu(ref_causal_conv(xBC_in, p["conv1d.weight"], p.get("conv1d.bias"), conv_initial))
    x, B, C = xBC.split([d_ssm, ngroups * d_state, ngroups * d_state], dim=-1)
    batch, length = u.shape[:2]
    dt = F.softplus(dt + p["dt_bias"]).clamp(*dt_limit)
    y, state = ref_ssd_scan(x.reshape(batch, length, nheads, headdim), dt, -torch.exp(p["A_log"]),
                            B.reshape(batch, length, ngroups, d_state), C.reshape(batch, length, ngroups, d_state),
                            p["D"], None if initial is None else initial[1])
    y = y.reshape(batch, length, d_ssm)
    groups = ngroups if norm_groups is None else norm_groups
    if not rmsnorm:
        y = y * F.silu(z)
    elif norm_before_gate:
        y = ref_rms(y, p["norm.weight"], 1e-5, groups) * F.silu(z)
    else:
        y = ref_rms(y * F.silu(z), p["norm.weight"], 1e-5, groups)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    history = xBC_in if initial is None else torch.cat([initial[0].transpose(1, 2), xBC_in], dim=1)
    conv_state = F.pad(history.transpose(1, 2), (p["conv1d.weight"].shape[-1] - history.shape[1], 0))
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias")), (conv_state, state)


def ref_rotary(x, positions, dim, base, interleaved):
    """Rotary embedding as complex multiplication of channel pairs by exp(i * pos * base^(-2j/dim))."""
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rot = torch.polar(torch.ones_like(positions[..., None] * freqs), positions[..., None].double() * freqs)
    part = x[..., :dim].double()
    if interleaved:
        pairs = torch.view_as_complex(part.reshape(*part.shape[:-1], dim // 2, 2).contiguous())
    else:
        pairs = torch.complex(part[..., :dim // 2], part[..., dim // 2:])
    pairs = pairs * rot[:, :, None, :]
    if interleaved:
        out = torch.view_as_real(pairs).flatten(-2)
    else:
        out = torch.cat([pairs.real, pairs.imag], dim=-1)
    return torch.cat([out.to(x.dtype), x[..., dim:]], dim=-1)


def ref_mha(p, x, num_heads, num_heads_kv, head_dim, causal, rotary_dim=0, rotary_base=10000.0, interleaved=False,
            mlp_dim=0, softmax_scale=None):
    """Attention on parameters ``p`` with explicit softmax and repeated KV heads; x (B, L, D)."""
    batch, length, _ = x.shape
    qkv = F.linear(x, p["in_proj.weight"], p.get("in_proj.bias"))
    if mlp_dim:
        qkv, x_mlp = qkv.split([qkv.shape[-1] - mlp_dim, mlp_dim], dim=-1)
        up, gate = x_mlp.chunk(2, dim=-1)
        x_mlp = up * F.silu(gate)
    if "conv1d.weight" in p:
        qkv = ref_causal_conv(qkv, p["conv1d.weight"], p["conv1d.bias"])
    q, k, v = qkv.split([num_heads * head_dim, num_heads_kv * head_dim, num_heads_kv * head_dim], dim=-1)
    q = q.reshape(batch, length, num_heads, head_dim)
    k = k.reshape(batch, length, num_heads_kv, head_dim)
    v = v.reshape(batch, length, num_heads_kv, head_dim)
    if rotary_dim:
        positions = torch.arange(length, dtype=torch.float64)[None].expand(batch, -1)
        q = ref_rotary(q, positions, rotary_dim, rotary_base, interleaved)
        k = ref_rotary(k, positions, rotary_dim, rotary_base, interleaved)
    k = k.repeat_interleave(num_heads // num_heads_kv, dim=2)
    v = v.repeat_interleave(num_heads // num_heads_kv, dim=2)
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        scores = scores.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
    context = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v).reshape(batch, length, -1)
    if mlp_dim:
        context = torch.cat([context, x_mlp], dim=-1)
    return F.linear(context, p["out_proj.weight"], p.get("out_proj.bias"))


# ------------------------------------------------------------------------------------ norms, MLP


def test_rmsnorm_prenorm_residual_matches_reference():
    norm = random_f64(RMSNorm(12, eps=1e-5))
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    residual = torch.randn(2, 5, 12, dtype=torch.float64)
    y, s = norm(x, residual=residual, prenorm=True)
    torch.testing.assert_close(s, x + residual, **F64)
    torch.testing.assert_close(y, ref_rms(x + residual, norm.weight, 1e-5), **F64)
    torch.testing.assert_close(norm(x), ref_rms(x, norm.weight, 1e-5), **F64)
    assert norm.bias is None and [n for n, _ in norm.named_parameters()] == ["weight"]


def test_rmsnorm_gradients_match_reference():
    norm = random_f64(RMSNorm(12))
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 12, dtype=torch.float64)
    y, s = norm(x, residual=residual, prenorm=True)
    ((y * g).sum() + s.sum()).backward()
    x2, r2 = x.detach().requires_grad_(), residual.detach().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    s2 = x2 + r2
    ((ref_rms(s2, w2, 1e-5) * g).sum() + s2.sum()).backward()
    torch.testing.assert_close(x.grad, x2.grad, **F64)
    torch.testing.assert_close(residual.grad, r2.grad, **F64)
    torch.testing.assert_close(norm.weight.grad, w2.grad, **F64)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_rmsnorm_gated_matches_reference(norm_before_gate):
    norm = random_f64(RMSNormGated(12, eps=1e-5, group_size=4, norm_before_gate=norm_before_gate,
                                  dtype=torch.float64))
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 12, dtype=torch.float64)
    (norm(x, z) * g).sum().backward()
    x2, z2 = x.detach().requires_grad_(), z.detach().requires_grad_()
    w2 = norm.weight.detach().clone().requires_grad_()
    if norm_before_gate:
        y = ref_rms(x2, w2, 1e-5, groups=3) * F.silu(z2)
    else:
        y = ref_rms(x2 * F.silu(z2), w2, 1e-5, groups=3)
    (y * g).sum().backward()
    for got, want in ((x.grad, x2.grad), (z.grad, z2.grad), (norm.weight.grad, w2.grad)):
        torch.testing.assert_close(got, want, **F64)


def test_gated_mlp_shapes_and_values():
    mlp = GatedMLP(16, hidden_features=40, out_features=16, multiple_of=32, dtype=torch.float64)
    assert mlp.fc1.weight.shape == (128, 16) and mlp.fc2.weight.shape == (16, 64)
    assert mlp.fc1.bias is None and mlp.fc2.bias is None
    x = torch.randn(2, 16, dtype=torch.float64)
    h = x @ mlp.fc1.weight.t()
    want = (h[:, :64] * F.silu(h[:, 64:])) @ mlp.fc2.weight.t()
    torch.testing.assert_close(mlp(x), want, **F64)
    assert GatedMLP(48).fc1.weight.shape == (2 * 128, 48)  # int(8 * 48 / 3) = 128


# ------------------------------------------------------------------------------------ Mamba-1


def _check_mixer_against_reference(module, ref_fn, u, **tol):
    p_ref = detached_params(module)
    u_ref = u.detach().clone().requires_grad_(True)
    out = module(u)
    want, _ = ref_fn(p_ref, u_ref)
    torch.testing.assert_close(out, want, **tol)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(u.grad, u_ref.grad, **tol)
    assert_grads_match(module, p_ref, **tol)


@pytest.mark.parametrize("use_fast_path", [True, False], ids=["fused", "unfused"])
def test_mamba_matches_reference(use_fast_path):
    mamba = random_f64(Mamba(8, d_state=4, d_conv=3, expand=2, dt_rank=3, bias=True, use_fast_path=use_fast_path,
                            dtype=torch.float64))
    u = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    _check_mixer_against_reference(mamba, ref_mamba, u, **F64)


def test_mamba_parameters_have_reference_names_shapes_and_dtypes():
    mamba = Mamba(32, d_state=16, d_conv=4, expand=2, dtype=torch.bfloat16)
    shapes = {name: (tuple(p.shape), p.dtype) for name, p in mamba.named_parameters()}
    bf16, f32 = torch.bfloat16, torch.float32
    assert shapes == {
        "A_log": ((64, 16), f32), "D": ((64,), f32),
        "in_proj.weight": ((128, 32), bf16), "conv1d.weight": ((64, 1, 4), bf16), "conv1d.bias": ((64,), bf16),
        "x_proj.weight": ((2 + 32, 64), bf16), "dt_proj.weight": ((64, 2), bf16), "dt_proj.bias": ((64,), bf16),
        "out_proj.weight": ((32, 64), bf16),
    }


def test_mamba_initialisation_follows_reference():
    mamba = Mamba(32, d_state=8, dt_min=0.002, dt_max=0.05)
    torch.testing.assert_close(mamba.A_log, torch.log(torch.arange(1, 9.0)).repeat(64, 1))
    assert torch.equal(mamba.D, torch.ones(64))
    dt = F.softplus(mamba.dt_proj.bias.detach())
    assert 0.002 * 0.999 <= dt.min() and dt.max() <= 0.05 * 1.001
    bound = mamba.dt_rank ** -0.5
    assert mamba.dt_proj.weight.abs().max() <= bound and mamba.dt_proj.weight.std() > bound / 3
    assert mamba.A_log._no_weight_decay and mamba.D._no_weight_decay and mamba.dt_proj.bias._no_reinit


def test_mamba_inner_fn_checkpoint_levels_and_constant_B_C_agree():
    torch.manual_seed(1)
    d, n, rank, length = 6, 3, 2, 7
    xz = torch.randn(2, 2 * d, length, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(*s, dtype=torch.float64, requires_grad=True) * 0.5
               for s in [(d, 1, 4), (d,), (rank + 2 * n, d), (d, rank), (5, d), (5,)]]
    weights = [w.detach().requires_grad_() for w in weights]
    A = -torch.rand(d, n, dtype=torch.float64) - 0.5
    D = torch.randn(d, dtype=torch.float64)
    bias = torch.randn(d, dtype=torch.float64) - 1
    outs = []
    for lvl in (0, 1):
        out = mamba_inner_fn(xz, *weights, A, None, None, D, bias, checkpoint_lvl=lvl)
        grads = torch.autograd.grad(out.pow(2).sum(), [xz, *weights])
        outs.append((out, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], **F64)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, **F64)
    # Constant B, C and projection biases: compare with plain autograd through the reference math.
    B = torch.randn(d, n, dtype=torch.float64, requires_grad=True)
    C_bias = torch.randn(n, dtype=torch.float64, requires_grad=True)
    out = mamba_inner_fn(xz, *weights, A, B, None, D, bias, C_proj_bias=C_bias)
    got = torch.autograd.grad(out.pow(2).sum(), [xz, B, C_bias, weights[2]])
    xz2, B2, C_bias2, xw2 = (t.detach().requires_grad_() for t in (xz, B, C_bias, weights[2]))
    conv_w, conv_b, _, dt_w, out_w, out_b = weights
    x, z = xz2.transpose(1, 2).chunk(2, dim=-1)
    x = F.silu(ref_causal_conv(x, conv_w.detach(), conv_b.detach()))
    proj = F.linear(x, xw2)
    dt = F.softplus(F.linear(proj[..., :rank], dt_w.detach()) + bias)
    Cm = proj[..., rank + n:] + C_bias2
    state = torch.zeros(2, d, n, dtype=torch.float64)
    ys = []
    for t in range(length):
        state = torch.exp(dt[:, t, :, None] * A) * state + dt[:, t, :, None] * B2 * x[:, t, :, None]
        ys.append((state * Cm[:, t, None, :]).sum(-1) + D * x[:, t])
    want = F.linear(torch.stack(ys, 1) * F.silu(z), out_w.detach(), out_b.detach())
    torch.testing.assert_close(out, want, **F64)
    for a, b in zip(got, torch.autograd.grad(want.pow(2).sum(), [xz2, B2, C_bias2, xw2])):
        torch.testing.assert_close(a, b, **F64)


# ------------------------------------------------------------------------------------ Mamba-2

MAMBA2_CASES = {
    "default": dict(kwargs=dict(), ref=dict()),
    "groups_dhdim_nbg_mlp_limit": dict(
        kwargs=dict(ngroups=2, D_has_hdim=True, norm_before_gate=True, d_ssm=16, dt_limit=(0.05, 2.0), bias=True),
        ref=dict(ngroups=2, norm_before_gate=True, dt_limit=(0.05, 2.0))),
    "no_rmsnorm": dict(kwargs=dict(rmsnorm=False, ngroups=2), ref=dict(rmsnorm=False, ngroups=2)),
}


@pytest.mark.parametrize("use_mem_eff_path", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", list(MAMBA2_CASES))
def test_mamba2_matches_reference(case, use_mem_eff_path):
    spec = MAMBA2_CASES[case]
    mamba2 = random_f64(Mamba2(12, d_state=4, d_conv=3, headdim=4, chunk_size=4, use_mem_eff_path=use_mem_eff_path,
                              dtype=torch.float64, **spec["kwargs"]))
    u = torch.randn(2, 11, 12, dtype=torch.float64, requires_grad=True)

    def ref(p, x):
        return ref_mamba2(p, x, headdim=4, **spec["ref"])

    _check_mixer_against_reference(mamba2, ref, u, **F64)


def test_split_conv1d_scan_combined_final_states_and_no_out_proj():
    """The fused Mamba-2 function without out_proj and norm, returning final states with gradients."""
    from ssmcore.adapters.torch.fused import mamba_split_conv1d_scan_combined

    torch.manual_seed(2)
    batch, length, nheads, headdim, ngroups, dstate, d_mlp = 2, 9, 4, 3, 2, 2, 5
    dim = nheads * headdim
    conv_dim = dim + 2 * ngroups * dstate
    leaves = [torch.randn(batch, length, 2 * d_mlp + 2 * dim + 2 * ngroups * dstate + nheads, dtype=torch.float64),
              torch.randn(conv_dim, 4, dtype=torch.float64) * 0.5, torch.randn(conv_dim, dtype=torch.float64),
              torch.randn(nheads, dtype=torch.float64) - 1, -torch.rand(nheads, dtype=torch.float64) - 0.2,
              torch.randn(nheads, headdim, dtype=torch.float64),
              torch.randn(batch, nheads, headdim, dstate, dtype=torch.float64)]
    ours = [t.clone().requires_grad_() for t in leaves]
    zxbcdt, weight, bias, dt_bias, A, D, initial = ours
    out, final = mamba_split_conv1d_scan_combined(zxbcdt, weight, bias, dt_bias, A, D, 4, initial_states=initial,
                                                  return_final_states=True, ngroups=ngroups)
    g_out, g_final = torch.randn_like(out), torch.randn_like(final)
    ((out * g_out).sum() + (final * g_final).sum()).backward()

    refs = [t.clone().requires_grad_() for t in leaves]
    zxbcdt, weight, bias, dt_bias, A, D, initial = refs
    z0, x0, z, xBC, dt = zxbcdt.split([d_mlp, d_mlp, dim, conv_dim, nheads], dim=-1)
    xBC = F.silu(ref_causal_conv(xBC, weight[:, None], bias))
    x, B, C = xBC.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y, state = ref_ssd_scan(x.reshape(batch, length, nheads, headdim), F.softplus(dt + dt_bias), A,
                            B.reshape(batch, length, ngroups, dstate), C.reshape(batch, length, ngroups, dstate), D,
                            initial)
    want = torch.cat([F.silu(z0) * x0, y.reshape(batch, length, dim) * F.silu(z)], dim=-1)
    torch.testing.assert_close(out, want, **F64)
    torch.testing.assert_close(final, state, **F64)
    ((want * g_out).sum() + (state * g_final).sum()).backward()
    for got, ref in zip(ours, refs):
        torch.testing.assert_close(got.grad, ref.grad, **F64)


def test_mamba2_parameters_have_reference_names_shapes_and_dtypes():
    mamba2 = Mamba2(64, d_state=16, headdim=32, ngroups=2, dtype=torch.bfloat16)
    nheads, conv_dim = 4, 128 + 2 * 2 * 16
    shapes = {name: (tuple(p.shape), p.dtype) for name, p in mamba2.named_parameters()}
    bf16 = torch.bfloat16
    assert shapes == {
        "dt_bias": ((nheads,), bf16), "A_log": ((nheads,), bf16), "D": ((nheads,), torch.float32),
        "in_proj.weight": ((2 * 128 + 2 * 2 * 16 + nheads, 64), bf16),
        "conv1d.weight": ((conv_dim, 1, 4), bf16), "conv1d.bias": ((conv_dim,), bf16),
        "norm.weight": ((128,), bf16), "out_proj.weight": ((64, 128), bf16),
    }
    assert list(shapes) == ["dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias",
                            "norm.weight", "out_proj.weight"]
    assert mamba2.norm.group_size == 64 and mamba2.norm.norm_before_gate is False


def test_mamba2_initialisation_follows_reference():
    mamba2 = Mamba2(64, d_state=16, headdim=8, A_init_range=(2, 5), dt_min=0.01, dt_max=0.02, conv_init=0.1)
    A = torch.exp(mamba2.A_log.detach())
    assert 2 <= A.min() and A.max() <= 5
    dt = F.softplus(mamba2.dt_bias.detach())
    assert 0.01 * 0.999 <= dt.min() and dt.max() <= 0.02 * 1.001
    assert mamba2.conv1d.weight.abs().max() <= 0.1
    assert torch.equal(mamba2.D, torch.ones(16)) and torch.equal(mamba2.norm.weight, torch.ones(128))
    assert mamba2.dt_bias._no_weight_decay and mamba2.A_log._no_weight_decay and mamba2.D._no_weight_decay


def test_mamba2_rejects_bad_process_group():
    # Tensor parallelism itself is tested in test_distributed.py (2 gloo processes).
    with pytest.raises(TypeError, match=r"^process_group:"):
        Mamba2(16, headdim=8, process_group=object())


@pytest.mark.parametrize("use_mem_eff_path", [True, False], ids=["fused", "unfused"])
def test_mamba2_simple_matches_reference(use_mem_eff_path):
    module = random_f64(Mamba2Simple(12, d_state=4, d_conv=3, headdim=6, chunk_size=4, learnable_init_states=True,
                                    dt_limit=(0.0, 3.0), use_mem_eff_path=use_mem_eff_path, dtype=torch.float64))
    u = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)

    def ref(p, x):
        initial = p["init_states"][None].expand(x.shape[0], -1, -1, -1)
        return ref_mamba2(p, x, headdim=6, dt_limit=(0.0, 3.0), initial=(_zero_conv_state(p, x), initial))

    _check_mixer_against_reference(module, ref, u, **F64)


def _zero_conv_state(p, x):
    weight = p["conv1d.weight"]
    return torch.zeros(x.shape[0], weight.shape[0], weight.shape[-1], dtype=x.dtype)


def test_fused_paths_save_less_for_backward_than_unfused():
    """The memory-saving paths keep fewer bytes for the backward than autograd through the ops."""

    def saved_bytes(module, u):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(u)
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        return sum(n for (ptr, _), n in seen.items() if ptr not in params)

    u = torch.randn(2, 64, 32, requires_grad=True)
    for make in (lambda fused: Mamba(32, d_state=8, use_fast_path=fused),
                 lambda fused: Mamba2(32, d_state=8, headdim=16, chunk_size=16, use_mem_eff_path=fused)):
        module = make(True)
        fused = saved_bytes(module, u)
        module_unfused = make(False)
        module_unfused.load_state_dict(module.state_dict())
        assert fused < 0.75 * saved_bytes(module_unfused, u)


# ------------------------------------------------------------------------------------ attention

MHA_CASES = {
    "causal_gqa_rotary": dict(num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=4),
    "interleaved_rotary_mlp_conv": dict(num_heads=2, causal=True, rotary_emb_dim=6, rotary_emb_interleaved=True,
                                        mlp_dim=20, d_conv=3),
    "bidirectional_mqa_scale": dict(num_heads=4, num_heads_kv=1, causal=False, softmax_scale=0.3,
                                    qkv_proj_bias=False),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_mha_matches_reference(case):
    kwargs = MHA_CASES[case]
    mha = random_f64(MHA(16, head_dim=8, dtype=torch.float64, **kwargs), scale=0.3)
    u = torch.randn(2, 6, 16, dtype=torch.float64, requires_grad=True)

    def ref(p, x):
        out = ref_mha(p, x, kwargs["num_heads"], kwargs.get("num_heads_kv") or kwargs["num_heads"], 8,
                      kwargs["causal"], kwargs.get("rotary_emb_dim", 0), 10000.0,
                      kwargs.get("rotary_emb_interleaved", False), mha.mlp_dim, kwargs.get("softmax_scale"))
        return out, None

    _check_mixer_against_reference(mha, ref, u, **F64)


def test_mha_parameter_shapes():
    mha = MHA(64, num_heads=8, num_heads_kv=2, mlp_dim=100, d_conv=4)
    assert mha.mlp_dim == 256
    qkv_dim = 8 * (8 + 2 * 2)
    shapes = {name: tuple(p.shape) for name, p in mha.named_parameters()}
    assert shapes == {"in_proj.weight": (qkv_dim + 256, 64), "in_proj.bias": (qkv_dim + 256,),
                      "conv1d.weight": (qkv_dim, 1, 4), "conv1d.bias": (qkv_dim,),
                      "out_proj.weight": (64, 64 + 128), "out_proj.bias": (64,)}


@pytest.mark.parametrize("per_sample_lengths", [False, True])
def test_mha_kv_cache_decoding_equals_full_forward(per_sample_lengths):
    mha = random_f64(MHA(16, num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=4, d_conv=3, layer_idx=3,
                        dtype=torch.float64), scale=0.3)
    u = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        full = mha(u)
        params = InferenceParams(max_seqlen=12, max_batch_size=2)
        if per_sample_lengths:
            params.lengths_per_sample = torch.zeros(2, dtype=torch.int32)
        outs = [mha(u[:, :4], inference_params=params)]
        params.seqlen_offset = 4
        if per_sample_lengths:
            params.lengths_per_sample.fill_(4)
        outs.append(mha(u[:, 4:6], inference_params=params))  # a chunk of two
        for t in range(6, 9):
            params.seqlen_offset = t
            if per_sample_lengths:
                params.lengths_per_sample.fill_(t)
            outs.append(mha(u[:, t:t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **F64)
    kv_cache, conv_state = params.key_value_memory_dict[3]
    assert kv_cache.shape == (2, 12, 2, 2, 4) and conv_state.shape == (2, 4 * (4 + 4), 3)


# ------------------------------------------------------------------------------------ decoding


def _mixers():
    return {
        "mamba": lambda: Mamba(8, d_state=4, d_conv=3, layer_idx=0, dtype=torch.float64),
        "mamba2": lambda: Mamba2(12, d_state=4, d_conv=3, headdim=4, ngroups=2, chunk_size=4, layer_idx=0,
                                 dtype=torch.float64),
        "mamba2_mlp_norm_gate": lambda: Mamba2(12, d_state=4, headdim=4, d_ssm=16, rmsnorm=False, D_has_hdim=True,
                                               layer_idx=0, dtype=torch.float64),
    }


@pytest.mark.parametrize("name", list(_mixers()))
def test_step_by_step_and_chunked_prefill_equal_full_forward(name):
    mixer = random_f64(_mixers()[name]())
    u = torch.randn(2, 10, mixer.d_model, dtype=torch.float64)
    with torch.no_grad():
        full = mixer(u)
        params = InferenceParams(max_seqlen=10, max_batch_size=2)
        outs = [mixer(u[:, :2], inference_params=params)]  # prompt shorter than the conv width
        for start, stop in ((2, 6), (6, 7), (7, 8), (8, 10)):  # chunk, steps, chunk
            params.seqlen_offset = start
            outs.append(mixer(u[:, start:stop], inference_params=params))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, **F64)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_prefill_fills_cache_with_reference_states(name):
    mixer = random_f64(_mixers()[name]())
    u = torch.randn(2, 7, mixer.d_model, dtype=torch.float64)
    conv_cache, ssm_cache = mixer.allocate_inference_cache(2, 16)
    params = InferenceParams(max_seqlen=16, max_batch_size=2, key_value_memory_dict={0: (conv_cache, ssm_cache)})
    with torch.no_grad():
        mixer(u, inference_params=params)
        if name == "mamba":
            _, (conv_state, ssm_state) = ref_mamba(params_of(mixer), u)
        else:
            _, (conv_state, ssm_state) = ref_mamba2(params_of(mixer), u, headdim=4, ngroups=2)
    assert params.key_value_memory_dict[0][0] is conv_cache
    torch.testing.assert_close(conv_cache, conv_state, **F64)
    torch.testing.assert_close(ssm_cache, ssm_state, **F64)
    # step() continues exactly where the reference recurrence goes next.
    nxt = torch.randn(2, 1, mixer.d_model, dtype=torch.float64)
    with torch.no_grad():
        out, _, _ = mixer.step(nxt, conv_cache, ssm_cache)
        ref = ref_mamba if name == "mamba" else (lambda p, x, initial: ref_mamba2(p, x, 4, 2, initial=initial))
        want, _ = ref(params_of(mixer), nxt, initial=(conv_state, ssm_state))
    torch.testing.assert_close(out, want, **F64)


def params_of(module):
    return {k: v.detach() for k, v in module.named_parameters()}


def test_allocate_inference_cache_shapes_and_dtypes():
    mamba = Mamba(16, d_state=8, d_conv=4, dtype=torch.bfloat16)
    conv, ssm = mamba.allocate_inference_cache(3, 20)
    assert conv.shape == (3, 32, 4) and ssm.shape == (3, 32, 8) and conv.dtype == ssm.dtype == torch.bfloat16
    mamba2 = Mamba2(16, d_state=8, headdim=8)
    conv, ssm = mamba2.allocate_inference_cache(3, 20, dtype=torch.float64)
    assert conv.shape == (3, 32 + 16, 4) and conv.stride(1) == 1 and ssm.shape == (3, 4, 8, 8)
    assert conv.dtype == ssm.dtype == torch.float64
    with pytest.raises(ValueError, match=r"^hidden_states:"):
        mamba2.step(torch.randn(3, 2, 16), conv, ssm)
    with pytest.raises(ValueError, match=r"^layer_idx:"):
        mamba2(torch.randn(1, 3, 16), inference_params=InferenceParams(max_seqlen=4, max_batch_size=1))


def test_mamba2_packed_sequences_fill_one_cache_row_each():
    mixer = random_f64(_mixers()["mamba2"]())
    lengths = (5, 2, 4)
    seqs = [torch.randn(1, n, 12, dtype=torch.float64) for n in lengths]
    packed = torch.cat(seqs, dim=1)
    cu_seqlens = torch.tensor([0, 5, 7, 11], dtype=torch.int32)
    seq_idx = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor(lengths))[None]
    with torch.no_grad():
        params = InferenceParams(max_seqlen=16, max_batch_size=3)
        out = mixer(packed, seq_idx=seq_idx, cu_seqlens=cu_seqlens, inference_params=params)
        conv_cache, ssm_cache = params.key_value_memory_dict[0]
        for i, seq in enumerate(seqs):
            want, (conv_state, ssm_state) = ref_mamba2(params_of(mixer), seq, headdim=4, ngroups=2)
            torch.testing.assert_close(out[:, cu_seqlens[i]:cu_seqlens[i + 1]], want, **F64)
            torch.testing.assert_close(conv_cache[i], conv_state[0], **F64)
            torch.testing.assert_close(ssm_cache[i], ssm_state[0], **F64)


# ------------------------------------------------------------------------------------ block


def test_block_fused_add_norm_equals_unfused():
    from functools import partial

    torch.manual_seed(3)
    blocks = []
    for fused in (False, True):
        torch.manual_seed(3)
        blocks.append(random_f64(Block(
            16, partial(Mamba2, d_state=4, headdim=8, chunk_size=8, dtype=torch.float64),
            partial(GatedMLP, hidden_features=24, dtype=torch.float64),
            norm_cls=partial(RMSNorm, eps=1e-5, dtype=torch.float64), fused_add_norm=fused)))
    h = torch.randn(2, 5, 16, dtype=torch.float64)
    r = torch.randn(2, 5, 16, dtype=torch.float64)
    out0, res0 = blocks[0](h, r)
    out1, res1 = blocks[1](h, r)
    torch.testing.assert_close(out0, out1, **F64)
    torch.testing.assert_close(res0, res1, **F64)
    # and against the reference: residual = h + r; out = mlp(norm2(mixer(norm(residual)) + residual))
    p = params_of(blocks[0])
    s = h + r
    m, _ = ref_mamba2({k[6:]: v for k, v in p.items() if k.startswith("mixer.")}, ref_rms(s, p["norm.weight"], 1e-5),
                      headdim=8)
    s2 = m + s
    y = ref_rms(s2, p["norm2.weight"], 1e-5) @ p["mlp.fc1.weight"].t()
    hidden = p["mlp.fc2.weight"].shape[1]
    want = (y[..., :hidden] * F.silu(y[..., hidden:])) @ p["mlp.fc2.weight"].t()
    torch.testing.assert_close(out0, want, **F64)
    torch.testing.assert_close(res0, s2, **F64)


@pytest.mark.parametrize("fused", [False, True])
def test_block_residual_in_fp32(fused):
    from functools import partial

    block = Block(16, partial(Mamba, d_state=4, dtype=torch.bfloat16), nn.Identity,
                  norm_cls=partial(RMSNorm, dtype=torch.bfloat16), fused_add_norm=fused, residual_in_fp32=True)
    h = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    out, residual = block(h)
    assert out.dtype == torch.bfloat16 and residual.dtype == torch.float32
    torch.testing.assert_close(residual, h.float())


# ------------------------------------------------------------------------------------ language model

LM_CONFIGS = {
    "mamba1": MambaConfig(d_model=16, n_layer=2, vocab_size=50, ssm_cfg=dict(d_state=4, d_conv=3)),
    "mamba2_mlp": MambaConfig(d_model=16, n_layer=2, d_intermediate=24, vocab_size=64, tie_embeddings=False,
                              ssm_cfg=dict(layer="Mamba2", d_state=4, headdim=8, ngroups=2, chunk_size=8)),
    "hybrid_layernorm": MambaConfig(d_model=16, n_layer=3, vocab_size=40, rms_norm=False, fused_add_norm=False,
                                    ssm_cfg=dict(layer="Mamba2", d_state=4, headdim=8, chunk_size=8),
                                    attn_layer_idx=[1], attn_cfg=dict(num_heads=4, num_heads_kv=2, causal=True,
                                                                      rotary_emb_dim=4)),
}


def reference_state_dict_shapes(cfg: MambaConfig) -> dict:
    """Parameter name -> shape of the reference package's MambaLMHeadModel for ``cfg``, from its code structure."""
    vocab = math.ceil(cfg.vocab_size / cfg.pad_vocab_size_multiple) * cfg.pad_vocab_size_multiple
    d = cfg.d_model
    shapes = {"backbone.embedding.weight": (vocab, d)}
    norm = (lambda prefix: {prefix + ".weight": (d,)}) if cfg.rms_norm else (
        lambda prefix: {prefix + ".weight": (d,), prefix + ".bias": (d,)})
    for i in range(cfg.n_layer):
        layer = f"backbone.layers.{i}"
        mixer = layer + ".mixer."
        shapes.update(norm(layer + ".norm"))
        ssm = dict(cfg.ssm_cfg)
        if i in cfg.attn_layer_idx:
            attn = cfg.attn_cfg
            heads, heads_kv = attn["num_heads"], attn.get("num_heads_kv", attn["num_heads"])
            head_dim = d // heads
            qkv = head_dim * (heads + 2 * heads_kv)
            shapes.update({mixer + "in_proj.weight": (qkv, d), mixer + "in_proj.bias": (qkv,),
                           mixer + "out_proj.weight": (d, head_dim * heads), mixer + "out_proj.bias": (d,)})
        elif ssm.get("layer", "Mamba1") == "Mamba1":
            d_inner, n, w = 2 * d, ssm.get("d_state", 16), ssm.get("d_conv", 4)
            rank = math.ceil(d / 16)
            shapes.update({mixer + "A_log": (d_inner, n), mixer + "D": (d_inner,),
                           mixer + "in_proj.weight": (2 * d_inner, d), mixer + "conv1d.weight": (d_inner, 1, w),
                           mixer + "conv1d.bias": (d_inner,), mixer + "x_proj.weight": (rank + 2 * n, d_inner),
                           mixer + "dt_proj.weight": (d_inner, rank), mixer + "dt_proj.bias": (d_inner,),
                           mixer + "out_proj.weight": (d, d_inner)})
        else:
            d_inner, n, w = 2 * d, ssm.get("d_state", 128), ssm.get("d_conv", 4)
            g, heads = ssm.get("ngroups", 1), 2 * d // ssm["headdim"]
            conv_dim = d_inner + 2 * g * n
            shapes.update({mixer + "dt_bias": (heads,), mixer + "A_log": (heads,), mixer + "D": (heads,),
                           mixer + "in_proj.weight": (2 * d_inner + 2 * g * n + heads, d),
                           mixer + "conv1d.weight": (conv_dim, 1, w), mixer + "conv1d.bias": (conv_dim,),
                           mixer + "norm.weight": (d_inner,), mixer + "out_proj.weight": (d, d_inner)})
        if cfg.d_intermediate:
            hidden = math.ceil(cfg.d_intermediate / 128) * 128
            shapes.update(norm(layer + ".norm2"))
            shapes.update({layer + ".mlp.fc1.weight": (2 * hidden, d), layer + ".mlp.fc2.weight": (d, hidden)})
    shapes.update(norm("backbone.norm_f"))
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def ref_lm_logits(sd: dict, cfg: MambaConfig, input_ids):
    """The reference LM's logits from a state dict: embedding, pre-norm residual blocks, final norm, lm_head."""
    def norm(prefix, x):
        if cfg.rms_norm:
            return ref_rms(x, sd[prefix + ".weight"], 1e-5)
        return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)

    residual = sd["backbone.embedding.weight"][input_ids]
    hidden = torch.zeros_like(residual)
    for i in range(cfg.n_layer):
        prefix = f"backbone.layers.{i}"
        p = {k[len(prefix) + 7:]: v for k, v in sd.items() if k.startswith(prefix + ".mixer.")}
        residual = residual + hidden
        x = norm(prefix + ".norm", residual)
        if i in cfg.attn_layer_idx:
            attn = cfg.attn_cfg
            hidden = ref_mha(p, x, attn["num_heads"], attn.get("num_heads_kv", attn["num_heads"]),
                             cfg.d_model // attn["num_heads"], attn.get("causal", False),
                             attn.get("rotary_emb_dim", 0))
        elif cfg.ssm_cfg.get("layer", "Mamba1") == "Mamba1":
            hidden, _ = ref_mamba(p, x)
        else:
            hidden, _ = ref_mamba2(p, x, cfg.ssm_cfg["headdim"], cfg.ssm_cfg.get("ngroups", 1))
        if cfg.d_intermediate:
            residual = residual + hidden
            y = norm(prefix + ".norm2", residual) @ sd[prefix + ".mlp.fc1.weight"].t()
            up, gate = y.chunk(2, dim=-1)
            hidden = (up * F.silu(gate)) @ sd[prefix + ".mlp.fc2.weight"].t()
    return norm("backbone.norm_f", residual + hidden) @ sd["lm_head.weight"].t()


@pytest.mark.parametrize("name", list(LM_CONFIGS))
def test_reference_state_dict_loads_strict_and_gives_reference_logits(name):
    # float64 throughout (A_log and D too, and no float32 residual) so the logits must agree to ~1e-9.
    cfg = dataclasses.replace(LM_CONFIGS[name], residual_in_fp32=False)
    shapes = reference_state_dict_shapes(cfg)
    model = MambaLMHeadModel(cfg).double()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen, dtype=torch.float64) * 0.4
        if key.endswith("A_log"):
            value = value.abs() - 0.5
        if key.endswith(("dt_bias", "dt_proj.bias")):
            value = value - 1.0
        sd[key] = value
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    model.load_state_dict(sd, strict=True)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == cfg.tie_embeddings
    input_ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    with torch.no_grad():
        logits = model(input_ids).logits
        torch.testing.assert_close(logits, ref_lm_logits(sd, cfg, input_ids), **F64)
        last = model(input_ids, num_last_tokens=2).logits
    torch.testing.assert_close(last, logits[:, -2:], **F64)


@pytest.mark.parametrize("name", ["mamba1", "hybrid_layernorm"])
def test_lm_generation_cache_equals_full_forward(name):
    model = MambaLMHeadModel(LM_CONFIGS[name], dtype=torch.float64)
    input_ids = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        full = model(input_ids).logits
        params = InferenceParams(max_seqlen=8, max_batch_size=2,
                                 key_value_memory_dict=model.allocate_inference_cache(2, 8))
        outs = [model(input_ids[:, :5], inference_params=params, num_last_tokens=1).logits]
        for t in range(5, 8):
            params.seqlen_offset = t
            outs.append(model(input_ids[:, t:t + 1], inference_params=params).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full[:, 4:], **F64)


def test_lm_initialisation_follows_reference():
    cfg = MambaConfig(d_model=64, n_layer=4, d_intermediate=64, vocab_size=1000,
                      ssm_cfg=dict(d_state=8, bias=True), attn_layer_idx=[2], attn_cfg=dict(num_heads=4))
    model = MambaLMHeadModel(cfg)
    assert model.backbone.embedding.weight.shape == (1000, 64)
    assert abs(model.backbone.embedding.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.backbone.embedding.weight
    mixer = model.backbone.layers[0].mixer
    assert torch.all(mixer.in_proj.bias == 0) and torch.all(mixer.out_proj.bias == 0)
    assert torch.all(model.backbone.layers[2].mixer.in_proj.bias == 0)
    assert F.softplus(mixer.dt_proj.bias).min() >= 1e-3 * 0.999  # dt_proj.bias is not zeroed
    # out_proj / fc2: kaiming-uniform re-draw scaled by 1/sqrt(n_layer) (the LM-level pass runs last)
    bound = 1 / math.sqrt(mixer.out_proj.weight.shape[1]) / math.sqrt(4)
    w = mixer.out_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    fc2 = model.backbone.layers[1].mlp.fc2.weight
    assert fc2.abs().max() <= 1 / math.sqrt(fc2.shape[1]) / 2 and fc2.abs().max() > 0.45 / math.sqrt(fc2.shape[1])


def test_tiny_lm_trains_on_cpu():
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=16, pad_vocab_size_multiple=8,
                      ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=16, chunk_size=8), d_intermediate=32)
    model = MambaLMHeadModel(cfg)
    model.train()
    # A deterministic language: each sequence counts up mod 16 from a random start.
    starts = torch.randint(0, 16, (8, 1))
    data = (starts + torch.arange(17)) % 16
    decay = [p for n, p in model.named_parameters() if not getattr(p, "_no_weight_decay", False)]
    keep = [p for n, p in model.named_parameters() if getattr(p, "_no_weight_decay", False)]
    opt = torch.optim.AdamW([{"params": decay}, {"params": keep, "weight_decay": 0.0}], lr=3e-3)
    losses = []
    for _ in range(50):
        logits = model(data[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ------------------------------------------------------------------------------------ low precision


def _small_mixer(kind, dtype=None):
    if kind == "mamba":
        return Mamba(32, d_state=8, dtype=dtype)
    return Mamba2(32, d_state=8, headdim=16, chunk_size=8, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_half_precision_modules_track_float32(kind, dtype):
    torch.manual_seed(5)
    ref, low = _small_mixer(kind), _small_mixer(kind, dtype)
    low.load_state_dict(ref.state_dict())
    u = torch.randn(2, 12, 32, dtype=dtype, requires_grad=True)
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
def test_cpu_autocast_bfloat16(kind):
    """Under autocast a float32 module computes in bfloat16 and its gradients stay float32."""
    torch.manual_seed(5)
    module = _small_mixer(kind)
    u = torch.randn(2, 12, 32, requires_grad=True)
    want = module(u).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(u)
    assert out.dtype == torch.bfloat16
    assert (out.float() - want).norm() / want.norm() < 0.03
    out.float().pow(2).sum().backward()
    assert u.grad.dtype == torch.float32
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_compiled_fused_mixer_matches_eager(kind):
    """torch.compile(fullgraph=True) traces through the fused autograd functions and the custom ops."""
    module = {"mamba": lambda: Mamba(16, d_state=4), "mamba2": lambda: Mamba2(16, d_state=8, headdim=8, chunk_size=8)}[
        kind]()
    u = torch.randn(2, 9, 16, requires_grad=True)
    want = module(u)
    want_grad, = torch.autograd.grad(want.pow(2).sum(), u)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    out = compiled(u)
    grad, = torch.autograd.grad(out.pow(2).sum(), u)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-6)
