// locmoe/select.hpp - scores to experts: softmax, Top-1/Top-k, and the fused gate -> softmax -> top-k.
//
//   softmax:   p_ti = exp(s_ti - m_t) / sum_j exp(s_tj - m_t),  m_t = max_j s_tj   (stable form)
//   top-k:     the k highest scores of each row, highest first; equal scores go to the lower expert index.
//              Experts are ranked by their scores (logits), which order the probabilities the same way and
//              resolve ties that rounding creates among probabilities.
//   weights:   the softmax probabilities of the chosen experts (paper eq. 2, the Switch/LocMoE gate value);
//              with renormalize, divided by their sum over the k chosen (Mixtral, DeepSeek).
//   grap_route / dense_route: the gate (gating.hpp) fused with the above; grap_route reads each token once
//              and writes only the outputs the caller passes (the rest stay untouched).
//
// Scores that are not finite (a documented behaviour, tested in tests/test_select.cpp):
//   - a row with a NaN or +inf score (e.g. from NaN/Inf activations) is an *invalid token*: its k indices
//     are no_expert (-1), its weights and probabilities 0; it is counted in the return value;
//   - -inf marks an expert that may not be chosen (a mask): probability 0, never selected. If fewer than k
//     experts remain, the remaining slots are no_expert with weight 0; a row that is all -inf is invalid.
// Every function returns the number of invalid tokens in the range: a std::size_t under throw_on_error, a checked_count
// under errno_on_error (not ok() on bad arguments; error.hpp).
//
// Sizes: 1 <= n <= max_experts (4096; the kernels keep one row on the stack), 1 <= k <= n.
// Types: scores float or double; the fused paths take activations of float, double, bf16 or fp16.
// Cost: softmax one exp per score; top-1 one pass; top-k O(n k) comparisons; grap_route one read of x.
// SIMD: xsimd, dispatched at run time (detail/kernels.hpp). Results are identical on every instruction set
// for indices and logits; weights and probabilities may differ by up to 4 ulps (exp uses FMA where the set has
// it, so each exponential may differ in the last bit; detail/simd.hpp); reference.hpp holds the plain scalar
// versions the tests compare against.
// Thread safety: no state; concurrent calls on disjoint token ranges are safe.
// Examples: docs/api.md#selection.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/detail/kernels.hpp>
#include <locmoe/error.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/views.hpp>

#include <cstddef>
#include <string>

namespace locmoe {

/// The largest n the selection kernels accept.
inline constexpr std::size_t max_experts = detail::simd::max_experts;

struct select_options {
  std::size_t k = 1;         ///< experts per token, 1 <= k <= n
  bool renormalize = false;  ///< weights divided by their sum over the k chosen
};

/// Outputs of a fused route; each view is optional unless stated (an absent view is not written).
template <class S>
struct route_outputs {
  matrix_view<expert_index> indices;  ///< [T x k], required
  matrix_view<S> weights;             ///< [T x k], required
  matrix_view<S> probabilities;       ///< [T x n]
  matrix_view<S> logits;              ///< [T x n]; required by dense_route (the GEMM writes it)
};

namespace detail {

template <class Policy>
bool check_selection(const char* function, std::size_t n, std::size_t k, bool need_k) {
  if (n < 1 || n > max_experts) {
    Policy::report(error_report{errc::domain, function, "n", std::to_string(n),
                                "number of experts must satisfy 1 <= n <= locmoe::max_experts (4096)"},
                   0);
    return false;
  }
  if ((need_k && k < 1) || k > n) {
    Policy::report(error_report{errc::domain, function, "k", std::to_string(k), "must satisfy 1 <= k <= n"}, 0);
    return false;
  }
  return true;
}

template <class Policy, class S>
bool check_route_outputs(const char* function, const route_outputs<S>& out, std::size_t rows, std::size_t n,
                         std::size_t k) {
  return check_view<Policy>(function, "indices", out.indices, rows, k, "must have k columns") &&
         check_view<Policy>(function, "weights", out.weights, rows, k, "must have k columns") &&
         (!out.probabilities.present() ||
          check_view<Policy>(function, "probabilities", out.probabilities, rows, n, "must have n columns")) &&
         (!out.logits.present() || check_view<Policy>(function, "logits", out.logits, rows, n, "must have n columns"));
}

/// The selection kernel's arguments for scores [T x n], rows in range.
template <class S, class In>
auto select_args(const matrix_view<In>& scores, token_range range, const simd::select_settings& settings,
                 const matrix_view<S>& probabilities, const matrix_view<expert_index>& indices,
                 const matrix_view<S>& weights) {
  typename select_kernel<S>::args_type a;
  a.scores = matrix_view<const S>(scores.data, scores.rows, scores.cols, scores.stride);
  a.begin = range.begin;
  a.end = range.end;
  a.settings = settings;
  a.probabilities = probabilities;
  a.indices = indices;
  a.weights = weights;
  return a;
}

/// The fused GrAP kernel's arguments: gate, selection and every output of `out`.
template <class T, class Real>
auto grap_route_args(const grap_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                     const route_outputs<Real>& out, token_range range) {
  auto a = grap_args(gate, x, range);
  a.select = true;
  a.settings = {options.k, true, options.renormalize};
  a.logits = out.logits;
  a.probabilities = out.probabilities;
  a.indices = out.indices;
  a.weights = out.weights;
  return a;
}

template <class S, class In>
std::size_t run_select(const matrix_view<In>& scores, token_range range, const simd::select_settings& settings,
                       const matrix_view<S>& probabilities, const matrix_view<expert_index>& indices,
                       const matrix_view<S>& weights) {
  return run<select_kernel<S>>(select_args<S>(scores, range, settings, probabilities, indices, weights));
}

}  // namespace detail

/// Row-wise softmax of logits [T x n] into probabilities [T x n].
template <class In, class Policy = default_policy>
count_result<Policy> softmax(const matrix_view<In>& logits, const matrix_view<detail::plain_t<In>>& probabilities,
                    token_range range = {}, const Policy& = Policy{}) {
  using S = detail::plain_t<In>;
  static_assert(std::is_floating_point_v<S>, "softmax: scores are float or double");
  constexpr const char* fn = "locmoe::softmax";
  if (!detail::check_selection<Policy>(fn, logits.cols, 0, false) ||
      !detail::check_view<Policy>(fn, "logits", logits, logits.rows, logits.cols, "") ||
      !detail::check_view<Policy>(fn, "probabilities", probabilities, logits.rows, logits.cols,
                                  "must have as many columns as logits (n)") ||
      !detail::resolve_range<Policy>(fn, range, logits.rows))
    return detail::failed;
  return detail::run_select<S>(logits, range, {0, true, false}, probabilities, {}, {});
}

/// The k highest scores of each row: indices [T x k] and their scores `values` [T x k].
template <class In, class Policy = default_policy>
count_result<Policy> top_k(const matrix_view<In>& scores, std::size_t k, const matrix_view<expert_index>& indices,
                  const matrix_view<detail::plain_t<In>>& values, token_range range = {}, const Policy& = Policy{}) {
  using S = detail::plain_t<In>;
  static_assert(std::is_floating_point_v<S>, "top_k: scores are float or double");
  constexpr const char* fn = "locmoe::top_k";
  if (!detail::check_selection<Policy>(fn, scores.cols, k, true) ||
      !detail::check_view<Policy>(fn, "scores", scores, scores.rows, scores.cols, "") ||
      !detail::check_view<Policy>(fn, "indices", indices, scores.rows, k, "must have k columns") ||
      !detail::check_view<Policy>(fn, "values", values, scores.rows, k, "must have k columns") ||
      !detail::resolve_range<Policy>(fn, range, scores.rows))
    return detail::failed;
  return detail::run_select<S>(scores, range, {k, false, false}, {}, indices, values);
}

/// Softmax, then top-k: indices and weights [T x k], and the probabilities [T x n] if passed.
template <class In, class Policy = default_policy>
count_result<Policy> softmax_top_k(const matrix_view<In>& logits, const select_options& options,
                          const matrix_view<expert_index>& indices, const matrix_view<detail::plain_t<In>>& weights,
                          const matrix_view<detail::plain_t<In>>& probabilities = {}, token_range range = {},
                          const Policy& = Policy{}) {
  using S = detail::plain_t<In>;
  static_assert(std::is_floating_point_v<S>, "softmax_top_k: scores are float or double");
  constexpr const char* fn = "locmoe::softmax_top_k";
  const route_outputs<S> out{indices, weights, probabilities, {}};
  if (!detail::check_selection<Policy>(fn, logits.cols, options.k, true) ||
      !detail::check_view<Policy>(fn, "logits", logits, logits.rows, logits.cols, "") ||
      !detail::check_route_outputs<Policy>(fn, out, logits.rows, logits.cols, options.k) ||
      !detail::resolve_range<Policy>(fn, range, logits.rows))
    return detail::failed;
  return detail::run_select<S>(logits, range, {options.k, true, options.renormalize}, probabilities, indices,
                               weights);
}

/// Fused GrAP gate -> softmax -> top-k (eq. 4, then eq. 2): one read of each token of x [T x d].
template <class T, class Real, class Policy = default_policy>
count_result<Policy> grap_route(const grap_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                       const route_outputs<accumulate_t<detail::plain_t<T>>>& out, token_range range = {},
                       const Policy& = Policy{}) {
  using E = detail::plain_t<T>;
  static_assert(std::is_same_v<Real, accumulate_t<E>>, "grap_gate<Real>: Real must be accumulate_t<T>");
  constexpr const char* fn = "locmoe::grap_route";
  if (!detail::check_grap_gate<Policy>(fn, gate) ||
      !detail::check_selection<Policy>(fn, gate.experts, options.k, true) ||
      !detail::check_view<Policy>(fn, "x", x, x.rows, gate.hidden, "must have gate.hidden columns (d)") ||
      !detail::check_route_outputs<Policy>(fn, out, x.rows, gate.experts, options.k) ||
      !detail::resolve_range<Policy>(fn, range, x.rows))
    return detail::failed;
  return detail::run<detail::grap_kernel<E>>(detail::grap_route_args(gate, x, options, out, range));
}

/// Dense gate (Eigen GEMM into out.logits, required) -> softmax -> top-k. Workspace as dense_logits.
template <class T, class Real, class Policy = default_policy>
count_result<Policy> dense_route(const dense_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                        const route_outputs<Real>& out, token_range range = {}, Real* workspace = nullptr,
                        std::size_t workspace_size = 0, const Policy& policy = Policy{}) {
  constexpr const char* fn = "locmoe::dense_route";
  const std::size_t n = gate.weight.rows;
  if (!detail::check_selection<Policy>(fn, n, options.k, true) ||
      !detail::check_view<Policy>(fn, "logits", out.logits, x.rows, n, "must be passed, [T x n]") ||
      !detail::check_route_outputs<Policy>(fn, out, x.rows, n, options.k) ||
      !detail::resolve_range<Policy>(fn, range, x.rows))
    return detail::failed;
  if (!dense_logits(gate, x, out.logits, range, workspace, workspace_size, policy)) return detail::failed;
  return detail::run_select<Real>(out.logits, range, {options.k, true, options.renormalize}, out.probabilities,
                                  out.indices, out.weights);
}

}  // namespace locmoe
