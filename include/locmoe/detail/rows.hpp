// locmoe/detail/rows.hpp - where an assignment's rows live (pair_layout) and dispatch's CPU row copies and
// padding; combine and the backwards are SIMD kernels in row_kernels.hpp.
// Nobody includes this directly: dispatch.hpp (plans, the public calls) and the backends do.
//
// A pair p = t k + j is token t's choice j. In the capacity layout expert e's rows are [e C, e C + C) and a kept
// pair sits at e C + slot; in the grouped layout (MegaBlocks, Megatron-Core's dropless path) they are
// [offset_e, offset_e+1) and it sits at offset_e + slot. Slots of expert e are 0 .. kept_e - 1 (every locmoe
// assignment numbers them so); the rows after them, up to the end of e's rows, are padding, which the forward
// writes as zeros (an expert's weight gradient reads every row of its buffer: NaN x 0 is NaN).
// Every kernel is deterministic and thread-count independent: each output element is produced by one task, in
// a fixed order of operations, with no atomics.
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/views.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

/// Where the pairs p = t k + j of an assignment go (see the header comment): expert and slot arrays [T x k]
/// (dense, -1/-1 for a dropped pair), and the layout of the expert buffer. What the backends' dispatch and
/// combine read. On a device backend the pointers are device pointers.
struct pair_layout {
  const expert_index* expert = nullptr;
  const slot_index* slot = nullptr;
  std::size_t tokens = 0, top_k = 1, capacity = 0;  ///< capacity: C of the capacity layout
  /// [n] kept rows per expert, with `experts` = n: the forward writes the padding rows as zeros. Null: padding
  /// rows are not written (the caller fills them).
  const std::int64_t* kept_per_expert = nullptr;
  std::size_t experts = 0;
  /// [n + 1] non-decreasing: the grouped layout, expert e's rows [offset_e, offset_e+1). Null: capacity layout.
  const std::int64_t* expert_offset = nullptr;

  bool kept(std::size_t pair) const noexcept { return expert[pair] != no_expert; }
  /// The first row of expert e, and the end of its rows (host and device code: the CUDA kernels use them too).
  LOCMOE_HOST_DEVICE std::size_t begin_of(std::size_t e) const noexcept {
    return expert_offset ? static_cast<std::size_t>(expert_offset[e]) : e * capacity;
  }
  LOCMOE_HOST_DEVICE std::size_t end_of(std::size_t e) const noexcept {
    return expert_offset ? static_cast<std::size_t>(expert_offset[e + 1]) : (e + 1) * capacity;
  }
  /// The expert-buffer row of the kept pair.
  std::size_t row(std::size_t pair) const noexcept {
    return begin_of(static_cast<std::size_t>(expert[pair])) + static_cast<std::size_t>(slot[pair]);
  }
  /// Rows of the whole buffer (n C, or offset_n), given `experts`.
  std::size_t rows() const noexcept { return experts == 0 ? 0 : end_of(experts - 1); }
};

namespace detail {

/// How far ahead of the element being read dispatch's copies prefetch their rows (the best of 1-16 KiB measured),
/// and the row kernels (row_kernels.hpp) theirs (best of 1, 4 and 16 KiB, and none, measured on combine).
inline constexpr std::size_t prefetch_bytes = 4096;
inline constexpr std::size_t row_prefetch_bytes = 1024;

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
  // In pair order (dispatch and the CPU backend: order null) a token's k copies are made one after another, so x
  // is read from memory once (measured faster than plan order at k = 2: docs/benchmarks.md).
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

/// Elements per chunk of the row kernels (row_kernels.hpp): a token's partial sums stay in registers and L1.
inline constexpr std::size_t row_chunk = 256;

/// Sets a row of d elements to zero (every element type here is zero in all bits), with non-temporal stores where
/// Streaming (then the caller fences), else plainly.
template <class T>
void zero_row(T* row, std::size_t d, bool streaming) noexcept {
  static_assert(std::is_trivially_copyable_v<T>, "rows are trivially copyable");
  auto* to = reinterpret_cast<unsigned char*>(row);
  const std::size_t bytes = d * sizeof(T);
  if (!streaming) {
    std::memset(to, 0, bytes);
    return;
  }
  alignas(16) static constexpr unsigned char zeros[64] = {};
  std::size_t c = std::min(bytes, (16 - reinterpret_cast<std::uintptr_t>(to) % 16) % 16);  // up to 16-byte alignment
  std::memset(to, 0, c);
  for (; c + 64 <= bytes; c += 64) store_64<true>(to + c, zeros);
  std::memset(to + c, 0, bytes - c);
}

/// The padding rows of the experts [e_begin, e_end): rows begin_of(e) + kept_e up to end_of(e), set to zero.
template <class T>
void zero_padding_rows(const pair_layout& pairs, const matrix_view<T>& buffer, std::size_t e_begin, std::size_t e_end,
                       bool streaming) {
  if (!pairs.kept_per_expert) return;
  for (std::size_t e = e_begin; e < e_end; ++e) {
    for (std::size_t r = pairs.begin_of(e) + static_cast<std::size_t>(pairs.kept_per_expert[e]); r < pairs.end_of(e); ++r) {
      zero_row(buffer.row(r), buffer.cols, streaming);
    }
  }
  if (streaming) streaming_fence();
}

}  // namespace detail
}  // namespace locmoe
