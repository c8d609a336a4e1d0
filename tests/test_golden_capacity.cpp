// capacity.hpp against the golden data (60-digit mpmath values and the peers' capacity formulas):
// ../shared/golden/capacity.json and ../shared/golden/peers/capacity.json.
// The folder comes from the environment variable LOCMOE_GOLDEN_DIR; without it the test exits 77 (skipped).
#define DOCTEST_CONFIG_IMPLEMENT
#include <locmoe/capacity.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

using locmoe_test::relative_error;
namespace fs = std::filesystem;

namespace {

fs::path golden_dir() {
  const char* dir = std::getenv("LOCMOE_GOLDEN_DIR");
  return dir ? fs::path(dir) : fs::path();
}

nlohmann::json load(const fs::path& file) {
  std::ifstream in(file);
  REQUIRE_MESSAGE(in.good(), "cannot open " << file);
  return nlohmann::json::parse(in);
}

double log_field(const nlohmann::json& row, const std::string& name) {
  const auto& v = row.at(name);
  return v.is_string() ? std::stod(v.get<std::string>()) : v.get<double>();
}

/// Compare one row: every finite golden value to 1e-12 relative, every log to 1e-12 relative, a null
/// golden value against our +inf (overflow) or 0/subnormal (underflow), and the relation between the
/// exact value and its erfc form.
void check_row(const nlohmann::json& row, std::int64_t d, std::int64_t n, double delta, const std::string& log_suffix) {
  const auto b = locmoe::critical_capacity_bound(d, n, delta);
  const struct {
    const char* name;
    double value;
    double log_value;
  } fields[] = {{"p_delta", b.p_delta, b.log_p_delta},
                {"ec_min", b.ec_min, b.log_ec_min},
                {"ec_min_erfc", b.ec_min_erfc, b.log_ec_min_erfc},
                {"ec_min_exp_bound", b.ec_min_exp_bound, b.log_ec_min_exp_bound}};
  for (const auto& f : fields) {
    CAPTURE(f.name);
    const double want_log = log_field(row, std::string("log_") + f.name + log_suffix);
    CHECK(relative_error(f.log_value, want_log) <= 1e-12);
    const auto& want = row.at(f.name);
    if (want.is_null()) {
      CHECK((std::isinf(f.value) || std::abs(f.value) < std::numeric_limits<double>::min()));
    } else if (want.get<double>() >= std::numeric_limits<double>::min()) {
      CHECK(relative_error(f.value, want.get<double>()) <= 1e-12);
    }
  }
  const double gap = log_field(row, "log_ec_min" + log_suffix) - log_field(row, "log_ec_min_erfc" + log_suffix);
  if (std::abs(gap) > 1e-9) CHECK((b.log_ec_min > b.log_ec_min_erfc) == (gap > 0));
}

}  // namespace

TEST_CASE("capacity.json: 390 rows of mpmath values") {
  const auto golden = load(golden_dir() / "capacity.json");
  const auto& rows = golden.at("cases");
  CHECK(rows.size() == 390);
  for (const auto& row : rows) {
    const auto d = row.at("hidden").get<std::int64_t>();
    const auto n = row.at("experts").get<std::int64_t>();
    const auto delta = row.at("delta").get<double>();
    CAPTURE(d);
    CAPTURE(n);
    CAPTURE(delta);
    check_row(row, d, n, delta, "");
  }
}

TEST_CASE("peers/capacity.json: sphere_cap rows") {
  const auto golden = load(golden_dir() / "peers" / "capacity.json");
  // peers/README: d in {2, 4, 128, 1024, 4096, 65536} x delta in {0.01, 0.1, 0.5, 0.9} x n in {8, 64} = 48 rows;
  // a file cut short would otherwise pass on what is left.
  CHECK(golden.at("sphere_cap").size() == 48);
  for (const auto& row : golden.at("sphere_cap")) {
    const auto d = row.at("d").get<std::int64_t>();
    const auto n = row.at("n").get<std::int64_t>();
    const auto delta = row.at("delta").get<double>();
    CAPTURE(d);
    CAPTURE(n);
    CAPTURE(delta);
    check_row(row, d, n, delta, "_str");
  }
}

TEST_CASE("peers/capacity.json: classic capacity agrees with exact arithmetic and both peers") {
  const auto golden = load(golden_dir() / "peers" / "capacity.json");
  CHECK(golden.at("classic").at("rows").size() == 6);  // peers/README: 6 rows
  for (const auto& row : golden.at("classic").at("rows")) {
    const auto tokens = row.at("tokens").get<std::int64_t>();
    const auto cf = row.at("capacity_factor").get<double>();
    const auto ep = row.at("ep").get<std::int64_t>();
    const auto n = row.at("n").get<std::int64_t>();
    CAPTURE(tokens);
    CAPTURE(cf);
    const std::int64_t ours = locmoe::classic_capacity(tokens, cf, ep, n);
    CHECK(ours == row.at("capacity_exact_rational").get<std::int64_t>());
    CHECK(ours == row.at("megatron_get_capacity").get<std::int64_t>());
    CHECK(ours == row.at("deepspeed__capacity").get<std::int64_t>());
  }
}

int main(int argc, char** argv) {
  const fs::path dir = golden_dir();
  if (dir.empty()) {
    std::cout << "SKIPPED: no golden data; set LOCMOE_GOLDEN_DIR (CMake option LOCMOE_GOLDEN_DIR) to the "
                 "shared/golden folder\n";
    return 77;
  }
  if (!fs::exists(dir / "capacity.json")) {  // a folder was named: its absence is an error, not a skip
    std::cout << "FAILED: LOCMOE_GOLDEN_DIR = " << dir << " has no capacity.json\n";
    return 1;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
