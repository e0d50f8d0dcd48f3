// Host helpers of the CUDA launchers (.cu files): the checks every CUDA entry
// point makes and the dtype dispatch; the device helpers are in device_common.cuh.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "device_common.cuh"

// Instantiate kernels for the three dtypes the CUDA kernels take, and no more.
#define DANET_DISPATCH_CUDA_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace danet {
namespace cuda {

inline void check_is_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "danet_ext: `", name, "` must be a CUDA tensor, got ", t.device());
}

// The CUDA kernels compute in float32 and take float32, float16 and bfloat16.
inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "danet_ext: the CUDA kernels take float32, float16 or bfloat16; `", name,
              "` is ", st, " (use backend=\"reference\" for float64 on CUDA)");
}

}  // namespace cuda
}  // namespace danet
