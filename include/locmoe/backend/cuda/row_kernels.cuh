// locmoe/backend/cuda/row_kernels.cuh - the CUDA backend's row moves: dispatch (one block per token: its row read
// once, written to each kept slot), combine and dispatch's backward (one block per token: its k choices loaded
// once, the k row loads issued before the in-order adds), combine's backward, and the padding rows.
// Rows move in 16-byte words where every row of both operands starts on a 16-byte boundary, else element by element.
// A pair whose buffer row lies outside the buffer (a layout that does not fit it: only the device knows its
// experts and offsets) is skipped, never written or read. Nobody includes this directly: backend/cuda.cuh does.
#pragma once

#include <locmoe/backend/cuda/device.cuh>
#include <locmoe/detail/rows.hpp>

namespace locmoe::cuda_detail {

constexpr int row_threads = 256;
constexpr std::size_t no_row = ~std::size_t{0};

/// The buffer row of pair p, or no_row when it is dropped or outside [0, buffer_rows).
__device__ __forceinline__ std::size_t pair_row(const pair_layout& pairs, std::size_t p, std::size_t buffer_rows) {
  const expert_index e = pairs.expert[p];
  const slot_index s = pairs.slot[p];
  if (e < 0 || s < 0 || (pairs.experts != 0 && static_cast<std::size_t>(e) >= pairs.experts)) return no_row;
  const std::size_t row = pairs.begin_of(static_cast<std::size_t>(e)) + static_cast<std::size_t>(s);
  return row < buffer_rows ? row : no_row;
}

/// Threads of the block load token t's pair rows, and their weights as A (1 without weight, none without
/// weights), into shared memory; returns after a barrier.
template <class A, class W>
__device__ void load_token_pairs(const pair_layout& pairs, std::size_t t, std::size_t buffer_rows, const W* weight,
                                 std::size_t w_stride, std::size_t* rows, A* weights) {
  const std::size_t k = pairs.top_k;
  for (std::size_t j = threadIdx.x; j < k; j += blockDim.x) {
    rows[j] = pair_row(pairs, t * k + j, buffer_rows);
    if (weights) weights[j] = weight ? static_cast<A>(weight[t * w_stride + j]) : A(1);
  }
  __syncthreads();
}

/// dispatch: buffer[row of (t, j)] = x[t] for each kept pair of token t (one block per token, rows in shared memory).
template <class T>
__global__ void dispatch_kernel(const T* x, std::size_t x_stride, T* buffer, std::size_t b_stride, std::size_t buffer_rows,
                                std::size_t d, bool words, pair_layout pairs) {
  LOCMOE_CUDA_DYNAMIC_SHARED(std::size_t, dispatch_rows);  // [k]
  const std::size_t t = blockIdx.x, k = pairs.top_k;
  load_token_pairs<float, float>(pairs, t, buffer_rows, nullptr, 0, dispatch_rows, nullptr);
  const T* from = x + t * x_stride;
  if (words) {
    const std::size_t count = d / word_elements<T>;
    const word* src = reinterpret_cast<const word*>(from);
    for (std::size_t i = threadIdx.x; i < count; i += 2 * blockDim.x) {  // two words in flight per thread
      const bool second = i + blockDim.x < count;
      const word a = __ldg(src + i), b = second ? __ldg(src + i + blockDim.x) : word{};
      for (std::size_t j = 0; j < k; ++j) {
        if (dispatch_rows[j] == no_row) continue;
        word* to = reinterpret_cast<word*>(buffer + dispatch_rows[j] * b_stride);
        to[i] = a;
        if (second) to[i + blockDim.x] = b;
      }
    }
    return;  // d is a whole number of words: rows_aligned16 and d * sizeof(T) % 16 == 0 were required
  }
  for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) {
    const T v = from[c];
    for (std::size_t j = 0; j < k; ++j) {
      if (dispatch_rows[j] != no_row) buffer[dispatch_rows[j] * b_stride + c] = v;
    }
  }
}

/// Adds w * row[c .. c + per) to sum[.] in order, unfused (the host's arithmetic).
template <class T, class A, std::size_t Per>
__device__ __forceinline__ void add_weighted(A (&sum)[Per], const T (&row)[Per], A w) {
#pragma unroll
  for (std::size_t e = 0; e < Per; ++e) sum[e] = add_rn(sum[e], mul_rn(w, static_cast<A>(to_accumulate(row[e]))));
}

/// combine (weight given) and dispatch's backward (weight null: every weight 1, so the same sums): one block per
/// token, each element ((0 + w0 r0) + w1 r1) + ... in choice order, unfused round-to-nearest: the CPU's
/// arithmetic. Choices are taken 4 at a time: their 4 row loads are issued before the adds.
template <class T, class W>
__global__ void combine_kernel(const T* buffer, std::size_t b_stride, std::size_t buffer_rows, const W* weight,
                               std::size_t w_stride, T* y, std::size_t y_stride, std::size_t d, bool words,
                               pair_layout pairs) {
  using A = accumulate_of<T>;
  LOCMOE_CUDA_DYNAMIC_SHARED(std::size_t, combine_shared);  // rows [k], then weights [k] (A: 8 bytes at most)
  const std::size_t t = blockIdx.x, k = pairs.top_k;
  std::size_t* rows = combine_shared;
  A* weights = reinterpret_cast<A*>(combine_shared + k);
  load_token_pairs(pairs, t, buffer_rows, weight, w_stride, rows, weights);
  const auto w_of = [&](std::size_t j) { return weights[j]; };
  T* out = y + t * y_stride;
  if (words) {
    constexpr std::size_t per = word_elements<T>;
    const std::size_t count = d / per;
    for (std::size_t i = threadIdx.x; i < count; i += blockDim.x) {
      A sum[per];
#pragma unroll
      for (std::size_t e = 0; e < per; ++e) sum[e] = A(0);
      for (std::size_t j0 = 0; j0 < k; j0 += 4) {
        word loaded[4] = {};
#pragma unroll
        for (std::size_t j = 0; j < 4; ++j) {
          const std::size_t r = j0 + j < k ? rows[j0 + j] : no_row;
          if (r != no_row) loaded[j] = __ldg(reinterpret_cast<const word*>(buffer + r * b_stride) + i);
        }
#pragma unroll
        for (std::size_t j = 0; j < 4; ++j) {
          if (j0 + j >= k || rows[j0 + j] == no_row) continue;
          T v[per];
          unpack(loaded[j], v);
          add_weighted(sum, v, w_of(j0 + j));
        }
      }
      T result[per];
#pragma unroll
      for (std::size_t e = 0; e < per; ++e) result[e] = from_accumulate<T>(sum[e]);
      word packed;
      memcpy(&packed, result, sizeof(word));
      reinterpret_cast<word*>(out)[i] = packed;
    }
    return;
  }
  for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) {
    A sum[1] = {A(0)};
    for (std::size_t j = 0; j < k; ++j) {
      if (rows[j] == no_row) continue;
      const T v[1] = {buffer[rows[j] * b_stride + c]};
      add_weighted(sum, v, w_of(j));
    }
    out[c] = from_accumulate<T>(sum[0]);
  }
}

/// combine's backward: one block per token, its choices loaded once, taken 4 at a time: grad_y[t] is read once per
/// group (16-byte words where every row is aligned); for each kept pair, grad_buffer's row = w grad_y[t] (rounded
/// once: the CPU's bits) and grad_weight = grad_y[t] . row, each thread summing its words in order, then a fixed
/// shared-memory tree: deterministic, but not the CPU's order (the dots may differ from the CPU's in the last bits).
constexpr std::size_t backward_group = 4;
template <class T, class W>
__global__ void combine_backward_kernel(const T* buffer, std::size_t b_stride, std::size_t buffer_rows, const W* weight,
                                        std::size_t w_stride, const T* grad_y, std::size_t gy_stride, T* grad_buffer,
                                        std::size_t gb_stride, W* grad_weight, std::size_t gw_stride, std::size_t d,
                                        bool words, pair_layout pairs) {
  using A = accumulate_of<T>;
  __shared__ A partial[backward_group][row_threads];
  LOCMOE_CUDA_DYNAMIC_SHARED(std::size_t, backward_shared);  // rows [k], then weights [k]
  const std::size_t t = blockIdx.x, k = pairs.top_k;
  std::size_t* rows = backward_shared;
  A* weights = reinterpret_cast<A*>(backward_shared + k);
  load_token_pairs(pairs, t, buffer_rows, weight, w_stride, rows, weights);
  const T* dy = grad_y + t * gy_stride;
  constexpr std::size_t per = word_elements<T>;
  const std::size_t count = words ? d / per : d;  // words, or elements
  for (std::size_t j0 = 0; j0 < k; j0 += backward_group) {
    A dot[backward_group];
    bool kept[backward_group];
#pragma unroll
    for (std::size_t j = 0; j < backward_group; ++j) {
      dot[j] = A(0);
      kept[j] = j0 + j < k && rows[j0 + j] != no_row;
    }
    for (std::size_t i = threadIdx.x; i < count; i += blockDim.x) {
      T g[per], r[backward_group][per];  // element path: [0] only
      if (words) {
        unpack(__ldg(reinterpret_cast<const word*>(dy) + i), g);
      } else {
        g[0] = dy[i];
      }
      if (grad_weight) {
#pragma unroll
        for (std::size_t j = 0; j < backward_group; ++j) {  // the rows' loads before the adds
          if (!kept[j]) continue;
          const T* row = buffer + rows[j0 + j] * b_stride;
          if (words) {
            unpack(__ldg(reinterpret_cast<const word*>(row) + i), r[j]);
          } else {
            r[j][0] = row[i];
          }
        }
      }
      const std::size_t elements = words ? per : 1;
#pragma unroll
      for (std::size_t j = 0; j < backward_group; ++j) {
        if (!kept[j]) continue;
        if (grad_buffer) {
          T out[per];
          for (std::size_t e = 0; e < elements; ++e) out[e] = from_accumulate<T>(mul_rn(weights[j0 + j], to_accumulate(g[e])));
          T* to = grad_buffer + rows[j0 + j] * gb_stride;
          if (words) {
            word packed;
            memcpy(&packed, out, sizeof(word));
            reinterpret_cast<word*>(to)[i] = packed;
          } else {
            to[i] = out[0];
          }
        }
        if (grad_weight) {
          for (std::size_t e = 0; e < elements; ++e) {
            dot[j] = add_rn(dot[j], mul_rn(static_cast<A>(to_accumulate(g[e])), static_cast<A>(to_accumulate(r[j][e]))));
          }
        }
      }
    }
    if (!grad_weight) continue;
#pragma unroll
    for (std::size_t j = 0; j < backward_group; ++j) partial[j][threadIdx.x] = dot[j];
    __syncthreads();
    for (unsigned width = blockDim.x / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) {
#pragma unroll
        for (std::size_t j = 0; j < backward_group; ++j) {
          partial[j][threadIdx.x] = add_rn(partial[j][threadIdx.x], partial[j][threadIdx.x + width]);
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      for (std::size_t j = 0; j < backward_group && j0 + j < k; ++j) {
        grad_weight[t * gw_stride + j0 + j] = kept[j] ? static_cast<W>(partial[j][0]) : W(0);
      }
    }
    __syncthreads();  // partial is rewritten by the next group
  }
}

/// The padding rows of each expert (after its kept rows, to the end of its rows) set to zero: blockIdx.x the
/// expert, blockIdx.y a stripe of its rows.
template <class T>
__global__ void zero_padding_kernel(T* buffer, std::size_t stride, std::size_t buffer_rows, std::size_t d,
                                    pair_layout pairs) {
  const std::size_t e = blockIdx.x;
  const std::size_t begin = pairs.begin_of(e), end = min(pairs.end_of(e), buffer_rows);
  const std::int64_t kept = pairs.kept_per_expert[e];
  for (std::size_t r = begin + static_cast<std::size_t>(kept > 0 ? kept : 0) + blockIdx.y; r < end; r += gridDim.y) {
    for (std::size_t c = threadIdx.x; c < d; c += blockDim.x) buffer[r * stride + c] = from_accumulate<T>(0.0f);
  }
}

}  // namespace locmoe::cuda_detail
