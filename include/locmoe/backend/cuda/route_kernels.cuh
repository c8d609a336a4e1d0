// locmoe/backend/cuda/route_kernels.cuh - the CUDA backend's routes: the GrAP gate (one warp per token, 16-byte
// loads), the dense gate (a tiled GEMM that reads x once per 64 experts), and the warp-wide softmax + Top-k both
// end with. Nobody includes this directly: backend/cuda.cuh does.
#pragma once

#include <locmoe/backend/cuda/device.cuh>

#include <cmath>

namespace locmoe::cuda_detail {

constexpr int route_warps = 4;  // tokens per block of the routes
constexpr int max_route_experts = 1024;

/// Where one token's route goes (the rows of token t of route_outputs).
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

/// Softmax and Top-k of one token's logits (shared memory, overwritten), by the whole warp, with select.hpp's
/// rules: a NaN or +inf logit, or no logit above -inf, makes the token invalid (indices -1, weights and
/// probabilities 0); -inf masks an expert; Top-k on the logits, ties to the lower index; fewer than k unmasked
/// experts leave -1 / 0 in the last choices. e_i = exp(l_i - max); probabilities e_i / sum e; weights e_c / sum e,
/// or e_c / (sum of the chosen e in choice order) when renormalizing (the CPU's formulas; the sum over the experts
/// is a lane-strided tree here, so weights and probabilities may differ from the CPU's in the last bits).
/// O(k n / 32 + k log 32) per token.
__device__ inline void select_token(float* logits, std::size_t n, std::size_t k, bool renormalize,
                                    const route_rows& out, std::size_t t, int lane) {
  bool bad = false;
  float top = -INFINITY;
  for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) {
    const float l = logits[i];
    bad = bad || l != l || l == INFINITY;
    top = fmaxf(top, l);
  }
  bad = __any_sync(full_mask, bad);
  top = warp_max(top);
  expert_index* indices = out.indices + t * out.i_stride;
  float* weights = out.weights + t * out.w_stride;
  float* probabilities = out.probabilities ? out.probabilities + t * out.p_stride : nullptr;
  if (bad || top == -INFINITY) {
    for (std::size_t j = static_cast<std::size_t>(lane); j < k; j += warp) {
      indices[j] = no_expert;
      weights[j] = 0.0f;
    }
    if (probabilities) {
      for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) probabilities[i] = 0.0f;
    }
    return;
  }
  float total = 0.0f;
  for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) total += expf(logits[i] - top);
  total = group_sum(total, warp);
  if (probabilities) {
    for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) probabilities[i] = expf(logits[i] - top) / total;
  }
  float chosen_total = 0.0f;  // lane 0: the chosen e in choice order
  for (std::size_t j = 0; j < k; ++j) {
    float best = -INFINITY;
    unsigned at = static_cast<unsigned>(n);  // none
    for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) {
      if (logits[i] > best) {  // strict, scanning upward: the lowest index among equals
        best = logits[i];
        at = static_cast<unsigned>(i);
      }
    }
    for (int offset = warp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(full_mask, best, offset);
      const unsigned other_at = __shfl_xor_sync(full_mask, at, offset);
      if (other > best || (other == best && other_at < at)) {
        best = other;
        at = other_at;
      }
    }
    if (at == n || best == -INFINITY) {  // fewer than k experts left unmasked
      if (lane == 0) {
        indices[j] = no_expert;
        weights[j] = 0.0f;
      }
      continue;
    }
    if (lane == 0) {
      const float e = expf(best - top);
      indices[j] = static_cast<expert_index>(at);
      weights[j] = e;  // divided below
      chosen_total += e;
      logits[at] = -INFINITY;  // taken
    }
    __syncwarp();
  }
  if (lane == 0) {
    const float divisor = renormalize ? chosen_total : total;
    for (std::size_t j = 0; j < k; ++j) {
      if (indices[j] != no_expert) weights[j] /= divisor;
    }
  }
}

/// Lanes [group * width, group * width + width) sum elements [begin, end) of a row: a scalar head up to the first
/// 16-byte boundary, 16-byte words (four in flight per lane), a scalar tail. The order depends on the row's
/// alignment and the group width only.
template <class T>
__device__ float strided_sum(const T* row, std::size_t begin, std::size_t end, unsigned sub, unsigned width) {
  constexpr std::size_t per_word = word_elements<T>;
  const T* p = row + begin;
  const std::size_t count = end - begin;
  std::size_t head = ((16 - reinterpret_cast<std::uintptr_t>(p) % 16) % 16) / sizeof(T);
  if (head > count) head = count;
  float sum = 0.0f;
  for (std::size_t c = sub; c < head; c += width) sum += to_accumulate(p[c]);
  const std::size_t words = (count - head) / per_word;
  const word* w = reinterpret_cast<const word*>(p + head);
  std::size_t i = sub;
  for (; i + 3 * width < words; i += 4 * width) {
    const word w0 = __ldg(w + i), w1 = __ldg(w + i + width), w2 = __ldg(w + i + 2 * width), w3 = __ldg(w + i + 3 * width);
    T v[4][per_word];
    unpack(w0, v[0]);
    unpack(w1, v[1]);
    unpack(w2, v[2]);
    unpack(w3, v[3]);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
      for (std::size_t e = 0; e < per_word; ++e) sum += to_accumulate(v[r][e]);
    }
  }
  for (; i < words; i += width) {
    T v[per_word];
    unpack(__ldg(w + i), v);
#pragma unroll
    for (std::size_t e = 0; e < per_word; ++e) sum += to_accumulate(v[e]);
  }
  for (std::size_t c = head + words * per_word + sub; c < count; c += width) sum += to_accumulate(p[c]);
  return sum;
}

/// Lanes per GrAP block: a power of two near half the block's 16-byte words, so that each lane has about two
/// words in flight and small blocks (large n) are summed several at a time by one warp.
__host__ __device__ inline unsigned grap_group_width(std::size_t d, std::size_t n, std::size_t element_bytes) {
  const std::size_t words = (d / n) * element_bytes / 16;
  unsigned width = 1;
  while (width < static_cast<unsigned>(warp) && 2 * width * 2 <= words) width *= 2;
  return width;
}

/// One warp per token: GrAP block means (eq. 4), + bias, ReLU (NaN stays NaN), then select_token.
template <class T>
__global__ void grap_route_kernel(const T* x, std::size_t stride, std::size_t tokens, std::size_t d, std::size_t n,
                                  std::size_t k, const float* bias, bool relu, bool renormalize, unsigned width,
                                  route_rows out) {
  LOCMOE_CUDA_DYNAMIC_SHARED(float, shared_logits);  // [route_warps][n]
  const int lane = static_cast<int>(threadIdx.x) % warp, w = static_cast<int>(threadIdx.x) / warp;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * route_warps + static_cast<std::size_t>(w);
  if (t >= tokens) return;  // the whole warp returns: every shuffle below has all 32 lanes
  float* logits = shared_logits + static_cast<std::size_t>(w) * n;
  const T* row = x + t * stride;
  const unsigned sub = static_cast<unsigned>(lane) % width, groups = warp / width;
  for (std::size_t first = 0; first < n; first += groups) {
    const std::size_t i = first + static_cast<unsigned>(lane) / width;
    float sum = 0.0f;
    std::size_t begin = 0, end = 0;
    if (i < n) {
      begin = i * (d / n) + (i * (d % n)) / n;  // grap_block_begin
      end = (i + 1) * (d / n) + ((i + 1) * (d % n)) / n;
      sum = strided_sum(row, begin, end, sub, width);
    }
    sum = group_sum(sum, static_cast<int>(width));
    if (i < n && sub == 0) {
      float value = sum / static_cast<float>(end - begin);
      if (bias) value += bias[i];
      if (relu && value < 0.0f) value = 0.0f;
      logits[i] = value;
      if (out.logits) out.logits[t * out.l_stride + i] = value;
    }
  }
  __syncwarp();
  select_token(logits, n, k, renormalize, out, t, lane);
}

/// One warp per token: select_token on logits already written (the dense route's second step).
template <int = 0>
__global__ void select_kernel(const float* logits, std::size_t l_stride, std::size_t tokens, std::size_t n, std::size_t k,
                              bool renormalize, route_rows out) {
  LOCMOE_CUDA_DYNAMIC_SHARED(float, shared_logits);  // [route_warps][n]
  const int lane = static_cast<int>(threadIdx.x) % warp, w = static_cast<int>(threadIdx.x) / warp;
  const std::size_t t = static_cast<std::size_t>(blockIdx.x) * route_warps + static_cast<std::size_t>(w);
  if (t >= tokens) return;
  float* row = shared_logits + static_cast<std::size_t>(w) * n;
  for (std::size_t i = static_cast<std::size_t>(lane); i < n; i += warp) row[i] = logits[t * l_stride + i];
  __syncwarp();
  select_token(row, n, k, renormalize, out, t, lane);
}

// The dense gate's GEMM tiles: 64 tokens x 64 experts per block of 256 threads, 32 features per step; each thread
// owns 4 tokens x 4 experts.
constexpr int dense_tile_tokens = 64, dense_tile_experts = 64, dense_tile_features = 32, dense_threads = 256;

/// logits[t][e] = act(sum_c x[t][c] W[e][c] + b[e]) for a 64 x 64 tile: x and W staged in shared memory (x
/// converted to float there), each product accumulated with fmaf in feature order. blockIdx.x: token tile,
/// blockIdx.y: expert tile. x is read once per expert tile (once for n <= 64).
template <class T>
__global__ void dense_logits_kernel(const T* x, std::size_t x_stride, std::size_t tokens, std::size_t d, std::size_t n,
                                    const float* weight, std::size_t w_stride, const float* bias, bool relu,
                                    float* logits, std::size_t l_stride) {
  __shared__ float xs[dense_tile_features][dense_tile_tokens + 1];   // transposed: column c, token r (+1: no bank
  __shared__ float ws[dense_tile_features][dense_tile_experts + 1];  // conflicts on the transposed stores)
  const std::size_t t0 = static_cast<std::size_t>(blockIdx.x) * dense_tile_tokens;
  const std::size_t e0 = static_cast<std::size_t>(blockIdx.y) * dense_tile_experts;
  const int tid = static_cast<int>(threadIdx.x);
  const int ty = tid / 16, tx = tid % 16;  // tokens ty*4 .. +4, experts tx*4 .. +4
  float acc[4][4] = {};
  for (std::size_t c0 = 0; c0 < d; c0 += dense_tile_features) {
    // 64 x 32 of x and of W: 8 values per thread each; a warp reads 32 consecutive features of one row.
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int row = r * 8 + tid / 32, col = tid % 32;
      const std::size_t c = c0 + static_cast<std::size_t>(col);
      const std::size_t t = t0 + static_cast<std::size_t>(row), e = e0 + static_cast<std::size_t>(row);
      xs[col][row] = (t < tokens && c < d) ? static_cast<float>(to_accumulate(x[t * x_stride + c])) : 0.0f;
      ws[col][row] = (e < n && c < d) ? weight[e * w_stride + c] : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < dense_tile_features; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[c][ty * 4 + i];
        b[i] = ws[c][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::size_t t = t0 + static_cast<std::size_t>(ty * 4 + i);
    if (t >= tokens) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::size_t e = e0 + static_cast<std::size_t>(tx * 4 + j);
      if (e >= n) continue;
      float value = acc[i][j] + (bias ? bias[e] : 0.0f);
      if (relu && value < 0.0f) value = 0.0f;
      logits[t * l_stride + e] = value;
    }
  }
}

}  // namespace locmoe::cuda_detail
