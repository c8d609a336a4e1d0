// locmoe/error.hpp - how locmoe reports bad input.
//
// Modelled on Boost.Math's error policies: every checked function takes a Policy (a type, defaulted to
// locmoe::default_policy) that decides what happens when an argument breaks a rule.
//
//   throw_on_error  throws locmoe::error, which names the function, the argument and the rule (default).
//   errno_on_error  sets errno (EDOM for a bad argument, ERANGE for a size that overflows) and returns the
//                   function's documented fallback (NaN for real results, -1 for sizes and counts).
//
// A user policy is any type with the same static `report` member. The default is LOCMOE_DEFAULT_POLICY,
// which is throw_on_error where exceptions are enabled and errno_on_error where they are not.
//
// Thread safety: the policies keep no state (errno is per thread).
//
// Example (docs/api.md#errors):
//   try { locmoe::p_delta(1, 0.5); }
//   catch (const locmoe::error& e) { e.argument(); /* "d" */ e.what(); /* "locmoe::p_delta: d = 1: ..." */ }
#pragma once

#include <locmoe/config.hpp>

#include <cerrno>
#include <charconv>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <boost/math/policies/policy.hpp>

namespace locmoe {

/// What kind of rule an argument broke.
enum class errc : int {
  domain = 1,  ///< a value outside the function's domain (delta outside (0, 1), n < 1, NaN, ...)
  overflow,    ///< a size or result that does not fit the result type
};

/// A description of one broken rule, handed to the policy.
struct error_report {
  errc code;
  const char* function;  ///< "locmoe::p_delta"
  const char* argument;  ///< "delta"
  std::string value;     ///< the offending value, as text
  const char* rule;      ///< "must satisfy 0 < delta < 1"

  std::string message() const {
    std::string m = function;
    m += ": ";
    m += argument;
    if (!value.empty()) {
      m += " = ";
      m += value;
    }
    m += ": ";
    m += rule;
    return m;
  }
};

/// The exception thrown by throw_on_error. Derives from std::invalid_argument so that generic handlers
/// catch it; argument() names the parameter as it is spelled in the function's declaration.
class error : public std::invalid_argument {
 public:
  explicit error(const error_report& r)
      : std::invalid_argument(r.message()), code_(r.code), function_(r.function), argument_(r.argument) {}
  errc code() const noexcept { return code_; }
  const std::string& function() const noexcept { return function_; }
  const std::string& argument() const noexcept { return argument_; }

 private:
  errc code_;
  std::string function_;
  std::string argument_;
};

/// Policy: throw locmoe::error.
struct throw_on_error {
  using boost_policy = boost::math::policies::policy<>;
  template <class Result>
  [[noreturn]] static Result report(const error_report& r, Result /*fallback*/) {
#if LOCMOE_HAS_EXCEPTIONS
    throw error(r);
#else
    static_assert(sizeof(Result) == 0, "locmoe::throw_on_error needs exceptions; use errno_on_error");
#endif
  }
};

/// Policy: set errno and return the documented fallback value.
struct errno_on_error {
  using boost_policy = boost::math::policies::policy<
      boost::math::policies::domain_error<boost::math::policies::errno_on_error>,
      boost::math::policies::pole_error<boost::math::policies::errno_on_error>,
      boost::math::policies::overflow_error<boost::math::policies::errno_on_error>,
      boost::math::policies::evaluation_error<boost::math::policies::errno_on_error>,
      boost::math::policies::rounding_error<boost::math::policies::errno_on_error>>;
  template <class Result>
  static Result report(const error_report& r, Result fallback) {
    errno = r.code == errc::overflow ? ERANGE : EDOM;
    return fallback;
  }
};

#ifndef LOCMOE_DEFAULT_POLICY
#  if LOCMOE_HAS_EXCEPTIONS
#    define LOCMOE_DEFAULT_POLICY ::locmoe::throw_on_error
#  else
#    define LOCMOE_DEFAULT_POLICY ::locmoe::errno_on_error
#  endif
#endif

using default_policy = LOCMOE_DEFAULT_POLICY;

namespace detail {

/// A value as the user would write it: the shortest decimal that round-trips, for reals.
template <class T>
std::string to_text(const T& value) {
  if constexpr (std::is_convertible_v<T, std::string>) {
    return std::string(value);
  } else if constexpr (std::is_floating_point_v<T>) {
    char buffer[64];
    const auto r = std::to_chars(buffer, buffer + sizeof buffer, value);
    return std::string(buffer, r.ptr);
  } else {
    std::ostringstream s;
    s << value;
    return s.str();
  }
}

/// Keeps errno as the caller left it across a computation whose internals (exp, Boost with an errno
/// policy) may set ERANGE on an intermediate underflow: only a broken rule, through the policy, sets errno.
class errno_guard {
 public:
  errno_guard() noexcept : saved_(errno) {}
  ~errno_guard() { errno = saved_; }
  errno_guard(const errno_guard&) = delete;
  errno_guard& operator=(const errno_guard&) = delete;

 private:
  int saved_;
};

/// Report a broken rule through Policy; returns the policy's fallback (never returns for throw_on_error).
template <class Policy, class Result, class Value>
Result raise(errc code, const char* function, const char* argument, const Value& value, const char* rule,
             Result fallback) {
  return Policy::report(error_report{code, function, argument, to_text(value), rule}, fallback);
}

}  // namespace detail
}  // namespace locmoe
