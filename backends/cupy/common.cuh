// Portability header for ssmcore kernels: one source for CUDA (NVRTC) and HIP (hiprtc).
// Hides the warp size, shuffle masks and the 16-bit float type names. Pasted in front of
// every <family>.cu by _runtime.source(), so it must stay self-contained.
#pragma once

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define SSM_HIP 1
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>
typedef __half half_t;
typedef hip_bfloat16 bf16_t;
#define SSM_WARP_SIZE 64
#define SSM_FULL_MASK 0xffffffffffffffffull
#define SSM_SHFL_XOR(v, lane) __shfl_xor((v), (lane))
#define SSM_SHFL_UP(v, delta) __shfl_up((v), (delta))
#define SSM_SHFL_DOWN(v, delta) __shfl_down((v), (delta))
#define SSM_SHFL(v, lane) __shfl((v), (lane))
__device__ __forceinline__ float to_float(bf16_t x) { return static_cast<float>(x); }
__device__ __forceinline__ bf16_t to_bf16(float x) { return bf16_t(x); }
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
