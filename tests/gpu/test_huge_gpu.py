"""Tensors of more than 2**31 elements on the GPU (int32 offsets would wrap): selective_scan,
causal_conv1d and ssd on one such problem give the same result as the same problem cut in two
along time, the second piece continuing from the first piece's final state (a state the ops
return and take). The cut is at a multiple of every chunk length, so both runs do the same math
up to the order of float32 sums; a wrapped offset would read or write the wrong rows and show up as
garbage, NaN or zeros far beyond that tolerance. Each test stays under ~30 s on an H200 and
needs about 40 GiB of GPU memory; float16 data (2 bytes per element, as bf16).
"""

from __future__ import annotations

import time

import pytest

import ssmcore

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
cupy = pytest.importorskip("cupy")

F16 = "float16"
STEP = 2**28  # elements generated / compared at a time (bounds the float32 temporaries)


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    cupy.get_default_memory_pool().free_all_blocks()


@pytest.fixture(autouse=True)
def _needs_memory():
    free, _total = cupy.cuda.runtime.memGetInfo()
    if free < 48 * 2**30:
        pytest.skip(f"needs ~48 GiB of free GPU memory, has {free / 2**30:.0f} GiB")


def _randn(shape, dtype, seed, scale=1.0, shift=0.0):
    rng = cupy.random.default_rng(seed)
    out = cupy.empty(shape, dtype)
    flat = out.reshape(-1)
    for i in range(0, flat.size, STEP):
        n = min(STEP, flat.size - i)
        flat[i:i + n] = (rng.standard_normal(n, dtype=cupy.float32) * scale + shift).astype(dtype)
    return out


def _compare(name, got, want, rtol):
    """max |got - want| / max |want| over the whole arrays, computed in float32 slabs."""
    assert got.shape == want.shape, (name, got.shape, want.shape)
    g = cupy.ascontiguousarray(got).reshape(-1)
    w = cupy.ascontiguousarray(want).reshape(-1)
    err, scale, nonfinite, same = 0.0, 0.0, 0, True
    for i in range(0, g.size, STEP):
        a = g[i:i + STEP].astype(cupy.float32)
        b = w[i:i + STEP].astype(cupy.float32)
        nonfinite += int((~cupy.isfinite(a)).sum())
        err = max(err, float(cupy.abs(a - b).max()))
        scale = max(scale, float(cupy.abs(b).max()))
        same = same and bool((a == b).all())
    rel = err / max(scale, 1e-30)
    print(f"{name}: {g.size} elements ({g.size / 2**31:.4f} x 2**31), rel max err {rel:.2e}, bitwise equal {same}")
    assert nonfinite == 0, f"{name}: {nonfinite} non-finite values"
    assert scale > 0, f"{name}: all zeros"
    assert rel <= rtol, f"{name}: rel max err {rel:.2e} > {rtol}"


def _elapsed(start, name):
    t = time.perf_counter() - start
    print(f"{name}: {t:.1f} s")


def test_selective_scan_beyond_int32():
    start = time.perf_counter()
    batch, channels, n, length = 1, 2048, 4, 2**20 + 2  # 2**31 + 4096 elements in u, delta, z, out
    cut = 3 * 2**18  # a multiple of every chunk length the kernels use
    assert batch * channels * length > 2**31
    u = _randn((batch, channels, length), F16, 1)
    delta = _randn((batch, channels, length), F16, 2, 0.5)
    z = _randn((batch, channels, length), F16, 3)
    A = -(cupy.random.default_rng(4).random((channels, n), dtype=cupy.float32) + 0.5)
    Bm = _randn((batch, n, length), F16, 5)
    Cm = _randn((batch, n, length), F16, 6)
    D = _randn((channels,), cupy.float32, 7)
    bias = _randn((channels,), cupy.float32, 8, 0.3)
    kw = dict(D=D, delta_bias=bias, delta_softplus=True)
    whole, last = ssmcore.selective_scan(u, delta, A, Bm, Cm, z=z, return_last_state=True, **kw)
    cupy.cuda.Device().synchronize()
    t = slice(None, cut), slice(cut, None)
    first, mid = ssmcore.selective_scan(u[..., t[0]], delta[..., t[0]], A, Bm[..., t[0]], Cm[..., t[0]],
                                        z=z[..., t[0]], return_last_state=True, **kw)
    second, last2 = ssmcore.selective_scan(u[..., t[1]], delta[..., t[1]], A, Bm[..., t[1]], Cm[..., t[1]],
                                           z=z[..., t[1]], initial_state=mid, return_last_state=True, **kw)
    _compare("scan out[:cut]", whole[..., t[0]], first, 1e-2)
    _compare("scan out[cut:]", whole[..., t[1]], second, 1e-2)
    _compare("scan last_state", last, last2, 1e-3)
    _elapsed(start, "selective_scan")


@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_causal_conv1d_beyond_int32(layout):
    start = time.perf_counter()
    batch, channels, length, width = 2, 1024, 2**20 + 2, 4  # 2**31 + 4096 elements
    cut = 2**19 + 1024
    if layout == "contiguous":
        x = _randn((batch, channels, length), F16, 11)
    else:
        x = _randn((batch, length, channels), F16, 11).transpose(0, 2, 1)
    weight = _randn((channels, width), F16, 12)
    bias = _randn((channels,), F16, 13)
    whole, final = ssmcore.causal_conv1d(x, weight, bias, "silu", return_final_states=True)
    first, mid = ssmcore.causal_conv1d(x[..., :cut], weight, bias, "silu", return_final_states=True)
    second, final2 = ssmcore.causal_conv1d(x[..., cut:], weight, bias, "silu", initial_states=mid,
                                           return_final_states=True)
    cupy.cuda.Device().synchronize()
    _compare(f"conv {layout} out[:cut]", whole[..., :cut], first, 2e-3)
    _compare(f"conv {layout} out[cut:]", whole[..., cut:], second, 2e-3)
    _compare(f"conv {layout} final_states", final, final2, 0.0)
    _elapsed(start, f"causal_conv1d {layout}")


def test_ssd_beyond_int32():
    start = time.perf_counter()
    batch, length, heads, headdim, groups, n = 1, 2**21 + 256, 16, 64, 1, 16  # 2**31 + 262144 elements in x
    cut = 2**20 + 2**19  # a multiple of any chunk size up to 2**19
    x = _randn((batch, length, heads, headdim), F16, 21)
    dt = _randn((batch, length, heads), cupy.float32, 22, 0.5, -1.0)
    A = -(cupy.random.default_rng(23).random(heads, dtype=cupy.float32) + 0.5)
    Bm = _randn((batch, length, groups, n), F16, 24)
    Cm = _randn((batch, length, groups, n), F16, 25)
    D = _randn((heads,), cupy.float32, 26)
    kw = dict(chunk_size=256, D=D, dt_softplus=True, return_final_states=True)
    whole, final = ssmcore.ssd(x, dt, A, Bm, Cm, **kw)
    first, mid = ssmcore.ssd(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], Cm[:, :cut], **kw)
    second, final2 = ssmcore.ssd(x[:, cut:], dt[:, cut:], A, Bm[:, cut:], Cm[:, cut:], initial_states=mid, **kw)
    cupy.cuda.Device().synchronize()
    _compare("ssd out[:cut]", whole[:, :cut], first, 1e-2)
    _compare("ssd out[cut:]", whole[:, cut:], second, 1e-2)
    _compare("ssd final_states", final, final2, 1e-3)
    _elapsed(start, "ssd")


def test_ssd_backward_beyond_int32():
    """The backward too: 2**31 + ... elements in x, dout and dx; compared with two batch pieces."""
    start = time.perf_counter()
    batch, length, heads, headdim, n = 2, 2**20 + 128, 16, 64, 16
    x = _randn((batch, length, heads, headdim), F16, 31)
    dout = _randn((batch, length, heads, headdim), F16, 32)
    dt = _randn((batch, length, heads), cupy.float32, 33, 0.5, -1.0)
    A = -(cupy.random.default_rng(34).random(heads, dtype=cupy.float32) + 0.5)
    Bm = _randn((batch, length, 1, n), F16, 35)
    Cm = _randn((batch, length, 1, n), F16, 36)
    whole = ssmcore.ssd_bwd(dout, x, dt, A, Bm, Cm, chunk_size=256, dt_softplus=True)
    second = ssmcore.ssd_bwd(dout[1:], x[1:], dt[1:], A, Bm[1:], Cm[1:], chunk_size=256, dt_softplus=True)
    cupy.cuda.Device().synchronize()
    _compare("ssd_bwd dx[1]", whole.dx[1:], second.dx, 1e-2)
    _compare("ssd_bwd ddt[1]", whole.ddt[1:], second.ddt, 1e-2)
    _compare("ssd_bwd dB[1]", whole.dB[1:], second.dB, 1e-2)
    _elapsed(start, "ssd_bwd")
