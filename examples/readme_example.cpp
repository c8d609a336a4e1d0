// The README's example: the critical expert capacity for PanGu-Sigma's MoE layer (paper section 4.1).
#include <locmoe/locmoe.hpp>

#include <cstdio>

int main() {
  const auto b = locmoe::critical_capacity_bound(/*d=*/5120, /*n=*/16, /*delta=*/0.03);
  const auto cap = locmoe::classic_capacity(/*tokens=*/16384, /*cf=*/1.1, /*ep=*/16, /*n=*/16);
  std::printf("p_delta = %.5f, ec_min = %.4f (erfc form %.4f)\n", b.p_delta, b.ec_min, b.ec_min_erfc);
  std::printf("classic capacity %lld; the bound needs %lld\n", static_cast<long long>(cap),
              static_cast<long long>(locmoe::critical_capacity(5120, 16, 0.03)));
}
