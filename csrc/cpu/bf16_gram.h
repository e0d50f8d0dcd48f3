// Gram products G = A B^T of bfloat16 rows in float32, on CPUs with AVX512-BF16.
//
// Channel attention's E = X X^T (forward) and dA = dO X^T (backward) are sums over
// all N positions whose entries reach thousands. oneDNN's bfloat16 matmul rounds
// such a sum to bfloat16 (8 significant bits), so the kernel used to sum bfloat16
// products over slices of 1024 positions in float32, at float32 GEMM speed. The
// AVX512-BF16 micro-kernel of bf16_scores.h multiplies the bfloat16 pairs exactly
// and sums in float32, so G equals a float32 GEMM on the rows up to the order of
// the additions, at bfloat16 speed.
//
// Layouts (P = ceil(N / 2) pairs of positions, packed kGramPackPairs pairs at a time, so
// that the copies stay a few MiB however large N is; Q pairs in the current range):
//   row pairs   ap[r * Q + p]             = A[r][2p] | A[r][2p+1] << 16     (rows x Q;
//               A itself where N is even, a zero-padded copy otherwise)
//   row panels  bp[(jp * Q + p) * 16 + l] = B[16 jp + l][2p] | ... << 16,
//               zero past the last row                                     (ceil(rows/16) x Q x 16)
// Tasks are 64 x 64 blocks of G (one panel group), each summed over chunks of
// kGramDepth pairs so that the group's panels stay in L1 while its rows pass.
// A symmetric product (B = A) computes the blocks on and right of the diagonal
// and mirrors the rest.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bf16_scores.h"

namespace danet {
namespace cpu {

constexpr int64_t kGramBlock = 4 * kScorePanel;  // 64 rows x 64 columns per task
constexpr int64_t kGramDepth = 64;               // pairs per chunk: 16 KiB of panels
constexpr int64_t kGramPackPairs = 2048;         // pairs packed at a time: 8 KiB per row of B

inline uint32_t row_pair(const at::BFloat16* row, int64_t N, int64_t p) {
  const uint32_t lo = row[2 * p].x;
  const uint32_t hi = 2 * p + 1 < N ? row[2 * p + 1].x : 0u;
  return lo | (hi << 16);
}

// pairs [p0, p0 + count) of rows (R x N, row-major) -> row pairs (R x count): each row's
// bytes, and with N odd its last value alone in the last pair (upper half zero).
inline void pack_row_pairs(const at::BFloat16* x, int64_t R, int64_t N, int64_t p0, int64_t count, uint32_t* out) {
  const int64_t whole = std::max<int64_t>(0, std::min(count, N / 2 - p0));  // pairs of two values
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(out + r * count, x + r * N + 2 * p0, whole * sizeof(uint32_t));
      for (int64_t p = whole; p < count; ++p) out[r * count + p] = row_pair(x + r * N, N, p0 + p);
    }
  });
}

#ifdef DANET_BF16_SCORES_X86
// In place, r[i] becomes column i of the 16 x 16 matrix of 32-bit elements whose rows were r[0..15].
DANET_TARGET_AVX512BF16 inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  // t[2k]:   per 128-bit lane q, r[2k][4q], r[2k+1][4q], r[2k][4q+1], r[2k+1][4q+1]; t[2k+1]: 4q+2, 4q+3
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  // u[4g + e]: lane q holds rows 4g..4g+3 of element 4q + e
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // column 4q + e: lane q of u[e], u[4 + e], u[8 + e], u[12 + e] (a 4 x 4 transpose of lanes)
  for (int e = 0; e < 4; ++e) {
    const __m512i a = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), b = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i c = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44), d = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(a, c, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(a, c, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(b, d, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(b, d, 0xDD);
  }
}

// Pairs [0, pairs) of panel `rows` (up to 16 rows at x, stride N) into dst (pairs x 16),
// pairs a multiple of 16 whose 2 * pairs values lie inside each row: one 16 x 16 transpose
// per 16 pairs.
DANET_TARGET_AVX512BF16 inline void pack_panel_blocks(const at::BFloat16* x, int64_t rows, int64_t N, int64_t pairs,
                                                      uint32_t* dst) {
  __m512i r[16];
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    for (int64_t l = 0; l < 16; ++l)
      r[l] = l < rows ? _mm512_loadu_si512(x + l * N + 2 * p0) : _mm512_setzero_si512();
    transpose_16x16_epi32(r);
    for (int64_t c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (p0 + c) * kScorePanel, r[c]);
  }
}
#endif

// pairs [p0, p0 + count) of rows (R x N, row-major) -> row panels (ceil(R/16) x count x 16)
inline void pack_row_panels(const at::BFloat16* x, int64_t R, int64_t N, int64_t p0, int64_t count, uint32_t* out) {
  const int64_t panels = (R + kScorePanel - 1) / kScorePanel;
#ifdef DANET_BF16_SCORES_X86
  const int64_t whole = std::max<int64_t>(0, std::min(count, N / 2 - p0));  // pairs of two values
  const int64_t blocked = whole / kScorePanel * kScorePanel;                 // packed 16 at a time
#else
  const int64_t blocked = 0;
#endif
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t jp = begin; jp < end; ++jp) {
      const int64_t r0 = jp * kScorePanel;
#ifdef DANET_BF16_SCORES_X86
      pack_panel_blocks(x + r0 * N + 2 * p0, std::min(kScorePanel, R - r0), N, blocked, out + jp * count * kScorePanel);
#endif
      for (int64_t l = 0; l < kScorePanel; ++l) {
        const int64_t r = r0 + l;
        uint32_t* dst = out + jp * count * kScorePanel + l;
        for (int64_t p = blocked; p < count; ++p) dst[p * kScorePanel] = r < R ? row_pair(x + r * N, N, p0 + p) : 0u;
      }
    }
  });
}

// G (Ra x Rb float32, row-major) = A B^T for A (Ra x N) and B (Rb x N) in bfloat16.
// symmetric: B is A (Ra == Rb); the lower blocks are mirrored. Only called where
// use_bf16_scores() is true.
inline void bf16_gram(const at::BFloat16* a, const at::BFloat16* b, int64_t Ra, int64_t Rb, int64_t N,
                      bool symmetric, float* g) {
#ifdef DANET_BF16_SCORES_X86
  const int64_t P = (N + 1) / 2;
  if (Ra == 0 || Rb == 0) return;
  if (P == 0) {
    std::fill(g, g + Ra * Rb, 0.f);
    return;
  }
  // With N even (and A 4-byte aligned), A's rows already are its row pairs
  // (little-endian: element 2p in the low half).
  const bool in_place = N % 2 == 0 && reinterpret_cast<uintptr_t>(a) % alignof(uint32_t) == 0;
  const int64_t chunk = std::min(P, kGramPackPairs);
  // Left uninitialised (every element is written by its pack): zeroing them cost as much as packing.
  std::unique_ptr<uint32_t[]> ap(new uint32_t[in_place ? 0 : Ra * chunk]);
  std::unique_ptr<uint32_t[]> bp(new uint32_t[((Rb + kScorePanel - 1) / kScorePanel) * chunk * kScorePanel]);
  const int64_t row_blocks = (Ra + kGramBlock - 1) / kGramBlock, col_blocks = (Rb + kGramBlock - 1) / kGramBlock;
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t rb = 0; rb < row_blocks; ++rb)
    for (int64_t cb = symmetric ? rb : 0; cb < col_blocks; ++cb) tasks.emplace_back(rb, cb);
  for (int64_t q0 = 0; q0 < P; q0 += chunk) {  // pairs [q0, q0 + count): packed, then every task
    const int64_t count = std::min(chunk, P - q0);
    if (!in_place) pack_row_pairs(a, Ra, N, q0, count, ap.get());
    pack_row_panels(b, Rb, N, q0, count, bp.get());
    const bf16_pair_t* a_pairs = in_place ? reinterpret_cast<const bf16_pair_t*>(a) + q0 : ap.get();
    const int64_t lda = in_place ? P : count;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = tasks[t].first * kGramBlock, c0 = tasks[t].second * kGramBlock;
        const int64_t rows = std::min(kGramBlock, Ra - r0), cols = std::min(kGramBlock, Rb - c0);
        for (int64_t p0 = 0; p0 < count; p0 += kGramDepth) {
          score_block(a_pairs + r0 * lda + p0, lda,
                      bp.get() + (c0 / kScorePanel) * count * kScorePanel + p0 * kScorePanel, count * kScorePanel,
                      std::min(kGramDepth, count - p0), g + r0 * Rb + c0, Rb, rows, cols, q0 + p0 > 0);
        }
      }
    });
  }
  if (symmetric) {
    at::parallel_for(0, Ra, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t below = (i / kGramBlock) * kGramBlock;  // columns of the blocks left of the diagonal
        for (int64_t j = 0; j < below; ++j) g[i * Rb + j] = g[j * Rb + i];
      }
    });
  }
#else
  (void)a; (void)b; (void)Ra; (void)Rb; (void)N; (void)symmetric; (void)g;
  TORCH_CHECK(false, "bf16_gram: this build has no AVX512-BF16 kernel");
#endif
}

}  // namespace cpu
}  // namespace danet
