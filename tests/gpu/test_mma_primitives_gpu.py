"""The pipelined-mma primitives of common.cuh (cp_async16, ldsm_x4 / _x2 and their .trans forms) against the
fragment layout the portable fallback (HIP, CPU emulator) implements: a kernel copies a 16 x 16 tile of 16-bit
values to shared memory, loads every fragment form and writes the registers out."""

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

KERNEL = r"""
extern "C" __global__ void prim_test(const unsigned short* in, unsigned* out) {
  __shared__ uint4 tile4[16 * 24 / 8];  // 16 rows of 16 values, rows padded to 24 (48 bytes)
  unsigned short* tile = reinterpret_cast<unsigned short*>(tile4);
  const int lane = threadIdx.x;
  { const int r = lane >> 1, c = (lane & 1) * 8; cp_async16_zfill(tile + r * 24 + c, in + r * 16 + c, r != 5); }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], b[4], c2[2], d2[2];
  const int r = lane & 15, c = (lane >> 4) * 8;
  ldsm_x4(a, tile + r * 24 + c);
  ldsm_x4_trans(b, tile + r * 24 + c);
  ldsm_x2(c2, tile + (lane & 7) * 24 + ((lane >> 3) & 1) * 8);
  ldsm_x2_trans(d2, tile + (lane & 7) * 24 + ((lane >> 3) & 1) * 8);
  for (int j = 0; j < 4; ++j) { out[lane * 12 + j] = a[j]; out[lane * 12 + 4 + j] = b[j]; }
  out[lane * 12 + 8] = c2[0]; out[lane * 12 + 9] = c2[1]; out[lane * 12 + 10] = d2[0]; out[lane * 12 + 11] = d2[1];
}
"""


def test_cp_async_and_ldmatrix_fragments():
    cupy = pytest.importorskip("cupy")
    from ssmcore.backends.cupy import _runtime

    if _runtime.is_hip():
        pytest.skip("CUDA PTX forms; HIP runs the fallback the CPU emulator checks")
    mod = cupy.RawModule(code=_runtime.source_header() + KERNEL, options=_runtime.OPTIONS)
    rng = np.random.default_rng(3)
    host = rng.integers(1, 60000, size=256).astype(np.uint16)
    out = cupy.zeros(32 * 12, dtype=cupy.uint32)
    mod.get_function("prim_test")((1,), (32,), (cupy.asarray(host), out))
    got = cupy.asnumpy(out).reshape(32, 12)
    m = host.reshape(16, 16).copy()
    m[5] = 0  # row 5 was zero-filled
    quads = [m[0:8, 0:8], m[8:16, 0:8], m[0:8, 8:16], m[8:16, 8:16]]
    pairs = [m[0:8, 0:8], m[0:8, 8:16]]
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        def word(lo, hi):
            return int(lo) | (int(hi) << 16)
        for j in range(4):
            assert got[lane, j] == word(quads[j][g, 2 * t], quads[j][g, 2 * t + 1]), (lane, j)
            assert got[lane, 4 + j] == word(quads[j][2 * t, g], quads[j][2 * t + 1, g]), (lane, j, "trans")
        for j in range(2):
            assert got[lane, 8 + j] == word(pairs[j][g, 2 * t], pairs[j][g, 2 * t + 1]), (lane, j, "x2")
            assert got[lane, 10 + j] == word(pairs[j][2 * t, g], pairs[j][2 * t + 1, g]), (lane, j, "x2 trans")
