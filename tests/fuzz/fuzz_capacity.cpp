// The capacity calculator (capacity.hpp) on random (d, n, delta, tokens, factors), including arguments outside
// the domain. Promised: an error naming the argument, or a result that is finite (or the documented +infinity of
// an ec_min that overflows a double); every log_ value finite; p_delta in [0, 1]; log_ec_min_erfc >
// log_ec_min_exp_bound (>= where z < 1e-12); ec_min non-decreasing in delta; the inverse
// max_delta_for_capacity consistent with the forward (ec_min at the answer within the capacity, and above it
// one ulp past the answer); classic_capacity >= min_capacity and the exact ceiling; min_capacity_factor the
// smallest factor whose classic capacity reaches the bound.
#include "fuzz_input.hpp"

#include <locmoe/capacity.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

namespace {

std::int64_t any_int(locmoe_fuzz::input& in, std::int64_t typical_max) {
  switch (in.raw<std::uint8_t>() % 8) {
    case 0: return static_cast<std::int64_t>(in.raw<std::uint64_t>());  // anything, negative included
    case 1: return static_cast<std::int64_t>(in.size_between(0, 3)) - 1;  // -1, 0, 1, 2
    case 2: return (std::int64_t{1} << 53) + static_cast<std::int64_t>(in.size_between(0, 2)) - 1;
    default: return static_cast<std::int64_t>(in.between(1, static_cast<std::uint64_t>(typical_max)));
  }
}

double any_delta(locmoe_fuzz::input& in) {
  return in.raw<std::uint8_t>() % 4 == 0 ? in.special<double>() : static_cast<double>(in.raw<std::uint32_t>()) / 4294967296.0;
}

bool in_domain(std::int64_t d, std::int64_t n, double delta) {
  return d >= 2 && d <= (std::int64_t{1} << 53) && n >= 1 && delta > 0 && delta < 1;
}

void expect_argument(const locmoe::error& e, std::int64_t d, std::int64_t n, double delta) {
  const std::string a = e.argument();
  const bool named = (a == "d" && !(d >= 2 && d <= (std::int64_t{1} << 53))) || (a == "n" && n < 1) ||
                     (a == "delta" && !(delta > 0 && delta < 1));
  LOCMOE_FUZZ_CHECK(named || e.code() == locmoe::errc::overflow, std::string("wrong argument named: ") + e.what());
}

void bound(locmoe_fuzz::input& in) {
  const std::int64_t d = any_int(in, 100000), n = any_int(in, 4096);
  const double delta = any_delta(in);
  try {
    const auto b = locmoe::critical_capacity_bound(d, n, delta);
    LOCMOE_FUZZ_CHECK(in_domain(d, n, delta), "accepted outside the domain");
    LOCMOE_FUZZ_CHECK(b.p_delta >= 0 && b.p_delta <= 1, "p_delta in [0, 1]");
    LOCMOE_FUZZ_CHECK(std::isfinite(b.log_p_delta) && std::isfinite(b.log_ec_min) && std::isfinite(b.log_ec_min_erfc) &&
                          std::isfinite(b.log_ec_min_exp_bound), "every log finite");
    LOCMOE_FUZZ_CHECK(!std::isnan(b.ec_min) && b.ec_min > 0 && !std::isnan(b.ec_min_erfc) && !std::isnan(b.ec_min_exp_bound),
                      "values positive or +inf, never NaN");
    // Strict where z (= sqrt(delta^2 d / (2 - delta^2))) is above 1e-12; below about 1e-16 both round to 1 / n.
    const double z2 = delta * delta * static_cast<double>(d) / (2 - delta * delta);
    LOCMOE_FUZZ_CHECK(z2 > 1e-24 ? b.log_ec_min_exp_bound < b.log_ec_min_erfc : b.log_ec_min_exp_bound <= b.log_ec_min_erfc,
                      "exp bound below the erfc form: d " + std::to_string(d) + ", n " + std::to_string(n) + ", delta " +
                          locmoe::detail::to_text(delta));
    // Monotone in delta: a larger delta never lowers the bound.
    const double larger = std::min(delta + (1 - delta) * static_cast<double>(in.size_between(0, 255)) / 256,
                                   std::nextafter(1.0, 0.0));  // the sum may round to 1
    const double log_larger = locmoe::log_ec_min(d, n, larger);
    LOCMOE_FUZZ_CHECK(log_larger >= b.log_ec_min - 1e-12 * std::max(1.0, std::abs(b.log_ec_min)),
                      "log_ec_min non-decreasing in delta: d " + std::to_string(d) + ", n " + std::to_string(n) + ", delta " +
                          locmoe::detail::to_text(delta) + " -> " + locmoe::detail::to_text(larger) + ": " +
                          locmoe::detail::to_text(b.log_ec_min) + " -> " + locmoe::detail::to_text(log_larger));
    // critical_capacity: max(1, ceil(ec_min)), or an overflow error beyond 2^62.
    try {
      const std::int64_t c = locmoe::critical_capacity(d, n, delta);
      LOCMOE_FUZZ_CHECK(c >= 1 && static_cast<double>(c) >= b.ec_min * (1 - 1e-15) &&
                            (c == 1 || static_cast<double>(c) - 1 < b.ec_min * (1 + 1e-12)),
                        "critical capacity = max(1, ceil(ec_min))");
    } catch (const locmoe::error& e) {
      LOCMOE_FUZZ_CHECK(e.code() == locmoe::errc::overflow && b.log_ec_min > 40, e.what());
    }
  } catch (const locmoe::error& e) {
    LOCMOE_FUZZ_CHECK(!in_domain(d, n, delta), std::string("refused inside the domain: ") + e.what());
    expect_argument(e, d, n, delta);
  }
}

void inverse(locmoe_fuzz::input& in) {
  const std::int64_t d = any_int(in, 100000), n = any_int(in, 4096);
  const double capacity = in.flag() ? in.special<double>() : 1 + static_cast<double>(in.raw<std::uint16_t>());
  double answer = 0;
  try {
    answer = locmoe::max_delta_for_capacity(d, n, capacity);
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    const bool ok_d = d >= 2 && d <= (std::int64_t{1} << 53), ok_n = n >= 1, ok_c = std::isfinite(capacity) && capacity > 0;
    LOCMOE_FUZZ_CHECK(!(ok_d && ok_n && ok_c), std::string("refused inside the domain: ") + e.what());
    LOCMOE_FUZZ_CHECK((a == "d" && !ok_d) || (a == "n" && !ok_n) || (a == "capacity" && !ok_c), e.what());
    return;
  }
  LOCMOE_FUZZ_CHECK(answer >= 0 && answer < 1, "delta in [0, 1)");
  if (answer == 0) {
    LOCMOE_FUZZ_CHECK(static_cast<double>(n) * capacity <= 1 * (1 + 1e-12), "0 only where n capacity <= 1");
    return;
  }
  const std::string where = "d " + std::to_string(d) + ", n " + std::to_string(n) + ", capacity " +
                            locmoe::detail::to_text(capacity) + ", answer " + locmoe::detail::to_text(answer);
  LOCMOE_FUZZ_CHECK(locmoe::ec_min(d, n, answer) <= capacity, "ec_min(answer) <= capacity: " + where);
  const double next = std::nextafter(answer, 1.0);
  if (next < 1) LOCMOE_FUZZ_CHECK(locmoe::ec_min(d, n, next) > capacity, "the largest such delta: " + where);
}

void classic(locmoe_fuzz::input& in) {
  const std::int64_t tokens = any_int(in, 1 << 20), ep = any_int(in, 64), n = any_int(in, 512);
  const std::int64_t min_capacity = in.flag() ? any_int(in, 8) : 0;
  const double factor = in.flag() ? in.special<double>() : static_cast<double>(in.raw<std::uint16_t>()) / 1000;
  std::int64_t c = 0;
  try {
    c = locmoe::classic_capacity(tokens, factor, ep, n, min_capacity);
  } catch (const locmoe::error& e) {
    const std::string a = e.argument();
    const bool ok = tokens >= 0 && std::isfinite(factor) && factor > 0 && ep >= 1 && n >= 1 && min_capacity >= 0;
    LOCMOE_FUZZ_CHECK(!ok || e.code() == locmoe::errc::overflow, std::string("refused valid arguments: ") + e.what());
    return;
  }
  LOCMOE_FUZZ_CHECK(c >= min_capacity && c >= 0, "at least min_capacity");
  // The exact ceiling, checked in long double where it is exact enough (small operands).
  if (tokens < (1 << 20) && factor < 1000 && c > min_capacity) {
    const long double q = static_cast<long double>(tokens) * factor / (static_cast<long double>(ep) * n);
    LOCMOE_FUZZ_CHECK(static_cast<long double>(c) >= q * (1 - 1e-15L) && static_cast<long double>(c) - 1 < q * (1 + 1e-15L),
                      "ceil(tokens cf / (ep n))");
  }
  if (tokens >= 1 && ep >= 1 && n >= 1 && tokens < (1 << 20) && n < (1 << 12) && ep < (1 << 8)) {
    const double bound = 1 + static_cast<double>(in.raw<std::uint16_t>() % 512) / 7;
    try {
      const double cf = locmoe::min_capacity_factor(tokens, ep, n, bound);
      LOCMOE_FUZZ_CHECK(cf > 0 && std::isfinite(cf), "a positive finite factor");
      LOCMOE_FUZZ_CHECK(static_cast<double>(locmoe::classic_capacity(tokens, cf, ep, n)) >= bound, "reaches the bound");
      const double below = std::nextafter(cf, 0.0);
      if (below > 0)
        LOCMOE_FUZZ_CHECK(static_cast<double>(locmoe::classic_capacity(tokens, below, ep, n)) < bound, "the smallest such factor");
    } catch (const locmoe::error& e) {
      LOCMOE_FUZZ_CHECK(e.code() == locmoe::errc::overflow, e.what());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  locmoe_fuzz::input in(data, size);
  switch (in.raw<std::uint8_t>() % 3) {
    case 0: bound(in); break;
    case 1: inverse(in); break;
    default: classic(in); break;
  }
  return 0;
}
