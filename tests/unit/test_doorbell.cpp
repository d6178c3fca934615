// Doorbells (common/doorbell.hpp, common/kernel_identity.hpp; docs/design.md,
// Polling and doorbells): a producer that publishes while the consumer goes
// to sleep never leaves it asleep, a ring reaches another process through a
// shared mapping, a ring with nobody asleep changes nothing, and a set-up by
// a queue side that does not ring is never taken for one that does.
#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <thread>

#include "common/doorbell.hpp"
#include "common/kernel_identity.hpp"
#include "common/channel.hpp"
#include "common/shared_atomic.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::uint32_t kLongUs = 5'000'000;  // a sleep no test may wait out

}  // namespace

TEST_CASE("doorbell: a ring between arm and sleep ends the sleep at once (no lost wake)") {
  std::uint32_t word = 0;
  DoorbellWaiter waiter(&word);
  waiter.arm();
  CHECK((load_relaxed(word) & kDoorbellSleeping) != 0);
  // The producer publishes and rings after the consumer's last look at its
  // ring, before it sleeps: the worst moment.
  ring_doorbell(word);
  CHECK((load_relaxed(word) & kDoorbellSleeping) == 0);
  const auto start = Clock::now();
  CHECK(waiter.sleep(kLongUs) == DoorbellWaiter::Wake::Woken);
  CHECK(Clock::now() - start < 1s);
}

TEST_CASE("doorbell: a ring with nobody asleep leaves the word alone") {
  std::uint32_t word = 7;
  ring_doorbell(word);
  CHECK(load_relaxed(word) == 7);
  DoorbellWaiter waiter(&word);
  waiter.arm();
  waiter.cancel();
  const std::uint32_t after_cancel = load_relaxed(word);
  CHECK((after_cancel & kDoorbellSleeping) == 0);
  ring_doorbell(word);
  CHECK(load_relaxed(word) == after_cancel);
}

TEST_CASE("doorbell: nobody rings, the sleep ends at its timeout") {
  std::uint32_t word = 0;
  DoorbellWaiter waiter(&word);
  waiter.arm();
  const auto start = Clock::now();
  CHECK(waiter.sleep(20'000) == DoorbellWaiter::Wake::TimedOut);
  const auto took = Clock::now() - start;
  CHECK(took >= 19ms);
  CHECK(took < 2s);
  CHECK((load_relaxed(word) & kDoorbellSleeping) == 0);
}

TEST_CASE("doorbell: a ring wakes a sleeper in another process through the shared mapping") {
  test::ShmFile file("doorbell");
  Transport transport = test::make_transport(file, test::small_options());
  std::uint32_t& word = transport.backend(0).doorbell[3];
  pid_t child = test::spawn([&] {
    Transport view = Transport::attach(file.path());
    DoorbellWaiter waiter(&view.backend(0).doorbell[3]);
    waiter.arm();
    const auto start = Clock::now();
    const bool woken = waiter.sleep(kLongUs) == DoorbellWaiter::Wake::Woken;
    return woken && Clock::now() - start < 3s ? 0 : 1;
  });
  // Ring only once the child sleeps (its bit is up), so the wake has to
  // cross processes, not just change the word first.
  const auto deadline = Clock::now() + 5s;
  while ((load_relaxed(word) & kDoorbellSleeping) == 0 && Clock::now() < deadline) std::this_thread::sleep_for(1ms);
  REQUIRE((load_relaxed(word) & kDoorbellSleeping) != 0);
  std::this_thread::sleep_for(20ms);  // into FUTEX_WAIT
  ring_doorbell(word);
  CHECK(test::wait_child(child, std::chrono::seconds(10)) == 0);
}

TEST_CASE("doorbell: a scribbled word ends the sleep at once, and the waiter leaves it alone") {
  std::uint32_t word = 0;
  DoorbellWaiter waiter(&word);
  waiter.arm();
  store_relaxed(word, 0x1234u);  // a peer writes over the armed word
  const auto start = Clock::now();
  CHECK(waiter.sleep(kLongUs) == DoorbellWaiter::Wake::Woken);
  CHECK(Clock::now() - start < 1s);
  CHECK(load_relaxed(word) == 0x1234u);  // cancel() only clears its own bit
}

TEST_CASE("doorbell: each set-up says it rings for its own generation and forgets the last handler's doorbell") {
  test::ShmFile file("doorbell-setup");
  Transport transport = test::make_transport(file, test::small_options());
  Channel queue(transport, 0), handler(transport, 0);
  ChannelControl& control = transport.channel_control(0);
  const std::uint64_t g1 = queue.queue_setup(0, 0, 1);
  CHECK(load_relaxed(control.queue_rings) == rings_tag(g1));
  handler.handler_attach(g1, 1, 5);
  CHECK(load_relaxed(control.handler_doorbell) == 5);
  // A queue side that does not ring (an older one) sets up again: it bumps
  // the generation and leaves queue_rings alone, which then no longer
  // matches; a new one rewrites both.
  store_release(control.generation, g1 + 1);
  CHECK(load_relaxed(control.queue_rings) != rings_tag(load_relaxed(control.generation)));
  const std::uint64_t g3 = queue.queue_setup(0, 0, 1, g1 + 1);
  CHECK(load_relaxed(control.queue_rings) == rings_tag(g3));
  CHECK(load_relaxed(control.handler_doorbell) == 0);  // until the next handler names one
  CHECK(rings_tag(std::uint64_t{1} << 32) != 0);
}

TEST_CASE("kernel identity: our boot id is known, matches itself, and an unknown one matches nothing") {
  const KernelId ours = local_kernel_id();
  CHECK(ours != KernelId{});
  HostSlot slot{};
  CHECK_FALSE(same_kernel(slot, ours));  // a peer that wrote none
  write_kernel_id(slot, ours);
  CHECK(same_kernel(slot, ours));
  CHECK_FALSE(same_kernel(slot, KernelId{}));
  KernelId other = ours;
  other[5] ^= 1;
  CHECK_FALSE(same_kernel(slot, other));
}
