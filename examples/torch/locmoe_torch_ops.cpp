// locmoe's kernels as PyTorch operators (torch.ops.locmoe.*), loaded by the Python package locmoe_torch
// (examples/torch/locmoe_torch), which adds autograd and Megatron-Core's signatures on top.
//
// Registered with TORCH_LIBRARY, so the library needs neither Python's headers nor pybind11: the Python side
// loads it with torch.ops.load_library. CPU tensors only (locmoe's cpu_backend on a pool of
// at::get_num_threads() threads); every operator checks its arguments and raises ValueError (c10::ValueError)
// naming the argument and the rule.
//
// Rows of tokens are read through their row stride when the columns are contiguous; other layouts are copied
// once (a kernel needs contiguous rows). Logits and probabilities are converted to float (double for float64)
// for the arithmetic, as Megatron-Core computes its scores in float32.
//
// This file: routing, losses, token dropping, the GrAP gate and the capacity calculator; locmoe_torch_rows.cpp:
// permute and unpermute's row operators; ops_common.hpp: what both share.
#include "ops_common.hpp"

#include <locmoe/capacity.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <Eigen/Core>
#include <xsimd/xsimd.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace locmoe_torch_ops {
namespace {

// ---- routing -----------------------------------------------------------------------------------------------------

/// score_route over the pool's token ranges (arguments checked first, on this thread: a pool task must not throw),
/// then dense(range) in the same task: the [T, n] outputs of those tokens, written while they are in cache.
template <class S, class Dense>
void route_on_pool(const locmoe::matrix_view<const S>& logits, const locmoe::router_options<S>& o,
                   const locmoe::route_outputs<S>& out, Dense&& dense) {
  locmoe::score_route(logits, o, out, locmoe::token_range{0, 0});
  backend_lease lease;
  const auto ranges = token_ranges(logits.rows, lease.pool().threads());
  lease.pool().run(ranges.size(), [&](std::size_t r) {
    const auto scratch = std::make_unique<locmoe::route_scratch<S>>(o, logits.cols);
    locmoe::score_route(logits, o, out, ranges[r], locmoe::default_policy{}, scratch.get());
    dense(ranges[r]);
  });
}

/// Writes the rows of `range` of map [T, n] (true at the tokens' chosen experts) and, when given, of probs [T, n]
/// (their weights there, cast to P as Megatron-Core's probs.type_as(logits); 0 elsewhere): zeroed here, while the
/// pool task that routed these tokens has them in cache, instead of in a pass over the whole matrix before.
template <class P, class S>
void scatter_choices(const locmoe::route_outputs<S>& out, locmoe::token_range range, std::size_t n, bool* map,
                     P* probs) {
  std::fill(map + range.begin * n, map + range.end * n, false);
  if (probs) std::fill(probs + range.begin * n, probs + range.end * n, P(0.0f));
  const std::size_t k = out.indices.cols;
  for (std::size_t t = range.begin; t < range.end; ++t) {
    for (std::size_t j = 0; j < k; ++j) {
      const locmoe::expert_index e = out.indices(t, j);
      if (e < 0) continue;
      map[t * n + static_cast<std::size_t>(e)] = true;
      if (probs) probs[t * n + static_cast<std::size_t>(e)] = static_cast<P>(out.weights(t, j));
    }
  }
}

/// topk_routing_with_score_function's selection: (probs [T, n] in logits' dtype, routing_map [T, n] bool,
/// indices [T, k] int32: the chosen experts, best first, -1 for an invalid token's slots).
std::tuple<Tensor, Tensor, Tensor> route(const Tensor& logits_in, int64_t topk, bool use_pre_softmax,
                                         int64_t num_groups, int64_t group_topk, double scaling_factor,
                                         std::string score_function, const c10::optional<Tensor>& expert_bias) {
  Tensor logits = scores_input(logits_in);
  const auto dtype = logits.scalar_type();
  const int64_t T = logits.size(0), n = logits.size(1);
  Tensor indices = at::empty({T, topk}, logits.options().dtype(at::kInt));
  Tensor probs = at::empty({T, n}, logits_in.options());  // written whole by scatter_choices
  Tensor map = at::empty({T, n}, logits_in.options().dtype(at::kBool));
  return checked([&] {
    AT_DISPATCH_FLOATING_TYPES(dtype, "locmoe_torch::route", [&] {
      using S = scalar_t;
      auto o = router_options_of<S>(n, topk, use_pre_softmax, num_groups, group_topk, scaling_factor, score_function);
      Tensor bias;
      if (expert_bias && expert_bias->defined() && o.score == locmoe::score_function::sigmoid) {  // softmax ignores it
        check_cpu(*expert_bias, "expert_bias");
        TORCH_CHECK_VALUE(expert_bias->dim() == 1 && expert_bias->size(0) == n, "locmoe_torch: expert_bias must be [",
                          n, "] (num_experts)");
        bias = expert_bias->to(dtype).contiguous();
        o.expert_bias = bias.data_ptr<S>();
      }
      Tensor weights = at::empty({T, topk}, logits.options());
      const locmoe::matrix_view<const S> l(logits.data_ptr<S>(), T, n);
      const locmoe::route_outputs<S> out{{indices.data_ptr<locmoe::expert_index>(), std::size_t(T), std::size_t(topk)},
                                         {weights.data_ptr<S>(), std::size_t(T), std::size_t(topk)}, {}, {}};
      with_row_type(logits_in.scalar_type(), [&](auto element) {
        using P = decltype(element);
        route_on_pool(l, o, out, [&](locmoe::token_range range) {
          scatter_choices(out, range, static_cast<std::size_t>(n), map.data_ptr<bool>(),
                          reinterpret_cast<P*>(probs.data_ptr()));
        });
      });
    });
    return std::make_tuple(probs, map, indices);
  });
}

/// compute_routing_scores_for_aux_loss's scores and map: (routing_map [T, n] bool of the top-k scores, scores
/// [T, n]: softmax(l) in float (double for float64 logits), or sigmoid(l) for "sigmoid" (normalized by the caller)).
std::tuple<Tensor, Tensor> aux_scores(const Tensor& logits_in, int64_t topk, std::string score_function) {
  Tensor logits = scores_input(logits_in);
  const auto dtype = logits.scalar_type();
  const int64_t T = logits.size(0), n = logits.size(1);
  Tensor indices = at::empty({T, topk}, logits.options().dtype(at::kInt));
  Tensor scores = at::empty({T, n}, logits.options());
  Tensor map = at::empty({T, n}, logits.options().dtype(at::kBool));  // written whole by scatter_choices
  return checked([&] {
    AT_DISPATCH_FLOATING_TYPES(dtype, "locmoe_torch::aux_scores", [&] {
      using S = scalar_t;
      const auto o = router_options_of<S>(n, topk, true, 0, 0, 1.0, score_function);
      Tensor weights = at::empty({T, topk}, logits.options());
      const locmoe::matrix_view<const S> l(logits.data_ptr<S>(), T, n);
      const locmoe::route_outputs<S> out{{indices.data_ptr<locmoe::expert_index>(), std::size_t(T), std::size_t(topk)},
                                         {weights.data_ptr<S>(), std::size_t(T), std::size_t(topk)},
                                         {scores.data_ptr<S>(), std::size_t(T), std::size_t(n)}, {}};
      route_on_pool(l, o, out, [&](locmoe::token_range range) {
        scatter_choices(out, range, static_cast<std::size_t>(n), map.data_ptr<bool>(), static_cast<float*>(nullptr));
      });
    });
    return std::make_tuple(map, scores);
  });
}

/// softmax's backward: dL/dl[t, i] = p[t, i] (g[t, i] - sum_j p[t, j] g[t, j]) for probs p [T, n] (float or double)
/// and dL/dp g [T, n] of any strides (a row broadcast over the tokens, stride 0, as the aux loss's gradient comes,
/// is read in place, not copied, and converted once per task); the dot in double over 8 partial sums added by a
/// fixed tree, the result in p's dtype. Over token ranges on the pool.
Tensor softmax_backward(const Tensor& grad_in, const Tensor& probs_in) {
  check_matrix(grad_in, "grad");
  check_matrix(probs_in, "probs");
  TORCH_CHECK_VALUE(probs_in.scalar_type() == at::kFloat || probs_in.scalar_type() == at::kDouble,
                    "locmoe_torch: probs must be float32 or float64 (got ", probs_in.scalar_type(), ")");
  TORCH_CHECK_VALUE(grad_in.sizes() == probs_in.sizes(), "locmoe_torch: grad must have probs' shape");
  Tensor probs = probs_in.contiguous();
  Tensor grad = grad_in.to(probs.scalar_type());
  Tensor out = at::empty(probs.sizes(), probs.options());
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "locmoe_torch::softmax_backward", [&] {
    using S = scalar_t;
    const std::size_t T = probs.size(0), n = probs.size(1);
    const auto row_stride = static_cast<std::ptrdiff_t>(grad.stride(0)), col_stride = static_cast<std::ptrdiff_t>(grad.stride(1));
    const S* p = probs.data_ptr<S>();
    const S* g = grad.data_ptr<S>();
    S* o = out.data_ptr<S>();
    backend_lease lease;
    const auto ranges = token_ranges(T, lease.pool().threads(), 1024);
    lease.pool().run(ranges.size(), [&](std::size_t r) {
      std::vector<double> row(n);  // the token's gradient row in double, contiguous: the loops below vectorize
      constexpr std::size_t lanes = 8;  // the dot's partial sums: independent chains, in a fixed order
      for (std::size_t t = ranges[r].begin; t < ranges[r].end; ++t) {
        const S* pt = p + t * n;
        const S* gt = g + static_cast<std::ptrdiff_t>(t) * row_stride;
        if (t == ranges[r].begin || row_stride != 0) {
          for (std::size_t e = 0; e < n; ++e) row[e] = static_cast<double>(gt[static_cast<std::ptrdiff_t>(e) * col_stride]);
        }
        double partial[lanes] = {};
        std::size_t e = 0;
        for (; e + lanes <= n; e += lanes) {
          for (std::size_t j = 0; j < lanes; ++j) partial[j] += static_cast<double>(pt[e + j]) * row[e + j];
        }
        for (std::size_t j = 0; e + j < n; ++j) partial[j] += static_cast<double>(pt[e + j]) * row[e + j];
        const double dot = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
                           ((partial[4] + partial[5]) + (partial[6] + partial[7]));
        S* ot = o + t * n;
        for (std::size_t i = 0; i < n; ++i) ot[i] = static_cast<S>(static_cast<double>(pt[i]) * (row[i] - dot));
      }
    });
  });
  return out;
}

/// The chosen experts [T, k] as the routers write them (checked here, on the calling thread: the pool's tasks
/// must not throw): each in [-1, n), distinct within a token, none after a -1.
void check_choices(const Tensor& indices, int64_t n) {
  const int64_t T = indices.size(0), k = indices.size(1);
  const int32_t* idx = indices.data_ptr<int32_t>();
  std::vector<int64_t> seen(static_cast<std::size_t>(n), -1);
  for (int64_t t = 0; t < T; ++t) {
    bool ended = false;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = idx[t * k + j];
      TORCH_CHECK_VALUE(e >= -1 && e < n, "locmoe_torch: indices[", t, ", ", j, "] = ", e, " must be in [-1, ", n, ")");
      if (e < 0) {
        ended = true;
        continue;
      }
      TORCH_CHECK_VALUE(!ended, "locmoe_torch: indices[", t, "] has an expert after a -1 slot");
      TORCH_CHECK_VALUE(seen[e] != t, "locmoe_torch: indices[", t, "] names expert ", e, " twice");
      seen[e] = t;
    }
  }
}

/// route's backward: dL/dlogits from dL/dprobs [T, n] (only the chosen entries matter), in logits' dtype.
Tensor route_backward(const Tensor& logits_in, const Tensor& indices, const Tensor& grad_probs, int64_t topk,
                      bool use_pre_softmax, double scaling_factor, std::string score_function) {
  check_matrix(logits_in, "logits");
  check_matrix(grad_probs, "grad_probs");
  check_matrix(indices, "indices");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt && indices.size(0) == logits_in.size(0) && indices.size(1) == topk,
                    "locmoe_torch: indices must be int32 [T, topk]");
  TORCH_CHECK_VALUE(grad_probs.sizes() == logits_in.sizes(), "locmoe_torch: grad_probs must have logits' shape");
  Tensor logits = scores_input(logits_in);
  const auto dtype = logits.scalar_type();
  Tensor idx = indices.contiguous();
  const int64_t T = logits.size(0), n = logits.size(1);
  check_choices(idx, n);
  Tensor safe = idx.clamp_min(0).to(at::kLong);
  Tensor grad_weights = grad_probs.to(dtype).gather(1, safe).contiguous();
  Tensor grad_logits = at::empty({T, n}, logits.options());
  return checked([&] {
    AT_DISPATCH_FLOATING_TYPES(dtype, "locmoe_torch::route_backward", [&] {
      using S = scalar_t;
      const auto o = router_options_of<S>(n, topk, use_pre_softmax, 0, 0, scaling_factor, score_function);
      const locmoe::matrix_view<const S> l(logits.data_ptr<S>(), T, n);
      const locmoe::matrix_view<const locmoe::expert_index> ix(idx.data_ptr<locmoe::expert_index>(), T, topk);
      const locmoe::matrix_view<const S> gw(grad_weights.data_ptr<S>(), T, topk);
      const locmoe::matrix_view<S> gl(grad_logits.data_ptr<S>(), T, n);
      locmoe::route_backward(l, o, ix, gw, gl, locmoe::token_range{0, 0});  // checks on this thread
      backend_lease lease;
      const auto ranges = token_ranges(T, lease.pool().threads());
      lease.pool().run(ranges.size(), [&](std::size_t r) {
        locmoe::route_backward_workspace workspace;
        for (std::size_t t = ranges[r].begin; t < ranges[r].end; t += 64) {  // zeroed just before they are added to
          const locmoe::token_range block{t, std::min(t + 64, ranges[r].end)};
          std::fill(gl.row(block.begin), gl.row(block.begin) + (block.end - block.begin) * gl.stride, S(0));
          locmoe::route_backward(l, o, ix, gw, gl, block, locmoe::default_policy{}, &workspace);
        }
      });
    });
    return grad_logits.to(logits_in.scalar_type());
  });
}

/// Tokens per block of the z-loss (the blocks' sums are added in order: the same loss on any number of threads).
constexpr std::size_t z_block = 64;

/// z_loss_func: (coeff mean_t logsumexp(l_t)^2 as a 0-d tensor, its gradient [T, n]), in logits' dtype, as
/// locmoe::z_loss computes them (losses.hpp: lse = max l - log(max p), tokens whose softmax is all zero, NaN or +inf
/// logits, left out of the mean and given no gradient), over blocks of 64 tokens on the pool: pass 1 writes each
/// token's softmax into the gradient and keeps its lse and each block's sum of lse^2 (in double, in token order);
/// pass 2 scales each row by 2 coeff lse / T_valid. The blocks are summed in order on this thread, so the loss is
/// the same bit for bit whatever the number of threads.
std::tuple<Tensor, Tensor> z_loss(const Tensor& logits_in, double coeff) {
  Tensor logits = scores_input(logits_in);
  const double representable = logits.scalar_type() == at::kDouble ? coeff : static_cast<double>(static_cast<float>(coeff));
  TORCH_CHECK_VALUE(std::isfinite(representable), "locmoe_torch: z_loss_coeff must be finite in the logits' arithmetic ",
                    "type (got ", coeff, ")");
  const auto dtype = logits.scalar_type();
  Tensor grad = at::empty_like(logits);
  return checked([&] {
    double value = 0;
    AT_DISPATCH_FLOATING_TYPES(dtype, "locmoe_torch::z_loss", [&] {
      using S = scalar_t;
      using column = Eigen::Array<S, Eigen::Dynamic, 1, 0, z_block, 1>;
      const std::size_t T = logits.size(0), n = logits.size(1);
      const locmoe::matrix_view<const S> l(logits.data_ptr<S>(), T, n);
      const locmoe::matrix_view<S> g(grad.data_ptr<S>(), T, n);
      locmoe::softmax(l, g, locmoe::token_range{0, 0});  // checks on this thread
      const std::size_t blocks = (T + z_block - 1) / z_block;
      std::vector<S> lse(T);
      std::vector<double> block_sum(blocks, 0.0);
      std::vector<std::size_t> block_valid(blocks, 0);
      const auto block_rows = [&](std::size_t b) { return std::min(z_block, T - b * z_block); };
      const auto map = [&](const auto& m, std::size_t b) {
        return Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0, Eigen::OuterStride<>>(
            m.row(b * z_block), static_cast<Eigen::Index>(block_rows(b)), static_cast<Eigen::Index>(n),
            Eigen::OuterStride<>(static_cast<Eigen::Index>(m.stride)));
      };
      backend_lease lease;
      const auto ranges = token_ranges(blocks, lease.pool().threads(), 4);
      lease.pool().run(ranges.size(), [&](std::size_t r) {
        for (std::size_t b = ranges[r].begin; b < ranges[r].end; ++b) {
          const std::size_t t0 = b * z_block, rows = block_rows(b);
          locmoe::softmax(l, g, locmoe::token_range{t0, t0 + rows});
          const locmoe::matrix_view<const S> p(g.data, T, n, g.stride);
          const column p_max = map(p, b).rowwise().maxCoeff();
          const column row_lse = map(l, b).rowwise().maxCoeff() - p_max.max(S(1e-30)).log();
          for (std::size_t i = 0; i < rows; ++i) {
            const bool valid = p_max[static_cast<Eigen::Index>(i)] > S(0);
            lse[t0 + i] = valid ? row_lse[static_cast<Eigen::Index>(i)] : S(0);
            if (!valid) {
              std::fill(g.row(t0 + i), g.row(t0 + i) + n, S(0));
              continue;
            }
            ++block_valid[b];
            block_sum[b] += static_cast<double>(lse[t0 + i]) * static_cast<double>(lse[t0 + i]);
          }
        }
      });
      double z_sum = 0;
      std::size_t valid = 0;
      for (std::size_t b = 0; b < blocks; ++b) {
        z_sum += block_sum[b];
        valid += block_valid[b];
      }
      if (valid == 0) return;  // every row was zeroed in pass 1
      value = static_cast<double>(static_cast<S>(coeff)) * z_sum / static_cast<double>(valid);
      const double factor = 2.0 * static_cast<double>(static_cast<S>(coeff)) / static_cast<double>(valid);
      lease.pool().run(ranges.size(), [&](std::size_t r) {
        for (std::size_t t = ranges[r].begin * z_block; t < std::min(T, ranges[r].end * z_block); ++t) {
          S* row = g.row(t);  // an invalid token's row is zero, its lse 0
          const S scale = static_cast<S>(factor * static_cast<double>(lse[t]));
          for (std::size_t e = 0; e < n; ++e) row[e] = row[e] * scale;
        }
      });
    });
    const auto options = logits_in.options();
    return std::make_tuple(at::scalar_tensor(static_cast<double>(value), options.dtype(dtype)).to(logits_in.scalar_type()),
                           grad.to(logits_in.scalar_type()));
  });
}

// ---- LocMoE's own: the GrAP gate and the locality loss's target ----------------------------------------------------

/// GrAP gate (paper eq. 4): logits [T, n] = ReLU(block means of hidden + bias), in float (double for float64).
Tensor grap_logits(const Tensor& hidden_in, int64_t num_experts, const c10::optional<Tensor>& bias_in, bool relu) {
  check_matrix(hidden_in, "hidden");
  check_row_dtype(hidden_in, "hidden");
  const int64_t T = hidden_in.size(0), d = hidden_in.size(1);
  TORCH_CHECK_VALUE(num_experts >= 1 && num_experts <= d, "locmoe_torch: num_experts must be in [1, hidden size = ", d,
                    "] (got ", num_experts, ")");
  Tensor hidden = hidden_in;
  const auto dtype = score_dtype(hidden.scalar_type());
  Tensor logits = at::empty({T, num_experts}, hidden.options().dtype(dtype));
  Tensor bias;
  if (bias_in && bias_in->defined()) {
    check_cpu(*bias_in, "bias");
    TORCH_CHECK_VALUE(bias_in->dim() == 1 && bias_in->size(0) == num_experts, "locmoe_torch: bias must be [",
                      num_experts, "] (num_experts)");
    bias = bias_in->to(dtype).contiguous();
  }
  return checked([&] {
    with_row_type(hidden.scalar_type(), [&](auto element) {
      using E = decltype(element);
      using R = locmoe::accumulate_t<E>;
      const locmoe::grap_gate<R> gate{static_cast<std::size_t>(d), static_cast<std::size_t>(num_experts), relu,
                                      bias.defined() ? bias.data_ptr<R>() : nullptr};
      const locmoe::matrix_view<const E> x = rows_view<E>(hidden);
      const locmoe::matrix_view<R> out(logits.data_ptr<R>(), T, num_experts);
      locmoe::grap_logits(gate, x, out, locmoe::token_range{0, 0});  // checks on this thread
      backend_lease lease;
      const auto ranges = token_ranges(T, lease.pool().threads());
      lease.pool().run(ranges.size(), [&](std::size_t r) { locmoe::grap_logits(gate, x, out, ranges[r]); });
    });
    return logits;
  });
}

/// grap_logits' backward: dL/dhidden [T, d] (in the logits' type; the caller casts) from dL/dlogits, masked by
/// logits > 0 with ReLU.
Tensor grap_backward(const Tensor& logits_in, const Tensor& grad_in, int64_t hidden_size, bool relu) {
  check_matrix(logits_in, "logits");
  TORCH_CHECK_VALUE(grad_in.sizes() == logits_in.sizes(), "locmoe_torch: grad_logits must have logits' shape");
  const int64_t T = logits_in.size(0), n = logits_in.size(1);
  TORCH_CHECK_VALUE(n >= 1 && hidden_size >= n, "locmoe_torch: hidden_size must be >= num_experts");
  Tensor logits = logits_in.contiguous();
  Tensor grad = grad_in.to(logits.scalar_type()).contiguous();
  Tensor grad_x = at::empty({T, hidden_size}, logits.options());
  return checked([&] {
    AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "locmoe_torch::grap_backward", [&] {
      using G = scalar_t;
      const locmoe::grap_gate<G> gate{static_cast<std::size_t>(hidden_size), static_cast<std::size_t>(n), relu, nullptr};
      const locmoe::matrix_view<const G> l(logits.data_ptr<G>(), T, n), g(grad.data_ptr<G>(), T, n);
      const locmoe::matrix_view<G> gx(grad_x.data_ptr<G>(), T, hidden_size);
      locmoe::grap_backward(gate, l, g, gx, static_cast<G*>(nullptr), locmoe::token_range{0, 0});
      backend_lease lease;
      const auto ranges = token_ranges(T, lease.pool().threads());
      lease.pool().run(ranges.size(), [&](std::size_t r) {
        locmoe::grap_backward(gate, l, g, gx, static_cast<G*>(nullptr), ranges[r]);
      });
    });
    return grad_x;
  });
}

/// The locality loss's localized distribution D_l for `rank` (paper eq. 6; losses.hpp): (1 - eps) / L on the L
/// experts of the rank's node, plus eps / n everywhere, under topology::uniform(ranks, ranks_per_node, n) (experts
/// in blocks over the ranks). float64 [n]. A rank whose node hosts no expert has none: ValueError.
Tensor locality_target(int64_t ranks, int64_t ranks_per_node, int64_t num_experts, int64_t rank, double smoothing) {
  return checked([&] {
    const auto topo = locmoe::topology::uniform(ranks, ranks_per_node, num_experts);
    TORCH_CHECK_VALUE(rank >= 0 && rank < ranks, "locmoe_torch: rank must be in [0, ranks = ", ranks, ") (got ", rank,
                      ")");
    TORCH_CHECK_VALUE(smoothing > 0 && smoothing <= 1, "locmoe_torch: smoothing must be in (0, 1] (got ", smoothing, ")");
    const auto node = static_cast<std::size_t>(topo.node_of_rank(static_cast<std::size_t>(rank)));
    const auto local = static_cast<double>(topo.experts_on_node(node));
    TORCH_CHECK_VALUE(local > 0, "locmoe_torch: rank ", rank, "'s node hosts no expert: no localized distribution");
    Tensor target = at::empty({num_experts}, at::TensorOptions().dtype(at::kDouble));
    double* out = target.data_ptr<double>();
    for (int64_t e = 0; e < num_experts; ++e) {
      const bool here = topo.is_local(static_cast<std::size_t>(e), static_cast<std::size_t>(rank));
      out[e] = (here ? (1 - smoothing) / local : 0.0) + smoothing / static_cast<double>(num_experts);
    }
    return target;
  });
}

// ---- token dropping ----------------------------------------------------------------------------------------------

/// fn(e) for each e < n, in increasing e, whose row[e] is not <= 0 (positive or NaN). Float rows are tested a SIMD
/// register at a time (xsimd's default architecture: what this file is compiled for), so that a sparse row costs a
/// compare per register.
template <class P, class Fn>
void for_each_positive_or_nan(const P* row, std::size_t n, Fn&& fn) {
  std::size_t e = 0;
  if constexpr (std::is_same_v<P, float>) {
    using batch = xsimd::batch<float>;
    const batch zero(0.0f);
    for (; e + batch::size <= n; e += batch::size) {
      if (!xsimd::any(!(batch::load_unaligned(row + e) <= zero))) continue;
      for (std::size_t j = e; j < e + batch::size; ++j) {
        if (!(row[j] <= 0.0f)) fn(j);
      }
    }
  }
  for (; e < n; ++e) {
    const double v = static_cast<double>(row[e]);
    if (!(v <= 0)) fn(e);
  }
}

/// values * mask in values' dtype over [T, n] (a NaN or inf times 0 is NaN, -x times 0 is -0: torch's product of
/// a tensor and a bool mask), written over token ranges on the pool. What apply_router_token_dropping's probs and
/// their gradient are.
Tensor masked_product(const Tensor& values_in, const Tensor& mask_in) {
  check_matrix(values_in, "values");
  check_row_dtype(values_in, "values");
  check_matrix(mask_in, "mask");
  TORCH_CHECK_VALUE(values_in.sizes() == mask_in.sizes(), "locmoe_torch: mask must have values' shape");
  Tensor values = values_in.contiguous();
  Tensor mask = mask_in.to(at::kBool).contiguous();
  Tensor out = at::empty(values.sizes(), values.options().memory_format(at::MemoryFormat::Contiguous));
  const std::size_t T = values.size(0), n = values.size(1);
  const bool* m = mask.data_ptr<bool>();
  with_row_type(values.scalar_type(), [&](auto element) {
    using P = decltype(element);
    using A = std::conditional_t<std::is_same_v<P, double>, double, float>;
    const P* v = reinterpret_cast<const P*>(values.data_ptr());
    P* o = reinterpret_cast<P*>(out.data_ptr());
    backend_lease lease;
    const auto ranges = token_ranges(T, lease.pool().threads(), 1024);
    lease.pool().run(ranges.size(), [&](std::size_t r) {
      for (std::size_t i = ranges[r].begin * n; i < ranges[r].end * n; ++i)  // branch-free: vectorized
        o[i] = static_cast<P>(static_cast<A>(v[i]) * static_cast<A>(m[i]));
    });
  });
  return out;
}

/// apply_router_token_dropping's capacity mask: per expert, the `capacity` tokens of highest key (routing_probs
/// for "probs", the routing map for "position"), ties to the lower token index; then final_map = mask (pad) or
/// map & mask. Returns (routing_probs * final_map in probs' dtype, final_map [T, n] bool). One pass over the matrix
/// on the pool lists each expert's tokens of positive key with their keys; an expert then needs only those, unless
/// it has fewer than `capacity`: then its tokens of key 0 follow in token order, and the negative ones by key.
/// O(T n + kept log kept).
std::tuple<Tensor, Tensor> token_dropping(const Tensor& probs_in, const Tensor& map_in, int64_t capacity,
                                          std::string drop_policy, bool pad_to_capacity) {
  check_matrix(probs_in, "routing_probs");
  check_row_dtype(probs_in, "routing_probs");
  check_matrix(map_in, "routing_map");
  TORCH_CHECK_VALUE(probs_in.sizes() == map_in.sizes(), "locmoe_torch: routing_map must have routing_probs' shape");
  TORCH_CHECK_VALUE(drop_policy == "probs" || drop_policy == "position",
                    "locmoe_torch: drop_policy must be 'probs' or 'position' (got '", drop_policy, "')");
  const int64_t T = probs_in.size(0), n = probs_in.size(1);
  TORCH_CHECK_VALUE(capacity >= 0 && capacity <= T, "locmoe_torch: capacity must be in [0, num_tokens = ", T,
                    "] (got ", capacity, ")");
  const bool by_probs = drop_policy == "probs";
  Tensor probs = probs_in.contiguous();
  Tensor routed = map_in.to(at::kBool).contiguous();
  Tensor final_map = at::empty({T, n}, map_in.options().dtype(at::kBool));
  const bool* in_map = routed.data_ptr<bool>();
  bool* out = final_map.data_ptr<bool>();
  with_row_type(probs.scalar_type(), [&](auto element) {
    using P = decltype(element);
    const P* p = reinterpret_cast<const P*>(probs.data_ptr());
    const auto key = [&](int64_t t, int64_t e) {
      return by_probs ? static_cast<double>(p[t * n + e]) : (in_map[t * n + e] ? 1.0 : 0.0);
    };
    struct entry {
      double key;
      int64_t token;
    };
    const auto before = [](const entry& a, const entry& b) { return a.key > b.key || (a.key == b.key && a.token < b.token); };
    // Each expert's tokens of positive key, found over token ranges on the pool (which zero their rows of the
    // final map), then joined in range order.
    backend_lease lease;
    const auto ranges = token_ranges(static_cast<std::size_t>(T), lease.pool().threads(), 1024);
    std::vector<std::vector<std::vector<entry>>> found(ranges.size(), std::vector<std::vector<entry>>(static_cast<std::size_t>(n)));
    std::vector<char> nan(ranges.size(), 0);
    lease.pool().run(ranges.size(), [&](std::size_t r) {
      const auto begin = static_cast<int64_t>(ranges[r].begin), end = static_cast<int64_t>(ranges[r].end);
      std::fill(out + begin * n, out + end * n, false);
      auto& lists = found[r];
      bool any_nan = false;
      for (int64_t t = begin; t < end; ++t) {
        const auto add = [&](std::size_t e) {
          const double v = key(t, static_cast<int64_t>(e));
          any_nan |= v != v;
          if (v > 0) lists[e].push_back({v, t});
        };
        if (by_probs) {
          for_each_positive_or_nan(p + t * n, static_cast<std::size_t>(n), add);
        } else {
          for_each_true(in_map + t * n, static_cast<std::size_t>(n), add);
        }
      }
      nan[r] = any_nan;
    });
    TORCH_CHECK_VALUE(std::find(nan.begin(), nan.end(), 1) == nan.end(), "locmoe_torch: routing_probs must not hold NaN");
    lease.pool().run(static_cast<std::size_t>(n), [&](std::size_t e_) {
      const auto e = static_cast<int64_t>(e_);
      const auto keep = [&](int64_t t) { out[t * n + e] = pad_to_capacity || in_map[t * n + e]; };
      std::vector<entry> best;
      std::size_t count = 0;
      for (const auto& range_found : found) count += range_found[e_].size();
      best.reserve(count);
      for (const auto& range_found : found) best.insert(best.end(), range_found[e_].begin(), range_found[e_].end());
      if (static_cast<int64_t>(count) >= capacity) {
        std::nth_element(best.begin(), best.begin() + capacity, best.end(), before);
        for (int64_t i = 0; i < capacity; ++i) keep(best[static_cast<std::size_t>(i)].token);
        return;
      }
      for (const entry& x : best) keep(x.token);
      int64_t missing = capacity - static_cast<int64_t>(count);
      std::vector<entry> negative;
      for (int64_t t = 0; t < T && missing > 0; ++t) {
        const double v = key(t, e);
        if (v == 0) {
          keep(t);
          --missing;
        } else if (v < 0) {
          negative.push_back({v, t});
        }
      }
      if (missing > 0) {  // the scan saw every token: negative holds them all
        std::nth_element(negative.begin(), negative.begin() + missing, negative.end(), before);
        for (int64_t i = 0; i < missing; ++i) keep(negative[static_cast<std::size_t>(i)].token);
      }
    });
  });
  return std::make_tuple(masked_product(probs, final_map), final_map);
}

// ---- the capacity calculator (capacity.hpp) ----------------------------------------------------------------------

double p_delta_op(int64_t d, double delta) {
  return checked([&] { return locmoe::p_delta(d, delta); });
}
int64_t critical_capacity_op(int64_t d, int64_t n, double delta) {
  return checked([&] { return locmoe::critical_capacity(d, n, delta); });
}
double max_delta_for_capacity_op(int64_t d, int64_t n, double capacity) {
  return checked([&] { return locmoe::max_delta_for_capacity(d, n, capacity); });
}

}  // namespace
}  // namespace locmoe_torch_ops

TORCH_LIBRARY(locmoe, m) {
  using namespace locmoe_torch_ops;
  m.def("p_delta(int d, float delta) -> float", &p_delta_op);
  m.def("locality_target(int ranks, int ranks_per_node, int num_experts, int rank, float smoothing) -> Tensor",
        &locality_target);
  m.def("critical_capacity(int d, int n, float delta) -> int", &critical_capacity_op);
  m.def("max_delta_for_capacity(int d, int n, float capacity) -> float", &max_delta_for_capacity_op);
  m.def("route(Tensor logits, int topk, bool use_pre_softmax, int num_groups, int group_topk, float scaling_factor, "
        "str score_function, Tensor? expert_bias) -> (Tensor, Tensor, Tensor)");
  m.def("route_backward(Tensor logits, Tensor indices, Tensor grad_probs, int topk, bool use_pre_softmax, "
        "float scaling_factor, str score_function) -> Tensor");
  m.def("aux_scores(Tensor logits, int topk, str score_function) -> (Tensor, Tensor)");
  m.def("z_loss(Tensor logits, float coeff) -> (Tensor, Tensor)");
  m.def("grap_logits(Tensor hidden, int num_experts, Tensor? bias, bool relu) -> Tensor");
  m.def("grap_backward(Tensor logits, Tensor grad_logits, int hidden_size, bool relu) -> Tensor");
  m.def("token_dropping(Tensor routing_probs, Tensor routing_map, int capacity, str drop_policy, "
        "bool pad_to_capacity) -> (Tensor, Tensor)");
  m.def("masked_product(Tensor values, Tensor mask) -> Tensor");
  m.def("softmax_backward(Tensor grad, Tensor probs) -> Tensor");
}

TORCH_LIBRARY_IMPL(locmoe, CPU, m) {
  using namespace locmoe_torch_ops;
  m.impl("route", &route);
  m.impl("route_backward", &route_backward);
  m.impl("aux_scores", &aux_scores);
  m.impl("z_loss", &z_loss);
  m.impl("grap_logits", &grap_logits);
  m.impl("grap_backward", &grap_backward);
  m.impl("token_dropping", &token_dropping);
  m.impl("masked_product", &masked_product);
  m.impl("softmax_backward", &softmax_backward);
}
