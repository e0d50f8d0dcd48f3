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
// Layouts (built once per product; P = ceil(N / 2) pairs of positions):
//   row pairs   ap[r * P + p]             = A[r][2p] | A[r][2p+1] << 16     (rows x P;
//               A itself where N is even, a zero-padded copy otherwise)
//   row panels  bp[(jp * P + p) * 16 + l] = B[16 jp + l][2p] | ... << 16,
//               zero past the last row                                     (ceil(rows/16) x P x 16)
// Tasks are 64 x 64 blocks of G (one panel group), each summed over chunks of
// kGramDepth pairs so that the group's panels stay in L1 while its rows pass.
// A symmetric product (B = A) computes the blocks on and right of the diagonal
// and mirrors the rest.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "bf16_scores.h"

namespace danet {
namespace cpu {

constexpr int64_t kGramBlock = 4 * kScorePanel;  // 64 rows x 64 columns per task
constexpr int64_t kGramDepth = 64;               // pairs per chunk: 16 KiB of panels

inline uint32_t row_pair(const at::BFloat16* row, int64_t N, int64_t p) {
  const uint32_t lo = row[2 * p].x;
  const uint32_t hi = 2 * p + 1 < N ? row[2 * p + 1].x : 0u;
  return lo | (hi << 16);
}

// rows (R x N, row-major) -> row pairs (R x P)
inline void pack_row_pairs(const at::BFloat16* x, int64_t R, int64_t N, uint32_t* out) {
  const int64_t P = (N + 1) / 2;
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t p = 0; p < P; ++p) out[r * P + p] = row_pair(x + r * N, N, p);
  });
}

// rows (R x N, row-major) -> row panels (ceil(R/16) x P x 16)
inline void pack_row_panels(const at::BFloat16* x, int64_t R, int64_t N, uint32_t* out) {
  const int64_t P = (N + 1) / 2, panels = (R + kScorePanel - 1) / kScorePanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t jp = begin; jp < end; ++jp)
      for (int64_t l = 0; l < kScorePanel; ++l) {
        const int64_t r = jp * kScorePanel + l;
        uint32_t* dst = out + jp * P * kScorePanel + l;
        if (r < R) {
          for (int64_t p = 0; p < P; ++p) dst[p * kScorePanel] = row_pair(x + r * N, N, p);
        } else {
          for (int64_t p = 0; p < P; ++p) dst[p * kScorePanel] = 0u;
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
  std::vector<uint32_t> ap(in_place ? 0 : Ra * P), bp(((Rb + kScorePanel - 1) / kScorePanel) * P * kScorePanel);
  if (!in_place) pack_row_pairs(a, Ra, N, ap.data());
  const bf16_pair_t* a_pairs = in_place ? reinterpret_cast<const bf16_pair_t*>(a) : ap.data();
  pack_row_panels(b, Rb, N, bp.data());
  const int64_t row_blocks = (Ra + kGramBlock - 1) / kGramBlock, col_blocks = (Rb + kGramBlock - 1) / kGramBlock;
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (int64_t rb = 0; rb < row_blocks; ++rb)
    for (int64_t cb = symmetric ? rb : 0; cb < col_blocks; ++cb) tasks.emplace_back(rb, cb);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = tasks[t].first * kGramBlock, c0 = tasks[t].second * kGramBlock;
      const int64_t rows = std::min(kGramBlock, Ra - r0), cols = std::min(kGramBlock, Rb - c0);
      for (int64_t p0 = 0; p0 < P; p0 += kGramDepth) {
        score_block(a_pairs + r0 * P + p0, P, bp.data() + (c0 / kScorePanel) * P * kScorePanel + p0 * kScorePanel,
                    P * kScorePanel, std::min(kGramDepth, P - p0), g + r0 * Rb + c0, Rb, rows, cols, p0 > 0);
      }
    }
  });
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
