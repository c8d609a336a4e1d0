// moe_router allocates nothing after its first step at a shape: every [T x ...] buffer and the selection's and
// losses' scratch are owned and reused. A separate program because it counts every operator new of the process.
#include <locmoe/router.hpp>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <new>
#include <vector>

namespace {
std::atomic<std::size_t> allocated_bytes{0};
}

// GCC pairs a replaced operator delete's free() with the default operator new it assumes: both are replaced here.
#if defined(__GNUC__) && !defined(__clang__)
#  pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t size) {
  allocated_bytes += size;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

/// Bytes allocated by the third step of a layer (forward, dispatch, combine and their backwards) at T tokens.
std::size_t step_bytes(std::size_t tokens, locmoe::score_function score) {
  using namespace locmoe;
  const std::size_t d = 64, n = 16;
  const topology topo = topology::uniform(4, 2, static_cast<std::int64_t>(n));
  moe_router_options o;
  o.hidden = d;
  o.experts = n;
  o.top_k = 2;
  o.score = score;
  o.z_coeff = 1e-3;
  o.locality_coeff = 0.01;
  o.topo = &topo;
  thread_pool pool(2);
  const cpu_backend cpu(pool);
  moe_router<> router(cpu, o);
  std::vector<float> x(tokens * d), y(tokens * d), dx(tokens * d), buffer(tokens * 2 * d * 2), grad(buffer.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 101) / 50.0f - 1.0f;
  const matrix_view<const float> xv(x.data(), tokens, d);
  std::size_t bytes = 0;
  for (int step = 0; step < 3; ++step) {
    const std::size_t before = allocated_bytes.load();
    const routing<float>& r = router.forward(xv, {});
    const matrix_view<float> b(buffer.data(), r.buffer_rows, d), g(grad.data(), r.buffer_rows, d);
    router.dispatch(xv, b);
    router.combine(matrix_view<const float>(b), matrix_view<float>(y.data(), tokens, d));
    router.combine_backward(matrix_view<const float>(b), matrix_view<const float>(y.data(), tokens, d), g);
    router.dispatch_backward(matrix_view<const float>(g), matrix_view<float>(dx.data(), tokens, d));
    router.backward(xv, {}, matrix_view<float>(dx.data(), tokens, d), gate_gradients<float>{});
    bytes = allocated_bytes.load() - before;
  }
  return bytes;
}

}  // namespace

int main() {
  int failures = 0;
  for (const auto score : {locmoe::score_function::softmax, locmoe::score_function::sigmoid}) {
    const std::size_t small = step_bytes(256, score), large = step_bytes(8192, score);
    std::printf("%s: bytes allocated by a step after the first: %zu at T = 256, %zu at T = 8192\n",
                score == locmoe::score_function::softmax ? "softmax" : "sigmoid", small, large);
    failures += small != 0 || large != 0;
  }
  std::printf("%s\n", failures ? "router allocations: FAILED" : "router allocations: nothing allocated after the first step");
  return failures ? 1 : 0;
}
