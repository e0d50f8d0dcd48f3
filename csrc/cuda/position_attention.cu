// Position attention (PAM) on CUDA: the ATen launchers and their registration
// for the CUDA dispatch key. float16/bfloat16 run on tensor cores
// (position_attention_tensor_cores_kernels.cuh) where use_tensor_core_*()
// allows; the rest on CUDA cores (position_attention_kernels.cuh).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"
#include "position_attention_kernels.cuh"
#include "position_attention_tensor_cores.h"

namespace danet {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> position_attention_forward_cuda(const at::Tensor& query,
                                                                   const at::Tensor& key,
                                                                   const at::Tensor& value) {
  check_position_attention_inputs(query, key, value);
  check_is_cuda(query, "query");
  check_is_cuda(key, "key");
  check_is_cuda(value, "value");
  check_cuda_dtype(value, "value");
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), C = value.size(1), H = value.size(2), W = value.size(3);
  const int64_t Cq = query.size(1), N = H * W;
  TORCH_CHECK(B <= kMaxGridYZ, "danet_ext: batch size ", B, " exceeds ", kMaxGridYZ);
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor out = at::empty({B, C, H, W}, v.options());
  at::Tensor stats = at::empty({B, 2, N}, v.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {out, stats};
  if (use_tensor_core_forward(v, Cq)) {
    position_attention_forward_tensor_cores(q, k, v, out, stats);
    return {out, stats};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  DANET_DISPATCH_CUDA_TYPES(v.scalar_type(), "position_attention_forward_cuda", [&] {
    position_attention_forward_launch<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                                                v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                stats.data_ptr<float>(), B, Cq, C, N, stream);
  });
  return {out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> position_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& softmax_stats) {
  check_position_attention_backward_inputs(grad_out, query, key, value, out, softmax_stats);
  check_is_cuda(grad_out, "grad_out");
  check_is_cuda(value, "value");  // the others share its device (checked above)
  check_cuda_dtype(value, "value");
  // Both backwards add dQ up with float32 atomics, in an order that varies.
  at::globalContext().alertNotDeterministic(
      "danet_ext::position_attention_backward on CUDA (dQ is accumulated with float32 atomics); "
      "run it with backend=\"reference\" for a deterministic backward");
  const c10::cuda::CUDAGuard guard(value.device());
  const int64_t B = value.size(0), C = value.size(1), Cq = query.size(1);
  const int64_t N = value.size(2) * value.size(3);
  TORCH_CHECK(B <= kMaxGridYZ, "danet_ext: batch size ", B, " exceeds ", kMaxGridYZ);
  at::Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  at::Tensor go = grad_out.contiguous(), o = out.contiguous();
  at::Tensor stats = softmax_stats.to(at::kFloat).contiguous();
  at::Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor dk_acc = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  if (B == 0 || N == 0) return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
  at::Tensor row_dot = at::empty({B, N}, stats.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (use_tensor_core_backward(v, Cq, C)) {
    DANET_DISPATCH_CUDA_TYPES(v.scalar_type(), "position_attention_row_dot_cuda", [&] {
      position_attention_row_dot_launch<scalar_t>(go.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                                  row_dot.data_ptr<float>(), B, C, N, stream,
                                                  /*tf32_dout=*/v.scalar_type() == at::kFloat);
    });
    position_attention_backward_tensor_cores(go, q, k, v, stats, row_dot, dq_acc, dk_acc, dv);
    return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
  }
  DANET_DISPATCH_CUDA_TYPES(v.scalar_type(), "position_attention_backward_cuda", [&] {
    position_attention_backward_launch<scalar_t>(
        go.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        o.data_ptr<scalar_t>(), stats.data_ptr<float>(), row_dot.data_ptr<float>(), dq_acc.data_ptr<float>(),
        dk_acc.data_ptr<float>(), dv.data_ptr<scalar_t>(), B, Cq, C, N, stream);
  });
  return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
}

}  // namespace
}  // namespace cuda
}  // namespace danet

TORCH_LIBRARY_IMPL(danet_ext, CUDA, m) {
  m.impl("position_attention_forward", &danet::cuda::position_attention_forward_cuda);
  m.impl("position_attention_backward", &danet::cuda::position_attention_backward_cuda);
}
