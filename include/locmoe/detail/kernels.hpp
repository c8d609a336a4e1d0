// locmoe/detail/kernels.hpp - the SIMD kernels (functors over an xsimd architecture) and their run-time
// dispatch. Public entry points are in gating.hpp and select.hpp; they validate, then call run<Kernel>.
//
// Two ways to build (docs/architecture.md#simd-dispatch):
//  * header only (default): kernels compile for the instruction set the including translation unit is
//    compiled for (xsimd::default_arch: SSE2 on a plain x86-64 build, AVX-512 with -march=native).
//  * run-time dispatch (LOCMOE_SIMD_DISPATCH defined): kernels are compiled once per instruction set of
//    kernel_archs, each in its own translation unit with that set's flags (CMake:
//    locmoe_enable_simd_dispatch(target); by hand: include <locmoe/simd_instantiate.hpp> and invoke
//    LOCMOE_INSTANTIATE_SIMD_KERNELS(arch) per set), and every call picks the best one the CPU has.
//    kernel_archs is SSE2, SSE4.2, AVX2+FMA and AVX-512BW, less each set whose LOCMOE_SIMD_WITHOUT_<SET>
//    (SSE4_2, FMA3_AVX2, AVX512BW) is defined (CMake: the LOCMOE_SIMD_ARCHS list); SSE2 is always in.
#pragma once

#include <locmoe/detail/row_kernels.hpp>
#include <locmoe/detail/simd.hpp>

#include <cstddef>
#include <type_traits>

namespace locmoe::detail {

/// GrAP gate (and, when `select` is on, softmax and top-k) over the token rows [begin, end).
template <class T>
struct grap_kernel {
  using score = accumulate_t<T>;
  struct args_type {
    matrix_view<const T> x;
    std::size_t experts = 0;
    bool relu = true;
    const score* bias = nullptr;
    std::size_t begin = 0, end = 0;
    bool select = false;
    simd::select_settings settings;
    matrix_view<score> logits;          // optional
    matrix_view<score> probabilities;   // optional
    matrix_view<expert_index> indices;  // required when select and k > 0
    matrix_view<score> weights;         // required when select and k > 0
  };
  /// Returns the number of invalid tokens (see select_token).
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

/// Softmax and/or top-k over given scores, rows [begin, end).
template <class S>
struct select_kernel {
  struct args_type {
    matrix_view<const S> scores;
    std::size_t begin = 0, end = 0;
    simd::select_settings settings;
    matrix_view<S> probabilities;
    matrix_view<expert_index> indices;
    matrix_view<S> weights;
  };
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

/// A plain streaming read of `bytes` bytes (the benchmarks' memory-bandwidth reference): XOR of all 64-bit
/// words, one 64-byte chunk per step, or with `wide` 8 registers of the set's width per step (8 loads in flight);
/// the benchmarks report the faster. Returns the XOR so the read cannot be elided.
struct stream_read_kernel {
  struct args_type {
    const unsigned char* data = nullptr;
    std::size_t bytes = 0;
    bool wide = false;
  };
  template <class Arch>
  std::size_t operator()(Arch arch, const args_type& a) const noexcept;
};

template <class S>
simd::token_outputs<S> outputs_of_row(std::size_t t, const matrix_view<expert_index>& indices,
                                      const matrix_view<S>& weights, const matrix_view<S>& probabilities) noexcept {
  return {indices.present() ? indices.row(t) : nullptr, weights.present() ? weights.row(t) : nullptr,
          probabilities.present() ? probabilities.row(t) : nullptr};
}

template <class T>
template <class Arch>
std::size_t grap_kernel<T>::operator()(Arch arch, const args_type& a) const noexcept {
  constexpr std::size_t lanes = simd::virtual_lanes<score>;
  alignas(simd::virtual_bytes) score scratch[simd::round_up(simd::max_experts, lanes)];
  const std::size_t d = a.x.cols, n = a.experts;
  const std::size_t base = d / n, remainder = d % n;
  std::size_t invalid = 0;
  for (std::size_t t = a.begin; t < a.end; ++t) {
    const T* x = a.x.row(t);
    score* logit = a.select ? scratch : a.logits.row(t);
    // Block i is [floor(i d / n), floor((i + 1) d / n)); `carry` tracks (i * (d mod n)) mod n.
    std::size_t start = 0, carry = 0;
    for (std::size_t i = 0; i < n; ++i) {
      carry += remainder;
      std::size_t size = base;
      if (carry >= n) {
        carry -= n;
        ++size;
      }
      score s = simd::block_sum(arch, x + start, size) / static_cast<score>(size);
      if (a.bias) s += a.bias[i];
      if (a.relu) s = s < score(0) ? score(0) : s;  // NaN stays NaN
      logit[i] = s;
      start += size;
    }
    if (!a.select) continue;
    if (a.logits.present())
      for (std::size_t i = 0; i < n; ++i) a.logits(t, i) = scratch[i];
    if (!simd::select_token(arch, scratch, n, a.settings, outputs_of_row(t, a.indices, a.weights, a.probabilities)))
      ++invalid;
  }
  return invalid;
}

template <class S>
template <class Arch>
std::size_t select_kernel<S>::operator()(Arch arch, const args_type& a) const noexcept {
  constexpr std::size_t lanes = simd::virtual_lanes<S>;
  alignas(simd::virtual_bytes) S scratch[simd::round_up(simd::max_experts, lanes)];
  const std::size_t n = a.scores.cols;
  std::size_t invalid = 0;
  for (std::size_t t = a.begin; t < a.end; ++t) {
    const S* s = a.scores.row(t);
    for (std::size_t i = 0; i < n; ++i) scratch[i] = s[i];
    if (!simd::select_token(arch, scratch, n, a.settings, outputs_of_row(t, a.indices, a.weights, a.probabilities)))
      ++invalid;
  }
  return invalid;
}

namespace simd {
/// XOR of every 64-bit word of [data, data + bytes) with `Registers` independent accumulators of Arch's width.
template <std::size_t Registers, class Arch>
std::size_t xor_read(Arch, const unsigned char* data, std::size_t bytes) noexcept {
  using batch = xsimd::batch<std::uint64_t, Arch>;
  constexpr std::size_t width = batch::size, step = Registers * width * sizeof(std::uint64_t);
  batch acc[Registers];
  for (auto& v : acc) v = batch(std::uint64_t{0});
  std::size_t offset = 0;
  for (; offset + step <= bytes; offset += step) {
    const auto* words = reinterpret_cast<const std::uint64_t*>(data + offset);
    for (std::size_t r = 0; r < Registers; ++r) acc[r] ^= batch::load_unaligned(words + r * width);
  }
  alignas(64) std::uint64_t lane[Registers * width];
  for (std::size_t r = 0; r < Registers; ++r) acc[r].store_unaligned(lane + r * width);
  std::uint64_t folded = 0;
  for (const auto v : lane) folded ^= v;
  for (; offset < bytes; ++offset) folded ^= data[offset];
  return static_cast<std::size_t>(folded);
}
}  // namespace simd

template <class Arch>
std::size_t stream_read_kernel::operator()(Arch arch, const args_type& a) const noexcept {
  constexpr std::size_t per_chunk = simd::virtual_bytes / (xsimd::batch<std::uint64_t, Arch>::size * sizeof(std::uint64_t));
  return a.wide ? simd::xor_read<8>(arch, a.data, a.bytes) : simd::xor_read<per_chunk>(arch, a.data, a.bytes);
}

}  // namespace locmoe::detail

// Every kernel specialization, for explicit instantiation per instruction set. (No leading :: on the
// names: "std::size_t ::locmoe::..." would parse as one qualified name.)
#define LOCMOE_SIMD_KERNEL_LIST(X, ARCH)                  \
  X(locmoe::detail::grap_kernel<float>, ARCH)           \
  X(locmoe::detail::grap_kernel<double>, ARCH)          \
  X(locmoe::detail::grap_kernel<locmoe::bf16>, ARCH)  \
  X(locmoe::detail::grap_kernel<locmoe::fp16>, ARCH)  \
  X(locmoe::detail::select_kernel<float>, ARCH)         \
  X(locmoe::detail::select_kernel<double>, ARCH)      \
  X(locmoe::detail::combine_kernel<float>, ARCH)      \
  X(locmoe::detail::combine_kernel<double>, ARCH)     \
  X(locmoe::detail::combine_kernel<locmoe::bf16>, ARCH) \
  X(locmoe::detail::combine_kernel<locmoe::fp16>, ARCH) \
  X(locmoe::detail::combine_backward_kernel<float>, ARCH)      \
  X(locmoe::detail::combine_backward_kernel<double>, ARCH)     \
  X(locmoe::detail::combine_backward_kernel<locmoe::bf16>, ARCH) \
  X(locmoe::detail::combine_backward_kernel<locmoe::fp16>, ARCH) \
  X(locmoe::detail::convert_kernel<locmoe::bf16>, ARCH) \
  X(locmoe::detail::convert_kernel<locmoe::fp16>, ARCH) \
  X(locmoe::detail::stream_read_kernel, ARCH)

#define LOCMOE_DETAIL_EXTERN_KERNEL(KERNEL, ARCH) \
  extern template std::size_t KERNEL::operator()<ARCH>(ARCH, const KERNEL::args_type&) const noexcept;
#define LOCMOE_DETAIL_DEFINE_KERNEL(KERNEL, ARCH) \
  template std::size_t KERNEL::operator()<ARCH>(ARCH, const KERNEL::args_type&) const noexcept;

#if defined(LOCMOE_SIMD_DISPATCH)
#  if !(defined(__x86_64__) || defined(_M_X64))
#    error "LOCMOE_SIMD_DISPATCH lists x86-64 instruction sets; build header-only elsewhere"
#  endif
#  if !defined(LOCMOE_SIMD_WITHOUT_AVX512BW)
LOCMOE_SIMD_KERNEL_LIST(LOCMOE_DETAIL_EXTERN_KERNEL, ::xsimd::avx512bw)
#  endif
#  if !defined(LOCMOE_SIMD_WITHOUT_FMA3_AVX2)
LOCMOE_SIMD_KERNEL_LIST(LOCMOE_DETAIL_EXTERN_KERNEL, ::xsimd::fma3<::xsimd::avx2>)
#  endif
#  if !defined(LOCMOE_SIMD_WITHOUT_SSE4_2)
LOCMOE_SIMD_KERNEL_LIST(LOCMOE_DETAIL_EXTERN_KERNEL, ::xsimd::sse4_2)
#  endif
LOCMOE_SIMD_KERNEL_LIST(LOCMOE_DETAIL_EXTERN_KERNEL, ::xsimd::sse2)
#endif

namespace locmoe::detail {

#if defined(LOCMOE_SIMD_DISPATCH)
/// Whether the kernels of Arch were compiled (see the top of this file).
template <class Arch>
inline constexpr bool simd_arch_built = true;
#  if defined(LOCMOE_SIMD_WITHOUT_AVX512BW)
template <>
inline constexpr bool simd_arch_built<xsimd::avx512bw> = false;
#  endif
#  if defined(LOCMOE_SIMD_WITHOUT_FMA3_AVX2)
template <>
inline constexpr bool simd_arch_built<xsimd::fma3<xsimd::avx2>> = false;
#  endif
#  if defined(LOCMOE_SIMD_WITHOUT_SSE4_2)
template <>
inline constexpr bool simd_arch_built<xsimd::sse4_2> = false;
#  endif

/// arch_list<Kept...> followed by those of Rest... that were built, in order.
template <class Kept, class... Rest>
struct built_archs {
  using type = Kept;
};
template <class... Kept, class First, class... Rest>
struct built_archs<xsimd::arch_list<Kept...>, First, Rest...> {
  using type = typename built_archs<std::conditional_t<simd_arch_built<First>, xsimd::arch_list<Kept..., First>,
                                                       xsimd::arch_list<Kept...>>,
                                    Rest...>::type;
};

using kernel_archs = typename built_archs<xsimd::arch_list<>, xsimd::avx512bw, xsimd::fma3<xsimd::avx2>,
                                          xsimd::sse4_2, xsimd::sse2>::type;
#else
using kernel_archs = xsimd::arch_list<xsimd::default_arch>;
#endif

/// Runs Kernel on the best instruction set of kernel_archs that this CPU has.
template <class Kernel>
std::size_t run(const typename Kernel::args_type& args) noexcept {
  return xsimd::dispatch<kernel_archs>(Kernel{})(args);
}

struct arch_namer {
  template <class Arch>
  const char* operator()(Arch) const noexcept {
    return Arch::name();
  }
};

/// The name of the instruction set run<> picks on this CPU ("avx512bw", "fma3+avx2", ...).
inline const char* dispatched_arch_name() noexcept { return xsimd::dispatch<kernel_archs>(arch_namer{})(); }

}  // namespace locmoe::detail
