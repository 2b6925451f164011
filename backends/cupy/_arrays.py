"""Array plumbing shared by the CuPy launchers: kernel element types, layouts, device facts."""

from __future__ import annotations

import functools

import cupy
import numpy as np

from . import _runtime

# Element types the kernels are instantiated for (float64 runs on the CPU backend only).
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
NULL = np.uint64(0)  # a null pointer argument


# dtype -> kernel type name, for the kernel dtypes only (NumPy builds ``dtype.name`` on every access).
_KERNEL_TYPES: dict = {}


def kernel_type(name: str, a) -> str:
    """The kernel type name of ``a``'s dtype; TypeError naming ``name`` for dtypes with no kernel."""
    dtype = a.dtype
    try:
        return _KERNEL_TYPES[dtype]
    except KeyError:
        pass
    if dtype.name not in KERNEL_DTYPES:
        raise TypeError(
            f"{name}: dtype {a.dtype.name} has no GPU kernel (float32, float16 or bfloat16); "
            "pass NumPy arrays to run float64 on the CPU backend"
        )
    result = _KERNEL_TYPES[dtype] = _runtime.ctype(dtype)
    return result


_DTYPE_CODES: dict = {}


def dtype_code(a, codes: dict) -> int:
    """``codes[a.dtype.name]`` without building the name each call (codes: a module-level constant)."""
    key = (a.dtype, id(codes))
    try:
        return _DTYPE_CODES[key]
    except KeyError:
        code = _DTYPE_CODES[key] = codes[a.dtype.name]
        return code


def check_kernel_dtypes(**arrays) -> None:
    """kernel_type() for every non-None array, so errors come before any allocation or launch."""
    for name, a in arrays.items():
        if a is not None:
            kernel_type(name, a)


# While the torch adapter records a launch plan (adapters/torch/_plans.py): called as (a, dtype) before a cast
# here; returns the cast array (made by torch, so that a replay can make it the same way) or None; else None.
_cast_hook = None


def contiguous(a, dtype=None):
    """A C-contiguous array (a itself when it already is, in ``dtype``); None stays None."""
    if a is None:
        return None
    if dtype is not None and a.dtype != dtype:
        cast = None if _cast_hook is None else _cast_hook(a, dtype)
        a = a.astype(dtype) if cast is None else cast
    return cupy.ascontiguousarray(a)


def row_stream(a, row_dtype):
    """A secondary row stream for kernels that read it as ``row_dtype`` or float32.

    Returns (C-contiguous array, 1 if float32 else 0); other dtypes are converted to float32.
    """
    if a is None:
        return None, 0
    if a.dtype != row_dtype and a.dtype != cupy.float32:
        a = a.astype(cupy.float32)
    a = cupy.ascontiguousarray(a)
    return a, int(a.dtype == cupy.float32)


def ptr(a):
    """The argument for a pointer parameter: the array, or a null pointer for None."""
    return NULL if a is None else a


def aligned16(*arrays) -> bool:
    """True when every given array's data starts on a 16-byte boundary."""
    return all(a is None or a.data.ptr % 16 == 0 for a in arrays)


def warp_size() -> int:
    return 64 if _runtime.is_hip() else 32


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])


def sm_count() -> int:
    """Multiprocessors of the current device."""
    return _sm_count(cupy.cuda.runtime.getDevice())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
