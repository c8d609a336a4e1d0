// The CPU dispatch and combine of dispatch.hpp against a plain memcpy of the same bytes, single-threaded.
// Args (T, d, n, k); the layer: T = 16384 tokens, d = 5120, n = 16 experts, k in {1, 2}; choices from
// score_route on N(0, 1) logits (softmax, Top-k), kept by capacity_assigner (capacity factor 1.25, drop policy
// position) with topology::uniform(16, 8, n); token ranks in contiguous blocks.
// Families (bytes_per_second counts bytes read + bytes written, the same way in every family):
//   plan_build               build_dispatch_plan on the assignment; items_per_second = tokens/s
//   dispatch_{f32,bf16}      dispatch(plan, x, buffer): kept rows * d * sizeof(T) read and as many written
//   memcpy_dispatch_{f32,bf16}  std::memcpy of one contiguous block of kept rows * d * sizeof(T) bytes
//   combine_f32              combine(plan, buffer, weight, y): kept rows read, T rows written (float)
//   memcpy_combine_f32       std::memcpy of (read + written) / 2 bytes: the same traffic as combine
// bench/dispatch_ratios.py prints each family's median bytes/s over its memcpy's.
// Every array is allocated and touched once per (k) and shared by the families, outside the timing loop; each
// run starts with one untimed call (on this VM the first pass over freshly zeroed memory ran up to 10x slower).
#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <benchmark/benchmark.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace {

using locmoe::matrix_view;

constexpr std::int64_t ranks = 16, ranks_per_node = 8;

// One layer's routing, plan and activations for a shape (T, d, n, k).
struct layer {
  std::size_t tokens, d, n, k, rows;  // rows: of the [n C x d] expert buffer
  locmoe::topology topo;
  std::vector<locmoe::expert_index> expert;
  std::vector<locmoe::slot_index> slot;
  std::vector<float> kept_weight;
  std::int64_t capacity = 0;
  locmoe::dispatch_plan plan;
  std::vector<float> x, buffer, y;
  std::vector<locmoe::bf16> x_bf16, buffer_bf16;

  layer(std::size_t tokens_, std::size_t d_, std::size_t n_, std::size_t k_)
      : tokens(tokens_), d(d_), n(n_), k(k_), rows(0),
        topo(locmoe::topology::uniform(ranks, ranks_per_node, static_cast<std::int64_t>(n_))),
        expert(tokens * k), slot(tokens * k), kept_weight(tokens * k) {
    std::mt19937_64 rng(tokens * 1000003u + n * 101u + k);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> logits(tokens * n), weights(tokens * k), probabilities(tokens * n);
    std::vector<locmoe::expert_index> indices(tokens * k);
    for (auto& v : logits) v = normal(rng);
    locmoe::router_options<float> ro;
    ro.k = k;
    const locmoe::route_outputs<float> routed{
        {indices.data(), tokens, k}, {weights.data(), tokens, k}, {probabilities.data(), tokens, n}, {}};
    locmoe::score_route(matrix_view<const float>(logits.data(), tokens, n), ro, routed);
    locmoe::capacity_options co;
    co.capacity_factor = 1.25;
    co.policy = locmoe::drop_policy::position;
    locmoe::capacity_assigner<float> assigner(n, co);
    locmoe::assignment_context<float> context;
    context.topo = &topo;
    context.token_rank = locmoe::token_ranks::contiguous_blocks();
    const locmoe::assignment_outputs<float> assigned{
        {expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_weight.data(), tokens, k}, nullptr, nullptr};
    capacity = assigner
                   .run(matrix_view<const locmoe::expert_index>(indices.data(), tokens, k),
                        matrix_view<const float>(weights.data(), tokens, k), assigned, context)
                   .capacity;
    plan = build();
    rows = plan.buffer_rows();
    x.resize(tokens * d);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 1021) * 0.001f - 0.5f;
    x_bf16.resize(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) x_bf16[i] = locmoe::bf16(x[i]);
    buffer.assign(rows * d, 1.0f);
    buffer_bf16.assign(rows * d, locmoe::bf16(1.0f));
    y.assign(tokens * d, 0.0f);
  }

  locmoe::dispatch_plan build() const {
    return locmoe::build_dispatch_plan(matrix_view<const locmoe::expert_index>(expert.data(), tokens, k),
                                       matrix_view<const locmoe::slot_index>(slot.data(), tokens, k), capacity, topo,
                                       locmoe::token_ranks::contiguous_blocks());
  }
  std::size_t kept() const { return plan.order.size(); }

  template <class T>
  void dispatch(const std::vector<T>& from, std::vector<T>& to) const {
    locmoe::dispatch(plan, matrix_view<const T>(from.data(), tokens, d), matrix_view<T>(to.data(), rows, d));
  }
  void combine() {
    locmoe::combine(plan, matrix_view<const float>(buffer.data(), rows, d),
                    matrix_view<const float>(kept_weight.data(), tokens, k), matrix_view<float>(y.data(), tokens, d));
  }
};

// Built on first use and kept for the whole run: random interleaving alternates the families.
layer& shared_layer(const benchmark::State& state) {
  static std::map<std::vector<std::int64_t>, std::unique_ptr<layer>> layers;
  const std::vector<std::int64_t> key = {state.range(0), state.range(1), state.range(2), state.range(3)};
  auto& slot = layers[key];
  if (!slot) {
    slot = std::make_unique<layer>(static_cast<std::size_t>(key[0]), static_cast<std::size_t>(key[1]),
                                   static_cast<std::size_t>(key[2]), static_cast<std::size_t>(key[3]));
  }
  return *slot;
}

// The memcpy reference's source and destination, grown to the largest block asked for and kept.
struct copy_blocks {
  std::vector<unsigned char> from, to;
  void reserve(std::size_t bytes) {
    if (from.size() >= bytes) return;
    from.assign(bytes, 1);
    to.assign(bytes, 0);
  }
};

copy_blocks& shared_blocks(std::size_t bytes) {
  static copy_blocks blocks;
  blocks.reserve(bytes);
  return blocks;
}

void set_bytes(benchmark::State& state, std::size_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
}

std::size_t dispatch_bytes(const layer& l, std::size_t element) { return 2 * l.kept() * l.d * element; }
std::size_t combine_bytes(const layer& l) { return (l.kept() + l.tokens) * l.d * sizeof(float); }

void plan_build(benchmark::State& state) {
  const layer& l = shared_layer(state);
  for (auto _ : state) {
    const locmoe::dispatch_plan plan = l.build();
    benchmark::DoNotOptimize(plan.order.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(l.tokens));
}

void dispatch_f32(benchmark::State& state) {
  layer& l = shared_layer(state);
  l.dispatch(l.x, l.buffer);  // warm-up
  for (auto _ : state) {
    l.dispatch(l.x, l.buffer);
    benchmark::ClobberMemory();
  }
  set_bytes(state, dispatch_bytes(l, sizeof(float)));
}

void dispatch_bf16(benchmark::State& state) {
  layer& l = shared_layer(state);
  l.dispatch(l.x_bf16, l.buffer_bf16);  // warm-up
  for (auto _ : state) {
    l.dispatch(l.x_bf16, l.buffer_bf16);
    benchmark::ClobberMemory();
  }
  set_bytes(state, dispatch_bytes(l, sizeof(locmoe::bf16)));
}

void combine_f32(benchmark::State& state) {
  layer& l = shared_layer(state);
  l.combine();  // warm-up
  for (auto _ : state) {
    l.combine();
    benchmark::ClobberMemory();
  }
  set_bytes(state, combine_bytes(l));
}

// One std::memcpy that reads `bytes / 2` and writes as many: `bytes` of traffic, as the kernel it stands by.
void memcpy_reference(benchmark::State& state, std::size_t bytes) {
  copy_blocks& blocks = shared_blocks(bytes / 2);
  std::memcpy(blocks.to.data(), blocks.from.data(), bytes / 2);  // warm-up
  for (auto _ : state) {
    std::memcpy(blocks.to.data(), blocks.from.data(), bytes / 2);
    benchmark::DoNotOptimize(blocks.to.data());
    benchmark::ClobberMemory();
  }
  set_bytes(state, bytes / 2 * 2);
}

void memcpy_dispatch_f32(benchmark::State& state) {
  memcpy_reference(state, dispatch_bytes(shared_layer(state), sizeof(float)));
}
void memcpy_dispatch_bf16(benchmark::State& state) {
  memcpy_reference(state, dispatch_bytes(shared_layer(state), sizeof(locmoe::bf16)));
}
void memcpy_combine_f32(benchmark::State& state) { memcpy_reference(state, combine_bytes(shared_layer(state))); }

// (T, d, n, k): the paper's layer, k in {1, 2}.
void shapes(benchmark::internal::Benchmark* b) {
  for (const int k : {1, 2}) b->Args({16384, 5120, 16, k});
  b->ArgNames({"T", "d", "n", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(plan_build)->Apply(shapes);
BENCHMARK(dispatch_f32)->Apply(shapes);
BENCHMARK(memcpy_dispatch_f32)->Apply(shapes);
BENCHMARK(dispatch_bf16)->Apply(shapes);
BENCHMARK(memcpy_dispatch_bf16)->Apply(shapes);
BENCHMARK(combine_f32)->Apply(shapes);
BENCHMARK(memcpy_combine_f32)->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
