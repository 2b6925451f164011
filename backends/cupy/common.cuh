// Portability header for ssmcore kernels: one source for CUDA (NVRTC) and HIP (hiprtc).
// Hides the warp size, shuffle masks and the 16-bit float type names. Pasted in front of
// every <family>.cu by _runtime.source(), so it must stay self-contained.
#pragma once

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define SSM_HIP 1
#if defined(__HIPCC_RTC__)
// hiprtc predefines __half and its conversions; including <hip/hip_fp16.h> again can clash with
// its built-in copy (ROCm 5.2). It has no <cstdint>: the clang builtin types stdint.h would use.
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
#else  // hipcc (as CuPy's hipcc backend and `ssmcore check-kernels --hip` compile it)
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#endif
typedef __half half_t;
// bfloat16 as plain 16-bit storage with our own conversions: hip_bfloat16 / __hip_bfloat16 and
// their headers differ across ROCm versions and between hipcc and hiprtc. Same layout as torch's.
struct bf16_t {
  unsigned short bits;
};
#define SSM_WARP_SIZE 64
#define SSM_FULL_MASK 0xffffffffffffffffull
#define SSM_SHFL_XOR(v, lane) __shfl_xor((v), (lane))
#define SSM_SHFL_UP(v, delta) __shfl_up((v), (delta))
#define SSM_SHFL_DOWN(v, delta) __shfl_down((v), (delta))
#define SSM_SHFL(v, lane) __shfl((v), (lane))
// CUDA's __trap() (abort the kernel) has no HIP declaration; clang's builtin does the same.
#define __trap() __builtin_trap()
__device__ __forceinline__ float to_float(bf16_t x) {
  const unsigned int u = static_cast<unsigned int>(x.bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16_t to_bf16(float x) {
  unsigned int u;
  __builtin_memcpy(&u, &x, 4);
  const unsigned int r = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : u + 0x7fffu + ((u >> 16) & 1u);
  bf16_t b;
  b.bits = static_cast<unsigned short>(r >> 16);
  return b;
}
#else
#define SSM_HIP 0
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef __half half_t;
typedef __nv_bfloat16 bf16_t;
#define SSM_WARP_SIZE 32
#define SSM_FULL_MASK 0xffffffffu
#define SSM_SHFL_XOR(v, lane) __shfl_xor_sync(SSM_FULL_MASK, (v), (lane))
#define SSM_SHFL_UP(v, delta) __shfl_up_sync(SSM_FULL_MASK, (v), (delta))
#define SSM_SHFL_DOWN(v, delta) __shfl_down_sync(SSM_FULL_MASK, (v), (delta))
#define SSM_SHFL(v, lane) __shfl_sync(SSM_FULL_MASK, (v), (lane))
__device__ __forceinline__ float to_float(bf16_t x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16_t to_bf16(float x) { return __float2bfloat16(x); }
#endif

typedef long long i64;

// Load any supported element type as float, store float as any element type.
__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const double* p) { return static_cast<float>(*p); }
__device__ __forceinline__ float load_f(const half_t* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f(const bf16_t* p) { return to_float(*p); }
__device__ __forceinline__ void store_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f(double* p, float v) { *p = static_cast<double>(v); }
__device__ __forceinline__ void store_f(half_t* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f(bf16_t* p, float v) { *p = to_bf16(v); }

__device__ __forceinline__ float softplus_f(float x) { return x > 20.f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ float silu_f(float x) { return x * sigmoid_f(x); }

// Warp-wide sum (all lanes get the result).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = SSM_WARP_SIZE / 2; offset > 0; offset >>= 1) v += SSM_SHFL_XOR(v, offset);
  return v;
}

// ---- 8-element chunks (norm, conv, state_update) -------------------------------------------
// Elements [i, i + 8) of a row p[0 .. n) as float, out-of-row elements read as 0. With vec
// (the caller checked that p is 16-byte aligned and i a multiple of 8) a full chunk is one
// 16-byte access for 16-bit types and two for float; otherwise element by element.
template <typename T>
__device__ __forceinline__ void load_chunk8(const T* p, i64 i, i64 n, bool vec, float (&v)[8]) {
  if (vec && i + 8 <= n) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int h = 0; h < 8 / PER; ++h) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + i + h * PER);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < PER; ++k) v[h * PER + k] = load_f(e + k);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = (i + k < n) ? load_f(p + i + k) : 0.f;
  }
}

// Stores v[0 .. 8) to p[i .. i + 8), skipping elements at or past n (same vec rule as above).
template <typename T>
__device__ __forceinline__ void store_chunk8(T* p, i64 i, i64 n, bool vec, const float (&v)[8]) {
  if (vec && i + 8 <= n) {
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int h = 0; h < 8 / PER; ++h) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < PER; ++k) store_f(e + k, v[h * PER + k]);
      *reinterpret_cast<uint4*>(p + i + h * PER) = raw;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (i + k < n) store_f(p + i + k, v[k]);
  }
}

// ---- row reductions: blockDim.x threads own one row, blockDim.y rows per block ------------
// blockDim.x is a power of two <= SSM_WARP_SIZE or a multiple of it; the block has at least
// one full warp. `red` is __shared__ scratch of 2 * (threads per block / SSM_WARP_SIZE) floats.
// Every thread of the block must call these (they may hold __syncthreads).
__device__ __forceinline__ void row_sum2(float& a, float& b, float* red) {
  const int tpr = blockDim.x;
  if (tpr <= SSM_WARP_SIZE) {
    for (int o = tpr >> 1; o > 0; o >>= 1) {
      a += SSM_SHFL_XOR(a, o);
      b += SSM_SHFL_XOR(b, o);
    }
    return;
  }
  a = warp_sum(a);
  b = warp_sum(b);
  const int nw = tpr / SSM_WARP_SIZE, w = threadIdx.x / SSM_WARP_SIZE;
  float* r = red + 2 * threadIdx.y * nw;
  __syncthreads();  // the previous reduction's readers are done with red
  if (threadIdx.x % SSM_WARP_SIZE == 0) {
    r[2 * w] = a;
    r[2 * w + 1] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  for (int k = 0; k < nw; ++k) {
    a += r[2 * k];
    b += r[2 * k + 1];
  }
}

__device__ __forceinline__ float row_sum(float a, float* red) {
  float b = 0.f;
  row_sum2(a, b, red);
  return a;
}

// ---- column sums of float32 partials (backward passes' dweight/dbias) ----------------------
// out[d] = sum over rows of part[row, d] (float32 partials -> the parameter's dtype).
// Block (32, 8): 32 columns, rows split over threadIdx.y, combined through __shared__ memory.
template <typename TO>
__global__ void __launch_bounds__(256) column_sum(const float* __restrict__ part, i64 nrows, int D,
                                                  TO* __restrict__ out) {
  __shared__ float acc[8][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (col < D)
    for (i64 r = threadIdx.y; r < nrows; r += 8) s += part[r * D + col];
  acc[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    float t = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) t += acc[k][threadIdx.x];
    store_f(out + col, t);
  }
}

// ---- activations for memory-bound kernels ---------------------------------------------------
// silu with an approximate division (__fdividef, 2 ulp; 0 for x < -88 where 1 + e^-x overflows):
// a handful of instructions instead of an IEEE division's subroutine.
__device__ __forceinline__ float silu_fast(float x) { return __fdividef(x, 1.f + __expf(-x)); }
// d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
__device__ __forceinline__ float silu_grad_f(float x) {
  const float sig = sigmoid_f(x);
  return sig * (1.f + x * (1.f - sig));
}

// ---- tensor cores: warp-level mma (SSD kernels) ----------------------------------------------
// D += A*B on one warp, fp32 accumulate. Fragment layouts are the PTX ISA ones for
// mma.sync.aligned.m16n8k16.row.col: g = lane >> 2, t = lane & 3; pairs are packed with the
// lower column/row index in the low half.
//   a[0] = A[g][2t,2t+1], a[1] = A[g+8][2t,2t+1], a[2] = A[g][2t+8,2t+9], a[3] = A[g+8][2t+8,2t+9]  (A 16x16)
//   b[0] = B[2t,2t+1][g], b[1] = B[2t+8,2t+9][g]                                                  (B 16x8)
//   c[0], c[1] = C[g][2t,2t+1];  c[2], c[3] = C[g+8][2t,2t+1]                                      (C 16x8)
// tf32 m16n8k8: a[0]=A[g][t], a[1]=A[g+8][t], a[2]=A[g][t+4], a[3]=A[g+8][t+4]; b[0]=B[t][g], b[1]=B[t+4][g].
// CUDA: inline PTX (sm_80+). HIP and the CPU emulator (SSM_EMULATION): a portable warp-shuffle
// version with the same fragment layout and the same products (slow; for testing/portability).
#if !SSM_HIP && !defined(SSM_EMULATION)
#define SSM_MMA_PTX 1
#if defined(__CUDACC_RTC__)  // NVRTC has no <cstdint>
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
#endif
#else
#define SSM_MMA_PTX 0
#endif

// 2^x on the SFU (ex2.approx.ftz: results below 2^-126 flush to 0, relative error ~2^-22); exp2f on HIP and in the
// CPU emulator. The scan's and the SSD's decays.
__device__ __forceinline__ float exp2_fast(float x) {
#if SSM_MMA_PTX
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
#if SSM_MMA_PTX
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  bf16_t l = to_bf16(lo), h = to_bf16(hi);
  uint16_t lb, hb;
  __builtin_memcpy(&lb, &l, 2);
  __builtin_memcpy(&hb, &h, 2);
  return uint32_t(lb) | (uint32_t(hb) << 16);
#endif
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
#if SSM_MMA_PTX
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
#else
  half_t l = __float2half_rn(lo), h = __float2half_rn(hi);
  uint16_t lb, hb;
  __builtin_memcpy(&lb, &l, 2);
  __builtin_memcpy(&hb, &h, 2);
  return uint32_t(lb) | (uint32_t(hb) << 16);
#endif
}

// x rounded to tf32 (10-bit mantissa, round to nearest, ties away: cvt.rna), as fp32 bits.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if SSM_MMA_PTX
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  uint32_t u;
  __builtin_memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // inf/NaN kept
  return u;
#endif
}

// v as a sum of two tf32 values, hi + lo (about fp32 precision): the operand split of 3xTF32 products.
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(v);
#if SSM_MMA_PTX
  const float h = __uint_as_float(hi);
#else
  float h;
  __builtin_memcpy(&h, &hi, 4);
#endif
  lo = to_tf32(v - h);
}

#if !SSM_MMA_PTX
namespace ssm_mma_detail {
__device__ __forceinline__ float lo_bf16(uint32_t v) {
  uint32_t u = v << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
__device__ __forceinline__ float hi_bf16(uint32_t v) {
  uint32_t u = v & 0xffff0000u;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
__device__ __forceinline__ float half_bits(uint32_t v) {
  uint16_t b = uint16_t(v & 0xffffu);
  half_t h;
  __builtin_memcpy(&h, &b, 2);
  return __half2float(h);
}
__device__ __forceinline__ float lo_f16(uint32_t v) { return half_bits(v); }
__device__ __forceinline__ float hi_f16(uint32_t v) { return half_bits(v >> 16); }
__device__ __forceinline__ float f32_bits(uint32_t v) {
  float f;
  __builtin_memcpy(&f, &v, 4);
  return f;
}
__device__ __forceinline__ int lane32() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31; }
// The hardware lane of lane 0 of this 32-lane group (0, or 32 in the upper half of a HIP wave64).
__device__ __forceinline__ int group_base() {
  return (int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % SSM_WARP_SIZE) & ~31;
}

// m16n8k16 with 16-bit pairs; LO/HI unpack the low/high element of a pair.
template <float (*LO)(uint32_t), float (*HI)(uint32_t)>
__device__ __forceinline__ void mma_16816_generic(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = lane32(), g = lane >> 2, t = lane & 3, o = group_base();
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int tp = 0; tp < 4; ++tp) {  // k pairs 2tp, 2tp+1 and 2tp+8, 2tp+9
    const uint32_t a0 = SSM_SHFL(a[0], o + g * 4 + tp), a1 = SSM_SHFL(a[1], o + g * 4 + tp);
    const uint32_t a2 = SSM_SHFL(a[2], o + g * 4 + tp), a3 = SSM_SHFL(a[3], o + g * 4 + tp);
    for (int j = 0; j < 2; ++j) {  // output column 2t + j lives in lanes (2t + j) * 4 + tp
      const uint32_t b0 = SSM_SHFL(b[0], o + (2 * t + j) * 4 + tp), b1 = SSM_SHFL(b[1], o + (2 * t + j) * 4 + tp);
      s[j] += LO(a0) * LO(b0) + HI(a0) * HI(b0) + LO(a2) * LO(b1) + HI(a2) * HI(b1);
      s[2 + j] += LO(a1) * LO(b0) + HI(a1) * HI(b0) + LO(a3) * LO(b1) + HI(a3) * HI(b1);
    }
  }
  for (int i = 0; i < 4; ++i) c[i] += s[i];
}
}  // namespace ssm_mma_detail
#endif

__device__ __forceinline__ void mma_16816_bf16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if SSM_MMA_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  ssm_mma_detail::mma_16816_generic<ssm_mma_detail::lo_bf16, ssm_mma_detail::hi_bf16>(c, a, b);
#endif
}

__device__ __forceinline__ void mma_16816_f16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if SSM_MMA_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  ssm_mma_detail::mma_16816_generic<ssm_mma_detail::lo_f16, ssm_mma_detail::hi_f16>(c, a, b);
#endif
}

__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if SSM_MMA_PTX
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  using namespace ssm_mma_detail;
  const int lane = lane32(), g = lane >> 2, t = lane & 3, o = group_base();
  float s[4] = {0.f, 0.f, 0.f, 0.f};
  for (int tp = 0; tp < 4; ++tp) {  // k = tp and tp + 4
    const float a0 = f32_bits(SSM_SHFL(a[0], o + g * 4 + tp)), a1 = f32_bits(SSM_SHFL(a[1], o + g * 4 + tp));
    const float a2 = f32_bits(SSM_SHFL(a[2], o + g * 4 + tp)), a3 = f32_bits(SSM_SHFL(a[3], o + g * 4 + tp));
    for (int j = 0; j < 2; ++j) {
      const float b0 = f32_bits(SSM_SHFL(b[0], o + (2 * t + j) * 4 + tp));
      const float b1 = f32_bits(SSM_SHFL(b[1], o + (2 * t + j) * 4 + tp));
      s[j] += a0 * b0 + a2 * b1;
      s[2 + j] += a1 * b0 + a3 * b1;
    }
  }
  for (int i = 0; i < 4; ++i) c[i] += s[i];
#endif
}

// ---- asynchronous copies and shared-memory fragment loads (pipelined mma kernels) ---------------
// cp_async16: 16 bytes global -> shared without a register round trip (cp.async.cg, sm_80+); _zfill writes
// 16 zero bytes instead when !valid (no global read; pass any mapped address). Group them with cp_async_commit
// and wait with cp_async_wait<N> (at most N most recent groups still in flight), then __syncthreads() before
// other threads read the data. Both addresses 16-byte aligned. HIP / the CPU emulator: a plain synchronous copy.
// ldsm_x4 / ldsm_x2 (ldmatrix.m8n8.b16): lane i passes the shared address of row (i % 8) of 8x8 matrix i / 8
// (16 contiguous bytes, 16-byte aligned; x2: lanes 0-15 count); lane (g = lane >> 2, t = lane & 3) receives
// r[j] = M_j[g][2t, 2t+1] (low half first): the A fragment of mma_16816 (matrices: rows 0-7 / 8-15 x k 0-7, then
// k 8-15) or the B fragment from a K-contiguous B^T tile. The _trans forms give r[j] = (M_j[2t][g], M_j[2t+1][g]):
// the B fragment from a row-major (k rows, n contiguous) tile. Portable fallback: the rows' addresses by shuffle.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  __builtin_memcpy(smem, gmem, 16);
#endif
}

__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
#else
  if (valid) {
    __builtin_memcpy(smem, gmem, 16);
  } else {
    unsigned char* d = static_cast<unsigned char*>(smem);
    for (int i = 0; i < 16; ++i) d[i] = 0;
  }
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if SSM_MMA_PTX
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if SSM_MMA_PTX
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

#if !SSM_MMA_PTX
namespace ssm_mma_detail {
// The row address lane `src` of this 32-lane group passed, as a 16-bit element pointer.
__device__ __forceinline__ const uint16_t* row_from(const void* p, int src) {
  const unsigned long long v = reinterpret_cast<unsigned long long>(p);
  const unsigned lo = SSM_SHFL(static_cast<unsigned>(v), src);
  const unsigned hi = SSM_SHFL(static_cast<unsigned>(v >> 32), src);
  return reinterpret_cast<const uint16_t*>((static_cast<unsigned long long>(hi) << 32) | lo);
}
template <int M, bool TRANS>
__device__ __forceinline__ void ldsm_generic(uint32_t* r, const void* p) {
  const int lane = lane32(), g = lane >> 2, t = lane & 3, o = group_base();
  for (int j = 0; j < 4; ++j) {  // every lane joins every shuffle
    if (TRANS) {
      const uint16_t* r0 = row_from(p, o + (j & (M - 1)) * 8 + 2 * t);
      const uint16_t* r1 = row_from(p, o + (j & (M - 1)) * 8 + 2 * t + 1);
      if (j < M) r[j] = uint32_t(r0[g]) | (uint32_t(r1[g]) << 16);
    } else {
      const uint16_t* row = row_from(p, o + (j & (M - 1)) * 8 + g);
      if (j < M) r[j] = uint32_t(row[2 * t]) | (uint32_t(row[2 * t + 1]) << 16);
    }
  }
}
}  // namespace ssm_mma_detail
#endif

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  ssm_mma_detail::ldsm_generic<4, false>(r, row);
#endif
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#else
  ssm_mma_detail::ldsm_generic<4, true>(r, row);
#endif
}

__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#else
  ssm_mma_detail::ldsm_generic<2, false>(r, row);
#endif
}

__device__ __forceinline__ void ldsm_x2_trans(uint32_t (&r)[2], const void* row) {
#if SSM_MMA_PTX
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(s));
#else
  ssm_mma_detail::ldsm_generic<2, true>(r, row);
#endif
}

// 16-byte load / store of a stream read or written once; HINT: the evict-first cache operator
// (ld/st.global.cs: L2 keeps other data rather than the stream; CUDA only; norm and conv streams).
template <bool HINT>
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
#if !SSM_HIP && !defined(SSM_EMULATION)
  if (HINT) {
    uint4 r;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
  }
#endif
  return *reinterpret_cast<const uint4*>(p);
}

template <bool HINT>
__device__ __forceinline__ void st_stream16(void* p, const uint4& v) {
#if !SSM_HIP && !defined(SSM_EMULATION)
  if (HINT) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
                 : "memory");
    return;
  }
#endif
  *reinterpret_cast<uint4*>(p) = v;
}

// Dynamic shared memory of a kernel, as `unsigned char name[]` aligned to 16 bytes.
#ifdef SSM_EMULATION
#define SSM_DYNAMIC_SMEM(name) alignas(16) static unsigned char name[256 * 1024]
#else
#define SSM_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
