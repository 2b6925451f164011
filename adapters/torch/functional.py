"""Drop-in functions with the names, signatures and return conventions of the reference packages.

``from mamba_ssm.ops.selective_scan_interface import selective_scan_fn`` becomes
``from ssmcore.adapters.torch import selective_scan_fn``; likewise for causal-conv1d 1.7's
``causal_conv1d_fn`` / ``causal_conv1d_update`` and mamba-ssm 2.3's Triton functions
(``selective_state_update``, ``mamba_chunk_scan_combined``, ``rms_norm_fn``, ``layer_norm_fn``,
the gated ``rmsnorm_fn``). Each is a thin composition of the ``ssmcore::`` custom ops of
:mod:`.ops`, so it is differentiable, runs on CPU and CUDA tensors, and traces under
``torch.compile(fullgraph=True)``.

Where ssmcore goes beyond the reference it says so in the docstring (initial states,
last-state gradients, ``D=None`` in decode). Arguments of the reference that ssmcore does not
implement (dropout and the parallel second norm of the fused LayerNorm) raise a ValueError
naming the argument rather than being ignored.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

from . import ops  # registers the ssmcore:: custom ops

_ops = ops.eager  # torch.ops.ssmcore, straight to the implementation in plain eager mode


def _require_tensors(**named):
    """TypeError naming the first argument that is neither a tensor nor None (torch's own is a RuntimeError)."""
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {value!r}")
    return float(value)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, initial_state=None):
    """Selective scan of Mamba-1 (mamba-ssm's ``selective_scan_fn``).

    Args:
        u, delta: (B, D, L). A: (D, N) float32. B, C: (D, N), (B, N, L) or (B, G, N, L).
        D, delta_bias: (D,) float32, optional. z: (B, D, L) gate, optional.
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state.
        initial_state: (B, D, N) float32, the state before step 0 (beyond the reference).

    Returns:
        out (B, D, L) in u's dtype, or (out, last_state) with last_state (B, D, N) float32.
        Unlike the reference, gradients flow through last_state too.
    """
    _require_tensors(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias, initial_state=initial_state)
    if not return_last_state:  # (.first: a launch plan's replay then skips the state's allocation)
        return _ops.selective_scan_fwd.first(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus))
    out, last_state = _ops.selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state,
                                              bool(delta_softplus))
    return out, last_state


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """Causal depthwise conv1d (causal-conv1d's ``causal_conv1d_fn``).

    Args:
        x: (B, D, L), contiguous or channel-last. weight: (D, W). bias: (D,), optional.
        seq_idx: (B, L) int32, optional. initial_states: (B, D, W-1), optional.
        return_final_states: also return the last W-1 inputs, (B, D, W-1).
        final_states_out: (B, D, W-1), optional: written with the final states and returned.
        activation: None, "silu" or "swish".

    Returns:
        out (B, D, L) in x's dtype and layout, or (out, final_states). seq_idx together with
        initial states or final states is accepted (the reference refuses it).
    """
    _require_tensors(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                     final_states_out=final_states_out)
    if _eager_autograd(x, weight, bias, initial_states, seq_idx):
        out, final_states = _CausalConv1dFn.apply(x, weight, bias, seq_idx, initial_states, activation,
                                                  bool(return_final_states))
    elif not return_final_states:
        return _ops.causal_conv1d_fwd.first(x, weight, bias, seq_idx, initial_states, activation, False)
    else:
        out, final_states = _ops.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation, True)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states = final_states_out.copy_(final_states)
    return out, final_states


def _eager_autograd(*tensors) -> bool:
    """True in plain eager mode when autograd will record the call (grad mode on, an input requires grad):
    then a torch.autograd.Function calling the ops' implementations directly (their launch-plan fast path,
    forward and backward) replaces the custom op's own autograd, whose dispatch layers cost tens of
    microseconds per call each way. Anything that traces, compiles or intercepts keeps the custom op."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return False
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None
            or torch._C._get_tracing_state() is not None):
        return False
    from torch.autograd import forward_ad

    if forward_ad._current_level >= 0:
        return False
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


class _CausalConv1dFn(torch.autograd.Function):
    """ssmcore::causal_conv1d_fwd with its registered backward (ops._causal_conv1d_backward), as a plain
    autograd.Function over the ops' direct eager calls (see _eager_autograd)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, activation, return_final_states):
        out, final_states = _ops.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, activation,
                                                   return_final_states)
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.activation = activation
        if not return_final_states:
            ctx.mark_non_differentiable(final_states)
        ctx.set_materialize_grads(False)
        return out, final_states

    @staticmethod
    def backward(ctx, dout, dfinal_states):
        x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(x)
        dx, dweight, dbias, dinitial_states = _ops.causal_conv1d_bwd(
            dout, x, weight, bias, seq_idx, initial_states, dfinal_states, ctx.activation)
        return (dx, dweight, dbias if bias is not None else None, None,
                dinitial_states if initial_states is not None else None, None, None)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode step(s) of the causal conv (causal-conv1d's ``causal_conv1d_update``).

    Args:
        x: (B, D) or (B, D, Lnew). conv_state: (Bs, D, state_len >= W-1), UPDATED IN PLACE.
        weight: (D, W). bias: (D,), optional. activation: None, "silu" or "swish".
        cache_seqlens: (B,) int32, optional: conv_state is a circular buffer.
        conv_state_indices: (B,) int32, optional: rows of a larger state pool; negative = padding.

    Returns:
        out, like x.
    """
    _require_tensors(x=x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                     conv_state_indices=conv_state_indices)
    return _ops.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens, conv_state_indices)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One decode step of the selective SSM (mamba-ssm's ``selective_state_update``).

    Args:
        state: (Bs, D, N) or (Bs, H, P, N), UPDATED IN PLACE.
        x, dt, z: (B, D) or (B, H, P). A: (D, N) or (H, P, N). B, C: (B, N) or (B, G, N).
        D, dt_bias: (D,) or (H, P), optional (None works, unlike the reference).
        dt_softplus: apply softplus to dt + dt_bias.
        state_batch_indices: (B,) int32, optional: rows of a larger state pool.

    Returns:
        out, like x.
    """
    _require_tensors(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                     state_batch_indices=state_batch_indices)
    return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus),
                                       state_batch_indices)


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                              return_final_states=False, return_varlen_states=False):
    """Mamba-2 SSD (mamba-ssm's ``mamba_chunk_scan_combined``).

    Args:
        x: (B, L, H, P). dt: (B, L, H). A: (H,) float32. B, C: (B, L, G, N).
        chunk_size: int >= 1 (a speed knob; results do not depend on it beyond rounding).
        D: (H,) or (H, P), optional. z: (B, L, H, P), optional. dt_bias: (H,), optional.
        initial_states: (B, H, P, N), optional. seq_idx: (B, L) int32, optional.
        cu_seqlens: (S+1,) int32 with B == 1, used only with return_varlen_states (as in the reference).
        dt_softplus: softplus on dt + dt_bias. dt_limit: (min, max) clamp of the effective dt.
        return_final_states, return_varlen_states: also return (B, H, P, N) / (S, H, P, N) float32 states.

    Returns:
        out, (out, final_states), (out, varlen_states) or (out, final_states, varlen_states).
        varlen_states carry no gradient.
    """
    if not return_varlen_states:
        cu_seqlens = None
    elif cu_seqlens is None:
        raise ValueError("cu_seqlens: is required when return_varlen_states is True, got None")
    _require_tensors(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                     seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit: expected a pair (min, max), got {dt_limit!r}")
    args = (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, bool(dt_softplus),
            _real("dt_limit", dt_limit[0]), _real("dt_limit", dt_limit[1]), bool(return_varlen_states))
    if not (return_final_states or return_varlen_states):
        return _ops.ssd_fwd.first(*args)
    out, final_states, varlen_states = _ops.ssd_fwd(*args)
    results = (out,) + ((final_states,) if return_final_states else ()) + (
        (varlen_states,) if return_varlen_states else ())
    return results[0] if len(results) == 1 else results


def _refuse_unsupported(x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask):
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale)):
        if value is not None:
            raise ValueError(f"{name}: the parallel/scaled fused norm is not supported by ssmcore; expected None")
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p: ssmcore's fused norm has no dropout; expected 0.0, got {dropout_p!r} "
            "(apply torch.nn.functional.dropout to x first)"
        )
    if return_dropout_mask:
        raise ValueError("return_dropout_mask: ssmcore's fused norm has no dropout; expected False")


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, is_rms_norm=False,
                  return_dropout_mask=False):
    """LayerNorm (or RMSNorm) with a fused residual add (mamba-ssm's ``layer_norm_fn``).

    Args:
        x: (..., D). weight: (D,). bias: (D,) or None. residual: (..., D), optional.
        eps: > 0. prenorm: also return the residual stream s = x + residual.
        residual_in_fp32: s in float32 when no residual is given (else s takes residual's dtype).
        is_rms_norm: RMSNorm instead of LayerNorm.
        x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask: must keep their defaults.

    Returns:
        y (..., D) in x's dtype, or (y, s) when prenorm.
    """
    _refuse_unsupported(x1, weight1, bias1, dropout_p, rowscale, return_dropout_mask)
    _require_tensors(x=x, weight=weight, bias=bias, residual=residual)
    op = _ops.rms_norm_fwd if is_rms_norm else _ops.layer_norm_fwd
    # As in the reference, an explicit residual keeps its dtype whatever residual_in_fp32 says.
    args = (x, weight, bias, residual, _real("eps", eps), bool(prenorm), bool(residual_in_fp32) and residual is None)
    return op(*args) if prenorm else op.first(*args)


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, return_dropout_mask=False):
    """RMSNorm with a fused residual add (mamba-ssm's ``rms_norm_fn``); see :func:`layer_norm_fn`."""
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         residual_in_fp32, True, return_dropout_mask)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """Gated (grouped) RMSNorm of Mamba-2 (mamba-ssm's ``layernorm_gated.rmsnorm_fn``).

    ``norm_before_gate``: y = (rmsnorm(x) * weight + bias) * silu(z); otherwise
    y = rmsnorm(x * silu(z)) * weight + bias; statistics per group of ``group_size`` channels.

    Args:
        x: (..., D). weight: (D,). bias: (D,) or None. z: (..., D), optional.
        eps: > 0. group_size: int dividing D, or None for one group.

    Returns:
        y (..., D) in x's dtype.
    """
    _require_tensors(x=x, weight=weight, bias=bias, z=z)
    eps, norm_before_gate = _real("eps", eps), bool(norm_before_gate)
    if bias is None:
        return _ops.gated_rms_norm_fwd(x, weight, z, eps, group_size, norm_before_gate)
    if z is not None and norm_before_gate:
        # The bias goes in before the gate: normalise without z, then gate here.
        y = _ops.gated_rms_norm_fwd(x, weight, None, eps, group_size, True)
        return ((y + bias) * F.silu(z.to(torch.promote_types(z.dtype, bias.dtype)))).to(x.dtype)
    y = _ops.gated_rms_norm_fwd(x, weight, z, eps, group_size, norm_before_gate)
    return (y + bias).to(x.dtype)


__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "layer_norm_fn",
    "mamba_chunk_scan_combined",
    "rms_norm_fn",
    "rmsnorm_fn",
    "selective_scan_fn",
    "selective_state_update",
]
