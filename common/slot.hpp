// Slot ownership without a distributed lock (design §3.4).
//
// A slot's state word is epoch << 8 | SlotState.  Claiming is one CAS from
// (e, Free) to (e + 1, Live); releasing is a CAS from the claimed word to
// (e + 1, Free).  Because each transition changes the word, a former owner
// (or a reclaimer acting on a stale view) can never succeed against a slot
// that has since changed hands.
#pragma once

#include <cstdint>
#include <optional>
#include <unistd.h>

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
// Owner → Free.  False if the slot is no longer ours.
bool release(SlotHeader& header, std::uint64_t claimed_word);
// Owner → Stopping (clean shutdown in progress).  Updates `claimed_word`.
bool mark_stopping(SlotHeader& header, std::uint64_t& claimed_word);
// Observer: frees a slot whose owner is dead, if its word is still `seen`.
bool reclaim(SlotHeader& header, std::uint64_t seen);
inline void beat(SlotHeader& header) { add_relaxed(header.heartbeat, std::uint64_t{1}); }
inline bool still_owned(const SlotHeader& header, std::uint64_t claimed_word) {
  return load_acquire(header.state) == claimed_word;
}

// RAII ownership of one slot: released by the destructor unless the slot was
// lost to a reclaimer meanwhile.
class SlotClaim {
 public:
  SlotClaim() = default;
  SlotClaim(SlotHeader* header, std::uint32_t index, std::uint64_t word) : header_(header), index_(index), word_(word) {}
  SlotClaim(SlotClaim&& other) noexcept { *this = std::move(other); }
  SlotClaim& operator=(SlotClaim&& other) noexcept {
    if (this != &other) {
      reset();
      header_ = other.header_;
      index_ = other.index_;
      word_ = other.word_;
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
  bool owned() const { return header_ && still_owned(*header_, word_); }
  void beat() const {
    if (header_) cbd::beat(*header_);
  }
  bool stopping() { return header_ && mark_stopping(*header_, word_); }
  void reset() {
    if (header_) release(*header_, word_);
    header_ = nullptr;
  }

 private:
  SlotHeader* header_ = nullptr;
  std::uint32_t index_ = 0;
  std::uint64_t word_ = 0;
};

}  // namespace cbd
