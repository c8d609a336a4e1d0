// The error policies: what a caller sees when an argument breaks a rule.
#include <locmoe/capacity.hpp>
#include <locmoe/error.hpp>

#include <doctest/doctest.h>

#include <cerrno>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

TEST_CASE("throw_on_error names the function, the argument, the value and the rule") {
  try {
    (void)locmoe::p_delta(5120, 1.5);
    FAIL("no exception");
  } catch (const locmoe::error& e) {
    CHECK(e.code() == locmoe::errc::domain);
    CHECK(e.function() == "locmoe::p_delta");
    CHECK(e.argument() == "delta");
    CHECK(std::string(e.what()) == "locmoe::p_delta: delta = 1.5: must satisfy 0 < delta < 1");
  }
  CHECK_THROWS_AS(locmoe::p_delta(1, 0.5), std::invalid_argument);  // catchable generically
}

TEST_CASE("errno_on_error returns the documented fallback and sets errno") {
  // errno is read right after each call, before doctest (which may print, and so set errno) looks at anything.
  const locmoe::errno_on_error pol;
  const auto errno_after = [](auto call) {
    errno = 0;
    const auto result = call();
    const int e = errno;
    return std::make_pair(result, e);
  };
  const auto nan_delta = errno_after([&] { return locmoe::p_delta(5120, std::numeric_limits<double>::quiet_NaN(), pol); });
  CHECK(std::isnan(nan_delta.first));
  CHECK(nan_delta.second == EDOM);
  const auto zero_experts = errno_after([&] { return locmoe::classic_capacity(1, 1.0, 1, 0, 0, pol); });
  CHECK(zero_experts.first == -1);
  CHECK(zero_experts.second == EDOM);
  const auto too_big = errno_after([&] { return locmoe::classic_capacity(INT64_MAX, 10.0, 1, 1, 0, pol); });
  CHECK(too_big.first == -1);
  CHECK(too_big.second == ERANGE);
  const auto bound = errno_after([&] { return locmoe::critical_capacity_bound(0, 16, 0.03, pol); });
  CHECK(bound.second == EDOM);
  CHECK(std::isnan(bound.first.ec_min));
  CHECK(std::isnan(bound.first.log_p_delta));
  const auto valid = errno_after([&] { return locmoe::p_delta(5120, 0.03, pol); });  // leaves errno alone
  CHECK(valid.first > 0.0);
  CHECK(valid.second == 0);
}

namespace {
struct counting_policy {
  using boost_policy = boost::math::policies::policy<>;
  static inline int reports = 0;
  template <class Result>
  static Result report(const locmoe::error_report& r, Result fallback) {
    ++reports;
    CHECK(std::string(r.argument) == "n");
    return fallback;
  }
};
}  // namespace

TEST_CASE("a user policy receives the report") {
  counting_policy::reports = 0;
  CHECK(std::isnan(locmoe::ec_min(5120, 0, 0.03, counting_policy{})));
  CHECK(counting_policy::reports == 1);
}
