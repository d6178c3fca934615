#include "common/log.hpp"

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

bool RateLimit::allow(std::uint64_t* suppressed) {
  auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                 std::chrono::steady_clock::now().time_since_epoch()).count();
  auto next = next_allowed_ns_.load(std::memory_order_relaxed);
  if (now < next || !next_allowed_ns_.compare_exchange_strong(
                        next, now + std::chrono::duration_cast<std::chrono::nanoseconds>(interval_).count())) {
    suppressed_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  auto dropped = suppressed_.exchange(0, std::memory_order_relaxed);
  if (suppressed) *suppressed = dropped;
  return true;
}

}  // namespace cbd
