// Must not compile: grap_pipeline's static_assert names the backend concept (ctest "backend: the concept is
// checked at compile time" expects the message).
#include <locmoe/backend/backend.hpp>

struct not_a_backend {
  using stream_type = int;
};

int main() {
  const not_a_backend b;
  const locmoe::grap_pipeline<not_a_backend> pipeline(b, locmoe::router_shape{});
  return static_cast<int>(pipeline.workspace_size());
}
