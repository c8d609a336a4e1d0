// assign.hpp against a per-expert reference (walk each expert's column of choices, keep by the policy's
// order) and hand-worked cases for capacity, rerouting, renormalization, padding and the statistics.
#include <locmoe/assign.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

using namespace locmoe;

namespace {

struct result {
  std::vector<expert_index> expert;
  std::vector<slot_index> slot;
  std::vector<float> weight;
  std::vector<std::int64_t> tokens_per_expert, kept_per_expert;
  assignment_stats stats;
};

result assign(const std::vector<expert_index>& indices, const std::vector<float>& weights, std::size_t k, std::size_t n,
              const capacity_options& options, const assignment_context<float>& context = {}) {
  const std::size_t tokens = indices.size() / k;
  result r;
  r.expert.assign(tokens * k, 99);
  r.slot.assign(tokens * k, 99);
  r.weight.assign(tokens * k, 99.0f);
  r.tokens_per_expert.assign(n, -1);
  r.kept_per_expert.assign(n, -1);
  capacity_assigner<float> assigner(n, options);
  r.stats = assigner.run(matrix_view<const expert_index>(indices.data(), tokens, k),
                         matrix_view<const float>(weights.data(), tokens, k),
                         assignment_outputs<float>{{r.expert.data(), tokens, k}, {r.slot.data(), tokens, k},
                                                   {r.weight.data(), tokens, k}, r.tokens_per_expert.data(),
                                                   r.kept_per_expert.data()},
                         context);
  return r;
}

/// Per expert: its (token, choice) pairs in token order; keep the first C (position) or the C best weights
/// (probs, ties to the earlier token, found by a full stable sort); slots by token order among the kept.
void reference(const std::vector<expert_index>& indices, const std::vector<float>& weights, std::size_t k,
               std::size_t n, std::int64_t capacity, drop_policy policy, std::vector<expert_index>& expert,
               std::vector<slot_index>& slot) {
  expert.assign(indices.size(), no_expert);
  slot.assign(indices.size(), -1);
  for (std::size_t e = 0; e < n; ++e) {
    std::vector<std::size_t> pairs;
    for (std::size_t i = 0; i < indices.size(); ++i) {
      if (indices[i] == static_cast<expert_index>(e)) pairs.push_back(i);
    }
    if (policy == drop_policy::probs) {
      std::stable_sort(pairs.begin(), pairs.end(), [&](std::size_t a, std::size_t b) { return weights[a] > weights[b]; });
    }
    if (static_cast<std::int64_t>(pairs.size()) > capacity) pairs.resize(static_cast<std::size_t>(capacity));
    std::sort(pairs.begin(), pairs.end());
    for (std::size_t s = 0; s < pairs.size(); ++s) {
      expert[pairs[s]] = static_cast<expert_index>(e);
      slot[pairs[s]] = static_cast<slot_index>(s);
    }
  }
  (void)k;
}

}  // namespace

TEST_CASE("capacity_assigner: both drop policies against the per-expert reference") {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const std::size_t n = 1 + static_cast<std::size_t>(trial) % 9, k = 1 + static_cast<std::size_t>(trial / 9) % std::min<std::size_t>(n, 3);
    const std::size_t tokens = static_cast<std::size_t>(trial) % 41;
    std::vector<expert_index> indices(tokens * k);
    std::vector<float> weights(tokens * k);
    std::uniform_int_distribution<int> level(0, 3);
    for (std::size_t t = 0; t < tokens; ++t) {
      std::vector<expert_index> perm(n);
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (std::size_t j = 0; j < k; ++j) {
        indices[t * k + j] = trial % 5 == 0 && j == k - 1 && t % 3 == 0 ? no_expert : perm[j];
        weights[t * k + j] = static_cast<float>(level(rng)) * 0.25f;  // ties are common
      }
    }
    capacity_options options;
    options.policy = trial % 2 ? drop_policy::probs : drop_policy::position;
    options.capacity = trial % 3 == 0 ? -1 : static_cast<std::int64_t>(trial % 7);
    options.capacity_factor = 0.5 + 0.25 * (trial % 4);
    options.min_capacity = trial % 4;
    const result got = assign(indices, weights, k, n, options);
    std::int64_t want_capacity = options.capacity;
    if (want_capacity < 0) {
      const double exact = static_cast<double>(tokens * k) * options.capacity_factor / static_cast<double>(n);
      want_capacity = std::max<std::int64_t>(options.min_capacity, static_cast<std::int64_t>(std::ceil(exact - 1e-9)));
    }
    CAPTURE(trial);
    REQUIRE(got.stats.capacity == want_capacity);
    std::vector<expert_index> expert;
    std::vector<slot_index> slot;
    reference(indices, weights, k, n, want_capacity, options.policy, expert, slot);
    CHECK(got.expert == expert);
    CHECK(got.slot == slot);
    for (std::size_t i = 0; i < indices.size(); ++i) REQUIRE(got.weight[i] == (expert[i] == no_expert ? 0.0f : weights[i]));
    std::int64_t routed = 0, kept = 0;
    for (std::size_t e = 0; e < n; ++e) {
      const auto want = std::count(indices.begin(), indices.end(), static_cast<expert_index>(e));
      CHECK(got.tokens_per_expert[e] == want);
      CHECK(got.kept_per_expert[e] == std::min<std::int64_t>(want, want_capacity));
      routed += want;
      kept += got.kept_per_expert[e];
    }
    CHECK(got.stats.routed == routed);
    CHECK(got.stats.kept == kept);
    CHECK(got.stats.dropped == routed - kept);
    CHECK(got.stats.drop_rate == doctest::Approx(routed ? double(routed - kept) / double(routed) : 0.0).epsilon(1e-15));
  }
}

TEST_CASE("capacity_assigner: capacity rules (peers' rounding, min, given, 0, no-drop, empty batch)") {
  std::vector<expert_index> indices(100);
  for (std::size_t t = 0; t < 100; ++t) indices[t] = static_cast<expert_index>(t % 10);
  const std::vector<float> weights(100, 1.0f);
  capacity_options o;
  o.capacity_factor = 1.1;
  CHECK(assign(indices, weights, 1, 10, o).stats.capacity == 11);  // exact ceil(100 * 1.1 / 10), as both peers
  o.min_capacity = 12;
  CHECK(assign(indices, weights, 1, 10, o).stats.capacity == 12);
  o.capacity = 3;
  const result given = assign(indices, weights, 1, 10, o);
  CHECK(given.stats.capacity == 3);
  CHECK(given.stats.kept == 30);
  o.capacity = 0;
  const result none = assign(indices, weights, 1, 10, o);
  CHECK(none.stats.kept == 0);
  CHECK(none.stats.drop_rate == 1.0);
  CHECK(std::all_of(none.slot.begin(), none.slot.end(), [](slot_index s) { return s == -1; }));
  o = {};
  o.drop = false;
  o.min_capacity = 50;  // ignored without drops, as DeepSpeed
  indices[0] = 3;
  const result all = assign(indices, weights, 1, 10, o);
  CHECK(all.stats.capacity == 11);
  CHECK(all.stats.dropped == 0);
  CHECK(all.stats.max_load == 11);
  const result empty = assign({}, {}, 2, 4, capacity_options{});
  CHECK(empty.stats.capacity == 0);
  CHECK(empty.stats.routed == 0);
  CHECK(empty.stats.drop_rate == 0.0);
}

TEST_CASE("capacity_assigner: locality-aware overflow moves a drop to the best local expert with room") {
  // 4 experts on 2 nodes (ranks 0, 1 -> nodes 0, 1; experts 0,1 on node 0 and 2,3 on node 1).
  const topology topo = topology::uniform(2, 1, 4);
  const std::vector<expert_index> indices = {0, 0, 0, 2};  // tokens 0-2 on rank 0, token 3 on rank 1
  const std::vector<float> weights = {0.7f, 0.6f, 0.5f, 0.9f};
  const std::vector<float> scores = {0.7f, 0.1f, 0.1f, 0.1f,   //
                                     0.6f, 0.1f, 0.2f, 0.1f,   //
                                     0.5f, 0.2f, 0.25f, 0.05f,  //
                                     0.0f, 0.0f, 0.9f, 0.1f};
  const std::vector<std::int32_t> rank = {0, 0, 0, 1};
  capacity_options o;
  o.capacity = 1;
  o.local_overflow = true;
  const assignment_context<float> context{&topo, rank.data(), matrix_view<const float>(scores.data(), 4, 4)};
  const result r = assign(indices, weights, 1, 4, o, context);
  // Token 0 keeps expert 0. Token 1 overflows: its only local alternative is expert 1 (room 1) -> moved.
  // Token 2 overflows: expert 1 is now full, experts 2 and 3 are on the other node -> dropped.
  CHECK(r.expert == std::vector<expert_index>{0, 1, no_expert, 2});
  CHECK(r.slot == std::vector<slot_index>{0, 0, -1, 0});
  CHECK(r.weight[1] == 0.1f);
  CHECK(r.stats.rerouted == 1);
  CHECK(r.stats.dropped == 1);
  CHECK(r.stats.node_local_fraction == 1.0);
  CHECK(r.kept_per_expert == std::vector<std::int64_t>{1, 1, 1, 0});
  o.local_overflow = false;
  CHECK(assign(indices, weights, 1, 4, o, context).stats.dropped == 2);
  // A masked expert (score 0) is never a destination, even with room.
  const std::vector<float> masked = {1.0f, 0.0f, 0.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0.0f};
  o.local_overflow = true;
  const result m = assign({0, 0}, {1.0f, 1.0f}, 1, 4, o, {&topo, token_ranks::contiguous_blocks(), matrix_view<const float>(masked.data(), 2, 4)});
  CHECK(m.expert == std::vector<expert_index>{0, no_expert});
  CHECK(m.stats.rerouted == 0);
  o.local_overflow = true;
  CHECK_THROWS_WITH_AS(assign(indices, weights, 1, 4, o, {&topo, rank.data(), {}}),
                       doctest::Contains("scores = null: must be passed"), error);
}

TEST_CASE("capacity_assigner: renormalize_kept, padding and locality statistics") {
  // 2 tokens x k = 2, 4 experts; capacity 1: token 1 loses expert 0 (token 0 has it).
  const std::vector<expert_index> indices = {0, 1, 0, 2};
  const std::vector<float> weights = {0.6f, 0.2f, 0.5f, 0.3f};
  capacity_options o;
  o.capacity = 1;
  o.renormalize_kept = true;
  o.pad_to_capacity = true;
  const topology topo({0, 0}, {0, 1, 1, 1});  // one node; token 0 on rank 0, token 1 on rank 1
  const result r = assign(indices, weights, 2, 4, o, {&topo, token_ranks::contiguous_blocks(), {}});
  CHECK(r.expert == std::vector<expert_index>{0, 1, no_expert, 2});
  CHECK(r.weight[0] == doctest::Approx(0.75).epsilon(2.4e-7));  // float: 2 ulps
  CHECK(r.weight[1] == doctest::Approx(0.25).epsilon(2.4e-7));
  CHECK(r.weight[2] == 0.0f);
  CHECK(r.weight[3] == 1.0f);  // DeepSpeed topkgating: a lone survivor gets 1
  CHECK(r.stats.padded_slots == 4 * 1 - 3);
  CHECK(r.stats.node_local_fraction == 1.0);
  CHECK(r.stats.rank_local_fraction == doctest::Approx(2.0 / 3.0).epsilon(1e-15));  // token 0's expert 1 lives on rank 1
  const topology sparse({0, 1}, {0, 0, 0, 0});
  const result s = assign(indices, weights, 2, 4, o, {&sparse, token_ranks::contiguous_blocks(), {}});
  CHECK(s.stats.tokens_without_local_expert == 1);
  CHECK(s.stats.node_local_fraction == doctest::Approx(2.0 / 3.0).epsilon(1e-15));
}

TEST_CASE("capacity_assigner: probs policy ranks a NaN weight below every number, -inf included") {
  const float inf = std::numeric_limits<float>::infinity();
  capacity_options o;
  o.policy = drop_policy::probs;
  o.capacity = 2;
  const result r = assign({0, 0, 0}, {std::nanf(""), -inf, 0.5f}, 1, 1, o);
  CHECK(r.expert == std::vector<expert_index>{no_expert, 0, 0});
}

TEST_CASE("capacity_assigner: bad arguments name the rule") {
  const std::vector<expert_index> indices = {0, 4};
  const std::vector<float> weights = {1, 1};
  CHECK_THROWS_WITH_AS(assign(indices, weights, 1, 4, {}), doctest::Contains("indices = (1, 0) = 4: every index must be"),
                       error);
  capacity_options o;
  o.capacity_factor = 0;
  CHECK_THROWS_WITH_AS(assign({0, 1}, weights, 1, 4, o), doctest::Contains("capacity_factor = 0: must be finite and > 0"),
                       error);
  o = {};
  o.capacity = -2;
  CHECK_THROWS_WITH_AS(assign({0, 1}, weights, 1, 4, o), doctest::Contains("capacity = -2"), error);
  const topology topo = topology::uniform(2, 1, 3);
  CHECK_THROWS_WITH_AS(assign({0, 1}, weights, 1, 4, {}, {&topo, token_ranks::contiguous_blocks(), {}}),
                       doctest::Contains("topology = 3: must place exactly n experts"), error);
  const topology four = topology::uniform(2, 1, 4);
  const std::vector<std::int32_t> rank = {0, 2};
  CHECK_THROWS_WITH_AS(assign({0, 1}, weights, 1, 4, {}, {&four, rank.data(), {}}),
                       doctest::Contains("token_rank = [1] = 2"), error);
  CHECK_THROWS_WITH_AS(assign({0, 1}, weights, 1, 0, {}), doctest::Contains("n = 0"), error);
}
