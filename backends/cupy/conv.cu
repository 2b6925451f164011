// Causal depthwise conv1d: prefill forward (contiguous and channel-last x), backward, and the
// decode update of a conv state.
//
//   out[b, d, t] = act(bias[d] + sum_{k<W} w[d, k] * x[b, d, t - (W-1) + k]),  x before t = 0 from
//   initial_states (else 0). With seq_idx a tap reading another sequence contributes 0 and
//   padding (seq_idx < 0) outputs 0; the initial states belong to the sequence of t = 0.
//
// Work decomposition:
// - conv_fwd_ws / conv_bwd_ws (session 4, the default for the common case below): a warp owns
//   NW x 16 bytes x warp size of a row, warp-strided so that every warp access is one
//   contiguous 512-byte span, all loads in flight before the first use; see their comment.
// - conv_fwd_vec (the common case: x contiguous (B, D, L), L % 8 == 0, aligned, no seq_idx,
//   W <= 4): a block of 2048 / E threads owns 2048 consecutive positions of one (b, d) row (grid
//   = rows x chunks, 1-d); a thread owns E = 8, 16 or 32 consecutive positions: it issues all
//   its 16-byte loads at once, keeps them as raw words (4 registers per word, ~32 registers in
//   all: full occupancy, 32-64 bytes in flight per thread), then converts, convolves and stores
//   word by word. The W-1 inputs before a thread's positions come from the previous lane by
//   warp shuffle (lane 0 reads them from global memory, an L1/L2 hit beside the previous warp's
//   load). Traffic: x read once, out written once (the floor for this op); no shared memory.
// - conv_fwd (every other contiguous case: seq_idx, unaligned rows or L % 8 != 0, any W):
//   128 threads x 8 positions per block, the same shuffle scheme, sequence ids loaded beside x.
// - conv_fwd_cl (x channel-last, stored (B, L, D)): a thread owns 8 consecutive channels
//   (16-byte accesses, coalesced across the warp) for a segment of 8 time steps; it issues the
//   loads of all W-1 + 8 input rows it needs before the first use, then writes 8 output rows;
//   block (32, 4) = 256 channels x 32 steps. Traffic: x once (+ W-1 history rows per segment,
//   mostly L2 hits), out once.
// - Generic widths (W = 0 template argument: any W <= 64 at run time) read their taps from
//   global memory (L1 hits) instead of registers.
// - Backward (contiguous; channel-last inputs are made contiguous by the launcher):
//   conv_bwd_dpre recomputes the pre-activation like conv_fwd and writes dpre = dout * act'(pre)
//   (float32, 0 at padding) plus one (W+1)-vector of dweight/dbias partials per block (block
//   reduction through shared memory); conv_bwd_dx gathers dx[s] = sum_k w[k] dpre[s + W-1-k]
//   (the W-1 following dpre values come from the next lane by shuffle) plus dfinal_states, and
//   dinitial_states at the chunk holding t = 0. column_sum (common.cuh) adds the partials.
// - conv_bwd_fused (the backward's common contiguous case, as conv_fwd_vec's conditions): one
//   kernel instead of dpre + dx: dpre is recomputed in registers (the W-1 values after a
//   thread's 8 positions come from the next lane by shuffle), so x and dout are read once and
//   dx written once (the floor); same per-block dweight/dbias partials.
// - conv_fwd_cl_tile / conv_bwd_cl_tile / conv_bwd_cl_walk (channel-last, D % 8 == 0, no
//   seq_idx, W <= 4): shared memory tiles of 128 bytes of channels x 64 steps (+ halo rows),
//   see their comment; conv_bwd_cl_walk (the default backward) keeps dpre in registers.
// - conv_update: one thread per (b, d) row of the decode batch; reads its W-1 history entries
//   from the state (shift window or circular buffer, any strides; x through its strides too, so
//   a slice of the in_proj output needs no copy), writes Lnew outputs and the new state entries
//   in place (the one-token shift window from registers, see the kernel). Padding rows
//   (negative conv_state_indices) write 0 and leave the state alone; so do rows whose index is >= n_rows (the pool size) or whose cache_seqlens
//   is negative (the host checks that reject those are skipped during CUDA-graph capture, so
//   the kernel must never read or write out of bounds on them).
#include "common.cuh"

#define CONV_THREADS 128
#define CONV_CHUNK (CONV_THREADS * 8)
#define CONV_CL_STEPS 8

namespace {

// An element of a stream that is either float32 or T (run-time flag).
template <typename T>
__device__ __forceinline__ float load_elem(const void* p, int is_f32, i64 i) {
  return is_f32 ? load_f(static_cast<const float*>(p) + i) : load_f(static_cast<const T*>(p) + i);
}

template <typename T>
__device__ __forceinline__ void store_elem(void* p, int is_f32, i64 i, float v) {
  if (is_f32)
    store_f(static_cast<float*>(p) + i, v);
  else
    store_f(static_cast<T*>(p) + i, v);
}

__device__ __forceinline__ void load_ids8(const int* p, i64 i, i64 n, bool vec, int (&s)[8]) {
  if (vec && i + 8 <= n) {
    const int4 a = *reinterpret_cast<const int4*>(p + i);
    const int4 b = *reinterpret_cast<const int4*>(p + i + 4);
    s[0] = a.x; s[1] = a.y; s[2] = a.z; s[3] = a.w;
    s[4] = b.x; s[5] = b.y; s[6] = b.z; s[7] = b.w;
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) s[k] = (i + k < n) ? p[i + k] : -1;
  }
}

// One (b, d) row: its inputs (initial states before t = 0) and sequence ids (the id of t = 0
// before it, so initial states join the first sequence).
template <typename T>
struct Row {
  const T* x;          // x[b, d, 0] (contiguous) or x[b, 0, d] (channel-last)
  i64 stride;          // between time steps
  const void* init;    // initial_states[b, d, 0] or null
  int init_f32;
  const int* seq;      // seq_idx[b, 0] or null
  int wm1;             // W - 1

  __device__ __forceinline__ float at(i64 s) const {
    if (s >= 0) return load_f(x + s * stride);
    return init ? load_elem<T>(init, init_f32, wm1 + s) : 0.f;
  }
  __device__ __forceinline__ int id(i64 s) const { return seq ? seq[s > 0 ? s : 0] : 0; }
};

// final_states[i] = input at L-(W-1)+i, 0 outside the sequence of position L-1.
template <typename T>
__device__ void write_final(const Row<T>& r, i64 L, void* final_states, int final_f32, i64 offset) {
  const int last = r.id(L - 1);
  for (int i = 0; i < r.wm1; ++i) {
    const i64 s = L - r.wm1 + i;
    const bool keep = !r.seq || (last >= 0 && r.id(s) == last);
    store_elem<T>(final_states, final_f32, offset + i, keep ? r.at(s) : 0.f);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// E positions per thread (instantiated with 8: one 16-byte access of 16-bit data), a block covers
// CONV_THREADS * E consecutive positions of one row.
template <typename T, int W, int E>
__global__ void __launch_bounds__(CONV_THREADS) conv_fwd(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const int* __restrict__ seq_idx, const void* __restrict__ init, int init_f32, T* __restrict__ out,
    void* __restrict__ final_states, int final_f32, int D, i64 L, int width, i64 nchunks, int silu, int vec) {
  static_assert(E % 8 == 0, "E is a whole number of 8-element chunks");
  // 32-bit index division (the grid has < 2**31 blocks): 64-bit division is a slow subroutine.
  const unsigned row32 = blockIdx.x / (unsigned)nchunks;
  const i64 row = row32;
  const i64 s0 = (i64)(blockIdx.x % (unsigned)nchunks) * (CONV_THREADS * E) + threadIdx.x * E;
  const int b = (int)(row32 / (unsigned)D), d = (int)(row32 % (unsigned)D);
  const int wm1 = (W > 0 ? W : width) - 1;
  const Row<T> r{x + row * L, 1, init ? (init_f32 ? (const void*)((const float*)init + row * wm1)
                                                   : (const void*)((const T*)init + row * wm1))
                                      : nullptr,
                 init_f32, seq_idx ? seq_idx + (i64)b * L : nullptr, wm1};
  const float bias_d = bias ? bias[d] : 0.f;
  const float* w = weight + (i64)d * (wm1 + 1);
  const int lane = threadIdx.x % SSM_WARP_SIZE;

  float v[E], o[E];
  int sid[E];
#pragma unroll
  for (int c = 0; c < E / 8; ++c) {  // all loads first: E / 8 16-byte loads in flight
    float (&vc)[8] = *reinterpret_cast<float(*)[8]>(v + 8 * c);
    load_chunk8(r.x, s0 + 8 * c, L, vec, vc);
  }
  if (r.seq) {
#pragma unroll
    for (int c = 0; c < E / 8; ++c) {
      int (&sc)[8] = *reinterpret_cast<int(*)[8]>(sid + 8 * c);
      load_ids8(r.seq, s0 + 8 * c, L, vec, sc);
    }
  }
  if constexpr (W > 0) {
    // Window: W-1 inputs before s0, then the thread's E. Lane 0 reads its W-1 from global
    // memory (issued here, alongside the loads above); the other lanes take them from the
    // previous lane by shuffle once the loads land.
    float win[W - 1 + E];
    int ids[W - 1 + E];
    float wk[W];
#pragma unroll
    for (int k = 0; k < W; ++k) wk[k] = w[k];
    const bool fetch = lane == 0 && s0 < L;  // the previous lane is in the previous warp
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      win[j] = fetch ? r.at(s0 - (W - 1) + j) : 0.f;
      ids[j] = fetch ? r.id(s0 - (W - 1) + j) : 0;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      const float up = SSM_SHFL_UP(v[E - (W - 1) + j], 1);
      const int id_up = r.seq ? SSM_SHFL_UP(sid[E - (W - 1) + j], 1) : 0;
      if (!fetch) {
        win[j] = up;
        ids[j] = id_up;
      }
    }
#pragma unroll
    for (int k = 0; k < E; ++k) win[W - 1 + k] = v[k];
    if (r.seq) {
#pragma unroll
      for (int k = 0; k < E; ++k) ids[W - 1 + k] = sid[k];
#pragma unroll
      for (int k = 0; k < E; ++k) {
        float acc = bias_d;
#pragma unroll
        for (int j = 0; j < W; ++j) acc += (ids[k + j] == ids[k + W - 1]) ? wk[j] * win[k + j] : 0.f;
        if (silu) acc = silu_fast(acc);
        o[k] = ids[k + W - 1] < 0 ? 0.f : acc;
      }
    } else {  // no sequence ids: W fused multiply-adds per output
#pragma unroll
      for (int k = 0; k < E; ++k) {
        float acc = bias_d;
#pragma unroll
        for (int j = 0; j < W; ++j) acc = fmaf(wk[j], win[k + j], acc);
        o[k] = silu ? silu_fast(acc) : acc;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const i64 t = s0 + k;
      float acc = bias_d;
      if (t < L) {
        const int id_t = r.id(t);
        for (int j = 0; j < wm1; ++j) {
          const i64 s = t - wm1 + j;
          if (!r.seq || r.id(s) == id_t) acc += w[j] * r.at(s);
        }
        acc += w[wm1] * v[k];
        if (silu) acc = silu_fast(acc);
        if (r.seq && id_t < 0) acc = 0.f;
      }
      o[k] = acc;
    }
  }
#pragma unroll
  for (int c = 0; c < E / 8; ++c) {
    if (s0 + 8 * c < L) {
      const float (&oc)[8] = *reinterpret_cast<const float(*)[8]>(o + 8 * c);
      store_chunk8(out + row * L, s0 + 8 * c, L, vec, oc);
    }
  }
  if (final_states && s0 <= L - 1 && L - 1 < s0 + E) write_final(r, L, final_states, final_f32, row * wm1);
}

// ---------------------------------------------------------------------------------------------
// The common case on its own: contiguous x with L % 8 == 0 and 16-byte aligned rows, no seq_idx,
// W <= 4. A block of 2048 / E threads owns 2048 positions of a row, a thread E consecutive ones.
// The thread issues its E / PER 16-byte loads at once and keeps them as raw 16-byte words (4
// registers each, not E floats), then converts, convolves and stores one 16-byte word at a
// time, carrying the last W-1 inputs from word to word.
template <typename T, int W, int E>
__global__ void __launch_bounds__(256) conv_fwd_vec(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const void* __restrict__ init, int init_f32, T* __restrict__ out, void* __restrict__ final_states,
    int final_f32, int D, i64 L, i64 nchunks, int silu) {
  constexpr int PER = 16 / sizeof(T);  // elements per 16-byte word
  constexpr int NW = E / PER;          // words per thread
  static_assert(E % PER == 0 && PER >= W - 1, "whole words, and a word holds the W-1 carried inputs");
  const unsigned row32 = blockIdx.x / (unsigned)nchunks;  // 32-bit division, as in conv_fwd
  const i64 row = row32;
  const i64 s0 = (i64)(blockIdx.x % (unsigned)nchunks) * 2048 + threadIdx.x * E;
  const int d = (int)(row32 % (unsigned)D);
  const Row<T> r{x + row * L, 1, init ? (init_f32 ? (const void*)((const float*)init + row * (W - 1))
                                                   : (const void*)((const T*)init + row * (W - 1)))
                                      : nullptr,
                 init_f32, nullptr, W - 1};
  const int lane = threadIdx.x % SSM_WARP_SIZE;

  uint4 raw[NW];
#pragma unroll
  for (int i = 0; i < NW; ++i)
    raw[i] = s0 + i * PER < L ? *reinterpret_cast<const uint4*>(r.x + s0 + i * PER) : make_uint4(0, 0, 0, 0);
  const bool fetch = lane == 0 && s0 < L;  // the previous lane is in the previous warp
  float prev[W > 1 ? W - 1 : 1];
#pragma unroll
  for (int j = 0; j < W - 1; ++j) prev[j] = fetch ? r.at(s0 - (W - 1) + j) : 0.f;
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = weight[(i64)d * W + k];
  const float bias_d = bias ? bias[d] : 0.f;

  // The previous lane's last W-1 inputs.
  {
    const T* last = reinterpret_cast<const T*>(&raw[NW - 1]);
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      const float up = SSM_SHFL_UP(load_f(last + PER - (W - 1) + j), 1);
      if (!fetch) prev[j] = up;
    }
  }
  T* orow = out + row * L;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const T* e = reinterpret_cast<const T*>(&raw[i]);
    float cur[PER], o[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) cur[k] = load_f(e + k);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      float acc = bias_d;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int t = k - (W - 1) + j;  // index into cur, negative: into prev
        acc = fmaf(wk[j], t >= 0 ? cur[t >= 0 ? t : 0] : prev[t + W - 1 >= 0 ? t + W - 1 : 0], acc);
      }
      o[k] = silu ? silu_fast(acc) : acc;
    }
    if (s0 + i * PER < L) {
      uint4 packed;
      T* pe = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int k = 0; k < PER; ++k) store_f(pe + k, o[k]);
      *reinterpret_cast<uint4*>(orow + s0 + i * PER) = packed;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) prev[j] = cur[PER - (W - 1) + j];
  }
  if (final_states && s0 <= L - 1 && L - 1 < s0 + E) write_final(r, L, final_states, final_f32, row * (W - 1));
}

// ---------------------------------------------------------------------------------------------
template <typename T, int W>
__global__ void __launch_bounds__(128) conv_fwd_cl(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const int* __restrict__ seq_idx, const void* __restrict__ init, int init_f32, T* __restrict__ out,
    void* __restrict__ final_states, int final_f32, int D, i64 L, int width, int silu, int vec) {
  constexpr int S = CONV_CL_STEPS;
  const int c0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const i64 t0 = ((i64)blockIdx.y * blockDim.y + threadIdx.y) * S;
  const int b = blockIdx.z;
  if (c0 >= D || t0 >= L) return;
  const int wm1 = (W > 0 ? W : width) - 1;
  const int nc = D - c0 < 8 ? D - c0 : 8;
  const i64 t_end = t0 + S < L ? t0 + S : L;
  const T* xb = x + (i64)b * L * D;
  T* ob = out + (i64)b * L * D;
  const int* seq = seq_idx ? seq_idx + (i64)b * L : nullptr;
  auto id = [&](i64 s) { return seq ? seq[s > 0 ? s : 0] : 0; };
  // Inputs of channels c0..c0+7 at time s (initial states before 0, zeros past L).
  auto load_at = [&](i64 s, float (&v)[8]) {
    if (s >= L) {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    } else if (s >= 0) {
      load_chunk8(xb + s * D, c0, D, vec, v);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i)
        v[i] = (init && i < nc) ? load_elem<T>(init, init_f32, ((i64)b * D + c0 + i) * wm1 + wm1 + s) : 0.f;
    }
  };
  float bv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) bv[i] = (bias && i < nc) ? bias[c0 + i] : 0.f;

  if constexpr (W > 0) {
    // The segment's W-1 + S input rows, all loads issued before the first use.
    float v[W - 1 + S][8];
#pragma unroll
    for (int j = 0; j < W - 1 + S; ++j) load_at(t0 - (W - 1) + j, v[j]);
    float wv[W][8];
#pragma unroll
    for (int k = 0; k < W; ++k)
#pragma unroll
      for (int i = 0; i < 8; ++i) wv[k][i] = i < nc ? weight[(i64)(c0 + i) * W + k] : 0.f;
    int ids[W - 1 + S];
#pragma unroll
    for (int j = 0; j < W - 1 + S; ++j) ids[j] = seq ? id(t0 - (W - 1) + j < L ? t0 - (W - 1) + j : L - 1) : 0;
#pragma unroll
    for (int st = 0; st < S; ++st) {
      if (t0 + st >= t_end) break;
      const int id_t = ids[st + W - 1];
      float o[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float acc = bv[i];
#pragma unroll
        for (int k = 0; k < W; ++k) acc += (!seq || ids[st + k] == id_t) ? wv[k][i] * v[st + k][i] : 0.f;
        if (silu) acc = silu_fast(acc);
        o[i] = (seq && id_t < 0) ? 0.f : acc;
      }
      store_chunk8(ob + (t0 + st) * D, c0, D, vec, o);
    }
  } else {
    for (i64 t = t0; t < t_end; ++t) {
      const int id_t = id(t);
      float o[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = bv[i];
      for (int j = 0; j <= wm1; ++j) {
        const i64 s = t - wm1 + j;
        if (seq && id(s) != id_t) continue;
        float v[8];
        load_at(s, v);
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] += (i < nc ? weight[(i64)(c0 + i) * (wm1 + 1) + j] : 0.f) * v[i];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        if (silu) o[i] = silu_fast(o[i]);
        if (seq && id_t < 0) o[i] = 0.f;
      }
      store_chunk8(ob + t * D, c0, D, vec, o);
    }
  }
  if (final_states && t_end == L) {
    for (int i = 0; i < nc; ++i) {
      const Row<T> r{xb + c0 + i, D, init ? (init_f32 ? (const void*)((const float*)init + ((i64)b * D + c0 + i) * wm1)
                                                       : (const void*)((const T*)init + ((i64)b * D + c0 + i) * wm1))
                                          : nullptr,
                     init_f32, seq, wm1};
      write_final(r, L, final_states, final_f32, ((i64)b * D + c0 + i) * wm1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, pass 1: dpre = dout * act'(pre) (0 at padding), float32; per-block dweight/dbias
// partials part[(b * nchunks + chunk), d, 0..W] (W taps, then the bias).
template <typename T, int W>
__global__ void __launch_bounds__(CONV_THREADS) conv_bwd_dpre(
    const T* __restrict__ x, const void* __restrict__ dout, int dout_f32, const float* __restrict__ weight,
    const float* __restrict__ bias, const int* __restrict__ seq_idx, const void* __restrict__ init, int init_f32,
    float* __restrict__ dpre, float* __restrict__ part, int D, i64 L, int width, i64 nchunks, int silu, int vec) {
  __shared__ float red[65][CONV_THREADS / 32 + 1];
  const unsigned row32 = blockIdx.x / (unsigned)nchunks;  // 32-bit division, as in conv_fwd
  const i64 row = row32;
  const i64 chunk = blockIdx.x % (unsigned)nchunks;
  const i64 s0 = chunk * CONV_CHUNK + threadIdx.x * 8;
  const int b = (int)(row32 / (unsigned)D), d = (int)(row32 % (unsigned)D);
  const int wm1 = (W > 0 ? W : width) - 1;
  const Row<T> r{x + row * L, 1, init ? (init_f32 ? (const void*)((const float*)init + row * wm1)
                                                   : (const void*)((const T*)init + row * wm1))
                                      : nullptr,
                 init_f32, seq_idx ? seq_idx + (i64)b * L : nullptr, wm1};
  const float bias_d = bias ? bias[d] : 0.f;
  const float* w = weight + (i64)d * (wm1 + 1);
  const int lane = threadIdx.x % SSM_WARP_SIZE, warp = threadIdx.x / SSM_WARP_SIZE;
  constexpr int NW = CONV_THREADS / SSM_WARP_SIZE;

  float v[8], g[8], dp[8];
  int sid[8];
  load_chunk8(r.x, s0, L, vec, v);
  if (dout_f32)
    load_chunk8(static_cast<const float*>(dout) + row * L, s0, L, vec, g);
  else
    load_chunk8(static_cast<const T*>(dout) + row * L, s0, L, vec, g);
  if (r.seq) load_ids8(r.seq, s0, L, vec, sid);

  if constexpr (W > 0) {
    float win[W - 1 + 8];
    int ids[W - 1 + 8];
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      win[j] = SSM_SHFL_UP(v[8 - (W - 1) + j], 1);
      ids[j] = r.seq ? SSM_SHFL_UP(sid[8 - (W - 1) + j], 1) : 0;
      if (lane == 0 && s0 < L) {  // the previous lane is in the previous warp
        win[j] = r.at(s0 - (W - 1) + j);
        ids[j] = r.id(s0 - (W - 1) + j);
      }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      win[W - 1 + k] = v[k];
      ids[W - 1 + k] = r.seq ? sid[k] : 0;
    }
    float acc_w[W + 1];
#pragma unroll
    for (int j = 0; j <= W; ++j) acc_w[j] = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float pre = bias_d;
#pragma unroll
      for (int j = 0; j < W; ++j) pre += (ids[k + j] == ids[k + W - 1]) ? w[j] * win[k + j] : 0.f;
      float gk = (s0 + k < L && !(r.seq && ids[k + W - 1] < 0)) ? g[k] : 0.f;
      if (silu) gk *= silu_grad_f(pre);
      dp[k] = gk;
#pragma unroll
      for (int j = 0; j < W; ++j) acc_w[j] += (ids[k + j] == ids[k + W - 1]) ? gk * win[k + j] : 0.f;
      acc_w[W] += gk;
    }
#pragma unroll
    for (int j = 0; j <= W; ++j) {
      const float s = warp_sum(acc_w[j]);
      if (lane == 0) red[j][warp] = s;
    }
  } else {
    int id_t[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const i64 t = s0 + k;
      float gk = 0.f;
      id_t[k] = t < L ? r.id(t) : -1;
      if (t < L) {
        float pre = bias_d + w[wm1] * v[k];
        for (int j = 0; j < wm1; ++j) {
          const i64 s = t - wm1 + j;
          if (!r.seq || r.id(s) == id_t[k]) pre += w[j] * r.at(s);
        }
        gk = (r.seq && id_t[k] < 0) ? 0.f : g[k];
        if (silu) gk *= silu_grad_f(pre);
      }
      dp[k] = gk;
    }
    for (int j = 0; j <= wm1 + 1; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const i64 t = s0 + k;
        if (t >= L || dp[k] == 0.f) continue;
        if (j == wm1 + 1) {
          acc += dp[k];
        } else {
          const i64 s = t - wm1 + j;
          if (!r.seq || r.id(s) == id_t[k]) acc += dp[k] * r.at(s);
        }
      }
      const float s = warp_sum(acc);
      if (lane == 0) red[j][warp] = s;
    }
  }
  if (s0 < L) store_chunk8(dpre + row * L, s0, L, vec, dp);
  __syncthreads();
  if (threadIdx.x <= wm1 + 1) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < NW; ++k) t += red[threadIdx.x][k];
    part[(((i64)b * nchunks + chunk) * D + d) * (wm1 + 2) + threadIdx.x] = t;
  }
}

// Backward, pass 2: dx[s] = sum_k w[k] dpre[s + W-1-k] (same sequence) + dfinal; dinitial_states.
template <typename T, int W>
__global__ void __launch_bounds__(CONV_THREADS) conv_bwd_dx(
    const float* __restrict__ dpre, const float* __restrict__ weight, const int* __restrict__ seq_idx,
    const void* __restrict__ dfinal, int dfinal_f32, T* __restrict__ dx, void* __restrict__ dinit, int dinit_f32,
    int D, i64 L, int width, i64 nchunks, int vec) {
  const unsigned row32 = blockIdx.x / (unsigned)nchunks;  // 32-bit division, as in conv_fwd
  const i64 row = row32;
  const i64 s0 = (i64)(blockIdx.x % (unsigned)nchunks) * CONV_CHUNK + threadIdx.x * 8;
  const int b = (int)(row32 / (unsigned)D), d = (int)(row32 % (unsigned)D);
  const int wm1 = (W > 0 ? W : width) - 1;
  const float* dp = dpre + row * L;
  const int* seq = seq_idx ? seq_idx + (i64)b * L : nullptr;
  const float* w = weight + (i64)d * (wm1 + 1);
  const int lane = threadIdx.x % SSM_WARP_SIZE;
  auto id = [&](i64 s) { return seq ? seq[s > 0 ? s : 0] : 0; };
  auto dp_at = [&](i64 t) { return t < L ? dp[t] : 0.f; };
  const int last = id(L - 1);
  // dfinal_states[i] flows to input position L-(W-1)+i when it was kept in the final state.
  auto dfinal_at = [&](i64 s) {
    const i64 i = s - (L - wm1);
    if (!dfinal || i < 0) return 0.f;
    const bool keep = !seq || (last >= 0 && id(s) == last);
    return keep ? load_elem<T>(dfinal, dfinal_f32, row * wm1 + i) : 0.f;
  };

  float o[8];
  if constexpr (W > 0) {
    float fut[8 + W - 1];
    int ids[8 + W - 1];
    float wk[W];
#pragma unroll
    for (int k = 0; k < W; ++k) wk[k] = w[k];
    float own[8];
    int sid[8];
    load_chunk8(dp, s0, L, vec, own);
    if (seq) load_ids8(seq, s0, L, vec, sid);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      fut[k] = own[k];
      ids[k] = seq ? sid[k] : 0;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      fut[8 + j] = SSM_SHFL_DOWN(own[j], 1);
      ids[8 + j] = seq ? SSM_SHFL_DOWN(sid[j], 1) : 0;
      if (lane == SSM_WARP_SIZE - 1) {
        fut[8 + j] = dp_at(s0 + 8 + j);
        ids[8 + j] = id(s0 + 8 + j < L ? s0 + 8 + j : L - 1);
      }
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < W; ++j) acc += (ids[k + W - 1 - j] == ids[k]) ? wk[j] * fut[k + W - 1 - j] : 0.f;
      o[k] = acc + dfinal_at(s0 + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const i64 s = s0 + k;
      float acc = 0.f;
      if (s < L) {
        const int id_s = id(s);
        for (int j = 0; j <= wm1; ++j) {
          const i64 t = s + wm1 - j;
          if (t < L && (!seq || id(t) == id_s)) acc += w[j] * dp[t];
        }
        acc += dfinal_at(s);
      }
      o[k] = acc;
    }
  }
  if (s0 < L) store_chunk8(dx + row * L, s0, L, vec, o);
  if (dinit && s0 == 0) {
    // Initial state j sits at input position j - (W-1) and carries the sequence id of t = 0.
    const int id0 = id(0);
    for (int j = 0; j < wm1; ++j) {
      const i64 s = j - wm1;
      float acc = dfinal_at(s);
      for (int k = 0; k <= j; ++k) {
        const i64 t = s + wm1 - k;
        if (t < L && (!seq || id(t) == id0)) acc += w[k] * dp[t];
      }
      store_elem<T>(dinit, dinit_f32, row * wm1 + j, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Fused backward for the common contiguous case (L % 8 == 0, 16-byte aligned rows, no seq_idx,
// W <= 4, dout float32 or T): one pass that reads x and dout once and writes dx once (the split
// path above also writes and rereads a float32 dpre). A thread owns 8 positions s0..s0+7 of a
// row: it recomputes pre and dpre there (the W-1 inputs before s0 come from the previous lane by
// shuffle), takes the W-1 dpre values after its positions from the next lane by shuffle (lane
// 31 recomputes them from global memory: L1/L2 hits beside the next warp's loads) and gathers
// dx; the dweight/dbias partials of the block are reduced through shared memory in a fixed
// order into part[(b * nchunks + chunk), d, 0..W] exactly as conv_bwd_dpre does.
template <typename T, int W>
__global__ void __launch_bounds__(CONV_THREADS) conv_bwd_fused(
    const T* __restrict__ x, const void* __restrict__ dout, int dout_f32, const float* __restrict__ weight,
    const float* __restrict__ bias, const void* __restrict__ init, int init_f32, const void* __restrict__ dfinal,
    int dfinal_f32, T* __restrict__ dx, void* __restrict__ dinit, int dinit_f32, float* __restrict__ part, int D,
    i64 L, i64 nchunks, int silu) {
  constexpr int WM1 = W - 1;
  constexpr int NWARP = CONV_THREADS / SSM_WARP_SIZE;
  __shared__ float red[W + 1][NWARP + 1];
  const unsigned row32 = blockIdx.x / (unsigned)nchunks;
  const i64 row = row32;
  const i64 chunk = blockIdx.x % (unsigned)nchunks;
  const i64 s0 = chunk * CONV_CHUNK + threadIdx.x * 8;
  const int b = (int)(row32 / (unsigned)D), d = (int)(row32 % (unsigned)D);
  const Row<T> r{x + row * L, 1, init ? (init_f32 ? (const void*)((const float*)init + row * WM1)
                                                   : (const void*)((const T*)init + row * WM1))
                                      : nullptr,
                 init_f32, nullptr, WM1};
  const int lane = threadIdx.x % SSM_WARP_SIZE, warp = threadIdx.x / SSM_WARP_SIZE;
  const bool live = s0 < L;  // L % 8 == 0: a live thread owns 8 whole positions
  auto dout_at = [&](i64 t) {
    return dout_f32 ? static_cast<const float*>(dout)[row * L + t] : load_f(static_cast<const T*>(dout) + row * L + t);
  };

  float v[8], g[8];
  load_chunk8(r.x, s0, L, true, v);
  if (dout_f32)
    load_chunk8(static_cast<const float*>(dout) + row * L, s0, L, true, g);
  else
    load_chunk8(static_cast<const T*>(dout) + row * L, s0, L, true, g);
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = weight[(i64)d * W + k];
  const float bias_d = bias ? bias[d] : 0.f;

  float win[WM1 + 8];
  const bool first = lane == 0 && live;  // the previous lane is in the previous warp
#pragma unroll
  for (int j = 0; j < WM1; ++j) {
    const float up = SSM_SHFL_UP(v[8 - WM1 + j], 1);
    win[j] = first ? r.at(s0 - WM1 + j) : up;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) win[WM1 + k] = v[k];

  float dp[8], acc_w[W + 1];
#pragma unroll
  for (int j = 0; j <= W; ++j) acc_w[j] = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float pre = bias_d;
#pragma unroll
    for (int j = 0; j < W; ++j) pre = fmaf(wk[j], win[k + j], pre);
    float gk = live ? g[k] : 0.f;
    if (silu) gk *= silu_grad_f(pre);
    dp[k] = gk;
#pragma unroll
    for (int j = 0; j < W; ++j) acc_w[j] = fmaf(gk, win[k + j], acc_w[j]);
    acc_w[W] += gk;
  }
  // dpre at the W-1 positions after the thread's 8.
  float nxt[WM1 > 0 ? WM1 : 1];
  const bool last_lane = lane == SSM_WARP_SIZE - 1;
#pragma unroll
  for (int j = 0; j < WM1; ++j) {
    const float down = SSM_SHFL_DOWN(dp[j], 1);
    nxt[j] = down;
    if (last_lane) {
      const i64 t = s0 + 8 + j;
      float gk = 0.f;
      if (live && t < L) {
        float pre = bias_d;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const int u = 8 + j - WM1 + i;  // offset from s0 of the input, >= 8 - WM1 >= 5
          pre = fmaf(wk[i], u < 8 ? v[u < 8 ? u : 0] : load_f(r.x + s0 + u), pre);
        }
        gk = dout_at(t);
        if (silu) gk *= silu_grad_f(pre);
      }
      nxt[j] = gk;
    }
  }
  const i64 L0 = L - WM1;  // dfinal_states[i] flows to input position L0 + i
  float o[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int u = k + WM1 - j;  // dpre offset from s0
      acc = fmaf(wk[j], u < 8 ? dp[u < 8 ? u : 0] : nxt[u >= 8 ? u - 8 : 0], acc);
    }
    if (dfinal && s0 + k >= L0) acc += load_elem<T>(dfinal, dfinal_f32, row * WM1 + (s0 + k - L0));
    o[k] = acc;
  }
  if (live) store_chunk8(dx + row * L, s0, L, true, o);
  if (dinit && s0 == 0) {
    // Initial state j sits at input position j - (W-1) (L >= 8 > W-1: no dfinal reaches it).
#pragma unroll
    for (int j = 0; j < WM1; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k <= j; ++k) acc = fmaf(wk[k], dp[j - k], acc);
      store_elem<T>(dinit, dinit_f32, row * WM1 + j, acc);
    }
  }
#pragma unroll
  for (int j = 0; j <= W; ++j) {
    const float s = warp_sum(acc_w[j]);
    if (lane == 0) red[j][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x <= W) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < NWARP; ++k) t += red[threadIdx.x][k];
    part[(((i64)b * nchunks + chunk) * D + d) * (W + 1) + threadIdx.x] = t;
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-strided kernels for the common contiguous case (L % 8 == 0, 16-byte aligned rows, no
// seq_idx, W <= 4): conv_fwd_ws and conv_bwd_ws (session 4). A warp owns a segment of
// SEG = warp size x NW x G consecutive positions of one (b, d) row (G = 16 / sizeof(T): one
// 16-byte word); lane l's word i covers positions base + (i * warp size + l) * G .. + G. So
// every load / store instruction of the warp touches one contiguous 512-byte span (full
// sectors, unlike conv_fwd_vec with E > 8, whose lanes' words were 32-64 bytes apart), and a
// thread issues all NW (forward) or 2 NW (backward: x and dout) 16-byte loads before the first
// use: 64-128 bytes in flight per thread with compile-time trip counts. The W-1 inputs before
// a word come from the previous lane by one rotating shuffle (lane 0 takes the last lane's
// previous word); lane 0 of a segment reads the W-1 inputs before the segment (or the
// initial states) beside its word loads. Warps are independent (4 per 128-thread block, no
// shared memory, no __syncthreads): the backward reduces its dweight/dbias partials with one
// butterfly per tap and lane 0 writes them to part[(b * nseg + seg), d, 0..W], which
// column_sum adds in a fixed order (deterministic, no atomics). The backward's W-1 dpre
// values after a segment come from the next segment's first word, which the last lane loads
// (x and dout) with its own words: no dependent second load.
// Traffic: forward x read once, out written once; backward x and dout read once, dx written
// once (the floors), + one 16-byte word per segment edge (L2 hits).
#define CONV_WS_THREADS 128

namespace {
template <typename T>
__device__ __forceinline__ void word_to_f(const uint4& w, float (&v)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int k = 0; k < (int)(16 / sizeof(T)); ++k) v[k] = load_f(e + k);
}

template <typename T>
__device__ __forceinline__ uint4 f_to_word(const float (&v)[16 / sizeof(T)]) {
  uint4 w;
  T* e = reinterpret_cast<T*>(&w);
#pragma unroll
  for (int k = 0; k < (int)(16 / sizeof(T)); ++k) store_f(e + k, v[k]);
  return w;
}

// The G dout values of a word: G floats (two or one 16-byte loads) or G elements of T (one).
template <typename T>
struct DoutWord {
  static constexpr int G = 16 / sizeof(T), Q = G / 4;  // 16-byte loads of a float32 word
  uint4 w[Q];
  __device__ __forceinline__ void load(const void* row, int is_f32, i64 p, bool valid) {
#pragma unroll
    for (int q = 0; q < Q; ++q) w[q] = make_uint4(0, 0, 0, 0);
    if (!valid) return;
    if (is_f32) {
#pragma unroll
      for (int q = 0; q < Q; ++q) w[q] = *reinterpret_cast<const uint4*>(static_cast<const float*>(row) + p + 4 * q);
    } else {
      w[0] = *reinterpret_cast<const uint4*>(static_cast<const T*>(row) + p);
    }
  }
  __device__ __forceinline__ void to_f(int is_f32, float (&v)[G]) const {
    if (is_f32) {
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        const float* e = reinterpret_cast<const float*>(&w[q]);
#pragma unroll
        for (int k = 0; k < 4; ++k) v[4 * q + k] = e[k];
      }
    } else {
      word_to_f<T>(w[0], v);
    }
  }
};
}  // namespace

namespace {

// What one warp segment of conv_fwd_ws reads: lane's NW words and, on lane 0, the W-1 inputs before
// the segment (0 elsewhere); compute() convolves and stores them. HINT: see ld_stream16 (common.cuh).
template <typename T, int W, int NW, bool HINT = false>
struct WsFwdSegment {
  static constexpr int G = 16 / sizeof(T), WM1 = W - 1, WS = SSM_WARP_SIZE, SEG = WS * NW * G;
  uint4 raw[NW];
  float head[WM1 > 0 ? WM1 : 1];

  __device__ __forceinline__ void load(const T* __restrict__ x, const void* __restrict__ init, int init_f32, i64 L,
                                       i64 row, i64 base, int lane) {
    const T* xr = x + row * L;
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const i64 p = base + (i64)(i * WS + lane) * G;
      raw[i] = p < L ? ld_stream16<HINT>(xr + p) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int j = 0; j < WM1; ++j) {
      const i64 s = base - WM1 + j;
      head[j] = 0.f;
      if (lane == 0) {
        if (s >= 0)
          head[j] = load_f(xr + s);
        else if (init)
          head[j] = load_elem<T>(init, init_f32, row * WM1 + WM1 + s);
      }
    }
  }

  // Convolve and store the segment (the whole warp together: it shuffles).
  __device__ __forceinline__ void compute(const float* __restrict__ weight, const float* __restrict__ bias,
                                          T* __restrict__ out, void* __restrict__ final_states, int final_f32, int d,
                                          i64 L, i64 row, i64 base, int lane, int silu) const {
    float wk[W];
#pragma unroll
    for (int k = 0; k < W; ++k) wk[k] = weight[(i64)d * W + k];
    const float bias_d = bias ? bias[d] : 0.f;
    T* orow = out + row * L;
    float tail[WM1 > 0 ? WM1 : 1];  // the last W-1 inputs of this lane's previous word
#pragma unroll
    for (int j = 0; j < WM1; ++j) tail[j] = 0.f;
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const i64 p = base + (i64)(i * WS + lane) * G;
      float cur[G], prev[WM1 > 0 ? WM1 : 1], o[G];
      word_to_f<T>(raw[i], cur);
#pragma unroll
      for (int j = 0; j < WM1; ++j) {  // lane l - 1's word i; lane 0: the last lane's word i - 1
        const float send = (lane == WS - 1) ? tail[j] : cur[G - WM1 + j];
        const float got = SSM_SHFL(send, (lane + WS - 1) % WS);
        prev[j] = (lane == 0 && i == 0) ? head[j] : got;
      }
#pragma unroll
      for (int k = 0; k < G; ++k) {
        float acc = bias_d;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const int u = k - WM1 + j;  // index into cur, negative: into prev
          acc = fmaf(wk[j], u >= 0 ? cur[u >= 0 ? u : 0] : prev[u + WM1 >= 0 ? u + WM1 : 0], acc);
        }
        o[k] = silu ? silu_fast(acc) : acc;
      }
      if (p < L) st_stream16<HINT>(orow + p, f_to_word<T>(o));
      if (final_states && p + G == L) {  // L >= G >= W-1: the final inputs are this word's last
#pragma unroll
        for (int j = 0; j < WM1; ++j) store_elem<T>(final_states, final_f32, row * WM1 + j, cur[G - WM1 + j]);
      }
#pragma unroll
      for (int j = 0; j < WM1; ++j) tail[j] = cur[G - WM1 + j];
    }
  }
};
}  // namespace

template <typename T, int W, int NW, bool HINT>
__global__ void __launch_bounds__(CONV_WS_THREADS) conv_fwd_ws(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const void* __restrict__ init, int init_f32, T* __restrict__ out, void* __restrict__ final_states,
    int final_f32, int D, i64 L, unsigned nseg, unsigned nwarps, int silu) {
  using Seg = WsFwdSegment<T, W, NW, HINT>;
  static_assert(Seg::G >= Seg::WM1, "a word holds the W-1 carried inputs");
  const int lane = threadIdx.x % Seg::WS;
  const unsigned gw = blockIdx.x * (CONV_WS_THREADS / Seg::WS) + threadIdx.x / Seg::WS;
  if (gw >= nwarps) return;  // whole warps leave together: the shuffles stay full
  const unsigned row32 = gw / nseg;
  const i64 row = row32, base = (i64)(gw % nseg) * Seg::SEG;
  Seg seg;
  seg.load(x, init, init_f32, L, row, base, lane);
  seg.compute(weight, bias, out, final_states, final_f32, (int)(row32 % (unsigned)D), L, row, base, lane, silu);
}

template <typename T, int W, int NW>
__global__ void __launch_bounds__(CONV_WS_THREADS) conv_bwd_ws(
    const T* __restrict__ x, const void* __restrict__ dout, int dout_f32, const float* __restrict__ weight,
    const float* __restrict__ bias, const void* __restrict__ init, int init_f32, const void* __restrict__ dfinal,
    int dfinal_f32, T* __restrict__ dx, void* __restrict__ dinit, int dinit_f32, float* __restrict__ part, int D,
    i64 L, unsigned nseg, unsigned nwarps, int silu) {
  constexpr int G = 16 / sizeof(T), WM1 = W - 1, WS = SSM_WARP_SIZE, SEG = WS * NW * G;
  constexpr int WM = WM1 > 0 ? WM1 : 1;
  static_assert(G >= WM1, "a word holds the W-1 carried values");
  const int lane = threadIdx.x % WS;
  const unsigned gw = blockIdx.x * (CONV_WS_THREADS / WS) + threadIdx.x / WS;
  if (gw >= nwarps) return;  // whole warps leave together: the shuffles below stay full
  const unsigned row32 = gw / nseg, seg = gw % nseg;
  const i64 row = row32;
  const int b = (int)(row32 / (unsigned)D), d = (int)(row32 % (unsigned)D);
  const i64 base = (i64)seg * SEG, seg_end = base + SEG;
  const T* xr = x + row * L;
  const void* grow = dout_f32 ? (const void*)(static_cast<const float*>(dout) + row * L)
                              : (const void*)(static_cast<const T*>(dout) + row * L);

  // All loads first: the lane's NW words of x and dout, lane 0's W-1 inputs before the
  // segment, the last lane's word of x and dout after the segment.
  uint4 rx[NW];
  DoutWord<T> rg[NW];
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const i64 p = base + (i64)(i * WS + lane) * G;
    rx[i] = p < L ? *reinterpret_cast<const uint4*>(xr + p) : make_uint4(0, 0, 0, 0);
    rg[i].load(grow, dout_f32, p, p < L);
  }
  float head[WM];
#pragma unroll
  for (int j = 0; j < WM1; ++j) {
    const i64 s = base - WM1 + j;
    head[j] = 0.f;
    if (lane == 0) {
      if (s >= 0)
        head[j] = load_f(xr + s);
      else if (init)
        head[j] = load_elem<T>(init, init_f32, row * WM1 + WM1 + s);
    }
  }
  const bool after_lane = WM1 > 0 && lane == WS - 1 && seg_end < L;
  uint4 nx = make_uint4(0, 0, 0, 0);
  DoutWord<T> ng;
  ng.load(grow, dout_f32, seg_end, after_lane);
  if (after_lane) nx = *reinterpret_cast<const uint4*>(xr + seg_end);
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = weight[(i64)d * W + k];
  const float bias_d = bias ? bias[d] : 0.f;

  // dpre = dout * act'(pre) at the lane's positions, and the dweight/dbias partial sums.
  float dp[NW][G], acc_w[W + 1], tail[WM];
#pragma unroll
  for (int j = 0; j <= W; ++j) acc_w[j] = 0.f;
#pragma unroll
  for (int j = 0; j < WM1; ++j) tail[j] = 0.f;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    float cur[G], g[G], prev[WM];
    word_to_f<T>(rx[i], cur);
    rg[i].to_f(dout_f32, g);
#pragma unroll
    for (int j = 0; j < WM1; ++j) {  // lane l - 1's word i; lane 0: the last lane's word i - 1
      const float send = (lane == WS - 1) ? tail[j] : cur[G - WM1 + j];
      const float got = SSM_SHFL(send, (lane + WS - 1) % WS);
      prev[j] = (lane == 0 && i == 0) ? head[j] : got;
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      float win[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int u = k - WM1 + j;
        win[j] = u >= 0 ? cur[u >= 0 ? u : 0] : prev[u + WM1 >= 0 ? u + WM1 : 0];
      }
      float pre = bias_d;
#pragma unroll
      for (int j = 0; j < W; ++j) pre = fmaf(wk[j], win[j], pre);
      float gk = g[k];  // 0 past L (zero-filled loads)
      if (silu) gk *= silu_grad_f(pre);
      dp[i][k] = gk;
#pragma unroll
      for (int j = 0; j < W; ++j) acc_w[j] = fmaf(gk, win[j], acc_w[j]);
      acc_w[W] += gk;
    }
#pragma unroll
    for (int j = 0; j < WM1; ++j) tail[j] = cur[G - WM1 + j];
  }
  // The last lane: dpre at the W-1 positions after the segment (0 at or past L).
  float after[WM];
  {
    float cur[G], g[G];
    word_to_f<T>(nx, cur);
    ng.to_f(dout_f32, g);
#pragma unroll
    for (int j = 0; j < WM1; ++j) {
      float pre = bias_d;
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const int u = j - WM1 + k;  // index into the next word, negative: into this lane's last word
        pre = fmaf(wk[k], u >= 0 ? cur[u >= 0 ? u : 0] : tail[u + WM1 >= 0 ? u + WM1 : 0], pre);
      }
      float gk = after_lane ? g[j] : 0.f;
      if (silu) gk *= silu_grad_f(pre);
      after[j] = gk;
    }
  }

  // dx[s] = sum_k w[k] dpre[s + W-1-k] (+ dfinal_states at the last W-1 positions).
  T* dxr = dx + row * L;
  const i64 L0 = L - WM1;  // dfinal_states[i] flows to input position L0 + i
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const i64 p = base + (i64)(i * WS + lane) * G;
    float next[WM], o[G];
#pragma unroll
    for (int j = 0; j < WM1; ++j) {  // lane l + 1's word i; the last lane: lane 0's word i + 1
      const float send = (lane == 0 && i + 1 < NW) ? dp[i + 1 < NW ? i + 1 : i][j] : dp[i][j];
      const float got = SSM_SHFL(send, (lane + 1) % WS);
      next[j] = (lane == WS - 1 && i + 1 == NW) ? after[j] : got;
    }
#pragma unroll
    for (int k = 0; k < G; ++k) {
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const int u = k + WM1 - j;  // dpre index into this word, past G: into next
        acc = fmaf(wk[j], u < G ? dp[i][u < G ? u : 0] : next[u >= G ? u - G : 0], acc);
      }
      if (dfinal && p + k >= L0 && p + k < L) acc += load_elem<T>(dfinal, dfinal_f32, row * WM1 + (p + k - L0));
      o[k] = acc;
    }
    if (p < L) *reinterpret_cast<uint4*>(dxr + p) = f_to_word<T>(o);
  }
  if (dinit && base == 0 && lane == 0) {
    // Initial state j sits at input position j - (W-1) (L >= 8 > W-1: no dfinal reaches it).
#pragma unroll
    for (int j = 0; j < WM1; ++j) {
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k <= j; ++k) acc = fmaf(wk[k], dp[0][j - k], acc);
      store_elem<T>(dinit, dinit_f32, row * WM1 + j, acc);
    }
  }
#pragma unroll
  for (int j = 0; j <= W; ++j) {
    const float s = warp_sum(acc_w[j]);
    if (lane == 0) part[(((i64)b * nseg + seg) * D + d) * (W + 1) + j] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Channel-last tiles (x stored (B, L, D), D % 8 == 0, 16-byte aligned, no seq_idx, W <= 4,
// initial states absent or of x's dtype). A block of 128 threads owns TC = 128 bytes of
// channels (64 16-bit or 32 float32 channels) x CL_TL = 64 time steps of one batch row. The
// input rows it needs (plus the W-1 halo rows before, and for the backward after) are copied
// into shared memory with 16-byte loads (8 per 128-byte row: coalesced), each thread then
// walks one channel down a run of time steps reading shared memory (consecutive channels
// across a warp: no bank conflicts), results go to a shared tile and leave with 16-byte
// stores. Traffic: x and out once (+ (W-1)/64 halo rows, L2 hits); the backward reads x and
// dout once and writes dx once, and one (W+1)-vector of dweight/dbias partials per
// (channel, block) that column_sum adds in a fixed order.
#define CL_TL 64
#define CL_NT 128

namespace {
// Rows r0 .. r0 + ROWS of the (L, D) slab xb at channels c0 .. c0 + 128 bytes into dst (ROWS x
// 8 16-byte words). Rows before 0 come from the initial states initb[(c) * wm1 + wm1 + t]
// (null: zeros), rows at or past L and channels past D are zeros.
template <typename T, int ROWS>
__device__ __forceinline__ void cl_load_tile(uint4* dst, const T* xb, const T* initb, i64 r0, int c0, int D, i64 L,
                                             int wm1, i64 ld) {
  constexpr int PER = 16 / sizeof(T), N = ROWS * 8, IT = (N + CL_NT - 1) / CL_NT;
  uint4 buf[IT];
#pragma unroll
  for (int k = 0; k < IT; ++k) {
    const int i = threadIdx.x + k * CL_NT;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (i < N) {
      const i64 t = r0 + (i >> 3);
      const int cc = c0 + (i & 7) * PER;
      if (cc < D) {
        if (t >= 0 && t < L) {
          v = *reinterpret_cast<const uint4*>(xb + t * ld + cc);  // ld: elements between time steps
        } else if (t < 0 && initb) {
          T* e = reinterpret_cast<T*>(&v);
#pragma unroll
          for (int p = 0; p < PER; ++p) e[p] = initb[(i64)(cc + p) * wm1 + wm1 + t];
        }
      }
    }
    buf[k] = v;
  }
#pragma unroll
  for (int k = 0; k < IT; ++k) {
    const int i = threadIdx.x + k * CL_NT;
    if (i < N) dst[i] = buf[k];
  }
}

template <typename T, int ROWS>
__device__ __forceinline__ void cl_store_tile(T* ob, const uint4* src, i64 r0, int c0, int D, i64 L) {
  constexpr int PER = 16 / sizeof(T), N = ROWS * 8;
  for (int i = threadIdx.x; i < N; i += CL_NT) {
    const i64 t = r0 + (i >> 3);
    const int cc = c0 + (i & 7) * PER;
    if (t < L && cc < D) *reinterpret_cast<uint4*>(ob + t * D + cc) = src[i];
  }
}
}  // namespace

template <typename T, int W>
__global__ void __launch_bounds__(CL_NT) conv_fwd_cl_tile(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ bias,
    const T* __restrict__ init, T* __restrict__ out, void* __restrict__ final_states, int final_f32, int D, i64 L,
    int silu, i64 sxb, i64 sxt) {
  // x[b, t, c] at x + b * sxb + t * sxt + c (sxt >= D, both multiples of 16 bytes): a channel slice of a wider row
  // (Mamba-2's xBC inside the in_proj output) is read in place. out is dense (B, L, D).
  constexpr int WM1 = W - 1, TC = 128 / sizeof(T), NG = CL_NT / TC, RPG = CL_TL / NG;
  __shared__ uint4 xs_raw[(CL_TL + WM1) * 8];
  __shared__ uint4 os_raw[CL_TL * 8];
  const int c0 = blockIdx.x * TC;
  const i64 t0 = (i64)blockIdx.y * CL_TL;
  const i64 b = blockIdx.z;
  const T* xb = x + b * sxb;
  const T* initb = init ? init + b * D * WM1 : nullptr;
  cl_load_tile<T, CL_TL + WM1>(xs_raw, xb, initb, t0 - WM1, c0, D, L, WM1, sxt);
  const int cl = threadIdx.x % TC, grp = threadIdx.x / TC, c = c0 + cl;
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = c < D ? weight[(i64)c * W + k] : 0.f;
  const float bias_c = (bias && c < D) ? bias[c] : 0.f;
  __syncthreads();
  const T* xt = reinterpret_cast<const T*>(xs_raw);
  T* ot = reinterpret_cast<T*>(os_raw);
  const int rb = grp * RPG;
  float win[W];
#pragma unroll
  for (int j = 0; j < WM1; ++j) win[j] = load_f(xt + (rb + j) * TC + cl);
#pragma unroll 8
  for (int q = 0; q < RPG; ++q) {
    win[WM1] = load_f(xt + (rb + q + WM1) * TC + cl);
    float acc = bias_c;
#pragma unroll
    for (int j = 0; j < W; ++j) acc = fmaf(wk[j], win[j], acc);
    store_f(ot + (rb + q) * TC + cl, silu ? silu_fast(acc) : acc);
#pragma unroll
    for (int j = 0; j < WM1; ++j) win[j] = win[j + 1];
  }
  __syncthreads();
  cl_store_tile<T, CL_TL>(out + b * L * D, os_raw, t0, c0, D, L);
  if (final_states && grp == 0 && c < D && t0 <= L - 1 && L - 1 < t0 + CL_TL) {
    for (int i = 0; i < WM1; ++i) {
      const i64 s = L - WM1 + i;
      const float v = s >= 0 ? load_f(xb + s * sxt + c) : (initb ? load_f(initb + (i64)c * WM1 + WM1 + s) : 0.f);
      store_elem<T>(final_states, final_f32, (b * D + c) * WM1 + i, v);
    }
  }
}

template <typename T, int W>
__global__ void __launch_bounds__(CL_NT) conv_bwd_cl_tile(
    const T* __restrict__ x, const T* __restrict__ dout, const float* __restrict__ weight,
    const float* __restrict__ bias, const T* __restrict__ init, const void* __restrict__ dfinal, int dfinal_f32,
    T* __restrict__ dx, void* __restrict__ dinit, int dinit_f32, float* __restrict__ part, int D, i64 L, i64 ntl,
    int silu) {
  constexpr int WM1 = W - 1, TC = 128 / sizeof(T), NG = CL_NT / TC;
  constexpr int XR = CL_TL + 2 * WM1, GR = CL_TL + WM1;  // x rows from t0 - (W-1), dout/dpre rows from t0
  __shared__ uint4 xs_raw[XR * 8];
  __shared__ uint4 gs_raw[GR * 8];  // dout, then the dx tile
  __shared__ float dps[GR * TC];
  __shared__ float red[NG][TC][W + 1];
  const int c0 = blockIdx.x * TC;
  const i64 t0 = (i64)blockIdx.y * CL_TL;
  const i64 b = blockIdx.z;
  const T* xb = x + b * L * D;
  const T* initb = init ? init + b * D * WM1 : nullptr;
  cl_load_tile<T, XR>(xs_raw, xb, initb, t0 - WM1, c0, D, L, WM1, D);
  cl_load_tile<T, GR>(gs_raw, dout + b * L * D, nullptr, t0, c0, D, L, WM1, D);
  const int cl = threadIdx.x % TC, grp = threadIdx.x / TC, c = c0 + cl;
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = c < D ? weight[(i64)c * W + k] : 0.f;
  const float bias_c = (bias && c < D) ? bias[c] : 0.f;
  __syncthreads();
  const T* xt = reinterpret_cast<const T*>(xs_raw);
  const T* gt = reinterpret_cast<const T*>(gs_raw);
  float acc_w[W + 1];
#pragma unroll
  for (int j = 0; j <= W; ++j) acc_w[j] = 0.f;
  for (int q = grp; q < GR; q += NG) {  // dpre at t0 + q (0 at or past L: dout rows there are 0)
    float xv[W];
#pragma unroll
    for (int j = 0; j < W; ++j) xv[j] = load_f(xt + (q + j) * TC + cl);
    float pre = bias_c;
#pragma unroll
    for (int j = 0; j < W; ++j) pre = fmaf(wk[j], xv[j], pre);
    float gk = load_f(gt + q * TC + cl);
    if (silu) gk *= silu_grad_f(pre);
    dps[q * TC + cl] = gk;
    if (q < CL_TL) {
#pragma unroll
      for (int j = 0; j < W; ++j) acc_w[j] = fmaf(gk, xv[j], acc_w[j]);
      acc_w[W] += gk;
    }
  }
#pragma unroll
  for (int j = 0; j <= W; ++j) red[grp][cl][j] = acc_w[j];
  __syncthreads();
  T* ot = reinterpret_cast<T*>(gs_raw);
  const i64 L0 = L - WM1;  // dfinal_states[i] flows to input position L0 + i
  for (int q = grp; q < CL_TL; q += NG) {
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < W; ++j) acc = fmaf(wk[j], dps[(q + WM1 - j) * TC + cl], acc);
    const i64 s = t0 + q;
    if (dfinal && c < D && s >= L0 && s < L) acc += load_elem<T>(dfinal, dfinal_f32, (b * D + c) * WM1 + (s - L0));
    store_f(ot + q * TC + cl, acc);
  }
  if (dinit && t0 == 0 && grp == 0 && c < D) {
    for (int j = 0; j < WM1; ++j) {  // initial state j sits at input position s = j - (W-1)
      const i64 s = j - WM1;
      float acc = (dfinal && s >= L0) ? load_elem<T>(dfinal, dfinal_f32, (b * D + c) * WM1 + (s - L0)) : 0.f;
      for (int k = 0; k <= j; ++k) acc = fmaf(wk[k], dps[(j - k) * TC + cl], acc);
      store_elem<T>(dinit, dinit_f32, (b * D + c) * WM1 + j, acc);
    }
  }
  if (threadIdx.x < TC && c < D) {
#pragma unroll
    for (int j = 0; j <= W; ++j) {
      float t = 0.f;
#pragma unroll
      for (int k = 0; k < NG; ++k) t += red[k][cl][j];
      part[((b * ntl + blockIdx.y) * D + c) * (W + 1) + j] = t;
    }
  }
  __syncthreads();
  cl_store_tile<T, CL_TL>(dx + b * L * D, gs_raw, t0, c0, D, L);
}

// The channel-last backward without the float32 dpre tile (session 4; conv_bwd_cl_tile above
// is the previous kernel): same tiles and staging, but each thread walks its channel down its
// RPG rows plus the W-1 halo rows after them, backwards in time, keeping the W inputs and the W
// dpre values it needs in sliding register windows. Per position that is one shared-memory
// load of x, one of dout and one store of dx (conv_bwd_cl_tile: W + 1 loads and a store for
// dpre, then W loads and a store for dx, ~11 shared-memory instructions per position, which
// at one warp instruction per clock per SM cost ~90 us of the 240 us measured at B8 D4096
// L2048 W4). The W-1 halo dpre values of a run are recomputed by the thread (3 / 32 extra
// for 16-bit types); no __syncthreads between the dpre and dx passes; 28 KiB of shared memory
// instead of 37 KiB.
template <typename T, int W>
__global__ void __launch_bounds__(CL_NT) conv_bwd_cl_walk(
    const T* __restrict__ x, const T* __restrict__ dout, const float* __restrict__ weight,
    const float* __restrict__ bias, const T* __restrict__ init, const void* __restrict__ dfinal, int dfinal_f32,
    T* __restrict__ dx, void* __restrict__ dinit, int dinit_f32, float* __restrict__ part, int D, i64 L, i64 ntl,
    int silu) {
  constexpr int WM1 = W - 1, TC = 128 / sizeof(T), NG = CL_NT / TC, RPG = CL_TL / NG;
  constexpr int XR = CL_TL + 2 * WM1, GR = CL_TL + WM1;  // x rows from t0 - (W-1), dout rows from t0
  __shared__ uint4 xs_raw[XR * 8];
  __shared__ uint4 gs_raw[GR * 8];
  __shared__ uint4 os_raw[CL_TL * 8];
  __shared__ float red[NG][TC][W + 1];
  const int c0 = blockIdx.x * TC;
  const i64 t0 = (i64)blockIdx.y * CL_TL;
  const i64 b = blockIdx.z;
  const T* xb = x + b * L * D;
  const T* initb = init ? init + b * D * WM1 : nullptr;
  cl_load_tile<T, XR>(xs_raw, xb, initb, t0 - WM1, c0, D, L, WM1, D);
  cl_load_tile<T, GR>(gs_raw, dout + b * L * D, nullptr, t0, c0, D, L, WM1, D);
  const int cl = threadIdx.x % TC, grp = threadIdx.x / TC, c = c0 + cl;
  float wk[W];
#pragma unroll
  for (int k = 0; k < W; ++k) wk[k] = c < D ? weight[(i64)c * W + k] : 0.f;
  const float bias_c = (bias && c < D) ? bias[c] : 0.f;
  const i64 L0 = L - WM1;  // dfinal_states[i] flows to input position L0 + i
  __syncthreads();
  const T* xt = reinterpret_cast<const T*>(xs_raw);
  const T* gt = reinterpret_cast<const T*>(gs_raw);
  T* ot = reinterpret_cast<T*>(os_raw);
  const int rb = grp * RPG, q0 = rb + RPG + WM1 - 1;  // rows rb .. q0 of dpre, rb .. rb + RPG - 1 of dx
  // In the step at row q: xv[j] = x tile row q + j (the input at t0 + q - (W-1) + j), dpw[j] = dpre
  // at t0 + q + j. Both shift up by one at the start of a step: before the first, xv[j] = row q0 + 1 + j.
  float xv[W], dpw[W], acc_w[W + 1];
#pragma unroll
  for (int j = 0; j < W; ++j) {
    xv[j] = j < WM1 ? load_f(xt + (q0 + 1 + j) * TC + cl) : 0.f;
    dpw[j] = 0.f;
  }
#pragma unroll
  for (int j = 0; j <= W; ++j) acc_w[j] = 0.f;
#pragma unroll 4
  for (int i = 0; i < RPG + WM1; ++i) {
    const int q = q0 - i;
#pragma unroll
    for (int j = WM1; j > 0; --j) {
      xv[j] = xv[j - 1];
      dpw[j] = dpw[j - 1];
    }
    xv[0] = load_f(xt + q * TC + cl);
    float pre = bias_c;
#pragma unroll
    for (int j = 0; j < W; ++j) pre = fmaf(wk[j], xv[j], pre);
    float gk = load_f(gt + q * TC + cl);  // 0 at or past L (zero-filled rows)
    if (silu) gk *= silu_grad_f(pre);
    dpw[0] = gk;
    if (i >= WM1) {  // q is one of the thread's own rows
#pragma unroll
      for (int j = 0; j < W; ++j) acc_w[j] = fmaf(gk, xv[j], acc_w[j]);
      acc_w[W] += gk;
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < W; ++j) acc = fmaf(wk[j], dpw[WM1 - j], acc);
      const i64 s = t0 + q;
      if (dfinal && c < D && s >= L0 && s < L) acc += load_elem<T>(dfinal, dfinal_f32, (b * D + c) * WM1 + (s - L0));
      store_f(ot + q * TC + cl, acc);
    }
  }
  if (dinit && t0 == 0 && grp == 0 && c < D) {
    // Initial state j sits at input position s = j - (W-1); dpw holds dpre at 0 .. W-1.
#pragma unroll
    for (int j = 0; j < WM1; ++j) {
      const i64 s = j - WM1;
      float acc = (dfinal && s >= L0) ? load_elem<T>(dfinal, dfinal_f32, (b * D + c) * WM1 + (s - L0)) : 0.f;
#pragma unroll
      for (int k = 0; k <= j; ++k) acc = fmaf(wk[k], dpw[j - k], acc);
      store_elem<T>(dinit, dinit_f32, (b * D + c) * WM1 + j, acc);
    }
  }
#pragma unroll
  for (int j = 0; j <= W; ++j) red[grp][cl][j] = acc_w[j];
  __syncthreads();
  if (threadIdx.x < TC && c < D) {
#pragma unroll
    for (int j = 0; j <= W; ++j) {
      float t = 0.f;
#pragma unroll
      for (int k = 0; k < NG; ++k) t += red[k][cl][j];
      part[((b * ntl + blockIdx.y) * D + c) * (W + 1) + j] = t;
    }
  }
  cl_store_tile<T, CL_TL>(dx + b * L * D, os_raw, t0, c0, D, L);
}

// ---------------------------------------------------------------------------------------------
// Decode: x (B, D, Lnew) and state rows addressed through strides (elements); out (B, D, Lnew)
// contiguous. in_regs (the common one-token shift window with state_len <= CONV_UPD_REGS): the
// state row is read once into registers, all its loads issued together, then out and the shifted
// row are written from them (the general loop below re-reads the state after each store, as the
// stores may alias it, a dependent load per entry).
#define CONV_UPD_REGS 8
template <typename TX, typename TS>
__global__ void __launch_bounds__(128) conv_update(
    const TX* __restrict__ x, i64 sx_b, i64 sx_d, i64 sx_t, TS* __restrict__ state, i64 st_b, i64 st_d, i64 st_t,
    const float* __restrict__ weight, const float* __restrict__ bias, const int* __restrict__ cache_seqlens,
    const int* __restrict__ state_indices, TX* __restrict__ out, int B, int D, int n_new, int width, int state_len,
    int silu, int n_rows, int in_regs) {
  const unsigned rowid = blockIdx.x * blockDim.x + threadIdx.x;  // B * D < 2**31
  if (rowid >= (unsigned)B * (unsigned)D) return;
  const int b = (int)(rowid / (unsigned)D), d = (int)(rowid % (unsigned)D);
  const TX* xr = x + b * sx_b + d * sx_d;
  TX* orow = out + (i64)rowid * n_new;
  const i64 slot = state_indices ? state_indices[b] : b;
  const bool circular = cache_seqlens != nullptr && state_len > 0;
  const int seqlen = circular ? cache_seqlens[b] : 0;
  if (slot < 0 || slot >= n_rows || seqlen < 0) {  // padding, or an index the host did not check
    for (int j = 0; j < n_new; ++j) store_f(orow + j, 0.f);
    return;
  }
  TS* sr = state + slot * st_b + d * st_d;
  const float* w = weight + (i64)d * width;
  const float bias_d = bias ? bias[d] : 0.f;
  const int wm1 = width - 1;
  if (in_regs && !circular && n_new == 1 && state_len <= CONV_UPD_REGS && wm1 <= state_len) {
    float hist[CONV_UPD_REGS];
#pragma unroll
    for (int i = 0; i < CONV_UPD_REGS; ++i) hist[i] = i < state_len ? load_f(sr + (i64)i * st_t) : 0.f;
    const float xv = load_f(xr);
    // Same sum, same order as the loop below: history entries state_len - wm1 .. state_len - 1, then x.
    float acc = bias_d;
#pragma unroll
    for (int i = 0; i < CONV_UPD_REGS; ++i) {
      const int k = i - (state_len - wm1);
      if (i < state_len && k >= 0) acc += w[k] * hist[i];
    }
    acc += w[wm1] * xv;
    if (silu) acc = silu_fast(acc);  // as the forward kernels (and no division subroutine)
    store_f(orow, acc);
#pragma unroll
    for (int i = 0; i < CONV_UPD_REGS; ++i)
      if (i < state_len) store_f(sr + (i64)i * st_t, i + 1 < state_len ? hist[i + 1] : xv);
    return;
  }
  const int c = circular ? seqlen % state_len : 0;
  // History entry i (0 = oldest of state_len) of the stream state ++ x.
  auto history = [&](int i) {
    const int pos = circular ? (c + i) % state_len : i;  // (c - state_len + i) mod state_len
    return load_f(sr + (i64)pos * st_t);
  };
  for (int j = 0; j < n_new; ++j) {
    float acc = bias_d;
    for (int k = 0; k <= wm1; ++k) {
      const int idx = state_len + j - wm1 + k;  // index in the stream
      acc += w[k] * (idx >= state_len ? load_f(xr + (idx - state_len) * sx_t) : history(idx));
    }
    if (silu) acc = silu_f(acc);
    store_f(orow + j, acc);
  }
  if (state_len == 0) return;
  if (circular) {
    for (int j = 0; j < n_new; ++j) store_f(sr + (i64)((c + j) % state_len) * st_t, load_f(xr + j * sx_t));
  } else {
    for (int i = 0; i < state_len; ++i) {  // ascending: reads i + n_new before any write there
      const int src = i + n_new;
      store_f(sr + (i64)i * st_t,
              src < state_len ? load_f(sr + (i64)src * st_t) : load_f(xr + (src - state_len) * sx_t));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dweight (D, W) and dbias (D,) of the backward from its float32 partials part (nrows, D * (W + 1)):
// column_sum's fixed-order reduction (the same sums, bit for bit), stored straight into the
// parameters' dtypes, so that both gradients are whole fresh allocations (the torch adapter's launch
// plans record a backward only then; before session 7 they were slices of one sum buffer cast by
// astype). Block (32, 8): 32 columns, rows split over threadIdx.y.
template <typename TW, typename TB>
__global__ void __launch_bounds__(256) conv_param_sum(const float* __restrict__ part, i64 nrows, int D, int W,
                                                      TW* __restrict__ dweight, TB* __restrict__ dbias) {
  __shared__ float acc[8][33];
  const int ncol = D * (W + 1);
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < ncol)
    for (i64 r = threadIdx.y; r < nrows; r += 8) s += part[r * ncol + col];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < ncol) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += acc[k][threadIdx.x];
    const int d = col / (W + 1), k = col - d * (W + 1);
    if (k < W)
      store_f(dweight + (i64)d * W + k, t);
    else if (dbias)
      store_f(dbias + d, t);
  }
}
