// A whole MoE layer (tests/layer_reference.hpp: gate -> selection -> capacity -> dispatch -> linear experts ->
// combine -> sum(y R) + aux + z + locality) differentiated by the library's backwards, against central
// differences in double over every parameter: the tokens x, the gate's weight and bias, the experts' weights.
// Both gates, every score function, k = 1, 2, 4, drops on and off.
#include "layer_reference.hpp"

#include <doctest/doctest.h>

#include <cmath>
#include <string>

using namespace locmoe;
using locmoe_test::layer_case;
using locmoe_test::layer_params;
using locmoe_test::run_layer;

namespace {

/// The largest |grad - fd| / (1e-6 |fd| + 1e-9) over one parameter vector; the chosen experts must not change.
double worst_over(layer_params& p, const layer_case& c, std::vector<double>& values, const std::vector<double>& grad,
                  const std::vector<expert_index>& routed) {
  double worst = 0;
  for (std::size_t i = 0; i < values.size(); ++i) {
    const double v = values[i], h = 1e-5;
    values[i] = v + h;
    const locmoe_test::layer_gradients up = run_layer(p, c, false);
    values[i] = v - h;
    const locmoe_test::layer_gradients down = run_layer(p, c, false);
    values[i] = v;
    REQUIRE(up.routed == routed);
    REQUIRE(down.routed == routed);
    const double fd = (up.loss - down.loss) / (2 * h);
    worst = std::max(worst, std::abs(grad[i] - fd) / (1e-6 * std::abs(fd) + 1e-9));
  }
  return worst;
}

}  // namespace

TEST_CASE("layer gradients: x, gate and expert parameters against central differences") {
  int cases = 0;
  locmoe_test::for_each_layer_case([&](const layer_case& c, const char* name, int index) {
    CAPTURE(c.dense);
    CAPTURE(std::string(name));
    CAPTURE(c.k);
    CAPTURE(c.drops);
    layer_params p(static_cast<std::uint32_t>(100 + index));
    const locmoe_test::layer_gradients g = run_layer(p, c, true);
    CHECK(worst_over(p, c, p.x, g.x, g.routed) < 1.0);
    CHECK(worst_over(p, c, p.gate_bias, g.gate_bias, g.routed) < 1.0);
    CHECK(worst_over(p, c, p.expert_weight, g.expert_weight, g.routed) < 1.0);
    if (c.dense) CHECK(worst_over(p, c, p.gate_weight, g.gate_weight, g.routed) < 1.0);
    ++cases;
  });
  CHECK(cases == 48);
}
