// Golden parity, Megatron-Core's moe_utils.py: routing and token dropping, aux loss, z-loss (see golden_route_util.hpp).
#include "golden_route_util.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>

#include "locmoe/npy.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

using namespace locmoe_golden;

namespace {

// ---- Megatron-Core -----------------------------------------------------------------------------------------------

/// topk_routing_with_score_function's parameters as router_options.
locmoe::router_options<float> megatron_options(const json& p, const std::vector<float>& bias) {
  locmoe::router_options<float> o;
  o.k = p.at("topk").get<std::size_t>();
  o.softmax_before_topk = p.at("use_pre_softmax").get<bool>();
  if (p.at("score_function").get<std::string>() == "sigmoid") o.score = locmoe::score_function::sigmoid;
  if (p.at("expert_bias").get<bool>()) o.expert_bias = bias.data();
  if (!p.at("num_groups").is_null()) o.groups = p.at("num_groups").get<std::size_t>();
  if (!p.at("group_topk").is_null()) o.group_limit = p.at("group_topk").get<std::size_t>();
  if (!p.at("scaling_factor").is_null()) o.scale = p.at("scaling_factor").get<float>();
  return o;
}

/// One apply_router_token_dropping result (peers/README section 4; a route/mc_* case fills it from its fields).
struct mc_drop {
  double cf;
  std::string policy;
  bool pad;
  std::int64_t capacity;
  std::vector<std::int64_t> after;  // tokens_per_expert_after
  bool kept_defined;                // kept_routed_well_defined
  const json* final_experts;        // [T][], sorted by id
  const json* final_probs;          // [T][], or null: not compared
};

/// Capacity, counts after the drop and, where defined, the kept routed choices with their (not renormalized) probs.
void check_megatron_drop(tally& tl, const std::string& what, const routing<float>& r, std::size_t n, const mc_drop& d,
                         bool routing_defined) {
  locmoe::capacity_options o;  // min_capacity 0; Megatron never renormalizes after the drop
  o.capacity_factor = d.cf;
  o.policy = policy_of(d.policy);
  o.pad_to_capacity = d.pad;
  const auto a = assign(r, n, o);
  const std::size_t T = r.idx.size() / r.k;
  const auto C = a.stats.capacity;
  CHECK_MESSAGE(C == d.capacity, what << ": capacity ours " << C << ", theirs " << d.capacity);
  if (!d.pad) {
    if (routing_defined) same_counts(what + ": tokens_per_expert_after", a.kept, d.after);
  } else {
    // Megatron fills every buffer with unrouted tokens at prob 0 up to min(C, T) rows (with C > T it skips the drop
    // and puts every token on every expert: T rows). locmoe's padded buffer is C rows per expert whatever the data
    // (a planned shape: assign.hpp), the rows past the kept ones empty and counted in padded_slots. Compared: the
    // peer's rows per expert are min(C, T); ours are C, so padded_slots = n C - kept; and what is defined below
    // (the kept routed choices, per expert and per token).
    const std::int64_t rows = std::min<std::int64_t>(C, static_cast<std::int64_t>(T));
    CHECK_MESSAGE(d.after == std::vector<std::int64_t>(n, rows), what << ": after " << text(d.after) << ", min(C, T) " << rows);
    CHECK(a.stats.padded_slots == static_cast<std::int64_t>(n) * C - a.stats.kept);
    if (routing_defined && d.kept_defined) {  // kept per expert: the routed choices among the peer's final ones
      std::vector<std::int64_t> theirs_kept(n, 0);
      for (std::size_t t = 0; t < T; ++t) {
        const auto routed = ids(ours_routed(r, t));
        for (const auto& f : theirs((*d.final_experts)[t], json()))
          if (std::find(routed.begin(), routed.end(), f.expert) != routed.end()) ++theirs_kept[static_cast<std::size_t>(f.expert)];
      }
      same_counts(what + ": kept routed choices per expert", a.kept, theirs_kept);
    }
  }
  if (!routing_defined || !d.kept_defined) return;  // capacity_tie_experts, or the position policy's topk order
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<choice> peer;  // map AND final: the routed choices kept (pad_to_capacity adds unrouted ones)
    const auto routed = ids(ours_routed(r, t));
    for (const auto& f : theirs((*d.final_experts)[t], d.final_probs ? (*d.final_probs)[t] : json())) {
      if (std::find(routed.begin(), routed.end(), f.expert) != routed.end()) peer.push_back(f);
    }
    same_choices(tl, what + " token " + std::to_string(t), ours_kept(a, t), peer);
  }
}

std::vector<float> read_bias(const fs::path& file) {
  return fs::exists(file) ? locmoe::cli::npy::read_float32_vector(file.string(), "expert_bias") : std::vector<float>();
}

}  // namespace

TEST_CASE("Megatron-Core routing and token dropping: route/mc_*, peers/mcore_routing") {
  tally tl("Megatron-Core routing");
  for (const auto& g : route_cases("mc_")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    const auto bias = read_bias(golden_dir() / "route" / c.value("expert_bias_file", "none"));
    const json p = {{"topk", c.at("top_k")}, {"use_pre_softmax", true}, {"expert_bias", !bias.empty()},
                    {"score_function", c.value("score_function", "softmax")}, {"num_groups", c.value("num_groups", json())},
                    {"group_topk", c.value("group_topk", json())}, {"scaling_factor", nullptr}};
    const auto o = megatron_options(p, bias);
    const auto r = route(l, o);
    ++tl.cases;
    if (c.contains("selected")) {  // group-limited routing, dense output, no capacity
      for (std::size_t t = 0; t < l.tokens; ++t) {
        same_choices(tl, name + " token " + std::to_string(t), ours_routed(r, t), theirs(c.at("selected")[t], c.at("weight_of_selected")[t]));
      }
      continue;
    }
    // Top-k, then the "probs" drop; the manifest lists the kept experts without probs, and no tie flags.
    same_counts(name + ": tokens_per_expert", counts(r.idx, l.experts), ints(c.at("tokens_per_expert")));
    const mc_drop d{c.at("capacity_factor").get<double>(), "probs", false, c.at("capacity").get<std::int64_t>(),
                    ints(c.at("kept_per_expert")), true, &c.at("kept"), nullptr};
    check_megatron_drop(tl, name, r, l.experts, d, true);
    const auto ours = losses<float>(l, r.idx, o.k, 1, all_choices, locmoe::score_function::softmax, 1);
    close(tl, name + " aux_loss", ours.aux, c.at("aux_loss").get<double>(), loss_tol_f32);
    close(tl, name + " z_loss", ours.z, c.at("z_loss").get<double>(), loss_tol_f32);
    close_matrix(tl, name + " grad (aux + z)", ours.grad, route_grad(c), grad_tol_f32);
  }
  for (const auto& g : peer_cases("mcore_routing")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    const auto bias = read_bias(golden_dir() / "peers" / "mcore_routing" / (name + ".expert_bias.npy"));
    for (const auto& rc : c.at("routings")) {
      const auto& p = rc.at("params");
      const std::string what = name + " " + p.dump();
      if (p.at("score_function").get<std::string>() == "sqrtsoftplus") {
        MESSAGE(std::string(what + ": score function sqrtsoftplus is not supported; skipped"));
        continue;
      }
      REQUIRE_MESSAGE((!p.at("expert_bias").get<bool>() || bias.size() == l.experts), name << ": expert_bias.npy");
      const auto o = megatron_options(p, bias);
      const auto r = route(l, o);
      const json& ties = rc.at("topk_tie_tokens");  // null: group-limited, not computed (these inputs have no ties)
      const bool untied = ties.is_null() || ties.empty();
      // Megatron lists each token's experts sorted by id, we sort by score: compared as sets, probs aligned by id.
      for (std::size_t t = 0; t < l.tokens; ++t) {
        if (!listed(ties, t)) same_choices(tl, what + " token " + std::to_string(t), ours_routed(r, t), theirs(rc.at("topk_experts")[t], rc.at("topk_probs")[t]));
      }
      if (untied) same_counts(what + ": tokens_per_expert", counts(r.idx, l.experts), ints(rc.at("tokens_per_expert")));
      for (const auto& dj : rc.at("drops")) {
        const mc_drop d{dj.at("capacity_factor").get<double>(), dj.at("drop_policy").get<std::string>(),
                        dj.at("pad_to_capacity").get<bool>(), dj.at("expert_capacity").get<std::int64_t>(),
                        ints(dj.at("tokens_per_expert_after")), dj.at("kept_routed_well_defined").get<bool>(),
                        &dj.at("final_experts"), &dj.at("final_probs")};
        check_megatron_drop(tl, what + " cf " + num(d.cf) + " " + d.policy + (d.pad ? " pad" : ""), r, l.experts, d, untied);
        ++tl.cases;
      }
    }
  }
  tl.print();
}

namespace {

/// A result's padding mask (Megatron's code: true = padding), or an empty vector when there is none.
std::vector<bool> padding_of(const json& result, std::size_t tokens) {
  const json& m = result.at("padding_mask");
  if (m.is_null() || (m.is_boolean() && !m.get<bool>())) return {};
  REQUIRE_MESSAGE((m.is_array() && m.size() == tokens), "padding_mask: expected false or " << tokens << " values, got " << m.dump());
  std::vector<bool> pad;
  for (const auto& x : m) pad.push_back(x.is_boolean() ? x.get<bool>() : x.get<double>() != 0);
  return pad;
}

/// Padded tokens enter our losses as rows whose first choice is no_expert: idx [T x k] rows set to no_expert.
void mask_padding(std::vector<expert_index>& idx, std::size_t k, const std::vector<bool>& pad) {
  for (std::size_t t = 0; t < pad.size(); ++t) {
    if (pad[t]) std::fill_n(idx.begin() + static_cast<std::ptrdiff_t>(t * k), k, no_expert);
  }
}

/// A padded token's gradient row is 0, in ours and in theirs.
template <class S>
void check_padded_rows(const std::string& what, const std::vector<bool>& pad, const std::vector<S>& ours,
                       const std::vector<double>& peer, std::size_t n) {
  for (std::size_t i = 0; i < ours.size(); ++i) {
    if (pad.empty() || !pad[i / n]) continue;
    CHECK_MESSAGE((ours[i] == S(0) && peer[i] == 0.0), what << ": padded token " << i / n << " has a gradient");
  }
}

/// One loss against a result block: the value (`field` and `field`_f64) and the gradients `grad`/`grad_f64`,
/// float32 and float64 runs, and zero gradient rows for padded tokens.
template <class Float, class Double>
void check_loss_and_grad(tally& tl, const std::string& what, const json& res, const char* field, double ours_f,
                         double ours_d, const Float& f, const Double& d, const std::vector<bool>& pad,
                         std::size_t experts) {
  close(tl, what + " " + field, ours_f, res.at(field).get<double>(), loss_tol_f32);
  close(tl, what + " " + field + "_f64", ours_d, res.at(std::string(field) + "_f64").get<double>(), mc_tol_f64);
  close_matrix(tl, what + " grad", f.grad, flat(res.at("grad")), grad_tol_f32);
  close_matrix(tl, what + " grad_f64", d.grad, flat(res.at("grad_f64")), mc_tol_f64);
  check_padded_rows(what, pad, f.grad, flat(res.at("grad")), experts);
  check_padded_rows(what + " f64", pad, d.grad, flat(res.at("grad_f64")), experts);
}

}  // namespace

TEST_CASE("Megatron-Core aux loss: peers/mcore_aux_loss") {
  tally tl("Megatron-Core aux loss");
  for (const auto& g : peer_cases("mcore_aux_loss")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    for (const auto& res : c.at("results")) {
      const std::string sf = res.at("score_function");
      const auto k = res.at("topk").get<std::size_t>();
      const double coeff = res.at("coeff").get<double>();
      const std::string what = name + " " + sf + " k " + std::to_string(k) + " coeff " + num(coeff);
      const auto score = sf == "sigmoid" ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
      auto idx = route_k<float>(l, k, score).idx;  // a plain Top-k over the full scores, as the peer's aux path
      const auto pad = padding_of(res, l.tokens);
      mask_padding(idx, k, pad);
      const auto ours_counts = counts(idx, l.experts);
      if (!res.at("topk_tie_tokens").empty() && ours_counts != ints(res.at("tokens_per_expert"))) {
        MESSAGE(std::string(what + ": counts differ on torch.topk's tie order (topk_tie_tokens); not compared"));
        continue;
      }
      same_counts(what + ": tokens_per_expert", ours_counts, ints(res.at("tokens_per_expert")));
      const auto f = losses<float>(l, idx, k, coeff, all_choices, score);
      const auto d = losses<double>(l, idx, k, coeff, all_choices, score);  // f64: the float32 routing map, as the peer
      CHECK(static_cast<double>(f.tokens) == res.at("total_num_tokens").get<double>());
      check_loss_and_grad(tl, what, res, "loss", f.aux, d.aux, f, d, pad, l.experts);
      ++tl.cases;
    }
  }
  tl.print();
}

TEST_CASE("Megatron-Core z-loss: peers/mcore_z_loss") {
  tally tl("Megatron-Core z-loss");
  for (const auto& g : peer_cases("mcore_z_loss")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    for (const auto& res : c.at("results")) {
      const double coeff = res.at("coeff").get<double>();
      const std::string what = name + " coeff " + num(coeff);
      const auto pad = padding_of(res, l.tokens);
      std::vector<expert_index> idx(l.tokens, 0);  // [T x 1]: only a padded token's no_expert matters to z_loss
      mask_padding(idx, 1, pad);
      const auto f = losses<float>(l, idx, 1, 0, all_choices, locmoe::score_function::softmax, coeff);
      const auto d = losses<double>(l, idx, 1, 0, all_choices, locmoe::score_function::softmax, coeff);
      check_loss_and_grad(tl, what, res, "z_loss", f.z, d.z, f, d, pad, l.experts);
      ++tl.cases;
    }
  }
  tl.print();
}
