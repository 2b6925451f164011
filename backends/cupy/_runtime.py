"""Run-time compilation and launch plumbing for the CuPy backend.

Each op family has one source ``<family>.cu`` beside this file. It is compiled
with the portability header ``common.cuh`` pasted in front (so CuPy's on-disk
kernel cache sees header changes), by NVRTC on CUDA or hiprtc on ROCm, one
``cupy.RawModule`` per (family, instantiation) the first time that
instantiation runs. Launches go on CuPy's current stream, which the torch
adapter points at torch's current stream.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import cupy

SOURCE_DIR = Path(__file__).resolve().parent
OPTIONS = ("-std=c++17",)


def is_hip() -> bool:
    return bool(getattr(cupy.cuda.runtime, "is_hip", False))


@functools.lru_cache(maxsize=None)
def source(family: str) -> str:
    """The full source of a family: portability header + ``<family>.cu``."""
    header = (SOURCE_DIR / "common.cuh").read_text()
    body = (SOURCE_DIR / f"{family}.cu").read_text()
    body = body.replace('#include "common.cuh"', "// common.cuh pasted above")
    return header + "\n" + body


def source_header() -> str:
    """The portability header alone (for test kernels built from it)."""
    return (SOURCE_DIR / "common.cuh").read_text()


@functools.lru_cache(maxsize=None)
def _module(family: str, name_expression: str, options: tuple) -> cupy.RawModule:
    return cupy.RawModule(
        code=source(family), options=OPTIONS + options, name_expressions=[name_expression]
    )


def hip_name(name_expression: str) -> str:
    """A name expression as hiprtc can look it up: typedef names spelled out (ROCm 5.2's hiprtc
    matches name expressions against demangled kernel names, where ``half_t`` reads ``__half``)."""
    return re.sub(r"\bhalf_t\b", "__half", name_expression)


# (family, name expression, options, device) -> kernel. RawModule.get_function looks the kernel up in
# the driver (and builds a new Function object) on every call; a launch needs it once per device.
_FUNCTIONS: dict = {}


def function(family: str, name_expression: str, options: tuple = ()):
    """The compiled kernel for one template instantiation, e.g. ``scan_fwd<float, 16>``."""
    key = (family, name_expression, options, cupy.cuda.runtime.getDevice())
    try:
        return _FUNCTIONS[key]
    except (KeyError, TypeError):  # TypeError: options given as a list
        pass
    options = tuple(options)
    lookup = hip_name(name_expression) if is_hip() else name_expression
    kernel = _module(family, lookup, options).get_function(lookup)
    _FUNCTIONS[key[:2] + (options,) + key[3:]] = kernel
    return kernel


# id(kernel) -> dynamic shared memory the kernel may use (its CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES).
_SHARED_ALLOWED: dict = {}


# While the torch adapter records a launch plan (adapters/torch/_plans.py): called with every launch's
# (kernel, grid, block, args, shared_mem) before it happens; None otherwise.
_recorder = None


def launch(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on the current stream (named explicitly, so CUDA-graph capture records it).

    A launch with dynamic shared memory opts its kernel in to that amount once (static + dynamic above
    48 KiB needs it; without it the driver refuses the launch with CUDA_ERROR_INVALID_VALUE).
    """
    if _recorder is not None:
        _recorder(kernel, grid, block, args, shared_mem)
    if shared_mem and shared_mem > _SHARED_ALLOWED.get(id(kernel), 0) and not is_hip():
        kernel.max_dynamic_shared_size_bytes = shared_mem  # (a cupy.RawKernel; cached in _FUNCTIONS, so id is stable)
        _SHARED_ALLOWED[id(kernel)] = shared_mem
    kernel(grid, block, args, shared_mem=shared_mem, stream=cupy.cuda.get_current_stream())


_ORIGINAL_LAUNCH = launch  # the torch adapter replays launch plans only while ``launch`` is this one (not patched)


_CTYPES = {"float32": "float", "float16": "half_t", "bfloat16": "bf16_t", "float64": "double",
           "int32": "int", "int64": "long long"}
_CTYPE_OF_DTYPE: dict = {}  # dtype -> kernel type (dtype.name is slow to build in NumPy)


def ctype(dtype) -> str:
    """The kernel-side type name of an array dtype."""
    try:
        return _CTYPE_OF_DTYPE[dtype]
    except (KeyError, TypeError):
        pass
    name = cupy.dtype(dtype).name if not hasattr(dtype, "name") else dtype.name
    try:
        result = _CTYPES[name]
    except KeyError:
        raise TypeError(f"dtype {name} has no kernel type") from None
    try:
        _CTYPE_OF_DTYPE[dtype] = result
    except TypeError:
        pass
    return result
