// examples/torch/ops_common.hpp - what the operators of locmoe_torch_ops.cpp, locmoe_torch_rows.cpp and
// locmoe_torch_routers.cpp share: the pool they run on, argument checks, dtype dispatch and token ranges.
#pragma once

#include <locmoe/backend/cpu.hpp>
#include <locmoe/routers.hpp>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace locmoe_torch_ops {

using at::Tensor;



/// The CPU backend on a pool of at::get_num_threads() threads, rebuilt when that number changes. One operator
/// runs at a time (the pool serves one caller): the lock is held for the whole call. Fork-safe: the lock is taken
/// around fork(), and a child process (whose copy of the pool has no threads) leaks the copy and starts its own.
class backend_lease {
 public:
  backend_lease() : lock_(mutex()) {
    auto& s = state();
    const auto threads = static_cast<std::size_t>(std::max(1, at::get_num_threads()));
    if (s.owner != ::getpid()) {  // forked: the workers were not copied; joining them would hang
      static_cast<void>(s.backend.release());
      static_cast<void>(s.pool.release());
    }
    if (!s.pool || s.pool->threads() != threads) {
      s.backend.reset();
      s.pool = std::make_unique<locmoe::thread_pool>(threads);
      s.backend = std::make_unique<locmoe::cpu_backend>(*s.pool);
      s.owner = ::getpid();
    }
  }
  const locmoe::cpu_backend& operator*() const { return *state().backend; }
  const locmoe::cpu_backend* operator->() const { return state().backend.get(); }
  locmoe::thread_pool& pool() const { return *state().pool; }

 private:
  struct shared {
    std::unique_ptr<locmoe::thread_pool> pool;
    std::unique_ptr<locmoe::cpu_backend> backend;
    pid_t owner = 0;
  };
  static std::mutex& mutex() {
    static std::mutex m;
    static std::once_flag hooks;
    std::call_once(hooks, [] {  // no operator is mid-call in the child: the forking thread holds the lock
      ::pthread_atfork([] { m.lock(); }, [] { m.unlock(); }, [] { m.unlock(); });
    });
    return m;
  }
  static shared& state() {
    static shared s;
    return s;
  }
  std::lock_guard<std::mutex> lock_;
};

/// Runs fn on the call's arguments, turning locmoe's argument errors into Python's ValueError.
template <class Fn>
auto checked(Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const locmoe::error& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

inline void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "locmoe_torch: ", name, " must be a CPU tensor (got ", t.device(), ")");
}

inline void check_matrix(const Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, "locmoe_torch: ", name, " must be 2-D [rows, columns] (got ", t.dim(), "-D)");
}

inline bool is_row_dtype(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf;
}

inline void check_row_dtype(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(is_row_dtype(t.scalar_type()), "locmoe_torch: ", name,
                    " must be float32, float64, bfloat16 or float16 (got ", t.scalar_type(), ")");
}

/// The tensor with unit column stride (a copy otherwise), and its view.
template <class T>
locmoe::matrix_view<T> rows_view(Tensor& t) {
  if (t.size(1) > 1 && t.stride(1) != 1) t = t.contiguous();
  if (t.size(0) > 1 && t.stride(0) < t.size(1)) t = t.contiguous();
  const auto stride = t.size(0) > 1 ? t.stride(0) : t.size(1);
  return {reinterpret_cast<T*>(t.data_ptr()), static_cast<std::size_t>(t.size(0)), static_cast<std::size_t>(t.size(1)),
          static_cast<std::size_t>(stride)};
}

/// Calls fn with a value of the locmoe element type of `s` (float, double, locmoe::bf16, locmoe::fp16).
template <class Fn>
decltype(auto) with_row_type(at::ScalarType s, Fn&& fn) {
  switch (s) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kBFloat16: return fn(locmoe::bf16{});
    case at::kHalf: return fn(locmoe::fp16{});
    default: TORCH_CHECK_VALUE(false, "locmoe_torch: unsupported dtype ", s);
  }
}

/// The arithmetic type of scores from logits of dtype s: double for float64, float otherwise.
inline at::ScalarType score_dtype(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

/// Logits checked (a 2-D CPU tensor of a row dtype) and in the arithmetic type: float, double for float64.
inline Tensor scores_input(const Tensor& logits_in) {
  check_matrix(logits_in, "logits");
  check_row_dtype(logits_in, "logits");
  return logits_in.to(score_dtype(logits_in.scalar_type())).contiguous();
}

template <class S>
locmoe::router_options<S> router_options_of(int64_t n, int64_t topk, bool use_pre_softmax, int64_t num_groups,
                                            int64_t group_topk, double scaling_factor, const std::string& score) {
  TORCH_CHECK_VALUE(topk >= 1 && topk <= n, "locmoe_torch: topk must be in [1, num_experts = ", n, "] (got ", topk, ")");
  TORCH_CHECK_VALUE(score == "softmax" || score == "sigmoid", "locmoe_torch: score_function must be 'softmax' or ",
                    "'sigmoid' (got '", score, "')");
  TORCH_CHECK_VALUE(num_groups >= 0 && group_topk >= 0, "locmoe_torch: num_groups and group_topk must be >= 0");
  locmoe::router_options<S> o;
  o.k = static_cast<std::size_t>(topk);
  o.score = score == "sigmoid" ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
  o.softmax_before_topk = use_pre_softmax;
  o.groups = static_cast<std::size_t>(num_groups);
  o.group_limit = static_cast<std::size_t>(group_topk);
  o.scale = static_cast<S>(scaling_factor);
  return o;
}

/// Token ranges of about equal size for the pool (at least `grain` tokens each).
inline std::vector<locmoe::token_range> token_ranges(std::size_t tokens, std::size_t threads, std::size_t grain = 256) {
  const std::size_t count = std::max<std::size_t>(1, std::min(4 * threads, tokens / grain));
  std::vector<locmoe::token_range> r(count);
  for (std::size_t i = 0; i < count; ++i) r[i] = {tokens * i / count, tokens * (i + 1) / count};
  return r;
}

/// fn(e) for each e < n whose row[e] is true, in increasing e. Eight entries are tested at once: the rows of a
/// routing map are mostly zero words.
template <class Fn>
void for_each_true(const bool* row, std::size_t n, Fn&& fn) {
  std::size_t e = 0;
  for (; e + 8 <= n; e += 8) {
    std::uint64_t word;
    std::memcpy(&word, row + e, sizeof word);
    if (word == 0) continue;
    for (std::size_t j = e; j < e + 8; ++j) {
      if (row[j]) fn(j);
    }
  }
  for (; e < n; ++e) {
    if (row[e]) fn(e);
  }
}

}  // namespace locmoe_torch_ops
