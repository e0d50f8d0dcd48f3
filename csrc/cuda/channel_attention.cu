// Channel attention (CAM) on CUDA: the checks and registration for the CUDA
// dispatch key. The computation (products on cuBLAS, softmax kernels) is in
// channel_attention_sequence.cuh, shared with the CUDA emulation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "channel_attention_sequence.cuh"
#include "common.cuh"

namespace danet {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_attention_forward_cuda(const at::Tensor& x) {
  check_channel_attention_inputs(x);
  check_is_cuda(x, "x");
  check_cuda_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_attention_forward(x, c10::cuda::getCurrentCUDAStream());
}

at::Tensor channel_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& attention) {
  check_channel_attention_backward_inputs(grad_out, x, attention);
  check_is_cuda(x, "x");
  check_cuda_dtype(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_attention_backward(grad_out, x, attention, c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace cuda
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CUDA, m) {
  m.impl("channel_attention_forward", &danet::cuda::channel_attention_forward_cuda);
  m.impl("channel_attention_backward", &danet::cuda::channel_attention_backward_cuda);
}
