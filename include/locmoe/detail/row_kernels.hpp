// locmoe/detail/row_kernels.hpp - combine, combine's backward and dispatch's backward as SIMD kernels (functors
// over an xsimd architecture, compiled and dispatched at run time with the gate's kernels: kernels.hpp). The
// public calls are in dispatch.hpp and backend/cpu.hpp; they validate, then call these.
//
// Arithmetic (the same on every instruction set, bit for bit):
//  * combine: y[t][c] = ((0 + w_0 r_0[c]) + w_1 r_1[c]) + ... over t's kept choices in order, in the accumulation
//    type A (float for bf16/fp16 rows, else the row type), each product and sum rounded (never fused: the
//    generated per-instruction-set files build with -ffp-contract=off), the result rounded once to the row type.
//    dispatch's backward is combine with every weight 1 (1 r = r exactly).
//  * combine's backward: grad_buffer[row] = w dy[c] rounded once; dL/dw = dy . row over `dot_lanes` partial sums
//    (element c into partial c mod dot_lanes, in increasing c), combined by a fixed pairwise tree.
// 16-bit rows go through an integer codec: bf16 decoded by a shift and encoded with round to nearest even
// (NaN: 0x7fc0 with its sign), Eigen's conversion bit for bit; fp16 as Eigen's portable conversion (round to
// nearest even, subnormals exact; NaN encodes as 0x7e00 with its sign).
// Rows are processed in steps of two registers of A (16-bit rows: one register of two halves per 32-bit lane,
// split into the even and the odd elements' floats); a row's last partial step goes through a padded copy.
// Outputs whose row starts 64-byte aligned are written with non-temporal stores when the caller asks.
#pragma once

#include <locmoe/detail/rows.hpp>
#include <locmoe/detail/simd.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

// The codec's steps are inlined into the row loops (a call per step passes registers through memory).
#if defined(__GNUC__)
#  define LOCMOE_DETAIL_STEP inline __attribute__((always_inline))
#  define LOCMOE_DETAIL_STEP_LAMBDA __attribute__((always_inline))
#else
#  define LOCMOE_DETAIL_STEP inline
#  define LOCMOE_DETAIL_STEP_LAMBDA
#endif

#if defined(__x86_64__) || defined(_M_X64)
#  include <immintrin.h>
#  define LOCMOE_DETAIL_X86 1
#else
#  define LOCMOE_DETAIL_X86 0
#endif

namespace locmoe::detail {

/// The row types of the row kernels, and the weight types.
template <class T>
inline constexpr bool is_row_type_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                      std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;
template <class W>
inline constexpr bool is_weight_type_v = std::is_same_v<W, float> || std::is_same_v<W, double>;

/// [T x k] weights, float or double; both null: every weight 1 (dispatch's backward).
struct weight_rows {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  std::size_t stride = 0;
};
inline weight_rows weight_rows_of(const matrix_view<const float>& w) noexcept { return {w.data, nullptr, w.stride}; }
inline weight_rows weight_rows_of(const matrix_view<const double>& w) noexcept { return {nullptr, w.data, w.stride}; }

/// Where dL/dw goes: float or double [T x k], or nowhere (both null).
struct weight_grads {
  float* f32 = nullptr;
  double* f64 = nullptr;
  std::size_t stride = 0;
};
inline weight_grads weight_grads_of(const matrix_view<float>& g) noexcept { return {g.data, nullptr, g.stride}; }
inline weight_grads weight_grads_of(const matrix_view<double>& g) noexcept { return {nullptr, g.data, g.stride}; }

/// combine (and, with unit weights, dispatch's backward) for the tokens [begin, end).
template <class T>
struct combine_kernel {
  struct args_type {
    pair_layout pairs;
    matrix_view<const T> buffer;
    weight_rows weight;
    matrix_view<T> y;
    std::size_t begin = 0, end = 0;
    bool streaming = false;
  };
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

/// combine's backward for the tokens [begin, end): grad_buffer (optional) at kept rows, grad_weight (optional).
template <class T>
struct combine_backward_kernel {
  struct args_type {
    pair_layout pairs;
    matrix_view<const T> buffer;
    weight_rows weight;
    matrix_view<const T> grad_y;
    matrix_view<T> grad_buffer;  // absent: not asked for
    weight_grads grad_weight;    // absent: not asked for
    std::size_t begin = 0, end = 0;
    bool streaming = false;
  };
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

/// 16-bit values to float (`from` -> `to`) and floats to 16-bit values (`values` -> `encoded`), `count` each, with the
/// row kernels' codec (either pair may be null). What the tests check the codec with on every instruction set.
template <class T>
struct convert_kernel {
  struct args_type {
    const T* from = nullptr;
    float* to = nullptr;
    const float* values = nullptr;
    T* encoded = nullptr;
    std::size_t count = 0;
  };
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

namespace simd {

/// +0 or -0 as T, from its bits: no Eigen conversion (a plain inline function that an AVX-512 file could compile
/// with its own instructions, or with F16C where Eigen picks it, and the linker keep for every file).
template <class T, class Arch>
T signed_zero(Arch, bool negative) noexcept {
  if constexpr (is_half_v<T>) {
    const std::uint16_t bits = negative ? 0x8000u : 0u;
    T value;
    std::memcpy(static_cast<void*>(&value), &bits, sizeof bits);
    return value;
  } else {
    return negative ? -T(0) : T(0);
  }
}

/// Stores one register at p: non-temporal (p aligned to the register's width) where Streaming, else plainly.
template <bool Streaming, class V, class Arch>
LOCMOE_DETAIL_STEP void store_register(Arch, V* p, const xsimd::batch<V, Arch>& v) noexcept {
#if LOCMOE_DETAIL_X86
  if constexpr (Streaming) {
    using fbatch = xsimd::batch<float, Arch>;
    auto* to = reinterpret_cast<float*>(p);
    fbatch as_float;
    if constexpr (std::is_same_v<V, float>) {
      as_float = v;
    } else {
      as_float = xsimd::bitwise_cast<fbatch>(v);
    }
    const auto bits = static_cast<typename fbatch::register_type>(as_float);
    if constexpr (Arch::alignment() == 64) {
      _mm512_stream_ps(to, bits);
    } else if constexpr (Arch::alignment() == 32) {
      _mm256_stream_ps(to, bits);
    } else {
      _mm_stream_ps(to, bits);
    }
    return;
  }
#endif
  v.store_unaligned(p);
}

/// Rows of T as A, a step (2 registers' worth of A) at a time. `load` splits a step into two registers and
/// `store` joins them back; `spill` writes a step's two registers into `lanes` in element order.
template <class T, class Arch, class = void>
struct row_codec {  // float and double: the step's first and second register
  using arch = Arch;
  using math = T;
  using batch = xsimd::batch<T, Arch>;
  static constexpr std::size_t width = batch::size, step = 2 * width;
  LOCMOE_DETAIL_STEP static void load(const T* p, batch& first, batch& second) noexcept {
    first = batch::load_unaligned(p);
    second = batch::load_unaligned(p + width);
  }
  template <bool Streaming>
  LOCMOE_DETAIL_STEP static void store(T* p, const batch& first, const batch& second) noexcept {
    store_register<Streaming>(Arch{}, p, first);
    store_register<Streaming>(Arch{}, p + width, second);
  }
  static void spill(const batch& first, const batch& second, T* lanes) noexcept {
    first.store_unaligned(lanes);
    second.store_unaligned(lanes + width);
  }
};

template <class T, class Arch>
struct row_codec<T, Arch, std::enable_if_t<is_half_v<T>>> {  // bf16, fp16: the even elements, the odd ones
  using arch = Arch;
  using math = float;
  using batch = xsimd::batch<float, Arch>;
  using ubatch = xsimd::batch<std::uint32_t, Arch>;
  using ibatch = xsimd::batch<std::int32_t, Arch>;
  static constexpr std::size_t width = batch::size, step = 2 * width;

  LOCMOE_DETAIL_STEP static void load(const T* p, batch& even, batch& odd) noexcept {
    halves_to_float<Arch, T>(ubatch::load_unaligned(reinterpret_cast<const std::uint32_t*>(p)), even, odd);
  }
  template <bool Streaming>
  LOCMOE_DETAIL_STEP static void store(T* p, const batch& even, const batch& odd) noexcept {
    ubatch bits;
    if constexpr (std::is_same_v<T, bf16>) {
      // Round to nearest even at bit 16, the even element's result into the low half and the odd's into the high
      // half; NaN (rare) needs its own pattern: checked once for the step.
      const ubatch x = xsimd::bitwise_cast<ubatch>(even), y = xsimd::bitwise_cast<ubatch>(odd);
      const ubatch bias(0x7fffu), one(1u);
      bits = ((x + bias + ((x >> 16) & one)) >> 16) | ((y + bias + ((y >> 16) & one)) & ubatch(0xffff0000u));
      if (xsimd::any(xsimd::isnan(even) | xsimd::isnan(odd))) bits = encode(even) | (encode(odd) << 16);
    } else {
      bits = encode(even) | (encode(odd) << 16);
    }
    store_register<Streaming>(Arch{}, reinterpret_cast<std::uint32_t*>(p), bits);
  }
  static void spill(const batch& even, const batch& odd, float* lanes) noexcept {
    alignas(64) float e[width], o[width];
    even.store_aligned(e);
    odd.store_aligned(o);
    for (std::size_t i = 0; i < width; ++i) {
      lanes[2 * i] = e[i];
      lanes[2 * i + 1] = o[i];
    }
  }
  /// The 16-bit pattern of each lane rounded to T, in the lane's low half. Compares are signed (every operand
  /// is below 2^31), which SSE2 and AVX2 have.
  LOCMOE_DETAIL_STEP static ubatch encode(const batch& f) noexcept {
    const ubatch x = xsimd::bitwise_cast<ubatch>(f);
    const auto above = [](const ubatch& u, std::int32_t bound) {
      return xsimd::bitwise_cast<ibatch>(u) > ibatch(bound);
    };
    const auto pick = [](const auto& mask, const ubatch& yes, const ubatch& no) {
      return xsimd::bitwise_cast<ubatch>(
          xsimd::select(mask, xsimd::bitwise_cast<ibatch>(yes), xsimd::bitwise_cast<ibatch>(no)));
    };
    if constexpr (std::is_same_v<T, bf16>) {
      const ubatch rounded = (x + ubatch(0x7fffu) + ((x >> 16) & ubatch(1u))) >> 16;
      const ubatch nan = ((x >> 16) & ubatch(0x8000u)) | ubatch(0x7fc0u);
      // An unordered compare finds NaN (xsimd 8.1's != is ordered on AVX: false for NaN); the blend moves bits.
      return xsimd::bitwise_cast<ubatch>(
          xsimd::select(xsimd::isnan(f), xsimd::bitwise_cast<batch>(nan), xsimd::bitwise_cast<batch>(rounded)));
    } else {
      const ubatch sign = x & ubatch(0x80000000u), magnitude = x ^ sign;
      const ubatch special = pick(above(magnitude, 0x7f800000), ubatch(0x7e00u), ubatch(0x7c00u));  // NaN, Inf
      // Below 2^-14 the result is subnormal: adding 0.5f aligns the 10 mantissa bits at the bottom, rounding to
      // nearest even, and subtracting 0.5f's bits leaves them.
      const ubatch subnormal =
          xsimd::bitwise_cast<ubatch>(xsimd::bitwise_cast<batch>(magnitude) + batch(0.5f)) - ubatch(0x3f000000u);
      // Rebias the exponent (15 - 127), round to nearest even at bit 13.
      const ubatch normal = (magnitude + ubatch(0xc8000fffu) + ((magnitude >> 13) & ubatch(1u))) >> 13;
      ubatch bits = pick(above(magnitude, 0x477fffff), special, normal);  // >= 65520: Inf (or NaN)
      bits = pick(above(magnitude, 0x387fffff), bits, subnormal);         // < 2^-14: subnormal or zero
      return bits | (sign >> 16);
    }
  }
};

/// Loads `len` <= step elements of a row as a step: the whole step in place, a shorter one through a copy
/// padded with `pad`. (Plain loops here and below: a std algorithm instantiated in an AVX-512 file could be the
/// copy the linker keeps for every file.)
template <class Codec, class T>
LOCMOE_DETAIL_STEP void load_step(const T* p, std::size_t len, T pad, typename Codec::batch& first, typename Codec::batch& second) noexcept {
  if (len == Codec::step) {
    Codec::load(p, first, second);
    return;
  }
  T padded[Codec::step];
  for (std::size_t i = 0; i < Codec::step; ++i) padded[i] = i < len ? p[i] : pad;
  Codec::load(padded, first, second);
}

/// Stores the first `len` <= step elements of a step (a shorter step through a copy, with plain stores).
template <bool Streaming, class Codec, class T>
LOCMOE_DETAIL_STEP void store_step(T* p, std::size_t len, const typename Codec::batch& first, const typename Codec::batch& second) noexcept {
  if (len == Codec::step) {
    Codec::template store<Streaming>(p, first, second);
    return;
  }
  T padded[Codec::step];
  Codec::template store<false>(padded, first, second);
  for (std::size_t i = 0; i < len; ++i) p[i] = padded[i];
}

}  // namespace simd

template <class T>
template <class Arch>
std::size_t convert_kernel<T>::operator()(Arch arch, const args_type& a) const noexcept {
  using codec = simd::row_codec<T, Arch>;
  using batch = typename codec::batch;
  constexpr std::size_t step = codec::step, width = codec::width;
  for (std::size_t c = 0; a.from && c < a.count; c += step) {
    const std::size_t n = step < a.count - c ? step : a.count - c;
    batch even, odd;
    simd::load_step<codec>(a.from + c, n, simd::signed_zero<T>(arch, false), even, odd);
    float lanes[step];
    codec::spill(even, odd, lanes);
    for (std::size_t i = 0; i < n; ++i) a.to[c + i] = lanes[i];
  }
  for (std::size_t c = 0; a.values && c < a.count; c += step) {
    const std::size_t n = step < a.count - c ? step : a.count - c;
    alignas(64) float even[width], odd[width];
    for (std::size_t i = 0; i < width; ++i) {
      even[i] = 2 * i < n ? a.values[c + 2 * i] : 0.0f;
      odd[i] = 2 * i + 1 < n ? a.values[c + 2 * i + 1] : 0.0f;
    }
    simd::store_step<false, codec>(a.encoded + c, n, batch::load_aligned(even), batch::load_aligned(odd));
  }
  return 0;
}

/// Partial sums of combine_backward's dot products: 128 bytes of A (32 floats, 16 doubles).
template <class A>
inline constexpr std::size_t dot_lanes = 128 / sizeof(A);

namespace simd {
/// Weight (t, j) of `w` as A.
template <class A, class Arch>
A weight_at(Arch, const weight_rows& w, std::size_t t, std::size_t j) noexcept {
  if (w.f32) return static_cast<A>(w.f32[t * w.stride + j]);
  if (w.f64) return static_cast<A>(w.f64[t * w.stride + j]);
  return A(1);
}

/// Rows being summed: `count` of them (Rows when known at compile time, else 0), their weights, and for each the
/// row to prefetch once it runs out (null: none).
template <class T, class A>
struct summed_rows {
  const T* const* rows;
  const A* weights;
  const T* const* next;
  std::size_t count;
};

/// Steps [begin, end) of combine's weighted sum: s = ((s0 + w_0 r_0) + w_1 r_1) + ..., where s0 is zero (First) or
/// the sums a previous group left in `partial`; then rounded to T into out (Last) or kept in `partial`. One loop
/// per combination, so that the constants stay in registers and only the last step is partial.
template <std::size_t Rows, bool Streaming, bool First, bool Last, class Codec, class T, class A>
void weighted_sum(const summed_rows<T, A>& in, std::size_t begin, std::size_t end, std::size_t d,
                  typename Codec::batch* partial, T* out) noexcept {
  using batch = typename Codec::batch;
  constexpr std::size_t step = Codec::step, line = 64 / sizeof(T), every = step < line ? line : step,
                        ahead = row_prefetch_bytes / sizeof(T);
  const std::size_t count = Rows ? Rows : in.count;
  const T zero = signed_zero<T>(typename Codec::arch{}, false);
  const auto run = [&](std::size_t c, std::size_t s, std::size_t len) LOCMOE_DETAIL_STEP_LAMBDA {
    batch first(A(0)), second(A(0));
    if constexpr (!First) {
      first = partial[2 * s];
      second = partial[2 * s + 1];
    }
    for (std::size_t i = 0; i < count; ++i) {
      batch r0, r1;
      load_step<Codec>(in.rows[i] + c, len, zero, r0, r1);
      const batch w(in.weights[i]);
      first = first + w * r0;
      second = second + w * r1;
    }
    if constexpr (Last) {
      store_step<Streaming, Codec>(out + c, len, first, second);
    } else {
      partial[2 * s] = first;
      partial[2 * s + 1] = second;
    }
  };
  // Blocks of whole lines and at least two steps: the prefetches of a block, then its steps, unrolled.
  constexpr std::size_t block = every < 2 * step ? 2 * step : every;
  std::size_t c = begin, s = 0;
  for (; c + block <= end; c += block) {
    for (std::size_t i = 0; i < count; ++i)
      for (std::size_t o = 0; o < block; o += line) prefetch_ahead(in.rows[i], in.next[i], c + o, ahead, d);
    for (std::size_t b = 0; b < block; b += step, ++s) run(c + b, s, step);
  }
  for (; c + step <= end; c += step, ++s) run(c, s, step);
  if (c < end) run(c, s, end - c);
}
}  // namespace simd

template <class T>
template <class Arch>
std::size_t combine_kernel<T>::operator()(Arch arch, const args_type& a) const noexcept {
  using codec = simd::row_codec<T, Arch>;
  using A = typename codec::math;
  using batch = typename codec::batch;
  // Up to `group` kept rows are summed in registers over the whole row; a token with more goes chunk by chunk,
  // keeping its sums in `partial` between groups of rows.
  constexpr std::size_t group = 16, chunk = row_chunk;
  static_assert(chunk % codec::step == 0, "row_chunk must hold whole steps");
  const pair_layout& pairs = a.pairs;
  const std::size_t k = pairs.top_k, d = a.y.cols;
  // Token t's kept choices from j on, up to `group` of them (rows, weights, count); returns the choice after them.
  const auto gather = [&](std::size_t t, std::size_t j, const T** rows, A* weights, std::size_t& count) {
    count = 0;
    for (; j < k && count < group; ++j) {
      if (!pairs.kept(t * k + j)) continue;
      rows[count] = a.buffer.row(pairs.row(t * k + j));
      weights[count++] = simd::weight_at<A>(arch, a.weight, t, j);
    }
    for (; j < k && !pairs.kept(t * k + j); ++j) {}
    return j;
  };
  const T* rows[group];
  const T* next[group];
  A weights[group], next_weights[group];
  batch partial[2 * chunk / codec::step];
  const auto whole_row = [&](const simd::summed_rows<T, A>& in, T* out, auto streaming) {
    constexpr bool S = decltype(streaming)::value;
    switch (in.count) {
      case 1: simd::weighted_sum<1, S, true, true, codec>(in, 0, d, d, partial, out); break;
      case 2: simd::weighted_sum<2, S, true, true, codec>(in, 0, d, d, partial, out); break;
      default: simd::weighted_sum<0, S, true, true, codec>(in, 0, d, d, partial, out); break;
    }
  };
  for (std::size_t t = a.begin; t < a.end; ++t) {
    T* out = a.y.row(t);
    const bool streaming = a.streaming && reinterpret_cast<std::uintptr_t>(out) % 64 == 0;
    std::size_t count = 0, next_count = 0;
    if (t + 1 < a.end) gather(t + 1, 0, next, next_weights, next_count);
    for (std::size_t i = next_count; i < group; ++i) next[i] = nullptr;
    const std::size_t after = gather(t, 0, rows, weights, count);
    if (after >= k) {  // one group: the whole row at once
      const simd::summed_rows<T, A> in{rows, weights, next, count};
      if (streaming) {
        whole_row(in, out, std::true_type{});
      } else {
        whole_row(in, out, std::false_type{});
      }
      continue;
    }
    for (std::size_t c0 = 0; c0 < d; c0 += chunk) {
      const std::size_t end = chunk < d - c0 ? c0 + chunk : d;
      for (std::size_t j = 0, g = 0;; ++g) {
        j = gather(t, j, rows, weights, count);
        const simd::summed_rows<T, A> in{rows, weights, next, count};
        if (j < k) {
          if (g == 0) {
            simd::weighted_sum<0, false, true, false, codec>(in, c0, end, d, partial, out);
          } else {
            simd::weighted_sum<0, false, false, false, codec>(in, c0, end, d, partial, out);
          }
          continue;
        }
        if (streaming) {
          simd::weighted_sum<0, true, false, true, codec>(in, c0, end, d, partial, out);
        } else {
          simd::weighted_sum<0, false, false, true, codec>(in, c0, end, d, partial, out);
        }
        break;
      }
    }
  }
  if (a.streaming) streaming_fence();
  return 0;
}

namespace simd {
/// One pair of combine's backward: out = w dy rounded to T (Out), and dy . row over dot_lanes partial sums (element
/// c into partial c mod dot_lanes) combined by a fixed pairwise tree. dy is padded with -0 and the row with +0, so
/// that a partial step adds -0, which leaves every sum as it is.
template <bool Out, bool Streaming, class Codec, class T, class A>
A scale_and_dot(const T* dy, const T* row, std::size_t d, A w, T* out, const T* next) noexcept {
  using batch = typename Codec::batch;
  constexpr std::size_t step = Codec::step, lanes = dot_lanes<A>, steps = lanes / step, line = 64 / sizeof(T),
                        every = step < line ? line : step, ahead = row_prefetch_bytes / sizeof(T);
  static_assert(lanes % step == 0, "a step wider than the dot's partial sums");
  batch sums[2 * steps];
  for (auto& v : sums) v = batch(A(0));
  const batch scale(w);
  const T zero = signed_zero<T>(typename Codec::arch{}, false), minus_zero = signed_zero<T>(typename Codec::arch{}, true);
  const auto run = [&](std::size_t c, std::size_t s, std::size_t len) LOCMOE_DETAIL_STEP_LAMBDA {
    batch g0, g1, r0, r1;
    load_step<Codec>(dy + c, len, minus_zero, g0, g1);
    load_step<Codec>(row + c, len, zero, r0, r1);
    if constexpr (Out) store_step<Streaming, Codec>(out + c, len, scale * g0, scale * g1);
    sums[2 * s] = sums[2 * s] + g0 * r0;
    sums[2 * s + 1] = sums[2 * s + 1] + g1 * r1;
  };
  std::size_t c = 0;
  for (; c + lanes <= d; c += lanes) {
    for (std::size_t s = 0; s < steps; ++s) {
      if ((c + s * step) % every == 0)
        for (std::size_t o = 0; o < every; o += line) prefetch_ahead(row, next, c + s * step + o, ahead, d);
      run(c + s * step, s, step);
    }
  }
  std::size_t s = 0;
  for (; c + step <= d; c += step, ++s) run(c, s, step);
  if (c < d) run(c, s, d - c);
  alignas(64) A part[lanes];
  for (s = 0; s < steps; ++s) Codec::spill(sums[2 * s], sums[2 * s + 1], part + s * step);
  for (std::size_t half = lanes / 2; half > 0; half /= 2)
    for (std::size_t i = 0; i < half; ++i) part[i] += part[i + half];
  return part[0];
}
}  // namespace simd

template <class T>
template <class Arch>
std::size_t combine_backward_kernel<T>::operator()(Arch arch, const args_type& a) const noexcept {
  using codec = simd::row_codec<T, Arch>;
  using A = typename codec::math;
  const pair_layout& pairs = a.pairs;
  const std::size_t k = pairs.top_k, d = a.grad_y.cols, last = a.end * k;
  const auto set_grad = [&](std::size_t t, std::size_t j, A value) {
    if (a.grad_weight.f32) a.grad_weight.f32[t * a.grad_weight.stride + j] = static_cast<float>(value);
    if (a.grad_weight.f64) a.grad_weight.f64[t * a.grad_weight.stride + j] = static_cast<double>(value);
  };
  const auto next_kept = [&](std::size_t p) {  // the first kept pair after p in the range, or `last`
    for (++p; p < last && !pairs.kept(p); ++p) {}
    return p;
  };
  for (std::size_t t = a.begin; t < a.end; ++t) {
    const T* dy = a.grad_y.row(t);
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t p = t * k + j;
      if (!pairs.kept(p)) {
        set_grad(t, j, A(0));
        continue;
      }
      const std::size_t r = pairs.row(p), after = next_kept(p);
      const T* row = a.buffer.row(r);
      const T* next = after < last ? a.buffer.row(pairs.row(after)) : nullptr;
      const A w = simd::weight_at<A>(arch, a.weight, t, j);
      A dot;
      if (!a.grad_buffer.present()) {
        dot = simd::scale_and_dot<false, false, codec>(dy, row, d, w, static_cast<T*>(nullptr), next);
      } else if (T* out = a.grad_buffer.row(r); a.streaming && reinterpret_cast<std::uintptr_t>(out) % 64 == 0) {
        dot = simd::scale_and_dot<true, true, codec>(dy, row, d, w, out, next);
      } else {
        dot = simd::scale_and_dot<true, false, codec>(dy, row, d, w, out, next);
      }
      set_grad(t, j, dot);
    }
  }
  if (a.streaming) streaming_fence();
  return 0;
}

}  // namespace locmoe::detail
