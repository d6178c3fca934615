// Whether this backend instance still owns its backend slot (docs/design.md
// §4, "Fencing").  Every handler asks it before it hands an entry to the
// store and before it writes anything to a channel; the backend service
// trips it for good when its fenced heartbeat finds the slot taken over.
#pragma once

#include <atomic>
#include <cstdint>

#include "common/cache_lines.hpp"
#include "common/layout.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

namespace cbd::backend {

class BackendFence {
 public:
  // Arms the fence for our claim of `header` at `epoch` (before any handler
  // thread starts).
  void arm(const SlotHeader& header, std::uint64_t epoch, MemoryMode mode) {
    header_ = &header;
    epoch_ = epoch;
    mode_ = mode;
    lost_.store(false, std::memory_order_release);
  }
  // The slot was taken over: holds() is false from now on.
  void lose() const { lost_.store(true, std::memory_order_release); }
  bool lost() const { return lost_.load(std::memory_order_acquire); }

  // True while the slot's state word still carries our epoch, Live or
  // Stopping (our own clean stop keeps the epoch; a take-over or a release
  // bumps it).  Latches: once false, false for good, even if a scribbler
  // wrote our word back.
  bool holds() const {
    if (!header_ || lost()) return false;
    if (mode_.flush) invalidate_lines(&header_->state, sizeof header_->state);
    const std::uint64_t word = load_acquire(header_->state);
    const SlotState state = state_of(word);
    if (epoch_of(word) == epoch_ && (state == SlotState::Live || state == SlotState::Stopping)) return true;
    lose();
    return false;
  }

 private:
  const SlotHeader* header_ = nullptr;
  std::uint64_t epoch_ = 0;
  MemoryMode mode_{};
  mutable std::atomic<bool> lost_{true};  // nothing is held until arm()
};

}  // namespace cbd::backend
