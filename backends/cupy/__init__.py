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

# Ops whose kernels assume non-empty tiles: with a zero-sized dimension (or N == 0) the result is
# trivial or empty, so it is computed by the CPU backend (the arrays are empty or tiny; one host copy).
# name -> (position of x, position of B) among the positional arguments.
_DEGENERATE_ON_HOST = {"ssd": (0, 3), "ssd_bwd": (1, 4)}


def _degenerate_on_host(name, fn, ix, ib):
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        x = args[ix] if len(args) > ix else kwargs["x"]
        B = args[ib] if len(args) > ib else kwargs["B"]
        if x.size and B.shape[-1]:
            return fn(*args, **kwargs)
        import numpy

        from ssmcore.backends import numba as cpu

        cupy = importlib.import_module(fn.__module__).cupy  # (the module's cupy: a NumPy stand-in when emulated)

        def host(a):
            return a.get() if isinstance(a, cupy.ndarray) and not isinstance(a, numpy.ndarray) else a

        def device(a):
            if isinstance(a, numpy.ndarray):
                return cupy.asarray(a)  # (copies to the device)
            if isinstance(a, list):
                return [device(v) for v in a]
            if isinstance(a, tuple):
                return type(a)(*(device(v) for v in a)) if hasattr(a, "_fields") else tuple(device(v) for v in a)
            return a

        result = getattr(cpu, name)(*(host(a) for a in args), **{k: host(v) for k, v in kwargs.items()})
        return device(result)

    return call


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
        if name in _DEGENERATE_ON_HOST:
            value = _degenerate_on_host(name, value, *_DEGENERATE_ON_HOST[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
