// tests/cuda_emulation/emulation.hpp - runs the CUDA backend's kernels on the host, for the tests only.
// include/locmoe/backend/cuda/device.cuh includes this file in place of the CUDA headers when a translation unit
// defines LOCMOE_CUDA_EMULATION as its path (compiled by g++ or clang++, not nvcc). It provides what the kernels
// and cuda.cuh use: the CUDA keywords, threadIdx and friends, barriers, warp shuffles and votes, atomics, the
// intrinsics, the fp16 conversions, and a few runtime calls on host memory.
//
// How a launch runs: the blocks one after another; a block's threads as fibers on the calling thread (an x86-64
// stack switch of a few instructions), each run until it waits at a barrier (__syncthreads, __syncwarp, any warp
// collective) or returns. A warp
// collective is two warp barriers around an exchange through the warp's slots. Threads that returned leave the
// barriers (as on the device, where a warp may return before the rest of its block syncs). __shared__ variables
// are static: one block at a time uses them. What this does not model: the device's memory model and timing, and
// a collective called by some lanes of a warp only (it deadlocks here, where the device is undefined).
// Deterministic: one fixed schedule.
#pragma once

#include <locmoe/views.hpp>

#if !defined(__x86_64__)
#  error "tests/cuda_emulation: the fiber switch is written for x86-64"
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <tuple>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define LOCMOE_CUDA_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(::cuda_emulation::dynamic_shared())

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
// The runtime on host memory. Streams run each call when it is made, except while captured into a graph
// (cudaStreamBeginCapture: calls are recorded, and replayed by cudaGraphLaunch); a synchronizing call during a
// capture fails it, as CUDA's global capture mode does.
enum cudaError_t { cudaSuccess = 0, cudaErrorStreamCaptureUnsupported = 900, cudaErrorStreamCaptureInvalidated = 901 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaStreamCaptureMode { cudaStreamCaptureModeGlobal };
enum { cudaStreamNonBlocking = 1 };
struct emulated_stream {
  bool capturing = false, invalidated = false;
  std::vector<std::function<void()>> recorded;
};
struct emulated_graph {
  std::vector<std::function<void()>> nodes;
};
using cudaStream_t = emulated_stream*;
using cudaGraph_t = emulated_graph*;
using cudaGraphExec_t = emulated_graph*;
using cudaGraphNode_t = void*;
struct cudaDeviceProp {
  char name[256];
};

namespace cuda_emulation {

struct runtime_state {
  emulated_stream* capturing = nullptr;  // the stream being captured, if any
  cudaError_t last_error = cudaSuccess;
};
inline runtime_state& runtime() {
  static runtime_state r;
  return r;
}

/// Runs `work` now, or records it when `stream` is being captured; fails a capture the call is not part of.
inline cudaError_t enqueue(cudaStream_t stream, std::function<void()> work) {
  runtime_state& r = runtime();
  if (stream != nullptr && stream->capturing) {
    stream->recorded.push_back(std::move(work));
    return cudaSuccess;
  }
  if (r.capturing != nullptr) {  // the legacy stream (or another) during a global capture
    r.capturing->invalidated = true;
    return r.last_error = cudaErrorStreamCaptureInvalidated;
  }
  work();
  return cudaSuccess;
}

/// A call that waits for the device: an error during a capture (which it invalidates).
inline cudaError_t synchronizing_call() {
  runtime_state& r = runtime();
  if (r.capturing == nullptr) return cudaSuccess;
  r.capturing->invalidated = true;
  return r.last_error = cudaErrorStreamCaptureUnsupported;
}

}  // namespace cuda_emulation

inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorStreamCaptureUnsupported ? "operation not permitted when stream is capturing"
                                                                                : "operation failed due to a previous error during capture";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_emulation::runtime().last_error;
  cuda_emulation::runtime().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, std::size_t bytes, cudaStream_t stream = nullptr) {
  return cuda_emulation::enqueue(stream, [=] { std::memset(p, value, bytes); });
}
inline cudaError_t cudaMemcpyAsync(void* to, const void* from, std::size_t bytes, cudaMemcpyKind,
                                   cudaStream_t stream = nullptr) {
  return cuda_emulation::enqueue(stream, [=] { std::memcpy(to, from, bytes); });
}
inline cudaError_t cudaMemcpy(void* to, const void* from, std::size_t bytes, cudaMemcpyKind) {
  if (const cudaError_t e = cuda_emulation::synchronizing_call()) return e;
  std::memcpy(to, from, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, std::size_t bytes) {
  if (const cudaError_t e = cuda_emulation::synchronizing_call()) return e;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cuda_emulation::synchronizing_call(); }
inline cudaError_t cudaDeviceSynchronize() { return cuda_emulation::synchronizing_call(); }
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* properties, int) {
  std::snprintf(properties->name, sizeof properties->name, "%s", "host emulation (tests/cuda_emulation)");
  return cudaSuccess;
}
/// Device memory is host memory, 256-byte aligned as cudaMalloc's.
template <class T>
cudaError_t cudaMalloc(T** p, std::size_t bytes) {
  *p = static_cast<T*>(std::aligned_alloc(256, (std::max<std::size_t>(bytes, 1) + 255) / 256 * 256));
  return cudaSuccess;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  *stream = new emulated_stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  stream->capturing = true;
  stream->invalidated = false;
  stream->recorded.clear();
  cuda_emulation::runtime().capturing = stream;
  return cudaSuccess;
}
inline cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  stream->capturing = false;
  cuda_emulation::runtime().capturing = nullptr;
  *graph = nullptr;
  if (stream->invalidated) return cudaErrorStreamCaptureInvalidated;
  *graph = new emulated_graph{std::move(stream->recorded)};
  stream->recorded.clear();
  return cudaSuccess;
}
inline cudaError_t cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t*, std::size_t* count) {
  *count = graph->nodes.size();
  return cudaSuccess;
}
inline cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = graph;
  return cudaSuccess;
}
inline cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  for (const auto& node : exec->nodes) cuda_emulation::enqueue(stream, node);
  return cudaSuccess;
}
inline cudaError_t cudaGraphExecDestroy(cudaGraphExec_t) { return cudaSuccess; }
inline cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}

namespace cuda_emulation {

}  // namespace cuda_emulation

// Saves the callee-saved registers on the current stack, stores its pointer in *save, switches to the stack `load`
// and restores what was saved there (System V x86-64). A COMDAT section: one copy however many units include this.
extern "C" void cuda_emulation_switch(void** save, void* load);
asm(R"(.pushsection .text.cuda_emulation_switch,"axG",@progbits,cuda_emulation_switch,comdat
.weak cuda_emulation_switch
.type cuda_emulation_switch, @function
cuda_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size cuda_emulation_switch, .-cuda_emulation_switch
.popsection
)");

namespace cuda_emulation {

constexpr std::size_t stack_bytes = 128 * 1024;

struct thread_state {
  void* sp = nullptr;  // the saved stack pointer while switched out
  char* stack = nullptr;
  unsigned index = 0;
  bool done = false;
};

/// Fiber stacks, kept for the next launch (fresh pages each launch would fault in every time).
inline char* stack_for(std::size_t i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() <= i) stacks.emplace_back(new char[stack_bytes]);
  return stacks[i].get();
}

/// The launch in progress: its shape, the block's fibers, and the barrier generations.
struct launch_state {
  dim3 grid, block, block_index;
  std::vector<unsigned char> shared;
  std::vector<thread_state> threads;
  void* scheduler = nullptr;  // the scheduler's saved stack pointer
  unsigned current = 0;
  // Per warp (and, last, the block): threads still running, arrived at the barrier, its generation.
  std::vector<unsigned> alive, arrived, generation;
  std::vector<std::uint64_t> slots;  // [warp][32] exchange slots of the collectives
  std::function<void()> body;
  std::uint64_t progress = 0;  // arrivals, releases and returns: a round of the scheduler without any is a deadlock
};

inline launch_state*& state() {
  static launch_state* s = nullptr;
  return s;
}

inline unsigned char* dynamic_shared() { return state()->shared.data(); }

inline unsigned warps() { return (state()->block.x + 31) / 32; }

/// Waits until every running thread of group g (a warp, or warps() for the block) has arrived.
inline void barrier(unsigned g) {
  launch_state& s = *state();
  const unsigned generation = s.generation[g];
  ++s.progress;
  if (++s.arrived[g] == s.alive[g]) {
    s.arrived[g] = 0;
    ++s.generation[g];
    return;
  }
  while (s.generation[g] == generation) cuda_emulation_switch(&s.threads[s.current].sp, s.scheduler);
}

/// A thread returned: it leaves its warp's and the block's barriers (releasing them if it was the last awaited).
inline void leave(unsigned g) {
  launch_state& s = *state();
  --s.alive[g];
  ++s.progress;
  if (s.alive[g] > 0 && s.arrived[g] == s.alive[g]) {
    s.arrived[g] = 0;
    ++s.generation[g];
  }
}

/// Where a fiber starts (the first switch to it returns here); it never returns: it switches away for good.
inline void fiber_entry() {
  launch_state& s = *state();
  s.body();
  thread_state& t = s.threads[s.current];
  leave(t.index / 32);
  leave(warps());
  t.done = true;
  cuda_emulation_switch(&t.sp, s.scheduler);
  __builtin_unreachable();
}

/// A stack whose first switch enters fiber_entry with the alignment of a call (rsp = 8 mod 16).
inline void* fresh_stack(char* stack) {
  auto top = (reinterpret_cast<std::uintptr_t>(stack) + stack_bytes) & ~std::uintptr_t{15};
  auto* slot = reinterpret_cast<std::uintptr_t*>(top);
  *--slot = 0;                                                // fiber_entry's (absent) return address
  *--slot = reinterpret_cast<std::uintptr_t>(&fiber_entry);  // where cuda_emulation_switch returns to
  for (int r = 0; r < 6; ++r) *--slot = 0;                   // rbp rbx r12 r13 r14 r15
  return slot;
}

inline unsigned thread_index() { return state()->threads[state()->current].index; }

/// Runs `kernel(args...)` on grid x block threads (x and y of the grid, x of the block), `shared` bytes of
/// dynamic shared memory.
template <class... Params, class... Args>
void run(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, Args... args) {
  if (block.x == 0 || block.x > 1024 || block.y != 1 || block.z != 1 || grid.z != 1) {
    throw std::invalid_argument("cuda_emulation::launch: unsupported launch shape");
  }
  if (shared > 48 * 1024) throw std::invalid_argument("cuda_emulation::launch: more than 48 KiB of dynamic shared memory");
  launch_state s;
  s.grid = grid;
  s.block = block;
  s.shared.assign(std::max<std::size_t>(shared, 16), 0xa5);
  s.body = [&] { kernel(static_cast<Params>(args)...); };
  state() = &s;
  s.threads.resize(block.x);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      s.block_index = dim3(bx, by);
      const unsigned w = warps();
      s.alive.assign(w + 1, 0);
      s.arrived.assign(w + 1, 0);
      s.generation.assign(w + 1, 0);
      s.slots.assign(w * 32, 0);
      for (unsigned i = 0; i < block.x; ++i) {
        ++s.alive[i / 32];
        ++s.alive[w];
        thread_state& t = s.threads[i];
        t.index = i;
        t.done = false;
        t.stack = stack_for(i);
        t.sp = fresh_stack(t.stack);
      }
      for (bool running = true; running;) {  // round robin until every fiber returned
        running = false;
        const std::uint64_t before = s.progress;
        for (unsigned i = 0; i < block.x; ++i) {
          if (s.threads[i].done) continue;
          s.current = i;
          cuda_emulation_switch(&s.scheduler, s.threads[i].sp);
          running = running || !s.threads[i].done;
        }
        if (running && s.progress == before) {
          state() = nullptr;
          throw std::logic_error("cuda_emulation::launch: deadlock (a barrier or collective that not every thread reaches)");
        }
      }
    }
  }
  state() = nullptr;
}

/// Launches kernel(args...) on `stream`: runs it now, or records it while the stream is captured.
template <class... Params>
cudaError_t launch(cudaStream_t stream, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared,
                   Params... args) {
  return enqueue(stream, [=] { run(kernel, grid, block, shared, args...); });
}

/// A warp collective: each lane puts `value` in its slot, then reads what `pick(slots, lane)` returns.
template <class T, class Pick>
T exchange(T value, Pick pick) {
  static_assert(sizeof(T) <= sizeof(std::uint64_t), "8 bytes at most");
  launch_state& s = *state();
  const unsigned lane = thread_index() % 32, w = thread_index() / 32;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  s.slots[w * 32 + lane] = bits;
  barrier(w);
  const std::uint64_t* slots = s.slots.data() + w * 32;
  const T result = pick(slots, lane);
  barrier(w);
  return result;
}

template <class T>
T slot_value(const std::uint64_t* slots, unsigned lane) {
  T v;
  std::memcpy(&v, slots + lane, sizeof(T));
  return v;
}

}  // namespace cuda_emulation

// The built-in variables, as functions of the running fiber (macros: the kernels read threadIdx.x and friends).
struct emulated_thread_index {
  unsigned x, y, z;
};
#define threadIdx (emulated_thread_index{::cuda_emulation::thread_index(), 0u, 0u})
#define blockIdx (::cuda_emulation::state()->block_index)
#define blockDim (::cuda_emulation::state()->block)
#define gridDim (::cuda_emulation::state()->grid)

inline void __syncthreads() { cuda_emulation::barrier(cuda_emulation::warps()); }
inline void __syncwarp(unsigned = 0xffffffffu) { cuda_emulation::barrier(cuda_emulation::thread_index() / 32); }

template <class T>
T __shfl_xor_sync(unsigned, T v, int offset, int width = 32) {
  return cuda_emulation::exchange(v, [&](const std::uint64_t* slots, unsigned lane) {
    const unsigned base = lane / width * width, source = lane ^ static_cast<unsigned>(offset);
    return cuda_emulation::slot_value<T>(slots, source / width * width == base ? source : lane);
  });
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  return cuda_emulation::exchange(v, [&](const std::uint64_t* slots, unsigned lane) {
    const unsigned base = lane / width * width;
    return cuda_emulation::slot_value<T>(slots, lane >= base + delta ? lane - delta : lane);
  });
}
inline bool __any_sync(unsigned, bool predicate) {
  return cuda_emulation::exchange(predicate, [](const std::uint64_t* slots, unsigned) {
    for (unsigned i = 0; i < 32; ++i)
      if (cuda_emulation::slot_value<bool>(slots, i)) return true;
    return false;
  });
}
template <class T>
unsigned __match_any_sync(unsigned, T value) {
  return cuda_emulation::exchange(value, [&](const std::uint64_t* slots, unsigned) {
    unsigned mask = 0;
    for (unsigned i = 0; i < 32; ++i)
      if (cuda_emulation::slot_value<T>(slots, i) == value) mask |= 1u << i;
    return mask;
  });
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) {
  unsigned long long old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T min(T a, T b) {
  return b < a ? b : a;
}

// Round-to-nearest arithmetic: the translation unit is compiled with -ffp-contract=off, so nothing is fused.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

// fp16: the device's conversions are round to nearest even; Eigen's host conversion is the same for non-NaN values.
struct __half {
  std::uint16_t bits;
};
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline float __half2float(__half h) {
  return static_cast<float>(Eigen::half(Eigen::half_impl::raw_uint16_to_half(h.bits)));
}
inline __half __float2half_rn(float v) {
  const Eigen::half h(v);
  std::uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return __half{bits};
}
