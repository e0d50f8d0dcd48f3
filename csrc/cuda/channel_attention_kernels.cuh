// Channel attention (CAM) kernels, their launch geometry and launch sequence
// on raw pointers. Compiled by nvcc through channel_attention.cu and, for the
// tests, by the host compiler through the CUDA emulation (tests/cuda_emulation).
//
// With X = x[b] as C x N:  E = X X^T,  A = softmax(rowmax(E) - E), computed as
// exp(rowmin(E) - E) / sum,  out = A X.
// Post-ReLU features make E large and positive (thousands at C = 512,
// N = 97 x 97), past float16's comfort: E, A and every accumulator are
// float32 whatever the input dtype. The products run through one tiled
// shared-memory GEMM kernel; the softmax and its backward are one block per row.
#pragma once

#include <cmath>
#include <cstdint>

#include "device_common.cuh"
#include "launch.cuh"

namespace danet {
namespace cuda {
namespace {

constexpr int kTileM = 64, kTileN = 64, kTileDepth = 16;

// C[b] = op(A[b]) op(B[b]) + beta * C[b]; op(A) is M x K, op(B) is K x Nc,
// all row-major with the given leading dimensions; kTransA means A is stored
// K x M (likewise B). Accumulates in float32. grid: (Nc tiles, M tiles, batch).
template <typename TA, typename TB, typename TC, bool kTransA, bool kTransB>
__global__ void __launch_bounds__(kThreads)
    batched_gemm_kernel(const TA* __restrict__ a, const TB* __restrict__ b, TC* __restrict__ c,
                        int64_t M, int64_t Nc, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                        int64_t stride_a, int64_t stride_b, int64_t stride_c, float beta) {
  DANET_SHARED(float, as, [kTileDepth][kTileM + 1]);
  DANET_SHARED(float, bs, [kTileDepth][kTileN + 1]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t batch = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTileM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileN;
  a += batch * stride_a;
  b += batch * stride_b;
  c += batch * stride_c;
  float acc[4][4] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileDepth) {
    for (int e = tid; e < kTileDepth * kTileM; e += kThreads) {
      int kk, mm;
      if (kTransA) { kk = e / kTileM; mm = e % kTileM; } else { mm = e / kTileDepth; kk = e % kTileDepth; }
      const int64_t gk = k0 + kk, gm = m0 + mm;
      float val = 0.f;
      if (gk < K && gm < M) val = to_float(kTransA ? a[gk * lda + gm] : a[gm * lda + gk]);
      as[kk][mm] = val;
    }
    for (int e = tid; e < kTileDepth * kTileN; e += kThreads) {
      int kk, nn;
      if (kTransB) { nn = e / kTileDepth; kk = e % kTileDepth; } else { kk = e / kTileN; nn = e % kTileN; }
      const int64_t gk = k0 + kk, gn = n0 + nn;
      float val = 0.f;
      if (gk < K && gn < Nc) val = to_float(kTransB ? b[gn * ldb + gk] : b[gk * ldb + gn]);
      bs[kk][nn] = val;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileDepth; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = as[kk][ty + 16 * r];
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = bs[kk][tx + 16 * q];
      rank1_update(acc, av, bv);
    }
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int64_t gm = m0 + ty + 16 * r;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t gn = n0 + tx + 16 * q;
      if (gm < M && gn < Nc) {
        float val = acc[r][q];
        if (beta != 0.f) val += beta * to_float(c[gm * ldc + gn]);
        c[gm * ldc + gn] = from_float<TC>(val);
      }
    }
  }
}

inline LaunchGeometry gemm_geometry(int64_t batch, int64_t M, int64_t Nc) {
  return make_geometry("batched_gemm_kernel", ceil_div(Nc, kTileN), ceil_div(M, kTileM), batch, kThreads);
}

template <typename TA, typename TB, typename TC, bool kTransA, bool kTransB>
void launch_gemm(const TA* a, const TB* b, TC* c, int64_t batch, int64_t M, int64_t Nc, int64_t K,
                 int64_t lda, int64_t ldb, int64_t ldc, int64_t stride_a, int64_t stride_b,
                 int64_t stride_c, float beta, cudaStream_t stream) {
  auto kernel = batched_gemm_kernel<TA, TB, TC, kTransA, kTransB>;
  DANET_LAUNCH(kernel, gemm_geometry(batch, M, Nc), stream, a, b, c, M, Nc, K, lda, ldb, ldc, stride_a,
               stride_b, stride_c, beta);
}

// In place, one block per row of E (B*C rows of length C): e <- softmax(-e),
// shifted by the row minimum.
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

// In place, one block per row: g <- dE = -A * (g - sum_j g_j A_j), where g = dA.
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

// sym[b] = g[b] + g[b]^T, element-wise over B*C*C.
__global__ void symmetrize_kernel(const float* __restrict__ g, float* __restrict__ sym, int64_t C,
                                  int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t b = idx / (C * C), rest = idx % (C * C), i = rest / C, j = rest % C;
  sym[idx] = g[idx] + g[b * C * C + j * C + i];
}

// One block per row of the B*C rows of E.
inline LaunchGeometry row_geometry(const char* kernel, int64_t B, int64_t C) {
  return make_geometry(kernel, B * C, 1, 1, kThreads);
}

inline LaunchGeometry symmetrize_geometry(int64_t total) {
  return make_geometry("symmetrize_kernel", ceil_div(total, kThreads), 1, 1, kThreads);
}

// The forward on raw pointers: x (B, C, N) contiguous; out like x; attn (B, C, C) float32.
template <typename T>
void channel_attention_forward_launch(const T* x, T* out, float* attn, int64_t B, int64_t C, int64_t N,
                                      cudaStream_t stream) {
  if (B == 0 || C == 0) return;
  // E = X X^T
  launch_gemm<T, T, float, false, true>(x, x, attn, B, C, C, N, N, N, C, C * N, C * N, C * C, 0.f, stream);
  DANET_LAUNCH(negated_softmax_kernel, row_geometry("negated_softmax_kernel", B, C), stream, attn, C);
  if (N > 0) {  // out = A X
    launch_gemm<float, T, T, false, false>(attn, x, out, B, C, N, C, C, N, N, C * C, C * N, C * N, 0.f, stream);
  }
}

// The backward on raw pointers: grad_out, x (B, C, N); attn, grad_e, grad_sym
// (B, C, C) float32 (the last two are workspaces); dx (B, C, N) float32.
template <typename T>
void channel_attention_backward_launch(const T* grad_out, const T* x, const float* attn, float* grad_e,
                                       float* grad_sym, float* dx, int64_t B, int64_t C, int64_t N,
                                       cudaStream_t stream) {
  if (B == 0 || C == 0 || N == 0) return;
  // dA = dO X^T
  launch_gemm<T, T, float, false, true>(grad_out, x, grad_e, B, C, C, N, N, N, C, C * N, C * N, C * C, 0.f,
                                        stream);
  DANET_LAUNCH(negated_softmax_backward_kernel, row_geometry("negated_softmax_backward_kernel", B, C), stream,
               grad_e, attn, C);
  const int64_t total = B * C * C;
  DANET_LAUNCH(symmetrize_kernel, symmetrize_geometry(total), stream, grad_e, grad_sym, C, total);
  // dX = A^T dO + (dE + dE^T) X
  launch_gemm<float, T, float, true, false>(attn, grad_out, dx, B, C, N, C, C, N, N, C * C, C * N, C * N, 0.f,
                                            stream);
  launch_gemm<float, T, float, false, false>(grad_sym, x, dx, B, C, N, C, C, N, N, C * C, C * N, C * N, 1.f,
                                             stream);
}

}  // namespace
}  // namespace cuda
}  // namespace danet
