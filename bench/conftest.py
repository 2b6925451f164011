"""Benchmark suites: `pytest bench -m cpu` (Numba, this machine) and `pytest bench -m gpu` (H200).

See bench/README.md. GPU suites: bench/test_gpu_ops.py, test_gpu_blocks.py, test_gpu_e2e.py.
"""

import pytest

_DEFAULT_TIMER = "time.perf_counter"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # A synchronising timer, so pytest-benchmark's own statistics wait for the GPU (a plain
    # perf_counter when no CUDA context exists, i.e. in the CPU suite). An explicit
    # --benchmark-timer wins.
    try:
        timer = config.getoption("benchmark_timer")
    except ValueError:  # pytest-benchmark not installed
        return
    if timer in (_DEFAULT_TIMER, "perf_counter"):
        config.option.benchmark_timer = "bench._timing.sync_timer"


def pytest_collection_modifyitems(config, items):
    # Tag every benchmark by file, so `pytest bench -m cpu` / `-m gpu` select the suites.
    for item in items:
        path = str(item.fspath).replace("\\", "/")
        if "bench/test_cpu" in path:
            item.add_marker(pytest.mark.cpu)
        elif "bench/test_gpu" in path:
            item.add_marker(pytest.mark.gpu)


def pytest_benchmark_update_machine_info(config, machine_info):
    # GPU model and the versions of everything measured, for bench/report.py.
    from bench import _timing

    machine_info["ssmcore_bench"] = _timing.versions()
