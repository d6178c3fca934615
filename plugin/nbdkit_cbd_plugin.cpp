// nbdkit-cbd-plugin: `nbdkit cbd transport=/dev/dax0.0 file=/dev/sda`.
//
// The storage node's side of cbd.  The plugin opens a backing store (a file
// or block device, or a sparse in-memory disk with size=), registers a
// backend in the transport and runs its handlers in background threads from
// .after_fork to .cleanup.  The same store is also served as nbdkit's own
// NBD export, so hosts outside the shared-memory domain reach the same bytes.
//
// Callbacks are small static functions named cbd_<method>, wired in one
// table at the bottom; no exception escapes them.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cstring>
#include <exception>
#include <memory>
#include <optional>
#include <string>

#include "common/log.hpp"
#include "common/parse.hpp"
#include "common/transport_fault_monitor.hpp"
#include "plugin/backend_parameters.hpp"
#include "plugin/file_store.hpp"
#include "plugin/memory_store.hpp"
#include "plugin/nbdkit_log.hpp"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace {

using namespace cbd;
using namespace cbd::backend;

struct PluginConfig {
  BackendParameters backend;
  std::string file;                    // file= (regular file or block device)
  std::optional<std::uint64_t> size;   // size= (in-memory store) when there is no file=
  bool readonly = false;
  bool direct = false;
};

PluginConfig config;
std::unique_ptr<Store> store;
BackendRuntime runtime;
// Stops the backend service when the transport is truncated or removed
// under us (docs/design.md, "Truncated or vanished transport"); nbdkit's own
// export does not use the transport and keeps serving the store.
std::unique_ptr<TransportFaultMonitor> fault_monitor;

void watch_transport() {
  fault_monitor = std::make_unique<TransportFaultMonitor>(runtime.transport()->region(), [](const std::string& message) {
    log(LogLevel::Error, "%s; stopped serving it (nbdkit's own NBD export keeps serving; restart nbdkit once the "
        "transport is back)", message.c_str());
    runtime.stop();
  });
}

// Any handle will do: every connection serves the same store.
int connection_handle;

int fail(const std::exception& e) {
  nbdkit_error("%s", e.what());
  return -1;
}

void cbd_load() { route_log_to_nbdkit(); }

void cbd_unload() {
  fault_monitor.reset();
  runtime.stop();
  store.reset();
}

int cbd_config(const char* key, const char* value) {
  try {
    const std::string k = key;
    if (apply_backend_parameter(config.backend, k, value)) return 0;
    if (k == "file") {
      config.file = value;
    } else if (k == "size") {
      config.size = parse_size(value, k);
    } else if (k == "readonly") {
      config.readonly = parse_bool(value, k);
    } else if (k == "direct") {
      config.direct = parse_bool(value, k);
    } else {
      nbdkit_error("unknown parameter '%s' (see nbdkit cbd --help)", key);
      return -1;
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

int cbd_config_complete() {
  try {
    if (!config.file.empty() && config.size) {
      nbdkit_error("give either file= (a file or block device) or size= (an in-memory disk), not both");
      return -1;
    }
    if (config.file.empty() && !config.size) {
      nbdkit_error("no backing store: give file=PATH (a disk image or block device) or size=SIZE (in memory)");
      return -1;
    }
    if (config.size && config.direct) {
      nbdkit_error("direct=true applies to file=, not to an in-memory size= store");
      return -1;
    }
    if (!config.file.empty()) {
      FileStoreOptions options;
      options.path = config.file;
      options.read_only = config.readonly;
      options.direct = config.direct;
      store = std::make_unique<FileStore>(options);
    } else {
      if (*config.size == 0) {
        nbdkit_error("size=0: the in-memory disk needs a size");
        return -1;
      }
      store = std::make_unique<MemoryStore>(*config.size, config.readonly);
    }
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

int cbd_get_ready() {
  try {
    runtime.prepare(config.backend, *store);
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

int cbd_after_fork() {
  try {
    runtime.start();
    watch_transport();
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  }
}

void cbd_cleanup() {
  fault_monitor.reset();  // first: it may be stopping the runtime right now
  runtime.stop();
}

void* cbd_open(int /*readonly*/) { return &connection_handle; }

int64_t cbd_get_size(void*) { return static_cast<int64_t>(store->info().size); }

int cbd_block_size(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  const StoreInfo& info = store->info();
  *minimum = info.block_min;
  *preferred = std::max(info.block_preferred, info.block_min);
  *maximum = 0xffffffffu;
  return 0;
}

int cbd_can_write(void*) { return !store->info().read_only; }
int cbd_can_flush(void*) { return store->info().can_flush; }
int cbd_can_fua(void*) { return store->info().can_fua ? NBDKIT_FUA_NATIVE : NBDKIT_FUA_NONE; }
int cbd_can_trim(void*) { return store->info().can_trim; }
int cbd_can_zero(void*) { return store->info().can_zero; }
int cbd_can_fast_zero(void*) { return store->info().can_fast_zero; }
int cbd_can_extents(void*) { return store->info().can_extents; }
int cbd_can_cache(void*) { return store->info().can_cache ? NBDKIT_CACHE_NATIVE : NBDKIT_CACHE_NONE; }
int cbd_can_multi_conn(void*) { return store->info().can_multi_conn; }
int cbd_is_rotational(void*) { return store->info().rotational; }

// Store methods return 0 or a positive errno; nbdkit wants -1 and the errno.
int result(int error) {
  if (error == 0) return 0;
  nbdkit_set_error(error);
  return -1;
}

int cbd_pread(void*, void* buffer, uint32_t count, uint64_t offset, uint32_t) {
  return result(store->pread(buffer, count, offset));
}

int cbd_pwrite(void*, const void* buffer, uint32_t count, uint64_t offset, uint32_t flags) {
  return result(store->pwrite(buffer, count, offset, flags & NBDKIT_FLAG_FUA));
}

int cbd_flush(void*, uint32_t) { return result(store->flush()); }

int cbd_trim(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return result(store->trim(offset, count, flags & NBDKIT_FLAG_FUA));
}

int cbd_zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  return result(store->zero(offset, count, !(flags & NBDKIT_FLAG_MAY_TRIM), flags & NBDKIT_FLAG_FAST_ZERO,
                            flags & NBDKIT_FLAG_FUA));
}

int cbd_cache(void*, uint32_t count, uint64_t offset, uint32_t) { return result(store->cache(offset, count)); }

// Hands the store's allocation map to nbdkit.
class NbdkitExtents final : public ExtentSink {
 public:
  explicit NbdkitExtents(struct nbdkit_extents* extents) : extents_(extents) {}
  bool add(std::uint64_t offset, std::uint64_t length, std::uint32_t flags) override {
    if (nbdkit_add_extent(extents_, offset, length, flags & (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO)) == -1) {
      failed_ = true;
      return false;
    }
    return true;
  }
  bool failed() const { return failed_; }

 private:
  struct nbdkit_extents* extents_;
  bool failed_ = false;
};

int cbd_extents(void*, uint32_t count, uint64_t offset, uint32_t flags, struct nbdkit_extents* extents) {
  NbdkitExtents sink(extents);
  int error = store->extents(offset, count, flags & NBDKIT_FLAG_REQ_ONE, sink);
  if (sink.failed()) return -1;  // nbdkit_add_extent already set the error
  return result(error);
}

void cbd_dump_plugin() {
  std::printf("cbd_transport_default=%s\n", kDefaultTransport);
}

struct nbdkit_plugin make_plugin() {
  struct nbdkit_plugin plugin {};
  plugin.name = "cbd";
  plugin.longname = "cbd: a disk exported through a CXL shared-memory transport";
  plugin.version = "0.1.0";
  plugin.description =
      "Serves a file, block device or in-memory disk to compute nodes through a cbd shared-memory\n"
      "transport (CXL memory, /dev/daxX.Y, or a /dev/shm file); cbd-proxy connect on the compute\n"
      "node turns it back into NBD.  The same disk is also nbdkit's own NBD export.";
  plugin.load = cbd_load;
  plugin.unload = cbd_unload;
  plugin.config = cbd_config;
  plugin.config_complete = cbd_config_complete;
  static const std::string help = std::string(
      "file=PATH                Backing regular file or block device.\n"
      "size=SIZE                Without file=: a sparse in-memory disk of this size.\n"
      "readonly=true            Refuse writes (compute nodes get EPERM).\n"
      "direct=true              O_DIRECT to the backing store for aligned requests.\n") + kBackendParametersHelp;
  plugin.config_help = help.c_str();
  plugin.magic_config_key = "file";
  plugin.get_ready = cbd_get_ready;
  plugin.after_fork = cbd_after_fork;
  plugin.cleanup = cbd_cleanup;
  plugin.dump_plugin = cbd_dump_plugin;
  plugin.open = cbd_open;
  plugin.get_size = cbd_get_size;
  plugin.block_size = cbd_block_size;
  plugin.can_write = cbd_can_write;
  plugin.can_flush = cbd_can_flush;
  plugin.can_fua = cbd_can_fua;
  plugin.can_trim = cbd_can_trim;
  plugin.can_zero = cbd_can_zero;
  plugin.can_fast_zero = cbd_can_fast_zero;
  plugin.can_extents = cbd_can_extents;
  plugin.can_cache = cbd_can_cache;
  plugin.can_multi_conn = cbd_can_multi_conn;
  plugin.is_rotational = cbd_is_rotational;
  plugin.pread = cbd_pread;
  plugin.pwrite = cbd_pwrite;
  plugin.flush = cbd_flush;
  plugin.trim = cbd_trim;
  plugin.zero = cbd_zero;
  plugin.cache = cbd_cache;
  plugin.extents = cbd_extents;
  return plugin;
}

struct nbdkit_plugin plugin = make_plugin();

}  // namespace

NBDKIT_REGISTER_PLUGIN(plugin)
