// locmoe_layer_driver: runs the whole-layer reference of tests/layer_reference.hpp (gate -> score_route ->
// capacity_assigner -> dispatch -> linear experts -> combine -> L = sum(y R) + aux + z + locality, and its backward
// through the library's backwards) on inputs read from .npy files, and writes the loss, the gradients and the routed
// experts as .npy files, for test_layer_torch.py to compare with the same layer in PyTorch autograd.
//
// Usage: locmoe_layer_driver DIR [--out DIR] [--dense] [--score softmax|sigmoid] [--after-topk] [--renormalize]
//                            [--k K] [--drops] [--aux C] [--z C] [--loc C]
// Reads from DIR (float64 unless said): x [T d], gate_weight [n d], gate_bias [n], expert_weight [n d d],
//   upstream [T d] (dL/dy), token_rank [T] (int32 or int64, in [0, 2)).
// Writes into --out (default DIR): loss (0-d float64), grad_x [T d], grad_gate_weight [n d] (--dense only),
//   grad_gate_bias [n], grad_expert_weight [n d d], routed [T k] (int32, the experts score_route chose, best first).
// Topology as layer_reference.hpp: 2 ranks, 1 rank per node, experts in blocks (expert e on rank floor(2 e / n)).
// --drops: capacity T k / n (integer division) with the position policy; otherwise dropless (C = the largest load).
// Exit status: 0, 2 on a usage error (bad flag, file, dtype or shape), 1 when the library throws.
#include "layer_reference.hpp"

#include <locmoe/npy.hpp>

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <vector>

namespace {

namespace npy = locmoe::cli::npy;
using locmoe::cli::usage_error;

std::string join(const std::string& dir, const std::string& name) { return dir + "/" + name + ".npy"; }

/// A float64 array of exactly `shape`.
std::vector<double> read_f8(const std::string& dir, const std::string& name, const std::vector<std::size_t>& shape) {
  const std::string path = join(dir, name);
  const npy::array a = npy::read(path, "");
  if (a.descr != "<f8") throw usage_error(path + ": dtype '" + a.descr + "' is not float64 ('<f8')");
  if (a.shape != shape) {
    throw usage_error(path + ": shape " + npy::detail::python_shape(a.shape) + ", expected " +
                      npy::detail::python_shape(shape));
  }
  std::vector<double> values(a.data.size() / sizeof(double));
  if (!a.data.empty()) std::memcpy(values.data(), a.data.data(), a.data.size());
  return values;
}

/// The shape of a float64 array of the given rank (to learn T, d and n from the files).
std::vector<std::size_t> shape_of(const std::string& dir, const std::string& name, std::size_t rank) {
  const std::string path = join(dir, name);
  const npy::array a = npy::read(path, "");
  if (a.shape.size() != rank) {
    throw usage_error(path + ": must be " + std::to_string(rank) + "-D, has shape " + npy::detail::python_shape(a.shape));
  }
  return a.shape;
}

void write_f8(const std::string& dir, const std::string& name, const std::vector<std::size_t>& shape,
              const std::vector<double>& values) {
  npy::write(join(dir, name), "<f8", shape, values.data(), values.size() * sizeof(double));
}

double parse_double(const std::string& flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  const double v = std::strtod(text, &end);
  if (end == text || *end != '\0' || errno == ERANGE) throw usage_error(flag + " = " + text + ": must be a number");
  return v;
}

std::size_t parse_count(const std::string& flag, const char* text) {
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 10);
  if (end == text || *end != '\0' || errno == ERANGE || text[0] == '-' || v == 0 || v > 4096) {
    throw usage_error(flag + " = " + text + ": must be an integer in [1, 4096]");
  }
  return static_cast<std::size_t>(v);
}

int run(int argc, char** argv) {
  std::string in_dir, out_dir;
  locmoe_test::layer_case c;
  double aux = 0.1, z = 0.05, loc = 0.1;
  bool after_topk = false, sigmoid = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) throw usage_error(arg + ": needs a value");
      return argv[++i];
    };
    if (arg == "--dense") {
      c.dense = true;
    } else if (arg == "--score") {
      const std::string s = value();
      if (s != "softmax" && s != "sigmoid") throw usage_error("--score = " + s + ": must be softmax or sigmoid");
      sigmoid = s == "sigmoid";
    } else if (arg == "--after-topk") {
      after_topk = true;
    } else if (arg == "--renormalize") {
      c.renormalize = true;
    } else if (arg == "--k") {
      c.k = parse_count(arg, value());
    } else if (arg == "--drops") {
      c.drops = true;
    } else if (arg == "--aux") {
      aux = parse_double(arg, value());
    } else if (arg == "--z") {
      z = parse_double(arg, value());
    } else if (arg == "--loc") {
      loc = parse_double(arg, value());
    } else if (arg == "--out") {
      out_dir = value();
    } else if (!arg.empty() && arg[0] != '-' && in_dir.empty()) {
      in_dir = arg;
    } else {
      throw usage_error(arg + ": unknown argument");
    }
  }
  if (in_dir.empty()) throw usage_error("usage: locmoe_layer_driver DIR [options] (see the source's header)");
  if (out_dir.empty()) out_dir = in_dir;
  if (sigmoid && (after_topk || c.renormalize)) {
    throw usage_error("--after-topk and --renormalize apply to --score softmax only");
  }
  if (after_topk && c.renormalize) throw usage_error("--renormalize applies to softmax before Top-k only");
  c.score = sigmoid ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
  c.softmax_before_topk = !after_topk;

  const std::vector<std::size_t> x_shape = shape_of(in_dir, "x", 2), b_shape = shape_of(in_dir, "gate_bias", 1);
  locmoe_test::layer_params p;
  p.tokens = x_shape[0];
  p.d = x_shape[1];
  p.n = b_shape[0];
  const std::size_t T = p.tokens, d = p.d, n = p.n;
  if (c.k > n) throw usage_error("--k = " + std::to_string(c.k) + ": must be <= n = " + std::to_string(n));
  p.x = read_f8(in_dir, "x", {T, d});
  p.gate_weight = read_f8(in_dir, "gate_weight", {n, d});
  p.gate_bias = read_f8(in_dir, "gate_bias", {n});
  p.expert_weight = read_f8(in_dir, "expert_weight", {n, d, d});
  p.upstream = read_f8(in_dir, "upstream", {T, d});
  p.token_rank = npy::read_int32_vector(join(in_dir, "token_rank"), "");
  if (p.token_rank.size() != T) {
    throw usage_error(join(in_dir, "token_rank") + ": has " + std::to_string(p.token_rank.size()) + " values, expected T = " +
                      std::to_string(T));
  }
  p.aux = aux;
  p.z = z;
  p.loc = loc;

  const locmoe_test::layer_gradients g = locmoe_test::run_layer(p, c, true);
  write_f8(out_dir, "loss", {}, {g.loss});
  write_f8(out_dir, "grad_x", {T, d}, g.x);
  if (c.dense) write_f8(out_dir, "grad_gate_weight", {n, d}, g.gate_weight);
  write_f8(out_dir, "grad_gate_bias", {n}, g.gate_bias);
  write_f8(out_dir, "grad_expert_weight", {n, d, d}, g.expert_weight);
  npy::write(join(out_dir, "routed"), "<i4", {T, c.k}, g.routed.data(), g.routed.size() * sizeof(locmoe::expert_index));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const usage_error& e) {
    std::cerr << "locmoe_layer_driver: " << e.what() << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "locmoe_layer_driver: " << e.what() << '\n';
    return 1;
  }
}
