// locmoe_torch_routers.cpp - the fixed routers (routers.hpp's hash_route, balanced_hash_table, rre_route), the
// delta of a batch (capacity.hpp's routed_cosines, empirical_delta) and the communication model (exchange.hpp) as
// operators of torch.ops.locmoe. They are cheap per call (O(1) per token, O(T d), O(R^2)) and run on the calling
// thread; the Python wrappers are in locmoe_torch/routers.py.
#include "ops_common.hpp"

#include <locmoe/capacity.hpp>
#include <locmoe/exchange.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/topology.hpp>

#include <Eigen/Core>

#include <algorithm>

#include <cstdint>
#include <string>
#include <vector>

namespace locmoe_torch_ops {
namespace {

/// A 1-D CPU int64 tensor, contiguous (a copy of any other integer dtype).
Tensor ids_input(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "locmoe_torch: ", name, " must be a CPU tensor (got ", t.device(), ")");
  TORCH_CHECK_VALUE(t.dim() == 1, "locmoe_torch: ", name, " must be 1-D [tokens] (got ", t.dim(), "-D)");
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "locmoe_torch: ", name,
                   " must be an integer tensor (got ", t.scalar_type(), ")");
  return t.to(at::kLong).contiguous();
}

/// The experts [T] (int64) of a [T x 1] routers.hpp result.
Tensor experts_of(const std::vector<locmoe::expert_index>& chosen) {
  Tensor out = at::empty({static_cast<int64_t>(chosen.size())}, at::kLong);
  auto* o = out.data_ptr<int64_t>();
  for (std::size_t t = 0; t < chosen.size(); ++t) o[t] = chosen[t];
  return out;
}

Tensor hash_route(const Tensor& token_ids_in, int64_t num_experts, int64_t seed,
                  const c10::optional<Tensor>& table_in) {
  TORCH_CHECK_VALUE(num_experts >= 1, "locmoe_torch: num_experts must be >= 1 (got ", num_experts, ")");
  const Tensor ids = ids_input(token_ids_in, "token_ids");
  const auto tokens = static_cast<std::size_t>(ids.size(0));
  std::vector<locmoe::expert_index> table;
  locmoe::hash_options<int64_t> options;
  options.seed = static_cast<std::uint64_t>(seed);
  if (table_in.has_value()) {
    const Tensor t = ids_input(*table_in, "table");  // indexed by token id
    const auto* v = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < t.size(0); ++i) {
      TORCH_CHECK_VALUE(v[i] >= 0 && v[i] < num_experts, "locmoe_torch: table[", i, "] = ", v[i],
                        ": every entry must be an expert in [0, num_experts = ", num_experts, ")");
      table.push_back(static_cast<locmoe::expert_index>(v[i]));
    }
    options.table = table.data();
    options.table_size = table.size();
  }
  std::vector<locmoe::expert_index> chosen(tokens);
  std::vector<float> weights(tokens);
  checked([&] {
    return locmoe::hash_route(ids.data_ptr<int64_t>(), tokens, static_cast<std::size_t>(num_experts), options,
                              locmoe::matrix_view<locmoe::expert_index>{chosen.data(), tokens, 1, 1},
                              locmoe::matrix_view<float>{weights.data(), tokens, 1, 1});
  });
  return experts_of(chosen);
}

Tensor balanced_hash_table(const Tensor& frequencies_in, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts >= 1, "locmoe_torch: num_experts must be >= 1 (got ", num_experts, ")");
  TORCH_CHECK_VALUE(frequencies_in.device().is_cpu() && frequencies_in.dim() == 1,
                    "locmoe_torch: frequencies must be a 1-D CPU tensor (got ", frequencies_in.dim(), "-D on ",
                    frequencies_in.device(), ")");
  const Tensor f = frequencies_in.to(at::kDouble).contiguous();
  const auto* v = f.data_ptr<double>();
  const std::vector<double> frequencies(v, v + f.size(0));
  const auto n = static_cast<std::size_t>(num_experts);
  return experts_of(checked([&] { return locmoe::balanced_hash_table(frequencies, n); }));
}

Tensor rre_route(const Tensor& token_ids_in, const Tensor& domains_in, int64_t num_experts, int64_t groups,
                 int64_t seed) {
  TORCH_CHECK_VALUE(num_experts >= 1, "locmoe_torch: num_experts must be >= 1 (got ", num_experts, ")");
  TORCH_CHECK_VALUE(groups >= 1, "locmoe_torch: groups must be >= 1 (got ", groups, ")");
  const Tensor ids = ids_input(token_ids_in, "token_ids");
  const Tensor domains = ids_input(domains_in, "domains");
  TORCH_CHECK_VALUE(domains.size(0) == ids.size(0), "locmoe_torch: domains must have one entry per token (",
                    ids.size(0), "), got ", domains.size(0));
  const auto tokens = static_cast<std::size_t>(ids.size(0));
  std::vector<locmoe::expert_index> chosen(tokens);
  std::vector<float> weights(tokens);
  checked([&] {
    return locmoe::rre_route(ids.data_ptr<int64_t>(), domains.data_ptr<int64_t>(), tokens,
                             static_cast<std::size_t>(num_experts), static_cast<std::size_t>(groups),
                             static_cast<std::uint64_t>(seed),
                             locmoe::matrix_view<locmoe::expert_index>{chosen.data(), tokens, 1, 1},
                             locmoe::matrix_view<float>{weights.data(), tokens, 1, 1});
  });
  return experts_of(chosen);
}

Tensor routed_cosines(const Tensor& x_in, const Tensor& w_in, const Tensor& expert_in) {
  TORCH_CHECK_VALUE(x_in.device().is_cpu() && x_in.dim() == 2, "locmoe_torch: x must be a 2-D CPU tensor [T, d]");
  TORCH_CHECK_VALUE(w_in.device().is_cpu() && w_in.dim() == 2, "locmoe_torch: w must be a 2-D CPU tensor [n, d]");
  const Tensor x = x_in.to(at::kDouble).contiguous();
  const Tensor w = w_in.to(at::kDouble).contiguous();
  const Tensor expert = ids_input(expert_in, "expert");
  using row_major = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Eigen::Map<const row_major> xm(x.data_ptr<double>(), x.size(0), x.size(1));
  const Eigen::Map<const row_major> wm(w.data_ptr<double>(), w.size(0), w.size(1));
  Eigen::VectorXi e(expert.size(0));
  const auto* ev = expert.data_ptr<int64_t>();
  for (int64_t t = 0; t < expert.size(0); ++t) {
    TORCH_CHECK_VALUE(ev[t] >= -1 && ev[t] < w.size(0), "locmoe_torch: expert[", t, "] = ", ev[t],
                      " must be in [-1, n = ", w.size(0), ") (-1: routed nowhere)");
    e[t] = static_cast<int>(ev[t]);
  }
  const Eigen::VectorXd cos = checked([&] { return locmoe::routed_cosines(xm, wm, e); });
  Tensor out = at::empty({cos.size()}, at::kDouble);
  std::copy(cos.data(), cos.data() + cos.size(), out.data_ptr<double>());
  return out;
}

double empirical_delta(const Tensor& cosines_in, double q) {
  TORCH_CHECK_VALUE(cosines_in.device().is_cpu() && cosines_in.dim() == 1,
                    "locmoe_torch: cosines must be a 1-D CPU tensor");
  const Tensor c = cosines_in.to(at::kDouble).contiguous();
  const Eigen::Map<const Eigen::VectorXd> v(c.data_ptr<double>(), c.size(0));
  return checked([&] { return locmoe::empirical_delta(v, q); });
}

double model_exchange_seconds(const Tensor& send_bytes_in, int64_t ranks_per_node, const std::string& scheme,
                              const std::string& links) {
  TORCH_CHECK_VALUE(send_bytes_in.device().is_cpu() && send_bytes_in.dim() == 2 &&
                        send_bytes_in.size(0) == send_bytes_in.size(1),
                    "locmoe_torch: send_bytes must be a square 2-D CPU tensor [R, R] (source-major bytes)");
  TORCH_CHECK_TYPE(at::isIntegralType(send_bytes_in.scalar_type(), /*includeBool=*/false),
                   "locmoe_torch: send_bytes must hold integers (bytes), got ", send_bytes_in.scalar_type());
  TORCH_CHECK_VALUE(scheme == "flat" || scheme == "split_gather" || scheme == "two_level",
                    "locmoe_torch: scheme must be 'flat', 'split_gather' or 'two_level' (got '", scheme, "')");
  TORCH_CHECK_VALUE(links == "ascend_910" || links == "dgx_a100",
                    "locmoe_torch: links must be 'ascend_910' or 'dgx_a100' (got '", links, "')");
  const Tensor s = send_bytes_in.to(at::kLong).contiguous();
  const int64_t ranks = s.size(0);
  const std::vector<int64_t> bytes(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + ranks * ranks);
  for (int64_t i = 0; i < ranks * ranks; ++i) {
    TORCH_CHECK_VALUE(bytes[static_cast<std::size_t>(i)] >= 0, "locmoe_torch: send_bytes[", i / ranks, "][",
                      i % ranks, "] = ", bytes[static_cast<std::size_t>(i)], " must be >= 0");
  }
  const auto kind = scheme == "flat"           ? locmoe::exchange_scheme::flat
                    : scheme == "split_gather" ? locmoe::exchange_scheme::split_gather
                                               : locmoe::exchange_scheme::two_level;
  const auto model = links == "ascend_910" ? locmoe::comm_model::ascend_910() : locmoe::comm_model::dgx_a100();
  return checked([&] {
    const auto topo = locmoe::topology::uniform(ranks, ranks_per_node, ranks);
    return locmoe::model_exchange_time(locmoe::build_exchange_plan(bytes, topo, {kind, false}), topo, model).seconds;
  });
}

}  // namespace
}  // namespace locmoe_torch_ops

TORCH_LIBRARY_FRAGMENT(locmoe, m) {
  using namespace locmoe_torch_ops;
  m.def("hash_route(Tensor token_ids, int num_experts, int seed, Tensor? table) -> Tensor", &hash_route);
  m.def("balanced_hash_table(Tensor frequencies, int num_experts) -> Tensor", &balanced_hash_table);
  m.def("rre_route(Tensor token_ids, Tensor domains, int num_experts, int groups, int seed) -> Tensor", &rre_route);
  m.def("routed_cosines(Tensor x, Tensor w, Tensor expert) -> Tensor", &routed_cosines);
  m.def("empirical_delta(Tensor cosines, float q) -> float", &empirical_delta);
  m.def("model_exchange_seconds(Tensor send_bytes, int ranks_per_node, str scheme, str links) -> float",
        &model_exchange_seconds);
}
