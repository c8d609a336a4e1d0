// assign_slots against the CPU backend, bit for bit (expert, slot, tokens_per_expert, kept_per_expert, and the gaps
// of strided outputs): on indices the GPU's own routes produced (the CPU's assign_slots on the same indices copied
// back); at T = 200000, k = 2, n = 64 with skewed loads and masked (-1) choices, capacity below every load, between
// them and above every load; k = 4 with n = 300 and strided, unaligned views; k = 1 with n = 1024; one token with
// C = 0. Then the device checks of an index outside [-1, n): synchronous (throws, writes nothing) and deferred
// (drops the choice; check_slot_indices throws), when cuda.cuh has them (LOCMOE_CUDA_DEVICE_CHECKS).
#include "gpu_test.hpp"

#include <random>

namespace gpu_test {
namespace {

using namespace locmoe;

struct slot_host {
  std::vector<expert_index> expert;
  std::vector<slot_index> slot;
  std::vector<std::int64_t> routed, kept;
};

/// assign_slots on both backends over the same choices (host `indices`, device `device_indices`, layout il) into
/// outputs of layout `out` (T x k); every output compared bit for bit. Returns the CPU's outputs.
slot_host compare_slots(const std::string& label, const std::vector<expert_index>& indices,
                        const expert_index* device_indices, const layout& il, std::size_t n, std::int64_t capacity,
                        bool unaligned_outputs) {
  const std::size_t T = il.rows;
  const layout ol = shaped(T, il.cols, unaligned_outputs);
  slot_host want{filled<expert_index>(ol.size()), filled<slot_index>(ol.size()), filled<std::int64_t>(n),
                 filled<std::int64_t>(n)};
  std::vector<unsigned char> ws(cpu().slot_workspace_size(T, n));
  cpu().assign_slots({const_view(indices.data(), il), view(want.expert.data(), ol), view(want.slot.data(), ol),
                      want.routed.data(), want.kept.data(), n, capacity},
                     ws.data(), ws.size());
  const cuda_backend gpu{};
  device_array<expert_index> ge(ol.size());
  device_array<slot_index> gs(ol.size());
  device_array<std::int64_t> gr(n), gk(n);
  device_array<unsigned char> gws(gpu.slot_workspace_size(T, n));
  gpu.assign_slots(
      {const_view(device_indices, il), view(ge.data(), ol), view(gs.data(), ol), gr.data(), gk.data(), n, capacity},
      gws.data(), gws.size(), stream);
  sync("assign_slots");
  const slot_host got{ge.host(), gs.host(), gr.host(), gk.host()};
  const bit_diff de = compare_bits(want.expert, got.expert, &ol), ds = compare_bits(want.slot, got.slot, &ol);
  const bit_diff dr = compare_bits(want.routed, got.routed), dk = compare_bits(want.kept, got.kept);
  std::size_t over = 0, masked = 0;
  for (std::size_t e = 0; e < n; ++e) over += want.routed[e] > capacity;
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t j = 0; j < il.cols; ++j) masked += at(indices, il, t, j) == no_expert;
  }
  std::printf(
      "%s: expert %s; slot %s; tokens_per_expert %s; kept_per_expert %s (bit for bit); %zu of %zu experts over "
      "capacity, %zu masked choices\n",
      label.c_str(), describe(de, want.expert, got.expert, &ol).c_str(), describe(ds, want.slot, got.slot, &ol).c_str(),
      describe(dr, want.routed, got.routed).c_str(), describe(dk, want.kept, got.kept).c_str(), over, n, masked);
  expect(de.same() && ds.same() && dr.same() && dk.same(), label + ": slots or counts differ from the CPU's");
  return want;
}

/// Random choices [T x k] of n experts, distinct per token, skewed toward the low experts (u^2), a fraction masked.
std::vector<expert_index> random_choices(const layout& il, std::size_t n, double masked, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<expert_index> indices = filled<expert_index>(il.size());
  for (std::size_t t = 0; t < il.rows; ++t) {
    for (std::size_t j = 0; j < il.cols; ++j) {
      expert_index e;
      bool taken;
      do {
        const double v = u(rng);
        e = static_cast<expert_index>(std::min<double>(static_cast<double>(n) - 1, static_cast<double>(n) * v * v));
        taken = false;
        for (std::size_t i = 0; i < j; ++i) taken = taken || at(indices, il, t, i) == e;
      } while (taken);
      at(indices, il, t, j) = e;
    }
    for (std::size_t j = 0; j < il.cols; ++j) {
      if (u(rng) < masked) at(indices, il, t, j) = no_expert;
    }
  }
  return indices;
}

/// The GPU's own route (GrAP, k = 2, and dense, k = 4), then slots on its indices.
void slots_on_gpu_indices() {
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const cuda_backend gpu{};
  for (const bool dense : {false, true}) {
    const std::size_t T = dense ? 3001 : 6007, d = dense ? 128 : 512, n = dense ? 300 : 64, k = dense ? 4 : 2;
    std::vector<float> x(T * d), w(n * d);
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = 0.05f * normal(rng);
    x[100 * d + 3] = NAN;  // an invalid token: its choices are -1
    const device_array<float> dx(x), dw(w);
    device_array<expert_index> di(T * k);
    device_array<float> dweights(T * k), dlogits(T * n);
    const route_outputs<float> out{{di.data(), T, k}, {dweights.data(), T, k}, {}, {dlogits.data(), T, n}};
    if (dense) {
      gpu.route_dense(dense_gate<float>{{dw.data(), n, d}, nullptr, false}, matrix_view<const float>(dx.data(), T, d),
                      select_options{k, true}, out, nullptr, 0, stream);
    } else {
      gpu.route_grap(grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(dx.data(), T, d),
                     select_options{k, false}, out, stream);
    }
    sync("route for slots");
    const std::vector<expert_index> indices = di.host();
    std::size_t bad = 0, masked = 0;
    for (const expert_index e : indices) {
      bad += e < no_expert || e >= static_cast<expert_index>(n);
      masked += e == no_expert;
    }
    expect(bad == 0,
           "slots on the GPU's indices: the GPU's route wrote " + std::to_string(bad) + " indices outside [-1, n)");
    expect(masked >= k, "slots on the GPU's indices: the NaN token's choices are not -1");
    if (bad > 0) continue;
    const std::int64_t load = static_cast<std::int64_t>(T * k / n);
    for (const std::int64_t capacity : {std::int64_t{0}, load / 3, load, std::int64_t{100000}}) {
      compare_slots(std::string("assign_slots on the GPU's ") + (dense ? "dense" : "GrAP") +
                        " route T=" + std::to_string(T) + " k=" + std::to_string(k) + " n=" + std::to_string(n) +
                        " C=" + std::to_string(capacity),
                    indices, di.data(), layout{T, k, k, 0}, n, capacity, false);
    }
  }
}

/// Synthetic choices: the large batch (capacity below, between and above the per-expert loads), and odd shapes.
void slots_on_synthetic_choices() {
  {
    const std::size_t T = 200000, k = 2, n = 64;
    const layout il{T, k, k, 0};
    const std::vector<expert_index> indices = random_choices(il, n, 0.02, 17);
    const device_array<expert_index> di(indices);
    std::size_t below_all = 0, above_all = 0, mixed_over = 0;
    for (const std::int64_t capacity : {std::int64_t{100}, std::int64_t{6000}, std::int64_t{1000000}}) {
      const slot_host h =
          compare_slots("assign_slots T=200000 k=2 n=64 C=" + std::to_string(capacity) + " (skewed loads, 2% masked)",
                        indices, di.data(), il, n, capacity, false);
      std::size_t over = 0;
      for (std::size_t e = 0; e < n; ++e) over += h.routed[e] > capacity;
      if (capacity == 100) below_all = over;
      if (capacity == 6000) mixed_over = over;
      if (capacity == 1000000) above_all = over;
    }
    expect(below_all == n && above_all == 0 && mixed_over > 0 && mixed_over < n,
           "assign_slots T=200000: test data: the capacities are not below, between and above the loads");
  }
  struct shape {
    std::size_t tokens, k, n;
    std::int64_t capacity;
    bool unaligned;
  };
  unsigned seed = 40;
  for (const shape s : {shape{3001, 4, 300, 30, true}, shape{2000, 1, 1024, 2, false}, shape{1, 1, 16, 0, false},
                        shape{5000, 2, 16, 700, true}}) {
    const layout il = shaped(s.tokens, s.k, s.unaligned);
    const std::vector<expert_index> indices = random_choices(il, s.n, 0.05, ++seed);
    const device_array<expert_index> di(indices);
    compare_slots("assign_slots T=" + std::to_string(s.tokens) + " k=" + std::to_string(s.k) +
                      " n=" + std::to_string(s.n) + " C=" + std::to_string(s.capacity) +
                      (s.unaligned ? " (strided, unaligned views)" : ""),
                  indices, di.data(), il, s.n, s.capacity, s.unaligned);
  }
}

}  // namespace

void test_slots() {
  slots_on_gpu_indices();
  slots_on_synthetic_choices();
}

void test_device_checks() {
#if defined(LOCMOE_CUDA_DEVICE_CHECKS)
  const std::size_t T = 300, k = 2, n = 16;
  const std::int64_t capacity = 25;
  const layout il{T, k, k, 0};
  std::vector<expert_index> clean = random_choices(il, n, 0.05, 77), bad = clean;
  // The first bad pair in (t, j) order is (5, 1); a scan by column would meet (9, 0) first.
  bad[5 * k + 1] = static_cast<expert_index>(n);
  bad[9 * k + 0] = -2;
  bad[200 * k + 1] = 99;
  const std::vector<expert_index> sanitized = [&] {  // what deferred checks assign: the bad choices dropped
    std::vector<expert_index> s = bad;
    for (expert_index& e : s) e = e < no_expert || e >= static_cast<expert_index>(n) ? no_expert : e;
    return s;
  }();
  std::vector<expert_index> e(T * k);
  std::vector<slot_index> s(T * k);
  std::vector<std::int64_t> r(n), kp(n);
  std::vector<unsigned char> ws(cpu().slot_workspace_size(T, n));
  const thrown reference = what_throws([&] {
    cpu().assign_slots({{bad.data(), T, k}, {e.data(), T, k}, {s.data(), T, k}, r.data(), kp.data(), n, capacity},
                       ws.data(), ws.size());
  });
  expect(reference.argument == "indices" && reference.message.find("(5, 1) = 16") != std::string::npos,
         "device checks: test premise: the CPU names indices (5, 1) = 16; it threw: " + reference.message);
  const device_array<expert_index> dbad(bad), dclean(sanitized);
  // Synchronous (the default, and by name): throws before anything is written.
  const cuda_backend by_default{}, by_name_backend(device_checks::synchronous);
  for (const bool by_name : {false, true}) {
    const cuda_backend& gpu = by_name ? by_name_backend : by_default;
    device_array<expert_index> ge(T * k);
    device_array<slot_index> gs(T * k);
    device_array<std::int64_t> gr(n), gk(n);
    device_array<unsigned char> gws(gpu.slot_workspace_size(T, n));
    const thrown t = what_throws([&] {
      gpu.assign_slots({{dbad.data(), T, k}, {ge.data(), T, k}, {gs.data(), T, k}, gr.data(), gk.data(), n, capacity},
                       gws.data(), gws.size(), stream);
    });
    sync("synchronous checks");
    const bool untouched = holds_fill(ge) && holds_fill(gs) && holds_fill(gr) && holds_fill(gk);
    std::printf("device checks, synchronous%s: threw on '%s' (%s); outputs %s\n", by_name ? " (by name)" : " (default)",
                t.argument.c_str(), t.message.c_str(), untouched ? "untouched" : "WRITTEN");
    expect(t.argument == "indices" && t.tail() == reference.tail(),
           "synchronous checks: want the CPU's \"" + reference.tail() + "\", got \"" + t.message + "\"");
    expect(untouched, "synchronous checks: assign_slots wrote outputs before throwing");
  }
  // Deferred: no wait; the bad choices dropped; check_slot_indices throws the same error, then passes after a clean
  // run.
  const cuda_backend deferred(device_checks::deferred);
  device_array<expert_index> ge(T * k);
  device_array<slot_index> gs(T * k);
  device_array<std::int64_t> gr(n), gk(n);
  device_array<unsigned char> gws(deferred.slot_workspace_size(T, n));
  std::vector<expert_index> we = filled<expert_index>(T * k);
  std::vector<slot_index> wsl = filled<slot_index>(T * k);
  std::vector<std::int64_t> wr = filled<std::int64_t>(n), wk = filled<std::int64_t>(n);
  cpu().assign_slots(
      {{sanitized.data(), T, k}, {we.data(), T, k}, {wsl.data(), T, k}, wr.data(), wk.data(), n, capacity}, ws.data(),
      ws.size());
  const auto problem = [&](const device_array<expert_index>& indices) {
    return slot_problem{
        {indices.data(), T, k}, {ge.data(), T, k}, {gs.data(), T, k}, gr.data(), gk.data(), n, capacity};
  };
  const auto run = [&](const device_array<expert_index>& indices) {
    return what_throws([&] { deferred.assign_slots(problem(indices), gws.data(), gws.size(), stream); });
  };
  const auto same_as_cpu = [&] { return ge.host() == we && gs.host() == wsl && gr.host() == wr && gk.host() == wk; };
  const thrown call = run(dbad);
  sync("deferred checks");
  const bool dropped = same_as_cpu();
  const thrown later = what_throws([&] { deferred.check_slot_indices(problem(dbad), gws.data(), stream); });
  ge.fill();
  gs.fill();
  gr.fill();
  gk.fill();
  const thrown clean_call = run(dclean);
  const thrown clean_check = what_throws([&] { deferred.check_slot_indices(problem(dclean), gws.data(), stream); });
  const bool clean_same = same_as_cpu();
  std::printf(
      "device checks, deferred: assign_slots threw '%s'; slots %s the CPU's with the bad choices dropped; "
      "check_slot_indices threw on '%s' (%s); after a clean assign_slots: '%s', slots %s\n",
      call.argument.c_str(), dropped ? "equal" : "DIFFER FROM", later.argument.c_str(), later.message.c_str(),
      clean_check.argument.c_str(), clean_same ? "equal" : "DIFFER");
  expect(call.argument == "<no error>", "deferred checks: assign_slots threw: " + call.message);
  expect(dropped,
         "deferred checks: a bad choice is not dropped as the CPU drops a -1 (expert -1, slot -1, not counted)");
  expect(later.argument == "indices" && later.tail() == reference.tail(),
         "deferred checks: check_slot_indices: want the CPU's \"" + reference.tail() + "\", got \"" + later.message +
             "\"");
  expect(clean_call.argument == "<no error>" && clean_check.argument == "<no error>",
         "deferred checks: a clean assign_slots then check_slot_indices threw: " + clean_call.message +
             clean_check.message);
  expect(clean_same, "deferred checks: clean slots differ from the CPU's");
#else
  std::printf(
      "device checks: not compiled: cuda.cuh does not define LOCMOE_CUDA_DEVICE_CHECKS (no device_checks yet)\n");
#endif
}

}  // namespace gpu_test
