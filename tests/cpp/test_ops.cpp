// C++ check of the ops through the dispatcher, as a libtorch user calls them,
// against plain ATen computations of the same maths. Run by ctest.
#include <cstdio>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

int failures = 0;

void expect_close(const char* what, const at::Tensor& got, const at::Tensor& want, double tol) {
  const double err = (got - want).abs().max().item<double>();
  const bool ok = err <= tol;
  std::printf("%-40s max error %.3e (tolerance %.1e): %s\n", what, err, tol, ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

}  // namespace

int main() {
  at::manual_seed(0);
  auto& dispatcher = c10::Dispatcher::singleton();
  auto pam = dispatcher.findSchemaOrThrow("danet_ext::position_attention_forward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&)>();
  auto pam_backward =
      dispatcher.findSchemaOrThrow("danet_ext::position_attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&)>();
  auto cam = dispatcher.findSchemaOrThrow("danet_ext::channel_attention_forward", "")
                 .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();

  const int64_t B = 2, Cq = 8, C = 24, H = 13, W = 11, N = H * W;
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor q = at::randn({B, Cq, H, W}, opts), k = at::randn({B, Cq, H, W}, opts);
  at::Tensor v = at::randn({B, C, H, W}, opts);

  // Position attention: out = V softmax(Q^T K)^T.
  at::Tensor attn = at::softmax(at::bmm(q.view({B, Cq, N}).transpose(1, 2), k.view({B, Cq, N})), -1);
  at::Tensor want = at::bmm(v.view({B, C, N}), attn.transpose(1, 2)).view({B, C, H, W});
  auto [out, stats] = pam.call(q, k, v);
  expect_close("position_attention_forward (float64)", out, want, 1e-10);
  auto out32 = std::get<0>(pam.call(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat)));
  expect_close("position_attention_forward (float32)", out32.to(at::kDouble), want, 1e-4);

  // Its backward against autograd through the plain computation.
  at::Tensor qg = q.clone().requires_grad_(), kg = k.clone().requires_grad_(), vg = v.clone().requires_grad_();
  at::Tensor a2 = at::softmax(at::bmm(qg.view({B, Cq, N}).transpose(1, 2), kg.view({B, Cq, N})), -1);
  at::Tensor o2 = at::bmm(vg.view({B, C, N}), a2.transpose(1, 2)).view({B, C, H, W});
  at::Tensor grad_out = at::randn_like(o2);
  o2.backward(grad_out);
  auto [dq, dk, dv] = pam_backward.call(grad_out, q, k, v, out, stats);
  expect_close("position_attention_backward dq", dq, qg.grad(), 1e-9);
  expect_close("position_attention_backward dk", dk, kg.grad(), 1e-9);
  expect_close("position_attention_backward dv", dv, vg.grad(), 1e-9);

  // Channel attention: out = softmax(rowmax(E) - E) X, E = X X^T.
  at::Tensor x = at::randn({B, C, H, W}, opts);
  at::Tensor xm = x.view({B, C, N});
  at::Tensor energy = at::bmm(xm, xm.transpose(1, 2));
  at::Tensor shifted = std::get<0>(energy.max(-1, true)).expand_as(energy) - energy;
  at::Tensor want_cam = at::bmm(at::softmax(shifted, -1), xm).view({B, C, H, W});
  expect_close("channel_attention_forward (float64)", std::get<0>(cam.call(x)), want_cam, 1e-10);

  // Bad input raises a c10::Error that names the argument.
  bool raised = false;
  try {
    pam.call(q, k.narrow(1, 0, 4), v);
  } catch (const c10::Error& e) {
    raised = std::string(e.what()).find("`query` and `key`") != std::string::npos;
  }
  std::printf("%-40s %s\n", "mismatched channels raise", raised ? "ok" : "FAILED");
  if (!raised) ++failures;

  std::printf("%s\n", failures == 0 ? "all C++ checks passed" : "C++ checks FAILED");
  return failures == 0 ? 0 : 1;
}
