"""Backend choice: one function decides which backend runs an op.

The arrays decide: NumPy arrays run on the Numba CPU backend, CuPy arrays on the
CuPy GPU backend. Any other ``__dlpack__`` producer (a torch tensor, a JAX
array) is imported zero-copy through DLPack first. Backends are imported the
first time an op needs them, so ``import ssmcore`` loads neither numba nor cupy.
"""

from __future__ import annotations

import importlib
import sys

_BACKEND_MODULES = {"numpy": "ssmcore.backends.numba", "cupy": "ssmcore.backends.cupy"}

# DLPack device types (dlpack.h).
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_ROCM, _DL_ROCM_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 10, 11, 13


# type -> 'numpy' / 'cupy' for the array types met so far (the per-call test is then one dict lookup).
_LIBRARY_OF_TYPE: dict = {}


def library_of(a) -> str:
    """'numpy' or 'cupy' for arrays we take as they are, else 'dlpack' or 'other'."""
    lib = _LIBRARY_OF_TYPE.get(type(a))
    if lib is not None:
        return lib
    import numpy as np

    if isinstance(a, np.ndarray):
        lib = "numpy"
    elif type(a).__module__.split(".")[0] == "cupy":
        lib = "cupy"
    elif hasattr(a, "__dlpack__") and hasattr(a, "__dlpack_device__"):
        return "dlpack"
    else:
        return "other"
    _LIBRARY_OF_TYPE[type(a)] = lib
    return lib


def _import_dlpack(name: str, a):
    """Zero-copy import of a foreign array: host memory -> NumPy, device memory -> CuPy."""
    device_type = int(a.__dlpack_device__()[0])
    try:
        if device_type in (_DL_CPU, _DL_CUDA_HOST, _DL_ROCM_HOST):
            import numpy as np

            return np.from_dlpack(a)
        if device_type in (_DL_CUDA, _DL_ROCM, _DL_CUDA_MANAGED):
            cupy = _import_cupy(name)
            return cupy.from_dlpack(a)
    except (BufferError, TypeError, RuntimeError) as err:
        raise TypeError(f"{name}: could not import {type(a).__name__} through DLPack ({err})") from err
    raise TypeError(f"{name}: DLPack device type {device_type} of {type(a).__name__} is not supported (CPU, CUDA or ROCm)")


def _import_cupy(name: str):
    try:
        import cupy
    except ImportError as err:
        raise TypeError(
            f"{name}: is GPU memory, but CuPy is not installed; install ssmcore[cuda12], ssmcore[cuda13] or ssmcore[rocm]"
        ) from err
    return cupy


def _device_id(a) -> int:
    """A CuPy array's device id (from its memory pointer: ``a.device`` builds a Device object per call)."""
    data = a.data
    return int(data.device_id) if hasattr(data, "device_id") else int(a.device.id)


class Call:
    """The arrays of one op call, all in one library on one device, and the backend that runs them."""

    __slots__ = ("library", "arrays", "_backend")

    def __init__(self, library: str, arrays: dict):
        self.library = library
        self.arrays = arrays
        self._backend = None

    @property
    def backend(self):
        if self._backend is None:
            self._backend = load_backend(self.library)
        return self._backend

    @property
    def xp(self):
        return sys.modules[self.library]

    def __getitem__(self, name):
        return self.arrays[name]


def resolve(**named_arrays) -> Call:
    """Bring every non-None argument into one array library and check they share a device.

    Raises TypeError for something that is not an array and ValueError for arrays
    on different devices, naming the argument.
    """
    out = {}
    first = None  # (name, library, device id)
    for name, a in named_arrays.items():
        if a is None:
            out[name] = None
            continue
        lib = library_of(a)
        if lib == "dlpack":
            a = _import_dlpack(name, a)
            lib = library_of(a)
        elif lib == "other":
            raise TypeError(
                f"{name}: expected a NumPy or CuPy array (or a __dlpack__ producer), got {type(a).__name__}"
            )
        dev = _device_id(a) if lib == "cupy" else -1
        if first is None:
            first = (name, lib, dev)
        elif (lib, dev) != first[1:]:
            where = lambda l, d: "host memory (NumPy)" if l == "numpy" else f"GPU {d} (CuPy)"
            raise ValueError(
                f"{name}: is in {where(lib, dev)} but {first[0]} is in {where(first[1], first[2])}; "
                "all arrays of one call must be on the same device"
            )
        out[name] = a
    if first is None:
        raise TypeError("no array arguments were given")
    return Call(first[1], out)


_BACKENDS: dict = {}


def load_backend(library: str):
    """Import (once) and return the backend module for an array library."""
    backend = _BACKENDS.get(library)
    if backend is None:
        backend = _BACKENDS[library] = importlib.import_module(_BACKEND_MODULES[library])
    return backend
