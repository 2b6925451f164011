"""Dtype plumbing shared by the Numba kernels.

Kernels see contiguous float32 arrays (float64 when the activations are
float64). float16 and bfloat16 (ml_dtypes) arrays are converted on the way in
and results are converted back to the caller's dtype on the way out. Conversion
always makes a new array when the dtype changes, so kernels never write into
caller memory unless an op is documented as in-place.
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np

# Below this many elements in the largest array of a call, kernels run on one thread.
PARALLEL_MIN_ELEMENTS = 1 << 16


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


def pool_rows(pool, indices, n_batch, dtype):
    """The rows of a state pool that one decode call updates: (work, slots, touched).

    ``work`` is the caller's pool itself when it is C-contiguous in ``dtype`` (updated in place,
    ``touched`` None), else a ``dtype`` copy of the touched rows (``touched`` lists them, for
    write_back). ``slots[b]`` is batch row b's index into ``work``; negative = padding.
    """
    rows = np.arange(n_batch) if indices is None else indices.astype(np.int64)
    if pool.dtype == dtype and pool.flags.c_contiguous:
        return pool, rows, None
    used = rows >= 0
    touched = rows[used]
    # Fancy indexing copies, so the kernel never writes caller memory through ``work``.
    return to_compute(pool[touched], dtype), np.where(used, np.cumsum(used) - 1, -1), touched


def write_back(pool, work, touched):
    """Store the rows pool_rows copied back into the caller's pool, in its dtype."""
    if touched is not None:
        pool[touched] = work.astype(pool.dtype)


@contextlib.contextmanager
def one_thread_if_small(elements: int):
    """Limit Numba to one thread for the duration of a small call (restores the caller's setting)."""
    if elements >= PARALLEL_MIN_ELEMENTS:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)
