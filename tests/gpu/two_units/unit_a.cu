// Two translation units that include locmoe/backend/cuda.cuh, linked into one program: every kernel and helper of
// the header must be a template or inline (a plain __global__ function defined in a header is a multiple
// definition at link time). Building this program is the test; running it (with a device) also calls each step on
// empty inputs, and without one says so and passes.
#include "every_step.cuh"

#include <cstdio>

int unit_b(bool run);

int main() {
  int devices = 0;
  const bool run = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  const int steps = two_units::every_step<float>(run) + two_units::every_step<locmoe::bf16>(run) + unit_b(run);
  std::printf("two translation units linked%s\n", run ? (steps == 4 ? ", every step ran on empty inputs" : ", FAILED") : " (no device: not run)");
  return run && steps != 4 ? 1 : 0;
}
