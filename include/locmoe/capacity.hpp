// locmoe/capacity.hpp - expert capacity: the paper's critical lower bound and the classic formula.
//
// Notation (paper section 3.2, "Critical Value of Expert Capacity"):
//   d      activation (hidden) size, an integer >= 2
//   n      number of experts, >= 1
//   delta  cos(theta), the cosine between a token and the gate weight of its expert, 0 < delta < 1
//   z^2    delta^2 d / (2 - delta^2)
//
//   p_delta          = 1 - I_{delta^2}(1/2, (d-1)/2)       Lemma 3, eq. (8): P(|cos| >= delta) for a uniform
//                                                         unit vector in R^d and a fixed direction (both
//                                                         caps; Assumption 3's one-sided count, cos >= delta,
//                                                         is p_delta / 2 and doubles ec_min: docs/theory.md)
//   ec_min           = 1 / (n p_delta)                    Theorem 1, eq. (9)
//   ec_min_erfc      = 1 / (n erfc(z))                    eq. (9), the paper's large-d form
//   ec_min_exp_bound = exp(z^2) / n                       eq. (9), the paper's final form
//
// Which is a bound of which (checked in tests/test_capacity.cpp, tabulated in docs/theory.md):
// ec_min_exp_bound < ec_min_erfc always (erfc(z) < exp(-z^2) for z > 0), except that both round to 1 / n when z is
// below about 1e-16 (delta near the smallest double: found by tests/fuzz). ec_min_erfc is an approximation of
// ec_min, not a bound: it is larger than ec_min for small delta and smaller for large delta.
//
// Every value has a log_ twin (natural log) that stays finite where the value leaves the range of a
// double: a value that overflows is returned as +infinity, one that underflows as 0 (or a subnormal).
//
// All functions are pure and thread-safe. The bound functions allocate nothing; classic_capacity uses
// multi-precision integers, empirical_delta copies the cosines it sorts, routed_cosines returns a vector.
// Cost: p_delta and the ec_min family are one Boost.Math incomplete beta or erfc (a few microseconds; see
// bench/bench_capacity.cpp), plus a continued fraction in the underflow region.
// Examples: docs/api.md#capacity.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/detail/log_special.hpp>
#include <locmoe/error.hpp>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <boost/math/special_functions/beta.hpp>
#include <boost/math/special_functions/erf.hpp>
#include <boost/math/tools/toms748_solve.hpp>
#include <boost/multiprecision/cpp_int.hpp>

namespace locmoe {

/// Everything Theorem 1 says about one (d, n, delta), computed together (one incomplete beta, one erfc).
struct capacity_bound {
  std::int64_t hidden = 0;   ///< d
  std::int64_t experts = 0;  ///< n
  double delta = 0;
  double p_delta = 0;           ///< eq. (8); 0 or subnormal where it underflows
  double ec_min = 0;            ///< eq. (9); +inf where it overflows
  double ec_min_erfc = 0;       ///< eq. (9), large-d form; +inf where it overflows
  double ec_min_exp_bound = 0;  ///< eq. (9), final form; +inf where it overflows
  double log_p_delta = 0;       ///< natural logs, always finite
  double log_ec_min = 0;
  double log_ec_min_erfc = 0;
  double log_ec_min_exp_bound = 0;
};

namespace detail {

/// The largest d we accept: (d - 1) / 2 must be exact in a double.
inline constexpr std::int64_t max_hidden = std::int64_t{1} << 53;

template <class Policy, class Result>
bool check_bound_args(const char* function, std::int64_t d, std::int64_t n, double delta, Result& fallback) {
  if (d < 2) {
    fallback = detail::raise<Policy>(errc::domain, function, "d", d, "must be >= 2", fallback);
    return false;
  }
  if (d > max_hidden) {
    fallback = detail::raise<Policy>(errc::overflow, function, "d", d, "must be <= 2^53", fallback);
    return false;
  }
  if (n < 1) {
    fallback = detail::raise<Policy>(errc::domain, function, "n", n, "must be >= 1", fallback);
    return false;
  }
  if (!(delta > 0.0 && delta < 1.0)) {  // also rejects NaN
    fallback = detail::raise<Policy>(errc::domain, function, "delta", delta, "must satisfy 0 < delta < 1", fallback);
    return false;
  }
  return true;
}

/// exp(log_value) where the direct value was not trusted; overflows to +inf, underflows to 0.
inline double from_log(double log_value) { return std::exp(log_value); }

template <class Policy>
capacity_bound capacity_bound_unchecked(std::int64_t d, std::int64_t n, double delta) {
  const errno_guard keep_errno;
  typename Policy::boost_policy pol;
  capacity_bound r;
  r.hidden = d;
  r.experts = n;
  r.delta = delta;
  const double a = 0.5 * static_cast<double>(d - 1);
  const double log_n = std::log(static_cast<double>(n));
  const double delta2 = delta * delta;
  const double z = delta * std::sqrt(static_cast<double>(d) / (2.0 - delta2));  // z^2 may underflow, z does not
  const double z2 = z * z;

  const double p = ibetac_half(a, delta, pol);
  r.log_p_delta = log_ibetac_half(a, delta, p, pol);
  r.p_delta = p >= direct_floor ? p : from_log(r.log_p_delta);
  r.log_ec_min = -log_n - r.log_p_delta;
  r.ec_min = p >= direct_floor ? 1.0 / (static_cast<double>(n) * p) : from_log(r.log_ec_min);

  const double e = boost::math::erfc(z, pol);
  r.log_ec_min_erfc = -log_n - log_erfc(z, pol);
  r.ec_min_erfc = e >= direct_floor ? 1.0 / (static_cast<double>(n) * e) : from_log(r.log_ec_min_erfc);

  r.log_ec_min_exp_bound = z2 - log_n;
  r.ec_min_exp_bound = std::exp(z2) / static_cast<double>(n);
  if (!std::isfinite(r.ec_min_exp_bound)) r.ec_min_exp_bound = from_log(r.log_ec_min_exp_bound);
  return r;
}

/// The bound with its arguments checked; errors name `function`.
template <class Policy>
capacity_bound capacity_bound_checked(const char* function, std::int64_t d, std::int64_t n, double delta) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double fallback = nan;
  if (!check_bound_args<Policy>(function, d, n, delta, fallback)) {
    return capacity_bound{d, n, delta, nan, nan, nan, nan, nan, nan, nan, nan};
  }
  return capacity_bound_unchecked<Policy>(d, n, delta);
}

/// The shortest decimal that round-trips to `value` (the number the caller wrote), as digits * 10^exponent.
inline void shortest_decimal(double value, std::uint64_t& digits, int& exponent) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof buffer, value, std::chars_format::scientific);
  LOCMOE_ASSERT(result.ec == std::errc());
  digits = 0;
  exponent = 0;
  int fraction_digits = 0;
  bool in_fraction = false;
  const char* c = buffer;
  for (; c != result.ptr && *c != 'e'; ++c) {
    if (*c == '.') {
      in_fraction = true;
    } else {
      digits = digits * 10 + static_cast<std::uint64_t>(*c - '0');
      fraction_digits += in_fraction ? 1 : 0;
    }
  }
  if (c != result.ptr) {  // "e+05" / "e-07": to_chars writes no terminator, so parse within [c + 1, ptr)
    const char* e = c + 1;
    const bool negative = *e == '-';
    if (*e == '+' || *e == '-') ++e;
    const auto parsed = std::from_chars(e, result.ptr, exponent);
    LOCMOE_ASSERT(parsed.ec == std::errc() && parsed.ptr == result.ptr);
    (void)parsed;
    if (negative) exponent = -exponent;
  }
  exponent -= fraction_digits;
}

}  // namespace detail

/// p_delta = 1 - I_{delta^2}(1/2, (d-1)/2) (Lemma 3, eq. 8), evaluated as the complement
/// ibetac(1/2, (d-1)/2, delta^2) for accuracy. Underflows to 0 (e.g. d = 1e6, delta = 0.5): use log_p_delta.
/// Preconditions: 2 <= d <= 2^53, 0 < delta < 1. Fallback (errno policy): NaN.
template <class Policy = default_policy>
double p_delta(std::int64_t d, double delta, const Policy& = Policy{}) {
  double fallback = std::numeric_limits<double>::quiet_NaN();
  if (!detail::check_bound_args<Policy>("locmoe::p_delta", d, 1, delta, fallback)) return fallback;
  const detail::errno_guard keep_errno;
  typename Policy::boost_policy pol;
  const double a = 0.5 * static_cast<double>(d - 1);
  const double p = detail::ibetac_half(a, delta, pol);
  return p >= detail::direct_floor ? p : detail::from_log(detail::log_ibetac_half(a, delta, p, pol));
}

/// log(p_delta), finite for every valid argument. Same preconditions as p_delta.
template <class Policy = default_policy>
double log_p_delta(std::int64_t d, double delta, const Policy& = Policy{}) {
  double fallback = std::numeric_limits<double>::quiet_NaN();
  if (!detail::check_bound_args<Policy>("locmoe::log_p_delta", d, 1, delta, fallback)) return fallback;
  const detail::errno_guard keep_errno;
  typename Policy::boost_policy pol;
  const double a = 0.5 * static_cast<double>(d - 1);
  return detail::log_ibetac_half(a, delta, detail::ibetac_half(a, delta, pol), pol);
}

/// Theorem 1 in full: p_delta, ec_min and its erfc and exp forms, each with its log.
/// Preconditions: 2 <= d <= 2^53, n >= 1, 0 < delta < 1. Fallback (errno policy): all fields NaN.
template <class Policy = default_policy>
capacity_bound critical_capacity_bound(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::critical_capacity_bound", d, n, delta);
}

/// ec_min = 1 / (n p_delta) (Theorem 1, eq. 9); +inf where it overflows a double.
template <class Policy = default_policy>
double ec_min(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::ec_min", d, n, delta).ec_min;
}

/// log(ec_min) = -log(n) - log(p_delta), always finite.
template <class Policy = default_policy>
double log_ec_min(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::log_ec_min", d, n, delta).log_ec_min;
}

/// ec_min_erfc = 1 / (n erfc(sqrt(delta^2 d / (2 - delta^2)))) (eq. 9, large-d form). An approximation of
/// ec_min, not a bound of it (see the header comment).
template <class Policy = default_policy>
double ec_min_erfc(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::ec_min_erfc", d, n, delta).ec_min_erfc;
}

/// log(ec_min_erfc) = -log(n) - log(erfc(z)), always finite.
template <class Policy = default_policy>
double log_ec_min_erfc(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::log_ec_min_erfc", d, n, delta).log_ec_min_erfc;
}

/// ec_min_exp_bound = exp(delta^2 d / (2 - delta^2)) / n (eq. 9, final form); < ec_min_erfc (<= where z < 1e-16).
template <class Policy = default_policy>
double ec_min_exp_bound(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::ec_min_exp_bound", d, n, delta).ec_min_exp_bound;
}

/// log(ec_min_exp_bound) = delta^2 d / (2 - delta^2) - log(n), always finite.
template <class Policy = default_policy>
double log_ec_min_exp_bound(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  return detail::capacity_bound_checked<Policy>("locmoe::log_ec_min_exp_bound", d, n, delta).log_ec_min_exp_bound;
}

/// The smallest integer capacity that meets the bound: max(1, ceil(ec_min)). The paper's bound taken with
/// equality: a floor for the capacity under its assumptions, not a guarantee that no token is dropped.
/// Fallback (errno policy): -1; an ec_min beyond 2^62 is reported as errc::overflow.
template <class Policy = default_policy>
std::int64_t critical_capacity(std::int64_t d, std::int64_t n, double delta, const Policy& = Policy{}) {
  const double e = detail::capacity_bound_checked<Policy>("locmoe::critical_capacity", d, n, delta).ec_min;
  if (std::isnan(e)) return -1;  // already reported by capacity_bound_checked
  const double c = std::max(1.0, std::ceil(e));
  if (!(c <= 4611686018427387904.0)) {
    return detail::raise<Policy>(errc::overflow, "locmoe::critical_capacity", "delta", delta,
                                 "gives an ec_min above 2^62 for this d and n", std::int64_t{-1});
  }
  return static_cast<std::int64_t>(c);
}

/// Classic capacity (paper section 3.2): max(min_capacity, ceil(tokens * capacity_factor / (expert_parallel * n))).
///
/// capacity_factor is taken as the shortest decimal that round-trips to the given double (the number the
/// caller wrote) and the ceiling is computed in exact integer arithmetic, so (100, 1.1, 1, 10) gives 11, as
/// DeepSpeed and Megatron-Core do; evaluated in double, 100 * 1.1 / 10 = 11.000000000000002 would give 12.
/// tokens = 0 (an empty batch) gives min_capacity.
/// Preconditions: tokens >= 0, capacity_factor finite and > 0, expert_parallel >= 1, n >= 1, min_capacity >= 0;
/// the result must fit an int64 (errc::overflow otherwise). Fallback (errno policy): -1. Cost: O(1), a few
/// hundred nanoseconds (multi-precision integers).
template <class Policy = default_policy>
std::int64_t classic_capacity(std::int64_t tokens, double capacity_factor, std::int64_t expert_parallel,
                              std::int64_t n, std::int64_t min_capacity = 0, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::classic_capacity";
  if (tokens < 0) return detail::raise<Policy>(errc::domain, fn, "tokens", tokens, "must be >= 0", std::int64_t{-1});
  if (!(std::isfinite(capacity_factor) && capacity_factor > 0.0)) {
    return detail::raise<Policy>(errc::domain, fn, "capacity_factor", capacity_factor, "must be finite and > 0",
                                 std::int64_t{-1});
  }
  if (expert_parallel < 1) {
    return detail::raise<Policy>(errc::domain, fn, "expert_parallel", expert_parallel, "must be >= 1",
                                 std::int64_t{-1});
  }
  if (n < 1) return detail::raise<Policy>(errc::domain, fn, "n", n, "must be >= 1", std::int64_t{-1});
  if (min_capacity < 0) {
    return detail::raise<Policy>(errc::domain, fn, "min_capacity", min_capacity, "must be >= 0", std::int64_t{-1});
  }
  using boost::multiprecision::cpp_int;
  std::uint64_t digits = 0;
  int exponent = 0;
  detail::shortest_decimal(capacity_factor, digits, exponent);
  cpp_int numerator = cpp_int(tokens) * digits;
  cpp_int denominator = cpp_int(expert_parallel) * n;
  const cpp_int scale = boost::multiprecision::pow(cpp_int(10), static_cast<unsigned>(std::abs(exponent)));
  if (exponent >= 0) {
    numerator *= scale;
  } else {
    denominator *= scale;
  }
  const cpp_int capacity = (numerator + denominator - 1) / denominator;
  if (capacity > std::numeric_limits<std::int64_t>::max()) {
    return detail::raise<Policy>(errc::overflow, fn, "tokens", tokens,
                                 "tokens * capacity_factor / (expert_parallel * n) must fit an int64",
                                 std::int64_t{-1});
  }
  return std::max(capacity.convert_to<std::int64_t>(), min_capacity);
}

/// The largest delta for which `capacity` still meets the bound, i.e. ec_min(d, n, delta) <= capacity
/// (ec_min grows with delta). Solves p_delta = 1 / (n capacity) with Boost.Math's ibetac_inv; where
/// 1 / (n capacity) underflows a double, solves log_p_delta = -log(n capacity) with Boost's TOMS 748 root finder;
/// then searches the doubles around that root for the largest one at which ec_min (as computed here) is <= capacity.
/// Returns 0 where no delta in (0, 1) qualifies (n * capacity <= 1), and the largest double below 1 where the
/// answer rounds to 1 (small d with a huge capacity).
/// Preconditions: 2 <= d <= 2^53, n >= 1, capacity finite and > 0. Fallback (errno policy): NaN.
template <class Policy = default_policy>
double max_delta_for_capacity(std::int64_t d, std::int64_t n, double capacity, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::max_delta_for_capacity";
  double fallback = std::numeric_limits<double>::quiet_NaN();
  if (!detail::check_bound_args<Policy>(fn, d, n, 0.5, fallback)) return fallback;
  if (!(std::isfinite(capacity) && capacity > 0.0)) {
    return detail::raise<Policy>(errc::domain, fn, "capacity", capacity, "must be finite and > 0", fallback);
  }
  const detail::errno_guard keep_errno;
  const double log_target = -(std::log(static_cast<double>(n)) + std::log(capacity));  // log p_delta wanted
  if (!(log_target < 0.0)) return 0.0;
  const double below_one = std::nextafter(1.0, 0.0);
  typename Policy::boost_policy pol;
  const double a = 0.5 * static_cast<double>(d - 1);
  double delta = 0;
  if (log_target > std::log(detail::direct_floor)) {
    double one_minus_delta2 = 0;
    const double delta2 = boost::math::ibetac_inv(0.5, a, std::exp(log_target), &one_minus_delta2, pol);
    delta = std::min(std::sqrt(delta2), below_one);
  } else {
    auto gap = [&](double x) { return detail::log_ibetac_half(a, x, detail::ibetac_half(a, x, pol), pol) - log_target; };
    if (gap(below_one) >= 0.0) {
      delta = below_one;  // checked by the search below too: the logs and ec_min may round differently
    } else {
      std::uintmax_t iterations = 200;
      delta = boost::math::tools::toms748_solve(gap, 1e-300, below_one, boost::math::tools::eps_tolerance<double>(52),
                                                iterations, pol).first;
    }
  }
  if (!(delta > 0.0)) delta = 0.0;  // -0 from sqrt(-0), or NaN from a solver under a returning policy
  // The root is close to the true one but not exactly the largest double that meets the bound: where p_delta is
  // steep in delta (d = 3, n C = 1e9: one ulp of delta moves ec_min by 1e-7) the nearest double can land on the wrong
  // side, and where it is flat (delta near 0) many doubles give the same ec_min. Search the doubles themselves
  // (positive doubles order as their bit patterns): gallop from the root to a double on the other side, then bisect,
  // to the largest delta at which ec_min(d, n, delta), as this header evaluates it, is <= capacity (found by
  // tests/fuzz/fuzz_capacity.cpp). At most about 130 evaluations of the bound.
  const auto meets = [&](std::uint64_t bits) {
    double x = 0;
    std::memcpy(&x, &bits, sizeof x);
    return detail::capacity_bound_unchecked<Policy>(d, n, x).ec_min <= capacity;
  };
  std::uint64_t limit = 0, root = 0;
  std::memcpy(&limit, &below_one, sizeof limit);
  std::memcpy(&root, &delta, sizeof root);
  root = std::min(root, limit);
  std::uint64_t good = 0, bad = limit + 1;  // good: 0 (delta = 0, always meets); bad: past below_one
  if (meets(root)) {
    good = root;
    for (std::uint64_t step = 1; good < limit; step *= 2) {
      const std::uint64_t next = step <= limit - good ? good + step : limit;
      if (!meets(next)) {
        bad = next;
        break;
      }
      good = next;
    }
  } else {
    bad = root;
    for (std::uint64_t step = 1; bad > 1; step *= 2) {
      const std::uint64_t next = step < bad ? bad - step : 1;  // 1: the smallest positive double
      if (meets(next)) {
        good = next;
        break;
      }
      bad = next;
    }
  }
  while (bad - good > 1) {
    const std::uint64_t mid = good + (bad - good) / 2;
    (meets(mid) ? good : bad) = mid;
  }
  double result = 0;
  std::memcpy(&result, &good, sizeof result);
  return result;
}

/// The smallest capacity factor whose classic capacity reaches ec_min: the smallest double cf > 0 with
/// classic_capacity(tokens, cf, expert_parallel, n) >= ec_min (min_capacity not counted, so the answer says
/// what the factor alone must give). With m = max(1, ceil(ec_min)) that is the first double above
/// (m - 1) * expert_parallel * n / tokens, found by stepping one ulp at a time from there (a few steps); where
/// m = 1 every positive factor qualifies and the result is the smallest positive double.
/// Preconditions: tokens >= 1, expert_parallel >= 1, n >= 1, ec_min_value finite and > 0; errc::overflow if the
/// factor exceeds the largest double. Fallback (errno policy): NaN. Cost: a few classic_capacity calls.
template <class Policy = default_policy>
double min_capacity_factor(std::int64_t tokens, std::int64_t expert_parallel, std::int64_t n, double ec_min_value,
                           const Policy& pol = Policy{}) {
  constexpr const char* fn = "locmoe::min_capacity_factor";
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (tokens < 1) return detail::raise<Policy>(errc::domain, fn, "tokens", tokens, "must be >= 1", nan);
  if (expert_parallel < 1) {
    return detail::raise<Policy>(errc::domain, fn, "expert_parallel", expert_parallel, "must be >= 1", nan);
  }
  if (n < 1) return detail::raise<Policy>(errc::domain, fn, "n", n, "must be >= 1", nan);
  if (!(std::isfinite(ec_min_value) && ec_min_value > 0.0)) {
    return detail::raise<Policy>(errc::domain, fn, "ec_min", ec_min_value, "must be finite and > 0", nan);
  }
  const double slots = std::max(1.0, std::ceil(ec_min_value));
  const long double threshold = static_cast<long double>(slots - 1.0) * static_cast<long double>(expert_parallel) *
                                static_cast<long double>(n) / static_cast<long double>(tokens);
  if (!(threshold < static_cast<long double>(std::numeric_limits<double>::max()) / 2)) {
    return detail::raise<Policy>(errc::overflow, fn, "ec_min", ec_min_value,
                                 "needs a capacity factor beyond the range of a double", nan);
  }
  double cf = std::max(static_cast<double>(threshold) * (1 - 4 * std::numeric_limits<double>::epsilon()),
                       std::numeric_limits<double>::denorm_min());
  const auto reaches = [&](double factor) {
    return static_cast<double>(classic_capacity(tokens, factor, expert_parallel, n, 0, pol)) >= slots;
  };
  while (!reaches(cf)) cf = std::nextafter(cf, std::numeric_limits<double>::infinity());
  return cf;
}

/// The q-quantile of `cosines`, by linear interpolation between order statistics (Hyndman and Fan's type 7,
/// numpy's default): with the sorted values c_0 <= ... <= c_{m-1} and h = q (m - 1), the result is
/// c_floor(h) + (h - floor(h)) (c_floor(h)+1 - c_floor(h)).
///
/// This is how we turn data into the paper's delta (section 4.1 measured delta ~ 0.03 from the cosines of
/// tokens to the gate weight of their expert, Figure 9): the cosine below which only a fraction q of the
/// routed tokens fall. The default q = 0.05 keeps 95% of the tokens at or above delta (Assumption 3).
/// The result is in [-1, 1]; a value <= 0 means the data gives no usable delta, and the bound functions reject it.
/// Preconditions: at least one cosine, all finite and in [-1, 1] (up to 1e-6 of rounding), 0 <= q <= 1.
/// Fallback (errno policy): NaN. Cost: O(m) (std::nth_element on a copy).
template <class Policy = default_policy>
double empirical_delta(const Eigen::Ref<const Eigen::VectorXd>& cosines, double q = 0.05, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::empirical_delta";
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (!(q >= 0.0 && q <= 1.0)) return detail::raise<Policy>(errc::domain, fn, "q", q, "must satisfy 0 <= q <= 1", nan);
  if (cosines.size() == 0) {
    return detail::raise<Policy>(errc::domain, fn, "cosines", "empty", "must hold at least one value", nan);
  }
  for (Eigen::Index i = 0; i < cosines.size(); ++i) {
    if (!(std::abs(cosines[i]) <= 1.0 + 1e-6)) {  // also rejects NaN
      return detail::raise<Policy>(errc::domain, fn, "cosines", cosines[i], "every value must be finite and in [-1, 1]",
                                   nan);
    }
  }
  std::vector<double> values(cosines.data(), cosines.data() + cosines.size());
  const double h = q * static_cast<double>(values.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(h));
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(lo), values.end());
  const double below = values[lo];
  double q_value = below;
  if (lo + 1 < values.size()) {
    const double above = *std::min_element(values.begin() + static_cast<std::ptrdiff_t>(lo) + 1, values.end());
    q_value = below + (h - static_cast<double>(lo)) * (above - below);
  }
  return std::clamp(q_value, -1.0, 1.0);  // inputs may exceed 1 by rounding (up to 1e-6 is accepted)
}

/// Cosine of each token to the gate weight of the expert it was routed to: cos_t = x_t . w_{e_t} / (|x_t| |w_{e_t}|).
/// Tokens routed nowhere (expert < 0, the dropped-token sentinel) and tokens or weights of zero norm
/// (no angle) are left out; the result holds the cosines of the others, in token order.
/// Preconditions: x is [T x d], w is [n x d], expert has T entries each < n; x and w finite.
/// Fallback (errno policy): an empty vector. Cost: O(T d).
template <class Policy = default_policy, class DerivedX, class DerivedW>
Eigen::VectorXd routed_cosines(const Eigen::MatrixBase<DerivedX>& x, const Eigen::MatrixBase<DerivedW>& w,
                               const Eigen::Ref<const Eigen::VectorXi>& expert, const Policy& = Policy{}) {
  constexpr const char* fn = "locmoe::routed_cosines";
  const Eigen::VectorXd none;
  if (x.cols() != w.cols()) {
    return detail::raise<Policy>(errc::domain, fn, "w", w.cols(), "must have as many columns (d) as x", none);
  }
  if (expert.size() != x.rows()) {
    return detail::raise<Policy>(errc::domain, fn, "expert", expert.size(), "must have one entry per row of x", none);
  }
  if (!x.allFinite()) return detail::raise<Policy>(errc::domain, fn, "x", "NaN or Inf", "must be finite", none);
  if (!w.allFinite()) return detail::raise<Policy>(errc::domain, fn, "w", "NaN or Inf", "must be finite", none);
  Eigen::VectorXd out(x.rows());
  Eigen::Index m = 0;
  for (Eigen::Index t = 0; t < x.rows(); ++t) {
    const int e = expert[t];
    if (e >= w.rows()) {
      return detail::raise<Policy>(errc::domain, fn, "expert", e, "every entry must be < n (the rows of w)", none);
    }
    if (e < 0) continue;
    const Eigen::RowVectorXd xt = x.row(t).template cast<double>();
    const Eigen::RowVectorXd we = w.row(e).template cast<double>();
    const double x_norm = xt.stableNorm();  // no overflow at 1e200 nor underflow at 1e-200
    const double w_norm = we.stableNorm();
    if (x_norm > 0.0 && w_norm > 0.0) out[m++] = std::clamp((xt / x_norm).dot(we / w_norm), -1.0, 1.0);
  }
  out.conservativeResize(m);
  return out;
}

}  // namespace locmoe
