#include "common/slot.hpp"

namespace cbd {

const char* slot_state_name(SlotState state) {
  switch (state) {
    case SlotState::Free: return "free";
    case SlotState::Live: return "live";
    case SlotState::Stopping: return "stopping";
  }
  return "corrupt";
}

namespace {
void stamp_owner(SlotHeader& header, std::uint32_t owner_host) {
  store_relaxed(header.owner_host, owner_host);
  store_relaxed(header.owner_pid, static_cast<std::uint32_t>(::getpid()));
}
}  // namespace

std::optional<std::uint64_t> try_claim(SlotHeader& header, std::uint32_t owner_host) {
  refresh_lines(&header, sizeof header);
  std::uint64_t seen = load_acquire(header.state);
  if (state_of(seen) != SlotState::Free) return std::nullopt;
  return try_take_over(header, seen, owner_host);
}

std::optional<std::uint64_t> try_take_over(SlotHeader& header, std::uint64_t expected, std::uint32_t owner_host) {
  std::uint64_t claimed = make_state_word(epoch_of(expected) + 1, SlotState::Live);
  if (!compare_exchange(header.state, expected, claimed)) return std::nullopt;
  stamp_owner(header, owner_host);
  // A fresh heartbeat: it both shows the new owner alive to observers (the
  // value changed) and fences the former owner, whose next fenced beat()
  // expects the value it wrote last.
  store_release(header.heartbeat, initial_heartbeat(claimed));
  publish_lines(&header, sizeof header);
  return claimed;
}

bool beat(SlotHeader& header, std::uint64_t claimed_word, std::uint64_t& last) {
  refresh_lines(&header, sizeof header);
  if (load_acquire(header.state) != claimed_word) return false;
  std::uint64_t expected = last;
  if (!compare_exchange(header.heartbeat, expected, last + 1)) return false;
  publish_lines(&header, sizeof header);
  last += 1;
  return true;
}

bool release(SlotHeader& header, std::uint64_t claimed_word) {
  std::uint64_t expected = claimed_word;
  refresh_lines(&header, sizeof header);
  const bool released =
      compare_exchange(header.state, expected, make_state_word(epoch_of(claimed_word) + 1, SlotState::Free));
  if (released) publish_lines(&header, sizeof header);
  return released;
}

bool mark_stopping(SlotHeader& header, std::uint64_t& claimed_word) {
  std::uint64_t expected = claimed_word;
  std::uint64_t stopping = make_state_word(epoch_of(claimed_word), SlotState::Stopping);
  refresh_lines(&header, sizeof header);
  if (!compare_exchange(header.state, expected, stopping)) return false;
  publish_lines(&header, sizeof header);
  claimed_word = stopping;
  return true;
}

bool reclaim(SlotHeader& header, std::uint64_t seen) {
  if (state_of(seen) == SlotState::Free) return false;
  refresh_lines(&header, sizeof header);
  if (!compare_exchange(header.state, seen, make_state_word(epoch_of(seen) + 1, SlotState::Free))) return false;
  publish_lines(&header, sizeof header);
  return true;
}

}  // namespace cbd
