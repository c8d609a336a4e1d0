// Routers, capacity assignment and losses against the peers' own outputs (DeepSpeed sharded_moe.py, Megatron-Core
// moe_utils.py): ../shared/golden/route/ (manifest.json) and ../shared/golden/peers/{ds_top1, ds_topk, ds_top2,
// mcore_routing, mcore_aux_loss, mcore_z_loss}; both READMEs describe every field and flag used below.
// The folder comes from the environment variable LOCMOE_GOLDEN_DIR; without it the test exits 77 (skipped).
//
// float32 data runs through the float instantiations, the *_f64 companions through double. Token identities are
// compared only where the peer's flags say they are well defined (the peers pick among tied tokens in torch.topk's
// order, which is implementation-defined); counts, capacities, losses and gradients are compared always, except
// where a tie flag makes them depend on that order too. Each family prints one line: cases compared and the
// largest relative error seen.
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

// Tolerances, relative. A matrix (a gradient) is judged by max |ours - theirs| / max |theirs|, on the matrix's
// own scale, so that entries that cancel to about 0 in float32 do not dominate.
constexpr double prob_tol_f32 = 2e-6;  // softmax/sigmoid probabilities and gates: a few float32 ulp (exp differs)
constexpr double loss_tol_f32 = 1e-5;  // aux loss and z-loss values, float32
constexpr double grad_tol_f32 = 1e-5;  // gradients, float32
// DeepSpeed's *_f64 runs still compute ce = mean(mask.float()) in float32 (peers/README: up to ~6e-8 relative).
constexpr double ds_tol_f64 = 2e-7;
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

/// The peers/<family>/*.json files, sorted by name.
std::vector<fs::path> peer_cases(const std::string& family) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(golden_dir() / "peers" / family)) {
    if (entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  REQUIRE_MESSAGE(!files.empty(), "no cases in peers/" << family);
  return files;
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

/// A list of lists (or a list) of numbers, flattened row by row.
std::vector<double> flat(const json& j) {
  std::vector<double> v;
  for (const auto& x : j) {
    if (x.is_array()) {
      for (const auto& y : x) v.push_back(y.get<double>());
    } else {
      v.push_back(x.get<double>());
    }
  }
  return v;
}

bool listed(const json& list, std::size_t t) {
  if (!list.is_array()) return false;
  return std::any_of(list.begin(), list.end(), [&](const json& x) { return x.get<std::size_t>() == t; });
}

/// The route/manifest.json cases whose name starts with `prefix` and contains `part` (copies: the manifest is local).
std::vector<json> route_cases(const std::string& prefix, const std::string& part = "") {
  const json manifest = load(golden_dir() / "route" / "manifest.json");
  std::vector<json> cases;
  for (const auto& c : manifest.at("cases")) {
    const std::string name = c.at("name");
    if (name.rfind(prefix, 0) == 0 && name.find(part) != std::string::npos) cases.push_back(c);
  }
  REQUIRE_MESSAGE(!cases.empty(), "no route/ cases " << prefix << "*" << part);
  return cases;
}

/// One family's tally, printed once: cases compared and the largest relative error seen per kind of quantity.
struct tally {
  explicit tally(std::string name) : family(std::move(name)) {}
  std::string family;
  std::size_t cases = 0;
  std::map<std::string, double> max_error;
  void note(double tol, bool matrix, double e) {
    const bool f64 = tol == ds_tol_f64 || tol == mc_tol_f64;
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

// ---- inputs and our pipeline -----------------------------------------------------------------------------------

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
  logits_file l;
  l.tokens = m.rows;
  l.experts = m.cols;
  l.f = m.values;
  l.d.assign(m.values.begin(), m.values.end());
  return l;
}

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
  const auto& x = l.values<S>();
  const std::size_t invalid = locmoe::score_route(locmoe::matrix_view<const S>(x.data(), T, n), o,
                                                  locmoe::route_outputs<S>{{r.idx.data(), T, k}, {r.w.data(), T, k}, {}, {}});
  CHECK(invalid == 0);
  return r;
}

template <class S>
routing<S> route_k(const logits_file& l, std::size_t k) {
  locmoe::router_options<S> o;
  o.k = k;
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
  locmoe::capacity_assigner<S> assigner(n, o);
  a.stats = assigner.run({r.idx.data(), T, k}, {r.w.data(), T, k},
                         {{a.expert.data(), T, k}, {a.slot.data(), T, k}, {a.weight.data(), T, k}, a.routed.data(),
                          a.kept.data()});
  return a;
}

locmoe::capacity_options capacity(double cf, std::int64_t min_capacity, bool drop, locmoe::drop_policy policy) {
  locmoe::capacity_options o;
  o.capacity_factor = cf;
  o.min_capacity = min_capacity;
  o.drop = drop;
  o.policy = policy;
  return o;
}

template <class S>
struct loss_run {
  double aux = 0, z = 0;
  std::size_t tokens = 0;
  std::vector<S> grad;  // d(aux + z) / d logits
};

/// Our losses on routed choices idx [T x k]: aux if given, z if z_coeff != 0, their gradients summed.
template <class S>
loss_run<S> losses(const logits_file& l, const std::vector<expert_index>& idx, std::size_t k,
                   const locmoe::aux_loss_options<S>* aux, double z_coeff = 0) {
  const std::size_t T = l.tokens, n = l.experts;
  loss_run<S> r;
  r.grad.assign(T * n, S(0));
  const locmoe::loss_inputs<S> in{{l.values<S>().data(), T, n}, {idx.data(), T, k}, {}};
  const locmoe::matrix_view<S> grad(r.grad.data(), T, n);
  if (aux) {
    const auto v = locmoe::aux_loss(in, *aux, grad);
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

template <class S>
locmoe::aux_loss_options<S> aux_options(double coeff, locmoe::aux_normalization norm,
                                        locmoe::score_function score = locmoe::score_function::softmax) {
  return {static_cast<S>(coeff), norm, score};
}

/// Choices per expert, from idx [T x k] (first_only: column 0).
std::vector<std::int64_t> counts(const std::vector<expert_index>& idx, std::size_t k, std::size_t n, bool first_only) {
  std::vector<std::int64_t> c(n, 0);
  for (std::size_t i = 0; i < idx.size(); ++i) {
    if ((!first_only || i % k == 0) && idx[i] != no_expert) ++c[static_cast<std::size_t>(idx[i])];
  }
  return c;
}

// ---- one token's choices, aligned by expert id ------------------------------------------------------------------

struct choice {
  std::int64_t expert;
  double weight;
  std::int64_t slot;
  bool operator<(const choice& o) const { return expert < o.expert; }
};

template <class S>
std::vector<choice> ours_routed(const routing<S>& r, std::size_t t) {
  std::vector<choice> c;
  for (std::size_t j = 0; j < r.k; ++j) {
    if (r.idx[t * r.k + j] != no_expert) c.push_back({r.idx[t * r.k + j], static_cast<double>(r.w[t * r.k + j]), -1});
  }
  std::sort(c.begin(), c.end());
  return c;
}

template <class S>
std::vector<choice> ours_kept(const assignment<S>& a, std::size_t t) {
  std::vector<choice> c;
  for (std::size_t i = t * a.k; i < (t + 1) * a.k; ++i) {
    if (a.expert[i] != no_expert) c.push_back({a.expert[i], static_cast<double>(a.weight[i]), a.slot[i]});
  }
  std::sort(c.begin(), c.end());
  return c;
}

/// The peer's choices of one token: experts[t], with weights[t] (a list aligned with it, or an object keyed by the
/// expert id) and slots[t] where given; an absent weight is NaN and an absent slot -1, neither compared.
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

/// Expert sets equal; then weights (to tol, if tol > 0) and slots (if the peer gave them) aligned by expert.
void same_choices(tally& tl, const std::string& what, const std::vector<choice>& ours, const std::vector<choice>& peer,
                  double tol) {
  CHECK_MESSAGE(ids(ours) == ids(peer), what << ": experts ours " << text(ids(ours)) << ", theirs " << text(ids(peer)));
  if (ids(ours) != ids(peer)) return;
  for (std::size_t j = 0; j < ours.size(); ++j) {
    const std::string at = what + " expert " + std::to_string(peer[j].expert);
    if (tol > 0 && !std::isnan(peer[j].weight)) close(tl, at + " weight", ours[j].weight, peer[j].weight, tol);
    if (peer[j].slot >= 0) CHECK_MESSAGE(ours[j].slot == peer[j].slot, at << ": slot ours " << ours[j].slot << ", theirs " << peer[j].slot);
  }
}

// ---- families ----------------------------------------------------------------------------------------------------

/// DeepSpeed's expected result of one top1gating/topkgating run.
struct ds_expect {
  double cf;
  std::int64_t min_capacity, capacity;
  bool drop;
  locmoe::drop_policy policy;
  std::vector<std::int64_t> exp_counts, kept_per_expert;
};

/// One DeepSpeed top1gating/topkgating run through capacity_assigner (DS topk renormalizes the kept gates).
void check_ds_run(tally& tl, const std::string& what, const routing<float>& r, std::size_t n, const ds_expect& x,
                  bool counts_defined, bool renormalize,
                  const std::function<std::vector<choice>(std::size_t)>& peer_kept) {
  auto o = capacity(x.cf, x.min_capacity, x.drop, x.policy);
  o.renormalize_kept = renormalize;
  const auto a = assign(r, n, o);
  CHECK_MESSAGE(a.stats.capacity == x.capacity, what << ": capacity ours " << a.stats.capacity << ", theirs " << x.capacity);
  if (counts_defined) {
    same_counts(what + ": tokens_per_expert", a.routed, x.exp_counts);
    same_counts(what + ": kept_per_expert", a.kept, x.kept_per_expert);
  }
  if (peer_kept) {
    for (std::size_t t = 0; t < r.idx.size() / r.k; ++t) {
      same_choices(tl, what + " token " + std::to_string(t), ours_kept(a, t), peer_kept(t), prob_tol_f32);
    }
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

}  // namespace

TEST_CASE("DeepSpeed top1gating: route/ds_top1_*, peers/ds_top1") {
  tally tl{"DeepSpeed top1gating"};
  const fs::path dir = golden_dir();
  const auto top1 = aux_options<float>(1, locmoe::aux_normalization::first_choice);
  const auto top1_d = aux_options<double>(1, locmoe::aux_normalization::first_choice);
  for (const auto& c : route_cases("ds_top1_")) {
    const std::string name = c.at("name");
    CAPTURE(name);
    const auto l = read_logits(dir / "route" / c.at("logits").get<std::string>());
    const auto r = route_k<float>(l, 1);
    const ds_expect x{c.at("capacity_factor").get<double>(), c.at("min_capacity").get<std::int64_t>(),
                      c.at("capacity").get<std::int64_t>(), true, locmoe::drop_policy::position,
                      ints(c.at("tokens_per_expert")), ints(c.at("kept_per_expert"))};
    // kept_identity_defined false: DS keeps topk(one-hot mask) of an overflowing expert; only counts compare.
    check_ds_run(tl, name, r, l.experts, x, true, false, nullptr);
    const auto ours = losses(l, r.idx, 1, &top1);
    close(tl, name + " aux_loss", ours.aux, c.at("aux_loss").get<double>(), loss_tol_f32);
    const auto grad = read_logits(dir / "route" / c.at("grad_logits_file").get<std::string>());
    close_matrix(tl, name + " grad", ours.grad, std::vector<double>(grad.d), grad_tol_f32);
  }
  for (const auto& file : peer_cases("ds_top1")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    const auto r = route_k<float>(l, 1);
    const json& ties = c.at("gate_tie_tokens");
    // DS takes argmax of the float32 softmax (first index among equal gates); we rank by logits (lower index among
    // equal logits). For a gate-tied token both agree exactly when DS's pick has the token's largest logit;
    // otherwise rounding made the gates equal where the logits differ, a difference by design: not compared.
    bool routing_defined = true;
    const auto& first_run = c.at("runs").at(0);
    for (std::size_t t = 0; t < l.tokens; ++t) {
      const auto theirs_e = first_run.at("expert")[t].get<std::size_t>();
      const float* row = l.f.data() + t * l.experts;
      if (listed(ties, t) && row[theirs_e] != *std::max_element(row, row + l.experts)) {
        routing_defined = false;
        continue;
      }
      CHECK_MESSAGE(r.idx[t] == static_cast<expert_index>(theirs_e), name << " token " << t << ": expert ours " << r.idx[t]
                                                                        << ", theirs " << theirs_e);
    }
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      const std::string what = name + " cf " + num(p.at("capacity_factor").get<double>()) + " min " +
                               std::to_string(p.at("min_capacity").get<int>()) + (p.at("drop_tokens").get<bool>() ? "" : " no-drop");
      std::vector<std::int64_t> kept(l.experts, 0);
      for (std::size_t t = 0; t < l.tokens; ++t) kept[run.at("expert")[t].get<std::size_t>()] += run.at("kept")[t].get<int>();
      const ds_expect x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                        run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(),
                        locmoe::drop_policy::position, ints(run.at("exp_counts")), kept};
      std::function<std::vector<choice>(std::size_t)> peer_kept;
      if (run.at("kept_identity_well_defined").get<bool>() && routing_defined) {
        peer_kept = [&run](std::size_t t) {
          if (!run.at("kept")[t].get<int>()) return std::vector<choice>{};
          return theirs(json::array({run.at("expert")[t]}), json::array({run.at("gate")[t]}), json::array({run.at("location")[t]}));
        };
      }
      check_ds_run(tl, what, r, l.experts, x, routing_defined, false, peer_kept);
      if (routing_defined) {
        close(tl, what + " l_aux", losses(l, r.idx, 1, &top1).aux, run.at("l_aux").get<double>(), loss_tol_f32);
        if (c.at("f64_routing_identical").get<bool>()) {
          close(tl, what + " l_aux_f64", losses(l, route_k<double>(l, 1).idx, 1, &top1_d).aux, run.at("l_aux_f64").get<double>(), ds_tol_f64);
        }
      }
    }
    if (routing_defined) {
      close_matrix(tl, name + " grad_l_aux", losses(l, r.idx, 1, &top1).grad, flat(c.at("grad_l_aux")), grad_tol_f32);
      if (c.at("f64_routing_identical").get<bool>()) {
        close_matrix(tl, name + " grad_l_aux_f64", losses(l, route_k<double>(l, 1).idx, 1, &top1_d).grad,
                     flat(c.at("grad_l_aux_f64")), ds_tol_f64);
      }
    } else {
      MESSAGE(std::string(name + ": a gate tie without a logit tie; counts and losses depend on it, not compared"));
    }
  }
  tl.print();
}

TEST_CASE("DeepSpeed topkgating: route/ds_top*_pos_*, peers/ds_topk") {
  tally tl{"DeepSpeed topkgating"};
  const fs::path dir = golden_dir();
  const auto all = aux_options<float>(1, locmoe::aux_normalization::all_choices);
  const auto all_d = aux_options<double>(1, locmoe::aux_normalization::all_choices);
  for (const auto& c : route_cases("ds_top", "_pos_")) {
    const std::string name = c.at("name");
    CAPTURE(name);
    const auto l = read_logits(dir / "route" / c.at("logits").get<std::string>());
    const auto k = c.at("top_k").get<std::size_t>();
    const auto r = route_k<float>(l, k);
    const ds_expect x{c.at("capacity_factor").get<double>(), c.at("min_capacity").get<std::int64_t>(),
                      c.at("capacity").get<std::int64_t>(), true, locmoe::drop_policy::position,
                      ints(c.at("tokens_per_expert")), ints(c.at("kept_per_expert"))};
    // "position" (cumsum) keeps the earliest tokens: deterministic, so the kept sets compare (no gates given).
    check_ds_run(tl, name, r, l.experts, x, true, true, [&](std::size_t t) { return theirs(c.at("kept")[t]); });
    const auto ours = losses(l, r.idx, k, &all);
    close(tl, name + " aux_loss", ours.aux, c.at("aux_loss").get<double>(), loss_tol_f32);
    const auto grad = read_logits(dir / "route" / c.at("grad_logits_file").get<std::string>());
    close_matrix(tl, name + " grad", ours.grad, grad.d, grad_tol_f32);
  }
  for (const auto& file : peer_cases("ds_topk")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    const auto k = c.at("k").get<std::size_t>();
    const json& ties = c.at("topk_tie_tokens");  // torch.topk's order among tied scores: those tokens not compared
    const bool untied = ties.empty();
    const auto r = route_k<float>(l, k);
    for (std::size_t t = 0; t < l.tokens; ++t) {
      if (!listed(ties, t)) same_choices(tl, name + " selected token " + std::to_string(t), ours_routed(r, t), theirs(c.at("selected_experts")[t]), 0);
    }
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      const auto run_k = p.at("k").get<std::size_t>();
      const std::string policy = p.at("drop_policy");
      const std::string what = name + " k " + std::to_string(run_k) + " " + policy + (p.at("drop_tokens").get<bool>() ? "" : " no-drop");
      const auto rk = route_k<float>(l, run_k);
      const ds_expect x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                        run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(),
                        policy == "probs" ? locmoe::drop_policy::probs : locmoe::drop_policy::position,
                        ints(run.at("exp_counts")), kept_counts(run.at("kept_experts"), l.experts)};
      std::function<std::vector<choice>(std::size_t)> peer_kept;
      if (run.at("kept_identity_well_defined").get<bool>() && untied) {  // capacity_tie_experts: not well defined
        peer_kept = [&run](std::size_t t) { return theirs(run.at("kept_experts")[t], run.at("kept_gates")[t], run.at("kept_locations")[t]); };
      }
      check_ds_run(tl, what, rk, l.experts, x, untied, true, peer_kept);
      // The loss depends on the routing only through the pre-drop counts: with tied tokens, compare it when ours agree.
      if (!untied && counts(rk.idx, run_k, l.experts, false) != x.exp_counts) {
        MESSAGE(std::string(what + ": counts differ on torch.topk's tie order (topk_tie_tokens); l_aux not compared"));
        continue;
      }
      close(tl, what + " l_aux", losses(l, rk.idx, run_k, &all).aux, run.at("l_aux").get<double>(), loss_tol_f32);
      if (c.at("f64_routing_identical").get<bool>()) {
        close(tl, what + " l_aux_f64", losses(l, route_k<double>(l, run_k).idx, run_k, &all_d).aux,
              run.at("l_aux_f64").get<double>(), ds_tol_f64);
      }
      if (run_k != k) continue;  // grad_l_aux is the case's k
      close_matrix(tl, what + " grad_l_aux", losses(l, rk.idx, k, &all).grad, flat(c.at("grad_l_aux")), grad_tol_f32);
      if (c.at("f64_routing_identical").get<bool>()) {
        close_matrix(tl, what + " grad_l_aux_f64", losses(l, route_k<double>(l, k).idx, k, &all_d).grad,
                     flat(c.at("grad_l_aux_f64")), ds_tol_f64);
      }
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
  tally tl{"DeepSpeed top2gating"};
  const auto first = aux_options<float>(1, locmoe::aux_normalization::first_choice);
  for (const auto& file : peer_cases("ds_top2")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    const auto r = route_k<float>(l, 2);
    const auto ours = losses(l, r.idx, 2, &first);
    for (const auto& run : c.at("runs")) {
      const auto& p = run.at("params");
      const std::string what = name + (p.at("drop_tokens").get<bool>() ? "" : " no-drop");
      for (std::size_t t = 0; t < l.tokens; ++t) {
        CHECK_MESSAGE(r.idx[2 * t] == run.at("top1_expert")[t].get<expert_index>(), what << " token " << t << " top1");
        CHECK_MESSAGE(r.idx[2 * t + 1] == run.at("top2_expert")[t].get<expert_index>(), what << " token " << t << " top2");
      }
      const ds_expect x{p.at("capacity_factor").get<double>(), p.at("min_capacity").get<std::int64_t>(),
                        run.at("capacity").get<std::int64_t>(), p.at("drop_tokens").get<bool>(),
                        locmoe::drop_policy::position, ints(run.at("exp_counts")),
                        kept_counts(run.at("kept_experts"), l.experts)};
      check_ds_run(tl, what, r, l.experts, x, true, true, nullptr);
      close(tl, what + " l_aux", ours.aux, run.at("l_aux").get<double>(), loss_tol_f32);
    }
    close_matrix(tl, name + " grad_l_aux", ours.grad, flat(c.at("grad_l_aux")), grad_tol_f32);  // no f64 (peer fails)
  }
  tl.print();
}

namespace {

/// Megatron-Core topk_routing_with_score_function's parameters as router_options.
locmoe::router_options<float> megatron_options(const json& p, const std::vector<float>& bias) {
  locmoe::router_options<float> o;
  o.k = p.at("topk").get<std::size_t>();
  o.softmax_before_topk = p.value("use_pre_softmax", true);
  o.score = p.value("score_function", std::string("softmax")) == "sigmoid" ? locmoe::score_function::sigmoid
                                                                            : locmoe::score_function::softmax;
  if (p.value("expert_bias", false)) o.expert_bias = bias.data();
  if (!p.at("num_groups").is_null()) o.groups = p.at("num_groups").get<std::size_t>();
  if (!p.at("group_topk").is_null()) o.group_limit = p.at("group_topk").get<std::size_t>();
  if (!p.at("scaling_factor").is_null()) o.scale = p.at("scaling_factor").get<float>();
  return o;
}

/// One apply_router_token_dropping result (peers/README section 4).
struct mc_drop {
  double cf;
  std::string policy;
  bool pad;
  std::int64_t capacity;
  std::vector<std::int64_t> after;  // tokens_per_expert_after
  bool kept_defined;                // kept_routed_well_defined
  const json* final_experts;        // [T][], sorted by id
  const json* final_probs;          // [T][] or null: not compared
};

mc_drop drop_of(const json& d) {
  return {d.at("capacity_factor").get<double>(), d.at("drop_policy").get<std::string>(),
          d.at("pad_to_capacity").get<bool>(), d.at("expert_capacity").get<std::int64_t>(),
          ints(d.at("tokens_per_expert_after")), d.at("kept_routed_well_defined").get<bool>(), &d.at("final_experts"),
          &d.at("final_probs")};
}

/// Capacity, counts after the drop and, where defined, the kept routed choices with their (not renormalized) probs.
void check_megatron_drop(tally& tl, const std::string& what, const routing<float>& r, std::size_t n, const mc_drop& d,
                         bool routing_defined) {
  auto o = capacity(d.cf, 0, true, d.policy == "probs" ? locmoe::drop_policy::probs : locmoe::drop_policy::position);
  o.pad_to_capacity = d.pad;  // Megatron never renormalizes after the drop: renormalize_kept stays false
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
  } else {
    // README: with cap > T Megatron skips the drop and pads every token onto every expert (T rows, not C).
    MESSAGE(std::string(what + ": capacity > T with pad_to_capacity (Megatron: every token everywhere); not compared"));
  }
  if (!routing_defined || !d.kept_defined) return;  // capacity_tie_experts, or the position policy's topk order
  for (std::size_t t = 0; t < T; ++t) {
    std::vector<choice> peer;  // map AND final: the routed choices kept (pad_to_capacity adds unrouted ones)
    const auto routed = ids(ours_routed(r, t));
    for (const auto& f : theirs((*d.final_experts)[t], d.final_probs ? (*d.final_probs)[t] : json())) {
      if (std::find(routed.begin(), routed.end(), f.expert) != routed.end()) peer.push_back(f);
    }
    same_choices(tl, what + " token " + std::to_string(t), ours_kept(a, t), peer, prob_tol_f32);
  }
}

}  // namespace

TEST_CASE("Megatron-Core routing and token dropping: route/mc_*, peers/mcore_routing") {
  tally tl{"Megatron-Core routing"};
  const fs::path dir = golden_dir();
  const auto all = aux_options<float>(1, locmoe::aux_normalization::all_choices);
  for (const auto& c : route_cases("mc_")) {
    const std::string name = c.at("name");
    CAPTURE(name);
    const auto l = read_logits(dir / "route" / c.at("logits").get<std::string>());
    std::vector<float> bias;
    if (c.contains("expert_bias_file")) {
      bias = locmoe::cli::npy::read_float32_vector((dir / "route" / c.at("expert_bias_file").get<std::string>()).string(), "bias");
    }
    const json p = {{"topk", c.at("top_k")}, {"use_pre_softmax", true}, {"expert_bias", !bias.empty()},
                    {"score_function", c.value("score_function", "softmax")}, {"num_groups", c.value("num_groups", json())},
                    {"group_topk", c.value("group_topk", json())}, {"scaling_factor", nullptr}};
    const auto o = megatron_options(p, bias);
    const auto r = route(l, o);
    ++tl.cases;
    if (c.contains("selected")) {  // group-limited routing, dense output, no capacity
      for (std::size_t t = 0; t < l.tokens; ++t) {
        same_choices(tl, name + " token " + std::to_string(t), ours_routed(r, t),
                     theirs(c.at("selected")[t], c.at("weight_of_selected")[t]), prob_tol_f32);
      }
      continue;
    }
    // Top-k, then the "probs" drop. The manifest has no flags: ties in these random logits are not expected.
    same_counts(name + ": tokens_per_expert", counts(r.idx, o.k, l.experts, false), ints(c.at("tokens_per_expert")));
    const mc_drop d{c.at("capacity_factor").get<double>(), "probs", false, c.at("capacity").get<std::int64_t>(),
                    ints(c.at("kept_per_expert")), true, &c.at("kept"), nullptr};
    check_megatron_drop(tl, name, r, l.experts, d, true);
    const auto ours = losses(l, r.idx, o.k, &all, 1.0);
    close(tl, name + " aux_loss", ours.aux, c.at("aux_loss").get<double>(), loss_tol_f32);
    close(tl, name + " z_loss", ours.z, c.at("z_loss").get<double>(), loss_tol_f32);
    const auto grad = read_logits(dir / "route" / c.at("grad_logits_file").get<std::string>());
    close_matrix(tl, name + " grad (aux + z)", ours.grad, grad.d, grad_tol_f32);
  }
  for (const auto& file : peer_cases("mcore_routing")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    const fs::path bias_file = file.parent_path() / (name + ".expert_bias.npy");
    const auto bias = fs::exists(bias_file) ? locmoe::cli::npy::read_float32_vector(bias_file.string(), "bias") : std::vector<float>();
    for (const auto& rc : c.at("routings")) {
      const auto& p = rc.at("params");
      const std::string what = name + " " + p.dump();
      if (p.at("score_function").get<std::string>() == "sqrtsoftplus") {
        MESSAGE(std::string(what + ": score function sqrtsoftplus is not supported; skipped"));
        continue;
      }
      REQUIRE_MESSAGE((!p.at("expert_bias").get<bool>() || bias.size() == l.experts), "missing " << bias_file);
      const auto o = megatron_options(p, bias);
      const auto r = route(l, o);
      const json& ties = rc.at("topk_tie_tokens");  // null: group-limited, not computed (these inputs have no ties)
      const bool untied = ties.is_null() || ties.empty();
      // Megatron lists each token's experts sorted by id, we sort by score: compared as sets, probs aligned by id.
      for (std::size_t t = 0; t < l.tokens; ++t) {
        if (listed(ties, t)) continue;
        same_choices(tl, what + " token " + std::to_string(t), ours_routed(r, t),
                     theirs(rc.at("topk_experts")[t], rc.at("topk_probs")[t]), prob_tol_f32);
      }
      if (untied) same_counts(what + ": tokens_per_expert", counts(r.idx, o.k, l.experts, false), ints(rc.at("tokens_per_expert")));
      for (const auto& dj : rc.at("drops")) {
        const auto d = drop_of(dj);
        check_megatron_drop(tl, what + " cf " + num(d.cf) + " " + d.policy + (d.pad ? " pad" : ""), r, l.experts, d, untied);
        ++tl.cases;
      }
    }
  }
  tl.print();
}

namespace {

/// A result's padding mask (Megatron: true = padding), or an empty vector when there is none.
std::vector<bool> padding_of(const json& result, std::size_t tokens) {
  const json& m = result.at("padding_mask");
  if (m.is_null() || (m.is_boolean() && !m.get<bool>())) return {};
  REQUIRE_MESSAGE(m.is_array(), "padding_mask: expected false or a list of " << tokens << " values, got " << m.dump());
  REQUIRE(m.size() == tokens);
  std::vector<bool> pad;
  for (const auto& x : m) pad.push_back(x.is_boolean() ? x.get<bool>() : x.get<double>() != 0);
  return pad;
}

/// Padded tokens enter the losses as rows whose first choice is no_expert; their gradient rows must be 0.
template <class S>
void check_padded_rows(const std::string& what, const std::vector<bool>& pad, const std::vector<S>& ours,
                       const std::vector<double>& peer, std::size_t n) {
  for (std::size_t t = 0; t < pad.size(); ++t) {
    for (std::size_t e = 0; pad[t] && e < n; ++e) {
      CHECK_MESSAGE((ours[t * n + e] == S(0) && peer[t * n + e] == 0.0), what << ": padded token " << t << " has a gradient");
    }
  }
}

}  // namespace

TEST_CASE("Megatron-Core aux loss: peers/mcore_aux_loss") {
  tally tl{"Megatron-Core aux loss"};
  for (const auto& file : peer_cases("mcore_aux_loss")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    for (const auto& res : c.at("results")) {
      const std::string sf = res.at("score_function");
      const auto k = res.at("topk").get<std::size_t>();
      const double coeff = res.at("coeff").get<double>();
      const std::string what = name + " " + sf + " k " + std::to_string(k) + " coeff " + num(coeff);
      const auto score = sf == "sigmoid" ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
      locmoe::router_options<float> o;  // a plain Top-k over the full scores, as compute_routing_scores_for_aux_loss
      o.k = k;
      o.score = score;
      auto idx = route(l, o).idx;
      const auto pad = padding_of(res, l.tokens);
      for (std::size_t t = 0; t < pad.size(); ++t) {
        if (pad[t]) std::fill(idx.begin() + static_cast<std::ptrdiff_t>(t * k), idx.begin() + static_cast<std::ptrdiff_t>((t + 1) * k), no_expert);
      }
      const auto ours_counts = counts(idx, k, l.experts, false);
      if (!res.at("topk_tie_tokens").empty() && ours_counts != ints(res.at("tokens_per_expert"))) {
        MESSAGE(std::string(what + ": counts differ on torch.topk's tie order (topk_tie_tokens); not compared"));
        continue;
      }
      same_counts(what + ": tokens_per_expert", ours_counts, ints(res.at("tokens_per_expert")));
      const auto of = aux_options<float>(coeff, locmoe::aux_normalization::all_choices, score);
      const auto od = aux_options<double>(coeff, locmoe::aux_normalization::all_choices, score);
      const auto f = losses(l, idx, k, &of);
      const auto d = losses(l, idx, k, &od);  // the f64 companion keeps the float32 routing map, as the peer
      CHECK(static_cast<double>(f.tokens) == res.at("total_num_tokens").get<double>());
      close(tl, what + " loss", f.aux, res.at("loss").get<double>(), loss_tol_f32);
      close(tl, what + " loss_f64", d.aux, res.at("loss_f64").get<double>(), mc_tol_f64);
      close_matrix(tl, what + " grad", f.grad, flat(res.at("grad")), grad_tol_f32);
      close_matrix(tl, what + " grad_f64", d.grad, flat(res.at("grad_f64")), mc_tol_f64);
      check_padded_rows(what, pad, f.grad, flat(res.at("grad")), l.experts);
      ++tl.cases;
    }
  }
  tl.print();
}

TEST_CASE("Megatron-Core z-loss: peers/mcore_z_loss") {
  tally tl{"Megatron-Core z-loss"};
  for (const auto& file : peer_cases("mcore_z_loss")) {
    const json c = load(file);
    const std::string name = c.at("case");
    CAPTURE(name);
    const auto l = read_logits(file.parent_path() / c.at("inputs").at("logits").at("file").get<std::string>());
    for (const auto& res : c.at("results")) {
      const double coeff = res.at("coeff").get<double>();
      const std::string what = name + " coeff " + num(coeff);
      const auto pad = padding_of(res, l.tokens);
      std::vector<expert_index> idx(l.tokens, 0);  // [T x 1]: no_expert masks a padded token
      for (std::size_t t = 0; t < pad.size(); ++t) idx[t] = pad[t] ? no_expert : 0;
      const auto f = losses<float>(l, idx, 1, nullptr, coeff);
      const auto d = losses<double>(l, idx, 1, nullptr, coeff);
      close(tl, what + " z_loss", f.z, res.at("z_loss").get<double>(), loss_tol_f32);
      close(tl, what + " z_loss_f64", d.z, res.at("z_loss_f64").get<double>(), mc_tol_f64);
      close_matrix(tl, what + " grad", f.grad, flat(res.at("grad")), grad_tol_f32);
      close_matrix(tl, what + " grad_f64", d.grad, flat(res.at("grad_f64")), mc_tol_f64);
      check_padded_rows(what, pad, f.grad, flat(res.at("grad")), l.experts);
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
