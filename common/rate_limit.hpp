// A limit on how often one kind of log line is printed.  Anything a peer can
// trigger at will (a bad entry, a new generation, a store error it provokes)
// goes through one, so a hostile or broken peer cannot flood the log or
// spend our time formatting lines; the count of lines it dropped goes into
// the next one it lets through.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace cbd {

// Allows one event per `interval`; counts the ones it suppressed.  Safe to
// share between threads (one lock-free compare-and-swap per allowed event).
class RateLimit {
 public:
  explicit RateLimit(std::chrono::milliseconds interval = std::chrono::seconds(1)) : interval_(interval) {}
  // True when this event should be logged; `suppressed` receives how many
  // were dropped since the last logged one.
  bool allow(std::uint64_t* suppressed = nullptr) { return allow_at(std::chrono::steady_clock::now(), suppressed); }
  // The same at a given time (tests drive the clock).
  bool allow_at(std::chrono::steady_clock::time_point now, std::uint64_t* suppressed = nullptr);

 private:
  std::chrono::milliseconds interval_;
  std::atomic<std::int64_t> next_allowed_ns_{0};
  std::atomic<std::uint64_t> suppressed_{0};
};

}  // namespace cbd
