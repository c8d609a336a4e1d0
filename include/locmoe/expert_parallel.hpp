// locmoe/expert_parallel.hpp - one rank's side of an expert-parallel exchange, planned from counts alone.
//
// Each rank routes, assigns and lays out only its own tokens (router.hpp with buffer_layout::grouped and
// group_multiple 1: expert e's kept rows at [offset_e, offset_e+1)). With experts placed in rank order (block
// placement, as DeepSpeed and Megatron-Core place them), that buffer is already the All-to-All send buffer: the
// rows for destination rank q are one range, send_offset[q] to send_offset[q + 1]. Only counts travel before the
// rows do: rank r tells each rank q how many rows it sends to each of q's experts (an MPI_Alltoall of q's
// expert count per pair). From the counts that reach it, rank q knows
//   - what arrives from each source: recv_count[s], in the order the source packed them (its experts, ascending,
//     each in slot order), recv_offset[s] in the receive buffer;
//   - where each received row goes in its experts' buffer, which is expert-major (expert, then source rank, then
//     the source's slot order), each local expert's rows rounded up to `multiple` (grouped GEMMs; padding rows
//     written as zeros): row_of_received[i];
// and the returning rows go back through the reverse map. Four moves make a training step's exchange:
//   forward   send buffer -(All-to-All)-> receive buffer -scatter_received-> experts' input
//             experts' output -gather_for_return-> return buffer -(All-to-All back)-> the send buffer's layout
//   backward  the same two maps: dL/d(returned rows) -(All-to-All)-> scatter_received -> dL/d(experts' output);
//             dL/d(experts' input) -gather_for_return-> -(All-to-All back)-> dL/d(send buffer) -> dispatch_backward
// Both maps are row copies: exact, and their own inverses on the rows they touch.
// Preconditions (checked; errors name the argument): rank < R; experts placed in rank order; counts >= 0;
// multiple >= 1; shapes of the row buffers. Cost: building O(R E_r) plus O(received rows); the moves one copy of
// each row. Thread safety: the maps are immutable once built and may be shared; the moves write only their
// outputs. Example: examples/mpi_exchange.cpp (flat and two-level exchanges over MPI); docs/api.md#a-training-step.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace locmoe {

struct ep_exchange_plan {
  std::size_t ranks = 0, rank = 0, experts = 0;
  std::size_t first_expert = 0, local_experts = 0;  ///< this rank's experts: [first, first + local)
  std::vector<std::int64_t> send_count;   ///< [R] rows this rank sends to each rank
  std::vector<std::int64_t> send_offset;  ///< [R + 1] where they start in the send buffer (its grouped layout)
  std::vector<std::int64_t> recv_count;   ///< [R] rows each rank sends here
  std::vector<std::int64_t> recv_offset;  ///< [R + 1] where they start in the receive buffer
  std::vector<std::int64_t> expert_offset;    ///< [E_r + 1] local expert e's rows in the experts' buffer
  std::vector<std::int64_t> kept_per_expert;  ///< [E_r] rows that arrive for each local expert
  std::vector<std::int64_t> row_of_received;  ///< [received] the experts'-buffer row of each received row
  std::vector<std::int32_t> received_of_row;  ///< [expert rows] the received row on each experts'-buffer row; -1: padding

  std::size_t sent_rows() const noexcept { return static_cast<std::size_t>(send_offset.back()); }
  std::size_t received_rows() const noexcept { return static_cast<std::size_t>(recv_offset.back()); }
  std::size_t expert_rows() const noexcept { return static_cast<std::size_t>(expert_offset.back()); }
};

/// The first expert of `rank` and how many it holds (experts placed in rank order; checked). In the count
/// exchange rank r sends rank q the slice [first(q), first(q) + count(q)) of its kept_per_expert.
inline std::pair<std::size_t, std::size_t> experts_of_rank(const topology& topo, std::size_t rank) {
  constexpr const char* fn = "locmoe::experts_of_rank";
  const std::vector<std::int32_t>& placed = topo.rank_of_expert_map();
  for (std::size_t e = 1; e < placed.size(); ++e) {
    if (placed[e] < placed[e - 1]) {
      detail::raise<construction_policy>(errc::domain, fn, "topology", "expert " + std::to_string(e) + " on rank " +
                                    std::to_string(placed[e]), "experts must be placed in rank order (block placement)", 0);
    }
  }
  if (rank >= topo.ranks()) detail::raise<construction_policy>(errc::domain, fn, "rank", rank, "must be < ranks", 0);
  const auto r = static_cast<std::int32_t>(rank);
  const auto first = std::lower_bound(placed.begin(), placed.end(), r) - placed.begin();
  const auto last = std::upper_bound(placed.begin(), placed.end(), r) - placed.begin();
  return {static_cast<std::size_t>(first), static_cast<std::size_t>(last - first)};
}

/// Plans rank `rank`'s exchange: `my_kept` [n] is this rank's kept_per_expert (its grouped layout, multiple 1, is
/// the send buffer); `counts_to_me` [R x E_r] holds, for each source rank s, the rows s keeps for each of this
/// rank's experts (what the count exchange delivers). `multiple` rounds each local expert's rows up.
inline ep_exchange_plan build_ep_exchange_plan(const topology& topo, std::size_t rank, const std::int64_t* my_kept,
                                               const std::int64_t* counts_to_me, std::int64_t multiple = 1) {
  constexpr const char* fn = "locmoe::build_ep_exchange_plan";
  using P = construction_policy;
  const std::size_t R = topo.ranks(), n = topo.experts();
  const auto [first, local] = experts_of_rank(topo, rank);
  if (multiple < 1) detail::raise<P>(errc::domain, fn, "multiple", multiple, "must be >= 1", 0);
  if (!my_kept || (local > 0 && !counts_to_me)) detail::raise<P>(errc::domain, fn, "my_kept/counts_to_me", "null", "must not be null", 0);
  const auto check_count = [&](const char* argument, std::size_t i, std::int64_t c) {
    if (c < 0 || c > std::numeric_limits<std::int32_t>::max()) {
      detail::raise<P>(errc::domain, fn, argument, "[" + std::to_string(i) + "] = " + std::to_string(c),
                       "every count must satisfy 0 <= count < 2^31", 0);
    }
  };
  ep_exchange_plan plan;
  plan.ranks = R;
  plan.rank = rank;
  plan.experts = n;
  plan.first_expert = first;
  plan.local_experts = local;
  plan.send_count.assign(R, 0);
  for (std::size_t e = 0; e < n; ++e) {
    check_count("my_kept", e, my_kept[e]);
    plan.send_count[static_cast<std::size_t>(topo.rank_of_expert(e))] += my_kept[e];
  }
  plan.send_offset.assign(R + 1, 0);
  for (std::size_t q = 0; q < R; ++q) plan.send_offset[q + 1] = plan.send_offset[q] + plan.send_count[q];
  plan.recv_count.assign(R, 0);
  plan.kept_per_expert.assign(local, 0);
  for (std::size_t s = 0; s < R; ++s) {
    for (std::size_t e = 0; e < local; ++e) {
      const std::int64_t c = counts_to_me[s * local + e];
      check_count("counts_to_me", s * local + e, c);
      plan.recv_count[s] += c;
      plan.kept_per_expert[e] += c;
    }
  }
  plan.recv_offset.assign(R + 1, 0);
  for (std::size_t s = 0; s < R; ++s) plan.recv_offset[s + 1] = plan.recv_offset[s] + plan.recv_count[s];
  plan.expert_offset.assign(local + 1, 0);
  for (std::size_t e = 0; e < local; ++e) {
    plan.expert_offset[e + 1] = plan.expert_offset[e] + (plan.kept_per_expert[e] + multiple - 1) / multiple * multiple;
  }
  if (plan.expert_rows() > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max())) {
    detail::raise<P>(errc::overflow, fn, "counts_to_me", plan.expert_rows(), "the experts' rows must be < 2^31", 0);
  }
  // Received rows arrive source-major, then by expert, then in the source's slot order; the experts' buffer is
  // expert-major, then source, then slot.
  plan.row_of_received.resize(plan.received_rows());
  plan.received_of_row.assign(plan.expert_rows(), -1);
  std::vector<std::int64_t> next(plan.expert_offset.begin(), plan.expert_offset.end() - 1);
  std::size_t i = 0;
  for (std::size_t s = 0; s < R; ++s) {
    for (std::size_t e = 0; e < local; ++e) {
      for (std::int64_t c = 0; c < counts_to_me[s * local + e]; ++c, ++i) {
        const std::int64_t row = next[e]++;
        plan.row_of_received[i] = row;
        plan.received_of_row[static_cast<std::size_t>(row)] = static_cast<std::int32_t>(i);
      }
    }
  }
  return plan;
}

/// The experts' buffer [expert_rows x d] from the receive buffer [received x d]: each received row to its place,
/// padding rows zero. Also the backward's move of dL/d(returned rows) to dL/d(experts' output).
template <class T>
void scatter_received(const ep_exchange_plan& plan, const matrix_view<const T>& received, const matrix_view<T>& experts) {
  constexpr const char* fn = "locmoe::scatter_received";
  const std::size_t d = received.cols;
  detail::check_rows(fn, "received", received, plan.received_rows(), d);
  detail::check_rows(fn, "experts", experts, plan.expert_rows(), d);
  for (std::size_t row = 0; row < plan.expert_rows(); ++row) {  // destination order: every row written once
    const std::int32_t i = plan.received_of_row[row];
    if (i < 0) {
      std::fill(experts.row(row), experts.row(row) + d, T(0));
    } else if (d > 0) {
      std::memcpy(static_cast<void*>(experts.row(row)), received.row(static_cast<std::size_t>(i)), d * sizeof(T));
    }
  }
}

/// The return buffer [received x d] from the experts' buffer: row i of the return buffer is the experts' row of
/// received row i, so the All-to-All back delivers each source its rows in its send buffer's layout. Also the
/// backward's move of dL/d(experts' input) towards the sources.
template <class T>
void gather_for_return(const ep_exchange_plan& plan, const matrix_view<const T>& experts, const matrix_view<T>& returned) {
  constexpr const char* fn = "locmoe::gather_for_return";
  const std::size_t d = experts.cols;
  detail::check_rows(fn, "experts", experts, plan.expert_rows(), d);
  detail::check_rows(fn, "returned", returned, plan.received_rows(), d);
  for (std::size_t i = 0; i < plan.received_rows(); ++i) {
    if (d > 0) {
      std::memcpy(static_cast<void*>(returned.row(i)), experts.row(static_cast<std::size_t>(plan.row_of_received[i])),
                  d * sizeof(T));
    }
  }
}

}  // namespace locmoe
