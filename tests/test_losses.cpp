// losses.hpp: values against the formulas evaluated naively, gradients against central finite differences in
// double (through the gate as well), the documented skips, the two property tests of the issue, and errors.
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

using namespace locmoe;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

struct problem {
  std::size_t tokens, n, k;
  std::vector<double> logits;
  std::vector<expert_index> indices;

  loss_inputs<double> inputs() const {
    return {matrix_view<const double>(logits.data(), tokens, n), matrix_view<const expert_index>(indices.data(), tokens, k),
            {}};
  }
};

problem make_problem(std::uint32_t seed, std::size_t tokens, std::size_t n, std::size_t k) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.5);
  problem p{tokens, n, k, std::vector<double>(tokens * n), std::vector<expert_index>(tokens * k)};
  for (double& x : p.logits) x = normal(rng);
  router_options<double> o;
  o.k = k;
  std::vector<double> w(tokens * k);
  score_route(matrix_view<const double>(p.logits.data(), tokens, n), o,
              route_outputs<double>{{p.indices.data(), tokens, k}, {w.data(), tokens, k}, {}, {}});
  return p;
}

using loss_fn = std::function<double(const loss_inputs<double>&, const matrix_view<double>&)>;

/// Central differences of `loss` over every logit (indices held fixed, as the losses define f) vs its gradient:
/// the largest |grad - fd| / (1e-6 |fd| + 1e-10). The 1e-10 floor is the differences' own rounding noise,
/// about eps |L| / h = 1e-16 / 1e-5 for losses of order 1; a ratio below 1 passes.
double max_gradient_error(problem p, const loss_fn& loss) {
  std::vector<double> grad(p.tokens * p.n, 0.0);
  loss(p.inputs(), matrix_view<double>(grad.data(), p.tokens, p.n));
  double worst = 0;
  for (std::size_t i = 0; i < p.logits.size(); ++i) {
    if (!std::isfinite(p.logits[i])) {
      worst = std::max(worst, std::abs(grad[i]));  // masked or invalid: zero gradient
      continue;
    }
    const double x = p.logits[i], h = 1e-5;
    p.logits[i] = x + h;
    const double up = loss(p.inputs(), {});
    p.logits[i] = x - h;
    const double down = loss(p.inputs(), {});
    p.logits[i] = x;
    const double fd = (up - down) / (2 * h);
    worst = std::max(worst, std::abs(grad[i] - fd) / (1e-6 * std::abs(fd) + 1e-10));
  }
  return worst;
}

std::vector<double> softmax_row(const double* l, std::size_t n) {
  std::vector<double> p(n);
  const double m = *std::max_element(l, l + n);
  double z = 0;
  for (std::size_t e = 0; e < n; ++e) z += (p[e] = std::exp(l[e] - m));
  for (double& v : p) v /= z;
  return p;
}

}  // namespace

TEST_CASE("aux_loss: both normalizations and both score functions, value and gradient") {
  problem p = make_problem(1, 37, 8, 2);
  p.logits[5] = -inf;                                  // a masked expert
  p.indices[2 * 4] = no_expert;                        // token 4 masked by the caller (padding)
  p.logits[9 * 8 + 1] = std::numeric_limits<double>::quiet_NaN();  // token 9 invalid
  p.indices[2 * 9] = p.indices[2 * 9 + 1] = no_expert;
  for (const auto norm : {aux_normalization::all_choices, aux_normalization::first_choice}) {
    for (const auto score : {score_function::softmax, score_function::sigmoid}) {
      aux_loss_options<double> o{0.37, norm, score};
      // Naive value: P_i and f_i over the 35 valid tokens.
      std::vector<double> mean(8, 0.0), f(8, 0.0);
      std::size_t valid = 0;
      for (std::size_t t = 0; t < p.tokens; ++t) {
        if (t == 4 || t == 9) continue;
        ++valid;
        const double* l = &p.logits[t * 8];
        std::vector<double> q = softmax_row(l, 8);
        if (score == score_function::sigmoid) {
          double s = 0;
          for (std::size_t e = 0; e < 8; ++e) s += (q[e] = l[e] == -inf ? 0 : 1 / (1 + std::exp(-l[e])));
          for (double& v : q) v /= s + 1e-20;
        }
        for (std::size_t e = 0; e < 8; ++e) mean[e] += q[e];
        for (std::size_t j = 0; j < (norm == aux_normalization::first_choice ? 1u : 2u); ++j) {
          f[static_cast<std::size_t>(p.indices[t * 2 + j])] += 1;
        }
      }
      double want = 0;
      for (std::size_t e = 0; e < 8; ++e) want += (mean[e] / double(valid)) * (f[e] / double(valid));
      want *= 0.37 * 8 / (norm == aux_normalization::first_choice ? 1 : 2);
      const loss_value<double> v = aux_loss(p.inputs(), o);
      CHECK(v.value == doctest::Approx(want).epsilon(1e-13));
      CHECK(v.tokens == 35);
      CHECK(v.skipped == 2);
      CHECK(max_gradient_error(p, [&](const loss_inputs<double>& in, const matrix_view<double>& g) {
              return aux_loss(in, o, g).value;
            }) < 1);
    }
  }
}

TEST_CASE("z_loss: value, gradient, masks; probabilities passed in give the same result") {
  problem p = make_problem(2, 29, 16, 1);
  p.logits[3] = -inf;
  p.logits[16 * 7 + 2] = inf;  // token 7 invalid: skipped
  double want = 0;
  for (std::size_t t = 0; t < p.tokens; ++t) {
    if (t == 7) continue;
    const double* l = &p.logits[t * 16];
    const double m = *std::max_element(l, l + 16);
    double z = 0;
    for (std::size_t e = 0; e < 16; ++e) z += std::exp(l[e] - m);
    want += (m + std::log(z)) * (m + std::log(z));
  }
  want *= 1e-3 / 28;
  loss_inputs<double> no_indices = p.inputs();
  no_indices.indices = {};
  const loss_value<double> v = z_loss(no_indices, 1e-3);
  CHECK(v.value == doctest::Approx(want).epsilon(1e-13));
  CHECK(v.skipped == 1);
  CHECK(max_gradient_error(p, [](const loss_inputs<double>& in, const matrix_view<double>& g) {
          return z_loss(in, 1e-3, g).value;
        }) < 1);

  std::vector<double> probs(p.tokens * 16);
  softmax(matrix_view<const double>(p.logits.data(), p.tokens, 16), matrix_view<double>(probs.data(), p.tokens, 16));
  loss_inputs<double> with_p = no_indices;
  with_p.probabilities = matrix_view<const double>(probs.data(), p.tokens, 16);
  std::vector<double> g1(p.tokens * 16, 0.0), g2(p.tokens * 16, 0.0);
  CHECK(z_loss(with_p, 1e-3, matrix_view<double>(g1.data(), p.tokens, 16)).value == doctest::Approx(want).epsilon(1e-13));
  z_loss(no_indices, 1e-3, matrix_view<double>(g2.data(), p.tokens, 16));
  for (std::size_t i = 0; i < g1.size(); ++i) REQUIRE(g1[i] == doctest::Approx(g2[i]).epsilon(1e-12));
}

TEST_CASE("locality_loss: per-rank KL against the smoothed local distribution, gradient, ranks without experts") {
  // 6 ranks, 2 per node (3 nodes); 8 experts on ranks 0-3 only (nodes 0 and 1), node 2 hosts none.
  const topology topo({0, 0, 1, 1, 2, 2}, {0, 0, 1, 1, 2, 2, 3, 3});
  problem p = make_problem(3, 30, 8, 2);
  std::vector<std::int32_t> rank(p.tokens);
  for (std::size_t t = 0; t < p.tokens; ++t) rank[t] = static_cast<std::int32_t>((t * 7) % 6);
  rank[0] = 1;  // no rank is left without tokens
  locality_loss_options<double> o;
  o.coeff = 0.3;
  o.smoothing = 0.05;
  o.topo = &topo;
  o.token_rank = rank.data();
  double want = 0, want_hard = 0;
  for (std::size_t r = 0; r < 4; ++r) {  // ranks 4, 5 (node 2) have no local expert
    std::vector<double> dc(8, 0.0), dh(8, 0.0);
    double count = 0;
    for (std::size_t t = 0; t < p.tokens; ++t) {
      if (static_cast<std::size_t>(rank[t]) != r) continue;
      const std::vector<double> q = softmax_row(&p.logits[t * 8], 8);
      for (std::size_t e = 0; e < 8; ++e) dc[e] += q[e];
      dh[static_cast<std::size_t>(p.indices[t * 2])] += 1;
      dh[static_cast<std::size_t>(p.indices[t * 2 + 1])] += 1;
      count += 1;
    }
    for (std::size_t e = 0; e < 8; ++e) {
      const bool local = e / 4 == r / 2;
      const double target = 0.95 * (local ? 0.25 : 0.0) + 0.05 / 8;
      want += dc[e] / count * std::log(dc[e] / count / target);
      if (dh[e] > 0) want_hard += dh[e] / (2 * count) * std::log(dh[e] / (2 * count) / target);
    }
  }
  const locality_value<double> v = locality_loss(p.inputs(), o);
  CHECK(v.value == doctest::Approx(0.3 * want / 4).epsilon(1e-13));
  CHECK(v.assignment_kl == doctest::Approx(want_hard / 4).epsilon(1e-13));
  CHECK(v.ranks == 4);
  CHECK(v.ranks_without_local_experts == 2);
  CHECK(v.tokens == 30);
  CHECK(max_gradient_error(p, [&](const loss_inputs<double>& in, const matrix_view<double>& g) {
          return locality_loss(in, o, g).value;
        }) < 1);

  // Default token ranks: contiguous blocks; a masked expert keeps a finite loss and a zero gradient there.
  p.logits[2] = -inf;
  o.token_rank = token_ranks::contiguous_blocks();
  const locality_value<double> blocks = locality_loss(p.inputs(), o);
  CHECK(std::isfinite(blocks.value));
  CHECK(max_gradient_error(p, [&](const loss_inputs<double>& in, const matrix_view<double>& g) {
          return locality_loss(in, o, g).value;
        }) < 1);
}

TEST_CASE("router_losses: the three terms at once equal the separate calls; float follows double") {
  const topology topo({0, 0, 1, 1, 2, 2}, {0, 0, 1, 1, 2, 2, 3, 3});  // node 2 hosts no expert
  for (const auto score : {score_function::softmax, score_function::sigmoid}) {
    problem p = make_problem(8, 50, 8, 2);
    p.indices[2 * 7] = no_expert;  // a padded token
    router_loss_options<double> o;
    o.aux = {0.3, aux_normalization::all_choices, score};
    o.z_coeff = 0.02;
    o.locality.coeff = 0.7;
    o.locality.topo = &topo;
    o.locality.token_rank = token_ranks::contiguous_blocks();
    std::vector<double> together(p.tokens * 8, 0.0), apart(p.tokens * 8, 0.0);
    const matrix_view<double> g1(together.data(), p.tokens, 8), g2(apart.data(), p.tokens, 8);
    const router_loss_values<double> v = router_losses(p.inputs(), o, g1);
    const double aux = aux_loss(p.inputs(), o.aux, g2).value, z = z_loss(p.inputs(), o.z_coeff, g2).value;
    const double loc = locality_loss(p.inputs(), o.locality, g2).value;
    CHECK(v.aux.value == doctest::Approx(aux).epsilon(1e-14));
    CHECK(v.z.value == doctest::Approx(z).epsilon(1e-14));
    CHECK(v.locality.value == doctest::Approx(loc).epsilon(1e-14));
    CHECK(v.locality.ranks_without_local_experts == 2);
    for (std::size_t i = 0; i < together.size(); ++i) REQUIRE(std::abs(together[i] - apart[i]) < 1e-15);
    CHECK(max_gradient_error(p, [&](const loss_inputs<double>& in, const matrix_view<double>& g) {
            const auto r = router_losses(in, o, g);
            return r.aux.value + r.z.value + r.locality.value;
          }) < 1);

    // float: the run sums and the second pass in float; relative 1e-5 of the double values.
    const std::vector<float> lf(p.logits.begin(), p.logits.end());
    std::vector<float> gf(p.tokens * 8, 0.0f);
    router_loss_options<float> of;
    of.aux = {0.3f, aux_normalization::all_choices, score};
    of.z_coeff = 0.02f;
    of.locality.coeff = 0.7f;
    of.locality.topo = &topo;
    of.locality.token_rank = token_ranks::contiguous_blocks();
    const loss_inputs<float> inf_{matrix_view<const float>(lf.data(), p.tokens, 8),
                                  matrix_view<const expert_index>(p.indices.data(), p.tokens, 2), {}};
    const router_loss_values<float> vf = router_losses(inf_, of, matrix_view<float>(gf.data(), p.tokens, 8));
    CHECK(vf.aux.value == doctest::Approx(aux).epsilon(1e-5));
    CHECK(vf.z.value == doctest::Approx(z).epsilon(1e-5));
    CHECK(vf.locality.value == doctest::Approx(loc).epsilon(1e-5));
    const double scale = *std::max_element(together.begin(), together.end(), [](double a, double b) { return std::abs(a) < std::abs(b); });
    for (std::size_t i = 0; i < gf.size(); ++i) REQUIRE(std::abs(gf[i] - together[i]) <= 1e-5 * std::abs(scale));
  }
  router_loss_options<double> bad;
  bad.z_coeff = std::numeric_limits<double>::quiet_NaN();
  const problem p = make_problem(9, 4, 4, 1);
  CHECK_THROWS_WITH_AS(router_losses(p.inputs(), bad), doctest::Contains("z_coeff = nan: must be finite"), error);
}

TEST_CASE("gradients through the GrAP gate to the activations") {
  const std::size_t tokens = 9, d = 24, n = 6, k = 2;
  std::mt19937 rng(4);
  std::normal_distribution<double> normal;
  std::vector<double> x(tokens * d), bias(n, 3.0);  // the bias keeps every logit > 0: ReLU active
  for (double& v : x) v = normal(rng);
  const grap_gate<double> gate{d, n, true, bias.data()};
  const topology topo = topology::uniform(3, 1, n);
  std::vector<expert_index> indices(tokens * k);
  auto total = [&](const std::vector<double>& xs, std::vector<double>* grad_x) {
    std::vector<double> logits(tokens * n), grad(tokens * n, 0.0), w(tokens * k);
    grap_logits(gate, matrix_view<const double>(xs.data(), tokens, d), matrix_view<double>(logits.data(), tokens, n));
    if (grad_x) {  // route once, at the unperturbed point; the choices stay fixed for the differences
      router_options<double> o;
      o.k = k;
      score_route(matrix_view<const double>(logits.data(), tokens, n), o,
                  route_outputs<double>{{indices.data(), tokens, k}, {w.data(), tokens, k}, {}, {}});
    }
    const loss_inputs<double> in{matrix_view<const double>(logits.data(), tokens, n),
                                 matrix_view<const expert_index>(indices.data(), tokens, k), {}};
    locality_loss_options<double> lo;
    lo.topo = &topo;
    lo.token_rank = token_ranks::contiguous_blocks();
    const matrix_view<double> g = grad_x ? matrix_view<double>(grad.data(), tokens, n) : matrix_view<double>();
    const double value = aux_loss(in, aux_loss_options<double>{}, g).value + z_loss(in, 1e-3, g).value +
                         locality_loss(in, lo, g).value;
    if (grad_x) {
      grad_x->assign(tokens * d, 0.0);
      grap_backward(gate, matrix_view<const double>(logits.data(), tokens, n), matrix_view<const double>(grad.data(), tokens, n),
                    matrix_view<double>(grad_x->data(), tokens, d));
    }
    return value;
  };
  std::vector<double> grad_x;
  total(x, &grad_x);
  double worst = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    std::vector<double> up = x, down = x;
    up[i] += 1e-5;
    down[i] -= 1e-5;
    const double fd = (total(up, nullptr) - total(down, nullptr)) / 2e-5;
    worst = std::max(worst, std::abs(grad_x[i] - fd) / (1e-6 * std::abs(fd) + 1e-10));
  }
  CHECK(worst < 1);
}

TEST_CASE("property: the locality loss alone pulls D_c towards D_l; the aux loss alone balances the load") {
  const std::size_t tokens = 64, n = 8;
  const topology topo = topology::uniform(4, 2, n);  // 2 nodes of 2 ranks; experts 0-3 on node 0
  problem p = make_problem(5, tokens, n, 1);
  locality_loss_options<double> lo;
  lo.coeff = 1.0;
  lo.topo = &topo;
  lo.token_rank = token_ranks::contiguous_blocks();
  auto local_mass = [&](const problem& q) {  // mean probability a token puts on its own node's experts
    double mass = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::vector<double> s = softmax_row(&q.logits[t * n], n);
      const std::size_t node = (t * 4 / tokens) / 2;
      for (std::size_t e = node * 4; e < node * 4 + 4; ++e) mass += s[e];
    }
    return mass / double(tokens);
  };
  const double kl0 = locality_loss(p.inputs(), lo).value, mass0 = local_mass(p);
  double previous = kl0;
  for (int step = 0; step < 200; ++step) {
    std::vector<double> g(tokens * n, 0.0);
    locality_loss(p.inputs(), lo, matrix_view<double>(g.data(), tokens, n));
    for (std::size_t i = 0; i < g.size(); ++i) p.logits[i] -= 20.0 * g[i];
    const double kl = locality_loss(p.inputs(), lo).value;
    REQUIRE(kl <= previous + 1e-12);  // monotone descent
    previous = kl;
  }
  CHECK(previous < 0.2 * kl0);
  CHECK(local_mass(p) > 0.9);
  CHECK(mass0 < 0.7);

  // Aux alone, re-routing Top-1 every step, from logits that favour expert 0.
  problem a = make_problem(6, 256, n, 1);
  for (std::size_t t = 0; t < 256; ++t) a.logits[t * n] += 3.0;
  std::vector<double> w0(256);
  score_route(matrix_view<const double>(a.logits.data(), 256, n), router_options<double>{},
              route_outputs<double>{{a.indices.data(), 256, 1}, {w0.data(), 256, 1}, {}, {}});
  auto max_load = [&](const problem& q) {
    std::vector<int> load(n, 0);
    for (const expert_index e : q.indices) ++load[static_cast<std::size_t>(e)];
    return *std::max_element(load.begin(), load.end());
  };
  const int load0 = max_load(a);
  aux_loss_options<double> ao;
  ao.coeff = 1.0;
  for (int step = 0; step < 300; ++step) {
    std::vector<double> g(256 * n, 0.0), w(256);
    aux_loss(a.inputs(), ao, matrix_view<double>(g.data(), 256, n));
    for (std::size_t i = 0; i < g.size(); ++i) a.logits[i] -= 200.0 * g[i];
    score_route(matrix_view<const double>(a.logits.data(), 256, n), router_options<double>{},
                route_outputs<double>{{a.indices.data(), 256, 1}, {w.data(), 256, 1}, {}, {}});
  }
  CHECK(load0 > 150);
  CHECK(max_load(a) < 64);  // uniform is 32
}

TEST_CASE("losses: bad arguments name the rule; no valid token gives 0") {
  problem p = make_problem(7, 4, 4, 1);
  loss_inputs<double> in = p.inputs();
  std::vector<expert_index> bad = {0, 1, 9, 0};
  in.indices = matrix_view<const expert_index>(bad.data(), 4, 1);
  CHECK_THROWS_WITH_AS(aux_loss(in, aux_loss_options<double>{}), doctest::Contains("indices = (2, 0) = 9"), error);
  in = p.inputs();
  in.indices = {};
  CHECK_THROWS_WITH_AS(aux_loss(in, aux_loss_options<double>{}), doctest::Contains("indices = 0x0: must have k columns"),
                       error);
  CHECK_THROWS_WITH_AS(z_loss(p.inputs(), inf), doctest::Contains("coeff = inf: must be finite"), error);
  std::vector<double> g(3);
  CHECK_THROWS_WITH_AS(z_loss(p.inputs(), 1.0, matrix_view<double>(g.data(), 3, 1)),
                       doctest::Contains("grad_logits = 3x1: must have 4 rows"), error);
  locality_loss_options<double> lo;
  CHECK_THROWS_WITH_AS(locality_loss(p.inputs(), lo), doctest::Contains("topo = null: a topology is required"), error);
  const topology topo = topology::uniform(2, 1, 4);
  lo.topo = &topo;
  lo.token_rank = token_ranks::contiguous_blocks();
  lo.smoothing = 0;
  CHECK_THROWS_WITH_AS(locality_loss(p.inputs(), lo), doctest::Contains("smoothing = 0: must satisfy 0 < eps <= 1"), error);
  errno = 0;
  const double failed_value = z_loss(p.inputs(), inf, {}, errno_on_error{}).value;
  const int error_number = errno;  // read before any CHECK, which may print
  CHECK(std::isnan(failed_value));
  CHECK(error_number == EDOM);

  std::vector<expert_index> none(4, no_expert);
  in = p.inputs();
  in.indices = matrix_view<const expert_index>(none.data(), 4, 1);
  std::vector<double> grad(16, 0.0);
  lo.smoothing = 0.01;
  CHECK(aux_loss(in, aux_loss_options<double>{}, matrix_view<double>(grad.data(), 4, 4)).value == 0.0);
  CHECK(z_loss(in, 1.0, matrix_view<double>(grad.data(), 4, 4)).value == 0.0);
  CHECK(locality_loss(in, lo, matrix_view<double>(grad.data(), 4, 4)).value == 0.0);
  CHECK(std::all_of(grad.begin(), grad.end(), [](double v) { return v == 0.0; }));
  const problem empty{0, 4, 1, {}, {}};
  CHECK(aux_loss(empty.inputs(), aux_loss_options<double>{}).value == 0.0);
  CHECK(locality_loss(empty.inputs(), lo).value == 0.0);
}
