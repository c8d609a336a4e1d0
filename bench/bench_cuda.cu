// The CUDA backend's public steps against the device's own limits, in the same binary (CUDA events, manual time).
// Layer: T = 16384, d = 5120, n = 16, k = 2, capacity C = ceil(1.25 T k / n). The pairs are the host's route and
// slots (the library's reference path), passed with their kept counts as grap_pipeline passes them, so dispatch and
// combine_backward also write the padding rows (zeros). Bytes (bytes_per_second and every ratio) count bytes read +
// written, each row once; pair arrays (T k 8 bytes) where read:
//   cuda_grap_top{1,2}/{f32,bf16}    route_grap: x read; indices + weights written (T k 8)          vs read
//   cuda_dense_n{16,128}/f32         route_dense, W [n x d] float, k = 2: x and W read; logits [T x n]
//                                    (required) + T k 8 written                                     vs read
//   cuda_assign_slots/{deferred,synchronous}  on the device's own top-2 route of x: indices read, expert + slot
//                                    and the counts written (0.4 MB: launch latency, not bandwidth); synchronous
//                                    (the default device_checks) includes its wait for the index check   vs copy
//   cuda_dispatch/{f32,bf16}         the rows of x with a kept pair read; n C rows written          vs copy
//   cuda_combine/{f32,bf16}          kept rows + weights read; T rows written                       vs copy
//   cuda_combine_backward/{f32,bf16} grad_y rows (tokens with a kept pair) + kept rows + weights read;
//                                    n C rows of grad_buffer + grad_weight written                  vs copy
//   cuda_dispatch_backward/{f32,bf16} kept rows read; T rows written                                vs copy
// The references, timed in each benchmark right after its kernel:
//   read   the best plain read of x's bytes: 16-byte loads, 4 or 8 independent loads in flight per thread,
//          grid-stride over a grid that fills the device; the faster of the two.
//   copy   the same bytes, half read and half written: the faster of cudaMemcpyAsync device to device and a copy
//          kernel built like the read (16-byte loads, then stores, 4 or 8 in flight per thread).
// Each timed call is queued behind a 100 us wait on the device, so that launch latency is not timed (hold_kernel).
// Counters: of_read (read families); of_memcpy and of_copy (against the faster of memcpy and the copy kernel) for the
// rest; of_peak against the theoretical HBM bandwidth, 2 x memory clock x bus width from the device attributes
// ("peak unknown" at the start, and no of_peak, where the device does not report them). Each run is 100 calls
// (fixed, so that Google Benchmark calls each function once per repetition), each reference 51 calls; ratios are of
// median times, while Google Benchmark's time column is the mean and its bytes_per_second 1024-based. A markdown
// table of every run (GB/s = 1e9 B/s) follows the benchmarks. Targets (issue 6): the gates >= 0.80 of the read
// reference, dispatch and combine >= 0.70 of device memcpy. Exits with a message where there is no GPU.
#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/cuda.cuh>  // (not assign.hpp: nvcc cannot compile Boost.Multiprecision)

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using locmoe::bf16;
using locmoe::cuda_backend;
using locmoe::expert_index;
using locmoe::matrix_view;
using locmoe::slot_index;

constexpr std::size_t tokens = 16384, d = 5120, n = 16, k = 2, dense_max_n = 128;
constexpr std::size_t capacity = (tokens * k * 5 + 4 * n - 1) / (4 * n);  // ceil(T k 1.25 / n)
constexpr std::size_t all_rows = n * capacity;                            // rows of the expert buffer
constexpr unsigned reference_threads = 256;
constexpr int iterations = 100, reference_runs = 51;
constexpr unsigned long long hold_ns = 100000;  // the device waits this long before each timed call (hold_kernel)

int sm_count = 0;
double peak = 0.0;  // theoretical HBM bytes/s; 0: unknown

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}
template <class T>
T* device_alloc(std::size_t count) {  // zeroed
  void* p = nullptr;
  check(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMalloc");
  check(cudaMemset(p, 0, std::max<std::size_t>(count, 1) * sizeof(T)), "cudaMemset");
  return static_cast<T*>(p);
}
template <class T>
T* upload(const std::vector<T>& host) {
  T* p = device_alloc<T>(host.size());
  check(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return p;
}

// ---- The references ----------------------------------------------------------------------------------------------

// Words i, i + stride, ..., i + (unroll - 1) stride: independent 16-byte loads (guarded: those past `words` skipped).
template <int unroll, bool guarded>
__device__ void load_step(const uint4* __restrict__ in, std::size_t i, std::size_t stride, std::size_t words,
                          uint4 (&v)[unroll]) {
#pragma unroll
  for (int u = 0; u < unroll; ++u) {
    v[u] = make_uint4(0, 0, 0, 0);
    if (!guarded || i + u * stride < words) v[u] = in[i + u * stride];
  }
}
template <int unroll>
__device__ unsigned fold(const uint4 (&v)[unroll]) {
  unsigned acc = 0;
#pragma unroll
  for (int u = 0; u < unroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  return acc;
}

// The read: grid-stride over 16-byte words, consecutive threads on consecutive words, `unroll` loads in flight per
// thread; whole steps unguarded, then one guarded step for the rest (fewer than `unroll` words per thread). The XOR
// of all it read is stored only if it equals an arbitrary constant: the loads cannot be dropped, and nothing is
// written in practice.
template <int unroll>
__global__ void __launch_bounds__(reference_threads) read_kernel(const uint4* __restrict__ in, std::size_t words,
                                                                 unsigned* sink) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  uint4 v[unroll];
  for (; i + (unroll - 1) * stride < words; i += unroll * stride) {
    load_step<unroll, false>(in, i, stride, words, v);
    acc ^= fold(v);
  }
  load_step<unroll, true>(in, i, stride, words, v);
  acc ^= fold(v);
  if (acc == 0x9e3779b9u) *sink = acc;
}

// The copy: the read's loop, each step's loads followed by their stores.
template <int unroll>
__global__ void __launch_bounds__(reference_threads) copy_kernel(const uint4* __restrict__ in, uint4* __restrict__ out,
                                                                 std::size_t words) {
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint4 v[unroll];
  for (; i + (unroll - 1) * stride < words; i += unroll * stride) {
    load_step<unroll, false>(in, i, stride, words, v);
#pragma unroll
    for (int u = 0; u < unroll; ++u) out[i + u * stride] = v[u];
  }
  load_step<unroll, true>(in, i, stride, words, v);
#pragma unroll
  for (int u = 0; u < unroll; ++u) {
    if (i + u * stride < words) out[i + u * stride] = v[u];
  }
}

// Blocks that fill the device (resident blocks per SM x SMs), fewer where the words need fewer.
template <class Kernel>
unsigned grid_for(Kernel kernel, std::size_t words) {
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, static_cast<int>(reference_threads), 0), "occupancy");
  const std::size_t full = static_cast<std::size_t>(std::max(per_sm, 1)) * static_cast<std::size_t>(sm_count);
  return static_cast<unsigned>(std::max<std::size_t>(1, std::min(full, (words + reference_threads - 1) / reference_threads)));
}

// The references' memory (zeroed; main allocates scratch_bytes, the most any registered benchmark asks): a source
// at the start, a copy's destination after it, 256-byte aligned like cudaMalloc's.
unsigned char* scratch = nullptr;
std::size_t scratch_bytes = 0;
std::size_t destination_offset(std::size_t words) { return (words * 16 + 255) / 256 * 256; }

// Holds the stream for `ns` nanoseconds (one thread), so that the host has queued the start event, the call and the
// stop event before the device reaches them: the events then time the device's work, not the host's launch latency.
__global__ void hold_kernel(unsigned long long ns) {
  unsigned long long start = 0, now = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < ns);
}

// One event pair (made in main) around one call on the default stream, where every launch here goes.
cudaEvent_t start_event, stop_event;
template <class Launch>
double seconds(Launch& launch) {
  hold_kernel<<<1, 1>>>(hold_ns);
  check(cudaGetLastError(), "hold launch");
  check(cudaEventRecord(start_event), "cudaEventRecord");
  launch();
  check(cudaEventRecord(stop_event), "cudaEventRecord");
  check(cudaEventSynchronize(stop_event), "the timed call");  // also reports a fault of the call
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, start_event, stop_event), "cudaEventElapsedTime");
  return static_cast<double>(ms) * 1e-3;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// bytes / the median time of reference_runs calls, after one untimed call.
template <class Launch>
double rate_of(std::size_t bytes, Launch launch) {
  launch();
  std::vector<double> s;
  for (int r = 0; r < reference_runs; ++r) s.push_back(seconds(launch));
  return static_cast<double>(bytes) / median(s);
}

template <int unroll>
double read_rate(std::size_t words) {  // the sink after the words
  const unsigned blocks = grid_for(read_kernel<unroll>, words);
  return rate_of(words * 16, [&] {
    read_kernel<unroll><<<blocks, reference_threads>>>(reinterpret_cast<const uint4*>(scratch), words,
                                                        reinterpret_cast<unsigned*>(scratch + words * 16));
    check(cudaGetLastError(), "read reference launch");
  });
}
// The read reference for `bytes` (rounded down to 16-byte words), bytes/s.
double read_reference(std::size_t bytes) { return std::max(read_rate<4>(bytes / 16), read_rate<8>(bytes / 16)); }

template <int unroll>
double copy_kernel_rate(std::size_t words) {
  const unsigned blocks = grid_for(copy_kernel<unroll>, words);
  return rate_of(2 * words * 16, [&] {
    copy_kernel<unroll><<<blocks, reference_threads>>>(reinterpret_cast<const uint4*>(scratch),
                                                        reinterpret_cast<uint4*>(scratch + destination_offset(words)), words);
    check(cudaGetLastError(), "copy reference launch");
  });
}
struct copy_rates {
  double memcpy = 0.0, kernel = 0.0;  // bytes/s
};
// The copy references for `bytes` of traffic: half read, half written (rounded down to 16-byte words).
copy_rates copy_reference(std::size_t bytes) {
  const std::size_t words = bytes / 2 / 16;
  copy_rates r;
  r.memcpy = rate_of(2 * words * 16, [&] {
    check(cudaMemcpyAsync(scratch + destination_offset(words), scratch, words * 16, cudaMemcpyDeviceToDevice), "memcpy");
  });
  r.kernel = std::max(copy_kernel_rate<4>(words), copy_kernel_rate<8>(words));
  return r;
}

// ---- The layer ---------------------------------------------------------------------------------------------------

struct layer_state {
  expert_index* expert = nullptr;  // the host's pairs [T k], uploaded
  slot_index* slot = nullptr;
  std::int64_t* kept_per_expert = nullptr;  // [n]
  float *weights = nullptr, *grad_weight = nullptr;  // [T k]
  expert_index* route_indices = nullptr;  // [T k] the device's top-2 route of x: assign_slots' input
  expert_index* out_indices = nullptr;  // [T k] written by the routes
  float* out_weights = nullptr;
  expert_index* slot_expert = nullptr;  // [T k] written by assign_slots, with its counts [n]
  slot_index* slot_slot = nullptr;
  std::int64_t *slot_routed = nullptr, *slot_kept = nullptr;
  unsigned char *slot_workspace = nullptr, *dense_workspace = nullptr;
  std::size_t slot_workspace_bytes = 0, dense_workspace_bytes = 0;
  float *dense_weight = nullptr, *dense_logits = nullptr;  // W [dense_max_n x d] (n = 16: its first rows), [T x n]
  std::size_t kept = 0, tokens_kept = 0;  // kept pairs; tokens with at least one

  locmoe::pair_layout pairs() const {
    locmoe::pair_layout p{expert, slot, tokens, k, capacity};
    p.kept_per_expert = kept_per_expert;  // padding rows written as zeros, as grap_pipeline asks
    p.experts = n;
    return p;
  }
} layer;

template <class T>
struct layer_rows {
  T *x = nullptr, *buffer = nullptr, *y = nullptr, *grad_buffer = nullptr;  // [T d], [n C d], [T d], [n C d]
};
template <class T>
layer_rows<T> rows;

template <class T>
void make_rows(const std::vector<float>& x) {
  std::vector<T> hx(x.size());
  for (std::size_t i = 0; i < hx.size(); ++i) hx[i] = T(x[i]);
  rows<T>.x = upload(hx);
  rows<T>.buffer = device_alloc<T>(all_rows * d);
  rows<T>.y = device_alloc<T>(tokens * d);
  rows<T>.grad_buffer = device_alloc<T>(all_rows * d);
}

void make_layer() {
  layer_state& l = layer;
  std::vector<float> hx(tokens * d), hW(dense_max_n * d);
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : hx) v = normal(rng);
  for (float& v : hW) v = 0.01f * normal(rng);
  std::vector<expert_index> indices(tokens * k), he(tokens * k);
  std::vector<slot_index> hs(tokens * k);
  std::vector<float> hw(tokens * k);
  locmoe::grap_route(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(hx.data(), tokens, d),
                     locmoe::select_options{k, false},
                     locmoe::route_outputs<float>{{indices.data(), tokens, k}, {hw.data(), tokens, k}, {}, {}});
  locmoe::thread_pool pool(1);
  const locmoe::cpu_backend cpu(pool);
  std::vector<std::int64_t> routed(n), kept(n);
  std::vector<unsigned char> ws(cpu.slot_workspace_size(tokens, n));
  cpu.assign_slots({{indices.data(), tokens, k}, {he.data(), tokens, k}, {hs.data(), tokens, k}, routed.data(), kept.data(),
                    n, static_cast<std::int64_t>(capacity)},
                   ws.data(), ws.size());
  for (const std::int64_t c : kept) l.kept += static_cast<std::size_t>(c);
  for (std::size_t t = 0; t < tokens; ++t) {
    l.tokens_kept += std::any_of(&he[t * k], &he[t * k] + k, [](expert_index e) { return e != locmoe::no_expert; });
  }
  l.expert = upload(he);
  l.slot = upload(hs);
  l.kept_per_expert = upload(kept);
  l.weights = upload(hw);
  l.grad_weight = device_alloc<float>(tokens * k);
  l.route_indices = device_alloc<expert_index>(tokens * k);
  l.out_indices = device_alloc<expert_index>(tokens * k);
  l.out_weights = device_alloc<float>(tokens * k);
  l.slot_expert = device_alloc<expert_index>(tokens * k);
  l.slot_slot = device_alloc<slot_index>(tokens * k);
  l.slot_routed = device_alloc<std::int64_t>(n);
  l.slot_kept = device_alloc<std::int64_t>(n);
  const cuda_backend gpu;
  l.slot_workspace_bytes = gpu.slot_workspace_size(tokens, n);
  l.slot_workspace = device_alloc<unsigned char>(l.slot_workspace_bytes);
  l.dense_workspace_bytes = std::max(gpu.route_workspace_size<float>(tokens, n), gpu.route_workspace_size<float>(tokens, dense_max_n));
  l.dense_workspace = device_alloc<unsigned char>(l.dense_workspace_bytes);
  l.dense_weight = upload(hW);
  l.dense_logits = device_alloc<float>(tokens * dense_max_n);
  make_rows<float>(hx);
  make_rows<bf16>(hx);
  // assign_slots' input: the device's own top-2 route of x, compared with the host's (a first sanity check).
  gpu.route_grap(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(rows<float>.x, tokens, d),
                 locmoe::select_options{k, false},
                 locmoe::route_outputs<float>{{l.route_indices, tokens, k}, {l.out_weights, tokens, k}, {}, {}});
  check(cudaDeviceSynchronize(), "route_grap (setup)");
  std::vector<expert_index> device_indices(tokens * k);
  check(cudaMemcpy(device_indices.data(), l.route_indices, tokens * k * sizeof(expert_index), cudaMemcpyDeviceToHost),
        "download");
  std::size_t same = 0;
  for (std::size_t i = 0; i < indices.size(); ++i) same += device_indices[i] == indices[i];
  std::printf("layer: T %zu, d %zu, n %zu, k %zu, C %zu; %zu pairs kept, %zu tokens with one; the device's top-2 route "
              "= the host's on %zu of %zu choices\n",
              tokens, d, n, k, capacity, l.kept, l.tokens_kept, same, indices.size());
}

// ---- Measuring ---------------------------------------------------------------------------------------------------

enum class against { read, copy };

struct result {
  std::string name, reference_name;
  double rate = 0.0, reference = 0.0, memcpy = 0.0;  // bytes/s
};
std::vector<result> results;

// Times `launch` (after one untimed call), then its reference; sets the counters and records the result.
// read_bytes: what the read reference reads (the copy reference moves `bytes`).
template <class Launch>
void measure(benchmark::State& state, const std::string& name, std::size_t bytes, against ref, std::size_t read_bytes,
             Launch launch) {
  try {
    launch();
    check(cudaDeviceSynchronize(), "the first call");
    std::vector<double> times;
    for (auto _ : state) {
      times.push_back(seconds(launch));
      state.SetIterationTime(times.back());
    }
    if (times.empty()) return;
    state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
    result r{name, "read", static_cast<double>(bytes) / median(times)};
    if (ref == against::read) {
      r.reference = read_reference(read_bytes);
      state.counters["of_read"] = r.rate / r.reference;
    } else {
      const copy_rates c = copy_reference(bytes);
      r.reference_name = c.memcpy >= c.kernel ? "memcpy" : "copy kernel";
      r.reference = std::max(c.memcpy, c.kernel);
      r.memcpy = c.memcpy;
      state.counters["of_memcpy"] = r.rate / c.memcpy;
      state.counters["of_copy"] = r.rate / r.reference;
    }
    if (peak > 0.0) state.counters["of_peak"] = r.rate / peak;
    results.push_back(r);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// Registers a benchmark that times call(gpu).
template <class Call>
void add(const std::string& name, std::size_t bytes, against ref, std::size_t read_bytes, Call call) {
  scratch_bytes = std::max(scratch_bytes, std::max(bytes, read_bytes) + 512);  // read: the sink; copy: the alignment
  benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& state) {
    const cuda_backend gpu;
    measure(state, name, bytes, ref, read_bytes, [&] { call(gpu); });
  })->UseManualTime()->Iterations(iterations)->Unit(benchmark::kMicrosecond);
}

template <class T>
const char* type_name() { return std::is_same_v<T, float> ? "/f32" : "/bf16"; }

template <class T>
void add_routes() {
  const std::size_t x_bytes = tokens * d * sizeof(T);
  for (const std::size_t top : {std::size_t{1}, std::size_t{2}}) {
    add("cuda_grap_top" + std::to_string(top) + type_name<T>(), x_bytes + tokens * top * 8, against::read, x_bytes,
        [top](const cuda_backend& gpu) {
          gpu.route_grap(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const T>(rows<T>.x, tokens, d),
                         locmoe::select_options{top, false},
                         locmoe::route_outputs<float>{{layer.out_indices, tokens, top}, {layer.out_weights, tokens, top}, {}, {}});
        });
  }
}

void add_dense_routes() {
  const std::size_t x_bytes = tokens * d * sizeof(float);
  for (const std::size_t experts : {n, dense_max_n}) {
    add("cuda_dense_n" + std::to_string(experts) + "/f32", x_bytes + experts * (d + tokens) * 4 + tokens * k * 8,
        against::read, x_bytes, [experts](const cuda_backend& gpu) {
          gpu.route_dense(locmoe::dense_gate<float>{matrix_view<const float>(layer.dense_weight, experts, d), nullptr, false},
                          matrix_view<const float>(rows<float>.x, tokens, d), locmoe::select_options{k, false},
                          locmoe::route_outputs<float>{{layer.out_indices, tokens, k},
                                                       {layer.out_weights, tokens, k},
                                                       {},
                                                       {layer.dense_logits, tokens, experts}},
                          layer.dense_workspace, layer.dense_workspace_bytes);
        });
  }
}

void add_assign_slots() {
  for (const locmoe::device_checks checks : {locmoe::device_checks::deferred, locmoe::device_checks::synchronous}) {
    const bool deferred = checks == locmoe::device_checks::deferred;
    add(deferred ? "cuda_assign_slots/deferred" : "cuda_assign_slots/synchronous", tokens * k * 4 * 3 + n * 8 * 2,
        against::copy, 0, [checks](const cuda_backend&) {
          cuda_backend(checks).assign_slots({{layer.route_indices, tokens, k}, {layer.slot_expert, tokens, k},
                                             {layer.slot_slot, tokens, k}, layer.slot_routed, layer.slot_kept, n,
                                             static_cast<std::int64_t>(capacity)},
                                            layer.slot_workspace, layer.slot_workspace_bytes);
        });
  }
}

template <class T>
void add_rows() {
  const std::size_t row = d * sizeof(T), pair_bytes = tokens * k * 8, kept = layer.kept;
  const std::size_t used = layer.tokens_kept;  // rows of x (grad_y) that some kept pair reads
  add(std::string("cuda_dispatch") + type_name<T>(), (used + all_rows) * row + pair_bytes + n * 8, against::copy, 0,
      [](const cuda_backend& gpu) {
        gpu.dispatch(layer.pairs(), matrix_view<const T>(rows<T>.x, tokens, d), matrix_view<T>(rows<T>.buffer, all_rows, d));
      });
  add(std::string("cuda_combine") + type_name<T>(), (kept + tokens) * row + pair_bytes + tokens * k * 4, against::copy, 0,
      [](const cuda_backend& gpu) {
        gpu.combine(layer.pairs(), matrix_view<const T>(rows<T>.buffer, all_rows, d),
                    matrix_view<const float>(layer.weights, tokens, k), matrix_view<T>(rows<T>.y, tokens, d));
      });
  add(std::string("cuda_combine_backward") + type_name<T>(),
      (used + kept + all_rows) * row + pair_bytes + tokens * k * 8 + n * 8, against::copy, 0, [](const cuda_backend& gpu) {
        gpu.combine_backward(layer.pairs(), matrix_view<const T>(rows<T>.buffer, all_rows, d),
                             matrix_view<const float>(layer.weights, tokens, k), matrix_view<const T>(rows<T>.y, tokens, d),
                             matrix_view<T>(rows<T>.grad_buffer, all_rows, d),
                             matrix_view<float>(layer.grad_weight, tokens, k));
      });
  add(std::string("cuda_dispatch_backward") + type_name<T>(), (kept + tokens) * row + pair_bytes, against::copy, 0,
      [](const cuda_backend& gpu) {
        gpu.dispatch_backward(layer.pairs(), matrix_view<const T>(rows<T>.grad_buffer, all_rows, d),
                              matrix_view<T>(rows<T>.y, tokens, d));
      });
}

void print_summary() {
  if (results.empty()) return;
  std::printf("\n| kernel | GB/s | reference | ref GB/s | of ref | of memcpy | of peak |\n|---|---|---|---|---|---|---|\n");
  for (const result& r : results) {
    char of_memcpy[32] = "-", of_peak[32] = "-";
    if (r.memcpy > 0.0) std::snprintf(of_memcpy, sizeof of_memcpy, "%.3f", r.rate / r.memcpy);
    if (peak > 0.0) std::snprintf(of_peak, sizeof of_peak, "%.3f", r.rate / peak);
    std::printf("| %s | %.1f | %s | %.1f | %.3f | %s | %s |\n", r.name.c_str(), r.rate / 1e9, r.reference_name.c_str(),
                r.reference / 1e9, r.rate / r.reference, of_memcpy, of_peak);
  }
}

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("locmoe_bench_cuda: no CUDA device; nothing to measure\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  try {
    int device = 0;
    check(cudaGetDevice(&device), "cudaGetDevice");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    sm_count = prop.multiProcessorCount;
    int khz = 0, bits = 0;  // peak = 2 (double data rate) x memory clock x bus width
    if (cudaDeviceGetAttribute(&khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess &&
        cudaDeviceGetAttribute(&bits, cudaDevAttrGlobalMemoryBusWidth, device) == cudaSuccess && khz > 0 && bits > 0) {
      peak = 2.0 * khz * 1e3 * bits / 8.0;
    }
    static_cast<void>(cudaGetLastError());  // a failed query must not surface at the backend's next launch check
    if (peak > 0.0) {
      std::printf("device: %s, %d SMs; peak HBM %.1f GB/s (memory clock %d kHz, bus %d bits)\n", prop.name, sm_count,
                  peak / 1e9, khz, bits);
    } else {
      std::printf("device: %s, %d SMs; peak unknown\n", prop.name, sm_count);
    }
    make_layer();
    add_routes<float>();
    add_routes<bf16>();
    add_dense_routes();
    add_assign_slots();
    add_rows<float>();
    add_rows<bf16>();
    scratch = device_alloc<unsigned char>(scratch_bytes);
    check(cudaEventCreate(&start_event), "cudaEventCreate");
    check(cudaEventCreate(&stop_event), "cudaEventCreate");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "locmoe_bench_cuda: setup failed: %s\n", e.what());
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_summary();
  return 0;
}
