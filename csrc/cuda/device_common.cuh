// Device helpers shared by the CUDA kernels: loads that widen to float and
// warp/block reductions. Included by the *_kernels.cuh headers, which nvcc
// compiles for the GPU and the CUDA emulation (tests/cuda_emulation) for the CPU.
#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "launch.cuh"

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

// v rounded to TF32 (10 mantissa bits, ties away from zero), as cvt.rna.tf32.f32
// rounds it; a float again. Plain bit arithmetic, so that it runs anywhere.
__device__ __forceinline__ float round_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7F800000u) != 0x7F800000u) bits = (bits + 0x1000u) & ~0x1FFFu;
  std::memcpy(&v, &bits, 4);
  return v;
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

}  // namespace cuda
}  // namespace danet
