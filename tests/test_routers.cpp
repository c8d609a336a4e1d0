// routers.hpp and topology.hpp against independent references: a sort-based router written from the
// definitions (no insertion lists, no group layout), hand-worked cases, and every rule an argument can break.
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <vector>

using namespace locmoe;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

struct routed {
  std::vector<expert_index> indices;
  std::vector<double> weights, scores;
  std::size_t invalid = 0;
};

/// The definition, row by row: scores, keys, group scores by full sorts, Top-k by a full stable sort.
routed reference_route(const std::vector<double>& logits, std::size_t tokens, std::size_t n,
                       const router_options<double>& o) {
  routed r;
  r.indices.assign(tokens * o.k, no_expert);
  r.weights.assign(tokens * o.k, 0.0);
  r.scores.assign(tokens * n, 0.0);
  for (std::size_t t = 0; t < tokens; ++t) {
    const double* l = &logits[t * n];
    bool bad = std::any_of(l, l + n, [](double v) { return std::isnan(v) || v == inf; });
    bad = bad || std::all_of(l, l + n, [](double v) { return v == -inf; });
    if (bad) {
      ++r.invalid;
      continue;
    }
    std::vector<double> score(n), key(n);
    const double m = *std::max_element(l, l + n);
    double z = 0;
    for (std::size_t e = 0; e < n; ++e) z += std::exp(l[e] - m);
    for (std::size_t e = 0; e < n; ++e) {
      score[e] = o.score == score_function::softmax ? std::exp(l[e] - m) / z : (l[e] == -inf ? 0 : 1 / (1 + std::exp(-l[e])));
      key[e] = l[e] == -inf ? -inf
                            : (o.score == score_function::softmax && !o.softmax_before_topk ? l[e] : score[e]) +
                                  (o.expert_bias ? o.expert_bias[e] : 0.0);
    }
    std::vector<bool> allowed(n, true);
    if (o.groups) {
      std::map<std::size_t, std::vector<double>> members;
      for (std::size_t e = 0; e < n; ++e) {
        const std::size_t g = o.expert_group ? static_cast<std::size_t>(o.expert_group[e]) : e * o.groups / n;
        if (key[e] != -inf) members[g].push_back(key[e]);
      }
      std::vector<std::pair<double, std::size_t>> groups;  // (-score, g): ascending sort = best first, low g on ties
      for (std::size_t g = 0; g < o.groups; ++g) {
        auto& v = members[g];
        std::sort(v.rbegin(), v.rend());
        const std::size_t take = std::min(v.size(), std::max<std::size_t>(1, o.k / o.group_limit));
        const double s = v.empty() ? -inf : std::accumulate(v.begin(), v.begin() + static_cast<long>(take), 0.0);
        groups.push_back({-s, g});
      }
      std::sort(groups.begin(), groups.end());
      std::vector<bool> keep_group(o.groups, false);
      for (std::size_t i = 0; i < o.group_limit; ++i) keep_group[groups[i].second] = groups[i].first != inf;
      for (std::size_t e = 0; e < n; ++e) {
        allowed[e] = keep_group[o.expert_group ? static_cast<std::size_t>(o.expert_group[e]) : e * o.groups / n];
      }
    }
    std::vector<std::size_t> order;
    for (std::size_t e = 0; e < n; ++e) {
      if (allowed[e] && key[e] != -inf) order.push_back(e);
    }
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return key[a] > key[b]; });
    order.resize(std::min(order.size(), o.k));
    // Softmax over the chosen logits (after Top-k, or renormalized) is p_e / sum of the chosen p.
    double sum = 0;
    std::vector<double> w;
    for (const std::size_t e : order) {
      w.push_back(score[e]);
      sum += w.back();
    }
    double div = 1;
    if (o.score == score_function::softmax && (!o.softmax_before_topk || o.renormalize)) div = sum;
    if (o.score == score_function::sigmoid && o.k > 1) div = sum + 1e-20;
    for (std::size_t i = 0; i < order.size(); ++i) {
      r.indices[t * o.k + i] = static_cast<expert_index>(order[i]);
      r.weights[t * o.k + i] = w[i] / div * o.scale;
    }
    std::copy(score.begin(), score.end(), r.scores.begin() + static_cast<long>(t * n));
  }
  return r;
}

routed run_route(const std::vector<double>& logits, std::size_t tokens, std::size_t n, const router_options<double>& o) {
  routed r;
  r.indices.assign(tokens * o.k, 7);
  r.weights.assign(tokens * o.k, 7.0);
  r.scores.assign(tokens * n, 7.0);
  r.invalid = score_route(matrix_view<const double>(logits.data(), tokens, n), o,
                          route_outputs<double>{{r.indices.data(), tokens, o.k}, {r.weights.data(), tokens, o.k},
                                                {r.scores.data(), tokens, n}, {}});
  return r;
}

void check_same(const routed& got, const routed& want) {
  CHECK(got.invalid == want.invalid);
  CHECK(got.indices == want.indices);
  double worst = 0;
  for (std::size_t i = 0; i < want.weights.size(); ++i) worst = std::max(worst, locmoe_test::relative_error(got.weights[i], want.weights[i]));
  CHECK(worst < 1e-13);
}

std::vector<double> random_logits(std::mt19937& rng, std::size_t count, int levels) {
  // Few distinct values (levels > 0) make ties common; levels = 0 gives continuous values.
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> level(0, std::max(levels - 1, 0));
  std::vector<double> v(count);
  for (double& x : v) x = levels > 0 ? level(rng) * 0.5 : normal(rng);
  return v;
}

}  // namespace

TEST_CASE("topology: uniform nodes, block placement, explicit maps, the paper's 256-NPU layout") {
  const topology t = topology::uniform(16, 8, 64);
  CHECK(t.ranks() == 16);
  CHECK(t.nodes() == 2);
  CHECK(t.rank_of_expert(0) == 0);
  CHECK(t.rank_of_expert(3) == 0);
  CHECK(t.rank_of_expert(4) == 1);
  CHECK(t.node_of_expert(31) == 0);
  CHECK(t.node_of_expert(32) == 1);
  CHECK(t.experts_on_node(1) == 32);
  CHECK(t.is_local(40, 9));
  CHECK_FALSE(t.is_local(40, 7));

  // 256 NPUs, 8 per node, 16 experts: expert e on rank 16 e, so only the even nodes host one.
  const topology big = topology::uniform(256, 8, 16);
  CHECK(big.nodes() == 32);
  for (std::size_t e = 0; e < 16; ++e) CHECK(big.rank_of_expert(e) == static_cast<std::int32_t>(16 * e));
  for (std::size_t node = 0; node < 32; ++node) CHECK(big.experts_on_node(node) == (node % 2 == 0 ? 1u : 0u));

  const topology mine({0, 0, 1, 1, 3}, {4, 4, 0, 2});
  CHECK(mine.nodes() == 4);
  CHECK(mine.experts_on_node(2) == 0);
  CHECK(mine.experts_on_node(3) == 2);
  CHECK(mine.node_of_expert(3) == 1);

  CHECK_THROWS_WITH_AS(topology::uniform(10, 4, 8), doctest::Contains("ranks_per_node = 4: must divide ranks"), error);
  CHECK_THROWS_WITH_AS(topology::uniform(0, 1, 8), doctest::Contains("ranks = 0"), error);
  CHECK_THROWS_WITH_AS(topology::uniform(4, 1, 0), doctest::Contains("experts = 0"), error);
  CHECK_THROWS_WITH_AS(topology({0, -1}, {0}), doctest::Contains("node_of_rank = [1] = -1"), error);
  CHECK_THROWS_WITH_AS(topology({0, 0}, {0, 2}), doctest::Contains("rank_of_expert = [1] = 2: every expert must live"),
                       error);
  CHECK_THROWS_WITH_AS(topology({0, 1000000000}, {0}), doctest::Contains("node_of_rank = [1] = 1000000000: node ids must be in [0, ranks)"),
                       error);
  CHECK_THROWS_AS(topology({}, {0}), error);
}

TEST_CASE("score_route: every option against the sort-based reference, ties included") {
  std::mt19937 rng(20261123);
  const std::vector<double> bias = random_logits(rng, 17, 0);  // n <= 17
  for (int trial = 0; trial < 400; ++trial) {
    const std::size_t n = std::vector<std::size_t>{1, 2, 3, 8, 16, 17}[static_cast<std::size_t>(trial) % 6];
    const std::size_t tokens = 1 + static_cast<std::size_t>(trial) % 23;
    router_options<double> o;
    o.k = 1 + static_cast<std::size_t>(trial / 6) % n;
    o.score = trial % 3 == 0 ? score_function::sigmoid : score_function::softmax;
    o.softmax_before_topk = trial % 4 != 1;
    o.renormalize = trial % 5 == 2;
    o.scale = trial % 7 == 3 ? 2.5 : 1.0;
    if (trial % 4 == 3) o.expert_bias = bias.data();
    if (trial % 2 == 1 && n >= 2) {
      o.groups = n % 2 == 0 ? 2 : 1;
      if (n >= 8) o.groups = n / 4;
      o.group_limit = 1 + static_cast<std::size_t>(trial) % o.groups;
      if (o.group_limit * (n / o.groups) < o.k) o.group_limit = o.groups;
    }
    std::vector<double> logits = random_logits(rng, tokens * n, trial % 2 ? 4 : 0);
    if (trial % 9 == 0) logits[0] = -inf;
    if (trial % 11 == 0) logits[logits.size() - 1] = std::numeric_limits<double>::quiet_NaN();
    CAPTURE(trial);
    CAPTURE(n);
    CAPTURE(o.k);
    check_same(run_route(logits, tokens, n, o), reference_route(logits, tokens, n, o));
  }
}

TEST_CASE("score_route: explicit groups (a topology's nodes) equal contiguous groups, and a worked example") {
  // 8 experts on 4 nodes of 2; DeepSeek-style k = 4 among M = 2 nodes, each scored by its best 2 keys.
  const std::vector<double> logits = {0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 1.0, -1.0};
  const topology topo = topology::uniform(4, 1, 8);
  router_options<double> o;
  o.k = 3;
  o.score = score_function::sigmoid;
  o.groups = 4;
  o.group_limit = 2;  // floor(3 / 2) = 1: a node's score is its best key
  const routed contiguous = run_route(logits, 1, 8, o);
  o.expert_group = topo.node_of_expert_map().data();
  const routed explicit_groups = run_route(logits, 1, 8, o);
  CHECK(contiguous.indices == explicit_groups.indices);
  // Node best keys: node0 0.9, node1 0.8, node2 0.3, node3 1.0 -> nodes 3 and 0; Top-3 among {0, 1, 6, 7}.
  CHECK(contiguous.indices == std::vector<expert_index>{6, 0, 1});
  const double s6 = 1 / (1 + std::exp(-1.0)), s0 = 1 / (1 + std::exp(-0.9)), s1 = 1 / (1 + std::exp(-0.1));
  CHECK(contiguous.weights[0] == doctest::Approx(s6 / (s6 + s0 + s1 + 1e-20)).epsilon(1e-14));
}

TEST_CASE("score_route: node-limited on the paper's 256-NPU cluster (32 nodes, 16 experts on 16 of them)") {
  const topology topo = topology::uniform(256, 8, 16);
  std::mt19937 rng(3);
  const std::size_t tokens = 200;
  const std::vector<double> logits = random_logits(rng, tokens * 16, 0);
  router_options<double> o;
  o.k = 2;
  o.groups = topo.nodes();
  o.group_limit = 1;
  o.expert_group = topo.node_of_expert_map().data();
  o.score = score_function::sigmoid;
  // A node with experts holds exactly one here, so M = 1 leaves one expert: k = 2 cannot be met.
  CHECK_THROWS_WITH_AS(run_route(logits, tokens, 16, o), doctest::Contains("must hold at least k experts"), error);
  o.group_limit = 2;
  const routed two = run_route(logits, tokens, 16, o);
  check_same(two, reference_route(logits, tokens, 16, o));
  for (std::size_t t = 0; t < tokens; ++t) {
    CHECK(topo.node_of_expert(static_cast<std::size_t>(two.indices[t * 2])) !=
          topo.node_of_expert(static_cast<std::size_t>(two.indices[t * 2 + 1])));
  }
}

TEST_CASE("score_route: the SIMD path equals the generic path; float equals double to rounding") {
  std::mt19937 rng(7);
  const std::size_t tokens = 300, n = 64;
  const std::vector<double> logits = random_logits(rng, tokens * n, 0);
  router_options<double> plain;
  plain.k = 2;
  const std::vector<double> zero_bias(n, 0.0);
  router_options<double> generic = plain;
  generic.expert_bias = zero_bias.data();  // forces the scalar path, same keys
  const routed a = run_route(logits, tokens, n, plain), b = run_route(logits, tokens, n, generic);
  CHECK(a.indices == b.indices);
  for (std::size_t i = 0; i < a.weights.size(); ++i) REQUIRE(a.weights[i] == doctest::Approx(b.weights[i]).epsilon(1e-14));

  std::vector<float> f(logits.begin(), logits.end()), w(tokens * 2);
  std::vector<expert_index> idx(tokens * 2);
  router_options<float> fo;
  fo.k = 2;
  fo.score = score_function::sigmoid;
  generic.score = score_function::sigmoid;
  const routed c = run_route(logits, tokens, n, generic);
  score_route(matrix_view<const float>(f.data(), tokens, n), fo,
              route_outputs<float>{{idx.data(), tokens, 2}, {w.data(), tokens, 2}, {}, {}});
  CHECK(idx == c.indices);
  for (std::size_t i = 0; i < w.size(); ++i) REQUIRE(w[i] == doctest::Approx(c.weights[i]).epsilon(1e-6));
}

TEST_CASE("score_route: a bias that reorders far-apart logits keeps the weights finite (float)") {
  const std::vector<float> logits = {0.0f, 100.0f}, bias_after = {200.0f, 0.0f};
  std::vector<expert_index> idx(2);
  std::vector<float> w(2);
  router_options<float> o;
  o.k = 2;
  o.softmax_before_topk = false;
  o.expert_bias = bias_after.data();
  score_route(matrix_view<const float>(logits.data(), 1, 2), o, route_outputs<float>{{idx.data(), 1, 2}, {w.data(), 1, 2}, {}, {}});
  CHECK(idx == std::vector<expert_index>{0, 1});
  CHECK(w[1] == 1.0f);
  CHECK(w[0] == doctest::Approx(std::exp(-100.0)).epsilon(1e-3));
  const std::vector<float> far = {0.0f, -200.0f}, bias_before = {0.0f, 10.0f};
  router_options<float> r;
  r.renormalize = true;
  r.expert_bias = bias_before.data();  // picks expert 1, whose probability underflows to 0
  score_route(matrix_view<const float>(far.data(), 1, 2), r, route_outputs<float>{{idx.data(), 1, 1}, {w.data(), 1, 1}, {}, {}});
  CHECK(idx[0] == 1);
  CHECK(w[0] == 1.0f);
}

TEST_CASE("score_route: non-finite logits, masks, empty batches") {
  router_options<double> o;
  o.k = 2;
  o.score = score_function::sigmoid;
  const std::vector<double> logits = {1, -inf, -inf, -inf,     // one expert left: second slot no_expert
                                      inf, 0, 0, 0,            // +inf: invalid
                                      -inf, -inf, -inf, -inf,  // all masked: invalid
                                      0, 0, 0, 0};             // ties: experts 0 and 1
  const routed r = run_route(logits, 4, 4, o);
  CHECK(r.invalid == 2);
  CHECK(r.indices == std::vector<expert_index>{0, no_expert, no_expert, no_expert, no_expert, no_expert, 0, 1});
  CHECK(r.weights[1] == 0.0);
  CHECK(r.weights[6] == doctest::Approx(0.5).epsilon(1e-15));  // 0.5 / (0.5 + 0.5 + 1e-20)
  CHECK(r.scores[4] == 0.0);  // an invalid token's scores are zeroed
  CHECK(run_route({}, 0, 4, o).invalid == 0);
}

TEST_CASE("score_route: bad arguments name the rule") {
  const std::vector<double> logits(16, 0.0);
  auto route = [&](const router_options<double>& o) { return run_route(logits, 2, 8, o); };
  router_options<double> o;
  o.k = 9;
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("k = 9: must satisfy 1 <= k <= n"), error);
  o.k = 2;
  o.groups = 5000;
  o.group_limit = 1;
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("groups = 5000: must satisfy 1 <= G <= max_experts"), error);
  o.groups = 4;
  o.group_limit = 5;
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("group_limit = 5: must satisfy 1 <= M <= G"), error);
  o.k = 4;
  o.group_limit = 1;  // one group of 2 experts cannot hold 4 choices
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("must hold at least k experts"), error);
  o = {};
  o.group_limit = 1;
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("groups = 0: must be > 0 when group_limit"), error);
  const std::vector<double> bias = {0, 0, 0, std::numeric_limits<double>::quiet_NaN(), 0, 0, 0, 0};
  o = {};
  o.expert_bias = bias.data();
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("expert_bias = [3] = nan: must be finite"), error);
  const std::vector<std::int32_t> groups = {0, 0, 1, 1, 2, 2, 3, 4};
  o = {};
  o.groups = 4;
  o.group_limit = 2;
  o.expert_group = groups.data();
  CHECK_THROWS_WITH_AS(route(o), doctest::Contains("expert_group = [7] = 4"), error);
  errno = 0;
  std::vector<expert_index> idx(2);
  std::vector<double> w(2);
  const checked_count r = score_route(matrix_view<const double>(logits.data(), 2, 8), router_options<double>{},
                                      route_outputs<double>{{idx.data(), 2, 1}, {w.data(), 1, 1}, {}, {}}, {},
                                      errno_on_error{});
  const int error_number = errno;  // read before any CHECK, which may print
  CHECK(!r.ok());
  CHECK(error_number == EDOM);
}

TEST_CASE("hash_route and rre_route: fixed, in range, table and domain rules") {
  const std::size_t tokens = 4000, n = 16;
  std::vector<std::int64_t> ids(tokens);
  std::iota(ids.begin(), ids.end(), 0);
  std::vector<expert_index> idx(tokens), again(tokens);
  std::vector<float> w(tokens);
  hash_route(ids.data(), tokens, n, hash_options<std::int64_t>{}, matrix_view<expert_index>(idx.data(), tokens, 1),
             matrix_view<float>(w.data(), tokens, 1));
  hash_route(ids.data(), tokens, n, hash_options<std::int64_t>{}, matrix_view<expert_index>(again.data(), tokens, 1),
             matrix_view<float>(w.data(), tokens, 1));
  CHECK(idx == again);
  std::vector<int> load(n, 0);
  for (const expert_index e : idx) ++load[static_cast<std::size_t>(e)];
  for (const int l : load) CHECK(std::abs(l - 250) < 60);  // 250 expected, sd ~15
  CHECK(w[17] == 1.0f);
  // Independent values: splitmix64's published outputs (Vigna's splitmix64.c): the first output from state 0 is
  // 0xe220a8397b1dcdaf = 16294208416658607535, and from state 1234567 it is 6457827717110365317. hash_route is
  // splitmix64(id ^ seed) mod n, so ids 0 and 1234567 with seed 0 and n = 1000 go to experts 535 and 317.
  {
    const std::vector<std::int64_t> published_ids = {0, 1234567};
    std::vector<expert_index> e(2);
    std::vector<float> ew(2);
    hash_route(published_ids.data(), 2, 1000, hash_options<std::int64_t>{}, matrix_view<expert_index>(e.data(), 2, 1),
               matrix_view<float>(ew.data(), 2, 1));
    CHECK(e == std::vector<expert_index>{535, 317});
  }

  const std::vector<int> freq = {10, 1, 7, 7, 3, 2};
  const std::vector<expert_index> table = balanced_hash_table(freq, 2);
  // Ids by frequency: 0 (10) -> e0, 2 (7) -> e1, 3 (7) -> e1 (7 < 10), 4 (3) -> e0, 5 (2) -> e0 (13 < 14), 1 -> e1.
  CHECK(table == std::vector<expert_index>{0, 1, 1, 1, 0, 0});
  hash_options<std::int64_t> with_table;
  with_table.table = table.data();
  with_table.table_size = table.size();
  CHECK_THROWS_WITH_AS(hash_route(ids.data(), 7, 2, with_table, matrix_view<expert_index>(idx.data(), 7, 1),
                                  matrix_view<float>(w.data(), 7, 1)),
                       doctest::Contains("token_ids = [6] = 6: must be >= 0 and < table_size"), error);
  hash_route(ids.data(), 6, 2, with_table, matrix_view<expert_index>(idx.data(), 6, 1), matrix_view<float>(w.data(), 6, 1));
  CHECK(std::equal(table.begin(), table.end(), idx.begin()));
  const std::int64_t negative = -3;
  CHECK_THROWS_WITH_AS(hash_route(&negative, 1, 2, hash_options<std::int64_t>{}, matrix_view<expert_index>(idx.data(), 1, 1),
                                  matrix_view<float>(w.data(), 1, 1)),
                       doctest::Contains("token_ids = [0] = -3"), error);

  // RRE: 3 domains over 16 experts -> groups [0, 5), [5, 10), [10, 16).
  std::vector<int> domains(tokens);
  for (std::size_t t = 0; t < tokens; ++t) domains[t] = static_cast<int>(t % 3);
  rre_route(ids.data(), domains.data(), tokens, n, 3, 42, matrix_view<expert_index>(idx.data(), tokens, 1),
            matrix_view<float>(w.data(), tokens, 1));
  std::vector<int> seen(n, 0);
  for (std::size_t t = 0; t < tokens; ++t) {
    const std::size_t lo = grap_block_begin(n, 3, static_cast<std::size_t>(domains[t])), hi = grap_block_begin(n, 3, static_cast<std::size_t>(domains[t]) + 1);
    REQUIRE(static_cast<std::size_t>(idx[t]) >= lo);
    REQUIRE(static_cast<std::size_t>(idx[t]) < hi);
    ++seen[static_cast<std::size_t>(idx[t])];
  }
  CHECK(std::count(seen.begin(), seen.end(), 0) == 0);
  domains[9] = 3;
  CHECK_THROWS_WITH_AS(rre_route(ids.data(), domains.data(), tokens, n, 3, 42, matrix_view<expert_index>(idx.data(), tokens, 1),
                                 matrix_view<float>(w.data(), tokens, 1)),
                       doctest::Contains("domains = [9] = 3: must be in [0, groups)"), error);
  CHECK_THROWS_WITH_AS(rre_route(ids.data(), domains.data(), tokens, n, 17, 42, matrix_view<expert_index>(idx.data(), tokens, 1),
                                 matrix_view<float>(w.data(), tokens, 1)),
                       doctest::Contains("groups = 17"), error);
}

TEST_CASE("update_expert_bias: Megatron-Core's sign rule") {
  std::vector<float> bias = {0, 0, 0, 0};
  const std::vector<std::int64_t> load = {10, 2, 4, 4};  // mean 5
  update_expert_bias(bias.data(), load.data(), 4, 0.001f);
  CHECK(bias == std::vector<float>{-0.001f, 0.001f, 0.001f, 0.001f});
  const std::vector<std::int64_t> even = {3, 3, 3, 3};
  update_expert_bias(bias.data(), even.data(), 4, 0.001f);
  CHECK(bias == std::vector<float>{-0.001f, 0.001f, 0.001f, 0.001f});
  CHECK_THROWS_WITH_AS(update_expert_bias(bias.data(), even.data(), 4, NAN), doctest::Contains("rate = nan: must be finite"), error);
  CHECK_THROWS_WITH_AS(update_expert_bias(bias.data(), static_cast<const std::int64_t*>(nullptr), 4, 0.1f),
                       doctest::Contains("load = null"), error);
  CHECK_THROWS_WITH_AS(update_expert_bias(bias.data(), even.data(), 0, 0.1f), doctest::Contains("n = 0: must be >= 1"), error);
  CHECK_THROWS_WITH_AS(balanced_hash_table(std::vector<double>{1.0, NAN}, 2), doctest::Contains("frequencies = [1] = nan"), error);
  CHECK_THROWS_WITH_AS(balanced_hash_table(std::vector<int>{1, -2}, 2), doctest::Contains("frequencies = [1] = -2"), error);
}

TEST_CASE("score_route: softmax after Top-k without scores takes the SIMD selection, bit for bit the scalar path") {
  std::mt19937 rng(41);
  for (const std::size_t n : {3u, 16u, 64u}) {
    for (const std::size_t k : {1u, 2u, 3u}) {
      const std::size_t tokens = 120;
      std::vector<double> logits = random_logits(rng, tokens * n, k == 2 ? 4 : 0);  // ties when k = 2
      for (std::size_t e = 0; e + 1 < n; ++e) logits[3 * n + e] = -inf;           // one selectable expert
      logits[5 * n + n / 2] = std::numeric_limits<double>::quiet_NaN();          // invalid
      for (std::size_t e = 0; e < n; ++e) logits[7 * n + e] = -inf;              // invalid: all masked
      logits[9 * n] = inf;                                                       // invalid
      logits[11 * n + 1] = -inf;                                                 // one masked expert
      for (const double scale : {1.0, 2.5}) {
        router_options<double> fast;
        fast.k = k;
        fast.softmax_before_topk = false;
        fast.scale = scale;
        const std::vector<double> zero_bias(n, 0.0);
        router_options<double> scalar = fast;
        scalar.expert_bias = zero_bias.data();  // the scalar path, same keys
        auto run = [&](const router_options<double>& o) {
          routed r;
          r.indices.assign(tokens * k, 7);
          r.weights.assign(tokens * k, 7.0);
          r.invalid = score_route(matrix_view<const double>(logits.data(), tokens, n), o,
                                  route_outputs<double>{{r.indices.data(), tokens, k}, {r.weights.data(), tokens, k}, {}, {}});
          return r;
        };
        const routed a = run(fast), b = run(scalar);
        CHECK(a.invalid == 3);
        CHECK(a.invalid == b.invalid);
        CHECK(a.indices == b.indices);
        CHECK(a.weights == b.weights);  // the same arithmetic in the same order
        CHECK(a.indices[3 * k] == static_cast<expert_index>(n - 1));
        if (k > 1) CHECK(a.indices[3 * k + 1] == no_expert);
        check_same(a, reference_route(logits, tokens, n, fast));
        // float, the type the PyTorch extension routes in: the same bit-for-bit agreement
        const std::vector<float> f(logits.begin(), logits.end());
        router_options<float> fast_f;
        fast_f.k = k;
        fast_f.softmax_before_topk = false;
        fast_f.scale = static_cast<float>(scale);
        const std::vector<float> zero_bias_f(n, 0.0f);
        router_options<float> scalar_f = fast_f;
        scalar_f.expert_bias = zero_bias_f.data();
        auto run_f = [&](const router_options<float>& o, std::vector<expert_index>& idx, std::vector<float>& w) {
          idx.assign(tokens * k, 7);
          w.assign(tokens * k, 7.0f);
          return score_route(matrix_view<const float>(f.data(), tokens, n), o,
                             route_outputs<float>{{idx.data(), tokens, k}, {w.data(), tokens, k}, {}, {}});
        };
        std::vector<expert_index> ia, ib;
        std::vector<float> wa, wb;
        CHECK(run_f(fast_f, ia, wa) == run_f(scalar_f, ib, wb));
        CHECK(ia == ib);
        CHECK(wa == wb);
      }
    }
  }
}
