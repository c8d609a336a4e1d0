// locmoe/error.hpp - how locmoe reports bad input: one contract for every public entry point.
//
// Functions that compute a value (gating, selection, routers, route_backward, losses, capacity) take a Policy (a
// type, defaulted to locmoe::default_policy), modelled on Boost.Math's error policies, that decides what happens when
// an argument breaks a rule:
//
//   throw_on_error  throws locmoe::error, which names the function, the argument and the rule (default).
//   errno_on_error  sets errno (EDOM for a bad argument, ERANGE for a size that overflows) and returns the
//                   function's documented fallback: NaN for real results, false for bool, -1 for int64 capacities,
//                   and for the functions that count tokens (selection, routers, route_backward) a checked_count
//                   whose ok() is false. A count is returned as a plain std::size_t only under a policy that never
//                   returns from an error (throw_on_error), so a failure cannot be read as a count.
//
// Functions and constructors that build or fill objects (topology, capacity_assigner, dispatch and exchange plans,
// expert_parallel maps, the backends, grap_pipeline, moe_router, thread_pool) have no value to fall back on, so they
// report through construction_policy: throw_on_error where exceptions are enabled, abort_on_error (the same message on
// stderr, then std::abort) where they are not.
//
// A user policy is any type with the same static `report` member template (Result is the function's result type,
// fallback included), a `boost_policy` type (Boost.Math's policy for the special functions), and
// `static constexpr bool never_returns = true` only if report never returns (a policy derived from throw_on_error
// inherits it: redefine it as false if its report returns, or a failure reads as a count of SIZE_MAX).
// The default is LOCMOE_DEFAULT_POLICY: throw_on_error where exceptions are enabled, errno_on_error where not, so every
// host header compiles with -fno-exceptions (tests/consumer/no_exceptions.cpp; backend/cuda.cuh needs exceptions).
// Every translation unit of a program must agree on LOCMOE_HAS_EXCEPTIONS and LOCMOE_DEFAULT_POLICY: inline
// functions differ with them (mixing would break the one-definition rule).
// Other fallbacks under errno_on_error: an empty vector (balanced_hash_table, routed_cosines) and NaN loss values.
// Thread safety: the policies keep no state (errno is per thread).
//
// Example (docs/api.md#errors):
//   try { locmoe::p_delta(1, 0.5); }
//   catch (const locmoe::error& e) { e.argument(); /* "d" */ e.what(); /* "locmoe::p_delta: d = 1: ..." */ }
#pragma once

#include <locmoe/config.hpp>

#include <cerrno>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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
  static constexpr bool never_returns = true;
  using boost_policy = boost::math::policies::policy<>;
  template <class Result>
  [[noreturn]] static Result report(const error_report& r, Result /*fallback*/) {
#if LOCMOE_HAS_EXCEPTIONS
    throw error(r);
#else
    static_cast<void>(r);
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

/// Policy: print the message on stderr and abort. construction_policy where exceptions are disabled.
struct abort_on_error {
  static constexpr bool never_returns = true;
  using boost_policy = errno_on_error::boost_policy;  // Boost.Math must not throw either
  template <class Result>
  [[noreturn]] static Result report(const error_report& r, Result /*fallback*/) {
    std::fprintf(stderr, "locmoe: %s\n", r.message().c_str());
    std::abort();
  }
};

/// How functions that build objects report a broken rule (see the header comment).
#if LOCMOE_HAS_EXCEPTIONS
using construction_policy = throw_on_error;
#else
using construction_policy = abort_on_error;
#endif

/// The result of a function that counts tokens, under a policy that may return from an error: the count, or a
/// failure. It converts from a count, and never to a number: read it with ok() and value().
class checked_count {
 public:
  constexpr checked_count(std::size_t count) noexcept : count_(count), ok_(true) {}  // NOLINT: a count is a result
  static constexpr checked_count failure() noexcept {
    checked_count c(0);
    c.ok_ = false;
    return c;
  }
  constexpr bool ok() const noexcept { return ok_; }
  /// The count; precondition ok() (a failure gives 0 here).
  constexpr std::size_t value() const noexcept { return count_; }
  constexpr std::size_t value_or(std::size_t fallback) const noexcept { return ok_ ? count_ : fallback; }
  friend constexpr bool operator==(checked_count a, checked_count b) noexcept {
    return a.ok_ == b.ok_ && (!a.ok_ || a.count_ == b.count_);
  }
  friend constexpr bool operator!=(checked_count a, checked_count b) noexcept { return !(a == b); }

 private:
  std::size_t count_;
  bool ok_;
};

namespace detail {
template <class Policy, class = void>
struct never_returns : std::false_type {};
template <class Policy>
struct never_returns<Policy, std::enable_if_t<Policy::never_returns>> : std::true_type {};
}  // namespace detail

/// What a counting function returns under Policy: std::size_t if the policy never returns from an error, else
/// checked_count.
template <class Policy>
using count_result = std::conditional_t<detail::never_returns<Policy>::value, std::size_t, checked_count>;

namespace detail {
/// The failure value of a counting function, whatever its count_result.
struct failed_t {
  constexpr operator std::size_t() const noexcept { return static_cast<std::size_t>(-1); }  // unreachable: see error.hpp
  constexpr operator checked_count() const noexcept { return checked_count::failure(); }
};
inline constexpr failed_t failed{};
}  // namespace detail

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
