// The handler side of one channel (design §1): takes submission entries
// from the channel's submission ring, validates every field (design §3.6),
// executes them against the store through the handler thread's StoreQueue,
// and posts completion entries.
//
// Nothing read from the channel is trusted: an entry is copied out of the
// ring before it is checked, and a bad entry only ever earns an error
// completion.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "common/channel.hpp"
#include "common/layout.hpp"
#include "common/log.hpp"
#include "common/unique_fd.hpp"
#include "plugin/backend_fence.hpp"
#include "plugin/store.hpp"

namespace cbd::backend {

// What the backend published in its slot: the bounds entries are checked
// against.
struct ExportLimits {
  std::uint64_t size = 0;
  std::uint32_t block_max = 0;  // largest read/write length of one entry
  bool read_only = false;
};

struct Validation {
  int error = 0;                 // 0: execute the entry; else the status of its completion
  const char* reason = "";       // why it was refused (for the log)
  std::byte* data = nullptr;     // the entry's data extent (read, write, block status)
};

// Checks an entry copied out of the submission ring.  Never touches memory:
// it only computes whether the data extent lies inside the channel's data
// area.
Validation validate(const SubmissionEntry& entry, const ExportLimits& limits, const Channel& channel);

// The largest read/write a channel with this data area can carry in one
// entry, as published in BackendSlot::block_max.
std::uint32_t block_max_for(std::uint64_t data_size);

class ChannelHandler;

// A request handed to the store, remembered until the store finishes it.
struct InFlight {
  ChannelHandler* channel = nullptr;
  std::uint64_t generation = 0;  // of the channel when the entry was taken
  std::uint64_t tag = 0;
  Op op = Op::Read;
  std::byte* data = nullptr;
  std::uint32_t length = 0;
};

// Fixed-size table of in-flight requests of one handler thread; the index is
// the StoreRequest's user_data.
class InFlightTable {
 public:
  explicit InFlightTable(unsigned capacity);
  bool full() const { return free_.empty(); }
  unsigned room() const { return static_cast<unsigned>(free_.size()); }
  unsigned size() const { return static_cast<unsigned>(entries_.size() - free_.size()); }
  std::uint32_t add(const InFlight& request);
  // Removes and returns the request; a channel of nullptr for an index that
  // is not in flight.
  InFlight take(std::uint64_t index);
  // The request at `index`, or nullptr when none is in flight there.
  const InFlight* peek(std::uint64_t index) const {
    return index < entries_.size() && busy_[index] ? &entries_[index] : nullptr;
  }

 private:
  std::vector<InFlight> entries_;
  std::vector<bool> busy_;
  std::vector<std::uint32_t> free_;
};

class ChannelHandler {
 public:
  // `fence` answers whether our backend slot is still ours; it outlives the
  // handler.
  ChannelHandler(const Transport& transport, std::uint32_t index, Store& store, const ExportLimits& limits,
                 const BackendFence& fence);
  ChannelHandler(const ChannelHandler&) = delete;
  ChannelHandler& operator=(const ChannelHandler&) = delete;

  std::uint32_t index() const { return channel_.index(); }
  const Channel& channel() const { return channel_; }
  bool serving() const { return serving_; }
  // True while this channel still serves `generation` for us (fence and
  // generation checked, as before any write to the channel): a store
  // request taken in that generation is still wanted.
  bool serves(std::uint64_t generation) { return serving_ && generation == generation_ && still_ours(); }
  // The generation we last attached to (0: never).
  std::uint64_t generation() const { return generation_; }
  // Store requests of this channel not yet finished (any generation).
  unsigned in_flight() const { return in_flight_; }
  // Completions that did not fit in the completion ring yet.
  bool has_unposted() const { return !overflow_.empty(); }
  // How many: never more than the completion ring holds (take_entries
  // keeps in flight + unposted below that).
  std::size_t unposted() const { return overflow_.size(); }
  // A write whose data checksum did not match waits for its next re-check.
  bool rechecking() const { return recheck_.has_value(); }

  // Entries wait in the submission ring (whether or not they can be taken
  // now): the thread must not sleep on its doorbell.
  // A broken ring (impossible producer index) counts as empty.
  bool has_submissions() { return serving_ && !broken_ && submissions_.available() > 0; }
  // The queue side was told our doorbell at attach.
  bool named_doorbell() const { return doorbell_ != 0; }
  // The queue loop's wake socket (docs/design.md, Polling and doorbells):
  // wanted by a channel served on our kernel that has none yet.
  bool wants_queue_wake() const { return serving_ && doorbell_ != 0 && !queue_wake_; }
  // From now on, after each publish, wake the loop while it says it sleeps.
  void set_queue_wake(UniqueFd socket);

  // Step 2 of the attach protocol, then serve `generation`.  `doorbell`:
  // the word the thread sleeps on, as handler_attach() takes it.
  void attach(std::uint64_t generation, std::uint64_t backend_epoch, std::uint32_t doorbell = 0);
  // Stop serving: no more entries are taken, and completions of requests
  // still in flight are dropped (they belong to a generation nobody waits
  // for any more).
  void detach();

  // Takes up to `budget` entries: each one completes at once (invalid,
  // block status, zero-length), goes to `queue`, or (a write whose data
  // checksum is wrong) waits for a re-check, and the channel with it.
  // Returns how many.
  // Fenced (docs/design.md §4): before the ring's slots are handed back and
  // before each entry reaches the store, the backend slot and the channel's
  // generation are checked again; if either moved on, the entries taken are
  // dropped (neither executed nor completed) and the channel is detached.
  // An entry stamped with another generation is dropped alone.
  unsigned take_entries(StoreQueue& queue, InFlightTable& table, unsigned budget);
  // Fails entries waiting in the submission ring with `status` (used when
  // the backend stops), at most one ring's worth since attach in all, and
  // only while the completion ring has room: a queue side that keeps
  // producing cannot hold the stop.  Returns how many.
  unsigned fail_waiting(int status);
  // A store request of this channel finished.
  void finish(const InFlight& request, int error);
  // Makes staged completions visible to the queue side.  Returns true if
  // anything was posted.
  bool publish();
  // Bumps handler_heartbeat when `interval` has passed since the last bump.
  void heartbeat(std::chrono::steady_clock::time_point now, std::chrono::milliseconds interval);

 private:
  // The fence check before every write to the channel and every entry
  // handed to the store: our backend slot is still ours and the channel is
  // still at the generation we attached to.  Detaches when not.
  bool still_ours();
  // A write parked for a data checksum re-check (design §7).
  struct Recheck {
    SubmissionEntry entry;
    std::byte* data = nullptr;
    unsigned attempts = 0;  // re-checks done so far
    std::chrono::steady_clock::time_point due{};
  };

  void start(const SubmissionEntry& entry, StoreQueue& queue, InFlightTable& table);
  void enqueue(const SubmissionEntry& entry, std::byte* data, StoreRequest request, StoreQueue& queue,
               InFlightTable& table);
  // One checksum pass over a write's data; parks it (or schedules its next
  // re-check) when the pass fails.  True when the data matched.
  bool check_write(const SubmissionEntry& entry, std::byte* data, unsigned attempts);
  // The parked write's next pass (it is due): on a match the write goes to
  // the store and the channel takes entries again.
  void resume_recheck(StoreQueue& queue, InFlightTable& table);
  // Completions this channel owes: in flight, unposted, parked.
  std::size_t outstanding() const;
  void block_status(const SubmissionEntry& entry, std::byte* data);
  void complete(std::uint64_t tag, int status, std::uint32_t result_length = 0, std::uint32_t data_crc = 0);

  // Entries popped in one take_entries() call, before the fence check.
  struct Taken {
    SubmissionEntry entry;
    bool corrupt;
  };

  Channel channel_;
  Store& store_;
  const BackendFence& fence_;
  ExportLimits limits_;
  RingConsumer<SubmissionEntry> submissions_;
  std::uint32_t doorbell_ = 0;  // as given to attach()
  UniqueFd queue_wake_;         // the queue loop's wake socket, for this generation
  RingProducer<CompletionEntry> completions_;
  bool serving_ = false;
  bool broken_ = false;  // the submission ring's indices are impossible: wait for a new generation
  std::chrono::steady_clock::time_point broken_since_{};  // first impossible index seen ({}: none)
  std::uint64_t generation_ = 0;
  unsigned in_flight_ = 0;
  std::deque<CompletionEntry> overflow_;  // never dropped while serving; at most the completion ring's capacity
  std::optional<Recheck> recheck_;
  std::uint32_t failed_at_stop_ = 0;  // entries fail_waiting() took since attach
  std::uint64_t completed_since_publish_ = 0;
  std::uint64_t errors_since_publish_ = 0;
  bool staged_ = false;
  std::chrono::steady_clock::time_point last_beat_{};
  RateLimit bad_entry_limit_;
  RateLimit broken_limit_;
  RateLimit fenced_limit_;
  RateLimit stale_entry_limit_;
  RateLimit attach_limit_;  // a queue side may set its channel up again as often as it likes
  std::vector<Taken> batch_;
};

}  // namespace cbd::backend
