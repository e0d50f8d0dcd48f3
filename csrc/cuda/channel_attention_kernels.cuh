// Channel attention (CAM) kernels and their launch geometry: the row softmax
// between the products and its backward. The products themselves run on cuBLAS
// (channel_attention_sequence.cuh). Compiled by nvcc through
// channel_attention.cu and, for the tests, by the host compiler through the
// CUDA emulation (tests/cuda_emulation).
//
// With E = X X^T (float32, B*C rows of length C): A = softmax(rowmax(E) - E),
// computed as exp(rowmin(E) - E) / sum. Post-ReLU features make E large and
// positive (thousands at C = 512, N = 97 x 97): the shift by the row minimum
// keeps every exponent <= 0. One block per row, in place.
#pragma once

#include <cmath>
#include <cstdint>

#include "device_common.cuh"
#include "launch.cuh"

namespace danet {
namespace cuda {
namespace {

// e <- softmax(-e) row by row, shifted by the row minimum.
__global__ void __launch_bounds__(kThreads) negated_softmax_kernel(float* __restrict__ e, int64_t C) {
  DANET_SHARED(float, scratch, [kThreads / 32]);
  float* row = e + static_cast<int64_t>(blockIdx.x) * C;
  float m = INFINITY;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) m = fminf(m, row[j]);
  m = block_min(m, scratch);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) {
    const float p = expf(m - row[j]);
    row[j] = p;
    sum += p;
  }
  const float inv = 1.f / block_sum(sum, scratch);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) row[j] *= inv;
}

// g <- dE = -A * (g - sum_j g_j A_j) row by row, where g = dA on entry.
__global__ void __launch_bounds__(kThreads)
    negated_softmax_backward_kernel(float* __restrict__ g, const float* __restrict__ attn, int64_t C) {
  DANET_SHARED(float, scratch, [kThreads / 32]);
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * C;
  float* grow = g + offset;
  const float* arow = attn + offset;
  float dot = 0.f;
  for (int64_t j = threadIdx.x; j < C; j += kThreads) dot += grow[j] * arow[j];
  dot = block_sum(dot, scratch);
  for (int64_t j = threadIdx.x; j < C; j += kThreads) grow[j] = -arow[j] * (grow[j] - dot);
}

// One block per row of the B*C rows.
inline LaunchGeometry row_geometry(const char* kernel, int64_t B, int64_t C) {
  return make_geometry(kernel, B * C, 1, 1, kThreads);
}

// e: B*C rows of C float32, contiguous; softmax in place.
inline void negated_softmax_launch(float* e, int64_t B, int64_t C, cudaStream_t stream) {
  DANET_LAUNCH(negated_softmax_kernel, row_geometry("negated_softmax_kernel", B, C), stream, e, C);
}

// g (dA on entry, dE on return), attn: B*C rows of C float32, contiguous.
inline void negated_softmax_backward_launch(float* g, const float* attn, int64_t B, int64_t C,
                                            cudaStream_t stream) {
  DANET_LAUNCH(negated_softmax_backward_kernel, row_geometry("negated_softmax_backward_kernel", B, C), stream,
               g, attn, C);
}

}  // namespace
}  // namespace cuda
}  // namespace danet
