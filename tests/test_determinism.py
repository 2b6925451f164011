"""Deterministic mode and bitwise reproducibility on the CPU (Numba backend).

``ssmcore._determinism.deterministic()`` follows ``SSMCORE_DETERMINISTIC`` and
``torch.use_deterministic_algorithms``. The Numba backward kernels reduce in a fixed order (each
prange task owns its rows and partial sums are combined in task order), so every backward is
bitwise reproducible run to run, in either mode, and with any number of threads.
"""

from __future__ import annotations

import sys

import numba
import numpy as np
import pytest

import ssmcore
from ssmcore._determinism import deterministic

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_hostile import OPS  # noqa: E402  (the valid problem builders)

BWD = sorted(op for op in OPS if op.endswith("_bwd"))
SIZES = dict(B=3, D=6, L=37, N=5, W=4, H=3, P=4)


def test_switch_env(monkeypatch):
    monkeypatch.delenv("SSMCORE_DETERMINISTIC", raising=False)
    torch = sys.modules.get("torch")
    if torch is not None:
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert deterministic() is False
    for on in ("1", "true", "YES", " on "):
        monkeypatch.setenv("SSMCORE_DETERMINISTIC", on)
        assert deterministic() is True
    for off in ("0", "", "false", "no"):
        monkeypatch.setenv("SSMCORE_DETERMINISTIC", off)
        assert deterministic() is False


def test_switch_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("SSMCORE_DETERMINISTIC", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert deterministic() is True
        torch.use_deterministic_algorithms(False)
        assert deterministic() is False
    finally:
        torch.use_deterministic_algorithms(before)


def test_switch_does_not_import_torch():
    import subprocess

    code = ("import sys; from ssmcore._determinism import deterministic; deterministic(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _grads(op, dtype, seed=0):
    kw = OPS[op][0](np.random.default_rng(seed), dtype, SIZES)
    return [np.asarray(g) for g in getattr(ssmcore, op)(**kw) if g is not None]


def _assert_bitwise(a, b, what):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), f"{what}: gradient {i} differs bitwise"


@pytest.mark.parametrize("op", BWD)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["default", "deterministic"])
def test_backward_is_bitwise_reproducible(op, dtype, mode, monkeypatch):
    if mode == "deterministic":
        monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")
    first = _grads(op, dtype)
    for _ in range(2):
        _assert_bitwise(_grads(op, dtype), first, f"{op} {dtype} {mode}")


@pytest.mark.parametrize("op", BWD)
def test_backward_does_not_depend_on_thread_count(op):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one Numba thread only")
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _grads(op, "float32", seed=3)
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        two = _grads(op, "float32", seed=3)
    finally:
        numba.set_num_threads(before)
    _assert_bitwise(one, two, f"{op} 1 vs 2 threads")


@pytest.mark.parametrize("op", BWD)
def test_deterministic_mode_gives_the_default_result_on_cpu(op, monkeypatch):
    """On the CPU the default is already deterministic: the switch must not change the numbers."""
    monkeypatch.delenv("SSMCORE_DETERMINISTIC", raising=False)
    default = _grads(op, "float32", seed=5)
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")
    _assert_bitwise(_grads(op, "float32", seed=5), default, op)
