"""Numba CPU backend (``ssmcore.backends.numba``).

Kernels are ``@njit(parallel=True, cache=True)`` functions, parallel over
independent rows, compiled once and cached on disk. Math runs in float32
(float64 for float64 inputs); float16 and bfloat16 (ml_dtypes) inputs are
converted to float32 on the way in and results converted back on the way out.

Each op family lives in its own module and loads on first use, so calling one
op compiles (or loads from the cache) only that family's kernels.
"""

from __future__ import annotations

import functools
import importlib

from ssmcore.backends.numba._common import one_thread_if_small

_OPS = {
    "selective_scan": "scan",
    "selective_scan_bwd": "scan",
    "causal_conv1d": "conv",
    "causal_conv1d_bwd": "conv",
    "causal_conv1d_update": "conv",
    "selective_state_update": "state_update",
    "ssd": "state_space_duality",
    "ssd_bwd": "state_space_duality",
    "rms_norm": "norm",
    "rms_norm_bwd": "norm",
    "layer_norm": "norm",
    "layer_norm_bwd": "norm",
    "gated_rms_norm": "norm",
    "gated_rms_norm_bwd": "norm",
}

__all__ = sorted(_OPS)


def _serial_when_small(op):
    """Run ``op`` on one thread when its largest array is small.

    Waking the worker threads of a parallel region costs tens of microseconds on an idle machine
    and milliseconds on a busy one, more than a decode step's whole work; one thread avoids it.
    """

    @functools.wraps(op)
    def run(*args, **kwargs):
        sizes = [a.size for a in (*args, *kwargs.values()) if hasattr(a, "size") and hasattr(a, "dtype")]
        with one_thread_if_small(max(sizes, default=0)):
            return op(*args, **kwargs)

    return run


def __getattr__(name):
    if name in _OPS:
        value = _serial_when_small(getattr(importlib.import_module(f"{__name__}.{_OPS[name]}"), name))
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
