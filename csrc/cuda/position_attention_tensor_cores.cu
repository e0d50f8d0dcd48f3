// Position attention on tensor cores, float16/bfloat16: the ATen launchers and
// the checks that choose this path. The kernels are in
// position_attention_tensor_cores_kernels.cuh.
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

#include "common.cuh"
#include "position_attention_tensor_cores.h"
#include "position_attention_tensor_cores_kernels.cuh"

namespace danet {
namespace cuda {
namespace {

bool tensor_cores_enabled() {
  const char* flag = std::getenv("DANET_EXT_TENSOR_CORES");
  return flag == nullptr || std::strcmp(flag, "0") != 0;
}

bool tensor_cores_available(const at::Tensor& value) {
  const auto st = value.scalar_type();
  if (st != at::kHalf && st != at::kBFloat16) return false;
  if (!tensor_cores_enabled()) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, value.device().index()));
  if (major < 8) return false;
  // The kernels must also have been compiled for 8.0 or newer (not only
  // JIT-compiled from an older architecture's PTX, where their bodies trap).
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, forward_kernel_tc<__half, c10::Half>));
  return attr.ptxVersion >= 80;
}

// The most shared memory a block may use on this device once the kernel's
// attribute is raised: 227 KiB on 9.0, 163 KiB on 8.0, 99 KiB on 8.6 and 8.9.
int64_t max_shared_per_block(const at::Tensor& value) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, value.device().index()));
  return bytes;
}

template <typename T>
const typename MmaType<T>::type* mma_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename MmaType<T>::type*>(t.data_ptr<T>());
}

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& stats) {
  using M = typename MmaType<T>::type;
  const int64_t B = v.size(0), C = v.size(1), Cq = q.size(1), N = v.size(2) * v.size(3);
  position_attention_forward_tensor_cores_launch<M, T>(mma_ptr<T>(q), mma_ptr<T>(k), mma_ptr<T>(v),
                                                       out.data_ptr<T>(), stats.data_ptr<float>(), B, Cq, C, N,
                                                       c10::cuda::getCurrentCUDAStream());
}

template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& stats, const at::Tensor& row_dot, at::Tensor& dq_acc, at::Tensor& dk_acc,
              at::Tensor& dv) {
  using M = typename MmaType<T>::type;
  const int64_t B = v.size(0), C = v.size(1), Cq = q.size(1), N = v.size(2) * v.size(3);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = grad_qk_tc_splits(B, N, sms);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, v.device().index()));
  const bool v_resident = grad_qk_tc_v_resident(Cq, C, max_shared_per_block(v), per_sm);
  at::Tensor dk_parts;
  if (splits > 1) dk_parts = at::empty({splits, B, Cq, N}, dk_acc.options());
  position_attention_backward_tensor_cores_launch<M, T>(
      mma_ptr<T>(grad_out), mma_ptr<T>(q), mma_ptr<T>(k), mma_ptr<T>(v), stats.data_ptr<float>(),
      row_dot.data_ptr<float>(), dq_acc.data_ptr<float>(), dk_acc.data_ptr<float>(),
      splits > 1 ? dk_parts.data_ptr<float>() : nullptr, dv.data_ptr<T>(), B, Cq, C, N, splits, v_resident,
      c10::cuda::getCurrentCUDAStream());
}

}  // namespace

bool use_tensor_core_forward(const at::Tensor& value, int64_t Cq) {
  return tensor_cores_available(value) && tensor_core_forward_fits(Cq, max_shared_per_block(value));
}

bool use_tensor_core_backward(const at::Tensor& value, int64_t Cq, int64_t C) {
  (void)C;  // any C: V and dO are staged in 64-channel chunks
  return tensor_cores_available(value) && tensor_core_backward_fits(Cq, max_shared_per_block(value));
}

void position_attention_forward_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             at::Tensor& out, at::Tensor& stats) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "danet_ext: the tensor-core forward takes contiguous tensors");
  AT_DISPATCH_SWITCH(v.scalar_type(), "position_attention_forward_tensor_cores",
                     AT_DISPATCH_CASE(at::kHalf, [&] { forward<scalar_t>(q, k, v, out, stats); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { forward<scalar_t>(q, k, v, out, stats); }));
}

void position_attention_backward_tensor_cores(const at::Tensor& grad_out, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& stats,
                                              const at::Tensor& row_dot, at::Tensor& dq_acc, at::Tensor& dk_acc,
                                              at::Tensor& dv) {
  TORCH_CHECK(grad_out.is_contiguous() && q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
                  dv.is_contiguous(),
              "danet_ext: the tensor-core backward takes contiguous tensors");
  AT_DISPATCH_SWITCH(
      v.scalar_type(), "position_attention_backward_tensor_cores",
      AT_DISPATCH_CASE(at::kHalf, [&] { backward<scalar_t>(grad_out, q, k, v, stats, row_dot, dq_acc, dk_acc, dv); })
      AT_DISPATCH_CASE(at::kBFloat16,
                       [&] { backward<scalar_t>(grad_out, q, k, v, stats, row_dot, dq_acc, dk_acc, dv); }));
}

}  // namespace cuda
}  // namespace danet
