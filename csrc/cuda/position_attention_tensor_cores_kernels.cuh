// Position attention (PAM) on tensor cores, compute capability 8.0 and newer:
// float16/bfloat16 inputs on mma.sync m16n8k16, float32 inputs on TF32
// m16n8k8 where PyTorch allows TF32 for matmuls. The kernels, their launch
// geometry and launch sequences on raw pointers. Compiled by nvcc through
// position_attention_tensor_cores.cu and, for the tests, by the host compiler
// through the CUDA emulation (tests/cuda_emulation).
//
// out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j   (no 1/sqrt(d) scaling)
//
// FlashAttention-2's structure (the tile machinery is in
// position_attention_tensor_cores_tiles.cuh): a block is 4 warps; each warp
// owns 16 rows (queries in the forward, keys in the backward) of a 64-row tile
// and walks the other side in 64-column steps. Scores S = Q^T K are computed
// once per step into float32 fragments; the online softmax runs on them in
// registers (rows g and g + 8 of each lane, reduced over the 4 lanes of a
// quad); the probabilities, rounded to the operand type as in FlashAttention,
// are the A operand of the next product without leaving registers. Softmax
// statistics, accumulators and dQ are float32. No N x N tensor is formed; the
// backward recomputes P from the saved statistics.
//
//   forward_kernel_tc   grid (query tiles, 128-channel blocks of C, B):
//                       O[c0 : c0+128, tile] in registers (64 floats a lane);
//                       S is recomputed once per channel block (C / 128 times).
//   grad_v_kernel_tc    grid (key tiles, 128-channel blocks, B): dV^T += P^T dO^T.
//   grad_qk_kernel_tc   grid (key tiles, query-range splits, B): dP^T = V^T dO
//                       (V's tile resident in shared memory where two blocks
//                       still fit on an SM, else staged with dO 64 channels at
//                       a time), dS^T = P^T (dP^T - D), dK^T += dS^T Q^T in
//                       registers (one partial sum per split, added in a fixed
//                       order), dQ += dS K through shared memory and float32
//                       atomics (not deterministic: the launcher raises under
//                       torch.use_deterministic_algorithms).
//
// Operands go global -> shared memory (zero-filled past N and past the
// channel counts; 16-byte copies where rows are 16-byte aligned) -> fragments.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../attention_math.h"
#include "device_common.cuh"
#include "launch.cuh"
#include "position_attention_tensor_cores_tiles.cuh"

namespace danet {
namespace cuda {
namespace {

// Which shapes the tensor-core kernels take (the launcher falls back to the
// CUDA-core kernels otherwise): the forward stages Q^T and K tiles of
// round16(Cq) rows and must fit the device's shared memory (see
// tensor_core_forward_fits); grad_qk keeps dK^T in registers (Cq <= 64).
constexpr int64_t kTcMaxCqForward = 512;
constexpr int64_t kTcMaxCqBackward = 64;

// ---- forward ------------------------------------------------------------------
// Dynamic shared memory: qs (round16(Cq) rows, the block's Q^T tile, staged
// once), ks (round16(Cq) rows), vs (128 rows; after the walk, the output tile).
template <typename Tr>
int64_t forward_tc_shared_bytes(int64_t Cq) {
  return (2 * round16(Cq) + kTcTileC) * row_bytes<Tr>();
}

// Tr::kNormalised: the accumulator holds the normalised output so far, so it
// stays within max |v| and cannot overflow where the result fits; otherwise
// (float16) it accumulates exp(s - m) in [0, 1] and is divided once at the end.
template <typename Tr, typename T>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    forward_kernel_tc(const typename Tr::E* __restrict__ q, const typename Tr::E* __restrict__ k,
                      const typename Tr::E* __restrict__ v, T* __restrict__ out, float* __restrict__ stats,
                      int64_t Cq, int64_t C, int64_t N, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this only on compute capability 8.0 and newer
#else
  using E = typename Tr::E;
  constexpr bool kNormalised = Tr::kNormalised;
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t cq16 = round16(Cq);
  E* qs = reinterpret_cast<E*>(smem);
  E* ks = qs + cq16 * Tr::kPitch;
  E* vs = ks + cq16 * Tr::kPitch;
  const int row0 = (threadIdx.x / 32) * 16;
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTcTileC;
  q += b * Cq * N;
  k += b * Cq * N;
  v += b * C * N;
  stage_tile<Tr>(q, Cq, N, 0, static_cast<int>(cq16), i0, qs, vec);

  float o[kOutTiles][4];
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[ct][e] = 0.f;
  float row_m[2] = {neg_infinity<float>(), neg_infinity<float>()}, row_l[2] = {0.f, 0.f};

  for (int64_t j0 = 0; j0 < N; j0 += kTcTile) {
    stage_tile<Tr>(k, Cq, N, 0, static_cast<int>(cq16), j0, ks, vec);
    stage_tile<Tr>(v, C, N, c0, kTcTileC, j0, vs, vec);
    __syncthreads();
    float s[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    warp_scores<Tr>(qs, ks, cq16, row0, s);

#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of this lane
      float tile_max = neg_infinity<float>();
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          if (j0 + frag_col(nt, e) >= N) s[nt][e] = neg_infinity<float>();  // keys past the end
          tile_max = fmaxf(tile_max, s[nt][e]);
        }
      tile_max = quad_max(tile_max);
      const float m_new = online_max(row_m[h], tile_max);  // finite: key j0 < N is in every tile
      const float alpha = online_rescale(row_m[h], m_new);
      const float offset = exp_offset(m_new);
      float tile_sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) {
          s[nt][e] = exp_acc(s[nt][e] - offset);
          tile_sum += s[nt][e];
        }
      const float l_new = online_sum(row_l[h], alpha, quad_sum(tile_sum));
      float scale = alpha;
      if (kNormalised) {
        scale = normalised_rescale(alpha, row_l[h], l_new);
        const float inv = inverse_sum(l_new);
#pragma unroll
        for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) s[nt][e] *= inv;
      }
#pragma unroll
      for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
        for (int e = 2 * h; e < 2 * h + 2; ++e) o[ct][e] *= scale;
      row_m[h] = m_new;
      row_l[h] = l_new;
    }
    warp_product<Tr, kOutTiles>(s, vs, o);  // O^T (queries x channels) += P V^T
    __syncthreads();                       // ks and vs are refilled in the next step
  }

  const float inv_l[2] = {1.f / row_l[0], 1.f / row_l[1]};
  if (blockIdx.y == 0 && threadIdx.x % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t i = i0 + row0 + frag_row(2 * h);
      if (i < N) {
        stats[(b * 2 + 0) * N + i] = row_m[h];
        stats[(b * 2 + 1) * N + i] = inv_l[h];
      }
    }
  }
  // The (channel x query) output tile through vs (free after the last barrier),
  // so that the global stores run along N.
  E* stage = vs;
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float val = kNormalised ? o[ct][e] + empty_row_output(row_l[e >> 1]) : o[ct][e] * inv_l[e >> 1];
      stage[frag_col(ct, e) * Tr::kPitch + row0 + frag_row(e)] = Tr::store(val);
    }
  __syncthreads();
  store_tile<Tr>(stage, kTcTileC, C, N, c0, i0, out + b * C * N);
#endif
}

// ---- backward -----------------------------------------------------------------
// Probabilities of a warp's (16 keys x 64 queries) block, from the transposed
// scores and the queries' saved statistics (0 for keys or queries past N).
__device__ __forceinline__ void probs_t(float (&s)[kScoreTiles][4], const float* row_max, const float* row_inv,
                                        int64_t key0, int64_t N) {
#pragma unroll
  for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = frag_col(nt, e);
      const bool ok = key0 + frag_row(e) < N;  // queries past N have row_inv = 0
      s[nt][e] = ok ? prob_from_stats(s[nt][e], row_max[i], row_inv[i]) : 0.f;
    }
}

// The saved statistics (and, if row_d, the row dots D) of the queries
// i0 .. i0 + 63 into shared memory; 0 past N, where row_inv = 0 zeroes P.
__device__ __forceinline__ void stage_query_stats(const float* __restrict__ stats_b,
                                                  const float* __restrict__ dot_b, int64_t N, int64_t i0,
                                                  float* row_max, float* row_inv, float* row_d) {
  for (int r = threadIdx.x; r < kTcTile; r += kTcThreads) {
    const int64_t i = i0 + r;
    const bool ok = i < N;
    row_max[r] = ok ? stats_b[i] : 0.f;
    row_inv[r] = ok ? stats_b[N + i] : 0.f;
    if (row_d != nullptr) row_d[r] = ok ? dot_b[i] : 0.f;
  }
}

// dV. Dynamic shared memory: ks, qs (round16(Cq) rows each), dos (128 rows),
// then 2 x 64 floats of statistics.
template <typename Tr>
int64_t grad_v_tc_shared_bytes(int64_t Cq) {
  return (2 * round16(Cq) + kTcTileC) * row_bytes<Tr>() + 2 * kTcTile * 4;
}

template <typename Tr, typename T>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    grad_v_kernel_tc(const typename Tr::E* __restrict__ dout, const typename Tr::E* __restrict__ q,
                     const typename Tr::E* __restrict__ k, const float* __restrict__ stats, T* __restrict__ dv,
                     int64_t Cq, int64_t C, int64_t N, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using E = typename Tr::E;
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t cq16 = round16(Cq);
  E* ks = reinterpret_cast<E*>(smem);
  E* qs = ks + cq16 * Tr::kPitch;
  E* dos = qs + cq16 * Tr::kPitch;
  float* row_max = reinterpret_cast<float*>(dos + kTcTileC * Tr::kPitch);
  float* row_inv = row_max + kTcTile;
  const int row0 = (threadIdx.x / 32) * 16;
  const int64_t b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTcTileC;
  q += b * Cq * N;
  k += b * Cq * N;
  dout += b * C * N;
  const float* stats_b = stats + b * 2 * N;
  stage_tile<Tr>(k, Cq, N, 0, static_cast<int>(cq16), j0, ks, vec);

  float acc[kOutTiles][4];
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[ct][e] = 0.f;

  constexpr float kPScale = Tr::kPScale;  // see Mma16
  for (int64_t i0 = 0; i0 < N; i0 += kTcTile) {
    stage_tile<Tr>(q, Cq, N, 0, static_cast<int>(cq16), i0, qs, vec);
    stage_tile<Tr>(dout, C, N, c0, kTcTileC, i0, dos, vec);
    stage_query_stats(stats_b, nullptr, N, i0, row_max, row_inv, nullptr);
    __syncthreads();
    float p[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = 0.f;
    warp_scores<Tr>(ks, qs, cq16, row0, p);  // S^T: this warp's 16 keys x 64 queries
    probs_t(p, row_max, row_inv, j0 + row0, N);
    if (kPScale != 1.f) {
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[nt][e] *= kPScale;
    }
    warp_product<Tr, kOutTiles>(p, dos, acc);  // dV^T (keys x channels) += P^T dO^T
    __syncthreads();
  }
  E* stage = dos;
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      stage[frag_col(ct, e) * Tr::kPitch + row0 + frag_row(e)] = Tr::store(acc[ct][e] * (1.f / kPScale));
  __syncthreads();
  store_tile<Tr>(stage, kTcTileC, C, N, c0, j0, dv + b * C * N);
#endif
}

// dK and dQ. Dynamic shared memory: ks (kCq16 rows, staged once), qs (kCq16
// rows), vs (V's tile: round16(C) rows staged once if v_resident, else one
// 64-channel chunk at a time), dos (dO's 64-channel chunk), dss (the block's
// dS^T, 64 rows), then 3 x 64 floats of statistics. At Cq = 64: 46 KiB with V
// in chunks, whatever C; 109 KiB with V resident at C = 512.
template <typename Tr>
int64_t grad_qk_tc_shared_bytes(int64_t Cq, int64_t C, bool v_resident) {
  return (2 * round16(Cq) + (v_resident ? round16(C) : kTcChunkC) + kTcChunkC + kTcTile) * row_bytes<Tr>() +
         3 * kTcTile * 4;
}

// V's tile stays resident (read once per block instead of once per query tile)
// where the block still fits the device and two blocks fit on an SM (an H100
// at C <= 512); otherwise it is staged in chunks with dO.
template <typename Tr>
bool grad_qk_tc_v_resident(int64_t Cq, int64_t C, int64_t max_shared_block, int64_t shared_per_sm) {
  const int64_t bytes = grad_qk_tc_shared_bytes<Tr>(Cq, C, true);
  return bytes <= max_shared_block && 2 * (bytes + 1024) <= shared_per_sm;
}

// grid (key tiles, splits, B): block (x, s, b) walks the query tiles of split s,
// queries [s * split_queries, (s + 1) * split_queries), and writes its keys' dK
// to dk_out[s] (the split's partial sums, added up in a fixed order afterwards).
// ds_scale: B powers of two (float16_grad_scores_scale, for float16) that dS
// is multiplied by before it is rounded to the operand type, and dQ, dK
// divided by in float32; nullptr for 1.
template <typename Tr, int kCq16, bool kVResident>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    grad_qk_kernel_tc(const typename Tr::E* __restrict__ dout, const typename Tr::E* __restrict__ q,
                      const typename Tr::E* __restrict__ k, const typename Tr::E* __restrict__ v,
                      const float* __restrict__ stats, const float* __restrict__ row_dot,
                      const float* __restrict__ ds_scale, float* __restrict__ dq_acc, float* __restrict__ dk_out,
                      int64_t Cq, int64_t C, int64_t N, int64_t split_queries, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using E = typename Tr::E;
  constexpr int kCqTiles = kCq16 / 8;
  constexpr int kPitch = Tr::kPitch;
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t c16 = round16(C);
  E* ks = reinterpret_cast<E*>(smem);
  E* qs = ks + kCq16 * kPitch;
  E* vs = qs + kCq16 * kPitch;
  E* dos = vs + (kVResident ? c16 : kTcChunkC) * kPitch;
  E* dss = dos + kTcChunkC * kPitch;
  float* row_max = reinterpret_cast<float*>(dss + kTcTile * kPitch);
  float* row_inv = row_max + kTcTile;
  float* row_d = row_inv + kTcTile;
  const int row0 = (threadIdx.x / 32) * 16;
  const int64_t b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  const int64_t i_begin = static_cast<int64_t>(blockIdx.y) * split_queries;
  const int64_t i_end = i_begin + split_queries < N ? i_begin + split_queries : N;
  q += b * Cq * N;
  k += b * Cq * N;
  v += b * C * N;
  dout += b * C * N;
  const float* stats_b = stats + b * 2 * N;
  const float* dot_b = row_dot + b * N;
  float* dqb = dq_acc + b * Cq * N;
  float* dkb = dk_out + (static_cast<int64_t>(blockIdx.y) * gridDim.z + b) * Cq * N;
  const float ds_mul = ds_scale != nullptr ? ds_scale[b] : 1.f;
  const float ds_div = 1.f / ds_mul;  // exact: a power of two
  stage_tile<Tr>(k, Cq, N, 0, kCq16, j0, ks, vec);
  if (kVResident) stage_tile<Tr>(v, C, N, 0, static_cast<int>(c16), j0, vs, vec);

  float dk[kCqTiles][4];
#pragma unroll
  for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[ct][e] = 0.f;

  for (int64_t i0 = i_begin; i0 < i_end; i0 += kTcTile) {
    stage_tile<Tr>(q, Cq, N, 0, kCq16, i0, qs, vec);
    stage_query_stats(stats_b, dot_b, N, i0, row_max, row_inv, row_d);
    __syncthreads();
    float p[kScoreTiles][4], dp[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = dp[nt][e] = 0.f;
    warp_scores<Tr>(ks, qs, kCq16, row0, p);  // S^T
    probs_t(p, row_max, row_inv, j0 + row0, N);
    for (int64_t cc = 0; cc < c16; cc += kTcChunkC) {  // dP^T = V^T dO, 64 channels a step
      const int64_t depth = c16 - cc < kTcChunkC ? c16 - cc : kTcChunkC;
      if (!kVResident) stage_tile<Tr>(v, C, N, cc, static_cast<int>(depth), j0, vs, vec);
      stage_tile<Tr>(dout, C, N, cc, static_cast<int>(depth), i0, dos, vec);
      __syncthreads();
      warp_scores<Tr>(kVResident ? vs + cc * kPitch : vs, dos, depth, row0, dp);
      __syncthreads();
    }
    // dS^T = P^T (dP^T - D), times ds_mul; kept in dp.
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = softmax_grad(p[nt][e], dp[nt][e], row_d[frag_col(nt, e)]) * ds_mul;
    warp_product<Tr, kCqTiles>(dp, qs, dk);  // dK^T (keys x channels) += dS^T Q^T
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dss[(row0 + frag_row(e)) * kPitch + frag_col(nt, e)] = Tr::store(dp[nt][e]);
    __syncthreads();
    // dQ^T (this warp's 16 queries x channels) = dS K^T over the block's 64 keys.
    float dq[kCqTiles][4];
#pragma unroll
    for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[ct][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kTcTile / Tr::kK; ++kk) {
      uint32_t a[4];  // dS (queries x keys) from dS^T's rows
      Tr::load_a_kn(a, dss, kk * Tr::kK, row0);
#pragma unroll
      for (int ct = 0; ct < kCqTiles; ct += 2) {
        uint32_t b0[2], b1[2];  // K^T (keys x channels): row c of ks holds column c
        Tr::load_b_nk(b0, b1, ks, kk * Tr::kK, ct * 8);
        Tr::mma(dq[ct], a, b0);
        Tr::mma(dq[ct + 1], a, b1);
      }
    }
#pragma unroll
    for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = frag_col(ct, e), i = i0 + row0 + frag_row(e);
        if (c < Cq && i < N) atomicAdd(&dqb[c * N + i], dq[ct][e] * ds_div);
      }
    __syncthreads();  // qs and dss are refilled in the next step
  }
#pragma unroll
  for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = frag_col(ct, e), j = j0 + row0 + frag_row(e);
      if (c < Cq && j < N) dkb[c * N + j] = dk[ct][e] * ds_div;  // the block owns these keys
    }
#endif
}

// out[e] = sum over s < parts of in[s * total + e], in that order (deterministic).
__global__ void __launch_bounds__(kThreads)
    sum_parts_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t parts, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  float sum = 0.f;
  for (int64_t s = 0; s < parts; ++s) sum += in[s * total + e];
  out[e] = sum;
}

// ---- geometry and launch sequences ----------------------------------------------
template <typename Tr>
LaunchGeometry forward_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N) {
  return make_geometry("forward_kernel_tc", ceil_div(N, kTcTile), std::max<int64_t>(1, ceil_div(C, kTcTileC)), B,
                       kTcThreads, forward_tc_shared_bytes<Tr>(Cq));
}
template <typename Tr>
LaunchGeometry grad_v_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N) {
  return make_geometry("grad_v_kernel_tc", ceil_div(N, kTcTile), ceil_div(C, kTcTileC), B, kTcThreads,
                       grad_v_tc_shared_bytes<Tr>(Cq));
}
// grad_qk_kernel_tc has one block per key tile and image: 64 blocks at N = 4096,
// B = 1, half an H100, and 144 at N = 9216 (96 x 96), 0.55 of a wave of two
// blocks per SM (its occupancy) that takes as long as a full one. The query
// range is then split (each split's dK goes to its own buffer, summed after):
// s splits of `per` query tiles run in ceil(tiles * B * s / slots) rounds of
// per + 1 tile steps (the + 1: each block stages its key tile and V once), and
// the count with the fewest steps is taken where it saves at least 5 % over
// one split (the rounds are an idealisation; many-wave grids keep one split
// and their workspace), at most kTcMaxSplits (the dK workspace).
constexpr int64_t kTcMaxSplits = 16;
inline int64_t grad_qk_tc_split_steps(int64_t B, int64_t tiles, int64_t splits, int64_t sm_count) {
  const int64_t per = ceil_div(tiles, splits);
  const int64_t used = ceil_div(tiles, per);  // no empty split
  return ceil_div(tiles * B * used, kTcMinBlocks * std::max<int64_t>(sm_count, 1)) * (per + 1);
}
inline int64_t grad_qk_tc_splits(int64_t B, int64_t N, int64_t sm_count) {
  const int64_t tiles = ceil_div(N, kTcTile);
  if (tiles <= 1 || B <= 0) return 1;
  const int64_t unsplit = grad_qk_tc_split_steps(B, tiles, 1, sm_count);
  int64_t best = 1, best_steps = unsplit;
  for (int64_t s = 2; s <= std::min(tiles, kTcMaxSplits); ++s) {
    const int64_t steps = grad_qk_tc_split_steps(B, tiles, s, sm_count);
    if (steps < best_steps) best = ceil_div(tiles, ceil_div(tiles, s)), best_steps = steps;
  }
  return 20 * best_steps <= 19 * unsplit ? best : 1;
}
inline int64_t grad_qk_tc_split_queries(int64_t N, int64_t splits) {
  return ceil_div(ceil_div(N, kTcTile), splits) * kTcTile;
}
template <typename Tr>
LaunchGeometry grad_qk_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N, int64_t splits, bool v_resident) {
  return make_geometry("grad_qk_kernel_tc", ceil_div(N, kTcTile), splits, B, kTcThreads,
                       grad_qk_tc_shared_bytes<Tr>(Cq, C, v_resident));
}
inline LaunchGeometry sum_parts_geometry(int64_t total) {
  return make_geometry("sum_parts_kernel", ceil_div(total, kThreads), 1, 1, kThreads);
}

// Whether the kernels take these channel counts on a device whose blocks may
// use up to max_shared bytes of shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin).
template <typename Tr>
bool tensor_core_forward_fits(int64_t Cq, int64_t max_shared) {
  return Cq >= 1 && Cq <= kTcMaxCqForward && forward_tc_shared_bytes<Tr>(Cq) <= max_shared;
}
template <typename Tr>
bool tensor_core_backward_fits(int64_t Cq, int64_t max_shared) {
  return Cq >= 1 && Cq <= kTcMaxCqBackward && grad_qk_tc_shared_bytes<Tr>(Cq, 0, false) <= max_shared &&
         grad_v_tc_shared_bytes<Tr>(Cq) <= max_shared;
}

// 16-byte staging copies: rows of N elements start 16-byte aligned.
template <typename Tr>
bool vector_staging(int64_t N, std::initializer_list<const void*> ptrs) {
  if ((N * static_cast<int64_t>(sizeof(typename Tr::E))) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The tensor-core forward on raw pointers: q, k (B, Cq, N), v (B, C, N) of the
// operand type Tr::E (__half, __nv_bfloat16, or float for TF32); out (B, C, N)
// of T (c10::Half, c10::BFloat16, float: the same bits as Tr::E); stats (B, 2,
// N) float32. B and N non-zero, tensor_core_forward_fits<Tr>(Cq, the device's limit).
template <typename Tr, typename T>
void position_attention_forward_tensor_cores_launch(const typename Tr::E* q, const typename Tr::E* k,
                                                    const typename Tr::E* v, T* out, float* stats, int64_t B,
                                                    int64_t Cq, int64_t C, int64_t N, cudaStream_t stream) {
  const bool vec = vector_staging<Tr>(N, {q, k, v});
  auto kernel = forward_kernel_tc<Tr, T>;
  DANET_LAUNCH(kernel, forward_tc_geometry<Tr>(B, Cq, C, N), stream, q, k, v, out, stats, Cq, C, N, vec);
}

// The tensor-core backward on raw pointers. row_dot (B, N) float32 holds
// D = sum_c dO O (computed by the caller); ds_scale (B,) float32 from
// float16_grad_scores_scale() for float16, nullptr otherwise (no scaling);
// dq_acc, dk_acc (B, Cq, N) float32
// zero-filled; dv (B, C, N) of T; splits from grad_qk_tc_splits(), and for
// splits > 1 a workspace dk_parts of splits * B * Cq * N floats; v_resident
// from grad_qk_tc_v_resident<Tr>(). tensor_core_backward_fits<Tr>(Cq, the device's limit).
template <typename Tr, typename T>
void position_attention_backward_tensor_cores_launch(const typename Tr::E* grad_out, const typename Tr::E* q,
                                                     const typename Tr::E* k, const typename Tr::E* v,
                                                     const float* stats, const float* row_dot,
                                                     const float* ds_scale, float* dq_acc, float* dk_acc,
                                                     float* dk_parts, T* dv, int64_t B, int64_t Cq,
                                                     int64_t C, int64_t N, int64_t splits, bool v_resident,
                                                     cudaStream_t stream) {
  const bool vec = vector_staging<Tr>(N, {grad_out, q, k, v});
  const auto geometry = grad_qk_tc_geometry<Tr>(B, Cq, C, N, splits, v_resident);
  const int64_t split_queries = grad_qk_tc_split_queries(N, splits);
  float* dk_out = splits > 1 ? dk_parts : dk_acc;
  TORCH_CHECK(dk_out != nullptr, "danet_ext: the tensor-core backward needs a dK workspace for ", splits, " splits");
#define DANET_GRAD_QK_CASE(CQ16)                                                                                 \
  case CQ16: {                                                                                                   \
    auto kernel = v_resident ? grad_qk_kernel_tc<Tr, CQ16, true> : grad_qk_kernel_tc<Tr, CQ16, false>;           \
    DANET_LAUNCH(kernel, geometry, stream, grad_out, q, k, v, stats, row_dot, ds_scale, dq_acc, dk_out, Cq, C, \
                 N, split_queries, vec);                                                                         \
    break;                                                                                                       \
  }
  switch (round16(Cq)) {
    DANET_GRAD_QK_CASE(16)
    DANET_GRAD_QK_CASE(32)
    DANET_GRAD_QK_CASE(48)
    DANET_GRAD_QK_CASE(64)
    default:
      TORCH_CHECK(false, "danet_ext: the tensor-core backward takes 1 to ", kTcMaxCqBackward,
                  " query/key channels, got ", Cq);
  }
#undef DANET_GRAD_QK_CASE
  if (splits > 1) {
    const int64_t total = B * Cq * N;
    DANET_LAUNCH(sum_parts_kernel, sum_parts_geometry(total), stream, dk_parts, dk_acc, splits, total);
  }
  if (C > 0) {
    auto kernel = grad_v_kernel_tc<Tr, T>;
    DANET_LAUNCH(kernel, grad_v_tc_geometry<Tr>(B, Cq, C, N), stream, grad_out, q, k, stats, dv, Cq, C, N, vec);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace danet
