// locmoe/backend/cuda/device.cuh - what every CUDA kernel of the backend shares: errors, element conversions with
// the host's rounding and NaN rules, unfused arithmetic, 16-byte words, warp reductions.
// Nobody includes this directly: backend/cuda.cuh does. Every function here is a template or inline, so the header
// may be included by any number of .cu files of one program.
#pragma once

#if !defined(__CUDACC__) && !defined(LOCMOE_CUDA_EMULATION)
#  error "locmoe/backend/cuda/device.cuh is compiled by nvcc only"
#endif

#include <locmoe/views.hpp>

#if defined(LOCMOE_CUDA_EMULATION)
// The tests' host emulation of the kernels (tests/cuda_emulation/emulation.hpp): the macro holds its path.
#  include LOCMOE_CUDA_EMULATION
#else
#  include <cuda_fp16.h>
#  include <cuda_runtime.h>
#  define LOCMOE_CUDA_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace locmoe {

/// A CUDA runtime error, with the call that failed.
struct cuda_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace cuda_detail {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw cuda_error(std::string("locmoe::cuda_backend: ") + what + ": " + cudaGetErrorString(status));
}

/// Launches kernel<<<grid, block, shared, stream>>>(args...) and checks the launch (cudaGetLastError).
template <class... Params, class... Args>
void launch(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, cudaStream_t stream,
            Args... args) {
#if defined(LOCMOE_CUDA_EMULATION)
  ::cuda_emulation::launch(stream, kernel, grid, block, shared, static_cast<Params>(args)...);
#else
  kernel<<<grid, block, shared, stream>>>(static_cast<Params>(args)...);
#endif
  check(cudaGetLastError(), what);
}

constexpr int warp = 32;
constexpr unsigned full_mask = 0xffffffffu;

/// Bits of a 2-byte element (bf16, fp16), or of any trivially copyable one.
template <class To, class From>
__device__ __forceinline__ To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To to;
  memcpy(static_cast<void*>(&to), &from, sizeof(To));
  return to;
}

/// An element as float (or double for double): exact for bf16 and fp16 (a widening), read from the bits so no
/// Eigen device code runs.
template <class T>
__device__ __forceinline__ auto to_accumulate(T v) {
  if constexpr (std::is_same_v<T, bf16>) {
    return __uint_as_float(static_cast<unsigned>(bits_as<std::uint16_t>(v)) << 16);
  } else if constexpr (std::is_same_v<T, fp16>) {
    return __half2float(__ushort_as_half(bits_as<std::uint16_t>(v)));
  } else {
    return v;
  }
}

/// The accumulation type of an element type: float for bf16/fp16/float, double for double.
template <class T>
using accumulate_of = accumulate_t<T>;

/// An accumulated value rounded to the element type with the host's rules (Eigen's conversions without F16C):
/// round to nearest even; a NaN becomes the quiet NaN of its sign (fp16 0x7e00, bf16 0x7fc0, sign kept), where
/// CUDA's own __float2half gives 0x7fff for every NaN.
template <class T, class A>
__device__ __forceinline__ T from_accumulate(A v) {
  if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, fp16>) {
    const unsigned u = __float_as_uint(v);
    const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
    std::uint16_t out;
    if (v != v) {
      out = static_cast<std::uint16_t>(sign | (std::is_same_v<T, bf16> ? 0x7fc0u : 0x7e00u));
    } else if constexpr (std::is_same_v<T, bf16>) {
      out = static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even; Inf stays Inf
    } else {
      out = __half_as_ushort(__float2half_rn(v));
    }
    return bits_as<T>(out);
  } else {
    return static_cast<T>(v);
  }
}

/// Round-to-nearest multiply and add that the compiler never contracts into an FMA: the host's arithmetic.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

/// A 16-byte word and the elements of T it holds.
using word = uint4;
template <class T>
inline constexpr std::size_t word_elements = sizeof(word) / sizeof(T);

template <class T>
__device__ __forceinline__ void unpack(const word& w, T (&out)[word_elements<T>]) {
  memcpy(static_cast<void*>(out), &w, sizeof(word));
}

inline bool aligned16(const void* p) noexcept { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// Whether every row of a view starts on a 16-byte boundary (its base and its stride in bytes).
template <class T>
bool rows_aligned16(const matrix_view<T>& v) noexcept {
  return aligned16(v.data) && (v.rows <= 1 || (v.stride * sizeof(T)) % 16 == 0);
}

/// Sum over the lanes of each group of `width` lanes (a power of two <= 32), a fixed tree: every lane of the
/// group ends with the group's sum. All 32 lanes call it.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(full_mask, v, offset, width);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = warp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(full_mask, v, offset));
  return v;
}

}  // namespace cuda_detail
}  // namespace locmoe
