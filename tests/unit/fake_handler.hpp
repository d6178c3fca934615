// A backend handler thread for unit tests of the queue side: serves one
// channel from a byte vector through the real shared-memory rings, attaching
// to every new generation set up for its backend epoch.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "common/channel.hpp"
#include "common/shared_atomic.hpp"
#include "common/transport.hpp"

namespace cbd::test {

// Serves one channel from `disk` until stopped.  `pause` stops it consuming
// (a hung or dead backend); `epoch` is the backend epoch it attaches with.
class FakeHandler {
 public:
  FakeHandler(const Transport& transport, std::uint32_t channel, std::vector<std::byte>& disk, std::uint64_t epoch)
      : channel_(transport, channel), disk_(disk), epoch_(epoch) {
    thread_ = std::thread([this] { run(); });
  }
  ~FakeHandler() {
    stop_ = true;
    thread_.join();
  }
  std::atomic<bool> pause{false};
  std::atomic<std::uint64_t> served{0};
  std::atomic<std::uint32_t> largest_entry{0};

 private:
  void run() {
    std::uint64_t attached = 0;
    auto sq = channel_.submission_consumer();
    auto cq = channel_.completion_producer();
    while (!stop_) {
      std::uint64_t generation = load_acquire(channel_.control().generation);
      if (generation != 0 && generation != attached &&
          load_acquire(channel_.control().backend_epoch) == epoch_) {
        sq.reset();
        cq.reset();
        channel_.handler_attach(generation, epoch_);
        attached = generation;
      }
      if (!attached || pause) {
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        continue;
      }
      SubmissionEntry se;
      if (sq.pop(se) != PopStatus::Ok) {
        std::this_thread::sleep_for(std::chrono::microseconds(20));
        continue;
      }
      sq.release();
      largest_entry = std::max(largest_entry.load(), se.length);
      CompletionEntry ce{};
      ce.tag = se.tag;
      ce.generation = static_cast<std::uint32_t>(attached);
      std::byte* data = channel_.data(se.data_offset, se.data_length);
      bool in_range = se.offset <= disk_.size() && se.length <= disk_.size() - se.offset;
      switch (static_cast<Op>(se.op)) {
        case Op::Read:
          if (!in_range || !data) {
            ce.status = EINVAL;
            break;
          }
          std::memcpy(data, disk_.data() + se.offset, se.length);
          ce.result_length = se.length;
          break;
        case Op::Write:
          if (!in_range || !data) {
            ce.status = ENOSPC;
            break;
          }
          std::memcpy(disk_.data() + se.offset, data, se.length);
          break;
        case Op::WriteZeroes:
        case Op::Trim:
          if (!in_range) {
            ce.status = ENOSPC;
            break;
          }
          std::memset(disk_.data() + se.offset, 0, se.length);
          break;
        case Op::BlockStatus: {
          ExtentDescriptor extent{se.length, 0};
          std::memcpy(data, &extent, sizeof extent);
          ce.result_length = sizeof extent;
          break;
        }
        default:
          break;
      }
      while (!cq.push(ce) && !stop_) std::this_thread::yield();
      ++served;
    }
  }

  Channel channel_;
  std::vector<std::byte>& disk_;
  std::uint64_t epoch_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

}  // namespace cbd::test
