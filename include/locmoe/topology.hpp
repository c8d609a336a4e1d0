// locmoe/topology.hpp - where experts live: ranks (expert-parallel devices), nodes, and the expert -> rank map.
//
//   rank r lives on node  node_of_rank[r]                    (uniform: r / ranks_per_node)
//   expert e lives on rank rank_of_expert[e]                 (block placement: floor(e * R / n))
//   expert e is *local* to a token of rank r  iff  node_of_expert(e) == node_of_rank(r)
//
// Block placement puts n / R consecutive experts on each rank when R divides n (Megatron-Core's and DeepSpeed's
// layout); with fewer experts than ranks (the paper's 256-NPU cluster: 16 experts over 32 nodes of 8) expert e
// goes to rank floor(e * R / n), so some ranks, and some nodes, host no expert. Such nodes are valid: their
// tokens have no local expert, which the locality loss and the statistics count and report.
//
// Preconditions (checked, errors name the argument): ranks >= 1, 1 <= ranks_per_node, ranks divisible by
// ranks_per_node, experts >= 1; explicit maps: node ids in [0, R), every expert on a rank in [0, R).
// Cost: construction O(R + n); every query O(1). Immutable after construction; safe to share across threads.
// Example: docs/api.md#topology.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace locmoe {

class topology {
 public:
  /// R ranks, G consecutive ranks per node, n experts in blocks over the ranks.
  static topology uniform(std::int64_t ranks, std::int64_t ranks_per_node, std::int64_t experts) {
    constexpr const char* fn = "locmoe::topology::uniform";
    check_count(fn, "ranks", ranks);
    check_count(fn, "ranks_per_node", ranks_per_node);
    check_count(fn, "experts", experts);
    if (ranks % ranks_per_node != 0) {
      detail::raise<construction_policy>(errc::domain, fn, "ranks_per_node", ranks_per_node,
                                    "must divide ranks (every node holds the same number of ranks)", 0);
    }
    std::vector<std::int32_t> node_of_rank(static_cast<std::size_t>(ranks));
    for (std::size_t r = 0; r < node_of_rank.size(); ++r) {
      node_of_rank[r] = static_cast<std::int32_t>(static_cast<std::int64_t>(r) / ranks_per_node);
    }
    return topology(std::move(node_of_rank), block_placement(ranks, experts));
  }

  /// Explicit maps: node_of_rank[r] for each rank and rank_of_expert[e] for each expert.
  topology(std::vector<std::int32_t> node_of_rank, std::vector<std::int32_t> rank_of_expert)
      : node_of_rank_(std::move(node_of_rank)), rank_of_expert_(std::move(rank_of_expert)) {
    constexpr const char* fn = "locmoe::topology";
    check_count(fn, "node_of_rank.size()", static_cast<std::int64_t>(node_of_rank_.size()));
    check_count(fn, "rank_of_expert.size()", static_cast<std::int64_t>(rank_of_expert_.size()));
    for (std::size_t r = 0; r < node_of_rank_.size(); ++r) {
      if (node_of_rank_[r] < 0 || static_cast<std::size_t>(node_of_rank_[r]) >= node_of_rank_.size()) {
        detail::raise<construction_policy>(errc::domain, fn, "node_of_rank",
                                      "[" + std::to_string(r) + "] = " + std::to_string(node_of_rank_[r]),
                                      "node ids must be in [0, ranks): every node holds a rank", 0);
      }
      nodes_ = std::max<std::size_t>(nodes_, static_cast<std::size_t>(node_of_rank_[r]) + 1);
    }
    for (std::size_t e = 0; e < rank_of_expert_.size(); ++e) {
      const std::int32_t r = rank_of_expert_[e];
      if (r < 0 || static_cast<std::size_t>(r) >= node_of_rank_.size()) {
        detail::raise<construction_policy>(errc::domain, fn, "rank_of_expert",
                                      "[" + std::to_string(e) + "] = " + std::to_string(r),
                                      "every expert must live on a rank in [0, ranks)", 0);
      }
    }
    experts_on_node_.assign(nodes_, 0);
    node_of_expert_.resize(rank_of_expert_.size());
    for (std::size_t e = 0; e < rank_of_expert_.size(); ++e) {
      node_of_expert_[e] = node_of_rank_[static_cast<std::size_t>(rank_of_expert_[e])];
      ++experts_on_node_[static_cast<std::size_t>(node_of_expert_[e])];
    }
  }

  /// Block placement of n experts over R ranks: expert e on rank floor(e * R / n).
  static std::vector<std::int32_t> block_placement(std::int64_t ranks, std::int64_t experts) {
    constexpr const char* fn = "locmoe::topology::block_placement";
    check_count(fn, "ranks", ranks);
    check_count(fn, "experts", experts);
    std::vector<std::int32_t> rank_of_expert(static_cast<std::size_t>(experts));
    for (std::size_t e = 0; e < rank_of_expert.size(); ++e) {  // e * R < 2^62: both counts are below 2^31
      rank_of_expert[e] = static_cast<std::int32_t>(static_cast<std::int64_t>(e) * ranks / experts);
    }
    return rank_of_expert;
  }

  std::size_t ranks() const noexcept { return node_of_rank_.size(); }
  std::size_t nodes() const noexcept { return nodes_; }
  std::size_t experts() const noexcept { return rank_of_expert_.size(); }

  std::int32_t node_of_rank(std::size_t rank) const { return node_of_rank_.at(rank); }
  std::int32_t rank_of_expert(std::size_t expert) const { return rank_of_expert_.at(expert); }
  std::int32_t node_of_expert(std::size_t expert) const { return node_of_expert_.at(expert); }
  /// How many experts live on `node` (0 for a node without experts).
  std::size_t experts_on_node(std::size_t node) const { return experts_on_node_.at(node); }
  /// Whether expert e is on the node of rank r.
  bool is_local(std::size_t expert, std::size_t rank) const { return node_of_expert(expert) == node_of_rank(rank); }

  const std::vector<std::int32_t>& node_of_rank_map() const noexcept { return node_of_rank_; }
  const std::vector<std::int32_t>& rank_of_expert_map() const noexcept { return rank_of_expert_; }
  const std::vector<std::int32_t>& node_of_expert_map() const noexcept { return node_of_expert_; }

 private:
  static void check_count(const char* fn, const char* argument, std::int64_t value) {
    if (value < 1 || value > INT32_MAX) {
      detail::raise<construction_policy>(errc::domain, fn, argument, value, "must satisfy 1 <= value <= 2^31 - 1", 0);
    }
  }

  std::vector<std::int32_t> node_of_rank_;
  std::vector<std::int32_t> rank_of_expert_;
  std::vector<std::int32_t> node_of_expert_;
  std::vector<std::size_t> experts_on_node_;
  std::size_t nodes_ = 0;
};

/// Whose tokens a batch holds, for the calls that need each token's source rank (capacity_assigner's statistics
/// and locality overflow, the locality loss, dispatch plans). One of:
///   token_ranks::local(r)            rank-local (expert parallelism): every token is rank r's
///   token_ranks(token_rank)          a batch of all ranks' tokens, token_rank[t] the rank of token t ([T])
///   token_ranks::contiguous_blocks() a batch of all ranks' tokens in R blocks: token t on rank floor(t R / T)
/// A default token_ranks says nothing: that is fine with one rank (everything is rank 0's) and an error with
/// more, which names the three choices (a batch is never split over ranks by guess).
struct token_ranks {
  const std::int32_t* per_token = nullptr;  ///< [T] each token's rank, or null
  std::int32_t rank = -1;                   ///< >= 0: every token is this rank's
  bool blocks = false;                      ///< contiguous blocks over the ranks

  constexpr token_ranks() noexcept = default;
  /// Each token's rank, token_rank[t] (null: nothing said).
  constexpr token_ranks(const std::int32_t* token_rank) noexcept : per_token(token_rank) {}  // NOLINT: implicit
  static constexpr token_ranks local(std::int32_t this_rank) noexcept {
    token_ranks r;
    r.rank = this_rank;
    return r;
  }
  static constexpr token_ranks contiguous_blocks() noexcept {
    token_ranks r;
    r.blocks = true;
    return r;
  }
  constexpr bool given() const noexcept { return per_token != nullptr || rank >= 0 || blocks; }
};

namespace detail {

/// The source rank of each token (token_ranks resolved); run_end(t, limit) is the first row after t, up to
/// limit, on another rank. Shared by assign, losses and dispatch.
struct rank_map {
  const std::int32_t* token_rank = nullptr;
  std::size_t ranks = 1, tokens = 0;
  std::int64_t fixed = -1;  ///< >= 0: every token on this rank

  std::size_t rank(std::size_t t) const noexcept {
    if (fixed >= 0) return static_cast<std::size_t>(fixed);
    if (token_rank) return static_cast<std::size_t>(token_rank[t]);
    return ranks == 1 ? 0 : t * ranks / tokens;
  }
  std::size_t run_end(std::size_t t, std::size_t limit) const noexcept {
    if (fixed >= 0) return limit;
    if (token_rank) {
      std::size_t end = t + 1;
      while (end < limit && token_rank[end] == token_rank[t]) ++end;
      return end;
    }
    if (ranks == 1) return limit;
    const std::size_t next = rank(t) + 1;  // first row of rank r + 1: ceil((r + 1) T / R)
    return std::min(limit, (next * tokens + ranks - 1) / ranks);
  }
};

/// Checks `sources` for a batch of T tokens over R ranks (exactly one choice with R > 1; ranks in [0, R)) and
/// resolves it into `map`; reports the first problem, naming `argument`.
template <class Policy>
bool resolve_token_ranks(const char* fn, const char* argument, const token_ranks& sources, std::size_t tokens,
                         std::size_t ranks, rank_map& map) {
  const int choices = (sources.per_token != nullptr) + (sources.rank >= 0) + sources.blocks;
  if (choices > 1) {
    return raise<Policy>(errc::domain, fn, argument, "more than one", "give one of local(rank), token_rank[T] or "
                         "contiguous_blocks()", false);
  }
  if (sources.rank < -1 || (sources.rank >= 0 && static_cast<std::size_t>(sources.rank) >= ranks)) {
    return raise<Policy>(errc::domain, fn, argument, "local(" + std::to_string(sources.rank) + ")",
                         "this rank must be in [0, ranks)", false);
  }
  if (choices == 0 && ranks > 1 && tokens > 0) {
    return raise<Policy>(errc::domain, fn, argument, "none",
                         "with more than one rank, say whose tokens these are: token_ranks::local(rank) for this "
                         "rank's, token_rank[T] for each token's, or token_ranks::contiguous_blocks()", false);
  }
  for (std::size_t t = 0; sources.per_token && t < tokens; ++t) {
    if (sources.per_token[t] < 0 || static_cast<std::size_t>(sources.per_token[t]) >= ranks) {
      return raise<Policy>(errc::domain, fn, argument,
                           "[" + std::to_string(t) + "] = " + std::to_string(sources.per_token[t]),
                           "every token's rank must be in [0, ranks)", false);
    }
  }
  map = rank_map{sources.per_token, ranks, tokens, sources.rank >= 0 ? sources.rank : -1};
  return true;
}

}  // namespace detail
}  // namespace locmoe
