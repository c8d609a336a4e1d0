// mpi_exchange_step.hpp - one rank's side of an expert-parallel training step, with no MPI in it: what
// mpi_exchange.cpp runs on each rank, and what its single-process reference runs for every rank in turn. Only the
// four row moves (and the count and gradient exchanges) differ between the two: MPI there, std::copy in
// simulate_step() here. Same calls on the same inputs give the same bits, which is what the program checks.
//
// A step on rank r (ep_rank, in call order):
//   route()                  gate -> selection -> losses (moe_router::route); the counts a global capacity shares
//   assign_and_dispatch()    capacity (per rank, or the rank's share of a global one) and the grouped layout,
//                            whose buffer is the All-to-All send buffer (expert_parallel.hpp)
//   plan(counts_to_me)       build_ep_exchange_plan from the counts that the count exchange delivered
//   [move 0: dispatch]       send -> received (the rows of this rank's experts, from every rank)
//   experts_forward()        scatter_received -> out = W_e in per row -> gather_for_return
//   [move 1: return]         returned -> back (this rank's rows, back in its send buffer's layout)
//   combine()                y = combine(back); dL/dy = the upstream R_r -> dL/d(back) (combine_backward)
//   [move 2: dispatch]       grad_send -> grad_received
//   experts_backward()       dL/d in = W_e^T dL/d out; dL/dW_e = sum over the expert's rows of dL/d out in^T
//   [move 3: return]         grad_returned -> grad_back
//   backward()               dispatch_backward -> dL/dx; moe_router::backward adds the gate's part, sets its
//                            gradients
// The loss of the whole step is the sum over ranks, in rank order, of sum(y_r * R_r) + rank r's router losses.
#pragma once

#include <locmoe/expert_parallel.hpp>
#include <locmoe/router.hpp>

#include <array>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace mpi_example {

struct options {
  int ranks_per_node = 2;
  std::size_t tokens_per_rank = 64, hidden = 32, experts = 8, top_k = 2;
  std::uint64_t seed = 1;
  double capacity_factor = 1.0;
  int empty_rank = -1;          // this rank has no tokens
  int dropped_rank = -1;        // this rank's capacity is 0: all its tokens dropped
  int corrupt_counts = -1;      // this rank announces a wrong row count in the flat exchange
  bool global_capacity = false;  // one capacity over all ranks' tokens
  locmoe::gate_type gate = locmoe::gate_type::dense;
};

/// Rows per local expert are rounded up to this in the experts' buffer (grouped GEMMs); padding rows are zero.
inline constexpr std::int64_t expert_multiple = 8;

// splitmix64, so every rank (and the reference) makes the same values whatever the standard library.
inline std::uint64_t mix(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// What a seeded array is for; with an index (a rank or an expert) it names one stream.
enum class stream : std::uint64_t { tokens = 1, upstream, gate_weight, gate_bias, expert_weight };

/// `count` values uniform in [-scale, scale), from (seed, what, index) alone. 24 random bits: exact in a float.
inline std::vector<float> seeded(std::uint64_t seed, stream what, std::uint64_t index, std::size_t count, float scale) {
  const std::uint64_t base = mix(seed ^ mix((static_cast<std::uint64_t>(what) << 32) + index));
  std::vector<float> v(count);
  for (std::size_t i = 0; i < count; ++i) {
    const auto bits = static_cast<std::uint32_t>(mix(base + i) >> 40);
    v[i] = (static_cast<float>(bits) * (2.0f / 16777216.0f) - 1.0f) * scale;
  }
  return v;
}

inline std::size_t tokens_of_rank(const options& o, int rank) { return rank == o.empty_rank ? 0 : o.tokens_per_rank; }

/// The model's parameters, made from the seed identically on every rank.
struct parameters {
  std::vector<float> gate_weight;    // [n x d] (dense gate; empty for GrAP)
  std::vector<float> gate_bias;      // [n]
  std::vector<float> expert_weight;  // [n x d x d]: expert e maps a row `in` to W_e in
};

inline parameters make_parameters(const options& o) {
  const std::size_t n = o.experts, d = o.hidden;
  parameters p;
  if (o.gate == locmoe::gate_type::dense) p.gate_weight = seeded(o.seed, stream::gate_weight, 0, n * d, 0.25f);
  p.gate_bias = seeded(o.seed, stream::gate_bias, 0, n, 0.125f);
  for (std::size_t e = 0; e < n; ++e) {
    const std::vector<float> w = seeded(o.seed, stream::expert_weight, e, d * d, 0.25f);
    p.expert_weight.insert(p.expert_weight.end(), w.begin(), w.end());
  }
  return p;
}

/// The gate's gradient (weight [n x d] if dense, then bias [n]) as one array: what the ranks reduce.
inline std::size_t gate_gradient_size(const options& o) {
  return (o.gate == locmoe::gate_type::dense ? o.experts * o.hidden : 0) + o.experts;
}

/// Sums R arrays of `size` values ([R x size], rank after rank) in rank order, so every process gets the same
/// bits (MPI_Allreduce's order is the implementation's choice).
inline std::vector<float> sum_in_rank_order(const std::vector<float>& all, std::size_t ranks, std::size_t size) {
  std::vector<float> sum(size, 0.0f);
  for (std::size_t r = 0; r < ranks; ++r)
    for (std::size_t i = 0; i < size; ++i) sum[i] += all[r * size + i];
  return sum;
}
inline double sum_in_rank_order(const std::vector<double>& per_rank) {
  double sum = 0;
  for (const double v : per_rank) sum += v;
  return sum;
}

template <class T>
locmoe::matrix_view<T> view(T* data, std::size_t rows, std::size_t cols) { return {data, rows, cols}; }

/// The four row moves of a step. Dispatch moves go from the send layout (plan.send_offset) to the receive layout
/// (plan.recv_offset); return moves go the other way.
enum class move { dispatch, combine_return, grad_dispatch, grad_return };
inline constexpr std::array<move, 4> all_moves = {move::dispatch, move::combine_return, move::grad_dispatch, move::grad_return};
inline bool is_dispatch(move m) { return m == move::dispatch || m == move::grad_dispatch; }
inline const char* to_string(move m) {
  switch (m) {
    case move::dispatch: return "forward dispatch";
    case move::combine_return: return "forward return";
    case move::grad_dispatch: return "backward dispatch";
    case move::grad_return: return "backward return";
  }
  return "?";
}

/// A move's buffers on one rank: `from` holds the rows for rank q at rows [from_offset[q], from_offset[q + 1]);
/// the rows from rank s land in `to` at rows [to_offset[s], to_offset[s + 1]).
struct move_buffers {
  const std::vector<float>& from;
  const std::vector<std::int64_t>& from_offset;
  std::vector<float>& to;
  const std::vector<std::int64_t>& to_offset;
};

class ep_rank {
 public:
  ep_rank(const options& o, const locmoe::topology& topo, const parameters& p, const locmoe::cpu_backend& cpu, int rank)
      : o_(o), topo_(topo), p_(p), rank_(rank), router_(cpu, router_options(o, topo, rank)),
        x_(seeded(o.seed, stream::tokens, static_cast<std::uint64_t>(rank), tokens_of_rank(o, rank) * o.hidden, 1.0f)),
        upstream_(seeded(o.seed, stream::upstream, static_cast<std::uint64_t>(rank), x_.size(), 1.0f)) {}

  int rank() const { return rank_; }
  std::size_t tokens() const { return x_.size() / o_.hidden; }
  const locmoe::routing<float>& routing() const { return router_.last(); }
  const locmoe::ep_exchange_plan& exchange_plan() const { return plan_; }

  /// The gate, the selection and the losses; returns the routed counts per expert [n] (before capacity).
  const std::int64_t* route() { return router_.route(x_view(), gate()).tokens_per_expert; }

  /// Capacity (all_counts [R x n]: every rank's route() counts, with a global capacity; else null) and the
  /// grouped layout, which is the send buffer.
  void assign_and_dispatch(const std::int64_t* all_counts) {
    const locmoe::routing<float>& r = router_.assign(all_counts);
    send_.assign(r.buffer_rows * o_.hidden, 0.0f);
    router_.dispatch(x_view(), view(send_.data(), r.buffer_rows, o_.hidden));
  }
  /// Kept rows per expert [n]: rank q is told the slice of its experts (experts_of_rank).
  const std::int64_t* kept_per_expert() const { return router_.last().kept_per_expert; }

  /// The exchange plan from the counts [R x E_r] the count exchange delivered; sizes every later buffer.
  void plan(const std::int64_t* counts_to_me) {
    plan_ = locmoe::build_ep_exchange_plan(topo_, static_cast<std::size_t>(rank_), kept_per_expert(), counts_to_me,
                                           expert_multiple);
    if (plan_.sent_rows() != router_.last().buffer_rows) {  // group_multiple 1: the layout is the send buffer
      throw std::logic_error("the grouped layout has " + std::to_string(router_.last().buffer_rows) +
                             " rows, the plan sends " + std::to_string(plan_.sent_rows()));
    }
    const std::size_t d = o_.hidden, sent = plan_.sent_rows() * d, received = plan_.received_rows() * d;
    for (std::vector<float>* v : {&received_, &returned_, &grad_received_, &grad_returned_}) v->assign(received, 0.0f);
    for (std::vector<float>* v : {&back_, &grad_send_, &grad_back_}) v->assign(sent, 0.0f);
  }

  move_buffers buffers(move m) {
    switch (m) {
      case move::dispatch: return {send_, plan_.send_offset, received_, plan_.recv_offset};
      case move::combine_return: return {returned_, plan_.recv_offset, back_, plan_.send_offset};
      case move::grad_dispatch: return {grad_send_, plan_.send_offset, grad_received_, plan_.recv_offset};
      case move::grad_return: break;
    }
    return {grad_returned_, plan_.recv_offset, grad_back_, plan_.send_offset};
  }

  /// The local experts on the rows that arrived: received -> experts' buffer -> out -> returned.
  void experts_forward() {
    const std::size_t d = o_.hidden, rows = plan_.expert_rows();
    expert_in_.assign(rows * d, 0.0f);
    expert_out_.assign(rows * d, 0.0f);
    locmoe::scatter_received(plan_, view<const float>(received_.data(), plan_.received_rows(), d), view(expert_in_.data(), rows, d));
    for (std::size_t e = 0; e < plan_.local_experts; ++e) {
      const float* w = weight_of(e);
      for (auto row = static_cast<std::size_t>(plan_.expert_offset[e]); row < static_cast<std::size_t>(plan_.expert_offset[e + 1]); ++row) {
        const float* in = &expert_in_[row * d];
        float* out = &expert_out_[row * d];
        for (std::size_t i = 0; i < d; ++i) {  // out_i = sum_j W_ij in_j, j ascending
          float acc = 0.0f;
          for (std::size_t j = 0; j < d; ++j) acc += w[i * d + j] * in[j];
          out[i] = acc;
        }
      }
    }
    locmoe::gather_for_return(plan_, view<const float>(expert_out_.data(), rows, d), view(returned_.data(), plan_.received_rows(), d));
  }

  /// y from the returned rows; dL/dy = the upstream gradient R_r gives dL/d(returned rows), the send layout.
  void combine() {
    const std::size_t d = o_.hidden, rows = plan_.sent_rows(), tokens = this->tokens();
    y_.assign(tokens * d, 0.0f);
    router_.combine(view<const float>(back_.data(), rows, d), view(y_.data(), tokens, d));
    router_.combine_backward(view<const float>(back_.data(), rows, d), view<const float>(upstream_.data(), tokens, d),
                             view(grad_send_.data(), rows, d));
  }

  /// The experts' backward: dL/d in = W_e^T dL/d out; dL/dW_e = sum of dL/d out in^T over the expert's rows in
  /// buffer order (padding rows add zeros).
  void experts_backward() {
    const std::size_t d = o_.hidden, rows = plan_.expert_rows();
    std::vector<float> grad_out(rows * d), grad_in(rows * d);
    locmoe::scatter_received(plan_, view<const float>(grad_received_.data(), plan_.received_rows(), d), view(grad_out.data(), rows, d));
    grad_expert_.assign(plan_.local_experts * d * d, 0.0f);
    for (std::size_t e = 0; e < plan_.local_experts; ++e) {
      const float* w = weight_of(e);
      float* gw = &grad_expert_[e * d * d];
      for (auto row = static_cast<std::size_t>(plan_.expert_offset[e]); row < static_cast<std::size_t>(plan_.expert_offset[e + 1]); ++row) {
        const float* go = &grad_out[row * d];
        const float* in = &expert_in_[row * d];
        for (std::size_t j = 0; j < d; ++j) {  // (W^T go)_j = sum_i W_ij go_i, i ascending
          float acc = 0.0f;
          for (std::size_t i = 0; i < d; ++i) acc += w[i * d + j] * go[i];
          grad_in[row * d + j] = acc;
        }
        for (std::size_t i = 0; i < d; ++i)
          for (std::size_t j = 0; j < d; ++j) gw[i * d + j] += go[i] * in[j];
      }
    }
    locmoe::gather_for_return(plan_, view<const float>(grad_in.data(), rows, d), view(grad_returned_.data(), plan_.received_rows(), d));
  }

  /// dL/dx from the returned gradient rows, plus the gate's part; the gate's gradients (this rank's tokens).
  void backward() {
    const std::size_t d = o_.hidden, n = o_.experts, tokens = this->tokens();
    dx_.assign(tokens * d, 0.0f);
    router_.dispatch_backward(view<const float>(grad_back_.data(), plan_.sent_rows(), d), view(dx_.data(), tokens, d));
    grad_gate_.assign(gate_gradient_size(o_), 0.0f);
    const bool dense = o_.gate == locmoe::gate_type::dense;
    const locmoe::gate_gradients<float> grads{dense ? view(grad_gate_.data(), n, d) : locmoe::matrix_view<float>{},
                                              grad_gate_.data() + (dense ? n * d : 0)};
    router_.backward(x_view(), gate(), view(dx_.data(), tokens, d), grads);
  }

  /// sum(y * R) + this rank's router losses, in double.
  double loss() const {
    double sum = 0;
    for (std::size_t i = 0; i < y_.size(); ++i) sum += static_cast<double>(y_[i]) * static_cast<double>(upstream_[i]);
    const locmoe::routing<float>& r = router_.last();
    return sum + r.aux_loss + r.z_loss + r.locality_loss;
  }

  const std::vector<float>& y() const { return y_; }
  const std::vector<float>& dx() const { return dx_; }
  const std::vector<float>& gate_gradient() const { return grad_gate_; }
  /// dL/dW of this rank's experts [E_r x d x d], in expert order.
  const std::vector<float>& expert_gradient() const { return grad_expert_; }

 private:
  static locmoe::moe_router_options router_options(const options& o, const locmoe::topology& topo, int rank) {
    locmoe::moe_router_options r;
    r.gate = o.gate;
    r.hidden = o.hidden;
    r.experts = o.experts;
    r.top_k = o.top_k;
    r.capacity_factor = o.capacity_factor;
    if (rank == o.dropped_rank) r.capacity = locmoe::capacity_rule::fixed, r.fixed_capacity = 0;
    r.global_capacity = o.global_capacity;
    r.layout = locmoe::buffer_layout::grouped;
    r.group_multiple = 1;  // so the layout is the send buffer
    r.aux_coeff = 0.01;
    r.z_coeff = 0.001;
    r.locality_coeff = 0.01;
    r.topo = &topo;
    r.rank = rank;
    return r;
  }
  locmoe::matrix_view<const float> x_view() const { return {x_.data(), tokens(), o_.hidden}; }
  locmoe::gate_parameters<float> gate() const {
    if (o_.gate == locmoe::gate_type::grap) return {{}, p_.gate_bias.data()};
    return {view<const float>(p_.gate_weight.data(), o_.experts, o_.hidden), p_.gate_bias.data()};
  }
  const float* weight_of(std::size_t local_expert) const {
    return &p_.expert_weight[(plan_.first_expert + local_expert) * o_.hidden * o_.hidden];
  }

  const options& o_;
  const locmoe::topology& topo_;
  const parameters& p_;
  int rank_;
  locmoe::moe_router<locmoe::cpu_backend, float> router_;
  std::vector<float> x_, upstream_;
  locmoe::ep_exchange_plan plan_;
  // Row buffers: the send layout [sent rows x d], the receive layout [received rows x d], the experts' [rows x d].
  std::vector<float> send_, received_, returned_, back_, grad_send_, grad_received_, grad_returned_, grad_back_;
  std::vector<float> expert_in_, expert_out_;
  std::vector<float> y_, dx_, grad_gate_, grad_expert_;
};

/// What a step produces: per rank y and dL/dx; the reduced gate gradient, every expert's gradient [n x d x d]
/// (experts in order = ranks in order), the loss; and, for the byte checks, the send matrix [R x R] in rows.
struct step_result {
  std::vector<std::vector<float>> y, dx;
  std::vector<float> gate_gradient, expert_gradient;
  double loss = 0;
  std::vector<std::int64_t> send_rows;
  std::vector<locmoe::assignment_stats> stats;  // per rank
  std::vector<std::size_t> received_rows;       // per rank: rows its experts received
};

/// The single-process reference: R ranks simulated in turn with the same calls; counts and rows move by copies
/// (as tests/test_expert_parallel.cpp), sums in rank order.
inline step_result simulate_step(const options& o, const locmoe::topology& topo, const parameters& p) {
  const std::size_t R = topo.ranks(), n = o.experts, d = o.hidden;
  locmoe::thread_pool pool(1);
  const locmoe::cpu_backend cpu(pool);
  std::vector<ep_rank> ranks;
  ranks.reserve(R);
  for (std::size_t r = 0; r < R; ++r) ranks.emplace_back(o, topo, p, cpu, static_cast<int>(r));
  std::vector<std::int64_t> all_counts(R * n);  // what MPI_Allgather gives every rank
  for (std::size_t r = 0; r < R; ++r) {
    const std::int64_t* routed = ranks[r].route();
    std::copy(routed, routed + n, all_counts.begin() + static_cast<std::ptrdiff_t>(r * n));
  }
  for (ep_rank& r : ranks) r.assign_and_dispatch(o.global_capacity ? all_counts.data() : nullptr);
  for (std::size_t q = 0; q < R; ++q) {  // the count exchange: q hears each s's counts for q's experts
    const auto [first, local] = locmoe::experts_of_rank(topo, q);
    std::vector<std::int64_t> to_me(R * local);
    for (std::size_t s = 0; s < R; ++s)
      for (std::size_t e = 0; e < local; ++e) to_me[s * local + e] = ranks[s].kept_per_expert()[first + e];
    ranks[q].plan(to_me.data());
  }
  const auto copy_move = [&](move m) {  // the All-to-All: one copy per (source, destination) block
    for (std::size_t s = 0; s < R; ++s) {
      for (std::size_t t = 0; t < R; ++t) {
        const move_buffers from = ranks[s].buffers(m), to = ranks[t].buffers(m);
        const std::int64_t count = from.from_offset[t + 1] - from.from_offset[t];
        if (count != to.to_offset[s + 1] - to.to_offset[s]) throw std::logic_error("reference: plans disagree on a block");
        const auto begin = from.from.begin() + from.from_offset[t] * static_cast<std::ptrdiff_t>(d);
        std::copy(begin, begin + count * static_cast<std::ptrdiff_t>(d),
                  to.to.begin() + to.to_offset[s] * static_cast<std::ptrdiff_t>(d));
      }
    }
  };
  copy_move(move::dispatch);
  for (ep_rank& r : ranks) r.experts_forward();
  copy_move(move::combine_return);
  for (ep_rank& r : ranks) r.combine();
  copy_move(move::grad_dispatch);
  for (ep_rank& r : ranks) r.experts_backward();
  copy_move(move::grad_return);
  for (ep_rank& r : ranks) r.backward();

  step_result out;
  std::vector<float> gate_all;
  std::vector<double> losses;
  for (const ep_rank& r : ranks) {
    out.y.push_back(r.y());
    out.dx.push_back(r.dx());
    gate_all.insert(gate_all.end(), r.gate_gradient().begin(), r.gate_gradient().end());
    out.expert_gradient.insert(out.expert_gradient.end(), r.expert_gradient().begin(), r.expert_gradient().end());
    losses.push_back(r.loss());
    out.send_rows.insert(out.send_rows.end(), r.exchange_plan().send_count.begin(), r.exchange_plan().send_count.end());
    out.stats.push_back(r.routing().stats);
    out.received_rows.push_back(r.exchange_plan().received_rows());
  }
  out.gate_gradient = sum_in_rank_order(gate_all, R, gate_gradient_size(o));
  out.loss = sum_in_rank_order(losses);
  return out;
}

}  // namespace mpi_example
