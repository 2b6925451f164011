"""GPU benchmark of the SSD forward (CuPy backend) vs the peer's mamba_chunk_scan_combined.

    python bench/gpu_ssd.py [--quick] [--json PATH] [--impls v5,v4,v3]
    python bench/gpu_ssd.py --quick --fwd-only --impls v7,v7m,v5   (session 7: the pipelined chunk scan)
    python bench/gpu_ssd.py --quick --fwd-only --impls v7m,v7b,v7bm,v7bh,v7bh4,v7bs   (session 7, SSDF7b: 16-bit C B^T)
    python bench/gpu_ssd.py --quick --fwd-only --impls v7m,v8,v8d   (session 8, SSDF8: states + passing in one kernel)

PERFORMANCE.md shape B8 L4096 H64 P64 N128 G1, chunk 256, bf16 x/B/C/z-less, fp32 dt/A/D/dt_bias,
dt_softplus, D per head; plus a sweep L in {512, 2048, 16384} x N in {64, 128, 256} (same B/H/P).
Times: triton.testing.do_bench medians (after a warm-up that also runs the peer's Triton autotune),
of ssmcore.ssd on CuPy arrays and of mamba_chunk_scan_combined on the same memory (torch via
DLPack). Also per-stage times of our pipeline (cumsum / states / passing / scan), the agreement of
ours and the peer's outputs (max |diff| / max |peer|), and, when ssmcore.backends.cupy.
state_space_duality_bwd imports, forward+backward of both.
Floor (PERFORMANCE.md): forward ~140 us at the main shape (matmul-bound); scaled by B*L*H*P*N*Q
for the sweep (matmul work: chunk_states 2LPN, chunk_scan 2L(Q/2)(N+P) + 2LPN per head).
Every row also times the other kernel generations of the SSMCORE_SSD_FWD knob in the same process
(default v5: v4, v3 and v2, or the --impls list; `fwd_<path>_us`, `stages_<path>_us`, `max_rel_diff_<path>` vs
the default), and the
main shape times the forward on strided views of one in_proj-like (B, L, W) buffer (z | x | B | C | dt per
row, as the Mamba-2 block passes them): `fwd_strided_v4_us` (read in place) vs `fwd_strided_v3_us` (copied).
The "scan" stage of v3/v4 includes the C B^T kernel; v6's "states" stage is the fused chunk_states + state
passing kernel (its "passing" 0; v6: + the cumsum, "cumsum" 0; v6s: the cumsum kernel separate); so is v8's
(ssd_states_passing_v8, "passing" 0).
JSON (every row) goes to --json (default $OUT/ssd_bench.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

MAIN = (8, 4096, 64, 64, 128)  # B, L, H, P, N
MAIN_FLOOR_US = 140.0


def matmul_flops(batch, length, heads, headdim, dstate, Q=256):
    per_head_pos = 2 * headdim * dstate + 2 * (Q / 2) * (dstate + headdim) + 2 * headdim * dstate
    return batch * length * heads * per_head_pos


def floor_us(shape):
    return MAIN_FLOOR_US * matmul_flops(*shape) / matmul_flops(*MAIN)


def make_inputs(batch, length, heads, headdim, dstate, seed=0):
    import cupy
    import ml_dtypes

    bf16 = ml_dtypes.bfloat16
    rs = cupy.random.RandomState(seed)
    act = lambda *shape, s=1.0: (s * rs.standard_normal(shape, dtype=cupy.float32)).astype(bf16)
    dt_init = cupy.exp(rs.random_sample(heads, dtype=cupy.float32) * (math.log(0.1) - math.log(0.001))
                       + math.log(0.001))
    return dict(
        x=act(batch, length, heads, headdim),
        dt=(0.5 * rs.standard_normal((batch, length, heads), dtype=cupy.float32)),
        A=-cupy.exp(rs.random_sample(heads, dtype=cupy.float32) * math.log(16)),
        B=act(batch, length, 1, dstate, s=0.5),
        C=act(batch, length, 1, dstate, s=0.5),
        D=cupy.ones(heads, dtype=cupy.float32),
        dt_bias=(dt_init + cupy.log(-cupy.expm1(-dt_init))).astype(cupy.float32),
    )


def strided_views(x):
    """z (random), x, B, C, dt of ``x`` copied into one (B, L, W) buffer per dtype laid out like Mamba-2's
    in_proj output (z | x | B | C | dt per row) and returned as strided views of it."""
    import cupy

    batch, length, heads, headdim = x["x"].shape
    ngroups, dstate = x["B"].shape[2], x["B"].shape[3]
    hp, gn = heads * headdim, ngroups * dstate
    width = 2 * hp + 2 * gn + heads
    buf = cupy.empty((batch, length, width), x["x"].dtype)
    views, o = {}, 0
    for name, src, n in (("z", x["x"], hp), ("x", x["x"], hp), ("B", x["B"], gn), ("C", x["C"], gn)):
        v = buf[:, :, o:o + n]
        v[...] = src.reshape(batch, length, n)
        views[name] = v.reshape(src.shape)
        o += n
    views.pop("z")  # the benchmark's forward has no gate; z's columns only widen the rows
    dbuf = cupy.empty((batch, length, width), x["dt"].dtype)
    dv = dbuf[:, :, o:o + heads]
    dv[...] = x["dt"]
    views["dt"] = dv
    return views


def bench_us(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def cupy_us(fn, reps=20):
    """Median over reps of fn timed with CUDA events (for the stages)."""
    import cupy

    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) * 1e3)
    return sorted(times)[len(times) // 2]


def peer(x):
    try:
        import torch
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as err:  # noqa: BLE001 - any import failure means no peer
        print(f"peer: mamba_ssm not importable ({type(err).__name__}: {err})", flush=True)
        return None, None
    t = {n: torch.from_dlpack(a) for n, a in x.items()}
    fwd = lambda: mamba_chunk_scan_combined(t["x"], t["dt"], t["A"], t["B"], t["C"], 256, D=t["D"],
                                            dt_bias=t["dt_bias"], dt_softplus=True)
    leaves = {n: v.detach().clone().requires_grad_(True) for n, v in t.items()}
    dout = torch.randn_like(t["x"])

    def fwd_bwd():
        out = mamba_chunk_scan_combined(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 256,
                                        D=leaves["D"], dt_bias=leaves["dt_bias"], dt_softplus=True)
        out.backward(dout)

    return fwd, fwd_bwd


def stages(x):
    """Per-stage times (us) of our pipeline at chunk 256."""
    from ssmcore.backends.cupy import state_space_duality as S

    xk, dtk, Ak, Bk, Ck, Dk, zk, bk, ik = S._prepare(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], None,
                                                      x["dt_bias"], None)
    Q = 256
    seq = None
    dtp, dacs, seg = S._chunk_cumsum(dtk, Ak, bk, True, (0.0, math.inf), seq, Q)
    if S._states_v6_ok(xk, zk, Bk, Ck, ik, Q):  # v6: chunk_states and the passing (v6: + cumsum) in one kernel
        fused = S.fwd_path != "v6s"
        cs = (dtk, Ak, bk, True, (0.0, math.inf), seq) if fused else None
        _, prev = S._states_and_passing_v6(xk, Bk, dtp, dacs, seg, ik, Q, cs)
        return {
            "cumsum": 0.0 if fused else cupy_us(lambda: S._chunk_cumsum(dtk, Ak, bk, True, (0.0, math.inf), seq, Q)),
            "states": cupy_us(lambda: S._states_and_passing_v6(xk, Bk, dtp, dacs, seg, ik, Q, cs)),
            "passing": 0.0,
            "scan": cupy_us(lambda: S._chunk_scan(xk, zk, Bk, Ck, dtp, dacs, seg, prev, Dk, Q)),
        }
    if S._v8_ok(xk, zk, Bk, Ck, ik, Q):  # v8 / v8d: chunk states + passing in one kernel ("passing" 0)
        _, prev = S._states_passing_v8(xk, Bk, dtp, dacs, seg, ik, Q)
        return {
            "cumsum": cupy_us(lambda: S._chunk_cumsum(dtk, Ak, bk, True, (0.0, math.inf), seq, Q)),
            "states": cupy_us(lambda: S._states_passing_v8(xk, Bk, dtp, dacs, seg, ik, Q)),
            "passing": 0.0,
            "scan": cupy_us(lambda: S._chunk_scan(xk, zk, Bk, Ck, dtp, dacs, seg, prev, Dk, Q)),
        }
    states = S._chunk_states(xk, Bk, dtp, dacs, seg, Q)
    scratch = states.copy()
    _, prev = S._passing_for_scan(states, dacs, seg, ik, Q, xk, zk, Bk, Ck)  # v4: 16-bit starts
    return {
        "cumsum": cupy_us(lambda: S._chunk_cumsum(dtk, Ak, bk, True, (0.0, math.inf), seq, Q)),
        "states": cupy_us(lambda: S._chunk_states(xk, Bk, dtp, dacs, seg, Q)),
        # v1-v3: in place on scratch (values irrelevant)
        "passing": cupy_us(lambda: S._passing_for_scan(scratch, dacs, seg, ik, Q, xk, zk, Bk, Ck)),
        "scan": cupy_us(lambda: S._chunk_scan(xk, zk, Bk, Ck, dtp, dacs, seg, prev, Dk, Q)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the main shape only")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep-one", action="store_true",
                        help="time only the first other kernel generation (the first of --impls that is not the default)")
    parser.add_argument("--fwd-only", action="store_true",
                        help="skip the forward+backward timings (ours and the peer's)")
    parser.add_argument("--impls", default="v5,v4,v3,v2",
                        help="SSMCORE_SSD_FWD generations timed next to the default, comma-separated "
                             "(default %(default)s)")
    args = parser.parse_args(argv)
    out_json = args.json or (os.path.join(os.environ["OUT"], "ssd_bench.json") if os.environ.get("OUT") else None)

    import cupy

    import ssmcore

    try:
        from ssmcore.backends.cupy import state_space_duality_bwd  # noqa: F401

        have_bwd = True
    except Exception:  # noqa: BLE001
        have_bwd = False
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, cupy {cupy.__version__}, "
          f"backward: {'yes' if have_bwd else 'no'}", flush=True)
    shapes = [MAIN] + ([] if args.quick else [(8, L, 64, 64, N) for L in (512, 2048, 16384) for N in (64, 128, 256)])
    rows = []
    for shape in shapes:
        batch, length, heads, headdim, dstate = shape
        x = make_inputs(*shape)
        fwd = lambda: ssmcore.ssd(**x, chunk_size=256, dt_softplus=True)
        row = {"shape": f"B{batch} L{length} H{heads} P{headdim} N{dstate}", "floor_us": floor_us(shape)}
        try:
            t0 = time.perf_counter()
            ours = fwd()
            cupy.cuda.Device().synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_us"] = bench_us(fwd)
            row["stages_us"] = stages(x)
            # The other kernel generations (SSMCORE_SSD_FWD knob) in the same process, for the ratio.
            from ssmcore.backends.cupy import state_space_duality as S

            default_path = S.fwd_path
            row["fwd_path"] = default_path
            impls = [p for p in args.impls.split(",") if p and p != default_path]
            for other in impls[: 1 if args.sweep_one else len(impls)]:
                try:
                    S.fwd_path = other
                    alt = fwd()
                    row[f"fwd_{other}_us"] = bench_us(fwd)
                    row[f"stages_{other}_us"] = stages(x)
                    o32, a32 = ours.astype(cupy.float32), alt.astype(cupy.float32)
                    row[f"max_rel_diff_{other}"] = float(cupy.abs(a32 - o32).max() / cupy.abs(o32).max())
                except Exception as err:  # noqa: BLE001
                    print(f"{row['shape']}: path {other} failed: {type(err).__name__}: {err}", flush=True)
                finally:
                    S.fwd_path = default_path
            # x / z / B / C / dt as strided views of one in_proj-like row (Mamba-2 block): v4 reads them in
            # place, v3 copies them first (the cupy_copy kernels of the Mamba-2 prefill profile).
            if shape == MAIN:
                views = strided_views(x)
                more = tuple(p for p in ("v5", "v6", "v6s", "v7", "v7m", "v8", "v8d") if p in impls)
                for path in dict.fromkeys((default_path, "v3") + more):
                    try:
                        S.fwd_path = path
                        fs = lambda: ssmcore.ssd(**dict(x, **views), chunk_size=256, dt_softplus=True)
                        r = fs()
                        diff = float(cupy.abs(r.astype(cupy.float32) - ours.astype(cupy.float32)).max()
                                     / cupy.abs(ours.astype(cupy.float32)).max())
                        row[f"fwd_strided_{path}_us"] = bench_us(fs)
                        row[f"max_rel_diff_strided_{path}"] = diff
                    except Exception as err:  # noqa: BLE001
                        print(f"{row['shape']}: strided {path} failed: {type(err).__name__}: {err}", flush=True)
                    finally:
                        S.fwd_path = default_path
                del views
        except Exception as err:  # noqa: BLE001
            print(f"{row['shape']}: ours failed: {type(err).__name__}: {err}", flush=True)
            rows.append(row)
            continue
        pf, pfb = peer(x)
        if pf is not None:
            try:
                ref = pf()  # also runs the Triton autotune
                import torch

                torch.cuda.synchronize()
                row["peer_fwd_us"] = bench_us(pf)
                ref_c = cupy.from_dlpack(ref.detach()).astype(cupy.float32)
                row["max_rel_diff_vs_peer"] = float(cupy.abs(ours.astype(cupy.float32) - ref_c).max()
                                                    / cupy.abs(ref_c).max())
                row["fwd_ratio"] = row["fwd_us"] / row["peer_fwd_us"]
            except Exception as err:  # noqa: BLE001
                print(f"{row['shape']}: peer failed: {type(err).__name__}: {err}", flush=True)
        if have_bwd and not args.fwd_only:
            dout = make_inputs(*shape, seed=1)["x"]

            def fwd_bwd():
                ssmcore.ssd(**x, chunk_size=256, dt_softplus=True)
                ssmcore.ssd_bwd(dout, **x, chunk_size=256, dt_softplus=True)

            try:
                row["fwd_bwd_us"] = bench_us(fwd_bwd)
                if pfb is not None:
                    row["peer_fwd_bwd_us"] = bench_us(pfb)
                    row["fwd_bwd_ratio"] = row["fwd_bwd_us"] / row["peer_fwd_bwd_us"]
            except Exception as err:  # noqa: BLE001
                print(f"{row['shape']}: fwd+bwd failed: {type(err).__name__}: {err}", flush=True)
        row["fraction_of_floor"] = row["floor_us"] / row["fwd_us"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x
        cupy.get_default_memory_pool().free_all_blocks()

    print()
    print(f"{'shape':26s} {'ours us':>9s} {'peer us':>9s} {'ratio':>6s} {'floor us':>9s} {'frac':>5s} "
          f"{'fb us':>9s} {'peer fb':>9s} {'fb ratio':>8s}  stages us (cumsum/states/passing/scan)  diff")
    g = lambda r, k, f: (f % r[k]) if k in r else "-"
    for r in rows:
        st = r.get("stages_us", {})
        print(f"{r['shape']:26s} {g(r, 'fwd_us', '%9.1f'):>9s} {g(r, 'peer_fwd_us', '%9.1f'):>9s} "
              f"{g(r, 'fwd_ratio', '%6.2f'):>6s} {r['floor_us']:9.1f} {g(r, 'fraction_of_floor', '%5.2f'):>5s} "
              f"{g(r, 'fwd_bwd_us', '%9.1f'):>9s} {g(r, 'peer_fwd_bwd_us', '%9.1f'):>9s} "
              f"{g(r, 'fwd_bwd_ratio', '%8.2f'):>8s}  "
              + "/".join(f"{st[k]:.0f}" for k in ("cumsum", "states", "passing", "scan") if k in st)
              + f"  {g(r, 'max_rel_diff_vs_peer', '%.2e')}")
        for key in ("fwd_strided_v4_us", "fwd_strided_v5_us", "fwd_strided_v7_us", "fwd_strided_v7m_us",
                    "fwd_strided_v3_us"):
            if key in r:
                print(f"{'  (strided rows, ' + key.split('_')[2] + ')':26s} {r[key]:9.1f}"
                      f"{' ' * 62}  vs contiguous default {r.get('max_rel_diff_strided_' + key.split('_')[2], 0):.2e}")
        others = [k[4:-3] for k in r if k.startswith("fwd_") and k.endswith("_us") and not k.startswith("fwd_strided_")
                  and k not in ("fwd_us", "fwd_bwd_us")]
        for other in others:
            if f"fwd_{other}_us" in r:
                st = r.get(f"stages_{other}_us", {})
                pad = " " * 62
                print(f"{'  (path ' + other + ')':26s} {r[f'fwd_{other}_us']:9.1f}{pad}  "
                      + "/".join(f"{st[k]:.0f}" for k in ("cumsum", "states", "passing", "scan") if k in st)
                      + f"  vs default {r.get(f'max_rel_diff_{other}', float('nan')):.2e}")
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {out_json}")


if __name__ == "__main__":
    main()
