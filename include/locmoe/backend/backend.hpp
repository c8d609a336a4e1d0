// locmoe/backend/backend.hpp - the device backend hook: what a backend provides, a compile-time check of it,
// and the router pipeline written once against it (CUB's algorithm/dispatch split, CUTLASS's plan-then-run).
//
// The backend concept. A backend B provides, on a const object b:
//   typename B::stream_type                   where work is queued (cpu_stream: runs before the call returns)
//   B::name                                   a static constexpr const char*
//   B::host_memory (optional)                 static constexpr bool: true when views are host memory
//   b.slot_workspace_size(T, n)               bytes assign_slots needs
//   b.route_grap(gate, x, options, out, s)    fused GrAP gate + softmax + Top-k (eq. 4, eq. 2), select.hpp's rules;
//                                             returns the invalid tokens
//   b.assign_slots(problem, ws, bytes, s)     position-policy capacity slots (slot_problem)
//   b.dispatch(pairs, x, buffer, s)           buffer[e C + slot] = x[t] for every kept pair
//   b.combine(pairs, buffer, weight, y, s)    y[t] = sum over t's kept choices, in choice order, of w * row
//   b.combine_backward(pairs, buffer, weight, grad_y, grad_buffer, grad_weight, s)
//                                             dL/d(buffer) = w grad_y[t] at kept rows, 0 on padding rows;
//                                             dL/d(weight) = grad_y[t] . row (0 for a dropped pair)
//   b.dispatch_backward(pairs, grad_buffer, grad_x, s)
//                                             grad_x[t] = sum over t's kept rows, in choice order
// with the argument types of cpu_backend (backend/cpu.hpp), the reference model. grap_pipeline<B> checks the
// concept at compile time (static_assert, "... is not a locmoe backend ..."). A new backend (an NPU, say)
// implements these members; no change to the library: examples/counting_backend.cpp is one in a few dozen lines.
//
// grap_pipeline<B>: one MoE layer's router side for GrAP + Top-k + position capacity.
//   plan:  grap_pipeline(backend, shape) checks the shape; workspace_size() gives the bytes run() needs.
//   run:   route (indices, weights, probabilities) -> slots (expert, slot, counts) -> dispatch into the buffer;
//          no allocation, on the caller's stream. combine() after the experts ran.
// Results are those of the single-threaded calls (grap_route, capacity_assigner with drop_policy::position,
// dispatch, combine) bit for bit, on every backend where the arithmetic is the same.
// Thread safety: a grap_pipeline holds its shape and backend only; run() writes the caller's workspace and outputs, so
// one pipeline may serve several threads with their own workspaces (on the CPU backend they serialize on its pool).
// Example: docs/api.md#device-backends.
#pragma once

#include <locmoe/dispatch.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/select.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

namespace locmoe {

/// What assign_slots reads and writes: choices [T x k] in, the kept expert/slot [T x k] (-1/-1 dropped) and
/// the per-expert counts [n] (before and after capacity) out.
struct slot_problem {
  matrix_view<const expert_index> indices;
  matrix_view<expert_index> expert;
  matrix_view<slot_index> slot;
  std::int64_t* tokens_per_expert = nullptr;  ///< [n], required
  std::int64_t* kept_per_expert = nullptr;    ///< [n], required
  std::size_t experts = 0;
  std::int64_t capacity = 0;
  /// The caller vouches that every index is in [-1, n) (grap_pipeline passes its own route's choices): the
  /// backends skip their index check (O(T k) on the CPU; the CUDA backend's wait under device_checks::synchronous).
  bool indices_in_range = false;
};

namespace detail {

/// slot_problem's rules that host values decide, in the CPU backend's words (every rule but the indices' values,
/// which only a device backend's memory holds); `needed`: the backend's slot_workspace_size. Throws locmoe::error.
inline void check_slot_shapes(const char* fn, const slot_problem& p, std::size_t workspace_bytes, std::size_t needed) {
  using P = construction_policy;
  const std::size_t tokens = p.indices.rows, k = p.indices.cols, n = p.experts;
  check_selection<P>(fn, n, k, true);
  check_view<P>(fn, "indices", p.indices, tokens, k, "");
  check_view<P>(fn, "expert", p.expert, tokens, k, "must be [T x k], as indices");
  check_view<P>(fn, "slot", p.slot, tokens, k, "must be [T x k], as indices");
  if (!p.tokens_per_expert) raise<P>(errc::domain, fn, "tokens_per_expert", "null", "is required ([n])", 0);
  if (!p.kept_per_expert) raise<P>(errc::domain, fn, "kept_per_expert", "null", "is required ([n])", 0);
  if (p.capacity < 0 || p.capacity > std::numeric_limits<slot_index>::max()) {
    raise<P>(errc::domain, fn, "capacity", p.capacity, "must satisfy 0 <= C < 2^31", 0);
  }
  if (workspace_bytes < needed) {
    raise<P>(errc::domain, fn, "workspace_bytes", workspace_bytes, "must be >= slot_workspace_size(T, n)", 0);
  }
}

/// The rule of an index check: the message both backends give for the first choice outside [-1, n).
inline void raise_bad_index(const char* fn, std::size_t t, std::size_t j, expert_index e) {
  raise<construction_policy>(errc::domain, fn, "indices",
                             "(" + std::to_string(t) + ", " + std::to_string(j) + ") = " + std::to_string(e),
                             "every choice must be in [-1, n)", 0);
}

template <class B, class = void>
struct has_backend_members : std::false_type {};

template <class B>
struct has_backend_members<
    B, std::enable_if_t<std::is_default_constructible_v<typename B::stream_type> &&
                        std::is_convertible_v<decltype(B::name), const char*> &&
                        std::is_convertible_v<decltype(std::declval<const B&>().slot_workspace_size(std::size_t{}, std::size_t{})),
                                              std::size_t> &&
                        std::is_convertible_v<decltype(std::declval<const B&>().route_grap(
                                                  std::declval<const grap_gate<float>&>(),
                                                  std::declval<const matrix_view<const float>&>(),
                                                  std::declval<const select_options&>(),
                                                  std::declval<const route_outputs<float>&>(),
                                                  std::declval<typename B::stream_type>())),
                                              std::size_t>,
                        std::void_t<decltype(std::declval<const B&>().route_grap(
                       std::declval<const grap_gate<float>&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const select_options&>(), std::declval<const route_outputs<float>&>(),
                       std::declval<typename B::stream_type>())),
                   decltype(std::declval<const B&>().assign_slots(std::declval<const slot_problem&>(),
                                                                  std::declval<void*>(), std::size_t{},
                                                                  std::declval<typename B::stream_type>())),
                   decltype(std::declval<const B&>().dispatch(
                       std::declval<const pair_layout&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const matrix_view<float>&>(), std::declval<typename B::stream_type>())),
                   decltype(std::declval<const B&>().combine(
                       std::declval<const pair_layout&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const matrix_view<const float>&>(), std::declval<const matrix_view<float>&>(),
                       std::declval<typename B::stream_type>())),
                   decltype(std::declval<const B&>().combine_backward(
                       std::declval<const pair_layout&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const matrix_view<const float>&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const matrix_view<float>&>(), std::declval<const matrix_view<float>&>(),
                       std::declval<typename B::stream_type>())),
                   decltype(std::declval<const B&>().dispatch_backward(
                       std::declval<const pair_layout&>(), std::declval<const matrix_view<const float>&>(),
                       std::declval<const matrix_view<float>&>(), std::declval<typename B::stream_type>()))>>>
    : std::true_type {};

}  // namespace detail

/// Whether B models the backend concept (see the header comment).
template <class B>
inline constexpr bool is_backend_v = detail::has_backend_members<B>::value;

namespace detail {
template <class B, class = void>
struct host_memory_of : std::false_type {};
template <class B>
struct host_memory_of<B, std::void_t<decltype(B::host_memory)>> : std::bool_constant<B::host_memory> {};
}  // namespace detail

/// Whether B's views are host memory (ours): a backend says so with `static constexpr bool host_memory = true`;
/// without it, its memory counts as a device's. moe_router needs it (its host steps read the backend's buffers).
template <class B>
inline constexpr bool uses_host_memory_v = detail::host_memory_of<B>::value;

/// The sizes of one layer: T tokens of width d, n experts, k choices each, C slots per expert.
struct router_shape {
  std::size_t tokens = 0, hidden = 0, experts = 0, top_k = 1;
  std::int64_t capacity = 0;
};

/// What grap_pipeline::run writes; every view [T x k] (probabilities [T x n], optional), counts [n].
template <class S = float>
struct pipeline_outputs {
  matrix_view<expert_index> indices;
  matrix_view<S> weights;
  matrix_view<S> probabilities;
  matrix_view<expert_index> expert;
  matrix_view<slot_index> slot;
  std::int64_t* tokens_per_expert = nullptr;
  std::int64_t* kept_per_expert = nullptr;
};

template <class Backend>
class grap_pipeline {
  static_assert(is_backend_v<Backend>,
                "locmoe: this type is not a locmoe backend: it must provide stream_type, name, slot_workspace_size, "
                "route_grap, assign_slots, dispatch, combine, combine_backward and dispatch_backward with "
                "cpu_backend's signatures (see "
                "locmoe/backend/backend.hpp)");

 public:
  using stream_type = typename Backend::stream_type;

  /// Plans a layer: checks the shape (n <= d, 1 <= k <= n, 0 <= C < 2^31, T k < 2^31); throws locmoe::error.
  grap_pipeline(const Backend&&, const router_shape&) = delete;  // it keeps a reference to the backend
  grap_pipeline(const Backend& backend, const router_shape& shape) : backend_(backend), shape_(shape) {
    constexpr const char* fn = "locmoe::grap_pipeline";
    using P = construction_policy;
    if (shape.experts < 1 || shape.experts > shape.hidden) {
      detail::raise<P>(errc::domain, fn, "shape.experts", shape.experts, "must satisfy 1 <= n <= d (GrAP blocks)", 0);
    }
    detail::check_selection<P>(fn, shape.experts, shape.top_k, true);
    if (shape.capacity < 0 || shape.capacity > std::numeric_limits<slot_index>::max()) {
      detail::raise<P>(errc::domain, fn, "shape.capacity", shape.capacity, "must satisfy 0 <= C < 2^31", 0);
    }
    if (shape.tokens > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) / shape.top_k) {
      detail::raise<P>(errc::overflow, fn, "shape.tokens", shape.tokens, "T k must be < 2^31", 0);
    }
  }

  const router_shape& shape() const noexcept { return shape_; }
  /// Bytes of workspace run() needs.
  std::size_t workspace_size() const { return backend_.slot_workspace_size(shape_.tokens, shape_.experts); }
  /// Rows of the expert buffer: n C.
  std::size_t buffer_rows() const noexcept { return shape_.experts * static_cast<std::size_t>(shape_.capacity); }

  /// Route x [T x d] through the GrAP gate, assign slots, gather into buffer [n C x d]. Returns what the
  /// backend's route_grap returns: the invalid tokens on the CPU; 0 on the CUDA backend, which does not count
  /// them on the host (an invalid token's first index is -1 on every backend).
  template <class T>
  std::size_t run(const grap_gate<float>& gate, const matrix_view<const T>& x, const pipeline_outputs<float>& out,
                  const matrix_view<T>& buffer, void* workspace, std::size_t workspace_bytes, stream_type stream = {}) const {
    constexpr const char* fn = "locmoe::grap_pipeline::run";
    const std::size_t T_ = shape_.tokens, k = shape_.top_k;
    if (gate.hidden != shape_.hidden || gate.experts != shape_.experts) {
      detail::raise<construction_policy>(errc::domain, fn, "gate", detail::shape_text(gate.hidden, gate.experts),
                                    "must have the planned d and n", 0);
    }
    detail::check_view<construction_policy>(fn, "x", x, T_, shape_.hidden, "must be [T x d] as planned");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer_rows(), shape_.hidden, "must be [n C x d] as planned");
    pairs(out);  // checks the outputs' layout before anything is written
    const std::size_t invalid = backend_.route_grap(gate, x, select_options{k, false},
                                                    route_outputs<float>{out.indices, out.weights, out.probabilities, {}},
                                                    stream);
    backend_.assign_slots(slot_problem{matrix_view<const expert_index>(out.indices.data, T_, k, out.indices.stride),
                                       out.expert, out.slot, out.tokens_per_expert, out.kept_per_expert,
                                       shape_.experts, shape_.capacity, /*indices_in_range=*/true},
                          workspace, workspace_bytes, stream);
    backend_.dispatch(pairs(out), x, buffer, stream);
    return invalid;
  }

  /// y [T x d] = each token's kept rows of buffer weighted by out.weights, in choice order.
  template <class T>
  void combine(const pipeline_outputs<float>& out, const matrix_view<const T>& buffer, const matrix_view<T>& y,
               stream_type stream = {}) const {
    constexpr const char* fn = "locmoe::grap_pipeline::combine";
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer_rows(), shape_.hidden, "must be [n C x d] as planned");
    detail::check_view<construction_policy>(fn, "y", y, shape_.tokens, shape_.hidden, "must be [T x d] as planned");
    backend_.combine(pairs(out),  buffer,
                     matrix_view<const float>(out.weights.data, shape_.tokens, shape_.top_k, out.weights.stride), y, stream);
  }

 private:
  pair_layout pairs(const pipeline_outputs<float>& out) const {
    if (out.expert.stride != shape_.top_k || out.slot.stride != shape_.top_k) {
      detail::raise<construction_policy>(errc::domain, "locmoe::grap_pipeline", "out.expert/out.slot", out.expert.stride,
                                    "must be dense [T x k] (stride k)", 0);
    }
    pair_layout pairs{out.expert.data, out.slot.data, shape_.tokens, shape_.top_k, static_cast<std::size_t>(shape_.capacity)};
    pairs.kept_per_expert = out.kept_per_expert;  // padding rows are written as zeros
    pairs.experts = shape_.experts;
    return pairs;
  }

  const Backend& backend_;
  router_shape shape_;
};

}  // namespace locmoe
