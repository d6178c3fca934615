#include "common/liveness.hpp"

#include "common/flush_ranges.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"

namespace cbd {

const char* liveness_name(Liveness liveness) {
  switch (liveness) {
    case Liveness::Free: return "free";
    case Liveness::Alive: return "alive";
    case Liveness::Dead: return "dead";
  }
  return "?";
}

Liveness LivenessObserver::observe(std::uint64_t key, const SlotHeader& header, Clock::time_point now) {
  refresh_lines(&header, sizeof header);  // flush mode: read the heartbeat from memory
  std::uint64_t word = load_acquire(header.state);
  std::uint64_t heartbeat = load_acquire(header.heartbeat);
  auto [it, inserted] = samples_.try_emplace(key, Sample{word, heartbeat, now});
  Sample& sample = it->second;
  if (!inserted && (sample.word != word || sample.heartbeat != heartbeat)) sample = {word, heartbeat, now};
  if (state_of(word) == SlotState::Free) return Liveness::Free;
  return now - sample.changed >= dead_after_ ? Liveness::Dead : Liveness::Alive;
}

std::uint64_t LivenessObserver::last_word(std::uint64_t key) const {
  auto it = samples_.find(key);
  return it == samples_.end() ? 0 : it->second.word;
}

}  // namespace cbd
