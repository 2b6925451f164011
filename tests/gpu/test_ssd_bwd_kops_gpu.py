"""SSD backward, v4 path: the small kernels that replace the launcher's CuPy ops (session 8, helper OVH8: ssdb_fill32,
ssdb_dexp, ssdb_seg, ssdb_rsum, ssdb_ssum; SSMCORE_SSD_BWD_KOPS / kops_in_v4) give the gradients of the CuPy ops.

Bitwise: dx, ddt, dz, dinitial_states (the same kernels, the same inputs: seg and Df are exact), dB / dC (the sum of at
most two head-split partials, then the same rounding to T). Within float32 rounding: dA, ddt_bias, dD (sums in another
fixed order). Runs in the CPU emulator (tiny shapes) and on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_ssd_bwd_gpu as base
from test_ssd_bwd_gpu import EMULATED, NAMES, _record_launches, compare, make, run_cpu64, run_gpu  # noqa: F401

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

EXACT = ("dx", "ddt", "dB", "dC", "dz", "dinitial_states")
NEW = ("ssdb_dexp", "ssdb_rsum", "ssdb_ssum")


def _case(rng, case):
    # (batch, length, heads, headdim, groups, dstate): 2 heads per group -> at most 2 head splits of dB / dC
    if case == "bf16_block":  # the fused Mamba-2 block's call: D per head, dt_bias, softplus, no z, no states
        args, kw = make(rng, 2, 70, 4, 16, 2, 16, "bfloat16", seq=None)
        for k in ("z", "initial_states", "dfinal_states"):
            del kw[k]
    elif case == "bf16_all_seq32":  # everything, D per channel, sorted int32 seq_idx
        args, kw = make(rng, 2, 70, 4, 16, 2, 16, "bfloat16", d_per_channel=True)
    elif case == "f16_seq64_nobias":  # no D, no dt_bias, seq_idx int64 ids that come back, one pass (no split)
        args, kw = make(rng, 1, 90, 2, 8, 1, 16, "float16", seq="unsorted")
        for k in ("z", "D", "dt_bias"):
            del kw[k]
    elif case == "bf16_f64_params":  # float64 A / D / dt_bias / initial_states: their gradients come back in float64
        args, kw = make(rng, 1, 70, 2, 16, 1, 8, "bfloat16", seq=None)
        del kw["z"]
        for k in ("D", "dt_bias", "initial_states"):
            kw[k] = kw[k].astype(np.float64)
        args["A"] = args["A"].astype(np.float64)
    else:  # cu_seqlens (seg by CuPy after the fill kernel)
        args, kw = make(rng, 1, 70, 2, 16, 1, 8, "bfloat16", seq="cu")
    return args, kw


@pytest.mark.parametrize("case", ["bf16_block", "bf16_all_seq32", "f16_seq64_nobias", "bf16_cu", "bf16_f64_params"])
def test_kernels_match_cupy_ops(rng, case, monkeypatch):
    import ssmcore.backends.cupy.state_space_duality_bwd as launcher

    monkeypatch.setattr(base, "cupy", cupy)  # (the emulator's shim, when it replaced this module's cupy)
    args, kw = _case(rng, case)
    chunk = 64
    monkeypatch.setenv(launcher.IMPL_ENV, "v4")
    if case == "f16_seq64_nobias":
        monkeypatch.setattr(launcher, "_G4_TARGET_BLOCKS", 0)  # dC / dB in one pass (the cast form of ssdb_ssum)
    launches = _record_launches(launcher, monkeypatch)
    monkeypatch.setattr(launcher, "kops_in_v4", False)
    old = run_gpu(args, kw, chunk)
    old_names = [n for n, _ in launches]
    launches.clear()
    monkeypatch.setattr(launcher, "kops_in_v4", True)
    new = run_gpu(args, kw, chunk)
    names = [n for n, _ in launches]
    assert not any(n.startswith(NEW) for n in old_names), old_names
    assert all(any(n.startswith(k) for n in names) for k in NEW), names
    assert any(n.startswith("ssdb_seg") for n in names) == (case in ("bf16_all_seq32", "f16_seq64_nobias")), names
    if case == "bf16_block":
        assert any(n.startswith("ssdb_g7b") for n in names)  # the default kernels ran (head-split dB / dC)
    for name, a, b in zip(NAMES, new, old):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name in EXACT:
            np.testing.assert_array_equal(a.view(np.uint16 if a.itemsize == 2 else np.uint32),
                                          b.view(np.uint16 if b.itemsize == 2 else np.uint32), err_msg=name)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())), err_msg=name)
    if case in ("bf16_block", "bf16_all_seq32"):
        compare(new, run_cpu64(args, kw, chunk), args, kw)
