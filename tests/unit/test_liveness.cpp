// Observer-side liveness (common/liveness.hpp).  Time points are injected, so
// these tests are fast and deterministic; only the observer's own monotonic
// clock (std::chrono::steady_clock) ever enters the judgement.
#include <doctest/doctest.h>

#include <chrono>
#include <type_traits>

#include "common/liveness.hpp"
#include "common/slot.hpp"

using namespace cbd;
using namespace std::chrono_literals;
using Clock = LivenessObserver::Clock;

// The API speaks only the observer's monotonic clock: no wall-clock type can
// be passed in, and nothing in a slot is a timestamp.
static_assert(std::is_same_v<Clock, std::chrono::steady_clock>);
static_assert(Clock::is_steady);
static_assert(!std::is_convertible_v<std::chrono::system_clock::time_point, Clock::time_point>);

namespace {

constexpr auto kDeadAfter = 2000ms;
const Clock::time_point kBase = Clock::time_point{} + 1000h;

SlotHeader live_slot() {
  SlotHeader h{};
  REQUIRE(try_claim(h, 0));
  return h;
}

// What an owner's heartbeat does, seen from an observer: the counter moves.
void bump(SlotHeader& h) { h.heartbeat += 1; }

}  // namespace

TEST_CASE("liveness: a free slot is Free, whatever its heartbeat does") {
  LivenessObserver observer(kDeadAfter);
  SlotHeader h{};
  CHECK(observer.observe(1, h, kBase) == Liveness::Free);
  CHECK(observer.observe(1, h, kBase + 1h) == Liveness::Free);
  CHECK(std::string(liveness_name(Liveness::Dead)) == "dead");
}

TEST_CASE("liveness: flips to Dead exactly when the heartbeat stops for dead_after") {
  LivenessObserver observer(kDeadAfter);
  SlotHeader h = live_slot();
  auto now = kBase;
  // First sight counts as alive until a whole timeout has passed.
  CHECK(observer.observe(7, h, now) == Liveness::Alive);
  // Heartbeat running at the interval: alive for a long time.
  for (int i = 0; i < 1000; ++i) {
    now += 200ms;
    bump(h);
    REQUIRE(observer.observe(7, h, now) == Liveness::Alive);
  }
  const auto last_beat = now;
  // It stops. Alive just before the timeout, dead at it and after.
  CHECK(observer.observe(7, h, last_beat + 1ms) == Liveness::Alive);
  CHECK(observer.observe(7, h, last_beat + kDeadAfter - 1ms) == Liveness::Alive);
  CHECK(observer.observe(7, h, last_beat + kDeadAfter) == Liveness::Dead);
  CHECK(observer.observe(7, h, last_beat + kDeadAfter + 1h) == Liveness::Dead);
  // The word to reclaim with is the one observed.
  CHECK(observer.last_word(7) == h.state);
  CHECK(reclaim(h, observer.last_word(7)));
  CHECK(observer.observe(7, h, last_beat + kDeadAfter + 2h) == Liveness::Free);
}

TEST_CASE("liveness: observation frequency does not matter, only movement") {
  LivenessObserver observer(kDeadAfter);
  SlotHeader h = live_slot();
  CHECK(observer.observe(1, h, kBase) == Liveness::Alive);
  // Dead after a long silence observed once...
  CHECK(observer.observe(1, h, kBase + 5s) == Liveness::Dead);
  // ...alive again as soon as the heartbeat moves.
  bump(h);
  CHECK(observer.observe(1, h, kBase + 6s) == Liveness::Alive);
  // Huge gaps between observations: alive whenever the counter moved in between.
  auto now = kBase + 6s;
  for (auto gap : {1h, 24h, 24h * 365, 10h, 1h}) {
    now += gap;
    bump(h);
    CHECK(observer.observe(1, h, now) == Liveness::Alive);
    CHECK(observer.observe(1, h, now + kDeadAfter - 1ms) == Liveness::Alive);
  }
  // Observations many times a millisecond without movement: dead only after the full timeout.
  auto start = now + kDeadAfter - 1ms;  // changed at `now`
  for (auto t = start; t < now + kDeadAfter; t += 100us) REQUIRE(observer.observe(1, h, t) == Liveness::Alive);
  CHECK(observer.observe(1, h, now + kDeadAfter) == Liveness::Dead);
}

TEST_CASE("liveness: a heartbeat value is a counter, not a clock") {
  // A peer whose heartbeat looks like a skewed wall-clock stamp (far future,
  // then jumping backwards) is judged only by whether the value changes.
  LivenessObserver observer(kDeadAfter);
  SlotHeader h = live_slot();
  auto future_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                       (std::chrono::system_clock::now() + 24h * 3650).time_since_epoch())
                       .count();
  h.heartbeat = static_cast<std::uint64_t>(future_ns);
  CHECK(observer.observe(2, h, kBase) == Liveness::Alive);
  h.heartbeat = 5;  // "backwards"
  CHECK(observer.observe(2, h, kBase + 1900ms) == Liveness::Alive);
  CHECK(observer.observe(2, h, kBase + 1900ms + kDeadAfter - 1ms) == Liveness::Alive);
  CHECK(observer.observe(2, h, kBase + 1900ms + kDeadAfter) == Liveness::Dead);
}

TEST_CASE("liveness: a new owner (state word change) counts as movement") {
  LivenessObserver observer(kDeadAfter);
  SlotHeader h = live_slot();
  CHECK(observer.observe(3, h, kBase) == Liveness::Alive);
  CHECK(observer.observe(3, h, kBase + kDeadAfter) == Liveness::Dead);
  // Taken over without a heartbeat change: the word changed, so alive again.
  std::uint64_t heartbeat = h.heartbeat;
  auto taken = try_take_over(h, h.state, 1);
  REQUIRE(taken);
  h.heartbeat = heartbeat;
  CHECK(observer.observe(3, h, kBase + kDeadAfter + 1ms) == Liveness::Alive);
  CHECK(observer.last_word(3) == *taken);
}

TEST_CASE("liveness: two observers with unrelated time bases agree") {
  // Two hosts: same monotonic rate, wildly different origins (one booted
  // years ago, one just now).  They sample the same slot at the same moments.
  LivenessObserver a(kDeadAfter), b(kDeadAfter);
  const Clock::time_point base_a = Clock::time_point{} + 3s;
  const Clock::time_point base_b = Clock::time_point{} + 24h * 365 * 20;
  SlotHeader h = live_slot();
  // A script: beat for a while, stop, resume, stop for good.
  auto elapsed = 0ms;
  int disagreements = 0, dead_seen = 0, alive_seen = 0;
  for (int step = 0; step < 400; ++step) {
    elapsed += 50ms;
    bool beating = step < 100 || (step >= 180 && step < 250);
    if (beating && step % 4 == 0) bump(h);
    Liveness la = a.observe(9, h, base_a + elapsed);
    Liveness lb = b.observe(9, h, base_b + elapsed);
    if (la != lb) ++disagreements;
    (la == Liveness::Dead ? dead_seen : alive_seen)++;
  }
  CHECK(disagreements == 0);
  CHECK(dead_seen > 0);
  CHECK(alive_seen > 0);
  // Both end dead: the heartbeat stopped at step 248, 7.5 s before the end.
  CHECK(a.observe(9, h, base_a + elapsed) == Liveness::Dead);
  CHECK(b.observe(9, h, base_b + elapsed) == Liveness::Dead);
}

TEST_CASE("liveness: slots are tracked independently; the default time is now") {
  LivenessObserver observer(50ms);
  SlotHeader beating = live_slot(), silent = live_slot();
  CHECK(observer.observe(1, beating) == Liveness::Alive);
  CHECK(observer.observe(2, silent) == Liveness::Alive);
  auto later = Clock::now() + 60ms;
  bump(beating);
  CHECK(observer.observe(1, beating, later) == Liveness::Alive);
  CHECK(observer.observe(2, silent, later) == Liveness::Dead);
  CHECK(observer.last_word(99) == 0);  // never observed
}
