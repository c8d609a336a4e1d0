// exchange.hpp: routes end where they should, plans conserve bytes and match hand-worked stages, the
// alpha-beta model matches hand calculations, and bad inputs are refused.
#include <locmoe/exchange.hpp>

#include "test_util.hpp"

#include <doctest/doctest.h>

#include <random>
#include <vector>

using namespace locmoe;

namespace {

// The route of a row from s to t, written from exchange.hpp's header comment (the schemes' rules), not from its
// code: what the library's routes and plans are compared against.
std::vector<exchange_hop> documented_route(const topology& topo, exchange_scheme scheme, std::size_t s, std::size_t t) {
  std::vector<std::vector<std::int32_t>> members(topo.nodes());  // each node's ranks in rank order
  std::vector<std::size_t> position(topo.ranks());               // pos(r): r's index among its node's ranks
  for (std::size_t r = 0; r < topo.ranks(); ++r) {
    auto& m = members[static_cast<std::size_t>(topo.node_of_rank(r))];
    position[r] = m.size();
    m.push_back(static_cast<std::int32_t>(r));
  }
  const auto rank_at = [&](std::size_t node, std::size_t index) { return members[node][index % members[node].size()]; };
  std::vector<exchange_hop> hops;
  const auto hop = [&](std::size_t stage, std::int32_t from, std::int32_t to) {
    if (from != to) hops.push_back({stage, from, to});  // a hop to the same rank is skipped
  };
  const auto src = static_cast<std::int32_t>(s), dst = static_cast<std::int32_t>(t);
  const auto a = static_cast<std::size_t>(topo.node_of_rank(s)), b = static_cast<std::size_t>(topo.node_of_rank(t));
  if (scheme == exchange_scheme::flat) {
    hop(0, src, dst);
  } else if (scheme == exchange_scheme::split_gather) {
    if (a == b) {
      hop(1, src, dst);  // rows for the own node go s -> t in stage 1
    } else {
      const std::int32_t p = rank_at(b, position[s]);  // the rank at position pos(s) mod |b| of node b
      hop(0, src, p);
      hop(1, p, dst);
    }
  } else {
    if (a == b) {
      hop(0, src, dst);  // rows for the own node go s -> t in stage 0
    } else {
      const std::int32_t gate_a = rank_at(a, b), gate_b = rank_at(b, a);  // pos b mod |a| of a, pos a mod |b| of b
      hop(0, src, gate_a);
      hop(1, gate_a, gate_b);
      hop(2, gate_b, dst);
    }
  }
  return hops;
}

std::vector<std::int64_t> random_sends(std::size_t ranks, unsigned seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> bytes(0, 1000);
  std::vector<std::int64_t> s(ranks * ranks);
  for (auto& v : s) v = bytes(rng) < 200 ? 0 : bytes(rng);  // some pairs send nothing
  return s;
}

// Uneven nodes: 3, 2 and 1 ranks (explicit maps), and the uniform case.
std::vector<topology> topologies() {
  return {topology::uniform(8, 4, 8), topology::uniform(12, 3, 6),
          topology({0, 0, 0, 1, 1, 2}, {0, 1, 2, 3, 4, 5}), topology::uniform(4, 4, 4)};
}

const exchange_scheme schemes[] = {exchange_scheme::flat, exchange_scheme::split_gather, exchange_scheme::two_level};

}  // namespace

TEST_CASE("exchange routes: every row reaches its rank through the scheme's stages and links") {
  for (const topology& topo : topologies()) {
    const exchange_router router(topo);
    for (const exchange_scheme scheme : schemes) {
      for (std::size_t s = 0; s < topo.ranks(); ++s) {
        for (std::size_t t = 0; t < topo.ranks(); ++t) {
          const auto hops = router.route(scheme, s, t);
          CAPTURE(s);
          CAPTURE(t);
          const auto documented = documented_route(topo, scheme, s, t);
          REQUIRE(hops.size() == documented.size());
          for (std::size_t h = 0; h < hops.size(); ++h) {
            CHECK(hops[h].stage == documented[h].stage);
            CHECK(hops[h].from == documented[h].from);
            CHECK(hops[h].to == documented[h].to);
          }
          CHECK(exchange_route(topo, scheme, s, t).size() == hops.size());
          if (s == t) {
            CHECK(hops.empty());
            continue;
          }
          REQUIRE(!hops.empty());
          CHECK(hops.front().from == static_cast<std::int32_t>(s));
          CHECK(hops.back().to == static_cast<std::int32_t>(t));
          int inter = 0;
          for (std::size_t h = 0; h < hops.size(); ++h) {
            CHECK(hops[h].from != hops[h].to);
            if (h > 0) {
              CHECK(hops[h].from == hops[h - 1].to);
              CHECK(hops[h].stage > hops[h - 1].stage);
            }
            const bool crosses = topo.node_of_rank(static_cast<std::size_t>(hops[h].from)) !=
                                 topo.node_of_rank(static_cast<std::size_t>(hops[h].to));
            inter += crosses;
            // Inter-node hops happen in one stage only: 0 (flat, split_gather) or 1 (two_level).
            if (crosses) CHECK(hops[h].stage == (scheme == exchange_scheme::two_level ? 1u : 0u));
          }
          CHECK(inter == (topo.node_of_rank(s) != topo.node_of_rank(t) ? 1 : 0));
          // two_level crosses between the pair's gateways.
          if (scheme == exchange_scheme::two_level && inter) {
            const auto a = static_cast<std::size_t>(topo.node_of_rank(s)), b = static_cast<std::size_t>(topo.node_of_rank(t));
            for (const exchange_hop& h : hops) {
              if (h.stage == 1) {
                CHECK(h.from == router.gateway(a, b));
                CHECK(h.to == router.gateway(b, a));
              }
            }
          }
        }
      }
    }
  }
}

TEST_CASE("exchange plans: bytes are conserved and inter-node bytes do not depend on the scheme") {
  unsigned seed = 1;
  for (const topology& topo : topologies()) {
    const std::size_t R = topo.ranks();
    const auto S = random_sends(R, seed++);
    std::int64_t inter = 0, local = 0;
    for (std::size_t s = 0; s < R; ++s) {
      for (std::size_t t = 0; t < R; ++t) {
        if (s == t) local += S[s * R + t];
        else if (topo.node_of_rank(s) != topo.node_of_rank(t)) inter += S[s * R + t];
      }
    }
    for (const exchange_scheme scheme : schemes) {
      const exchange_plan plan = build_exchange_plan(S, topo, {scheme, false});
      CHECK(plan.local_bytes == local);
      CHECK(plan.bytes(link_class::inter_node) == inter);
      // Flow conservation: what a rank receives minus what it forwards is what was sent to it by others,
      // minus what it sent to others.
      std::vector<std::int64_t> net(R, 0);
      std::size_t inter_messages = 0;
      for (const exchange_stage& st : plan.stages) {
        std::int64_t by_class[2] = {0, 0};
        for (std::size_t i = 0; i < st.transfers.size(); ++i) {
          const transfer& m = st.transfers[i];
          CHECK(m.bytes > 0);
          CHECK(m.source != m.destination);
          if (i > 0) {
            const transfer& p = st.transfers[i - 1];
            CHECK((p.source < m.source || (p.source == m.source && p.destination < m.destination)));
          }
          net[static_cast<std::size_t>(m.destination)] += m.bytes;
          net[static_cast<std::size_t>(m.source)] -= m.bytes;
          const bool crosses = topo.node_of_rank(static_cast<std::size_t>(m.source)) !=
                               topo.node_of_rank(static_cast<std::size_t>(m.destination));
          by_class[crosses] += m.bytes;
          inter_messages += crosses;
        }
        CHECK(st.bytes[0] == by_class[0]);
        CHECK(st.bytes[1] == by_class[1]);
      }
      for (std::size_t r = 0; r < R; ++r) {
        std::int64_t want = 0;
        for (std::size_t o = 0; o < R; ++o) {
          if (o != r) want += S[o * R + r] - S[r * R + o];
        }
        CHECK(net[r] == want);
      }
      // Two-level: at most one inter-node message per ordered node pair.
      if (scheme == exchange_scheme::two_level) CHECK(inter_messages <= topo.nodes() * (topo.nodes() - 1));
    }
  }
}

TEST_CASE("exchange plans on 2 nodes of 2 ranks, worked by hand") {
  // Ranks 0, 1 on node 0; 2, 3 on node 1. S[s][t] in bytes.
  const topology topo = topology::uniform(4, 2, 4);
  const std::vector<std::int64_t> S = {
      5, 10, 20, 30,   // rank 0
      1, 7, 40, 50,    // rank 1
      2, 3, 9, 4,      // rank 2
      6, 8, 11, 13};   // rank 3
  const exchange_plan flat = build_exchange_plan(S, topo);
  REQUIRE(flat.stages.size() == 1);
  CHECK(flat.stages[0].transfers.size() == 12);
  CHECK(flat.stages[0].bytes[0] == 10 + 1 + 4 + 11);
  CHECK(flat.stages[0].bytes[1] == 20 + 30 + 40 + 50 + 2 + 3 + 6 + 8);
  CHECK(flat.local_bytes == 5 + 7 + 9 + 13);

  // split_gather: rank at position p sends node-1 rows to position p of node 1, which forwards them.
  const exchange_plan sg = build_exchange_plan(S, topo, {exchange_scheme::split_gather, false});
  REQUIRE(sg.stages.size() == 2);
  // Stage 0: 0->2 (20+30), 1->3 (40+50), 2->0 (2+3), 3->1 (6+8).
  const std::vector<transfer> stage0 = {{0, 2, 50}, {1, 3, 90}, {2, 0, 5}, {3, 1, 14}};
  REQUIRE(sg.stages[0].transfers.size() == stage0.size());
  for (std::size_t i = 0; i < stage0.size(); ++i) {
    CHECK(sg.stages[0].transfers[i].source == stage0[i].source);
    CHECK(sg.stages[0].transfers[i].destination == stage0[i].destination);
    CHECK(sg.stages[0].transfers[i].bytes == stage0[i].bytes);
  }
  // Stage 1 inside the nodes: 0->1: own 10 + forwarded 3 (from rank 2 via 0); 1->0: own 1 + 6 (rank 3 via 1);
  // 2->3: own 4 + 30 (rank 0 via 2); 3->2: own 11 + 40 (rank 1 via 3).
  const std::vector<transfer> stage1 = {{0, 1, 13}, {1, 0, 7}, {2, 3, 34}, {3, 2, 51}};
  REQUIRE(sg.stages[1].transfers.size() == stage1.size());
  for (std::size_t i = 0; i < stage1.size(); ++i) {
    CHECK(sg.stages[1].transfers[i].source == stage1[i].source);
    CHECK(sg.stages[1].transfers[i].destination == stage1[i].destination);
    CHECK(sg.stages[1].transfers[i].bytes == stage1[i].bytes);
  }
  // All-Gather: each rank passes everything it holds for its node to the other rank of the node.
  // Rank 0 holds 5 + 10 (own) + 5 (from 2) = 20; rank 1: 1 + 7 + 14 = 22; rank 2: 9 + 4 + 50 = 63; rank 3: 11 + 13 + 90 = 114.
  const exchange_plan ag = build_exchange_plan(S, topo, {exchange_scheme::split_gather, true});
  const std::vector<transfer> gather = {{0, 1, 20}, {1, 0, 22}, {2, 3, 63}, {3, 2, 114}};
  REQUIRE(ag.stages[1].transfers.size() == gather.size());
  CHECK(ag.stages[1].name == "intra-node all-gather");
  for (std::size_t i = 0; i < gather.size(); ++i) {
    CHECK(ag.stages[1].transfers[i].source == gather[i].source);
    CHECK(ag.stages[1].transfers[i].destination == gather[i].destination);
    CHECK(ag.stages[1].transfers[i].bytes == gather[i].bytes);
  }

  // two_level: gateway of (node 0 -> node 1) is position 1 of node 0 (rank 1), of node 1 for node 0 position 0
  // (rank 2); of (1 -> 0): rank 2 (position 0 of node 1) sends to rank 1 (position 1 of node 0).
  const exchange_plan tl = build_exchange_plan(S, topo, {exchange_scheme::two_level, false});
  REQUIRE(tl.stages.size() == 3);
  // Stage 0: 0->1: own 10 + node-1 rows 20 + 30; 1->0: 1; 2->3: 4; 3->2: 11 + node-0 rows 6 + 8.
  const std::vector<transfer> gatherTL = {{0, 1, 60}, {1, 0, 1}, {2, 3, 4}, {3, 2, 25}};
  REQUIRE(tl.stages[0].transfers.size() == gatherTL.size());
  for (std::size_t i = 0; i < gatherTL.size(); ++i) CHECK(tl.stages[0].transfers[i].bytes == gatherTL[i].bytes);
  // Stage 1: 1->2 carries all of node 0's rows for node 1 (140), 2->1 all of node 1's for node 0 (19).
  REQUIRE(tl.stages[1].transfers.size() == 2);
  CHECK(tl.stages[1].transfers[0].source == 1);
  CHECK(tl.stages[1].transfers[0].destination == 2);
  CHECK(tl.stages[1].transfers[0].bytes == 140);
  CHECK(tl.stages[1].transfers[1].bytes == 19);
  // Stage 2: 2->3 scatters 30 + 50; 1->0 scatters 2 + 6.
  REQUIRE(tl.stages[2].transfers.size() == 2);
  CHECK(tl.stages[2].transfers[0].source == 1);
  CHECK(tl.stages[2].transfers[0].bytes == 8);
  CHECK(tl.stages[2].transfers[1].source == 2);
  CHECK(tl.stages[2].transfers[1].bytes == 80);

  // The model, by hand: intra 1 us + 100 B/us, inter 10 us + 10 B/us.
  const comm_model model{{1e-6, 100e6}, {10e-6, 10e6}};
  // Flat: rank 1 sends 2 inter messages (90 B) and receives 2 (3 + 8 = 11 B): 20 us + 9 us = 29 us; rank 0:
  // 2 out (50 B) -> 25 us; rank 2 receives 20 + 40 = 60 B: 26 us; rank 3 receives 80: 28 us. Slowest: rank 1.
  const exchange_time tf = model_exchange_time(flat, topo, model);
  REQUIRE(tf.stages.size() == 1);
  CHECK(tf.seconds == doctest::Approx(29e-6).epsilon(1e-12));
  CHECK(tf.stages[0].slowest_rank == 1);
  CHECK(tf.stages[0].bottleneck == link_class::inter_node);
  // two_level stage 1: one 140 B message 1 -> 2: 10 + 14 = 24 us (rank 1 and 2 tie; the lower rank is reported).
  const exchange_time tt = model_exchange_time(tl, topo, model);
  CHECK(tt.stages[1].seconds == doctest::Approx(24e-6).epsilon(1e-12));
  CHECK(tt.stages[1].slowest_rank == 1);
  // Stage 0: rank 0 sends 60 B intra: 1 + 0.6 = 1.6 us; rank 2 receives 25 B (1.25 us), rank 3 sends 25... slowest 1.6.
  CHECK(tt.stages[0].seconds == doctest::Approx(1.6e-6).epsilon(1e-12));
  // Stage 2: rank 2 sends 80 B: 1.8 us.
  CHECK(tt.stages[2].seconds == doctest::Approx(1.8e-6).epsilon(1e-12));
  CHECK(tt.seconds == doctest::Approx(27.4e-6).epsilon(1e-12));
  // split_gather stage 0 (inter): rank 1 sends 90 B and receives 14 B: 10 + 9 = 19 us (rank 3 ties: 90 in);
  // stage 1 (intra): rank 2 sends 34 B, receives 51 B: 1 + 0.51 = 1.51 us (rank 3 ties).
  const exchange_time ts = model_exchange_time(sg, topo, model);
  REQUIRE(ts.stages.size() == 2);
  CHECK(ts.stages[0].seconds == doctest::Approx(19e-6).epsilon(1e-12));
  CHECK(ts.stages[0].slowest_rank == 1);
  CHECK(ts.stages[0].bottleneck == link_class::inter_node);
  CHECK(ts.stages[1].seconds == doctest::Approx(1.51e-6).epsilon(1e-12));
  CHECK(ts.stages[1].slowest_rank == 2);
  CHECK(ts.stages[1].bottleneck == link_class::intra_node);
  CHECK(ts.seconds == doctest::Approx(20.51e-6).epsilon(1e-12));
}

TEST_CASE("exchange plans move whole rows: stage by stage, every rank ends with exactly its rows") {
  unsigned seed = 40;
  for (const topology& topo : topologies()) {
    const std::size_t R = topo.ranks();
    const std::int64_t row_bytes = 3;
    auto rows = random_sends(R, seed++);  // rows per (source, destination)
    for (auto& v : rows) v %= 7;
    std::vector<std::int64_t> bytes(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i) bytes[i] = rows[i] * row_bytes;
    for (const exchange_scheme scheme : schemes) {
      CAPTURE(static_cast<int>(scheme));
      const exchange_plan plan = build_exchange_plan(bytes, topo, {scheme, false});
      // Each row: (current rank, destination, source); moved along its route one stage at a time.
      struct row { std::size_t at, destination, source; };
      std::vector<row> all;
      for (std::size_t s = 0; s < R; ++s) {
        for (std::size_t t = 0; t < R; ++t) {
          for (std::int64_t i = 0; i < rows[s * R + t]; ++i) all.push_back({s, t, s});
        }
      }
      for (std::size_t stage = 0; stage < plan.stages.size(); ++stage) {
        std::vector<std::int64_t> moved(R * R, 0);
        for (row& r : all) {
          for (const exchange_hop& h : documented_route(topo, scheme, r.source, r.destination)) {
            if (h.stage != stage) continue;
            REQUIRE(static_cast<std::size_t>(h.from) == r.at);  // the row is where the hop starts
            moved[r.at * R + static_cast<std::size_t>(h.to)] += row_bytes;
            r.at = static_cast<std::size_t>(h.to);
          }
        }
        std::vector<std::int64_t> planned(R * R, 0);
        for (const transfer& m : plan.stages[stage].transfers) {
          planned[static_cast<std::size_t>(m.source) * R + static_cast<std::size_t>(m.destination)] = m.bytes;
        }
        CHECK(moved == planned);
      }
      for (const row& r : all) CHECK(r.at == r.destination);
    }
  }
}

TEST_CASE("exchange plans and the model refuse bad input") {
  const topology topo = topology::uniform(4, 2, 4);
  std::vector<std::int64_t> S(16, 1);
  CHECK_THROWS_WITH_AS(build_exchange_plan(std::vector<std::int64_t>(15, 1), topo), doctest::Contains("send_bytes"), error);
  S[6] = -1;
  CHECK_THROWS_WITH_AS(build_exchange_plan(S, topo), doctest::Contains("send_bytes = [1][2] = -1"), error);
  S[6] = 1;
  CHECK_THROWS_WITH_AS(build_exchange_plan(S, topo, {exchange_scheme::flat, true}),
                       doctest::Contains("replicate_in_node"), error);
  S[1] = S[2] = std::numeric_limits<std::int64_t>::max() / 2 + 1;  // both leave rank 0 for node 0 / node 1 ...
  S[3] = std::numeric_limits<std::int64_t>::max() / 2 + 1;
  // ... and meet on the gateway of two_level's stage 0 (0 -> 1 carries S[0][1] + S[0][2] + S[0][3]).
  CHECK_THROWS_WITH_AS(build_exchange_plan(S, topo, {exchange_scheme::two_level, false}), doctest::Contains("int64"), error);
  CHECK(locmoe_test::error_argument([&] { exchange_route(topo, exchange_scheme::flat, 4, 0); }) == "source");
  CHECK(locmoe_test::error_argument([&] { exchange_route(topo, exchange_scheme::flat, 0, 4); }) == "destination");
  CHECK_THROWS_WITH_AS(build_exchange_plan(std::vector<std::int64_t>(16, 1), topo, {static_cast<exchange_scheme>(7), false}),
                       doctest::Contains("options.scheme = 7"), error);
  CHECK_THROWS_WITH_AS(exchange_route(topo, static_cast<exchange_scheme>(-1), 0, 1), doctest::Contains("scheme"), error);
  const exchange_router router(topo);
  CHECK(router.gateway(0, 1) == 1);
  CHECK(router.gateway(1, 0) == 2);
  CHECK_THROWS_WITH_AS(router.gateway(2, 0), doctest::Contains("from = 2"), error);
  const topology gap({0, 0, 2}, {0, 1, 2});  // node 1 holds no rank
  CHECK_THROWS_WITH_AS(exchange_router(gap).gateway(0, 1), doctest::Contains("to = 1"), error);
  CHECK_THROWS_WITH_AS(exchange_route(topo, exchange_scheme::flat, 0, 9), doctest::Contains("destination"), error);

  const exchange_plan plan = build_exchange_plan(std::vector<std::int64_t>(16, 1), topo);
  comm_model m = comm_model::ascend_910();
  m.inter_node.bytes_per_second = 0;
  CHECK_THROWS_WITH_AS(model_exchange_time(plan, topo, m), doctest::Contains("model.inter_node.bytes_per_second"), error);
  m = comm_model::ascend_910();
  m.intra_node.latency_seconds = std::nan("");
  CHECK_THROWS_WITH_AS(model_exchange_time(plan, topo, m), doctest::Contains("model.intra_node.latency_seconds"), error);
  CHECK_THROWS_WITH_AS(model_exchange_time(plan, topology::uniform(8, 2, 4), comm_model::ascend_910()),
                       doctest::Contains("topo"), error);
  // Same number of ranks, other nodes: the link classes would be wrong.
  CHECK_THROWS_WITH_AS(model_exchange_time(plan, topology::uniform(4, 1, 4), comm_model::ascend_910()),
                       doctest::Contains("the topology the plan was built on"), error);
  exchange_plan broken = plan;
  broken.stages[0].transfers[3].destination = 9;
  CHECK_THROWS_WITH_AS(model_exchange_time(broken, topo, comm_model::ascend_910()),
                       doctest::Contains("plan = stages[0].transfers[3]"), error);
  broken = plan;
  broken.stages[0].transfers[0].bytes = -5;
  CHECK_THROWS_WITH_AS(model_exchange_time(broken, topo, comm_model::ascend_910()), doctest::Contains("bytes > 0"), error);
  // An empty exchange costs nothing.
  const exchange_plan none = build_exchange_plan(std::vector<std::int64_t>(16, 0), topo, {exchange_scheme::two_level, false});
  const exchange_time t0 = model_exchange_time(none, topo, comm_model::ascend_910());
  CHECK(t0.seconds == 0);
  CHECK(t0.stages.size() == 3);
  CHECK(t0.stages[0].slowest_rank == -1);
}
