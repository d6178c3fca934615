// Slot ownership without a distributed lock (design §3.4).
//
// A slot's state word is epoch << 8 | SlotState.  Claiming is one CAS from
// (e, Free) to (e + 1, Live); releasing is a CAS from the claimed word to
// (e + 1, Free).  Because each transition changes the word, a former owner
// (or a reclaimer acting on a stale view) can never succeed against a slot
// that has since changed hands.
//
// In flush mode (flush_ranges.hpp) every function here invalidates the
// header's line before it reads it and writes it back after it wrote it.
// The compare-and-swaps themselves still need memory that is coherent
// between hosts (docs/design.md §2, "Flush mode").
#pragma once

#include <cstdint>
#include <optional>
#include <unistd.h>

#include "common/flush_ranges.hpp"
#include "common/layout.hpp"
#include "common/shared_atomic.hpp"

namespace cbd {

constexpr std::uint64_t make_state_word(std::uint64_t epoch, SlotState state) {
  return (epoch << 8) | static_cast<std::uint8_t>(state);
}
constexpr std::uint64_t epoch_of(std::uint64_t word) { return word >> 8; }
constexpr SlotState state_of(std::uint64_t word) { return static_cast<SlotState>(word & 0xff); }
const char* slot_state_name(SlotState state);

// Tries once to claim a free slot; returns the new state word on success.
std::optional<std::uint64_t> try_claim(SlotHeader& header, std::uint32_t owner_host);
// Takes over a slot whatever its state (backend-id= restarts, reclaim of a
// dead owner).  `expected` is the word the caller judged dead or free; fails
// if the word changed since.
std::optional<std::uint64_t> try_take_over(SlotHeader& header, std::uint64_t expected, std::uint32_t owner_host);
// Fenced heartbeat (design §3.12, docs/design.md "Fencing"): bumps the
// heartbeat only while the state word is still `claimed_word` and the
// heartbeat still holds `last`, the value this owner wrote last (updated on
// success).  A claim stores a fresh heartbeat (see try_take_over), so an owner
// that lost its slot fails here even when it was paused between the two
// checks: the compare-and-swap on the heartbeat cannot succeed against a value
// the new owner wrote.  False when the slot is no longer ours.
bool beat(SlotHeader& header, std::uint64_t claimed_word, std::uint64_t& last);
// The heartbeat a claim with `claimed_word` starts from: the claim's epoch in
// the upper half, so no two owners of a slot ever share a heartbeat value.
constexpr std::uint64_t initial_heartbeat(std::uint64_t claimed_word) { return epoch_of(claimed_word) << 32; }
// Owner → Free.  False if the slot is no longer ours.
bool release(SlotHeader& header, std::uint64_t claimed_word);
// Owner → Stopping (clean shutdown in progress).  Updates `claimed_word`.
bool mark_stopping(SlotHeader& header, std::uint64_t& claimed_word);
// Observer: frees a slot whose owner is dead, if its word is still `seen`.
bool reclaim(SlotHeader& header, std::uint64_t seen);
inline bool still_owned(const SlotHeader& header, std::uint64_t claimed_word) {
  refresh_lines(&header, sizeof header);
  return load_acquire(header.state) == claimed_word;
}

// RAII ownership of one slot: released by the destructor unless the slot was
// lost to a reclaimer meanwhile.
class SlotClaim {
 public:
  SlotClaim() = default;
  // `word` is what try_claim()/try_take_over() returned for `header`.
  SlotClaim(SlotHeader* header, std::uint32_t index, std::uint64_t word)
      : header_(header), index_(index), word_(word), heartbeat_(initial_heartbeat(word)) {}
  SlotClaim(SlotClaim&& other) noexcept { *this = std::move(other); }
  SlotClaim& operator=(SlotClaim&& other) noexcept {
    if (this != &other) {
      reset();
      header_ = other.header_;
      index_ = other.index_;
      word_ = other.word_;
      heartbeat_ = other.heartbeat_;
      lost_ = other.lost_;
      other.header_ = nullptr;
    }
    return *this;
  }
  SlotClaim(const SlotClaim&) = delete;
  SlotClaim& operator=(const SlotClaim&) = delete;
  ~SlotClaim() { reset(); }

  explicit operator bool() const { return header_ != nullptr; }
  std::uint32_t index() const { return index_; }
  std::uint64_t word() const { return word_; }
  std::uint64_t epoch() const { return epoch_of(word_); }
  SlotHeader& header() const { return *header_; }
  bool owned() const { return header_ && !lost_ && still_owned(*header_, word_); }
  // Fenced heartbeat.  Once it fails the claim is lost for good: no further
  // write to the slot is attempted (the caller logs it once, on the false
  // returned the first time).
  bool beat() {
    if (!header_ || lost_) return false;
    if (cbd::beat(*header_, word_, heartbeat_)) return true;
    lost_ = true;
    return false;
  }
  bool lost() const { return lost_; }
  bool stopping() { return header_ && !lost_ && mark_stopping(*header_, word_); }
  void reset() {
    if (header_) release(*header_, word_);
    header_ = nullptr;
  }

 private:
  SlotHeader* header_ = nullptr;
  std::uint32_t index_ = 0;
  std::uint64_t word_ = 0;
  std::uint64_t heartbeat_ = 0;  // the value this owner last wrote to header_->heartbeat
  bool lost_ = false;            // a fenced write found the slot taken over
};

}  // namespace cbd
