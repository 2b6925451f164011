"""Selective scan (Mamba-1) forward and backward on the Numba CPU backend.

Oracles: the float64 NumPy reference (forward), central finite differences of that reference
(backward, float64) and torch autograd through the plain torch loop over time written below.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, TOL, assert_close, assert_grad_close, f64, numeric_grad, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import ssmcore
from ssmcore import reference

GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
OPTIONS = ("D", "z", "delta_bias", "initial_state")
# B/C kinds: "DN" constant, "BNL" input-dependent, an int G: grouped (B, G, N, L).
KINDS = ("DN", "BNL", 2)


def make_inputs(rng, batch, channels, length, N, *, B_kind="BNL", C_kind="BNL", dtype="float32",
                options=OPTIONS, big_delta=False):
    """Keyword arguments of selective_scan: random, never zero, with a decaying recurrence."""
    param = "float64" if dtype == "float64" else "float32"

    def bc(kind):
        if kind == "DN":
            return randn(rng, (channels, N), param)
        if kind == "BNL":
            return randn(rng, (batch, N, length), dtype)
        return randn(rng, (batch, kind, N, length), dtype)

    delta = 0.5 * rng.random((batch, channels, length)) + 0.05
    if big_delta:  # some steps take the softplus(x) = x branch (x > 20)
        delta[..., ::3] += 25.0
    args = dict(
        u=randn(rng, (batch, channels, length), dtype),
        delta=delta.astype(DTYPES[dtype]),
        A=(-0.5 * rng.random((channels, N)) - 0.05).astype(param),
        B=bc(B_kind),
        C=bc(C_kind),
        D=randn(rng, (channels,), param),
        z=randn(rng, (batch, channels, length), dtype),
        delta_bias=(0.5 * rng.random(channels) + 0.05).astype(param),
        initial_state=randn(rng, (batch, channels, N), param),
    )
    for name in OPTIONS:
        if name not in options:
            args[name] = None
    return args


def check_forward(args, dtype, softplus=True):
    out, last = ssmcore.selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    ref_out, ref_last = reference.selective_scan(**args, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == args["u"].dtype
    assert last.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_close(out, ref_out, dtype, name="out")
    # The state is float32 whatever the input dtype: compare it at float32 tolerance at most.
    assert_close(last, ref_last, "float64" if dtype == "float64" else "float32", name="last_state")


# --- forward vs the float64 reference -------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length, B_kind, C_kind", [
    (1, "BNL", "DN"), (2, "DN", 2), (3, 2, "BNL"), (17, "BNL", "BNL"), (129, "DN", "DN"), (1030, 2, 2),
])
def test_forward_lengths(rng, dtype, length, B_kind, C_kind):
    args = make_inputs(rng, 2, 4, length, 16, B_kind=B_kind, C_kind=C_kind, dtype=dtype)
    check_forward(args, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("N", [1, 16, 64, 256])
def test_forward_state_sizes(rng, dtype, N):
    args = make_inputs(rng, 1, 3, 70, N, B_kind="BNL", C_kind=3, dtype=dtype)
    check_forward(args, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("B_kind, C_kind", list(itertools.product(KINDS + (4,), KINDS + (4,))))
def test_forward_B_C_kinds(rng, dtype, B_kind, C_kind):
    args = make_inputs(rng, 2, 8, 21, 5, B_kind=B_kind, C_kind=C_kind, dtype=dtype)
    check_forward(args, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("options", [(), OPTIONS] + [(o,) for o in OPTIONS] +
                         [tuple(x for x in OPTIONS if x != o) for o in OPTIONS])
def test_forward_options(rng, dtype, softplus, options):
    args = make_inputs(rng, 2, 3, 19, 4, B_kind="DN", C_kind="BNL", dtype=dtype, options=options)
    check_forward(args, dtype, softplus)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_softplus_threshold(rng, dtype):
    args = make_inputs(rng, 1, 2, 12, 3, dtype=dtype, big_delta=True)
    args["A"] = (args["A"] * 0.01).astype(args["A"].dtype)  # keep exp(dt * A) away from 0 at dt ~ 25
    check_forward(args, dtype)


def test_return_last_state_flag(rng):
    args = make_inputs(rng, 2, 3, 9, 4)
    out = ssmcore.selective_scan(**args)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3, 9)
    assert_close(out, reference.selective_scan(**args), "float32")


def test_chunked_continuation(rng):
    """Scanning [0, L) equals scanning [0, k) then [k, L) from the first part's last state."""
    args = make_inputs(rng, 2, 4, 150, 8, B_kind=2, C_kind="BNL", dtype="float64")
    full, full_last = ssmcore.selective_scan(**args, delta_softplus=True, return_last_state=True)
    k = 61
    head = {n: (a[..., :k] if n in ("u", "delta", "z", "B", "C") and a.ndim > 2 else a)
            for n, a in args.items()}
    tail = {n: (a[..., k:] if n in ("u", "delta", "z", "B", "C") and a.ndim > 2 else a)
            for n, a in args.items()}
    out1, last1 = ssmcore.selective_scan(**head, delta_softplus=True, return_last_state=True)
    tail["initial_state"] = last1
    out2, last2 = ssmcore.selective_scan(**tail, delta_softplus=True, return_last_state=True)
    assert_close(np.concatenate([out1, out2], axis=-1), full, "float64", name="out")
    assert_close(last2, full_last, "float64", name="last_state")


def test_non_contiguous_inputs(rng):
    args = make_inputs(rng, 2, 4, 33, 6, B_kind=2, C_kind="DN", dtype="float32")
    channel_last = {n: np.asfortranarray(a) if a is not None and a.ndim > 1 else a for n, a in args.items()}
    channel_last["u"] = np.ascontiguousarray(args["u"].transpose(0, 2, 1)).transpose(0, 2, 1)
    out = ssmcore.selective_scan(**channel_last, delta_softplus=True)
    assert_close(out, reference.selective_scan(**args, delta_softplus=True), "float32")


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (0, 3, 5, 4), (2, 0, 5, 4), (2, 3, 5, 0)])
def test_empty_sizes(rng, shape):
    batch, channels, length, N = shape
    args = make_inputs(rng, batch, channels, length, N, B_kind="BNL", C_kind="DN", dtype="float64")
    out, last = ssmcore.selective_scan(**args, return_last_state=True)
    ref_out, ref_last = reference.selective_scan(**args, return_last_state=True)
    assert_close(out, ref_out, "float64")
    assert_close(last, ref_last, "float64")
    dout, dlast = upstream(rng, args, "float64")
    grads = ssmcore.selective_scan_bwd(dout, **args, dlast_state=dlast)
    for name, grad in zip(GRAD_NAMES, grads):
        assert grad.shape == args[name].shape, name
    if length == 0:
        assert_close(grads.dinitial_state, dlast, "float64")
        assert not grads.dA.any() and not grads.dB.any() and not grads.dC.any()


def test_nan_propagates(rng):
    args = make_inputs(rng, 1, 2, 10, 3, dtype="float32")
    args["u"][0, 1, 4] = np.nan
    out = ssmcore.selective_scan(**args)
    assert np.isnan(out[0, 1, 4:]).all()
    assert np.isfinite(out[0, 0]).all() and np.isfinite(out[0, 1, :4]).all()


def test_float32_math_helpers():
    """The vectorisable float32 exp / softplus / sigmoid / dot of the Numba backend: float32 in,
    float32 out, about 1 ulp against float64 NumPy, IEEE results at the edges."""
    import numba

    from ssmcore.backends.numba import scan as kernels

    @numba.njit(error_model="numpy")
    def evaluate(x, out):
        for i in range(x.size):
            out[0, i] = kernels._exp(x[i])
            out[1, i], out[2, i] = kernels._softplus_slope(x[i])
            out[3, i] = kernels._sigmoid(x[i])

    @numba.njit
    def scalar_types(x, v):
        return kernels._exp(x), kernels._softplus_slope(x), kernels._sigmoid(x), kernels._dot(v, v)

    for dtype in (np.float32, np.float64):
        scalar_types(dtype(1), np.ones(3, dtype))
    for signature in scalar_types.nopython_signatures:
        name = str(signature.args[0])
        assert str(signature.return_type) == f"Tuple({name}, UniTuple({name} x 2), {name}, {name})"

    rng = np.random.default_rng(0)
    edges = [np.inf, -np.inf, np.nan, 0.0, -0.0, 20.0, np.nextafter(np.float32(20), 30), 88.72, 88.73,
             -87.3, -100.0, -104.5, 1e30]
    x = np.concatenate([rng.uniform(-110, 95, 200_000), rng.uniform(-1e-4, 1e-4, 1000), edges])
    x = x.astype(np.float32)
    got = np.empty((4, x.size), np.float32)
    evaluate(x, got)
    xd = x.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(xd)
        expected = np.stack([e, np.where(xd > 20, xd, np.log1p(e)), np.where(xd > 20, 1, e / (1 + e)),
                             1 / (1 + np.exp(-xd))])
        representable = expected.astype(np.float32)
    for k, name in enumerate(["exp", "softplus", "slope", "sigmoid"]):
        normal = np.isfinite(representable[k]) & (np.abs(representable[k]) >= np.finfo(np.float32).tiny)
        rel = np.abs(got[k][normal] - expected[k][normal]) / np.abs(expected[k][normal])
        assert rel.max() < 3e-7, (name, rel.max())
        assert np.array_equal(np.isnan(got[k]), np.isnan(representable[k])), name
        assert np.array_equal(got[k][np.isinf(representable[k])], representable[k][np.isinf(representable[k])]), name
        assert np.abs(got[k][~normal & np.isfinite(representable[k])]).max() < 1.2e-38, name
    above = x > 20
    assert np.array_equal(got[1][above], x[above]) and (got[2][above] == 1).all()

    for n in (0, 1, 7, 16, 17, 40, 256):
        a = rng.standard_normal(n)
        assert abs(scalar_types(1.0, a)[3] - a @ a) <= 1e-12 * (1 + a @ a)


@settings(max_examples=20)
@given(
    batch=st.integers(1, 2), channels=st.sampled_from([1, 2, 3, 4, 6]), length=st.integers(1, 80),
    N=st.integers(1, 9), data=st.data(), dtype=st.sampled_from(["float64", "float32"]),
)
def test_forward_sweep(batch, channels, length, N, data, dtype):
    groups = [g for g in (1, 2, 3) if channels % g == 0]
    kinds = st.sampled_from(["DN", "BNL"] + groups)
    options = data.draw(st.lists(st.sampled_from(OPTIONS), unique=True), "options")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    args = make_inputs(rng, batch, channels, length, N, B_kind=data.draw(kinds, "B"),
                       C_kind=data.draw(kinds, "C"), dtype=dtype, options=options)
    check_forward(args, dtype, data.draw(st.booleans(), "softplus"))


# --- backward -------------------------------------------------------------------------------------


def torch_scan(u, delta, A, B, C, D, z, delta_bias, softplus, initial_state):
    """Plain torch loop over time (float64 autograd oracle). Returns (out, last_state)."""
    batch, channels, length = u.shape

    def at(X, t):  # (B, D, N)-broadcastable B_t or C_t
        if X.dim() == 2:
            return X[None]
        if X.dim() == 3:
            return X[:, None, :, t]
        return X[..., t].repeat_interleave(channels // X.shape[1], dim=1)

    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if softplus:
        dt = F.softplus(dt)
    h = torch.zeros(batch, channels, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def torch_grads(args, softplus, dout, dlast):
    tensors = {n: None if a is None else torch.tensor(f64(a), requires_grad=True) for n, a in args.items()}
    out, last = torch_scan(**tensors, softplus=softplus)
    loss = (out * torch.tensor(f64(dout))).sum()
    if dlast is not None:
        loss = loss + (last * torch.tensor(f64(dlast))).sum()
    loss.backward()
    return {n: None if t is None else t.grad.numpy() for n, t in tensors.items()}


def upstream(rng, args, dtype, with_dlast=True):
    batch, channels, length = args["u"].shape
    dout = randn(rng, (batch, channels, length), dtype)
    dlast = randn(rng, (batch, channels, args["A"].shape[1]), "float64" if dtype == "float64" else "float32")
    return dout, (dlast if with_dlast else None)


def check_grads_vs_torch(args, dtype, softplus, dout, dlast, scale_tol=True):
    grads = ssmcore.selective_scan_bwd(dout, **args, delta_softplus=softplus, dlast_state=dlast)
    expected = torch_grads(args, softplus, dout, dlast)
    for name, grad in zip(GRAD_NAMES, grads):
        if args[name] is None:
            assert grad is None, name
            continue
        assert grad.dtype == args[name].dtype and grad.shape == args[name].shape, name
        rtol, atol = TOL[dtype]
        # Sums over batch/time/channels (dA, dD, constant dB/dC) cancel: scale atol by the magnitude.
        scale = max(1.0, float(np.abs(expected[name]).max())) if scale_tol else 1.0
        assert_close(grad, expected[name], dtype, rtol=rtol, atol=atol * scale, name="d" + name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B_kind, C_kind, length", [(2, "DN", 130), ("DN", "BNL", 65), ("BNL", 4, 7)])
def test_backward_vs_torch(rng, dtype, B_kind, C_kind, length):
    args = make_inputs(rng, 2, 4, length, 6, B_kind=B_kind, C_kind=C_kind, dtype=dtype)
    dout, dlast = upstream(rng, args, dtype)
    check_grads_vs_torch(args, dtype, True, dout, dlast)


@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("options", [(), OPTIONS])
@pytest.mark.parametrize("with_dlast", [False, True])
def test_backward_options_vs_torch(rng, softplus, options, with_dlast):
    args = make_inputs(rng, 2, 3, 70, 5, B_kind="DN", C_kind=3, dtype="float64", options=options)
    dout, dlast = upstream(rng, args, "float64", with_dlast)
    check_grads_vs_torch(args, "float64", softplus, dout, dlast, scale_tol=False)


@pytest.mark.parametrize("B_kind, C_kind", [("DN", "DN"), ("BNL", 2), (2, "BNL")])
@pytest.mark.parametrize("softplus, length", [(True, 70), (False, 1)])
def test_backward_finite_differences(rng, B_kind, C_kind, softplus, length):
    """Every gradient (dinitial_state included, dlast_state given) vs central differences of the
    float64 reference, on a few probed entries each."""
    args = make_inputs(rng, 2, 4, length, 3, B_kind=B_kind, C_kind=C_kind, dtype="float64")
    dout, dlast = upstream(rng, args, "float64")
    grads = ssmcore.selective_scan_bwd(dout, **args, delta_softplus=softplus, dlast_state=dlast)
    weights = np.concatenate([dout.ravel(), dlast.ravel()])

    def f():
        out, last = reference.selective_scan(**args, delta_softplus=softplus, return_last_state=True)
        return np.concatenate([out.ravel(), last.ravel()])

    for name, grad in zip(GRAD_NAMES, grads):
        numeric = numeric_grad(f, args[name], weights, max_points=4, rng=rng)
        assert_grad_close(grad, numeric, rtol=1e-5, atol=1e-6, name="d" + name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_backward_softplus_threshold(rng, dtype):
    """Steps with delta + delta_bias > 20 take softplus(x) = x, whose slope is exactly 1."""
    args = make_inputs(rng, 1, 3, 30, 4, B_kind="BNL", C_kind="DN", dtype=dtype, big_delta=True)
    args["A"] = (args["A"] * 0.01).astype(args["A"].dtype)
    dout, dlast = upstream(rng, args, dtype)
    check_grads_vs_torch(args, dtype, True, dout, dlast, scale_tol=dtype != "float64")


def test_backward_big_N(rng):
    args = make_inputs(rng, 1, 2, 66, 256, B_kind="BNL", C_kind="DN", dtype="float32")
    dout, dlast = upstream(rng, args, "float32")
    check_grads_vs_torch(args, "float32", True, dout, dlast)


def test_backward_many_tasks(rng):
    """More channels than tasks per group: partial dB/dC slots summed over several blocks."""
    args = make_inputs(rng, 1, 24, 40, 3, B_kind=2, C_kind="BNL", dtype="float64")
    dout, dlast = upstream(rng, args, "float64")
    check_grads_vs_torch(args, "float64", True, dout, dlast, scale_tol=False)


@settings(max_examples=10)
@given(
    batch=st.integers(1, 2), channels=st.sampled_from([1, 2, 4, 6]), length=st.integers(1, 140),
    N=st.integers(1, 6), data=st.data(),
)
def test_backward_sweep(batch, channels, length, N, data):
    groups = [g for g in (1, 2, 3) if channels % g == 0]
    kinds = st.sampled_from(["DN", "BNL"] + groups)
    options = data.draw(st.lists(st.sampled_from(OPTIONS), unique=True), "options")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), "seed"))
    args = make_inputs(rng, batch, channels, length, N, B_kind=data.draw(kinds, "B"),
                       C_kind=data.draw(kinds, "C"), dtype="float64", options=options)
    dout, dlast = upstream(rng, args, "float64", data.draw(st.booleans(), "dlast"))
    check_grads_vs_torch(args, "float64", data.draw(st.booleans(), "softplus"), dout, dlast, scale_tol=False)


# --- inputs, errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_inputs_unmodified(rng, dtype):
    args = make_inputs(rng, 2, 4, 70, 5, B_kind=2, C_kind="DN", dtype=dtype)
    dout, dlast = upstream(rng, args, dtype)
    before = {n: a.copy() for n, a in args.items()}
    dout_before, dlast_before = dout.copy(), dlast.copy()
    ssmcore.selective_scan(**args, delta_softplus=True, return_last_state=True)
    ssmcore.selective_scan_bwd(dout, **args, delta_softplus=True, dlast_state=dlast)
    for name, a in args.items():
        assert np.array_equal(f64(a), f64(before[name])), name
    assert np.array_equal(dout, dout_before) and np.array_equal(dlast, dlast_before)


def _base(rng):
    return make_inputs(rng, 2, 4, 5, 3, B_kind="BNL", C_kind="DN", dtype="float32")


# (argument replaced, how, expected exception, message start)
ERRORS = [
    ("u", lambda a: a["u"][0], ValueError, "u:"),
    ("u", lambda a: a["u"].astype(np.int32), TypeError, "u:"),
    ("u", lambda a: a["u"].tolist(), TypeError, "u:"),
    ("delta", lambda a: a["delta"][:, :, :4], ValueError, "delta:"),
    ("delta", lambda a: a["delta"].astype(np.float64), TypeError, "delta:"),
    ("A", lambda a: a["A"].astype(np.complex64), TypeError, "A: complex A is not supported"),
    ("A", lambda a: a["A"][:3], ValueError, "A:"),
    ("A", lambda a: a["A"].astype(np.float16), TypeError, "A:"),
    ("B", lambda a: a["B"][0, 0], ValueError, "B:"),
    ("B", lambda a: a["B"][None, None], ValueError, "B:"),
    ("B", lambda a: a["B"][:, :, :4], ValueError, "B:"),
    ("B", lambda a: np.stack([a["B"]] * 3, axis=1), ValueError, "B:.*not a multiple"),
    ("B", lambda a: a["B"].astype(np.float64), TypeError, "B:"),
    ("B", lambda a: np.ones((4, 2), np.float32), ValueError, "B:"),
    ("B", lambda a: np.ones((4, 3), np.float16), TypeError, "B:"),
    ("C", lambda a: a["C"][:3], ValueError, "C:"),
    ("C", lambda a: a["C"].astype(np.float16), TypeError, "C:"),
    ("C", lambda a: np.ones((2, 3, 3, 5), np.float32), ValueError, "C:.*not a multiple"),
    ("C", lambda a: np.ones((2, 0, 3, 5), np.float32), ValueError, "C:"),
    ("C", lambda a: np.ones((2, 3, 5), np.float16), TypeError, "C:"),
    ("D", lambda a: a["D"][:3], ValueError, "D:"),
    ("D", lambda a: a["D"].astype(np.float16), TypeError, "D:"),
    ("z", lambda a: a["z"][:1], ValueError, "z:"),
    ("z", lambda a: a["z"].astype(np.float16), TypeError, "z:"),
    ("delta_bias", lambda a: a["delta_bias"][None], ValueError, "delta_bias:"),
    ("delta_bias", lambda a: a["delta_bias"].astype(np.int64), TypeError, "delta_bias:"),
    ("initial_state", lambda a: a["initial_state"][..., :2], ValueError, "initial_state:"),
    ("initial_state", lambda a: a["initial_state"].astype(np.float16), TypeError, "initial_state:"),
]


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("name, change, error, start", ERRORS)
def test_argument_errors(rng, backward, name, change, error, start):
    args = _base(rng)
    args[name] = change(args)
    with pytest.raises(error, match="^" + start):
        if backward:
            ssmcore.selective_scan_bwd(randn(rng, (2, 4, 5)), **args)
        else:
            ssmcore.selective_scan(**args)


@pytest.mark.parametrize("flag", ["delta_softplus", "return_last_state"])
@pytest.mark.parametrize("value", [1, "yes", None])
def test_flag_errors(rng, flag, value):
    with pytest.raises(TypeError, match=f"^{flag}:"):
        ssmcore.selective_scan(**_base(rng), **{flag: value})


@pytest.mark.parametrize("name, value, error", [
    ("dout", np.ones((2, 4, 6), np.float32), ValueError),
    ("dout", np.ones((2, 4, 5), np.float64), TypeError),
    ("dout", None, TypeError),
    ("dlast_state", np.ones((2, 4, 4), np.float32), ValueError),
    ("dlast_state", np.ones((2, 4, 3), np.float16), TypeError),
])
def test_backward_errors(rng, name, value, error):
    kwargs = {"dout": randn(rng, (2, 4, 5)), **_base(rng), name: value}
    with pytest.raises(error, match=f"^{name}:"):
        ssmcore.selective_scan_bwd(**kwargs)


def test_backward_softplus_flag_error(rng):
    with pytest.raises(TypeError, match="^delta_softplus:"):
        ssmcore.selective_scan_bwd(randn(rng, (2, 4, 5)), **_base(rng), delta_softplus=0)
