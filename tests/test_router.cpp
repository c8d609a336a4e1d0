// router.hpp: the router object against the layer written with free functions (tests/layer_reference.hpp, itself
// checked against central differences), for both gates, every score function, k = 1, 2, 4, drops on and off;
// batch invariance (permuted and split batches); the grouped layout; global capacity from exchanged counts;
// thread counts; option errors.
#include "layer_reference.hpp"

#include <locmoe/router.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace locmoe;
using locmoe_test::layer_case;
using locmoe_test::layer_params;

namespace {

moe_router_options options_for(const layer_params& p, const layer_case& c, const topology& topo) {
  moe_router_options o;
  o.gate = c.dense ? gate_type::dense : gate_type::grap;
  o.hidden = p.d;
  o.experts = p.n;
  o.top_k = c.k;
  o.score = c.score;
  o.softmax_before_topk = c.softmax_before_topk;
  o.renormalize = c.renormalize;
  if (c.drops) {
    o.capacity = capacity_rule::fixed;
    o.fixed_capacity = static_cast<std::int64_t>(p.tokens * c.k / p.n);
  } else {
    o.capacity = capacity_rule::dropless;
  }
  o.aux_coeff = p.aux;
  o.z_coeff = p.z;
  o.locality_coeff = p.loc;
  o.topo = &topo;
  o.rank = 0;
  return o;
}

/// One training step through the router with the reference's linear experts; the same outputs as run_layer.
template <class Backend>
locmoe_test::layer_gradients router_step(moe_router<Backend, double>& router, const layer_params& p, bool dense) {
  const std::size_t T = p.tokens, d = p.d, n = p.n;
  const gate_parameters<double> gate{{p.gate_weight.data(), n, d}, p.gate_bias.data()};
  const matrix_view<const double> x(p.x.data(), T, d);
  const routing<double>& r = router.forward(x, gate);
  const std::size_t rows = r.buffer_rows;
  std::vector<double> in(rows * d), out(rows * d, 0.0), y(T * d);
  router.dispatch(x, matrix_view<double>(in.data(), rows, d));
  const auto rows_of = [&](std::size_t e) {
    return std::pair<std::size_t, std::size_t>{r.layout.begin_of(e), r.layout.end_of(e)};
  };
  for (std::size_t e = 0; e < n; ++e)
    for (std::size_t row = rows_of(e).first; row < rows_of(e).second; ++row)
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) out[row * d + i] += p.expert_weight[(e * d + i) * d + j] * in[row * d + j];
  router.combine(matrix_view<const double>(out.data(), rows, d), matrix_view<double>(y.data(), T, d));
  locmoe_test::layer_gradients g;
  g.routed.assign(r.routed_expert.data, r.routed_expert.data + T * r.routed_expert.cols);
  g.loss = r.aux_loss + r.z_loss + r.locality_loss;
  for (std::size_t i = 0; i < T * d; ++i) g.loss += y[i] * p.upstream[i];
  std::vector<double> grad_out(rows * d), grad_in(rows * d, 0.0);
  router.combine_backward(matrix_view<const double>(out.data(), rows, d), matrix_view<const double>(p.upstream.data(), T, d),
                          matrix_view<double>(grad_out.data(), rows, d));
  g.expert_weight.assign(n * d * d, 0.0);
  for (std::size_t e = 0; e < n; ++e)
    for (std::size_t row = rows_of(e).first; row < rows_of(e).second; ++row)
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) {
          grad_in[row * d + j] += p.expert_weight[(e * d + i) * d + j] * grad_out[row * d + i];
          g.expert_weight[(e * d + i) * d + j] += grad_out[row * d + i] * in[row * d + j];
        }
  g.x.assign(T * d, 0.0);
  router.dispatch_backward(matrix_view<const double>(grad_in.data(), rows, d), matrix_view<double>(g.x.data(), T, d));
  g.gate_bias.assign(n, 0.0);
  g.gate_weight.assign(n * d, 0.0);
  router.backward(x, gate, matrix_view<double>(g.x.data(), T, d),
                  gate_gradients<double>{dense ? matrix_view<double>(g.gate_weight.data(), n, d) : matrix_view<double>{},
                                         g.gate_bias.data()});
  return g;
}

double worst_relative(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]) / (1e-12 + std::abs(b[i])));
  return worst;
}

}  // namespace

TEST_CASE("moe_router: a training step equals the free-function layer (itself checked by finite differences)") {
  thread_pool pool(2);
  const cpu_backend cpu(pool, 1);
  int cases = 0;
  locmoe_test::for_each_layer_case([&](const layer_case& c, const char* name, int index) {
    CAPTURE(c.dense);
    CAPTURE(std::string(name));
    CAPTURE(c.k);
    CAPTURE(c.drops);
    layer_params p(static_cast<std::uint32_t>(500 + index));
    std::fill(p.token_rank.begin(), p.token_rank.end(), 0);  // rank-local: every token is rank 0's
    const locmoe_test::layer_gradients want = run_layer(p, c, true);
    const topology topo = topology::uniform(2, 1, static_cast<std::int64_t>(p.n));
    moe_router<cpu_backend, double> router(cpu, options_for(p, c, topo));
    for (int step = 0; step < 2; ++step) {  // a second step reuses every buffer
      const locmoe_test::layer_gradients got = router_step(router, p, c.dense);
      CHECK(got.routed == want.routed);
      CHECK(std::abs(got.loss - want.loss) <= 1e-12 * std::abs(want.loss));
      CHECK(worst_relative(got.x, want.x) < 1e-9);
      CHECK(worst_relative(got.gate_bias, want.gate_bias) < 1e-9);
      CHECK(worst_relative(got.expert_weight, want.expert_weight) < 1e-9);
      if (c.dense) CHECK(worst_relative(got.gate_weight, want.gate_weight) < 1e-9);
    }
    ++cases;
  });
  CHECK(cases == 48);
}

namespace {

/// A float layer step's output y [T x d] (toy experts: expert e scales its rows by e + 1) and dL/dx for
/// L = sum(y R), with the given router.
struct float_step {
  std::vector<float> y, grad_x;
  std::vector<expert_index> routed;
};

float_step run_float(moe_router<cpu_backend, float>& router, const std::vector<float>& x, const std::vector<float>& upstream,
                     const gate_parameters<float>& gate, std::size_t T, std::size_t d) {
  const matrix_view<const float> xv(x.data(), T, d);
  const routing<float>& r = router.forward(xv, gate);
  const std::size_t rows = r.buffer_rows, n = router.options().experts;
  std::vector<float> buffer(rows * d), grad_buffer(rows * d);
  router.dispatch(xv, matrix_view<float>(buffer.data(), rows, d));
  for (std::size_t e = 0; e < n; ++e)
    for (std::size_t row = r.layout.begin_of(e); row < r.layout.end_of(e); ++row)
      for (std::size_t c = 0; c < d; ++c) buffer[row * d + c] *= static_cast<float>(e + 1);
  float_step s{std::vector<float>(T * d), std::vector<float>(T * d), {}};
  s.routed.assign(r.routed_expert.data, r.routed_expert.data + T * router.options().top_k);
  router.combine(matrix_view<const float>(buffer.data(), rows, d), matrix_view<float>(s.y.data(), T, d));
  router.combine_backward(matrix_view<const float>(buffer.data(), rows, d), matrix_view<const float>(upstream.data(), T, d),
                          matrix_view<float>(grad_buffer.data(), rows, d));
  for (std::size_t e = 0; e < n; ++e)
    for (std::size_t row = r.layout.begin_of(e); row < r.layout.end_of(e); ++row)
      for (std::size_t c = 0; c < d; ++c) grad_buffer[row * d + c] *= static_cast<float>(e + 1);
  router.dispatch_backward(matrix_view<const float>(grad_buffer.data(), rows, d), matrix_view<float>(s.grad_x.data(), T, d));
  router.backward(xv, gate, matrix_view<float>(s.grad_x.data(), T, d), gate_gradients<float>{});
  return s;
}

std::vector<float> normal_values(std::mt19937& rng, std::size_t count, float scale = 1.0f) {
  std::vector<float> v(count);
  for (float& e : v) e = scale * std::normal_distribution<float>(0.0f, 1.0f)(rng);
  return v;
}

}  // namespace

TEST_CASE("moe_router: batch invariance, permuted and split batches (dropless); grouped layout and threads") {
  const std::size_t T = 96, d = 32, n = 8;
  std::mt19937 rng(9);
  const std::vector<float> x = normal_values(rng, T * d), upstream = normal_values(rng, T * d),
                           weight = normal_values(rng, n * d, 0.2f);
  std::vector<float> bias(n, 0.5f);
  std::vector<std::size_t> perm(T);
  std::iota(perm.begin(), perm.end(), std::size_t{0});
  std::shuffle(perm.begin(), perm.end(), rng);
  for (const bool dense : {false, true}) {
    for (const std::size_t k : {1u, 2u}) {
      CAPTURE(dense);
      CAPTURE(k);
      moe_router_options o;
      o.gate = dense ? gate_type::dense : gate_type::grap;
      o.hidden = d;
      o.experts = n;
      o.top_k = k;
      o.capacity = capacity_rule::dropless;
      o.aux_coeff = 0;  // the aux loss couples the tokens of a batch (its f and P are batch means)
      const gate_parameters<float> gate{{weight.data(), n, d}, bias.data()};
      thread_pool pool(2);
      const cpu_backend cpu(pool, 8);
      moe_router<cpu_backend, float> router(cpu, o);
      const float_step whole = run_float(router, x, upstream, gate, T, d);

      std::vector<float> xp(T * d), up(T * d);
      for (std::size_t t = 0; t < T; ++t) {
        std::copy(x.begin() + static_cast<std::ptrdiff_t>(perm[t] * d), x.begin() + static_cast<std::ptrdiff_t>(perm[t] * d + d),
                  xp.begin() + static_cast<std::ptrdiff_t>(t * d));
        std::copy(upstream.begin() + static_cast<std::ptrdiff_t>(perm[t] * d),
                  upstream.begin() + static_cast<std::ptrdiff_t>(perm[t] * d + d), up.begin() + static_cast<std::ptrdiff_t>(t * d));
      }
      const float_step permuted = run_float(router, xp, up, gate, T, d);
      bool same = true;
      for (std::size_t t = 0; t < T; ++t) {
        same &= std::memcmp(&permuted.y[t * d], &whole.y[perm[t] * d], d * sizeof(float)) == 0;
        same &= std::memcmp(&permuted.grad_x[t * d], &whole.grad_x[perm[t] * d], d * sizeof(float)) == 0;
        for (std::size_t j = 0; j < k; ++j) same &= permuted.routed[t * k + j] == whole.routed[perm[t] * k + j];
      }
      CHECK(same);

      // Two halves routed separately give the whole batch's rows.
      const std::size_t half = T / 2 + 5;
      const std::vector<float> x1(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(half * d)),
          x2(x.begin() + static_cast<std::ptrdiff_t>(half * d), x.end()),
          u1(upstream.begin(), upstream.begin() + static_cast<std::ptrdiff_t>(half * d)),
          u2(upstream.begin() + static_cast<std::ptrdiff_t>(half * d), upstream.end());
      const float_step first = run_float(router, x1, u1, gate, half, d);
      const float_step second = run_float(router, x2, u2, gate, T - half, d);
      CHECK(std::memcmp(first.y.data(), whole.y.data(), half * d * sizeof(float)) == 0);
      CHECK(std::memcmp(second.y.data(), whole.y.data() + half * d, (T - half) * d * sizeof(float)) == 0);
      CHECK(std::memcmp(first.grad_x.data(), whole.grad_x.data(), half * d * sizeof(float)) == 0);
      CHECK(std::memcmp(second.grad_x.data(), whole.grad_x.data() + half * d, (T - half) * d * sizeof(float)) == 0);

      // The grouped layout (rows padded to 8) and one thread give the same bits.
      moe_router_options og = o;
      og.layout = buffer_layout::grouped;
      og.group_multiple = 8;
      thread_pool one(1);
      const cpu_backend single(one, 1000);
      moe_router<cpu_backend, float> grouped(single, og);
      const float_step g = run_float(grouped, x, upstream, gate, T, d);
      CHECK(grouped.last().buffer_rows % 8 == 0);
      CHECK(std::memcmp(g.y.data(), whole.y.data(), T * d * sizeof(float)) == 0);
      CHECK(std::memcmp(g.grad_x.data(), whole.grad_x.data(), T * d * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("moe_router: a global capacity from exchanged counts keeps what one assigner keeps on all ranks' tokens") {
  const std::size_t R = 3, n = 6, d = 12, k = 2;
  const std::size_t tokens[R] = {20, 0, 31};  // rank 1 has no tokens
  const topology topo = topology::uniform(3, 1, static_cast<std::int64_t>(n));
  std::mt19937 rng(5);
  std::vector<std::vector<float>> x(R);
  for (std::size_t r = 0; r < R; ++r) x[r] = normal_values(rng, tokens[r] * d);
  moe_router_options o;
  o.hidden = d;
  o.experts = n;
  o.top_k = k;
  o.capacity_factor = 0.8;
  o.global_capacity = true;
  o.topo = &topo;
  thread_pool pool(1);
  const cpu_backend cpu(pool);
  std::vector<moe_router<cpu_backend, float>> routers;
  std::vector<std::int64_t> counts;
  for (std::size_t r = 0; r < R; ++r) {
    moe_router_options mine = o;
    mine.rank = static_cast<std::int32_t>(r);
    routers.emplace_back(cpu, mine);
    const routing<float>& routed = routers.back().route(matrix_view<const float>(x[r].data(), tokens[r], d), {});
    counts.insert(counts.end(), routed.tokens_per_expert, routed.tokens_per_expert + n);  // the exchange: n per rank
  }
  CHECK_THROWS_WITH_AS(routers[0].forward(matrix_view<const float>(x[0].data(), tokens[0], d), {}),
                       doctest::Contains("global_capacity"), error);
  routers[0].route(matrix_view<const float>(x[0].data(), tokens[0], d), {});
  // The reference: one assigner on every rank's choices, in rank order, with the same capacity.
  std::vector<expert_index> all;
  std::vector<float> all_w;
  std::vector<bool> kept;
  for (std::size_t r = 0; r < R; ++r) {
    const routing<float>& a = routers[r].assign(counts.data());
    all.insert(all.end(), a.routed_expert.data, a.routed_expert.data + tokens[r] * k);
    all_w.insert(all_w.end(), a.routed_weight.data, a.routed_weight.data + tokens[r] * k);
    for (std::size_t p = 0; p < tokens[r] * k; ++p) kept.push_back(a.expert.data[p] != no_expert);
  }
  const std::size_t total = all.size() / k;
  capacity_options co;
  co.capacity_factor = 0.8;
  capacity_assigner<float> reference(n, co);
  std::vector<expert_index> e(total * k);
  std::vector<slot_index> s(total * k);
  std::vector<float> w(total * k);
  const assignment_stats stats = reference.run(matrix_view<const expert_index>(all.data(), total, k),
                                               matrix_view<const float>(all_w.data(), total, k),
                                               {{e.data(), total, k}, {s.data(), total, k}, {w.data(), total, k}});
  CHECK(stats.dropped > 0);
  for (std::size_t p = 0; p < total * k; ++p) CHECK(kept[p] == (e[p] != no_expert));
}

TEST_CASE("moe_router: options are checked, naming the field") {
  thread_pool pool(1);
  const cpu_backend cpu(pool);
  const topology topo = topology::uniform(2, 1, 4);
  const auto fails = [&](auto&& change, const char* field) {
    moe_router_options o;
    o.hidden = 16;
    o.experts = 4;
    change(o);
    CAPTURE(field);
    CHECK_THROWS_WITH_AS(moe_router<>(cpu, o), doctest::Contains(field), error);
  };
  fails([](moe_router_options& o) { o.top_k = 5; }, "k");
  fails([](moe_router_options& o) { o.experts = 32; }, "experts");
  fails([](moe_router_options& o) { o.capacity_factor = 0; }, "capacity_factor");
  fails([](moe_router_options& o) { o.capacity = capacity_rule::critical_bound, o.critical_delta = 1.5; }, "delta");
  fails([](moe_router_options& o) { o.locality_coeff = 0.01; }, "topo");
  fails([&](moe_router_options& o) { o.topo = &topo, o.rank = 2; }, "rank");
  fails([](moe_router_options& o) { o.local_overflow = true, o.renormalize = true; }, "local_overflow");
  fails([](moe_router_options& o) { o.group_multiple = 0; }, "group_multiple");
  fails([](moe_router_options& o) { o.aux_coeff = std::nan(""); }, "aux_coeff");
  moe_router_options o;
  o.hidden = 5120;
  o.experts = 16;
  o.capacity = capacity_rule::critical_bound;
  moe_router<> critical(cpu, o);
  std::vector<float> x(64 * 5120, 0.25f);
  const routing<float>& r = critical.forward(matrix_view<const float>(x.data(), 64, 5120), {});
  CHECK(r.capacity == critical_capacity(5120, 16, 0.03));  // the paper's bound: 2 at (5120, 16, 0.03)
  std::vector<float> wrong(64 * 100);
  CHECK_THROWS_WITH_AS(critical.forward(matrix_view<const float>(wrong.data(), 64, 100), {}), doctest::Contains("x"), error);
}
