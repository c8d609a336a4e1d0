// select.hpp: softmax, top-k and their fusion against the scalar reference (reference.hpp), on every
// instruction set this CPU has; ties, masks, non-finite scores, ranges, strides and bad arguments.
#include <locmoe/reference.hpp>
#include <locmoe/select.hpp>

#include "kernel_util.hpp"
#include "test_util.hpp"

#include <doctest/doctest.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

using locmoe::expert_index;
using locmoe::no_expert;
using locmoe_test::buffer;
using locmoe_test::relative_error;

namespace {

template <class S>
buffer<S> random_scores(std::mt19937_64& rng, std::size_t rows, std::size_t n, std::size_t stride = 0) {
  buffer<S> s(rows, n, stride, S(-7));  // padding between rows holds -7, which must never be read
  std::normal_distribution<double> normal(0.0, 3.0);
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t j = 0; j < n; ++j) s(t, j) = static_cast<S>(normal(rng));
  return s;
}

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-6 : 1e-14;
}

// Every mode of the selection kernel against the reference, on each instruction set.
template <class S>
void check_against_reference(const buffer<S>& scores, std::size_t k, bool softmax, bool renormalize) {
  const std::size_t rows = scores.rows, n = scores.cols;
  buffer<expert_index> ref_idx(rows, k, 0, 99);
  buffer<S> ref_w(rows, k), ref_p(rows, n);
  const std::size_t ref_invalid = locmoe::reference::select(scores.cview(), k, softmax, renormalize, ref_idx.view(),
                                                            ref_w.view(), softmax ? ref_p.view() : locmoe::matrix_view<S>{});
  std::vector<expert_index> first_indices;
  std::vector<S> first_weights, first_probabilities;
  locmoe_test::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    buffer<expert_index> idx(rows, k, 0, 99);
    buffer<S> w(rows, k), p(rows, n);
    const std::size_t invalid = locmoe_test::select_on(arch, scores.cview(), {k, softmax, renormalize},
                                                       softmax ? p.view() : locmoe::matrix_view<S>{}, idx.view(), w.view());
    CHECK(invalid == ref_invalid);
    CHECK(idx.data == ref_idx.data);  // exact: both rank the same scores
    if (first_indices.empty()) first_indices = idx.data, first_weights = w.data, first_probabilities = p.data;
    CHECK(idx.data == first_indices);
    // select.hpp: weights and probabilities may differ between instruction sets by up to 4 ulps (measured: 3).
    std::uint64_t farthest = 0;
    for (std::size_t i = 0; i < w.data.size(); ++i) farthest = std::max(farthest, locmoe_test::ulp_distance(w.data[i], first_weights[i]));
    if (softmax)
      for (std::size_t i = 0; i < p.data.size(); ++i)
        farthest = std::max(farthest, locmoe_test::ulp_distance(p.data[i], first_probabilities[i]));
    CHECK(farthest <= 4);
    double worst = 0;
    for (std::size_t i = 0; i < w.data.size(); ++i) worst = std::max(worst, relative_error(w.data[i], ref_w.data[i]));
    if (softmax)
      for (std::size_t i = 0; i < p.data.size(); ++i) worst = std::max(worst, relative_error(p.data[i], ref_p.data[i]));
    CHECK(worst <= tolerance<S>());
  });
}

}  // namespace

TEST_CASE_TEMPLATE("selection matches the scalar reference on every instruction set", S, float, double) {
  std::mt19937_64 rng(20261123);
  REQUIRE(locmoe_test::arch_count() >= 1);
  for (const std::size_t n : {1, 2, 3, 16, 17, 64, 257}) {
    for (const std::size_t rows : locmoe_test::token_counts(rng)) {
      const auto scores = random_scores<S>(rng, rows, n, n + rng() % 3);
      for (const std::size_t k : {std::size_t{1}, std::min<std::size_t>(2, n), n}) {
        CAPTURE(n);
        CAPTURE(rows);
        CAPTURE(k);
        check_against_reference(scores, k, true, false);
        check_against_reference(scores, k, true, true);
        check_against_reference(scores, k, false, false);
      }
      check_against_reference(scores, 0, true, false);  // probabilities only
    }
  }
}

TEST_CASE("the dispatched path is the best instruction set and is deterministic") {
#if defined(LOCMOE_SIMD_DISPATCH)
  MESSAGE("instruction sets tested here: " << locmoe_test::arch_count() << ", dispatched: "
                                           << std::string(locmoe::detail::dispatched_arch_name()));
  // the sets LOCMOE_SIMD_ARCHS built (all but those LOCMOE_SIMD_WITHOUT_* names) that this CPU runs
  const unsigned best = xsimd::available_architectures().best;
  std::size_t expected = 1;  // SSE2, the x86-64 baseline, always
#  if !defined(LOCMOE_SIMD_WITHOUT_SSE4_2)
  expected += xsimd::sse4_2::version() <= best;
#  endif
#  if !defined(LOCMOE_SIMD_WITHOUT_FMA3_AVX2)
  expected += xsimd::fma3<xsimd::avx2>::version() <= best;
#  endif
#  if !defined(LOCMOE_SIMD_WITHOUT_AVX512BW)
  expected += xsimd::avx512bw::version() <= best;
#  endif
  CHECK(locmoe_test::arch_count() == expected);
#endif
  std::mt19937_64 rng(5);
  const auto scores = random_scores<float>(rng, 33, 64);
  buffer<expert_index> a(33, 8), b(33, 8);
  buffer<float> wa(33, 8), wb(33, 8);
  locmoe::softmax_top_k(scores.cview(), {8, false}, a.view(), wa.view());
  locmoe::softmax_top_k(scores.cview(), {8, false}, b.view(), wb.view());
  CHECK(a.data == b.data);
  CHECK(std::memcmp(wa.data.data(), wb.data.data(), wa.data.size() * sizeof(float)) == 0);
}

TEST_CASE("softmax: rows sum to one and follow exp(s - max)") {
  buffer<double> s(2, 3);
  s(0, 0) = 1000;  // would overflow exp without the max shift
  s(0, 1) = 999;
  s(0, 2) = -1000;
  s(1, 0) = s(1, 1) = s(1, 2) = 0.5;
  buffer<double> p(2, 3);
  CHECK(locmoe::softmax(s.cview(), p.view()) == 0);
  const double e = std::exp(-1.0);
  CHECK(relative_error(p(0, 0), 1 / (1 + e)) < 1e-15);
  CHECK(relative_error(p(0, 1), e / (1 + e)) < 1e-15);
  CHECK(p(0, 2) == 0.0);
  for (std::size_t j = 0; j < 3; ++j) CHECK(relative_error(p(1, j), 1.0 / 3) < 1e-15);
}

TEST_CASE("ties go to the lowest expert index") {
  buffer<float> s(3, 6);
  for (std::size_t j = 0; j < 6; ++j) s(0, j) = 1.0f;  // all equal
  const float row1[] = {0, 5, 2, 5, 5, 1};
  const float row2[] = {-0.0f, 0.0f, -1, -0.0f, 0, -2};  // +0 and -0 compare equal
  for (std::size_t j = 0; j < 6; ++j) {
    s(1, j) = row1[j];
    s(2, j) = row2[j];
  }
  buffer<expert_index> idx(3, 4);
  buffer<float> w(3, 4);
  locmoe::softmax_top_k(s.cview(), {4, false}, idx.view(), w.view());
  CHECK(std::vector<expert_index>(idx.data.begin(), idx.data.begin() + 4) == std::vector<expert_index>{0, 1, 2, 3});
  CHECK(std::vector<expert_index>(idx.data.begin() + 4, idx.data.begin() + 8) == std::vector<expert_index>{1, 3, 4, 2});
  CHECK(std::vector<expert_index>(idx.data.begin() + 8, idx.data.begin() + 12) == std::vector<expert_index>{0, 1, 3, 4});
  buffer<expert_index> top1(3, 1);
  buffer<float> w1(3, 1);
  locmoe::top_k(s.cview(), 1, top1.view(), w1.view());
  CHECK(top1.data[0] == 0);
  CHECK(top1.data[1] == 1);
  CHECK(top1.data[2] == 0);
  CHECK(w1.data[1] == 5.0f);  // top_k's values are the scores themselves
}

TEST_CASE_TEMPLATE("non-finite scores: NaN and +inf make a token invalid, -inf masks an expert", S, float, double) {
  const S nan = std::numeric_limits<S>::quiet_NaN(), inf = std::numeric_limits<S>::infinity();
  buffer<S> s(6, 4);
  const S rows[6][4] = {{1, nan, 2, 3}, {1, inf, 2, 3}, {-inf, -inf, -inf, -inf},
                        {-inf, 2, -inf, 1}, {-inf, -inf, 5, -inf}, {0, 1, 2, 3}};
  for (std::size_t t = 0; t < 6; ++t)
    for (std::size_t j = 0; j < 4; ++j) s(t, j) = rows[t][j];
  buffer<expert_index> idx(6, 3, 0, 42);
  buffer<S> w(6, 3, 0, S(42)), p(6, 4, 0, S(42));
  locmoe_test::for_each_arch([&](auto arch) {
    CAPTURE(decltype(arch)::name());
    CHECK(locmoe_test::select_on(arch, s.cview(), {3, true, false}, p.view(), idx.view(), w.view()) == 3);
    for (std::size_t t = 0; t < 3; ++t) {
      for (std::size_t c = 0; c < 3; ++c) {
        CHECK(idx(t, c) == no_expert);
        CHECK(w(t, c) == S(0));
      }
      for (std::size_t j = 0; j < 4; ++j) CHECK(p(t, j) == S(0));
    }
    // Row 3: two selectable experts for k = 3; row 4: one.
    CHECK(idx(3, 0) == 1);
    CHECK(idx(3, 1) == 3);
    CHECK(idx(3, 2) == no_expert);
    CHECK(w(3, 2) == S(0));
    CHECK(p(3, 0) == S(0));
    CHECK(relative_error(p(3, 1) + p(3, 3), 1.0) < 4 * std::numeric_limits<S>::epsilon());
    CHECK(idx(4, 0) == 2);
    CHECK(w(4, 0) == S(1));
    CHECK(idx(4, 1) == no_expert);
    CHECK(idx(5, 0) == 3);
  });
}

TEST_CASE("renormalized weights sum to one over the chosen experts") {
  std::mt19937_64 rng(9);
  const auto s = random_scores<double>(rng, 20, 16);
  buffer<expert_index> idx(20, 4);
  buffer<double> w(20, 4);
  CHECK(locmoe::softmax_top_k(s.cview(), {4, true}, idx.view(), w.view()) == 0);
  for (std::size_t t = 0; t < 20; ++t) {
    CHECK(relative_error(w(t, 0) + w(t, 1) + w(t, 2) + w(t, 3), 1.0) < 1e-15);
    for (std::size_t c = 1; c < 4; ++c) CHECK(w(t, c) <= w(t, c - 1));
  }
}

TEST_CASE("a token range touches only its rows, and concurrent ranges equal one call") {
  std::mt19937_64 rng(11);
  const auto s = random_scores<float>(rng, 1000, 16);
  buffer<expert_index> whole(1000, 2, 0, 77), parts(1000, 2, 0, 77);
  buffer<float> ww(1000, 2), wp(1000, 2);
  locmoe::softmax_top_k(s.cview(), {2, false}, whole.view(), ww.view());
  locmoe::softmax_top_k(s.cview(), {2, false}, parts.view(), wp.view(), {}, {100, 200});
  CHECK(parts(99, 1) == 77);
  CHECK(parts(200, 0) == 77);
  CHECK(parts(150, 0) == whole(150, 0));
  std::thread a([&] { locmoe::softmax_top_k(s.cview(), {2, false}, parts.view(), wp.view(), {}, {0, 500}); });
  std::thread b([&] { locmoe::softmax_top_k(s.cview(), {2, false}, parts.view(), wp.view(), {}, {500, 1000}); });
  a.join();
  b.join();
  CHECK(parts.data == whole.data);
  CHECK(wp.data == ww.data);
}

TEST_CASE("selection rejects bad arguments, naming them") {
  buffer<float> s(4, 8), w(4, 2), p(4, 8);
  buffer<expert_index> idx(4, 2);
  const auto expect = [](auto&& call, const char* argument, const char* fragment) {
    try {
      call();
      FAIL("no error for " << argument);
    } catch (const locmoe::error& e) {
      CHECK(e.argument() == argument);
      CHECK(std::string(e.what()).find(fragment) != std::string::npos);
    }
  };
  expect([&] { locmoe::top_k(s.cview(), 0, idx.view(), w.view()); }, "k", "1 <= k <= n");
  expect([&] { locmoe::top_k(s.cview(), 9, idx.view(), w.view()); }, "k", "1 <= k <= n");
  expect([&] { locmoe::top_k(s.cview(), 3, idx.view(), w.view()); }, "indices", "k columns");
  expect([&] { locmoe::softmax(locmoe::matrix_view<const float>(s.data.data(), 4, 0), p.view()); }, "n", "1 <= n");
  buffer<float> wide(1, locmoe::max_experts + 1), wide_p(1, locmoe::max_experts + 1);
  expect([&] { locmoe::softmax(wide.cview(), wide_p.view()); }, "n", "max_experts");
  expect([&] { locmoe::softmax(s.cview(), locmoe::matrix_view<float>(p.data.data(), 3, 8)); }, "probabilities",
         "4 rows");
  expect([&] { locmoe::softmax(locmoe::matrix_view<const float>(nullptr, 4, 8), p.view()); }, "logits", "null");
  expect([&] { locmoe::softmax(locmoe::matrix_view<const float>(s.data.data(), 4, 8, 7), p.view()); }, "logits",
         "stride");
  expect([&] { locmoe::softmax(s.cview(), p.view(), {5, 5}); }, "range", "begin");
  expect([&] { locmoe::softmax(locmoe::matrix_view<const float>(s.data.data(), 4, 8, std::size_t(1) << 62), p.view()); },
         "logits", "overflows");

  errno = 0;
  const locmoe::checked_count failed = locmoe::top_k(s.cview(), 0, idx.view(), w.view(), {}, locmoe::errno_on_error{});
  const int error_number = errno;  // read before any CHECK, which may print
  CHECK(!failed.ok());
  CHECK(error_number == EDOM);
  static_assert(std::is_same_v<locmoe::count_result<locmoe::errno_on_error>, locmoe::checked_count>);
  static_assert(std::is_same_v<locmoe::count_result<locmoe::throw_on_error>, std::size_t>);
}

TEST_CASE("empty batches are fine") {
  buffer<float> s(0, 8), w(0, 2);
  buffer<expert_index> idx(0, 2);
  CHECK(locmoe::softmax_top_k(locmoe::matrix_view<const float>(nullptr, 0, 8), {2, false},
                              locmoe::matrix_view<expert_index>(nullptr, 0, 2), locmoe::matrix_view<float>(nullptr, 0, 2)) == 0);
}
