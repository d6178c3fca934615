#include "common/log.hpp"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace cbd {
namespace {

std::mutex sink_mutex;
LogSink current_sink;
std::atomic<bool> verbose{false};

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::Debug: return "debug";
    case LogLevel::Info: return "info";
    case LogLevel::Warning: return "warning";
    case LogLevel::Error: return "error";
  }
  return "?";
}

}  // namespace

void set_log_sink(LogSink sink) {
  std::lock_guard lock(sink_mutex);
  current_sink = std::move(sink);
}

void set_log_verbose(bool value) { verbose = value; }

void log(LogLevel level, const char* format, ...) {
  if (level == LogLevel::Debug && !verbose) return;
  char buffer[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof buffer, format, args);
  va_end(args);
  std::lock_guard lock(sink_mutex);
  if (current_sink) {
    current_sink(level, buffer);
  } else {
    std::fprintf(stderr, "cbd: %s: %s\n", level_name(level), buffer);
  }
}

}  // namespace cbd
