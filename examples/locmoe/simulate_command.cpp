// `locmoe simulate`: the paper's clusters (or yours) under five routers, trained on a synthetic token stream;
// the traffic each router causes and the modelled All-to-All time. See docs/cli.md#locmoe-simulate.
#include "cli.hpp"
#include "simulation.hpp"

#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace locmoe::cli {
namespace {

struct simulate_settings {
  std::string presets = "64N", machine = "ascend-910";
  std::int64_t nodes = 0, ranks_per_node = 0, experts = 0;
  std::optional<double> intra_bandwidth, inter_bandwidth, intra_latency, inter_latency;  // unset: the machine's
  std::int64_t seed = 1;
  bool json = false, csv = false, quiet = false;
  sim::settings sim;
};

std::vector<sim::cluster> clusters(const simulate_settings& s) {
  const bool custom = s.nodes != 0 || s.ranks_per_node != 0 || s.experts != 0;
  if (custom) {
    if (s.nodes == 0 || s.ranks_per_node == 0 || s.experts == 0) {
      throw usage_error("--nodes, --ranks-per-node and --experts: give all three for a custom cluster");
    }
    return {{"custom", s.nodes, s.ranks_per_node, s.experts}};
  }
  std::vector<sim::cluster> out;
  std::stringstream list(s.presets == "all" ? std::string("64N,128N,256N") : s.presets);
  for (std::string name; std::getline(list, name, ',');) out.push_back(sim::preset_cluster(name));
  if (out.empty()) throw usage_error("--preset: names no cluster");
  return out;
}

comm_model model_of(const simulate_settings& s) {
  comm_model m = s.machine == "dgx-a100" ? comm_model::dgx_a100() : comm_model::ascend_910();
  const auto set = [](const std::optional<double>& value, double scale, double& target, const char* flag, bool latency) {
    if (!value) return;
    if (!std::isfinite(*value) || (latency ? *value < 0 : *value <= 0)) {
      throw usage_error(std::string(flag) + " = " + detail::to_text(*value) + ": must be finite and " + (latency ? ">= 0" : "> 0"));
    }
    target = *value * scale;
  };
  set(s.intra_bandwidth, 1e9, m.intra_node.bytes_per_second, "--intra-bandwidth", false);
  set(s.inter_bandwidth, 1e9, m.inter_node.bytes_per_second, "--inter-bandwidth", false);
  set(s.intra_latency, 1e-6, m.intra_node.latency_seconds, "--intra-latency", true);
  set(s.inter_latency, 1e-6, m.inter_node.latency_seconds, "--inter-latency", true);
  return m;
}

double change(double value, double reference) { return reference > 0 ? value / reference - 1 : 0.0; }

/// Switch's result, the reference of the "vs switch" columns; null when switch was not run.
const sim::router_result* switch_of(const sim::cluster_result& c) {
  for (const sim::router_result& r : c.routers) {
    if (r.router == "switch") return &r;
  }
  return nullptr;
}

nlohmann::ordered_json to_json(const sim::cluster_result& c, const simulate_settings& s) {
  const sim::router_result* sw = switch_of(c);
  const auto versus = [sw](double value, double sim::router_result::*field) -> nlohmann::ordered_json {
    if (!sw) return nullptr;
    return change(value, sw->*field);
  };
  nlohmann::ordered_json j;
  j["preset"] = c.spec.preset;
  j["nodes"] = c.spec.nodes;
  j["ranks_per_node"] = c.spec.ranks_per_node;
  j["experts"] = c.spec.experts;
  j["steps"] = s.sim.steps;
  j["tokens_per_rank"] = s.sim.tokens_per_rank;
  j["token_bytes"] = s.sim.token_bytes;
  j["seed"] = s.sim.seed;
  j["aux_coeff"] = s.sim.aux_coeff;
  j["loc_coeff"] = s.sim.locality_coeff;
  j["capacity_factor"] = s.sim.capacity_factor;
  j["task_coeff"] = s.sim.task_coeff;
  j["learning_rate"] = s.sim.learning_rate;
  j["features"] = s.sim.features;
  j["topics"] = s.sim.topics;
  j["domains"] = s.sim.domains;
  j["skew"] = s.sim.skew;
  j["noise"] = s.sim.noise;
  j["model"] = {{"intra_node_latency_seconds", s.sim.model.intra_node.latency_seconds},
                {"intra_node_bytes_per_second", s.sim.model.intra_node.bytes_per_second},
                {"inter_node_latency_seconds", s.sim.model.inter_node.latency_seconds},
                {"inter_node_bytes_per_second", s.sim.model.inter_node.bytes_per_second}};
  j["routers"] = nlohmann::ordered_json::array();
  for (const sim::router_result& r : c.routers) {
    j["routers"].push_back({{"router", r.router},
                            {"top_k", r.top_k},
                            {"inter_node_share", r.inter_node_share},
                            {"intra_node_share", r.intra_node_share},
                            {"rank_local_share", r.rank_local_share},
                            {"max_mean_load", r.max_mean_load},
                            {"drop_rate", r.drop_rate},
                            {"capacity_used", r.capacity_used},
                            {"capacity", r.capacity},
                            {"affinity", r.affinity},
                            {"a2a_seconds_flat", r.a2a_seconds_flat},
                            {"a2a_seconds_groupwise", r.a2a_seconds_groupwise},
                            {"a2a_seconds_two_level", r.a2a_seconds_two_level},
                            {"change_flat_vs_switch", versus(r.a2a_seconds_flat, &sim::router_result::a2a_seconds_flat)},
                            {"change_groupwise_vs_switch",
                             versus(r.a2a_seconds_groupwise, &sim::router_result::a2a_seconds_groupwise)},
                            {"load_per_expert", r.load_per_expert}});
  }
  return j;
}

const char* const csv_header =
    "preset,nodes,ranks_per_node,experts,router,top_k,inter_node_share,intra_node_share,rank_local_share,max_mean_load,"
    "drop_rate,capacity,affinity,a2a_seconds_flat,a2a_seconds_groupwise,a2a_seconds_two_level,change_flat_vs_switch,"
    "change_groupwise_vs_switch,aux_coeff,loc_coeff,capacity_factor,seed,capacity_used,skew";

/// A change against switch as text: empty when switch was not run.
std::string versus_text(const sim::router_result* sw, double value, double sim::router_result::*field) {
  if (!sw) return "";
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.6f", change(value, sw->*field));
  return buffer;
}

void print_csv(const sim::cluster_result& c, const sim::settings& s) {
  const sim::router_result* sw = switch_of(c);
  for (const sim::router_result& r : c.routers) {
    std::printf("%s,%lld,%lld,%lld,%s,%lld,%.6f,%.6f,%.6f,%.6f,%.6f,%lld,%.6f,%.6e,%.6e,%.6e,%s,%s,%g,%g,%g,%llu,%.6f,%g\n", c.spec.preset.c_str(),
                static_cast<long long>(c.spec.nodes), static_cast<long long>(c.spec.ranks_per_node),
                static_cast<long long>(c.spec.experts), r.router.c_str(), static_cast<long long>(r.top_k),
                r.inter_node_share, r.intra_node_share, r.rank_local_share, r.max_mean_load, r.drop_rate,
                static_cast<long long>(r.capacity), r.affinity, r.a2a_seconds_flat, r.a2a_seconds_groupwise,
                r.a2a_seconds_two_level, versus_text(sw, r.a2a_seconds_flat, &sim::router_result::a2a_seconds_flat).c_str(),
                versus_text(sw, r.a2a_seconds_groupwise, &sim::router_result::a2a_seconds_groupwise).c_str(), s.aux_coeff,
                s.locality_coeff, s.capacity_factor, static_cast<unsigned long long>(s.seed), r.capacity_used, s.skew);
  }
}

void print_table(const sim::cluster_result& c, const simulate_settings& s) {
  const sim::cluster& k = c.spec;
  const std::int64_t ranks = k.nodes * k.ranks_per_node;
  const auto eval = static_cast<long long>(s.sim.steps - static_cast<std::int64_t>(std::floor(static_cast<double>(s.sim.steps) * (1 - s.sim.eval_fraction))));
  std::printf("%s: %lld nodes x %lld ranks, %lld experts; %lld steps of %lld tokens (%lld per rank), averages over the last %lld\n",
              k.preset.c_str(), static_cast<long long>(k.nodes), static_cast<long long>(k.ranks_per_node),
              static_cast<long long>(k.experts), static_cast<long long>(s.sim.steps),
              static_cast<long long>(ranks * s.sim.tokens_per_rank), static_cast<long long>(s.sim.tokens_per_rank), eval);
  const comm_model& m = s.sim.model;
  std::printf("model: intra-node %.3g us + %.3g GB/s, inter-node %.3g us + %.3g GB/s per rank; %lld bytes per token\n",
              m.intra_node.latency_seconds * 1e6, m.intra_node.bytes_per_second * 1e-9, m.inter_node.latency_seconds * 1e6,
              m.inter_node.bytes_per_second * 1e-9, static_cast<long long>(s.sim.token_bytes));
  std::printf("%-13s %2s %10s %9s %7s %8s %8s %11s %9s %11s %9s %11s\n", "router", "k", "inter-node", "max/mean", "drop",
              "capacity", "affinity", "a2a flat", "vs switch", "a2a group", "vs switch", "a2a 2-level");
  const sim::router_result* sw = switch_of(c);
  const auto versus = [sw](double value, double sim::router_result::*field) {
    char buffer[32] = "      n/a";
    if (sw) std::snprintf(buffer, sizeof buffer, "%+8.1f%%", 100 * change(value, sw->*field));
    return std::string(buffer);
  };
  for (const sim::router_result& r : c.routers) {
    std::printf("%-13s %2lld %9.1f%% %9.2f %6.1f%% %8lld %8.3f %8.1f us %s %8.1f us %s %8.1f us\n", r.router.c_str(),
                static_cast<long long>(r.top_k), 100 * r.inter_node_share, r.max_mean_load, 100 * r.drop_rate,
                static_cast<long long>(r.capacity), r.affinity, r.a2a_seconds_flat * 1e6,
                versus(r.a2a_seconds_flat, &sim::router_result::a2a_seconds_flat).c_str(), r.a2a_seconds_groupwise * 1e6,
                versus(r.a2a_seconds_groupwise, &sim::router_result::a2a_seconds_groupwise).c_str(),
                r.a2a_seconds_two_level * 1e6);
  }
}

void run_simulate(simulate_settings& s) {
  if (s.json && s.csv) throw usage_error("--json and --csv: give at most one");
  s.sim.model = model_of(s);
  const std::vector<sim::cluster> list = clusters(s);
  const bool show_progress = !s.quiet && isatty(STDERR_FILENO) != 0;
  std::vector<sim::cluster_result> results;
  for (const sim::cluster& c : list) {
    sim::progress_callback progress;
    if (show_progress) {
      progress = [&c](std::int64_t done, std::int64_t all) {
        std::fprintf(stderr, "\rlocmoe simulate: %s step %lld/%lld", c.preset.c_str(), static_cast<long long>(done),
                     static_cast<long long>(all));
        if (done == all) std::fprintf(stderr, "\r\033[K");
        std::fflush(stderr);
      };
    }
    results.push_back(sim::simulate(c, s.sim, progress));
  }
  if (s.json) {
    if (results.size() == 1) {
      std::cout << to_json(results[0], s).dump(2) << '\n';
    } else {
      nlohmann::ordered_json all = nlohmann::ordered_json::array();
      for (const auto& r : results) all.push_back(to_json(r, s));
      std::cout << all.dump(2) << '\n';
    }
  } else if (s.csv) {
    std::printf("%s\n", csv_header);
    for (const auto& r : results) print_csv(r, s.sim);
  } else {
    for (std::size_t i = 0; i < results.size(); ++i) {
      if (i) std::printf("\n");
      print_table(results[i], s);
    }
  }
}

}  // namespace

void add_simulate_command(CLI::App& app) {
  auto s = std::make_shared<simulate_settings>();
  CLI::App* cmd = app.add_subcommand("simulate", "the paper's clusters under five routers: traffic and modelled All-to-All");
  cmd->add_option("--preset", s->presets, "64N, 128N, 256N, a comma-separated list, or all")->capture_default_str();
  add_integer_option(*cmd, "--nodes", s->nodes, "custom cluster: nodes");
  add_integer_option(*cmd, "--ranks-per-node", s->ranks_per_node, "custom cluster: ranks (devices) per node");
  add_integer_option(*cmd, "--experts", s->experts, "custom cluster: experts, in blocks over the ranks");
  add_integer_option(*cmd, "--steps", s->sim.steps, "training steps");
  add_integer_option(*cmd, "--tokens-per-rank", s->sim.tokens_per_rank, "tokens each rank routes per step");
  add_integer_option(*cmd, "--features", s->sim.features, "width of the simulated tokens (the gate's d)");
  add_integer_option(*cmd, "--adapter-rank", s->sim.adapter_rank, "rank of the learnable adapter before the gate");
  add_integer_option(*cmd, "--topics", s->sim.topics, "token clusters on the sphere");
  add_integer_option(*cmd, "--domains", s->sim.domains, "data domains (RRE's groups)");
  add_integer_option(*cmd, "--node-limited-k", s->sim.node_limited_k, "k of the node-limited Top-k router");
  add_integer_option(*cmd, "--token-bytes", s->sim.token_bytes, "bytes of one token in the exchange (5120 x fp16)");
  add_integer_option(*cmd, "--seed", s->seed, "seed of the token stream and the initial parameters");
  cmd->add_option("--skew", s->sim.skew, "probability a token comes from its node's favourite topics")->capture_default_str();
  cmd->add_option("--noise", s->sim.noise, "spread of a topic")->capture_default_str();
  cmd->add_option("--capacity-factor", s->sim.capacity_factor, "capacity factor")->capture_default_str();
  cmd->add_option("--aux-coeff", s->sim.aux_coeff, "auxiliary loss coefficient alpha")->capture_default_str();
  cmd->add_option("--loc-coeff", s->sim.locality_coeff, "locality loss coefficient mu (locmoe)")->capture_default_str();
  cmd->add_option("--task-coeff", s->sim.task_coeff, "weight of the task (affinity) term")->capture_default_str();
  cmd->add_option("--learning-rate", s->sim.learning_rate, "Adam's learning rate")->capture_default_str();
  cmd->add_option("--eval-fraction", s->sim.eval_fraction, "last fraction of the steps the metrics average")->capture_default_str();
  cmd->add_option("--machine", s->machine, "link defaults")->check(CLI::IsMember({"ascend-910", "dgx-a100"}))->capture_default_str();
  cmd->add_option("--intra-bandwidth", s->intra_bandwidth, "intra-node GB/s per rank (default: the machine's)");
  cmd->add_option("--inter-bandwidth", s->inter_bandwidth, "inter-node GB/s per rank (default: the machine's)");
  cmd->add_option("--intra-latency", s->intra_latency, "intra-node latency per message, us (default: the machine's)");
  cmd->add_option("--inter-latency", s->inter_latency, "inter-node latency per message, us (default: the machine's)");
  cmd->add_option("--routers", s->sim.routers, "routers to run (comma-separated)")->delimiter(',')->capture_default_str();
  cmd->add_flag("--json", s->json, "JSON on stdout (an array when several clusters are simulated)");
  cmd->add_flag("--csv", s->csv, "CSV on stdout, one row per cluster and router");
  cmd->add_flag("--quiet", s->quiet, "no progress display on a terminal");
  cmd->callback([s] {
    if (s->seed < 0) throw usage_error("--seed = " + std::to_string(s->seed) + ": must be >= 0");
    s->sim.seed = static_cast<std::uint64_t>(s->seed);
    run_simulate(*s);
  });
}

}  // namespace locmoe::cli
