// Warp-level tensor-core primitives of compute capability 8.0 and newer: PTX
// mma.sync m16n8k16 on float16/bfloat16 and m16n8k8 on TF32 (float32
// accumulators), ldmatrix (shared memory -> fragments) and the rounding to
// TF32, as FlashAttention-2 and CUTLASS use them.
// nvcc compiles them to the instructions (HMMA, LDSM); the CUDA emulation
// (tests/cuda_emulation/cuda_emulation.h) provides the same functions as warp
// collectives that follow the PTX ISA's fragment tables, so the kernels that
// use them are tested on the CPU.
//
// Fragment layouts, lane = 4 g + t (PTX ISA, "Matrix fragments for
// mma.m16n8k16 with floating point type"); two 16-bit values per 32-bit
// register, the first in the low half:
//   A 16x16 (row):  a[0] = A[g][2t, 2t+1]    a[1] = A[g+8][2t, 2t+1]
//                   a[2] = A[g][2t+8, 2t+9]  a[3] = A[g+8][2t+8, 2t+9]
//   B 16x8 (col):   b[0] = B[2t, 2t+1][g]    b[1] = B[2t+8, 2t+9][g]
//   C/D 16x8 float: c[0], c[1] = C[g][2t, 2t+1]    c[2], c[3] = C[g+8][2t, 2t+1]
// So two adjacent C tiles (columns 0-7 and 8-15) packed to 16 bits are the A
// fragment of a 16x16 block: a score tile becomes the A operand of the next
// product without leaving registers.
//
// m16n8k8 on TF32 (one float-sized element per register):
//   A 16x8 (row):   a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]
//   B 8x8 (col):    b[0] = B[t][g]  b[1] = B[t+4][g]
//   C/D: as above.
//
// ldmatrix m8n8.b16 loads 1, 2 or 4 8x8 matrices: lanes 8i .. 8i+7 give the
// addresses of the 8 rows (16 bytes each, 16-byte aligned, in shared memory)
// of matrix i; lane L receives in register i the elements (L/4, 2(L%4)) and
// (L/4, 2(L%4)+1) of matrix i, or with .trans (2(L%4), L/4) and (2(L%4)+1, L/4).
#pragma once

#include <cstdint>

#include "launch.cuh"

#if !defined(DANET_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace danet {
namespace cuda {

// Two floats rounded to the 16-bit MMA type M (__half or __nv_bfloat16) and
// packed into one register, `lo` in the low half.
template <typename M>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

// The TF32 operand nearest to v (ties away from zero: cvt.rna.tf32.f32), in a register.
__device__ __forceinline__ uint32_t to_tf32(float v);

#if defined(DANET_CUDA_EMULATION)

inline uint32_t to_tf32(float v) { return ::danet_emu::ptx::to_tf32(v); }

// d += a b (16x8 by 8x8) on TF32 operands, float32 accumulation.
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::danet_emu::ptx::mma_m16n8k8_tf32(d, a, b);
}

template <>
inline uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
inline uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// d += a b (16x16 by 16x8), float32 accumulation.
template <typename M>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  ::danet_emu::ptx::mma_m16n8k16<M>(d, a, b);
}

// kCount 8x8 matrices of 16-bit elements; `row` is this lane's row address.
template <int kCount, bool kTrans>
inline void ldmatrix(uint32_t (&r)[kCount], const void* row) {
  ::danet_emu::ptx::ldmatrix<kCount, kTrans>(r, row);
}

#else  // nvcc

template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
#else
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
#endif
}

__device__ __forceinline__ uint32_t to_tf32(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
#else
  __trap();
  return 0;
#endif
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <typename M>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                     const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                            const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <int kCount, bool kTrans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[kCount], const void* row) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kCount == 4 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else if constexpr (kCount == 4) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  } else if constexpr (kCount == 2 && kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else if constexpr (kCount == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
  } else {
    static_assert(kCount == 2 || kCount == 4, "ldmatrix: the kernels load 2 or 4 matrices");
  }
#else
  __trap();
#endif
}

#endif

}  // namespace cuda
}  // namespace danet
