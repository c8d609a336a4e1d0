// The CPU backend's steps on a thread_pool, against the same step on one thread in the same binary.
// Args (T, d, n, threads); the layer: T = 16384 tokens, d = 5120, n = 16 experts, top-1 (GrAP) and top-2
// (dispatch/combine), float activations N(0, 1). threads = 1 is the single-threaded baseline (the pool runs
// everything on the calling thread). Families, with bytes_per_second = bytes read + written:
//   cpu_backend_grap_top1   route_grap: x read once (T d 4 bytes), choices written
//   cpu_backend_dispatch    dispatch of the kept pairs (capacity factor 1.25, position slots): rows read + written
//   cpu_backend_combine     combine: kept rows read, T rows written
// bench/backend_speedup.py prints each family's bytes/s at 2 threads over 1 thread (the target: >= 1.8x
// on 2 cores). Buffers are allocated and touched once per shape, outside the timing loop; one untimed call first.
#include <locmoe/assign.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/capacity.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <tuple>
#include <vector>

namespace {

using locmoe::matrix_view;

struct layer {
  std::size_t tokens, d, n, k = 2;
  std::int64_t capacity;
  std::vector<float> x, buffer, y, weights, probabilities;
  std::vector<locmoe::expert_index> indices, expert;
  std::vector<locmoe::slot_index> slot;

  layer(std::size_t tokens_, std::size_t d_, std::size_t n_)
      : tokens(tokens_), d(d_), n(n_),
        capacity(locmoe::classic_capacity(static_cast<std::int64_t>(tokens_) * 2, 1.25, 1, static_cast<std::int64_t>(n_))),
        x(tokens * d), buffer(n * static_cast<std::size_t>(capacity) * d, 0.0f), y(tokens * d, 0.0f), weights(tokens * k),
        probabilities(tokens * n), indices(tokens * k), expert(tokens * k), slot(tokens * k) {
    std::mt19937_64 rng(tokens * 7 + d);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (float& v : x) v = normal(rng);
    // Top-2 through the GrAP gate, position slots: the pairs dispatch and combine move.
    locmoe::grap_route(locmoe::grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(x.data(), tokens, d),
                       locmoe::select_options{k, false},
                       locmoe::route_outputs<float>{{indices.data(), tokens, k}, {weights.data(), tokens, k}, {}, {}});
    locmoe::capacity_options o;
    o.capacity = capacity;
    locmoe::capacity_assigner<float> assigner(n, o);
    std::vector<float> kept_weight(tokens * k);
    assigner.run(matrix_view<const locmoe::expert_index>(indices.data(), tokens, k),
                 matrix_view<const float>(weights.data(), tokens, k),
                 {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_weight.data(), tokens, k}});
  }
  locmoe::pair_layout pairs() const {
    return {expert.data(), slot.data(), tokens, k, static_cast<std::size_t>(capacity)};
  }
  std::size_t kept() const {
    std::size_t c = 0;
    for (const auto e : expert) c += e != locmoe::no_expert;
    return c;
  }
};

layer& shared_layer(std::size_t tokens, std::size_t d, std::size_t n) {
  static std::map<std::tuple<std::size_t, std::size_t, std::size_t>, std::unique_ptr<layer>> layers;
  auto& l = layers[{tokens, d, n}];
  if (!l) l = std::make_unique<layer>(tokens, d, n);
  return *l;
}

struct setup {
  layer& l;
  locmoe::thread_pool pool;
  locmoe::cpu_backend cpu;
  explicit setup(const benchmark::State& state)
      : l(shared_layer(static_cast<std::size_t>(state.range(0)), static_cast<std::size_t>(state.range(1)),
                       static_cast<std::size_t>(state.range(2)))),
        pool(static_cast<std::size_t>(state.range(3))),
        cpu(pool) {}
};

void cpu_backend_grap_top1(benchmark::State& state) {
  setup s(state);
  layer& l = s.l;
  std::vector<locmoe::expert_index> top(l.tokens);
  std::vector<float> w(l.tokens);
  const locmoe::grap_gate<float> gate{l.d, l.n, true, nullptr};
  const auto run = [&] {
    return s.cpu.route_grap(gate, matrix_view<const float>(l.x.data(), l.tokens, l.d), locmoe::select_options{1, false},
                            locmoe::route_outputs<float>{{top.data(), l.tokens, 1}, {w.data(), l.tokens, 1}, {}, {}});
  };
  run();
  for (auto _ : state) benchmark::DoNotOptimize(run());
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>(l.tokens * (l.d * sizeof(float) + sizeof(float) + sizeof(locmoe::expert_index))));
}

void cpu_backend_dispatch(benchmark::State& state) {
  setup s(state);
  layer& l = s.l;
  const std::size_t rows = l.buffer.size() / l.d;
  const auto run = [&] {
    s.cpu.dispatch(l.pairs(), matrix_view<const float>(l.x.data(), l.tokens, l.d), matrix_view<float>(l.buffer.data(), rows, l.d));
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(2 * l.kept() * l.d * sizeof(float)));
}

void cpu_backend_combine(benchmark::State& state) {
  setup s(state);
  layer& l = s.l;
  const std::size_t rows = l.buffer.size() / l.d;
  const auto run = [&] {
    s.cpu.combine(l.pairs(), matrix_view<const float>(l.buffer.data(), rows, l.d),
                  matrix_view<const float>(l.weights.data(), l.tokens, l.k), matrix_view<float>(l.y.data(), l.tokens, l.d));
  };
  run();
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) *
                          static_cast<std::int64_t>((l.kept() + l.tokens) * l.d * sizeof(float)));
}

void shapes(benchmark::internal::Benchmark* b) {
  for (const int threads : {1, 2}) b->Args({16384, 5120, 16, threads});
  b->ArgNames({"T", "d", "n", "threads"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(cpu_backend_grap_top1)->Apply(shapes);
BENCHMARK(cpu_backend_dispatch)->Apply(shapes);
BENCHMARK(cpu_backend_combine)->Apply(shapes);

BENCHMARK_MAIN();
