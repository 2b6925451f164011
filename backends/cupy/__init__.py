"""CuPy GPU backend (``ssmcore.backends.cupy``): CUDA/HIP kernels compiled at run time.

Each op family has one ``.cu`` source beside this file, compiled by NVRTC (CUDA)
or hiprtc (HIP) through ``cupy.RawModule`` the first time it runs, and launched
on the caller's current stream.
"""

from __future__ import annotations

import importlib

_OPS = {
    "selective_scan": "scan",
    "selective_scan_bwd": "scan",
    "causal_conv1d": "conv",
    "causal_conv1d_bwd": "conv",
    "causal_conv1d_update": "conv",
    "selective_state_update": "state_update",
    "ssd": "state_space_duality",
    "ssd_bwd": "state_space_duality_bwd",
    "rms_norm": "norm",
    "rms_norm_bwd": "norm",
    "layer_norm": "norm",
    "layer_norm_bwd": "norm",
    "gated_rms_norm": "norm",
    "gated_rms_norm_bwd": "norm",
}

__all__ = sorted(_OPS)


def __getattr__(name):
    if name in _OPS:
        try:
            module = importlib.import_module(f"{__name__}.{_OPS[name]}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{_OPS[name]}":
                raise
            raise NotImplementedError(
                f"{name}: the CuPy GPU backend has no kernel for this op yet; pass NumPy arrays to run it on the CPU"
            ) from None
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
