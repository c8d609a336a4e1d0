// Selection (select.hpp) and the fused GrAP route, differentially: random T, n, k, strides and values (NaN,
// +-inf, -0, denormals, 1e38, ties, any bit pattern) through the kernel on every instruction set this CPU has,
// against reference.hpp. Promised (select.hpp): invalid-token counts and chosen experts equal to the reference
// exactly; weights and probabilities within the tests' tolerance of it (relative (8 + n) eps, with the sum of n
// exponentials, below the smallest normal ignored); indices and logits identical on every instruction set.
// The public entry points must refuse k > n, k = 0 and n > max_experts with an error naming the argument.
#include "fuzz_input.hpp"

#include <locmoe/reference.hpp>
#include <locmoe/select.hpp>

#include "../kernel_util.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

using locmoe::expert_index;
using locmoe_test::buffer;

namespace {

template <class S>
bool close(S got, S want, std::size_t n) {
  if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
  if (std::isinf(want) || std::isinf(got)) return got == want;
  const double tolerance = double(8 + n) * std::numeric_limits<S>::epsilon();
  return std::abs(double(got) - double(want)) <= tolerance * std::abs(double(want)) + double(std::numeric_limits<S>::min());
}

template <class S>
void selection(locmoe_fuzz::input& in) {
  const std::size_t n = in.flag() ? in.size_between(1, 300) : in.size_between(1, 20);
  const std::size_t rows = in.size_between(0, 6);
  const std::size_t stride = n + in.size_between(0, 3);
  const bool softmax = in.flag();
  const std::size_t k = softmax ? in.size_between(0, n) : in.size_between(1, n);
  const bool renormalize = k > 0 && in.flag();
  buffer<S> scores(rows, n, stride, std::numeric_limits<S>::quiet_NaN());  // padding is never read
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t j = 0; j < n; ++j) scores(t, j) = in.value<S>();

  buffer<expert_index> ref_idx(rows, k, 0, 99);
  buffer<S> ref_w(rows, k), ref_p(rows, n);
  const auto probabilities = [&](buffer<S>& p) { return softmax ? p.view() : locmoe::matrix_view<S>{}; };
  const std::size_t ref_invalid = locmoe::reference::select(scores.cview(), k, softmax, renormalize, ref_idx.view(),
                                                            ref_w.view(), probabilities(ref_p));
  std::vector<expert_index> first_idx;
  locmoe_test::for_each_arch([&](auto arch) {
    const std::string where = std::string(decltype(arch)::name()) + ", n " + std::to_string(n) + ", k " +
                              std::to_string(k) + ", T " + std::to_string(rows);
    buffer<expert_index> idx(rows, k, 0, 99);
    buffer<S> w(rows, k), p(rows, n);
    const std::size_t invalid = locmoe_test::select_on(arch, scores.cview(), {k, softmax, renormalize},
                                                       probabilities(p), idx.view(), w.view());
    LOCMOE_FUZZ_CHECK(invalid == ref_invalid, where);
    LOCMOE_FUZZ_CHECK(idx.data == ref_idx.data, where);
    if (first_idx.empty()) first_idx = idx.data;
    LOCMOE_FUZZ_CHECK(idx.data == first_idx, where);
    for (std::size_t i = 0; i < w.data.size(); ++i)
      LOCMOE_FUZZ_CHECK(close(w.data[i], ref_w.data[i], n), where + ", weight " + std::to_string(i));
    if (softmax)
      for (std::size_t i = 0; i < p.data.size(); ++i)
        LOCMOE_FUZZ_CHECK(close(p.data[i], ref_p.data[i], n), where + ", probability " + std::to_string(i));
  });
}

// GrAP logits on every instruction set are identical, and its selection is the reference's on those logits.
void grap(locmoe_fuzz::input& in) {
  const std::size_t n = in.size_between(1, 40);
  const std::size_t d = n * in.size_between(1, 4) + in.size_between(0, n - 1);
  const std::size_t rows = in.size_between(0, 5);
  const std::size_t k = in.size_between(1, n);
  const bool relu = in.flag(), renormalize = in.flag(), with_bias = in.flag();
  std::vector<float> bias(n);
  for (float& b : bias) b = in.value<float>();
  buffer<float> x(rows, d, d + in.size_between(0, 2), std::numeric_limits<float>::quiet_NaN());
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t j = 0; j < d; ++j) x(t, j) = in.value<float>();
  const locmoe::grap_gate<float> gate{d, n, relu, with_bias ? bias.data() : nullptr};

  std::vector<float> first_logits;
  locmoe_test::for_each_arch([&](auto arch) {
    const std::string where = std::string(decltype(arch)::name()) + ", grap n " + std::to_string(n) + ", d " +
                              std::to_string(d) + ", k " + std::to_string(k);
    buffer<float> logits(rows, n), w(rows, k), p(rows, n);
    buffer<expert_index> idx(rows, k, 0, 99);
    const std::size_t invalid =
        locmoe_test::grap_route_on(arch, gate, x.cview(), {k, renormalize}, {idx.view(), w.view(), p.view(), logits.view()});
    if (first_logits.empty()) first_logits = logits.data;
    for (std::size_t i = 0; i < logits.data.size(); ++i) {
      const float a = logits.data[i], b = first_logits[i];
      LOCMOE_FUZZ_CHECK((std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, sizeof a) == 0, where + ": logits differ between sets");
    }
    buffer<expert_index> ref_idx(rows, k, 0, 99);
    buffer<float> ref_w(rows, k), ref_p(rows, n);
    const std::size_t ref_invalid = locmoe::reference::select(logits.cview(), k, true, renormalize, ref_idx.view(),
                                                              ref_w.view(), ref_p.view());
    LOCMOE_FUZZ_CHECK(invalid == ref_invalid, where);
    LOCMOE_FUZZ_CHECK(idx.data == ref_idx.data, where);
    for (std::size_t i = 0; i < w.data.size(); ++i)
      LOCMOE_FUZZ_CHECK(close(w.data[i], ref_w.data[i], n), where + ", weight " + std::to_string(i));
  });
}

// The public entry point's argument checks: n beyond max_experts, k = 0 or k > n.
void arguments(locmoe_fuzz::input& in) {
  const std::size_t n = in.flag() ? in.size_between(locmoe::max_experts - 2, locmoe::max_experts + 2) : in.size_between(0, 8);
  const std::size_t k = in.size_between(0, n + 2);
  buffer<float> logits(1, n);
  for (std::size_t j = 0; j < n; ++j) logits(0, j) = in.value<float>();
  buffer<float> w(1, k);
  buffer<expert_index> idx(1, k);
  const bool valid_n = n >= 1 && n <= locmoe::max_experts, valid_k = k >= 1 && k <= n;
  try {
    const std::size_t invalid = locmoe::softmax_top_k(logits.cview(), {k, false}, idx.view(), w.view());
    LOCMOE_FUZZ_CHECK(valid_n && valid_k, "accepted n " + std::to_string(n) + ", k " + std::to_string(k));
    LOCMOE_FUZZ_CHECK(invalid <= 1, "one token");
  } catch (const locmoe::error& e) {
    LOCMOE_FUZZ_CHECK(!(valid_n && valid_k), std::string("refused valid arguments: ") + e.what());
    LOCMOE_FUZZ_CHECK(e.argument() == (valid_n ? "k" : "n"), e.what());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  locmoe_fuzz::input in(data, size);
  switch (in.raw<std::uint8_t>() % 4) {
    case 0: selection<float>(in); break;
    case 1: selection<double>(in); break;
    case 2: grap(in); break;
    default: arguments(in); break;
  }
  return 0;
}
