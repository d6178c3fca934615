// Adaptive polling (docs/design.md, Polling and doorbells): spin briefly after activity, then back
// off to sleeps that grow up to a ceiling, so an idle daemon costs about no
// CPU while a busy one reacts in well under a microsecond.
#pragma once

#include <chrono>
#include <cstdint>

#include "common/spin_yield.hpp"

namespace cbd {

struct PollTunables {
  std::uint32_t spin_us = 50;       // keep spinning this long after the last activity
  std::uint32_t min_sleep_us = 2;   // first sleep after spinning
  std::uint32_t max_sleep_us = 1000;  // sleeps double up to this
  // Deep idle: once nothing happened for idle_after_ms, sleeps may grow up
  // to idle_sleep_us.  Busy periods keep the short ceiling (latency); an
  // idle daemon wakes ~100 times a second instead of ~1000 (CPU ~0).
  std::uint32_t idle_after_ms = 1000;
  std::uint32_t idle_sleep_us = 10000;
};

class AdaptivePoller {
 public:
  explicit AdaptivePoller(PollTunables tunables = {});
  // Call after a poll found work.
  void active();
  // Call after a poll found nothing: pauses for a moment (spin or sleep).
  void idle();
  // The same, for a caller that sleeps its own way: spins a moment and
  // returns 0, or returns how long to sleep now.
  std::uint32_t next_pause_us();
  // The longest sleep allowed now: what a wait that a wake cuts short uses.
  std::uint32_t ceiling_us() const;
  // Whether nothing happened for idle_after_ms (deep idle).
  bool idle_for_long() const;
  // Call before a known long idle (e.g. nothing in flight): skips the spin.
  void quiesce() { spinning_ = false; }

 private:
  PollTunables tunables_;
  std::chrono::steady_clock::time_point last_active_;
  std::uint32_t sleep_us_ = 0;
  bool spinning_ = true;
  SpinYield yield_;
};

// Sets this thread's timer slack to 1 µs so short sleeps are short (the
// default 50 µs slack would dominate the back-off).
void set_fine_timer_slack();
void sleep_for_us(std::uint32_t microseconds);

}  // namespace cbd
