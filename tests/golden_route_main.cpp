// main of locmoe_golden_route_tests: exits 77 (skipped) without LOCMOE_GOLDEN_DIR, 1 if it names no golden folder.
#define DOCTEST_CONFIG_IMPLEMENT
#include "golden_route_util.hpp"

#include <doctest/doctest.h>

#include <filesystem>
#include <iostream>

using locmoe_golden::golden_dir;
namespace fs = std::filesystem;

int main(int argc, char** argv) {
  const fs::path dir = golden_dir();
  if (dir.empty()) {
    std::cout << "SKIPPED: no golden data; set LOCMOE_GOLDEN_DIR (CMake option LOCMOE_GOLDEN_DIR) to the "
                 "shared/golden folder\n";
    return 77;
  }
  if (!fs::exists(dir / "route" / "manifest.json") || !fs::exists(dir / "peers")) {  // named but absent: an error
    std::cout << "FAILED: LOCMOE_GOLDEN_DIR = " << dir << " has no route/manifest.json or peers/\n";
    return 1;
  }
  doctest::Context context(argc, argv);
  return context.run();
}
