// Score tiles S = Q^T K from bfloat16 Q and K on CPUs with AVX512-BF16.
//
// The bfloat16 position-attention kernels keep the scores in float32: rounding
// them to bfloat16, as the reference's bmm does, costs 0.1 to 0.3 of absolute
// error in the output at logits of a few tens. oneDNN's bfloat16 matmul only
// returns bfloat16 and PyTorch's CPU mm has no float32 output for bfloat16
// inputs, so the scores used to be a float32 GEMM on float32 copies of Q and K.
// vdpbf16ps gives the same numbers at twice the width: it multiplies pairs of
// bfloat16 exactly (8-bit significands, 16-bit products) and adds both products
// to a float32 accumulator, so S differs from the float32 GEMM only in the
// order of the float32 additions. (It also treats subnormal inputs as zero and
// flushes subnormal results, whatever MXCSR says: terms below 1e-38, far under
// a float32 score's rounding at any magnitude that matters to the softmax.)
//
// Layouts (built once per call, Cq padded to an even P = ceil(Cq / 2) pairs):
//   query pairs  qp[i * P + p]              = Q[2p][i] | Q[2p+1][i] << 16     (N x P)
//   key panels   kp[(jp * P + p) * 16 + l]  = K[2p][j] | K[2p+1][j] << 16,
//                j = 16 jp + l, zero past N                                   (ceil(N/16) x P x 16)
// The micro-kernel holds a 4 x 64 tile of S in 16 zmm registers; per pair p it
// loads four 16-key vectors and broadcasts four query pairs. A panel group of
// 64 keys over P = 32 pairs is 8 KiB, so it stays in L1 while the rows pass.
//
// use_bf16_scores() is true where the CPU has AVX512-BF16 (every x86-64 CPU
// with AMX-BF16 has it too); DANET_EXT_CPU_BF16_SCORES=0 forces the float32
// GEMM, so the tests run both paths on such a machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

// The AVX512-BF16 intrinsics and __builtin_cpu_supports("avx512bf16") need GCC 10
// or Clang 11; older compilers build the extension without this kernel.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 11) || \
                            (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define DANET_BF16_SCORES_X86 1
#define DANET_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bf16")))
#endif

namespace danet {
namespace cpu {

constexpr int64_t kScorePanel = 16;  // keys per packed panel (one zmm of float32)

// A packed pair of bfloat16 values. may_alias: bf16_gram.h reads bfloat16 rows in place as pairs.
#if defined(__GNUC__)
typedef uint32_t __attribute__((__may_alias__)) bf16_pair_t;
#else
typedef uint32_t bf16_pair_t;
#endif

// Whether this build contains the kernel (x86-64, a recent enough compiler).
constexpr bool bf16_score_kernel_built() {
#ifdef DANET_BF16_SCORES_X86
  return true;
#else
  return false;
#endif
}

inline bool cpu_has_avx512_bf16() {
#ifdef DANET_BF16_SCORES_X86
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

// Read on every call (cheap next to a kernel), so tests can switch paths.
inline bool use_bf16_scores() {
  const char* force = std::getenv("DANET_EXT_CPU_BF16_SCORES");
  if (force != nullptr && std::strcmp(force, "0") == 0) return false;
  return cpu_has_avx512_bf16();
}

inline int64_t score_pairs(int64_t Cq) { return (Cq + 1) / 2; }
inline int64_t score_panels(int64_t N) { return (N + kScorePanel - 1) / kScorePanel; }

inline uint32_t bf16_pair(const at::BFloat16* rows, int64_t c, int64_t Cq, int64_t N, int64_t j) {
  const uint32_t lo = rows[c * N + j].x;
  const uint32_t hi = c + 1 < Cq ? rows[(c + 1) * N + j].x : 0u;
  return lo | (hi << 16);
}

// Q (B x Cq x N, contiguous) -> query pairs, B x N x P.
inline void pack_query_pairs(const at::BFloat16* q, int64_t B, int64_t Cq, int64_t N, uint32_t* out) {
  const int64_t P = score_pairs(Cq);
  at::parallel_for(0, B * N, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t b = e / N, i = e % N;
      for (int64_t p = 0; p < P; ++p) out[e * P + p] = bf16_pair(q + b * Cq * N, 2 * p, Cq, N, i);
    }
  });
}

// K (B x Cq x N, contiguous) -> key panels, B x ceil(N/16) x P x 16.
inline void pack_key_panels(const at::BFloat16* k, int64_t B, int64_t Cq, int64_t N, uint32_t* out) {
  const int64_t P = score_pairs(Cq), panels = score_panels(N);
  at::parallel_for(0, B * panels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t b = e / panels, jp = e % panels;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t l = 0; l < kScorePanel; ++l) {
          const int64_t j = jp * kScorePanel + l;
          out[(e * P + p) * kScorePanel + l] = j < N ? bf16_pair(k + b * Cq * N, 2 * p, Cq, N, j) : 0u;
        }
    }
  });
}

#ifdef DANET_BF16_SCORES_X86
// S[r][16 n + l] (+)= sum over `depth` pairs p of row pair qp[r * q_stride + p] times
// panel n's pair kp[n * panel_stride + p * 16 + l], for R rows and NP panels; the
// last panel stores `last` columns. With accumulate, S's current values are added to.
template <int R, int NP>
DANET_TARGET_AVX512BF16 inline void score_micro_tile(const bf16_pair_t* qp, int64_t q_stride, const uint32_t* kp,
                                                     int64_t panel_stride, int64_t depth, float* s, int64_t lds,
                                                     int last, bool accumulate) {
  const __mmask16 tail = static_cast<__mmask16>((1u << last) - 1u);
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < NP; ++n)
      acc[r][n] = !accumulate ? _mm512_setzero_ps()
                  : n + 1 < NP || last == kScorePanel ? _mm512_loadu_ps(s + r * lds + n * kScorePanel)
                                                      : _mm512_maskz_loadu_ps(tail, s + r * lds + n * kScorePanel);
  for (int64_t p = 0; p < depth; ++p) {
    __m512i keys[NP];
    for (int n = 0; n < NP; ++n) keys[n] = _mm512_loadu_si512(kp + n * panel_stride + p * kScorePanel);
    for (int r = 0; r < R; ++r) {
      const __m512i query = _mm512_set1_epi32(static_cast<int>(qp[r * q_stride + p]));
      for (int n = 0; n < NP; ++n)
        acc[r][n] = _mm512_dpbf16_ps(acc[r][n], reinterpret_cast<__m512bh>(query), reinterpret_cast<__m512bh>(keys[n]));
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int n = 0; n + 1 < NP; ++n) _mm512_storeu_ps(s + r * lds + n * kScorePanel, acc[r][n]);
    if (last == kScorePanel) _mm512_storeu_ps(s + r * lds + (NP - 1) * kScorePanel, acc[r][NP - 1]);
    else _mm512_mask_storeu_ps(s + r * lds + (NP - 1) * kScorePanel, tail, acc[r][NP - 1]);
  }
}

// One group of up to four panels (64 columns) against rows [0, rows): the group's
// panels stay in L1 while the rows pass.
template <int NP>
DANET_TARGET_AVX512BF16 inline void score_column_group(const bf16_pair_t* qp, int64_t q_stride, const uint32_t* kp,
                                                       int64_t panel_stride, int64_t depth, float* s, int64_t lds,
                                                       int64_t rows, int last, bool accumulate) {
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4)
    score_micro_tile<4, NP>(qp + i * q_stride, q_stride, kp, panel_stride, depth, s + i * lds, lds, last, accumulate);
  for (; i < rows; ++i)
    score_micro_tile<1, NP>(qp + i * q_stride, q_stride, kp, panel_stride, depth, s + i * lds, lds, last, accumulate);
}

// Columns [0, cols) of S (rows x cols) from the panels starting at kp (16 columns each).
DANET_TARGET_AVX512BF16 inline void score_block(const bf16_pair_t* qp, int64_t q_stride, const uint32_t* kp,
                                                int64_t panel_stride, int64_t depth, float* s, int64_t lds,
                                                int64_t rows, int64_t cols, bool accumulate) {
  const int64_t group = 4 * kScorePanel;
  for (int64_t j = 0; j < cols; j += group) {
    const uint32_t* kpg = kp + (j / kScorePanel) * panel_stride;
    const int64_t n = std::min(group, cols - j);
    const int np = static_cast<int>((n + kScorePanel - 1) / kScorePanel);
    const int last = static_cast<int>(n - (np - 1) * kScorePanel);
    switch (np) {
      case 4: score_column_group<4>(qp, q_stride, kpg, panel_stride, depth, s + j, lds, rows, last, accumulate); break;
      case 3: score_column_group<3>(qp, q_stride, kpg, panel_stride, depth, s + j, lds, rows, last, accumulate); break;
      case 2: score_column_group<2>(qp, q_stride, kpg, panel_stride, depth, s + j, lds, rows, last, accumulate); break;
      default: score_column_group<1>(qp, q_stride, kpg, panel_stride, depth, s + j, lds, rows, last, accumulate); break;
    }
  }
}
#endif

// S (bq x bk, row stride lds) = Q[:, i0:i0+bq]^T K[:, j0:j0+bk] for one image,
// from its query pairs (N x P) and key panels; j0 must be a multiple of 16.
// Only called where use_bf16_scores() is true.
inline void bf16_score_tile(const uint32_t* qp, const uint32_t* kp, int64_t P, int64_t i0, int64_t bq, int64_t j0,
                            int64_t bk, float* s, int64_t lds) {
#ifdef DANET_BF16_SCORES_X86
  TORCH_CHECK(j0 % kScorePanel == 0, "bf16_score_tile: key offset ", j0, " is not a multiple of ", kScorePanel);
  score_block(qp + i0 * P, P, kp + (j0 / kScorePanel) * P * kScorePanel, P * kScorePanel, P, s, lds, bq, bk, false);
#else
  (void)qp; (void)kp; (void)P; (void)i0; (void)bq; (void)j0; (void)bk; (void)s; (void)lds;
  TORCH_CHECK(false, "bf16_score_tile: this build has no AVX512-BF16 score kernel");
#endif
}

}  // namespace cpu
}  // namespace danet
