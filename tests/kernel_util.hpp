// Test helpers for the SIMD kernels: run a kernel on one given instruction set, for every set this CPU has.
#pragma once

#include <locmoe/select.hpp>

#include <cstddef>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

namespace locmoe_test {

/// Calls f(Arch{}) for each instruction set of the dispatch list that this CPU can run.
template <class F, class... Archs>
void for_each_arch_in(xsimd::arch_list<Archs...>, F&& f) {
  const unsigned best = xsimd::available_architectures().best;
  (void)std::initializer_list<int>{(Archs::version() <= best ? (f(Archs{}), 0) : 0)...};
}
template <class F>
void for_each_arch(F&& f) {
  for_each_arch_in(locmoe::detail::kernel_archs{}, f);
}
inline std::size_t arch_count() {
  std::size_t count = 0;
  for_each_arch([&](auto) { ++count; });
  return count;
}

/// grap_route, forced onto one instruction set (arguments are assumed valid).
template <class Arch, class T, class Real>
std::size_t grap_route_on(Arch arch, const locmoe::grap_gate<Real>& gate, locmoe::matrix_view<const T> x,
                          locmoe::select_options options, const locmoe::route_outputs<Real>& out) {
  return locmoe::detail::grap_kernel<T>{}(arch, locmoe::detail::grap_route_args(gate, x, options, out, {0, x.rows}));
}

/// The selection kernel, forced onto one instruction set.
template <class Arch, class S>
std::size_t select_on(Arch arch, locmoe::matrix_view<const S> scores, locmoe::detail::simd::select_settings settings,
                      locmoe::matrix_view<S> probabilities, locmoe::matrix_view<locmoe::expert_index> indices,
                      locmoe::matrix_view<S> weights) {
  return locmoe::detail::select_kernel<S>{}(
      arch, locmoe::detail::select_args<S>(scores, {0, scores.rows}, settings, probabilities, indices, weights));
}

/// A dense row-major buffer with its view.
template <class T>
struct buffer {
  std::vector<T> data;
  std::size_t rows = 0, cols = 0, stride = 0;
  buffer(std::size_t r, std::size_t c, std::size_t s = 0, T fill = T(0))
      : data(r * (s ? s : c) + 1, fill), rows(r), cols(c), stride(s ? s : c) {}
  locmoe::matrix_view<T> view() { return {data.data(), rows, cols, stride}; }
  locmoe::matrix_view<const T> cview() const { return {data.data(), rows, cols, stride}; }
  T& operator()(std::size_t i, std::size_t j) { return data[i * stride + j]; }
  const T& operator()(std::size_t i, std::size_t j) const { return data[i * stride + j]; }
};

/// Seeded random sizes that always include the boundaries.
inline std::vector<std::size_t> token_counts(std::mt19937_64& rng) {
  return {0, 1, 7, 1 + rng() % 40};
}

}  // namespace locmoe_test
