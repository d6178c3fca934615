#include "plugin/handler.hpp"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <limits>

#include "common/cache_lines.hpp"
#include "common/wake_socket.hpp"
#include "common/shared_atomic.hpp"

namespace cbd::backend {
namespace {

constexpr std::uint64_t kMaxEntryLength = 32ull << 20;  // what NBD clients send at most per request

// A write whose data checksum does not match is re-checked (non-coherent
// memory can show stale lines for a while) up to kChecksumRechecks times,
// then fails with EIO.  The pauses grow (kFirstRecheckPause, doubling) and
// are never shorter than kRecheckCostFactor times the last pass took, so a
// peer whose every CRC is wrong costs the handler thread at most about
// 1/kRecheckCostFactor of its time in re-checks, however large its writes.
// The entry waits, not the thread: the other channels are served meanwhile.
constexpr unsigned kChecksumRechecks = 5;
constexpr std::chrono::microseconds kFirstRecheckPause{100};
constexpr unsigned kRecheckCostFactor = 64;

StoreRequest request_for(const SubmissionEntry& entry) {
  StoreRequest request;
  request.offset = entry.offset;
  request.length = entry.length;
  request.fua = entry.flags & kFlagFua;
  return request;
}

bool op_known(std::uint16_t op) { return op >= 1 && op <= kOpMax; }

// The flags each operation may carry (NBD: FUA on writes, NO_HOLE and
// FAST_ZERO on write-zeroes, REQ_ONE on block status).
std::uint16_t allowed_flags(Op op) {
  switch (op) {
    case Op::Write:
    case Op::Trim: return kFlagFua;
    case Op::WriteZeroes: return kFlagFua | kFlagNoHole | kFlagFastZero;
    case Op::BlockStatus: return kFlagReqOne;
    default: return 0;
  }
}

// A store's error as a completion status.  ESHUTDOWN there means "not
// executed, the backend is stopping" (docs/design.md §5): the queue side
// keeps the entry for the next instance.  From a store it is a request that
// ran and failed, and is reported as EIO.
int completion_status(int store_error) { return store_error == ESHUTDOWN ? EIO : store_error; }

bool modifies(Op op) { return op == Op::Write || op == Op::Trim || op == Op::WriteZeroes; }

const char* op_name(std::uint16_t op) {
  switch (op) {
    case 1: return "read";
    case 2: return "write";
    case 3: return "flush";
    case 4: return "trim";
    case 5: return "write-zeroes";
    case 6: return "block-status";
    case 7: return "cache";
    default: return "unknown";
  }
}

// Writes block status results as ExtentDescriptors straight into the data
// extent, merging neighbours with equal flags.
class DescriptorWriter final : public ExtentSink {
 public:
  DescriptorWriter(std::byte* out, std::uint32_t capacity, std::uint64_t offset, std::uint64_t end, bool req_one)
      : out_(out), capacity_(req_one ? std::min<std::uint32_t>(capacity, 1) : capacity), next_(offset), end_(end) {}

  bool add(std::uint64_t offset, std::uint64_t length, std::uint32_t flags) override {
    // A store must report the range in order and without gaps; stop at the
    // first extent that does not continue where the last one ended.
    if (offset != next_ || length == 0) return false;
    length = std::min(length, end_ - offset);
    flags &= kExtentHole | kExtentZero;
    while (length > 0) {
      if (have_pending_ && pending_.flags == flags && pending_.length < kMaxDescriptorLength) {
        std::uint64_t grow = std::min<std::uint64_t>(length, kMaxDescriptorLength - pending_.length);
        pending_.length += static_cast<std::uint32_t>(grow);
        length -= grow;
        next_ += grow;
        continue;
      }
      if (have_pending_) {
        if (written_ + 1 >= capacity_) return false;  // room only for the pending one
        emit();
      }
      std::uint64_t take = std::min<std::uint64_t>(length, kMaxDescriptorLength);
      pending_ = {static_cast<std::uint32_t>(take), flags};
      have_pending_ = true;
      length -= take;
      next_ += take;
    }
    return next_ < end_;
  }

  // Bytes of descriptors written.
  std::uint32_t finish() {
    if (have_pending_ && written_ < capacity_) emit();
    have_pending_ = false;
    return written_ * static_cast<std::uint32_t>(sizeof(ExtentDescriptor));
  }

 private:
  // Keeps descriptor lengths block-aligned-ish when they must be split.
  static constexpr std::uint32_t kMaxDescriptorLength = 0xfffff000u;

  void emit() {
    // The extent may be unaligned: memcpy, never a typed store.
    std::memcpy(out_ + std::size_t{written_} * sizeof(ExtentDescriptor), &pending_, sizeof pending_);
    ++written_;
  }

  std::byte* out_;
  std::uint32_t capacity_;
  std::uint32_t written_ = 0;
  std::uint64_t next_;
  std::uint64_t end_;
  ExtentDescriptor pending_{};
  bool have_pending_ = false;
};

}  // namespace

std::uint32_t block_max_for(std::uint64_t data_size) {
  return static_cast<std::uint32_t>(std::min(data_size, kMaxEntryLength));
}

Validation validate(const SubmissionEntry& entry, const ExportLimits& limits, const Channel& channel) {
  if (!op_known(entry.op)) return {EINVAL, "unknown operation"};
  const Op op = static_cast<Op>(entry.op);
  if (entry.flags & ~kKnownFlags) return {EINVAL, "unknown flags"};
  if (entry.flags & ~allowed_flags(op)) return {EINVAL, "flag not allowed for this operation"};

  if (op != Op::Flush) {
    if (entry.offset > limits.size || entry.length > limits.size - entry.offset)
      return {op == Op::Write || op == Op::WriteZeroes ? ENOSPC : EINVAL, "range past the end of the export"};
  }
  if (limits.read_only && modifies(op)) return {EPERM, "write to a read-only export"};

  Validation result;
  switch (op) {
    case Op::Read:
    case Op::Write:
      if (entry.length > limits.block_max) return {EINVAL, "longer than the published block_max"};
      if (entry.data_length != entry.length) return {EINVAL, "data extent length differs from the length"};
      result.data = channel.data(entry.data_offset, entry.data_length);
      if (!result.data) return {EINVAL, "data extent outside the channel's data area"};
      break;
    case Op::BlockStatus:
      if (entry.length == 0) return {EINVAL, "block status of an empty range"};
      if (entry.data_length < sizeof(ExtentDescriptor)) return {EINVAL, "data extent too small for one extent"};
      result.data = channel.data(entry.data_offset, entry.data_length);
      if (!result.data) return {EINVAL, "data extent outside the channel's data area"};
      break;
    default:
      break;  // no data extent: data_offset/data_length are ignored
  }
  return result;
}

InFlightTable::InFlightTable(unsigned capacity) : entries_(capacity == 0 ? 1 : capacity), busy_(entries_.size()) {
  free_.reserve(entries_.size());
  for (std::size_t i = entries_.size(); i > 0; --i) free_.push_back(static_cast<std::uint32_t>(i - 1));
}

std::uint32_t InFlightTable::add(const InFlight& request) {
  std::uint32_t index = free_.back();
  free_.pop_back();
  entries_[index] = request;
  busy_[index] = true;
  return index;
}

InFlight InFlightTable::take(std::uint64_t index) {
  if (index >= entries_.size() || !busy_[index]) return {};
  busy_[index] = false;
  free_.push_back(static_cast<std::uint32_t>(index));
  return entries_[index];
}

ChannelHandler::ChannelHandler(const Transport& transport, std::uint32_t index, Store& store,
                               const ExportLimits& limits, const BackendFence& fence)
    : channel_(transport, index),
      store_(store),
      fence_(fence),
      limits_(limits),
      submissions_(channel_.submission_consumer()),
      completions_(channel_.completion_producer()) {}

bool ChannelHandler::still_ours() {
  if (!serving_) return false;
  const char* why = nullptr;
  if (!fence_.holds()) {
    why = "our backend slot was taken over";
  } else {
    const ChannelControl& control = channel_.control();
    if (channel_.mode().flush) invalidate_lines(&control.generation, sizeof control.generation);
    if (load_acquire(control.generation) != generation_) why = "the queue side set it up again";
  }
  if (!why) return true;
  std::uint64_t suppressed = 0;
  if (fenced_limit_.allow(&suppressed))
    log(LogLevel::Info, "channel %u: stopped serving generation %llu: %s (%llu more suppressed)", index(),
        static_cast<unsigned long long>(generation_), why, static_cast<unsigned long long>(suppressed));
  detach();
  return false;
}

void ChannelHandler::attach(std::uint64_t generation, std::uint64_t backend_epoch, std::uint32_t doorbell) {
  channel_.handler_attach(generation, backend_epoch, doorbell);
  doorbell_ = doorbell;
  queue_wake_.reset();  // the last generation's
  submissions_.reset();
  completions_.reset();
  overflow_.clear();
  recheck_.reset();
  failed_at_stop_ = 0;
  completed_since_publish_ = errors_since_publish_ = 0;
  staged_ = false;
  broken_ = false;
  broken_since_ = {};
  generation_ = generation;
  serving_ = true;
  if (attach_limit_.allow())
    log(LogLevel::Debug, "channel %u: serving generation %llu", index(), static_cast<unsigned long long>(generation));
}

void ChannelHandler::set_queue_wake(UniqueFd socket) {
  if (!serving_ || !socket || !still_ours()) return;
  queue_wake_ = std::move(socket);
  channel_.handler_wakes(generation_);
}

void ChannelHandler::detach() {
  if (!serving_) return;
  serving_ = false;
  queue_wake_.reset();
  overflow_.clear();
  recheck_.reset();  // nobody waits for its completion any more
  staged_ = false;
  if (attach_limit_.allow())
    log(LogLevel::Debug, "channel %u: stopped serving generation %llu", index(),
        static_cast<unsigned long long>(generation_));
}

std::size_t ChannelHandler::outstanding() const {
  return in_flight_ + overflow_.size() + (recheck_ ? 1 : 0);
}

unsigned ChannelHandler::take_entries(StoreQueue& queue, InFlightTable& table, unsigned budget) {
  // Back-pressure: while completions wait for room, take nothing new.
  if (!serving_ || broken_ || !overflow_.empty()) return 0;
  unsigned resumed = 0;
  if (recheck_) {
    // The channel waits behind its parked write (the ring keeps the rest).
    if (std::chrono::steady_clock::now() < recheck_->due || queue.room() == 0 || table.full()) return 0;
    if (!still_ours()) return 0;  // detached: the parked write is dropped with the channel
    resume_recheck(queue, table);
    resumed = 1;
    // Parked again, or failed into a full completion ring: take nothing new.
    if (recheck_ || !overflow_.empty() || !serving_) return resumed;
  }
  // Each entry needs at most one store request and one in-flight record,
  // and ends in one completion: never take more than the completion ring
  // can hold beyond what is already owed, so the overflow list stays within
  // one ring's worth however long the queue side keeps the ring full.
  const std::size_t owed = outstanding();
  const std::size_t ring_room = owed < completions_.capacity() ? completions_.capacity() - owed : 0;
  const std::size_t limit =
      std::min<std::size_t>({std::size_t{budget > resumed ? budget - resumed : 0}, std::size_t{queue.room()},
                             std::size_t{table.room()}, ring_room});
  batch_.clear();
  while (batch_.size() < limit) {
    SubmissionEntry entry;
    PopStatus status = submissions_.pop(entry);
    if (status == PopStatus::Empty) break;
    if (status == PopStatus::Broken) {
      // Either the queue side is setting the channel up again (it resets
      // its indices just before it publishes a new generation, and discovery
      // re-attaches within a millisecond) or the control block is corrupt.
      // Only the second lasts: give up on this generation after 100 ms.
      const auto now = std::chrono::steady_clock::now();
      if (broken_since_ == std::chrono::steady_clock::time_point{}) broken_since_ = now;
      if (now - broken_since_ < std::chrono::milliseconds(100)) break;
      broken_ = true;
      std::uint64_t suppressed = 0;
      if (broken_limit_.allow(&suppressed))
        log(LogLevel::Error,
            "channel %u: submission ring indices are impossible (corrupt control block); not serving generation "
            "%llu until the queue side re-initialises it (%llu more suppressed)",
            index(), static_cast<unsigned long long>(generation_), static_cast<unsigned long long>(suppressed));
      break;
    }
    broken_since_ = {};
    batch_.push_back({entry, status == PopStatus::Corrupt});
    // Checksum mode: a write may be parked for a re-check, and the channel
    // waits behind it.  End the batch there, so nothing taken after it runs
    // ahead of it while the rest stays in the ring.
    if (channel_.mode().checksum && status != PopStatus::Corrupt && static_cast<Op>(entry.op) == Op::Write)
      break;
  }
  const auto taken = static_cast<unsigned>(batch_.size());
  if (taken == 0) return resumed;
  // The entries are private copies now.  This thread may have been paused
  // since it last looked (SIGSTOP, a VM pause) and its slot or the channel
  // handed on meanwhile: check before anything is written back or run.
  if (!still_ours()) return resumed + taken;
  submissions_.release();  // hand their slots back at once
  for (std::size_t i = 0; i < batch_.size(); ++i) {
    const SubmissionEntry& entry = batch_[i].entry;
    // Again before each one: with a synchronous store an entry may run for
    // long, and the pause may come between two of them.
    if (i > 0 && !still_ours()) return resumed + taken;
    if (batch_[i].corrupt) {
      std::uint64_t suppressed = 0;
      if (bad_entry_limit_.allow(&suppressed))
        log(LogLevel::Warning, "channel %u: corrupt submission entry (tag %#llx), failed with EIO (%llu more suppressed)",
            index(), static_cast<unsigned long long>(entry.tag), static_cast<unsigned long long>(suppressed));
      complete(entry.tag, EIO);
      continue;
    }
    if (entry.generation != static_cast<std::uint32_t>(generation_)) {
      // Produced for another generation (a stale or forged entry): nobody
      // of this generation waits for it, so it is neither run nor completed.
      std::uint64_t suppressed = 0;
      if (stale_entry_limit_.allow(&suppressed))
        log(LogLevel::Warning,
            "channel %u: dropped an entry of generation %u (tag %#llx) in generation %u, not executed (%llu more "
            "suppressed)",
            index(), entry.generation, static_cast<unsigned long long>(entry.tag),
            static_cast<std::uint32_t>(generation_), static_cast<unsigned long long>(suppressed));
      continue;
    }
    start(entry, queue, table);
  }
  return resumed + taken;
}

unsigned ChannelHandler::fail_waiting(int status) {
  if (!serving_ || !still_ours()) return 0;
  unsigned failed = 0;
  if (recheck_) {
    complete(recheck_->entry.tag, status);
    recheck_.reset();
    ++failed;
  }
  if (broken_) return failed;
  SubmissionEntry entry;
  // Entries left in the ring once the bound is reached stay there: the
  // handler's departure (attached_generation 0) tells the queue side.
  while (failed_at_stop_ < submissions_.capacity() && overflow_.empty() &&
         outstanding() < completions_.capacity()) {
    PopStatus result = submissions_.pop(entry);
    if (result == PopStatus::Empty) break;
    if (result == PopStatus::Broken) {
      broken_ = true;
      break;
    }
    ++failed_at_stop_;
    // As take_entries(): an entry of another generation has nobody of this
    // one waiting for it (a corrupt one is answered, its tag checked by the
    // queue side).
    if (result != PopStatus::Corrupt && entry.generation != static_cast<std::uint32_t>(generation_)) continue;
    complete(entry.tag, status);
    ++failed;
  }
  submissions_.release();
  return failed;
}

void ChannelHandler::start(const SubmissionEntry& entry, StoreQueue& queue, InFlightTable& table) {
  Validation check = validate(entry, limits_, channel_);
  if (check.error) {
    std::uint64_t suppressed = 0;
    if (bad_entry_limit_.allow(&suppressed))
      log(LogLevel::Warning,
          "channel %u: refused %s entry (tag %#llx, offset %llu, length %u, data %u+%u, flags %#x): %s — %s "
          "(%llu more suppressed)",
          index(), op_name(entry.op), static_cast<unsigned long long>(entry.tag),
          static_cast<unsigned long long>(entry.offset), entry.length, entry.data_offset, entry.data_length,
          entry.flags, check.reason, std::strerror(check.error), static_cast<unsigned long long>(suppressed));
    complete(entry.tag, check.error);
    return;
  }
  const Op op = static_cast<Op>(entry.op);
  StoreRequest request = request_for(entry);
  switch (op) {
    case Op::Read: request.op = StoreOp::Read; break;
    case Op::Write:
      // Checksum mode: the bytes must be the ones the queue side checksummed
      // before any of them reaches the disk.
      if (!check_write(entry, check.data, 0)) return;
      request.op = StoreOp::Write;
      break;
    case Op::Flush: request.op = StoreOp::Flush; break;
    case Op::Trim: request.op = StoreOp::Trim; break;
    case Op::WriteZeroes:
      request.op = StoreOp::Zero;
      request.no_hole = entry.flags & kFlagNoHole;
      request.fast_zero = entry.flags & kFlagFastZero;
      if (request.fast_zero && !store_.info().can_fast_zero) {
        complete(entry.tag, ENOTSUP);  // fail fast: that is the whole point of FAST_ZERO
        return;
      }
      break;
    case Op::Cache: request.op = StoreOp::Cache; break;
    case Op::BlockStatus: block_status(entry, check.data); return;
  }
  enqueue(entry, check.data, request, queue, table);
}

void ChannelHandler::enqueue(const SubmissionEntry& entry, std::byte* data, StoreRequest request, StoreQueue& queue,
                             InFlightTable& table) {
  const Op op = static_cast<Op>(entry.op);
  if (entry.length == 0 && op != Op::Flush) {
    complete(entry.tag, 0);  // nothing to do; never bother the store
    return;
  }
  // Fenced once more, after the checksum pass (which may take long): the
  // last moment before the request can reach the store.
  if (!still_ours()) return;
  request.buffer = data;
  request.user_data = table.add({this, generation_, entry.tag, op, data, entry.length});
  ++in_flight_;
  queue.enqueue(request);
}

bool ChannelHandler::check_write(const SubmissionEntry& entry, std::byte* data, unsigned attempts) {
  const auto before = std::chrono::steady_clock::now();
  if (channel_.check_data(data, entry.length, entry.data_crc)) return true;
  const auto now = std::chrono::steady_clock::now();
  if (attempts >= kChecksumRechecks) {
    std::uint64_t suppressed = 0;
    if (bad_entry_limit_.allow(&suppressed))
      log(LogLevel::Warning,
          "channel %u: write data checksum mismatch (tag %#llx, %u bytes), still wrong after %u re-checks; failed "
          "with EIO (%llu more suppressed)",
          index(), static_cast<unsigned long long>(entry.tag), entry.length, attempts,
          static_cast<unsigned long long>(suppressed));
    complete(entry.tag, EIO);
    return false;
  }
  const std::chrono::nanoseconds pause =
      std::max<std::chrono::nanoseconds>(kFirstRecheckPause * (1u << attempts), (now - before) * kRecheckCostFactor);
  recheck_ = Recheck{entry, data, attempts, now + pause};
  return false;
}

void ChannelHandler::resume_recheck(StoreQueue& queue, InFlightTable& table) {
  const Recheck parked = *recheck_;
  recheck_.reset();
  if (!check_write(parked.entry, parked.data, parked.attempts + 1)) return;  // parked again, or failed
  StoreRequest request = request_for(parked.entry);
  request.op = StoreOp::Write;
  enqueue(parked.entry, parked.data, request, queue, table);
}

void ChannelHandler::block_status(const SubmissionEntry& entry, std::byte* data) {
  const bool req_one = entry.flags & kFlagReqOne;
  DescriptorWriter writer(data, entry.data_length / static_cast<std::uint32_t>(sizeof(ExtentDescriptor)),
                          entry.offset, entry.offset + entry.length, req_one);
  int error = store_.extents(entry.offset, entry.length, req_one, writer);
  std::uint32_t bytes = writer.finish();
  if (error == 0 && bytes == 0) error = EIO;  // a reply needs at least one extent
  if (error) {
    complete(entry.tag, completion_status(error));
    return;
  }
  complete(entry.tag, 0, bytes, channel_.publish_data(data, bytes));
}

void ChannelHandler::finish(const InFlight& request, int error) {
  if (in_flight_ > 0) --in_flight_;
  if (!serving_ || request.generation != generation_) return;  // nobody waits for it any more
  if (request.op == Op::Read && error == 0) {
    complete(request.tag, 0, request.length, channel_.publish_data(request.data, request.length));
    return;
  }
  complete(request.tag, completion_status(error));
}

void ChannelHandler::complete(std::uint64_t tag, int status, std::uint32_t result_length, std::uint32_t data_crc) {
  CompletionEntry completion{};
  completion.tag = tag;
  completion.status = status;
  completion.result_length = result_length;
  completion.data_crc = data_crc;
  completion.generation = static_cast<std::uint32_t>(generation_);
  // Staging writes the ring: fenced like every other write to the channel.
  if (!still_ours()) return;  // nobody of ours waits for it any more
  ++completed_since_publish_;
  if (status != 0) ++errors_since_publish_;
  // Keep completion order: once one waits, later ones wait behind it.
  if (!overflow_.empty() || !completions_.stage(completion)) {
    overflow_.push_back(completion);
    return;
  }
  staged_ = true;
}

bool ChannelHandler::publish() {
  if (!serving_ || (overflow_.empty() && !staged_)) return false;
  if (!still_ours()) return false;
  while (!overflow_.empty() && completions_.stage(overflow_.front())) {
    overflow_.pop_front();
    staged_ = true;
  }
  if (!staged_) return false;
  completions_.publish();
  staged_ = false;
  ChannelControl& control = channel_.control();
  if (queue_wake_) {
    // Orders the publication before the look at the loop's flag; the loop
    // sets the flag, fences, then looks at the ring (docs/design.md,
    // Polling and doorbells): it sees the completions or we see it asleep.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (load_relaxed(control.queue_sleeping) != 0) send_wake(queue_wake_.get());
  }
  if (completed_since_publish_) add_relaxed(control.handler_completed, completed_since_publish_);
  if (errors_since_publish_) add_relaxed(control.handler_errors, errors_since_publish_);
  if (channel_.mode().flush) write_back_lines(&control.attached_generation, kLineSize);  // the handler's line
  completed_since_publish_ = errors_since_publish_ = 0;
  return true;
}

void ChannelHandler::heartbeat(std::chrono::steady_clock::time_point now, std::chrono::milliseconds interval) {
  if (!serving_ || now - last_beat_ < interval) return;
  if (!still_ours()) return;
  last_beat_ = now;
  add_relaxed(channel_.control().handler_heartbeat, std::uint64_t{1});
  if (channel_.mode().flush) write_back_lines(&channel_.control().attached_generation, kLineSize);
}

}  // namespace cbd::backend
