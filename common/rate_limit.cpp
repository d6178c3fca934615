#include "common/rate_limit.hpp"

namespace cbd {

bool RateLimit::allow_at(std::chrono::steady_clock::time_point now, std::uint64_t* suppressed) {
  const std::int64_t now_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count();
  std::int64_t next = next_allowed_ns_.load(std::memory_order_relaxed);
  // Only one of several threads racing past the deadline wins the exchange;
  // the others count as suppressed.
  if (now_ns < next ||
      !next_allowed_ns_.compare_exchange_strong(
          next, now_ns + std::chrono::duration_cast<std::chrono::nanoseconds>(interval_).count())) {
    suppressed_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  const std::uint64_t dropped = suppressed_.exchange(0, std::memory_order_relaxed);
  if (suppressed) *suppressed = dropped;
  return true;
}

}  // namespace cbd
