// locmoe simulate's engine (examples/locmoe/simulation.cpp): the training gradient of the learned routers
// against central finite differences, determinism, and the checks on its settings.
#include "locmoe/simulation.hpp"

#include "locmoe/cli.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

using namespace locmoe;
using namespace locmoe::cli;

namespace {

struct fd_case {
  std::size_t tokens = 12, features = 8, experts = 4, rank = 2;
  std::vector<double> x, affinity;
  sim::learned_parameters p;

  explicit fd_case(bool dense, unsigned seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    x.resize(tokens * features);
    for (auto& v : x) v = normal(rng);
    affinity.resize(tokens * experts);
    for (auto& v : affinity) v = normal(rng);
    p.a.resize(rank * features);
    p.b.resize(features * rank);
    for (auto& v : p.a) v = 0.5 * normal(rng);
    for (auto& v : p.b) v = 0.5 * normal(rng);
    if (dense) {
      p.w.resize(experts * features);
      for (auto& v : p.w) v = normal(rng);
    }
  }
};

void check_gradient(bool dense, bool locality, unsigned seed) {
  fd_case c(dense, seed);
  const topology topo = topology::uniform(4, 2, 4);
  sim::settings s;
  s.aux_coeff = 0.3;  // large enough that a wrong aux gradient shows
  s.locality_coeff = 0.7;
  s.task_coeff = 1.1;
  const auto loss = [&](const sim::learned_parameters& p) {
    return sim::training_loss(p, c.x, c.affinity, c.tokens, c.features, c.experts, topo, s, locality);
  };
  const sim::batch_loss at = loss(c.p);
  REQUIRE(at.gradient.a.size() == c.p.a.size());
  REQUIRE(at.gradient.b.size() == c.p.b.size());
  REQUIRE(at.gradient.w.size() == c.p.w.size());
  const double h = 1e-6;
  std::size_t checked = 0;
  for (std::vector<double> sim::learned_parameters::*field :
       {&sim::learned_parameters::a, &sim::learned_parameters::b, &sim::learned_parameters::w}) {
    for (std::size_t i = 0; i < (c.p.*field).size(); ++i) {
      sim::learned_parameters up = c.p, down = c.p;
      (up.*field)[i] += h;
      (down.*field)[i] -= h;
      const double numeric = (loss(up).value - loss(down).value) / (2 * h);
      const double analytic = (at.gradient.*field)[i];
      CAPTURE(i);
      CHECK(analytic == doctest::Approx(numeric).epsilon(1e-5).scale(1e-3));
      ++checked;
    }
  }
  CHECK(checked == c.p.a.size() + c.p.b.size() + c.p.w.size());
}

}  // namespace

TEST_CASE("simulate: the learned routers' gradients match finite differences") {
  SUBCASE("dense gate (switch), task + aux") { check_gradient(true, false, 3); }
  SUBCASE("GrAP gate (locmoe), task + aux + locality") { check_gradient(false, true, 4); }
  SUBCASE("dense gate with locality") { check_gradient(true, true, 5); }
}

TEST_CASE("simulate: same seed, same result; the routers' basic traits hold") {
  sim::settings s;
  s.steps = 12;
  s.tokens_per_rank = 16;
  s.features = 16;
  s.eval_fraction = 0.5;
  const sim::cluster c{"custom", 2, 4, 8};
  const sim::cluster_result a = sim::simulate(c, s), b = sim::simulate(c, s);
  REQUIRE(a.routers.size() == 5);
  const char* names[] = {"hash", "switch", "rre", "locmoe", "node-limited"};
  for (std::size_t i = 0; i < 5; ++i) {
    CHECK(a.routers[i].router == names[i]);
    CHECK(a.routers[i].inter_node_share == b.routers[i].inter_node_share);
    CHECK(a.routers[i].a2a_seconds_flat == b.routers[i].a2a_seconds_flat);
    CHECK(a.routers[i].affinity == b.routers[i].affinity);
    const auto& r = a.routers[i];
    CHECK(r.inter_node_share + r.intra_node_share + r.rank_local_share == doctest::Approx(1.0).epsilon(1e-15));
    CHECK(r.max_mean_load >= 1.0);
    CHECK(r.drop_rate >= 0.0);
    CHECK(r.drop_rate < 1.0);
    // Capacity: ceil(T k cf / n) with T = 8 ranks x 16 tokens.
    CHECK(r.capacity == static_cast<std::int64_t>(std::ceil(128.0 * static_cast<double>(r.top_k) * 1.25 / 8)));
    CHECK(r.a2a_seconds_groupwise > 0);
  }
  CHECK(a.routers[4].top_k == 2);
  const sim::cluster_result other = sim::simulate(c, [&] {
    sim::settings t = s;
    t.seed = 2;
    return t;
  }());
  CHECK(other.routers[0].inter_node_share != a.routers[0].inter_node_share);
}

TEST_CASE("simulate: bad settings name their flag") {
  const sim::cluster c{"custom", 2, 4, 8};
  const auto fails = [&](void (*change)(sim::settings&), sim::cluster k, const char* flag) {
    sim::settings t;
    change(t);
    CHECK_THROWS_WITH_AS(sim::simulate(k, t), doctest::Contains(flag), usage_error);
  };
  const auto keep = [](sim::settings&) {};
  fails([](sim::settings& t) { t.steps = 0; }, c, "--steps = 0");
  fails([](sim::settings& t) { t.features = 4; }, c, "--features = 4");
  fails([](sim::settings& t) { t.domains = 9; }, c, "--domains = 9");
  fails([](sim::settings& t) { t.skew = 1.5; }, c, "--skew");
  fails([](sim::settings& t) { t.learning_rate = std::nan(""); }, c, "--learning-rate");
  fails([](sim::settings& t) { t.tokens_per_rank = std::int64_t{1} << 30; }, c, "--tokens-per-rank");
  fails([](sim::settings& t) { t.node_limited_k = 9; }, c, "--node-limited-k = 9");
  fails([](sim::settings& t) { t.routers = {"switch", "moe"}; }, c, "--routers = moe");
  fails(keep, {"custom", 0, 4, 8}, "--nodes = 0");
  fails(keep, {"custom", 2, 4, 0}, "--experts = 0");
  CHECK_THROWS_WITH_AS(sim::preset_cluster("512N"), doctest::Contains("--preset = 512N"), usage_error);
  CHECK(sim::preset_cluster("256N").nodes == 32);
}
