// Logging for libcbd.  The plugin routes messages to nbdkit_error/debug; the
// proxy prints to stderr.  A RateLimit keeps a hostile peer from flooding it.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <functional>
#include <string>

namespace cbd {

enum class LogLevel { Debug, Info, Warning, Error };

using LogSink = std::function<void(LogLevel, const std::string&)>;
void set_log_sink(LogSink sink);
void set_log_verbose(bool verbose);  // Debug messages are dropped unless verbose
void log(LogLevel level, const char* format, ...) __attribute__((format(printf, 2, 3)));

// Allows one event per `interval`; counts the ones it suppressed.
class RateLimit {
 public:
  explicit RateLimit(std::chrono::milliseconds interval = std::chrono::seconds(1)) : interval_(interval) {}
  // True when this event should be logged; `suppressed` receives how many
  // were dropped since the last logged one.
  bool allow(std::uint64_t* suppressed = nullptr);

 private:
  std::chrono::milliseconds interval_;
  std::atomic<std::int64_t> next_allowed_ns_{0};
  std::atomic<std::uint64_t> suppressed_{0};
};

}  // namespace cbd
