// The handler side of one channel for tests that drive the queue side
// (ChannelEngine) for real: it attaches to whatever generation the queue
// published, takes submissions as they are published and, when the test
// says so, executes them on an in-memory disk and completes them.  No
// thread: the test decides exactly when each entry completes.  Used by the
// NbdSession unit tests and its fuzz target, so it checks rather than
// asserts (an entry whose data extent is outside the data area fails EIO).
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <vector>

#include "common/channel.hpp"
#include "common/layout.hpp"
#include "common/ring.hpp"
#include "common/shared_atomic.hpp"
#include "common/transport.hpp"

namespace cbd::test {

class DiskHandler {
 public:
  DiskHandler(const Transport& transport, std::uint32_t channel, std::uint64_t size)
      : disk(size),
        channel_(transport, channel),
        sq_(channel_.submission_consumer()),
        cq_(channel_.completion_producer()) {
    for (std::size_t i = 0; i < disk.size(); ++i) disk[i] = static_cast<std::uint8_t>(i * 7 + 3 + i / 4096);
  }

  // Step 2 of the attach protocol for the generation the queue published.
  void attach() {
    const std::uint64_t generation = load_acquire(channel_.control().generation);
    sq_.reset();
    cq_.reset();
    channel_.handler_attach(generation, 1);
  }
  // Moves every published submission to `pending` (and `seen`).
  void take() {
    SubmissionEntry entry;
    bool any = false;
    while (sq_.pop(entry) == PopStatus::Ok) {
      pending.push_back(entry);
      seen.push_back(entry);
      any = true;
    }
    if (any) sq_.release();
  }
  // Executes `entry` (unless `status` fails it) and completes it.  False
  // when the completion ring is full.
  bool answer(const SubmissionEntry& entry, int status = 0) {
    CompletionEntry completion{};
    completion.tag = entry.tag;
    completion.generation = entry.generation;
    completion.status = status == 0 ? execute(entry, completion) : status;
    if (tamper) tamper(entry, completion);
    return cq_.push(completion);
  }
  // Answers the pending entry at `index` (in publication order).
  bool answer_at(std::size_t index, int status = 0) {
    if (index >= pending.size()) return false;
    const SubmissionEntry entry = pending[index];
    pending.erase(pending.begin() + static_cast<std::ptrdiff_t>(index));
    return answer(entry, status);
  }
  void answer_all() {
    while (!pending.empty() && answer_at(0)) {
    }
  }

  // Changes a completion before it is published (a broken or hostile peer).
  std::function<void(const SubmissionEntry&, CompletionEntry&)> tamper;
  std::deque<SubmissionEntry> pending;
  std::vector<SubmissionEntry> seen;
  std::vector<std::uint8_t> disk;
  std::vector<ExtentDescriptor> extents{{4096, 0}, {4096, kExtentHole | kExtentZero}, {1u << 20, 0}};

 private:
  int execute(const SubmissionEntry& entry, CompletionEntry& completion) {
    const bool in_disk = entry.offset <= disk.size() && entry.length <= disk.size() - entry.offset;
    std::byte* data = channel_.data(entry.data_offset, entry.data_length);
    switch (static_cast<Op>(entry.op)) {
      case Op::Read:
        if (!data || !in_disk || entry.length > entry.data_length) return EIO;
        std::memcpy(data, disk.data() + entry.offset, entry.length);
        completion.result_length = entry.length;
        completion.data_crc = channel_.publish_data(data, entry.length);
        return 0;
      case Op::Write:
        if (!data || !in_disk || entry.length > entry.data_length) return EIO;
        std::memcpy(disk.data() + entry.offset, data, entry.length);
        return 0;
      case Op::Trim:
      case Op::WriteZeroes:
        if (!in_disk) return EIO;
        std::memset(disk.data() + entry.offset, 0, entry.length);
        return 0;
      case Op::BlockStatus: {
        if (!data) return EIO;
        const std::size_t bytes = std::min<std::size_t>(extents.size() * sizeof(ExtentDescriptor), entry.data_length);
        std::memcpy(data, extents.data(), bytes);
        completion.result_length = static_cast<std::uint32_t>(bytes);
        completion.data_crc = channel_.publish_data(data, bytes);
        return 0;
      }
      default: return 0;
    }
  }

  Channel channel_;
  RingConsumer<SubmissionEntry> sq_;
  RingProducer<CompletionEntry> cq_;
};

}  // namespace cbd::test
