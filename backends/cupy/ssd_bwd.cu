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
// v3 (default) = v2 with ssdb_mm3 (products), ssdb_pass2 (state passing) and ssdb_dcs3: the same math and
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

// dy = dout * silu(z) (or dout), fp32, (B, L, H, P).
template <typename T>
__global__ void ssdb_dy(const T* __restrict__ dout, const T* __restrict__ z, float* __restrict__ dy, i64 n) {
  const i64 i = gtid();
  if (i >= n) return;
  float g = load_f(dout + i);
  if (z != nullptr) g *= silu_f(load_f(z + i));
  dy[i] = g;
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
constexpr int SSDB_PASS_UNROLL = 8;
extern "C" __global__ void ssdb_pass2(int reverse, float* __restrict__ buf, const float* __restrict__ init,
                                      float* __restrict__ dinit, const float* __restrict__ cs,
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
    float4 v[SSDB_PASS_UNROLL];
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
    }
#pragma unroll
    for (int u = 0; u < SSDB_PASS_UNROLL; ++u) {
      if (k0 + u >= nc) break;
      buf4[o[u]] = carry;
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
