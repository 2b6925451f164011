"""GPU benchmark of the selective scan (CuPy backend) at the PERFORMANCE.md shapes.

    python bench/gpu_scan.py [--warm] [--layouts] [--peer] [--variants] [--shape B,D,L,N ...]

bf16 activations with z, D, delta_bias and softplus, B/C input-dependent (B, N, L), fp32 A/D/bias.
Times are triton.testing.do_bench medians (L2 flushed between repetitions) of the public ops
ssmcore.selective_scan / selective_scan_bwd on CuPy arrays; "graph" times replay the same call
captured in a CUDA graph (no host overhead). Each row prints the fraction of the floor:
  forward:  max(B*D*L*N exp2 / 4.2 T/s (SFU), bytes / 4.27 TB/s), bytes = u, delta, z read, out
            written (bf16) + B, C read;
  fwd+bwd:  max(2 * B*D*L*N exp2 / SFU, bytes / 4.27 TB/s), bytes = forward + dout, u, delta, z read
            again, du, ddelta, dz written, B, C read again, dB, dC written.
With --peer, mamba_ssm's selective_scan_fn is timed on the same tensors (torch via DLPack) and the
ratio ours / peer printed ("table peer": the peer's time in PERFORMANCE.md). --layouts also times
each lane layout forced (S state entries per lane). "bwd" is selective_scan_bwd alone, "bwd ckpt"
its first kernel alone (the forward pass that stores the checkpoints).
--variants also times fwd+bwd and bwd under each backward variant (column "layout" names it):
  "det": SSMCORE_DETERMINISTIC=1 (per-block dB/dC slices + column_sum instead of global atomics;
  must stay <= 1.3x the default), "mb2" / "mb3": scan.bwd_min_blocks = 2 / 3 (registers capped
  at 255 / 168 for 2 / 3 blocks per SM; the default row uses scan.py's automatic choice, 3 from
  6 blocks per SM up), "det mb3": both.
Every run also times the session-3 kernels in the same process (rows " v2": SSMCORE_SCAN_FWD_IMPL and
SSMCORE_SCAN_BWD_IMPL = v2, all four ops; the default rows are v3), and with --variants " fwd v2" /
" bwd v2" (only one of the two passes old) for fwd+bwd.
--warm first compiles every scan kernel in parallel processes (fills CuPy's on-disk cache).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

SFU_EXP_PER_S = 4.2e12
COPY_BYTES_PER_S = 4.27e12
SHAPES = [(8, 4096, 2048, 16), (1, 4096, 2048, 16), (1, 4096, 16384, 16)]
PEER_TABLE_US = {(8, 4096, 2048, 16, "fwd"): 1160, (8, 4096, 2048, 16, "fwd+bwd"): 5980,
                 (1, 4096, 2048, 16, "fwd"): 149, (1, 4096, 16384, 16, "fwd"): 1435}


def _compile(name):
    from ssmcore.backends.cupy import _runtime

    t = time.perf_counter()
    _runtime.function("scan", name)
    return name, time.perf_counter() - t


def warm(jobs):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from ssmcore.backends.cupy import scan

    start = time.perf_counter()
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        times = [s for _, s in pool.map(_compile, scan.INSTANTIATIONS)]
    print(f"warm: {len(times)} kernels compiled in {time.perf_counter() - start:.1f}s "
          f"({jobs} processes; per kernel median {sorted(times)[len(times) // 2]:.2f}s, max {max(times):.2f}s)",
          flush=True)


def make_inputs(batch, channels, length, N, seed=0):
    import cupy
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rs = cupy.random.RandomState(seed)
    act = lambda *shape: rs.standard_normal(shape, dtype=cupy.float32).astype(bf16)
    dt_init = cupy.exp(rs.random_sample(channels, dtype=cupy.float32) * (math.log(0.1) - math.log(0.001))
                       + math.log(0.001))
    return dict(
        u=act(batch, channels, length),
        delta=(0.1 * rs.standard_normal((batch, channels, length), dtype=cupy.float32)).astype(bf16),
        A=-cupy.tile(cupy.arange(1, N + 1, dtype=cupy.float32), (channels, 1)),
        B=act(batch, N, length),
        C=act(batch, N, length),
        D=cupy.ones(channels, dtype=cupy.float32),
        z=act(batch, channels, length),
        delta_bias=(dt_init + cupy.log(-cupy.expm1(-dt_init))).astype(cupy.float32),
    )


def floors_us(batch, channels, length, N):
    exps = batch * channels * length * N
    act = batch * channels * length * 2
    bc = batch * N * length * 2
    fwd_bytes = 4 * act + 2 * bc
    fb_bytes = fwd_bytes + 7 * act + 4 * bc
    return (max(exps / SFU_EXP_PER_S, fwd_bytes / COPY_BYTES_PER_S) * 1e6,
            max(2 * exps / SFU_EXP_PER_S, fb_bytes / COPY_BYTES_PER_S) * 1e6)


def bench_us(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def graph_us(fn):
    """Median time of fn captured in a CUDA graph and replayed on the default stream."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        fn()
        stream.synchronize()
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    return bench_us(lambda: graph.launch(cupy.cuda.Stream.null))


def peer_fns(x, dout):
    try:
        import torch
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        print(f"peer: mamba_ssm not importable ({type(err).__name__}: {err})")
        return None
    t = {n: torch.from_dlpack(a) for n, a in x.items()}
    td = torch.from_dlpack(dout)
    grads = {n: t[n].detach().clone().requires_grad_(True) for n in t}

    def fwd():
        return selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                 t["delta_bias"], delta_softplus=True)

    def fwd_bwd():
        out = selective_scan_fn(grads["u"], grads["delta"], grads["A"], grads["B"], grads["C"], grads["D"],
                                grads["z"], grads["delta_bias"], delta_softplus=True)
        out.backward(td)

    return fwd, fwd_bwd


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm", action="store_true")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--layouts", action="store_true")
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--shape", action="append", default=None, metavar="B,D,L,N",
                        help="only this shape (repeatable; default: the PERFORMANCE.md shapes)")
    args = parser.parse_args(argv)
    if args.warm:
        warm(args.jobs)

    import cupy

    import ssmcore
    from ssmcore.backends.cupy import scan

    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cupy {cupy.__version__}")
    default_tp_states = scan.tp_states
    default_tp_prefetch = scan.tp_prefetch
    rows = []
    shapes = [tuple(int(v) for v in sh.split(",")) for sh in args.shape] if args.shape else SHAPES
    for batch, channels, length, N in shapes:
        x = make_inputs(batch, channels, length, N)
        dout = make_inputs(batch, channels, length, N, seed=1)["u"]
        fwd = lambda: ssmcore.selective_scan(**x, delta_softplus=True)

        def fwd_bwd():
            ssmcore.selective_scan(**x, delta_softplus=True)
            ssmcore.selective_scan_bwd(dout, **x, delta_softplus=True)

        shape = f"B{batch} D{channels} L{length} N{N}"
        f_floor, fb_floor = floors_us(batch, channels, length, N)
        layouts = [None] + ([1, 4] if args.layouts else [])
        peers = peer_fns(x, dout) if args.peer else None
        bwd = lambda: ssmcore.selective_scan_bwd(dout, **x, delta_softplus=True)

        def ckpt_pass():  # the backward's first kernel: the forward storing checkpoints, no output
            a = scan._Args(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], None)
            ckpt = cupy.empty((a.batch, a.n_chunks, a.channels, a.np), cupy.float32)
            scan._forward(a, True, ckpt=ckpt)

        ops = (("fwd", fwd, f_floor), ("fwd+bwd", fwd_bwd, fb_floor), ("bwd", bwd, fb_floor - f_floor),
               ("bwd ckpt", ckpt_pass, f_floor))
        # (name, deterministic, backward min blocks (0: scan.py's choice), output forward kernel, tp states
        # (None: scan.py's default), forward / backward kernel version (None: scan.py's default, v3))
        variants = [("", False, 0, "auto", None, None, None), (" v2", False, 0, "auto", None, "v2", "v2")]
        if args.variants:
            variants += [(" fwd v2", False, 0, "auto", None, "v2", None), (" bwd v2", False, 0, "auto", None, None, "v2"),
                         (" det", True, 0, "auto", None, None, None), (" mb2", False, 2, "auto", None, None, None),
                         (" mb3", False, 3, "auto", None, None, None), (" det mb3", True, 3, "auto", None, None, None),
                         (" lanes", False, 0, "lanes", None, None, None), (" tp1", False, 0, "tp", 1, None, None),
                         (" tp2", False, 0, "tp", 2, None, None), (" tp4", False, 0, "tp", 4, None, None),
                         (" tp1 pf", False, 0, "tp", 1, None, None), (" tp2 pf", False, 0, "tp", 2, None, None)]
        for op, fn, floor in ops:
            timed_by_peer = peers and op in ("fwd", "fwd+bwd")
            peer_us = bench_us(peers[0] if op == "fwd" else peers[1]) if timed_by_peer else None
            runs = [(f, v) for f in (layouts if op in ("fwd", "fwd+bwd") else [None]) for v in variants
                    if f is None or not v[0]]
            for forced, (vname, det, min_blocks, fwd_kernel, tp_states, fwd_impl, bwd_impl) in runs:
                fwd_variant = fwd_kernel != "auto" or tp_states is not None
                if vname == " v2":
                    pass  # the old kernels: every op
                elif vname in (" fwd v2", " bwd v2"):
                    if op != "fwd+bwd":
                        continue
                elif vname and op not in (("fwd", "fwd+bwd") if fwd_variant else ("fwd+bwd", "bwd")):
                    continue
                scan.force_states_per_lane = forced
                scan.bwd_min_blocks = min_blocks
                scan.fwd_kernel, scan.tp_states = fwd_kernel, tp_states or default_tp_states
                scan.fwd_impl, scan.bwd_impl = fwd_impl, bwd_impl
                scan.tp_prefetch = vname.endswith(" pf") or (default_tp_prefetch and not vname)
                os.environ.pop("SSMCORE_DETERMINISTIC", None)
                if det:
                    os.environ["SSMCORE_DETERMINISTIC"] = "1"
                try:
                    t0 = time.perf_counter()
                    fn()
                    cupy.cuda.Device().synchronize()
                    first = time.perf_counter() - t0
                    ours = bench_us(fn)
                except Exception as err:  # noqa: BLE001 - report and go on with the next row
                    print(f"{shape} {op} S={forced}{vname}: {type(err).__name__}: {err}", flush=True)
                    os.environ.pop("SSMCORE_DETERMINISTIC", None)
                    scan.bwd_min_blocks = 0
                    scan.fwd_kernel, scan.tp_states = "auto", default_tp_states
                    scan.fwd_impl = scan.bwd_impl = None
                    scan.tp_prefetch = default_tp_prefetch
                    continue
                try:
                    graphed = graph_us(fn)
                except Exception as err:  # noqa: BLE001
                    print(f"{shape} {op} S={forced}: graph capture failed: {type(err).__name__}: {err}",
                          flush=True)
                    graphed = float("nan")
                finally:
                    os.environ.pop("SSMCORE_DETERMINISTIC", None)
                    scan.bwd_min_blocks = 0
                    scan.fwd_kernel, scan.tp_states = "auto", default_tp_states
                    scan.fwd_impl = scan.bwd_impl = None
                    scan.tp_prefetch = default_tp_prefetch
                s, r = scan._layout(N, batch * channels)
                auto_tp = scan._use_time_parallel(scan._Args(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                                             x["delta_bias"], None))
                lay = f"S{s} R{r}" + (" fwd=tp" if auto_tp and forced is None and op != "bwd" and not vname else "")
                rows.append((shape, op, lay + ("" if forced is None else " forced") + vname, ours, graphed,
                             floor, peer_us, PEER_TABLE_US.get((batch, channels, length, N, op)), first))
                print(rows[-1], flush=True)
            scan.force_states_per_lane = None
        del x, dout
        cupy.get_default_memory_pool().free_all_blocks()

    print()
    print(f"{'shape':22s} {'op':8s} {'layout':15s} {'ours us':>9s} {'graph us':>9s} {'floor us':>9s} "
          f"{'floor/ours':>10s} {'peer us':>9s} {'ours/peer':>9s} {'table peer':>10s} {'ours/table':>10s} "
          f"{'1st call s':>10s}")
    for shape, op, lay, ours, graphed, floor, peer_us, table, first in rows:
        ratio = f"{ours / peer_us:9.3f}" if peer_us else f"{'-':>9s}"
        peer_txt = f"{peer_us:9.1f}" if peer_us else f"{'-':>9s}"
        vs_table = f"{ours / table:10.3f}" if table else f"{'-':>10s}"
        print(f"{shape:22s} {op:8s} {lay:15s} {ours:9.1f} {graphed:9.1f} {floor:9.1f} {floor / ours:10.3f} "
              f"{peer_txt} {ratio} {table or '-':>10} {vs_table} {first:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
