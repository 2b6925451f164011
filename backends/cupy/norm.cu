// Norms: RMSNorm / LayerNorm with a fused residual add, and Mamba-2's gated (grouped) RMSNorm.
//
// Work decomposition (every kernel here):
//   A "row" is one normalised vector: a (rows, D) row for rms/layer norm, one group of G
//   channels for the gated norm (row r = m * ngroups + g starts at m * row stride + g * G of each
//   input (x, z, dy: strided rows such as a channel slice of the in_proj output are read in place;
//   outputs are contiguous); its weight slice starts at g * G). blockDim.x threads own one row (a power of two <= warp, or a multiple
//   of the warp, up to 512) and blockDim.y rows share a block (256 threads when rows are
//   short). Thread t owns the 8-element chunks t, t + blockDim.x, ... of its row: NV chunks
//   held in registers (NV = 1, 2, 4 templated), or NV = 0 for very long rows, which streams
//   the row from global memory once per pass (L2 keeps it). Statistics are two-pass over the
//   registers (mean, then centred variance) with warp shuffles + one __shared__ word per warp.
//   Chunks are one 16-byte access for 16-bit data when every row start is 16-byte aligned.
// Traffic: forward reads x (+ residual) once and writes y (+ s) once; the backward reads dy,
//   x (+ residual, + dresidual_out) once, writes dx (+ dresidual) once. The backward grid is
//   persistent: each (block, row slot) accumulates dweight/dbias for its columns over its rows
//   in registers and writes one float32 partial row; column_sum (common.cuh) adds the partials (D x slots
//   floats, a few MB) into dweight/dbias, deterministic (no atomics).
// Secondary streams (residual, s, dy, dresidual_out, z, dz) are either the row type TX or
// float32, chosen at run time by an *_f32 flag (a uniform branch), so instantiations stay few.
#include "common.cuh"

namespace {

template <typename TX>
__device__ __forceinline__ void load_chunk8_or_f32(const void* p, int is_f32, i64 i, i64 n, bool vec,
                                                   float (&v)[8]) {
  if (is_f32)
    load_chunk8(static_cast<const float*>(p), i, n, vec, v);
  else
    load_chunk8(static_cast<const TX*>(p), i, n, vec, v);
}

template <typename TX>
__device__ __forceinline__ void store_chunk8_or_f32(void* p, int is_f32, i64 i, i64 n, bool vec,
                                                    const float (&v)[8]) {
  if (is_f32)
    store_chunk8(static_cast<float*>(p), i, n, vec, v);
  else
    store_chunk8(static_cast<TX*>(p), i, n, vec, v);
}

// Offset a raw pointer by `elements` of float32 or TX.
template <typename TX>
__device__ __forceinline__ const void* advance(const void* p, int is_f32, i64 elements) {
  return is_f32 ? static_cast<const void*>(static_cast<const float*>(p) + elements)
                : static_cast<const void*>(static_cast<const TX*>(p) + elements);
}

template <typename TX>
__device__ __forceinline__ void* advance(void* p, int is_f32, i64 elements) {
  return is_f32 ? static_cast<void*>(static_cast<float*>(p) + elements) : static_cast<void*>(static_cast<TX*>(p) + elements);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// rms_norm / layer_norm forward. One row per threadIdx.y; s = x + residual (float32), statistics
// of s, y = (s - mean) * rstd * weight (+ bias) in TX; s stored when s_out is given.
template <typename TX, int NV, bool RMS>
__global__ void __launch_bounds__(512) norm_fwd(const TX* __restrict__ x, const void* __restrict__ residual,
                                                int residual_f32, const float* __restrict__ weight,
                                                const float* __restrict__ bias, TX* __restrict__ y,
                                                void* __restrict__ s_out, int s_f32, i64 rows, int D, float eps,
                                                int vec) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const bool live = row < rows;
  const i64 base = live ? row * D : 0;
  const int nchunks = (D + 7) / 8;
  const TX* xr = x + base;
  const void* rr = residual ? advance<TX>(residual, residual_f32, base) : nullptr;
  void* sr = s_out ? advance<TX>(s_out, s_f32, base) : nullptr;
  const float inv_d = 1.f / D;

  auto load_s = [&](int c, float (&v)[8]) {
    const i64 i = (i64)c * 8;
    load_chunk8(xr, i, D, vec, v);
    if (rr) {
      float r[8];
      load_chunk8_or_f32<TX>(rr, residual_f32, i, D, vec, r);
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] += r[k];
    }
  };
  auto store_y = [&](int c, const float (&v)[8], float mean, float rstd) {
    const i64 i = (i64)c * 8;
    float w[8], b[8], o[8];
    load_chunk8(weight, i, D, vec, w);
    if (bias) load_chunk8(bias, i, D, vec, b);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = (v[k] - mean) * rstd * w[k] + (bias ? b[k] : 0.f);
    store_chunk8(y + base, i, D, vec, o);
  };

  float mean = 0.f, rstd;
  if constexpr (NV > 0) {
    float v[NV][8];
    float sum = 0.f, sq = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      if (live && c < nchunks) {
        load_s(c, v[j]);
        if (sr) store_chunk8_or_f32<TX>(sr, s_f32, (i64)c * 8, D, vec, v[j]);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[j][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sum += v[j][k];
        sq += v[j][k] * v[j][k];
      }
    }
    if (RMS) {
      sq = row_sum(sq, red);
    } else {
      mean = row_sum(sum, red) * inv_d;
      sq = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) {
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float t = ((i64)c * 8 + k < D) ? v[j][k] - mean : 0.f;
            sq += t * t;
          }
        }
      }
      sq = row_sum(sq, red);
    }
    rstd = rsqrtf(sq * inv_d + eps);
    if (live) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) store_y(c, v[j], mean, rstd);
      }
    }
  } else {
    // Streaming: one pass per statistic, the row comes back from L2.
    float v[8];
    float sum = 0.f, sq = 0.f;
    for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
      load_s(c, v);
      if (sr) store_chunk8_or_f32<TX>(sr, s_f32, (i64)c * 8, D, vec, v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sum += v[k];
        sq += v[k] * v[k];
      }
    }
    if (RMS) {
      sq = row_sum(sq, red);
    } else {
      mean = row_sum(sum, red) * inv_d;
      sq = 0.f;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_s(c, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const float t = ((i64)c * 8 + k < D) ? v[k] - mean : 0.f;
          sq += t * t;
        }
      }
      sq = row_sum(sq, red);
    }
    rstd = rsqrtf(sq * inv_d + eps);
    for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
      load_s(c, v);
      store_y(c, v, mean, rstd);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rms_norm / layer_norm forward v2 (SSMCORE_NORM_FWD=v2, the default where it applies: D % 8 == 0,
// 16-byte aligned rows, at most 2 register chunks per thread; else norm_fwd above, which is also
// kept for side-by-side timing as SSMCORE_NORM_FWD=v1). Same row layout and results as norm_fwd,
// but built for bandwidth (the fused add at 16384 x 2560, bf16 x, float32 residual in and out,
// moves 12 bytes per element and nothing else):
//   - persistent grid: row slot (blockIdx.x, threadIdx.y) takes rows slot, slot + slots, ...;
//     while a row is reduced and stored, the slot's next row is already being loaded (its raw
//     16-byte words held in registers: 12 registers per chunk for 16-bit x and float32 residual;
//     the first row's loads are the only ones a slot waits for with nothing else in flight),
//     so every resident slot keeps a row's loads in flight through its barriers and stores; the
//     launcher may also give one row per slot (a full grid: then there is nothing to prefetch);
//   - every access is one 16-byte word (x, residual, s, y; weight and bias are L1 hits);
//   - HINT: loads and stores of the streams use the evict-first ("cs") cache operator: nothing
//     is read again, so L2 keeps the weight rather than the stream (CUDA only; else plain).
namespace {

// 8 elements of T (16 or 32 bytes) as 16-byte words.
template <typename T>
__device__ __forceinline__ void pack8(const float (&v)[8], uint4 (&w)[sizeof(T) / 2]) {
  T* e = reinterpret_cast<T*>(w);
#pragma unroll
  for (int k = 0; k < 8; ++k) store_f(e + k, v[k]);
}

template <typename T, bool HINT>
__device__ __forceinline__ void store8(T* p, const float (&v)[8]) {
  uint4 w[sizeof(T) / 2];
  pack8<T>(v, w);
#pragma unroll
  for (int h = 0; h < (int)(sizeof(T) / 2); ++h) st_stream16<HINT>(p + h * (16 / sizeof(T)), w[h]);
}

}  // namespace

// Registers (sm_90): NV 1 58-64 (16-bit x at 2560 channels: 320-thread blocks, 3 per SM, 46 KB of
// loads in flight per SM), NV 2 93-107; a bound of 48 (4 such blocks per SM) spills.
template <typename TX, int NV, bool RMS, bool HINT>
__global__ void __launch_bounds__(512) norm_fwd2(const TX* __restrict__ x, const void* __restrict__ residual,
                                                 int residual_f32, const float* __restrict__ weight,
                                                 const float* __restrict__ bias, TX* __restrict__ y,
                                                 void* __restrict__ s_out, int s_f32, i64 rows, int D, float eps) {
  constexpr int XW = sizeof(TX) / 2;  // 16-byte words per 8 elements of x
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const int nchunks = D >> 3;
  const i64 slots = (i64)gridDim.x * blockDim.y;
  const float inv_d = 1.f / D;
  const bool has_res = residual != nullptr;
  const int res_bytes = residual_f32 ? 4 : (int)sizeof(TX);

  // Raw words of one row's chunks (zeros for a dead row or chunk).
  struct Raw {
    uint4 x[NV][XW];
    uint4 r[NV][2];
  };
  auto load_row = [&](i64 row, Raw& a) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      const bool on = row < rows && c < nchunks;
      const i64 e = row * D + (i64)c * 8;
#pragma unroll
      for (int h = 0; h < XW; ++h)
        a.x[j][h] = on ? ld_stream16<HINT>(x + e + h * (8 / XW)) : make_uint4(0u, 0u, 0u, 0u);
      const char* rp = static_cast<const char*>(residual) + e * res_bytes;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        a.r[j][h] = (on && has_res && h * 16 < 8 * res_bytes) ? ld_stream16<HINT>(rp + h * 16) : make_uint4(0u, 0u, 0u, 0u);
    }
  };

  Raw raw;  // the slot's next row: loaded one row ahead
  load_row((i64)blockIdx.x * blockDim.y + threadIdx.y, raw);
  for (i64 first = (i64)blockIdx.x * blockDim.y; first < rows; first += slots) {
    const i64 row = first + threadIdx.y;
    const bool live = row < rows;
    float v[NV][8];
    float sum = 0.f, sq = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const TX* xe = reinterpret_cast<const TX*>(raw.x[j]);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        float r = 0.f;
        if (residual_f32)
          r = reinterpret_cast<const float*>(raw.r[j])[k];
        else
          r = load_f(reinterpret_cast<const TX*>(raw.r[j]) + k);
        v[j][k] = load_f(xe + k) + r;  // dead chunks: 0 + 0
        sum += v[j][k];
        sq += v[j][k] * v[j][k];
      }
    }
    // This row's words are unpacked: the next row's loads go out now and stay in flight while
    // this row is stored and reduced (one row ahead is enough: a slot spends a few microseconds
    // per row, the loads' latency is about one).
    load_row(row + slots, raw);
    if (live && s_out) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) {
          const i64 e = row * D + (i64)c * 8;
          if (s_f32)
            store8<float, HINT>(static_cast<float*>(s_out) + e, v[j]);
          else
            store8<TX, HINT>(static_cast<TX*>(s_out) + e, v[j]);
        }
      }
    }
    float mean = 0.f;
    if (RMS) {
      sq = row_sum(sq, red);
    } else {
      mean = row_sum(sum, red) * inv_d;
      sq = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) {
#pragma unroll
          for (int k = 0; k < 8; ++k) sq += (v[j][k] - mean) * (v[j][k] - mean);
        }
      }
      sq = row_sum(sq, red);
    }
    const float rstd = rsqrtf(sq * inv_d + eps);
    if (live) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) {
          float w[8], b[8], o[8];
          load_chunk8(weight, (i64)c * 8, D, true, w);
          if (bias) load_chunk8(bias, (i64)c * 8, D, true, b);
#pragma unroll
          for (int k = 0; k < 8; ++k) o[k] = (v[j][k] - mean) * rstd * w[k] + (bias ? b[k] : 0.f);
          store8<TX, HINT>(y + row * D + (i64)c * 8, o);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// rms_norm / layer_norm backward. Persistent grid: row slot (blockIdx.x, threadIdx.y) takes rows
// slot, slot + slots, ... With xhat = (s - mean) * rstd and g = dy * weight:
//   ds = rstd * (g - xhat * mean(g * xhat) - mean(g) [layer norm only]) + dresidual_out
// dx = ds (TX), dresidual = ds; dweight += dy * xhat, dbias += dy into the slot's partial row.
template <typename TX, int NV, bool RMS>
__global__ void __launch_bounds__(512) norm_bwd(const void* __restrict__ dy, int dy_f32, const TX* __restrict__ x,
                                                const void* __restrict__ residual, int residual_f32,
                                                const float* __restrict__ weight,
                                                const void* __restrict__ dres_out, int dres_out_f32,
                                                TX* __restrict__ dx, void* __restrict__ dres, int dres_f32,
                                                float* __restrict__ dw_part, float* __restrict__ db_part, i64 rows,
                                                int D, float eps, int vec) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const int nchunks = (D + 7) / 8;
  const i64 slots = (i64)gridDim.x * blockDim.y;
  const i64 slot = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const float inv_d = 1.f / D;
  constexpr int NA = NV > 0 ? NV : 1;
  float dwacc[NA][8], dbacc[NA][8];
#pragma unroll
  for (int j = 0; j < NA; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k) dwacc[j][k] = dbacc[j][k] = 0.f;

  for (i64 first = (i64)blockIdx.x * blockDim.y; first < rows; first += slots) {
    const i64 row = first + threadIdx.y;
    const bool live = row < rows;
    const i64 base = live ? row * D : 0;
    const TX* xr = x + base;
    const void* rr = residual ? advance<TX>(residual, residual_f32, base) : nullptr;
    const void* dyr = advance<TX>(dy, dy_f32, base);
    const void* dor = dres_out ? advance<TX>(dres_out, dres_out_f32, base) : nullptr;

    auto load_s = [&](int c, float (&v)[8]) {
      const i64 i = (i64)c * 8;
      load_chunk8(xr, i, D, vec, v);
      if (rr) {
        float r[8];
        load_chunk8_or_f32<TX>(rr, residual_f32, i, D, vec, r);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] += r[k];
      }
    };
    // Loads dy and weight of chunk c: g = dy * w.
    auto load_g = [&](int c, float (&d)[8], float (&g)[8]) {
      const i64 i = (i64)c * 8;
      float w[8];
      load_chunk8_or_f32<TX>(dyr, dy_f32, i, D, vec, d);
      load_chunk8(weight, i, D, vec, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) g[k] = d[k] * w[k];
    };
    auto store_ds = [&](int c, const float (&xh)[8], const float (&g)[8], float c1, float c2, float rstd) {
      const i64 i = (i64)c * 8;
      float ds[8];
#pragma unroll
      for (int k = 0; k < 8; ++k) ds[k] = (g[k] - xh[k] * c1 - c2) * rstd;
      if (dor) {
        float r[8];
        load_chunk8_or_f32<TX>(dor, dres_out_f32, i, D, vec, r);
#pragma unroll
        for (int k = 0; k < 8; ++k) ds[k] += r[k];
      }
      store_chunk8(dx + base, i, D, vec, ds);
      if (dres) store_chunk8_or_f32<TX>(advance<TX>(dres, dres_f32, base), dres_f32, i, D, vec, ds);
    };

    if constexpr (NV > 0) {
      float xh[NV][8], g[NV][8];
      float sum = 0.f, sq = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (live && c < nchunks) {
          load_s(c, xh[j]);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) xh[j][k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          sum += xh[j][k];
          sq += xh[j][k] * xh[j][k];
        }
      }
      float mean = 0.f;
      if (RMS) {
        sq = row_sum(sq, red);
      } else {
        mean = row_sum(sum, red) * inv_d;
        sq = 0.f;
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int c = threadIdx.x + j * tpr;
          if (c < nchunks) {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              const float t = ((i64)c * 8 + k < D) ? xh[j][k] - mean : 0.f;
              sq += t * t;
            }
          }
        }
        sq = row_sum(sq, red);
      }
      const float rstd = rsqrtf(sq * inv_d + eps);
      float gx = 0.f, gs = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (live && c < nchunks) {
          float d[8];
          load_g(c, d, g[j]);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            xh[j][k] = ((i64)c * 8 + k < D) ? (xh[j][k] - mean) * rstd : 0.f;
            gx += g[j][k] * xh[j][k];
            gs += g[j][k];
            dwacc[j][k] += d[k] * xh[j][k];
            dbacc[j][k] += d[k];
          }
        }
      }
      row_sum2(gx, gs, red);
      const float c1 = gx * inv_d, c2 = RMS ? 0.f : gs * inv_d;
      if (live) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int c = threadIdx.x + j * tpr;
          if (c < nchunks) store_ds(c, xh[j], g[j], c1, c2, rstd);
        }
      }
    } else {
      float v[8], d[8], g[8];
      float sum = 0.f, sq = 0.f;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_s(c, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          sum += v[k];
          sq += v[k] * v[k];
        }
      }
      float mean = 0.f;
      if (RMS) {
        sq = row_sum(sq, red);
      } else {
        mean = row_sum(sum, red) * inv_d;
        sq = 0.f;
        for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
          load_s(c, v);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float t = ((i64)c * 8 + k < D) ? v[k] - mean : 0.f;
            sq += t * t;
          }
        }
        sq = row_sum(sq, red);
      }
      const float rstd = rsqrtf(sq * inv_d + eps);
      float gx = 0.f, gs = 0.f;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_s(c, v);
        load_g(c, d, g);
        float* dwp = dw_part + slot * D + (i64)c * 8;
        float* dbp = db_part ? db_part + slot * D + (i64)c * 8 : nullptr;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          if ((i64)c * 8 + k < D) {
            const float xhat = (v[k] - mean) * rstd;
            gx += g[k] * xhat;
            gs += g[k];
            dwp[k] += d[k] * xhat;  // this slot owns the partial row: no race
            if (dbp) dbp[k] += d[k];
          }
        }
      }
      row_sum2(gx, gs, red);
      const float c1 = gx * inv_d, c2 = RMS ? 0.f : gs * inv_d;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_s(c, v);
        load_g(c, d, g);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (v[k] - mean) * rstd;
        store_ds(c, v, g, c1, c2, rstd);
      }
    }
  }
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      if (c < nchunks) {
        store_chunk8(dw_part + slot * D, (i64)c * 8, D, vec, dwacc[j]);
        if (db_part) store_chunk8(db_part + slot * D, (i64)c * 8, D, vec, dbacc[j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gated RMSNorm forward, statistics per group of G channels (rows = M * ngroups):
//   norm_before_gate: y = v * rstd(v) * w * silu(z) with v = x;   else: v = x * silu(z), y = v * rstd(v) * w.
template <typename TX, int NV>
__global__ void __launch_bounds__(512) gated_fwd(const TX* __restrict__ x, i64 x_rs, const void* __restrict__ z,
                                                 int z_f32, i64 z_rs, const float* __restrict__ weight,
                                                 TX* __restrict__ y, i64 rows, int G, int ngroups, float eps, int vec,
                                                 int norm_before_gate) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const bool live = row < rows;
  const i64 base = live ? row * G : 0;
  // 32-bit division (rows < 2**31, checked by the launcher): 64-bit division is a slow subroutine.
  const unsigned m = live ? (unsigned)row / (unsigned)ngroups : 0u, g = live ? (unsigned)row - m * (unsigned)ngroups : 0u;
  const float* wr = weight + (i64)g * G;
  const int nchunks = (G + 7) / 8;
  // x and z rows through their row strides (x_rs, z_rs: elements between consecutive (..., D) rows);
  // y is contiguous.
  const TX* xr = x + (i64)m * x_rs + (i64)g * G;
  const void* zr = z ? advance<TX>(z, z_f32, (i64)m * z_rs + (i64)g * G) : nullptr;

  // v (the normalised values) and gate (silu(z), 1 without z) of chunk c.
  auto load_v = [&](int c, float (&v)[8], float (&gate)[8]) {
    const i64 i = (i64)c * 8;
    load_chunk8(xr, i, G, vec, v);
    if (zr) {
      load_chunk8_or_f32<TX>(zr, z_f32, i, G, vec, gate);
#pragma unroll
      for (int k = 0; k < 8; ++k) gate[k] = silu_f(gate[k]);
      if (!norm_before_gate) {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] *= gate[k];
      }
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) gate[k] = 1.f;
    }
  };
  auto store_y = [&](int c, const float (&v)[8], const float (&gate)[8], float rstd) {
    const i64 i = (i64)c * 8;
    float w[8], o[8];
    load_chunk8(wr, i, G, vec, w);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = v[k] * rstd * w[k] * (norm_before_gate ? gate[k] : 1.f);
    store_chunk8(y + base, i, G, vec, o);
  };

  float sq = 0.f;
  if constexpr (NV > 0) {
    float v[NV][8], gate[NV][8];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      if (live && c < nchunks) {
        load_v(c, v[j], gate[j]);
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) v[j][k] = gate[j][k] = 0.f;
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) sq += v[j][k] * v[j][k];
    }
    const float rstd = rsqrtf(row_sum(sq, red) / G + eps);
    if (live) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (c < nchunks) store_y(c, v[j], gate[j], rstd);
      }
    }
  } else {
    float v[8], gate[8];
    for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
      load_v(c, v, gate);
#pragma unroll
      for (int k = 0; k < 8; ++k) sq += v[k] * v[k];
    }
    const float rstd = rsqrtf(row_sum(sq, red) / G + eps);
    for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
      load_v(c, v, gate);
      store_y(c, v, gate, rstd);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gated RMSNorm backward. vhat = v * rstd; dvhat = dy * w (* gate when norm_before_gate);
// dv = rstd * (dvhat - vhat * mean(dvhat * vhat)).
//   norm_before_gate: dx = dv, dz = dy * vhat * w * silu'(z), dweight += dy * vhat * gate
//   else:             dx = dv * gate, dz = dv * x * silu'(z), dweight += dy * vhat
// Row slots as in norm_bwd; slots is a multiple of ngroups, so a slot always sees one group and
// its partial row is dw_part[slot / ngroups, group * G .. group * G + G).
template <typename TX, int NV>
__global__ void __launch_bounds__(512) gated_bwd(const void* __restrict__ dy, int dy_f32, i64 dy_rs,
                                                 const TX* __restrict__ x, i64 x_rs,
                                                 const void* __restrict__ z, int z_f32, i64 z_rs,
                                                 const float* __restrict__ weight, TX* __restrict__ dx,
                                                 void* __restrict__ dz, float* __restrict__ dw_part, i64 rows, int G,
                                                 int ngroups, float eps, int vec, int norm_before_gate) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const int nchunks = (G + 7) / 8;
  const i64 slots = (i64)gridDim.x * blockDim.y;
  const i64 slot = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const i64 D = (i64)G * ngroups;
  const int group = (int)((unsigned)slot % (unsigned)ngroups);  // 32-bit: slots < 2**31
  const float* wr = weight + (i64)group * G;
  float* dwr = dw_part + (i64)((unsigned)slot / (unsigned)ngroups) * D + (i64)group * G;
  constexpr int NA = NV > 0 ? NV : 1;
  float dwacc[NA][8];
#pragma unroll
  for (int j = 0; j < NA; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k) dwacc[j][k] = 0.f;

  for (i64 first = (i64)blockIdx.x * blockDim.y; first < rows; first += slots) {
    const i64 row = first + threadIdx.y;
    const bool live = row < rows;
    const i64 base = live ? row * G : 0;  // dx, dz: contiguous
    // dy, x, z through their row strides (elements between consecutive (..., D) rows).
    const unsigned m = live ? (unsigned)row / (unsigned)ngroups : 0u;
    const i64 gofs = live ? (i64)((unsigned)row - m * (unsigned)ngroups) * G : 0;
    const TX* xr = x + (i64)m * x_rs + gofs;
    const void* zr = z ? advance<TX>(z, z_f32, (i64)m * z_rs + gofs) : nullptr;
    const void* dyr = advance<TX>(dy, dy_f32, (i64)m * dy_rs + gofs);

    auto load_v = [&](int c, float (&v)[8], float (&xv)[8], float (&gate)[8], float (&dgate)[8]) {
      const i64 i = (i64)c * 8;
      load_chunk8(xr, i, G, vec, xv);
      if (zr) {
        float zv[8];
        load_chunk8_or_f32<TX>(zr, z_f32, i, G, vec, zv);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          gate[k] = silu_f(zv[k]);
          dgate[k] = silu_grad_f(zv[k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          gate[k] = 1.f;
          dgate[k] = 0.f;
        }
      }
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] = norm_before_gate ? xv[k] : xv[k] * gate[k];
    };
    // Chunk c's share of sum(dvhat * vhat) (vhat given); adds its dweight terms to dw.
    auto grads = [&](int c, const float (&vhat)[8], const float (&gate)[8], float (&dw)[8]) {
      const i64 i = (i64)c * 8;
      float d[8], w[8];
      load_chunk8_or_f32<TX>(dyr, dy_f32, i, G, vec, d);
      load_chunk8(wr, i, G, vec, w);
      float gx = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float gk = norm_before_gate ? gate[k] : 1.f;
        gx += d[k] * w[k] * gk * vhat[k];
        dw[k] += d[k] * vhat[k] * gk;
      }
      return gx;
    };
    // dx and dz of chunk c; dvhat is recomputed from dy (an L1/L2 hit) rather than kept in registers.
    auto store_grads = [&](int c, const float (&vhat)[8], float c1, float rstd) {
      const i64 i = (i64)c * 8;
      float v[8], xv[8], gate[8], dgate[8], d[8], w[8], o[8], oz[8];
      load_v(c, v, xv, gate, dgate);
      load_chunk8_or_f32<TX>(dyr, dy_f32, i, G, vec, d);
      load_chunk8(wr, i, G, vec, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float dvhat = d[k] * w[k] * (norm_before_gate ? gate[k] : 1.f);
        const float dv = (dvhat - vhat[k] * c1) * rstd;
        o[k] = norm_before_gate ? dv : dv * gate[k];
        oz[k] = norm_before_gate ? d[k] * vhat[k] * w[k] * dgate[k] : dv * xv[k] * dgate[k];
      }
      store_chunk8(dx + base, i, G, vec, o);
      if (zr) store_chunk8_or_f32<TX>(advance<TX>(dz, z_f32, base), z_f32, i, G, vec, oz);
    };

    if constexpr (NV > 0) {
      float vh[NV][8];
      float sq = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        if (live && c < nchunks) {
          float xv[8], gate[8], dgate[8];
          load_v(c, vh[j], xv, gate, dgate);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) vh[j][k] = 0.f;
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) sq += vh[j][k] * vh[j][k];
      }
      const float rstd = rsqrtf(row_sum(sq, red) / G + eps);
      float gx = 0.f;
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
#pragma unroll
        for (int k = 0; k < 8; ++k) vh[j][k] *= rstd;
        if (live && c < nchunks) {
          float v[8], xv[8], gate[8], dgate[8];
          load_v(c, v, xv, gate, dgate);
          gx += grads(c, vh[j], gate, dwacc[j]);
        }
      }
      const float c1 = row_sum(gx, red) / G;
      if (live) {
#pragma unroll
        for (int j = 0; j < NV; ++j) {
          const int c = threadIdx.x + j * tpr;
          if (c < nchunks) store_grads(c, vh[j], c1, rstd);
        }
      }
    } else {
      float v[8], xv[8], gate[8], dgate[8];
      float sq = 0.f;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_v(c, v, xv, gate, dgate);
#pragma unroll
        for (int k = 0; k < 8; ++k) sq += v[k] * v[k];
      }
      const float rstd = rsqrtf(row_sum(sq, red) / G + eps);
      float gx = 0.f;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        float dw[8];
        load_v(c, v, xv, gate, dgate);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          v[k] *= rstd;
          dw[k] = 0.f;
        }
        gx += grads(c, v, gate, dw);
#pragma unroll
        for (int k = 0; k < 8; ++k)
          if ((i64)c * 8 + k < G) dwr[(i64)c * 8 + k] += dw[k];  // this slot owns the partial row
      }
      const float c1 = row_sum(gx, red) / G;
      for (int c = threadIdx.x; live && c < nchunks; c += tpr) {
        load_v(c, v, xv, gate, dgate);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] *= rstd;
        store_grads(c, v, c1, rstd);
      }
    }
  }
  if constexpr (NV > 0) {
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      if (c < nchunks) store_chunk8(dwr, (i64)c * 8, G, vec, dwacc[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Gated RMSNorm v2 (SSMCORE_GATED_NORM=v2, the default; v1 = gated_fwd / gated_bwd above, kept for
// side-by-side timing). Same row layout and the same results up to rounding; norm_before_gate is a
// template flag (NBG) and:
//   - every load of a row (x, z, dy) is issued before the first use and held in registers until the
//     row's outputs are stored: one exposed memory round trip per row, no second read from L1/L2;
//   - the backward does one reduction per row: sum(v^2) and sum(dvhat * v) together (dvhat does not
//     depend on rstd), then dv = rstd * dvhat - v * rstd^3 * sum(dvhat * v) / G (v1: two reductions,
//     dy loaded only after the first);
//   - sigmoid(z) = 1 / (1 + e^-z) with an approximate division (__fdividef), no IEEE division.
// The forward is otherwise v1's (NV = 1, 2, 4; one block row per group row); the backward's layout and
// register budget are described at gated_bwd2.
namespace {

// sigmoid(z) for the gates: 0 where e^-z overflows (z < -88), like the limit.
__device__ __forceinline__ float sigmoid_fast(float z) { return __fdividef(1.f, 1.f + __expf(-z)); }

}  // namespace

template <typename TX, int NV, bool NBG>
__global__ void __launch_bounds__(512) gated_fwd2(const TX* __restrict__ x, i64 x_rs, const void* __restrict__ z,
                                                  int z_f32, i64 z_rs, const float* __restrict__ weight,
                                                  TX* __restrict__ y, i64 rows, int G, int ngroups, float eps,
                                                  int vec) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const i64 row = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const bool live = row < rows;
  const unsigned m = live ? (unsigned)row / (unsigned)ngroups : 0u;
  const i64 gofs = live ? (i64)((unsigned)row - m * (unsigned)ngroups) * G : 0;
  const TX* xr = x + (i64)m * x_rs + gofs;
  const void* zr = z ? advance<TX>(z, z_f32, (i64)m * z_rs + gofs) : nullptr;
  const int nchunks = (G + 7) / 8;
  float v[NV][8], gate[NV][8];
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int c = threadIdx.x + j * tpr;
    const bool on = live && c < nchunks;
    if (on) {
      load_chunk8(xr, (i64)c * 8, G, vec, v[j]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[j][k] = 0.f;
    }
    if (on && zr) {
      load_chunk8_or_f32<TX>(zr, z_f32, (i64)c * 8, G, vec, gate[j]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) gate[j][k] = 1.f;
    }
  }
  float sq = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j)
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (zr) gate[j][k] *= sigmoid_fast(gate[j][k]);  // silu(z)
      if (!NBG) v[j][k] *= gate[j][k];
      sq += v[j][k] * v[j][k];
    }
  const float rstd = rsqrtf(row_sum(sq, red) / G + eps);
  if (!live) return;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int c = threadIdx.x + j * tpr;
    if (c < nchunks) {
      float w[8], o[8];
      load_chunk8(weight + gofs, (i64)c * 8, G, vec, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) o[k] = v[j][k] * rstd * w[k] * (NBG ? gate[j][k] : 1.f);
      store_chunk8(y + row * G, (i64)c * 8, G, vec, o);
    }
  }
}

// Backward, per element (gate = silu(z), dgate = silu'(z); 1 and 0 without z; vhat = v * rstd):
//   NBG:  v = x,        dvhat = dy * w * gate, dx = dv,        dz = dy * vhat * w * dgate, dweight += dy * vhat * gate
//   else: v = x * gate, dvhat = dy * w,        dx = dv * gate, dz = dv * x * dgate,        dweight += dy * vhat
// with dv = rstd * (dvhat - vhat * mean(dvhat * vhat)). Row slots and partial rows as in gated_bwd.
// TS: the type of dy and z (TX, or float when the launcher has float32 streams). Layout: NV = 1
// (64 registers, blocks up to 512 threads) or NV = 2 (16-bit x only; 80 registers and blocks up to 384
// threads, 96 and 320 with float32 streams); bf16 at G = 2048: NV 2, 128 threads per group, 2 groups per block, 3 blocks = 6 groups
// in flight per SM (v1: NV 1, 256 threads, 90 registers, 2 groups). Registers per group in flight
// are what bounds this kernel's bandwidth, hence:
//   - x, z and dy are held across the reduction as loaded (8 16-bit values = 4 registers per chunk
//     and stream) and unpacked again after it; after the reduction the packed words go through an
//     empty asm statement, so the compiler recomputes the unpacked values and gates instead of
//     keeping the first pass's copies live (CUDA only; else a no-op);
//   - a slot's running dweight sums live in dynamic shared memory (blockDim.y * NV * blockDim.x
//     * 32 bytes), not in registers; each thread touches only its own entries (no barrier).
namespace {

template <typename T>
struct Packed8 {
  uint4 u[sizeof(T) / 2];  // 8 elements of T
};

// Elements [i, i + 8) of p[0 .. n) as stored (out-of-row elements 0); vec as in load_chunk8.
template <typename T>
__device__ __forceinline__ void load_packed8(const T* p, i64 i, i64 n, bool vec, Packed8<T>& r) {
  if (vec && i + 8 <= n) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int h = 0; h < 8 / PER; ++h) r.u[h] = *reinterpret_cast<const uint4*>(p + i + h * PER);
  } else {
    T* e = reinterpret_cast<T*>(r.u);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      if (i + k < n)
        e[k] = p[i + k];
      else
        store_f(e + k, 0.f);
    }
  }
}

template <typename T>
__device__ __forceinline__ float unpack(const Packed8<T>& r, int k) {
  return load_f(reinterpret_cast<const T*>(r.u) + k);
}

template <typename T>
__device__ __forceinline__ void opaque(Packed8<T>& r) {
#if !SSM_HIP && !defined(SSM_EMULATION)
#pragma unroll
  for (int h = 0; h < (int)(sizeof(T) / 2); ++h)
    asm volatile("" : "+r"(r.u[h].x), "+r"(r.u[h].y), "+r"(r.u[h].z), "+r"(r.u[h].w));
#endif
}

}  // namespace

template <typename TX, typename TS, int NV, bool NBG>
__global__ void __launch_bounds__(NV == 1 ? 512 : sizeof(TS) == 2 ? 384 : 320, 2)
    gated_bwd2(const TS* __restrict__ dy, i64 dy_rs, const TX* __restrict__ x, i64 x_rs, const TS* __restrict__ z,
               i64 z_rs, const float* __restrict__ weight, TX* __restrict__ dx, TS* __restrict__ dz,
               float* __restrict__ dw_part, i64 rows, int G, int ngroups, float eps, int vec) {
  __shared__ float red[64];
  const int tpr = blockDim.x;
  const int nchunks = (G + 7) / 8;
  const i64 slots = (i64)gridDim.x * blockDim.y;
  const i64 slot = (i64)blockIdx.x * blockDim.y + threadIdx.y;
  const i64 D = (i64)G * ngroups;
  const int group = (int)((unsigned)slot % (unsigned)ngroups);  // 32-bit: slots < 2**31
  const float* wr = weight + (i64)group * G;
  const float inv_g = 1.f / G;
  const bool has_z = z != nullptr;
  // The slot's dweight sums in shared memory (registers go to the row in flight): float4 (j * 2 + h) of
  // thread x holds elements 4h .. 4h + 3 of its chunk j, at acc[(j * 2 + h) * tpr] (conflict-free).
  SSM_DYNAMIC_SMEM(dyn);
  float4* acc = reinterpret_cast<float4*>(dyn) + (i64)threadIdx.y * NV * 2 * tpr + threadIdx.x;
#pragma unroll
  for (int h = 0; h < NV * 2; ++h) acc[h * tpr] = make_float4(0.f, 0.f, 0.f, 0.f);

  for (i64 first = (i64)blockIdx.x * blockDim.y; first < rows; first += slots) {
    const i64 row = first + threadIdx.y;
    const bool live = row < rows;
    const unsigned m = live ? (unsigned)row / (unsigned)ngroups : 0u;
    const i64 gofs = live ? (i64)((unsigned)row - m * (unsigned)ngroups) * G : 0;
    const TX* xr = x + (i64)m * x_rs + gofs;
    const TS* zr = z + (has_z ? (i64)m * z_rs + gofs : 0);
    const TS* dyr = dy + (i64)m * dy_rs + gofs;
    // All of the row's loads first (dead rows and chunks past the row hold zeros).
    Packed8<TX> px[NV];
    Packed8<TS> pz[NV], pd[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      const i64 n = (live && c < nchunks) ? G : 0;
      load_packed8(xr, (i64)c * 8, n, vec, px[j]);
      load_packed8(dyr, (i64)c * 8, n, vec, pd[j]);
      load_packed8(zr, (i64)c * 8, has_z ? n : 0, vec, pz[j]);
    }
    // sum(v^2) and sum(dvhat * v) in one reduction.
    float sq = 0.f, gv = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int c = threadIdx.x + j * tpr;
      float w[8];
      load_chunk8(wr, (i64)c * 8, (live && c < nchunks) ? G : 0, vec, w);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float zk = unpack(pz[j], k);
        const float gate = has_z ? zk * sigmoid_fast(zk) : 1.f;
        const float v = NBG ? unpack(px[j], k) : unpack(px[j], k) * gate;
        const float dvhat = unpack(pd[j], k) * w[k] * (NBG ? gate : 1.f);
        sq += v * v;
        gv += dvhat * v;
      }
    }
    row_sum2(sq, gv, red);
    const float rstd = rsqrtf(sq * inv_g + eps);
    const float b = rstd * rstd * rstd * gv * inv_g;  // dv = rstd * dvhat - b * v
    if (live) {
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int c = threadIdx.x + j * tpr;
        opaque(px[j]);
        opaque(pz[j]);
        opaque(pd[j]);
        if (c < nchunks) {
          float w[8], o[8], oz[8], dw[8];
          load_chunk8(wr, (i64)c * 8, G, vec, w);  // an L1 hit
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            float gate = 1.f, dgate = 0.f;
            if (has_z) {
              const float zk = unpack(pz[j], k);
              const float s = sigmoid_fast(zk);
              gate = zk * s;
              dgate = s * (1.f + zk * (1.f - s));
            }
            const float xk = unpack(px[j], k), dk = unpack(pd[j], k);
            const float v = NBG ? xk : xk * gate;
            const float vhat = v * rstd;
            const float dvhat = dk * w[k] * (NBG ? gate : 1.f);
            const float dv = rstd * dvhat - b * v;
            if (NBG) {
              o[k] = dv;
              oz[k] = dk * vhat * w[k] * dgate;
              dw[k] = dk * vhat * gate;
            } else {
              o[k] = dv * gate;
              oz[k] = dv * xk * dgate;
              dw[k] = dk * vhat;
            }
          }
          store_chunk8(dx + row * G, (i64)c * 8, G, vec, o);
          if (has_z) store_chunk8(dz + row * G, (i64)c * 8, G, vec, oz);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            float4 a = acc[(j * 2 + h) * tpr];
            a.x += dw[4 * h];
            a.y += dw[4 * h + 1];
            a.z += dw[4 * h + 2];
            a.w += dw[4 * h + 3];
            acc[(j * 2 + h) * tpr] = a;
          }
        }
      }
    }
  }
  float* dwr = dw_part + (i64)((unsigned)slot / (unsigned)ngroups) * D + (i64)group * G;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int c = threadIdx.x + j * tpr;
    if (c < nchunks) {
      const float4 a0 = acc[j * 2 * tpr], a1 = acc[(j * 2 + 1) * tpr];
      const float dw[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      store_chunk8(dwr, (i64)c * 8, G, vec, dw);
    }
  }
}
