// A small, strict reader of NumPy .npy files (format 1.0, 2.0 and 3.0) for the locmoe tool, and a format 1.0
// writer for its tests. Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
//
// Only little-endian, C-order float32/float64/int32/int64 arrays are read. Every failure is a usage_error of
// one line, "<flag> <path>: <the rule broken>", so the tool reports it and exits 2.
#pragma once

#include "cli.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

// Values are copied straight from the file's little-endian bytes.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "locmoe/npy.hpp assumes a little-endian host"
#endif

namespace locmoe::cli::npy {

/// A whole .npy array: its dtype ('<f4', '<f8', '<i4' or '<i8'; '=' is normalized to '<'), its shape and its
/// C-order bytes, exactly product(shape) * itemsize of them.
struct array {
  std::string descr;
  std::vector<std::size_t> shape;
  std::vector<unsigned char> data;
};

/// A row-major float32 matrix.
struct float_matrix {
  std::size_t rows = 0, cols = 0;
  std::vector<float> values;
};

namespace detail {

/// `at` is "<flag> <path>" (or the path alone without a flag).
[[noreturn]] inline void fail(const std::string& at, const std::string& rule) { throw usage_error(at + ": " + rule); }
inline std::string where(const std::string& path, const std::string& flag) {
  return flag.empty() ? path : flag + " " + path;
}

/// Bytes per element of a supported descr; 0 for any other.
inline std::size_t itemsize(const std::string& descr) {
  if (descr == "<f4" || descr == "<i4") return 4;
  if (descr == "<f8" || descr == "<i8") return 8;
  return 0;
}

inline std::string type_name(const std::string& descr) {
  return descr == "<f4" ? "float32" : descr == "<f8" ? "float64" : descr == "<i4" ? "int32" : "int64";
}

/// The shape as Python prints it: (), (5,), (40, 8).
inline std::string python_shape(const std::vector<std::size_t>& shape) {
  std::string text = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? ", " : "") + std::to_string(shape[i]);
  return text + (shape.size() == 1 ? ",)" : ")");
}

/// The shape as a size: "scalar", "5", "40x8".
inline std::string shape_extent(const std::vector<std::size_t>& shape) {
  std::string text = shape.empty() ? "scalar" : "";
  for (std::size_t i = 0; i < shape.size(); ++i) text += (i ? "x" : "") + std::to_string(shape[i]);
  return text;
}

/// The whole file, read in chunks so that pipes (`--logits <(...)`), which cannot tell their size, work too.
inline std::vector<unsigned char> read_file(const std::string& path, const std::string& at) {
  std::error_code error;
  if (std::filesystem::is_directory(path, error)) fail(at, "cannot open: is a directory");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(at, "cannot open");
  std::vector<unsigned char> bytes;
  if (std::filesystem::is_regular_file(path, error)) {
    const auto size = std::filesystem::file_size(path, error);
    if (!error) bytes.reserve(size);
  }
  char chunk[1 << 16];
  while (in.read(chunk, sizeof chunk), in.gcount() > 0) bytes.insert(bytes.end(), chunk, chunk + in.gcount());
  if (in.bad()) fail(at, "cannot read");
  return bytes;
}

/// Parses the header, a Python dict literal such as {'descr': '<f4', 'fortran_order': False, 'shape': (40, 8), }
/// with exactly those three keys, in any order.
class header_parser {
 public:
  header_parser(const std::string& text, const std::string& at) : text_(text), at_(at) {}

  void parse(std::string& descr, bool& fortran_order, std::vector<std::size_t>& shape) {
    bool seen_descr = false, seen_fortran_order = false, seen_shape = false;
    skip_space();
    expect('{');
    for (skip_space(); !take('}'); skip_space()) {
      const std::string key = string_literal("a key");
      skip_space();
      expect(':');
      skip_space();
      if (key == "descr") {
        mark_seen(seen_descr, key);
        if (peek() == '[') fail_("structured dtypes are not supported");
        descr = string_literal("'descr'");
      } else if (key == "fortran_order") {
        mark_seen(seen_fortran_order, key);
        fortran_order = boolean();
      } else if (key == "shape") {
        mark_seen(seen_shape, key);
        shape = tuple();
      } else {
        fail_("unknown key '" + key + "'");
      }
      skip_space();
      if (take('}')) break;
      expect(',');  // a comma before the '}' is allowed, as in Python
    }
    skip_space();  // numpy pads the header with spaces and a '\n'
    if (pos_ != text_.size()) fail_("unexpected text after the dict");
    if (!seen_descr) fail_("missing key 'descr'");
    if (!seen_fortran_order) fail_("missing key 'fortran_order'");
    if (!seen_shape) fail_("missing key 'shape'");
  }

 private:
  [[noreturn]] void fail_(const std::string& rule) const { fail(at_, "bad header: " + rule); }
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }
  bool take(char c) { return pos_ < text_.size() && text_[pos_] == c ? (++pos_, true) : false; }
  void expect(char c) {
    if (!take(c)) fail_(std::string("expected '") + c + "' at offset " + std::to_string(pos_));
  }
  void skip_space() { pos_ = std::min(text_.find_first_not_of(" \t\n\r", pos_), text_.size()); }
  void mark_seen(bool& seen, const std::string& key) const {
    if (seen) fail_("duplicate key '" + key + "'");
    seen = true;
  }
  // A quoted string without escapes; control characters are refused so that messages stay on one line.
  std::string string_literal(const std::string& what) {
    const char quote = peek();
    if (quote != '\'' && quote != '"') fail_(what + " must be a quoted string");
    std::string value;
    for (++pos_; !take(quote); ++pos_) {
      if (pos_ == text_.size()) fail_("unterminated string");
      const auto c = static_cast<unsigned char>(text_[pos_]);
      if (c < 0x20 || c == 0x7f || c == '\\') fail_("unsupported character in a string");
      value += text_[pos_];
    }
    return value;
  }
  bool boolean() {
    if (text_.compare(pos_, 4, "True") == 0) return pos_ += 4, true;
    if (text_.compare(pos_, 5, "False") == 0) return pos_ += 5, false;
    fail_("'fortran_order' must be True or False");
  }
  // (), (5,) or (40, 8): a one-element tuple needs its comma, as in Python.
  std::vector<std::size_t> tuple() {
    std::vector<std::size_t> dims;
    expect('(');
    bool comma_after_last = false;
    for (skip_space(); !take(')'); skip_space()) {
      dims.push_back(dimension());
      skip_space();
      comma_after_last = take(',');
      if (!comma_after_last && peek() != ')') fail_("expected ',' or ')' in 'shape'");
    }
    if (dims.size() == 1 && !comma_after_last) fail_("'shape' must be a tuple, like (5,)");
    return dims;
  }
  std::size_t dimension() {
    const std::size_t start = pos_;
    pos_ = std::min(text_.find_first_of(" \t\n\r,)", pos_), text_.size());
    const std::string token = text_.substr(start, pos_ - start);
    if (token.empty()) fail_("empty dimension in 'shape'");
    if (token[0] == '-' && token.size() > 1) fail_("dimension " + token + " in 'shape' is negative");
    std::size_t value = 0;
    for (const char c : token) {
      if (c < '0' || c > '9') fail_("dimension '" + token + "' in 'shape' is not an integer");
      const auto digit = static_cast<std::size_t>(c - '0');
      if (value > (std::numeric_limits<std::size_t>::max() - digit) / 10) fail_("dimension " + token + " is too large");
      value = value * 10 + digit;
    }
    return value;
  }

  const std::string& text_;
  const std::string& at_;
  std::size_t pos_ = 0;
};

}  // namespace detail

/// Parses the bytes of a whole .npy file and checks everything about them: magic, version, header, dtype (one of
/// the four supported, little-endian), C order, and that the data is exactly as long as the shape says. `at`
/// names the source in messages ("<flag> <path>"). tests/fuzz/fuzz_npy.cpp fuzzes this.
inline array parse(std::vector<unsigned char> bytes, const std::string& at) {
  if (bytes.size() < 6 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) {
    detail::fail(at, "not a .npy file (bad magic)");
  }
  if (bytes.size() < 8) detail::fail(at, "truncated: the file ends inside the preamble");
  const unsigned major = bytes[6], minor = bytes[7];
  if (major < 1 || major > 3 || minor != 0) {
    detail::fail(at, "unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                         " (supported: 1.0, 2.0, 3.0)");
  }
  const std::size_t length_size = major == 1 ? 2 : 4;  // the header length: uint16 LE in 1.0, uint32 LE after
  const std::size_t header_start = 8 + length_size;
  if (bytes.size() < header_start) detail::fail(at, "truncated: the file ends inside the preamble");
  std::size_t header_length = 0;
  for (std::size_t i = length_size; i-- > 0;) header_length = header_length << 8 | bytes[8 + i];
  if (header_length > bytes.size() - header_start) {
    detail::fail(at, "truncated: header of " + std::to_string(header_length) + " bytes but the file has " +
                         std::to_string(bytes.size() - header_start) + " bytes after the preamble");
  }
  const std::size_t data_start = header_start + header_length;
  const std::string header(bytes.begin() + static_cast<std::ptrdiff_t>(header_start),
                           bytes.begin() + static_cast<std::ptrdiff_t>(data_start));

  array result;
  bool fortran_order = false;
  detail::header_parser(header, at).parse(result.descr, fortran_order, result.shape);
  std::string& descr = result.descr;
  if (descr.size() == 3 && descr[0] == '=') descr[0] = '<';  // native order, and this host is little-endian
  if (descr.size() == 3 && descr[0] == '>' && detail::itemsize("<" + descr.substr(1)) != 0) {
    detail::fail(at, "dtype '" + descr + "' is big-endian; only little-endian is supported");
  }
  const std::size_t item = detail::itemsize(descr);
  if (item == 0) detail::fail(at, "unsupported dtype '" + descr + "' (supported: '<f4', '<f8', '<i4', '<i8')");
  // Rank 0 and 1 arrays have the same layout in both orders.
  if (fortran_order && result.shape.size() > 1) detail::fail(at, "Fortran order is not supported");

  // Overflow-checked unless a dimension is 0: the array is then empty whatever the others are (and a product
  // that wrapped, which is well defined for size_t, still ends at 0).
  const bool empty = std::find(result.shape.begin(), result.shape.end(), std::size_t{0}) != result.shape.end();
  std::size_t expected = item;
  for (const std::size_t d : result.shape) {
    if (!empty && expected > std::numeric_limits<std::size_t>::max() / d) {
      detail::fail(at, "shape " + detail::python_shape(result.shape) + " is too large");
    }
    expected *= d;
  }
  const std::size_t found = bytes.size() - data_start;
  if (found < expected) {
    detail::fail(at, "truncated: header says " + detail::shape_extent(result.shape) + " " + detail::type_name(descr) +
                         " (" + std::to_string(expected) + " bytes) but the file has " + std::to_string(found) +
                         " data bytes");
  }
  if (found > expected) detail::fail(at, "has " + std::to_string(found - expected) + " bytes after the data");
  bytes.erase(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(data_start));  // no second buffer
  result.data = std::move(bytes);
  return result;
}

/// Reads a whole .npy file and checks it as parse() does.
inline array read(const std::string& path, const std::string& flag) {
  const std::string at = detail::where(path, flag);
  return parse(detail::read_file(path, at), at);
}

namespace detail {

/// read(), then the dtype (one of `descrs`) and the rank that a typed reader needs.
inline array read_as(const std::string& path, const std::string& flag, const std::vector<std::string>& descrs,
                     std::size_t rank) {
  array a = read(path, flag);
  if (std::find(descrs.begin(), descrs.end(), a.descr) == descrs.end()) {
    std::string wanted;
    for (const std::string& d : descrs) wanted += (wanted.empty() ? "" : " or ") + type_name(d) + " ('" + d + "')";
    fail(where(path, flag), "dtype '" + a.descr + "' is not " + wanted);
  }
  if (a.shape.size() != rank) {
    fail(where(path, flag), "must be " + std::to_string(rank) + "-D, has shape " + python_shape(a.shape));
  }
  return a;
}

}  // namespace detail

/// A 2-D float32 ('<f4') matrix with at least one column; 0 rows (an empty batch) are allowed.
inline float_matrix read_float32_matrix(const std::string& path, const std::string& flag) {
  const array a = detail::read_as(path, flag, {"<f4"}, 2);
  if (a.shape[1] == 0) detail::fail(detail::where(path, flag), "must have at least one column");
  float_matrix m{a.shape[0], a.shape[1], std::vector<float>(a.shape[0] * a.shape[1])};
  if (!a.data.empty()) std::memcpy(m.values.data(), a.data.data(), a.data.size());
  return m;
}

/// A 1-D float32 ('<f4') vector.
inline std::vector<float> read_float32_vector(const std::string& path, const std::string& flag) {
  const array a = detail::read_as(path, flag, {"<f4"}, 1);
  std::vector<float> values(a.shape[0]);
  if (!a.data.empty()) std::memcpy(values.data(), a.data.data(), a.data.size());
  return values;
}

/// A 1-D int32 ('<i4') or int64 ('<i8') vector; int64 values must each fit int32. (numpy's default integer
/// type is int64, so index files often arrive as '<i8'.)
inline std::vector<std::int32_t> read_int32_vector(const std::string& path, const std::string& flag) {
  const array a = detail::read_as(path, flag, {"<i4", "<i8"}, 1);
  std::vector<std::int32_t> values(a.shape[0]);
  if (a.descr == "<i4") {
    if (!a.data.empty()) std::memcpy(values.data(), a.data.data(), a.data.size());
    return values;
  }
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::int64_t v = 0;
    std::memcpy(&v, a.data.data() + i * sizeof v, sizeof v);
    if (v < std::numeric_limits<std::int32_t>::min() || v > std::numeric_limits<std::int32_t>::max()) {
      detail::fail(detail::where(path, flag),
                   "value " + std::to_string(v) + " at index " + std::to_string(i) + " does not fit int32");
    }
    values[i] = static_cast<std::int32_t>(v);
  }
  return values;
}

/// Writes a format 1.0 .npy file as np.save does: the header is padded with spaces and a final '\n' so that
/// the data starts at a multiple of 64 bytes. descr is one of the four supported; `bytes` must match the shape.
/// Throws std::invalid_argument on bad arguments, std::runtime_error when the file cannot be written.
inline void write(const std::string& path, const std::string& descr, const std::vector<std::size_t>& shape,
                  const void* data, std::size_t bytes) {
  const std::size_t item = detail::itemsize(descr);
  if (item == 0) throw std::invalid_argument("npy::write: unsupported dtype '" + descr + "'");
  std::size_t count = 1;
  for (const std::size_t d : shape) count *= d;
  if (count * item != bytes) throw std::invalid_argument("npy::write: the byte count does not match the shape");

  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + detail::python_shape(shape);
  header += ", }";
  const std::size_t preamble_size = 10, unpadded = preamble_size + header.size() + 1;  // + 1: the final '\n'
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  if (header.size() > 0xffff) throw std::invalid_argument("npy::write: the header does not fit format 1.0");

  const char preamble[preamble_size] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0,
                                        static_cast<char>(header.size() & 0xff), static_cast<char>(header.size() >> 8)};
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(preamble, preamble_size);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  if (bytes != 0) out.write(static_cast<const char*>(data), static_cast<std::streamsize>(bytes));
  out.close();
  if (!out) throw std::runtime_error("npy::write: " + path + ": cannot write");
}

}  // namespace locmoe::cli::npy
