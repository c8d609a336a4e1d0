// Shared by the GPU tests (tests/gpu/*.cu, one program: locmoe_cuda_tests, label gpu): device arrays that start
// filled with a pattern no step writes, failure counting, bit comparisons, the CPU reference backend and the stream
// every step runs on. Every GPU output starts filled (NaN bytes for floating types) and is compared with the CPU
// backend's output computed into a buffer with the same fill and layout, so an element the GPU skips, or one it
// writes outside a view, shows as a difference.
#pragma once

#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/cuda.cuh>

#if !defined(LOCMOE_CUDA_EMULATION)  // (tests/cuda_emulation runs these tests on the host: it brings its own runtime)
#  include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace gpu_test {

extern int failures;               ///< failed expectations so far (main.cu)
extern cudaStream_t stream;        ///< the non-blocking stream every GPU step runs on (main.cu)
const locmoe::cpu_backend& cpu();  ///< the reference: the CPU backend on 2 threads (main.cu)

/// Counts and prints a failed expectation.
void expect(bool ok, const std::string& what);
/// Throws std::runtime_error when a CUDA runtime call fails.
void check(cudaError_t status, const char* what);
/// Waits for the test stream, then reports an asynchronous error of the work queued so far.
void sync(const char* what);

/// The sections (one file each); each prints one line per case.
void test_routes();
void test_slots();
void test_device_checks();
void test_rows();
void test_backward();
void test_pipeline();
void test_empty_batch();
void test_stream_capture();
void test_arguments();

/// The byte every output starts filled with: 0xff for floating types (NaN in float, bf16 and fp16), 0x5a for
/// integers (0xff would be -1, a valid "no expert" / "dropped" value, so a skipped write of a dropped choice would
/// not show; 0x5a5a5a5a is no expert, slot or count any step writes here).
template <class T>
constexpr unsigned char fill_byte = std::is_integral_v<T> ? 0x5a : 0xff;

/// A host vector of n elements holding the fill.
template <class T>
std::vector<T> filled(std::size_t n) {
  std::vector<T> v(n);
  if (n > 0) std::memset(static_cast<void*>(v.data()), fill_byte<T>, n * sizeof(T));
  return v;
}

template <class T>
bool is_fill(const T& v) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &v, sizeof(T));
  return std::all_of(bytes, bytes + sizeof(T), [](unsigned char b) { return b == fill_byte<T>; });
}

template <class T>
bool same_bits(const T& a, const T& b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// A value of T (float, bf16, fp16) from its bit pattern.
template <class T>
T from_bits(std::uint32_t bits) {
  T v;
  if constexpr (sizeof(T) == 4) {
    std::memcpy(static_cast<void*>(&v), &bits, 4);
  } else {
    const auto half = static_cast<std::uint16_t>(bits);
    std::memcpy(static_cast<void*>(&v), &half, 2);
  }
  return v;
}

/// The special values of T: quiet NaN of either sign (the canonical patterns), a signalling NaN, infinities.
enum class special { quiet_nan, negative_quiet_nan, signalling_nan, infinity, negative_infinity, negative_zero };
template <class T>
T special_value(special s) {
  static constexpr std::uint32_t f32[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7f800000u, 0xff800000u, 0x80000000u};
  static constexpr std::uint32_t b16[] = {0x7fc0u, 0xffc0u, 0x7f81u, 0x7f80u, 0xff80u, 0x8000u};
  static constexpr std::uint32_t f16[] = {0x7e00u, 0xfe00u, 0x7c01u, 0x7c00u, 0xfc00u, 0x8000u};
  const auto i = static_cast<std::size_t>(s);
  if constexpr (std::is_same_v<T, float>) return from_bits<T>(f32[i]);
  if constexpr (std::is_same_v<T, locmoe::bf16>) return from_bits<T>(b16[i]);
  if constexpr (std::is_same_v<T, locmoe::fp16>) return from_bits<T>(f16[i]);
}

template <class T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, locmoe::bf16>) return "bf16";
  if constexpr (std::is_same_v<T, locmoe::fp16>) return "fp16";
  return "?";
}

/// Where a [rows x cols] matrix sits in its allocation: `offset` elements in, rows `stride` apart, one element
/// after the last row's stride. The host and the device use the same layout, so allocations compare whole (the
/// gaps must keep their fill).
struct layout {
  std::size_t rows = 0, cols = 0, stride = 0, offset = 0;
  std::size_t size() const { return offset + rows * stride + 1; }
  bool inside(std::size_t i) const {  // element i of the allocation belongs to the matrix
    return i >= offset && i < offset + rows * stride && (i - offset) % stride < cols;
  }
  std::size_t row_of(std::size_t i) const { return (i - offset) / stride; }
};

/// Dense rows, or (unaligned) a data pointer one element into the allocation and an odd row stride: rows that are
/// not 16-byte aligned.
inline layout shaped(std::size_t rows, std::size_t cols, bool unaligned) {
  if (!unaligned) return {rows, cols, cols, 0};
  return {rows, cols, cols + (cols % 2 == 0 ? 1 : 2), 1};
}

template <class T>
locmoe::matrix_view<T> view(T* base, const layout& l) {
  return locmoe::matrix_view<T>(base + l.offset, l.rows, l.cols, l.stride);
}
template <class T>
locmoe::matrix_view<const T> const_view(const T* base, const layout& l) {
  return locmoe::matrix_view<const T>(base + l.offset, l.rows, l.cols, l.stride);
}
/// Element (r, c) of a host allocation with layout l.
template <class T>
T& at(std::vector<T>& v, const layout& l, std::size_t r, std::size_t c) {
  return v[l.offset + r * l.stride + c];
}
template <class T>
const T& at(const std::vector<T>& v, const layout& l, std::size_t r, std::size_t c) {
  return v[l.offset + r * l.stride + c];
}

/// Bit-for-bit comparison of two allocations: the elements that differ, and the first of them.
struct bit_diff {
  std::size_t count = 0, first = 0, inside = 0;  ///< inside: of count, those in the matrix (the rest: its gaps)
  bool same() const { return count == 0; }
};
template <class T>
bit_diff compare_bits(const std::vector<T>& want, const std::vector<T>& got, const layout* l = nullptr) {
  bit_diff d;
  if (want.size() != got.size()) return {want.size() + got.size(), 0, 0};
  for (std::size_t i = 0; i < want.size(); ++i) {
    if (same_bits(want[i], got[i])) continue;
    if (d.count++ == 0) d.first = i;
    d.inside += l == nullptr || l->inside(i);
  }
  return d;
}
/// "0 differ" or "12 differ (first at row 3, column 7; 2 in the gaps)".
template <class T>
std::string describe(const bit_diff& d, const std::vector<T>& want, const std::vector<T>& got,
                     const layout* l = nullptr) {
  if (d.same()) return "0 differ";
  std::string s = std::to_string(d.count) + " differ (first ";
  if (l != nullptr && l->inside(d.first)) {
    s += "at row " + std::to_string(l->row_of(d.first)) + ", column " +
         std::to_string((d.first - l->offset) % l->stride);
  } else {
    s += "in a gap, element " + std::to_string(d.first);
  }
  if (d.first < want.size() && d.first < got.size()) {
    std::uint32_t w = 0, g = 0;
    std::memcpy(&w, &want[d.first], std::min(sizeof(T), sizeof w));
    std::memcpy(&g, &got[d.first], std::min(sizeof(T), sizeof g));
    char bits[64];
    std::snprintf(bits, sizeof bits, ": bits %#x, want %#x", static_cast<unsigned>(g), static_cast<unsigned>(w));
    s += bits;
  }
  if (l != nullptr) s += "; " + std::to_string(d.count - d.inside) + " in the gaps";
  return s + ")";
}

/// A device allocation of n elements (at least one), filled on creation; uploads and fills finish before they
/// return (the test stream does not wait for the legacy stream), and host() waits for the test stream.
template <class T>
class device_array {
 public:
  explicit device_array(std::size_t n) : size_(n) {
    check(cudaMalloc(reinterpret_cast<void**>(&data_), bytes()), "cudaMalloc");
    fill();
  }
  explicit device_array(const std::vector<T>& host) : size_(host.size()) {
    check(cudaMalloc(reinterpret_cast<void**>(&data_), bytes()), "cudaMalloc");
    upload(host);
  }
  ~device_array() { cudaFree(data_); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;

  T* data() const { return data_; }
  std::size_t size() const { return size_; }
  void fill() {
    check(cudaMemset(data_, fill_byte<T>, bytes()), "cudaMemset");
    check(cudaDeviceSynchronize(), "fill");
  }
  void upload(const std::vector<T>& host) {
    if (host.size() != size_) throw std::runtime_error("device_array::upload: size mismatch");
    if (size_ > 0) check(cudaMemcpy(data_, host.data(), size_ * sizeof(T), cudaMemcpyHostToDevice), "upload");
    check(cudaDeviceSynchronize(), "upload");
  }
  std::vector<T> host() const {
    sync("before a download");
    std::vector<T> h = filled<T>(size_);
    if (size_ > 0) check(cudaMemcpy(h.data(), data_, size_ * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }

 private:
  std::size_t bytes() const { return std::max<std::size_t>(size_, 1) * sizeof(T); }
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

/// Whether every element of a device array still holds the fill (nothing was written).
template <class T>
bool holds_fill(const device_array<T>& a) {
  const std::vector<T> h = a.host();
  return std::all_of(h.begin(), h.end(), [](const T& v) { return is_fill(v); });
}

/// An assignment of T tokens' k choices to n experts with capacity C (random distinct choices, every 13th token's
/// last choice masked, the CPU backend's slots), and a grouped layout of the same kept rows with 0-2 spare rows per
/// expert. Host arrays; device_assignment copies them.
struct assignment {
  std::size_t tokens = 0, top_k = 1, experts = 0, capacity = 0;
  std::vector<locmoe::expert_index> expert;
  std::vector<locmoe::slot_index> slot;
  std::vector<std::int64_t> kept, offsets;  ///< offsets: [n + 1], the grouped layout
  std::size_t rows(bool grouped) const {
    return grouped ? static_cast<std::size_t>(offsets[experts]) : experts * capacity;
  }
};
assignment make_assignment(std::size_t tokens, std::size_t k, std::size_t n, std::size_t capacity, unsigned seed);

/// The assignment's arrays on the device.
struct device_assignment {
  device_array<locmoe::expert_index> expert;
  device_array<locmoe::slot_index> slot;
  device_array<std::int64_t> kept, offsets;
  explicit device_assignment(const assignment& a) : expert(a.expert), slot(a.slot), kept(a.kept), offsets(a.offsets) {}
};

/// The pair layout of an assignment over its host or device arrays (kept counts and offsets optional).
inline locmoe::pair_layout pairs_of(const assignment& a, const locmoe::expert_index* expert,
                                    const locmoe::slot_index* slot, const std::int64_t* kept,
                                    const std::int64_t* offsets) {
  locmoe::pair_layout p{expert, slot, a.tokens, a.top_k, a.capacity};
  p.kept_per_expert = kept;
  p.experts = a.experts;
  p.expert_offset = offsets;
  return p;
}

/// A case of the row steps (test_rows.cu, test_backward.cu): sizes, and the layout of the rows and pairs.
struct row_case {
  const char* name;
  std::size_t tokens, d, n, k, capacity;
  bool unaligned, kept, grouped;  ///< unaligned rows; kept counts passed (padding rows zero); grouped layout
};
inline std::string row_label(const char* step, const char* type, const row_case& c) {
  return std::string(step) + " " + type + " [" + c.name + "] T=" + std::to_string(c.tokens) +
         " d=" + std::to_string(c.d) + " n=" + std::to_string(c.n) + " k=" + std::to_string(c.k) +
         " C=" + std::to_string(c.capacity);
}

/// A buffer of layout bl whose rows named by a kept pair hold random values, the others the fill (NaN): a read of
/// a row no pair names shows.
template <class A>
std::vector<A> random_rows(const locmoe::pair_layout& host_pairs, const layout& bl, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<A> b = filled<A>(bl.size());
  for (std::size_t p = 0; p < host_pairs.tokens * host_pairs.top_k; ++p) {
    if (!host_pairs.kept(p)) continue;
    for (std::size_t c = 0; c < bl.cols; ++c) at(b, bl, host_pairs.row(p), c) = A(normal(rng));
  }
  return b;
}

/// What `queue` puts on the test stream, recorded into a graph (global capture mode: a call that synchronizes, or
/// allocates, fails the capture). Nothing runs until launch().
class captured_graph {
 public:
  template <class F>
  explicit captured_graph(F&& queue) {
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    try {
      queue();
    } catch (const std::exception& e) {
      error_ = e.what();
    }
    const cudaError_t end = cudaStreamEndCapture(stream, &graph_);
    if (error_.empty() && end != cudaSuccess) error_ = std::string("cudaStreamEndCapture: ") + cudaGetErrorString(end);
    cudaGetLastError();  // a failed capture leaves its error behind
    if (error_.empty() && graph_ != nullptr) check(cudaGraphGetNodes(graph_, nullptr, &nodes_), "cudaGraphGetNodes");
  }
  ~captured_graph() {
    if (exec_ != nullptr) cudaGraphExecDestroy(exec_);
    if (graph_ != nullptr) cudaGraphDestroy(graph_);
  }
  captured_graph(const captured_graph&) = delete;
  captured_graph& operator=(const captured_graph&) = delete;

  bool ok() const { return error_.empty() && graph_ != nullptr; }
  const std::string& error() const { return error_; }
  std::size_t nodes() const { return nodes_; }
  void launch() {
    check(cudaGraphInstantiate(&exec_, graph_, 0), "cudaGraphInstantiate");
    check(cudaGraphLaunch(exec_, stream), "cudaGraphLaunch");
    sync("graph launch");
  }

 private:
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
  std::size_t nodes_ = 0;
  std::string error_;
};

/// What a call threw: the argument a locmoe::error names and its message, or "<no error>" / "<other exception>".
struct thrown {
  std::string argument, message;
  /// The message after the function's name ("x = 8x31: must have ..."): the part both backends share.
  std::string tail() const {
    const std::size_t colon = message.find(": ");
    return colon == std::string::npos ? message : message.substr(colon + 2);
  }
  /// The rule alone (after the value): "must have ...".
  std::string rule() const {
    const std::size_t colon = message.rfind(": ");
    return colon == std::string::npos ? message : message.substr(colon + 2);
  }
};
template <class F>
thrown what_throws(F&& f) {
  try {
    f();
  } catch (const locmoe::error& e) {
    return {e.argument(), e.what()};
  } catch (const std::exception& e) {
    return {"<other exception>", e.what()};
  }
  return {"<no error>", ""};
}

}  // namespace gpu_test
