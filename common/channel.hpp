// One channel of a transport: bounds-checked views of its control block,
// rings and data area, and the attach protocol (see ChannelControl in
// layout.hpp).  Used by both sides: the queue side (cbd-proxy) produces
// submissions and consumes completions; the handler side (backend) does the
// reverse.
#pragma once

#include <cstdint>

#include "common/layout.hpp"
#include "common/ring.hpp"
#include "common/transport.hpp"

namespace cbd {

// The queue_rings value of a set-up for `generation`: its low 32 bits, never 0.
inline std::uint32_t rings_tag(std::uint64_t generation) {
  const auto tag = static_cast<std::uint32_t>(generation);
  return tag != 0 ? tag : 1u;
}

class Channel {
 public:
  Channel() = default;
  Channel(const Transport& transport, std::uint32_t index);

  std::uint32_t index() const { return index_; }
  ChannelControl& control() const { return *control_; }
  MemoryMode mode() const { return mode_; }
  std::uint64_t data_size() const { return data_size_; }

  // The bytes [offset, offset + length) of the data area, or nullptr when
  // any part lies outside it (offsets come from a peer: never trusted).
  std::byte* data(std::uint64_t offset, std::uint64_t length) const {
    if (offset > data_size_ || length > data_size_ - offset) return nullptr;
    return data_ + offset;
  }

  RingProducer<SubmissionEntry> submission_producer() const;
  RingConsumer<SubmissionEntry> submission_consumer() const;
  RingProducer<CompletionEntry> completion_producer() const;
  RingConsumer<CompletionEntry> completion_consumer() const;

  // Data written for the peer to read: checksum (when enabled) and write back
  // (flush mode).  Returns the CRC32C to put in the entry (0 when disabled).
  std::uint32_t publish_data(const void* data, std::size_t length) const;
  // Data about to be read from the peer: invalidate (flush mode) and verify
  // the checksum (re-reading on mismatch).  False when it stays wrong.
  bool consume_data(const void* data, std::size_t length, std::uint32_t expected_crc) const;
  // One pass of the same, no re-reading: for a caller that spaces its
  // retries out itself (the handler, which must not spend them back to back).
  bool check_data(const void* data, std::size_t length, std::uint32_t expected_crc) const;

  // Queue side, step 1 of the attach protocol.  Returns the new generation.
  // The new generation is above both the one in the control block and
  // `after` (the caller's last), so a scribbled control block cannot make a
  // generation come round again.
  // It also says that we ring the handler's doorbell (docs/design.md,
  // Polling and doorbells) and clears what the last handler announced.
  std::uint64_t queue_setup(std::uint32_t backend_id, std::uint32_t blkdev_id, std::uint64_t backend_epoch,
                            std::uint64_t after = 0) const;
  // The generation queue_setup(…, after) would publish now.
  std::uint64_t next_generation(std::uint64_t after) const;
  // Handler side, step 2.  `doorbell`: 1 + the BackendSlot::doorbell word
  // the handler sleeps on, 0 for none (docs/design.md, Doorbells).
  void handler_attach(std::uint64_t generation, std::uint64_t backend_epoch, std::uint32_t doorbell = 0) const;
  // Handler side: from now on it wakes the queue loop of `generation`.
  void handler_wakes(std::uint64_t generation) const;
  // True once the handler serves `generation` (step 3).
  bool handler_attached(std::uint64_t generation) const;

 private:
  std::uint32_t index_ = 0;
  ChannelControl* control_ = nullptr;
  std::byte* base_ = nullptr;
  std::byte* data_ = nullptr;
  std::uint64_t data_size_ = 0;
  ChannelGeometry geometry_{};
  MemoryMode mode_{};
};

}  // namespace cbd
