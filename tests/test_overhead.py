"""The host-overhead fast paths stay equivalent to the slow ones.

- ``_checks``: memoised dtype names and shape specs give the same results and the same errors;
- ``_bridge.to_array``: the ``__array_interface__`` CPU view aliases the tensor's memory like DLPack did
  (every dtype, strides, offsets, writes both ways, keeps the tensor alive);
- ``ops.eager``: in plain eager mode it calls the implementation directly (same results, the mutated
  state's version counter bumped like the custom op does); under grad, compile-style tracing
  (dispatch modes, fake tensors) and functorch it goes through ``torch.ops.ssmcore``.
"""

from __future__ import annotations

import gc

import ml_dtypes
import numpy as np
import pytest
import torch

from ssmcore import _checks
from ssmcore._checks import ACT, Dims, dtype_name
from ssmcore.adapters.torch import _bridge, functional as F, ops


def test_dtype_name_cache_matches_numpy():
    for dt in (np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int32, np.int64, ">f4", np.bool_):
        a = np.zeros(2, dtype=dt)
        assert dtype_name(a) == a.dtype.name
        assert dtype_name(a) == a.dtype.name  # second (cached) call


def test_dims_errors_unchanged():
    dims = Dims()
    x = np.ones((2, 3, 5), np.float32)
    dims.check("x", x, "BDL", ACT)
    with pytest.raises(ValueError, match=r"^y: expected shape \(B, D, 4\) = \(2, 3, 4\) \(B=2 from x\)|^y: expected shape"):
        dims.check("y", np.ones((2, 3, 5), np.float32), ("B", "D", 4))
    with pytest.raises(ValueError, match=r"^z: expected shape \(B, D, L\) = \(2, 3, 5\) \(D=3 from x\), got shape \(2, 4, 5\)"):
        dims.check("z", np.ones((2, 4, 5), np.float32), "BDL")
    with pytest.raises(ValueError, match=r"^w: expected a 2-d array of shape \(D, W\), got shape \(3,\)"):
        dims.check("w", np.ones(3, np.float32), "DW")
    with pytest.raises(TypeError, match=r"^v: expected dtype float32 or float16 or bfloat16 or float64, got int32"):
        dims.check("v", np.ones((2, 3, 5), np.int32), "BDL", ACT)
    # multi-letter names and list specs (unhashable) still bind
    dims.check("s", np.ones((7, 3, 2), np.float32), ["Bs", "D", "state_len"])
    assert dims["Bs"] == 7 and dims["state_len"] == 2
    dims.check("t", np.ones((7, 2), np.float32), ("Bs", np.int64(2)))
    with pytest.raises(ValueError, match=r"^t: expected shape \(Bs, 2\), got shape \(7, 3\)"):
        dims.check("t", np.ones((7, 3), np.float32), ("Bs", 2))
    assert _checks._letters("BDL") == ("B", "D", "L")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32,
                                   torch.int64])
def test_cpu_view_aliases_the_tensor(dtype):
    base = (torch.arange(60, dtype=torch.float64) + 1).to(dtype).reshape(3, 4, 5)
    t = base.transpose(1, 2)[:, 1:4, ::2]  # strided, offset view
    a = _bridge.to_array("t", t)
    expected = t.to(torch.float64).numpy()
    assert a.shape == tuple(t.shape)
    np.testing.assert_array_equal(np.asarray(a, dtype=np.float64), expected)
    assert a.dtype.name == {torch.bfloat16: "bfloat16"}.get(dtype, str(dtype).split(".")[1])
    assert a.flags.writeable
    a[0, 0, 0] = 7
    assert float(t[0, 0, 0]) == 7.0  # writes reach the tensor
    t[1, 1, 1] = 9
    assert float(a[1, 1, 1]) == 9.0  # and back
    # the array keeps the memory alive after the tensor goes
    del t, base
    gc.collect()
    np.testing.assert_array_equal(np.asarray(a[1, 1, 1], dtype=np.float64), 9.0)


def test_cpu_view_leaves_storage_resizable():
    t = torch.randn(4, 3)
    _bridge.to_array("t", t)
    t.untyped_storage().resize_(0)  # what FSDP2 does to unsharded parameters; numpy() would forbid it


def test_cpu_view_of_parameter_and_requires_grad():
    p = torch.nn.Parameter(torch.randn(3, 2))
    a = _bridge.to_array("p", p)
    np.testing.assert_array_equal(a, p.detach().numpy())


def test_fresh_outputs_clones_aliases_only():
    x = torch.randn(2, 5)
    out = _bridge.fresh_outputs((x.numpy()[:, 1:3], np.ones((2, 2), np.float32), None), (x,), x.device)
    assert out[0].data_ptr() != x.data_ptr() + 4 and torch.equal(out[0], x[:, 1:3])
    assert out[0].is_contiguous()
    assert torch.equal(out[1], torch.ones(2, 2)) and out[2].shape == (0,)
    same = np.ones(3, np.float32)
    a, b = _bridge.fresh_outputs((same, same), (), x.device)
    assert a.data_ptr() != b.data_ptr()


def _decode_args(rng_seed=0):
    g = torch.Generator().manual_seed(rng_seed)
    state = torch.randn(3, 2, 4, 8, generator=g)
    x, dt, z = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    A = -torch.rand(2, 4, 8, generator=g) - 0.5
    B, C = (torch.randn(3, 1, 8, generator=g) for _ in range(2))
    D, dt_bias = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    return state, x, dt, A, B, C, D, z, dt_bias


def test_eager_state_update_matches_the_custom_op():
    state, *rest = _decode_args()
    state2 = state.clone()
    v0 = state._version
    out = ops.eager.selective_state_update(state, *rest, True, None)
    assert state._version > v0  # bumped, as the custom op's ADInplaceOrView kernel does
    ref = torch.ops.ssmcore.selective_state_update(state2, *rest, True, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(state, state2, rtol=0, atol=0)


def test_eager_conv_update_and_forward_match():
    g = torch.Generator().manual_seed(1)
    x, conv_state, weight, bias = (torch.randn(2, 6, generator=g), torch.randn(2, 6, 3, generator=g),
                                   torch.randn(6, 4, generator=g), torch.randn(6, generator=g))
    s1, s2 = conv_state.clone(), conv_state.clone()
    out = F.causal_conv1d_update(x, s1, weight, bias, "silu")
    ref = torch.ops.ssmcore.causal_conv1d_update(x, s2, weight, bias, "silu", None, None)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    xs = torch.randn(2, 6, 5, generator=g)
    with torch.no_grad():
        y = F.causal_conv1d_fn(xs, weight, bias, activation="silu")
    torch.testing.assert_close(y, torch.ops.ssmcore.causal_conv1d_fwd(xs, weight, bias, None, None, "silu", False)[0])


def test_eager_takes_the_op_path_when_it_must(monkeypatch):
    state, x, dt, A, B, C, D, z, dt_bias = _decode_args()
    calls = []
    impl, mutated = ops._IMPLS["causal_conv1d_fwd"]
    monkeypatch.setitem(ops._IMPLS, "causal_conv1d_fwd", (lambda *a, **k: calls.append(1) or impl(*a, **k),
                                                          mutated))
    eager = ops._EagerOps()
    xs, w = torch.randn(1, 4, 6), torch.randn(4, 3, requires_grad=True)
    out, _ = eager.causal_conv1d_fwd(xs, w, None, None, None, None, False)
    assert out.requires_grad and out.grad_fn is not None  # autograd recorded: went through the op
    out.sum().backward()
    assert w.grad is not None
    assert not calls
    with torch.no_grad():
        eager.causal_conv1d_fwd(xs, w, None, None, None, None, False)
    n_direct = len(calls)
    assert n_direct == 1
    # a dispatch mode (what make_fx / fake tensors use) sees the custom op
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Record():
        eager.causal_conv1d_fwd(xs, w, None, None, None, None, False)
    assert any("ssmcore.causal_conv1d_fwd" in s for s in seen)
    # fake tensors never reach the implementation
    from torch._subclasses.fake_tensor import FakeTensorMode

    w_plain = w.detach()
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(xs), mode.from_tensor(w_plain)
        fout, _ = eager.causal_conv1d_fwd(fx, fw, None, None, None, None, False)
        assert fout.shape == xs.shape
    assert len(calls) == n_direct  # neither under the mode nor with fake tensors was the short cut taken


def test_eager_decode_under_grad_goes_through_the_op():
    state, x, dt, A, B, C, D, z, dt_bias = _decode_args()
    x.requires_grad_(True)
    with pytest.raises(RuntimeError):
        # the custom op has no autograd for its in-place decode; the direct path must not hide that
        out = ops.eager.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, True, None)
        out.sum().backward()


def test_eager_errors_name_the_argument():
    state, x, dt, A, B, C, D, z, dt_bias = _decode_args()
    with pytest.raises(ValueError, match=r"^dt:"):
        ops.eager.selective_state_update(state, x, dt[:, :1], A, B, C, D, z, dt_bias, True, None)


def test_validation_cache_keeps_value_checks(rng):
    import ssmcore

    x, weight = rng.standard_normal((2, 5)).astype(np.float32), rng.standard_normal((5, 4)).astype(np.float32)
    pool = rng.standard_normal((4, 5, 3)).astype(np.float32)
    idx = np.array([2, 0], np.int32)
    for _ in range(2):  # the second call takes the cached-signature path
        ssmcore.causal_conv1d_update(x, pool, weight, None, "silu", conv_state_indices=idx)
    with pytest.raises(ValueError, match="^conv_state_indices: expected distinct"):
        ssmcore.causal_conv1d_update(x, pool, weight, None, "silu", conv_state_indices=np.array([1, 1], np.int32))
    with pytest.raises(ValueError, match="^conv_state_indices: expected indices < 4"):
        ssmcore.causal_conv1d_update(x, pool, weight, None, "silu", conv_state_indices=np.array([1, 4], np.int32))
    frozen = pool.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="^conv_state: is read-only"):
        ssmcore.causal_conv1d_update(x, frozen, weight, None, "silu", conv_state_indices=idx)
    ring = rng.standard_normal((2, 5, 3)).astype(np.float32)
    for lens in (np.array([0, 3], np.int32), np.array([1, 2], np.int32)):
        ssmcore.causal_conv1d_update(x, ring, weight, None, None, cache_seqlens=lens)
    with pytest.raises(ValueError, match="^cache_seqlens: expected lengths >= 0"):
        ssmcore.causal_conv1d_update(x, ring, weight, None, None, cache_seqlens=np.array([0, -1], np.int32))
    with pytest.raises(ValueError, match="^activation:"):
        ssmcore.causal_conv1d_update(x, ring, weight, None, "relu", cache_seqlens=np.array([0, 1], np.int32))
    with pytest.raises(TypeError, match="^weight:"):
        ssmcore.causal_conv1d_update(x, ring, weight.astype(np.int32), None, None)

    state = rng.standard_normal((3, 2, 4, 8)).astype(np.float32)
    xs = rng.standard_normal((2, 2, 4)).astype(np.float32)
    A = -np.exp(rng.standard_normal((2, 4, 8))).astype(np.float32)
    Bm = rng.standard_normal((2, 1, 8)).astype(np.float32)
    sbi = np.array([0, 2], np.int64)
    for _ in range(2):
        ssmcore.selective_state_update(state, xs, xs, A, Bm, Bm, state_batch_indices=sbi)
    with pytest.raises(ValueError, match="^state_batch_indices: expected distinct"):
        ssmcore.selective_state_update(state, xs, xs, A, Bm, Bm, state_batch_indices=np.array([2, 2], np.int64))
    frozen = state.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="^state: is read-only"):
        ssmcore.selective_state_update(frozen, xs, xs, A, Bm, Bm, state_batch_indices=sbi)
    with pytest.raises(TypeError, match="^A:"):
        ssmcore.selective_state_update(state, xs, xs, A.astype(np.float16), Bm, Bm, state_batch_indices=sbi)
    with pytest.raises(ValueError, match="^state:"):
        ssmcore.selective_state_update(state, xs, xs, A, Bm, Bm)  # Bs=3 != B=2 without indices


def test_fresh_outputs_mixed_fresh_and_aliased():
    x = torch.randn(6)
    fresh = np.arange(4, dtype=np.float32)
    view_of_fresh = fresh[1:3]
    outs = _bridge.fresh_outputs((x.numpy()[:2], fresh, view_of_fresh, fresh), (x,), x.device)
    ptrs = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in outs]
    for i in range(len(ptrs)):
        for j in range(i):
            assert not (ptrs[i][0] < ptrs[j][1] and ptrs[j][0] < ptrs[i][1]), (i, j)
    assert not any(a < x.data_ptr() + 24 and x.data_ptr() < b for a, b in ptrs)
    torch.testing.assert_close(outs[2], torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(outs[3], torch.arange(4.0))


def test_eager_short_cut_only_in_plain_eager(monkeypatch):
    calls = []
    impl, mutated = ops._IMPLS["rms_norm_fwd"]
    monkeypatch.setitem(ops._IMPLS, "rms_norm_fwd", (lambda *a, **k: calls.append(1) or impl(*a, **k), mutated))
    eager = ops._EagerOps()
    x, w = torch.randn(3, 8), torch.randn(8)
    eager.rms_norm_fwd(x, w, None, None, 1e-5, False, False)
    assert len(calls) == 1
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        eager.rms_norm_fwd(x, w, None, None, 1e-5, False, False)
    with torch.device("cpu"):  # a torch-function mode
        eager.rms_norm_fwd(x, w, None, None, 1e-5, False, False)
    eager.rms_norm_fwd(x, torch.nn.Parameter(w), None, None, 1e-5, False, False)  # requires grad, grad mode on
    assert len(calls) == 1
    with torch.inference_mode():
        eager.rms_norm_fwd(x, torch.nn.Parameter(w), None, None, 1e-5, False, False)
    assert len(calls) == 2


def test_norm_validation_cache_keeps_value_checks(rng):
    import ssmcore

    x, w = rng.standard_normal((3, 8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    for _ in range(2):
        ssmcore.rms_norm(x, w, eps=1e-5)
        ssmcore.gated_rms_norm(x, w, x, eps=1e-5, group_size=4)
    with pytest.raises(ValueError, match="^eps:"):
        ssmcore.rms_norm(x, w, eps=float("nan"))
    with pytest.raises(ValueError, match="^group_size: expected a divisor of D=8"):
        ssmcore.gated_rms_norm(x, w, x, group_size=3)
    with pytest.raises(ValueError, match="^weight:"):
        ssmcore.rms_norm(x, w[:4])
    with pytest.raises(ValueError, match="^dy:"):
        ssmcore.rms_norm_bwd(x[:2], x, w)
