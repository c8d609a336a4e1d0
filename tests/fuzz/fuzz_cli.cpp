// The locmoe tool's flag parsing and validation (examples/locmoe): the fuzzer picks a subcommand, then flags from
// that subcommand's own option list (so a new flag is fuzzed without a change here) and values from a palette of
// boundaries (0, -1, NaN, inf, 1e308, integers that overflow, fixture files that are malformed). The tool's
// contract (examples/locmoe/main.cpp): success, or a CLI11 parse error or a usage_error of one line. Any other
// exception is what the tool reports as "internal error" (exit 1): a finding, as is any crash or sanitizer report.
// `simulate` starts from a 2 x 2 cluster and 2 steps and only gets small sizes, so each input stays fast.
#include "fuzz_input.hpp"

#include "locmoe/cli.hpp"

#include <cstdint>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifndef LOCMOE_TEST_DATA_DIR
#  error "LOCMOE_TEST_DATA_DIR must name tests/data"
#endif

namespace {

const char* const general_values[] = {
    "0", "1", "2", "3", "-1", "0.5", "0.03", "1e-300", "1e308", "5e-324", "nan", "inf", "-inf", "-0", "16", "64",
    "4096", "4097", "5120", "9007199254740993", "9223372036854775807", "-9223372036854775808",
    "99999999999999999999", "", "x", "1,2", "2,5120", "2,,3", "0x10", " 1", "1e3", "89.9", "90", "all", "64N",
    "128N,256N", "bogus", "probs", "position", "grap", "softmax", "sigmoid", "switch", "hash", "rre", "locmoe",
    "node_limited", "topk", "pangu", "ascend-910", "dgx-a100"};
// Simulate's sizes stay small: the fuzzer checks validation there, not a long simulation.
const char* const simulate_values[] = {"0", "1", "2", "3", "4", "8", "-1", "", "x", "0.5", "nan", "inf", "-inf",
                                       "1e308", "-0", "9223372036854775807", "all", "64N,bogus", "bogus", "switch",
                                       "hash,locmoe", "rre,,", "ascend-910"};
const char* const files[] = {"route/logits_8x4.npy", "route/hidden_8x16.npy", "route/bias_4.npy",
                             "route/domain_8.npy", "route/expert_rank_4.npy", "route/grad_weights_8x1.npy",
                             "route/grad_weights_8x2.npy", "route/grad_weights_nan_8x1.npy", "npy/f4_0x8.npy",
                             "npy/f4_3x4.npy", "npy/f4_4.npy", "npy/f8_3x4.npy", "npy/i4_3.npy", "npy/i8_3.npy",
                             "npy/i8_too_big.npy", "npy/f4_truncated.npy", "npy/bad_magic.npy", "npy/"};

template <std::size_t N>
std::string pick(locmoe_fuzz::input& in, const char* const (&values)[N]) {
  return values[in.size_between(0, N - 1)];
}

// Sends std::cout and std::cerr to a string for the duration of one input.
class silence {
 public:
  silence() : out_(std::cout.rdbuf(sink_.rdbuf())), err_(std::cerr.rdbuf(sink_.rdbuf())) {}
  ~silence() {
    std::cout.rdbuf(out_);
    std::cerr.rdbuf(err_);
  }
  silence(const silence&) = delete;
  silence& operator=(const silence&) = delete;

 private:
  std::ostringstream sink_;
  std::streambuf* out_;
  std::streambuf* err_;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  locmoe_fuzz::input in(data, size);
  CLI::App app{"locmoe", "locmoe"};
  app.require_subcommand(1);
  locmoe::cli::add_capacity_commands(app);
  locmoe::cli::add_route_command(app);
  locmoe::cli::add_simulate_command(app);

  const auto subcommands = app.get_subcommands({});
  CLI::App* sub = subcommands[in.size_between(0, subcommands.size() - 1)];
  const bool simulate = sub->get_name() == "simulate";
  std::vector<std::string> args{"locmoe", sub->get_name()};
  if (simulate) {
    for (const char* a : {"--quiet", "--nodes", "2", "--ranks-per-node", "2", "--experts", "4", "--steps", "2",
                          "--tokens-per-rank", "8", "--features", "8", "--adapter-rank", "2", "--topics", "2"})
      args.emplace_back(a);
  }
  const auto options = sub->get_options();
  for (std::size_t count = in.size_between(0, 8); count-- > 0;) {
    const std::uint8_t kind = in.raw<std::uint8_t>() % 16;
    if (kind == 0) {  // anything at all
      args.push_back(in.text(24));
      continue;
    }
    const CLI::Option* option = options[in.size_between(0, options.size() - 1)];
    if (option->get_lnames().empty()) continue;  // --help and positionals have no long name to fuzz
    args.push_back("--" + option->get_lnames().front());
    if (option->get_type_size() == 0) continue;  // a flag: no value
    const std::string& name = args.back();
    const bool file = name.find("file") != std::string::npos || name == "--logits" ||
                      (name == "--hidden" && sub->get_name() == "route") || name == "--expert-bias" ||
                      name == "--grad-weights" || name == "--expert-rank" || name == "--token-rank" ||
                      name == "--token-id" || name == "--domain";
    if (file && kind % 4 != 1) {
      args.push_back(std::string(LOCMOE_TEST_DATA_DIR) + "/" + pick(in, files));
    } else if (kind == 1) {
      args.push_back(in.text(24));
    } else {
      args.push_back(simulate ? pick(in, simulate_values) : pick(in, general_values));
    }
  }

  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  silence quiet;
  try {
    app.parse(static_cast<int>(argv.size()), argv.data());
  } catch (const CLI::Success&) {
  } catch (const CLI::ParseError&) {
  } catch (const locmoe::cli::usage_error& e) {
    const std::string message = e.what();
    LOCMOE_FUZZ_CHECK(!message.empty(), "a usage error says what is wrong");
  } catch (const std::exception& e) {
    std::string line;
    for (const std::string& a : args) line += a + ' ';
    locmoe_fuzz::fail(std::string("internal error (exit 1): ") + e.what() + "\n  args: " + line);
  }
  return 0;
}
