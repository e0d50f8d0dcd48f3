// Position attention forward on tensor cores, float16/bfloat16, opt-in: the
// ATen launcher and the capability checks. The kernels are in
// position_attention_tensor_cores_kernels.cuh.
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>

#include "common.cuh"
#include "position_attention_tensor_cores.h"
#include "position_attention_tensor_cores_kernels.cuh"

namespace danet {
namespace cuda {
namespace {

template <typename T>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            at::Tensor& stats) {
  using M = typename MmaType<T>::type;
  const int64_t B = v.size(0), C = v.size(1), Cq = q.size(1), N = v.size(2) * v.size(3);
  position_attention_forward_tensor_cores_launch<M, T>(
      reinterpret_cast<const M*>(q.data_ptr<T>()), reinterpret_cast<const M*>(k.data_ptr<T>()),
      reinterpret_cast<const M*>(v.data_ptr<T>()), out.data_ptr<T>(), stats.data_ptr<float>(), B, Cq, C, N,
      c10::cuda::getCurrentCUDAStream());
}

}  // namespace

bool tensor_cores_requested() {
  const char* flag = std::getenv("DANET_EXT_TENSOR_CORES");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

bool tensor_cores_available(const at::Tensor& value) {
  const auto st = value.scalar_type();
  if (st != at::kHalf && st != at::kBFloat16) return false;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, value.device().index()));
  if (major < 8) return false;
  // The kernels must also have been compiled for 8.0 or newer (not only
  // JIT-compiled from an older architecture's PTX, where their bodies trap).
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, stats_kernel<__half>));
  return attr.ptxVersion >= 80;
}

void position_attention_forward_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             at::Tensor& out, at::Tensor& stats) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && out.is_contiguous(),
              "danet_ext: the tensor-core forward takes contiguous tensors");
  AT_DISPATCH_SWITCH(v.scalar_type(), "position_attention_forward_tensor_cores",
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch<scalar_t>(q, k, v, out, stats); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch<scalar_t>(q, k, v, out, stats); }));
}

}  // namespace cuda
}  // namespace danet
