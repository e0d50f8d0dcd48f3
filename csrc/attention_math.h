// Softmax arithmetic shared by the CPU and CUDA kernels.
//
// Everything here is a plain function of scalars, compiled for the host and
// (under nvcc) for the device, so the CPU kernels, which the CI runs, exercise
// exactly the update rules the CUDA kernels use.
#pragma once

#include <cmath>
#include <limits>

#if defined(__CUDACC__)
#define DANET_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DANET_HOST_DEVICE inline
#endif

namespace danet {

template <typename acc_t>
DANET_HOST_DEVICE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

DANET_HOST_DEVICE float exp_acc(float x) { return ::expf(x); }
DANET_HOST_DEVICE double exp_acc(double x) { return ::exp(x); }
DANET_HOST_DEVICE float log_acc(float x) { return ::logf(x); }
DANET_HOST_DEVICE double log_acc(double x) { return ::log(x); }

// Online (streaming) softmax over a row that arrives in tiles.
//
// The running state of a row is its maximum m and the sum l of exp(s - m) over
// the entries seen so far. When a tile with maximum `tile_max` arrives, the new
// maximum is max(m, tile_max); the old sum and the old output accumulator must
// be multiplied by exp(m_old - m_new) ("rescale"). An empty row has m = -inf,
// and its rescale factor is 0 (nothing to keep), never exp(-inf + inf) = NaN.
template <typename acc_t>
DANET_HOST_DEVICE acc_t online_max(acc_t m_old, acc_t tile_max) {
  return m_old > tile_max ? m_old : tile_max;
}

template <typename acc_t>
DANET_HOST_DEVICE acc_t online_rescale(acc_t m_old, acc_t m_new) {
  return m_old == neg_infinity<acc_t>() ? acc_t(0) : exp_acc(m_old - m_new);
}

// The value subtracted before exponentiating a tile: the running maximum, or 0
// while the row is all -inf, so that exp() sees -inf and yields 0, not NaN.
template <typename acc_t>
DANET_HOST_DEVICE acc_t exp_offset(acc_t m) {
  return m == neg_infinity<acc_t>() ? acc_t(0) : m;
}

// l_new = l_old * rescale + sum(exp(tile - m_new))
template <typename acc_t>
DANET_HOST_DEVICE acc_t online_sum(acc_t l_old, acc_t rescale, acc_t tile_sum) {
  return l_old * rescale + tile_sum;
}

// Kernels that keep the output accumulator normalised (divided by the running
// sum, so its weights add up to 1 and it stays within max |v|, as the
// reference's output does) scale each new tile's exp(s - m_new) by 1 / l_new
// and the old accumulator by this factor: exp(m_old - m_new) * l_old / l_new.
template <typename acc_t>
DANET_HOST_DEVICE acc_t normalised_rescale(acc_t rescale, acc_t l_old, acc_t l_new) {
  return l_new == acc_t(0) ? acc_t(0) : rescale * l_old / l_new;
}

// 1 / l_new for those kernels' new tile, or 0 while every score of the row so far
// is -inf (l_new = 0): its probabilities so far are 0 and must stay 0, where 0 * inf
// would make them NaN and spoil the rest of the row (a later finite score gives
// the reference a finite result).
template <typename acc_t>
DANET_HOST_DEVICE acc_t inverse_sum(acc_t l_new) {
  return l_new == acc_t(0) ? acc_t(0) : acc_t(1) / l_new;
}

// A finished row whose scores were all -inf (l = 0) has no softmax: the reference
// gives NaN there, and so do the kernels, which add this to each output.
template <typename acc_t>
DANET_HOST_DEVICE acc_t empty_row_output(acc_t l) {
  return l == acc_t(0) ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
}

// Each finished row saves two statistics for the backward pass: its maximum m
// and the inverse 1/l of its sum, from which every probability is recomputed
// as exp(s - m) / l without a second reduction. (A single log-sum-exp
// lse = m + log l would do too, but exp(s - lse) loses |lse| * eps of relative
// accuracy; with logits in the tens that is ~10 ulp in float32.)
template <typename acc_t>
DANET_HOST_DEVICE acc_t prob_from_stats(acc_t s, acc_t row_max, acc_t inv_row_sum) {
  return exp_acc(s - row_max) * inv_row_sum;
}

// Softmax backward for one entry: dS = P * (dP - D), where D is the row's
// sum over j of P_j dP_j, which equals sum over channels of dO * O.
template <typename acc_t>
DANET_HOST_DEVICE acc_t softmax_grad(acc_t p, acc_t dp, acc_t row_dot) {
  return p * (dp - row_dot);
}

}  // namespace danet
