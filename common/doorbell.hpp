// A doorbell in shared memory (docs/design.md, Polling and doorbells): lets
// a consumer that found its rings empty sleep in the kernel until the
// producer publishes, instead of waking again and again on a timer.
//
// The word is a futex.  Its high bit says "a waiter sleeps"; the other bits
// only change.  The waiter sets the bit, looks at its rings once more and
// sleeps only if they are still empty, with the word as it set it; a
// producer that publishes and then sees the bit clears it (changing the
// word) and wakes.  Both sides order their ring access and the word with a
// full fence, so either the waiter sees the new entries or the producer sees
// the bit: no wake is lost.
//
// A futex wakes only within one kernel, and the word is a peer's to
// scribble on: every sleep has a timeout, so a wake that cannot come, or
// that a peer suppressed, costs latency and never a hang.
#pragma once

#include <cstdint>

namespace cbd {

inline constexpr std::uint32_t kDoorbellSleeping = 1u << 31;

// Producer side: call after publishing ring entries.  Costs one fence and
// one load when nobody sleeps; a system call only when somebody does.
void ring_doorbell(std::uint32_t& word);

// Consumer side, one waiter per word.
class DoorbellWaiter {
 public:
  DoorbellWaiter() = default;
  explicit DoorbellWaiter(std::uint32_t* word) : word_(word) {}

  bool usable() const { return word_ != nullptr; }
  // Announce the sleep.  Afterwards the caller must look at its rings once
  // more, then call sleep() if they are empty, or cancel() if not.  Both
  // only change the word while it is as arm() left it.
  void arm();
  enum class Wake { Woken, TimedOut, Failed };
  // Sleeps until woken or `timeout_us` passed.  Woken also when the word
  // had already changed; Failed when the kernel refused the wait (a
  // mapping it takes no futex in): the caller must sleep its own way.
  Wake sleep(std::uint32_t timeout_us);
  void cancel();

 private:
  std::uint32_t* word_ = nullptr;
  std::uint32_t armed_ = 0;
};

}  // namespace cbd
