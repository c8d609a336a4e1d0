// The thread-safety statements of the headers, exercised: several std::threads on disjoint token ranges of shared
// buffers (selection, GrAP, score routers with their own scratch, route_backward), on one shared dispatch plan and
// topology (dispatch, combine and exchange plans from every thread at once), and two threads on one cpu_backend
// (serialized on its pool). Each result must equal the single-threaded one bit for bit. The `tsan` preset runs this
// file with the CPU backend's and the router's tests under ThreadSanitizer, which reports any data race.
#include <locmoe/assign.hpp>
#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/exchange.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>

#include <doctest/doctest.h>

#include <cstring>
#include <functional>
#include <random>
#include <thread>
#include <vector>

using namespace locmoe;

namespace {

constexpr std::size_t thread_count = 4;

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

std::vector<float> normal_values(std::size_t count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> v(count);
  for (float& x : v) x = normal(rng);
  return v;
}

// Runs body(range) on thread_count threads, each on its own contiguous block of [0, tokens).
void on_disjoint_ranges(std::size_t tokens, const std::function<void(token_range)>& body) {
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < thread_count; ++i)
    threads.emplace_back(body, token_range{i * tokens / thread_count, (i + 1) * tokens / thread_count});
  for (auto& t : threads) t.join();
}

// Runs body(i) on thread_count threads at once.
void on_every_thread(const std::function<void(std::size_t)>& body) {
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < thread_count; ++i) threads.emplace_back(body, i);
  for (auto& t : threads) t.join();
}

}  // namespace

TEST_CASE("threads: selection, GrAP, score routers and route_backward on disjoint token ranges") {
  const std::size_t tokens = 403, n = 24, d = 96, k = 3;
  const std::vector<float> logits = normal_values(tokens * n, 1), x = normal_values(tokens * d, 2),
                           grad_w = normal_values(tokens * k, 3);
  const matrix_view<const float> lv(logits.data(), tokens, n), xv(x.data(), tokens, d);

  // What each call gives on one thread.
  const auto outputs = [&](std::size_t cols) { return std::vector<float>(tokens * cols, -1.0f); };
  std::vector<expert_index> idx1(tokens * k), idx2(tokens * k), idx3(tokens * k);
  std::vector<float> w1 = outputs(k), p1 = outputs(n), w2 = outputs(k), l2 = outputs(n), w3 = outputs(k), g3 = outputs(n);
  router_options<float> grouped;
  grouped.k = k;
  grouped.groups = 4;
  grouped.group_limit = 2;
  grouped.softmax_before_topk = false;
  const grap_gate<float> gate{d, n, true, nullptr};
  const auto run_all = [&](token_range range, std::vector<expert_index>& i1, std::vector<float>& ww1, std::vector<float>& pp1,
                           std::vector<expert_index>& i2, std::vector<float>& ww2, std::vector<float>& ll2,
                           std::vector<expert_index>& i3, std::vector<float>& ww3, std::vector<float>& gg3) {
    softmax_top_k(lv, {k, true}, {i1.data(), tokens, k}, {ww1.data(), tokens, k}, {pp1.data(), tokens, n}, range);
    grap_route(gate, xv, {k, false}, {{i2.data(), tokens, k}, {ww2.data(), tokens, k}, {}, {ll2.data(), tokens, n}}, range);
    route_scratch<float> scratch(grouped, n);  // one per thread, as routers.hpp says
    score_route(lv, grouped, {{i3.data(), tokens, k}, {ww3.data(), tokens, k}, {}, {}}, range, default_policy{}, &scratch);
    route_backward(lv, grouped, matrix_view<const expert_index>(i3.data(), tokens, k),
                   matrix_view<const float>(grad_w.data(), tokens, k), matrix_view<float>(gg3.data(), tokens, n), range);
  };
  std::fill(g3.begin(), g3.end(), 0.0f);
  run_all({}, idx1, w1, p1, idx2, w2, l2, idx3, w3, g3);

  std::vector<expert_index> ti1(tokens * k), ti2(tokens * k), ti3(tokens * k);
  std::vector<float> tw1 = outputs(k), tp1 = outputs(n), tw2 = outputs(k), tl2 = outputs(n), tw3 = outputs(k),
                     tg3(tokens * n, 0.0f);
  on_disjoint_ranges(tokens, [&](token_range range) { run_all(range, ti1, tw1, tp1, ti2, tw2, tl2, ti3, tw3, tg3); });
  CHECK(ti1 == idx1);
  CHECK(same_bits(tw1, w1));
  CHECK(same_bits(tp1, p1));
  CHECK(ti2 == idx2);
  CHECK(same_bits(tw2, w2));
  CHECK(same_bits(tl2, l2));
  CHECK(ti3 == idx3);
  CHECK(same_bits(tw3, w3));
  CHECK(same_bits(tg3, g3));
}

TEST_CASE("threads: one shared topology and dispatch plan, dispatch / combine / exchange plans from every thread") {
  const std::size_t tokens = 300, n = 8, k = 2, d = 33;
  const std::vector<float> logits = normal_values(tokens * n, 4), x = normal_values(tokens * d, 5);
  std::vector<expert_index> idx(tokens * k), expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<float> w(tokens * k), kept_w(tokens * k);
  softmax_top_k(matrix_view<const float>(logits.data(), tokens, n), {k, false}, {idx.data(), tokens, k}, {w.data(), tokens, k});
  capacity_options o;
  o.capacity_factor = 1.0;
  capacity_assigner<float> assigner(n, o);
  const auto stats = assigner.run(matrix_view<const expert_index>(idx.data(), tokens, k), matrix_view<const float>(w.data(), tokens, k),
                                  {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_w.data(), tokens, k}});
  const topology topo = topology::uniform(4, 2, static_cast<std::int64_t>(n));
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), stats.capacity,
                                                 topo, token_ranks::contiguous_blocks(), 1024);
  const matrix_view<const float> xv(x.data(), tokens, d);
  const matrix_view<const float> wv(kept_w.data(), tokens, k);
  std::vector<float> buffer(plan.buffer_rows() * d), y(tokens * d);
  dispatch(plan, xv, matrix_view<float>(buffer.data(), plan.buffer_rows(), d));
  combine(plan, matrix_view<const float>(buffer.data(), plan.buffer_rows(), d), wv, matrix_view<float>(y.data(), tokens, d));
  const exchange_plan reference = build_exchange_plan(plan.send_bytes, topo, {exchange_scheme::two_level});

  std::vector<std::vector<float>> buffers(thread_count, std::vector<float>(buffer.size(), 7.0f)),
      ys(thread_count, std::vector<float>(y.size(), 7.0f));
  std::vector<exchange_plan> plans(thread_count);
  on_every_thread([&](std::size_t i) {
    dispatch(plan, xv, matrix_view<float>(buffers[i].data(), plan.buffer_rows(), d));
    combine(plan, matrix_view<const float>(buffers[i].data(), plan.buffer_rows(), d), wv, matrix_view<float>(ys[i].data(), tokens, d));
    plans[i] = build_exchange_plan(plan.send_bytes, topo, {exchange_scheme::two_level});
  });
  for (std::size_t i = 0; i < thread_count; ++i) {
    CHECK(same_bits(buffers[i], buffer));
    CHECK(same_bits(ys[i], y));
    CHECK(plans[i].total_bytes == reference.total_bytes);
  }
}

TEST_CASE("threads: two threads on one cpu_backend serialize on its pool and get the single-threaded results") {
  const std::size_t tokens = 517, d = 64, n = 8, k = 2;
  const std::vector<float> x = normal_values(tokens * d, 6);
  const grap_gate<float> gate{d, n, true, nullptr};
  std::vector<expert_index> ri(tokens * k);
  std::vector<float> rw(tokens * k);
  grap_route(gate, matrix_view<const float>(x.data(), tokens, d), select_options{k, false},
             route_outputs<float>{{ri.data(), tokens, k}, {rw.data(), tokens, k}, {}, {}});

  thread_pool pool(3);
  const cpu_backend cpu(pool, 32);
  const grap_pipeline pipeline(cpu, router_shape{tokens, d, n, k, 200});
  std::vector<std::vector<expert_index>> indices(2, std::vector<expert_index>(tokens * k)), experts = indices;
  std::vector<std::vector<slot_index>> slots(2, std::vector<slot_index>(tokens * k));
  std::vector<std::vector<float>> weights(2, std::vector<float>(tokens * k)), buffers(2, std::vector<float>(pipeline.buffer_rows() * d));
  std::vector<std::vector<std::int64_t>> routed(2, std::vector<std::int64_t>(n)), kept = routed;
  std::vector<std::vector<unsigned char>> workspaces(2, std::vector<unsigned char>(pipeline.workspace_size()));
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      const pipeline_outputs<float> out{{indices[i].data(), tokens, k}, {weights[i].data(), tokens, k}, {},
                                        {experts[i].data(), tokens, k}, {slots[i].data(), tokens, k},
                                        routed[i].data(), kept[i].data()};
      pipeline.run(gate, matrix_view<const float>(x.data(), tokens, d), out,
                   matrix_view<float>(buffers[i].data(), pipeline.buffer_rows(), d), workspaces[i].data(), workspaces[i].size());
    });
  }
  for (auto& t : threads) t.join();
  for (std::size_t i = 0; i < 2; ++i) {
    CHECK(indices[i] == ri);
    CHECK(same_bits(weights[i], rw));
    CHECK(experts[i] == experts[0]);
    CHECK(slots[i] == slots[0]);
    CHECK(same_bits(buffers[i], buffers[0]));
  }
}
