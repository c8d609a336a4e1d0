// route_backward.hpp: the selection's backward against central differences of score_route's own forward (the
// chosen set held fixed, checked unchanged under each perturbation), for every score function, pre/post softmax,
// renormalize, scale, bias, groups, k = 1, 2, 4; the zero-gradient rules; accumulation; errors.
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>

#include <doctest/doctest.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace locmoe;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

struct routed {
  std::vector<expert_index> indices;
  std::vector<double> weights;
};

routed forward(const std::vector<double>& logits, std::size_t tokens, std::size_t n, const router_options<double>& o) {
  routed r{std::vector<expert_index>(tokens * o.k), std::vector<double>(tokens * o.k)};
  score_route(matrix_view<const double>(logits.data(), tokens, n), o,
              route_outputs<double>{{r.indices.data(), tokens, o.k}, {r.weights.data(), tokens, o.k}, {}, {}});
  return r;
}

/// L = sum_tj R_tj w_tj; the largest |grad - fd| / (1e-6 |fd| + 1e-10) over every finite logit, and the largest
/// |grad| at non-finite logits and at tokens that must get none.
double max_error(std::vector<double> logits, std::size_t tokens, std::size_t n, const router_options<double>& o,
                 std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  const routed base = forward(logits, tokens, n, o);
  std::vector<double> upstream(tokens * o.k);
  for (double& r : upstream) r = normal(rng);
  std::vector<double> grad(tokens * n, 0.0);
  route_backward(matrix_view<const double>(logits.data(), tokens, n), o,
                 matrix_view<const expert_index>(base.indices.data(), tokens, o.k),
                 matrix_view<const double>(upstream.data(), tokens, o.k), matrix_view<double>(grad.data(), tokens, n));
  const auto loss = [&](const std::vector<double>& l) {
    const routed r = forward(l, tokens, n, o);
    REQUIRE(r.indices == base.indices);  // the chosen set is fixed under the perturbation
    double sum = 0;
    for (std::size_t i = 0; i < r.weights.size(); ++i) sum += upstream[i] * r.weights[i];
    return sum;
  };
  double worst = 0;
  for (std::size_t i = 0; i < logits.size(); ++i) {
    if (!std::isfinite(logits[i])) {
      worst = std::max(worst, std::abs(grad[i]) * 1e10);
      continue;
    }
    const double x = logits[i], h = 1e-5;
    logits[i] = x + h;
    const double up = loss(logits);
    logits[i] = x - h;
    const double down = loss(logits);
    logits[i] = x;
    const double fd = (up - down) / (2 * h);
    worst = std::max(worst, std::abs(grad[i] - fd) / (1e-6 * std::abs(fd) + 1e-10));
  }
  return worst;
}

std::vector<double> random_logits(std::mt19937& rng, std::size_t tokens, std::size_t n) {
  std::normal_distribution<double> normal(0.0, 1.5);
  std::vector<double> l(tokens * n);
  for (double& v : l) v = normal(rng);
  return l;
}

}  // namespace

TEST_CASE("route_backward: every forward against central differences") {
  std::mt19937 rng(7);
  const std::size_t tokens = 6, n = 8;
  std::vector<double> bias(n);
  for (double& b : bias) b = std::uniform_real_distribution<double>(-0.3, 0.3)(rng);
  int cases = 0;
  for (const score_function score : {score_function::softmax, score_function::sigmoid}) {
    for (const bool before : {true, false}) {
      for (const bool renormalize : {false, true}) {
        for (const std::size_t k : {1u, 2u, 4u}) {
          for (const int extra : {0, 1, 2}) {  // plain, scale + bias, node-limited groups
            if (score == score_function::sigmoid && (!before || renormalize)) continue;  // options a sigmoid ignores
            router_options<double> o;
            o.k = k;
            o.score = score;
            o.softmax_before_topk = before;
            o.renormalize = renormalize;
            if (extra == 1) {
              o.scale = 2.5;
              o.expert_bias = bias.data();
            }
            if (extra == 2) {
              o.groups = 4;
              o.group_limit = 2;
            }
            CAPTURE(static_cast<int>(score));
            CAPTURE(before);
            CAPTURE(renormalize);
            CAPTURE(k);
            CAPTURE(extra);
            std::vector<double> logits = random_logits(rng, tokens, n);
            logits[1 * n + 3] = -inf;  // a masked expert
            logits[2 * n + 0] = logits[2 * n + 5] = -inf;
            CHECK(max_error(logits, tokens, n, o, static_cast<std::uint32_t>(cases)) < 1.0);
            ++cases;
          }
        }
      }
    }
  }
  CHECK(cases == 5 * 3 * 3);  // softmax: 4 option pairs, sigmoid: 1; k: 3; extras: 3
}

TEST_CASE("route_backward: tokens and slots that get no gradient") {
  const std::size_t tokens = 5, n = 4, k = 2;
  std::vector<double> logits = {0.1, 0.5, -0.2, 0.3,                           // routes
                                std::nan(""), 0, 0, 0,                         // invalid: NaN
                                inf, 0, 0, 0,                                  // invalid: +inf
                                -inf, -inf, -inf, -inf,                        // invalid: all masked
                                -inf, -inf, 0.7, -inf};                        // one expert left: slot 1 empty
  router_options<double> o;
  o.k = k;
  const routed r = forward(logits, tokens, n, o);
  CHECK(r.indices[3 * k] == no_expert);
  CHECK(r.indices[4 * k + 1] == no_expert);
  std::vector<expert_index> indices = r.indices;
  std::vector<double> upstream(tokens * k, 1.0), grad(tokens * n, 0.0);
  const auto run = [&] {
    std::fill(grad.begin(), grad.end(), 0.0);
    return route_backward(matrix_view<const double>(logits.data(), tokens, n), o,
                          matrix_view<const expert_index>(indices.data(), tokens, k),
                          matrix_view<const double>(upstream.data(), tokens, k), matrix_view<double>(grad.data(), tokens, n));
  };
  CHECK(run() == 3);
  for (std::size_t i = n; i < tokens * n; ++i) CHECK(grad[i] == 0.0);  // token 4: p = 1 on its one expert
  double first = 0;
  for (std::size_t e = 0; e < n; ++e) first += std::abs(grad[e]);
  CHECK(first > 0);
  indices[0] = no_expert;  // a token the caller masked (padding): no gradient
  indices[1] = no_expert;
  CHECK(run() == 4);
  for (const double g : grad) CHECK(g == 0.0);
}

TEST_CASE("route_backward: adds into grad_logits, float agrees with double, ranges compose") {
  std::mt19937 rng(11);
  const std::size_t tokens = 9, n = 6, k = 2;
  const std::vector<double> logits = random_logits(rng, tokens, n);
  router_options<double> o;
  o.k = k;
  o.softmax_before_topk = false;
  const routed r = forward(logits, tokens, n, o);
  std::vector<double> upstream(tokens * k);
  for (double& u : upstream) u = std::normal_distribution<double>(0.0, 1.0)(rng);
  std::vector<double> grad(tokens * n, 0.0), seeded(tokens * n, 0.25);
  const matrix_view<const double> L(logits.data(), tokens, n);
  const matrix_view<const expert_index> I(r.indices.data(), tokens, k);
  const matrix_view<const double> G(upstream.data(), tokens, k);
  route_backward(L, o, I, G, matrix_view<double>(grad.data(), tokens, n));
  route_backward(L, o, I, G, matrix_view<double>(seeded.data(), tokens, n), token_range{0, 4});
  route_backward(L, o, I, G, matrix_view<double>(seeded.data(), tokens, n), token_range{4, tokens});
  for (std::size_t i = 0; i < grad.size(); ++i) CHECK(seeded[i] == grad[i] + 0.25);

  std::vector<float> lf(logits.begin(), logits.end()), uf(upstream.begin(), upstream.end()), gf(tokens * n, 0.0f);
  router_options<float> of;
  of.k = k;
  of.softmax_before_topk = false;
  route_backward(matrix_view<const float>(lf.data(), tokens, n), of, I, matrix_view<const float>(uf.data(), tokens, k),
                 matrix_view<float>(gf.data(), tokens, n));
  for (std::size_t i = 0; i < grad.size(); ++i) CHECK(gf[i] == doctest::Approx(grad[i]).epsilon(1e-5));
}

TEST_CASE("route_backward: bad arguments name the argument") {
  const std::size_t tokens = 2, n = 4, k = 2;
  std::vector<double> logits(tokens * n, 0.0), g(tokens * k, 1.0), grad(tokens * n, 0.0);
  std::vector<expert_index> indices = {0, 1, 2, 3};
  router_options<double> o;
  o.k = k;
  const auto call = [&](const router_options<double>& opts, std::size_t k_cols, std::size_t grad_cols) {
    route_backward(matrix_view<const double>(logits.data(), tokens, n), opts,
                   matrix_view<const expert_index>(indices.data(), tokens, k_cols),
                   matrix_view<const double>(g.data(), tokens, k_cols), matrix_view<double>(grad.data(), tokens, grad_cols));
  };
  const auto message = [&](auto&& f) {
    try {
      f();
    } catch (const error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  CHECK(message([&] { call(o, 1, n); }).find("indices") != std::string::npos);
  CHECK(message([&] { call(o, k, 3); }).find("grad_logits") != std::string::npos);
  router_options<double> big = o;
  big.k = 5;
  CHECK(message([&] { call(big, k, n); }).find("k") != std::string::npos);
  router_options<double> bad_scale = o;
  bad_scale.scale = std::nan("");
  CHECK(message([&] { call(bad_scale, k, n); }).find("scale") != std::string::npos);
  indices = {0, 0, 2, 3};
  CHECK(message([&] { call(o, k, n); }).find("distinct") != std::string::npos);
  indices = {no_expert, 1, 2, 3};
  CHECK(message([&] { call(o, k, n); }).find("no_expert slots must come last") != std::string::npos);
  indices = {0, 4, 2, 3};
  CHECK(message([&] { call(o, k, n); }).find("[0, n)") != std::string::npos);
  indices = {0, 1, 2, 3};
  CHECK(message([&] { call(o, k, n); }) == "no error");
  errno = 0;
  indices = {0, 0, 2, 3};
  const checked_count failed = route_backward(matrix_view<const double>(logits.data(), tokens, n), o,
                                              matrix_view<const expert_index>(indices.data(), tokens, k),
                                              matrix_view<const double>(g.data(), tokens, k),
                                              matrix_view<double>(grad.data(), tokens, n), token_range{}, errno_on_error{});
  const int error_number = errno;  // read before any CHECK, which may print
  CHECK(!failed.ok());
  CHECK(error_number == EDOM);
}
