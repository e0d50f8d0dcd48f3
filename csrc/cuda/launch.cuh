// One way to launch a kernel, one way to declare shared memory, and the launch
// geometry with CUDA's limits, for every kernel in csrc/cuda.
//
// The kernels live in *_kernels.cuh. nvcc compiles them for the GPU (the .cu
// files); the CUDA emulation used by the tests (tests/cuda_emulation) compiles
// the very same headers with the host C++ compiler and runs them on CPU threads.
// Only the three macros below differ between the two builds:
//   DANET_LAUNCH(kernel, geometry, stream, args...)  kernel<<<grid, block, smem, stream>>>(args...)
//   DANET_SHARED(T, name, dims)                      __shared__ T name dims;
//   DANET_SHARED_ALIGNED(align, T, name, dims)       __shared__ __align__(align) T name dims;
//   DANET_DYNAMIC_SHARED(T, name)                    extern __shared__ T name[];  (128-byte aligned)
// `kernel_fn` must be one macro argument (take `auto kernel = f<A, B>;` for templates with commas).
// The geometry (grid, block, dynamic shared bytes) is computed by host functions
// in the *_kernels.cuh headers with make_geometry(), which checks the limits;
// both builds call them, so the geometry is tested by the emulation too.
#pragma once

#include <cstddef>
#include <cstdint>

#include <c10/util/Exception.h>

#if defined(DANET_CUDA_EMULATION)
#include "cuda_emulation.h"  // tests/cuda_emulation
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace danet {
namespace cuda {

constexpr int64_t kMaxThreadsPerBlock = 1024;
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kDefaultSharedBytes = 48 * 1024;  // without raising the kernel's attribute
constexpr int64_t kMaxSharedBytes = 227 * 1024;     // the largest opt-in maximum (9.0; 8.0 allows 163 KiB,
                                                    // 8.6/8.9 99 KiB: launchers check the device's)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct LaunchGeometry {
  const char* kernel;     // for messages
  dim3 grid;
  dim3 block;
  size_t dynamic_shared;  // bytes; above kDefaultSharedBytes the launch raises the kernel's attribute
};

// Checks CUDA's launch limits; `what` names the problem dimension for the message.
inline LaunchGeometry make_geometry(const char* kernel, int64_t gx, int64_t gy, int64_t gz, int64_t threads,
                                    int64_t dynamic_shared = 0) {
  TORCH_CHECK(threads >= 1 && threads <= kMaxThreadsPerBlock, "danet_ext: ", kernel, ": ", threads,
              " threads per block (at most ", kMaxThreadsPerBlock, ")");
  TORCH_CHECK(gx >= 1 && gx <= kMaxGridX, "danet_ext: ", kernel, ": grid.x = ", gx, " out of range [1, ",
              kMaxGridX, "]; the problem is too large for one launch");
  TORCH_CHECK(gy >= 1 && gy <= kMaxGridYZ, "danet_ext: ", kernel, ": grid.y = ", gy, " out of range [1, ",
              kMaxGridYZ, "] (too many value channels or rows)");
  TORCH_CHECK(gz >= 1 && gz <= kMaxGridYZ, "danet_ext: ", kernel, ": grid.z = ", gz, " out of range [1, ",
              kMaxGridYZ, "] (batch size too large)");
  TORCH_CHECK(dynamic_shared >= 0 && dynamic_shared <= kMaxSharedBytes, "danet_ext: ", kernel, ": ",
              dynamic_shared, " bytes of dynamic shared memory (at most ", kMaxSharedBytes, ")");
  return LaunchGeometry{kernel, dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
                        dim3(static_cast<unsigned>(threads)), static_cast<size_t>(dynamic_shared)};
}

}  // namespace cuda
}  // namespace danet

#if defined(DANET_CUDA_EMULATION)

#define DANET_LAUNCH(kernel_fn, geometry, stream, ...)                                                \
  do {                                                                                                  \
    const ::danet::cuda::LaunchGeometry& danet_geometry_ = (geometry);                                  \
    if (danet_geometry_.dynamic_shared > static_cast<size_t>(::danet::cuda::kDefaultSharedBytes)) {     \
      ::danet_emu::set_max_dynamic_shared(kernel_fn, danet_geometry_.dynamic_shared);                   \
    }                                                                                                   \
    ::danet_emu::launch(danet_geometry_.kernel, danet_geometry_.grid, danet_geometry_.block,            \
                        danet_geometry_.dynamic_shared, kernel_fn, __VA_ARGS__);                        \
  } while (0)
#define DANET_SHARED(T, name, dims) DANET_EMU_SHARED(T, name, dims)
#define DANET_SHARED_ALIGNED(align, T, name, dims) DANET_EMU_SHARED(T, name, dims)
#define DANET_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::danet_emu::dynamic_shared())

#else

#define DANET_LAUNCH(kernel_fn, geometry, stream, ...)                                                  \
  do {                                                                                                  \
    const ::danet::cuda::LaunchGeometry& danet_geometry_ = (geometry);                                  \
    if (danet_geometry_.dynamic_shared > static_cast<size_t>(::danet::cuda::kDefaultSharedBytes)) {     \
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel_fn, cudaFuncAttributeMaxDynamicSharedMemorySize,       \
                                          static_cast<int>(danet_geometry_.dynamic_shared)));           \
    }                                                                                                   \
    kernel_fn<<<danet_geometry_.grid, danet_geometry_.block, danet_geometry_.dynamic_shared, stream>>>(    \
        __VA_ARGS__);                                                                                   \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                     \
  } while (0)
#define DANET_SHARED(T, name, dims) __shared__ T name dims
#define DANET_SHARED_ALIGNED(align, T, name, dims) __shared__ __align__(align) T name dims
#define DANET_DYNAMIC_SHARED(T, name) extern __shared__ __align__(128) T name[]

#endif
