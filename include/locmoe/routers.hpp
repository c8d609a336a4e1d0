// locmoe/routers.hpp - who gets which token: score routers (Switch, LocMoE, Top-k, node-limited Top-k with
// sigmoid scores and an expert bias), Hash and PanGu-Sigma RRE routers, and the expert-bias update.
//
// score_route(logits [T x n]) -> indices [T x k], weights [T x k] (and the scores [T x n] if asked):
//   scores     softmax:  p = softmax(l)                                  sigmoid:  s = 1 / (1 + exp(-l))
//   key        the value experts are ranked by: p (softmax_before_topk), l (softmax after Top-k), or s;
//              plus expert_bias[e] when given (selection only: auxiliary-loss-free balancing, DeepSeek-V3)
//   groups     node-limited Top-k (DeepSeek-V3; Megatron-Core group_limited_topk): experts form G groups
//              (contiguous blocks of n / G, or an explicit expert -> group map such as a topology's nodes);
//              a group's score is the sum of its best max(1, floor(k / M)) keys (all of them if it has fewer;
//              -inf if none is selectable), the best M groups are kept and Top-k is taken among their experts.
//              (Megatron-Core sums floor(k / M) keys, so for k < M every group scores 0 and torch.topk's tie
//              order decides; locmoe scores by the best key instead.) Groups may be empty (nodes without
//              experts) and then are never kept while a group with experts is left.
//   weights    softmax before Top-k: p_e (divided by their sum over the k chosen if renormalize);
//              softmax after Top-k:  exp(l_e) / sum_{chosen} exp(l_c) (k = 1 gives 1);
//              sigmoid:              s_e, divided by (sum_{chosen} s_c + 1e-20) when k > 1, as Megatron-Core;
//              then multiplied by `scale`. Weights never include the bias.
//   Switch (Fedus et al.) is dense_route with k = 1 and LocMoE (paper section 3.2) is grap_route with k = 1
//   (select.hpp); score_route with the defaults computes the same Top-1 from logits.
// Order and ties: the k chosen are sorted by key, highest first; equal keys (and equal group scores) go to
// the lower index. Non-finite logits follow select.hpp: a NaN or +inf makes the token invalid (no_expert in
// every slot, weight 0, counted in the return value); -inf masks the expert; fewer than k selectable experts
// leave no_expert slots with weight 0.
//
// hash_route (Roller et al. 2021, Hash Layers): expert = table[id] when a table is given (balanced_hash_table
//   builds one from token frequencies), otherwise splitmix64(id ^ seed) mod n. Weight 1.
// rre_route (PanGu-Sigma, paper section 3.1): level one, the token's domain picks expert group g (experts
//   [floor(g n / G), floor((g + 1) n / G))); level two, splitmix64(id ^ seed) mod |group| inside it. Weight 1.
// update_expert_bias (Megatron-Core get_updated_expert_bias): bias_e += rate * sign(mean_load - load_e).
//
// Preconditions (checked; errors name the argument): 1 <= k <= n <= max_experts; 1 <= M <= G <= max_experts;
// floor(k / M) <= 64; the M smallest non-empty groups hold at least k experts together; a finite bias and scale;
// token ids >= 0 (and < table size); domains in [0, G).
// Returns the number of invalid tokens (errno_on_error: a checked_count, not ok() on bad arguments; error.hpp).
// Cost: score_route O(n k) per token, one exp per score (SIMD for the softmax-before-Top-k path without bias
// or groups, which is select.hpp's softmax_top_k; softmax after Top-k without bias, groups or scores asked for
// runs select.hpp's SIMD Top-k on the logits and k exps); hash/rre O(1) per token. The generic path allocates one
// workspace per call (about 90 KB for float) unless the caller passes a reusable route_scratch; little stack.
// Thread safety: no state; disjoint token ranges may run concurrently (each with its own route_scratch).
// Example: docs/api.md#routers.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/select.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace locmoe {

enum class score_function { softmax, sigmoid };

template <class S>
struct router_options {
  std::size_t k = 1;                              ///< experts per token
  score_function score = score_function::softmax;
  bool softmax_before_topk = true;                ///< softmax over all n, then Top-k (Megatron use_pre_softmax)
  bool renormalize = false;                       ///< softmax before Top-k: weights divided by their sum
  const S* expert_bias = nullptr;                 ///< [n] added to the keys for selection only
  std::size_t groups = 0;                         ///< G > 0: node-limited Top-k over G groups
  std::size_t group_limit = 0;                    ///< M: groups kept per token
  const std::int32_t* expert_group = nullptr;     ///< [n] group of each expert in [0, G); null: contiguous blocks
  S scale = 1;                                    ///< multiplies every weight last
};

namespace detail {

inline constexpr double sigmoid_renormalize_epsilon = 1e-20;  // Megatron-Core's

template <class S>
S sigmoid(S x) {
  return x >= 0 ? S(1) / (S(1) + std::exp(-x)) : std::exp(x) / (S(1) + std::exp(x));
}

/// Whether key a at index i ranks before key b at index j: higher first, ties to the lower index.
template <class S>
bool ranks_before(S a, std::size_t i, S b, std::size_t j) {
  return a > b || (a == b && i < j);
}

/// Indices of the k best keys (-inf excluded), best first, into `chosen`; returns how many were found.
template <class S>
std::size_t best_keys(const S* key, std::size_t n, std::size_t k, const bool* allowed, std::uint16_t* chosen) {
  std::size_t found = 0;
  for (std::size_t e = 0; e < n; ++e) {
    if (key[e] == -std::numeric_limits<S>::infinity() || (allowed && !allowed[e])) continue;
    if (found == k && !ranks_before(key[e], e, key[chosen[k - 1]], chosen[k - 1])) continue;
    std::size_t pos = found < k ? found++ : k - 1;
    while (pos > 0 && ranks_before(key[e], e, key[chosen[pos - 1]], chosen[pos - 1])) {
      chosen[pos] = chosen[pos - 1];
      --pos;
    }
    chosen[pos] = static_cast<std::uint16_t>(e);
  }
  return found;
}

template <class S>
std::size_t group_of(const router_options<S>& o, std::size_t n, std::size_t e) {
  return o.expert_group ? static_cast<std::size_t>(o.expert_group[e]) : e * o.groups / n;
}

/// Per-call scratch of the generic router path, on the heap (about 21 n bytes for float, up to 4096 experts
/// and groups): the experts of each group (group g holds members[offset[g] .. offset[g + 1])), and one
/// token's scores, keys and choices.
template <class S>
struct route_workspace {
  std::array<std::uint16_t, simd::max_experts + 1> offset;
  std::array<std::uint16_t, simd::max_experts> members, chosen, best_groups;
  std::array<S, simd::max_experts> score, key, group_score;
  std::array<bool, simd::max_experts> allowed;

  route_workspace(const router_options<S>& o, std::size_t n) {
    if (o.groups == 0) return;
    offset.fill(0);
    for (std::size_t e = 0; e < n; ++e) ++offset[group_of(o, n, e) + 1];
    for (std::size_t g = 0; g < o.groups; ++g) offset[g + 1] = static_cast<std::uint16_t>(offset[g + 1] + offset[g]);
    std::copy(offset.begin(), offset.begin() + static_cast<std::ptrdiff_t>(o.groups), chosen.begin());  // cursors
    for (std::size_t e = 0; e < n; ++e) members[chosen[group_of(o, n, e)]++] = static_cast<std::uint16_t>(e);
  }
};

/// Marks the experts of the best M groups (node-limited Top-k) in w.allowed; O(n) per token. A group's score is
/// the sum of its best max(1, floor(k / M)) keys (fewer if it has fewer selectable experts; -inf if none).
template <class S>
void keep_best_groups(const router_options<S>& o, route_workspace<S>& w, std::size_t n) {
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  const std::size_t per_group = std::max<std::size_t>(1, o.k / o.group_limit);  // <= 64, checked
  for (std::size_t g = 0; g < o.groups; ++g) {
    std::array<S, 64> top;  // the group's best keys, highest first (its members are in index order)
    std::size_t taken = 0;
    for (std::size_t m = w.offset[g]; m < w.offset[g + 1]; ++m) {
      const S v = w.key[w.members[m]];
      if (v == minus_inf || (taken == per_group && !(v > top[taken - 1]))) continue;
      std::size_t pos = taken < per_group ? taken++ : per_group - 1;
      for (; pos > 0 && v > top[pos - 1]; --pos) top[pos] = top[pos - 1];
      top[pos] = v;
    }
    S sum = 0;
    for (std::size_t i = 0; i < taken; ++i) sum += top[i];
    w.group_score[g] = taken ? sum : minus_inf;
  }
  const std::size_t kept = best_keys(w.group_score.data(), o.groups, o.group_limit, nullptr, w.best_groups.data());
  std::fill(w.allowed.begin(), w.allowed.begin() + static_cast<std::ptrdiff_t>(n), false);
  for (std::size_t i = 0; i < kept; ++i) {
    const std::size_t g = w.best_groups[i];
    for (std::size_t m = w.offset[g]; m < w.offset[g + 1]; ++m) w.allowed[w.members[m]] = true;
  }
}

/// One token: scores, keys, groups, Top-k and weights. Returns false for an invalid token.
template <class S>
bool route_token(const router_options<S>& o, route_workspace<S>& w, const S* logits, std::size_t n,
                 expert_index* indices, S* weights, S* scores_out) {
  constexpr S minus_inf = -std::numeric_limits<S>::infinity();
  S max_logit = minus_inf;
  for (std::size_t e = 0; e < n; ++e) {
    const S l = logits[e];
    if (std::isnan(l) || l == std::numeric_limits<S>::infinity()) return false;
    max_logit = std::max(max_logit, l);
  }
  if (max_logit == minus_inf) return false;
  const bool need_scores = scores_out || o.softmax_before_topk || o.score != score_function::softmax;
  if (o.score == score_function::softmax && need_scores) {
    S sum = 0;
    for (std::size_t e = 0; e < n; ++e) sum += (w.score[e] = std::exp(logits[e] - max_logit));
    for (std::size_t e = 0; e < n; ++e) w.score[e] /= sum;
  } else if (o.score == score_function::sigmoid) {
    for (std::size_t e = 0; e < n; ++e) w.score[e] = logits[e] == minus_inf ? S(0) : sigmoid(logits[e]);
  }
  const bool by_logit = o.score == score_function::softmax && !o.softmax_before_topk;
  for (std::size_t e = 0; e < n; ++e) {
    w.key[e] = logits[e] == minus_inf ? minus_inf : (by_logit ? logits[e] : w.score[e]);
    if (o.expert_bias && w.key[e] != minus_inf) w.key[e] += o.expert_bias[e];
  }
  if (o.groups > 0) keep_best_groups(o, w, n);
  const std::size_t found = best_keys(w.key.data(), n, o.k, o.groups > 0 ? w.allowed.data() : nullptr, w.chosen.data());
  // Softmax over the chosen logits (after Top-k, or renormalized before it): exp(l_e - m) / sum exp(l_c - m),
  // m the largest chosen logit, which a bias need not put first; this never forms 0 / 0.
  const bool over_chosen = by_logit || (o.score == score_function::softmax && o.renormalize);
  S chosen_max = minus_inf;
  for (std::size_t i = 0; i < found; ++i) chosen_max = std::max(chosen_max, logits[w.chosen[i]]);
  S sum = 0;
  for (std::size_t i = 0; i < found; ++i) {
    const std::size_t e = w.chosen[i];
    weights[i] = over_chosen ? std::exp(logits[e] - chosen_max) : w.score[e];
    sum += weights[i];
  }
  S divisor = 1;
  if (over_chosen) divisor = sum;
  if (o.score == score_function::sigmoid && o.k > 1) divisor = sum + S(sigmoid_renormalize_epsilon);
  for (std::size_t i = 0; i < o.k; ++i) {
    indices[i] = i < found ? static_cast<expert_index>(w.chosen[i]) : no_expert;
    weights[i] = i < found ? weights[i] / divisor * o.scale : S(0);
  }
  if (scores_out) std::copy(w.score.begin(), w.score.begin() + static_cast<std::ptrdiff_t>(n), scores_out);
  return true;
}

/// Turns token t's chosen logits (weights [t], best first, as select.hpp's top_k leaves them) into route_token's
/// weights for softmax after Top-k: exp(l_j - l_0) / sum over the chosen, times scale; 0 for no_expert slots.
template <class S>
void softmax_over_chosen(const router_options<S>& o, const route_outputs<S>& out, std::size_t t) {
  const expert_index* indices = out.indices.row(t);
  S* weights = out.weights.row(t);
  if (indices[0] == no_expert) return;  // invalid: the kernel wrote no_expert and zeros
  const S chosen_max = weights[0];
  std::size_t found = 0;
  S sum = 0;
  for (; found < o.k && indices[found] != no_expert; ++found) sum += (weights[found] = std::exp(weights[found] - chosen_max));
  for (std::size_t i = 0; i < o.k; ++i) weights[i] = i < found ? weights[i] / sum * o.scale : S(0);
}

template <class Policy, class S>
bool check_router_options(const char* fn, const router_options<S>& o, std::size_t n) {
  if (!check_selection<Policy>(fn, n, o.k, true)) return false;
  if (o.expert_bias) {
    for (std::size_t e = 0; e < n; ++e) {
      if (!std::isfinite(o.expert_bias[e])) {
        return raise<Policy>(errc::domain, fn, "expert_bias", "[" + std::to_string(e) + "] = " +
                             to_text(o.expert_bias[e]), "must be finite", false);
      }
    }
  }
  if (!(o.scale == o.scale) || !std::isfinite(o.scale)) {
    return raise<Policy>(errc::domain, fn, "scale", o.scale, "must be finite", false);
  }
  if (o.groups == 0) {
    if (o.group_limit != 0 || o.expert_group) {
      return raise<Policy>(errc::domain, fn, "groups", o.groups,
                           "must be > 0 when group_limit or expert_group is given", false);
    }
    return true;
  }
  if (o.groups > max_experts) {
    return raise<Policy>(errc::domain, fn, "groups", o.groups, "must satisfy 1 <= G <= max_experts (4096)", false);
  }
  if (o.group_limit < 1 || o.group_limit > o.groups) {
    return raise<Policy>(errc::domain, fn, "group_limit", o.group_limit, "must satisfy 1 <= M <= G (groups)", false);
  }
  if (o.k / o.group_limit > 64) {
    return raise<Policy>(errc::domain, fn, "k", o.k, "k / group_limit must be <= 64", false);
  }
  // Group sizes on the stack (8 KB; n <= 4096 fits 16 bits): the check runs on every call and allocates nothing.
  std::array<std::uint16_t, max_experts> size_storage;
  const auto size = size_storage.begin();
  std::fill(size, size + static_cast<std::ptrdiff_t>(o.groups), std::uint16_t{0});
  for (std::size_t e = 0; e < n; ++e) {
    if (o.expert_group && (o.expert_group[e] < 0 || static_cast<std::size_t>(o.expert_group[e]) >= o.groups)) {
      return raise<Policy>(errc::domain, fn, "expert_group",
                           "[" + std::to_string(e) + "] = " + std::to_string(o.expert_group[e]),
                           "every group id must be in [0, groups)", false);
    }
    ++size[group_of(o, n, e)];
  }
  // Empty groups (nodes without experts) are never kept while a group with experts is left.
  const auto first = size, last = size + static_cast<std::ptrdiff_t>(o.groups);
  const auto nonempty = std::partition(first, last, [](std::uint16_t s) { return s > 0; });
  std::sort(first, nonempty);
  const std::size_t kept_groups = std::min<std::size_t>(o.group_limit, static_cast<std::size_t>(nonempty - first));
  if (std::accumulate(first, first + static_cast<std::ptrdiff_t>(kept_groups), std::size_t{0}) < o.k) {
    return raise<Policy>(errc::domain, fn, "group_limit", o.group_limit,
                         "the M smallest groups with experts must hold at least k experts together", false);
  }
  return true;
}

/// splitmix64's finalizer (Steele, Lea, Flood 2014): a fixed, well-mixed 64-bit hash.
constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

template <class Policy, class Id>
bool check_ids(const char* fn, const char* argument, const Id* ids, std::size_t count, std::uint64_t limit,
               const char* rule) {
  static_assert(std::is_integral_v<Id>, "token ids and domains are integers");
  if (count > 0 && ids == nullptr) return raise<Policy>(errc::domain, fn, argument, "null", "must not be null", false);
  for (std::size_t t = 0; t < count; ++t) {
    if (ids[t] < 0 || static_cast<std::uint64_t>(ids[t]) >= limit) {
      return raise<Policy>(errc::domain, fn, argument, "[" + std::to_string(t) + "] = " + to_text(ids[t]), rule,
                           false);
    }
  }
  return true;
}

}  // namespace detail

/// Reusable scratch of score_route's generic path (about 21 n bytes for float; keep it on the heap), built from
/// the options and n of the calls that use it: a caller that routes every step keeps one and allocates nothing.
template <class S>
using route_scratch = detail::route_workspace<S>;

/// Routes logits [T x n] (see the header comment). `out.logits` is not used; `out.probabilities`, if passed,
/// receives the scores (softmax probabilities or sigmoids) [T x n]. `scratch`, if passed, must have been built
/// from the same options and n; without it the generic path allocates one per call.
template <class In, class Policy = default_policy>
count_result<Policy> score_route(const matrix_view<In>& logits, const router_options<detail::plain_t<In>>& options,
                        const route_outputs<detail::plain_t<In>>& out, token_range range = {},
                        const Policy& policy = Policy{}, route_scratch<detail::plain_t<In>>* scratch = nullptr) {
  using S = detail::plain_t<In>;
  static_assert(std::is_floating_point_v<S>, "score_route: logits are float or double");
  constexpr const char* fn = "locmoe::score_route";
  const std::size_t n = logits.cols;
  if (!detail::check_router_options<Policy>(fn, options, n) ||
      !detail::check_view<Policy>(fn, "logits", logits, logits.rows, n, "") ||
      !detail::check_route_outputs<Policy>(fn, out, logits.rows, n, options.k) ||
      !detail::resolve_range<Policy>(fn, range, logits.rows))
    return detail::failed;
  const bool plain_softmax = options.score == score_function::softmax && options.softmax_before_topk &&
                             !options.expert_bias && options.groups == 0 && options.scale == S(1);
  if (plain_softmax) {  // the SIMD kernel of select.hpp
    return detail::run_select<S>(logits, range, {options.k, true, options.renormalize}, out.probabilities,
                                 out.indices, out.weights);
  }
  const bool plain_after_topk = options.score == score_function::softmax && !options.softmax_before_topk &&
                                !options.expert_bias && options.groups == 0 && !out.probabilities.present();
  if (plain_after_topk) {  // Top-k of the logits by select.hpp's SIMD kernel, then route_token's arithmetic
    const std::size_t invalid = detail::run_select<S>(logits, range, {options.k, false, false}, {}, out.indices,
                                                      out.weights);
    for (std::size_t t = range.begin; t < range.end; ++t) detail::softmax_over_chosen(options, out, t);
    return invalid;
  }
  static_cast<void>(policy);
  std::unique_ptr<detail::route_workspace<S>> own;
  if (!scratch) scratch = (own = std::make_unique<detail::route_workspace<S>>(options, n)).get();
  std::size_t invalid = 0;
  for (std::size_t t = range.begin; t < range.end; ++t) {
    S* scores = out.probabilities.present() ? out.probabilities.row(t) : nullptr;
    if (!detail::route_token(options, *scratch, logits.row(t), n, out.indices.row(t), out.weights.row(t), scores)) {
      ++invalid;
      std::fill(out.indices.row(t), out.indices.row(t) + options.k, no_expert);
      std::fill(out.weights.row(t), out.weights.row(t) + options.k, S(0));
      if (scores) std::fill(scores, scores + n, S(0));
    }
  }
  return invalid;
}

template <class Id = std::int64_t>
struct hash_options {
  std::uint64_t seed = 0;
  const expert_index* table = nullptr;  ///< table[id] = expert, for ids < table_size; null: splitmix64
  std::size_t table_size = 0;
};

/// Hash router: one expert per token from its id; indices and weights [T x 1] (weight 1), T = ids count.
template <class Id, class S, class Policy = default_policy>
count_result<Policy> hash_route(const Id* token_ids, std::size_t tokens, std::size_t n, const hash_options<Id>& options,
                       const matrix_view<expert_index>& indices, const matrix_view<S>& weights,
                       const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::hash_route";
  const std::uint64_t limit = options.table ? options.table_size : std::numeric_limits<std::uint64_t>::max();
  if (!detail::check_selection<Policy>(fn, n, 1, true) ||
      !detail::check_ids<Policy>(fn, "token_ids", token_ids, tokens, limit,
                                 options.table ? "must be >= 0 and < table_size" : "must be >= 0") ||
      !detail::check_view<Policy>(fn, "indices", indices, tokens, 1, "must have 1 column") ||
      !detail::check_view<Policy>(fn, "weights", weights, tokens, 1, "must have 1 column"))
    return detail::failed;
  if (options.table && !detail::check_ids<Policy>(fn, "table", options.table, options.table_size, n,
                                                  "every entry must be an expert in [0, n)"))
    return detail::failed;
  for (std::size_t t = 0; t < tokens; ++t) {
    const auto id = static_cast<std::uint64_t>(token_ids[t]);
    indices(t, 0) = static_cast<expert_index>(options.table ? options.table[id] : detail::mix64(id ^ options.seed) % n);
    weights(t, 0) = S(1);
  }
  return 0;
}

/// Roller et al.'s balanced assignment: token ids by decreasing frequency (ties: lower id), each to the expert
/// with the least total frequency so far (ties: lower index). Returns table[id] = expert for every id
/// (empty on bad arguments under errno_on_error). Frequencies must be finite and >= 0.
template <class Count, class Policy = default_policy>
std::vector<expert_index> balanced_hash_table(const std::vector<Count>& frequencies, std::size_t n,
                                              const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::balanced_hash_table";
  if (!detail::check_selection<Policy>(fn, n, 1, true)) return {};
  for (std::size_t id = 0; id < frequencies.size(); ++id) {
    const double f = static_cast<double>(frequencies[id]);
    if (!(f >= 0 && f < std::numeric_limits<double>::infinity())) {
      return detail::raise<Policy>(errc::domain, fn, "frequencies", "[" + std::to_string(id) + "] = " + detail::to_text(frequencies[id]),
                                   "every frequency must be finite and >= 0", std::vector<expert_index>{});
    }
  }
  std::vector<std::size_t> order(frequencies.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return frequencies[a] > frequencies[b]; });
  std::vector<double> load(n, 0.0);
  std::vector<expert_index> table(frequencies.size());
  for (const std::size_t id : order) {
    const auto e = static_cast<std::size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    table[id] = static_cast<expert_index>(e);
    load[e] += static_cast<double>(frequencies[id]);
  }
  return table;
}

/// PanGu-Sigma RRE: domain -> expert group (of `groups` contiguous groups), then a fixed hash of the token id
/// inside the group. indices and weights [T x 1] (weight 1).
template <class Id, class Domain, class S, class Policy = default_policy>
count_result<Policy> rre_route(const Id* token_ids, const Domain* domains, std::size_t tokens, std::size_t n,
                      std::size_t groups, std::uint64_t seed, const matrix_view<expert_index>& indices,
                      const matrix_view<S>& weights, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::rre_route";
  if (!detail::check_selection<Policy>(fn, n, 1, true)) return detail::failed;
  if (groups < 1 || groups > n) {
    return detail::raise<Policy>(errc::domain, fn, "groups", groups, "must satisfy 1 <= groups <= n",
                                 count_result<Policy>(detail::failed));
  }
  if (!detail::check_ids<Policy>(fn, "token_ids", token_ids, tokens, std::numeric_limits<std::uint64_t>::max(),
                                 "must be >= 0") ||
      !detail::check_ids<Policy>(fn, "domains", domains, tokens, groups, "must be in [0, groups)") ||
      !detail::check_view<Policy>(fn, "indices", indices, tokens, 1, "must have 1 column") ||
      !detail::check_view<Policy>(fn, "weights", weights, tokens, 1, "must have 1 column"))
    return detail::failed;
  for (std::size_t t = 0; t < tokens; ++t) {
    const auto g = static_cast<std::size_t>(domains[t]);
    const std::size_t begin = grap_block_begin(n, groups, g), size = grap_block_size(n, groups, g);
    const std::uint64_t h = detail::mix64(static_cast<std::uint64_t>(token_ids[t]) ^ seed);
    indices(t, 0) = static_cast<expert_index>(begin + h % size);
    weights(t, 0) = S(1);
  }
  return 0;
}

/// Auxiliary-loss-free balancing (DeepSeek-V3; Megatron-Core get_updated_expert_bias):
/// bias_e += rate * sign(mean_e(load) - load_e), for loads [n] counted before capacity drops.
/// Preconditions: n >= 1, bias and load not null, rate finite. Returns false (errno policy) on bad arguments.
template <class S, class Count, class Policy = default_policy>
bool update_expert_bias(S* bias, const Count* load, std::size_t n, S rate, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::update_expert_bias";
  if (n < 1) return detail::raise<Policy>(errc::domain, fn, "n", n, "must be >= 1", false);
  if (!bias) return detail::raise<Policy>(errc::domain, fn, "bias", "null", "must not be null", false);
  if (!load) return detail::raise<Policy>(errc::domain, fn, "load", "null", "must not be null", false);
  if (!std::isfinite(rate)) return detail::raise<Policy>(errc::domain, fn, "rate", rate, "must be finite", false);
  double mean = 0;
  for (std::size_t e = 0; e < n; ++e) mean += static_cast<double>(load[e]);
  mean /= static_cast<double>(n);
  for (std::size_t e = 0; e < n; ++e) {
    const double offset = mean - static_cast<double>(load[e]);
    bias[e] += offset > 0 ? rate : (offset < 0 ? -rate : S(0));
  }
  return true;
}

}  // namespace locmoe
