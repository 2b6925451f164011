"""Norm family (rms_norm, layer_norm, gated_rms_norm and their backwards) on the Numba CPU backend.

Oracles: the float64 NumPy references (forward), central finite differences of those references
(backward, float64) and torch autograd through the plain torch formulas written below.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import DTYPES, assert_close, assert_grad_close, f64, numeric_grad, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmcore
from ssmcore import reference

KINDS = ("rms", "layer")
FORWARD = {"rms": ssmcore.rms_norm, "layer": ssmcore.layer_norm}
BACKWARD = {"rms": ssmcore.rms_norm_bwd, "layer": ssmcore.layer_norm_bwd}
REFERENCE = {"rms": reference.rms_norm, "layer": reference.layer_norm}
# A residual dtype different from each x dtype, to check mixed-dtype sums and result dtypes.
OTHER_DTYPE = {"float64": "float32", "float32": "bfloat16", "float16": "float32", "bfloat16": "float16"}
# (..., D): one row without leading dims, D = 1 and odd D, 1-3 leading dims, zero rows.
SHAPES = [(5,), (1, 1), (4, 3), (1, 97), (2, 3, 1000), (2, 3, 4, 33), (0, 5), (2, 0, 7)]


def s_dtype(x_dtype, residual_dtype, residual_in_fp32):
    """The documented dtype of the prenorm output s."""
    if residual_in_fp32:
        return "float32"
    return residual_dtype if residual_dtype is not None else x_dtype


# --- plain torch formulas (float64 autograd oracle) -----------------------------------------------


def torch_norm(kind, x, weight, bias, residual, eps):
    s = x if residual is None else x + residual
    centered = s - s.mean(-1, keepdim=True) if kind == "layer" else s
    y = centered / torch.sqrt((centered * centered).mean(-1, keepdim=True) + eps) * weight
    return (y if bias is None else y + bias), s


def torch_gated(x, weight, z, eps, group_size, norm_before_gate):
    gate = 1.0 if z is None else z * torch.sigmoid(z)
    v = x if norm_before_gate else x * gate
    groups = v.reshape(*v.shape[:-1], v.shape[-1] // group_size, group_size)
    y = (groups / torch.sqrt((groups * groups).mean(-1, keepdim=True) + eps)).reshape(x.shape) * weight
    return y * gate if norm_before_gate else y


def torch_grads(fn, arrays, upstream):
    """Gradients of sum(out_i * upstream_i) w.r.t. each non-None array (float64), via autograd."""
    tensors = [None if a is None else torch.tensor(f64(a), requires_grad=True) for a in arrays]
    outs = fn(*tensors)
    loss = sum((out * torch.tensor(f64(up))).sum() for out, up in zip(outs, upstream) if up is not None)
    loss.backward()
    return [None if t is None else t.grad.numpy() for t in tensors]


# --- forward ---------------------------------------------------------------------------------------


def norm_inputs(rng, shape, dtype, weight_dtype, with_bias, residual_dtype):
    d = shape[-1]
    x = randn(rng, shape, dtype)
    weight = randn(rng, (d,), weight_dtype)
    bias = randn(rng, (d,), weight_dtype) if with_bias else None
    residual = randn(rng, shape, residual_dtype) if residual_dtype else None
    return x, weight, bias, residual


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_forward_matches_reference(kind, dtype, shape, rng):
    options = itertools.product(
        (False, True),  # bias
        (None, dtype, OTHER_DTYPE[dtype]),  # residual dtype
        ((False, False), (True, False), (True, True)),  # (prenorm, residual_in_fp32)
        ("float32", dtype),  # weight dtype
        (1e-5, 0.3),  # eps (0.3 is large enough to show in float32 results)
    )
    for with_bias, residual_dtype, (prenorm, in_fp32), weight_dtype, eps in options:
        x, weight, bias, residual = norm_inputs(rng, shape, dtype, weight_dtype, with_bias, residual_dtype)
        got = FORWARD[kind](x, weight, bias, residual, eps=eps, prenorm=prenorm, residual_in_fp32=in_fp32)
        want = REFERENCE[kind](f64(x), f64(weight), f64(bias), f64(residual), eps=eps, prenorm=True)
        case = f"{kind} bias={with_bias} residual={residual_dtype} prenorm={prenorm} fp32={in_fp32} eps={eps}"
        y = got[0] if prenorm else got
        assert isinstance(y, np.ndarray) and y.dtype == DTYPES[dtype], case
        assert_close(y, want[0], dtype, name=f"y {case}")
        if prenorm:
            want_s_dtype = s_dtype(dtype, residual_dtype, in_fp32)
            assert got[1].dtype == DTYPES[want_s_dtype], case
            assert_close(got[1], want[1], want_s_dtype, name=f"s {case}")


def test_prenorm_output_dtypes(rng):
    x = randn(rng, (3, 8), "bfloat16")
    weight = randn(rng, (8,), "float32")
    for residual_dtype, in_fp32, expected in [
        (None, False, "bfloat16"),
        (None, True, "float32"),
        ("float16", False, "float16"),
        ("float16", True, "float32"),
        ("float64", True, "float32"),
    ]:
        residual = None if residual_dtype is None else randn(rng, (3, 8), residual_dtype)
        for op in FORWARD.values():
            y, s = op(x, weight, residual=residual, prenorm=True, residual_in_fp32=in_fp32)
            assert y.dtype == DTYPES["bfloat16"] and s.dtype == DTYPES[expected]
            if residual is None:
                assert s is not x and np.array_equal(f64(s), f64(x))


def test_layer_norm_subtracts_mean_and_rms_norm_does_not(rng):
    x = randn(rng, (4, 16), "float64") + 3.0
    weight = np.ones(16)
    y_layer = ssmcore.layer_norm(x, weight)
    y_rms = ssmcore.rms_norm(x, weight)
    np.testing.assert_allclose(y_layer.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose((y_layer**2).mean(-1), 1.0 / (1.0 + 1e-5 / x.var(-1)), rtol=1e-12)
    np.testing.assert_allclose((y_rms**2).mean(-1), 1.0 / (1.0 + 1e-5 / (x**2).mean(-1)), rtol=1e-12)
    assert (y_rms.mean(-1) > 0.5).all()


GATED_SHAPES = [((5,), (None, 1, 5)), ((1, 1), (None,)), ((4, 12), (None, 1, 3, 4)), ((2, 3, 96), (32, 96)),
                ((2, 2, 2, 1000), (8, 250)), ((0, 8), (4,))]


@pytest.mark.parametrize("shape,group_sizes", GATED_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_forward_matches_reference(dtype, shape, group_sizes, rng):
    d = shape[-1]
    for group_size, norm_before_gate, with_z, weight_dtype, eps in itertools.product(
        group_sizes, (True, False), (True, False), ("float32", dtype), (1e-5, 0.3)
    ):
        x = randn(rng, shape, dtype)
        z = randn(rng, shape, OTHER_DTYPE[dtype] if weight_dtype == dtype else dtype) if with_z else None
        weight = randn(rng, (d,), weight_dtype)
        y = ssmcore.gated_rms_norm(x, weight, z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
        want = reference.gated_rms_norm(f64(x), f64(weight), f64(z), eps, group_size, norm_before_gate)
        case = f"group_size={group_size} norm_before_gate={norm_before_gate} z={with_z} eps={eps}"
        assert y.dtype == DTYPES[dtype], case
        assert_close(y, want, dtype, name=case)


def test_gated_groups_are_independent(rng):
    """Scaling one group of channels leaves the others' outputs unchanged (statistics per group)."""
    x = randn(rng, (3, 12), "float64")
    weight = randn(rng, (12,), "float64")
    y = ssmcore.gated_rms_norm(x, weight, group_size=4)
    x2 = x.copy()
    x2[:, 4:8] *= 10.0
    y2 = ssmcore.gated_rms_norm(x2, weight, group_size=4)
    np.testing.assert_array_equal(y[:, :4], y2[:, :4])
    np.testing.assert_array_equal(y[:, 8:], y2[:, 8:])
    assert not np.allclose(ssmcore.gated_rms_norm(x2, weight)[:, :4], y[:, :4])


# --- backward --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_norm_backward_finite_differences(kind, rng):
    shape = (2, 3, 7)
    for with_bias, with_residual, with_dresidual_out in itertools.product((False, True), repeat=3):
        x, weight, bias, residual = norm_inputs(rng, shape, "float64", "float64", with_bias,
                                                "float64" if with_residual else None)
        dy = randn(rng, shape, "float64")
        dresidual_out = randn(rng, shape, "float64") if with_dresidual_out else None
        eps = 0.1
        grads = BACKWARD[kind](dy, x, weight, bias, residual, eps=eps, dresidual_out=dresidual_out)
        upstream = np.concatenate([dy.ravel(), (dresidual_out if with_dresidual_out else 0 * dy).ravel()])

        def f():
            y, s = REFERENCE[kind](x, weight, bias, residual, eps=eps, prenorm=True)
            return np.concatenate([y.ravel(), s.ravel()])

        case = f"{kind} bias={with_bias} residual={with_residual} dresidual_out={with_dresidual_out}"
        assert_grad_close(grads.dx, numeric_grad(f, x, upstream, max_points=12, rng=rng), name=f"dx {case}")
        assert_grad_close(grads.dweight, numeric_grad(f, weight, upstream), name=f"dweight {case}")
        if with_bias:
            assert_grad_close(grads.dbias, numeric_grad(f, bias, upstream), name=f"dbias {case}")
        else:
            assert grads.dbias is None
        if with_residual:
            assert_grad_close(grads.dresidual, numeric_grad(f, residual, upstream, max_points=12, rng=rng),
                              name=f"dresidual {case}")
        else:
            assert grads.dresidual is None


def test_gated_backward_finite_differences(rng):
    shape = (3, 12)
    for group_size, norm_before_gate, with_z in itertools.product((None, 4), (True, False), (True, False)):
        x = randn(rng, shape, "float64")
        z = randn(rng, shape, "float64") if with_z else None
        weight = randn(rng, (12,), "float64")
        dy = randn(rng, shape, "float64")
        grads = ssmcore.gated_rms_norm_bwd(dy, x, weight, z, 0.1, group_size, norm_before_gate)

        def f():
            return reference.gated_rms_norm(x, weight, z, 0.1, group_size, norm_before_gate)

        case = f"group_size={group_size} norm_before_gate={norm_before_gate} z={with_z}"
        assert_grad_close(grads.dx, numeric_grad(f, x, dy, max_points=12, rng=rng), name=f"dx {case}")
        assert_grad_close(grads.dweight, numeric_grad(f, weight, dy), name=f"dweight {case}")
        if with_z:
            assert_grad_close(grads.dz, numeric_grad(f, z, dy, max_points=12, rng=rng), name=f"dz {case}")
        else:
            assert grads.dz is None


@pytest.mark.parametrize("shape", [(6,), (3, 1), (2, 5, 97), (2000, 33), (0, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_norm_backward_matches_torch(kind, dtype, shape, rng):
    for with_bias, residual_dtype, with_dresidual_out, weight_dtype in itertools.product(
        (False, True), (None, OTHER_DTYPE[dtype]), (False, True), ("float32", dtype)
    ):
        x, weight, bias, residual = norm_inputs(rng, shape, dtype, weight_dtype, with_bias, residual_dtype)
        dy = randn(rng, shape, dtype)
        dresidual_out = randn(rng, shape, "float32") if with_dresidual_out else None
        eps = 0.3
        grads = BACKWARD[kind](dy, x, weight, bias, residual, eps=eps, dresidual_out=dresidual_out)
        want = torch_grads(lambda *a: torch_norm(kind, *a, eps), (x, weight, bias, residual), (dy, dresidual_out))
        case = f"{kind} bias={with_bias} residual={residual_dtype} dresidual_out={with_dresidual_out}"
        for name, got, inp, expected in zip(("dx", "dweight", "dbias", "dresidual"), grads,
                                            (x, weight, bias, residual), want):
            if inp is None:
                assert got is None, f"{name} {case}"
                continue
            assert got.dtype == inp.dtype and got.shape == inp.shape, f"{name} {case}"
            assert_close(got, expected, inp.dtype.name, name=f"{name} {case}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_backward_matches_torch(dtype, rng):
    for (shape, group_sizes), norm_before_gate, with_z in itertools.product(
        [((7,), (None, 7)), ((2, 3, 12), (1, 4)), ((1500, 40), (8,)), ((0, 6), (3,))], (True, False), (True, False)
    ):
        for group_size in group_sizes:
            x = randn(rng, shape, dtype)
            z = randn(rng, shape, OTHER_DTYPE[dtype]) if with_z else None
            weight = randn(rng, shape[-1:], "float32")
            dy = randn(rng, shape, dtype)
            grads = ssmcore.gated_rms_norm_bwd(dy, x, weight, z, 0.3, group_size, norm_before_gate)
            want = torch_grads(
                lambda *a: (torch_gated(*a, 0.3, group_size or shape[-1], norm_before_gate),), (x, weight, z), (dy,)
            )
            case = f"shape={shape} group_size={group_size} norm_before_gate={norm_before_gate} z={with_z}"
            for name, got, inp, expected in zip(("dx", "dweight", "dz"), grads, (x, weight, z), want):
                if inp is None:
                    assert got is None, f"{name} {case}"
                    continue
                assert got.dtype == inp.dtype and got.shape == inp.shape, f"{name} {case}"
                assert_close(got, expected, inp.dtype.name, name=f"{name} {case}")


# --- hypothesis sweeps -----------------------------------------------------------------------------

leading_dims = st.lists(st.integers(0, 5), min_size=0, max_size=3)


@settings(max_examples=20)
@given(kind=st.sampled_from(KINDS), lead=leading_dims, d=st.integers(1, 70), dtype=st.sampled_from(list(DTYPES)),
       with_bias=st.booleans(), with_residual=st.booleans(), eps=st.floats(1e-6, 1.0),
       seed=st.integers(0, 2**32 - 1))
def test_norm_sweep(kind, lead, d, dtype, with_bias, with_residual, eps, seed):
    rng = np.random.default_rng(seed)
    shape = (*lead, d)
    x, weight, bias, residual = norm_inputs(rng, shape, dtype, "float32", with_bias,
                                            OTHER_DTYPE[dtype] if with_residual else None)
    y, s = FORWARD[kind](x, weight, bias, residual, eps=eps, prenorm=True)
    want = REFERENCE[kind](x, weight, bias, residual, eps=eps, prenorm=True)
    assert_close(y, want[0], dtype, name="y")
    assert_close(s, want[1], OTHER_DTYPE[dtype] if with_residual else dtype, name="s")
    dy = randn(rng, shape, dtype)
    grads = BACKWARD[kind](dy, x, weight, bias, residual, eps=eps)
    expected = torch_grads(lambda *a: torch_norm(kind, *a, eps), (x, weight, bias, residual), (dy, None))
    for got, inp, want_grad in zip(grads, (x, weight, bias, residual), expected):
        if inp is not None:
            assert_close(got, want_grad, inp.dtype.name)


@settings(max_examples=20)
@given(lead=leading_dims, groups=st.integers(1, 4), group_size=st.integers(1, 20), dtype=st.sampled_from(list(DTYPES)),
       with_z=st.booleans(), norm_before_gate=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_gated_sweep(lead, groups, group_size, dtype, with_z, norm_before_gate, seed):
    rng = np.random.default_rng(seed)
    shape = (*lead, groups * group_size)
    x = randn(rng, shape, dtype)
    z = randn(rng, shape, dtype) if with_z else None
    weight = randn(rng, shape[-1:], "float32")
    y = ssmcore.gated_rms_norm(x, weight, z, 1e-5, group_size, norm_before_gate)
    assert_close(y, reference.gated_rms_norm(x, weight, z, 1e-5, group_size, norm_before_gate), dtype)
    dy = randn(rng, shape, dtype)
    grads = ssmcore.gated_rms_norm_bwd(dy, x, weight, z, 1e-5, group_size, norm_before_gate)
    expected = torch_grads(lambda *a: (torch_gated(*a, 1e-5, group_size, norm_before_gate),), (x, weight, z), (dy,))
    for got, inp, want_grad in zip(grads, (x, weight, z), expected):
        if inp is not None:
            assert_close(got, want_grad, inp.dtype.name)


# --- layouts, other array producers, inputs untouched ----------------------------------------------


def test_non_contiguous_inputs(rng):
    base = randn(rng, (6, 40), "float32")
    x = base[::2, ::2]  # (3, 20), strided
    residual = randn(rng, (20, 3), "float32").T
    weight = randn(rng, (40,), "float32")[::2]
    for kind in KINDS:
        y, s = FORWARD[kind](x, weight, residual=residual, prenorm=True)
        want = REFERENCE[kind](x, weight, residual=residual, prenorm=True)
        assert_close(y, want[0], name="y")
        assert_close(s, want[1], name="s")
    z = randn(rng, (20, 3), "float32").T
    assert_close(ssmcore.gated_rms_norm(x, weight, z, group_size=5), reference.gated_rms_norm(x, weight, z, 1e-5, 5))


def test_torch_tensors_through_dlpack(rng):
    x = randn(rng, (2, 3, 16), "float32")
    weight = randn(rng, (16,), "float32")
    y = ssmcore.rms_norm(torch.from_numpy(x), torch.from_numpy(weight))
    assert isinstance(y, np.ndarray)
    assert_close(y, reference.rms_norm(x, weight), "float32")


def test_inputs_not_modified(rng):
    shape = (40, 24)
    x, weight, bias, residual = norm_inputs(rng, shape, "float32", "float32", True, "float32")
    dy, dresidual_out, z = (randn(rng, shape, "float32") for _ in range(3))
    arrays = (x, weight, bias, residual, dy, dresidual_out, z)
    copies = [a.copy() for a in arrays]
    for kind in KINDS:
        FORWARD[kind](x, weight, bias, residual, prenorm=True, residual_in_fp32=True)
        FORWARD[kind](x, weight, bias, prenorm=True)
        BACKWARD[kind](dy, x, weight, bias, residual, dresidual_out=dresidual_out)
    for norm_before_gate in (True, False):
        ssmcore.gated_rms_norm(x, weight, z, group_size=8, norm_before_gate=norm_before_gate)
        ssmcore.gated_rms_norm_bwd(dy, x, weight, z, group_size=8, norm_before_gate=norm_before_gate)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


# --- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def good(rng):
    shape = (2, 3, 8)
    return {
        "x": randn(rng, shape), "weight": randn(rng, (8,)), "bias": randn(rng, (8,)),
        "residual": randn(rng, shape), "dy": randn(rng, shape), "dresidual_out": randn(rng, shape),
        "z": randn(rng, shape),
    }


def norm_calls(good, **override):
    """Every norm entry point called with the good arguments, some replaced."""
    fwd = {k: good[k] for k in ("x", "weight", "bias", "residual")} | {"eps": 1e-5, "prenorm": True,
                                                                         "residual_in_fp32": False}
    bwd = {k: good[k] for k in ("dy", "x", "weight", "bias", "residual", "dresidual_out")} | {"eps": 1e-5}
    for kind in KINDS:
        fwd_args = fwd | {k: v for k, v in override.items() if k in fwd}
        bwd_args = bwd | {k: v for k, v in override.items() if k in bwd}
        if set(override) <= set(fwd):
            yield lambda op=FORWARD[kind], args=fwd_args: op(**args)
        if set(override) <= set(bwd):
            yield lambda op=BACKWARD[kind], args=bwd_args: op(**args)


def gated_calls(good, **override):
    fwd = {k: good[k] for k in ("x", "weight", "z")} | {"eps": 1e-5, "group_size": 4, "norm_before_gate": True}
    bwd = fwd | {"dy": good["dy"]}
    if set(override) <= set(fwd):
        yield lambda: ssmcore.gated_rms_norm(**(fwd | override))
    yield lambda: ssmcore.gated_rms_norm_bwd(**(bwd | override))


def assert_all_raise(calls, error, name):
    calls = list(calls)
    assert calls
    for call in calls:
        with pytest.raises(error, match=rf"^{name}:"):
            call()


SHAPE_ERRORS = [
    ("x", lambda g: np.ones((), np.float32)),
    ("x", lambda g: np.ones((2, 0), np.float32)),
    ("weight", lambda g: np.ones(7, np.float32)),
    ("weight", lambda g: np.ones((1, 8), np.float32)),
    ("bias", lambda g: np.ones(9, np.float32)),
    ("residual", lambda g: np.ones((2, 4, 8), np.float32)),
    ("residual", lambda g: np.ones((6, 8), np.float32)),
    ("dy", lambda g: np.ones((2, 3, 7), np.float32)),
    ("dresidual_out", lambda g: np.ones((3, 2, 8), np.float32)),
]


@pytest.mark.parametrize("name,make", SHAPE_ERRORS, ids=[n for n, _ in SHAPE_ERRORS])
def test_norm_shape_errors(good, name, make):
    assert_all_raise(norm_calls(good, **{name: make(good)}), ValueError, name)


@pytest.mark.parametrize("name", ["x", "weight", "bias", "residual", "dy", "dresidual_out"])
def test_norm_dtype_errors(good, name):
    assert_all_raise(norm_calls(good, **{name: good[name].astype(np.int32)}), TypeError, name)
    assert_all_raise(norm_calls(good, **{name: good[name].astype(np.complex64)}), TypeError, name)
    assert_all_raise(norm_calls(good, **{name: good[name].tolist()}), TypeError, name)


def test_norm_required_arrays(good):
    assert_all_raise(norm_calls(good, weight=None), TypeError, "weight")
    assert_all_raise(norm_calls(good, dy=None), TypeError, "dy")


@pytest.mark.parametrize("eps,error", [(0.0, ValueError), (-1e-5, ValueError), (float("nan"), ValueError),
                                       (float("inf"), ValueError), ("1e-5", TypeError), (True, TypeError),
                                       (None, TypeError)])
def test_eps_errors(good, eps, error):
    assert_all_raise(norm_calls(good, eps=eps), error, "eps")
    assert_all_raise(gated_calls(good, eps=eps), error, "eps")


@pytest.mark.parametrize("name", ["prenorm", "residual_in_fp32"])
@pytest.mark.parametrize("value", [1, "yes", None, np.array([True])])
def test_flag_errors(good, name, value):
    assert_all_raise(norm_calls(good, **{name: value}), TypeError, name)


@pytest.mark.parametrize("value", [1, "no", None])
def test_norm_before_gate_errors(good, value):
    assert_all_raise(gated_calls(good, norm_before_gate=value), TypeError, "norm_before_gate")


@pytest.mark.parametrize("group_size,error", [(3, ValueError), (16, ValueError), (0, ValueError), (-4, ValueError),
                                              (4.0, TypeError), ("4", TypeError), (True, TypeError)])
def test_group_size_errors(good, group_size, error):
    assert_all_raise(gated_calls(good, group_size=group_size), error, "group_size")


def test_group_size_error_names_d(good):
    with pytest.raises(ValueError, match=r"^group_size: .*D=8.*got 3"):
        ssmcore.gated_rms_norm(good["x"], good["weight"], group_size=3)


@pytest.mark.parametrize("name,value,error", [
    ("x", np.ones((), np.float32), ValueError), ("x", np.ones((3, 0), np.float32), ValueError),
    ("x", np.ones((2, 3, 8), np.int64), TypeError), ("weight", np.ones(4, np.float32), ValueError),
    ("weight", None, TypeError), ("weight", np.ones(8, np.int32), TypeError),
    ("z", np.ones((2, 3, 4), np.float32), ValueError), ("z", np.ones((2, 3, 8), bool), TypeError),
    ("dy", np.ones((3, 3, 8), np.float32), ValueError), ("dy", None, TypeError),
])
def test_gated_argument_errors(good, name, value, error):
    assert_all_raise(gated_calls(good, **{name: value}), error, name)
