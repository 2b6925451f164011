"""CPU benchmark suite (Numba backend): every op forward and forward+backward.

    pytest bench -m cpu --benchmark-group-by=group

Shapes are scaled to a laptop-class CPU; the full-size Mamba-1 scan against a
PyTorch loop is ``ssmcore bench-cpu``.
"""

import numpy as np
import pytest

import ssmcore

F32 = np.float32


def _randn(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


def _scan_inputs(rng, b=2, d=512, l=1024, n=16):
    return dict(
        u=_randn(rng, b, d, l), delta=_randn(rng, b, d, l, scale=0.5), A=-np.exp(_randn(rng, d, n, scale=0.5)),
        B=_randn(rng, b, n, l), C=_randn(rng, b, n, l), D=_randn(rng, d), z=_randn(rng, b, d, l),
        delta_bias=_randn(rng, d, scale=0.1), delta_softplus=True,
    )


@pytest.mark.benchmark(group="selective_scan")
def test_selective_scan_fwd(benchmark, rng):
    x = _scan_inputs(rng)
    ssmcore.selective_scan(**x)
    benchmark(ssmcore.selective_scan, **x)


@pytest.mark.benchmark(group="selective_scan")
def test_selective_scan_fwd_bwd(benchmark, rng):
    x = _scan_inputs(rng)
    dout = _randn(rng, *x["u"].shape)

    def step():
        ssmcore.selective_scan(**x)
        return ssmcore.selective_scan_bwd(dout, **x)

    step()
    benchmark(step)


def _ssd_inputs(rng, b=1, l=1024, h=8, p=64, n=64):
    return dict(
        x=_randn(rng, b, l, h, p), dt=_randn(rng, b, l, h, scale=0.5), A=-np.exp(_randn(rng, h, scale=0.5)),
        B=_randn(rng, b, l, 1, n), C=_randn(rng, b, l, 1, n), D=_randn(rng, h), dt_bias=_randn(rng, h, scale=0.1),
        dt_softplus=True, chunk_size=256,
    )


@pytest.mark.benchmark(group="ssd")
def test_ssd_fwd(benchmark, rng):
    x = _ssd_inputs(rng)
    ssmcore.ssd(**x)
    benchmark(ssmcore.ssd, **x)


@pytest.mark.benchmark(group="ssd")
def test_ssd_fwd_bwd(benchmark, rng):
    x = _ssd_inputs(rng)
    dout = _randn(rng, *x["x"].shape)

    def step():
        ssmcore.ssd(**x)
        return ssmcore.ssd_bwd(dout, **x)

    step()
    benchmark(step)


@pytest.mark.benchmark(group="causal_conv1d")
def test_causal_conv1d_fwd(benchmark, rng):
    x, w, bias = _randn(rng, 2, 1536, 2048), _randn(rng, 1536, 4), _randn(rng, 1536)
    ssmcore.causal_conv1d(x, w, bias, activation="silu")
    benchmark(ssmcore.causal_conv1d, x, w, bias, activation="silu")


@pytest.mark.benchmark(group="causal_conv1d")
def test_causal_conv1d_fwd_bwd(benchmark, rng):
    x, w, bias = _randn(rng, 2, 1536, 2048), _randn(rng, 1536, 4), _randn(rng, 1536)
    dout = _randn(rng, *x.shape)

    def step():
        ssmcore.causal_conv1d(x, w, bias, activation="silu")
        return ssmcore.causal_conv1d_bwd(dout, x, w, bias, activation="silu")

    step()
    benchmark(step)


@pytest.mark.benchmark(group="decode")
def test_selective_state_update_heads(benchmark, rng):
    b, h, p, n = 8, 24, 64, 128
    state = _randn(rng, b, h, p, n)
    args = dict(
        x=_randn(rng, b, h, p), dt=_randn(rng, b, h, p, scale=0.5),
        A=np.broadcast_to(-np.exp(_randn(rng, h, 1, 1)), (h, p, n)),
        B=_randn(rng, b, 1, n), C=_randn(rng, b, 1, n), D=_randn(rng, h, p), dt_softplus=True,
    )
    ssmcore.selective_state_update(state, **args)
    benchmark(ssmcore.selective_state_update, state, **args)


@pytest.mark.benchmark(group="norm")
def test_fused_add_rms_norm(benchmark, rng):
    x, res, w = _randn(rng, 2048, 2560), _randn(rng, 2048, 2560), _randn(rng, 2560)
    ssmcore.rms_norm(x, w, residual=res, prenorm=True, residual_in_fp32=True)
    benchmark(ssmcore.rms_norm, x, w, residual=res, prenorm=True, residual_in_fp32=True)


@pytest.mark.benchmark(group="norm")
def test_rms_norm_fwd_bwd(benchmark, rng):
    x, w = _randn(rng, 2048, 2560), _randn(rng, 2560)
    dy = _randn(rng, 2048, 2560)

    def step():
        ssmcore.rms_norm(x, w)
        return ssmcore.rms_norm_bwd(dy, x, w)

    step()
    benchmark(step)


# --- sweeps over L and N (time vs L plots in bench/report.py) and the PERFORMANCE.md CPU shape ---------


@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("length", [512, 2048, 8192])
@pytest.mark.benchmark(group="selective_scan fwd sweep")
def test_selective_scan_sweep(benchmark, rng, length, n):
    x = _scan_inputs(rng, b=1, d=256, l=length, n=n)
    ssmcore.selective_scan(**x)
    benchmark.pedantic(ssmcore.selective_scan, kwargs=x, rounds=3)
    benchmark.extra_info.update(sweep="scan", L=length, N=n)


@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("length", [512, 2048, 8192])
@pytest.mark.benchmark(group="ssd fwd sweep")
def test_ssd_sweep(benchmark, rng, length, n):
    x = _ssd_inputs(rng, b=1, l=length, h=4, p=64, n=n)
    ssmcore.ssd(**x)
    benchmark.pedantic(ssmcore.ssd, kwargs=x, rounds=3)
    benchmark.extra_info.update(sweep="ssd", L=length, N=n)


@pytest.mark.benchmark(group="selective_scan")
def test_selective_scan_fwd_performance_shape(benchmark, rng):
    # docs/PERFORMANCE.md CPU row: B2 D1536 L2048 N16 (target <= 120 ms on this machine).
    x = _scan_inputs(rng, b=2, d=1536, l=2048, n=16)
    ssmcore.selective_scan(**x)
    benchmark.pedantic(ssmcore.selective_scan, kwargs=x, rounds=3)
    benchmark.extra_info.update(target_us=120e3)
