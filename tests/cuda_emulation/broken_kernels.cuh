// Deliberately broken kernels for the emulation's self-tests
// (tests/test_cuda_emulation.py): each must be reported, by an error of the
// emulation, by wrong results, or by a sanitizer. A checker that cannot fail
// proves nothing. Written like the real kernels (DANET_SHARED, DANET_LAUNCH),
// and each has a correct twin that must pass.
#pragma once

#include "launch.cuh"

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
