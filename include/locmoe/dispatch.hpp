// locmoe/dispatch.hpp - from an assignment to the exchange: who sends which rows to whom, and the CPU
// dispatch (gather into expert buffers) and combine (weighted scatter-add back to the tokens).
//
// Input: the kept choices of capacity_assigner (expert[T x k], slot[T x k], -1 where dropped), the topology,
// and each token's source rank (token_rank, or contiguous blocks as in assign.hpp).
// Expert buffers: expert e's kept rows occupy rows [e C, e C + C) of a [n C x d] buffer, row e C + slot.
// The plan holds
//   - send_tokens[src][dst]: kept choices whose token lives on rank src and whose expert on rank dst
//     (row-major [R x R]), and the same in bytes for a token of `token_bytes`;
//   - intra_rank, intra_node and inter_node totals (tokens): the traffic that stays on the device, crosses
//     the intra-node links, and crosses the inter-node network;
//   - order: every kept (token, choice) pair as t k + j, sorted by (source rank, expert, slot): the gather
//     order of each source rank's send buffer, expert-major, and so also the receive order of each expert.
// dispatch(x -> buffer) copies row x[t] to buffer[e C + slot] for each kept pair (rows of unused slots are
// left untouched); combine(buffer -> y) sets y[t] = sum_j weight[t][j] buffer[e_tj C + slot_tj] over t's kept
// choices (0 for a token with none), summing in choice order: deterministic.
// Preconditions (checked; errors name the argument): shapes agree; experts in [-1, n), slots in [-1, C) and
// -1 together; no two pairs on one (expert, slot); token ranks in [0, R); token_bytes * counts fit int64.
// Cost: building O(T k log(T k)) (a sort), O(R^2 + T k) memory; dispatch/combine one pass over the kept rows.
// Example: docs/api.md#dispatch-plans.
#pragma once

#include <locmoe/assign.hpp>
#include <locmoe/config.hpp>
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
  std::vector<std::int64_t> order;        ///< kept pairs t k + j, by (source rank, expert, slot)
  std::vector<expert_index> expert;       ///< [T x k] copy of the assignment's experts (-1: dropped)
  std::vector<slot_index> slot;           ///< [T x k] copy of its slots

  std::int64_t sent(std::size_t source, std::size_t destination) const { return send_tokens.at(source * ranks + destination); }
  /// Rows of the [n C x d] expert buffer.
  std::size_t buffer_rows() const noexcept { return experts * capacity; }
};

/// Builds the plan of an assignment (see the header comment); throws locmoe::error on bad arguments.
inline dispatch_plan build_dispatch_plan(const matrix_view<const expert_index>& expert,
                                         const matrix_view<const slot_index>& slot, std::int64_t capacity,
                                         const topology& topo, const std::int32_t* token_rank = nullptr,
                                         std::int64_t token_bytes = 0) {
  constexpr const char* fn = "locmoe::build_dispatch_plan";
  using P = throw_on_error;
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
  detail::check_token_ranks<P>(fn, token_rank, tokens, ranks);
  const detail::rank_map source{token_rank, ranks, tokens};
  std::vector<unsigned char> taken(n * plan.capacity, 0);
  std::vector<std::size_t> rank_of_pair;
  for (std::size_t t = 0; t < tokens; ++t) {
    const std::size_t src = source.rank(t);
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = expert(t, j);
      const slot_index s = slot(t, j);
      plan.expert[t * k + j] = e;
      plan.slot[t * k + j] = s;
      const std::string where = "(" + std::to_string(t) + ", " + std::to_string(j) + ")";
      if (e == no_expert && s == -1) continue;
      if (e < 0 || static_cast<std::size_t>(e) >= n || s < 0 || static_cast<std::size_t>(s) >= plan.capacity) {
        detail::raise<P>(errc::domain, fn, "expert/slot", where + " = " + std::to_string(e) + "/" + std::to_string(s),
                         "a kept choice needs an expert in [0, n) and a slot in [0, C); a dropped one -1/-1", 0);
      }
      unsigned char& used = taken[static_cast<std::size_t>(e) * plan.capacity + static_cast<std::size_t>(s)];
      if (used) {
        detail::raise<P>(errc::domain, fn, "slot", where + " = " + std::to_string(s),
                         "two choices share one (expert, slot)", 0);
      }
      used = 1;
      const auto dst = static_cast<std::size_t>(topo.rank_of_expert(static_cast<std::size_t>(e)));
      ++plan.send_tokens[src * ranks + dst];
      if (dst == src) {
        ++plan.intra_rank;
      } else if (topo.node_of_rank(dst) == topo.node_of_rank(src)) {
        ++plan.intra_node;
      } else {
        ++plan.inter_node;
      }
      plan.order.push_back(static_cast<std::int64_t>(t * k + j));
      rank_of_pair.push_back(src);
    }
  }
  // Sort the kept pairs by (source rank, expert, slot): a key of small integers, exact and stable.
  std::vector<std::size_t> index(plan.order.size());
  for (std::size_t i = 0; i < index.size(); ++i) index[i] = i;
  std::sort(index.begin(), index.end(), [&](std::size_t a, std::size_t b) {
    const auto pa = static_cast<std::size_t>(plan.order[a]), pb = static_cast<std::size_t>(plan.order[b]);
    if (rank_of_pair[a] != rank_of_pair[b]) return rank_of_pair[a] < rank_of_pair[b];
    if (plan.expert[pa] != plan.expert[pb]) return plan.expert[pa] < plan.expert[pb];
    return plan.slot[pa] < plan.slot[pb];
  });
  std::vector<std::int64_t> sorted(index.size());
  for (std::size_t i = 0; i < index.size(); ++i) sorted[i] = plan.order[index[i]];
  plan.order = std::move(sorted);
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

template <class T>
void check_rows(const char* fn, const char* argument, const matrix_view<T>& v, std::size_t rows, std::size_t d) {
  check_view<throw_on_error>(fn, argument, v, rows, d, "must have d columns, as the other operand");
}

}  // namespace detail

/// Gathers x [T x d] into the expert buffer [n C x d]: buffer[e C + slot] = x[t] for every kept pair.
template <class T>
void dispatch(const dispatch_plan& plan, const matrix_view<const T>& x, const matrix_view<T>& buffer) {
  constexpr const char* fn = "locmoe::dispatch";
  detail::check_rows(fn, "x", x, plan.tokens, x.cols);
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), x.cols);
  for (const std::int64_t pair : plan.order) {
    const auto p = static_cast<std::size_t>(pair);
    const std::size_t row = static_cast<std::size_t>(plan.expert[p]) * plan.capacity + static_cast<std::size_t>(plan.slot[p]);
    std::copy(x.row(p / plan.top_k), x.row(p / plan.top_k) + x.cols, buffer.row(row));
  }
}

/// y[t] = sum over t's kept choices j, in order, of weight[t][j] * buffer[e_tj C + slot_tj]; 0 without any.
template <class T, class W>
void combine(const dispatch_plan& plan, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
             const matrix_view<T>& y) {
  static_assert(std::is_floating_point_v<T>, "combine: rows are float or double (sums need the precision)");
  constexpr const char* fn = "locmoe::combine";
  const std::size_t d = y.cols, k = plan.top_k;
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), d);
  detail::check_view<throw_on_error>(fn, "weight", weight, plan.tokens, k, "must be [T x k]");
  detail::check_rows(fn, "y", y, plan.tokens, d);
  for (std::size_t t = 0; t < plan.tokens; ++t) {
    T* out = y.row(t);
    std::fill(out, out + d, T(0));
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = plan.expert[t * k + j];
      if (e == no_expert) continue;
      const T* in = buffer.row(static_cast<std::size_t>(e) * plan.capacity + static_cast<std::size_t>(plan.slot[t * k + j]));
      const T w = static_cast<T>(weight(t, j));
      for (std::size_t c = 0; c < d; ++c) out[c] += w * in[c];
    }
  }
}

}  // namespace locmoe
