// nbdkit-cbd-filter: `nbdkit --filter=cbd PLUGIN ... transport=/dev/dax0.0`.
//
// Exports whatever nbdkit serves below the filter (a plugin, possibly with
// more filters in between) to compute nodes through a cbd transport.  In
// .after_fork the filter opens one shared context into the layers below and
// starts a backend whose handlers serve every channel through that context;
// nbdkit's own NBD clients pass through the filter unchanged.
//
// Callbacks are small static functions named cbd_<method>, wired in one
// table at the bottom; no exception escapes them.
#define NBDKIT_API_VERSION 2
#include <nbdkit-filter.h>

#include <cerrno>
#include <exception>
#include <memory>
#include <string>
#include <string_view>

#include "common/log.hpp"
#include "common/parse.hpp"
#include "common/transport_fault_monitor.hpp"
#include "plugin/backend_parameters.hpp"
#include "plugin/nbdkit_cbd_next_store.hpp"
#include "plugin/nbdkit_log.hpp"

namespace {

using namespace cbd;
using namespace cbd::backend;

// Backend keys that common plugins use for their own meaning (the nbd
// plugin's hostname= and export=): the filter takes them only with the
// cbd- prefix and passes the bare ones down.
constexpr std::string_view kPassedDown[] = {"hostname", "export"};
constexpr std::string_view kPrefix = "cbd-";

struct FilterConfig {
  BackendParameters backend;
  bool readonly = false;  // cbd-readonly=: compute nodes may not write even if the plugin can
};

FilterConfig config;
std::unique_ptr<NextStore> store;
BackendRuntime runtime;
// Stops the backend service when the transport is truncated or removed
// under us (docs/design.md, "Truncated or vanished transport"); nbdkit's own
// clients pass through the filter without the transport and keep being served.
std::unique_ptr<TransportFaultMonitor> fault_monitor;

void watch_transport() {
  fault_monitor = std::make_unique<TransportFaultMonitor>(runtime.transport()->region(), [](const std::string& message) {
    log(LogLevel::Error, "%s; stopped serving it (nbdkit's own NBD export keeps serving; restart nbdkit once the "
        "transport is back)", message.c_str());
    runtime.stop();
  });
}

int fail(const std::exception& e) {
  nbdkit_error("%s", e.what());
  return -1;
}

void cbd_load() { route_log_to_nbdkit(); }

void cbd_unload() {
  // .cleanup closed the context; if it never ran, the layers below may be
  // gone already and the context is left to the process exit.
  try {
    fault_monitor.reset();
    runtime.stop();
    store.reset();
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
  }
}

int cbd_config(nbdkit_next_config* next, nbdkit_backend* nxdata, const char* key, const char* value) {
  try {
    std::string_view k = key;
    if (k.starts_with(kPrefix)) {
      const std::string name(k.substr(kPrefix.size()));
      if (name == "readonly") {
        config.readonly = parse_bool(value, key);
        return 0;
      }
      if (apply_backend_parameter(config.backend, name, value)) return 0;
      nbdkit_error("unknown parameter '%s' (see nbdkit --filter=cbd null --help)", key);
      return -1;
    }
    bool passed_down = false;
    for (std::string_view p : kPassedDown) passed_down |= k == p;
    if (!passed_down && apply_backend_parameter(config.backend, std::string(k), value)) return 0;
    return next(nxdata, key, value);
  } catch (const std::exception& e) {
    return fail(e);
  }
}

// Calls into the layers below from the handler threads bypass nbdkit's
// request locks, so the filter itself can run PARALLEL: NextStore and the
// pass-through callbacks below serialise when the final model is stricter.
int cbd_thread_model() { return NBDKIT_THREAD_MODEL_PARALLEL; }

int cbd_get_ready(int thread_model) {
  try {
    store = std::make_unique<NextStore>(thread_model != NBDKIT_THREAD_MODEL_PARALLEL);
    if (thread_model == NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS)
      nbdkit_debug("cbd filter: the plugin below serialises connections; the filter's shared context "
                   "takes turns with client connections request by request");
    // Map (and format, when asked) the transport now, while errors still
    // reach the terminal: after the fork only the log sees them.  The real
    // backend needs the plugin's size and capabilities, known only once the
    // context is open in .after_fork.
    BackendRuntime check;
    check.prepare(config.backend, *store);
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

int cbd_after_fork(nbdkit_backend* backend) {
  try {
    store->open(backend, config.readonly);
    runtime.prepare(config.backend, *store);
    runtime.start();
    watch_transport();
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void cbd_cleanup(nbdkit_backend*) {
  try {
    fault_monitor.reset();  // first: it may be stopping the runtime right now
    runtime.stop();
    if (store) store->close();
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
  }
}

// nbdkit's own NBD clients reach the layers below through these; with a
// serialising thread model they take the store's lock so they never run at
// the same time as a handler's call.
template <typename Call>
int pass_down(int* err, Call&& call) {
  try {
    auto lock = store->lock_if_serialized();
    return call();
  } catch (const std::exception& e) {
    nbdkit_error("%s", e.what());
    *err = EIO;
    return -1;
  }
}

int cbd_pread(nbdkit_next* next, void*, void* buffer, uint32_t count, uint64_t offset, uint32_t flags, int* err) {
  return pass_down(err, [&] { return next->pread(next, buffer, count, offset, flags, err); });
}

int cbd_pwrite(nbdkit_next* next, void*, const void* buffer, uint32_t count, uint64_t offset, uint32_t flags,
               int* err) {
  return pass_down(err, [&] { return next->pwrite(next, buffer, count, offset, flags, err); });
}

int cbd_flush(nbdkit_next* next, void*, uint32_t flags, int* err) {
  return pass_down(err, [&] { return next->flush(next, flags, err); });
}

int cbd_trim(nbdkit_next* next, void*, uint32_t count, uint64_t offset, uint32_t flags, int* err) {
  return pass_down(err, [&] { return next->trim(next, count, offset, flags, err); });
}

int cbd_zero(nbdkit_next* next, void*, uint32_t count, uint64_t offset, uint32_t flags, int* err) {
  return pass_down(err, [&] { return next->zero(next, count, offset, flags, err); });
}

int cbd_extents(nbdkit_next* next, void*, uint32_t count, uint64_t offset, uint32_t flags,
                struct nbdkit_extents* extents, int* err) {
  return pass_down(err, [&] { return next->extents(next, count, offset, flags, extents, err); });
}

int cbd_cache(nbdkit_next* next, void*, uint32_t count, uint64_t offset, uint32_t flags, int* err) {
  return pass_down(err, [&] { return next->cache(next, count, offset, flags, err); });
}

struct nbdkit_filter make_filter() {
  struct nbdkit_filter filter {};
  filter.name = "cbd";
  filter.longname = "cbd: export the plugin below through a CXL shared-memory transport";
  filter.description =
      "Serves whatever nbdkit plugin sits below the filter to compute nodes through a cbd\n"
      "shared-memory transport (CXL memory, /dev/daxX.Y, or a /dev/shm file); cbd-proxy connect on\n"
      "the compute node turns it back into NBD.  nbdkit's own NBD clients pass through unchanged.";
  filter.load = cbd_load;
  filter.unload = cbd_unload;
  filter.config = cbd_config;
  static const std::string help =
      std::string(
          "cbd-readonly=true        Compute nodes may only read, even if the plugin below can write.\n"
          "cbd-KEY=VALUE            Any key below with a cbd- prefix (needed for hostname and export,\n"
          "                         which the bare form passes to the plugin, e.g. the nbd plugin's).\n") +
      kBackendParametersHelp;
  filter.config_help = help.c_str();
  filter.thread_model = cbd_thread_model;
  filter.get_ready = cbd_get_ready;
  filter.after_fork = cbd_after_fork;
  filter.cleanup = cbd_cleanup;
  filter.pread = cbd_pread;
  filter.pwrite = cbd_pwrite;
  filter.flush = cbd_flush;
  filter.trim = cbd_trim;
  filter.zero = cbd_zero;
  filter.extents = cbd_extents;
  filter.cache = cbd_cache;
  return filter;
}

struct nbdkit_filter filter = make_filter();

}  // namespace

NBDKIT_REGISTER_FILTER(filter)
