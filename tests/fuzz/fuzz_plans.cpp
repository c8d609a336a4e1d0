// Routers, capacity assignment, dispatch plans and exchange plans on random topologies and choices. Invariants:
//   assignment  every kept choice in exactly one slot of its expert, slots 0..kept-1 with none twice, no more
//               than the capacity; kept + dropped = routed; a choice keeps its expert unless rerouted; dropped
//               choices weigh 0; padded slots = n C - kept;
//   dispatch    send_tokens[src][dst] counts the kept pairs from src's tokens to dst's experts; the link totals,
//               the bytes and the packing order agree with it; every buffer row names its pair;
//   exchange    every route is a chain of hops from source to destination that respects its scheme's link
//               classes; the plan's stages carry exactly the bytes of the routes (All-Gather: at least); the
//               modelled time is finite and non-negative;
//   routers     score_route's choices are distinct experts in [0, n) then no_expert, weights finite for
//               finite logits; hash and rre choose an expert in range (rre: inside the domain's group).
// Bad arguments (indices out of range, token ranks out of range, an explicit map out of range) must be refused
// with a locmoe::error that names the argument.
#include "fuzz_input.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/exchange.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using locmoe::expert_index;
using locmoe::no_expert;
using locmoe::slot_index;

namespace {

std::optional<locmoe::topology> make_topology(locmoe_fuzz::input& in, std::size_t n) {
  const std::size_t ranks = in.size_between(1, 12);
  try {
    if (in.flag()) {
      std::size_t per_node = in.size_between(1, ranks);
      if (in.raw<std::uint8_t>() % 8 != 0)
        while (ranks % per_node != 0) --per_node;  // mostly valid; sometimes not, which must be refused
      return locmoe::topology::uniform(static_cast<std::int64_t>(ranks), static_cast<std::int64_t>(per_node),
                                       static_cast<std::int64_t>(n));
    }
    std::vector<std::int32_t> node_of_rank(ranks), rank_of_expert(n);
    const bool bad = in.raw<std::uint8_t>() % 16 == 0;
    for (auto& v : node_of_rank) v = static_cast<std::int32_t>(in.size_between(0, ranks - 1));
    for (auto& v : rank_of_expert) v = static_cast<std::int32_t>(in.size_between(0, ranks - 1));
    if (bad) (in.flag() ? node_of_rank[0] : rank_of_expert[0]) = in.flag() ? -1 : static_cast<std::int32_t>(ranks);
    return locmoe::topology(node_of_rank, rank_of_expert);
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    LOCMOE_FUZZ_CHECK(a == "ranks_per_node" || a == "node_of_rank" || a == "rank_of_expert", e.what());
    return std::nullopt;
  }
}

void check_routers(locmoe_fuzz::input& in, std::size_t n, std::size_t tokens) {
  // score_route with random options; invalid options must be refused by name.
  locmoe::router_options<double> o;
  o.k = in.size_between(1, std::min<std::size_t>(n, 6));
  o.score = in.flag() ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
  o.softmax_before_topk = in.flag();
  o.renormalize = in.flag();
  std::vector<double> bias(n);
  for (double& b : bias) b = in.value<double>(false);
  if (in.flag()) o.expert_bias = bias.data();
  if (in.flag()) {
    o.groups = in.size_between(1, n);
    o.group_limit = in.size_between(1, o.groups);
  }
  o.scale = in.flag() ? in.value<double>() : 1.0;
  std::vector<double> logits(tokens * n);
  bool finite = true;
  for (double& l : logits) finite = std::isfinite(l = in.value<double>()) && finite;
  std::vector<expert_index> idx(tokens * o.k, 99);
  std::vector<double> w(tokens * o.k);
  try {
    const std::size_t invalid = locmoe::score_route(locmoe::matrix_view<const double>(logits.data(), tokens, n), o,
                                                    {{idx.data(), tokens, o.k}, {w.data(), tokens, o.k}, {}, {}});
    LOCMOE_FUZZ_CHECK(invalid <= tokens, "invalid count");
    LOCMOE_FUZZ_CHECK(!finite || invalid == 0, "finite logits make no invalid token");
    for (std::size_t t = 0; t < tokens; ++t) {
      std::set<expert_index> seen;
      bool ended = false;
      for (std::size_t j = 0; j < o.k; ++j) {
        const expert_index e = idx[t * o.k + j];
        if (e == no_expert) {
          ended = true;
          LOCMOE_FUZZ_CHECK(w[t * o.k + j] == 0, "no_expert weighs 0");
          continue;
        }
        LOCMOE_FUZZ_CHECK(!ended && e >= 0 && static_cast<std::size_t>(e) < n && seen.insert(e).second,
                          "distinct experts in range, then no_expert");
        if (finite && std::isfinite(o.scale)) LOCMOE_FUZZ_CHECK(std::isfinite(w[t * o.k + j]), "finite weight");
      }
    }
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    LOCMOE_FUZZ_CHECK(a == "k" || a == "groups" || a == "group_limit" || a == "scale" || a == "expert_bias", e.what());
  }

  // hash and rre.
  std::vector<std::int64_t> ids(tokens);
  std::vector<std::int32_t> domains(tokens);
  const std::size_t groups = in.size_between(1, n);
  for (std::size_t t = 0; t < tokens; ++t) {
    ids[t] = static_cast<std::int64_t>(in.raw<std::uint32_t>()) - (in.raw<std::uint8_t>() % 32 == 0 ? 1LL << 32 : 0);
    domains[t] = static_cast<std::int32_t>(in.size_between(0, groups)) - (in.raw<std::uint8_t>() % 32 == 0);
  }
  std::vector<expert_index> one(tokens, 99);
  std::vector<float> ones(tokens);
  const std::uint64_t seed = in.raw<std::uint64_t>();
  try {
    locmoe::hash_route(ids.data(), tokens, n, locmoe::hash_options<std::int64_t>{seed, nullptr, 0},
                       locmoe::matrix_view<expert_index>(one.data(), tokens, 1), locmoe::matrix_view<float>(ones.data(), tokens, 1));
    for (const expert_index e : one) LOCMOE_FUZZ_CHECK(e >= 0 && static_cast<std::size_t>(e) < n, "hash expert in range");
  } catch (const locmoe::error& e) {
    LOCMOE_FUZZ_CHECK(std::string(e.argument()) == "token_ids", e.what());
  }
  try {
    locmoe::rre_route(ids.data(), domains.data(), tokens, n, groups, seed,
                      locmoe::matrix_view<expert_index>(one.data(), tokens, 1), locmoe::matrix_view<float>(ones.data(), tokens, 1));
    for (std::size_t t = 0; t < tokens; ++t) {
      const auto g = static_cast<std::size_t>(domains[t]);
      const std::size_t begin = g * n / groups, end = (g + 1) * n / groups;
      LOCMOE_FUZZ_CHECK(static_cast<std::size_t>(one[t]) >= begin && static_cast<std::size_t>(one[t]) < end,
                        "rre expert inside the domain's group");
    }
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    LOCMOE_FUZZ_CHECK(a == "token_ids" || a == "domains", e.what());
  }
}

void check_exchange(const locmoe::topology& topo, const std::vector<std::int64_t>& send, locmoe_fuzz::input& in) {
  const std::size_t R = topo.ranks();
  const locmoe::exchange_router router(topo);
  for (const auto scheme : {locmoe::exchange_scheme::flat, locmoe::exchange_scheme::split_gather,
                            locmoe::exchange_scheme::two_level}) {
    for (const bool replicate : {false, true}) {
      if (replicate && scheme != locmoe::exchange_scheme::split_gather) continue;
      const auto plan = locmoe::build_exchange_plan(send, topo, {scheme, replicate});
      // What the routes carry, stage by stage and link by link.
      std::map<std::tuple<std::size_t, std::int32_t, std::int32_t>, std::int64_t> expected;
      std::int64_t local = 0;
      for (std::size_t s = 0; s < R; ++s) {
        for (std::size_t t = 0; t < R; ++t) {
          const std::int64_t bytes = send[s * R + t];
          if (s == t) {
            local += bytes;
            continue;
          }
          const auto hops = router.route(scheme, s, t);
          std::int32_t at = static_cast<std::int32_t>(s);
          std::size_t last_stage = 0;
          bool first = true;
          for (const auto& h : hops) {
            LOCMOE_FUZZ_CHECK(h.from == at && h.from != h.to && (first || h.stage > last_stage), "a chain of hops");
            const bool inter = topo.node_of_rank(static_cast<std::size_t>(h.from)) != topo.node_of_rank(static_cast<std::size_t>(h.to));
            if (scheme == locmoe::exchange_scheme::split_gather) LOCMOE_FUZZ_CHECK(inter == (h.stage == 0), "split_gather: stage 0 crosses nodes, stage 1 stays");
            if (scheme == locmoe::exchange_scheme::two_level) LOCMOE_FUZZ_CHECK(!inter || h.stage == 1, "two_level: only stage 1 crosses nodes");
            if (bytes > 0) expected[{h.stage, h.from, h.to}] += bytes;
            at = h.to;
            last_stage = h.stage;
            first = false;
          }
          LOCMOE_FUZZ_CHECK(at == static_cast<std::int32_t>(t), "the route ends at the destination");
        }
      }
      LOCMOE_FUZZ_CHECK(plan.local_bytes == local, "local bytes");
      std::array<std::int64_t, locmoe::link_class_count> totals{};
      for (std::size_t stage = 0; stage < plan.stages.size(); ++stage) {
        std::array<std::int64_t, locmoe::link_class_count> bytes{}, messages{};
        for (const auto& tr : plan.stages[stage].transfers) {
          LOCMOE_FUZZ_CHECK(tr.bytes > 0 && tr.source != tr.destination, "a transfer moves bytes between ranks");
          const auto c = static_cast<std::size_t>(topo.node_of_rank(static_cast<std::size_t>(tr.source)) !=
                                                  topo.node_of_rank(static_cast<std::size_t>(tr.destination)));
          bytes[c] += tr.bytes;
          ++messages[c];
          const auto found = expected.find({stage, tr.source, tr.destination});
          const std::int64_t want = found == expected.end() ? 0 : found->second;
          if (replicate && stage == 1) {
            LOCMOE_FUZZ_CHECK(tr.bytes >= want, "the All-Gather carries at least the routed rows");
          } else {
            LOCMOE_FUZZ_CHECK(tr.bytes == want, "a stage carries exactly its routes' bytes");
          }
          if (found != expected.end()) expected.erase(found);
        }
        LOCMOE_FUZZ_CHECK(bytes == plan.stages[stage].bytes && messages == plan.stages[stage].messages, "stage totals");
        for (std::size_t c = 0; c < totals.size(); ++c) totals[c] += bytes[c];
      }
      LOCMOE_FUZZ_CHECK(expected.empty(), "every routed hop is in the plan");
      LOCMOE_FUZZ_CHECK(totals == plan.total_bytes, "plan totals");

      locmoe::comm_model model;
      model.intra_node = {in.value<double>(false) * 1e-6 + 1e-6, 1e9 * static_cast<double>(1 + in.size_between(0, 100))};
      model.inter_node = {in.value<double>(false) * 1e-6 + 1e-6, 1e9 * static_cast<double>(1 + in.size_between(0, 100))};
      if (model.intra_node.latency_seconds < 0 || model.inter_node.latency_seconds < 0) {
        try {
          locmoe::model_exchange_time(plan, topo, model);
          locmoe_fuzz::fail("a negative latency was accepted");
        } catch (const locmoe::error&) {
        }
        continue;
      }
      const auto time = locmoe::model_exchange_time(plan, topo, model);
      LOCMOE_FUZZ_CHECK(std::isfinite(time.seconds) && time.seconds >= 0, "modelled time finite, non-negative");
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  locmoe_fuzz::input in(data, size);
  const std::size_t n = in.size_between(1, 40);
  const std::size_t tokens = in.size_between(0, 40);
  check_routers(in, n, tokens);
  const auto topo = make_topology(in, n);
  if (!topo) return 0;
  const std::size_t R = topo->ranks(), k = in.size_between(1, std::min<std::size_t>(n, 4));

  // Choices: distinct experts per token, or anything in [-1, n) (repeats allowed), rarely out of range.
  std::vector<expert_index> indices(tokens * k);
  std::vector<float> weights(tokens * k), scores(tokens * n);
  bool bad_index = false;
  for (std::size_t i = 0; i < indices.size(); ++i) {
    indices[i] = static_cast<expert_index>(in.size_between(0, n)) - 1;
    if (in.raw<std::uint8_t>() % 64 == 0) {
      indices[i] = in.flag() ? -2 : static_cast<expert_index>(n);
      bad_index = true;
    }
    weights[i] = in.value<float>();
  }
  for (float& s : scores) s = std::abs(in.value<float>(false));
  std::vector<std::int32_t> token_rank(tokens);
  bool bad_rank = false;
  for (auto& r : token_rank) {
    r = static_cast<std::int32_t>(in.size_between(0, R - 1));
    if (in.raw<std::uint8_t>() % 64 == 0) r = static_cast<std::int32_t>(R), bad_rank = true;
  }

  locmoe::capacity_options options;
  options.capacity = in.flag() ? static_cast<std::int64_t>(in.size_between(0, 12)) : -1;
  options.capacity_factor = 0.25 * static_cast<double>(in.size_between(1, 12));
  options.min_capacity = static_cast<std::int64_t>(in.size_between(0, 3));
  options.drop = in.raw<std::uint8_t>() % 8 != 0;
  options.pad_to_capacity = in.flag();
  options.policy = in.flag() ? locmoe::drop_policy::probs : locmoe::drop_policy::position;
  options.local_overflow = in.flag();
  options.renormalize_kept = in.flag();

  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<float> weight(tokens * k);
  std::vector<std::int64_t> load(n), kept(n);
  locmoe::capacity_assigner<float> assigner(n, options);
  locmoe::assignment_context<float> context;
  context.topo = &*topo;
  context.token_rank = token_rank.data();
  context.scores = {scores.data(), tokens, n};
  const locmoe::matrix_view<const expert_index> index_view(indices.data(), tokens, k);
  locmoe::assignment_stats stats;
  try {
    stats = assigner.run(index_view, {weights.data(), tokens, k},
                         {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {weight.data(), tokens, k}, load.data(), kept.data()},
                         context);
    LOCMOE_FUZZ_CHECK(!bad_index && !bad_rank, "bad input accepted by the assigner");
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    LOCMOE_FUZZ_CHECK((bad_index && a == "indices") || (bad_rank && a == "token_rank"), e.what());
    return 0;
  }

  const std::int64_t C = stats.capacity;
  std::int64_t routed = 0;
  std::vector<std::int64_t> routed_to(n);
  for (const expert_index e : indices)
    if (e != no_expert) ++routed, ++routed_to[static_cast<std::size_t>(e)];
  std::vector<std::set<slot_index>> slots(n);
  std::int64_t kept_total = 0;
  for (std::size_t i = 0; i < expert.size(); ++i) {
    const expert_index e = expert[i];
    if (e == no_expert) {
      LOCMOE_FUZZ_CHECK(slot[i] == -1 && weight[i] == 0, "a dropped choice has no slot and weight 0");
      continue;
    }
    LOCMOE_FUZZ_CHECK(e >= 0 && static_cast<std::size_t>(e) < n, "kept expert in range");
    LOCMOE_FUZZ_CHECK(options.local_overflow || e == indices[i], "a choice keeps its expert unless rerouted");
    LOCMOE_FUZZ_CHECK(slot[i] >= 0 && slot[i] < C, "slot inside the capacity");
    LOCMOE_FUZZ_CHECK(slots[static_cast<std::size_t>(e)].insert(slot[i]).second, "no slot twice");
    ++kept_total;
  }
  for (std::size_t e = 0; e < n; ++e) {
    const auto count = static_cast<std::int64_t>(slots[e].size());
    LOCMOE_FUZZ_CHECK(kept[e] == count && load[e] == routed_to[e], "per-expert counts");
    LOCMOE_FUZZ_CHECK(count == 0 || *slots[e].rbegin() == count - 1, "slots 0..kept-1");
    if (!options.local_overflow && options.policy == locmoe::drop_policy::position)
      LOCMOE_FUZZ_CHECK(count == std::min(routed_to[e], C), "position policy keeps min(load, C)");
  }
  LOCMOE_FUZZ_CHECK(stats.routed == routed && stats.kept == kept_total && stats.kept + stats.dropped == stats.routed,
                    "kept + dropped = routed");
  LOCMOE_FUZZ_CHECK(options.drop || stats.dropped == 0, "no drop");
  LOCMOE_FUZZ_CHECK(stats.padded_slots == (options.pad_to_capacity ? static_cast<std::int64_t>(n) * C - kept_total : 0), "padded slots");

  // The dispatch plan.
  const std::int64_t token_bytes = static_cast<std::int64_t>(in.size_between(0, 1 << 20));
  const auto plan = locmoe::build_dispatch_plan({expert.data(), tokens, k}, {slot.data(), tokens, k}, C, *topo,
                                                token_rank.data(), token_bytes);
  std::vector<std::int64_t> send(R * R);
  std::int64_t intra_rank = 0, intra_node = 0, inter_node = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = expert[t * k + j];
      if (e == no_expert) continue;
      const auto src = static_cast<std::size_t>(token_rank[t]);
      const auto dst = static_cast<std::size_t>(topo->rank_of_expert(static_cast<std::size_t>(e)));
      ++send[src * R + dst];
      if (src == dst) ++intra_rank;
      else if (topo->node_of_rank(src) == topo->node_of_rank(dst)) ++intra_node;
      else ++inter_node;
      const auto row = static_cast<std::size_t>(e) * static_cast<std::size_t>(C) + static_cast<std::size_t>(slot[t * k + j]);
      LOCMOE_FUZZ_CHECK(plan.pair_of_row.at(row) == static_cast<std::int32_t>(t * k + j), "the buffer row names its pair");
    }
  }
  LOCMOE_FUZZ_CHECK(plan.send_tokens == send, "send_tokens counts the kept pairs");
  LOCMOE_FUZZ_CHECK(plan.intra_rank == intra_rank && plan.intra_node == intra_node && plan.inter_node == inter_node, "link totals");
  for (std::size_t i = 0; i < send.size(); ++i) LOCMOE_FUZZ_CHECK(plan.send_bytes[i] == send[i] * token_bytes, "bytes");
  LOCMOE_FUZZ_CHECK(static_cast<std::int64_t>(plan.order.size()) == kept_total && plan.send_offset.back() == kept_total, "order holds every kept pair");
  for (std::size_t src = 0; src < R; ++src) {
    for (std::size_t dst = 0; dst < R; ++dst) {
      const auto begin = plan.send_offset[src * R + dst], end = plan.send_offset[src * R + dst + 1];
      LOCMOE_FUZZ_CHECK(end - begin == send[src * R + dst], "one range per (src, dst)");
      for (auto i = begin; i < end; ++i) {
        const auto pair = static_cast<std::size_t>(plan.order[static_cast<std::size_t>(i)]);
        const auto e = static_cast<std::size_t>(expert[pair]);
        LOCMOE_FUZZ_CHECK(static_cast<std::size_t>(token_rank[pair / k]) == src &&
                              static_cast<std::size_t>(topo->rank_of_expert(e)) == dst, "pair in its range");
        if (i > begin) {
          const auto prev = static_cast<std::size_t>(plan.order[static_cast<std::size_t>(i - 1)]);
          LOCMOE_FUZZ_CHECK(std::make_pair(expert[prev], slot[prev]) < std::make_pair(expert[pair], slot[pair]),
                            "expert-major, then slot");
        }
      }
    }
  }
  check_exchange(*topo, plan.send_bytes, in);
  return 0;
}
