"""ssmcore's ops as ``torch.library`` custom ops (namespace ``ssmcore``), with autograd.

Each trainable op is a pair of custom ops, ``ssmcore::<op>_fwd`` and ``ssmcore::<op>_bwd``;
``register_autograd`` joins them (the backward recomputes from the saved inputs, as the core's
``<op>_bwd`` does), and ``register_fake`` gives every op its output shapes, dtypes and devices,
so ``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs see through them. The
decode ops (``ssmcore::causal_conv1d_update``, ``ssmcore::selective_state_update``) update their
state argument in place and say so (``mutates_args``).

Every op runs on CPU tensors (Numba backend) and CUDA tensors (CuPy backend), converting
tensors zero-copy (see ``_bridge``); arguments are validated by the core, whose errors name
the argument (ValueError for shapes and values, TypeError for dtypes).

Custom ops return tensors only, so a result that does not exist (a gradient of an input that
was None, a final state that was not asked for) comes back as an empty placeholder tensor of
shape (0,); the autograd glue and ``functional`` map placeholders back to None. Shapes use the
glossary letters of ``ssmcore`` (B batch, L length, D channels, N state size, G groups,
H heads, P head dim, W conv width, S sequences).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad
from torch.autograd.graph import increment_version

import ssmcore

from . import _plans
from ._bridge import _PLAIN, absent, backend_scope, fresh_outputs, to_array

# name -> (the op's Python implementation behind its launch-plan fast path (_plans.run), names and positions of
# the arguments it mutates)
_IMPLS: dict = {}


def custom_op(qualname: str, *, mutates_args):
    """``torch.library.custom_op``, also recording the implementation for :data:`eager`."""

    def register(fn):
        params = list(inspect.signature(fn).parameters)
        mutated = tuple((name, params.index(name)) for name in mutates_args)
        name = qualname.split("::", 1)[1]

        def run(*args, **kwargs):  # CUDA tensors: replayed from a launch plan when one applies (see _plans)
            return _plans.run(name, fn, args, kwargs)

        run.__name__ = run.__qualname__ = fn.__name__
        run.__doc__ = fn.__doc__
        _IMPLS[name] = (run, mutated)
        op = torch.library.custom_op(qualname, mutates_args=mutates_args)(fn)
        op.register_kernel("cuda", run)
        return op

    return register


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """The backend's math dtype: float64 when any activation is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty(shape, dtype, device) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _fake_grad(t: Optional[Tensor], device) -> Tensor:
    """A gradient's fake: contiguous, in the input's dtype; the placeholder when the input is absent."""
    return absent(device) if t is None else _empty(t.shape, t.dtype, device)


def _or_none(t: Tensor, keep: bool):
    return t if keep else None


# ------------------------------------------------------------------------------- selective scan


@custom_op("ssmcore::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
    delta_bias: Optional[Tensor], initial_state: Optional[Tensor], delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """Selective scan: (out (B, D, L) in u's dtype, last_state (B, D, N) float32, float64 for float64 u)."""
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    with backend_scope(u):
        results = ssmcore.selective_scan(
            to_array("u", u), to_array("delta", delta), to_array("A", A), to_array("B", B), to_array("C", C),
            D=to_array("D", D), z=to_array("z", z), delta_bias=to_array("delta_bias", delta_bias),
            delta_softplus=delta_softplus, initial_state=to_array("initial_state", initial_state),
            return_last_state=True,
        )
        return fresh_outputs(results, inputs, u.device)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    return (
        _empty(u.shape, u.dtype, u.device),
        _empty((u.shape[0], u.shape[1], A.shape[1]), _compute_dtype(u), u.device),
    )


@custom_op("ssmcore::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    dout: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    z: Optional[Tensor], delta_bias: Optional[Tensor], initial_state: Optional[Tensor],
    dlast_state: Optional[Tensor], delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); placeholders for absent inputs."""
    inputs = (dout, u, delta, A, B, C, D, z, delta_bias, initial_state, dlast_state)
    with backend_scope(u):
        grads = ssmcore.selective_scan_bwd(
            to_array("dout", dout), to_array("u", u), to_array("delta", delta), to_array("A", A),
            to_array("B", B), to_array("C", C), D=to_array("D", D), z=to_array("z", z),
            delta_bias=to_array("delta_bias", delta_bias), delta_softplus=delta_softplus,
            initial_state=to_array("initial_state", initial_state),
            dlast_state=to_array("dlast_state", dlast_state),
        )
        return fresh_outputs(grads, inputs, u.device)


@selective_scan_bwd.register_fake
def _(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, dlast_state, delta_softplus):
    return tuple(_fake_grad(t, u.device) for t in (u, delta, A, B, C, D, z, delta_bias, initial_state))


def _selective_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state)
    ctx.delta_softplus = delta_softplus
    ctx.set_materialize_grads(False)


def _selective_scan_backward(ctx, dout, dlast_state):
    u, delta, A, B, C, D, z, delta_bias, initial_state = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, initial_state, dlast_state,
                               ctx.delta_softplus)
    present = (True, True, True, True, True, D is not None, z is not None, delta_bias is not None,
               initial_state is not None)
    return (*(_or_none(g, keep) for g, keep in zip(grads, present)), None)


torch.library.register_autograd(
    "ssmcore::selective_scan_fwd", _selective_scan_backward, setup_context=_selective_scan_setup
)


# ------------------------------------------------------------------------------- causal conv1d


@custom_op("ssmcore::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor], activation: Optional[str], return_final_states: bool,
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv: (out (B, D, L) in x's layout and dtype, final_states (B, D, W-1) or placeholder)."""
    with backend_scope(x):
        results = ssmcore.causal_conv1d(
            to_array("x", x), to_array("weight", weight), to_array("bias", bias), activation=activation,
            seq_idx=to_array("seq_idx", seq_idx), initial_states=to_array("initial_states", initial_states),
            return_final_states=return_final_states,
        )
        if not return_final_states:
            results = (results, None)
        return fresh_outputs(results, (x, weight, bias, seq_idx, initial_states), x.device, like=(x,))


@causal_conv1d_fwd.register_fake
def _(x, weight, bias, seq_idx, initial_states, activation, return_final_states):
    if not return_final_states:
        return torch.empty_like(x), absent(x.device)
    state_dtype = x.dtype if initial_states is None else initial_states.dtype
    return torch.empty_like(x), _empty((x.shape[0], x.shape[1], weight.shape[1] - 1), state_dtype, x.device)


@custom_op("ssmcore::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
    initial_states: Optional[Tensor], dfinal_states: Optional[Tensor], activation: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx in x's layout, dweight, dbias, dinitial_states); placeholders for absent inputs."""
    inputs = (dout, x, weight, bias, seq_idx, initial_states, dfinal_states)
    with backend_scope(x):
        grads = ssmcore.causal_conv1d_bwd(
            to_array("dout", dout), to_array("x", x), to_array("weight", weight), to_array("bias", bias),
            activation=activation, seq_idx=to_array("seq_idx", seq_idx),
            initial_states=to_array("initial_states", initial_states),
            dfinal_states=to_array("dfinal_states", dfinal_states),
        )
        return fresh_outputs(grads, inputs, x.device, like=(x,))


@causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, seq_idx, initial_states, dfinal_states, activation):
    return (torch.empty_like(x), *(_fake_grad(t, x.device) for t in (weight, bias, initial_states)))


def _causal_conv1d_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, activation, return_final_states = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.activation = activation
    if not return_final_states:
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _causal_conv1d_backward(ctx, dout, dfinal_states):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    dx, dweight, dbias, dinitial_states = causal_conv1d_bwd(
        dout, x, weight, bias, seq_idx, initial_states, dfinal_states, ctx.activation
    )
    return (dx, dweight, _or_none(dbias, bias is not None), None,
            _or_none(dinitial_states, initial_states is not None), None, None)


torch.library.register_autograd(
    "ssmcore::causal_conv1d_fwd", _causal_conv1d_backward, setup_context=_causal_conv1d_setup
)


@custom_op("ssmcore::causal_conv1d_update", mutates_args=("conv_state",))
def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor], activation: Optional[str],
    cache_seqlens: Optional[Tensor], conv_state_indices: Optional[Tensor],
) -> Tensor:
    """Decode step(s) of the causal conv: out like x; ``conv_state`` (Bs, D, state_len) updated in place."""
    with backend_scope(x):
        out = ssmcore.causal_conv1d_update(
            to_array("x", x), to_array("conv_state", conv_state), to_array("weight", weight),
            to_array("bias", bias), activation=activation, cache_seqlens=to_array("cache_seqlens", cache_seqlens),
            conv_state_indices=to_array("conv_state_indices", conv_state_indices),
        )
        return fresh_outputs((out,), (x, conv_state, weight, bias, cache_seqlens, conv_state_indices), x.device)[0]


@causal_conv1d_update.register_fake
def _(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices):
    return _empty(x.shape, x.dtype, x.device)


# ------------------------------------------------------------------------------- selective state update


@custom_op("ssmcore::selective_state_update", mutates_args=("state",))
def selective_state_update(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
    z: Optional[Tensor], dt_bias: Optional[Tensor], dt_softplus: bool, state_batch_indices: Optional[Tensor],
) -> Tensor:
    """One decode step of the SSM: out like x; ``state`` (Bs, D, N) or (Bs, H, P, N) updated in place."""
    inputs = (state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    with backend_scope(x):
        out = ssmcore.selective_state_update(
            to_array("state", state), to_array("x", x), to_array("dt", dt), to_array("A", A), to_array("B", B),
            to_array("C", C), D=to_array("D", D), z=to_array("z", z), dt_bias=to_array("dt_bias", dt_bias),
            dt_softplus=dt_softplus, state_batch_indices=to_array("state_batch_indices", state_batch_indices),
        )
        return fresh_outputs((out,), inputs, x.device)[0]


@selective_state_update.register_fake
def _(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    return _empty(x.shape, x.dtype, x.device)


# ------------------------------------------------------------------------------- SSD (Mamba-2)


@custom_op("ssmcore::ssd_fwd", mutates_args=())
def ssd_fwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
    z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
    cu_seqlens: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float, return_varlen_states: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked SSD: (out (B, L, H, P) in x's dtype, final_states (B, H, P, N), varlen_states (S, H, P, N) or
    placeholder); states in float32 (float64 for float64 activations)."""
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
    with backend_scope(x):
        results = ssmcore.ssd(
            to_array("x", x), to_array("dt", dt), to_array("A", A), to_array("B", B), to_array("C", C),
            chunk_size=chunk_size, D=to_array("D", D), z=to_array("z", z), dt_bias=to_array("dt_bias", dt_bias),
            dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max),
            initial_states=to_array("initial_states", initial_states), seq_idx=to_array("seq_idx", seq_idx),
            cu_seqlens=to_array("cu_seqlens", cu_seqlens), return_final_states=True,
            return_varlen_states=return_varlen_states,
        )
        if not return_varlen_states:
            results = (*results, None)
        return fresh_outputs(results, inputs, x.device)


@ssd_fwd.register_fake
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_min,
      dt_max, return_varlen_states):
    batch, _, nheads, headdim = x.shape
    state_dtype = _compute_dtype(x, dt, B, C, z)
    final_states = _empty((batch, nheads, headdim, B.shape[-1]), state_dtype, x.device)
    if return_varlen_states:
        varlen_states = _empty((cu_seqlens.shape[0] - 1, nheads, headdim, B.shape[-1]), state_dtype, x.device)
    else:
        varlen_states = absent(x.device)
    return _empty(x.shape, x.dtype, x.device), final_states, varlen_states


@custom_op("ssmcore::ssd_bwd", mutates_args=())
def ssd_bwd(
    dout: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Optional[Tensor],
    z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
    cu_seqlens: Optional[Tensor], dfinal_states: Optional[Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states); placeholders for absent inputs."""
    inputs = (dout, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dfinal_states)
    with backend_scope(x):
        grads = ssmcore.ssd_bwd(
            to_array("dout", dout), to_array("x", x), to_array("dt", dt), to_array("A", A), to_array("B", B),
            to_array("C", C), chunk_size=chunk_size, D=to_array("D", D), z=to_array("z", z),
            dt_bias=to_array("dt_bias", dt_bias), dt_softplus=dt_softplus, dt_limit=(dt_min, dt_max),
            initial_states=to_array("initial_states", initial_states), seq_idx=to_array("seq_idx", seq_idx),
            cu_seqlens=to_array("cu_seqlens", cu_seqlens), dfinal_states=to_array("dfinal_states", dfinal_states),
        )
        return fresh_outputs(grads, inputs, x.device)


@ssd_bwd.register_fake
def _(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dfinal_states,
      dt_softplus, dt_min, dt_max):
    return tuple(_fake_grad(t, x.device) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))


def _ssd_setup(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, dt_min, dt_max,
     return_varlen_states) = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens)
    ctx.options = (chunk_size, dt_softplus, dt_min, dt_max)
    ctx.mark_non_differentiable(output[2])  # varlen states are forward-only, as in the reference
    ctx.set_materialize_grads(False)


def _ssd_backward(ctx, dout, dfinal_states, dvarlen_states):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens = ctx.saved_tensors
    chunk_size, dt_softplus, dt_min, dt_max = ctx.options
    if dout is None:
        dout = torch.zeros_like(x)
    grads = eager.ssd_bwd(dout, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dfinal_states, dt_softplus, dt_min, dt_max)  # (as the norms' backward)
    present = (True, True, True, True, True, D is not None, z is not None, dt_bias is not None,
               initial_states is not None)
    return (*(_or_none(g, keep) for g, keep in zip(grads[:5], present[:5])), None,
            *(_or_none(g, keep) for g, keep in zip(grads[5:], present[5:])), None, None, None, None, None, None)


torch.library.register_autograd("ssmcore::ssd_fwd", _ssd_backward, setup_context=_ssd_setup)


# ------------------------------------------------------------------------------- norms


def _residual_dtype(x, residual, residual_in_fp32):
    if residual_in_fp32:
        return torch.float32
    return residual.dtype if residual is not None else x.dtype


def _norm_fake(x, weight, bias, residual, eps, prenorm, residual_in_fp32):
    y = _empty(x.shape, x.dtype, x.device)
    if not prenorm:
        return y, absent(x.device)
    return y, _empty(x.shape, _residual_dtype(x, residual, residual_in_fp32), x.device)


def _norm_bwd_fake(dy, x, weight, bias, residual, eps, dresidual_out):
    return (_empty(x.shape, x.dtype, x.device), *(_fake_grad(t, x.device) for t in (weight, bias, residual)))


def _norm_setup(ctx, inputs, output):
    x, weight, bias, residual, eps, prenorm, residual_in_fp32 = inputs
    ctx.save_for_backward(x, weight, bias, residual)
    ctx.eps = eps
    if not prenorm:
        ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _define_norm(kind: str, title: str):
    """The custom ops ``ssmcore::<kind>_fwd`` / ``_bwd`` over the core's ``<kind>`` / ``<kind>_bwd``."""

    @custom_op(f"ssmcore::{kind}_fwd", mutates_args=())
    def fwd(
        x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float, prenorm: bool,
        residual_in_fp32: bool,
    ) -> tuple[Tensor, Tensor]:
        with backend_scope(x):
            results = getattr(ssmcore, kind)(
                to_array("x", x), to_array("weight", weight), to_array("bias", bias), to_array("residual", residual),
                eps=eps, prenorm=prenorm, residual_in_fp32=residual_in_fp32,
            )
            return fresh_outputs(results if prenorm else (results, None), (x, weight, bias, residual), x.device)

    @custom_op(f"ssmcore::{kind}_bwd", mutates_args=())
    def bwd(
        dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], eps: float,
        dresidual_out: Optional[Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with backend_scope(x):
            grads = getattr(ssmcore, f"{kind}_bwd")(
                to_array("dy", dy), to_array("x", x), to_array("weight", weight), to_array("bias", bias),
                to_array("residual", residual), eps=eps, dresidual_out=to_array("dresidual_out", dresidual_out),
            )
            return fresh_outputs(grads, (dy, x, weight, bias, residual, dresidual_out), x.device)

    def backward(ctx, dy, dresidual_out):
        x, weight, bias, residual = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        # eager.<op>: a launch plan's replay / the implementation straight away when nothing traces or differentiates
        # the backward (else the custom op, as before): no torch.library dispatch per training step (session 8, OVH8)
        dx, dweight, dbias, dresidual = getattr(eager, f"{kind}_bwd")(dy, x, weight, bias, residual, ctx.eps,
                                                                      dresidual_out)
        return dx, dweight, _or_none(dbias, bias is not None), _or_none(dresidual, residual is not None), None, None, None

    fwd.__doc__ = (f"{title} of s = x + residual: (y (..., D) in x's dtype, s (..., D) when prenorm else "
                   "placeholder).")
    bwd.__doc__ = f"Gradients (dx, dweight, dbias, dresidual) of {kind}_fwd; placeholders for absent inputs."
    fwd.register_fake(_norm_fake)
    bwd.register_fake(_norm_bwd_fake)
    fwd.register_autograd(backward, setup_context=_norm_setup)
    return fwd, bwd


rms_norm_fwd, rms_norm_bwd = _define_norm("rms_norm", "RMSNorm")
layer_norm_fwd, layer_norm_bwd = _define_norm("layer_norm", "LayerNorm")


@custom_op("ssmcore::gated_rms_norm_fwd", mutates_args=())
def gated_rms_norm_fwd(
    x: Tensor, weight: Tensor, z: Optional[Tensor], eps: float, group_size: Optional[int], norm_before_gate: bool,
) -> Tensor:
    """Gated (grouped) RMSNorm of Mamba-2: y (..., D) in x's dtype."""
    with backend_scope(x):
        y = ssmcore.gated_rms_norm(
            to_array("x", x), to_array("weight", weight), to_array("z", z), eps=eps, group_size=group_size,
            norm_before_gate=norm_before_gate,
        )
        return fresh_outputs((y,), (x, weight, z), x.device)[0]


@gated_rms_norm_fwd.register_fake
def _(x, weight, z, eps, group_size, norm_before_gate):
    return _empty(x.shape, x.dtype, x.device)


@custom_op("ssmcore::gated_rms_norm_bwd", mutates_args=())
def gated_rms_norm_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, z: Optional[Tensor], eps: float, group_size: Optional[int],
    norm_before_gate: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dx, dweight, dz) of gated_rms_norm_fwd; a placeholder dz without z."""
    with backend_scope(x):
        grads = ssmcore.gated_rms_norm_bwd(
            to_array("dy", dy), to_array("x", x), to_array("weight", weight), to_array("z", z), eps=eps,
            group_size=group_size, norm_before_gate=norm_before_gate,
        )
        return fresh_outputs(grads, (dy, x, weight, z), x.device)


@gated_rms_norm_bwd.register_fake
def _(dy, x, weight, z, eps, group_size, norm_before_gate):
    return tuple(_fake_grad(t, x.device) for t in (x, weight, z))


def _gated_setup(ctx, inputs, output):
    x, weight, z, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, weight, z)
    ctx.options = (eps, group_size, norm_before_gate)


def _gated_backward(ctx, dy):
    x, weight, z = ctx.saved_tensors
    dx, dweight, dz = eager.gated_rms_norm_bwd(dy, x, weight, z, *ctx.options)  # (as the norms' backward)
    return dx, dweight, _or_none(dz, z is not None), None, None, None


gated_rms_norm_fwd.register_autograd(_gated_backward, setup_context=_gated_setup)


# ------------------------------------------------------------------------------- plain eager calls


def _plain_eager(args, kwargs) -> bool:
    """True when calling an op's implementation directly is what ``torch.ops.ssmcore.<op>`` would do.

    That is: nothing traces or intercepts the call (not compiling, no torch-function or dispatch
    mode, no functorch transform, no jit trace, no forward-mode AD level), every tensor is a plain
    tensor or Parameter (no fake, functional or other subclass), and autograd has nothing to record
    (grad mode off, or no tensor requires grad).
    """
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None  # torch.jit.trace
            or _forward_ad._current_level >= 0):  # inside forward_ad.dual_level()
        return False
    grad = torch.is_grad_enabled()
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or (grad and a.requires_grad)):
            return False
    return True


def _direct(name: str, op):
    """``op`` (a ``torch.ops.ssmcore`` overload packet), short-cut to its implementation in plain eager mode."""
    fn, mutated = _IMPLS[name]
    hit, miss = _plans.hit, _plans.MISS

    def call(*args, **kwargs):
        if not kwargs:  # a launch plan's replay, all checks in one pass (see _plans.hit)
            out = hit(name, args)
            if out is not miss:
                for _, index in mutated:
                    if index < len(args) and args[index] is not None:
                        increment_version(args[index])
                return out
        if not _plain_eager(args, kwargs):
            return op(*args, **kwargs)
        out = fn(*args, **kwargs)
        for arg_name, index in mutated:  # what the op's ADInplaceOrView kernel does for a mutated input
            t = args[index] if index < len(args) else kwargs.get(arg_name)
            if t is not None:
                increment_version(t)
        return out

    def first(*args):
        """``call(*args)[0]`` for a caller that drops the other results: a replay then neither allocates them nor
        makes their placeholders (their blocks are the plan's scratch)."""
        out = hit(name, args, True)
        if out is not miss:
            for _, index in mutated:
                if index < len(args) and args[index] is not None:
                    increment_version(args[index])
            return out
        return call(*args)[0]

    call.__name__ = call.__qualname__ = name
    call.__doc__ = fn.__doc__
    call.first = first
    return call


class _EagerOps:
    """``torch.ops.ssmcore`` with a fast path: ``eager.<op>(...)`` equals ``torch.ops.ssmcore.<op>(...)``,
    but in plain eager mode (see :func:`_plain_eager`: inference and decoding, under ``no_grad`` or
    with inputs that need no grad) it calls the op's implementation directly, skipping the
    ``torch.library`` dispatch layers (tens of microseconds per call). Anything that traces, compiles,
    fakes, transforms or differentiates goes through the custom op as before."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        op = getattr(torch.ops.ssmcore, name)
        value = _direct(name, op) if name in _IMPLS else op
        setattr(self, name, value)
        return value


eager = _EagerOps()
