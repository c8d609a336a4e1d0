// locmoe/dispatch.hpp - from an assignment to the exchange: who sends which rows to whom, and the CPU
// dispatch (gather into expert buffers) and combine (weighted scatter-add back to the tokens).
//
// Input: the kept choices of capacity_assigner (expert[T x k], slot[T x k], -1 where dropped), the topology,
// and each token's source rank (token_rank, or contiguous blocks as in assign.hpp).
// Expert buffers: expert e's kept rows occupy rows [e C, e C + C) of a [n C x d] buffer, row e C + slot.
// The plan holds
//   - send_tokens[src][dst]: kept choices whose token lives on rank src and whose expert on rank dst
//     (row-major [R x R]), and the same in bytes for a token of `token_bytes`;
//   - intra_rank, intra_node and inter_node totals (tokens): the traffic that stays on the device, crosses
//     the intra-node links, and crosses the inter-node network;
//   - order: every kept (token, choice) pair as t k + j, sorted by (source rank, destination rank, expert,
//     slot): the packing order of each source rank's send buffer for an All-to-All (one contiguous range per
//     destination, send_offset[src R + dst] to send_offset[src R + dst + 1]), expert-major inside a range, and so
//     also the receive order of each expert.
// dispatch(x -> buffer) copies row x[t] to buffer[e C + slot] for each kept pair (rows of unused slots are
// left untouched); combine(buffer -> y) sets y[t] = sum_j weight[t][j] buffer[e_tj C + slot_tj] over t's kept
// choices (0 for a token with none), summing in choice order: deterministic.
// Preconditions (checked; errors name the argument): shapes agree; experts in [-1, n), slots in [-1, C) and
// -1 together; no two pairs on one (expert, slot); token ranks in [0, R); token_bytes * counts fit int64.
// Cost: building O(T k + n C + R^2) time and memory (a counting sort); dispatch and combine one pass over the
// rows they read and write. Speed (docs/benchmarks.md#dispatch-and-combine): the rows read are scattered, so the
// hardware prefetcher starts over at each one; combine, and dispatch when it streams, prefetch 4 KiB ahead, on
// into the next row. A call that writes at least LOCMOE_STREAMING_STORE_BYTES (default 32 MiB, more than a
// last-level cache keeps) writes with x86 non-temporal stores, which skip reading each destination line first,
// as glibc's memcpy does for large copies; a smaller call writes plainly and leaves its output in cache. No path
// changes a value: combine does the same operations in the same order on all of them.
// Example: docs/api.md#dispatch-plans.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__SSE2__) || defined(_M_X64) || (defined(_M_IX86_FP) && _M_IX86_FP >= 2)
#  include <emmintrin.h>
#  define LOCMOE_DETAIL_SSE2 1
#else
#  define LOCMOE_DETAIL_SSE2 0
#endif

// Bytes one dispatch or combine call writes from which it writes them with non-temporal stores (x86 only).
#ifndef LOCMOE_STREAMING_STORE_BYTES
#  define LOCMOE_STREAMING_STORE_BYTES (std::size_t{32} << 20)
#endif

namespace locmoe {

struct dispatch_plan {
  std::size_t ranks = 0, experts = 0, capacity = 0, top_k = 0, tokens = 0;
  std::vector<std::int64_t> send_tokens;  ///< [R x R], source-major
  std::vector<std::int64_t> send_bytes;   ///< [R x R], send_tokens * token_bytes
  std::int64_t intra_rank = 0, intra_node = 0, inter_node = 0;  ///< kept choices by where they travel
  std::vector<std::int64_t> order;        ///< kept pairs t k + j, by (source rank, destination rank, expert, slot)
  std::vector<std::int64_t> send_offset;  ///< [R x R + 1]: src -> dst pairs are order[send_offset[src R + dst]]
                                          ///< up to order[send_offset[src R + dst + 1]], exclusive
  std::vector<expert_index> expert;       ///< [T x k] copy of the assignment's experts (-1: dropped)
  std::vector<slot_index> slot;           ///< [T x k] copy of its slots

  std::int64_t sent(std::size_t source, std::size_t destination) const { return send_tokens.at(source * ranks + destination); }
  /// Rows of the [n C x d] expert buffer.
  std::size_t buffer_rows() const noexcept { return experts * capacity; }
};

/// Builds the plan of an assignment (see the header comment); throws locmoe::error on bad arguments.
inline dispatch_plan build_dispatch_plan(const matrix_view<const expert_index>& expert,
                                         const matrix_view<const slot_index>& slot, std::int64_t capacity,
                                         const topology& topo, const std::int32_t* token_rank = nullptr,
                                         std::int64_t token_bytes = 0) {
  constexpr const char* fn = "locmoe::build_dispatch_plan";
  using P = throw_on_error;
  const std::size_t tokens = expert.rows, k = expert.cols, n = topo.experts(), ranks = topo.ranks();
  if (k < 1) detail::raise<P>(errc::domain, fn, "expert", detail::shape_text(tokens, k), "must have k >= 1 columns", 0);
  detail::check_view<P>(fn, "expert", expert, tokens, k, "");
  detail::check_view<P>(fn, "slot", slot, tokens, k, "must have as many columns as expert (k)");
  if (capacity < 0 || capacity > std::numeric_limits<slot_index>::max()) {
    detail::raise<P>(errc::domain, fn, "capacity", capacity, "must satisfy 0 <= C < 2^31", 0);
  }
  if (token_bytes < 0) detail::raise<P>(errc::domain, fn, "token_bytes", token_bytes, "must be >= 0", 0);
  if (tokens > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) / k) {
    detail::raise<P>(errc::overflow, fn, "expert", detail::shape_text(tokens, k), "T k must be < 2^31", 0);
  }
  dispatch_plan plan;
  plan.ranks = ranks;
  plan.experts = n;
  plan.capacity = static_cast<std::size_t>(capacity);
  plan.top_k = k;
  plan.tokens = tokens;
  plan.send_tokens.assign(ranks * ranks, 0);
  plan.expert.resize(tokens * k);
  plan.slot.resize(tokens * k);
  detail::check_token_ranks<P>(fn, token_rank, tokens, ranks);
  const detail::rank_map source{token_rank, ranks, tokens};
  const std::vector<std::int32_t>& rank_of_expert = topo.rank_of_expert_map();
  const std::vector<std::int32_t>& node_of_rank = topo.node_of_rank_map();
  // pair_at[e C + s]: the kept pair t k + j on (expert e, slot s), -1 while free (T k < 2^31, checked above).
  std::vector<std::int32_t> pair_at(n * plan.capacity, -1);
  for (std::size_t t = 0; t < tokens; ++t) {
    const std::size_t src = source.rank(t);
    for (std::size_t j = 0; j < k; ++j) {
      const expert_index e = expert(t, j);
      const slot_index s = slot(t, j);
      plan.expert[t * k + j] = e;
      plan.slot[t * k + j] = s;
      if (e == no_expert && s == -1) continue;
      const auto where = [&] { return "(" + std::to_string(t) + ", " + std::to_string(j) + ")"; };
      if (e < 0 || static_cast<std::size_t>(e) >= n || s < 0 || static_cast<std::size_t>(s) >= plan.capacity) {
        detail::raise<P>(errc::domain, fn, "expert/slot", where() + " = " + std::to_string(e) + "/" + std::to_string(s),
                         "a kept choice needs an expert in [0, n) and a slot in [0, C); a dropped one -1/-1", 0);
      }
      std::int32_t& pair = pair_at[static_cast<std::size_t>(e) * plan.capacity + static_cast<std::size_t>(s)];
      if (pair >= 0) {
        detail::raise<P>(errc::domain, fn, "slot", where() + " = " + std::to_string(s),
                         "two choices share one (expert, slot)", 0);
      }
      pair = static_cast<std::int32_t>(t * k + j);
      const auto dst = static_cast<std::size_t>(rank_of_expert[static_cast<std::size_t>(e)]);
      ++plan.send_tokens[src * ranks + dst];
      if (dst == src) {
        ++plan.intra_rank;
      } else if (node_of_rank[dst] == node_of_rank[src]) {
        ++plan.intra_node;
      } else {
        ++plan.inter_node;
      }
    }
  }
  // Order by (source rank, destination rank, expert, slot): buffer rows e C + s ascending are (expert, slot)
  // ascending, so one walk over the rows, each pair appended to its (source, destination) range, sorts them (a
  // counting sort). send_offset[src R + dst] is where that range starts.
  plan.send_offset.assign(ranks * ranks + 1, 0);
  for (std::size_t i = 0; i < ranks * ranks; ++i) plan.send_offset[i + 1] = plan.send_offset[i] + plan.send_tokens[i];
  std::vector<std::int64_t> next(plan.send_offset.begin(), plan.send_offset.end() - 1);  // next free place
  plan.order.resize(static_cast<std::size_t>(plan.send_offset.back()));
  for (std::size_t row = 0; row < pair_at.size(); ++row) {
    const std::int32_t pair = pair_at[row];
    if (pair < 0) continue;
    const std::size_t src = source.rank(static_cast<std::size_t>(pair) / k);
    const auto dst = static_cast<std::size_t>(rank_of_expert[row / plan.capacity]);
    plan.order[static_cast<std::size_t>(next[src * ranks + dst]++)] = pair;
  }
  plan.send_bytes.resize(plan.send_tokens.size());
  for (std::size_t i = 0; i < plan.send_tokens.size(); ++i) {
    if (token_bytes > 0 && plan.send_tokens[i] > std::numeric_limits<std::int64_t>::max() / token_bytes) {
      detail::raise<P>(errc::overflow, fn, "token_bytes", token_bytes, "bytes sent must fit an int64", 0);
    }
    plan.send_bytes[i] = plan.send_tokens[i] * token_bytes;
  }
  return plan;
}

namespace detail {

template <class T>
void check_rows(const char* fn, const char* argument, const matrix_view<T>& v, std::size_t rows, std::size_t d) {
  check_view<throw_on_error>(fn, argument, v, rows, d, "must have d columns, as the other operand");
}

/// Where the pairs p = t k + j of an assignment go: expert and slot arrays [T x k], C. What the kernels below
/// read, from a plan or straight from an assignment (the backends).
struct pair_layout {
  const expert_index* expert = nullptr;
  const slot_index* slot = nullptr;
  std::size_t tokens = 0, top_k = 1, capacity = 0;

  static pair_layout of(const dispatch_plan& plan) noexcept {
    return {plan.expert.data(), plan.slot.data(), plan.tokens, plan.top_k, plan.capacity};
  }
  bool kept(std::size_t pair) const noexcept { return expert[pair] != no_expert; }
  /// The expert-buffer row e C + slot of the kept pair.
  std::size_t row(std::size_t pair) const noexcept {
    return static_cast<std::size_t>(expert[pair]) * capacity + static_cast<std::size_t>(slot[pair]);
  }
};

/// How far ahead of the element being read the rows are prefetched: the best of 1-16 KiB measured.
inline constexpr std::size_t prefetch_bytes = 4096;

inline void prefetch(const void* p) noexcept {
#if LOCMOE_DETAIL_SSE2
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#elif defined(__GNUC__)
  __builtin_prefetch(p);
#else
  static_cast<void>(p);
#endif
}

/// Prefetches the element `offset + ahead` of `row` [size], or past its end the same distance into `next` (null:
/// nothing); element type T, any size.
template <class T>
void prefetch_ahead(const T* row, const T* next, std::size_t offset, std::size_t ahead, std::size_t size) noexcept {
  const std::size_t target = offset + ahead;
  if (target < size) {
    prefetch(row + target);
  } else if (next && target - size < size) {
    prefetch(next + (target - size));
  }
}

/// Whether a call that writes `bytes` writes them with non-temporal stores.
inline bool use_streaming_stores(std::size_t bytes) noexcept {
  return LOCMOE_DETAIL_SSE2 && bytes >= LOCMOE_STREAMING_STORE_BYTES;
}

/// Stores the 64 bytes at `from` to `to` (16-byte aligned): non-temporal where Streaming, else plainly.
template <bool Streaming>
void store_64(void* to, const void* from) noexcept {
#if LOCMOE_DETAIL_SSE2
  if constexpr (Streaming) {
    const auto* src = static_cast<const __m128i*>(from);
    auto* dst = static_cast<__m128i*>(to);
    const __m128i v0 = _mm_loadu_si128(src), v1 = _mm_loadu_si128(src + 1);
    const __m128i v2 = _mm_loadu_si128(src + 2), v3 = _mm_loadu_si128(src + 3);
    _mm_stream_si128(dst, v0);
    _mm_stream_si128(dst + 1, v1);
    _mm_stream_si128(dst + 2, v2);
    _mm_stream_si128(dst + 3, v3);
    return;
  }
#endif
  std::memcpy(to, from, 64);
}

/// Orders the non-temporal stores before whatever the caller does next (they are weakly ordered).
inline void streaming_fence() noexcept {
#if LOCMOE_DETAIL_SSE2
  _mm_sfence();
#endif
}

/// Copies one row of `bytes` with non-temporal stores, prefetching ahead through it and into `next`.
inline void copy_row_streaming(const unsigned char* from, std::size_t bytes, unsigned char* to,
                               const unsigned char* next) noexcept {
  if (bytes == 0) return;
  std::size_t c = std::min(bytes, (16 - reinterpret_cast<std::uintptr_t>(to) % 16) % 16);  // up to 16-byte alignment
  std::memcpy(to, from, c);
  for (; c + 64 <= bytes; c += 64) {
    prefetch_ahead(from, next, c, prefetch_bytes, bytes);
    store_64<true>(to + c, from + c);
  }
  std::memcpy(to + c, from + c, bytes - c);
}

/// The first two kept choices of a token: rows (null: none) and weights, and the choice after the second.
template <class T>
struct first_kept {
  const T* a = nullptr;
  const T* b = nullptr;
  T wa = 0, wb = 0;
  std::size_t rest = 0;
};

template <class T, class W>
first_kept<T> first_two_kept(const pair_layout& pairs, const matrix_view<const T>& buffer,
                             const matrix_view<const W>& weight, std::size_t t) {
  const std::size_t k = pairs.top_k;
  first_kept<T> kept;
  for (std::size_t j = 0; j < k && !kept.b; ++j) {
    if (!pairs.kept(t * k + j)) continue;
    const T* row = buffer.row(pairs.row(t * k + j));
    (kept.a ? kept.b : kept.a) = row;
    (kept.b ? kept.wb : kept.wa) = static_cast<T>(weight(t, j));
    kept.rest = j + 1;
  }
  return kept;
}

/// out[c] = value(c) for c in [0, d), in 64-byte chunks from the first 16-byte aligned element (non-temporal
/// where Streaming), prefetching the rows of `now` and then of `next` ahead.
template <bool Streaming, class T, class Value>
void write_row(T* out, std::size_t d, const first_kept<T>& now, const first_kept<T>& next, const Value& value) {
  constexpr std::size_t chunk = 64 / sizeof(T), ahead = prefetch_bytes / sizeof(T);
  std::size_t c = 0;
  for (; c < d && reinterpret_cast<std::uintptr_t>(out + c) % 16 != 0; ++c) out[c] = value(c);
  for (; c + chunk <= d; c += chunk) {
    if (now.a) prefetch_ahead(now.a, next.a, c, ahead, d);
    if (now.b) prefetch_ahead(now.b, next.b, c, ahead, d);
    alignas(16) T values[chunk];
    for (std::size_t i = 0; i < chunk; ++i) values[i] = value(c + i);
    store_64<Streaming>(out + c, values);
  }
  for (; c < d; ++c) out[c] = value(c);
}

/// out = token t's weighted sum of its kept rows in choice order, ((0 + w_0 r_0) + w_1 r_1) + ...: the same
/// operations as zeroing out and adding each row, with the first two rows in one pass. "T(0) +" is not a
/// no-op: the sum starts at +0, and +0 + (-0) is +0, so out never holds a -0 that the sum does not.
template <bool Streaming, class T, class W>
void combine_token(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                   std::size_t t, const first_kept<T>& now, const first_kept<T>& next, T* out) {
  const std::size_t k = pairs.top_k, d = buffer.cols;
  const T* a = now.a;
  const T* b = now.b;
  const T wa = now.wa, wb = now.wb;
  if (!a) {
    write_row<Streaming>(out, d, now, next, [](std::size_t) { return T(0); });
  } else if (!b) {
    write_row<Streaming>(out, d, now, next, [a, wa](std::size_t c) { return T(0) + wa * a[c]; });
  } else {
    const auto two = [a, b, wa, wb](std::size_t c) {
      T sum = T(0) + wa * a[c];
      sum += wb * b[c];
      return sum;
    };
    if (now.rest == k) {
      write_row<Streaming>(out, d, now, next, two);
      return;
    }
    write_row<false>(out, d, now, next, two);  // more rows follow: out is read back, keep it in cache
    for (std::size_t j = now.rest; j < k; ++j) {
      if (!pairs.kept(t * k + j)) continue;
      const T* row = buffer.row(pairs.row(t * k + j));
      const T w = static_cast<T>(weight(t, j));
      for (std::size_t c = 0; c < d; ++c) out[c] += w * row[c];
    }
  }
}

/// dispatch's copies of the kept pairs order[i] for i in [begin, end) (order null: the pairs p in [begin, end),
/// dropped ones skipped), with non-temporal stores or without (the tests run both).
template <class T>
void dispatch_rows(const pair_layout& pairs, const std::int64_t* order, std::size_t begin, std::size_t end,
                   const matrix_view<const T>& x, const matrix_view<T>& buffer, bool streaming) {
  const std::size_t d = x.cols, k = pairs.top_k;
  const auto pair = [&](std::size_t i) { return order ? static_cast<std::size_t>(order[i]) : i; };
  const auto next_kept = [&](std::size_t i) {  // the first index after i whose pair is kept, or end
    for (++i; i < end && !pairs.kept(pair(i)); ++i) {}
    return i;
  };
  // In plan order (expert-major in each source -> destination range), the buffer is written front to back
  // when experts are placed in blocks.
  for (std::size_t i = begin < end && pairs.kept(pair(begin)) ? begin : next_kept(begin); i < end;) {
    const std::size_t after = next_kept(i);
    const T* from = x.row(pair(i) / k);
    T* to = buffer.row(pairs.row(pair(i)));
    if constexpr (std::is_trivially_copyable_v<T>) {
      if (streaming) {
        const T* next = after < end ? x.row(pair(after) / k) : nullptr;
        copy_row_streaming(reinterpret_cast<const unsigned char*>(from), d * sizeof(T),
                           reinterpret_cast<unsigned char*>(to), reinterpret_cast<const unsigned char*>(next));
      } else if (d > 0) {
        std::memcpy(to, from, d * sizeof(T));  // a software prefetch did not help memcpy here
      }
    } else {
      std::copy(from, from + d, to);
    }
    i = after;
  }
  if constexpr (std::is_trivially_copyable_v<T>) {
    if (streaming) streaming_fence();
  }
}

/// combine's sums for the tokens [begin, end), with non-temporal stores or without (the tests run both).
/// 16-bit rows (bf16, fp16): each element summed in float, ((0 + w0 r0) + w1 r1) + ..., then rounded once to T
/// (round to nearest even); plain stores. The CUDA backend does the same operations.
template <class T, class W>
void combine_rows_16bit(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                        const matrix_view<T>& y, std::size_t begin, std::size_t end) {
  const std::size_t k = pairs.top_k, d = y.cols;
  for (std::size_t t = begin; t < end; ++t) {
    T* out = y.row(t);
    for (std::size_t c = 0; c < d; ++c) {
      float sum = 0.0f;
      for (std::size_t j = 0; j < k; ++j) {
        if (!pairs.kept(t * k + j)) continue;
        sum += static_cast<float>(weight(t, j)) * static_cast<float>(buffer.row(pairs.row(t * k + j))[c]);
      }
      out[c] = T(sum);
    }
  }
}

template <class T, class W>
void combine_rows(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                  const matrix_view<T>& y, std::size_t begin, std::size_t end, bool streaming) {
  if constexpr (!std::is_floating_point_v<T>) {
    combine_rows_16bit(pairs, buffer, weight, y, begin, end);
    static_cast<void>(streaming);
  } else {
    first_kept<T> next = begin < end ? first_two_kept(pairs, buffer, weight, begin) : first_kept<T>{};
    for (std::size_t t = begin; t < end; ++t) {
      const first_kept<T> now = next;
      next = t + 1 < end ? first_two_kept(pairs, buffer, weight, t + 1) : first_kept<T>{};
      if (streaming) {
        combine_token<true>(pairs, buffer, weight, t, now, next, y.row(t));
      } else {
        combine_token<false>(pairs, buffer, weight, t, now, next, y.row(t));
      }
    }
    if (streaming) streaming_fence();
  }
}

}  // namespace detail

/// Gathers x [T x d] into the expert buffer [n C x d]: buffer[e C + slot] = x[t] for every kept pair.
template <class T>
void dispatch(const dispatch_plan& plan, const matrix_view<const T>& x, const matrix_view<T>& buffer) {
  constexpr const char* fn = "locmoe::dispatch";
  detail::check_rows(fn, "x", x, plan.tokens, x.cols);
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), x.cols);
  detail::dispatch_rows(detail::pair_layout::of(plan), plan.order.data(), 0, plan.order.size(), x, buffer,
                        detail::use_streaming_stores(plan.order.size() * x.cols * sizeof(T)));
}

/// y[t] = sum over t's kept choices j, in order, of weight[t][j] * buffer[e_tj C + slot_tj]; 0 without any.
/// bf16/fp16 rows are summed in float and rounded once.
template <class T, class W>
void combine(const dispatch_plan& plan, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
             const matrix_view<T>& y) {
  static_assert(std::is_floating_point_v<T> || std::is_same_v<T, bf16> || std::is_same_v<T, fp16>,
                "combine: rows are float, double, bf16 or fp16 (16-bit rows are summed in float)");
  constexpr const char* fn = "locmoe::combine";
  const std::size_t d = y.cols, k = plan.top_k;
  detail::check_rows(fn, "buffer", buffer, plan.buffer_rows(), d);
  detail::check_view<throw_on_error>(fn, "weight", weight, plan.tokens, k, "must be [T x k]");
  detail::check_rows(fn, "y", y, plan.tokens, d);
  detail::combine_rows(detail::pair_layout::of(plan), buffer, weight, y, 0, plan.tokens,
                       detail::use_streaming_stores(plan.tokens * d * sizeof(T)));
}

}  // namespace locmoe
