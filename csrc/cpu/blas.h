// Row-major GEMM on raw pointers for the CPU kernels' tile products.
//
// The tiles are small (tens to hundreds of rows), so per-call overhead
// matters: the BLAS that PyTorch itself links (MKL or OpenBLAS, both export the
// Fortran symbols sgemm_/dgemm_) is called directly when it is there. The
// symbols are declared weak, so a PyTorch without them still loads this
// library, and the kernels fall back to at::mm on tensor views of the tiles.
#pragma once

#include <cstdint>

#include <ATen/ATen.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const float* alpha, const float* a, const int* lda,
            const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n,
            const int* k, const double* alpha, const double* a, const int* lda,
            const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace danet {
namespace cpu {

inline bool have_fortran_blas() { static bool off = getenv("DANET_NOBLAS") != nullptr; return !off && sgemm_ != nullptr && dgemm_ != nullptr; }

// Fallback: the same product through ATen on views of the raw buffers.
template <typename scalar_t>
void gemm_aten(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
               scalar_t alpha, const scalar_t* a, int64_t lda, const scalar_t* b,
               int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  at::NoGradGuard no_grad;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  // A row-major matrix stored with leading dimension ld is a strided view.
  at::Tensor ta = trans_a ? at::from_blob(const_cast<scalar_t*>(a), {m, k}, {1, lda}, opts)
                          : at::from_blob(const_cast<scalar_t*>(a), {m, k}, {lda, 1}, opts);
  at::Tensor tb = trans_b ? at::from_blob(const_cast<scalar_t*>(b), {k, n}, {1, ldb}, opts)
                          : at::from_blob(const_cast<scalar_t*>(b), {k, n}, {ldb, 1}, opts);
  at::Tensor tc = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == scalar_t(0)) {
    at::mm_out(tc, ta, tb);
    if (alpha != scalar_t(1)) tc.mul_(alpha);
  } else {
    tc.addmm_(ta, tb, beta, alpha);
  }
}

// C (m x n, row stride ldc) = alpha * op(A) op(B) + beta * C, all row-major;
// op(A) is m x k, op(B) is k x n. trans_a means A is stored k x m.
// With beta == 0 the old contents of C are ignored (may be uninitialised).
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
          scalar_t alpha, const scalar_t* a, int64_t lda, const scalar_t* b,
          int64_t ldb, scalar_t beta, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        c[i * ldc + j] = beta == scalar_t(0) ? scalar_t(0) : beta * c[i * ldc + j];
    return;
  }
  constexpr int64_t int_max = 2147483647;
  const bool fits = m <= int_max && n <= int_max && k <= int_max &&
                    lda <= int_max && ldb <= int_max && ldc <= int_max;
  if (!have_fortran_blas() || !fits) {
    gemm_aten(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  // Column-major BLAS sees a row-major matrix as its transpose:
  // C^T = op(B)^T op(A)^T, so the operands swap places.
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int im = static_cast<int>(n), in = static_cast<int>(m), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(ldb), ildb = static_cast<int>(lda),
            ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  } else {
    static_assert(std::is_same_v<scalar_t, double>, "gemm: float or double");
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, b, &ilda, a, &ildb, &beta, c, &ildc);
  }
}

}  // namespace cpu
}  // namespace danet
