#include "common/spin_yield.hpp"

#include <sched.h>

namespace cbd {

bool SpinYield::yield() {
  const Clock::time_point before = Clock::now();
  ::sched_yield();
  return account(before, Clock::now());
}

bool SpinYield::account(Clock::time_point before, Clock::time_point after) {
  if (after - before <= kYieldOverrun) return true;
  // From the end of the last long yield to the start of this one: a hog's
  // slice may be longer than the window itself (cgroup throttling, steal).
  const bool again = last_overrun_ != Clock::time_point{} && before - last_overrun_ <= kOverrunWindow;
  last_overrun_ = after;
  if (!again) return true;
  ++spins_stopped_;
  spin_off_until_ = after + kSpinOff;
  return false;
}

}  // namespace cbd
