// `locmoe route`: route one batch of logits (or of hidden states through the GrAP gate), assign capacity
// slots on a topology, and report the losses with their gradient (plus, with --grad-weights, the task loss's
// through the routing weights). See docs/cli.md#locmoe-route.
#include "cli.hpp"
#include "npy.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace locmoe::cli {
namespace {

struct route_settings {
  std::string logits_file, hidden_file, gate = "grap";
  std::string router = "locmoe", score = "softmax", drop_policy = "position", aux_normalization = "all-choices";
  std::int64_t experts = 0, top_k = 1, max_nodes = 0, min_capacity = 0, capacity = -1, groups = 0;
  std::int64_t ranks = 1, ranks_per_node = 0, seed = 0;
  double capacity_factor = 1.0, aux_coeff = 0.01, z_coeff = 0.0, loc_smoothing = 0.01;
  std::optional<double> loc_coeff;
  bool softmax_after_topk = false, no_drop = false, pad_to_capacity = false, local_overflow = false, json = false;
  std::string expert_bias_file, expert_rank_file, token_rank_file, token_id_file, domain_file, grad_weights_file;
};

// Library argument -> the flag the user typed, for error messages.
const flag_names route_flags = {
    {"k", "--top-k"},
    {"capacity_factor", "--capacity-factor"},
    {"min_capacity", "--min-capacity"},
    {"capacity", "--capacity"},
    {"group_limit", "--max-nodes"},
    {"smoothing", "--loc-smoothing"},
    {"ranks", "--ranks"},
    {"ranks_per_node", "--ranks-per-node"},
    {"experts", "--experts"},
    {"rank_of_expert", "--expert-rank"},
    {"token_rank", "--token-rank"},
    {"expert_bias", "--expert-bias"},
    {"domains", "--domain"},
    {"groups", "--groups"},
    {"token_ids", "--token-id"},
    {"grad_weights", "--grad-weights"},
    {"n", "experts (columns of --logits)"},
};

void require_length(std::size_t got, std::size_t want, const std::string& flag, const char* what) {
  if (got != want) {
    throw usage_error(flag + ": has " + std::to_string(got) + " values, must have " + std::to_string(want) + " (" +
                      what + ")");
  }
}

/// --grad-weights: dL/d(weight) [T x k] of the routed choices, finite; empty without the flag.
std::vector<float> load_grad_weights(const std::string& file, std::size_t tokens, std::size_t k) {
  if (file.empty()) return {};
  npy::float_matrix m = npy::read_float32_matrix(file, "--grad-weights");
  if (m.rows != tokens || m.cols != k) {
    throw usage_error("--grad-weights: has shape " + std::to_string(m.rows) + "x" + std::to_string(m.cols) +
                      ", must be " + std::to_string(tokens) + "x" + std::to_string(k) +
                      " ([T, k]: one value per routed choice)");
  }
  for (std::size_t i = 0; i < m.values.size(); ++i) {
    if (!std::isfinite(m.values[i])) {
      throw usage_error("--grad-weights = [" + std::to_string(i / k) + ", " + std::to_string(i % k) +
                        "] = " + std::to_string(m.values[i]) + ": must be finite");
    }
  }
  return std::move(m.values);
}

/// The logits [T x n]: from --logits, or the GrAP gate (eq. 4, ReLU, no bias) over --hidden with --experts.
npy::float_matrix load_logits(const route_settings& s) {
  if (s.logits_file.empty() == s.hidden_file.empty()) throw usage_error("give exactly one of --logits and --hidden");
  if (!s.logits_file.empty()) return npy::read_float32_matrix(s.logits_file, "--logits");
  if (s.gate != "grap") throw usage_error("--gate = " + s.gate + ": only grap is built in (pass --logits for others)");
  if (s.experts < 1) throw usage_error("--experts: required with --hidden (the number of GrAP blocks n)");
  const npy::float_matrix x = npy::read_float32_matrix(s.hidden_file, "--hidden");
  const auto n = static_cast<std::size_t>(s.experts);
  if (n > x.cols) {
    throw usage_error("--experts = " + std::to_string(n) + ": must be <= the hidden size d = " + std::to_string(x.cols));
  }
  npy::float_matrix logits{x.rows, n, std::vector<float>(x.rows * n)};
  grap_logits(grap_gate<float>{x.cols, n, true, nullptr}, matrix_view<const float>(x.values.data(), x.rows, x.cols),
              matrix_view<float>(logits.values.data(), x.rows, n));
  return logits;
}

topology make_topology(const route_settings& s, std::size_t n) {
  if (s.ranks_per_node < 0) {
    throw usage_error("--ranks-per-node = " + std::to_string(s.ranks_per_node) + ": must be >= 1 (0: all on one node)");
  }
  const std::int64_t per_node = s.ranks_per_node > 0 ? s.ranks_per_node : s.ranks;
  if (s.expert_rank_file.empty()) {
    return checked(route_flags, [&] { return topology::uniform(s.ranks, per_node, static_cast<std::int64_t>(n)); });
  }
  std::vector<std::int32_t> rank_of_expert = npy::read_int32_vector(s.expert_rank_file, "--expert-rank");
  require_length(rank_of_expert.size(), n, "--expert-rank", "one rank per expert");
  return checked(route_flags, [&] {
    const topology nodes = topology::uniform(s.ranks, per_node, 1);
    return topology(nodes.node_of_rank_map(), std::move(rank_of_expert));
  });
}

template <class T>
nlohmann::ordered_json rows_json(const std::vector<T>& values, std::size_t rows, std::size_t cols) {
  nlohmann::ordered_json out = nlohmann::ordered_json::array();
  for (std::size_t t = 0; t < rows; ++t) {
    nlohmann::ordered_json row = nlohmann::ordered_json::array();
    for (std::size_t j = 0; j < cols; ++j) row.push_back(values[t * cols + j]);
    out.push_back(std::move(row));
  }
  return out;
}

std::vector<std::int32_t> optional_ids(const std::string& file, const char* flag, std::size_t tokens) {
  if (file.empty()) return {};
  std::vector<std::int32_t> v = npy::read_int32_vector(file, flag);
  require_length(v.size(), tokens, flag, "one value per token, the rows of the logits");
  return v;
}

void run_route(const route_settings& s) {
  const npy::float_matrix logits = load_logits(s);
  const std::size_t tokens = logits.rows, n = logits.cols;
  if (s.top_k < 1 || static_cast<std::uint64_t>(s.top_k) > n) {  // before T k is allocated
    throw usage_error("--top-k = " + std::to_string(s.top_k) + ": must satisfy 1 <= k <= n (" + std::to_string(n) +
                      " experts)");
  }
  const auto k = static_cast<std::size_t>(s.top_k);
  const topology topo = make_topology(s, n);
  const std::vector<std::int32_t> token_rank = optional_ids(s.token_rank_file, "--token-rank", tokens);
  const std::vector<float> grad_weights = load_grad_weights(s.grad_weights_file, tokens, k);
  const matrix_view<const float> l(logits.values.data(), tokens, n);

  // Route.
  std::vector<expert_index> indices(tokens * k);
  std::vector<float> weights(tokens * k), probabilities(tokens * n);
  const bool hashed = s.router == "hash" || s.router == "rre";
  if (hashed && k != 1) throw usage_error("--top-k = " + std::to_string(k) + ": the " + s.router + " router picks one expert");
  std::size_t invalid = 0;
  router_options<float> ro;
  ro.k = k;
  ro.score = s.score == "sigmoid" ? score_function::sigmoid : score_function::softmax;
  ro.softmax_before_topk = !s.softmax_after_topk;
  std::vector<float> bias;
  if (!s.expert_bias_file.empty()) {
    bias = npy::read_float32_vector(s.expert_bias_file, "--expert-bias");
    require_length(bias.size(), n, "--expert-bias", "one value per expert");
    ro.expert_bias = bias.data();
  }
  if (s.router == "node-limited") {
    if (s.max_nodes < 1) throw usage_error("--max-nodes = " + std::to_string(s.max_nodes) + ": required by the node-limited router, >= 1");
    ro.groups = topo.nodes();
    ro.group_limit = static_cast<std::size_t>(s.max_nodes);
    ro.expert_group = topo.node_of_expert_map().data();
  } else if (s.max_nodes != 0) {
    throw usage_error("--max-nodes: only the node-limited router takes it");
  }
  if (!hashed) {
    invalid = checked(route_flags, [&] {
      return score_route(l, ro, route_outputs<float>{{indices.data(), tokens, k}, {weights.data(), tokens, k},
                                                     {probabilities.data(), tokens, n}, {}});
    });
  } else {
    softmax(l, matrix_view<float>(probabilities.data(), tokens, n));
    std::vector<std::int32_t> ids = optional_ids(s.token_id_file, "--token-id", tokens);
    if (ids.empty()) {
      ids.resize(tokens);
      std::iota(ids.begin(), ids.end(), 0);
    }
    const matrix_view<expert_index> iv(indices.data(), tokens, 1);
    const matrix_view<float> wv(weights.data(), tokens, 1);
    if (s.router == "hash") {
      hash_options<std::int32_t> ho;
      ho.seed = static_cast<std::uint64_t>(s.seed);
      checked(route_flags, [&] { return hash_route(ids.data(), tokens, n, ho, iv, wv); });
    } else {
      if (s.domain_file.empty()) throw usage_error("--domain: required by the rre router");
      const std::vector<std::int32_t> domains = optional_ids(s.domain_file, "--domain", tokens);
      std::int64_t groups = s.groups;
      if (groups == 0) {  // the largest domain + 1, in 64 bits; rre_route checks each domain against it
        groups = 1;
        for (std::size_t t = 0; t < tokens; ++t) {
          if (domains[t] < 0) {
            throw usage_error("--domain = [" + std::to_string(t) + "] = " + std::to_string(domains[t]) +
                              ": must be >= 0");
          }
          groups = std::max<std::int64_t>(groups, std::int64_t{domains[t]} + 1);
        }
      }
      checked(route_flags, [&] {
        return rre_route(ids.data(), domains.data(), tokens, n, static_cast<std::size_t>(std::max<std::int64_t>(groups, 0)),
                         static_cast<std::uint64_t>(s.seed), iv, wv);
      });
    }
  }

  // Assign capacity slots.
  capacity_options co;
  co.capacity_factor = s.capacity_factor;
  co.min_capacity = s.min_capacity;
  co.capacity = s.capacity;
  co.drop = !s.no_drop;
  co.pad_to_capacity = s.pad_to_capacity;
  co.policy = s.drop_policy == "probs" ? drop_policy::probs : drop_policy::position;
  co.local_overflow = s.local_overflow;
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<float> kept_weight(tokens * k);
  std::vector<std::int64_t> before(n), after(n);
  capacity_assigner<float> assigner(n, co);
  const assignment_stats stats = checked(route_flags, [&] {
    return assigner.run(matrix_view<const expert_index>(indices.data(), tokens, k),
                        matrix_view<const float>(weights.data(), tokens, k),
                        assignment_outputs<float>{{expert.data(), tokens, k}, {slot.data(), tokens, k},
                                                  {kept_weight.data(), tokens, k}, before.data(), after.data()},
                        {&topo, token_rank.empty() ? token_ranks::contiguous_blocks() : token_ranks(token_rank.data()),
                         matrix_view<const float>(probabilities.data(), tokens, n)});
  });

  // Losses and d(aux + z + loc)/d logits, plus the task loss's through the weights with --grad-weights.
  std::vector<float> grad(tokens * n, 0.0f);
  const matrix_view<float> g(grad.data(), tokens, n);
  if (!s.grad_weights_file.empty()) {  // a score router (checked with the flags): `ro` is the forward's options
    checked(route_flags, [&] {
      return route_backward(l, ro, matrix_view<const expert_index>(indices.data(), tokens, k),
                            matrix_view<const float>(grad_weights.data(), tokens, k), g);
    });
  }
  const loss_inputs<float> in{l, matrix_view<const expert_index>(indices.data(), tokens, k),
                              ro.score == score_function::softmax ? matrix_view<const float>(probabilities.data(), tokens, n)
                                                                  : matrix_view<const float>()};
  aux_loss_options<float> ao;
  ao.coeff = static_cast<float>(s.aux_coeff);
  ao.score = hashed ? score_function::softmax : ro.score;
  ao.normalization = s.aux_normalization == "first-choice" ? aux_normalization::first_choice : aux_normalization::all_choices;
  const loss_value<float> aux = checked(route_flags, [&] { return aux_loss(in, ao, g); });
  const loss_value<float> z = checked(route_flags, [&] { return z_loss(in, static_cast<float>(s.z_coeff), g); });
  locality_loss_options<float> lo;
  lo.coeff = static_cast<float>(s.loc_coeff.value_or(s.router == "locmoe" ? 0.01 : 0.0));
  lo.smoothing = static_cast<float>(s.loc_smoothing);
  lo.topo = &topo;
  lo.token_rank = token_rank.empty() ? token_ranks::contiguous_blocks() : token_ranks(token_rank.data());
  const locality_value<float> loc = checked(route_flags, [&] { return locality_loss(in, lo, g); });
  locality_loss_options<float> unit = lo;
  unit.coeff = 1.0f;
  const float kl = checked(route_flags, [&] { return locality_loss(in, unit).value; });

  if (s.json) {
    nlohmann::ordered_json out;
    out["router"] = s.router;
    out["tokens"] = tokens;
    out["experts"] = n;
    out["top_k"] = k;
    out["capacity"] = stats.capacity;
    out["tokens_per_expert"] = before;
    out["kept_per_expert"] = after;
    out["routed_expert"] = rows_json(indices, tokens, k);
    out["expert"] = rows_json(expert, tokens, k);
    out["slot"] = rows_json(slot, tokens, k);
    out["weight"] = rows_json(kept_weight, tokens, k);
    out["aux_loss"] = number_or_null(aux.value);
    out["z_loss"] = number_or_null(z.value);
    out["loc_loss"] = number_or_null(loc.value);
    out["loc_kl"] = number_or_null(kl);
    out["assignment_kl"] = number_or_null(loc.assignment_kl);
    out["ranks_without_local_experts"] = loc.ranks_without_local_experts;
    out["invalid_tokens"] = invalid;
    out["stats"] = {{"routed", stats.routed},
                    {"kept", stats.kept},
                    {"dropped", stats.dropped},
                    {"rerouted", stats.rerouted},
                    {"drop_rate", stats.drop_rate},
                    {"max_load", stats.max_load},
                    {"mean_load", stats.mean_load},
                    {"padded_slots", stats.padded_slots},
                    {"node_local_fraction", stats.node_local_fraction},
                    {"rank_local_fraction", stats.rank_local_fraction},
                    {"tokens_without_local_expert", stats.tokens_without_local_expert}};
    out["grad_logits"] = rows_json(grad, tokens, n);
    std::cout << out.dump(1) << '\n';
    return;
  }
  auto list = [](const std::vector<std::int64_t>& v) {
    std::string text;
    for (const std::int64_t x : v) text += (text.empty() ? "" : " ") + std::to_string(x);
    return text;
  };
  std::printf("locmoe route: %zu tokens, %zu experts, top-%zu, router %s (%s), %zu ranks on %zu nodes\n", tokens, n,
              k, s.router.c_str(), s.score.c_str(), topo.ranks(), topo.nodes());
  std::printf("  capacity                   %lld per expert\n", static_cast<long long>(stats.capacity));
  std::printf("  tokens per expert          %s\n", list(before).c_str());
  std::printf("  kept per expert            %s\n", list(after).c_str());
  std::printf("  dropped                    %lld of %lld choices (%.2f%%), %lld moved to a local expert\n",
              static_cast<long long>(stats.dropped), static_cast<long long>(stats.routed), 100 * stats.drop_rate,
              static_cast<long long>(stats.rerouted));
  std::printf("  kept choices on own node   %.2f%% (own rank %.2f%%)\n", 100 * stats.node_local_fraction,
              100 * stats.rank_local_fraction);
  std::printf("  aux loss (eq. 5)           %.9g\n", static_cast<double>(aux.value));
  std::printf("  z loss                     %.9g\n", static_cast<double>(z.value));
  std::printf("  locality loss (eq. 6)      %.9g (KL %.6g; on the choices %.6g; %zu ranks without a local expert)\n",
              static_cast<double>(loc.value), static_cast<double>(kl), static_cast<double>(loc.assignment_kl),
              loc.ranks_without_local_experts);
  std::printf("  invalid tokens             %zu\n", invalid);
}

}  // namespace

void add_route_command(CLI::App& app) {
  auto s = std::make_shared<route_settings>();
  CLI::App* cmd = app.add_subcommand("route", "route logits (or hidden states through GrAP), assign capacity, losses");
  cmd->add_option("--logits", s->logits_file, "router logits, float32 .npy [T, n]");
  cmd->add_option("--hidden", s->hidden_file, "hidden states, float32 .npy [T, d], through --gate");
  cmd->add_option("--gate", s->gate, "gate for --hidden")->check(CLI::IsMember({"grap"}))->capture_default_str();
  add_integer_option(*cmd, "--experts", s->experts, "number of experts n (with --hidden)");
  cmd->add_option("--router", s->router, "router")
      ->check(CLI::IsMember({"switch", "hash", "rre", "locmoe", "node-limited"}))
      ->capture_default_str();
  add_integer_option(*cmd, "--top-k", s->top_k, "experts per token k");
  cmd->add_option("--score", s->score, "score function")->check(CLI::IsMember({"softmax", "sigmoid"}))->capture_default_str();
  cmd->add_flag("--softmax-after-topk", s->softmax_after_topk, "softmax over the k chosen logits (Megatron pre_softmax=False)");
  cmd->add_option("--expert-bias", s->expert_bias_file, "selection-only expert bias, float32 .npy [n]");
  add_integer_option(*cmd, "--max-nodes", s->max_nodes, "node-limited: nodes a token may reach (M)");
  add_integer_option(*cmd, "--groups", s->groups, "rre: number of domain groups (default: largest domain + 1)");
  add_integer_option(*cmd, "--seed", s->seed, "hash/rre: seed of the fixed hash");
  cmd->add_option("--capacity-factor", s->capacity_factor, "capacity factor")->capture_default_str();
  add_integer_option(*cmd, "--min-capacity", s->min_capacity, "lower bound on the capacity from the factor");
  add_integer_option(*cmd, "--capacity", s->capacity, "capacity per expert, as given (-1: from the factor)");
  cmd->add_option("--drop-policy", s->drop_policy, "which overflowing choices are kept")
      ->check(CLI::IsMember({"position", "probs"}))
      ->capture_default_str();
  cmd->add_flag("--no-drop", s->no_drop, "capacity = the largest load");
  cmd->add_flag("--pad-to-capacity", s->pad_to_capacity, "report every buffer padded to the capacity");
  cmd->add_flag("--local-overflow", s->local_overflow, "move an overflowing choice to a local expert with room");
  cmd->add_option("--grad-weights", s->grad_weights_file,
                  "dL/d(weight) of the routed choices, float32 .npy [T, k]: adds the task gradient to grad_logits");
  cmd->add_option("--aux-coeff", s->aux_coeff, "auxiliary loss coefficient alpha")->capture_default_str();
  cmd->add_option("--aux-normalization", s->aux_normalization, "aux loss counts")
      ->check(CLI::IsMember({"all-choices", "first-choice"}))
      ->capture_default_str();
  cmd->add_option("--z-coeff", s->z_coeff, "router z-loss coefficient")->capture_default_str();
  cmd->add_option("--loc-coeff", s->loc_coeff, "locality loss coefficient mu (default 0.01 for locmoe, else 0)");
  cmd->add_option("--loc-smoothing", s->loc_smoothing, "eps of the localized distribution")->capture_default_str();
  add_integer_option(*cmd, "--ranks", s->ranks, "expert-parallel ranks R");
  add_integer_option(*cmd, "--ranks-per-node", s->ranks_per_node, "ranks per node G (0, the default: all on one node)");
  cmd->add_option("--expert-rank", s->expert_rank_file, "rank of each expert, int32 .npy [n] (default: blocks)");
  cmd->add_option("--token-rank", s->token_rank_file, "source rank of each token, int32 .npy [T] (default: blocks)");
  cmd->add_option("--token-id", s->token_id_file, "token ids for hash/rre, int32 .npy [T] (default: 0..T-1)");
  cmd->add_option("--domain", s->domain_file, "domain of each token for rre, int32 .npy [T]");
  cmd->add_flag("--json", s->json, "one JSON object on stdout");
  cmd->callback([s, cmd] {
    // Flags that only some routers read are errors elsewhere, not silently ignored.
    const bool hashed = s->router == "hash" || s->router == "rre";
    auto only = [&](const char* flag, bool applies, const char* where) {
      if (cmd->count(flag) > 0 && !applies) throw usage_error(std::string(flag) + ": only " + where + " takes it");
    };
    only("--groups", s->router == "rre", "the rre router");
    only("--domain", s->router == "rre", "the rre router");
    only("--token-id", hashed, "the hash and rre routers");
    only("--seed", hashed, "the hash and rre routers");
    only("--experts", !s->hidden_file.empty(), "--hidden");
    only("--gate", !s->hidden_file.empty(), "--hidden");
    only("--score", !hashed, "a score router (switch, locmoe, node-limited)");
    only("--softmax-after-topk", !hashed, "a score router (switch, locmoe, node-limited)");
    only("--expert-bias", !hashed, "a score router (switch, locmoe, node-limited)");
    only("--grad-weights", !hashed, "a score router (switch, locmoe, node-limited)");
    for (const auto& [value, flag] : {std::pair{s->capacity_factor, "--capacity-factor"}, {s->aux_coeff, "--aux-coeff"},
                                      {s->z_coeff, "--z-coeff"}, {s->loc_smoothing, "--loc-smoothing"}}) {
      if (!std::isfinite(value)) throw usage_error(std::string(flag) + ": must be finite");
    }
    if (s->loc_coeff && !std::isfinite(*s->loc_coeff)) throw usage_error("--loc-coeff: must be finite");
    run_route(*s);
  });
}

}  // namespace locmoe::cli
