// Argument checks: every public call of cuda_backend with one bad argument (a view of the wrong shape or stride, a
// null required pointer, a workspace too small, a buffer with too few rows: the capacity layout with kept counts
// needs n C) throws locmoe::error naming the argument the CPU backend names, with the CPU's message after the
// function's name. The same calls run on the CPU backend over host memory (the expected names are checked there
// too: a premise of the test). Every array is far larger than the shapes, so a call that does not check stays in
// bounds; the null-pointer cases come last, since a call that does not check one faults the context.
#include "gpu_test.hpp"

#include <functional>

namespace gpu_test {
namespace {

using namespace locmoe;

constexpr std::size_t T = 8, d = 32, n = 4, k = 2, C = 3, rows = n * C;
constexpr std::size_t big = 4096;  // elements of every array

/// Pointers into memory of one backend's kind: indices 0, the pairs all dropped (-1), kept counts 0, floats 0.
struct arena {
  float *x, *w, *buffer, *y, *weight, *grad_y, *grad_buffer, *grad_weight, *probabilities, *logits, *route_weights;
  expert_index *indices, *expert, *pair_expert;
  slot_index *slot, *pair_slot;
  std::int64_t *routed, *kept, *kept_counts;
  unsigned char* workspace;
};
arena arena_of(float* f, expert_index* i, slot_index* s, std::int64_t* c, unsigned char* ws) {
  return {f,           f + big,     f + 2 * big, f + 3 * big,  f + 4 * big, f + 5 * big, f + 6 * big,
          f + 7 * big, f + 8 * big, f + 9 * big, f + 10 * big, i,           i + big,     i + 2 * big,
          s,           s + big,     c,           c + big,      c + 2 * big, ws};
}
struct host_memory {
  std::vector<float> floats = std::vector<float>(11 * big, 0.0f);
  std::vector<expert_index> ints = [] {
    std::vector<expert_index> v(3 * big, 0);
    std::fill(v.begin() + 2 * big, v.end(), no_expert);
    return v;
  }();
  std::vector<slot_index> slots = std::vector<slot_index>(2 * big, -1);
  std::vector<std::int64_t> counts = std::vector<std::int64_t>(3 * big, 0);
  std::vector<unsigned char> workspace = std::vector<unsigned char>(8 * big, 0);
  arena get() { return arena_of(floats.data(), ints.data(), slots.data(), counts.data(), workspace.data()); }
};

struct outcome {
  std::string step, expected;
  thrown result;
};

/// Runs every bad call on backend b (memory a, stream s), `after` each (the GPU: wait and report a fault).
template <class B>
std::vector<outcome> bad_calls(const B& b, const arena& a, typename B::stream_type s,
                               const std::function<void()>& after) {
  std::vector<outcome> results;
  bool faulted = false;
  const auto call = [&](const char* step, const char* expected, const auto& f) {
    if (faulted) return;
    results.push_back({step, expected, what_throws(f)});
    try {
      after();
    } catch (const std::exception& e) {
      results.back().result = {"<fault>", e.what()};
      faulted = true;
    }
  };
  using cv = matrix_view<const float>;
  using mv = matrix_view<float>;
  const grap_gate<float> grap{d, n, true, nullptr};
  const cv x(a.x, T, d);
  const select_options options{k, false};
  const route_outputs<float> out{{a.indices, T, k}, {a.route_weights, T, k}, {a.probabilities, T, n}, {a.logits, T, n}};
  const auto with = [&](auto change) {
    route_outputs<float> o = out;
    change(o);
    return o;
  };
  const dense_gate<float> dense{{a.w, n, d}, nullptr, false};
  const auto route = [&](const grap_gate<float>& g, const cv& xv, const select_options& o,
                         const route_outputs<float>& r) {
    return [&b, g, xv, o, r, s] { b.route_grap(g, xv, o, r, s); };
  };
  const auto dense_route = [&](const dense_gate<float>& g, const cv& xv, const select_options& o,
                               const route_outputs<float>& r) {
    return [&b, &a, g, xv, o, r, s] { b.route_dense(g, xv, o, r, a.workspace, 8 * big, s); };
  };
  call("route_grap", "x", route(grap, cv(a.x, T, d - 1), options, out));
  call("route_grap", "indices", route(grap, x, options, with([&](auto& o) { o.indices.cols = k + 1; })));
  call("route_grap", "weights", route(grap, x, options, with([&](auto& o) { o.weights.rows = T - 1; })));
  call("route_grap", "probabilities", route(grap, x, options, with([&](auto& o) { o.probabilities.cols = n - 1; })));
  call("route_grap", "logits", route(grap, x, options, with([&](auto& o) { o.logits.cols = n + 1; })));
  call("route_grap", "indices", route(grap, x, options, with([&](auto& o) { o.indices.stride = 1; })));
  call("route_grap", "k", route(grap, x, select_options{0, false}, out));
  call("route_grap", "k", route(grap, x, select_options{n + 1, false}, out));
  call("route_grap", "gate.hidden", route(grap_gate<float>{3, n, true, nullptr}, cv(a.x, T, 3), options, out));
  call("route_grap", "gate.experts", route(grap_gate<float>{d, 0, true, nullptr}, x, options, out));
  call("route_dense", "gate.weight", dense_route(dense_gate<float>{{a.w, n, d - 1}, nullptr, false}, x, options, out));
  call("route_dense", "gate.weight",
       dense_route(dense_gate<float>{{a.w, n, d, d - 1}, nullptr, false}, x, options, out));
  call("route_dense", "n", dense_route(dense_gate<float>{{a.w, 0, d}, nullptr, false}, x, options, out));
  call("route_dense", "logits", dense_route(dense, x, options, with([&](auto& o) { o.logits = {}; })));
  call("route_dense", "indices", dense_route(dense, x, options, with([&](auto& o) { o.indices.cols = k + 1; })));
  call("route_dense", "k", dense_route(dense, x, select_options{0, false}, out));

  const slot_problem problem{{a.indices, T, k}, {a.expert, T, k}, {a.slot, T, k}, a.routed, a.kept, n, C};
  const std::size_t ws = b.slot_workspace_size(T, n);
  const auto slots = [&](auto change, std::size_t bytes) {
    slot_problem p = problem;
    change(p);
    return [&b, &a, p, bytes, s] { b.assign_slots(p, a.workspace, bytes, s); };
  };
  call("assign_slots", "k", slots([](slot_problem& p) { p.indices.cols = 0; }, ws));
  call("assign_slots", "n", slots([](slot_problem& p) { p.experts = 0; }, ws));
  call("assign_slots", "expert", slots([](slot_problem& p) { p.expert.rows = T - 1; }, ws));
  call("assign_slots", "slot", slots([](slot_problem& p) { p.slot.cols = k + 1; }, ws));
  call("assign_slots", "indices", slots([](slot_problem& p) { p.indices.stride = 1; }, ws));
  call("assign_slots", "capacity", slots([](slot_problem& p) { p.capacity = -1; }, ws));
  call("assign_slots", "workspace_bytes", slots([](slot_problem&) {}, ws - 1));

  pair_layout pairs{a.pair_expert, a.pair_slot, T, k, C};
  pairs.kept_per_expert = a.kept_counts;  // with kept counts (and no expert_offset) the buffer needs n C rows
  pairs.experts = n;
  pair_layout loose = pairs;  // no kept counts: a call that does not check a null pointer writes no padding
  loose.kept_per_expert = nullptr;
  const cv weight(a.weight, T, k), buffer(a.buffer, rows, d), grad_y(a.grad_y, T, d);
  const mv grad_buffer(a.grad_buffer, rows, d), grad_weight(a.grad_weight, T, k);
  call("dispatch", "x", [&] { b.dispatch(pairs, cv(a.x, T - 1, d), mv(a.buffer, rows, d), s); });
  call("dispatch", "buffer", [&] { b.dispatch(pairs, x, mv(a.buffer, rows, d - 1), s); });
  call("dispatch", "buffer", [&] { b.dispatch(pairs, x, mv(a.buffer, rows - 1, d), s); });
  call("combine", "y", [&] { b.combine(pairs, buffer, weight, mv(a.y, T + 1, d), s); });
  call("combine", "buffer", [&] { b.combine(pairs, cv(a.buffer, rows, d + 1), weight, mv(a.y, T, d), s); });
  call("combine", "weight", [&] { b.combine(pairs, buffer, cv(a.weight, T, k + 1), mv(a.y, T, d), s); });
  call("combine", "buffer", [&] { b.combine(pairs, cv(a.buffer, rows - 1, d), weight, mv(a.y, T, d), s); });
  call("combine_backward", "grad_y",
       [&] { b.combine_backward(pairs, buffer, weight, cv(a.grad_y, T - 1, d), grad_buffer, grad_weight, s); });
  call("combine_backward", "buffer",
       [&] { b.combine_backward(pairs, cv(a.buffer, rows, d - 1), weight, grad_y, grad_buffer, grad_weight, s); });
  call("combine_backward", "weight",
       [&] { b.combine_backward(pairs, buffer, cv(a.weight, T + 1, k), grad_y, grad_buffer, grad_weight, s); });
  call("combine_backward", "grad_buffer",
       [&] { b.combine_backward(pairs, buffer, weight, grad_y, mv(a.grad_buffer, rows + 1, d), grad_weight, s); });
  call("combine_backward", "grad_weight",
       [&] { b.combine_backward(pairs, buffer, weight, grad_y, grad_buffer, mv(a.grad_weight, T, k - 1), s); });
  call("combine_backward", "buffer", [&] {
    b.combine_backward(pairs, cv(a.buffer, rows - 1, d), weight, grad_y, mv(a.grad_buffer, rows - 1, d), grad_weight,
                       s);
  });
  call("dispatch_backward", "grad_x",
       [&] { b.dispatch_backward(pairs, cv(a.grad_buffer, rows, d), mv(a.y, T + 1, d), s); });
  call("dispatch_backward", "grad_buffer",
       [&] { b.dispatch_backward(pairs, cv(a.grad_buffer, rows, d + 1), mv(a.y, T, d), s); });
  call("dispatch_backward", "grad_buffer",
       [&] { b.dispatch_backward(pairs, cv(a.grad_buffer, rows - 1, d), mv(a.y, T, d), s); });

  // Null required pointers (last: see the header comment).
  call("route_grap", "x", route(grap, cv(nullptr, T, d), options, out));
  call("route_grap", "indices", route(grap, x, options, with([&](auto& o) { o.indices.data = nullptr; })));
  call("route_dense", "gate.weight", dense_route(dense_gate<float>{{nullptr, n, d}, nullptr, false}, x, options, out));
  call("route_dense", "logits", dense_route(dense, x, options, with([&](auto& o) { o.logits.data = nullptr; })));
  call("assign_slots", "indices", slots([](slot_problem& p) { p.indices.data = nullptr; }, ws));
  call("assign_slots", "expert", slots([](slot_problem& p) { p.expert.data = nullptr; }, ws));
  call("assign_slots", "tokens_per_expert", slots([](slot_problem& p) { p.tokens_per_expert = nullptr; }, ws));
  call("assign_slots", "kept_per_expert", slots([](slot_problem& p) { p.kept_per_expert = nullptr; }, ws));
  call("dispatch", "x", [&] { b.dispatch(loose, cv(nullptr, T, d), mv(a.buffer, rows, d), s); });
  call("dispatch", "buffer", [&] { b.dispatch(loose, x, mv(nullptr, rows, d), s); });
  call("combine", "weight", [&] { b.combine(loose, buffer, cv(nullptr, T, k), mv(a.y, T, d), s); });
  call("combine", "y", [&] { b.combine(loose, buffer, weight, mv(nullptr, T, d), s); });
  call("combine_backward", "grad_y",
       [&] { b.combine_backward(loose, buffer, weight, cv(nullptr, T, d), grad_buffer, grad_weight, s); });
  call("dispatch_backward", "grad_x",
       [&] { b.dispatch_backward(loose, cv(a.grad_buffer, rows, d), mv(nullptr, T, d), s); });
  return results;
}

}  // namespace

void test_arguments() {
  host_memory host;
  const std::vector<outcome> want = bad_calls(cpu(), host.get(), cpu_stream{}, [] {});
  const device_array<float> floats(host.floats);
  const device_array<expert_index> ints(host.ints);
  const device_array<slot_index> slots(host.slots);
  const device_array<std::int64_t> counts(host.counts);
  const device_array<unsigned char> workspace(host.workspace);
  const cuda_backend gpu{};
  const std::vector<outcome> got =
      bad_calls(gpu, arena_of(floats.data(), ints.data(), slots.data(), counts.data(), workspace.data()), stream,
                [] { sync("after a bad call"); });
  std::size_t premise = 0, named = 0, same_message = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const outcome& w = want[i];
    const std::string what = w.step + " with a bad " + w.expected;
    premise += w.result.argument == w.expected;
    expect(w.result.argument == w.expected,
           "arguments: test premise: the CPU's " + what + " names '" + w.result.argument + "': " + w.result.message);
    if (i >= got.size()) continue;
    const outcome& g = got[i];
    // The message after the function's name; for workspace_bytes the value is each backend's own size - 1.
    const bool message =
        w.expected == "workspace_bytes" ? g.result.rule() == w.result.rule() : g.result.tail() == w.result.tail();
    named += g.result.argument == w.expected;
    same_message += message;
    expect(g.result.argument == w.expected && message, "arguments: " + what + ": the GPU threw on '" +
                                                           g.result.argument + "' (" + g.result.message +
                                                           "), the CPU: " + w.result.message);
  }
  std::printf(
      "arguments: %zu bad calls (the CPU names the expected argument in %zu); the GPU ran %zu: names the CPU's "
      "argument in %zu, with the CPU's message in %zu\n",
      want.size(), premise, got.size(), named, same_message);
  expect(got.size() == want.size(),
         "arguments: a GPU call faulted: " + (got.empty() ? std::string() : got.back().result.message));
}

}  // namespace gpu_test
