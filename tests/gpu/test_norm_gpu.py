"""Norms on the GPU (CuPy backend) against float64 oracles and the Numba backend.

Forward outputs are compared with ssmcore.reference (float64 on the same dtype-rounded inputs).
Backward gradients are compared with float64 NumPy formulas written below (independent of both
backends). test_matches_cpu_backend checks the Numba backend on the same inputs: the prenorm
sum s must match bit for bit (both add in float32 and round once). Row lengths cover every
kernel layout: several rows per warp, a block per row with 1, 2 or 4 register chunks per
thread, and the streaming kernel for very long rows.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import TOL, assert_close, f64, randn

import ssmcore
from ssmcore import reference
from ssmcore.backends import numba as cpu

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

GPU_DTYPES = ("float32", "float16", "bfloat16")
WIDTHS = (7, 64, 2560, 5000, 20000)  # rows per warp .. 1 chunk .. 2 chunks .. streaming


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else cupy.asnumpy(a)


def norm_grads(kind, dy, x, weight, bias=None, residual=None, eps=1e-5, dresidual_out=None):
    """Float64 (dx, dweight, dbias, dresidual) of rms_norm / layer_norm."""
    s = f64(x) + (0.0 if residual is None else f64(residual))
    centred = s - s.mean(-1, keepdims=True) if kind == "layer_norm" else s
    rstd = 1.0 / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
    xhat = centred * rstd
    g = f64(dy) * f64(weight)
    ds = g - xhat * (g * xhat).mean(-1, keepdims=True)
    if kind == "layer_norm":
        ds = ds - g.mean(-1, keepdims=True)
    ds = ds * rstd + (0.0 if dresidual_out is None else f64(dresidual_out))
    over_rows = lambda a: a.reshape(-1, a.shape[-1]).sum(0)
    return (ds, over_rows(f64(dy) * xhat), None if bias is None else over_rows(f64(dy)),
            None if residual is None else ds)


def gated_grads(dy, x, weight, z=None, eps=1e-5, group_size=None, norm_before_gate=True):
    """Float64 (dx, dweight, dz) of gated_rms_norm."""
    dy, x, w = f64(dy), f64(x), f64(weight)
    width = x.shape[-1]
    group = width if group_size is None else group_size
    if z is None:
        gate, dgate = np.ones_like(x), np.zeros_like(x)
    else:
        z = f64(z)
        sig = 1.0 / (1.0 + np.exp(-z))
        gate, dgate = z * sig, sig * (1.0 + z * (1.0 - sig))
    v = x if norm_before_gate else x * gate
    grouped = lambda a: a.reshape(a.shape[:-1] + (width // group, group))
    rstd = 1.0 / np.sqrt((grouped(v) ** 2).mean(-1, keepdims=True) + eps)
    vhat = (grouped(v) * rstd).reshape(x.shape)
    dvhat = dy * w * (gate if norm_before_gate else 1.0)
    c1 = (grouped(dvhat * vhat)).mean(-1, keepdims=True)
    dv = ((grouped(dvhat) - grouped(vhat) * c1) * rstd).reshape(x.shape)
    if norm_before_gate:
        dx, dz = dv, dy * vhat * w * dgate
    else:
        dx, dz = dv * gate, dv * x * dgate
    dweight = (dy * vhat * (gate if norm_before_gate else 1.0)).reshape(-1, width).sum(0)
    return dx, dweight, None if z is None else dz


def grad_tol(dtype):
    """Gradients of rounded inputs: twice the forward tolerance (sums over a row add rounding)."""
    r, a = TOL[dtype]
    return 2 * r, 2 * a


def assert_grads(got, want, names, dtypes, dtype):
    rtol, atol = grad_tol(dtype)
    for name, g, w, dt in zip(names, got, want, dtypes):
        if w is None:
            assert g is None, name
            continue
        assert isinstance(g, cupy.ndarray), name
        assert g.dtype == dt, f"{name}: dtype {g.dtype}, expected {dt}"
        # dweight/dbias sum over rows: compare relative to their scale
        scale = max(1.0, float(np.abs(f64(w)).max(initial=0.0)))
        assert_close(host(g), w, dtype, rtol=rtol, atol=atol * scale, name=name)


# --- rms_norm / layer_norm -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", [1, 37])
def test_forward(rng, kind, dtype, width, rows):
    x = randn(rng, (rows, width), dtype)
    weight = randn(rng, width, "float32")
    bias = randn(rng, width, "float32")
    op, ref = getattr(ssmcore, kind), getattr(reference, kind)
    for residual_dtype, use_bias, residual_in_fp32 in [(None, False, False), ("float32", True, True),
                                                       (dtype, True, False), (None, True, True)]:
        residual = None if residual_dtype is None else randn(rng, (rows, width), residual_dtype)
        b = bias if use_bias else None
        y, s = op(gpu(x), gpu(weight), gpu(b), gpu(residual), 1e-5, prenorm=True, residual_in_fp32=residual_in_fp32)
        assert y.dtype == x.dtype and isinstance(y, cupy.ndarray)
        want_s_dtype = np.float32 if residual_in_fp32 else (residual if residual is not None else x).dtype
        assert s.dtype == want_s_dtype
        ry, _ = ref(x, weight, b, residual, 1e-5, prenorm=True)
        assert_close(host(y), ry, dtype, name=f"{kind} y (residual {residual_dtype}, bias {use_bias})")
        s_want = (f64(x) + (0.0 if residual is None else f64(residual))).astype(np.float32).astype(want_s_dtype)
        np.testing.assert_array_equal(f64(host(s)), f64(s_want), err_msg=f"{kind} s is not x + residual rounded once")
        y_only = op(gpu(x), gpu(weight), gpu(b), gpu(residual), 1e-5)
        np.testing.assert_array_equal(f64(host(y_only)), f64(host(y)))


@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
def test_backward(rng, kind, dtype, width):
    rows = 37
    x = randn(rng, (rows, width), dtype)
    weight = randn(rng, width, dtype if dtype != "float16" else "float32")
    bias = randn(rng, width, "float32")
    residual = randn(rng, (rows, width), "float32")
    dy = randn(rng, (rows, width), dtype)
    dres_out = randn(rng, (rows, width), "float32")
    bwd = getattr(ssmcore, kind + "_bwd")
    for res, b, dro in [(residual, bias, dres_out), (None, None, None), (residual, None, None)]:
        got = bwd(gpu(dy), gpu(x), gpu(weight), gpu(b), gpu(res), 1e-5, gpu(dro))
        want = norm_grads(kind, dy, x, weight, b, res, 1e-5, dro)
        dtypes = (x.dtype, weight.dtype, None if b is None else b.dtype, None if res is None else res.dtype)
        assert_grads(got, want, ("dx", "dweight", "dbias", "dresidual"), dtypes, dtype)


def test_mixed_dtypes(rng):
    """A residual, dy or z whose dtype is neither x's nor float32 takes the converting path."""
    x, residual = randn(rng, (5, 96), "bfloat16"), randn(rng, (5, 96), "float16")
    weight, dy = randn(rng, 96, "bfloat16"), randn(rng, (5, 96), "float16")
    y, s = ssmcore.layer_norm(gpu(x), gpu(weight), None, gpu(residual), prenorm=True)
    assert s.dtype == np.float16
    assert_close(host(y), reference.layer_norm(x, weight, None, residual), "bfloat16", name="y")
    assert_close(host(s), f64(x) + f64(residual), "float16", name="s")
    got = ssmcore.layer_norm_bwd(gpu(dy), gpu(x), gpu(weight), None, gpu(residual))
    want = norm_grads("layer_norm", dy, x, weight, None, residual)
    assert_grads(got, want, ("dx", "dweight", "dbias", "dresidual"), (x.dtype, weight.dtype, None, residual.dtype),
                 "bfloat16")
    got = ssmcore.gated_rms_norm_bwd(gpu(dy), gpu(x), gpu(weight), gpu(dy), group_size=32)
    want = gated_grads(dy, x, weight, dy, group_size=32)
    assert_grads(got, want, ("dx", "dweight", "dz"), (x.dtype, weight.dtype, dy.dtype), "bfloat16")


def test_leading_dims_and_strides(rng):
    """(..., D) inputs of any strides, including zero rows."""
    x = randn(rng, (3, 5, 2 * 96), "bfloat16")[:, :, ::2]  # non-contiguous
    weight = randn(rng, 96, "float32")
    y = ssmcore.rms_norm(gpu(x), gpu(weight))
    assert y.shape == x.shape
    assert_close(host(y), reference.rms_norm(x, weight), "bfloat16")
    empty = ssmcore.layer_norm(cupy.zeros((0, 4, 96), cupy.float32), gpu(weight))
    assert empty.shape == (0, 4, 96)
    g = ssmcore.rms_norm_bwd(cupy.zeros((0, 96), cupy.float32), cupy.zeros((0, 96), cupy.float32), gpu(weight))
    assert g.dweight.shape == (96,) and float(cupy.abs(g.dweight).max()) == 0.0


def test_inputs_not_modified(rng):
    x, residual = randn(rng, (9, 64), "bfloat16"), randn(rng, (9, 64), "float32")
    weight, dy = randn(rng, 64, "float32"), randn(rng, (9, 64), "bfloat16")
    gx, gres, gw, gdy = gpu(x), gpu(residual), gpu(weight), gpu(dy)
    ssmcore.rms_norm(gx, gw, None, gres, prenorm=True, residual_in_fp32=True)
    ssmcore.rms_norm_bwd(gdy, gx, gw, None, gres)
    ssmcore.gated_rms_norm_bwd(gdy, gx, gw, gdy, group_size=16)
    for a, g in ((x, gx), (residual, gres), (weight, gw), (dy, gdy)):
        np.testing.assert_array_equal(f64(host(g)), f64(a))


def test_float64_is_cpu_only(rng):
    with pytest.raises(TypeError, match=r"^x:"):
        ssmcore.rms_norm(cupy.ones((2, 8)), cupy.ones(8, cupy.float32))


# (x dtype, width, rows, NV knob, kernel expected): norm_fwd2 layouts (several rows per warp, a block per row
# with 1 or 2 chunks per thread, odd row counts), and rows it leaves to norm_fwd (D % 8 != 0, > 1024 chunks).
FWD2_CASES = [
    ("bfloat16", 64, 37, "1", "norm_fwd2<bf16_t, 1,"),
    ("float16", 24, 5, "2", "norm_fwd2<half_t, 2,"),
    ("float32", 136, 19, "1", "norm_fwd2<float, 1,"),
    ("bfloat16", 200, 11, "2", "norm_fwd2<bf16_t, 2,"),
    ("float32", 4104, 3, "1", "norm_fwd2<float, 2,"),
    ("bfloat16", 45, 7, "1", "norm_fwd<bf16_t, 1,"),
    ("float16", 8200, 2, "1", "norm_fwd<half_t, 4,"),
]


@pytest.mark.parametrize("dtype,width,rows,nv,expect", FWD2_CASES)
@pytest.mark.parametrize("kind", ["rms_norm", "layer_norm"])
def test_forward_v2(rng, monkeypatch, kernel_names, kind, dtype, width, rows, nv, expect):
    """The v2 forward (SSMCORE_NORM_FWD=v2) against the float64 reference and v1 on the same inputs, on a persistent grid of
    one block (each row slot walks several rows, prefetching the next), with every residual / s dtype pairing,
    prenorm on and off, with and without bias, cache hints on and off, and the full (one row per slot) grid."""
    from ssmcore.backends.cupy import _arrays
    from ssmcore.backends.cupy import norm as backend

    monkeypatch.setattr(_arrays, "sm_count", lambda: 1)
    monkeypatch.setattr(backend, "_resident_blocks", lambda kernel, threads: 1)
    monkeypatch.setattr(backend, "fwd2_nv", nv)
    x = randn(rng, (rows, width), dtype)
    weight = randn(rng, width, "float32")
    bias = randn(rng, width, "float32")
    op, ref = getattr(ssmcore, kind), getattr(reference, kind)
    cases = [(None, False, False, "persistent", True), ("float32", True, True, "persistent", False),
             (dtype, True, False, "full", True), (dtype, False, True, "persistent", True),
             (None, True, True, "full", False)]
    for residual_dtype, use_bias, in_fp32, grid, hint in cases:
        residual = None if residual_dtype is None else randn(rng, (rows, width), residual_dtype)
        b = bias if use_bias else None
        args = (gpu(x), gpu(weight), gpu(b), gpu(residual), 1e-5)
        monkeypatch.setattr(backend, "fwd2_grid", grid)
        monkeypatch.setattr(backend, "fwd2_hint", hint)
        monkeypatch.setattr(backend, "fwd_impl", "v2")
        del kernel_names[:]
        y, s = op(*args, prenorm=True, residual_in_fp32=in_fp32)
        y_only = op(*args)
        assert kernel_names and all(n.startswith(expect) for n in kernel_names), (expect, kernel_names)
        label = f"{kind} (residual {residual_dtype}, bias {use_bias}, fp32 {in_fp32}, {grid}, hint {hint})"
        want_s_dtype = np.float32 if in_fp32 else (residual if residual is not None else x).dtype
        assert y.dtype == x.dtype and s.dtype == want_s_dtype, label
        ry = ref(x, weight, b, residual, 1e-5)
        assert_close(host(y), ry, dtype, name=f"y {label}")
        s_want = (f64(x) + (0.0 if residual is None else f64(residual))).astype(np.float32).astype(want_s_dtype)
        np.testing.assert_array_equal(f64(host(s)), f64(s_want), err_msg=f"s {label}")
        np.testing.assert_array_equal(f64(host(y_only)), f64(host(y)), err_msg=f"prenorm off {label}")
        monkeypatch.setattr(backend, "fwd_impl", "v1")
        del kernel_names[:]
        y1, s1 = op(*args, prenorm=True, residual_in_fp32=in_fp32)
        assert all(n.startswith("norm_fwd<") for n in kernel_names), kernel_names
        assert_close(host(y), f64(host(y1)), dtype, name=f"y v2 vs v1 {label}")
        np.testing.assert_array_equal(f64(host(s)), f64(host(s1)), err_msg=f"s v2 vs v1 {label}")


def test_forward_knobs(monkeypatch):
    from ssmcore.backends.cupy import norm as backend

    for attr, env in (("fwd_impl", "SSMCORE_NORM_FWD"), ("fwd2_nv", "SSMCORE_NORM_FWD2_NV"),
                      ("fwd2_grid", "SSMCORE_NORM_FWD2_GRID"), ("fwd2_hint", "SSMCORE_NORM_FWD2_HINT")):
        monkeypatch.setattr(backend, attr, None)
        monkeypatch.setenv(env, "bogus")
        with pytest.raises(ValueError, match=f"^{env}:"):
            ssmcore.rms_norm(cupy.ones((2, 64), cupy.float32), cupy.ones(64, cupy.float32))
        monkeypatch.delenv(env)


# --- gated_rms_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width,group_size", [(64, None), (64, 16), (96, 24), (5120, None), (8192, 4096),
                                              (10000, 5000), (24, 3)])
@pytest.mark.parametrize("rows", [1, 33])
def test_gated(rng, dtype, width, group_size, rows):
    x = randn(rng, (rows, width), dtype)
    z = randn(rng, (rows, width), dtype)
    weight = randn(rng, width, "float32")
    dy = randn(rng, (rows, width), dtype)
    for norm_before_gate in (True, False):
        for gate in (z, None):
            y = ssmcore.gated_rms_norm(gpu(x), gpu(weight), gpu(gate), 1e-5, group_size, norm_before_gate)
            assert y.dtype == x.dtype
            ry = reference.gated_rms_norm(x, weight, gate, 1e-5, group_size, norm_before_gate)
            assert_close(host(y), ry, dtype, name=f"gated y (nbg {norm_before_gate}, z {gate is not None})")
            got = ssmcore.gated_rms_norm_bwd(gpu(dy), gpu(x), gpu(weight), gpu(gate), 1e-5, group_size,
                                             norm_before_gate)
            want = gated_grads(dy, x, weight, gate, 1e-5, group_size, norm_before_gate)
            dtypes = (x.dtype, weight.dtype, None if gate is None else gate.dtype)
            assert_grads(got, want, ("dx", "dweight", "dz"), dtypes, dtype)


# --- CUDA graphs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,z_dtype", [("bfloat16", "bfloat16"), ("float32", "float32"), ("float16", "float32"),
                                           ("bfloat16", "float16")])
@pytest.mark.parametrize("group_size", [None, 32, 20])
def test_gated_strided_rows(rng, dtype, z_dtype, group_size):
    """x, z and dy as channel slices of wider (batch, length, width) rows (Mamba2's z is a slice of the in_proj
    output), read in place through their row strides: equal bit for bit to the same call on contiguous copies,
    and to the float64 reference; a z of another 16-bit type than x goes through float32."""
    batch, length, dim = 2, 7, 160
    wide = randn(rng, (batch, length, 3 * dim + 8), dtype)
    x, dy = wide[..., 8:8 + dim], wide[..., 8 + 2 * dim:]
    zwide = randn(rng, (batch, length, dim + 24), z_dtype)
    z = zwide[..., 16:16 + dim]
    weight = randn(rng, dim, "float32")
    gw, gwide, gzwide = gpu(weight), gpu(wide), gpu(zwide)
    gx, gdy = gwide[..., 8:8 + dim], gwide[..., 8 + 2 * dim:]
    gz = gzwide[..., 16:16 + dim]
    assert not gx.flags.c_contiguous and not gz.flags.c_contiguous and not gdy.flags.c_contiguous
    for nbg in (True, False):
        y = ssmcore.gated_rms_norm(gx, gw, gz, 1e-5, group_size, nbg)
        y_c = ssmcore.gated_rms_norm(cupy.ascontiguousarray(gx), gw, cupy.ascontiguousarray(gz), 1e-5, group_size, nbg)
        np.testing.assert_array_equal(f64(host(y)), f64(host(y_c)), err_msg=f"y strided vs contiguous (nbg {nbg})")
        assert_close(host(y), reference.gated_rms_norm(x, weight, z, 1e-5, group_size, nbg), dtype, name="y")
        got = ssmcore.gated_rms_norm_bwd(gdy, gx, gw, gz, 1e-5, group_size, nbg)
        got_c = ssmcore.gated_rms_norm_bwd(cupy.ascontiguousarray(gdy), cupy.ascontiguousarray(gx), gw,
                                           cupy.ascontiguousarray(gz), 1e-5, group_size, nbg)
        for name, a, b in zip(("dx", "dweight", "dz"), got, got_c):
            np.testing.assert_array_equal(f64(host(a)), f64(host(b)), err_msg=f"{name} strided vs contiguous")
        want = gated_grads(dy, x, weight, z, 1e-5, group_size, nbg)
        for name, a, w in zip(("dx", "dweight", "dz"), got, want):
            scale = max(1.0, float(np.abs(w).max()))
            assert_close(host(a), w, dtype, atol=TOL[dtype][1] * scale * 2, rtol=TOL[dtype][0] * 2, name=name)
    np.testing.assert_array_equal(f64(host(gwide)), f64(wide))  # inputs untouched


@pytest.fixture
def kernel_names(monkeypatch):
    """The name expressions of the norm kernels launched (through _runtime.function) while the test runs."""
    from ssmcore.backends.cupy import _runtime

    names = []
    original = _runtime.function

    def recording(family, name, *args, **kwargs):
        if family == "norm":
            names.append(name)
        return original(family, name, *args, **kwargs)

    monkeypatch.setattr(_runtime, "function", recording)
    return names


# (x dtype, z and dy dtype, width, group size, rows, kernel expected from the v2 launchers): every gated_bwd2
# layout (NV 1 and 2, vectorised and element-wise chunks, several groups per row, float32 streams with 16-bit x),
# and the cases that stay on v1 (mixed z / dy stream types, long groups).
GATED2_CASES = [
    ("bfloat16", "bfloat16", 48, 16, 37, "gated_bwd2<bf16_t, bf16_t, 1,"),
    ("float16", "float16", 1024, 512, 29, "gated_bwd2<half_t, half_t, 2,"),
    ("bfloat16", "bfloat16", 2002, 1001, 23, "gated_bwd2<bf16_t, bf16_t, 2,"),
    ("bfloat16", "float32", 600, None, 19, "gated_bwd2<bf16_t, float, 2,"),
    ("float32", "float32", 1000, 500, 21, "gated_bwd2<float, float, 1,"),
    ("float32", "float32", 40, 20, 50, "gated_bwd2<float, float, 1,"),
    ("bfloat16", "mixed", 96, 32, 9, "gated_bwd<bf16_t, 1>"),
    ("float16", "float16", 6152, None, 3, "gated_bwd<half_t, 2>"),
]


@pytest.mark.parametrize("dtype,s_dtype,width,group_size,rows,expect", GATED2_CASES)
def test_gated_v2(rng, monkeypatch, kernel_names, dtype, s_dtype, width, group_size, rows, expect):
    """The v2 gated kernels (default) against the float64 formulas and against v1 on the same inputs, on a
    persistent grid of few slots (each slot walks several rows, so the dweight sums carry across rows);
    z absent and both gate orders."""
    from ssmcore.backends.cupy import _arrays
    from ssmcore.backends.cupy import norm as backend

    monkeypatch.setattr(_arrays, "sm_count", lambda: 1)
    monkeypatch.setattr(backend, "_resident_blocks", lambda kernel, threads: 1)  # a grid of ngroups-steps blocks
    z_dtype = "float32" if s_dtype == "mixed" else s_dtype
    dy_dtype = dtype if s_dtype == "mixed" else s_dtype
    x = randn(rng, (rows, width), dtype)
    z = randn(rng, (rows, width), z_dtype, scale=2.0)
    dy = randn(rng, (rows, width), dy_dtype)
    weight = randn(rng, width, "float32")
    for nbg in (True, False):
        for gate in (z, None):
            args = (gpu(x), gpu(weight), gpu(gate), 1e-5, group_size, nbg)
            del kernel_names[:]
            monkeypatch.setattr(backend, "gated_impl", None)
            y = ssmcore.gated_rms_norm(*args)
            got = ssmcore.gated_rms_norm_bwd(gpu(dy), *args)
            if gate is not None:
                assert any(n.startswith(expect) for n in kernel_names), (expect, kernel_names)
            assert any(n.startswith("gated_fwd2<") for n in kernel_names) == ((group_size or width) <= 8 * 2048)
            assert_close(host(y), reference.gated_rms_norm(x, weight, gate, 1e-5, group_size, nbg), dtype,
                         name=f"y (nbg {nbg}, z {gate is not None})")
            want = gated_grads(dy, x, weight, gate, 1e-5, group_size, nbg)
            dtypes = (x.dtype, weight.dtype, None if gate is None else np.dtype(z_dtype))
            assert_grads(got, want, ("dx", "dweight", "dz"), dtypes, dtype)
            monkeypatch.setattr(backend, "gated_impl", "v1")
            del kernel_names[:]
            y1 = ssmcore.gated_rms_norm(*args)
            old = ssmcore.gated_rms_norm_bwd(gpu(dy), *args)
            assert not any("2<" in n for n in kernel_names), kernel_names
            assert_close(host(y), f64(host(y1)), dtype, name="y v2 vs v1")
            for name, a, b in zip(("dx", "dweight", "dz"), got, old):
                if b is not None:
                    scale = max(1.0, float(np.abs(f64(host(b))).max()))
                    assert_close(host(a), f64(host(b)), dtype, atol=TOL[dtype][1] * scale * 2,
                                 rtol=TOL[dtype][0] * 2, name=f"{name} v2 vs v1")


def test_gated_impl_knob(monkeypatch):
    from ssmcore.backends.cupy import norm as backend

    monkeypatch.setattr(backend, "gated_impl", None)
    monkeypatch.setenv("SSMCORE_GATED_NORM", "v3")
    with pytest.raises(ValueError, match="^SSMCORE_GATED_NORM:"):
        ssmcore.gated_rms_norm_bwd(cupy.ones((2, 64), cupy.float32), cupy.ones((2, 64), cupy.float32),
                                   cupy.ones(64, cupy.float32))


def test_cuda_graph_capture_and_replay(rng):
    """Forward and backward of every norm captured on a side stream replay on new inputs."""
    shape, width = (4, 50, 256), 256
    names = ("x", "residual", "dy", "z")
    host_in = {n: randn(rng, shape, "bfloat16" if n != "residual" else "float32") for n in names}
    weight = randn(rng, width, "float32")
    g = {n: gpu(a) for n, a in host_in.items()}
    gw = gpu(weight)

    def step():
        y, s = ssmcore.rms_norm(g["x"], gw, None, g["residual"], prenorm=True, residual_in_fp32=True)
        ly = ssmcore.layer_norm(g["x"], gw, gw, g["residual"])
        grads = ssmcore.layer_norm_bwd(g["dy"], g["x"], gw, gw, g["residual"])
        gy = ssmcore.gated_rms_norm(g["x"], gw, g["z"], group_size=64)
        ggrads = ssmcore.gated_rms_norm_bwd(g["dy"], g["x"], gw, g["z"], group_size=64)
        return y, s, ly, grads, gy, ggrads

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for _ in range(2):  # compile and fill the memory pool outside the capture
            step()
        stream.synchronize()
        stream.begin_capture()
        y, s, ly, grads, gy, ggrads = step()
        graph = stream.end_capture()
    fresh = {n: randn(rng, shape, "bfloat16" if n != "residual" else "float32") for n in names}
    for n, a in fresh.items():
        g[n][...] = gpu(a)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    stream.synchronize()
    assert_close(host(y), reference.rms_norm(fresh["x"], weight, None, fresh["residual"]), "bfloat16", name="y")
    assert_close(host(s), f64(fresh["x"]) + f64(fresh["residual"]), "float32", name="s")
    assert_close(host(ly), reference.layer_norm(fresh["x"], weight, weight, fresh["residual"]), "bfloat16", name="ly")
    want = norm_grads("layer_norm", fresh["dy"], fresh["x"], weight, weight, fresh["residual"])
    assert_grads(grads, want, ("dx", "dweight", "dbias", "dresidual"),
                 (g["x"].dtype, np.float32, np.float32, np.float32), "bfloat16")
    assert_close(host(gy), reference.gated_rms_norm(fresh["x"], weight, fresh["z"], group_size=64), "bfloat16")
    want = gated_grads(fresh["dy"], fresh["x"], weight, fresh["z"], group_size=64)
    assert_grads(ggrads, want, ("dx", "dweight", "dz"), (g["x"].dtype, np.float32, g["z"].dtype), "bfloat16")


# --- the CPU backend -------------------------------------------------------------------------------


def test_matches_cpu_backend(rng):
    """Same inputs through the Numba backend: s bit for bit, y and gradients within tolerance."""
    x, residual = randn(rng, (33, 2560), "bfloat16"), randn(rng, (33, 2560), "float32")
    weight, dy = randn(rng, 2560, "float32"), randn(rng, (33, 2560), "bfloat16")
    y, s = ssmcore.rms_norm(gpu(x), gpu(weight), None, gpu(residual), prenorm=True, residual_in_fp32=True)
    cy, cs = cpu.rms_norm(x, weight, None, residual, 1e-5, True, True)
    np.testing.assert_array_equal(host(s), cs)
    assert_close(host(y), cy, "bfloat16", name="y vs CPU backend")
    got = ssmcore.rms_norm_bwd(gpu(dy), gpu(x), gpu(weight), None, gpu(residual))
    want = cpu.rms_norm_bwd(dy, x, weight, None, residual, 1e-5, None)
    assert_grads(got, want, ("dx", "dweight", "dbias", "dresidual"), (x.dtype, weight.dtype, None, residual.dtype),
                 "bfloat16")
