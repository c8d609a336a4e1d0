// locmoe/locmoe.hpp - the umbrella header: everything public in one include.
#pragma once

#include <locmoe/capacity.hpp>
#include <locmoe/config.hpp>
#include <locmoe/error.hpp>
