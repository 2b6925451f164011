// SSD (Mamba-2) backward on the GPU: the chunked form, chunk matrix products on tensor cores (mma.sync).
//
// Notation per (batch b, head h), chunk c of Q positions t0 .. t_end (the last chunk may be short):
//   d_t   = dt' (softplus / clamp applied), a_t = d_t * A_h, cs_t = sum_{k = t0 .. t} a_k (chunk-local);
//   seg_t = number of sequence starts at or before t (monotone even if seq_idx is not), so "same
//           sequence" is seg_s == seg_t; seg_prev = seg_{t0 - 1} (0 for chunk 0: initial_states feed seg 0);
//   w_t   = [seg_t == seg_prev] (t still sees the chunk-start state), v_s = [seg_s == seg_{t_end}]
//           (s feeds the chunk-end state), u_c = w_{t_end};
//   M[t,s] = (C_t . B_s) exp(cs_t - cs_s) [s <= t, seg_s == seg_t]   (CB[t,s] = C_t . B_s, per group);
//   h0_c  = state before chunk c (P x N), h_end_c = u exp(cs_end) h0 + sum_s v_s exp(cs_end - cs_s) d_s x_s B_s^T;
//   y_t   = sum_s M[t,s] d_s x_s + w_t exp(cs_t) h0 C_t + D x_t ;  dy = dout * silu(z).
// Backward: dh_c (gradient of h_end_c) by a reverse pass over chunks, dh_{c-1} = Gl_c + u_c exp(cs_end) dh_c
// with Gl_c = sum_t w_t exp(cs_t) dy_t C_t^T; then per position dx, dB, dC, the direct d(d_t) and
// d(cs_t) terms; d(a_k) = sum_{t >= k} d(cs_t) (a reverse cumsum per chunk) gives ddt and dA.
//
// Pipeline (launcher: state_space_duality_bwd.py). Work buffers are float32; nothing is saved from the
// forward. No atomics: every output element has one writer, and sums over batch / chunks / the heads of
// a group are taken afterwards from partial buffers, so results are deterministic.
//   ssdb_cumsum      (b, h, c)       d, slope = d d_t / d raw (0 where clamped), cs
//   ssdb_dy          (b, l, h, p)    dy = dout * silu(z) in fp32
//   ssdb_mm<T, KIND> tensor cores:   CB, DX (Q x Q per chunk), chunk states S and Gl (P x N), hC = h0 C_t,
//                                    dhB = dh B_t, dx, dz (y recomputed), dC, dB per head (table below)
//   ssdb_pass        (b, h, p, n)    forward state passing (S -> h0 in place), reverse (Gl -> dh), dinitial
//   ssdb_dcs<T>      (b, h, l)       d(cs_t), the direct d(d_t) and the state term E_t (SIMT, reads CB, DX)
//   ssdb_dt          (b, h, c)       reverse cumsum -> ddt, partial dA / ddt_bias per (b, c, h)
// The plain SIMT kernels ssdb_cb / ssdb_dx_dot / ssdb_states / ssdb_dx / ssdb_dbc (one thread per output
// element, loops over the reduction axis) compute the same products; they are the launcher's fallback
// (USE_TENSOR_CORES = False) and the reference the tests hold the tensor-core path to.
// Traffic (B8 L4096 H64 P64 N128, Q 256): DX is B*nc*H*Q*Q fp32 = 2 GiB (its lower-triangle tiles, 1.3 GiB,
// with SSMCORE_SSD_BWD_IMPL=v2) written once and read by dc, db and dcs; CB is per group (33 MB). Not yet
// fused: each product re-reads its operands from global memory (L2), and the Q x Q matrices go through HBM.
// v2 (default) vs v1 (SSMCORE_SSD_BWD_IMPL=v1, the previous kernels): ssdb_mm fills every operand tile
// along the operand's contiguous global axis (v1 read x, dy, CB, DX, h0, dh transposed: one 32-byte sector
// per element), skips DX's upper tiles, ssdb_dcs2 (a block per chunk, coalesced rows) replaces ssdb_dcs (a
// thread per position walking a row of CB and DX each), and ssdb_fro (a block per chunk) replaces
// ssdb_dt's serial P*N loop for <dh_c, h0_c>.
// v4 (default for 16-bit inputs; section at the end of this file): F per group instead of DX per head,
// dB / dC per group, the products on a bf16/f16 shared-memory GEMM core (ssdb_g4, ssdb_h4).
// ssdb_tp6 (last section; under v4 without z): ssdb_h4<T, 6> and <T, 7> in one launch, the group's heads looped
// inside a block over once-staged head-independent operand panels.
// Session 7: ssdb_dx7 / ssdb_st7 / ssdb_tp7 (default under v4) and ssdb_g7 / ssdb_g7b (SSMCORE_SSD_BWD_G7=1) are the
// cp.async / ldmatrix-pipelined forms of ssdb_h4<T, 3>, <T, 4 / 5>, ssdb_tp6 and ssdb_g4<T, 0>, <T, 1 / 2> (sections
// at the end of this file).
// v3 = v2 with ssdb_mm3 (products), ssdb_pass2 (state passing) and ssdb_dcs3: the same math and
// summation order (bitwise equal to v2), global loads issued together and overlapped with the mma work (the
// v3 section at the end of this file says how).
#include "common.cuh"

__device__ __forceinline__ i64 gtid() { return (i64)blockIdx.x * blockDim.x + threadIdx.x; }

// d, slope, cs: (B, H, L) fp32. dt (B, L, H) fp32, A and dt_bias (H,) fp32.
extern "C" __global__ void ssdb_cumsum(const float* __restrict__ dt, const float* __restrict__ A,
                                       const float* __restrict__ dt_bias, int softplus, int clamp, float lo, float hi,
                                       float* __restrict__ d, float* __restrict__ slope, float* __restrict__ cs,
                                       int batch, i64 L, int H, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * H * nc) return;
  const int c = (int)(i % nc);
  const int h = (int)((i / nc) % H);
  const i64 b = i / ((i64)nc * H);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const float a = A[h], bias = dt_bias[h];
  float acc = 0.f;
  for (i64 t = t0; t < t1; ++t) {
    const float raw = dt[(b * L + t) * H + h] + bias;
    float v = raw, sl = 1.f;
    if (softplus && raw <= 20.f) {
      v = log1pf(expf(raw));
      sl = 1.f / (1.f + expf(-raw));
    }
    if (clamp && (v < lo || v > hi)) {
      v = v < lo ? lo : hi;
      sl = 0.f;
    }
    acc += v * a;
    const i64 o = (b * H + h) * L + t;
    d[o] = v;
    slope[o] = sl;
    cs[o] = acc;
  }
}

// ssdb_cumsum (same outputs) with a block of SSDB_CS4_THREADS (>= Q) threads per (b, c, h): one position per
// thread, the chunk's cumsum of d * A as a shared-memory scan (v3: a thread per chunk walked Q positions).
constexpr int SSDB_CS4_THREADS = 256;
extern "C" __global__ void __launch_bounds__(256) ssdb_cumsum4(
    const float* __restrict__ dt, const float* __restrict__ A, const float* __restrict__ dt_bias, int softplus,
    int clamp, float lo, float hi, float* __restrict__ d, float* __restrict__ slope, float* __restrict__ cs, int batch,
    i64 L, int H, int Q, int nc) {
  __shared__ float buf[2][SSDB_CS4_THREADS];
  const i64 blk = blockIdx.x;  // (b, c, h)
  const int h = (int)(blk % H), c = (int)((blk / H) % nc);
  const i64 b = blk / ((i64)H * nc);
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0), t = threadIdx.x;
  float v = 0.f, sl = 1.f;
  if (t < len) {
    const float raw = dt[(b * L + t0 + t) * H + h] + dt_bias[h];
    v = raw;
    if (softplus && raw <= 20.f) {
      v = log1pf(expf(raw));
      sl = 1.f / (1.f + expf(-raw));
    }
    if (clamp && (v < lo || v > hi)) {
      v = v < lo ? lo : hi;
      sl = 0.f;
    }
  }
  buf[0][t] = t < len ? v * A[h] : 0.f;
  __syncthreads();
  int cur = 0;
  for (int off = 1; off < len; off *= 2) {  // Hillis-Steele inclusive scan
    const float a = buf[cur][t] + (t >= off ? buf[cur][t - off] : 0.f);
    buf[cur ^ 1][t] = a;
    cur ^= 1;
    __syncthreads();
  }
  if (t < len) {
    const i64 o = (b * H + h) * L + t0 + t;
    d[o] = v;
    slope[o] = sl;
    cs[o] = buf[cur][t];
  }
}

// dy = dout * silu(z) (or dout), fp32, (B, L, H, P).
template <typename T>
__global__ void ssdb_dy(const T* __restrict__ dout, const T* __restrict__ z, float* __restrict__ dy, i64 n) {
  const i64 i = gtid();
  if (i >= n) return;
  float g = load_f(dout + i);
  if (z != nullptr) g *= silu_f(load_f(z + i));
  dy[i] = g;
}

// ssdb_dy with 8 consecutive elements per thread (16-byte accesses when vec: n % 8 == 0, aligned rows).
template <typename T>
__global__ void ssdb_dy8(const T* __restrict__ dout, const T* __restrict__ z, float* __restrict__ dy, i64 n,
                         int vec) {
  const i64 i = gtid() * 8;
  if (i >= n) return;
  float g[8];
  load_chunk8(dout, i, n, vec != 0, g);
  if (z != nullptr) {
    float zz[8];
    load_chunk8(z, i, n, vec != 0, zz);
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] *= silu_f(zz[k]);
  }
  store_chunk8(dy, i, n, vec != 0, g);
}

// CB[b, c, g, t, s] = C_t . B_s for s <= t (0 above the diagonal and past the end). (B, nc, G, Q, Q).
template <typename T>
__global__ void ssdb_cb(const T* __restrict__ Bm, const T* __restrict__ Cm, float* __restrict__ cb, int batch,
                        i64 L, int G, int N, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * nc * G * Q * Q) return;
  const int s = (int)(i % Q), t = (int)((i / Q) % Q);
  const i64 r = i / ((i64)Q * Q);  // (b, c, g)
  const int g = (int)(r % G), c = (int)((r / G) % nc);
  const i64 b = r / ((i64)G * nc);
  const i64 ts = (i64)c * Q + t, ss = (i64)c * Q + s;
  float acc = 0.f;
  if (s <= t && ts < L) {
    const T* cp = Cm + ((b * L + ts) * G + g) * N;
    const T* bp = Bm + ((b * L + ss) * G + g) * N;
    for (int n = 0; n < N; ++n) acc += load_f(cp + n) * load_f(bp + n);
  }
  cb[i] = acc;
}

// DX[b, c, h, t, s] = dy_t . x_s over p (all t, s of the chunk; 0 past the end). (B, nc, H, Q, Q).
template <typename T>
__global__ void ssdb_dx_dot(const float* __restrict__ dy, const T* __restrict__ x, float* __restrict__ dxd,
                            int batch, i64 L, int H, int P, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * nc * H * Q * Q) return;
  const int s = (int)(i % Q), t = (int)((i / Q) % Q);
  const i64 r = i / ((i64)Q * Q);  // (b, c, h)
  const int h = (int)(r % H), c = (int)((r / H) % nc);
  const i64 b = r / ((i64)H * nc);
  const i64 ts = (i64)c * Q + t, ss = (i64)c * Q + s;
  float acc = 0.f;
  if (ts < L && ss < L) {
    const float* yp = dy + ((b * L + ts) * H + h) * P;
    const T* xp = x + ((b * L + ss) * H + h) * P;
    for (int p = 0; p < P; ++p) acc += yp[p] * load_f(xp + p);
  }
  dxd[i] = acc;
}

// kind 0: S_c[p, n] = sum_s v_s exp(cs_end - cs_s) d_s x_s[p] B_s[n]   (chunk states; V = x, W = B)
// kind 1: Gl_c[p, n] = sum_t w_t exp(cs_t) dy_t[p] C_t[n]              (V = dy fp32, W = C)
// out (B, nc, H, P, N) fp32.
template <typename T>
__global__ void ssdb_states(int kind, const T* __restrict__ x, const float* __restrict__ dy,
                            const T* __restrict__ W, const float* __restrict__ d, const float* __restrict__ cs,
                            const int* __restrict__ seg, float* __restrict__ out, int batch, i64 L, int H, int G,
                            int P, int N, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * nc * H * P * N) return;
  const int n = (int)(i % N), p = (int)((i / N) % P);
  const i64 r = i / ((i64)N * P);
  const int h = (int)(r % H), c = (int)((r / H) % nc);
  const i64 b = r / ((i64)H * nc);
  const int g = h / (H / G);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const i64 hrow = (b * H + h) * L;
  const int seg_end = seg[b * L + t1 - 1], seg_prev = t0 > 0 ? seg[b * L + t0 - 1] : 0;
  const float cs_end = cs[hrow + t1 - 1];
  float acc = 0.f;
  for (i64 t = t0; t < t1; ++t) {
    const int sg = seg[b * L + t];
    const i64 xo = ((b * L + t) * H + h) * P + p;
    const float w = load_f(W + ((b * L + t) * G + g) * N + n);
    if (kind == 0) {
      if (sg == seg_end) acc += expf(cs_end - cs[hrow + t]) * d[hrow + t] * load_f(x + xo) * w;
    } else {
      if (sg == seg_prev) acc += expf(cs[hrow + t]) * dy[xo] * w;
    }
  }
  out[i] = acc;
}

// Sequential over chunks per (b, h, p, n). reverse = 0: buf holds S_c, becomes h0_c (state before chunk c),
// init = initial_states (fp32) or null. reverse = 1: buf holds Gl_c, becomes dh_c (gradient of the state at the
// end of chunk c), init = dfinal_states or null; dinit (fp32) gets the gradient of the initial state (or null).
extern "C" __global__ void ssdb_pass(int reverse, float* __restrict__ buf, const float* __restrict__ init,
                                     float* __restrict__ dinit, const float* __restrict__ cs,
                                     const int* __restrict__ seg, int batch, i64 L, int H, int PN, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * H * PN) return;
  const int e = (int)(i % PN);
  const i64 bh = i / PN;
  const int h = (int)(bh % H);
  const i64 b = bh / H;
  float carry = init != nullptr ? init[i] : 0.f;
  for (int k = 0; k < nc; ++k) {
    const int c = reverse ? nc - 1 - k : k;
    const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
    const bool u = seg[b * L + t1 - 1] == (t0 > 0 ? seg[b * L + t0 - 1] : 0);
    const float decay = u ? expf(cs[bh * L + t1 - 1]) : 0.f;
    const i64 o = (((b * nc + c) * H + h) * (i64)PN) + e;
    const float v = buf[o];
    buf[o] = carry;
    carry = decay * carry + v;
  }
  if (reverse && dinit != nullptr) dinit[i] = carry;
}

// Per (b, t, h, p): dx, dz (y recomputed when z is given), hC = h0 C_t and dhB = dh B_t (fp32, for ssdb_dcs).
template <typename T>
__global__ void ssdb_dx(const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm,
                        const T* __restrict__ dout, const T* __restrict__ z, const float* __restrict__ dy,
                        const float* __restrict__ Dp, const float* __restrict__ d, const float* __restrict__ cs,
                        const int* __restrict__ seg, const float* __restrict__ cb, const float* __restrict__ h0,
                        const float* __restrict__ dh, float* __restrict__ dx, float* __restrict__ dz,
                        float* __restrict__ hC, float* __restrict__ dhB, int batch, i64 L, int H, int G, int P,
                        int N, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * L * H * P) return;
  const int p = (int)(i % P), h = (int)((i / P) % H);
  const i64 t = (i / ((i64)P * H)) % L, b = i / ((i64)P * H * L);
  const int g = h / (H / G), c = (int)(t / Q);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const i64 hrow = (b * H + h) * L, srow = b * L;
  const int sg = seg[srow + t], seg_end = seg[srow + t1 - 1], seg_prev = t0 > 0 ? seg[srow + t0 - 1] : 0;
  const float cs_t = cs[hrow + t], d_t = d[hrow + t], cs_end = cs[hrow + t1 - 1];
  const float* cbm = cb + (((b * nc + c) * G + g) * (i64)Q) * Q;
  const i64 so = (((b * nc + c) * H + h) * (i64)P + p) * N;
  const T* brow = Bm + ((srow + t) * G + g) * N;
  const T* crow = Cm + ((srow + t) * G + g) * N;
  float hc = 0.f, db = 0.f;
  for (int n = 0; n < N; ++n) {
    hc += h0[so + n] * load_f(crow + n);
    db += dh[so + n] * load_f(brow + n);
  }
  hC[i] = hc;
  dhB[i] = db;
  const float Dv = Dp[h * P + p];
  // dx_t = d_t sum_{t' >= t} M[t', t] dy_t' + d_t v_t exp(cs_end - cs_t) dh B_t + D dy_t
  float acc = 0.f;
  for (i64 tp = t; tp < t1; ++tp) {
    if (seg[srow + tp] != sg) break;  // seg is monotone: later positions are other sequences too
    acc += cbm[(tp - t0) * Q + (t - t0)] * expf(cs[hrow + tp] - cs_t) * dy[((srow + tp) * H + h) * P + p];
  }
  float g_dx = d_t * acc + Dv * dy[i];
  if (sg == seg_end) g_dx += d_t * expf(cs_end - cs_t) * db;
  dx[i] = g_dx;
  if (z != nullptr) {
    // y_t = sum_{s <= t} M[t, s] d_s x_s + w_t exp(cs_t) h0 C_t + D x_t
    float y = 0.f;
    for (i64 s = t; s >= t0; --s) {
      if (seg[srow + s] != sg) break;
      y += cbm[(t - t0) * Q + (s - t0)] * expf(cs_t - cs[hrow + s]) * d[hrow + s] *
           load_f(x + ((srow + s) * H + h) * P + p);
    }
    if (sg == seg_prev) y += expf(cs_t) * hc;
    y += Dv * load_f(x + i);
    dz[i] = load_f(dout + i) * y * silu_grad_f(load_f(z + i));
  }
}

// Per (b, t, h, n): dB, dC of head h (fp32, (B, L, H, N)).
//   dC_t = sum_{s <= t} L[t,s] d_s DX[t,s] B_s + w_t exp(cs_t) h0^T dy_t
//   dB_s = sum_{t >= s} L[t,s] d_s DX[t,s] C_t + v_s exp(cs_end - cs_s) d_s dh^T x_s
template <typename T>
__global__ void ssdb_dbc(const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm,
                         const float* __restrict__ dy, const float* __restrict__ d, const float* __restrict__ cs,
                         const int* __restrict__ seg, const float* __restrict__ dxd, const float* __restrict__ h0,
                         const float* __restrict__ dh, float* __restrict__ dB, float* __restrict__ dC, int batch,
                         i64 L, int H, int G, int P, int N, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * L * H * N) return;
  const int n = (int)(i % N), h = (int)((i / N) % H);
  const i64 t = (i / ((i64)N * H)) % L, b = i / ((i64)N * H * L);
  const int g = h / (H / G), c = (int)(t / Q);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const i64 hrow = (b * H + h) * L, srow = b * L;
  const int sg = seg[srow + t], seg_end = seg[srow + t1 - 1], seg_prev = t0 > 0 ? seg[srow + t0 - 1] : 0;
  const float cs_t = cs[hrow + t], d_t = d[hrow + t], cs_end = cs[hrow + t1 - 1];
  const float* dxm = dxd + (((b * nc + c) * H + h) * (i64)Q) * Q;
  const int tl = (int)(t - t0);
  float gc = 0.f, gb = 0.f;
  for (i64 s = t; s >= t0; --s) {
    if (seg[srow + s] != sg) break;
    gc += expf(cs_t - cs[hrow + s]) * d[hrow + s] * dxm[tl * Q + (s - t0)] * load_f(Bm + ((srow + s) * G + g) * N + n);
  }
  for (i64 tp = t; tp < t1; ++tp) {
    if (seg[srow + tp] != sg) break;
    gb += expf(cs[hrow + tp] - cs_t) * dxm[(tp - t0) * Q + tl] * load_f(Cm + ((srow + tp) * G + g) * N + n);
  }
  gb *= d_t;
  const i64 so = (((b * nc + c) * H + h) * (i64)P) * N + n;
  if (sg == seg_prev) {
    float a = 0.f;
    for (int p = 0; p < P; ++p) a += h0[so + (i64)p * N] * dy[((srow + t) * H + h) * P + p];
    gc += expf(cs_t) * a;
  }
  if (sg == seg_end) {
    float a = 0.f;
    for (int p = 0; p < P; ++p) a += dh[so + (i64)p * N] * load_f(x + ((srow + t) * H + h) * P + p);
    gb += expf(cs_end - cs_t) * d_t * a;
  }
  dB[i] = gb;
  dC[i] = gc;
}

// Per (b, h, t): dcs_t (gradient of cs_t, intra-chunk + chunk-start terms, minus the state term E_t),
// ddir_t (gradient of d_t through everything but cs), E_t (the state term; its sum goes to cs_end).
template <typename T>
__global__ void ssdb_dcs(const T* __restrict__ x, const float* __restrict__ dy,
                                    const float* __restrict__ d, const float* __restrict__ cs,
                                    const int* __restrict__ seg, const float* __restrict__ cb,
                                    const float* __restrict__ dxd, const float* __restrict__ hC,
                                    const float* __restrict__ dhB, float* __restrict__ dcs,
                                    float* __restrict__ ddir, float* __restrict__ est, int batch, i64 L, int H, int G,
                                    int P, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * H * L) return;
  const i64 t = i % L, bh = i / L;
  const int h = (int)(bh % H);
  const i64 b = bh / H;
  const int g = h / (H / G), c = (int)(t / Q);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const i64 hrow = bh * L, srow = b * L;
  const int sg = seg[srow + t], seg_end = seg[srow + t1 - 1], seg_prev = t0 > 0 ? seg[srow + t0 - 1] : 0;
  const float cs_t = cs[hrow + t], d_t = d[hrow + t], cs_end = cs[hrow + t1 - 1];
  const float* cbm = cb + (((b * nc + c) * G + g) * (i64)Q) * Q;
  const float* dxm = dxd + (((b * nc + c) * H + h) * (i64)Q) * Q;
  const int tl = (int)(t - t0);
  float row = 0.f, col = 0.f;
  for (i64 s = t; s >= t0; --s) {
    if (seg[srow + s] != sg) break;
    const int sl = (int)(s - t0);
    row += cbm[tl * Q + sl] * expf(cs_t - cs[hrow + s]) * d[hrow + s] * dxm[tl * Q + sl];
  }
  for (i64 tp = t; tp < t1; ++tp) {
    if (seg[srow + tp] != sg) break;
    const int pl = (int)(tp - t0);
    col += cbm[pl * Q + tl] * expf(cs[hrow + tp] - cs_t) * dxm[pl * Q + tl];
  }
  const i64 xo = ((srow + t) * H + h) * P;
  float term = 0.f, state = 0.f;
  if (sg == seg_prev) {
    for (int p = 0; p < P; ++p) term += dy[xo + p] * hC[xo + p];
    term *= expf(cs_t);
  }
  if (sg == seg_end) {
    for (int p = 0; p < P; ++p) state += load_f(x + xo + p) * dhB[xo + p];
    state *= expf(cs_end - cs_t);
  }
  const float e = d_t * state;
  dcs[i] = row - d_t * col + term - e;
  ddir[i] = col + state;
  est[i] = e;
}

// Per (b, h, c): reverse cumsum of dcs (plus the chunk-end terms) -> da; ddt = (ddir + A da) * slope;
// partial sums dA_part[(b * nc + c) * H + h] = sum d da, dtb_part likewise = sum ddt.
// fro (B, nc, H) = <dh_c, h0_c>.
extern "C" __global__ void ssdb_dt(const float* __restrict__ A, const float* __restrict__ d,
                                   const float* __restrict__ slope, const float* __restrict__ cs,
                                   const int* __restrict__ seg, const float* __restrict__ dcs,
                                   const float* __restrict__ ddir, const float* __restrict__ est,
                                   const float* __restrict__ h0, const float* __restrict__ dh,
                                   const float* __restrict__ fro, float* __restrict__ ddt,
                                   float* __restrict__ dA_part, float* __restrict__ dtb_part, int batch, i64 L, int H,
                                   int PN, int Q, int nc) {
  const i64 i = gtid();
  if (i >= (i64)batch * H * nc) return;
  const int c = (int)(i % nc), h = (int)((i / nc) % H);
  const i64 b = i / ((i64)nc * H);
  const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const i64 hrow = (b * H + h) * L, srow = b * L;
  const bool u = seg[srow + t1 - 1] == (t0 > 0 ? seg[srow + t0 - 1] : 0);
  float extra = 0.f;
  if (u) {
    float f = 0.f;
    if (fro != nullptr) {
      f = fro[(b * nc + c) * H + h];
    } else {
      const i64 so = ((b * nc + c) * H + h) * (i64)PN;
      for (int e = 0; e < PN; ++e) f += dh[so + e] * h0[so + e];
    }
    extra = expf(cs[hrow + t1 - 1]) * f;
  }
  for (i64 t = t0; t < t1; ++t) extra += est[hrow + t];
  const float a = A[h];
  float acc = extra, sa = 0.f, sb = 0.f;
  for (i64 t = t1 - 1; t >= t0; --t) {
    acc += dcs[hrow + t];
    const float dd = ddir[hrow + t] + a * acc;
    const float g = dd * slope[hrow + t];
    ddt[(srow + t) * H + h] = g;
    sa += d[hrow + t] * acc;
    sb += g;
  }
  dA_part[(b * nc + c) * H + h] = sa;
  dtb_part[(b * nc + c) * H + h] = sb;
}

// ssdb_dt (same outputs, fro required) with a block of 256 (>= Q) threads per (b, c, h): one position per thread,
// the reverse cumsum of dcs as a shared-memory scan and the chunk sums as tree reductions (v3: a thread per chunk).
__device__ __forceinline__ float ssdb_block_sum256(float v, float* red) {  // 256 threads, red[256]; all call
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int off = 128; off > 0; off >>= 1) {
    if (t < off) red[t] += red[t + off];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}
extern "C" __global__ void __launch_bounds__(256) ssdb_dt4(
    const float* __restrict__ A, const float* __restrict__ d, const float* __restrict__ slope,
    const float* __restrict__ cs, const int* __restrict__ seg, const float* __restrict__ dcs,
    const float* __restrict__ ddir, const float* __restrict__ est, const float* __restrict__ fro,
    float* __restrict__ ddt, float* __restrict__ dA_part, float* __restrict__ dtb_part, int batch, i64 L, int H,
    int Q, int nc, int nfro) {
  __shared__ float buf[2][256];
  __shared__ float red[256];
  const i64 blk = blockIdx.x;  // (b, c, h)
  const int h = (int)(blk % H), c = (int)((blk / H) % nc);
  const i64 b = blk / ((i64)H * nc);
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0), t = threadIdx.x;
  const i64 hrow = (b * H + h) * L + t0, srow = b * L + t0;
  const bool in = t < len;
  const float e = in ? est[hrow + t] : 0.f, g_cs = in ? dcs[hrow + t] : 0.f;
  float extra = ssdb_block_sum256(e, red);
  const bool u = seg[srow + len - 1] == (t0 > 0 ? seg[srow - 1] : 0);
  float fr;  // <dh_c, h0_c>: nfro partials per (b, c, h) (1: ssdb_fro's; more: ssdb_pass2's per-warp sums)
  if (nfro == 1) {
    fr = fro[blk];
  } else {
    fr = 0.f;
    for (int k = t; k < nfro; k += blockDim.x) fr += fro[blk * nfro + k];
    fr = ssdb_block_sum256(fr, red);
  }
  if (u) extra += expf(cs[hrow + len - 1]) * fr;
  // acc_t = extra + sum_{t' >= t} dcs_t' (reverse inclusive scan)
  buf[0][t] = g_cs;
  __syncthreads();
  int cur = 0;
  for (int off = 1; off < len; off *= 2) {
    const float a = buf[cur][t] + (t + off < len ? buf[cur][t + off] : 0.f);
    buf[cur ^ 1][t] = a;
    cur ^= 1;
    __syncthreads();
  }
  const float acc = extra + buf[cur][t];
  float g = 0.f, sa = 0.f;
  if (in) {
    g = (ddir[hrow + t] + A[h] * acc) * slope[hrow + t];
    ddt[(srow + t) * H + h] = g;
    sa = d[hrow + t] * acc;
  }
  sa = ssdb_block_sum256(sa, red);
  g = ssdb_block_sum256(g, red);
  if (t == 0) {
    dA_part[(b * nc + c) * H + h] = sa;
    dtb_part[(b * nc + c) * H + h] = g;
  }
}

// fro[(b * nc + c) * H + h] = <dh_c, h0_c> (P*N elements): one block of SSDB_RED_THREADS per (b, c, h),
// coalesced (float4 where aligned). Replaces ssdb_dt's serial loop over P*N (one thread per chunk).
constexpr int SSDB_RED_THREADS = 256;
extern "C" __global__ void __launch_bounds__(256) ssdb_fro(const float* __restrict__ h0,
                                                           const float* __restrict__ dh, float* __restrict__ fro,
                                                           int PN) {
  __shared__ float red[2 * SSDB_RED_THREADS / 32 + 2];
  const i64 so = (i64)blockIdx.x * PN;
  float f = 0.f;
  if ((PN & 3) == 0) {
    const float4* a4 = reinterpret_cast<const float4*>(dh + so);
    const float4* b4 = reinterpret_cast<const float4*>(h0 + so);
    for (int e = threadIdx.x; e < PN / 4; e += blockDim.x) {
      const float4 a = a4[e], b = b4[e];
      f += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
    }
  } else {
    for (int e = threadIdx.x; e < PN; e += blockDim.x) f += dh[so + e] * h0[so + e];
  }
  f = row_sum(f, red);
  if (threadIdx.x == 0) fro[blockIdx.x] = f;
}

// ssdb_dcs (same outputs) with one block per (b, c, h) chunk: row sums over s by a warp per row t
// (lanes along the row: coalesced reads of CB / DX / dy / hC / x / dhB), column sums by a thread per
// column s (threads along the row again). The per-position scalars go through shared memory.
constexpr int SSDB_DCS_THREADS = 256, SSDB_DCS_MAXQ = 256;
template <typename T>
__global__ void __launch_bounds__(256) ssdb_dcs2(const T* __restrict__ x, const float* __restrict__ dy,
                                                 const float* __restrict__ d, const float* __restrict__ cs,
                                                 const int* __restrict__ seg, const float* __restrict__ cb,
                                                 const float* __restrict__ dxd, const float* __restrict__ hC,
                                                 const float* __restrict__ dhB, float* __restrict__ dcs,
                                                 float* __restrict__ ddir, float* __restrict__ est, int batch, i64 L,
                                                 int H, int G, int P, int Q, int nc) {
  __shared__ float s_cs[SSDB_DCS_MAXQ], s_d[SSDB_DCS_MAXQ], s_row[SSDB_DCS_MAXQ], s_term[SSDB_DCS_MAXQ],
      s_state[SSDB_DCS_MAXQ];
  __shared__ int s_seg[SSDB_DCS_MAXQ];
  const i64 blk = blockIdx.x;  // (b, c, h)
  const int h = (int)(blk % H), c = (int)((blk / H) % nc);
  const i64 b = blk / ((i64)H * nc);
  const int g = h / (H / G);
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const i64 hrow = (b * H + h) * L + t0, srow = b * L + t0;
  const int seg_end = seg[srow + len - 1], seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float* cbm = cb + (((b * nc + c) * G + g) * (i64)Q) * Q;
  const float* dxm = dxd + (((b * nc + c) * H + h) * (i64)Q) * Q;
  for (int l = threadIdx.x; l < len; l += blockDim.x) {
    s_cs[l] = cs[hrow + l];
    s_d[l] = d[hrow + l];
    s_seg[l] = seg[srow + l];
  }
  __syncthreads();
  const float cs_end = s_cs[len - 1];
  const int lane = threadIdx.x % SSM_WARP_SIZE, warp = threadIdx.x / SSM_WARP_SIZE;
  const int nwarps = blockDim.x / SSM_WARP_SIZE;
  for (int t = warp; t < len; t += nwarps) {
    const int sg = s_seg[t];
    const float cs_t = s_cs[t];
    float row = 0.f, term = 0.f, state = 0.f;
    for (int s = lane; s <= t; s += SSM_WARP_SIZE)
      if (s_seg[s] == sg) row += cbm[(i64)t * Q + s] * expf(cs_t - s_cs[s]) * s_d[s] * dxm[(i64)t * Q + s];
    const i64 xo = ((srow + t) * H + h) * P;
    if (sg == seg_prev)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) term += dy[xo + p] * hC[xo + p];
    if (sg == seg_end)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) state += load_f(x + xo + p) * dhB[xo + p];
    row = warp_sum(row);
    term = warp_sum(term);
    state = warp_sum(state);
    if (lane == 0) {
      s_row[t] = row;
      s_term[t] = sg == seg_prev ? term * expf(cs_t) : 0.f;
      s_state[t] = sg == seg_end ? state * expf(cs_end - cs_t) : 0.f;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const int sg = s_seg[t];
    const float cs_t = s_cs[t];
    float col = 0.f;
    for (int tp = t; tp < len; ++tp) {
      if (s_seg[tp] != sg) break;  // seg is monotone
      col += cbm[(i64)tp * Q + t] * expf(s_cs[tp] - cs_t) * dxm[(i64)tp * Q + t];
    }
    const float d_t = s_d[t], state = s_state[t];
    const float e = d_t * state;
    const i64 o = hrow + t;
    dcs[o] = s_row[t] - d_t * col + s_term[t] - e;
    ddir[o] = col + state;
    est[o] = e;
  }
}

// =====================================================================================================
// Tensor-core path: the chunk matrix products as one batched-GEMM kernel, ssdb_mm<T, KIND>.
// Grid (nc * HH, tiles of the I x J output, B) with HH = H (G for KIND 0), 128 threads (4 warps): one
// 64 x 64 output tile of one (batch, chunk, head); warp w owns rows 16w .. 16w + 16 (8 mma column
// tiles). K runs in slices of 32 staged in shared memory as float (operands converted and
// decay-weighted on load); up to two K phases accumulate into the same tile. Operands go through
// mma.sync: bf16/f16 inputs on m16n8k16 (operands rounded to the input type, fp32 accumulation, as the
// reference package does), float32 inputs on 3xTF32 m16n8k8 (about fp32 accuracy).
//   KIND  out (I x J)      phase 1 (K1)                      phase 2 (K2)                 epilogue
//   0     CB[t,s]  QxQ     C_t . B_s (N)                                                  0 above diagonal
//   1     DX[t,s]  QxQ     dy_t . x_s (P)
//   2     S[p,n]   PxN     x_s d_s e^(cs_end-cs_s) v_s B_s (Q)
//   3     Gl[p,n]  PxN     dy_t e^(cs_t) w_t C_t (Q)
//   4     hC[t,p]  QxP     C_t . h0[p,:] (N)
//   5     dhB[t,p] QxP     B_t . dh[p,:] (N)
//   6     dx[s,p]  QxP     M[t,s] dy_t (Q)                   B_s e^(cs_end-cs_s) v_s dh (N) d_s * acc + D dy
//   7     dz[t,p]  QxP     M[t,s] d_s x_s (Q)                                             y -> dz
//   8     dC[t,n]  QxN     E[t,s] d_s B_s (Q)                dy_t e^(cs_t) w_t h0 (P)
//   9     dB[s,n]  QxN     E[t,s] C_t (Q)                    x_s e^(cs_end-cs_s) v_s dh (P)  d_s * acc
// with M[t,s] = CB[t,s] e^(cs_t-cs_s), E[t,s] = DX[t,s] e^(cs_t-cs_s), both masked to s <= t, same sequence.
// Traffic per (b, c, h): the Q x Q matrices CB / DX are read once per output column tile; x, dy, B, C
// once per tile of the other dimension.

template <typename T>
struct BMma;
template <typename T, uint32_t (*PACK)(float, float),
          void (*MMA)(float (&)[4], const uint32_t (&)[4], const uint32_t (&)[2])>
struct BMma16 {
  static constexpr int K = 16;
  template <int NT, class FA, class FB>
  __device__ __forceinline__ static void step(float (&acc)[NT][4], const FA& a, const FB& b, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k = k0 + 2 * t;
    const uint32_t af[4] = {PACK(a(g, k), a(g, k + 1)), PACK(a(g + 8, k), a(g + 8, k + 1)),
                            PACK(a(g, k + 8), a(g, k + 9)), PACK(a(g + 8, k + 8), a(g + 8, k + 9))};
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int c = 8 * j + g;
      const uint32_t bf[2] = {PACK(b(k, c), b(k + 1, c)), PACK(b(k + 8, c), b(k + 9, c))};
      MMA(acc[j], af, bf);
    }
  }
};
template <>
struct BMma<bf16_t> : BMma16<bf16_t, pack_bf16x2, mma_16816_bf16> {};
template <>
struct BMma<half_t> : BMma16<half_t, pack_f16x2, mma_16816_f16> {};

template <>
struct BMma<float> {  // 3xTF32: hi*hi + hi*lo + lo*hi
  static constexpr int K = 8;
  template <int NT, class FA, class FB>
  __device__ __forceinline__ static void step(float (&acc)[NT][4], const FA& a, const FB& b, int k0) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int k = k0 + t;
    const float av[4] = {a(g, k), a(g + 8, k), a(g, k + 4), a(g + 8, k + 4)};
    uint32_t ahi[4], alo[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      split_tf32(av[i], ahi[i], alo[i]);
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const int c = 8 * j + g;
      const float bv[2] = {b(k, c), b(k + 4, c)};
      uint32_t bhi[2], blo[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        split_tf32(bv[i], bhi[i], blo[i]);
      }
      mma_1688_tf32(acc[j], alo, bhi);
      mma_1688_tf32(acc[j], ahi, blo);
      mma_1688_tf32(acc[j], ahi, bhi);
    }
  }
};

constexpr int MM_TILE = 64, MM_KS = 32, MM_THREADS = 128;

template <typename T, int KIND>
__global__ void __launch_bounds__(128) ssdb_mm(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const T* __restrict__ dout,
    const T* __restrict__ z, const float* __restrict__ dy, const float* __restrict__ Dp,
    const float* __restrict__ d, const float* __restrict__ cs, const int* __restrict__ seg,
    const float* __restrict__ cb, const float* __restrict__ dxd, const float* __restrict__ h0,
    const float* __restrict__ dh, const float* __restrict__ hC, float* __restrict__ out, int batch, i64 L, int H,
    int G, int P, int N, int Q, int nc, int coalesce) {
  __shared__ float As[MM_TILE][MM_KS + 1];
  __shared__ float Bs[MM_KS][MM_TILE + 4];
  constexpr bool PER_GROUP = KIND == 0;
  const int HH = PER_GROUP ? G : H;
  const int c = (int)(blockIdx.x / HH), hh = (int)(blockIdx.x % HH);
  const int h = PER_GROUP ? 0 : hh, g = PER_GROUP ? hh : hh / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const i64 srow = b * L + t0;            // (b, t0) row of (B, L, ...) arrays
  const i64 hrow = (b * H + h) * L + t0;  // (b, h, t0) of (B, H, L) arrays
  const int seg_end = seg[srow + len - 1], seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float cs_end = cs[hrow + len - 1];
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;                // (P, N) state blocks
  const i64 mq = (((b * nc + c) * (i64)HH + hh) * Q) * (i64)Q;       // Q x Q blocks (per group for CB)
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;        // the group's CB block

  int I, J, K1, K2 = 0;
  if (KIND == 0 || KIND == 1) { I = Q; J = Q; K1 = KIND == 0 ? N : P; }
  else if (KIND == 2 || KIND == 3) { I = P; J = N; K1 = Q; }
  else if (KIND == 4 || KIND == 5) { I = Q; J = P; K1 = N; }
  else if (KIND == 6) { I = Q; J = P; K1 = Q; K2 = N; }
  else if (KIND == 7) { I = Q; J = P; K1 = Q; }
  else { I = Q; J = N; K1 = Q; K2 = P; }
  const int tiles_j = (J + MM_TILE - 1) / MM_TILE;
  const int i0 = (int)(blockIdx.y / tiles_j) * MM_TILE, j0 = (int)(blockIdx.y % tiles_j) * MM_TILE;
  // DX is only ever read at s <= t: with coalesce (v2) its tiles above the diagonal are not computed
  // (left unwritten; 6 of 16 tiles at Q = 256).
  if (KIND == 1 && coalesce && j0 >= i0 + MM_TILE) return;

  auto X = [&](int l, int p) { return load_f(x + ((srow + l) * H + h) * P + p); };
  auto DY = [&](int l, int p) { return dy[((srow + l) * H + h) * P + p]; };
  auto Bv = [&](int l, int n) { return load_f(Bm + ((srow + l) * G + g) * N + n); };
  auto Cv = [&](int l, int n) { return load_f(Cm + ((srow + l) * G + g) * N + n); };
  auto SG = [&](int l) { return seg[srow + l]; };
  auto CS = [&](int l) { return cs[hrow + l]; };
  auto DT = [&](int l) { return d[hrow + l]; };
  // decayed, masked Q x Q entries (t, s)
  auto Mw = [&](int t, int s) {
    return (s <= t && t < len && SG(s) == SG(t)) ? cb[mqg + (i64)t * Q + s] * expf(CS(t) - CS(s)) : 0.f;
  };
  auto Ew = [&](int t, int s) {
    return (s <= t && t < len && SG(s) == SG(t)) ? dxd[mq + (i64)t * Q + s] * expf(CS(t) - CS(s)) : 0.f;
  };
  // A(i, k) and B(k, j) of phase 1 / 2 (i, j, k in range; positions may be past len).
  auto A1 = [&](int i, int k) -> float {
    if (KIND == 0) return i < len ? Cv(i, k) : 0.f;
    if (KIND == 1) return i < len ? DY(i, k) : 0.f;
    if (KIND == 2) return (k < len && SG(k) == seg_end) ? X(k, i) * DT(k) * expf(cs_end - CS(k)) : 0.f;
    if (KIND == 3) return (k < len && SG(k) == seg_prev) ? DY(k, i) * expf(CS(k)) : 0.f;
    if (KIND == 4) return i < len ? Cv(i, k) : 0.f;
    if (KIND == 5) return i < len ? Bv(i, k) : 0.f;
    if (KIND == 6) return Mw(k, i);
    if (KIND == 7) return k < len ? Mw(i, k) * DT(k) : 0.f;
    if (KIND == 8) return k < len ? Ew(i, k) * DT(k) : 0.f;
    return Ew(k, i);  // 9
  };
  auto B1 = [&](int k, int j) -> float {
    if (KIND == 0) return j < len ? Bv(j, k) : 0.f;
    if (KIND == 1) return j < len ? X(j, k) : 0.f;
    if (KIND == 2) return k < len ? Bv(k, j) : 0.f;
    if (KIND == 3) return k < len ? Cv(k, j) : 0.f;
    if (KIND == 4) return h0[st + (i64)j * N + k];
    if (KIND == 5) return dh[st + (i64)j * N + k];
    if (KIND == 6) return k < len ? DY(k, j) : 0.f;
    if (KIND == 7) return k < len ? X(k, j) : 0.f;
    if (KIND == 8) return k < len ? Bv(k, j) : 0.f;
    return k < len ? Cv(k, j) : 0.f;  // 9
  };
  auto A2 = [&](int i, int k) -> float {
    if (i >= len) return 0.f;
    if (KIND == 6) return SG(i) == seg_end ? Bv(i, k) * expf(cs_end - CS(i)) : 0.f;
    if (KIND == 8) return SG(i) == seg_prev ? DY(i, k) * expf(CS(i)) : 0.f;
    if (KIND == 9) return SG(i) == seg_end ? X(i, k) * expf(cs_end - CS(i)) : 0.f;
    return 0.f;
  };
  auto B2 = [&](int k, int j) -> float {
    if (KIND == 6) return dh[st + (i64)j * N + k];
    if (KIND == 8) return h0[st + (i64)k * N + j];
    return dh[st + (i64)k * N + j];  // 9
  };

  // Operands whose global layout is contiguous along the tile's row axis (A) or K axis (B).
  constexpr bool A1_T = KIND == 2 || KIND == 3 || KIND == 6 || KIND == 9;
  constexpr bool B1_T = KIND == 0 || KIND == 1 || KIND == 4 || KIND == 5;
  constexpr bool B2_T = KIND == 6;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  auto fa = [&](int r, int k) { return As[16 * w + r][k]; };
  auto fb = [&](int k, int col) { return Bs[k][col]; };
  for (int phase = 0; phase < (K2 > 0 ? 2 : 1); ++phase) {
    const int K = phase == 0 ? K1 : K2;
    for (int k0 = 0; k0 < K; k0 += MM_KS) {
      // Triangular products: skip K slices that are all zero for this tile (uniform per block).
      if (phase == 0 && (KIND == 6 || KIND == 9) && k0 + MM_KS <= i0) continue;          // A(s, t) = 0 for t < s
      if (phase == 0 && (KIND == 7 || KIND == 8) && k0 >= i0 + MM_TILE) continue;       // A(t, s) = 0 for s > t
      if (KIND == 0 && j0 >= i0 + MM_TILE) break;                                        // output tile above diagonal
      __syncthreads();  // the previous slice's readers are done
      // coalesce: consecutive threads walk the operand's contiguous axis in global memory (the
      // row axis for the transposed A operands, the K axis for the transposed B operands).
      for (int e = tid; e < MM_TILE * MM_KS; e += MM_THREADS) {
        const bool tr = coalesce && (phase == 0 ? A1_T : false);
        const int r = tr ? e % MM_TILE : e / MM_KS, k = tr ? e / MM_TILE : e % MM_KS;
        const int gi = i0 + r, gk = k0 + k;
        As[r][k] = (gi < I && gk < K) ? (phase == 0 ? A1(gi, gk) : A2(gi, gk)) : 0.f;
      }
      for (int e = tid; e < MM_TILE * MM_KS; e += MM_THREADS) {
        const bool tr = coalesce && (phase == 0 ? B1_T : B2_T);
        const int k = tr ? e % MM_KS : e / MM_TILE, col = tr ? e / MM_KS : e % MM_TILE;
        const int gj = j0 + col, gk = k0 + k;
        Bs[k][col] = (gj < J && gk < K) ? (phase == 0 ? B1(gk, gj) : B2(gk, gj)) : 0.f;
      }
      __syncthreads();
#if defined(SSM_EMULATION) && !defined(SSDB_EMULATE_MMA)
      // CPU emulator: the same fragment ownership, plain products from shared memory (operands
      // rounded to T like the mma path), because emulated warp shuffles are very slow.
      for (int jt = 0; jt < 8; ++jt)
        for (int q = 0; q < 4; ++q) {
          const int r = 16 * w + gq + (q >= 2 ? 8 : 0), col = 8 * jt + 2 * tq + (q & 1);
          float sum = 0.f;
          for (int k = 0; k < MM_KS; ++k) {
            T av, bv;
            store_f(&av, As[r][k]);
            store_f(&bv, Bs[k][col]);
            sum += load_f(&av) * load_f(&bv);
          }
          acc[jt][q] += sum;
        }
#else
      for (int kk = 0; kk < MM_KS; kk += BMma<T>::K) BMma<T>::template step<8>(acc, fa, fb, kk);
#endif
    }
  }

  // Epilogue: element (i, j) of the tile.
#pragma unroll
  for (int jt = 0; jt < 8; ++jt) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = i0 + 16 * w + gq + (q >= 2 ? 8 : 0), j = j0 + 8 * jt + 2 * tq + (q & 1);
      if (i >= I || j >= J) continue;
      const float v = acc[jt][q];
      if (KIND == 0) out[mq + (i64)i * Q + j] = j <= i ? v : 0.f;
      else if (KIND == 1) out[mq + (i64)i * Q + j] = v;
      else if (KIND == 2 || KIND == 3) out[st + (i64)i * N + j] = v;
      else {
        if (i >= len) continue;
        const i64 xo = ((srow + i) * H + h) * P + j;  // (t, p) element of (B, L, H, P)
        const i64 no = ((srow + i) * H + h) * N + j;  // (t, n) element of (B, L, H, N)
        if (KIND == 4 || KIND == 5) out[xo] = v;
        else if (KIND == 6) out[xo] = DT(i) * v + Dp[h * P + j] * dy[xo];
        else if (KIND == 7) {
          float y = v + Dp[h * P + j] * load_f(x + xo);
          if (SG(i) == seg_prev) y += expf(CS(i)) * hC[xo];
          out[xo] = load_f(dout + xo) * y * silu_grad_f(load_f(z + xo));
        } else if (KIND == 8) out[no] = v;
        else out[no] = DT(i) * v;
      }
    }
  }
}

// =====================================================================================================
// v3 (SSMCORE_SSD_BWD_IMPL=v3): ssdb_mm3<T, KIND>, the ssdb_mm products (same KIND table, same math, same
// rounding) with the operand staging rebuilt so that global-memory latency is paid once per K slice and
// hidden behind the tensor-core work of the previous slice:
//  - the chunk's per-position scalars (cs, d, seg) are staged in shared memory once per block, so the
//    only global loads of an operand element are the element itself (v2 re-read cs twice, seg twice and
//    d per element of the decayed Q x Q operands);
//  - every staging phase has a compile-time trip count (16 elements per thread per operand), and its
//    loads are unconditional (indices clamped into the tensor, masked with a select afterwards), so all
//    32 loads of a slice are in flight together;
//  - register double-buffering: the raw operands of slice k + 1 are loaded into registers before the
//    mma of slice k and converted / decay-weighted / stored to shared memory after it;
//  - the K range is cut to the non-zero part (triangle, chunk length) before the loop;
//  - the output tiles of one (batch, chunk, head) are consecutive blocks (grid x = chunk-head * tiles +
//    tile), so the tiles that share an operand run together and share it through L2.
// ssdb_pass2: ssdb_pass with a float4 of 4 consecutive (p, n) per thread and 8 chunks' loads in flight.
// Build-time experiments (NVRTC check, sm_90, bf16): SSDB_MM3_MINB 2 = at most 128 registers, 2 blocks (16 warps)
// per SM, spills only in KIND 6 / 8 (20 bytes); 3 (80 registers) spills 150-420 bytes in KIND 6-9.
// SSDB_MM3_NOPREFETCH 1 loads each slice right before storing it (no overlap with the mma; fewer live registers).
#ifndef SSDB_MM3_MINB
#define SSDB_MM3_MINB 2
#endif
#ifndef SSDB_MM3_NOPREFETCH
#define SSDB_MM3_NOPREFETCH 0
#endif
constexpr int MM3_MAXQ = 256, MM3_THREADS = 256, MM3_PER = MM_TILE * MM_KS / MM3_THREADS;  // 8 per thread
template <int V>
struct ssdb_int {
  static constexpr int value = V;
};

template <typename T, int KIND>
__global__ void __launch_bounds__(256, SSDB_MM3_MINB) ssdb_mm3(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const T* __restrict__ dout,
    const T* __restrict__ z, const float* __restrict__ dy, const float* __restrict__ Dp,
    const float* __restrict__ d, const float* __restrict__ cs, const int* __restrict__ seg,
    const float* __restrict__ cb, const float* __restrict__ dxd, const float* __restrict__ h0,
    const float* __restrict__ dh, const float* __restrict__ hC, float* __restrict__ out, int batch, i64 L, int H,
    int G, int P, int N, int Q, int nc, int unused) {
  // The operand slices, and after the products the output tile (read back coalesced by the epilogue).
  __shared__ union {
    struct {
      float A[MM_TILE][MM_KS + 1];
      float B[MM_KS][MM_TILE + 4];
    } ab;
    float C[MM_TILE][MM_TILE + 1];
  } sm;
  auto& As = sm.ab.A;
  auto& Bs = sm.ab.B;
  __shared__ float s_cs[MM3_MAXQ], s_d[MM3_MAXQ];
  __shared__ int s_seg[MM3_MAXQ];
  constexpr bool PER_GROUP = KIND == 0;
  const int HH = PER_GROUP ? G : H;
  int I, J, K1, K2 = 0;
  if (KIND == 0 || KIND == 1) { I = Q; J = Q; K1 = KIND == 0 ? N : P; }
  else if (KIND == 2 || KIND == 3) { I = P; J = N; K1 = Q; }
  else if (KIND == 4 || KIND == 5) { I = Q; J = P; K1 = N; }
  else if (KIND == 6) { I = Q; J = P; K1 = Q; K2 = N; }
  else if (KIND == 7) { I = Q; J = P; K1 = Q; }
  else { I = Q; J = N; K1 = Q; K2 = P; }
  const int tiles_j = (J + MM_TILE - 1) / MM_TILE, tiles = ((I + MM_TILE - 1) / MM_TILE) * tiles_j;
  const int blk = (int)(blockIdx.x / tiles), tile = (int)(blockIdx.x % tiles);
  const int c = blk / HH, hh = blk % HH;
  const int h = PER_GROUP ? 0 : hh, g = PER_GROUP ? hh : hh / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0), lenm = len - 1;
  const i64 srow = b * L + t0;            // (b, t0) row of (B, L, ...) arrays
  const i64 hrow = (b * H + h) * L + t0;  // (b, h, t0) of (B, H, L) arrays
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;                // (P, N) state blocks
  const i64 mq = (((b * nc + c) * (i64)HH + hh) * Q) * (i64)Q;       // Q x Q blocks (per group for CB)
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;        // the group's CB block
  const int i0 = (tile / tiles_j) * MM_TILE, j0 = (tile % tiles_j) * MM_TILE;
  // DX is only ever read at s <= t: its tiles above the diagonal are not computed (left unwritten).
  if (KIND == 1 && j0 >= i0 + MM_TILE) return;
  // 8 warps: warp w owns rows 16 (w % 4) .. + 16 and columns 32 (w / 4) .. + 32 of the tile (4 mma column tiles).
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * (w & 3), wc = 32 * (w >> 2);

  if (KIND >= 2) {
    for (int l = tid; l < Q; l += MM3_THREADS) {
      const bool in = l < len;
      s_cs[l] = in ? cs[hrow + l] : 0.f;
      s_d[l] = in ? d[hrow + l] : 0.f;
      s_seg[l] = in ? seg[srow + l] : -1;
    }
    __syncthreads();
  }
  const int seg_end = KIND >= 2 ? s_seg[lenm] : 0, seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float cs_end = KIND >= 2 ? s_cs[lenm] : 0.f;

  // The non-zero K range of phase 1 (slices of MM_KS), and phase 2.
  int ks = 0, ke = K1;
  if (KIND == 6 || KIND == 9) ks = i0;                           // A(s, t) = 0 for t < s
  if (KIND == 7 || KIND == 8) ke = ke < i0 + MM_TILE ? ke : i0 + MM_TILE;  // A(t, s) = 0 for s > t
  if (KIND >= 2 && KIND != 4 && KIND != 5) ke = ke < len ? ke : len;       // K runs over positions
  int n1 = ke > ks ? (ke - ks + MM_KS - 1) / MM_KS : 0;
  if (KIND == 0 && j0 >= i0 + MM_TILE) n1 = 0;                   // output tile above the diagonal: zeros
  const int nsteps = n1 + (K2 + MM_KS - 1) / MM_KS;

  // Operands whose global layout is contiguous along the tile's row axis (A) or K axis (B).
  constexpr bool A1_T = KIND == 2 || KIND == 3 || KIND == 6 || KIND == 9;
  constexpr bool B1_T = KIND == 0 || KIND == 1 || KIND == 4 || KIND == 5;
  constexpr bool B2_T = KIND == 6;

  // Raw operand registers (an fp32 and a T array: which one a phase uses is fixed per KIND and phase).
  float ra[MM3_PER], rb[MM3_PER];
  T ta[MM3_PER], tb[MM3_PER];
  auto a_idx = [&](int ph, int u, int& r, int& k) {
    const int e = tid + u * MM3_THREADS;
    const bool tr = ph == 0 && A1_T;
    r = tr ? e % MM_TILE : e / MM_KS;
    k = tr ? e / MM_TILE : e % MM_KS;
  };
  auto b_idx = [&](int ph, int u, int& k, int& col) {
    const int e = tid + u * MM3_THREADS;
    const bool tr = ph == 0 ? B1_T : B2_T;
    k = tr ? e % MM_KS : e / MM_TILE;
    col = tr ? e / MM_KS : e % MM_TILE;
  };
  // Phase PH (0 or 1) as a compile-time constant: the staging code of a phase has no runtime branches
  // between its loads.
  // Operand element (row gi of the tile's row axis, kk of K) at base[gi * si + kk * sk], valid for gi < li and
  // kk < lk (32-bit offsets: the launcher checks that they fit). Per KIND, phase and operand; f32 sources in
  // ra / rb, T sources in ta / tb.
  struct Opd {
    const float* f;
    const T* t;
    int si, li, sk, lk;
  };
  const T* xb = x + (srow * H + h) * P;
  const float* dyb = dy + (srow * H + h) * P;
  const T* Bb = Bm + (srow * G + g) * N;
  const T* Cb = Cm + (srow * G + g) * N;
  const int HP = H * P, GN = G * N;
  auto opd = [&](int ph, bool isA) -> Opd {
    if (isA && ph == 0) {
      if (KIND == 0 || KIND == 4) return {nullptr, Cb, GN, len, 1, N};
      if (KIND == 5) return {nullptr, Bb, GN, len, 1, N};
      if (KIND == 1) return {dyb, nullptr, HP, len, 1, P};
      if (KIND == 2) return {nullptr, xb, 1, P, HP, len};
      if (KIND == 3) return {dyb, nullptr, 1, P, HP, len};
      if (KIND == 6) return {cb + mqg, nullptr, 1, Q, Q, len};
      if (KIND == 7) return {cb + mqg, nullptr, Q, len, 1, len};
      if (KIND == 8) return {dxd + mq, nullptr, Q, len, 1, len};
      return {dxd + mq, nullptr, 1, len, Q, len};  // 9
    }
    if (isA) {
      if (KIND == 6) return {nullptr, Bb, GN, len, 1, N};
      if (KIND == 8) return {dyb, nullptr, HP, len, 1, P};
      return {nullptr, xb, HP, len, 1, P};  // 9
    }
    if (ph == 0) {
      if (KIND == 0) return {nullptr, Bb, GN, len, 1, N};
      if (KIND == 1) return {nullptr, xb, HP, len, 1, P};
      if (KIND == 2 || KIND == 8) return {nullptr, Bb, 1, N, GN, len};
      if (KIND == 3 || KIND == 9) return {nullptr, Cb, 1, N, GN, len};
      if (KIND == 4) return {h0 + st, nullptr, N, P, 1, N};
      if (KIND == 5) return {dh + st, nullptr, N, P, 1, N};
      if (KIND == 6) return {dyb, nullptr, 1, P, HP, len};
      return {nullptr, xb, 1, P, HP, len};  // 7
    }
    if (KIND == 6) return {dh + st, nullptr, N, P, 1, N};
    if (KIND == 8) return {h0 + st, nullptr, 1, N, N, P};
    return {dh + st, nullptr, 1, N, N, P};  // 9
  };
  // Which raw array a (KIND, phase, operand) uses.
  auto a_f32 = [](int ph) { return ph == 0 ? (KIND == 1 || KIND == 3 || KIND >= 6) : KIND == 8; };
  auto b_f32 = [](int ph) { return ph == 0 ? (KIND == 4 || KIND == 5 || KIND == 6) : true; };
  auto load = [&](auto PHC, int k0) {
    constexpr int ph = decltype(PHC)::value;
    if (ph == 1 && !(KIND == 6 || KIND == 8 || KIND == 9)) return;
    {
      const Opd o = opd(ph, true);
      const bool tr = ph == 0 && A1_T;
      const int gi = i0 + (tr ? tid % MM_TILE : tid / MM_KS), kk = k0 + (tr ? tid / MM_TILE : tid % MM_KS);
      const int di = tr ? 0 : MM3_THREADS / MM_KS, dk = tr ? MM3_THREADS / MM_TILE : 0;
      const int off = gi * o.si + kk * o.sk, ustep = di * o.si + dk * o.sk;
#pragma unroll
      for (int u = 0; u < MM3_PER; ++u) {
        if (gi + di * u < o.li && kk + dk * u < o.lk) {
          if (a_f32(ph)) ra[u] = o.f[off + u * ustep];
          else ta[u] = o.t[off + u * ustep];
        }
      }
    }
    {
      const Opd o = opd(ph, false);
      const bool tr = ph == 0 ? B1_T : B2_T;
      const int gj = j0 + (tr ? tid / MM_KS : tid % MM_TILE), kk = k0 + (tr ? tid % MM_KS : tid / MM_TILE);
      const int dj = tr ? MM3_THREADS / MM_KS : 0, dk = tr ? 0 : MM3_THREADS / MM_TILE;
      const int off = gj * o.si + kk * o.sk, ustep = dj * o.si + dk * o.sk;
#pragma unroll
      for (int u = 0; u < MM3_PER; ++u) {
        if (gj + dj * u < o.li && kk + dk * u < o.lk) {
          if (b_f32(ph)) rb[u] = o.f[off + u * ustep];
          else tb[u] = o.t[off + u * ustep];
        }
      }
    }
  };
  auto store = [&](auto PHC, int k0) {
    constexpr int ph = decltype(PHC)::value;
    const int K = ph ? K2 : K1;
#pragma unroll
    for (int u = 0; u < MM3_PER; ++u) {
      int r, k;
      a_idx(ph, u, r, k);
      const int i = i0 + r, kk = k0 + k;
      float v = 0.f;
      if (i < I && kk < K) {
        if (ph == 0) {
          if (KIND == 0 || KIND == 4 || KIND == 5) v = i < len ? load_f(&ta[u]) : 0.f;
          else if (KIND == 1) v = i < len ? ra[u] : 0.f;
          else if (KIND == 2)
            v = (kk < len && s_seg[kk] == seg_end) ? load_f(&ta[u]) * s_d[kk] * expf(cs_end - s_cs[kk]) : 0.f;
          else if (KIND == 3) v = (kk < len && s_seg[kk] == seg_prev) ? ra[u] * expf(s_cs[kk]) : 0.f;
          else if (KIND == 6 || KIND == 9)  // M / E at (t, s) = (kk, i)
            v = (i <= kk && kk < len && s_seg[i] == s_seg[kk]) ? ra[u] * expf(s_cs[kk] - s_cs[i]) : 0.f;
          else  // 7, 8: M / E at (t, s) = (i, kk), times d_s
            v = (kk <= i && i < len && s_seg[i] == s_seg[kk]) ? ra[u] * expf(s_cs[i] - s_cs[kk]) * s_d[kk] : 0.f;
        } else if (i < len) {
          if (KIND == 6) v = s_seg[i] == seg_end ? load_f(&ta[u]) * expf(cs_end - s_cs[i]) : 0.f;
          else if (KIND == 8) v = s_seg[i] == seg_prev ? ra[u] * expf(s_cs[i]) : 0.f;
          else if (KIND == 9) v = s_seg[i] == seg_end ? load_f(&ta[u]) * expf(cs_end - s_cs[i]) : 0.f;
        }
      }
      As[r][k] = v;
    }
#pragma unroll
    for (int u = 0; u < MM3_PER; ++u) {
      int k, col;
      b_idx(ph, u, k, col);
      const int j = j0 + col, kk = k0 + k;
      float v = 0.f;
      if (j < J && kk < K) {
        if (ph == 0) {
          if (KIND == 0 || KIND == 1) v = j < len ? load_f(&tb[u]) : 0.f;
          else if (KIND == 4 || KIND == 5 || KIND == 6) v = (KIND == 6 && kk >= len) ? 0.f : rb[u];
          else v = kk < len ? load_f(&tb[u]) : 0.f;  // 2, 3, 7, 8, 9
        } else {
          v = rb[u];
        }
      }
      Bs[k][col] = v;
    }
  };

  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  auto fa = [&](int r, int k) { return As[wr + r][k]; };
  auto fb = [&](int k, int col) { return Bs[k][wc + col]; };
  auto products = [&]() {
#if defined(SSM_EMULATION) && !defined(SSDB_EMULATE_MMA)
    for (int jt = 0; jt < 4; ++jt)
      for (int q = 0; q < 4; ++q) {
        const int r = wr + gq + (q >= 2 ? 8 : 0), col = wc + 8 * jt + 2 * tq + (q & 1);
        float sum = 0.f;
        for (int k = 0; k < MM_KS; ++k) {
          T av, bv;
          store_f(&av, As[r][k]);
          store_f(&bv, Bs[k][col]);
          sum += load_f(&av) * load_f(&bv);
        }
        acc[jt][q] += sum;
      }
#else
#pragma unroll
    for (int kk = 0; kk < MM_KS; kk += BMma<T>::K) BMma<T>::template step<4>(acc, fa, fb, kk);
#endif
  };
  using Ph0 = ssdb_int<0>;
  using Ph1 = ssdb_int<1>;
  const int n2 = nsteps - n1;
#if SSDB_MM3_NOPREFETCH
  for (int step = 0; step < n1; ++step) {
    load(Ph0{}, ks + step * MM_KS);
    __syncthreads();
    store(Ph0{}, ks + step * MM_KS);
    __syncthreads();
    products();
  }
  for (int step = 0; step < n2; ++step) {
    load(Ph1{}, step * MM_KS);
    __syncthreads();
    store(Ph1{}, step * MM_KS);
    __syncthreads();
    products();
  }
#else
  if (n1 > 0) load(Ph0{}, ks);
  else if (n2 > 0) load(Ph1{}, 0);
  for (int step = 0; step < n1; ++step) {
    __syncthreads();  // the previous slice's readers are done
    store(Ph0{}, ks + step * MM_KS);
    __syncthreads();
    if (step + 1 < n1) load(Ph0{}, ks + (step + 1) * MM_KS);  // in flight during this slice's products
    else if (n2 > 0) load(Ph1{}, 0);
    products();
  }
  for (int step = 0; step < n2; ++step) {
    __syncthreads();
    store(Ph1{}, step * MM_KS);
    __syncthreads();
    if (step + 1 < n2) load(Ph1{}, (step + 1) * MM_KS);
    products();
  }
#endif

  // Epilogue: the tile goes through shared memory, then element (i, j) = (i0 + e / 64, j0 + e % 64) per
  // thread, consecutive threads along j (coalesced stores and epilogue loads, no accumulator indexing).
  __syncthreads();  // the last slice's readers are done
#pragma unroll
  for (int jt = 0; jt < 4; ++jt)
#pragma unroll
    for (int q = 0; q < 4; ++q) sm.C[wr + gq + (q >= 2 ? 8 : 0)][wc + 8 * jt + 2 * tq + (q & 1)] = acc[jt][q];
  __syncthreads();
#pragma unroll 4
  for (int u = 0; u < MM_TILE * MM_TILE / MM3_THREADS; ++u) {
    const int e = tid + u * MM3_THREADS, r = e / MM_TILE, cc = e % MM_TILE;
    const int i = i0 + r, j = j0 + cc;
    if (i >= I || j >= J) continue;
    const float v = sm.C[r][cc];
    if (KIND == 0) out[mq + (i64)i * Q + j] = j <= i ? v : 0.f;
    else if (KIND == 1) out[mq + (i64)i * Q + j] = v;
    else if (KIND == 2 || KIND == 3) out[st + (i64)i * N + j] = v;
    else {
      if (i >= len) continue;
      const i64 xo = ((srow + i) * H + h) * P + j;  // (t, p) element of (B, L, H, P)
      const i64 no = ((srow + i) * H + h) * N + j;  // (t, n) element of (B, L, H, N)
      if (KIND == 4 || KIND == 5) out[xo] = v;
      else if (KIND == 6) out[xo] = s_d[i] * v + Dp[h * P + j] * dy[xo];
      else if (KIND == 7) {
        float y = v + Dp[h * P + j] * load_f(x + xo);
        if (s_seg[i] == seg_prev) y += expf(s_cs[i]) * hC[xo];
        out[xo] = load_f(dout + xo) * y * silu_grad_f(load_f(z + xo));
      } else if (KIND == 8) out[no] = v;
      else out[no] = s_d[i] * v;
    }
  }
}

// ssdb_pass (same arguments and results) for PN % 4 == 0 and 16-byte aligned buf / init / dinit: a thread per
// 4 consecutive (p, n) of one (b, h), float4 loads, the loads of SSDB_PASS_UNROLL chunks issued together.
// other / frop (session 8, v4's reverse pass; both null otherwise): ssdb_fro fused in. other = h0 (already the
// chunk-start states: the forward pass ran before), and the value stored into buf for chunk c (the final dh_c) is
// dotted with other's; frop[(b, c, h) * PN4 / SSM_WARP_SIZE + e4 / SSM_WARP_SIZE] = that warp's sum (a single
// writer per element; ssdb_dt4 sums the PN4 / SSM_WARP_SIZE partials of a (b, c, h)). Needs PN4 % SSM_WARP_SIZE
// == 0 (a warp lies within one (b, h) and the grid has no partial warp).
constexpr int SSDB_PASS_UNROLL = 8;
extern "C" __global__ void ssdb_pass2(int reverse, float* __restrict__ buf, const float* __restrict__ init,
                                      float* __restrict__ dinit, const float* __restrict__ other,
                                      float* __restrict__ frop, const float* __restrict__ cs,
                                      const int* __restrict__ seg, int batch, i64 L, int H, int PN, int Q, int nc) {
  const int PN4 = PN / 4;
  const i64 i = gtid();
  if (i >= (i64)batch * H * PN4) return;
  const int e4 = (int)(i % PN4);
  const i64 bh = i / PN4;
  const int h = (int)(bh % H);
  const i64 b = bh / H;
  float4 carry = make_float4(0.f, 0.f, 0.f, 0.f);
  if (init != nullptr) carry = reinterpret_cast<const float4*>(init)[i];
  float4* buf4 = reinterpret_cast<float4*>(buf);
  for (int k0 = 0; k0 < nc; k0 += SSDB_PASS_UNROLL) {
    float4 v[SSDB_PASS_UNROLL], w[SSDB_PASS_UNROLL];
    float dec[SSDB_PASS_UNROLL];
    i64 o[SSDB_PASS_UNROLL];
#pragma unroll
    for (int u = 0; u < SSDB_PASS_UNROLL; ++u) {
      const int k = k0 + u < nc ? k0 + u : nc - 1;  // clamped: loads stay in range, results unused
      const int c = reverse ? nc - 1 - k : k;
      const i64 t0 = (i64)c * Q, t1 = t0 + Q < L ? t0 + Q : L;
      const bool keep = seg[b * L + t1 - 1] == (t0 > 0 ? seg[b * L + t0 - 1] : 0);
      const float e = cs[bh * L + t1 - 1];
      dec[u] = keep ? expf(e) : 0.f;
      o[u] = ((b * nc + c) * H + h) * (i64)PN4 + e4;
      v[u] = buf4[o[u]];
      if (frop != nullptr) w[u] = reinterpret_cast<const float4*>(other)[o[u]];
    }
#pragma unroll
    for (int u = 0; u < SSDB_PASS_UNROLL; ++u) {
      if (k0 + u >= nc) break;
      buf4[o[u]] = carry;
      if (frop != nullptr) {  // warp-uniform
        const float f = warp_sum(carry.x * w[u].x + carry.y * w[u].y + carry.z * w[u].z + carry.w * w[u].w);
        if (threadIdx.x % SSM_WARP_SIZE == 0) frop[o[u] / SSM_WARP_SIZE] = f;
      }
      carry.x = dec[u] * carry.x + v[u].x;
      carry.y = dec[u] * carry.y + v[u].y;
      carry.z = dec[u] * carry.z + v[u].z;
      carry.w = dec[u] * carry.w + v[u].w;
    }
  }
  if (reverse && dinit != nullptr) reinterpret_cast<float4*>(dinit)[i] = carry;
}

// ssdb_dcs2 with the row and column walks issuing SSDB_DCS3_U loads of CB and DX at a time (dcs2 paid a
// global-memory latency per element of a column walk: up to Q in a row). Same sums in the same order.
constexpr int SSDB_DCS3_U = 8;
template <typename T>
__global__ void __launch_bounds__(256) ssdb_dcs3(const T* __restrict__ x, const float* __restrict__ dy,
                                                 const float* __restrict__ d, const float* __restrict__ cs,
                                                 const int* __restrict__ seg, const float* __restrict__ cb,
                                                 const float* __restrict__ dxd, const float* __restrict__ hC,
                                                 const float* __restrict__ dhB, float* __restrict__ dcs,
                                                 float* __restrict__ ddir, float* __restrict__ est, int batch, i64 L,
                                                 int H, int G, int P, int Q, int nc) {
  __shared__ float s_cs[SSDB_DCS_MAXQ], s_d[SSDB_DCS_MAXQ], s_row[SSDB_DCS_MAXQ], s_term[SSDB_DCS_MAXQ],
      s_state[SSDB_DCS_MAXQ];
  __shared__ int s_seg[SSDB_DCS_MAXQ];
  const i64 blk = blockIdx.x;  // (b, c, h)
  const int h = (int)(blk % H), c = (int)((blk / H) % nc);
  const i64 b = blk / ((i64)H * nc);
  const int g = h / (H / G);
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const i64 hrow = (b * H + h) * L + t0, srow = b * L + t0;
  const int seg_end = seg[srow + len - 1], seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float* cbm = cb + (((b * nc + c) * G + g) * (i64)Q) * Q;
  const float* dxm = dxd + (((b * nc + c) * H + h) * (i64)Q) * Q;
  for (int l = threadIdx.x; l < len; l += blockDim.x) {
    s_cs[l] = cs[hrow + l];
    s_d[l] = d[hrow + l];
    s_seg[l] = seg[srow + l];
  }
  __syncthreads();
  const float cs_end = s_cs[len - 1];
  const int lane = threadIdx.x % SSM_WARP_SIZE, warp = threadIdx.x / SSM_WARP_SIZE;
  const int nwarps = blockDim.x / SSM_WARP_SIZE;
  for (int t = warp; t < len; t += nwarps) {
    const int sg = s_seg[t];
    const float cs_t = s_cs[t];
    float row = 0.f, term = 0.f, state = 0.f;
    // SSDB_DCS3_U strided elements per lane at a time, their loads issued together (same sum order as dcs2).
    for (int s0 = lane; s0 <= t; s0 += SSDB_DCS3_U * SSM_WARP_SIZE) {
      float cv[SSDB_DCS3_U], dv[SSDB_DCS3_U];
#pragma unroll
      for (int u = 0; u < SSDB_DCS3_U; ++u) {
        const int s = s0 + u * SSM_WARP_SIZE <= t ? s0 + u * SSM_WARP_SIZE : t;
        cv[u] = cbm[(i64)t * Q + s];
        dv[u] = dxm[(i64)t * Q + s];
      }
#pragma unroll
      for (int u = 0; u < SSDB_DCS3_U; ++u) {
        const int s = s0 + u * SSM_WARP_SIZE;
        if (s <= t && s_seg[s] == sg) row += cv[u] * expf(cs_t - s_cs[s]) * s_d[s] * dv[u];
      }
    }
    const i64 xo = ((srow + t) * H + h) * P;
    if (sg == seg_prev)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) term += dy[xo + p] * hC[xo + p];
    if (sg == seg_end)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) state += load_f(x + xo + p) * dhB[xo + p];
    row = warp_sum(row);
    term = warp_sum(term);
    state = warp_sum(state);
    if (lane == 0) {
      s_row[t] = row;
      s_term[t] = sg == seg_prev ? term * expf(cs_t) : 0.f;
      s_state[t] = sg == seg_end ? state * expf(cs_end - cs_t) : 0.f;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const int sg = s_seg[t];
    const float cs_t = s_cs[t];
    float col = 0.f;
    // The run tp >= t of t's sequence (seg is monotone), SSDB_DCS3_U rows' loads in flight (same order as dcs2).
    for (int tp0 = t; tp0 < len && s_seg[tp0] == sg; tp0 += SSDB_DCS3_U) {
      float cv[SSDB_DCS3_U], dv[SSDB_DCS3_U];
#pragma unroll
      for (int u = 0; u < SSDB_DCS3_U; ++u) {
        const int tp = tp0 + u < len ? tp0 + u : len - 1;
        cv[u] = cbm[(i64)tp * Q + t];
        dv[u] = dxm[(i64)tp * Q + t];
      }
#pragma unroll
      for (int u = 0; u < SSDB_DCS3_U; ++u) {
        const int tp = tp0 + u;
        if (tp < len && s_seg[tp] == sg) col += cv[u] * expf(s_cs[tp] - cs_t) * dv[u];
      }
    }
    const float d_t = s_d[t], state = s_state[t];
    const float e = d_t * state;
    const i64 o = hrow + t;
    dcs[o] = s_row[t] - d_t * col + s_term[t] - e;
    ddir[o] = col + state;
    est[o] = e;
  }
}

// =====================================================================================================
// v4 (SSMCORE_SSD_BWD_IMPL=v4, 16-bit inputs): the decayed Q x Q matrix E_h[t,s] = DX_h[t,s] e^(cs_t-cs_s)
// (masked) never goes through global memory, and dB / dC are computed once per group instead of per head:
//   F[t,s] = sum_{h in group} d_{h,s} E_h[t,s]                       (per group, Q x Q, like the reference's dCB)
//   dC_t   = sum_s F[t,s] B_s + sum_h w_t e^(cs_{h,t}) h0_h^T dy_{h,t}      (one GEMM, K = Q + heads*P)
//   dB_s   = sum_t F[t,s] C_t + sum_h v_s e^(cs_{h,end}-cs_{h,s}) d_{h,s} dh_h^T x_{h,s}
// and the per-head row / column sums of CB o E that ssdb_dcs needs are reduced in the same kernel:
//   ssdb_fac4        (b, h, l)  fcC = w_t e^(cs_t), fcB = v_t e^(cs_end-cs_t) d_t (the state-term row scales)
//   ssdb_g4<T, 0>    (b, c, g, lower 64 x 64 tile (i, j)): loop over the group's heads: DX_h tile = dy_h x_h^T on
//                    tensor cores, then in registers E_h, F += d E_h, rowp[h, j][t] = sum_s CB E_h d,
//                    colp[h, i][s] = sum_t CB E_h; F written once (fp32, (B, nc, G, Q, Q), lower tiles)
//   ssdb_g4<T, 1>    dC tile (t, n) per group, phase 1 F B (K = positions <= the tile), phase 2 the state term
//   ssdb_g4<T, 2>    dB tile (s, n) per group, phase 1 F^T C (K = positions >= the tile), phase 2 the state term
//   ssdb_dcs4<T>     ssdb_dcs3 with the row / column walks replaced by sums of rowp / colp
// The GEMM core: 256 threads (2 x 4 warps of 32 x 16; g4_products also takes 32 x 32 warp tiles), 64 x 64
// output tile, K slices of 32 staged in shared
// memory as T (bf16 / f16, the rounding of the mma operands) with K contiguous, so every fragment register
// is one 32-bit shared load (no per-mma packing); register double-buffering of the next slice's loads.
// Rounding differs from v3 (F and the concatenated state terms are rounded to T once per group instead of
// per head); sums are in a fixed order (deterministic, no atomics).
#ifdef SSM_EMULATION
#define SSDB_ALIGN16 alignas(16)
#else
#define SSDB_ALIGN16 __align__(16)
#endif
constexpr int G4_TILE = 64, G4_KS = 32, G4_LD = G4_KS + 8;  // smem row: 80 bytes
// v5: the decay e^(cs_t - cs_s) factored as e^(cs_t - ref) e^(ref - cs_s) only where every |cs - ref| involved
// is at most this (both factors within [e^-80, e^80]: normal floats, no overflow, the product's relative error a
// few ulp); elsewhere the exact per-element exp.
#ifndef SSDB_FAC_MAX
#define SSDB_FAC_MAX 80.f
#endif

template <typename T>
struct G4Mma;
template <>
struct G4Mma<bf16_t> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816_bf16(c, a, b);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return pack_bf16x2(lo, hi); }
};
template <>
struct G4Mma<half_t> {
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_16816_f16(c, a, b);
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) { return pack_f16x2(lo, hi); }
};

// acc (the warp's 32 x 32 block at rows wr, columns wc of the tile) += As[rows][0..32) . Bs[cols][0..32)^T.
template <typename T, int WN>
__device__ __forceinline__ void g4_products(float (&acc)[2][WN][4], const T (*As)[G4_LD], const T (*Bs)[G4_LD], int wr,
                                            int wc, int gq, int tq) {
#if defined(SSM_EMULATION) && !defined(SSDB_EMULATE_MMA)
  for (int m = 0; m < 2; ++m)
    for (int n = 0; n < WN; ++n)
      for (int q = 0; q < 4; ++q) {
        const int r = wr + 16 * m + gq + (q >= 2 ? 8 : 0), col = wc + 8 * n + 2 * tq + (q & 1);
        float sum = 0.f;
        for (int k = 0; k < G4_KS; ++k) sum += load_f(&As[r][k]) * load_f(&Bs[col][k]);
        acc[m][n][q] += sum;
      }
#else
#pragma unroll
  for (int k0 = 0; k0 < G4_KS; k0 += 16) {
    uint32_t af[2][4], bfr[WN][2];
#pragma unroll
    for (int m = 0; m < 2; ++m) {
      const int r = wr + 16 * m + gq;
      af[m][0] = *reinterpret_cast<const uint32_t*>(&As[r][k0 + 2 * tq]);
      af[m][1] = *reinterpret_cast<const uint32_t*>(&As[r + 8][k0 + 2 * tq]);
      af[m][2] = *reinterpret_cast<const uint32_t*>(&As[r][k0 + 8 + 2 * tq]);
      af[m][3] = *reinterpret_cast<const uint32_t*>(&As[r + 8][k0 + 8 + 2 * tq]);
    }
#pragma unroll
    for (int n = 0; n < WN; ++n) {
      const int col = wc + 8 * n + gq;
      bfr[n][0] = *reinterpret_cast<const uint32_t*>(&Bs[col][k0 + 2 * tq]);
      bfr[n][1] = *reinterpret_cast<const uint32_t*>(&Bs[col][k0 + 8 + 2 * tq]);
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n) G4Mma<T>::mma(acc[m][n], af[m], bfr[n]);
  }
#endif
}

// fcC[b, h, t] = [seg_t == seg_prev] e^(cs_t), fcB[b, h, t] = [seg_t == seg_end] e^(cs_end - cs_t) d_t.
extern "C" __global__ void ssdb_fac4(const float* __restrict__ d, const float* __restrict__ cs,
                                     const int* __restrict__ seg, float* __restrict__ fcC, float* __restrict__ fcB,
                                     int batch, i64 L, int H, int Q) {
  const i64 i = gtid();
  if (i >= (i64)batch * H * L) return;
  const i64 t = i % L, bh = i / L, b = bh / H;
  const i64 t0 = (t / Q) * Q, t1 = t0 + Q < L ? t0 + Q : L;
  const int sg = seg[b * L + t], seg_end = seg[b * L + t1 - 1], seg_prev = t0 > 0 ? seg[b * L + t0 - 1] : 0;
  const float c = cs[i];
  fcC[i] = sg == seg_prev ? __expf(c) : 0.f;
  fcB[i] = sg == seg_end ? __expf(cs[bh * L + t1 - 1] - c) * d[i] : 0.f;
}

// KIND 0: F, rowp, colp (see above); grid (nc * G * ntri, 1, B) with ntri = nt (nt + 1) / 2, nt = ceil(Q / 64).
// KIND 1 / 2: dC / dB per group into out (B, L, G, N) fp32; grid (nc * G * nt * ceil(N / 64), 1, B).
// rowp, colp: (B, nc, H, nt, Q) fp32, only the (j <= i) parts written.
template <typename T, int KIND>
__global__ void __launch_bounds__(256, KIND % 8 == 0 ? 2 : 3) ssdb_g4(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const float* __restrict__ dy,
    const float* __restrict__ d, const float* __restrict__ cs, const int* __restrict__ seg,
    const float* __restrict__ cb, float* __restrict__ F, const float* __restrict__ h0, const float* __restrict__ dh,
    const float* __restrict__ fcC, const float* __restrict__ fcB, float* __restrict__ out, float* __restrict__ rowp,
    float* __restrict__ colp, int batch, i64 L, int H, int G, int P, int N, int Q, int nc) {
  constexpr int KD = KIND % 8;  // KIND 8: v5's KIND 0 (see the v5 section)
  constexpr bool V5 = KIND >= 8;
  SSDB_ALIGN16 __shared__ T As[V5 ? 2 : 1][G4_TILE][G4_LD];  // v5: double-buffered slices
  SSDB_ALIGN16 __shared__ T Bs[V5 ? 2 : 1][G4_TILE][G4_LD];
  const int nt = (Q + G4_TILE - 1) / G4_TILE, hpg = H / G;
  int c, g, ti, tj;
  {
    int r = (int)blockIdx.x;
    if (KD == 0) {
      const int ntri = nt * (nt + 1) / 2;
      int tri = r % ntri;
      r /= ntri;
      ti = 0;
      while (tri > ti) {
        tri -= ti + 1;
        ++ti;
      }
      tj = tri;
    } else {
      const int ntn = (N + G4_TILE - 1) / G4_TILE;
      tj = r % ntn;
      r /= ntn;
      ti = r % nt;
      r /= nt;
    }
    g = r % G;
    c = r / G;
  }
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * G4_TILE, j0 = tj * G4_TILE;
  if (i0 >= len) return;  // rows past the chunk: nothing reads them
  const i64 srow = b * L + t0;
  const int HP = H * P, GN = G * N, KH = hpg * P;
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;  // the group's Q x Q block (CB, F)
  const i64 st_g = ((b * nc + c) * H + (i64)g * hpg) * (i64)P * N;  // the group's first head's (P, N) state
  // 256 threads, 8 warps of 32 x 16 (2 x 4) over the 64 x 64 tile (registers: KD 0 at 2 blocks per SM,
  // KD 1 / 2 at 3).
  constexpr int NTH = 256, PER = G4_TILE * G4_KS / NTH, WN = 2;
  constexpr int RSTEP = NTH / 32, KSTEP = NTH / 64;  // k-fast: row step per element; row-fast: k step
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 32 * (w & 1), wc = 8 * WN * (w >> 1);

  // Steps: KD 0: (head, P slice); KD 1 / 2: phase 1 position slices, then phase 2 (head, p) slices.
  const int nsl = (P + G4_KS - 1) / G4_KS;
  int ks1 = 0, ke1 = 0;
  if (KD == 1) ke1 = i0 + G4_TILE < len ? i0 + G4_TILE : len;  // s <= t
  if (KD == 2) { ks1 = i0; ke1 = len; }                          // t >= s
  // KD 1 / 2 split over the group's heads (grid y, for parallelism at small batch): split y takes heads
  // [y * hps, (y + 1) * hps) of phase 2 and writes its partial to out + y * B * L * G * N; split 0 also phase 1.
  const int hps = (hpg + (int)gridDim.y - 1) / (int)gridDim.y;
  const int y_lo = (int)blockIdx.y * hps, y_hi = y_lo + hps;
  const int kh_lo = (y_lo < hpg ? y_lo : hpg) * P, kh_hi = (y_hi < hpg ? y_hi : hpg) * P;
  const int n1 = (KD == 0 || blockIdx.y > 0) ? 0 : (ke1 - ks1 + G4_KS - 1) / G4_KS;
  const int nsteps = KD == 0 ? hpg * nsl : n1 + (kh_hi - kh_lo + G4_KS - 1) / G4_KS;

  // Per step, the raw operand values of this thread (16 of A, 16 of B, and for phase 2 the row scale).
  float ra[PER], rb[PER], rf[PER];
  // Element u of this thread: k-fast (row = tid / 32 + 4u, k = tid % 32) or row-fast (row = tid % 64,
  // k = tid / 64 + 2u); the mapping follows the operand's contiguous global axis.
  auto load = [&](int step) {
    if (KD == 0) {
      const int hh = step / nsl, k0 = (step % nsl) * G4_KS;
      const int h = g * hpg + hh, kk_ = k0 + lane;
      const int r0 = tid >> 5;
      const float* dyb = dy + (srow + i0) * HP + (i64)h * P;
      const T* xb = x + (srow + j0) * HP + (i64)h * P;
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        // v5: k pairs (2 (tid % 16) + u % 2, packed into one 32-bit shared store), rows tid / 16 + 16 (u / 2)
        const int r = V5 ? (tid >> 4) + 16 * (u >> 1) : r0 + RSTEP * u;
        const int kk = V5 ? k0 + 2 * (tid & 15) + (u & 1) : kk_;
        const bool ka = kk < P;
        ra[u] = (ka && i0 + r < len) ? dyb[r * HP + kk] : 0.f;
        rb[u] = (ka && j0 + r < len) ? load_f(xb + r * HP + kk) : 0.f;
      }
    } else if (step < n1) {
      const int k0 = ks1 + step * G4_KS;
      const float* Fb = F + mqg;
      if (KD == 1) {  // A(t, s) = F[t][s], k-fast
        const int kk = k0 + lane, r0 = tid >> 5;
#pragma unroll
        for (int u = 0; u < PER; ++u) {
          const int r = r0 + RSTEP * u;
          ra[u] = (kk < ke1 && i0 + r < len) ? Fb[(i0 + r) * Q + kk] : 0.f;
        }
      } else {  // A(s, t) = F[t][s], row-fast
        const int r = tid & 63, kb = k0 + (tid >> 6);
#pragma unroll
        for (int u = 0; u < PER; ++u) {
          const int kk = kb + KSTEP * u;
          ra[u] = (kk < ke1 && i0 + r < len) ? Fb[kk * Q + i0 + r] : 0.f;
        }
      }
      // B(k = position, n) = B / C row, row-fast over n
      const T* src = (KD == 1 ? Bm : Cm) + srow * GN + (i64)g * N + j0;
      const int n = tid & 63, kb = k0 + (tid >> 6);
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int kk = kb + KSTEP * u;
        rb[u] = (kk < ke1 && j0 + n < N) ? load_f(src + kk * GN + n) : 0.f;
      }
    } else {
      const int k0 = kh_lo + (step - n1) * G4_KS;
      {  // A(row, (h, p)) = dy (dC) or x (dB) times the row scale, k-fast
        const int kk = k0 + lane, r0 = tid >> 5;
        const int hh = kk < kh_hi ? kk / P : 0;
        const float* fac = (KD == 1 ? fcC : fcB) + (b * H + (i64)g * hpg + hh) * L + t0 + i0;
        const i64 ob = (srow + i0) * HP + (i64)g * KH;
        const float* dyb = dy + ob;
        const T* xb = x + ob;
#pragma unroll
        for (int u = 0; u < PER; ++u) {
          const int r = r0 + RSTEP * u;
          const bool in = kk < kh_hi && i0 + r < len;
          ra[u] = in ? (KD == 1 ? dyb[r * HP + kk] : load_f(xb + r * HP + kk)) : 0.f;
          rf[u] = in ? fac[r] : 0.f;
        }
      }
      // B((h, p), n) = h0 (dC) or dh (dB) of the group's heads: a (KH, N) matrix, row-fast over n
      const float* src = (KD == 1 ? h0 : dh) + st_g + j0;
      const int n = tid & 63, kb = k0 + (tid >> 6);
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int kk = kb + KSTEP * u;
        rb[u] = (kk < kh_hi && j0 + n < N) ? src[kk * N + n] : 0.f;
      }
    }
  };
  auto store = [&](int step, int sb) {
    if (V5) {  // KIND 0 only: both operands k-fast pairs
#pragma unroll
      for (int up = 0; up < PER / 2; ++up) {
        const int r = (tid >> 4) + 16 * up, k = 2 * (tid & 15);
        *reinterpret_cast<uint32_t*>(&As[sb][r][k]) = G4Mma<T>::pack(ra[2 * up], ra[2 * up + 1]);
        *reinterpret_cast<uint32_t*>(&Bs[sb][r][k]) = G4Mma<T>::pack(rb[2 * up], rb[2 * up + 1]);
      }
      return;
    }
    const bool p2 = KD != 0 && step >= n1;
    const bool a_rowfast = KD == 2 && !p2;
    const bool b_rowfast = KD != 0;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int r = a_rowfast ? (tid & 63) : (tid >> 5) + RSTEP * u, k = a_rowfast ? (tid >> 6) + KSTEP * u : lane;
      T v;
      store_f(&v, p2 ? ra[u] * rf[u] : ra[u]);
      As[sb][r][k] = v;
    }
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int r = b_rowfast ? (tid & 63) : (tid >> 5) + RSTEP * u, k = b_rowfast ? (tid >> 6) + KSTEP * u : lane;
      T v;
      store_f(&v, rb[u]);
      Bs[sb][r][k] = v;
    }
  };

  float acc[2][WN][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < WN; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
  auto products = [&](int sb) { g4_products<T, WN>(acc, As[sb], Bs[sb], wr, wc, gq, tq); };

  if (KD == 0) {
    // Head-independent parts of the epilogue: CB and the mask (s <= t < len, same sequence) per element.
    __shared__ float s_rcs[G4_TILE], s_ccs[G4_TILE], s_cd[G4_TILE];
    __shared__ float red_row[G4_TILE][17], red_col[G4_TILE][17];
    __shared__ float s_cb[G4_TILE][G4_TILE + 1];  // the masked CB tile
    float Facc[2][WN][4];
    uint32_t msk = 0;
    const i64 bch0 = (b * nc + c) * (i64)H + (i64)g * hpg;  // (b, c, first head of the group)
    // Per-head chunk scalars, loaded with the head's first slice.
    float nrcs = 0.f, nd = 0.f;
    auto load_sc = [&](int hh) {
      const i64 hrow = (b * H + (i64)g * hpg + hh) * L + t0;
      const int l = tid & 63;
      if (tid < 64) nrcs = i0 + l < len ? cs[hrow + i0 + l] : 0.f;
      else if (tid < 128) nrcs = j0 + l < len ? cs[hrow + j0 + l] : 0.f;
      nd = (tid >= 64 && tid < 128 && j0 + l < len) ? d[hrow + j0 + l] : 0.f;
    };
    auto store_sc = [&]() {
      const int l = tid & 63;
      if (tid < 64) s_rcs[l] = nrcs;
      else if (tid < 128) {
        s_ccs[l] = nrcs;
        s_cd[l] = nd;
      }
    };
    auto epilogue = [&](int hh) {
      float rs[2][2] = {{0.f, 0.f}, {0.f, 0.f}}, cl[WN][2];
#pragma unroll
      for (int n = 0; n < WN; ++n) cl[n][0] = cl[n][1] = 0.f;
      // v4: e^(cs_t - cs_s) per element. v5: e^(cs_t - ref) e^(ref - cs_s) (ref = cs of the tile's first column):
      // 8 exp per thread instead of 32, when this thread's |cs - ref| <= SSDB_FAC_MAX (no overflow / loss).
      auto elems = [&](auto FAC) {
        constexpr bool fac = decltype(FAC)::value;
        float er[2][2], ec[WN][2];
        if (fac) {
          const float ref = s_ccs[0];
#pragma unroll
          for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) er[m][hf] = __expf(s_rcs[wr + 16 * m + gq + 8 * hf] - ref);
#pragma unroll
          for (int n = 0; n < WN; ++n)
#pragma unroll
            for (int j = 0; j < 2; ++j) ec[n][j] = __expf(ref - s_ccs[wc + 8 * n + 2 * tq + j]);
        }
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int n = 0; n < WN; ++n)
#pragma unroll
            for (int q = 0; q < 4; ++q) {
              const int r = wr + 16 * m + gq + (q >= 2 ? 8 : 0), cc = wc + 8 * n + 2 * tq + (q & 1);
              float e = 0.f;
              if (msk & (1u << (16 * m + 4 * n + q)))
                e = fac ? acc[m][n][q] * er[m][q >> 1] * ec[n][q & 1] : acc[m][n][q] * __expf(s_rcs[r] - s_ccs[cc]);
              const float ed = e * s_cd[cc], cbe = s_cb[r][cc] * e;
              Facc[m][n][q] += ed;
              rs[m][q >> 1] += cbe * s_cd[cc];
              cl[n][q & 1] += cbe;
              acc[m][n][q] = 0.f;
            }
      };
      bool fac = false;
      if (V5) {
        const float ref = s_ccs[0];
        fac = true;
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) fac = fac && fabsf(s_rcs[wr + 16 * m + gq + 8 * hf] - ref) <= SSDB_FAC_MAX;
#pragma unroll
        for (int n = 0; n < WN; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j) fac = fac && fabsf(s_ccs[wc + 8 * n + 2 * tq + j] - ref) <= SSDB_FAC_MAX;
      }
      if (fac) elems(ssdb_int<1>{});
      else elems(ssdb_int<0>{});
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) red_row[wr + 16 * m + gq + 8 * hf][(w >> 1) * 4 + tq] = rs[m][hf];  // 16 per row
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) red_col[wc + 8 * n + 2 * tq + j][(w & 1) * 8 + gq] = cl[n][j];
      __syncthreads();
      const i64 bch = bch0 + hh;
      const int l = tid & 63;
      if (tid < 64) {
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 4 * (NTH / 64); ++k) v += red_row[l][k];
        if (i0 + l < Q) rowp[(bch * nt + tj) * Q + i0 + l] = v;
      } else if (tid < 128) {
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 16; ++k) v += red_col[l][k];
        if (j0 + l < Q) colp[(bch * nt + ti) * Q + j0 + l] = v;
      }
    };
    load(0);  // the first slice and the first head's scalars in flight while CB and the mask are staged
    load_sc(0);
    for (int e = tid; e < G4_TILE * G4_TILE; e += NTH) {
      const int r = e / G4_TILE, cc = e % G4_TILE, t = i0 + r, s = j0 + cc;
      s_cb[r][cc] = (s <= t && t < len) ? cb[mqg + (i64)t * Q + s] : 0.f;
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int t = i0 + wr + 16 * m + gq + (q >= 2 ? 8 : 0), s = j0 + wc + 8 * n + 2 * tq + (q & 1);
          const bool on = s <= t && t < len && seg[srow + s] == seg[srow + t];
          Facc[m][n][q] = 0.f;
          if (on) msk |= 1u << (16 * m + 4 * n + q);
        }
    if (V5) {  // double-buffered slices: one barrier per slice; slice step + 1 loads during slice step's mma
      // Iteration step: the products (and a head's epilogue) of slice step - 1 while the loads of slice step land,
      // then slice step into the other buffer; the epilogue's barrier orders its scalar reads before store_sc.
      for (int step = 0; step <= nsteps; ++step) {
        if (step > 0) {
          products((step - 1) & 1);
          if ((step - 1) % nsl == nsl - 1) epilogue((step - 1) / nsl);
        }
        if (step < nsteps) {
          store(step, step & 1);
          if (step % nsl == 0) store_sc();
        }
        __syncthreads();
        if (step + 1 < nsteps) {
          load(step + 1);
          if ((step + 1) % nsl == 0) load_sc((step + 1) / nsl);
        }
      }
    } else {
      for (int step = 0; step < nsteps; ++step) {
        const int hh = step / nsl;
        __syncthreads();
        store(step, 0);
        if (step % nsl == 0) store_sc();
        __syncthreads();
        if (step + 1 < nsteps) {
          load(step + 1);
          if ((step + 1) % nsl == 0) load_sc((step + 1) / nsl);
        }
        products(0);
        if (step % nsl == nsl - 1) epilogue(hh);
      }
    }
    // F tile (lower tiles only; zeros above the diagonal and past the chunk end).
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int t = i0 + wr + 16 * m + gq + (q >= 2 ? 8 : 0), s = j0 + wc + 8 * n + 2 * tq + (q & 1);
          if (t < Q && s < Q) F[mqg + (i64)t * Q + s] = Facc[m][n][q];
        }
  } else {
    load(0);
    for (int step = 0; step < nsteps; ++step) {
      __syncthreads();
      store(step, 0);
      __syncthreads();
      if (step + 1 < nsteps) load(step + 1);
      products(0);
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int r = i0 + wr + 16 * m + gq + (q >= 2 ? 8 : 0), col = j0 + wc + 8 * n + 2 * tq + (q & 1);
          if (r < len && col < N)
            out[blockIdx.y * ((i64)batch * L * GN) + ((srow + r) * G + g) * (i64)N + col] = acc[m][n][q];
        }
  }
}

// ssdb_dcs3 (same outputs) with the row sums of CB o E d and the column sums of CB o E taken from ssdb_g4<T, 0>'s
// per-tile partials (rowp, colp: (B, nc, H, nt, Q)) instead of walking the Q x Q matrices.
template <typename T>
__global__ void __launch_bounds__(256) ssdb_dcs4(const T* __restrict__ x, const float* __restrict__ dy,
                                                 const float* __restrict__ d, const float* __restrict__ cs,
                                                 const int* __restrict__ seg, const float* __restrict__ rowp,
                                                 const float* __restrict__ colp, const float* __restrict__ hC,
                                                 const float* __restrict__ dhB, const float* __restrict__ termp,
                                                 const float* __restrict__ statep, int ntp, float* __restrict__ dcs,
                                                 float* __restrict__ ddir, float* __restrict__ est, int batch, i64 L,
                                                 int H, int P, int Q, int nc) {
  __shared__ float s_term[SSDB_DCS_MAXQ], s_state[SSDB_DCS_MAXQ];
  const i64 blk = blockIdx.x;  // (b, c, h)
  const int h = (int)(blk % H), c = (int)((blk / H) % nc);
  const i64 b = blk / ((i64)H * nc);
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0), nt = (Q + G4_TILE - 1) / G4_TILE;
  const i64 hrow = (b * H + h) * L + t0, srow = b * L + t0;
  const int seg_end = seg[srow + len - 1], seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float cs_end = cs[hrow + len - 1];
  const float* rp = rowp + ((b * nc + c) * H + h) * (i64)nt * Q;
  const float* cp = colp + ((b * nc + c) * H + h) * (i64)nt * Q;
  const int lane = threadIdx.x % SSM_WARP_SIZE, warp = threadIdx.x / SSM_WARP_SIZE;
  const int nwarps = blockDim.x / SSM_WARP_SIZE;
  // The p sums <dy_t, hC_t>, <x_t, dhB_t>: from ssdb_h4<T, 6 / 7>'s per-tile partials when given, else here.
  const i64 tpo = ((b * nc + c) * H + h) * (i64)ntp * Q;
  if (termp != nullptr) {
    for (int t = threadIdx.x; t < len; t += blockDim.x) {
      const int sg = seg[srow + t];
      float term = 0.f, state = 0.f;
      for (int k = 0; k < ntp; ++k) {
        term += termp[tpo + (i64)k * Q + t];
        state += statep[tpo + (i64)k * Q + t];
      }
      const float cs_t = cs[hrow + t];
      s_term[t] = sg == seg_prev ? term * expf(cs_t) : 0.f;
      s_state[t] = sg == seg_end ? state * expf(cs_end - cs_t) : 0.f;
    }
  }
  for (int t = warp; t < (termp != nullptr ? 0 : len); t += nwarps) {
    const int sg = seg[srow + t];
    float term = 0.f, state = 0.f;
    const i64 xo = ((srow + t) * H + h) * P;
    if (sg == seg_prev)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) term += dy[xo + p] * hC[xo + p];
    if (sg == seg_end)
      for (int p = lane; p < P; p += SSM_WARP_SIZE) state += load_f(x + xo + p) * dhB[xo + p];
    term = warp_sum(term);
    state = warp_sum(state);
    if (lane == 0) {
      const float cs_t = cs[hrow + t];
      s_term[t] = sg == seg_prev ? term * expf(cs_t) : 0.f;
      s_state[t] = sg == seg_end ? state * expf(cs_end - cs_t) : 0.f;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < len; t += blockDim.x) {
    const int it = t / G4_TILE, ilast = (len - 1) / G4_TILE;
    float row = 0.f, col = 0.f;
    for (int j = 0; j <= it; ++j) row += rp[(i64)j * Q + t];
    for (int i = it; i <= ilast; ++i) col += cp[(i64)i * Q + t];
    const float d_t = d[hrow + t], state = s_state[t];
    const float e = d_t * state;
    const i64 o = hrow + t;
    dcs[o] = row - d_t * col + s_term[t] - e;
    ddir[o] = col + state;
    est[o] = e;
  }
}

// Per-head products on the ssdb_g4 core (v4); grid (nc * H * tiles_i * tiles_j, 1, B), 128 threads:
//   KIND 3  dx[s, p]   (Q x P)  phase 1: sum_{t >= s} M[t,s] dy_t (M = CB e^(cs_t-cs_s), masked),
//                               phase 2: (B_s v_s e^(cs_end-cs_s)) . dh[p, :]; d_s acc + D dy stored as T into
//                               out (the caller's dx dtype: out points to a T array)
//   KIND 4  S[p, n]    (P x N)  sum_s x_s[p] d_s e^(cs_end-cs_s) v_s B_s[n]       (chunk states, ssdb_mm KIND 2)
//   KIND 5  Gl[p, n]   (P x N)  sum_t dy_t[p] e^(cs_t) w_t C_t[n]                 (ssdb_mm KIND 3)
//   KIND 6  termp[t]   sum over the p tile of (C_t . h0[p, :]) dy_t[p]  ((B, nc, H, tiles_p, Q); for ssdb_dcs4)
//   KIND 7  statep[t]  sum over the p tile of (B_t . dh[p, :]) x_t[p]
// Every operand element is base[row * si + k * sk] with one of si, sk = 1: the staging walks the unit-stride
// axis with consecutive threads; per-position factors are precomputed once per block in shared memory.
#ifndef SSDB_H4_MINB
#define SSDB_H4_MINB 3
#endif
template <typename T, int KIND>
__global__ void __launch_bounds__(256, (KIND % 8 == 6 || KIND % 8 == 7) ? 2 : SSDB_H4_MINB) ssdb_h4(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const float* __restrict__ dy,
    const float* __restrict__ Dp, const float* __restrict__ d, const float* __restrict__ cs,
    const int* __restrict__ seg, const float* __restrict__ cb, const float* __restrict__ h0,
    const float* __restrict__ dh, float* __restrict__ out, float* __restrict__ aux, int batch, i64 L, int H, int G,
    int P, int N, int Q, int nc) {
  constexpr int KD = KIND % 8;  // KIND 11: v5's KIND 3 (see the v5 section)
  constexpr bool V5 = KIND >= 8;
  SSDB_ALIGN16 __shared__ T As[V5 ? 2 : 1][G4_TILE][G4_LD];  // v5: double-buffered slices
  SSDB_ALIGN16 __shared__ T Bs[V5 ? 2 : 1][G4_TILE][G4_LD];
  __shared__ float s_cs[MM3_MAXQ], s_fac[MM3_MAXQ];
  __shared__ float s_ek[V5 ? MM3_MAXQ : 1];  // v5 KIND 3: e^(cs_t - ref), ref = cs of the tile's first row
  __shared__ int s_seg[MM3_MAXQ], s_ok;
  constexpr bool QROWS = KD == 3 || KD == 6 || KD == 7;  // output rows are positions
  const int I = QROWS ? Q : P, J = (KD == 4 || KD == 5) ? N : P;
  const int nti = (I + G4_TILE - 1) / G4_TILE, ntj = (J + G4_TILE - 1) / G4_TILE;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int ti = rb_ % nti;
  rb_ /= nti;
  const int h = rb_ % H, c = rb_ / H, g = h / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * G4_TILE, j0 = tj * G4_TILE;
  if (QROWS && i0 >= len) {  // rows past the chunk's end: nothing to compute (dD partials are 0)
    if (KD == 3 && aux != nullptr && threadIdx.x < G4_TILE && j0 + (int)threadIdx.x < P)
      aux[(((b * nc + c) * H + h) * (i64)nti + ti) * P + j0 + threadIdx.x] = 0.f;
    return;
  }
  const i64 srow = b * L + t0, hrow = (b * H + h) * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;
  // 256 threads: 8 warps of 32 x 16 (2 x 4) over the 64 x 64 tile.
  constexpr int NTH = 256, PER = G4_TILE * G4_KS / NTH, WN = 2, RSTEP = NTH / 32, KSTEP = NTH / 64;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 32 * (w & 1), wc = 8 * WN * (w >> 1);


  // v5 element u of this thread (k pairs u = 2 up, 2 up + 1, stored as one 32-bit word): row-fast: row tid % 64,
  // k = 2 (tid / 64) + 8 (u / 2) + u % 2; k-fast: row tid / 16 + 16 (u / 2), k = 2 (tid % 16) + u % 2.
  auto v5k_rf = [&](int u) { return 2 * (tid >> 6) + 8 * (u >> 1) + (u & 1); };
  auto v5r_kf = [&](int u) { return (tid >> 4) + 16 * (u >> 1); };
  auto v5k_kf = [&](int u) { return 2 * (tid & 15) + (u & 1); };
  int ks1 = 0, ke1 = len, n2 = 0;
  if (KD == 3) {
    ks1 = i0;
    n2 = (N + G4_KS - 1) / G4_KS;
  }
  if (KD == 6 || KD == 7) ke1 = N;
  const int n1 = (ke1 - ks1 + G4_KS - 1) / G4_KS, nsteps = n1 + n2;

  float ra[PER], rbv[PER];
  // dst[u] = base[r * si + k * sk] for this thread's elements u of the slice at k0 (rows r < rlim, k < klim);
  // RF: row-fast mapping (si == 1), else k-fast (sk == 1).
  auto ldop = [&](auto RF, auto base, int si, int sk, int rlim, int klim, int k0, float(&dst)[PER]) {
    constexpr bool rf = decltype(RF)::value;
    if (rf) {
      const int r = tid & 63, kb = k0 + (tid >> 6);
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int kk = V5 ? k0 + v5k_rf(u) : kb + KSTEP * u;
        dst[u] = (r < rlim && kk < klim) ? load_f(base + r + kk * sk) : 0.f;
      }
    } else {
      const int r0 = tid >> 5;
#pragma unroll
      for (int u = 0; u < PER; ++u) {
        const int r = V5 ? v5r_kf(u) : r0 + RSTEP * u, kk = k0 + (V5 ? v5k_kf(u) : lane);
        dst[u] = (r < rlim && kk < klim) ? load_f(base + r * si + kk) : 0.f;
      }
    }
  };
  using RowF = ssdb_int<1>;
  using KF = ssdb_int<0>;
  auto load = [&](int step) {
    if (step < n1) {
      const int k0 = ks1 + step * G4_KS;
      if (KD == 3) {
        ldop(RowF{}, cb + mqg + i0, 1, Q, len - i0, len, k0, ra);                         // CB[t][s]
        ldop(RowF{}, dy + srow * HP + (i64)h * P + j0, 1, HP, P - j0, len, k0, rbv);      // dy[t][p]
      } else if (KD == 4 || KD == 5) {
        if (KD == 4) ldop(RowF{}, x + srow * HP + (i64)h * P + i0, 1, HP, P - i0, len, k0, ra);
        else ldop(RowF{}, dy + srow * HP + (i64)h * P + i0, 1, HP, P - i0, len, k0, ra);
        ldop(RowF{}, (KD == 4 ? Bm : Cm) + srow * GN + (i64)g * N + j0, 1, GN, N - j0, len, k0, rbv);
      } else {
        ldop(KF{}, (KD == 6 ? Cm : Bm) + (srow + i0) * GN + (i64)g * N, GN, 1, len - i0, N, k0, ra);
        ldop(KF{}, (KD == 6 ? h0 : dh) + st + (i64)j0 * N, N, 1, P - j0, N, k0, rbv);
      }
    } else {  // KD 3 phase 2: B_s (scaled at the store) and dh[p][n]
      const int k0 = (step - n1) * G4_KS;
      ldop(KF{}, Bm + (srow + i0) * GN + (i64)g * N, GN, 1, len - i0, N, k0, ra);
      ldop(KF{}, dh + st + (i64)j0 * N, N, 1, P - j0, N, k0, rbv);
    }
  };
  bool fac_ok = false;  // v5 KIND 3: s_ok
  float er_s = 1.f;  // v5 KIND 3: e^(ref - cs_s) of this thread's row s = i0 + tid % 64 (phase 1, row-fast)
  auto store = [&](int step, int sb) {
    const bool p2 = step >= n1;
    if (V5) {  // KIND 3 only
      const int k0 = p2 ? (step - n1) * G4_KS : ks1 + step * G4_KS;
#pragma unroll
      for (int up = 0; up < PER / 2; ++up) {
        const int r = p2 ? v5r_kf(2 * up) : tid & 63, k = p2 ? v5k_kf(2 * up) : v5k_rf(2 * up);
        float v[2];
#pragma unroll
        for (int o = 0; o < 2; ++o) {
          const int kk = k0 + k + o, s = i0 + r;
          if (!p2) {  // M[t = kk][s]
            const bool on = s <= kk && kk < len && s_seg[s] == s_seg[kk];
            v[o] = on ? (fac_ok ? ra[2 * up + o] * s_ek[kk] * er_s : ra[2 * up + o] * __expf(s_cs[kk] - s_cs[s])) : 0.f;
          } else {
            v[o] = ra[2 * up + o] * s_fac[s < Q ? s : Q - 1];
          }
        }
        *reinterpret_cast<uint32_t*>(&As[sb][r][k]) = G4Mma<T>::pack(v[0], v[1]);
        *reinterpret_cast<uint32_t*>(&Bs[sb][p2 ? r : tid & 63][k]) = G4Mma<T>::pack(rbv[2 * up], rbv[2 * up + 1]);
      }
      return;
    }
    const int k0 = p2 ? (step - n1) * G4_KS : ks1 + step * G4_KS;
    const bool arf = !p2 && KD <= 5, brf = !p2 && KD <= 5;
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int r = arf ? (tid & 63) : (tid >> 5) + RSTEP * u, k = arf ? (tid >> 6) + KSTEP * u : lane;
      float v = ra[u];
      const int kk = k0 + k;
      if (KD == 3 && !p2) {  // M[t = kk][s = i0 + r]
        const int s = i0 + r;
        v = (s <= kk && kk < len && s_seg[s] == s_seg[kk]) ? v * expf(s_cs[kk] - s_cs[s]) : 0.f;
      } else if (KD == 3) {
        v *= s_fac[i0 + r < Q ? i0 + r : Q - 1];
      } else if (KD == 4 || KD == 5) {
        v *= s_fac[kk < Q ? kk : Q - 1];
      }
      T tv;
      store_f(&tv, v);
      As[sb][r][k] = tv;
    }
#pragma unroll
    for (int u = 0; u < PER; ++u) {
      const int r = brf ? (tid & 63) : (tid >> 5) + RSTEP * u, k = brf ? (tid >> 6) + KSTEP * u : lane;
      T tv;
      store_f(&tv, rbv[u]);
      Bs[sb][r][k] = tv;
    }
  };

  float acc[2][WN][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < WN; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
  if (nsteps > 0) load(0);  // in flight while the chunk scalars are staged
  for (int l = tid; l < Q; l += NTH) {
    const bool in = l < len;
    s_cs[l] = in ? cs[hrow + l] : 0.f;
    s_seg[l] = in ? seg[srow + l] : -1;
  }
  __syncthreads();
  const int seg_end = s_seg[len - 1], seg_prev = t0 > 0 ? seg[srow - 1] : 0;
  const float cs_end = s_cs[len - 1];
  if (KD == 3 || KD == 4 || KD == 5) {
    for (int l = tid; l < Q; l += NTH) {
      float f = 0.f;
      if (l < len) {
        if (KD == 3) f = s_seg[l] == seg_end ? expf(cs_end - s_cs[l]) : 0.f;
        if (KD == 4) f = s_seg[l] == seg_end ? d[hrow + l] * expf(cs_end - s_cs[l]) : 0.f;
        if (KD == 5) f = s_seg[l] == seg_prev ? expf(s_cs[l]) : 0.f;
      }
      s_fac[l] = f;
    }
  }  // ordered before use by the first step's __syncthreads
  if (V5) {
    // KIND 3: factored decay when every |cs_t - ref| (t in [i0, len): the rows s and the positions t >= s) is at
    // most SSDB_FAC_MAX (block-uniform s_ok), else the exact per-element exp.
    const float ref = s_cs[i0];
    if (tid == 0) s_ok = 1;
    __syncthreads();
    for (int l = tid; l < Q; l += NTH) {
      const bool in = l >= i0 && l < len;
      if (in && !(fabsf(s_cs[l] - ref) <= SSDB_FAC_MAX)) s_ok = 0;
      s_ek[l] = in ? __expf(s_cs[l] - ref) : 0.f;
    }
    er_s = i0 + (tid & 63) < len ? __expf(ref - s_cs[i0 + (tid & 63)]) : 0.f;
    __syncthreads();
    fac_ok = s_ok != 0;
    // Double-buffered, one barrier per slice: iteration step runs the products of slice step - 1 while the loads
    // of slice step (issued after the previous barrier) land, then stores slice step into the other buffer.
    for (int step = 0; step <= nsteps; ++step) {
      if (step > 0) g4_products<T, WN>(acc, As[(step - 1) & 1], Bs[(step - 1) & 1], wr, wc, gq, tq);
      if (step < nsteps) store(step, step & 1);
      __syncthreads();
      if (step + 1 < nsteps) load(step + 1);
    }
  } else {
    for (int step = 0; step < nsteps; ++step) {
      __syncthreads();
      store(step, 0);
      __syncthreads();
      if (step + 1 < nsteps) load(step + 1);
      g4_products<T, WN>(acc, As[0], Bs[0], wr, wc, gq, tq);
    }
  }

  if (KD == 6 || KD == 7) {
    __shared__ float red_row[G4_TILE][17];
    float rs[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int t = i0 + wr + 16 * m + gq + 8 * hf;
        if (t >= len) continue;
        const i64 xo = (srow + t) * HP + (i64)h * P;
#pragma unroll
        for (int n = 0; n < WN; ++n)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int p = j0 + wc + 8 * n + 2 * tq + j;
            if (p < P) rs[m][hf] += acc[m][n][2 * hf + j] * (KD == 6 ? dy[xo + p] : load_f(x + xo + p));
          }
      }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) red_row[wr + 16 * m + gq + 8 * hf][(w >> 1) * 4 + tq] = rs[m][hf];
    __syncthreads();
    if (tid < G4_TILE && i0 + tid < Q) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < 16; ++k) v += red_row[tid][k];
      out[(((b * nc + c) * H + h) * (i64)ntj + tj) * Q + i0 + tid] = v;
    }
  } else if (KD == 3) {
    // dx, and (aux != null) the partial dD sums over this tile's rows: aux[((b, c, h), ti), p] = sum_s dy x.
    __shared__ float red_col[G4_TILE][17];
    float cl[WN][2];
#pragma unroll
    for (int n = 0; n < WN; ++n) cl[n][0] = cl[n][1] = 0.f;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int i = i0 + wr + 16 * m + gq + (q >= 2 ? 8 : 0), j = j0 + wc + 8 * n + 2 * tq + (q & 1);
          if (i >= len || j >= P) continue;
          const i64 xo = (srow + i) * HP + (i64)h * P + j;
          const float g_ = dy[xo];
          store_f(reinterpret_cast<T*>(out) + xo, d[hrow + i] * acc[m][n][q] + Dp[h * P + j] * g_);
          if (aux != nullptr) cl[n][q & 1] += g_ * load_f(x + xo);
        }
    if (aux != nullptr) {
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int j = 0; j < 2; ++j) red_col[wc + 8 * n + 2 * tq + j][(w & 1) * 8 + gq] = cl[n][j];
      __syncthreads();
      if (tid < G4_TILE && j0 + tid < P) {
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 16; ++k) v += red_col[tid][k];
        aux[(((b * nc + c) * H + h) * (i64)nti + ti) * P + j0 + tid] = v;
      }
    }
  } else {
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int n = 0; n < WN; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int i = i0 + wr + 16 * m + gq + (q >= 2 ? 8 : 0), j = j0 + wc + 8 * n + 2 * tq + (q & 1);
          if (i < I && j < J) out[st + (i64)i * N + j] = acc[m][n][q];
        }
  }
}

// =====================================================================================================
// ssdb_tp6 (session 6; used under v4 when z is absent, SSMCORE_SSD_BWD_TP6=0 turns it off): v4's p sums with the
// head-independent operands staged once per block and the group's heads looped inside it.
// ssdb_tp6<T> (z absent): ssdb_h4<T, 6> and <T, 7> in one launch, the group's heads looped in a block over the
// head-independent panels C_t and B_t (rows t of the 64-row tile, K = n, staged once per block as T):
//   termp[t]  = sum over the p tile of (C_t . h0[p, :]) dy_t[p]
//   statep[t] = sum over the p tile of (B_t . dh[p, :]) x_t[p]
// (outputs (B, nc, H, tiles_p, Q) as ssdb_h4's). Per head two units (termp, then statep) of ceil(N / 32) K slices
// each: only h0 / dh go through the slice pipeline (double buffered, one barrier per slice, register prefetch one
// slice ahead across units and heads); a unit's row sums are reduced in shared memory (buffer by unit parity) and
// written after the next barrier. Grid (nc * G * tiles_t * tiles_p, head runs, B), 256 threads.
// Dynamic shared memory (bytes): (2 ceil(N/32) + 2) * 64 * 40 * 2 + 2 * 64 * 17 * 4.
template <typename T>
__global__ void __launch_bounds__(256, 2) ssdb_tp6(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const float* __restrict__ dy,
    const float* __restrict__ h0, const float* __restrict__ dh, float* __restrict__ termp, float* __restrict__ statep,
    int batch, i64 L, int H, int G, int P, int N, int Q, int nc, int hps) {
  SSM_DYNAMIC_SMEM(dyn);
  typedef T Slice[G4_TILE][G4_LD];
  const int nkb = (N + G4_KS - 1) / G4_KS;
  Slice* Cp = reinterpret_cast<Slice*>(dyn);  // [nkb] C_t: [t - i0][n - 32 slice]
  Slice* Bp = Cp + nkb;                        // [nkb] B_t
  Slice* Ws = Bp + nkb;                        // [2] h0 or dh of a head: [p - j0][n - 32 slice]
  float* s_red = reinterpret_cast<float*>(Ws + 2);  // [2][64][17] row partials by unit parity

  const int nti = (Q + G4_TILE - 1) / G4_TILE, ntj = (P + G4_TILE - 1) / G4_TILE;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int ti = rb_ % nti;
  rb_ /= nti;
  const int g = rb_ % G, c = rb_ / G;
  const int hpg = H / G, hbeg = g * hpg + (int)blockIdx.y * hps;
  const int hend = hbeg + hps < (g + 1) * hpg ? hbeg + hps : (g + 1) * hpg;
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * G4_TILE, j0 = tj * G4_TILE;
  if (hbeg >= hend || i0 >= len) return;  // (rows past the chunk's end are not read, as with ssdb_h4)
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  constexpr int WN = 2;
  const int wr = 32 * (w & 1), wc = 8 * WN * (w >> 1);
  const i64 srow = b * L + t0;
  const int HP = H * P, GN = G * N;
  const int r = tid >> 2, kq = 2 * (tid & 3);  // staging map: 4 threads per row, 2 k each
  const int nunits = 2 * (hend - hbeg), total = nunits * nkb;

  for (int sl = 0; sl < nkb; ++sl) {
    float v[8], u8[8];
    const int t = i0 + r;
    const i64 ro = (srow + (t < len ? t : 0)) * GN + (i64)g * N;
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int o = 0; o < 2; ++o) {
        const int n = sl * G4_KS + kq + 8 * u + o;
        const bool ok = t < len && n < N;
        v[2 * u + o] = ok ? load_f(Cm + ro + n) : 0.f;
        u8[2 * u + o] = ok ? load_f(Bm + ro + n) : 0.f;
      }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      *reinterpret_cast<uint32_t*>(&Cp[sl][r][kq + 8 * u]) = G4Mma<T>::pack(v[2 * u], v[2 * u + 1]);
      *reinterpret_cast<uint32_t*>(&Bp[sl][r][kq + 8 * u]) = G4Mma<T>::pack(u8[2 * u], u8[2 * u + 1]);
    }
  }

  float rv[8];
  auto loadw = [&](int step) {  // unit step / nkb: head hbeg + unit / 2, h0 (even) or dh (odd); slice step % nkb
    const int unit = step / nkb, sl = step - unit * nkb, h = hbeg + (unit >> 1), p = j0 + r;
    const float* base = ((unit & 1) ? dh : h0) + (((b * nc + c) * H + h) * (i64)P + p) * N;
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int o = 0; o < 2; ++o) {
        const int n = sl * G4_KS + kq + 8 * u + o;
        rv[2 * u + o] = (n < N && p < P) ? base[n] : 0.f;
      }
  };
  float acc[2][WN][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < WN; ++n)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[m][n][q] = 0.f;
  int done = -1;  // unit whose row partials wait for the barrier
  loadw(0);
  for (int step = 0; step <= total; ++step) {
    if (step > 0) {
      const int ps = step - 1, unit = ps / nkb, sl = ps - unit * nkb, pb = ps & 1;
      const bool last = sl == nkb - 1;
      const int h = hbeg + (unit >> 1);
      float e[2][2][WN][2];  // the reduction operand (dy or x) at this thread's accumulator positions
      if (last) {
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int t = i0 + wr + 16 * m + gq + 8 * hf;
            const i64 xo = (srow + (t < len ? t : 0)) * HP + (i64)h * P;
#pragma unroll
            for (int n = 0; n < WN; ++n)
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const int p = j0 + wc + 8 * n + 2 * tq + j;
                const bool ok = t < len && p < P;
                e[m][hf][n][j] = !ok ? 0.f : ((unit & 1) ? load_f(x + xo + p) : dy[xo + p]);
              }
          }
      }
      g4_products<T, WN>(acc, (unit & 1) ? Bp[sl] : Cp[sl], Ws[pb], wr, wc, gq, tq);
      if (last) {
        float* red = s_red + (unit & 1) * G4_TILE * 17;
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float v = 0.f;
#pragma unroll
            for (int n = 0; n < WN; ++n)
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                v += acc[m][n][2 * hf + j] * e[m][hf][n][j];
                acc[m][n][2 * hf + j] = 0.f;
              }
            red[(wr + 16 * m + gq + 8 * hf) * 17 + (w >> 1) * 4 + tq] = v;
          }
        done = unit;
      }
    }
    if (step < total) {
#pragma unroll
      for (int u = 0; u < 4; ++u)
        *reinterpret_cast<uint32_t*>(&Ws[step & 1][r][kq + 8 * u]) = G4Mma<T>::pack(rv[2 * u], rv[2 * u + 1]);
    }
    __syncthreads();
    if (step + 1 < total) loadw(step + 1);
    if (done >= 0) {  // the unit's partials are complete: 16 per row
      if (tid < G4_TILE && i0 + tid < Q) {
        const float* red = s_red + (done & 1) * G4_TILE * 17;
        float v = 0.f;
#pragma unroll
        for (int k = 0; k < 16; ++k) v += red[tid * 17 + k];
        const int h = hbeg + (done >> 1);
        ((done & 1) ? statep : termp)[(((b * nc + c) * H + h) * (i64)ntj + tj) * Q + i0 + tid] = v;
      }
      done = -1;
    }
  }
}


// =====================================================================================================
// ssdb_dx7<T> (session 7, helper SSDB7; SSMCORE_SSD_BWD_DX7=1 under v4): ssdb_h4<T, 3> (dx) with a multi-stage
// cp.async pipeline and ldmatrix fragments, no register staging of the operands:
//   dx[s,p] = d_s (sum_{t >= s} CB[t,s] e^(cs_t - cs_s) [seg_t == seg_s] dy_t[p] + fac_s B_s . dh[p, :]) + D_p dy_s[p]
//   with fac_s = [seg_s == seg_end] e^(cs_end - cs_s);  aux (dD partials) as ssdb_h4<T, 3>.
// Work decomposition: a block per (b, c, h, 64-row tile s, 64-column tile p) (ssdb_h4's grid and block order, so
// the chunk-group's CB stays in L2 while its heads pass), 128 threads = 4 warps of 16 rows x 64 columns (one A
// fragment per warp and k16: the per-element decay is computed once per element, not per warp column).
// K slices of 32 in SSDB_DX7_STAGES (3) stages of dynamic shared memory, one __syncthreads per slice:
//   steps 0 .. n2-1 (phase 2, K = n): B_s (T, [s][n], ldsm_x4 -> A fragments) and dh (fp32, [p][n], float2 loads
//                   packed to T: the B fragments); then the accumulator rows are scaled by fac_s (registers);
//   steps n2 .. (phase 1, K = t in [i0, len)): CB (fp32, [t][s] as stored, scalar loads; the decay (factored
//                   when safe, see SSDB_DX7_FACTOR, else e^(cs_t - cs_s) per element) and the mask applied in
//                   registers, packed to T: the A fragments, the operand rounding of ssdb_h4 / the reference) and dy (T, [t][p]: the caller's dout when z is absent, else ssdb_dy8t's
//                   T copy; ldsm_x4_trans -> B fragments).
// Epilogue: dy (fp32) for D dy and the dD sums; dy may be null when z is absent (dy == dout exactly): dyt is read.
// statep (session 8, helper SSDB8b; null: off): ssdb_tp7's blockIdx.y 1 output, statep[s] = sum over the p tile of
// (B_s . dh[p, :]) x_s[p] ((B, nc, H, tiles_p, Q), rows past the chunk 0), from the phase-2 accumulator before the
// fac_s scaling: the same fragments, mma order and row-sum order as ssdb_tp7, so the same values.
// Every tile row goes global -> shared by cp_async16 (zero-filled past the chunk, P, N or Q), so the loads run
// SSDB_DX7_STAGES - 1 slices ahead of the mma. Needs P % 8 == 0, N % 8 == 0, Q % 4 == 0 and 16-byte aligned
// pointers (the launcher falls back to ssdb_h4<T, 3> otherwise). Dynamic shared memory: SSDB_DX7_STAGES * 15360
// + (Q rounded up to 64, + 32) * 12 + 16 bytes (49.5 KB at 3 stages, Q 256: 4 blocks = 16 warps per SM).
// Traffic at B8 L4096 H64 P64 N128 bf16 Q256 (no z): HBM unique dout 268 MB (operand and epilogue) + x 268 (dD) +
// dh 268 + dx 268 + B / CB small (~1.1 GB: ~300 us at 3.7 TB/s; with z + dy fp32 537 MB); CB re-read per head
// from L2 (~1.3 GB L2->SM, as ssdb_h4). Tensor work 77 GFLOP; exp 335 M (one per A element). Issue ~216 M
// warp-instructions (~100 per warp and k16 of phase 1 for the A fragments, ~50 in phase 2): ~225 us. Expected
// 600-900 us (floor ~300-350; latency hidden by 2 slices in flight x 4 blocks per SM).
#ifndef SSDB_DX7_STAGES
#define SSDB_DX7_STAGES 3
#endif
constexpr int DX7_KS = 32, DX7_CB_LD = 68, DX7_DY_LD = 72, DX7_B_LD = 40, DX7_DH_LD = 40;
constexpr int DX7_STAGE_BYTES = 64 * DX7_B_LD * 2 + 64 * DX7_DH_LD * 4;  // 15360 >= 32*68*4 + 32*72*2 = 13312
// Factored decay (SSDB_DX7_FACTOR, default on): e^(cs_t - cs_s) = e^(cs_t - ref) e^(ref - cs_s), ref = cs of the
// tile's first row, when every |cs_l - ref| (l in [i0, len)) is at most dx7_bound (block-uniform; else the exact
// __expf per element): the A operand is CB e^(cs_t - ref) (a per-block table, no MUFU per element), phase 2 is
// scaled by e^(cs_end - ref) and the accumulator rows by e^(ref - cs_s) in the epilogue. Bounds keep the T operand
// and both factors normal: bf16 60 (fp32 range), f16 3 (its range is small).
#ifndef SSDB_DX7_FACTOR
#define SSDB_DX7_FACTOR 1
#endif
__device__ __forceinline__ constexpr float dx7_bound(const bf16_t*) { return 60.f; }
__device__ __forceinline__ constexpr float dx7_bound(const half_t*) { return 3.f; }

template <typename T>
__global__ void __launch_bounds__(128, 4) ssdb_dx7(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ dyt, const float* __restrict__ dy,
    const float* __restrict__ Dp, const float* __restrict__ d, const float* __restrict__ cs,
    const int* __restrict__ seg, const float* __restrict__ cb, const float* __restrict__ dh, T* __restrict__ out,
    float* __restrict__ aux, float* __restrict__ statep, int batch, i64 L, int H, int G, int P, int N, int Q, int nc) {
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_DX7_STAGES;
  const int QP = ((Q + 63) / 64) * 64 + 32;  // chunk scalars, padded past the last slice
  float* s_cs = reinterpret_cast<float*>(dyn + ST * DX7_STAGE_BYTES);
  int* s_seg = reinterpret_cast<int*>(s_cs + QP);
  float* s_et = reinterpret_cast<float*>(s_seg + QP);  // e^(cs_t - ref) for t in [i0, len), else 0
  int* s_ok = reinterpret_cast<int*>(s_et + QP);
  const int nti = (Q + 63) / 64, ntj = (P + 63) / 64;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int ti = rb_ % nti;
  rb_ /= nti;
  const int h = rb_ % H, c = rb_ / H, g = h / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * 64, j0 = tj * 64;
  const int tid = threadIdx.x;
  if (i0 >= len) {  // rows past the chunk's end: nothing to compute (dD partials are 0)
    if (aux != nullptr && tid < 64 && j0 + tid < P) aux[(((b * nc + c) * H + h) * (i64)nti + ti) * P + j0 + tid] = 0.f;
    if (statep != nullptr && tid < 64 && i0 + tid < Q)
      statep[(((b * nc + c) * H + h) * (i64)ntj + tj) * Q + i0 + tid] = 0.f;
    return;
  }
  const i64 srow = b * L + t0, hrow = (b * H + h) * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;
  const int w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * w;
  const int n1 = (len - i0 + DX7_KS - 1) / DX7_KS, n2 = (N + DX7_KS - 1) / DX7_KS, nsteps = n1 + n2;

  // Issue the cp.async copies of slice `step` into stage buffer sb (no commit).
  auto issue = [&](int step, int sb) {
    unsigned char* base = dyn + sb * DX7_STAGE_BYTES;
    if (step < n2) {  // phase 2: B_s [64 s][32 n] as T, dh [64 p][32 n] fp32
      const int k0 = step * DX7_KS;
      T* Bs = reinterpret_cast<T*>(base);
      float* Ds = reinterpret_cast<float*>(base + 64 * DX7_B_LD * 2);
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int q = tid + 128 * u, r = q >> 2, c8 = (q & 3) * 8;
        const bool ok = i0 + r < len && k0 + c8 < N;
        const T* src = ok ? Bm + (srow + i0 + r) * GN + (i64)g * N + k0 + c8 : Bm;
        cp_async16_zfill(Bs + r * DX7_B_LD + c8, src, ok);
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int q = tid + 128 * u, r = q >> 3, c4 = (q & 7) * 4;
        const bool ok = j0 + r < P && k0 + c4 < N;
        const float* src = ok ? dh + st + (i64)(j0 + r) * N + k0 + c4 : dh;
        cp_async16_zfill(Ds + r * DX7_DH_LD + c4, src, ok);
      }
    } else {  // phase 1: CB [32 t][64 s] fp32, dy [32 t][64 p] as T
      const int k0 = i0 + (step - n2) * DX7_KS;
      float* Cs = reinterpret_cast<float*>(base);
      T* Ys = reinterpret_cast<T*>(base + DX7_KS * DX7_CB_LD * 4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int q = tid + 128 * u, r = q >> 4, c4 = (q & 15) * 4;
        const bool ok = k0 + r < len && i0 + c4 < Q;
        const float* src = ok ? cb + mqg + (i64)(k0 + r) * Q + i0 + c4 : cb;
        cp_async16_zfill(Cs + r * DX7_CB_LD + c4, src, ok);
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int q = tid + 128 * u, r = q >> 3, c8 = (q & 7) * 8;
        const bool ok = k0 + r < len && j0 + c8 < P;
        const T* src = ok ? dyt + (srow + k0 + r) * HP + (i64)h * P + j0 + c8 : dyt;
        cp_async16_zfill(Ys + r * DX7_DY_LD + c8, src, ok);
      }
    }
  };

  // Prologue: the first ST - 1 slices in flight while the chunk scalars are staged.
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  for (int l = tid; l < QP; l += 128) {
    const bool in = l < len;
    s_cs[l] = in ? cs[hrow + l] : 0.f;
    s_seg[l] = in ? seg[srow + l] : -1;
  }
  if (tid == 0) *s_ok = SSDB_DX7_FACTOR;
  __syncthreads();
  const float ref = s_cs[i0];
  for (int l = tid; l < QP; l += 128) {
    const bool in = l >= i0 && l < len;
    const float dl = s_cs[l] - ref;
    if (in && !(fabsf(dl) <= dx7_bound(static_cast<const T*>(nullptr)))) *s_ok = 0;
    s_et[l] = in ? __expf(dl) : 0.f;
  }
  __syncthreads();
  const bool fac = *s_ok != 0;  // block-uniform
  const int sA = i0 + wr + gq, sB = sA + 8;  // this thread's two rows
  const float csA = s_cs[sA], csB = s_cs[sB];
  const int sgA = s_seg[sA], sgB = s_seg[sB];
  const int seg_end = s_seg[len - 1];
  const float cs_end = s_cs[len - 1];

  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();  // slice `step` visible to all; stage (step - 1) % ST free
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    cp_async_commit();
    const unsigned char* base = dyn + (step % ST) * DX7_STAGE_BYTES;
    if (step < n2) {
      const T* Bs = reinterpret_cast<const T*>(base);
      const float* Ds = reinterpret_cast<const float*>(base + 64 * DX7_B_LD * 2);
#pragma unroll
      for (int kk = 0; kk < DX7_KS; kk += 16) {
        uint32_t a[4];
        ldsm_x4(a, Bs + (wr + (lane & 7) + ((lane >> 3) & 1) * 8) * DX7_B_LD + kk + (lane >> 4) * 8);
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const float* dr = Ds + (n * 8 + gq) * DX7_DH_LD + kk + 2 * tq;
          const float2 lo = *reinterpret_cast<const float2*>(dr), hi = *reinterpret_cast<const float2*>(dr + 8);
          uint32_t bf[2];
          bf[0] = G4Mma<T>::pack(lo.x, lo.y);
          bf[1] = G4Mma<T>::pack(hi.x, hi.y);
          G4Mma<T>::mma(acc[n], a, bf);
        }
      }
    } else {
      if (step == n2 && statep != nullptr) {  // ssdb_tp7's statep rows from the unscaled state term
        const i64 so = (((b * nc + c) * H + h) * (i64)ntj + tj) * Q;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int s = hf ? sB : sA;
          float rs = 0.f;
          if (s < len) {
            const i64 ro = (srow + s) * HP + (i64)h * P;
#pragma unroll
            for (int n = 0; n < 8; ++n) {
              const int p = j0 + n * 8 + 2 * tq;
              if (p >= P) continue;  // P % 8 == 0: p + 1 < P too
              const uint32_t xr = *reinterpret_cast<const uint32_t*>(x + ro + p);
              const T* xe = reinterpret_cast<const T*>(&xr);
              const float v0 = load_f(xe), v1 = load_f(xe + 1);
              rs += acc[n][2 * hf] * v0 + acc[n][2 * hf + 1] * v1;
            }
          }
          rs += SSM_SHFL_XOR(rs, 1);
          rs += SSM_SHFL_XOR(rs, 2);
          if (tq == 0 && s < Q) statep[so + s] = rs;
        }
      }
      if (step == n2) {  // the state term is scaled by fac_s; phase 1 adds on top
        const float fA = sgA == seg_end ? __expf(cs_end - (fac ? ref : csA)) : 0.f;
        const float fB = sgB == seg_end ? __expf(cs_end - (fac ? ref : csB)) : 0.f;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          acc[n][0] *= fA;
          acc[n][1] *= fA;
          acc[n][2] *= fB;
          acc[n][3] *= fB;
        }
      }
      const int k0 = i0 + (step - n2) * DX7_KS;
      const float* Cs = reinterpret_cast<const float*>(base);
      const T* Ys = reinterpret_cast<const T*>(base + DX7_KS * DX7_CB_LD * 4);
#pragma unroll
      for (int kk = 0; kk < DX7_KS; kk += 16) {
        float v[2][4];  // [row A / B][t = 2tq, 2tq + 1, 2tq + 8, 2tq + 9]
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tl = kk + 2 * tq + (e & 1) + 8 * (e >> 1), t = k0 + tl;
          float eA, eB;
          if (fac) {  // block-uniform
            eA = eB = s_et[t];
          } else {
            const float ct = s_cs[t];
            eA = __expf(ct - csA);
            eB = __expf(ct - csB);
          }
          const int sg = s_seg[t];
          const float cA = Cs[tl * DX7_CB_LD + wr + gq], cB = Cs[tl * DX7_CB_LD + wr + gq + 8];
          v[0][e] = (t >= sA && sg == sgA) ? cA * eA : 0.f;
          v[1][e] = (t >= sB && sg == sgB) ? cB * eB : 0.f;
        }
        uint32_t a[4];
        a[0] = G4Mma<T>::pack(v[0][0], v[0][1]);
        a[1] = G4Mma<T>::pack(v[1][0], v[1][1]);
        a[2] = G4Mma<T>::pack(v[0][2], v[0][3]);
        a[3] = G4Mma<T>::pack(v[1][2], v[1][3]);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
          uint32_t r[4];
          ldsm_x4_trans(r, Ys + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * DX7_DY_LD + nb * 16 + (lane >> 4) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          G4Mma<T>::mma(acc[2 * nb], a, b0);
          G4Mma<T>::mma(acc[2 * nb + 1], a, b1);
        }
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue: dx = d_s acc + D dy (pairs of columns), dD partials over the tile's rows.
  float cl[8][2];
#pragma unroll
  for (int n = 0; n < 8; ++n) cl[n][0] = cl[n][1] = 0.f;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int s = hf ? sB : sA;
    if (s >= len) continue;
    const float ds = d[hrow + s] * (fac ? __expf(ref - (hf ? csB : csA)) : 1.f);  // factored: e^(ref - cs_s)
    const i64 ro = (srow + s) * HP + (i64)h * P;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int p = j0 + n * 8 + 2 * tq;
      if (p >= P) continue;  // P % 8 == 0: p + 1 < P too
      float2 gy;
      if (dy != nullptr) {
        gy = *reinterpret_cast<const float2*>(dy + ro + p);
      } else {  // z absent: dy = dout exactly, read in T (half the bytes)
        const uint32_t yr = *reinterpret_cast<const uint32_t*>(dyt + ro + p);
        gy.x = load_f(reinterpret_cast<const T*>(&yr));
        gy.y = load_f(reinterpret_cast<const T*>(&yr) + 1);
      }
      const float o0 = ds * acc[n][2 * hf] + Dp[h * P + p] * gy.x;
      const float o1 = ds * acc[n][2 * hf + 1] + Dp[h * P + p + 1] * gy.y;
      *reinterpret_cast<uint32_t*>(out + ro + p) = G4Mma<T>::pack(o0, o1);
      if (aux != nullptr) {
        const uint32_t xr = *reinterpret_cast<const uint32_t*>(x + ro + p);
        const T* xe = reinterpret_cast<const T*>(&xr);
        cl[n][0] += gy.x * load_f(xe);
        cl[n][1] += gy.y * load_f(xe + 1);
      }
    }
  }
  if (aux != nullptr) {
    __syncthreads();  // every warp is past its last slice: stage memory reused
    float* red = reinterpret_cast<float*>(dyn);  // [4 warps][64 p]
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float v = cl[n][j];
        v += SSM_SHFL_XOR(v, 4);
        v += SSM_SHFL_XOR(v, 8);
        v += SSM_SHFL_XOR(v, 16);
        if (gq == 0) red[w * 64 + n * 8 + 2 * tq + j] = v;
      }
    __syncthreads();
    if (tid < 64 && j0 + tid < P)
      aux[(((b * nc + c) * H + h) * (i64)nti + ti) * P + j0 + tid] =
          red[tid] + red[64 + tid] + red[128 + tid] + red[192 + tid];
  }
}

// ssdb_dy8 that also writes dy rounded to T (the mma operand of ssdb_dx7 when z is given).
template <typename T>
__global__ void ssdb_dy8t(const T* __restrict__ dout, const T* __restrict__ z, float* __restrict__ dy,
                          T* __restrict__ dyt, i64 n, int vec) {
  const i64 i = gtid() * 8;
  if (i >= n) return;
  float g[8];
  load_chunk8(dout, i, n, vec != 0, g);
  if (z != nullptr) {
    float zz[8];
    load_chunk8(z, i, n, vec != 0, zz);
#pragma unroll
    for (int k = 0; k < 8; ++k) g[k] *= silu_f(zz[k]);
  }
  store_chunk8(dy, i, n, vec != 0, g);
  store_chunk8(dyt, i, n, vec != 0, g);
}

// =====================================================================================================
// ssdb_st7<T, KD> (session 7, helper SSDB7; SSMCORE_SSD_BWD_ST7=1 under v4): the chunk states of ssdb_h4<T, 4 / 5>
// on the cp.async pipeline of ssdb_dx7:
//   KD 0  S[p, n]  = sum_s x_s[p] (d_s e^(cs_end - cs_s) [seg_s == seg_end]) B_s[n]
//   KD 1  Gl[p, n] = sum_t dy_t[p] (e^(cs_t) [seg_t == seg_prev]) C_t[n]     (dy: ssdb_dx7's T operand)
// out (B, nc, H, P, N) fp32. A block per (b, c, h, 64-row p tile, 64-column n tile) (ssdb_h4's grid), 128 threads =
// 4 warps of 16 p x 64 n; K = the chunk's positions in slices of 32, SSDB_ST7_STAGES (4) stages of [32 k][64] T
// tiles for both operands (as stored: k rows, p / n contiguous), fragments by ldsm_x4_trans; the position factor
// scales the A fragments in registers (the operand rounding of ssdb_h4<T, 4 / 5>: x fac rounded once to T).
// Needs P % 8 == N % 8 == 0 and 16-byte aligned rows (else ssdb_h4<T, 4 / 5>). Dynamic shared memory
// SSDB_ST7_STAGES * 9216 + (Q rounded up to 64 + 32) * 4 bytes (38 KB at Q 256: 5 blocks per SM by shared memory).
// At B8 L4096 H64 P64 N128 Q256: 34 GFLOP each; HBM x or dy 268 MB + out 268 MB (~150 us at 3.7 TB/s), B / C per
// group from L2; 8 slices per block, each thread 4 cp.async per slice. Expected 250-400 us each (v4: 994 / 823).
#ifndef SSDB_ST7_STAGES
#define SSDB_ST7_STAGES 4
#endif
constexpr int ST7_LD = 72, ST7_STAGE_BYTES = 2 * 32 * ST7_LD * 2;

template <typename T, int KD>
__global__ void __launch_bounds__(128, 4) ssdb_st7(
    const T* __restrict__ xa, const T* __restrict__ Wm, const float* __restrict__ d, const float* __restrict__ cs,
    const int* __restrict__ seg, float* __restrict__ out, int batch, i64 L, int H, int G, int P, int N, int Q,
    int nc) {
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_ST7_STAGES;
  const int QP = ((Q + 63) / 64) * 64 + 32;
  float* s_fac = reinterpret_cast<float*>(dyn + ST * ST7_STAGE_BYTES);
  const int nti = (P + 63) / 64, ntj = (N + 63) / 64;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int ti = rb_ % nti;
  rb_ /= nti;
  const int h = rb_ % H, c = rb_ / H, g = h / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * 64, j0 = tj * 64;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * w;
  const i64 srow = b * L + t0, hrow = (b * H + h) * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
  const int nsteps = (len + 31) / 32;

  auto issue = [&](int step, int sb) {
    T* As = reinterpret_cast<T*>(dyn + sb * ST7_STAGE_BYTES);
    T* Bs = As + 32 * ST7_LD;
    const int k0 = step * 32;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = tid + 128 * u, r = q >> 3, c8 = (q & 7) * 8;
      const bool oka = k0 + r < len && i0 + c8 < P, okb = k0 + r < len && j0 + c8 < N;
      const T* sa = oka ? xa + (srow + k0 + r) * HP + (i64)h * P + i0 + c8 : xa;
      const T* sb_ = okb ? Wm + (srow + k0 + r) * GN + (i64)g * N + j0 + c8 : Wm;
      cp_async16_zfill(As + r * ST7_LD + c8, sa, oka);
      cp_async16_zfill(Bs + r * ST7_LD + c8, sb_, okb);
    }
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  {
    const int seg_ref = KD == 0 ? seg[srow + len - 1] : (t0 > 0 ? seg[srow - 1] : 0);
    const float cs_end = cs[hrow + len - 1];
    for (int l = tid; l < QP; l += 128) {
      float f = 0.f;
      if (l < len && seg[srow + l] == seg_ref)
        f = KD == 0 ? d[hrow + l] * __expf(cs_end - cs[hrow + l]) : __expf(cs[hrow + l]);
      s_fac[l] = f;
    }
  }  // ordered before use by the first step's __syncthreads

  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    cp_async_commit();
    const T* As = reinterpret_cast<const T*>(dyn + (step % ST) * ST7_STAGE_BYTES);
    const T* Bs = As + 32 * ST7_LD;
#pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {
      uint32_t a[4];
      // matrices: (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) of the [k][m] tile
      ldsm_x4_trans(a, As + (kk + (lane & 7) + (lane >> 4) * 8) * ST7_LD + wr + ((lane >> 3) & 1) * 8);
      const float2 f0 = *reinterpret_cast<const float2*>(s_fac + step * 32 + kk + 2 * tq);
      const float2 f1 = *reinterpret_cast<const float2*>(s_fac + step * 32 + kk + 8 + 2 * tq);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const T* e = reinterpret_cast<const T*>(&a[j]);
        const float2 f = j < 2 ? f0 : f1;
        a[j] = G4Mma<T>::pack(load_f(e) * f.x, load_f(e + 1) * f.y);
      }
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        uint32_t r[4];
        ldsm_x4_trans(r, Bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * ST7_LD + nb * 16 + (lane >> 4) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        G4Mma<T>::mma(acc[2 * nb], a, b0);
        G4Mma<T>::mma(acc[2 * nb + 1], a, b1);
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int p = i0 + wr + gq + 8 * hf;
    if (p >= P) continue;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int j = j0 + n * 8 + 2 * tq;
      if (j < N)
        *reinterpret_cast<float2*>(out + st + (i64)p * N + j) = make_float2(acc[n][2 * hf], acc[n][2 * hf + 1]);
    }
  }
}

// =====================================================================================================
// ssdb_tp7<T> (session 7, helper SSDB7; SSMCORE_SSD_BWD_TP7=1 under v4 without z): the p sums of ssdb_tp6 /
// ssdb_h4<T, 6 / 7> on ssdb_dx7's phase-2 pipeline, per head (no panels, no head loop):
//   blockIdx.y 0: termp[t]  = sum over the p tile of (C_t . h0[p, :]) dy_t[p]
//   blockIdx.y 1: statep[t] = sum over the p tile of (B_t . dh[p, :]) x_t[p]
// (session 8: dy is read as T, dyt = dout without z (== the fp32 dy exactly); a null termp or statep: the other
// sum alone on grid y 1 (ssdb_tp8 takes termp, ssdb_dx7 statep).)
// outputs (B, nc, H, tiles_p, Q) as ssdb_h4's (rows t in [len, Q) written 0). A block per (b, c, h, 64 t x 64 p),
// grid (nc * H * tiles, 2, B), 128 threads = 4 warps of 16 t x 64 p; K = n in slices of 32, SSDB_DX7_STAGES stages
// of C_t / B_t (T, [t][n], ldsm_x4) and h0 / dh (fp32, [p][n], float2 loads packed to T: tp6's operand rounding);
// the row sums in registers and two shuffles. Needs N % 8 == 0, P % 8 == 0 and aligned rows (else tp6 / h4).
// At B8 L4096 H64 P64 N128 Q256: 34 GFLOP each; HBM h0 / dh 268 MB each, dy fp32 537 (session 8: dout 268), x 268
// (~1.3 GB: ~360 us). Expected 450-700 us for both (tp6: 1731; H200 run 4: 779).
template <typename T>
__global__ void __launch_bounds__(128, 4) ssdb_tp7(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const T* __restrict__ dyt,
    const float* __restrict__ h0, const float* __restrict__ dh, float* __restrict__ termp, float* __restrict__ statep,
    int batch, i64 L, int H, int G, int P, int N, int Q, int nc) {
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_DX7_STAGES;
  const bool kst = termp == nullptr || blockIdx.y != 0;  // statep
  const T* Wm = kst ? Bm : Cm;
  const float* Hm = kst ? dh : h0;
  float* out = kst ? statep : termp;
  const int nti = (Q + 63) / 64, ntj = (P + 63) / 64;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int ti = rb_ % nti;
  rb_ /= nti;
  const int h = rb_ % H, c = rb_ / H, g = h / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * 64, j0 = tj * 64;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * w;
  const i64 obase = (((b * nc + c) * H + h) * (i64)ntj + tj) * Q;
  if (i0 >= len) {  // as ssdb_h4 (which writes rows past the end as 0 too)
    if (tid < 64 && i0 + tid < Q) out[obase + i0 + tid] = 0.f;
    return;
  }
  const i64 srow = b * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
  const int nsteps = (N + DX7_KS - 1) / DX7_KS;

  auto issue = [&](int step, int sb) {
    unsigned char* base = dyn + sb * DX7_STAGE_BYTES;
    const int k0 = step * DX7_KS;
    T* Ws = reinterpret_cast<T*>(base);
    float* Ds = reinterpret_cast<float*>(base + 64 * DX7_B_LD * 2);
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = tid + 128 * u, r = q >> 2, c8 = (q & 3) * 8;
      const bool ok = i0 + r < len && k0 + c8 < N;
      const T* src = ok ? Wm + (srow + i0 + r) * GN + (i64)g * N + k0 + c8 : Wm;
      cp_async16_zfill(Ws + r * DX7_B_LD + c8, src, ok);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int q = tid + 128 * u, r = q >> 3, c4 = (q & 7) * 4;
      const bool ok = j0 + r < P && k0 + c4 < N;
      const float* src = ok ? Hm + st + (i64)(j0 + r) * N + k0 + c4 : Hm;
      cp_async16_zfill(Ds + r * DX7_DH_LD + c4, src, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    cp_async_commit();
    const unsigned char* base = dyn + (step % ST) * DX7_STAGE_BYTES;
    const T* Ws = reinterpret_cast<const T*>(base);
    const float* Ds = reinterpret_cast<const float*>(base + 64 * DX7_B_LD * 2);
#pragma unroll
    for (int kk = 0; kk < DX7_KS; kk += 16) {
      uint32_t a[4];
      ldsm_x4(a, Ws + (wr + (lane & 7) + ((lane >> 3) & 1) * 8) * DX7_B_LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const float* dr = Ds + (n * 8 + gq) * DX7_DH_LD + kk + 2 * tq;
        const float2 lo = *reinterpret_cast<const float2*>(dr), hi = *reinterpret_cast<const float2*>(dr + 8);
        uint32_t bf[2];
        bf[0] = G4Mma<T>::pack(lo.x, lo.y);
        bf[1] = G4Mma<T>::pack(hi.x, hi.y);
        G4Mma<T>::mma(acc[n], a, bf);
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int t = i0 + wr + gq + 8 * hf;
    float rs = 0.f;
    if (t < len) {
      const i64 ro = (srow + t) * HP + (i64)h * P;
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int p = j0 + n * 8 + 2 * tq;
        if (p >= P) continue;  // P % 8 == 0: p + 1 < P too
        const uint32_t xr = *reinterpret_cast<const uint32_t*>((kst ? x : dyt) + ro + p);
        const float v0 = load_f(reinterpret_cast<const T*>(&xr)), v1 = load_f(reinterpret_cast<const T*>(&xr) + 1);
        rs += acc[n][2 * hf] * v0 + acc[n][2 * hf + 1] * v1;
      }
    }
    rs += SSM_SHFL_XOR(rs, 1);
    rs += SSM_SHFL_XOR(rs, 2);
    if (tq == 0 && t < Q) out[obase + t] = rs;
  }
}

// =====================================================================================================
// ssdb_tp8<T> (session 8, helper SSDB8b; SSMCORE_SSD_BWD_TP8=1 under v4 without z): ssdb_tp7's termp (blockIdx.y 0)
//   termp[t] = sum over the p tile of (C_t . h0[p, :]) dy_t[p]      ((B, nc, H, tiles_p, Q), rows past the chunk 0)
// with a block per (b, c, h, 64-column tile p) over the whole chunk (up to 256 rows t) instead of a block per 64 x 64
// tile: the h0 tile (fp32 [p][n]) is read once per block (not once per row tile), rounded to T once (tp7's operand
// rounding) into shared memory [p][n] and fed by ldsm_x4 (no float2 loads + packs per mma). 256 threads = 8 warps of
// 32 t x 64 p (two A fragments per B fragment); K = n in slices of 32, SSDB_TP8_STAGES stages of C_t (T, [256 t][32
// n] by cp.async, ldsm_x4); warps whose rows all lie past the chunk skip the products. Same fragments, mma order and
// row-sum order as ssdb_tp7, so the same values. dy: dout (T, [256 t][64 p]) copied by cp.async during the last
// slice into the two stages it leaves free (rows 0-127 / 128-255), read from there by the epilogue. Needs N % 8 == 0,
// P % 8 == 0, 16-byte aligned C / dout rows. Dynamic shared memory: SSDB_TP8_STAGES * 20480 + 64 * (N rounded up to
// 32, + 8) * 2 (77 KB at 3 stages, N 128: 2 blocks = 16 warps per SM).
// At B8 L4096 H64 P64 N128 Q256: 34 GFLOP; HBM h0 268 MB + dout 268 MB (~150 us), C from L2 once per head (537 MB
// L2 -> SM, tp7: 4x the h0 tile too). Expected 200-280 us (tp7's termp half: ~390).
#ifndef SSDB_TP8_STAGES
#define SSDB_TP8_STAGES 3
#endif
constexpr int TP8_ROWS = 256, TP8_KS = 32, TP8_C_LD = 40;
constexpr int TP8_STAGE_BYTES = TP8_ROWS * TP8_C_LD * 2;  // 20480
constexpr int TP8_Y_LD = 72;  // dout rows in the free stages: 128 x 72 T = 18432 bytes per stage
static_assert(SSDB_TP8_STAGES >= 3, "ssdb_tp8 keeps dout in two free stages during the last slice");

template <typename T>
__global__ void __launch_bounds__(256, 2) ssdb_tp8(const T* __restrict__ Cm, const T* __restrict__ dyt,
                                                   const float* __restrict__ h0, float* __restrict__ termp, int batch,
                                                   i64 L, int H, int G, int P, int N, int Q, int nc) {
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_TP8_STAGES;
  const int NK = (N + TP8_KS - 1) / TP8_KS * TP8_KS, HLD = NK + 8;  // h0 tile columns (zero past N) and row pitch
  T* Hs = reinterpret_cast<T*>(dyn + ST * TP8_STAGE_BYTES);       // h0 rounded to T, [64 p][HLD]
  const int ntj = (P + 63) / 64;
  int rb_ = (int)blockIdx.x;
  const int tj = rb_ % ntj;
  rb_ /= ntj;
  const int h = rb_ % H, c = rb_ / H, g = h / (H / G);
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int j0 = tj * 64;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 32 * w;
  const bool active = wr < len;  // warp-uniform
  const i64 srow = b * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
  const int nsteps = NK / TP8_KS;

  auto issue = [&](int step, int sb) {  // C_t [256 t][32 n] as T, zero past the chunk and N
    T* Cs = reinterpret_cast<T*>(dyn + sb * TP8_STAGE_BYTES);
    const int k0 = step * TP8_KS;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int q = tid + 256 * u, r = q >> 2, c8 = (q & 3) * 8;
      const bool ok = r < len && k0 + c8 < N;
      const T* src = ok ? Cm + (srow + r) * GN + (i64)g * N + k0 + c8 : Cm;
      cp_async16_zfill(Cs + r * TP8_C_LD + c8, src, ok);
    }
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  // h0 tile -> T in shared memory (8 float4 loads in flight per thread and batch), zero past P and N.
  const int q4 = NK / 4;  // float4 columns per row
  for (int q0 = 0; q0 < 64 * q4; q0 += 8 * 256) {
    float4 v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int q = q0 + tid + 256 * u, r = q / q4, c4 = (q - r * q4) * 4;
      v[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (q < 64 * q4 && j0 + r < P && c4 < N)
        v[u] = *reinterpret_cast<const float4*>(h0 + st + (i64)(j0 + r) * N + c4);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int q = q0 + tid + 256 * u, r = q / q4, c4 = (q - r * q4) * 4;
      if (q < 64 * q4) {
        uint2 pk;
        pk.x = G4Mma<T>::pack(v[u].x, v[u].y);
        pk.y = G4Mma<T>::pack(v[u].z, v[u].w);
        *reinterpret_cast<uint2*>(Hs + r * HLD + c4) = pk;
      }
    }
  }

  float acc[2][8][4];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int n = 0; n < 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();  // slice `step` (and, at step 0, the h0 tile) visible to all; stage (step - 1) % ST free
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    if (step == nsteps - 1) {  // every other stage is free now: dout [256 t][64 p] for the epilogue
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int q = tid + 256 * u, r = q >> 3, c8 = (q & 7) * 8;
        const bool ok = r < len && j0 + c8 < P;
        T* dst = reinterpret_cast<T*>(dyn + ((step + 1 + (r >> 7)) % ST) * TP8_STAGE_BYTES) + (r & 127) * TP8_Y_LD + c8;
        cp_async16_zfill(dst, ok ? dyt + (srow + r) * HP + (i64)h * P + j0 + c8 : dyt, ok);
      }
    }
    cp_async_commit();
    if (!active) continue;
    const T* Cs = reinterpret_cast<const T*>(dyn + (step % ST) * TP8_STAGE_BYTES);
#pragma unroll
    for (int kk = 0; kk < TP8_KS; kk += 16) {
      uint32_t a[2][4];
#pragma unroll
      for (int m = 0; m < 2; ++m)
        ldsm_x4(a[m], Cs + (wr + 16 * m + (lane & 7) + ((lane >> 3) & 1) * 8) * TP8_C_LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        uint32_t r[4];  // p rows nb*16 + 0..7 (k lo, hi), then + 8..15
        ldsm_x4(r, Hs + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * HLD + step * TP8_KS + kk + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          G4Mma<T>::mma(acc[m][2 * nb], a[m], b0);
          G4Mma<T>::mma(acc[m][2 * nb + 1], a[m], b1);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // dout in the free stages
  const i64 obase = (((b * nc + c) * H + h) * (i64)ntj + tj) * Q;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int t = wr + 16 * m + gq + 8 * hf;
      float rs = 0.f;
      if (t < len) {
        const T* yrow = reinterpret_cast<const T*>(dyn + ((nsteps + (t >> 7)) % ST) * TP8_STAGE_BYTES) +
                        (t & 127) * TP8_Y_LD;
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const int p = j0 + n * 8 + 2 * tq;
          if (p >= P) continue;  // P % 8 == 0: p + 1 < P too
          const uint32_t yr = *reinterpret_cast<const uint32_t*>(yrow + n * 8 + 2 * tq);
          const float v0 = load_f(reinterpret_cast<const T*>(&yr)), v1 = load_f(reinterpret_cast<const T*>(&yr) + 1);
          rs += acc[m][n][2 * hf] * v0 + acc[m][n][2 * hf + 1] * v1;
        }
      }
      rs += SSM_SHFL_XOR(rs, 1);
      rs += SSM_SHFL_XOR(rs, 2);
      if (tq == 0 && t < Q) termp[obase + t] = rs;
    }
}

// =====================================================================================================
// ssdb_g7<T, 0> (session 7, helper SSDB7b; SSMCORE_SSD_BWD_G7=1 under v4): ssdb_g4<T, 0> (F per group and the
// per-head row / column sums of CB o E for ssdb_dcs4) on ssdb_dx7's cp.async / ldmatrix pipeline:
//   E_h[t,s] = (dy_h,t . x_h,s) e^(cs_h,t - cs_h,s) [s <= t, seg_s == seg_t]       (DX_h on tensor cores)
//   F[t,s] = sum_h d_h,s E_h[t,s];  rowp[h, tj][t] = sum_s CB E_h d_h,s;  colp[h, ti][s] = sum_t CB E_h.
// Work decomposition: a block per (b, c, g, lower 64 x 64 tile (ti, tj)) (ssdb_g4's grid and block order), 128
// threads = 4 warps of 16 rows t x 64 columns s; K steps = (head of the group, 32-wide p slice), SSDB_G7_STAGES (3)
// stages of dy (T: the caller's dout without z, ssdb_dy8t's copy with z; [t][p]) and x (T, [s][p]) tiles by
// cp_async16 (zero-filled past the chunk / P), both fragments by ldsm_x4 (A: rows t; B: [s][p] is K-contiguous).
// Head-independent: the CB tile is staged once (cp.async, fp32 [t][s]) and masked in place (each thread masks the
// elements it later reads: no extra barrier); the mask bits are kept in a register for F's store.
// Per-head epilogue in registers (no shared-memory passes over the tile): the decay factored as
//   e^(cs_t - cs_s) = er[t] ec[s],  er[t] = e^(cs_t - rc), ec[s] = e^(rc - cs_s),  rc = cs of the column tile's last
//   (valid) position,
// from per-head tables (one __expf per thread and head, double-buffered, written one head ahead, their cs / d
// prefetched into registers two heads ahead), so per element: F += (acc ecd[s]) er[t], u = CB acc,
// row += u ecd[s], col += u er[t] (ecd = ec d): 5 FP ops and no MUFU; rowp = er[t] row, colp = ec[s] col.
// Row sums: 2 shuffles (the warp owns all 64 columns of its rows: no cross-warp pass); column sums: a 16 -> 2
// reduce-scatter over the lanes of a column (14 shuffles), then 4 warps' partials through shared memory, summed
// after the next step's barrier (deferred: no barrier of its own). The factored form is used for a head when
// every cs_t - rc <= SSDB_G7_FAC_MAX (rows) and rc - cs_s <= SSDB_G7_FAC_MAX (columns) (block-uniform, per head):
// neither factor overflows, and a factor that underflows (< e^-87) times the other (<= e^40) stands for a decay
// below e^-47 (negligible next to the diagonal terms). With A <= 0 (cs non-increasing) every off-diagonal tile
// qualifies; a diagonal tile whose cs falls by more than 40 across it (steep A) takes the exact masked
// __expf(cs_t - cs_s) per element. Rounding: dy and x rounded
// to T for the mma as in ssdb_g4 (dy == dout exactly without z; with z round(dy) as ssdb_g4's operand); E in fp32.
// Needs P % 8 == 0, Q % 4 == 0 and 16-byte aligned dy / x rows (else ssdb_g4<T, 0>). Dynamic shared memory
// G7_SMEM (53.5 KB: 4 blocks = 16 warps per SM; registers capped at 128 by __launch_bounds__(128, 4)).
// At B8 L4096 H64 P64 N128 G1 bf16 Q256 (no z): 1280 blocks x 64 heads x 2 slices; HBM dout 268 MB + x 268 MB
// (each tile row re-read from L2 by up to 4 blocks: ~1.3 GB L2 -> SM) + F 34 MB + rowp / colp 67 MB (~170 us at
// 3.7 TB/s); tensor work 34 GFLOP; issue ~140 M warp-instructions (epilogue ~330 per warp and head, mma part ~50,
// copies ~40): ~150 us at 4 schedulers x 132 SMs. Expected 300-500 us (ssdb_g4<T, 0>: 2020 us: register-staged
// loads, 2 barriers per slice and 2 per head, 32 exp and 4 shared loads per element and thread at 2 blocks per SM).
#ifndef SSDB_G7_STAGES
#define SSDB_G7_STAGES 3
#endif
#ifndef SSDB_G7_FAC_MAX
#define SSDB_G7_FAC_MAX 40.f
#endif
constexpr int G7_LD = 40, G7_CB_LD = 72;
constexpr int G7_STAGE_BYTES = 2 * 64 * G7_LD * 2;  // dy [64 t][40] + x [64 s][40] as T: 10240
constexpr int G7_CB_BYTES = 64 * G7_CB_LD * 4;      // 18432
// per head buffer (2): er, csr (rows), ec, ecd, csc, dcol (columns): 6 x 64 floats; then segr, segc (2 x 64 ints),
// s_col [2][4 warps][64] floats, s_bad[2] (+ pad)
constexpr int G7_TAB_FLOATS = 6 * 64;
constexpr int G7_SMEM = SSDB_G7_STAGES * G7_STAGE_BYTES + G7_CB_BYTES + 2 * G7_TAB_FLOATS * 4 + 2 * 64 * 4 +
                        2 * 4 * 64 * 4 + 16;

// One reduce-scatter level over lane bit 2 HALF (16, 8, 4): v[i] (i < HALF) = own + partner's of the kept half.
template <int HALF>
__device__ __forceinline__ void g7_scatter(float (&v)[16], int lane) {
  const bool up = (lane & (2 * HALF)) != 0;
#pragma unroll
  for (int i = 0; i < HALF; ++i) {
    const float send = up ? v[i] : v[i + HALF];
    const float keep = up ? v[i + HALF] : v[i];
    v[i] = keep + SSM_SHFL_XOR(send, 2 * HALF);
  }
}

template <typename T, int KIND>
__global__ void __launch_bounds__(128, 4) ssdb_g7(
    const T* __restrict__ x, const T* __restrict__ dyt, const float* __restrict__ d, const float* __restrict__ cs,
    const int* __restrict__ seg, const float* __restrict__ cb, float* __restrict__ F, float* __restrict__ rowp,
    float* __restrict__ colp, int batch, i64 L, int H, int G, int P, int N, int Q, int nc) {
  static_assert(KIND == 0, "ssdb_g7: KIND 0 (F) only");
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_G7_STAGES;
  float* s_cb = reinterpret_cast<float*>(dyn + ST * G7_STAGE_BYTES);
  float* s_tab = s_cb + 64 * G7_CB_LD;  // [2][6][64]
  int* s_segr = reinterpret_cast<int*>(s_tab + 2 * G7_TAB_FLOATS);
  int* s_segc = s_segr + 64;
  float* s_col = reinterpret_cast<float*>(s_segc + 64);  // [2][4][64]
  int* s_bad = reinterpret_cast<int*>(s_col + 2 * 4 * 64);
  const int nt = (Q + 63) / 64, hpg = H / G;
  int c, g, ti, tj;
  {
    int r = (int)blockIdx.x;
    const int ntri = nt * (nt + 1) / 2;
    int tri = r % ntri;
    r /= ntri;
    ti = 0;
    while (tri > ti) {
      tri -= ti + 1;
      ++ti;
    }
    tj = tri;
    g = r % G;
    c = r / G;
  }
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * 64, j0 = tj * 64;
  if (i0 >= len) return;  // rows past the chunk: nothing reads them (as ssdb_g4)
  const i64 srow = b * L + t0;
  const int HP = H * P;
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;
  const i64 bch0 = (b * nc + c) * (i64)H + (i64)g * hpg;  // (b, c, first head of the group)
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * w;
  const int nsl = (P + 31) / 32, nsteps = hpg * nsl;
  const int s_last = (j0 + 63 < len ? j0 + 63 : len - 1);

  auto issue = [&](int step, int sb) {
    T* Ys = reinterpret_cast<T*>(dyn + sb * G7_STAGE_BYTES);
    T* Xs = Ys + 64 * G7_LD;
    const int hh = step / nsl, k0 = (step - hh * nsl) * 32;
    const i64 hoff = (i64)(g * hpg + hh) * P + k0;
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int q = tid + 128 * u, r = q >> 2, c8 = (q & 3) * 8;
      const bool kin = k0 + c8 < P;
      const bool oky = kin && i0 + r < len, okx = kin && j0 + r < len;
      cp_async16_zfill(Ys + r * G7_LD + c8, oky ? dyt + (srow + i0 + r) * HP + hoff + c8 : dyt, oky);
      cp_async16_zfill(Xs + r * G7_LD + c8, okx ? x + (srow + j0 + r) * HP + hoff + c8 : x, okx);
    }
  };
  // Per-head tables of head hh into buffer hh & 1 from this thread's (cs, d, rc) of that head; a thread whose entry
  // is out of the factored form's range stamps s_bad[hh & 1] = hh + 1.
  auto tables = [&](int hh, float vcs, float vd, float rc) {
    float* tb = s_tab + (hh & 1) * G7_TAB_FLOATS;
    const int l = tid & 63;
    bool bad;
    if (tid < 64) {
      const bool in = i0 + l < len;
      const float dl = vcs - rc;
      bad = in && !(dl <= SSDB_G7_FAC_MAX);
      tb[l] = in && !bad ? __expf(dl) : 0.f;  // er
      tb[64 + l] = vcs;                        // csr
    } else {
      const bool in = j0 + l < len;
      const float dl = rc - vcs;
      bad = in && !(dl <= SSDB_G7_FAC_MAX);
      const float e = in && !bad ? __expf(dl) : 0.f;
      tb[128 + l] = e;           // ec
      tb[192 + l] = e * vd;      // ecd
      tb[256 + l] = vcs;         // csc
      tb[320 + l] = in ? vd : 0.f;  // dcol
    }
    if (bad) s_bad[hh & 1] = hh + 1;
  };
  float pcs = 0.f, pd = 0.f, prc = 0.f;  // prefetched (cs, d, rc) of a later head
  auto prefetch = [&](int hh) {
    if (hh >= hpg) return;
    const i64 hrow = (b * H + (i64)g * hpg + hh) * L + t0;
    const int l = tid & 63, pos = (tid < 64 ? i0 : j0) + l;
    pcs = pos < len ? cs[hrow + pos] : 0.f;
    pd = (tid >= 64 && pos < len) ? d[hrow + pos] : 0.f;
    prc = cs[hrow + s_last];
  };

  // Prologue: CB tile (its own group), the first ST - 1 slices, the seg tables, head 0's tables.
#pragma unroll
  for (int u = 0; u < 8; ++u) {
    const int q = tid + 128 * u, r = q >> 4, c4 = (q & 15) * 4;
    const bool ok = i0 + r < len && j0 + c4 < len;
    cp_async16_zfill(s_cb + r * G7_CB_LD + c4, ok ? cb + mqg + (i64)(i0 + r) * Q + j0 + c4 : cb, ok);
  }
  cp_async_commit();
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  {
    const int l = tid & 63;
    if (tid < 64) s_segr[l] = i0 + l < len ? seg[srow + i0 + l] : -1;
    else s_segc[l] = j0 + l < len ? seg[srow + j0 + l] : -2;
    if (tid < 2) s_bad[tid] = 0;
  }
  prefetch(0);
  __syncthreads();  // s_bad initialised before any stamp
  tables(0, pcs, pd, prc);
  prefetch(1);

  const int tA = wr + gq, tB = tA + 8;  // this thread's rows (tile-local)
  uint32_t msk = 0;
  float acc[8][4], Facc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[n][q] = Facc[n][q] = 0.f;

  // Column sums of head hh (4 warps' partials in s_col[hh & 1]) -> colp.
  auto col_out = [&](int hh) {
    if (tid < 64 && j0 + tid < Q) {
      const float* sc = s_col + (hh & 1) * 256;
      colp[((bch0 + hh) * nt + ti) * Q + j0 + tid] = sc[tid] + sc[64 + tid] + sc[128 + tid] + sc[192 + tid];
    }
  };

  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();  // slice `step` (and at step 0 the CB tile) visible; stage (step - 1) % ST free
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    cp_async_commit();
    const int hh = step / nsl;
    const bool first = step == hh * nsl;
    if (step == 0) {  // mask the CB elements this thread reads (and only it), keep the mask bits
      const int sgA = s_segr[tA], sgB = s_segr[tB];
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        const int sl = 8 * n + 2 * tq;
        const int sc0 = s_segc[sl], sc1 = s_segc[sl + 1];
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int tl = hf ? tB : tA, sgt = hf ? sgB : sgA;
          const bool m0 = j0 + sl <= i0 + tl && sc0 == sgt, m1 = j0 + sl + 1 <= i0 + tl && sc1 == sgt;
          float2* p = reinterpret_cast<float2*>(s_cb + tl * G7_CB_LD + sl);
          float2 v = *p;
          v.x = m0 ? v.x : 0.f;
          v.y = m1 ? v.y : 0.f;
          *p = v;
          msk |= (m0 ? 1u : 0u) << (4 * n + 2 * hf);
          msk |= (m1 ? 1u : 0u) << (4 * n + 2 * hf + 1);
        }
      }
    }
    if (first && hh > 0) col_out(hh - 1);  // deferred: s_col[(hh - 1) & 1] complete since this step's barrier
    if (first && hh + 1 < hpg) {              // next head's tables (its buffer's last reader is past the barrier)
      tables(hh + 1, pcs, pd, prc);
      prefetch(hh + 2);
    }
    const T* Ys = reinterpret_cast<const T*>(dyn + (step % ST) * G7_STAGE_BYTES);
    const T* Xs = Ys + 64 * G7_LD;
#pragma unroll
    for (int kk = 0; kk < 32; kk += 16) {
      uint32_t a[4];
      ldsm_x4(a, Ys + (wr + (lane & 7) + ((lane >> 3) & 1) * 8) * G7_LD + kk + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        uint32_t r[4];  // [s][p] K-contiguous: (s 0-7, k 0-7), (s 0-7, k 8-15), (s 8-15, k 0-7), (s 8-15, k 8-15)
        ldsm_x4(r, Xs + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * G7_LD + kk + ((lane >> 3) & 1) * 8);
        const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
        G4Mma<T>::mma(acc[2 * nb], a, b0);
        G4Mma<T>::mma(acc[2 * nb + 1], a, b1);
      }
    }
    if (step - hh * nsl != nsl - 1) continue;

    // Epilogue of head hh.
    const float* tb = s_tab + (hh & 1) * G7_TAB_FLOATS;
    const bool fac = s_bad[hh & 1] != hh + 1;  // block-uniform
    float erA = 1.f, erB = 1.f;
    const float* colf = tb + (fac ? 192 : 320);  // ecd (factored) or d
    if (fac) {
      erA = tb[tA];
      erB = tb[tB];
    } else {  // exact masked decay per element
      const float csA = tb[64 + tA], csB = tb[64 + tB];
#pragma unroll
      for (int n = 0; n < 8; ++n)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float ct = q >= 2 ? csB : csA;
          const bool on = (msk >> (4 * n + q)) & 1u;
          acc[n][q] = on ? acc[n][q] * __expf(ct - tb[256 + 8 * n + 2 * tq + (q & 1)]) : 0.f;
        }
    }
    float rs[2] = {0.f, 0.f}, cl[16];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int sl = 8 * n + 2 * tq;
      const float2 cf = *reinterpret_cast<const float2*>(colf + sl);
      const float2 cbA = *reinterpret_cast<const float2*>(s_cb + tA * G7_CB_LD + sl);
      const float2 cbB = *reinterpret_cast<const float2*>(s_cb + tB * G7_CB_LD + sl);
      const float cbv[4] = {cbA.x, cbA.y, cbB.x, cbB.y};
      float c0 = 0.f, c1 = 0.f;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float a = acc[n][q], er = q >= 2 ? erB : erA, cd = (q & 1) ? cf.y : cf.x;
        Facc[n][q] += (a * cd) * er;
        const float u = cbv[q] * a;
        rs[q >> 1] += u * cd;
        if (q & 1) c1 += u * er;
        else c0 += u * er;
        acc[n][q] = 0.f;
      }
      cl[2 * n] = c0;
      cl[2 * n + 1] = c1;
    }
    // rows: sum over the 4 lanes of a row (tq)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float v = rs[hf];
      v += SSM_SHFL_XOR(v, 1);
      v += SSM_SHFL_XOR(v, 2);
      const int tl = hf ? tB : tA;
      if (tq == 0 && i0 + tl < Q) rowp[((bch0 + hh) * nt + tj) * Q + i0 + tl] = (hf ? erB : erA) * v;
    }
    // columns: reduce-scatter over gq (lane bits 4, 3, 2): lane (gq, tq) ends with columns 8 gq + 2 tq + {0, 1}
    g7_scatter<8>(cl, lane);
    g7_scatter<4>(cl, lane);
    g7_scatter<2>(cl, lane);
    {
      float* sc = s_col + (hh & 1) * 256 + w * 64;
      const int sl = 8 * gq + 2 * tq;
      const float e0 = fac ? tb[128 + sl] : 1.f, e1 = fac ? tb[128 + sl + 1] : 1.f;
      *reinterpret_cast<float2*>(sc + sl) = make_float2(e0 * cl[0], e1 * cl[1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();
  col_out(hpg - 1);
  // F tile (lower tiles only; zeros above the diagonal, across sequences and past the chunk end).
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int t = i0 + (hf ? tB : tA), s = j0 + 8 * n + 2 * tq;
      if (t < Q && s < Q) {
        const float v0 = (msk >> (4 * n + 2 * hf)) & 1u ? Facc[n][2 * hf] : 0.f;
        const float v1 = (msk >> (4 * n + 2 * hf + 1)) & 1u ? Facc[n][2 * hf + 1] : 0.f;
        *reinterpret_cast<float2*>(F + mqg + (i64)t * Q + s) = make_float2(v0, v1);
      }
    }
}

// =====================================================================================================
// ssdb_g7b<T, KD> (session 7, helper SSDB7b; SSMCORE_SSD_BWD_G7=1 under v4): ssdb_g4<T, 1 / 2> (dC / dB per group)
// on the cp.async / ldmatrix pipeline (same grid, outputs and head split over grid y as ssdb_g4):
//   KD 1  dC[t, n] = sum_{s <= t} F[t,s] B_s[n] + sum_h fcC_h,t (dy_h,t . h0_h[:, n])
//   KD 2  dB[s, n] = sum_{t >= s} F[t,s] C_t[n] + sum_h fcB_h,s (x_h,s . dh_h[:, n])
// A block per (b, c, g, 64-row tile, 64-column n tile), 128 threads = 4 warps of 16 rows x 64 n; SSDB_G7_STAGES
// stages of 32-wide K slices by cp_async16 (zero-filled past the chunk, P, N): phase 1 (K = positions): F fp32 as
// stored ([t][s]: KD 1 float2 A fragments along s, KD 2 the transposed pairs as ssdb_dx7's CB), B / C T [k][n] by
// ldsm_x4_trans; phase 2 (K = (head, p) in per-head slices): dy (ssdb_dx7's T operand) / x T [row][p] by ldsm_x4,
// the head's row factor fcC / fcB applied to the A fragments in registers (prefetched one slice ahead), h0 / dh fp32
// [p][n] scalar pairs packed to T. Rounding: as ssdb_g4 except dy with z (rounded to T, then scaled and rounded).
// Needs P % 8 == N % 8 == Q % 4 == 0 and aligned rows (else ssdb_g4). At B8 L4096 H64 P64 N128 G1 Q256: 1024 blocks,
// phase 2 K = 4096 (256 k16 per warp: ~70 warp-instructions each, LDS-bound on the fp32 state operand): ~80 us of
// issue; HBM h0 / dh 268 MB + dy / x 268 MB (~150 us). Expected 200-350 us each (ssdb_g4: 687 / 916).
constexpr int G7B_STAGE_BYTES = 64 * 40 * 4 + 32 * 72 * 2;  // 14848 >= 32*68*4 + 32*72*2, 64*40*2 + 32*68*4

template <typename T, int KD>
__global__ void __launch_bounds__(128, 4) ssdb_g7b(
    const T* __restrict__ x, const T* __restrict__ Bm, const T* __restrict__ Cm, const T* __restrict__ dyt,
    const float* __restrict__ F, const float* __restrict__ h0, const float* __restrict__ dh,
    const float* __restrict__ fcC, const float* __restrict__ fcB, float* __restrict__ out, int batch, i64 L, int H,
    int G, int P, int N, int Q, int nc) {
  static_assert(KD == 1 || KD == 2, "ssdb_g7b: KD 1 (dC) or 2 (dB)");
  SSM_DYNAMIC_SMEM(dyn);
  constexpr int ST = SSDB_G7_STAGES;
  const int nt = (Q + 63) / 64, ntn = (N + 63) / 64, hpg = H / G;
  int c, g, ti, tj;
  {
    int r = (int)blockIdx.x;
    tj = r % ntn;
    r /= ntn;
    ti = r % nt;
    r /= nt;
    g = r % G;
    c = r / G;
  }
  const i64 b = blockIdx.z;
  const i64 t0 = (i64)c * Q;
  const int len = (int)(t0 + Q < L ? Q : L - t0);
  const int i0 = ti * 64, j0 = tj * 64;
  if (i0 >= len) return;
  const i64 srow = b * L + t0;
  const int HP = H * P, GN = G * N;
  const i64 mqg = (((b * nc + c) * (i64)G + g) * Q) * (i64)Q;
  const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, gq = lane >> 2, tq = lane & 3;
  const int wr = 16 * w;
  const int ks1 = KD == 1 ? 0 : i0, ke1 = KD == 1 ? (i0 + 64 < len ? i0 + 64 : len) : len;
  const int hps = (hpg + (int)gridDim.y - 1) / (int)gridDim.y;
  const int y_lo = (int)blockIdx.y * hps < hpg ? (int)blockIdx.y * hps : hpg;
  const int y_hi = y_lo + hps < hpg ? y_lo + hps : hpg;
  const int nsl = (P + 31) / 32;
  const int n1 = blockIdx.y > 0 ? 0 : (ke1 - ks1 + 31) / 32;
  const int nsteps = n1 + (y_hi - y_lo) * nsl;
  const T* Wm = KD == 1 ? Bm : Cm;
  const T* Am = KD == 1 ? dyt : x;
  const float* Hm = KD == 1 ? h0 : dh;
  const float* fcm = KD == 1 ? fcC : fcB;

  auto issue = [&](int step, int sb) {
    unsigned char* base = dyn + sb * G7B_STAGE_BYTES;
    if (step < n1) {
      const int k0 = ks1 + step * 32;
      float* Fs = reinterpret_cast<float*>(base);
      T* Ws = reinterpret_cast<T*>(base + 64 * 40 * 4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int q = tid + 128 * u;
        if (KD == 1) {  // [64 t][32 s], LD 40
          const int r = q >> 3, c4 = (q & 7) * 4;
          const bool ok = i0 + r < len && k0 + c4 < ke1;
          cp_async16_zfill(Fs + r * 40 + c4, ok ? F + mqg + (i64)(i0 + r) * Q + k0 + c4 : F, ok);
        } else {  // [32 t][64 s], LD 68
          const int r = q >> 4, c4 = (q & 15) * 4;
          const bool ok = k0 + r < ke1 && i0 + c4 < Q;
          cp_async16_zfill(Fs + r * 68 + c4, ok ? F + mqg + (i64)(k0 + r) * Q + i0 + c4 : F, ok);
        }
      }
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // [32 k][64 n] T, LD 72
        const int q = tid + 128 * u, r = q >> 3, c8 = (q & 7) * 8;
        const bool ok = k0 + r < ke1 && j0 + c8 < N;
        cp_async16_zfill(Ws + r * 72 + c8, ok ? Wm + (srow + k0 + r) * GN + (i64)g * N + j0 + c8 : Wm, ok);
      }
    } else {
      const int hh = y_lo + (step - n1) / nsl, k0 = ((step - n1) % nsl) * 32, h = g * hpg + hh;
      T* As = reinterpret_cast<T*>(base);
      float* Hs = reinterpret_cast<float*>(base + 64 * 40 * 2);
#pragma unroll
      for (int u = 0; u < 2; ++u) {  // [64 rows][32 p] T, LD 40
        const int q = tid + 128 * u, r = q >> 2, c8 = (q & 3) * 8;
        const bool ok = i0 + r < len && k0 + c8 < P;
        cp_async16_zfill(As + r * 40 + c8, ok ? Am + (srow + i0 + r) * HP + (i64)h * P + k0 + c8 : Am, ok);
      }
      const i64 st = ((b * nc + c) * H + h) * (i64)P * N;
#pragma unroll
      for (int u = 0; u < 4; ++u) {  // [32 p][64 n] fp32, LD 68
        const int q = tid + 128 * u, r = q >> 4, c4 = (q & 15) * 4;
        const bool ok = k0 + r < P && j0 + c4 < N;
        cp_async16_zfill(Hs + r * 68 + c4, ok ? Hm + st + (i64)(k0 + r) * N + j0 + c4 : Hm, ok);
      }
    }
  };
  const int tA = wr + gq, tB = tA + 8;
  float nfA = 0.f, nfB = 0.f;  // row factors of the next phase-2 slice
  auto load_fac = [&](int step) {
    if (step < n1 || step >= nsteps) return;
    const int h = g * hpg + y_lo + (step - n1) / nsl;
    const float* fr = fcm + (b * H + h) * L + t0 + i0;
    nfA = i0 + tA < len ? fr[tA] : 0.f;
    nfB = i0 + tB < len ? fr[tB] : 0.f;
  };
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }
  load_fac(0);

  float acc[8][4];
#pragma unroll
  for (int n = 0; n < 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
  for (int step = 0; step < nsteps; ++step) {
    cp_async_wait<ST - 2>();
    __syncthreads();
    if (step + ST - 1 < nsteps) issue(step + ST - 1, (step + ST - 1) % ST);
    cp_async_commit();
    const float cfA = nfA, cfB = nfB;
    load_fac(step + 1);
    const unsigned char* base = dyn + (step % ST) * G7B_STAGE_BYTES;
    if (step < n1) {
      const float* Fs = reinterpret_cast<const float*>(base);
      const T* Ws = reinterpret_cast<const T*>(base + 64 * 40 * 4);
#pragma unroll
      for (int kk = 0; kk < 32; kk += 16) {
        uint32_t a[4];
        if (KD == 1) {
          const float2 v0 = *reinterpret_cast<const float2*>(Fs + tA * 40 + kk + 2 * tq);
          const float2 v1 = *reinterpret_cast<const float2*>(Fs + tB * 40 + kk + 2 * tq);
          const float2 v2 = *reinterpret_cast<const float2*>(Fs + tA * 40 + kk + 8 + 2 * tq);
          const float2 v3 = *reinterpret_cast<const float2*>(Fs + tB * 40 + kk + 8 + 2 * tq);
          a[0] = G4Mma<T>::pack(v0.x, v0.y);
          a[1] = G4Mma<T>::pack(v1.x, v1.y);
          a[2] = G4Mma<T>::pack(v2.x, v2.y);
          a[3] = G4Mma<T>::pack(v3.x, v3.y);
        } else {
          const float* f0 = Fs + (kk + 2 * tq) * 68;
          a[0] = G4Mma<T>::pack(f0[tA], f0[68 + tA]);
          a[1] = G4Mma<T>::pack(f0[tB], f0[68 + tB]);
          a[2] = G4Mma<T>::pack(f0[8 * 68 + tA], f0[9 * 68 + tA]);
          a[3] = G4Mma<T>::pack(f0[8 * 68 + tB], f0[9 * 68 + tB]);
        }
#pragma unroll
        for (int nb = 0; nb < 4; ++nb) {
          uint32_t r[4];
          ldsm_x4_trans(r, Ws + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * 72 + nb * 16 + (lane >> 4) * 8);
          const uint32_t b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
          G4Mma<T>::mma(acc[2 * nb], a, b0);
          G4Mma<T>::mma(acc[2 * nb + 1], a, b1);
        }
      }
    } else {
      const T* As = reinterpret_cast<const T*>(base);
      const float* Hs = reinterpret_cast<const float*>(base + 64 * 40 * 2);
#pragma unroll
      for (int kk = 0; kk < 32; kk += 16) {
        uint32_t a[4];
        ldsm_x4(a, As + (wr + (lane & 7) + ((lane >> 3) & 1) * 8) * 40 + kk + (lane >> 4) * 8);
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // a[0], a[2]: row tA; a[1], a[3]: row tB
          const T* e = reinterpret_cast<const T*>(&a[j]);
          const float f = (j & 1) ? cfB : cfA;
          a[j] = G4Mma<T>::pack(load_f(e) * f, load_f(e + 1) * f);
        }
#pragma unroll
        for (int n = 0; n < 8; ++n) {
          const float* hr = Hs + (kk + 2 * tq) * 68 + n * 8 + gq;
          uint32_t bf[2];
          bf[0] = G4Mma<T>::pack(hr[0], hr[68]);
          bf[1] = G4Mma<T>::pack(hr[8 * 68], hr[9 * 68]);
          G4Mma<T>::mma(acc[n], a, bf);
        }
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = i0 + (hf ? tB : tA);
    if (r >= len) continue;
    float* o = out + blockIdx.y * ((i64)batch * L * GN) + ((srow + r) * G + g) * (i64)N;
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const int col = j0 + n * 8 + 2 * tq;
      if (col < N) *reinterpret_cast<float2*>(o + col) = make_float2(acc[n][2 * hf], acc[n][2 * hf + 1]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Session 8 (helper OVH8): small kernels in place of the launcher's CuPy ops (zeros, stores, reductions, casts) on
// the v4 path, so that a call is nothing but cupy.empty allocations and launches (a launch plan can replay it:
// adapters/torch/_plans.py). Sums run in a fixed order (deterministic).
//   ssdb_fill32   (i)          out[i] = v (32-bit words: float 0.0f / int 0 for the absent dt_bias and seg)
//   ssdb_dexp     (h, p)       Df[h, p] = D[h] (per head) or D[h, p] (per channel), 0 without D
//   ssdb_seg<I>   (b): block   seg[b, t] = number of seq_idx changes in 1..t (block scan over the row)
//   ssdb_rsum<T>  (o): block   out[o] = sum_r in[r1 * s1 + o_hi * s_hi + r2 * s2 + o_lo], r = r1 * R2 + r2 < R1 * R2,
//                              o = o_hi * n_lo + o_lo: thread k takes r = k, k + 256, ..., then a fixed tree
//                              (dA, ddt_bias from the per-(b, c) rows; dD from ssdb_dx7's per-tile partials)
//   ssdb_ssum<T>  (i)          out[i] = sum_{s < S} in[s * n + i] in order, stored in T (dB / dC: the head-split
//                              partials, or a plain fp32 -> T cast with S = 1)

extern "C" __global__ void ssdb_fill32(unsigned int* __restrict__ out, i64 n, unsigned int v) {
  const i64 i = gtid();
  if (i < n) out[i] = v;
}

extern "C" __global__ void ssdb_dexp(const float* __restrict__ D, float* __restrict__ Df, int H, int P,
                                     int per_channel) {
  const i64 i = gtid();
  if (i >= (i64)H * P) return;
  Df[i] = D == nullptr ? 0.f : (per_channel ? D[i] : D[i / P]);
}

#define SSDB_SEG_THREADS 256
template <typename I>
__global__ void __launch_bounds__(SSDB_SEG_THREADS) ssdb_seg(const I* __restrict__ seq, int* __restrict__ seg,
                                                             i64 L) {
  __shared__ int part[SSDB_SEG_THREADS];
  const I* s = seq + blockIdx.x * L;
  int* o = seg + blockIdx.x * L;
  const i64 per = (L + SSDB_SEG_THREADS - 1) / SSDB_SEG_THREADS;
  const i64 lo = threadIdx.x * per;
  const i64 hi = lo + per < L ? lo + per : L;
  int count = 0;
  for (i64 t = lo < 1 ? 1 : lo; t < hi; ++t) count += s[t] != s[t - 1];
  part[threadIdx.x] = count;
  __syncthreads();
  if (threadIdx.x == 0) {  // exclusive scan of the 256 counts
    int run = 0;
    for (int k = 0; k < SSDB_SEG_THREADS; ++k) {
      const int c = part[k];
      part[k] = run;
      run += c;
    }
  }
  __syncthreads();
  int run = part[threadIdx.x];
  for (i64 t = lo; t < hi; ++t) {
    if (t > 0) run += s[t] != s[t - 1];
    o[t] = run;
  }
}

#define SSDB_RSUM_THREADS 256
#ifndef SSDB_RSUM_U
#define SSDB_RSUM_U 8
#endif
template <typename T>
__global__ void __launch_bounds__(SSDB_RSUM_THREADS) ssdb_rsum(const float* __restrict__ in, T* __restrict__ out,
                                                               int n_lo, i64 R1, i64 R2, i64 s1, i64 s_hi, i64 s2) {
  // Each thread sums its rows r = tid + k * THREADS (k = 0, 1, ...) into SSDB_RSUM_U accumulators (k % U), U loads
  // in flight per round (a single running sum waited out one memory latency per row: ~60 us for dD at the main
  // shape), then the accumulators in order, then the block's tree: a fixed order, deterministic.
  constexpr int U = SSDB_RSUM_U;
  __shared__ float part[SSDB_RSUM_THREADS];
  const i64 o = blockIdx.x;
  const float* base = in + (o / n_lo) * s_hi + (o % n_lo);
  const i64 R = R1 * R2;
  const bool small = R < 2147483647 && R2 < 2147483647;  // 32-bit index division
  auto at = [&](i64 q) {
    const i64 q1 = small ? (i64)((unsigned)q / (unsigned)R2) : q / R2;
    return base[q1 * s1 + (q - q1 * R2) * s2];
  };
  float acc[U];
#pragma unroll
  for (int u = 0; u < U; ++u) acc[u] = 0.f;
  i64 r = threadIdx.x;
  for (; r + (U - 1) * (i64)SSDB_RSUM_THREADS < R; r += U * (i64)SSDB_RSUM_THREADS) {
    float v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = at(r + u * (i64)SSDB_RSUM_THREADS);
#pragma unroll
    for (int u = 0; u < U; ++u) acc[u] += v[u];
  }
  for (; r < R; r += SSDB_RSUM_THREADS) acc[0] += at(r);  // (fewer than U rows left)
  float a = acc[0];
#pragma unroll
  for (int u = 1; u < U; ++u) a += acc[u];
  part[threadIdx.x] = a;
  __syncthreads();
#pragma unroll
  for (int w = SSDB_RSUM_THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) store_f(out + o, part[0]);
}

template <typename T>
__global__ void ssdb_ssum(const float* __restrict__ in, T* __restrict__ out, i64 n, int S) {
  // 4 consecutive elements per thread (independent loads in flight; each element's sum in the same order)
  const i64 i0 = gtid() * 4;
  if (i0 >= n) return;
  const int m = n - i0 < 4 ? (int)(n - i0) : 4;
  float acc[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) acc[u] = u < m ? in[i0 + u] : 0.f;  // (S = 1: exactly a cast)
  for (int s = 1; s < S; ++s)
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (u < m) acc[u] += in[s * n + i0 + u];
#pragma unroll
  for (int u = 0; u < 4; ++u)
    if (u < m) store_f(out + i0 + u, acc[u]);
}
