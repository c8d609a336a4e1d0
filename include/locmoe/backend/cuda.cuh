// locmoe/backend/cuda.cuh - the CUDA backend: the router's device steps as CUDA kernels on a caller's stream.
// Compiled by nvcc only. A model of the backend concept (backend/backend.hpp); every pointer in a view is a
// device pointer. The steps (kernels in backend/cuda/):
//   route_grap    one warp per token: each GrAP block (eq. 4) summed by a group of lanes with 16-byte loads, a
//                 few blocks at a time when they are small; bias, ReLU; then the warp's softmax + Top-k with the
//                 CPU's rules (ties to the lower index; -inf masks an expert; a NaN or +inf logit makes the token
//                 invalid: indices -1, weights and probabilities 0; renormalize as select_options). Block sums and
//                 the softmax's sum are added in another order than on the CPU, so logits, weights and
//                 probabilities may differ in the last bits; choices agree except at near ties. The order depends
//                 on the shape and on each row's address modulo 16 (where its 16-byte words start): the same
//                 buffer gives the same bits every call. Returns 0: invalid tokens are the rows whose first index
//                 is -1 (no host round trip).
//   route_dense   a tiled GEMM (64 tokens x 64 experts per block; x read once for n <= 64) writes the logits
//                 (out.logits, required as on the CPU), then one warp per token selects. Not cuBLAS: x may be
//                 bf16/fp16 against a float W, which cuBLAS's GEMMs do not mix, and the GEMM is fused with its
//                 bias and ReLU.
//   assign_slots  position policy in three kernels that scale with T (backend/cuda/slot_kernels.cuh): exactly the
//                 CPU's (and capacity_assigner's) slots and counts.
//   dispatch      one block per token: its row read once, written to each kept slot.
//   combine       one block per token, its k choices loaded once; each element sums ((0 + w0 r0) + w1 r1) + ...
//                 with round-to-nearest multiplies and adds that are never fused: the CPU's arithmetic, bit for
//                 bit, for every result that is not NaN. A NaN result is NaN on both, but its bits may differ: the
//                 device's float arithmetic gives 0x7fffffff whatever NaN went in, while the CPU keeps the input
//                 NaN's sign and payload (and x86 makes 0 x Inf a negative NaN). bf16/fp16 results are rounded with
//                 the host's rules (a NaN of sign s becomes s|0x7fc0 / s|0x7e00, not CUDA's 0x7fff), so they
//                 agree when the CPU's NaN is positive.
//   combine_backward / dispatch_backward   one block per token, grad_y read once per 4 choices: the weighted rows
//                 and a fixed-tree dot product per kept pair (deterministic; the dots may differ from the CPU's in
//                 the last bits); dispatch's backward is combine with unit weights (bit for bit the CPU's).
//                 dispatch and combine_backward write padding rows as zeros when pair_layout carries the kept counts.
// Arguments are checked on the host with the CPU backend's rules and messages (locmoe::error), except what only
// device memory holds: assign_slots checks its indices on the device (see device_checks); dispatch, combine and
// the backwards skip a kept pair whose row falls outside the buffer (the CPU throws there; a layout made by
// assign_slots for that buffer has none). Limits (checked, locmoe::error): n <= 1024 for the routes, k <= 1024 and
// T < 2^31 for the row steps, T k < 2^31 for the slots; x float, bf16 or fp16 (double x: the CPU backend).
// Bit-equal combine assumes the CPU build does not contract multiply-adds into FMA (no -mfma/-march=native, or
// -ffp-contract=off), and a device build without -ftz=true / --use_fast_math (which flush subnormals in the
// multiplies and adds and approximate expf and division).
// CUDA graphs: device_checks::synchronous waits on the stream, which stream capture forbids; capture with
// device_checks::deferred (or slot_problem::indices_in_range, as grap_pipeline passes).
// Workspace: slot_workspace_size(T, n) bytes of device memory. No call allocates; only assign_slots with
// device_checks::synchronous waits for the device (one 8-byte copy).
// Thread safety: a cuda_backend holds its check mode only; threads may share one, and their launches queue on the
// stream each passes, in the order the calls are made (give each thread its own stream to overlap them).
// Errors of the launches are thrown as locmoe::cuda_error at the next call that checks (cudaGetLastError).
// The header (and backend/cuda/) holds templates and inline functions only: any number of .cu files of one
// program may include it. Launches go through cuda_detail::launch, so that the tests can run these kernels on the
// host (LOCMOE_CUDA_EMULATION names tests/cuda_emulation/emulation.hpp; never define it in a program).
#pragma once

#if !defined(__CUDACC__) && !defined(LOCMOE_CUDA_EMULATION)
#  error "locmoe/backend/cuda.cuh is compiled by nvcc only (use locmoe/backend/cpu.hpp elsewhere)"
#endif

#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cuda/device.cuh>
#include <locmoe/backend/cuda/route_kernels.cuh>
#include <locmoe/backend/cuda/row_kernels.cuh>
#include <locmoe/backend/cuda/slot_kernels.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

/// Defined where cuda_backend has device_checks and check_slot_indices.
#define LOCMOE_CUDA_DEVICE_CHECKS 1

namespace locmoe {

/// How the CUDA backend reports what only device memory shows: an index outside [-1, n) given to assign_slots.
enum class device_checks {
  /// assign_slots waits for its count kernel (one 8-byte copy and a stream synchronize) and throws the CPU's error
  /// before writing any output: the CPU backend's behaviour. No wait when slot_problem::indices_in_range (as
  /// grap_pipeline::run passes its own route's choices).
  synchronous,
  /// assign_slots does not wait: a bad choice is dropped (expert and slot -1, not counted), the first one (in (t, j)
  /// order) is recorded in the workspace, and check_slot_indices() throws the CPU's error for it.
  deferred,
};

class cuda_backend {
 public:
  using stream_type = cudaStream_t;
  static constexpr const char* name = "cuda";
  static constexpr bool host_memory = false;  // views are device memory: moe_router does not take this backend

  explicit cuda_backend(device_checks checks = device_checks::synchronous) noexcept : checks_(checks) {}
  device_checks checks() const noexcept { return checks_; }

  /// Bytes of device workspace assign_slots needs: 256 + ceil(T / 128) n 4.
  std::size_t slot_workspace_size(std::size_t tokens, std::size_t n) const noexcept {
    return cuda_detail::slot_status_bytes + tiles(tokens) * n * sizeof(int);
  }

  /// Fused GrAP route on the device (see the header comment); returns 0 (invalid rows have index -1).
  template <class T, class Real>
  std::size_t route_grap(const grap_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                         const route_outputs<Real>& out, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<Real, float>, "cuda_backend::route_grap: float scores");
    constexpr const char* fn = "locmoe::cuda_backend::route_grap";
    using E = detail::plain_t<T>;
    check_activations<T>();
    const std::size_t tokens = x.rows, d = gate.hidden, n = gate.experts, k = options.k;
    detail::check_grap_gate<construction_policy>(fn, gate);
    detail::check_selection<construction_policy>(fn, n, k, true);
    detail::check_view<construction_policy>(fn, "x", x, tokens, d, "must have gate.hidden columns (d)");
    detail::check_route_outputs<construction_policy>(fn, out, tokens, n, k);
    check_route_experts(fn, "gate.experts", n);
    if (tokens == 0) return 0;
    cuda_detail::launch("route_grap launch", cuda_detail::grap_route_kernel<E>, route_blocks(tokens), route_threads,
                        route_shared(n), stream, x.data, x.stride, tokens, d, n, k, gate.bias, gate.relu,
                        options.renormalize, cuda_detail::grap_group_width(d, n, sizeof(E)), rows_of(out));
    return 0;
  }

  /// No workspace: the dense route writes its logits to out.logits.
  template <class T>
  std::size_t route_workspace_size(std::size_t, std::size_t) const noexcept { return 0; }

  /// Dense gate + softmax + Top-k on the device: out.logits [T x n] (required, as on the CPU) receives
  /// act(x W^T + b), then each token selects from it. W [n x d] and the bias are device pointers; returns 0, as
  /// route_grap.
  template <class T, class Real>
  std::size_t route_dense(const dense_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                          const route_outputs<Real>& out, void* = nullptr, std::size_t = 0, cudaStream_t stream = nullptr) const {
    static_assert(std::is_same_v<Real, float>, "cuda_backend::route_dense: float scores and weights");
    constexpr const char* fn = "locmoe::cuda_backend::route_dense";
    const std::size_t tokens = x.rows, d = x.cols, n = gate.weight.rows, k = options.k;
    check_activations<T>();
    detail::check_selection<construction_policy>(fn, n, k, true);  // the CPU's order: dense_route, then dense_logits
    detail::check_view<construction_policy>(fn, "logits", out.logits, tokens, n, "must be passed, [T x n]");
    detail::check_route_outputs<construction_policy>(fn, out, tokens, n, k);
    detail::check_dense_gate<construction_policy>(fn, gate, d);
    detail::check_view<construction_policy>(fn, "x", x, tokens, d, "");
    check_route_experts(fn, "gate.weight.rows", n);
    if (tokens == 0) return 0;
    using cuda_detail::dense_tile_experts;
    using cuda_detail::dense_tile_tokens;
    const dim3 grid(static_cast<unsigned>((tokens + dense_tile_tokens - 1) / dense_tile_tokens),
                    static_cast<unsigned>((n + dense_tile_experts - 1) / dense_tile_experts));
    cuda_detail::launch("route_dense launch", cuda_detail::dense_logits_kernel<detail::plain_t<T>>, grid,
                        cuda_detail::dense_threads, 0, stream, x.data, x.stride, tokens, d, n, gate.weight.data,
                        gate.weight.stride, gate.bias, gate.relu, out.logits.data, out.logits.stride);
    cuda_detail::launch("route_dense launch", cuda_detail::select_kernel<0>, route_blocks(tokens), route_threads,
                        route_shared(n), stream, out.logits.data, out.logits.stride, tokens, n, k, options.renormalize,
                        rows_of(out));
    return 0;
  }

  /// route_dense on `stream` without the (unused) workspace arguments: a stream passed fifth would otherwise convert
  /// to the workspace's void* and the route would run on the default stream.
  template <class T, class Real>
  std::size_t route_dense(const dense_gate<Real>& gate, const matrix_view<T>& x, const select_options& options,
                          const route_outputs<Real>& out, cudaStream_t stream) const {
    return route_dense(gate, x, options, out, static_cast<void*>(nullptr), 0, stream);
  }

  /// Capacity slots under the position policy (see the header comment and device_checks).
  void assign_slots(const slot_problem& p, void* workspace, std::size_t workspace_bytes, cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::assign_slots";
    const std::size_t tokens = p.indices.rows, k = p.indices.cols, n = p.experts;
    detail::check_slot_shapes(fn, p, workspace_bytes, slot_workspace_size(tokens, n));
    if (!workspace || reinterpret_cast<std::uintptr_t>(workspace) % 8 != 0) {
      detail::raise<construction_policy>(errc::domain, fn, "workspace", workspace ? "misaligned" : "null",
                                         "must be device memory aligned to 8 bytes", 0);
    }
    if (tokens > static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max()) / k) {
      detail::raise<construction_policy>(errc::overflow, fn, "indices", detail::shape_text(tokens, k),
                                         "T k must be < 2^31 on the CUDA backend", 0);
    }
    auto* status = static_cast<unsigned long long*>(workspace);
    auto* counts = reinterpret_cast<int*>(static_cast<unsigned char*>(workspace) + cuda_detail::slot_status_bytes);
    cuda_detail::check(cudaMemsetAsync(status, 0xff, sizeof(unsigned long long), stream), "assign_slots status");
    if (tokens == 0) {
      cuda_detail::check(cudaMemsetAsync(p.tokens_per_expert, 0, n * sizeof(std::int64_t), stream), "assign_slots counts");
      cuda_detail::check(cudaMemsetAsync(p.kept_per_expert, 0, n * sizeof(std::int64_t), stream), "assign_slots counts");
      return;
    }
    const auto tile_count = static_cast<unsigned>(tiles(tokens));
    const std::size_t shared = n * sizeof(int);
    cuda_detail::launch("assign_slots launch", cuda_detail::slot_count_kernel<0>, tile_count, cuda_detail::warp, shared,
                        stream, p.indices.data, p.indices.stride, tokens, k, n, counts, status);
    if (checks_ == device_checks::synchronous && !p.indices_in_range) raise_bad_index(fn, p, workspace, stream);
    cuda_detail::launch("assign_slots launch", cuda_detail::slot_scan_kernel<0>, static_cast<unsigned>(n),
                        cuda_detail::slot_scan_threads, 0, stream, counts, tiles(tokens), n, p.capacity,
                        p.tokens_per_expert, p.kept_per_expert);
    cuda_detail::launch("assign_slots launch", cuda_detail::slot_rank_kernel<0>, tile_count, cuda_detail::warp, shared,
                        stream, p.indices.data, p.indices.stride, tokens, k, n, counts, p.capacity, p.expert.data,
                        p.expert.stride, p.slot.data, p.slot.stride);
  }

  /// After assign_slots(p, workspace, ...) with device_checks::deferred: waits for `stream` and throws the CPU
  /// backend's error for the first index outside [-1, n) that call met; returns when there was none.
  void check_slot_indices(const slot_problem& p, const void* workspace, cudaStream_t stream = nullptr) const {
    raise_bad_index("locmoe::cuda_backend::assign_slots", p, workspace, stream);
  }

  /// buffer[row of (t, j)] = x[t] for every kept pair; padding rows zeroed when pairs carries the kept counts.
  template <class T>
  void dispatch(const pair_layout& pairs, const matrix_view<const T>& x, const matrix_view<T>& buffer,
                cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::dispatch";
    detail::check_view<construction_policy>(fn, "x", x, pairs.tokens, x.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, x.cols, "must have d columns, as x");
    check_pairs(fn, pairs);
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    if (pairs.tokens > 0 && x.cols > 0) {
      const bool words = cuda_detail::rows_aligned16(x) && cuda_detail::rows_aligned16(buffer) &&
                         (x.cols * sizeof(T)) % 16 == 0;
      cuda_detail::launch("dispatch launch", cuda_detail::dispatch_kernel<T>, static_cast<unsigned>(pairs.tokens),
                          cuda_detail::row_threads, pairs.top_k * sizeof(std::size_t), stream, x.data, x.stride,
                          buffer.data, buffer.stride, buffer.rows, x.cols, words, pairs);
    }
    zero_padding(pairs, buffer, stream);
  }

  /// y[t] = sum of t's kept rows times their weights, in choice order (see the header comment).
  template <class T, class W>
  void combine(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
               const matrix_view<T>& y, cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::combine";
    detail::check_view<construction_policy>(fn, "y", y, pairs.tokens, y.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, y.cols, "must have d columns, as y");
    detail::check_view<construction_policy>(fn, "weight", weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    check_pairs<W>(fn, pairs);
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    launch_combine("combine launch", pairs, buffer, weight.data, weight.stride, y, stream);
  }

  /// combine's backward (dispatch.hpp's combine_backward): grad_buffer (optional) = w grad_y[t] at kept rows and
  /// zeros on padding rows; grad_weight (optional) = grad_y[t] . row, reduced in a fixed tree per block.
  template <class T, class W>
  void combine_backward(const pair_layout& pairs, const matrix_view<const T>& buffer, const matrix_view<const W>& weight,
                        const matrix_view<const T>& grad_y, const matrix_view<T>& grad_buffer,
                        const matrix_view<W>& grad_weight, cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::combine_backward";
    const std::size_t d = grad_y.cols;
    detail::check_view<construction_policy>(fn, "grad_y", grad_y, pairs.tokens, d, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "buffer", buffer, buffer.rows, d, "must have d columns, as grad_y");
    detail::check_view<construction_policy>(fn, "weight", weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    check_pairs<W>(fn, pairs);
    check_buffer_rows(fn, "buffer", buffer.rows, pairs);
    if (grad_buffer.present()) {
      detail::check_view<construction_policy>(fn, "grad_buffer", grad_buffer, buffer.rows, d, "must have buffer's shape");
    }
    if (grad_weight.present()) {
      detail::check_view<construction_policy>(fn, "grad_weight", grad_weight, pairs.tokens, pairs.top_k, "must be [T x k]");
    }
    if (pairs.tokens > 0) {
      using A = cuda_detail::accumulate_of<T>;
      const bool words = (d * sizeof(T)) % 16 == 0 && cuda_detail::rows_aligned16(grad_y) &&
                         (!grad_weight.present() || cuda_detail::rows_aligned16(buffer)) &&
                         (!grad_buffer.present() || cuda_detail::rows_aligned16(grad_buffer));
      cuda_detail::launch("combine_backward launch", cuda_detail::combine_backward_kernel<T, W>,
                          static_cast<unsigned>(pairs.tokens), cuda_detail::row_threads,
                          pairs.top_k * (sizeof(std::size_t) + sizeof(A)), stream, buffer.data, buffer.stride,
                          buffer.rows, weight.data, weight.stride, grad_y.data, grad_y.stride, grad_buffer.data,
                          grad_buffer.stride, grad_weight.data, grad_weight.stride, d, words, pairs);
    }
    if (grad_buffer.present()) zero_padding(pairs, grad_buffer, stream);
  }

  /// dispatch's backward: grad_x[t] = sum of t's kept rows of grad_buffer in choice order (combine with unit weights).
  template <class T>
  void dispatch_backward(const pair_layout& pairs, const matrix_view<const T>& grad_buffer, const matrix_view<T>& grad_x,
                         cudaStream_t stream = nullptr) const {
    constexpr const char* fn = "locmoe::cuda_backend::dispatch_backward";
    detail::check_view<construction_policy>(fn, "grad_x", grad_x, pairs.tokens, grad_x.cols, "must be [T x d]");
    detail::check_view<construction_policy>(fn, "grad_buffer", grad_buffer, grad_buffer.rows, grad_x.cols,
                                            "must have d columns, as grad_x");
    check_pairs(fn, pairs);
    check_buffer_rows(fn, "grad_buffer", grad_buffer.rows, pairs);
    launch_combine("dispatch_backward launch", pairs, grad_buffer, static_cast<const float*>(nullptr), 0, grad_x, stream);
  }

 private:
  static constexpr unsigned route_threads = cuda_detail::route_warps * cuda_detail::warp;
  static unsigned route_blocks(std::size_t tokens) {
    return static_cast<unsigned>((tokens + cuda_detail::route_warps - 1) / cuda_detail::route_warps);
  }
  static std::size_t route_shared(std::size_t n) { return cuda_detail::route_warps * n * sizeof(float); }
  static std::size_t tiles(std::size_t tokens) {
    return (tokens + cuda_detail::slot_tile_tokens - 1) / cuda_detail::slot_tile_tokens;
  }
  static cuda_detail::route_rows rows_of(const route_outputs<float>& out) {
    return {out.indices.data, out.indices.stride, out.weights.data,      out.weights.stride,
            out.probabilities.data, out.probabilities.stride, out.logits.data, out.logits.stride};
  }
  static void check_route_experts(const char* fn, const char* argument, std::size_t n) {
    if (n > static_cast<std::size_t>(cuda_detail::max_route_experts)) {
      detail::raise<construction_policy>(errc::domain, fn, argument, n, "must be <= 1024 on the CUDA backend", 0);
    }
  }

  /// The layout's rules the kernels rely on: pair arrays wherever there are pairs, `experts` with the grouped
  /// layout (it bounds the offsets read), and the launch limits: T < 2^31 blocks, k <= 1024 (their rows sit in
  /// shared memory), n < 2^31.
  template <class W = float>
  static void check_pairs(const char* fn, const pair_layout& pairs) {
    static_assert(std::is_same_v<W, float> || std::is_same_v<W, double>, "cuda_backend: weights are float or double");
    using P = construction_policy;
    constexpr std::size_t grid_limit = static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max());
    if (pairs.tokens * pairs.top_k > 0 && (!pairs.expert || !pairs.slot)) {
      detail::raise<P>(errc::domain, fn, "pairs", "null expert or slot", "must point to [T x k] arrays", 0);
    }
    if (pairs.top_k < 1 || pairs.top_k > static_cast<std::size_t>(cuda_detail::max_route_experts)) {
      detail::raise<P>(errc::domain, fn, "pairs.top_k", pairs.top_k, "must satisfy 1 <= k <= 1024 on the CUDA backend", 0);
    }
    if (pairs.tokens > grid_limit) {
      detail::raise<P>(errc::overflow, fn, "pairs.tokens", pairs.tokens, "must be < 2^31 on the CUDA backend", 0);
    }
    if (pairs.experts > grid_limit) {
      detail::raise<P>(errc::overflow, fn, "pairs.experts", pairs.experts, "must be < 2^31 on the CUDA backend", 0);
    }
    if (pairs.expert_offset && pairs.experts == 0) {
      detail::raise<P>(errc::domain, fn, "pairs.experts", 0, "must be given with expert_offset (the grouped layout)", 0);
    }
  }

  /// The routes take float, bf16 or fp16 activations (float scores; double activations need double scores,
  /// which the CPU backend has).
  template <class T>
  static constexpr void check_activations() {
    static_assert(!std::is_same_v<detail::plain_t<T>, double>, "cuda_backend: routes take float, bf16 or fp16 x");
  }

  /// The CPU backend's buffer-rows rule as far as host values decide it: with kept counts in the capacity layout,
  /// the buffer holds n C rows. (A kept pair's expert and the grouped layout's offsets are device memory: the
  /// kernels skip a pair outside the buffer.)
  static void check_buffer_rows(const char* fn, const char* argument, std::size_t rows, const pair_layout& pairs) {
    if (pairs.kept_per_expert && !pairs.expert_offset && rows < pairs.experts * pairs.capacity) {
      detail::raise<construction_policy>(errc::domain, fn, argument, rows,
                                         "must hold every expert's rows (n C, or the grouped layout's total)", 0);
    }
  }

  /// Reads the index-check record of assign_slots' workspace (waits for `stream`); throws for a bad index.
  static void raise_bad_index(const char* fn, const slot_problem& p, const void* workspace, cudaStream_t stream) {
    unsigned long long first = cuda_detail::no_bad_pair;
    cuda_detail::check(cudaMemcpyAsync(&first, workspace, sizeof first, cudaMemcpyDeviceToHost, stream), "index check");
    cuda_detail::check(cudaStreamSynchronize(stream), "index check");
    if (first == cuda_detail::no_bad_pair) return;
    const std::size_t k = p.indices.cols, t = static_cast<std::size_t>(first) / k, j = static_cast<std::size_t>(first) % k;
    expert_index value = 0;
    cuda_detail::check(cudaMemcpy(&value, p.indices.data + t * p.indices.stride + j, sizeof value, cudaMemcpyDeviceToHost),
                       "index check");
    detail::raise_bad_index(fn, t, j, value);
  }

  template <class T, class W>
  static void launch_combine(const char* what, const pair_layout& pairs, const matrix_view<const T>& buffer, const W* weight,
                             std::size_t w_stride, const matrix_view<T>& y, cudaStream_t stream) {
    if (pairs.tokens == 0 || y.cols == 0) return;
    using A = cuda_detail::accumulate_of<T>;
    const bool words = cuda_detail::rows_aligned16(buffer) && cuda_detail::rows_aligned16(y) && (y.cols * sizeof(T)) % 16 == 0;
    const std::size_t shared = pairs.top_k * (sizeof(std::size_t) + sizeof(A));
    cuda_detail::launch(what, cuda_detail::combine_kernel<T, W>, static_cast<unsigned>(pairs.tokens),
                        cuda_detail::row_threads, shared, stream, buffer.data, buffer.stride, buffer.rows, weight,
                        w_stride, y.data, y.stride, y.cols, words, pairs);
  }

  template <class T>
  static void zero_padding(const pair_layout& pairs, const matrix_view<T>& buffer, cudaStream_t stream) {
    if (!pairs.kept_per_expert || pairs.experts == 0 || buffer.cols == 0) return;
    const dim3 grid(static_cast<unsigned>(pairs.experts), 32);
    cuda_detail::launch("padding launch", cuda_detail::zero_padding_kernel<T>, grid, cuda_detail::row_threads, 0, stream,
                        buffer.data, buffer.stride, buffer.rows, buffer.cols, pairs);
  }

  device_checks checks_ = device_checks::synchronous;
};

}  // namespace locmoe
