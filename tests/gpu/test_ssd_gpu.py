"""ssd forward on the GPU (CuPy backend, tensor-core chunked form) against the float64 recurrence
(ssmcore.reference) and the Numba CPU backend.

Covers float32/float16/bfloat16, the internal chunk lengths 64/128/256 (from chunk_size), L not a
multiple of the chunk, groups, state sizes, D per head or per channel, z, dt_bias, softplus,
dt_limit, initial_states, packed sequences (seq_idx, also unsorted), cu_seqlens varlen states,
final states and state_dtype, batch 1 and > 1, a CUDA-graph capture + replay, inputs untouched,
and the mma fragment layouts alone. Shapes with ids ``big*`` are skipped in the CPU emulator
(its plugin swaps cupy for a NumPy shim).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import DTYPES, f64, randn

import ssmcore
from ssmcore import reference
from ssmcore.backends import numba as cpu

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

# Relative to the largest |reference| value: fp32 3xTF32 is close to fp32; bf16/f16 round the
# decay-weighted operands to 16 bits (as the reference package does).
REL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}


def emulated():
    """True in the CPU emulator (its plugin swaps this module's cupy for a NumPy shim)."""
    return not hasattr(cupy, "cuda")


def gpu(a):
    return None if a is None else cupy.asarray(a)


def host(a):
    return None if a is None else np.asarray(cupy.asnumpy(a), dtype=np.float64)


def check(name, got, want, dtype, scale=1.0):
    got, want = host(got), f64(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max() if got.size else 0.0
    ref = max(np.abs(want).max() if want.size else 0.0, 1e-6)
    tol = REL[dtype] * scale
    assert err <= tol * ref, f"{name}: max |err| {err:.3g} > {tol:.1e} * max |ref| {ref:.3g} ({dtype})"


def make(rng, batch, length, heads, headdim, groups, dstate, dtype, *, D="head", z=True, bias=True,
         initial=False, seq=None):
    """Keyword arguments (NumPy) for ssd."""
    kw = dict(
        x=randn(rng, (batch, length, heads, headdim), dtype),
        dt=(rng.uniform(-3.0, 0.0, (batch, length, heads))).astype(DTYPES[dtype]),
        A=-np.exp(randn(rng, (heads,), "float32", 0.5)),
        B=randn(rng, (batch, length, groups, dstate), dtype, 0.5),
        C=randn(rng, (batch, length, groups, dstate), dtype, 0.5),
    )
    if D == "head":
        kw["D"] = randn(rng, (heads,), "float32")
    elif D == "channel":
        kw["D"] = randn(rng, (heads, headdim), "float32")
    if z:
        kw["z"] = randn(rng, (batch, length, heads, headdim), dtype)
    if bias:
        kw["dt_bias"] = randn(rng, (heads,), "float32", 0.5)
    if initial:
        kw["initial_states"] = randn(rng, (batch, heads, headdim, dstate), "float32")
    if seq is not None:
        kw["seq_idx"] = seq
    return kw


def run_gpu(kw, **options):
    return ssmcore.ssd(**{k: gpu(v) for k, v in kw.items()}, **options)


def as_list(r):
    return list(r) if isinstance(r, tuple) else [r]


BASE = [
    # (batch, L, H, P, G, N, dtype, chunk_size)
    (2, 37, 2, 16, 1, 16, "float32", 64),
    (1, 300, 2, 24, 2, 32, "float32", 128),
    (2, 130, 2, 16, 1, 16, "bfloat16", 64),
    (1, 1, 2, 8, 1, 16, "float16", 256),
    (1, 300, 4, 32, 2, 32, "float16", 256),
    (2, 200, 2, 20, 2, 24, "bfloat16", 100),  # chunk 100 -> internal 128; P % 8 != 0: no 16-byte staging
    pytest.param(2, 1000, 8, 64, 2, 128, "bfloat16", 256, id="big1"),
    pytest.param(2, 777, 8, 80, 1, 64, "float32", 128, id="big2"),
    pytest.param(1, 2048, 4, 64, 1, 256, "float16", 64, id="big3"),
    pytest.param(3, 513, 6, 64, 3, 16, "bfloat16", 256, id="big4"),
]


@pytest.fixture(autouse=True)
def _skip_big_in_emulator(request):
    if emulated() and "[big" in request.node.name:
        pytest.skip("big shape: device only")


@pytest.mark.parametrize("batch,length,heads,headdim,groups,dstate,dtype,chunk", BASE)
def test_forward_vs_reference(rng, batch, length, heads, headdim, groups, dstate, dtype, chunk):
    kw = make(rng, batch, length, heads, headdim, groups, dstate, dtype, D="channel" if length % 2 else "head",
              initial=True)
    before = {k: np.array(v, copy=True) for k, v in kw.items()}
    gkw = {k: gpu(v) for k, v in kw.items()}
    out, final = ssmcore.ssd(**gkw, chunk_size=chunk, dt_softplus=True, return_final_states=True)
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    assert out.dtype == kw["x"].dtype and final.dtype == np.float32
    check("out", out, ref_out, dtype)
    check("final", final, ref_final, dtype)
    for k, v in gkw.items():  # inputs untouched
        assert np.array_equal(host(v), f64(before[k])), k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_vs_numba_bare(rng, dtype):
    """No D, z, dt_bias, softplus or initial states; against the CPU backend too."""
    kw = make(rng, 2, 150, 2, 16, 2, 16, dtype, D=None, z=False, bias=False)
    kw["dt"] = np.abs(kw["dt"].astype(np.float32)).astype(DTYPES[dtype]) * 0.1
    out, final = run_gpu(kw, chunk_size=64, return_final_states=True)
    cpu_out, cpu_final = cpu.ssd(**kw, return_final_states=True)
    ref_out, ref_final = reference.ssd(**kw, return_final_states=True)
    check("out vs ref", out, ref_out, dtype)
    check("final vs ref", final, ref_final, dtype)
    check("out vs numba", out, cpu_out, dtype, 1.5)


def test_dt_limit_and_float32_dt(rng):
    kw = make(rng, 1, 90, 2, 16, 1, 16, "bfloat16")
    kw["dt"] = kw["dt"].astype(np.float32)
    out = run_gpu(kw, chunk_size=64, dt_softplus=True, dt_limit=(0.05, 0.3))
    check("out", out, reference.ssd(**kw, dt_softplus=True, dt_limit=(0.05, 0.3)), "bfloat16")


@pytest.mark.parametrize("dtype,scale", [("float32", 1), ("bfloat16", 1), pytest.param("bfloat16", 4, id="big5"),
                                         pytest.param("float32", 4, id="big6")])
def test_seq_idx_packed(rng, dtype, scale):
    """Packed sequences, boundaries inside and on chunk edges, one unsorted (a change resets)."""
    length = 200 * scale
    seq = np.zeros((2, length), np.int32)
    seq[0, 50:64] = 1
    seq[0, 64:150] = 2
    seq[0, 150 * scale:] = 3
    seq[1, 10:130] = 5
    seq[1, 130:] = 0  # back to an earlier id: still a new sequence
    seq[1, 700:] = 6
    heads, headdim, dstate = (2, 16, 16) if scale == 1 else (4, 72, 128)
    kw = make(rng, 2, length, heads, headdim, 2, dstate, dtype, initial=True, seq=seq)
    out, final = run_gpu(kw, chunk_size=64 * scale, dt_softplus=True, return_final_states=True)
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check("out", out, ref_out, dtype)
    check("final", final, ref_final, dtype)


@pytest.mark.parametrize("state_dtype,big", [(None, False), ("float16", False), ("bfloat16", False),
                                             pytest.param(None, True, id="big7")])
def test_cu_seqlens_varlen_states(rng, state_dtype, big):
    if big:
        cu = np.array([0, 5, 300, 301, 700, 1025], np.int32)
        kw = make(rng, 1, 1025, 4, 64, 2, 128, "float32", initial=True)
    else:
        cu = np.array([0, 5, 64, 65, 140, 201], np.int32)
        kw = make(rng, 1, 201, 2, 16, 2, 16, "float32", initial=True)
    sd = None if state_dtype is None else DTYPES[state_dtype]
    out, final, varlen = run_gpu(dict(kw, cu_seqlens=cu), chunk_size=256 if big else 64, dt_softplus=True,
                                 return_final_states=True, return_varlen_states=True, state_dtype=sd)
    ref_out, ref_final, ref_varlen = reference.ssd(**kw, cu_seqlens=cu, dt_softplus=True,
                                                   return_final_states=True, return_varlen_states=True)
    want_dtype = np.float32 if sd is None else np.dtype(sd)
    assert final.dtype == want_dtype and varlen.dtype == want_dtype
    rel = "float32" if state_dtype is None else ("float16" if state_dtype == "float16" else "bfloat16")
    check("out", out, ref_out, "float32")
    check("final", final, ref_final, rel)
    check("varlen", varlen, ref_varlen, rel)


def test_chunk_size_does_not_matter(rng):
    kw = make(rng, 1, 300, 2, 16, 1, 32, "float32", initial=True)
    outs = [host(run_gpu(kw, chunk_size=c, dt_softplus=True)) for c in (64, 128, 256)]
    for o in outs[1:]:
        check("chunk", o, outs[0], "float32")


def test_mma_fragment_layouts(rng):
    from ssmcore.backends.cupy import _runtime

    import ml_dtypes

    for t, rd in (("bf16_t", ml_dtypes.bfloat16), ("half_t", np.float16), ("float", None)):
        A = randn(rng, (16, 16), "float32")
        Bm = randn(rng, (16, 8), "float32")
        C = cupy.zeros((16, 8), cupy.float32)
        _runtime.launch(_runtime.function("ssd", f"ssd_mma_selftest<{t}>"), (1,), (32,), (gpu(A), gpu(Bm), C))
        if rd is None:
            want = f64(A) @ f64(Bm)
            tol = 1e-5
        else:
            want = f64(A.astype(rd)) @ f64(Bm.astype(rd))
            tol = 1e-5
        err = np.abs(host(C) - want).max()
        assert err <= tol * np.abs(want).max(), (t, err)


def test_cuda_graph_capture_replay(rng):
    kw = make(rng, 2, 300, 4, 64, 1, 64, "bfloat16", initial=True)
    gkw = {k: gpu(v) for k, v in kw.items()}
    ssmcore.ssd(**gkw, dt_softplus=True)  # compile outside the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        out = ssmcore.ssd(**gkw, dt_softplus=True)
        graph = stream.end_capture()
    fresh = make(rng, 2, 300, 4, 64, 1, 64, "bfloat16", initial=True)
    for k, v in fresh.items():
        gkw[k][...] = gpu(v)
    cupy.cuda.Device().synchronize()  # the copies ran on the null stream; the replay's stream does not wait for it
    graph.launch(stream)
    stream.synchronize()
    check("replay", out, reference.ssd(**fresh, dt_softplus=True), "bfloat16")


@pytest.mark.parametrize("shape", [
    (1, 100, 2, 16, 1, 32, "bfloat16", 64),
    (2, 203, 4, 16, 2, 40, "float16", 128),
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), id="big8"),
    pytest.param((1, 333, 3, 80, 1, 64, "float32", 128), id="big9"),
    pytest.param((1, 517, 6, 64, 3, 256, "bfloat16", 256), id="big10"),
])
def test_kernel_paths_agree(rng, monkeypatch, shape):
    """SSMCORE_SSD_FWD v1, v2, v3, v4 and v5 (same math and rounding points, rescheduled): the same outputs and
    final states (v3 bitwise equal to v2, v4 within rounding of v3, v5 of v4), and v3 / v4 / v5 right against
    the reference, with packed sequences and initial states."""
    from ssmcore.backends.cupy import state_space_duality as S

    batch, length, heads, headdim, groups, dstate, dtype, chunk = shape
    seq = np.sort(rng.integers(0, 3, (batch, length)), axis=1).astype(np.int64)
    kw = make(rng, batch, length, heads, headdim, groups, dstate, dtype, initial=True, seq=seq)
    res = {}
    for path in ("v1", "v2", "v3", "v4", "v5"):
        monkeypatch.setattr(S, "fwd_path", path)
        res[path] = [host(a) for a in run_gpu(kw, chunk_size=chunk, dt_softplus=True, return_final_states=True)]
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check("out v3", res["v3"][0], ref_out, dtype)
    check("final v3", res["v3"][1], ref_final, dtype)
    for i in range(2):
        scale = max(np.abs(res["v1"][i]).max(), 1e-6)
        assert np.abs(res["v2"][i] - res["v1"][i]).max() <= 1e-5 * scale
        np.testing.assert_array_equal(res["v3"][i], res["v2"][i])
    # v4: ldmatrix fragments and __expf in chunk_scan: within rounding of v3, not bitwise
    check("out v4", res["v4"][0], ref_out, dtype)
    check("final v4", res["v4"][1], ref_final, dtype)
    for i in range(2):
        scale = max(np.abs(res["v3"][i]).max(), 1e-6)
        assert np.abs(res["v4"][i] - res["v3"][i]).max() <= REL[dtype] / 3 * scale, ("v4 vs v3", i)
    # v5: cp.async staging, the same operand build (exponent as one FFMA): within rounding of v4
    check("out v5", res["v5"][0], ref_out, dtype)
    np.testing.assert_array_equal(res["v5"][1], res["v4"][1])  # same states kernels
    scale = max(np.abs(res["v4"][0]).max(), 1e-6)
    assert np.abs(res["v5"][0] - res["v4"][0]).max() <= REL[dtype] / 3 * scale, "v5 vs v4"


def _packed_views(kw, offset):
    """x, z, B, C, dt as strided views of one (B, L, W) buffer laid out like Mamba-2's in_proj output
    (z | x | B | C | dt, rows of W elements), starting `offset` elements into each row."""
    x, z, Bm, Cm, dt = (gpu(kw[k]) for k in ("x", "z", "B", "C", "dt"))
    batch, length, heads, headdim = x.shape
    ngroups, dstate = Bm.shape[2], Bm.shape[3]
    hp, gn = heads * headdim, ngroups * dstate
    width = offset + 2 * hp + 2 * gn + 8 * heads + 24
    buf = cupy.zeros((batch, length, width), x.dtype)
    dbuf = cupy.zeros((batch, length, width), dt.dtype)
    views = {}
    o = offset
    for name, a, n in (("z", z, hp), ("x", x, hp), ("B", Bm, gn), ("C", Cm, gn)):
        v = buf[:, :, o:o + n]
        v[...] = a.reshape(batch, length, n)
        views[name] = v.reshape(a.shape)
        o += n
    dv = dbuf[:, :, o:o + heads]
    dv[...] = dt
    views["dt"] = dv
    return views


@pytest.mark.parametrize("dtype,offset", [("bfloat16", 0), ("float16", 8), ("bfloat16", 4), ("float32", 0)])
def test_strided_inputs(rng, monkeypatch, dtype, offset):
    """x / z / B / C / dt as strided views of one in_proj-like buffer (no copies on the v4 path when rows
    are 16-byte aligned; offset 4 is not: copies), same results as contiguous inputs; also v3 and v7 on views."""
    from ssmcore.backends.cupy import state_space_duality as S

    kw = make(rng, 2, 70, 2, 16, 1, 16, dtype, initial=True)
    views = _packed_views(kw, offset)
    assert not views["x"].flags.c_contiguous
    if dtype != "float32":
        aligned = offset % 8 == 0
        for name in ("x", "z", "B", "C"):
            assert (S._rows_view(views[name], vec16=True) is views[name]) == aligned, name
            assert S._v4_ok(views[name]) == aligned, name
    assert S._rows_view(views["dt"]) is views["dt"]
    gkw = {k: gpu(v) for k, v in kw.items()}
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    for path in ("v7", "v5", "v4", "v3") if dtype != "float32" else ("v4",):
        monkeypatch.setattr(S, "fwd_path", path)
        want = [host(a) for a in ssmcore.ssd(**gkw, chunk_size=64, dt_softplus=True, return_final_states=True)]
        got = [host(a) for a in ssmcore.ssd(**dict(gkw, **views), chunk_size=64, dt_softplus=True,
                                            return_final_states=True)]
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        check("out", got[0], ref_out, dtype)
        check("final", got[1], ref_final, dtype)


def test_varlen_states_16bit(rng):
    """bf16 with cu_seqlens varlen states: the v4 path keeps fp32 chunk-start states for them (chunk_scan
    reads fp32 starts: ssd_chunk_scan_v4<T, float>), and matches the reference."""
    cu = np.array([0, 5, 64, 65, 140], np.int32)
    kw = make(rng, 1, 140, 2, 16, 1, 16, "bfloat16", initial=True)
    out, final, varlen = run_gpu(dict(kw, cu_seqlens=cu), chunk_size=64, dt_softplus=True,
                                 return_final_states=True, return_varlen_states=True)
    ref_out, ref_final, ref_varlen = reference.ssd(**kw, cu_seqlens=cu, dt_softplus=True,
                                                   return_final_states=True, return_varlen_states=True)
    check("out", out, ref_out, "bfloat16")
    check("final", final, ref_final, "bfloat16")
    check("varlen", varlen, ref_varlen, "bfloat16")


def _states_inputs(rng, shape, initial, packed):
    """(kw, kw on the GPU, Q, the launcher's prepared inputs, (dtp, dacs, seg)) for the chunk-states tests (v6, v8): random inputs of
    ``shape`` (batch, length, heads, headdim, groups, dstate, dtype, chunk), packed sequences if asked."""
    from ssmcore.backends.cupy import state_space_duality as S

    batch, length, heads, headdim, groups, dstate, dtype, chunk = shape
    seq = np.sort(rng.integers(0, 3, (batch, length)), axis=1).astype(np.int64) if packed else None
    kw = make(rng, batch, length, heads, headdim, groups, dstate, dtype, initial=initial, seq=seq)
    gkw = {k: gpu(v) for k, v in kw.items()}
    Q = S._internal_chunk(chunk)
    prepared = S._prepare(gkw["x"], gkw["dt"], gkw["A"], gkw["B"], gkw["C"], gkw.get("D"), gkw.get("z"),
                          gkw.get("dt_bias"), gkw.get("initial_states"))
    seqk = S._seq_ids(gkw.get("seq_idx"), None, length)
    _, dtk, Ak, _, _, _, _, bk, _ = prepared
    return kw, gkw, Q, prepared, S._chunk_cumsum(dtk, Ak, bk, True, (0.0, np.inf), seqk, Q)


@pytest.mark.parametrize("shape,initial,packed", [
    ((1, 100, 2, 16, 1, 32, "bfloat16", 64), True, True),
    ((2, 150, 2, 72, 1, 16, "float16", 64), False, True),  # 2 p-tiles (the second partial), 3 chunks
    ((1, 200, 2, 8, 2, 72, "bfloat16", 128), True, False),  # 2 n-tiles, groups, L not a multiple of Q
    ((1, 300, 1, 16, 1, 16, "float16", 256), True, True),  # 4 slabs per chunk, last chunk partial
    ((1, 150, 1, 8, 1, 128, "bfloat16", 64), True, True),  # N 128: v6's 64 x 128 tiles (8 warps)
    pytest.param((2, 1000, 8, 64, 2, 128, "bfloat16", 256), True, True, id="big11"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), False, False, id="big12"),
    pytest.param((1, 2049, 4, 80, 1, 256, "float16", 64), True, True, id="big13"),
])
def test_fused_states_v6(rng, monkeypatch, shape, initial, packed):
    """SSMCORE_SSD_FWD=v6 / v6s (ssd_chunk_states_v6: chunk_states and the state passing in one kernel,
    chained over chunks; 64 x 128 tiles, N % 128 == 0 only; v6 also does the cumsum's work): the cumsum's buffers, the
    reference's output and final state, and v5's (same math and rounding points: the chunk-start states and
    final states equal up to the last bit of an fma)."""
    from ssmcore.backends.cupy import state_space_duality as S

    batch, length, heads, headdim, groups, dstate, dtype, chunk = shape
    kw, gkw, Q, (xk, dtk, Ak, Bk, Ck, Dk, zk, bk, ik), (dtp, dacs, seg) = _states_inputs(rng, shape, initial, packed)
    monkeypatch.setattr(S, "fwd_path", "v5")
    states = S._chunk_states(xk, Bk, dtp, dacs, seg, Q)
    final5, starts5 = S._state_passing_v4(states, dacs, seg, ik, Q, xk.dtype)
    f5, s5 = host(final5), host(starts5)
    paths = ("v6", "v6s") if dstate % 128 == 0 else ()
    if not paths:  # v6 runs only with 64 x 128 tiles (N % 128 == 0), see state_space_duality.py
        monkeypatch.setattr(S, "fwd_path", "v6")
        assert not S._states_v6_ok(xk, zk, Bk, Ck, ik, Q)
        return
    for path in paths:
        monkeypatch.setattr(S, "fwd_path", path)
        assert S._states_v6_ok(xk, zk, Bk, Ck, ik, Q)
        if path == "v6s":
            final6, starts6 = S._states_and_passing_v6(xk, Bk, dtp, dacs, seg, ik, Q)
        else:  # the kernel also does the cumsum's work and fills the buffers for chunk_scan
            bufs = S._cumsum_buffers(batch, length, heads, Q, seqk)
            for a in bufs[:2]:
                a.fill(np.nan)
            if bufs[2] is not None:
                bufs[2].fill(-7)
            final6, starts6 = S._states_and_passing_v6(xk, Bk, *bufs, ik, Q,
                                                       (dtk, Ak, bk, True, (0.0, np.inf), seqk))
            for name, got, want in zip(("dtp", "dacs", "seg"), bufs, (dtp, dacs, seg)):
                if want is None:
                    assert got is None
                    continue
                g, w = host(got), host(want)
                assert np.abs(g - w).max() <= 1e-5 * max(np.abs(w).max(), 1.0), (name, path)
        f6, s6 = host(final6), host(starts6)
        assert np.abs(f6 - f5).max() <= 1e-5 * max(np.abs(f5).max(), 1e-6), ("final vs v4 passing", path)
        assert np.abs(s6 - s5).max() <= REL[dtype] / 10 * max(np.abs(s5).max(), 1e-6), ("starts vs v4", path)
    res, calls = {}, []
    fused = S._states_and_passing_v6
    monkeypatch.setattr(S, "_states_and_passing_v6", lambda *a: calls.append(S.fwd_path) or fused(*a))
    for path in ("v5",) + paths:
        monkeypatch.setattr(S, "fwd_path", path)
        res[path] = [host(a) for a in ssmcore.ssd(**gkw, chunk_size=chunk, dt_softplus=True,
                                                  return_final_states=True)]
    assert calls == list(paths)  # ssd took the fused kernel on the v6 paths only
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    for path in paths:
        check(f"out {path}", res[path][0], ref_out, dtype)
        check(f"final {path}", res[path][1], ref_final, dtype)
        for i in range(2):
            scale = max(np.abs(res["v5"][i]).max(), 1e-6)
            assert np.abs(res[path][i] - res["v5"][i]).max() <= REL[dtype] / 10 * scale, (path, "vs v5", i)


@pytest.mark.parametrize("dtype,offset", [("bfloat16", 0), ("float16", 8), ("bfloat16", 4)])
def test_fused_states_v6_strided_and_varlen(rng, monkeypatch, dtype, offset):
    """v6 on strided in_proj-like views (in place when 16-byte aligned, copies otherwise): the contiguous
    result; with cu_seqlens varlen states v6 falls back to v5's kernels (fp32 chunk-start states)."""
    from ssmcore.backends.cupy import state_space_duality as S

    monkeypatch.setattr(S, "fwd_path", "v6")
    kw = make(rng, 2, 70, 2, 16, 1, 16, dtype, initial=True)
    views = _packed_views(kw, offset)
    gkw = {k: gpu(v) for k, v in kw.items()}
    want = [host(a) for a in ssmcore.ssd(**gkw, chunk_size=64, dt_softplus=True, return_final_states=True)]
    got = [host(a) for a in ssmcore.ssd(**dict(gkw, **views), chunk_size=64, dt_softplus=True,
                                        return_final_states=True)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check("out", got[0], ref_out, dtype)
    check("final", got[1], ref_final, dtype)
    cu = np.array([0, 5, 64, 65, 140], np.int32)
    kv = make(rng, 1, 140, 2, 16, 1, 16, dtype, initial=True)
    out, final, varlen = run_gpu(dict(kv, cu_seqlens=cu), chunk_size=64, dt_softplus=True,
                                 return_final_states=True, return_varlen_states=True)
    ref = reference.ssd(**kv, cu_seqlens=cu, dt_softplus=True, return_final_states=True, return_varlen_states=True)
    for name, a, r in zip(("out", "final", "varlen"), (out, final, varlen), ref):
        check(name, a, r, dtype)


# (shape, path, options): SSMCORE_SSD_FWD=v7 (128-row tiles when Q >= 128) and v7m (64-row tiles)
_V7_ALL = dict(seq=True, initial=True, z=True, D="head")
_V7_BARE = dict(seq=False, initial=False, z=False, D="channel")


@pytest.mark.parametrize("shape,path,opts", [
    ((1, 100, 2, 16, 1, 32, "bfloat16", 64), "v7", _V7_ALL),  # Q 64: 64-row tiles, L not a multiple of Q
    ((1, 90, 2, 8, 1, 16, "float16", 128), "v7", _V7_BARE),  # 128-row tile, rows past L, D per channel, no z
    ((2, 203, 4, 16, 2, 40, "float16", 128), "v7m", _V7_ALL),  # groups, N 40 (2 K tiles, the 2nd partial)
    ((1, 300, 1, 16, 1, 16, "bfloat16", 256), "v7", _V7_ALL),  # 2 row tiles per chunk, partial last chunk
    ((1, 150, 2, 72, 1, 24, "bfloat16", 256), "v7m", _V7_BARE),  # 2 p tiles (the second partial)
    ((1, 100, 2, 16, 1, 32, "bfloat16", 64), "v7s", _V7_ALL),  # + ssd_chunk_states_v7, sequence starts
    ((1, 150, 2, 72, 1, 72, "float16", 128), "v7s", _V7_BARE),  # 2 p and 2 n tiles (the second ones partial)
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), "v7", _V7_ALL, id="big_v7a"),
    pytest.param((2, 700, 4, 64, 1, 128, "float16", 256), "v7m", _V7_BARE, id="big_v7b"),
    pytest.param((1, 517, 6, 64, 3, 256, "bfloat16", 256), "v7", _V7_BARE, id="big_v7c"),
    pytest.param((2, 1000, 8, 80, 2, 64, "float16", 128), "v7", _V7_ALL, id="big_v7d"),
    pytest.param((1, 2049, 4, 64, 1, 128, "bfloat16", 64), "v7", _V7_ALL, id="big_v7e"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), "v7", _V7_BARE, id="big_v7f"),
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), "v7s", _V7_ALL, id="big_v7g"),
    pytest.param((3, 4100, 16, 64, 1, 128, "float16", 256), "v7s", _V7_BARE, id="big_v7h"),
    pytest.param((1, 2049, 4, 80, 2, 256, "bfloat16", 64), "v7s", _V7_ALL, id="big_v7i"),
    # v7b / v7bm / v7bs: 16-bit C B^T tiles (bfloat16 inputs; float16 keeps fp32 C B^T)
    ((1, 100, 2, 16, 1, 32, "bfloat16", 64), "v7b", _V7_ALL),  # Q 64, sequence starts, L % Q != 0
    ((1, 300, 1, 16, 1, 16, "bfloat16", 256), "v7b", _V7_ALL),  # 128-row tiles, 2 per chunk, partial chunk
    ((1, 150, 2, 72, 1, 24, "bfloat16", 128), "v7bm", _V7_BARE),  # 64-row tiles, 2 p tiles, N 24
    ((1, 130, 2, 16, 1, 32, "bfloat16", 128), "v7bs", _V7_ALL),  # + ssd_chunk_states_v7
    ((1, 90, 2, 8, 1, 16, "float16", 128), "v7b", _V7_BARE),  # float16: fp32 C B^T (v7's kernel)
    ((1, 300, 2, 16, 1, 24, "bfloat16", 256), "v7b4", _V7_ALL),  # 4 stages, 128-row tiles
    ((1, 200, 2, 16, 1, 40, "bfloat16", 128), "v7bm4", _V7_BARE),  # 4 stages, 64-row tiles, N 40
    ((1, 90, 2, 8, 1, 16, "float16", 64), "v7bm4", _V7_ALL),  # float16: v7m's kernel (fp32 C B^T, 3 stages)
    ((1, 150, 4, 16, 2, 24, "bfloat16", 128), "v7bh", _V7_ALL),  # 2 heads per block, 2 groups
    ((1, 100, 2, 72, 1, 32, "bfloat16", 64), "v7bh4", _V7_BARE),  # 2 heads per block, 2 p tiles, 4 stages
    ((1, 90, 3, 16, 1, 16, "bfloat16", 128), "v7bh", _V7_ALL),  # 3 heads per group: 1 head per block
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), "v7b", _V7_ALL, id="big_v7b_a"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), "v7bm", _V7_BARE, id="big_v7b_b"),
    pytest.param((1, 2049, 4, 80, 2, 256, "bfloat16", 64), "v7bs", _V7_ALL, id="big_v7b_c"),
    pytest.param((1, 517, 6, 64, 3, 256, "bfloat16", 128), "v7b", _V7_BARE, id="big_v7b_d"),
    pytest.param((2, 1000, 8, 80, 2, 64, "float16", 256), "v7bs", _V7_ALL, id="big_v7b_e"),
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), "v7b4", _V7_ALL, id="big_v7b_f"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), "v7bm4", _V7_BARE, id="big_v7b_g"),
    pytest.param((1, 517, 6, 64, 3, 256, "bfloat16", 128), "v7b4", _V7_BARE, id="big_v7b_h"),
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), "v7bh", _V7_ALL, id="big_v7b_i"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), "v7bh4", _V7_BARE, id="big_v7b_j"),
    pytest.param((1, 517, 6, 64, 3, 256, "bfloat16", 128), "v7bh", _V7_ALL, id="big_v7b_k"),
    pytest.param((2, 1000, 8, 80, 2, 64, "float16", 256), "v7bh", _V7_ALL, id="big_v7b_l"),
])
def test_chunk_scan_v7(rng, monkeypatch, shape, path, opts):
    """SSMCORE_SSD_FWD=v7 / v7m / v7s (ssd_chunk_scan_v7: 3-stage cp.async pipeline, C B^T decayed in A-fragment
    registers; v7s also ssd_chunk_states_v7) and v7b / v7bm / v7bs / v7b4 / v7bm4 / v7bh / v7bh4 (the same with 16-bit
    C B^T tiles for bfloat16, one more rounding; 4 stages; 2 heads per block): the reference's output and final states, v5's within rounding (same
    math and rounding points: v7 / v7m run v5's states kernels, so bitwise v5's final states; v7s's states kernel
    rounds x w to T and runs the same mma sequence as v4's), the v7 kernel is the one that ran, and the 16-bit
    C B^T only where meant (bfloat16)."""
    from ssmcore.backends.cupy import state_space_duality as S

    batch, length, heads, headdim, groups, dstate, dtype, chunk = shape
    seq = np.sort(rng.integers(0, 3, (batch, length)), axis=1).astype(np.int64) if opts["seq"] else None
    kw = make(rng, batch, length, heads, headdim, groups, dstate, dtype, D=opts["D"], z=opts["z"],
              initial=opts["initial"], seq=seq)
    calls = []
    v7 = S._chunk_scan_v7
    monkeypatch.setattr(S, "_chunk_scan_v7", lambda *a: calls.append(S.fwd_path) or v7(*a))
    cb16 = []
    is16 = S._scan_v7_cb16
    monkeypatch.setattr(S, "_scan_v7_cb16", lambda a: cb16.append(is16(a)) or cb16[-1])
    hb = []
    heads_fn = S._scan_v7_heads
    monkeypatch.setattr(S, "_scan_v7_heads", lambda *a: hb.append(heads_fn(*a)) or hb[-1])
    res = {}
    for p in ("v5", path):
        monkeypatch.setattr(S, "fwd_path", p)
        res[p] = [host(a) for a in run_gpu(kw, chunk_size=chunk, dt_softplus=True, return_final_states=True)]
    assert calls == [path]
    assert cb16 == [path in S._V7B and dtype == "bfloat16"], cb16  # 16-bit C B^T only for v7b* with bfloat16
    two = path in ("v7bh", "v7bh4") and dtype == "bfloat16" and (heads // groups) % 2 == 0
    assert hb == [2 if two else 1], hb  # 2 heads per block only for v7bh* with bfloat16 and even heads per group
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check(f"out {path}", res[path][0], ref_out, dtype)
    check(f"final {path}", res[path][1], ref_final, dtype)
    if path in ("v7s", "v7bs"):
        scale = max(np.abs(res["v5"][1]).max(), 1e-6)
        assert np.abs(res[path][1] - res["v5"][1]).max() <= 1e-5 * scale, "v7s final vs v5"
    else:
        np.testing.assert_array_equal(res[path][1], res["v5"][1])  # same states kernels
    scale = max(np.abs(res["v5"][0]).max(), 1e-6)
    assert np.abs(res[path][0] - res["v5"][0]).max() <= REL[dtype] / 3 * scale, f"{path} vs v5"


@pytest.mark.parametrize("dtype,dstate,headdim,varlen", [
    ("float32", 16, 16, False),  # float32: v5's fp32 kernels
    ("bfloat16", 20, 16, False),  # N % 8 != 0: no 16-byte rows
    ("float16", 16, 12, False),  # P % 8 != 0
    ("bfloat16", 16, 16, True),  # varlen states: fp32 chunk-start states (ssd_chunk_scan_v4<T, float>)
])
def test_chunk_scan_v7_fallbacks(rng, monkeypatch, dtype, dstate, headdim, varlen):
    """Where ssd_chunk_scan_v7 does not apply, SSMCORE_SSD_FWD=v7 runs exactly what v5 runs (bitwise)."""
    from ssmcore.backends.cupy import state_space_duality as S

    kw = make(rng, 1, 70, 2, headdim, 1, dstate, dtype, initial=True)
    opts = dict(chunk_size=64, dt_softplus=True, return_final_states=True)
    if varlen:
        kw["cu_seqlens"] = np.array([0, 5, 64, 70], np.int32)
        opts["return_varlen_states"] = True
    calls = []
    v7 = S._chunk_scan_v7
    monkeypatch.setattr(S, "_chunk_scan_v7", lambda *a: calls.append(1) or v7(*a))
    res = {}
    for p in ("v5", "v7"):
        monkeypatch.setattr(S, "fwd_path", p)
        res[p] = [host(a) for a in run_gpu(kw, **opts)]
    assert calls == []
    for a, b in zip(res["v7"], res["v5"]):
        np.testing.assert_array_equal(a, b)
    ref_out = reference.ssd(**kw, **opts)[0]
    check("out", res["v7"][0], ref_out, dtype)


@pytest.mark.parametrize("shape,initial,packed,path", [
    ((1, 100, 2, 16, 1, 32, "bfloat16", 64), True, True, "v8"),  # Q 64, sequence starts, L % Q != 0
    ((2, 150, 2, 72, 1, 16, "float16", 64), False, True, "v8"),  # 2 p tiles (the second partial), 3 chunks
    ((1, 200, 2, 8, 2, 72, "bfloat16", 128), True, False, "v8"),  # N 72: one 128-wide tile (256 threads), groups
    ((1, 300, 1, 16, 1, 24, "float16", 256), True, True, "v8d"),  # 6 stages, partial last chunk
    ((1, 150, 1, 8, 1, 136, "bfloat16", 64), True, False, "v8d"),  # 2 n tiles of 128 (the second partial)
    pytest.param((2, 1000, 8, 64, 2, 128, "bfloat16", 256), True, True, "v8", id="big_v8a"),
    pytest.param((3, 4100, 16, 64, 1, 128, "bfloat16", 256), False, False, "v8", id="big_v8b"),
    pytest.param((1, 2049, 4, 80, 1, 256, "float16", 64), True, True, "v8d", id="big_v8c"),
    pytest.param((2, 777, 8, 64, 2, 64, "float16", 128), True, True, "v8", id="big_v8d"),
    pytest.param((2, 700, 4, 64, 1, 128, "bfloat16", 256), True, True, "v8d", id="big_v8e"),
])
def test_states_passing_v8(rng, monkeypatch, shape, initial, packed, path):
    """SSMCORE_SSD_FWD=v8 / v8d (ssd_states_passing_v8: chunk states + state passing in one kernel, a block per (b,
    h, tile) walking the chunks): the 16-bit chunk-start states and final states vs states v4 + passing v4 (same
    operand rounding, fp32 summation order differs: starts within ~one rounding of T, final 1e-5), then ssd's output
    and final states vs the float64 reference and vs v7m (the same chunk scan), and that the kernel ran."""
    from ssmcore.backends.cupy import state_space_duality as S

    monkeypatch.setattr(S, "v8_min_threads", 0)
    batch, length, heads, headdim, groups, dstate, dtype, chunk = shape
    kw, gkw, Q, (xk, dtk, Ak, Bk, Ck, Dk, zk, bk, ik), (dtp, dacs, seg) = _states_inputs(rng, shape, initial, packed)
    monkeypatch.setattr(S, "fwd_path", "v7m")
    states = S._chunk_states(xk, Bk, dtp, dacs, seg, Q)
    final4, starts4 = S._state_passing_v4(states, dacs, seg, ik, Q, xk.dtype)
    f4, s4 = host(final4), host(starts4)
    monkeypatch.setattr(S, "fwd_path", path)
    assert S._v8_ok(xk, zk, Bk, Ck, ik, Q)
    final8, starts8 = S._states_passing_v8(xk, Bk, dtp, dacs, seg, ik, Q)
    f8, s8 = host(final8), host(starts8)
    assert starts8.dtype == xk.dtype and s8.shape == s4.shape
    assert np.abs(f8 - f4).max() <= 1e-5 * max(np.abs(f4).max(), 1e-6), "final vs states v4 + passing v4"
    ulp = 2.0 ** -7 if dtype == "bfloat16" else 2.0 ** -10  # one rounding of T, relative
    assert np.all(np.abs(s8 - s4) <= ulp * np.abs(s4) + 1e-6 * max(np.abs(s4).max(), 1e-6)), "starts vs v4"
    calls = []
    fused = S._states_passing_v8
    monkeypatch.setattr(S, "_states_passing_v8", lambda *a: calls.append(S.fwd_path) or fused(*a))
    res = {}
    for p in ("v7m", path):
        monkeypatch.setattr(S, "fwd_path", p)
        res[p] = [host(a) for a in ssmcore.ssd(**gkw, chunk_size=chunk, dt_softplus=True, return_final_states=True)]
    assert calls == [path]
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check(f"out {path}", res[path][0], ref_out, dtype)
    check(f"final {path}", res[path][1], ref_final, dtype)
    scale = max(np.abs(res["v7m"][1]).max(), 1e-6)
    assert np.abs(res[path][1] - res["v7m"][1]).max() <= 1e-5 * scale, "final vs v7m"
    scale = max(np.abs(res["v7m"][0]).max(), 1e-6)
    assert np.abs(res[path][0] - res["v7m"][0]).max() <= REL[dtype] / 10 * scale, "out vs v7m"


@pytest.mark.parametrize("case", ["float32", "n20", "p12", "varlen", "few_blocks"])
def test_states_passing_v8_fallbacks(rng, monkeypatch, case):
    """Where ssd_states_passing_v8 does not apply (float32, N or P not multiples of 8, varlen states, a grid too
    small for the GPU), SSMCORE_SSD_FWD=v8 runs exactly what v7m runs (bitwise)."""
    from ssmcore.backends.cupy import state_space_duality as S

    dtype = "float32" if case == "float32" else "bfloat16"
    kw = make(rng, 1, 70, 2, 12 if case == "p12" else 16, 1, 20 if case == "n20" else 16, dtype, initial=True)
    opts = dict(chunk_size=64, dt_softplus=True, return_final_states=True)
    if case == "varlen":
        kw["cu_seqlens"] = np.array([0, 5, 64, 70], np.int32)
        opts["return_varlen_states"] = True
    monkeypatch.setattr(S, "v8_min_threads", 10**9 if case == "few_blocks" else 0)
    calls = []
    fused = S._states_passing_v8
    monkeypatch.setattr(S, "_states_passing_v8", lambda *a: calls.append(1) or fused(*a))
    res = {}
    for p in ("v7m", "v8"):
        monkeypatch.setattr(S, "fwd_path", p)
        res[p] = [host(a) for a in run_gpu(kw, **opts)]
    assert calls == []
    for a, b in zip(res["v8"], res["v7m"]):
        np.testing.assert_array_equal(a, b)
    check("out", res["v8"][0], reference.ssd(**kw, **opts)[0], dtype)


@pytest.mark.parametrize("dtype,offset", [("bfloat16", 0), ("float16", 8)])
def test_states_passing_v8_strided(rng, monkeypatch, dtype, offset):
    """v8 on strided in_proj-like views (read in place when 16-byte aligned): bitwise the contiguous result."""
    from ssmcore.backends.cupy import state_space_duality as S

    monkeypatch.setattr(S, "fwd_path", "v8")
    monkeypatch.setattr(S, "v8_min_threads", 0)
    kw = make(rng, 2, 70, 2, 16, 1, 16, dtype, initial=True)
    views = _packed_views(kw, offset)
    gkw = {k: gpu(v) for k, v in kw.items()}
    want = [host(a) for a in ssmcore.ssd(**gkw, chunk_size=64, dt_softplus=True, return_final_states=True)]
    got = [host(a) for a in ssmcore.ssd(**dict(gkw, **views), chunk_size=64, dt_softplus=True,
                                        return_final_states=True)]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    ref_out, ref_final = reference.ssd(**kw, dt_softplus=True, return_final_states=True)
    check("out", got[0], ref_out, dtype)
    check("final", got[1], ref_final, dtype)
