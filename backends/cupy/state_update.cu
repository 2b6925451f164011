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
// power of two <= warp, ~N/8), rows_per_block = 128 / TPR. A thread owns the 8-element chunks
// lane, lane + TPR, ... of n: it reads state, A, B and C for them (16-byte accesses when the
// row is unit-stride and aligned), writes the new state, and the row's out is a shuffle
// reduction inside the group. x, dt, z, D, dt_bias are per-row scalars (broadcast loads).
// Traffic: the state is read and written once (the floor: 2 x Bs x H x P x N x sizeof(state));
// A, B, C stay in L2 (A is H x P x N floats, B/C B x G x N); no shared memory.
// Padding rows (negative state_batch_indices) write out = 0 and touch no state.
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
template <typename T>
__device__ __forceinline__ void load8_strided(const T* p, i64 stride, i64 i, i64 n, bool vec, float (&v)[8]) {
  if (vec) {
    load_chunk8(p, i, n, true, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (i + k < n) ? load_f(p + (i + k) * stride) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store8_strided(T* p, i64 stride, i64 i, i64 n, bool vec, const float (&v)[8]) {
  if (vec) {
    store_chunk8(p, i, n, true, v);
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (i + k < n) store_f(p + (i + k) * stride, v[k]);
  }
}

}  // namespace

struct SsuStrides {  // in elements
  i64 state[4];      // batch (pool row), head, p, n
  i64 x[3], dt[3], z[3];  // batch, head, p
  i64 A[3];          // head, p, n
  i64 B[3], C[3];    // batch, group, n
  i64 D[2], dt_bias[2];  // head, p
};

// TS: state element type; TBC: B and C element type. x/dt/z/out types are run-time codes.
template <typename TS, typename TBC>
__global__ void __launch_bounds__(SSU_THREADS) state_update(
    TS* __restrict__ state, const void* __restrict__ x, int x_code, const void* __restrict__ dt, int dt_code,
    const float* __restrict__ A, const TBC* __restrict__ Bm, const TBC* __restrict__ Cm,
    const float* __restrict__ Dv, const void* __restrict__ z, int z_code, const float* __restrict__ dt_bias,
    const int* __restrict__ state_indices, void* __restrict__ out, const SsuStrides st, int n_batch, int H, int P,
    int N, int heads_per_group, int softplus, int state_vec, int a_vec, int bc_vec) {
  const int tpr = blockDim.x;
  const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const i64 rows = (i64)n_batch * H * P;
  const bool live = row < rows;
  const int p = live ? (int)(row % P) : 0;
  const int h = live ? (int)((row / P) % H) : 0;
  const int b = live ? (int)(row / ((i64)P * H)) : 0;
  const i64 slot = !live ? -1 : (state_indices ? state_indices[b] : b);

  float y = 0.f;
  float xv = 0.f;
  if (slot >= 0) {
    xv = load_code(x, x_code, b * st.x[0] + h * st.x[1] + p * st.x[2]);
    float delta = load_code(dt, dt_code, b * st.dt[0] + h * st.dt[1] + p * st.dt[2]);
    if (dt_bias) delta += dt_bias[h * st.dt_bias[0] + p * st.dt_bias[1]];
    if (softplus) delta = softplus_f(delta);
    const float dx = delta * xv;
    TS* sr = state + slot * st.state[0] + h * st.state[1] + p * st.state[2];
    const float* ar = A + h * st.A[0] + p * st.A[1];
    const int g = h / heads_per_group;
    const TBC* br = Bm + b * st.B[0] + g * st.B[1];
    const TBC* cr = Cm + b * st.C[0] + g * st.C[1];
    const float a_scalar = st.A[2] == 0 ? ar[0] : 0.f;  // per-head (or per-row) scalar A
    for (int c = threadIdx.x; c * 8 < N; c += tpr) {
      const i64 i = (i64)c * 8;
      float s[8], a[8], bv[8], cv[8];
      load8_strided(sr, st.state[3], i, N, state_vec, s);
      if (st.A[2] == 0) {
#pragma unroll
        for (int k = 0; k < 8; ++k) a[k] = a_scalar;
      } else {
        load8_strided(ar, st.A[2], i, N, a_vec, a);
      }
      load8_strided(br, st.B[2], i, N, bc_vec, bv);
      load8_strided(cr, st.C[2], i, N, bc_vec, cv);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        s[k] = s[k] * expf(delta * a[k]) + dx * bv[k];
        y += s[k] * cv[k];  // entries past N: s = 0 (a, b, c read as 0)
      }
      store8_strided(sr, st.state[3], i, N, state_vec, s);
    }
  }
  for (int o = tpr >> 1; o > 0; o >>= 1) y += SSM_SHFL_XOR(y, o);
  if (live && threadIdx.x == 0) {
    if (slot >= 0) {
      if (Dv) y += Dv[h * st.D[0] + p * st.D[1]] * xv;
      if (z) y *= silu_f(load_code(z, z_code, b * st.z[0] + h * st.z[1] + p * st.z[2]));
    } else {
      y = 0.f;
    }
    store_code(out, x_code, row, y);
  }
}
