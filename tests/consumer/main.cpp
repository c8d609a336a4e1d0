// The smallest program a consumer builds: the paper's capacity bound.
#include <locmoe/locmoe.hpp>

#include <cstdio>

int main() {
  const double ec = locmoe::ec_min(5120, 16, 0.03);
  std::printf("locmoe %d.%d.%d: ec_min(d=5120, n=16, delta=0.03) = %.6f\n", LOCMOE_VERSION_MAJOR,
              LOCMOE_VERSION_MINOR, LOCMOE_VERSION_PATCH, ec);
  return ec > 1.0 && ec < 3.0 ? 0 : 1;
}
