// locmoe_torch's row operators (torch.ops.locmoe.*): permute's row order and pair table, unpermute's weights, and
// the gather / combine of rows with their backwards, on locmoe's cpu_backend (see locmoe_torch_ops.cpp).
//
// The row operators work on a "pair table": for each token t, the rows r of a permuted buffer that hold it, in
// increasing r ([T x k'] slots, -1 past the token's last row; k' = the most rows any token has). Every such pair
// is laid out as expert 0 at slot r of a one-expert grouped layout (pair_layout), so cpu_backend's dispatch,
// combine and their backwards serve Megatron-Core's permute and unpermute unchanged.
#include "ops_common.hpp"

#include <algorithm>
#include <array>
#include <cstdint>
#include <tuple>
#include <vector>

namespace locmoe_torch_ops {
namespace {

// ---- permute / unpermute -----------------------------------------------------------------------------------------

/// permute's row order: (sorted_indices [N] int64, row_expert [N] int64, the map's count of routed entries). Dropless: the (expert, token) entries
/// of the map in expert-major order, the routed ones first, cut at num_out_tokens. drop_and_pad: per expert the
/// first num_out_tokens / n of its tokens, routed ones first, each in token order.
std::tuple<Tensor, Tensor, int64_t> permute_index(const Tensor& map_in, int64_t num_out_tokens, bool drop_and_pad) {
  check_matrix(map_in, "routing_map");
  const int64_t T = map_in.size(0), n = map_in.size(1);
  TORCH_CHECK_VALUE(num_out_tokens >= 0 && num_out_tokens <= T * n, "locmoe_torch: num_out_tokens must be in [0, ",
                    "num_tokens * num_experts = ", T * n, "] (got ", num_out_tokens, ")");
  Tensor routed = map_in.to(at::kBool).contiguous();
  const bool* m = routed.data_ptr<bool>();
  const int64_t capacity = drop_and_pad ? num_out_tokens / n : 0;
  TORCH_CHECK_VALUE(!drop_and_pad || capacity <= T, "locmoe_torch: with drop_and_pad, num_out_tokens / num_experts ",
                    "must be <= num_tokens");
  // Pass 1 on the pool: each token range's routed count per expert.
  backend_lease lease;
  const auto ranges = token_ranges(static_cast<std::size_t>(T), lease.pool().threads(), 1024);
  const std::size_t R = ranges.size(), N = static_cast<std::size_t>(n);
  std::vector<int64_t> range_ones(R * N, 0);
  lease.pool().run(R, [&](std::size_t r) {
    int64_t* ones = range_ones.data() + r * N;
    for (std::size_t t = ranges[r].begin; t < ranges[r].end; ++t) for_each_true(m + t * N, N, [&](std::size_t e) { ++ones[e]; });
  });
  std::vector<int64_t> ones(N, 0);
  for (std::size_t r = 0; r < R; ++r)
    for (std::size_t e = 0; e < N; ++e) ones[e] += range_ones[r * N + e];
  // Where each expert's routed and unrouted entries start.
  std::vector<int64_t> first_one(N), first_zero(N);
  int64_t total_ones = 0;
  for (std::size_t e = 0; e < N; ++e) total_ones += ones[e];
  for (std::size_t e = 0, placed = 0, placed_zero = static_cast<std::size_t>(total_ones); e < N; ++e) {
    const auto ei = static_cast<int64_t>(e);
    if (drop_and_pad) {
      first_one[e] = ei * capacity;
      first_zero[e] = ei * capacity + std::min(ones[e], capacity);
    } else {
      first_one[e] = static_cast<int64_t>(placed);
      first_zero[e] = static_cast<int64_t>(placed_zero);
      placed += static_cast<std::size_t>(ones[e]);
      placed_zero += static_cast<std::size_t>(T - ones[e]);
    }
  }
  const int64_t rows = drop_and_pad ? n * capacity : num_out_tokens;
  Tensor sorted = at::empty({rows}, map_in.options().dtype(at::kLong));
  Tensor expert = at::empty({rows}, map_in.options().dtype(at::kLong));
  int64_t* s = sorted.data_ptr<int64_t>();
  int64_t* x = expert.data_ptr<int64_t>();
  // Pass 2 on the pool: each range writes its entries from its own offsets (the earlier ranges' counts), so the
  // order is that of one pass over the map, row by row. Unrouted entries only where rows are left for them
  // (num_out_tokens beyond the routed count, or an expert short of capacity).
  bool unrouted_needed = false;
  for (std::size_t e = 0; e < N; ++e) {
    const int64_t end = drop_and_pad ? (static_cast<int64_t>(e) + 1) * capacity : rows;
    unrouted_needed |= first_zero[e] < end;
  }
  std::vector<int64_t> one_at(R * N), zero_at(R * N);
  for (std::size_t e = 0; e < N; ++e) {
    int64_t one = first_one[e], zero = first_zero[e];
    for (std::size_t r = 0; r < R; ++r) {
      one_at[r * N + e] = one;
      zero_at[r * N + e] = zero;
      one += range_ones[r * N + e];
      zero += static_cast<int64_t>(ranges[r].end - ranges[r].begin) - range_ones[r * N + e];
    }
  }
  lease.pool().run(R, [&](std::size_t r) {
    int64_t* one = one_at.data() + r * N;
    int64_t* zero = zero_at.data() + r * N;
    for (std::size_t t = ranges[r].begin; t < ranges[r].end; ++t) {
      const bool* row = m + t * N;
      const auto place = [&](std::size_t e) {
        int64_t& at = row[e] ? one[e] : zero[e];
        if (at < (drop_and_pad ? (static_cast<int64_t>(e) + 1) * capacity : rows)) {
          s[at] = static_cast<int64_t>(t);
          x[at] = static_cast<int64_t>(e);
        }
        ++at;
      };
      if (unrouted_needed) {
        for (std::size_t e = 0; e < N; ++e) place(e);
      } else {
        for_each_true(row, N, place);
      }
    }
  });
  return std::make_tuple(sorted, expert, total_ones);
}

/// The pair table of a row order: for each token t < num_tokens, the rows r with sorted_indices[r] == t in
/// increasing r. Returns (slots [T, k'] int32, experts [T, k'] int32: 0 for a row, -1 past the token's last).
std::tuple<Tensor, Tensor> token_slots(const Tensor& sorted_in, int64_t num_tokens) {
  check_cpu(sorted_in, "sorted_indices");
  TORCH_CHECK_VALUE(sorted_in.dim() == 1, "locmoe_torch: sorted_indices must be 1-D");
  TORCH_CHECK_VALUE(num_tokens >= 0, "locmoe_torch: num_tokens must be >= 0");
  TORCH_CHECK_VALUE(sorted_in.size(0) < (int64_t{1} << 31), "locmoe_torch: at most 2^31 - 1 permuted rows");
  Tensor sorted = sorted_in.to(at::kLong).contiguous();
  const int64_t rows = sorted.size(0);
  const int64_t* s = sorted.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<std::size_t>(num_tokens), 0);
  int64_t width = 1;
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(s[r] >= 0 && s[r] < num_tokens, "locmoe_torch: sorted_indices[", r, "] = ", s[r],
                      " must be in [0, num_tokens = ", num_tokens, ")");
    width = std::max(width, ++count[s[r]]);
  }
  auto options = sorted.options().dtype(at::kInt);
  Tensor slots = at::full({num_tokens, width}, -1, options);
  Tensor experts = at::full({num_tokens, width}, locmoe::no_expert, options);
  auto* slot = slots.data_ptr<int32_t>();
  auto* expert = experts.data_ptr<int32_t>();
  std::fill(count.begin(), count.end(), 0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t at = s[r] * width + count[s[r]]++;
    slot[at] = static_cast<int32_t>(r);
    expert[at] = 0;
  }
  return std::make_tuple(slots, experts);
}

/// Each pair's weight for unpermute: probs[t, row_expert[slots[t][j]]], 0 past the token's last row; float64 when
/// `double_precision`, else float32 (exact for every probs dtype but float64).
Tensor pair_weights(const Tensor& probs_in, const Tensor& slots, const Tensor& row_expert_in, bool double_precision) {
  check_matrix(probs_in, "probs");
  check_row_dtype(probs_in, "probs");
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kInt && slots.is_contiguous() && slots.size(0) == probs_in.size(0),
                    "locmoe_torch: slots must be token_slots' int32 table with probs' rows");
  Tensor row_expert = row_expert_in.to(at::kLong).contiguous();
  Tensor probs = probs_in.contiguous();
  const auto out_type = double_precision ? at::kDouble : at::kFloat;
  Tensor weights = at::empty(slots.sizes(), probs.options().dtype(out_type));
  const int64_t n = probs.size(1), rows = row_expert.size(0), count = slots.numel();
  const int32_t* slot = slots.data_ptr<int32_t>();
  const int64_t* expert = row_expert.data_ptr<int64_t>();
  const int64_t width = slots.size(1);
  with_row_type(probs.scalar_type(), [&](auto element) {
    using P = decltype(element);
    const P* p = reinterpret_cast<const P*>(probs.data_ptr());
    AT_DISPATCH_FLOATING_TYPES(out_type, "locmoe_torch::pair_weights", [&] {
      scalar_t* w = weights.data_ptr<scalar_t>();
      for (int64_t i = 0; i < count; ++i) {
        const int32_t r = slot[i];
        if (r < 0) {
          w[i] = 0;
          continue;
        }
        TORCH_CHECK_VALUE(r < rows && expert[r] >= 0 && expert[r] < n, "locmoe_torch: row ", r, " has no expert in [0, ",
                          n, ")");
        w[i] = static_cast<scalar_t>(static_cast<double>(p[(i / width) * n + expert[r]]));
      }
    });
  });
  return weights;
}

/// pair_weights' backward: dL/dprobs [T, n] in probs' dtype, grad_weights[t][j] at (t, row_expert of the pair's row).
/// A token's pairs of one expert (several only for a hand-made sorted_indices) are summed in double in pair order
/// and rounded once. One pass over [T, n] on the pool, each token's row written whole (zeros included).
Tensor pair_weights_backward(const Tensor& grad_in, const Tensor& slots, const Tensor& row_expert_in, const Tensor& probs) {
  TORCH_CHECK_VALUE(grad_in.sizes() == slots.sizes(), "locmoe_torch: grad_weights must have the pair table's shape");
  check_matrix(probs, "probs");
  check_row_dtype(probs, "probs");
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kInt && slots.is_contiguous() && slots.size(0) == probs.size(0),
                    "locmoe_torch: slots must be token_slots' int32 table with probs' rows");
  Tensor grad_w = grad_in.to(at::kDouble).contiguous();
  Tensor row_expert = row_expert_in.to(at::kLong).contiguous();
  const int64_t T = probs.size(0), n = probs.size(1), width = slots.size(1), rows = row_expert.size(0);
  const int32_t* slot = slots.data_ptr<int32_t>();
  const int64_t* expert = row_expert.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * width; ++i) {  // checked here: a pool task must not throw
    TORCH_CHECK_VALUE(slot[i] < rows && (slot[i] < 0 || (expert[slot[i]] >= 0 && expert[slot[i]] < n)),
                      "locmoe_torch: row ", slot[i], " has no expert in [0, ", n, ")");
  }
  Tensor grad = at::empty({T, n}, probs.options().dtype(probs.scalar_type()).memory_format(at::MemoryFormat::Contiguous));
  const double* g = grad_w.data_ptr<double>();
  with_row_type(probs.scalar_type(), [&](auto element) {
    using P = decltype(element);
    P* out = reinterpret_cast<P*>(grad.data_ptr());
    const auto tokens = [&](locmoe::token_range range) {
      for (std::size_t t = range.begin; t < range.end; ++t) {
        P* row = out + t * static_cast<std::size_t>(n);
        std::fill(row, row + n, P(0.0f));
        const int32_t* pair = slot + t * static_cast<std::size_t>(width);
        const double* pair_grad = g + t * static_cast<std::size_t>(width);
        for (int64_t j = 0; j < width; ++j) {
          if (pair[j] < 0) continue;
          const int64_t e = expert[pair[j]];
          bool first = true;
          for (int64_t i = 0; i < j && first; ++i) first = !(pair[i] >= 0 && expert[pair[i]] == e);
          if (!first) continue;  // summed with the first pair of its expert
          double sum = 0.0 + pair_grad[j];
          for (int64_t i = j + 1; i < width; ++i) {
            if (pair[i] >= 0 && expert[pair[i]] == e) sum += pair_grad[i];
          }
          row[e] = static_cast<P>(sum);
        }
      }
    };
    backend_lease lease;
    const auto ranges = token_ranges(static_cast<std::size_t>(T), lease.pool().threads(), 1024);
    lease.pool().run(ranges.size(), [&](std::size_t r) { tokens(ranges[r]); });
  });
  return grad;
}

/// A pair table as the one-expert grouped layout (see the file comment); `offsets` must outlive the layout.
locmoe::pair_layout layout_of(const Tensor& slots, const Tensor& experts, int64_t rows, std::array<int64_t, 2>& offsets) {
  check_matrix(slots, "slots");
  TORCH_CHECK_VALUE(slots.scalar_type() == at::kInt && experts.scalar_type() == at::kInt &&
                        slots.sizes() == experts.sizes() && slots.is_contiguous() && experts.is_contiguous(),
                    "locmoe_torch: slots and experts must be contiguous int32 of one shape (token_slots' outputs)");
  const int32_t* slot = slots.data_ptr<int32_t>();
  const int32_t* expert = experts.data_ptr<int32_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK_VALUE((expert[i] == 0 && slot[i] >= 0 && slot[i] < rows) || (expert[i] == -1 && slot[i] == -1),
                      "locmoe_torch: pair ", i, " of the table (slot ", slot[i], ", expert ", expert[i], ") must be a ",
                      "row in [0, ", rows, ") with expert 0, or -1 with -1 (token_slots' outputs)");
  }
  offsets = {0, rows};
  locmoe::pair_layout pairs{experts.data_ptr<locmoe::expert_index>(), slots.data_ptr<locmoe::slot_index>(),
                            static_cast<std::size_t>(slots.size(0)), static_cast<std::size_t>(slots.size(1)), 0};
  pairs.experts = 1;
  pairs.expert_offset = offsets.data();
  return pairs;
}

/// permute's gather: out[r] = tokens[t] for every pair (t, r) of the table; out is [rows, hidden].
Tensor gather_rows(const Tensor& tokens_in, const Tensor& slots, const Tensor& experts, int64_t rows) {
  check_matrix(tokens_in, "tokens");
  check_row_dtype(tokens_in, "tokens");
  TORCH_CHECK_VALUE(tokens_in.size(0) == slots.size(0), "locmoe_torch: tokens must have one row per token of the table");
  Tensor tokens = tokens_in;
  Tensor out = at::empty({rows, tokens.size(1)}, tokens.options().memory_format(at::MemoryFormat::Contiguous));
  return checked([&] {
    with_row_type(tokens.scalar_type(), [&](auto element) {
      using T = decltype(element);
      std::array<int64_t, 2> offsets{};
      const auto pairs = layout_of(slots, experts, rows, offsets);
      const locmoe::matrix_view<const T> x = rows_view<T>(tokens);
      backend_lease lease;
      lease->dispatch(pairs, x, rows_view<T>(out));
    });
    return out;
  });
}

/// unpermute's scatter-add: y[t] = sum over t's rows r, in increasing r, of weights[t][j] * rows[r] (without
/// weights: of rows[r]); 16-bit rows summed in float and rounded once. weights: [T, k'] float32 or float64.
Tensor combine_rows(const Tensor& rows_in, const Tensor& slots, const Tensor& experts,
                    const c10::optional<Tensor>& weights_in, int64_t num_tokens) {
  check_matrix(rows_in, "permuted_tokens");
  check_row_dtype(rows_in, "permuted_tokens");
  TORCH_CHECK_VALUE(slots.size(0) == num_tokens, "locmoe_torch: the pair table must have num_tokens rows");
  Tensor rows = rows_in;
  Tensor y = at::empty({num_tokens, rows.size(1)}, rows.options().memory_format(at::MemoryFormat::Contiguous));
  return checked([&] {
    with_row_type(rows.scalar_type(), [&](auto element) {
      using T = decltype(element);
      std::array<int64_t, 2> offsets{};
      const auto pairs = layout_of(slots, experts, rows.size(0), offsets);
      const locmoe::matrix_view<const T> buffer = rows_view<T>(rows);
      backend_lease lease;
      if (!weights_in || !weights_in->defined()) {
        lease->dispatch_backward(pairs, buffer, rows_view<T>(y));
        return;
      }
      Tensor w = weights_in->contiguous();
      check_matrix(w, "weights");
      TORCH_CHECK_VALUE(w.sizes() == slots.sizes(), "locmoe_torch: weights must have the pair table's shape");
      TORCH_CHECK_VALUE(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble,
                        "locmoe_torch: weights must be float32 or float64");
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "locmoe_torch::combine_rows", [&] {
        const locmoe::matrix_view<const scalar_t> wv(w.data_ptr<scalar_t>(), w.size(0), w.size(1));
        lease->combine(pairs, buffer, wv, rows_view<T>(y));
      });
    });
    return y;
  });
}

/// combine_rows' backward with weights: (grad_rows [N, hidden] = weights[t][j] grad_y[t] on row r of pair (t, j),
/// grad_weights [T, k'] = grad_y[t] . rows[r], 0 past a token's last row).
std::tuple<Tensor, Tensor> combine_rows_backward(const Tensor& rows_in, const Tensor& slots, const Tensor& experts,
                                                 const Tensor& weights_in, const Tensor& grad_in) {
  check_matrix(rows_in, "permuted_tokens");
  check_row_dtype(rows_in, "permuted_tokens");
  check_matrix(grad_in, "grad_output");
  TORCH_CHECK_VALUE(grad_in.size(0) == slots.size(0) && grad_in.size(1) == rows_in.size(1),
                    "locmoe_torch: grad_output must be [num_tokens, hidden]");
  Tensor rows = rows_in;
  Tensor grad_y = grad_in.to(rows.scalar_type());
  Tensor w = weights_in.contiguous();
  TORCH_CHECK_VALUE(w.sizes() == slots.sizes() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
                    "locmoe_torch: weights must be float32 or float64 with the pair table's shape");
  Tensor grad_rows = at::empty(rows.sizes(), rows.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor grad_w = at::zeros_like(w);
  return checked([&] {
    with_row_type(rows.scalar_type(), [&](auto element) {
      using T = decltype(element);
      std::array<int64_t, 2> offsets{};
      const auto pairs = layout_of(slots, experts, rows.size(0), offsets);
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "locmoe_torch::combine_rows_backward", [&] {
        using W = scalar_t;
        const locmoe::matrix_view<const W> wv(w.data_ptr<W>(), w.size(0), w.size(1));
        const locmoe::matrix_view<W> gw(grad_w.data_ptr<W>(), w.size(0), w.size(1));
        backend_lease lease;
        lease->combine_backward(pairs, locmoe::matrix_view<const T>(rows_view<T>(rows)), wv,
                                locmoe::matrix_view<const T>(rows_view<T>(grad_y)), rows_view<T>(grad_rows), gw);
      });
    });
    return std::make_tuple(grad_rows, grad_w);
  });
}

}  // namespace
}  // namespace locmoe_torch_ops

TORCH_LIBRARY_FRAGMENT(locmoe, m) {
  m.def("permute_index(Tensor routing_map, int num_out_tokens, bool drop_and_pad) -> (Tensor, Tensor, int)");
  m.def("pair_weights(Tensor probs, Tensor slots, Tensor row_expert, bool double_precision) -> Tensor");
  m.def("pair_weights_backward(Tensor grad_weights, Tensor slots, Tensor row_expert, Tensor probs) -> Tensor");
  m.def("token_slots(Tensor sorted_indices, int num_tokens) -> (Tensor, Tensor)");
  m.def("gather_rows(Tensor tokens, Tensor slots, Tensor experts, int rows) -> Tensor");
  m.def("combine_rows(Tensor rows, Tensor slots, Tensor experts, Tensor? weights, int num_tokens) -> Tensor");
  m.def("combine_rows_backward(Tensor rows, Tensor slots, Tensor experts, Tensor weights, Tensor grad_output) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(locmoe, CPU, m) {
  using namespace locmoe_torch_ops;
  m.impl("permute_index", &permute_index);
  m.impl("pair_weights", &pair_weights);
  m.impl("pair_weights_backward", &pair_weights_backward);
  m.impl("token_slots", &token_slots);
  m.impl("gather_rows", &gather_rows);
  m.impl("combine_rows", &combine_rows);
  m.impl("combine_rows_backward", &combine_rows_backward);
}
