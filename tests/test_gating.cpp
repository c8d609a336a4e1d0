// gating.hpp and the fused grap_route: GrAP and dense gates against the scalar reference on every
// instruction set; half-precision decoding of every bit pattern; gradients against central finite
// differences in double; non-finite activations; bad arguments.
#include <locmoe/reference.hpp>
#include <locmoe/select.hpp>

#include "kernel_util.hpp"
#include "test_util.hpp"

#include <boost/multiprecision/cpp_int.hpp>
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using locmoe::expert_index;
using locmoe::no_expert;
using locmoe_test::buffer;
using locmoe_test::relative_error;

namespace {

using wide = boost::multiprecision::uint128_t;

template <class T>
buffer<T> random_activations(std::mt19937_64& rng, std::size_t rows, std::size_t d, std::size_t stride = 0) {
  buffer<T> x(rows, d, stride);
  std::normal_distribution<double> normal(0.0, 1.0);
  for (std::size_t t = 0; t < rows; ++t)
    for (std::size_t j = 0; j < d; ++j) x(t, j) = static_cast<T>(normal(rng) + 0.05 * static_cast<double>(j % 7));
  return x;
}

template <class T>
double logit_tolerance() {
  return std::is_same_v<T, double> ? 1e-13 : 2e-6;
}

}  // namespace

TEST_CASE("GrAP blocks: floor(i d / n) boundaries, sizes differ by at most one") {
  for (const std::size_t n : {1, 2, 3, 7, 16, 257}) {
    for (const std::size_t d : std::vector<std::size_t>{n, n + 1, 2 * n - 1, 1000 + n, 5120}) {
      if (d < n) continue;
      std::size_t covered = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const auto begin = locmoe::grap_block_begin(d, n, i);
        CHECK(begin == covered);
        CHECK(begin == static_cast<std::size_t>(wide(i) * d / n));
        const auto size = locmoe::grap_block_size(d, n, i);
        CHECK((size == d / n || size == d / n + 1));
        covered += size;
      }
      CHECK(covered == d);
    }
  }
  // Exact where i * d overflows 64 bits.
  const std::size_t d = (std::size_t(1) << 62) + 12345, n = 1000;
  CHECK(locmoe::grap_block_begin(d, n, 999) == static_cast<std::size_t>(wide(999) * d / n));
  CHECK(locmoe::grap_block_begin(d, n, n) == d);
}

TEST_CASE_TEMPLATE("GrAP route matches the scalar reference on every instruction set", T, float, double,
                   locmoe::bf16, locmoe::fp16) {
  using S = locmoe::accumulate_t<T>;
  std::mt19937_64 rng(42);
  for (const std::size_t n : {1, 2, 3, 16, 257}) {
    for (const std::size_t d : std::vector<std::size_t>{n, n + 5, 1000, 1027}) {
      if (d < n) continue;
      for (const bool relu : {true, false}) {
        const std::size_t rows = 1 + rng() % 9;
        const auto x = random_activations<T>(rng, rows, d, d + rng() % 3);
        std::vector<S> bias(n);
        for (auto& b : bias) b = static_cast<S>(std::normal_distribution<double>(0.0, 0.1)(rng));
        const locmoe::grap_gate<S> gate{d, n, relu, bias.data()};
        const std::size_t k = std::min<std::size_t>(n, 2);
        buffer<double> ref(rows, n);  // the reference in double
        locmoe::reference::grap_logits(gate, x.cview(), ref.view());
        std::vector<S> first_logits, first_weights, first_probs;
        locmoe_test::for_each_arch([&](auto arch) {
          CAPTURE(decltype(arch)::name());
          CAPTURE(n);
          CAPTURE(d);
          CAPTURE(relu);
          buffer<S> logits(rows, n), probs(rows, n), w(rows, k);
          buffer<expert_index> idx(rows, k);
          CHECK(locmoe_test::grap_route_on(arch, gate, x.cview(), {k, false},
                                           {idx.view(), w.view(), probs.view(), logits.view()}) == 0);
          for (std::size_t t = 0; t < rows; ++t) {
            for (std::size_t i = 0; i < n; ++i)
              CHECK(std::abs(logits(t, i) - ref(t, i)) <= logit_tolerance<T>() * (1 + std::abs(ref(t, i))));
            // The chosen expert has the highest logit, up to rounding; the lowest index among equals.
            const double best = *std::max_element(&ref(t, 0), &ref(t, 0) + n);
            CHECK(ref(t, static_cast<std::size_t>(idx(t, 0))) >= best - 1e-5);
            CHECK(idx(t, 0) == static_cast<expert_index>(std::max_element(&logits(t, 0), &logits(t, 0) + n) - &logits(t, 0)));
          }
          // Identical logits on every instruction set.
          if (first_logits.empty()) first_logits = logits.data, first_weights = w.data, first_probs = probs.data;
          CHECK(std::memcmp(first_logits.data(), logits.data.data(), logits.data.size() * sizeof(S)) == 0);
          // Weights and probabilities: within 4 ulps between sets (select.hpp; measured: 3).
          std::uint64_t farthest = 0;
          for (std::size_t i = 0; i < w.data.size(); ++i) farthest = std::max(farthest, locmoe_test::ulp_distance(w.data[i], first_weights[i]));
          for (std::size_t i = 0; i < probs.data.size(); ++i) farthest = std::max(farthest, locmoe_test::ulp_distance(probs.data[i], first_probs[i]));
          CHECK(farthest <= 4);
          // The fused path equals gate, then select, bit for bit.
          buffer<S> logits2(rows, n), w2(rows, k), p2(rows, n);
          buffer<expert_index> idx2(rows, k);
          locmoe::grap_logits(gate, x.cview(), logits2.view());
          CHECK(logits2.data == logits.data);
          locmoe_test::select_on(arch, logits2.cview(), {k, true, false}, p2.view(), idx2.view(), w2.view());
          CHECK(idx2.data == idx.data);
          CHECK(w2.data == w.data);
          CHECK(p2.data == probs.data);
        });
      }
    }
  }
}

TEST_CASE_TEMPLATE("half-precision activations decode exactly, every bit pattern, SIMD and tail", T, locmoe::bf16,
                   locmoe::fp16) {
  // n = 1, d = 64: a block of 64 halves goes through the SIMD path; d = 1: through the scalar tail. One
  // nonzero per row (at an even or an odd position) makes the mean exactly value / d.
  for (const std::size_t d : {64, 1}) {
    buffer<T> x(65536, d);
    for (std::uint32_t bits = 0; bits < 65536; ++bits) {
      x(bits, bits % d) = Eigen::numext::bit_cast<T>(static_cast<std::uint16_t>(bits));
    }
    const locmoe::grap_gate<float> gate{d, 1, false, nullptr};
    locmoe_test::for_each_arch([&](auto arch) {
      CAPTURE(decltype(arch)::name());
      buffer<float> logits(65536, 1), w(65536, 1);
      buffer<expert_index> idx(65536, 1);
      locmoe_test::grap_route_on(arch, gate, x.cview(), {1, false}, {idx.view(), w.view(), {}, logits.view()});
      std::size_t wrong = 0;
      for (std::uint32_t bits = 0; bits < 65536; ++bits) {
        const float want = static_cast<float>(x(bits, bits % d)) / static_cast<float>(d);
        const float got = logits(bits, 0);
        if (!(got == want || (std::isnan(got) && std::isnan(want)))) ++wrong;
      }
      CHECK(wrong == 0);
    });
  }
}

TEST_CASE("bf16 and fp16 round activations to nearest even; the gate sees the rounded values") {
  // bf16 keeps 7 mantissa bits: neighbours of 1 are 1 and 1 + 2^-7, with the midpoint at 1 + 2^-8.
  CHECK(static_cast<float>(locmoe::bf16(1.0f + 0x1p-8f + 0x1p-12f)) == 1.0f + 0x1p-7f);  // above: up
  CHECK(static_cast<float>(locmoe::bf16(1.0f + 0x1p-8f)) == 1.0f);                 // tie to even
  CHECK(static_cast<float>(locmoe::bf16(1.0f + 3 * 0x1p-8f)) == 1.0f + 0x1p-6f);   // tie to even (up)
  CHECK(static_cast<float>(locmoe::fp16(65520.0f)) == std::numeric_limits<float>::infinity());
  buffer<locmoe::bf16> xb(1, 4);
  for (std::size_t j = 0; j < 4; ++j) xb(0, j) = locmoe::bf16(1.0f + 0x1p-8f);
  buffer<float> logits(1, 1);
  locmoe::grap_logits(locmoe::grap_gate<float>{4, 1, false, nullptr}, xb.cview(), logits.view());
  CHECK(logits(0, 0) == 1.0f);
}

TEST_CASE_TEMPLATE("non-finite activations make the token invalid, never an arbitrary expert", T, float,
                   locmoe::bf16, locmoe::fp16) {
  std::mt19937_64 rng(3);
  auto x = random_activations<T>(rng, 5, 100);
  x(1, 3) = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
  x(2, 50) = static_cast<T>(std::numeric_limits<float>::infinity());
  x(3, 99) = static_cast<T>(-std::numeric_limits<float>::infinity());  // ReLU would hide a -inf mean
  const locmoe::grap_gate<float> gate{100, 4};
  buffer<float> w(5, 2), logits(5, 4);
  buffer<expert_index> idx(5, 2);
  CHECK(locmoe::grap_route(gate, x.cview(), {2, false}, {idx.view(), w.view(), {}, logits.view()}) == 2);
  CHECK(idx(1, 0) == no_expert);
  CHECK(idx(2, 1) == no_expert);
  CHECK(w(1, 0) == 0.0f);
  CHECK(std::isnan(logits(1, 0)));  // the logits show why
  CHECK(idx(3, 0) != no_expert);    // ReLU(-inf) = 0: a finite logit, a valid token
  CHECK(logits(3, 3) == 0.0f);
  CHECK(idx(0, 0) != no_expert);
}

TEST_CASE("dense gate matches the scalar reference; bf16 through the workspace") {
  std::mt19937_64 rng(8);
  const std::size_t rows = 300, d = 37, n = 5;  // 300 rows: two workspace chunks
  const auto x = random_activations<float>(rng, rows, d);
  const auto w = random_activations<float>(rng, n, d, d + 2);
  std::vector<float> bias = {0.1f, -0.2f, 0.3f, 0.0f, -1.0f};
  for (const bool relu : {false, true}) {
    const locmoe::dense_gate<float> gate{w.cview(), bias.data(), relu};
    buffer<double> ref(rows, n);
    locmoe::reference::dense_logits(gate, x.cview(), ref.view());
    buffer<float> logits(rows, n);
    CHECK(locmoe::dense_logits(gate, x.cview(), logits.view()));
    for (std::size_t i = 0; i < logits.data.size() - 1; ++i) CHECK(std::abs(logits.data[i] - ref.data[i]) < 1e-5);

    buffer<locmoe::bf16> xb(rows, d);
    for (std::size_t t = 0; t < rows; ++t)
      for (std::size_t j = 0; j < d; ++j) xb(t, j) = locmoe::bf16(x(t, j));
    locmoe::reference::dense_logits(gate, xb.cview(), ref.view());
    std::vector<float> workspace(locmoe::dense_workspace_size<locmoe::bf16>(d, n));
    CHECK(locmoe::dense_logits(gate, xb.cview(), logits.view(), {}, workspace.data(), workspace.size()));
    for (std::size_t i = 0; i < logits.data.size() - 1; ++i) CHECK(std::abs(logits.data[i] - ref.data[i]) < 1e-5);
    CHECK_THROWS_WITH_AS(locmoe::dense_logits(gate, xb.cview(), logits.view()), doctest::Contains("workspace"),
                         locmoe::error);

    buffer<float> w1(rows, 1);
    buffer<expert_index> idx(rows, 1);
    CHECK(locmoe::dense_route(gate, x.cview(), {1, false}, {idx.view(), w1.view(), {}, logits.view()}) == 0);
    for (std::size_t t = 0; t < rows; ++t)
      CHECK(idx(t, 0) == static_cast<expert_index>(std::max_element(&logits(t, 0), &logits(t, 0) + n) - &logits(t, 0)));
  }
}

namespace {

// L = sum_t,i c_ti logit_ti: dL/dlogits = c. Central differences of the double reference forward.
template <class Forward>
double central_difference(std::vector<double>& parameter, std::size_t index, const Forward& loss) {
  const double h = 1e-6, saved = parameter[index];
  parameter[index] = saved + h;
  const double up = loss();
  parameter[index] = saved - h;
  const double down = loss();
  parameter[index] = saved;
  return (up - down) / (2 * h);
}

}  // namespace

TEST_CASE("GrAP backward equals central finite differences (ReLU and bias included)") {
  std::mt19937_64 rng(13);
  const std::size_t rows = 4, d = 23, n = 5;
  auto xb = random_activations<double>(rng, rows, d);
  std::vector<double> x(xb.data.begin(), xb.data.end() - 1), bias = {0.3, -0.4, 0.05, -2.0, 0.2}, c(rows * n);
  for (auto& v : c) v = std::normal_distribution<double>(0.0, 1.0)(rng);
  const auto loss = [&] {
    buffer<double> logits(rows, n);
    locmoe::reference::grap_logits(locmoe::grap_gate<double>{d, n, true, bias.data()},
                                   locmoe::matrix_view<const double>(x.data(), rows, d), logits.view());
    double l = 0;
    for (std::size_t i = 0; i < rows * n; ++i) l += c[i] * logits.data[i];
    return l;
  };
  buffer<double> logits(rows, n), pre(rows, n), grad_x(rows, d);
  const locmoe::grap_gate<double> gate{d, n, true, bias.data()};
  locmoe::grap_logits(gate, locmoe::matrix_view<const double>(x.data(), rows, d), logits.view());
  locmoe::grap_logits(locmoe::grap_gate<double>{d, n, false, bias.data()},
                      locmoe::matrix_view<const double>(x.data(), rows, d), pre.view());
  std::size_t inactive = 0;
  for (std::size_t i = 0; i < rows * n; ++i) {
    REQUIRE(std::abs(pre.data[i]) > 1e-4);  // away from the kink, where differences are valid
    inactive += logits.data[i] <= 0;
  }
  CHECK(inactive > 0);  // the ReLU mask is exercised
  std::vector<double> grad_bias(n);
  CHECK(locmoe::grap_backward(gate, logits.cview(), locmoe::matrix_view<const double>(c.data(), rows, n),
                              grad_x.view(), grad_bias.data()));
  for (std::size_t i = 0; i < rows * d; ++i) CHECK(std::abs(grad_x.data[i] - central_difference(x, i, loss)) < 1e-8);
  for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(grad_bias[i] - central_difference(bias, i, loss)) < 1e-8);
}

TEST_CASE("dense backward equals central finite differences (ReLU, bias, W, x)") {
  std::mt19937_64 rng(17);
  const std::size_t rows = 5, d = 9, n = 4;
  auto xb = random_activations<double>(rng, rows, d), wb = random_activations<double>(rng, n, d);
  std::vector<double> x(xb.data.begin(), xb.data.end() - 1), w(wb.data.begin(), wb.data.end() - 1);
  std::vector<double> bias = {0.5, -0.5, 0.1, -3.0}, c(rows * n);
  for (auto& v : c) v = std::normal_distribution<double>(0.0, 1.0)(rng);
  const auto gate_of = [&] { return locmoe::dense_gate<double>{{w.data(), n, d}, bias.data(), true}; };
  const auto loss = [&] {
    buffer<double> logits(rows, n);
    locmoe::reference::dense_logits(gate_of(), locmoe::matrix_view<const double>(x.data(), rows, d), logits.view());
    double l = 0;
    for (std::size_t i = 0; i < rows * n; ++i) l += c[i] * logits.data[i];
    return l;
  };
  buffer<double> logits(rows, n), pre(rows, n), grad_x(rows, d), grad_w(n, d);
  const locmoe::matrix_view<const double> xv(x.data(), rows, d);
  locmoe::dense_logits(gate_of(), xv, logits.view());
  locmoe::dense_logits(locmoe::dense_gate<double>{{w.data(), n, d}, bias.data(), false}, xv, pre.view());
  std::size_t inactive = 0;
  for (std::size_t i = 0; i < rows * n; ++i) {
    REQUIRE(std::abs(pre.data[i]) > 1e-4);
    inactive += logits.data[i] <= 0;
  }
  CHECK(inactive > 0);
  std::vector<double> grad_bias(n), workspace(locmoe::dense_workspace_size<double>(d, n, true));
  CHECK(locmoe::dense_backward(gate_of(), xv, logits.cview(), locmoe::matrix_view<const double>(c.data(), rows, n),
                               grad_x.view(), grad_w.view(), grad_bias.data(), workspace.data(), workspace.size()));
  for (std::size_t i = 0; i < rows * d; ++i) CHECK(std::abs(grad_x.data[i] - central_difference(x, i, loss)) < 1e-7);
  for (std::size_t i = 0; i < n * d; ++i) CHECK(std::abs(grad_w.data[i] - central_difference(w, i, loss)) < 1e-7);
  for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(grad_bias[i] - central_difference(bias, i, loss)) < 1e-7);
}

TEST_CASE("gates reject bad arguments, naming them") {
  buffer<float> x(3, 10), logits(3, 4);
  const auto message = [](auto&& call) -> std::string {
    try {
      call();
    } catch (const locmoe::error& e) {
      return e.what();
    }
    return "no error";
  };
  CHECK(message([&] { locmoe::grap_logits(locmoe::grap_gate<float>{10, 0}, x.cview(), logits.view()); }) ==
        "locmoe::grap_logits: gate.experts = 0: must be >= 1");
  CHECK(message([&] { locmoe::grap_logits(locmoe::grap_gate<float>{3, 4}, x.cview(), logits.view()); }) ==
        "locmoe::grap_logits: gate.hidden = 3: must be >= gate.experts (every GrAP block needs a feature)");
  CHECK(message([&] { locmoe::grap_logits(locmoe::grap_gate<float>{11, 4}, x.cview(), logits.view()); }) ==
        "locmoe::grap_logits: x = 3x10: must have gate.hidden columns (d)");
  CHECK(message([&] { locmoe::grap_logits(locmoe::grap_gate<float>{10, 5}, x.cview(), logits.view()); }) ==
        "locmoe::grap_logits: logits = 3x4: must have gate.experts columns (n)");
  buffer<float> w(2, 4), wi(2, 4);
  buffer<expert_index> idx(3, 5);
  CHECK(message([&] {
          locmoe::grap_route(locmoe::grap_gate<float>{10, 4}, x.cview(), {5, false},
                             {idx.view(), wi.view(), {}, {}});
        }) == "locmoe::grap_route: k = 5: must satisfy 1 <= k <= n");
  CHECK(message([&] {
          locmoe::dense_logits(locmoe::dense_gate<float>{w.cview()}, x.cview(), logits.view());
        }) == "locmoe::dense_logits: gate.weight = 2x4: must have as many columns as x (d)");
  errno = 0;
  const bool ok = locmoe::grap_logits(locmoe::grap_gate<float>{10, 0}, x.cview(), logits.view(), {}, locmoe::errno_on_error{});
  const int error_number = errno;  // read before any CHECK, which may print
  CHECK_FALSE(ok);
  CHECK(error_number == EDOM);
}

TEST_CASE("as_view wraps row-major Eigen matrices, maps and blocks without copying") {
  using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  row_major m(4, 6);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<float>(i);
  const auto whole = locmoe::as_view(m);
  CHECK(whole.data == m.data());
  CHECK((whole.rows == 4 && whole.cols == 6 && whole.stride == 6));
  auto block = m.block(1, 2, 3, 3);
  const auto part = locmoe::as_view(block);
  CHECK((part.rows == 3 && part.cols == 3 && part.stride == 6));
  CHECK(part(1, 2) == m(2, 4));
  part(0, 0) = -1.0f;  // writes through to m
  CHECK(m(1, 2) == -1.0f);
  const row_major& cm = m;
  const auto read_only = locmoe::as_view(cm);
  static_assert(std::is_same_v<decltype(read_only), const locmoe::matrix_view<const float>>);
  CHECK(read_only(3, 5) == 23.0f);
  const auto one_row = locmoe::as_view(m.row(2));
  CHECK((one_row.rows == 1 && one_row.cols == 6 && one_row(0, 1) == m(2, 1)));
}
