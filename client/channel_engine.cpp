#include "client/channel_engine.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "common/crc32c.hpp"
#include "common/doorbell.hpp"
#include "common/flush_ranges.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/wake_socket.hpp"

namespace cbd::proxy {
namespace {

constexpr std::uint32_t kTagSlotBits = 20;
constexpr std::uint64_t kSerialMask = (std::uint64_t{1} << (64 - kTagSlotBits)) - 1;
// A turn that reads many requests publishes them this many at a time, so the
// handler starts on the first while the rest are still being received: with
// one publish per turn, queue loop and handler took turns idling at depth
// (docs/performance.md).
constexpr std::size_t kPublishEvery = 8;

RateLimit bad_completion_log;
// A backend that restarts or flaps decides how often channels are set up
// again and re-drive.
RateLimit redrive_log(std::chrono::seconds(10));

}  // namespace

ChannelEngine::ChannelEngine(const Transport& transport, SlotClaim claim)
    : channel_(transport, claim.index()),
      transport_(transport),
      claim_(std::move(claim)),
      allocator_(channel_.data_size()),
      submissions_(channel_.submission_producer()),
      completions_(channel_.completion_consumer()) {
  const auto& geometry = transport.superblock().channel;
  const std::uint32_t count = std::min({geometry.sq_entries, geometry.cq_entries, 1u << kTagSlotBits});
  entries_.resize(count);
  free_slots_.reserve(count);
  for (std::uint32_t i = count; i-- > 0;) free_slots_.push_back(i);
  local_completions_.reserve(count);
  const std::uint64_t piece = allocator_.size() / 4;
  max_piece_ = static_cast<std::uint32_t>(std::max<std::uint64_t>(piece & ~std::uint64_t{4095}, 4096));
  // An older backend instance is fenced within dead-after of its pause (it
  // stops at its next check); twice that, and at least a second, covers an
  // operation it had already handed to its store.
  quarantine_ = std::chrono::milliseconds(std::max<std::uint64_t>(1000, 2ull * transport.superblock().dead_after_ms));
  // A channel just claimed still holds its former owner's generation and
  // ring until our first set-up; a handler that attaches to that generation
  // meanwhile (it may never have served it) would execute the old entries
  // again, into extents we are about to reuse.  Empty the ring now: our
  // producer indices are ours to write from the claim on.
  if (claim_.owned()) {
    store_relaxed(channel_.control().cq_head.value, 0u);
    store_release(channel_.control().sq_head.value, 0u);
  }
}

std::uint64_t ChannelEngine::tag_of(std::uint32_t slot) const {
  return (entries_[slot].serial << kTagSlotBits) | slot;
}

bool ChannelEngine::still_ours() {
  if (lost_) return false;
  if (claim_.owned()) return true;
  lost_ = true;
  attached_ = false;
  log(LogLevel::Error,
      "channel %u: this channel was reclaimed (this process was judged dead, e.g. paused past dead-after); "
      "no longer writing to it — its %zu outstanding entries move to a new channel",
      index(), outstanding_);
  return false;
}

std::optional<std::uint32_t> ChannelEngine::reserve(std::uint32_t data_length, bool needs_extent,
                                                    std::uint64_t owner) {
  if (free_slots_.empty()) return std::nullopt;
  const bool with_extent = needs_extent || data_length > 0;
  std::optional<std::uint32_t> offset;
  if (with_extent) {
    offset = allocator_.allocate(data_length);
    if (!offset) return std::nullopt;
  }
  const std::uint32_t slot = free_slots_.back();
  free_slots_.pop_back();
  Entry& entry = entries_[slot];
  entry = Entry{};
  entry.state = State::Reserved;
  entry.serial = next_serial_++ & kSerialMask;
  entry.owner = owner;
  entry.has_extent = with_extent;
  entry.submission.data_offset = offset.value_or(0);
  entry.submission.data_length = with_extent ? data_length : 0;
  ++outstanding_;
  return slot;
}

std::byte* ChannelEngine::extent(std::uint32_t slot) const {
  const Entry& entry = entries_[slot];
  if (!entry.has_extent) return nullptr;
  return channel_.data(entry.submission.data_offset, entry.submission.data_length);
}

ChannelEngine::DataState ChannelEngine::data_state(std::uint32_t slot) {
  const Entry& entry = entries_[slot];
  if (entry.data_lost) return DataState::Lost;
  if (entry.refill) return DataState::Pending;  // end_refill() decides
  // Lost, and nothing will replace it (the engine failed everything): the
  // data is gone for good.
  if (lost_ || !still_ours()) return failing_ ? DataState::Lost : DataState::Pending;
  return DataState::Ready;
}

std::byte* ChannelEngine::writable_extent(std::uint32_t slot) {
  if (lost_ || !still_ours()) return nullptr;
  return extent(slot);
}

void ChannelEngine::payload_received(std::uint32_t slot, std::uint32_t from, std::uint32_t length) {
  Entry& entry = entries_[slot];
  std::byte* data = extent(slot);
  if (!data || from != entry.payload_length) return;
  entry.payload_crc = crc32c(entry.payload_crc, data + from, length);
  entry.payload_length += length;
}

void ChannelEngine::submit(std::uint32_t slot) {
  Entry& entry = entries_[slot];
  if (entry.state != State::Reserved) return;
  if (failing_ || entry.status) {
    complete_locally(slot, failing_ ? failing_ : entry.status);
    return;
  }
  entry.submission.tag = tag_of(slot);
  if (entry.submission.op == static_cast<std::uint16_t>(Op::Write) && entry.has_extent)
    entry.submission.data_crc = channel_.publish_data(extent(slot), entry.submission.length);
  entry.state = State::Waiting;
  if (attached_ && !setting_up_ && stage(slot) && staged_ >= kPublishEvery) publish();
}

bool ChannelEngine::stage(std::uint32_t slot) {
  Entry& entry = entries_[slot];
  if (!still_ours()) return false;
  entry.submission.generation = static_cast<std::uint32_t>(generation_);
  // A free entry slot guarantees ring space: entries in the ring are a
  // subset of the table, which is no larger than either ring.  A consumer
  // index that lies (corrupt control block) can still refuse: the entry then
  // waits for the set-up that a broken or stalled channel triggers.
  if (!submissions_.stage(entry.submission)) {
    if (std::find(refused_.begin(), refused_.end(), slot) == refused_.end()) refused_.push_back(slot);
    return false;
  }
  entry.state = State::Pushed;
  ++entry.generations;
  if (entry.generations > 1) entry.quarantine_extent = true;
  ++in_flight_;
  ++staged_;
  ChannelControl& control = channel_.control();
  add_relaxed(control.requests, std::uint64_t{1});
  add_relaxed(control.bytes, std::uint64_t{entry.submission.length});
  publish_lines(&control.requests, kLineSize);  // flush mode: the queue side's statistics line
  return true;
}

void ChannelEngine::publish() {
  if (!refused_.empty() && attached_ && !setting_up_) {
    // The ring refused these: try again (an index an old instance stored
    // once is soon overwritten by the live handler).  Bounded by the table.
    std::vector<std::uint32_t> retry;
    retry.swap(refused_);
    for (std::size_t i = 0; i < retry.size(); ++i) {
      if (entries_[retry[i]].state != State::Waiting || stage(retry[i])) continue;
      refused_.insert(refused_.end(), retry.begin() + static_cast<std::ptrdiff_t>(i) + 1, retry.end());
      break;  // refused again (stage() kept it): the rest waits too
    }
  }
  if (staged_ == 0) return;
  if (!still_ours()) return;
  submissions_.publish();
  if (doorbell_) ring_doorbell(*doorbell_);
  staged_ = 0;
  update_in_flight_counter();
}

void ChannelEngine::update_in_flight_counter() {
  if (lost_) return;
  store_relaxed(channel_.control().in_flight, static_cast<std::uint64_t>(in_flight_));
  publish_lines(&channel_.control().requests, kLineSize);  // flush mode: the queue side's statistics line
}

void ChannelEngine::complete_locally(std::uint32_t slot, int error) {
  Entry& entry = entries_[slot];
  if (entry.state == State::Pushed) {
    --in_flight_;
    // The backend instance that popped it may still be executing it.
    entry.quarantine_extent = true;
  }
  if (entry.refill) {
    // Its owner had its completion long ago; only the data is missing.
    end_refill(slot, false);
    return;
  }
  entry.state = State::Completed;
  entry.status = error;
  entry.result_length = 0;
  --outstanding_;
  local_completions_.push_back(slot);
}

bool ChannelEngine::accept(const CompletionEntry& completion, std::uint32_t& slot_out) {
  const std::uint64_t slot = completion.tag & ((1u << kTagSlotBits) - 1);
  const std::uint64_t serial = completion.tag >> kTagSlotBits;
  const char* why = nullptr;
  // Every handler stamps its completions with the generation it serves.
  if (completion.generation != static_cast<std::uint32_t>(generation_))
    why = "of another generation";
  else if (slot >= entries_.size() || entries_[slot].serial != serial)
    why = "with an unknown tag";
  else if (entries_[slot].state != State::Pushed)
    why = "for an entry that is not in the ring";
  if (why) {
    std::uint64_t dropped = 0;
    if (bad_completion_log.allow(&dropped))
      log(LogLevel::Warning, "channel %u: ignoring a completion %s (tag %#llx; %llu more suppressed)", index(), why,
          static_cast<unsigned long long>(completion.tag), static_cast<unsigned long long>(dropped));
    return false;
  }
  Entry& entry = entries_[slot];
  if (completion.status == ESHUTDOWN) {
    // A backend stopping cleanly fails what it has not executed with
    // ESHUTDOWN: like a crash, the entry waits for the next instance (the
    // re-drive at the next set-up), or for fail_outstanding() at the timeout.
    entry.state = State::Waiting;
    entry.quarantine_extent = true;
    --in_flight_;
    handed_back_ = true;
    return false;
  }
  if (entry.refill) {
    --in_flight_;
    const std::byte* data = extent(static_cast<std::uint32_t>(slot));
    const std::uint32_t length = entry.submission.length;
    end_refill(static_cast<std::uint32_t>(slot), sane_status(completion.status) == 0 &&
                                                     completion.result_length == length && data &&
                                                     channel_.consume_data(data, length, completion.data_crc));
    return false;  // its owner gets no second completion
  }
  entry.state = State::Completed;
  entry.status = sane_status(completion.status);
  entry.result_length = completion.result_length;
  entry.result_crc = completion.data_crc;
  --in_flight_;
  --outstanding_;
  if (entry.status) {
    add_relaxed(channel_.control().errors, std::uint64_t{1});
    publish_lines(&channel_.control().requests, kLineSize);  // flush mode: the queue side's statistics line
  }
  slot_out = static_cast<std::uint32_t>(slot);
  return true;
}

void ChannelEngine::end_refill(std::uint32_t slot, bool data_back) {
  Entry& entry = entries_[slot];
  entry.state = State::Completed;
  entry.refill = false;
  entry.data_lost = !data_back;
  --outstanding_;
  last_progress_ = Clock::now();
  if (entry.owner_done) release(slot);
}

void ChannelEngine::release(std::uint32_t slot) {
  Entry& entry = entries_[slot];
  if (entry.state == State::Free) return;
  if (entry.refill) {
    // Its owner is done with it, the ring is not: freed when the refill ends.
    entry.owner_done = true;
    return;
  }
  if (entry.state != State::Completed) {
    // Released before completion (its connection is gone while the payload
    // was arriving): it never reached a ring.
    if (entry.state == State::Pushed || entry.state == State::Waiting) return;  // still owed a completion
    --outstanding_;
  }
  if (entry.has_extent) {
    if (entry.quarantine_extent)
      quarantined_.push_back({entry.submission.data_offset, Clock::now() + quarantine_});
    else
      allocator_.release(entry.submission.data_offset);
  }
  entry.state = State::Free;
  entry.owner = 0;
  free_slots_.push_back(slot);
}

void ChannelEngine::expire_quarantine(Clock::time_point now) {
  auto expired = std::remove_if(quarantined_.begin(), quarantined_.end(), [&](const Quarantined& q) {
    if (now < q.until) return false;
    allocator_.release(q.offset);
    return true;
  });
  quarantined_.erase(expired, quarantined_.end());
}

bool ChannelEngine::begin_setup(std::optional<Binding> binding) {
  if (binding) binding_ = *binding;
  attached_ = false;
  doorbell_ = nullptr;
  sleeping_ = false;  // queue_setup() clears the flag
  if (!still_ours()) return false;
  // Every entry in the old ring is abandoned with it: back to Waiting, to be
  // pushed once into the new generation.
  for (Entry& entry : entries_)
    if (entry.state == State::Pushed) {
      entry.state = State::Waiting;
      --in_flight_;
    }
  staged_ = 0;
  refused_.clear();  // pushed with every other Waiting entry at the attach
  handed_back_ = false;
  submissions_.reset();
  completions_.reset();
  // The wake socket goes to the backend before the generation is out, so a
  // handler that attaches finds it (or takes it a moment later).
  const std::uint64_t next = channel_.next_generation(generation_);
  if (wake_socket_ >= 0 && !channel_.mode().flush)
    hand_over_wake_socket(wake_listener_name(transport_, binding_.backend_id, binding_.backend_epoch), index(), next,
                          wake_socket_);
  generation_ = channel_.queue_setup(binding_.backend_id, binding_.blkdev_id, binding_.backend_epoch, next - 1);
  setting_up_ = true;
  broken_ = false;
  last_progress_ = Clock::now();
  return true;
}

std::uint32_t* ChannelEngine::find_doorbell() const {
  // Flush mode: the peer is on another host (or coherence is not trusted);
  // a futex cannot cross hosts, so the handler polls and nobody rings.
  if (channel_.mode().flush) return nullptr;
  // The handler's word, stored before the attached_generation we have seen.
  const std::uint32_t named = load_relaxed(channel_.control().handler_doorbell);
  if (named == 0 || named > kBackendDoorbells || binding_.backend_id >= transport_.backend_count()) return nullptr;
  return &transport_.backend(binding_.backend_id).doorbell[named - 1];
}

bool ChannelEngine::handler_wakes() const {
  return attached_ && !lost_ && !channel_.mode().flush && wake_socket_ >= 0 &&
         load_relaxed(channel_.control().handler_wakes_queue) == rings_tag(generation_);
}

ChannelEngine::Sleep ChannelEngine::begin_sleep() {
  if (!handler_wakes() || !still_ours()) return Sleep::CannotSleep;
  std::atomic_ref<std::uint32_t>(channel_.control().queue_sleeping).store(1u, std::memory_order_seq_cst);
  sleeping_ = true;
  // The other half of the handler's fence: flag visible, then the ring read.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (completions_.available() > 0) {
    end_sleep();
    return Sleep::WorkWaiting;
  }
  return Sleep::Asleep;
}

void ChannelEngine::end_sleep() {
  if (!sleeping_) return;
  sleeping_ = false;
  if (still_ours()) store_relaxed(channel_.control().queue_sleeping, 0u);
}

bool ChannelEngine::poll_attached() {
  if (!setting_up_) return attached_;
  if (!still_ours()) return false;
  if (!channel_.handler_attached(generation_)) return false;
  setting_up_ = false;
  attached_ = true;
  failing_ = 0;
  doorbell_ = find_doorbell();
  std::size_t redriven = 0;
  for (std::uint32_t slot = 0; slot < entries_.size(); ++slot) {
    Entry& entry = entries_[slot];
    if (entry.state != State::Waiting) continue;
    if (entry.generations > 0) ++redriven;
    stage(slot);
  }
  publish();
  update_in_flight_counter();
  last_progress_ = Clock::now();
  std::uint64_t suppressed = 0;
  if (redriven && redrive_log.allow(&suppressed))
    log(LogLevel::Info, "channel %u: re-drove %zu outstanding entries to backend epoch %llu (%llu more re-drives not logged)",
        index(), redriven, static_cast<unsigned long long>(binding_.backend_epoch),
        static_cast<unsigned long long>(suppressed));
  return true;
}

void ChannelEngine::fail_outstanding(int error) {
  failing_ = error;
  end_sleep();
  attached_ = false;
  for (std::uint32_t slot = 0; slot < entries_.size(); ++slot) {
    const State state = entries_[slot].state;
    if (state == State::Waiting || state == State::Pushed) complete_locally(slot, error);
  }
  // A backend instance that was only paused (not dead) may wake up and pop
  // what the ring still holds, or run what it popped: a new generation makes
  // its fence checks fail (docs/design.md §4), so nothing failed here is
  // executed after the failure was reported.
  if (!lost_ && still_ours()) {
    staged_ = 0;
    submissions_.reset();
    completions_.reset();
    generation_ = channel_.queue_setup(binding_.backend_id, binding_.blkdev_id, binding_.backend_epoch, generation_);
    setting_up_ = false;
  }
  update_in_flight_counter();
}

void ChannelEngine::adopt_outstanding(ChannelEngine& old) {
  binding_ = old.binding_;
  failing_ = old.failing_;
  next_serial_ = std::max(next_serial_, old.next_serial_);
  // The fresh channel may be the very slot we lost, claimed again: its data
  // area is the old one.  So every byte worth keeping is copied out first
  // (and checked on the copy, since the old area may change under us), and
  // only then are new extents allocated and filled.
  std::vector<std::vector<std::byte>> saved(old.entries_.size());
  for (std::uint32_t slot = 0; slot < old.entries_.size() && slot < entries_.size(); ++slot) {
    const Entry& from = old.entries_[slot];
    if (from.state == State::Free || !from.has_extent) continue;
    std::uint32_t length = 0;
    if (from.payload_length > 0)
      length = from.payload_length;  // a WRITE payload, whole or in part
    else if (from.state == State::Completed)
      length = std::min(from.result_length, from.submission.data_length);  // a result not sent yet
    const std::byte* source = old.channel_.data(from.submission.data_offset, from.submission.data_length);
    if (length > 0 && source) saved[slot].assign(source, source + length);
  }
  // Old extents are addressed in the old data area; moving entries one by
  // one into a fresh allocator always fits (they fitted there).
  for (std::uint32_t slot = 0; slot < old.entries_.size() && slot < entries_.size(); ++slot) {
    Entry& from = old.entries_[slot];
    if (from.state == State::Free) continue;
    auto taken = std::find(free_slots_.begin(), free_slots_.end(), slot);
    if (taken == free_slots_.end()) continue;  // cannot happen: same geometry, fresh engine
    free_slots_.erase(taken);
    Entry& to = entries_[slot];
    to = from;
    to.generations = 0;  // never pushed into this channel
    to.quarantine_extent = false;
    if (from.state == State::Pushed) {
      to.state = State::Waiting;
      --old.in_flight_;
    }
    if (to.state != State::Completed) ++outstanding_;
    if (!from.has_extent) continue;
    auto offset = allocator_.allocate(from.submission.data_length);
    to.submission.data_offset = offset.value_or(0);
    std::byte* target = offset ? extent(slot) : nullptr;
    const std::vector<std::byte>& copy = saved[slot];
    if (!target) {
      to.has_extent = false;
      fail_adopted(slot, EIO);
      continue;
    }
    if (from.payload_length > 0) {
      if (copy.size() != from.payload_length || crc32c(0, copy.data(), copy.size()) != from.payload_crc) {
        fail_adopted(slot, EIO);
        continue;
      }
      std::memcpy(target, copy.data(), copy.size());
    } else if (from.state == State::Completed && !copy.empty()) {
      // A result not sent yet.  It was written before we lost the channel;
      // whoever owns it now may have written over it since.  Only checksum
      // mode can tell it did not: otherwise (or when it did) a READ runs
      // again into the fresh extent, and its owner waits for the bytes.
      const bool unchanged = channel_.mode().checksum && crc32c(0, copy.data(), copy.size()) == from.result_crc;
      if (unchanged) {
        std::memcpy(target, copy.data(), copy.size());
      } else if (from.submission.op == static_cast<std::uint16_t>(Op::Read) && from.status == 0) {
        to.state = State::Waiting;
        to.refill = true;
        to.data_lost = false;  // a failed refill moved here gets another chance
        ++outstanding_;
      } else {
        to.data_lost = true;  // nothing to read again: its owner ends what it promised
      }
    }
  }
  // Entries the old engine completed locally (failed) and never reported:
  // their owners still wait for them.
  for (std::uint32_t slot : old.local_completions_)
    if (slot < entries_.size() && entries_[slot].state == State::Completed) local_completions_.push_back(slot);
  old.local_completions_.clear();
  old.outstanding_ = 0;
}

void ChannelEngine::fail_adopted(std::uint32_t slot, int error) {
  Entry& entry = entries_[slot];
  if (entry.state == State::Waiting) {
    complete_locally(slot, error);
  } else {
    entry.status = error;  // Completed: reported as is; Reserved: submit() fails it
    // Completed and already reported: data its owner still holds is gone.
    if (entry.state == State::Completed) entry.data_lost = true;
  }
}

}  // namespace cbd::proxy
