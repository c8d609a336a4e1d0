// The engine of `locmoe simulate`: a synthetic token stream routed through five routers on one cluster, with the
// learned routers trained by the library's own loss gradients. See docs/cli.md#locmoe-simulate for the model.
#pragma once

#include <locmoe/exchange.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace locmoe::cli::sim {

/// A cluster: nodes of ranks_per_node devices, `experts` experts placed in blocks (topology::uniform).
struct cluster {
  std::string preset;  ///< "64N", "128N", "256N" or "custom"
  std::int64_t nodes = 8, ranks_per_node = 8, experts = 16;
};

/// The paper's clusters (Table 1: 16 experts): 64N, 128N, 256N = 8, 16, 32 nodes of 8 Ascend 910A NPUs.
/// Throws usage_error for any other name.
cluster preset_cluster(const std::string& name);

struct settings {
  std::int64_t steps = 300;            ///< training steps; metrics average the last eval_fraction of them
  std::int64_t tokens_per_rank = 128;  ///< tokens each rank routes per step
  std::int64_t features = 64;          ///< width of the simulated tokens (the gate's d; divisible by n for GrAP)
  std::int64_t adapter_rank = 8;       ///< rank r of the learnable adapter h = x + B (A x)
  std::int64_t topics = 32;            ///< clusters of tokens on the sphere
  std::int64_t domains = 8;            ///< data domains (RRE's expert groups); topics are dealt to domains
  std::int64_t node_limited_k = 2;     ///< k of the node-limited Top-k router
  std::int64_t token_bytes = 10240;    ///< bytes of one routed token in the modelled exchange (5120 x fp16)
  std::uint64_t seed = 1;
  double skew = 0.7;                   ///< probability a token is drawn from its node's favourite topics
  double noise = 0.6;                  ///< spread of a topic (norm of the Gaussian offset before normalizing)
  double capacity_factor = 1.25;
  double aux_coeff = 0.01, locality_coeff = 0.01, locality_smoothing = 0.01, task_coeff = 1.0;
  double learning_rate = 0.01;         ///< Adam
  double specialization_rate = 0.05;   ///< how fast an expert's specialty follows the tokens it keeps
  double eval_fraction = 0.25;
  comm_model model = comm_model::ascend_910();
  std::vector<std::string> routers = router_names();  ///< which to run (any of router_names())

  static std::vector<std::string> router_names() { return {"hash", "switch", "rre", "locmoe", "node-limited"}; }
};

/// One router's averages over the evaluation window.
struct router_result {
  std::string router;                  ///< hash, switch, rre, locmoe, node-limited
  std::int64_t top_k = 1, capacity = 0;
  double inter_node_share = 0;         ///< inter-node bytes / bytes of all kept choices
  double intra_node_share = 0;         ///< crossing intra-node links
  double rank_local_share = 0;         ///< staying on the device
  double max_mean_load = 0;            ///< max / mean of the tokens routed to each expert (before capacity)
  double drop_rate = 0;
  double capacity_used = 0;            ///< kept choices / (n C): how full the expert buffers are
  double affinity = 0;                 ///< mean affinity of kept choices (the task's reward)
  double a2a_seconds_flat = 0, a2a_seconds_groupwise = 0, a2a_seconds_two_level = 0;
  std::vector<double> load_per_expert;  ///< mean choices routed to each expert per step (before capacity)
};

struct cluster_result {
  cluster spec;
  std::vector<router_result> routers;  ///< those run, in the order of settings::router_names()
};

/// Called after every step with (steps done, steps in all).
using progress_callback = std::function<void(std::int64_t, std::int64_t)>;

/// Checks the settings against the cluster (throws usage_error naming the flag) and runs the simulation.
cluster_result simulate(const cluster& spec, const settings& s, const progress_callback& progress = {});

/// The learnable part of a learned router, exposed for the gradient test: adapter A [r x f], B [f x r] and, for
/// a dense gate, W [n x f]; the loss of one batch and its gradient with respect to every parameter.
struct learned_parameters {
  std::vector<double> a, b, w;  ///< row-major; w empty for the GrAP gate
};
struct batch_loss {
  double value = 0;
  learned_parameters gradient;
};
/// The training loss of one batch x [T x f] with affinities [T x n]: task + aux (+ locality when `locality`).
batch_loss training_loss(const learned_parameters& p, const std::vector<double>& x, const std::vector<double>& affinity,
                         std::size_t tokens, std::size_t features, std::size_t experts, const topology& topo,
                         const settings& s, bool locality);

}  // namespace locmoe::cli::sim
