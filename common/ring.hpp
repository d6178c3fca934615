// Single-producer single-consumer rings in shared memory (design §3.3).
//
// Indices are free-running 32-bit counters masked on use, so wrapping past
// 2^32 needs no special case: head - tail is the fill level in modular
// arithmetic.  Producer and consumer indices sit on separate 64-byte lines.
// Each side keeps a private copy of its own index (it is the only writer) and
// a cached copy of the other side's, re-reading the shared one (acquire) only
// when the ring looks full or empty — the cache line then bounces only when
// it must.
//
// Entries are copied out of shared memory before they are checked, so a peer
// cannot change an entry between its validation and its use.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cache_lines.hpp"
#include "common/crc32c.hpp"
#include "common/layout.hpp"
#include "common/shared_atomic.hpp"
#include "common/transport.hpp"

namespace cbd {

// The entry checksum covers every byte before entry_crc, the last field.
template <typename Entry>
std::uint32_t entry_checksum(const Entry& entry) {
  return crc32c(0, &entry, offsetof(Entry, entry_crc));
}

enum class PopStatus {
  Empty,    // nothing to consume
  Ok,       // `out` holds a verified entry
  Corrupt,  // an entry was consumed but failed its checks; `out` is what was read (untrusted)
  Broken,   // the producer index is impossible (corrupt control block); nothing consumed
};

// How many times a consumer re-reads an entry whose checksum or sequence
// number does not match before declaring it corrupt (non-coherent memory can
// show a half-written line for a while).
inline constexpr int kChecksumRetries = 64;

template <typename Entry>
class RingProducer {
 public:
  RingProducer() = default;
  RingProducer(RingIndex* head, const RingIndex* tail, Entry* entries, std::uint32_t count, MemoryMode mode)
      : head_(head), tail_(tail), entries_(entries), mask_(count - 1), mode_(mode) {}

  // Restart from `start`, which must equal both shared indices (the channel
  // attach protocol sets them to 0; tests start near 2^32 to cross the wrap).
  void reset(std::uint32_t start = 0) { local_head_ = cached_tail_ = published_head_ = start; }
  std::uint32_t capacity() const { return mask_ + 1; }

  std::uint32_t free_slots() {
    std::uint32_t used = local_head_ - cached_tail_;
    if (used > mask_) {
      refresh_tail();
      used = local_head_ - cached_tail_;
      // A consumer index ahead of ours or more than a ring behind is a lie.
      if (used > capacity()) return 0;
    }
    return capacity() - used;
  }

  // Writes an entry without making it visible; publish() makes all staged
  // entries visible at once (batching saves cache-line traffic).
  bool stage(Entry entry) {
    if (free_slots() == 0) return false;
    entry.seq = local_head_;
    if (mode_.checksum) entry.entry_crc = entry_checksum(entry);
    Entry* slot = &entries_[local_head_ & mask_];
    std::memcpy(static_cast<void*>(slot), &entry, sizeof entry);
    if (mode_.flush) write_back_lines(slot, sizeof entry);
    ++local_head_;
    return true;
  }

  void publish() {
    if (published_head_ == local_head_) return;
    // Release: the consumer that sees the new head also sees the entries.
    store_release(head_->value, local_head_);
    if (mode_.flush) write_back_lines(&head_->value, sizeof head_->value);
    published_head_ = local_head_;
  }

  bool push(const Entry& entry) {
    if (!stage(entry)) return false;
    publish();
    return true;
  }

  // Entries published but not yet consumed, as last seen.
  std::uint32_t in_ring() {
    refresh_tail();
    return local_head_ - cached_tail_;
  }

 private:
  void refresh_tail() {
    if (mode_.flush) invalidate_lines(&tail_->value, sizeof tail_->value);
    cached_tail_ = load_acquire(tail_->value);
  }

  RingIndex* head_ = nullptr;
  const RingIndex* tail_ = nullptr;
  Entry* entries_ = nullptr;
  std::uint32_t mask_ = 0;
  MemoryMode mode_{};
  std::uint32_t local_head_ = 0;
  std::uint32_t published_head_ = 0;
  std::uint32_t cached_tail_ = 0;
};

template <typename Entry>
class RingConsumer {
 public:
  RingConsumer() = default;
  RingConsumer(const RingIndex* head, RingIndex* tail, const Entry* entries, std::uint32_t count, MemoryMode mode)
      : head_(head), tail_(tail), entries_(entries), mask_(count - 1), mode_(mode) {}

  void reset(std::uint32_t start = 0) { local_tail_ = cached_head_ = published_tail_ = start; }
  std::uint32_t capacity() const { return mask_ + 1; }

  // Entries available (re-reads the producer index when none are cached).
  std::uint32_t available() {
    if (local_tail_ == cached_head_) refresh_head();
    std::uint32_t level = cached_head_ - local_tail_;
    if (level > capacity()) {
      forget_head();
      return 0;
    }
    return level;
  }

  PopStatus pop(Entry& out) {
    if (local_tail_ == cached_head_) {
      refresh_head();
      if (local_tail_ == cached_head_) return PopStatus::Empty;
    }
    if (cached_head_ - local_tail_ > capacity()) {
      forget_head();
      return PopStatus::Broken;
    }
    const Entry* slot = &entries_[local_tail_ & mask_];
    // The sequence number is checked in every mode: in coherent memory an
    // entry whose seq is not its index was not written for this lap of the
    // ring (a stale index stored by a peer that was paused, say), so it is
    // never run as if it were.  Only the modes where a read can be stale
    // re-read it.
    const bool coherent = !mode_.checksum && !mode_.flush;
    bool verified = false;
    for (int attempt = 0; attempt <= (coherent ? 0 : kChecksumRetries); ++attempt) {
      if (mode_.flush) invalidate_lines(slot, sizeof(Entry));
      std::memcpy(static_cast<void*>(&out), slot, sizeof(Entry));
      bool checksum_ok = !mode_.checksum || entry_checksum(out) == out.entry_crc;
      if (checksum_ok && out.seq == local_tail_) {
        verified = true;
        break;
      }
    }
    ++local_tail_;
    return verified ? PopStatus::Ok : PopStatus::Corrupt;
  }

  // Hands consumed slots back to the producer.
  void release() {
    if (published_tail_ == local_tail_) return;
    store_release(tail_->value, local_tail_);
    if (mode_.flush) write_back_lines(&tail_->value, sizeof tail_->value);
    published_tail_ = local_tail_;
  }

 private:
  void refresh_head() {
    if (mode_.flush) invalidate_lines(&head_->value, sizeof head_->value);
    cached_head_ = load_acquire(head_->value);
  }
  // An impossible producer index is never kept: the next call reads the
  // shared one again, so the ring serves normally once the peer is honest.
  void forget_head() { cached_head_ = local_tail_; }

  const RingIndex* head_ = nullptr;
  RingIndex* tail_ = nullptr;
  const Entry* entries_ = nullptr;
  std::uint32_t mask_ = 0;
  MemoryMode mode_{};
  std::uint32_t local_tail_ = 0;
  std::uint32_t published_tail_ = 0;
  std::uint32_t cached_head_ = 0;
};

}  // namespace cbd
