// Selective scan (Mamba-1): forward (scan_fwd) and backward (scan_bwd).
//
// Per (b, d) row with state h (N,):  dt_t = [softplus](delta_t + delta_bias)
//   h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,   y_t = <C_t, h_t> + D u_t,   out_t = y_t silu(z_t)
//
// Work decomposition (both kernels)
//   Sequential in time, parallel over state entries (the work-efficient layout: one exp per
//   (b, d, n, t), no log-depth scan). A block is 128 threads; R lanes own one (b, d) row and each
//   lane owns S of its N state entries (n = j*S .. j*S+S-1 for lane j of the row, N padded to
//   NP = S*R), so a block holds RB = 128/R rows, all of one batch entry and one group of every
//   input-dependent B/C. The grid is (batch, group, row tile) flattened. Configurations (S, R) are
//   templates: large S for large B*D (more exps per lane), S = 1 with R up to 32 lanes per row when
//   B*D is small (batch 1), so the grid still fills the GPU.
//   A time tile of TL steps goes through shared memory: u, dt = softplus(delta + bias) and silu(z)
//   per (row, t) (computed once per element, not once per lane), B_t / C_t as [t][n] (read back as
//   16-byte vectors of a lane's S entries; a constant (D, N) B/C sits there as [row][n] once and is
//   read with a time stride of 0). The forward issues the next tile's global loads into registers
//   before running the current tile's steps, so load latency hides behind the exps. exp goes
//   through exp2 with log2(e) folded into A.
//   Sums over n (y, and in the backward du / ddelta) are reduced across a row's R lanes with a
//   butterfly reduce-scatter over groups of timesteps (about one shuffle per step and value instead
//   of log2 R), the result written once per (row, t) to shared memory; a cooperative epilogue then
//   applies D, the z gate and writes the tile coalesced along t.
// Backward: scan_fwd first runs without output and stores the state every CH steps (checkpoints,
//   B * (L/CH) * D * NP floats, CH = 8..32, never B*D*N*L). scan_bwd walks the chunks in reverse;
//   per chunk it loads u, dt, dy = dout silu(z) (and dout silu'(z) for dz, kept in registers) once,
//   recomputes the CH states from the checkpoint into registers (hist[CH][S]), then
//   carries the adjoint g_t = dLoss/dh_t back:
//     g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1},  dB_t += g_t dt_t u_t,  dC_t += dy_t h_t,
//     dA += g_t dt_t exp(dt_t A) h_{t-1},  du_t = dt_t <g_t, B_t> + D dy_t,
//     ddt_t = <g_t, A exp(dt_t A) h_{t-1}> + u_t <g_t, B_t>.
//   Reductions: dA (registers) and constant dB/dC (shared memory) per (b, d, n) over time, dD and
//   ddelta_bias per (b, d) through the epilogue; all written as float32 partials per batch entry and
//   summed over b afterwards (deterministic). Input-dependent dB/dC (sums over the channels of a
//   group): butterfly reduce-scatter over the rows of a warp, then shared-memory atomics
//   (conflict-free layout) across the block's warps into NSL copies of the block sums, each
//   taking at most two warps (two float adds onto 0 commute exactly, so the sums are bitwise
//   reproducible); the epilogue adds the copies in a fixed order. Layouts whose two copies would not
//   fit in 48 KiB (R = 32 with N > 32) keep one copy; in deterministic mode (flags & 8) their warps
//   then add in phases (warps 0+1, then 2, then 3, with barriers). Across blocks: by default one
//   float32 global atomic per (block, n, t) into a (B, G, N, L) buffer (the order is not
//   deterministic: dB/dC of input-dependent B/C may differ in the last bits between runs); in
//   deterministic mode each block stores its sums to slice blockIdx.x of a (grid, N, L) buffer (the
//   blocks of one batch entry and group are consecutive slices) that bc_slice_sum adds in a fixed
//   order, writing dB/dC in their own dtype (SSMCORE_SCAN_DET_IMPL=v1, flags & 16: session 4's
//   (blocks per group, B, G, N, L) slices, three integer divisions per stored value, + column_sum).
//   Every other gradient is always deterministic.
// scan_fwd_tp (the output forward when B*D is small, see scan.py): time-parallel instead, one block
//   per row, the steps' affine maps h -> a h + b scanned across threads; see its comment.
// Traffic (forward): u, delta, z read once, out written once, B/C read once per block (L2 hits);
//   floor at B8 D4096 L2048 N16 is the SFU (1.07 G exp2). Backward: the forward's reads plus dout,
//   du/ddelta/dz writes, checkpoints written once and read once; 3 exps per (b, d, n, t).
// All offsets that can exceed 2**31 are 64-bit (i64).
// History (H200, bf16, B8 D4096 L2048 N16 with z/D/delta_bias/softplus; peer fwd 1160 us, fwd+bwd
//   5980 us): v1 fwd 1566 us (S4 R4; its no-output checkpoint pass 897 us), fwd+bwd 16.7 ms;
//   B1 D4096 L2048 fwd 281 us (S1 R16). v1 was latency-bound (tile loads and the epilogue's z loads
//   exposed once per tile) and its backward hit 16-way bank conflicts in the shared-memory atomics.
//   v2 (scan_fwd / scan_bwd with -DSCAN_BWD_V=2: forward register prefetch + z gate in shared memory,
//   conflict-free sRed, no global loads in the backward epilogue): fwd 1255 us, fwd+bwd 7112 (mb3).
//   v3 (session 4, the default; scan_fwd3 and scan_bwd's SCAN_BWD_V=3 paths, see their comments):
//   branch-free SFU-only gate math, all global loads of a tile/chunk issued together, one barrier
//   per forward tile, no shared-memory atomics in the backward. Not measured yet.
#include "common.cuh"

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;

__host__ __device__ constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
__host__ __device__ constexpr int cmin(int a, int b) { return a < b ? a : b; }
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int pow2_floor(int x) { return x <= 1 ? 1 : 2 * pow2_floor(x / 2); }

template <int S, int R>
struct Cfg {
  static constexpr int kNP = S * R;               // padded state size
  static constexpr int kRows = kThreads / R;      // rows per block
  static constexpr int kBS = kNP + 4;             // B/C tile row stride (floats, keeps 16-byte rows)
  // Backward chunk (= checkpoint interval): CH*S registers of states; rows*CH <= 512 bounds shared
  // memory and the per-thread epilogue registers.
  static constexpr int kChunk = cmin(cmin(64 / S, 32), cmax(8, 512 / kRows));
  // Forward tile: a multiple of the chunk, small enough that the next tile's loads fit in registers.
  static constexpr int kTile = cmax(kChunk, cmin(cmin(16, 1024 / kRows), pow2_floor(2048 / kBS)));
};

__device__ __forceinline__ float dsilu_f(float z) {
  const float s = sigmoid_f(z);
  return s * (1.f + z * (1.f - s));
}

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(half_t x) { return __half2float(x); }
__device__ __forceinline__ float as_float(bf16_t x) { return to_float(x); }

__device__ __forceinline__ int lane_id() { return threadIdx.x & (SSM_WARP_SIZE - 1); }

// S consecutive floats of shared memory (aligned to S*4 bytes for S = 2, to 16 for S >= 4).
template <int S>
__device__ __forceinline__ void lds_vec(float (&v)[S], const float* p) {
  if constexpr (S >= 4) {
#pragma unroll
    for (int k = 0; k < S / 4; ++k) {
      const float4 q = reinterpret_cast<const float4*>(p)[k];
      v[4 * k] = q.x;
      v[4 * k + 1] = q.y;
      v[4 * k + 2] = q.z;
      v[4 * k + 3] = q.w;
    }
  } else if constexpr (S == 2) {
    const float2 q = *reinterpret_cast<const float2*>(p);
    v[0] = q.x;
    v[1] = q.y;
  } else {
    v[0] = p[0];
  }
}

// Sum v[0..V) over the 2^NB lanes that differ in lane bits [B0, B0 + NB). A butterfly
// reduce-scatter uses the first kScatter bits (each step sends half of the remaining entries, never
// splitting a run of K entries), plain xor sums the rest. Afterwards v[0 .. kLeft) hold totals of the
// entries offset(lane) + i; lanes whose bits [B0 + kScatter, B0 + NB) are zero own those totals.
template <int V, int B0, int STEP, int NSTEPS>
__device__ __forceinline__ void scatter_steps(float (&v)[V], int lane) {
  if constexpr (STEP < NSTEPS) {
    constexpr int half = V >> (STEP + 1);
    const bool upper = (lane >> (B0 + STEP)) & 1;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + SSM_SHFL_XOR(send, 1 << (B0 + STEP));
    }
    scatter_steps<V, B0, STEP + 1, NSTEPS>(v, lane);
  }
}

template <int V, int B0, int NB, int K = 1>
struct LaneReduce {
  static constexpr int kScatter = cmin(NB, ilog2(V / K));
  static constexpr int kLeft = V >> kScatter;

  __device__ __forceinline__ static void run(float (&v)[V], int lane) {
    scatter_steps<V, B0, 0, kScatter>(v, lane);
#pragma unroll
    for (int k = kScatter; k < NB; ++k) {
#pragma unroll
      for (int i = 0; i < kLeft; ++i) v[i] += SSM_SHFL_XOR(v[i], 1 << (B0 + k));
    }
  }
  __device__ __forceinline__ static int offset(int lane) {
    int o = 0;
#pragma unroll
    for (int k = 0; k < kScatter; ++k) o += ((lane >> (B0 + k)) & 1) * (V >> (k + 1));
    return o;
  }
  __device__ __forceinline__ static bool owner(int lane) {
    return ((lane >> (B0 + kScatter)) & ((1 << (NB - kScatter)) - 1)) == 0;
  }
};

// The rows of one block: batch entry b, channels row0 .. row0 + rows - 1, and the group of an
// input-dependent B (gB) and C (gC) they share.
struct BlockRows {
  int b, row0, rows, gB, gC;
  __device__ BlockRows(int RB, int Dm, int Dblk, int Gblk, int GB, int GC, int ptiles) {
    const int p = blockIdx.x % ptiles;
    const int bg = blockIdx.x / ptiles;
    b = bg / Gblk;
    row0 = (bg % Gblk) * Dblk + p * RB;
    rows = min(RB, Dblk - p * RB);
    gB = row0 / (Dm / GB);
    gC = row0 / (Dm / GC);
  }
};

// B or C of one (batch, group) for steps [t0, t0 + TT) into sX[t][n] (zero outside N and L).
template <typename T, int NP, int TT, int BS>
__device__ __forceinline__ void load_bc_tile(float* sX, const T* X, int N, int L, int t0) {
  constexpr int KE = (NP * TT + kThreads - 1) / kThreads;
#pragma unroll 4
  for (int k = 0; k < KE; ++k) {
    const int e = threadIdx.x + k * kThreads;
    if (NP * TT % kThreads == 0 || e < NP * TT) {
      const int n = e / TT, t = e % TT;
      float v = 0.f;
      if (n < N && t0 + t < L) v = load_f(X + (i64)n * L + t0 + t);
      sX[t * BS + n] = v;
    }
  }
}

// A constant (D, N) B or C for the block's rows into sX[row][n] (zero outside N and the rows).
template <int NP, int BS>
__device__ __forceinline__ void load_bc_const(float* sX, const float* X, int RB, int rows, int row0, int N) {
  for (int e = threadIdx.x; e < RB * NP; e += kThreads) {
    const int i = e / NP, n = e % NP;
    sX[i * BS + n] = (i < rows && n < N) ? X[(i64)(row0 + i) * N + n] : 0.f;
  }
}

// One forward tile of TL steps for one lane: state update, optional y (reduced over the row's lanes
// into sY_i[t]) and checkpoints every CH steps.
template <int S, int R, int TL, int CH, bool kY>
__device__ __forceinline__ void fwd_tile(float (&h)[S], const float (&A2)[S], const float* sDt_i,
                                         const float* sU_i, const float* pB, int sBt, const float* pC,
                                         int sCt, float* sY_i, float* ck, i64 ck_stride, int t0,
                                         int nchunks, int lane) {
  constexpr int TG = cmin(R, TL);
  using Red = LaneReduce<TG, 0, ilog2(R)>;
#pragma unroll(TG >= 4 ? 1 : 4 / TG)
  for (int tg = 0; tg < TL; tg += TG) {
    float yv[TG];
#pragma unroll
    for (int k = 0; k < TG; ++k) {
      const int t = tg + k;
      const float dt = sDt_i[t];
      const float du = dt * sU_i[t];
      float bv[S], cv[S];
      lds_vec<S>(bv, pB + t * sBt);
      if (kY) lds_vec<S>(cv, pC + t * sCt);
      float y = 0.f;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float dA = exp2_fast(dt * A2[s]);
        h[s] = fmaf(dA, h[s], du * bv[s]);
        if (kY) y = fmaf(cv[s], h[s], y);
      }
      yv[k] = y;
      if ((t + 1) % CH == 0 && ck != nullptr) {
        const int c = (t0 + t + 1) / CH;
        if (c < nchunks) {
#pragma unroll
          for (int s = 0; s < S; ++s) ck[c * ck_stride + s] = h[s];
        }
      }
    }
    if (kY) {
      Red::run(yv, lane);
      if (Red::owner(lane)) sY_i[tg + Red::offset(lane)] = yv[0];
    }
  }
}

}  // namespace

// Forward. out == nullptr: no output (checkpoint pass of the backward); ckpt (B, nchunks, D, NP)
// float32 gets the state before each chunk of Cfg::kChunk steps; last (B, D, N) float32 the final
// state. B/C: input-dependent (flags bit 1 / bit 2) as (B, GB|GC, N, L) of T, else (D, N) float32.
// flags bit 0: softplus. The block covers Dblk = D / lcm(GB, GC) channels per (batch, group).
// u, delta, z are read through (batch, channel) strides in elements (su_b, su_d, ...; L stride 1);
// out, last and ckpt are contiguous.
template <typename T, int S, int R>
__global__ void __launch_bounds__(kThreads, 3)
scan_fwd(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
         const void* __restrict__ Bp, const void* __restrict__ Cp, const float* __restrict__ Dv,
         const T* __restrict__ z, const float* __restrict__ bias, const float* __restrict__ h0,
         T* __restrict__ out, float* __restrict__ last, float* __restrict__ ckpt, int L, int Dm,
         int N, int Dblk, int Gblk, int GB, int GC, int ptiles, int flags, int nchunks, i64 su_b,
         i64 su_d, i64 sd_b, i64 sd_d, i64 sz_b, i64 sz_d) {
  using Cf = Cfg<S, R>;
  constexpr int RB = Cf::kRows, TL = Cf::kTile, CH = Cf::kChunk, NP = Cf::kNP, BS = Cf::kBS;
  constexpr int RS = TL + 1;  // odd row stride: the rows of a warp hit different banks
  constexpr int BC_ROWS = cmax(TL, RB);
  constexpr int KE = (RB * TL + kThreads - 1) / kThreads;  // (row, t) elements per thread
  constexpr int KB = (NP * TL + kThreads - 1) / kThreads;  // (n, t) elements of B or C per thread
  __shared__ __align__(16) float sB[BC_ROWS * BS];
  __shared__ __align__(16) float sC[BC_ROWS * BS];
  __shared__ float sDt[RB * RS];
  __shared__ float sU[RB * RS];
  __shared__ float sGate[RB * RS];  // silu(z), or 1
  __shared__ float sY[RB * RS];

  if (ckpt != nullptr && nchunks != (L + CH - 1) / CH) __trap();  // launcher and Cfg disagree
  const BlockRows blk(RB, Dm, Dblk, Gblk, GB, GC, ptiles);
  const int tid = threadIdx.x, i = tid / R, j = tid % R, lane = lane_id();
  const bool row_ok = i < blk.rows;
  const int d = blk.row0 + i;
  const bool softplus = flags & 1, varB = flags & 2, varC = flags & 4;
  const bool want_y = out != nullptr;
  const bool want_C = varC && want_y;

  float A2[S], h[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int n = j * S + s;
    const bool ok = row_ok && n < N;
    A2[s] = ok ? A[(i64)d * N + n] * kLog2e : 0.f;
    h[s] = (ok && h0 != nullptr) ? h0[((i64)blk.b * Dm + d) * N + n] : 0.f;
  }
  if (!varB) load_bc_const<NP, BS>(sB, static_cast<const float*>(Bp), RB, blk.rows, blk.row0, N);
  if (!varC && want_y) load_bc_const<NP, BS>(sC, static_cast<const float*>(Cp), RB, blk.rows, blk.row0, N);
  const float* pB = varB ? sB + j * S : sB + i * BS + j * S;
  const float* pC = varC ? sC + j * S : sC + i * BS + j * S;
  const int sBt = varB ? BS : 0, sCt = varC ? BS : 0;
  const T* Bvar = varB ? static_cast<const T*>(Bp) + ((i64)blk.b * GB + blk.gB) * N * L : nullptr;
  const T* Cvar = varC ? static_cast<const T*>(Cp) + ((i64)blk.b * GC + blk.gC) * N * L : nullptr;
  // Strided inputs (L stride 1): element (b, d, t) of u at u[b * su_b + d * su_d + t] (delta, z alike).
  // Staging element k of this thread (e = tid + k * kThreads; TL divides kThreads) sits at row
  // tid / TL + k * (kThreads / TL), step tid % TL of the tile: one pointer per tensor and thread plus
  // a uniform per-k row step (no per-k 64-bit offsets held in registers).
  static_assert(kThreads % TL == 0, "staging rows per k step");
  const T* u_th = u + (i64)blk.b * su_b + (i64)(blk.row0 + tid / TL) * su_d + tid % TL;
  const T* delta_th = delta + (i64)blk.b * sd_b + (i64)(blk.row0 + tid / TL) * sd_d + tid % TL;
  const T* z_th = z != nullptr ? z + (i64)blk.b * sz_b + (i64)(blk.row0 + tid / TL) * sz_d + tid % TL : nullptr;
  const i64 ku = (kThreads / TL) * su_d, kd = (kThreads / TL) * sd_d, kz = (kThreads / TL) * sz_d;

  float* ck = nullptr;
  const i64 ck_stride = (i64)Dm * NP;
  if (ckpt != nullptr && row_ok) {
    ck = ckpt + ((i64)blk.b * nchunks * Dm + d) * NP + j * S;
#pragma unroll
    for (int s = 0; s < S; ++s) ck[s] = h[s];
  }

  // The next tile's global loads are issued before the current tile's steps and kept in registers
  // as raw elements (converted when they are stored to shared memory), so their latency hides
  // behind the compute.
  T ru[KE], rd[KE], rz[KE], rb[KB], rc[KB];
  auto element_ok = [&](int k, int t0) {
    const int e = tid + k * kThreads;
    return (RB * TL % kThreads == 0 || e < RB * TL) && e / TL < blk.rows && t0 + e % TL < L;
  };
  auto bc_ok = [&](int k, int t0) {
    const int e = tid + k * kThreads;
    return (NP * TL % kThreads == 0 || e < NP * TL) && e / TL < N && t0 + e % TL < L;
  };
  auto offset = [&](int k, int t0) {
    const int e = tid + k * kThreads;
    return ((i64)blk.b * Dm + blk.row0 + e / TL) * L + t0 + e % TL;
  };
  auto fetch = [&](int t0) {
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      if (element_ok(k, t0)) {
        ru[k] = u_th[k * ku + t0];
        rd[k] = delta_th[k * kd + t0];
        if (want_y && z != nullptr) rz[k] = z_th[k * kz + t0];
      }
    }
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (bc_ok(k, t0)) {
        const int e = tid + k * kThreads;
        const i64 off = (i64)(e / TL) * L + t0 + e % TL;
        if (varB) rb[k] = Bvar[off];
        if (want_C) rc[k] = Cvar[off];
      }
    }
  };
  auto commit = [&](int t0) {
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = tid + k * kThreads;
      if (RB * TL % kThreads == 0 || e < RB * TL) {
        const int ii = e / TL, tt = e % TL;
        float uv = 0.f, dtv = 0.f, gate = 1.f;
        if (element_ok(k, t0)) {
          uv = as_float(ru[k]);
          float x = as_float(rd[k]);
          if (bias != nullptr) x += bias[blk.row0 + ii];
          dtv = softplus ? softplus_f(x) : x;
          if (want_y && z != nullptr) gate = silu_f(as_float(rz[k]));
        }
        sU[ii * RS + tt] = uv;
        sDt[ii * RS + tt] = dtv;
        sGate[ii * RS + tt] = gate;
      }
    }
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      const int e = tid + k * kThreads;
      if (NP * TL % kThreads == 0 || e < NP * TL) {
        const int n = e / TL, tt = e % TL;
        const bool ok = bc_ok(k, t0);
        if (varB) sB[tt * BS + n] = ok ? as_float(rb[k]) : 0.f;
        if (want_C) sC[tt * BS + n] = ok ? as_float(rc[k]) : 0.f;
      }
    }
  };

  if (L > 0) fetch(0);
  for (int t0 = 0; t0 < L; t0 += TL) {
    __syncthreads();  // the previous tile's readers are done
    commit(t0);
    __syncthreads();
    if (t0 + TL < L) fetch(t0 + TL);

    if (want_y) {
      fwd_tile<S, R, TL, CH, true>(h, A2, sDt + i * RS, sU + i * RS, pB, sBt, pC, sCt, sY + i * RS,
                                   ck, ck_stride, t0, nchunks, lane);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < KE; ++k) {
        const int e = tid + k * kThreads;
        if (element_ok(k, t0)) {
          const int ii = e / TL, tt = e % TL;
          float y = sY[ii * RS + tt];
          if (Dv != nullptr) y = fmaf(Dv[blk.row0 + ii], sU[ii * RS + tt], y);
          store_f(out + offset(k, t0), y * sGate[ii * RS + tt]);
        }
      }
    } else {
      fwd_tile<S, R, TL, CH, false>(h, A2, sDt + i * RS, sU + i * RS, pB, sBt, pC, sCt, sY + i * RS,
                                    ck, ck_stride, t0, nchunks, lane);
    }
  }

  if (last != nullptr && row_ok) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int n = j * S + s;
      if (n < N) last[((i64)blk.b * Dm + d) * N + n] = h[s];
    }
  }
}

namespace {

// softplus with the SFU only (ex2 + lg2, no log1pf polynomial, no branch): log1p(exp(x)) =
// max(x, 0) + log(1 + exp(-|x|)), absolute error ~1e-7; x > 20 gives x as the reference does.
__device__ __forceinline__ float softplus_sfu(float x) {
  const float e = exp2_fast(-fabsf(x) * kLog2e);
  const float r = fmaxf(x, 0.f) + __logf(1.f + e);
  return x > 20.f ? x : r;
}

// 1 / (1 + exp(-x)) with ex2 + a fast reciprocal (0 for x -> -inf, 1 for x -> inf).
__device__ __forceinline__ float sigmoid_sfu(float x) { return __fdividef(1.f, 1.f + exp2_fast(-x * kLog2e)); }

// One forward tile of TL steps (fully unrolled) for one lane of scan_fwd3: state update,
// checkpoints every CH steps, and with kY the output written straight from the lane that owns
// (row, t) after the reduce-scatter over the row's lanes: out = (y + D u) * gate.
template <typename T, int S, int R, int TL, int CH, int RS, bool kY>
__device__ __forceinline__ void fwd3_tile(float (&h)[S], const float (&A2)[S], const float* sDt_i,
                                          const float* sU_i, const float* sG_i, const float* pB, int sBt,
                                          const float* pC, int sCt, float* ck, i64 ck_stride, int t0,
                                          int nchunks, int lane, bool row_ok, float Di, T* out_i, int L) {
  constexpr int TG = cmin(R, TL);
  using Red = LaneReduce<TG, 0, ilog2(R)>;
#pragma unroll
  for (int tg = 0; tg < TL; tg += TG) {
    float yv[TG];
#pragma unroll
    for (int k = 0; k < TG; ++k) {
      const int t = tg + k;
      const float dt = sDt_i[t];
      const float du = dt * sU_i[t];
      float bv[S], cv[S];
      lds_vec<S>(bv, pB + t * sBt);
      if (kY) lds_vec<S>(cv, pC + t * sCt);
      float y = 0.f;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float dA = exp2_fast(dt * A2[s]);
        h[s] = fmaf(dA, h[s], du * bv[s]);
        if (kY) y = fmaf(cv[s], h[s], y);
      }
      yv[k] = y;
      if ((t + 1) % CH == 0 && ck != nullptr) {
        const int c = (t0 + t + 1) / CH;
        if (c < nchunks) {
#pragma unroll
          for (int s = 0; s < S; ++s) ck[c * ck_stride + s] = h[s];
        }
      }
    }
    if (kY) {
      Red::run(yv, lane);
      const int tt = tg + Red::offset(lane);
      if (Red::owner(lane) && row_ok && t0 + tt < L)
        store_f(out_i + t0 + tt, fmaf(Di, sU_i[tt], yv[0]) * sG_i[tt]);
    }
  }
}

}  // namespace

// Forward v3 (scan.py: SSMCORE_SCAN_FWD_IMPL=v3, the default; R >= 2 layouts), same arguments and
// results as scan_fwd (bitwise equal states: same step order and exps; dt/gate go through the
// SFU-only softplus / silu instead of log1pf and an IEEE divide). What changed against scan_fwd
// (v2), from its SASS: v2 staged each tile with one branchy per-element chain (global load of the
// bias -> log1pf polynomial -> expf -> IEEE reciprocal with its slow-path call -> shared store),
// serialised over the thread's elements, and spent three barriers per tile (before the staging,
// after it, before a cooperative epilogue that re-read y, D, u and the gate). v3:
//  - the staging is branch-free with the bias preloaded per element (its rows never change), so
//    the KE elements' math overlaps;
//  - shared tiles are double-buffered (tile parity) and the output is written by the lane that owns
//    (row, t) after the y reduce-scatter (reading u and the gate of that tile from shared memory):
//    ONE barrier per tile, no sY, no epilogue phase;
//  - the tile's steps are fully unrolled (compile-time checkpoint tests; the next group's shared
//    loads and exps can be scheduled under the previous group's shuffles).
// Registers capped for 4 blocks per SM (16 warps, 128 registers), 3 (168) for the layouts that would
// spill at 128 (many staging elements per thread with S >= 4, or NP >= 64).
template <int S, int R>
__host__ __device__ constexpr int fwd3_min_blocks() {
  return ((S >= 4 && (kThreads / R) * Cfg<S, R>::kTile / kThreads >= 8) || S * R >= 64) ? 3 : 4;
}

template <typename T, int S, int R>
__global__ void __launch_bounds__(kThreads, (fwd3_min_blocks<S, R>()))
scan_fwd3(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
          const void* __restrict__ Bp, const void* __restrict__ Cp, const float* __restrict__ Dv,
          const T* __restrict__ z, const float* __restrict__ bias, const float* __restrict__ h0,
          T* __restrict__ out, float* __restrict__ last, float* __restrict__ ckpt, int L, int Dm,
          int N, int Dblk, int Gblk, int GB, int GC, int ptiles, int flags, int nchunks, i64 su_b,
          i64 su_d, i64 sd_b, i64 sd_d, i64 sz_b, i64 sz_d) {
  using Cf = Cfg<S, R>;
  constexpr int RB = Cf::kRows, TL = Cf::kTile, CH = Cf::kChunk, NP = Cf::kNP, BS = Cf::kBS;
  constexpr int RS = TL + 4;  // TL is a power of two >= 8: RS / 4 odd keeps rows on distinct banks
  constexpr int BC_ROWS = cmax(TL, RB);
  constexpr int KE = (RB * TL + kThreads - 1) / kThreads;  // (row, t) elements per thread
  constexpr int KB = (NP * TL + kThreads - 1) / kThreads;  // (n, t) elements of B or C per thread
  __shared__ __align__(16) float sB[2][BC_ROWS * BS];
  __shared__ __align__(16) float sC[2][BC_ROWS * BS];
  __shared__ __align__(16) float sDt[2][RB * RS];
  __shared__ __align__(16) float sU[2][RB * RS];
  __shared__ __align__(16) float sGate[2][RB * RS];  // silu(z), or 1

  if (ckpt != nullptr && nchunks != (L + CH - 1) / CH) __trap();  // launcher and Cfg disagree
  const BlockRows blk(RB, Dm, Dblk, Gblk, GB, GC, ptiles);
  const int tid = threadIdx.x, i = tid / R, j = tid % R, lane = lane_id();
  const bool row_ok = i < blk.rows;
  const int d = blk.row0 + i;
  const bool softplus = flags & 1, varB = flags & 2, varC = flags & 4;
  const bool want_y = out != nullptr;
  const bool want_C = varC && want_y;
  const bool want_z = want_y && z != nullptr;

  float A2[S], h[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int n = j * S + s;
    const bool ok = row_ok && n < N;
    A2[s] = ok ? A[(i64)d * N + n] * kLog2e : 0.f;
    h[s] = (ok && h0 != nullptr) ? h0[((i64)blk.b * Dm + d) * N + n] : 0.f;
  }
  const float Di = (row_ok && Dv != nullptr) ? Dv[d] : 0.f;
  if (!varB) {
    load_bc_const<NP, BS>(sB[0], static_cast<const float*>(Bp), RB, blk.rows, blk.row0, N);
    load_bc_const<NP, BS>(sB[1], static_cast<const float*>(Bp), RB, blk.rows, blk.row0, N);
  }
  if (!varC && want_y) {
    load_bc_const<NP, BS>(sC[0], static_cast<const float*>(Cp), RB, blk.rows, blk.row0, N);
    load_bc_const<NP, BS>(sC[1], static_cast<const float*>(Cp), RB, blk.rows, blk.row0, N);
  }
  const int oB = varB ? j * S : i * BS + j * S;
  const int oC = varC ? j * S : i * BS + j * S;
  const int sBt = varB ? BS : 0, sCt = varC ? BS : 0;
  const T* Bvar = varB ? static_cast<const T*>(Bp) + ((i64)blk.b * GB + blk.gB) * N * L : nullptr;
  const T* Cvar = varC ? static_cast<const T*>(Cp) + ((i64)blk.b * GC + blk.gC) * N * L : nullptr;
  // Strided inputs (L stride 1): element (b, d, t) of u at u[b * su_b + d * su_d + t] (delta, z alike).
  // Staging element k of this thread (e = tid + k * kThreads; TL divides kThreads) sits at row
  // tid / TL + k * (kThreads / TL), step tid % TL of the tile: one pointer per tensor and thread plus
  // a uniform per-k row step (no per-k 64-bit offsets held in registers).
  static_assert(kThreads % TL == 0, "staging rows per k step");
  const T* u_th = u + (i64)blk.b * su_b + (i64)(blk.row0 + tid / TL) * su_d + tid % TL;
  const T* delta_th = delta + (i64)blk.b * sd_b + (i64)(blk.row0 + tid / TL) * sd_d + tid % TL;
  const T* z_th = z != nullptr ? z + (i64)blk.b * sz_b + (i64)(blk.row0 + tid / TL) * sz_d + tid % TL : nullptr;
  const i64 ku = (kThreads / TL) * su_d, kd = (kThreads / TL) * sd_d, kz = (kThreads / TL) * sz_d;
  T* out_i = want_y ? out + ((i64)blk.b * Dm + (row_ok ? d : blk.row0)) * L : nullptr;

  float* ck = nullptr;
  const i64 ck_stride = (i64)Dm * NP;
  if (ckpt != nullptr && row_ok) {
    ck = ckpt + ((i64)blk.b * nchunks * Dm + d) * NP + j * S;
#pragma unroll
    for (int s = 0; s < S; ++s) ck[s] = h[s];
  }

  // Per staging element k: its row never changes (e = tid + k * kThreads, row e / TL), so the
  // bias is loaded once.
  float bias_k[KE];
#pragma unroll
  for (int k = 0; k < KE; ++k) {
    const int ii = (tid + k * kThreads) / TL;
    bias_k[k] = (bias != nullptr && ii < blk.rows) ? bias[blk.row0 + ii] : 0.f;
  }

  // The next tile's global loads go into registers before the current tile's steps (raw
  // elements, converted at staging); elements outside the rows / L keep stale values that the
  // staging replaces by the identity step (dt 0, u 0, gate 1, B/C 0).
  T ru[KE], rd[KE], rz[KE], rb[KB], rc[KB];
  const T zero_t = T{};
#pragma unroll
  for (int k = 0; k < KE; ++k) ru[k] = rd[k] = rz[k] = zero_t;
#pragma unroll
  for (int k = 0; k < KB; ++k) rb[k] = rc[k] = zero_t;
  auto element_ok = [&](int k, int t0) {
    const int e = tid + k * kThreads;
    return (RB * TL % kThreads == 0 || e < RB * TL) && e / TL < blk.rows && t0 + e % TL < L;
  };
  auto bc_ok = [&](int k, int t0) {
    const int e = tid + k * kThreads;
    return (NP * TL % kThreads == 0 || e < NP * TL) && e / TL < N && t0 + e % TL < L;
  };
  auto fetch = [&](int t0) {
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      if (element_ok(k, t0)) {
        ru[k] = u_th[k * ku + t0];
        rd[k] = delta_th[k * kd + t0];
        if (want_z) rz[k] = z_th[k * kz + t0];
      }
    }
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      if (bc_ok(k, t0)) {
        const int e = tid + k * kThreads;
        const i64 off = (i64)(e / TL) * L + t0 + e % TL;
        if (varB) rb[k] = Bvar[off];
        if (want_C) rc[k] = Cvar[off];
      }
    }
  };
  auto commit = [&](int t0, int buf) {
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = tid + k * kThreads;
      if (RB * TL % kThreads == 0 || e < RB * TL) {
        const int ii = e / TL, tt = e % TL;
        const bool ok = element_ok(k, t0);
        const float x = as_float(rd[k]) + bias_k[k];
        const float dtv = softplus ? softplus_sfu(x) : x;
        const float zv = as_float(rz[k]);  // computed without z too (rz = 0): no branch
        const float gate = want_z ? __fdividef(zv, 1.f + exp2_fast(-zv * kLog2e)) : 1.f;
        sU[buf][ii * RS + tt] = ok ? as_float(ru[k]) : 0.f;
        sDt[buf][ii * RS + tt] = ok ? dtv : 0.f;
        sGate[buf][ii * RS + tt] = ok ? gate : 1.f;
      }
    }
#pragma unroll
    for (int k = 0; k < KB; ++k) {
      const int e = tid + k * kThreads;
      if (NP * TL % kThreads == 0 || e < NP * TL) {
        const int n = e / TL, tt = e % TL;
        const bool ok = bc_ok(k, t0);
        if (varB) sB[buf][tt * BS + n] = ok ? as_float(rb[k]) : 0.f;
        if (want_C) sC[buf][tt * BS + n] = ok ? as_float(rc[k]) : 0.f;
      }
    }
  };

  // One barrier per tile: tile t's staging goes to buffer t & 1, whose last readers (tile t - 2's
  // steps) finished before the barrier of tile t - 1.
  if (L > 0) fetch(0);
  int buf = 0;
  for (int t0 = 0; t0 < L; t0 += TL, buf ^= 1) {
    commit(t0, buf);
    __syncthreads();
    if (t0 + TL < L) fetch(t0 + TL);
    const float* sDt_i = sDt[buf] + i * RS;
    const float* sU_i = sU[buf] + i * RS;
    const float* sG_i = sGate[buf] + i * RS;
    if (want_y) {
      fwd3_tile<T, S, R, TL, CH, RS, true>(h, A2, sDt_i, sU_i, sG_i, sB[buf] + oB, sBt, sC[buf] + oC, sCt,
                                          ck, ck_stride, t0, nchunks, lane, row_ok, Di, out_i, L);
    } else {
      fwd3_tile<T, S, R, TL, CH, RS, false>(h, A2, sDt_i, sU_i, sG_i, sB[buf] + oB, sBt, sC[buf] + oC, sCt,
                                           ck, ck_stride, t0, nchunks, lane, row_ok, Di, out_i, L);
    }
  }

  if (last != nullptr && row_ok) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int n = j * S + s;
      if (n < N) last[((i64)blk.b * Dm + d) * N + n] = h[s];
    }
  }
}

// Time-parallel forward (output pass only: no checkpoints), for grids the lane layouts leave
// short of work (batch 1). One block of kThreads threads per (b, d) row; a chunk of kThreads * 8
// steps has thread k own steps c0 + 8k .. c0 + 8k + 7 (16-byte loads of u, delta, z and of each
// B_n / C_n row for 16-bit types). For NB state entries at a time the thread folds its 8 steps
// into one affine map h -> a h + b (a = prod exp(dt A), the exps kept in registers), the block
// scans those maps in order (warp shuffles, then the 4 warp totals through shared memory, then the
// carried state of the previous chunk; TP_NB = 1, 2 or 4), and the thread replays its 8 steps from the right state,
// adding C_t h_t to y_t. One exp per (n, t), u/delta/z/out once, B/C rows once per block (L2 hits
// across the channels of a group). The carried state per n lives in shared memory, double-buffered
// by chunk parity, as are the warp totals. flags as scan_fwd (bit 0 softplus, 1 / 2 varB / varC).
// vec: L % 8 == 0 and 16-byte aligned rows (else element loads): with the strided inputs (su_*, sd_*,
// sz_*: (batch, channel) strides in elements, L stride 1), the launcher also needs every stride % 8 == 0.
// PF = 1 (session 6): the B / C rows of the next TP_NB state entries are loaded (raw 16-byte words) before the
// current entries' exps, scan and barrier, so their L2 round trip is hidden behind that work instead of
// starting each state entry (32 serial round trips per block at N 16, L 2048).
template <typename T>
struct Raw8 {  // 8 consecutive elements of T as loaded, converted at use
  static constexpr int PER = 16 / sizeof(T), NWD = 8 / PER;
  uint4 w[NWD];
  __device__ __forceinline__ void load(const T* p, i64 i, i64 n, bool vec) {
    if (vec && i + 8 <= n) {
#pragma unroll
      for (int h = 0; h < NWD; ++h) w[h] = *reinterpret_cast<const uint4*>(p + i + h * PER);
    } else {
      T* e = reinterpret_cast<T*>(w);
#pragma unroll
      for (int k = 0; k < 8; ++k) store_f(e + k, (i + k < n) ? load_f(p + i + k) : 0.f);
    }
  }
  __device__ __forceinline__ void to_f(float (&v)[8]) const {
    const T* e = reinterpret_cast<const T*>(w);
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = load_f(e + k);
  }
};

template <typename T, int TP_NB, int PF>
__global__ void __launch_bounds__(kThreads)
scan_fwd_tp(const T* __restrict__ u, const T* __restrict__ delta, const float* __restrict__ A,
            const void* __restrict__ Bp, const void* __restrict__ Cp, const float* __restrict__ Dv,
            const T* __restrict__ z, const float* __restrict__ bias, const float* __restrict__ h0,
            T* __restrict__ out, float* __restrict__ last, int L, int Dm, int N, int GB, int GC, int flags,
            int vec, i64 su_b, i64 su_d, i64 sd_b, i64 sd_d, i64 sz_b, i64 sz_d) {
  constexpr int K = 8, NW = kThreads / SSM_WARP_SIZE;
  __shared__ float sCarry[2][256];
  __shared__ float sWa[2][256][NW];
  __shared__ float sWb[2][256][NW];
  const i64 rowid = blockIdx.x;  // b * Dm + d
  const int b = (int)(blockIdx.x / (unsigned)Dm), d = (int)(blockIdx.x % (unsigned)Dm);
  const bool softplus = flags & 1, varB = flags & 2, varC = flags & 4;
  const int tid = threadIdx.x, lane = lane_id(), warp = tid / SSM_WARP_SIZE;
  const T* Bvar = varB ? static_cast<const T*>(Bp) + ((i64)b * GB + d / (Dm / GB)) * N * L : nullptr;
  const T* Cvar = varC ? static_cast<const T*>(Cp) + ((i64)b * GC + d / (Dm / GC)) * N * L : nullptr;
  const float* Bc = varB ? nullptr : static_cast<const float*>(Bp) + (i64)d * N;
  const float* Cc = varC ? nullptr : static_cast<const float*>(Cp) + (i64)d * N;
  const float bias_d = bias ? bias[d] : 0.f;
  const float D_d = Dv ? Dv[d] : 0.f;
  // Strided rows (L stride 1): row (b, d) of u starts at u + b * su_b + d * su_d (delta, z alike). The
  // three offsets sit in shared memory, read where used (held in registers across the chunk loop they
  // made TP_NB = 4 spill at sm_80).
  __shared__ i64 sRow[3];
  if (tid == 0) {
    sRow[0] = (i64)b * su_b + (i64)d * su_d;
    sRow[1] = (i64)b * sd_b + (i64)d * sd_d;
    sRow[2] = (i64)b * sz_b + (i64)d * sz_d;
  }
  __syncthreads();
  for (int n = tid; n < N; n += kThreads) sCarry[0][n] = h0 ? h0[rowid * N + n] : 0.f;

  int par = 0;
  for (i64 c0 = 0; c0 < L; c0 += kThreads * K, par ^= 1) {
    const i64 t0 = c0 + tid * K;
    float uv[K], dt[K], y[K];
    load_chunk8(u + sRow[0], t0, (i64)L, vec, uv);
    load_chunk8(delta + sRow[1], t0, (i64)L, vec, dt);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const float x = dt[k] + bias_d;
      dt[k] = t0 + k < L ? (softplus ? softplus_f(x) : x) : 0.f;  // past L: the identity map
      y[k] = 0.f;
    }
    constexpr int NPF = PF ? TP_NB : 1;
    Raw8<T> pB[NPF], pC[NPF];  // PF: the B / C rows of the state entries n0 .. n0 + TP_NB - 1
    auto fetch = [&](int first) {
#pragma unroll
      for (int q = 0; q < NPF; ++q) {
        const int n = first + q < N ? first + q : N - 1;
        if (varB) pB[q].load(Bvar + (i64)n * L, t0, (i64)L, vec);
        if (varC) pC[q].load(Cvar + (i64)n * L, t0, (i64)L, vec);
      }
    };
    if (PF) fetch(0);  // N >= 1 (the launcher takes PF = 0 for N = 0: n would clamp to -1)
    for (int n0 = 0; n0 < N; n0 += TP_NB) {
      float a[TP_NB][K], bu[TP_NB][K], cv[TP_NB][K], ma[TP_NB], mb[TP_NB];
      Raw8<T> qB[NPF], qC[NPF];
      if (PF) {
#pragma unroll
        for (int q = 0; q < NPF; ++q) {
          qB[q] = pB[q];
          qC[q] = pC[q];
        }
        if (n0 + TP_NB < N) fetch(n0 + TP_NB);
      }
#pragma unroll
      for (int q = 0; q < TP_NB; ++q) {
        const int n = n0 + q < N ? n0 + q : N - 1;  // duplicates past N are computed, not used
        const float A2 = A[(i64)d * N + n] * kLog2e;
        float bv[K];
        if (varB) {
          if (PF)
            qB[q < NPF ? q : 0].to_f(bv);
          else
            load_chunk8(Bvar + (i64)n * L, t0, (i64)L, vec, bv);
        } else {
#pragma unroll
          for (int k = 0; k < K; ++k) bv[k] = Bc[n];
        }
        if (varC) {
          if (PF)
            qC[q < NPF ? q : 0].to_f(cv[q]);
          else
            load_chunk8(Cvar + (i64)n * L, t0, (i64)L, vec, cv[q]);
        } else {
#pragma unroll
          for (int k = 0; k < K; ++k) cv[q][k] = Cc[n];
        }
        float pa = 1.f, pb = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          a[q][k] = exp2_fast(dt[k] * A2);
          bu[q][k] = dt[k] * uv[k] * bv[k];
          pb = fmaf(a[q][k], pb, bu[q][k]);
          pa *= a[q][k];
        }
        // Inclusive scan of the maps over the warp's lanes (earlier lanes act first).
#pragma unroll
        for (int off = 1; off < SSM_WARP_SIZE; off <<= 1) {
          const float qa = SSM_SHFL_UP(pa, off), qb = SSM_SHFL_UP(pb, off);
          if (lane >= off) {
            pb = fmaf(pa, qb, pb);
            pa *= qa;
          }
        }
        if (lane == SSM_WARP_SIZE - 1 && n0 + q < N) {
          sWa[par][n0 + q][warp] = pa;
          sWb[par][n0 + q][warp] = pb;
        }
        // Exclusive: the map of the lanes before this one.
        const float ea = SSM_SHFL_UP(pa, 1), eb = SSM_SHFL_UP(pb, 1);
        ma[q] = lane == 0 ? 1.f : ea;
        mb[q] = lane == 0 ? 0.f : eb;
      }
      __syncthreads();
#pragma unroll
      for (int q = 0; q < TP_NB; ++q) {
        if (n0 + q >= N) break;
        const int n = n0 + q;
        float h = sCarry[par][n];
        float hend = h;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
          if (w == warp) h = hend;
          hend = fmaf(sWa[par][n][w], hend, sWb[par][n][w]);
        }
        if (tid == 0) sCarry[par ^ 1][n] = hend;
        h = fmaf(ma[q], h, mb[q]);
#pragma unroll
        for (int k = 0; k < K; ++k) {
          h = fmaf(a[q][k], h, bu[q][k]);
          y[k] = fmaf(cv[q][k], h, y[k]);
        }
      }
    }
    float zv[K];
    if (z) load_chunk8(z + sRow[2], t0, (i64)L, vec, zv);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float o = fmaf(D_d, uv[k], y[k]);
      if (z) o *= silu_f(zv[k]);
      y[k] = o;
    }
    if (t0 < L) store_chunk8(out + rowid * L, t0, (i64)L, vec, y);
  }
  __syncthreads();
  if (last)
    for (int n = tid; n < N; n += kThreads) last[rowid * N + n] = sCarry[par][n];
}

// Backward. ckpt from scan_fwd (same S, R). Writes du, ddelta (, dz) of T; float32 partials per
// batch entry: dA_part (B, D, N), dD_part / dbias_part (B, D) (nullptr when absent), constant
// dB/dC as (B, D, N); input-dependent dB/dC accumulate (atomics) into zeroed (B, G, N, L) float32,
// or with flags & 8 (deterministic) are stored per block into slice blockIdx.x of (grid, N, L)
// (flags & 16 as well: into (Gblk / G * ptiles, B, G, N, L), the v1 layout);
// dh0 (B, D, N) float32 (nullptr when there is no initial state).
// dout, u, delta, z are read through (batch, channel) strides in elements (so_*, su_*, sd_*, sz_*; L
// stride 1); du, ddelta, dz are written contiguous.
// Blocks per SM the backward's registers are capped for (a speed variant: -DSCAN_BWD_MIN_BLOCKS=3
// caps them at 168 per thread; scan.py sets it from SSMCORE_SCAN_BWD_MIN_BLOCKS).
#ifndef SCAN_BWD_MIN_BLOCKS
#define SCAN_BWD_MIN_BLOCKS 2
#endif
// Backward version (scan.py: SSMCORE_SCAN_BWD_IMPL, passed as -DSCAN_BWD_V=2 for the old one).
// v3 against v2 (from v2's SASS at S4 R4): (1) the chunk's global loads (u, delta, dout, z, bias,
// B/C tile, checkpoint) are all issued before any of them is used; v2 loaded, converted and stored
// one element at a time, each behind a branch, so ~6 DRAM latencies per chunk were serial. (2) The
// per-element math is branch-free on the SFU (softplus, sigmoid, silu, silu'; sigmoid(x) kept in
// shared memory for the epilogue instead of expm1f there). (3) dB/dC block sums: every warp
// writes its own copy with plain stores (each (kind, n, t) cell has exactly one owner lane per
// warp and chunk) and the epilogue adds the copies in a fixed order; v2's shared float atomicAdd
// compiled to an ATOMS.CAST.SPIN compare-and-swap loop, 16 per thread per chunk on the critical
// path. Layouts whose per-warp copies do not fit keep v2's shared atomics.
#ifndef SCAN_BWD_V
#define SCAN_BWD_V 3
#endif
template <typename T, int S, int R>
__global__ void __launch_bounds__(kThreads, SCAN_BWD_MIN_BLOCKS)
scan_bwd(const T* __restrict__ dout, const T* __restrict__ u, const T* __restrict__ delta,
         const float* __restrict__ A, const void* __restrict__ Bp, const void* __restrict__ Cp,
         const float* __restrict__ Dv, const T* __restrict__ z, const float* __restrict__ bias,
         const float* __restrict__ ckpt, const float* __restrict__ dlast, T* __restrict__ du,
         T* __restrict__ ddelta, T* __restrict__ dz, float* __restrict__ dA_part,
         float* __restrict__ dB_out, float* __restrict__ dC_out, float* __restrict__ dD_part,
         float* __restrict__ dbias_part, float* __restrict__ dh0, int L, int Dm, int N, int Dblk,
         int Gblk, int GB, int GC, int ptiles, int flags, int nchunks, i64 so_b, i64 so_d, i64 su_b,
         i64 su_d, i64 sd_b, i64 sd_d, i64 sz_b, i64 sz_d) {
  using Cf = Cfg<S, R>;
  constexpr int kWarps = kThreads / SSM_WARP_SIZE;
  constexpr int RB = Cf::kRows, CH = Cf::kChunk, NP = Cf::kNP, BS = Cf::kBS;
  constexpr int RS = CH + 1;
  constexpr int BC_ROWS = cmax(CH, RB);
  constexpr int KE = (RB * CH + kThreads - 1) / kThreads;
  constexpr int LOG_R = ilog2(R);
  constexpr int ROW_BITS = ilog2(SSM_WARP_SIZE) - LOG_R;  // lane bits that pick the row in a warp
  constexpr int TG = cmin(R, CH);                         // steps per reduce over a row's lanes
  constexpr int TGR = cmin(CH, cmax(1, (1 << ROW_BITS) / (2 * S)));  // steps per reduce over rows
  constexpr int TGM = cmax(TG, TGR);
  using RedRow = LaneReduce<TG, 0, LOG_R>;       // y
  using RedRow2 = LaneReduce<2 * TG, 0, LOG_R, 2>;  // (<g, B>, <g, A dA h_prev>)
  using RedCol = LaneReduce<2 * S * TGR, LOG_R, ROW_BITS>;  // dB, dC over the rows of a warp

  __shared__ __align__(16) float sB[BC_ROWS * BS];
  __shared__ __align__(16) float sC[BC_ROWS * BS];
  __shared__ float sU[RB * RS];
  __shared__ float sDt[RB * RS];
  __shared__ float sDy[RB * RS];
  __shared__ float sY[RB * RS];
  __shared__ float sGB[RB * RS];
  __shared__ float sWA[RB * RS];
  constexpr int RED_S = CH + 1;  // odd: the 32 (kind, n) totals a warp adds at one t hit 32 banks
  // [copy][dB|dC][n][t] block sums of input-dependent dB/dC; warp w adds into copy w * NSL / kWarps.
  constexpr int RED_N = 2 * NP * RED_S;
  // v3 needs two more shared arrays; layouts where they would pass 48 KiB (one lane per row) keep v2.
  constexpr bool kV3 = SCAN_BWD_V >= 3 &&
      4 * (2 * BC_ROWS * BS + 7 * RB * RS + 3 * S * kThreads + 2 * RB * CH + 2 * NP * RED_S) <= 48 * 1024;
  constexpr int kSmemOther = 4 * (2 * BC_ROWS * BS + (kV3 ? 7 : 6) * RB * RS + (kV3 ? 3 : 2) * S * kThreads +
                                  2 * RB * CH);
  constexpr bool kOwnCopies = kV3 && kWarps >= 2 && kSmemOther + 4 * kWarps * RED_N <= 48 * 1024;
  constexpr int NSL = kOwnCopies ? kWarps : (kWarps >= 2 && kSmemOther + 4 * 2 * RED_N <= 48 * 1024) ? 2 : 1;
  constexpr int KBC = (NP * CH + kThreads - 1) / kThreads;  // (n, t) elements of a B/C tile per thread
  constexpr bool kPairs = kWarps <= 2 * NSL;  // at most two warps per copy: adds commute exactly
  __shared__ float sRed[NSL * RED_N];
  __shared__ float sConst[2 * S * kThreads];  // [dB|dC][s][thread] time sums of constant dB/dC
  __shared__ float sAccD[RB * CH];     // per epilogue slot: sums over chunks of dy u
  __shared__ float sAccBias[RB * CH];  // and of ddelta
  __shared__ float sSl[kV3 ? RB * RS : 1];          // v3: softplus'(x) = sigmoid(x) per (row, t)
  __shared__ float sH0[kV3 ? S * kThreads : 1];      // v3: the chunk's checkpoint, [s][thread]

  if (nchunks != (L + CH - 1) / CH) __trap();  // launcher and Cfg disagree
  const BlockRows blk(RB, Dm, Dblk, Gblk, GB, GC, ptiles);
  const int tid = threadIdx.x, i = tid / R, j = tid % R, lane = lane_id();
  const bool row_ok = i < blk.rows;
  const int d = blk.row0 + i;
  const bool softplus = flags & 1, varB = flags & 2, varC = flags & 4, det = flags & 8;
  const bool det_v1 = det && (flags & 16);  // deterministic, session 4's slice layout
  const int warp = tid / SSM_WARP_SIZE;
  float* sRedW = sRed + (warp * NSL / kWarps) * RED_N;  // this warp's copy
  // Deterministic with more than two warps on one copy: add in phases (0+1 | 2 | 3 | ...).
  const bool phased = !kPairs && det;
  const i64 row_state = ((i64)blk.b * Dm + d) * N;  // (b, d, 0) of (B, D, N) arrays

  // Registers hold what every step touches; sums that only some layouts need live in shared memory.
  float A2[S], carry[S], dA_acc[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int n = j * S + s;
    const bool ok = row_ok && n < N;
    A2[s] = ok ? A[(i64)d * N + n] * kLog2e : 0.f;
    carry[s] = (ok && dlast != nullptr) ? dlast[row_state + n] : 0.f;
    dA_acc[s] = 0.f;
    sConst[s * kThreads + tid] = 0.f;
    sConst[(S + s) * kThreads + tid] = 0.f;
  }
  for (int e = tid; e < RB * CH; e += kThreads) sAccD[e] = sAccBias[e] = 0.f;
  for (int e = tid; e < NSL * RED_N; e += kThreads) sRed[e] = 0.f;
  if (!varB) load_bc_const<NP, BS>(sB, static_cast<const float*>(Bp), RB, blk.rows, blk.row0, N);
  if (!varC) load_bc_const<NP, BS>(sC, static_cast<const float*>(Cp), RB, blk.rows, blk.row0, N);
  const float* pB = varB ? sB + j * S : sB + i * BS + j * S;
  const float* pC = varC ? sC + j * S : sC + i * BS + j * S;
  const int sBt = varB ? BS : 0, sCt = varC ? BS : 0;
  const T* Bvar = varB ? static_cast<const T*>(Bp) + ((i64)blk.b * GB + blk.gB) * N * L : nullptr;
  const T* Cvar = varC ? static_cast<const T*>(Cp) + ((i64)blk.b * GC + blk.gC) * N * L : nullptr;
  // Strided inputs (L stride 1): element (b, d, t) of u at u[b * su_b + d * su_d + t] (delta, z, dout
  // alike). Load element k of this thread (e = tid + k * kThreads; CH divides kThreads) sits at row
  // tid / CH + k * (kThreads / CH), step tid % CH of the chunk: one pointer per tensor and thread plus a
  // uniform per-k row step (no per-k 64-bit offsets held across the chunk loop).
  static_assert(kThreads % CH == 0, "load rows per k step");
  const int r_th = blk.row0 + tid / CH;
  const T* u_th = u + (i64)blk.b * su_b + (i64)r_th * su_d + tid % CH;
  const T* delta_th = delta + (i64)blk.b * sd_b + (i64)r_th * sd_d + tid % CH;
  const T* dout_th = dout + (i64)blk.b * so_b + (i64)r_th * so_d + tid % CH;
  const T* z_th = z != nullptr ? z + (i64)blk.b * sz_b + (i64)r_th * sz_d + tid % CH : nullptr;
  const i64 ku = (kThreads / CH) * su_d, kd = (kThreads / CH) * sd_d, ko = (kThreads / CH) * so_d,
            kz = (kThreads / CH) * sz_d;
  const float* ck = ckpt + ((i64)blk.b * nchunks * Dm + (row_ok ? d : blk.row0)) * NP + j * S;
  const i64 ck_stride = (i64)Dm * NP;
  const float* sU_i = sU + i * RS;
  const float* sDt_i = sDt + i * RS;
  const float* sDy_i = sDy + i * RS;

  for (int c = nchunks - 1; c >= 0; --c) {
    const int t0 = c * CH;
    __syncthreads();  // the previous chunk's epilogue is done with shared memory
    float dz_factor[KE];  // dout * silu'(z) of this thread's epilogue elements
    if constexpr (kV3) {
      // Every global load of the chunk first (raw elements), then the math, then the stores.
      T ru[KE], rd[KE], ro[KE], rz[KE], rb[KBC], rc[KBC];
      float rbias[KE], rh[S];
#pragma unroll
      for (int k = 0; k < KE; ++k) {
        const int e = tid + k * kThreads;
        const int ii = e / CH, t = t0 + e % CH;
        ru[k] = rd[k] = ro[k] = rz[k] = T{};
        rbias[k] = 0.f;
        if ((RB * CH % kThreads == 0 || e < RB * CH) && ii < blk.rows && t < L) {
          ru[k] = u_th[k * ku + t0];
          rd[k] = delta_th[k * kd + t0];
          ro[k] = dout_th[k * ko + t0];
          if (z != nullptr) rz[k] = z_th[k * kz + t0];
          if (bias != nullptr) rbias[k] = bias[blk.row0 + ii];
        }
      }
#pragma unroll
      for (int k = 0; k < KBC; ++k) {
        const int e = tid + k * kThreads;
        const int n = e / CH, t = t0 + e % CH;
        rb[k] = rc[k] = T{};
        if ((NP * CH % kThreads == 0 || e < NP * CH) && n < N && t < L) {
          if (varB) rb[k] = Bvar[(i64)n * L + t];
          if (varC) rc[k] = Cvar[(i64)n * L + t];
        }
      }
#pragma unroll
      for (int s = 0; s < S; ++s) rh[s] = row_ok ? ck[c * ck_stride + s] : 0.f;
#pragma unroll
      for (int k = 0; k < KE; ++k) {
        const int e = tid + k * kThreads;
        if (RB * CH % kThreads == 0 || e < RB * CH) {
          const int ii = e / CH, tt = e % CH;
          const bool ok = ii < blk.rows && t0 + tt < L;
          const float x = as_float(rd[k]) + rbias[k];
          const float dtv = softplus ? softplus_sfu(x) : x;
          const float slope = (softplus && x <= 20.f) ? sigmoid_sfu(x) : 1.f;
          const float zv = as_float(rz[k]);
          const float sz = sigmoid_sfu(zv);  // also without z (then unused): no branch
          float dyv = as_float(ro[k]);
          dz_factor[k] = (ok && z != nullptr) ? dyv * sz * fmaf(zv, 1.f - sz, 1.f) : 0.f;
          if (z != nullptr) dyv *= zv * sz;
          sU[ii * RS + tt] = ok ? as_float(ru[k]) : 0.f;
          sDt[ii * RS + tt] = ok ? dtv : 0.f;
          sDy[ii * RS + tt] = ok ? dyv : 0.f;
          sSl[ii * RS + tt] = slope;
        }
      }
#pragma unroll
      for (int k = 0; k < KBC; ++k) {
        const int e = tid + k * kThreads;
        if (NP * CH % kThreads == 0 || e < NP * CH) {
          const int n = e / CH, tt = e % CH;
          const bool ok = n < N && t0 + tt < L;
          if (varB) sB[tt * BS + n] = ok ? as_float(rb[k]) : 0.f;
          if (varC) sC[tt * BS + n] = ok ? as_float(rc[k]) : 0.f;
        }
      }
#pragma unroll
      for (int s = 0; s < S; ++s) sH0[s * kThreads + tid] = rh[s];
    } else {
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = tid + k * kThreads;
      dz_factor[k] = 0.f;
      if (RB * CH % kThreads == 0 || e < RB * CH) {
        const int ii = e / CH, tt = e % CH, t = t0 + tt;
        float uv = 0.f, dtv = 0.f, dyv = 0.f;
        if (ii < blk.rows && t < L) {
          const int dd = blk.row0 + ii;
          uv = load_f(u_th + k * ku + t0);
          float x = load_f(delta_th + k * kd + t0);
          if (bias != nullptr) x += bias[dd];
          dtv = softplus ? softplus_f(x) : x;
          dyv = load_f(dout_th + k * ko + t0);
          if (z != nullptr) {
            const float zv = load_f(z_th + k * kz + t0);
            dz_factor[k] = dyv * dsilu_f(zv);
            dyv *= silu_f(zv);
          }
        }
        sU[ii * RS + tt] = uv;
        sDt[ii * RS + tt] = dtv;
        sDy[ii * RS + tt] = dyv;
      }
    }
    if (varB) load_bc_tile<T, NP, CH, BS>(sB, Bvar, N, L, t0);
    if (varC) load_bc_tile<T, NP, CH, BS>(sC, Cvar, N, L, t0);
    }
    float hstart[S];
    if constexpr (!kV3) {
#pragma unroll
      for (int s = 0; s < S; ++s) hstart[s] = row_ok ? ck[c * ck_stride + s] : 0.f;
    }
    __syncthreads();
    if constexpr (kV3) {
#pragma unroll
      for (int s = 0; s < S; ++s) hstart[s] = sH0[s * kThreads + tid];
    }

    // Recompute the chunk's states (and y, for dz) from the checkpoint.
    float hist[CH][S];
#pragma unroll
    for (int tg = 0; tg < CH; tg += TG) {
      float yv[TG];
#pragma unroll
      for (int k = 0; k < TG; ++k) {
        const int t = tg + k;
        const float dt = sDt_i[t];
        const float dtu = dt * sU_i[t];
        float bv[S], cv[S];
        lds_vec<S>(bv, pB + t * sBt);
        lds_vec<S>(cv, pC + t * sCt);
        float y = 0.f;
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const float hp = t > 0 ? hist[t > 0 ? t - 1 : 0][s] : hstart[s];
          const float dA = exp2_fast(dt * A2[s]);
          hist[t][s] = fmaf(dA, hp, dtu * bv[s]);
          y = fmaf(cv[s], hist[t][s], y);
        }
        yv[k] = y;
      }
      RedRow::run(yv, lane);
      if (RedRow::owner(lane)) sY[i * RS + tg + RedRow::offset(lane)] = yv[0];
    }

    // Adjoint, backwards through the chunk.
#pragma unroll
    for (int tg = CH - TGM; tg >= 0; tg -= TGM) {
      float gsum[TGM][2];
      float dbc[TGM][2 * S];
#pragma unroll
      for (int k = TGM - 1; k >= 0; --k) {
        const int t = tg + k;
        const float dt = sDt_i[t];
        const float dy = sDy_i[t];
        const float dtu = dt * sU_i[t];
        float bv[S], cv[S];
        lds_vec<S>(bv, pB + t * sBt);
        lds_vec<S>(cv, pC + t * sCt);
        float gb = 0.f, wa = 0.f;
#pragma unroll
        for (int s = 0; s < S; ++s) {
          const float hp = t > 0 ? hist[t > 0 ? t - 1 : 0][s] : hstart[s];
          const float dA = exp2_fast(dt * A2[s]);
          const float g = fmaf(cv[s], dy, carry[s]);
          const float w = g * dA * hp;  // g_t exp(dt A) h_{t-1}
          dA_acc[s] = fmaf(w, dt, dA_acc[s]);
          wa = fmaf(w, A2[s], wa);
          gb = fmaf(g, bv[s], gb);
          const float gB = g * dtu, gC = dy * hist[t][s];
          dbc[k][s] = gB;
          dbc[k][S + s] = gC;
          if (!varB) sConst[s * kThreads + tid] += gB;
          if (!varC) sConst[(S + s) * kThreads + tid] += gC;
          carry[s] = g * dA;
        }
        gsum[k][0] = gb;
        gsum[k][1] = wa * kLn2;
        if (k % TG == 0) {
          float v[2 * TG];
#pragma unroll
          for (int q = 0; q < TG; ++q) {
            v[2 * q] = gsum[k + q][0];
            v[2 * q + 1] = gsum[k + q][1];
          }
          RedRow2::run(v, lane);
          if (RedRow2::owner(lane)) {
            const int tt = tg + k + RedRow2::offset(lane) / 2;
            sGB[i * RS + tt] = v[0];
            sWA[i * RS + tt] = v[1];
          }
        }
        if (k % TGR == 0 && (varB || varC)) {
          float v[2 * S * TGR];
#pragma unroll
          for (int q = 0; q < TGR; ++q) {
#pragma unroll
            for (int x = 0; x < 2 * S; ++x) v[q * 2 * S + x] = dbc[k + q][x];
          }
          RedCol::run(v, lane);
          const int phases = phased ? kWarps - 1 : 1;
          for (int ph = 0; ph < phases; ++ph) {
            if (RedCol::owner(lane) && (!phased || (ph == 0 ? warp <= 1 : warp == ph + 1))) {
              const int o = RedCol::offset(lane);
#pragma unroll
              for (int x = 0; x < RedCol::kLeft; ++x) {
                const int idx = o + x;
                const int q = idx / (2 * S), kind = (idx / S) % 2, s = idx % S;
                float* cell = &sRedW[(kind * NP + j * S + s) * RED_S + tg + k + q];
                if constexpr (kOwnCopies) {
                  *cell = v[x];  // this lane is the cell's only writer in its warp's copy
                } else {
                  atomicAdd(cell, v[x]);
                }
              }
            }
            if (phased) __syncthreads();
          }
        }
      }
    }
    __syncthreads();

    // Epilogue: per (row, t) gradients, coalesced along t (no global loads: every input is in
    // shared memory or registers since the load phase).
#pragma unroll
    for (int k = 0; k < KE; ++k) {
      const int e = tid + k * kThreads;
      if (RB * CH % kThreads == 0 || e < RB * CH) {
        const int ii = e / CH, tt = e % CH, t = t0 + tt;
        if (ii < blk.rows && t < L) {
          const int dd = blk.row0 + ii;
          const i64 off = ((i64)blk.b * Dm + dd) * L + t;
          const float uv = sU[ii * RS + tt], dt = sDt[ii * RS + tt], dy = sDy[ii * RS + tt];
          const float gb = sGB[ii * RS + tt];
          const float Dd = Dv != nullptr ? Dv[dd] : 0.f;
          float ddt = fmaf(uv, gb, sWA[ii * RS + tt]);
          // softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)); for x > 20 (dt = x) it is 1 in float32.
          if (softplus) ddt *= kV3 ? sSl[ii * RS + tt] : -expm1f(-dt);
          store_f(du + off, fmaf(dt, gb, Dd * dy));
          store_f(ddelta + off, ddt);
          if (z != nullptr) store_f(dz + off, fmaf(Dd, uv, sY[ii * RS + tt]) * dz_factor[k]);
          sAccD[e] = fmaf(dy, uv, sAccD[e]);
          sAccBias[e] += ddt;
        }
      }
    }
    if (varB || varC) {
      // Unrolled twice, as NVRTC chose before the deterministic store shrank (sm_90: S1 R16 spills 0 bytes
      // instead of 4-8, S1 R8 12-16 instead of 20; other layouts' registers as before).
#pragma unroll 2
      for (int e = tid; e < 2 * NP * CH; e += kThreads) {
        const int kind = e / (NP * CH), n = (e / CH) % NP, tt = e % CH, t = t0 + tt;
        const bool var = kind == 0 ? varB : varC;
        const int cell = (kind * NP + n) * RED_S + tt;
        float total = sRed[cell];
#pragma unroll
        for (int cp = 1; cp < NSL; ++cp) total += sRed[cp * RED_N + cell];
        if (var && n < N && t < L) {
          if (det_v1) {  // this block's slice of (blocks per group, B, G, N, L): plain stores
            const int G = kind == 0 ? GB : GC, g = kind == 0 ? blk.gB : blk.gC;
            const int per_group = Gblk / G * ptiles;
            const int slot = blockIdx.x % (Gblk * ptiles) - g * per_group;
            const int nbatch = gridDim.x / (Gblk * ptiles);
            float* out = (kind == 0 ? dB_out : dC_out) + ((((i64)slot * nbatch + blk.b) * G + g) * N + n) * L;
            out[t] = total;
          } else if (det) {  // slice blockIdx.x of (grid, N, L): plain stores, no index arithmetic
            (kind == 0 ? dB_out : dC_out)[((i64)blockIdx.x * N + n) * L + t] = total;
          } else {
            float* out = kind == 0 ? dB_out + (((i64)blk.b * GB + blk.gB) * N + n) * L
                                   : dC_out + (((i64)blk.b * GC + blk.gC) * N + n) * L;
            atomicAdd(out + t, total);
          }
        }
        if constexpr (!kOwnCopies) {  // own copies: every cell is rewritten in the next chunk
#pragma unroll
          for (int cp = 0; cp < NSL; ++cp) sRed[cp * RED_N + cell] = 0.f;
        }
      }
    }
  }

  // Per (b, d, n) results.
  if (row_ok) {
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const int n = j * S + s;
      if (n < N) {
        dA_part[row_state + n] = dA_acc[s];
        if (!varB) dB_out[row_state + n] = sConst[s * kThreads + tid];
        if (!varC) dC_out[row_state + n] = sConst[(S + s) * kThreads + tid];
        if (dh0 != nullptr) dh0[row_state + n] = carry[s];
      }
    }
  }
  // Per (b, d) sums of dD and ddelta_bias, in a fixed order.
  if (dD_part != nullptr || dbias_part != nullptr) {
    __syncthreads();
    for (int ii = tid; ii < blk.rows; ii += kThreads) {
      float sd = 0.f, sb = 0.f;
      for (int tt = 0; tt < CH; ++tt) {
        sd += sAccD[ii * CH + tt];
        sb += sAccBias[ii * CH + tt];
      }
      const i64 o = (i64)blk.b * Dm + blk.row0 + ii;
      if (dD_part != nullptr) dD_part[o] = sd;
      if (dbias_part != nullptr) dbias_part[o] = sb;
    }
  }
}

// Deterministic dB/dC: scan_bwd stored block k's sums of input-dependent B (or C) to slice k of a
// (grid, N, L) float32 buffer; the grid is (batch, block group, row tile) flattened and a group of
// B spans consecutive block groups, so the P blocks of batch entry b and group g are the
// consecutive slices (b G + g) P .. (b G + g) P + P - 1 and
//   out[b, g, n, t] = sum over p < P of part[(b G + g) P + p, n, t]   (cols = N L per (b, g)),
// written in the output dtype (no separate cast). One launch covers dB and dC: flattened blocks
// [0, nbg0 * xb) sum part0 into out0, the rest part1 into out1 (xb blocks per (b, g)). Block (32, 8):
// thread (x, y) owns V consecutive columns (V = 4: float4 loads, needs cols % 4 == 0) and adds
// slices p = y, y + 8, ... in that order; then y = 0 adds the 8 partial sums in order. The order
// depends on P only (not on V, timing or the grid), so every run gives the same bits.
// Traffic: P * cols * 4 bytes read per (b, g) (the partials scan_bwd wrote), cols * sizeof(TO) written.
template <typename TO, int V>
__global__ void __launch_bounds__(256) bc_slice_sum(const float* __restrict__ part0, TO* __restrict__ out0,
                                                    int P0, i64 nbg0, const float* __restrict__ part1,
                                                    TO* __restrict__ out1, int P1, i64 cols, i64 xb) {
  __shared__ float acc[V][8][33];
  const i64 blk = blockIdx.x;
  const bool second = blk >= nbg0 * xb;
  const i64 local = second ? blk - nbg0 * xb : blk;
  const i64 bg = local / xb;
  const i64 col = ((local - bg * xb) * 32 + threadIdx.x) * V;
  const int P = second ? P1 : P0;
  const float* src = (second ? part1 : part0) + bg * P * cols + col;
  TO* dst = (second ? out1 : out0) + bg * cols + col;
  const int y = threadIdx.y, x = threadIdx.x;
  float s[V];
#pragma unroll
  for (int k = 0; k < V; ++k) s[k] = 0.f;
  if (col < cols) {
#pragma unroll 4
    for (int p = y; p < P; p += 8) {
      if constexpr (V == 4) {
        const float4 q = *reinterpret_cast<const float4*>(src + (i64)p * cols);
        s[0] += q.x;
        s[1] += q.y;
        s[2] += q.z;
        s[3] += q.w;
      } else {
        s[0] += src[(i64)p * cols];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k][y][x] = s[k];
  __syncthreads();
  if (y == 0 && col < cols) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float t = 0.f;
#pragma unroll
      for (int r = 0; r < 8; ++r) t += acc[k][r][x];
      store_f(dst + k, t);
    }
  }
}
