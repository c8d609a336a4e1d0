// The CPU dispatch and combine of dispatch.hpp, and their backwards, against a plain copy of the same bytes,
// single-threaded. Args (T, d, n, k); the layer: T = 16384 tokens, d = 5120, n = 16 experts, k in {1, 2}; choices
// from score_route on N(0, 1) logits (softmax, Top-k), kept by capacity_assigner (capacity factor 1.25, drop policy
// position) with topology::uniform(16, 8, n); token ranks in contiguous blocks. Every buffer is 64-byte aligned
// (bench/aligned.hpp), as tensor libraries allocate them.
// Families, each for float and bf16 rows (suffix _f32, _bf16); bytes_per_second counts bytes read + written:
//   plan_build                build_dispatch_plan; items_per_second = tokens/s
//   dispatch                  dispatch(plan, x, buffer): the rows of x with a kept choice read (each once: a
//                             token's second copy comes from cache), n C rows written (padding as zeros)
//   combine                   combine(plan, buffer, weight, y): kept rows read, T rows written
//   combine_backward          combine_backward: T rows of dL/dy and kept rows of the buffer read, n C rows written
//   dispatch_backward         dispatch_backward: kept rows read, T rows written
//   memcpy_<family>           std::memcpy of (read + written) / 2 bytes: the same traffic as <family>
//   rowcopy_<family>          the same bytes copied one row (d elements) at a time
//   ntcopy_<family>           the family's own reads and writes: rows copied with non-temporal stores and
//                             prefetching, as the kernels write, then the rest as non-temporal zeros or a plain read
// bench/dispatch_ratios.py prints each family's median bytes/s over the fastest of its three copies.
// Every array is allocated and touched once per (k) and shared by the families, outside the timing loop; each
// run starts with one untimed call (on this VM the first pass over freshly zeroed memory ran up to 10x slower).
#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include "aligned.hpp"

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <vector>

namespace {

using locmoe::matrix_view;

constexpr std::int64_t ranks = 16, ranks_per_node = 8;

// One layer's routing, plan and activations for a shape (T, d, n, k).
struct layer {
  std::size_t tokens, d, n, k, rows;  // rows: of the [n C x d] expert buffer
  locmoe::topology topo;
  std::vector<locmoe::expert_index> expert;
  std::vector<locmoe::slot_index> slot;
  std::vector<float> kept_weight;
  std::int64_t capacity = 0;
  locmoe::dispatch_plan plan;
  template <class T>
  struct rows_of {  // one element type's operands
    locmoe_bench::aligned_vector<T> x, buffer, y, grad_buffer;
  };
  rows_of<float> f32;
  rows_of<locmoe::bf16> bf16;
  locmoe_bench::aligned_vector<float> grad_weight;

  layer(std::size_t tokens_, std::size_t d_, std::size_t n_, std::size_t k_)
      : tokens(tokens_), d(d_), n(n_), k(k_), rows(0),
        topo(locmoe::topology::uniform(ranks, ranks_per_node, static_cast<std::int64_t>(n_))),
        expert(tokens * k), slot(tokens * k), kept_weight(tokens * k) {
    std::mt19937_64 rng(tokens * 1000003u + n * 101u + k);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> logits(tokens * n), weights(tokens * k), probabilities(tokens * n);
    std::vector<locmoe::expert_index> indices(tokens * k);
    for (auto& v : logits) v = normal(rng);
    locmoe::router_options<float> ro;
    ro.k = k;
    const locmoe::route_outputs<float> routed{
        {indices.data(), tokens, k}, {weights.data(), tokens, k}, {probabilities.data(), tokens, n}, {}};
    locmoe::score_route(matrix_view<const float>(logits.data(), tokens, n), ro, routed);
    locmoe::capacity_options co;
    co.capacity_factor = 1.25;
    co.policy = locmoe::drop_policy::position;
    locmoe::capacity_assigner<float> assigner(n, co);
    locmoe::assignment_context<float> context;
    context.topo = &topo;
    context.token_rank = locmoe::token_ranks::contiguous_blocks();
    const locmoe::assignment_outputs<float> assigned{
        {expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_weight.data(), tokens, k}, nullptr, nullptr};
    capacity = assigner
                   .run(matrix_view<const locmoe::expert_index>(indices.data(), tokens, k),
                        matrix_view<const float>(weights.data(), tokens, k), assigned, context)
                   .capacity;
    plan = build();
    rows = plan.buffer_rows();
    fill(f32);
    fill(bf16);
    grad_weight.assign(tokens * k, 0.0f);
  }

  template <class T>
  void fill(rows_of<T>& r) {
    r.x.resize(tokens * d);
    for (std::size_t i = 0; i < r.x.size(); ++i) r.x[i] = T(static_cast<float>(i % 1021) * 0.001f - 0.5f);
    r.buffer.assign(rows * d, T(1.0f));
    r.grad_buffer.assign(rows * d, T(0.0f));
    r.y.assign(tokens * d, T(0.5f));
  }
  template <class T>
  rows_of<T>& operands() {
    if constexpr (std::is_same_v<T, float>) {
      return f32;
    } else {
      return bf16;
    }
  }

  locmoe::dispatch_plan build() const {
    return locmoe::build_dispatch_plan(matrix_view<const locmoe::expert_index>(expert.data(), tokens, k),
                                       matrix_view<const locmoe::slot_index>(slot.data(), tokens, k), capacity, topo,
                                       locmoe::token_ranks::contiguous_blocks());
  }
  std::size_t kept() const { return plan.order.size(); }
  /// Tokens with at least one kept choice: the rows of x dispatch reads (dispatch copies in token order, so a
  /// token's second copy is read from cache).
  std::size_t tokens_read() const {
    std::size_t count = 0;
    for (std::size_t t = 0; t < tokens; ++t) {
      bool any = false;
      for (std::size_t j = 0; j < k; ++j) any = any || expert[t * k + j] != locmoe::no_expert;
      count += any;
    }
    return count;
  }

  template <class T>
  void dispatch() {
    rows_of<T>& r = operands<T>();
    locmoe::dispatch(plan, matrix_view<const T>(r.x.data(), tokens, d), matrix_view<T>(r.buffer.data(), rows, d));
  }
  template <class T>
  void combine() {
    rows_of<T>& r = operands<T>();
    locmoe::combine(plan, matrix_view<const T>(r.buffer.data(), rows, d), matrix_view<const float>(kept_weight.data(), tokens, k),
                    matrix_view<T>(r.y.data(), tokens, d));
  }
  template <class T>
  void combine_backward() {
    rows_of<T>& r = operands<T>();
    locmoe::combine_backward(plan, matrix_view<const T>(r.buffer.data(), rows, d),
                             matrix_view<const float>(kept_weight.data(), tokens, k), matrix_view<const T>(r.y.data(), tokens, d),
                             matrix_view<T>(r.grad_buffer.data(), rows, d), matrix_view<float>(grad_weight.data(), tokens, k));
  }
  template <class T>
  void dispatch_backward() {
    rows_of<T>& r = operands<T>();
    locmoe::dispatch_backward(plan, matrix_view<const T>(r.grad_buffer.data(), rows, d), matrix_view<T>(r.x.data(), tokens, d));
  }
};

// Built on first use and kept for the whole run: random interleaving alternates the families.
layer& shared_layer(const benchmark::State& state) {
  static std::map<std::vector<std::int64_t>, std::unique_ptr<layer>> layers;
  const std::vector<std::int64_t> key = {state.range(0), state.range(1), state.range(2), state.range(3)};
  auto& slot = layers[key];
  if (!slot) {
    slot = std::make_unique<layer>(static_cast<std::size_t>(key[0]), static_cast<std::size_t>(key[1]),
                                   static_cast<std::size_t>(key[2]), static_cast<std::size_t>(key[3]));
  }
  return *slot;
}

// The copy references' source and destination, grown to the largest block asked for and kept.
struct copy_blocks {
  locmoe_bench::aligned_vector<unsigned char> from, to;
  void reserve(std::size_t bytes) {
    if (from.size() >= bytes) return;
    from.assign(bytes, 1);
    to.assign(bytes, 0);
  }
};

copy_blocks& shared_blocks(std::size_t bytes) {
  static copy_blocks blocks;
  blocks.reserve(bytes);
  return blocks;
}

void set_bytes(benchmark::State& state, std::size_t bytes) {
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(bytes));
}

enum class op { dispatch, combine, combine_backward, dispatch_backward };

/// Bytes each operation reads and writes (rows of d elements of `element` bytes).
struct bytes_moved {
  std::size_t read = 0, written = 0;
};
bytes_moved moved(const layer& l, op o, std::size_t element) {
  const std::size_t kept = l.kept(), buffer = l.rows, tokens = l.tokens, row = l.d * element;
  switch (o) {
    case op::dispatch: return {l.tokens_read() * row, buffer * row};
    case op::combine: return {kept * row, tokens * row};
    case op::combine_backward: return {(tokens + kept) * row, buffer * row};
    case op::dispatch_backward: return {kept * row, tokens * row};
  }
  return {};
}

/// Bytes read + written.
std::size_t traffic(const layer& l, op o, std::size_t element) {
  const bytes_moved m = moved(l, o, element);
  return m.read + m.written;
}

void plan_build(benchmark::State& state) {
  const layer& l = shared_layer(state);
  for (auto _ : state) {
    const locmoe::dispatch_plan plan = l.build();
    benchmark::DoNotOptimize(plan.order.data());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations()) * static_cast<std::int64_t>(l.tokens));
}

template <class T, op O>
void kernel(benchmark::State& state) {
  layer& l = shared_layer(state);
  const auto run = [&] {
    if constexpr (O == op::dispatch) l.dispatch<T>();
    if constexpr (O == op::combine) l.combine<T>();
    if constexpr (O == op::combine_backward) l.combine_backward<T>();
    if constexpr (O == op::dispatch_backward) l.dispatch_backward<T>();
  };
  run();  // warm-up
  for (auto _ : state) {
    run();
    benchmark::ClobberMemory();
  }
  set_bytes(state, traffic(l, O, sizeof(T)));
}

enum class copy_kind { memcpy, rows, streaming };

/// The plain way to move a kernel's bytes. memcpy and rows: a copy that reads half the kernel's traffic and writes
/// as much, in one memcpy or one memcpy per row of d elements. streaming: the kernel's own split of reads and
/// writes, done as the kernels do above LOCMOE_STREAMING_STORE_BYTES: rows copied with non-temporal stores and
/// prefetching, then the rest of the writes as non-temporal zeros or the rest of the reads as a plain read.
template <class T, op O, copy_kind Kind>
void copy_reference(benchmark::State& state) {
  const layer& l = shared_layer(state);
  const bytes_moved m = moved(l, O, sizeof(T));
  const std::size_t half = (m.read + m.written) / 2, row = l.d * sizeof(T);
  const std::size_t copied = Kind == copy_kind::streaming ? std::min(m.read, m.written) : half;
  copy_blocks& blocks = shared_blocks(std::max(m.read, m.written));
  std::size_t sink = 0;
  const auto copy = [&] {
    if (Kind == copy_kind::memcpy) {
      std::memcpy(blocks.to.data(), blocks.from.data(), half);
      return;
    }
    for (std::size_t at = 0; at + row <= copied; at += row) {
      if (Kind == copy_kind::rows) {
        std::memcpy(blocks.to.data() + at, blocks.from.data() + at, row);
      } else {
        const unsigned char* next = at + 2 * row <= copied ? blocks.from.data() + at + row : nullptr;
        locmoe::detail::copy_row_streaming(blocks.from.data() + at, row, blocks.to.data() + at, next);
      }
    }
    if (Kind != copy_kind::streaming) return;
    for (std::size_t at = copied; at + row <= m.written; at += row) {
      locmoe::detail::zero_row(blocks.to.data() + at, row, true);
    }
    locmoe::detail::streaming_fence();
    if (m.read > copied) {
      sink ^= locmoe::detail::run<locmoe::detail::stream_read_kernel>({blocks.from.data() + copied, m.read - copied, true});
    }
  };
  copy();  // warm-up
  for (auto _ : state) {
    copy();
    benchmark::DoNotOptimize(blocks.to.data());
    benchmark::DoNotOptimize(sink);
    benchmark::ClobberMemory();
  }
  set_bytes(state, Kind == copy_kind::streaming ? m.read + m.written : half * 2);
}

// (T, d, n, k): the paper's layer, k in {1, 2}.
void shapes(benchmark::internal::Benchmark* b) {
  for (const int k : {1, 2}) b->Args({16384, 5120, 16, k});
  b->ArgNames({"T", "d", "n", "k"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

#define LOCMOE_BENCH_FAMILY(name, O)                                                                   \
  BENCHMARK(kernel<float, O>)->Name(#name "_f32")->Apply(shapes);                                    \
  BENCHMARK(copy_reference<float, O, copy_kind::memcpy>)->Name("memcpy_" #name "_f32")->Apply(shapes);          \
  BENCHMARK(copy_reference<float, O, copy_kind::rows>)->Name("rowcopy_" #name "_f32")->Apply(shapes);            \
  BENCHMARK(copy_reference<float, O, copy_kind::streaming>)->Name("ntcopy_" #name "_f32")->Apply(shapes);        \
  BENCHMARK(kernel<locmoe::bf16, O>)->Name(#name "_bf16")->Apply(shapes);                                        \
  BENCHMARK(copy_reference<locmoe::bf16, O, copy_kind::memcpy>)->Name("memcpy_" #name "_bf16")->Apply(shapes);   \
  BENCHMARK(copy_reference<locmoe::bf16, O, copy_kind::rows>)->Name("rowcopy_" #name "_bf16")->Apply(shapes);    \
  BENCHMARK(copy_reference<locmoe::bf16, O, copy_kind::streaming>)->Name("ntcopy_" #name "_bf16")->Apply(shapes)

BENCHMARK(plan_build)->Apply(shapes);
LOCMOE_BENCH_FAMILY(dispatch, op::dispatch);
LOCMOE_BENCH_FAMILY(combine, op::combine);
LOCMOE_BENCH_FAMILY(combine_backward, op::combine_backward);
LOCMOE_BENCH_FAMILY(dispatch_backward, op::dispatch_backward);

}  // namespace

BENCHMARK_MAIN();
