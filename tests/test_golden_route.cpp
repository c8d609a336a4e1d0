// Routers, capacity assignment and losses against the peers' own outputs (DeepSpeed sharded_moe.py, Megatron-Core
// moe_utils.py): ../shared/golden/route/ (manifest.json) and ../shared/golden/peers/{ds_top1, ds_topk, ds_top2,
// mcore_routing, mcore_aux_loss, mcore_z_loss}; both READMEs describe every field and flag used below.
// The folder comes from the environment variable LOCMOE_GOLDEN_DIR; without it the test exits 77 (skipped).
//
// float32 data runs through the float instantiations, the *_f64 companions through double. Token identities are
// compared only where the peer's flags say they are well defined (the peers pick among tied tokens in torch.topk's
// order, which is implementation-defined); counts, capacities, losses and gradients always, except where a tie flag
// makes them depend on that order too. Each family prints one line: cases compared and the largest relative errors.
#define DOCTEST_CONFIG_IMPLEMENT
#include <locmoe/assign.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>

#include "locmoe/npy.hpp"
#include "test_util.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fs = std::filesystem;
using json = nlohmann::json;
using locmoe::expert_index;
using locmoe::no_expert;
using locmoe_test::relative_error;

namespace {

// Tolerances, relative. A gradient matrix is judged by max |ours - theirs| / max |theirs|, on the matrix's own
// scale, so that entries that cancel to about 0 in float32 do not dominate.
constexpr double prob_tol_f32 = 2e-6;  // softmax/sigmoid probabilities and gates: a few float32 ulp (exp differs)
constexpr double loss_tol_f32 = 1e-5;  // aux loss and z-loss values, float32
constexpr double grad_tol_f32 = 1e-5;  // gradients, float32
// DeepSpeed's *_f64 runs still compute ce = mean(mask.float()) in float32 (peers/README: up to ~6e-8 relative). The
// loss is a positive sum of those terms; the gradient p (g - p.g) cancels where counts are near uniform, which
// amplifies it (1.3e-7 on ds_top1/t48_e8; with ce rounded to float32 the peer's gradients match ours to 2e-15).
constexpr double ds_tol_f64 = 2e-7;
constexpr double ds_grad_tol_f64 = 1e-6;
constexpr double mc_tol_f64 = 1e-12;  // Megatron-Core's *_f64: all in float64 (the routing map from float32)

fs::path golden_dir() {
  const char* dir = std::getenv("LOCMOE_GOLDEN_DIR");
  return dir ? fs::path(dir) : fs::path();
}

json load(const fs::path& file) {
  std::ifstream in(file);
  REQUIRE_MESSAGE(in.good(), "cannot open " << file);
  return json::parse(in);
}

std::string num(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.9g", v);
  return text;
}

template <class T>
std::string text(const std::vector<T>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

std::vector<std::int64_t> ints(const json& j) { return j.get<std::vector<std::int64_t>>(); }

/// A list of lists of numbers, flattened row by row.
std::vector<double> flat(const json& j) {
  std::vector<double> v;
  for (const auto& row : j) {
    for (const auto& x : row) v.push_back(x.get<double>());
  }
  return v;
}

bool listed(const json& list, std::size_t t) {
  return list.is_array() && std::any_of(list.begin(), list.end(), [&](const json& x) { return x.get<std::size_t>() == t; });
}

// ---- one case's inputs -------------------------------------------------------------------------------------------

struct logits_file {
  std::size_t tokens = 0, experts = 0;
  std::vector<float> f;
  std::vector<double> d;  // the same values, for the *_f64 companions
  template <class S>
  const std::vector<S>& values() const {
    if constexpr (std::is_same_v<S, float>) return f; else return d;
  }
};

logits_file read_logits(const fs::path& file) {
  const auto m = locmoe::cli::npy::read_float32_matrix(file.string(), "logits");
  return {m.rows, m.cols, m.values, std::vector<double>(m.values.begin(), m.values.end())};
}

struct golden_case {
  json c;
  std::string name;
  logits_file l;
};

/// The peers/<family>/*.json cases, sorted by name, with their logits.
std::vector<golden_case> peer_cases(const std::string& family) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(golden_dir() / "peers" / family)) {
    if (entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  std::vector<golden_case> cases;
  for (const auto& file : files) {
    json c = load(file);
    auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    cases.push_back({std::move(c), file.stem().string(), std::move(l)});
  }
  REQUIRE_MESSAGE(!cases.empty(), "no cases in peers/" << family);
  return cases;
}

/// The route/manifest.json cases whose name starts with `prefix` and contains `part`, with their logits.
std::vector<golden_case> route_cases(const std::string& prefix, const std::string& part = "") {
  const json manifest = load(golden_dir() / "route" / "manifest.json");
  std::vector<golden_case> cases;
  for (const auto& c : manifest.at("cases")) {
    const std::string name = c.at("name");
    if (name.rfind(prefix, 0) != 0 || name.find(part) == std::string::npos) continue;
    cases.push_back({c, name, read_logits(golden_dir() / "route" / c.at("logits").get<std::string>())});
  }
  REQUIRE_MESSAGE(!cases.empty(), "no route/ cases " << prefix << "*" << part);
  return cases;
}

std::vector<double> route_grad(const json& c) {
  return read_logits(golden_dir() / "route" / c.at("grad_logits_file").get<std::string>()).d;
}

// ---- comparisons -------------------------------------------------------------------------------------------------

/// One family's tally, printed once: cases compared and the largest relative error per kind of quantity.
struct tally {
  explicit tally(std::string name) : family(std::move(name)) {}
  std::string family;
  std::size_t cases = 0;
  std::map<std::string, double> max_error;
  void note(double tol, bool matrix, double e) {
    const bool f64 = tol == ds_tol_f64 || tol == ds_grad_tol_f64 || tol == mc_tol_f64;
    const std::string kind = std::string(matrix ? "grad" : tol == prob_tol_f32 ? "prob" : "loss") + (f64 ? " f64" : " f32");
    max_error[kind] = std::max(max_error[kind], e);
  }
  void print() const {
    std::string line = family + ": " + std::to_string(cases) + " cases compared; max relative error";
    for (const auto& [kind, e] : max_error) line += " " + kind + " " + num(e) + ",";
    MESSAGE(line.substr(0, line.size() - 1));
    CHECK(cases > 0);
  }
};

void close(tally& tl, const std::string& what, double ours, double theirs, double tol) {
  const double e = relative_error(ours, theirs);
  tl.note(tol, false, e);
  CHECK_MESSAGE(e <= tol, what << ": ours " << num(ours) << ", theirs " << num(theirs) << ", relative error " << num(e));
}

template <class S>
void close_matrix(tally& tl, const std::string& what, const std::vector<S>& ours, const std::vector<double>& theirs,
                  double tol) {
  REQUIRE(ours.size() == theirs.size());
  double scale = 0, diff = -1;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ours.size(); ++i) {
    scale = std::max(scale, std::abs(theirs[i]));
    const double d = std::abs(static_cast<double>(ours[i]) - theirs[i]);
    if (!(d <= diff)) diff = d, at = i;  // a NaN wins
  }
  const double e = scale > 0 ? diff / scale : diff;
  tl.note(tol, true, e);
  CHECK_MESSAGE(e <= tol, what << ": max |ours - theirs| / max |theirs| = " << num(e) << " at element " << at
                               << " (ours " << num(static_cast<double>(ours[at])) << ", theirs " << num(theirs[at]) << ")");
}

void same_counts(const std::string& what, const std::vector<std::int64_t>& ours, const std::vector<std::int64_t>& theirs) {
  CHECK_MESSAGE(ours == theirs, what << ": ours " << text(ours) << ", theirs " << text(theirs));
}

// ---- our pipeline: route, assign, losses -------------------------------------------------------------------------

template <class S>
struct routing {
  std::size_t k = 0;
  std::vector<expert_index> idx;  // [T x k]
  std::vector<S> w;
};

template <class S>
routing<S> route(const logits_file& l, const locmoe::router_options<S>& o) {
  const std::size_t T = l.tokens, n = l.experts, k = o.k;
  routing<S> r{k, std::vector<expert_index>(T * k), std::vector<S>(T * k)};
  const locmoe::route_outputs<S> out{{r.idx.data(), T, k}, {r.w.data(), T, k}, {}, {}};
  CHECK(locmoe::score_route(locmoe::matrix_view<const S>(l.values<S>().data(), T, n), o, out) == 0);
  return r;
}

/// Top-k: the softmax over all n, then the k best (DeepSpeed's gates, Megatron-Core's use_pre_softmax).
template <class S>
routing<S> route_k(const logits_file& l, std::size_t k, locmoe::score_function score = locmoe::score_function::softmax) {
  locmoe::router_options<S> o;
  o.k = k;
  o.score = score;
  return route(l, o);
}

template <class S>
struct assignment {
  std::size_t k = 0;
  std::vector<expert_index> expert;
  std::vector<locmoe::slot_index> slot;
  std::vector<S> weight;
  std::vector<std::int64_t> routed, kept;  // per expert, before and after capacity
  locmoe::assignment_stats stats;
};

template <class S>
assignment<S> assign(const routing<S>& r, std::size_t n, const locmoe::capacity_options& o) {
  const std::size_t k = r.k, T = r.idx.size() / k;
  assignment<S> a{k, std::vector<expert_index>(T * k), std::vector<locmoe::slot_index>(T * k), std::vector<S>(T * k),
                  std::vector<std::int64_t>(n), std::vector<std::int64_t>(n), {}};
  a.stats = locmoe::capacity_assigner<S>(n, o).run(
      {r.idx.data(), T, k}, {r.w.data(), T, k},
      {{a.expert.data(), T, k}, {a.slot.data(), T, k}, {a.weight.data(), T, k}, a.routed.data(), a.kept.data()});
  return a;
}

locmoe::drop_policy policy_of(const std::string& name) {
  return name == "probs" ? locmoe::drop_policy::probs : locmoe::drop_policy::position;
}

template <class S>
struct loss_run {
  double aux = 0, z = 0;
  std::size_t tokens = 0;
  std::vector<S> grad;  // d(aux + z) / d logits
};

/// Our losses on routed choices idx [T x k]: the aux loss (coeff, normalization, score), and z if z_coeff != 0,
/// their gradients summed.
template <class S>
loss_run<S> losses(const logits_file& l, const std::vector<expert_index>& idx, std::size_t k, double coeff,
                   locmoe::aux_normalization norm, locmoe::score_function score = locmoe::score_function::softmax,
                   double z_coeff = 0) {
  const std::size_t T = l.tokens, n = l.experts;
  loss_run<S> r;
  r.grad.assign(T * n, S(0));
  const locmoe::loss_inputs<S> in{{l.values<S>().data(), T, n}, {idx.data(), T, k}, {}};
  const locmoe::matrix_view<S> grad(r.grad.data(), T, n);
  if (coeff != 0) {
    const auto v = locmoe::aux_loss(in, locmoe::aux_loss_options<S>{static_cast<S>(coeff), norm, score}, grad);
    r.aux = static_cast<double>(v.value);
    r.tokens = v.tokens;
  }
  if (z_coeff != 0) {
    const auto v = locmoe::z_loss(in, static_cast<S>(z_coeff), grad);
    r.z = static_cast<double>(v.value);
    r.tokens = v.tokens;
  }
  return r;
}

constexpr auto all_choices = locmoe::aux_normalization::all_choices;
constexpr auto first_choice = locmoe::aux_normalization::first_choice;

/// Choices per expert, from idx [T x k].
std::vector<std::int64_t> counts(const std::vector<expert_index>& idx, std::size_t n) {
  std::vector<std::int64_t> c(n, 0);
  for (const auto e : idx) {
    if (e != no_expert) ++c[static_cast<std::size_t>(e)];
  }
  return c;
}

// ---- one token's choices, aligned by expert id ------------------------------------------------------------------

struct choice {
  std::int64_t expert;
  double weight;       // NaN: not given (not compared)
  std::int64_t slot;   // -1: not given (not compared)
  bool operator<(const choice& o) const { return expert < o.expert; }
};

/// Our choices of token t from rows [T x k]: experts, weights and (where given) slots, sorted by expert.
template <class S>
std::vector<choice> ours(std::size_t t, std::size_t k, const std::vector<expert_index>& experts,
                         const std::vector<S>& weights, const std::vector<locmoe::slot_index>* slots = nullptr) {
  std::vector<choice> c;
  for (std::size_t i = t * k; i < (t + 1) * k; ++i) {
    if (experts[i] != no_expert) c.push_back({experts[i], static_cast<double>(weights[i]), slots ? (*slots)[i] : -1});
  }
  std::sort(c.begin(), c.end());
  return c;
}
template <class S>
std::vector<choice> ours_routed(const routing<S>& r, std::size_t t) { return ours(t, r.k, r.idx, r.w); }
template <class S>
std::vector<choice> ours_kept(const assignment<S>& a, std::size_t t) { return ours(t, a.k, a.expert, a.weight, &a.slot); }

/// A peer's choices of one token: experts, with weights (a list aligned with them, or an object keyed by expert id)
/// and slots where given.
std::vector<choice> theirs(const json& experts, const json& weights = json(), const json& slots = json()) {
  std::vector<choice> c;
  for (std::size_t j = 0; j < experts.size(); ++j) {
    const auto e = experts[j].get<std::int64_t>();
    const double w = weights.is_null()     ? std::numeric_limits<double>::quiet_NaN()
                     : weights.is_object() ? weights.at(std::to_string(e)).get<double>()
                                           : weights[j].get<double>();
    c.push_back({e, w, slots.is_null() ? -1 : slots[j].get<std::int64_t>()});
  }
  std::sort(c.begin(), c.end());
  return c;
}

std::vector<std::int64_t> ids(const std::vector<choice>& c) {
  std::vector<std::int64_t> v;
  for (const auto& x : c) v.push_back(x.expert);
  return v;
}

/// The same experts; then, aligned by expert, weights to prob_tol_f32 and slots, where the peer gives them.
void same_choices(tally& tl, const std::string& what, const std::vector<choice>& ours, const std::vector<choice>& peer) {
  CHECK_MESSAGE(ids(ours) == ids(peer), what << ": experts ours " << text(ids(ours)) << ", theirs " << text(ids(peer)));
  if (ids(ours) != ids(peer)) return;
  for (std::size_t j = 0; j < ours.size(); ++j) {
    const std::string at = what + " expert " + std::to_string(peer[j].expert);
    if (!std::isnan(peer[j].weight)) close(tl, at + " weight", ours[j].weight, peer[j].weight, prob_tol_f32);
    if (peer[j].slot >= 0) CHECK_MESSAGE(ours[j].slot == peer[j].slot, at << ": slot ours " << ours[j].slot << ", theirs " << peer[j].slot);
  }
}

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
    const auto ours_d = losses<double>(l, route_k<double>(l, 1).idx, 1, 1, first_choice);
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
    }
    if (!defined) continue;
    close_matrix(tl, name + " grad_l_aux", ours.grad, flat(c.at("grad_l_aux")), grad_tol_f32);
    if (f64) close_matrix(tl, name + " grad_l_aux_f64", ours_d.grad, flat(c.at("grad_l_aux_f64")), ds_grad_tol_f64);
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
      const auto ours_d = losses<double>(l, route_k<double>(l, run_k).idx, run_k, 1, all_choices);
      close(tl, what + " l_aux", ours.aux, run.at("l_aux").get<double>(), loss_tol_f32);
      if (f64) close(tl, what + " l_aux_f64", ours_d.aux, run.at("l_aux_f64").get<double>(), ds_tol_f64);
      if (run_k != k) continue;  // grad_l_aux is the case's k
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
  } else if (C <= static_cast<std::int64_t>(T)) {
    // Megatron fills every buffer to C with unrouted tokens at prob 0; we leave those rows empty and count them in
    // padded_slots (assign.hpp): C rows per expert either way, kept + padded_slots = n C.
    std::int64_t total = 0;
    for (const auto v : d.after) total += v;
    CHECK_MESSAGE(d.after == std::vector<std::int64_t>(n, C), what << ": after " << text(d.after) << ", C " << C);
    CHECK_MESSAGE(a.stats.kept + a.stats.padded_slots == total,
                  what << ": kept " << a.stats.kept << " + padded_slots " << a.stats.padded_slots << " vs " << total);
  } else {  // README: with cap > T Megatron skips the drop and pads every token onto every expert (T rows, not C)
    MESSAGE(std::string(what + ": capacity > T with pad_to_capacity (Megatron: every token everywhere); not compared"));
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
      close(tl, what + " loss", f.aux, res.at("loss").get<double>(), loss_tol_f32);
      close(tl, what + " loss_f64", d.aux, res.at("loss_f64").get<double>(), mc_tol_f64);
      close_matrix(tl, what + " grad", f.grad, flat(res.at("grad")), grad_tol_f32);
      close_matrix(tl, what + " grad_f64", d.grad, flat(res.at("grad_f64")), mc_tol_f64);
      check_padded_rows(what, pad, f.grad, flat(res.at("grad")), l.experts);
      check_padded_rows(what + " f64", pad, d.grad, flat(res.at("grad_f64")), l.experts);
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
      close(tl, what + " z_loss", f.z, res.at("z_loss").get<double>(), loss_tol_f32);
      close(tl, what + " z_loss_f64", d.z, res.at("z_loss_f64").get<double>(), mc_tol_f64);
      close_matrix(tl, what + " grad", f.grad, flat(res.at("grad")), grad_tol_f32);
      close_matrix(tl, what + " grad_f64", d.grad, flat(res.at("grad_f64")), mc_tol_f64);
      check_padded_rows(what, pad, f.grad, flat(res.at("grad")), l.experts);
      check_padded_rows(what + " f64", pad, d.grad, flat(res.at("grad_f64")), l.experts);
      ++tl.cases;
    }
  }
  tl.print();
}

int main(int argc, char** argv) {
  const fs::path dir = golden_dir();
  if (dir.empty()) {
    std::cout << "SKIPPED: no golden data; set LOCMOE_GOLDEN_DIR (CMake option LOCMOE_GOLDEN_DIR) to the "
                 "shared/golden folder\n";
    return 77;
  }
  if (!fs::exists(dir / "route" / "manifest.json") || !fs::exists(dir / "peers")) {  // named but absent: an error
    std::cout << "FAILED: LOCMOE_GOLDEN_DIR = " << dir << " has no route/manifest.json or peers/\n";
    return 1;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
