// The second translation unit of tests/gpu/two_units (see unit_a.cu).
#include "every_step.cuh"

int unit_b(bool run) { return two_units::every_step<float>(run) + two_units::every_step<locmoe::bf16>(run); }
