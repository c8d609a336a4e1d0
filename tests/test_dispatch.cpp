// dispatch.hpp: plans against counts taken directly from the assignment, dispatch + combine against a
// per-token reference with a toy expert, combine bit for bit against the plain zero-then-add loop (k = 1, 2,
// 3: its one-row, two-row and general paths), and the rules a plan's inputs must follow.
#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>

#include <doctest/doctest.h>

#include "kernel_util.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

using namespace locmoe;

TEST_CASE("dispatch plan: send counts, locality classes, order, bytes") {
  // 4 ranks on 2 nodes; 8 experts, 2 per rank; 16 tokens, 4 per rank; k = 2 with some drops.
  const topology topo = topology::uniform(4, 2, 8);
  std::mt19937 rng(5);
  const std::size_t tokens = 16, k = 2;
  std::vector<expert_index> choice(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<expert_index> perm(8);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    choice[t * k] = perm[0];
    choice[t * k + 1] = perm[1];
  }
  const std::vector<float> w(tokens * k, 0.5f);
  capacity_options o;
  o.capacity = 3;
  capacity_assigner<float> assigner(8, o);
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<float> kept_w(tokens * k);
  const assignment_stats stats = assigner.run(matrix_view<const expert_index>(choice.data(), tokens, k),
                                              matrix_view<const float>(w.data(), tokens, k),
                                              {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_w.data(), tokens, k}},
                                              {&topo, token_ranks::contiguous_blocks(), {}});
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), 3, topo, token_ranks::contiguous_blocks(), 5120 * 2);
  std::vector<std::int64_t> want(16, 0);
  std::int64_t rank_local = 0, node_local = 0, remote = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t j = 0; j < k; ++j) {
      if (expert[t * k + j] < 0) continue;
      const std::size_t src = t / 4, dst = static_cast<std::size_t>(expert[t * k + j]) / 2;
      ++want[src * 4 + dst];
      rank_local += src == dst;
      node_local += src != dst && src / 2 == dst / 2;
      remote += src / 2 != dst / 2;
    }
  }
  CHECK(plan.send_tokens == want);
  CHECK(std::accumulate(want.begin(), want.end(), std::int64_t{0}) == stats.kept);
  CHECK(plan.intra_rank == rank_local);
  CHECK(plan.intra_node == node_local);
  CHECK(plan.inter_node == remote);
  CHECK(plan.send_bytes[5] == want[5] * 10240);
  CHECK(static_cast<std::int64_t>(plan.order.size()) == stats.kept);
  for (std::size_t i = 1; i < plan.order.size(); ++i) {  // (source rank, expert, slot) ascending
    const auto a = static_cast<std::size_t>(plan.order[i - 1]), b = static_cast<std::size_t>(plan.order[i]);
    const auto key = [&](std::size_t p) {
      return std::make_tuple(p / k / 4, expert[p], slot[p]);
    };
    REQUIRE(key(a) < key(b));
  }
}

TEST_CASE("dispatch and combine: a toy expert through the buffers equals the per-token reference") {
  const topology topo = topology::uniform(2, 1, 4);
  const std::size_t tokens = 10, k = 2, d = 6;
  std::mt19937 rng(6);
  std::normal_distribution<double> normal;
  std::vector<double> x(tokens * d), weights(tokens * k);
  for (double& v : x) v = normal(rng);
  for (double& v : weights) v = std::abs(normal(rng));
  std::vector<expert_index> choice(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    choice[t * k] = static_cast<expert_index>(t % 4);
    choice[t * k + 1] = static_cast<expert_index>((t + 1 + t % 3) % 4 == t % 4 ? (t + 2) % 4 : (t + 1 + t % 3) % 4);
  }
  capacity_options o;
  o.capacity = 4;  // some choices dropped
  capacity_assigner<double> assigner(4, o);
  std::vector<expert_index> expert(tokens * k);
  std::vector<slot_index> slot(tokens * k);
  std::vector<double> kept_w(tokens * k);
  assigner.run(matrix_view<const expert_index>(choice.data(), tokens, k), matrix_view<const double>(weights.data(), tokens, k),
               {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_w.data(), tokens, k}}, {&topo, token_ranks::contiguous_blocks(), {}});
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), 4, topo, token_ranks::contiguous_blocks());
  std::vector<double> buffer(plan.buffer_rows() * d, 0.0), y(tokens * d, -1.0);
  dispatch(plan, matrix_view<const double>(x.data(), tokens, d), matrix_view<double>(buffer.data(), plan.buffer_rows(), d));
  for (std::size_t row = 0; row < plan.buffer_rows(); ++row) {  // expert e multiplies by e + 1
    for (std::size_t c = 0; c < d; ++c) buffer[row * d + c] *= static_cast<double>(row / 4 + 1);
  }
  combine(plan, matrix_view<const double>(buffer.data(), plan.buffer_rows(), d),
          matrix_view<const double>(kept_w.data(), tokens, k), matrix_view<double>(y.data(), tokens, d));
  std::size_t dropped = 0;
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t c = 0; c < d; ++c) {
      double want = 0;
      for (std::size_t j = 0; j < k; ++j) {
        if (expert[t * k + j] == no_expert) continue;
        want += kept_w[t * k + j] * (static_cast<double>(expert[t * k + j]) + 1) * x[t * d + c];
      }
      REQUIRE(y[t * d + c] == doctest::Approx(want).epsilon(1e-15));
    }
    for (std::size_t j = 0; j < k; ++j) dropped += expert[t * k + j] == no_expert;
  }
  CHECK(dropped > 0);
}

namespace {

struct toy_assignment {
  std::vector<expert_index> expert;
  std::vector<slot_index> slot;
};

// A random assignment of `tokens` x k choices to n experts with capacity C, slots in token order: the choices
// past capacity are dropped, and every fifth token has all its choices dropped.
toy_assignment random_assignment(std::size_t tokens, std::size_t k, std::size_t n, std::size_t capacity,
                                 std::mt19937& rng) {
  std::vector<expert_index> expert(tokens * k, no_expert);
  std::vector<slot_index> slot(tokens * k, -1);
  std::vector<slot_index> load(n, 0);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<expert_index> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (std::size_t j = 0; j < k && t % 5 != 4; ++j) {
      const auto e = static_cast<std::size_t>(perm[j]);
      if (static_cast<std::size_t>(load[e]) == capacity) continue;
      expert[t * k + j] = perm[j];
      slot[t * k + j] = load[e]++;
    }
  }
  return {expert, slot};
}

}  // namespace

TEST_CASE_TEMPLATE("combine equals zeroing then adding each kept row in choice order, bit for bit", T, float, double) {
  const topology topo = topology::uniform(2, 1, 6);
  std::mt19937 rng(7);
  std::normal_distribution<T> normal;
  // k = 1, 2, 3: the one-row, two-row and general paths; d from one element to rows longer than the prefetch
  // distance; rows 16-byte aligned or not (pad); plain and non-temporal stores (LOCMOE_STREAMING_STORE_BYTES).
  for (const std::size_t k : {1, 2, 3}) {
    for (const std::size_t d : {1, 7, 37, 64, 1100}) {
      for (const std::size_t pad : {0, 1}) {
        CAPTURE(k);
        CAPTURE(d);
        CAPTURE(pad);
        const std::size_t tokens = 23, n = 6, capacity = 3, stride = d + pad;
        const toy_assignment toy = random_assignment(tokens, k, n, capacity, rng);
        const std::vector<expert_index>& expert = toy.expert;
        const std::vector<slot_index>& slot = toy.slot;
        const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                       matrix_view<const slot_index>(slot.data(), tokens, k),
                                                       static_cast<std::int64_t>(capacity), topo, token_ranks::contiguous_blocks());
        std::vector<T> buffer(plan.buffer_rows() * stride), weight(tokens * k), want(tokens * stride, T(-1));
        for (std::size_t i = 0; i < buffer.size(); ++i) {
          buffer[i] = i % 5 == 0 ? T(-0.0) : i % 5 == 1 ? T(0) : normal(rng);
        }
        for (std::size_t i = 0; i < weight.size(); ++i) weight[i] = i % 7 == 3 ? T(-1) : normal(rng);  // -1: -0 rows
        std::size_t kept = 0, without = 0;
        for (std::size_t t = 0; t < tokens; ++t) {
          T* out = want.data() + t * stride;
          std::fill(out, out + d, T(0));
          std::size_t kept_here = 0;
          for (std::size_t j = 0; j < k; ++j) {
            const expert_index e = expert[t * k + j];
            if (e == no_expert) continue;
            ++kept_here;
            const std::size_t row = static_cast<std::size_t>(e) * capacity + static_cast<std::size_t>(slot[t * k + j]);
            for (std::size_t c = 0; c < d; ++c) out[c] += weight[t * k + j] * buffer[row * stride + c];
          }
          kept += kept_here;
          without += kept_here == 0;
        }
        CHECK(kept == plan.order.size());
        CHECK(without >= tokens / 5);
        CHECK(kept < tokens * k - tokens / 5 * k);  // some choices dropped for capacity, not only whole tokens
        const matrix_view<const T> buffer_view(buffer.data(), plan.buffer_rows(), d, stride);
        const matrix_view<const T> weight_view(weight.data(), tokens, k);
        // The public call (small: plain stores); then the kernel on every instruction set this CPU has, with
        // non-temporal stores (into 64-byte aligned rows where the stride allows) and over token ranges as the
        // backends split them (three pieces, each its own call).
        const auto check_y = [&](const auto& fill) {
          std::vector<T> storage(tokens * stride + 64 / sizeof(T), T(-1));
          T* y = storage.data();
          while (reinterpret_cast<std::uintptr_t>(y) % 64 != 0) ++y;
          const matrix_view<T> y_view(y, tokens, d, stride);
          fill(y_view);
          CHECK(std::memcmp(y, want.data(), tokens * stride * sizeof(T)) == 0);
        };
        check_y([&](const matrix_view<T>& y) { combine(plan, buffer_view, weight_view, y); });
        const pair_layout pairs = detail::layout_of(plan);
        const detail::weight_rows weights = detail::weight_rows_of(weight_view);
        locmoe_test::for_each_arch([&](auto arch) {
          CAPTURE(decltype(arch)::name());
          check_y([&](const matrix_view<T>& y) {
            detail::combine_kernel<T>{}(arch, {pairs, buffer_view, weights, y, 0, tokens, true});
          });
          check_y([&](const matrix_view<T>& y) {
            for (const auto& [begin, end] : {std::pair<std::size_t, std::size_t>{0, 5}, {5, 6}, {6, tokens}}) {
              detail::combine_kernel<T>{}(arch, {pairs, buffer_view, weights, y, begin, end, false});
            }
          });
        });
      }
    }
  }
}

TEST_CASE_TEMPLATE("dispatch copies each kept row to its buffer row and no other", T, float, double, bf16) {
  const topology topo = topology::uniform(4, 2, 8);
  std::mt19937 rng(8);
  const std::size_t tokens = 40, k = 2, n = 8, capacity = 6;
  const toy_assignment toy = random_assignment(tokens, k, n, capacity, rng);
  const std::vector<expert_index>& expert = toy.expert;
  const std::vector<slot_index>& slot = toy.slot;
  const std::vector<std::int32_t> token_rank = [&] {  // ranks not in blocks: the order sorts them
    std::vector<std::int32_t> r(tokens);
    for (std::size_t t = 0; t < tokens; ++t) r[t] = static_cast<std::int32_t>((t * 7) % 4);
    return r;
  }();
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k),
                                                 static_cast<std::int64_t>(capacity), topo, token_rank.data());
  for (std::size_t i = 1; i < plan.order.size(); ++i) {  // (source rank, expert, slot) ascending
    const auto key = [&](std::int64_t pair) {
      const auto p = static_cast<std::size_t>(pair);
      return std::make_tuple(token_rank[p / k], expert[p], slot[p]);
    };
    REQUIRE(key(plan.order[i - 1]) < key(plan.order[i]));
  }
  // Rows of 13 elements, and rows longer than the prefetch distance (4 KiB); aligned or not (pad); plain and
  // non-temporal stores.
  for (const std::size_t d : {13, 2100}) {
    for (const std::size_t pad : {0, 1}) {
      for (const int mode : {0, 1, 2, 3}) {
        CAPTURE(d);
        CAPTURE(pad);
        CAPTURE(mode);
        const std::size_t stride = d + pad;
        std::vector<T> x(tokens * d), buffer(plan.buffer_rows() * stride, T(-7));
        for (std::size_t i = 0; i < x.size(); ++i) x[i] = T(static_cast<float>(i % 4093) * 0.25f);
        const matrix_view<const T> x_view(x.data(), tokens, d);
        const matrix_view<T> buffer_view(buffer.data(), plan.buffer_rows(), d, stride);
        // The public call (small: memcpy), the non-temporal path in plan order, and the backends' way: pairs in
        // token order (no plan order) in three ranges, plain (mode 2) and non-temporal (mode 3).
        const pair_layout pairs = detail::layout_of(plan);
        if (mode == 0) {
          dispatch(plan, x_view, buffer_view);
        } else if (mode == 1) {
          detail::dispatch_rows(pairs, plan.order.data(), 0, plan.order.size(), x_view, buffer_view, true);
        } else {
          for (const auto& [begin, end] : {std::pair<std::size_t, std::size_t>{0, 7}, {7, 8}, {8, tokens * k}}) {
            detail::dispatch_rows(pairs, nullptr, begin, end, x_view, buffer_view, mode == 3);
          }
        }
        std::vector<T> want(plan.buffer_rows() * stride, T(-7));
        for (std::size_t p = 0; p < tokens * k; ++p) {
          if (expert[p] == no_expert) continue;
          const std::size_t row = static_cast<std::size_t>(expert[p]) * capacity + static_cast<std::size_t>(slot[p]);
          std::copy(x.data() + p / k * d, x.data() + (p / k + 1) * d, want.data() + row * stride);
        }
        if (mode == 0) {  // the public call also writes the padding rows (each expert's unused slots) as zeros
          for (std::size_t e = 0; e < plan.experts; ++e)
            for (auto s = static_cast<std::size_t>(plan.kept_per_expert[e]); s < capacity; ++s)
              std::fill(want.data() + (e * capacity + s) * stride, want.data() + (e * capacity + s) * stride + d, T(0));
        }
        CHECK(std::memcmp(buffer.data(), want.data(), buffer.size() * sizeof(T)) == 0);
      }
    }
  }
}

TEST_CASE("dispatch plan: bad inputs name the rule") {
  const topology topo = topology::uniform(2, 1, 4);
  auto build = [&](std::vector<expert_index> e, std::vector<slot_index> s, std::int64_t capacity) {
    return build_dispatch_plan(matrix_view<const expert_index>(e.data(), e.size(), 1),
                               matrix_view<const slot_index>(s.data(), s.size(), 1), capacity, topo,
                               token_ranks::contiguous_blocks());
  };
  CHECK_THROWS_WITH_AS(build({0, 0}, {0, 0}, 2), doctest::Contains("two choices share one (expert, slot)"), error);
  CHECK_THROWS_WITH_AS(build({0, 1}, {0, 2}, 2), doctest::Contains("expert/slot = (1, 0) = 1/2"), error);
  CHECK_THROWS_WITH_AS(build({-1, 1}, {0, 0}, 2), doctest::Contains("a dropped one -1/-1"), error);
  CHECK_THROWS_WITH_AS(build({0}, {0}, -1), doctest::Contains("capacity = -1"), error);
  const std::vector<std::int32_t> rank = {0, 5};
  std::vector<expert_index> e = {0, 1};
  std::vector<slot_index> s = {0, 0};
  CHECK_THROWS_WITH_AS(build_dispatch_plan(matrix_view<const expert_index>(e.data(), 2, 1),
                                           matrix_view<const slot_index>(s.data(), 2, 1), 1, topo, rank.data()),
                       doctest::Contains("token_rank = [1] = 5"), error);
  const auto plan_of = [&](token_ranks sources) {
    return build_dispatch_plan(matrix_view<const expert_index>(e.data(), 2, 1), matrix_view<const slot_index>(s.data(), 2, 1),
                               1, topo, sources);
  };
  CHECK_THROWS_WITH_AS(plan_of({}), doctest::Contains("token_rank = none: with more than one rank, say whose tokens"), error);
  CHECK_THROWS_WITH_AS(plan_of(token_ranks::local(2)), doctest::Contains("local(2): this rank must be in [0, ranks)"), error);
  token_ranks both = token_ranks::local(0);
  both.blocks = true;
  CHECK_THROWS_WITH_AS(plan_of(both), doctest::Contains("give one of"), error);
  const dispatch_plan rank_local = plan_of(token_ranks::local(1));  // both tokens are rank 1's
  CHECK(rank_local.sent(1, 0) == 2);  // experts 0 and 1 live on rank 0
  CHECK(rank_local.sent(1, 1) == 0);
  CHECK(rank_local.sent(0, 0) + rank_local.sent(0, 1) == 0);
  CHECK(build_dispatch_plan(matrix_view<const expert_index>(e.data(), 2, 1), matrix_view<const slot_index>(s.data(), 2, 1), 1,
                            topology::uniform(1, 1, 2))
            .intra_rank == 2);  // one rank: nothing to say
  const dispatch_plan empty = build({}, {}, 0);
  CHECK(empty.order.empty());
  CHECK(empty.intra_rank + empty.intra_node + empty.inter_node == 0);
}

TEST_CASE("dispatch plan: order packs each source rank's rows by destination rank, then expert and slot") {
  // Experts 0 and 2 live on rank 1, experts 1 and 3 on rank 0: expert order is not destination order.
  const topology topo({0, 0}, {1, 0, 1, 0});
  const std::size_t tokens = 6, k = 1;
  const std::vector<expert_index> expert = {0, 1, 2, 3, 1, 0};
  const std::vector<slot_index> slot = {0, 0, 0, 0, 1, 1};
  const std::vector<std::int32_t> token_rank = {0, 0, 0, 1, 1, 1};
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(slot.data(), tokens, k), 2, topo,
                                                 token_rank.data(), 4);
  // Rank 0's tokens 0 (e0 -> r1), 1 (e1 -> r0), 2 (e2 -> r1): to rank 0 first {1}, then rank 1 {0, 2}.
  // Rank 1's tokens 3 (e3 -> r0), 4 (e1 -> r0), 5 (e0 -> r1): to rank 0 {4 (e1), 3 (e3)}, then rank 1 {5}.
  const std::vector<std::int64_t> want = {1, 0, 2, 4, 3, 5};
  CHECK(plan.order == want);
  const std::vector<std::int64_t> offset = {0, 1, 3, 5, 6};
  CHECK(plan.send_offset == offset);
  for (std::size_t src = 0; src < 2; ++src) {
    for (std::size_t dst = 0; dst < 2; ++dst) {
      CHECK(plan.send_offset[src * 2 + dst + 1] - plan.send_offset[src * 2 + dst] == plan.sent(src, dst));
      for (auto i = plan.send_offset[src * 2 + dst]; i < plan.send_offset[src * 2 + dst + 1]; ++i) {
        const auto p = static_cast<std::size_t>(plan.order[static_cast<std::size_t>(i)]);
        CHECK(static_cast<std::size_t>(token_rank[p]) == src);
        CHECK(static_cast<std::size_t>(topo.rank_of_expert(static_cast<std::size_t>(expert[p]))) == dst);
      }
    }
  }
}

TEST_CASE_TEMPLATE("combine of 16-bit rows sums in float and rounds once", T, bf16, fp16) {
  const topology topo = topology::uniform(2, 1, 4);
  std::mt19937 rng(21);
  const std::size_t tokens = 30, k = 3, n = 4, capacity = 12, d = 19;
  const toy_assignment toy = random_assignment(tokens, k, n, capacity, rng);
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(toy.expert.data(), tokens, k),
                                                 matrix_view<const slot_index>(toy.slot.data(), tokens, k),
                                                 static_cast<std::int64_t>(capacity), topo, token_ranks::contiguous_blocks());
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> buffer(plan.buffer_rows() * d), y(tokens * d, T(-1.0f)), want(tokens * d);
  std::vector<float> weight(tokens * k);
  for (auto& v : buffer) v = T(normal(rng));
  for (auto& v : weight) v = normal(rng);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t c = 0; c < d; ++c) {
      float sum = 0.0f;
      for (std::size_t j = 0; j < k; ++j) {
        const expert_index e = toy.expert[t * k + j];
        if (e == no_expert) continue;
        const std::size_t row = static_cast<std::size_t>(e) * capacity + static_cast<std::size_t>(toy.slot[t * k + j]);
        sum += weight[t * k + j] * static_cast<float>(buffer[row * d + c]);
      }
      want[t * d + c] = T(sum);
    }
  }
  combine(plan, matrix_view<const T>(buffer.data(), plan.buffer_rows(), d), matrix_view<const float>(weight.data(), tokens, k),
          matrix_view<T>(y.data(), tokens, d));
  CHECK(std::memcmp(y.data(), want.data(), y.size() * sizeof(T)) == 0);
}
