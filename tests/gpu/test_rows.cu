// dispatch and combine against the CPU backend, bit for bit, for float, bf16 and fp16 rows: the capacity layout
// without kept counts (only the kept pairs' rows are written: the rest keep their fill), with kept counts (padding
// rows zero), the grouped layout (pair_layout::expert_offset, a device pointer [n + 1], spare rows per expert) with
// and without kept counts; odd d; rows that are not 16-byte aligned. dispatch copies bits: x holds a signalling
// NaN, quiet NaN of either sign, infinities and -0. combine's rows hold, for every 5th token, quiet NaN of either
// sign and infinities (one special value per output element, so the CPU's result is defined: the NaN with its sign,
// or the infinity); rows no kept pair names hold NaN, so a read of a wrong row shows.
#include "gpu_test.hpp"

#include <random>

namespace gpu_test {

assignment make_assignment(std::size_t tokens, std::size_t k, std::size_t n, std::size_t capacity, unsigned seed) {
  using locmoe::expert_index;
  std::mt19937 rng(seed);
  std::uniform_int_distribution<std::size_t> any(0, n - 1), low(0, (n - 1) / 4);
  std::vector<expert_index> indices(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    for (std::size_t j = 0; j < k; ++j) {
      expert_index e;
      do {
        e = static_cast<expert_index>(rng() % 2 ? any(rng) : low(rng));  // half the choices on the first quarter
      } while (std::find(indices.begin() + static_cast<std::ptrdiff_t>(t * k),
                         indices.begin() + static_cast<std::ptrdiff_t>(t * k + j),
                         e) != indices.begin() + static_cast<std::ptrdiff_t>(t * k + j));
      indices[t * k + j] = e;
    }
    if (t % 13 == 5) indices[t * k + k - 1] = locmoe::no_expert;
  }
  assignment a;
  a.tokens = tokens;
  a.top_k = k;
  a.experts = n;
  a.capacity = capacity;
  a.expert.resize(tokens * k);
  a.slot.resize(tokens * k);
  a.kept.resize(n);
  std::vector<std::int64_t> routed(n);
  std::vector<unsigned char> ws(cpu().slot_workspace_size(tokens, n));
  cpu().assign_slots({{indices.data(), tokens, k},
                      {a.expert.data(), tokens, k},
                      {a.slot.data(), tokens, k},
                      routed.data(),
                      a.kept.data(),
                      n,
                      static_cast<std::int64_t>(capacity)},
                     ws.data(), ws.size());
  a.offsets.assign(n + 1, 0);
  for (std::size_t e = 0; e < n; ++e) a.offsets[e + 1] = a.offsets[e] + a.kept[e] + static_cast<std::int64_t>(e % 3);
  return a;
}

namespace {

using namespace locmoe;

/// Which buffer rows the CPU writes: the kept pairs' rows, and with kept counts every row (padding as zeros).
std::vector<bool> written_rows(const assignment& a, const pair_layout& host_pairs, bool kept, std::size_t rows) {
  std::vector<bool> written(rows, kept);
  for (std::size_t p = 0; p < a.tokens * a.top_k; ++p) {
    if (host_pairs.kept(p)) written[host_pairs.row(p)] = true;
  }
  return written;
}

template <class A>
void forward_rows(const row_case& c, const assignment& a, const device_assignment& da, unsigned seed) {
  const std::size_t T = c.tokens, d = c.d, k = c.k, rows = a.rows(c.grouped);
  const pair_layout hp = pairs_of(a, a.expert.data(), a.slot.data(), c.kept ? a.kept.data() : nullptr,
                                  c.grouped ? a.offsets.data() : nullptr);
  const pair_layout gp = pairs_of(a, da.expert.data(), da.slot.data(), c.kept ? da.kept.data() : nullptr,
                                  c.grouped ? da.offsets.data() : nullptr);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const cuda_backend gpu{};
  const layout xl = shaped(T, d, c.unaligned), bl = shaped(rows, d, c.unaligned), wl = shaped(T, k, c.unaligned);

  // dispatch
  std::vector<A> x = filled<A>(xl.size());
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t col = 0; col < d; ++col) {
      at(x, xl, t, col) = A(normal(rng));
      if (t % 7 != 3 || col % 9 > 5) continue;
      const special kinds[] = {special::signalling_nan, special::negative_quiet_nan, special::quiet_nan,
                               special::infinity,       special::negative_infinity,  special::negative_zero};
      at(x, xl, t, col) = special_value<A>(kinds[col % 9]);
    }
  }
  std::vector<A> want_b = filled<A>(bl.size());
  cpu().dispatch(hp, const_view(x.data(), xl), view(want_b.data(), bl));
  const device_array<A> dx(x);
  device_array<A> gb(bl.size());
  gpu.dispatch(gp, const_view(dx.data(), xl), view(gb.data(), bl), stream);
  sync("dispatch");
  const std::vector<A> got_b = gb.host();
  const std::vector<bool> written = written_rows(a, hp, c.kept, rows);
  std::size_t written_count = 0, written_differ = 0, fill_lost = 0, cpu_fill_lost = 0;
  for (const bool w : written) written_count += w;
  for (std::size_t i = 0; i < bl.size(); ++i) {
    const bool in_written = bl.inside(i) && written[bl.row_of(i)];
    if (in_written) {
      written_differ += !same_bits(want_b[i], got_b[i]);
    } else {
      fill_lost += !is_fill(got_b[i]);
      cpu_fill_lost += !is_fill(want_b[i]);
    }
  }
  std::printf(
      "%s: %zu of %zu rows written (%s), %zu elements differ from the CPU's bit for bit; %zu elements of the "
      "other rows and the gaps lost their fill\n",
      row_label("dispatch", type_name<A>(), c).c_str(), written_count, rows,
      c.kept ? "kept pairs, padding zeros" : "kept pairs only", written_differ, fill_lost);
  expect(written_differ == 0, row_label("dispatch", type_name<A>(), c) + ": written rows differ from the CPU's");
  expect(fill_lost == 0, row_label("dispatch", type_name<A>(), c) + ": rows the CPU leaves (or the gaps) were written");
  expect(cpu_fill_lost == 0, row_label("dispatch", type_name<A>(), c) + ": test premise: the CPU wrote other rows");

  // combine
  std::vector<A> in = random_rows<A>(hp, bl, rng);
  std::size_t special_tokens = 0;
  for (std::size_t t = 0; t < T; t += 5) {
    std::size_t j = 0;
    while (j < k && !hp.kept(t * k + j)) ++j;
    if (j == k) continue;
    ++special_tokens;
    const special kinds[] = {special::quiet_nan, special::negative_quiet_nan, special::infinity,
                             special::negative_infinity};
    for (std::size_t col = 0; col < d; col += 6) {
      for (std::size_t s = 0; s < 4 && col + s < d; ++s)
        at(in, bl, hp.row(t * k + j), col + s) = special_value<A>(kinds[s]);
    }
  }
  std::uniform_real_distribution<float> positive(0.1f, 1.0f);
  std::vector<float> weight = filled<float>(wl.size());
  for (std::size_t t = 0; t < T; ++t) {
    for (std::size_t j = 0; j < k; ++j) at(weight, wl, t, j) = positive(rng);
  }
  std::vector<A> want_y = filled<A>(xl.size());
  cpu().combine(hp, const_view(in.data(), bl), const_view(weight.data(), wl), view(want_y.data(), xl));
  const device_array<A> din(in);
  const device_array<float> dweight(weight);
  device_array<A> gy(xl.size());
  gpu.combine(gp, const_view(din.data(), bl), const_view(dweight.data(), wl), view(gy.data(), xl), stream);
  sync("combine");
  const std::vector<A> got_y = gy.host();
  // Compared whole (bit for bit), and counted apart: the elements whose CPU result is NaN (NaN on the GPU too; their
  // bits may differ, as cuda.cuh says: the device's float arithmetic makes every NaN 0x7fffffff), the other elements
  // (bit for bit), and the gaps (must keep the fill).
  const bit_diff dy = compare_bits(want_y, got_y, &xl);
  std::size_t nan_plus = 0, nan_minus = 0, nan_bits_differ = 0, nan_differ = 0, other_differ = 0;
  for (std::size_t i = 0; i < want_y.size(); ++i) {
    if (!xl.inside(i)) continue;
    const float v = static_cast<float>(want_y[i]);
    const bool differ = !same_bits(want_y[i], got_y[i]);
    if (std::isnan(v)) {
      (std::signbit(v) ? nan_minus : nan_plus) += 1;
      nan_bits_differ += differ;
      nan_differ += !std::isnan(static_cast<float>(got_y[i]));
    } else {
      other_differ += differ;
    }
  }
  const std::string label = row_label("combine", type_name<A>(), c);
  std::printf(
      "%s: y bit for bit: %s; of them %zu of the %zu NaN results (%zu +NaN, %zu -NaN on the CPU; %zu tokens "
      "with NaN of either sign and infinities; %zu not NaN on the GPU), %zu others\n",
      label.c_str(), describe(dy, want_y, got_y, &xl).c_str(), nan_bits_differ, nan_plus + nan_minus, nan_plus,
      nan_minus, special_tokens, nan_differ, other_differ);
  expect(other_differ == 0, label + ": y differs from the CPU's where the CPU's result is not NaN");
  expect(nan_differ == 0, label + ": a NaN result of the CPU is not NaN on the GPU");
  expect(dy.count == dy.inside, label + ": y written outside its view");
  expect(nan_plus > 0 && nan_minus > 0, label + ": test premise: no NaN of both signs in the CPU's y");
}

}  // namespace

void test_rows() {
  const row_case cases[] = {
      {"capacity layout", 1001, 256, 16, 2, 100, false, false, false},
      {"capacity layout + kept counts, unaligned", 1001, 301, 64, 4, 60, true, true, false},
      {"grouped layout + kept counts, unaligned", 513, 301, 16, 1, 40, true, true, true},
      {"grouped layout", 700, 64, 16, 2, 50, false, false, true},
  };
  unsigned seed = 200;
  for (const row_case& c : cases) {
    const assignment a = make_assignment(c.tokens, c.k, c.n, c.capacity, ++seed);
    const device_assignment da(a);
    forward_rows<float>(c, a, da, ++seed);
    forward_rows<bf16>(c, a, da, ++seed);
    forward_rows<fp16>(c, a, da, ++seed);
  }
}

}  // namespace gpu_test
