// The spin's yield (common/spin_yield.hpp): yields that keep losing the CPU
// to a busy thread for a slice turn spinning off for a while; quick ones,
// or a long one now and then, leave it on.
#include <doctest/doctest.h>

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "common/spin_yield.hpp"

using namespace cbd;
using namespace std::chrono_literals;

namespace {

// Pins the calling thread to one CPU and restores its mask on destruction.
class PinnedTo {
 public:
  explicit PinnedTo(int cpu) {
    pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_);
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    pthread_setaffinity_np(pthread_self(), sizeof(one), &one);
  }
  ~PinnedTo() { pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_); }
  PinnedTo(const PinnedTo&) = delete;
  PinnedTo& operator=(const PinnedTo&) = delete;

 private:
  cpu_set_t saved_{};
};

// A thread that never blocks, on `cpu`, until destroyed.
class CpuHog {
 public:
  explicit CpuHog(int cpu) : thread_([this, cpu] {
      PinnedTo pin(cpu);
      running_.store(true);
      while (!stop_.load(std::memory_order_relaxed)) {
      }
    }) {
    while (!running_.load()) std::this_thread::yield();
  }
  ~CpuHog() {
    stop_.store(true);
    thread_.join();
  }
  CpuHog(const CpuHog&) = delete;
  CpuHog& operator=(const CpuHog&) = delete;

 private:
  std::atomic<bool> running_{false}, stop_{false};
  std::thread thread_;
};

int current_cpu() {
  const int cpu = sched_getcpu();
  return cpu < 0 ? 0 : cpu;
}

}  // namespace

TEST_CASE("spin yield: spinning stops only when long yields come close together") {
  using Clock = SpinYield::Clock;
  const Clock::time_point t0 = Clock::now();
  const auto quick = std::chrono::microseconds(20);
  const auto slice = std::chrono::milliseconds(3);
  SpinYield spin;

  SUBCASE("quick yields never stop it") {
    Clock::time_point at = t0;
    for (int i = 0; i < 10000; ++i, at += quick) REQUIRE(spin.account(at, at + quick));
    CHECK(spin.spins_stopped() == 0);
  }
  SUBCASE("a long yield now and then (a preemption) does not stop it") {
    Clock::time_point at = t0;
    for (int i = 0; i < 20; ++i) {
      REQUIRE(spin.account(at, at + slice));
      at += slice + SpinYield::kOverrunWindow + std::chrono::milliseconds(1);
      REQUIRE(spin.spin_allowed(at));
    }
    CHECK(spin.spins_stopped() == 0);
  }
  SUBCASE("two long yields within the window stop it for the off period, quick ones between or not") {
    CHECK(spin.account(t0, t0 + slice));
    const Clock::time_point second = t0 + slice + std::chrono::milliseconds(1);
    CHECK(spin.account(t0 + slice, t0 + slice + quick));
    CHECK_FALSE(spin.account(second, second + slice));
    const Clock::time_point stopped_at = second + slice;
    CHECK(spin.spins_stopped() == 1);
    CHECK_FALSE(spin.spin_allowed(stopped_at));
    CHECK_FALSE(spin.spin_allowed(stopped_at + SpinYield::kSpinOff - std::chrono::microseconds(1)));
    CHECK(spin.spin_allowed(stopped_at + SpinYield::kSpinOff));
  }
  SUBCASE("a yield just at the bound is not long") {
    Clock::time_point at = t0;
    for (int i = 0; i < 100; ++i, at += SpinYield::kYieldOverrun) {
      REQUIRE(spin.account(at, at + SpinYield::kYieldOverrun));
    }
    CHECK(spin.spins_stopped() == 0);
  }
}

TEST_CASE("spin yield: a yield that gives a busy thread on the same CPU its slice turns spinning off") {
  PinnedTo pin(current_cpu());
  const int cpu = current_cpu();
  SpinYield spin;
  SpinYield::Clock::time_point stopped_at;
  {
    CpuHog hog(cpu);
    // The hog is runnable on our CPU: a yield hands it the CPU until the
    // scheduler takes it back, which is a slice (milliseconds), not
    // microseconds.  Bounded by time, not a count: on a scheduler that
    // picks the yielder again until it has caught up with the hog, long
    // yields come only now and then.
    const auto deadline = SpinYield::Clock::now() + 5s;
    bool stopped = false;
    while (!stopped && SpinYield::Clock::now() < deadline) stopped = !spin.yield();
    stopped_at = SpinYield::Clock::now();
    REQUIRE(stopped);
  }
  CHECK(spin.spins_stopped() >= 1);
  // Read right after the stop, before the hog is joined: off now, and on
  // again once the off period is over.
  CHECK_FALSE(spin.spin_allowed(stopped_at));
  CHECK(spin.spin_allowed(stopped_at + SpinYield::kSpinOff));
}
