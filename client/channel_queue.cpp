#include "client/channel_queue.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <utility>

#include "client/socket_io.hpp"
#include "client/nbd_protocol.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/thread_signals.hpp"

namespace cbd::proxy {
namespace {

using namespace nbd;

// Trim, write-zeroes and cache carry no data; one entry covers up to this
// much so a 4 GiB trim is a handful of entries, not thousands.
constexpr std::uint32_t kNoDataPiece = 1u << 30;
// Room for block-status descriptors per request (2048 extents).
constexpr std::uint32_t kBlockStatusCapacity = 2048 * sizeof(ExtentDescriptor);
constexpr std::uint32_t kTagSlotBits = 20;

Op op_for(std::uint16_t nbd_type) {
  switch (nbd_type) {
    case kCmdRead: return Op::Read;
    case kCmdWrite: return Op::Write;
    case kCmdFlush: return Op::Flush;
    case kCmdTrim: return Op::Trim;
    case kCmdWriteZeroes: return Op::WriteZeroes;
    case kCmdBlockStatus: return Op::BlockStatus;
    case kCmdCache: return Op::Cache;
    default: return Op{};
  }
}

std::uint16_t entry_flags_for(std::uint16_t nbd_flags) {
  std::uint16_t flags = 0;
  if (nbd_flags & kCmdFlagFua) flags |= kFlagFua;
  if (nbd_flags & kCmdFlagNoHole) flags |= kFlagNoHole;
  if (nbd_flags & kCmdFlagFastZero) flags |= kFlagFastZero;
  if (nbd_flags & kCmdFlagReqOne) flags |= kFlagReqOne;
  return flags;
}

// A completion's status is a peer's word: anything that is not a plausible
// errno becomes EIO.
int sane_status(std::int32_t status) { return status >= 0 && status < 4096 ? status : EIO; }

RateLimit bad_completion_log;
// A backend that restarts or flaps decides how often channels are set up
// again and re-drive.
RateLimit redrive_log(std::chrono::seconds(10));

}  // namespace

ChannelQueue::ChannelQueue(const Transport& transport, SlotClaim claim, ExportInfo info, PollTunables poll)
    : channel_(transport, claim.index()),
      claim_(std::move(claim)),
      info_(std::move(info)),
      poll_(poll),
      allocator_(channel_.data_size()),
      submissions_(channel_.submission_producer()),
      completions_(channel_.completion_consumer()) {
  const auto& geometry = transport.superblock().channel;
  std::uint32_t in_flight = std::min({geometry.sq_entries, geometry.cq_entries, 1u << kTagSlotBits});
  entries_.resize(in_flight);
  free_slots_.reserve(in_flight);
  for (std::uint32_t i = in_flight; i-- > 0;) free_slots_.push_back(i);
  // Pieces of a quarter of the data area keep several in flight at once.
  std::uint64_t piece = std::min<std::uint64_t>(channel_.data_size() / 4, info_.block_max);
  max_piece_ = static_cast<std::uint32_t>(std::max<std::uint64_t>(piece & ~std::uint64_t{4095}, 4096));
  stall_timeout_ = std::chrono::milliseconds(std::max(5000u, 5 * transport.superblock().dead_after_ms));
  completion_thread_ = std::thread([this] { completion_loop(); });
}

ChannelQueue::~ChannelQueue() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  work_.notify_all();
  space_.notify_all();
  if (completion_thread_.joinable()) completion_thread_.join();
}

std::size_t ChannelQueue::outstanding() const {
  std::lock_guard lock(mutex_);
  return requests_.size();
}

bool ChannelQueue::bind(const Binding& binding, std::chrono::milliseconds timeout) {
  {
    std::lock_guard lock(mutex_);
    binding_ = binding;
  }
  return rebind(binding.backend_epoch, timeout);
}

bool ChannelQueue::set_up(std::optional<std::uint64_t> backend_epoch, std::chrono::milliseconds timeout) {
  std::uint64_t generation;
  {
    std::lock_guard lock(mutex_);
    if (backend_epoch) binding_.backend_epoch = *backend_epoch;
    attached_ = false;
    // Fencing (docs/design.md, Fencing): never write a control block that
    // is no longer ours.
    if (!claim_.owned()) return false;
    submissions_.reset();
    completions_.reset();
    generation = channel_.queue_setup(binding_.backend_id, binding_.blkdev_id, binding_.backend_epoch);
    generation_ = generation;
  }
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!channel_.handler_attached(generation)) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    {
      std::lock_guard lock(mutex_);
      if (stopping_ || fail_pending_ || generation_ != generation) return false;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::unique_lock lock(mutex_);
  if (generation_ != generation) return false;  // rebound again meanwhile
  attached_ = true;
  failing_ = 0;
  // Re-drive every entry whose completion we have not consumed: the new
  // handler has never seen them.
  std::size_t redriven = 0;
  for (std::uint32_t slot = 0; slot < entries_.size(); ++slot) {
    Entry& entry = entries_[slot];
    if (entry.request && entry.pushed && !entry.completed) {
      entry.submission.generation = static_cast<std::uint32_t>(generation);
      submissions_.stage(entry.submission);
      ++redriven;
    }
  }
  if (!claim_.owned()) return false;
  submissions_.publish();
  // queue_setup() zeroed the shared in_flight counter; the re-driven entries
  // are still in flight (cbd-proxy list reports it).
  store_relaxed(channel_.control().in_flight, static_cast<std::uint64_t>(in_flight_));
  std::uint64_t suppressed = 0;
  if (redriven && redrive_log.allow(&suppressed))
    log(LogLevel::Info, "channel %u: re-drove %zu outstanding entries to backend epoch %llu (%llu more re-drives not logged)",
        index(), redriven, static_cast<unsigned long long>(binding_.backend_epoch),
        static_cast<unsigned long long>(suppressed));
  lock.unlock();
  space_.notify_all();
  work_.notify_all();
  return true;
}

void ChannelQueue::fail_outstanding(int error) {
  {
    std::lock_guard lock(mutex_);
    failing_ = error;
    fail_pending_ = error;
    attached_ = false;
  }
  space_.notify_all();
  work_.notify_all();
}

int ChannelQueue::reserve(std::unique_lock<std::mutex>& lock, std::uint32_t data_length, bool needs_extent) {
  for (;;) {
    if (failing_ || stopping_) return -1;
    if (attached_ && !free_slots_.empty()) {
      std::optional<std::uint32_t> extent;
      if (needs_extent) extent = allocator_.allocate(data_length);
      if (!needs_extent || extent) {
        std::uint32_t slot = free_slots_.back();
        free_slots_.pop_back();
        Entry& entry = entries_[slot];
        entry = Entry{};
        entry.serial = next_serial_++ & ((std::uint64_t{1} << (64 - kTagSlotBits)) - 1);
        entry.has_extent = needs_extent;
        entry.submission.data_offset = extent.value_or(0);
        entry.submission.data_length = needs_extent ? data_length : 0;
        return static_cast<int>(slot);
      }
    }
    space_.wait(lock);  // back-pressure: wait for a completion to free room
  }
}

void ChannelQueue::push(std::unique_lock<std::mutex>&, std::uint32_t slot) {
  Entry& entry = entries_[slot];
  entry.submission.tag = tag_of(slot);
  ++in_flight_;
  entry.pushed = true;
  // While a set-up is in progress the entry is only recorded: the set-up
  // pushes every recorded entry once when the handler attaches (pushing it
  // now as well would execute it twice).  Fencing: nothing is written to a
  // ring that is no longer ours.
  if (!attached_ || !claim_.owned()) return;
  entry.submission.generation = static_cast<std::uint32_t>(generation_);
  // A free entry slot guarantees ring space: entries in the ring are a subset
  // of the entries in flight, and the table is no larger than either ring.
  submissions_.push(entry.submission);
  ChannelControl& control = channel_.control();
  add_relaxed(control.requests, std::uint64_t{1});
  add_relaxed(control.bytes, std::uint64_t{entry.submission.length});
  store_relaxed(control.in_flight, static_cast<std::uint64_t>(in_flight_));
  work_.notify_one();
}

bool ChannelQueue::submit(const IoRequest& io, int payload_fd, Replier& replier) {
  Op op = op_for(io.type);
  bool is_write = io.type == kCmdWrite;
  auto owned = std::make_unique<Request>();
  Request& request = *owned;
  request.io = io;
  request.replier = &replier;

  // Pieces: (offset from the request start, length, data extent size).
  struct Piece {
    std::uint64_t relative;
    std::uint32_t length;
    std::uint32_t extent;
  };
  std::vector<Piece> pieces;
  switch (op) {
    case Op::Read:
    case Op::Write:
      for (std::uint64_t done = 0; done < io.length || pieces.empty();) {
        auto length = static_cast<std::uint32_t>(std::min<std::uint64_t>(io.length - done, max_piece_));
        pieces.push_back({done, length, length});
        done += length;
        if (length == 0) break;
      }
      break;
    case Op::Trim:
    case Op::WriteZeroes:
    case Op::Cache:
      for (std::uint64_t done = 0; done < io.length || pieces.empty();) {
        auto length = static_cast<std::uint32_t>(std::min<std::uint64_t>(io.length - done, kNoDataPiece));
        pieces.push_back({done, length, 0});
        done += length;
        if (length == 0) break;
      }
      break;
    case Op::Flush:
      pieces.push_back({0, io.length, 0});
      break;
    case Op::BlockStatus:
      pieces.push_back({0, io.length, kBlockStatusCapacity});
      break;
    default:
      if (is_write && !recv_discard(payload_fd, io.length)) return false;
      replier.finish(io, EINVAL);
      return true;
  }

  std::unique_lock lock(mutex_);
  request.sequence = next_sequence_++;
  requests_.emplace(&request, std::move(owned));
  bool payload_ok = true;
  std::uint64_t payload_consumed = 0;
  for (const Piece& piece : pieces) {
    int reserved = reserve(lock, piece.extent, op == Op::Read || op == Op::Write || op == Op::BlockStatus);
    if (reserved < 0) {
      request.error = failing_ ? failing_ : ESHUTDOWN;
      break;
    }
    auto slot = static_cast<std::uint32_t>(reserved);
    Entry& entry = entries_[slot];
    entry.request = &request;
    entry.relative_offset = piece.relative;
    SubmissionEntry& se = entry.submission;
    se.op = static_cast<std::uint16_t>(op);
    se.flags = entry_flags_for(io.flags);
    se.offset = io.offset + piece.relative;
    se.length = piece.length;
    if (is_write) {
      // Receive the payload straight into shared memory (the one copy on
      // this node).  The lock is dropped: the slot is ours, and completions
      // of other requests must keep flowing meanwhile.
      std::byte* target = channel_.data(se.data_offset, piece.length);
      lock.unlock();
      payload_ok = recv_exact(payload_fd, target, piece.length) == RecvStatus::Ok;
      std::uint32_t crc = payload_ok ? channel_.publish_data(target, piece.length) : 0;
      lock.lock();
      if (!payload_ok) {
        retire(slot);
        break;
      }
      payload_consumed += piece.length;
      se.data_crc = crc;
      if (failing_ || stopping_) {
        // fail_outstanding() ran while the payload arrived: its pass could
        // not see this entry, so fail it here rather than push it.
        retire(slot);
        request.error = failing_ ? failing_ : ESHUTDOWN;
        break;
      }
    }
    request.entries.push_back(slot);
    push(lock, slot);
  }
  request.all_submitted = true;
  if (!payload_ok) {
    // The connection is gone: nobody to answer.  Entries already in flight
    // complete into the void.
    request.replier = nullptr;
    finish_if_done(lock, request);
    return false;
  }
  if (is_write && payload_consumed < io.length) {
    // Failed part-way (backend gone): the rest of the payload is still on the
    // socket and must be consumed to keep the stream in sync.
    lock.unlock();
    bool drained = recv_discard(payload_fd, io.length - payload_consumed);
    lock.lock();
    if (!drained) {
      request.replier = nullptr;
      finish_if_done(lock, request);
      return false;
    }
  }
  finish_if_done(lock, request);
  return true;
}

void ChannelQueue::retire(std::uint32_t slot) {
  Entry& entry = entries_[slot];
  if (entry.has_extent) allocator_.release(entry.submission.data_offset);
  entry.request = nullptr;
  entry.has_extent = false;
  free_slots_.push_back(slot);
  space_.notify_all();
}

void ChannelQueue::finish_if_done(std::unique_lock<std::mutex>& lock, Request& request) {
  if (!request.all_submitted || request.next_to_deliver < request.entries.size()) return;
  if (request.replier) {
    auto stream = streaming_.find(request.replier);
    if (stream != streaming_.end() && stream->second != &request) return;  // held until that stream ends
  }
  auto node = requests_.extract(&request);
  if (node.empty()) return;
  std::unique_ptr<Request> owned = std::move(node.mapped());
  if (owned->error) add_relaxed(channel_.control().errors, std::uint64_t{1});
  Replier* replier = owned->replier;
  if (replier) {
    lock.unlock();
    replier->finish(owned->io, owned->error);
    lock.lock();
  }
  auto stream = std::find_if(streaming_.begin(), streaming_.end(),
                             [&](const auto& item) { return item.second == owned.get(); });
  const bool ended_stream = stream != streaming_.end();
  if (ended_stream) streaming_.erase(stream);
  Replier* freed = owned->replier;
  if (freed && !streaming_.count(freed) && (ended_stream || deferred_streams_.count(freed))) release_held(lock, freed);
}

void ChannelQueue::release_held(std::unique_lock<std::mutex>& lock, Replier* replier) {
  std::vector<Request*> held;
  for (auto& [pending, unused] : requests_)
    if (pending->replier == replier && pending->next_to_deliver < pending->entries.size() &&
        entries_[pending->entries[pending->next_to_deliver]].completed)
      held.push_back(pending);
  std::sort(held.begin(), held.end(), [](const Request* a, const Request* b) { return a->sequence < b->sequence; });
  for (Request* pending : held)
    if (requests_.count(pending)) deliver(lock, *pending);
}

bool ChannelQueue::must_defer_stream(const Request& request) const {
  if (!request.replier || request.next_to_deliver != 0 || request.io.type != kCmdRead) return false;
  if (request.all_submitted && request.entries.size() <= 1) return false;  // one piece: no stream
  for (const auto& [other, unused] : requests_)
    if (other->replier == request.replier && other->sequence < request.sequence) return true;
  return false;
}

void ChannelQueue::deliver(std::unique_lock<std::mutex>& lock, Request& request) {
  if (request.replier) {
    auto stream = streaming_.find(request.replier);
    if (stream != streaming_.end() && stream->second != &request) return;  // held until that stream ends
  }
  // A READ in several pieces holds its connection from its first piece to
  // its last (simple replies cannot interleave).  It starts only once the
  // older requests of its connection have finished: otherwise they would
  // complete behind the stream, hold their data extents, and the stream's
  // later pieces could find no room — a deadlock.  Younger requests cannot
  // do that: the connection's reader submits one request at a time, so they
  // arrive only after every piece of this one has its extent.
  const bool defer = must_defer_stream(request);
  if (defer != request.deferred) {
    request.deferred = defer;
    auto& count = deferred_streams_[request.replier];
    count += defer ? 1 : -1;
    if (count == 0) deferred_streams_.erase(request.replier);
  }
  if (defer) return;
  while (request.next_to_deliver < request.entries.size()) {
    std::uint32_t slot = request.entries[request.next_to_deliver];
    Entry& entry = entries_[slot];
    if (!entry.completed) break;
    const SubmissionEntry& se = entry.submission;
    if (!request.error && entry.status) request.error = entry.status;
    if (!request.error && request.replier && !request.send_failed) {
      if (se.op == static_cast<std::uint16_t>(Op::Read)) {
        std::byte* data = channel_.data(se.data_offset, se.length);
        if (entry.result_length != se.length || !channel_.consume_data(data, se.length, entry.result_crc)) {
          request.error = EIO;
        } else {
          // Sent straight from shared memory; the extent stays ours until
          // retire() below, so the lock can be dropped for the socket write.
          bool more_pieces = !request.all_submitted || request.next_to_deliver + 1 < request.entries.size();
          if (more_pieces) streaming_[request.replier] = &request;
          lock.unlock();
          bool sent = request.replier->read_data(request.io, entry.relative_offset, data, se.length);
          lock.lock();
          if (!sent) request.send_failed = true;
        }
      } else if (se.op == static_cast<std::uint16_t>(Op::BlockStatus)) {
        std::uint32_t bytes = entry.result_length;
        const std::byte* data = channel_.data(se.data_offset, se.data_length);
        if (bytes == 0 || bytes > se.data_length || bytes % sizeof(ExtentDescriptor) != 0 ||
            !channel_.consume_data(data, bytes, entry.result_crc)) {
          request.error = EIO;
        } else {
          // Copy out and check: descriptors come from the peer.
          std::vector<ExtentDescriptor> extents(bytes / sizeof(ExtentDescriptor));
          std::memcpy(extents.data(), data, bytes);
          std::uint64_t covered = 0;
          std::size_t keep = 0;
          for (auto& extent : extents) {
            if (extent.length == 0 || covered >= request.io.length) break;
            extent.length = static_cast<std::uint32_t>(std::min<std::uint64_t>(extent.length, request.io.length - covered));
            extent.flags &= kExtentHole | kExtentZero;
            covered += extent.length;
            ++keep;
          }
          extents.resize(keep);
          if (extents.empty()) {
            request.error = EIO;
          } else {
            lock.unlock();
            bool sent = request.replier->block_status(request.io, extents);
            lock.lock();
            if (!sent) request.send_failed = true;
          }
        }
      }
    }
    retire(slot);
    ++request.next_to_deliver;
  }
  finish_if_done(lock, request);
}

void ChannelQueue::complete(std::unique_lock<std::mutex>& lock, const CompletionEntry& completion) {
  std::uint64_t slot = completion.tag & ((1u << kTagSlotBits) - 1);
  std::uint64_t serial = completion.tag >> kTagSlotBits;
  if (slot >= entries_.size() || !entries_[slot].request || entries_[slot].serial != serial ||
      !entries_[slot].pushed || entries_[slot].completed ||
      (completion.generation != 0 && completion.generation != static_cast<std::uint32_t>(generation_))) {
    std::uint64_t dropped = 0;
    if (bad_completion_log.allow(&dropped))
      log(LogLevel::Warning, "channel %u: ignoring a completion with unknown tag %#llx (%llu more suppressed)", index(),
          static_cast<unsigned long long>(completion.tag), static_cast<unsigned long long>(dropped));
    return;
  }
  Entry& entry = entries_[slot];
  // A backend stopping cleanly fails what it did not execute with
  // ESHUTDOWN: hold the entry as after a crash; the next set-up (a new
  // backend instance) re-drives it, or the timeout fails it with EIO.
  if (completion.status == ESHUTDOWN && !stopping_) return;
  entry.completed = true;
  entry.status = sane_status(completion.status);
  entry.result_length = completion.result_length;
  entry.result_crc = completion.data_crc;
  --in_flight_;
  store_relaxed(channel_.control().in_flight, static_cast<std::uint64_t>(in_flight_));
  deliver(lock, *entry.request);
}

void ChannelQueue::fail_in_flight(std::unique_lock<std::mutex>& lock, int error) {
  std::vector<Request*> affected;
  for (Entry& entry : entries_) {
    // An entry not yet pushed is being filled by a submitter, which sees
    // failing_ itself.
    if (entry.request && entry.pushed && !entry.completed) {      entry.completed = true;
      entry.status = error;
      --in_flight_;
      affected.push_back(entry.request);
    }
  }
  store_relaxed(channel_.control().in_flight, static_cast<std::uint64_t>(in_flight_));
  std::sort(affected.begin(), affected.end());
  affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
  for (Request* request : affected) {
    if (requests_.count(request)) deliver(lock, *request);
  }
}

void ChannelQueue::completion_loop() {
  block_async_signals();
  AdaptivePoller poller(poll_);
  RateLimit broken_log;
  using Clock = std::chrono::steady_clock;
  Clock::time_point stop_deadline{};
  Clock::time_point last_progress = Clock::now();
  Clock::time_point broken_since{};  // {}: the ring is not broken
  std::unique_lock lock(mutex_);
  for (;;) {
    if (fail_pending_) {
      int error = std::exchange(fail_pending_, 0);
      fail_in_flight(lock, error);
    }
    if (stopping_) {
      // Give in-flight entries a moment to complete, then fail the rest: a
      // dead backend must not hold up shutdown.
      if (stop_deadline == std::chrono::steady_clock::time_point{})
        stop_deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      if (in_flight_ == 0 || !attached_ || std::chrono::steady_clock::now() >= stop_deadline) {
        fail_in_flight(lock, ESHUTDOWN);
        break;
      }
    }
    if (!attached_ || in_flight_ == 0) {
      // Nothing can complete: sleep until a submission or a state change
      // instead of polling (idle CPU stays at zero).  The timeout bounds the
      // wait should a notification be missed.
      work_.wait_for(lock, std::chrono::milliseconds(100));
      poller.active();
      last_progress = Clock::now();
      broken_since = {};
      continue;
    }
    CompletionEntry completion;
    PopStatus status = completions_.pop(completion);
    if (status == PopStatus::Ok) {
      if (claim_.owned()) completions_.release();
      complete(lock, completion);
      poller.active();
      last_progress = Clock::now();
      broken_since = {};
      continue;
    }
    if (status == PopStatus::Corrupt) {
      if (claim_.owned()) completions_.release();
      if (broken_log.allow())
        log(LogLevel::Warning, "channel %u: completion entry failed its checks; failing its request with EIO", index());
      completion.status = EIO;
      complete(lock, completion);
      last_progress = Clock::now();
      continue;
    }
    const auto now = Clock::now();
    if (status == PopStatus::Broken && broken_since == Clock::time_point{}) broken_since = now;
    // An impossible completion ring stays impossible (the handler has no
    // reason to rewrite its index); a brief grace covers a torn read in
    // flush mode.  Entries lost any other way show as a stall.
    const bool broken = broken_since != Clock::time_point{} && now - broken_since > std::chrono::milliseconds(100);
    const bool stalled = now - last_progress > stall_timeout_;
    if (broken || stalled) {
      if (broken_log.allow())
        log(LogLevel::Warning,
            "channel %u: %s with %zu entries in flight; setting the channel up again and re-driving them", index(),
            broken ? "the completion ring's producer index is impossible (corrupt control block)"
                   : "no completion for too long",
            in_flight_);
      lock.unlock();
      set_up(std::nullopt, stall_timeout_);
      lock.lock();
      last_progress = Clock::now();
      broken_since = {};
      continue;
    }
    lock.unlock();
    poller.idle();
    lock.lock();
  }
}

}  // namespace cbd::proxy
