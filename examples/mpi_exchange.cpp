// mpi_exchange - a real expert-parallel exchange over MPI, driven by locmoe's dispatch and exchange plans.
//
//   mpirun -np 4 --oversubscribe locmoe_mpi_exchange --ranks-per-node 2 [--tokens-per-rank 64] [--hidden 32]
//          [--experts 8] [--top-k 2] [--seed 1] [--capacity-factor 1.0] [--empty-rank R] [--corrupt-counts R]
//
// The world's ranks form nodes of --ranks-per-node consecutive ranks. Each rank makes its own seeded tokens and
// routes them (grap_route); the ranks gather every token's choices and run the same capacity assignment and
// dispatch plan. The rows then travel twice: flat (one Alltoallv) and two-level (the exchange plan's three
// stages: node communicators for the gathers and scatters, the world for the gateways). A toy expert runs on
// each expert's rank, the rows come back with a flat Alltoallv, and locmoe::combine sums them on their source
// rank. Every output row must equal a single-process reference bit for bit, and the bytes each rank sent must
// equal the plans' figures. Messages carry bare rows: both sides derive each message's rows from the plan.
// --empty-rank R gives rank R no tokens. --corrupt-counts R makes rank R announce one row too many to rank
// R + 1 in the flat exchange; the receiver names both ranks and both counts, and every rank stops.
// Exit status: 0 when everything matches, 1 on a mismatch (printed), 2 on bad options or a library error.
#include <locmoe/locmoe.hpp>

#include <CLI/CLI.hpp>
#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

using locmoe::expert_index;
using locmoe::slot_index;

struct options {
  int ranks_per_node = 2;
  std::size_t tokens_per_rank = 64, hidden = 32, experts = 8, top_k = 2;
  std::uint64_t seed = 1;
  double capacity_factor = 1.0;
  int empty_rank = -1;      // this rank has no tokens
  int corrupt_counts = -1;  // this rank announces a wrong count in the flat exchange
};

std::size_t tokens_of_rank(const options& o, int rank) { return rank == o.empty_rank ? 0 : o.tokens_per_rank; }

// splitmix64, so every rank (and the reference) makes the same tokens whatever the standard library.
std::uint64_t mix(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// Rank `rank`'s tokens [T_r x d], uniform in [-1, 1).
std::vector<float> make_tokens(const options& o, int rank) {
  const std::size_t tokens = tokens_of_rank(o, rank), d = o.hidden;
  std::vector<float> x(tokens * d);
  const std::uint64_t stream = mix(o.seed ^ mix(static_cast<std::uint64_t>(rank)));
  for (std::size_t i = 0; i < x.size(); ++i) {
    const auto bits = static_cast<std::uint32_t>(mix(stream + i) >> 40);  // 24 random bits: exact in a float
    x[i] = static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f;
  }
  return x;
}

template <class T>
locmoe::matrix_view<T> view(T* data, std::size_t rows, std::size_t cols) { return {data, rows, cols}; }

struct choices {
  std::vector<expert_index> expert;  // [T x k]
  std::vector<float> weight;         // [T x k]
};

choices route(const options& o, const std::vector<float>& x) {
  const std::size_t tokens = x.size() / o.hidden, k = o.top_k;
  choices c{std::vector<expert_index>(tokens * k), std::vector<float>(tokens * k)};
  locmoe::grap_route(locmoe::grap_gate<float>{o.hidden, o.experts}, view(x.data(), tokens, o.hidden), {k, false},
                     {view(c.expert.data(), tokens, k), view(c.weight.data(), tokens, k), {}, {}});
  return c;
}

/// The capacity assignment and dispatch plan of all tokens: run identically on every rank.
struct assignment {
  locmoe::assignment_stats stats;
  std::vector<float> weight;  // kept weights [T x k], 0 where dropped
  locmoe::dispatch_plan plan;
};

assignment assign(const options& o, const locmoe::topology& topo, const choices& c,
                  const std::vector<std::int32_t>& token_rank) {
  const std::size_t tokens = token_rank.size(), k = o.top_k;
  locmoe::capacity_options capacity;
  capacity.capacity_factor = o.capacity_factor;
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  assignment a{{}, std::vector<float>(tokens * k), {}};
  locmoe::capacity_assigner<float> assigner(o.experts, capacity);
  a.stats = assigner.run(view(c.expert.data(), tokens, k), view(c.weight.data(), tokens, k),
                         {view(expert.data(), tokens, k), view(slot.data(), tokens, k),
                          view(a.weight.data(), tokens, k)},
                         {&topo, token_rank.data(), {}});
  a.plan = locmoe::build_dispatch_plan(view<const expert_index>(expert.data(), tokens, k),
                                       view<const slot_index>(slot.data(), tokens, k), a.stats.capacity, topo,
                                       token_rank.data(), static_cast<std::int64_t>(o.hidden * sizeof(float)));
  return a;
}

/// The toy expert e, elementwise and deterministic: the same bits wherever it runs.
void toy_expert(std::size_t e, float* row, std::size_t d) {
  for (std::size_t c = 0; c < d; ++c) row[c] = row[c] * static_cast<float>(e + 1) + 0.5f * static_cast<float>(e);
}

/// All ranks' tokens rank after rank, and the rank of each.
std::vector<std::int32_t> token_ranks(const std::vector<std::size_t>& offset) {
  std::vector<std::int32_t> rank_of(offset.back());
  for (std::size_t r = 0; r + 1 < offset.size(); ++r) {
    std::fill(rank_of.begin() + static_cast<std::ptrdiff_t>(offset[r]),
              rank_of.begin() + static_cast<std::ptrdiff_t>(offset[r + 1]), static_cast<std::int32_t>(r));
  }
  return rank_of;
}

/// The single-process reference [T x d]: every rank's tokens regenerated, routed, assigned, dispatched, run by
/// the toy experts and combined, in one address space.
std::vector<float> single_process_reference(const options& o, const locmoe::topology& topo, int world) {
  std::vector<std::size_t> offset(1, 0);
  std::vector<float> x;
  for (int r = 0; r < world; ++r) {
    const std::vector<float> mine = make_tokens(o, r);
    x.insert(x.end(), mine.begin(), mine.end());
    offset.push_back(offset.back() + tokens_of_rank(o, r));
  }
  const std::size_t tokens = offset.back(), d = o.hidden;
  std::vector<float> y(tokens * d);
  const assignment a = assign(o, topo, route(o, x), token_ranks(offset));
  std::vector<float> buffer(a.plan.buffer_rows() * d, 0.0f);
  locmoe::dispatch(a.plan, view<const float>(x.data(), tokens, d), view(buffer.data(), a.plan.buffer_rows(), d));
  for (std::size_t row = 0; row < a.plan.buffer_rows(); ++row) toy_expert(row / a.plan.capacity, &buffer[row * d], d);
  locmoe::combine(a.plan, view<const float>(buffer.data(), a.plan.buffer_rows(), d),
                  view<const float>(a.weight.data(), tokens, o.top_k), view(y.data(), tokens, d));
  return y;
}

/// A communicator and the world rank of each of its ranks.
struct comm_group {
  MPI_Comm comm = MPI_COMM_NULL;
  int self = 0;                // this process's world rank
  std::vector<int> members;    // comm rank -> world rank
  std::vector<int> index_of;   // world rank -> comm rank, -1 outside
};

comm_group make_group(MPI_Comm comm, int self, int world) {
  int size = 0;
  MPI_Comm_size(comm, &size);
  comm_group g{comm, self, std::vector<int>(static_cast<std::size_t>(size)),
               std::vector<int>(static_cast<std::size_t>(world), -1)};
  MPI_Allgather(&self, 1, MPI_INT, g.members.data(), 1, MPI_INT, comm);
  for (int c = 0; c < size; ++c) g.index_of[static_cast<std::size_t>(g.members[static_cast<std::size_t>(c)])] = c;
  return g;
}

int as_count(std::size_t value) {
  if (value > static_cast<std::size_t>(INT_MAX)) throw std::overflow_error("a message exceeds MPI's int count");
  return static_cast<int>(value);
}

/// Alltoallv of rows of d floats over g, after a check: every rank announces its row counts (MPI_Alltoall) and
/// each receiver compares them with what the plan says it will receive. On a mismatch the receiver names both
/// ranks and both counts, and all ranks return false together (an Allreduce over the world, where every rank
/// makes the same calls), so no rank waits for rows that never come. Peer lie_to (or none: -1) is announced one
/// row more than is sent: the bad-plan test.
bool alltoallv_rows(const comm_group& g, std::size_t d, const std::vector<float>& send,
                    const std::vector<std::size_t>& send_rows, const std::vector<std::size_t>& expected_rows,
                    int lie_to, std::vector<float>& recv, const char* what) {
  const std::size_t peers = g.members.size();
  std::vector<int> announced(peers), heard(peers);
  for (std::size_t c = 0; c < peers; ++c) announced[c] = as_count(send_rows[c]) + (static_cast<int>(c) == lie_to);
  MPI_Alltoall(announced.data(), 1, MPI_INT, heard.data(), 1, MPI_INT, g.comm);
  int mismatch = 0, any_mismatch = 0;
  for (std::size_t c = 0; c < peers; ++c) {
    if (static_cast<std::size_t>(heard[c]) == expected_rows[c]) continue;
    std::fprintf(stderr, "mpi_exchange: %s: rank %d announced %d rows for rank %d, the plan says %zu\n", what,
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
  recv.assign(received, 0.0f);
  MPI_Alltoallv(send.data(), send_count.data(), send_at.data(), MPI_FLOAT, recv.data(), recv_count.data(),
                recv_at.data(), MPI_FLOAT, g.comm);
  return true;
}

/// The rows a rank holds during an exchange: their positions in plan.order, ascending, and the rows.
struct row_store {
  std::vector<std::size_t> position;
  std::vector<float> rows;  // [position.size() x d]
};

/// Sends every held row whose hop (hops[position in plan.order]; from = -1: it stays) leaves this rank to the
/// hop's rank over g. A message holds its rows in plan order and the receiver lists the same positions from the
/// plan, so rows need no header. Adds the bytes sent to each world rank to sent_bytes. lie_to: a world rank to
/// announce one row too many to, or -1.
bool move_rows(const comm_group& g, const std::vector<locmoe::exchange_hop>& hops, std::size_t d, row_store& store,
               int lie_to, const char* what, std::vector<std::int64_t>& sent_bytes) {
  const std::size_t peers = g.members.size();
  auto peer_of = [&](int world_rank) {
    const int c = g.index_of[static_cast<std::size_t>(world_rank)];
    if (c < 0) throw std::logic_error(std::string(what) + ": a hop leaves its communicator");
    return static_cast<std::size_t>(c);
  };
  std::vector<std::size_t> send_rows(peers, 0), recv_rows(peers, 0);
  for (const std::size_t p : store.position) {
    if (hops[p].from == g.self) ++send_rows[peer_of(hops[p].to)];
  }
  std::vector<std::vector<std::size_t>> incoming(peers);  // per peer, the positions it sends here, ascending
  for (std::size_t p = 0; p < hops.size(); ++p) {
    if (hops[p].to == g.self) incoming[peer_of(hops[p].from)].push_back(p);
  }
  for (std::size_t c = 0; c < peers; ++c) recv_rows[c] = incoming[c].size();

  // Pack: each peer's rows in plan order; rows that stay are kept aside with their positions.
  std::vector<std::size_t> next(peers, 0);
  for (std::size_t c = 1; c < peers; ++c) next[c] = next[c - 1] + send_rows[c - 1];
  std::vector<float> send((next.back() + send_rows.back()) * d);  // a communicator has at least one rank
  std::vector<std::pair<std::size_t, const float*>> held;  // rows this rank holds after the stage
  for (std::size_t i = 0; i < store.position.size(); ++i) {
    const std::size_t p = store.position[i];
    const float* row = &store.rows[i * d];
    if (hops[p].from == g.self) {
      std::copy(row, row + d, &send[next[peer_of(hops[p].to)]++ * d]);
    } else {
      held.emplace_back(p, row);
    }
  }
  std::vector<float> recv;
  const int lie_to_peer = lie_to >= 0 ? static_cast<int>(peer_of(lie_to)) : -1;
  if (!alltoallv_rows(g, d, send, send_rows, recv_rows, lie_to_peer, recv, what)) return false;
  for (std::size_t c = 0; c < peers; ++c) {
    sent_bytes[static_cast<std::size_t>(g.members[c])] += static_cast<std::int64_t>(send_rows[c] * d * sizeof(float));
  }

  // Received rows arrive peer after peer, each peer's in plan order: exactly the `incoming` lists.
  std::size_t at = 0;
  for (const auto& positions : incoming) {
    for (const std::size_t p : positions) held.emplace_back(p, &recv[at++ * d]);
  }
  std::sort(held.begin(), held.end());
  row_store after;
  for (const auto& [p, row] : held) {
    after.position.push_back(p);
    after.rows.insert(after.rows.end(), row, row + d);
  }
  store = std::move(after);
  return true;
}

/// What every rank knows after the gather: the options, the topology, the plan of all tokens, where rows go.
struct setup {
  options opt;
  locmoe::topology topo;
  comm_group world, node;
  std::vector<std::size_t> offset;  // [R + 1]: each rank's first token in the global order
  assignment a;
  std::vector<std::size_t> source, destination;  // [kept pairs]: ranks, per position in plan.order
};

struct exchange_result {
  bool delivered = false;                          // false: a count mismatch stopped it (already reported)
  std::vector<float> y;                            // this rank's outputs [T_r x d]
  std::vector<std::vector<std::int64_t>> sent_bytes;  // [stage][world rank]
};

/// Forward exchange under `scheme`, the toy experts, the flat way back, and combine on the source rank.
exchange_result run_exchange(const setup& s, locmoe::exchange_scheme scheme, const std::vector<float>& x_mine) {
  const locmoe::dispatch_plan& plan = s.a.plan;
  const std::size_t d = s.opt.hidden, k = s.opt.top_k, ranks = s.topo.ranks(), pairs = plan.order.size();
  const auto me = static_cast<std::size_t>(s.world.self);
  const std::size_t first = s.offset[me], mine = s.offset[me + 1] - first;
  auto expert_rank = [&](std::size_t e) { return static_cast<std::size_t>(s.topo.rank_of_expert(e)); };
  const bool flat = scheme == locmoe::exchange_scheme::flat;
  const std::size_t stages = flat ? 1 : 3;
  const char* const name = flat ? "flat exchange" : "two-level exchange";
  exchange_result result;
  result.sent_bytes.assign(stages, std::vector<std::int64_t>(ranks, 0));

  const locmoe::exchange_router router(s.topo);
  std::vector<std::vector<locmoe::exchange_hop>> routes(ranks * ranks);  // [source][destination]
  for (std::size_t r = 0; r < ranks * ranks; ++r) routes[r] = router.route(scheme, r / ranks, r % ranks);

  row_store store;  // this rank's kept rows
  for (std::size_t p = 0; p < pairs; ++p) {
    if (s.source[p] != me) continue;
    const float* row = &x_mine[(static_cast<std::size_t>(plan.order[p]) / k - first) * d];
    store.position.push_back(p);
    store.rows.insert(store.rows.end(), row, row + d);
  }
  for (std::size_t stage = 0; stage < stages; ++stage) {
    std::vector<locmoe::exchange_hop> hops(pairs, {stage, -1, -1});
    for (std::size_t p = 0; p < pairs; ++p) {
      for (const locmoe::exchange_hop& h : routes[s.source[p] * ranks + s.destination[p]]) {
        if (h.stage == stage) hops[p] = h;
      }
    }
    // Two-level: gathers and scatters stay inside the node; the gateways' stage goes over the world.
    const comm_group& g = flat || stage == 1 ? s.world : s.node;
    const int lie_to = flat && s.world.self == s.opt.corrupt_counts ? static_cast<int>((me + 1) % ranks) : -1;
    if (!move_rows(g, hops, d, store, lie_to, name, result.sent_bytes[stage])) return result;
  }

  // The experts of this rank: only their rows of the [n C x d] buffer exist here.
  const std::size_t capacity = plan.capacity;
  std::vector<std::size_t> local_block(plan.experts, 0);
  std::size_t local_experts = 0;
  for (std::size_t e = 0; e < plan.experts; ++e) {
    if (expert_rank(e) == me) local_block[e] = local_experts++;
  }
  std::vector<float> buffer(local_experts * capacity * d, 0.0f);
  auto local_row = [&](std::size_t p) {
    const auto pair = static_cast<std::size_t>(plan.order[p]);
    const auto e = static_cast<std::size_t>(plan.expert[pair]);
    if (expert_rank(e) != me) throw std::logic_error(std::string(name) + ": a row reached the wrong rank");
    return &buffer[(local_block[e] * capacity + static_cast<std::size_t>(plan.slot[pair])) * d];
  };
  for (std::size_t i = 0; i < store.position.size(); ++i) {
    std::copy(&store.rows[i * d], &store.rows[i * d] + d, local_row(store.position[i]));
  }
  for (std::size_t e = 0; e < plan.experts; ++e) {
    if (expert_rank(e) != me) continue;
    for (std::size_t row = local_block[e] * capacity; row < (local_block[e] + 1) * capacity; ++row) {
      toy_expert(e, &buffer[row * d], d);
    }
  }

  // Back to the source ranks in one flat Alltoallv (rows for this rank's own experts never leave it).
  for (std::size_t i = 0; i < store.position.size(); ++i) {
    const float* row = local_row(store.position[i]);
    std::copy(row, row + d, &store.rows[i * d]);
  }
  std::vector<locmoe::exchange_hop> back(pairs, {0, -1, -1});
  for (std::size_t p = 0; p < pairs; ++p) {
    const auto from = static_cast<std::int32_t>(s.destination[p]), to = static_cast<std::int32_t>(s.source[p]);
    if (from != to) back[p] = {0, from, to};
  }
  std::vector<std::int64_t> back_bytes(ranks, 0);
  if (!move_rows(s.world, back, d, store, -1, "return exchange", back_bytes)) return result;

  // locmoe::combine over an [n C x d] buffer holding the returned rows at e C + slot, with the plan of this
  // rank's tokens: the reference's own code, so equal inputs give equal bits.
  std::vector<float> returned(plan.buffer_rows() * d, 0.0f);
  for (std::size_t i = 0; i < store.position.size(); ++i) {
    const auto pair = static_cast<std::size_t>(plan.order[store.position[i]]);
    const auto row = static_cast<std::size_t>(plan.expert[pair]) * capacity + static_cast<std::size_t>(plan.slot[pair]);
    std::copy(&store.rows[i * d], &store.rows[i * d] + d, &returned[row * d]);
  }
  const std::vector<std::int32_t> my_rank(mine, s.world.self);
  const locmoe::dispatch_plan my_plan = locmoe::build_dispatch_plan(
      view<const expert_index>(plan.expert.data() + first * k, mine, k),
      view<const slot_index>(plan.slot.data() + first * k, mine, k), static_cast<std::int64_t>(capacity), s.topo,
      my_rank.data());
  result.y.assign(mine * d, 0.0f);
  locmoe::combine(my_plan, view<const float>(returned.data(), plan.buffer_rows(), d),
                  view<const float>(s.a.weight.data() + first * k, mine, k), view(result.y.data(), mine, d));
  result.delivered = true;
  return result;
}

/// Compares this rank's outputs with the reference rows, bit for bit; prints the first few differences.
int compare_outputs(const setup& s, const exchange_result& r, const std::vector<float>& reference, const char* name) {
  const std::size_t d = s.opt.hidden, first = s.offset[static_cast<std::size_t>(s.world.self)];
  int failures = 0;
  for (std::size_t t = 0; t * d < r.y.size(); ++t) {
    const float* got = &r.y[t * d];
    const float* want = &reference[(first + t) * d];
    if (std::memcmp(got, want, d * sizeof(float)) == 0) continue;
    std::size_t c = 0;
    while (std::memcmp(&got[c], &want[c], sizeof(float)) == 0) ++c;
    if (++failures <= 3) {
      std::fprintf(stderr, "mpi_exchange: %s: rank %d token %zu (global %zu) column %zu: %a, the reference has %a\n",
                   name, s.world.self, t, first + t, c, static_cast<double>(got[c]), static_cast<double>(want[c]));
    }
  }
  return failures;
}

/// Checks the bytes this rank sent to each rank in each stage against the plan; returns {intra, inter} totals.
std::pair<std::int64_t, std::int64_t> check_bytes(const setup& s, const exchange_result& r,
                                                  const std::vector<std::vector<std::int64_t>>& planned,
                                                  const char* name, int& failures) {
  std::pair<std::int64_t, std::int64_t> by_class{0, 0};
  const int me = s.world.self;
  for (std::size_t stage = 0; stage < planned.size(); ++stage) {
    for (std::size_t t = 0; t < s.topo.ranks(); ++t) {
      const std::int64_t sent = r.sent_bytes[stage][t];
      if (sent != planned[stage][t]) {
        ++failures;
        std::fprintf(stderr, "mpi_exchange: %s, stage %zu: rank %d sent %lld bytes to rank %zu, the plan says %lld\n",
                     name, stage, me, static_cast<long long>(sent), t, static_cast<long long>(planned[stage][t]));
      }
      const bool same_node = s.topo.node_of_rank(t) == s.topo.node_of_rank(static_cast<std::size_t>(me));
      (same_node ? by_class.first : by_class.second) += sent;
    }
  }
  return by_class;
}

int run(const options& o, int me, int world) {
  // Nodes: color = node, key = world rank, so node-communicator ranks follow world order.
  MPI_Comm node_comm = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, me / o.ranks_per_node, me, &node_comm);
  setup s{o, locmoe::topology::uniform(world, o.ranks_per_node, static_cast<std::int64_t>(o.experts)),
          make_group(MPI_COMM_WORLD, me, world), make_group(node_comm, me, world), {}, {}, {}, {}};
  const std::size_t k = o.top_k, d = o.hidden, ranks = static_cast<std::size_t>(world);
  const auto self = static_cast<std::size_t>(me);

  // This rank's tokens, routed here; then every rank's choices, gathered in rank order.
  const std::vector<float> x = make_tokens(o, me);
  const choices routed = route(o, x);
  const auto my_tokens = static_cast<std::int64_t>(x.size() / d);
  std::vector<std::int64_t> tokens_of(ranks);
  MPI_Allgather(&my_tokens, 1, MPI_INT64_T, tokens_of.data(), 1, MPI_INT64_T, MPI_COMM_WORLD);
  s.offset.assign(1, 0);
  std::vector<int> choice_count(ranks), choice_at(ranks);
  for (std::size_t r = 0; r < ranks; ++r) {
    choice_at[r] = as_count(s.offset.back() * k);
    choice_count[r] = as_count(static_cast<std::size_t>(tokens_of[r]) * k);
    s.offset.push_back(s.offset.back() + static_cast<std::size_t>(tokens_of[r]));
  }
  const std::size_t tokens = s.offset.back();
  choices all{std::vector<expert_index>(tokens * k), std::vector<float>(tokens * k)};
  MPI_Allgatherv(routed.expert.data(), choice_count[self], MPI_INT32_T, all.expert.data(),
                 choice_count.data(), choice_at.data(), MPI_INT32_T, MPI_COMM_WORLD);
  MPI_Allgatherv(routed.weight.data(), choice_count[self], MPI_FLOAT, all.weight.data(),
                 choice_count.data(), choice_at.data(), MPI_FLOAT, MPI_COMM_WORLD);

  // The same assignment and plan on every rank, and each kept pair's source and expert rank.
  const std::vector<std::int32_t> token_rank = token_ranks(s.offset);
  s.a = assign(o, s.topo, all, token_rank);
  const locmoe::dispatch_plan& plan = s.a.plan;
  for (const std::int64_t pair : plan.order) {
    const auto p = static_cast<std::size_t>(pair);
    s.source.push_back(static_cast<std::size_t>(token_rank[p / k]));
    s.destination.push_back(static_cast<std::size_t>(s.topo.rank_of_expert(static_cast<std::size_t>(plan.expert[p]))));
  }

  const std::vector<float> reference = single_process_reference(o, s.topo, world);
  int failures = 0;

  // What this rank should send to each rank in each stage: its row of the dispatch plan's send_bytes (flat),
  // its transfers in the two-level exchange plan.
  const auto my_row = plan.send_bytes.begin() + static_cast<std::ptrdiff_t>(self * ranks);
  std::vector<std::vector<std::int64_t>> flat_plan{{my_row, my_row + static_cast<std::ptrdiff_t>(ranks)}};
  flat_plan[0][self] = 0;  // rows for this rank's own experts never travel
  const locmoe::exchange_plan two_level =
      locmoe::build_exchange_plan(plan.send_bytes, s.topo, {locmoe::exchange_scheme::two_level, false});
  std::vector<std::vector<std::int64_t>> two_level_plan(two_level.stages.size(), std::vector<std::int64_t>(ranks, 0));
  for (std::size_t stage = 0; stage < two_level.stages.size(); ++stage) {
    for (const locmoe::transfer& m : two_level.stages[stage].transfers) {
      if (m.source == me) two_level_plan[stage][static_cast<std::size_t>(m.destination)] = m.bytes;
    }
  }

  const exchange_result flat = run_exchange(s, locmoe::exchange_scheme::flat, x);
  const exchange_result staged =
      flat.delivered ? run_exchange(s, locmoe::exchange_scheme::two_level, x) : exchange_result{};
  if (!flat.delivered || !staged.delivered) {  // every rank takes this branch together
    if (me == 0) std::fprintf(stderr, "mpi_exchange: FAILED: announced row counts differ from the plan (above)\n");
    MPI_Comm_free(&node_comm);
    return 1;
  }
  failures += compare_outputs(s, flat, reference, "flat exchange");
  failures += compare_outputs(s, staged, reference, "two-level exchange");
  const auto flat_bytes = check_bytes(s, flat, flat_plan, "flat exchange", failures);
  const auto staged_bytes = check_bytes(s, staged, two_level_plan, "two-level exchange", failures);

  // Rank 0 prints every rank's bytes, in rank order.
  const std::int64_t mine[4] = {flat_bytes.first, flat_bytes.second, staged_bytes.first, staged_bytes.second};
  std::vector<std::int64_t> every(4 * ranks);
  MPI_Gather(mine, 4, MPI_INT64_T, every.data(), 4, MPI_INT64_T, 0, MPI_COMM_WORLD);
  int total_failures = 0;
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (me == 0) {
    std::printf("%zu tokens (%zu per rank%s), d = %zu, n = %zu, top-%zu, capacity %lld: %lld of %lld choices kept, "
                "%lld dropped\n", tokens, o.tokens_per_rank, o.empty_rank >= 0 ? ", one rank empty" : "", d,
                o.experts, k, static_cast<long long>(s.a.stats.capacity), static_cast<long long>(s.a.stats.kept),
                static_cast<long long>(s.a.stats.routed), static_cast<long long>(s.a.stats.dropped));
    std::printf("kept choices: %lld stay on their rank, %lld cross intra-node links, %lld cross nodes\n",
                static_cast<long long>(plan.intra_rank), static_cast<long long>(plan.intra_node),
                static_cast<long long>(plan.inter_node));
    std::printf("bytes sent            flat: intra-node  inter-node   two-level: intra-node  inter-node\n");
    for (std::size_t r = 0; r < ranks; ++r) {
      const std::int64_t* b = &every[4 * r];
      std::printf("rank %zu (node %d)  %21lld %11lld %23lld %11lld\n", r, s.topo.node_of_rank(r),
                  static_cast<long long>(b[0]), static_cast<long long>(b[1]), static_cast<long long>(b[2]),
                  static_cast<long long>(b[3]));
    }
    if (total_failures == 0) {
      std::printf("mpi_exchange: %d rank%s, %zu node%s: flat and two-level outputs identical to the single-process "
                  "reference; bytes match the plans\n", world, world == 1 ? "" : "s", s.topo.nodes(),
                  s.topo.nodes() == 1 ? "" : "s");
    } else {
      std::fprintf(stderr, "mpi_exchange: FAILED: %d mismatches (listed above)\n", total_failures);
    }
  }
  MPI_Comm_free(&node_comm);
  return total_failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int me = 0, world = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &me);
  MPI_Comm_size(MPI_COMM_WORLD, &world);

  options o;
  CLI::App app{"mpi_exchange: a flat and a two-level MoE exchange over MPI, checked against a single process"};
  app.add_option("--ranks-per-node", o.ranks_per_node, "G: a node is G consecutive ranks")->check(CLI::PositiveNumber);
  app.add_option("--tokens-per-rank", o.tokens_per_rank, "tokens made on each rank");
  app.add_option("--hidden", o.hidden, "d, the token width")->check(CLI::PositiveNumber);
  app.add_option("--experts", o.experts, "n experts, placed in blocks over the ranks")->check(CLI::PositiveNumber);
  app.add_option("--top-k", o.top_k, "experts per token")->check(CLI::PositiveNumber);
  app.add_option("--seed", o.seed, "seed of every rank's tokens");
  app.add_option("--capacity-factor", o.capacity_factor, "C = ceil(T k cf / n)")->check(CLI::PositiveNumber);
  app.add_option("--empty-rank", o.empty_rank, "this rank makes no tokens");
  app.add_option("--corrupt-counts", o.corrupt_counts, "this rank announces one row too many (a bad-plan test)");
  std::string problem;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = me == 0 ? app.exit(e) : e.get_exit_code();
    MPI_Finalize();
    return code == 0 ? 0 : 2;
  }
  if (world % o.ranks_per_node != 0) problem = "--ranks-per-node must divide the number of ranks";
  if (o.experts > o.hidden) problem = "--experts must be <= --hidden (GrAP pools d / n features per expert)";
  if (o.top_k > o.experts) problem = "--top-k must be <= --experts";
  if (o.empty_rank < -1 || o.empty_rank >= world) problem = "--empty-rank must be a rank (or -1)";
  if (o.corrupt_counts < -1 || o.corrupt_counts >= world) problem = "--corrupt-counts must be a rank (or -1)";
  if (!problem.empty()) {
    if (me == 0) std::fprintf(stderr, "mpi_exchange: %s (%d ranks)\n", problem.c_str(), world);
    MPI_Finalize();
    return 2;
  }
  int status = 0;
  try {
    status = run(o, me, world);
  } catch (const std::exception& e) {
    // One rank may fail alone; aborting the world is the only way not to leave the others waiting.
    std::fprintf(stderr, "mpi_exchange: rank %d: %s\n", me, e.what());
    MPI_Abort(MPI_COMM_WORLD, 2);
  }
  MPI_Finalize();
  return status;
}
