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
// router_losses computes all three in two passes over the batch (what a trainer calls each step); aux_loss,
// z_loss and locality_loss are the same engine with one term on.
// Precision: sums in double (p summed in float over runs of at most 64 rows first); values returned in S.
// `probabilities`, if passed, must be softmax(logits) as the softmax routers write it, zeros for invalid tokens
// (it saves the exp per score, and validity is read from it); otherwise it is computed (SIMD) into a T x n
// buffer. A sigmoid router's scores are not a softmax: do not pass them here.
// Preconditions (checked; errors name the argument): shapes agree; 1 <= n <= max_experts; indices in [-1, n);
// coeff finite; 0 < eps <= 1; a topology with n experts; token ranks in [0, R).
// Cost: O(T n) time; allocates O(T + R n), plus T n scores without `probabilities`. Thread safety: no state.
// Example: docs/api.md#losses.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/gating.hpp>
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

#include <Eigen/Core>

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
  S coeff = S(0.01);      ///< mu (our default: the paper gives no value for mu)
  S smoothing = S(0.01);  ///< eps in D_l
  const topology* topo = nullptr;            ///< required
  token_ranks token_rank;                    ///< whose tokens (topology.hpp); required with more than one rank
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

/// A row's normalized sigmoid scores q = s / (sum s + 1e-20), s = sigmoid(l), into `buffer` (Megatron-Core's aux
/// scores); null for a token that is skipped (NaN or +inf, all -inf, or a first choice of no_expert).
template <class S>
const S* sigmoid_row(const loss_inputs<S>& in, std::size_t t, S* buffer) {
  const S* l = in.logits.row(t);
  const std::size_t n = in.logits.cols;
  if (in.indices.present() && in.indices(t, 0) == no_expert) return nullptr;
  S max_logit = -std::numeric_limits<S>::infinity();
  for (std::size_t e = 0; e < n; ++e) {
    if (std::isnan(l[e]) || l[e] == std::numeric_limits<S>::infinity()) return nullptr;
    max_logit = std::max(max_logit, l[e]);
  }
  if (max_logit == -std::numeric_limits<S>::infinity()) return nullptr;
  S sum = 0;
  for (std::size_t e = 0; e < n; ++e) {
    buffer[e] = l[e] == -std::numeric_limits<S>::infinity() ? S(0) : sigmoid(l[e]);
    sum += buffer[e];
  }
  sum += S(sigmoid_renormalize_epsilon);
  for (std::size_t e = 0; e < n; ++e) buffer[e] /= sum;
  return buffer;
}

/// Adds dL/dl_t given dL/dq_ti = g_i for the normalized sigmoid q: s_j (1 - s_j) (g_j - q . g) / (sum s + 1e-20).
template <class S>
void add_sigmoid_backward(const S* l, const S* q, const double* g, std::size_t n, S* grad) {
  auto s = [&](std::size_t j) {
    return l[j] == -std::numeric_limits<S>::infinity() ? 0.0 : static_cast<double>(sigmoid(l[j]));
  };
  double dot = 0, total = sigmoid_renormalize_epsilon;
  for (std::size_t j = 0; j < n; ++j) {
    dot += static_cast<double>(q[j]) * g[j];
    total += s(j);
  }
  for (std::size_t j = 0; j < n; ++j) {
    const double sj = s(j);
    grad[j] += static_cast<S>(sj * (1 - sj) * (g[j] - dot) / total);
  }
}

template <class Policy, class S>
bool check_loss_inputs(const char* fn, const loss_inputs<S>& in, bool need_indices) {
  const std::size_t n = in.logits.cols, tokens = in.logits.rows;
  if (!check_selection<Policy>(fn, n, 0, false) || !check_view<Policy>(fn, "logits", in.logits, tokens, n, ""))
    return false;
  if (need_indices || in.indices.present()) {
    if (in.indices.cols < 1 || in.indices.cols > n) {
      return raise<Policy>(errc::domain, fn, "indices", shape_text(in.indices.rows, in.indices.cols),
                           "must have k columns, 1 <= k <= n", false);
    }
    if (!check_view<Policy>(fn, "indices", in.indices, tokens, in.indices.cols, "") ||
        !check_indices<Policy>(fn, in.indices, n))
      return false;
  }
  if (in.probabilities.present() &&
      !check_view<Policy>(fn, "probabilities", in.probabilities, tokens, n, "must have n columns"))
    return false;
  return true;
}

template <class Policy, class S>
bool check_coeff(const char* fn, const char* argument, S coeff) {
  return std::isfinite(coeff) || raise<Policy>(errc::domain, fn, argument, coeff, "must be finite", false);
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

/// All three losses in two passes over the batch (the fast path a trainer calls every step): values, and the
/// summed gradient d(aux + z + loc)/d logits added to grad_logits when it is passed. A term is off when its
/// coefficient is 0 (aux, z) or its topology is null (locality); an off term reports value 0.
template <class S>
struct router_loss_options {
  aux_loss_options<S> aux;
  S z_coeff = 0;
  locality_loss_options<S> locality;  ///< locality.topo null: no locality term
};

template <class S>
struct router_loss_values {
  loss_value<S> aux;
  loss_value<S> z;
  locality_value<S> locality;
};

/// Scratch the losses reuse from call to call (router_losses' last argument; our addition): kept by the caller,
/// a call at the shape of the call before allocates nothing (the vectors keep their largest size; the [R x n]
/// matrices are reallocated when R n changes).
template <class S>
struct loss_workspace {
  using double_matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<S> probabilities;  ///< softmax(logits) [T x n] when the caller passes none
  std::vector<S> row;            ///< one row's scores [n]
  std::vector<double> count, mean_q, grad_q;            ///< per expert [n]
  std::vector<std::size_t> rank_tokens;                 ///< per source rank [R]
  double_matrix sum_p, choices, grad_p;                 ///< per (source rank, expert) [R x n]
  Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> grad_p_s;  ///< grad_p in S
};

namespace detail {

/// Which terms to compute, and whether `aux` is required to have indices.
struct loss_terms {
  bool aux = false, z = false, locality = false;
};

template <class Policy, class S>
bool check_locality(const char* fn, const locality_loss_options<S>& o, std::size_t tokens, std::size_t n,
                    const char* coeff_name) {
  if (!(o.smoothing > 0 && o.smoothing <= 1)) {
    return raise<Policy>(errc::domain, fn, "smoothing", o.smoothing, "must satisfy 0 < eps <= 1", false);
  }
  if (!o.topo) return raise<Policy>(errc::domain, fn, "topo", "null", "a topology is required", false);
  if (o.topo->experts() != n) {
    return raise<Policy>(errc::domain, fn, "topo", o.topo->experts(), "must place exactly n experts", false);
  }
  return check_coeff<Policy>(fn, coeff_name, o.coeff) &&
         [&] {
           rank_map map;
           return resolve_token_ranks<Policy>(fn, "token_rank", o.token_rank, tokens, o.topo->ranks(), map);
         }();
}

/// The aux loss with sigmoid scores (Megatron-Core): row by row, its own pass (not on the fused path).
template <class S>
loss_value<S> aux_sigmoid(const loss_inputs<S>& in, const aux_loss_options<S>& o, const matrix_view<S>& grad,
                          loss_workspace<S>& ws) {
  const std::size_t tokens = in.logits.rows, n = in.logits.cols;
  const std::size_t k_used = o.normalization == aux_normalization::first_choice ? 1 : in.indices.cols;
  std::vector<double>& mean_q = ws.mean_q;
  std::vector<double>& count = ws.count;
  std::vector<double>& g = ws.grad_q;
  std::vector<S>& buffer = ws.row;
  mean_q.assign(n, 0.0);
  count.assign(n, 0.0);
  g.assign(n, 0.0);
  buffer.resize(n);
  loss_value<S> v;
  for (std::size_t t = 0; t < tokens; ++t) {
    const S* q = sigmoid_row(in, t, buffer.data());
    if (!q) continue;
    ++v.tokens;
    for (std::size_t e = 0; e < n; ++e) mean_q[e] += static_cast<double>(q[e]);
    for (std::size_t j = 0; j < k_used; ++j) {
      if (in.indices(t, j) != no_expert) count[static_cast<std::size_t>(in.indices(t, j))] += 1;
    }
  }
  v.skipped = tokens - v.tokens;
  if (v.tokens == 0) return v;
  const double tv = static_cast<double>(v.tokens);
  const double scale = static_cast<double>(o.coeff) * static_cast<double>(n) / static_cast<double>(k_used);
  double value = 0;
  for (std::size_t e = 0; e < n; ++e) {
    value += (count[e] / tv) * (mean_q[e] / tv);
    g[e] = scale * count[e] / (tv * tv);
  }
  v.value = static_cast<S>(scale * value);
  if (grad.present()) {
    for (std::size_t t = 0; t < tokens; ++t) {
      const S* q = sigmoid_row(in, t, buffer.data());
      if (q) add_sigmoid_backward(in.logits.row(t), q, g.data(), n, grad.row(t));
    }
  }
  return v;
}

/// Calls fn(rank, first_row, rows, lse) for each run of at most 64 consecutive valid tokens of one source rank
/// (`lse` per row when `with_lse`, else zeros). Valid: softmax row not all 0 (select.hpp zeroes invalid tokens)
/// and a first choice that is not no_expert. lse = max l - ln max p: no second exp. Nothing is allocated.
template <class S, class Fn>
void for_each_valid_run(const loss_inputs<S>& in, bool with_lse, const rank_map& ranks, Fn&& fn) {
  constexpr Eigen::Index chunk = 64;
  using column = Eigen::Array<S, Eigen::Dynamic, 1, 0, chunk, 1>;
  const std::size_t tokens = in.logits.rows;
  for (std::size_t c0 = 0; c0 < tokens; c0 += chunk) {
    const std::size_t rows = std::min<std::size_t>(chunk, tokens - c0);
    const column p_max = rows_map<S>(in.probabilities, c0, rows).rowwise().maxCoeff();
    column lse = column::Zero(static_cast<Eigen::Index>(rows));
    if (with_lse) lse = rows_map<S>(in.logits, c0, rows).rowwise().maxCoeff().array() - p_max.max(S(1e-30)).log();
    auto valid = [&](std::size_t i) {
      return p_max[static_cast<Eigen::Index>(i)] > S(0) && !(in.indices.present() && in.indices(c0 + i, 0) == no_expert);
    };
    for (std::size_t i = 0; i < rows;) {
      if (!valid(i)) {
        ++i;
        continue;
      }
      const std::size_t limit = ranks.run_end(c0 + i, c0 + rows) - c0;
      std::size_t end = i + 1;
      while (end < limit && valid(end)) ++end;
      fn(ranks.rank(c0 + i), c0 + i, end - i,
         lse.segment(static_cast<Eigen::Index>(i), static_cast<Eigen::Index>(end - i)));
      i = end;
    }
  }
}

/// sum_e a_e b_e with 8 interleaved partial sums (a fixed order; independent chains the compiler can vectorize).
template <class S>
S dot8(const S* a, const S* b, std::size_t n) noexcept {
  S part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::size_t e = 0;
  for (; e + 8 <= n; e += 8)
    for (std::size_t j = 0; j < 8; ++j) part[j] += a[e + j] * b[e + j];
  for (std::size_t j = 0; e < n; ++e, ++j) part[j] += a[e] * b[e];
  return ((part[0] + part[4]) + (part[2] + part[6])) + ((part[1] + part[5]) + (part[3] + part[7]));
}

/// The fused softmax terms. Pass 1: counts, sum of lse^2 and the sums of p per source rank (in float over a
/// run, then double); pass 2: grad_t += p_t * (G_r - p_t . G_r + 2 z lse_t / T_v), with G_r = dL/dp for rank r
/// (aux and locality together). Arguments are checked by the caller.
template <class S>
router_loss_values<S> fused_losses(const loss_inputs<S>& in_caller, const router_loss_options<S>& o, loss_terms terms,
                                   const matrix_view<S>& grad, loss_workspace<S>& ws) {
  const std::size_t tokens = in_caller.logits.rows, n = in_caller.logits.cols;
  router_loss_values<S> out;
  loss_inputs<S> in = in_caller;
  if (!in.probabilities.present() && tokens > 0) {  // softmax(logits): one SIMD pass
    ws.probabilities.resize(tokens * n);
    const matrix_view<S> p(ws.probabilities.data(), tokens, n);
    run_select<S>(in.logits, token_range{0, tokens}, {0, true, false}, p, {}, {});
    in.probabilities = p;
  }
  const bool softmax_aux = terms.aux && o.aux.score == score_function::softmax;
  const topology* topo = terms.locality ? o.locality.topo : nullptr;
  const std::size_t ranks = topo ? topo->ranks() : 1;
  rank_map rank_of{nullptr, 1, tokens};  // checked by the caller
  if (topo) resolve_token_ranks<construction_policy>("locmoe::router_losses", "token_rank", o.locality.token_rank, tokens, ranks, rank_of);
  const auto R = static_cast<Eigen::Index>(ranks), N = static_cast<Eigen::Index>(n);
  auto& sum_p = ws.sum_p;
  auto& choices = ws.choices;
  sum_p.setZero(R, N);
  choices.setZero(R, N);
  std::vector<double>& count = ws.count;
  std::vector<std::size_t>& rank_tokens = ws.rank_tokens;
  std::vector<S>& run_sum_buffer = ws.row;
  count.assign(n, 0.0);
  rank_tokens.assign(ranks, 0);
  run_sum_buffer.resize(n);
  const std::size_t k_aux =
      !in.indices.present() ? 0 : (o.aux.normalization == aux_normalization::first_choice ? 1 : in.indices.cols);
  std::size_t valid = 0;
  double z_sum = 0;
  for_each_valid_run(in, terms.z, rank_of, [&](std::size_t r, std::size_t t0, std::size_t rows, const auto& lse) {
    valid += rows;
    rank_tokens[r] += rows;
    z_sum += lse.template cast<double>().square().sum();
    const auto ri = static_cast<Eigen::Index>(r);
    S* run_sum = run_sum_buffer.data();  // plain loops: elementwise, so the compiler vectorizes them
    std::copy(in.probabilities.row(t0), in.probabilities.row(t0) + n, run_sum);
    for (std::size_t t = t0 + 1; t < t0 + rows; ++t) {
      const S* p = in.probabilities.row(t);
      for (std::size_t e = 0; e < n; ++e) run_sum[e] += p[e];
    }
    for (std::size_t e = 0; e < n; ++e) sum_p(ri, static_cast<Eigen::Index>(e)) += static_cast<double>(run_sum[e]);
    for (std::size_t t = t0; t < t0 + rows; ++t) {
      for (std::size_t j = 0; j < (in.indices.present() ? in.indices.cols : 0); ++j) {
        const expert_index e = in.indices(t, j);
        if (e == no_expert) continue;
        if (j < k_aux) count[static_cast<std::size_t>(e)] += 1;
        choices(ri, e) += 1;
      }
    }
  });
  out.aux.tokens = out.z.tokens = out.locality.tokens = valid;
  out.aux.skipped = out.z.skipped = out.locality.skipped = tokens - valid;
  if (valid == 0) return out;
  const double tv = static_cast<double>(valid);

  // Values and dL/dp per rank: g(r, e).
  auto& g = ws.grad_p;
  g.setZero(R, N);
  if (softmax_aux) {
    const double scale = static_cast<double>(o.aux.coeff) * static_cast<double>(n) / static_cast<double>(k_aux);
    double dot = 0;  // f . mean_p, with f = count / T_v and mean_p the column means of sum_p
    for (Eigen::Index e = 0; e < N; ++e) dot += (count[static_cast<std::size_t>(e)] / tv) * (sum_p.col(e).sum() / tv);
    out.aux.value = static_cast<S>(scale * dot);
    const Eigen::Map<const Eigen::RowVectorXd> f(count.data(), N);
    for (Eigen::Index r = 0; r < R; ++r) g.row(r) += (scale / (tv * tv)) * f;  // rowwise() would evaluate a temporary
  }
  if (terms.z) out.z.value = static_cast<S>(static_cast<double>(o.z_coeff) * z_sum / tv);
  if (topo) {
    const double eps = static_cast<double>(o.locality.smoothing);
    double loss = 0, hard = 0;
    for (std::size_t r = 0; r < ranks; ++r) {
      if (rank_tokens[r] == 0) continue;
      const auto node = topo->node_of_rank(r);
      const std::size_t local = topo->experts_on_node(static_cast<std::size_t>(node));
      if (local == 0) {
        ++out.locality.ranks_without_local_experts;
        sum_p.row(static_cast<Eigen::Index>(r)).setZero();  // no gradient from this rank
        continue;
      }
      ++out.locality.ranks;
      const auto ri = static_cast<Eigen::Index>(r);
      const double tr = static_cast<double>(rank_tokens[r]), chosen = choices.row(ri).sum();
      for (std::size_t e = 0; e < n; ++e) {
        const auto ei = static_cast<Eigen::Index>(e);
        const double target =
            (1 - eps) * (topo->node_of_expert(e) == node ? 1.0 / static_cast<double>(local) : 0.0) +
            eps / static_cast<double>(n);
        const double dc = sum_p(ri, ei) / tr;
        if (dc > 0) {
          loss += dc * std::log(dc / target);
          sum_p(ri, ei) = (std::log(dc / target) + 1) / tr;  // reused: dKL_r/dp for r's tokens (0 where D_c = 0)
        }
        const double dh = chosen > 0 ? choices(ri, ei) / chosen : 0.0;
        if (dh > 0) hard += dh * std::log(dh / target);
      }
    }
    if (out.locality.ranks > 0) {
      const double scale = static_cast<double>(o.locality.coeff) / static_cast<double>(out.locality.ranks);
      out.locality.value = static_cast<S>(scale * loss);
      out.locality.assignment_kl = static_cast<S>(hard / static_cast<double>(out.locality.ranks));
      for (std::size_t r = 0; r < ranks; ++r) {
        if (rank_tokens[r] > 0) g.row(static_cast<Eigen::Index>(r)) += scale * sum_p.row(static_cast<Eigen::Index>(r));
      }
    }
  }
  if (!grad.present()) return out;

  // Pass 2.
  auto& gs = ws.grad_p_s;
  gs = g.template cast<S>();
  const double z_factor = terms.z ? 2.0 * static_cast<double>(o.z_coeff) / tv : 0.0;
  for_each_valid_run(in, terms.z, rank_of, [&](std::size_t r, std::size_t t0, std::size_t rows, const auto& lse) {
    const S* gr = gs.data() + r * n;
    for (std::size_t i = 0; i < rows; ++i) {  // plain loops over a row (n is small: no per-row Eigen setup)
      const S* p = in.probabilities.row(t0 + i);
      S* dl = grad.row(t0 + i);
      const S shift = static_cast<S>(z_factor * static_cast<double>(lse[static_cast<Eigen::Index>(i)])) - dot8(p, gr, n);
      for (std::size_t e = 0; e < n; ++e) dl[e] += p[e] * (gr[e] + shift);
    }
  });
  return out;
}

/// Checks what the terms in use need. `combined` (router_losses) names the coefficients by their field.
template <class Policy, class S>
bool check_router_losses(const char* fn, const loss_inputs<S>& in, const router_loss_options<S>& o, loss_terms terms,
                         const matrix_view<S>& grad, bool combined) {
  const std::size_t tokens = in.logits.rows, n = in.logits.cols;
  return check_loss_inputs<Policy>(fn, in, terms.aux || terms.locality) &&
         (!terms.aux || check_coeff<Policy>(fn, combined ? "aux.coeff" : "coeff", o.aux.coeff)) &&
         (!terms.z || check_coeff<Policy>(fn, combined ? "z_coeff" : "coeff", o.z_coeff)) &&
         (!terms.locality || check_locality<Policy>(fn, o.locality, tokens, n, combined ? "locality.coeff" : "coeff")) &&
         check_grad<Policy>(fn, grad, tokens, n);
}

template <class S>
router_loss_values<S> run_losses(const loss_inputs<S>& in, const router_loss_options<S>& o, loss_terms terms,
                                 const matrix_view<S>& grad, loss_workspace<S>* workspace = nullptr) {
  const bool sigmoid_aux = terms.aux && o.aux.score == score_function::sigmoid;
  loss_workspace<S> own;
  loss_workspace<S>& ws = workspace ? *workspace : own;
  router_loss_values<S> out;
  if (terms.z || terms.locality || (terms.aux && !sigmoid_aux)) out = fused_losses(in, o, terms, grad, ws);
  if (sigmoid_aux) out.aux = aux_sigmoid(in, o.aux, grad, ws);
  return out;
}

}  // namespace detail

/// aux, z and locality losses together (two passes); see router_loss_options. Errors name the argument.
/// `workspace` (optional, ours): scratch kept between calls, so that a step at a shape seen before allocates
/// nothing; without it each call allocates O(n + R n) (and T n when `in` has no probabilities).
template <class S, class Policy = default_policy>
router_loss_values<S> router_losses(const loss_inputs<S>& in, const router_loss_options<S>& options,
                                    const matrix_view<S>& grad_logits = {}, const Policy& = Policy{},
                                    loss_workspace<S>* workspace = nullptr) {
  const detail::loss_terms terms{!(options.aux.coeff == S(0)), !(options.z_coeff == S(0)), options.locality.topo != nullptr};
  if (!detail::check_router_losses<Policy>("locmoe::router_losses", in, options, terms, grad_logits, true)) {
    router_loss_values<S> failed;
    failed.aux = failed.z = detail::failed_loss<S>();
    failed.locality.value = failed.aux.value;
    return failed;
  }
  return detail::run_losses(in, options, terms, grad_logits, workspace);
}

/// Auxiliary load-balancing loss (eq. 5) and, if grad_logits is passed, its gradient added there.
template <class S, class Policy = default_policy>
loss_value<S> aux_loss(const loss_inputs<S>& in, const aux_loss_options<S>& options,
                       const matrix_view<S>& grad_logits = {}, const Policy& = Policy{}) {
  router_loss_options<S> o;
  o.aux = options;
  const detail::loss_terms terms{true, false, false};
  if (!detail::check_router_losses<Policy>("locmoe::aux_loss", in, o, terms, grad_logits, false)) return detail::failed_loss<S>();
  return detail::run_losses(in, o, terms, grad_logits).aux;
}

/// Router z-loss: coeff * mean_t logsumexp(l_t)^2, and its gradient added to grad_logits if passed.
template <class S, class Policy = default_policy>
loss_value<S> z_loss(const loss_inputs<S>& in, S coeff, const matrix_view<S>& grad_logits = {},
                     const Policy& = Policy{}) {
  router_loss_options<S> o;
  o.z_coeff = coeff;
  const detail::loss_terms terms{false, true, false};
  if (!detail::check_router_losses<Policy>("locmoe::z_loss", in, o, terms, grad_logits, false)) return detail::failed_loss<S>();
  return detail::run_losses(in, o, terms, grad_logits).z;
}

/// LocMoE locality loss (eq. 6) per source rank, averaged over ranks; gradient added to grad_logits if passed.
template <class S, class Policy = default_policy>
locality_value<S> locality_loss(const loss_inputs<S>& in, const locality_loss_options<S>& options,
                                const matrix_view<S>& grad_logits = {}, const Policy& = Policy{}) {
  router_loss_options<S> o;
  o.aux.coeff = 0;
  o.locality = options;
  const detail::loss_terms terms{false, false, true};
  if (!detail::check_router_losses<Policy>("locmoe::locality_loss", in, o, terms, grad_logits, false)) {
    locality_value<S> failed;
    failed.value = std::numeric_limits<S>::quiet_NaN();
    return failed;
  }
  return detail::run_losses(in, o, terms, grad_logits).locality;
}

}  // namespace locmoe
