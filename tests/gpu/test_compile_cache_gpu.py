"""Kernel compilation and launch under concurrency.

- Two processes compile every op's kernels at the same moment into one fresh, shared
  CUPY_CACHE_DIR: both succeed and compute bitwise identical results; a third process then runs
  from the warm cache and agrees too.
- Two threads, each on its own non-blocking CuPy stream, compile (their in-process module cache
  cleared first) and run the ops concurrently: every result equals the one computed serially.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import ssmcore

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, TESTS_DIR)
from test_hostile import BASE, OPS  # noqa: E402

WORKER = textwrap.dedent("""
    import hashlib, os, sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    import cupy, ssmcore
    from test_hostile import BASE, OPS
    ready, go = sys.argv[1], sys.argv[2]
    open(ready, "w").close()
    deadline = time.time() + 120
    while not os.path.exists(go):
        if time.time() > deadline:
            sys.exit("no go signal")
        time.sleep(0.001)
    digest = hashlib.sha256()
    for op in sorted(OPS):
        for dtype in ("float32", "float16", "bfloat16"):
            kw = OPS[op][0](np.random.default_rng(0), dtype, BASE)
            kw = {{k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}}
            out = getattr(ssmcore, op)(**kw)
            for a in (out if isinstance(out, tuple) else (out,)):
                if a is not None:
                    digest.update(op.encode() + cupy.asnumpy(a).tobytes())
    cupy.cuda.Device().synchronize()
    print("DIGEST", digest.hexdigest())
""")


def _start(tmp_path, cache, name, go):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=TESTS_DIR))
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache), SSMCORE_DETERMINISTIC="1")
    ready = tmp_path / f"ready-{name}"
    proc = subprocess.Popen([sys.executable, str(script), str(ready), str(go)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _digest(proc, name):
    out, err = proc.communicate(timeout=540)
    assert proc.returncode == 0, f"worker {name} failed (rc {proc.returncode}):\n{err[-4000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("DIGEST ")]
    assert lines, f"worker {name} printed no digest:\n{out[-2000:]}\n{err[-2000:]}"
    return lines[-1].split()[1]


def test_two_processes_share_a_fresh_cache(tmp_path):
    cache = tmp_path / "cupy_cache"
    cache.mkdir()
    go = tmp_path / "go"
    procs = [_start(tmp_path, cache, name, go) for name in ("a", "b")]
    deadline = time.time() + 120
    while not all(ready.exists() for _, ready in procs):
        assert time.time() < deadline, "workers did not start"
        assert all(p.poll() is None for p, _ in procs), "a worker died while starting"
        time.sleep(0.01)
    go.touch()  # both compile from here on, at the same time
    digests = [_digest(p, name) for (p, _), name in zip(procs, "ab")]
    assert digests[0] == digests[1], "two processes compiling together computed different results"
    cached = [f for _, _, files in os.walk(cache) for f in files]
    assert cached, "nothing was written to CUPY_CACHE_DIR"
    go2 = tmp_path / "go2"
    proc, _ = _start(tmp_path, cache, "c", go2)
    go2.touch()
    assert _digest(proc, "c") == digests[0], "the warm cache gave different results"
    print(f"{len(cached)} cache files; digest {digests[0][:16]}")


STREAM_OPS = ("selective_scan", "causal_conv1d", "ssd", "rms_norm", "layer_norm", "gated_rms_norm",
              "causal_conv1d_bwd", "rms_norm_bwd")
STREAM_SIZES = dict(B=2, D=64, L=257, N=8, W=4, H=4, P=16)


def _inputs(seed):
    out = {}
    for op in STREAM_OPS:
        kw = OPS[op][0](np.random.default_rng(seed), "bfloat16", STREAM_SIZES)
        out[op] = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    return out


def _run_all(inputs):
    res = {}
    for op in STREAM_OPS:
        out = getattr(ssmcore, op)(**inputs[op])
        res[op] = [a for a in (out if isinstance(out, tuple) else (out,)) if a is not None]
    return res


def test_two_threads_on_two_streams(monkeypatch):
    monkeypatch.setenv("SSMCORE_DETERMINISTIC", "1")
    inputs = [_inputs(seed) for seed in (1, 2)]
    want = [{op: [cupy.asnumpy(a) for a in v] for op, v in _run_all(inp).items()} for inp in inputs]
    from ssmcore.backends.cupy import _runtime

    _runtime._module.cache_clear()  # the threads load every module again, concurrently
    errors, got = [], [None, None]
    barrier = threading.Barrier(2)

    def work(i):
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            with stream:
                barrier.wait()
                results = [_run_all(inputs[i]) for _ in range(10)]
                stream.synchronize()
            got[i] = [{op: [cupy.asnumpy(a) for a in v] for op, v in r.items()} for r in results]
        except BaseException as err:  # reported below
            errors.append((i, repr(err)))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i in (0, 1):
        for rep, result in enumerate(got[i]):
            for op in STREAM_OPS:
                for j, (a, b) in enumerate(zip(result[op], want[i][op])):
                    assert a.tobytes() == b.tobytes(), f"thread {i} repeat {rep} {op} output {j} differs"
