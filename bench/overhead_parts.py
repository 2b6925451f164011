"""The pieces of an eager CUDA call's host overhead, one at a time (GPU machine; data for the host-overhead work).

    python3 bench/overhead_parts.py

Microseconds per operation (best of 5 repeats of 2000), tiny tensors on cuda:0. The rows say where the
~100-300 us of a drop-in call (bench/overhead.py, RESULTS.md host_overhead) go: the tensor -> CuPy view,
the per-call scope (device, stream, allocator), output allocation, CuPy -> torch for results, the
plain-eager test, a kernel launch, and the core op on CuPy arrays.
"""

from __future__ import annotations

import gc
import time

import cupy
import numpy as np
import torch

from ssmcore.adapters.torch import _bridge
from ssmcore.adapters.torch import ops as tops


NUMBER, REPEAT = 2000, 5


def per_call_us(fn, number=None, repeat=None):
    number, repeat = number or NUMBER, repeat or REPEAT
    fn()
    best = float("inf")
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            best = min(best, (time.perf_counter() - t0) / number)
    finally:
        gc.enable()
    return best * 1e6


def main():
    import argparse

    global NUMBER, REPEAT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--number", type=int, default=NUMBER)
    ap.add_argument("--repeat", type=int, default=REPEAT)
    args = ap.parse_args()
    NUMBER, REPEAT = args.number, args.repeat
    dev = torch.device("cuda", 0)
    t = torch.randn(4, 16, 8, device=dev)
    tb = torch.randn(4, 16, 8, device=dev, dtype=torch.bfloat16)
    rows = []

    def row(name, fn):
        rows.append((name, per_call_us(fn)))

    row("torch.empty((4,16,8)) on cuda", lambda: torch.empty((4, 16, 8), device=dev))
    row("tensor attrs (data_ptr, shape, stride, dtype)", lambda: (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype))
    row("_bridge.to_array(float32 tensor)", lambda: _bridge.to_array("x", t))
    row("_bridge.to_array(bf16 tensor)", lambda: _bridge.to_array("x", tb))

    def scope():
        with _bridge.backend_scope(t):
            pass
    row("backend_scope enter+exit", scope)

    def dev_ctx():
        with cupy.cuda.Device(0):
            pass
    row("  cupy.cuda.Device(0) enter+exit", dev_ctx)
    stream = cupy.cuda.Stream.from_external(torch.cuda.current_stream()) if hasattr(cupy.cuda.Stream, "from_external") \
        else cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def stream_ctx():
        with stream:
            pass
    row("  external stream enter+exit", stream_ctx)

    def alloc_ctx():
        with cupy.cuda.using_allocator(_bridge._torch_malloc):
            pass
    row("  using_allocator enter+exit", alloc_ctx)
    row("  _current_raw_stream", lambda: _bridge._current_raw_stream(0))

    with _bridge.backend_scope(t):
        row("cupy.empty under the scope (torch allocator)", lambda: cupy.empty((4, 16, 8), cupy.float32))
        a = cupy.empty((4, 16, 8), cupy.float32)
        row("_bridge.to_tensor(cupy array) (torch.from_dlpack)", lambda: _bridge.to_tensor(a))
        inputs = (t,) * 9
        row("_bridge.fresh_outputs(2 results, 9 inputs)", lambda: _bridge.fresh_outputs((a, a[0]), inputs, dev))
        u8 = torch.empty(4096, dtype=torch.uint8, device=dev)
        row("alternative: uint8 block -> typed view (slice, view, as_strided)",
            lambda: u8[256:256 + 2048].view(torch.float32).as_strided((4, 16, 8), (128, 8, 1)))
        row("cupy.cuda.get_current_stream()", cupy.cuda.get_current_stream)
    args = (t, None, None, True)
    row("ops._plain_eager(4 args)", lambda: tops._plain_eager(args, {}))
    x = cupy.random.standard_normal((4, 16, 8), dtype=cupy.float32)
    row("cupy elementwise x * 2 (kernel launch via CuPy ufunc)", lambda: x * 2)
    raw = cupy.RawKernel(r'extern "C" __global__ void k(float* p, int a, int b, int c, int d, long long e,'
                         r' long long f, long long g, long long h) { }', "k")  # 9 parameters, as pargs
    pargs = (x, np.int32(1), np.int32(2), np.int32(3), np.int32(4), np.int64(5), np.int64(6), np.int64(7), np.int64(8))
    row("RawKernel launch, 9 args", lambda: raw((1,), (32,), pargs))
    row("RawKernel launch, 9 args, stream=", lambda: raw((1,), (32,), pargs, stream=cupy.cuda.get_current_stream()))

    import ssmcore
    from ssmcore.adapters.torch import functional as F

    D, N, L = 16, 8, 4
    u = torch.randn(1, D, L, device=dev)
    delta = torch.rand(1, D, L, device=dev)
    A = -torch.rand(D, N, device=dev)
    Bm = torch.randn(1, N, L, device=dev)
    Cm = torch.randn(1, N, L, device=dev)
    Dv = torch.randn(D, device=dev)
    z = torch.randn(1, D, L, device=dev)
    db = torch.randn(D, device=dev)
    cu = [cupy.asarray(v.cpu().numpy()) for v in (u, delta, A, Bm, Cm, Dv, z, db)]
    row("ssmcore.selective_scan(CuPy arrays) whole call",
        lambda: ssmcore.selective_scan(*cu[:5], D=cu[5], z=cu[6], delta_bias=cu[7], delta_softplus=True))
    with torch.no_grad():
        row("functional.selective_scan_fn(torch, no_grad) whole call",
            lambda: F.selective_scan_fn(u, delta, A, Bm, Cm, Dv, z, db, True))
    torch.cuda.synchronize()
    print(f"host cost per operation, us (best of {REPEAT} x {NUMBER})")
    for name, us in rows:
        print(f"{us:9.2f}  {name}")


if __name__ == "__main__":
    main()
