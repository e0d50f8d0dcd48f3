// Helpers shared by the CUDA kernels: loads that widen to float, the checks
// every CUDA entry point makes, and warp reductions.
#pragma once

#include <cstdint>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// Instantiate kernels for the three dtypes the CUDA kernels take, and no more.
#define DANET_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace danet {
namespace cuda {

constexpr int kThreads = 256;  // every kernel here runs 16 x 16 threads

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// acc[r][c] += a[r] * b[c]: the register-tile step of every product here.
template <int kR, int kC>
__device__ __forceinline__ void rank1_update(float (&acc)[kR][kC], const float (&a)[kR], const float (&b)[kC]) {
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[r][c] += a[r] * b[c];
}

// Reduce over the 16 lanes that share a row (lanes 0-15 or 16-31 of a warp).
__device__ __forceinline__ float max16(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ float sum16(float v) {
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum / minimum over the whole block (blockDim.x == kThreads); every thread
// gets the result. `scratch` holds kThreads / 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

__device__ __forceinline__ float block_min(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) m = fminf(m, scratch[w]);
  return m;
}

inline void check_is_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "danet_ext: `", name, "` must be a CUDA tensor, got ", t.device());
}

constexpr int64_t kMaxGridYZ = 65535;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The CUDA kernels compute in float32 and take float32, float16 and bfloat16.
inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "danet_ext: the CUDA kernels take float32, float16 or bfloat16; `", name,
              "` is ", st, " (use backend=\"reference\" for float64 on CUDA)");
}

}  // namespace cuda
}  // namespace danet
