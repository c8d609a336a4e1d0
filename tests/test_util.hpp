// Helpers shared by the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

namespace locmoe_test {

/// |got - want| / |want|, with an absolute check where want is 0; NaN and Inf only match themselves.
inline double relative_error(double got, double want) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got) ? 0.0 : INFINITY;
  if (std::isinf(want) || std::isinf(got)) return got == want ? 0.0 : INFINITY;
  if (want == 0.0) return std::abs(got);
  return std::abs(got - want) / std::abs(want);
}

}  // namespace locmoe_test
