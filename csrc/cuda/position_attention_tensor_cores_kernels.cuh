// Position attention (PAM) on tensor cores for float16 and bfloat16 inputs,
// compute capability 8.0 and newer: the kernels, their launch geometry and
// launch sequences on raw pointers. Compiled by nvcc through
// position_attention_tensor_cores.cu and, for the tests, by the host compiler
// through the CUDA emulation (tests/cuda_emulation).
//
// out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j   (no 1/sqrt(d) scaling)
//
// FlashAttention-2's structure with mma.sync m16n8k16 and ldmatrix
// (mma_sm80.cuh): a block is 4 warps; each warp owns 16 rows (queries in the
// forward, keys in the backward) of a 64-row tile and walks the other side in
// 64-column steps. Scores S = Q^T K are computed once per step into float32
// fragments; the online softmax runs on them in registers (rows g and g + 8
// of each lane, reduced over the 4 lanes of a quad); the probabilities,
// rounded to the input dtype as in FlashAttention, are the A operand of the
// next product without leaving registers. Softmax statistics, accumulators
// and dQ are float32. No N x N tensor is formed; the backward recomputes P
// from the saved statistics.
//
//   forward_kernel_tc   grid (query tiles, 128-channel blocks of C, B):
//                       O[c0 : c0+128, tile] in registers (64 floats a lane);
//                       S is recomputed once per channel block (C / 128 times).
//   grad_v_kernel_tc    grid (key tiles, 128-channel blocks, B): dV^T += P^T dO^T.
//   grad_qk_kernel_tc   grid (key tiles, query-range splits, B): dP^T = V^T dO
//                       (V's tile resident in shared memory where two blocks
//                       still fit on an SM, else staged with dO 64 channels at
//                       a time), dS^T = P^T (dP^T - D),
//                       dK^T += dS^T Q^T in registers (one partial sum per split,
//                       added in a fixed order), dQ += dS K through shared memory
//                       and float32 atomics (not deterministic: the launcher
//                       raises under torch.use_deterministic_algorithms).
//
// Operands go global -> shared memory (zero-filled past N and past the
// channel counts; 16-byte copies when N % 8 == 0 and the pointers allow it)
// -> fragments. Shared tiles are channel-major rows of 64 + 8 elements: 144
// bytes, so ldmatrix's 8 row addresses fall in 8 distinct 4-bank groups.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#if !defined(DANET_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "../attention_math.h"
#include "device_common.cuh"
#include "launch.cuh"
#include "mma_sm80.cuh"

namespace danet {
namespace cuda {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
// Two blocks per SM (up to 255 registers a thread): with __launch_bounds__(128)
// alone, ptxas capped grad_qk_kernel_tc<bfloat16, 16> at 128 registers on sm_80
// and spilled 24 bytes to the stack (found by tests/cuda_emulation/test_device_build.py).
constexpr int kTcMinBlocks = 2;
constexpr int kTcTile = 64;            // rows of a block (queries or keys), and columns per step
constexpr int kTcTileC = 128;          // value channels of a forward / dV block
constexpr int kTcChunkC = 64;          // dO channels staged per step of grad_qk_kernel_tc
constexpr int kPitch = kTcTile + 8;    // 16-bit elements per shared row (144 bytes)
constexpr int kRowBytes = kPitch * 2;
constexpr int kScoreTiles = kTcTile / 8;   // n8 tiles of a warp's 16 x 64 score block
constexpr int kOutTiles = kTcTileC / 8;    // n8 tiles of a warp's 16 x 128 output block

// Which shapes the tensor-core kernels take (the launcher falls back to the
// CUDA-core kernels otherwise): the forward stages Q^T and K tiles of
// round16(Cq) rows (and must fit the device's shared memory: see
// tensor_core_forward_fits); grad_qk keeps dK^T in registers (Cq <= 64).
constexpr int64_t kTcMaxCqForward = 512;
constexpr int64_t kTcMaxCqBackward = 64;
// Shared memory a block may use without raising the kernel's attribute; every
// device of compute capability 8.0+ allows at least 99 KiB with it (8.6, 8.9),
// 163 KiB on 8.0, 227 KiB on 9.0.
constexpr int64_t kTcPlainSharedBytes = 48 * 1024;

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

__host__ __device__ __forceinline__ int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }

__device__ __forceinline__ uint16_t bits16(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint16_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename M>
__device__ __forceinline__ uint16_t round_bits(float v);
template <>
__device__ __forceinline__ uint16_t round_bits<__half>(float v) { return bits16(__float2half_rn(v)); }
template <>
__device__ __forceinline__ uint16_t round_bits<__nv_bfloat16>(float v) { return bits16(__float2bfloat16_rn(v)); }

// dst[r * kPitch + x] = src[(r0 + r) * N + x0 + x] for r < fill_rows, x < 64,
// copied bit for bit; 0 where r0 + r >= rows or x0 + x >= N. `vec`: N % 8 == 0
// and src 16-byte aligned, so every 8-element run is one 16-byte access.
template <typename M>
__device__ __forceinline__ void stage_tile(const M* __restrict__ src, int64_t rows, int64_t N, int64_t r0,
                                           int fill_rows, int64_t x0, M* dst, bool vec) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  if (vec) {
    for (int e = threadIdx.x; e < fill_rows * (kTcTile / 8); e += kTcThreads) {
      const int r = e / (kTcTile / 8), x = (e % (kTcTile / 8)) * 8;
      const int64_t gr = r0 + r, gx = x0 + x;
      uint4 val{0u, 0u, 0u, 0u};
      if (gr < rows && gx < N) val = *reinterpret_cast<const uint4*>(s + gr * N + gx);
      *reinterpret_cast<uint4*>(d + r * kPitch + x) = val;
    }
  } else {
    for (int e = threadIdx.x; e < fill_rows * kTcTile; e += kTcThreads) {
      const int r = e / kTcTile, x = e % kTcTile;
      const int64_t gr = r0 + r, gx = x0 + x;
      d[r * kPitch + x] = (gr < rows && gx < N) ? s[gr * N + gx] : uint16_t(0);
    }
  }
}

// Lane roles in ldmatrix x4: lane L gives row L % 8 of matrix L / 8.
__device__ __forceinline__ int ld_mat() { return (threadIdx.x % 32) / 8; }
__device__ __forceinline__ int ld_row() { return threadIdx.x % 8; }

// s[nt] += (16 x depth) . (depth x 64) for a warp: s[r][n] = sum_c a[c][row0 + r] b[c][n],
// both operands channel-major in shared memory (a[c * kPitch + row]); depth a
// multiple of 16. A is read with ldmatrix.trans (column-major A), B likewise.
template <typename M>
__device__ __forceinline__ void warp_scores(const M* a, const M* b, int64_t depth, int row0,
                                            float (&s)[kScoreTiles][4]) {
  const int mat = ld_mat(), r = ld_row();
  for (int64_t kc = 0; kc < depth; kc += 16) {
    uint32_t af[4];
    ldmatrix<4, true>(af, a + (kc + (mat >> 1) * 8 + r) * kPitch + row0 + (mat & 1) * 8);
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; nt += 2) {
      uint32_t bf[4];
      ldmatrix<4, true>(bf, b + (kc + (mat & 1) * 8 + r) * kPitch + nt * 8 + (mat >> 1) * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<M>(s[nt], af, b0);
      mma_m16n8k16<M>(s[nt + 1], af, b1);
    }
  }
}

// The A fragment of columns 16 kk .. 16 kk + 15 of a warp's 16 x 64 float
// block held as C fragments (see mma_sm80.cuh), rounded to M.
template <typename M>
__device__ __forceinline__ void a_from_c(const float (&p)[kScoreTiles][4], int kk, uint32_t (&a)[4]) {
  a[0] = pack2<M>(p[2 * kk][0], p[2 * kk][1]);
  a[1] = pack2<M>(p[2 * kk][2], p[2 * kk][3]);
  a[2] = pack2<M>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
  a[3] = pack2<M>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
}

// acc[ct] += P B for a warp: P is its 16 x 64 block in registers (rounded to
// M), B[k][n] = b[n * kPitch + k] (row n of the shared tile holds column n of
// B), n < 8 kTiles. ldmatrix without .trans gives B's "col" fragments.
template <typename M, int kTiles>
__device__ __forceinline__ void warp_product(const float (&p)[kScoreTiles][4], const M* b,
                                             float (&acc)[kTiles][4]) {
  static_assert(kTiles % 2 == 0, "pairs of n8 tiles");
  const int mat = ld_mat(), r = ld_row();
#pragma unroll
  for (int kk = 0; kk < kTcTile / 16; ++kk) {
    uint32_t a[4];
    a_from_c<M>(p, kk, a);
#pragma unroll
    for (int ct = 0; ct < kTiles; ct += 2) {
      uint32_t bf[4];
      ldmatrix<4, false>(bf, b + (ct * 8 + (mat >> 1) * 8 + r) * kPitch + kk * 16 + (mat & 1) * 8);
      const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
      mma_m16n8k16<M>(acc[ct], a, b0);
      mma_m16n8k16<M>(acc[ct + 1], a, b1);
    }
  }
}

// Reductions over the 4 lanes of a quad (the lanes that share a fragment row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Fragment coordinates of element e of n8 tile nt, for this lane.
__device__ __forceinline__ int frag_row(int e) { return (threadIdx.x % 32) / 4 + 8 * (e >> 1); }
__device__ __forceinline__ int frag_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x % 4) + (e & 1); }

// Copies a (rows x 64) tile of 16-bit values staged as stage[r * kPitch + x]
// to dst[(r0 + r) * N + x0 + x], where r0 + r < rows_total and x0 + x < N (coalesced).
template <typename T>
__device__ __forceinline__ void store_tile(const uint16_t* stage, int rows, int64_t rows_total, int64_t N,
                                           int64_t r0, int64_t x0, T* __restrict__ dst) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int e = threadIdx.x; e < rows * kTcTile; e += kTcThreads) {
    const int r = e / kTcTile, x = e % kTcTile;
    const int64_t gr = r0 + r, gx = x0 + x;
    if (gr < rows_total && gx < N) d[gr * N + gx] = stage[r * kPitch + x];
  }
}

// ---- forward ------------------------------------------------------------------
// Dynamic shared memory: qs (round16(Cq) rows, the block's Q^T tile, staged
// once), ks (round16(Cq) rows), vs (128 rows; after the walk, the output tile).
inline int64_t forward_tc_shared_bytes(int64_t Cq) { return (2 * round16(Cq) + kTcTileC) * kRowBytes; }

// kNormalised (bfloat16): the accumulator holds the normalised output so far,
// so it stays within max |v| and cannot overflow where the result fits
// (bfloat16 reaches 3e38); float16 values stay below 65504, so the float16
// kernel accumulates exp(s - m) in [0, 1] as FlashAttention does and divides
// once at the end, which keeps the rounded probabilities out of float16's
// subnormal range.
template <typename M, typename T>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    forward_kernel_tc(const M* __restrict__ q, const M* __restrict__ k, const M* __restrict__ v,
                      T* __restrict__ out, float* __restrict__ stats, int64_t Cq, int64_t C, int64_t N, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // the host launches this only on compute capability 8.0 and newer
#else
  constexpr bool kNormalised = std::is_same<M, __nv_bfloat16>::value;
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t cq16 = round16(Cq);
  M* qs = reinterpret_cast<M*>(smem);
  M* ks = qs + cq16 * kPitch;
  M* vs = ks + cq16 * kPitch;
  const int row0 = (threadIdx.x / 32) * 16;
  const int64_t b = blockIdx.z;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTcTileC;
  q += b * Cq * N;
  k += b * Cq * N;
  v += b * C * N;
  stage_tile(q, Cq, N, 0, static_cast<int>(cq16), i0, qs, vec);

  float o[kOutTiles][4];
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[ct][e] = 0.f;
  float row_m[2] = {neg_infinity<float>(), neg_infinity<float>()}, row_l[2] = {0.f, 0.f};

  for (int64_t j0 = 0; j0 < N; j0 += kTcTile) {
    stage_tile(k, Cq, N, 0, static_cast<int>(cq16), j0, ks, vec);
    stage_tile(v, C, N, c0, kTcTileC, j0, vs, vec);
    __syncthreads();
    float s[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    warp_scores(qs, ks, cq16, row0, s);

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
        const float inv = 1.f / l_new;
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
    warp_product<M, kOutTiles>(s, vs, o);  // O^T (queries x channels) += P V^T
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
  uint16_t* stage = reinterpret_cast<uint16_t*>(vs);
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float val = kNormalised ? o[ct][e] : o[ct][e] * inv_l[e >> 1];
      stage[frag_col(ct, e) * kPitch + row0 + frag_row(e)] = round_bits<M>(val);
    }
  __syncthreads();
  store_tile(stage, kTcTileC, C, N, c0, i0, out + b * C * N);
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
inline int64_t grad_v_tc_shared_bytes(int64_t Cq) {
  return (2 * round16(Cq) + kTcTileC) * kRowBytes + 2 * kTcTile * 4;
}

template <typename M, typename T>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    grad_v_kernel_tc(const M* __restrict__ dout, const M* __restrict__ q, const M* __restrict__ k,
                     const float* __restrict__ stats, T* __restrict__ dv, int64_t Cq, int64_t C, int64_t N,
                     bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t cq16 = round16(Cq);
  M* ks = reinterpret_cast<M*>(smem);
  M* qs = ks + cq16 * kPitch;
  M* dos = qs + cq16 * kPitch;
  float* row_max = reinterpret_cast<float*>(dos + kTcTileC * kPitch);
  float* row_inv = row_max + kTcTile;
  const int row0 = (threadIdx.x / 32) * 16;
  const int64_t b = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTcTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTcTileC;
  q += b * Cq * N;
  k += b * Cq * N;
  dout += b * C * N;
  const float* stats_b = stats + b * 2 * N;
  stage_tile(k, Cq, N, 0, static_cast<int>(cq16), j0, ks, vec);

  float acc[kOutTiles][4];
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[ct][e] = 0.f;

  // Normalised probabilities average 1/N: at N = 32768 most fall below float16's
  // smallest normal (6.1e-5) and would lose bits when rounded. float16 rounds
  // P * 2^15 instead (P <= 1, so at most 32768 < 65504) and the accumulator is
  // scaled back exactly at the end; bfloat16 has float32's exponent range.
  constexpr float kPScale = std::is_same<M, __half>::value ? 32768.f : 1.f;
  for (int64_t i0 = 0; i0 < N; i0 += kTcTile) {
    stage_tile(q, Cq, N, 0, static_cast<int>(cq16), i0, qs, vec);
    stage_tile(dout, C, N, c0, kTcTileC, i0, dos, vec);
    stage_query_stats(stats_b, nullptr, N, i0, row_max, row_inv, nullptr);
    __syncthreads();
    float p[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = 0.f;
    warp_scores(ks, qs, cq16, row0, p);  // S^T: this warp's 16 keys x 64 queries
    probs_t(p, row_max, row_inv, j0 + row0, N);
    if (kPScale != 1.f) {
#pragma unroll
      for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) p[nt][e] *= kPScale;
    }
    warp_product<M, kOutTiles>(p, dos, acc);  // dV^T (keys x channels) += P^T dO^T
    __syncthreads();
  }
  uint16_t* stage = reinterpret_cast<uint16_t*>(dos);
#pragma unroll
  for (int ct = 0; ct < kOutTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      stage[frag_col(ct, e) * kPitch + row0 + frag_row(e)] = round_bits<M>(acc[ct][e] * (1.f / kPScale));
  __syncthreads();
  store_tile(stage, kTcTileC, C, N, c0, j0, dv + b * C * N);
#endif
}

// dK and dQ. Dynamic shared memory: ks (kCq16 rows, staged once), qs (kCq16
// rows), vs (V's tile: round16(C) rows staged once if v_resident, else one
// 64-channel chunk at a time), dos (dO's 64-channel chunk), dss (the block's
// dS^T, 64 rows), then 3 x 64 floats of statistics. At Cq = 64: 46 KiB with V
// in chunks, whatever C; 109 KiB with V resident at C = 512.
inline int64_t grad_qk_tc_shared_bytes(int64_t Cq, int64_t C, bool v_resident) {
  return (2 * round16(Cq) + (v_resident ? round16(C) : kTcChunkC) + kTcChunkC + kTcTile) * kRowBytes +
         3 * kTcTile * 4;
}

// V's tile stays resident (read once per block instead of once per query tile)
// where the block still fits the device and two blocks fit on an SM (an H100
// at C <= 512); otherwise it is staged in chunks with dO.
inline bool grad_qk_tc_v_resident(int64_t Cq, int64_t C, int64_t max_shared_block, int64_t shared_per_sm) {
  const int64_t bytes = grad_qk_tc_shared_bytes(Cq, C, true);
  return bytes <= max_shared_block && 2 * (bytes + 1024) <= shared_per_sm;
}

// grid (key tiles, splits, B): block (x, s, b) walks the query tiles of split s,
// queries [s * split_queries, (s + 1) * split_queries), and writes its keys' dK
// to dk_out[s] (the split's partial sums, added up in a fixed order afterwards).
template <typename M, int kCq16, bool kVResident>
__global__ void __launch_bounds__(kTcThreads, kTcMinBlocks)
    grad_qk_kernel_tc(const M* __restrict__ dout, const M* __restrict__ q, const M* __restrict__ k,
                      const M* __restrict__ v, const float* __restrict__ stats, const float* __restrict__ row_dot,
                      float* __restrict__ dq_acc, float* __restrict__ dk_out, int64_t Cq, int64_t C, int64_t N,
                      int64_t split_queries, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kCqTiles = kCq16 / 8;
  DANET_DYNAMIC_SHARED(unsigned char, smem);
  const int64_t c16 = round16(C);
  M* ks = reinterpret_cast<M*>(smem);
  M* qs = ks + kCq16 * kPitch;
  M* vs = qs + kCq16 * kPitch;
  M* dos = vs + (kVResident ? c16 : kTcChunkC) * kPitch;
  M* dss = dos + kTcChunkC * kPitch;
  float* row_max = reinterpret_cast<float*>(dss + kTcTile * kPitch);
  float* row_inv = row_max + kTcTile;
  float* row_d = row_inv + kTcTile;
  const int row0 = (threadIdx.x / 32) * 16;
  const int mat = ld_mat(), r = ld_row();
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
  stage_tile(k, Cq, N, 0, kCq16, j0, ks, vec);
  if (kVResident) stage_tile(v, C, N, 0, static_cast<int>(c16), j0, vs, vec);

  float dk[kCqTiles][4];
#pragma unroll
  for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[ct][e] = 0.f;

  for (int64_t i0 = i_begin; i0 < i_end; i0 += kTcTile) {
    stage_tile(q, Cq, N, 0, kCq16, i0, qs, vec);
    stage_query_stats(stats_b, dot_b, N, i0, row_max, row_inv, row_d);
    __syncthreads();
    float p[kScoreTiles][4], dp[kScoreTiles][4];
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = dp[nt][e] = 0.f;
    warp_scores(ks, qs, kCq16, row0, p);  // S^T
    probs_t(p, row_max, row_inv, j0 + row0, N);
    for (int64_t cc = 0; cc < c16; cc += kTcChunkC) {  // dP^T = V^T dO, 64 channels a step
      const int64_t depth = c16 - cc < kTcChunkC ? c16 - cc : kTcChunkC;
      if (!kVResident) stage_tile(v, C, N, cc, static_cast<int>(depth), j0, vs, vec);
      stage_tile(dout, C, N, cc, static_cast<int>(depth), i0, dos, vec);
      __syncthreads();
      warp_scores(kVResident ? vs + cc * kPitch : vs, dos, depth, row0, dp);
      __syncthreads();
    }
    // dS^T = P^T (dP^T - D); kept in dp.
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[nt][e] = softmax_grad(p[nt][e], dp[nt][e], row_d[frag_col(nt, e)]);
    warp_product<M, kCqTiles>(dp, qs, dk);  // dK^T (keys x channels) += dS^T Q^T
    uint16_t* ds_rows = reinterpret_cast<uint16_t*>(dss);
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds_rows[(row0 + frag_row(e)) * kPitch + frag_col(nt, e)] = round_bits<M>(dp[nt][e]);
    __syncthreads();
    // dQ^T (this warp's 16 queries x channels) = dS K^T over the block's 64 keys.
    float dq[kCqTiles][4];
#pragma unroll
    for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[ct][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kTcTile / 16; ++kk) {
      uint32_t a[4];  // dS (queries x keys) from dS^T's rows: a column-major A
      ldmatrix<4, true>(a, dss + (kk * 16 + (mat >> 1) * 8 + r) * kPitch + row0 + (mat & 1) * 8);
#pragma unroll
      for (int ct = 0; ct < kCqTiles; ct += 2) {
        uint32_t bf[4];  // K^T (keys x channels): row c of ks holds column c
        ldmatrix<4, false>(bf, ks + (ct * 8 + (mat >> 1) * 8 + r) * kPitch + kk * 16 + (mat & 1) * 8);
        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
        mma_m16n8k16<M>(dq[ct], a, b0);
        mma_m16n8k16<M>(dq[ct + 1], a, b1);
      }
    }
#pragma unroll
    for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t c = frag_col(ct, e), i = i0 + row0 + frag_row(e);
        if (c < Cq && i < N) atomicAdd(&dqb[c * N + i], dq[ct][e]);
      }
    __syncthreads();  // qs and dss are refilled in the next step
  }
#pragma unroll
  for (int ct = 0; ct < kCqTiles; ++ct)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t c = frag_col(ct, e), j = j0 + row0 + frag_row(e);
      if (c < Cq && j < N) dkb[c * N + j] = dk[ct][e];  // the block owns these keys
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
inline LaunchGeometry forward_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N) {
  return make_geometry("forward_kernel_tc", ceil_div(N, kTcTile), std::max<int64_t>(1, ceil_div(C, kTcTileC)), B,
                       kTcThreads, forward_tc_shared_bytes(Cq));
}
inline LaunchGeometry grad_v_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N) {
  return make_geometry("grad_v_kernel_tc", ceil_div(N, kTcTile), ceil_div(C, kTcTileC), B, kTcThreads,
                       grad_v_tc_shared_bytes(Cq));
}
// grad_qk_kernel_tc has one block per key tile and image: 64 blocks at N = 4096,
// B = 1, half an H100. The query range is then split so that the grid holds
// at most one wave of two blocks per SM (its occupancy: 256 blocks there);
// each split's dK goes to its own buffer.
inline int64_t grad_qk_tc_splits(int64_t B, int64_t N, int64_t sm_count) {
  const int64_t tiles = ceil_div(N, kTcTile);
  const int64_t wanted = std::max<int64_t>(1, std::min<int64_t>(tiles, 2 * sm_count / (tiles * B)));
  return ceil_div(tiles, ceil_div(tiles, wanted));  // no empty split
}
inline int64_t grad_qk_tc_split_queries(int64_t N, int64_t splits) {
  return ceil_div(ceil_div(N, kTcTile), splits) * kTcTile;
}
inline LaunchGeometry grad_qk_tc_geometry(int64_t B, int64_t Cq, int64_t C, int64_t N, int64_t splits,
                                          bool v_resident) {
  return make_geometry("grad_qk_kernel_tc", ceil_div(N, kTcTile), splits, B, kTcThreads,
                       grad_qk_tc_shared_bytes(Cq, C, v_resident));
}
inline LaunchGeometry sum_parts_geometry(int64_t total) {
  return make_geometry("sum_parts_kernel", ceil_div(total, kThreads), 1, 1, kThreads);
}

// Whether the kernels take these channel counts on a device whose blocks may
// use up to max_shared bytes of shared memory (cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline bool tensor_core_forward_fits(int64_t Cq, int64_t max_shared) {
  return Cq >= 1 && Cq <= kTcMaxCqForward && forward_tc_shared_bytes(Cq) <= max_shared;
}
inline bool tensor_core_backward_fits(int64_t Cq, int64_t max_shared) {
  return Cq >= 1 && Cq <= kTcMaxCqBackward && grad_qk_tc_shared_bytes(Cq, 0, false) <= max_shared &&
         grad_v_tc_shared_bytes(Cq) <= max_shared;
}

// 16-byte staging copies: rows of N elements start 16-byte aligned.
inline bool vector_staging(int64_t N, std::initializer_list<const void*> ptrs) {
  if (N % 8 != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// The tensor-core forward on raw pointers: q, k (B, Cq, N), v (B, C, N) as the
// 16-bit MMA type M; out (B, C, N) of T (c10::Half / c10::BFloat16, same bits
// as M); stats (B, 2, N) float32. B and N non-zero, tensor_core_forward_fits(Cq, the device's limit).
template <typename M, typename T>
void position_attention_forward_tensor_cores_launch(const M* q, const M* k, const M* v, T* out, float* stats,
                                                    int64_t B, int64_t Cq, int64_t C, int64_t N,
                                                    cudaStream_t stream) {
  const bool vec = vector_staging(N, {q, k, v});
  auto kernel = forward_kernel_tc<M, T>;
  DANET_LAUNCH(kernel, forward_tc_geometry(B, Cq, C, N), stream, q, k, v, out, stats, Cq, C, N, vec);
}

// The tensor-core backward on raw pointers. row_dot (B, N) float32 holds
// D = sum_c dO O (computed by the caller); dq_acc, dk_acc (B, Cq, N) float32
// zero-filled; dv (B, C, N) of T; splits from grad_qk_tc_splits(), and for
// splits > 1 a workspace dk_parts of splits * B * Cq * N floats; v_resident
// from grad_qk_tc_v_resident(). tensor_core_backward_fits(Cq, the device's limit).
template <typename M, typename T>
void position_attention_backward_tensor_cores_launch(const M* grad_out, const M* q, const M* k, const M* v,
                                                     const float* stats, const float* row_dot, float* dq_acc,
                                                     float* dk_acc, float* dk_parts, T* dv, int64_t B, int64_t Cq,
                                                     int64_t C, int64_t N, int64_t splits, bool v_resident,
                                                     cudaStream_t stream) {
  const bool vec = vector_staging(N, {grad_out, q, k, v});
  const auto geometry = grad_qk_tc_geometry(B, Cq, C, N, splits, v_resident);
  const int64_t split_queries = grad_qk_tc_split_queries(N, splits);
  float* dk_out = splits > 1 ? dk_parts : dk_acc;
  TORCH_CHECK(dk_out != nullptr, "danet_ext: the tensor-core backward needs a dK workspace for ", splits, " splits");
#define DANET_GRAD_QK_CASE(CQ16)                                                                                 \
  case CQ16: {                                                                                                   \
    auto kernel = v_resident ? grad_qk_kernel_tc<M, CQ16, true> : grad_qk_kernel_tc<M, CQ16, false>;             \
    DANET_LAUNCH(kernel, geometry, stream, grad_out, q, k, v, stats, row_dot, dq_acc, dk_out, Cq, C, N,         \
                 split_queries, vec);                                                                            \
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
    auto kernel = grad_v_kernel_tc<M, T>;
    DANET_LAUNCH(kernel, grad_v_tc_geometry(B, Cq, C, N), stream, grad_out, q, k, stats, dv, Cq, C, N, vec);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace danet
