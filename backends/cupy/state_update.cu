// One decode step of the selective SSM recurrence, state updated in place:
//
//   dt  = dt + dt_bias (softplus'd when asked);  state = exp(dt * A) * state + dt * B * x
//   out = <C, state> + D * x, times silu(z)
//
// Both forms run this kernel on the heads layout (B, H, P, N); without heads every channel is
// a head with P = 1. Every array is addressed through its strides (elements), so views such as
// a stride-0 A (a per-head scalar broadcast), x/z sliced out of a projection, or a state pool
// of any layout need no copy.
//
// Work decomposition: one (b, h, p) state row of N entries per group of TPR threads (TPR = a
// power of two <= warp, ~N/16), rows_per_block = 128 / TPR. A thread owns the 8-element chunks
// lane, lane + TPR, ... of n, two per iteration with all their loads issued together: it reads
// state, A, B and C for them (16-byte accesses when the row is unit-stride and aligned), writes
// the new state, and the row's out is a shuffle reduction inside the group. x, dt, z, D, dt_bias are per-row scalars (broadcast loads).
// Traffic: the state is read and written once (the floor: 2 x Bs x H x P x N x sizeof(state));
// A, B, C stay in L2 (A is H x P x N floats, B/C B x G x N); no shared memory.
// Padding rows (negative state_batch_indices) write out = 0 and touch no state; so do rows whose
// index is >= n_rows (the pool size): the host check rejecting those is skipped during CUDA-graph
// capture, so the kernel must stay in bounds on its own.
#include "common.cuh"

#define SSU_THREADS 128

namespace {

// A scalar of a float32 (0), float16 (1) or bfloat16 (2) array.
__device__ __forceinline__ float load_code(const void* p, int code, i64 i) {
  switch (code) {
    case 1: return load_f(static_cast<const half_t*>(p) + i);
    case 2: return load_f(static_cast<const bf16_t*>(p) + i);
    default: return load_f(static_cast<const float*>(p) + i);
  }
}

__device__ __forceinline__ void store_code(void* p, int code, i64 i, float v) {
  switch (code) {
    case 1: store_f(static_cast<half_t*>(p) + i, v); break;
    case 2: store_f(static_cast<bf16_t*>(p) + i, v); break;
    default: store_f(static_cast<float*>(p) + i, v);
  }
}

// Elements [i, i + 8) of a strided row (vector path when unit-stride and aligned).
// vec: unit stride, aligned rows and n % 8 == 0 (full 16-byte chunks only).
template <typename T>
__device__ __forceinline__ void load8_strided(const T* p, i64 stride, i64 i, i64 n, bool vec, float (&v)[8]) {
  if (vec) {
    load_chunk8(p, i, i + 8, true, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (i + k < n) ? load_f(p + (i + k) * stride) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8_strided(T* p, i64 stride, i64 i, i64 n, bool vec, const float (&v)[8]) {
  if (vec) {
    store_chunk8(p, i, i + 8, true, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (i + k < n) store_f(p + (i + k) * stride, v[k]);
  }
}

}  // namespace

// TS: state element type; TBC: B and C element type; VEC: N % 8 == 0 and state, A (unless stride
// 0), B and C are unit-stride along n with 16-byte aligned rows. x/dt/z/out types are run-time codes.
template <typename TS, typename TBC, bool VEC>
__global__ void __launch_bounds__(SSU_THREADS) state_update(
    TS* __restrict__ state, const void* __restrict__ x, int x_code, const void* __restrict__ dt, int dt_code,
    const float* __restrict__ A, const TBC* __restrict__ Bm, const TBC* __restrict__ Cm,
    const float* __restrict__ Dv, const void* __restrict__ z, int z_code, const float* __restrict__ dt_bias,
    const int* __restrict__ state_indices, void* __restrict__ out, int n_batch, int H, int P, int N,
    int heads_per_group, int softplus, int n_rows,
    // strides in elements: state (pool row, head, p, n); x, dt, z (batch, head, p); A (head, p, n);
    // B, C (batch, group, n); D, dt_bias (head, p)
    i64 s0, i64 s1, i64 s2, i64 s3, i64 x0, i64 x1, i64 x2, i64 dt0, i64 dt1, i64 dt2, i64 z0, i64 z1, i64 z2,
    i64 a0, i64 a1, i64 a2, i64 b0, i64 b1, i64 b2, i64 c0, i64 c1, i64 c2, i64 d0, i64 d1, i64 db0, i64 db1) {
  const int tpr = blockDim.x;
  // 32-bit index math (the launcher checks B * H * P < 2**31): 64-bit division is a subroutine.
  const unsigned row = blockIdx.x * blockDim.y + threadIdx.y;
  const bool live = row < (unsigned)n_batch * (unsigned)H * (unsigned)P;
  const unsigned bh = row / (unsigned)P;
  const int p = live ? (int)(row - bh * (unsigned)P) : 0;
  const int h = live ? (int)(bh % (unsigned)H) : 0;
  const int b = live ? (int)(bh / (unsigned)H) : 0;
  i64 slot = !live ? -1 : (state_indices ? state_indices[b] : b);
  if (slot >= n_rows) slot = -1;  // out of the pool: padding (only reachable when host checks were skipped)

  float y = 0.f;
  float xv = 0.f;
  if (slot >= 0) {
    xv = load_code(x, x_code, b * x0 + h * x1 + p * x2);
    float delta = load_code(dt, dt_code, b * dt0 + h * dt1 + p * dt2);
    if (dt_bias) delta += dt_bias[h * db0 + p * db1];
    if (softplus) delta = softplus_f(delta);
    const float dx = delta * xv;
    TS* sr = state + slot * s0 + h * s1 + p * s2;
    const float* ar = A + h * a0 + p * a1;
    const int g = h / heads_per_group;
    const TBC* br = Bm + b * b0 + g * b1;
    const TBC* cr = Cm + b * c0 + g * c1;
    const bool a_scalar = a2 == 0;  // A constant along n (a per-head scalar): one exp per row
    const float dA_row = (a_scalar && N > 0) ? __expf(delta * ar[0]) : 0.f;  // N == 0: A may have no element
    // Two chunks per iteration: their loads are all in flight before the first use.
    for (int c = threadIdx.x; c * 8 < N; c += 2 * tpr) {
      float s[2][8], a[2][8], bv[2][8], cv[2][8];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const i64 i = (i64)(c + j * tpr) * 8;
        if (i < N) {
          load8_strided(sr, s3, i, N, VEC, s[j]);
          if (!a_scalar) load8_strided(ar, a2, i, N, VEC, a[j]);
          load8_strided(br, b2, i, N, VEC, bv[j]);
          load8_strided(cr, c2, i, N, VEC, cv[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const i64 i = (i64)(c + j * tpr) * 8;
        if (i < N) {
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float dA = a_scalar ? dA_row : __expf(delta * a[j][k]);
            s[j][k] = s[j][k] * dA + dx * bv[j][k];
            y += s[j][k] * cv[j][k];  // entries past N: s = 0 (b, c read as 0)
          }
          store8_strided(sr, s3, i, N, VEC, s[j]);
        }
      }
    }
  }
  for (int o = tpr >> 1; o > 0; o >>= 1) y += SSM_SHFL_XOR(y, o);
  if (live && threadIdx.x == 0) {
    if (slot >= 0) {
      if (Dv) y += Dv[h * d0 + p * d1] * xv;
      if (z) y *= silu_f(load_code(z, z_code, b * z0 + h * z1 + p * z2));
    } else {
      y = 0.f;
    }
    store_code(out, x_code, row, y);
  }
}
