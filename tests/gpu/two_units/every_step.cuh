// Calls every step of cuda_backend for float and bf16 rows, so that a translation unit including this emits every
// kernel of backend/cuda.cuh. tests/gpu/two_units: two such units linked into one program must not clash.
#pragma once

#include <locmoe/backend/cuda.cuh>

namespace two_units {

/// Instantiates every step; runs them on empty inputs (no launch) when `run` (a device is present).
template <class T>
int every_step(bool run) {
  using namespace locmoe;
  const cuda_backend gpu;
  if (!run) return 0;
  const grap_gate<float> grap{8, 2, true, nullptr};
  const matrix_view<const T> x(nullptr, 0, 8);
  const route_outputs<float> out{{nullptr, 0, 1}, {nullptr, 0, 1}, {}, {nullptr, 0, 2}};
  gpu.route_grap(grap, x, select_options{1, false}, out);
  static const float weight[2 * 8] = {};  // never read: T = 0 launches nothing, but the gate's view is checked
  gpu.route_dense(dense_gate<float>{{weight, 2, 8}, nullptr, false}, x, select_options{1, false}, out);
  const pair_layout pairs{nullptr, nullptr, 0, 1, 0};
  const matrix_view<T> rows(nullptr, 0, 8);
  gpu.dispatch(pairs, x, rows);
  gpu.combine(pairs, matrix_view<const T>(nullptr, 0, 8), matrix_view<const float>(nullptr, 0, 1), rows);
  gpu.combine_backward(pairs, matrix_view<const T>(nullptr, 0, 8), matrix_view<const float>(nullptr, 0, 1), x, rows,
                       matrix_view<float>{});
  gpu.dispatch_backward(pairs, matrix_view<const T>(nullptr, 0, 8), rows);
  return 1;
}

}  // namespace two_units
