// The capacity calculators, timed beside the Boost.Math calls they are built on (the reference: a bare
// ibetac, or a bare erfc, on the same arguments). Run:
//   build/default/bench/locmoe_bench_capacity --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <locmoe/capacity.hpp>

#include <benchmark/benchmark.h>

#include <random>

namespace {

// (d, delta * 1e4): the paper's layer, a small d, and the underflow region (continued fractions).
void bound_args(benchmark::internal::Benchmark* b) {
  b->Args({5120, 300})->Args({16, 9000})->Args({1000000, 5000});
}

double delta_of(const benchmark::State& state) { return static_cast<double>(state.range(1)) * 1e-4; }

void reference_boost_ibetac(benchmark::State& state) {
  const double a = 0.5 * static_cast<double>(state.range(0) - 1);
  const double delta = delta_of(state);
  for (auto _ : state) benchmark::DoNotOptimize(boost::math::ibetac(0.5, a, delta * delta));
}
BENCHMARK(reference_boost_ibetac)->Apply(bound_args);

void p_delta(benchmark::State& state) {
  const std::int64_t d = state.range(0);
  const double delta = delta_of(state);
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::p_delta(d, delta));
}
BENCHMARK(p_delta)->Apply(bound_args);

void log_p_delta(benchmark::State& state) {
  const std::int64_t d = state.range(0);
  const double delta = delta_of(state);
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::log_p_delta(d, delta));
}
BENCHMARK(log_p_delta)->Apply(bound_args);

void critical_capacity_bound(benchmark::State& state) {
  const std::int64_t d = state.range(0);
  const double delta = delta_of(state);
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::critical_capacity_bound(d, 16, delta));
}
BENCHMARK(critical_capacity_bound)->Apply(bound_args);

void max_delta_for_capacity(benchmark::State& state) {
  const std::int64_t d = state.range(0);
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::max_delta_for_capacity(d, 16, 2.0));
}
BENCHMARK(max_delta_for_capacity)->Arg(16)->Arg(5120)->Arg(1000000);

void classic_capacity(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::classic_capacity(16384, 1.1, 16, 16, 4));
}
BENCHMARK(classic_capacity);

// T cosines of routed tokens -> the 5% quantile.
void empirical_delta(benchmark::State& state) {
  std::mt19937_64 rng(1);
  std::uniform_real_distribution<double> cosine(-0.1, 1.0);
  Eigen::VectorXd c(state.range(0));
  for (Eigen::Index i = 0; i < c.size(); ++i) c[i] = cosine(rng);
  for (auto _ : state) benchmark::DoNotOptimize(locmoe::empirical_delta(c, 0.05));
  state.SetItemsProcessed(state.iterations() * state.range(0));
}
BENCHMARK(empirical_delta)->Arg(16384);

}  // namespace

BENCHMARK_MAIN();
