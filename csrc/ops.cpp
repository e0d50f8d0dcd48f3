// Every operator schema of danet_ext, declared once. The kernels live in
// csrc/cpu/*.cpp and csrc/cuda/*.cu and register themselves per device with
// TORCH_LIBRARY_IMPL; autograd and fake (meta) kernels are registered from
// Python (danet_ext/ops.py) with torch.library.
#include <string>

#include <torch/library.h>

#include "build_config.h"
#include "cpu/bf16_scores.h"

namespace danet {

// What this binary was compiled with, as a JSON object.
std::string build_info() {
  std::string info = "{";
  info += "\"backends\": [\"cpu\"";
#if DANET_EXT_WITH_CUDA
  info += ", \"cuda\"";
#endif
  info += "], ";
  info += "\"cuda_arch_list\": \"" DANET_EXT_CUDA_ARCH_LIST "\", ";
  info += "\"torch_version\": \"" DANET_EXT_TORCH_VERSION "\", ";
  info += "\"cuda_version\": \"" DANET_EXT_CUDA_VERSION "\", ";
  info += "\"version\": \"" DANET_EXT_VERSION "\", ";
  info += std::string("\"cpu_bf16_score_kernel\": ") + (cpu::bf16_score_kernel_built() ? "true" : "false");
  info += "}";
  return info;
}

}  // namespace danet

TORCH_LIBRARY(danet_ext, m) {
  // Position attention (PAM). query, key: (B, Cq, H, W); value: (B, C, H, W).
  // Returns out (B, C, H, W) and softmax_stats (B, 2, H*W): for each query,
  // the maximum of its scores and the inverse of sum(exp(score - max)), in
  // float32 (float64 for float64 inputs), saved for backward.
  m.def("position_attention_forward(Tensor query, Tensor key, Tensor value) -> (Tensor out, Tensor softmax_stats)");
  m.def(
      "position_attention_backward(Tensor grad_out, Tensor query, Tensor key, "
      "Tensor value, Tensor out, Tensor softmax_stats) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // Channel attention (CAM). x: (B, C, H, W). Returns out (B, C, H, W) and the
  // attention matrix softmax(rowmax(E) - E), E = X X^T, (B, C, C) in the
  // accumulate dtype, saved for backward.
  m.def("channel_attention_forward(Tensor x) -> (Tensor out, Tensor attention)");
  m.def("channel_attention_backward(Tensor grad_out, Tensor x, Tensor attention) -> Tensor grad_x");
  // 3 x 3 convolution (stride 1, padding = dilation) by Winograd's F(4x4, 3x3),
  // float32 on the CPU, for inference (danet_ext/winograd.py). weight: the
  // transformed filters (36, C_in, C_out); returns (B, C_out, H, W), channels_last.
  m.def("winograd_conv3x3(Tensor input, Tensor weight, Tensor? bias, int dilation) -> Tensor");
  m.def("build_info() -> str", &danet::build_info);
}
