"""GPU benchmark of the SSD backward (CuPy backend) vs the peer's mamba_chunk_scan_combined.

    python bench/gpu_ssd_bwd.py [--quick] [--json PATH]

Shape of PERFORMANCE.md: B8 L4096 H64 P64 N128 G1, chunk 256, bf16 x/B/C, fp32 dt/A/D/dt_bias,
dt_softplus, D per head (inputs from bench/gpu_ssd.py's make_inputs); without --quick also
L 2048 and N 64 / 256. Prints and writes to JSON (default $OUT/ssd_bwd_bench.json):
  bwd_us            ssmcore.ssd_bwd alone (triton do_bench median)
  fwd_bwd_us        ssmcore.ssd + ssmcore.ssd_bwd, and the peer's forward + backward (autograd)
  kernels_us        per-kernel times of one ssd_bwd call (CUDA events around each launch)
  bwd_pool_mib      CuPy pool growth during one ssd_bwd call from an emptied cache (~ its scratch + outputs)
  impl              the default SSMCORE_SSD_BWD_IMPL (v4 unless set in the environment)
  bwd_us_vK, kernels_us_vK   the same with SSMCORE_SSD_BWD_IMPL=vK for the other implementations of --impls
                    (default v3,v4; v1/v2 on request), in the same process (main shape only); max_rel_diff_vK
                    vs the default. --impls v4old / dx7 / st7 / tp7 / v7 / g7 / g7f / g7bc: the default with
                    launcher knobs flipped (VARIANTS below; v4old = session 6's kernels, g7 = the experimental
                    ssdb_g7; tp8 / tp7old / tp8only / dx7sp: session 8's p sums; fro0 / dyeager / s8a_off:
                    session 8's fused <dh, h0> / deferred fp32 dy off), also fwd_bwd_us_*
  rel_diff_vs_peer  max |ours - peer| / max |peer| of each gradient the peer also returns
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_ssd import bench_us, make_inputs  # noqa: E402

MAIN = (8, 4096, 64, 64, 128)
# --impls tokens that flip launcher knobs instead of SSMCORE_SSD_BWD_IMPL: name -> {module attribute: value}. The
# default (v4) runs session 7's ssdb_dx7 / ssdb_st7 / ssdb_tp7; v4old: all three off (session 6's ssdb_h4<T, 3>,
# <T, 4 / 5> and ssdb_tp6); dx7 / st7 / tp7: only that one on; v7: all three (= the default); g7: the default plus
# the experimental ssdb_g7<T, 0 / 1 / 2> (SSMCORE_SSD_BWD_G7=1) in place of ssdb_g4<T, 0 / 1 / 2>; g7f: the
# default plus ssdb_g7<T, 0> only (F), g7bc: the default plus ssdb_g7<T, 1 / 2> only (dC / dB).
_V7 = ("dx7_in_v4", "st7_in_v4", "tp7_in_v4")
VARIANTS = {k: {**{a: a[:3] in on for a in _V7}, "g7_in_v4": "g7" in on, "g7_kinds": kinds}
            for k, on, kinds in (("v4old", (), (0, 1, 2)), ("dx7", ("dx7",), (0, 1, 2)),
                                 ("st7", ("st7",), (0, 1, 2)), ("tp7", ("tp7",), (0, 1, 2)),
                                 ("v7", ("dx7", "st7", "tp7"), (0, 1, 2)),
                                 ("g7", ("dx7", "st7", "tp7", "g7"), (0, 1, 2)),
                                 ("g7f", ("dx7", "st7", "tp7", "g7"), (0,)),
                                 ("g7bc", ("dx7", "st7", "tp7", "g7"), (1, 2)))}
# Session 8 (helper SSDB8b), the p sums without z on the ssdb_tp7 path, each the default (= g7) with: tp8 (= the
# default): termp by ssdb_tp8, statep from ssdb_dx7; tp7old: session 7's ssdb_tp7 for both (SSMCORE_SSD_BWD_TP8=0);
# tp8only: ssdb_tp8 + tp7's statep; dx7sp: dx7's statep + tp7's termp. The older variants keep the module's values.
VARIANTS.update({k: {**VARIANTS["g7"], "tp8_in_v4": a, "dx7_statep": b}
                 for k, a, b in (("tp8", True, True), ("tp7old", False, False), ("tp8only", True, False),
                                 ("dx7sp", False, True))})
# Session 8 (helper SSDB8a), each the default with: fro0: ssdb_fro again (SSMCORE_SSD_BWD_FRO=0) instead of the
# <dh, h0> partials from the reverse ssdb_pass2; dyeager: the fp32 dy (ssdb_dy8) made without z too
# (SSMCORE_SSD_BWD_LAZY_DY=0); s8a_off: both.
VARIANTS.update({k: {"fuse_fro_in_v4": a, "lazy_dy_in_v4": b}
                 for k, a, b in (("fro0", False, True), ("dyeager", True, False), ("s8a_off", False, False))})
# Session 8 (helper SSDB8c): v8h0off: the default with h0 by ssdb_st7<T, 0> + the forward ssdb_pass2 again
# (SSMCORE_SSD_BWD_V8H0=0) instead of the forward's ssd_chunk_cumsum + ssd_states_passing_v8 (fp32 starts).
VARIANTS["v8h0off"] = {"v8h0_in_v4": False}
VARIANT_ATTRS = sorted({a for v in VARIANTS.values() for a in v})


def kernel_times(call):
    """{kernel name: us} of one call, by wrapping the launcher's _launch with CUDA events."""
    import cupy

    from ssmcore.backends.cupy import state_space_duality_bwd as S

    events = []
    original = S._launch_grid

    def timed(name, grid, args, **kw):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        original(name, grid, args, **kw)
        b.record()
        events.append((name, a, b))

    def timed_fwd(name, fn):  # the forward module's stages the backward calls (v8h0_in_v4: SSDB8c)
        def wrapped(*a, **k):
            e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
            e0.record()
            r = fn(*a, **k)
            e1.record()
            events.append((name, e0, e1))
            return r
        return wrapped

    F = S._fwd
    fwd_orig = {n: getattr(F, n) for n in ("_chunk_cumsum", "_states_passing_v8")}
    S._launch_grid = timed
    for n, fn in fwd_orig.items():
        setattr(F, n, timed_fwd("fwd" + n, fn))
    try:
        call()
    finally:
        S._launch_grid = original
        for n, fn in fwd_orig.items():
            setattr(F, n, fn)
    cupy.cuda.Device().synchronize()
    out = collections.defaultdict(float)
    for name, a, b in events:
        out[name] += cupy.cuda.get_elapsed_time(a, b) * 1e3
    return dict(out)


def pool_growth_mib(call):
    """MiB the CuPy memory pool grows by during one call from an emptied cache (scratch + outputs: the pool
    keeps freed blocks, so this is about the call's peak of simultaneously live allocations)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    cupy.cuda.Device().synchronize()
    pool.free_all_blocks()
    before = pool.total_bytes()
    out = call()
    cupy.cuda.Device().synchronize()
    grown = (pool.total_bytes() - before) / 2**20
    del out
    return grown


def peer_grads(x, dout):
    """(fwd+bwd closure, grads dict) of the peer, or (None, None)."""
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001
        print(f"peer: mamba_ssm not importable ({type(err).__name__}: {err})", flush=True)
        return None, None
    t = {n: torch.from_dlpack(a) for n, a in x.items()}
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in t.items()}
    dout_t = torch.from_dlpack(dout)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        out = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256,
                                        D=leaves["D"], dt_bias=leaves["dt_bias"], dt_softplus=True)
        out.backward(dout_t)

    fwd_bwd()
    torch.cuda.synchronize()
    return fwd_bwd, {n: v.grad.detach().float() for n, v in leaves.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--impls", default="v3,v4", help="implementations timed besides the default (main shape)")
    args = parser.parse_args(argv)
    out_json = args.json or (os.path.join(os.environ["OUT"], "ssd_bwd_bench.json") if os.environ.get("OUT") else None)

    import cupy

    import ssmcore

    shapes = [MAIN] + ([] if args.quick else [(8, 2048, 64, 64, 128), (8, 4096, 64, 64, 64), (8, 4096, 64, 64, 256)])
    rows = []
    for shape in shapes:
        batch, length, heads, headdim, dstate = shape
        x = make_inputs(*shape)
        dout = make_inputs(*shape, seed=1)["x"]
        row = {"shape": f"B{batch} L{length} H{heads} P{headdim} N{dstate}"}
        bwd = lambda: ssmcore.ssd_bwd(dout, **x, chunk_size=256, dt_softplus=True)

        def fwd_bwd():
            ssmcore.ssd(**x, chunk_size=256, dt_softplus=True)
            bwd()

        try:
            t0 = time.perf_counter()
            grads = bwd()
            cupy.cuda.Device().synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["bwd_us"] = bench_us(bwd)
            row["kernels_us"] = kernel_times(bwd)
            row["bwd_pool_mib"] = pool_growth_mib(bwd)
            from ssmcore.backends.cupy import state_space_duality_bwd as S

            row["impl"] = S._impl()
            # The other implementations, same process (SSMCORE_SSD_BWD_IMPL=v1 / v2 / v3).
            impls = [v for v in args.impls.split(",") if v in S.IMPLS or v in VARIANTS]
            for other in (impls if shape == MAIN else ()):
                if other == row["impl"]:
                    continue
                saved = os.environ.get(S.IMPL_ENV)
                saved_attr = {a: getattr(S, a) for a in VARIANT_ATTRS}
                if other in VARIANTS:  # the default implementation with a module knob flipped (same process)
                    for a, v in VARIANTS[other].items():
                        setattr(S, a, v)
                else:
                    os.environ[S.IMPL_ENV] = other
                try:
                    g1 = bwd()
                    row[f"bwd_us_{other}"] = bench_us(bwd)
                    row[f"kernels_us_{other}"] = kernel_times(bwd)
                    row[f"bwd_pool_mib_{other}"] = pool_growth_mib(bwd)
                    row[f"max_rel_diff_{other}"] = max(
                        float(cupy.abs(a.astype(cupy.float32) - b.astype(cupy.float32)).max()
                              / max(float(cupy.abs(b.astype(cupy.float32)).max()), 1e-30))
                        for a, b in zip(grads, g1) if a is not None)
                    del g1
                    if other in VARIANTS:
                        row[f"fwd_bwd_us_{other}"] = bench_us(fwd_bwd)
                except Exception as err:  # noqa: BLE001 - keep the default's numbers
                    print(f"{row['shape']}: {other} failed: {type(err).__name__}: {err}", flush=True)
                finally:
                    for a, v in saved_attr.items():
                        setattr(S, a, v)
                    if saved is None:
                        os.environ.pop(S.IMPL_ENV, None)
                    else:
                        os.environ[S.IMPL_ENV] = saved
            try:
                row["fwd_bwd_us"] = bench_us(fwd_bwd)
            except Exception as err:  # noqa: BLE001 - the forward is another helper's
                print(f"{row['shape']}: forward failed: {type(err).__name__}: {err}", flush=True)
        except Exception as err:  # noqa: BLE001
            print(f"{row['shape']}: ours failed: {type(err).__name__}: {err}", flush=True)
            rows.append(row)
            continue
        pfb, pg = peer_grads(x, dout)
        if pfb is not None:
            row["peer_fwd_bwd_us"] = bench_us(pfb)
            if "fwd_bwd_us" in row:
                row["fwd_bwd_ratio"] = row["fwd_bwd_us"] / row["peer_fwd_bwd_us"]
            diffs = {}
            for name, key in (("dx", "x"), ("ddt", "dt"), ("dA", "A"), ("dB", "B"), ("dC", "C"), ("dD", "D"),
                              ("ddt_bias", "dt_bias")):
                ours = getattr(grads, name).astype(cupy.float32)
                ref = cupy.from_dlpack(pg[key]).reshape(ours.shape)
                diffs[name] = float(cupy.abs(ours - ref).max() / cupy.abs(ref).max())
            row["rel_diff_vs_peer"] = diffs
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, grads
        cupy.get_default_memory_pool().free_all_blocks()

    print()
    print(f"{'shape':26s} {'bwd us':>10s} {'fwd+bwd us':>11s} {'peer f+b us':>11s} {'ratio':>7s}")
    g = lambda r, k, f: (f % r[k]) if k in r else "-"
    for r in rows:
        print(f"{r['shape']:26s} {g(r, 'bwd_us', '%10.1f'):>10s} {g(r, 'fwd_bwd_us', '%11.1f'):>11s} "
              f"{g(r, 'peer_fwd_bwd_us', '%11.1f'):>11s} {g(r, 'fwd_bwd_ratio', '%7.2f'):>7s}")
        for key in ["kernels_us"] + [f"kernels_us_{v}" for v in ("v1", "v2", "v3", "v4", "v5") + tuple(VARIANTS)]:
            if key in r:
                print(f"    {key}: " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r[key].items(),
                                                                                key=lambda kv: -kv[1])))
        for other in ("v1", "v2", "v3", "v4", "v5") + tuple(VARIANTS):
            if f"fwd_bwd_us_{other}" in r:
                print(f"    {other}: fwd+bwd {r[f'fwd_bwd_us_{other}']:.1f} us")
            if f"bwd_us_{other}" in r:
                print(f"    {other}: bwd {r[f'bwd_us_{other}']:.1f} us (default {r.get('impl')}: "
                      f"{r['bwd_us']:.1f} us), max rel diff vs default "
                      f"{r.get(f'max_rel_diff_{other}', float('nan')):.1e}, pool growth "
                      f"{r.get(f'bwd_pool_mib_{other}', float('nan')):.0f} MiB (default "
                      f"{r.get('bwd_pool_mib', float('nan')):.0f})")
        if "rel_diff_vs_peer" in r:
            print("    rel diff vs peer: " + ", ".join(f"{k} {v:.1e}" for k, v in r["rel_diff_vs_peer"].items()))
    if out_json:
        Path(out_json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
