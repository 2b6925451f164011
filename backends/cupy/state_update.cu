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

// ---------------------------------------------------------------------------------------------
// state_update_v2: the bandwidth-oriented decode step (default; SSMCORE_STATE_UPDATE=v1 keeps the
// kernel above). Same math and arguments, plus the tiling below. Needs the vector layout (state,
// B, C and, unless stride 0, A unit-stride along n with 16-byte aligned rows, N % 8 == 0) and
// N <= 8 * 32; anything else runs state_update.
//
// Work decomposition. The rows (b, c) with channel c = h * P + p are cut into tiles of consecutive
// channels of one batch row b and one group g (so B and C are the same for the whole tile): a
// tile is one block of SSU2_THREADS threads = rows_per_step x TPR, TPR = 2^tpr_log2 >= N / 8
// threads per row, each thread owning one 8-entry chunk of n (16 bytes of a 16-bit state) in R
// rows c0 + rs, c0 + rs + rows_per_step, ... (R <= TPR). So one warp-wide access covers 32 / TPR
// consecutive state rows (contiguous memory for a contiguous state), and the block's tile is
// rows_per_step * R rows.
// Per-row scalars are computed once per row, not once per lane: lane r of a row group owns row r
// (its h, p by one division, its x, dt, dt_bias, D, z loads, the softplus, dt * x and, when A is
// a per-head scalar (stride 0 along n, Mamba-2), the one exp(dt * A) of the row); the other lanes
// get them by shuffles, and lane r writes row r's out. Per thread: B and C chunks loaded once per
// tile, then all R state chunks (and A chunks when A varies along n: 8 exps per chunk) issued
// before any use, so R x 16 (or 32) bytes of state per thread are in flight. The state is written
// back with 16-byte stores; each row's <C, state> is a shuffle reduction over its TPR lanes.
// __launch_bounds__(128, 8): <= 64 registers, 1024 threads per SM, R = 2 with a float32 state:
// 64 KB of state reads in flight per SM; R = 4 (16-bit state and B/C, scalar A) takes (128, 7):
// <= 72 registers (64 for bf16), 56-64 KB in flight.
// Traffic: the state read once and written once (the floor); x/dt/z/D/dt_bias once per row,
// A per row from L2 when not a scalar, B/C per tile.
// Padding rows (negative or >= n_rows pool index) write out = 0 and touch no state, as above.
#define SSU2_THREADS 128
// Blocks per SM the register budget must allow (CUDA). HIP reads launch_bounds' second argument
// differently (waves per execution unit): no minimum there.
#if SSM_HIP
#define SSU2_MIN_BLOCKS(R, TS) 1
#else
// R = 4 with a float32 state (a timing variant, SSMCORE_STATE_UPDATE_ROWS=4): (128, 6), <= 80 registers.
#define SSU2_MIN_BLOCKS(R, TS) ((R) >= 4 ? (sizeof(TS) == 4 ? 6 : 7) : 8)
#endif

namespace {
// Element k of 8 consecutive T packed in 16-byte words (k a compile-time constant after unrolling).
template <typename T>
__device__ __forceinline__ float unpack8(const uint4 (&w)[sizeof(T) / 2], int k) {
  constexpr int PER = 16 / sizeof(T);
  const T* e = reinterpret_cast<const T*>(&w[k / PER]);
  return load_f(e + k % PER);
}
}  // namespace

template <typename TS, typename TBC, int R, bool A_SCALAR>
__global__ void __launch_bounds__(SSU2_THREADS, SSU2_MIN_BLOCKS(R, TS)) state_update_v2(
    TS* __restrict__ state, const void* __restrict__ x, int x_code, const void* __restrict__ dt, int dt_code,
    const float* __restrict__ A, const TBC* __restrict__ Bm, const TBC* __restrict__ Cm,
    const float* __restrict__ Dv, const void* __restrict__ z, int z_code, const float* __restrict__ dt_bias,
    const int* __restrict__ state_indices, void* __restrict__ out, int n_batch, int H, int P, int N,
    int channels_per_group, int n_groups, int tiles_per_group, int tpr_log2, int softplus, int n_rows,
    i64 s0, i64 s1, i64 s2, i64 x0, i64 x1, i64 x2, i64 dt0, i64 dt1, i64 dt2, i64 z0, i64 z1, i64 z2,
    i64 a0, i64 a1, i64 b0, i64 b1, i64 c0s, i64 c1s, i64 d0, i64 d1, i64 db0, i64 db1) {
  constexpr int WS = sizeof(TS) / 2;    // 16-byte words per 8-entry chunk of state
  constexpr int WB = sizeof(TBC) / 2;   // ... of B, C
  constexpr int RA = A_SCALAR ? 1 : R;  // rows with an A chunk in registers
  const int tpr = 1 << tpr_log2;        // >= R (the launcher's rule)
  const int lane = threadIdx.x & (tpr - 1);
  const int group_lane0 = (threadIdx.x & (SSM_WARP_SIZE - 1)) & ~(tpr - 1);  // the row group's lane 0 in the warp
  const int rs = threadIdx.x >> tpr_log2;
  const int rows_per_step = SSU2_THREADS >> tpr_log2;
  const unsigned tile = blockIdx.x % (unsigned)tiles_per_group;
  const unsigned bg = blockIdx.x / (unsigned)tiles_per_group;
  const int g = (int)(bg % (unsigned)n_groups);
  const int b = (int)(bg / (unsigned)n_groups);
  const int n0 = lane * 8;
  const bool lane_on = n0 < N;
  i64 slot = state_indices ? state_indices[b] : b;
  if (slot >= n_rows) slot = -1;  // out of the pool: padding (only when host checks were skipped)
  const int cbeg = (int)tile * rows_per_step * R + rs;  // channel offset in the group of row 0

  // ---- this lane's own row (lane % R): its channel and per-row scalars, computed once per row ----
  const int own = lane % R;
  const int own_cg = cbeg + own * rows_per_step;
  const bool own_on = own_cg < channels_per_group;
  const int own_c = g * channels_per_group + (own_on ? own_cg : 0);
  const int own_h = own_c / P, own_p = own_c - own_h * P;
  const float own_x = load_code(x, x_code, b * x0 + own_h * x1 + own_p * x2);
  float own_dt = load_code(dt, dt_code, b * dt0 + own_h * dt1 + own_p * dt2);
  if (dt_bias) own_dt += dt_bias[own_h * db0 + own_p * db1];
  const float own_d = Dv ? Dv[own_h * d0 + own_p * d1] : 0.f;
  const float own_z = z ? load_code(z, z_code, b * z0 + own_h * z1 + own_p * z2) : 0.f;
  const float own_a = A_SCALAR ? A[own_h * a0 + own_p * a1] : 0.f;

  // ---- every row's (h, p) from its lane; issue the B, C, A and state loads ----
  uint4 bw[WB], cw[WB];
  if (lane_on) {
    const uint4* bp = reinterpret_cast<const uint4*>(Bm + b * b0 + g * b1 + n0);
    const uint4* cp = reinterpret_cast<const uint4*>(Cm + b * c0s + g * c1s + n0);
#pragma unroll
    for (int w = 0; w < WB; ++w) {
      bw[w] = bp[w];
      cw[w] = cp[w];
    }
  } else {
#pragma unroll
    for (int w = 0; w < WB; ++w) bw[w] = cw[w] = make_uint4(0u, 0u, 0u, 0u);
  }
  uint4 raw[R][WS];
  float av[RA][8];
  TS* sp[R];
  bool on[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int h = SSM_SHFL(own_h, group_lane0 + r);
    const int p = SSM_SHFL(own_p, group_lane0 + r);
    on[r] = cbeg + r * rows_per_step < channels_per_group && slot >= 0 && lane_on;
    if (!A_SCALAR && lane_on) load_chunk8(A + h * a0 + p * a1, n0, N, true, av[A_SCALAR ? 0 : r]);
    sp[r] = state + slot * s0 + h * s1 + p * s2 + n0;
    if (on[r]) {
#pragma unroll
      for (int w = 0; w < WS; ++w) raw[r][w] = reinterpret_cast<const uint4*>(sp[r])[w];
    }
  }

  // ---- own row: time step, decay, input scale; then every row's from its lane ----
  float delta = own_dt;
  if (softplus) delta = softplus_f(delta);
  const float own_dx = delta * own_x;
  const float own_da = A_SCALAR ? __expf(delta * own_a) : delta;  // decay, or the time step when A varies along n

  float y[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float dx = SSM_SHFL(own_dx, group_lane0 + r);
    const float da = SSM_SHFL(own_da, group_lane0 + r);
    float acc = 0.f;
    uint4 o[WS];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const float dA = A_SCALAR ? da : __expf(da * av[A_SCALAR ? 0 : r][k]);
      const float s = unpack8<TS>(raw[r], k) * dA + dx * unpack8<TBC>(bw, k);
      acc += s * unpack8<TBC>(cw, k);
      constexpr int PER = 16 / sizeof(TS);
      store_f(reinterpret_cast<TS*>(&o[k / PER]) + k % PER, s);
    }
    y[r] = on[r] ? acc : 0.f;
    if (on[r]) {
#pragma unroll
      for (int w = 0; w < WS; ++w) reinterpret_cast<uint4*>(sp[r])[w] = o[w];
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
    for (int o = tpr >> 1; o > 0; o >>= 1) y[r] += SSM_SHFL_XOR(y[r], o);
  // Lane r (< R) of the row group writes row r's out.
  if (lane < R && own_on) {
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r == lane) v = y[r];
    if (slot < 0) {
      v = 0.f;
    } else {
      if (Dv) v += own_d * own_x;
      if (z) v *= silu_f(own_z);
    }
    store_code(out, x_code, (i64)b * H * P + g * channels_per_group + own_cg, v);
  }
}

// ---------------------------------------------------------------------------------------------
// state_update_v3 (SSMCORE_STATE_UPDATE=v3; session 7, a timing variant until the H200 says
// otherwise): state_update_v2's tiles, layout and math (per-head scalar A only), on a persistent
// grid: block k takes tiles k, k + gridDim.x, ... and issues every load of its next tile (state
// chunks, B/C, the own row's scalars) as soon as the current tile's state is consumed, before the
// current tile's shuffles and out stores (right after its state stores, which are posted); so a
// block has a tile's loads in flight nearly all the time and no block launch sits between tiles.
// Registers: one tile's loads (R x 16 or 32 bytes of state, B/C, 5 scalars), as v2.
// R = 4 needs more registers than v2 (spills at v2's bounds, and at (128, 6)): (128, 5), <= 96 registers.
#if SSM_HIP
#define SSU3_MIN_BLOCKS(R, TS) 1
#else
#define SSU3_MIN_BLOCKS(R, TS) ((R) >= 4 ? 5 : 8)
#endif
template <typename TS, typename TBC, int R>
__global__ void __launch_bounds__(SSU2_THREADS, SSU3_MIN_BLOCKS(R, TS)) state_update_v3(
    TS* __restrict__ state, const void* __restrict__ x, int x_code, const void* __restrict__ dt, int dt_code,
    const float* __restrict__ A, const TBC* __restrict__ Bm, const TBC* __restrict__ Cm,
    const float* __restrict__ Dv, const void* __restrict__ z, int z_code, const float* __restrict__ dt_bias,
    const int* __restrict__ state_indices, void* __restrict__ out, int n_batch, int H, int P, int N,
    int channels_per_group, int n_groups, int tiles_per_group, int tpr_log2, int softplus, int n_rows,
    i64 s0, i64 s1, i64 s2, i64 x0, i64 x1, i64 x2, i64 dt0, i64 dt1, i64 dt2, i64 z0, i64 z1, i64 z2,
    i64 a0, i64 a1, i64 b0, i64 b1, i64 c0s, i64 c1s, i64 d0, i64 d1, i64 db0, i64 db1) {
  constexpr int WS = sizeof(TS) / 2;
  constexpr int WB = sizeof(TBC) / 2;
  const int tpr = 1 << tpr_log2;
  const int lane = threadIdx.x & (tpr - 1);
  const int group_lane0 = (threadIdx.x & (SSM_WARP_SIZE - 1)) & ~(tpr - 1);
  const int rs = threadIdx.x >> tpr_log2;
  const int rows_per_step = SSU2_THREADS >> tpr_log2;
  const int n0 = lane * 8;
  const bool lane_on = n0 < N;
  const int own = lane % R;
  const unsigned n_tiles = (unsigned)n_batch * (unsigned)n_groups * (unsigned)tiles_per_group;

  // One tile's loads and the indices its stores need.
  struct Tile {
    uint4 bw[WB], cw[WB], raw[R][WS];
    float x, dt, d, z, a;  // the own row's scalars (dt with dt_bias added)
    i64 slot;
    int b, g, cbeg, own_cg;
  };
  auto load_tile = [&](unsigned t, Tile& T) {
    const bool live = t < n_tiles;
    const unsigned tile = live ? t % (unsigned)tiles_per_group : 0u;
    const unsigned bg = live ? t / (unsigned)tiles_per_group : 0u;
    T.g = (int)(bg % (unsigned)n_groups);
    T.b = (int)(bg / (unsigned)n_groups);
    const int b = T.b, g = T.g;
    i64 slot = live ? (state_indices ? state_indices[b] : b) : -1;
    if (slot >= n_rows) slot = -1;
    T.slot = slot;
    T.cbeg = (int)tile * rows_per_step * R + rs;
    T.own_cg = T.cbeg + own * rows_per_step;
    const bool own_on = live && T.own_cg < channels_per_group;
    const int own_c = g * channels_per_group + (own_on ? T.own_cg : 0);
    const int own_h = own_c / P, own_p = own_c - own_h * P;
    T.x = T.dt = T.d = T.z = T.a = 0.f;
    if (live) {  // past the last tile: nothing to load
      T.x = load_code(x, x_code, b * x0 + own_h * x1 + own_p * x2);
      T.dt = load_code(dt, dt_code, b * dt0 + own_h * dt1 + own_p * dt2);
      if (dt_bias) T.dt += dt_bias[own_h * db0 + own_p * db1];
      T.d = Dv ? Dv[own_h * d0 + own_p * d1] : 0.f;
      T.z = z ? load_code(z, z_code, b * z0 + own_h * z1 + own_p * z2) : 0.f;
      T.a = A[own_h * a0 + own_p * a1];
    }
    if (live && lane_on) {
      const uint4* bp = reinterpret_cast<const uint4*>(Bm + b * b0 + g * b1 + n0);
      const uint4* cp = reinterpret_cast<const uint4*>(Cm + b * c0s + g * c1s + n0);
#pragma unroll
      for (int w = 0; w < WB; ++w) {
        T.bw[w] = bp[w];
        T.cw[w] = cp[w];
      }
    } else {
#pragma unroll
      for (int w = 0; w < WB; ++w) T.bw[w] = T.cw[w] = make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int h = SSM_SHFL(own_h, group_lane0 + r);
      const int p = SSM_SHFL(own_p, group_lane0 + r);
      const bool on = T.cbeg + r * rows_per_step < channels_per_group && slot >= 0 && lane_on;
      if (on) {
        const TS* sp = state + slot * s0 + h * s1 + p * s2 + n0;
#pragma unroll
        for (int w = 0; w < WS; ++w) T.raw[r][w] = reinterpret_cast<const uint4*>(sp)[w];
      }
    }
  };

  Tile T;
  load_tile(blockIdx.x, T);
  for (unsigned t = blockIdx.x; t < n_tiles; t += gridDim.x) {
    // ---- this tile: the own row's step, then every row's new state (consumes T.raw) ----
    float delta = T.dt;
    if (softplus) delta = softplus_f(delta);
    const float own_dx = delta * T.x;
    const float own_da = __expf(delta * T.a);
    const int b = T.b, g = T.g, cbeg = T.cbeg, own_cg = T.own_cg;
    const i64 slot = T.slot;
    const float own_x = T.x, own_d = T.d, own_z = T.z;
    uint4 o[R][WS];
    float y[R];
    int hs[R], ps[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int cg = cbeg + r * rows_per_step;
      const int c = g * channels_per_group + (cg < channels_per_group ? cg : 0);
      hs[r] = c / P;
      ps[r] = c - hs[r] * P;
      const float dx = SSM_SHFL(own_dx, group_lane0 + r);
      const float da = SSM_SHFL(own_da, group_lane0 + r);
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float s = unpack8<TS>(T.raw[r], k) * da + dx * unpack8<TBC>(T.bw, k);
        acc += s * unpack8<TBC>(T.cw, k);
        constexpr int PER = 16 / sizeof(TS);
        store_f(reinterpret_cast<TS*>(&o[r][k / PER]) + k % PER, s);
      }
      y[r] = acc;
    }
    // ---- this tile's state stores (posted: nothing waits for them), then the next tile's loads go
    // out, in flight through this tile's shuffles and out stores and the next tile's first use ----
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const bool on = cbeg + r * rows_per_step < channels_per_group && slot >= 0 && lane_on;
      if (!on) y[r] = 0.f;
      if (on) {
        TS* sp = state + slot * s0 + hs[r] * s1 + ps[r] * s2 + n0;
#pragma unroll
        for (int w = 0; w < WS; ++w) reinterpret_cast<uint4*>(sp)[w] = o[r][w];
      }
    }
    load_tile(t + gridDim.x, T);
#pragma unroll
    for (int r = 0; r < R; ++r)
      for (int m = tpr >> 1; m > 0; m >>= 1) y[r] += SSM_SHFL_XOR(y[r], m);
    if (lane < R && own_cg < channels_per_group) {
      float v = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r == lane) v = y[r];
      if (slot < 0) {
        v = 0.f;
      } else {
        if (Dv) v += own_d * own_x;
        if (z) v *= silu_f(own_z);
      }
      store_code(out, x_code, (i64)b * H * P + g * channels_per_group + own_cg, v);
    }
  }
}
