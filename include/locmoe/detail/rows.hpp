// locmoe/detail/rows.hpp - where an assignment's rows live (pair_layout) and the CPU row kernels every
// dispatch, combine and their backwards run: gathers, weighted scatter-adds, row dot products, padding.
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
  /// The first row of expert e, and the end of its rows.
  std::size_t begin_of(std::size_t e) const noexcept {
    return expert_offset ? static_cast<std::size_t>(expert_offset[e]) : e * capacity;
  }
  std::size_t end_of(std::size_t e) const noexcept {
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

template <class T, class Weights>
first_kept<T> first_two_kept(const pair_layout& pairs, const matrix_view<const T>& buffer, const Weights& weight,
                             std::size_t t) {
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
template <bool Streaming, class T, class Weights>
void combine_token(const pair_layout& pairs, const matrix_view<const T>& buffer, const Weights& weight, std::size_t t,
                   const first_kept<T>& now, const first_kept<T>& next, T* out) {
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

/// Rows of 16-bit values to float and back, in chunks the compiler vectorizes: bf16 by integer shifts and a
/// branch-free round to nearest even (Eigen's conversion, bit for bit, NaN included: 0x7fc0 with the sign);
/// fp16 through Eigen's conversions; float and double as they are.
inline constexpr std::size_t row_chunk = 256;

inline float bf16_bits_to_float(std::uint16_t bits) noexcept {
  const std::uint32_t wide = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &wide, sizeof f);
  return f;
}

inline std::uint16_t float_to_bf16_bits(float f) noexcept {
  std::uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const std::uint32_t nan = ((x >> 16) & 0x8000u) | 0x7fc0u;
  return static_cast<std::uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

template <class T>
void decode_row(const T* in, float* out, std::size_t len) noexcept {
  for (std::size_t c = 0; c < len; ++c) {
    if constexpr (std::is_same_v<T, bf16>) {
      out[c] = bf16_bits_to_float(in[c].value);
    } else {
      out[c] = static_cast<float>(in[c]);
    }
  }
}

template <class T>
void encode_row(const float* in, T* out, std::size_t len) noexcept {
  for (std::size_t c = 0; c < len; ++c) {
    if constexpr (std::is_same_v<T, bf16>) {
      out[c].value = float_to_bf16_bits(in[c]);
    } else {
      out[c] = T(in[c]);
    }
  }
}

/// combine's sums for the tokens [begin, end), with non-temporal stores or without (the tests run both).
/// 16-bit rows (bf16, fp16): each element summed in float, ((0 + w0 r0) + w1 r1) + ..., then rounded once to T
/// (round to nearest even); plain stores. The CUDA backend does the same operations. Chunks of 256 elements
/// keep the float sums in registers and L1 while each kept row is added.
template <class T, class Weights>
void combine_rows_16bit(const pair_layout& pairs, const matrix_view<const T>& buffer, const Weights& weight,
                        const matrix_view<T>& y, std::size_t begin, std::size_t end) {
  constexpr std::size_t chunk = row_chunk, tracked = 8, ahead = prefetch_bytes / sizeof(T), line = 64 / sizeof(T);
  const std::size_t k = pairs.top_k, d = y.cols;
  // The rows of a token's first `tracked` choices (null: dropped), prefetched ahead and on into the next token's.
  const auto rows_of = [&](std::size_t t, const T** rows) {
    for (std::size_t j = 0; j < tracked; ++j)
      rows[j] = t < end && j < k && pairs.kept(t * k + j) ? buffer.row(pairs.row(t * k + j)) : nullptr;
  };
  const T* now[tracked];
  const T* next[tracked];
  rows_of(begin, next);
  for (std::size_t t = begin; t < end; ++t) {
    T* out = y.row(t);
    std::copy(next, next + tracked, now);
    rows_of(t + 1, next);
    for (std::size_t c0 = 0; c0 < d; c0 += chunk) {
      const std::size_t len = std::min(chunk, d - c0);
      for (std::size_t j = 0; j < tracked; ++j)
        for (std::size_t c = 0; now[j] && c < len; c += line) prefetch_ahead(now[j], next[j], c0 + c, ahead, d);
      float sum[chunk], row[chunk];
      bool first = true;  // the first kept row sets sum = 0 + w r: the same as zeroing, then adding
      for (std::size_t j = 0; j < k; ++j) {
        if (!pairs.kept(t * k + j)) continue;
        const float w = static_cast<float>(weight(t, j));
        decode_row(buffer.row(pairs.row(t * k + j)) + c0, row, len);
        if (first) {
          for (std::size_t c = 0; c < len; ++c) sum[c] = 0.0f + w * row[c];
        } else {
          for (std::size_t c = 0; c < len; ++c) sum[c] += w * row[c];
        }
        first = false;
      }
      if (first) {
        for (std::size_t c = 0; c < len; ++c) sum[c] = 0.0f;
      }
      encode_row(sum, out + c0, len);
    }
  }
}

template <class T, class Weights>
void combine_rows(const pair_layout& pairs, const matrix_view<const T>& buffer, const Weights& weight,
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

/// The padding rows of the experts [e_begin, e_end): rows begin_of(e) + kept_e up to end_of(e), set to zero.
template <class T>
void zero_padding_rows(const pair_layout& pairs, const matrix_view<T>& buffer, std::size_t e_begin, std::size_t e_end) {
  if (!pairs.kept_per_expert) return;
  for (std::size_t e = e_begin; e < e_end; ++e) {
    for (std::size_t r = pairs.begin_of(e) + static_cast<std::size_t>(pairs.kept_per_expert[e]); r < pairs.end_of(e); ++r) {
      std::fill(buffer.row(r), buffer.row(r) + buffer.cols, T(0));
    }
  }
}

/// The arithmetic of 16-bit rows: float for bf16/fp16, T itself for float/double.
template <class T>
using row_math_t = std::conditional_t<std::is_floating_point_v<T>, T, float>;

/// One pair of combine's backward: out[c] = w dy[c] (16-bit rows: the float product rounded once), and the dot
/// dy . row in A over 16 partial sums (element c into sum c mod 16) combined by a fixed pairwise tree: one order
/// whatever the caller's thread; one pass over the three rows, in chunks (out may be null: the dot alone); `row`
/// is prefetched ahead and then `next` (the next pair's row, or null).
template <class A, class T>
A scale_and_dot(const T* dy, const T* row, std::size_t d, A w, T* out, const T* next) noexcept {
  constexpr std::size_t lanes = 16, chunk = row_chunk, ahead = prefetch_bytes / sizeof(T), line = 64 / sizeof(T);
  A part[lanes] = {};
  for (std::size_t c0 = 0; c0 < d; c0 += chunk) {
    const std::size_t len = std::min(chunk, d - c0);
    for (std::size_t c = 0; c < len; c += line) prefetch_ahead(row, next, c0 + c, ahead, d);
    if constexpr (std::is_floating_point_v<T>) {
      const T* a = dy + c0;
      const T* b = row + c0;
      std::size_t c = 0;
      for (; c + lanes <= len; c += lanes)
        for (std::size_t i = 0; i < lanes; ++i) part[i] += a[c + i] * b[c + i];
      for (; c < len; ++c) part[(c0 + c) % lanes] += a[c] * b[c];
      if (out)
        for (c = 0; c < len; ++c) out[c0 + c] = w * a[c];
    } else {
      float a[chunk], b[chunk], scaled[chunk];
      decode_row(dy + c0, a, len);
      decode_row(row + c0, b, len);
      std::size_t c = 0;
      for (; c + lanes <= len; c += lanes)
        for (std::size_t i = 0; i < lanes; ++i) part[i] += a[c + i] * b[c + i];
      for (; c < len; ++c) part[(c0 + c) % lanes] += a[c] * b[c];
      if (out) {
        for (c = 0; c < len; ++c) scaled[c] = w * a[c];
        encode_row(scaled, out + c0, len);
      }
    }
  }
  for (std::size_t width = lanes / 2; width > 0; width /= 2)
    for (std::size_t i = 0; i < width; ++i) part[i] += part[i + width];
  return part[0];
}

/// combine's backward for the tokens [begin, end): grad_buffer[row_tj] = w_tj grad_y[t] (16-bit rows: the float
/// product rounded once) and grad_weight(t, j) = grad_y[t] . buffer[row_tj] (scale_and_dot; 0 for a dropped pair).
/// Either output may be absent. Padding rows are zero_padding_rows' job.
template <class T, class W>
void combine_backward_rows(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                           const matrix_view<const T>& grad_y, const matrix_view<T>& grad_buffer,
                           const matrix_view<W>& grad_weight, std::size_t begin, std::size_t end) {
  using A = row_math_t<T>;
  const std::size_t k = pairs.top_k, d = grad_y.cols, last = end * k;
  const auto next_kept = [&](std::size_t p) {  // the first kept pair after p in the range, or `last`
    for (++p; p < last && !pairs.kept(p); ++p) {}
    return p;
  };
  for (std::size_t t = begin; t < end; ++t) {
    const T* dy = grad_y.row(t);
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t p = t * k + j;
      if (!pairs.kept(p)) {
        if (grad_weight.present()) grad_weight(t, j) = W(0);
        continue;
      }
      const std::size_t r = pairs.row(p), after = next_kept(p);
      const A dot = scale_and_dot<A>(dy, buffer.row(r), d, static_cast<A>(weight(t, j)),
                                     grad_buffer.present() ? grad_buffer.row(r) : nullptr,
                                     after < last ? buffer.row(pairs.row(after)) : nullptr);
      if (grad_weight.present()) grad_weight(t, j) = static_cast<W>(dot);
    }
  }
}

/// The weights of dispatch's backward, a combine with every weight 1 (1 r = r exactly: the same sums).
struct unit_weights {
  float operator()(std::size_t, std::size_t) const noexcept { return 1.0f; }
};

}  // namespace detail
}  // namespace locmoe
