// locmoe/detail/simd.hpp - the per-token building blocks of the SIMD kernels, written once over
// xsimd::batch<T, Arch>.
//
// Reproducibility across instruction sets: every reduction is defined over a 64-byte "virtual vector"
// (16 floats, 8 doubles, or 32 half values) whatever the register width, and its lanes are combined by a
// fixed pairwise tree, then the leftover elements are added in order. SSE, AVX2 and AVX-512 thus compute the
// same sums with the same roundings: block means, logits and the selected experts are bit-identical on every
// x86 CPU. (Probabilities and weights go through xsimd::exp, which uses FMA where the instruction set has it and
// so may differ in the last bit between sets; a probability, one exponential over the sum of n of them, then
// differs by a few ulps: at most 3 in float and 2 in double measured for n <= 4096, and the tests allow 4.
// Never between runs.)
//
// Everything here is templated on Arch, including scalar helpers, so that the code compiled into one
// instruction set's translation unit never stands in for another's at link time.
#pragma once

#include <locmoe/views.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <xsimd/xsimd.hpp>

namespace locmoe::detail::simd {

inline constexpr std::size_t virtual_bytes = 64;

/// Largest number of experts the selection kernels handle (their scratch row lives on the stack).
inline constexpr std::size_t max_experts = 4096;

template <class S>
inline constexpr std::size_t virtual_lanes = virtual_bytes / sizeof(S);

inline constexpr std::size_t round_up(std::size_t value, std::size_t multiple) noexcept {
  return (value + multiple - 1) / multiple * multiple;
}

template <class T>
inline constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, fp16>;

template <class T>
std::uint16_t bits16(const T& value) noexcept {
  std::uint16_t b;
  std::memcpy(&b, &value, sizeof b);
  return b;
}

template <class Arch>
float float_from_bits(Arch, std::uint32_t bits) noexcept {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

/// One element as the accumulation type (exact for every input type).
template <class Arch, class T>
accumulate_t<T> to_accumulate(Arch arch, const T& value) noexcept {
  if constexpr (std::is_same_v<T, bf16>) {
    return float_from_bits(arch, std::uint32_t{bits16(value)} << 16);
  } else if constexpr (std::is_same_v<T, fp16>) {
    const std::uint32_t h = bits16(value);
    const std::uint32_t sign = (h & 0x8000u) << 16;
    const std::uint32_t exponent = h & 0x7c00u;
    const std::uint32_t magnitude = (h & 0x7fffu) << 13;
    float f;
    if (exponent == 0) {
      f = static_cast<float>(h & 0x3ffu) * 0x1p-24f;  // zero and subnormals, without a subnormal float
    } else if (exponent == 0x7c00u) {
      f = float_from_bits(arch, magnitude | 0x7f800000u);  // Inf and NaN (payload kept)
    } else {
      f = float_from_bits(arch, magnitude + 0x38000000u);  // rebias the exponent: 127 - 15 = 112
    }
    std::uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return float_from_bits(arch, b | sign);
  } else {
    return static_cast<accumulate_t<T>>(value);
  }
}

/// Two half values per 32-bit lane (low = even element, high = odd element) to two float batches.
template <class Arch, class T>
void halves_to_float(const xsimd::batch<std::uint32_t, Arch>& u, xsimd::batch<float, Arch>& even,
                     xsimd::batch<float, Arch>& odd) noexcept {
  using ubatch = xsimd::batch<std::uint32_t, Arch>;
  using fbatch = xsimd::batch<float, Arch>;
  if constexpr (std::is_same_v<T, bf16>) {
    even = xsimd::bitwise_cast<fbatch>(u << 16);
    odd = xsimd::bitwise_cast<fbatch>(u & ubatch(0xffff0000u));
  } else {
    const auto convert = [](const ubatch& h) {  // h: one binary16 per lane, upper half zero
      // Integer-domain selects: float compares of these bit patterns would misread under DAZ.
      const ubatch exponent = h & ubatch(0x7c00u);
      const ubatch magnitude = (h & ubatch(0x7fffu)) << 13;
      const ubatch normal = magnitude + ubatch(0x38000000u);  // rebias the exponent: 127 - 15 = 112
      const ubatch special = magnitude | ubatch(0x7f800000u);  // Inf and NaN (payload kept)
      const ubatch subnormal = xsimd::bitwise_cast<ubatch>(
          xsimd::to_float(xsimd::bitwise_cast<xsimd::batch<std::int32_t, Arch>>(h & ubatch(0x3ffu))) *
          fbatch(0x1p-24f));  // zero and subnormals, exact, without a subnormal float
      ubatch bits = xsimd::select(exponent == ubatch(0x7c00u), special, normal);
      bits = xsimd::select(exponent == ubatch(0u), subnormal, bits);
      return xsimd::bitwise_cast<fbatch>(bits | ((h & ubatch(0x8000u)) << 16));
    };
    even = convert(u & ubatch(0xffffu));
    odd = convert(u >> 16);
  }
}

/// Pairwise sum of the lanes of a virtual vector held in `registers` batches (fixed order, any width).
template <class Arch, class S, std::size_t Registers>
S tree_sum(Arch, const xsimd::batch<S, Arch> (&sums)[Registers]) noexcept {
  constexpr std::size_t width = xsimd::batch<S, Arch>::size;
  constexpr std::size_t lanes = Registers * width;
  alignas(virtual_bytes) S lane[lanes];
  for (std::size_t r = 0; r < Registers; ++r) sums[r].store_aligned(lane + r * width);
  for (std::size_t half = lanes / 2; half > 0; half /= 2)
    for (std::size_t i = 0; i < half; ++i) lane[i] += lane[i + half];
  return lane[0];
}

/// The largest (Largest) or smallest lane of v, by halving: log2(width) steps instead of a chain of width - 1
/// compares. Exact, so the order does not matter. NaN-free input.
template <bool Largest, class S, class Arch>
S lane_extreme(const xsimd::batch<S, Arch>& v) noexcept {
  constexpr std::size_t width = xsimd::batch<S, Arch>::size;
  alignas(virtual_bytes) S lane[width];
  v.store_aligned(lane);
  for (std::size_t half = width / 2; half > 0; half /= 2)
    for (std::size_t i = 0; i < half; ++i)
      lane[i] = (Largest ? lane[i + half] > lane[i] : lane[i + half] < lane[i]) ? lane[i + half] : lane[i];
  return lane[0];
}

/// Sum of len consecutive elements in the accumulation type, in the fixed order described above.
template <class Arch, class T>
accumulate_t<T> block_sum(Arch arch, const T* p, std::size_t len) noexcept {
  using acc = accumulate_t<T>;
  using batch = xsimd::batch<acc, Arch>;
  constexpr std::size_t width = batch::size;
  constexpr std::size_t per_chunk = virtual_bytes / sizeof(T);              // elements per 64 bytes
  constexpr std::size_t lanes = is_half_v<T> ? 32 : virtual_lanes<acc>;    // accumulator lanes
  constexpr std::size_t registers = lanes / width;
  static_assert(lanes % width == 0, "a register wider than 64 bytes");

  const std::size_t chunks = len / per_chunk;
  acc total = 0;
  if (chunks > 0) {
    batch sums[registers];
    for (auto& s : sums) s = batch(acc(0));
    for (std::size_t c = 0; c < chunks; ++c) {
      const T* chunk = p + c * per_chunk;
      if constexpr (is_half_v<T>) {
        using ubatch = xsimd::batch<std::uint32_t, Arch>;
        const auto* words = reinterpret_cast<const std::uint32_t*>(chunk);  // 16 lanes of two halves
        for (std::size_t r = 0; r < registers / 2; ++r) {
          batch even, odd;
          halves_to_float<Arch, T>(ubatch::load_unaligned(words + r * width), even, odd);
          sums[r] += even;
          sums[registers / 2 + r] += odd;
        }
      } else {
        for (std::size_t r = 0; r < registers; ++r) sums[r] += batch::load_unaligned(chunk + r * width);
      }
    }
    total = tree_sum(arch, sums);
  }
  acc tail = 0;
  for (std::size_t j = chunks * per_chunk; j < len; ++j) tail += to_accumulate(arch, p[j]);
  return total + tail;
}

/// Where one token's selection goes. indices and weights (k entries) are required when k > 0;
/// probabilities (n entries) are optional (null: not asked for).
template <class S>
struct token_outputs {
  expert_index* indices = nullptr;
  S* weights = nullptr;
  S* probabilities = nullptr;
};

struct select_settings {
  std::size_t k = 1;         ///< 0: probabilities only
  bool softmax = true;       ///< weights are softmax probabilities (else: the scores themselves)
  bool renormalize = false;  ///< weights divided by their sum over the k chosen
};

/// Selects for one token whose n scores sit in `row` (64-byte aligned, room for round_up(n, virtual
/// width) values: the padding is set to -inf here); the row is overwritten. Returns false, and writes the "no expert" outputs, for an
/// invalid token: a score that is NaN or +inf, or no score above -inf.
template <class Arch, class S>
bool select_token(Arch arch, S* row, std::size_t n, const select_settings& settings,
                  const token_outputs<S>& out) noexcept {
  using batch = xsimd::batch<S, Arch>;
  constexpr std::size_t width = batch::size;
  constexpr std::size_t lanes = virtual_lanes<S>;
  constexpr std::size_t registers = lanes / width;
  constexpr S infinity = std::numeric_limits<S>::infinity();
  const std::size_t padded = round_up(n, lanes);
  const std::size_t k = settings.k;
  constexpr std::size_t small_k = 8;  // up to k = 8 and n >= 4 k (measured), the SIMD walk beats the insertion list
  for (std::size_t j = n; j < padded; ++j) row[j] = -infinity;

  // Pass 1: validity and the maximum (max is exact, so its order does not matter).
  batch maxima = batch(-infinity);
  auto bad = batch(S(0)) != batch(S(0));
  for (std::size_t j = 0; j < padded; j += width) {
    const batch s = batch::load_aligned(row + j);
    bad = bad || xsimd::isnan(s) || (s == batch(infinity));
    maxima = xsimd::max(maxima, s);
  }
  const S maximum = lane_extreme<true>(maxima);
  if (xsimd::any(bad) || maximum == -infinity) {
    for (std::size_t c = 0; c < k; ++c) {
      out.indices[c] = no_expert;
      out.weights[c] = S(0);
    }
    if (out.probabilities)
      for (std::size_t j = 0; j < n; ++j) out.probabilities[j] = S(0);
    return false;
  }

  // Pass 2: the k best scores, highest first, ties to the lower index (strict > while scanning upward);
  // the weights hold the scores for now.
  std::size_t chosen = 0;
  if (k == 1) {
    std::size_t best = 0;
    while (row[best] != maximum) ++best;
    out.indices[0] = static_cast<expert_index>(best);
    out.weights[0] = maximum;
    chosen = 1;
  } else if (k > 1 && k <= small_k && 4 * k <= n) {
    // Walk the order (score desc, index asc) k steps with SIMD: each step takes the largest score among the
    // entries after the previous choice, then its first index. The row is only read (no masking stores).
    alignas(virtual_bytes) S iota_lane[width];
    for (std::size_t i = 0; i < width; ++i) iota_lane[i] = static_cast<S>(i);
    const batch iota = batch::load_aligned(iota_lane), minus_inf(-infinity), none(static_cast<S>(padded));
    std::size_t at = 0;
    while (row[at] != maximum) ++at;
    S value = maximum;
    out.indices[0] = static_cast<expert_index>(at);
    out.weights[0] = row[at];
    for (chosen = 1; chosen < k; ++chosen) {
      const batch v(value), a(static_cast<S>(at));
      batch next = minus_inf;
      for (std::size_t i = 0; i < padded; i += width) {
        const batch s = batch::load_aligned(row + i), index = iota + batch(static_cast<S>(i));
        next = xsimd::max(next, xsimd::select((s < v) || ((s == v) && (index > a)), s, minus_inf));
      }
      const S best = lane_extreme<true>(next);
      if (best == -infinity) break;  // fewer than k selectable experts
      const batch b(best), later = xsimd::select(b < v, batch(S(-1)), a);  // best < value: any index
      batch first = none;
      for (std::size_t i = 0; i < padded; i += width) {
        const batch s = batch::load_aligned(row + i), index = iota + batch(static_cast<S>(i));
        first = xsimd::min(first, xsimd::select((s == b) && (index > later), index, none));
      }
      at = static_cast<std::size_t>(lane_extreme<false>(first));
      value = best;
      out.indices[chosen] = static_cast<expert_index>(at);
      out.weights[chosen] = row[at];
    }
  } else if (k > 1) {
    for (std::size_t j = 0; j < n; ++j) {
      const S s = row[j];
      if (s == -infinity || (chosen == k && !(s > out.weights[k - 1]))) continue;
      std::size_t pos = chosen < k ? chosen++ : k - 1;
      for (; pos > 0 && s > out.weights[pos - 1]; --pos) {
        out.weights[pos] = out.weights[pos - 1];
        out.indices[pos] = out.indices[pos - 1];
      }
      out.weights[pos] = s;
      out.indices[pos] = static_cast<expert_index>(j);
    }
  }
  for (std::size_t c = chosen; c < k; ++c) {  // fewer than k selectable experts
    out.indices[c] = no_expert;
    out.weights[c] = S(0);
  }

  if (!settings.softmax) {
    if (settings.renormalize && chosen > 0) {
      S total = 0;
      for (std::size_t c = 0; c < chosen; ++c) total += out.weights[c];
      for (std::size_t c = 0; c < chosen; ++c) out.weights[c] /= total;
    }
    return true;
  }

  // Pass 3: e_j = exp(s_j - max) in place and their sum; padding contributes exp(-inf) = 0.
  // The argument is clamped to a finite floor far below exp's underflow (where exp gives exactly 0 either way):
  // xsimd's exp converts round(x / ln 2) to an integer, and on sets without a vector double -> int64 conversion
  // (AVX2) that is a scalar cast, undefined behaviour for -inf (found by tests/fuzz/fuzz_select.cpp).
  batch sums[registers];
  for (auto& s : sums) s = batch(S(0));
  const batch shift(maximum);
  const batch floor(std::is_same_v<S, float> ? S(-200) : S(-1000));
  for (std::size_t j = 0; j < padded; j += lanes) {
    for (std::size_t r = 0; r < registers; ++r) {
      const batch e = xsimd::exp(xsimd::max(batch::load_aligned(row + j + r * width) - shift, floor));
      e.store_aligned(row + j + r * width);
      sums[r] += e;
    }
  }
  const S total = tree_sum(arch, sums);
  S chosen_total = total;
  if (settings.renormalize) {
    chosen_total = 0;
    for (std::size_t c = 0; c < chosen; ++c) chosen_total += row[out.indices[c]];
  }
  for (std::size_t c = 0; c < chosen; ++c) out.weights[c] = row[out.indices[c]] / chosen_total;
  if (out.probabilities)
    for (std::size_t j = 0; j < n; ++j) out.probabilities[j] = row[j] / total;
  return true;
}

}  // namespace locmoe::detail::simd
