// locmoe/backend/cuda.cuh - the CUDA backend: the router's device steps as CUDA kernels on a caller's stream.
// Compiled by nvcc only. A model of the backend concept (backend/backend.hpp); every pointer in a view is a
// device pointer. The steps:
//   route_grap    one warp per token: the GrAP block sums (eq. 4) reduced across the warp, bias, ReLU, then on
//                 lane 0 Top-k on the logits and softmax, with the CPU's rules (ties to the lower index; -inf
//                 masks an expert; a NaN or +inf logit makes the token invalid: indices -1, weights and
//                 probabilities 0; renormalize as select_options). The block sums are added in another order
//                 than on the CPU, so logits may differ in the last bits; choices agree except at near ties.
//                 Returns 0: invalid tokens are the rows whose first index is -1 (no host round trip).
//   assign_slots  position policy in three kernels: per-range counts per expert, an exclusive scan over the
//                 ranges (one thread per expert), then one thread per (range, expert) numbering that expert's
//                 choices in token order. Exactly the CPU's (and capacity_assigner's) slots.
//   dispatch      one block per (token, choice), copying the row in 16-byte words where aligned.
//   combine       one block per token; each element sums ((0 + w0 r0) + w1 r1) + ... with round-to-nearest
//                 multiplies and adds that are never fused: the CPU's arithmetic, bit for bit.
//   combine_backward / dispatch_backward   one block per token: the weighted rows and a fixed-tree dot product per
//                 kept pair (deterministic; the dots may differ from the CPU's in the last bits); dispatch's backward
//                 is combine with unit weights (bit for bit the CPU's). dispatch and combine_backward write padding
//                 rows as zeros when pair_layout carries the kept counts.
//   route_dense   the same with the dense gate: one warp per token, n dot products with W reduced across the warp.
// Limits (checked, locmoe::error): n <= 1024 for the routes. bf16/fp16 rows are combined in float and rounded
// once, as on the CPU. Bit-equal combine assumes the CPU build does not
// contract multiply-adds into FMA (no -mfma/-march=native, or -ffp-contract=off).
// Workspace: slot_workspace_size(T, n) bytes of device memory. No call allocates or synchronizes.
// Thread safety: a cuda_backend holds its stream only; threads may share one, and their launches queue on that
// stream in the order the calls are made (give each thread its own backend and stream to overlap them).
// Errors of the launches are thrown as locmoe::cuda_error at the next call that checks (cudaGetLastError).
#pragma once

#if !defined(__CUDACC__)
#  error "locmoe/backend/cuda.cuh is compiled by nvcc only (use locmoe/backend/cpu.hpp elsewhere)"
#endif

#include <locmoe/backend/backend.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace locmoe {

/// A CUDA runtime error, with the call that failed.
struct cuda_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace cuda_detail {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw cuda_error(std::string("locmoe::cuda_backend: ") + what + ": " + cudaGetErrorString(status));
}

constexpr int warp = 32;
constexpr int route_warps = 4;        // tokens per block in route_grap
constexpr int max_route_experts = 1024;
constexpr std::size_t slot_ranges = 64;  // token ranges of assign_slots

template <class T>
__device__ float to_float(T v) { return static_cast<float>(v); }  // bf16/fp16: Eigen's device conversions

/// Where one token's route goes: the output rows of token t.
struct route_rows {
  expert_index* indices;
  std::size_t i_stride;
  float* weights;
  std::size_t w_stride;
  float* probabilities;  // optional
  std::size_t p_stride;
  float* logits;  // optional
  std::size_t l_stride;
};

/// Lane 0: softmax and Top-k of one token's logits (in shared memory, overwritten), select.hpp's rules: a NaN
/// or +inf logit makes the token invalid (indices -1, weights and probabilities 0), -inf masks an expert,
/// Top-k on the logits with ties to the lower index, then weights = probabilities (renormalized if asked).
__device__ inline void select_token(float* logits, std::size_t n, std::size_t k, bool renormalize, const route_rows& out,
                                    std::size_t t) {
  bool valid = true;
  float top = -INFINITY;
  for (std::size_t i = 0; i < n; ++i) {
    const float l = logits[i];
    if (l != l || l == INFINITY) valid = false;
    top = l > top ? l : top;
  }
  if (!valid || top == -INFINITY) {
    for (std::size_t j = 0; j < k; ++j) {
      out.indices[t * out.i_stride + j] = no_expert;
      out.weights[t * out.w_stride + j] = 0.0f;
    }
    if (out.probabilities) {
      for (std::size_t i = 0; i < n; ++i) out.probabilities[t * out.p_stride + i] = 0.0f;
    }
    return;
  }
  float total = 0.0f;
  for (std::size_t i = 0; i < n; ++i) total += expf(logits[i] - top);
  if (out.probabilities) {
    for (std::size_t i = 0; i < n; ++i) out.probabilities[t * out.p_stride + i] = expf(logits[i] - top) / total;
  }
  float chosen = 0.0f;
  for (std::size_t j = 0; j < k; ++j) {
    std::size_t best = n;
    for (std::size_t i = 0; i < n; ++i) {
      if (logits[i] != -INFINITY && (best == n || logits[i] > logits[best])) best = i;
    }
    if (best == n) {  // fewer than k experts left unmasked
      out.indices[t * out.i_stride + j] = no_expert;
      out.weights[t * out.w_stride + j] = 0.0f;
      continue;
    }
    const float weight = expf(logits[best] - top) / total;
    out.indices[t * out.i_stride + j] = static_cast<expert_index>(best);
    out.weights[t * out.w_stride + j] = weight;
    chosen += weight;
    logits[best] = -INFINITY;  // taken
  }
  if (renormalize && chosen > 0.0f) {
    for (std::size_t j = 0; j < k; ++j) out.weights[t * out.w_stride + j] /= chosen;
  }
}

/// Lane 0 finishes a logit: bias, ReLU (NaN stays NaN), into shared memory and the optional logits output.
__device__ inline void store_logit(float value, std::size_t i, const float* bias, bool relu, float* logits,
                                   const route_rows& out, std::size_t t) {
  value += bias ? bias[i] : 0.0f;
  if (relu && value < 0.0f) value = 0.0f;
  logits[i] = value;
  if (out.logits) out.logits[t * out.l_stride + i] = value;
}

__device__ inline float warp_sum(float v) {
  for (int offset = warp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

/// One warp per token: GrAP block means (eq. 4).
template <class T>
__global__ void grap_route_kernel(const T* x, std::size_t stride, std::size_t tokens, std::size_t d, std::size_t n,
                                  std::size_t k, const float* bias, bool relu, bool renormalize, route_rows out) {
  extern __shared__ float shared[];  // [route_warps][n]
  const int lane = threadIdx.x % warp, w = threadIdx.x / warp;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * route_warps + static_cast<std::size_t>(w);
  if (t >= tokens) return;  // the whole warp returns: every shuffle below has all 32 lanes
  float* logits = shared + static_cast<std::size_t>(w) * n;
  const T* row = x + t * stride;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t begin = i * (d / n) + (i * (d % n)) / n, end = (i + 1) * (d / n) + ((i + 1) * (d % n)) / n;
    float sum = 0.0f;
    for (std::size_t c = begin + static_cast<std::size_t>(lane); c < end; c += warp) sum += to_float(row[c]);
    sum = warp_sum(sum);
    if (lane == 0) store_logit(sum / static_cast<float>(end - begin), i, bias, relu, logits, out, t);
  }
  if (lane == 0) select_token(logits, n, k, renormalize, out, t);
}

/// One warp per token: the dense gate's n dot products with W [n x d].
template <class T>
__global__ void dense_route_kernel(const T* x, std::size_t stride, std::size_t tokens, std::size_t d, std::size_t n,
                                   std::size_t k, const float* weight, std::size_t weight_stride, const float* bias,
                                   bool relu, bool renormalize, route_rows out) {
  extern __shared__ float shared[];  // [route_warps][n]
  const int lane = threadIdx.x % warp, w = threadIdx.x / warp;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * route_warps + static_cast<std::size_t>(w);
  if (t >= tokens) return;
  float* logits = shared + static_cast<std::size_t>(w) * n;
  const T* row = x + t * stride;
  for (std::size_t i = 0; i < n; ++i) {
    const float* wi = weight + i * weight_stride;
    float sum = 0.0f;
    for (std::size_t c = static_cast<std::size_t>(lane); c < d; c += warp) sum += to_float(row[c]) * wi[c];
    sum = warp_sum(sum);
    if (lane == 0) store_logit(sum, i, bias, relu, logits, out, t);
  }
  if (lane == 0) select_token(logits, n, k, renormalize, out, t);
}

__global__ void count_kernel(const expert_index* indices, std::size_t stride, std::size_t tokens, std::size_t k,
                             std::size_t n, std::size_t ranges, std::int64_t* counts) {
  const std::size_t r = blockIdx.x, begin = tokens * r / ranges, end = tokens * (r + 1) / ranges;
  for (std::size_t e = threadIdx.x; e < n; e += blockDim.x) {  // one thread per expert: no atomics, exact
    std::int64_t c = 0;
    for (std::size_t t = begin; t < end; ++t) {
      for (std::size_t j = 0; j < k; ++j) c += indices[t * stride + j] == static_cast<expert_index>(e);
    }
    counts[r * n + e] = c;
  }
}

__global__ void scan_kernel(std::int64_t* counts, std::size_t ranges, std::size_t n, std::int64_t capacity,
                            std::int64_t* tokens_per_expert, std::int64_t* kept_per_expert) {
  for (std::size_t e = threadIdx.x + static_cast<std::size_t>(blockIdx.x) * blockDim.x; e < n;
       e += static_cast<std::size_t>(blockDim.x) * gridDim.x) {
    std::int64_t before = 0;
    for (std::size_t r = 0; r < ranges; ++r) {
      const std::int64_t here = counts[r * n + e];
      counts[r * n + e] = before;
      before += here;
    }
    tokens_per_expert[e] = before;
    kept_per_expert[e] = before < capacity ? before : capacity;
  }
}

__global__ void slot_kernel(const expert_index* indices, std::size_t i_stride, std::size_t tokens, std::size_t k,
                            std::size_t n, std::size_t ranges, const std::int64_t* offsets, std::int64_t capacity,
                            expert_index* expert, std::size_t e_stride, slot_index* slot, std::size_t s_stride) {
  const std::size_t r = blockIdx.x, begin = tokens * r / ranges, end = tokens * (r + 1) / ranges;
  for (std::size_t e = threadIdx.x; e < n; e += blockDim.x) {
    std::int64_t next = offsets[r * n + e];
    for (std::size_t t = begin; t < end; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        if (indices[t * i_stride + j] != static_cast<expert_index>(e)) continue;
        const bool kept = next < capacity;
        expert[t * e_stride + j] = kept ? static_cast<expert_index>(e) : no_expert;
        slot[t * s_stride + j] = kept ? static_cast<slot_index>(next) : -1;
        ++next;
      }
    }
  }
  // Masked choices (-1), and any index outside [0, n), are dropped: one thread per range writes them.
  if (threadIdx.x == 0) {
    for (std::size_t t = begin; t < end; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        const expert_index e = indices[t * i_stride + j];
        if (e < 0 || static_cast<std::size_t>(e) >= n) {
          expert[t * e_stride + j] = no_expert;
          slot[t * s_stride + j] = -1;
        }
      }
    }
  }
}

template <int = 0>
__global__ void dispatch_kernel(const unsigned char* x, std::size_t x_stride, unsigned char* buffer, std::size_t b_stride,
                                std::size_t row_bytes, pair_layout pairs) {
  const std::size_t p = blockIdx.x, k = pairs.top_k;
  if (p >= pairs.tokens * k || pairs.expert[p] == no_expert) return;
  const auto e = static_cast<std::size_t>(pairs.expert[p]);
  const std::size_t first = pairs.expert_offset ? static_cast<std::size_t>(pairs.expert_offset[e]) : e * pairs.capacity;
  const unsigned char* from = x + (p / k) * x_stride;
  unsigned char* to = buffer + (first + static_cast<std::size_t>(pairs.slot[p])) * b_stride;
  const bool aligned = reinterpret_cast<std::uintptr_t>(from) % 16 == 0 && reinterpret_cast<std::uintptr_t>(to) % 16 == 0;
  std::size_t c = 0;
  if (aligned) {
    for (c = threadIdx.x * 16; c + 16 <= row_bytes; c += blockDim.x * 16) {
      *reinterpret_cast<uint4*>(to + c) = *reinterpret_cast<const uint4*>(from + c);
    }
    c = row_bytes / 16 * 16;
  }
  for (std::size_t b = c + threadIdx.x; b < row_bytes; b += blockDim.x) to[b] = from[b];
}

template <class T>
__device__ T mul_rn(T a, T b);
template <>
__device__ inline float mul_rn<float>(float a, float b) { return __fmul_rn(a, b); }
template <>
__device__ inline double mul_rn<double>(double a, double b) { return __dmul_rn(a, b); }
template <class T>
__device__ T add_rn(T a, T b);
template <>
__device__ inline float add_rn<float>(float a, float b) { return __fadd_rn(a, b); }
template <>
__device__ inline double add_rn<double>(double a, double b) { return __dadd_rn(a, b); }

/// The expert-buffer row of a kept pair p (pair_layout::row, on the device).
__device__ inline std::size_t pair_row(const pair_layout& pairs, std::size_t p) {
  const auto e = static_cast<std::size_t>(pairs.expert[p]);
  const std::size_t begin = pairs.expert_offset ? static_cast<std::size_t>(pairs.expert_offset[e]) : e * pairs.capacity;
  return begin + static_cast<std::size_t>(pairs.slot[p]);
}

/// combine (weight given) and dispatch's backward (weight null: every weight 1, so the same sums): one block per
/// token, each element ((0 + w0 r0) + w1 r1) + ... with unfused round-to-nearest arithmetic, the CPU's order.
template <class T, class W>
__global__ void combine_kernel(const T* buffer, std::size_t b_stride, const W* weight, std::size_t w_stride, T* y,
                               std::size_t y_stride, std::size_t d, pair_layout pairs) {
  const std::size_t t = blockIdx.x, k = pairs.top_k;
  if (t >= pairs.tokens) return;
  using A = std::conditional_t<std::is_floating_point_v<T>, T, float>;  // bf16/fp16 rows are summed in float
  for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) {
    A sum = A(0);
    for (std::size_t j = 0; j < k; ++j) {
      const std::size_t p = t * k + j;
      if (pairs.expert[p] == no_expert) continue;
      const T* row = buffer + pair_row(pairs, p) * b_stride;
      const A w = weight ? static_cast<A>(weight[t * w_stride + j]) : A(1);
      sum = add_rn(sum, mul_rn(w, static_cast<A>(row[c])));
    }
    y[t * y_stride + c] = T(sum);
  }
}

constexpr int backward_threads = 256;

/// combine's backward: one block per token; for each kept pair, grad_buffer's row = w grad_y[t] (rounded once)
/// and grad_weight = grad_y[t] . row, each thread summing its strided elements, then a fixed shared-memory tree:
/// deterministic (not the CPU's order: the dot products may differ from the CPU's in the last bits).
template <class T, class W>
__global__ void combine_backward_kernel(const T* buffer, std::size_t b_stride, const W* weight, std::size_t w_stride,
                                        const T* grad_y, std::size_t gy_stride, T* grad_buffer, std::size_t gb_stride,
                                        W* grad_weight, std::size_t gw_stride, std::size_t d, pair_layout pairs) {
  using A = std::conditional_t<std::is_floating_point_v<T>, T, float>;
  __shared__ A partial[backward_threads];
  const std::size_t t = blockIdx.x, k = pairs.top_k;
  if (t >= pairs.tokens) return;
  const T* dy = grad_y + t * gy_stride;
  for (std::size_t j = 0; j < k; ++j) {
    const std::size_t p = t * k + j;
    if (pairs.expert[p] == no_expert) {
      if (grad_weight && threadIdx.x == 0) grad_weight[t * gw_stride + j] = W(0);
      continue;
    }
    const std::size_t r = pair_row(pairs, p);
    const T* row = buffer + r * b_stride;
    const A w = static_cast<A>(weight[t * w_stride + j]);
    A sum = A(0);
    for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) {
      const A g = static_cast<A>(dy[c]);
      if (grad_buffer) grad_buffer[r * gb_stride + c] = T(mul_rn(w, g));
      sum = add_rn(sum, mul_rn(g, static_cast<A>(row[c])));
    }
    if (!grad_weight) continue;
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) partial[threadIdx.x] = add_rn(partial[threadIdx.x], partial[threadIdx.x + width]);
      __syncthreads();
    }
    if (threadIdx.x == 0) grad_weight[t * gw_stride + j] = static_cast<W>(partial[0]);
    __syncthreads();
  }
}

/// The padding rows of each expert (after its kept rows, to the end of its rows) set to zero: one block per expert.
template <class T>
__global__ void zero_padding_kernel(T* buffer, std::size_t stride, std::size_t d, pair_layout pairs) {
  const std::size_t e = blockIdx.x;
  if (e >= pairs.experts) return;
  const std::size_t begin = pairs.expert_offset ? static_cast<std::size_t>(pairs.expert_offset[e]) : e * pairs.capacity;
  const std::size_t end = pairs.expert_offset ? static_cast<std::size_t>(pairs.expert_offset[e + 1]) : begin + pairs.capacity;
  for (std::size_t r = begin + static_cast<std::size_t>(pairs.kept_per_expert[e]); r < end; ++r) {
    for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) buffer[r * stride + c] = T(0.0f);
  }
}

}  // namespace cuda_detail

class cuda_backend {
  static constexpr unsigned threads_per_block = cuda_detail::route_warps * cuda_detail::warp;
  static unsigned blocks(std::size_t tokens) {
    return static_cast<unsigned>((tokens + cuda_detail::route_warps - 1) / cuda_detail::route_warps);
  }
  static std::size_t shared_bytes(std::size_t n) { return cuda_detail::route_warps * n * sizeof(float); }
  static cuda_detail::route_rows rows(const route_outputs<float>& out) {
    return {out.indices.data, out.indices.stride, out.weights.data,      out.weights.stride,
            out.probabilities.data, out.probabilities.stride, out.logits.data, out.logits.stride};
  }
  static void check_experts(const char* fn, const char* argument, std::size_t n) {
    if (n > static_cast<std::size_t>(cuda_detail::max_route_experts)) {
      detail::raise<construction_policy>(errc::domain, fn, argument, n, "must be <= 1024 on the CUDA backend", 0);
    }
  }

 public:
  using stream_type = cudaStream_t;
  static constexpr const char* name = "cuda";
  static constexpr bool host_memory = false;  // views are device memory: moe_router does not take this backend

  std::size_t slot_workspace_size(std::size_t /*tokens*/, std::size_t n) const noexcept {
    return cuda_detail::slot_ranges * n * sizeof(std::int64_t);
  }

  /// Fused GrAP route on the device (see the header comment); returns 0 (invalid rows have index -1).
  template <class T, class Real>
  std::size_t route_grap(const grap_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                         const route_outputs<Real>& out, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<Real, float>, "cuda_backend::route_grap: float scores");
    constexpr const char* fn = "locmoe::cuda_backend::route_grap";
    const std::size_t tokens = x.rows, d = gate.hidden, n = gate.experts, k = options.k;
    detail::check_grap_gate<construction_policy>(fn, gate);
    detail::check_selection<construction_policy>(fn, n, k, true);
    detail::check_view<construction_policy>(fn, "x", x, tokens, d, "must have gate.hidden columns (d)");
    detail::check_route_outputs<construction_policy>(fn, out, tokens, n, k);
    check_experts(fn, "gate.experts", n);
    if (tokens == 0) return 0;
    cuda_detail::grap_route_kernel<detail::plain_t<T>><<<blocks(tokens), threads_per_block, shared_bytes(n), stream>>>(
        x.data, x.stride, tokens, d, n, k, gate.bias, gate.relu, options.renormalize, rows(out));
    cuda_detail::check(cudaGetLastError(), "route_grap launch");
    return 0;
  }

  /// No workspace: the dense route keeps its logits in shared memory.
  template <class T>
  std::size_t route_workspace_size(std::size_t, std::size_t) const noexcept { return 0; }

  /// Dense gate + softmax + Top-k on the device (W [n x d] and the bias are device pointers; out.logits, if
  /// given, receives the logits); returns 0, as route_grap.
  template <class T, class Real>
  std::size_t route_dense(const dense_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                          const route_outputs<Real>& out, void* = nullptr, std::size_t = 0, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<Real, float>, "cuda_backend::route_dense: float scores and weights");
    constexpr const char* fn = "locmoe::cuda_backend::route_dense";
    const std::size_t tokens = x.rows, d = x.cols, n = gate.weight.rows, k = options.k;
    detail::check_dense_gate<construction_policy>(fn, gate, d);
    detail::check_selection<construction_policy>(fn, n, k, true);
    detail::check_route_outputs<construction_policy>(fn, out, tokens, n, k);
    check_experts(fn, "gate.weight.rows", n);
    if (tokens == 0) return 0;
    cuda_detail::dense_route_kernel<detail::plain_t<T>><<<blocks(tokens), threads_per_block, shared_bytes(n), stream>>>(
        x.data, x.stride, tokens, d, n, k, gate.weight.data, gate.weight.stride, gate.bias, gate.relu, options.renormalize,
        rows(out));
    cuda_detail::check(cudaGetLastError(), "route_dense launch");
    return 0;
  }

  void assign_slots(const slot_problem& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::assign_slots";
    const std::size_t tokens = p.indices.rows, k = p.indices.cols, n = p.experts, ranges = cuda_detail::slot_ranges;
    detail::check_selection<construction_policy>(fn, n, k, true);
    if (p.capacity < 0 || p.capacity > std::numeric_limits<slot_index>::max()) {
      detail::raise<construction_policy>(errc::domain, fn, "capacity", p.capacity, "must satisfy 0 <= C < 2^31", 0);
    }
    if (workspace_bytes < slot_workspace_size(tokens, n)) {
      detail::raise<construction_policy>(errc::domain, fn, "workspace_bytes", workspace_bytes, "must be >= slot_workspace_size(T, n)", 0);
    }
    auto* counts = static_cast<std::int64_t*>(workspace);
    const unsigned threads = n < 256 ? static_cast<unsigned>(n) : 256u;
    cuda_detail::count_kernel<<<static_cast<unsigned>(ranges), threads, 0, stream>>>(p.indices.data, p.indices.stride, tokens, k, n,
                                                                                     ranges, counts);
    cuda_detail::scan_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(counts, ranges, n, p.capacity,
                                                                                         p.tokens_per_expert, p.kept_per_expert);
    cuda_detail::slot_kernel<<<static_cast<unsigned>(ranges), threads, 0, stream>>>(
        p.indices.data, p.indices.stride, tokens, k, n, ranges, counts, p.capacity, p.expert.data, p.expert.stride,
        p.slot.data, p.slot.stride);
    cuda_detail::check(cudaGetLastError(), "assign_slots launch");
  }

  template <class T>
  void dispatch(const pair_layout& pairs, const matrix_view<const T>& x, const matrix_view<T>& buffer,
                cudaStream_t stream = nullptr) const {
    const std::size_t all = pairs.tokens * pairs.top_k;
    if (all == 0) return;
    cuda_detail::dispatch_kernel<<<static_cast<unsigned>(all), 128, 0, stream>>>(
        reinterpret_cast<const unsigned char*>(x.data), x.stride * sizeof(T), reinterpret_cast<unsigned char*>(buffer.data),
        buffer.stride * sizeof(T), x.cols * sizeof(T), pairs);
    cuda_detail::check(cudaGetLastError(), "dispatch launch");
    zero_padding(pairs, buffer, stream);
  }

  template <class T, class W>
  void combine(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
               const matrix_view<T>& y, cudaStream_t stream = nullptr) const {
    if (pairs.tokens == 0) return;
    cuda_detail::combine_kernel<T, W><<<static_cast<unsigned>(pairs.tokens), 256, 0, stream>>>(
        buffer.data, buffer.stride, weight.data, weight.stride, y.data, y.stride, y.cols, pairs);
    cuda_detail::check(cudaGetLastError(), "combine launch");
  }

  /// combine's backward (dispatch.hpp's combine_backward): grad_buffer (optional) = w grad_y[t] at kept rows and
  /// zeros on padding rows; grad_weight (optional) = grad_y[t] . row, reduced in a fixed tree per block.
  template <class T, class W>
  void combine_backward(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                        const matrix_view<const T>& grad_y, const matrix_view<T>& grad_buffer,
                        const matrix_view<W>& grad_weight, cudaStream_t stream = nullptr) const {
    if (pairs.tokens > 0) {
      cuda_detail::combine_backward_kernel<T, W><<<static_cast<unsigned>(pairs.tokens), cuda_detail::backward_threads, 0, stream>>>(
          buffer.data, buffer.stride, weight.data, weight.stride, grad_y.data, grad_y.stride, grad_buffer.data,
          grad_buffer.stride, grad_weight.data, grad_weight.stride, grad_y.cols, pairs);
      cuda_detail::check(cudaGetLastError(), "combine_backward launch");
    }
    if (grad_buffer.present()) zero_padding(pairs, grad_buffer, stream);
  }

  /// dispatch's backward: grad_x[t] = sum of t's kept rows of grad_buffer in choice order (combine with unit weights).
  template <class T>
  void dispatch_backward(const pair_layout& pairs, const matrix_view<const T>& grad_buffer, const matrix_view<T>& grad_x,
                         cudaStream_t stream = nullptr) const {
    if (pairs.tokens == 0) return;
    cuda_detail::combine_kernel<T, float><<<static_cast<unsigned>(pairs.tokens), 256, 0, stream>>>(
        grad_buffer.data, grad_buffer.stride, nullptr, 0, grad_x.data, grad_x.stride, grad_x.cols, pairs);
    cuda_detail::check(cudaGetLastError(), "dispatch_backward launch");
  }

 private:
  template <class T>
  static void zero_padding(const pair_layout& pairs, const matrix_view<T>& buffer, cudaStream_t stream) {
    if (!pairs.kept_per_expert || pairs.experts == 0 || buffer.cols == 0) return;
    cuda_detail::zero_padding_kernel<T><<<static_cast<unsigned>(pairs.experts), 256, 0, stream>>>(buffer.data, buffer.stride,
                                                                                                  buffer.cols, pairs);
    cuda_detail::check(cudaGetLastError(), "padding launch");
  }
};

}  // namespace locmoe
