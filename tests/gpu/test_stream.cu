// The caller's stream: each step (route_grap, route_dense, assign_slots, dispatch, combine, combine_backward,
// dispatch_backward) is recorded on the test stream into a graph. It must queue work there (the graph has nodes),
// run nothing before the graph's launch (its outputs still hold their fill: work queued on another stream, the
// legacy one included, would have run), and not synchronize (that fails the capture; assign_slots runs with
// device_checks::deferred, the mode documented not to wait). After the launch the results are the CPU's, each
// step's reference computed from the GPU's own inputs to it. x holds multiples of 1/4 in [-2, 2] and W multiples of
// 1/8 in [-1, 1], so every sum of the routes is exact in any order: indices and logits compare bit for bit.
#include "gpu_test.hpp"

#include <random>

namespace gpu_test {
namespace {

using namespace locmoe;

/// Records `queue`, checks that it queued work and ran none of it, launches it; false (and a failure) if not.
template <class F, class... Outputs>
bool run_captured(const std::string& step, std::vector<std::size_t>& nodes, F&& queue, const Outputs&... outputs) {
  captured_graph graph(queue);
  expect(graph.ok(), "stream capture: " + step + ": the capture failed: " + graph.error());
  if (!graph.ok()) return false;
  nodes.push_back(graph.nodes());
  expect(graph.nodes() > 0, "stream capture: " + step + ": nothing was queued on the caller's stream");
  const bool untouched = (holds_fill(outputs) && ...);
  expect(untouched,
         "stream capture: " + step + ": outputs written before the graph ran (work queued on another stream)");
  graph.launch();
  return true;
}

double worst_distance(const std::vector<float>& want, const std::vector<float>& got) {
  double worst = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const bool nan_w = std::isnan(want[i]), nan_g = std::isnan(got[i]);
    worst = std::max(
        worst, nan_w || nan_g ? (nan_w && nan_g ? 0.0 : INFINITY) : std::fabs(static_cast<double>(got[i]) - want[i]));
  }
  return worst;
}

}  // namespace

void test_stream_capture() {
  const std::size_t T = 1500, d = 256, n = 16, k = 2, capacity = 150, rows = n * capacity;
  std::mt19937 rng(500);
  std::uniform_int_distribution<int> quarter(-8, 8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(T * d), w(n * d), grad_y(T * d);
  for (float& v : x) v = 0.25f * static_cast<float>(quarter(rng));
  for (float& v : w) v = 0.125f * static_cast<float>(quarter(rng));
  for (float& v : grad_y) v = normal(rng);
  const device_array<float> dx(x), dw(w), dgrad_y(grad_y);
  const cuda_backend gpu{};
  const cuda_backend deferred(device_checks::deferred);  // synchronous checks wait for the device: not capturable
  std::vector<std::size_t> nodes;
  std::size_t differ = 0;  // elements that differ where bits must match
  double worst_w = 0;      // weights and probabilities
  std::size_t grad_weight_bad = 0;
  const auto bits = [&](const std::string& what, const auto& want, const auto& got) {
    const bit_diff diff = compare_bits(want, got);
    expect(diff.same(), "stream capture: " + what + " differs from the CPU's: " + describe(diff, want, got));
    differ += diff.count;
  };

  // The routes.
  device_array<expert_index> gi(T * k), di(T * k);
  device_array<float> gw(T * k), gp(T * n), gl(T * n), dwt(T * k), dp(T * n), dl(T * n);
  std::vector<expert_index> ci(T * k);
  std::vector<float> cw(T * k), cp(T * n), cl(T * n);
  const matrix_view<const float> xv(x.data(), T, d), dxv(dx.data(), T, d);
  if (run_captured(
          "route_grap", nodes,
          [&] {
            gpu.route_grap(
                grap_gate<float>{d, n, true, nullptr}, dxv, select_options{k, false},
                route_outputs<float>{{gi.data(), T, k}, {gw.data(), T, k}, {gp.data(), T, n}, {gl.data(), T, n}},
                stream);
          },
          gi, gw, gp, gl)) {
    cpu().route_grap(grap_gate<float>{d, n, true, nullptr}, xv, select_options{k, false},
                     route_outputs<float>{{ci.data(), T, k}, {cw.data(), T, k}, {cp.data(), T, n}, {cl.data(), T, n}});
    bits("route_grap indices", ci, gi.host());
    bits("route_grap logits", cl, gl.host());
    worst_w = std::max({worst_w, worst_distance(cw, gw.host()), worst_distance(cp, gp.host())});
  }
  if (run_captured(
          "route_dense", nodes,
          [&] {
            gpu.route_dense(
                dense_gate<float>{{dw.data(), n, d}, nullptr, false}, dxv, select_options{k, true},
                route_outputs<float>{{di.data(), T, k}, {dwt.data(), T, k}, {dp.data(), T, n}, {dl.data(), T, n}},
                nullptr, 0, stream);
          },
          di, dwt, dp, dl)) {
    std::vector<expert_index> hi(T * k);
    std::vector<float> hw(T * k), hp(T * n), hl(T * n);
    cpu().route_dense(dense_gate<float>{{w.data(), n, d}, nullptr, false}, xv, select_options{k, true},
                      route_outputs<float>{{hi.data(), T, k}, {hw.data(), T, k}, {hp.data(), T, n}, {hl.data(), T, n}},
                      nullptr, 0);
    bits("route_dense indices", hi, di.host());
    bits("route_dense logits", hl, dl.host());
    worst_w = std::max({worst_w, worst_distance(hw, dwt.host()), worst_distance(hp, dp.host())});
  }

  // Slots on the GPU's GrAP choices (the CPU's reference on the same choices, copied back).
  const std::vector<expert_index> choices = gi.host();
  device_array<expert_index> ge(T * k);
  device_array<slot_index> gs(T * k);
  device_array<std::int64_t> groutes(n), gkept(n);
  device_array<unsigned char> gws(deferred.slot_workspace_size(T, n));
  const auto cap = static_cast<std::int64_t>(capacity);
  const bool slots_ran = run_captured(
      "assign_slots (deferred checks)", nodes,
      [&] {
        deferred.assign_slots(
            {{gi.data(), T, k}, {ge.data(), T, k}, {gs.data(), T, k}, groutes.data(), gkept.data(), n, cap}, gws.data(),
            gws.size(), stream);
      },
      ge, gs, groutes, gkept);
  if (!slots_ran) return;  // the later steps read the slots
  {
    std::vector<expert_index> ce(T * k);
    std::vector<slot_index> cs(T * k);
    std::vector<std::int64_t> croutes(n), ckept(n);
    std::vector<unsigned char> ws(cpu().slot_workspace_size(T, n));
    cpu().assign_slots(
        {{choices.data(), T, k}, {ce.data(), T, k}, {cs.data(), T, k}, croutes.data(), ckept.data(), n, cap}, ws.data(),
        ws.size());
    bits("assign_slots expert", ce, ge.host());
    bits("assign_slots slot", cs, gs.host());
    bits("assign_slots counts", croutes, groutes.host());
    bits("assign_slots kept counts", ckept, gkept.host());
  }
  // The rows, on the GPU's slots (and the CPU's weights for combine: the same weights on both).
  const std::vector<expert_index> he = ge.host();
  const std::vector<slot_index> hs = gs.host();
  const std::vector<std::int64_t> hk = gkept.host();
  const pair_layout host_pairs = [&] {
    pair_layout p{he.data(), hs.data(), T, k, capacity};
    p.kept_per_expert = hk.data();
    p.experts = n;
    return p;
  }();
  pair_layout device_pairs = host_pairs;
  device_pairs.expert = ge.data();
  device_pairs.slot = gs.data();
  device_pairs.kept_per_expert = gkept.data();
  device_array<float> gbuffer(rows * d), gy(T * d), ggb(rows * d), ggw(T * k), ggx(T * d);
  const device_array<float> dcw(cw);
  if (run_captured(
          "dispatch", nodes,
          [&] { gpu.dispatch(device_pairs, dxv, matrix_view<float>(gbuffer.data(), rows, d), stream); }, gbuffer)) {
    std::vector<float> want = filled<float>(rows * d);
    cpu().dispatch(host_pairs, xv, matrix_view<float>(want.data(), rows, d));
    bits("dispatch buffer", want, gbuffer.host());
  }
  const std::vector<float> buffer = gbuffer.host();
  if (run_captured(
          "combine", nodes,
          [&] {
            gpu.combine(device_pairs, matrix_view<const float>(gbuffer.data(), rows, d),
                        matrix_view<const float>(dcw.data(), T, k), matrix_view<float>(gy.data(), T, d), stream);
          },
          gy)) {
    std::vector<float> want = filled<float>(T * d);
    cpu().combine(host_pairs, matrix_view<const float>(buffer.data(), rows, d),
                  matrix_view<const float>(cw.data(), T, k), matrix_view<float>(want.data(), T, d));
    bits("combine y", want, gy.host());
  }
  if (run_captured(
          "combine_backward", nodes,
          [&] {
            gpu.combine_backward(device_pairs, matrix_view<const float>(gbuffer.data(), rows, d),
                                 matrix_view<const float>(dcw.data(), T, k),
                                 matrix_view<const float>(dgrad_y.data(), T, d),
                                 matrix_view<float>(ggb.data(), rows, d), matrix_view<float>(ggw.data(), T, k), stream);
          },
          ggb, ggw)) {
    std::vector<float> want_gb = filled<float>(rows * d), want_gw = filled<float>(T * k);
    cpu().combine_backward(host_pairs, matrix_view<const float>(buffer.data(), rows, d),
                           matrix_view<const float>(cw.data(), T, k), matrix_view<const float>(grad_y.data(), T, d),
                           matrix_view<float>(want_gb.data(), rows, d), matrix_view<float>(want_gw.data(), T, k));
    bits("combine_backward grad_buffer", want_gb, ggb.host());
    const std::vector<float> got_gw = ggw.host();
    for (std::size_t p = 0; p < T * k; ++p) {
      double magnitude = 0;
      if (host_pairs.kept(p)) {
        for (std::size_t c = 0; c < d; ++c) {
          magnitude += std::fabs(static_cast<double>(grad_y[p / k * d + c]) * buffer[host_pairs.row(p) * d + c]);
        }
      }
      const double error = std::isnan(got_gw[p]) ? INFINITY : std::fabs(static_cast<double>(got_gw[p]) - want_gw[p]);
      grad_weight_bad += !(error <= 1e-5 * magnitude);  // a dropped pair: 0 exactly
    }
    expect(grad_weight_bad == 0, "stream capture: combine_backward grad_weight outside 1e-5 of sum |grad_y row|");
  }
  if (run_captured(
          "dispatch_backward", nodes,
          [&] {
            gpu.dispatch_backward(device_pairs, matrix_view<const float>(ggb.data(), rows, d),
                                  matrix_view<float>(ggx.data(), T, d), stream);
          },
          ggx)) {
    const std::vector<float> grad_buffer = ggb.host();
    std::vector<float> want = filled<float>(T * d);
    cpu().dispatch_backward(host_pairs, matrix_view<const float>(grad_buffer.data(), rows, d),
                            matrix_view<float>(want.data(), T, d));
    bits("dispatch_backward grad_x", want, ggx.host());
  }
  expect(worst_w <= 1e-6, "stream capture: weights or probabilities differ by more than 1e-6");
  std::string counts;
  for (const std::size_t c : nodes) counts += (counts.empty() ? "" : " ") + std::to_string(c);
  std::printf(
      "stream capture: %zu of 7 steps recorded on the caller's stream (graph nodes: %s), none ran before its "
      "launch; after it %zu elements differ where bits must match (indices, logits, slots, counts, buffer, y, "
      "grad_buffer, grad_x), weights/probabilities within %.3g (1e-6), %zu grad_weight outside 1e-5\n",
      nodes.size(), counts.c_str(), differ, worst_w, grad_weight_bad);
}

}  // namespace gpu_test
