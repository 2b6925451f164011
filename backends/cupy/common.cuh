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
