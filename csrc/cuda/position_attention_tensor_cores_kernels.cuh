// Position attention forward on tensor cores (WMMA m16n16k16, compute
// capability 8.0 and newer) for float16 and bfloat16 inputs: the kernels, their
// launch geometry and launch sequence on raw pointers. Compiled by nvcc through
// position_attention_tensor_cores.cu and, for the tests, by the host compiler
// through the CUDA emulation (tests/cuda_emulation).
//
// out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j   (no 1/sqrt(d) scaling)
//
// Two passes, which compute every score tile S = Q^T K with the same code on
// the same staged operands, so that their scores agree to the bit:
//   1. stats_kernel, one block per 64-query tile: walks all key tiles with the
//      online softmax of attention_math.h and writes each query's score
//      maximum m and inverse sum 1/l, the softmax_stats that the backward
//      needs anyway.
//   2. output_kernel, one block per (64-query tile, 128 value channels):
//      walks the key tiles again, forms the final probabilities
//      P = exp(S - m) / l and accumulates O += P V^T. Since P is final, the
//      accumulators are never rescaled and stay in tensor-core fragments for
//      the whole walk (no per-row access to an opaque fragment layout).
// Scores, statistics and accumulators are float32; only the operands of the
// two products (Q, K, V as given, P rounded to the input dtype) are 16-bit,
// as in FlashAttention. No N x N tensor is formed.
//
// Every operand goes global -> shared memory (zero-filled past N and past the
// channel counts) -> fragments, so that any N, Cq and C work; 8 warps a block.
#pragma once

#if !defined(DANET_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <cstdint>

#include "../attention_math.h"
#include "device_common.cuh"
#include "launch.cuh"

namespace danet {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kTcThreads = 256;  // 8 warps
constexpr int kTcTileQ = 64;     // queries per block
constexpr int kTcTileK = 64;     // keys per step
constexpr int kTcTileC = 128;    // value channels per output block
constexpr int kTcDepth = 32;     // query/key channels staged per step
constexpr int kFrag = 16;        // WMMA tile edge
constexpr int kLd16 = kTcTileQ + 8;   // row length of the 16-bit tiles (16-byte aligned rows, banks spread)
constexpr int kLdS = kTcTileK + 4;    // row length of the float score tile
constexpr int kLdO = kTcTileQ + 4;    // row length of the float output staging tile
static_assert(kTcTileQ == kTcTileK, "one padded row length serves the Q, K, P and V tiles");

// Shared memory, in bytes. Pass 1 uses [0, kScoreBytes); pass 2 all of it.
// After pass 2's walk, the output staging tile reuses the space of the tiles.
constexpr int kQsOff = 0;                                   // Q^T chunk, qs[d * kLd16 + i]
constexpr int kKsOff = kQsOff + kTcDepth * kLd16 * 2;       // K chunk,   ks[d * kLd16 + j]
constexpr int kSsOff = kKsOff + kTcDepth * kLd16 * 2;       // scores,    ss[i * kLdS + j]
constexpr int kScoreBytes = kSsOff + kTcTileQ * kLdS * 4;
constexpr int kPsOff = kScoreBytes;                         // probabilities, ps[i * kLd16 + j]
constexpr int kVsOff = kPsOff + kTcTileQ * kLd16 * 2;       // V chunk,   vs[c * kLd16 + j]
constexpr int kRowMaxOff = kVsOff + kTcTileC * kLd16 * 2;   // m of the tile's queries
constexpr int kRowInvOff = kRowMaxOff + kTcTileQ * 4;       // 1 / l of the tile's queries
constexpr int kOutputBytes = kRowInvOff + kTcTileQ * 4;
constexpr int kStageBytes = kTcTileC * kLdO * 4;            // stage[c * kLdO + i]
static_assert(kStageBytes <= kRowMaxOff, "the output staging tile must not overwrite the statistics");
static_assert(kKsOff % 32 == 0 && kSsOff % 32 == 0 && kPsOff % 32 == 0 && kVsOff % 32 == 0,
              "WMMA loads and stores need 32-byte aligned tiles");

template <typename T>
struct MmaType;
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ void store_rounded(__half* dst, float v) { *dst = __float2half_rn(v); }
__device__ __forceinline__ void store_rounded(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16_rn(v); }

// dst[r * kLd16 + x] = src[(r0 + r) * N + x0 + x] for r < kRowsS, x < kWidth,
// copied bit for bit; +0 where r0 + r >= rows or x0 + x >= N. Consecutive
// threads read consecutive x (coalesced).
template <int kRowsS, int kWidth, typename M>
__device__ __forceinline__ void stage_rows(const M* __restrict__ src, int64_t rows, int64_t N, int64_t r0,
                                           int64_t x0, M* dst) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int e = threadIdx.x; e < kRowsS * kWidth; e += kTcThreads) {
    const int r = e / kWidth, x = e % kWidth;
    const int64_t gr = r0 + r, gx = x0 + x;
    d[r * kLd16 + x] = (gr < rows && gx < N) ? s[gr * N + gx] : uint16_t(0);
  }
}

// ss (64 x 64 floats) = Q[:, i0 : i0+64]^T K[:, j0 : j0+64] on tensor cores.
// Warp w computes query rows 16 (w % 4) .. +16 and key columns 32 (w / 4) .. +32.
// Entries past N, and channels past Cq, read as 0. Ends with a barrier, so
// that ss may be read at once (and qs, ks be refilled).
template <typename M>
__device__ __forceinline__ void score_tile(const M* __restrict__ q, const M* __restrict__ k, int64_t Cq,
                                           int64_t N, int64_t i0, int64_t j0, M* qs, M* ks, float* ss) {
  const int warp = threadIdx.x / 32;
  const int rb = warp % 4, cb = (warp / 4) * 2;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int64_t d0 = 0; d0 < Cq; d0 += kTcDepth) {
    stage_rows<kTcDepth, kTcTileQ>(q, Cq, N, d0, i0, qs);
    stage_rows<kTcDepth, kTcTileK>(k, Cq, N, d0, j0, ks);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcDepth / kFrag; ++kk) {
      // Q^T (query x channel) is stored channel-major: a column-major A.
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, M, wmma::col_major> a;
      wmma::load_matrix_sync(a, qs + kk * kFrag * kLd16 + rb * kFrag, kLd16);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, M, wmma::row_major> b;
        wmma::load_matrix_sync(b, ks + kk * kFrag * kLd16 + (cb + t) * kFrag, kLd16);
        wmma::mma_sync(acc[t], a, b, acc[t]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < 2; ++t)
    wmma::store_matrix_sync(ss + rb * kFrag * kLdS + (cb + t) * kFrag, acc[t], kLdS, wmma::mem_row_major);
  __syncthreads();
}

// Pass 1: softmax statistics. grid: (query tiles, B).
template <typename M>
__global__ void __launch_bounds__(kTcThreads)
    stats_kernel(const M* __restrict__ q, const M* __restrict__ k, float* __restrict__ stats, int64_t Cq,
                 int64_t N) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this only on compute capability 8.0 and newer
#else
  DANET_SHARED_ALIGNED(128, unsigned char, smem, [kScoreBytes]);
  M* qs = reinterpret_cast<M*>(smem + kQsOff);
  M* ks = reinterpret_cast<M*>(smem + kKsOff);
  float* ss = reinterpret_cast<float*>(smem + kSsOff);
  const int64_t b = blockIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcTileQ;
  q += b * Cq * N;
  k += b * Cq * N;
  // Four consecutive threads share a query row, 16 columns each.
  const int row = threadIdx.x / 4, part = threadIdx.x % 4;
  float row_m = neg_infinity<float>(), row_l = 0.f;
  for (int64_t j0 = 0; j0 < N; j0 += kTcTileK) {
    score_tile(q, k, Cq, N, i0, j0, qs, ks, ss);
    const float* srow = ss + row * kLdS + part * 16;
    const int64_t jp = j0 + part * 16;
    float tile_max = neg_infinity<float>();
#pragma unroll
    for (int c = 0; c < 16; ++c)
      if (jp + c < N) tile_max = fmaxf(tile_max, srow[c]);
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    const float m_new = online_max(row_m, tile_max);  // finite: key j0 < N is in every tile
    const float rescale = online_rescale(row_m, m_new);
    const float offset = exp_offset(m_new);
    float tile_sum = 0.f;
#pragma unroll
    for (int c = 0; c < 16; ++c)
      if (jp + c < N) tile_sum += exp_acc(srow[c] - offset);
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 1);
    tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, 2);
    row_l = online_sum(row_l, rescale, tile_sum);
    row_m = m_new;
    __syncthreads();  // ss is refilled by the next score_tile
  }
  const int64_t i = i0 + row;
  if (part == 0 && i < N) {
    stats[(b * 2 + 0) * N + i] = row_m;
    stats[(b * 2 + 1) * N + i] = 1.f / row_l;
  }
#endif
}

// Pass 2: out = P V^T with the final probabilities. grid: (query tiles,
// value-channel blocks of kTcTileC, B); kOutputBytes of dynamic shared memory.
template <typename M, typename T>
__global__ void __launch_bounds__(kTcThreads)
    output_kernel(const M* __restrict__ q, const M* __restrict__ k, const M* __restrict__ v,
                  const float* __restrict__ stats, T* __restrict__ out, int64_t Cq, int64_t C, int64_t N) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  M* qs = reinterpret_cast<M*>(smem + kQsOff);
  M* ks = reinterpret_cast<M*>(smem + kKsOff);
  float* ss = reinterpret_cast<float*>(smem + kSsOff);
  M* ps = reinterpret_cast<M*>(smem + kPsOff);
  M* vs = reinterpret_cast<M*>(smem + kVsOff);
  float* row_max = reinterpret_cast<float*>(smem + kRowMaxOff);
  float* row_inv = reinterpret_cast<float*>(smem + kRowInvOff);
  float* stage = reinterpret_cast<float*>(smem);  // after the walk only
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcTileQ;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTcTileC;
  q += b * Cq * N;
  k += b * Cq * N;
  v += b * C * N;
  const float* stats_b = stats + b * 2 * N;
  for (int r = threadIdx.x; r < kTcTileQ; r += kTcThreads) {
    const int64_t i = i0 + r;
    row_max[r] = i < N ? stats_b[i] : 0.f;
    row_inv[r] = i < N ? stats_b[N + i] : 0.f;
  }  // read only after score_tile's barriers

  // Warp w accumulates query rows 16 (w % 4) .. +16, channels 64 (w / 4) .. +64.
  const int warp = threadIdx.x / 32;
  const int rb = warp % 4, cb = (warp / 4) * 4;
  wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);
  const int row = threadIdx.x / 4, part = threadIdx.x % 4;
  const bool row_ok = i0 + row < N;

  for (int64_t j0 = 0; j0 < N; j0 += kTcTileK) {
    score_tile(q, k, Cq, N, i0, j0, qs, ks, ss);
    {
      const float m = row_max[row], inv_l = row_inv[row];
      const float* srow = ss + row * kLdS + part * 16;
      M* prow = ps + row * kLd16 + part * 16;
      const int64_t jp = j0 + part * 16;
#pragma unroll
      for (int c = 0; c < 16; ++c)
        store_rounded(prow + c, (row_ok && jp + c < N) ? prob_from_stats(srow[c], m, inv_l) : 0.f);
    }
    stage_rows<kTcTileC, kTcTileK>(v, C, N, c0, j0, vs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcTileK / kFrag; ++kk) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, M, wmma::row_major> a;
      wmma::load_matrix_sync(a, ps + rb * kFrag * kLd16 + kk * kFrag, kLd16);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        // V^T (key x channel) is stored channel-major: a column-major B.
        wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, M, wmma::col_major> bv;
        wmma::load_matrix_sync(bv, vs + (cb + f) * kFrag * kLd16 + kk * kFrag, kLd16);
        wmma::mma_sync(acc[f], a, bv, acc[f]);
      }
    }
    __syncthreads();  // ps and vs are refilled in the next step
  }

  // The (channel x query) output tile through shared memory, so that the
  // global stores run along N (coalesced).
#pragma unroll
  for (int f = 0; f < 4; ++f)
    wmma::store_matrix_sync(stage + (cb + f) * kFrag * kLdO + rb * kFrag, acc[f], kLdO, wmma::mem_col_major);
  __syncthreads();
  T* ob = out + b * C * N;
  for (int e = threadIdx.x; e < kTcTileC * kTcTileQ; e += kTcThreads) {
    const int c = e / kTcTileQ, i = e % kTcTileQ;
    const int64_t gc = c0 + c, gi = i0 + i;
    if (gc < C && gi < N) ob[gc * N + gi] = from_float<T>(stage[c * kLdO + i]);
  }
#endif
}

// Launch geometry (host functions; the emulation calls them too).
inline LaunchGeometry stats_geometry(int64_t B, int64_t N) {
  return make_geometry("stats_kernel", ceil_div(N, kTcTileQ), B, 1, kTcThreads);
}
inline LaunchGeometry output_geometry(int64_t B, int64_t C, int64_t N) {
  return make_geometry("output_kernel", ceil_div(N, kTcTileQ), ceil_div(C, kTcTileC), B, kTcThreads,
                       kOutputBytes);
}

// The tensor-core forward on raw pointers: q, k (B, Cq, N), v (B, C, N) as the
// 16-bit MMA type M; out (B, C, N) of T (c10::Half / c10::BFloat16, same bits
// as M); stats (B, 2, N) float32. B and N non-zero. The caller checks that the
// device has compute capability 8.0 or newer.
template <typename M, typename T>
void position_attention_forward_tensor_cores_launch(const M* q, const M* k, const M* v, T* out, float* stats,
                                                    int64_t B, int64_t Cq, int64_t C, int64_t N,
                                                    cudaStream_t stream) {
  DANET_LAUNCH(stats_kernel<M>, stats_geometry(B, N), stream, q, k, stats, Cq, N);
  if (C == 0) return;
  auto kernel = output_kernel<M, T>;
  DANET_LAUNCH(kernel, output_geometry(B, C, N), stream, q, k, v, stats, out, Cq, C, N);
}

}  // namespace
}  // namespace cuda
}  // namespace danet
