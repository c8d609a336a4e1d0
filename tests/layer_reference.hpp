// A whole MoE layer in double, written with the library's free functions: gate (GrAP or dense) -> selection ->
// capacity -> dispatch -> small linear experts -> combine -> L = sum(y * R) + aux + z + locality, and its backward
// by hand (combine_backward, the experts' transposes, dispatch_backward, route_backward, the losses' gradients,
// the gate's backward). test_layer_gradients.cpp checks it against central differences; the router object's
// tests compare with it.
#pragma once

#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>

#include <random>
#include <vector>

namespace locmoe_test {

struct layer_case {
  bool dense = false;  ///< dense gate (else GrAP)
  locmoe::score_function score = locmoe::score_function::softmax;
  bool softmax_before_topk = true;
  bool renormalize = false;
  std::size_t k = 1;
  bool drops = false;  ///< capacity below the largest load (else dropless)
};

/// Calls f(c, name, index) for the 48 cases the layer tests cover: both gates, four score functions (softmax
/// before Top-k, the same renormalized, softmax after Top-k, sigmoid), k = 1, 2, 4, drops off and on.
template <class F>
void for_each_layer_case(F&& f) {
  struct scoring {
    locmoe::score_function score;
    bool before, renormalize;
    const char* name;
  };
  const scoring scorings[] = {{locmoe::score_function::softmax, true, false, "softmax before Top-k"},
                              {locmoe::score_function::softmax, true, true, "softmax before Top-k, renormalized"},
                              {locmoe::score_function::softmax, false, false, "softmax after Top-k"},
                              {locmoe::score_function::sigmoid, true, false, "sigmoid"}};
  int index = 0;
  for (const bool dense : {false, true})
    for (const scoring& s : scorings)
      for (const std::size_t k : {std::size_t{1}, std::size_t{2}, std::size_t{4}})
        for (const bool drops : {false, true}) f(layer_case{dense, s.score, s.before, s.renormalize, k, drops}, s.name, index++);
}

/// Sizes and parameters: T tokens of width d, n experts (each a d x d linear map), 2 ranks on 2 nodes.
struct layer_params {
  std::size_t tokens = 8, d = 8, n = 4;
  std::vector<double> x, gate_weight, gate_bias, expert_weight, upstream;  // [T d], [n d], [n], [n d d], [T d]
  std::vector<std::int32_t> token_rank;
  double aux = 0.1, z = 0.05, loc = 0.1;

  /// Empty: the caller sets the sizes and fills every vector (tests/torch/layer_driver.cpp reads them from .npy).
  layer_params() = default;
  explicit layer_params(std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    const auto fill = [&](std::vector<double>& v, std::size_t size, double scale, double shift) {
      v.resize(size);
      for (double& e : v) e = shift + scale * normal(rng);
    };
    fill(x, tokens * d, 1.0, 0.0);
    fill(gate_weight, n * d, 0.5, 0.0);
    fill(gate_bias, n, 0.3, 3.0);  // GrAP logits stay positive: ReLU's kink and zero-logit ties are avoided
    fill(expert_weight, n * d * d, 0.3, 0.0);
    fill(upstream, tokens * d, 1.0, 0.0);
    token_rank.resize(tokens);
    for (std::size_t t = 0; t < tokens; ++t) token_rank[t] = static_cast<std::int32_t>(2 * t / tokens);
  }
};

struct layer_gradients {
  double loss = 0;
  std::vector<double> x, gate_weight, gate_bias, expert_weight;
  std::vector<locmoe::expert_index> routed;  ///< the forward's choices (a finite difference must not change them)
};

/// The forward (and, with `backward`, every gradient) of the layer; see the header comment.
inline layer_gradients run_layer(const layer_params& p, const layer_case& c, bool backward) {
  using namespace locmoe;
  const std::size_t T = p.tokens, d = p.d, n = p.n, k = c.k;
  const topology topo = topology::uniform(2, 1, static_cast<std::int64_t>(n));
  std::vector<double> logits(T * n);
  const grap_gate<double> grap{d, n, true, p.gate_bias.data()};
  const dense_gate<double> dense{{p.gate_weight.data(), n, d}, p.gate_bias.data(), false};
  if (c.dense) {
    dense_logits(dense, matrix_view<const double>(p.x.data(), T, d), matrix_view<double>(logits.data(), T, n));
  } else {
    grap_logits(grap, matrix_view<const double>(p.x.data(), T, d), matrix_view<double>(logits.data(), T, n));
  }
  router_options<double> ro;
  ro.k = k;
  ro.score = c.score;
  ro.softmax_before_topk = c.softmax_before_topk;
  ro.renormalize = c.renormalize;
  std::vector<expert_index> indices(T * k);
  std::vector<double> weights(T * k);
  score_route(matrix_view<const double>(logits.data(), T, n), ro,
              route_outputs<double>{{indices.data(), T, k}, {weights.data(), T, k}, {}, {}});
  capacity_options co;
  if (c.drops) {
    co.capacity = static_cast<std::int64_t>(T * k / n);  // below the largest load unless perfectly balanced
  } else {
    co.drop = false;
  }
  capacity_assigner<double> assigner(n, co);
  std::vector<expert_index> expert(T * k);
  std::vector<slot_index> slot(T * k);
  std::vector<double> kept_weight(T * k);
  const assignment_stats stats =
      assigner.run(matrix_view<const expert_index>(indices.data(), T, k), matrix_view<const double>(weights.data(), T, k),
                   {{expert.data(), T, k}, {slot.data(), T, k}, {kept_weight.data(), T, k}}, {&topo, p.token_rank.data(), {}});
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), T, k),
                                                 matrix_view<const slot_index>(slot.data(), T, k), stats.capacity, topo,
                                                 p.token_rank.data());
  const std::size_t C = plan.capacity, rows = plan.buffer_rows();
  std::vector<double> in(rows * d), out(rows * d, 0.0), y(T * d);
  dispatch(plan, matrix_view<const double>(p.x.data(), T, d), matrix_view<double>(in.data(), rows, d));
  for (std::size_t e = 0; e < n; ++e)  // expert e: out_row = W_e in_row, W_e [d x d]
    for (std::size_t r = e * C; r < (e + 1) * C; ++r)
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) out[r * d + i] += p.expert_weight[(e * d + i) * d + j] * in[r * d + j];
  combine(plan, matrix_view<const double>(out.data(), rows, d), matrix_view<const double>(kept_weight.data(), T, k),
          matrix_view<double>(y.data(), T, d));
  router_loss_options<double> lo;
  lo.aux.coeff = p.aux;
  lo.aux.score = c.score;
  lo.z_coeff = p.z;
  lo.locality.coeff = p.loc;
  lo.locality.topo = &topo;
  lo.locality.token_rank = p.token_rank.data();
  const loss_inputs<double> li{matrix_view<const double>(logits.data(), T, n), matrix_view<const expert_index>(indices.data(), T, k), {}};
  layer_gradients g;
  g.routed = indices;
  const router_loss_values<double> values = router_losses(li, lo);
  g.loss = values.aux.value + values.z.value + values.locality.value;
  for (std::size_t i = 0; i < T * d; ++i) g.loss += y[i] * p.upstream[i];
  if (!backward) return g;

  std::vector<double> grad_out(rows * d), grad_weight(T * k), grad_in(rows * d, 0.0), grad_logits(T * n, 0.0);
  combine_backward(plan, matrix_view<const double>(out.data(), rows, d), matrix_view<const double>(kept_weight.data(), T, k),
                   matrix_view<const double>(p.upstream.data(), T, d), matrix_view<double>(grad_out.data(), rows, d),
                   matrix_view<double>(grad_weight.data(), T, k));
  g.expert_weight.assign(n * d * d, 0.0);
  for (std::size_t e = 0; e < n; ++e)
    for (std::size_t r = e * C; r < (e + 1) * C; ++r)
      for (std::size_t i = 0; i < d; ++i)
        for (std::size_t j = 0; j < d; ++j) {
          grad_in[r * d + j] += p.expert_weight[(e * d + i) * d + j] * grad_out[r * d + i];
          g.expert_weight[(e * d + i) * d + j] += grad_out[r * d + i] * in[r * d + j];
        }
  g.x.assign(T * d, 0.0);
  dispatch_backward(plan, matrix_view<const double>(grad_in.data(), rows, d), matrix_view<double>(g.x.data(), T, d));
  route_backward(matrix_view<const double>(logits.data(), T, n), ro, matrix_view<const expert_index>(indices.data(), T, k),
                 matrix_view<const double>(grad_weight.data(), T, k), matrix_view<double>(grad_logits.data(), T, n));
  router_losses(li, lo, matrix_view<double>(grad_logits.data(), T, n));
  std::vector<double> gate_x(T * d);
  g.gate_bias.assign(n, 0.0);
  if (c.dense) {
    g.gate_weight.assign(n * d, 0.0);
    std::vector<double> workspace(dense_workspace_size<double>(d, n, true));
    dense_backward(dense, matrix_view<const double>(p.x.data(), T, d), matrix_view<const double>(logits.data(), T, n),
                   matrix_view<const double>(grad_logits.data(), T, n), matrix_view<double>(gate_x.data(), T, d),
                   matrix_view<double>(g.gate_weight.data(), n, d), g.gate_bias.data(), workspace.data(), workspace.size());
  } else {
    grap_backward(grap, matrix_view<const double>(logits.data(), T, n), matrix_view<const double>(grad_logits.data(), T, n),
                  matrix_view<double>(gate_x.data(), T, d), g.gate_bias.data());
  }
  for (std::size_t i = 0; i < T * d; ++i) g.x[i] += gate_x[i];
  return g;
}

}  // namespace locmoe_test
