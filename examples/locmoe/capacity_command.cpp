// `locmoe capacity` and `locmoe capacity-curve`: the critical expert capacity (paper Theorem 1, eq. 8-9).
#include "cli.hpp"

#include <locmoe/capacity.hpp>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace locmoe::cli {
namespace {

constexpr double pi = 3.14159265358979323846;

double degrees_of(double delta) { return std::acos(delta) * 180.0 / pi; }

struct capacity_options {
  std::int64_t hidden = 5120;  // PanGu-Sigma, the paper's configuration
  std::int64_t experts = 16;
  double delta = 0.03;  // measured in the paper, section 4.1
  std::int64_t tokens = 0;
  bool has_tokens = false;
  std::optional<double> capacity_factor;
  std::int64_t expert_parallel = 1;
  std::int64_t min_capacity = 0;
  bool json = false;
};

const flag_names capacity_flags = {
    {"d", "--hidden"},
    {"n", "--experts"},
    {"delta", "--delta"},
    {"tokens", "--tokens"},
    {"capacity_factor", "--capacity-factor"},
    {"expert_parallel", "--expert-parallel"},
    {"min_capacity", "--min-capacity"},
};

std::string format(const char* spec, double value) {
  char buffer[64];
  std::snprintf(buffer, sizeof buffer, spec, value);
  return buffer;
}

/// A value for the table: the number, or "inf"/"0 (underflow)" with the log beside it telling the size.
std::string table_value(double value, double log_value) {
  const auto shown = number_or_null(value, log_value);
  if (shown.is_null()) return std::isinf(value) ? "overflow" : "underflow";
  return format("%.10g", value);
}

void run_capacity(const capacity_options& o) {
  const auto bound = checked(capacity_flags, [&] { return critical_capacity_bound(o.hidden, o.experts, o.delta); });
  // The critical capacity as an integer exists only while ec_min fits one; beyond, the logs tell the size.
  constexpr double max_critical = 4611686018427387904.0;  // 2^62, as critical_capacity
  const bool has_critical = bound.ec_min <= max_critical;
  const std::int64_t critical = has_critical ? critical_capacity(o.hidden, o.experts, o.delta) : -1;

  nlohmann::ordered_json out;
  out["hidden"] = bound.hidden;
  out["experts"] = bound.experts;
  out["delta"] = bound.delta;
  out["theta_degrees"] = degrees_of(bound.delta);
  out["p_delta"] = number_or_null(bound.p_delta, bound.log_p_delta);
  out["ec_min"] = number_or_null(bound.ec_min, bound.log_ec_min);
  out["ec_min_erfc"] = number_or_null(bound.ec_min_erfc, bound.log_ec_min_erfc);
  out["ec_min_exp_bound"] = number_or_null(bound.ec_min_exp_bound, bound.log_ec_min_exp_bound);
  out["log_p_delta"] = bound.log_p_delta;
  out["log_ec_min"] = bound.log_ec_min;
  out["log_ec_min_erfc"] = bound.log_ec_min_erfc;
  out["log_ec_min_exp_bound"] = bound.log_ec_min_exp_bound;
  out["critical_capacity"] = has_critical ? nlohmann::ordered_json(critical) : nlohmann::ordered_json(nullptr);

  // --expert-parallel and --min-capacity are checked even without --tokens, by the library's own rules.
  checked(capacity_flags, [&] { return classic_capacity(0, 1.0, o.expert_parallel, o.experts, o.min_capacity); });
  if (o.capacity_factor && !o.has_tokens) throw usage_error("--capacity-factor: needs --tokens");
  if (o.has_tokens) {
    if (o.tokens < 1) throw usage_error("--tokens = " + std::to_string(o.tokens) + ": must be >= 1");
    out["tokens"] = o.tokens;
    out["expert_parallel"] = o.expert_parallel;
    out["min_capacity"] = o.min_capacity;
    if (o.capacity_factor) {
      const std::int64_t capacity = checked(capacity_flags, [&] {
        return classic_capacity(o.tokens, *o.capacity_factor, o.expert_parallel, o.experts, o.min_capacity);
      });
      out["capacity_factor"] = *o.capacity_factor;
      out["capacity"] = capacity;
      out["capacity_meets_bound"] = static_cast<double>(capacity) >= bound.ec_min;
      out["max_delta_for_capacity"] =
          checked(capacity_flags, [&] { return max_delta_for_capacity(o.hidden, o.experts, static_cast<double>(capacity)); });
    }
    // null where ec_min, or the factor it needs, is beyond the range of a double (the logs say how far).
    const errno_on_error quiet;
    const double factor = std::isfinite(bound.ec_min)
                              ? min_capacity_factor(o.tokens, o.expert_parallel, o.experts, bound.ec_min, quiet)
                              : std::numeric_limits<double>::quiet_NaN();
    out["min_capacity_factor"] = number_or_null(factor);
  }

  if (o.json) {
    std::cout << out.dump(2) << '\n';
    return;
  }
  std::ostringstream t;
  t << "Critical expert capacity (LocMoE, arXiv 2401.13920, Theorem 1)\n"
    << "  hidden size d      " << bound.hidden << "\n"
    << "  experts n          " << bound.experts << "\n"
    << "  delta = cos(theta) " << format("%.10g", bound.delta) << "  (theta = " << format("%.4f", degrees_of(bound.delta))
    << " degrees)\n\n"
    << "  quantity                      value             natural log\n";
  auto row = [&](const char* name, double value, double log_value) {
    char line[160];
    std::snprintf(line, sizeof line, "  %-28s  %-16s  %.10g\n", name, table_value(value, log_value).c_str(), log_value);
    t << line;
  };
  row("p_delta           (eq. 8)", bound.p_delta, bound.log_p_delta);
  row("ec_min            (eq. 9)", bound.ec_min, bound.log_ec_min);
  row("ec_min_erfc       (eq. 9)", bound.ec_min_erfc, bound.log_ec_min_erfc);
  row("ec_min_exp_bound  (eq. 9)", bound.ec_min_exp_bound, bound.log_ec_min_exp_bound);
  t << "\n  critical capacity  " << (has_critical ? std::to_string(critical) : std::string("beyond 2^62"))
    << " tokens per expert (max(1, ceil(ec_min)))\n";
  if (o.has_tokens) {
    t << "\n  tokens " << o.tokens << ", expert parallel " << o.expert_parallel << ", min capacity " << o.min_capacity
      << "\n";
    if (o.capacity_factor) {
      t << "  classic capacity   " << out["capacity"].get<std::int64_t>() << " = max(min, ceil(T * "
        << format("%.10g", *o.capacity_factor) << " / (ep * n)))  "
        << (out["capacity_meets_bound"].get<bool>() ? "meets" : "does NOT meet") << " ec_min\n"
        << "  largest delta this capacity still meets: " << format("%.10g", out["max_delta_for_capacity"].get<double>())
        << "\n";
    }
    t << "  smallest capacity factor that meets ec_min: "
      << (out["min_capacity_factor"].is_null() ? std::string("beyond the range of a double")
                                               : format("%.17g", out["min_capacity_factor"].get<double>()))
      << "\n";
  }
  std::cout << t.str();
}

struct curve_options {
  std::vector<std::int64_t> hidden{128, 1024, 5120, 12288};
  std::int64_t experts = 16;
  double angle_min = 60.0;
  double angle_max = 89.9;
  int points = 300;
};

void run_curve(const curve_options& o) {
  if (!(o.angle_min > 0.0 && o.angle_min < o.angle_max && o.angle_max < 90.0)) {
    throw usage_error("--angle-min/--angle-max: must satisfy 0 < angle-min < angle-max < 90 (degrees)");
  }
  if (o.points < 2) throw usage_error("--points = " + std::to_string(o.points) + ": must be >= 2");
  const flag_names flags = {{"d", "--hidden"}, {"n", "--experts"}, {"delta", "--angle-min/--angle-max"}};
  std::ostringstream csv;
  csv << "hidden,experts,theta_degrees,delta,p_delta,ec_min,ec_min_erfc,ec_min_exp_bound,"
         "log_p_delta,log_ec_min,log_ec_min_erfc,log_ec_min_exp_bound\n";
  csv.precision(17);
  auto cell = [](double v, double log_v) {
    const auto j = number_or_null(v, log_v);
    return j.is_null() ? std::string() : format("%.17g", v);
  };
  for (const std::int64_t d : o.hidden) {
    for (int i = 0; i < o.points; ++i) {
      const double theta = o.angle_min + (o.angle_max - o.angle_min) * i / (o.points - 1);
      const double delta = std::cos(theta * pi / 180.0);
      const auto b = checked(flags, [&] { return critical_capacity_bound(d, o.experts, delta); });
      csv << d << ',' << o.experts << ',' << format("%.17g", theta) << ',' << format("%.17g", delta) << ','
          << cell(b.p_delta, b.log_p_delta) << ',' << cell(b.ec_min, b.log_ec_min) << ','
          << cell(b.ec_min_erfc, b.log_ec_min_erfc) << ',' << cell(b.ec_min_exp_bound, b.log_ec_min_exp_bound)
          << ',' << format("%.17g", b.log_p_delta) << ',' << format("%.17g", b.log_ec_min) << ','
          << format("%.17g", b.log_ec_min_erfc) << ',' << format("%.17g", b.log_ec_min_exp_bound) << '\n';
    }
  }
  std::cout << csv.str();
}

}  // namespace

void add_capacity_commands(CLI::App& app) {
  auto o = std::make_shared<capacity_options>();
  CLI::App* cap = app.add_subcommand(
      "capacity", "Critical expert capacity ec_min (Theorem 1) and, with --tokens, the classic capacity");
  add_integer_option(*cap, "--hidden", o->hidden, "activation size d (>= 2)");
  add_integer_option(*cap, "--experts", o->experts, "number of experts n (>= 1)");
  cap->add_option("--delta", o->delta, "delta = cos(theta), 0 < delta < 1 (the paper measured 0.03)")
      ->capture_default_str();
  add_integer_option(*cap, "--tokens", o->tokens, "tokens per step T (>= 1): adds the classic capacity and min factor")
      ->each([o](const std::string&) { o->has_tokens = true; });
  cap->add_option("--capacity-factor", o->capacity_factor, "capacity factor (> 0)");
  add_integer_option(*cap, "--expert-parallel", o->expert_parallel, "expert-parallel degree ep (>= 1)");
  add_integer_option(*cap, "--min-capacity", o->min_capacity, "minimum capacity (>= 0)");
  cap->add_flag("--json", o->json, "print one JSON object instead of the table");
  cap->callback([o] { run_capacity(*o); });

  auto c = std::make_shared<curve_options>();
  CLI::App* curve = app.add_subcommand(
      "capacity-curve", "CSV of the bound against the angle theta for several d (the paper's Figure 6)");
  curve->add_option("--hidden", c->hidden, "activation sizes d")->delimiter(',')->capture_default_str();
  add_integer_option(*curve, "--experts", c->experts, "number of experts n");
  curve->add_option("--angle-min", c->angle_min, "smallest theta in degrees")->capture_default_str();
  curve->add_option("--angle-max", c->angle_max, "largest theta in degrees (< 90)")->capture_default_str();
  curve->add_option("--points", c->points, "angles per d")->capture_default_str();
  curve->callback([c] { run_curve(*c); });
}

}  // namespace locmoe::cli
