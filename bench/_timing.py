"""Shared machinery of the GPU benchmark suites: timing, input rotation, roofline floors, the peer.

Timing. pytest-benchmark's own statistics (the numbers ``--benchmark-compare-fail`` gates on) come
from a *synchronising* timer (:func:`sync_timer`, installed by ``bench/conftest.py``): it waits for
the GPU before reading the clock, and each round runs many back-to-back calls, so a round measures
what an eager caller sees, host overhead included. The side-by-side numbers in ``extra_info``
(``ours_us``, ``peer_us``, ``ratio``) are medians of ``triton.testing.do_bench`` (CUDA events, L2
cleared between calls), the method of docs/PERFORMANCE.md, for ours and the peer alike; without
Triton, CUDA events around single calls.

Floors. ``floor_us = max(bytes / 4.8e12, flops / 989e12, exps / 4.2e12)`` seconds: H200 HBM3e
bandwidth, dense bf16 tensor-core peak, and the SFU's exp2 rate (the selective scan's bound, see
PERFORMANCE.md). ``fraction_of_floor = floor_us / ours_us`` (1.0 = at the roofline).

Smoke mode. ``SSMCORE_BENCH_SMOKE=1`` runs the GPU suites on CPU tensors at tiny shapes (Numba
backend, no peer): a check that the suites' code runs, not a measurement.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import pytest

HBM_BYTES_PER_S = 4.8e12
BF16_FLOPS_PER_S = 989e12
SFU_EXP_PER_S = 4.2e12
L2_BYTES = 50 * 2**20
ROOT = Path(__file__).resolve().parents[1]

SMOKE = os.environ.get("SSMCORE_BENCH_SMOKE", "") not in ("", "0")


# --------------------------------------------------------------------------------------- device


@functools.lru_cache(maxsize=None)
def device() -> str:
    """'cuda' when a GPU is usable, 'cpu' in smoke mode, else the GPU suites skip."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if SMOKE:
        return "cpu"
    pytest.skip("no CUDA device (set SSMCORE_BENCH_SMOKE=1 to run these suites on CPU at tiny shapes)")


def pick(full, smoke):
    """The full-size shape on the GPU, the tiny one in smoke mode."""
    return smoke if device() == "cpu" else full


def sync() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def sync_timer() -> float:
    """time.perf_counter after waiting for the GPU (a no-op without an initialised CUDA context)."""
    sync()
    return time.perf_counter()


# --------------------------------------------------------------------------------------- timing


def _have_triton() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: fall back to CUDA events
        return False
    return True


def device_us(fn, rep_ms: float = 40.0, warmup_ms: float = 10.0) -> float:
    """Median time of one call of fn, microseconds (do_bench / CUDA events on the GPU, wall clock on CPU)."""
    import torch

    if device() == "cuda":
        if _have_triton():
            from triton.testing import do_bench

            return 1e3 * do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        n = max(3, min(1000, int(rep_ms / max(start.elapsed_time(end), 1e-3))))
        times = []
        for _ in range(n):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def host_us(fn, calls: int = 200) -> float:
    """Wall time per call of `calls` back-to-back calls, one synchronisation at the end (eager overhead)."""
    for _ in range(5):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t) / calls * 1e6


def floor_us(nbytes: float = 0, flops: float = 0, exps: float = 0) -> float:
    return 1e6 * max(nbytes / HBM_BYTES_PER_S, flops / BF16_FLOPS_PER_S, exps / SFU_EXP_PER_S)


def copies_for(nbytes: int, max_copies: int = 4) -> int:
    """How many input sets to rotate through so a timing loop does not replay them from L2."""
    if nbytes <= 0 or nbytes >= L2_BYTES:
        return 1
    return max(2, min(max_copies, math.ceil(2 * L2_BYTES / nbytes)))


def rotating(calls):
    """One callable cycling through the given zero-argument callables (one per input copy)."""
    calls = list(calls)
    if len(calls) == 1:
        return calls[0]
    state = [0]

    def step():
        i = state[0]
        state[0] = (i + 1) % len(calls)
        return calls[i]()

    return step


# --------------------------------------------------------------------------------------- peer


_PEER_ERRORS: dict = {}


def peer(module: str, name: str):
    """The peer's (mamba_ssm / causal_conv1d) ``module.name``, or None (reason in peer_error())."""
    key = f"{module}.{name}"
    try:
        return getattr(importlib.import_module(module), name)
    except Exception as err:  # noqa: BLE001 - any failure means "no peer"
        first = err
    if module.startswith("mamba_ssm.ops.triton."):  # Triton kernels import without the compiled extension
        for k in [k for k in sys.modules if k == "mamba_ssm" or k.startswith("mamba_ssm.")]:
            del sys.modules[k]
        trees = sorted((ROOT / ".peers").glob("mamba_ssm-*/mamba_ssm"))
        if trees:
            stub = types.ModuleType("mamba_ssm")
            stub.__path__ = [str(trees[-1])]
            sys.modules["mamba_ssm"] = stub
            try:
                return getattr(importlib.import_module(module), name)
            except Exception as err:  # noqa: BLE001
                first = err
    _PEER_ERRORS[key] = f"{type(first).__name__}: {first}"
    return None


def peer_error(module: str, name: str) -> str:
    return _PEER_ERRORS.get(f"{module}.{name}", "")


def versions() -> dict:
    """Versions of the measured software (for extra_info and the report)."""
    out = {}
    for mod in ("torch", "cupy", "triton", "ssmcore", "mamba_ssm", "causal_conv1d", "numba"):
        try:
            m = sys.modules.get(mod) or importlib.import_module(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001
            out[mod] = None
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return out


# --------------------------------------------------------------------------------------- one benchmark


def unsupported(err: BaseException) -> bool:
    """True for 'this backend has no kernel for that yet' (the CuPy ssd before it lands)."""
    return isinstance(err, NotImplementedError) or "NotImplementedError" in f"{type(err).__name__}: {err}"


def first_call(fn, what: str = "ours"):
    """Call fn once (compiles, autotunes); skip the benchmark when the op is not implemented."""
    try:
        out = fn()
        sync()
        return out
    except Exception as err:  # noqa: BLE001
        if unsupported(err):
            pytest.skip(f"{what}: not implemented on {device()} yet ({type(err).__name__}: {err})")
        raise


def measure(benchmark, ours, peer_fn=None, *, nbytes=0, flops=0, exps=0, peer_missing="", round_s=0.02,
            rounds=None, mode="device", extra=None):
    """Benchmark `ours` with pytest-benchmark and record the side-by-side numbers in extra_info.

    ours / peer_fn: zero-argument callables (already rotating through input copies).
    mode: 'device' -> ours_us / peer_us are do_bench medians; 'host' -> wall time per call of
    back-to-back calls (eager host overhead); 'wall' -> one synchronised call per round (seconds-long
    runs, e.g. generation).
    """
    warmups = 1 if mode == "wall" else 2
    for _ in range(warmups):
        first_call(ours)
    peer_us, peer_note = None, peer_missing
    if peer_fn is not None:
        try:
            for _ in range(warmups + 1):  # Triton autotune and compile happen here, outside the timing
                peer_fn()
            sync()
        except Exception as err:  # noqa: BLE001 - the peer failing must not hide our number
            peer_fn, peer_note = None, f"peer failed: {type(err).__name__}: {err}"[:300]

    if mode == "wall":
        iterations, rounds = 1, rounds or 3
    else:
        one = _wall(ours)
        iterations = max(1, min(2000, int(round_s / max(one, 1e-7))))
        rounds = rounds or (5 if device() == "cuda" else 3)
    benchmark.pedantic(ours, rounds=rounds, iterations=iterations, warmup_rounds=1 if mode != "wall" else 0)

    if mode == "device":
        timer = device_us
    elif mode == "host":
        timer = host_us
    else:
        def timer(fn):
            return 1e6 * statistics.median(_wall(fn) for _ in range(rounds))
    stats = getattr(benchmark, "stats", None)
    if mode == "wall" and stats is not None:  # the rounds just run (--benchmark-disable leaves none)
        ours_us = stats.stats.median * 1e6
    else:
        ours_us = timer(ours)
    if peer_fn is not None:
        try:
            peer_us = timer(peer_fn)
        except Exception as err:  # noqa: BLE001
            peer_note = f"peer failed: {type(err).__name__}: {err}"[:300]
    floor = floor_us(nbytes, flops, exps)
    info = benchmark.extra_info
    info.update(ours_us=ours_us, peer_us=peer_us, ratio=(peer_us / ours_us) if peer_us else None,
                bytes=int(nbytes), flops=int(flops), exps=int(exps), floor_us=floor or None,
                fraction_of_floor=(floor / ours_us) if floor else None, timing=mode, device=device())
    if peer_us is None:
        info["peer_note"] = peer_note or "no peer for this benchmark"
    if extra:
        info.update(extra)
    return info


def _wall(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t
