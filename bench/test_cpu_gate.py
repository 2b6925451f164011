"""``--benchmark-compare-fail`` as a regression gate between two saved runs, exercised for real: a tiny
benchmark file is run twice by pytest in a subprocess, the second time slower; the compare run must fail
(exit status non-zero) and a run that is not slower must pass."""

import os
import subprocess
import sys
import textwrap


def _run(tmp_path, delay, *extra):
    bench = tmp_path / "test_gate_bench.py"
    bench.write_text(textwrap.dedent(f"""
        import time

        def test_step(benchmark):
            benchmark.pedantic(time.sleep, args=({delay},), rounds=5, iterations=1)
    """))
    storage = f"file://{tmp_path / 'store'}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(bench),
           f"--benchmark-storage={storage}", *extra]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)


def test_compare_fail_gates_a_slower_run(tmp_path):
    base = _run(tmp_path, 0.002, "--benchmark-save=base")
    assert base.returncode == 0, base.stdout + base.stderr
    slower = _run(tmp_path, 0.02, "--benchmark-compare=0001", "--benchmark-compare-fail=median:50%")
    assert slower.returncode != 0, slower.stdout
    assert "Performance has regressed" in slower.stdout + slower.stderr
    same = _run(tmp_path, 0.002, "--benchmark-compare=0001", "--benchmark-compare-fail=median:400%")
    assert same.returncode == 0, same.stdout + same.stderr
