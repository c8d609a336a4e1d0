// 64-byte aligned buffers for the benchmarks, as tensor libraries allocate them (PyTorch's CPU allocator aligns
// to 64 bytes): std::vector's storage may start 16 bytes past a cache line, which splits every wide load.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace locmoe_bench {

template <class T>
struct aligned_allocator {
  using value_type = T;
  static constexpr std::size_t alignment = 64;
  aligned_allocator() noexcept = default;
  template <class U>
  aligned_allocator(const aligned_allocator<U>&) noexcept {}  // NOLINT: rebinding
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{alignment})); }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{alignment}); }
  template <class U>
  bool operator==(const aligned_allocator<U>&) const noexcept { return true; }
  template <class U>
  bool operator!=(const aligned_allocator<U>&) const noexcept { return false; }
};

template <class T>
using aligned_vector = std::vector<T, aligned_allocator<T>>;

}  // namespace locmoe_bench
