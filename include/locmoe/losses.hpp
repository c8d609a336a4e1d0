// locmoe/losses.hpp - the router's training signal: auxiliary (load-balancing) loss, router z-loss and the
// LocMoE locality loss, each with its exact gradient with respect to the logits.
//
// Notation: T_v valid tokens (below), n experts, k choices per token, p_t = softmax(l_t).
// aux_loss (paper eq. 5; Switch Transformer):   L = coeff * (n / k') * sum_i f_i P_i
//     P_i = mean_t p_ti (for score sigmoid: q_ti = s_ti / (sum_j s_tj + 1e-20), s = sigmoid(l), Megatron-Core);
//     all_choices (DeepSpeed topkgating, Megatron-Core switch_load_balancing_loss_func; the default):
//         f_i = fraction of tokens having i among their choices, k' = k;
//     first_choice (paper eq. 5 as written, DeepSpeed top1gating/top2gating): f_i = fraction whose first
//         choice is i, k' = 1. For k = 1 both are the same.
//     f is counted from `indices` as routed, before capacity drops (as both peers do) and has no gradient:
//     dL/dp_ti = coeff n f_i / (k' T_v), then through the softmax (or the normalized sigmoid).
// z_loss (Megatron-Core z_loss_func, ST-MoE):   L = coeff * mean_t (logsumexp_i l_ti)^2
//     dL/dl_tj = coeff * 2 lse_t p_tj / T_v.
// locality_loss (paper eq. 6):   L = mu * mean_r KL(D_c(r) || D_l(r)),  over the source ranks r with tokens
//     D_c(r)_i = mean over r's tokens of p_ti (differentiable, as P_i in eq. 5);
//     D_l(r)_i = (1 - eps) [i on r's node] / L_r + eps / n, the fully localized distribution (uniform over the
//         L_r experts on r's node), smoothed by eps so that the KL is finite;
//     KL(a || b) = sum_i a_i ln(a_i / b_i), 0 ln 0 = 0.
//     dL/dp_ti = mu / R_used * (ln(D_c(r)_i / D_l(r)_i) + 1) / T_r for t of rank r (0 where D_c(r)_i = 0).
//     A rank whose node hosts no expert has no localized distribution: it contributes nothing and is counted
//     (ranks_without_local_experts). assignment_kl reports the same KL for the hard choices (the fraction of
//     r's choices at each expert): a metric, not differentiated. docs/theory.md derives the choice.
//
// Valid tokens: a row of logits with a NaN or +inf, or all -inf, is skipped, as is a token whose first choice
// is no_expert (an invalid token of select.hpp, or one the caller masked, e.g. padding). Masked experts (-inf)
// have p = 0 and gradient 0. With no valid token a loss is 0 with zero gradient.
// Gradients are *added* to grad_logits [T x n] when it is passed, so the three losses accumulate into one
// buffer; gradients with respect to the activations follow from grap_backward/dense_backward (gating.hpp).
// Precision: sums in double; values returned in S. `probabilities`, if passed, must be softmax(logits) as
// written by the routers (saves the exp per score); otherwise each row's softmax is recomputed.
// Preconditions (checked; errors name the argument): shapes agree; 1 <= n <= max_experts; indices in [-1, n);
// coeff finite; 0 < eps <= 1; a topology with n experts; token ranks in [0, R).
// Cost: O(T n) time, O(n) (locality: O(R n)) memory allocated per call. Thread safety: no state.
// Example: docs/api.md#losses.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace locmoe {

enum class aux_normalization { all_choices, first_choice };

/// What the losses read: logits [T x n], the routed choices [T x k], and optionally softmax(logits) [T x n].
template <class S>
struct loss_inputs {
  matrix_view<const S> logits;
  matrix_view<const expert_index> indices;  ///< required by aux and locality; optional for z (masks tokens)
  matrix_view<const S> probabilities;
};

template <class S>
struct aux_loss_options {
  S coeff = S(0.01);  ///< alpha (paper: 0.01)
  aux_normalization normalization = aux_normalization::all_choices;
  score_function score = score_function::softmax;
};

template <class S>
struct locality_loss_options {
  S coeff = S(0.01);      ///< mu (paper: 0.01)
  S smoothing = S(0.01);  ///< eps in D_l
  const topology* topo = nullptr;            ///< required
  const std::int32_t* token_rank = nullptr;  ///< [T]; null: contiguous blocks over the ranks
};

template <class S>
struct loss_value {
  S value = 0;
  std::size_t tokens = 0;   ///< valid tokens that entered the loss
  std::size_t skipped = 0;  ///< tokens skipped (invalid or masked)
};

template <class S>
struct locality_value : loss_value<S> {
  S assignment_kl = 0;                         ///< the same KL on the hard choices (metric)
  std::size_t ranks = 0;                       ///< ranks averaged over
  std::size_t ranks_without_local_experts = 0; ///< ranks with tokens whose node hosts no expert
};

namespace detail {

/// A row's probabilities for the losses: the caller's softmax, or recomputed into `buffer`. Null: not a valid row.
template <class S>
const S* loss_row(const loss_inputs<S>& in, std::size_t t, score_function score, S* buffer) {
  const S* l = in.logits.row(t);
  const std::size_t n = in.logits.cols;
  if (in.indices.present() && in.indices(t, 0) == no_expert) return nullptr;
  S max_logit = -std::numeric_limits<S>::infinity();
  for (std::size_t e = 0; e < n; ++e) {
    if (std::isnan(l[e]) || l[e] == std::numeric_limits<S>::infinity()) return nullptr;
    max_logit = std::max(max_logit, l[e]);
  }
  if (max_logit == -std::numeric_limits<S>::infinity()) return nullptr;
  if (score == score_function::softmax && in.probabilities.present()) return in.probabilities.row(t);
  S sum = 0;
  for (std::size_t e = 0; e < n; ++e) {
    buffer[e] = score == score_function::softmax ? std::exp(l[e] - max_logit)
                                                 : (l[e] == -std::numeric_limits<S>::infinity() ? S(0) : sigmoid(l[e]));
    sum += buffer[e];
  }
  if (score == score_function::sigmoid) sum += S(sigmoid_renormalize_epsilon);
  for (std::size_t e = 0; e < n; ++e) buffer[e] /= sum;
  return buffer;
}

/// Adds dL/dl_t for dL/dq_ti = g_i, q = the row's scores (softmax p, or normalized sigmoid).
template <class S>
void add_score_backward(const S* l, const S* q, const double* g, std::size_t n, score_function score, S* grad) {
  double dot = 0;
  for (std::size_t i = 0; i < n; ++i) dot += static_cast<double>(q[i]) * g[i];
  if (score == score_function::softmax) {
    for (std::size_t j = 0; j < n; ++j) grad[j] += static_cast<S>(static_cast<double>(q[j]) * (g[j] - dot));
    return;
  }
  double total = 0;  // sum_j s_j + eps, recovered exactly as Megatron-Core forms it
  std::array<double, simd::max_experts> s;
  for (std::size_t j = 0; j < n; ++j) {
    s[j] = l[j] == -std::numeric_limits<S>::infinity() ? 0.0 : static_cast<double>(sigmoid(l[j]));
    total += s[j];
  }
  total += sigmoid_renormalize_epsilon;
  for (std::size_t j = 0; j < n; ++j) grad[j] += static_cast<S>(s[j] * (1 - s[j]) * (g[j] - dot) / total);
}

template <class Policy, class S>
bool check_loss_inputs(const char* fn, const loss_inputs<S>& in, bool need_indices, S coeff) {
  const std::size_t n = in.logits.cols, tokens = in.logits.rows;
  if (!check_selection<Policy>(fn, n, 0, false) || !check_view<Policy>(fn, "logits", in.logits, tokens, n, ""))
    return false;
  if (need_indices || in.indices.present()) {
    if (in.indices.cols < 1 || in.indices.cols > n) {
      return raise<Policy>(errc::domain, fn, "indices", shape_text(in.indices.rows, in.indices.cols),
                           "must have k columns, 1 <= k <= n", false);
    }
    if (!check_view<Policy>(fn, "indices", in.indices, tokens, in.indices.cols, "")) return false;
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t j = 0; j < in.indices.cols; ++j) {
        const expert_index e = in.indices(t, j);
        if (e < no_expert || e >= static_cast<expert_index>(n)) {
          return raise<Policy>(errc::domain, fn, "indices",
                               "(" + std::to_string(t) + ", " + std::to_string(j) + ") = " + std::to_string(e),
                               "every index must be an expert in [0, n) or no_expert (-1)", false);
        }
      }
    }
  }
  if (in.probabilities.present() &&
      !check_view<Policy>(fn, "probabilities", in.probabilities, tokens, n, "must have n columns"))
    return false;
  if (!std::isfinite(coeff)) return raise<Policy>(errc::domain, fn, "coeff", coeff, "must be finite", false);
  return true;
}

template <class Policy, class S>
bool check_grad(const char* fn, const matrix_view<S>& grad, std::size_t tokens, std::size_t n) {
  return !grad.present() || check_view<Policy>(fn, "grad_logits", grad, tokens, n, "must have n columns");
}

template <class S>
loss_value<S> failed_loss() {
  loss_value<S> v;
  v.value = std::numeric_limits<S>::quiet_NaN();
  return v;
}

}  // namespace detail

/// Auxiliary load-balancing loss (eq. 5) and, if grad_logits is passed, its gradient added there.
template <class S, class Policy = default_policy>
loss_value<S> aux_loss(const loss_inputs<S>& in, const aux_loss_options<S>& options,
                       const matrix_view<S>& grad_logits = {}, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::aux_loss";
  const std::size_t tokens = in.logits.rows, n = in.logits.cols;
  if (!detail::check_loss_inputs<Policy>(fn, in, true, options.coeff) ||
      !detail::check_grad<Policy>(fn, grad_logits, tokens, n))
    return detail::failed_loss<S>();
  const bool first = options.normalization == aux_normalization::first_choice;
  const std::size_t k_used = first ? 1 : in.indices.cols;
  std::vector<double> mean_p(n, 0.0), count(n, 0.0), g(n);
  std::array<S, max_experts> buffer;
  loss_value<S> v;
  for (std::size_t t = 0; t < tokens; ++t) {
    const S* q = detail::loss_row(in, t, options.score, buffer.data());
    if (!q) continue;
    ++v.tokens;
    for (std::size_t e = 0; e < n; ++e) mean_p[e] += static_cast<double>(q[e]);
    for (std::size_t j = 0; j < k_used; ++j) {
      if (in.indices(t, j) != no_expert) count[static_cast<std::size_t>(in.indices(t, j))] += 1;
    }
  }
  v.skipped = tokens - v.tokens;
  if (v.tokens == 0) return v;
  const double tv = static_cast<double>(v.tokens), scale = static_cast<double>(options.coeff) *
                                                             static_cast<double>(n) / static_cast<double>(k_used);
  double value = 0;
  for (std::size_t e = 0; e < n; ++e) {
    value += (count[e] / tv) * (mean_p[e] / tv);
    g[e] = scale * count[e] / (tv * tv);  // dL/dq_te
  }
  v.value = static_cast<S>(scale * value);
  if (grad_logits.present()) {
    for (std::size_t t = 0; t < tokens; ++t) {
      const S* q = detail::loss_row(in, t, options.score, buffer.data());
      if (q) detail::add_score_backward(in.logits.row(t), q, g.data(), n, options.score, grad_logits.row(t));
    }
  }
  return v;
}

/// Router z-loss: coeff * mean_t logsumexp(l_t)^2, and its gradient added to grad_logits if passed.
template <class S, class Policy = default_policy>
loss_value<S> z_loss(const loss_inputs<S>& in, S coeff, const matrix_view<S>& grad_logits = {},
                     const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::z_loss";
  const std::size_t tokens = in.logits.rows, n = in.logits.cols;
  if (!detail::check_loss_inputs<Policy>(fn, in, false, coeff) || !detail::check_grad<Policy>(fn, grad_logits, tokens, n))
    return detail::failed_loss<S>();
  std::array<S, max_experts> buffer;
  loss_value<S> v;
  double sum = 0;
  for (int pass = 0; pass < (grad_logits.present() ? 2 : 1); ++pass) {
    for (std::size_t t = 0; t < tokens; ++t) {
      const S* p = detail::loss_row(in, t, score_function::softmax, buffer.data());
      if (!p) continue;
      // lse = l_max - ln p_max: exact to rounding, and needs no second exp pass when p is given.
      const S* l = in.logits.row(t);
      const std::size_t top = static_cast<std::size_t>(std::max_element(l, l + n) - l);
      const double lse = static_cast<double>(l[top]) - std::log(static_cast<double>(p[top]));
      if (pass == 0) {
        ++v.tokens;
        sum += lse * lse;
      } else {
        const double factor = 2.0 * static_cast<double>(coeff) * lse / static_cast<double>(v.tokens);
        S* grad = grad_logits.row(t);
        for (std::size_t j = 0; j < n; ++j) grad[j] += static_cast<S>(factor * static_cast<double>(p[j]));
      }
    }
    if (v.tokens == 0) break;
  }
  v.skipped = tokens - v.tokens;
  if (v.tokens > 0) v.value = static_cast<S>(static_cast<double>(coeff) * sum / static_cast<double>(v.tokens));
  return v;
}

/// LocMoE locality loss (eq. 6) per source rank, averaged over ranks; gradient added to grad_logits if passed.
template <class S, class Policy = default_policy>
locality_value<S> locality_loss(const loss_inputs<S>& in, const locality_loss_options<S>& options,
                                const matrix_view<S>& grad_logits = {}, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::locality_loss";
  const std::size_t tokens = in.logits.rows, n = in.logits.cols;
  locality_value<S> v;
  v.value = std::numeric_limits<S>::quiet_NaN();
  if (!detail::check_loss_inputs<Policy>(fn, in, true, options.coeff) ||
      !detail::check_grad<Policy>(fn, grad_logits, tokens, n))
    return v;
  if (!(options.smoothing > 0 && options.smoothing <= 1)) {
    return detail::raise<Policy>(errc::domain, fn, "smoothing", options.smoothing, "must satisfy 0 < eps <= 1", v);
  }
  const topology* topo = options.topo;
  if (!topo) return detail::raise<Policy>(errc::domain, fn, "topo", "null", "a topology is required", v);
  if (topo->experts() != n) {
    return detail::raise<Policy>(errc::domain, fn, "topo", topo->experts(), "must place exactly n experts", v);
  }
  const std::size_t ranks = topo->ranks();
  auto rank_of = [&](std::size_t t) -> std::size_t {
    return options.token_rank ? static_cast<std::size_t>(options.token_rank[t]) : t * ranks / tokens;
  };
  if (options.token_rank) {
    for (std::size_t t = 0; t < tokens; ++t) {
      if (options.token_rank[t] < 0 || static_cast<std::size_t>(options.token_rank[t]) >= ranks) {
        return detail::raise<Policy>(errc::domain, fn, "token_rank",
                                     "[" + std::to_string(t) + "] = " + std::to_string(options.token_rank[t]),
                                     "every token's rank must be in [0, ranks)", v);
      }
    }
  }
  v.value = 0;
  // Per rank: sum of p (-> D_c), choice counts (-> hard distribution), token count.
  std::vector<double> sum_p(ranks * n, 0.0), choices(ranks * n, 0.0), grad_p(ranks * n, 0.0);
  std::vector<std::size_t> rank_tokens(ranks, 0);
  std::array<S, max_experts> buffer;
  for (std::size_t t = 0; t < tokens; ++t) {
    const S* p = detail::loss_row(in, t, score_function::softmax, buffer.data());
    if (!p) continue;
    const std::size_t r = rank_of(t);
    ++rank_tokens[r];
    for (std::size_t e = 0; e < n; ++e) sum_p[r * n + e] += static_cast<double>(p[e]);
    for (std::size_t j = 0; j < in.indices.cols; ++j) {
      if (in.indices(t, j) != no_expert) choices[r * n + static_cast<std::size_t>(in.indices(t, j))] += 1;
    }
  }
  const double eps = static_cast<double>(options.smoothing);
  double loss = 0, hard = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    v.tokens += rank_tokens[r];
    if (rank_tokens[r] == 0) continue;
    const auto node = static_cast<std::size_t>(topo->node_of_rank(r));
    const std::size_t local = topo->experts_on_node(node);
    if (local == 0) {
      ++v.ranks_without_local_experts;
      continue;
    }
    ++v.ranks;
    double chosen = 0;
    for (std::size_t e = 0; e < n; ++e) chosen += choices[r * n + e];
    for (std::size_t e = 0; e < n; ++e) {
      const double target = (1 - eps) * (topo->node_of_expert(e) == static_cast<std::int32_t>(node) ? 1.0 / static_cast<double>(local) : 0.0) +
                            eps / static_cast<double>(n);
      const double dc = sum_p[r * n + e] / static_cast<double>(rank_tokens[r]);
      if (dc > 0) {
        loss += dc * std::log(dc / target);
        grad_p[r * n + e] = (std::log(dc / target) + 1) / static_cast<double>(rank_tokens[r]);
      }
      const double dh = chosen > 0 ? choices[r * n + e] / chosen : 0.0;
      if (dh > 0) hard += dh * std::log(dh / target);
    }
  }
  v.skipped = tokens - v.tokens;
  if (v.ranks == 0) return v;
  const double scale = static_cast<double>(options.coeff) / static_cast<double>(v.ranks);
  v.value = static_cast<S>(scale * loss);
  v.assignment_kl = static_cast<S>(hard / static_cast<double>(v.ranks));
  if (grad_logits.present()) {
    std::vector<double> g(n);
    for (std::size_t t = 0; t < tokens; ++t) {
      const S* p = detail::loss_row(in, t, score_function::softmax, buffer.data());
      if (!p) continue;
      const std::size_t r = rank_of(t);
      if (topo->experts_on_node(static_cast<std::size_t>(topo->node_of_rank(r))) == 0) continue;
      for (std::size_t e = 0; e < n; ++e) g[e] = scale * grad_p[r * n + e];
      detail::add_score_backward(in.logits.row(t), p, g.data(), n, score_function::softmax, grad_logits.row(t));
    }
  }
  return v;
}

}  // namespace locmoe
