// locmoe/gating.hpp - the gates: GrAP (fixed orthogonal weights, paper eq. 4) and dense (learned weights,
// the Switch baseline), forward and exact backward.
//
// GrAP (paper section 3.2, eq. 4):  logit_i = ReLU(w_i . x + b_i),  w_i = (1 / |B_i|) 1{j in B_i}
//   The d features are cut into n contiguous blocks B_i = [floor(i d / n), floor((i + 1) d / n)), and
//   w_i . x is the mean of block i. When n divides d this is the paper's w_i = (n / d) 1{block i}; when it
//   does not, blocks differ in size by at most one and each is averaged over its own size, which keeps
//   the n weight vectors orthogonal (disjoint supports). Requires 1 <= n <= d. Ours, not the paper's: eq. 4
//   read with integer features gives ceil boundaries, all scaled by n/d; neither keeps the norms equal, and
//   Top-1 is off balance by a few percent either way (docs/theory.md, "GrAP's blocks").
//   Cost: one read of x (d elements per token), n divisions; memory-bandwidth bound (docs/benchmarks.md).
// Dense:  logits = act(x W^T + b),  W [n x d], act = ReLU or identity (identity by default, as Switch).
//   Cost: one GEMM, 2 T n d flops, through Eigen.
//
// Each returns true, or false after reporting bad arguments through the policy (errno_on_error).
// Backward (both): with g = dL/dlogits masked by the ReLU (logit > 0; the subgradient at 0 is 0),
//   GrAP:  dL/dx_j = g_i / |B_i| for j in B_i,  dL/db_i = sum_t g_ti
//   dense: dL/dx = g W,  dL/dW = g^T x,  dL/db = sum_t g_t
//
// Element types: activations float, double, bf16 or fp16; logits and gradients in accumulate_t (double for
// double activations, float otherwise). Non-finite activations give non-finite logits (no error here; the
// selection kernels in select.hpp report such tokens). Every function works on the token rows in `range`,
// touches nothing else, and may run concurrently on disjoint ranges. GrAP allocates nothing. The dense gate's GEMMs
// are Eigen's, which take their blocking buffers from the stack up to EIGEN_STACK_ALLOCATION_LIMIT (128 KB) and
// from the heap beyond it: 4 allocations per dense_route at T = 1000, d = 512, n = 32, none at d = 64, n = 8
// (tests/test_router_allocations.cpp counts Eigen's heap too).
// Examples: docs/api.md#gating.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/detail/kernels.hpp>
#include <locmoe/error.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>

#include <Eigen/Core>

namespace locmoe {

/// First feature of GrAP block i: floor(i d / n), exact for any d and n <= 2^32.
constexpr std::size_t grap_block_begin(std::size_t d, std::size_t n, std::size_t i) noexcept {
  return i * (d / n) + (i * (d % n)) / n;
}
/// Number of features in GrAP block i: d / n or d / n + 1.
constexpr std::size_t grap_block_size(std::size_t d, std::size_t n, std::size_t i) noexcept {
  return grap_block_begin(d, n, i + 1) - grap_block_begin(d, n, i);
}

/// A GrAP gate: sizes, ReLU switch and an optional bias (n values of Real, caller-owned).
/// Real is accumulate_t of the activations: float for float/bf16/fp16, double for double.
template <class Real = float>
struct grap_gate {
  std::size_t hidden = 0;      ///< d
  std::size_t experts = 0;     ///< n, 1 <= n <= d
  bool relu = true;            ///< the paper's ReLU; off: logit = block mean + bias
  const Real* bias = nullptr;  ///< b, n values, or null for none
};

/// A dense gate: weight [n x d] (any row stride) and optional bias, caller-owned.
template <class Real = float>
struct dense_gate {
  matrix_view<const Real> weight;  ///< W, n rows of d
  const Real* bias = nullptr;      ///< b, n values, or null for none
  bool relu = false;
};

/// Rows of activations converted per step for bf16/fp16 dense gates, and the workspace that needs.
inline constexpr std::size_t dense_chunk_rows = 256;
/// Floats of workspace dense_logits / dense_backward need for activations of type T (0 for float/double
/// forward). `backward` adds room for the ReLU-masked gradient.
template <class T>
constexpr std::size_t dense_workspace_size(std::size_t d, std::size_t n, bool backward = false) noexcept {
  const bool convert = !std::is_same_v<T, accumulate_t<T>>;
  return dense_chunk_rows * ((convert ? d : 0) + (backward ? n : 0));
}

namespace detail {

template <class Policy, class Real>
bool check_grap_gate(const char* function, const grap_gate<Real>& gate) {
  if (gate.experts < 1) {
    Policy::report(error_report{errc::domain, function, "gate.experts", "0", "must be >= 1"}, 0);
    return false;
  }
  if (gate.experts > static_cast<std::size_t>(std::numeric_limits<expert_index>::max())) {
    Policy::report(error_report{errc::overflow, function, "gate.experts", std::to_string(gate.experts),
                                "must fit an expert_index (int32)"},
                   0);
    return false;
  }
  if (gate.hidden < gate.experts) {
    Policy::report(error_report{errc::domain, function, "gate.hidden", std::to_string(gate.hidden),
                                "must be >= gate.experts (every GrAP block needs a feature)"},
                   0);
    return false;
  }
  return true;
}

template <class Policy, class Real>
bool check_dense_gate(const char* function, const dense_gate<Real>& gate, std::size_t d) {
  if (gate.weight.rows < 1) {
    Policy::report(error_report{errc::domain, function, "gate.weight", "0 rows", "must have >= 1 row (expert)"}, 0);
    return false;
  }
  return check_view<Policy>(function, "gate.weight", gate.weight, gate.weight.rows, d,
                            "must have as many columns as x (d)");
}

template <class T>
using plain_t = std::remove_const_t<T>;

template <class Real>
using row_major = Eigen::Matrix<Real, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class Real>
using const_map = Eigen::Map<const row_major<Real>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <class Real>
using mutable_map = Eigen::Map<row_major<Real>, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class Real, class T>
const_map<Real> rows_map(const matrix_view<T>& v, std::size_t begin, std::size_t count) {
  return const_map<Real>(v.data + begin * v.stride, static_cast<Eigen::Index>(count),
                         static_cast<Eigen::Index>(v.cols),
                         Eigen::OuterStride<>(static_cast<Eigen::Index>(std::max(v.stride, v.cols))));
}
template <class Real>
mutable_map<Real> rows_map(const matrix_view<Real>& v, std::size_t begin, std::size_t count) {
  return mutable_map<Real>(v.data + begin * v.stride, static_cast<Eigen::Index>(count),
                           static_cast<Eigen::Index>(v.cols),
                           Eigen::OuterStride<>(static_cast<Eigen::Index>(std::max(v.stride, v.cols))));
}

/// Calls fn(row0, rows, X) for chunks of the range, X an Eigen map of the activations as Real: the
/// caller's memory for float/double, else converted into the workspace. Chunks end at multiples of
/// dense_chunk_rows, counted from row 0: a token's GEMM (and so its last bits, which depend on where it sits in
/// Eigen's panels) is the same for any range that starts and ends on such multiples (the CPU backend's ranges).
template <class Real, class T, class Fn>
void for_each_chunk(const matrix_view<T>& x, std::size_t begin, std::size_t end, Real* workspace, Fn&& fn) {
  for (std::size_t row0 = begin; row0 < end;) {
    const std::size_t rows = std::min((row0 / dense_chunk_rows + 1) * dense_chunk_rows, end) - row0;
    if constexpr (std::is_same_v<plain_t<T>, Real>) {
      fn(row0, rows, rows_map<Real>(x, row0, rows));
    } else {
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t j = 0; j < x.cols; ++j) workspace[r * x.cols + j] = static_cast<Real>(x(row0 + r, j));
      fn(row0, rows,
         const_map<Real>(workspace, static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(x.cols),
                         Eigen::OuterStride<>(static_cast<Eigen::Index>(x.cols))));
    }
    row0 += rows;
  }
}

template <class Policy, class Real>
bool check_workspace(const char* function, const Real* workspace, std::size_t size, std::size_t needed) {
  if (needed > 0 && (workspace == nullptr || size < needed)) {
    Policy::report(error_report{errc::domain, function, "workspace", std::to_string(size) + " values",
                                "must hold dense_workspace_size<T>(d, n, backward) values"},
                   0);
    return false;
  }
  return true;
}

/// The kernel arguments every GrAP call shares (activations, gate, token range); callers add outputs.
template <class T, class Real>
auto grap_args(const grap_gate<Real>& gate, const matrix_view<T>& x, token_range range) {
  using E = plain_t<T>;
  typename grap_kernel<E>::args_type a;
  a.x = matrix_view<const E>(x.data, x.rows, x.cols, x.stride);
  a.experts = gate.experts;
  a.relu = gate.relu;
  a.bias = gate.bias;
  a.begin = range.begin;
  a.end = range.end;
  return a;
}

}  // namespace detail

/// GrAP forward: logits[t][i] = act(mean of x[t] over block i + b_i) for t in range (eq. 4).
/// x: [T x d] of float, double, bf16 or fp16; logits: [T x n] of accumulate_t.
template <class T, class Real, class Policy = default_policy>
bool grap_logits(const grap_gate<Real>& gate, const matrix_view<T>& x,
                 const matrix_view<accumulate_t<detail::plain_t<T>>>& logits, token_range range = {},
                 const Policy& = Policy{}) {
  using E = detail::plain_t<T>;
  static_assert(std::is_same_v<Real, accumulate_t<E>>, "grap_gate<Real>: Real must be accumulate_t<T>");
  constexpr const char* fn = "locmoe::grap_logits";
  if (!detail::check_grap_gate<Policy>(fn, gate) ||
      !detail::check_view<Policy>(fn, "x", x, x.rows, gate.hidden, "must have gate.hidden columns (d)") ||
      !detail::check_view<Policy>(fn, "logits", logits, x.rows, gate.experts, "must have gate.experts columns (n)") ||
      !detail::resolve_range<Policy>(fn, range, x.rows))
    return false;
  auto a = detail::grap_args(gate, x, range);
  a.logits = logits;
  detail::run<detail::grap_kernel<E>>(a);
  return true;
}

/// GrAP backward: grad_x[t][j] = g[t][i] / |B_i| for j in block i, with g = grad_logits masked by
/// logits > 0 when the gate has ReLU (logits may be empty without ReLU); grad_bias (n values, optional)
/// is set to sum over the range of g. G is float or double. Cost: one write of grad_x.
template <class G, class Real, class Policy = default_policy>
bool grap_backward(const grap_gate<Real>& gate, const matrix_view<const G>& logits,
                   const matrix_view<const G>& grad_logits, const matrix_view<G>& grad_x, G* grad_bias = nullptr,
                   token_range range = {}, const Policy& = Policy{}) {
  static_assert(std::is_floating_point_v<G>, "grap_backward: gradients are float or double");
  constexpr const char* fn = "locmoe::grap_backward";
  const std::size_t rows = grad_logits.rows, n = gate.experts, d = gate.hidden;
  if (!detail::check_grap_gate<Policy>(fn, gate) ||
      !detail::check_view<Policy>(fn, "grad_logits", grad_logits, rows, n, "must have gate.experts columns (n)") ||
      (gate.relu &&
       !detail::check_view<Policy>(fn, "logits", logits, rows, n, "must have gate.experts columns (n)")) ||
      !detail::check_view<Policy>(fn, "grad_x", grad_x, rows, d, "must have gate.hidden columns (d)") ||
      !detail::resolve_range<Policy>(fn, range, rows))
    return false;
  if (grad_bias) std::fill(grad_bias, grad_bias + n, G(0));
  for (std::size_t t = range.begin; t < range.end; ++t) {
    G* out = grad_x.row(t);
    for (std::size_t i = 0; i < n; ++i) {
      const G g = gate.relu && !(logits(t, i) > G(0)) ? G(0) : grad_logits(t, i);
      if (grad_bias) grad_bias[i] += g;
      const std::size_t begin = grap_block_begin(d, n, i), end = grap_block_begin(d, n, i + 1);
      const G value = g / static_cast<G>(end - begin);
      std::fill(out + begin, out + end, value);
    }
  }
  return true;
}

/// Dense forward: logits = act(x W^T + b) for the rows in range, through Eigen's GEMM.
/// x: float or double (= Real), or bf16/fp16 with Real = float and a workspace of
/// dense_workspace_size<T>(d, n) floats (rows are converted in chunks of dense_chunk_rows).
template <class T, class Real, class Policy = default_policy>
bool dense_logits(const dense_gate<Real>& gate, const matrix_view<T>& x, const matrix_view<Real>& logits,
                  token_range range = {}, Real* workspace = nullptr, std::size_t workspace_size = 0,
                  const Policy& = Policy{}) {
  using E = detail::plain_t<T>;
  static_assert(std::is_same_v<Real, accumulate_t<E>>, "dense_gate<Real>: Real must be accumulate_t<T>");
  constexpr const char* fn = "locmoe::dense_logits";
  const std::size_t n = gate.weight.rows;
  if (!detail::check_dense_gate<Policy>(fn, gate, x.cols) ||
      !detail::check_view<Policy>(fn, "x", x, x.rows, x.cols, "") ||
      !detail::check_view<Policy>(fn, "logits", logits, x.rows, n, "must have one column per expert (n)") ||
      !detail::check_workspace<Policy>(fn, workspace, workspace_size, dense_workspace_size<E>(x.cols, n)) ||
      !detail::resolve_range<Policy>(fn, range, x.rows))
    return false;
  const auto W = detail::rows_map<Real>(gate.weight, 0, n);
  detail::for_each_chunk<Real>(x, range.begin, range.end, workspace, [&](std::size_t row0, std::size_t rows,
                                                                          const auto& X) {
    auto L = detail::rows_map(logits, row0, rows);
    L.noalias() = X * W.transpose();
    if (gate.bias)
      L.rowwise() += Eigen::Map<const Eigen::Matrix<Real, 1, Eigen::Dynamic>>(gate.bias, static_cast<Eigen::Index>(n));
    if (gate.relu) L = L.cwiseMax(Real(0));
  });
  return true;
}

/// Dense backward, for the rows in range: g = grad_logits masked by logits > 0 (with ReLU);
/// grad_x = g W (optional), grad_weight = g^T x (optional, [n x d], set, not accumulated),
/// grad_bias = column sums of g (optional). Workspace: dense_workspace_size<T>(d, n, true) values.
template <class T, class Real, class Policy = default_policy>
bool dense_backward(const dense_gate<Real>& gate, const matrix_view<T>& x, const matrix_view<const Real>& logits,
                    const matrix_view<const Real>& grad_logits, const matrix_view<Real>& grad_x,
                    const matrix_view<Real>& grad_weight, Real* grad_bias, Real* workspace,
                    std::size_t workspace_size, token_range range = {}, const Policy& = Policy{}) {
  using E = detail::plain_t<T>;
  static_assert(std::is_same_v<Real, accumulate_t<E>>, "dense_gate<Real>: Real must be accumulate_t<T>");
  constexpr const char* fn = "locmoe::dense_backward";
  const std::size_t rows = x.rows, d = x.cols, n = gate.weight.rows;
  if (!detail::check_dense_gate<Policy>(fn, gate, d) || !detail::check_view<Policy>(fn, "x", x, rows, d, "") ||
      !detail::check_view<Policy>(fn, "grad_logits", grad_logits, rows, n, "must have one column per expert (n)") ||
      (gate.relu && !detail::check_view<Policy>(fn, "logits", logits, rows, n, "must have one column per expert (n)")) ||
      (grad_x.present() && !detail::check_view<Policy>(fn, "grad_x", grad_x, rows, d, "must have d columns")) ||
      (grad_weight.present() &&
       !detail::check_view<Policy>(fn, "grad_weight", grad_weight, n, d, "must have d columns")) ||
      !detail::check_workspace<Policy>(fn, workspace, workspace_size, dense_workspace_size<E>(d, n, true)) ||
      !detail::resolve_range<Policy>(fn, range, rows))
    return false;
  const auto W = detail::rows_map<Real>(gate.weight, 0, n);
  if (grad_weight.present()) detail::rows_map(grad_weight, 0, n).setZero();
  if (grad_bias) std::fill(grad_bias, grad_bias + n, Real(0));
  Real* masked = workspace + (std::is_same_v<E, Real> ? 0 : dense_chunk_rows * d);
  const std::size_t step = dense_chunk_rows;
  for (std::size_t row0 = range.begin; row0 < range.end; row0 += step) {
    const std::size_t count = std::min(step, range.end - row0);
    const auto apply = [&](const auto& G) {
      if (grad_x.present()) detail::rows_map(grad_x, row0, count).noalias() = G * W;
      if (grad_bias)
        Eigen::Map<Eigen::Matrix<Real, 1, Eigen::Dynamic>>(grad_bias, static_cast<Eigen::Index>(n)) +=
            G.colwise().sum();
      if (grad_weight.present())
        detail::for_each_chunk<Real>(x, row0, row0 + count, workspace,
                                     [&](std::size_t, std::size_t, const auto& X) {
                                       detail::rows_map(grad_weight, 0, n).noalias() += G.transpose() * X;
                                     });
    };
    const auto G = detail::rows_map<Real>(grad_logits, row0, count);
    if (gate.relu) {
      const auto L = detail::rows_map<Real>(logits, row0, count);
      detail::mutable_map<Real> M(masked, static_cast<Eigen::Index>(count), static_cast<Eigen::Index>(n),
                                  Eigen::OuterStride<>(static_cast<Eigen::Index>(n)));
      M = (L.array() > Real(0)).select(G.array(), Real(0));
      apply(M);
    } else {
      apply(G);
    }
  }
  return true;
}

}  // namespace locmoe
