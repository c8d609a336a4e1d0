// `locmoe simulate`'s engine (simulation.hpp). The model, in short:
//   tokens   unit vectors around `topics` random centres in R^f; each node favours its own topics (probability
//            `skew`), the rest are drawn uniformly; a topic belongs to a data domain (RRE's group) and gives the
//            token an id (Hash's key). The stream is seeded per step and shared by all routers.
//   experts  each has a specialty, a unit vector that follows the tokens it keeps (an exponential average);
//            the affinity of token t to expert e is x_t . specialty_e: the task rewards routing to affine experts.
//   routers  hash (id hash), rre (domain -> group, hash inside), switch (dense gate, Top-1), locmoe (GrAP gate,
//            Top-1, locality loss), node-limited Top-k (dense gate, k experts on at most M nodes). The learned
//            ones see h = x + B (A x), a low-rank adapter standing in for the layers below the gate, and train
//            A, B (and the dense gate's W) with Adam on task + aux (+ locality for locmoe): the gradients w.r.t. the
//            logits come from locmoe::router_losses, through the gate from dense_backward / grap_backward.
//   metrics  every step: capacity assignment, dispatch plan and the three exchange plans under the comm model;
//            averaged over the last eval_fraction of the steps.
#include "simulation.hpp"

#include "cli.hpp"

#include <locmoe/assign.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/routers.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <memory>
#include <random>
#include <utility>

namespace locmoe::cli::sim {
namespace {

using matrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using map = Eigen::Map<matrix>;
using const_map = Eigen::Map<const matrix>;

Eigen::Index ix(std::size_t v) { return static_cast<Eigen::Index>(v); }

/// The token stream: topic centres, each node's favourite topics, each topic's domain.
class token_stream {
 public:
  token_stream(const settings& s, std::size_t nodes, std::size_t ranks_per_node)
      : s_(s), features_(static_cast<std::size_t>(s.features)), ranks_per_node_(ranks_per_node) {
    std::mt19937_64 rng(s.seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    const auto topics = static_cast<std::size_t>(s.topics);
    centres_.resize(topics * features_);
    for (std::size_t c = 0; c < topics; ++c) unit(normal, rng, &centres_[c * features_]);
    std::vector<std::size_t> order(topics);
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::shuffle(order.begin(), order.end(), rng);
    per_node_ = std::max<std::size_t>(1, topics / nodes);
    favourite_.resize(nodes * per_node_);
    for (std::size_t m = 0; m < nodes; ++m) {
      for (std::size_t i = 0; i < per_node_; ++i) favourite_[m * per_node_ + i] = order[(m * per_node_ + i) % topics];
    }
    std::uniform_int_distribution<std::int32_t> domain(0, static_cast<std::int32_t>(s.domains) - 1);
    domain_.resize(topics);
    for (auto& d : domain_) d = domain(rng);
  }

  /// Step `step`'s tokens: x [T x f], ids, domains; rank r owns rows [r T_r, (r + 1) T_r).
  void draw(std::int64_t step, std::size_t ranks, std::vector<double>& x, std::vector<std::int64_t>& ids,
            std::vector<std::int32_t>& domains) const {
    const auto per_rank = static_cast<std::size_t>(s_.tokens_per_rank);
    const std::size_t tokens = ranks * per_rank;
    x.resize(tokens * features_);
    ids.resize(tokens);
    domains.resize(tokens);
    std::mt19937_64 rng(s_.seed * 0x9E3779B97F4A7C15ull + static_cast<std::uint64_t>(step) + 1);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> coin(0.0, 1.0);
    std::uniform_int_distribution<std::size_t> any(0, domain_.size() - 1), fav(0, per_node_ - 1);
    std::uniform_int_distribution<std::int64_t> word(0, vocabulary - 1);
    const double spread = s_.noise / std::sqrt(static_cast<double>(features_));
    for (std::size_t t = 0; t < tokens; ++t) {
      const std::size_t node = t / per_rank / ranks_per_node_;
      const std::size_t topic = coin(rng) < s_.skew ? favourite_[node * per_node_ + fav(rng)] : any(rng);
      double* row = &x[t * features_];
      for (std::size_t j = 0; j < features_; ++j) row[j] = centres_[topic * features_ + j] + spread * normal(rng);
      normalize(row);
      ids[t] = static_cast<std::int64_t>(topic) * vocabulary + word(rng);
      domains[t] = domain_[topic];
    }
  }

 private:
  static constexpr std::int64_t vocabulary = 4096;  // ids per topic

  void normalize(double* v) const {
    double norm = 0;
    for (std::size_t j = 0; j < features_; ++j) norm += v[j] * v[j];
    norm = std::sqrt(norm);
    for (std::size_t j = 0; j < features_; ++j) v[j] /= norm;
  }
  void unit(std::normal_distribution<double>& normal, std::mt19937_64& rng, double* v) const {
    for (std::size_t j = 0; j < features_; ++j) v[j] = normal(rng);
    normalize(v);
  }

  const settings& s_;
  std::size_t features_, ranks_per_node_, per_node_ = 1;
  std::vector<double> centres_;
  std::vector<std::size_t> favourite_;
  std::vector<std::int32_t> domain_;
};

/// Adam on one parameter vector.
struct adam {
  std::vector<double> m, v;
  std::int64_t t = 0;
  void step(std::vector<double>& p, const std::vector<double>& g, double rate) {
    if (m.empty()) {
      m.assign(p.size(), 0.0);
      v.assign(p.size(), 0.0);
    }
    ++t;
    const double c1 = 1 - std::pow(0.9, static_cast<double>(t)), c2 = 1 - std::pow(0.999, static_cast<double>(t));
    for (std::size_t i = 0; i < p.size(); ++i) {
      m[i] = 0.9 * m[i] + 0.1 * g[i];
      v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
      p[i] -= rate * (m[i] / c1) / (std::sqrt(v[i] / c2) + 1e-8);
    }
  }
};

/// The forward and backward pass of a learned router on one batch.
struct learned_pass {
  std::size_t tokens, features, experts, rank, k;
  matrix z, h, logits, probabilities, weights, grad_logits, grad_h;
  std::vector<expert_index> indices;

  learned_pass(std::size_t t, std::size_t f, std::size_t n, std::size_t r, std::size_t k_)
      : tokens(t), features(f), experts(n), rank(r), k(k_), z(ix(t), ix(r)), h(ix(t), ix(f)), logits(ix(t), ix(n)),
        probabilities(ix(t), ix(n)), weights(ix(t), ix(k_)), grad_logits(ix(t), ix(n)), grad_h(ix(t), ix(f)),
        indices(t * k_) {}

  matrix_view<const double> view(const matrix& m) const { return {m.data(), static_cast<std::size_t>(m.rows()), static_cast<std::size_t>(m.cols())}; }
  matrix_view<double> view(matrix& m) { return {m.data(), static_cast<std::size_t>(m.rows()), static_cast<std::size_t>(m.cols())}; }

  /// h = x + (x A^T) B^T, the logits, and the routing under `options`.
  void forward(const learned_parameters& p, const double* x, const router_options<double>& options) {
    const const_map X(x, ix(tokens), ix(features));
    const const_map A(p.a.data(), ix(rank), ix(features)), B(p.b.data(), ix(features), ix(rank));
    z.noalias() = X * A.transpose();
    h = X;
    h.noalias() += z * B.transpose();
    if (p.w.empty()) {
      grap_logits(grap_gate<double>{features, experts, true, nullptr}, view(std::as_const(h)), view(logits));
    } else {
      logits.noalias() = h * const_map(p.w.data(), ix(experts), ix(features)).transpose();
    }
    score_route(view(std::as_const(logits)), options,
                route_outputs<double>{{indices.data(), tokens, k}, view(weights), view(probabilities), {}});
  }

  /// The loss (task + aux + optional locality) and its gradient w.r.t. every parameter.
  batch_loss backward(const learned_parameters& p, const double* x, const double* affinity, const topology& topo,
                      const settings& s, bool locality) {
    batch_loss out;
    // Task: -c mean_t sum_e p_te a_te; d/dl_tj = -c/T p_tj (a_tj - sum_e p_te a_te).
    const const_map P(probabilities.data(), ix(tokens), ix(experts));
    const const_map Af(affinity, ix(tokens), ix(experts));
    const double c = s.task_coeff / static_cast<double>(tokens);
    const Eigen::VectorXd expected = (P.array() * Af.array()).rowwise().sum();
    out.value = -c * expected.sum();
    grad_logits = -c * (P.array() * (Af.colwise() - expected).array()).matrix();
    router_loss_options<double> o;
    o.aux.coeff = s.aux_coeff;
    if (locality) {
      o.locality.coeff = s.locality_coeff;
      o.locality.smoothing = s.locality_smoothing;
      o.locality.topo = &topo;
      o.locality.token_rank = token_ranks::contiguous_blocks();
    }
    const auto values = router_losses(loss_inputs<double>{view(std::as_const(logits)),
                                                          {indices.data(), tokens, k}, view(std::as_const(probabilities))},
                                      o, view(grad_logits));
    out.value += values.aux.value + (locality ? values.locality.value : 0.0);
    if (p.w.empty()) {
      grap_backward(grap_gate<double>{features, experts, true, nullptr}, view(std::as_const(logits)),
                    view(std::as_const(grad_logits)), view(grad_h));
    } else {
      grad_h.noalias() = grad_logits * const_map(p.w.data(), ix(experts), ix(features));
      const matrix gw = grad_logits.transpose() * h;
      out.gradient.w.assign(gw.data(), gw.data() + gw.size());
    }
    // h = x + z B^T, z = x A^T: dB = dh^T z, dA = (dh B)^T x.
    const const_map X(x, ix(tokens), ix(features));
    const const_map B(p.b.data(), ix(features), ix(rank));
    const matrix gb = grad_h.transpose() * z;
    const matrix ga = (grad_h * B).transpose() * X;
    out.gradient.a.assign(ga.data(), ga.data() + ga.size());
    out.gradient.b.assign(gb.data(), gb.data() + gb.size());
    return out;
  }
};

/// A learned router: its parameters, optimizer state and pass buffers.
struct learned_router {
  learned_parameters p;
  adam opt_a, opt_b, opt_w;
  learned_pass pass;
  router_options<double> options;
  bool locality;

  learned_router(bool dense, std::size_t tokens, std::size_t f, std::size_t n, std::size_t r, std::size_t k,
                 bool with_locality, std::uint64_t seed)
      : pass(tokens, f, n, r, k), locality(with_locality) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> a_init(0.0, 1.0 / std::sqrt(static_cast<double>(f)));
    p.a.resize(r * f);
    for (auto& v : p.a) v = a_init(rng);
    p.b.assign(f * r, 0.0);  // the adapter starts as the identity
    if (dense) {
      std::normal_distribution<double> w_init(0.0, 0.01);
      p.w.resize(n * f);
      for (auto& v : p.w) v = w_init(rng);
    }
    options.k = k;
  }

  void train(const double* x, const double* affinity, const topology& topo, const settings& s) {
    const batch_loss loss = pass.backward(p, x, affinity, topo, s, locality);
    opt_a.step(p.a, loss.gradient.a, s.learning_rate);
    opt_b.step(p.b, loss.gradient.b, s.learning_rate);
    if (!p.w.empty()) opt_w.step(p.w, loss.gradient.w, s.learning_rate);
  }
};

}  // namespace

cluster preset_cluster(const std::string& name) {
  if (name == "64N") return {name, 8, 8, 16};
  if (name == "128N") return {name, 16, 8, 16};
  if (name == "256N") return {name, 32, 8, 16};
  throw usage_error("--preset = " + name + ": must be 64N, 128N or 256N");
}

batch_loss training_loss(const learned_parameters& p, const std::vector<double>& x, const std::vector<double>& affinity,
                         std::size_t tokens, std::size_t features, std::size_t experts, const topology& topo,
                         const settings& s, bool locality) {
  learned_pass pass(tokens, features, experts, p.a.size() / features, 1);
  pass.forward(p, x.data(), router_options<double>{});
  return pass.backward(p, x.data(), affinity.data(), topo, s, locality);
}

namespace {

void check_settings(const cluster& c, const settings& s) {
  const auto require = [](bool ok, const std::string& flag, const std::string& value, const char* rule) {
    if (!ok) throw usage_error(flag + " = " + value + ": " + rule);
  };
  const auto text = [](auto v) { return detail::to_text(v); };
  require(c.nodes >= 1 && c.nodes <= 4096, "--nodes", text(c.nodes), "must satisfy 1 <= nodes <= 4096");
  require(c.ranks_per_node >= 1 && c.ranks_per_node <= 1024, "--ranks-per-node", text(c.ranks_per_node),
          "must satisfy 1 <= ranks per node <= 1024");
  require(c.experts >= 1 && c.experts <= 4096, "--experts", text(c.experts), "must satisfy 1 <= experts <= 4096");
  require(s.steps >= 1 && s.steps <= 1000000, "--steps", text(s.steps), "must satisfy 1 <= steps <= 10^6");
  require(s.tokens_per_rank >= 1, "--tokens-per-rank", text(s.tokens_per_rank), "must be >= 1");
  require(s.tokens_per_rank <= (std::int64_t{1} << 22) / (c.nodes * c.ranks_per_node), "--tokens-per-rank",
          text(s.tokens_per_rank), "tokens per step (ranks x tokens per rank) must be <= 2^22");
  require(s.features >= c.experts && s.features <= 65536, "--features", text(s.features),
          "must satisfy experts <= features <= 65536 (GrAP needs a block of features per expert)");
  require(s.adapter_rank >= 1 && s.adapter_rank <= s.features, "--adapter-rank", text(s.adapter_rank),
          "must satisfy 1 <= rank <= features");
  require(s.topics >= 1 && s.topics <= 65536, "--topics", text(s.topics), "must satisfy 1 <= topics <= 65536");
  require(s.domains >= 1 && s.domains <= c.experts, "--domains", text(s.domains),
          "must satisfy 1 <= domains <= experts (RRE maps each domain to a group of experts)");
  require(s.node_limited_k >= 1 && s.node_limited_k <= c.experts, "--node-limited-k", text(s.node_limited_k),
          "must satisfy 1 <= k <= experts");
  require(s.token_bytes >= 1, "--token-bytes", text(s.token_bytes), "must be >= 1");
  require(s.skew >= 0 && s.skew <= 1, "--skew", text(s.skew), "must satisfy 0 <= skew <= 1");
  require(s.noise >= 0 && std::isfinite(s.noise), "--noise", text(s.noise), "must be finite and >= 0");
  require(s.capacity_factor > 0 && std::isfinite(s.capacity_factor), "--capacity-factor", text(s.capacity_factor),
          "must be finite and > 0");
  require(s.aux_coeff >= 0 && std::isfinite(s.aux_coeff), "--aux-coeff", text(s.aux_coeff), "must be finite and >= 0");
  require(s.locality_coeff >= 0 && std::isfinite(s.locality_coeff), "--loc-coeff", text(s.locality_coeff),
          "must be finite and >= 0");
  require(s.task_coeff >= 0 && std::isfinite(s.task_coeff), "--task-coeff", text(s.task_coeff), "must be finite and >= 0");
  require(s.learning_rate > 0 && std::isfinite(s.learning_rate), "--learning-rate", text(s.learning_rate),
          "must be finite and > 0");
  const auto all = settings::router_names();
  require(!s.routers.empty(), "--routers", "", "must name at least one router");
  for (const std::string& r : s.routers) {
    require(std::find(all.begin(), all.end(), r) != all.end(), "--routers", r,
            "must be among hash, switch, rre, locmoe, node-limited");
  }
  require(s.eval_fraction > 0 && s.eval_fraction <= 1, "--eval-fraction", text(s.eval_fraction),
          "must satisfy 0 < fraction <= 1");
}

/// Running sums of one router's metrics over the evaluation window.
struct window {
  double kept = 0, inter = 0, intra = 0, local = 0, routed = 0, dropped = 0, load_ratio = 0, affinity = 0;
  double flat = 0, groupwise = 0, two_level = 0;
  std::vector<double> load;
  std::int64_t steps = 0, capacity = 0;
};

}  // namespace

cluster_result simulate(const cluster& spec, const settings& s, const progress_callback& progress) {
  check_settings(spec, s);
  const auto nodes = static_cast<std::size_t>(spec.nodes), per_node = static_cast<std::size_t>(spec.ranks_per_node);
  const std::size_t ranks = nodes * per_node, n = static_cast<std::size_t>(spec.experts);
  const std::size_t tokens = ranks * static_cast<std::size_t>(s.tokens_per_rank), f = static_cast<std::size_t>(s.features);
  const topology topo = topology::uniform(static_cast<std::int64_t>(ranks), spec.ranks_per_node, spec.experts);
  const token_stream stream(s, nodes, per_node);

  // Node-limited Top-k: groups are the nodes; M is the fewest nodes whose experts can hold k choices.
  std::vector<std::size_t> sizes;
  for (std::size_t m = 0; m < nodes; ++m) {
    if (topo.experts_on_node(m) > 0) sizes.push_back(topo.experts_on_node(m));
  }
  std::sort(sizes.begin(), sizes.end());
  std::size_t group_limit = 0;
  for (std::size_t held = 0; held < static_cast<std::size_t>(s.node_limited_k); held += sizes[group_limit++]) {}

  const std::vector<std::string> names = settings::router_names();
  std::vector<bool> run(names.size(), false);
  for (std::size_t i = 0; i < names.size(); ++i) run[i] = std::find(s.routers.begin(), s.routers.end(), names[i]) != s.routers.end();
  const auto r = static_cast<std::size_t>(s.adapter_rank), k_nl = static_cast<std::size_t>(s.node_limited_k);
  // Learned routers: switch, locmoe, node-limited (slots 1, 3, 4); the same seed gives them the same adapter start.
  std::vector<std::unique_ptr<learned_router>> learned(names.size());
  learned[1] = std::make_unique<learned_router>(true, tokens, f, n, r, 1, false, s.seed + 11);
  learned[3] = std::make_unique<learned_router>(false, tokens, f, n, r, 1, true, s.seed + 11);
  learned[4] = std::make_unique<learned_router>(true, tokens, f, n, r, k_nl, false, s.seed + 11);
  learned[4]->options.groups = nodes;
  learned[4]->options.group_limit = group_limit;
  learned[4]->options.expert_group = topo.node_of_expert_map().data();

  // Every router's experts start with the same specialties.
  std::vector<matrix> specialty(names.size());
  {
    std::mt19937_64 rng(s.seed + 23);
    std::normal_distribution<double> normal(0.0, 1.0);
    matrix m0(ix(n), ix(f));
    for (Eigen::Index i = 0; i < m0.size(); ++i) m0.data()[i] = normal(rng);
    m0.rowwise().normalize();
    for (auto& m : specialty) m = m0;
  }

  std::vector<double> x;
  std::vector<std::int64_t> ids;
  std::vector<std::int32_t> domains;
  std::vector<window> sums(names.size());
  // At least the last step is evaluated, however small the fraction.
  const auto eval_start = std::min<std::int64_t>(
      s.steps - 1, static_cast<std::int64_t>(std::floor(static_cast<double>(s.steps) * (1 - s.eval_fraction))));
  std::vector<expert_index> choice, expert;
  std::vector<slot_index> slot;
  std::vector<double> weight, kept_weight;
  std::vector<std::int64_t> per_expert(n);
  matrix affinity(ix(tokens), ix(n));
  capacity_options co;
  co.capacity_factor = s.capacity_factor;
  capacity_assigner<double> assigner(n, co);  // its workspace is reused by every router and step
  for (std::int64_t step = 0; step < s.steps; ++step) {
    stream.draw(step, ranks, x, ids, domains);
    const const_map X(x.data(), ix(tokens), ix(f));
    for (std::size_t which = 0; which < names.size(); ++which) {
      if (!run[which]) continue;
      affinity.noalias() = X * specialty[which].transpose();
      learned_router* lr = learned[which].get();
      const std::size_t k = which == 4 ? k_nl : 1;
      choice.resize(tokens * k);
      weight.resize(tokens * k);
      const matrix_view<expert_index> choice_view(choice.data(), tokens, k);
      const matrix_view<double> weight_view(weight.data(), tokens, k);
      if (which == 0) {
        hash_route(ids.data(), tokens, n, hash_options<std::int64_t>{s.seed, nullptr, 0}, choice_view, weight_view);
      } else if (which == 2) {
        rre_route(ids.data(), domains.data(), tokens, n, static_cast<std::size_t>(s.domains), s.seed, choice_view,
                  weight_view);
      } else {
        lr->pass.forward(lr->p, x.data(), lr->options);
        std::copy(lr->pass.indices.begin(), lr->pass.indices.end(), choice.begin());
        std::copy(lr->pass.weights.data(), lr->pass.weights.data() + tokens * k, weight.begin());
      }
      expert.resize(tokens * k);
      slot.resize(tokens * k);
      kept_weight.resize(tokens * k);
      const assignment_stats stats = assigner.run(
          matrix_view<const expert_index>(choice.data(), tokens, k), matrix_view<const double>(weight.data(), tokens, k),
          {{expert.data(), tokens, k}, {slot.data(), tokens, k}, {kept_weight.data(), tokens, k}, per_expert.data(), nullptr},
          {&topo, token_ranks::contiguous_blocks(), {}});
      if (step >= eval_start) {
        window& w = sums[which];
        const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), tokens, k),
                                                       matrix_view<const slot_index>(slot.data(), tokens, k),
                                                       stats.capacity, topo, token_ranks::contiguous_blocks(), s.token_bytes);
        const auto seconds = [&](exchange_scheme scheme) {
          return model_exchange_time(build_exchange_plan(plan.send_bytes, topo, {scheme, false}), topo, s.model).seconds;
        };
        w.flat += seconds(exchange_scheme::flat);
        w.groupwise += seconds(exchange_scheme::split_gather);
        w.two_level += seconds(exchange_scheme::two_level);
        w.kept += static_cast<double>(stats.kept);
        w.inter += static_cast<double>(plan.inter_node);
        w.intra += static_cast<double>(plan.intra_node);
        w.local += static_cast<double>(plan.intra_rank);
        w.routed += static_cast<double>(stats.routed);
        w.dropped += static_cast<double>(stats.dropped);
        w.load_ratio += stats.mean_load > 0 ? static_cast<double>(stats.max_load) / stats.mean_load : 0.0;
        for (std::size_t p = 0; p < tokens * k; ++p) {
          if (expert[p] != no_expert) w.affinity += affinity(ix(p / k), expert[p]);
        }
        w.load.resize(n, 0.0);
        for (std::size_t e = 0; e < n; ++e) w.load[e] += static_cast<double>(per_expert[e]);
        w.capacity = stats.capacity;
        ++w.steps;
      }
      if (lr) lr->train(x.data(), affinity.data(), topo, s);
      // Experts specialize on what they keep.
      matrix sum = matrix::Zero(ix(n), ix(f));
      std::vector<double> count(n, 0.0);
      for (std::size_t p = 0; p < tokens * k; ++p) {
        if (expert[p] == no_expert) continue;
        sum.row(expert[p]) += X.row(ix(p / k));
        count[static_cast<std::size_t>(expert[p])] += 1;
      }
      for (std::size_t e = 0; e < n; ++e) {
        if (count[e] == 0) continue;
        auto row = specialty[which].row(ix(e));
        row = (1 - s.specialization_rate) * row + s.specialization_rate * sum.row(ix(e)) / count[e];
        row.normalize();
      }
    }
    if (progress) progress(step + 1, s.steps);
  }
  cluster_result result{spec, {}};
  for (std::size_t which = 0; which < names.size(); ++which) {
    if (!run[which]) continue;
    const window& w = sums[which];
    const double steps = static_cast<double>(w.steps);
    router_result rr;
    rr.router = names[which];
    rr.top_k = which == 4 ? s.node_limited_k : 1;
    rr.capacity = w.capacity;
    rr.inter_node_share = w.kept > 0 ? w.inter / w.kept : 0;
    rr.intra_node_share = w.kept > 0 ? w.intra / w.kept : 0;
    rr.rank_local_share = w.kept > 0 ? w.local / w.kept : 0;
    rr.max_mean_load = w.load_ratio / steps;
    rr.drop_rate = w.routed > 0 ? w.dropped / w.routed : 0;
    rr.capacity_used = w.capacity > 0 ? w.kept / (steps * static_cast<double>(n) * static_cast<double>(w.capacity)) : 0;
    rr.affinity = w.kept > 0 ? w.affinity / w.kept : 0;
    rr.a2a_seconds_flat = w.flat / steps;
    rr.a2a_seconds_groupwise = w.groupwise / steps;
    rr.a2a_seconds_two_level = w.two_level / steps;
    for (const double l : w.load) rr.load_per_expert.push_back(l / steps);
    result.routers.push_back(rr);
  }
  return result;
}

}  // namespace locmoe::cli::sim
