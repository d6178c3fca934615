// Logging for libcbd.  The plugin routes messages to nbdkit_error/debug; the
// proxy prints to stderr.  Lines a peer can trigger go through a RateLimit
// (rate_limit.hpp, included here for them).
#pragma once

#include <cstdarg>
#include <functional>
#include <string>

#include "common/rate_limit.hpp"

namespace cbd {

enum class LogLevel { Debug, Info, Warning, Error };

using LogSink = std::function<void(LogLevel, const std::string&)>;
void set_log_sink(LogSink sink);
void set_log_verbose(bool verbose);  // Debug messages are dropped unless verbose
void log(LogLevel level, const char* format, ...) __attribute__((format(printf, 2, 3)));

}  // namespace cbd
