// The .npy reader of the locmoe tool (examples/locmoe/npy.hpp): any bytes either parse into an array whose data is
// exactly product(shape) * itemsize bytes of a supported dtype, or fail with a one-line usage_error. Anything
// else (another exception, a crash, a sanitizer report, a read past the input) is a finding.
#include "fuzz_input.hpp"

#include <locmoe/npy.hpp>

#include <cstdint>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace npy = locmoe::cli::npy;
  std::vector<unsigned char> bytes(data, data + size);
  npy::array a;
  try {
    a = npy::parse(std::move(bytes), "--fuzz input.npy");
  } catch (const locmoe::cli::usage_error& e) {
    const std::string message = e.what();
    LOCMOE_FUZZ_CHECK(message.rfind("--fuzz input.npy: ", 0) == 0, "the message names the source: " + message);
    LOCMOE_FUZZ_CHECK(message.find('\n') == std::string::npos, "one line: " + message);
    return 0;
  }
  const std::size_t item = npy::detail::itemsize(a.descr);
  LOCMOE_FUZZ_CHECK(item == 4 || item == 8, "a supported dtype: " + a.descr);
  LOCMOE_FUZZ_CHECK(a.descr[0] == '<', "little-endian: " + a.descr);
  std::size_t expected = item;
  for (const std::size_t d : a.shape) expected *= d;  // cannot wrap unless a dimension is 0 (then it ends at 0)
  LOCMOE_FUZZ_CHECK(a.data.size() == expected, "data bytes = product(shape) * itemsize");
  LOCMOE_FUZZ_CHECK(a.data.size() <= size, "no byte invented");
  return 0;
}
