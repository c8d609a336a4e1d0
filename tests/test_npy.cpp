// The locmoe tool's .npy reader (examples/locmoe/npy.hpp): numpy's own files (tests/data/npy, made by
// make_fixtures.py) accepted or refused with a one-line message, hand-made headers for the parser's rules, and
// write() -> read() round trips.
#include "locmoe/npy.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace npy = locmoe::cli::npy;
namespace fs = std::filesystem;

namespace {

std::string fixture(const std::string& name) { return std::string(LOCMOE_TEST_DATA_DIR) + "/npy/" + name; }

/// A fresh folder under the system's temporary directory, removed with everything in it at scope exit.
struct temp_dir {
  fs::path path;
  temp_dir() {
    std::random_device seed;
    const auto now = std::chrono::steady_clock::now().time_since_epoch().count();
    path = fs::temp_directory_path() / ("locmoe_test_npy_" + std::to_string(now) + "_" + std::to_string(seed()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
  temp_dir(const temp_dir&) = delete;
  temp_dir& operator=(const temp_dir&) = delete;
  std::string file(const std::string& name) const { return (path / name).string(); }
};

/// A .npy file with the given header text and data bytes, for the rules numpy itself never breaks.
std::string write_raw(const temp_dir& dir, const std::string& header, const std::string& data, unsigned major = 1,
                      unsigned minor = 0) {
  std::string bytes = "\x93NUMPY";
  bytes += static_cast<char>(major);
  bytes += static_cast<char>(minor);
  const std::size_t length_size = major == 1 ? 2 : 4;
  for (std::size_t i = 0; i < length_size; ++i) bytes += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  bytes += header + data;
  const std::string path = dir.file("raw.npy");
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::string header(const std::string& descr, const std::string& shape, const std::string& fortran = "False") {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }\n";
}

/// The message of the usage_error that `read` throws, checked to be one line; "" if it throws none.
std::string failure(const std::function<void()>& read) {
  try {
    read();
  } catch (const locmoe::cli::usage_error& e) {
    const std::string message = e.what();
    CHECK_MESSAGE(message.find('\n') == std::string::npos, message);
    return message;
  }
  return "";
}

#define CHECK_FAILS_WITH(expression, expected)                                          \
  do {                                                                                  \
    const std::string message_ = failure([&] { (void)(expression); });                  \
    CHECK_MESSAGE(message_.find(expected) != std::string::npos, "message: " << message_); \
  } while (false)

std::vector<unsigned char> file_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("npy: numpy's float32 matrices are read, in format 1.0 and 2.0") {
  for (const char* name : {"f4_3x4.npy", "f4_v2.npy"}) {
    CAPTURE(name);
    const npy::float_matrix m = npy::read_float32_matrix(fixture(name), "--logits");
    CHECK(m.rows == 3);
    CHECK(m.cols == 4);
    REQUIRE(m.values.size() == 12);
    for (std::size_t i = 0; i < 12; ++i) CHECK(m.values[i] == static_cast<float>(i));
  }
  const npy::array a = npy::read(fixture("f4_3x4.npy"), "--logits");
  CHECK(a.descr == "<f4");
  CHECK(a.shape == std::vector<std::size_t>{3, 4});
  CHECK(a.data.size() == 48);
}

TEST_CASE("npy: a matrix with 0 rows is an empty batch; 0 columns are refused") {
  const npy::float_matrix m = npy::read_float32_matrix(fixture("f4_0x8.npy"), "--logits");
  CHECK(m.rows == 0);
  CHECK(m.cols == 8);
  CHECK(m.values.empty());

  temp_dir dir;
  npy::write(dir.file("3x0.npy"), "<f4", {3, 0}, nullptr, 0);
  CHECK_FAILS_WITH(npy::read_float32_matrix(dir.file("3x0.npy"), "--logits"), "must have at least one column");
  CHECK(npy::read(dir.file("3x0.npy"), "--logits").data.empty());  // a valid .npy all the same
}

TEST_CASE("npy: vectors: float32, and int32 from int32 or int64") {
  CHECK(npy::read_float32_vector(fixture("f4_4.npy"), "--bias") == std::vector<float>{0.5f, -1.0f, 2.25f, 3.0f});
  const std::vector<std::int32_t> extremes{std::numeric_limits<std::int32_t>::min(), 7,
                                           std::numeric_limits<std::int32_t>::max()};
  CHECK(npy::read_int32_vector(fixture("i4_3.npy"), "--token-rank") == extremes);
  CHECK(npy::read_int32_vector(fixture("i8_3.npy"), "--token-rank") == extremes);
}

TEST_CASE("npy: numpy's files that break a rule are refused with the flag, the file and the rule") {
  const std::string truncated = fixture("f4_truncated.npy");
  CHECK(failure([&] { npy::read(truncated, "--logits"); }) ==
        "--logits " + truncated + ": truncated: header says 3x4 float32 (48 bytes) but the file has 44 data bytes");
  CHECK_FAILS_WITH(npy::read(fixture("f4_trailing.npy"), "--logits"), "has 4 bytes after the data");
  CHECK_FAILS_WITH(npy::read(fixture("bad_magic.npy"), "--logits"), "bad_magic.npy: not a .npy file (bad magic)");
  CHECK_FAILS_WITH(npy::read(fixture("f4_big_endian.npy"), "--logits"), "dtype '>f4' is big-endian");
  CHECK_FAILS_WITH(npy::read(fixture("f4_fortran.npy"), "--logits"), "Fortran order is not supported");
  CHECK_FAILS_WITH(npy::read(fixture("no_such_file.npy"), "--logits"), "no_such_file.npy: cannot open");
  CHECK_FAILS_WITH(npy::read(fixture(""), "--logits"), "npy/: cannot open: is a directory");

  CHECK(npy::read(fixture("f8_3x4.npy"), "--logits").descr == "<f8");  // a valid file, of the wrong dtype:
  CHECK_FAILS_WITH(npy::read_float32_matrix(fixture("f8_3x4.npy"), "--logits"),
                   "--logits " + fixture("f8_3x4.npy") + ": dtype '<f8' is not float32 ('<f4')");
  CHECK_FAILS_WITH(npy::read_float32_vector(fixture("i4_3.npy"), "--bias"), "dtype '<i4' is not float32 ('<f4')");
  CHECK_FAILS_WITH(npy::read_int32_vector(fixture("f4_4.npy"), "--token-rank"),
                   "dtype '<f4' is not int32 ('<i4') or int64 ('<i8')");
  CHECK_FAILS_WITH(npy::read_float32_matrix(fixture("f4_4.npy"), "--logits"), "must be 2-D, has shape (4,)");
  CHECK_FAILS_WITH(npy::read_float32_vector(fixture("f4_3x4.npy"), "--bias"), "must be 1-D, has shape (3, 4)");
  CHECK_FAILS_WITH(npy::read_int32_vector(fixture("i8_too_big.npy"), "--token-rank"),
                   "value 1099511627776 at index 1 does not fit int32");
}

TEST_CASE("npy: the header dict: keys in any order, quotes, '=' order, scalars, version 3.0") {
  temp_dir dir;
  const std::string one_float(4, '\0');
  auto path = write_raw(dir, "{\"shape\": (1, 1), 'fortran_order': False, \"descr\": '=f4'}", one_float);
  CHECK(npy::read_float32_matrix(path, "--logits").values == std::vector<float>{0.0f});
  CHECK(npy::read(path, "").descr == "<f4");  // '=' is this little-endian host's order
  path = write_raw(dir, header("<f4", "()"), one_float);
  CHECK(npy::read(path, "--x").shape.empty());
  CHECK_FAILS_WITH(npy::read_float32_vector(path, "--bias"), "must be 1-D, has shape ()");
  CHECK(npy::read(write_raw(dir, header("<i4", "(1,)"), one_float, 3), "--x").shape.size() == 1);
  CHECK(npy::read(write_raw(dir, header("<i4", "(1,)", "True"), one_float), "--x").shape.size() == 1);  // 1-D
  path = write_raw(dir, header("<i8", "( 0 , 7 )"), "");
  CHECK(npy::read(path, "--x").shape == std::vector<std::size_t>{0, 7});
  CHECK_FAILS_WITH(npy::read_int32_vector(path, "--token-rank"), "must be 1-D, has shape (0, 7)");
  CHECK(npy::read(write_raw(dir, header("<f8", "(0, 18446744073709551615)"), ""), "--x").data.empty());
}

TEST_CASE("npy: headers that break a rule are refused") {
  temp_dir dir;
  const std::string one_float(4, '\0');
  const auto refused = [&](const std::string& text, const std::string& data, const std::string& expected,
                           unsigned major = 1, unsigned minor = 0) {
    CAPTURE(text);
    CHECK_FAILS_WITH(npy::read(write_raw(dir, text, data, major, minor), "--logits"), expected);
  };
  refused(header("<f4", "(1,)"), one_float, "unsupported .npy format version 4.0", 4);
  refused(header("<f4", "(1,)"), one_float, "unsupported .npy format version 1.1", 1, 1);
  refused("{'descr': '<f4', 'shape': (1,)}", one_float, "bad header: missing key 'fortran_order'");
  refused("{'fortran_order': False, 'shape': (1,)}", one_float, "bad header: missing key 'descr'");
  refused("{'descr': '<f4', 'fortran_order': False}", one_float, "bad header: missing key 'shape'");
  refused(header("<f4", "(1,), 'extra': 1"), one_float, "bad header: unknown key 'extra'");
  refused(header("<f4", "(1,), 'shape': (1,)"), one_float, "bad header: duplicate key 'shape'");
  refused(header("<f4", "(-1,)"), "", "dimension -1 in 'shape' is negative");
  refused(header("<f4", "(1.0,)"), one_float, "dimension '1.0' in 'shape' is not an integer");
  refused(header("<f4", "(n,)"), one_float, "dimension 'n' in 'shape' is not an integer");
  refused(header("<f4", "(1)"), one_float, "'shape' must be a tuple");
  refused(header("<f4", "(1,,)"), one_float, "empty dimension");
  refused(header("<f4", "(99999999999999999999999,)"), one_float, "dimension 99999999999999999999999 is too large");
  refused(header("<f4", "(4294967296, 4294967296)"), one_float, "shape (4294967296, 4294967296) is too large");
  refused(header("<f4", "(1,)", "0"), one_float, "'fortran_order' must be True or False");
  refused(header("<f2", "(2,)"), one_float, "unsupported dtype '<f2' (supported: '<f4', '<f8', '<i4', '<i8')");
  refused(header("|u1", "(4,)"), one_float, "unsupported dtype '|u1'");
  refused(header(">i8", "(1,)"), one_float, "dtype '>i8' is big-endian");
  refused("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1,)}", one_float, "structured dtypes");
  refused("{'descr': '<f4\n', 'fortran_order': False, 'shape': (1,)}", one_float, "unsupported character");
  refused("{'descr': '<f4", one_float, "unterminated string");
  refused("{'descr': '<f4', 'fortran_order': False, 'shape': (1,)} x", one_float, "unexpected text after the dict");
  refused("'descr': '<f4'", one_float, "bad header: expected '{' at offset 0");
  refused(header("<f4", "(2,)"), one_float, "header says 2 float32 (8 bytes) but the file has 4 data bytes");

  const std::string path = dir.file("short.npy");
  std::ofstream(path, std::ios::binary) << "\x93NUMPY\x01";
  CHECK_FAILS_WITH(npy::read(path, "--logits"), "truncated: the file ends inside the preamble");
  std::ofstream(path, std::ios::binary | std::ios::trunc) << std::string("\x93NUMPY\x01\x00\xff\x00{}", 12);
  CHECK_FAILS_WITH(npy::read(path, "--logits"), "truncated: header of 255 bytes but the file has 2 bytes");
}

TEST_CASE("npy: write() -> read() round trips every dtype, laid out as numpy lays it out") {
  temp_dir dir;
  const std::vector<float> f4{1.5f, -2.0f, 0.0f, 3.25f, -0.125f, 1e30f};
  npy::write(dir.file("f4.npy"), "<f4", {2, 3}, f4.data(), f4.size() * sizeof(float));
  const npy::float_matrix m = npy::read_float32_matrix(dir.file("f4.npy"), "--logits");
  CHECK(m.rows == 2);
  CHECK(m.cols == 3);
  CHECK(m.values == f4);

  const std::vector<double> f8{1.0 / 3.0, -1e300, 0.0};
  npy::write(dir.file("f8.npy"), "<f8", {3}, f8.data(), f8.size() * sizeof(double));
  const npy::array a8 = npy::read(dir.file("f8.npy"), "--x");
  CHECK(a8.descr == "<f8");
  REQUIRE(a8.data.size() == sizeof(double) * 3);
  CHECK(std::memcmp(a8.data.data(), f8.data(), a8.data.size()) == 0);

  const std::vector<std::int32_t> i4{-5, 0, 2147483647, -2147483647 - 1};
  npy::write(dir.file("i4.npy"), "<i4", {4}, i4.data(), i4.size() * sizeof(std::int32_t));
  CHECK(npy::read_int32_vector(dir.file("i4.npy"), "--token-rank") == i4);

  const std::vector<std::int64_t> i8{-5, 0, 2147483647, -2147483647 - 1};
  npy::write(dir.file("i8.npy"), "<i8", {4}, i8.data(), i8.size() * sizeof(std::int64_t));
  CHECK(npy::read(dir.file("i8.npy"), "--x").descr == "<i8");
  CHECK(npy::read_int32_vector(dir.file("i8.npy"), "--token-rank") == i4);

  // The same bytes as numpy's np.save, whose header ends where the data starts on a 64-byte boundary.
  std::vector<float> counting(12);
  for (std::size_t i = 0; i < counting.size(); ++i) counting[i] = static_cast<float>(i);
  npy::write(dir.file("counting.npy"), "<f4", {3, 4}, counting.data(), counting.size() * sizeof(float));
  const std::vector<unsigned char> ours = file_bytes(dir.file("counting.npy"));
  CHECK(ours == file_bytes(fixture("f4_3x4.npy")));
  CHECK((ours.size() - counting.size() * sizeof(float)) % 64 == 0);

  CHECK_THROWS_AS(npy::write(dir.file("bad.npy"), "<f2", {1}, f4.data(), 2), std::invalid_argument);
  CHECK_THROWS_AS(npy::write(dir.file("bad.npy"), "<f4", {2}, f4.data(), 4), std::invalid_argument);
  CHECK_THROWS_AS(npy::write(dir.file("no_such_dir/x.npy"), "<f4", {1}, f4.data(), 4), std::runtime_error);
}
