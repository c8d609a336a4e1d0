// The CUDA backend against the CPU backend (label gpu): slots, dispatch and combine bit for bit; the fused route's
// choices equal, its weights and probabilities to 1e-6. Exit 77 (skipped) without a CUDA device.
#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/cuda.cuh>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

static_assert(locmoe::is_backend_v<locmoe::cuda_backend>, "the CUDA backend models the concept");
static_assert(!locmoe::uses_host_memory_v<locmoe::cuda_backend>, "device memory: moe_router refuses it at compile time");

namespace {

int failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what);
    ++failures;
  }
}

template <class T>
struct device_array {
  T* data = nullptr;
  std::size_t size = 0;
  explicit device_array(std::size_t n) : size(n) { locmoe::cuda_detail::check(cudaMalloc(&data, n * sizeof(T) + 16), "cudaMalloc"); }
  explicit device_array(const std::vector<T>& host) : device_array(host.size()) {
    locmoe::cuda_detail::check(cudaMemcpy(data, host.data(), size * sizeof(T), cudaMemcpyHostToDevice), "to device");
  }
  ~device_array() { cudaFree(data); }
  std::vector<T> host() const {
    std::vector<T> h(size);
    locmoe::cuda_detail::check(cudaMemcpy(h.data(), data, size * sizeof(T), cudaMemcpyDeviceToHost), "to host");
    return h;
  }
};

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

}  // namespace

int main() {
  using namespace locmoe;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  const std::size_t tokens = 3001, d = 320, n = 16, k = 2;
  const std::int64_t capacity = 320;
  std::vector<float> x(tokens * d);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(rng);
  x[7 * d] = std::nanf("");  // an invalid token
  thread_pool pool(2);
  const cpu_backend cpu(pool);
  const cuda_backend gpu;
  const grap_gate<float> gate{d, n, true, nullptr};

  // Route.
  std::vector<expert_index> ci(tokens * k);
  std::vector<float> cw(tokens * k), cp(tokens * n);
  cpu.route_grap(gate, matrix_view<const float>(x.data(), tokens, d), select_options{k, false},
                 route_outputs<float>{{ci.data(), tokens, k}, {cw.data(), tokens, k}, {cp.data(), tokens, n}, {}});
  device_array<float> dx(x), dw(tokens * k), dp(tokens * n);
  device_array<expert_index> di(tokens * k);
  gpu.route_grap(gate, matrix_view<const float>(dx.data, tokens, d), select_options{k, false},
                 route_outputs<float>{{di.data, tokens, k}, {dw.data, tokens, k}, {dp.data, tokens, n}, {}});
  const auto gi = di.host();
  const auto gw = dw.host();
  const auto gp = dp.host();
  double worst_p = 0;
  for (std::size_t i = 0; i < tokens * n; ++i) worst_p = std::max(worst_p, static_cast<double>(std::fabs(gp[i] - cp[i])));
  expect(worst_p < 1e-6, "probabilities agree to 1e-6");
  std::size_t differ = 0;
  double worst = 0;
  for (std::size_t p = 0; p < tokens * k; ++p) {
    differ += gi[p] != ci[p];
    worst = std::max(worst, static_cast<double>(std::fabs(gw[p] - cw[p])));
  }
  std::printf("route: %zu of %zu choices differ from the CPU's; largest weight difference %.3g\n", differ, tokens * k, worst);
  expect(gi[7 * k] == no_expert, "the NaN token is invalid");
  expect(differ <= tokens * k / 1000, "choices agree but for near ties");
  expect(worst < 1e-6, "weights agree to 1e-6");

  // Dense route against the CPU's dense route (W on the device).
  {
    std::vector<float> wf(n * d);
    for (float& v : wf) v = normal(rng) * 0.05f;
    const dense_gate<float> host_gate{{wf.data(), n, d}, nullptr, false};
    std::vector<expert_index> hi(tokens * k);
    std::vector<float> hw(tokens * k), hl(tokens * n);
    cpu.route_dense(host_gate, matrix_view<const float>(x.data(), tokens, d), select_options{k, true},
                    route_outputs<float>{{hi.data(), tokens, k}, {hw.data(), tokens, k}, {}, {hl.data(), tokens, n}}, nullptr, 0);
    device_array<float> dwf(wf), dl(tokens * n), dw2(tokens * k);
    device_array<expert_index> di2(tokens * k);
    const dense_gate<float> device_gate{{dwf.data, n, d}, nullptr, false};
    gpu.route_dense(device_gate, matrix_view<const float>(dx.data, tokens, d), select_options{k, true},
                    route_outputs<float>{{di2.data, tokens, k}, {dw2.data, tokens, k}, {}, {dl.data, tokens, n}});
    const auto gi2 = di2.host();
    const auto gw2 = dw2.host();
    std::size_t dense_differ = 0;
    double dense_worst = 0;
    for (std::size_t p = 0; p < tokens * k; ++p) {
      dense_differ += gi2[p] != hi[p];
      if (gi2[p] == hi[p]) dense_worst = std::max(dense_worst, static_cast<double>(std::fabs(gw2[p] - hw[p])));
    }
    std::printf("dense route: %zu of %zu choices differ; largest weight difference %.3g\n", dense_differ, tokens * k, dense_worst);
    expect(gi2[7 * k] == no_expert, "dense: the NaN token is invalid");
    expect(dense_differ <= tokens * k / 1000, "dense: choices agree but for near ties");
    expect(dense_worst < 1e-5, "dense: renormalized weights agree to 1e-5");
  }

  // Slots, dispatch and combine on the CPU's choices: bit for bit.
  device_array<expert_index> dci(ci), de(tokens * k);
  device_array<slot_index> ds(tokens * k);
  device_array<std::int64_t> drouted(n), dkept(n);
  device_array<unsigned char> dws(gpu.slot_workspace_size(tokens, n));
  gpu.assign_slots({{dci.data, tokens, k}, {de.data, tokens, k}, {ds.data, tokens, k}, drouted.data, dkept.data, n, capacity},
                   dws.data, dws.size);
  std::vector<expert_index> ce(tokens * k);
  std::vector<slot_index> cs(tokens * k);
  std::vector<std::int64_t> crouted(n), ckept(n);
  std::vector<unsigned char> cws(cpu.slot_workspace_size(tokens, n));
  cpu.assign_slots({{ci.data(), tokens, k}, {ce.data(), tokens, k}, {cs.data(), tokens, k}, crouted.data(), ckept.data(), n, capacity},
                   cws.data(), cws.size());
  expect(de.host() == ce && ds.host() == cs, "slots equal the CPU's");
  expect(drouted.host() == crouted && dkept.host() == ckept, "counts equal the CPU's");

  const std::size_t rows = n * static_cast<std::size_t>(capacity);
  std::vector<float> cbuf(rows * d, 0.0f), cy(tokens * d);
  const pair_layout cpairs{ce.data(), cs.data(), tokens, k, static_cast<std::size_t>(capacity)};
  cpu.dispatch(cpairs, matrix_view<const float>(x.data(), tokens, d), matrix_view<float>(cbuf.data(), rows, d));
  device_array<float> dbuf(cbuf.size()), dy(tokens * d);
  cudaMemset(dbuf.data, 0, cbuf.size() * sizeof(float));
  const pair_layout gpairs{de.data, ds.data, tokens, k, static_cast<std::size_t>(capacity)};
  gpu.dispatch(gpairs, matrix_view<const float>(dx.data, tokens, d), matrix_view<float>(dbuf.data, rows, d));
  expect(same_bits(dbuf.host(), cbuf), "dispatch equals the CPU's");
  device_array<float> dcw(cw);
  cpu.combine(cpairs, matrix_view<const float>(cbuf.data(), rows, d), matrix_view<const float>(cw.data(), tokens, k),
              matrix_view<float>(cy.data(), tokens, d));
  gpu.combine(gpairs, matrix_view<const float>(dbuf.data, rows, d), matrix_view<const float>(dcw.data, tokens, k),
              matrix_view<float>(dy.data, tokens, d));
  expect(same_bits(dy.host(), cy), "combine equals the CPU's");
  // bf16 rows: dispatch and combine (summed in float, rounded once) against the CPU.
  std::vector<bf16> xb(x.size()), cbb(rows * d, bf16(0.0f)), cyb(tokens * d);
  for (std::size_t i = 0; i < x.size(); ++i) xb[i] = bf16(x[i] * 0.5f);
  cpu.dispatch(cpairs, matrix_view<const bf16>(xb.data(), tokens, d), matrix_view<bf16>(cbb.data(), rows, d));
  cpu.combine(cpairs, matrix_view<const bf16>(cbb.data(), rows, d), matrix_view<const float>(cw.data(), tokens, k),
              matrix_view<bf16>(cyb.data(), tokens, d));
  device_array<bf16> dxb(xb), dbb(cbb), dyb(tokens * d);
  gpu.dispatch(gpairs, matrix_view<const bf16>(dxb.data, tokens, d), matrix_view<bf16>(dbb.data, rows, d));
  expect(same_bits(dbb.host(), cbb), "bf16 dispatch equals the CPU's");
  gpu.combine(gpairs, matrix_view<const bf16>(dbb.data, rows, d), matrix_view<const float>(dcw.data, tokens, k),
              matrix_view<bf16>(dyb.data, tokens, d));
  expect(same_bits(dyb.host(), cyb), "bf16 combine equals the CPU's");

  // Padding rows and the backwards (the training step): the layouts carry the kept counts, every buffer starts
  // as NaN (0xff bytes), so a row the GPU does not write shows.
  {
    pair_layout cp = cpairs, gp = gpairs;
    cp.kept_per_expert = ckept.data();
    gp.kept_per_expert = dkept.data;
    cp.experts = gp.experts = n;
    std::vector<float> cpad(rows * d, std::nanf("")), gy(tokens * d), cgb(rows * d, std::nanf("")), cgx(tokens * d);
    std::vector<float> cgw(tokens * k, -1.0f);
    for (float& v : gy) v = normal(rng);
    cpu.dispatch(cp, matrix_view<const float>(x.data(), tokens, d), matrix_view<float>(cpad.data(), rows, d));
    device_array<float> dpad(rows * d), dgy(gy), dgb(rows * d), dgx(tokens * d), dgw(tokens * k);
    cudaMemset(dpad.data, 0xff, rows * d * sizeof(float));
    cudaMemset(dgb.data, 0xff, rows * d * sizeof(float));
    cudaMemset(dgx.data, 0xff, tokens * d * sizeof(float));
    gpu.dispatch(gp, matrix_view<const float>(dx.data, tokens, d), matrix_view<float>(dpad.data, rows, d));
    expect(same_bits(dpad.host(), cpad), "dispatch with kept counts: padding rows zero, as the CPU's");
    cpu.combine_backward(cp, matrix_view<const float>(cpad.data(), rows, d), matrix_view<const float>(cw.data(), tokens, k),
                         matrix_view<const float>(gy.data(), tokens, d), matrix_view<float>(cgb.data(), rows, d),
                         matrix_view<float>(cgw.data(), tokens, k));
    gpu.combine_backward(gp, matrix_view<const float>(dpad.data, rows, d), matrix_view<const float>(dcw.data, tokens, k),
                         matrix_view<const float>(dgy.data, tokens, d), matrix_view<float>(dgb.data, rows, d),
                         matrix_view<float>(dgw.data, tokens, k));
    expect(same_bits(dgb.host(), cgb), "combine_backward: grad_buffer equals the CPU's (one rounding each)");
    const auto ggw = dgw.host();
    double worst_gw = 0;
    for (std::size_t p = 0; p < tokens * k; ++p) worst_gw = std::max(worst_gw, static_cast<double>(std::fabs(ggw[p] - cgw[p])));
    std::printf("combine_backward: largest grad_weight difference %.3g (other summation order)\n", worst_gw);
    expect(worst_gw < 1e-3, "combine_backward: grad_weight agrees to 1e-3 (a dot of 320 products)");
    cpu.dispatch_backward(cp, matrix_view<const float>(cgb.data(), rows, d), matrix_view<float>(cgx.data(), tokens, d));
    gpu.dispatch_backward(gp, matrix_view<const float>(dgb.data, rows, d), matrix_view<float>(dgx.data, tokens, d));
    expect(same_bits(dgx.host(), cgx), "dispatch_backward equals the CPU's");
    std::vector<bf16> cgbb(rows * d), cgyb(tokens * d), cgxb(tokens * d);
    for (std::size_t i = 0; i < gy.size(); ++i) cgyb[i] = bf16(gy[i]);
    std::vector<float> cgwb(tokens * k);
    cpu.combine_backward(cp, matrix_view<const bf16>(cbb.data(), rows, d), matrix_view<const float>(cw.data(), tokens, k),
                         matrix_view<const bf16>(cgyb.data(), tokens, d), matrix_view<bf16>(cgbb.data(), rows, d),
                         matrix_view<float>(cgwb.data(), tokens, k));
    cpu.dispatch_backward(cp, matrix_view<const bf16>(cgbb.data(), rows, d), matrix_view<bf16>(cgxb.data(), tokens, d));
    device_array<bf16> dgyb(cgyb), dgbb(rows * d), dgxb(tokens * d);
    gpu.combine_backward(gp, matrix_view<const bf16>(dbb.data, rows, d), matrix_view<const float>(dcw.data, tokens, k),
                         matrix_view<const bf16>(dgyb.data, tokens, d), matrix_view<bf16>(dgbb.data, rows, d),
                         matrix_view<float>{});
    gpu.dispatch_backward(gp, matrix_view<const bf16>(dgbb.data, rows, d), matrix_view<bf16>(dgxb.data, tokens, d));
    expect(same_bits(dgbb.host(), cgbb), "bf16 combine_backward: grad_buffer equals the CPU's");
    expect(same_bits(dgxb.host(), cgxb), "bf16 dispatch_backward equals the CPU's");
  }
  cuda_detail::check(cudaDeviceSynchronize(), "synchronize");
  std::printf("%s\n", failures ? "cuda backend: FAILED" : "cuda backend: every check passed");
  return failures ? 1 : 0;
}
