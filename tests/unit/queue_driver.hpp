// A minimal queue side of one channel for driving a real backend in tests:
// it registers a host, claims a channel bound to a backend, runs the attach
// protocol (ChannelControl in layout.hpp), keeps both slots beating so the
// backend never judges them dead, pushes submission entries whose data
// extents the test fills in the data area itself, and pops completions.
//
// It is deliberately much simpler than the proxy's ChannelEngine: no data
// area allocator, no splitting, no re-drive — each test places its own
// extents, so what the backend sees is exactly what the test wrote.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>

#include "common/channel.hpp"
#include "common/layout.hpp"
#include "common/ring.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

namespace cbd::test {

inline SubmissionEntry make_entry(Op op, std::uint64_t offset, std::uint32_t length, std::uint32_t data_offset = 0,
                                  std::uint32_t data_length = 0, std::uint16_t flags = 0) {
  SubmissionEntry entry{};
  entry.op = static_cast<std::uint16_t>(op);
  entry.flags = flags;
  entry.offset = offset;
  entry.length = length;
  entry.data_offset = data_offset;
  entry.data_length = data_length;
  return entry;
}

// Read and write entries carry a data extent as long as the request.
inline SubmissionEntry make_io(Op op, std::uint64_t offset, std::uint32_t length, std::uint32_t data_offset = 0,
                               std::uint16_t flags = 0) {
  return make_entry(op, offset, length, data_offset, length, flags);
}

class QueueDriver {
 public:
  // Claims a host slot named `hostname` and the first free channel, binds the
  // channel to (backend_id, backend_epoch) and waits until a handler
  // attaches.  Throws std::runtime_error when any step fails or times out.
  QueueDriver(const Transport& transport, std::uint32_t backend_id, std::uint64_t backend_epoch,
              const std::string& hostname = "compute",
              std::chrono::milliseconds attach_timeout = std::chrono::seconds(20))
{
    for (std::uint32_t i = 0; i < transport.host_count() && !host_; ++i) {
      HostSlot& slot = transport.host(i);
      if (auto word = try_claim(slot.header, kNoSlot)) {
        host_ = SlotClaim(&slot.header, i, *word);
        write_name(slot.hostname, hostname);
      }
    }
    if (!host_) throw std::runtime_error("queue driver: no free host slot");
    for (std::uint32_t i = 0; i < transport.channel_count() && !channel_claim_; ++i) {
      ChannelControl& control = transport.channel_control(i);
      if (auto word = try_claim(control.header, host_.index())) channel_claim_ = SlotClaim(&control.header, i, *word);
    }
    if (!channel_claim_) throw std::runtime_error("queue driver: no free channel");
    channel_ = Channel(transport, channel_claim_.index());
    // Beat before the backend's first sweep could judge either slot dead;
    // a loaded machine may delay this thread, so beat well within the
    // heartbeat interval.
    const auto interval =
        std::chrono::milliseconds(std::max<std::uint32_t>(transport.superblock().heartbeat_interval_ms / 4, 5));
    beater_ = std::thread([this, interval] {
      while (!stop_beating_.load()) {
        host_.beat();
        channel_claim_.beat();
        std::this_thread::sleep_for(interval);
      }
    });
    submissions_ = channel_.submission_producer();
    completions_ = channel_.completion_consumer();
    backend_id_ = backend_id;
    backend_epoch_ = backend_epoch;
    if (!setup(attach_timeout)) {
      shutdown();
      throw std::runtime_error("queue driver: no handler attached channel " + std::to_string(channel_.index()) +
                               " within the timeout");
    }
  }
  QueueDriver(const QueueDriver&) = delete;
  QueueDriver& operator=(const QueueDriver&) = delete;
  ~QueueDriver() { shutdown(); }

  const Channel& channel() const { return channel_; }
  std::uint32_t channel_index() const { return channel_.index(); }
  std::uint32_t host_index() const { return host_.index(); }
  std::uint64_t generation() const { return generation_; }
  std::uint64_t data_size() const { return channel_.data_size(); }
  std::uint32_t sq_capacity() const { return submissions_.capacity(); }

  // The data area bytes [offset, offset + length); throws when outside.
  std::byte* data(std::uint64_t offset, std::uint64_t length) const {
    std::byte* p = channel_.data(offset, length);
    if (!p) throw std::runtime_error("queue driver: data extent outside the data area");
    return p;
  }

  // Stages an entry (a fresh tag unless one is set, stamped with the
  // current generation unless one is set); false when the ring is full.
  bool stage(SubmissionEntry& entry) {
    if (entry.tag == 0) entry.tag = next_tag_++;
    if (entry.generation == 0) entry.generation = static_cast<std::uint32_t>(generation_);
    return submissions_.stage(entry);
  }
  void publish() { submissions_.publish(); }
  bool push(SubmissionEntry& entry) {
    if (!stage(entry)) return false;
    publish();
    return true;
  }

  // The next completion, or nullopt after `timeout`.
  std::optional<CompletionEntry> pop(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      CompletionEntry completion{};
      PopStatus status = completions_.pop(completion);
      if (status == PopStatus::Ok) {
        completions_.release();
        return completion;
      }
      if (status != PopStatus::Empty)
        throw std::runtime_error("queue driver: completion ring is corrupt or its indices are impossible");
      if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
  }

  // Pushes one entry and waits for its completion (entries complete in
  // order here: the test has nothing else in flight).
  CompletionEntry call(SubmissionEntry entry, std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    if (!push(entry)) throw std::runtime_error("queue driver: submission ring full");
    auto completion = pop(timeout);
    if (!completion) throw std::runtime_error("queue driver: no completion for tag " + std::to_string(entry.tag));
    if (completion->tag != entry.tag)
      throw std::runtime_error("queue driver: completion for tag " + std::to_string(completion->tag) +
                               ", expected " + std::to_string(entry.tag));
    return *completion;
  }

  // Runs the attach protocol again (a new generation, as after a backend
  // restart): whatever the old generation had in the rings is abandoned.
  // False when no handler attaches within `timeout`.
  bool setup(std::chrono::milliseconds timeout = std::chrono::seconds(20)) {
    generation_ = channel_.queue_setup(backend_id_, 0, backend_epoch_);
    submissions_.reset();
    completions_.reset();
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!channel_.handler_attached(generation_)) {
      if (std::chrono::steady_clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  }

  // Stops beating and releases the channel and host slots.  Idempotent.
  void shutdown() {
    if (beater_.joinable()) {
      stop_beating_ = true;
      beater_.join();
    }
    channel_claim_.reset();
    host_.reset();
  }

 private:
  SlotClaim host_;
  SlotClaim channel_claim_;
  Channel channel_;
  RingProducer<SubmissionEntry> submissions_;
  RingConsumer<CompletionEntry> completions_;
  std::uint32_t backend_id_ = 0;
  std::uint64_t backend_epoch_ = 0;
  std::uint64_t generation_ = 0;
  std::uint64_t next_tag_ = 1;
  std::atomic<bool> stop_beating_{false};
  std::thread beater_;
};

}  // namespace cbd::test
