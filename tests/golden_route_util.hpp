// Routers, capacity assignment and losses against the peers' own outputs (DeepSpeed sharded_moe.py, Megatron-Core
// moe_utils.py): ../shared/golden/route/ (manifest.json) and ../shared/golden/peers/{ds_top1, ds_topk, ds_top2,
// mcore_routing, mcore_aux_loss, mcore_z_loss}; both READMEs describe every field and flag used below.
// The folder comes from the environment variable LOCMOE_GOLDEN_DIR; without it the test exits 77 (skipped).
//
// float32 data runs through the float instantiations, the *_f64 companions through double. Token identities are
// compared only where the peer's flags say they are well defined (the peers pick among tied tokens in torch.topk's
// order, which is implementation-defined); counts, capacities, losses and gradients always, except where a tie flag
// makes them depend on that order too. Each family prints one line: cases compared and the largest relative errors.
//
// This header holds what both families use (tests/test_golden_deepspeed.cpp, tests/test_golden_megatron.cpp):
// tolerances, case loading, comparisons, our pipeline and the per-family tally. main: tests/golden_route_main.cpp.
#pragma once

#include <locmoe/assign.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>

#include "locmoe/npy.hpp"
#include "test_util.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace locmoe_golden {

namespace fs = std::filesystem;
using json = nlohmann::json;
using locmoe::expert_index;
using locmoe::no_expert;
using locmoe_test::relative_error;

// Tolerances, relative. A gradient matrix is judged by max |ours - theirs| / max |theirs|, on the matrix's own
// scale, so that entries that cancel to about 0 in float32 do not dominate.
// Softmax/sigmoid probabilities and gates: 4 float32 ulps (each side's exp within ~1-2 ulps; measured 2.5e-7).
inline constexpr double prob_tol_f32 = 4 * 1.1920928955078125e-7;
inline constexpr double loss_tol_f32 = 1e-5;  // aux loss and z-loss values, float32
inline constexpr double grad_tol_f32 = 1e-5;  // gradients, float32
// DeepSpeed's *_f64 runs still compute ce = mean(mask.float()) in float32 (peers/README: up to ~6e-8 relative). The
// loss is a positive sum of those terms; the gradient p (g - p.g) cancels where counts are near uniform, which
// amplifies it (1.3e-7 on ds_top1/t48_e8; with ce rounded to float32 the peer's gradients match ours to 2e-15).
// The loss, a positive combination of the counts ce_e, is off by at most their float32 rounding: 2^-24 relative
// (measured 2.4e-8). The gradient cancels and is left at 1e-6 (measured 1.3e-7).
inline constexpr double ds_tol_f64 = 5.9604644775390625e-8;
inline constexpr double ds_grad_tol_f64 = 1e-6;
inline constexpr double mc_tol_f64 = 1e-12;  // Megatron-Core's *_f64: all in float64 (the routing map from float32)

inline fs::path golden_dir() {
  const char* dir = std::getenv("LOCMOE_GOLDEN_DIR");
  return dir ? fs::path(dir) : fs::path();
}

inline json load(const fs::path& file) {
  std::ifstream in(file);
  REQUIRE_MESSAGE(in.good(), "cannot open " << file);
  return json::parse(in);
}

inline std::string num(double v) {
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

inline std::vector<std::int64_t> ints(const json& j) { return j.get<std::vector<std::int64_t>>(); }

/// A list of lists of numbers, flattened row by row.
inline std::vector<double> flat(const json& j) {
  std::vector<double> v;
  for (const auto& row : j) {
    for (const auto& x : row) v.push_back(x.get<double>());
  }
  return v;
}

inline bool listed(const json& list, std::size_t t) {
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

inline logits_file read_logits(const fs::path& file) {
  const auto m = locmoe::cli::npy::read_float32_matrix(file.string(), "logits");
  return {m.rows, m.cols, m.values, std::vector<double>(m.values.begin(), m.values.end())};
}

struct golden_case {
  json c;
  std::string name;
  logits_file l;
};

/// The peers/<family>/*.json cases, sorted by name, with their logits.
inline std::vector<golden_case> peer_cases(const std::string& family) {
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
inline std::vector<golden_case> route_cases(const std::string& prefix, const std::string& part = "") {
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

inline std::vector<double> route_grad(const json& c) {
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

inline void close(tally& tl, const std::string& what, double ours, double theirs, double tol) {
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

inline void same_counts(const std::string& what, const std::vector<std::int64_t>& ours, const std::vector<std::int64_t>& theirs) {
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

inline locmoe::drop_policy policy_of(const std::string& name) {
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

inline constexpr auto all_choices = locmoe::aux_normalization::all_choices;
inline constexpr auto first_choice = locmoe::aux_normalization::first_choice;

/// Choices per expert, from idx [T x k].
inline std::vector<std::int64_t> counts(const std::vector<expert_index>& idx, std::size_t n) {
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
inline std::vector<choice> theirs(const json& experts, const json& weights = json(), const json& slots = json()) {
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

inline std::vector<std::int64_t> ids(const std::vector<choice>& c) {
  std::vector<std::int64_t> v;
  for (const auto& x : c) v.push_back(x.expert);
  return v;
}

/// The same experts; then, aligned by expert, weights to prob_tol_f32 and slots, where the peer gives them.
inline void same_choices(tally& tl, const std::string& what, const std::vector<choice>& ours, const std::vector<choice>& peer) {
  CHECK_MESSAGE(ids(ours) == ids(peer), what << ": experts ours " << text(ids(ours)) << ", theirs " << text(ids(peer)));
  if (ids(ours) != ids(peer)) return;
  for (std::size_t j = 0; j < ours.size(); ++j) {
    const std::string at = what + " expert " + std::to_string(peer[j].expert);
    if (!std::isnan(peer[j].weight)) close(tl, at + " weight", ours[j].weight, peer[j].weight, prob_tol_f32);
    if (peer[j].slot >= 0) CHECK_MESSAGE(ours[j].slot == peer[j].slot, at << ": slot ours " << ours[j].slot << ", theirs " << peer[j].slot);
  }
}

}  // namespace locmoe_golden
