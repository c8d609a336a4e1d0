// One MoE layer's router step on given logits, single-threaded, and its pieces. Args (T, n, k); every family
// reports items_per_second as tokens/s (SetItemsProcessed):
//   route_step    the whole step, as bench/torch_route.py does it in PyTorch:
//                   1. route:   score_route(logits, softmax, k) -> indices, weights [T x k], probabilities [T x n]
//                   2. assign:  capacity_assigner (capacity factor 1.25, drop policy position) with a topology
//                               of 16 ranks, 8 per node, experts in blocks (topology::uniform(16, 8, n))
//                   3. losses:  router_losses: aux (0.01, all_choices), z (1e-3) and locality (0.01, eps 0.01,
//                               the same topology), gradients added into one grad_logits [T x n], zeroed first;
//                               the losses read the probabilities of step 1
//   route_only    step 1 alone
//   assign_only   step 2 alone, on step 1's choices (computed once, outside the loop)
//   losses_only   step 3 alone (zeroing grad_logits included), on step 1's outputs
//   {aux,z,locality}_loss_only  each loss of step 3 alone, with its gradient (zeroing included)
// Logits: N(0, 1) floats, seeded per shape. Buffers are allocated once, outside the timing loop.
// bench/route_vs_torch.py runs route_step next to bench/torch_route.py and prints the tokens/s ratios.
#include <locmoe/assign.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace {

using locmoe::matrix_view;

constexpr std::int64_t ranks = 16, ranks_per_node = 8;

// Everything one step reads and writes, allocated once per benchmark run.
struct step_state {
  std::size_t tokens, n, k;
  std::vector<float> logits, weights, probabilities, kept_weight, grad;
  std::vector<locmoe::expert_index> indices, expert;
  std::vector<locmoe::slot_index> slot;
  locmoe::topology topo;
  locmoe::capacity_assigner<float> assigner;

  explicit step_state(const benchmark::State& state)
      : tokens(static_cast<std::size_t>(state.range(0))),
        n(static_cast<std::size_t>(state.range(1))),
        k(static_cast<std::size_t>(state.range(2))),
        logits(tokens * n),
        weights(tokens * k),
        probabilities(tokens * n),
        kept_weight(tokens * k),
        grad(tokens * n),
        indices(tokens * k),
        expert(tokens * k),
        slot(tokens * k),
        topo(locmoe::topology::uniform(ranks, ranks_per_node, static_cast<std::int64_t>(n))),
        assigner(n, capacity_options()) {
    std::mt19937_64 rng(tokens * 1000003u + n);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (auto& v : logits) v = normal(rng);
  }

  static locmoe::capacity_options capacity_options() {
    locmoe::capacity_options o;
    o.capacity_factor = 1.25;
    o.policy = locmoe::drop_policy::position;
    return o;
  }

  std::size_t route() {
    locmoe::router_options<float> o;
    o.k = k;
    const locmoe::route_outputs<float> out{
        {indices.data(), tokens, k}, {weights.data(), tokens, k}, {probabilities.data(), tokens, n}, {}};
    return locmoe::score_route(matrix_view<const float>(logits.data(), tokens, n), o, out);
  }

  locmoe::assignment_stats assign() {
    const locmoe::assignment_outputs<float> out{
        {expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_weight.data(), tokens, k}, nullptr, nullptr};
    locmoe::assignment_context<float> context;
    context.topo = &topo;
    context.token_rank = locmoe::token_ranks::contiguous_blocks();
    return assigner.run(matrix_view<const locmoe::expert_index>(indices.data(), tokens, k),
                        matrix_view<const float>(weights.data(), tokens, k), out, context);
  }

  locmoe::loss_inputs<float> loss_in() const {
    return {matrix_view<const float>(logits.data(), tokens, n),
            matrix_view<const locmoe::expert_index>(indices.data(), tokens, k),
            matrix_view<const float>(probabilities.data(), tokens, n)};
  }
  void zero_grad() { std::fill(grad.begin(), grad.end(), 0.0f); }
  float aux() {
    locmoe::aux_loss_options<float> o;
    o.coeff = 0.01f;
    o.normalization = locmoe::aux_normalization::all_choices;
    return locmoe::aux_loss(loss_in(), o, matrix_view<float>(grad.data(), tokens, n)).value;
  }
  float z() { return locmoe::z_loss(loss_in(), 1e-3f, matrix_view<float>(grad.data(), tokens, n)).value; }
  float locality() {
    locmoe::locality_loss_options<float> o;
    o.coeff = 0.01f;
    o.smoothing = 0.01f;
    o.topo = &topo;
    o.token_rank = locmoe::token_ranks::contiguous_blocks();
    return locmoe::locality_loss(loss_in(), o, matrix_view<float>(grad.data(), tokens, n)).value;
  }
  // The three losses in one router_losses call, their gradients summed into one zeroed grad_logits.
  float losses() {
    zero_grad();
    locmoe::router_loss_options<float> o;
    o.aux.coeff = 0.01f;
    o.z_coeff = 1e-3f;
    o.locality.coeff = 0.01f;
    o.locality.smoothing = 0.01f;
    o.locality.topo = &topo;
    o.locality.token_rank = locmoe::token_ranks::contiguous_blocks();
    const auto v = locmoe::router_losses(loss_in(), o, matrix_view<float>(grad.data(), tokens, n));
    return v.aux.value + v.z.value + v.locality.value;
  }
};

void set_items(benchmark::State& state, const step_state& s) {
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(s.tokens));
}

void route_step(benchmark::State& state) {
  step_state s(state);
  for (auto _ : state) {
    benchmark::DoNotOptimize(s.route());
    benchmark::DoNotOptimize(s.assign());
    benchmark::DoNotOptimize(s.losses());
    benchmark::ClobberMemory();
  }
  set_items(state, s);
}

void route_only(benchmark::State& state) {
  step_state s(state);
  for (auto _ : state) {
    benchmark::DoNotOptimize(s.route());
    benchmark::ClobberMemory();
  }
  set_items(state, s);
}

void assign_only(benchmark::State& state) {
  step_state s(state);
  s.route();
  for (auto _ : state) {
    benchmark::DoNotOptimize(s.assign());
    benchmark::ClobberMemory();
  }
  set_items(state, s);
}

void losses_only(benchmark::State& state) {
  step_state s(state);
  s.route();
  for (auto _ : state) {
    benchmark::DoNotOptimize(s.losses());
    benchmark::ClobberMemory();
  }
  set_items(state, s);
}

template <float (step_state::*Loss)()>
void one_loss(benchmark::State& state) {
  step_state s(state);
  s.route();
  for (auto _ : state) {
    s.zero_grad();
    benchmark::DoNotOptimize((s.*Loss)());
    benchmark::ClobberMemory();
  }
  set_items(state, s);
}

// (T, n, k): T = 16384 tokens, n in {16, 64}, k in {1, 2}.
void shapes(benchmark::internal::Benchmark* b) {
  for (const int n : {16, 64})
    for (const int k : {1, 2}) b->Args({16384, n, k});
  b->ArgNames({"T", "n", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(route_step)->Apply(shapes);
BENCHMARK(route_only)->Apply(shapes);
BENCHMARK(assign_only)->Apply(shapes);
BENCHMARK(losses_only)->Apply(shapes);
BENCHMARK(one_loss<&step_state::aux>)->Name("aux_loss_only")->Apply(shapes);
BENCHMARK(one_loss<&step_state::z>)->Name("z_loss_only")->Apply(shapes);
BENCHMARK(one_loss<&step_state::locality>)->Name("locality_loss_only")->Apply(shapes);

}  // namespace

BENCHMARK_MAIN();
