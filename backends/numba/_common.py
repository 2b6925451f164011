"""Dtype plumbing shared by the Numba kernels.

Kernels see contiguous float32 arrays (float64 when the activations are
float64). float16 and bfloat16 (ml_dtypes) arrays are converted on the way in
and results are converted back to the caller's dtype on the way out. Conversion
always makes a new array when the dtype changes, so kernels never write into
caller memory unless an op is documented as in-place.
"""

from __future__ import annotations

import numpy as np


def compute_dtype(*activations) -> np.dtype:
    """float64 if any activation is float64, else float32."""
    for a in activations:
        if a is not None and a.dtype == np.float64:
            return np.dtype(np.float64)
    return np.dtype(np.float32)


def to_compute(a, dtype):
    """A C-contiguous copy/view of ``a`` in ``dtype`` (None stays None)."""
    if a is None:
        return None
    return np.ascontiguousarray(a, dtype=dtype)


def to_compute_copy(a, dtype):
    """Like to_compute but always a fresh array (for buffers a kernel writes)."""
    if a is None:
        return None
    return np.array(a, dtype=dtype, order="C", copy=True)


def cast_out(a, dtype):
    """Result in the caller's dtype (no copy when it already is)."""
    if a is None:
        return None
    return a if a.dtype == dtype else a.astype(dtype)
