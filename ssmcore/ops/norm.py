"""Norms: RMSNorm and LayerNorm with a fused residual add, and Mamba-2's gated RMSNorm.

Shapes use the glossary letters; ``...`` is any number of leading dims (possibly none,
possibly of size 0), flattened into independent rows of D channels:

    x, residual, z, dy, dresidual_out   (..., D)   act
    weight, bias                        (D,)       act (float32 usual)

The sum ``s = x + residual`` and all statistics are computed in float32 (float64 when an
activation is float64); ``y`` takes x's dtype. Backward functions recompute the
statistics from their inputs instead of taking saved ones.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ssmcore._checks import ACT, Dims, ValidCache, check_bool, check_finite_float, check_int
from ssmcore._dispatch import resolve

_VALID = ValidCache()  # (op kind, signature) whose shape/dtype checks passed: a decode loop checks once


class NormGrads(NamedTuple):
    """Gradients of rms_norm / layer_norm; each has the dtype of its input (None where the input was None)."""

    dx: Any
    dweight: Any
    dbias: Any
    dresidual: Any


class GatedRMSNormGrads(NamedTuple):
    """Gradients of gated_rms_norm; each has the dtype of its input (dz is None when z was None)."""

    dx: Any
    dweight: Any
    dz: Any


def _row_dims(name: str, x) -> tuple[Dims, tuple]:
    """Bind D from x (..., D) and return the letters every row-shaped argument must match."""
    if len(x.shape) < 1:
        raise ValueError(f"{name}: expected an array of shape (..., D) with at least 1 dim, got shape ()")
    if int(x.shape[-1]) < 1:
        raise ValueError(f"{name}: expected at least one channel (D >= 1) in the last dim, got shape {tuple(x.shape)}")
    letters = tuple(int(s) for s in x.shape[:-1]) + ("D",)
    dims = Dims()
    dims.check(name, x, letters, ACT)
    return dims, letters


def _check_norm_args(call, eps, *, backward: bool = False) -> float:
    key = ValidCache.signature(call.library, call.arrays.values(), ("norm", backward))
    if key not in _VALID:
        dims, letters = _row_dims("x", call["x"])
        dims.check("weight", call["weight"], "D", ACT, optional=False)
        dims.check("bias", call["bias"], "D", ACT)
        dims.check("residual", call["residual"], letters, ACT)
        if backward:
            dims.check("dy", call["dy"], letters, ACT, optional=False)
            dims.check("dresidual_out", call["dresidual_out"], letters, ACT)
        _VALID.add(key)
    return check_finite_float("eps", eps, positive=True)


def _check_gated_args(call, eps, group_size, norm_before_gate, *, backward: bool = False):
    key = ValidCache.signature(call.library, call.arrays.values(), ("gated", backward))
    if key not in _VALID:
        dims, letters = _row_dims("x", call["x"])
        dims.check("weight", call["weight"], "D", ACT, optional=False)
        dims.check("z", call["z"], letters, ACT)
        if backward:
            dims.check("dy", call["dy"], letters, ACT, optional=False)
        _VALID.add(key)
    channels = int(call["x"].shape[-1])
    eps = check_finite_float("eps", eps, positive=True)
    if group_size is not None:
        group_size = check_int("group_size", group_size, minimum=1)
        if channels % group_size != 0:
            raise ValueError(f"group_size: expected a divisor of D={channels}, got {group_size}")
    return eps, group_size, check_bool("norm_before_gate", norm_before_gate)


def rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """RMSNorm of ``s = x + residual``: ``y = s / sqrt(mean(s**2) + eps) * weight (+ bias)``.

    Args:
        x: (..., D) act.
        weight: (D,) act.
        bias: (D,) act or None.
        residual: (..., D) act or None (its dtype may differ from x's).
        eps: finite number > 0.
        prenorm: also return ``s`` (the residual stream for the next block).
        residual_in_fp32: return ``s`` in float32 whatever the input dtypes.

    Returns:
        y (..., D) in x's dtype; or ``(y, s)`` when ``prenorm``, s (..., D) in float32 if
        ``residual_in_fp32``, else in residual's dtype if given, else in x's dtype.
    """
    call = resolve(x=x, weight=weight, bias=bias, residual=residual)
    eps = _check_norm_args(call, eps)
    prenorm = check_bool("prenorm", prenorm)
    residual_in_fp32 = check_bool("residual_in_fp32", residual_in_fp32)
    return call.backend.rms_norm(
        call["x"], call["weight"], call["bias"], call["residual"], eps, prenorm, residual_in_fp32
    )


def layer_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """LayerNorm of ``s = x + residual``: ``y = (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias)``.

    The variance is the biased one (divided by D). Arguments, shapes and results are those of
    :func:`rms_norm`.
    """
    call = resolve(x=x, weight=weight, bias=bias, residual=residual)
    eps = _check_norm_args(call, eps)
    prenorm = check_bool("prenorm", prenorm)
    residual_in_fp32 = check_bool("residual_in_fp32", residual_in_fp32)
    return call.backend.layer_norm(
        call["x"], call["weight"], call["bias"], call["residual"], eps, prenorm, residual_in_fp32
    )


def rms_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    """Backward of :func:`rms_norm`.

    Args:
        dy: (..., D) act, the gradient of y.
        x, weight, bias, residual, eps: the forward's arguments.
        dresidual_out: (..., D) act or None, the gradient of the prenorm output ``s``.

    Returns:
        NormGrads(dx, dweight, dbias, dresidual): dx (..., D) in x's dtype; dweight (D,) and dbias
        (D,) in their inputs' dtypes (dbias None without bias); dresidual (..., D) in residual's
        dtype (None without residual). dx and dresidual are both the gradient of s.
    """
    call = resolve(dy=dy, x=x, weight=weight, bias=bias, residual=residual, dresidual_out=dresidual_out)
    eps = _check_norm_args(call, eps, backward=True)
    return NormGrads(*call.backend.rms_norm_bwd(
        call["dy"], call["x"], call["weight"], call["bias"], call["residual"], eps, call["dresidual_out"]
    ))


def layer_norm_bwd(dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    """Backward of :func:`layer_norm`; arguments and results as in :func:`rms_norm_bwd`."""
    call = resolve(dy=dy, x=x, weight=weight, bias=bias, residual=residual, dresidual_out=dresidual_out)
    eps = _check_norm_args(call, eps, backward=True)
    return NormGrads(*call.backend.layer_norm_bwd(
        call["dy"], call["x"], call["weight"], call["bias"], call["residual"], eps, call["dresidual_out"]
    ))


def gated_rms_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Gated RMSNorm of Mamba-2, statistics per group of ``group_size`` channels.

    ``norm_before_gate=True``: ``y = rmsnorm(x) * weight * silu(z)``;
    ``norm_before_gate=False``: ``y = rmsnorm(x * silu(z)) * weight``; without z, plain
    (grouped) RMSNorm. ``rmsnorm(v) = v / sqrt(mean(v**2) + eps)`` over each group.

    Args:
        x: (..., D) act.
        weight: (D,) act.
        z: (..., D) act or None.
        eps: finite number > 0.
        group_size: int dividing D, or None for one group of D channels.
        norm_before_gate: where the gate is applied (see above).

    Returns:
        y (..., D) in x's dtype.
    """
    call = resolve(x=x, weight=weight, z=z)
    eps, group_size, norm_before_gate = _check_gated_args(call, eps, group_size, norm_before_gate)
    return call.backend.gated_rms_norm(call["x"], call["weight"], call["z"], eps, group_size, norm_before_gate)


def gated_rms_norm_bwd(dy, x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Backward of :func:`gated_rms_norm`.

    Args:
        dy: (..., D) act, the gradient of y; the other arguments are the forward's.

    Returns:
        GatedRMSNormGrads(dx, dweight, dz): dx (..., D) in x's dtype, dweight (D,) in weight's
        dtype, dz (..., D) in z's dtype (None without z).
    """
    call = resolve(dy=dy, x=x, weight=weight, z=z)
    eps, group_size, norm_before_gate = _check_gated_args(call, eps, group_size, norm_before_gate, backward=True)
    return GatedRMSNormGrads(*call.backend.gated_rms_norm_bwd(
        call["dy"], call["x"], call["weight"], call["z"], eps, group_size, norm_before_gate
    ))
