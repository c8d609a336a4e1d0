// locmoe/exchange.hpp - how the bytes of a dispatch plan travel: flat and group-wise All-to-All plans, with the
// bytes on each link class in each stage, and the route every row takes.
//
// Input: the send matrix S[src][dst] in bytes ([R x R], source-major: dispatch_plan::send_bytes) and the topology.
// Schemes (a row from rank s on node a to rank t on node b; pos(r) is r's index among its node's ranks):
//   flat          one All-to-All: s -> t directly.
//   split_gather  the paper's group-wise exchange (LocMoE section 3.2, MindSpore's group-wise All-to-All): the
//                 inter-node part is split across the devices of the node, each exchanging only with its peer at
//                 the same position in the other nodes (the EP domain), then gathered inside the node (the TP
//                 domain). Stage 0: s -> p = the rank at position pos(s) mod |b| of node b (when a != b);
//                 stage 1: p -> t inside node b (rows for the own node go s -> t here). With
//                 replicate_in_node, stage 1 is the paper's All-Gather: every rank of node b receives every row
//                 bound for node b (experts sharded over the node, as with the paper's tensor parallelism).
//   two_level     HetuMoE's hierarchical All-to-All: aggregate by destination node
//                 inside the source node, one inter-node message per node pair, scatter inside the destination
//                 node. The gateways of the pair (a, b) are g_a = rank pos b mod |a| of node a and g_b = rank
//                 pos a mod |b| of node b. Stage 0: s -> g_a (rows for the own node go s -> t here); stage 1:
//                 g_a -> g_b; stage 2: g_b -> t.
// Every scheme delivers the rows of S[s][t] to t (exchange_router / exchange_route list the hops; a hop to the same rank is
// skipped); bytes that stay on their rank (S[s][s]) never travel and are reported as local_bytes.
// Cost: building O(R^2 * stages) time and memory; exchange_router O(R) once, then O(1) per route.
//
// The alpha-beta model (comm_model, model_exchange_time): in each stage a rank sends and receives over two link
// classes, its intra-node links and its inter-node port, which work concurrently and in full duplex; on each
// class messages serialize: t(rank, class) = alpha * max(messages sent, received) + max(bytes sent, received) /
// beta. A rank's stage time is the larger of its two classes, a stage lasts as long as its slowest rank, and the
// stages of a plan run one after the other. Defaults and their sources: docs/theory.md#the-communication-model.
// Thread safety: plans, exchange_router and comm_model are immutable once built and may be shared across threads;
// the functions keep no state.
// Example: docs/api.md#exchange-plans-and-the-communication-model.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/topology.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace locmoe {

/// Where a message travels: inside one node (intra-node links) or between nodes (the network).
enum class link_class : std::uint8_t { intra_node = 0, inter_node = 1 };
inline constexpr std::size_t link_class_count = 2;

enum class exchange_scheme { flat, split_gather, two_level };

inline const char* to_string(exchange_scheme s) noexcept {
  switch (s) {
    case exchange_scheme::flat: return "flat";
    case exchange_scheme::split_gather: return "split_gather";
    case exchange_scheme::two_level: return "two_level";
  }
  return "?";
}

struct exchange_options {
  exchange_scheme scheme = exchange_scheme::flat;
  /// split_gather only: stage 1 is an All-Gather (every rank of the destination node gets every row for it).
  bool replicate_in_node = false;
};

/// One message: `bytes` from rank `source` to rank `destination` (never the same rank).
struct transfer {
  std::int32_t source = 0, destination = 0;
  std::int64_t bytes = 0;
};

struct exchange_stage {
  std::string name;
  std::vector<transfer> transfers;                       ///< sorted by (source, destination); bytes > 0
  std::array<std::int64_t, link_class_count> bytes{};    ///< by link_class
  std::array<std::int64_t, link_class_count> messages{}; ///< by link_class
};

struct exchange_plan {
  exchange_options options;
  std::size_t ranks = 0, nodes = 0;
  std::vector<std::int32_t> node_of_rank;  ///< the topology's map the plan was built on
  std::vector<exchange_stage> stages;
  std::int64_t local_bytes = 0;  ///< sum of S[r][r]: rows that stay on their rank
  std::array<std::int64_t, link_class_count> total_bytes{};  ///< by link_class, over the stages (fits int64: checked)

  /// Bytes over one link class, summed over the stages.
  std::int64_t bytes(link_class c) const noexcept { return total_bytes[static_cast<std::size_t>(c)]; }
};

/// One hop of a row: in stage `stage`, from rank `from` to rank `to`.
struct exchange_hop {
  std::size_t stage = 0;
  std::int32_t from = 0, to = 0;
};

namespace detail {

/// The ranks of every node in rank order, and each rank's position in its node.
struct node_layout {
  std::vector<std::vector<std::int32_t>> ranks_of_node;
  std::vector<std::size_t> position;

  explicit node_layout(const topology& topo) : ranks_of_node(topo.nodes()), position(topo.ranks()) {
    for (std::size_t r = 0; r < topo.ranks(); ++r) {
      auto& members = ranks_of_node[static_cast<std::size_t>(topo.node_of_rank(r))];
      position[r] = members.size();
      members.push_back(static_cast<std::int32_t>(r));
    }
  }
  /// The rank at position `index mod |node|` of `node`.
  std::int32_t member(std::size_t node, std::size_t index) const {
    const auto& m = ranks_of_node[node];
    return m[index % m.size()];
  }
};

inline void check_scheme(const char* fn, const char* argument, exchange_scheme s) {
  if (s != exchange_scheme::flat && s != exchange_scheme::split_gather && s != exchange_scheme::two_level) {
    raise<construction_policy>(errc::domain, fn, argument, static_cast<int>(s), "must be flat, split_gather or two_level", 0);
  }
}

inline std::size_t stage_count(exchange_scheme s) noexcept {
  return s == exchange_scheme::flat ? 1 : s == exchange_scheme::split_gather ? 2 : 3;
}

inline void push_hop(std::vector<exchange_hop>& hops, std::size_t stage, std::int32_t from, std::int32_t to) {
  if (from != to) hops.push_back({stage, from, to});
}

inline std::vector<exchange_hop> route(const topology& topo, const node_layout& layout, exchange_scheme scheme,
                                       std::size_t source, std::size_t destination) {
  std::vector<exchange_hop> hops;
  const auto s = static_cast<std::int32_t>(source), t = static_cast<std::int32_t>(destination);
  const auto a = static_cast<std::size_t>(topo.node_of_rank(source));
  const auto b = static_cast<std::size_t>(topo.node_of_rank(destination));
  switch (scheme) {
    case exchange_scheme::flat:
      push_hop(hops, 0, s, t);
      break;
    case exchange_scheme::split_gather: {
      if (a == b) {
        push_hop(hops, 1, s, t);
        break;
      }
      const std::int32_t peer = layout.member(b, layout.position[source]);
      push_hop(hops, 0, s, peer);
      push_hop(hops, 1, peer, t);
      break;
    }
    case exchange_scheme::two_level: {
      if (a == b) {
        push_hop(hops, 0, s, t);
        break;
      }
      const std::int32_t gate_a = layout.member(a, b), gate_b = layout.member(b, a);
      push_hop(hops, 0, s, gate_a);
      push_hop(hops, 1, gate_a, gate_b);
      push_hop(hops, 2, gate_b, t);
      break;
    }
  }
  return hops;
}

inline std::int64_t checked_add(std::int64_t a, std::int64_t b, const char* fn) {
  if (b > std::numeric_limits<std::int64_t>::max() - a) {
    raise<construction_policy>(errc::overflow, fn, "send_bytes", "", "the bytes of one stage and link must fit an int64", 0);
  }
  return a + b;
}

}  // namespace detail

/// Routes of rows under every scheme on one topology: builds the node layout once (O(R)), then each route is
/// O(1). Holds a reference to the topology, which must outlive it.
class exchange_router {
 public:
  explicit exchange_router(const topology& topo) : topo_(topo), layout_(topo) {}
  exchange_router(topology&&) = delete;  // it keeps a reference: the topology must outlive the router

  /// The hops a row takes from rank `source` to rank `destination` (empty when they are the same rank). For
  /// split_gather with replicate_in_node the last hop is the row's copy for its destination; the All-Gather
  /// also sends it to the node's other ranks. Throws locmoe::error for a rank outside [0, R).
  std::vector<exchange_hop> route(exchange_scheme scheme, std::size_t source, std::size_t destination) const {
    constexpr const char* fn = "locmoe::exchange_route";
    detail::check_scheme(fn, "scheme", scheme);
    if (source >= topo_.ranks()) detail::raise<construction_policy>(errc::domain, fn, "source", source, "must be a rank in [0, R)", 0);
    if (destination >= topo_.ranks()) {
      detail::raise<construction_policy>(errc::domain, fn, "destination", destination, "must be a rank in [0, R)", 0);
    }
    return detail::route(topo_, layout_, scheme, source, destination);
  }

  /// two_level: the rank of node `from` that carries its traffic for node `to` (position to mod |from|).
  /// Throws locmoe::error unless both are nodes that hold ranks.
  std::int32_t gateway(std::size_t from, std::size_t to) const {
    constexpr const char* fn = "locmoe::exchange_router::gateway";
    for (const auto& [argument, node] : {std::pair<const char*, std::size_t>{"from", from}, {"to", to}}) {
      if (node >= layout_.ranks_of_node.size() || layout_.ranks_of_node[node].empty()) {
        detail::raise<construction_policy>(errc::domain, fn, argument, node, "must be a node that holds ranks", 0);
      }
    }
    return layout_.member(from, to);
  }

 private:
  const topology& topo_;
  detail::node_layout layout_;
};

/// exchange_router(topo).route(scheme, source, destination): one route (O(R): prefer exchange_router for many).
inline std::vector<exchange_hop> exchange_route(const topology& topo, exchange_scheme scheme, std::size_t source,
                                                std::size_t destination) {
  return exchange_router(topo).route(scheme, source, destination);
}

/// Builds the plan of a send matrix S ([R x R] bytes, source-major, entries >= 0) under options.scheme; throws
/// locmoe::error when S has the wrong size, a negative entry, or sums that overflow int64.
inline exchange_plan build_exchange_plan(const std::vector<std::int64_t>& send_bytes, const topology& topo,
                                         const exchange_options& options = {}) {
  constexpr const char* fn = "locmoe::build_exchange_plan";
  const std::size_t ranks = topo.ranks();
  if (send_bytes.size() != ranks * ranks) {
    detail::raise<construction_policy>(errc::domain, fn, "send_bytes", send_bytes.size(),
                                  "must hold R x R entries (R = topology ranks)", 0);
  }
  detail::check_scheme(fn, "options.scheme", options.scheme);
  if (options.replicate_in_node && options.scheme != exchange_scheme::split_gather) {
    detail::raise<construction_policy>(errc::domain, fn, "options.replicate_in_node", "true",
                                  "applies to the split_gather scheme only", 0);
  }
  for (std::size_t i = 0; i < send_bytes.size(); ++i) {
    if (send_bytes[i] < 0) {
      detail::raise<construction_policy>(errc::domain, fn, "send_bytes",
                                    "[" + std::to_string(i / ranks) + "][" + std::to_string(i % ranks) + "] = " +
                                        std::to_string(send_bytes[i]),
                                    "entries must be >= 0", 0);
    }
  }
  const detail::node_layout layout(topo);
  const std::size_t stages = detail::stage_count(options.scheme);
  std::vector<std::int64_t> moved(stages * ranks * ranks, 0);  // [stage][from][to]
  exchange_plan plan;
  plan.options = options;
  plan.ranks = ranks;
  plan.nodes = topo.nodes();
  plan.node_of_rank = topo.node_of_rank_map();
  for (std::size_t s = 0; s < ranks; ++s) {
    for (std::size_t t = 0; t < ranks; ++t) {
      const std::int64_t bytes = send_bytes[s * ranks + t];
      if (bytes == 0) continue;
      if (s == t) plan.local_bytes = detail::checked_add(plan.local_bytes, bytes, fn);
      for (const exchange_hop& h : detail::route(topo, layout, options.scheme, s, t)) {
        std::int64_t& cell = moved[(h.stage * ranks + static_cast<std::size_t>(h.from)) * ranks + static_cast<std::size_t>(h.to)];
        cell = detail::checked_add(cell, bytes, fn);
      }
    }
  }
  if (options.replicate_in_node) {
    // The All-Gather: what each rank holds for its own node after stage 0 goes to the node's other ranks.
    std::vector<std::int64_t> held(ranks, 0);
    for (std::size_t s = 0; s < ranks; ++s) {
      for (std::size_t t = 0; t < ranks; ++t) {
        const std::int64_t bytes = send_bytes[s * ranks + t];
        if (bytes == 0) continue;
        const auto b = static_cast<std::size_t>(topo.node_of_rank(t));
        const std::size_t holder = topo.node_of_rank(s) == topo.node_of_rank(t)
                                       ? s : static_cast<std::size_t>(layout.member(b, layout.position[s]));
        held[holder] = detail::checked_add(held[holder], bytes, fn);
      }
    }
    std::fill(moved.begin() + static_cast<std::ptrdiff_t>(ranks * ranks), moved.end(), 0);
    for (std::size_t from = 0; from < ranks; ++from) {
      for (const std::int32_t to : layout.ranks_of_node[static_cast<std::size_t>(topo.node_of_rank(from))]) {
        if (static_cast<std::size_t>(to) != from) moved[(ranks + from) * ranks + static_cast<std::size_t>(to)] = held[from];
      }
    }
  }
  static const char* const names[3][3] = {
      {"all-to-all", "", ""},
      {"inter-node all-to-all between peers", "intra-node gather", ""},
      {"intra-node gather to gateways", "inter-node exchange between gateways", "intra-node scatter"}};
  plan.stages.resize(stages);
  for (std::size_t st = 0; st < stages; ++st) {
    exchange_stage& stage = plan.stages[st];
    stage.name = names[static_cast<std::size_t>(options.scheme)][st];
    if (options.replicate_in_node && st == 1) stage.name = "intra-node all-gather";
    for (std::size_t from = 0; from < ranks; ++from) {
      for (std::size_t to = 0; to < ranks; ++to) {
        const std::int64_t bytes = moved[(st * ranks + from) * ranks + to];
        if (bytes == 0) continue;
        stage.transfers.push_back({static_cast<std::int32_t>(from), static_cast<std::int32_t>(to), bytes});
        const auto c = static_cast<std::size_t>(topo.node_of_rank(from) == topo.node_of_rank(to) ? link_class::intra_node
                                                                                                  : link_class::inter_node);
        stage.bytes[c] = detail::checked_add(stage.bytes[c], bytes, fn);
        plan.total_bytes[c] = detail::checked_add(plan.total_bytes[c], bytes, fn);
        ++stage.messages[c];
      }
    }
  }
  return plan;
}

/// Cost of one link class for one device: a fixed latency per message and a bandwidth per direction.
struct link_cost {
  double latency_seconds = 0;
  double bytes_per_second = 1;
};

/// The alpha-beta model's parameters: one link_cost per link class (see the header comment for the model).
struct comm_model {
  link_cost intra_node;
  link_cost inter_node;

  /// Ascend 910A servers (Atlas 800 model 9000: 8 NPUs, one 100 Gb/s RoCE port each): the paper's clusters.
  /// Bandwidths: Huawei msprof's reference link speeds for this chip (HCCS 18 GB/s, RDMA 12.5 GB/s); latencies:
  /// NCCL's tuning model (3.4 us on NVLink, 9.6 us on the network), for want of a published HCCL figure.
  /// Sources and quotes: docs/theory.md#the-communication-model.
  static comm_model ascend_910() noexcept { return {{3.4e-6, 18e9}, {9.6e-6, 12.5e9}}; }
  /// NVIDIA DGX A100: NVLink 3 through NVSwitch (300 GB/s per direction per GPU), one 200 Gb/s HDR InfiniBand
  /// port per GPU (25 GB/s); latencies as above.
  static comm_model dgx_a100() noexcept { return {{3.4e-6, 300e9}, {9.6e-6, 25e9}}; }

  const link_cost& operator[](link_class c) const noexcept { return c == link_class::intra_node ? intra_node : inter_node; }
};

struct stage_time {
  double seconds = 0;
  std::int32_t slowest_rank = -1;                ///< -1 for a stage that moves nothing
  link_class bottleneck = link_class::intra_node;  ///< the slowest rank's slower class
};

struct exchange_time {
  double seconds = 0;  ///< sum over the stages
  std::vector<stage_time> stages;
};

/// The modelled time of a plan (see the header comment); throws locmoe::error on a negative or non-finite
/// latency, or a bandwidth that is not a positive finite number.
inline exchange_time model_exchange_time(const exchange_plan& plan, const topology& topo, const comm_model& model) {
  constexpr const char* fn = "locmoe::model_exchange_time";
  for (const link_class c : {link_class::intra_node, link_class::inter_node}) {
    const bool intra = c == link_class::intra_node;
    const link_cost& l = model[c];
    if (!(l.latency_seconds >= 0) || !std::isfinite(l.latency_seconds)) {
      detail::raise<construction_policy>(errc::domain, fn, intra ? "model.intra_node.latency_seconds" : "model.inter_node.latency_seconds",
                                    l.latency_seconds, "must be finite and >= 0", 0);
    }
    if (!(l.bytes_per_second > 0) || !std::isfinite(l.bytes_per_second)) {
      detail::raise<construction_policy>(errc::domain, fn, intra ? "model.intra_node.bytes_per_second" : "model.inter_node.bytes_per_second",
                                    l.bytes_per_second, "must be finite and > 0", 0);
    }
  }
  if (plan.ranks != topo.ranks() || plan.node_of_rank != topo.node_of_rank_map()) {
    detail::raise<construction_policy>(errc::domain, fn, "topo", topo.ranks(),
                                  "must be the topology the plan was built on (same ranks and nodes)", 0);
  }
  for (std::size_t i = 0; i < plan.stages.size(); ++i) {
    for (std::size_t j = 0; j < plan.stages[i].transfers.size(); ++j) {
      const transfer& m = plan.stages[i].transfers[j];
      const auto in_range = [&](std::int32_t r) { return r >= 0 && static_cast<std::size_t>(r) < plan.ranks; };
      if (!in_range(m.source) || !in_range(m.destination) || m.source == m.destination || m.bytes <= 0) {
        const std::string where = "stages[" + std::to_string(i) + "].transfers[" + std::to_string(j) + "] = {" +
                                  std::to_string(m.source) + ", " + std::to_string(m.destination) + ", " +
                                  std::to_string(m.bytes) + "}";
        detail::raise<construction_policy>(errc::domain, fn, "plan", where,
                                      "a transfer joins two different ranks in [0, R) and carries bytes > 0", 0);
      }
    }
  }
  exchange_time result;
  struct side { std::int64_t messages = 0, bytes = 0; };
  std::vector<std::array<side, 2 * link_class_count>> load(plan.ranks);  // [rank][class * 2 + (0 sent, 1 received)]
  for (const exchange_stage& stage : plan.stages) {
    for (auto& l : load) l = {};
    for (const transfer& m : stage.transfers) {
      const std::size_t c = topo.node_of_rank(static_cast<std::size_t>(m.source)) == topo.node_of_rank(static_cast<std::size_t>(m.destination)) ? 0 : 1;
      side& out = load[static_cast<std::size_t>(m.source)][c * 2];
      side& in = load[static_cast<std::size_t>(m.destination)][c * 2 + 1];
      ++out.messages;
      ++in.messages;
      out.bytes += m.bytes;
      in.bytes += m.bytes;
    }
    stage_time st;
    for (std::size_t r = 0; r < plan.ranks; ++r) {
      for (std::size_t c = 0; c < link_class_count; ++c) {
        const side& out = load[r][c * 2];
        const side& in = load[r][c * 2 + 1];
        if (out.messages == 0 && in.messages == 0) continue;
        const link_cost& l = model[static_cast<link_class>(c)];
        const double t = l.latency_seconds * static_cast<double>(std::max(out.messages, in.messages)) +
                         static_cast<double>(std::max(out.bytes, in.bytes)) / l.bytes_per_second;
        if (t > st.seconds || st.slowest_rank < 0) {
          st.seconds = t;
          st.slowest_rank = static_cast<std::int32_t>(r);
          st.bottleneck = static_cast<link_class>(c);
        }
      }
    }
    result.seconds += st.seconds;
    result.stages.push_back(st);
  }
  return result;
}

}  // namespace locmoe
