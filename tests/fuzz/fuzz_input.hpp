// Turns a fuzzer's bytes into sizes, flags and values. Every read is defined once the bytes run out (zeros),
// so every input, however short, is a valid test case.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace locmoe_fuzz {

/// Aborts with a message: libFuzzer reports the abort as a crash and saves the input.
[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what.c_str());
  std::abort();
}
#define LOCMOE_FUZZ_CHECK(condition, what) \
  do {                                     \
    if (!(condition)) ::locmoe_fuzz::fail(std::string(#condition) + ": " + (what)); \
  } while (false)

class input {
 public:
  input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}

  std::size_t remaining() const { return size_ - pos_; }

  template <class T>
  T raw() {
    T value{};
    unsigned char bytes[sizeof(T)] = {};
    const std::size_t take = std::min(sizeof(T), remaining());
    if (take) std::memcpy(bytes, data_ + pos_, take);
    pos_ += take;
    std::memcpy(&value, bytes, sizeof(T));
    return value;
  }
  /// An integer in [lo, hi] (one to eight bytes, as the range needs).
  std::uint64_t between(std::uint64_t lo, std::uint64_t hi) {
    const std::uint64_t span = hi - lo;
    std::uint64_t value = 0;
    for (std::uint64_t s = span; s != 0; s >>= 8) value = (value << 8) | raw<std::uint8_t>();
    return span == std::numeric_limits<std::uint64_t>::max() ? value : lo + value % (span + 1);
  }
  std::size_t size_between(std::size_t lo, std::size_t hi) { return static_cast<std::size_t>(between(lo, hi)); }
  bool flag() { return raw<std::uint8_t>() & 1u; }

  /// A value that exercises the boundaries: NaN, +-inf, +-0, denormals, the largest finite values, ties (small
  /// integers), or any bit pattern.
  template <class S>
  S special() {
    using limits = std::numeric_limits<S>;
    switch (raw<std::uint8_t>() % 16) {
      case 0: return limits::quiet_NaN();
      case 1: return limits::infinity();
      case 2: return -limits::infinity();
      case 3: return S(0);
      case 4: return -S(0);
      case 5: return limits::denorm_min();
      case 6: return -limits::denorm_min() * S(3);
      case 7: return limits::max();
      case 8: return -limits::max();
      case 9: return S(1e38f);
      case 10: return -S(1e38f);
      case 11: case 12: return S(static_cast<int>(raw<std::uint8_t>() % 5) - 2);  // ties
      case 13: return raw<S>();                                                  // any bits
      default: return S(static_cast<std::int8_t>(raw<std::uint8_t>())) / S(8);   // ordinary values
    }
  }
  /// A value that is usually ordinary and sometimes special.
  template <class S>
  S value(bool allow_special = true) {
    const std::uint8_t kind = raw<std::uint8_t>();
    if (allow_special && kind % 8 == 0) return special<S>();
    return S(static_cast<std::int16_t>(raw<std::uint16_t>())) / S(4096);
  }
  std::string text(std::size_t max_length) {
    const std::size_t wanted = size_between(0, max_length);  // reads bytes: before remaining(), not in one expression
    const std::size_t length = std::min(wanted, remaining());  // (argument order is unspecified; g++ took remaining first)
    std::string s(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return s;
  }
  std::string rest() { return text(remaining()); }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
};

}  // namespace locmoe_fuzz
