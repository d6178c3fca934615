// Adaptive polling (common/poller.hpp): an idle loop backs off to sleeps and
// costs little CPU; activity brings back the spin.
#include <doctest/doctest.h>

#include <sys/prctl.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>

#include "common/poller.hpp"

using namespace cbd;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

namespace {

std::chrono::microseconds thread_cpu_time() {
  rusage usage{};
  getrusage(RUSAGE_THREAD, &usage);
  return std::chrono::seconds(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) +
         std::chrono::microseconds(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec);
}

// How long one idle() call takes.
std::chrono::nanoseconds time_idle(AdaptivePoller& poller) {
  auto start = Clock::now();
  poller.idle();
  return Clock::now() - start;
}

template <typename Fn>
std::chrono::nanoseconds best_of(Fn&& fn) {
  std::chrono::nanoseconds best = std::chrono::hours(1);
  for (int i = 0; i < 5; ++i) best = std::min<std::chrono::nanoseconds>(best, fn());
  return best;
}

}  // namespace

TEST_CASE("poller: an idle loop sleeps and uses a small fraction of a CPU") {
  AdaptivePoller poller;  // default tunables
  // Fine timer slack is set so short sleeps stay short.
  CHECK(::prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0) == 1000);
  poller.active();
  const auto cpu_start = thread_cpu_time();
  const auto wall_start = Clock::now();
  long calls = 0;
  while (Clock::now() - wall_start < 200ms) {
    poller.idle();
    ++calls;
  }
  const auto wall = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - wall_start);
  const auto cpu = thread_cpu_time() - cpu_start;
  const double fraction = static_cast<double>(cpu.count()) / static_cast<double>(wall.count());
  MESSAGE("idle loop: " << calls << " calls, cpu " << cpu.count() << " us over " << wall.count()
                        << " us wall (" << fraction * 100 << "%)");
  // A spinning loop would be ~100% and make hundreds of thousands of calls.
  CHECK(fraction < 0.2);
  CHECK(calls < 20000);
}

TEST_CASE("poller: sleeps grow to the ceiling; active() resets to spinning; quiesce() skips the spin") {
  PollTunables tunables;
  tunables.spin_us = 20000;  // 20 ms of spinning after activity
  tunables.min_sleep_us = 50;
  tunables.max_sleep_us = 2000;
  tunables.idle_after_ms = 60000;  // no deep idle in this test
  AdaptivePoller poller(tunables);

  // Within the spin budget an idle() is a short pause, not a sleep.  (Short
  // durations are the best of a few tries: the machine may preempt us.)
  CHECK(best_of([&] {
          poller.active();
          return time_idle(poller);
        }) < 1ms);
  // Past the budget: sleeps, growing up to max_sleep_us.
  auto reach_ceiling = [&] {
    auto spin_end = Clock::now() + 25ms;
    while (Clock::now() < spin_end) poller.idle();
    for (int i = 0; i < 10; ++i) poller.idle();  // 50, 100, ... doubles past 2000
  };
  reach_ceiling();
  CHECK(time_idle(poller) >= 2ms);
  CHECK(time_idle(poller) >= 2ms);  // stays at the ceiling

  // Activity resets: spinning again.
  poller.active();
  CHECK(best_of([&] { return time_idle(poller); }) < 1ms);

  // quiesce(): straight to sleeping, and the back-off starts from
  // min_sleep_us again (active() reset it), not from the ceiling.
  reach_ceiling();
  CHECK(time_idle(poller) >= 2ms);
  auto first = best_of([&] {
    poller.active();
    poller.quiesce();
    return time_idle(poller);
  });
  CHECK(first >= 50us);
  CHECK(first < 1900us);
}


TEST_CASE("poller: after idle_after_ms without activity sleeps grow to idle_sleep_us; activity ends it") {
  PollTunables tunables;
  tunables.spin_us = 0;
  tunables.min_sleep_us = 50;
  tunables.max_sleep_us = 500;
  tunables.idle_after_ms = 30;
  tunables.idle_sleep_us = 8000;
  AdaptivePoller poller(tunables);
  poller.active();
  // Before idle_after_ms the ceiling is max_sleep_us...
  for (int i = 0; i < 6; ++i) poller.idle();  // 50 .. 1600 capped at 500
  CHECK(best_of([&] { return time_idle(poller); }) < 4ms);
  // ...after it, sleeps keep doubling up to idle_sleep_us.
  auto idle_end = Clock::now() + 40ms;
  while (Clock::now() < idle_end) poller.idle();
  for (int i = 0; i < 6; ++i) poller.idle();
  CHECK(time_idle(poller) >= 7ms);
  // Activity: back to short sleeps at once.
  poller.active();
  for (int i = 0; i < 6; ++i) poller.idle();
  CHECK(best_of([&] { return time_idle(poller); }) < 4ms);
}
