"""Channel-last causal conv1d on x that is a channel slice of wider rows (Mamba-2's xBC inside the in_proj
output): the tile kernel reads the rows in place. Results must equal those of the same values made contiguous
(bitwise: same kernel arithmetic) and the float64 oracle; the torch op returns a dense channel-last output
(what torch.empty_like(x) and the fake implementation give), and the caller's tensor is not modified.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, f64

from ssmcore import reference

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

import ssmcore  # noqa: E402

TOL = {"float32": (3e-4, 1e-3), "float16": (1e-2, 5e-2), "bfloat16": (1e-2, 5e-2)}


def wide_rows(rng, batch, length, width, dtype):
    host = rng.standard_normal((batch, length, width)).astype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        host = host.astype(ml_dtypes.bfloat16)
    else:
        host = host.astype(dtype)
    return cupy.asarray(host)


def bits(a):
    """The bytes of a GPU array in C order (bitwise comparisons, NaN-safe)."""
    return np.ascontiguousarray(cupy.asnumpy(a)).view(np.uint8)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("batch,length,chan,offset,total,w", [
    (2, 77, 48, 16, 112, 4), (1, 300, 64, 64, 200, 4), (3, 65, 40, 8, 56, 3), (2, 129, 24, 0, 40, 2)])
def test_channel_slice_equals_contiguous(rng, dtype, batch, length, chan, offset, total, w):
    wide = wide_rows(rng, batch, length, total, dtype)
    before = wide.copy()
    x = wide[:, :, offset:offset + chan].transpose(0, 2, 1)  # (B, D, L), channel stride 1, rows `total` wide
    assert x.strides[1] == x.itemsize and x.strides[2] == total * x.itemsize
    weight = cupy.asarray(rng.standard_normal((chan, w)).astype(np.float32))
    bias = cupy.asarray(rng.standard_normal(chan).astype(np.float32))
    dense = cupy.ascontiguousarray(x.transpose(0, 2, 1)).transpose(0, 2, 1)
    out, final = ssmcore.causal_conv1d(x, weight, bias, activation="silu", return_final_states=True)
    ref_out, ref_final = ssmcore.causal_conv1d(dense, weight, bias, activation="silu", return_final_states=True)
    assert out.strides[1] == out.itemsize  # channel-last result
    for got, want in ((out, ref_out), (final, ref_final)):
        np.testing.assert_array_equal(bits(got), bits(want))
    oracle = reference.causal_conv1d(f64(cupy.asnumpy(x)), f64(cupy.asnumpy(weight)), f64(cupy.asnumpy(bias)),
                                     activation="silu")
    rtol, atol = TOL[dtype]
    assert_close(f64(cupy.asnumpy(out)), oracle, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(bits(wide), bits(before))


def test_torch_op_output_layout_and_fake_agree(rng):
    torch = pytest.importorskip("torch")
    from ssmcore.adapters.torch import functional as F

    wide = torch.randn(2, 70, 96, device="cuda", dtype=torch.bfloat16)
    x = wide[:, :, 16:80].transpose(1, 2)
    weight = torch.randn(64, 4, device="cuda")
    out = F.causal_conv1d_fn(x, weight, None, activation="silu")
    expect = F.causal_conv1d_fn(x.contiguous(), weight, None, activation="silu")
    assert out.stride() == torch.empty_like(x).stride() == (70 * 64, 1, 64)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    op_out = torch.ops.ssmcore.causal_conv1d_fwd(x, weight, None, None, None, "silu", False)[0]  # the custom op
    assert op_out.stride() == out.stride()
    torch.library.opcheck(torch.ops.ssmcore.causal_conv1d_fwd.default, (x, weight, None, None, None, "silu", False))
