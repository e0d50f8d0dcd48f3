// Position attention on tensor cores: the ATen launchers and the checks that
// choose this path (float16/bfloat16; float32 on TF32 where
// torch.backends.cuda.matmul.allow_tf32 allows it). The kernels are in
// position_attention_tensor_cores_kernels.cuh.
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>

#include "common.cuh"
#include "position_attention_grad_scale.cuh"
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
  // float32 takes TF32 only where PyTorch's matmuls may (allow_tf32 /
  // set_float32_matmul_precision("high")), as the official code's bmm would.
  const bool tf32 = st == at::kFloat && at::globalContext().allowTF32CuBLAS();
  if (st != at::kHalf && st != at::kBFloat16 && !tf32) return false;
  if (!tensor_cores_enabled()) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, value.device().index()));
  if (major < 8) return false;
  // The kernels must also have been compiled for 8.0 or newer (not only
  // JIT-compiled from an older architecture's PTX, where their bodies trap).
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, forward_kernel_tc<Mma16<__half>, c10::Half>));
  return attr.ptxVersion >= 80;
}

// The most shared memory a block may use on this device once the kernel's
// attribute is raised: 227 KiB on 9.0, 163 KiB on 8.0, 99 KiB on 8.6 and 8.9.
int64_t max_shared_per_block(const at::Tensor& value) {
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, value.device().index()));
  return bytes;
}

// The operand kind of each dtype: Mma16 for float16/bfloat16, TF32 for float32.
template <typename T>
struct OperandKind {
  using type = Mma16<typename MmaType<T>::type>;
};
template <>
struct OperandKind<float> {
  using type = MmaTf32;
};

template <typename Tr>
const typename Tr::E* operand_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename Tr::E*>(t.data_ptr());
}

template <typename T>
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& stats) {
  using Tr = typename OperandKind<T>::type;
  const int64_t B = v.size(0), C = v.size(1), Cq = q.size(1), N = v.size(2) * v.size(3);
  position_attention_forward_tensor_cores_launch<Tr, T>(operand_ptr<Tr>(q), operand_ptr<Tr>(k), operand_ptr<Tr>(v),
                                                        out.data_ptr<T>(), stats.data_ptr<float>(), B, Cq, C, N,
                                                        c10::cuda::getCurrentCUDAStream());
}

template <typename T>
void backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& stats, const at::Tensor& row_dot, at::Tensor& dq_acc, at::Tensor& dk_acc,
              at::Tensor& dv) {
  using Tr = typename OperandKind<T>::type;
  const int64_t B = v.size(0), C = v.size(1), Cq = q.size(1), N = v.size(2) * v.size(3);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t splits = grad_qk_tc_splits(B, N, sms);
  int per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, v.device().index()));
  const bool v_resident = grad_qk_tc_v_resident<Tr>(Cq, C, max_shared_per_block(v), per_sm);
  at::Tensor dk_parts;
  if (splits > 1) dk_parts = at::empty({splits, B, Cq, N}, dk_acc.options());
  // float16's range is too narrow for dS at small |dO|: scaled per image (see position_attention_grad_scale.cuh)
  const at::Tensor ds_scale = std::is_same<T, c10::Half>::value ? float16_grad_scores_scale(grad_out, v) : at::Tensor();
  position_attention_backward_tensor_cores_launch<Tr, T>(
      operand_ptr<Tr>(grad_out), operand_ptr<Tr>(q), operand_ptr<Tr>(k), operand_ptr<Tr>(v), stats.data_ptr<float>(),
      row_dot.data_ptr<float>(), ds_scale.defined() ? ds_scale.data_ptr<float>() : nullptr,
      dq_acc.data_ptr<float>(), dk_acc.data_ptr<float>(),
      splits > 1 ? dk_parts.data_ptr<float>() : nullptr, dv.data_ptr<T>(), B, Cq, C, N, splits, v_resident,
      c10::cuda::getCurrentCUDAStream());
}

}  // namespace

bool use_tensor_core_forward(const at::Tensor& value, int64_t Cq) {
  if (!tensor_cores_available(value)) return false;
  const int64_t limit = max_shared_per_block(value);
  return value.scalar_type() == at::kFloat ? tensor_core_forward_fits<MmaTf32>(Cq, limit)
                                           : tensor_core_forward_fits<Mma16<__half>>(Cq, limit);
}

bool use_tensor_core_backward(const at::Tensor& value, int64_t Cq, int64_t C) {
  (void)C;  // any C: V is staged in 64-channel chunks where it cannot stay resident
  if (!tensor_cores_available(value)) return false;
  const int64_t limit = max_shared_per_block(value);
  return value.scalar_type() == at::kFloat ? tensor_core_backward_fits<MmaTf32>(Cq, limit)
                                           : tensor_core_backward_fits<Mma16<__half>>(Cq, limit);
}

void position_attention_forward_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             at::Tensor& out, at::Tensor& stats) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "danet_ext: the tensor-core forward takes contiguous tensors");
  AT_DISPATCH_SWITCH(v.scalar_type(), "position_attention_forward_tensor_cores",
                     AT_DISPATCH_CASE(at::kHalf, [&] { forward<scalar_t>(q, k, v, out, stats); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { forward<scalar_t>(q, k, v, out, stats); })
                     AT_DISPATCH_CASE(at::kFloat, [&] { forward<scalar_t>(q, k, v, out, stats); }));
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
                       [&] { backward<scalar_t>(grad_out, q, k, v, stats, row_dot, dq_acc, dk_acc, dv); })
      AT_DISPATCH_CASE(at::kFloat, [&] { backward<scalar_t>(grad_out, q, k, v, stats, row_dot, dq_acc, dk_acc, dv); }));
}

}  // namespace cuda
}  // namespace danet
