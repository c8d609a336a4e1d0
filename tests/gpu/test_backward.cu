// combine_backward and dispatch_backward against the CPU backend, for float, bf16 and fp16 rows, on the layouts of
// test_rows.cu: combine_backward with grad_buffer and grad_weight, with grad_buffer only, and with grad_weight only;
// grad_buffer bit for bit (padding rows zero with kept counts; without them the rows no kept pair names keep their
// fill), grad_weight to 1e-5 of sum_c |grad_y[t][c] row[c]| (0 exactly for a dropped pair), and its gaps untouched;
// dispatch_backward's grad_x bit for bit. Rows no kept pair names hold NaN in the inputs.
#include "gpu_test.hpp"

#include <random>

namespace gpu_test {
namespace {

using namespace locmoe;

template <class A>
void backward_rows(const row_case& c, const assignment& a, const device_assignment& da, unsigned seed) {
  const std::size_t T = c.tokens, d = c.d, k = c.k, rows = a.rows(c.grouped);
  const pair_layout hp = pairs_of(a, a.expert.data(), a.slot.data(), c.kept ? a.kept.data() : nullptr,
                                  c.grouped ? a.offsets.data() : nullptr);
  const pair_layout gp = pairs_of(a, da.expert.data(), da.slot.data(), c.kept ? da.kept.data() : nullptr,
                                  c.grouped ? da.offsets.data() : nullptr);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> positive(0.1f, 1.0f);
  const cuda_backend gpu{};
  const layout yl = shaped(T, d, c.unaligned), bl = shaped(rows, d, c.unaligned), wl = shaped(T, k, c.unaligned);
  const std::vector<A> buffer = random_rows<A>(hp, bl, rng);
  std::vector<float> weight = filled<float>(wl.size());
  std::vector<A> grad_y = filled<A>(yl.size());
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t j = 0; j < k; ++j) at(weight, wl, t, j) = positive(rng);
    for (std::size_t col = 0; col < d; ++col) at(grad_y, yl, t, col) = A(normal(rng));
  }
  const device_array<A> dbuffer(buffer), dgrad_y(grad_y);
  const device_array<float> dweight(weight);

  struct variant {
    const char* name;
    bool grad_buffer, grad_weight;
  };
  for (const variant v : {variant{"grad_buffer + grad_weight", true, true}, variant{"grad_buffer only", true, false},
                          variant{"grad_weight only", false, true}}) {
    const std::string label = row_label("combine_backward", type_name<A>(), c) + " (" + v.name + ")";
    std::vector<A> want_gb = filled<A>(bl.size());
    std::vector<float> want_gw = filled<float>(wl.size());
    device_array<A> gb(bl.size());
    device_array<float> gw(wl.size());
    const auto host_gb = v.grad_buffer ? view(want_gb.data(), bl) : matrix_view<A>{};
    const auto host_gw = v.grad_weight ? view(want_gw.data(), wl) : matrix_view<float>{};
    cpu().combine_backward(hp, const_view(buffer.data(), bl), const_view(weight.data(), wl),
                           const_view(grad_y.data(), yl), host_gb, host_gw);
    gpu.combine_backward(gp, const_view(dbuffer.data(), bl), const_view(dweight.data(), wl),
                         const_view(dgrad_y.data(), yl), v.grad_buffer ? view(gb.data(), bl) : matrix_view<A>{},
                         v.grad_weight ? view(gw.data(), wl) : matrix_view<float>{}, stream);
    sync("combine_backward");
    const std::vector<A> got_gb = gb.host();
    const std::vector<float> got_gw = gw.host();
    const bit_diff db = compare_bits(want_gb, got_gb, &bl);  // absent: both keep the fill everywhere
    const bit_diff dw = compare_bits(want_gw, got_gw, &wl);
    std::size_t gw_bad = 0;
    double worst = 0;
    if (v.grad_weight) {
      for (std::size_t t = 0; t < T; ++t) {
        for (std::size_t j = 0; j < k; ++j) {
          const std::size_t p = t * k + j;
          const float want = at(want_gw, wl, t, j), got = at(got_gw, wl, t, j);
          if (!hp.kept(p)) {
            gw_bad += !(got == 0.0f && same_bits(got, want));
            continue;
          }
          double magnitude = 0;
          for (std::size_t col = 0; col < d; ++col) {
            magnitude += std::fabs(static_cast<double>(static_cast<float>(at(grad_y, yl, t, col))) *
                                   static_cast<double>(static_cast<float>(at(buffer, bl, hp.row(p), col))));
          }
          const double error = std::isnan(got) ? INFINITY : std::fabs(static_cast<double>(got) - want);
          worst = std::max(worst, error / magnitude);
          gw_bad += !(error <= 1e-5 * magnitude);
        }
      }
    }
    const std::size_t gw_gaps = dw.count - dw.inside;
    std::printf(
        "%s: grad_buffer %s (bit for bit); grad_weight within %.3g of sum |grad_y row| (tolerance 1e-5), %zu "
        "outside it, %zu gap elements written\n",
        label.c_str(), v.grad_buffer ? describe(db, want_gb, got_gb, &bl).c_str() : "absent",
        v.grad_weight ? worst : 0.0, gw_bad, gw_gaps);
    expect(db.same(), label + ": grad_buffer differs from the CPU's (or was written when absent)");
    expect(gw_bad == 0, label + ": grad_weight outside the tolerance");
    expect(v.grad_weight ? gw_gaps == 0 : dw.same(), label + ": grad_weight written outside its view (or when absent)");
  }

  // dispatch_backward
  const std::string label = row_label("dispatch_backward", type_name<A>(), c);
  const std::vector<A> grad_buffer = random_rows<A>(hp, bl, rng);
  std::vector<A> want_gx = filled<A>(yl.size());
  cpu().dispatch_backward(hp, const_view(grad_buffer.data(), bl), view(want_gx.data(), yl));
  const device_array<A> dgrad_buffer(grad_buffer);
  device_array<A> gx(yl.size());
  gpu.dispatch_backward(gp, const_view(dgrad_buffer.data(), bl), view(gx.data(), yl), stream);
  sync("dispatch_backward");
  const std::vector<A> got_gx = gx.host();
  const bit_diff dx = compare_bits(want_gx, got_gx, &yl);
  std::printf("%s: grad_x bit for bit: %s\n", label.c_str(), describe(dx, want_gx, got_gx, &yl).c_str());
  expect(dx.same(), label + ": grad_x differs from the CPU's");
}

}  // namespace

void test_backward() {
  const row_case cases[] = {
      {"capacity layout", 1001, 256, 16, 2, 100, false, false, false},
      {"capacity layout + kept counts, unaligned", 1001, 301, 64, 4, 60, true, true, false},
      {"grouped layout + kept counts, unaligned", 513, 301, 16, 1, 40, true, true, true},
  };
  unsigned seed = 300;
  for (const row_case& c : cases) {
    const assignment a = make_assignment(c.tokens, c.k, c.n, c.capacity, ++seed);
    const device_assignment da(a);
    backward_rows<float>(c, a, da, ++seed);
    backward_rows<bf16>(c, a, da, ++seed);
    backward_rows<fp16>(c, a, da, ++seed);
  }
}

}  // namespace gpu_test
