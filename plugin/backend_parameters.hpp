// The key=value parameters shared by every nbdkit front end of a backend
// (the `cbd` plugin and the `cbd` filter), and the runtime that turns them
// into a running BackendService: open or format the transport before nbdkit
// forks, start the handlers after it, stop them at cleanup.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "common/region.hpp"
#include "common/transport.hpp"
#include "plugin/backend_service.hpp"
#include "plugin/store.hpp"

namespace cbd::backend {

struct BackendParameters {
  std::string transport = kDefaultTransport;
  bool format = false;                       // format the transport when it is not formatted yet
  std::uint64_t transport_size = 256ull << 20;  // size of a transport file that format= creates
  BackendConfig config;
};

// Applies one parameter if it is a backend parameter.  Returns false for a
// key it does not know (the caller's own, or an error); throws cbd::Error
// for a malformed value.
bool apply_backend_parameter(BackendParameters& parameters, const std::string& key, const std::string& value);

// Lines for nbdkit's --help (config_help), one "key=VALUE  text" per line.
extern const char* const kBackendParametersHelp;

class BackendRuntime {
 public:
  BackendRuntime() = default;
  BackendRuntime(const BackendRuntime&) = delete;
  BackendRuntime& operator=(const BackendRuntime&) = delete;
  ~BackendRuntime() { stop(); }

  // Before the fork: maps the transport (formatting it when asked and
  // needed), validates it, and prepares the service for `store`.  Throws
  // cbd::Error with a message that says what to do.
  void prepare(const BackendParameters& parameters, Store& store);
  // After the fork: claims the slots and starts heartbeats and handlers.
  void start();
  // Completes what is in flight, releases the slots.  Idempotent.
  void stop();

  const Transport* transport() const { return transport_ ? &*transport_ : nullptr; }

 private:
  std::optional<Transport> transport_;
  std::unique_ptr<BackendService> service_;
};

}  // namespace cbd::backend
