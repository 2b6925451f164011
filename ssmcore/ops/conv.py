"""Causal depthwise conv1d: prefill (forward and backward) and decode (in-place state update).

Letters: B batch, D channels, L length, W conv width (1 <= W <= 64). The convolution of
Mamba's mixers: each channel convolves its own past W inputs,

    out[b, d, t] = act(bias[d] + sum_{k<W} weight[d, k] * x[b, d, t - (W-1) + k])

with act = identity or silu ("swish" is the same). Inputs before t = 0 are
``initial_states`` (else 0).

Packed sequences: ``seq_idx[b, t]`` names the sequence of position t. A tap that reads an
input of another sequence contributes 0, so sequences packed in one row never see each
other; ``seq_idx < 0`` marks padding, whose output is 0. ``initial_states`` belong to the
sequence of t = 0: they feed only the taps of positions whose id equals ``seq_idx[b, 0]``.
Accepting ``seq_idx`` together with ``initial_states`` goes beyond the reference package.
"""

from __future__ import annotations

from typing import NamedTuple

from ssmcore._checks import (
    ACT, INDEX, Dims, ValidCache, check_bool, check_choice, check_dtype, check_indices, check_writable, dtype_name,
    stream_capturing,
)
from ssmcore._dispatch import resolve

_VALID_UPDATE = ValidCache()  # signatures whose shape/dtype checks passed (a decode loop checks once)

MAX_WIDTH = 64
ACTIVATIONS = (None, "silu", "swish")


class CausalConv1dGrads(NamedTuple):
    """Gradients of causal_conv1d; None where the input was None."""

    dx: object  # (B, D, L), x's dtype and memory layout
    dweight: object  # (D, W), weight's dtype
    dbias: object  # (D,), bias's dtype, or None
    dinitial_states: object  # (B, D, W-1), initial_states' dtype, or None


def _check_param(name, a, x):
    """weight, bias, initial_states: x's dtype or float32."""
    if a is not None:
        check_dtype(name, a, tuple(dict.fromkeys((dtype_name(x), "float32"))))


def _check_weight(dims, weight, x):
    dims.check("weight", weight, "DW", ACT, optional=False)
    _check_param("weight", weight, x)
    width = dims["W"]
    if not 1 <= width <= MAX_WIDTH:
        raise ValueError(f"weight: expected a width W in 1..{MAX_WIDTH}, got shape {tuple(weight.shape)} (W={width})")
    return width


_VALID_PREFILL = ValidCache()  # (direction, signature) of causal_conv1d / _bwd calls whose checks passed


def _prefill_key(call, direction, activation):
    """The ValidCache key of a prefill call; None (always check) for an activation that is not a str/None."""
    if activation is not None and type(activation) is not str:
        return None
    return ValidCache.signature(call.library, call.arrays.values(), (direction, activation))


def _check_prefill(x, weight, bias, activation, seq_idx, initial_states):
    """Shared checks of causal_conv1d and causal_conv1d_bwd; returns the Dims."""
    check_choice("activation", activation, ACTIVATIONS)
    dims = Dims()
    dims.check("x", x, "BDL", ACT, optional=False)
    if dims["L"] < 1:
        raise ValueError(f"x: expected a length L >= 1, got shape {tuple(x.shape)}")
    width = _check_weight(dims, weight, x)
    dims.check("bias", bias, "D")
    _check_param("bias", bias, x)
    dims.check("seq_idx", seq_idx, "BL", INDEX)
    dims.check("initial_states", initial_states, ("B", "D", width - 1))
    _check_param("initial_states", initial_states, x)
    return dims


def causal_conv1d(x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                  return_final_states=False):
    """Causal depthwise conv1d over time.

    Args:
        x: (B, D, L) float32/float16/bfloat16 (float64 on the CPU), any strides: contiguous or
            channel-last (a (B, L, D) array transposed). The output has x's memory layout.
        weight: (D, W), x's dtype or float32, 1 <= W <= 64.
        bias: (D,), x's dtype or float32, optional.
        activation: None, "silu" or "swish".
        seq_idx: (B, L) int32/int64, optional: sequence id per position, < 0 for padding.
        initial_states: (B, D, W-1), x's dtype or float32, optional: the W-1 inputs before t = 0.
        return_final_states: also return the state to continue from.

    Returns:
        out (B, D, L) in x's dtype, or (out, final_states) with final_states (B, D, W-1) in
        initial_states' dtype (x's dtype without them): the last W-1 entries of
        concat(initial_states or 0, x) along time. Entries outside the sequence of position
        L-1 are 0 (all of them when L-1 is padding), so continuing a packed batch never leaks
        another sequence.
    """
    return_final_states = check_bool("return_final_states", return_final_states)
    call = resolve(x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states)
    x, weight, bias = call["x"], call["weight"], call["bias"]
    seq_idx, initial_states = call["seq_idx"], call["initial_states"]
    key = _prefill_key(call, "fwd", activation)
    if key not in _VALID_PREFILL:
        _check_prefill(x, weight, bias, activation, seq_idx, initial_states)
        _VALID_PREFILL.add(key)
    return call.backend.causal_conv1d(x, weight, bias, activation, seq_idx, initial_states, return_final_states)


def causal_conv1d_bwd(dout, x, weight, bias=None, activation=None, seq_idx=None, initial_states=None,
                      dfinal_states=None):
    """Gradients of causal_conv1d.

    Args:
        dout: (B, D, L) gradient of out, float32/float16/bfloat16/float64, any strides.
        x, weight, bias, activation, seq_idx, initial_states: as given to causal_conv1d.
        dfinal_states: (B, D, W-1) gradient of final_states, optional (any float dtype).

    Returns:
        CausalConv1dGrads(dx (B, D, L), dweight (D, W), dbias (D,) or None,
        dinitial_states (B, D, W-1) or None), each in its input's dtype; dx has x's layout.
    """
    call = resolve(dout=dout, x=x, weight=weight, bias=bias, seq_idx=seq_idx, initial_states=initial_states,
                   dfinal_states=dfinal_states)
    dout, x, weight, bias = call["dout"], call["x"], call["weight"], call["bias"]
    seq_idx, initial_states, dfinal_states = call["seq_idx"], call["initial_states"], call["dfinal_states"]
    key = _prefill_key(call, "bwd", activation)
    if key not in _VALID_PREFILL:
        dims = _check_prefill(x, weight, bias, activation, seq_idx, initial_states)
        dims.check("dout", dout, "BDL", ACT, optional=False)
        dims.check("dfinal_states", dfinal_states, ("B", "D", dims["W"] - 1), ACT)
        _VALID_PREFILL.add(key)
    grads = call.backend.causal_conv1d_bwd(dout, x, weight, bias, activation, seq_idx, initial_states,
                                           dfinal_states)
    return CausalConv1dGrads(*grads)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode step(s) of the causal conv; ``conv_state`` is UPDATED IN PLACE.

    Args:
        x: (B, D) or (B, D, Lnew) new inputs, float32/float16/bfloat16 (float64 on the CPU).
        conv_state: (Bs, D, state_len), state_len >= W-1, any float dtype; written in place.
            Without cache_seqlens it is a shift window holding the last state_len inputs,
            oldest first: new inputs are shifted in at the end.
        weight: (D, W), x's dtype or float32, 1 <= W <= 64.
        bias: (D,), x's dtype or float32, optional.
        activation: None, "silu" or "swish".
        cache_seqlens: (B,) int32/int64 >= 0, optional: the state is a circular buffer;
            new token j of row b is written at (cache_seqlens[b] + j) % state_len and its conv
            reads the W-1 ring entries before it.
        conv_state_indices: (B,) int32/int64, optional: row b uses conv_state[conv_state_indices[b]];
            negative = padding (output 0, no state row touched). Without it Bs must equal B.

    Index checks (indices < Bs and distinct, cache_seqlens >= 0) read the arrays back to the host; while
    the current CuPy stream captures a CUDA graph they are skipped, and the GPU kernel instead treats a
    row whose index is >= Bs (or whose cache_seqlens is negative) as padding: output 0, no state row
    read or written.

    Returns:
        out, same shape and dtype as x.
    """
    check_choice("activation", activation, ACTIVATIONS)
    call = resolve(x=x, conv_state=conv_state, weight=weight, bias=bias, cache_seqlens=cache_seqlens,
                   conv_state_indices=conv_state_indices)
    x, conv_state, weight, bias, cache_seqlens, conv_state_indices = call.arrays.values()
    key = ValidCache.signature(call.library, call.arrays.values(), activation)
    if key in _VALID_UPDATE:
        check_writable("conv_state", conv_state)
        _check_update_values(cache_seqlens, conv_state_indices, conv_state.shape[0], call.xp)
        return call.backend.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                                 conv_state_indices)
    dims = Dims()
    if x.ndim == 2:
        dims.check("x", x, "BD", ACT)
    elif x.ndim == 3:
        dims.check("x", x, "BDL", ACT)
        if dims["L"] < 1:
            raise ValueError(f"x: expected Lnew >= 1 new tokens, got shape {tuple(x.shape)}")
    else:
        raise ValueError(f"x: expected a 2-d (B, D) or 3-d (B, D, Lnew) array, got shape {tuple(x.shape)}")
    width = _check_weight(dims, weight, x)
    dims.check("conv_state", conv_state, ("Bs", "D", "state_len"), ACT, optional=False)
    if dims["state_len"] < width - 1:
        raise ValueError(f"conv_state: expected state_len >= W-1 = {width - 1}, got shape {tuple(conv_state.shape)}")
    check_writable("conv_state", conv_state)
    dims.check("bias", bias, "D")
    _check_param("bias", bias, x)
    dims.check("cache_seqlens", cache_seqlens, "B", INDEX)
    dims.check("conv_state_indices", conv_state_indices, "B", INDEX)
    if conv_state_indices is None and dims["Bs"] != dims["B"]:
        raise ValueError(
            f"conv_state: expected {dims['B']} rows (B of x) when conv_state_indices is not given, "
            f"got shape {tuple(conv_state.shape)}"
        )
    _VALID_UPDATE.add(key)
    _check_update_values(cache_seqlens, conv_state_indices, dims["Bs"], call.xp)
    return call.backend.causal_conv1d_update(x, conv_state, weight, bias, activation, cache_seqlens,
                                             conv_state_indices)


def _check_update_values(cache_seqlens, conv_state_indices, n_rows, xp):
    """The checks of causal_conv1d_update that read values (host syncs; skipped under graph capture)."""
    if (cache_seqlens is not None and cache_seqlens.size and not stream_capturing(xp)
            and int(cache_seqlens.min()) < 0):
        raise ValueError(f"cache_seqlens: expected lengths >= 0, got min {int(cache_seqlens.min())}")
    check_indices("conv_state_indices", conv_state_indices, n_rows, xp)
