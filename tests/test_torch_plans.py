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

