// locmoe/reference.hpp - plain scalar versions of the gating and selection kernels.
//
// Written for clarity, not speed: one loop per formula, sequential sums, std::exp, std::stable_sort for
// the ranking, Eigen's own bf16/fp16 conversions. The tests compare every SIMD path with these, and the
// benchmarks time them as the "scalar" baseline. The accumulation type Acc is a parameter, so a test may
// evaluate in double what the kernels compute in float. Semantics (blocks, ReLU, invalid tokens, ties)
// are those documented in gating.hpp and select.hpp; arguments are not validated here. No state: thread-safe.
#pragma once

#include <locmoe/gating.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <vector>

namespace locmoe::reference {

template <class Acc, class T>
Acc to_acc(const T& value) {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, double>)
    return static_cast<Acc>(value);
  else
    return static_cast<Acc>(static_cast<float>(value));
}

/// GrAP forward, eq. (4): logits[t][i] = act(mean_{j in B_i} x[t][j] + b_i).
template <class Acc, class T, class Real>
void grap_logits(const grap_gate<Real>& gate, const matrix_view<T>& x, const matrix_view<Acc>& logits) {
  const std::size_t d = gate.hidden, n = gate.experts;
  for (std::size_t t = 0; t < x.rows; ++t) {
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t begin = grap_block_begin(d, n, i), end = grap_block_begin(d, n, i + 1);
      Acc sum = 0;
      for (std::size_t j = begin; j < end; ++j) sum += to_acc<Acc>(x(t, j));
      Acc logit = sum / static_cast<Acc>(end - begin);
      if (gate.bias) logit += static_cast<Acc>(gate.bias[i]);
      if (gate.relu && logit < Acc(0)) logit = 0;
      logits(t, i) = logit;
    }
  }
}

/// Dense forward: logits[t][i] = act(sum_j x[t][j] W[i][j] + b_i), summed in order.
template <class Acc, class T, class Real>
void dense_logits(const dense_gate<Real>& gate, const matrix_view<T>& x, const matrix_view<Acc>& logits) {
  for (std::size_t t = 0; t < x.rows; ++t) {
    for (std::size_t i = 0; i < gate.weight.rows; ++i) {
      Acc sum = 0;
      for (std::size_t j = 0; j < x.cols; ++j) sum += to_acc<Acc>(x(t, j)) * static_cast<Acc>(gate.weight(i, j));
      if (gate.bias) sum += static_cast<Acc>(gate.bias[i]);
      if (gate.relu && sum < Acc(0)) sum = 0;
      logits(t, i) = sum;
    }
  }
}

/// Softmax and/or top-k of each row of scores (see select.hpp). k = 0: probabilities only; softmax =
/// false: the weights are the chosen scores. Returns the number of invalid rows.
template <class S>
std::size_t select(const matrix_view<const S>& scores, std::size_t k, bool softmax, bool renormalize,
                   const matrix_view<expert_index>& indices, const matrix_view<S>& weights,
                   const matrix_view<S>& probabilities) {
  const std::size_t n = scores.cols;
  const S infinity = std::numeric_limits<S>::infinity();
  std::size_t invalid = 0;
  std::vector<std::size_t> order(n);
  std::vector<S> e(n);
  for (std::size_t t = 0; t < scores.rows; ++t) {
    const S* s = scores.row(t);
    const bool bad = std::any_of(s, s + n, [&](S v) { return std::isnan(v) || v == infinity; }) ||
                     std::all_of(s, s + n, [&](S v) { return v == -infinity; });
    if (bad) {
      ++invalid;
      for (std::size_t c = 0; c < k; ++c) {
        indices(t, c) = no_expert;
        weights(t, c) = 0;
      }
      if (probabilities.present())
        for (std::size_t j = 0; j < n; ++j) probabilities(t, j) = 0;
      continue;
    }
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return s[a] > s[b]; });
    const S maximum = s[order[0]];
    S total = 0;
    for (std::size_t j = 0; j < n; ++j) {
      e[j] = std::exp(s[j] - maximum);
      total += e[j];
    }
    S chosen_total = 0;
    std::size_t chosen = 0;
    for (std::size_t c = 0; c < k; ++c) {
      if (s[order[c]] == -infinity) break;
      chosen_total += softmax ? e[order[c]] : s[order[c]];
      ++chosen;
    }
    for (std::size_t c = 0; c < k; ++c) {
      if (c >= chosen) {
        indices(t, c) = no_expert;
        weights(t, c) = 0;
        continue;
      }
      const std::size_t j = order[c];
      indices(t, c) = static_cast<expert_index>(j);
      const S value = softmax ? e[j] : s[j];
      weights(t, c) = renormalize ? value / chosen_total : (softmax ? e[j] / total : s[j]);
    }
    if (probabilities.present())
      for (std::size_t j = 0; j < n; ++j) probabilities(t, j) = e[j] / total;
  }
  return invalid;
}

}  // namespace locmoe::reference
