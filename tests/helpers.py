"""Shared test utilities: random inputs, per-dtype tolerances, numeric gradients."""

from __future__ import annotations

import ml_dtypes
import numpy as np

DTYPES = {
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}

# (rtol, atol) of a float32-math kernel against a float64 reference, per input dtype,
# in line with the reference package's own tests.
TOL = {
    "float64": (1e-9, 1e-10),
    "float32": (6e-4, 2e-3),
    "float16": (3e-3, 5e-3),
    "bfloat16": (3e-2, 5e-2),
}


def randn(rng, shape, dtype="float32", scale=1.0):
    """Standard normal data (never zeros) in ``dtype``."""
    return (rng.standard_normal(shape) * scale).astype(DTYPES[dtype])


def f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def assert_close(actual, expected, dtype="float32", rtol=None, atol=None, name=""):
    """allclose with per-dtype defaults; reports the worst element on failure."""
    r, a = TOL[dtype]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    actual = f64(actual)
    expected = f64(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert np.isfinite(actual).all() == np.isfinite(expected).all(), f"{name}: non-finite values differ"
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    if not (err <= bound).all():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(
            f"{name}: max excess at {i}: got {actual[i]}, expected {expected[i]} "
            f"(|err| {err[i]:.3g} > {bound[i]:.3g}; rtol={rtol}, atol={atol}); "
            f"max |err| {err.max():.3g}, rel fro {np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-300):.3g}"
        )


def numeric_grad(f, x, dout, eps=1e-6, max_points=None, rng=None):
    """Central-difference gradient of sum(f() * dout) w.r.t. the float64 array x (modified in place, restored).

    With ``max_points`` only that many random entries are probed; the rest are NaN.
    """
    grad = np.full(x.shape, np.nan)
    flat = x.reshape(-1)
    idx = np.arange(flat.size)
    if max_points is not None and flat.size > max_points:
        idx = (rng or np.random.default_rng(0)).choice(flat.size, max_points, replace=False)
    for i in idx:
        old = flat[i]
        flat[i] = old + eps
        fp = np.sum(f64(f()) * dout)
        flat[i] = old - eps
        fm = np.sum(f64(f()) * dout)
        flat[i] = old
        grad.reshape(-1)[i] = (fp - fm) / (2 * eps)
    return grad


def assert_grad_close(analytic, numeric, rtol=1e-5, atol=1e-7, name=""):
    """Compare an analytic gradient with numeric_grad's output on the probed entries."""
    analytic = f64(analytic)
    mask = ~np.isnan(numeric)
    assert_close(analytic[mask], numeric[mask], "float64", rtol=rtol, atol=atol, name=name)
