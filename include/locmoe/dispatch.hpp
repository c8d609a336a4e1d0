// locmoe/dispatch.hpp - from an assignment to the exchange: who sends which rows to whom, and the CPU
// dispatch (gather into expert buffers) and combine (weighted scatter-add back to the tokens).
//
// Input: the kept choices of capacity_assigner (expert[T x k], slot[T x k], -1 where dropped), the topology,
// and each token's source rank (topology.hpp's token_ranks: this rank's tokens, each token's, or contiguous blocks).
// Expert buffers: expert e's kept rows occupy rows [e C, e C + C) of a [n C x d] buffer, row e C + slot.
// The plan holds
//   - send_tokens[src][dst]: kept choices whose token lives on rank src and whose expert on rank dst
//     (row-major [R x R]), and the same in bytes for a token of `token_bytes`;
//   - intra_rank, intra_node and inter_node totals (tokens): the traffic that stays on the device, crosses
//     the intra-node links, and crosses the inter-node network;
//   - order: every kept (token, choice) pair as t k + j, sorted by (source rank, destination rank, expert,
//     slot): the packing order of each source rank's send buffer for an All-to-All (one contiguous range per
//     destination, send_offset[src R + dst] to send_offset[src R + dst + 1]), expert-major inside a range, and so
//     also the receive order of each expert.
// dispatch(x -> buffer) copies row x[t] to buffer[e C + slot] for each kept pair (rows of unused slots are
// written as zeros); combine(buffer -> y) sets y[t] = sum_j weight[t][j] buffer[e_tj C + slot_tj] over t's kept
// choices (0 for a token with none), summing in choice order: deterministic. Their backwards:
// combine_backward (dL/dy -> dL/d(buffer), the weighted gather, and dL/d(weight), the row dot products) and
// dispatch_backward (dL/d(buffer) -> dL/dx, the unweighted sum back to the tokens); dropped pairs and padding
// rows carry no gradient. detail/rows.hpp holds the row copies, detail/row_kernels.hpp the SIMD kernels of combine
// and the backwards (runtime-dispatched with the gate's kernels); the CPU backend runs the same ones on its threads.
// Preconditions (checked; errors name the argument): shapes agree; experts in [-1, n), slots in [-1, C) and
// -1 together; no two pairs on one (expert, slot); token ranks in [0, R); token_bytes * counts fit int64.
// Cost: building O(T k + n C + R^2) time and memory (a counting sort); dispatch and combine one pass over the
// rows they read and write. Speed (docs/benchmarks.md#dispatch-and-combine): the rows read are scattered, so the
// hardware prefetcher starts over at each one; combine, and dispatch when it streams, prefetch 4 KiB ahead, on
// into the next row. A call that writes at least LOCMOE_STREAMING_STORE_BYTES (default 32 MiB, more than a
// last-level cache keeps) writes with x86 non-temporal stores, which skip reading each destination line first,
// as glibc's memcpy does for large copies; a smaller call writes plainly and leaves its output in cache. No path
// changes a value: combine does the same operations in the same order on all of them.
// Thread safety: a dispatch_plan is immutable once built and may be shared: dispatch, combine and their backwards
// only read it, so threads may call them on one plan concurrently with disjoint outputs.
// Example: docs/api.md#dispatch-plans.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/detail/kernels.hpp>
#include <locmoe/detail/rows.hpp>
#include <locmoe/error.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace locmoe {

struct dispatch_plan {
  std::size_t ranks = 0, experts = 0, capacity = 0, top_k = 0, tokens = 0;
  std::vector<std::int64_t> send_tokens;  ///< [R x R], source-major
  std::vector<std::int64_t> send_bytes;   ///< [R x R], send_tokens * token_bytes
  std::int64_t intra_rank = 0, intra_node = 0, inter_node = 0;  ///< kept choices by where they travel
  std::vector<std::int64_t> order;        ///< kept pairs t k + j, by (source rank, destination rank, expert, slot)
  std::vector<std::int64_t> send_offset;  ///< [R x R + 1]: src -> dst pairs are order[send_offset[src R + dst]]
                                          ///< up to order[send_offset[src R + dst + 1]], exclusive
  std::vector<expert_index> expert;       ///< [T x k] copy of the assignment's experts (-1: dropped)
  std::vector<slot_index> slot;           ///< [T x k] copy of its slots
  std::vector<std::int64_t> kept_per_expert;  ///< [n] kept pairs of each expert
  std::vector<std::int32_t> pair_of_row;      ///< [n C] the kept pair t k + j on each buffer row, -1: padding

  std::int64_t sent(std::size_t source, std::size_t destination) const { return send_tokens.at(source * ranks + destination); }
  /// Rows of the [n C x d] expert buffer.
  std::size_t buffer_rows() const noexcept { return experts * capacity; }
};

/// Builds the plan of an assignment (see the header comment); throws locmoe::error on bad arguments.
inline dispatch_plan build_dispatch_plan(const matrix_view<const expert_index>& expert,
                                         const matrix_view<const slot_index>& slot, std::int64_t capacity,
                                         const topology& topo, token_ranks token_rank = {},
                                         std::int64_t token_bytes = 0) {
  constexpr const char* fn = "locmoe::build_dispatch_plan";
  using P = construction_policy;
  const std::size_t tokens = expert.rows, k = expert.cols, n = topo.experts(), ranks = topo.ranks();
  if (k < 1) detail::raise<P>(errc::domain, fn, "expert", detail::shape_text(tokens, k), "must have k >= 1 columns", 0);
  detail::check_view<P>(fn, "expert", expert, tokens, k, "");
  detail::check_view<P>(fn, "slot", slot, tokens, k, "must have as many columns as expert (k)");
  if (capacity < 0 || capacity > std::numeric_limits<slot_index>::max()) {
    detail::raise<P>(errc::domain, fn, "capacity", capacity, "must satisfy 0 <= C < 2^31", 0);
  }
  if (token_bytes < 0) detail::raise<P>(errc::domain, fn, "token_bytes", token_bytes, "must be >= 0", 0);
  if (tokens > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) / k) {
    detail::raise<P>(errc::overflow, fn, "expert", detail::shape_text(tokens, k), "T k must be < 2^31", 0);
  }
  dispatch_plan plan;
  plan.ranks = ranks;
  plan.experts = n;
  plan.capacity = static_cast<std::size_t>(capacity);
  plan.top_k = k;
  plan.tokens = tokens;
  plan.send_tokens.assign(ranks * ranks, 0);
  plan.expert.resize(tokens * k);
  plan.slot.resize(tokens * k);
  detail::rank_map source;
  detail::resolve_token_ranks<P>(fn, "token_rank", token_rank, tokens, ranks, source);
  const std::vector<std::int32_t>& rank_of_expert = topo.rank_of_expert_map();
  const std::vector<std::int32_t>& node_of_rank = topo.node_of_rank_map();
  // pair_at[e C + s]: the kept pair t k + j on (expert e, slot s), -1 while free (T k < 2^31, checked above).
  std::vector<std::int32_t> pair_at(n * plan.capacity, -1);
  for (std::size_t t = 0; t < tokens; ++t) {
    const std::size_t src = source.rank(t);
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = expert(t, j);
      const slot_index s = slot(t, j);
      plan.expert[t * k + j] = e;
      plan.slot[t * k + j] = s;
      if (e == no_expert && s == -1) continue;
      const auto where = [&] { return "(" + std::to_string(t) + ", " + std::to_string(j) + ")"; };
      if (e < 0 || static_cast<std::size_t>(e) >= n || s < 0 || static_cast<std::size_t>(s) >= plan.capacity) {
        detail::raise<P>(errc::domain, fn, "expert/slot", where() + " = " + std::to_string(e) + "/" + std::to_string(s),
                         "a kept choice needs an expert in [0, n) and a slot in [0, C); a dropped one -1/-1", 0);
      }
      std::int32_t& pair = pair_at[static_cast<std::size_t>(e) * plan.capacity + static_cast<std::size_t>(s)];
      if (pair >= 0) {
        detail::raise<P>(errc::domain, fn, "slot", where() + " = " + std::to_string(s),
                         "two choices share one (expert, slot)", 0);
      }
      pair = static_cast<std::int32_t>(t * k + j);
      const auto dst = static_cast<std::size_t>(rank_of_expert[static_cast<std::size_t>(e)]);
      ++plan.send_tokens[src * ranks + dst];
      if (dst == src) {
        ++plan.intra_rank;
      } else if (node_of_rank[dst] == node_of_rank[src]) {
        ++plan.intra_node;
      } else {
        ++plan.inter_node;
      }
    }
  }
  plan.kept_per_expert.assign(n, 0);
  for (std::size_t row = 0; row < pair_at.size(); ++row) plan.kept_per_expert[row / plan.capacity] += pair_at[row] >= 0;
  // Order by (source rank, destination rank, expert, slot): buffer rows e C + s ascending are (expert, slot)
  // ascending, so one walk over the rows, each pair appended to its (source, destination) range, sorts them (a
  // counting sort). send_offset[src R + dst] is where that range starts.
  plan.send_offset.assign(ranks * ranks + 1, 0);
  for (std::size_t i = 0; i < ranks * ranks; ++i) plan.send_offset[i + 1] = plan.send_offset[i] + plan.send_tokens[i];
  std::vector<std::int64_t> next(plan.send_offset.begin(), plan.send_offset.end() - 1);  // next free place
  plan.order.resize(static_cast<std::size_t>(plan.send_offset.back()));
  for (std::size_t row = 0; row < pair_at.size(); ++row) {
    const std::int32_t pair = pair_at[row];
    if (pair < 0) continue;
    const std::size_t src = source.rank(static_cast<std::size_t>(pair) / k);
    const auto dst = static_cast<std::size_t>(rank_of_expert[row / plan.capacity]);
    plan.order[static_cast<std::size_t>(next[src * ranks + dst]++)] = pair;
  }
  plan.pair_of_row = std::move(pair_at);
  plan.send_bytes.resize(plan.send_tokens.size());
  for (std::size_t i = 0; i < plan.send_tokens.size(); ++i) {
    if (token_bytes > 0 && plan.send_tokens[i] > std::numeric_limits<std::int64_t>::max() / token_bytes) {
      detail::raise<P>(errc::overflow, fn, "token_bytes", token_bytes, "bytes sent must fit an int64", 0);
    }
    plan.send_bytes[i] = plan.send_tokens[i] * token_bytes;
  }
  return plan;
}

namespace detail {

/// The plan's pairs in the capacity layout (padding rows are the plan's own job: zero_free_rows).
inline pair_layout layout_of(const dispatch_plan& plan) noexcept {
  pair_layout pairs{plan.expert.data(), plan.slot.data(), plan.tokens, plan.top_k, plan.capacity};
  pairs.experts = plan.experts;
  return pairs;
}

/// The rows of `buffer` that hold no kept pair (plan.pair_of_row = -1), set to zero (non-temporal stores when the
/// buffer is large: use_streaming_stores).
template <class T>
void zero_free_rows(const dispatch_plan& plan, const matrix_view<T>& buffer) {
  const bool streaming = use_streaming_stores(buffer.rows * buffer.cols * sizeof(T));
  for (std::size_t r = 0; r < plan.pair_of_row.size(); ++r) {
    if (plan.pair_of_row[r] < 0) zero_row(buffer.row(r), buffer.cols, streaming);
  }
  if (streaming) streaming_fence();
}

}  // namespace detail

/// Gathers x [T x d] into the expert buffer [n C x d]: buffer[e C + slot] = x[t] for every kept pair, and
/// every other row (an expert's unused slots) zero.
template <class T>
void dispatch(const dispatch_plan& plan, const matrix_view<const T>& x, const matrix_view<T>& buffer) {
  constexpr const char* fn = "locmoe::dispatch";
  detail::check_rows(fn, "x", x, plan.tokens, x.cols);
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), x.cols);
  const pair_layout pairs = detail::layout_of(plan);
  // In token order: a token's copies one after another read its row from memory once.
  detail::dispatch_rows(pairs, nullptr, 0, plan.tokens * plan.top_k, x, buffer,
                        detail::use_streaming_stores(plan.order.size() * x.cols * sizeof(T)));
  detail::zero_free_rows(plan, buffer);
}

/// y[t] = sum over t's kept choices j, in order, of weight[t][j] * buffer[e_tj C + slot_tj]; 0 without any.
/// bf16/fp16 rows are summed in float and rounded once.
template <class T, class W>
void combine(const dispatch_plan& plan, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
             const matrix_view<T>& y) {
  static_assert(detail::is_row_type_v<T>, "combine: rows are float, double, bf16 or fp16 (16-bit rows are summed in float)");
  static_assert(detail::is_weight_type_v<W>, "combine: weights are float or double");
  constexpr const char* fn = "locmoe::combine";
  const std::size_t d = y.cols, k = plan.top_k;
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), d);
  detail::check_view<construction_policy>(fn, "weight", weight, plan.tokens, k, "must be [T x k]");
  detail::check_rows(fn, "y", y, plan.tokens, d);
  detail::run<detail::combine_kernel<T>>({detail::layout_of(plan), buffer, detail::weight_rows_of(weight), y, 0,
                                         plan.tokens, detail::use_streaming_stores(plan.tokens * d * sizeof(T))});
}

/// combine's backward. From dL/dy [T x d]: grad_buffer [n C x d] (optional) gets dL/d(buffer), w_tj dL/dy_t at
/// each kept pair's row and zero on every other row; grad_weight [T x k] (optional) gets dL/dw_tj = dL/dy_t .
/// buffer[row_tj] (32 partial sums for float and 16-bit rows, 16 for double, in a fixed order: the same on every
/// instruction set), 0 for a dropped pair. 16-bit rows: products and sums in
/// float, each output rounded once.
template <class T, class W>
void combine_backward(const dispatch_plan& plan, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                      const matrix_view<const T>& grad_y, const matrix_view<T>& grad_buffer,
                      const matrix_view<W>& grad_weight) {
  static_assert(detail::is_row_type_v<T>, "combine_backward: rows are float, double, bf16 or fp16");
  static_assert(detail::is_weight_type_v<W>, "combine_backward: weights are float or double");
  constexpr const char* fn = "locmoe::combine_backward";
  const std::size_t d = grad_y.cols, k = plan.top_k;
  detail::check_rows(fn, "grad_y", grad_y, plan.tokens, d);
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), d);
  detail::check_view<construction_policy>(fn, "weight", weight, plan.tokens, k, "must be [T x k]");
  if (grad_buffer.present()) detail::check_rows(fn, "grad_buffer", grad_buffer, plan.buffer_rows(), d);
  if (grad_weight.present()) detail::check_view<construction_policy>(fn, "grad_weight", grad_weight, plan.tokens, k, "must be [T x k]");
  detail::run<detail::combine_backward_kernel<T>>(
      {detail::layout_of(plan), buffer, detail::weight_rows_of(weight), grad_y, grad_buffer,
       grad_weight.present() ? detail::weight_grads_of(grad_weight) : detail::weight_grads{}, 0, plan.tokens,
       detail::use_streaming_stores(plan.order.size() * d * sizeof(T))});
  if (grad_buffer.present()) detail::zero_free_rows(plan, grad_buffer);
}

/// dispatch's backward: grad_x[t] = sum over t's kept pairs, in choice order, of grad_buffer[row_tj] (0 for a
/// token without any): combine with every weight 1, so the same sums bit for bit. 16-bit rows summed in float.
template <class T>
void dispatch_backward(const dispatch_plan& plan, const matrix_view<const T>& grad_buffer, const matrix_view<T>& grad_x) {
  static_assert(detail::is_row_type_v<T>, "dispatch_backward: rows are float, double, bf16 or fp16");
  constexpr const char* fn = "locmoe::dispatch_backward";
  const std::size_t d = grad_x.cols;
  detail::check_rows(fn, "grad_buffer", grad_buffer, plan.buffer_rows(), d);
  detail::check_rows(fn, "grad_x", grad_x, plan.tokens, d);
  detail::run<detail::combine_kernel<T>>({detail::layout_of(plan), grad_buffer, detail::weight_rows{}, grad_x, 0,
                                         plan.tokens, detail::use_streaming_stores(plan.tokens * d * sizeof(T))});
}

/// The grouped (dropless) layout (MegaBlocks; Megatron-Core's dropless path): expert e's rows are
/// [offsets[e], offsets[e + 1]) of one buffer, its kept_e rows rounded up to a multiple of `multiple` (1: none;
/// 8, 16 or 128 for tensor-core GEMMs), the padding rows written as zeros by the forward. A kept pair sits at row
/// offsets[e] + slot (pair_layout with expert_offset). From the assignment's kept counts alone: O(n), no pass over
/// the tokens. offsets has n + 1 values. Preconditions (checked): multiple >= 1, kept counts >= 0, the total fits
/// an int64.
inline void grouped_offsets(const std::int64_t* kept_per_expert, std::size_t n, std::int64_t multiple,
                            std::int64_t* offsets) {
  constexpr const char* fn = "locmoe::grouped_offsets";
  using P = construction_policy;
  if (multiple < 1) detail::raise<P>(errc::domain, fn, "multiple", multiple, "must be >= 1", 0);
  if (!offsets || (n > 0 && !kept_per_expert)) {
    detail::raise<P>(errc::domain, fn, "kept_per_expert/offsets", "null", "must not be null", 0);
  }
  offsets[0] = 0;
  for (std::size_t e = 0; e < n; ++e) {
    const std::int64_t kept = kept_per_expert[e];
    if (kept < 0) {
      detail::raise<P>(errc::domain, fn, "kept_per_expert", "[" + std::to_string(e) + "] = " + std::to_string(kept),
                       "every count must be >= 0", 0);
    }
    const std::int64_t room = std::numeric_limits<std::int64_t>::max() - offsets[e];
    if (kept > room - (multiple - 1)) detail::raise<P>(errc::overflow, fn, "kept_per_expert", kept, "the rows must fit an int64", 0);
    offsets[e + 1] = offsets[e] + (kept + multiple - 1) / multiple * multiple;
  }
}

/// The same, into a new vector of n + 1 offsets.
inline std::vector<std::int64_t> grouped_offsets(const std::int64_t* kept_per_expert, std::size_t n,
                                                 std::int64_t multiple = 1) {
  std::vector<std::int64_t> offsets(n + 1);
  grouped_offsets(kept_per_expert, n, multiple, offsets.data());
  return offsets;
}

}  // namespace locmoe
