// mpi_exchange_comm.hpp - how mpi_exchange.cpp moves rows between ranks: a flat All-to-Allv, or HetuMoE's
// two-level exchange through node gateways (exchange.hpp's two_level routes), both with the counts each rank
// announces checked against what the receiver's plan expects before any row moves.
//
// A move's rows are blocks: the rows rank s sends rank t are one contiguous range of s's buffer (its grouped
// layout, or its return buffer), and land as one range of t's buffer. Both schemes deliver the same bytes: block
// (s, t) at t's offset for s. Messages carry bare rows; each side derives what a message holds from the counts.
#pragma once

#include <locmoe/exchange.hpp>
#include <locmoe/topology.hpp>

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace mpi_example {

/// A communicator and the world rank of each of its ranks.
struct comm_group {
  MPI_Comm comm = MPI_COMM_NULL;
  int self = 0;               // this process's world rank
  std::vector<int> members;   // comm rank -> world rank
  std::vector<int> index_of;  // world rank -> comm rank, -1 outside
};

inline comm_group make_group(MPI_Comm comm, int self, int world) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  comm_group g{comm, self, std::vector<int>(static_cast<std::size_t>(size)), std::vector<int>(static_cast<std::size_t>(world), -1)};
  MPI_Allgather(&self, 1, MPI_INT, g.members.data(), 1, MPI_INT, comm);
  for (int c = 0; c < size; ++c) g.index_of[static_cast<std::size_t>(g.members[static_cast<std::size_t>(c)])] = c;
  return g;
}

inline int as_count(std::size_t value) {
  if (value > static_cast<std::size_t>(INT_MAX)) throw std::overflow_error("a message exceeds MPI's int count");
  return static_cast<int>(value);
}

/// Alltoallv of rows of d floats over g (send: each peer's rows one after the other; recv: room for the
/// expected rows, peer after peer), after a check: every rank announces its row counts (MPI_Alltoall) and each
/// receiver compares them with what its plan expects. On a mismatch the receiver names both ranks and both
/// counts, and all ranks return false together (an Allreduce over the world, where every rank makes the same
/// calls), so no rank waits for rows that never come. Peer lie_to (-1: none) is announced one row more than is
/// sent: the bad-plan test.
inline bool alltoallv_rows(const comm_group& g, std::size_t d, const float* send, const std::vector<std::size_t>& send_rows,
                           const std::vector<std::size_t>& expected_rows, int lie_to, float* recv, const std::string& what) {
  const std::size_t peers = g.members.size();
  std::vector<int> announced(peers), heard(peers);
  for (std::size_t c = 0; c < peers; ++c) announced[c] = as_count(send_rows[c]) + (static_cast<int>(c) == lie_to);
  MPI_Alltoall(announced.data(), 1, MPI_INT, heard.data(), 1, MPI_INT, g.comm);
  int mismatch = 0, any_mismatch = 0;
  for (std::size_t c = 0; c < peers; ++c) {
    if (static_cast<std::size_t>(heard[c]) == expected_rows[c]) continue;
    std::fprintf(stderr, "mpi_exchange: %s: rank %d announced %d rows for rank %d, the plan says %zu\n", what.c_str(),
                 g.members[c], heard[c], g.self, expected_rows[c]);
    mismatch = 1;
  }
  MPI_Allreduce(&mismatch, &any_mismatch, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_mismatch) return false;
  std::vector<int> send_count(peers), send_at(peers), recv_count(peers), recv_at(peers);
  std::size_t sent = 0, received = 0;  // in floats
  for (std::size_t c = 0; c < peers; ++c) {
    send_at[c] = as_count(sent);
    recv_at[c] = as_count(received);
    send_count[c] = as_count(send_rows[c] * d);
    recv_count[c] = as_count(expected_rows[c] * d);
    sent += send_rows[c] * d;
    received += expected_rows[c] * d;
  }
  MPI_Alltoallv(send, send_count.data(), send_at.data(), MPI_FLOAT, recv, recv_count.data(), recv_at.data(), MPI_FLOAT, g.comm);
  return true;
}

/// One move's rows on this rank: `from` holds the rows for world rank q at rows [from_offset[q], from_offset[q+1]),
/// the rows from rank s land in `to` at [to_offset[s], to_offset[s+1]). sent_bytes[stage][world rank] collects
/// the bytes this rank sent (rows that stay on the rank are not counted).
struct row_move {
  std::size_t d = 0;
  const float* from = nullptr;
  const std::vector<std::int64_t>* from_offset = nullptr;
  float* to = nullptr;
  const std::vector<std::int64_t>* to_offset = nullptr;
  std::string what;
  int lie_to = -1;  // a world rank this rank announces one row too many to (flat only), or -1
};

inline std::size_t block_rows(const std::vector<std::int64_t>& offset, std::size_t peer) {
  return static_cast<std::size_t>(offset[peer + 1] - offset[peer]);
}

/// The flat exchange: one MPI_Alltoallv over the world (the layouts are already in peer order).
inline bool flat_move(const comm_group& world, const row_move& m, std::vector<std::vector<std::int64_t>>& sent_bytes) {
  const std::size_t ranks = world.members.size();
  std::vector<std::size_t> send_rows(ranks), expected(ranks);
  for (std::size_t q = 0; q < ranks; ++q) {
    send_rows[q] = block_rows(*m.from_offset, q);
    expected[q] = block_rows(*m.to_offset, q);
  }
  if (!alltoallv_rows(world, m.d, m.from, send_rows, expected, m.lie_to, m.to, m.what)) return false;
  for (std::size_t q = 0; q < ranks; ++q) {
    if (static_cast<int>(q) != world.self) sent_bytes[0][q] += static_cast<std::int64_t>(send_rows[q] * m.d * sizeof(float));
  }
  return true;
}

/// The two-level exchange: block (s, t) follows exchange_router's two_level hops (stage 0 to s's gateway for
/// t's node, stage 1 between the gateways, stage 2 to t), stages 0 and 2 on the node's communicator, stage 1 on
/// the world's. `matrix` [R x R] holds every block's rows (source-major: counts only, all-gathered). In each stage
/// a message holds its blocks in (source, destination) order, which the receiver derives from the matrix too.
inline bool two_level_move(const comm_group& world, const comm_group& node, const locmoe::topology& topo,
                           const std::vector<std::int64_t>& matrix, const row_move& m,
                           std::vector<std::vector<std::int64_t>>& sent_bytes) {
  const std::size_t R = topo.ranks(), d = m.d;
  const auto me = static_cast<std::size_t>(world.self);
  const locmoe::exchange_router router(topo);
  using block = std::pair<std::size_t, std::size_t>;  // (source, destination)
  std::map<block, std::vector<locmoe::exchange_hop>> hops;
  std::map<block, std::vector<float>> held;  // the blocks on this rank, in (source, destination) order
  for (std::size_t s = 0; s < R; ++s) {
    for (std::size_t t = 0; t < R; ++t) {
      if (matrix[s * R + t] > 0) hops[{s, t}] = router.route(locmoe::exchange_scheme::two_level, s, t);
    }
  }
  for (std::size_t t = 0; t < R; ++t) {
    const std::size_t rows = block_rows(*m.from_offset, t);
    if (rows != static_cast<std::size_t>(matrix[me * R + t])) throw std::logic_error(m.what + ": the send matrix disagrees with the layout");
    if (rows > 0) {
      const float* begin = m.from + static_cast<std::size_t>((*m.from_offset)[t]) * d;
      held[{me, t}].assign(begin, begin + rows * d);
    }
  }
  for (std::size_t stage = 0; stage < 3; ++stage) {
    const comm_group& g = stage == 1 ? world : node;
    const std::size_t peers = g.members.size();
    const auto hop_of = [&](const block& b) -> const locmoe::exchange_hop* {
      for (const locmoe::exchange_hop& h : hops.at(b))
        if (h.stage == stage) return &h;
      return nullptr;
    };
    const auto peer_of = [&](std::int32_t world_rank) {
      const int c = g.index_of[static_cast<std::size_t>(world_rank)];
      if (c < 0) throw std::logic_error(m.what + ": a hop leaves its communicator");
      return static_cast<std::size_t>(c);
    };
    // Outgoing blocks per peer, and the blocks each peer sends here, both in (source, destination) order.
    std::vector<std::vector<block>> out(peers), in(peers);
    for (const auto& [b, rows] : held) {
      const locmoe::exchange_hop* h = hop_of(b);
      if (h && h->from == world.self) out[peer_of(h->to)].push_back(b);
    }
    for (const auto& [b, route] : hops) {
      const locmoe::exchange_hop* h = hop_of(b);
      if (h && h->to == world.self) in[peer_of(h->from)].push_back(b);
    }
    std::vector<std::size_t> send_rows(peers, 0), recv_rows(peers, 0);
    std::vector<float> send, recv;
    for (std::size_t c = 0; c < peers; ++c) {
      for (const block& b : out[c]) {
        send_rows[c] += static_cast<std::size_t>(matrix[b.first * R + b.second]);
        send.insert(send.end(), held[b].begin(), held[b].end());
        held.erase(b);
      }
      for (const block& b : in[c]) recv_rows[c] += static_cast<std::size_t>(matrix[b.first * R + b.second]);
    }
    std::size_t received = 0;
    for (const std::size_t rows : recv_rows) received += rows;
    recv.resize(received * d);
    if (!alltoallv_rows(g, d, send.data(), send_rows, recv_rows, -1, recv.data(), m.what + ", stage " + std::to_string(stage))) {
      return false;
    }
    std::size_t at = 0;  // received rows arrive peer after peer, each peer's blocks in order: the `in` lists
    for (std::size_t c = 0; c < peers; ++c) {
      sent_bytes[stage][static_cast<std::size_t>(g.members[c])] += static_cast<std::int64_t>(send_rows[c] * d * sizeof(float));
      for (const block& b : in[c]) {
        const auto rows = static_cast<std::size_t>(matrix[b.first * R + b.second]);
        held[b].assign(recv.begin() + static_cast<std::ptrdiff_t>(at * d), recv.begin() + static_cast<std::ptrdiff_t>((at + rows) * d));
        at += rows;
      }
    }
  }
  // Every block for this rank, and nothing else, is here now: into the receive layout, source by source.
  for (const auto& [b, rows] : held) {
    if (b.second != me) throw std::logic_error(m.what + ": a block stopped on the wrong rank");
    if (rows.size() != block_rows(*m.to_offset, b.first) * d) throw std::logic_error(m.what + ": a block has the wrong size");
    std::copy(rows.begin(), rows.end(), m.to + static_cast<std::size_t>((*m.to_offset)[b.first]) * d);
  }
  for (std::size_t s = 0; s < R; ++s) {
    if (block_rows(*m.to_offset, s) > 0 && held.count({s, me}) == 0) throw std::logic_error(m.what + ": a block never arrived");
  }
  return true;
}

}  // namespace mpi_example
