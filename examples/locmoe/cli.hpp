// Shared pieces of the locmoe tool's subcommands.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <stdexcept>
#include <string>

#include <locmoe/error.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

namespace locmoe::cli {

/// A usage error the tool reports as one line on stderr with exit status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// Map a library argument name (locmoe::error::argument()) to the flag the user typed.
using flag_names = std::map<std::string, std::string>;

/// A value for JSON: null where it is not a finite, normal double (its log is written beside it).
/// With log_value given, a value whose true size is below the smallest normal double (an underflow to 0 or
/// a subnormal) is null too.
inline nlohmann::ordered_json number_or_null(double value,
                                             double log_value = -std::numeric_limits<double>::infinity()) {
  if (!std::isfinite(value)) return nullptr;
  if (value != 0.0 && std::abs(value) < std::numeric_limits<double>::min()) return nullptr;
  if (log_value < 0.0 && std::isfinite(log_value) && log_value < std::log(std::numeric_limits<double>::min())) {
    return nullptr;
  }
  return value;
}

/// An integer flag read as text and parsed strictly (CLI11 2.1 clamps out-of-range integers to the type's
/// limits, which would silently change what the user asked for).
inline CLI::Option* add_integer_option(CLI::App& app, const std::string& flag, std::int64_t& target,
                                       const std::string& help) {
  return app
      .add_option_function<std::string>(
          flag,
          [flag, &target](const std::string& text) {
            std::int64_t value = 0;
            const auto r = std::from_chars(text.data(), text.data() + text.size(), value);
            if (r.ec == std::errc::result_out_of_range) throw usage_error(flag + " = " + text + ": does not fit a 64-bit integer");
            if (r.ec != std::errc() || r.ptr != text.data() + text.size()) {
              throw usage_error(flag + " = " + text + ": must be an integer");
            }
            target = value;
          },
          help)
      ->default_str(std::to_string(target));
}

/// Run `compute`, turning a locmoe::error into a usage error that names the user's flag.
template <class Compute>
auto checked(const flag_names& flags, Compute compute) {
  try {
    return compute();
  } catch (const locmoe::error& e) {
    std::string message = e.what();
    const auto flag = flags.find(e.argument());
    if (flag != flags.end()) {
      const std::string prefix = e.function() + ": " + e.argument();
      if (message.rfind(prefix, 0) == 0) message = flag->second + message.substr(prefix.size());
    }
    throw usage_error(message);
  }
}

/// Subcommands: each registers itself on the app and returns the function that runs it.
void add_capacity_commands(CLI::App& app);
void add_route_command(CLI::App& app);
void add_simulate_command(CLI::App& app);

}  // namespace locmoe::cli
