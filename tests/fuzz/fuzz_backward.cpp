// The training step's backward functions on random routes: route_backward (every router's weight rule), the
// router losses (aux, z, locality) and their gradient, and combine_backward / dispatch_backward through a
// dispatch plan. Promised: for finite inputs of moderate size (|logit| < 8, here) every value and gradient is
// finite, masked (-inf) experts and skipped tokens get exactly 0, and each gradient is the same on a second call
// (determinism). Inputs with NaN, +-inf and extreme values run too: they may give non-finite results, but never a
// crash, a sanitizer report or an error other than a locmoe::error.
#include "fuzz_input.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/route_backward.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

using locmoe::expert_index;
using locmoe::no_expert;

namespace {

template <class S>
bool all_finite(const std::vector<S>& v) {
  for (const S x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

template <class S>
void step(locmoe_fuzz::input& in, bool wild) {
  const std::size_t n = in.size_between(1, 24), tokens = in.size_between(0, 24);
  locmoe::router_options<S> o;
  o.k = in.size_between(1, std::min<std::size_t>(n, 4));
  o.score = in.flag() ? locmoe::score_function::sigmoid : locmoe::score_function::softmax;
  o.softmax_before_topk = in.flag();
  o.renormalize = in.flag();
  o.scale = wild ? in.value<S>() : S(1) + S(in.size_between(0, 3));
  std::vector<S> logits(tokens * n);
  std::vector<bool> masked(tokens * n);
  for (std::size_t i = 0; i < logits.size(); ++i) {
    logits[i] = wild ? in.value<S>() : in.value<S>(false);
    if (!wild && in.raw<std::uint8_t>() % 16 == 0) logits[i] = -std::numeric_limits<S>::infinity(), masked[i] = true;
  }
  const locmoe::matrix_view<const S> logit_view(logits.data(), tokens, n);
  std::vector<expert_index> idx(tokens * o.k);
  std::vector<S> w(tokens * o.k), grad_w(tokens * o.k), grad_logits(tokens * n, S(0));
  const locmoe::matrix_view<expert_index> idx_view(idx.data(), tokens, o.k);
  locmoe::score_route(logit_view, o, {idx_view, {w.data(), tokens, o.k}, {}, {}});
  for (S& g : grad_w) g = wild ? in.value<S>() : in.value<S>(false);
  locmoe::route_backward(logit_view, o, locmoe::matrix_view<const expert_index>(idx.data(), tokens, o.k),
                         locmoe::matrix_view<const S>(grad_w.data(), tokens, o.k),
                         locmoe::matrix_view<S>(grad_logits.data(), tokens, n));
  std::vector<S> again(tokens * n, S(0));
  locmoe::route_backward(logit_view, o, locmoe::matrix_view<const expert_index>(idx.data(), tokens, o.k),
                         locmoe::matrix_view<const S>(grad_w.data(), tokens, o.k), locmoe::matrix_view<S>(again.data(), tokens, n));
  LOCMOE_FUZZ_CHECK(again.empty() || std::memcmp(again.data(), grad_logits.data(), again.size() * sizeof(S)) == 0, "route_backward deterministic");
  if (!wild) {
    LOCMOE_FUZZ_CHECK(all_finite(grad_logits), "route_backward: finite gradient for finite input");
    for (std::size_t i = 0; i < masked.size(); ++i)
      if (masked[i]) LOCMOE_FUZZ_CHECK(grad_logits[i] == 0, "a masked expert gets no gradient");
  }

  // The losses, with a locality term on a random uniform topology.
  const std::size_t ranks = in.size_between(1, 4);
  const auto topo = locmoe::topology::uniform(static_cast<std::int64_t>(ranks), 1 + static_cast<std::int64_t>(in.size_between(0, 1)) * (ranks % 2 == 0),
                                              static_cast<std::int64_t>(n));
  locmoe::router_loss_options<S> lo;
  lo.aux.coeff = S(0.01) * S(in.size_between(0, 2));
  lo.aux.normalization = in.flag() ? locmoe::aux_normalization::first_choice : locmoe::aux_normalization::all_choices;
  lo.aux.score = o.score;
  lo.z_coeff = S(0.001) * S(in.size_between(0, 2));
  if (in.flag()) {
    lo.locality.topo = &topo;
    lo.locality.coeff = S(0.01);
    lo.locality.token_rank = locmoe::token_ranks::contiguous_blocks();
  }
  std::vector<S> loss_grad(tokens * n, S(0));
  {
    const auto v = locmoe::router_losses<S>({logit_view, locmoe::matrix_view<const expert_index>(idx.data(), tokens, o.k), {}}, lo,
                                            locmoe::matrix_view<S>(loss_grad.data(), tokens, n));
    if (!wild) {
      LOCMOE_FUZZ_CHECK(std::isfinite(v.aux.value) && std::isfinite(v.z.value) && std::isfinite(v.locality.value),
                        "finite loss values");
      LOCMOE_FUZZ_CHECK(all_finite(loss_grad), "finite loss gradient");
      for (std::size_t i = 0; i < masked.size(); ++i)
        if (masked[i]) LOCMOE_FUZZ_CHECK(loss_grad[i] == 0, "a masked expert gets no loss gradient");
    }
  }

  // combine / dispatch backward through a plan.
  const std::size_t d = in.size_between(1, 9);
  locmoe::capacity_options co;
  co.capacity = static_cast<std::int64_t>(in.size_between(0, 6));
  locmoe::capacity_assigner<S> assigner(n, co);
  std::vector<expert_index> kept_expert(tokens * o.k);
  std::vector<locmoe::slot_index> slot(tokens * o.k);
  std::vector<S> kept_w(tokens * o.k);
  const auto stats = assigner.run(locmoe::matrix_view<const expert_index>(idx.data(), tokens, o.k),
                                  locmoe::matrix_view<const S>(w.data(), tokens, o.k),
                                  {{kept_expert.data(), tokens, o.k}, {slot.data(), tokens, o.k}, {kept_w.data(), tokens, o.k}});
  const auto single = locmoe::topology::uniform(1, 1, static_cast<std::int64_t>(n));
  const auto plan = locmoe::build_dispatch_plan({kept_expert.data(), tokens, o.k}, {slot.data(), tokens, o.k}, stats.capacity, single);
  std::vector<S> buffer(plan.buffer_rows() * d), grad_y(tokens * d), grad_buffer(plan.buffer_rows() * d, S(7)),
      grad_weight(tokens * o.k, S(7)), grad_x(tokens * d, S(7));
  for (S& b : buffer) b = wild ? in.value<S>() : in.value<S>(false);
  for (S& g : grad_y) g = wild ? in.value<S>() : in.value<S>(false);
  locmoe::combine_backward<S, S>(plan, {buffer.data(), plan.buffer_rows(), d}, {kept_w.data(), tokens, o.k}, {grad_y.data(), tokens, d},
                                 {grad_buffer.data(), plan.buffer_rows(), d}, {grad_weight.data(), tokens, o.k});
  locmoe::dispatch_backward<S>(plan, {grad_buffer.data(), plan.buffer_rows(), d}, {grad_x.data(), tokens, d});
  for (std::size_t i = 0; i < kept_expert.size(); ++i)
    if (kept_expert[i] == no_expert) LOCMOE_FUZZ_CHECK(grad_weight[i] == 0, "a dropped choice gets no weight gradient");
  for (std::size_t row = 0; row < plan.buffer_rows(); ++row)
    if (plan.pair_of_row[row] < 0)
      for (std::size_t j = 0; j < d; ++j) LOCMOE_FUZZ_CHECK(grad_buffer[row * d + j] == 0, "a padding row gets no gradient");
  if (!wild && all_finite(kept_w)) {
    LOCMOE_FUZZ_CHECK(all_finite(grad_buffer) && all_finite(grad_weight) && all_finite(grad_x), "finite dispatch gradients");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  locmoe_fuzz::input in(data, size);
  const bool single = in.flag();
  const bool wild = in.raw<std::uint8_t>() % 4 == 0;  // NaN, inf and extreme values allowed
  try {
    if (single)
      step<float>(in, wild);
    else
      step<double>(in, wild);
  } catch (const locmoe::error& e) {
    // Tame inputs are all valid arguments; wild ones may break a rule (a NaN scale), which must be this error.
    LOCMOE_FUZZ_CHECK(wild, std::string("a valid step refused: ") + e.what());
  }
  return 0;
}
