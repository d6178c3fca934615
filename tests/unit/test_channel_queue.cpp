// The proxy's queue side of a channel, against a handler thread in the test
// that serves entries from a byte vector through the real shared-memory
// rings: splitting of large requests, in-order READ delivery, back-pressure
// with a small data area, re-drive after a backend restart and EIO when the
// backend stays away.
#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <sys/socket.h>
#include <thread>
#include <unistd.h>

#include "client/channel_queue.hpp"
#include "client/nbd_protocol.hpp"
#include "common/channel.hpp"
#include "common/shared_atomic.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::proxy;

namespace {

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

// Collects replies; READ data must arrive in order and exactly once.
class RecordingReplier final : public Replier {
 public:
  bool read_data(const IoRequest& request, std::uint64_t offset, const void* data, std::uint32_t length) override {
    std::lock_guard lock(mutex_);
    auto& buffer = reads_[request.cookie];
    CHECK(offset == buffer.size());
    auto* bytes = static_cast<const std::byte*>(data);
    buffer.insert(buffer.end(), bytes, bytes + length);
    return true;
  }
  bool block_status(const IoRequest& request, std::span<const ExtentDescriptor> extents) override {
    std::lock_guard lock(mutex_);
    extents_[request.cookie] = extents.size();
    return true;
  }
  void finish(const IoRequest& request, int error) override {
    std::lock_guard lock(mutex_);
    CHECK(finished_.count(request.cookie) == 0);
    finished_[request.cookie] = error;
    done_.notify_all();
  }
  // Waits for `cookie` to finish; returns its error (or -1 on timeout).
  int wait(std::uint64_t cookie, std::chrono::seconds timeout = std::chrono::seconds(20)) {
    std::unique_lock lock(mutex_);
    if (!done_.wait_for(lock, timeout, [&] { return finished_.count(cookie) != 0; })) return -1;
    return finished_[cookie];
  }
  std::vector<std::byte> data(std::uint64_t cookie) {
    std::lock_guard lock(mutex_);
    return reads_[cookie];
  }

 private:
  std::mutex mutex_;
  std::condition_variable done_;
  std::map<std::uint64_t, std::vector<std::byte>> reads_;
  std::map<std::uint64_t, std::size_t> extents_;
  std::map<std::uint64_t, int> finished_;
};

// A socketpair whose one end the test writes WRITE payloads into.
struct PayloadPipe {
  int fds[2];
  PayloadPipe() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0); }
  ~PayloadPipe() {
    ::close(fds[0]);
    ::close(fds[1]);
  }
  int reader() const { return fds[0]; }
  // Writes in a thread: the payload may exceed the socket buffer.
  std::thread feed(std::vector<std::byte> payload) {
    return std::thread([this, payload = std::move(payload)] {
      std::size_t done = 0;
      while (done < payload.size()) {
        ssize_t n = ::write(fds[1], payload.data() + done, payload.size() - done);
        if (n <= 0) return;
        done += static_cast<std::size_t>(n);
      }
    });
  }
};

struct QueueFixture {
  test::ShmFile file{"queue"};
  Transport transport;
  std::vector<std::byte> disk;
  std::shared_ptr<ChannelQueue> queue;

  explicit QueueFixture(std::uint64_t data_size = 256 << 10, std::size_t disk_size = 8 << 20)
      : transport(make(file, data_size)), disk(disk_size) {
    std::mt19937 random(7);
    for (auto& b : disk) b = static_cast<std::byte>(random());
    auto word = try_claim(transport.channel_control(0).header, kNoSlot);
    REQUIRE(word);
    ExportInfo info;
    info.size = disk.size();
    info.block_max = 32u << 20;
    queue = std::make_shared<ChannelQueue>(transport, SlotClaim(&transport.channel_control(0).header, 0, *word), info,
                                           PollTunables{});
  }
  static Transport make(const test::ShmFile& file, std::uint64_t data_size) {
    FormatOptions options = test::small_options();
    options.data_size = data_size;
    return test::make_transport(file, options, 16 << 20);
  }
};

IoRequest request(std::uint64_t cookie, std::uint16_t type, std::uint64_t offset, std::uint32_t length,
                  std::uint16_t flags = 0) {
  return IoRequest{cookie, type, flags, offset, length};
}

}  // namespace

TEST_CASE("a read larger than the data area is split and delivered in order") {
  QueueFixture f(64 << 10);  // 64 KiB data area: pieces of 16 KiB
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  RecordingReplier replier;
  const std::uint32_t length = 3 << 20;
  REQUIRE(f.queue->submit(request(1, nbd::kCmdRead, 4096, length), -1, replier));
  REQUIRE(replier.wait(1) == 0);
  auto data = replier.data(1);
  REQUIRE(data.size() == length);
  CHECK(std::memcmp(data.data(), f.disk.data() + 4096, length) == 0);
  CHECK(handler.largest_entry <= (64u << 10));
  CHECK(handler.served >= length / (64u << 10));
}

TEST_CASE("a write payload is received into the data area across pieces, then reads back") {
  QueueFixture f(64 << 10);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  RecordingReplier replier;
  PayloadPipe pipe;
  std::vector<std::byte> payload(1000000 + 3);
  std::mt19937 random(11);
  for (auto& b : payload) b = static_cast<std::byte>(random());
  std::thread feeder = pipe.feed(payload);
  REQUIRE(f.queue->submit(request(2, nbd::kCmdWrite, 777, static_cast<std::uint32_t>(payload.size())), pipe.reader(),
                          replier));
  feeder.join();
  REQUIRE(replier.wait(2) == 0);
  CHECK(std::memcmp(f.disk.data() + 777, payload.data(), payload.size()) == 0);
}

TEST_CASE("many concurrent requests through a tiny data area all complete (back-pressure, no error)") {
  QueueFixture f(64 << 10);
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  // One replier per submitting thread, as one NBD connection has one reader.
  constexpr int kConnections = 4;
  RecordingReplier repliers[kConnections];
  std::vector<std::thread> submitters;
  for (int t = 0; t < kConnections; ++t) {
    submitters.emplace_back([&, t] {
      for (int i = 0; i < 50; ++i) {
        std::uint64_t cookie = static_cast<std::uint64_t>(t) * 1000 + static_cast<std::uint64_t>(i);
        // Mixed sizes: single-piece reads and multi-piece streams interleave.
        std::uint32_t length = i % 3 == 0 ? 40000 : 4096;
        CHECK(f.queue->submit(request(cookie, nbd::kCmdRead, static_cast<std::uint64_t>(i) * 4096, length), -1,
                              repliers[t]));
      }
    });
  }
  for (auto& s : submitters) s.join();
  for (int t = 0; t < kConnections; ++t)
    for (int i = 0; i < 50; ++i) {
      std::uint64_t cookie = static_cast<std::uint64_t>(t) * 1000 + static_cast<std::uint64_t>(i);
      std::uint32_t length = i % 3 == 0 ? 40000 : 4096;
      REQUIRE(repliers[t].wait(cookie) == 0);
      auto data = repliers[t].data(cookie);
      REQUIRE(data.size() == length);
      CHECK(std::memcmp(data.data(), f.disk.data() + static_cast<std::size_t>(i) * 4096, length) == 0);
    }
}

TEST_CASE("block status and write-zeroes travel without data extents of their size") {
  QueueFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  RecordingReplier replier;
  REQUIRE(f.queue->submit(request(3, nbd::kCmdWriteZeroes, 8192, 1 << 20), -1, replier));
  REQUIRE(replier.wait(3) == 0);
  std::vector<std::byte> zeros(1 << 20);
  CHECK(std::memcmp(f.disk.data() + 8192, zeros.data(), zeros.size()) == 0);
  REQUIRE(f.queue->submit(request(4, nbd::kCmdBlockStatus, 0, 65536), -1, replier));
  CHECK(replier.wait(4) == 0);
}

TEST_CASE("errors from the handler reach the replier") {
  QueueFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  RecordingReplier replier;
  REQUIRE(f.queue->submit(request(5, nbd::kCmdRead, f.disk.size() - 100, 4096), -1, replier));
  CHECK(replier.wait(5) == EINVAL);
}

TEST_CASE("outstanding entries are re-driven when a new backend epoch takes over") {
  QueueFixture f;
  std::optional<FakeHandler> old_backend;
  old_backend.emplace(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  old_backend->pause = true;  // hangs: entries sit in the ring
  RecordingReplier replier;
  for (std::uint64_t cookie = 10; cookie < 20; ++cookie)
    REQUIRE(f.queue->submit(request(cookie, nbd::kCmdRead, cookie * 4096, 8192), -1, replier));
  CHECK(replier.wait(10, std::chrono::seconds(1)) == -1);
  CHECK(f.queue->outstanding() == 10);
  old_backend.reset();  // the old instance dies with the entries unserved
  FakeHandler new_backend(f.transport, 0, f.disk, 2);
  REQUIRE(f.queue->rebind(2, std::chrono::seconds(5)));
  for (std::uint64_t cookie = 10; cookie < 20; ++cookie) {
    REQUIRE(replier.wait(cookie) == 0);
    auto data = replier.data(cookie);
    REQUIRE(data.size() == 8192);
    CHECK(std::memcmp(data.data(), f.disk.data() + cookie * 4096, 8192) == 0);
  }
}

TEST_CASE("a backend that never returns: outstanding and new requests fail with EIO, then service resumes") {
  QueueFixture f;
  std::optional<FakeHandler> backend;
  backend.emplace(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  backend->pause = true;
  RecordingReplier replier;
  REQUIRE(f.queue->submit(request(30, nbd::kCmdRead, 0, 4096), -1, replier));
  backend.reset();
  f.queue->fail_outstanding(EIO);
  CHECK(replier.wait(30) == EIO);
  REQUIRE(f.queue->submit(request(31, nbd::kCmdRead, 0, 4096), -1, replier));
  CHECK(replier.wait(31) == EIO);
  // A WRITE refused this way still consumes its payload from the socket.
  PayloadPipe pipe;
  std::vector<std::byte> payload(5000, std::byte{0x5a});
  std::thread feeder = pipe.feed(payload);
  REQUIRE(f.queue->submit(request(32, nbd::kCmdWrite, 0, 5000), pipe.reader(), replier));
  feeder.join();
  CHECK(replier.wait(32) == EIO);
  char probe;
  CHECK(::recv(pipe.reader(), &probe, 1, MSG_DONTWAIT) == -1);  // nothing left over
  FakeHandler returned(f.transport, 0, f.disk, 3);
  REQUIRE(f.queue->rebind(3, std::chrono::seconds(5)));
  REQUIRE(f.queue->submit(request(33, nbd::kCmdRead, 0, 4096), -1, replier));
  CHECK(replier.wait(33) == 0);
}

TEST_CASE("an impossible completion ring index: the queue sets the channel up again and re-drives, no hang") {
  QueueFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  handler.pause = true;  // entries wait in the ring
  RecordingReplier replier;
  for (std::uint64_t cookie = 40; cookie < 48; ++cookie)
    REQUIRE(f.queue->submit(request(cookie, nbd::kCmdRead, cookie * 4096, 4096), -1, replier));
  // A hostile peer scribbles the completion ring's producer index.
  const std::uint64_t generation = load_acquire(f.transport.channel_control(0).generation);
  store_release(f.transport.channel_control(0).cq_tail.value, 0x80000000u);
  // The handler, stuck, never rewrites it: the queue must not wait forever.
  for (int i = 0; i < 500 && load_acquire(f.transport.channel_control(0).generation) == generation; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  handler.pause = false;
  for (std::uint64_t cookie = 40; cookie < 48; ++cookie) {
    REQUIRE(replier.wait(cookie) == 0);
    auto data = replier.data(cookie);
    REQUIRE(data.size() == 4096);
    CHECK(std::memcmp(data.data(), f.disk.data() + cookie * 4096, 4096) == 0);
  }
  CHECK(load_acquire(f.transport.channel_control(0).generation) != generation);  // it was set up again
  CHECK(f.queue->outstanding() == 0);
}

TEST_CASE("fail_outstanding() while a WRITE payload is arriving finishes that request with EIO, not a hang") {
  QueueFixture f;
  FakeHandler handler(f.transport, 0, f.disk, 1);
  REQUIRE(f.queue->bind({0, 0, 1}, std::chrono::seconds(5)));
  handler.pause = true;  // the backend is gone: nothing it is given completes
  RecordingReplier replier;
  int fds[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
  std::vector<std::byte> payload(5000, std::byte{0x33});
  REQUIRE(::write(fds[1], payload.data(), 2000) == 2000);
  std::atomic<bool> submitted{false};
  std::thread submitter([&] {
    CHECK(f.queue->submit(request(50, nbd::kCmdWrite, 0, 5000), fds[0], replier));
    submitted = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));  // the payload is being received
  f.queue->fail_outstanding(EIO);
  REQUIRE(::write(fds[1], payload.data() + 2000, 3000) == 3000);
  CHECK(replier.wait(50, std::chrono::seconds(5)) == EIO);
  submitter.join();
  CHECK(submitted);
  ::close(fds[0]);
  ::close(fds[1]);
}
