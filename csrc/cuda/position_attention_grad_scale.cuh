// The per-image scale of dS for the float16 tensor-core backward. One source
// for the device build (position_attention_tensor_cores.cu) and the CUDA
// emulation (tests/cuda_emulation).
//
// grad_qk_kernel_tc rounds dS = P (dP - D) to the operand type for its two
// products (dK = dS^T Q^T, dQ = dS K^T). Its entries are near P |dP|, P about
// 1/N: at |dO| ~ 1e-4 and N = 1024 they fall below float16's smallest normal
// (6.1e-5) and lose their digits. The kernel multiplies dS by s before the
// rounding and its float32 dQ and dK by 1/s after the products. s is a power
// of two, so both steps are exact; it is chosen per image from a bound that
// dS cannot exceed, so that s dS stays within float16's range:
//   |dP_ij| = |dO_i . v_j| <= ||dO_i|| ||v_j||   (Cauchy-Schwarz)
//   |D_i| = |sum_j P_ij dP_ij| <= max_j |dP_ij|    (P_i sums to 1)
//   |dS_ij| <= P_ij (|dP_ij| + |D_i|) <= 2 max_i ||dO_i|| max_j ||v_j|| =: bound
// s = 2^floor(log2(kGradScoresTarget / bound)), so |s dS| <= 16384, a quarter
// of float16's largest value (headroom for the rounding of the norms and of
// D). bfloat16 and TF32 have float32's range and run with s = 1.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace danet {
namespace cuda {
namespace {

constexpr double kGradScoresTarget = 16384.0;
// |log2 s| at most 100: 1/s stays a normal float32 (2^-126 is the smallest).
constexpr double kGradScoresMaxExponent = 100.0;

// grad_out, value: (B, C, H, W) float16, validated by the caller, with H * W
// non-zero. Returns s, (B,) float32 on their device. An all-zero dO or V gives
// 2^100 (dS is zero then); an image with an infinite or NaN entry in dO or V
// gets 1, so that its gradients are what the unscaled kernel gives (non-finite
// only where the non-finite entry reaches), not all zero or all NaN.
inline at::Tensor float16_grad_scores_scale(const at::Tensor& grad_out, const at::Tensor& value) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto max_column_norm = [](const at::Tensor& t) {  // max over positions of the norm over channels
    const at::Tensor flat = t.reshape({t.size(0), t.size(1), t.size(2) * t.size(3)});  // C may be 0
    return at::linalg_vector_norm(flat, 2, at::IntArrayRef{1}, /*keepdim=*/false, at::kFloat).amax(1);
  };
  const at::Tensor bound = max_column_norm(grad_out).mul_(max_column_norm(value)).mul_(2.0);
  const at::Tensor exponent =
      at::floor(at::log2(at::reciprocal(bound).mul_(kGradScoresTarget))).clamp_(-kGradScoresMaxExponent,
                                                                                 kGradScoresMaxExponent);
  return at::exp2(at::where(at::isfinite(bound), exponent, at::zeros_like(exponent))).contiguous();
}

}  // namespace
}  // namespace cuda
}  // namespace danet
