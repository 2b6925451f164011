"""One decode step of the selective state space recurrence, updating the state in place.

Letters: B batch, D channels, N state size, G groups, H heads, P head dim. Two forms,
chosen by ``state.ndim``:

- without heads (Mamba-1): state (Bs, D, N), x/dt/z (B, D), A (D, N), B/C (B, N) or
  (B, G, N) with D % G == 0, D/dt_bias (D,);
- with heads (Mamba-2): state (Bs, H, P, N), x/dt/z (B, H, P), A (H, P, N) (may be a
  stride-0 view of a per-head scalar), B/C (B, G, N) with H % G == 0, D/dt_bias (H, P).

Per channel, with its group's B and C:

    dt    = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias   (softplus(v) = v for v > 20)
    state = exp(dt * A) * state + dt * B * x
    out   = <C, state> + D * x,  times silu(z) when z is given
"""

from __future__ import annotations

from ssmcore._checks import ACT, INDEX, PARAM, Dims, ValidCache, check_bool, check_indices, check_writable
from ssmcore._dispatch import resolve

_VALID = ValidCache()  # signatures whose shape/dtype checks passed (a decode loop checks once)


def _check_groups(dims, name, a, channels, channel_letter, allow_shared):
    """B or C: (B, G, N), or (B, N) (one group) where allowed; channels % G == 0."""
    if allow_shared and getattr(a, "ndim", None) == 2:
        dims.check(name, a, "BN", ACT)
        return
    dims.check(name, a, "BGN", ACT, optional=False)
    groups = dims["G"]
    if groups < 1 or channels % groups:
        raise ValueError(
            f"{name}: expected G groups dividing {channel_letter}={channels}, got shape {tuple(a.shape)} (G={groups})"
        )


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One step of the selective SSM recurrence; ``state`` is UPDATED IN PLACE.

    Args:
        state: (Bs, D, N) or (Bs, H, P, N), float32/float16/bfloat16 (float64 on the CPU).
        x, dt: (B, D) or (B, H, P), float32/float16/bfloat16/float64.
        A: (D, N) or (H, P, N), float32/float64 (any strides, stride 0 included).
        B, C: (B, N) or (B, G, N) without heads, (B, G, N) with heads; activation dtypes.
        D, dt_bias: (D,) or (H, P), float32/float64, optional.
        z: like x, optional gate: out is multiplied by silu(z).
        dt_softplus: apply softplus to dt + dt_bias.
        state_batch_indices: (B,) int32/int64, optional: row b uses state[state_batch_indices[b]];
            negative = padding (output 0, no state row touched). Without it Bs must equal B.
            The check that indices are < Bs and distinct reads them back to the host; while the
            current CuPy stream captures a CUDA graph it is skipped, and the GPU kernel instead
            treats an index >= Bs as padding (output 0, no state row read or written).

    Math runs in float32 (float64 when state or an activation is float64); a float16/bfloat16
    state is read, updated in float32 and rounded back once per step.

    Returns:
        out, same shape as x, in x's dtype.
    """
    dt_softplus = check_bool("dt_softplus", dt_softplus)
    call = resolve(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                   state_batch_indices=state_batch_indices)
    state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices = call.arrays.values()
    key = ValidCache.signature(call.library, call.arrays.values())
    if key in _VALID:
        check_writable("state", state)
        check_indices("state_batch_indices", state_batch_indices, state.shape[0], call.xp)
        return call.backend.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                                   state_batch_indices)
    dims = Dims()
    if state.ndim == 3:
        dims.check("state", state, ("Bs", "D", "N"), ACT)
        channels, grouped = "D", "D"
    elif state.ndim == 4:
        dims.check("state", state, ("Bs", "H", "P", "N"), ACT)
        channels, grouped = "HP", "H"
    else:
        raise ValueError(
            f"state: expected a 3-d (Bs, D, N) or 4-d (Bs, H, P, N) array, got shape {tuple(state.shape)}"
        )
    check_writable("state", state)
    dims.check("x", x, "B" + channels, ACT, optional=False)
    dims.check("dt", dt, "B" + channels, ACT, optional=False)
    dims.check("A", A, channels + "N", PARAM, optional=False)
    for name, a in (("B", B), ("C", C)):
        _check_groups(dims, name, a, dims[grouped], grouped, allow_shared=state.ndim == 3)
    dims.check("D", D, channels, PARAM)
    dims.check("z", z, "B" + channels, ACT)
    dims.check("dt_bias", dt_bias, channels, PARAM)
    dims.check("state_batch_indices", state_batch_indices, "B", INDEX)
    if state_batch_indices is None and dims["Bs"] != dims["B"]:
        raise ValueError(
            f"state: expected {dims['B']} rows (B of x) when state_batch_indices is not given, "
            f"got shape {tuple(state.shape)}"
        )
    _VALID.add(key)
    check_indices("state_batch_indices", state_batch_indices, dims["Bs"], call.xp)
    return call.backend.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                               state_batch_indices)
