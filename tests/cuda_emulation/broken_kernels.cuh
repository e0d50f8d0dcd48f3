// Deliberately broken kernels for the emulation's self-tests
// (tests/test_cuda_emulation.py): each must be reported, by an error of the
// emulation, by wrong results, or by a sanitizer. A checker that cannot fail
// proves nothing. Written like the real kernels (DANET_SHARED, DANET_LAUNCH),
// and each has a correct twin that must pass.
#pragma once

#include "launch.cuh"
#include "mma_sm80.cuh"

namespace danet_selftest {

using danet::cuda::LaunchGeometry;
using danet::cuda::make_geometry;

// out[t] = in[255 - t] through shared memory; `barrier` = false drops the barrier.
template <bool kBarrier>
__global__ void reverse_kernel(const float* in, float* out) {
  DANET_SHARED(float, tile, [256]);
  const int t = threadIdx.x;
  tile[t] = in[blockIdx.x * 256 + t];
  if (kBarrier) __syncthreads();
  out[blockIdx.x * 256 + t] = tile[255 - t];
}

// Half the block skips the barrier.
__global__ void divergent_barrier_kernel(const float* in, float* out) {
  DANET_SHARED(float, tile, [256]);
  const int t = threadIdx.x;
  tile[t] = in[t];
  if (t < 128) __syncthreads();
  out[t] = tile[255 - t];
}

// The two halves wait at different barriers.
__global__ void two_barriers_kernel(const float* in, float* out) {
  DANET_SHARED(float, tile, [256]);
  const int t = threadIdx.x;
  tile[t] = in[t];
  if (t < 128) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = tile[255 - t];
}

// Writes one element past the end of a shared array (thread 255).
__global__ void oob_shared_write_kernel(const float* in, float* out) {
  DANET_SHARED(float, tile, [256]);
  const int t = threadIdx.x;
  tile[t + 1] = in[t];
  __syncthreads();
  out[t] = tile[t];
}

// Reads shared memory that only half the block wrote.
__global__ void uninitialised_shared_read_kernel(const float* in, float* out) {
  DANET_SHARED(float, tile, [256]);
  const int t = threadIdx.x;
  if (t < 128) tile[t] = in[t];
  __syncthreads();
  out[t] = tile[255 - t];
}

// Warp sum with a given mask: the lanes outside the mask still call it.
template <unsigned kMask>
__global__ void warp_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kMask, v, offset);
  out[threadIdx.x] = v;
}

// One warp: C (16 x 16, float, row-major) = A B, A and B 16 x 16 row-major
// 16-bit. kAssumeOrder reads the accumulator fragment's x[] in the order of
// the mma.m16n8k16 accumulator layout of the PTX ISA instead of storing it
// with store_matrix_sync: code that relies on an undocumented order.
template <typename M, bool kAssumeOrder>
__global__ void wmma_kernel(const M* a, const M* b, float* c) {
  namespace wmma = nvcuda::wmma;
  DANET_SHARED_ALIGNED(128, M, as, [256]);
  DANET_SHARED_ALIGNED(128, M, bs, [256]);
  for (int e = threadIdx.x; e < 256; e += 32) {
    as[e] = a[e];
    bs[e] = b[e];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, M, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, M, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, as, 16);
  wmma::load_matrix_sync(fb, bs, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  if (kAssumeOrder) {
    const int lane = threadIdx.x, group = lane / 4, pair = lane % 4;
    for (int i = 0; i < acc.num_elements; ++i) {
      const int row = group + 8 * ((i / 2) % 2), col = 8 * (i / 4) + 2 * pair + (i % 2);
      c[row * 16 + col] = acc.x[i];
    }
  } else {
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  }
}

// One warp, mma.sync m16n8k16 through ldmatrix: D (16 x 8 float, row-major) =
// A B, with A (16 x 16) row-major and B given as B^T (8 x 16, row n holds
// column n), the way the kernels stage their operands. kSwapped exchanges
// a[1] and a[2] (rows 8-15 and columns 8-15 of A mixed up): a layout error the
// emulation must turn into wrong results. kOffset shifts the row addresses by
// kOffset bytes; kGlobal points ldmatrix at global memory.
template <typename M, bool kSwapped, int kOffset = 0, bool kGlobal = false>
__global__ void mma_tile_kernel(const M* a, const M* bt, float* d) {
  DANET_SHARED_ALIGNED(128, M, as, [16 * 24]);  // rows of 24 elements (48 bytes)
  DANET_SHARED_ALIGNED(128, M, bs, [8 * 24]);
  const int lane = threadIdx.x;
  for (int e = lane; e < 256; e += 32) as[(e / 16) * 24 + e % 16] = a[e];
  for (int e = lane; e < 128; e += 32) bs[(e / 16) * 24 + e % 16] = bt[e];
  __syncthreads();
  const int mat = lane / 8, r = lane % 8;
  uint32_t af[4], bf[2];
  const M* arow = as + ((mat & 1) * 8 + r) * 24 + (mat >> 1) * 8;
  if (kGlobal) arow = a + ((mat & 1) * 8 + r) * 16 + (mat >> 1) * 8;
  danet::cuda::ldmatrix<4, false>(af, reinterpret_cast<const char*>(arow) + kOffset);
  danet::cuda::ldmatrix<2, false>(bf, bs + r * 24 + (mat & 1) * 8);  // lanes 16-31 repeat 0-15
  if (kSwapped) {
    const uint32_t t = af[1];
    af[1] = af[2];
    af[2] = t;
  }
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  danet::cuda::mma_m16n8k16<M>(acc, af, bf);
  const int g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) d[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = acc[e];
}

// A WMMA load from a pointer that is not 32-byte aligned.
template <typename M>
__global__ void wmma_misaligned_kernel(const M* a, float* c) {
  namespace wmma = nvcuda::wmma;
  DANET_SHARED_ALIGNED(128, M, as, [272]);
  for (int e = threadIdx.x; e < 272; e += 32) as[e] = e < 256 ? a[e] : M(0.f);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, M, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, as + 8, 16);  // 16 bytes off
  c[threadIdx.x] = static_cast<float>(fa.x[0]);
}

// Deadlock: lanes 0-15 wait in a full-mask shuffle for lanes 16-31, which wait
// at the barrier for lanes 0-15. Reported after the timeout instead of hanging.
__global__ void shuffle_barrier_deadlock_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(0xffffffffu, v, 16);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Static shared memory over 48 KiB.
__global__ void big_shared_kernel(float* out) {
  DANET_SHARED(float, big, [13 * 1024]);  // 52 KiB
  big[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}

}  // namespace danet_selftest
