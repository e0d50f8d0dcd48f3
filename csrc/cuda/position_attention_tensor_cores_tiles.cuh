// The tile machinery of the tensor-core position-attention kernels
// (position_attention_tensor_cores_kernels.cuh): block shape, shared-memory
// staging, fragment loads, and the two warp-level products, for two operand
// kinds:
//   Mma16<M>  float16 / bfloat16 (M = __half / __nv_bfloat16): mma.sync
//             m16n8k16, operands loaded by ldmatrix;
//   MmaTf32   float32 inputs on TF32 tensor cores (where PyTorch allows TF32
//             for matmuls): mma.sync m16n8k8, operands rounded by
//             cvt.rna.tf32.f32 from shared memory.
// Compiled by nvcc and, for the tests, by the host compiler through the CUDA
// emulation (tests/cuda_emulation).
//
// Shared tiles are channel-major: row c holds 64 consecutive positions (plus
// padding), so every operand is staged with coalesced copies along N. Fragment
// layouts are those of mma_sm80.cuh (lane = 4 g + t).
#pragma once

#include <cstdint>
#include <type_traits>

#if !defined(DANET_CUDA_EMULATION)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "device_common.cuh"
#include "launch.cuh"
#include "mma_sm80.cuh"

namespace danet {
namespace cuda {
namespace {

constexpr int kTcWarps = 4;
constexpr int kTcThreads = 32 * kTcWarps;
// Two blocks per SM (up to 255 registers a thread): with __launch_bounds__(128)
// alone, ptxas capped grad_qk_kernel_tc<bfloat16, 16> at 128 registers on sm_80
// and spilled 24 bytes to the stack (found by tests/cuda_emulation/test_device_build.py).
constexpr int kTcMinBlocks = 2;
constexpr int kTcTile = 64;                 // rows of a block (queries or keys), and columns per step
constexpr int kTcTileC = 128;               // value channels of a forward / dV block
constexpr int kTcChunkC = 64;               // V and dO channels staged per step of grad_qk_kernel_tc
constexpr int kScoreTiles = kTcTile / 8;    // n8 tiles of a warp's 16 x 64 score block
constexpr int kOutTiles = kTcTileC / 8;     // n8 tiles of a warp's 16 x 128 output block

template <typename T>
struct MmaType;
template <>
struct MmaType<c10::Half> {
  using type = __half;
};
template <>
struct MmaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};

__host__ __device__ __forceinline__ int64_t round16(int64_t x) { return (x + 15) / 16 * 16; }

// Lane roles in ldmatrix x4: lane L gives row L % 8 of matrix L / 8.
__device__ __forceinline__ int ld_mat() { return (threadIdx.x % 32) / 8; }
__device__ __forceinline__ int ld_row() { return threadIdx.x % 8; }
__device__ __forceinline__ int lane_g() { return (threadIdx.x % 32) / 4; }
__device__ __forceinline__ int lane_t() { return threadIdx.x % 4; }

// Every operand kind provides, for a warp:
//   load_a_kn(f, a, k0, row0)     A[r][k] = a[(k0 + k) * kPitch + row0 + r], r < 16, k < kK
//   load_b_kn(f0, f1, b, k0, n0)  B[k][n] = b[(k0 + k) * kPitch + n0 + n] for the n8 tiles n0, n0 + 8
//   load_b_nk(f0, f1, b, k0, n0)  B[k][n] = b[(n0 + n) * kPitch + k0 + k] for the n8 tiles n0, n0 + 8
//   a_from_c(p, kk, f)            A = columns kk kK .. of a warp's 16 x 64 float block held as C fragments
//   mma(d, a, b)                  d += a b
//   store(v)                      v rounded to the element type, for output staging

template <typename M>
struct Mma16 {
  using E = M;
  static constexpr int kK = 16;
  static constexpr int kPitch = kTcTile + 8;  // 144-byte rows: ldmatrix's 8 rows hit 8 distinct 4-bank groups
  // bfloat16 keeps the forward's accumulator normalised (its values reach 3e38);
  // float16 values stay below 65504, so it accumulates exp(s - m) in [0, 1] and
  // divides once, which keeps the rounded probabilities out of float16's subnormals.
  static constexpr bool kNormalised = std::is_same<M, __nv_bfloat16>::value;
  // dV rounds P * kPScale: normalised probabilities average 1/N, below float16's
  // smallest normal (6.1e-5) at N = 32768; P <= 1, so P * 2^15 <= 32768 < 65504.
  static constexpr float kPScale = std::is_same<M, __half>::value ? 32768.f : 1.f;

  __device__ static __forceinline__ void load_a_kn(uint32_t (&f)[4], const E* a, int64_t k0, int row0) {
    const int mat = ld_mat(), r = ld_row();
    ldmatrix<4, true>(f, a + (k0 + (mat >> 1) * 8 + r) * kPitch + row0 + (mat & 1) * 8);
  }
  __device__ static __forceinline__ void load_b_kn(uint32_t (&f0)[2], uint32_t (&f1)[2], const E* b, int64_t k0,
                                                   int n0) {
    const int mat = ld_mat(), r = ld_row();
    uint32_t f[4];
    ldmatrix<4, true>(f, b + (k0 + (mat & 1) * 8 + r) * kPitch + n0 + (mat >> 1) * 8);
    f0[0] = f[0], f0[1] = f[1], f1[0] = f[2], f1[1] = f[3];
  }
  __device__ static __forceinline__ void load_b_nk(uint32_t (&f0)[2], uint32_t (&f1)[2], const E* b, int k0,
                                                   int n0) {
    const int mat = ld_mat(), r = ld_row();
    uint32_t f[4];
    ldmatrix<4, false>(f, b + (n0 + (mat >> 1) * 8 + r) * kPitch + k0 + (mat & 1) * 8);
    f0[0] = f[0], f0[1] = f[1], f1[0] = f[2], f1[1] = f[3];
  }
  // Two adjacent C tiles packed to 16 bits are the A fragment of a 16x16 block.
  __device__ static __forceinline__ void a_from_c(const float (&p)[kScoreTiles][4], int kk, uint32_t (&a)[4]) {
    a[0] = pack2<M>(p[2 * kk][0], p[2 * kk][1]);
    a[1] = pack2<M>(p[2 * kk][2], p[2 * kk][3]);
    a[2] = pack2<M>(p[2 * kk + 1][0], p[2 * kk + 1][1]);
    a[3] = pack2<M>(p[2 * kk + 1][2], p[2 * kk + 1][3]);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_m16n8k16<M>(d, a, b);
  }
  __device__ static __forceinline__ E store(float v);
};
template <>
__device__ __forceinline__ __half Mma16<__half>::store(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 Mma16<__nv_bfloat16>::store(float v) { return __float2bfloat16_rn(v); }

// TF32: the reduction index k of a fragment is permuted, slot t <-> k = 2t and
// slot t + 4 <-> k = 2t + 1, in A and B alike (a product sums over k, so any
// permutation shared by both operands gives the same result). Then the C
// fragment of a score tile (columns 2t, 2t + 1 in a lane) is an A fragment as
// it stands, and B's two values of a lane are adjacent in a row-major tile.
struct MmaTf32 {
  using E = float;
  static constexpr int kK = 8;
  // 272-byte rows (16-byte aligned): the lanes of load_a_kn / load_b_kn read
  // 32 distinct banks (row offset 2t * 68 = 8t banks, plus g).
  static constexpr int kPitch = kTcTile + 4;
  static constexpr bool kNormalised = true;  // float32 range, as in the CUDA-core kernel
  static constexpr float kPScale = 1.f;

  __device__ static __forceinline__ void load_a_kn(uint32_t (&f)[4], const E* a, int64_t k0, int row0) {
    const E* p = a + (k0 + 2 * lane_t()) * kPitch + row0 + lane_g();
    f[0] = to_tf32(p[0]);
    f[1] = to_tf32(p[8]);
    f[2] = to_tf32(p[kPitch]);
    f[3] = to_tf32(p[kPitch + 8]);
  }
  __device__ static __forceinline__ void load_b_kn(uint32_t (&f0)[2], uint32_t (&f1)[2], const E* b, int64_t k0,
                                                   int n0) {
    const E* p = b + (k0 + 2 * lane_t()) * kPitch + n0 + lane_g();
    f0[0] = to_tf32(p[0]);
    f0[1] = to_tf32(p[kPitch]);
    f1[0] = to_tf32(p[8]);
    f1[1] = to_tf32(p[kPitch + 8]);
  }
  __device__ static __forceinline__ void load_b_nk(uint32_t (&f0)[2], uint32_t (&f1)[2], const E* b, int k0,
                                                   int n0) {
    const E* p = b + (n0 + lane_g()) * kPitch + k0 + 2 * lane_t();
    f0[0] = to_tf32(p[0]);
    f0[1] = to_tf32(p[1]);
    f1[0] = to_tf32(p[8 * kPitch]);
    f1[1] = to_tf32(p[8 * kPitch + 1]);
  }
  __device__ static __forceinline__ void a_from_c(const float (&p)[kScoreTiles][4], int kk, uint32_t (&a)[4]) {
    a[0] = to_tf32(p[kk][0]);  // (g, 2t)      -> slot t
    a[1] = to_tf32(p[kk][2]);  // (g + 8, 2t)  -> slot t
    a[2] = to_tf32(p[kk][1]);  // (g, 2t + 1)  -> slot t + 4
    a[3] = to_tf32(p[kk][3]);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_m16n8k8_tf32(d, a, b);
  }
  __device__ static __forceinline__ E store(float v) { return v; }
};

// Bytes of one shared row of an operand kind.
template <typename Tr>
constexpr int64_t row_bytes() {
  return Tr::kPitch * static_cast<int64_t>(sizeof(typename Tr::E));
}

// dst[r * kPitch + x] = src[(r0 + r) * N + x0 + x] for r < fill_rows, x < 64,
// copied bit for bit; 0 where r0 + r >= rows or x0 + x >= N. `vec`: rows start
// 16-byte aligned in global memory (N a multiple of 16 bytes' worth of
// elements, aligned pointers), so every 16-byte run is one access.
template <typename Tr>
__device__ __forceinline__ void stage_tile(const typename Tr::E* __restrict__ src, int64_t rows, int64_t N,
                                           int64_t r0, int fill_rows, int64_t x0, typename Tr::E* dst, bool vec) {
  using E = typename Tr::E;
  constexpr int kRun = 16 / sizeof(E);  // elements per 16-byte access
  if (vec) {
    for (int e = threadIdx.x; e < fill_rows * (kTcTile / kRun); e += kTcThreads) {
      const int r = e / (kTcTile / kRun), x = (e % (kTcTile / kRun)) * kRun;
      const int64_t gr = r0 + r, gx = x0 + x;
      uint4 val{0u, 0u, 0u, 0u};
      if (gr < rows && gx < N) val = *reinterpret_cast<const uint4*>(src + gr * N + gx);
      *reinterpret_cast<uint4*>(dst + r * Tr::kPitch + x) = val;
    }
  } else {
    for (int e = threadIdx.x; e < fill_rows * kTcTile; e += kTcThreads) {
      const int r = e / kTcTile, x = e % kTcTile;
      const int64_t gr = r0 + r, gx = x0 + x;
      dst[r * Tr::kPitch + x] = (gr < rows && gx < N) ? src[gr * N + gx] : Tr::store(0.f);
    }
  }
}

// s[nt] += (16 x depth) . (depth x 64) for a warp: s[r][n] = sum_c a[c][row0 + r] b[c][n],
// both operands channel-major in shared memory; depth a multiple of 16.
template <typename Tr>
__device__ __forceinline__ void warp_scores(const typename Tr::E* a, const typename Tr::E* b, int64_t depth,
                                            int row0, float (&s)[kScoreTiles][4]) {
  for (int64_t kc = 0; kc < depth; kc += Tr::kK) {
    uint32_t af[4];
    Tr::load_a_kn(af, a, kc, row0);
#pragma unroll
    for (int nt = 0; nt < kScoreTiles; nt += 2) {
      uint32_t b0[2], b1[2];
      Tr::load_b_kn(b0, b1, b, kc, nt * 8);
      Tr::mma(s[nt], af, b0);
      Tr::mma(s[nt + 1], af, b1);
    }
  }
}

// acc[ct] += P B for a warp: P is its 16 x 64 block in registers (rounded to the
// operand kind), B[k][n] = b[n * kPitch + k] (row n of the shared tile holds
// column n of B), n < 8 kTiles.
template <typename Tr, int kTiles>
__device__ __forceinline__ void warp_product(const float (&p)[kScoreTiles][4], const typename Tr::E* b,
                                             float (&acc)[kTiles][4]) {
  static_assert(kTiles % 2 == 0, "pairs of n8 tiles");
#pragma unroll
  for (int kk = 0; kk < kTcTile / Tr::kK; ++kk) {
    uint32_t a[4];
    Tr::a_from_c(p, kk, a);
#pragma unroll
    for (int ct = 0; ct < kTiles; ct += 2) {
      uint32_t b0[2], b1[2];
      Tr::load_b_nk(b0, b1, b, kk * Tr::kK, ct * 8);
      Tr::mma(acc[ct], a, b0);
      Tr::mma(acc[ct + 1], a, b1);
    }
  }
}

// Reductions over the 4 lanes of a quad (the lanes that share a fragment row).
__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Fragment coordinates of element e of n8 tile nt, for this lane (C layout).
__device__ __forceinline__ int frag_row(int e) { return lane_g() + 8 * (e >> 1); }
__device__ __forceinline__ int frag_col(int nt, int e) { return nt * 8 + 2 * lane_t() + (e & 1); }

// Copies a (rows x 64) tile staged as stage[r * kPitch + x] to dst[(r0 + r) * N
// + x0 + x], where r0 + r < rows_total and x0 + x < N (coalesced). T has the
// bits of E (c10::Half / __half, c10::BFloat16 / __nv_bfloat16, float).
template <typename Tr, typename T>
__device__ __forceinline__ void store_tile(const typename Tr::E* stage, int rows, int64_t rows_total, int64_t N,
                                           int64_t r0, int64_t x0, T* __restrict__ dst) {
  static_assert(sizeof(T) == sizeof(typename Tr::E), "the output has the operands' bits");
  typename Tr::E* d = reinterpret_cast<typename Tr::E*>(dst);
  for (int e = threadIdx.x; e < rows * kTcTile; e += kTcThreads) {
    const int r = e / kTcTile, x = e % kTcTile;
    const int64_t gr = r0 + r, gx = x0 + x;
    if (gr < rows_total && gx < N) d[gr * N + gx] = stage[r * Tr::kPitch + x];
  }
}

}  // namespace
}  // namespace cuda
}  // namespace danet
