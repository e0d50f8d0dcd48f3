// bfloat16 and float16 tile products on CPUs with the hardware for them.
//
// On a CPU with AVX512-BF16 or AMX-BF16, PyTorch's bfloat16 matmul (oneDNN)
// runs four to five times faster than float32 (measured on a 2-core AMD EPYC
// with AVX512-BF16: ~430 against ~105 GFLOP/s per core), so the bfloat16
// kernels run their products there instead of converting to float32; likewise
// float16 position attention on CPUs with AVX512-FP16 or AMX-FP16 (not measured
// yet: no such CPU has been available). oneDNN returns 16-bit products (float32
// accumulation inside, one rounding of the result), exactly what the
// reference's bmm does; softmax statistics and running sums stay in float32.
//
// Which path runs is decided per call: use_reduced_precision_gemm(dtype) is
// true where the CPU has the hardware for that dtype, and
// DANET_EXT_CPU_BF16_GEMM / DANET_EXT_CPU_FP16_GEMM = 1 / 0 force either path
// (the tests run both on every machine).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#endif

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

inline bool cpu_has_fp16_hardware() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool amx_fp16 = __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 21) & 1u);  // CPUID.7.1:EAX[21]
    return __builtin_cpu_supports("avx512fp16") || amx_fp16;
  }();
  return has;
#else
  return false;
#endif
}

// Whether products of this dtype (bfloat16 or float16) run in it rather than in
// float32. Read on every call (cheap next to a kernel), so tests can switch paths.
inline bool use_reduced_precision_gemm(at::ScalarType dtype) {
  const bool bf16 = dtype == at::kBFloat16;
  if (!bf16 && dtype != at::kHalf) return false;
  const char* force = std::getenv(bf16 ? "DANET_EXT_CPU_BF16_GEMM" : "DANET_EXT_CPU_FP16_GEMM");
  if (force != nullptr && force[0] != '\0') return std::strcmp(force, "0") != 0;
  return bf16 ? cpu_has_bf16_hardware() : cpu_has_fp16_hardware();
}

// A row-major (rows x cols) matrix at `p` with row stride `ld` (transposed:
// stored cols x rows) as a tensor view, for ATen's 16-bit matmul.
template <typename T16>
at::Tensor view16(const T16* p, int64_t rows, int64_t cols, int64_t ld, bool transposed) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T16>::value);
  auto* data = const_cast<T16*>(p);
  return transposed ? at::from_blob(data, {rows, cols}, {1, ld}, opts)
                    : at::from_blob(data, {rows, cols}, {ld, 1}, opts);
}

// c (m x n, row stride ldc) = op(a) op(b) in T16 (at::BFloat16 or at::Half),
// the product rounded once.
template <typename T16>
void mm16(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const T16* a, int64_t lda, const T16* b,
          int64_t ldb, T16* c, int64_t ldc) {
  at::NoGradGuard no_grad;
  at::Tensor tc = view16(c, m, n, ldc, false);
  at::mm_out(tc, view16(a, m, k, lda, trans_a), view16(b, k, n, ldb, trans_b));
}

}  // namespace cpu
}  // namespace danet
