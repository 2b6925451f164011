"""ssmcore: selective state space models (Mamba-1 selective scan, Mamba-2 SSD).

Ops take NumPy arrays (Numba CPU backend) or CuPy arrays (GPU backend, kernels
compiled at run time) and return arrays of the same library on the same device.
Shapes use one glossary everywhere: B batch, L length, D channels, N state size,
G groups, H heads, P head dim, W conv width, S sequences in a packed batch.

``import ssmcore`` is cheap: it imports NumPy only. The op modules load on first
use, and a backend (numba, cupy) loads the first time an op runs on it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "selective_scan": "ssmcore.ops.scan",
    "selective_scan_bwd": "ssmcore.ops.scan",
    "SelectiveScanGrads": "ssmcore.ops.scan",
    "causal_conv1d": "ssmcore.ops.conv",
    "causal_conv1d_bwd": "ssmcore.ops.conv",
    "CausalConv1dGrads": "ssmcore.ops.conv",
    "causal_conv1d_update": "ssmcore.ops.conv",
    "selective_state_update": "ssmcore.ops.state_update",
    "ssd": "ssmcore.ops.ssd",
    "ssd_bwd": "ssmcore.ops.ssd",
    "SSDGrads": "ssmcore.ops.ssd",
    "rms_norm": "ssmcore.ops.norm",
    "rms_norm_bwd": "ssmcore.ops.norm",
    "layer_norm": "ssmcore.ops.norm",
    "layer_norm_bwd": "ssmcore.ops.norm",
    "NormGrads": "ssmcore.ops.norm",
    "gated_rms_norm": "ssmcore.ops.norm",
    "gated_rms_norm_bwd": "ssmcore.ops.norm",
    "GatedRMSNormGrads": "ssmcore.ops.norm",
}

__all__ = sorted(_EXPORTS) + ["reference", "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name == "reference":
        return importlib.import_module("ssmcore.reference")
    raise AttributeError(f"module 'ssmcore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
