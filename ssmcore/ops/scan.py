"""Selective scan (Mamba-1): ``selective_scan`` and its backward ``selective_scan_bwd``.

Letters: B batch, D channels, L length, N state size, G groups. Per (b, d) row, with state h (N,):

    dt_t = softplus(delta_t + delta_bias)  if delta_softplus else  delta_t + delta_bias
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          h_{-1} = initial_state or 0
    y_t  = <C_t, h_t> + D * u_t
    out  = y * silu(z)  if z is given else  y

softplus(x) = x for x > 20, log1p(exp(x)) otherwise.
"""

from __future__ import annotations

from typing import NamedTuple

from .._checks import ACT, PARAM, Dims, ValidCache, check_bool, check_is_array, check_same_dtype
from .._dispatch import resolve

_VALID = ValidCache()  # (op, signature) whose shape/dtype checks passed: a loop of same-shaped calls checks once


class SelectiveScanGrads(NamedTuple):
    """Gradients of ``selective_scan``, each in the dtype and shape of its input (None where the input
    was None)."""

    du: object
    ddelta: object
    dA: object
    dB: object
    dC: object
    dD: object
    dz: object
    ddelta_bias: object
    dinitial_state: object


def _check_B_or_C(name, X, dims, u):
    """(D, N) constant (parameter dtype), or (B, N, L) / (B, G, N, L) input-dependent (u's dtype)."""
    check_is_array(name, X)
    if X.ndim == 2:
        dims.check(name, X, "DN", PARAM)
        return
    if X.ndim == 3:
        dims.check(name, X, "BNL")
    elif X.ndim == 4:
        groups = int(X.shape[1])
        dims.check(name, X, ("B", groups, "N", "L"))
        if groups == 0 or dims["D"] % groups:
            raise ValueError(
                f"{name}: has G={groups} groups (shape {tuple(X.shape)}), but D={dims['D']} channels "
                "is not a multiple of G"
            )
    else:
        raise ValueError(
            f"{name}: expected a 2-d (D, N) constant, a 3-d (B, N, L) or a 4-d (B, G, N, L) "
            f"input-dependent array, got shape {tuple(X.shape)}"
        )
    check_same_dtype(name, X, "u", u)


def _check_args(a, delta_softplus):
    """Validate the arguments shared by the forward and the backward (``a``: converted arrays)."""
    dims = Dims()
    u = dims.check("u", a["u"], "BDL", ACT, optional=False)
    dims.check("delta", a["delta"], "BDL", optional=False)
    check_same_dtype("delta", a["delta"], "u", u)
    A = a["A"]
    check_is_array("A", A)
    if A.dtype.kind == "c":
        raise TypeError(
            f"A: complex A is not supported (the legacy S4-style complex scan is optional in the "
            f"contract); expected a real float32 or float64 (D, N) array, got {A.dtype.name}"
        )
    dims.check("A", A, "DN", PARAM)
    _check_B_or_C("B", a["B"], dims, u)
    _check_B_or_C("C", a["C"], dims, u)
    dims.check("D", a["D"], "D", PARAM)
    dims.check("z", a["z"], "BDL")
    check_same_dtype("z", a["z"], "u", u)
    dims.check("delta_bias", a["delta_bias"], "D", PARAM)
    dims.check("initial_state", a["initial_state"], "BDN", PARAM)
    check_bool("delta_softplus", delta_softplus)
    return dims


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Selective scan of Mamba-1 (the S6 recurrence), see the module docstring for the math.

    Args:
        u: (B, D, L) input, float32, float16, bfloat16 (float64 on the CPU).
        delta: (B, D, L) step sizes before bias/softplus, in u's dtype.
        A: (D, N) float32 (float64 on the CPU), real. Complex A (the legacy S4-style scan) is not
            supported: it raises TypeError.
        B: (D, N) constant (float32/float64), or input-dependent (B, N, L) or (B, G, N, L) in u's
            dtype, D % G == 0 (channel d uses group d // (D / G)).
        C: like B, independently of B (e.g. B constant and C grouped).
        D: (D,) float32/float64 skip weight, optional.
        z: (B, D, L) gate in u's dtype, optional: out = y * silu(z).
        delta_bias: (D,) float32/float64, added to delta before the softplus, optional.
        delta_softplus: bool, apply softplus to delta + delta_bias.
        initial_state: (B, D, N) float32/float64, the state before step 0 (zeros if None).
        return_last_state: bool, also return the state after the last step.

    Returns:
        out (B, D, L) in u's dtype, or (out, last_state) with return_last_state; last_state is
        (B, D, N) float32 (float64 for float64 u).

    Math runs in float32 (float64 for float64 u); arrays of the same library and device as u.
    """
    call = resolve(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                   initial_state=initial_state)
    key = ValidCache.signature(call.library, call.arrays.values(),
                               ("fwd", delta_softplus, return_last_state)) if type(delta_softplus) is bool \
        and type(return_last_state) is bool else None
    if key not in _VALID:
        _check_args(call, delta_softplus)
        check_bool("return_last_state", return_last_state)
        _VALID.add(key)
    a = call.arrays
    return call.backend.selective_scan(
        a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"], delta_bias=a["delta_bias"],
        delta_softplus=bool(delta_softplus), initial_state=a["initial_state"],
        return_last_state=bool(return_last_state),
    )


def selective_scan_bwd(dout, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, dlast_state=None):
    """Backward of ``selective_scan``.

    Args:
        dout: (B, D, L) gradient of out, in u's dtype.
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state: as given to the forward.
        dlast_state: (B, D, N) float32/float64 gradient of last_state, optional (zero if None).

    Returns:
        SelectiveScanGrads(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state): each in the
        shape and dtype of its input, None for inputs that were None. dB/dC of a constant (D, N) B/C
        are summed over batch and time; of a (B, N, L) or (B, G, N, L) one, over the channels that
        share it.

    Memory: the states are recomputed from checkpoints taken every few dozen steps; nothing of size
    B * D * N * L is stored.
    """
    call = resolve(dout=dout, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                   initial_state=initial_state, dlast_state=dlast_state)
    a = call.arrays
    key = ValidCache.signature(call.library, a.values(), ("bwd", delta_softplus)) \
        if type(delta_softplus) is bool else None
    if key not in _VALID:
        dims = _check_args(call, delta_softplus)
        dims.check("dout", a["dout"], "BDL", optional=False)
        check_same_dtype("dout", a["dout"], "u", a["u"])
        dims.check("dlast_state", a["dlast_state"], "BDN", PARAM)
        _VALID.add(key)
    grads = call.backend.selective_scan_bwd(
        a["dout"], a["u"], a["delta"], a["A"], a["B"], a["C"], D=a["D"], z=a["z"],
        delta_bias=a["delta_bias"], delta_softplus=bool(delta_softplus),
        initial_state=a["initial_state"], dlast_state=a["dlast_state"],
    )
    return SelectiveScanGrads(*grads)
