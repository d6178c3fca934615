// The yield a spin makes on each pass (docs/design.md, Polling and
// doorbells), and the guard that ends spinning when yields cost a slice.
//
// A spinning thread yields so that the client or the handler it waits for
// can run on a busy core.  When the thread that runs instead is an
// unrelated CPU hog, the yield returns only after the hog's scheduler slice
// (milliseconds): a completion that arrives meanwhile waits for it, and the
// spin's next yield loses another.  A sleep is better then: the handler's
// wake (or the sleep's timer) makes the thread runnable as a woken task,
// which the scheduler lets preempt the hog.
//
// One long yield proves little: a kernel worker or the hypervisor can take
// the CPU for a tick now and then (measured: a few times a second, 2.5-4 ms
// each, with nothing else running).  A hog makes every yield it gets long,
// though quick ones (to the client) can come between.  So spins are turned
// off, for kSpinOff, when a yield takes longer than kYieldOverrun and starts
// within kOverrunWindow of the end of the last one that did.
#pragma once

#include <chrono>

namespace cbd {

class SpinYield {
 public:
  using Clock = std::chrono::steady_clock;

  // Well above what the client's or a handler's burst of work takes before
  // it blocks again, well below a slice of a thread that never blocks.
  static constexpr std::chrono::microseconds kYieldOverrun{300};
  static constexpr std::chrono::milliseconds kOverrunWindow{20};
  static constexpr std::chrono::milliseconds kSpinOff{100};

  // Whether a spin may go on at `now` (false for a while after overruns).
  bool spin_allowed(Clock::time_point now) const { return now >= spin_off_until_; }

  // Gives the CPU to any thread waiting for it.  Returns false when this
  // yield turned spinning off (see above).
  bool yield();

  // The rule alone: a yield ran from `before` to `after`.  Returns false
  // when that turned spinning off.
  bool account(Clock::time_point before, Clock::time_point after);

  // How many times spinning was turned off since construction.
  unsigned long spins_stopped() const { return spins_stopped_; }

 private:
  Clock::time_point spin_off_until_{};
  Clock::time_point last_overrun_{};  // none yet: the clock's epoch
  unsigned long spins_stopped_ = 0;
};

}  // namespace cbd
