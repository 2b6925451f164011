"""Launch plans (adapters/torch/_plans.py) on CUDA: a replay is bitwise the normal path.

For each drop-in: a first call (recorded) and two more with fresh random inputs of the same key (replayed),
each compared bit for bit with the fast path switched off on copies of the same inputs; the inputs are not
modified (the decode ops' states are, identically). Also: a plan is really used where one should be, a
non-default stream and CUDA-graph capture take the normal path and give the same bits, autocast falls back,
gradients agree, and bad input still raises the named error after a plan hit.
"""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - the gpu marker skips these without a GPU
    pytest.skip("needs a GPU", allow_module_level=True)

from ssmcore.adapters.torch import _plans  # noqa: E402
from ssmcore.adapters.torch import functional as F  # noqa: E402

CUDA = torch.device("cuda")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@contextlib.contextmanager
def fastpath(on: bool):
    was = _plans.ENABLED
    _plans.ENABLED = on
    try:
        yield
    finally:
        _plans.ENABLED = was


def _gen(seed):
    g = torch.Generator(device=CUDA)
    g.manual_seed(seed)
    return g


def _rand(g, *shape, dtype=F32, scale=1.0):
    return (torch.randn(*shape, device=CUDA, generator=g) * scale).to(dtype)


def _flat(x):
    if isinstance(x, (tuple, list)):
        return [t for y in x for t in _flat(y)]
    return [x]


def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _same(got, want, what=""):
    got, want = _flat(got), _flat(want)
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None, (what, i)
            continue
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), (what, i, a.shape, b.shape,
                                                                                      a.stride(), b.stride())
        assert torch.equal(_bits(a), _bits(b)), (what, i, (a.float() - b.float()).abs().max().item())


def _clone_tensor(t):
    """A copy with t's exact layout (strides, storage offset; expanded dimensions stay expanded)."""
    storage = torch.empty(t.untyped_storage().nbytes(), dtype=torch.uint8, device=t.device)
    storage.untyped_storage().copy_(t.untyped_storage())
    return storage.view(t.dtype).as_strided(t.shape, t.stride(), t.storage_offset())


def _clone(args):
    return tuple(_clone_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)


def _check(fn, make, kwargs=None, mutated=(), expect_hits=False, calls=3):
    """``fn(*make(seed), **kwargs)`` with the fast path on (record, then replays) vs off, bitwise."""
    kwargs = kwargs or {}
    _plans.clear()
    hits0 = _plans.STATS["hits"]
    for seed in range(calls):
        args = make(_gen(seed))
        ref_args = _clone(args)
        with fastpath(False):
            want = fn(*ref_args, **kwargs)
        keep = _clone(args)
        with fastpath(True):
            got = fn(*args, **kwargs)
        torch.cuda.synchronize()
        _same(got, want, f"{fn.__name__} call {seed}")
        for i, (a, k, r) in enumerate(zip(args, keep, ref_args)):
            if isinstance(a, torch.Tensor):
                if i in mutated:
                    _same(a, r, f"{fn.__name__} mutated arg {i}")
                else:
                    assert torch.equal(_bits(a), _bits(k)), f"{fn.__name__} modified input {i}"
    hits = _plans.STATS["hits"] - hits0
    if expect_hits:
        assert hits >= calls - 2, f"{fn.__name__}: no plan replayed; refused: {_plans.REFUSED}"
    return hits


# ------------------------------------------------------------------------------------------ scan

def _scan_inputs(dtype, with_z, with_D, with_bias, var_bc=True, b=2, d=5, n=4, length=7):
    def make(g):
        u = _rand(g, b, d, length, dtype=dtype)
        delta = _rand(g, b, d, length, dtype=dtype, scale=0.5)
        A = -torch.rand(d, n, device=CUDA, generator=g) - 0.1
        if var_bc:
            B, C = _rand(g, b, n, length, dtype=dtype), _rand(g, b, n, length, dtype=dtype)
        else:
            B, C = _rand(g, d, n), _rand(g, d, n)
        D = _rand(g, d) if with_D else None
        z = _rand(g, b, d, length, dtype=dtype) if with_z else None
        bias = _rand(g, d) if with_bias else None
        return u, delta, A, B, C, D, z, bias
    return make


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("with_z, with_D, with_bias, last", [
    (False, False, False, False), (True, True, True, True), (True, False, True, False), (False, True, False, True)])
def test_selective_scan_fn(dtype, with_z, with_D, with_bias, last):
    make = _scan_inputs(dtype, with_z, with_D, with_bias)
    _check(F.selective_scan_fn, make, dict(delta_softplus=True, return_last_state=last), expect_hits=dtype == F32)


def test_selective_scan_fn_constant_bc_and_long():
    _check(F.selective_scan_fn, _scan_inputs(F32, True, True, True, var_bc=False, length=33), dict(delta_softplus=False),
           expect_hits=True)
    _check(F.selective_scan_fn, _scan_inputs(F16, True, True, False, length=64), dict(delta_softplus=True))


def test_bad_input_after_a_plan_hit():
    make = _scan_inputs(F32, True, True, True)
    _check(F.selective_scan_fn, make, expect_hits=True)
    u, delta, A, B, C, D, z, bias = make(_gen(9))
    with pytest.raises(ValueError, match="^delta:"):
        F.selective_scan_fn(u, delta[..., :-1], A, B, C, D, z, bias)
    with pytest.raises((TypeError, ValueError), match="^D:"):
        F.selective_scan_fn(u, delta, A, B, C, D.to(torch.int32), z, bias)


# ------------------------------------------------------------------------------------------ conv

def _conv_inputs(dtype, channel_last, with_bias, with_seq, with_init=False, b=2, d=16, length=24, w=4):
    def make(g):
        if channel_last:
            x = _rand(g, b, length, d, dtype=dtype).transpose(1, 2)
        else:
            x = _rand(g, b, d, length, dtype=dtype)
        weight = _rand(g, d, w, dtype=dtype)
        bias = _rand(g, d, dtype=dtype) if with_bias else None
        seq = None
        if with_seq:
            seq = torch.sort(torch.randint(0, 3, (b, length), device=CUDA, generator=g), dim=1)[0].to(torch.int32)
        init = _rand(g, b, d, w - 1, dtype=dtype) if with_init else None
        return x, weight, bias, seq, init
    return make


@pytest.mark.parametrize("channel_last", [False, True])
@pytest.mark.parametrize("with_bias, with_seq, final", [(True, False, False), (False, True, False),
                                                         (True, False, True)])
def test_causal_conv1d_fn(channel_last, with_bias, with_seq, final):
    make = _conv_inputs(F32, channel_last, with_bias, with_seq)
    _check(F.causal_conv1d_fn, make, dict(activation="silu", return_final_states=final), expect_hits=not with_seq)


def test_causal_conv1d_fn_bf16_and_odd():
    # bf16 weight and bias: cast to float32 by the backend (CuPy astype); a replay casts with torch: same bits
    _check(F.causal_conv1d_fn, _conv_inputs(BF16, False, True, False), dict(activation=None), expect_hits=True)
    _check(F.causal_conv1d_fn, _conv_inputs(F32, False, True, False, d=5, length=7, w=3), dict(activation="silu"))


@pytest.mark.parametrize("lnew", [None, 3])
def test_causal_conv1d_update(lnew):
    b, d, w = 3, 16, 4

    def make(g):
        x = _rand(g, b, d) if lnew is None else _rand(g, b, d, lnew)
        return x, _rand(g, b, d, w - 1), _rand(g, d, w), _rand(g, d)
    _check(F.causal_conv1d_update, make, dict(activation="silu"), mutated=(1,), expect_hits=True)


# ------------------------------------------------------------------------------------------ state update

@pytest.mark.parametrize("form", ["mamba1", "mamba2"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_selective_state_update(form, dtype):
    b, d, n, h, p, groups = 3, 6, 8, 4, 8, 2

    def make(g):
        if form == "mamba1":
            state = _rand(g, b, d, n)
            x, dt, z = (_rand(g, b, d, dtype=dtype) for _ in range(3))
            A = -torch.rand(d, n, device=CUDA, generator=g) - 0.1
            B, C = _rand(g, b, n, dtype=dtype), _rand(g, b, n, dtype=dtype)
            D, bias = _rand(g, d), _rand(g, d)
        else:
            state = _rand(g, b, h, p, n)
            x, dt, z = (_rand(g, b, h, p, dtype=dtype) for _ in range(3))
            A = (-torch.rand(h, 1, 1, device=CUDA, generator=g) - 0.1).expand(h, p, n)
            dt = dt[..., :1].expand(b, h, p)
            B, C = _rand(g, b, groups, n, dtype=dtype), _rand(g, b, groups, n, dtype=dtype)
            D = _rand(g, h, 1).expand(h, p)
            bias = _rand(g, h, 1).expand(h, p)
        return state, x, dt, A, B, C, D, z, bias
    _check(F.selective_state_update, make, dict(dt_softplus=True), mutated=(0,),
           expect_hits=form == "mamba1" and dtype == F32)


# ------------------------------------------------------------------------------------------ norms

@pytest.mark.parametrize("rms", [True, False])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("residual, prenorm, fp32", [(False, False, False), (True, True, False), (False, True, True),
                                                     (True, False, True)])
def test_norms(rms, dtype, residual, prenorm, fp32):
    rows, d = 7, 48

    def make(g):
        x = _rand(g, rows, d, dtype=dtype)
        weight = _rand(g, d, dtype=dtype)
        bias = None if rms else _rand(g, d, dtype=dtype)
        res = _rand(g, rows, d, dtype=dtype) if residual else None
        return x, weight, bias, res
    fn = F.rms_norm_fn if rms else F.layer_norm_fn

    def call(x, weight, bias, res):
        return fn(x, weight, bias, residual=res, eps=1e-5, prenorm=prenorm, residual_in_fp32=fp32)
    call.__name__ = fn.__name__
    _check(call, make, expect_hits=True)


# ------------------------------------------------------------------------------------------ SSD

@pytest.mark.parametrize("with_z, final", [(False, False), (True, True)])
def test_mamba_chunk_scan_combined(with_z, final):
    b, length, h, p, groups, n = 2, 24, 4, 8, 1, 16

    def make(g):
        x = _rand(g, b, length, h, p)
        dt = _rand(g, b, length, h, scale=0.5)
        A = -torch.rand(h, device=CUDA, generator=g) - 0.1
        B, C = _rand(g, b, length, groups, n), _rand(g, b, length, groups, n)
        D, bias = _rand(g, h), _rand(g, h)
        z = _rand(g, b, length, h, p) if with_z else None
        return x, dt, A, B, C, D, z, bias

    def call(x, dt, A, B, C, D, z, bias):
        return F.mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                           return_final_states=final)
    call.__name__ = "mamba_chunk_scan_combined"
    # the SSD path makes its own contiguous copies (CuPy work outside launches) in some layouts: hits not required
    _check(call, make, expect_hits=False)


# ------------------------------------------------------------------------------------------ unusual contexts

def test_other_stream_and_autocast_take_the_normal_path():
    make = _scan_inputs(F32, True, True, True)
    _check(F.selective_scan_fn, make, expect_hits=True)  # a plan for this key exists now
    args = make(_gen(5))
    with fastpath(False):
        want = F.selective_scan_fn(*_clone(args), delta_softplus=True)
    hits = _plans.STATS["hits"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = F.selective_scan_fn(*args, delta_softplus=True)
    side.synchronize()
    _same(got, want, "side stream")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = F.selective_scan_fn(*args, delta_softplus=True)
    _same(got, want, "autocast")
    assert _plans.STATS["hits"] == hits


def test_cuda_graph_capture_and_replay():
    make = _scan_inputs(F32, True, True, True)
    _check(F.selective_scan_fn, make, expect_hits=True)
    static = make(_gen(11))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            F.selective_scan_fn(*static, delta_softplus=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.selective_scan_fn(*static, delta_softplus=True)
    fresh = make(_gen(12))
    for s, f in zip(static, fresh):
        if s is not None:
            s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    with fastpath(False):
        want = F.selective_scan_fn(*fresh, delta_softplus=True)
    _same(out, want, "graph replay")
    # and the default stream still replays its plan afterwards
    _check(F.selective_scan_fn, make, expect_hits=True)


def test_gradients_agree():
    make = _scan_inputs(F32, True, True, True)

    def grads(on, seed):
        args = [a.clone().requires_grad_(a.is_floating_point()) if a is not None else None
                for a in make(_gen(seed))]
        with fastpath(on):
            out = F.selective_scan_fn(*args, delta_softplus=True)
            out.square().sum().backward()
        return [out] + [a.grad for a in args if a is not None]

    _plans.clear()
    for seed in range(3):
        _same(grads(True, seed), grads(False, seed), f"grads {seed}")
    assert _plans.STATS["hits"] > 0, _plans.REFUSED


def test_conv_module_path_and_norm_in_training():
    x = _rand(_gen(0), 2, 16, 24)
    w = _rand(_gen(1), 16, 4).requires_grad_(True)
    for seed in range(3):
        xs = _rand(_gen(seed), 2, 16, 24).requires_grad_(True)
        outs = []
        for on in (True, False):
            xi = xs.detach().clone().requires_grad_(True)
            wi = w.detach().clone().requires_grad_(True)
            with fastpath(on):
                y = F.causal_conv1d_fn(xi, wi, None, activation="silu")
                y = F.rms_norm_fn(y.transpose(1, 2).contiguous(), torch.ones(16, device=CUDA), None, eps=1e-5)
                y.square().sum().backward()
            outs.append([y, xi.grad, wi.grad])
        _same(outs[0], outs[1], f"training {seed}")
    del x


# ------------------------------------------------------------------------------------------ session 7

MODES = {  # (DRIVER_LAUNCH, FREE_EARLY, KEEP_SCRATCH)
    "session6": (False, False, 0),  # SSMCORE_PLAN_LAUNCH=cupy SSMCORE_PLAN_FREE=0 SSMCORE_PLAN_KEEP_SCRATCH=0
    "driver": (True, True, 0),
    "default": (_plans.DRIVER_LAUNCH, _plans.FREE_EARLY, _plans.KEEP_SCRATCH),
}


@contextlib.contextmanager
def plan_mode(mode):
    names = ("DRIVER_LAUNCH", "FREE_EARLY", "KEEP_SCRATCH")
    was = [getattr(_plans, n) for n in names]
    for n, v in zip(names, MODES[mode]):
        setattr(_plans, n, v)
    _plans.clear()
    try:
        yield
    finally:
        for n, v in zip(names, was):
            setattr(_plans, n, v)
        _plans.clear()


def _ssd_call(x, dt, A, B, C, D, z, bias):
    return F.mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, z=z, dt_bias=bias, dt_softplus=True,
                                       return_final_states=True)


_ssd_call.__name__ = "mamba_chunk_scan_combined"


def _ssd_inputs(b=2, length=24, h=4, p=8, groups=1, n=16):
    def make(g):
        return (_rand(g, b, length, h, p), _rand(g, b, length, h, scale=0.5),
                -torch.rand(h, device=CUDA, generator=g) - 0.1, _rand(g, b, length, groups, n),
                _rand(g, b, length, groups, n), _rand(g, h), None, _rand(g, h))
    return make


def _state_inputs(dtype=F32):
    def make(g):  # the suite's host_overhead form: Mamba-2 heads, dt / A / D / dt_bias expanded (stride 0)
        b, h, p, n = 1, 2, 16, 16
        return (_rand(g, b, h, p, n), _rand(g, b, h, p, dtype=dtype), _rand(g, b, h, 1, dtype=dtype).expand(b, h, p),
                (-torch.rand(h, 1, 1, device=CUDA, generator=g) - 0.1).expand(h, p, n), _rand(g, b, 1, n, dtype=dtype),
                _rand(g, b, 1, n, dtype=dtype), _rand(g, h, 1).expand(h, p), None, _rand(g, h, 1).expand(h, p))
    return make


def _rms_call(x, weight, res):
    return F.rms_norm_fn(x, weight, None, residual=res, eps=1e-5, prenorm=True, residual_in_fp32=True)


_rms_call.__name__ = "rms_norm_fn"
DROPINS = {  # name -> (fn, make, kwargs, mutated, op names whose plans must launch through the driver)
    "scan": (F.selective_scan_fn, _scan_inputs(BF16, True, True, True, b=1, d=64, length=16),
             dict(delta_softplus=True), (), ("selective_scan_fwd",)),
    "state_update": (F.selective_state_update, _state_inputs(BF16), dict(dt_softplus=True), (0,),
                     ("selective_state_update",)),
    "conv": (F.causal_conv1d_fn, _conv_inputs(BF16, False, True, False), dict(activation="silu"), (),
             ("causal_conv1d_fwd",)),
    "rms_norm": (_rms_call, lambda g: (_rand(g, 4, 64, dtype=BF16), _rand(g, 64), _rand(g, 4, 64, dtype=BF16)),
                 {}, (), ("rms_norm_fwd",)),
    "ssd": (_ssd_call, _ssd_inputs(), {}, (), ("ssd_fwd",)),
}


@pytest.mark.parametrize("mode", ["session6", "driver", "default"])
@pytest.mark.parametrize("name", list(DROPINS))
def test_replay_modes_bitwise(name, mode):
    """Each replay form (session 6's CuPy-call replay, driver launches, driver launches with kept scratch) gives
    the normal path's bits, and the driver forms really launch through the driver."""
    fn, make, kwargs, mutated, ops = DROPINS[name]
    with plan_mode(mode):
        hits = _check(fn, make, kwargs, mutated=mutated, calls=4)
        assert hits >= 2, f"{name}: no plan replayed; refused: {_plans.REFUSED}"
        for op in ops:
            plans = [p for _, p in _plans.plans_of(op) if isinstance(p, _plans._Plan)]
            assert plans, (op, _plans.REFUSED)
            for plan in plans:
                assert ("_L(" in plan.source) == (mode != "session6"), plan.source


def _ssd_out_only(x, dt, A, B, C, D, z, bias):
    return F.mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, z=z, dt_bias=bias, dt_softplus=True)


def _rms_no_prenorm(x, weight, res):
    return F.rms_norm_fn(x, weight, None, residual=res, eps=1e-5, prenorm=False, residual_in_fp32=True)


FIRST_ONLY = {  # drop-ins whose call drops results (ops.eager.<op>.first): name -> (fn, make, kwargs, op name)
    "scan": DROPINS["scan"][:3] + ("selective_scan_fwd",),
    "conv": DROPINS["conv"][:3] + ("causal_conv1d_fwd",),
    "ssd": (_ssd_out_only, _ssd_inputs(), {}, "ssd_fwd"),
    "rms_norm": (_rms_no_prenorm, DROPINS["rms_norm"][1], {}, "rms_norm_fwd"),
}


@pytest.mark.parametrize("mode", ["session6", "default"])
@pytest.mark.parametrize("name", list(FIRST_ONLY))
def test_first_result_replays_bitwise(name, mode):
    """A drop-in that returns only the op's first result replays a plan variant that allocates nothing else
    (the other results' blocks are plan scratch, no placeholders): bitwise the normal path, and really used."""
    fn, make, kwargs, op = FIRST_ONLY[name]
    with plan_mode(mode):
        hits = _check(fn, make, kwargs, calls=4)
        assert hits >= 2, f"{name}: no plan replayed; refused: {_plans.REFUSED}"
        plans = [p for _, p in _plans.plans_of(op) if isinstance(p, _plans._Plan)]
        assert plans and all(p.first is not None for p in plans), (op, _plans.REFUSED)
        source = plans[0].first_source.split("# when")[0]
        assert source.count("_empty_strided(") == 1 and "_absent" not in source, source


def test_threads_replaying_one_plan():
    """Threads replaying the same plans at once (the busy plan's CuPy-call replay, a thread's first driver
    launch making sure of its CUDA context): every result is the normal path's."""
    import threading

    fn, make, kwargs, _, _ = DROPINS["scan"]
    sets = [make(_gen(100 + i)) for i in range(8)]
    with fastpath(False):
        want = [fn(*_clone(s), **kwargs) for s in sets]
    torch.cuda.synchronize()
    _plans.clear()
    for s in sets[:3]:
        fn(*s, **kwargs)  # recorded
    errors, got = [], {}

    def worker(k):
        try:
            torch.cuda.set_device(0)
            for r in range(40):
                i = (k + r) % len(sets)
                got[(k, r)] = (i, fn(*sets[i], **kwargs))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    assert not errors, errors
    for (k, r), (i, out) in got.items():
        _same(out, want[i], f"thread {k} call {r}")
    assert _plans.STATS["hits"] > 0


@pytest.mark.parametrize("kind", ["Mamba", "Mamba2"])
def test_block_memory_of_recording_and_replaying_calls(kind):
    """Mamba / Mamba2 block forward+backward (B8 L2048 d_model 1024, bf16 autocast, as bench/profile_block.py):
    the peak of the call that records the launch plans and of one that replays them stays within 3 % of the
    normal path's (session 6's recorder held every block to the op's end: 989 vs 633 MiB for Mamba; until OVH7c the
    recorder sat in a reference cycle with its line tracers, holding the op's arguments until a cyclic collection)."""
    import gc

    from ssmcore.adapters.torch.modules import Mamba, Mamba2

    torch.manual_seed(0)
    if kind == "Mamba":
        module = Mamba(1024, d_state=16, device=CUDA)
    else:
        module = Mamba2(1024, d_state=128, headdim=64, chunk_size=256, device=CUDA)
    x = torch.randn(8, 2048, 1024, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    params = [p for p in module.parameters() if p.requires_grad]

    def peak():
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = module(x)
        result = torch.autograd.grad(out, [x] + params, g)
        torch.cuda.synchronize()
        del out, result
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    with fastpath(False):
        peak()  # kernels compiled, streams made
        normal = peak()
    report = {}
    for mode in ("session6", "default"):
        with plan_mode(mode):
            calls = [peak() for _ in range(3)]  # normal path, recording, replay
            report[mode] = calls
            stats = dict(_plans.STATS)
    print(f"{kind}: normal path {normal:.1f} MiB; [first, recording, replaying] call peaks: session-6 plans "
          f"{report['session6']}, now {report['default']}; plan stats {stats}")
    first, recording, replaying = report["default"]
    # (the first call records too: keys met twice in one forward+backward, the backward's recomputations)
    assert first <= normal * 1.03 + 4, f"{kind}: first call {first:.1f} MiB vs {normal:.1f}"
    assert recording <= normal * 1.03 + 4, f"{kind}: recording call {recording:.1f} MiB vs {normal:.1f}"
    assert replaying <= normal * 1.03 + 4, f"{kind}: replaying call {replaying:.1f} MiB vs {normal:.1f}"
