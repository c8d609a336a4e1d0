// The error policies: what a caller sees when an argument breaks a rule.
#include <locmoe/capacity.hpp>
#include <locmoe/error.hpp>

#include <doctest/doctest.h>

#include <cerrno>
#include <cmath>
#include <limits>
#include <string>

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
  const locmoe::errno_on_error pol;
  errno = 0;
  CHECK(std::isnan(locmoe::p_delta(5120, std::numeric_limits<double>::quiet_NaN(), pol)));
  CHECK(errno == EDOM);
  errno = 0;
  CHECK(locmoe::classic_capacity(1, 1.0, 1, 0, 0, pol) == -1);
  CHECK(errno == EDOM);
  errno = 0;
  CHECK(locmoe::classic_capacity(INT64_MAX, 10.0, 1, 1, 0, pol) == -1);
  CHECK(errno == ERANGE);
  errno = 0;
  const auto b = locmoe::critical_capacity_bound(0, 16, 0.03, pol);
  CHECK(errno == EDOM);
  CHECK(std::isnan(b.ec_min));
  CHECK(std::isnan(b.log_p_delta));
  errno = 0;
  CHECK(locmoe::p_delta(5120, 0.03, pol) > 0.0);  // a valid call leaves errno alone
  CHECK(errno == 0);
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
