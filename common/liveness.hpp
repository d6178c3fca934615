// Liveness without synchronised clocks (design §3.5).  Owners bump a counter;
// an observer remembers when, on its own monotonic clock, it last saw the
// counter or the state word change.  Wall-clock time never enters into it, so
// hosts whose clocks disagree still agree on who is alive.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>

#include "common/layout.hpp"

namespace cbd {

enum class Liveness {
  Free,     // the slot is not owned
  Alive,    // owned and the heartbeat moved within the timeout (or not yet observed long enough)
  Dead,     // owned and nothing moved for the whole timeout
};
const char* liveness_name(Liveness liveness);

class LivenessObserver {
 public:
  using Clock = std::chrono::steady_clock;
  explicit LivenessObserver(std::chrono::milliseconds dead_after) : dead_after_(dead_after) {}

  // `key` identifies the slot across calls (e.g. area << 32 | index).  A slot
  // seen for the first time counts as alive until a full timeout passes.
  Liveness observe(std::uint64_t key, const SlotHeader& header, Clock::time_point now = Clock::now());
  // The state word seen by the last observe() of `key`, to reclaim with.
  std::uint64_t last_word(std::uint64_t key) const;

 private:
  struct Sample {
    std::uint64_t word;
    std::uint64_t heartbeat;
    Clock::time_point changed;
  };
  std::chrono::milliseconds dead_after_;
  std::map<std::uint64_t, Sample> samples_;
};

}  // namespace cbd
