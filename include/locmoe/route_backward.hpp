// locmoe/route_backward.hpp - the task loss's gradient through the routing weights: dL/d(weights) [T x k] of
// the chosen experts -> dL/d(logits) [T x n], *added* to the buffer the losses (losses.hpp) add theirs to, so
// one grad_logits holds task + aux + z + locality gradients; gating.hpp's grap_backward / dense_backward take it
// on to the activations and the gate's parameters.
//
// The chosen set is held fixed: Top-k is piecewise constant in the logits, so its derivative is 0 almost
// everywhere and the gradient flows through the weights' values only (the usual straight-through rule, as
// PyTorch's autograd of torch.topk + gather computes it). The expert bias and node-limited groups shape the
// selection only and get no gradient. For each forward of routers.hpp's score_route and select.hpp's
// softmax_top_k / grap_route / dense_route (select_options{k, renormalize} is router_options with those two set),
// with c = options.scale and g_j = dL/dw_j:
//   softmax before Top-k:          w_j = c p_{e_j}, p = softmax(l) over all n experts
//                                  dL/dl_i = p_i (G_i - sum_j p_{e_j} G_{e_j}),  G_{e_j} = c g_j, 0 elsewhere
//   softmax after Top-k (Megatron-Core's default, use_pre_softmax=False), or before it with renormalize:
//                                  w_j = c q_j, q = softmax over the chosen logits
//                                  dL/dl_{e_j} = q_j (c g_j - c sum_m q_m g_m); 0 for experts not chosen
//   sigmoid, k = 1:                w = c s_e, s = sigmoid(l);  dL/dl_e = c g s_e (1 - s_e)
//   sigmoid, k > 1:                w_j = c s_{e_j} / D, D = sum_m s_{e_m} + 1e-20 (Megatron-Core's epsilon)
//                                  dL/dl_{e_j} = s_{e_j} (1 - s_{e_j}) c (g_j - sum_m g_m s_{e_m} / D) / D
// Zero gradient: invalid tokens (a NaN or +inf logit, or all -inf: select.hpp's rule), tokens whose first index
// is no_expert (masked or padding), no_expert slots (fewer than k selectable experts), masked (-inf) experts.
// Capacity: a dropped choice did not reach the output, so its g is 0 (combine_backward writes 0 there); pass the
// routed indices (before capacity), not the kept ones: with renormalization a dropped choice still divides the
// kept ones' weights.
// Preconditions (checked; errors name the argument): logits [T x n], 1 <= n <= max_experts; indices and
// grad_weights [T x k] with k = options.k <= n; indices in [-1, n), a token's experts distinct; grad_logits
// [T x n]; scale finite. Returns the tokens that got no gradient (errno_on_error: a checked_count, not ok() on bad
// arguments). Arithmetic in double per row, rounded once into S. Cost: O(n + k) per token, n exp for the
// softmax-before path, k otherwise; allocates one row of n doubles per call. Thread safety: no state; disjoint
// token ranges may run concurrently. Example: docs/api.md#a-training-step.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/views.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace locmoe {

namespace detail {

/// Whether row l [n] routes (no NaN or +inf, not all -inf), and its largest logit.
template <class S>
bool routable_row(const S* l, std::size_t n, double& max_logit) {
  // Eigen's NaN-propagating max: vectorized, and NaN if any logit is NaN.
  const S largest = Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(l, static_cast<Eigen::Index>(n))
                        .template maxCoeff<Eigen::PropagateNaN>();
  max_logit = static_cast<double>(largest);
  return std::isfinite(largest);  // not NaN, no +inf, not all -inf
}

/// One token's backward (see the header comment); `dense` is n zeros on entry and on exit.
template <class S>
void route_backward_token(const router_options<S>& o, const S* l, std::size_t n, const expert_index* idx,
                          const S* g, std::size_t k, double max_logit, double* dense, S* grad) {
  const double c = static_cast<double>(o.scale);
  const auto chosen = [&](std::size_t j) { return static_cast<std::size_t>(idx[j]); };
  if (o.score == score_function::sigmoid) {
    if (k == 1) {
      const double s = static_cast<double>(sigmoid(l[chosen(0)]));
      grad[chosen(0)] += static_cast<S>(c * static_cast<double>(g[0]) * s * (1 - s));
      return;
    }
    double total = sigmoid_renormalize_epsilon, dot = 0;
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) total += static_cast<double>(sigmoid(l[chosen(j)]));
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j)
      dot += static_cast<double>(g[j]) * static_cast<double>(sigmoid(l[chosen(j)])) / total;
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) {
      const double s = static_cast<double>(sigmoid(l[chosen(j)]));
      grad[chosen(j)] += static_cast<S>(s * (1 - s) * c * (static_cast<double>(g[j]) - dot) / total);
    }
    return;
  }
  if (!o.softmax_before_topk || o.renormalize) {  // softmax over the chosen logits
    double top = -std::numeric_limits<double>::infinity(), sum = 0, dot = 0;
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) top = std::max(top, static_cast<double>(l[chosen(j)]));
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) sum += std::exp(static_cast<double>(l[chosen(j)]) - top);
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j)
      dot += c * static_cast<double>(g[j]) * std::exp(static_cast<double>(l[chosen(j)]) - top) / sum;
    for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) {
      const double q = std::exp(static_cast<double>(l[chosen(j)]) - top) / sum;
      grad[chosen(j)] += static_cast<S>(q * (c * static_cast<double>(g[j]) - dot));
    }
    return;
  }
  double sum = 0, dot = 0;  // softmax over all n, then the chosen p scaled
  for (std::size_t e = 0; e < n; ++e) sum += std::exp(static_cast<double>(l[e]) - max_logit);
  for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) {
    dense[chosen(j)] = c * static_cast<double>(g[j]);
    dot += std::exp(static_cast<double>(l[chosen(j)]) - max_logit) / sum * dense[chosen(j)];
  }
  for (std::size_t e = 0; e < n; ++e) {
    const double p = std::exp(static_cast<double>(l[e]) - max_logit) / sum;
    grad[e] += static_cast<S>(p * (dense[e] - dot));
  }
  for (std::size_t j = 0; j < k && idx[j] != no_expert; ++j) dense[chosen(j)] = 0;
}

/// Every index in [-1, n), distinct within a token, and no expert after a no_expert slot (the routers fill the
/// slots in order); `mark` holds n stamps (0 on entry).
template <class Policy>
bool check_route_choices(const char* fn, const matrix_view<const expert_index>& indices, std::size_t n,
                         std::vector<std::size_t>& mark) {
  if (!check_indices<Policy>(fn, indices, n)) return false;
  for (std::size_t t = 0; t < indices.rows; ++t) {
    bool ended = false;
    for (std::size_t j = 0; j < indices.cols; ++j) {
      const expert_index e = indices(t, j);
      const auto where = [&] { return "(" + std::to_string(t) + ", " + std::to_string(j) + ") = " + std::to_string(e); };
      if (e == no_expert) {
        ended = true;
        continue;
      }
      if (ended) {
        return raise<Policy>(errc::domain, fn, "indices", where(), "a token's no_expert slots must come last", false);
      }
      if (mark[static_cast<std::size_t>(e)] == t + 1) {
        return raise<Policy>(errc::domain, fn, "indices", where(), "a token's experts must be distinct", false);
      }
      mark[static_cast<std::size_t>(e)] = t + 1;
    }
  }
  return true;
}

}  // namespace detail

/// Scratch route_backward reuses from call to call when the caller keeps one (ours): two rows of n.
struct route_backward_workspace {
  std::vector<std::size_t> mark;
  std::vector<double> dense;
};

/// Adds dL/d(logits) to grad_logits [T x n] from dL/d(weights) `grad_weights` [T x k] of the routed choices
/// `indices` [T x k], for the forward described by `options` (see the header comment). `workspace` (optional):
/// kept by the caller, a call allocates nothing once it has seen n; without it each call allocates O(n).
template <class In, class Policy = default_policy>
count_result<Policy> route_backward(const matrix_view<In>& logits, const router_options<detail::plain_t<In>>& options,
                           const matrix_view<const expert_index>& indices,
                           const matrix_view<const detail::plain_t<In>>& grad_weights,
                           const matrix_view<detail::plain_t<In>>& grad_logits, token_range range = {},
                           const Policy& = Policy{}, route_backward_workspace* workspace = nullptr) {
  using S = detail::plain_t<In>;
  static_assert(std::is_floating_point_v<S>, "route_backward: logits are float or double");
  constexpr const char* fn = "locmoe::route_backward";
  const std::size_t tokens = logits.rows, n = logits.cols, k = options.k;
  if (!detail::check_selection<Policy>(fn, n, k, true) ||
      !detail::check_view<Policy>(fn, "logits", logits, tokens, n, "") ||
      !detail::check_view<Policy>(fn, "indices", indices, tokens, k, "must have options.k columns") ||
      !detail::check_view<Policy>(fn, "grad_weights", grad_weights, tokens, k, "must have options.k columns") ||
      !detail::check_view<Policy>(fn, "grad_logits", grad_logits, tokens, n, "must have n columns, as logits") ||
      !detail::resolve_range<Policy>(fn, range, tokens))
    return detail::failed;
  if (!std::isfinite(options.scale)) {
    return detail::raise<Policy>(errc::domain, fn, "scale", options.scale, "must be finite", count_result<Policy>(detail::failed));
  }
  route_backward_workspace own;
  route_backward_workspace& ws = workspace ? *workspace : own;
  std::vector<std::size_t>& mark = ws.mark;
  mark.assign(n, 0);
  const matrix_view<const expert_index> in_range(indices.row(range.begin), range.end - range.begin, k, indices.stride);
  if (!detail::check_route_choices<Policy>(fn, in_range, n, mark)) return detail::failed;
  std::vector<double>& dense = ws.dense;
  dense.assign(n, 0.0);
  std::size_t skipped = 0;
  for (std::size_t t = range.begin; t < range.end; ++t) {
    double max_logit = 0;
    if (indices(t, 0) == no_expert || !detail::routable_row(logits.row(t), n, max_logit)) {
      ++skipped;
      continue;
    }
    detail::route_backward_token(options, logits.row(t), n, indices.row(t), grad_weights.row(t), k, max_logit,
                                 dense.data(), grad_logits.row(t));
  }
  return skipped;
}

}  // namespace locmoe
