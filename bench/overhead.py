"""Per-call host overhead of ssmcore's ops at tiny shapes, split by stage (CPU: NumPy and torch CPU).

    python3 bench/overhead.py [--ops conv_update,state_update,...] [--repeat 7] [--number 300] [--device cuda]

At B=1, D=16, L<=4 the Numba kernels do almost nothing, so what a call costs is the Python around
them: argument checks (``ssmcore/ops``, ``ssmcore/_checks``), dispatch (``ssmcore/_dispatch``), the
backend's own dtype plumbing, and, through torch, the conversions (``adapters/torch/_bridge``) and the
``torch.library`` dispatcher. The same Python runs in front of every GPU launch, so cutting it here
cuts the GPU eager overhead too. Columns (microseconds per call, best of the repeats):

    numpy     ssmcore.<op>(NumPy arrays), the whole call
    backend   the backend function alone with the same arrays (Numba kernel + its dtype plumbing)
    resolve   ssmcore._dispatch.resolve(...) alone (library/device binding)
    checks    numpy - backend - resolve: argument validation
    torch.op  torch.ops.ssmcore.<op>(CPU tensors): dispatcher + conversions + the numpy call
    convert   to_array on every argument + fresh_outputs on the results (the bridge alone)
    dispatch  torch.op - numpy - convert: torch.library's own cost
    dropin    the mamba_ssm drop-in name in ssmcore.adapters.torch.functional (when there is one)
    dropin0   (--fastpath both/all, CUDA) the same with the launch-plan fast path off (adapters/torch/_plans.py;
              the 'dropin' column is then the fast path on, after a recording call)
    dropin6   (--fastpath all, CUDA) plans as in session 6: launches through CuPy's kernel call, every block
              allocated per call up front (SSMCORE_PLAN_LAUNCH=cupy SSMCORE_PLAN_FREE=0
              SSMCORE_PLAN_KEEP_SCRATCH=0); 'dropin' is then session 7's (driver launches, small scratch kept)
    dropin7   (--fastpath all, CUDA) OVH7's replay: as 'dropin' but with SSMCORE_PLAN_ONE_PASS=0 (the eager call
              checks in three passes and replays the op's full results; 'dropin' = one-pass check, first-result
              replays where the drop-in drops results)
    over      torch.op - backend: host overhead of the eager torch path (target <= 25 us)
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
import torch

import ssmcore
from ssmcore import _dispatch
from ssmcore.adapters.torch import _bridge, _plans
from ssmcore.adapters.torch import functional as F

B, D, N, W = 1, 16, 8, 4
H, P, G = 2, 8, 1


def _rng():
    return np.random.default_rng(0)


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def case_conv_update(rng):
    a = dict(x=_f32(rng, B, D), conv_state=_f32(rng, B, D, W - 1), weight=_f32(rng, D, W), bias=_f32(rng, D),
             activation="silu", cache_seqlens=None, conv_state_indices=None)
    order = ("x", "conv_state", "weight", "bias", "activation", "cache_seqlens", "conv_state_indices")
    return dict(core=ssmcore.causal_conv1d_update, backend="causal_conv1d_update", kwargs=a, order=order,
                arrays=("x", "conv_state", "weight", "bias", "cache_seqlens", "conv_state_indices"),
                op=torch.ops.ssmcore.causal_conv1d_update, dropin=F.causal_conv1d_update,
                dropin_kw=("x", "conv_state", "weight", "bias", "activation"))


def case_state_update(rng):
    a = dict(state=_f32(rng, B, H, P, N), x=_f32(rng, B, H, P), dt=_f32(rng, B, H, P),
             A=-np.exp(_f32(rng, H, P, N)), B=_f32(rng, B, G, N), C=_f32(rng, B, G, N), D=_f32(rng, H, P),
             z=_f32(rng, B, H, P), dt_bias=_f32(rng, H, P), dt_softplus=True, state_batch_indices=None)
    order = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus", "state_batch_indices")
    return dict(core=ssmcore.selective_state_update, backend="selective_state_update", kwargs=a, order=order,
                arrays=("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "state_batch_indices"),
                op=torch.ops.ssmcore.selective_state_update, dropin=F.selective_state_update,
                dropin_kw=("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus"))


def case_conv(rng, L=4):
    a = dict(x=_f32(rng, B, D, L), weight=_f32(rng, D, W), bias=_f32(rng, D), seq_idx=None, initial_states=None,
             activation="silu", return_final_states=False)
    order = ("x", "weight", "bias", "seq_idx", "initial_states", "activation", "return_final_states")
    core_kw = ("x", "weight", "bias", "activation", "seq_idx", "initial_states", "return_final_states")
    return dict(core=ssmcore.causal_conv1d, backend="causal_conv1d", kwargs=a, order=order, core_order=core_kw,
                arrays=("x", "weight", "bias", "seq_idx", "initial_states"),
                op=torch.ops.ssmcore.causal_conv1d_fwd, dropin=F.causal_conv1d_fn,
                dropin_kw=("x", "weight", "bias", "activation"))


def case_scan(rng, L=4):
    a = dict(u=_f32(rng, B, D, L), delta=_f32(rng, B, D, L, scale=0.5), A=-np.exp(_f32(rng, D, N)),
             B=_f32(rng, B, N, L), C=_f32(rng, B, N, L), D=_f32(rng, D), z=_f32(rng, B, D, L),
             delta_bias=_f32(rng, D), initial_state=None, delta_softplus=True)
    order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "delta_softplus")
    core = dict(a, return_last_state=True)
    return dict(core=ssmcore.selective_scan, backend="selective_scan", kwargs=core, order=order,
                core_order=tuple(core), arrays=("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                                "initial_state"),
                op=torch.ops.ssmcore.selective_scan_fwd, dropin=F.selective_scan_fn,
                dropin_kw=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus"))


def case_ssd(rng, L=4):
    a = dict(x=_f32(rng, B, L, H, P), dt=_f32(rng, B, L, H, scale=0.5), A=-np.exp(_f32(rng, H)),
             B=_f32(rng, B, L, G, N), C=_f32(rng, B, L, G, N), chunk_size=4, D=_f32(rng, H), z=None,
             dt_bias=_f32(rng, H), initial_states=None, seq_idx=None, cu_seqlens=None, dt_softplus=True,
             dt_min=0.0, dt_max=float("inf"), return_varlen_states=False)
    order = tuple(a)
    core = {k: v for k, v in a.items() if k not in ("dt_min", "dt_max")}
    core.update(dt_limit=(0.0, float("inf")), return_final_states=True)
    return dict(core=ssmcore.ssd, backend="ssd", kwargs=core, order=order, op_kwargs=a, core_order=tuple(core),
                arrays=("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states", "seq_idx", "cu_seqlens"),
                op=torch.ops.ssmcore.ssd_fwd, dropin=F.mamba_chunk_scan_combined,
                dropin_kw=("x", "dt", "A", "B", "C", "chunk_size", "D", "dt_bias", "dt_softplus"))


def case_rms_norm(rng, L=4):
    a = dict(x=_f32(rng, B * L, D), weight=_f32(rng, D), bias=None, residual=_f32(rng, B * L, D), eps=1e-5,
             prenorm=True, residual_in_fp32=True)
    order = tuple(a)
    return dict(core=ssmcore.rms_norm, backend="rms_norm", kwargs=a, order=order,
                arrays=("x", "weight", "bias", "residual"), op=torch.ops.ssmcore.rms_norm_fwd,
                dropin=F.rms_norm_fn, dropin_kw=("x", "weight", "bias", "residual", "eps", "prenorm",
                                                 "residual_in_fp32"))


def case_gated_rms_norm(rng, L=4):
    a = dict(x=_f32(rng, B * L, D), weight=_f32(rng, D), z=_f32(rng, B * L, D), eps=1e-5, group_size=8,
             norm_before_gate=False)
    order = tuple(a)
    return dict(core=ssmcore.gated_rms_norm, backend="gated_rms_norm", kwargs=a, order=order,
                arrays=("x", "weight", "z"), op=torch.ops.ssmcore.gated_rms_norm_fwd, dropin=None, dropin_kw=())


CASES = {
    "conv_update": case_conv_update, "state_update": case_state_update, "conv": case_conv, "scan": case_scan,
    "ssd": case_ssd, "rms_norm": case_rms_norm, "gated_rms_norm": case_gated_rms_norm,
}


def _time(fn, number, repeat, sync=None) -> float:
    """Microseconds per call of ``fn()``: the best repeat (the machine may be shared)."""
    fn()
    fn()
    if sync is not None:
        sync()
    runs = []
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for _ in range(number):
                fn()
            if sync is not None:
                sync()
            runs.append((time.perf_counter_ns() - t0) / number / 1e3)
    finally:
        if gc_was:
            gc.enable()
    return min(runs)


def measure(name, number, repeat, device="cpu", fastpath="on", split=False) -> dict:
    """One row of the table; on CUDA the 'numpy' and 'backend' columns run on CuPy views of the tensors."""
    case = CASES[name](_rng())
    op_kw = {k: torch.from_numpy(v).to(device) if isinstance(v, np.ndarray) else v
             for k, v in case.get("op_kwargs", case["kwargs"]).items()}
    tensors = {k: op_kw[k] for k in case["arrays"]}
    first = next(t for t in tensors.values() if t is not None)
    sync = torch.cuda.synchronize if first.is_cuda else None
    core = case["core"]
    row = {}
    with _bridge.backend_scope(first):
        arrays = {k: _bridge.to_array(k, t) for k, t in tensors.items()}
        kw = {k: arrays.get(k, v) for k, v in case["kwargs"].items()}
        backend = getattr(_dispatch.load_backend(_dispatch.library_of(arrays[case["arrays"][0]])), case["backend"])
        row["numpy"] = _time(lambda: core(**kw), number, repeat, sync)
        row["backend"] = _time(lambda: backend(**kw), number, repeat, sync)
        row["resolve"] = _time(lambda: _dispatch.resolve(**arrays), number, repeat, sync)
        results = core(**kw)
    row["checks"] = row["numpy"] - row["backend"] - row["resolve"]

    op_args = [op_kw[k] for k in case["order"]]
    op = case["op"]
    row["torch.op"] = _time(lambda: op(*op_args), number, repeat, sync)

    results = results if isinstance(results, tuple) else (results,)

    def convert():
        with _bridge.backend_scope(first):
            for k, t in tensors.items():
                _bridge.to_array(k, t)
            _bridge.fresh_outputs(results, tuple(tensors.values()), first.device)

    row["convert"] = _time(convert, number, repeat, sync)
    row["dispatch"] = row["torch.op"] - row["numpy"] - row["convert"]
    if case["dropin"] is not None:
        dropin_kw = {k: op_kw[k] for k in case["dropin_kw"]}
        dropin = lambda: case["dropin"](**dropin_kw)  # noqa: E731
        was = _plans.ENABLED
        knobs = {k: getattr(_plans, k) for k in ("DRIVER_LAUNCH", "FREE_EARLY", "KEEP_SCRATCH", "ONE_PASS")}
        try:
            if fastpath in ("both", "all"):
                _plans.ENABLED = False
                row["dropin0"] = _time(dropin, number, repeat, sync)
            if fastpath == "all":
                _plans.ENABLED = True
                _plans.DRIVER_LAUNCH, _plans.FREE_EARLY, _plans.KEEP_SCRATCH = False, False, 0
                _plans.ONE_PASS = False
                _plans.clear()  # recorded again (on _time's second warm-up call) with the session-6 replay
                row["dropin6"] = _time(dropin, number, repeat, sync)
                for k, v in knobs.items():
                    setattr(_plans, k, v)
                _plans.ONE_PASS = False
                _plans.clear()  # OVH7's form: driver launches, the checks in three passes, the full replay
                row["dropin7"] = _time(dropin, number, repeat, sync)
                _plans.ONE_PASS = knobs["ONE_PASS"]
                _plans.clear()
            _plans.ENABLED = was if fastpath in ("both", "all") else fastpath == "on"
            row["dropin"] = _time(dropin, number, repeat, sync)
        finally:
            _plans.ENABLED = was
            for k, v in knobs.items():
                setattr(_plans, k, v)
    else:
        row["dropin"] = float("nan")
    if split and case["dropin"] is not None and first.is_cuda:
        row.update(_split(case, {k: op_kw[k] for k in case["dropin_kw"]}, number, repeat, sync))
    row.setdefault("dropin0", float("nan"))
    row.setdefault("dropin6", float("nan"))
    row.setdefault("dropin7", float("nan"))
    row["over"] = row["torch.op"] - row["backend"]
    return row


def _split(case, dropin_kw, number, repeat, sync) -> dict:
    """Where a drop-in's fast-path call spends its time (CUDA, plans on): the op call it makes (captured), the
    plan check and key alone, the replay alone, the first-result replay alone."""
    captured = []
    run = _plans.run

    def spy(name, fn, args, kwargs):
        captured.append((name, args))
        return run(name, fn, args, kwargs)

    _plans.clear()
    _plans.run = spy
    try:
        case["dropin"](**dropin_kw)
        case["dropin"](**dropin_kw)  # recorded
    finally:
        _plans.run = run
    if not captured:
        return {}
    name, args = captured[-1]
    key, ptrs, _ = _plans._key(name, args)
    plan = _plans._PLANS.get(key)
    if not isinstance(plan, _plans._Plan):
        return {}
    call = getattr(F._ops, name)
    out = {"s.dropin": _time(lambda: case["dropin"](**dropin_kw), number, repeat, sync),
           "s.op": _time(lambda: call(*args), number, repeat, sync),
           "s.first": _time(lambda: call.first(*args), number, repeat, sync),
           "s.key": _time(lambda: _plans._key(name, args), number, repeat, sync),
           "s.replay": _time(lambda: plan.replay(ptrs, args), number, repeat, sync)}
    call.first(*args)
    if plan.first is not None:
        out["s.replay1"] = _time(lambda: plan.first(ptrs, args), number, repeat, sync)
    out["s.launches"] = plan.n_launches
    out["s.driver"] = int("_L(" in plan.source)
    return out


def suite_rows(repeat):
    """bench/test_gpu_ops.py's host_overhead rows (bf16 tiny shapes, the same inputs and timer: wall time per call of
    200 back-to-back calls after 5 warm-up calls, one synchronisation), ``repeat`` times each (ours only: the peer's
    Triton autotuning would take longer than a short device run)."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # (run as a script: bench/ is on the path, the repository root is not)
        sys.path.insert(0, root)
    from bench import _timing as T
    from bench import test_gpu_ops as G

    for op, (_, factory) in G.TINY.items():
        if factory is None:  # causal_conv1d_update: test_host_overhead's own inputs
            def make(seed):
                return dict(args=dict(x=G.randn(1, 64), conv_state=G.randn(1, 64, 3),
                                      weight=G.randn(64, 4, dtype=G.F32), bias=None, activation="silu"))
        else:
            make = factory()
        sets = [make(0)]
        ours = G.fwd_calls(G._ours(op), sets)
        ours_us = [T.host_us(ours) for _ in range(repeat)]
        print(f"suite {op:<28} ours " + " ".join(f"{v:6.1f}" for v in ours_us)
              + f"  (median {sorted(ours_us)[len(ours_us) // 2]:.1f})", flush=True)


COLUMNS = ("numpy", "backend", "resolve", "checks", "torch.op", "convert", "dispatch", "dropin", "over")
COLUMNS_BOTH = COLUMNS[:7] + ("dropin0",) + COLUMNS[7:]
COLUMNS_ALL = COLUMNS[:7] + ("dropin0", "dropin6", "dropin7") + COLUMNS[7:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--number", type=int, default=300, help="calls per repeat")
    parser.add_argument("--repeat", type=int, default=7, help="repeats (the best is shown)")
    parser.add_argument("--device", default="cpu", help="cpu (NumPy/Numba) or cuda (CuPy)")
    parser.add_argument("--fastpath", default="on", choices=("on", "off", "both", "all"),
                        help="CUDA launch plans for the torch calls: on, off, both (adds column dropin0 = off) or "
                             "all (also dropin6 = session 6's replay)")
    parser.add_argument("--split", action="store_true",
                        help="(cuda) also print where the drop-in's fast path spends its time: s.dropin (the "
                             "drop-in), s.op (its ssmcore op call), s.first (the same keeping the first result), "
                             "s.key (the call key alone), s.replay / s.replay1 (the replay / first-result replay "
                             "alone), s.launches, s.driver (1: driver launches)")
    parser.add_argument("--suite", action="store_true",
                        help="(cuda) only bench/test_gpu_ops.py's host_overhead rows, --repeat times each")
    args = parser.parse_args(argv)
    if args.suite:
        suite_rows(args.repeat)
        print(f"launch plans: {_plans.STATS}")
        return
    columns = {"both": COLUMNS_BOTH, "all": COLUMNS_ALL}.get(args.fastpath, COLUMNS)
    torch.set_num_threads(1)
    print(f"host overhead per call, us (B={B}, D={D}, N={N}, W={W}, L<=4, float32, {args.device}; best of "
          f"{args.repeat} x {args.number} calls; on cuda 'numpy'/'backend' are the CuPy core/backend)")
    print(f"{'op':<16}" + "".join(f"{c:>10}" for c in columns))
    for name in args.ops.split(","):
        try:
            row = measure(name.strip(), args.number, args.repeat, args.device, args.fastpath, args.split)
        except Exception as err:  # one op's failure should not hide the others' numbers
            print(f"{name:<16}  failed: {type(err).__name__}: {err}", flush=True)
            continue
        print(f"{name:<16}" + "".join(f"{row[c]:>10.1f}" for c in columns), flush=True)
        extra = {k: v for k, v in row.items() if k.startswith("s.")}
        if extra:
            print(f"{'':<16}  split: " + "  ".join(f"{k[2:]} {v:.1f}" for k, v in extra.items()), flush=True)
    if args.device != "cpu":
        print(f"launch plans: {_plans.STATS}")
        for op, why in sorted(_plans.REFUSED.items()):
            print(f"  refused {op}: {why}")


if __name__ == "__main__":
    main()
