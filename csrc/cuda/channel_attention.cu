// Channel attention (CAM) on CUDA: the ATen launchers and their registration
// for the CUDA dispatch key. The kernels are in channel_attention_kernels.cuh.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "channel_attention_kernels.cuh"
#include "common.cuh"

namespace danet {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> channel_attention_forward_cuda(const at::Tensor& x_in) {
  check_channel_attention_inputs(x_in);
  check_is_cuda(x_in, "x");
  check_cuda_dtype(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor attn = at::empty({B, C, C}, x.options().dtype(at::kFloat));
  if (B == 0 || C == 0) return {out, attn};
  auto stream = c10::cuda::getCurrentCUDAStream();
  DANET_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_forward_cuda", [&] {
    channel_attention_forward_launch<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                               attn.data_ptr<float>(), B, C, N, stream);
  });
  return {out, attn};
}

at::Tensor channel_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x_in,
                                           const at::Tensor& attention) {
  check_channel_attention_backward_inputs(grad_out, x_in, attention);
  check_is_cuda(x_in, "x");
  check_cuda_dtype(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t B = x_in.size(0), C = x_in.size(1), N = x_in.size(2) * x_in.size(3);
  at::Tensor x = x_in.contiguous();
  at::Tensor go = grad_out.contiguous();
  at::Tensor attn = attention.to(at::kFloat).contiguous();
  at::Tensor dx = at::zeros(x.sizes(), x.options().dtype(at::kFloat));
  if (B == 0 || C == 0 || N == 0) return dx.to(x.scalar_type());
  at::Tensor grad_e = at::empty({B, C, C}, attn.options());
  at::Tensor grad_sym = at::empty({B, C, C}, attn.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  DANET_DISPATCH_CUDA_TYPES(x.scalar_type(), "channel_attention_backward_cuda", [&] {
    channel_attention_backward_launch<scalar_t>(go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                                attn.data_ptr<float>(), grad_e.data_ptr<float>(),
                                                grad_sym.data_ptr<float>(), dx.data_ptr<float>(), B, C, N,
                                                stream);
  });
  return dx.to(x.scalar_type());
}

}  // namespace
}  // namespace cuda
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CUDA, m) {
  m.impl("channel_attention_forward", &danet::cuda::channel_attention_forward_cuda);
  m.impl("channel_attention_backward", &danet::cuda::channel_attention_backward_cuda);
}
