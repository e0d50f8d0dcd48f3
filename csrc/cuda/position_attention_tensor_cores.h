// The tensor-core (WMMA) forward of position attention for float16 and
// bfloat16 inputs, in position_attention_tensor_cores.cu. The launcher in
// position_attention.cu calls it when tensor_cores_requested() and the device
// has compute capability 8.0 or newer; otherwise the CUDA-core kernels run.
#pragma once

#include <ATen/core/Tensor.h>

namespace danet {
namespace cuda {

// DANET_EXT_TENSOR_CORES=1 in the environment (read at every call).
bool tensor_cores_requested();

// Whether the tensor-core forward can run for this dtype on the current device.
bool tensor_cores_available(const at::Tensor& value);

// q, k: (B, Cq, H, W) and v: (B, C, H, W), contiguous, float16 or bfloat16,
// validated by the caller, with B and N = H*W non-zero; out: (B, C, H, W) of
// v's dtype, contiguous; stats: (B, 2, N) float32, receives each query's score
// maximum and inverse sum of exponentials.
void position_attention_forward_tensor_cores(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, at::Tensor& out,
                                             at::Tensor& stats);

}  // namespace cuda
}  // namespace danet
