// dispatch.hpp: plans against counts taken directly from the assignment, dispatch + combine against a
// per-token reference with a toy expert, and the rules a plan's inputs must follow.
#include <locmoe/dispatch.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

using namespace locmoe;

TEST_CASE("dispatch plan: send counts, locality classes, order, bytes") {
  // 4 ranks on 2 nodes; 8 experts, 2 per rank; 16 tokens, 4 per rank; k = 2 with some drops.
  const topology topo = topology::uniform(4, 2, 8);
  std::mt19937 rng(5);
  const std::size_t tokens = 16, k = 2;
  std::vector<expert_index> choice(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<expert_index> perm(8);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    choice[t * k] = perm[0];
    choice[t * k + 1] = perm[1];
  }
  const std::vector<float> w(tokens * k, 0.5f);
  capacity_options o;
  o.capacity = 3;
  capacity_assigner<float> assigner(8, o);
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<float> kept_w(tokens * k);
  const assignment_stats stats = assigner.run(matrix_view<const expert_index>(choice.data(), tokens, k),
                                              matrix_view<const float>(w.data(), tokens, k),
                                              {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_w.data(), tokens, k}},
                                              {&topo, nullptr, {}});
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), 3, topo, nullptr, 5120 * 2);
  std::vector<std::int64_t> want(16, 0);
  std::int64_t rank_local = 0, node_local = 0, remote = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t j = 0; j < k; ++j) {
      if (expert[t * k + j] < 0) continue;
      const std::size_t src = t / 4, dst = static_cast<std::size_t>(expert[t * k + j]) / 2;
      ++want[src * 4 + dst];
      rank_local += src == dst;
      node_local += src != dst && src / 2 == dst / 2;
      remote += src / 2 != dst / 2;
    }
  }
  CHECK(plan.send_tokens == want);
  CHECK(std::accumulate(want.begin(), want.end(), std::int64_t{0}) == stats.kept);
  CHECK(plan.intra_rank == rank_local);
  CHECK(plan.intra_node == node_local);
  CHECK(plan.inter_node == remote);
  CHECK(plan.send_bytes[5] == want[5] * 10240);
  CHECK(static_cast<std::int64_t>(plan.order.size()) == stats.kept);
  for (std::size_t i = 1; i < plan.order.size(); ++i) {  // (source rank, expert, slot) ascending
    const auto a = static_cast<std::size_t>(plan.order[i - 1]), b = static_cast<std::size_t>(plan.order[i]);
    const auto key = [&](std::size_t p) {
      return std::make_tuple(p / k / 4, expert[p], slot[p]);
    };
    REQUIRE(key(a) < key(b));
  }
}

TEST_CASE("dispatch and combine: a toy expert through the buffers equals the per-token reference") {
  const topology topo = topology::uniform(2, 1, 4);
  const std::size_t tokens = 10, k = 2, d = 6;
  std::mt19937 rng(6);
  std::normal_distribution<double> normal;
  std::vector<double> x(tokens * d), weights(tokens * k);
  for (double& v : x) v = normal(rng);
  for (double& v : weights) v = std::abs(normal(rng));
  std::vector<expert_index> choice(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    choice[t * k] = static_cast<expert_index>(t % 4);
    choice[t * k + 1] = static_cast<expert_index>((t + 1 + t % 3) % 4 == t % 4 ? (t + 2) % 4 : (t + 1 + t % 3) % 4);
  }
  capacity_options o;
  o.capacity = 4;  // some choices dropped
  capacity_assigner<double> assigner(4, o);
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<double> kept_w(tokens * k);
  assigner.run(matrix_view<const expert_index>(choice.data(), tokens, k), matrix_view<const double>(weights.data(), tokens, k),
               {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_w.data(), tokens, k}}, {&topo, nullptr, {}});
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), 4, topo);
  std::vector<double> buffer(plan.buffer_rows() * d, 0.0), y(tokens * d, -1.0);
  dispatch(plan, matrix_view<const double>(x.data(), tokens, d), matrix_view<double>(buffer.data(), plan.buffer_rows(), d));
  for (std::size_t row = 0; row < plan.buffer_rows(); ++row) {  // expert e multiplies by e + 1
    for (std::size_t c = 0; c < d; ++c) buffer[row * d + c] *= static_cast<double>(row / 4 + 1);
  }
  combine(plan, matrix_view<const double>(buffer.data(), plan.buffer_rows(), d),
          matrix_view<const double>(kept_w.data(), tokens, k), matrix_view<double>(y.data(), tokens, d));
  std::size_t dropped = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t c = 0; c < d; ++c) {
      double want = 0;
      for (std::size_t j = 0; j < k; ++j) {
        if (expert[t * k + j] == no_expert) continue;
        want += kept_w[t * k + j] * (static_cast<double>(expert[t * k + j]) + 1) * x[t * d + c];
      }
      REQUIRE(y[t * d + c] == doctest::Approx(want).epsilon(1e-15));
    }
    for (std::size_t j = 0; j < k; ++j) dropped += expert[t * k + j] == no_expert;
  }
  CHECK(dropped > 0);
}

TEST_CASE("dispatch plan: bad inputs name the rule") {
  const topology topo = topology::uniform(2, 1, 4);
  auto build = [&](std::vector<expert_index> e, std::vector<slot_index> s, std::int64_t capacity) {
    return build_dispatch_plan(matrix_view<const expert_index>(e.data(), e.size(), 1),
                               matrix_view<const slot_index>(s.data(), s.size(), 1), capacity, topo);
  };
  CHECK_THROWS_WITH_AS(build({0, 0}, {0, 0}, 2), doctest::Contains("two choices share one (expert, slot)"), error);
  CHECK_THROWS_WITH_AS(build({0, 1}, {0, 2}, 2), doctest::Contains("expert/slot = (1, 0) = 1/2"), error);
  CHECK_THROWS_WITH_AS(build({-1, 1}, {0, 0}, 2), doctest::Contains("a dropped one -1/-1"), error);
  CHECK_THROWS_WITH_AS(build({0}, {0}, -1), doctest::Contains("capacity = -1"), error);
  const std::vector<std::int32_t> rank = {0, 5};
  std::vector<expert_index> e = {0, 1};
  std::vector<slot_index> s = {0, 0};
  CHECK_THROWS_WITH_AS(build_dispatch_plan(matrix_view<const expert_index>(e.data(), 2, 1),
                                           matrix_view<const slot_index>(s.data(), 2, 1), 1, topo, rank.data()),
                       doctest::Contains("token_rank = [1] = 5"), error);
  const dispatch_plan empty = build({}, {}, 0);
  CHECK(empty.order.empty());
  CHECK(empty.intra_rank + empty.intra_node + empty.inter_node == 0);
}
