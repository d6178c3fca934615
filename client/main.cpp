// cbd-proxy: the compute node's side of cbd.  Subcommands: format, list, gc,
// connect, disconnect.  Parameters are nbdkit-style key=value words.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>

#include "client/commands.hpp"
#include "common/error.hpp"

namespace {

constexpr const char* kVersion = "0.1.0";

CLI::App* add_subcommand(CLI::App& app, const char* name, const char* summary,
                         const std::vector<cbd::proxy::ParameterSpec>& specs, std::vector<std::string>& items) {
  CLI::App* sub = app.add_subcommand(name, summary);
  sub->add_option("parameters", items, "key=value parameters")->type_name("");
  sub->footer("Parameters (defaults shown):\n" + cbd::proxy::describe(specs));
  return sub;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"cbd-proxy: serve a cbd backend's disk as a local NBD export, and manage cbd transports"};
  app.set_version_flag("--version", std::string("cbd-proxy ") + kVersion);
  app.require_subcommand(1);
  app.footer(
      "Examples:\n"
      "  cbd-proxy format transport=/dev/shm/cbd size=256M\n"
      "  nbdkit -p 10810 cbd transport=/dev/shm/cbd file=disk.img  (storage node; on one host keep\n"
      "                                                  nbdkit's own NBD port off 10809)\n"
      "  cbd-proxy connect backend=0 transport=/dev/shm/cbd   (compute node)\n"
      "  nbd-client localhost /dev/nbd0\n"
      "  cbd-proxy connect backend=0 device=/dev/nbd0 daemon  (or let the proxy attach the kernel device)\n"
      "  cbd-proxy disconnect device=/dev/nbd0\n"
      "  qemu-img info nbd://localhost\n"
      "See cbd-proxy(1).");

  std::vector<std::string> format_items, list_items, gc_items, connect_items, disconnect_items;
  bool json = false;
  auto* format = add_subcommand(app, "format", "write a fresh transport layout", cbd::proxy::kFormatParameters, format_items);
  auto* list = add_subcommand(app, "list", "show the geometry and every slot in use", cbd::proxy::kListParameters, list_items);
  list->add_flag("--json", json, "print JSON");
  auto* gc = add_subcommand(app, "gc", "reclaim slots whose owner is dead", cbd::proxy::kGcParameters, gc_items);
  auto* connect = add_subcommand(app, "connect", "serve a backend over NBD", cbd::proxy::kConnectParameters, connect_items);
  auto* disconnect = add_subcommand(app, "disconnect", "detach a kernel nbd device attached with device=",
                                    cbd::proxy::kDisconnectParameters, disconnect_items);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    using namespace cbd::proxy;
    if (format->parsed()) return run_format(Parameters(format_items, kFormatParameters));
    if (list->parsed()) return run_list(Parameters(list_items, kListParameters), json);
    if (gc->parsed()) return run_gc(Parameters(gc_items, kGcParameters));
    if (connect->parsed()) return run_connect(Parameters(connect_items, kConnectParameters));
    if (disconnect->parsed()) return run_disconnect(Parameters(disconnect_items, kDisconnectParameters));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cbd-proxy: %s\n", e.what());
    return 1;
  }
  return 2;
}
