// bfloat16 tile products on CPUs with bfloat16 hardware.
//
// On a CPU with AVX512-BF16 or AMX-BF16, PyTorch's bfloat16 matmul (oneDNN)
// runs four to five times faster than float32 (measured on a 2-core AMD EPYC
// with AVX512-BF16: ~430 against ~105 GFLOP/s per core), so the bfloat16
// kernels run their products there instead of converting to float32. oneDNN
// returns bfloat16 products (float32 accumulation inside, one rounding of the
// result), exactly what the reference's bmm does; softmax statistics and
// running sums stay in float32.
//
// Which path runs is decided per call: use_bf16_gemm() is true where the CPU
// has the hardware, and DANET_EXT_CPU_BF16_GEMM=1 / =0 forces either path (the
// tests run both on every machine).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include <ATen/ATen.h>

namespace danet {
namespace cpu {

inline bool cpu_has_bf16_hardware() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return has;
#else
  return false;
#endif
}

// Read on every call (cheap next to a kernel), so tests can switch paths.
inline bool use_bf16_gemm() {
  const char* force = std::getenv("DANET_EXT_CPU_BF16_GEMM");
  if (force != nullptr && force[0] != '\0') return std::strcmp(force, "0") != 0;
  return cpu_has_bf16_hardware();
}

// A row-major (rows x cols) matrix at `p` with row stride `ld` (transposed:
// stored cols x rows) as a tensor view, for ATen's bfloat16 matmul.
inline at::Tensor bf16_view(const at::BFloat16* p, int64_t rows, int64_t cols, int64_t ld,
                            bool transposed) {
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  auto* data = const_cast<at::BFloat16*>(p);
  return transposed ? at::from_blob(data, {rows, cols}, {1, ld}, opts)
                    : at::from_blob(data, {rows, cols}, {ld, 1}, opts);
}

// c (m x n, row stride ldc, bfloat16) = op(a) op(b), the product rounded once.
inline void bf16_mm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                    const at::BFloat16* a, int64_t lda, const at::BFloat16* b, int64_t ldb,
                    at::BFloat16* c, int64_t ldc) {
  at::NoGradGuard no_grad;
  at::Tensor tc = bf16_view(c, m, n, ldc, false);
  at::mm_out(tc, bf16_view(a, m, k, lda, trans_a), bf16_view(b, k, n, ldb, trans_b));
}

}  // namespace cpu
}  // namespace danet
