// Argument validation shared by every device implementation of the ops.
// Each message names the argument and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace danet {

// The dtypes every op takes (float16 and bfloat16 are computed in float32).
inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "danet_ext: `", name, "` must be a float32, float64, float16 or bfloat16 tensor, got ",
              s);
}

inline void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "danet_ext: `", name,
              "` must be a 4-D (B, C, H, W) tensor, got ", t.dim(),
              "-D with shape ", t.sizes());
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref,
                       const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "danet_ext: `", name, "` is on ",
              t.device(), " but `", ref_name, "` is on ", ref.device(),
              "; all inputs must be on the same device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "danet_ext: `", name,
              "` has dtype ", t.scalar_type(), " but `", ref_name,
              "` has dtype ", ref.scalar_type(),
              "; all inputs must have the same dtype");
}

// The dtype the kernels accumulate in: float64 for float64 inputs, else float32.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A tensor the forward saved for the backward (softmax statistics, attention
// matrix): on the device of `ref`, in the accumulate dtype of `ref`'s dtype.
inline void check_saved(const at::Tensor& t, const char* name, const at::Tensor& ref,
                        const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "danet_ext: `", name, "` is on ", t.device(),
              " but `", ref_name, "` is on ", ref.device(),
              "; all inputs must be on the same device");
  const auto want = accumulate_type(ref.scalar_type());
  TORCH_CHECK(t.scalar_type() == want, "danet_ext: `", name, "` must be ", want, " for ",
              ref.scalar_type(), " inputs, got ", t.scalar_type());
}

// query, key: (B, Cq, H, W); value: (B, C, H, W).
inline void check_position_attention_inputs(const at::Tensor& query,
                                            const at::Tensor& key,
                                            const at::Tensor& value) {
  check_4d(query, "query");
  check_4d(key, "key");
  check_4d(value, "value");
  check_floating(value, "value");
  check_same(query, value, "query", "value");
  check_same(key, value, "key", "value");
  TORCH_CHECK(query.size(1) == key.size(1),
              "danet_ext: `query` and `key` must have the same number of "
              "channels, got ", query.size(1), " and ", key.size(1));
  TORCH_CHECK(query.size(1) >= 1,
              "danet_ext: `query` must have at least one channel");
  for (int d : {0, 2, 3}) {
    TORCH_CHECK(query.size(d) == value.size(d) && key.size(d) == value.size(d),
                "danet_ext: `query`, `key` and `value` must share batch and "
                "spatial sizes (dims 0, 2, 3), got ", query.sizes(), ", ",
                key.sizes(), " and ", value.sizes());
  }
}

inline void check_position_attention_backward_inputs(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key,
    const at::Tensor& value, const at::Tensor& out, const at::Tensor& stats) {
  check_position_attention_inputs(query, key, value);
  TORCH_CHECK(grad_out.sizes() == value.sizes() && out.sizes() == value.sizes(),
              "danet_ext: `grad_out` and `out` must have the shape of `value` ",
              value.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  check_same(grad_out, value, "grad_out", "value");
  check_same(out, value, "out", "value");
  TORCH_CHECK(stats.dim() == 3 && stats.size(0) == value.size(0) &&
                  stats.size(1) == 2 &&
                  stats.size(2) == value.size(2) * value.size(3),
              "danet_ext: `softmax_stats` must have shape (B, 2, H*W) = (",
              value.size(0), ", 2, ", value.size(2) * value.size(3), "), got ",
              stats.sizes());
  check_saved(stats, "softmax_stats", value, "value");
}

// x: (B, C, H, W).
inline void check_channel_attention_inputs(const at::Tensor& x) {
  check_4d(x, "x");
  check_floating(x, "x");
}

inline void check_channel_attention_backward_inputs(const at::Tensor& grad_out,
                                                    const at::Tensor& x,
                                                    const at::Tensor& attention) {
  check_channel_attention_inputs(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(),
              "danet_ext: `grad_out` must have the shape of `x` ", x.sizes(),
              ", got ", grad_out.sizes());
  check_same(grad_out, x, "grad_out", "x");
  TORCH_CHECK(attention.dim() == 3 && attention.size(0) == x.size(0) &&
                  attention.size(1) == x.size(1) &&
                  attention.size(2) == x.size(1),
              "danet_ext: `attention` must have shape (B, C, C) = (", x.size(0),
              ", ", x.size(1), ", ", x.size(1), "), got ", attention.sizes());
  check_saved(attention, "attention", x, "x");
}


}  // namespace danet
