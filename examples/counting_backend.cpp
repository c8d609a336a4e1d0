// A third backend in a few dozen lines, with no change to the library: it forwards every step to the CPU backend
// and counts the calls and the rows it moved (what a profiling or an NPU backend would hook). The pipeline checks
// the concept at compile time; the test suite runs this program and compares its output with the CPU backend's.
#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/capacity.hpp>

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

class counting_backend {
 public:
  using stream_type = locmoe::cpu_stream;
  static constexpr const char* name = "counting";
  static constexpr bool host_memory = true;  // it forwards to cpu_backend

  explicit counting_backend(const locmoe::cpu_backend& inner) : inner_(inner) {}

  std::size_t slot_workspace_size(std::size_t tokens, std::size_t n) const { return inner_.slot_workspace_size(tokens, n); }

  template <class T, class Real>
  std::size_t route_grap(const locmoe::grap_gate<Real>& gate, const locmoe::matrix_view<T>& x,
                         const locmoe::select_options& options, const locmoe::route_outputs<Real>& out,
                         stream_type s) const {
    ++calls;
    return inner_.route_grap(gate, x, options, out, s);
  }
  void assign_slots(const locmoe::slot_problem& p, void* ws, std::size_t bytes, stream_type s) const {
    ++calls;
    inner_.assign_slots(p, ws, bytes, s);
  }
  template <class T>
  void dispatch(const locmoe::pair_layout& pairs, const locmoe::matrix_view<const T>& x,
                const locmoe::matrix_view<T>& buffer, stream_type s) const {
    ++calls;
    for (std::size_t p = 0; p < pairs.tokens * pairs.top_k; ++p) rows_moved += pairs.kept(p);
    inner_.dispatch(pairs, x, buffer, s);
  }
  template <class T, class W>
  void combine(const locmoe::pair_layout& pairs, const locmoe::matrix_view<const T>& buffer,
               const locmoe::matrix_view<const W>& weight, const locmoe::matrix_view<T>& y, stream_type s) const {
    ++calls;
    inner_.combine(pairs, buffer, weight, y, s);
  }
  template <class T, class W>
  void combine_backward(const locmoe::pair_layout& pairs, const locmoe::matrix_view<const T>& buffer,
                        const locmoe::matrix_view<const W>& weight, const locmoe::matrix_view<const T>& grad_y,
                        const locmoe::matrix_view<T>& grad_buffer, const locmoe::matrix_view<W>& grad_weight,
                        stream_type s) const {
    ++calls;
    inner_.combine_backward(pairs, buffer, weight, grad_y, grad_buffer, grad_weight, s);
  }
  template <class T>
  void dispatch_backward(const locmoe::pair_layout& pairs, const locmoe::matrix_view<const T>& grad_buffer,
                         const locmoe::matrix_view<T>& grad_x, stream_type s) const {
    ++calls;
    inner_.dispatch_backward(pairs, grad_buffer, grad_x, s);
  }

  mutable std::size_t calls = 0, rows_moved = 0;

 private:
  const locmoe::cpu_backend& inner_;
};
static_assert(locmoe::uses_host_memory_v<counting_backend>, "moe_router may run on it: its memory is the host's");

static_assert(locmoe::is_backend_v<counting_backend>, "the example must model the concept");

}  // namespace

int main() {
  using namespace locmoe;
  const std::size_t tokens = 512, d = 64, n = 8, k = 2;
  std::vector<float> x(tokens * d);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(rng);
  const router_shape shape{tokens, d, n, k, classic_capacity(static_cast<std::int64_t>(tokens), 1.0, 1, static_cast<std::int64_t>(n), 0) * 2};
  thread_pool pool(2);
  const cpu_backend cpu(pool, 64);
  const counting_backend counting(cpu);

  // Run the same layer on both backends; the outputs must agree bit for bit.
  std::vector<float> y[2];
  for (int which = 0; which < 2; ++which) {
    std::vector<expert_index> indices(tokens * k), expert(tokens * k);
    std::vector<slot_index> slot(tokens * k);
    std::vector<float> weights(tokens * k);
    std::vector<std::int64_t> routed(n), kept(n);
    const pipeline_outputs<float> out{{indices.data(), tokens, k}, {weights.data(), tokens, k}, {}, {expert.data(), tokens, k},
                                      {slot.data(), tokens, k}, routed.data(), kept.data()};
    const auto run = [&](const auto& backend) {
      const grap_pipeline pipeline(backend, shape);
      std::vector<unsigned char> workspace(pipeline.workspace_size());
      std::vector<float> buffer(pipeline.buffer_rows() * d, 0.0f);
      pipeline.run(grap_gate<float>{d, n, true, nullptr}, matrix_view<const float>(x.data(), tokens, d), out,
                   matrix_view<float>(buffer.data(), pipeline.buffer_rows(), d), workspace.data(), workspace.size());
      for (float& v : buffer) v *= 2.0f;  // the "experts"
      y[which].assign(tokens * d, 0.0f);
      pipeline.combine(out, matrix_view<const float>(buffer.data(), pipeline.buffer_rows(), d),
                       matrix_view<float>(y[which].data(), tokens, d));
    };
    if (which == 0) run(cpu); else run(counting);
  }
  const bool same = std::memcmp(y[0].data(), y[1].data(), y[0].size() * sizeof(float)) == 0;
  std::printf("counting backend: %zu calls, %zu rows dispatched; outputs %s the cpu backend's\n", counting.calls,
              counting.rows_moved, same ? "identical to" : "DIFFERENT from");
  return same && counting.calls == 4 ? 0 : 1;
}
