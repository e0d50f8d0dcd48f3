// Position attention on tensor cores (float16/bfloat16, and float32 on TF32
// where torch.backends.cuda.matmul.allow_tf32 allows it; compute capability 8.0
// and newer), in position_attention_tensor_cores.cu; the kernels are in
// position_attention_tensor_cores_kernels.cuh. The launchers in
// position_attention.cu take this path by default where it applies and the
// CUDA-core kernels otherwise; DANET_EXT_TENSOR_CORES=0 forces the CUDA cores.
#pragma once

#include <ATen/core/Tensor.h>

namespace danet {
namespace cuda {

// Whether the tensor-core forward / backward run for these inputs: float16,
// bfloat16, or float32 with TF32 allowed, on a device of compute capability
// 8.0 or newer with kernels built
// for it, DANET_EXT_TENSOR_CORES not "0" (read at every call), and the shape
// within the kernels' limits (forward: Cq <= 512 and its shared memory within
// the device's; backward: Cq <= 64, any C).
bool use_tensor_core_forward(const at::Tensor& value, int64_t Cq);
bool use_tensor_core_backward(const at::Tensor& value, int64_t Cq, int64_t C);

// q, k: (B, Cq, H, W) and v: (B, C, H, W), contiguous, of one dtype,
// validated by the caller, with B and N = H*W non-zero; out: (B, C, H, W) of
// v's dtype, contiguous; stats: (B, 2, N) float32, receives each query's score
// maximum and inverse sum of exponentials.
void position_attention_forward_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             at::Tensor& out, at::Tensor& stats);

// grad_out, q, k, v contiguous as above; stats (B, 2, N) and row_dot (B, N)
// float32; dq_acc, dk_acc (B, Cq, H, W) float32 zero-filled; dv like v.
void position_attention_backward_tensor_cores(const at::Tensor& grad_out, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& stats,
                                              const at::Tensor& row_dot, at::Tensor& dq_acc, at::Tensor& dk_acc,
                                              at::Tensor& dv);

}  // namespace cuda
}  // namespace danet
