// The CUDA backend against the device's own limits, in the same binary (times from CUDA events, manual time):
//   cuda_grap_top1        route_grap, top-1: T d 4 bytes read      vs  cuda_read_reference: a kernel that reads
//                                                                       the same bytes (a sum per warp) and writes one
//                                                                       float per token
//   cuda_dispatch         dispatch of the kept pairs                vs  cuda_memcpy_dispatch: cudaMemcpyAsync of the
//                                                                       same bytes, device to device
//   cuda_combine          combine                                   vs  cuda_memcpy_combine: the same, combine's bytes
// Args (T, d, n, k); the layer: T = 16384, d = 5120, n = 16, k = 2 (k = 1 for the gate). bytes_per_second counts
// bytes read + written in every family. Targets (issue 6): gate >= 0.80 of the read reference, dispatch and
// combine >= 0.70 of memcpy. Exits with a message where there is no GPU.
#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/cuda.cuh>  // (not assign.hpp: nvcc cannot compile Boost.Multiprecision)

#include <benchmark/benchmark.h>

#include <cstdio>
#include <random>
#include <vector>

namespace {

using locmoe::matrix_view;

constexpr std::size_t tokens = 16384, d = 5120, n = 16, k = 2;

struct device_layer {
  float *x = nullptr, *buffer = nullptr, *y = nullptr, *weights = nullptr, *scratch = nullptr, *sink = nullptr;
  locmoe::expert_index *expert = nullptr, *top = nullptr;
  locmoe::slot_index* slot = nullptr;
  std::size_t capacity = 0, kept = 0;

  device_layer() {
    std::vector<float> hx(tokens * d);
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : hx) v = normal(rng);
    // Choices and slots on the host (the library's reference path), then uploaded.
    std::vector<locmoe::expert_index> indices(tokens * k), he(tokens * k);
    std::vector<locmoe::slot_index> hs(tokens * k);
    std::vector<float> hw(tokens * k);
    locmoe::grap_route(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(hx.data(), tokens, d),
                       locmoe::select_options{k, false},
                       locmoe::route_outputs<float>{{indices.data(), tokens, k}, {hw.data(), tokens, k}, {}, {}});
    capacity = (tokens * k * 5 + 4 * n - 1) / (4 * n);  // ceil(T k 1.25 / n)
    locmoe::thread_pool pool(1);
    const locmoe::cpu_backend cpu(pool);
    std::vector<std::int64_t> routed(n), kept_per_expert(n);
    std::vector<unsigned char> ws(cpu.slot_workspace_size(tokens, n));
    cpu.assign_slots({{indices.data(), tokens, k}, {he.data(), tokens, k}, {hs.data(), tokens, k}, routed.data(),
                      kept_per_expert.data(), n, static_cast<std::int64_t>(capacity)},
                     ws.data(), ws.size());
    for (const std::int64_t c : kept_per_expert) kept += static_cast<std::size_t>(c);
    using locmoe::cuda_detail::check;
    check(cudaMalloc(&x, hx.size() * sizeof(float)), "malloc");
    check(cudaMalloc(&buffer, n * capacity * d * sizeof(float)), "malloc");
    check(cudaMalloc(&y, tokens * d * sizeof(float)), "malloc");
    check(cudaMalloc(&scratch, 4 * tokens * d * sizeof(float)), "malloc");  // two halves of 2 T d
    check(cudaMalloc(&sink, tokens * sizeof(float)), "malloc");
    check(cudaMalloc(&weights, tokens * k * sizeof(float)), "malloc");
    check(cudaMalloc(&expert, tokens * k * sizeof(locmoe::expert_index)), "malloc");
    check(cudaMalloc(&top, tokens * sizeof(locmoe::expert_index)), "malloc");
    check(cudaMalloc(&slot, tokens * k * sizeof(locmoe::slot_index)), "malloc");
    check(cudaMemcpy(x, hx.data(), hx.size() * sizeof(float), cudaMemcpyHostToDevice), "copy");
    check(cudaMemcpy(weights, hw.data(), hw.size() * sizeof(float), cudaMemcpyHostToDevice), "copy");
    check(cudaMemcpy(expert, he.data(), he.size() * sizeof(locmoe::expert_index), cudaMemcpyHostToDevice), "copy");
    check(cudaMemcpy(slot, hs.data(), hs.size() * sizeof(locmoe::slot_index), cudaMemcpyHostToDevice), "copy");
  }
  locmoe::pair_layout pairs() const { return {expert, slot, tokens, k, capacity}; }
};

device_layer& layer() {
  static device_layer l;
  return l;
}

__global__ void read_reference_kernel(const float* x, std::size_t rows, std::size_t d, float* out) {
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  if (t >= rows) return;
  float sum = 0.0f;
  for (std::size_t c = threadIdx.x % 32; c < d; c += 32) sum += x[t * d + c];
  for (int o = 16; o > 0; o /= 2) sum += __shfl_down_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) out[t] = sum;
}

// Times `launch` with CUDA events: one untimed call, then one event pair per iteration.
template <class Launch>
void timed(benchmark::State& state, std::size_t bytes, Launch launch) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  launch();
  for (auto _ : state) {
    cudaEventRecord(start);
    launch();
    cudaEventRecord(stop);
    cudaEventSynchronize(stop);
    float ms = 0;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(ms / 1e3);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

void cuda_grap_top1(benchmark::State& state) {
  device_layer& l = layer();
  const locmoe::cuda_backend gpu;
  timed(state, tokens * d * sizeof(float), [&] {
    gpu.route_grap(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(l.x, tokens, d),
                   locmoe::select_options{1, false},
                   locmoe::route_outputs<float>{{l.top, tokens, 1}, {l.sink, tokens, 1}, {}, {}});
  });
}
void cuda_read_reference(benchmark::State& state) {
  device_layer& l = layer();
  timed(state, tokens * d * sizeof(float), [&] { read_reference_kernel<<<tokens / 4, 128>>>(l.x, tokens, d, l.sink); });
}
void cuda_dispatch(benchmark::State& state) {
  device_layer& l = layer();
  const locmoe::cuda_backend gpu;
  timed(state, 2 * l.kept * d * sizeof(float), [&] {
    gpu.dispatch(l.pairs(), matrix_view<const float>(l.x, tokens, d), matrix_view<float>(l.buffer, n * l.capacity, d));
  });
}
void cuda_memcpy_dispatch(benchmark::State& state) {
  device_layer& l = layer();
  timed(state, 2 * l.kept * d * sizeof(float),
        [&] { cudaMemcpyAsync(l.scratch + 2 * tokens * d, l.scratch, l.kept * d * sizeof(float), cudaMemcpyDeviceToDevice); });
}
void cuda_combine(benchmark::State& state) {
  device_layer& l = layer();
  const locmoe::cuda_backend gpu;
  timed(state, (l.kept + tokens) * d * sizeof(float), [&] {
    gpu.combine(l.pairs(), matrix_view<const float>(l.buffer, n * l.capacity, d), matrix_view<const float>(l.weights, tokens, k),
                matrix_view<float>(l.y, tokens, d));
  });
}
void cuda_memcpy_combine(benchmark::State& state) {
  device_layer& l = layer();
  timed(state, (l.kept + tokens) * d * sizeof(float),
        [&] {
          cudaMemcpyAsync(l.scratch + 2 * tokens * d, l.scratch, (l.kept + tokens) * d * sizeof(float) / 2, cudaMemcpyDeviceToDevice);
        });
}

}  // namespace

BENCHMARK(cuda_grap_top1)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cuda_read_reference)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cuda_dispatch)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cuda_memcpy_dispatch)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cuda_combine)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(cuda_memcpy_combine)->UseManualTime()->Unit(benchmark::kMicrosecond);

int main(int argc, char** argv) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("locmoe_bench_cuda: no CUDA device; nothing to measure\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
