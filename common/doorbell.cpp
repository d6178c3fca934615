#include "common/doorbell.hpp"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <climits>

#include "common/shared_atomic.hpp"

namespace cbd {
namespace {

// Shared futexes (no FUTEX_PRIVATE_FLAG): the word lives in a mapping that
// other processes share.
long futex(std::uint32_t* word, int op, std::uint32_t value, const timespec* timeout) {
  return ::syscall(SYS_futex, word, op, value, timeout, nullptr, 0);
}

}  // namespace

void ring_doorbell(std::uint32_t& word) {
  // Orders the caller's ring publication before the look at the waiter bit
  // (the other half of the fence in DoorbellWaiter::arm).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::uint32_t seen = load_relaxed(word);
  if ((seen & kDoorbellSleeping) == 0) return;
  // Clearing the bit changes the word, so a waiter that has not gone to
  // sleep yet returns at once; one that sleeps is woken.  If the exchange
  // fails someone else (another producer, or the waiter itself) already did.
  if (compare_exchange(word, seen, static_cast<std::uint32_t>((seen + 1) & ~kDoorbellSleeping)))
    futex(&word, FUTEX_WAKE, INT_MAX, nullptr);
}

void DoorbellWaiter::arm() {
  std::uint32_t seen = load_relaxed(*word_);
  armed_ = static_cast<std::uint32_t>((seen + 1) | kDoorbellSleeping);
  // A compare-exchange, not a store: if the word changed since we read it
  // (a peer scribbled on it), sleep() returns at once and nothing is lost.
  compare_exchange(*word_, seen, armed_);
  // The caller's next look at its rings comes after the bit is visible.
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

DoorbellWaiter::Wake DoorbellWaiter::sleep(std::uint32_t timeout_us) {
  const timespec timeout{static_cast<time_t>(timeout_us / 1000000), static_cast<long>(timeout_us % 1000000) * 1000};
  const long rc = futex(word_, FUTEX_WAIT, armed_, &timeout);
  const int error = rc == 0 ? 0 : errno;
  cancel();
  if (rc == 0 || error == EAGAIN || error == EINTR) return Wake::Woken;
  if (error == ETIMEDOUT) return Wake::TimedOut;
  return Wake::Failed;
}

void DoorbellWaiter::cancel() {
  std::uint32_t expected = armed_;
  compare_exchange(*word_, expected, static_cast<std::uint32_t>(armed_ & ~kDoorbellSleeping));
}

}  // namespace cbd
