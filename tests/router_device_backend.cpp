// Must not compile: moe_router runs host steps on its backend's buffers, so a backend whose memory is not the
// host's is refused by a static_assert (ctest "router: a device backend is refused at compile time" expects the
// message). device_backend models the concept (cpu_backend's members) but says its memory is a device's.
#include <locmoe/router.hpp>

struct device_backend : locmoe::cpu_backend {
  using locmoe::cpu_backend::cpu_backend;
  static constexpr bool host_memory = false;
};

int main() {
  locmoe::thread_pool pool(1);
  const device_backend backend(pool);
  locmoe::moe_router_options options;
  options.hidden = 8;
  options.experts = 2;
  const locmoe::moe_router<device_backend> router(backend, options);
  return static_cast<int>(router.options().experts);
}
