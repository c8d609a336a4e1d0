// Gating and selection at the memory-bandwidth limit (issue 3). Every family reports bytes/s (the
// activation bytes read per second) and tokens/s, with args (T, d, n[, k]):
//   read_reference_{f32,bf16}  a plain streaming read of the same bytes (XOR of 64-bit words), dispatched
//                              to the same instruction set as the kernels, one 64-byte chunk per step;
//   read_wide_{f32,bf16}       the same with 8 registers per step: the reference is the faster of the two
// Activations are 64-byte aligned, as tensor libraries allocate them (bench/aligned.hpp).
//   grap_top1_{f32,bf16,fp16}  fused GrAP gate -> softmax -> Top-1 (grap_route, k = 1)
//   grap_topk_f32              fused GrAP gate -> softmax -> Top-k
//   dense_top1_f32             dense gate (Eigen GEMM, single thread) -> softmax -> Top-1 (dense_route)
//   scalar_top1_f32            the scalar reference (reference.hpp): GrAP logits, then softmax and Top-1
// All single-threaded. Ratios, not times, are what to read (docs/benchmarks.md): bench/ratios.py runs
// this with repetitions and prints the medians' ratios to read_reference.
#include <locmoe/reference.hpp>
#include <locmoe/select.hpp>

#include "aligned.hpp"

#include <benchmark/benchmark.h>

#include <cstddef>
#include <map>
#include <random>
#include <tuple>
#include <vector>

namespace {

using locmoe::matrix_view;

// Activations: N(0, 1) plus a per-token offset per block, so that the experts' logits differ.
template <class T>
const locmoe_bench::aligned_vector<T>& activations(std::size_t tokens, std::size_t d) {
  static std::map<std::pair<std::size_t, std::size_t>, locmoe_bench::aligned_vector<T>> cache;
  auto& x = cache[{tokens, d}];
  if (x.empty()) {
    x.resize(tokens * d);
    std::mt19937_64 rng(tokens * 1000003u + d);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : x) v = static_cast<T>(normal(rng));
  }
  return x;
}

struct shape {
  std::size_t tokens, d, n, k;
  shape(const benchmark::State& state, bool has_k)
      : tokens(static_cast<std::size_t>(state.range(0))),
        d(static_cast<std::size_t>(state.range(1))),
        n(static_cast<std::size_t>(state.range(2))),
        k(has_k ? static_cast<std::size_t>(state.range(3)) : 1) {}
};

template <class T>
void set_counters(benchmark::State& state, const shape& s) {
  const auto bytes = static_cast<std::int64_t>(s.tokens * s.d * sizeof(T));
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * bytes);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(s.tokens), benchmark::Counter::kIsIterationInvariantRate);
}

template <class T, bool Wide>
void read_reference(benchmark::State& state) {
  const shape s(state, false);
  const auto& x = activations<T>(s.tokens, s.d);
  locmoe::detail::stream_read_kernel::args_type a;
  a.data = reinterpret_cast<const unsigned char*>(x.data());
  a.bytes = x.size() * sizeof(T);
  a.wide = Wide;
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::detail::run<locmoe::detail::stream_read_kernel>(a));
  set_counters<T>(state, s);
  state.SetLabel(locmoe::detail::dispatched_arch_name());
}

template <class T, bool HasK>
void grap_route(benchmark::State& state) {
  const shape s(state, HasK);
  const auto& x = activations<T>(s.tokens, s.d);
  std::vector<locmoe::expert_index> indices(s.tokens * s.k);
  std::vector<float> weights(s.tokens * s.k);
  const locmoe::grap_gate<float> gate{s.d, s.n};
  const matrix_view<const T> xv(x.data(), s.tokens, s.d);
  const locmoe::route_outputs<float> out{{indices.data(), s.tokens, s.k}, {weights.data(), s.tokens, s.k}, {}, {}};
  for (auto _ : state) {
    benchmark::DoNotOptimize(locmoe::grap_route(gate, xv, {s.k, false}, out));
    benchmark::ClobberMemory();
  }
  set_counters<T>(state, s);
}

void dense_top1_f32(benchmark::State& state) {
  const shape s(state, false);
  const auto& x = activations<float>(s.tokens, s.d);
  std::vector<float> weight(s.n * s.d), logits(s.tokens * s.n), weights(s.tokens);
  std::vector<locmoe::expert_index> indices(s.tokens);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  for (auto& w : weight) w = normal(rng);
  const locmoe::dense_gate<float> gate{{weight.data(), s.n, s.d}, nullptr, false};
  const locmoe::route_outputs<float> out{{indices.data(), s.tokens, 1}, {weights.data(), s.tokens, 1}, {},
                                         {logits.data(), s.tokens, s.n}};
  for (auto _ : state) {
    benchmark::DoNotOptimize(locmoe::dense_route(gate, matrix_view<const float>(x.data(), s.tokens, s.d), {1, false}, out));
    benchmark::ClobberMemory();
  }
  set_counters<float>(state, s);
}

void scalar_top1_f32(benchmark::State& state) {
  const shape s(state, false);
  const auto& x = activations<float>(s.tokens, s.d);
  std::vector<float> logits(s.tokens * s.n), weights(s.tokens);
  std::vector<locmoe::expert_index> indices(s.tokens);
  const locmoe::grap_gate<float> gate{s.d, s.n};
  for (auto _ : state) {
    locmoe::reference::grap_logits(gate, matrix_view<const float>(x.data(), s.tokens, s.d),
                                   matrix_view<float>(logits.data(), s.tokens, s.n));
    benchmark::DoNotOptimize(locmoe::reference::select(matrix_view<const float>(logits.data(), s.tokens, s.n), 1,
                                                       true, false, {indices.data(), s.tokens, 1},
                                                       {weights.data(), s.tokens, 1}, {}));
    benchmark::ClobberMemory();
  }
  set_counters<float>(state, s);
}

// (T, d, n[, k]) from the issue.
void shapes(benchmark::internal::Benchmark* b) {
  for (const auto& [d, n] : {std::pair{1024, 8}, std::pair{5120, 16}, std::pair{8192, 64}}) b->Args({16384, d, n});
  b->ArgNames({"T", "d", "n"})->Unit(benchmark::kMillisecond)->UseRealTime();
}
void shapes_k(benchmark::internal::Benchmark* b) {
  for (const auto& [d, n] : {std::pair{1024, 8}, std::pair{5120, 16}, std::pair{8192, 64}})
    for (const int k : {1, 2, 8}) b->Args({16384, d, n, k});
  b->ArgNames({"T", "d", "n", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(read_reference<float, false>)->Name("read_reference_f32")->Apply(shapes);
BENCHMARK(read_reference<locmoe::bf16, false>)->Name("read_reference_bf16")->Apply(shapes);
BENCHMARK(read_reference<locmoe::fp16, false>)->Name("read_reference_fp16")->Apply(shapes);
BENCHMARK(read_reference<float, true>)->Name("read_wide_f32")->Apply(shapes);
BENCHMARK(read_reference<locmoe::bf16, true>)->Name("read_wide_bf16")->Apply(shapes);
BENCHMARK(read_reference<locmoe::fp16, true>)->Name("read_wide_fp16")->Apply(shapes);
BENCHMARK(grap_route<float, false>)->Name("grap_top1_f32")->Apply(shapes);
BENCHMARK(grap_route<locmoe::bf16, false>)->Name("grap_top1_bf16")->Apply(shapes);
BENCHMARK(grap_route<locmoe::fp16, false>)->Name("grap_top1_fp16")->Apply(shapes);
BENCHMARK(grap_route<float, true>)->Name("grap_topk_f32")->Apply(shapes_k);
BENCHMARK(dense_top1_f32)->Apply(shapes);
BENCHMARK(scalar_top1_f32)->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
