// Routes libcbd's log messages into nbdkit's: warnings and errors through
// nbdkit_error (they reach syslog or stderr like nbdkit's own), the rest
// through nbdkit_debug (shown with -v).  Only the nbdkit glue files include
// this header: it is where the nbdkit symbols are available.
#pragma once

#include <string>

#include "common/log.hpp"

namespace cbd::backend {

inline void route_log_to_nbdkit() {
  set_log_verbose(true);  // nbdkit_debug itself drops debug output unless -v
  set_log_sink([](LogLevel level, const std::string& message) {
    if (level == LogLevel::Warning || level == LogLevel::Error)
      nbdkit_error("%s", message.c_str());
    else
      nbdkit_debug("%s", message.c_str());
  });
}

}  // namespace cbd::backend
