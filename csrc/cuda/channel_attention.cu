// Channel attention (CAM) on CUDA: forward and backward kernels, launchers,
// and their registration for the CUDA dispatch key.
//
// With X = x[b] as C x N:  E = X X^T,  A = softmax(rowmax(E) - E), computed as
// exp(rowmin(E) - E) / sum,  out = A X.
// Post-ReLU features make E large and positive (thousands at C = 512,
// N = 97 x 97), past float16's comfort: E, A and every accumulator are
// float32 whatever the input dtype. The products run through one tiled
// shared-memory GEMM kernel; the softmax and its backward are one block per row.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

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
  __shared__ float as[kTileDepth][kTileM + 1];
  __shared__ float bs[kTileDepth][kTileN + 1];
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

template <typename TA, typename TB, typename TC, bool kTransA, bool kTransB>
void launch_gemm(const TA* a, const TB* b, TC* c, int64_t batch, int64_t M, int64_t Nc, int64_t K,
                 int64_t lda, int64_t ldb, int64_t ldc, int64_t stride_a, int64_t stride_b,
                 int64_t stride_c, float beta, cudaStream_t stream) {
  const dim3 grid(ceil_div(Nc, kTileN), ceil_div(M, kTileM), batch);
  TORCH_CHECK(grid.y <= kMaxGridYZ && grid.z <= kMaxGridYZ,
              "danet_ext: channel_attention problem too large for one launch");
  batched_gemm_kernel<TA, TB, TC, kTransA, kTransB><<<grid, kThreads, 0, stream>>>(
      a, b, c, M, Nc, K, lda, ldb, ldc, stride_a, stride_b, stride_c, beta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// In place, one block per row of E (B*C rows of length C): e <- softmax(-e),
// shifted by the row minimum.
__global__ void __launch_bounds__(kThreads) negated_softmax_kernel(float* __restrict__ e, int64_t C) {
  __shared__ float scratch[kThreads / 32];
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
  __shared__ float scratch[kThreads / 32];
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

std::tuple<at::Tensor, at::Tensor> channel_attention_forward_cuda(const at::Tensor& x_in) {
  check_channel_attention_inputs(x_in);
  check_is_cuda(x_in, "x");
  check_cuda_dtype(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor attn = at::empty({B, C, C}, x.options().dtype(at::kFloat));
  if (B == 0 || C == 0) return {out, attn};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DANET_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_forward_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    float* ap = attn.data_ptr<float>();
    // E = X X^T
    launch_gemm<scalar_t, scalar_t, float, false, true>(xp, xp, ap, B, C, C, N, N, N, C, C * N,
                                                        C * N, C * C, 0.f, stream);
    negated_softmax_kernel<<<B * C, kThreads, 0, stream>>>(ap, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (N > 0) {  // out = A X
      launch_gemm<float, scalar_t, scalar_t, false, false>(ap, xp, out.data_ptr<scalar_t>(), B, C, N, C,
                                                           C, N, N, C * C, C * N, C * N, 0.f, stream);
    }
  });
  return {out, attn};
}

at::Tensor channel_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in,
                                           const at::Tensor& attention) {
  check_channel_attention_backward_inputs(grad_out, x_in, attention);
  check_is_cuda(x_in, "x");
  check_cuda_dtype(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous();
  at::Tensor go = grad_out.contiguous();
  at::Tensor attn = attention.to(at::kFloat).contiguous();
  at::Tensor dx = at::zeros(x.sizes(), x.options().dtype(at::kFloat));
  if (B == 0 || C == 0 || N == 0) return dx.to(x.scalar_type());
  at::Tensor grad_e = at::empty({B, C, C}, attn.options());
  at::Tensor grad_sym = at::empty({B, C, C}, attn.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  DANET_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_backward_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gop = go.data_ptr<scalar_t>();
    const float* ap = attn.data_ptr<float>();
    float* gep = grad_e.data_ptr<float>();
    float* gsp = grad_sym.data_ptr<float>();
    float* dxp = dx.data_ptr<float>();
    // dA = dO X^T
    launch_gemm<scalar_t, scalar_t, float, false, true>(gop, xp, gep, B, C, C, N, N, N, C, C * N,
                                                        C * N, C * C, 0.f, stream);
    negated_softmax_backward_kernel<<<B * C, kThreads, 0, stream>>>(gep, ap, C);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t total = B * C * C;
    symmetrize_kernel<<<ceil_div(total, kThreads), kThreads, 0, stream>>>(gep, gsp, C, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // dX = A^T dO + (dE + dE^T) X
    launch_gemm<float, scalar_t, float, true, false>(ap, gop, dxp, B, C, N, C, C, N, N, C * C,
                                                     C * N, C * N, 0.f, stream);
    launch_gemm<float, scalar_t, float, false, false>(gsp, xp, dxp, B, C, N, C, C, N, N, C * C,
                                                      C * N, C * N, 1.f, stream);
  });
  return dx.to(x.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CUDA, m) {
  m.impl("channel_attention_forward", &danet::cuda::channel_attention_forward_cuda);
  m.impl("channel_attention_backward", &danet::cuda::channel_attention_backward_cuda);
}
