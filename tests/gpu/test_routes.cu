// route_grap and route_dense against the CPU backend: float, bf16 and fp16 activations; n = 16, 64, 300 (not a power
// of two, > 256), 1024 (the limit) and 1025 (refused); k = 1, 2, 4; even and uneven GrAP blocks; odd d; rows that
// are not 16-byte aligned (a data pointer one element in, an odd stride) for x, W and every output; ReLU on and
// off; a device bias, with -inf for masked experts (never chosen), down to fewer than k unmasked; tokens with a
// NaN, a +inf, and every logit -inf (invalid: indices -1, weights and probabilities 0); renormalize on and off.
// Every output (indices, weights, probabilities, logits) is compared; tolerances in main.cu.
#include "gpu_test.hpp"

#include <functional>
#include <random>

namespace gpu_test {
namespace {

using namespace locmoe;

enum class gate_kind { grap, dense };

struct route_case {
  gate_kind kind;
  std::size_t tokens, d, n, k;
  bool relu, bias, renormalize, unaligned, specials;
  std::vector<std::size_t> masked;  ///< experts whose bias is -inf (cases without ReLU: ReLU turns -inf into 0)
};

// The tokens of the special rows (specials): one NaN, one +inf, one whose every logit is -inf (GrAP: the whole row
// -inf, so every block mean is -inf, or 0 after a ReLU; dense: x[t][0] = -inf and W's column 0 positive).
constexpr std::size_t nan_token = 7, inf_token = 11, minus_inf_token = 13;

struct route_layouts {
  layout indices, weights, probabilities, logits;
};
struct route_host {  // one backend's outputs, whole allocations
  std::vector<expert_index> indices;
  std::vector<float> weights, probabilities, logits;
};

/// |a - b|, with NaN (a skipped write leaves NaN) as infinitely far unless both are NaN.
double distance(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b) ? 0.0 : INFINITY;
  if (a == b) return 0.0;  // equal infinities
  return std::fabs(a - b);
}

/// Whether two of the token's top k+1 CPU logits (the masked -inf left out) lie within 1e-5 of each other, relative:
/// there the GPU's other summation order may rank them the other way.
bool near_tie(const std::vector<float>& logits, const layout& l, std::size_t t, std::size_t k) {
  std::vector<float> v;
  for (std::size_t i = 0; i < l.cols; ++i) {
    const float x = at(logits, l, t, i);
    if (std::isnan(x)) return false;  // invalid: no choice to rank
    if (x != -INFINITY) v.push_back(x);
  }
  std::sort(v.begin(), v.end(), std::greater<float>());
  for (std::size_t i = 0; i + 1 < std::min(v.size(), k + 1); ++i) {
    const double a = v[i], b = v[i + 1];
    if (std::fabs(a - b) <= 1e-5 * std::max(std::fabs(a), std::fabs(b))) return true;
  }
  return false;
}

template <class T>
std::size_t gap_writes(const std::vector<T>& v, const layout& l) {  // elements outside the matrix that lost the fill
  std::size_t count = 0;
  for (std::size_t i = 0; i < v.size(); ++i) count += !l.inside(i) && !is_fill(v[i]);
  return count;
}

void compare_route(const std::string& label, const route_case& c, const route_layouts& l, const route_host& want,
                   const route_host& got) {
  const std::size_t T = c.tokens, n = c.n, k = c.k;
  const std::size_t gaps = gap_writes(got.indices, l.indices) + gap_writes(got.weights, l.weights) +
                           gap_writes(got.probabilities, l.probabilities) + gap_writes(got.logits, l.logits);
  std::size_t differ = 0, ties = 0, untied = 0, invalid = 0, invalid_wrong = 0, masked_chosen = 0, logit_class = 0;
  double worst_w = 0, worst_p = 0, worst_l = 0;
  for (std::size_t t = 0; t < T; ++t) {
    double scale = 0;  // the row's largest finite |logit| on the CPU
    for (std::size_t i = 0; i < n; ++i) {
      const double v = at(want.logits, l.logits, t, i);
      if (std::isfinite(v)) scale = std::max(scale, std::fabs(v));
    }
    for (std::size_t i = 0; i < n; ++i) {
      const double w = at(want.logits, l.logits, t, i), g = at(got.logits, l.logits, t, i);
      if (!std::isfinite(w) || !std::isfinite(g)) {
        logit_class += !(std::isnan(w) && std::isnan(g)) && w != g;
      } else {
        worst_l = std::max(worst_l, scale > 0 ? std::fabs(g - w) / scale : (g == w ? 0.0 : INFINITY));
      }
    }
    const bool tie = near_tie(want.logits, l.logits, t, k);
    ties += tie;
    bool same = true;
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = at(got.indices, l.indices, t, j);
      same = same && e == at(want.indices, l.indices, t, j);
      masked_chosen +=
          e >= 0 && std::find(c.masked.begin(), c.masked.end(), static_cast<std::size_t>(e)) != c.masked.end();
    }
    differ += !same;
    untied += !same && !tie;
    if (same) {
      for (std::size_t j = 0; j < k; ++j) {
        worst_w = std::max(worst_w, distance(at(got.weights, l.weights, t, j), at(want.weights, l.weights, t, j)));
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      worst_p = std::max(worst_p, distance(at(got.probabilities, l.probabilities, t, i),
                                           at(want.probabilities, l.probabilities, t, i)));
    }
    if (at(want.indices, l.indices, t, 0) == no_expert) {  // invalid on the CPU: exactly -1, 0 and 0 on the GPU
      ++invalid;
      bool exact = true;
      for (std::size_t j = 0; j < k; ++j) {
        exact = exact && at(got.indices, l.indices, t, j) == no_expert && at(got.weights, l.weights, t, j) == 0.0f;
      }
      for (std::size_t i = 0; i < n; ++i) exact = exact && at(got.probabilities, l.probabilities, t, i) == 0.0f;
      invalid_wrong += !exact;
    }
  }
  char line[512];
  std::snprintf(line, sizeof line,
                "%s: choices differ in %zu of %zu tokens (%zu near ties on the CPU may differ); weight diff <= %.3g, "
                "probability diff <= %.3g (tolerance 1e-6); logits within %.3g of the row's largest |logit| "
                "(tolerance 1e-5); %zu invalid tokens",
                label.c_str(), differ, T, ties, worst_w, worst_p, worst_l, invalid);
  std::printf("%s\n", line);
  expect(gaps == 0, label + ": " + std::to_string(gaps) + " elements written outside the output views");
  expect(untied == 0, label + ": " + std::to_string(untied) + " tokens chose other experts without a near tie");
  expect(worst_w <= 1e-6, label + ": weights differ by more than 1e-6");
  expect(worst_p <= 1e-6, label + ": probabilities differ by more than 1e-6");
  expect(logit_class == 0,
         label + ": " + std::to_string(logit_class) + " logits not finite on one backend only (or another NaN/inf)");
  expect(worst_l <= 1e-5, label + ": logits differ by more than 1e-5 of the row's largest |logit|");
  expect(invalid_wrong == 0,
         label + ": " + std::to_string(invalid_wrong) + " invalid tokens not (-1, 0, 0) on the GPU");
  expect(masked_chosen == 0,
         label + ": a masked expert (bias -inf) was chosen " + std::to_string(masked_chosen) + " times");
  // The premises of the test, on the CPU's outputs.
  if (c.specials) {
    const bool minus_inf_invalid = c.kind == gate_kind::dense || !c.relu;
    expect(at(want.indices, l.indices, nan_token, 0) == no_expert &&
               at(want.indices, l.indices, inf_token, 0) == no_expert &&
               (!minus_inf_invalid || at(want.indices, l.indices, minus_inf_token, 0) == no_expert),
           label + ": test data: the NaN / +inf / -inf tokens are not invalid on the CPU");
  }
  if (c.masked.size() + k > n) {
    expect(at(want.indices, l.indices, 0, k - 1) == no_expert,
           label + ": test data: fewer than k unmasked, but k chosen");
  }
}

template <class A>
void run_route(const route_case& c, unsigned seed) {
  const std::size_t T = c.tokens, d = c.d, n = c.n, k = c.k;
  const bool dense = c.kind == gate_kind::dense;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const layout xl = shaped(T, d, c.unaligned), wl = shaped(n, d, c.unaligned);
  std::vector<A> x = filled<A>(xl.size());  // the gaps hold NaN: a read past a row's end would make a logit NaN
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t col = 0; col < d; ++col) at(x, xl, t, col) = A(normal(rng));
  }
  // W ~ N(0, 0.01^2): logits of about 0.1-0.2 (d = 64-320), whose rounding in another summation order (about 1e-7)
  // moves a probability by far less than the 1e-6 tolerance; with N(0, 0.05^2) it would come near it.
  std::vector<float> w = filled<float>(wl.size());
  if (dense) {
    for (std::size_t i = 0; i < n; ++i) {
      for (std::size_t col = 0; col < d; ++col) at(w, wl, i, col) = 0.01f * normal(rng);
    }
  }
  if (c.specials) {
    at(x, xl, nan_token, 3) = special_value<A>(special::quiet_nan);
    if (dense) {  // W's column 0 positive: an infinite x[t][0] makes every logit infinite, with its sign
      for (std::size_t i = 0; i < n; ++i) at(w, wl, i, 0) = 0.01f + std::fabs(at(w, wl, i, 0));
      at(x, xl, inf_token, 0) = special_value<A>(special::infinity);
      at(x, xl, minus_inf_token, 0) = special_value<A>(special::negative_infinity);
    } else {
      at(x, xl, inf_token, d / 2) = special_value<A>(special::infinity);
      for (std::size_t col = 0; col < d; ++col)
        at(x, xl, minus_inf_token, col) = special_value<A>(special::negative_infinity);
    }
  }
  std::vector<float> bias(n);
  for (float& b : bias) b = 0.1f * normal(rng);
  for (const std::size_t e : c.masked) bias[e] = -INFINITY;
  const device_array<A> dx(x);
  const device_array<float> dw(w), dbias(bias);
  const float* host_bias = c.bias ? bias.data() : nullptr;
  const float* device_bias = c.bias ? dbias.data() : nullptr;

  const route_layouts l{shaped(T, k, c.unaligned), shaped(T, k, c.unaligned), shaped(T, n, c.unaligned),
                        shaped(T, n, c.unaligned)};
  route_host want{filled<expert_index>(l.indices.size()), filled<float>(l.weights.size()),
                  filled<float>(l.probabilities.size()), filled<float>(l.logits.size())};
  device_array<expert_index> gi(l.indices.size());
  device_array<float> gw(l.weights.size()), gp(l.probabilities.size()), gl(l.logits.size());
  const auto outputs = [&](expert_index* i, float* wt, float* p, float* lg) {
    return route_outputs<float>{view(i, l.indices), view(wt, l.weights), view(p, l.probabilities), view(lg, l.logits)};
  };
  const select_options options{k, c.renormalize};
  const cuda_backend gpu{};
  if (dense) {
    std::vector<unsigned char> ws(cpu().route_workspace_size<A>(d, n));
    cpu().route_dense(dense_gate<float>{const_view(w.data(), wl), host_bias, c.relu}, const_view(x.data(), xl), options,
                      outputs(want.indices.data(), want.weights.data(), want.probabilities.data(), want.logits.data()),
                      ws.data(), ws.size());
    gpu.route_dense(dense_gate<float>{const_view(dw.data(), wl), device_bias, c.relu}, const_view(dx.data(), xl),
                    options, outputs(gi.data(), gw.data(), gp.data(), gl.data()), nullptr, 0, stream);
  } else {
    cpu().route_grap(grap_gate<float>{d, n, c.relu, host_bias}, const_view(x.data(), xl), options,
                     outputs(want.indices.data(), want.weights.data(), want.probabilities.data(), want.logits.data()));
    gpu.route_grap(grap_gate<float>{d, n, c.relu, device_bias}, const_view(dx.data(), xl), options,
                   outputs(gi.data(), gw.data(), gp.data(), gl.data()), stream);
  }
  sync(dense ? "route_dense" : "route_grap");
  const route_host got{gi.host(), gw.host(), gp.host(), gl.host()};
  std::string label = std::string(dense ? "route_dense " : "route_grap ") + type_name<A>() + " T=" + std::to_string(T) +
                      " d=" + std::to_string(d) + " n=" + std::to_string(n) + " k=" + std::to_string(k);
  if (!dense && d % n != 0) label += " (uneven blocks)";
  label += c.relu ? " relu" : " no-relu";
  if (c.bias) label += " bias";
  if (!c.masked.empty()) label += " (" + std::to_string(c.masked.size()) + " masked by -inf)";
  if (c.renormalize) label += " renormalized";
  if (c.unaligned) label += " unaligned";
  if (c.specials) label += " NaN/+inf/-inf tokens";
  compare_route(label, c, l, want, got);
}

/// n = 1025 is past the routes' limit: both refuse it with locmoe::error (naming the gate) and write nothing.
void refuse_past_limit() {
  const std::size_t T = 4, d = 1025, n = 1025, k = 2;
  const device_array<float> x(T * d), w(n * d);
  device_array<expert_index> indices(T * k);
  device_array<float> weights(T * k), probabilities(T * n), logits(T * n);
  const route_outputs<float> out{
      {indices.data(), T, k}, {weights.data(), T, k}, {probabilities.data(), T, n}, {logits.data(), T, n}};
  const cuda_backend gpu{};
  const thrown grap = what_throws([&] {
    gpu.route_grap(grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(x.data(), T, d),
                   select_options{k, false}, out, stream);
  });
  const thrown dense = what_throws([&] {
    gpu.route_dense(dense_gate<float>{{w.data(), n, d}, nullptr, false}, matrix_view<const float>(x.data(), T, d),
                    select_options{k, false}, out, nullptr, 0, stream);
  });
  sync("n = 1025");
  const bool nothing = holds_fill(indices) && holds_fill(weights) && holds_fill(probabilities) && holds_fill(logits);
  std::printf("route n=1025: route_grap threw on '%s' (%s); route_dense threw on '%s' (%s); outputs %s\n",
              grap.argument.c_str(), grap.message.c_str(), dense.argument.c_str(), dense.message.c_str(),
              nothing ? "untouched" : "WRITTEN");
  expect(grap.argument.rfind("gate", 0) == 0, "route_grap n=1025: not refused with a locmoe::error naming the gate");
  expect(dense.argument.rfind("gate", 0) == 0, "route_dense n=1025: not refused with a locmoe::error naming the gate");
  expect(nothing, "routes n=1025: a refused call wrote its outputs");
}

}  // namespace

void test_routes() {
  using G = gate_kind;
  const std::vector<std::size_t> none, many = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};  // 13 of 16: 3 left, k = 4
  unsigned seed = 100;
  // kind, T, d, n, k, relu, bias, renormalize, unaligned, specials, masked
  run_route<float>({G::grap, 2000, 320, 16, 2, true, false, false, false, true, none}, ++seed);
  run_route<float>({G::grap, 1500, 301, 64, 1, false, true, true, true, true, {5}}, ++seed);
  run_route<bf16>({G::grap, 1000, 301, 300, 4, true, true, false, true, true, none}, ++seed);
  run_route<fp16>({G::grap, 700, 1030, 1024, 2, false, true, true, false, true, {1023}}, ++seed);
  run_route<float>({G::grap, 600, 100, 16, 4, false, true, true, false, false, many}, ++seed);
  run_route<bf16>({G::grap, 1200, 512, 64, 2, true, false, true, false, true, none}, ++seed);
  run_route<fp16>({G::grap, 800, 301, 16, 1, false, true, false, true, true, {2}}, ++seed);
  run_route<float>({G::dense, 2000, 320, 16, 2, false, false, true, false, true, none}, ++seed);
  run_route<float>({G::dense, 1500, 301, 64, 4, false, true, false, true, true, {7}}, ++seed);
  run_route<bf16>({G::dense, 800, 301, 300, 2, true, true, true, true, false, none}, ++seed);
  run_route<fp16>({G::dense, 500, 256, 1024, 4, false, true, false, false, true, {0}}, ++seed);
  run_route<float>({G::dense, 600, 64, 16, 4, false, true, true, false, false, many}, ++seed);
  run_route<bf16>({G::dense, 700, 128, 16, 1, false, false, false, true, true, none}, ++seed);
  run_route<fp16>({G::dense, 600, 301, 64, 2, true, true, true, false, false, none}, ++seed);
  refuse_past_limit();
}

}  // namespace gpu_test
