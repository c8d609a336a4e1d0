// locmoe/backend/cpu.hpp - the CPU backend: the router's device steps over token ranges on a thread_pool.
//
// A model of the backend concept (backend/backend.hpp). Every step splits its tokens (or pairs) into
// contiguous ranges of at least `grain` rows, runs them on the pool, and gives results bit for bit equal to the
// single-threaded library calls, whatever the thread count:
//   route_grap / route_dense  the fused gate + softmax + Top-k (select.hpp's grap_route / dense_route on each
//                             range; per-token results do not depend on the range)
//   assign_slots              capacity slots under the position policy, in three passes: per-range counts per
//                             expert, an exclusive scan over the ranges (expert by expert), then each range
//                             numbers its choices from its offsets. The slots equal capacity_assigner's with
//                             drop_policy::position and the same C.
//   dispatch / combine        dispatch.hpp's kernels on pair and token ranges.
// The stream is a tag: every call has finished when it returns. Calls allocate nothing; the workspace sizes are
// given by *_workspace_size. Preconditions are checked before any thread starts (locmoe::error).
// Cost: the single-threaded cost divided by the threads, plus one pool wake-up per pass.
// Thread safety: a cpu_backend may be shared; calls from several threads on one backend serialize on its pool (one
// run at a time), so give each caller thread its own pool for parallel throughput.
// Example: docs/api.md#device-backends.
#pragma once

#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/thread_pool.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

namespace locmoe {

/// The CPU backend's stream: a tag (work runs on the pool and is finished when the call returns).
struct cpu_stream {};

class cpu_backend {
 public:
  using stream_type = cpu_stream;
  static constexpr const char* name = "cpu";
  static constexpr bool host_memory = true;

  /// Runs on `pool` (which must outlive the backend); ranges hold at least `grain` tokens.
  explicit cpu_backend(thread_pool& pool, std::size_t grain = 256) : pool_(pool), grain_(std::max<std::size_t>(grain, 1)) {}

  std::size_t threads() const noexcept { return pool_.threads(); }

  /// Workspace bytes of route_dense for activations of type T (none for GrAP, nor for float/double dense).
  template <class T>
  std::size_t route_workspace_size(std::size_t d, std::size_t n) const noexcept {
    return threads() * dense_workspace_size<detail::plain_t<T>>(d, n) * sizeof(accumulate_t<detail::plain_t<T>>);
  }
  /// Workspace bytes of assign_slots.
  std::size_t slot_workspace_size(std::size_t tokens, std::size_t n) const noexcept {
    return ranges(tokens).count * n * sizeof(std::int64_t);
  }

  /// Fused GrAP gate + softmax + Top-k; returns the invalid tokens (select.hpp's rules).
  template <class T, class Real>
  std::size_t route_grap(const grap_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                         const route_outputs<Real>& out, cpu_stream = {}) const {
    // Check once on the calling thread (an empty range: the arguments only), so no worker meets a bad argument.
    grap_route(gate, x, options, out, token_range{0, 0}, construction_policy{});
    return sum_over_ranges(x.rows, [&](token_range r) { return grap_route(gate, x, options, out, r, construction_policy{}); });
  }

  /// Dense gate + softmax + Top-k (out.logits required); workspace: route_workspace_size<T>(d, n) bytes.
  template <class T, class Real>
  std::size_t route_dense(const dense_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                          const route_outputs<Real>& out, void* workspace, std::size_t workspace_bytes,
                          cpu_stream = {}) const {
    using E = detail::plain_t<T>;
    const std::size_t d = x.cols, n = gate.weight.rows, per_task = dense_workspace_size<E>(d, n);
    if (workspace_bytes < route_workspace_size<T>(d, n)) {
      detail::raise<construction_policy>(errc::domain, "locmoe::cpu_backend::route_dense", "workspace_bytes", workspace_bytes,
                                    "must be >= route_workspace_size<T>(d, n)", 0);
    }
    Real* ws = static_cast<Real*>(workspace);
    dense_route(gate, x, options, out, token_range{0, 0}, ws, per_task, construction_policy{});
    // One range per thread, so each task owns one slice of the workspace; ranges start on multiples of
    // dense_chunk_rows, so every token lands in the GEMM chunk it has in a single call (same bits).
    const std::size_t tasks = std::min(threads(), std::max<std::size_t>(1, x.rows / grain_));
    const auto boundary = [&](std::size_t task) {
      return task == tasks ? x.rows : x.rows * task / tasks / dense_chunk_rows * dense_chunk_rows;
    };
    std::atomic<std::size_t> invalid{0};
    pool_.run(tasks, [&](std::size_t task) {
      const token_range r{boundary(task), boundary(task + 1)};
      invalid += dense_route(gate, x, options, out, r, ws ? ws + task * per_task : nullptr, per_task, construction_policy{});
    });
    return invalid.load();
  }

  /// Capacity slots under the position policy (see the header comment); workspace: slot_workspace_size bytes.
  void assign_slots(const slot_problem& p, void* workspace, std::size_t workspace_bytes, cpu_stream = {}) const {
    constexpr const char* fn = "locmoe::cpu_backend::assign_slots";
    const std::size_t tokens = p.indices.rows, k = p.indices.cols, n = p.experts;
    check_slot_problem(fn, p, workspace_bytes);
    const range_split split = ranges(tokens);
    auto* counts = static_cast<std::int64_t*>(workspace);  // [range][expert]
    pool_.run(split.count, [&](std::size_t r) {
      std::int64_t* c = counts + r * n;
      std::fill(c, c + n, 0);
      for (std::size_t t = split.begin(r); t < split.end(r); ++t) {
        for (std::size_t j = 0; j < k; ++j) {
          const expert_index e = p.indices(t, j);
          if (e != no_expert) ++c[e];
        }
      }
    });
    for (std::size_t e = 0; e < n; ++e) {  // exclusive scan over the ranges, in range order
      std::int64_t before = 0;
      for (std::size_t r = 0; r < split.count; ++r) {
        const std::int64_t here = counts[r * n + e];
        counts[r * n + e] = before;
        before += here;
      }
      p.tokens_per_expert[e] = before;
      p.kept_per_expert[e] = std::min(before, p.capacity);
    }
    pool_.run(split.count, [&](std::size_t r) {
      std::int64_t* next = counts + r * n;
      for (std::size_t t = split.begin(r); t < split.end(r); ++t) {
        for (std::size_t j = 0; j < k; ++j) {
          const expert_index e = p.indices(t, j);
          const std::int64_t s = e == no_expert ? p.capacity : next[e]++;
          const bool kept = s < p.capacity;
          p.expert(t, j) = kept ? e : no_expert;
          p.slot(t, j) = kept ? static_cast<slot_index>(s) : -1;
        }
      }
    });
  }

  /// buffer[e C + slot] = x[t] for every kept pair of `pairs`, split over pair ranges.
  template <class T>
  void dispatch(const pair_layout& pairs, const matrix_view<const T>& x, const matrix_view<T>& buffer,
                cpu_stream = {}) const {
    constexpr const char* fn = "locmoe::cpu_backend::dispatch";
    detail::check_view<construction_policy>(fn, "x", x, pairs.tokens, x.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, x.cols, "must have d columns, as x");
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    const std::size_t all = pairs.tokens * pairs.top_k;
    const bool streaming = detail::use_streaming_stores(all * x.cols * sizeof(T));
    const range_split split = ranges(all), experts = expert_ranges(pairs);
    pool_.run(split.count + experts.count, [&](std::size_t r) {
      if (r < split.count) {
        detail::dispatch_rows(pairs, nullptr, split.begin(r), split.end(r), x, buffer, streaming);
      } else {
        detail::zero_padding_rows(pairs, buffer, experts.begin(r - split.count), experts.end(r - split.count), streaming);
      }
    });
  }

  /// y[t] = sum of t's kept rows times their weights, in choice order (dispatch.hpp's combine), over token ranges.
  template <class T, class W>
  void combine(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
               const matrix_view<T>& y, cpu_stream = {}) const {
    constexpr const char* fn = "locmoe::cpu_backend::combine";
    detail::check_view<construction_policy>(fn, "y", y, pairs.tokens, y.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, y.cols, "must have d columns, as y");
    detail::check_view<construction_policy>(fn, "weight", weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    const bool streaming = detail::use_streaming_stores(pairs.tokens * y.cols * sizeof(T));
    const range_split split = ranges(pairs.tokens);
    pool_.run(split.count, [&](std::size_t r) {
      detail::run<detail::combine_kernel<T>>(
          {pairs, buffer, detail::weight_rows_of(weight), y, split.begin(r), split.end(r), streaming});
    });
  }

  /// combine's backward over token ranges (dispatch.hpp's combine_backward): grad_buffer (optional) gets
  /// w_tj grad_y[t] at each kept row and zeros on padding rows, grad_weight (optional) the row dot products.
  template <class T, class W>
  void combine_backward(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                        const matrix_view<const T>& grad_y, const matrix_view<T>& grad_buffer,
                        const matrix_view<W>& grad_weight, cpu_stream = {}) const {
    constexpr const char* fn = "locmoe::cpu_backend::combine_backward";
    const std::size_t d = grad_y.cols;
    detail::check_view<construction_policy>(fn, "grad_y", grad_y, pairs.tokens, d, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, d, "must have d columns, as grad_y");
    detail::check_view<construction_policy>(fn, "weight", weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    if (grad_buffer.present()) {
      detail::check_view<construction_policy>(fn, "grad_buffer", grad_buffer, buffer.rows, d, "must have buffer's shape");
    }
    if (grad_weight.present()) {
      detail::check_view<construction_policy>(fn, "grad_weight", grad_weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    }
    const range_split split = ranges(pairs.tokens), experts = expert_ranges(pairs);
    const std::size_t zero_tasks = grad_buffer.present() ? experts.count : 0;
    const bool streaming = detail::use_streaming_stores(pairs.tokens * pairs.top_k * d * sizeof(T));
    const detail::weight_grads grads = grad_weight.present() ? detail::weight_grads_of(grad_weight) : detail::weight_grads{};
    pool_.run(split.count + zero_tasks, [&](std::size_t r) {
      if (r < split.count) {
        detail::run<detail::combine_backward_kernel<T>>({pairs, buffer, detail::weight_rows_of(weight), grad_y, grad_buffer,
                                                         grads, split.begin(r), split.end(r), streaming});
      } else {
        detail::zero_padding_rows(pairs, grad_buffer, experts.begin(r - split.count), experts.end(r - split.count),
                                  streaming);
      }
    });
  }

  /// dispatch's backward over token ranges: grad_x[t] = sum of t's kept rows of grad_buffer, in choice order.
  template <class T>
  void dispatch_backward(const pair_layout& pairs, const matrix_view<const T>& grad_buffer, const matrix_view<T>& grad_x,
                         cpu_stream = {}) const {
    constexpr const char* fn = "locmoe::cpu_backend::dispatch_backward";
    detail::check_view<construction_policy>(fn, "grad_x", grad_x, pairs.tokens, grad_x.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "grad_buffer", grad_buffer, grad_buffer.rows, grad_x.cols,
                                       "must have d columns, as grad_x");
    check_buffer_rows(fn, "grad_buffer", grad_buffer.rows, pairs);
    const bool streaming = detail::use_streaming_stores(pairs.tokens * grad_x.cols * sizeof(T));
    const range_split split = ranges(pairs.tokens);
    pool_.run(split.count, [&](std::size_t r) {
      detail::run<detail::combine_kernel<T>>(
          {pairs, grad_buffer, detail::weight_rows{}, grad_x, split.begin(r), split.end(r), streaming});
    });
  }

 private:
  /// `count` contiguous ranges of [0, items), about equal, each at least grain items (one when items is small).
  struct range_split {
    std::size_t items = 0, count = 1;
    std::size_t begin(std::size_t r) const noexcept { return items * r / count; }
    std::size_t end(std::size_t r) const noexcept { return items * (r + 1) / count; }
  };
  range_split ranges(std::size_t items) const noexcept {
    const std::size_t by_grain = std::max<std::size_t>(1, items / grain_);
    return {items, std::min(by_grain, 4 * threads())};  // a few ranges per thread: uneven ranges balance
  }

  /// Ranges of the experts whose padding rows are zeroed (none without kept counts).
  range_split expert_ranges(const pair_layout& pairs) const noexcept {
    if (!pairs.kept_per_expert || pairs.experts == 0) return {0, 0};
    return {pairs.experts, std::min(pairs.experts, threads())};
  }

  /// The buffer holds the rows of every expert a kept pair names, and of all n experts when their kept counts
  /// are given (padding is written); O(T k).
  static void check_buffer_rows(const char* fn, const char* argument, std::size_t rows, const pair_layout& pairs) {
    std::size_t needed = pairs.kept_per_expert ? pairs.rows() : 0;
    for (std::size_t p = 0; p < pairs.tokens * pairs.top_k; ++p) {
      if (pairs.kept(p)) needed = std::max(needed, pairs.end_of(static_cast<std::size_t>(pairs.expert[p])));
    }
    if (rows < needed) {
      detail::raise<construction_policy>(errc::domain, fn, argument, rows,
                                    "must hold every expert's rows (n C, or the grouped layout's total)", 0);
    }
  }

  template <class Fn>
  std::size_t sum_over_ranges(std::size_t items, Fn&& fn) const {
    const range_split split = ranges(items);
    std::atomic<std::size_t> sum{0};  // integer sums: the order does not matter
    pool_.run(split.count, [&](std::size_t r) { sum += fn(token_range{split.begin(r), split.end(r)}); });
    return sum.load();
  }

  void check_slot_problem(const char* fn, const slot_problem& p, std::size_t workspace_bytes) const {
    detail::check_slot_shapes(fn, p, workspace_bytes, slot_workspace_size(p.indices.rows, p.experts));
    if (p.indices_in_range) return;
    for (std::size_t t = 0; t < p.indices.rows; ++t) {
      for (std::size_t j = 0; j < p.indices.cols; ++j) {
        const expert_index e = p.indices(t, j);
        if (e < no_expert || (e >= 0 && static_cast<std::size_t>(e) >= p.experts)) detail::raise_bad_index(fn, t, j, e);
      }
    }
  }

  thread_pool& pool_;
  std::size_t grain_;
};

}  // namespace locmoe
