// A consumer built with -fno-exceptions: every public header compiles (the default policy is then errno_on_error and
// the object builders report through abort_on_error, error.hpp), and one routing step runs end to end: a value
// function with a bad argument returns a failed checked_count and sets errno; the router, the plans and the CPU
// backend run a step. Built and run by tests/CMakeLists.txt ("consumer: -fno-exceptions").
#include <locmoe/assign.hpp>
#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/thread_pool.hpp>
#include <locmoe/capacity.hpp>
#include <locmoe/config.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/error.hpp>
#include <locmoe/exchange.hpp>
#include <locmoe/expert_parallel.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/locmoe.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/reference.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/router.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <boost/throw_exception.hpp>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <type_traits>
#include <vector>

// Boost's rule for builds without exceptions (BOOST_NO_EXCEPTIONS): the program defines boost::throw_exception.
// locmoe passes Boost.Math its errno policy there, so these are reached only by Boost.Multiprecision's own checks
// (classic_capacity's integers), which locmoe's argument checks keep from firing.
namespace boost {
void throw_exception(const std::exception& e) {  // declared noreturn by Boost
  std::fprintf(stderr, "boost: %s\n", e.what());
  std::abort();
}
void throw_exception(const std::exception& e, const boost::source_location&) { throw_exception(e); }
}  // namespace boost

#if LOCMOE_HAS_EXCEPTIONS
#  error "this test must be compiled with -fno-exceptions"
#endif
static_assert(std::is_same_v<locmoe::default_policy, locmoe::errno_on_error>);
static_assert(std::is_same_v<locmoe::construction_policy, locmoe::abort_on_error>);
static_assert(std::is_same_v<locmoe::count_result<locmoe::errno_on_error>, locmoe::checked_count>);
static_assert(!std::is_convertible_v<locmoe::checked_count, std::size_t>, "a failure must not read as a count");

int main() {
  using namespace locmoe;
  int failures = 0;
  const auto expect = [&](bool ok, const char* what) {
    if (!ok) std::printf("FAILED: %s\n", what);
    failures += !ok;
  };
  const std::size_t tokens = 64, d = 32, n = 8, k = 2;
  std::vector<float> x(tokens * d);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 101) / 50.0f - 1.0f;
  const matrix_view<const float> xv(x.data(), tokens, d);

  // A value function: k > n fails as a checked_count, with EDOM; valid arguments give the count.
  std::vector<expert_index> idx(tokens * k);
  std::vector<float> w(tokens * k);
  const grap_gate<float> gate{d, n, true, nullptr};
  errno = 0;
  const checked_count bad = grap_route(gate, xv, {n + 1, false}, {{idx.data(), tokens, n + 1}, {w.data(), tokens, n + 1}, {}, {}});
  expect(!bad.ok() && errno == EDOM, "grap_route with k > n fails with EDOM");
  const checked_count good = grap_route(gate, xv, {k, false}, {{idx.data(), tokens, k}, {w.data(), tokens, k}, {}, {}});
  expect(good.ok() && good.value() == 0, "grap_route routes every token");
  errno = 0;
  expect(std::isnan(p_delta(1, 0.5)) && errno == EDOM, "p_delta(d = 1) is NaN with EDOM");

  // The router step, the plans and the CPU backend (construction_policy: nothing here breaks a rule).
  const topology topo = topology::uniform(4, 2, static_cast<std::int64_t>(n));
  thread_pool pool(2);
  const cpu_backend cpu(pool);
  moe_router_options o;
  o.hidden = d;
  o.experts = n;
  o.top_k = k;
  o.topo = &topo;
  o.locality_coeff = 0.01;
  moe_router<> router(cpu, o);
  const routing<float>& r = router.forward(xv, {});
  std::vector<float> buffer(r.buffer_rows * d), y(tokens * d);
  router.dispatch(xv, matrix_view<float>(buffer.data(), r.buffer_rows, d));
  router.combine(matrix_view<const float>(buffer.data(), r.buffer_rows, d), matrix_view<float>(y.data(), tokens, d));
  const exchange_plan plan = build_exchange_plan(std::vector<std::int64_t>(topo.ranks() * topo.ranks(), 1024), topo,
                                                 {exchange_scheme::split_gather});
  expect(plan.stages.size() == 2, "a split_gather plan has two stages");
  std::printf("%s\n", failures ? "no-exceptions consumer: FAILED" : "no-exceptions consumer: routed a step without exceptions");
  return failures ? 1 : 0;
}
