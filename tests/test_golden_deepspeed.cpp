// Golden parity, DeepSpeed's sharded_moe.py gates: top1gating, topkgating, top2gating (see golden_route_util.hpp).
#include "golden_route_util.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/losses.hpp>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

using namespace locmoe_golden;

namespace {

// ---- DeepSpeed -------------------------------------------------------------------------------------------------

/// DeepSpeed's result of one top1gating/topkgating/top2gating run.
struct ds_run {
  double cf;
  std::int64_t min_capacity, capacity;
  bool drop;
  std::string policy;
  std::vector<std::int64_t> exp_counts, kept_per_expert;
};

using peer_choices = std::function<std::vector<choice>(std::size_t)>;  // a token's kept choices; empty: not compared

/// DeepSpeed's l_aux and its gradient in float64, written here from peers/README's formulas (not from losses.hpp):
/// l = (E / k) sum_e me_e ce_e, me_e = mean_t softmax(l_t)_e, ce_e = (choices of e) / T over all k choices or the
/// first only; dl/dl_ti = (E / (k T)) p_ti (ce_i - sum_e p_te ce_e). With ce_in_float32, ce is rounded to float as
/// DeepSpeed computes it (mean(mask.float())): that is what its *_f64 runs hold.
struct emulated_aux {
  double value = 0;
  std::vector<double> grad;
};
emulated_aux deepspeed_aux(const logits_file& l, const std::vector<expert_index>& idx, std::size_t k, bool first_only,
                           bool ce_in_float32) {
  const std::size_t T = l.tokens, E = l.experts, used = first_only ? 1 : k;
  std::vector<double> p(T * E), me(E, 0.0), ce(E, 0.0);
  for (std::size_t t = 0; t < T; ++t) {
    const double* row = l.d.data() + t * E;
    const double m = *std::max_element(row, row + E);
    double sum = 0;
    for (std::size_t e = 0; e < E; ++e) sum += p[t * E + e] = std::exp(row[e] - m);
    for (std::size_t e = 0; e < E; ++e) me[e] += (p[t * E + e] /= sum) / static_cast<double>(T);
    for (std::size_t j = 0; j < used; ++j) ce[static_cast<std::size_t>(idx[t * k + j])] += 1.0;
  }
  for (double& c : ce) c = ce_in_float32 ? static_cast<double>(static_cast<float>(c / static_cast<double>(T))) : c / static_cast<double>(T);
  emulated_aux out;
  const double scale = static_cast<double>(E) / static_cast<double>(used);
  for (std::size_t e = 0; e < E; ++e) out.value += scale * me[e] * ce[e];
  out.grad.resize(T * E);
  for (std::size_t t = 0; t < T; ++t) {
    double pce = 0;
    for (std::size_t e = 0; e < E; ++e) pce += p[t * E + e] * ce[e];
    for (std::size_t e = 0; e < E; ++e)
      out.grad[t * E + e] = scale / static_cast<double>(T) * p[t * E + e] * (ce[e] - pce);
  }
  return out;
}

/// The *_f64 comparisons at ~1e-15: the peer against the emulation with DeepSpeed's float32 ce, and ours against the
/// emulation with ce in double (what locmoe computes). Together they tighten the direct comparison, which ce's
/// rounding holds at 2^-24 for the loss and 1e-6 for the gradient.
void check_f64_aux(tally& tl, const std::string& what, const logits_file& l, const std::vector<expert_index>& idx,
                   std::size_t k, bool first_only, double ours, const double* theirs, const std::vector<double>* ours_grad,
                   const json* theirs_grad) {
  // 2e-15 for the peer, whose float64 autograd the formula follows; 4e-15 for ours, whose different order of
  // operations on a cancelling sum measures 2.0e-15 (ds_topk t100_e16) against max |grad|.
  constexpr double tol = 2e-15, ours_tol = 4e-15;
  const emulated_aux as_deepspeed = deepspeed_aux(l, idx, k, first_only, true), exact = deepspeed_aux(l, idx, k, first_only, false);
  if (theirs) {  // the values
    close(tl, what + " l_aux_f64 (peer vs the formula with float32 ce)", as_deepspeed.value, *theirs, tol);
    close(tl, what + " l_aux_f64 (ours vs the formula)", ours, exact.value, ours_tol);
  }
  if (ours_grad) {
    close_matrix(tl, what + " grad_l_aux_f64 (peer vs the formula with float32 ce)", as_deepspeed.grad, flat(*theirs_grad), tol);
    close_matrix(tl, what + " grad_l_aux_f64 (ours vs the formula)", *ours_grad, exact.grad, ours_tol);
  }
}

/// One DeepSpeed run through capacity_assigner: capacity and counts (if counts_defined), kept sets where given.
/// DS topkgating/top2gating renormalize the kept gates (renormalize_kept); top1gating does not.
void check_ds_run(tally& tl, const std::string& what, const routing<float>& r, std::size_t n, const ds_run& x,
                  bool counts_defined, bool renormalize, const peer_choices& peer_kept) {
  locmoe::capacity_options o;
  o.capacity_factor = x.cf;
  o.min_capacity = x.min_capacity;
  o.drop = x.drop;
  o.policy = policy_of(x.policy);
  o.renormalize_kept = renormalize;
  const auto a = assign(r, n, o);
  CHECK_MESSAGE(a.stats.capacity == x.capacity, what << ": capacity ours " << a.stats.capacity << ", theirs " << x.capacity);
  if (counts_defined) {
    same_counts(what + ": tokens_per_expert", a.routed, x.exp_counts);
    same_counts(what + ": kept_per_expert", a.kept, x.kept_per_expert);
  }
  for (std::size_t t = 0; peer_kept && t < r.idx.size() / r.k; ++t) {
    same_choices(tl, what + " token " + std::to_string(t), ours_kept(a, t), peer_kept(t));
  }
  ++tl.cases;
}

std::vector<std::int64_t> kept_counts(const json& kept_lists, std::size_t n) {
  std::vector<std::int64_t> c(n, 0);
  for (const auto& token : kept_lists) {
    for (const auto& e : token) ++c[e.get<std::size_t>()];
  }
  return c;
}

/// A route/ds_* manifest case (drop_tokens=True): capacity, counts, kept sets when listed, aux_loss and gradient.
void check_ds_route_case(tally& tl, const golden_case& g, const std::string& policy, locmoe::aux_normalization norm) {
  const json& c = g.c;
  const auto k = c.at("top_k").get<std::size_t>();
  const auto r = route_k<float>(g.l, k);
  const ds_run x{c.at("capacity_factor").get<double>(), c.at("min_capacity").get<std::int64_t>(),
                 c.at("capacity").get<std::int64_t>(), true, policy, ints(c.at("tokens_per_expert")),
                 ints(c.at("kept_per_expert"))};
  peer_choices kept;  // top1gating (kept_identity_defined) lists no kept sets; topkgating "position" is deterministic
  if (c.contains("kept")) kept = [&c](std::size_t t) { return theirs(c.at("kept")[t]); };
  check_ds_run(tl, g.name, r, g.l.experts, x, true, k > 1, kept);
  const auto ours = losses<float>(g.l, r.idx, k, 1, norm);
  close(tl, g.name + " aux_loss", ours.aux, c.at("aux_loss").get<double>(), loss_tol_f32);
  close_matrix(tl, g.name + " grad", ours.grad, route_grad(c), grad_tol_f32);
}

}  // namespace

TEST_CASE("DeepSpeed top1gating: route/ds_top1_*, peers/ds_top1") {
  tally tl("DeepSpeed top1gating");
  for (const auto& g : route_cases("ds_top1_")) check_ds_route_case(tl, g, "position", first_choice);
  for (const auto& g : peer_cases("ds_top1")) {
    const json& c = g.c;  // no structured bindings: doctest's message lambdas cannot capture them in C++17
    const std::string& name = g.name;
    const logits_file& l = g.l;
    const auto r = route_k<float>(l, 1);
    // DS takes argmax of the float32 softmax (first index among equal gates); we rank by logits (lower index among
    // equal logits). For a gate-tied token (gate_tie_tokens) both agree when DS's pick has the token's largest
    // logit; otherwise rounding tied gates whose logits differ, a difference by design: not compared.
    bool defined = true;
    const json& expert = c.at("runs").at(0).at("expert");
    for (std::size_t t = 0; t < l.tokens; ++t) {
      const float* row = l.f.data() + t * l.experts;
      if (listed(c.at("gate_tie_tokens"), t) && row[expert[t].get<std::size_t>()] != *std::max_element(row, row + l.experts)) {
        defined = false;
        continue;
      }
      CHECK_MESSAGE(r.idx[t] == expert[t].get<expert_index>(), name << " token " << t << ": expert ours " << r.idx[t]);
    }
    if (!defined) MESSAGE(std::string(name + ": a gate tie without a logit tie; counts and losses not compared"));
    const bool f64 = c.at("f64_routing_identical").get<bool>();
    const auto ours = losses<float>(l, r.idx, 1, 1, first_choice);
    const auto idx_d = route_k<double>(l, 1).idx;
    const auto ours_d = losses<double>(l, idx_d, 1, 1, first_choice);
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      std::vector<std::int64_t> kept_per_expert(l.experts, 0);
      for (std::size_t t = 0; t < l.tokens; ++t) kept_per_expert[expert[t].get<std::size_t>()] += run.at("kept")[t].get<int>();
      const ds_run x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                     run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(), "position",
                     ints(run.at("exp_counts")), kept_per_expert};
      const std::string what = name + " cf " + num(x.cf) + " min " + std::to_string(x.min_capacity) + (x.drop ? "" : " no-drop");
      peer_choices kept;  // kept_identity_well_defined = no overflow: DS keeps topk(one-hot mask) of an overflowing one
      if (run.at("kept_identity_well_defined").get<bool>() && defined) {
        kept = [&run](std::size_t t) {
          if (!run.at("kept")[t].get<int>()) return std::vector<choice>{};
          return theirs(json::array({run.at("expert")[t]}), json::array({run.at("gate")[t]}), json::array({run.at("location")[t]}));
        };
      }
      check_ds_run(tl, what, r, l.experts, x, defined, false, kept);
      if (!defined) continue;
      close(tl, what + " l_aux", ours.aux, run.at("l_aux").get<double>(), loss_tol_f32);
      if (f64) close(tl, what + " l_aux_f64", ours_d.aux, run.at("l_aux_f64").get<double>(), ds_tol_f64);
      const double theirs_f64 = f64 ? run.at("l_aux_f64").get<double>() : 0.0;
      if (f64) check_f64_aux(tl, what, l, idx_d, 1, true, ours_d.aux, &theirs_f64, nullptr, nullptr);
    }
    if (!defined) continue;
    close_matrix(tl, name + " grad_l_aux", ours.grad, flat(c.at("grad_l_aux")), grad_tol_f32);
    if (f64) close_matrix(tl, name + " grad_l_aux_f64", ours_d.grad, flat(c.at("grad_l_aux_f64")), ds_grad_tol_f64);
    if (f64) check_f64_aux(tl, name, l, idx_d, 1, true, ours_d.aux, nullptr, &ours_d.grad, &c.at("grad_l_aux_f64"));
  }
  tl.print();
}

TEST_CASE("DeepSpeed topkgating: route/ds_top*_pos_*, peers/ds_topk") {
  tally tl("DeepSpeed topkgating");
  for (const auto& g : route_cases("ds_top", "_pos_")) check_ds_route_case(tl, g, "position", all_choices);
  for (const auto& g : peer_cases("ds_topk")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    const auto k = c.at("k").get<std::size_t>();
    const json& ties = c.at("topk_tie_tokens");  // torch.topk's order among tied scores: those tokens not compared
    const bool untied = ties.empty(), f64 = c.at("f64_routing_identical").get<bool>();
    const auto r = route_k<float>(l, k);
    for (std::size_t t = 0; t < l.tokens; ++t) {
      if (!listed(ties, t)) same_choices(tl, name + " selected token " + std::to_string(t), ours_routed(r, t), theirs(c.at("selected_experts")[t]));
    }
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      const auto run_k = p.at("k").get<std::size_t>();
      const ds_run x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                     run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(), p.at("drop_policy").get<std::string>(),
                     ints(run.at("exp_counts")), kept_counts(run.at("kept_experts"), l.experts)};
      const std::string what = name + " k " + std::to_string(run_k) + " " + x.policy + (x.drop ? "" : " no-drop");
      const auto rk = route_k<float>(l, run_k);
      peer_choices kept;  // kept_identity_well_defined is false where capacity_tie_experts cross a tie
      if (run.at("kept_identity_well_defined").get<bool>() && untied) {
        kept = [&run](std::size_t t) { return theirs(run.at("kept_experts")[t], run.at("kept_gates")[t], run.at("kept_locations")[t]); };
      }
      check_ds_run(tl, what, rk, l.experts, x, untied, true, kept);
      // The loss sees the routing only through the pre-drop counts: with tied tokens, compare it where ours agree.
      if (!untied && counts(rk.idx, l.experts) != x.exp_counts) {
        MESSAGE(std::string(what + ": counts differ on torch.topk's tie order (topk_tie_tokens); l_aux not compared"));
        continue;
      }
      const auto ours = losses<float>(l, rk.idx, run_k, 1, all_choices);
      const auto idx_d = route_k<double>(l, run_k).idx;
      const auto ours_d = losses<double>(l, idx_d, run_k, 1, all_choices);
      close(tl, what + " l_aux", ours.aux, run.at("l_aux").get<double>(), loss_tol_f32);
      if (f64) close(tl, what + " l_aux_f64", ours_d.aux, run.at("l_aux_f64").get<double>(), ds_tol_f64);
      const bool with_grad = run_k == k;  // grad_l_aux is the case's k
      const double theirs_f64 = f64 ? run.at("l_aux_f64").get<double>() : 0.0;
      if (f64) check_f64_aux(tl, what, l, idx_d, run_k, false, ours_d.aux, &theirs_f64, with_grad ? &ours_d.grad : nullptr,
                             with_grad ? &c.at("grad_l_aux_f64") : nullptr);
      if (!with_grad) continue;
      close_matrix(tl, what + " grad_l_aux", ours.grad, flat(c.at("grad_l_aux")), grad_tol_f32);
      if (f64) close_matrix(tl, what + " grad_l_aux_f64", ours_d.grad, flat(c.at("grad_l_aux_f64")), ds_grad_tol_f64);
    }
  }
  tl.print();
}

// DeepSpeed top2gating gives every first choice buffer priority over every second choice; our position policy keeps
// choices in token order. So which choices survive an overflow, their locations and their renormalized gates differ
// by design and are not compared. What both define: the two experts (first = argmax softmax, second = argmax logits
// without it; we rank by logits), exp_counts (both choices, before the drop), the capacity, the kept count per expert
// (min(load, C) under either priority), l_aux (first choice only: aux_normalization::first_choice) and its gradient.
TEST_CASE("DeepSpeed top2gating: peers/ds_top2") {
  tally tl("DeepSpeed top2gating");
  for (const auto& g : peer_cases("ds_top2")) {
    const json& c = g.c;
    const std::string& name = g.name;
    const logits_file& l = g.l;
    const auto r = route_k<float>(l, 2);
    const auto ours = losses<float>(l, r.idx, 2, 1, first_choice);
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      const ds_run x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                     run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(), "position",
                     ints(run.at("exp_counts")), kept_counts(run.at("kept_experts"), l.experts)};
      const std::string what = name + (x.drop ? "" : " no-drop");
      for (std::size_t t = 0; t < l.tokens; ++t) {
        CHECK_MESSAGE(r.idx[2 * t] == run.at("top1_expert")[t].get<expert_index>(), what << " token " << t << " top1");
        CHECK_MESSAGE(r.idx[2 * t + 1] == run.at("top2_expert")[t].get<expert_index>(), what << " token " << t << " top2");
      }
      check_ds_run(tl, what, r, l.experts, x, true, true, nullptr);
      close(tl, what + " l_aux", ours.aux, run.at("l_aux").get<double>(), loss_tol_f32);
    }
    close_matrix(tl, name + " grad_l_aux", ours.grad, flat(c.at("grad_l_aux")), grad_tol_f32);  // no f64: peer fails
  }
  tl.print();
}
