// backend/: the thread pool, the CPU backend against the single-threaded library calls (bit for bit, for 1 to 4
// threads and several grains), the pipeline end to end, the concept check, and bad inputs.
#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cpu.hpp>

#include <locmoe/assign.hpp>
#include <locmoe/topology.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

using namespace locmoe;

static_assert(is_backend_v<cpu_backend>);
static_assert(!is_backend_v<int>);
static_assert(!is_backend_v<thread_pool>);
static_assert(uses_host_memory_v<cpu_backend>);  // what moe_router requires
static_assert(!uses_host_memory_v<int>);         // without the flag, memory counts as a device's

namespace {

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

std::vector<float> random_x(std::size_t tokens, std::size_t d, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(tokens * d);
  for (float& v : x) v = normal(rng);
  return x;
}

}  // namespace

TEST_CASE("thread_pool runs every task exactly once, for any thread count, and again") {
  for (const std::size_t threads : {1, 2, 3, 8}) {
    thread_pool pool(threads);
    CHECK(pool.threads() == threads);
    for (const std::size_t tasks : {0, 1, 2, 7, 1000}) {
      for (int round = 0; round < 3; ++round) {
        std::vector<std::atomic<int>> hits(tasks);
        pool.run(tasks, [&](std::size_t t) { hits[t].fetch_add(1); });
        std::size_t once = 0;
        for (auto& h : hits) once += h.load() == 1;
        CHECK(once == tasks);
      }
    }
  }
  CHECK_THROWS_WITH_AS(thread_pool(0), doctest::Contains("threads = 0"), error);
}

TEST_CASE("thread_pool: a task that throws reaches the caller of run, and the pool stays usable") {
  for (const std::size_t threads : {1, 2, 4}) {
    CAPTURE(threads);
    thread_pool pool(threads);
    for (const std::size_t tasks : {1, 2, 100}) {
      CAPTURE(tasks);
      std::vector<std::atomic<int>> hits(tasks);
      const std::size_t bad = tasks / 2;
      bool caught = false;
      try {
        pool.run(tasks, [&](std::size_t t) {
          hits[t].fetch_add(1);
          if (t == bad || t == tasks - 1) throw std::runtime_error("task " + std::to_string(t));
        });
      } catch (const std::runtime_error& e) {
        caught = true;
        const std::string what = e.what();  // whichever of the two threw first
        CHECK((what == "task " + std::to_string(bad) || what == "task " + std::to_string(tasks - 1)));
      }
      CHECK(caught);
      for (auto& h : hits) CHECK(h.load() <= 1);  // no task twice; later ones may be skipped
      std::vector<std::atomic<int>> again(tasks);  // the next run is complete and does not rethrow
      pool.run(tasks, [&](std::size_t t) { again[t].fetch_add(1); });
      for (auto& h : again) CHECK(h.load() == 1);
    }
  }
}

TEST_CASE("cpu backend: fused GrAP route equals grap_route, bit for bit, for 1-4 threads") {
  const std::size_t tokens = 1037, d = 96, n = 12, k = 3;
  std::vector<float> x = random_x(tokens, d, 1);
  x[5 * d + 2] = std::nanf("");  // an invalid token
  const grap_gate<float> gate{d, n, true, nullptr};
  const matrix_view<const float> xv(x.data(), tokens, d);
  std::vector<expert_index> want_i(tokens * k);
  std::vector<float> want_w(tokens * k), want_p(tokens * n);
  const std::size_t want_invalid = grap_route(gate, xv, select_options{k, false},
                                              route_outputs<float>{{want_i.data(), tokens, k}, {want_w.data(), tokens, k},
                                                                   {want_p.data(), tokens, n}, {}});
  CHECK(want_invalid == 1);
  for (const std::size_t threads : {1, 2, 3, 4}) {
    for (const std::size_t grain : {1, 64, 5000}) {
      CAPTURE(threads);
      CAPTURE(grain);
      thread_pool pool(threads);
      const cpu_backend cpu(pool, grain);
      std::vector<expert_index> i(tokens * k);
      std::vector<float> w(tokens * k), p(tokens * n);
      const std::size_t invalid = cpu.route_grap(gate, xv, select_options{k, false},
                                                 route_outputs<float>{{i.data(), tokens, k}, {w.data(), tokens, k},
                                                                      {p.data(), tokens, n}, {}});
      CHECK(invalid == want_invalid);
      CHECK(i == want_i);
      CHECK(same_bits(w, want_w));
      CHECK(same_bits(p, want_p));
    }
  }
}

TEST_CASE("cpu backend: dense route equals dense_route, bf16 activations through the per-thread workspace") {
  const std::size_t tokens = 700, d = 40, n = 8, k = 2;
  const std::vector<float> xf = random_x(tokens, d, 2), wf = random_x(n, d, 3);
  std::vector<bf16> x(xf.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = bf16(xf[i]);
  const dense_gate<float> gate{{wf.data(), n, d}, nullptr, false};
  const matrix_view<const bf16> xv(x.data(), tokens, d);
  std::vector<float> ws1(dense_workspace_size<bf16>(d, n));
  std::vector<expert_index> want_i(tokens * k);
  std::vector<float> want_w(tokens * k), want_l(tokens * n);
  dense_route(gate, xv, select_options{k, true},
              route_outputs<float>{{want_i.data(), tokens, k}, {want_w.data(), tokens, k}, {}, {want_l.data(), tokens, n}},
              {}, ws1.data(), ws1.size());
  thread_pool pool(3);
  const cpu_backend cpu(pool, 32);
  std::vector<unsigned char> ws(cpu.route_workspace_size<bf16>(d, n));
  std::vector<expert_index> i(tokens * k);
  std::vector<float> w(tokens * k), l(tokens * n);
  cpu.route_dense(gate, xv, select_options{k, true},
                  route_outputs<float>{{i.data(), tokens, k}, {w.data(), tokens, k}, {}, {l.data(), tokens, n}}, ws.data(),
                  ws.size());
  CHECK(i == want_i);
  CHECK(same_bits(w, want_w));
  CHECK(same_bits(l, want_l));
  CHECK_THROWS_WITH_AS(cpu.route_dense(gate, xv, select_options{k, true},
                                       route_outputs<float>{{i.data(), tokens, k}, {w.data(), tokens, k}, {}, {l.data(), tokens, n}},
                                       ws.data(), ws.size() - 1),
                       doctest::Contains("workspace_bytes"), error);
}

TEST_CASE("cpu backend: position slots equal capacity_assigner's, for k = 1..3, any capacity, any threads") {
  std::mt19937 rng(7);
  for (const std::size_t k : {1, 2, 3}) {
    for (const std::int64_t capacity : {0, 1, 17, 90, 100000}) {
      const std::size_t tokens = 901, n = 10;
      // Skewed choices (expert 0 and 1 popular), distinct per token, some -1 (masked choices).
      std::vector<expert_index> indices(tokens * k);
      for (std::size_t t = 0; t < tokens; ++t) {
        std::vector<expert_index> perm(n);
        for (std::size_t e = 0; e < n; ++e) perm[e] = static_cast<expert_index>(e);
        std::shuffle(perm.begin() + 2, perm.end(), rng);
        if (t % 3 == 0) std::swap(perm[0], perm[5]);
        for (std::size_t j = 0; j < k; ++j) indices[t * k + j] = t % 11 == 4 && j == k - 1 ? no_expert : perm[j];
      }
      const std::vector<float> weights(tokens * k, 0.5f);
      capacity_options o;
      o.capacity = capacity;
      capacity_assigner<float> assigner(n, o);
      std::vector<expert_index> want_e(tokens * k);
      std::vector<slot_index> want_s(tokens * k);
      std::vector<float> kept_w(tokens * k);
      std::vector<std::int64_t> want_routed(n), want_kept(n);
      assigner.run(matrix_view<const expert_index>(indices.data(), tokens, k), matrix_view<const float>(weights.data(), tokens, k),
                   {{want_e.data(), tokens, k}, {want_s.data(), tokens, k}, {kept_w.data(), tokens, k}, want_routed.data(),
                    want_kept.data()});
      for (const std::size_t threads : {1, 2, 4}) {
        for (const std::size_t grain : {1, 50, 100000}) {
          CAPTURE(k);
          CAPTURE(capacity);
          CAPTURE(threads);
          CAPTURE(grain);
          thread_pool pool(threads);
          const cpu_backend cpu(pool, grain);
          std::vector<expert_index> e(tokens * k);
          std::vector<slot_index> s(tokens * k);
          std::vector<std::int64_t> routed(n), kept(n);
          std::vector<unsigned char> ws(cpu.slot_workspace_size(tokens, n));
          cpu.assign_slots({{indices.data(), tokens, k}, {e.data(), tokens, k}, {s.data(), tokens, k}, routed.data(),
                            kept.data(), n, capacity},
                           ws.data(), ws.size());
          CHECK(e == want_e);
          CHECK(s == want_s);
          CHECK(routed == want_routed);
          CHECK(kept == want_kept);
        }
      }
    }
  }
}

TEST_CASE("cpu backend: dispatch and combine equal the single-threaded calls; the pipeline end to end") {
  const std::size_t tokens = 777, d = 70, n = 6, k = 2;
  const std::int64_t capacity = 230;  // some drops: 777 * 2 / 6 = 259 per expert on average
  const std::vector<float> x = random_x(tokens, d, 9);
  const router_shape shape{tokens, d, n, k, capacity};
  // Reference: the library's single-threaded calls.
  std::vector<expert_index> ri(tokens * k), re(tokens * k);
  std::vector<slot_index> rs(tokens * k);
  std::vector<float> rw(tokens * k), rkw(tokens * k);
  const grap_gate<float> gate{d, n, true, nullptr};
  grap_route(gate, matrix_view<const float>(x.data(), tokens, d), select_options{k, false},
             route_outputs<float>{{ri.data(), tokens, k}, {rw.data(), tokens, k}, {}, {}});
  capacity_options o;
  o.capacity = capacity;
  capacity_assigner<float> assigner(n, o);
  const assignment_stats stats = assigner.run(matrix_view<const expert_index>(ri.data(), tokens, k),
                                              matrix_view<const float>(rw.data(), tokens, k),
                                              {{re.data(), tokens, k}, {rs.data(), tokens, k}, {rkw.data(), tokens, k}});
  CHECK(stats.dropped > 0);
  const topology topo = topology::uniform(1, 1, static_cast<std::int64_t>(n));
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(re.data(), tokens, k),
                                                 matrix_view<const slot_index>(rs.data(), tokens, k), capacity, topo);
  std::vector<float> rbuffer(plan.buffer_rows() * d, -1.0f), ry(tokens * d);
  dispatch(plan, matrix_view<const float>(x.data(), tokens, d), matrix_view<float>(rbuffer.data(), plan.buffer_rows(), d));
  for (float& v : rbuffer) v = v * 3.0f + 1.0f;
  combine(plan, matrix_view<const float>(rbuffer.data(), plan.buffer_rows(), d), matrix_view<const float>(rw.data(), tokens, k),
          matrix_view<float>(ry.data(), tokens, d));

  for (const std::size_t threads : {1, 2, 3}) {
    CAPTURE(threads);
    thread_pool pool(threads);
    const cpu_backend cpu(pool, 40);
    const grap_pipeline pipeline(cpu, shape);
    std::vector<expert_index> i(tokens * k), e(tokens * k);
    std::vector<slot_index> s(tokens * k);
    std::vector<float> w(tokens * k), buffer(pipeline.buffer_rows() * d, -1.0f), y(tokens * d);
    std::vector<std::int64_t> routed(n), kept(n);
    std::vector<unsigned char> ws(pipeline.workspace_size());
    const pipeline_outputs<float> out{{i.data(), tokens, k}, {w.data(), tokens, k}, {}, {e.data(), tokens, k},
                                      {s.data(), tokens, k}, routed.data(), kept.data()};
    pipeline.run(gate, matrix_view<const float>(x.data(), tokens, d), out,
                 matrix_view<float>(buffer.data(), pipeline.buffer_rows(), d), ws.data(), ws.size());
    CHECK(e == re);
    CHECK(s == rs);
    for (float& v : buffer) v = v * 3.0f + 1.0f;
    std::vector<float> want_buffer = rbuffer;
    CHECK(same_bits(buffer, want_buffer));
    pipeline.combine(out, matrix_view<const float>(buffer.data(), pipeline.buffer_rows(), d), matrix_view<float>(y.data(), tokens, d));
    CHECK(same_bits(y, ry));
  }
}

TEST_CASE("cpu backend and pipeline: bad inputs name the argument, before any thread runs") {
  thread_pool pool(2);
  const cpu_backend cpu(pool);
  const std::size_t tokens = 4, k = 1, n = 3;
  std::vector<expert_index> indices = {0, 1, 3, -1}, e(4);
  std::vector<slot_index> s(4);
  std::vector<std::int64_t> routed(n), kept(n);
  std::vector<unsigned char> ws(cpu.slot_workspace_size(tokens, n));
  slot_problem p{{indices.data(), tokens, k}, {e.data(), tokens, k}, {s.data(), tokens, k}, routed.data(), kept.data(), n, 2};
  CHECK_THROWS_WITH_AS(cpu.assign_slots(p, ws.data(), ws.size()), doctest::Contains("indices = (2, 0) = 3"), error);
  indices[2] = 2;
  CHECK_THROWS_WITH_AS(cpu.assign_slots(p, ws.data(), 0), doctest::Contains("workspace_bytes"), error);
  p.capacity = -1;
  CHECK_THROWS_WITH_AS(cpu.assign_slots(p, ws.data(), ws.size()), doctest::Contains("capacity = -1"), error);
  p.capacity = 2;
  p.kept_per_expert = nullptr;
  CHECK(locmoe_test::error_argument([&] { cpu.assign_slots(p, ws.data(), ws.size()); }) == "kept_per_expert");
  CHECK_THROWS_WITH_AS(grap_pipeline(cpu, router_shape{8, 4, 5, 1, 2}), doctest::Contains("shape.experts = 5"), error);
  CHECK_THROWS_WITH_AS(grap_pipeline(cpu, router_shape{8, 16, 4, 5, 2}), doctest::Contains("k"), error);
  CHECK_THROWS_WITH_AS(grap_pipeline(cpu, router_shape{8, 16, 4, 1, -3}), doctest::Contains("shape.capacity = -3"), error);
  // An empty batch is fine: nothing routed, nothing kept.
  const grap_pipeline empty(cpu, router_shape{0, 16, 4, 2, 3});
  std::vector<unsigned char> ews(empty.workspace_size() + 1);
  std::vector<float> buffer(empty.buffer_rows() * 16, 0.0f);
  std::vector<std::int64_t> r4(4, -1), k4(4, -1);
  const pipeline_outputs<float> out{{nullptr, 0, 2}, {nullptr, 0, 2}, {}, {nullptr, 0, 2}, {nullptr, 0, 2}, r4.data(), k4.data()};
  CHECK(empty.run(grap_gate<float>{16, 4, true, nullptr}, matrix_view<const float>(nullptr, 0, 16), out,
                  matrix_view<float>(buffer.data(), empty.buffer_rows(), 16), ews.data(), ews.size()) == 0);
  CHECK(r4 == std::vector<std::int64_t>(4, 0));
  CHECK(k4 == std::vector<std::int64_t>(4, 0));
}

TEST_CASE("cpu backend: dense route on float activations is the single call's, bit for bit, for odd n and T") {
  // n = 7 and T = 1001: Eigen's leftover panels; the backend's ranges start on multiples of dense_chunk_rows.
  const std::size_t tokens = 1001, d = 37, n = 7, k = 2;
  const std::vector<float> x = random_x(tokens, d, 12), wf = random_x(n, d, 13);
  const dense_gate<float> gate{{wf.data(), n, d}, nullptr, false};
  const matrix_view<const float> xv(x.data(), tokens, d);
  std::vector<expert_index> want_i(tokens * k);
  std::vector<float> want_w(tokens * k), want_l(tokens * n);
  dense_route(gate, xv, select_options{k, false},
              route_outputs<float>{{want_i.data(), tokens, k}, {want_w.data(), tokens, k}, {}, {want_l.data(), tokens, n}});
  for (const std::size_t threads : {1, 2, 3}) {
    for (const std::size_t grain : {1, 100, 300}) {
      CAPTURE(threads);
      CAPTURE(grain);
      thread_pool pool(threads);
      const cpu_backend cpu(pool, grain);
      std::vector<expert_index> i(tokens * k);
      std::vector<float> w(tokens * k), l(tokens * n);
      cpu.route_dense(gate, xv, select_options{k, false},
                      route_outputs<float>{{i.data(), tokens, k}, {w.data(), tokens, k}, {}, {l.data(), tokens, n}}, nullptr, 0);
      CHECK(i == want_i);
      CHECK(same_bits(w, want_w));
      CHECK(same_bits(l, want_l));
    }
  }
}
