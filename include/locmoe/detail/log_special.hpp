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

/// Terms of the Didonato-Morris continued fraction (ACM TOMS 708, 1992):
/// I_x(a,b) = x^a y^b / B(a,b) / (b0 + a1/(b1 + a2/(b2 + ...))), y = 1 - x passed separately, so nothing
/// cancels when x is close to 1 (the DLMF 8.17.22 form loses eps/y there).
class ibeta_fraction_terms {
 public:
  using result_type = std::pair<double, double>;
  ibeta_fraction_terms(double a, double b, double x, double y) : a_(a), b_(b), x_(x), y_(y) {}
  std::pair<double, double> operator()() {
    const double m = static_cast<double>(m_++);
    const double denom = a_ + 2 * m - 1;
    const double a_m = (a_ + m - 1) * (a_ + b_ + m - 1) * m * (b_ - m) * x_ * x_ / (denom * denom);
    const double b_m = m + m * (b_ - m) * x_ / (a_ + 2 * m - 1) +
                       (a_ + m) * (a_ * y_ - b_ * x_ + 1 + m * (2 - x_)) / (a_ + 2 * m + 1);
    return {a_m, b_m};
  }

 private:
  double a_, b_, x_, y_;
  std::int64_t m_ = 0;
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

/// log(erfc(z)) for z >= 0, to full relative accuracy: log1p(-erf(z)) where erfc(z) is close to 1, Boost's
/// erfc in between, and where erfc(z) underflows (z > ~26.5) the continued fraction of DLMF 7.9.2.
template <class BoostPolicy>
double log_erfc(double z, const BoostPolicy& pol) {
  const double direct = boost::math::erfc(z, pol);
  if (direct > 0.5) return std::log1p(-boost::math::erf(z, pol));
  if (direct >= direct_floor) return std::log(direct);
  const double fraction = evaluate_fraction(erfc_fraction_terms(z));
  return -z * z - 0.5 * std::log(boost::math::constants::pi<double>()) - std::log(fraction);
}

/// log B(a, 1/2) = log Gamma(1/2) + log(Gamma(a) / Gamma(a + 1/2)), the ratio taken whole (Boost's
/// tgamma_delta_ratio) so that two huge lgamma values never cancel.
template <class BoostPolicy>
double log_beta_half(double a, const BoostPolicy& pol) {
  return 0.5 * std::log(boost::math::constants::pi<double>()) + std::log(boost::math::tgamma_delta_ratio(a, 0.5, pol));
}

/// Below this delta, delta^2 underflows or loses digits; I_{delta^2}(1/2, a) = 2 delta / B(1/2, a) (1 + O(delta^2)).
inline constexpr double tiny_delta = 1e-150;

/// log(1 - delta^2) without cancellation for any 0 < delta < 1.
inline double log_one_minus_square(double delta) {
  return delta * delta <= 0.5 ? std::log1p(-delta * delta) : std::log1p(-delta) + std::log1p(delta);
}

/// p = 1 - I_{delta^2}(1/2, a) = I_{1-delta^2}(a, 1/2) for a >= 1/2 and 0 < delta < 1, always in a complement
/// form (1 - I loses everything once p is small). For delta^2 > 1/2 the argument 1 - delta^2 is formed as
/// (1 - delta)(1 + delta), exact to an ulp, since delta^2 itself would round away the digits of a small 1 - delta^2.
template <class BoostPolicy>
double ibetac_half(double a, double delta, const BoostPolicy& pol) {
  if (delta < tiny_delta) return 1.0 - 2.0 * delta * std::exp(-log_beta_half(a, pol));
  const double delta2 = delta * delta;
  if (delta2 <= 0.5) return boost::math::ibetac(0.5, a, delta2, pol);
  return boost::math::ibeta(a, 0.5, (1.0 - delta) * (1.0 + delta), pol);
}

/// log(p) for p = ibetac_half(a, delta) (passed in, so that it is evaluated once), to full relative accuracy,
/// also where p underflows a double.
template <class BoostPolicy>
double log_ibetac_half(double a, double delta, double p, const BoostPolicy& pol) {
  if (delta < tiny_delta) return std::log1p(-2.0 * delta * std::exp(-log_beta_half(a, pol)));
  if (p > 0.5) return std::log1p(-boost::math::ibeta(0.5, a, delta * delta, pol));
  const double y = delta * delta;
  const double x = (1.0 - delta) * (1.0 + delta);
  if (p >= direct_floor || !(x < (a + 1.0) / (a + 2.5))) return std::log(p);
  // Underflow region: log of x^a y^{1/2} / B(a, 1/2) / fraction.
  const double log_prefix = a * log_one_minus_square(delta) + std::log(delta) - log_beta_half(a, pol);
  return log_prefix - std::log(evaluate_fraction(ibeta_fraction_terms(a, 0.5, x, y)));
}

}  // namespace locmoe::detail
