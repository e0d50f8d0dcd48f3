// CUDA emulation: runs the project's CUDA kernels (csrc/cuda/*_kernels.cuh),
// compiled unchanged by the host C++ compiler, on CPU threads. Test
// infrastructure only (README.md, "Tests"; run by `make test-cuda-emulated`),
// not a user feature.
//
// Execution model
//   * Blocks run one after another; the threads of a block run concurrently as
//     real OS threads from a persistent pool, so ThreadSanitizer sees real
//     interleavings (the TSan build) and a missing barrier lets threads read
//     shared memory that others have not written yet.
//   * __syncthreads() is a block barrier keyed by its source line: threads
//     waiting at different barriers, a thread reaching a barrier after another
//     left the kernel, or a thread leaving while others wait, is an error that
//     names the kernel, the block and the lines; a barrier that is never
//     completed is reported after DANET_EMU_TIMEOUT_S seconds (default 120)
//     instead of hanging.
//   * Warp shuffles, votes and __syncwarp are warp collectives: every lane in
//     `mask` must call the same collective with the same mask; a mask that
//     leaves out the calling lane, names lanes that have exited, or a lane that
//     exits while named in a pending collective, is an error; reading a lane
//     outside the mask is an error.
//   * nvcuda::wmma (m16n16k16, 16-bit inputs, float accumulators): load, store
//     and mma are warp collectives that check pointer alignment (32 bytes),
//     ldm (a multiple of 16 bytes) and that all lanes pass the same arguments.
//     Fragment elements are spread over the lanes in a random order
//     (DANET_EMU_FRAGMENT_SEED), so code that assumes an order for x[] fails.
//   * Shared memory: every static __shared__ array (DANET_SHARED in the
//     kernels) and the dynamic buffer are allocated per block at their exact
//     size and filled with 0xFF bytes (NaN in float32, float16 and bfloat16),
//     so a read before a write shows up in the results, and out-of-bounds
//     accesses hit AddressSanitizer's red zones in the ASan build.
//   * Launch limits: at most 1024 threads per block, grid.x < 2^31,
//     grid.y and grid.z at most 65535, static + dynamic shared memory at most
//     48 KiB unless the kernel's MaxDynamicSharedMemorySize attribute was
//     raised, and at most 227 KiB.
//   * float16 / bfloat16 are c10::Half / c10::BFloat16, whose float
//     conversions round to nearest even, as the device's __float2half_rn /
//     __float2bfloat16_rn do.
//   * mma.sync m16n8k16 (float16/bfloat16 in, float32 accumulators), m16n8k8
//     on TF32 (operands rounded by cvt.rna.tf32.f32, read as their top 19 bits), and
//     ldmatrix m8n8 (x1/x2/x4, with and without .trans), as the kernels reach
//     them through csrc/cuda/mma_sm80.cuh: warp collectives that place every
//     element exactly where the PTX ISA's fragment tables put it (the lane
//     layout is fixed by the ISA, unlike WMMA's), so a kernel that assumes a
//     wrong layout computes wrong results here as on the device. ldmatrix
//     checks that each row address is 16-byte aligned and lies in the block's
//     shared memory.
// Not provided (yet): other inline PTX (cp.async, wgmma), cooperative groups,
// dynamic parallelism; code using them does not compile here.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#define DANET_CUDA_EMULATION_ACTIVE 1

// ---- CUDA keywords ---------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// __restrict__ is understood by GCC and Clang.

struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using cudaStream_t = void*;

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace danet_emu {

constexpr size_t kDefaultShared = 48 * 1024;
constexpr size_t kMaxShared = 227 * 1024;

struct Abort {};  // unwinds a thread of a block that has failed

inline double timeout_seconds() {
  static double t = [] {
    const char* s = std::getenv("DANET_EMU_TIMEOUT_S");
    return s ? std::atof(s) : 120.0;
  }();
  return t;
}
inline std::atomic<double>& timeout_override() {
  static std::atomic<double> t{0.0};
  return t;
}
inline std::chrono::steady_clock::time_point deadline() {
  const double o = timeout_override().load();
  const double t = o > 0 ? o : timeout_seconds();
  return std::chrono::steady_clock::now() + std::chrono::microseconds(static_cast<int64_t>(t * 1e6));
}

struct Warp {
  std::mutex m;
  std::condition_variable cv;
  unsigned lanes = 0;      // lanes that exist (a partial last warp has fewer)
  unsigned exited = 0;     // lanes that have left the kernel
  unsigned arrived = 0;    // lanes waiting in the pending collective
  unsigned pending_mask = 0;
  const char* pending_what = nullptr;
  uint64_t generation = 0;
  void* args[32] = {};
};

struct Block {
  const char* kernel = "";
  dim3 block_idx, block_dim;
  int nthreads = 0;
  // barrier
  std::mutex m;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  const char* site_file = nullptr;
  int site_line = 0;
  int exited = 0;
  int first_exited = -1;
  // failure
  std::atomic<bool> failed{false};
  std::mutex msg_m;
  std::string message;
  // warps
  std::vector<std::unique_ptr<Warp>> warps;
  // shared memory
  std::mutex shm_m;
  std::map<std::string, void*> statics;
  std::vector<std::pair<const char*, size_t>> shared_ranges;  // [start, start + bytes): every shared allocation
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  size_t dynamic_bytes = 0;
  size_t shared_limit = kDefaultShared;

  ~Block() {
    for (auto& kv : statics) std::free(kv.second);
    std::free(dynamic);
  }
};

struct ThreadState {
  Block* block = nullptr;
  int linear = 0;
  Warp* held_warp = nullptr;  // a warp whose mutex this thread holds while completing a collective
};
inline thread_local ThreadState tls;

inline std::string where(const Block& b, int t) {
  std::ostringstream s;
  s << "kernel " << b.kernel << ", block (" << b.block_idx.x << "," << b.block_idx.y << "," << b.block_idx.z
    << "), thread " << t;
  return s.str();
}

// Marks the block failed (first message wins), wakes every waiter, unwinds.
[[noreturn]] inline void fail(Block& b, const std::string& msg) {
  {
    std::lock_guard<std::mutex> l(b.msg_m);
    if (!b.failed.load()) b.message = msg;
    b.failed.store(true);
  }
  { std::lock_guard<std::mutex> l(b.m); }
  b.cv.notify_all();
  for (auto& w : b.warps) {
    if (w.get() != tls.held_warp) { std::lock_guard<std::mutex> l(w->m); }
    w->cv.notify_all();
  }
  throw Abort{};
}
[[noreturn]] inline void fail_here(const std::string& msg) {
  Block& b = *tls.block;
  fail(b, where(b, tls.linear) + ": " + msg);
}

// ---- block barrier ---------------------------------------------------------
inline void syncthreads(const char* file, int line) {
  Block& b = *tls.block;
  std::unique_lock<std::mutex> l(b.m);
  if (b.failed) throw Abort{};
  auto site = [](const char* f, int ln) { return std::string(f) + ":" + std::to_string(ln); };
  if (b.exited > 0) {
    l.unlock();
    fail_here("reached __syncthreads at " + site(file, line) + " after thread " + std::to_string(b.first_exited) +
              " left the kernel (divergent barrier)");
  }
  if (b.arrived == 0) {
    b.site_file = file;
    b.site_line = line;
  } else if (b.site_line != line || std::strcmp(b.site_file, file) != 0) {
    const std::string other = site(b.site_file, b.site_line);
    l.unlock();
    fail_here("divergent __syncthreads: this thread waits at " + site(file, line) + ", " +
              std::to_string(b.arrived) + " other thread(s) wait at " + other);
  }
  if (++b.arrived == b.nthreads) {
    b.arrived = 0;
    ++b.generation;
    l.unlock();
    b.cv.notify_all();
    return;
  }
  const uint64_t gen = b.generation;
  if (!b.cv.wait_until(l, deadline(), [&] { return b.generation != gen || b.failed.load(); })) {
    const int arrived = b.arrived;
    l.unlock();
    fail_here("timeout at __syncthreads " + site(file, line) + ": only " + std::to_string(arrived) + " of " +
              std::to_string(b.nthreads) + " threads arrived (missing or divergent barrier)");
  }
  if (b.generation == gen) throw Abort{};  // failed
}

// ---- warp collectives ------------------------------------------------------
using CollectiveFn = void (*)(void** args, unsigned mask);

inline void warp_collective(unsigned mask, const char* what, void* arg, CollectiveFn complete) {
  Block& b = *tls.block;
  const int lane = tls.linear % 32;
  Warp& w = *b.warps[tls.linear / 32];
  const unsigned bit = 1u << lane;
  std::unique_lock<std::mutex> l(w.m);
  if (b.failed) throw Abort{};
  auto hex = [](unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return std::string(buf);
  };
  if (!(mask & bit)) {
    l.unlock();
    fail_here(std::string(what) + " with mask " + hex(mask) + " that leaves out the calling lane " +
              std::to_string(lane));
  }
  if (mask & ~w.lanes) {
    l.unlock();
    fail_here(std::string(what) + " with mask " + hex(mask) + " naming lanes that do not exist " + hex(mask & ~w.lanes));
  }
  if (mask & w.exited) {
    l.unlock();
    fail_here(std::string(what) + " with mask " + hex(mask) + " naming lanes that have left the kernel " +
              hex(mask & w.exited));
  }
  if (w.arrived == 0) {
    w.pending_mask = mask;
    w.pending_what = what;
  } else if (w.pending_mask != mask || std::strcmp(w.pending_what, what) != 0) {
    const std::string other = std::string(w.pending_what) + " with mask " + hex(w.pending_mask);
    l.unlock();
    fail_here("divergent warp collective: lane " + std::to_string(lane) + " calls " + what + " with mask " +
              hex(mask) + " while other lanes wait in " + other);
  }
  w.args[lane] = arg;
  w.arrived |= bit;
  if (w.arrived == mask) {
    tls.held_warp = &w;
    try {
      complete(w.args, mask);  // may fail(): the lock is released by unwinding
    } catch (...) {
      tls.held_warp = nullptr;
      throw;
    }
    tls.held_warp = nullptr;
    w.arrived = 0;
    ++w.generation;
    l.unlock();
    w.cv.notify_all();
    return;
  }
  const uint64_t gen = w.generation;
  if (!w.cv.wait_until(l, deadline(), [&] { return w.generation != gen || b.failed.load(); })) {
    const unsigned missing = mask & ~w.arrived;
    l.unlock();
    fail_here(std::string("timeout in ") + what + " with mask " + hex(mask) + ": lanes " + hex(missing) +
              " never arrived (wrong mask or divergent collective)");
  }
  if (w.generation == gen) throw Abort{};
}

struct ShuffleArg {
  uint64_t value;
  uint64_t result;
  int src;  // lane to read, or -1: keep own value
};

inline void complete_shuffle(void** args, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    auto* a = static_cast<ShuffleArg*>(args[l]);
    if (a->src < 0) {
      a->result = a->value;
    } else if (!(mask & (1u << a->src))) {
      fail_here("shuffle: lane " + std::to_string(l) + " reads lane " + std::to_string(a->src) +
                ", which is not in the mask (undefined on the device)");
    } else {
      a->result = static_cast<ShuffleArg*>(args[a->src])->value;
    }
  }
}

template <typename T>
T shuffle(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 64 bits");
  ShuffleArg a{0, 0, src};
  std::memcpy(&a.value, &v, sizeof(T));
  warp_collective(mask, what, &a, complete_shuffle);
  T out;
  std::memcpy(&out, &a.result, sizeof(T));
  return out;
}

inline int lane_id() { return tls.linear % 32; }

struct VoteArg {
  int pred;
  unsigned ballot;
};
inline void complete_vote(void** args, unsigned mask) {
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask & (1u << l)) && static_cast<VoteArg*>(args[l])->pred) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) static_cast<VoteArg*>(args[l])->ballot = ballot;
}
inline unsigned vote(unsigned mask, int pred, const char* what) {
  VoteArg a{pred != 0, 0};
  warp_collective(mask, what, &a, complete_vote);
  return a.ballot;
}
inline void complete_nothing(void**, unsigned) {}

// ---- shared memory ---------------------------------------------------------
inline void* static_shared(const char* file, int line, const char* name, size_t bytes) {
  Block& b = *tls.block;
  std::lock_guard<std::mutex> l(b.shm_m);
  const std::string key = std::string(file) + ":" + std::to_string(line) + ":" + name;
  auto it = b.statics.find(key);
  if (it != b.statics.end()) return it->second;
  if (b.static_bytes + bytes + b.dynamic_bytes > b.shared_limit) {
    std::ostringstream s;
    s << "shared memory: " << b.static_bytes + bytes << " bytes static + " << b.dynamic_bytes
      << " dynamic exceed the limit of " << b.shared_limit << " bytes"
      << (b.shared_limit == kDefaultShared ? " (48 KiB unless the kernel's attribute is raised)" : "");
    fail_here(s.str());
  }
  void* p = nullptr;
  if (posix_memalign(&p, 128, bytes ? bytes : 1) != 0) throw std::bad_alloc();
  std::memset(p, 0xFF, bytes);  // poison: NaN in float32, float16, bfloat16
  b.static_bytes += bytes;
  b.statics.emplace(key, p);
  b.shared_ranges.emplace_back(static_cast<const char*>(p), bytes);
  return p;
}

inline void* dynamic_shared() { return tls.block->dynamic; }

// Whether [p, p + bytes) lies inside one shared allocation of the caller's block.
inline bool in_shared(const void* p, size_t bytes) {
  Block& b = *tls.block;
  const char* c = static_cast<const char*>(p);
  std::lock_guard<std::mutex> l(b.shm_m);
  if (b.dynamic && c >= static_cast<const char*>(b.dynamic) &&
      c + bytes <= static_cast<const char*>(b.dynamic) + b.dynamic_bytes)
    return true;
  for (const auto& r : b.shared_ranges)
    if (c >= r.first && c + bytes <= r.first + r.second) return true;
  return false;
}

// ---- kernel attributes -----------------------------------------------------
inline std::mutex& attr_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<const void*, size_t>& max_dynamic_shared_attr() {
  static std::map<const void*, size_t> m;
  return m;
}
template <typename F>
void set_max_dynamic_shared(F* kernel, size_t bytes) {
  if (bytes > kMaxShared)
    throw std::runtime_error("CUDA emulation: cudaFuncSetAttribute(MaxDynamicSharedMemorySize, " +
                             std::to_string(bytes) + ") exceeds 227 KiB");
  std::lock_guard<std::mutex> l(attr_mutex());
  max_dynamic_shared_attr()[reinterpret_cast<const void*>(kernel)] = bytes;
}

// ---- thread pool -----------------------------------------------------------
class Pool {
 public:
  static Pool& get() {
    static Pool* p = new Pool();  // never destroyed: workers block forever at exit
    return *p;
  }
  // Runs job(t) for t in [0, n) on n distinct threads; returns when all are done.
  void run(int n, const std::function<void(int)>& job) {
    std::unique_lock<std::mutex> l(m_);
    while (static_cast<int>(workers_.size()) < n) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
    job_ = &job;
    job_threads_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(l, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void loop(int id) {
    uint64_t seen = 0;
    {
      std::lock_guard<std::mutex> l(m_);
      seen = generation_;  // a worker created for a job joins that job
      if (job_ != nullptr) seen = generation_ - 1;
    }
    for (;;) {
      const std::function<void(int)>* job = nullptr;
      {
        std::unique_lock<std::mutex> l(m_);
        start_.wait(l, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= job_threads_) continue;
        job = job_;
      }
      (*job)(id);
      std::lock_guard<std::mutex> l(m_);
      if (--remaining_ == 0) done_.notify_all();
    }
  }
  std::mutex m_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int job_threads_ = 0, remaining_ = 0;
  uint64_t generation_ = 0;
};

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// ---- launch ----------------------------------------------------------------
template <typename... P, typename... A>
void launch(const char* name, dim3 grid, dim3 block, size_t dynamic_bytes, void (*kernel)(P...), A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "wrong number of kernel arguments");
  std::lock_guard<std::mutex> launch_lock(launch_mutex());
  const int64_t nthreads = int64_t(block.x) * block.y * block.z;
  auto error = [&](const std::string& msg) {
    throw std::runtime_error(std::string("CUDA emulation: launch of ") + name + ": " + msg);
  };
  if (nthreads < 1 || nthreads > 1024 || block.z > 64) error("block of " + std::to_string(nthreads) + " threads (1 to 1024, z <= 64)");
  if (grid.x < 1 || grid.x > 2147483647u || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535)
    error("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
          ") out of range (x < 2^31, y and z <= 65535)");
  size_t limit = kDefaultShared;
  {
    std::lock_guard<std::mutex> l(attr_mutex());
    auto it = max_dynamic_shared_attr().find(reinterpret_cast<const void*>(kernel));
    if (it != max_dynamic_shared_attr().end()) {
      if (dynamic_bytes > it->second)
        error(std::to_string(dynamic_bytes) + " bytes of dynamic shared memory exceed the kernel's attribute (" +
              std::to_string(it->second) + ")");
      limit = kMaxShared;
    }
  }
  if (dynamic_bytes > limit)
    error(std::to_string(dynamic_bytes) + " bytes of dynamic shared memory exceed " + std::to_string(limit) +
          (limit == kDefaultShared ? " (48 KiB unless the kernel's attribute is raised)" : ""));
  // Arguments are converted to the parameter types once, as cudaLaunchKernel does.
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.kernel = name;
        b.block_idx = dim3(bx, by, bz);
        b.block_dim = block;
        b.nthreads = static_cast<int>(nthreads);
        b.shared_limit = limit;
        b.dynamic_bytes = dynamic_bytes;
        if (dynamic_bytes) {
          if (posix_memalign(&b.dynamic, 128, dynamic_bytes) != 0) throw std::bad_alloc();
          std::memset(b.dynamic, 0xFF, dynamic_bytes);
        }
        const int nwarps = static_cast<int>((nthreads + 31) / 32);
        for (int w = 0; w < nwarps; ++w) {
          b.warps.emplace_back(new Warp());
          const int lanes = static_cast<int>(std::min<int64_t>(32, nthreads - 32 * w));
          b.warps.back()->lanes = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
        }
        std::function<void(int)> job = [&](int t) {
          tls.block = &b;
          tls.linear = t;
          threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          blockIdx = uint3{bx, by, bz};
          blockDim = block;
          gridDim = grid;
          try {
            std::apply(kernel, params);
          } catch (const Abort&) {
            return;
          } catch (const std::exception& e) {
            try { fail(b, where(b, t) + ": exception: " + e.what()); } catch (const Abort&) {}
            return;
          }
          // This thread leaves the kernel.
          try {
            {
              std::unique_lock<std::mutex> l(b.m);
              if (b.exited++ == 0) b.first_exited = t;
              if (b.arrived > 0 && !b.failed) {
                const std::string msg = "left the kernel while " + std::to_string(b.arrived) +
                                        " thread(s) wait at __syncthreads " + b.site_file + ":" +
                                        std::to_string(b.site_line) + " (divergent barrier)";
                l.unlock();
                fail(b, where(b, t) + ": " + msg);
              }
            }
            Warp& w = *b.warps[t / 32];
            std::unique_lock<std::mutex> l(w.m);
            w.exited |= 1u << (t % 32);
            if ((w.arrived != 0) && (w.pending_mask & (1u << (t % 32))) && !b.failed) {
              const std::string msg = std::string("left the kernel while named in the mask of a pending ") +
                                      w.pending_what;
              l.unlock();
              fail(b, where(b, t) + ": " + msg);
            }
          } catch (const Abort&) {
          }
        };
        Pool::get().run(static_cast<int>(nthreads), job);
        if (b.failed) throw std::runtime_error("CUDA emulation: " + b.message);
      }
}

// ---- atomics ---------------------------------------------------------------
template <typename T, typename Op>
T atomic_update(T* addr, Op op) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomic of this size");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Bits* p = reinterpret_cast<Bits*>(addr);
  Bits old_bits = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    T old_value;
    std::memcpy(&old_value, &old_bits, sizeof(T));
    const T new_value = op(old_value);
    Bits new_bits;
    std::memcpy(&new_bits, &new_value, sizeof(T));
    if (__atomic_compare_exchange_n(p, &old_bits, new_bits, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      return old_value;
  }
}

// ---- fragment element order (WMMA) -----------------------------------------
// perm[u][row * 16 + col] = lane * 8 + element, for u = matrix_a, matrix_b, accumulator.
inline const std::vector<int>& fragment_order(int use) {
  static const std::vector<std::vector<int>> orders = [] {
    const char* s = std::getenv("DANET_EMU_FRAGMENT_SEED");
    std::mt19937 rng(s ? static_cast<unsigned>(std::atoi(s)) : 20260325u);
    std::vector<std::vector<int>> o(3, std::vector<int>(256));
    for (auto& p : o) {
      for (int i = 0; i < 256; ++i) p[i] = i;
      std::shuffle(p.begin(), p.end(), rng);
    }
    return o;
  }();
  return orders[use];
}

}  // namespace danet_emu

// ---- device functions --------------------------------------------------------
#define __syncthreads() ::danet_emu::syncthreads(__FILE__, __LINE__)

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  danet_emu::warp_collective(mask, "__syncwarp", nullptr, danet_emu::complete_nothing);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = danet_emu::lane_id();
  return danet_emu::shuffle(mask, v, (lane / width) * width + (src % width), "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = danet_emu::lane_id();
  int src = lane ^ lane_mask;
  if (src / width != lane / width) src = -1;  // outside the segment: own value
  return danet_emu::shuffle(mask, v, src, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = danet_emu::lane_id();
  int src = lane + static_cast<int>(delta);
  if (src / width != lane / width) src = -1;
  return danet_emu::shuffle(mask, v, src, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = danet_emu::lane_id();
  int src = lane - static_cast<int>(delta);
  if (src < (lane / width) * width) src = -1;
  return danet_emu::shuffle(mask, v, src, "__shfl_up_sync");
}
// The lanes of the caller's warp that have not left the kernel (the device's
// answer can be smaller: lanes that diverged are not active there either).
inline unsigned __activemask() {
  danet_emu::Warp& w = *danet_emu::tls.block->warps[danet_emu::tls.linear / 32];
  std::lock_guard<std::mutex> l(w.m);
  return w.lanes & ~w.exited;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return danet_emu::vote(mask, pred, "__ballot_sync"); }
inline int __any_sync(unsigned mask, int pred) { return danet_emu::vote(mask, pred, "__any_sync") != 0; }
inline int __all_sync(unsigned mask, int pred) { return danet_emu::vote(mask, pred, "__all_sync") == mask; }

inline float atomicAdd(float* a, float v) { return danet_emu::atomic_update(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return danet_emu::atomic_update(a, [v](double o) { return o + v; }); }
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* a, int v) { return danet_emu::atomic_update(a, [v](int o) { return o > v ? o : v; }); }
inline int atomicMin(int* a, int v) { return danet_emu::atomic_update(a, [v](int o) { return o < v ? o : v; }); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* a, float v) { return danet_emu::atomic_update(a, [v](float) { return v; }); }
inline int atomicCAS(int* a, int cmp, int v) {
  __atomic_compare_exchange_n(a, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
[[noreturn]] inline void __trap() { danet_emu::fail_here("__trap()"); }

// float16 / bfloat16: c10's types round to nearest even like the device.
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline __half __float2half_rn(float v) { return __half(v); }
inline float __half2float(__half v) { return static_cast<float>(v); }
inline unsigned short __half_as_ushort(__half v) { return v.x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.x; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return __nv_bfloat16(v); }
inline float __bfloat162float(__nv_bfloat16 v) { return static_cast<float>(v); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

// ---- nvcuda::wmma ------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation provides m16n16k16 only");
  static constexpr int num_elements = 8;  // 256 elements over 32 lanes, in a scrambled order
  T x[num_elements];
};

namespace detail {
template <typename Use>
constexpr int use_index() {
  return std::is_same<Use, matrix_a>::value ? 0 : std::is_same<Use, matrix_b>::value ? 1 : 2;
}
struct MemArg {
  void* frag;
  const void* ptr;
  unsigned ldm;
  bool col;  // memory is column-major
};
inline std::string hexp(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}
inline void check_same(void** args, unsigned mask, const char* what) {
  const MemArg* first = nullptr;
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    auto* a = static_cast<MemArg*>(args[l]);
    if (!first) first = a;
    else if (a->ptr != first->ptr || a->ldm != first->ldm || a->col != first->col)
      danet_emu::fail_here(std::string(what) + ": the lanes of the warp pass different pointers, ldm or layouts");
  }
}
inline void check_mem(const void* ptr, unsigned ldm, size_t elem, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0)
    danet_emu::fail_here(std::string(what) + ": pointer " + hexp(ptr) + " is not 256-bit (32-byte) aligned");
  if ((ldm * elem) % 16 != 0)
    danet_emu::fail_here(std::string(what) + ": ldm " + std::to_string(ldm) + " is not a multiple of " +
                         std::to_string(16 / elem) + " elements (16 bytes)");
  if (ldm < 16) danet_emu::fail_here(std::string(what) + ": ldm " + std::to_string(ldm) + " < 16");
}
template <typename Frag, typename T, int Use>
void complete_load(void** args, unsigned mask) {
  check_same(args, mask, "wmma::load_matrix_sync");
  auto* a0 = static_cast<MemArg*>(args[0]);
  check_mem(a0->ptr, a0->ldm, sizeof(T), "wmma::load_matrix_sync");
  const T* p = static_cast<const T*>(a0->ptr);
  const auto& order = danet_emu::fragment_order(Use);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const int slot = order[r * 16 + c];
      Frag* f = static_cast<Frag*>(static_cast<MemArg*>(args[slot / 8])->frag);
      f->x[slot % 8] = a0->col ? p[size_t(c) * a0->ldm + r] : p[size_t(r) * a0->ldm + c];
    }
}
template <typename Frag, typename T>
void complete_store(void** args, unsigned mask) {
  check_same(args, mask, "wmma::store_matrix_sync");
  auto* a0 = static_cast<MemArg*>(args[0]);
  check_mem(a0->ptr, a0->ldm, sizeof(T), "wmma::store_matrix_sync");
  T* p = const_cast<T*>(static_cast<const T*>(a0->ptr));
  const auto& order = danet_emu::fragment_order(2);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const int slot = order[r * 16 + c];
      const Frag* f = static_cast<const Frag*>(static_cast<MemArg*>(args[slot / 8])->frag);
      (a0->col ? p[size_t(c) * a0->ldm + r] : p[size_t(r) * a0->ldm + c]) = f->x[slot % 8];
    }
}
struct MmaArg {
  void* d;
  const void* a;
  const void* b;
  const void* c;
};
template <typename FD, typename FA, typename FB, typename FC>
void complete_mma(void** args, unsigned) {
  float A[16][16], B[16][16], Cm[16][16];
  const auto &oa = danet_emu::fragment_order(0), &ob = danet_emu::fragment_order(1),
             &oc = danet_emu::fragment_order(2);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      const int e = r * 16 + c;
      A[r][c] = static_cast<float>(static_cast<const FA*>(static_cast<MmaArg*>(args[oa[e] / 8])->a)->x[oa[e] % 8]);
      B[r][c] = static_cast<float>(static_cast<const FB*>(static_cast<MmaArg*>(args[ob[e] / 8])->b)->x[ob[e] % 8]);
      Cm[r][c] = static_cast<float>(static_cast<const FC*>(static_cast<MmaArg*>(args[oc[e] / 8])->c)->x[oc[e] % 8]);
    }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      float acc = Cm[r][c];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];  // 16-bit products are exact in float
      const int slot = oc[r * 16 + c];
      static_cast<FD*>(static_cast<MmaArg*>(args[slot / 8])->d)->x[slot % 8] = acc;
    }
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (auto& e : f.x) e = static_cast<T>(v);
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<L, void>::value, "matrix_a/matrix_b fragments need a layout");
  detail::MemArg a{&f, p, ldm, std::is_same<L, col_major>::value};
  danet_emu::warp_collective(0xffffffffu, "wmma::load_matrix_sync", &a,
                             detail::complete_load<fragment<Use, 16, 16, 16, T, L>, T, detail::use_index<Use>()>);
}
template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm, layout_t layout) {
  detail::MemArg a{&f, p, ldm, layout == mem_col_major};
  danet_emu::warp_collective(0xffffffffu, "wmma::load_matrix_sync", &a,
                             detail::complete_load<fragment<accumulator, 16, 16, 16, T>, T, 2>);
}
template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm, layout_t layout) {
  detail::MemArg a{const_cast<fragment<accumulator, 16, 16, 16, T>*>(&f), p, ldm, layout == mem_col_major};
  danet_emu::warp_collective(0xffffffffu, "wmma::store_matrix_sync", &a,
                             detail::complete_store<fragment<accumulator, 16, 16, 16, T>, T>);
}
template <typename TD, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TD>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC>& c) {
  detail::MmaArg arg{&d, &a, &b, &c};
  danet_emu::warp_collective(
      0xffffffffu, "wmma::mma_sync", &arg,
      detail::complete_mma<fragment<accumulator, 16, 16, 16, TD>, fragment<matrix_a, 16, 16, 16, TA, LA>,
                           fragment<matrix_b, 16, 16, 16, TB, LB>, fragment<accumulator, 16, 16, 16, TC>>);
}

}  // namespace wmma
}  // namespace nvcuda

// ---- PTX mma.sync m16n8k16 / m16n8k8.tf32 and ldmatrix (csrc/cuda/mma_sm80.cuh)
// Lane = 4 g + t. Fragment tables of the PTX ISA ("Matrix fragments for
// mma.m16n8k16 with floating point type"), two 16-bit values per register, the
// first in the low half:
//   A 16x16: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B 16x8:  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C/D 16x8 float: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// ldmatrix m8n8.b16: lanes 8i..8i+7 give the row addresses of matrix i; lane L
// receives in register i row L/4, columns 2(L%4)..+1 of matrix i, or with
// .trans rows 2(L%4)..+1 of column L/4.
namespace danet_emu {
namespace ptx {

template <typename M>
inline float from_bits(uint16_t bits) {
  return static_cast<float>(M(bits, typename M::from_bits_t{}));
}
inline uint16_t lo16(uint32_t r) { return static_cast<uint16_t>(r & 0xFFFFu); }
inline uint16_t hi16(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

struct MmaArg {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
};

template <typename M>
void complete_mma(void** args, unsigned) {
  float A[16][16], B[16][8], D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* x = static_cast<MmaArg*>(args[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      auto half = [&](uint32_t r) { return from_bits<M>(h ? hi16(r) : lo16(r)); };
      A[g][2 * t + h] = half(x->a[0]);
      A[g + 8][2 * t + h] = half(x->a[1]);
      A[g][2 * t + 8 + h] = half(x->a[2]);
      A[g + 8][2 * t + 8 + h] = half(x->a[3]);
      B[2 * t + h][g] = half(x->b[0]);
      B[2 * t + 8 + h][g] = half(x->b[1]);
      D[g][2 * t + h] = x->d[h];
      D[g + 8][2 * t + h] = x->d[2 + h];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      float acc = D[r][c];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][c];  // 16-bit products are exact in float
      D[r][c] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    auto* x = static_cast<MmaArg*>(args[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      x->d[h] = D[g][2 * t + h];
      x->d[2 + h] = D[g + 8][2 * t + h];
    }
  }
}

// d += a b; M is __half (c10::Half) or __nv_bfloat16 (c10::BFloat16).
template <typename M>
inline void mma_m16n8k16(float* d, const uint32_t* a, const uint32_t* b) {
  MmaArg arg{d, a, b};
  warp_collective(0xffffffffu, "mma.sync.m16n8k16", &arg, complete_mma<M>);
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest with ties away from zero.
inline uint32_t to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7F800000u) == 0x7F800000u) return bits;  // inf, NaN
  return (bits + 0x1000u) & ~0x1FFFu;
}
// The value the tensor cores see in a TF32 operand register: its top 19 bits.
inline float tf32_value(uint32_t r) {
  r &= ~0x1FFFu;
  float v;
  std::memcpy(&v, &r, 4);
  return v;
}

inline void complete_mma_tf32(void** args, unsigned) {
  float A[16][8], B[8][8], D[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const auto* x = static_cast<MmaArg*>(args[lane]);
    const int g = lane / 4, t = lane % 4;
    A[g][t] = tf32_value(x->a[0]);
    A[g + 8][t] = tf32_value(x->a[1]);
    A[g][t + 4] = tf32_value(x->a[2]);
    A[g + 8][t + 4] = tf32_value(x->a[3]);
    B[t][g] = tf32_value(x->b[0]);
    B[t + 4][g] = tf32_value(x->b[1]);
    for (int h = 0; h < 2; ++h) {
      D[g][2 * t + h] = x->d[h];
      D[g + 8][2 * t + h] = x->d[2 + h];
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      float acc = D[r][c];
      for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][c];  // TF32 products are exact in float
      D[r][c] = acc;
    }
  for (int lane = 0; lane < 32; ++lane) {
    auto* x = static_cast<MmaArg*>(args[lane]);
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      x->d[h] = D[g][2 * t + h];
      x->d[2 + h] = D[g + 8][2 * t + h];
    }
  }
}

// d += a b on TF32 operands (m16n8k8).
inline void mma_m16n8k8_tf32(float* d, const uint32_t* a, const uint32_t* b) {
  MmaArg arg{d, a, b};
  warp_collective(0xffffffffu, "mma.sync.m16n8k8.tf32", &arg, complete_mma_tf32);
}

struct LdArg {
  const void* addr;
  uint32_t* regs;
};

template <int kCount, bool kTrans>
void complete_ldmatrix(void** args, unsigned) {
  const uint16_t* rows[kCount][8];
  for (int i = 0; i < kCount; ++i)
    for (int r = 0; r < 8; ++r) {
      const int lane = 8 * i + r;
      const void* p = static_cast<LdArg*>(args[lane])->addr;
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
        fail_here("ldmatrix: lane " + std::to_string(lane) + "'s row address is not 16-byte aligned");
      if (!in_shared(p, 16))
        fail_here("ldmatrix: lane " + std::to_string(lane) + "'s row address is outside the block's shared memory");
      rows[i][r] = static_cast<const uint16_t*>(p);
    }
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t* regs = static_cast<LdArg*>(args[lane])->regs;
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < kCount; ++i) {
      const uint16_t lo = kTrans ? rows[i][2 * t][g] : rows[i][g][2 * t];
      const uint16_t hi = kTrans ? rows[i][2 * t + 1][g] : rows[i][g][2 * t + 1];
      regs[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

template <int kCount, bool kTrans>
inline void ldmatrix(uint32_t* regs, const void* addr) {
  static_assert(kCount == 1 || kCount == 2 || kCount == 4, "ldmatrix loads 1, 2 or 4 matrices");
  LdArg arg{addr, regs};
  warp_collective(0xffffffffu, kTrans ? "ldmatrix.trans" : "ldmatrix", &arg, complete_ldmatrix<kCount, kTrans>);
}

}  // namespace ptx
}  // namespace danet_emu

// Static __shared__ arrays, through DANET_SHARED in the kernels: per-block
// storage of the exact size, poisoned, shared by the block's threads.
#define DANET_EMU_SHARED(T, name, dims)                                                          \
  using name##_danet_emu_t = T dims;                                                             \
  name##_danet_emu_t& name = *static_cast<name##_danet_emu_t*>(                                  \
      ::danet_emu::static_shared(__FILE__, __LINE__, #name, sizeof(name##_danet_emu_t)))
