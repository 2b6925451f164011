"""SSD: the Mamba-2 state space layer (state space duality), forward and backward.

Glossary: B batch, L length, H heads, P head dim, G groups (H % G == 0; head h
reads the B and C of group h // (H / G)), N state size, S sequences of a packed
batch. Per (batch, head) the state is a P x N matrix:

    dt'_t = clamp(softplus(dt_t + dt_bias) or dt_t + dt_bias, *dt_limit)
    h_t   = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t B_t^T        (h_{-1} = initial_states or 0)
    y_t   = h_t C_t + D * x_t ;  out_t = y_t * silu(z_t)

The clamp applies only when dt_limit differs from (0, inf), as in the reference
package. A change of seq_idx between t-1 and t resets the state to 0 before step t,
so initial_states feed only the first sequence of each row. ``chunk_size`` is a
speed knob: results do not depend on it beyond rounding.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .._checks import (
    ACT,
    INDEX,
    PARAM,
    Dims,
    check_bool,
    check_dtype,
    check_finite_float,
    check_int,
    check_same_dtype,
    dtype_name,
)
from .._dispatch import resolve

_NO_LIMIT = (0.0, math.inf)


class SSDGrads(NamedTuple):
    """Gradients of ssd; None where the input was None. Each has its input's shape and dtype."""

    dx: object
    ddt: object
    dA: object
    dB: object
    dC: object
    dD: object
    dz: object
    ddt_bias: object
    dinitial_states: object


def _host(a):
    """A small index array on the host (CuPy arrays are copied over)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def _check_dt_limit(dt_limit):
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise TypeError(f"dt_limit: expected a pair (lo, hi), got {dt_limit!r}")
    lo = check_finite_float("dt_limit", dt_limit[0], allow_inf=True)
    hi = check_finite_float("dt_limit", dt_limit[1], allow_inf=True)
    if lo > hi:
        raise ValueError(f"dt_limit: expected lo <= hi, got ({lo}, {hi})")
    return lo, hi


def _check_state_dtype(state_dtype):
    """A NumPy dtype from a dtype, a dtype name or a framework dtype (torch.bfloat16: its name)."""
    if state_dtype is None:
        return None
    try:
        dtype = np.dtype(state_dtype)
    except TypeError:
        name = str(state_dtype).rsplit(".", 1)[-1]
        if name not in ACT:
            raise TypeError(f"state_dtype: expected one of {', '.join(ACT)} or None, got {state_dtype!r}") from None
        if name == "bfloat16":
            import ml_dtypes

            dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            dtype = np.dtype(name)
    if dtype.name not in ACT:
        raise TypeError(f"state_dtype: expected one of {', '.join(ACT)} or None, got {dtype.name}")
    return dtype


def _check_cu_seqlens(cu_seqlens, batch, length):
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: expected a 1-d array of shape (S+1,) with S >= 1, got shape {tuple(cu_seqlens.shape)}"
        )
    check_dtype("cu_seqlens", cu_seqlens, INDEX)
    if batch != 1:
        raise ValueError(f"cu_seqlens: expected batch B == 1 (sequences packed into one row), got B={batch}")
    cu = np.asarray(_host(cu_seqlens), dtype=np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: expected to start at 0, got {cu[0]}")
    if not (np.diff(cu) > 0).all():
        raise ValueError(f"cu_seqlens: expected strictly increasing offsets, got {cu.tolist()}")
    if cu[-1] != length:
        raise ValueError(f"cu_seqlens: expected to end at L={length}, got {cu[-1]}")


def _validate(call, chunk_size, dt_softplus, dt_limit):
    """Check every array and scalar shared by ssd and ssd_bwd.

    Returns (dims, chunk_size, dt_softplus, (lo, hi)): the bound sizes and the checked scalars.
    """
    x, dt, A, B, C = call["x"], call["dt"], call["A"], call["B"], call["C"]
    dims = Dims()
    dims.check("x", x, "BLHP", ACT, optional=False)
    dims.check("dt", dt, "BLH", optional=False)
    if dtype_name(dt) not in (dtype_name(x), "float32"):
        raise TypeError(f"dt: expected dtype {dtype_name(x)} (the dtype of x) or float32, got {dtype_name(dt)}")
    dims.check("A", A, "H", PARAM, optional=False)
    dims.check("B", B, "BLGN", ACT, optional=False)
    dims.check("C", C, "BLGN", ACT, optional=False)
    if dims["G"] == 0 or dims["H"] % dims["G"]:
        raise ValueError(f"B: expected a number of groups G that divides H={dims['H']}, got G={dims['G']}")
    D = call["D"]
    if D is not None:
        if D.ndim not in (1, 2):
            raise ValueError(f"D: expected shape (H,) or (H, P), got shape {tuple(D.shape)}")
        dims.check("D", D, "H" if D.ndim == 1 else "HP", PARAM)
    dims.check("z", call["z"], "BLHP")
    check_same_dtype("z", call["z"], "x", x)
    dims.check("dt_bias", call["dt_bias"], "H", PARAM)
    dims.check("initial_states", call["initial_states"], "BHPN", PARAM)
    dims.check("seq_idx", call["seq_idx"], "BL", INDEX)
    if call["cu_seqlens"] is not None:
        _check_cu_seqlens(call["cu_seqlens"], dims["B"], dims["L"])
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    dt_softplus = check_bool("dt_softplus", dt_softplus)
    return dims, chunk_size, dt_softplus, _check_dt_limit(dt_limit)


def ssd(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
        dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None,
        return_final_states=False, return_varlen_states=False, state_dtype=None):
    """Mamba-2 SSD forward (see the module docstring for the math).

    Args:
        x: (B, L, H, P) float32, float16, bfloat16 or float64.
        dt: (B, L, H), x's dtype or float32.
        A: (H,) float32/float64 (negative for a decaying state).
        B, C: (B, L, G, N) act; H % G == 0.
        chunk_size: int >= 1; a speed knob (on the CPU, the checkpoint interval of the backward).
        D: (H,) or (H, P) float32/float64, the skip connection.
        z: (B, L, H, P) in x's dtype, the gate: out = y * silu(z).
        dt_bias: (H,) float32/float64, added to dt before softplus.
        dt_softplus: apply softplus(v) = log(1 + e^v) (v itself above 20) to dt + dt_bias.
        dt_limit: (lo, hi), lo <= hi; dt' is clamped to it unless it is (0, inf).
        initial_states: (B, H, P, N) float32/float64, the state before step 0.
        seq_idx: (B, L) int32/int64 sequence ids of packed rows; a change resets the state.
        cu_seqlens: (S+1,) int32/int64 offsets of S sequences packed into one row (B == 1):
            0 = cu_seqlens[0] < ... < cu_seqlens[S] = L. Gives seq_idx when seq_idx is None.
        return_final_states: also return the state after step L-1, (B, H, P, N).
        return_varlen_states: also return the state at the end of each sequence of cu_seqlens,
            (S, H, P, N); needs cu_seqlens.
        state_dtype: dtype of the returned states (float32, float16, bfloat16, float64);
            None: float32, or float64 when the inputs are float64.

    Returns:
        out (B, L, H, P) in x's dtype; (out, final_states), (out, varlen_states) or
        (out, final_states, varlen_states) as asked.
    """
    call = resolve(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                   seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    _, chunk_size, dt_softplus, dt_limit = _validate(call, chunk_size, dt_softplus, dt_limit)
    return_final_states = check_bool("return_final_states", return_final_states)
    return_varlen_states = check_bool("return_varlen_states", return_varlen_states)
    if return_varlen_states and call["cu_seqlens"] is None:
        raise ValueError("return_varlen_states: needs cu_seqlens (the sequences whose final states to return)")
    state_dtype = _check_state_dtype(state_dtype)
    return call.backend.ssd(
        call["x"], call["dt"], call["A"], call["B"], call["C"], chunk_size=chunk_size, D=call["D"], z=call["z"],
        dt_bias=call["dt_bias"], dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=call["initial_states"], seq_idx=call["seq_idx"], cu_seqlens=call["cu_seqlens"],
        return_final_states=return_final_states, return_varlen_states=return_varlen_states,
        state_dtype=state_dtype)


def ssd_bwd(dout, x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
            dt_limit=_NO_LIMIT, initial_states=None, seq_idx=None, cu_seqlens=None, dfinal_states=None):
    """Gradients of ssd: the forward's arguments plus dout and, optionally, dfinal_states.

    Args:
        dout: (B, L, H, P) act, the gradient of out.
        dfinal_states: (B, H, P, N) act or None, the gradient of the final states.
        The others: as in ssd (the gradient of varlen states is not supported).

    Returns:
        SSDGrads(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states): each in its
        input's shape and dtype, None for inputs that were None. Where dt_limit clamps
        dt', the gradient through dt is 0. Memory: B*H*P*N*ceil(L/chunk_size) checkpoints.
    """
    call = resolve(dout=dout, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                   dfinal_states=dfinal_states)
    dims, chunk_size, dt_softplus, dt_limit = _validate(call, chunk_size, dt_softplus, dt_limit)
    dims.check("dout", call["dout"], "BLHP", ACT, optional=False)
    dims.check("dfinal_states", call["dfinal_states"], "BHPN", ACT)
    grads = call.backend.ssd_bwd(
        call["dout"], call["x"], call["dt"], call["A"], call["B"], call["C"], chunk_size=chunk_size, D=call["D"],
        z=call["z"], dt_bias=call["dt_bias"], dt_softplus=dt_softplus, dt_limit=dt_limit,
        initial_states=call["initial_states"], seq_idx=call["seq_idx"], cu_seqlens=call["cu_seqlens"],
        dfinal_states=call["dfinal_states"])
    return SSDGrads(*grads)
