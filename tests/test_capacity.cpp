// capacity.hpp against independent references: closed forms, Monte Carlo, exact integer arithmetic,
// a sort-based quantile, and the paper's own numeric claims.
#include <locmoe/capacity.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

using locmoe_test::relative_error;

namespace {
const double pi = std::acos(-1.0);
const double not_a_number = std::numeric_limits<double>::quiet_NaN();
const double inf = std::numeric_limits<double>::infinity();
const std::vector<double> deltas = {1e-6, 1e-4, 1e-3, 0.01, 0.03, 0.1, 0.25, 0.5, 0.7071, 0.9, 0.99, 0.999999};
}  // namespace

TEST_CASE("p_delta matches the closed forms for d = 2, 3, 4") {
  for (const double delta : deltas) {
    CAPTURE(delta);
    CHECK(relative_error(locmoe::p_delta(2, delta), 1.0 - 2.0 / pi * std::asin(delta)) < 1e-12);
    CHECK(relative_error(locmoe::p_delta(3, delta), 1.0 - delta) < 1e-12);
    // d = 4: 1 - (2/pi)(asin(delta) + delta sqrt(1 - delta^2)), written as (2/pi)(acos(delta) - delta sqrt(...))
    // and evaluated in long double, since it cancels near delta = 1.
    const long double dl = delta;
    const long double d4 = 2.0L / acosl(-1.0L) * (acosl(dl) - dl * sqrtl((1.0L - dl) * (1.0L + dl)));
    CHECK(relative_error(locmoe::p_delta(4, delta), static_cast<double>(d4)) < 1e-12);
    CHECK(relative_error(locmoe::log_p_delta(3, delta), std::log1p(-delta)) < 1e-12);
    // ec_min from its closed form at d = 3 (1 / (n (1 - delta))), not from p_delta as capacity.hpp computes it.
    for (const std::int64_t n : {1, 16, 4096}) {
      const double nd = static_cast<double>(n);
      CHECK(relative_error(locmoe::ec_min(3, n, delta), 1.0 / (nd * (1.0 - delta))) < 1e-12);
      CHECK(relative_error(locmoe::log_ec_min(3, n, delta), -std::log(nd) - std::log1p(-delta)) < 1e-12);
    }
  }
}

TEST_CASE("Lemma 3 by Monte Carlo: the fraction of uniform unit vectors with |cos| >= delta") {
  std::mt19937_64 rng(20240125);
  std::normal_distribution<double> normal;
  const int samples = 40000;
  for (const auto& point : std::vector<std::pair<int, double>>{{3, 0.5}, {16, 0.3}, {128, 0.1}, {512, 0.03}}) {
    const int d = point.first;
    const double delta = point.second;
    int hits = 0;
    std::vector<double> u(static_cast<std::size_t>(d));
    for (int s = 0; s < samples; ++s) {
      double norm2 = 0;
      for (double& v : u) {
        v = normal(rng);
        norm2 += v * v;
      }
      hits += std::abs(u[0]) >= delta * std::sqrt(norm2) ? 1 : 0;  // |cos(u, e_1)| >= delta
    }
    const double p = locmoe::p_delta(d, delta);
    const double sigma = std::sqrt(p * (1 - p) / samples);
    CAPTURE(d);
    CAPTURE(delta);
    CAPTURE(p);
    CHECK(std::abs(static_cast<double>(hits) / samples - p) < 4 * sigma);
  }
}

TEST_CASE("the paper's large-d claims (appendix A.2), checked") {
  const double erf_claim = std::erf(std::sqrt(2.0) / 2.0);
  CHECK(erf_claim == doctest::Approx(0.6827).epsilon(1e-4));  // "erf(sqrt(2)/2) ~ 0.68"
  for (const std::int64_t d : {1000, 100000, 1000000}) {
    const double dd = static_cast<double>(d);
    // "when delta = Theta(1/sqrt(d)), p_delta ~ 0.3": the limit is erfc(1/sqrt(2)) = 0.3173
    CHECK(locmoe::p_delta(d, 1.0 / std::sqrt(dd)) == doctest::Approx(std::erfc(1.0 / std::sqrt(2.0))).epsilon(2e-3));
    CHECK(locmoe::p_delta(d, 1.0 / std::sqrt(dd - 1.5)) == doctest::Approx(0.3173).epsilon(3e-3));
    // "when delta is larger than 1/sqrt(d), p_delta declines to 0 rapidly"
    CHECK(locmoe::p_delta(d, 3.0 / std::sqrt(dd)) < 3e-3);
    CHECK(locmoe::p_delta(d, 6.0 / std::sqrt(dd)) < 3e-9);
  }
}

TEST_CASE("the bound and its forms: consistency and which bounds which") {
  for (const std::int64_t d : {2, 3, 16, 128, 5120, 65536, 1000000}) {
    for (const std::int64_t n : {1, 8, 16, 64}) {
      for (const double delta : deltas) {
        CAPTURE(d);
        CAPTURE(n);
        CAPTURE(delta);
        const auto b = locmoe::critical_capacity_bound(d, n, delta);
        CHECK(relative_error(b.log_ec_min, -std::log(static_cast<double>(n)) - b.log_p_delta) < 1e-14);
        CHECK(b.log_p_delta == locmoe::log_p_delta(d, delta));
        CHECK(b.log_p_delta <= 0.0);
        if (b.p_delta > 1e-300) {
          // exp(log p) and p agree to 1e-14, plus the |log p| eps that rounding log p to a double costs.
          // (log(p) is no reference: it is the imprecise side where p ~ 1.)
          const double eps = std::numeric_limits<double>::epsilon();
          CHECK(relative_error(std::exp(b.log_p_delta), b.p_delta) < 1e-14 + 2 * eps * std::abs(b.log_p_delta));
          CHECK(relative_error(b.ec_min, 1.0 / (static_cast<double>(n) * b.p_delta)) < 1e-15);
        }
        // erfc(z) < exp(-z^2) for z > 0, so the exp form is below the erfc form (eq. 9's last step holds).
        CHECK(b.log_ec_min_exp_bound < b.log_ec_min_erfc);
        CHECK(std::isfinite(b.log_ec_min));
        CHECK(std::isfinite(b.log_ec_min_erfc));
        CHECK(std::isfinite(b.log_ec_min_exp_bound));
      }
    }
  }
  // The erfc form is not a lower bound of ec_min everywhere (golden data: d = 16, delta = 0.03 gives
  // ec_min = 0.068757 < ec_min_erfc = 0.069102), but it is one for large delta.
  CHECK(locmoe::ec_min(16, 16, 0.03) < locmoe::ec_min_erfc(16, 16, 0.03));
  CHECK(locmoe::ec_min(5120, 16, 0.3) > locmoe::ec_min_erfc(5120, 16, 0.3));  // crossing between 0.2 and 0.3
  CHECK(locmoe::ec_min(5120, 16, 0.2) < locmoe::ec_min_erfc(5120, 16, 0.2));
  CHECK(locmoe::log_ec_min(5120, 16, 0.5) > locmoe::log_ec_min_erfc(5120, 16, 0.5));
}

TEST_CASE("values that leave the range of a double: +inf or 0, with finite logs") {
  const auto b = locmoe::critical_capacity_bound(1000000, 16, 0.5);
  CHECK(b.p_delta == 0.0);
  CHECK(std::isinf(b.ec_min));
  CHECK(std::isinf(b.ec_min_erfc));
  CHECK(std::isinf(b.ec_min_exp_bound));
  // log p ~ -z^2 - ...: z^2 = 0.25e6 / 1.75 = 142857.14
  CHECK(b.log_p_delta < -1.4e5);
  CHECK(b.log_p_delta > -1.5e5);
  CHECK(b.log_ec_min_exp_bound == doctest::Approx(0.25e6 / 1.75 - std::log(16.0)).epsilon(1e-14));
  CHECK(locmoe_test::error_argument([] { locmoe::critical_capacity(1000000, 16, 0.5); }) == "delta");
}

TEST_CASE("bad arguments are rejected with the argument named") {
  CHECK(locmoe_test::error_argument([] { return locmoe::p_delta(1, 0.5); }) == "d");
  CHECK(locmoe_test::error_argument([] { return locmoe::p_delta(-7, 0.5); }) == "d");
  CHECK(locmoe_test::error_argument([] { return locmoe::p_delta((std::int64_t{1} << 53) + 1, 0.5); }) == "d");
  for (const double bad : {0.0, 1.0, -0.5, 1.5, not_a_number, inf}) {
    CHECK(locmoe_test::error_argument([&] { return locmoe::p_delta(16, bad); }) == "delta");
    CHECK(locmoe_test::error_argument([&] { return locmoe::log_p_delta(16, bad); }) == "delta");
  }
  CHECK(locmoe_test::error_argument([] { return locmoe::ec_min(16, 0, 0.5); }) == "n");
  CHECK(locmoe_test::error_argument([] { return locmoe::log_ec_min_erfc(16, -1, 0.5); }) == "n");
  CHECK(locmoe_test::error_argument([] { return locmoe::max_delta_for_capacity(16, 4, 0.0); }) == "capacity");
  CHECK(locmoe_test::error_argument([] { return locmoe::max_delta_for_capacity(16, 4, not_a_number); }) == "capacity");
  CHECK(locmoe_test::error_argument([] { return locmoe::max_delta_for_capacity(1, 4, 2.0); }) == "d");
  CHECK(locmoe_test::error_argument([] { return locmoe::min_capacity_factor(0, 1, 16, 2.0); }) == "tokens");
  CHECK(locmoe_test::error_argument([] { return locmoe::min_capacity_factor(10, 0, 16, 2.0); }) == "expert_parallel");
  CHECK(locmoe_test::error_argument([] { return locmoe::min_capacity_factor(10, 1, 0, 2.0); }) == "n");
  CHECK(locmoe_test::error_argument([] { return locmoe::min_capacity_factor(10, 1, 16, inf); }) == "ec_min");
}

TEST_CASE("classic capacity: exact ceiling of the written capacity factor") {
  // Exact integer reference for factors written with two decimals: cf = k / 100.
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    const std::int64_t tokens = static_cast<std::int64_t>(rng() % 1000000);
    const std::int64_t k = 1 + static_cast<std::int64_t>(rng() % 400);
    const std::int64_t ep = 1 + static_cast<std::int64_t>(rng() % 64);
    const std::int64_t n = 1 + static_cast<std::int64_t>(rng() % 256);
    const std::int64_t den = 100 * ep * n;
    const std::int64_t want = (tokens * k + den - 1) / den;
    CAPTURE(tokens);
    CAPTURE(k);
    CHECK(locmoe::classic_capacity(tokens, static_cast<double>(k) / 100.0, ep, n) == want);
  }
  CHECK(locmoe::classic_capacity(100, 1.1, 1, 10) == 11);  // 100 * 1.1 / 10 in double would give 12
  CHECK(locmoe::classic_capacity(700, 1.1, 7, 10) == 11);
  CHECK(locmoe::classic_capacity(4096, 1.25, 8, 8) == 80);
  CHECK(locmoe::classic_capacity(0, 1.0, 1, 16) == 0);       // empty batch
  CHECK(locmoe::classic_capacity(0, 1.0, 1, 16, 4) == 4);    // min capacity
  CHECK(locmoe::classic_capacity(10, 1.0, 1, 16, 4) == 4);   // ceil(10/16) = 1 < 4
  CHECK(locmoe::classic_capacity(1, 1e-300, 1, 16) == 1);    // any positive share rounds up to one slot
  CHECK(locmoe::classic_capacity(3, 1e18, 1, 1) == 3000000000000000000);  // exact, near the int64 limit
  CHECK(locmoe::classic_capacity(7, 0.1, 1, 1) == 1);                     // 0.7 rounds up
  // Factors whose shortest decimal has every kind of exponent.
  CHECK(locmoe::classic_capacity(1000, 1e-3, 1, 1) == 1);
  CHECK(locmoe::classic_capacity(1001, 1e-3, 1, 1) == 2);
  CHECK(locmoe::classic_capacity(1000000000000, 2.5e-7, 1, 1) == 250000);
  CHECK(locmoe::classic_capacity(7, 123456.789, 1, 1) == 864198);          // 864197.523
  CHECK(locmoe::classic_capacity(1, 1.5e15, 1, 1) == 1500000000000000);
  CHECK(locmoe::classic_capacity(3, 7e-300, 1, 1) == 1);
}

TEST_CASE("classic capacity: overflow and bad arguments") {
  CHECK(locmoe::classic_capacity(INT64_MAX, 1.0, 1, 1) == INT64_MAX);
  CHECK(locmoe::classic_capacity(INT64_MAX, 1.0, INT64_MAX, INT64_MAX) == 1);  // ep * n overflows an int64: fine
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(INT64_MAX, 1.5, 1, 1); }) == "tokens");
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(1, 1e300, 1, 1); }) == "tokens");  // the product overflows
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(-1, 1.0, 1, 1); }) == "tokens");
  for (const double bad : {0.0, -1.0, not_a_number, inf})
    CHECK(locmoe_test::error_argument([&] { locmoe::classic_capacity(8, bad, 1, 1); }) == "capacity_factor");
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(8, 1.0, 0, 1); }) == "expert_parallel");
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(8, 1.0, 1, 0); }) == "n");
  CHECK(locmoe_test::error_argument([] { locmoe::classic_capacity(8, 1.0, 1, 1, -1); }) == "min_capacity");
}

TEST_CASE("critical capacity is the smallest integer >= ec_min, at least 1") {
  for (const double delta : {0.01, 0.03, 0.05, 0.1}) {
    const double e = locmoe::ec_min(5120, 16, delta);
    const std::int64_t c = locmoe::critical_capacity(5120, 16, delta);
    CHECK(static_cast<double>(c) >= e);
    CHECK((c == 1 || static_cast<double>(c - 1) < e));
  }
}

TEST_CASE("max_delta_for_capacity inverts ec_min") {
  for (const std::int64_t d : {3, 16, 1024, 5120, 1000000}) {
    for (const double capacity : {0.1, 1.0, 2.0, 16.0, 1e3, 1e12, 1e200}) {
      const std::int64_t n = 16;
      CAPTURE(d);
      CAPTURE(capacity);
      const double delta = locmoe::max_delta_for_capacity(d, n, capacity);
      if (capacity * n <= 1.0) {
        CHECK(delta == 0.0);
        continue;
      }
      REQUIRE(delta > 0.0);
      REQUIRE(delta < 1.0);
      // The root lies in a bracket of 1e-12 relative (plus 2 ulps) around the answer. Near delta = 1 a
      // double cannot resolve p_delta, so a direct round trip is only checked where delta < 0.9.
      const double below = std::max(delta * (1 - 1e-12) - 4e-16, 1e-300);
      const double above = std::min(delta * (1 + 1e-12) + 4e-16, std::nextafter(1.0, 0.0));
      const double log_c = std::log(capacity);
      CHECK(locmoe::log_ec_min(d, n, below) <= log_c + 1e-12 * std::abs(log_c));
      if (above > delta) CHECK(locmoe::log_ec_min(d, n, above) >= log_c - 1e-12 * std::abs(log_c));
      if (delta < 0.9) CHECK(relative_error(locmoe::log_ec_min(d, n, delta), log_c) < 1e-9);
      // Exactly the largest double that meets the bound, as ec_min evaluates it (found by tests/fuzz).
      CHECK(locmoe::ec_min(d, n, delta) <= capacity);
      if (std::nextafter(delta, 1.0) < 1.0) CHECK(locmoe::ec_min(d, n, std::nextafter(delta, 1.0)) > capacity);
    }
  }
  // n * capacity beyond double range: solved in log space (log ec_min = log n + log capacity).
  const double delta = locmoe::max_delta_for_capacity(1000000, 10, 1e308);
  CHECK(relative_error(locmoe::log_ec_min(1000000, 10, delta), std::log(1e308)) < 1e-9);
  CHECK(delta == doctest::Approx(0.0375).epsilon(0.01));
  // The fuzzer's case: d = 3 (p_delta = 1 - delta), n capacity = 1.5e9; one ulp of delta moves ec_min by 1.7e-7.
  const double steep = locmoe::max_delta_for_capacity(3, 1512439808, 1.0);
  CHECK(locmoe::ec_min(3, 1512439808, steep) <= 1.0);
  CHECK(locmoe::ec_min(3, 1512439808, std::nextafter(steep, 1.0)) > 1.0);
}

TEST_CASE("min_capacity_factor is the smallest factor whose classic capacity reaches ec_min") {
  for (const std::int64_t tokens : {1, 16, 1000, 16384, 1 << 20}) {
    for (const double delta : {0.01, 0.03, 0.05, 0.08}) {
      const std::int64_t ep = 4;
      const std::int64_t n = 16;
      const double e = locmoe::ec_min(5120, n, delta);
      const double cf = locmoe::min_capacity_factor(tokens, ep, n, e);
      CAPTURE(tokens);
      CAPTURE(delta);
      CAPTURE(e);
      CHECK(static_cast<double>(locmoe::classic_capacity(tokens, cf, ep, n)) >= e);
      const double smaller = std::nextafter(cf, 0.0);
      if (smaller > 0.0) CHECK(static_cast<double>(locmoe::classic_capacity(tokens, smaller, ep, n)) < e);
    }
  }
  // (T, ep, n) = (16384, 16, 16): 64 tokens per expert at cf = 1; ec_min = 1.96 needs 2 slots, so any cf > 1/64.
  CHECK(locmoe::min_capacity_factor(16384, 16, 16, 1.9648) == std::nextafter(0.015625, 1.0));
  CHECK(locmoe::min_capacity_factor(16384, 16, 16, 0.5) == std::numeric_limits<double>::denorm_min());
  CHECK(locmoe_test::error_argument([] { locmoe::min_capacity_factor(1, 1000000000, 1000000000, 1e300); }) == "ec_min");
}

TEST_CASE("extreme arguments keep full accuracy (high-precision values from mpmath)") {
  // d beyond the golden table, where the DLMF fraction would cancel: Didonato-Morris keeps it exact.
  CHECK(relative_error(locmoe::log_p_delta(std::int64_t{1} << 53, 4e-7), -724.43902341676607) < 1e-13);
  CHECK(relative_error(locmoe::log_p_delta(1000000000000, 4e-5), -803.91529547239273) < 1e-13);
  // delta so small that delta^2 underflows: the leading term 2 delta / B(1/2, (d-1)/2).
  CHECK(relative_error(locmoe::log_p_delta(5120, 1e-160), -5.7083608158651779e-159) < 1e-13);
  CHECK(locmoe::log_p_delta(5120, 1e-200) < 0.0);
  // n = 1 and small z, where log(erfc(z)) ~ 0 and nothing else dominates the log.
  CHECK(relative_error(locmoe::log_ec_min_erfc(2, 1, 1e-8), 1.1283791734617104e-8) < 1e-13);
  CHECK(relative_error(locmoe::log_ec_min_erfc(100, 1, 1e-6), 7.9788774390556019e-6) < 1e-13);
}

TEST_CASE("errno_on_error: valid calls leave errno alone, also where values overflow") {
  const locmoe::errno_on_error pol;
  errno = 0;  // the calls first, then the checks: doctest's output may set errno
  const double ec = locmoe::ec_min(1000000, 16, 0.5, pol), p = locmoe::p_delta(1000000, 0.5, pol);
  const double log_p = locmoe::log_p_delta(1000000, 0.5, pol), delta = locmoe::max_delta_for_capacity(1000000, 10, 1e308, pol);
  const int after = errno;
  CHECK(std::isinf(ec));
  CHECK(p == 0.0);
  CHECK(std::isfinite(log_p));
  CHECK(delta > 0.0);
  CHECK(after == 0);
}

TEST_CASE("empirical_delta is the type-7 quantile of the cosines") {
  std::mt19937_64 rng(11);
  std::uniform_real_distribution<double> cosine(-0.2, 1.0);
  for (const int size : {1, 2, 3, 10, 1001}) {
    Eigen::VectorXd c(size);
    for (int i = 0; i < size; ++i) c[i] = cosine(rng);
    std::vector<double> sorted(c.data(), c.data() + size);
    std::sort(sorted.begin(), sorted.end());
    for (const double q : {0.0, 0.05, 0.5, 0.9, 1.0}) {
      const double h = q * (size - 1);
      const auto lo = static_cast<std::size_t>(h);
      const double frac = h - std::floor(h);
      const double want = lo + 1 < sorted.size() ? sorted[lo] + frac * (sorted[lo + 1] - sorted[lo]) : sorted[lo];
      CAPTURE(size);
      CAPTURE(q);
      CHECK(relative_error(locmoe::empirical_delta(c, q), want) < 1e-15);
    }
  }
  CHECK(locmoe_test::error_argument([] { locmoe::empirical_delta(Eigen::VectorXd(), 0.05); }) == "cosines");
  CHECK(locmoe_test::error_argument([] { locmoe::empirical_delta(Eigen::VectorXd::Constant(3, 0.5), 1.5); }) == "q");
  CHECK(locmoe_test::error_argument([&] { locmoe::empirical_delta(Eigen::VectorXd::Constant(3, not_a_number), 0.5); }) == "cosines");
  CHECK(locmoe_test::error_argument([] { locmoe::empirical_delta(Eigen::VectorXd::Constant(3, 1.5), 0.5); }) == "cosines");
}

TEST_CASE("routed_cosines against hand-computed GrAP weights") {
  // d = 4, n = 2: GrAP weights (n/d) 1{block}: w_0 = (.5, .5, 0, 0), w_1 = (0, 0, .5, .5).
  Eigen::MatrixXd w(2, 4);
  w << 0.5, 0.5, 0, 0, 0, 0, 0.5, 0.5;
  Eigen::MatrixXf x(5, 4);
  x << 1, 1, 0, 0,   // cos to w_0 = 1
      1, 0, 0, 0,    // cos to w_1 = 0
      0, 0, 3, 4,    // cos to w_1 = 7 / (5 sqrt 2)
      0, 0, 0, 0,    // zero norm: left out
      2, 2, 2, 2;    // dropped (-1): left out
  Eigen::VectorXi expert(5);
  expert << 0, 1, 1, 0, -1;
  const Eigen::VectorXd c = locmoe::routed_cosines(x, w, expert);
  REQUIRE(c.size() == 3);
  CHECK(c[0] == doctest::Approx(1.0).epsilon(1e-15));
  CHECK(c[1] == 0.0);
  CHECK(c[2] == doctest::Approx(7.0 / (5.0 * std::sqrt(2.0))).epsilon(1e-15));
  expert[0] = 2;
  CHECK(locmoe_test::error_argument([&] { locmoe::routed_cosines(x, w, expert); }) == "expert");
  expert[0] = 0;
  x(1, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK(locmoe_test::error_argument([&] { locmoe::routed_cosines(x, w, expert); }) == "x");
  CHECK(locmoe_test::error_argument([&] { locmoe::routed_cosines(x, Eigen::MatrixXd(2, 3), expert); }) == "w");
  CHECK(locmoe_test::error_argument([&] { locmoe::routed_cosines(x, w, Eigen::VectorXi(4)); }) == "expert");
  // Rows whose squared norm overflows or underflows a double still have an angle.
  Eigen::MatrixXd big(2, 4);
  big << 1e200, 1e200, 0, 0, 1e-200, 0, 1e-200, 0;
  Eigen::VectorXi both(2);
  both << 0, 0;
  const Eigen::VectorXd scaled = locmoe::routed_cosines(big, w, both);
  REQUIRE(scaled.size() == 2);
  CHECK(scaled[0] == doctest::Approx(1.0).epsilon(1e-15));
  CHECK(scaled[1] == doctest::Approx(0.5).epsilon(1e-15));
}
