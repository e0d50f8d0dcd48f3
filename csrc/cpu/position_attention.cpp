// Position attention (PAM) on the CPU: forward and backward.
//
// out[b, :, i] = sum_j softmax_j(q_i . k_j) v_j   (no 1/sqrt(d) scaling)
//
// Tensors are viewed as (B, C, N), N = H*W, row-major. The N x N score matrix
// is never held: the forward walks key blocks with an online softmax (state in
// attention_math.h) and keeps a normalised (C x BLOCK_Q) accumulator per query block; the
// backward recomputes each score tile from the saved log-sum-exp. Every tile
// product is a GEMM (blas.h); exp and the row reductions are vectorised loops
// (row_ops.h). bfloat16 and float16 inputs are computed in float32, except on
// CPUs with hardware for that dtype (AVX512-BF16/AMX-BF16, AVX512-FP16/AMX-FP16),
// where O = V P^T (forward) and the four backward products after the score
// recomputation run in it (reduced_precision_gemm.h).
#include <algorithm>
#include <cmath>
#include <map>
#include <type_traits>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../attention_math.h"
#include "../checks.h"
#include "bf16_scores.h"
#include "blas.h"
#include "reduced_precision_gemm.h"
#include "row_ops.h"

namespace danet {
namespace cpu {
namespace {

// Tile sizes: a query block of 128 and a key block of 256 keep the score tile
// (128 KiB in float32) and the accumulator (C x 128) in the L2 cache for the
// usual C = 512, and give the GEMMs enough depth to run near peak.
constexpr int64_t kBlockQ = 128;
constexpr int64_t kBlockK = 256;
// The backward accumulates dK and dV for one key block over all query blocks;
// wider key blocks mean fewer passes over dO (measured: 128 x 512 is ~3 %
// faster than 128 x 256 at 64x64, C = 512).
constexpr int64_t kBwdBlockQ = 128;
constexpr int64_t kBwdBlockK = 512;
// 16-bit backward: P and dS of this many query blocks are stacked for the dV and dK products
// (two 16-bit buffers of kStack * kBwdBlockQ x kBwdBlockK, 1 MiB per thread together).
constexpr int64_t kStack = 4;

// The widest block, halving from `widest` down to `narrowest`, whose tasks
// (batches x blocks) split over the threads leave them at most ~10 % idle:
// e.g. N = 2304 on 2 threads, five key blocks of 512 would idle one thread for
// a fifth of the time, eighteen of 128 split evenly.
int64_t balanced_block(int64_t n, int64_t batches, int64_t widest, int64_t narrowest,
                       int64_t threads) {
  int64_t block = widest;
  while (block > narrowest) {
    const int64_t tasks = batches * ((n + block - 1) / block);
    const int64_t rounds = (tasks + threads - 1) / threads;
    if (rounds * block * threads * 10 <= std::max<int64_t>(batches * n, 1) * 11) break;
    block /= 2;
  }
  return block;
}

// Where the 16-bit kernels' float32 score tiles come from: bfloat16 pairs packed
// for the AVX512-BF16 kernel (bf16_scores.h), or float32 copies of Q and K
// through the float32 GEMM. Either way the products are exact and the sums float32.
struct ScoreSource {
  const float* q = nullptr;  // float32 copies, B x Cq x N
  const float* k = nullptr;
  const uint32_t* qp = nullptr;  // packed query pairs and key panels
  const uint32_t* kp = nullptr;
  int64_t Cq = 0, N = 0;

  // S (bq x bk, row stride lds) = Q[:, i0:i0+bq]^T K[:, j0:j0+bk] of image b
  void tile(int64_t b, int64_t i0, int64_t bq, int64_t j0, int64_t bk, float* s, int64_t lds) const {
    if (qp != nullptr) {
      const int64_t P = score_pairs(Cq);
      bf16_score_tile(qp + b * N * P, kp + b * score_panels(N) * P * kScorePanel, P, i0, bq, j0, bk, s, lds);
    } else {
      gemm<float>(true, false, bq, bk, Cq, 1, q + b * Cq * N + i0, N, k + b * Cq * N + j0, N, 0, s, lds);
    }
  }
};

// The buffers behind a ScoreSource for float16/bfloat16 query and key.
struct ScoreOperands {
  at::Tensor q, k;
  ScoreSource source;
};

ScoreOperands score_operands(const at::Tensor& query, const at::Tensor& key) {
  ScoreOperands ops;
  const int64_t B = query.size(0), Cq = query.size(1), N = query.size(2) * query.size(3);
  ops.source.Cq = Cq;
  ops.source.N = N;
  if (query.scalar_type() == at::kBFloat16 && use_bf16_scores()) {
    const int64_t P = score_pairs(Cq);
    const at::Tensor q = query.contiguous(), k = key.contiguous();
    const auto opts = query.options().dtype(at::kInt);
    ops.q = at::empty({B, N, P}, opts);
    ops.k = at::empty({B, score_panels(N), P, kScorePanel}, opts);
    pack_query_pairs(q.data_ptr<at::BFloat16>(), B, Cq, N, reinterpret_cast<uint32_t*>(ops.q.data_ptr<int32_t>()));
    pack_key_panels(k.data_ptr<at::BFloat16>(), B, Cq, N, reinterpret_cast<uint32_t*>(ops.k.data_ptr<int32_t>()));
    ops.source.qp = reinterpret_cast<const uint32_t*>(ops.q.data_ptr<int32_t>());
    ops.source.kp = reinterpret_cast<const uint32_t*>(ops.k.data_ptr<int32_t>());
  } else {
    ops.q = query.to(at::kFloat).contiguous();
    ops.k = key.to(at::kFloat).contiguous();
    ops.source.q = ops.q.data_ptr<float>();
    ops.source.k = ops.k.data_ptr<float>();
  }
  return ops;
}

// One query row's step of the online softmax over a tile of its scores: the
// row becomes its probabilities normalised by the running sum so far, the row's
// maximum m and sum l are updated, and the factor the accumulator must be
// multiplied by is returned. The accumulator holds the normalised output so far
// (weights summing to 1), so it never exceeds max |v|: a value that fits in the
// dtype, as the reference's, cannot overflow in the sum. The _unscaled form leaves
// out the last pass: the row stays exp(s - m_new) and *normaliser gets 1 / l_new,
// for a caller that multiplies it in while it reads the row anyway.
template <typename scalar_t>
scalar_t softmax_tile_row_unscaled(scalar_t* row, int64_t n, scalar_t& m, scalar_t& l, scalar_t* normaliser) {
  const scalar_t m_new = online_max(m, row_max(row, n));
  const scalar_t alpha = online_rescale(m, m_new);
  const scalar_t tile_sum = exp_row_inplace(row, n, scalar_t(1), exp_offset(m_new));
  const scalar_t l_new = online_sum(l, alpha, tile_sum);
  const scalar_t rescale = normalised_rescale(alpha, l, l_new);
  *normaliser = inverse_sum(l_new);
  l = l_new;
  m = m_new;
  return rescale;
}

// Queries whose scores were all -inf get NaN outputs, as in the reference (their
// accumulators hold 0). out: the output at the block's first query, row stride N.
template <typename acc_t, typename out_t>
void mark_empty_rows(const acc_t* row_l, int64_t bq, int64_t C, int64_t N, out_t* out) {
  for (int64_t i = 0; i < bq; ++i) {
    if (row_l[i] != acc_t(0)) continue;
    for (int64_t c = 0; c < C; ++c) out[c * N + i] = static_cast<out_t>(empty_row_output(row_l[i]));
  }
}

template <typename scalar_t>
scalar_t softmax_tile_row(scalar_t* row, int64_t n, scalar_t& m, scalar_t& l) {
  scalar_t normaliser;
  const scalar_t rescale = softmax_tile_row_unscaled(row, n, m, l, &normaliser);
  scale_row(row, n, normaliser);
  return rescale;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v,
                    scalar_t* out, scalar_t* stats, int64_t B, int64_t Cq,
                    int64_t C, int64_t N) {
  const int64_t block_q = balanced_block(N, B, kBlockQ, 32, at::get_num_threads());
  const int64_t q_blocks = (N + block_q - 1) / block_q;
  // Small maps take all keys in one tile: fewer, larger products.
  const int64_t block_k = N <= 4 * kBlockK ? N : kBlockK;
  at::parallel_for(0, B * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scores(block_q * block_k);
    std::vector<scalar_t> acc(C * block_q);
    std::vector<scalar_t> row_m(block_q), row_l(block_q), rescale(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / q_blocks;
      const int64_t i0 = (task % q_blocks) * block_q;
      const int64_t bq = std::min(block_q, N - i0);
      const scalar_t* qb = q + b * Cq * N;
      const scalar_t* kb = k + b * Cq * N;
      const scalar_t* vb = v + b * C * N;
      std::fill(row_m.begin(), row_m.end(), neg_infinity<scalar_t>());
      std::fill(row_l.begin(), row_l.end(), scalar_t(0));
      for (int64_t j0 = 0; j0 < N; j0 += block_k) {
        const int64_t bk = std::min(block_k, N - j0);
        // S (bq x bk) = Q[:, i0:i0+bq]^T K[:, j0:j0+bk]
        gemm<scalar_t>(true, false, bq, bk, Cq, 1, qb + i0, N, kb + j0, N, 0,
                       scores.data(), block_k);
        for (int64_t i = 0; i < bq; ++i)
          rescale[i] = softmax_tile_row(scores.data() + i * block_k, bk, row_m[i], row_l[i]);
        if (j0 > 0) {
          for (int64_t c = 0; c < C; ++c) {
            scalar_t* arow = acc.data() + c * block_q;
            for (int64_t i = 0; i < bq; ++i) arow[i] *= rescale[i];
          }
        }
        // acc (C x bq) += V[:, j0:j0+bk] P^T
        gemm<scalar_t>(false, true, C, bq, bk, 1, vb + j0, N, scores.data(),
                       block_k, j0 > 0 ? 1 : 0, acc.data(), block_q);
      }
      scalar_t* ob = out + b * C * N + i0;
      for (int64_t c = 0; c < C; ++c)
        std::copy_n(acc.data() + c * block_q, bq, ob + c * N);
      mark_empty_rows(row_l.data(), bq, C, N, ob);
      for (int64_t i = 0; i < bq; ++i) {
        stats[(b * 2 + 0) * N + i0 + i] = row_m[i];
        stats[(b * 2 + 1) * N + i0 + i] = scalar_t(1) / row_l[i];
      }
    }
  });
}

// max |p[r * ld + c]| over rows r < rows, columns c < cols of a 16-bit matrix.
template <typename T16>
float max_abs16(const T16* p, int64_t rows, int64_t cols, int64_t ld) {
  float m = 0.f;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) m = std::max(m, std::abs(static_cast<float>(p[r * ld + c])));
  return m;
}

// dst[i * ld + j] = T16(src[i * ld + j] * scale), i < rows, j < cols: a tile of P
// or dS rounded for a 16-bit product (scale 1, exact, outside the float16 paths).
template <typename T16, typename scalar_t>
void round_rows16(const scalar_t* src, int64_t rows, int64_t cols, int64_t ld, T16* dst, float scale = 1.f) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * ld + j] = static_cast<T16>(static_cast<float>(src[i * ld + j]) * scale);
}

// The power of two s by which the float16 kernels multiply P or dS before
// rounding it for a product: s = 2^floor(log2(16384 / bound)), bound = the larger of
// max |dS| and a bound on the product's entries, so that both stay within a
// quarter of float16's largest value (65504) and far above its smallest normal
// (6.1e-5); |log2 s| <= 100, and 1 where the bound is 0 or not finite.
inline float float16_product_scale(float ds_max, float product_bound) {
  const double bound = std::max(ds_max, product_bound);
  if (!(bound > 0.0) || !std::isfinite(bound)) return 1.f;
  const double e = std::clamp(std::floor(std::log2(16384.0 / bound)), -100.0, 100.0);
  return std::ldexp(1.f, static_cast<int>(e));
}

// bfloat16 / float16 (T16) on CPUs with hardware for it (reduced_precision_gemm.h):
// O = V P^T, nine tenths of the work at C = 8 Cq, is a T16 product; S = Q^T K is kept
// in float32 (ScoreSource: exact products, float32 sums), because rounding the
// scores to bfloat16, as the reference does, costs ~0.1 to 0.3 of absolute
// error in its output at logits of a few tens. The online softmax runs in
// float32, P is rounded to T16 for the product (as the reference rounds
// its softmax), and O stays in float32 across key tiles. Up to 4096 keys (a
// 64 x 64 map) take one tile, so O is rounded once, as in the reference.
// float16 rounds P times a power of two per image (P averages 1/N, below
// float16's normal range from N = 16384), s = 2^floor(log2(16384 / max(max|v|, 1)))
// and at least 1 (1 where V holds inf), so that the product (at most max|v| s:
// each tile's row of P sums to at most 1) stays in range, and divides the
// product by s (exact, but for float16 subnormal outputs, which one tile
// rounds twice): at N = 65536 this took the forward's error from 4.7x to 2.2x
// that of rounding the true output to float16.
constexpr int64_t kBf16BlockK = 4096;

template <typename T16>
void forward_kernel_16(const ScoreSource& scores_of, const T16* v, T16* out, float* stats, int64_t B,
                       int64_t C, int64_t N) {
  const int64_t block_q = balanced_block(N, B, kBlockQ, 32, at::get_num_threads());
  const int64_t q_blocks = (N + block_q - 1) / block_q;
  const int64_t block_k = std::min(N, kBf16BlockK);
  const bool one_tile = block_k == N;
  std::vector<float> p_scale(B, 1.f);  // s per image (1 for bfloat16, whose range is float32's)
  if constexpr (std::is_same_v<T16, at::Half>) {
    std::vector<float> row_abs_max(B * C);  // max |v| per image and channel, in parallel
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_abs_max[r] = max_abs16(v + r * N, 1, N, N);
    });
    for (int64_t b = 0; b < B; ++b) {
      const float v_max = C > 0 ? danet::cpu::row_max(row_abs_max.data() + b * C, C) : 0.f;
      p_scale[b] = std::max(1.f, float16_product_scale(0.f, std::max(v_max, 1.f)));
    }
  }
  at::parallel_for(0, B * q_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T16> p16(block_q * block_k);
    std::vector<T16> o16(one_tile ? 0 : C * block_q);
    std::vector<float> scores(block_q * block_k), acc(one_tile ? 0 : C * block_q);
    std::vector<float> row_m(block_q), row_l(block_q), rescale(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / q_blocks;
      const int64_t i0 = (task % q_blocks) * block_q;
      const int64_t bq = std::min(block_q, N - i0);
      const T16* vb = v + b * C * N;
      T16* ob = out + b * C * N + i0;
      std::fill(row_m.begin(), row_m.end(), neg_infinity<float>());
      std::fill(row_l.begin(), row_l.end(), 0.f);
      for (int64_t j0 = 0; j0 < N; j0 += block_k) {
        const int64_t bk = std::min(block_k, N - j0);
        scores_of.tile(b, i0, bq, j0, bk, scores.data(), block_k);
        for (int64_t i = 0; i < bq; ++i) {
          float* row = scores.data() + i * block_k;
          float normaliser;
          rescale[i] = softmax_tile_row_unscaled(row, bk, row_m[i], row_l[i], &normaliser);
          normaliser *= p_scale[b];
          T16* prow = p16.data() + i * block_k;  // P = exp(s - m) / l (times s), rounded once to T16
          for (int64_t j = 0; j < bk; ++j) prow[j] = static_cast<T16>(row[j] * normaliser);
        }
        // O tile (C x bq) = V[:, j0:j0+bk] P^T, straight into the output when one tile holds every key
        mm16<T16>(false, true, C, bq, bk, vb + j0, N, p16.data(), block_k, one_tile ? ob : o16.data(),
                one_tile ? N : block_q);
        if (!one_tile) {
          const float unscale = 1.f / p_scale[b];
          for (int64_t c = 0; c < C; ++c) {
            float* arow = acc.data() + c * block_q;
            const T16* orow = o16.data() + c * block_q;
            for (int64_t i = 0; i < bq; ++i)
              arow[i] = (j0 > 0 ? arow[i] * rescale[i] : 0.f) + static_cast<float>(orow[i]) * unscale;
          }
        }
      }
      if (one_tile && p_scale[b] != 1.f) {  // O s was written to the output: divide it there
        const float unscale = 1.f / p_scale[b];
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < bq; ++i) ob[c * N + i] = static_cast<T16>(static_cast<float>(ob[c * N + i]) * unscale);
      }
      if (!one_tile) {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t i = 0; i < bq; ++i)
            ob[c * N + i] = static_cast<T16>(acc[c * block_q + i]);
      }
      mark_empty_rows(row_l.data(), bq, C, N, ob);
      for (int64_t i = 0; i < bq; ++i) {
        stats[(b * 2 + 0) * N + i0 + i] = row_m[i];
        stats[(b * 2 + 1) * N + i0 + i] = 1.f / row_l[i];
      }
    }
  });
}

// Backward (FlashAttention-2 order): D_i = sum_c dO[c,i] O[c,i]; then for each
// key block j, over all query blocks i:
//   P = exp(Q_i^T K_j - m_i) / l_i    dV_j += dO_i P
//   dP = dO_i^T V_j                   dS = P * (dP - D_i)
//   dK_j += Q_i dS                    dQ_i += K_j dS^T
// The (image, key block) pairs are the tasks, all in one parallel region, so
// that many cores stay busy on small maps and batches alike. Each contiguous
// chunk of tasks adds its dQ contributions into private (Cq x N) buffers, one
// per image it touches (a chunk spans at most a few images), summed at the end
// in chunk order, so that runs with the same thread count agree to the bit.
template <typename scalar_t, typename T16 = at::BFloat16>
void backward_kernel(const scalar_t* dout, const scalar_t* q, const scalar_t* k,
                     const scalar_t* v, const scalar_t* out, const scalar_t* stats,
                     scalar_t* dq, scalar_t* dk, scalar_t* dv, int64_t B,
                     int64_t Cq, int64_t C, int64_t N,
                     const T16* const* inputs16 = nullptr, const ScoreSource* scores16 = nullptr) {
  // With inputs16 = {dO, Q, K, V, O} in T16 (bfloat16 / float16 inputs on hardware
  // for it): the products dV += dO P, dP = dO^T V, dK += Q dS and dQ += K dS^T
  // run in T16 (reduced_precision_gemm.h), P and dS rounded to T16 as the
  // reference rounds its softmax and its gradient; the recomputed scores (from
  // scores16, which the 16-bit path always gives), the softmax and every sum
  // across tiles stay float32. dout, q, k, v and out are then not read (may be null).
  // P and dS of kStack consecutive query blocks are stacked, so that dV and dK
  // take one product of depth kStack * kBwdBlockQ: fewer float32 accumulations
  // of their (C x bk) tiles, each rounded once from a deeper product.
  // float16 (5 exponent bits) would lose dS's small entries, near P |dP| with P
  // about 1/N, and its products with Q and K, below its normal range (6.1e-5),
  // and could overflow them past 65504: each product's dS is multiplied by a
  // power of two (float16_product_scale) before it is rounded, and the float32
  // sums of the product divided by it (exact). dQ's comes from its query block's
  // dS; dK's from the stack's, kept in float32 until the stack is complete; P
  // for dV likewise (its entries, about 1/N, are subnormal from N = 16384).
  const bool lowp = inputs16 != nullptr;
  const bool float16_scaled = lowp && std::is_same_v<T16, at::Half>;
  TORCH_CHECK(lowp == (scores16 != nullptr) && (scores16 == nullptr || (std::is_same_v<scalar_t, float>)),
              "position_attention_backward: the 16-bit path takes its scores from a ScoreSource, in float32");
  const int64_t num_threads = at::get_num_threads();
  const int64_t block_k = balanced_block(N, B, kBwdBlockK, 64, num_threads);
  const int64_t k_blocks = (N + block_k - 1) / block_k;
  // D_i = sum_c dO[c,i] O[c,i] is accumulated in double: dS = P (dP - D)
  // cancels, so D's rounding would otherwise dominate the error of dQ and dK.
  std::vector<double> row_dot(B * N);
  auto sum_row_dots = [&](const auto* dO, const auto* O) {
    at::parallel_for(0, B * N, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end;) {  // one image's run of positions at a time, rows read along N
        const int64_t b = e / N, i_begin = e % N, i_end = std::min(N, i_begin + (end - e));
        double* dot = row_dot.data() + b * N;
        for (int64_t i = i_begin; i < i_end; ++i) dot[i] = 0;
        for (int64_t c = 0; c < C; ++c) {
          const auto* dorow = dO + (b * C + c) * N;
          const auto* orow = O + (b * C + c) * N;
          for (int64_t i = i_begin; i < i_end; ++i)
            dot[i] += static_cast<double>(dorow[i]) * static_cast<double>(orow[i]);
        }
        e += i_end - i_begin;
      }
    });
  };
  if (lowp) sum_row_dots(inputs16[0], inputs16[4]);  // dO and O in T16: no float32 copies needed
  else sum_row_dots(dout, out);
  // dQ partial sums: chunk start -> (first image, buffers of the images it touches)
  struct DqChunk {
    int64_t first_image;
    std::vector<scalar_t> sums;
  };
  std::map<int64_t, DqChunk> dq_chunks;
  std::mutex dq_chunks_mutex;
  at::parallel_for(0, B * k_blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t stacked = (float16_scaled ? kStack : 1) * kBwdBlockQ * block_k;
    std::vector<scalar_t> probs(stacked), dscores(stacked);
    std::vector<T16> p16(lowp ? kStack * kBwdBlockQ * block_k : 0), ds16(lowp ? kStack * kBwdBlockQ * block_k : 0),
        dp16(lowp ? kBwdBlockQ * block_k : 0), prod16(lowp ? std::max(C, Cq) * std::max(block_k, kBwdBlockQ) : 0),
        ds16_block(float16_scaled ? kBwdBlockQ * block_k : 0);
    // float16: column sums and maxima of |P| and |dS| over the current stack
    std::vector<float> p_col_sums(float16_scaled ? block_k : 0), p_col_max(p_col_sums.size()),
        ds_col_sums(p_col_sums.size()), ds_col_max(p_col_sums.size());
    const int64_t first_image = begin / k_blocks, images = (end - 1) / k_blocks - first_image + 1;
    std::vector<scalar_t> dq_sums(images * Cq * N, scalar_t(0));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / k_blocks, jb = task % k_blocks;
      const scalar_t* dob = dout != nullptr ? dout + b * C * N : nullptr;
      const scalar_t* qb = q != nullptr ? q + b * Cq * N : nullptr;
      const scalar_t* kb = k != nullptr ? k + b * Cq * N : nullptr;
      const scalar_t* vb = v != nullptr ? v + b * C * N : nullptr;
      const scalar_t* row_max = stats + (b * 2 + 0) * N;
      const scalar_t* inv_row_sum = stats + (b * 2 + 1) * N;
      const double* dot_b = row_dot.data() + b * N;
      scalar_t* dkb = dk + b * Cq * N;
      scalar_t* dvb = dv + b * C * N;
      scalar_t* dq_mine = dq_sums.data() + (b - first_image) * Cq * N;
      const T16* do16 = lowp ? inputs16[0] + b * C * N : nullptr;
      const T16* q16 = lowp ? inputs16[1] + b * Cq * N : nullptr;
      const T16* k16 = lowp ? inputs16[2] + b * Cq * N : nullptr;
      const T16* v16 = lowp ? inputs16[3] + b * C * N : nullptr;
      const int64_t j0 = jb * block_k;
      const int64_t bk = std::min(block_k, N - j0);
      const float k_max = float16_scaled ? max_abs16(k16 + j0, Cq, bk, N) : 0.f;  // over this key block
      for (int64_t i0 = 0; i0 < N; i0 += kBwdBlockQ) {
        const int64_t bq = std::min(kBwdBlockQ, N - i0);
        const scalar_t beta = i0 > 0 ? 1 : 0;  // first query block initialises dK_j, dV_j
        // the stacked query blocks i_stack .. i0 + bq (P and dS rows from row 0 of p16/ds16)
        const int64_t slot = (i0 / kBwdBlockQ) % kStack;
        const int64_t i_stack = i0 - slot * kBwdBlockQ;
        const bool flush = slot == kStack - 1 || i0 + bq == N;
        const int64_t depth = i0 + bq - i_stack;
        // this query block's P and dS rows: the stack's slot where float16 keeps them in float32
        scalar_t* const p_block = probs.data() + (float16_scaled ? slot * kBwdBlockQ * block_k : 0);
        scalar_t* const ds_block = dscores.data() + (float16_scaled ? slot * kBwdBlockQ * block_k : 0);
        if (float16_scaled && slot == 0) {
          for (auto* col : {&p_col_sums, &p_col_max, &ds_col_sums, &ds_col_max}) std::fill(col->begin(), col->end(), 0.f);
        }
        if (scores16 != nullptr) {
          if constexpr (std::is_same_v<scalar_t, float>) scores16->tile(b, i0, bq, j0, bk, p_block, block_k);
        } else {
          gemm<scalar_t>(true, false, bq, bk, Cq, 1, qb + i0, N, kb + j0, N, 0, p_block, block_k);
        }
        for (int64_t i = 0; i < bq; ++i) {
          scalar_t* row = p_block + i * block_k;
          exp_row_inplace(row, bk, scalar_t(1), row_max[i0 + i]);
          scale_row(row, bk, inv_row_sum[i0 + i]);
          if constexpr (std::is_same_v<scalar_t, float>)
            if (float16_scaled) add_abs_columns(row, bk, p_col_sums.data(), p_col_max.data());
        }
        // dst (rows x cols, row stride ld) = (keep ? dst : 0) + the 16-bit product in prod16 times mul
        auto add_product = [&](scalar_t* dst, int64_t ld, int64_t rows, int64_t cols, bool keep,
                               scalar_t mul = 1) {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t c = 0; c < cols; ++c)
              dst[r * ld + c] = (keep ? dst[r * ld + c] : scalar_t(0)) +
                                static_cast<scalar_t>(prod16[r * cols + c]) * mul;
        };
        // float16: dst (rows x bk) (+)= A (rows x depth, 16-bit, row stride N) times the
        // stacked float32 rows of `stack` rounded to float16 times s, the product divided by s.
        // Its entries are at most max|A| max_j sum_i |stack_ij|, which s keeps within range.
        auto scaled_stack_product = [&](const scalar_t* stack, const std::vector<float>& col_sums,
                                        const std::vector<float>& col_max, const T16* a, int64_t rows,
                                        scalar_t* dst, T16* rounded) {
          const float s = float16_product_scale(danet::cpu::row_max(col_max.data(), bk),
                                                max_abs16(a, rows, depth, N) *
                                                    danet::cpu::row_max(col_sums.data(), bk));
          round_rows16(stack, depth, bk, block_k, rounded, s);
          mm16<T16>(false, false, rows, bk, depth, a, N, rounded, block_k, prod16.data(), bk);
          add_product(dst, N, rows, bk, i_stack > 0, scalar_t(1.f / s));
        };
        if (lowp) {
          if (float16_scaled) {
            if (flush) scaled_stack_product(probs.data(), p_col_sums, p_col_max, do16 + i_stack, C, dvb + j0,
                                            p16.data());  // dV_j
          } else {
            round_rows16(p_block, bq, bk, block_k, p16.data() + slot * kBwdBlockQ * block_k);
            if (flush) {  // dV_j (+)= dO[:, i_stack:i0+bq] P_stacked
              mm16<T16>(false, false, C, bk, depth, do16 + i_stack, N, p16.data(), block_k, prod16.data(), bk);
              add_product(dvb + j0, N, C, bk, i_stack > 0);
            }
          }
          mm16<T16>(true, false, bq, bk, C, do16 + i0, N, v16 + j0, N, dp16.data(), block_k);
          for (int64_t i = 0; i < bq; ++i)
            for (int64_t j = 0; j < bk; ++j)
              ds_block[i * block_k + j] = static_cast<scalar_t>(dp16[i * block_k + j]);
        } else {
          gemm<scalar_t>(false, false, C, bk, bq, 1, dob + i0, N, p_block, block_k, beta, dvb + j0, N);
          gemm<scalar_t>(true, false, bq, bk, C, 1, dob + i0, N, vb + j0, N, 0, ds_block, block_k);
        }
        scalar_t ds_max = 0, ds_row_abs_max = 0;  // float16: over this query block's dS
        for (int64_t i = 0; i < bq; ++i) {
          scalar_t* ds = ds_block + i * block_k;
          const scalar_t* p = p_block + i * block_k;
          const scalar_t d = static_cast<scalar_t>(dot_b[i0 + i]);
          for (int64_t j = 0; j < bk; ++j) ds[j] = softmax_grad(p[j], ds[j], d);
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (float16_scaled) {
              ds_row_abs_max = std::max(ds_row_abs_max, abs_sum_max(ds, bk, &ds_max));
              add_abs_columns(ds, bk, ds_col_sums.data(), ds_col_max.data());
            }
          }
        }
        if (float16_scaled) {
          // dQ[:, i0:i0+bq] += K_j dS^T / s: |(K_j dS^T)[c, i]| <= max|K_j| sum_j |dS_ij|
          const float s = float16_product_scale(ds_max, k_max * ds_row_abs_max);
          round_rows16(ds_block, bq, bk, block_k, ds16_block.data(), s);
          mm16<T16>(false, true, Cq, bq, bk, k16 + j0, N, ds16_block.data(), block_k, prod16.data(), bq);
          add_product(dq_mine + i0, N, Cq, bq, true, scalar_t(1.f / s));
          if (flush) scaled_stack_product(dscores.data(), ds_col_sums, ds_col_max, q16 + i_stack, Cq, dkb + j0,
                                          ds16.data());  // dK_j
        } else if (lowp) {
          T16* ds16_rows = ds16.data() + slot * kBwdBlockQ * block_k;
          round_rows16(ds_block, bq, bk, block_k, ds16_rows);
          if (flush) {  // dK_j (+)= Q[:, i_stack:i0+bq] dS_stacked
            mm16<T16>(false, false, Cq, bk, depth, q16 + i_stack, N, ds16.data(), block_k, prod16.data(), bk);
            add_product(dkb + j0, N, Cq, bk, i_stack > 0);
          }
          mm16<T16>(false, true, Cq, bq, bk, k16 + j0, N, ds16_rows, block_k, prod16.data(), bq);
          add_product(dq_mine + i0, N, Cq, bq, true);
        } else {
          gemm<scalar_t>(false, false, Cq, bk, bq, 1, qb + i0, N, ds_block, block_k, beta, dkb + j0, N);
          gemm<scalar_t>(false, true, Cq, bq, bk, 1, kb + j0, N, ds_block, block_k, 1, dq_mine + i0, N);
        }
      }
    }
    std::lock_guard<std::mutex> lock(dq_chunks_mutex);
    dq_chunks.emplace(begin, DqChunk{first_image, std::move(dq_sums)});
  });
  // dQ[b] = the sum, in chunk order, of the buffers of the chunks that touched image b.
  std::vector<std::vector<const scalar_t*>> parts(B);
  for (const auto& kv : dq_chunks) {
    const DqChunk& chunk = kv.second;
    const int64_t images = static_cast<int64_t>(chunk.sums.size()) / std::max<int64_t>(Cq * N, 1);
    for (int64_t t = 0; t < images; ++t) parts[chunk.first_image + t].push_back(chunk.sums.data() + t * Cq * N);
  }
  at::parallel_for(0, B * Cq * N, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      const int64_t b = e / (Cq * N), rest = e % (Cq * N);
      scalar_t sum = 0;
      for (const scalar_t* p : parts[b]) sum += p[rest];
      dq[e] = sum;
    }
  });
}

// Half and bfloat16 are computed in float32: convert on the way in and out.
at::ScalarType compute_type(const at::Tensor& t) {
  return accumulate_type(t.scalar_type());
}

at::Tensor as_compute(const at::Tensor& t, at::ScalarType ct) {
  return t.to(ct).contiguous();
}

std::tuple<at::Tensor, at::Tensor> position_attention_forward_cpu(
    const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  check_position_attention_inputs(query, key, value);
  const auto ct = compute_type(value);
  const int64_t B = value.size(0), C = value.size(1), H = value.size(2),
                W = value.size(3), Cq = query.size(1), N = H * W;
  if (use_reduced_precision_gemm(value.scalar_type())) {  // bfloat16 / float16 products
    const ScoreOperands qk = score_operands(query, key);
    at::Tensor v = value.contiguous();
    at::Tensor out = at::empty({B, C, H, W}, v.options());
    at::Tensor stats = at::empty({B, 2, N}, v.options().dtype(at::kFloat));
    if (B * N > 0) {
      AT_DISPATCH_REDUCED_FLOATING_TYPES(v.scalar_type(), "position_attention_forward_cpu_16", [&] {
        forward_kernel_16<scalar_t>(qk.source, v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                    stats.data_ptr<float>(), B, C, N);
      });
    }
    return {out, stats};
  }
  at::Tensor q = as_compute(query, ct), k = as_compute(key, ct), v = as_compute(value, ct);
  at::Tensor out = at::empty({B, C, H, W}, v.options());
  at::Tensor stats = at::empty({B, 2, N}, v.options());
  if (B * N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "position_attention_forward_cpu", [&] {
      forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                               v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                               stats.data_ptr<scalar_t>(), B, Cq, C, N);
    });
  }
  return {out.to(value.scalar_type()), stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> position_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  check_position_attention_backward_inputs(grad_out, query, key, value, out, stats);
  const auto ct = compute_type(value);
  const int64_t B = value.size(0), C = value.size(1), Cq = query.size(1),
                N = value.size(2) * value.size(3);
  // bfloat16 / float16 products: dO, Q, K, V, O in that dtype, contiguous, and the
  // scores from score_operands (packed pairs for the AVX512-BF16 kernel, or float32
  // copies of Q and K), as in the forward; no other float32 copies
  const bool lowp = use_reduced_precision_gemm(value.scalar_type());
  std::vector<at::Tensor> keep16;
  ScoreOperands qk16;
  if (lowp) {
    for (const at::Tensor* t : {&grad_out, &query, &key, &value, &out}) keep16.push_back(t->contiguous());
    qk16 = score_operands(query, key);
  }
  const at::Tensor none;
  at::Tensor q = lowp ? none : as_compute(query, ct), k = lowp ? none : as_compute(key, ct);
  at::Tensor v = lowp ? none : as_compute(value, ct), go = lowp ? none : as_compute(grad_out, ct);
  at::Tensor o = lowp ? none : as_compute(out, ct), st = as_compute(stats, ct);
  // Every element is written by the kernel (the first query block of each key
  // block stores with beta = 0, or the first stacked product without adding)
  // except when N == 0, where there is nothing.
  const auto opts = value.options().dtype(ct);
  at::Tensor dq = at::empty(query.sizes(), opts);
  at::Tensor dk = at::empty(key.sizes(), opts);
  at::Tensor dv = at::empty(value.sizes(), opts);
  if (B * N > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "position_attention_backward_cpu", [&] {
      auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
      auto run = [&](auto tag) {
        using T16 = decltype(tag);
        std::vector<const T16*> ptr16;
        for (const at::Tensor& t : keep16) ptr16.push_back(t.data_ptr<T16>());
        backward_kernel<scalar_t, T16>(ptr(go), ptr(q), ptr(k), ptr(v), ptr(o), st.data_ptr<scalar_t>(),
                                       dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                                       B, Cq, C, N, lowp ? ptr16.data() : nullptr, lowp ? &qk16.source : nullptr);
      };
      if (value.scalar_type() == at::kHalf) run(at::Half{});
      else run(at::BFloat16{});
    });
  }
  const auto dt = value.scalar_type();
  return {dq.to(dt), dk.to(dt), dv.to(dt)};
}

}  // namespace
}  // namespace cpu
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CPU, m) {
  m.impl("position_attention_forward", &danet::cpu::position_attention_forward_cpu);
  m.impl("position_attention_backward", &danet::cpu::position_attention_backward_cpu);
}
