// locmoe/router.hpp - one MoE layer's router as one object: built once from named options, then forward and
// backward every step on this rank's tokens (CUTLASS's plan-then-run; ../DESIGN.md "A training step").
//
// A step on rank r of an expert-parallel group, tokens x [T x d] (T may change from step to step):
//   forward(x, gate)             gate -> logits [T x n] -> selection (routers.hpp's score_route rules, or the fused
//                                grap_route / dense_route when softmax before Top-k) -> capacity (assign.hpp) ->
//                                the buffer layout -> loss values (aux, z, locality with this rank's identity) and
//                                their gradient w.r.t. the logits, kept for backward. Returns `routing`: named views
//                                of the choices, kept experts, slots, combine weights, counts, statistics, losses.
//   dispatch(x, buffer)          x's rows into the experts' buffer (capacity layout [n C x d], or grouped [rows x d]),
//                                padding rows zero.
//   ... the trainer's experts (and, across ranks, its exchange) ...
//   combine(out, y)              y_t = sum_j w_tj out[row_tj], in choice order.
//   combine_backward(out, dy, d_out)   dL/d(out) = w dL/dy at each kept row (zeros on padding); dL/dw kept inside.
//   dispatch_backward(d_in, dx)  dL/dx = sum of the token's kept rows of dL/d(buffer).
//   backward(x, gate, dx, dgate) dL/dw -> dL/d(logits) (route_backward.hpp, the chosen set fixed) + the losses'
//                                gradient -> the gate's backward: dL/dx is *added* into dx (each element summed in
//                                accumulate_t and rounded once), dL/d(gate weight, bias) are *set*.
// Capacity (capacity_rule): factor (C = max(min_capacity, ceil(T k cf / n)) from this rank's T, as DeepSpeed and
// Megatron-Core), fixed, critical_bound (capacity.hpp's critical_capacity(d, n, delta): the paper's Theorem 1),
// dropless (C = the largest load; with the grouped layout no row is wasted). global_capacity: one capacity for
// all ranks' tokens, the shares agreed from exchanged counts (route(), then assign(counts of every rank); assign.hpp
// global_capacity_shares). Layout: capacity ([n C x d]) or grouped (expert e's rows [offset_e, offset_e+1),
// rounded up to group_multiple).
// Determinism and invariance: a token's routing and output depend on other tokens only through capacity (tested
// by permuting and splitting batches); the same input gives the same bits.
// Preconditions (checked at construction; locmoe::error names the field): 1 <= n <= max_experts, n <= d for GrAP,
// 1 <= k <= n, capacity parameters as assign.hpp, 0 < locality_smoothing <= 1, rank in [0, R), a topology with n
// experts; local_overflow only with softmax before Top-k without renormalization (a rerouted choice's weight is its
// probability). Per call: shapes as planned (errors name the argument).
// Memory: every [T x ...] buffer, the selection's and the losses' scratch are owned and reused: a step at a shape
// seen before allocates nothing, but for the dense gate's Eigen GEMM blocking buffers at large d (gating.hpp)
// (tests/test_router_allocations.cpp counts every operator new and Eigen's heap allocations).
// Backend: the route, dispatch, combine and their backwards run on `Backend` (cpu_backend's threads); the
// selection's backward, the losses and the gate's backward run on the host, so the backend must say its memory is
// the host's (Backend::host_memory, checked at compile time: cuda_backend is refused; a device router is not
// written yet).
// Thread safety: a moe_router keeps its step's state and workspaces: one router per thread (or per layer), never
// shared. Routers that share one cpu_backend (and so one thread_pool) serialize their parallel passes.
// Example: docs/api.md#a-training-step.
#pragma once

#include <locmoe/assign.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/capacity.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace locmoe {

enum class gate_type { grap, dense };
/// The gate's activation: standard is the paper's ReLU for GrAP and none for a dense gate (Switch).
enum class gate_activation { standard, relu, none };
enum class capacity_rule { factor, fixed, critical_bound, dropless };
enum class buffer_layout { capacity, grouped };

struct moe_router_options {
  // The gate.
  gate_type gate = gate_type::grap;
  std::size_t hidden = 0;   ///< d
  std::size_t experts = 0;  ///< n
  gate_activation activation = gate_activation::standard;
  // Selection (routers.hpp).
  std::size_t top_k = 1;
  score_function score = score_function::softmax;
  bool softmax_before_topk = true;  ///< false: Top-k on the logits, softmax over the chosen (Megatron-Core's default)
  bool renormalize = false;         ///< softmax before Top-k: weights divided by their sum over the chosen
  double scale = 1;                 ///< multiplies every weight
  // Capacity (assign.hpp).
  capacity_rule capacity = capacity_rule::factor;
  double capacity_factor = 1.0;
  std::int64_t min_capacity = 0;
  std::int64_t fixed_capacity = 0;  ///< capacity_rule::fixed
  double critical_delta = 0.03;     ///< capacity_rule::critical_bound: the paper's delta
  bool global_capacity = false;     ///< one capacity over all ranks' tokens: route(), then assign(counts)
  drop_policy policy = drop_policy::position;
  bool local_overflow = false;
  buffer_layout layout = buffer_layout::capacity;
  std::int64_t group_multiple = 1;  ///< grouped layout: rows per expert rounded up to this (8, 16, 128)
  // Losses (losses.hpp): a term is off when its coefficient is 0.
  double aux_coeff = 0.01;
  aux_normalization aux_norm = aux_normalization::all_choices;
  double z_coeff = 0;
  double locality_coeff = 0;  ///< needs a topology
  double locality_smoothing = 0.01;
  // Expert parallelism.
  const topology* topo = nullptr;  ///< null: one rank holding every expert
  std::int32_t rank = 0;           ///< this rank
};

/// The gate's parameters (caller memory): a dense gate's weight [n x d] and optional bias [n]; GrAP's bias only.
template <class Real>
struct gate_parameters {
  matrix_view<const Real> weight;
  const Real* bias = nullptr;
};
/// Where backward writes the gate's gradients (each optional; set, not accumulated).
template <class Real>
struct gate_gradients {
  matrix_view<Real> weight;
  Real* bias = nullptr;
};

/// What forward (or route + assign) produced: views into the router's own buffers, valid until the next call.
template <class Real>
struct routing {
  matrix_view<const expert_index> routed_expert;  ///< [T x k] the selection, before capacity (-1: none)
  matrix_view<const Real> routed_weight;          ///< [T x k]
  matrix_view<const expert_index> expert;         ///< [T x k] the expert each choice was kept at, -1 dropped
  matrix_view<const slot_index> slot;             ///< [T x k] its slot, -1 dropped
  matrix_view<const Real> weight;                 ///< [T x k] combine weights, 0 where dropped
  matrix_view<const Real> logits;                 ///< [T x n]
  matrix_view<const Real> probabilities;          ///< [T x n] the scores (softmax, or sigmoids)
  const std::int64_t* tokens_per_expert = nullptr;  ///< [n] routed choices per expert, before capacity
  const std::int64_t* kept_per_expert = nullptr;    ///< [n]
  const std::int64_t* expert_offset = nullptr;      ///< [n + 1] the grouped layout's rows; null for capacity
  std::int64_t capacity = 0;                        ///< C (the largest share under global capacity)
  std::size_t buffer_rows = 0;                      ///< rows of the experts' buffer
  std::size_t invalid_tokens = 0;                   ///< NaN/Inf or fully masked tokens (no expert, no gradient)
  assignment_stats stats;
  double aux_loss = 0, z_loss = 0, locality_loss = 0;
  pair_layout layout;  ///< what the backends read
};

template <class Backend = cpu_backend, class Real = float>
class moe_router {
  static_assert(is_backend_v<Backend>, "moe_router: Backend is not a locmoe backend (backend/backend.hpp)");
  static_assert(uses_host_memory_v<Backend>,
                "moe_router: the selection's backward, the losses and the gate's backward run on the host, so the "
                "backend's buffers must be host memory (Backend::host_memory); a device router is not written yet: "
                "use grap_pipeline<Backend> and the backend's dispatch/combine and backwards directly");

 public:
  moe_router(const Backend&&, const moe_router_options&) = delete;  // it keeps a reference to the backend
  moe_router(const Backend& backend, const moe_router_options& options)
      : backend_(backend), o_(options), assigner_(options.experts, assignment_options(options)) {
    check_options();
    scratch_ = std::make_unique<route_scratch<Real>>(selection(), o_.experts);
  }

  const moe_router_options& options() const noexcept { return o_; }
  /// The last step's routing.
  const routing<Real>& last() const noexcept { return r_; }

  /// Route and assign (per-rank capacity); see the header comment.
  template <class T>
  const routing<Real>& forward(const matrix_view<const T>& x, const gate_parameters<Real>& gate) {
    if (o_.global_capacity) {
      detail::raise<construction_policy>(errc::domain, "locmoe::moe_router::forward", "global_capacity", "true",
                                    "with a global capacity call route(), exchange the counts, then assign(counts)", 0);
    }
    route(x, gate);
    return assign();
  }

  /// The first half of a step: gate, selection, loss values and gradients; no capacity yet. r_.tokens_per_expert
  /// holds the n counts a global capacity exchanges.
  template <class T>
  const routing<Real>& route(const matrix_view<const T>& x, const gate_parameters<Real>& gate) {
    constexpr const char* fn = "locmoe::moe_router::route";
    const std::size_t tokens = x.rows, n = o_.experts, k = o_.top_k, d = o_.hidden;
    detail::check_view<construction_policy>(fn, "x", x, tokens, d, "must have options.hidden columns (d)");
    check_gate(fn, gate);
    resize(tokens);
    const matrix_view<Real> logits(logits_.data(), tokens, n), probs(probs_.data(), tokens, n);
    const matrix_view<expert_index> indices(routed_.data(), tokens, k);
    const matrix_view<Real> weights(routed_weight_.data(), tokens, k);
    const route_outputs<Real> out{indices, weights, probs, logits};
    const bool fused = o_.score == score_function::softmax && o_.softmax_before_topk && o_.scale == 1;
    const select_options so{k, o_.renormalize};
    if (o_.gate == gate_type::grap) {
      const grap_gate<Real> g = grap(gate);
      if (fused) {
        invalid_ = backend_.route_grap(g, x, so, out);
      } else {
        grap_logits(g, x, logits, token_range{}, construction_policy{});
      }
    } else {
      const dense_gate<Real> g = dense(gate);
      if (fused) {
        invalid_ = backend_.route_dense(g, x, so, out, workspace_.data(), workspace_.size() * sizeof(Real));
      } else {
        dense_logits(g, x, logits, token_range{}, workspace_.data(), workspace_.size(), construction_policy{});
      }
    }
    if (!fused) invalid_ = score_route(matrix_view<const Real>(logits), selection(), out, {}, construction_policy{}, scratch_.get());
    count_routed(tokens);
    losses(tokens);
    r_.routed_expert = indices;
    r_.routed_weight = weights;
    r_.logits = logits;
    r_.probabilities = probs;
    r_.tokens_per_expert = routed_count_.data();
    r_.invalid_tokens = invalid_;
    r_.expert = {};
    r_.slot = {};
    r_.weight = {};
    r_.kept_per_expert = nullptr;
    assigned_ = false;
    return r_;
  }

  /// The second half: capacity slots and the layout. `all_counts` [R x n] (every rank's tokens_per_expert, in
  /// rank order) is required with global_capacity and ignored otherwise.
  const routing<Real>& assign(const std::int64_t* all_counts = nullptr) {
    constexpr const char* fn = "locmoe::moe_router::assign";
    const std::size_t tokens = tokens_, n = o_.experts, k = o_.top_k;
    assignment_context<Real> context;
    context.topo = o_.topo;
    context.token_rank = token_ranks::local(o_.rank);
    context.scores = matrix_view<const Real>(probs_.data(), tokens, n);
    if (o_.global_capacity) {
      if (!all_counts) detail::raise<construction_policy>(errc::domain, fn, "all_counts", "null", "required with global_capacity", 0);
      const std::size_t ranks = o_.topo ? o_.topo->ranks() : 1;
      std::int64_t routed_total = 0;
      for (std::size_t i = 0; i < ranks * n; ++i) routed_total += all_counts[i];
      global_capacity_shares(all_counts, ranks, n, global_capacity(routed_total), static_cast<std::size_t>(o_.rank),
                             share_.data());
      context.expert_capacity = share_.data();
    }
    r_.stats = assigner_.run(matrix_view<const expert_index>(routed_.data(), tokens, k),
                             matrix_view<const Real>(routed_weight_.data(), tokens, k),
                             {{expert_.data(), tokens, k}, {slot_.data(), tokens, k}, {weight_.data(), tokens, k},
                              routed_count_.data(), kept_count_.data()},
                             context);
    r_.capacity = r_.stats.capacity;
    pair_layout layout{expert_.data(), slot_.data(), tokens, k, static_cast<std::size_t>(r_.capacity)};
    layout.kept_per_expert = kept_count_.data();
    layout.experts = n;
    if (o_.layout == buffer_layout::grouped) {
      grouped_offsets(kept_count_.data(), n, o_.group_multiple, offsets_.data());
      layout.expert_offset = offsets_.data();
      layout.capacity = 0;
    }
    r_.layout = layout;
    r_.buffer_rows = layout.rows();
    r_.expert_offset = layout.expert_offset;
    r_.expert = matrix_view<const expert_index>(expert_.data(), tokens, k);
    r_.slot = matrix_view<const slot_index>(slot_.data(), tokens, k);
    r_.weight = matrix_view<const Real>(weight_.data(), tokens, k);
    r_.kept_per_expert = kept_count_.data();
    std::fill(grad_weight_.begin(), grad_weight_.begin() + static_cast<std::ptrdiff_t>(tokens * k), Real(0));
    assigned_ = true;
    return r_;
  }

  /// x [T x d] into the experts' buffer [buffer_rows x d]; padding rows zero.
  template <class T>
  void dispatch(const matrix_view<const T>& x, const matrix_view<T>& buffer) const {
    check_assigned("locmoe::moe_router::dispatch");
    check_rows("locmoe::moe_router::dispatch", "x", x, tokens_);
    check_rows("locmoe::moe_router::dispatch", "buffer", buffer, r_.buffer_rows);
    backend_.dispatch(r_.layout, x, buffer);
  }

  /// y [T x d] = each token's kept rows of `out` [buffer_rows x d], weighted, in choice order.
  template <class T>
  void combine(const matrix_view<const T>& out, const matrix_view<T>& y) const {
    check_assigned("locmoe::moe_router::combine");
    check_rows("locmoe::moe_router::combine", "out", out, r_.buffer_rows);
    check_rows("locmoe::moe_router::combine", "y", y, tokens_);
    backend_.combine(r_.layout, out, weights_view(), y);
  }

  /// From dL/dy: dL/d(out) into grad_out (optional) and dL/d(weights), which backward() uses.
  template <class T>
  void combine_backward(const matrix_view<const T>& out, const matrix_view<const T>& grad_y, const matrix_view<T>& grad_out) {
    constexpr const char* fn = "locmoe::moe_router::combine_backward";
    check_assigned(fn);
    check_rows(fn, "out", out, r_.buffer_rows);
    check_rows(fn, "grad_y", grad_y, tokens_);
    if (grad_out.present()) check_rows(fn, "grad_out", grad_out, r_.buffer_rows);
    backend_.combine_backward(r_.layout, out, weights_view(), grad_y, grad_out,
                              matrix_view<Real>(grad_weight_.data(), tokens_, o_.top_k));
  }

  /// dL/dx [T x d] (set) = the sum of each token's kept rows of grad_in [buffer_rows x d].
  template <class T>
  void dispatch_backward(const matrix_view<const T>& grad_in, const matrix_view<T>& grad_x) const {
    constexpr const char* fn = "locmoe::moe_router::dispatch_backward";
    check_assigned(fn);
    check_rows(fn, "grad_in", grad_in, r_.buffer_rows);
    check_rows(fn, "grad_x", grad_x, tokens_);
    backend_.dispatch_backward(r_.layout, grad_in, grad_x);
  }

  /// The router's backward from the dL/dw that combine_backward kept (see the header comment).
  template <class T>
  void backward(const matrix_view<const T>& x, const gate_parameters<Real>& gate, const matrix_view<T>& grad_x,
                const gate_gradients<Real>& grad_gate) {
    backward(x, gate, matrix_view<const Real>(grad_weight_.data(), tokens_, o_.top_k), grad_x, grad_gate);
  }

  /// The same from an explicit dL/d(combine weight) [T x k] (0 where dropped).
  template <class T>
  void backward(const matrix_view<const T>& x, const gate_parameters<Real>& gate, const matrix_view<const Real>& grad_weight,
                const matrix_view<T>& grad_x, const gate_gradients<Real>& grad_gate) {
    constexpr const char* fn = "locmoe::moe_router::backward";
    check_assigned(fn);
    const std::size_t tokens = tokens_, n = o_.experts, k = o_.top_k;
    check_rows(fn, "x", x, tokens);
    check_gate(fn, gate);
    detail::check_view<construction_policy>(fn, "grad_weight", grad_weight, tokens, k, "must be [T x k]");
    if (grad_x.present()) check_rows(fn, "grad_x", grad_x, tokens);
    // The chosen set of each weight: the routed experts, or where local overflow moved a choice, its new expert.
    for (std::size_t p = 0; p < tokens * k; ++p) choice_[p] = rerouted(p) ? expert_[p] : routed_[p];
    std::copy(grad_loss_.begin(), grad_loss_.begin() + static_cast<std::ptrdiff_t>(tokens * n), grad_logits_.begin());
    const matrix_view<Real> g(grad_logits_.data(), tokens, n);
    route_backward(matrix_view<const Real>(logits_.data(), tokens, n), selection(),
                   matrix_view<const expert_index>(choice_.data(), tokens, k), grad_weight, g, token_range{},
                   construction_policy{}, &backward_scratch_);
    gate_backward(x, gate, matrix_view<const Real>(g), grad_x, grad_gate);
  }

 private:
  static capacity_options assignment_options(const moe_router_options& o) {
    capacity_options c;
    c.capacity_factor = o.capacity_factor;
    c.min_capacity = o.min_capacity;
    c.drop = o.capacity != capacity_rule::dropless;
    c.policy = o.policy;
    c.local_overflow = o.local_overflow;
    if (o.capacity == capacity_rule::fixed) c.capacity = o.fixed_capacity;
    if (o.capacity == capacity_rule::critical_bound && o.experts >= 1 && o.hidden >= 2) {
      c.capacity = critical_capacity(static_cast<std::int64_t>(o.hidden), static_cast<std::int64_t>(o.experts), o.critical_delta);
    }
    return c;
  }

  void check_options() {
    constexpr const char* fn = "locmoe::moe_router";
    using P = construction_policy;
    const std::size_t n = o_.experts, d = o_.hidden;
    detail::check_selection<P>(fn, n, o_.top_k, true);
    if (d < 1) detail::raise<P>(errc::domain, fn, "hidden", d, "must be >= 1", 0);
    if (o_.gate == gate_type::grap && n > d) detail::raise<P>(errc::domain, fn, "experts", n, "must be <= hidden for GrAP", 0);
    if (!std::isfinite(o_.scale)) detail::raise<P>(errc::domain, fn, "scale", o_.scale, "must be finite", 0);
    if (!(std::isfinite(o_.capacity_factor) && o_.capacity_factor > 0)) {
      detail::raise<P>(errc::domain, fn, "capacity_factor", o_.capacity_factor, "must be finite and > 0", 0);
    }
    if (o_.min_capacity < 0) detail::raise<P>(errc::domain, fn, "min_capacity", o_.min_capacity, "must be >= 0", 0);
    if (o_.capacity == capacity_rule::fixed && (o_.fixed_capacity < 0 || o_.fixed_capacity > INT32_MAX)) {
      detail::raise<P>(errc::domain, fn, "fixed_capacity", o_.fixed_capacity, "must satisfy 0 <= C < 2^31", 0);
    }
    if (o_.capacity == capacity_rule::critical_bound) {
      if (d < 2) detail::raise<P>(errc::domain, fn, "hidden", d, "must be >= 2 for the critical bound", 0);
      critical_capacity(static_cast<std::int64_t>(d), static_cast<std::int64_t>(n), o_.critical_delta);  // checks delta
    }
    if (o_.group_multiple < 1) detail::raise<P>(errc::domain, fn, "group_multiple", o_.group_multiple, "must be >= 1", 0);
    for (const auto& [name, value] : {std::pair<const char*, double>{"aux_coeff", o_.aux_coeff},
                                      {"z_coeff", o_.z_coeff}, {"locality_coeff", o_.locality_coeff}}) {
      if (!std::isfinite(value)) detail::raise<P>(errc::domain, fn, name, value, "must be finite", 0);
    }
    if (!(o_.locality_smoothing > 0 && o_.locality_smoothing <= 1)) {
      detail::raise<P>(errc::domain, fn, "locality_smoothing", o_.locality_smoothing, "must satisfy 0 < eps <= 1", 0);
    }
    if (o_.locality_coeff != 0 && !o_.topo) {
      detail::raise<P>(errc::domain, fn, "topo", "null", "the locality loss needs a topology", 0);
    }
    if (o_.topo && o_.topo->experts() != n) detail::raise<P>(errc::domain, fn, "topo", o_.topo->experts(), "must place n experts", 0);
    const std::size_t ranks = o_.topo ? o_.topo->ranks() : 1;
    if (o_.rank < 0 || static_cast<std::size_t>(o_.rank) >= ranks) {
      detail::raise<P>(errc::domain, fn, "rank", o_.rank, "must be in [0, ranks)", 0);
    }
    if (o_.local_overflow && !(o_.score == score_function::softmax && o_.softmax_before_topk && !o_.renormalize)) {
      detail::raise<P>(errc::domain, fn, "local_overflow", "true",
                       "needs softmax before Top-k without renormalization (a moved choice's weight is its probability)", 0);
    }
    if (o_.global_capacity && o_.capacity == capacity_rule::dropless) {
      detail::raise<P>(errc::domain, fn, "global_capacity", "true", "needs a capacity (not dropless)", 0);
    }
  }

  router_options<Real> selection() const {
    router_options<Real> s;
    s.k = o_.top_k;
    s.score = o_.score;
    s.softmax_before_topk = o_.softmax_before_topk;
    s.renormalize = o_.renormalize;
    s.scale = static_cast<Real>(o_.scale);
    return s;
  }
  bool relu() const noexcept {
    return o_.activation == gate_activation::relu || (o_.activation == gate_activation::standard && o_.gate == gate_type::grap);
  }
  grap_gate<Real> grap(const gate_parameters<Real>& p) const { return {o_.hidden, o_.experts, relu(), p.bias}; }
  dense_gate<Real> dense(const gate_parameters<Real>& p) const { return {p.weight, p.bias, relu()}; }

  void check_gate(const char* fn, const gate_parameters<Real>& gate) const {
    if (o_.gate == gate_type::dense) {
      detail::check_view<construction_policy>(fn, "gate.weight", gate.weight, o_.experts, o_.hidden, "must be [n x d]");
    }
  }
  template <class T>
  static void check_rows(const char* fn, const char* argument, const matrix_view<T>& v, std::size_t rows) {
    detail::check_view<construction_policy>(fn, argument, v, rows, v.cols, "");
  }
  void check_assigned(const char* fn) const {
    if (!assigned_) detail::raise<construction_policy>(errc::domain, fn, "step", "routed only", "call assign() (or forward()) first", 0);
  }
  matrix_view<const Real> weights_view() const { return matrix_view<const Real>(weight_.data(), tokens_, o_.top_k); }
  bool rerouted(std::size_t p) const noexcept { return expert_[p] != no_expert && expert_[p] != routed_[p]; }

  std::int64_t global_capacity(std::int64_t routed_total) const {
    if (o_.capacity == capacity_rule::factor) {
      return classic_capacity(routed_total, o_.capacity_factor, 1, static_cast<std::int64_t>(o_.experts), o_.min_capacity,
                              construction_policy{});
    }
    return assignment_options(o_).capacity;
  }

  /// Buffers for T tokens: grown, never shrunk (no allocation at a size already seen).
  void resize(std::size_t tokens) {
    const std::size_t n = o_.experts, k = o_.top_k;
    tokens_ = tokens;
    const auto grow = [](auto& v, std::size_t size) {
      if (v.size() < size) v.resize(size);
    };
    grow(logits_, tokens * n);
    grow(probs_, tokens * n);
    grow(grad_loss_, tokens * n);
    grow(grad_logits_, tokens * n);
    grow(routed_, tokens * k);
    grow(choice_, tokens * k);
    grow(expert_, tokens * k);
    grow(slot_, tokens * k);
    grow(routed_weight_, tokens * k);
    grow(weight_, tokens * k);
    grow(grad_weight_, tokens * k);
    grow(routed_count_, n);
    grow(kept_count_, n);
    grow(share_, n);
    grow(offsets_, n + 1);
    grow(workspace_, o_.gate == gate_type::dense ? backend_workspace() : 0);
  }
  std::size_t backend_workspace() const {
    // dense_logits / dense_backward on the host, and the CPU backend's route_dense (one slice per thread).
    const std::size_t host = dense_workspace_size<bf16>(o_.hidden, o_.experts, true);
    return std::max(host, backend_.template route_workspace_size<bf16>(o_.hidden, o_.experts) / sizeof(Real));
  }

  void count_routed(std::size_t tokens) {
    std::fill(routed_count_.begin(), routed_count_.end(), 0);
    for (std::size_t p = 0; p < tokens * o_.top_k; ++p) {
      if (routed_[p] != no_expert) ++routed_count_[static_cast<std::size_t>(routed_[p])];
    }
  }

  /// The loss values and their gradient w.r.t. the logits (kept in grad_loss_ for backward). The losses read
  /// softmax(logits): the softmax routes wrote it; a sigmoid router's scores are replaced by it here.
  void losses(std::size_t tokens) {
    const std::size_t n = o_.experts, k = o_.top_k;
    std::fill(grad_loss_.begin(), grad_loss_.begin() + static_cast<std::ptrdiff_t>(tokens * n), Real(0));
    r_.aux_loss = r_.z_loss = r_.locality_loss = 0;
    const bool any = o_.aux_coeff != 0 || o_.z_coeff != 0 || o_.locality_coeff != 0;
    if (!any || tokens == 0) return;
    const matrix_view<const Real> logits(logits_.data(), tokens, n);
    matrix_view<const Real> softmax_probs(probs_.data(), tokens, n);
    if (o_.score == score_function::sigmoid) {
      grow_softmax(tokens);
      softmax(logits, matrix_view<Real>(softmax_.data(), tokens, n), token_range{}, construction_policy{});
      softmax_probs = matrix_view<const Real>(softmax_.data(), tokens, n);
    }
    router_loss_options<Real> lo;
    lo.aux.coeff = static_cast<Real>(o_.aux_coeff);
    lo.aux.normalization = o_.aux_norm;
    lo.aux.score = o_.score;
    lo.z_coeff = static_cast<Real>(o_.z_coeff);
    if (o_.locality_coeff != 0) {
      lo.locality.coeff = static_cast<Real>(o_.locality_coeff);
      lo.locality.smoothing = static_cast<Real>(o_.locality_smoothing);
      lo.locality.topo = o_.topo;
      lo.locality.token_rank = token_ranks::local(o_.rank);
    }
    const router_loss_values<Real> v =
        router_losses(loss_inputs<Real>{logits, matrix_view<const expert_index>(routed_.data(), tokens, k), softmax_probs}, lo,
                      matrix_view<Real>(grad_loss_.data(), tokens, n), construction_policy{}, &loss_scratch_);
    r_.aux_loss = static_cast<double>(v.aux.value);
    r_.z_loss = static_cast<double>(v.z.value);
    r_.locality_loss = static_cast<double>(v.locality.value);
  }
  void grow_softmax(std::size_t tokens) {
    if (softmax_.size() < tokens * o_.experts) softmax_.resize(tokens * o_.experts);
  }

  /// dL/dx += the gate's backward of g [T x n] (summed in Real, rounded once into T); the gate's gradients set.
  template <class T>
  void gate_backward(const matrix_view<const T>& x, const gate_parameters<Real>& gate, const matrix_view<const Real>& g,
                     const matrix_view<T>& grad_x, const gate_gradients<Real>& grad_gate) {
    const std::size_t tokens = tokens_, n = o_.experts, d = o_.hidden;
    const bool mask = relu();
    const auto masked = [&](std::size_t t, std::size_t i) {
      return mask && !(logits_[t * n + i] > Real(0)) ? Real(0) : g(t, i);
    };
    if (o_.gate == gate_type::grap) {
      if (grad_gate.bias) std::fill(grad_gate.bias, grad_gate.bias + n, Real(0));
      for (std::size_t t = 0; t < tokens; ++t) {
        T* out = grad_x.present() ? grad_x.row(t) : nullptr;
        for (std::size_t i = 0; i < n; ++i) {
          const Real gi = masked(t, i);
          if (grad_gate.bias) grad_gate.bias[i] += gi;
          if (!out) continue;
          const std::size_t begin = grap_block_begin(d, n, i), end = grap_block_begin(d, n, i + 1);
          const Real value = gi / static_cast<Real>(end - begin);
          for (std::size_t c = begin; c < end; ++c) out[c] = T(static_cast<Real>(out[c]) + value);
        }
      }
      return;
    }
    const dense_gate<Real> dg = dense(gate);
    if (grad_gate.weight.present() || grad_gate.bias) {
      dense_backward(dg, x, matrix_view<const Real>(logits_.data(), tokens, n), g, matrix_view<Real>{}, grad_gate.weight,
                     grad_gate.bias, workspace_.data(), workspace_.size(), token_range{}, construction_policy{});
    }
    if (!grad_x.present()) return;
    // grad_x += (masked g) W, in chunks of dense_chunk_rows rows through Eigen's GEMM.
    const auto W = detail::rows_map<Real>(gate.weight, 0, n);
    grow_chunk();
    for (std::size_t row0 = 0; row0 < tokens; row0 += dense_chunk_rows) {
      const std::size_t rows = std::min(dense_chunk_rows, tokens - row0);
      detail::mutable_map<Real> G(chunk_.data(), static_cast<Eigen::Index>(rows), static_cast<Eigen::Index>(n),
                                  Eigen::OuterStride<>(static_cast<Eigen::Index>(n)));
      for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t i = 0; i < n; ++i) G(static_cast<Eigen::Index>(r), static_cast<Eigen::Index>(i)) = masked(row0 + r, i);
      detail::mutable_map<Real> X(chunk_.data() + dense_chunk_rows * n, static_cast<Eigen::Index>(rows),
                                  static_cast<Eigen::Index>(d), Eigen::OuterStride<>(static_cast<Eigen::Index>(d)));
      X.noalias() = G * W;
      for (std::size_t r = 0; r < rows; ++r) {
        T* out = grad_x.row(row0 + r);
        const Real* add = chunk_.data() + dense_chunk_rows * n + r * d;
        for (std::size_t c = 0; c < d; ++c) out[c] = T(static_cast<Real>(out[c]) + add[c]);
      }
    }
  }
  void grow_chunk() {
    const std::size_t size = dense_chunk_rows * (o_.experts + o_.hidden);
    if (chunk_.size() < size) chunk_.resize(size);
  }

  const Backend& backend_;
  moe_router_options o_;
  capacity_assigner<Real> assigner_;
  std::unique_ptr<route_scratch<Real>> scratch_;  // the selection's per-token scratch, built once
  loss_workspace<Real> loss_scratch_;              // the losses' scratch, grown once per shape
  route_backward_workspace backward_scratch_;      // the selection backward's scratch
  routing<Real> r_;
  std::size_t tokens_ = 0, invalid_ = 0;
  bool assigned_ = false;
  std::vector<Real> logits_, probs_, softmax_, grad_loss_, grad_logits_, routed_weight_, weight_, grad_weight_, workspace_,
      chunk_;
  std::vector<expert_index> routed_, choice_, expert_;
  std::vector<slot_index> slot_;
  std::vector<std::int64_t> routed_count_, kept_count_, share_, offsets_;
};

}  // namespace locmoe
