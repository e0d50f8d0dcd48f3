// The CUDA kernels of csrc/cuda, compiled by the host compiler against the
// CUDA emulation (cuda_emulation.h), exposed to Python on CPU tensors.
// The tensor handling of position attention mirrors the ATen launchers in
// csrc/cuda/*.cu; the kernels, their geometry and their launch sequences are
// the same source (the *_kernels.cuh headers). Channel attention runs the
// device build's own tensor-level sequence (channel_attention_sequence.cuh).
// Built by tests/cuda_emulation/build.py.
#include <torch/extension.h>

#include "channel_attention_sequence.cuh"
#include "position_attention_grad_scale.cuh"
#include "position_attention_kernels.cuh"
#include "position_attention_tensor_cores_kernels.cuh"

#include "broken_kernels.cuh"

namespace {

using at::Tensor;

template <typename F>
void dispatch(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "emulated kernels take float32, float16, bfloat16; got ", st);
  }
}

// The tensor-core operand kinds: float16 / bfloat16 (Mma16) and float32 on TF32.
using danet::cuda::Mma16;
using danet::cuda::MmaTf32;
template <typename F>
void dispatch_tc(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kHalf: f(c10::Half{}, Mma16<__half>{}); break;
    case at::kBFloat16: f(c10::BFloat16{}, Mma16<__nv_bfloat16>{}); break;
    case at::kFloat: f(float{}, MmaTf32{}); break;
    default: TORCH_CHECK(false, "the tensor-core kernels take float16/bfloat16/float32 (TF32); got ", st);
  }
}

template <typename Tr>
const typename Tr::E* as_operand(const Tensor& t) {
  return reinterpret_cast<const typename Tr::E*>(t.data_ptr());
}

void check_cpu(const Tensor& t) { TORCH_CHECK(t.device().is_cpu(), "emulated kernels take CPU tensors"); }

std::tuple<Tensor, Tensor> pam_forward(const Tensor& query, const Tensor& key, const Tensor& value,
                                       bool tensor_cores) {
  check_cpu(value);
  const int64_t B = value.size(0), C = value.size(1), H = value.size(2), W = value.size(3);
  const int64_t Cq = query.size(1), N = H * W;
  Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  Tensor out = at::empty({B, C, H, W}, v.options());
  Tensor stats = at::empty({B, 2, N}, v.options().dtype(at::kFloat));
  if (B == 0 || N == 0) return {out, stats};
  if (tensor_cores) {
    dispatch_tc(v.scalar_type(), [&](auto tag, auto traits) {
      using T = decltype(tag);
      using Tr = decltype(traits);
      TORCH_CHECK(danet::cuda::tensor_core_forward_fits<Tr>(Cq, danet::cuda::kMaxSharedBytes),
                  "the tensor-core forward takes Cq <= ", danet::cuda::kTcMaxCqForward);
      danet::cuda::position_attention_forward_tensor_cores_launch<Tr, T>(
          as_operand<Tr>(q), as_operand<Tr>(k), as_operand<Tr>(v), out.data_ptr<T>(), stats.data_ptr<float>(), B,
          Cq, C, N, nullptr);
    });
    return {out, stats};
  }
  dispatch(v.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    danet::cuda::position_attention_forward_launch<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(),
                                                      out.data_ptr<T>(), stats.data_ptr<float>(), B, Cq, C, N,
                                                      nullptr);
  });
  return {out, stats};
}

std::tuple<Tensor, Tensor, Tensor> pam_backward(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                const Tensor& value, const Tensor& out,
                                                const Tensor& softmax_stats, bool tensor_cores,
                                                int64_t v_resident, bool scale_grad_scores, int64_t splits_override) {
  check_cpu(value);
  const int64_t B = value.size(0), C = value.size(1), Cq = query.size(1);
  const int64_t N = value.size(2) * value.size(3);
  Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  Tensor go = grad_out.contiguous(), o = out.contiguous();
  Tensor stats = softmax_stats.to(at::kFloat).contiguous();
  Tensor dq_acc = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  Tensor dk_acc = at::zeros(k.sizes(), k.options().dtype(at::kFloat));
  Tensor dv = at::zeros(v.sizes(), v.options());
  if (B == 0 || N == 0) return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
  Tensor row_dot = at::empty({B, N}, stats.options());
  if (tensor_cores) {
    dispatch_tc(v.scalar_type(), [&](auto tag, auto traits) {
      using T = decltype(tag);
      using Tr = decltype(traits);
      TORCH_CHECK(danet::cuda::tensor_core_backward_fits<Tr>(Cq, danet::cuda::kMaxSharedBytes),
                  "the tensor-core backward takes Cq <= ", danet::cuda::kTcMaxCqBackward);
      danet::cuda::position_attention_row_dot_launch<T>(go.data_ptr<T>(), o.data_ptr<T>(), row_dot.data_ptr<float>(),
                                                        B, C, N, nullptr, std::is_same<Tr, MmaTf32>::value);
      // the split of the query range and the V staging an H100 (132 SMs, 227 KiB a block,
      // 228 KiB an SM) would get, unless splits_override (> 0) or v_resident (0 or 1) force them
      const int64_t tiles = danet::cuda::ceil_div(N, danet::cuda::kTcTile);
      const int64_t splits = splits_override > 0
                                 ? danet::cuda::ceil_div(tiles, danet::cuda::ceil_div(tiles, splits_override))
                                 : danet::cuda::grad_qk_tc_splits(B, N, 132);
      const bool resident = v_resident >= 0 ? v_resident == 1
                                            : danet::cuda::grad_qk_tc_v_resident<Tr>(Cq, C, 232448, 233472);
      Tensor dk_parts = splits > 1 ? at::empty({splits, B, Cq, N}, dk_acc.options()) : Tensor();
      const Tensor ds_scale = std::is_same<T, c10::Half>::value && scale_grad_scores
                                  ? danet::cuda::float16_grad_scores_scale(go, v)
                                  : Tensor();
      danet::cuda::position_attention_backward_tensor_cores_launch<Tr, T>(
          as_operand<Tr>(go), as_operand<Tr>(q), as_operand<Tr>(k), as_operand<Tr>(v), stats.data_ptr<float>(),
          row_dot.data_ptr<float>(), ds_scale.defined() ? ds_scale.data_ptr<float>() : nullptr,
          dq_acc.data_ptr<float>(), dk_acc.data_ptr<float>(),
          splits > 1 ? dk_parts.data_ptr<float>() : nullptr, dv.data_ptr<T>(), B, Cq, C, N, splits, resident,
          nullptr);
    });
    return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
  }
  dispatch(v.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    danet::cuda::position_attention_backward_launch<T>(
        go.data_ptr<T>(), q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), o.data_ptr<T>(),
        stats.data_ptr<float>(), row_dot.data_ptr<float>(), dq_acc.data_ptr<float>(), dk_acc.data_ptr<float>(),
        dv.data_ptr<T>(), B, Cq, C, N, nullptr);
  });
  return {dq_acc.to(q.scalar_type()), dk_acc.to(k.scalar_type()), dv};
}

// The channel attention sequence itself (products through ATen, here on the
// CPU; softmax kernels emulated): channel_attention_sequence.cuh.
void check_cam_dtype(const Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "emulated kernels take float32, float16, bfloat16; `x` is ", st);
}

std::tuple<Tensor, Tensor> cam_forward(const Tensor& x) {
  check_cpu(x);
  check_cam_dtype(x);
  return danet::cuda::channel_attention_forward(x, nullptr);
}

Tensor cam_backward(const Tensor& grad_out, const Tensor& x, const Tensor& attention) {
  check_cpu(x);
  check_cam_dtype(x);
  return danet::cuda::channel_attention_backward(grad_out, x, attention, nullptr);
}

// Self-tests: runs a broken (or correct twin) kernel; returns its output.
Tensor selftest(const std::string& name, const Tensor& in, const Tensor& in2) {
  using namespace danet_selftest;
  using danet::cuda::make_geometry;
  const float* ip = in.data_ptr<float>();
  auto one_block = [](const char* k, int threads) { return make_geometry(k, 1, 1, 1, threads); };
  if (name == "barrier" || name == "missing_barrier") {
    Tensor out = at::empty_like(in);
    const auto g = make_geometry("reverse_kernel", in.numel() / 256, 1, 1, 256);
    if (name == "barrier") DANET_LAUNCH(reverse_kernel<true>, g, nullptr, ip, out.data_ptr<float>());
    else DANET_LAUNCH(reverse_kernel<false>, g, nullptr, ip, out.data_ptr<float>());
    return out;
  }
  Tensor out = at::zeros({256}, in.options());
  float* op = out.data_ptr<float>();
  if (name == "divergent_barrier") {
    DANET_LAUNCH(divergent_barrier_kernel, one_block("divergent_barrier_kernel", 256), nullptr, ip, op);
  } else if (name == "two_barriers") {
    DANET_LAUNCH(two_barriers_kernel, one_block("two_barriers_kernel", 256), nullptr, ip, op);
  } else if (name == "oob_shared_write") {
    DANET_LAUNCH(oob_shared_write_kernel, one_block("oob_shared_write_kernel", 256), nullptr, ip, op);
  } else if (name == "uninitialised_shared_read") {
    DANET_LAUNCH(uninitialised_shared_read_kernel, one_block("uninitialised_shared_read_kernel", 256), nullptr,
                 ip, op);
  } else if (name == "shuffle_full_mask") {
    DANET_LAUNCH(warp_sum_kernel<0xffffffffu>, one_block("warp_sum_kernel", 32), nullptr, ip, op);
  } else if (name == "shuffle_wrong_mask") {
    DANET_LAUNCH(warp_sum_kernel<0x0000ffffu>, one_block("warp_sum_kernel", 32), nullptr, ip, op);
  } else if (name == "wmma_store" || name == "wmma_assumed_order") {
    Tensor a = in.to(at::kHalf).contiguous(), b = in2.to(at::kHalf).contiguous();
    const __half* ap = reinterpret_cast<const __half*>(a.data_ptr<c10::Half>());
    const __half* bp = reinterpret_cast<const __half*>(b.data_ptr<c10::Half>());
    if (name == "wmma_store") DANET_LAUNCH((wmma_kernel<__half, false>), one_block("wmma_kernel", 32), nullptr, ap, bp, op);
    else DANET_LAUNCH((wmma_kernel<__half, true>), one_block("wmma_kernel", 32), nullptr, ap, bp, op);
  } else if (name == "wmma_misaligned") {
    Tensor a = in.to(at::kHalf).contiguous();
    DANET_LAUNCH(wmma_misaligned_kernel<__half>, one_block("wmma_misaligned_kernel", 32), nullptr,
                 reinterpret_cast<const __half*>(a.data_ptr<c10::Half>()), op);
  } else if (name.rfind("mma_", 0) == 0 || name.rfind("ldmatrix_", 0) == 0) {
    // in: A (16 x 16), in2: B^T (8 x 16); out: D = A B (16 x 8) in the first 128 entries
    Tensor a = in.to(at::kHalf).contiguous(), bt = in2.to(at::kHalf).contiguous();
    const __half* ap = reinterpret_cast<const __half*>(a.data_ptr<c10::Half>());
    const __half* bp = reinterpret_cast<const __half*>(bt.data_ptr<c10::Half>());
    const auto g = one_block("mma_tile_kernel", 32);
    if (name == "mma_tile") DANET_LAUNCH((mma_tile_kernel<__half, false>), g, nullptr, ap, bp, op);
    else if (name == "mma_swapped_fragment") DANET_LAUNCH((mma_tile_kernel<__half, true>), g, nullptr, ap, bp, op);
    else if (name == "ldmatrix_misaligned") DANET_LAUNCH((mma_tile_kernel<__half, false, 4>), g, nullptr, ap, bp, op);
    else if (name == "ldmatrix_global") DANET_LAUNCH((mma_tile_kernel<__half, false, 0, true>), g, nullptr, ap, bp, op);
    else TORCH_CHECK(false, "unknown self-test ", name);
  } else if (name == "deadlock") {
    DANET_LAUNCH(shuffle_barrier_deadlock_kernel, one_block("shuffle_barrier_deadlock_kernel", 64), nullptr, ip, op);
  } else if (name == "big_shared") {
    DANET_LAUNCH(big_shared_kernel, one_block("big_shared_kernel", 256), nullptr, op);
  } else if (name == "too_many_threads") {
    // Past make_geometry's check, straight to the emulator's.
    danet_emu::launch("reverse_kernel", dim3(1), dim3(2048), 0, reverse_kernel<true>, ip, op);
  } else if (name == "grid_y_too_large") {
    danet_emu::launch("reverse_kernel", dim3(1, 65536), dim3(256), 0, reverse_kernel<true>, ip, op);
  } else {
    TORCH_CHECK(false, "unknown self-test ", name);
  }
  return out;
}

void set_timeout(double seconds) { danet_emu::timeout_override().store(seconds); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "danet_ext's CUDA kernels run on the CPU by the CUDA emulation (tests only)";
  m.def("pam_forward", &pam_forward, py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("tensor_cores") = false);
  m.def("pam_backward", &pam_backward, py::arg("grad_out"), py::arg("query"), py::arg("key"), py::arg("value"),
        py::arg("out"), py::arg("softmax_stats"), py::arg("tensor_cores") = false, py::arg("v_resident") = -1,
        py::arg("scale_grad_scores") = true, py::arg("splits") = -1);
  m.def("cam_forward", &cam_forward);
  m.def("cam_backward", &cam_backward);
  m.def("selftest", &selftest);
  m.def("grad_qk_splits", &danet::cuda::grad_qk_tc_splits, py::arg("B"), py::arg("N"), py::arg("sm_count"));
  // Host decisions of the launchers, per operand kind (tf32: float32 on TF32).
  m.def("grad_qk_v_resident", [](int64_t Cq, int64_t C, int64_t block, int64_t sm, bool tf32) {
    return tf32 ? danet::cuda::grad_qk_tc_v_resident<MmaTf32>(Cq, C, block, sm)
                : danet::cuda::grad_qk_tc_v_resident<Mma16<__half>>(Cq, C, block, sm);
  }, py::arg("Cq"), py::arg("C"), py::arg("max_shared_block"), py::arg("shared_per_sm"), py::arg("tf32") = false);
  m.def("tensor_core_forward_fits", [](int64_t Cq, int64_t max_shared, bool tf32) {
    return tf32 ? danet::cuda::tensor_core_forward_fits<MmaTf32>(Cq, max_shared)
                : danet::cuda::tensor_core_forward_fits<Mma16<__half>>(Cq, max_shared);
  }, py::arg("Cq"), py::arg("max_shared"), py::arg("tf32") = false);
  m.def("tensor_core_backward_fits", [](int64_t Cq, int64_t max_shared, bool tf32) {
    return tf32 ? danet::cuda::tensor_core_backward_fits<MmaTf32>(Cq, max_shared)
                : danet::cuda::tensor_core_backward_fits<Mma16<__half>>(Cq, max_shared);
  }, py::arg("Cq"), py::arg("max_shared"), py::arg("tf32") = false);
  m.def("float16_grad_scores_scale", [](const Tensor& grad_out, const Tensor& value) {
    return danet::cuda::float16_grad_scores_scale(grad_out, value);
  }, py::arg("grad_out"), py::arg("value"));
  m.def("set_timeout", &set_timeout);
}
