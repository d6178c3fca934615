// What one peer can cost the backend (design §7): a queue side that keeps
// its completion ring full, keeps producing while the backend stops, or
// sends writes whose data checksum is always wrong.  Each must cost a
// bounded amount of memory and time, and the other channels of the same
// handler thread keep being served.
#include <doctest/doctest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "plugin/backend_service.hpp"
#include "plugin/handler.hpp"
#include "plugin/inline_store_queue.hpp"
#include "plugin/memory_store.hpp"
#include "queue_driver.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::backend;
using namespace std::chrono_literals;
using cbd::test::make_entry;
using cbd::test::make_io;

namespace {

constexpr std::uint64_t kMiB = 1 << 20;
constexpr std::uint64_t kExportSize = 64 * kMiB;

FormatOptions bounds_options(bool checksum = false) {
  FormatOptions options = test::small_options();
  options.channels = 2;
  options.data_size = 4 * kMiB;
  options.sq_entries = 256;
  options.cq_entries = 64;  // smaller than the ring of submissions: the overflow case
  options.checksum = checksum;
  return options;
}

// A ChannelHandler driven by hand (no handler thread): the test decides
// when entries are taken, finished and published.
struct HandlerRig {
  test::ShmFile file{"bounds"};
  Transport transport = test::make_transport(file, bounds_options(), 24 * kMiB);
  MemoryStore store{kExportSize};
  ExportLimits limits{kExportSize, block_max_for(4 * kMiB), false};
  BackendFence fence;  // armed first thing: this rig owns backend slot 0
  ChannelHandler handler{transport, 0, store, limits, fence};
  InlineStoreQueue queue{store, 64};
  InFlightTable table{64};
  std::unique_ptr<test::QueueDriver> driver;
  std::uint64_t taken = 0;  // entries the handler took (each owes one completion)

  HandlerRig() {
    SlotHeader& backend = transport.backend(0).header;
    const auto word = try_claim(backend, kNoSlot);
    REQUIRE(word.has_value());
    fence.arm(backend, epoch_of(*word), transport.mode());
    // The driver claims channel 0 and waits for a handler to attach: play
    // the handler thread's discovery here.
    std::thread attacher([this] {
      ChannelControl& control = transport.channel_control(0);
      const auto deadline = std::chrono::steady_clock::now() + 20s;
      while (load_acquire(control.generation) == 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(1ms);
      handler.attach(load_acquire(control.generation), 1);
    });
    driver = std::make_unique<test::QueueDriver>(transport, 0, 1);
    attacher.join();
    REQUIRE(driver->channel_index() == 0);
  }

  // Fills the submission ring: reads (they go to the store) and entries of
  // an unknown operation (they complete at once), alternately.
  unsigned fill() {
    unsigned staged = 0;
    for (;;) {
      SubmissionEntry entry = staged % 2 ? make_io(Op::Read, 0, 4096, 0) : make_entry(Op::Read, 0, 0);
      if (staged % 2 == 0) entry.op = 99;
      if (!driver->stage(entry)) break;
      ++staged;
    }
    driver->publish();
    return staged;
  }

  // One loop of a handler thread over this channel.
  void turn(bool stopping) {
    if (stopping)
      taken += handler.fail_waiting(ESHUTDOWN);
    else
      taken += handler.take_entries(queue, table, 32);
    std::vector<StoreCompletion> done;
    queue.reap(done, false);
    for (const StoreCompletion& completion : done) {
      InFlight request = table.take(completion.user_data);
      if (request.channel) request.channel->finish(request, completion.error);
    }
    handler.publish();
  }
};

// Runs `stop` with a watchdog: when it has not returned after `limit`,
// `unblock` is called (so the test ends instead of hanging) and the wait
// goes on.  Returns how long `stop` took.
template <typename Stop, typename Unblock>
std::chrono::steady_clock::duration timed_stop(Stop stop, Unblock unblock, std::chrono::seconds limit) {
  const auto started = std::chrono::steady_clock::now();
  auto done = std::async(std::launch::async, stop);
  if (done.wait_for(limit) != std::future_status::ready) unblock();
  done.get();
  return std::chrono::steady_clock::now() - started;
}

// Collects log lines for the lifetime of the object.
class LogCapture {
 public:
  LogCapture() {
    set_log_sink([this](LogLevel, const std::string& line) {
      std::lock_guard lock(mutex_);
      lines_.push_back(line);
    });
  }
  ~LogCapture() { set_log_sink(nullptr); }
  LogCapture(const LogCapture&) = delete;
  LogCapture& operator=(const LogCapture&) = delete;
  std::size_t count(const std::string& text) {
    std::lock_guard lock(mutex_);
    std::size_t n = 0;
    for (const std::string& line : lines_) n += line.find(text) != std::string::npos;
    return n;
  }

 private:
  std::mutex mutex_;
  std::vector<std::string> lines_;
};

BackendConfig bounds_config() {
  BackendConfig config;
  config.export_name = "bounds";
  config.hostname = "storage";
  config.handlers = 1;  // every channel on one handler thread
  config.queue_depth = 64;
  return config;
}

}  // namespace

TEST_CASE("a queue side that keeps its completion ring full costs at most one ring of unposted completions") {
  HandlerRig rig;
  const std::uint32_t cq_capacity = rig.driver->channel().completion_producer().capacity();
  std::uint64_t staged = 0;
  std::size_t most_unposted = 0;
  // It never pops a completion, and refills the submission ring each turn.
  for (int round = 0; round < 200; ++round) {
    staged += rig.fill();
    rig.turn(false);
    most_unposted = std::max(most_unposted, rig.handler.unposted());
    REQUIRE(rig.handler.unposted() <= cq_capacity);
  }
  // The same while the backend stops.
  for (int round = 0; round < 200; ++round) {
    staged += rig.fill();
    rig.turn(true);
    most_unposted = std::max(most_unposted, rig.handler.unposted());
    REQUIRE(rig.handler.unposted() <= cq_capacity);
  }
  MESSAGE("most unposted completions: ", most_unposted, " (completion ring: ", cq_capacity, ")");
  CHECK(rig.handler.in_flight() == 0);

  // Nothing was lost: once the queue side takes completions, every entry
  // the handler took arrives, and only those.
  std::uint64_t completions = 0;
  for (int round = 0; round < 100; ++round) {
    while (rig.driver->pop(0ms)) ++completions;
    rig.turn(true);
  }
  while (rig.driver->pop(0ms)) ++completions;
  CHECK_FALSE(rig.handler.has_unposted());
  CHECK(completions == rig.taken);
  CHECK(rig.taken <= staged);
}

TEST_CASE("fail_waiting fails at most one ring's worth, however much the queue side keeps producing") {
  HandlerRig rig;
  const std::uint32_t sq_capacity = rig.driver->sq_capacity();
  std::uint64_t failed = 0, shut_down = 0;
  for (int round = 0; round < 100; ++round) {
    rig.fill();
    failed += rig.handler.fail_waiting(ESHUTDOWN);
    rig.handler.publish();
    while (auto completion = rig.driver->pop(0ms)) shut_down += completion->status == ESHUTDOWN;
  }
  CHECK(failed <= sq_capacity);
  CHECK(failed >= sq_capacity / 2);  // it did drain, as far as the bound
  CHECK(shut_down == failed);
  CHECK(rig.handler.fail_waiting(ESHUTDOWN) == 0);
}

TEST_CASE("a queue side that keeps producing while the backend stops cannot hold the stop") {
  // Taking its completions (the ring never fills, so draining alone would
  // never end) or leaving them (they pile up).
  for (const bool takes_completions : {true, false}) {
    CAPTURE(takes_completions);
    test::ShmFile file("bounds-stop");
    Transport transport = test::make_transport(file, bounds_options(), 24 * kMiB);
    MemoryStore store(kExportSize);
    BackendService service(transport, store, bounds_config());
    service.start();
    test::QueueDriver driver(transport, service.backend_index(), service.backend_epoch());
    const std::uint32_t sq_capacity = driver.sq_capacity();

    std::atomic<bool> stop_peer{false};
    std::atomic<std::uint64_t> shut_down{0}, staged{0};
    std::thread peer([&] {
      std::uint64_t own_shut_down = 0;
      while (!stop_peer.load()) {
        for (unsigned i = 0; takes_completions && i < 4096; ++i) {
          auto completion = driver.pop(0ms);
          if (!completion) break;
          if (completion->status == ESHUTDOWN) shut_down = ++own_shut_down;
        }
        SubmissionEntry entry = make_entry(Op::Flush, 0, 0);
        while (driver.stage(entry)) {
          ++staged;
          entry = make_entry(Op::Flush, 0, 0);
        }
        driver.publish();
        std::this_thread::yield();
      }
    });
    // Let traffic flow first.
    const auto warm_up = std::chrono::steady_clock::now() + 5s;
    while (staged.load() < 4 * sq_capacity && std::chrono::steady_clock::now() < warm_up)
      std::this_thread::sleep_for(1ms);

    // On a loaded machine the queue side is still producing when the stop
    // ends; if the stop hangs, the watchdog stops the peer after 20 s so
    // the test fails instead of hanging.
    const auto took = timed_stop([&] { service.stop(); }, [&] { stop_peer = true; }, 20s);
    stop_peer = true;
    peer.join();
    MESSAGE("stop took ", std::chrono::duration_cast<std::chrono::milliseconds>(took).count(), " ms; ",
            shut_down.load(), " entries failed with ESHUTDOWN");
    CHECK(took < 5s);
    CHECK_FALSE(service.running());
    // What the peer produced during the stop beyond one ring's worth was
    // left in the ring, not failed one by one.
    CHECK(shut_down.load() <= sq_capacity);
  }
}

TEST_CASE("checksum mode: a channel whose every write checksum is wrong cannot starve its neighbour") {
  test::ShmFile file("bounds-crc");
  Transport transport = test::make_transport(file, bounds_options(true), 24 * kMiB);
  REQUIRE(transport.mode().checksum);
  MemoryStore store(kExportSize);
  BackendService service(transport, store, bounds_config());
  service.start();
  test::QueueDriver good(transport, service.backend_index(), service.backend_epoch(), "good");
  test::QueueDriver bad(transport, service.backend_index(), service.backend_epoch(), "bad");
  REQUIRE(good.channel_index() != bad.channel_index());

  // The hostile peer: the largest writes it may send (the whole data area),
  // every one with a wrong CRC, the ring kept full.  It runs only while
  // `hostile` is set, and counts what it is owed.
  const std::uint32_t bad_length = static_cast<std::uint32_t>(bad.data_size());
  std::memset(bad.data(0, bad_length), 0x5a, bad_length);
  const std::uint32_t wrong_crc = crc32c(0, bad.data(0, bad_length), bad_length) ^ 1;
  std::atomic<bool> hostile{false}, quit{false};
  std::atomic<std::uint64_t> bad_outstanding{0}, bad_eio{0}, bad_other{0};
  std::thread attacker([&] {
    while (!quit.load()) {
      while (auto completion = bad.pop(0ms)) {
        --bad_outstanding;
        (completion->status == EIO ? bad_eio : bad_other)++;
      }
      if (hostile.load()) {
        SubmissionEntry entry = make_io(Op::Write, 0, bad_length, 0);
        entry.data_crc = wrong_crc;
        while (bad_outstanding.load() < 4 && bad.stage(entry)) {
          ++bad_outstanding;
          entry = make_io(Op::Write, 0, bad_length, 0);
          entry.data_crc = wrong_crc;
        }
        bad.publish();
      }
      std::this_thread::sleep_for(1ms);
    }
  });

  // The measured peer: 8 writes of 256 KiB in flight, checksummed right.
  constexpr std::uint32_t kLength = 256 * 1024;
  constexpr unsigned kDepth = 8;
  std::vector<std::uint32_t> crcs;
  for (unsigned i = 0; i < kDepth; ++i) {
    std::memset(good.data(i * kLength, kLength), static_cast<int>(i + 1), kLength);
    crcs.push_back(good.channel().publish_data(good.data(i * kLength, kLength), kLength));
  }
  auto submit = [&](unsigned i) {
    SubmissionEntry entry = make_io(Op::Write, i * kLength, kLength, i * kLength);
    entry.tag = i + 1;
    entry.data_crc = crcs[i];
    REQUIRE(good.push(entry));
  };
  // Bytes per second written by the good peer over `period`.
  auto measure = [&](std::chrono::milliseconds period) {
    for (unsigned i = 0; i < kDepth; ++i) submit(i);
    std::uint64_t bytes = 0;
    const auto started = std::chrono::steady_clock::now();
    const auto end = started + period;
    for (;;) {
      auto completion = good.pop(20s);
      REQUIRE(completion);
      REQUIRE(completion->status == 0);
      bytes += kLength;
      if (std::chrono::steady_clock::now() >= end) break;
      submit(static_cast<unsigned>(completion->tag - 1));
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    for (unsigned i = 1; i < kDepth; ++i) REQUIRE(good.pop(20s));
    return static_cast<double>(bytes) / seconds;
  };
  auto wait_bad_idle = [&] {
    const auto deadline = std::chrono::steady_clock::now() + 30s;
    while (bad_outstanding.load() > 0 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    REQUIRE(bad_outstanding.load() == 0);
  };

  // Best of a few rounds each, interleaved, so a burst of load from
  // elsewhere on the machine does not decide the verdict.  Load from
  // elsewhere only ever lowers a round, and it can outlast one series of
  // rounds: a series that misses is measured again, up to kSeries times.
  // A handler that lets the bad channel starve the good one misses every
  // series (with the re-check pauses removed it keeps about 6%).
  constexpr int kSeries = 3;
  double alone = 0, beside = 0;
  for (int series = 0; series < kSeries; ++series) {
    alone = beside = 0;
    for (int round = 0; round < 4; ++round) {
      wait_bad_idle();
      alone = std::max(alone, measure(400ms));
      hostile = true;
      std::this_thread::sleep_for(50ms);  // its ring is full and its first writes are being checked
      beside = std::max(beside, measure(400ms));
      hostile = false;
    }
    MESSAGE("series ", series + 1, ": good channel ", alone / kMiB, " MiB/s alone, ", beside / kMiB,
            " MiB/s beside the bad one");
    if (beside >= 0.9 * alone) break;
  }
  quit = true;
  attacker.join();
  MESSAGE("bad channel: ", bad_eio.load(), " writes failed with EIO");
  CHECK(beside >= 0.9 * alone);
  CHECK(bad_eio.load() > 0);  // the bad peer was really served (and refused)
  CHECK(bad_other.load() == 0);
}

TEST_CASE("a compute node that keeps setting up a refused channel gets few log lines out of the backend") {
  LogCapture logs;
  test::ShmFile file("bounds-log");
  FormatOptions options = bounds_options();
  options.heartbeat_interval_ms = 20;  // a sweep every 20 ms
  Transport transport = test::make_transport(file, options, 24 * kMiB);
  MemoryStore store(kExportSize);
  BackendConfig config = bounds_config();
  config.allow_hosts = {"trusted"};
  BackendService service(transport, store, config);
  service.start();

  // Not in allow-hosts: every set-up is refused, and it sets up again
  // every 2 ms (a new generation for each of ~50 sweeps).
  SlotClaim host, channel;
  for (std::uint32_t i = 0; i < transport.host_count() && !host; ++i)
    if (auto word = try_claim(transport.host(i).header, kNoSlot)) {
      host = SlotClaim(&transport.host(i).header, i, *word);
      write_name(transport.host(i).hostname, "intruder");
    }
  REQUIRE(host);
  ChannelControl& control = transport.channel_control(0);
  auto word = try_claim(control.header, host.index());
  REQUIRE(word);
  channel = SlotClaim(&control.header, 0, *word);
  Channel view(transport, 0);
  std::uint64_t setups = 0;
  const auto end = std::chrono::steady_clock::now() + 1s;
  while (std::chrono::steady_clock::now() < end) {
    host.beat();
    channel.beat();
    view.queue_setup(service.backend_index(), 0, service.backend_epoch());
    ++setups;
    std::this_thread::sleep_for(2ms);
  }
  CHECK_FALSE(view.handler_attached(load_acquire(control.generation)));
  service.stop();
  const std::size_t warnings = logs.count("not in allow-hosts");
  MESSAGE(setups, " set-ups, ", warnings, " warnings");
  CHECK(warnings >= 1);  // it is said
  CHECK(warnings <= 2);  // once per 10 s, not once per generation
}

TEST_CASE("a stopping handler does not answer an entry of another generation") {
  HandlerRig rig;
  SubmissionEntry stale = make_entry(Op::Flush, 0, 0);
  stale.generation = static_cast<std::uint32_t>(rig.driver->generation()) + 5;
  REQUIRE(rig.driver->push(stale));
  SubmissionEntry current = make_entry(Op::Flush, 0, 0);
  REQUIRE(rig.driver->push(current));
  CHECK(rig.handler.fail_waiting(ESHUTDOWN) == 1);
  rig.handler.publish();
  auto completion = rig.driver->pop(100ms);
  REQUIRE(completion);
  CHECK(completion->tag == current.tag);
  CHECK(completion->status == ESHUTDOWN);
  CHECK_FALSE(rig.driver->pop(50ms));
}
