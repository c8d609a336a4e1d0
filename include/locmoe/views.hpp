// locmoe/views.hpp - caller-owned matrices: a pointer, sizes and a row stride; element types.
//
// Every kernel in locmoe reads and writes the caller's memory through matrix_view: row-major, rows
// `stride` elements apart (stride >= cols), so that an operand may be a slice of a larger tensor. Views do
// not own and never allocate. Eigen matrices convert with as_view (row-major, inner stride 1). A view is a value:
// copying it or sharing it between threads is safe; what the threads do with the memory is the caller's to order.
//
// Element types: float and double, and the 16-bit bf16 (bfloat16) and fp16 (IEEE binary16), which are
// Eigen's Eigen::bfloat16 and Eigen::half: 2-byte values whose conversions round to nearest even.
//
// Example (docs/api.md#views):
//   std::vector<float> x(tokens * 8192);                         // a [tokens x 8192] buffer ...
//   locmoe::matrix_view<const float> first_half(x.data(), tokens, 4096, 8192);  // ... and its left half
#pragma once

#include <locmoe/config.hpp>
#include <locmoe/error.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include <Eigen/Core>

namespace locmoe {

using bf16 = Eigen::bfloat16;  ///< bfloat16: 1 sign, 8 exponent, 7 mantissa bits
using fp16 = Eigen::half;      ///< IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits

/// Expert index type of every selection; `no_expert` marks a slot that holds no expert (an invalid token,
/// or fewer selectable experts than k).
using expert_index = std::int32_t;
inline constexpr expert_index no_expert = -1;
using slot_index = std::int32_t;  ///< a slot in an expert's buffer (assign.hpp); -1: dropped

/// The type locmoe computes in for activations of type T: double for double, float for the rest.
template <class T>
using accumulate_t = std::conditional_t<std::is_same_v<std::remove_cv_t<T>, double>, double, float>;

/// A row-major matrix in caller memory: element (i, j) is data[i * stride + j].
template <class T>
struct matrix_view {
  T* data = nullptr;
  std::size_t rows = 0;
  std::size_t cols = 0;
  std::size_t stride = 0;  ///< elements between the starts of consecutive rows; >= cols

  constexpr matrix_view() noexcept = default;
  constexpr matrix_view(T* data_, std::size_t rows_, std::size_t cols_) noexcept
      : data(data_), rows(rows_), cols(cols_), stride(cols_) {}
  constexpr matrix_view(T* data_, std::size_t rows_, std::size_t cols_, std::size_t stride_) noexcept
      : data(data_), rows(rows_), cols(cols_), stride(stride_) {}
  /// matrix_view<T> converts to matrix_view<const T>.
  template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
  constexpr matrix_view(const matrix_view<U>& other) noexcept  // NOLINT: implicit on purpose
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}

  constexpr T* row(std::size_t i) const noexcept { return data + i * stride; }
  constexpr T& operator()(std::size_t i, std::size_t j) const noexcept { return data[i * stride + j]; }
  /// Whether the caller passed this (optional) operand at all.
  constexpr bool present() const noexcept { return data != nullptr; }
};

namespace detail {

/// The view of an Eigen expression `m` (a Derived, const or not): const data gives matrix_view<const T>.
template <class Derived>
auto eigen_view(Derived& m) {
  using plain = std::remove_const_t<Derived>;
  static_assert(bool(plain::Flags & Eigen::RowMajorBit) || plain::ColsAtCompileTime == 1,
                "locmoe::as_view: the matrix must be row-major");
  static_assert(bool(Eigen::internal::traits<plain>::Flags & Eigen::DirectAccessBit),
                "locmoe::as_view: the expression must have direct access (a matrix, map or block)");
  static_assert(plain::InnerStrideAtCompileTime == 1, "locmoe::as_view: the inner stride must be 1");
  using scalar = std::remove_reference_t<decltype(*m.data())>;
  const auto rows = static_cast<std::size_t>(m.rows()), cols = static_cast<std::size_t>(m.cols());
  return matrix_view<scalar>(m.data(), rows, cols, rows > 1 ? static_cast<std::size_t>(m.outerStride()) : cols);
}

}  // namespace detail

/// A view of an Eigen matrix, map or block with direct access, row-major storage and inner stride 1
/// (checked at compile time); a const expression gives a view of const elements.
template <class Derived>
auto as_view(Eigen::DenseBase<Derived>& m) {
  return detail::eigen_view(m.derived());
}
template <class Derived>
auto as_view(const Eigen::DenseBase<Derived>& m) {
  return detail::eigen_view(m.derived());
}

/// A half-open range of token rows [begin, end); kernels touch only these rows of every operand.
struct token_range {
  std::size_t begin = 0;
  std::size_t end = std::numeric_limits<std::size_t>::max();  ///< max: up to the last row
};

namespace detail {

inline std::string shape_text(std::size_t rows, std::size_t cols) {
  return std::to_string(rows) + "x" + std::to_string(cols);
}

/// Checks one operand: present (unless optional and absent), shape rows x cols, stride >= cols, its extent
/// addressable. Returns false after reporting through Policy.
template <class Policy, class T>
bool check_view(const char* function, const char* argument, const matrix_view<T>& v, std::size_t rows,
                std::size_t cols, const char* cols_rule) {
  const auto shape = [&] { return shape_text(v.rows, v.cols); };  // formatted only for a report: checks run per call
  if (v.rows != rows) {
    const std::string rule = "must have " + std::to_string(rows) + " rows (one per token)";
    Policy::report(error_report{errc::domain, function, argument, shape(), rule.c_str()}, 0);
    return false;
  }
  if (v.cols != cols) {
    Policy::report(error_report{errc::domain, function, argument, shape(), cols_rule}, 0);
    return false;
  }
  if (v.rows > 1 && v.stride < v.cols) {
    Policy::report(error_report{errc::domain, function, argument, "stride " + std::to_string(v.stride),
                                "row stride must be >= the number of columns"},
                   0);
    return false;
  }
  if (v.rows > 0 && v.cols > 0) {
    if (v.data == nullptr) {
      Policy::report(error_report{errc::domain, function, argument, shape(), "must not be null"}, 0);
      return false;
    }
    const std::size_t limit = std::numeric_limits<std::ptrdiff_t>::max() / sizeof(T);
    if (v.stride > limit || (v.rows - 1) > (limit - v.cols) / (v.stride == 0 ? 1 : v.stride)) {
      Policy::report(error_report{errc::overflow, function, argument, shape(), "extent overflows the address space"},
                     0);
      return false;
    }
  }
  return true;
}

/// One row operand of a row move (dispatch, combine, the exchange's moves): `rows` rows of d columns; throws.
template <class T>
void check_rows(const char* fn, const char* argument, const matrix_view<T>& v, std::size_t rows, std::size_t d) {
  check_view<construction_policy>(fn, argument, v, rows, d, "must have d columns, as the other operand");
}

/// Every entry of indices [T x k] an expert in [0, n) or no_expert; reports the first that is not.
template <class Policy>
bool check_indices(const char* function, const matrix_view<const expert_index>& indices, std::size_t n) {
  for (std::size_t t = 0; t < indices.rows; ++t) {
    for (std::size_t j = 0; j < indices.cols; ++j) {
      const expert_index e = indices(t, j);
      if (e < no_expert || e >= static_cast<expert_index>(n)) {
        Policy::report(error_report{errc::domain, function, "indices",
                                    "(" + std::to_string(t) + ", " + std::to_string(j) + ") = " + std::to_string(e),
                                    "every index must be an expert in [0, n) or no_expert (-1)"},
                       0);
        return false;
      }
    }
  }
  return true;
}

/// [begin, end) clipped to the rows; reports a begin past the end.
template <class Policy>
bool resolve_range(const char* function, token_range& range, std::size_t rows) {
  if (range.end > rows) range.end = rows;
  if (range.begin > range.end) {
    Policy::report(error_report{errc::domain, function, "range", std::to_string(range.begin),
                                "begin must be <= end and <= the number of tokens"},
                   0);
    return false;
  }
  return true;
}

}  // namespace detail
}  // namespace locmoe
