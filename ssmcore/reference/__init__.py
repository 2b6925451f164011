"""Float64 NumPy references: the oracles every backend is tested against.

Written for clarity, not speed: plain loops over time in the notation of the
papers. Each function takes NumPy arrays of any float dtype, computes in float64
and returns float64 results with the same shapes as the op it checks.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "selective_scan": "scan",
    "causal_conv1d": "conv",
    "causal_conv1d_update": "conv",
    "selective_state_update": "state_update",
    "ssd": "state_space_duality",
    "ssd_minimal_discrete": "state_space_duality",
    "ssd_minimal": "state_space_duality",
    "discretize": "state_space_duality",
    "segsum": "state_space_duality",
    "rms_norm": "norm",
    "layer_norm": "norm",
    "gated_rms_norm": "norm",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
