// One layer's routing work per training step, forward and backward, through moe_router on one thread: gate (GrAP),
// selection (softmax, Top-k), capacity (factor 1.25, position policy), the losses (aux 0.01, z 1e-3, locality 0.01
// on topology::uniform(16, 8, n), this rank 0), dispatch into the [n C x d] buffer, combine, combine_backward,
// dispatch_backward, and the router's backward to dL/dx (the experts excluded: the buffer goes straight to combine).
// Family layer_step_{f32,bf16}, args (T, d, n, k); items_per_second = tokens/s. Activations 64-byte aligned.
// bench/layer_vs_torch.py compares it with the same step in PyTorch (bench/torch_layer.py).
#include <locmoe/router.hpp>

#include "aligned.hpp"

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <random>

namespace {

using locmoe::matrix_view;

template <class T>
void layer_step(benchmark::State& state) {
  const auto tokens = static_cast<std::size_t>(state.range(0)), d = static_cast<std::size_t>(state.range(1)),
             n = static_cast<std::size_t>(state.range(2)), k = static_cast<std::size_t>(state.range(3));
  const locmoe::topology topo = locmoe::topology::uniform(16, 8, static_cast<std::int64_t>(n));
  locmoe::moe_router_options o;
  o.hidden = d;
  o.experts = n;
  o.top_k = k;
  o.capacity_factor = 1.25;
  o.aux_coeff = 0.01;
  o.z_coeff = 1e-3;
  o.locality_coeff = 0.01;
  o.topo = &topo;
  locmoe::thread_pool pool(1);
  const locmoe::cpu_backend cpu(pool);
  locmoe::moe_router<> router(cpu, o);
  locmoe_bench::aligned_vector<T> x(tokens * d), dy(tokens * d), y(tokens * d), dx(tokens * d);
  std::mt19937_64 rng(tokens * 31 + n);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (auto& v : x) v = T(normal(rng));
  for (auto& v : dy) v = T(normal(rng) * 1e-3f);
  const matrix_view<const T> xv(x.data(), tokens, d);
  locmoe_bench::aligned_vector<T> buffer, grad_buffer;
  const auto step = [&] {
    const locmoe::routing<float>& r = router.forward(xv, {});
    const std::size_t rows = r.buffer_rows;
    if (buffer.size() < rows * d) buffer.resize(rows * d), grad_buffer.resize(rows * d);
    router.dispatch(xv, matrix_view<T>(buffer.data(), rows, d));
    router.combine(matrix_view<const T>(buffer.data(), rows, d), matrix_view<T>(y.data(), tokens, d));
    router.combine_backward(matrix_view<const T>(buffer.data(), rows, d), matrix_view<const T>(dy.data(), tokens, d),
                            matrix_view<T>(grad_buffer.data(), rows, d));
    router.dispatch_backward(matrix_view<const T>(grad_buffer.data(), rows, d), matrix_view<T>(dx.data(), tokens, d));
    router.backward(xv, {}, matrix_view<T>(dx.data(), tokens, d), locmoe::gate_gradients<float>{});
  };
  step();  // warm-up: buffers sized
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(tokens));
}

void shapes(benchmark::internal::Benchmark* b) {
  for (const int n : {16, 64})
    for (const int k : {1, 2}) b->Args({16384, 5120, n, k});
  b->ArgNames({"T", "d", "n", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(layer_step<float>)->Name("layer_step_f32")->Apply(shapes);
BENCHMARK(layer_step<locmoe::bf16>)->Name("layer_step_bf16")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
