// locmoe/config.hpp - version and configuration macros.
//
// Every macro here may be defined by the user before the first locmoe include.
#pragma once

// The one source of the version: CMakeLists.txt reads these three lines.
#define LOCMOE_VERSION_MAJOR 0
#define LOCMOE_VERSION_MINOR 1
#define LOCMOE_VERSION_PATCH 0

#define LOCMOE_VERSION \
  (LOCMOE_VERSION_MAJOR * 10000 + LOCMOE_VERSION_MINOR * 100 + LOCMOE_VERSION_PATCH)

// Exceptions are on unless the compiler says they are off (-fno-exceptions).
#ifndef LOCMOE_HAS_EXCEPTIONS
#  if defined(__cpp_exceptions) || defined(__EXCEPTIONS) || defined(_CPPUNWIND)
#    define LOCMOE_HAS_EXCEPTIONS 1
#  else
#    define LOCMOE_HAS_EXCEPTIONS 0
#  endif
#endif

// Functions that CUDA device code may call too.
#ifndef LOCMOE_HOST_DEVICE
#  if defined(__CUDACC__)
#    define LOCMOE_HOST_DEVICE __host__ __device__
#  else
#    define LOCMOE_HOST_DEVICE
#  endif
#endif

// Internal invariants (not argument checks: those go through the error policy).
#ifndef LOCMOE_ASSERT
#  include <cassert>
#  define LOCMOE_ASSERT(condition) assert(condition)
#endif
