#include "common/poller.hpp"

#include <sys/prctl.h>
#include <time.h>

#include <algorithm>

namespace cbd {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#else
  __asm__ __volatile__("" ::: "memory");
#endif
}

}  // namespace

void sleep_for_us(std::uint32_t microseconds) {
  timespec ts{static_cast<time_t>(microseconds / 1000000), static_cast<long>(microseconds % 1000000) * 1000};
  ::nanosleep(&ts, nullptr);
}

void set_fine_timer_slack() { ::prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); }

AdaptivePoller::AdaptivePoller(PollTunables tunables)
    : tunables_(tunables), last_active_(std::chrono::steady_clock::now()) {
  set_fine_timer_slack();
}

void AdaptivePoller::active() {
  last_active_ = std::chrono::steady_clock::now();
  sleep_us_ = 0;
  spinning_ = true;
}

void AdaptivePoller::idle() {
  if (const std::uint32_t pause = next_pause_us()) sleep_for_us(pause);
}

bool AdaptivePoller::idle_for_long() const {
  return std::chrono::steady_clock::now() - last_active_ >= std::chrono::milliseconds(tunables_.idle_after_ms);
}

std::uint32_t AdaptivePoller::ceiling_us() const {
  std::uint32_t ceiling = std::max(tunables_.max_sleep_us, tunables_.min_sleep_us);
  if (idle_for_long()) ceiling = std::max(ceiling, tunables_.idle_sleep_us);
  return ceiling;
}

std::uint32_t AdaptivePoller::next_pause_us() {
  const auto now = std::chrono::steady_clock::now();
  const auto since = now - last_active_;
  if (spinning_) {
    if (since < std::chrono::microseconds(tunables_.spin_us) && yield_.spin_allowed(now)) {
      for (int i = 0; i < 8; ++i) cpu_relax();
      // Give the CPU to any thread waiting for it (with more busy threads
      // than cores — the client, the proxy's readers — a pure spin steals
      // the time the work we wait for needs); with none, this returns at
      // once and the spin goes on.  One that cost a slice ends it.
      if (yield_.yield()) return 0;
    }
    spinning_ = false;
  }
  const std::uint32_t ceiling = ceiling_us();
  sleep_us_ = sleep_us_ == 0 ? std::max<std::uint32_t>(tunables_.min_sleep_us, 1) : std::min(sleep_us_ * 2, ceiling);
  return sleep_us_;
}

}  // namespace cbd
