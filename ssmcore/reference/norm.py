"""Float64 references for the norm family (RMSNorm, LayerNorm, gated RMSNorm).

Same signatures as the ops in ssmcore.ops.norm; results are float64 and residual_in_fp32 (a
storage dtype choice) does not change them.
"""

from __future__ import annotations

import numpy as np


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _residual_sum(x, residual):
    s = _f64(x)
    return s if residual is None else s + _f64(residual)


def rms_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """y = s / sqrt(mean(s**2) + eps) * weight (+ bias) with s = x + residual; y or (y, s)."""
    s = _residual_sum(x, residual)
    y = s / np.sqrt(np.mean(s**2, axis=-1, keepdims=True) + eps) * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return (y, s) if prenorm else y


def layer_norm(x, weight, bias=None, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    """y = (s - mean(s)) / sqrt(var(s) + eps) * weight (+ bias) with s = x + residual; y or (y, s)."""
    s = _residual_sum(x, residual)
    centered = s - np.mean(s, axis=-1, keepdims=True)
    y = centered / np.sqrt(np.mean(centered**2, axis=-1, keepdims=True) + eps) * _f64(weight)
    if bias is not None:
        y = y + _f64(bias)
    return (y, s) if prenorm else y


def gated_rms_norm(x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """rmsnorm(x) * weight * silu(z) or rmsnorm(x * silu(z)) * weight, statistics per group of channels."""
    x = _f64(x)
    d = x.shape[-1]
    group_size = d if group_size is None else group_size
    gate = 1.0 if z is None else _f64(z) / (1.0 + np.exp(-_f64(z)))
    v = x if norm_before_gate else x * gate
    groups = v.reshape(v.shape[:-1] + (d // group_size, group_size))
    normed = groups / np.sqrt(np.mean(groups**2, axis=-1, keepdims=True) + eps)
    y = normed.reshape(x.shape) * _f64(weight)
    return y * gate if norm_before_gate else y
