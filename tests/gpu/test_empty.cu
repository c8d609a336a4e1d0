// The empty batch, T = 0: route_grap, route_dense, dispatch (without kept counts), combine, combine_backward and
// dispatch_backward launch nothing (recorded under a stream capture, the graph has no node), throw nothing and write
// nothing; where the CPU writes (assign_slots' counts, dispatch's padding rows with kept counts, grap_pipeline::run)
// the GPU writes the same bits.
#include "gpu_test.hpp"

namespace gpu_test {

void test_empty_batch() {
  using namespace locmoe;
  const std::size_t d = 64, n = 16, k = 2, capacity = 4, rows = n * capacity;
  const cuda_backend gpu{};
  const device_array<float> x(d), w(n * d), grad_y(d);
  device_array<expert_index> indices(k), expert(k);
  device_array<slot_index> slot(k);
  device_array<float> weights(k), probabilities(n), logits(n), buffer(rows * d), y(d), grad_buffer(rows * d),
      grad_weight(k), grad_x(d);
  const matrix_view<const float> x0(x.data(), 0, d);
  const route_outputs<float> out{
      {indices.data(), 0, k}, {weights.data(), 0, k}, {probabilities.data(), 0, n}, {logits.data(), 0, n}};
  pair_layout pairs{expert.data(), slot.data(), 0, k, capacity};
  pairs.experts = n;
  captured_graph graph([&] {
    gpu.route_grap(grap_gate<float>{d, n, true, nullptr}, x0, select_options{k, false}, out, stream);
    gpu.route_dense(dense_gate<float>{{w.data(), n, d}, nullptr, false}, x0, select_options{k, true}, out, nullptr, 0,
                    stream);
    gpu.dispatch(pairs, x0, matrix_view<float>(buffer.data(), rows, d), stream);
    gpu.combine(pairs, matrix_view<const float>(buffer.data(), rows, d), matrix_view<const float>(weights.data(), 0, k),
                matrix_view<float>(y.data(), 0, d), stream);
    gpu.combine_backward(pairs, matrix_view<const float>(buffer.data(), rows, d),
                         matrix_view<const float>(weights.data(), 0, k), matrix_view<const float>(grad_y.data(), 0, d),
                         matrix_view<float>(grad_buffer.data(), rows, d), matrix_view<float>(grad_weight.data(), 0, k),
                         stream);
    gpu.dispatch_backward(pairs, matrix_view<const float>(grad_buffer.data(), rows, d),
                          matrix_view<float>(grad_x.data(), 0, d), stream);
  });
  const bool untouched = holds_fill(indices) && holds_fill(weights) && holds_fill(probabilities) &&
                         holds_fill(logits) && holds_fill(buffer) && holds_fill(y) && holds_fill(grad_buffer) &&
                         holds_fill(grad_weight) && holds_fill(grad_x);
  std::printf("T=0: routes, dispatch, combine and the backwards: %s, %zu graph nodes, outputs %s\n",
              graph.ok() ? "no error" : graph.error().c_str(), graph.nodes(), untouched ? "untouched" : "WRITTEN");
  expect(graph.ok(), "T=0: a step failed: " + graph.error());
  expect(graph.nodes() == 0, "T=0: a step queued work");
  expect(untouched, "T=0: a step wrote an output");

  // Where the CPU writes with T = 0: the counts (zeros), and the padding rows (every row, zeros).
  std::vector<std::int64_t> zeros(n, 0), want_routed = filled<std::int64_t>(n), want_kept = filled<std::int64_t>(n);
  std::vector<unsigned char> ws(cpu().slot_workspace_size(0, n));
  cpu().assign_slots({{nullptr, 0, k}, {nullptr, 0, k}, {nullptr, 0, k}, want_routed.data(), want_kept.data(), n, 3},
                     ws.data(), ws.size());
  device_array<std::int64_t> routed(n), kept(n);
  device_array<unsigned char> gws(gpu.slot_workspace_size(0, n));
  gpu.assign_slots(
      {{indices.data(), 0, k}, {expert.data(), 0, k}, {slot.data(), 0, k}, routed.data(), kept.data(), n, 3},
      gws.data(), gws.size(), stream);
  const bool counts_same = routed.host() == want_routed && kept.host() == want_kept && want_kept == zeros;
  const device_array<std::int64_t> kept_zero(zeros);
  std::vector<float> host_x(d, 1.0f), want_buffer = filled<float>(rows * d);
  pair_layout host_pairs{nullptr, nullptr, 0, k, capacity};
  host_pairs.kept_per_expert = zeros.data();
  host_pairs.experts = n;
  cpu().dispatch(host_pairs, matrix_view<const float>(host_x.data(), 0, d),
                 matrix_view<float>(want_buffer.data(), rows, d));
  pairs.kept_per_expert = kept_zero.data();
  buffer.fill();
  gpu.dispatch(pairs, x0, matrix_view<float>(buffer.data(), rows, d), stream);
  const std::vector<float> got_buffer = buffer.host();
  const bit_diff db = compare_bits(want_buffer, got_buffer);
  // grap_pipeline, T = 0: the counts and the buffer (all padding) as the CPU's.
  const router_shape shape{0, d, n, k, static_cast<std::int64_t>(capacity)};
  const grap_pipeline<cpu_backend> host_pipeline(cpu(), shape);
  const grap_pipeline<cuda_backend> device_pipeline(gpu, shape);
  std::vector<std::int64_t> pr = filled<std::int64_t>(n), pk = filled<std::int64_t>(n);
  std::vector<float> pb = filled<float>(rows * d);
  std::vector<unsigned char> pws(host_pipeline.workspace_size() + 1);
  host_pipeline.run(grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(host_x.data(), 0, d),
                    pipeline_outputs<float>{
                        {nullptr, 0, k}, {nullptr, 0, k}, {}, {nullptr, 0, k}, {nullptr, 0, k}, pr.data(), pk.data()},
                    matrix_view<float>(pb.data(), rows, d), pws.data(), pws.size());
  device_array<std::int64_t> dpr(n), dpk(n);
  device_array<unsigned char> dpws(device_pipeline.workspace_size() + 1);
  buffer.fill();
  device_pipeline.run(grap_gate<float>{d, n, true, nullptr}, x0,
                      pipeline_outputs<float>{{indices.data(), 0, k},
                                              {weights.data(), 0, k},
                                              {},
                                              {expert.data(), 0, k},
                                              {slot.data(), 0, k},
                                              dpr.data(),
                                              dpk.data()},
                      matrix_view<float>(buffer.data(), rows, d), dpws.data(), dpws.size(), stream);
  const std::vector<float> got_pb = buffer.host();
  const bit_diff dpb = compare_bits(pb, got_pb);
  const bool pipeline_counts = dpr.host() == pr && dpk.host() == pk;
  std::printf(
      "T=0: assign_slots counts %s; dispatch with kept counts: buffer (all padding) %s; grap_pipeline::run: "
      "counts %s, buffer %s\n",
      counts_same ? "zero, as the CPU's" : "DIFFER", describe(db, want_buffer, got_buffer).c_str(),
      pipeline_counts ? "as the CPU's" : "DIFFER", describe(dpb, pb, got_pb).c_str());
  expect(counts_same, "T=0: assign_slots' counts are not the CPU's zeros");
  expect(db.same(), "T=0: dispatch with kept counts: padding rows differ from the CPU's zeros");
  expect(pipeline_counts && dpb.same(), "T=0: grap_pipeline::run differs from the CPU's");
}

}  // namespace gpu_test
