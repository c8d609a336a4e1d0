// The CUDA backend against the CPU backend (ctest label gpu): one program of several translation units, each of
// which includes locmoe/backend/cuda.cuh (so the header is also checked to link twice). Every GPU step runs on a
// non-blocking stream; every GPU output starts filled (NaN bytes) and is compared with the CPU backend's output
// computed into the same fill and layout. Each section prints one line per case: what was compared, the worst
// difference and its tolerance; a failed expectation prints "FAILED: ...". Exit 0: every check passed; 1: some
// failed; 77 (skipped): no CUDA device.
//
// Tolerances (never loosened to make something pass):
//   bit for bit   slots and counts, dispatch, combine (float, bf16, fp16, infinities included; a NaN result
//                 must be NaN, its bits may differ: cuda.cuh), combine_backward's grad_buffer, dispatch_backward, and
//                 the routes' choices and logits where the data make every sum exact (the pipeline, the stream
//                 capture)
//   route choices equal, except at a near tie: a token whose top k+1 logits on the CPU include two within 1e-5
//                 of each other (relative) may differ; invalid tokens (NaN, +inf, all -inf) exactly as the CPU's
//   route weights and probabilities: 1e-6 absolute (weights on tokens whose choices are equal)
//   route logits: 1e-5 of the row's largest |logit| on the CPU (the GPU sums in another order); non-finite
//                 logits exactly (NaN where the CPU has NaN, +-inf where it has +-inf)
//   grad_weight:  1e-5 of sum_c |grad_y[t][c] row[c]| (a dot product in another order); 0 exactly when dropped
#include "gpu_test.hpp"

#include <exception>
#include <stdexcept>

static_assert(locmoe::is_backend_v<locmoe::cuda_backend>, "the CUDA backend models the concept");
static_assert(!locmoe::uses_host_memory_v<locmoe::cuda_backend>,
              "device memory: moe_router refuses it at compile time");

namespace gpu_test {

int failures = 0;
cudaStream_t stream = nullptr;

const locmoe::cpu_backend& cpu() {
  static locmoe::thread_pool pool(2);
  static const locmoe::cpu_backend backend(pool);
  return backend;
}

void expect(bool ok, const std::string& what) {
  if (ok) return;
  std::printf("FAILED: %s\n", what.c_str());
  std::fflush(stdout);
  ++failures;
}

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

void sync(const char* what) {
  check(cudaStreamSynchronize(stream), what);
  check(cudaGetLastError(), what);
}

}  // namespace gpu_test

int main() {
  using namespace gpu_test;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp properties{};
  if (cudaGetDeviceProperties(&properties, 0) == cudaSuccess) std::printf("device 0: %s\n", properties.name);
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  const struct {
    const char* name;
    void (*run)();
  } sections[] = {
      {"routes", test_routes},
      {"slots", test_slots},
      {"device checks", test_device_checks},
      {"rows", test_rows},
      {"backward", test_backward},
      {"pipeline", test_pipeline},
      {"empty batch", test_empty_batch},
      {"stream capture", test_stream_capture},
      {"arguments", test_arguments},  // last: a call that does not check a null pointer may fault the context
  };
  for (const auto& section : sections) {
    std::printf("== %s\n", section.name);
    std::fflush(stdout);
    try {
      section.run();
    } catch (const std::exception& e) {
      expect(false, std::string(section.name) + ": threw: " + e.what());
    }
    // A fault (an illegal address) leaves the context unusable: the later sections would only repeat it.
    const cudaError_t status = cudaDeviceSynchronize();
    if (status != cudaSuccess) {
      expect(false, std::string(section.name) + ": the device is in error: " + cudaGetErrorString(status) +
                        "; the remaining sections are not run");
      break;
    }
    cudaGetLastError();
  }
  cudaStreamDestroy(stream);
  if (failures > 0) {
    std::printf("cuda backend: %d check(s) FAILED\n", failures);
    return 1;
  }
  std::printf("cuda backend: every check passed\n");
  return 0;
}
