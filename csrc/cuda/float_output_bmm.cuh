// float_output_bmm(a, b): the batched product a @ b as float32, accumulated in
// float32, for float32, float16 and bfloat16 inputs. The one piece of the
// channel attention sequence (channel_attention_sequence.cuh) that differs
// between the device build and the CUDA emulation (tests/cuda_emulation):
//   device     cuBLAS through ATen: the bmm.dtype overload for float16/bfloat16
//              (16-bit inputs, float32 output and accumulation); plain float32
//              bmm for float32, which then follows
//              torch.backends.cuda.matmul.allow_tf32, as the official code's does;
//   emulation  CPU tensors: both inputs widened to float32 first. A product of
//              two float16 (or bfloat16) values is exact in float32, so this is
//              the device's result up to the order of the sums.
#pragma once

#include <ATen/ATen.h>

namespace danet {
namespace cuda {

// a (B, M, K), b (B, K, N), same dtype (as cuBLAS requires) -> (B, M, N) float32, contiguous.
inline at::Tensor float_output_bmm(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "danet_ext: float_output_bmm: `a` is ", a.scalar_type(),
              " but `b` is ", b.scalar_type(), "; both factors must have the same dtype");
#if defined(DANET_CUDA_EMULATION)
  return at::bmm(a.to(at::kFloat), b.to(at::kFloat));
#else
  if (a.scalar_type() == at::kFloat) return at::bmm(a, b);
  return at::bmm(a, b, at::kFloat);
#endif
}

}  // namespace cuda
}  // namespace danet
