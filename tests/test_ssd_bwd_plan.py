"""The SSD backward launcher's v4 path is recordable as a launch plan (adapters/torch/_plans.py), without a GPU.

The launcher (backends/cupy/state_space_duality_bwd.py) runs on CuPy views of host tensors with fake kernels (they
only note their launches), under the real recorder pointed at host memory (test_torch_plans.py's ``sim`` fixture):
a plan is recorded only when the call does nothing but ``cupy.empty`` allocations, views and ``_runtime.launch``
(session 8, helper OVH8: the zeros / stores / reductions / casts of the v4 path became kernels). With
``kops_in_v4 = False`` (the CuPy ops, SSMCORE_SSD_BWD_KOPS=0) the recording is refused. Also: the SSD forward and the
block's other ops (conv fwd / bwd, gated RMSNorm fwd / bwd, the LM's rms_norm with a residual) on the fused Mamba-2
path's layouts record with no refusal. The kernels themselves are checked against the CuPy ops in
tests/gpu/test_ssd_bwd_kops_gpu.py (emulator or GPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

cupy = pytest.importorskip("cupy")

from test_torch_plans import _scope, _view, sim  # noqa: E402,F401 - the fixture and its host-memory helpers

from ssmcore.adapters.torch import _bridge, _plans  # noqa: E402
from ssmcore.backends.cupy import _runtime  # noqa: E402
from ssmcore.backends.cupy import state_space_duality_bwd as bwd  # noqa: E402

LAUNCHED: list = []  # kernel names, in launch order


class _FakeKernel:
    def __init__(self, name):
        self.name = name

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        LAUNCHED.append(self.name)


_KERNELS: dict = {}


def _fake_function(family, name, options=()):
    if name not in _KERNELS:  # one object per kernel, as _runtime.function caches them
        _KERNELS[name] = _FakeKernel(name)
    return _KERNELS[name]


@pytest.fixture
def host_bwd(sim, monkeypatch):
    monkeypatch.setattr(_runtime, "function", _fake_function)
    LAUNCHED.clear()
    yield


def ssd_bwd_host(dout, x, dt, A, B, C, D, z, dt_bias, seq_idx):
    """An op implementation shaped like ops.ssd_bwd's (views, the launcher, fresh outputs), on host memory."""
    inputs = (dout, x, dt, A, B, C, D, z, dt_bias, seq_idx)
    with _scope():
        a = [_view(t) for t in inputs]
        grads = bwd.ssd_bwd(a[0], a[1], a[2], a[3], a[4], a[5], chunk_size=64, D=a[6], z=a[7], dt_bias=a[8],
                            dt_softplus=True, seq_idx=a[9])
        return _bridge.fresh_outputs(grads, inputs, x.device)


def _inputs(rng, dtype, D_shape, with_z, with_bias, with_seq, batch=2, L=96, H=4, P=16, G=2, N=16):
    t = lambda *s, d=dtype: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(d)  # noqa: E731
    seq = None
    if with_seq:
        seq = torch.from_numpy(np.sort(rng.integers(0, 3, (batch, L)), axis=1).astype(np.int32))
    return (t(batch, L, H, P), t(batch, L, H, P), t(batch, L, H, d=torch.float32), -t(H, d=torch.float32).abs(),
            t(batch, L, G, N), t(batch, L, G, N), None if D_shape is None else t(*D_shape, d=torch.float32),
            t(batch, L, H, P) if with_z else None, t(H, d=torch.float32) if with_bias else None, seq)


CASES = [  # (dtype, D shape, z, dt_bias, seq_idx)
    (torch.bfloat16, (4,), False, True, False),  # the fused Mamba-2 block's call (gated RMSNorm: no z)
    (torch.bfloat16, (4, 16), False, False, True),
    (torch.float16, (4,), True, True, False),
    (torch.float16, None, False, True, True),
]


@pytest.mark.parametrize("dtype,D_shape,with_z,with_bias,with_seq", CASES)
def test_v4_path_records_a_plan_and_replays_the_same_launches(host_bwd, rng, monkeypatch, dtype, D_shape, with_z,
                                                              with_bias, with_seq):
    monkeypatch.setattr(bwd, "kops_in_v4", True)
    args = _inputs(rng, dtype, D_shape, with_z, with_bias, with_seq)
    want = ssd_bwd_host(*args)  # the normal path (no recorder): its launches
    normal = list(LAUNCHED)
    assert any(n.startswith("ssdb_dx7") for n in normal) and "ssdb_dexp" in normal  # v4, the new kernels
    LAUNCHED.clear()
    got = _plans.run("ssd_bwd_host", ssd_bwd_host, args, {})  # recorded
    assert _plans.STATS["recorded"] == 1, _plans.REFUSED
    assert LAUNCHED == normal
    LAUNCHED.clear()
    again = _plans.run("ssd_bwd_host", ssd_bwd_host, args, {})  # replayed
    assert _plans.STATS["hits"] == 1
    assert LAUNCHED == normal
    for g, r, w in zip(got, again, want):
        assert g.shape == r.shape == w.shape and g.dtype == r.dtype == w.dtype


def test_cupy_ops_path_is_refused(host_bwd, rng, monkeypatch):
    """Before session 8 (kops_in_v4 off): cupy.zeros, stores, sums and astype -> no plan. (On the host the CuPy ops
    may also fail outright: they would touch a device.)"""
    monkeypatch.setattr(bwd, "kops_in_v4", False)
    reasons = []
    refuse = _plans._Recorder.refuse

    def noting(self, why):
        reasons.append(why)
        refuse(self, why)

    monkeypatch.setattr(_plans._Recorder, "refuse", noting)
    args = _inputs(rng, torch.bfloat16, (4,), False, True, False)
    try:
        _plans.run("ssd_bwd_host", ssd_bwd_host, args, {})
    except Exception:  # noqa: BLE001 - a CuPy op needing a device: the recording was refused before it
        pass
    assert _plans.STATS["recorded"] == 0
    assert reasons and "zeros" in reasons[0], reasons  # ('allocation in zeros (basic.py:...)')


def test_v4_path_records_with_kernels_on(host_bwd, rng, monkeypatch):
    """The same call as above with the kernels on: no refusal at all (the recorder's own reasons, not only STATS)."""
    monkeypatch.setattr(bwd, "kops_in_v4", True)
    reasons = []
    refuse = _plans._Recorder.refuse
    monkeypatch.setattr(_plans._Recorder, "refuse", lambda self, why: (reasons.append(why), refuse(self, why)))
    _plans.run("ssd_bwd_host", ssd_bwd_host, _inputs(rng, torch.bfloat16, (4,), False, True, False), {})
    assert reasons == [] and _plans.STATS["recorded"] == 1


# ------------------------------------------------------------------- the SSD forward, as the fused Mamba-2 block calls it

def _strided_view(t):
    """A CuPy view of a (possibly strided) torch CPU tensor, owned by that tensor (as _bridge.to_array's)."""
    if t is None:
        return None
    span = (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()
    mem = cupy.cuda.UnownedMemory(t.data_ptr(), span, t, 0)
    return cupy.ndarray(tuple(t.shape), _bridge._NP_DTYPES[t.dtype], cupy.cuda.MemoryPointer(mem, 0),
                        strides=tuple(s * t.element_size() for s in t.stride()))


def ssd_fwd_host(x, dt, A, B, C, D, dt_bias, seq_idx):
    from ssmcore.backends.cupy import state_space_duality as fwd

    inputs = (x, dt, A, B, C, D, dt_bias, seq_idx)
    with _scope():
        a = [_strided_view(t) for t in inputs]
        out = fwd.ssd(a[0], a[1], a[2], a[3], a[4], chunk_size=64, D=a[5], dt_bias=a[6], dt_softplus=True,
                      seq_idx=a[7])
        return _bridge.fresh_outputs((out,), inputs, x.device)


@pytest.mark.parametrize("with_seq", [False, True])
def test_fused_forward_layout_records_a_plan(host_bwd, rng, monkeypatch, with_seq):
    """x, B, C: channel slices of one conv output, dt: a column slice of zxbcdt (bf16), D per head: the fused
    Mamba-2 forward's call (adapters/torch/fused.py). With an int32 seq_idx: widened by ssd_widen_seq."""
    batch, L, H, P, G, N = 2, 96, 4, 16, 1, 16
    t = lambda *s: torch.from_numpy(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    conv = t(batch, L, H * P + 2 * G * N).to(torch.bfloat16)
    x = conv[..., :H * P].unflatten(-1, (H, P))
    B = conv[..., H * P:H * P + G * N].unflatten(-1, (G, N))
    C = conv[..., H * P + G * N:].unflatten(-1, (G, N))
    zxbcdt = t(batch, L, 2 * H * P + 2 * G * N + H).to(torch.bfloat16)
    dt = zxbcdt[..., -H:]
    seq = None
    if with_seq:
        seq = torch.from_numpy(np.sort(rng.integers(0, 3, (batch, L)), axis=1).astype(np.int32))
    args = (x, dt, -t(H).abs(), B, C, t(H), t(H), seq)
    reasons = []
    refuse = _plans._Recorder.refuse
    monkeypatch.setattr(_plans._Recorder, "refuse", lambda self, why: (reasons.append(why), refuse(self, why)))
    _plans.run("ssd_fwd_host", ssd_fwd_host, args, {})
    assert reasons == [] and _plans.STATS["recorded"] == 1, reasons
    names = list(LAUNCHED)
    assert ("ssd_widen_seq" in names) == with_seq, names
    LAUNCHED.clear()
    _plans.run("ssd_fwd_host", ssd_fwd_host, args, {})
    assert _plans.STATS["hits"] == 1 and LAUNCHED == names


# ------------------------------------------------------- the block's other ops, on the fused path's layouts (bf16)

def _norm_conv_call(kind):
    """(op implementation, args) of one of the Mamba-2 training step's other calls, shaped as fused.py / the LM make
    them: conv of xBC (a channel slice of zxbcdt) and its backward (channel-last contiguous), the gated RMSNorm of y
    with z a slice of zxbcdt, the LM's rms_norm with an fp32 residual (prenorm) and its backward."""
    from ssmcore.backends.cupy import conv, norm

    rng = np.random.default_rng(5)
    t = lambda *s, d=torch.bfloat16: torch.from_numpy(rng.standard_normal(s).astype(np.float32)).to(d)  # noqa: E731
    batch, L, dim, nbc, H = 2, 64, 64, 32, 8  # (zxbcdt rows of 336 bytes: 16-byte multiples, as the presets')
    zxbcdt = t(batch, L, 2 * dim + nbc + H)
    z, xBC = zxbcdt[..., :dim], zxbcdt[..., dim:2 * dim + nbc]
    w, b = t(dim + nbc, 4, d=torch.float32), t(dim + nbc, d=torch.float32)
    rw = t(dim, d=torch.float32)

    def run(fn, inputs, *const):
        def impl(*args):
            with _scope():
                a = [_strided_view(x) if isinstance(x, torch.Tensor) else x for x in args]
                out = fn(*a)
                out = out if isinstance(out, tuple) else (out,)
                x = args[1] if kind == "conv_bwd" else args[0]  # (the conv results follow x's layout, as in ops.py)
                return _bridge.fresh_outputs(out, tuple(x for x in args if isinstance(x, torch.Tensor)),
                                             torch.device("cpu"), like=(x,) if kind.startswith("conv") else ())
        impl.__name__ = kind
        return impl, inputs + const

    if kind == "conv_fwd":  # (B, C, L) channel-last view of the xBC slice
        return run(lambda x, w_, b_: conv.causal_conv1d(x, w_, b_, activation="silu"), (xBC.transpose(1, 2), w, b))
    if kind == "conv_bwd":
        g = t(batch, L, dim + nbc).transpose(1, 2)
        return run(lambda g_, x, w_, b_: conv.causal_conv1d_bwd(g_, x, w_, b_, activation="silu"),
                   (g, xBC.contiguous().transpose(1, 2), w, b))
    if kind == "gated_fwd":
        return run(lambda y, w_, z_: norm.gated_rms_norm(y, w_, z_, 1e-5, dim, False), (t(batch, L, dim), rw, z))
    if kind == "gated_bwd":
        return run(lambda dy, y, w_, z_: norm.gated_rms_norm_bwd(dy, y, w_, z_, 1e-5, dim, False)[:2],
                   (t(batch, L, dim), t(batch, L, dim), rw, z))
    if kind == "rms_fwd":
        return run(lambda x, w_, r: norm.rms_norm(x, w_, None, r, 1e-5, True, False),
                   (t(batch, L, dim), rw, t(batch, L, dim, d=torch.float32)))
    return run(lambda dy, x, w_, r, dro: norm.rms_norm_bwd(dy, x, w_, None, r, 1e-5, dro),
               (t(batch, L, dim), t(batch, L, dim), rw, t(batch, L, dim, d=torch.float32),
                t(batch, L, dim, d=torch.float32)))


@pytest.mark.parametrize("kind", ["conv_fwd", "conv_bwd", "gated_fwd", "gated_bwd", "rms_fwd", "rms_bwd"])
def test_block_ops_record_plans(host_bwd, monkeypatch, kind):
    from ssmcore.backends.cupy import _arrays as arrays

    monkeypatch.setattr(arrays, "sm_count", lambda: 132)  # (a device attribute)
    impl, args = _norm_conv_call(kind)
    reasons = []
    refuse = _plans._Recorder.refuse
    monkeypatch.setattr(_plans._Recorder, "refuse", lambda self, why: (reasons.append(why), refuse(self, why)))
    _plans.run(kind, impl, args, {})
    assert reasons == [] and _plans.STATS["recorded"] == 1, reasons
