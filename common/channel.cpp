#include "common/channel.hpp"

#include <algorithm>

#include "common/cache_lines.hpp"
#include "common/crc32c.hpp"
#include "common/shared_atomic.hpp"

namespace cbd {

Channel::Channel(const Transport& transport, std::uint32_t index)
    : index_(index),
      control_(&transport.channel_control(index)),
      base_(transport.channel_base(index)),
      geometry_(transport.superblock().channel),
      mode_(transport.mode()) {
  data_ = base_ + geometry_.data_offset;
  data_size_ = geometry_.data_size;
}

RingProducer<SubmissionEntry> Channel::submission_producer() const {
  return {&control_->sq_head, &control_->sq_tail, reinterpret_cast<SubmissionEntry*>(base_ + geometry_.sq_offset),
          geometry_.sq_entries, mode_};
}
RingConsumer<SubmissionEntry> Channel::submission_consumer() const {
  return {&control_->sq_head, &control_->sq_tail, reinterpret_cast<SubmissionEntry*>(base_ + geometry_.sq_offset),
          geometry_.sq_entries, mode_};
}
RingProducer<CompletionEntry> Channel::completion_producer() const {
  return {&control_->cq_tail, &control_->cq_head, reinterpret_cast<CompletionEntry*>(base_ + geometry_.cq_offset),
          geometry_.cq_entries, mode_};
}
RingConsumer<CompletionEntry> Channel::completion_consumer() const {
  return {&control_->cq_tail, &control_->cq_head, reinterpret_cast<CompletionEntry*>(base_ + geometry_.cq_offset),
          geometry_.cq_entries, mode_};
}

std::uint32_t Channel::publish_data(const void* data, std::size_t length) const {
  std::uint32_t crc = mode_.checksum ? crc32c(0, data, length) : 0;
  if (mode_.flush) write_back_lines(data, length);
  return crc;
}

bool Channel::consume_data(const void* data, std::size_t length, std::uint32_t expected_crc) const {
  for (int attempt = 0; attempt <= kChecksumRetries; ++attempt)
    if (check_data(data, length, expected_crc)) return true;
  return false;
}

bool Channel::check_data(const void* data, std::size_t length, std::uint32_t expected_crc) const {
  if (mode_.flush) invalidate_lines(data, length);
  return !mode_.checksum || crc32c(0, data, length) == expected_crc;
}

std::uint64_t Channel::queue_setup(std::uint32_t backend_id, std::uint32_t blkdev_id, std::uint64_t backend_epoch,
                                   std::uint64_t after) const {
  ChannelControl& c = *control_;
  store_relaxed(c.backend_id, backend_id);
  store_relaxed(c.blkdev_id, blkdev_id);
  store_relaxed(c.backend_epoch, backend_epoch);
  store_relaxed(c.sq_head.value, 0u);
  store_relaxed(c.cq_head.value, 0u);
  store_relaxed(c.in_flight, std::uint64_t{0});
  const std::uint64_t generation = next_generation(after);
  // Tied to this generation, so an older queue side that sets the channel
  // up later (and leaves the field alone) is never taken for one that rings.
  store_relaxed(c.queue_rings, rings_tag(generation));
  // The previous handler's announcement is not the next one's (an older
  // handler would never write it).  Not in flush mode, where writing the
  // handler's line from here would write back our stale copy of all of it;
  // no handler announces anything there.
  if (!mode_.flush) {
    store_relaxed(c.handler_doorbell, 0u);
    store_relaxed(c.handler_wakes_queue, 0u);
  }
  store_relaxed(c.queue_sleeping, 0u);
  // Release: a handler that sees the generation sees the fields above.
  store_release(c.generation, generation);
  if (mode_.flush) write_back_lines(control_, sizeof *control_);
  return generation;
}

std::uint64_t Channel::next_generation(std::uint64_t after) const {
  std::uint64_t generation = std::max(load_relaxed(control_->generation), after) + 1;
  return generation == 0 ? 1 : generation;
}

void Channel::handler_wakes(std::uint64_t generation) const {
  store_relaxed(control_->handler_wakes_queue, rings_tag(generation));
  if (mode_.flush) write_back_lines(&control_->attached_generation, kLineSize);
}

void Channel::handler_attach(std::uint64_t generation, std::uint64_t backend_epoch, std::uint32_t doorbell) const {
  ChannelControl& c = *control_;
  store_relaxed(c.sq_tail.value, 0u);
  store_relaxed(c.cq_tail.value, 0u);
  store_relaxed(c.handler_backend_epoch, backend_epoch);
  store_relaxed(c.handler_doorbell, doorbell);
  store_release(c.attached_generation, generation);
  if (mode_.flush) write_back_lines(control_, sizeof *control_);
}

bool Channel::handler_attached(std::uint64_t generation) const {
  if (mode_.flush) invalidate_lines(&control_->attached_generation, sizeof(std::uint64_t));
  return load_acquire(control_->attached_generation) == generation;
}

}  // namespace cbd
