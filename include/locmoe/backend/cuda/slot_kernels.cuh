// locmoe/backend/cuda/slot_kernels.cuh - capacity slots under the position policy on the device, in three kernels
// that scale with T: per-tile counts per expert (one warp per tile of slot_tile_tokens tokens), an exclusive scan
// of each expert's counts over the tiles (one block per expert), then each tile ranks its choices in order, 32 at
// a time (__match_any_sync: the lanes with the same expert, numbered by lane). A choice's slot is the number of
// earlier choices (in (t, j) order) of its expert: exactly the CPU's slots. Integer counts only: deterministic.
// Nobody includes this directly: backend/cuda.cuh does.
#pragma once

#include <locmoe/backend/cuda/device.cuh>

namespace locmoe::cuda_detail {

constexpr std::size_t slot_tile_tokens = 128;
/// Workspace bytes before the tile counts: the index-check record (the first bad pair, as unsigned long long).
constexpr std::size_t slot_status_bytes = 256;
constexpr unsigned long long no_bad_pair = ~0ull;

/// The expert of pair p, or -2 for a pair past the end; a value outside [-1, n) is recorded in *status (the
/// lowest such p wins) and read as -1 (dropped).
__device__ __forceinline__ expert_index checked_choice(const expert_index* indices, std::size_t stride, std::size_t k,
                                                       std::size_t pairs, std::size_t n, std::size_t p,
                                                       unsigned long long* status) {
  if (p >= pairs) return -2;
  const expert_index e = indices[(p / k) * stride + p % k];
  if (e < no_expert || (e >= 0 && static_cast<std::size_t>(e) >= n)) {
    if (status) atomicMin(status, static_cast<unsigned long long>(p));
    return no_expert;
  }
  return e;
}

/// One warp per tile: counts[tile][e] = the tile's choices of expert e; the bad indices recorded in *status.
template <int = 0>
__global__ void slot_count_kernel(const expert_index* indices, std::size_t stride, std::size_t tokens, std::size_t k,
                                  std::size_t n, int* counts, unsigned long long* status) {
  LOCMOE_CUDA_DYNAMIC_SHARED(int, tile_counts);  // [n]
  const unsigned lane = threadIdx.x;
  for (std::size_t e = lane; e < n; e += warp) tile_counts[e] = 0;
  __syncwarp();
  const std::size_t tile = blockIdx.x, pairs = tokens * k;
  const std::size_t begin = tile * slot_tile_tokens * k, end = min(pairs, begin + slot_tile_tokens * k);
  for (std::size_t base = begin; base < end; base += warp) {
    const expert_index e = checked_choice(indices, stride, k, pairs, n, base + lane, status);
    if (e >= 0) atomicAdd(&tile_counts[e], 1);  // integer adds: the order does not matter
  }
  __syncwarp();
  for (std::size_t e = lane; e < n; e += warp) counts[tile * n + e] = tile_counts[e];
}

/// One block per expert: counts[.][e] becomes its exclusive prefix over the tiles (a block-wide scan, 256 tiles at a
/// time); tokens_per_expert[e] = the total, kept_per_expert[e] = min(total, C).
constexpr int slot_scan_threads = 256;
template <int = 0>
__global__ void slot_scan_kernel(int* counts, std::size_t tiles, std::size_t n, std::int64_t capacity,
                                 std::int64_t* tokens_per_expert, std::int64_t* kept_per_expert) {
  __shared__ long long warp_totals[slot_scan_threads / warp];
  const std::size_t e = blockIdx.x;
  const unsigned lane = threadIdx.x % warp, w = threadIdx.x / warp;
  long long carry = 0;
  for (std::size_t first = 0; first < tiles; first += slot_scan_threads) {
    const std::size_t tile = first + threadIdx.x;
    const long long here = tile < tiles ? counts[tile * n + e] : 0;
    long long inclusive = here;
    for (int offset = 1; offset < warp; offset *= 2) {
      const long long before = __shfl_up_sync(full_mask, inclusive, offset);
      if (static_cast<int>(lane) >= offset) inclusive += before;
    }
    if (lane == warp - 1) warp_totals[w] = inclusive;
    __syncthreads();
    long long before_warp = 0, chunk = 0;
    for (unsigned i = 0; i < slot_scan_threads / warp; ++i) {
      if (i < w) before_warp += warp_totals[i];
      chunk += warp_totals[i];
    }
    if (tile < tiles) counts[tile * n + e] = static_cast<int>(carry + before_warp + inclusive - here);
    carry += chunk;
    __syncthreads();  // warp_totals is rewritten by the next chunk
  }
  if (threadIdx.x == 0) {
    tokens_per_expert[e] = carry;
    kept_per_expert[e] = carry < capacity ? carry : capacity;
  }
}

/// One warp per tile: each choice's slot = its expert's offset for the tile + the earlier choices of that expert in
/// the tile; kept when the slot is < C, else expert and slot -1 (so are masked and bad choices).
template <int = 0>
__global__ void slot_rank_kernel(const expert_index* indices, std::size_t i_stride, std::size_t tokens, std::size_t k,
                                 std::size_t n, const int* offsets, std::int64_t capacity, expert_index* expert,
                                 std::size_t e_stride, slot_index* slot, std::size_t s_stride) {
  LOCMOE_CUDA_DYNAMIC_SHARED(int, next_slot);  // [n]
  const unsigned lane = threadIdx.x;
  const std::size_t tile = blockIdx.x, pairs = tokens * k;
  for (std::size_t e = lane; e < n; e += warp) next_slot[e] = offsets[tile * n + e];
  __syncwarp();
  const std::size_t begin = tile * slot_tile_tokens * k, end = min(pairs, begin + slot_tile_tokens * k);
  const unsigned earlier = (1u << lane) - 1u;
  for (std::size_t base = begin; base < end; base += warp) {
    const std::size_t p = base + lane;
    const expert_index e = checked_choice(indices, i_stride, k, pairs, n, p, nullptr);
    const unsigned same = __match_any_sync(full_mask, e);  // the lanes holding this expert (or -1, or -2)
    long long s = -1;
    if (e >= 0) s = static_cast<long long>(next_slot[e]) + __popc(same & earlier);
    __syncwarp();  // every lane has read next_slot before the first of each expert advances it
    if (e >= 0 && (same & earlier) == 0) next_slot[e] += __popc(same);
    __syncwarp();
    if (p < pairs) {
      const bool kept = e >= 0 && s < capacity;
      expert[(p / k) * e_stride + p % k] = kept ? e : no_expert;
      slot[(p / k) * s_stride + p % k] = kept ? static_cast<slot_index>(s) : -1;
    }
  }
}

}  // namespace locmoe::cuda_detail
