// locmoe/assign.hpp - capacity assignment: the slot of each (token, choice) in its expert's buffer, or a drop.
//
// Input: the router's choices indices [T x k] (no_expert slots are skipped) and weights [T x k].
// Capacity C per expert, in this order of precedence:
//   drop = false          C = the largest load (no token dropped; min_capacity ignored, as DeepSpeed)
//   capacity >= 0         C = capacity, as given (0 drops every choice)
//   otherwise             C = max(min_capacity, ceil(T k capacity_factor / n)), exactly (capacity.hpp
//                         classic_capacity): DeepSpeed's top1gating/topkgating and Megatron-Core's get_capacity
// Drop policies, per expert, when more than C choices name it:
//   position   the earliest tokens are kept (token order; DeepSpeed topkgating "position")
//   probs      the C highest weights are kept (ties: the earlier token; a NaN weight ranks last)
// Slots: the kept choices of an expert take slots 0, 1, ... in token order.
// Locality-aware overflow (beyond the paper; off by default): a dropped choice moves to the token's best
//   remaining expert (by `scores`, ties to the lower index) that lives on the token's own node, is not already
//   among its choices, and still has room. Dropped choices are visited in token order after the first pass;
//   a moved choice takes the next free slot and the weight scores[t][e'] (counted in `rerouted`). An expert
//   with score 0 (masked) or NaN is never a destination.
// renormalize_kept (DeepSpeed topkgating): a token's kept weights divided by max(their sum, epsilon).
// pad_to_capacity: every expert's buffer is C rows; the unused rows are reported as padded_slots (Megatron-Core
//   fills them with unrouted tokens at weight 0, which computes the same output). Our choice where C > T: still C
//   rows (a planned shape that does not depend on the batch), where Megatron-Core pads to min(C, T) rows (with
//   C > T it skips the drop and puts every token on every expert); tests/test_golden_megatron.cpp checks both.
//
// Topology: each token's source rank comes from context.token_rank (topology.hpp's token_ranks: this rank's
// tokens, each token's rank, or contiguous blocks; required with more than one rank). Without a topology
// everything is on one rank and node.
// Statistics: loads before and after, drop rate (dropped / routed choices), max and mean load, and the
// fraction of kept choices (so of dispatched token bytes) whose expert is on the token's node and rank.
//
// Preconditions (checked; errors name the argument): n >= 1; every index in [-1, n); T k < 2^31; capacity
// factor finite and > 0; a topology with n experts; token ranks in [0, R); scores [T x n] when
// local_overflow is on. Cost: O(T k) (probs: O(T k + C log C) per expert; rerouting O(n k) per dropped
// choice); the workspace (O(T k + n)) lives in the
// capacity_assigner and is reused across calls. Not thread-safe per object: use one assigner per thread.
// Example: docs/api.md#capacity-assignment.
#pragma once

#include <locmoe/capacity.hpp>
#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace locmoe {

enum class drop_policy { position, probs };


struct capacity_options {
  double capacity_factor = 1.0;
  std::int64_t capacity = -1;      ///< >= 0: C as given; -1: from capacity_factor
  std::int64_t min_capacity = 0;   ///< lower bound on C from the factor
  bool drop = true;                ///< false: C = the largest load
  bool pad_to_capacity = false;
  drop_policy policy = drop_policy::position;
  bool local_overflow = false;
  bool renormalize_kept = false;
};

/// Where each choice went. Every view is [T x k] and required; the counts point to n elements (optional).
template <class S>
struct assignment_outputs {
  matrix_view<expert_index> expert;  ///< the expert a choice was kept at (rerouted ones changed); -1 dropped
  matrix_view<slot_index> slot;      ///< its slot in that expert's buffer; -1 dropped
  matrix_view<S> weight;             ///< its weight (0 where dropped)
  std::int64_t* tokens_per_expert = nullptr;  ///< [n] choices per expert before capacity
  std::int64_t* kept_per_expert = nullptr;    ///< [n] after capacity (and rerouting)
};

/// Locality context: all optional.
template <class S>
struct assignment_context {
  const topology* topo = nullptr;           ///< null: one rank, one node
  token_ranks token_rank;                   ///< whose tokens (token_ranks); required with more than one rank
  matrix_view<const S> scores;              ///< [T x n] ranks rerouting candidates; required by local_overflow
  /// [n] a capacity per expert (a rank's share of a global capacity: global_capacity_shares); overrides the
  /// options' capacity, factor and drop settings. stats.capacity is then the largest of them.
  const std::int64_t* expert_capacity = nullptr;
};

struct assignment_stats {
  std::int64_t capacity = 0;
  std::int64_t tokens = 0;                ///< T
  std::int64_t routed = 0;                ///< choices naming an expert (before capacity)
  std::int64_t kept = 0;                  ///< choices with a slot (rerouted included)
  std::int64_t dropped = 0;               ///< routed choices without a slot in the end
  std::int64_t rerouted = 0;              ///< dropped choices moved to a local expert
  std::int64_t padded_slots = 0;          ///< pad_to_capacity: n C - kept; else 0
  std::int64_t max_load = 0;              ///< largest tokens_per_expert
  double mean_load = 0;                   ///< routed / n
  double drop_rate = 0;                   ///< dropped / routed (0 when nothing is routed)
  double node_local_fraction = 1;         ///< kept choices whose expert is on the token's node / kept
  double rank_local_fraction = 1;         ///< ... on the token's rank / kept
  std::int64_t tokens_without_local_expert = 0;  ///< tokens whose node hosts no expert
};

template <class S>
class capacity_assigner {
 public:
  explicit capacity_assigner(std::size_t n, capacity_options options = {}) : n_(n), options_(options) {}

  const capacity_options& options() const noexcept { return options_; }

  /// Assigns indices/weights [T x k]; see the header comment. Throws locmoe::error on bad arguments.
  assignment_stats run(const matrix_view<const expert_index>& indices, const matrix_view<const S>& weights,
                       const assignment_outputs<S>& out, const assignment_context<S>& context = {}) {
    constexpr const char* fn = "locmoe::capacity_assigner::run";
    using P = construction_policy;
    const std::size_t tokens = indices.rows, k = indices.cols;
    check(fn, indices, weights, out, context);
    assignment_stats stats;
    stats.tokens = static_cast<std::int64_t>(tokens);

    load_.assign(n_, 0);
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        const expert_index e = indices(t, j);
        if (e != no_expert) ++load_[static_cast<std::size_t>(e)];
      }
    }
    for (const std::int64_t l : load_) {
      stats.routed += l;
      stats.max_load = std::max(stats.max_load, l);
    }
    stats.mean_load = static_cast<double>(stats.routed) / static_cast<double>(n_);
    if (context.expert_capacity) {
      stats.capacity = n_ ? *std::max_element(context.expert_capacity, context.expert_capacity + n_) : 0;
    } else if (!options_.drop) {
      stats.capacity = stats.max_load;
    } else if (options_.capacity >= 0) {
      stats.capacity = options_.capacity;
    } else {
      stats.capacity = classic_capacity<P>(static_cast<std::int64_t>(tokens * k), options_.capacity_factor, 1,
                                           static_cast<std::int64_t>(n_), options_.min_capacity);
    }
    const std::int64_t capacity = stats.capacity;
    capacity_of_.assign(n_, capacity);
    if (context.expert_capacity) std::copy(context.expert_capacity, context.expert_capacity + n_, capacity_of_.begin());
    if (options_.pad_to_capacity && capacity > std::numeric_limits<std::int64_t>::max() / static_cast<std::int64_t>(n_)) {
      detail::raise<P>(errc::overflow, fn, "capacity", capacity, "n C must fit an int64 with pad_to_capacity", 0);
    }

    // Which choices are kept: a per-expert order, then the first C of it.
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        out.expert(t, j) = no_expert;
        out.slot(t, j) = -1;
        out.weight(t, j) = S(0);
      }
    }
    kept_.assign(n_, 0);
    if (options_.policy == drop_policy::position || (!options_.drop && !context.expert_capacity)) {
      for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t j = 0; j < k; ++j) {
          const expert_index e = indices(t, j);
          if (e != no_expert && kept_[static_cast<std::size_t>(e)] < capacity_of_[static_cast<std::size_t>(e)])
            keep(out, t, j, e, weights(t, j));
        }
      }
    } else {
      keep_highest_weights(indices, weights, out);
    }
    if (options_.local_overflow) reroute(indices, out, context, stats);
    if (options_.renormalize_kept) renormalize(out);

    // Statistics.
    // Without a topology everything is local; with one, the maps are read directly (checked above).
    const topology* topo = context.topo;
    const std::int32_t* rank_of_expert = topo ? topo->rank_of_expert_map().data() : nullptr;
    const std::int32_t* node_of_expert = topo ? topo->node_of_expert_map().data() : nullptr;
    const std::int32_t* node_of_rank = topo ? topo->node_of_rank_map().data() : nullptr;
    std::int64_t node_local = 0, rank_local = 0;
    const detail::rank_map source = ranks_of(context, tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t r = source.rank(t);
      const std::int32_t node = topo ? node_of_rank[r] : 0;
      if (topo && topo->experts_on_node(static_cast<std::size_t>(node)) == 0) ++stats.tokens_without_local_expert;
      for (std::size_t j = 0; j < k; ++j) {
        const expert_index e = out.expert(t, j);
        if (e == no_expert) continue;
        ++stats.kept;
        node_local += !topo || node_of_expert[e] == node;
        rank_local += !topo || static_cast<std::size_t>(rank_of_expert[e]) == r;
      }
    }
    stats.dropped = stats.routed - stats.kept;
    if (stats.routed > 0) stats.drop_rate = static_cast<double>(stats.dropped) / static_cast<double>(stats.routed);
    if (stats.kept > 0) {
      stats.node_local_fraction = static_cast<double>(node_local) / static_cast<double>(stats.kept);
      stats.rank_local_fraction = static_cast<double>(rank_local) / static_cast<double>(stats.kept);
    }
    if (options_.pad_to_capacity) stats.padded_slots = capacity * static_cast<std::int64_t>(n_) - stats.kept;
    if (out.tokens_per_expert) std::copy(load_.begin(), load_.end(), out.tokens_per_expert);
    if (out.kept_per_expert) std::copy(kept_.begin(), kept_.end(), out.kept_per_expert);
    return stats;
  }

 private:
  struct candidate {
    S weight;
    std::uint32_t token, choice;
  };

  void keep(const assignment_outputs<S>& out, std::size_t t, std::size_t j, expert_index e, S w) {
    out.expert(t, j) = e;
    out.slot(t, j) = static_cast<slot_index>(kept_[static_cast<std::size_t>(e)]++);
    out.weight(t, j) = w;
  }

  // Per expert, the C choices with the highest weights; slots in token order among them.
  void keep_highest_weights(const matrix_view<const expert_index>& indices, const matrix_view<const S>& weights,
                            const assignment_outputs<S>& out) {
    const std::size_t tokens = indices.rows, k = indices.cols;
    start_.assign(n_ + 1, 0);
    for (std::size_t e = 0; e < n_; ++e) start_[e + 1] = start_[e] + static_cast<std::size_t>(load_[e]);
    pairs_.resize(start_[n_]);
    std::vector<std::size_t>& next = fill_;
    next.assign(start_.begin(), start_.end() - 1);
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        const expert_index e = indices(t, j);
        if (e == no_expert) continue;
        pairs_[next[static_cast<std::size_t>(e)]++] = {weights(t, j), static_cast<std::uint32_t>(t),
                                                       static_cast<std::uint32_t>(j)};
      }
    }
    for (std::size_t e = 0; e < n_; ++e) {
      auto first = pairs_.begin() + static_cast<std::ptrdiff_t>(start_[e]);
      auto last = pairs_.begin() + static_cast<std::ptrdiff_t>(start_[e + 1]);
      const std::int64_t capacity = capacity_of_[e];
      if (static_cast<std::int64_t>(last - first) <= capacity) continue;  // every choice fits
      const auto cut = first + static_cast<std::ptrdiff_t>(capacity);
      // Pairs are in token order, so "earlier token" breaks ties among equal weights.
      std::nth_element(first, cut, last, [](const candidate& a, const candidate& b) {
        const bool a_nan = std::isnan(a.weight), b_nan = std::isnan(b.weight);  // NaN ranks last
        if (a_nan != b_nan) return b_nan;
        return (!a_nan && a.weight > b.weight) || ((a_nan || a.weight == b.weight) && a.token < b.token);
      });
      std::sort(first, cut, [](const candidate& a, const candidate& b) { return a.token < b.token; });
      for (auto it = cut; it != last; ++it) it->token = std::numeric_limits<std::uint32_t>::max();  // dropped
    }
    // Slots in token order: walk tokens, keep the survivors.
    for (std::size_t e = 0; e < n_; ++e) {
      for (std::size_t i = start_[e]; i < start_[e + 1]; ++i) {
        const candidate& c = pairs_[i];
        if (c.token != std::numeric_limits<std::uint32_t>::max()) keep(out, c.token, c.choice, static_cast<expert_index>(e), weights(c.token, c.choice));
      }
    }
  }

  static detail::rank_map ranks_of(const assignment_context<S>& context, std::size_t tokens) {
    detail::rank_map map;  // checked in check()
    detail::resolve_token_ranks<construction_policy>("locmoe::capacity_assigner::run", "token_rank", context.token_rank,
                                                tokens, context.topo ? context.topo->ranks() : 1, map);
    return map;
  }

  void reroute(const matrix_view<const expert_index>& indices, const assignment_outputs<S>& out,
               const assignment_context<S>& context, assignment_stats& stats) {
    const std::size_t tokens = indices.rows, k = indices.cols;
    const topology* topo = context.topo;
    const detail::rank_map source = ranks_of(context, tokens);
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t r = source.rank(t);
      const std::int32_t node = topo ? topo->node_of_rank(r) : 0;
      for (std::size_t j = 0; j < k; ++j) {
        if (indices(t, j) == no_expert || out.expert(t, j) != no_expert) continue;
        std::size_t best = n_;
        const S* score = context.scores.row(t);
        for (std::size_t e = 0; e < n_; ++e) {
          if (kept_[e] >= capacity_of_[e] || (topo && topo->node_of_expert(e) != node)) continue;
          if (std::find(indices.row(t), indices.row(t) + k, static_cast<expert_index>(e)) != indices.row(t) + k) continue;
          if (std::find(out.expert.row(t), out.expert.row(t) + k, static_cast<expert_index>(e)) != out.expert.row(t) + k) continue;
          if (!(score[e] > 0)) continue;  // masked (p = 0) or NaN: never a destination
          if (best == n_ || score[e] > score[best]) best = e;
        }
        if (best == n_) continue;
        keep(out, t, j, static_cast<expert_index>(best), score[best]);
        ++stats.rerouted;
      }
    }
  }

  void renormalize(const assignment_outputs<S>& out) {
    for (std::size_t t = 0; t < out.weight.rows; ++t) {
      S sum = 0;
      for (std::size_t j = 0; j < out.weight.cols; ++j) sum += out.weight(t, j);
      const S divisor = std::max(sum, std::numeric_limits<S>::epsilon());
      for (std::size_t j = 0; j < out.weight.cols; ++j) {
        if (out.expert(t, j) != no_expert) out.weight(t, j) /= divisor;
      }
    }
  }

  void check(const char* fn, const matrix_view<const expert_index>& indices, const matrix_view<const S>& weights,
             const assignment_outputs<S>& out, const assignment_context<S>& context) const {
    using P = construction_policy;
    const std::size_t tokens = indices.rows, k = indices.cols;
    if (n_ < 1 || n_ > static_cast<std::size_t>(INT32_MAX)) {
      detail::raise<P>(errc::domain, fn, "n", n_, "number of experts must satisfy 1 <= n <= 2^31 - 1", 0);
    }
    if (k < 1) detail::raise<P>(errc::domain, fn, "indices", detail::shape_text(tokens, k), "must have k >= 1 columns", 0);
    if (tokens > static_cast<std::size_t>(INT32_MAX) / k) {
      detail::raise<P>(errc::overflow, fn, "indices", detail::shape_text(tokens, k), "T k must be < 2^31", 0);
    }
    detail::check_view<P>(fn, "indices", indices, tokens, k, "");
    detail::check_view<P>(fn, "weights", weights, tokens, k, "must have as many columns as indices (k)");
    detail::check_view<P>(fn, "expert", out.expert, tokens, k, "must have k columns");
    detail::check_view<P>(fn, "slot", out.slot, tokens, k, "must have k columns");
    detail::check_view<P>(fn, "weight", out.weight, tokens, k, "must have k columns");
    if (!(std::isfinite(options_.capacity_factor) && options_.capacity_factor > 0)) {
      detail::raise<P>(errc::domain, fn, "capacity_factor", options_.capacity_factor, "must be finite and > 0", 0);
    }
    if (options_.min_capacity < 0) {
      detail::raise<P>(errc::domain, fn, "min_capacity", options_.min_capacity, "must be >= 0", 0);
    }
    if (options_.drop && options_.capacity < -1) {
      detail::raise<P>(errc::domain, fn, "capacity", options_.capacity, "must be >= 0, or -1 for the factor", 0);
    }
    if (options_.capacity > static_cast<std::int64_t>(INT32_MAX)) {
      detail::raise<P>(errc::overflow, fn, "capacity", options_.capacity, "must be < 2^31 (slots are int32)", 0);
    }
    detail::check_indices<P>(fn, indices, n_);
    for (std::size_t e = 0; context.expert_capacity && e < n_; ++e) {
      const std::int64_t c = context.expert_capacity[e];
      if (c < 0 || c > static_cast<std::int64_t>(INT32_MAX)) {
        detail::raise<P>(errc::domain, fn, "expert_capacity", "[" + std::to_string(e) + "] = " + std::to_string(c),
                         "every capacity must satisfy 0 <= C_e < 2^31", 0);
      }
    }
    if (context.topo && context.topo->experts() != n_) {
      detail::raise<P>(errc::domain, fn, "topology", context.topo->experts(), "must place exactly n experts", 0);
    }
    detail::rank_map map;
    detail::resolve_token_ranks<P>(fn, "token_rank", context.token_rank, tokens, context.topo ? context.topo->ranks() : 1, map);
    if (options_.local_overflow) {
      if (!context.scores.present() && tokens > 0) {
        detail::raise<P>(errc::domain, fn, "scores", "null", "must be passed, [T x n], when local_overflow is on", 0);
      }
      detail::check_view<P>(fn, "scores", context.scores, tokens, n_, "must have n columns");
    }
  }

  std::size_t n_;
  capacity_options options_;
  std::vector<std::int64_t> load_, kept_, capacity_of_;
  std::vector<std::size_t> start_, fill_;
  std::vector<candidate> pairs_;
};

/// Rank `rank`'s shares of a global capacity of C slots per expert, agreed from every rank's routed counts alone
/// (expert parallelism exchanges n integers per rank, never the tokens' choices): the ranks' batches are taken in
/// rank order, so share_e = min(counts[rank][e], max(0, C - sum_{s < rank} counts[s][e])). With the position drop
/// policy, every rank assigning its own tokens with these shares (assignment_context::expert_capacity) keeps
/// exactly what one capacity_assigner keeps on all ranks' tokens concatenated in rank order. counts is [R x n]
/// (row r: rank r's tokens_per_expert); share has n values. Preconditions (checked): rank < R, C >= 0, counts >= 0.
inline void global_capacity_shares(const std::int64_t* counts, std::size_t ranks, std::size_t n, std::int64_t capacity,
                                   std::size_t rank, std::int64_t* share) {
  constexpr const char* fn = "locmoe::global_capacity_shares";
  using P = construction_policy;
  if (rank >= ranks) detail::raise<P>(errc::domain, fn, "rank", rank, "must be < ranks", 0);
  if (capacity < 0) detail::raise<P>(errc::domain, fn, "capacity", capacity, "must be >= 0", 0);
  if (n > 0 && (!counts || !share)) detail::raise<P>(errc::domain, fn, "counts/share", "null", "must not be null", 0);
  for (std::size_t i = 0; i < ranks * n; ++i) {
    if (counts[i] < 0) {
      detail::raise<P>(errc::domain, fn, "counts", "[" + std::to_string(i / n) + "][" + std::to_string(i % n) + "] = " +
                       std::to_string(counts[i]), "every count must be >= 0", 0);
    }
  }
  for (std::size_t e = 0; e < n; ++e) {
    std::int64_t before = 0;
    for (std::size_t s = 0; s < rank; ++s) before += counts[s * n + e];
    share[e] = std::min(counts[rank * n + e], std::max<std::int64_t>(0, capacity - before));
  }
}

}  // namespace locmoe
