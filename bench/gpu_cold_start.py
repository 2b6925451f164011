"""Cold start of the GPU backend: a new process's first call of each op family.

    python bench/gpu_cold_start.py

Runs the same child process twice with one fresh CuPy kernel cache directory: the first compiles
with NVRTC (cold), the second loads the cached binaries (warm). Each child times, per op family,
the first call (compile or cache load + launch + synchronise), not counting `import ssmcore`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
import cupy as cp
import numpy as np
import ssmcore

rng = np.random.default_rng(0)
def arr(*shape, dtype=np.float32):
    return cp.asarray(rng.standard_normal(shape).astype(dtype))

b, d, l, n = 2, 256, 512, 16
times = {}
def first(name, fn):
    start = time.perf_counter()
    fn()
    cp.cuda.get_current_stream().synchronize()
    times[name] = time.perf_counter() - start

u, delta, z = arr(b, d, l), arr(b, d, l), arr(b, d, l)
A = -cp.exp(arr(d, n)); Bm, Cm = arr(b, n, l), arr(b, n, l)
first("selective_scan fwd", lambda: ssmcore.selective_scan(u, delta, A, Bm, Cm, z=z, delta_softplus=True))
first("causal_conv1d fwd", lambda: ssmcore.causal_conv1d(u, arr(d, 4), arr(d), activation="silu"))
first("rms_norm fwd", lambda: ssmcore.rms_norm(arr(64, 512), arr(512), residual=arr(64, 512), prenorm=True))
state = arr(4, d, n)
first("selective_state_update", lambda: ssmcore.selective_state_update(state, arr(4, d), arr(4, d), A, arr(4, n), arr(4, n)))
print(json.dumps(times))
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, CUPY_CACHE_DIR=cache)
        runs = []
        for label in ("cold (empty kernel cache)", "warm (CuPy on-disk cache)"):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True)
            if out.returncode:
                print(out.stderr[-3000:])
                return out.returncode
            runs.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    for label, times in runs:
        print(label)
        for name, seconds in times.items():
            print(f"  {name:26s} {seconds:7.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
