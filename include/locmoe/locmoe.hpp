// locmoe/locmoe.hpp - the umbrella header: everything public in one include.
// (Not locmoe/simd_instantiate.hpp, which belongs alone in a per-instruction-set translation unit.)
#pragma once

#include <locmoe/assign.hpp>
#include <locmoe/backend/backend.hpp>
#include <locmoe/backend/cpu.hpp>
#include <locmoe/backend/thread_pool.hpp>
#include <locmoe/capacity.hpp>
#include <locmoe/config.hpp>
#include <locmoe/dispatch.hpp>
#include <locmoe/error.hpp>
#include <locmoe/exchange.hpp>
#include <locmoe/gating.hpp>
#include <locmoe/losses.hpp>
#include <locmoe/reference.hpp>
#include <locmoe/routers.hpp>
#include <locmoe/select.hpp>
#include <locmoe/topology.hpp>
#include <locmoe/views.hpp>
