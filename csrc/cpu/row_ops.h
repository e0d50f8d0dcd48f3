// Row-wise loops of the CPU softmax kernels, written so that the compiler
// vectorises them (the build passes -O3 and, on x86-64, -mavx2 -mfma).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DANET_ROW_OPS_AVX2 1
#endif

namespace danet {
namespace cpu {

// exp(x) for float in a branch-free form the compiler vectorises: range
// reduction x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for exp(r) and
// 2^n built in the exponent bits. Relative error about 2 ulp; exp(x) = 0 below
// -87.3 (where the true value is under FLT_MIN) and NaN in, NaN out.
inline float exp_vectorizable(float x) {
  const float hi = 88.3762626647949f;
  const float lo = -87.3365478515625f;  // ln(FLT_MIN)
  const bool underflow = x < lo;
  float xc = x > hi ? hi : x;
  xc = xc < lo ? lo : xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: no libm call in the loop.
  const float shifter = 12582912.0f;
  const float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float result = p * scale;
  return underflow ? 0.0f : result;
}

inline double exp_vectorizable(double x) { return std::exp(x); }

// The reductions below keep kLanes independent partial results, combined at
// the end: the fixed-width inner loops become vector instructions (SLP
// vectorisation) without -ffast-math, and the order of the additions is
// fixed, so results do not depend on the compiler's choices.
constexpr int64_t kLanes = 8;

template <typename scalar_t>
inline scalar_t row_max(const scalar_t* row, int64_t n) {
  scalar_t lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = -std::numeric_limits<scalar_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = row[j + l] > lanes[l] ? row[j + l] : lanes[l];
  for (; j < n; ++j) lanes[0] = row[j] > lanes[0] ? row[j] : lanes[0];
  scalar_t m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

template <typename scalar_t>
inline scalar_t row_min(const scalar_t* row, int64_t n) {
  scalar_t lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = std::numeric_limits<scalar_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = row[j + l] < lanes[l] ? row[j + l] : lanes[l];
  for (; j < n; ++j) lanes[0] = row[j] < lanes[0] ? row[j] : lanes[0];
  scalar_t m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lanes[l] < m ? lanes[l] : m;
  return m;
}

template <typename scalar_t>
inline scalar_t sum_lanes(const scalar_t* lanes) {
  scalar_t s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// row[j] = exp(sign * row[j] - offset); returns the sum of the new row.
template <typename scalar_t>
inline scalar_t exp_row_inplace(scalar_t* row, int64_t n, scalar_t sign,
                                scalar_t offset) {
  scalar_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const scalar_t e = exp_vectorizable(sign * row[j + l] - offset);
      row[j + l] = e;
      lanes[l] += e;
    }
  }
  for (; j < n; ++j) {
    const scalar_t e = exp_vectorizable(sign * row[j] - offset);
    row[j] = e;
    lanes[0] += e;
  }
  return sum_lanes(lanes);
}

// sum_j a[j] * b[j]
template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  scalar_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  for (; j < n; ++j) lanes[0] += a[j] * b[j];
  return sum_lanes(lanes);
}

// Returns sum_j |row[j]| and raises *max_abs to max_j |row[j]| (NaN entries leave it).
template <typename scalar_t>
inline scalar_t abs_sum_max(const scalar_t* row, int64_t n, scalar_t* max_abs) {
  scalar_t sums[kLanes] = {}, maxes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const scalar_t a = std::abs(row[j + l]);
      sums[l] += a;
      maxes[l] = a > maxes[l] ? a : maxes[l];
    }
  for (; j < n; ++j) {
    const scalar_t a = std::abs(row[j]);
    sums[0] += a;
    maxes[0] = a > maxes[0] ? a : maxes[0];
  }
  for (int64_t l = 0; l < kLanes; ++l) *max_abs = maxes[l] > *max_abs ? maxes[l] : *max_abs;
  return sum_lanes(sums);
}

// sums[j] += |row[j]| and maxes[j] = max(maxes[j], |row[j]|), j < n: column
// statistics of a matrix fed one row at a time.
template <typename scalar_t>
inline void add_abs_columns(const scalar_t* row, int64_t n, scalar_t* sums, scalar_t* maxes) {
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t a = std::abs(row[j]);
    sums[j] += a;
    maxes[j] = a > maxes[j] ? a : maxes[j];
  }
}

// row[j] = row[j] * (other[j] - shift)
template <typename scalar_t>
inline void mul_shifted_inplace(scalar_t* row, const scalar_t* other, int64_t n,
                                scalar_t shift) {
  for (int64_t j = 0; j < n; ++j) row[j] = row[j] * (other[j] - shift);
}

template <typename scalar_t>
inline void scale_row(scalar_t* row, int64_t n, scalar_t s) {
  for (int64_t j = 0; j < n; ++j) row[j] *= s;
}

#if DANET_ROW_OPS_AVX2
// AVX2 + FMA versions of the float loops: the same arithmetic as
// exp_vectorizable, eight lanes at a time (GCC does not if-convert the clamps
// of the scalar version reliably, and an exp loop left scalar costs as much as
// the score GEMM).
inline __m256 exp_avx2(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 lo = _mm256_set1_ps(-87.3365478515625f);
  const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_blendv_ps(x, hi, _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  xc = _mm256_blendv_ps(xc, lo, underflow);
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(
      _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), shifter), shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(underflow, result);
}

inline float hsum_avx2(__m256 v) {
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, v);
  return sum_lanes(lanes);
}

template <>
inline float exp_row_inplace<float>(float* row, int64_t n, float sign, float offset) {
  const __m256 vsign = _mm256_set1_ps(sign), voff = _mm256_set1_ps(offset);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const __m256 e = exp_avx2(_mm256_fmsub_ps(vsign, _mm256_loadu_ps(row + j), voff));
    _mm256_storeu_ps(row + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum_avx2(acc);
  for (; j < n; ++j) {
    const float e = exp_vectorizable(sign * row[j] - offset);
    row[j] = e;
    sum += e;
  }
  return sum;
}

template <>
inline float row_max<float>(const float* row, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) m = _mm256_max_ps(_mm256_loadu_ps(row + j), m);
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, m);
  for (; j < n; ++j) lanes[0] = row[j] > lanes[0] ? row[j] : lanes[0];
  float r = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) r = lanes[l] > r ? lanes[l] : r;
  return r;
}
#endif  // DANET_ROW_OPS_AVX2

}  // namespace cpu
}  // namespace danet
