// mpi_exchange - an expert-parallel training step over MPI, forward and backward, as Megatron-Core and DeepSpeed
// run it, checked bit for bit against a single-process reference.
//
//   mpirun -np 4 --oversubscribe locmoe_mpi_exchange --ranks-per-node 2 [--tokens-per-rank 64] [--hidden 32]
//          [--experts 8] [--top-k 2] [--seed 1] [--capacity-factor 1.0] [--gate dense|grap] [--global-capacity]
//          [--empty-rank R] [--dropped-rank R] [--corrupt-counts R]
//
// The world's ranks form nodes of --ranks-per-node consecutive ranks; experts sit in blocks over the ranks. Each
// rank makes its own seeded tokens and upstream gradient R_r; the gate and the experts (expert e: a linear map
// W_e [d x d]) are made from the seed identically everywhere. A step on each rank (mpi_exchange_step.hpp):
//   1. its moe_router (grouped layout, aux, z and locality losses) routes and assigns only its own tokens; with
//      --global-capacity the routed counts are all-gathered first (MPI_Allgather, n integers per rank) and each
//      rank takes its share of one capacity. Dispatch writes the grouped layout: the All-to-All send buffer.
//   2. Counts before rows: an MPI_Alltoallv of each rank's kept rows per expert, the slice of each destination's
//      experts, and build_ep_exchange_plan from them.
//   3. Rows to the experts' ranks (scatter_received, padding rows zero), the experts, rows back
//      (gather_for_return), combine -> y_r. Loss: sum over ranks of sum(y_r R_r) + the router losses.
//   4. Backward through the same exchange: combine_backward -> rows out -> experts^T (and dL/dW_e on the expert's
//      rank) -> rows back -> dispatch_backward -> dL/dx_r, and moe_router::backward adds the gate's part.
//      The gate's gradient is all-gathered and summed in rank order (MPI_Allreduce's order is not fixed), the
//      experts' gradients are gathered to rank 0.
// The step runs twice: every row move a flat MPI_Alltoallv, then every one HetuMoE's two-level exchange
// (exchange.hpp: node gateways; stages 0 and 2 on per-node communicators, 1 on the world's), from the send
// matrix all-gathered as counts. Each rank compares y_r, dL/dx_r, the loss and the gate's gradient with the
// single-process reference (the same calls for every rank, copies for the moves), rank 0 the experts' gradients,
// all with memcmp; each rank's bytes sent in each stage of each move must equal the exchange plan's.
// --empty-rank R: rank R has no tokens. --dropped-rank R: rank R's capacity is 0 (every choice dropped).
// --corrupt-counts R: rank R announces one row too many to rank R + 1 in the first flat move; the receiver names
// both ranks and both counts and every rank stops.
// Exit status: 0 when everything matches, 1 on a mismatch (printed), 2 on bad options or a library error.
#include "mpi_exchange_comm.hpp"
#include "mpi_exchange_step.hpp"

#include <locmoe/capacity.hpp>
#include <locmoe/exchange.hpp>

#include <CLI/CLI.hpp>
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using namespace mpi_example;

struct setup {
  options opt;
  locmoe::topology topo;
  parameters params;
  comm_group world, node;
};

/// What one distributed step gave this rank.
struct rank_result {
  bool delivered = false;  // false: announced counts differed from a plan (reported; every rank stops)
  std::vector<float> y, dx, gate_gradient;
  std::vector<float> expert_gradient;  // rank 0: every expert's [n x d x d]
  double loss = 0;
  std::vector<std::vector<std::vector<std::int64_t>>> sent_bytes;  // [move][stage][world rank]
};

/// The count exchange: rank q gets from each rank s its kept rows for each of q's experts ([R x E_q]). The
/// slices of kept_per_expert are contiguous (experts in rank order), so it is the send buffer as it is.
std::vector<std::int64_t> exchange_counts(const setup& s, const std::int64_t* kept) {
  const std::size_t R = s.topo.ranks();
  const std::size_t mine = locmoe::experts_of_rank(s.topo, static_cast<std::size_t>(s.world.self)).second;
  std::vector<int> send_count(R), send_at(R), recv_count(R, as_count(mine)), recv_at(R);
  for (std::size_t q = 0; q < R; ++q) {
    const auto [first, count] = locmoe::experts_of_rank(s.topo, q);
    send_count[q] = as_count(count);
    send_at[q] = as_count(first);
    recv_at[q] = as_count(q * mine);
  }
  std::vector<std::int64_t> to_me(R * mine);
  MPI_Alltoallv(kept, send_count.data(), send_at.data(), MPI_INT64_T, to_me.data(), recv_count.data(), recv_at.data(),
                MPI_INT64_T, MPI_COMM_WORLD);
  return to_me;
}

std::vector<std::int64_t> transpose(const std::vector<std::int64_t>& m, std::size_t R) {
  std::vector<std::int64_t> t(R * R);
  for (std::size_t i = 0; i < R; ++i)
    for (std::size_t j = 0; j < R; ++j) t[j * R + i] = m[i * R + j];
  return t;
}

/// One training step on this rank, every row move under `scheme` (flat or two_level).
rank_result run_step(const setup& s, locmoe::exchange_scheme scheme) {
  const options& o = s.opt;
  const std::size_t R = s.topo.ranks(), n = o.experts, d = o.hidden;
  const bool flat = scheme == locmoe::exchange_scheme::flat;
  rank_result result;
  result.sent_bytes.assign(all_moves.size(), std::vector<std::vector<std::int64_t>>(flat ? 1 : 3, std::vector<std::int64_t>(R, 0)));
  locmoe::thread_pool pool(1);
  const locmoe::cpu_backend cpu(pool);
  ep_rank me(o, s.topo, s.params, cpu, s.world.self);

  const std::int64_t* routed = me.route();
  std::vector<std::int64_t> all_counts;
  if (o.global_capacity) {  // one capacity over all ranks: every rank's n routed counts, in rank order
    all_counts.resize(R * n);
    MPI_Allgather(routed, static_cast<int>(n), MPI_INT64_T, all_counts.data(), static_cast<int>(n), MPI_INT64_T, MPI_COMM_WORLD);
  }
  me.assign_and_dispatch(o.global_capacity ? all_counts.data() : nullptr);
  me.plan(exchange_counts(s, me.kept_per_expert()).data());
  // The send matrix [R x R] in rows, for the two-level routes: R integers from each rank.
  std::vector<std::int64_t> send_matrix(R * R);
  MPI_Allgather(me.exchange_plan().send_count.data(), static_cast<int>(R), MPI_INT64_T, send_matrix.data(),
                static_cast<int>(R), MPI_INT64_T, MPI_COMM_WORLD);
  const std::vector<std::int64_t> return_matrix = transpose(send_matrix, R);

  const auto moved = [&](move m) {
    const move_buffers b = me.buffers(m);
    row_move rm{d, b.from.data(), &b.from_offset, b.to.data(), &b.to_offset,
                std::string(to_string(m)) + (flat ? ", flat exchange" : ", two-level exchange"), -1};
    std::vector<std::vector<std::int64_t>>& bytes = result.sent_bytes[static_cast<std::size_t>(m)];
    if (flat) {
      if (m == move::dispatch && s.world.self == o.corrupt_counts) rm.lie_to = static_cast<int>((static_cast<std::size_t>(s.world.self) + 1) % R);
      return flat_move(s.world, rm, bytes);
    }
    return two_level_move(s.world, s.node, s.topo, is_dispatch(m) ? send_matrix : return_matrix, rm, bytes);
  };
  // A failed move returns on every rank together (alltoallv_rows agrees over the world).
  if (!moved(move::dispatch)) return result;
  me.experts_forward();
  if (!moved(move::combine_return)) return result;
  me.combine();
  if (!moved(move::grad_dispatch)) return result;
  me.experts_backward();
  if (!moved(move::grad_return)) return result;
  me.backward();

  // Reductions, deterministic: the gate's gradient and the loss summed in rank order on every rank.
  result.y = me.y();
  result.dx = me.dx();
  const std::size_t g = gate_gradient_size(o);
  std::vector<float> gate_all(R * g);
  MPI_Allgather(me.gate_gradient().data(), as_count(g), MPI_FLOAT, gate_all.data(), as_count(g), MPI_FLOAT, MPI_COMM_WORLD);
  result.gate_gradient = sum_in_rank_order(gate_all, R, g);
  const double my_loss = me.loss();
  std::vector<double> losses(R);
  MPI_Allgather(&my_loss, 1, MPI_DOUBLE, losses.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  result.loss = sum_in_rank_order(losses);
  // Each expert's gradient lives on its rank; experts are in rank order, so rank 0 gathers them in expert order.
  std::vector<int> count(R), at(R);
  for (std::size_t q = 0; q < R; ++q) {
    const auto [first, local] = locmoe::experts_of_rank(s.topo, q);
    count[q] = as_count(local * d * d);
    at[q] = as_count(first * d * d);
  }
  if (s.world.self == 0) result.expert_gradient.resize(n * d * d);
  MPI_Gatherv(me.expert_gradient().data(), as_count(me.expert_gradient().size()), MPI_FLOAT, result.expert_gradient.data(),
              count.data(), at.data(), MPI_FLOAT, 0, MPI_COMM_WORLD);
  result.delivered = true;
  return result;
}

/// Bit-for-bit comparison; prints the first difference. Returns 1 on a mismatch.
int compare(const char* scheme, const char* what, int rank, const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    std::fprintf(stderr, "mpi_exchange: %s: rank %d: %s has %zu values, the reference %zu\n", scheme, rank, what, got.size(), want.size());
    return 1;
  }
  if (got.empty() || std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0) return 0;
  std::size_t i = 0;
  while (std::memcmp(&got[i], &want[i], sizeof(float)) == 0) ++i;
  std::fprintf(stderr, "mpi_exchange: %s: rank %d: %s[%zu] = %a, the reference has %a\n", scheme, rank, what, i,
               static_cast<double>(got[i]), static_cast<double>(want[i]));
  return 1;
}

/// Compares this rank's results with the reference; every rank its own y and dL/dx and the reduced values, rank
/// 0 the experts' gradients too.
int check_values(const setup& s, const rank_result& r, const step_result& ref, const char* scheme) {
  const int me = s.world.self;
  const auto self = static_cast<std::size_t>(me);
  int failures = compare(scheme, "y", me, r.y, ref.y[self]) + compare(scheme, "dL/dx", me, r.dx, ref.dx[self]) +
                 compare(scheme, "dL/d(gate)", me, r.gate_gradient, ref.gate_gradient);
  if (me == 0) failures += compare(scheme, "dL/d(expert weights)", me, r.expert_gradient, ref.expert_gradient);
  if (std::memcmp(&r.loss, &ref.loss, sizeof(double)) != 0) {
    std::fprintf(stderr, "mpi_exchange: %s: rank %d: loss %a, the reference has %a\n", scheme, me, r.loss, ref.loss);
    ++failures;
  }
  return failures;
}

/// Checks the bytes this rank sent in each stage of each move against the exchange plan of that move's send
/// matrix (the reference's, in bytes: the transpose for the moves back).
int check_bytes(const setup& s, const rank_result& r, const step_result& ref, locmoe::exchange_scheme scheme) {
  const std::size_t R = s.topo.ranks();
  const int me = s.world.self;
  const auto row_bytes = static_cast<std::int64_t>(s.opt.hidden * sizeof(float));
  int failures = 0;
  for (const move m : all_moves) {
    std::vector<std::int64_t> bytes = is_dispatch(m) ? ref.send_rows : transpose(ref.send_rows, R);
    for (std::int64_t& b : bytes) b *= row_bytes;
    const locmoe::exchange_plan plan = locmoe::build_exchange_plan(bytes, s.topo, {scheme, false});
    const auto& sent = r.sent_bytes[static_cast<std::size_t>(m)];
    for (std::size_t stage = 0; stage < plan.stages.size(); ++stage) {
      std::vector<std::int64_t> planned(R, 0);
      for (const locmoe::transfer& t : plan.stages[stage].transfers) {
        if (t.source == me) planned[static_cast<std::size_t>(t.destination)] = t.bytes;
      }
      for (std::size_t t = 0; t < R; ++t) {
        if (sent[stage][t] == planned[t]) continue;
        std::fprintf(stderr, "mpi_exchange: %s, %s exchange, stage %zu: rank %d sent %lld bytes to rank %zu, the plan says %lld\n",
                     to_string(m), locmoe::to_string(scheme), stage, me, static_cast<long long>(sent[stage][t]), t,
                     static_cast<long long>(planned[t]));
        ++failures;
      }
    }
  }
  return failures;
}

/// Rank 0 prints the step's shape, each rank's tokens and the bytes it sent in the forward dispatch.
void print_summary(const setup& s, const step_result& ref, const rank_result& flat, const rank_result& staged) {
  const options& o = s.opt;
  const std::size_t R = s.topo.ranks();
  const int me = s.world.self;
  // Per rank: flat intra-node, flat inter-node, two-level stages 0, 1, 2 (the forward dispatch).
  std::int64_t mine[5] = {0, 0, 0, 0, 0};
  for (std::size_t t = 0; t < R; ++t) {
    const bool same_node = s.topo.node_of_rank(t) == s.topo.node_of_rank(static_cast<std::size_t>(me));
    mine[same_node ? 0 : 1] += flat.sent_bytes[0][0][t];
    for (std::size_t stage = 0; stage < 3; ++stage) mine[2 + stage] += staged.sent_bytes[0][stage][t];
  }
  std::vector<std::int64_t> every(5 * R);
  MPI_Gather(mine, 5, MPI_INT64_T, every.data(), 5, MPI_INT64_T, 0, MPI_COMM_WORLD);
  if (me != 0) return;
  std::int64_t routed = 0, kept = 0;
  for (const locmoe::assignment_stats& st : ref.stats) routed += st.routed, kept += st.kept;
  char capacity[96];
  if (o.global_capacity) {
    std::snprintf(capacity, sizeof capacity, "global capacity %lld per expert over all ranks",
                  static_cast<long long>(locmoe::classic_capacity(routed, o.capacity_factor, 1, static_cast<std::int64_t>(o.experts), 0)));
  } else {
    std::snprintf(capacity, sizeof capacity, "capacity factor %g per rank", o.capacity_factor);
  }
  const std::string dropped = o.dropped_rank >= 0 ? ", rank " + std::to_string(o.dropped_rank) + "'s tokens all dropped" : "";
  std::printf("%zu rank%s as %zu node%s, %s gate, d = %zu, n = %zu, top-%zu, %zu tokens per rank%s%s; %s: %lld of %lld choices kept\n",
              R, R == 1 ? "" : "s", s.topo.nodes(), s.topo.nodes() == 1 ? "" : "s",
              o.gate == locmoe::gate_type::dense ? "dense" : "GrAP", o.hidden, o.experts, o.top_k, o.tokens_per_rank,
              o.empty_rank >= 0 ? ", one rank empty" : "", dropped.c_str(), capacity, static_cast<long long>(kept),
              static_cast<long long>(routed));
  std::printf("                               bytes sent in the forward dispatch\n");
  std::printf("rank (node) tokens kept  rows in   flat: intra-node inter-node   two-level: stage 0  stage 1  stage 2\n");
  for (std::size_t r = 0; r < R; ++r) {
    const std::int64_t* b = &every[5 * r];
    std::printf("rank %zu (%d) %6lld %5lld %8zu %17lld %10lld %19lld %8lld %8lld\n", r, s.topo.node_of_rank(r),
                static_cast<long long>(ref.stats[r].tokens), static_cast<long long>(ref.stats[r].kept),
                ref.received_rows[r], static_cast<long long>(b[0]),
                static_cast<long long>(b[1]), static_cast<long long>(b[2]), static_cast<long long>(b[3]),
                static_cast<long long>(b[4]));
  }
  std::printf("loss %.9g (sum over ranks of sum(y R) + router losses)\n", ref.loss);
}

int run(const options& o, int me, int world) {
  // Nodes: color = node, key = world rank, so node-communicator ranks follow world order.
  MPI_Comm node_comm = MPI_COMM_NULL;
  MPI_Comm_split(MPI_COMM_WORLD, me / o.ranks_per_node, me, &node_comm);
  const setup s{o, locmoe::topology::uniform(world, o.ranks_per_node, static_cast<std::int64_t>(o.experts)),
                make_parameters(o), make_group(MPI_COMM_WORLD, me, world), make_group(node_comm, me, world)};
  // Every rank simulates the whole step alone first (cheap at these sizes): the reference.
  const step_result ref = simulate_step(o, s.topo, s.params);

  const rank_result flat = run_step(s, locmoe::exchange_scheme::flat);
  const rank_result staged = flat.delivered ? run_step(s, locmoe::exchange_scheme::two_level) : rank_result{};
  if (!flat.delivered || !staged.delivered) {  // every rank takes this branch together
    if (me == 0) std::fprintf(stderr, "mpi_exchange: FAILED: announced row counts differ from the plan (above)\n");
    MPI_Comm_free(&node_comm);
    return 1;
  }
  int failures = check_values(s, flat, ref, "flat exchange") + check_values(s, staged, ref, "two-level exchange") +
                 check_bytes(s, flat, ref, locmoe::exchange_scheme::flat) +
                 check_bytes(s, staged, ref, locmoe::exchange_scheme::two_level);
  if (o.dropped_rank == me && ref.stats[static_cast<std::size_t>(me)].kept != 0) {
    std::fprintf(stderr, "mpi_exchange: rank %d should drop every choice, it kept %lld\n", me,
                 static_cast<long long>(ref.stats[static_cast<std::size_t>(me)].kept));
    ++failures;
  }
  print_summary(s, ref, flat, staged);
  int total_failures = 0;  // an integer sum: any order gives the same
  MPI_Allreduce(&failures, &total_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (me == 0) {
    if (total_failures == 0) {
      std::printf("mpi_exchange: %d rank%s, %zu node%s: flat and two-level outputs and gradients identical to the "
                  "single-process reference; bytes match the plans\n", world, world == 1 ? "" : "s", s.topo.nodes(),
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
  std::string gate = "dense";
  CLI::App app{"mpi_exchange: an expert-parallel training step over MPI (flat and two-level exchanges, forward and "
               "backward), checked against a single process"};
  app.add_option("--ranks-per-node", o.ranks_per_node, "G: a node is G consecutive ranks")->check(CLI::PositiveNumber);
  app.add_option("--tokens-per-rank", o.tokens_per_rank, "tokens made on each rank");
  app.add_option("--hidden", o.hidden, "d, the token width")->check(CLI::PositiveNumber);
  app.add_option("--experts", o.experts, "n experts, placed in blocks over the ranks")->check(CLI::PositiveNumber);
  app.add_option("--top-k", o.top_k, "experts per token")->check(CLI::PositiveNumber);
  app.add_option("--seed", o.seed, "seed of every token, gradient and parameter");
  app.add_option("--capacity-factor", o.capacity_factor, "C = ceil(T k cf / n), T this rank's tokens (all ranks' "
                 "with --global-capacity)")->check(CLI::PositiveNumber);
  app.add_option("--gate", gate, "dense (a weight and a bias) or grap (a bias)")->check(CLI::IsMember({"dense", "grap"}));
  app.add_flag("--global-capacity", o.global_capacity, "one capacity over all ranks' tokens (counts all-gathered)");
  app.add_option("--empty-rank", o.empty_rank, "this rank makes no tokens");
  app.add_option("--dropped-rank", o.dropped_rank, "this rank's capacity is 0: all its tokens dropped");
  app.add_option("--corrupt-counts", o.corrupt_counts, "this rank announces one row too many (a bad-plan test)");
  std::string problem;
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = me == 0 ? app.exit(e) : e.get_exit_code();
    MPI_Finalize();
    return code == 0 ? 0 : 2;
  }
  o.gate = gate == "grap" ? locmoe::gate_type::grap : locmoe::gate_type::dense;
  if (world % o.ranks_per_node != 0) problem = "--ranks-per-node must divide the number of ranks";
  if (o.gate == locmoe::gate_type::grap && o.experts > o.hidden) problem = "--experts must be <= --hidden for GrAP (d / n features per expert)";
  if (o.top_k > o.experts) problem = "--top-k must be <= --experts";
  if (o.empty_rank < -1 || o.empty_rank >= world) problem = "--empty-rank must be a rank (or -1)";
  if (o.dropped_rank < -1 || o.dropped_rank >= world) problem = "--dropped-rank must be a rank (or -1)";
  if (o.corrupt_counts < -1 || o.corrupt_counts >= world) problem = "--corrupt-counts must be a rank (or -1)";
  if (o.dropped_rank >= 0 && o.global_capacity) problem = "--dropped-rank needs per-rank capacities (not --global-capacity)";
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
