// Position attention (PAM) CUDA-core kernels, their launch geometry and launch
// sequences on raw pointers. Compiled by nvcc through position_attention.cu
// and, for the tests, by the host compiler through the CUDA emulation
// (tests/cuda_emulation).
//
// out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j   (no 1/sqrt(d) scaling)
//
// Tensors are viewed as (B, C, N), N = H*W. Like FlashAttention, no N x N
// tensor is ever formed: the forward streams key tiles through shared memory
// with an online softmax (attention_math.h) and saves per-query statistics
// (row max, inverse row sum); the backward recomputes each probability tile
// from them. Inputs may be float32, float16 or bfloat16; every product, the
// softmax statistics and the accumulators are float32.
//
// Block = 256 threads as 16 x 16 (tx, ty). A thread owns the rows
// ty + 16 r of a 64-query tile and the columns tx + 16 c of a 32-key tile.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../attention_math.h"
#include "device_common.cuh"
#include "launch.cuh"

namespace danet {
namespace cuda {
namespace {

constexpr int kTileQ = 64;                    // queries per tile
constexpr int kTileK = 32;                    // keys per tile
constexpr int kTileC = 128;                   // value channels per forward block
constexpr int kTileCGrad = 64;                // value channels per dV block
constexpr int kDepth = 16;                    // reduction depth staged per step
constexpr int kRows = kTileQ / 16;            // query rows per thread
constexpr int kCols = kTileK / 16;            // key columns per thread
constexpr int kChans = kTileC / 16;           // value channels per thread (forward)
constexpr int kChansGrad = kTileCGrad / 16;   // value channels per thread (dV)

// dst[r][x] = src[(r0 + r) * N + x0 + x] for r < kRowsS, x < kWidth, as float;
// 0 where r0 + r >= rows or x0 + x >= N. src is a (rows x N) slab with row
// stride N; consecutive threads read consecutive x (coalesced).
template <int kRowsS, int kWidth, int kPitch, typename T>
__device__ __forceinline__ void stage_slab(const T* __restrict__ src, int64_t rows, int64_t N, int64_t r0,
                                           int64_t x0, float (*dst)[kPitch]) {
  for (int e = threadIdx.x; e < kRowsS * kWidth; e += kThreads) {
    const int r = e / kWidth, x = e % kWidth;
    const int64_t gr = r0 + r, gx = x0 + x;
    dst[r][x] = (gr < rows && gx < N) ? to_float(src[gr * N + gx]) : 0.f;
  }
}

// acc[r][c] = sum_d A[d, i0 + ty + 16 r] * B[d, j0 + tx + 16 c] over d < depth,
// where A and B are (depth x N) slabs with row stride N (Q and K, or dO and
// V). Entries past N or depth read as 0. Ends with a barrier, so the staging
// buffers may be reused at once.
template <typename T>
__device__ __forceinline__ void tile_product(const T* __restrict__ a, const T* __restrict__ b, int64_t depth, int64_t N,
                             int64_t i0, int64_t j0, float (*as)[kTileQ], float (*bs)[kTileK],
                             float (&acc)[kRows][kCols]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[r][c] = 0.f;
  for (int64_t d0 = 0; d0 < depth; d0 += kDepth) {
    stage_slab<kDepth, kTileQ, kTileQ>(a, depth, N, d0, i0, as);
    stage_slab<kDepth, kTileK, kTileK>(b, depth, N, d0, j0, bs);
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      float av[kRows], bv[kCols];
#pragma unroll
      for (int r = 0; r < kRows; ++r) av[r] = as[d][ty + 16 * r];
#pragma unroll
      for (int c = 0; c < kCols; ++c) bv[c] = bs[d][tx + 16 * c];
      rank1_update(acc, av, bv);
    }
    __syncthreads();
  }
}

// grid: (query tiles, value-channel blocks of kTileC, B).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                   T* __restrict__ out, float* __restrict__ stats, int64_t Cq, int64_t C, int64_t N) {
  DANET_SHARED(float, qs, [kDepth][kTileQ]);
  DANET_SHARED(float, ks, [kDepth][kTileK]);
  DANET_SHARED(float, ps, [kTileQ][kTileK + 1]);  // probabilities; later the output staging area
  DANET_SHARED(float, vs, [kTileC][kTileK + 1]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTileQ;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileC;
  const T* qb = q + b * Cq * N;
  const T* kb = k + b * Cq * N;
  const T* vb = v + b * C * N;

  float row_m[kRows], row_l[kRows], acc[kRows][kChans];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_m[r] = neg_infinity<float>();
    row_l[r] = 0.f;
#pragma unroll
    for (int ch = 0; ch < kChans; ++ch) acc[r][ch] = 0.f;
  }

  for (int64_t j0 = 0; j0 < N; j0 += kTileK) {
    float s[kRows][kCols];
    tile_product(qb, kb, Cq, N, i0, j0, qs, ks, s);

    float rescale[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      float tile_max = neg_infinity<float>();
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        if (j0 + tx + 16 * c >= N) s[r][c] = neg_infinity<float>();  // keys past the end
        tile_max = fmaxf(tile_max, s[r][c]);
      }
      tile_max = max16(tile_max);
      const float m_new = online_max(row_m[r], tile_max);
      const float alpha = online_rescale(row_m[r], m_new);
      const float offset = exp_offset(m_new);
      float tile_sum = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        s[r][c] = exp_acc(s[r][c] - offset);
        tile_sum += s[r][c];
      }
      const float l_new = online_sum(row_l[r], alpha, sum16(tile_sum));
      // The accumulator holds the normalised output so far (weights summing to
      // 1), so it stays within max |v| and cannot overflow where the result fits.
      rescale[r] = normalised_rescale(alpha, row_l[r], l_new);
      const float inv = inverse_sum(l_new);
#pragma unroll
      for (int c = 0; c < kCols; ++c) ps[ty + 16 * r][tx + 16 * c] = s[r][c] * inv;
      row_l[r] = l_new;
      row_m[r] = m_new;
    }
    stage_slab<kTileC, kTileK, kTileK + 1>(vb, C, N, c0, j0, vs);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int ch = 0; ch < kChans; ++ch) acc[r][ch] *= rescale[r];
#pragma unroll 4
    for (int j = 0; j < kTileK; ++j) {
      float pv[kRows], vv[kChans];
#pragma unroll
      for (int r = 0; r < kRows; ++r) pv[r] = ps[ty + 16 * r][j];
#pragma unroll
      for (int ch = 0; ch < kChans; ++ch) vv[ch] = vs[tx + 16 * ch][j];
      rank1_update(acc, pv, vv);
    }
    __syncthreads();
  }

  float inv_l[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) inv_l[r] = 1.f / row_l[r];
  if (blockIdx.y == 0 && tx == 0) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + ty + 16 * r;
      if (i < N) {
        stats[(b * 2 + 0) * N + i] = row_m[r];
        stats[(b * 2 + 1) * N + i] = inv_l[r];
      }
    }
  }
  // Write the (kTileC x kTileQ) output tile 32 channels at a time through
  // shared memory, so that the global stores run along N (coalesced).
  float* stage = &ps[0][0];  // 32 x 65 floats fit in ps
  constexpr int kStageRow = kTileQ + 1;
  T* ob = out + b * C * N;
#pragma unroll
  for (int part = 0; part < kTileC / 32; ++part) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int ch = 2 * part + half;  // channel tx + 16 ch lies in this part
#pragma unroll
      for (int r = 0; r < kRows; ++r)
        stage[(tx + 16 * half) * kStageRow + ty + 16 * r] = acc[r][ch] + empty_row_output(row_l[r]);  // normalised
    }
    __syncthreads();
    for (int e = tid; e < 32 * kTileQ; e += kThreads) {
      const int cl = e / kTileQ, i = e % kTileQ;
      const int64_t gc = c0 + 32 * part + cl, gi = i0 + i;
      if (gc < C && gi < N) ob[gc * N + gi] = from_float<T>(stage[cl * kStageRow + i]);
    }
    __syncthreads();
  }
}

// D_i = sum_c dO[c, i] O[c, i], accumulated in double (dS = P (dP - D) cancels).
// grid: (ceil(N / 256), B).
// kTf32Dout: dO rounded to TF32 as the TF32 backward's dP = dO^T V sees it, so
// that dP - D cancels as it does in the official code's backward under TF32
// (there D is summed from that very dP).
template <typename T, bool kTf32Dout = false>
__global__ void __launch_bounds__(kThreads)
    row_dot_kernel(const T* __restrict__ dout, const T* __restrict__ out,
                   float* __restrict__ row_dot, int64_t C, int64_t N) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t b = blockIdx.y;
  if (i >= N) return;
  const T* dob = dout + b * C * N;
  const T* ob = out + b * C * N;
  double sum = 0.0;
  for (int64_t c = 0; c < C; ++c) {
    const float d = to_float(dob[c * N + i]);
    sum += static_cast<double>(kTf32Dout ? round_tf32(d) : d) * static_cast<double>(to_float(ob[c * N + i]));
  }
  row_dot[b * N + i] = static_cast<float>(sum);
}

// Probabilities of a (query tile x key tile), recomputed from the saved stats;
// 0 outside the valid range.
__device__ __forceinline__ void probs_from_stats(const float* __restrict__ stats_b, int64_t N,
                                                 int64_t i0, int64_t j0, float s[kRows][kCols]) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t i = i0 + ty + 16 * r;
    const bool row_ok = i < N;
    const float m = row_ok ? stats_b[i] : 0.f;
    const float inv_l = row_ok ? stats_b[N + i] : 0.f;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const bool ok = row_ok && (j0 + tx + 16 * c < N);
      s[r][c] = ok ? prob_from_stats(s[r][c], m, inv_l) : 0.f;
    }
  }
}

// dK and dQ. Each block owns one key tile j0 and walks all query tiles:
//   dS = P * (dO^T V - D)
//   dK[:, j0 tile] += Q[:, i0 tile] dS        (block-exclusive, float32 workspace)
//   dQ[:, i0 tile] += K[:, j0 tile] dS^T      (atomicAdd, float32 workspace)
// grid: (key tiles, B).
// Three blocks per SM: with __launch_bounds__(kThreads) alone, ptxas for sm_90
// capped this kernel at 48 registers and spilled 12 to 36 bytes to local memory
// (found by the static check in tests/cuda_emulation/test_device_build.py).
// With a minimum of 3 blocks (at most 85 registers) it takes 78 to 80 on sm_80
// and sm_90 and spills nothing; a minimum of 1 took 88 (2 blocks per SM).
template <typename T>
__global__ void __launch_bounds__(kThreads, 3)
    grad_qk_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                   const T* __restrict__ v, const float* __restrict__ stats,
                   const float* __restrict__ row_dot, float* __restrict__ dq_acc,
                   float* __restrict__ dk_acc, int64_t Cq, int64_t C, int64_t N) {
  DANET_SHARED(float, as, [kDepth][kTileQ]);
  DANET_SHARED(float, bs, [kDepth][kTileK]);
  DANET_SHARED(float, ds, [kTileQ][kTileK + 1]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t b = blockIdx.y;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const T* qb = q + b * Cq * N;
  const T* kb = k + b * Cq * N;
  const T* vb = v + b * C * N;
  const T* dob = dout + b * C * N;
  const float* stats_b = stats + b * 2 * N;
  const float* dot_b = row_dot + b * N;
  float* dqb = dq_acc + b * Cq * N;
  float* dkb = dk_acc + b * Cq * N;

  for (int64_t i0 = 0; i0 < N; i0 += kTileQ) {
    float p[kRows][kCols], dp[kRows][kCols];
    tile_product(qb, kb, Cq, N, i0, j0, as, bs, p);
    probs_from_stats(stats_b, N, i0, j0, p);
    tile_product(dob, vb, C, N, i0, j0, as, bs, dp);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t i = i0 + ty + 16 * r;
      const float d = i < N ? dot_b[i] : 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) ds[ty + 16 * r][tx + 16 * c] = softmax_grad(p[r][c], dp[r][c], d);
    }
    __syncthreads();

    for (int64_t d0 = 0; d0 < Cq; d0 += kDepth) {
      stage_slab<kDepth, kTileQ, kTileQ>(qb, Cq, N, d0, i0, as);
      stage_slab<kDepth, kTileK, kTileK>(kb, Cq, N, d0, j0, bs);
      __syncthreads();
      for (int e = tid; e < kDepth * kTileK; e += kThreads) {  // dK: (d, j)
        const int d = e / kTileK, j = e % kTileK;
        const int64_t gd = d0 + d, gj = j0 + j;
        if (gd < Cq && gj < N) {
          float sum = 0.f;
#pragma unroll 8
          for (int i = 0; i < kTileQ; ++i) sum += as[d][i] * ds[i][j];
          dkb[gd * N + gj] += sum;
        }
      }
      for (int e = tid; e < kDepth * kTileQ; e += kThreads) {  // dQ: (d, i)
        const int d = e / kTileQ, i = e % kTileQ;
        const int64_t gd = d0 + d, gi = i0 + i;
        if (gd < Cq && gi < N) {
          float sum = 0.f;
#pragma unroll 8
          for (int j = 0; j < kTileK; ++j) sum += bs[d][j] * ds[i][j];
          atomicAdd(&dqb[gd * N + gi], sum);
        }
      }
      __syncthreads();
    }
  }
}

// dV[c, j0 tile] = sum over query tiles of dO[c, i0 tile] P. Each block owns
// kTileCGrad channels of one key tile. grid: (key tiles, channel blocks, B).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_v_kernel(const T* __restrict__ dout, const T* __restrict__ q, const T* __restrict__ k,
                  const float* __restrict__ stats, T* __restrict__ dv, int64_t Cq, int64_t C,
                  int64_t N) {
  DANET_SHARED(float, as, [kDepth][kTileQ]);
  DANET_SHARED(float, bs, [kDepth][kTileK]);
  DANET_SHARED(float, ps, [kTileQ][kTileK + 1]);
  DANET_SHARED(float, dos, [kTileCGrad][kTileQ + 1]);
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTileK;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileCGrad;
  const T* qb = q + b * Cq * N;
  const T* kb = k + b * Cq * N;
  const T* dob = dout + b * C * N;
  const float* stats_b = stats + b * 2 * N;

  float acc[kChansGrad][kCols];
#pragma unroll
  for (int rc = 0; rc < kChansGrad; ++rc)
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[rc][c] = 0.f;

  for (int64_t i0 = 0; i0 < N; i0 += kTileQ) {
    float p[kRows][kCols];
    tile_product(qb, kb, Cq, N, i0, j0, as, bs, p);
    probs_from_stats(stats_b, N, i0, j0, p);
#pragma unroll
    for (int r = 0; r < kRows; ++r)
#pragma unroll
      for (int c = 0; c < kCols; ++c) ps[ty + 16 * r][tx + 16 * c] = p[r][c];
    stage_slab<kTileCGrad, kTileQ, kTileQ + 1>(dob, C, N, c0, i0, dos);
    __syncthreads();
#pragma unroll 4
    for (int i = 0; i < kTileQ; ++i) {
      float dov[kChansGrad], pv[kCols];
#pragma unroll
      for (int rc = 0; rc < kChansGrad; ++rc) dov[rc] = dos[ty + 16 * rc][i];
#pragma unroll
      for (int c = 0; c < kCols; ++c) pv[c] = ps[i][tx + 16 * c];
      rank1_update(acc, dov, pv);
    }
    __syncthreads();
  }
  T* dvb = dv + b * C * N;
#pragma unroll
  for (int rc = 0; rc < kChansGrad; ++rc) {
    const int64_t gc = c0 + ty + 16 * rc;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t gj = j0 + tx + 16 * c;
      if (gc < C && gj < N) dvb[gc * N + gj] = from_float<T>(acc[rc][c]);
    }
  }
}

// Launch geometry of each kernel (host functions; the emulation calls them too).
inline LaunchGeometry forward_geometry(int64_t B, int64_t C, int64_t N) {
  return make_geometry("forward_kernel", ceil_div(N, kTileQ), std::max<int64_t>(1, ceil_div(C, kTileC)), B,
                       kThreads);
}
inline LaunchGeometry row_dot_geometry(int64_t B, int64_t N) {
  return make_geometry("row_dot_kernel", ceil_div(N, kThreads), B, 1, kThreads);
}
inline LaunchGeometry grad_qk_geometry(int64_t B, int64_t N) {
  return make_geometry("grad_qk_kernel", ceil_div(N, kTileK), B, 1, kThreads);
}
inline LaunchGeometry grad_v_geometry(int64_t B, int64_t C, int64_t N) {
  return make_geometry("grad_v_kernel", ceil_div(N, kTileK), ceil_div(C, kTileCGrad), B, kThreads);
}

// The CUDA-core forward on raw pointers: q, k (B, Cq, N), v and out (B, C, N),
// contiguous; stats (B, 2, N) float32. B and N non-zero.
template <typename T>
void position_attention_forward_launch(const T* q, const T* k, const T* v, T* out, float* stats, int64_t B,
                                       int64_t Cq, int64_t C, int64_t N, cudaStream_t stream) {
  DANET_LAUNCH(forward_kernel<T>, forward_geometry(B, C, N), stream, q, k, v, out, stats, Cq, C, N);
}

// D = sum_c dO O per query, row_dot (B, N) float32: the first step of both backwards.
template <typename T>
void position_attention_row_dot_launch(const T* grad_out, const T* out, float* row_dot, int64_t B, int64_t C,
                                       int64_t N, cudaStream_t stream, bool tf32_dout = false) {
  if (tf32_dout) {
    auto kernel = row_dot_kernel<T, true>;
    DANET_LAUNCH(kernel, row_dot_geometry(B, N), stream, grad_out, out, row_dot, C, N);
  } else {
    auto kernel = row_dot_kernel<T, false>;
    DANET_LAUNCH(kernel, row_dot_geometry(B, N), stream, grad_out, out, row_dot, C, N);
  }
}

// The backward on raw pointers. row_dot (B, N) float32 workspace; dq_acc,
// dk_acc (B, Cq, N) float32 and dv (B, C, N) zero-filled by the caller.
template <typename T>
void position_attention_backward_launch(const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                                        const float* stats, float* row_dot, float* dq_acc, float* dk_acc,
                                        T* dv, int64_t B, int64_t Cq, int64_t C, int64_t N,
                                        cudaStream_t stream) {
  position_attention_row_dot_launch(grad_out, out, row_dot, B, C, N, stream);
  DANET_LAUNCH(grad_qk_kernel<T>, grad_qk_geometry(B, N), stream, grad_out, q, k, v, stats, row_dot, dq_acc,
               dk_acc, Cq, C, N);
  if (C > 0) {
    DANET_LAUNCH(grad_v_kernel<T>, grad_v_geometry(B, C, N), stream, grad_out, q, k, stats, dv, Cq, C, N);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace danet
