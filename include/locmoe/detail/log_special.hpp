// locmoe/detail/log_special.hpp - logarithms of special functions where the value underflows a double.
//
// Boost.Math gives I_x(a, b) and erfc(z) to full relative accuracy down to the smallest normal double,
// but no logarithm of either. Below that we evaluate the logarithm from the continued fractions of DLMF,
// summed by Boost's modified-Lentz evaluator (boost::math::tools::continued_fraction_b).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>

#include <boost/math/constants/constants.hpp>
#include <boost/math/special_functions/beta.hpp>
#include <boost/math/special_functions/erf.hpp>
#include <boost/math/special_functions/gamma.hpp>
#include <boost/math/tools/fraction.hpp>

namespace locmoe::detail {

/// Smallest value we trust from a direct evaluation before switching to a log-space form.
inline constexpr double direct_floor = 1e-290;

/// Bound on continued-fraction terms. Both fractions are used only where they converge geometrically
/// (erfc for z > 26, the beta fraction for x < (a+1)/(a+b+2)); the cap only guards against a hang.
inline constexpr std::uintmax_t max_fraction_terms = 10'000'000;

template <class Terms>
double evaluate_fraction(Terms terms) {
  std::uintmax_t max_terms = max_fraction_terms;
  return boost::math::tools::continued_fraction_b(terms, std::numeric_limits<double>::epsilon(), max_terms);
}

/// Terms of DLMF 8.17.22: I_x(a,b) = x^a (1-x)^b / (a B(a,b)) / (1 + d1/(1 + d2/(1 + ...))).
class ibeta_fraction_terms {
 public:
  using result_type = std::pair<double, double>;
  ibeta_fraction_terms(double a, double b, double x) : a_(a), b_(b), x_(x) {}
  std::pair<double, double> operator()() {
    const std::int64_t k = k_++;
    if (k == 0) return {0.0, 1.0};  // b0 = 1 (its numerator is ignored by continued_fraction_b)
    const double m = static_cast<double>(k / 2);
    double d;
    if (k % 2 == 1) {  // d_{2m+1}
      d = -(a_ + m) * (a_ + b_ + m) * x_ / ((a_ + 2 * m) * (a_ + 2 * m + 1));
    } else {  // d_{2m}
      d = m * (b_ - m) * x_ / ((a_ + 2 * m - 1) * (a_ + 2 * m));
    }
    return {d, 1.0};
  }

 private:
  double a_, b_, x_;
  std::int64_t k_ = 0;
};

/// Terms of DLMF 7.9.2: sqrt(pi) e^{z^2} erfc(z) = 1/(z + (1/2)/(z + 1/(z + (3/2)/(z + ...)))).
class erfc_fraction_terms {
 public:
  using result_type = std::pair<double, double>;
  explicit erfc_fraction_terms(double z) : z_(z) {}
  std::pair<double, double> operator()() {
    const std::int64_t k = k_++;
    return {0.5 * static_cast<double>(k), z_};
  }

 private:
  double z_;
  std::int64_t k_ = 0;
};

/// log(erfc(z)) for z >= 0, to full relative accuracy, also where erfc(z) underflows (z > ~26.5).
template <class BoostPolicy>
double log_erfc(double z, const BoostPolicy& pol) {
  const double direct = boost::math::erfc(z, pol);
  if (direct >= direct_floor) return std::log(direct);
  const double fraction = evaluate_fraction(erfc_fraction_terms(z));
  return -z * z - 0.5 * std::log(boost::math::constants::pi<double>()) - std::log(fraction);
}

/// p = 1 - I_{delta^2}(1/2, a) = I_{1-delta^2}(a, 1/2) for a >= 1/2 and 0 < delta < 1, always in a complement
/// form (1 - I loses everything once p is small). For delta^2 > 1/2 the argument 1 - delta^2 is formed as
/// (1 - delta)(1 + delta), exact to an ulp, since delta^2 itself would round away the digits of a small 1 - delta^2.
template <class BoostPolicy>
double ibetac_half(double a, double delta, const BoostPolicy& pol) {
  const double delta2 = delta * delta;
  if (delta2 <= 0.5) return boost::math::ibetac(0.5, a, delta2, pol);
  return boost::math::ibeta(a, 0.5, (1.0 - delta) * (1.0 + delta), pol);
}

/// log(p) for p = ibetac_half(a, delta) (passed in, so that it is evaluated once), to full relative accuracy,
/// also where p underflows a double.
template <class BoostPolicy>
double log_ibetac_half(double a, double delta, double p, const BoostPolicy& pol) {
  if (p > 0.5) return std::log1p(-boost::math::ibeta(0.5, a, delta * delta, pol));
  const double x = (1.0 - delta) * (1.0 + delta);
  if (p >= direct_floor || !(x < (a + 1.0) / (a + 2.5))) return std::log(p);
  // Underflow region: x^a (1-x)^{1/2} / (a B(a, 1/2)) / fraction, all in logs.
  // B(a, 1/2) = Gamma(1/2) * Gamma(a) / Gamma(a + 1/2); the ratio is taken whole to avoid cancellation.
  const double log_beta = 0.5 * std::log(boost::math::constants::pi<double>()) +
                          std::log(boost::math::tgamma_delta_ratio(a, 0.5, pol));
  const double log_x = std::log1p(-delta) + std::log1p(delta);
  const double log_prefix = a * log_x + std::log(delta) - std::log(a) - log_beta;
  const double fraction = evaluate_fraction(ibeta_fraction_terms(a, 0.5, x));
  return log_prefix - std::log(fraction);
}

}  // namespace locmoe::detail
