// Documented behaviours that no other test reached (issue 15's audit): the largest n, the overflow guards, empty
// batches through the gates and their backwards, NaN through the dense gate, caller-passed probabilities for the
// losses, and the routers' guards. Each against an independent expectation (the scalar reference, a recomputation,
// or the rule the header states), and each error by the argument it names.
#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/reference.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace locmoe;
using locmoe_test::error_argument;

TEST_CASE("contracts: n = max_experts (4096) routes as the reference does; n = 4097 is refused by name") {
  const std::size_t n = max_experts, tokens = 3, k = 5;
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(tokens * n), w(tokens * k), rw(tokens * k), p(tokens * n), rp(tokens * n);
  for (float& l : logits) l = normal(rng);
  logits[n - 1] = 50.0f;  // the last expert wins the first row
  std::vector<expert_index> idx(tokens * k), ridx(tokens * k);
  const matrix_view<const float> lv(logits.data(), tokens, n);
  CHECK(softmax_top_k(lv, {k, false}, {idx.data(), tokens, k}, {w.data(), tokens, k}, {p.data(), tokens, n}) == 0);
  reference::select(lv, k, true, false, matrix_view<expert_index>(ridx.data(), tokens, k), matrix_view<float>(rw.data(), tokens, k),
                    matrix_view<float>(rp.data(), tokens, n));
  CHECK(idx == ridx);
  CHECK(idx[0] == static_cast<expert_index>(n - 1));
  for (std::size_t i = 0; i < w.size(); ++i) CHECK(locmoe_test::relative_error(w[i], rw[i]) < 1e-5);

  std::vector<float> wide(n + 1, 0.0f);
  std::vector<expert_index> one(1);
  std::vector<float> one_w(1);
  CHECK(error_argument([&] {
          softmax_top_k(matrix_view<const float>(wide.data(), 1, n + 1), {1, false}, {one.data(), 1, 1}, {one_w.data(), 1, 1});
        }) == "n");
}

TEST_CASE("contracts: the overflow guards name the argument") {
  // Slots are int32: a capacity of 2^31 is refused by the assigner and the plan.
  capacity_options o;
  o.capacity = std::int64_t{1} << 31;
  capacity_assigner<float> assigner(4, o);
  std::vector<expert_index> idx = {0, 1};
  std::vector<float> w = {1, 1}, kw(2);
  std::vector<expert_index> e(2);
  std::vector<slot_index> s(2);
  CHECK(error_argument([&] {
          assigner.run(matrix_view<const expert_index>(idx.data(), 2, 1), matrix_view<const float>(w.data(), 2, 1),
                       {{e.data(), 2, 1}, {s.data(), 2, 1}, {kw.data(), 2, 1}});
        }) == "capacity");
  const topology topo = topology::uniform(2, 1, 4);
  std::vector<expert_index> kept = {0, 3};
  std::vector<slot_index> slots = {0, 0};
  CHECK(error_argument([&] {
          build_dispatch_plan({kept.data(), 2, 1}, {slots.data(), 2, 1}, std::int64_t{1} << 31, topo, token_ranks::contiguous_blocks());
        }) == "capacity");
  // token_bytes * rows sent must fit an int64: two rows of 2^62 bytes from rank 0 to rank 0 do not.
  std::vector<expert_index> both_local = {0, 1};
  std::vector<slot_index> first = {0, 0};
  const std::int32_t rank_zero[2] = {0, 0};
  // Experts 0 and 1 are both on rank 0: two rows 0 -> 0, so 2^61 bytes a row fit and 2^62 do not.
  CHECK(error_argument([&] {
          build_dispatch_plan({both_local.data(), 2, 1}, {first.data(), 2, 1}, 1, topo, rank_zero, std::int64_t{1} << 61);
        }) == "<no error>");
  CHECK(error_argument([&] {
          build_dispatch_plan({both_local.data(), 2, 1}, {first.data(), 2, 1}, 1, topo, rank_zero, std::int64_t{1} << 62);
        }) == "token_bytes");
  CHECK(error_argument([&] {
          build_dispatch_plan({both_local.data(), 2, 1}, {first.data(), 2, 1}, 1, topo, rank_zero,
                              std::numeric_limits<std::int64_t>::max() / 2 + 1);
        }) == "token_bytes");
  CHECK(error_argument([&] {
          build_dispatch_plan({both_local.data(), 2, 1}, {first.data(), 2, 1}, 1, topo, rank_zero, -1);
        }) == "token_bytes");
}

TEST_CASE("contracts: T = 0 through the gates and their backwards writes nothing and succeeds") {
  const std::size_t d = 8, n = 4;
  std::vector<float> bias(n, 0.5f), weight(n * d, 0.25f), grad_bias(n, 7.0f), grad_weight(n * d, 7.0f), sentinel = {7.0f};
  const grap_gate<float> grap{d, n, true, bias.data()};
  const dense_gate<float> dense{{weight.data(), n, d}, bias.data(), true};
  const matrix_view<const float> none_x(sentinel.data(), 0, d);
  const matrix_view<float> none_logits(sentinel.data(), 0, n), none_grad_x(sentinel.data(), 0, d);
  CHECK(grap_logits(grap, none_x, none_logits));
  CHECK(dense_logits(dense, none_x, none_logits));
  CHECK(grap_backward(grap, matrix_view<const float>(none_logits), matrix_view<const float>(none_logits), none_grad_x, grad_bias.data()));
  std::vector<float> workspace(dense_workspace_size<float>(d, n, true));
  CHECK(dense_backward(dense, none_x, matrix_view<const float>(none_logits), matrix_view<const float>(none_logits), none_grad_x,
                       matrix_view<float>(grad_weight.data(), n, d), grad_bias.data(), workspace.data(), workspace.size()));
  CHECK(sentinel[0] == 7.0f);
  // The parameter gradients are set (gating.hpp), here to sums over an empty batch: 0.
  for (const float g : grad_bias) CHECK(g == 0.0f);
  for (const float g : grad_weight) CHECK(g == 0.0f);
}

TEST_CASE("contracts: a NaN activation through the dense gate makes an invalid token, the others route") {
  const std::size_t d = 4, n = 3, tokens = 3, k = 1;
  std::vector<float> weight = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0};
  std::vector<float> x = {1, 2, 3, 4, 0, std::numeric_limits<float>::quiet_NaN(), 0, 0, 5, 1, 0, 0};
  std::vector<float> logits(tokens * n), w(tokens * k);
  std::vector<expert_index> idx(tokens * k);
  const dense_gate<float> gate{{weight.data(), n, d}, nullptr, false};
  CHECK(dense_route(gate, matrix_view<const float>(x.data(), tokens, d), {k, false},
                    {{idx.data(), tokens, k}, {w.data(), tokens, k}, {}, {logits.data(), tokens, n}}) == 1);
  CHECK(idx == std::vector<expert_index>{2, no_expert, 0});  // token 0: logits (1, 2, 3); token 2: (5, 1, 0)
  CHECK(w[1] == 0.0f);
}

TEST_CASE("contracts: caller-passed probabilities give the aux and locality losses of the computed ones") {
  const std::size_t tokens = 40, n = 8, k = 2;
  std::mt19937 rng(5);
  std::normal_distribution<double> normal(0.0, 1.5);
  std::vector<double> logits(tokens * n), p(tokens * n), w(tokens * k);
  for (double& l : logits) l = normal(rng);
  std::vector<expert_index> idx(tokens * k);
  const matrix_view<const double> lv(logits.data(), tokens, n);
  softmax_top_k(lv, {k, false}, {idx.data(), tokens, k}, {w.data(), tokens, k}, {p.data(), tokens, n});
  const topology topo = topology::uniform(4, 2, static_cast<std::int64_t>(n));
  locality_loss_options<double> lo;
  lo.topo = &topo;
  lo.token_rank = token_ranks::contiguous_blocks();
  const loss_inputs<double> computed{lv, {idx.data(), tokens, k}, {}}, passed{lv, {idx.data(), tokens, k}, {p.data(), tokens, n}};
  std::vector<double> g1(tokens * n, 0.0), g2(tokens * n, 0.0), g3(tokens * n, 0.0), g4(tokens * n, 0.0);
  const auto a1 = aux_loss(computed, aux_loss_options<double>{}, matrix_view<double>(g1.data(), tokens, n));
  const auto a2 = aux_loss(passed, aux_loss_options<double>{}, matrix_view<double>(g2.data(), tokens, n));
  const auto l1 = locality_loss(computed, lo, matrix_view<double>(g3.data(), tokens, n));
  const auto l2 = locality_loss(passed, lo, matrix_view<double>(g4.data(), tokens, n));
  CHECK(a1.value == a2.value);  // the same softmax kernel either way: bit for bit
  CHECK(l1.value == l2.value);
  CHECK(g1 == g2);
  CHECK(g3 == g4);
  // And the aux value is eq. (5) recomputed here: alpha n sum_e f_e P_e, f_e the share of choices, P_e the mean p.
  std::vector<double> f(n, 0.0), mean_p(n, 0.0);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t j = 0; j < k; ++j) f[static_cast<std::size_t>(idx[t * k + j])] += 1.0 / static_cast<double>(tokens * k);
    for (std::size_t e = 0; e < n; ++e) mean_p[e] += p[t * n + e] / static_cast<double>(tokens);
  }
  double want = 0;
  for (std::size_t e = 0; e < n; ++e) want += f[e] * mean_p[e];
  want *= 0.01 * static_cast<double>(n);
  CHECK(locmoe_test::relative_error(a1.value, want) < 1e-14);
}

TEST_CASE("contracts: the routers' guards (non-finite scale, hash-table entries out of range)") {
  std::vector<float> logits(8, 0.5f), w(2);
  std::vector<expert_index> idx(2);
  router_options<float> o;
  o.scale = std::numeric_limits<float>::infinity();
  CHECK(error_argument([&] { score_route(matrix_view<const float>(logits.data(), 2, 4), o, {{idx.data(), 2, 1}, {w.data(), 2, 1}, {}, {}}); }) ==
        "scale");
  o.scale = std::numeric_limits<float>::quiet_NaN();
  CHECK(error_argument([&] { score_route(matrix_view<const float>(logits.data(), 2, 4), o, {{idx.data(), 2, 1}, {w.data(), 2, 1}, {}, {}}); }) ==
        "scale");
  const std::vector<std::int64_t> ids = {0, 1};
  const std::vector<expert_index> table = {0, 4};  // expert 4 with n = 4: out of range
  CHECK(error_argument([&] {
          hash_route(ids.data(), 2, 4, hash_options<std::int64_t>{0, table.data(), table.size()}, matrix_view<expert_index>(idx.data(), 2, 1),
                     matrix_view<float>(w.data(), 2, 1));
        }) == "table");
  const std::vector<expert_index> negative = {0, -1};
  CHECK(error_argument([&] {
          hash_route(ids.data(), 2, 4, hash_options<std::int64_t>{0, negative.data(), negative.size()},
                     matrix_view<expert_index>(idx.data(), 2, 1), matrix_view<float>(w.data(), 2, 1));
        }) == "table");
  const std::vector<std::int64_t> beyond = {0, 2};  // id 2 with a table of 2 entries
  CHECK(error_argument([&] {
          hash_route(beyond.data(), 2, 4, hash_options<std::int64_t>{0, table.data(), 1}, matrix_view<expert_index>(idx.data(), 2, 1),
                     matrix_view<float>(w.data(), 2, 1));
        }) == "token_ids");
}

TEST_CASE("contracts: padding tokens (first choice no_expert) leave every loss as if they were not in the batch") {
  // losses.hpp: a token whose first choice is no_expert is skipped. Independent check: the same losses on the batch
  // with those tokens removed, which no golden case exercises (none has a padding mask).
  const std::size_t tokens = 30, n = 6, k = 2;
  std::mt19937 rng(21);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> logits(tokens * n), w(tokens * k);
  for (double& l : logits) l = normal(rng);
  std::vector<expert_index> idx(tokens * k);
  softmax_top_k(matrix_view<const double>(logits.data(), tokens, n), {k, false}, {idx.data(), tokens, k}, {w.data(), tokens, k});
  std::vector<bool> pad(tokens, false);
  for (const std::size_t t : {0, 7, 8, 19, 29}) pad[t] = true;
  std::vector<double> kept_logits;
  std::vector<expert_index> kept_idx;
  for (std::size_t t = 0; t < tokens; ++t) {
    if (pad[t]) {
      for (std::size_t j = 0; j < k; ++j) idx[t * k + j] = no_expert;
      continue;
    }
    kept_logits.insert(kept_logits.end(), logits.begin() + static_cast<std::ptrdiff_t>(t * n), logits.begin() + static_cast<std::ptrdiff_t>((t + 1) * n));
    kept_idx.insert(kept_idx.end(), idx.begin() + static_cast<std::ptrdiff_t>(t * k), idx.begin() + static_cast<std::ptrdiff_t>((t + 1) * k));
  }
  const std::size_t valid = kept_logits.size() / n;
  const topology topo = topology::uniform(2, 1, static_cast<std::int64_t>(n));
  std::vector<std::int32_t> rank_all(tokens), rank_kept;
  for (std::size_t t = 0; t < tokens; ++t) {
    rank_all[t] = static_cast<std::int32_t>(t % 2);
    if (!pad[t]) rank_kept.push_back(rank_all[t]);
  }
  for (const auto score : {score_function::softmax, score_function::sigmoid}) {
    CAPTURE(static_cast<int>(score));
    router_loss_options<double> o;
    o.aux.score = score;
    o.z_coeff = 1e-3;
    if (score == score_function::softmax) {  // the locality loss reads softmax probabilities
      o.locality.topo = &topo;
      o.locality.token_rank = rank_all.data();
    }
    std::vector<double> g_all(tokens * n, 0.0), g_kept(valid * n, 0.0);
    const auto all = router_losses<double>({{logits.data(), tokens, n}, {idx.data(), tokens, k}, {}}, o, {g_all.data(), tokens, n});
    o.locality.token_rank = rank_kept.data();
    const auto kept = router_losses<double>({{kept_logits.data(), valid, n}, {kept_idx.data(), valid, k}, {}}, o, {g_kept.data(), valid, n});
    CHECK(all.aux.tokens == valid);
    CHECK(all.aux.skipped == tokens - valid);
    CHECK(locmoe_test::relative_error(all.aux.value, kept.aux.value) < 1e-15);
    CHECK(locmoe_test::relative_error(all.z.value, kept.z.value) < 1e-15);
    CHECK(locmoe_test::relative_error(all.locality.value, kept.locality.value) < 1e-15);
    for (std::size_t t = 0, v = 0; t < tokens; ++t) {
      for (std::size_t e = 0; e < n; ++e) {
        if (pad[t]) {
          CHECK(g_all[t * n + e] == 0.0);
        } else {
          CHECK(locmoe_test::relative_error(g_all[t * n + e], g_kept[v * n + e]) < 1e-14);
        }
      }
      v += !pad[t];
    }
  }
}
