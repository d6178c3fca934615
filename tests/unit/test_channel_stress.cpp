// Two-process stress test through a real /dev/shm transport (design §3.3,
// §3.7).  The parent plays the queue side: it allocates data extents of
// random sizes (0..64 KiB) with DataAreaAllocator, fills them with random
// bytes, puts the payload's CRC32C in data_crc and submits.  A forked child
// plays the handler side: it attaches to the same file on its own, pops
// every submission, checksums the payload itself and completes the tag with
// status 0 (match) or EBADMSG (mismatch).  The parent checks that every tag
// completes exactly once, with no mismatch, and releases the extents.
//
// At least one million entries in each memory-ordering mode: plain
// (coherent memory, acquire/release only) and checksum+flush.  The child's
// exit status reports what it saw.
#include <doctest/doctest.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "common/channel.hpp"
#include "common/crc32c.hpp"
#include "common/data_area.hpp"
#include "common/poller.hpp"
#include "common/shared_atomic.hpp"
#include "tests/unit/shm_fixture.hpp"

using namespace cbd;
using cbd::test::ShmFile;
using Clock = std::chrono::steady_clock;

namespace {

constexpr std::uint64_t kEntries = 1'000'000;
constexpr std::uint32_t kMaxPayload = 64 * 1024;
constexpr auto kStallLimit = std::chrono::seconds(60);  // no progress this long = hung

// Child exit codes.
enum ChildExit : int {
  kChildOk = 0,
  kChildMismatch = 1,     // at least one payload failed its checksum
  kChildBadEntry = 2,     // an entry with an impossible extent / op
  kChildStalled = 3,      // the queue side stopped
  kChildCorrupt = 4,      // PopStatus::Corrupt or Broken
  kChildNotAttached = 5,  // no generation to attach to
};

const char* child_exit_name(int code) {
  switch (code) {
    case kChildOk: return "ok";
    case kChildMismatch: return "payload checksum mismatch";
    case kChildBadEntry: return "entry with an impossible extent";
    case kChildStalled: return "stalled (queue side stopped)";
    case kChildCorrupt: return "corrupt entry or broken ring";
    case kChildNotAttached: return "channel never set up";
    case 100: return "exception";
    case -1: return "killed after timeout";
    default: return "signal or unknown";
  }
}

// xorshift64*: fast enough to fill ~1.5 GB of payload per mode.
struct Random {
  std::uint64_t state;
  std::uint64_t next() {
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545F4914F6CDD1Dull;
  }
  void fill(std::byte* p, std::uint32_t length) {
    std::uint32_t i = 0;
    for (; i + 8 <= length; i += 8) {
      std::uint64_t word = next();
      std::memcpy(p + i, &word, 8);
    }
    if (i < length) {
      std::uint64_t word = next();
      std::memcpy(p + i, &word, length - i);
    }
  }
};

// Random sizes over the whole 0..64 KiB range, weighted to small ones so a
// million entries stay within seconds (also under ASan): one in 64 is
// uniform in 0..64 KiB, the rest uniform in 0..1 KiB.
std::uint32_t pick_length(Random& random) {
  std::uint64_t r = random.next();
  if ((r & 63) == 0) return static_cast<std::uint32_t>((r >> 8) % (kMaxPayload + 1));
  return static_cast<std::uint32_t>((r >> 8) % 1025);
}

// Handler side, in the child.  Returns its exit code.
int run_handler(const std::string& path) {
  Transport transport = Transport::attach(path);  // its own mapping, its own attach
  Channel channel(transport, 0);
  ChannelControl& control = channel.control();
  const std::uint64_t generation = load_acquire(control.generation);
  if (generation == 0) return kChildNotAttached;
  channel.handler_attach(generation, load_relaxed(control.backend_epoch));

  auto submissions = channel.submission_consumer();
  auto completions = channel.completion_producer();
  AdaptivePoller poller;
  std::uint64_t handled = 0, mismatches = 0, bad = 0;
  auto last_progress = Clock::now();
  SubmissionEntry entry;
  while (handled < kEntries) {
    PopStatus status = submissions.pop(entry);
    if (status == PopStatus::Empty) {
      completions.publish();
      submissions.release();
      if (Clock::now() - last_progress > kStallLimit) return kChildStalled;
      poller.idle();
      continue;
    }
    if (status != PopStatus::Ok) {
      std::fprintf(stderr, "handler: pop returned %d after %llu entries\n", static_cast<int>(status),
                   static_cast<unsigned long long>(handled));
      return kChildCorrupt;
    }
    poller.active();
    last_progress = Clock::now();
    CompletionEntry done{};
    done.tag = entry.tag;
    const std::byte* data = channel.data(entry.data_offset, entry.data_length);
    if (!data || entry.op != static_cast<std::uint16_t>(Op::Write) || entry.length != entry.data_length ||
        entry.data_length > kMaxPayload) {
      done.status = EINVAL;
      ++bad;
    } else {
      // Flush mode: invalidate before reading; checksum mode: verified by
      // the library too.  Then our own independent check of the payload.
      bool library_ok = channel.consume_data(data, entry.data_length, entry.data_crc);
      std::uint32_t crc = crc32c(0, data, entry.data_length);
      done.data_crc = crc;
      done.result_length = entry.data_length;
      if (crc != entry.data_crc || !library_ok) {
        done.status = EBADMSG;
        ++mismatches;
      }
    }
    while (!completions.stage(done)) {
      completions.publish();
      submissions.release();
      if (Clock::now() - last_progress > kStallLimit) return kChildStalled;
      poller.idle();
    }
    ++handled;
    if ((handled & 31) == 0) {
      completions.publish();
      submissions.release();
    }
  }
  completions.publish();
  submissions.release();
  if (bad) return kChildBadEntry;
  return mismatches ? kChildMismatch : kChildOk;
}

void stress(bool checksum, bool flush) {
  ShmFile file("stress");
  FormatOptions options;
  options.size = 0;
  options.hosts = 2;
  options.backends = 2;
  options.blkdevs = 2;
  options.channels = 1;
  options.data_size = 4 << 20;
  options.sq_entries = 256;
  options.cq_entries = 256;
  options.checksum = checksum;
  options.flush = flush;
  Transport transport = cbd::test::make_transport(file, options, 8 << 20);
  REQUIRE(transport.mode().checksum == checksum);
  REQUIRE(transport.mode().flush == flush);
  Channel channel(transport, 0);
  const std::uint64_t generation = channel.queue_setup(0, 0, 1);

  const auto start = Clock::now();
  const pid_t child = cbd::test::spawn([&] { return run_handler(file.path()); });
  REQUIRE(child > 0);

  // Parent: the queue side.
  std::vector<std::uint8_t> state(kEntries + 1, 0);  // 0 not sent, 1 in flight, 2 completed
  std::vector<std::uint32_t> extent(kEntries + 1, 0);
  std::vector<std::uint32_t> sent_crc(kEntries + 1, 0);
  DataAreaAllocator allocator(channel.data_size());
  auto submissions = channel.submission_producer();
  auto completions = channel.completion_consumer();
  AdaptivePoller poller;
  Random random{0x9e3779b97f4a7c15ull ^ (checksum ? 1 : 0) ^ (flush ? 2 : 0)};

  std::uint64_t submitted = 0, completed = 0, payload_bytes = 0;
  std::uint64_t duplicates = 0, unknown = 0, failed_status = 0, crc_echo_wrong = 0, release_failed = 0;
  std::uint64_t corrupt = 0, bad_extent = 0;
  bool stalled = false, child_gone = false;
  int child_status = -100;
  std::uint32_t pending_length = 0;
  bool have_pending = false;
  auto last_progress = Clock::now();

  // Wait for the handler to attach (step 3 of the protocol).
  while (!channel.handler_attached(generation)) {
    if (Clock::now() - start > kStallLimit) {
      stalled = true;
      break;
    }
    poller.idle();
  }

  while (!stalled && completed < kEntries) {
    bool progress = false;
    // Submit as much as the ring and the data area take.
    while (submitted < kEntries) {
      if (!have_pending) {
        pending_length = pick_length(random);
        have_pending = true;
      }
      if (submissions.free_slots() == 0) break;
      auto offset = allocator.allocate(pending_length);
      if (!offset) break;
      std::byte* data = channel.data(*offset, pending_length);
      if (!data) {
        ++bad_extent;
        stalled = true;
        break;
      }
      random.fill(data, pending_length);
      std::uint32_t crc = channel.publish_data(data, pending_length);  // flush mode: write back
      if (!checksum) crc = crc32c(0, data, pending_length);
      const std::uint64_t tag = ++submitted;
      SubmissionEntry entry{};
      entry.op = static_cast<std::uint16_t>(Op::Write);
      entry.tag = tag;
      entry.offset = tag * 4096;
      entry.length = pending_length;
      entry.data_offset = *offset;
      entry.data_length = pending_length;
      entry.data_crc = crc;
      REQUIRE(submissions.stage(entry));
      state[tag] = 1;
      extent[tag] = *offset;
      sent_crc[tag] = crc;
      payload_bytes += pending_length;
      have_pending = false;
      progress = true;
      if ((submitted & 15) == 0) submissions.publish();
    }
    submissions.publish();

    // Reap completions.
    CompletionEntry done;
    for (;;) {
      PopStatus status = completions.pop(done);
      if (status == PopStatus::Empty) break;
      if (status != PopStatus::Ok) {
        ++corrupt;
        stalled = true;
        break;
      }
      progress = true;
      if (done.tag == 0 || done.tag > kEntries) {
        ++unknown;
        continue;
      }
      if (state[done.tag] != 1) {
        ++duplicates;  // completed twice, or before it was sent
        continue;
      }
      state[done.tag] = 2;
      ++completed;
      if (done.status != 0) ++failed_status;
      if (done.data_crc != sent_crc[done.tag]) ++crc_echo_wrong;
      if (!allocator.release(extent[done.tag])) ++release_failed;
    }
    completions.release();

    if (progress) {
      poller.active();
      last_progress = Clock::now();
    } else {
      if (Clock::now() - last_progress > kStallLimit) stalled = true;
      // A handler that died early will never complete anything.
      if ((completed & 0xff) == 0) {
        int status = 0;
        if (::waitpid(child, &status, WNOHANG) == child) {
          child_gone = true;
          child_status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
          break;
        }
      }
      poller.idle();
    }
  }
  if (!child_gone) child_status = cbd::test::wait_child(child, stalled ? std::chrono::seconds(1) : kStallLimit);
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  MESSAGE((checksum ? "checksum" : "plain") << (flush ? "+flush" : "") << ": " << completed << " entries, "
                                            << payload_bytes / (1 << 20) << " MiB of payload in " << seconds
                                            << " s; handler exit: " << child_exit_name(child_status));
  CHECK_MESSAGE(child_status == kChildOk, "handler exit status " << child_status << " ("
                                                                 << child_exit_name(child_status) << ")");
  CHECK_FALSE(stalled);
  CHECK(submitted == kEntries);
  CHECK(completed == kEntries);
  CHECK(duplicates == 0);
  CHECK(unknown == 0);
  CHECK(failed_status == 0);
  CHECK(crc_echo_wrong == 0);
  CHECK(release_failed == 0);
  CHECK(corrupt == 0);
  CHECK(bad_extent == 0);
  std::uint64_t not_completed = 0;
  for (std::uint64_t tag = 1; tag <= kEntries; ++tag) not_completed += state[tag] != 2;
  CHECK(not_completed == 0);
  CHECK(allocator.outstanding() == 0);
  // The shared indices agree with what both sides moved.
  CHECK(load_acquire(channel.control().sq_head.value) == static_cast<std::uint32_t>(kEntries));
  CHECK(load_acquire(channel.control().sq_tail.value) == static_cast<std::uint32_t>(kEntries));
  CHECK(load_acquire(channel.control().cq_tail.value) == static_cast<std::uint32_t>(kEntries));
  CHECK(load_acquire(channel.control().cq_head.value) == static_cast<std::uint32_t>(kEntries));
}

}  // namespace

TEST_CASE("channel stress: 1M entries between two processes, plain (coherent) mode") { stress(false, false); }

TEST_CASE("channel stress: 1M entries between two processes, checksum + flush mode") { stress(true, true); }
