// locmoe - planning and analysis for LocMoE routing. See docs/cli.md.
//
// Exit status: 0 on success, 2 on a usage error (one line on stderr, nothing on stdout), 1 on an internal error.
#include "cli.hpp"

#include <locmoe/config.hpp>

#include <iostream>
#include <string>

namespace {

std::string one_line(std::string text) {
  for (char& c : text) {
    if (c == '\n' || c == '\r') c = ' ';
  }
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"locmoe: expert-capacity planning and routing analysis for LocMoE (arXiv 2401.13920)", "locmoe"};
  app.set_version_flag("--version", std::to_string(LOCMOE_VERSION_MAJOR) + "." +
                                        std::to_string(LOCMOE_VERSION_MINOR) + "." +
                                        std::to_string(LOCMOE_VERSION_PATCH));
  app.require_subcommand(1);
  locmoe::cli::add_capacity_commands(app);
  locmoe::cli::add_route_command(app);
  locmoe::cli::add_simulate_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);  // --help, --version: printed on stdout, exit 0
  } catch (const CLI::ParseError& e) {
    std::cerr << "locmoe: " << one_line(e.what()) << '\n';
    return 2;
  } catch (const locmoe::cli::usage_error& e) {
    std::cerr << "locmoe: " << one_line(e.what()) << '\n';
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "locmoe: internal error: " << one_line(e.what()) << '\n';
    return 1;
  }
  return 0;
}
