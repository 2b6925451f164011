"""Launch plans (adapters/torch/_plans.py) without a GPU.

CuPy arrays can be built over host memory (UnownedMemory) and ``cupy.empty`` runs through a Python
allocator without touching the driver, so a fake op here goes through the real recorder: views of
torch CPU tensors, ``cupy.empty`` allocations drawn from torch (as ``_bridge._torch_malloc`` does),
``_runtime.launch`` of fake kernels that compute through raw pointers, ``_bridge.fresh_outputs``.
The replay must give bitwise the results of the normal path, and everything the recorder must
refuse is refused. The CUDA path itself is tested in tests/gpu/test_fastpath_gpu.py.
"""

from __future__ import annotations

import ctypes
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

cupy = pytest.importorskip("cupy")

from ssmcore.adapters.torch import _bridge, _plans  # noqa: E402
from ssmcore.backends.cupy import _arrays, _runtime  # noqa: E402

fake_mode = "plain"  # a module-level setting the fake backend reads (a knob)
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _floats(p, n):
    return np.ctypeslib.as_array((ctypes.c_float * n).from_address(p))


def _p(a):
    return 0 if a is None else a.data.ptr if isinstance(a, cupy.ndarray) else int(a)


class _Kernel:
    """A fake kernel: runs ``body`` on the host through the pointers it is given; notes its arguments."""

    def __init__(self, body):
        self.body = body
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.calls.append(args)
        self.body(*args)


def _mul(x, w, out, n):
    n = int(n)
    _floats(_p(out), n)[:] = _floats(_p(x), n) * _floats(_p(w), n)


def _add(t, b, out, n, scale):
    n = int(n)
    r = _floats(_p(t), n) + np.float32(scale)
    if _p(b):
        r = r + _floats(_p(b), n)
    _floats(_p(out), n)[:] = r


MUL, ADD = _Kernel(_mul), _Kernel(_add)


def _sim_malloc(size):
    """_bridge._torch_malloc on the host: a torch uint8 block, the same hook call."""
    block = torch.empty(((size + 15) >> 4) << 4, dtype=torch.uint8)
    owner = _bridge._Block(block)
    if _bridge._alloc_hook is not None:
        _bridge._alloc_hook(size, owner)
    return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, owner, 0), 0)


class _scope:
    def __enter__(self):
        from cupy.cuda import memory

        self.old = memory._get_thread_local_allocator()
        memory._set_thread_local_allocator(_sim_malloc)

    def __exit__(self, *exc):
        from cupy.cuda import memory

        memory._set_thread_local_allocator(self.old)


def _view(t):
    if t is None:
        return None
    assert t.is_contiguous()
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel() * t.element_size(), t, 0)
    return cupy.ndarray(tuple(t.shape), _bridge._NP_DTYPES[t.dtype], cupy.cuda.MemoryPointer(mem, 0))


def fake_op(x, w, b, scale, with_last):
    """An op implementation shaped like ops.py's: checks, views, cupy.empty, launches, fresh outputs."""
    if x.shape != w.shape:
        raise ValueError(f"w: expected shape {tuple(x.shape)}, got {tuple(w.shape)}")
    if os.environ.get("SSMCORE_FAKE_SCALE"):
        scale = scale * 2.0
    with _scope():
        xa, wa, ba = _view(x), _view(w), _view(b)
        n = x.numel()
        tmp = cupy.empty((n,), cupy.float32)
        out = cupy.empty(tuple(x.shape), cupy.float32)
        last = cupy.empty((2,), cupy.float32) if with_last else None
        _runtime.launch(MUL, (1,), (32,), (xa, wa, tmp, np.int32(n)))
        bump = 1.0 if fake_mode == "bump" else 0.0
        _runtime.launch(ADD, (1,), (32,), (tmp, _arrays.ptr(ba), out, np.int32(n), np.float32(scale + bump)))
        if last is not None:
            _runtime.launch(ADD, (1,), (32,), (tmp[n - 2:], _arrays.NULL, last, np.int32(2), np.float32(0)))
        return _bridge.fresh_outputs((out, last), (x, w, b), x.device)


_REAL_KEY = _plans._key  # before any fixture replaces it (see _cpu_hit)


def _cpu_key(name, args):
    parts, ptrs = [name], []
    for a in args:
        if isinstance(a, torch.Tensor):
            p = a.data_ptr()
            ptrs.append(p)
            parts.append((a.dtype, a.shape, a.stride(), p & 15))  # host blocks: 16-byte aligned
        else:
            ptrs.append(0)
            parts.append((type(a), a.hex() if type(a) is float else a))
    return tuple(parts + [0]), ptrs, 0


@pytest.fixture
def sim(monkeypatch):
    """The recorder pointed at host memory: CPU tensors count as device 0, this file counts as a backend."""
    assert _plans._import()
    monkeypatch.setattr(_plans, "_key", _cpu_key)
    monkeypatch.setattr(_plans, "_context_ok", lambda device: True)
    monkeypatch.setattr(_plans, "_stream_known", lambda device: True)
    monkeypatch.setattr(_plans, "_torch_device", lambda index: torch.device("cpu"))
    monkeypatch.setattr(_plans, "ENABLED", True)
    monkeypatch.setattr(_plans, "RECORD_AFTER", 1)
    monkeypatch.setattr(_bridge, "_cupy", cupy)
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: "stream0")
    real_dirs = _plans._dirs

    def dirs():
        watched, _, cupy_dir, rt_file = real_dirs()
        return watched + (_HERE,), _HERE, cupy_dir, rt_file

    monkeypatch.setattr(_plans, "_dirs", dirs)
    _plans.clear()
    for k in _plans.STATS:
        monkeypatch.setitem(_plans.STATS, k, 0)
    yield
    _plans.clear()


def _inputs(rng, n=7, bias=True):
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return t(n), t(n), (t(n) if bias else None)


def _run(fn, *args):
    return _plans.run(fn.__name__, fn, args, {})


def _same(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
    assert torch.equal(a.view(torch.int32) if a.numel() else a, b.view(torch.int32) if b.numel() else b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_last", [True, False])
def test_replay_is_bitwise_the_normal_path(sim, rng, bias, with_last):
    x, w, b = _inputs(rng, bias=bias)
    first = _run(fake_op, x, w, b, 0.25, with_last)
    assert _plans.STATS["recorded"] == 1, _plans.REFUSED
    for _ in range(3):
        x, w, b = _inputs(rng, bias=bias)
        keep = [t.clone() for t in (x, w) + ((b,) if b is not None else ())]
        n_mul = len(MUL.calls)
        got = _run(fake_op, x, w, b, 0.25, with_last)
        assert all(isinstance(a, int) for a in MUL.calls[n_mul][:3])  # replayed: pointers as Python ints
        want = fake_op(x, w, b, 0.25, with_last)
        assert len(got) == len(want) == 2
        for g, e in zip(got, want):
            _same(g, e)
        for t, k in zip((x, w, b), keep):
            assert torch.equal(t, k)  # inputs untouched
    assert _plans.STATS["hits"] == 3
    assert first[1].shape == ((2,) if with_last else (0,))
    ((_, plan),) = _plans.plans_of("fake_op")
    assert plan.n_launches == (3 if with_last else 2)


def test_new_key_records_again_and_bad_input_still_raises(sim, rng):
    x, w, b = _inputs(rng)
    _run(fake_op, x, w, b, 0.25, False)
    _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["hits"] == 1
    _run(fake_op, x, w, b, 0.5, False)  # another scalar: another key
    _run(fake_op, x, w, b, -0.0, False)
    assert _plans.STATS["recorded"] == 3
    with pytest.raises(ValueError, match="^w:"):
        _run(fake_op, x, w[:-1], b, 0.25, False)
    got = _run(fake_op, x, w, b, 0.25, False)
    _same(got[0], fake_op(x, w, b, 0.25, False)[0])


def test_environment_and_module_settings_are_checked(sim, rng, monkeypatch):
    global fake_mode
    x, w, b = _inputs(rng)
    monkeypatch.delenv("SSMCORE_FAKE_SCALE", raising=False)
    _run(fake_op, x, w, b, 0.25, False)
    monkeypatch.setenv("SSMCORE_FAKE_SCALE", "1")
    got = _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["rerecorded"] == 1 and _plans.STATS["hits"] == 0
    _same(got[0], fake_op(x, w, b, 0.25, False)[0])
    monkeypatch.setattr(sys.modules[__name__], "fake_mode", "bump")
    got = _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["rerecorded"] == 2
    _same(got[0], fake_op(x, w, b, 0.25, False)[0])
    _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["hits"] == 1


def _refused(fn, *args):
    _plans.clear()
    for _ in range(_plans.RECORD_TRIES):
        out = _run(fn, *args)
    assert _plans.STATS["refused"] == _plans.RECORD_TRIES and fn.__name__ in _plans.REFUSED
    _run(fn, *args)  # the normal path again, neither a replay nor another recording
    assert _plans.STATS["hits"] == 0 and _plans.STATS["refused"] == _plans.RECORD_TRIES
    return out, _plans.REFUSED[fn.__name__]


def op_allocating_elsewhere(x, w, b, scale, with_last):
    with _scope():
        xa = _view(x)
        out = cupy.ndarray(tuple(x.shape), cupy.float32)  # not cupy.empty: e.g. what astype or zeros do
        _runtime.launch(MUL, (1,), (32,), (xa, xa, out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def op_storing(x, w, b, scale, with_last):
    with _scope():
        out = cupy.empty(tuple(x.shape), cupy.float32)
        try:
            out[...] = 0  # a CuPy fill: no launch through _runtime (fails here, without a GPU)
        except Exception:
            pass
        _runtime.launch(MUL, (1,), (32,), (_view(x), _view(w), out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def op_host_read(x, w, b, scale, with_last):
    with _scope():
        xa = _view(x)
        try:
            int(xa[0])  # a host read of a value
        except Exception:
            pass
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(MUL, (1,), (32,), (xa, _view(w), out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def op_pointer_constant(x, w, b, scale, with_last):
    with _scope():
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(MUL, (1,), (32,), (np.uint64(_view(x).data.ptr), _view(w), out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def op_cupy_method(x, w, b, scale, with_last):
    with _scope():
        xa = _view(x)
        try:
            xa.get()  # a device-to-host copy (fails here)
        except Exception:
            pass
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(MUL, (1,), (32,), (xa, _view(w), out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def op_copied_result(x, w, b, scale, with_last):
    with _scope():
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(MUL, (1,), (32,), (_view(x), _view(w), out, np.int32(x.numel())))
        # as fresh_outputs does for an input handed back or a layout it must change: a copy
        return tuple(t.clone() for t in _bridge.fresh_outputs((out,), (x, w, b), x.device))


def op_twice(x, w, b, scale, with_last):
    return fake_op(x, x, b, scale, with_last)


@pytest.mark.parametrize("fn, why", [
    (op_allocating_elsewhere, "allocation in op_allocating_elsewhere"),
    (op_storing, "works on array out"),
    (op_host_read, "works on array xa"),
    (op_pointer_constant, "points into an array"),
    (op_cupy_method, "cupy's get"),
    (op_copied_result, "not exactly one fresh allocation"),
])
def test_refusals(sim, rng, fn, why):
    x, w, b = _inputs(rng)
    _, reason = _refused(fn, x, w, b, 0.25, False)
    assert why in reason


def test_one_tensor_as_two_arguments_is_refused(sim, rng):
    x, w, b = _inputs(rng)
    _, reason = _refused(fake_op, x, x, b, 0.25, False)
    assert "two arguments" in reason
    got = _run(fake_op, x, x, b, 0.25, False)
    _same(got[0], fake_op(x, x, b, 0.25, False)[0])


def test_off_switch_and_cpu_tensors_take_the_normal_path(rng, monkeypatch):
    calls = []

    def fn(*args, **kwargs):
        calls.append(args)
        return "normal"

    x, w, b = _inputs(rng)
    assert _plans.run("fn", fn, (x, w, b, 0.5), {}) == "normal"  # CPU tensors: real _key says no
    monkeypatch.setattr(_plans, "ENABLED", False)
    assert _plans.run("fn", fn, (x, w, b, 0.5), {}) == "normal"
    assert _plans.run("fn", fn, (x,), {"w": w}) == "normal"
    assert len(calls) == 3 and not _plans.plans_of("fn")


def op_cast(x, w, b, scale, with_last):
    """A float32 x with a bfloat16 w that the backend casts (``_arrays.contiguous``, as conv/norm weights are)."""
    with _scope():
        wa = _arrays.contiguous(_view(w), cupy.float32)
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(MUL, (1,), (32,), (_view(x), wa, out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def test_parameter_cast_is_replayed_by_torch(sim, rng, monkeypatch):
    # Without a GPU, CuPy's own astype cannot run: the recorder's torch cast is what both calls use here;
    # on the GPU, tests/gpu/test_fastpath_gpu.py compares the replay with CuPy's cast bit for bit.
    monkeypatch.setattr(_bridge, "_cupy_view", lambda name, t: _view(t))
    for _ in range(3):
        x, w, _ = _inputs(rng)
        w = w.to(torch.bfloat16)
        got = _run(op_cast, x, w, None, 0.0, False)
        assert torch.equal(got[0], x * w.float())
    assert _plans.STATS["recorded"] == 1 and _plans.STATS["hits"] == 2, _plans.REFUSED
    ((_, plan),) = _plans.plans_of("op_cast")
    assert "A[1].to(_f32)" in plan.source


def test_a_key_is_recorded_on_its_second_call(sim, rng, monkeypatch):
    monkeypatch.setattr(_plans, "RECORD_AFTER", 2)
    x, w, b = _inputs(rng)
    _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["recorded"] == 0 and not _plans.plans_of("fake_op")
    _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["recorded"] == 1
    _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["hits"] == 1


def test_line_checks(tmp_path):
    assert _plans._import()
    src = tmp_path / "mod.py"
    src.write_text(textwrap.dedent("""\
        def f(a, d):
            a[...] = 0
            d["k"] = 1
            n = int(a.shape[0])
            m = int(a)
            a += 1
            self.x[0] = 2
            _CACHE[1] = 2
            y = cupy.empty(3)
            y = cupy.add(y, y)
    """))
    checks = _plans._line_checks(str(src))
    assert checks[2] == (("array", "a"),)
    assert checks[3] == (("array", "d"),)  # a dict: looked up at run time, not refused
    assert 4 not in checks
    assert checks[5] == (("array", "a"),)
    assert checks[6] == (("array", "a"),)
    assert checks[7] == (("array", ("self", "x")),)  # an attribute chain: looked up when the line runs
    assert checks[8] == (("array", "_CACHE"),)
    assert 9 not in checks  # a Python function: the profile hook sees it run
    assert checks[10][0][0] == "refuse"  # a ufunc object: the profile hook would not



# ------------------------------------------------------------------ session 7: driver launches, block lifetimes

import threading  # noqa: E402
import types  # noqa: E402
import weakref  # noqa: E402

_READ = {"p": ctypes.c_uint64, "i32": ctypes.c_int32, "f32": ctypes.c_float, "u64": ctypes.c_uint64}


class _DriverKernel(_Kernel):
    """A fake cupy.RawKernel with a function pointer (``.kernel.ptr``) and a parameter signature, so that a plan
    launches it through the (fake) driver: the parameter array is decoded as a GPU would read it."""

    def __init__(self, body, sig):
        super().__init__(body)
        self.sig = sig
        self.kernel = types.SimpleNamespace(ptr=0x5000 + 16 * len(_BY_FPTR))
        self.enable_cooperative_groups = False
        _BY_FPTR[self.kernel.ptr] = self

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.calls.append(tuple(_p(a) for a in args))  # addresses only: the arrays (and blocks) are not kept
        self.body(*args)


_BY_FPTR: dict = {}
DMUL = _DriverKernel(_mul, ("p", "p", "p", "i32"))
DADD = _DriverKernel(_add, ("p", "u64", "p", "i32", "f32"))
DRIVER_CALLS = []


def _fake_launch_kernel(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
    kernel = _BY_FPTR[f]
    assert (gx, gy, gz, bx, by, bz, smem, stream, extra) == (1, 1, 1, 32, 1, 1, 0, 0, 0)
    addresses = (ctypes.c_void_p * len(kernel.sig)).from_address(params)
    args = []
    for kind, address in zip(kernel.sig, addresses):
        value = _READ[kind].from_address(address).value
        args.append(np.float32(value) if kind == "f32" else np.int32(value) if kind == "i32" else int(value))
    DRIVER_CALLS.append((kernel, tuple(args)))
    kernel.body(*args)


def driver_op(x, w, b, scale, with_last):
    """fake_op's launches with driver-launchable kernels, and a scratch block dropped half-way (``del t1``)."""
    with _scope():
        xa, wa, ba = _view(x), _view(w), _view(b)
        n = x.numel()
        t1 = cupy.empty((n,), cupy.float32)
        _runtime.launch(DMUL, (1,), (32,), (xa, wa, t1, np.int32(n)))
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(DADD, (1,), (32,), (t1, _arrays.ptr(ba), out, np.int32(n), np.float32(scale)))
        BLOCK_REFS.append(weakref.ref(t1.data.mem._owner))
        del t1
        BLOCK_ALIVE.append(BLOCK_REFS[-1]() is not None)  # during the recording too: the recorder holds it weakly
        out2 = cupy.empty((n,), cupy.float32)  # (where t1 was, under a caching allocator)
        t2 = cupy.empty((n,), cupy.float32)
        _runtime.launch(DMUL, (1,), (32,), (out, xa, t2, np.int32(n)))
        last = cupy.empty((2,), cupy.float32) if with_last else None
        _runtime.launch(DADD, (1,), (32,), (t2, _arrays.NULL, out2, np.int32(n), np.float32(0.5)))
        if last is not None:
            _runtime.launch(DADD, (1,), (32,), (t2[n - 2:], _arrays.NULL, last, np.int32(2), np.float32(0)))
        return _bridge.fresh_outputs((out, out2, last), (x, w, b), x.device)


BLOCK_REFS, BLOCK_ALIVE = [], []


@pytest.fixture
def driver(sim, monkeypatch):
    monkeypatch.setattr(_plans, "_launch_kernel", _fake_launch_kernel)
    monkeypatch.setattr(_plans, "_ensure_context", lambda: _plans._CONTEXT_THREADS.add(threading.get_ident()))
    monkeypatch.setattr(cupy.cuda, "get_current_stream", lambda: types.SimpleNamespace(ptr=0))
    monkeypatch.setattr(_plans, "DRIVER_LAUNCH", True)
    monkeypatch.setattr(_plans, "FREE_EARLY", True)
    monkeypatch.setattr(_plans, "KEEP_SCRATCH", 0)
    DRIVER_CALLS.clear()
    BLOCK_REFS.clear()
    BLOCK_ALIVE.clear()
    yield


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_last", [True, False])
def test_driver_launch_replay_is_bitwise_the_normal_path(driver, rng, bias, with_last):
    x, w, b = _inputs(rng, bias=bias)
    _run(driver_op, x, w, b, 0.25, with_last)
    assert _plans.STATS["recorded"] == 1, _plans.REFUSED
    ((_, plan),) = _plans.plans_of("driver_op")
    assert "_L(" in plan.source and "_lock.acquire" in plan.source
    for _ in range(3):
        x, w, b = _inputs(rng, bias=bias)
        keep = [t.clone() for t in (x, w) + ((b,) if b is not None else ())]
        n_calls, n_cupy = len(DRIVER_CALLS), len(DMUL.calls) + len(DADD.calls)
        got = _run(driver_op, x, w, b, 0.25, with_last)
        assert len(DRIVER_CALLS) - n_calls == plan.n_launches == (5 if with_last else 4)
        assert len(DMUL.calls) + len(DADD.calls) == n_cupy  # no CuPy-call launch in the replay
        # what the kernels read: the new tensors' pointers, the constants as the normal path passed them
        kernel, args = DRIVER_CALLS[n_calls]
        assert kernel is DMUL and args[:2] == (x.data_ptr(), w.data_ptr()) and args[3] == np.int32(x.numel())
        kernel, args = DRIVER_CALLS[n_calls + 1]
        assert args[1] == (b.data_ptr() if b is not None else 0) and args[4] == np.float32(0.25)
        want = driver_op(x, w, b, 0.25, with_last)
        assert len(got) == len(want) == 3
        for g, e in zip(got, want):
            _same(g, e)
        for t, k in zip((x, w, b), keep):
            assert torch.equal(t, k)
    assert _plans.STATS["hits"] == 3


def test_driver_launch_busy_plan_and_cupy_knob(driver, rng, monkeypatch):
    x, w, b = _inputs(rng)
    _run(driver_op, x, w, b, 0.25, False)
    ((_, plan),) = _plans.plans_of("driver_op")
    lock = plan.replay.__globals__["_lock"]
    assert lock.acquire(False)  # another thread in the middle of this plan's replay
    try:
        n_calls, n_cupy = len(DRIVER_CALLS), len(DMUL.calls)
        got = _run(driver_op, x, w, b, 0.25, False)
        assert len(DRIVER_CALLS) == n_calls and len(DMUL.calls) == n_cupy + 2  # the CuPy-call replay
    finally:
        lock.release()
    _same(got[1], driver_op(x, w, b, 0.25, False)[1])
    monkeypatch.setattr(_plans, "DRIVER_LAUNCH", False)  # SSMCORE_PLAN_LAUNCH=cupy: the session-6 replay
    _plans.clear()
    _run(driver_op, x, w, b, 0.25, False)
    ((_, plan),) = _plans.plans_of("driver_op")
    assert "_L(" not in plan.source and "_k0(" in plan.source
    n_cupy = len(DMUL.calls)
    _same(_run(driver_op, x, w, b, 0.25, False)[1], driver_op(x, w, b, 0.25, False)[1])
    assert len(DMUL.calls) == n_cupy + 2 + 2  # replay + normal path, both through CuPy's call


def test_a_kernel_without_a_function_pointer_keeps_the_cupy_call(driver, rng):
    x, w, b = _inputs(rng)
    _run(fake_op, x, w, b, 0.25, False)
    ((_, plan),) = _plans.plans_of("fake_op")
    assert "_L(" not in plan.source


@pytest.mark.parametrize("free_early", [True, False])
def test_scratch_blocks_live_no_longer_than_in_the_normal_path(driver, rng, monkeypatch, free_early):
    monkeypatch.setattr(_plans, "FREE_EARLY", free_early)
    x, w, b = _inputs(rng)
    driver_op(x, w, b, 0.25, True)  # the normal path alone
    _run(driver_op, x, w, b, 0.25, True)  # the recording
    assert _plans.STATS["recorded"] == 1, _plans.REFUSED
    assert BLOCK_ALIVE == [False, not free_early]  # the recorder kept t1 alive only in the session-6 mode
    ((_, plan),) = _plans.plans_of("driver_op")
    lines = plan.source.split("# when")[0].splitlines()
    allocs = [i for i, line in enumerate(lines) if "= _empty" in line]
    launches = [i for i, line in enumerate(lines) if "_L(" in line]
    dels = [i for i, line in enumerate(lines) if line.strip().startswith("del o")]
    if free_early:
        # t1: made before launch 0, dropped after launch 1 (its last), before t2 is made; t2 dropped after the last
        assert len(dels) == 2 and launches[1] < dels[0] < allocs[2] < launches[2] and dels[1] > launches[-1]
        assert allocs[0] < launches[0] < allocs[1] < launches[1]  # out made just before its first launch
    else:
        assert not dels and max(allocs) < min(launches)
    x, w, b = _inputs(rng)
    got = _run(driver_op, x, w, b, 0.25, True)
    for g, e in zip(got, driver_op(x, w, b, 0.25, True)):
        _same(g, e)


@pytest.fixture
def reusing_malloc(monkeypatch):
    """_sim_malloc with a caching allocator's reuse: a freed block's memory goes to the next request of its size
    (the freed uint8 tensors stay alive here, so memory at a dead block's address stays valid)."""
    freed = []

    def malloc(size):
        for i, t in enumerate(freed):
            if t.numel() == ((size + 15) >> 4) << 4:
                block = freed.pop(i)
                break
        else:
            block = torch.empty(((size + 15) >> 4) << 4, dtype=torch.uint8)
        owner = _bridge._Block(block)
        weakref.finalize(owner, freed.append, block)
        if _bridge._alloc_hook is not None:
            _bridge._alloc_hook(size, owner)
        return cupy.cuda.MemoryPointer(cupy.cuda.UnownedMemory(block.data_ptr(), size, owner, 0), 0)

    monkeypatch.setattr(sys.modules[__name__], "_sim_malloc", malloc)
    return freed


def test_recorder_matches_results_to_reused_addresses(driver, rng, monkeypatch, reusing_malloc):
    """A scratch block freed during the call and its memory reused for a result: the result is the later block."""
    monkeypatch.setattr(sys.modules[__name__], "BLOCK_ALIVE", [])
    for _ in range(3):
        x, w, b = _inputs(rng)
        got = _run(driver_op, x, w, b, 0.25, False)
        reusing_malloc.clear()
        want = driver_op(x, w, b, 0.25, False)
        for g, e in zip(got, want):
            _same(g, e)
    assert _plans.STATS["recorded"] == 1 and _plans.STATS["hits"] == 2, _plans.REFUSED


def op_copy_where_scratch_was(x, w, b, scale, with_last):
    """A result that is a torch copy placed (by the allocator) where a freed scratch block was: not a block."""
    with _scope():
        xa = _view(x)
        n = x.numel()
        t1 = cupy.empty((n,), cupy.float32)
        _runtime.launch(DMUL, (1,), (32,), (xa, xa, t1, np.int32(n)))
        out = cupy.empty((n,), cupy.float32)
        _runtime.launch(DADD, (1,), (32,), (t1, _arrays.NULL, out, np.int32(n), np.float32(1)))
        where = t1.data.ptr
        del t1
        res = torch.frombuffer((ctypes.c_float * n).from_address(where), dtype=torch.float32)  # its own storage
        res.copy_(torch.from_numpy(_floats(out.data.ptr, n)))
        return (res,)


def test_a_copy_at_a_freed_blocks_address_is_not_that_block(driver, rng, reusing_malloc):
    for _ in range(_plans.RECORD_TRIES + 1):
        x, w, b = _inputs(rng)
        got = _run(op_copy_where_scratch_was, x, w, b, 0.0, False)
        assert torch.equal(got[0], x * x + 1)
    assert _plans.STATS["hits"] == 0 and "fresh allocation" in _plans.REFUSED["op_copy_where_scratch_was"]


def driver_op_copied_result(x, w, b, scale, with_last):
    """driver_op, its results copied (a recording refused at its end, after the line tracer ran)."""
    return tuple(t.clone() for t in driver_op(x, w, b, scale, with_last))


def _call_and_drop(rng, fn, n):
    """Calls ``fn`` on fresh inputs, drops them; weak references to the inputs (the caller's last references)."""
    x, w, b = _inputs(rng, n=n)
    refs = [weakref.ref(t) for t in (x, w, b)]
    _run(fn, x, w, b, 0.25, True)
    del x, w, b
    return refs


@pytest.mark.parametrize("fn", [driver_op, driver_op_copied_result])
def test_a_recording_keeps_no_argument_alive_after_the_call(driver, rng, monkeypatch, fn):
    """The recording call frees an op's arguments (and its scratch) as the normal path does, without waiting for a
    cyclic garbage collection: session 7's per-frame line tracer was a closure that returned itself, a reference
    cycle holding the recorder and through it the op's arguments (Mamba block fwd+bwd on the H200: the recording
    call peaked 129 MiB above the normal path, two (B, D, L) activations held past their last use)."""
    monkeypatch.setattr(sys.modules[__name__], "BLOCK_ALIVE", [])
    tracers = []
    local_tracer = _plans._Recorder._local_tracer

    def counting(self, checks):
        tracers.append(1)
        return local_tracer(self, checks)

    monkeypatch.setattr(_plans._Recorder, "_local_tracer", counting)
    import gc

    gc.collect()
    gc.disable()  # what a cycle holds stays held
    try:
        for _ in range(_plans.RECORD_TRIES + 1):  # recordings (accepted, or refused and tried again), then not
            refs = _call_and_drop(rng, fn, 257)
            assert [r() is None for r in refs] == [True, True, True], _plans.STATS
            assert not [o for o in gc.get_objects() if type(o) in (_plans._Recorder, _plans._LineTracer)]
    finally:
        gc.enable()
    assert tracers  # the op's frames were line-traced (what made the cycle)
    if fn is driver_op:
        assert _plans.STATS["recorded"] == 1 and _plans.STATS["hits"] == 2, _plans.REFUSED
    else:
        assert _plans.STATS["refused"] == _plans.RECORD_TRIES and "fresh allocation" in _plans.REFUSED[fn.__name__]


def test_small_scratch_is_kept_with_the_plan(driver, rng, monkeypatch):
    monkeypatch.setattr(_plans, "KEEP_SCRATCH", 1 << 20)
    x, w, b = _inputs(rng)
    _run(driver_op, x, w, b, 0.25, True)
    ((_, plan),) = _plans.plans_of("driver_op")
    replay_source = plan.source.split("# when")[0]
    assert replay_source.count("_empty(") == 0 and "del o" not in replay_source  # t1, t2: made once, kept
    assert replay_source.count("_empty_strided(") == 3  # the results, per call
    kept = [v for k, v in plan.replay.__globals__.items() if k.startswith("_kept")]
    assert len(kept) == 2
    for _ in range(3):
        x, w, b = _inputs(rng)
        n_calls = len(DRIVER_CALLS)
        got = _run(driver_op, x, w, b, 0.25, True)
        assert DRIVER_CALLS[n_calls][1][2] == kept[0].data_ptr()  # launch 0 writes t1 into the kept block
        for g, e in zip(got, driver_op(x, w, b, 0.25, True)):
            _same(g, e)
    assert "_empty(" in plan.source.split("# when")[1]  # the CuPy-call replay (a busy plan) allocates per call


def test_validity_check_without_os_environ_data(sim, rng, monkeypatch):
    """The generated check reads os.environ's encoded dict; another mapping in its place takes the plain loop."""
    x, w, b = _inputs(rng)
    monkeypatch.setenv("SSMCORE_FAKE_SCALE", "1")
    _run(fake_op, x, w, b, 0.25, False)
    ((_, plan),) = _plans.plans_of("fake_op")
    assert plan.valid()
    monkeypatch.setattr(os, "environ", dict(os.environ))
    assert plan.valid()
    os.environ["SSMCORE_FAKE_SCALE"] = ""
    assert not plan.valid()
    got = _run(fake_op, x, w, b, 0.25, False)
    assert _plans.STATS["rerecorded"] == 1
    _same(got[0], fake_op(x, w, b, 0.25, False)[0])


def test_kept_scratch_has_a_total_cap(driver, rng, monkeypatch):
    monkeypatch.setattr(_plans, "KEEP_SCRATCH", 1 << 20)
    monkeypatch.setattr(_plans, "KEEP_SCRATCH_TOTAL", 64)  # room for one plan's two 32-byte blocks
    x, w, b = _inputs(rng)
    _run(driver_op, x, w, b, 0.25, False)
    _run(driver_op, x, w, b, 0.5, False)  # another key: past the cap, its scratch is allocated per call
    sources = sorted(p.source.split("# when")[0] for _, p in _plans.plans_of("driver_op"))
    assert [s.count("= _empty(") for s in sources] == [0, 2] or [s.count("= _empty(") for s in sources] == [2, 0]
    _plans.clear()
    assert _plans._kept_bytes == 0


def op_cast_driver(x, w, b, scale, with_last):
    with _scope():
        wa = _arrays.contiguous(_view(w), cupy.float32)
        out = cupy.empty(tuple(x.shape), cupy.float32)
        _runtime.launch(DMUL, (1,), (32,), (_view(x), wa, out, np.int32(x.numel())))
        return _bridge.fresh_outputs((out,), (x, w, b), x.device)


def test_parameter_cast_with_driver_launches(driver, rng, monkeypatch):
    monkeypatch.setattr(_bridge, "_cupy_view", lambda name, t: _view(t))
    for _ in range(3):
        x, w, _ = _inputs(rng)
        w = w.to(torch.bfloat16)
        n_calls = len(DRIVER_CALLS)
        got = _run(op_cast_driver, x, w, None, 0.0, False)
        assert torch.equal(got[0], x * w.float())
    assert _plans.STATS["recorded"] == 1 and _plans.STATS["hits"] == 2, _plans.REFUSED
    assert len(DRIVER_CALLS) == n_calls + 1
    ((_, plan),) = _plans.plans_of("op_cast_driver")
    assert "A[1].to(_f32)" in plan.source and "_L(" in plan.source


# ------------------------------------------------------------------ hit(): the one-pass check of the eager calls


def _cpu_hit(monkeypatch):
    """_plans.hit with host tensors standing for device-0 tensors (as _cpu_key does for _key): hit's key comes from
    _plans._key, installed here as its own source with the device test and the alignment bits of host blocks
    replaced, run in the module's globals (so the recording call's key and hit's key are the same function)."""
    import inspect

    source = textwrap.dedent(inspect.getsource(_REAL_KEY))
    for old, new in (("not a.is_cuda", "False"), ("a.get_device()", "0"), ("p & 63", "p & 15")):
        assert old in source
        source = source.replace(old, new)
    monkeypatch.setattr(_plans, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(_plans, "_get_device", lambda: 0)
    ns = {}
    exec(compile(source, "<_key on the host>", "exec"), ns)
    code = ns["_key"]
    host_key = types.FunctionType(code.__code__, vars(_plans), "_key", code.__defaults__)  # the live globals
    monkeypatch.setattr(_plans, "_key", host_key)
    return _plans.hit


@pytest.mark.parametrize("with_last", [True, False])
def test_hit_replays_and_first_result_replay_is_bitwise(driver, rng, monkeypatch, with_last):
    monkeypatch.setattr(_plans, "KEEP_SCRATCH", 1 << 20)
    hit = _cpu_hit(monkeypatch)
    x, w, b = _inputs(rng)
    args = (x, w, b, 0.25, with_last)
    assert hit("driver_op", args) is _plans.MISS  # nothing recorded yet: the normal path (which records)
    _run(driver_op, *args)
    ((key, plan),) = _plans.plans_of("driver_op")
    assert key == _cpu_key("driver_op", args)[0]
    for _ in range(3):
        x, w, b = _inputs(rng)
        args = (x, w, b, 0.25, with_last)
        want = driver_op(*args)
        got = hit("driver_op", args)
        assert len(got) == 3
        for g, e in zip(got, want):
            _same(g, e)
        n_calls = len(DRIVER_CALLS)
        got1 = hit("driver_op", args, True)
        assert len(DRIVER_CALLS) - n_calls == plan.n_launches  # the same launches
        _same(got1, want[0])
    assert _plans.STATS["hits"] == 6
    # the first-result replay allocates only that result: the others' blocks are kept scratch, no placeholder
    assert plan.first_source.split("# when")[0].count("_empty_strided(") == 1
    assert "_absent" not in plan.first_source.split("# when")[0]
    full = plan.source.split("# when")[0]
    assert full.count("_empty_strided(") == (3 if with_last else 2) and ("_absent" in full) != with_last


def test_hit_misses_where_the_normal_path_must_run(driver, rng, monkeypatch):
    hit = _cpu_hit(monkeypatch)
    x, w, b = _inputs(rng)
    _run(driver_op, x, w, b, 0.25, False)
    assert hit("driver_op", (x, w, b, 0.25, False)) is not _plans.MISS
    wg = w.clone().requires_grad_(True)
    assert hit("driver_op", (x, wg, b, 0.25, False)) is _plans.MISS  # autograd would record: the custom op
    with torch.no_grad():
        assert hit("driver_op", (x, wg, b, 0.25, False)) is not _plans.MISS
    assert hit("driver_op", (x, w, b, 0.5, False)) is _plans.MISS  # another key
    assert hit("driver_op", (x, w, b, 0.25, 0)) is _plans.MISS  # (int 0 is not False)

    class Sub(torch.Tensor):
        pass

    assert hit("driver_op", (x.as_subclass(Sub), w, b, 0.25, False)) is _plans.MISS
    monkeypatch.setattr(_plans, "ENABLED", False)
    assert hit("driver_op", (x, w, b, 0.25, False)) is _plans.MISS
    monkeypatch.setattr(_plans, "ENABLED", True)
    monkeypatch.setattr(_plans, "ONE_PASS", False)  # SSMCORE_PLAN_ONE_PASS=0: the three-pass path (via run())
    assert hit("driver_op", (x, w, b, 0.25, False)) is _plans.MISS
    monkeypatch.setattr(_plans, "ONE_PASS", True)
    with torch.autocast("cpu"):
        monkeypatch.setattr(_plans, "_autocast_enabled", lambda device: True)
        assert hit("driver_op", (x, w, b, 0.25, False)) is _plans.MISS
    monkeypatch.setattr(_plans, "_autocast_enabled", torch.is_autocast_enabled)
    monkeypatch.setattr(_plans, "_raw_stream", lambda device: 12345)  # a side stream
    assert hit("driver_op", (x, w, b, 0.25, False)) is _plans.MISS
    monkeypatch.setattr(_plans, "_raw_stream", lambda device: 0)
    monkeypatch.setattr(sys.modules[__name__], "fake_mode", "bump")  # a module setting changed: the normal path
    assert hit("driver_op", (x, w, b, 0.25, False)) is _plans.MISS


def test_eager_ops_on_cpu_tensors_miss_and_first_is_the_first_result(rng):
    from ssmcore.adapters.torch import functional as F
    from ssmcore.adapters.torch import ops

    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    x, weight, bias = t(2, 5, 7), t(5, 4), t(5)
    assert _plans.hit("causal_conv1d_fwd", (x, weight, bias, None, None, "silu", False)) is _plans.MISS
    full = ops.eager.causal_conv1d_fwd(x, weight, bias, None, None, "silu", False)
    first = ops.eager.causal_conv1d_fwd.first(x, weight, bias, None, None, "silu", False)
    _same(first, full[0])
    _same(F.causal_conv1d_fn(x, weight, bias, activation="silu"), full[0])
