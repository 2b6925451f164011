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


@functools.lru_cache(maxsize=None)
def _module(family: str, name_expression: str, options: tuple) -> cupy.RawModule:
    return cupy.RawModule(
        code=source(family), options=OPTIONS + options, name_expressions=[name_expression]
    )


def hip_name(name_expression: str) -> str:
    """A name expression as hiprtc can look it up: typedef names spelled out (ROCm 5.2's hiprtc
    matches name expressions against demangled kernel names, where ``half_t`` reads ``__half``)."""
    return re.sub(r"\bhalf_t\b", "__half", name_expression)


def function(family: str, name_expression: str, options: tuple = ()):
    """The compiled kernel for one template instantiation, e.g. ``scan_fwd<float, 16>``."""
    if is_hip():
        name_expression = hip_name(name_expression)
    return _module(family, name_expression, tuple(options)).get_function(name_expression)


def launch(kernel, grid, block, args, shared_mem: int = 0) -> None:
    """Launch on the current stream (named explicitly, so CUDA-graph capture records it)."""
    kernel(grid, block, args, shared_mem=shared_mem, stream=cupy.cuda.get_current_stream())


def ctype(dtype) -> str:
    """The kernel-side type name of an array dtype."""
    name = cupy.dtype(dtype).name if not hasattr(dtype, "name") else dtype.name
    try:
        return {"float32": "float", "float16": "half_t", "bfloat16": "bf16_t", "float64": "double",
                "int32": "int", "int64": "long long"}[name]
    except KeyError:
        raise TypeError(f"dtype {name} has no kernel type") from None
