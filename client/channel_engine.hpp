// The queue side of one channel as a single-threaded engine: entry table,
// data extents, ring generations, attach, re-drive, quarantine and fencing
// (docs/design.md, "Channel attach, re-initialisation and re-drive" and
// "Fencing").  It knows nothing of NBD: its caller (the queue event loop)
// reserves entries, fills them in cbd terms (Op, kFlag*), submits them and
// consumes their completions.  Only the thread that owns the queue calls it:
// no lock anywhere.
//
// Invariants (docs/design.md §5):
//  - An entry is in at most one ring generation at a time: Waiting (not in
//    any ring, pushed at the next attach), Pushed (in the ring of
//    `generation_`), or neither (Reserved: its payload is still arriving;
//    Completed: its result waits for its owner).
//  - A set-up moves every Pushed entry back to Waiting; attaching pushes every
//    Waiting entry exactly once.  A Reserved entry is never pushed by a
//    set-up, only by its own submit().
//  - A completion is accepted only when its generation is the current one
//    and its tag names a Pushed entry of the same serial.
//  - An extent that an older backend instance may still touch (its entry
//    was pushed in more than one generation, or was abandoned while pushed)
//    is quarantined for `quarantine_` after its entry ends, then reused.
//  - Nothing is written to the control block or the rings unless the channel
//    claim is still ours; once it is lost the engine never writes again.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <vector>

#include "common/channel.hpp"
#include "common/data_area.hpp"
#include "common/slot.hpp"

namespace cbd::proxy {

struct Binding {
  std::uint32_t backend_id = 0;
  std::uint32_t blkdev_id = 0;
  std::uint64_t backend_epoch = 0;
};

// One finished entry, as reported by ChannelEngine::reap().
struct EngineCompletion {
  std::uint32_t slot = 0;
  std::uint64_t owner = 0;         // what reserve() was given
  int status = 0;                  // 0 or a positive errno
  std::uint32_t result_length = 0;
  std::uint32_t result_crc = 0;
};

class ChannelEngine {
 public:
  using Clock = std::chrono::steady_clock;

  ChannelEngine(const Transport& transport, SlotClaim claim);
  ChannelEngine(const ChannelEngine&) = delete;
  ChannelEngine& operator=(const ChannelEngine&) = delete;

  std::uint32_t index() const { return channel_.index(); }
  const Channel& channel() const { return channel_; }
  SlotClaim& claim() { return claim_; }
  std::uint32_t capacity() const { return static_cast<std::uint32_t>(entries_.size()); }
  std::uint64_t data_size() const { return allocator_.size(); }
  // The largest data extent of one entry: a quarter of the data area keeps
  // several pieces of a large request in flight.
  std::uint32_t max_piece() const { return max_piece_; }
  std::uint32_t free_entries() const { return static_cast<std::uint32_t>(free_slots_.size()); }
  std::size_t in_flight() const { return in_flight_; }
  // Entries not yet completed (Reserved, Waiting or Pushed).
  std::size_t outstanding() const { return outstanding_; }
  std::uint64_t generation() const { return generation_; }
  bool attached() const { return attached_; }

  // The queue loop's wake-up (docs/design.md, Polling and doorbells).
  // `socket`: the end of the loop's wake socket pair handed to the backend
  // at every set-up (-1: none).
  void set_wake_socket(int socket) { wake_socket_ = socket; }
  // The attached handler wakes us after it publishes completions.
  bool handler_wakes() const;
  // Before a wait that a wake ends early: sets the sleeping flag, then
  // looks at the completion ring once more.  Asleep: wait, then
  // end_sleep().  WorkWaiting: completions came meanwhile (no flag left).
  // CannotSleep: nobody would wake us.
  enum class Sleep { Asleep, WorkWaiting, CannotSleep };
  Sleep begin_sleep();
  void end_sleep();

  int failing() const { return failing_; }
  // The channel was taken from us (we were judged dead): nothing more is
  // written to it.  The caller moves the outstanding entries to a new
  // channel with adopt_outstanding().
  bool lost() const { return lost_; }
  std::chrono::milliseconds quarantine() const { return quarantine_; }
  void set_quarantine(std::chrono::milliseconds duration) { quarantine_ = duration; }

  // Reserves an entry slot and, when `data_length` > 0 or `needs_extent`, a
  // data extent.  nullopt when no slot or no room is free now.
  std::optional<std::uint32_t> reserve(std::uint32_t data_length, bool needs_extent, std::uint64_t owner);
  // The entry's submission fields (op, flags, offset, length, data_length are
  // the caller's to fill between reserve() and submit()).
  SubmissionEntry& submission(std::uint32_t slot) { return entries_[slot].submission; }
  // The bytes of the entry's data extent.
  std::byte* extent(std::uint32_t slot) const;
  // Whether a completed READ's data in its extent may be sent.  Pending: not
  // now — the channel is not ours any more (its data area belongs to
  // whoever claimed it), or the data is being read again after the channel
  // was lost (adopt_outstanding()); ask again later.  Lost: it could not be
  // read again, or the channel is lost and the engine failed everything
  // (nothing will replace it); what was promised cannot be delivered.
  enum class DataState { Ready, Pending, Lost };
  DataState data_state(std::uint32_t slot);
  // The same, to write into (a WRITE payload): nullptr once the channel is
  // not ours, since its data area then belongs to another compute node.
  std::byte* writable_extent(std::uint32_t slot);
  // A WRITE's payload arrived in [extent + from, extent + from + length):
  // folds it into the entry's payload checksum (used to move the entry to
  // another channel if this one is lost).
  void payload_received(std::uint32_t slot, std::uint32_t from, std::uint32_t length);
  // Hands the entry over: staged into the ring when attached (publish()
  // makes a batch visible), held for the next attach otherwise, or completed
  // with the failing errno (reported by the next reap()).
  void submit(std::uint32_t slot);
  // Makes every staged entry visible with one index store.
  void publish();
  // Consumes up to `max` completions (and failures decided locally); calls
  // `on_complete(const EngineCompletion&)` for each.  Returns how many.
  template <typename F>
  std::size_t reap(F&& on_complete, std::size_t max = 256);
  // The owner is done with a completed entry: frees its slot and its extent
  // (or quarantines the extent).
  void release(std::uint32_t slot);
  // Releases quarantined extents whose time has come.
  void expire_quarantine(Clock::time_point now);

  // Step 1 of the attach protocol with a new generation, for `binding` (or
  // the current one): every Pushed entry goes back to Waiting.  False when
  // the claim is lost (nothing was written).
  bool begin_setup(std::optional<Binding> binding = std::nullopt);
  // Step 3: true once the handler serves our generation; then every Waiting
  // entry is pushed (once) and published.
  bool poll_attached();
  bool setting_up() const { return setting_up_; }
  // The backend is gone for good: every Waiting or Pushed entry completes
  // with `error` (their extents quarantined), Reserved ones complete with it
  // when submitted, and so do new entries until the next successful attach.
  void fail_outstanding(int error);
  // True when the completion ring's producer index has been impossible
  // since the last reap (a corrupt control block; the caller sets up again).
  bool ring_broken() const { return broken_; }
  // True when an entry waits outside the ring while attached: the ring
  // refused it (a consumer index that lies; publish() tries it again), or a
  // stopping handler handed it back (ESHUTDOWN; only a set-up pushes it).
  // Until the next begin_setup().  The queue loop counts such entries as in
  // flight for its stall timeout: nothing else would end their wait.
  bool parked() const { return !refused_.empty() || handed_back_; }
  Clock::time_point last_progress() const { return last_progress_; }

  // Moves every outstanding entry of `old` (whose channel was lost) into the
  // same slots here, on fresh extents: WRITE payloads are copied from the
  // old data area and their checksum verified; a payload that changed (the
  // new owner of that channel wrote over it) completes with EIO.  Reserved
  // entries stay Reserved (their payload continues into the new extent).
  // A completed READ whose owner still holds its data is read again into
  // the fresh extent (a *refill*: its owner already has its completion and
  // gets none more; data_state() says when the bytes are back), unless
  // checksum mode proves the old bytes unchanged.  Failures decided locally
  // and not yet reaped there are reaped here.
  void adopt_outstanding(ChannelEngine& old);
  // Checks the claim; marks the engine lost (and logs once) when it is not ours.
  bool still_ours();
  std::uint32_t* find_doorbell() const;

 private:
  enum class State : std::uint8_t { Free, Reserved, Waiting, Pushed, Completed };
  struct Entry {
    State state = State::Free;
    std::uint64_t serial = 0;
    std::uint64_t owner = 0;
    SubmissionEntry submission{};
    bool has_extent = false;
    bool quarantine_extent = false;  // an older backend instance may still touch it
    // Refill: Completed for its owner (who got its completion), but Waiting
    // or Pushed here while its READ runs again into this extent.
    bool refill = false;
    bool owner_done = false;         // released by its owner during a refill: freed when it ends
    bool data_lost = false;          // a refill that failed
    std::uint32_t generations = 0;   // ring generations it was pushed into
    std::uint32_t payload_crc = 0;   // CRC32C of the payload received so far
    std::uint32_t payload_length = 0;
    // Result, once Completed.
    int status = 0;
    std::uint32_t result_length = 0;
    std::uint32_t result_crc = 0;
  };
  struct Quarantined {
    std::uint32_t offset;
    Clock::time_point until;
  };

  std::uint64_t tag_of(std::uint32_t slot) const;
  bool stage(std::uint32_t slot);
  void complete_locally(std::uint32_t slot, int error);
  bool accept(const CompletionEntry& completion, std::uint32_t& slot);
  void update_in_flight_counter();
  void fail_adopted(std::uint32_t slot, int error);
  // A refill ended (its completion arrived, or the engine failed it): the
  // entry is Completed again, its data back or lost.
  void end_refill(std::uint32_t slot, bool data_back);

  Channel channel_;
  const Transport& transport_;
  SlotClaim claim_;
  DataAreaAllocator allocator_;
  RingProducer<SubmissionEntry> submissions_;
  RingConsumer<CompletionEntry> completions_;
  std::vector<Entry> entries_;
  std::vector<std::uint32_t> free_slots_;
  std::vector<std::uint32_t> local_completions_;  // completed here (failures), reported by reap()
  std::vector<Quarantined> quarantined_;
  std::uint32_t max_piece_ = 4096;
  std::uint64_t next_serial_ = 1;
  Binding binding_{};
  // The word the attached handler sleeps on (docs/design.md, Doorbells),
  // rung after each publish; null when it named none, or none we can reach.
  std::uint32_t* doorbell_ = nullptr;
  int wake_socket_ = -1;
  bool sleeping_ = false;  // our queue_sleeping flag is set
  std::uint64_t generation_ = 0;
  std::size_t in_flight_ = 0;     // Pushed
  std::size_t outstanding_ = 0;   // Reserved + Waiting + Pushed
  std::size_t staged_ = 0;        // staged since the last publish
  bool attached_ = false;
  bool setting_up_ = false;
  bool lost_ = false;
  bool broken_ = false;
  std::vector<std::uint32_t> refused_;  // Waiting slots the ring refused, in order
  bool handed_back_ = false;            // an ESHUTDOWN put an entry back to Waiting
  int failing_ = 0;
  std::chrono::milliseconds quarantine_{4000};
  Clock::time_point last_progress_ = Clock::now();
};

// A completion's status is a peer's word: anything that is not a plausible
// errno becomes EIO.
inline int sane_status(std::int32_t status) { return status >= 0 && status < 4096 ? status : 5 /* EIO */; }

template <typename F>
std::size_t ChannelEngine::reap(F&& on_complete, std::size_t max) {
  std::size_t done = 0;
  // Failures decided here first: they need no ring.
  while (!local_completions_.empty() && done < max) {
    std::uint32_t slot = local_completions_.back();
    local_completions_.pop_back();
    const Entry& entry = entries_[slot];
    on_complete(EngineCompletion{slot, entry.owner, entry.status, 0, 0});
    ++done;
  }
  if (!attached_ || lost_ || in_flight_ == 0) return done;
  bool consumed = false;
  while (done < max) {
    CompletionEntry completion;
    PopStatus status = completions_.pop(completion);
    if (status == PopStatus::Empty) break;
    if (status == PopStatus::Broken) {
      broken_ = true;
      break;
    }
    consumed = true;
    broken_ = false;
    if (status == PopStatus::Corrupt) completion.status = 5;  // EIO; the tag is still checked
    std::uint32_t slot = 0;
    if (!accept(completion, slot)) continue;
    const Entry& entry = entries_[slot];
    on_complete(EngineCompletion{slot, entry.owner, entry.status, entry.result_length, entry.result_crc});
    ++done;
  }
  if (consumed) {
    if (still_ours()) completions_.release();
    update_in_flight_counter();
    last_progress_ = Clock::now();
  }
  return done;
}

}  // namespace cbd::proxy
