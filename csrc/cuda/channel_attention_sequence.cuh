// Channel attention (CAM) forward and backward on tensors: the products on
// cuBLAS (through ATen), the row softmax and its backward on the kernels of
// channel_attention_kernels.cuh. One source for the device build
// (channel_attention.cu) and the CUDA emulation (tests/cuda_emulation), which
// differ only in float_output_bmm.
//
// With X = x[b] as C x N:
//   forward   E = X X^T;  A = exp(rowmin(E) - E) / sum;  out = A X
//   backward  dA = dO X^T;  dE = -A * (dA - rowsum(dA * A));  dX = A^T dO + (dE + dE^T) X
// E, A, dA and dE are float32 whatever the input dtype: post-ReLU features
// make E reach thousands, far past what float16 or bfloat16 resolve. For
// float16/bfloat16 inputs, the C x C factors of the products with X or dO
// (A, dE + dE^T) are rounded to the input dtype, as FlashAttention rounds P
// before P V, so that cuBLAS multiplies 16-bit matrices; every product
// accumulates in float32. float32 inputs run float32 products, which follow
// torch.backends.cuda.matmul.allow_tf32 (off by default), as the official
// code's bmm does.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include "channel_attention_kernels.cuh"
#include "float_output_bmm.cuh"
#include "launch.cuh"

namespace danet {
namespace cuda {
namespace {

// x: (B, C, H, W) float32, float16 or bfloat16, validated by the caller. Returns
// out (B, C, H, W) in x's dtype and the attention A (B, C, C) float32.
inline std::tuple<at::Tensor, at::Tensor> channel_attention_forward(const at::Tensor& x_in, cudaStream_t stream) {
  // The op fixes its own precision: no autocast of the products inside it.
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  if (B == 0 || C == 0) {
    return {at::empty(x_in.sizes(), x_in.options()), at::empty({B, C, C}, x_in.options().dtype(at::kFloat))};
  }
  const at::Tensor x = x_in.contiguous().view({B, C, N});
  at::Tensor attn = float_output_bmm(x, x.transpose(1, 2)).contiguous();  // E
  negated_softmax_launch(attn.data_ptr<float>(), B, C, stream);           // E -> A, in place
  // A rounded to x's dtype (a no-op for float32); cuBLAS accumulates A X in
  // float32 and writes it in x's dtype. (Split-K partial sums may be added in
  // 16 bits where torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction
  // / allow_bf16_reduced_precision_reduction let cuBLAS, as for the official
  // code's bmm.)
  const at::Tensor out = at::bmm(attn.to(x.scalar_type()), x);
  return {out.view(x_in.sizes()), attn};
}

// grad_out, x: (B, C, H, W), one dtype; attention: the forward's A (B, C, C)
// float32. Returns dx in x's dtype.
inline at::Tensor channel_attention_backward(const at::Tensor& grad_out, const at::Tensor& x_in,
                                             const at::Tensor& attention, cudaStream_t stream) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  if (B == 0 || C == 0 || N == 0) return at::zeros(x_in.sizes(), x_in.options());
  const auto dtype = x_in.scalar_type();
  const at::Tensor x = x_in.contiguous().view({B, C, N});
  const at::Tensor go = grad_out.contiguous().view({B, C, N});
  const at::Tensor attn = attention.to(at::kFloat).contiguous();
  at::Tensor grad_e = float_output_bmm(go, x.transpose(1, 2)).contiguous();  // dA
  negated_softmax_backward_launch(grad_e.data_ptr<float>(), attn.data_ptr<float>(), B, C, stream);  // dA -> dE
  const at::Tensor grad_sym = grad_e + grad_e.transpose(1, 2);
  // Both C x C factors rounded to x's dtype as A is in the forward; the two
  // products summed in float32, rounded once.
  at::Tensor grad_x = float_output_bmm(attn.to(dtype).transpose(1, 2), go);
  grad_x.add_(float_output_bmm(grad_sym.to(dtype), x));
  return grad_x.to(dtype).view(x_in.sizes());
}

}  // namespace
}  // namespace cuda
}  // namespace danet
