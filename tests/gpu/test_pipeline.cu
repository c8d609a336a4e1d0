// grap_pipeline<cuda_backend>::run and ::combine end to end against grap_pipeline<cpu_backend>, float and bf16
// activations. x holds multiples of 1/4 in [-2, 2], so every GrAP block sum is exact in any order and the logits are
// the same bits on both backends: the choices must be equal (no near-tie allowance; ties go to the lower index on
// both), and so must the slots, counts and the dispatched buffer (padding rows zero), bit for bit; weights and
// probabilities to 1e-6. combine then runs on the CPU's weights, uploaded into the GPU's weights (the exponentials
// may differ in the last bit), and y is compared bit for bit.
#include "gpu_test.hpp"

#include <random>

namespace gpu_test {
namespace {

using namespace locmoe;

double worst_distance(const std::vector<float>& want, const std::vector<float>& got) {
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const bool nan_w = std::isnan(want[i]), nan_g = std::isnan(got[i]);
    const double d =
        nan_w || nan_g ? (nan_w && nan_g ? 0.0 : INFINITY) : std::fabs(static_cast<double>(got[i]) - want[i]);
    worst = std::max(worst, d);
  }
  return worst;
}

template <class A>
void pipeline_case(std::size_t T, std::size_t d, std::size_t n, std::size_t k, std::int64_t capacity, bool unaligned,
                   unsigned seed) {
  const router_shape shape{T, d, n, k, capacity};
  const grap_pipeline<cpu_backend> host_pipeline(cpu(), shape);
  const cuda_backend gpu{};
  const grap_pipeline<cuda_backend> device_pipeline(gpu, shape);
  const std::size_t rows = host_pipeline.buffer_rows();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> quarter(-8, 8);
  const layout xl = shaped(T, d, unaligned), bl = shaped(rows, d, unaligned), il{T, k, k, 0},
               pl = shaped(T, n, unaligned);
  std::vector<A> x = filled<A>(xl.size());
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t col = 0; col < d; ++col) at(x, xl, t, col) = A(0.25f * static_cast<float>(quarter(rng)));
  }
  const grap_gate<float> gate{d, n, true, nullptr};
  const std::string label = std::string("grap_pipeline ") + type_name<A>() + " T=" + std::to_string(T) +
                            " d=" + std::to_string(d) + " n=" + std::to_string(n) + " k=" + std::to_string(k) +
                            " C=" + std::to_string(capacity) + (unaligned ? " unaligned" : "");

  // The CPU.
  std::vector<expert_index> ci = filled<expert_index>(il.size()), ce = filled<expert_index>(il.size());
  std::vector<slot_index> cs = filled<slot_index>(il.size());
  std::vector<float> cw = filled<float>(il.size()), cp = filled<float>(pl.size());
  std::vector<std::int64_t> croutes = filled<std::int64_t>(n), ckept = filled<std::int64_t>(n);
  std::vector<A> cb = filled<A>(bl.size()), cy = filled<A>(xl.size());
  std::vector<unsigned char> cws(host_pipeline.workspace_size());
  const pipeline_outputs<float> host_out{view(ci.data(), il), view(cw.data(), il), view(cp.data(), pl),
                                         view(ce.data(), il), view(cs.data(), il), croutes.data(),
                                         ckept.data()};
  host_pipeline.run(gate, const_view(x.data(), xl), host_out, view(cb.data(), bl), cws.data(), cws.size());
  host_pipeline.combine(host_out, const_view(cb.data(), bl), view(cy.data(), xl));

  // The GPU.
  const device_array<A> dx(x);
  device_array<expert_index> gi(il.size()), ge(il.size());
  device_array<slot_index> gs(il.size());
  device_array<float> gw(il.size()), gp(pl.size());
  device_array<std::int64_t> groutes(n), gkept(n);
  device_array<A> gb(bl.size()), gy(xl.size());
  device_array<unsigned char> gws(device_pipeline.workspace_size());
  const pipeline_outputs<float> device_out{view(gi.data(), il), view(gw.data(), il), view(gp.data(), pl),
                                           view(ge.data(), il), view(gs.data(), il), groutes.data(),
                                           gkept.data()};
  device_pipeline.run(gate, const_view(dx.data(), xl), device_out, view(gb.data(), bl), gws.data(), gws.size(), stream);
  sync("grap_pipeline::run");
  const bit_diff di = compare_bits(ci, gi.host()), de = compare_bits(ce, ge.host()), ds = compare_bits(cs, gs.host());
  const bit_diff dr = compare_bits(croutes, groutes.host()), dk = compare_bits(ckept, gkept.host());
  const std::vector<A> got_b = gb.host();
  const bit_diff db = compare_bits(cb, got_b, &bl);
  const double worst_w = worst_distance(cw, gw.host()), worst_p = worst_distance(cp, gp.host());
  std::size_t dropped = 0;
  for (std::size_t e = 0; e < n; ++e) dropped += static_cast<std::size_t>(croutes[e] - ckept[e]);
  std::printf(
      "%s run: indices %zu differ, expert %zu, slot %zu, counts %zu (bit for bit); buffer %s; weight diff <= "
      "%.3g, probability diff <= %.3g (tolerance 1e-6); %zu choices dropped by capacity\n",
      label.c_str(), di.count, de.count, ds.count, dr.count + dk.count, describe(db, cb, got_b, &bl).c_str(), worst_w,
      worst_p, dropped);
  expect(di.same(), label + ": choices differ from the CPU's (the logits are exact: no near tie)");
  expect(de.same() && ds.same() && dr.same() && dk.same(), label + ": slots or counts differ from the CPU's");
  expect(db.same(), label + ": the dispatched buffer differs from the CPU's");
  expect(worst_w <= 1e-6 && worst_p <= 1e-6, label + ": weights or probabilities differ by more than 1e-6");
  expect(dropped > 0, label + ": test premise: no choice dropped by capacity");

  gw.upload(cw);  // combine on the CPU's weights: y bit for bit
  device_pipeline.combine(device_out, const_view(gb.data(), bl), view(gy.data(), xl), stream);
  sync("grap_pipeline::combine");
  const std::vector<A> got_y = gy.host();
  const bit_diff dy = compare_bits(cy, got_y, &xl);
  std::printf("%s combine: y bit for bit: %s\n", label.c_str(), describe(dy, cy, got_y, &xl).c_str());
  expect(dy.same(), label + ": combine's y differs from the CPU's");
}

}  // namespace

void test_pipeline() {
  pipeline_case<float>(3000, 256, 16, 2, 300, false, 400);
  pipeline_case<bf16>(2001, 301, 64, 4, 100, true, 401);
}

}  // namespace gpu_test
