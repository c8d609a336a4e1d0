// expert_parallel.hpp: R ranks simulated in one process, each with its own moe_router on its own tokens (grouped
// layout = send buffer); counts exchanged, rows moved by copies standing in for the All-to-Alls, experts run on
// their rank's buffer, rows returned, combined; forward and backward equal each rank computing its rows locally,
// bit for bit. Ranks without tokens, and a rank whose tokens are all dropped; padding rows; bad inputs.
#include <locmoe/expert_parallel.hpp>
#include <locmoe/router.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace locmoe;

namespace {

/// The toy expert e: each row scaled by (e + 1) / 4 (so its backward is the same scaling).
void run_expert(std::size_t e, float* rows, std::size_t count, std::size_t d) {
  const float s = static_cast<float>(e + 1) * 0.25f;
  for (std::size_t i = 0; i < count * d; ++i) rows[i] *= s;
}

struct rank_state {
  std::vector<float> x, upstream, y_local, dx_local, y, dx;
};

}  // namespace

TEST_CASE("expert parallel: counts-only plans move every row to its expert and back, forward and backward") {
  const std::size_t R = 4, n = 8, d = 10, k = 2;
  const std::size_t tokens[R] = {33, 0, 17, 25};  // rank 1 has no tokens
  const topology topo = topology::uniform(4, 2, static_cast<std::int64_t>(n));
  std::mt19937 rng(3);
  thread_pool pool(1);
  const cpu_backend cpu(pool);
  std::vector<rank_state> st(R);
  std::vector<moe_router<cpu_backend, float>> routers;
  for (std::size_t r = 0; r < R; ++r) {
    moe_router_options o;
    o.hidden = d;
    o.experts = n;
    o.top_k = k;
    o.capacity_factor = 1.0;
    o.layout = buffer_layout::grouped;
    o.topo = &topo;
    o.rank = static_cast<std::int32_t>(r);
    if (r == 3) o.capacity = capacity_rule::fixed, o.fixed_capacity = 0;  // every token of rank 3 dropped
    routers.emplace_back(cpu, o);
    st[r].x.resize(tokens[r] * d);
    st[r].upstream.resize(tokens[r] * d);
    for (float& v : st[r].x) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
    for (float& v : st[r].upstream) v = std::normal_distribution<float>(0.0f, 1.0f)(rng);
  }
  // Each rank: route its tokens, dispatch into its grouped layout (the send buffer), and the local reference.
  std::vector<std::vector<float>> send(R);
  for (std::size_t r = 0; r < R; ++r) {
    const std::size_t T = tokens[r];
    const matrix_view<const float> x(st[r].x.data(), T, d);
    const routing<float>& rt = routers[r].forward(x, {});
    send[r].resize(rt.buffer_rows * d);
    routers[r].dispatch(x, matrix_view<float>(send[r].data(), rt.buffer_rows, d));
    std::vector<float> local = send[r], grad_local(rt.buffer_rows * d);
    for (std::size_t e = 0; e < n; ++e)
      run_expert(e, local.data() + rt.layout.begin_of(e) * d, rt.layout.end_of(e) - rt.layout.begin_of(e), d);
    st[r].y_local.resize(T * d);
    st[r].dx_local.resize(T * d);
    routers[r].combine(matrix_view<const float>(local.data(), rt.buffer_rows, d), matrix_view<float>(st[r].y_local.data(), T, d));
    routers[r].combine_backward(matrix_view<const float>(local.data(), rt.buffer_rows, d),
                                matrix_view<const float>(st[r].upstream.data(), T, d), matrix_view<float>(grad_local.data(), rt.buffer_rows, d));
    for (std::size_t e = 0; e < n; ++e)
      run_expert(e, grad_local.data() + rt.layout.begin_of(e) * d, rt.layout.end_of(e) - rt.layout.begin_of(e), d);
    routers[r].dispatch_backward(matrix_view<const float>(grad_local.data(), rt.buffer_rows, d), matrix_view<float>(st[r].dx_local.data(), T, d));
    if (r == 3) CHECK(rt.stats.kept == 0);
  }
  // The count exchange: rank q receives from each s the slice of q's experts.
  std::vector<ep_exchange_plan> plans;
  for (std::size_t q = 0; q < R; ++q) {
    const auto [first, local] = experts_of_rank(topo, q);
    std::vector<std::int64_t> to_me(R * local);
    for (std::size_t s = 0; s < R; ++s)
      for (std::size_t e = 0; e < local; ++e) to_me[s * local + e] = routers[s].last().kept_per_expert[first + e];
    plans.push_back(build_ep_exchange_plan(topo, q, routers[q].last().kept_per_expert, to_me.data(), 8));
  }
  // The All-to-All: a copy of each (source, destination) range; `back` undoes it.
  const auto all_to_all = [&](const std::vector<std::vector<float>>& from, bool forward) {
    std::vector<std::vector<float>> to(R);
    for (std::size_t q = 0; q < R; ++q) to[q].resize((forward ? plans[q].received_rows() : plans[q].sent_rows()) * d);
    for (std::size_t s = 0; s < R; ++s) {
      for (std::size_t q = 0; q < R; ++q) {
        const std::size_t src = forward ? s : q, dst = forward ? q : s;  // rows travel src -> dst
        const auto count = static_cast<std::size_t>(plans[src].send_count[dst]);
        REQUIRE(count == static_cast<std::size_t>(plans[dst].recv_count[src]));
        const std::size_t at_sender = static_cast<std::size_t>(plans[src].send_offset[dst]) * d;
        const std::size_t at_receiver = static_cast<std::size_t>(plans[dst].recv_offset[src]) * d;
        if (forward) {
          std::copy(from[src].begin() + at_sender, from[src].begin() + at_sender + count * d, to[dst].begin() + at_receiver);
        } else {  // back: from the receiver's return buffer into the sender's layout
          std::copy(from[dst].begin() + at_receiver, from[dst].begin() + at_receiver + count * d, to[src].begin() + at_sender);
        }
      }
    }
    return to;
  };
  const auto run_experts = [&](std::size_t q, std::vector<float>& buffer) {
    for (std::size_t e = 0; e < plans[q].local_experts; ++e) {
      const auto begin = static_cast<std::size_t>(plans[q].expert_offset[e]), end = static_cast<std::size_t>(plans[q].expert_offset[e + 1]);
      run_expert(plans[q].first_expert + e, buffer.data() + begin * d, end - begin, d);
    }
  };
  const std::vector<std::vector<float>> received = all_to_all(send, true);
  std::vector<std::vector<float>> returned(R);
  for (std::size_t q = 0; q < R; ++q) {
    std::vector<float> experts(plans[q].expert_rows() * d, std::numeric_limits<float>::quiet_NaN());
    scatter_received(plans[q], matrix_view<const float>(received[q].data(), plans[q].received_rows(), d),
                     matrix_view<float>(experts.data(), plans[q].expert_rows(), d));
    for (std::size_t row = 0; row < plans[q].expert_rows(); ++row)
      if (plans[q].received_of_row[row] < 0)
        for (std::size_t c = 0; c < d; ++c) CHECK(experts[row * d + c] == 0.0f);  // padding: zeros, not NaN
    CHECK(plans[q].expert_rows() % 8 == 0);
    run_experts(q, experts);
    returned[q].resize(plans[q].received_rows() * d);
    gather_for_return(plans[q], matrix_view<const float>(experts.data(), plans[q].expert_rows(), d),
                      matrix_view<float>(returned[q].data(), plans[q].received_rows(), d));
  }
  const std::vector<std::vector<float>> back = all_to_all(returned, false);
  // Backward: combine_backward on the source, the same moves, experts^T, the way back, dispatch_backward.
  std::vector<std::vector<float>> grad_send(R);
  for (std::size_t r = 0; r < R; ++r) {
    const std::size_t T = tokens[r], rows = routers[r].last().buffer_rows;
    st[r].y.resize(T * d);
    routers[r].combine(matrix_view<const float>(back[r].data(), rows, d), matrix_view<float>(st[r].y.data(), T, d));
    grad_send[r].resize(rows * d);
    routers[r].combine_backward(matrix_view<const float>(back[r].data(), rows, d), matrix_view<const float>(st[r].upstream.data(), T, d),
                                matrix_view<float>(grad_send[r].data(), rows, d));
  }
  const std::vector<std::vector<float>> grad_received = all_to_all(grad_send, true);
  std::vector<std::vector<float>> grad_returned(R);
  for (std::size_t q = 0; q < R; ++q) {
    std::vector<float> grad_experts(plans[q].expert_rows() * d);
    scatter_received(plans[q], matrix_view<const float>(grad_received[q].data(), plans[q].received_rows(), d),
                     matrix_view<float>(grad_experts.data(), plans[q].expert_rows(), d));
    run_experts(q, grad_experts);
    grad_returned[q].resize(plans[q].received_rows() * d);
    gather_for_return(plans[q], matrix_view<const float>(grad_experts.data(), plans[q].expert_rows(), d),
                      matrix_view<float>(grad_returned[q].data(), plans[q].received_rows(), d));
  }
  const std::vector<std::vector<float>> grad_back = all_to_all(grad_returned, false);
  for (std::size_t r = 0; r < R; ++r) {
    CAPTURE(r);
    const std::size_t T = tokens[r], rows = routers[r].last().buffer_rows;
    st[r].dx.resize(T * d);
    routers[r].dispatch_backward(matrix_view<const float>(grad_back[r].data(), rows, d), matrix_view<float>(st[r].dx.data(), T, d));
    CHECK(st[r].y == st[r].y_local);
    CHECK(st[r].dx == st[r].dx_local);
  }
  std::int64_t moved = 0;
  for (const auto& p : plans) moved += static_cast<std::int64_t>(p.received_rows());
  CHECK(moved > 0);
}

TEST_CASE("expert parallel: bad inputs name the argument") {
  const topology interleaved({0, 1}, {0, 1, 0, 1});
  CHECK_THROWS_WITH_AS(experts_of_rank(interleaved, 0), doctest::Contains("rank order"), error);
  const topology topo = topology::uniform(2, 1, 4);
  const std::vector<std::int64_t> kept = {1, 0, 2, 1}, negative = {1, -1, 0, 0}, to_me = {1, 2, 2, 1};
  CHECK_THROWS_WITH_AS(build_ep_exchange_plan(topo, 2, kept.data(), to_me.data()), doctest::Contains("rank"), error);
  CHECK_THROWS_WITH_AS(build_ep_exchange_plan(topo, 0, negative.data(), to_me.data()), doctest::Contains("my_kept"), error);
  CHECK_THROWS_WITH_AS(build_ep_exchange_plan(topo, 0, kept.data(), to_me.data(), 0), doctest::Contains("multiple"), error);
  const ep_exchange_plan plan = build_ep_exchange_plan(topo, 0, kept.data(), to_me.data());
  CHECK(plan.send_count == std::vector<std::int64_t>{1, 3});
  CHECK(plan.recv_count == std::vector<std::int64_t>{3, 3});
  // Received: s0's e0 row, s0's two e1 rows, s1's two e0 rows, s1's e1 row; the experts' buffer: e0 (s0, s1), e1.
  CHECK(plan.row_of_received == std::vector<std::int64_t>{0, 3, 4, 1, 2, 5});
  std::vector<float> wrong(3);
  std::vector<float> experts(plan.expert_rows());
  CHECK_THROWS_WITH_AS(scatter_received(plan, matrix_view<const float>(wrong.data(), 3, 1),
                                        matrix_view<float>(experts.data(), plan.expert_rows(), 1)),
                       doctest::Contains("received"), error);
}
