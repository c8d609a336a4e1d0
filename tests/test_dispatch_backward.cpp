// The backwards of dispatch and combine (dispatch.hpp, detail/rows.hpp, cpu_backend): against scalar references
// written from the definitions (bit for bit where the operations are the same, to rounding for the dot products),
// padding rows written as zeros over NaN-filled buffers, the grouped layout, and the CPU backend's threads bit for
// bit the single-threaded calls, for float, double, bf16 and fp16 rows, k = 1, 2, 3, with drops.
#include <locmoe/assign.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/dispatch.hpp>

#include <doctest/doctest.h>

#include "kernel_util.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

using namespace locmoe;

namespace {

/// A routed, capacity-assigned batch: T tokens, n experts, k choices, capacity C (drops happen).
struct batch {
  std::size_t tokens, n, k, d;
  std::int64_t capacity;
  std::vector<expert_index> expert;
  std::vector<slot_index> slot;
  std::vector<float> weight;
  dispatch_plan plan;
};

batch make_batch(std::uint32_t seed, std::size_t tokens, std::size_t n, std::size_t k, std::size_t d, std::int64_t capacity) {
  std::mt19937 rng(seed);
  std::vector<expert_index> choice(tokens * k);
  std::vector<float> w(tokens * k);
  for (std::size_t t = 0; t < tokens; ++t) {
    std::vector<expert_index> perm(n);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (std::size_t j = 0; j < k; ++j) {
      choice[t * k + j] = (t % 7 == 3 && j == k - 1) ? no_expert : perm[j];  // some masked slots
      w[t * k + j] = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
    }
  }
  capacity_options o;
  o.capacity = capacity;
  capacity_assigner<float> assigner(n, o);
  batch b{tokens, n, k, d, capacity, std::vector<expert_index>(tokens * k), std::vector<slot_index>(tokens * k),
          std::vector<float>(tokens * k), {}};
  assigner.run(matrix_view<const expert_index>(choice.data(), tokens, k), matrix_view<const float>(w.data(), tokens, k),
               {{b.expert.data(), tokens, k}, {b.slot.data(), tokens, k}, {b.weight.data(), tokens, k}});
  b.plan = build_dispatch_plan(matrix_view<const expert_index>(b.expert.data(), tokens, k),
                               matrix_view<const slot_index>(b.slot.data(), tokens, k), capacity,
                               topology::uniform(1, 1, static_cast<std::int64_t>(n)));
  return b;
}

template <class T>
std::vector<T> random_rows(std::mt19937& rng, std::size_t count) {
  std::vector<T> v(count);
  for (T& x : v) x = T(std::normal_distribution<float>(0.0f, 1.0f)(rng));
  return v;
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

template <class T>
bool is_zero_row(const T* row, std::size_t d) {
  for (std::size_t c = 0; c < d; ++c)
    if (!same_bits(row[c], T(0))) return false;
  return true;
}

}  // namespace

TEST_CASE_TEMPLATE("combine_backward and dispatch_backward against scalar references", T, float, double, bf16, fp16) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  // k = 20: more kept rows than the kernel sums in registers (16); d: tails of every step width, several chunks.
  for (const std::size_t k : {1u, 2u, 3u, 20u}) {
    CAPTURE(k);
    const std::size_t tokens = 41, n = k + 5, d = k == 2 ? 300 : k == 20 ? 530 : 37;
    const batch b = make_batch(static_cast<std::uint32_t>(k), tokens, n, k, d, 9);
    const std::size_t rows = b.plan.buffer_rows();
    std::mt19937 rng(3);
    const std::vector<T> buffer = random_rows<T>(rng, rows * d), grad_y = random_rows<T>(rng, tokens * d);
    // The buffer row of kept pair p, and the definition of combine: t's kept rows of `source` times their weights
    // (1 when unweighted) added in choice order to a zero, in A.
    const auto row_of = [&](std::size_t p) { return static_cast<std::size_t>(b.expert[p]) * b.plan.capacity + static_cast<std::size_t>(b.slot[p]); };
    const auto zero_then_add = [&](const std::vector<T>& source, bool weighted, std::size_t t, std::size_t c) {
      A sum = A(0);
      for (std::size_t j = 0; j < k; ++j) {
        const std::size_t p = t * k + j;
        if (b.expert[p] == no_expert) continue;
        sum += (weighted ? static_cast<A>(b.weight[p]) : A(1)) * static_cast<A>(source[row_of(p) * d + c]);
      }
      return sum;
    };
    std::vector<T> grad_buffer(rows * d, T(std::numeric_limits<float>::quiet_NaN()));
    std::vector<float> grad_weight(tokens * k, std::numeric_limits<float>::quiet_NaN());
    combine_backward(b.plan, matrix_view<const T>(buffer.data(), rows, d), matrix_view<const float>(b.weight.data(), tokens, k),
                     matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(grad_buffer.data(), rows, d),
                     matrix_view<float>(grad_weight.data(), tokens, k));
    // Every instruction set this CPU has, with non-temporal stores or without, gives the same bits.
    locmoe_test::for_each_arch([&](auto arch) {
      CAPTURE(decltype(arch)::name());
      for (const bool streaming : {false, true}) {
        std::vector<T> again(rows * d, T(std::numeric_limits<float>::quiet_NaN()));
        std::vector<float> again_weight(tokens * k, std::numeric_limits<float>::quiet_NaN());
        detail::combine_backward_kernel<T>{}(
            arch, {detail::layout_of(b.plan), matrix_view<const T>(buffer.data(), rows, d),
                   detail::weight_rows_of(matrix_view<const float>(b.weight.data(), tokens, k)),
                   matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(again.data(), rows, d),
                   detail::weight_grads_of(matrix_view<float>(again_weight.data(), tokens, k)), 0, tokens, streaming});
        CHECK(std::memcmp(again_weight.data(), grad_weight.data(), grad_weight.size() * sizeof(float)) == 0);
        for (std::size_t r = 0; r < rows; ++r) {  // rows the kernel writes (padding is zero_padding_rows' job)
          if (b.plan.pair_of_row[r] >= 0) CHECK(std::memcmp(&again[r * d], &grad_buffer[r * d], d * sizeof(T)) == 0);
        }
      }
    });
    std::vector<bool> filled(rows, false);
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t j = 0; j < k; ++j) {
        const std::size_t p = t * k + j;
        if (b.expert[p] == no_expert) {
          CHECK(grad_weight[p] == 0.0f);
          continue;
        }
        const std::size_t r = row_of(p);
        filled[r] = true;
        double dot = 0, magnitude = 0;
        for (std::size_t c = 0; c < d; ++c) {
          const T want = T(static_cast<A>(b.weight[p]) * static_cast<A>(grad_y[t * d + c]));
          CHECK(same_bits(grad_buffer[r * d + c], want));
          const double product = static_cast<double>(grad_y[t * d + c]) * static_cast<double>(buffer[r * d + c]);
          dot += product;
          magnitude += std::abs(product);
        }
        // Another summation order: within the float bound d eps sum |products| (plus the final rounding).
        const double bound = static_cast<double>(d) * std::numeric_limits<A>::epsilon() * magnitude +
                             std::numeric_limits<float>::epsilon() * std::abs(dot);
        CHECK(std::abs(static_cast<double>(grad_weight[p]) - dot) <= bound);
      }
    }
    for (std::size_t r = 0; r < rows; ++r)
      if (!filled[r]) CHECK(is_zero_row(grad_buffer.data() + r * d, d));  // padding: zeros, not the NaN it held

    std::vector<T> grad_x(tokens * d, T(std::numeric_limits<float>::quiet_NaN()));
    dispatch_backward(b.plan, matrix_view<const T>(grad_buffer.data(), rows, d), matrix_view<T>(grad_x.data(), tokens, d));
    for (std::size_t t = 0; t < tokens; ++t) {
      for (std::size_t c = 0; c < d; ++c) CHECK(same_bits(grad_x[t * d + c], T(zero_then_add(grad_buffer, false, t, c))));
    }

    // combine with weights (float, and the same as double) on every instruction set, with non-temporal stores into
    // 64-byte aligned rows and without, against zeroing then adding each kept row in choice order, bit for bit.
    // k = 20 sums more rows than the kernel keeps in registers (16).
    {
      const std::vector<double> weight_d(b.weight.begin(), b.weight.end());
      const std::size_t stride = (d + 63) / 64 * 64;  // every row 64-byte aligned (T is at most 8 bytes)
      std::vector<T> want(tokens * stride, T(0));
      for (std::size_t t = 0; t < tokens; ++t) {
        for (std::size_t c = 0; c < d; ++c) want[t * stride + c] = T(zero_then_add(buffer, true, t, c));
      }
      locmoe_test::for_each_arch([&](auto arch) {
        const std::string arch_name = decltype(arch)::name();
        CAPTURE(arch_name);
        for (const bool streaming : {false, true}) {
          for (const bool as_double : {false, true}) {
            CAPTURE(streaming);
            CAPTURE(as_double);
            std::vector<T> storage(tokens * stride + 64, T(0));
            T* y = storage.data();
            while (reinterpret_cast<std::uintptr_t>(y) % 64 != 0) ++y;
            const detail::weight_rows weights =
                as_double ? detail::weight_rows_of(matrix_view<const double>(weight_d.data(), tokens, k))
                          : detail::weight_rows_of(matrix_view<const float>(b.weight.data(), tokens, k));
            detail::combine_kernel<T>{}(arch, {detail::layout_of(b.plan), matrix_view<const T>(buffer.data(), rows, d), weights,
                                               matrix_view<T>(y, tokens, d, stride), 0, tokens, streaming});
            std::size_t wrong = 0;
            for (std::size_t t = 0; t < tokens; ++t) wrong += std::memcmp(y + t * stride, &want[t * stride], d * sizeof(T)) != 0;
            CHECK(wrong == 0);
          }
        }
      });
    }

    // dispatch writes padding rows as zeros.
    std::vector<T> dispatched(rows * d, T(std::numeric_limits<float>::quiet_NaN()));
    dispatch(b.plan, matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(dispatched.data(), rows, d));
    for (std::size_t r = 0; r < rows; ++r)
      if (!filled[r]) CHECK(is_zero_row(dispatched.data() + r * d, d));
  }
}

TEST_CASE_TEMPLATE("cpu_backend backwards equal the single-threaded calls bit for bit, any thread count", T, float, bf16) {
  const std::size_t tokens = 777, n = 8, k = 2, d = 70;
  const batch b = make_batch(21, tokens, n, k, d, 150);
  const std::size_t rows = b.plan.buffer_rows();
  std::mt19937 rng(4);
  const std::vector<T> buffer = random_rows<T>(rng, rows * d), grad_y = random_rows<T>(rng, tokens * d);
  std::vector<T> gb_ref(rows * d), gx_ref(tokens * d);
  std::vector<float> gw_ref(tokens * k);
  combine_backward(b.plan, matrix_view<const T>(buffer.data(), rows, d), matrix_view<const float>(b.weight.data(), tokens, k),
                   matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(gb_ref.data(), rows, d),
                   matrix_view<float>(gw_ref.data(), tokens, k));
  dispatch_backward(b.plan, matrix_view<const T>(gb_ref.data(), rows, d), matrix_view<T>(gx_ref.data(), tokens, d));
  for (const std::size_t threads : {1u, 2u, 3u}) {
    for (const std::size_t grain : {1u, 64u, 1000u}) {
      CAPTURE(threads);
      CAPTURE(grain);
      thread_pool pool(threads);
      const cpu_backend cpu(pool, grain);
      pair_layout pairs = detail::layout_of(b.plan);
      pairs.kept_per_expert = b.plan.kept_per_expert.data();  // the assigner's slots are 0 .. kept - 1
      std::vector<T> gb(rows * d, T(std::numeric_limits<float>::quiet_NaN())), gx(tokens * d);
      std::vector<float> gw(tokens * k, -1.0f);
      cpu.combine_backward(pairs, matrix_view<const T>(buffer.data(), rows, d),
                           matrix_view<const float>(b.weight.data(), tokens, k), matrix_view<const T>(grad_y.data(), tokens, d),
                           matrix_view<T>(gb.data(), rows, d), matrix_view<float>(gw.data(), tokens, k));
      cpu.dispatch_backward(pairs, matrix_view<const T>(gb.data(), rows, d), matrix_view<T>(gx.data(), tokens, d));
      CHECK(std::memcmp(gb.data(), gb_ref.data(), gb.size() * sizeof(T)) == 0);
      CHECK(std::memcmp(gw.data(), gw_ref.data(), gw.size() * sizeof(float)) == 0);
      CHECK(std::memcmp(gx.data(), gx_ref.data(), gx.size() * sizeof(T)) == 0);
      // Forward dispatch on the backend writes the padding rows too.
      std::vector<T> fwd(rows * d, T(std::numeric_limits<float>::quiet_NaN())), fwd_ref(rows * d);
      dispatch(b.plan, matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(fwd_ref.data(), rows, d));
      cpu.dispatch(pairs, matrix_view<const T>(grad_y.data(), tokens, d), matrix_view<T>(fwd.data(), rows, d));
      CHECK(std::memcmp(fwd.data(), fwd_ref.data(), fwd.size() * sizeof(T)) == 0);
    }
  }
}

TEST_CASE("grouped layout: offsets from the kept counts, rows at offset + slot, padding to a multiple") {
  const std::size_t tokens = 50, n = 5, k = 2, d = 9;
  const batch b = make_batch(8, tokens, n, k, d, 1000);  // no drops: the dropless path
  for (const std::int64_t multiple : {1, 8, 16}) {
    CAPTURE(multiple);
    std::vector<std::int64_t> offsets(n + 1);
    grouped_offsets(b.plan.kept_per_expert.data(), n, multiple, offsets.data());
    CHECK(offsets[0] == 0);
    for (std::size_t e = 0; e < n; ++e) {
      const std::int64_t size = offsets[e + 1] - offsets[e];
      CHECK(size >= b.plan.kept_per_expert[e]);
      CHECK(size % multiple == 0);
      CHECK(size - b.plan.kept_per_expert[e] < multiple);
    }
    CHECK(grouped_offsets(b.plan.kept_per_expert.data(), n, multiple) == offsets);
    pair_layout pairs{b.expert.data(), b.slot.data(), tokens, k, 0, b.plan.kept_per_expert.data(), n, offsets.data()};
    const auto rows = static_cast<std::size_t>(offsets[n]);
    CHECK(pairs.rows() == rows);
    std::mt19937 rng(2);
    const std::vector<float> x = random_rows<float>(rng, tokens * d);
    std::vector<float> grouped(rows * d, std::numeric_limits<float>::quiet_NaN()), y(tokens * d), y_ref(tokens * d);
    thread_pool pool(2);
    const cpu_backend cpu(pool, 4);
    cpu.dispatch(pairs, matrix_view<const float>(x.data(), tokens, d), matrix_view<float>(grouped.data(), rows, d));
    for (std::size_t e = 0; e < n; ++e) {
      for (auto r = static_cast<std::size_t>(offsets[e] + b.plan.kept_per_expert[e]); r < static_cast<std::size_t>(offsets[e + 1]); ++r)
        CHECK(is_zero_row(grouped.data() + r * d, d));
    }
    for (std::size_t p = 0; p < tokens * k; ++p) {
      if (b.expert[p] == no_expert) continue;
      const auto r = static_cast<std::size_t>(offsets[static_cast<std::size_t>(b.expert[p])] + b.slot[p]);
      CHECK(std::memcmp(grouped.data() + r * d, x.data() + p / k * d, d * sizeof(float)) == 0);
    }
    // combine from the grouped layout equals combine from the capacity layout.
    const std::size_t cap_rows = b.plan.buffer_rows();
    std::vector<float> capacity_buffer(cap_rows * d);
    dispatch(b.plan, matrix_view<const float>(x.data(), tokens, d), matrix_view<float>(capacity_buffer.data(), cap_rows, d));
    combine(b.plan, matrix_view<const float>(capacity_buffer.data(), cap_rows, d), matrix_view<const float>(b.weight.data(), tokens, k),
            matrix_view<float>(y_ref.data(), tokens, d));
    cpu.combine(pairs, matrix_view<const float>(grouped.data(), rows, d), matrix_view<const float>(b.weight.data(), tokens, k),
                matrix_view<float>(y.data(), tokens, d));
    CHECK(y == y_ref);
  }
  std::vector<std::int64_t> offsets(n + 1);
  const std::vector<std::int64_t> negative = {1, -1, 0, 0, 0};
  CHECK_THROWS_WITH_AS(grouped_offsets(b.plan.kept_per_expert.data(), n, 0, offsets.data()),
                       doctest::Contains("multiple"), error);
  CHECK_THROWS_WITH_AS(grouped_offsets(negative.data(), n, 1, offsets.data()), doctest::Contains("kept_per_expert"), error);
}

TEST_CASE("dispatch plan: a row between kept slots is padding too") {
  const std::vector<expert_index> expert = {0, 0};
  const std::vector<slot_index> slot = {0, 2};
  const dispatch_plan plan = build_dispatch_plan(matrix_view<const expert_index>(expert.data(), 2, 1),
                                                 matrix_view<const slot_index>(slot.data(), 2, 1), 3, topology::uniform(1, 1, 1));
  CHECK(plan.pair_of_row == std::vector<std::int32_t>{0, -1, 1});
  CHECK(plan.kept_per_expert == std::vector<std::int64_t>{2});
  const std::vector<float> x = {1, 2};
  std::vector<float> buffer(3, std::numeric_limits<float>::quiet_NaN());
  dispatch(plan, matrix_view<const float>(x.data(), 2, 1), matrix_view<float>(buffer.data(), 3, 1));
  CHECK(buffer == std::vector<float>{1, 0, 2});
}

TEST_CASE_TEMPLATE("16-bit row codec: decode and round-to-nearest-even encode equal Eigen's conversions bit for bit, "
                   "on every instruction set", T, bf16, fp16) {
  // Every pattern decodes as Eigen decodes it; floats (NaNs with payloads and signs, infinities, subnormals, ties,
  // values around T's overflow and subnormal thresholds) encode as Eigen's portable conversion does.
  std::vector<T> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) {
    const auto bits = static_cast<std::uint16_t>(i);
    std::memcpy(static_cast<void*>(&all[i]), &bits, 2);
  }
  std::mt19937 rng(17);
  std::vector<float> values(1 << 16);
  for (std::size_t i = 0; i < values.size(); ++i) {
    std::uint32_t bits = static_cast<std::uint32_t>(rng());
    if (i % 3 == 0) bits = (bits & 0x807fffffu) | ((100u + (bits >> 8) % 50u) << 23);  // exponents 2^-27 .. 2^22
    if (i % 7 == 0) bits = (bits & 0xffff0000u) | 0x8000u;                             // bf16 ties
    if (i % 5 == 0) bits = (bits & 0xffffe000u) | 0x1000u;                             // fp16 ties
    if (i % 11 == 0) bits |= 0x7f800000u;                                              // Inf and NaN
    if (i % 13 == 0) bits &= 0x807fffffu;                                              // zero and subnormals
    std::memcpy(&values[i], &bits, 4);
  }
  std::size_t at = 0;
  for (const float edge : {65504.0f, 65519.99f, 65520.0f, 0x1p-14f, 0x1p-15f, 0x1p-24f, 0x1p-25f, 0x1.8p-25f, 3.0e38f}) {
    values[at++] = edge;
    values[at++] = -edge;
  }
  locmoe_test::for_each_arch([&](auto arch) {
    const std::string arch_name = decltype(arch)::name();
    CAPTURE(arch_name);
    std::vector<float> decoded(all.size());
    std::vector<T> encoded(values.size());
    // Counts that end in a partial step of every width, then the whole arrays.
    for (const std::size_t count : {std::size_t{37}, all.size()}) {
      detail::convert_kernel<T>{}(arch, {all.data(), decoded.data(), values.data(), encoded.data(), count});
      std::size_t wrong = 0;
      for (std::size_t i = 0; i < count; ++i) wrong += !same_bits(decoded[i], static_cast<float>(all[i]));
      CHECK(wrong == 0);
      for (std::size_t i = 0; i < count; ++i) {
        if (!same_bits(encoded[i], T(values[i])) && wrong < 3) {
          std::uint32_t v;
          std::memcpy(&v, &values[i], 4);
          MESSAGE(arch_name << " " << std::hex << v << " -> " << detail::simd::bits16(encoded[i]) << " want " << detail::simd::bits16(T(values[i])));
        }
        wrong += !same_bits(encoded[i], T(values[i]));
      }
      CHECK(wrong == 0);
    }
  });
}
