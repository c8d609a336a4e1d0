// Helpers shared by the tests.
#pragma once

#include <locmoe/error.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

namespace locmoe_test {

/// The argument a locmoe::error from f() names, "<no error>" if f returns, "<other exception>" for anything else.
template <class F>
std::string error_argument(F&& f) {
  try {
    f();
  } catch (const locmoe::error& e) {
    return e.argument();
  } catch (...) {
    return "<other exception>";
  }
  return "<no error>";
}

/// How many representable values lie between a and b (0: the same value; NaN only matches NaN, else the maximum).
template <class S>
std::uint64_t ulp_distance(S a, S b) {
  static_assert(std::is_floating_point_v<S>);
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0 : std::numeric_limits<std::uint64_t>::max();
  using bits_t = std::conditional_t<sizeof(S) == 4, std::int32_t, std::int64_t>;
  const auto ordered = [](S v) {  // a monotone map of the floats onto the integers (-0 and +0 both map to 0)
    bits_t i;
    std::memcpy(&i, &v, sizeof v);
    return i < 0 ? static_cast<std::int64_t>(std::numeric_limits<bits_t>::min()) - static_cast<std::int64_t>(i)
                 : static_cast<std::int64_t>(i);
  };
  const auto x = static_cast<std::uint64_t>(ordered(a)), y = static_cast<std::uint64_t>(ordered(b));  // no signed overflow
  return ordered(a) > ordered(b) ? x - y : y - x;
}

/// |got - want| / |want|, with an absolute check where want is 0; NaN and Inf only match themselves.
inline double relative_error(double got, double want) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got) ? 0.0 : INFINITY;
  if (std::isinf(want) || std::isinf(got)) return got == want ? 0.0 : INFINITY;
  if (want == 0.0) return std::abs(got);
  return std::abs(got - want) / std::abs(want);
}

}  // namespace locmoe_test
