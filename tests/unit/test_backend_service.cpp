// The real backend (BackendService, handler threads, ChannelHandler, FileStore
// and MemoryStore) driven through a real channel by a minimal queue side
// (queue_driver.hpp).  Every operation is proven against what the backing
// file holds afterwards — its bytes read with pread and its allocation map
// read with SEEK_DATA/SEEK_HOLE — not against what the backend says.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/crc32c.hpp"
#include "common/error.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "plugin/backend_fence.hpp"
#include "plugin/backend_service.hpp"
#include "plugin/file_store.hpp"
#include "plugin/handler.hpp"
#include "plugin/inline_store_queue.hpp"
#include "plugin/memory_store.hpp"
#include "plugin/range_op_slicer.hpp"
#include "plugin/store_turn.hpp"
#include "queue_driver.hpp"
#include "shm_fixture.hpp"

using namespace cbd;
using namespace cbd::backend;
using cbd::test::make_entry;
using cbd::test::make_io;
using Bytes = std::vector<std::byte>;

namespace {

constexpr std::uint64_t kKiB = 1024;
constexpr std::uint64_t kMiB = 1024 * kKiB;
constexpr std::uint64_t kExportSize = 16 * kMiB;
constexpr std::uint64_t kDataSize = 4 * kMiB;
constexpr std::uint32_t k64K = 64 * 1024;

// Holes are punched at file-system block granularity; 64 KiB-aligned ranges
// are whole blocks on tmpfs and ext4 alike.  Both are exercised: tmpfs for
// /dev/shm, and whatever /tmp is (ext4 on most machines).
const char* const kBackingDirs[] = {"/dev/shm", "/tmp"};

FormatOptions transport_options() {
  FormatOptions options = test::small_options();
  options.channels = 2;
  options.data_size = kDataSize;
  options.sq_entries = 256;  // the stop test keeps 200 entries in the ring at once
  options.cq_entries = 256;
  return options;
}

BackendConfig backend_config() {
  BackendConfig config;
  config.export_name = "unit";
  config.hostname = "storage";
  config.handlers = 1;
  config.queue_depth = 64;
  return config;
}

Bytes pattern(std::size_t length, unsigned seed) {
  Bytes bytes(length);
  std::mt19937 random(seed);
  for (auto& b : bytes) b = static_cast<std::byte>(random() | 1);  // never zero: zeros must come from the backend
  return bytes;
}

bool all_zero(const Bytes& bytes) {
  for (std::byte b : bytes)
    if (b != std::byte{0}) return false;
  return true;
}

// A sparse backing file, removed on scope exit.
class BackingFile {
 public:
  BackingFile(const std::string& dir, std::uint64_t size) {
    static std::atomic<unsigned> counter{0};
    path_ = dir + "/cbd-unit-backing-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
    fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    REQUIRE_MESSAGE(fd_ >= 0, "cannot create ", path_, ": ", std::strerror(errno));
    REQUIRE(::ftruncate(fd_, static_cast<off_t>(size)) == 0);
  }
  ~BackingFile() {
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  BackingFile(const BackingFile&) = delete;
  BackingFile& operator=(const BackingFile&) = delete;

  const std::string& path() const { return path_; }

  Bytes read(std::uint64_t offset, std::size_t length) const {
    Bytes bytes(length);
    std::size_t done = 0;
    while (done < length) {
      ssize_t got = ::pread(fd_, bytes.data() + done, length - done, static_cast<off_t>(offset + done));
      REQUIRE(got > 0);
      done += static_cast<std::size_t>(got);
    }
    return bytes;
  }
  void write(std::uint64_t offset, const Bytes& bytes) const {
    REQUIRE(::pwrite(fd_, bytes.data(), bytes.size(), static_cast<off_t>(offset)) ==
            static_cast<ssize_t>(bytes.size()));
  }
  // Every byte of the range is allocated data.
  bool all_data(std::uint64_t offset, std::uint64_t length) const {
    off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data != static_cast<off_t>(offset)) return false;
    off_t hole = ::lseek(fd_, static_cast<off_t>(offset), SEEK_HOLE);
    return hole >= static_cast<off_t>(offset + length);
  }
  // No byte of the range is data.
  bool all_hole(std::uint64_t offset, std::uint64_t length) const {
    off_t data = ::lseek(fd_, static_cast<off_t>(offset), SEEK_DATA);
    if (data < 0) return errno == ENXIO;
    return data >= static_cast<off_t>(offset + length);
  }
  std::uint64_t allocated_bytes() const {
    struct stat st{};
    REQUIRE(::fstat(fd_, &st) == 0);
    return static_cast<std::uint64_t>(st.st_blocks) * 512;
  }
  // The allocation map of [offset, offset + length) as the file system
  // reports it: (length, is_hole) runs, in order.
  std::vector<std::pair<std::uint64_t, bool>> map(std::uint64_t offset, std::uint64_t length) const {
    std::vector<std::pair<std::uint64_t, bool>> runs;
    const std::uint64_t end = offset + length;
    std::uint64_t position = offset;
    while (position < end) {
      off_t data = ::lseek(fd_, static_cast<off_t>(position), SEEK_DATA);
      std::uint64_t data_start = data < 0 ? end : std::min<std::uint64_t>(static_cast<std::uint64_t>(data), end);
      if (data_start > position) {
        runs.emplace_back(data_start - position, true);
        position = data_start;
        continue;
      }
      off_t hole = ::lseek(fd_, static_cast<off_t>(position), SEEK_HOLE);
      REQUIRE(hole >= 0);
      std::uint64_t data_end = std::min<std::uint64_t>(static_cast<std::uint64_t>(hole), end);
      runs.emplace_back(data_end - position, false);
      position = data_end;
    }
    return runs;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

// Everything between the transport and the channel: a transport in
// /dev/shm, a started backend on `store`, and a queue side attached to it.
struct Rig {
  test::ShmFile transport_file{"backend"};
  Transport transport;
  std::unique_ptr<Store> store;
  std::unique_ptr<BackendService> service;
  std::unique_ptr<test::QueueDriver> driver;

  explicit Rig(std::unique_ptr<Store> backing_store, BackendConfig config = backend_config(),
               const FormatOptions& format = transport_options())
      : transport(test::make_transport(transport_file, format, 16 * kMiB)),
        store(std::move(backing_store)) {
    service = std::make_unique<BackendService>(transport, *store, std::move(config));
    service->start();
    driver = std::make_unique<test::QueueDriver>(transport, service->backend_index(), service->backend_epoch());
  }
  ~Rig() {
    driver.reset();
    service.reset();
  }

  CompletionEntry call(const SubmissionEntry& entry) { return driver->call(entry); }

  int write(std::uint64_t offset, const Bytes& bytes, std::uint16_t flags = 0, std::uint32_t data_offset = 0) {
    std::byte* data = driver->data(data_offset, bytes.size());
    std::memcpy(data, bytes.data(), bytes.size());
    SubmissionEntry entry = make_io(Op::Write, offset, static_cast<std::uint32_t>(bytes.size()), data_offset, flags);
    // Checksum mode: the CRC of the extent; flush mode: write it back.
    entry.data_crc = driver->channel().publish_data(data, bytes.size());
    return call(entry).status;
  }

  // Reads through the channel; a failed read fails the test.
  Bytes read(std::uint64_t offset, std::uint32_t length, std::uint32_t data_offset = 0) {
    // Poison the extent so stale bytes from an earlier request cannot pass.
    std::memset(driver->data(data_offset, length), 0xee, length);
    CompletionEntry done = call(make_io(Op::Read, offset, length, data_offset));
    CHECK(done.status == 0);
    CHECK(done.result_length == length);
    const std::byte* data = driver->data(data_offset, length);
    return Bytes(data, data + length);
  }

  int op(Op op, std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0) {
    return call(make_entry(op, offset, length, 0, 0, flags)).status;
  }

  // Block status with room for `capacity` descriptors.
  std::vector<ExtentDescriptor> block_status(std::uint64_t offset, std::uint32_t length, std::uint16_t flags = 0,
                                             std::uint32_t capacity = 256) {
    const std::uint32_t bytes = capacity * static_cast<std::uint32_t>(sizeof(ExtentDescriptor));
    std::memset(driver->data(0, bytes), 0xee, bytes);
    CompletionEntry done = call(make_entry(Op::BlockStatus, offset, length, 0, bytes, flags));
    REQUIRE(done.status == 0);
    REQUIRE(done.result_length % sizeof(ExtentDescriptor) == 0);
    REQUIRE(done.result_length <= bytes);
    std::vector<ExtentDescriptor> extents(done.result_length / sizeof(ExtentDescriptor));
    std::memcpy(extents.data(), driver->data(0, done.result_length), done.result_length);
    return extents;
  }
};

std::unique_ptr<FileStore> file_store(const BackingFile& file, bool read_only = false) {
  FileStoreOptions options;
  options.path = file.path();
  options.read_only = read_only;
  return std::make_unique<FileStore>(options);
}

// Merges neighbouring runs of equal kind (a descriptor may be split).
std::vector<std::pair<std::uint64_t, bool>> runs_of(const std::vector<ExtentDescriptor>& extents) {
  std::vector<std::pair<std::uint64_t, bool>> runs;
  for (const ExtentDescriptor& e : extents) {
    bool hole = (e.flags & kExtentHole) != 0;
    if (!runs.empty() && runs.back().second == hole)
      runs.back().first += e.length;
    else
      runs.emplace_back(e.length, hole);
  }
  return runs;
}

using Runs = std::vector<std::pair<std::uint64_t, bool>>;

std::string describe(const Runs& runs) {
  std::string text;
  for (const auto& [length, hole] : runs) text += (hole ? " hole:" : " data:") + std::to_string(length);
  return text.empty() ? " (none)" : text;
}

}  // namespace

// Compares allocation maps and shows both when they differ.
#define CHECK_MAP(got, want)                                                                     \
  do {                                                                                           \
    const Runs got_runs = (got), want_runs = (want);                                             \
    CHECK_MESSAGE(got_runs == want_runs, "backend:", describe(got_runs), "\nfile:   ", describe(want_runs)); \
  } while (0)

TEST_CASE("backend on a file: written bytes read back and are in the file") {
  for (const char* dir : kBackingDirs) {
    CAPTURE(dir);
    BackingFile file(dir, kExportSize);
    Rig rig(file_store(file));

    const Bytes aligned = pattern(k64K, 1);
    REQUIRE(rig.write(kMiB, aligned) == 0);
    CHECK(rig.read(kMiB, k64K, 512 * 1024) == aligned);
    CHECK(file.read(kMiB, k64K) == aligned);

    // Byte-granular offsets, lengths and data extents.
    const Bytes odd = pattern(5003, 2);
    REQUIRE(rig.write(12345, odd, 0, 777) == 0);
    CHECK(rig.read(12345, 5003, 4099) == odd);
    CHECK(file.read(12345, 5003) == odd);
    CHECK(all_zero(file.read(12345 - 100, 100)));

    // The largest single entry (block_max = the data area) and the last
    // bytes of the export.
    const Bytes big = pattern(static_cast<std::size_t>(rig.service->limits().block_max), 3);
    REQUIRE(big.size() == kDataSize);
    REQUIRE(rig.write(8 * kMiB, big) == 0);
    CHECK(file.read(8 * kMiB, big.size()) == big);
    CHECK(rig.read(8 * kMiB, static_cast<std::uint32_t>(big.size())) == big);
    const Bytes tail = pattern(4097, 4);
    REQUIRE(rig.write(kExportSize - tail.size(), tail) == 0);
    CHECK(file.read(kExportSize - tail.size(), tail.size()) == tail);

    // Zero-length read and write complete without touching anything.
    CHECK(rig.call(make_io(Op::Read, 0, 0)).status == 0);
    CHECK(rig.call(make_io(Op::Write, kExportSize, 0)).status == 0);

    // The data the backend wrote is what the handler reads back from
    // outside the page the test wrote (no write-through of stale extents).
    file.write(2 * kMiB, pattern(4096, 5));
    CHECK(rig.read(2 * kMiB, 4096) == pattern(4096, 5));
  }
}

TEST_CASE("backend on a file: FUA writes and flush complete with status 0 and land in the file") {
  BackingFile file("/dev/shm", kExportSize);
  Rig rig(file_store(file));
  const Bytes bytes = pattern(3 * 4096 + 17, 6);
  CHECK(rig.write(3 * kMiB + 5, bytes, kFlagFua) == 0);
  CHECK(file.read(3 * kMiB + 5, bytes.size()) == bytes);
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
  REQUIRE(rig.write(4 * kMiB, bytes) == 0);
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
  CHECK(file.read(4 * kMiB, bytes.size()) == bytes);
  // Flush ignores its range (NBD sends 0/0, but any is valid).
  CHECK(rig.op(Op::Flush, 123, 456) == 0);
  // Cache is advisory and succeeds.
  CHECK(rig.op(Op::Cache, 0, 1 * kMiB) == 0);
  CHECK(rig.op(Op::Cache, kExportSize - 1, 1) == 0);
  const ChannelControl& control = rig.driver->channel().control();
  // The last completion's statistics may land just after it is visible.
  CHECK(load_relaxed(control.handler_completed) >= 6);
  CHECK(load_relaxed(control.handler_errors) == 0);
}

TEST_CASE("backend on a file: trim punches holes that read back as zeros") {
  for (const char* dir : kBackingDirs) {
    CAPTURE(dir);
    BackingFile file(dir, kExportSize);
    Rig rig(file_store(file));
    const std::uint64_t base = 2 * kMiB;
    const Bytes bytes = pattern(4 * k64K, 7);
    REQUIRE(rig.write(base, bytes) == 0);
    REQUIRE(rig.op(Op::Flush, 0, 0) == 0);
    REQUIRE(file.all_data(base, bytes.size()));

    CHECK(rig.op(Op::Trim, base + k64K, 2 * k64K) == 0);
    CHECK(file.all_hole(base + k64K, 2 * k64K));
    CHECK(file.all_data(base, k64K));
    CHECK(file.all_data(base + 3 * k64K, k64K));
    CHECK(all_zero(rig.read(base + k64K, 2 * k64K)));
    CHECK(rig.read(base, k64K) == Bytes(bytes.begin(), bytes.begin() + k64K));
    CHECK(rig.read(base + 3 * k64K, k64K) == Bytes(bytes.begin() + 3 * k64K, bytes.end()));

    // With FUA, and a trim of an already empty range.
    CHECK(rig.op(Op::Trim, base, k64K, kFlagFua) == 0);
    CHECK(file.all_hole(base, 3 * k64K));
    CHECK(rig.op(Op::Trim, 10 * kMiB, k64K) == 0);
    CHECK(file.all_hole(10 * kMiB, k64K));
  }
}

TEST_CASE("backend on a file: write-zeroes reads back zeros, keeping the range allocated with NO_HOLE") {
  for (const char* dir : kBackingDirs) {
    CAPTURE(dir);
    BackingFile file(dir, kExportSize);
    Rig rig(file_store(file));

    // Without NO_HOLE: zeros; the range may become a hole.
    const std::uint64_t a = 4 * kMiB;
    const Bytes bytes = pattern(4 * k64K, 8);
    REQUIRE(rig.write(a, bytes) == 0);
    REQUIRE(rig.op(Op::Flush, 0, 0) == 0);
    CHECK(rig.op(Op::WriteZeroes, a + k64K, 2 * k64K) == 0);
    CHECK(all_zero(file.read(a + k64K, 2 * k64K)));
    CHECK(all_zero(rig.read(a + k64K, 2 * k64K)));
    CHECK(file.read(a, k64K) == Bytes(bytes.begin(), bytes.begin() + k64K));
    CHECK(file.read(a + 3 * k64K, k64K) == Bytes(bytes.begin() + 3 * k64K, bytes.end()));

    // With NO_HOLE: zeros, and the blocks stay allocated.
    const std::uint64_t b = 6 * kMiB;
    REQUIRE(rig.write(b, bytes) == 0);
    REQUIRE(rig.op(Op::Flush, 0, 0) == 0);
    REQUIRE(file.all_data(b, bytes.size()));
    const std::uint64_t allocated_before = file.allocated_bytes();
    CHECK(rig.op(Op::WriteZeroes, b + k64K, 2 * k64K, kFlagNoHole) == 0);
    CHECK(all_zero(file.read(b + k64K, 2 * k64K)));
    CHECK(all_zero(rig.read(b + k64K, 2 * k64K)));
    CHECK(file.read(b, k64K) == Bytes(bytes.begin(), bytes.begin() + k64K));
    CHECK(file.allocated_bytes() >= allocated_before);
    CHECK(file.all_data(b, bytes.size()));

    // Unaligned, with FUA, in the middle of data.
    CHECK(rig.op(Op::WriteZeroes, b + 1000, 3000, kFlagFua | kFlagNoHole) == 0);
    CHECK(all_zero(file.read(b + 1000, 3000)));
    CHECK(file.read(b, 1000) == Bytes(bytes.begin(), bytes.begin() + 1000));
    CHECK(file.read(b + 4000, 96) == Bytes(bytes.begin() + 4000, bytes.begin() + 4096));
  }
}

TEST_CASE("backend on a file: fast zero either zeroes or fails with ENOTSUP at once") {
  for (const char* dir : kBackingDirs) {
    CAPTURE(dir);
    BackingFile file(dir, kExportSize);
    Rig rig(file_store(file));
    CHECK((rig.service->caps() & kCapFastZero) != 0);
    for (std::uint16_t extra : {std::uint16_t{0}, kFlagNoHole}) {
      CAPTURE(extra);
      const std::uint64_t offset = (extra ? 9 : 7) * kMiB;
      const Bytes bytes = pattern(2 * k64K, 9);
      REQUIRE(rig.write(offset, bytes) == 0);
      auto started = std::chrono::steady_clock::now();
      int status = rig.op(Op::WriteZeroes, offset, 2 * k64K, kFlagFastZero | extra);
      auto took = std::chrono::steady_clock::now() - started;
      CHECK((status == 0 || status == ENOTSUP));
      // "At once": no writing of zeros behind the client's back.  Generous
      // for a loaded machine; writing the range would not be slow either,
      // but the outcome check below is what matters.
      CHECK(took < std::chrono::seconds(5));
      if (status == 0) {
        CHECK(all_zero(file.read(offset, 2 * k64K)));
      } else {
        CHECK(file.read(offset, 2 * k64K) == bytes);  // a refused fast zero leaves the data alone
      }
    }
  }
}

TEST_CASE("backend on a file: block status descriptors match the file's holes and data") {
  for (const char* dir : kBackingDirs) {
    CAPTURE(dir);
    BackingFile file(dir, kExportSize);
    // Data at 1 MiB (64 KiB), at 3 MiB (128 KiB) and in the last 64 KiB;
    // holes elsewhere.
    file.write(kMiB, pattern(k64K, 10));
    file.write(3 * kMiB, pattern(2 * k64K, 11));
    file.write(kExportSize - k64K, pattern(k64K, 12));
    Rig rig(file_store(file));
    REQUIRE(file.all_hole(0, kMiB));
    REQUIRE(file.all_data(kMiB, k64K));

    auto extents = rig.block_status(0, static_cast<std::uint32_t>(kExportSize));
    REQUIRE(!extents.empty());
    std::uint64_t total = 0;
    for (const ExtentDescriptor& e : extents) {
      CHECK(e.length > 0);
      // A hole always reads as zeros; data is not claimed to be zero.
      if (e.flags & kExtentHole) CHECK((e.flags & kExtentZero) != 0);
      CHECK((e.flags & ~(kExtentHole | kExtentZero)) == 0);
      total += e.length;
    }
    CHECK(total == kExportSize);
    CHECK_MAP(runs_of(extents), file.map(0, kExportSize));
    // The layout the test made, as the file system reports it.
    auto runs = runs_of(extents);
    REQUIRE(runs.size() >= 5);
    CHECK(runs[0] == std::make_pair(kMiB, true));
    CHECK(runs[1] == std::make_pair(std::uint64_t{k64K}, false));

    // A range starting inside data, unaligned.
    auto inner = rig.block_status(kMiB + 100, static_cast<std::uint32_t>(2 * kMiB));
    CHECK_MAP(runs_of(inner), file.map(kMiB + 100, 2 * kMiB));
    CHECK(runs_of(inner).front() == std::make_pair(std::uint64_t{k64K - 100}, false));

    // REQ_ONE: one descriptor, the first extent (clipped to the range).
    auto one = rig.block_status(0, static_cast<std::uint32_t>(4 * kMiB), kFlagReqOne);
    REQUIRE(one.size() == 1);
    CHECK(one[0].length == kMiB);
    CHECK(one[0].flags == (kExtentHole | kExtentZero));

    // Descriptors written at an odd data offset (no alignment assumed).
    {
      const std::uint32_t odd = 4096 + 3, bytes = 16 * sizeof(ExtentDescriptor);
      CompletionEntry done = rig.call(make_entry(Op::BlockStatus, 0, static_cast<std::uint32_t>(4 * kMiB), odd, bytes));
      REQUIRE(done.status == 0);
      std::vector<ExtentDescriptor> unaligned(done.result_length / sizeof(ExtentDescriptor));
      REQUIRE(!unaligned.empty());
      std::memcpy(unaligned.data(), rig.driver->data(odd, done.result_length), done.result_length);
      CHECK_MAP(runs_of(unaligned), file.map(0, 4 * kMiB));
    }

    // Room for two descriptors only: a correct prefix of the map.
    auto two = rig.block_status(0, static_cast<std::uint32_t>(kExportSize), 0, 2);
    REQUIRE(two.size() == 2);
    CHECK(two[0].length == kMiB);
    CHECK(two[1].length == k64K);
    CHECK(two[1].flags == 0);

    // After writes and trims through the backend, the map follows.
    REQUIRE(rig.write(5 * kMiB, pattern(k64K, 13)) == 0);
    REQUIRE(rig.op(Op::Trim, 3 * kMiB, k64K) == 0);
    REQUIRE(rig.op(Op::Flush, 0, 0) == 0);
    auto after = rig.block_status(2 * kMiB, static_cast<std::uint32_t>(4 * kMiB));
    CHECK_MAP(runs_of(after), file.map(2 * kMiB, 4 * kMiB));
    CHECK(file.all_data(5 * kMiB, k64K));
    CHECK(file.all_hole(3 * kMiB, k64K));
  }
}

TEST_CASE("backend on a file: malformed and out-of-range entries fail with the right errno, traffic keeps flowing") {
  BackingFile file("/dev/shm", kExportSize);
  const Bytes content = pattern(4096, 14);
  file.write(0, content);
  Rig rig(file_store(file));
  const auto data_size = static_cast<std::uint32_t>(rig.driver->data_size());
  const std::uint32_t block_max = rig.service->limits().block_max;
  REQUIRE(block_max == kDataSize);

  struct Bad {
    const char* what;
    SubmissionEntry entry;
    int expected;
  };
  auto with_op = [](std::uint16_t op) {
    SubmissionEntry e = make_io(Op::Read, 0, 4096);
    e.op = op;
    return e;
  };
  SubmissionEntry mismatched_write = make_io(Op::Write, 0, 4096);
  mismatched_write.data_length = 4095;
  SubmissionEntry mismatched_read = make_io(Op::Read, 0, 4096);
  mismatched_read.data_length = 8192;
  const Bad cases[] = {
      {"unknown op 0 (a zeroed entry)", with_op(0), EINVAL},
      {"unknown op 99", with_op(99), EINVAL},
      {"unknown op 8", with_op(kOpMax + 1), EINVAL},
      {"unknown flag bit", make_io(Op::Read, 0, 4096, 0, 1u << 7), EINVAL},
      {"unknown high flag bit", make_io(Op::Write, 0, 4096, 0, 0x8000), EINVAL},
      {"FUA on read", make_io(Op::Read, 0, 4096, 0, kFlagFua), EINVAL},
      {"NO_HOLE on write", make_io(Op::Write, 0, 4096, 0, kFlagNoHole), EINVAL},
      {"REQ_ONE on read", make_io(Op::Read, 0, 4096, 0, kFlagReqOne), EINVAL},
      {"FUA on flush", make_entry(Op::Flush, 0, 0, 0, 0, kFlagFua), EINVAL},
      {"FUA on block status", make_entry(Op::BlockStatus, 0, 4096, 0, 64, kFlagFua), EINVAL},
      {"read extent past the data area", make_io(Op::Read, 0, 4096, data_size - 100), EINVAL},
      {"write extent past the data area", make_io(Op::Write, 0, 4096, data_size - 4095), EINVAL},
      {"read extent starting past the data area", make_io(Op::Read, 0, 1, data_size + 1), EINVAL},
      {"extent at the 32-bit limit", make_io(Op::Read, 0, 4096, 0xffffffffu), EINVAL},
      {"block status extent past the data area", make_entry(Op::BlockStatus, 0, 4096, data_size - 4, 64), EINVAL},
      {"block status extent too small", make_entry(Op::BlockStatus, 0, 4096, 0, 7), EINVAL},
      {"block status of nothing", make_entry(Op::BlockStatus, 0, 0, 0, 64), EINVAL},
      {"write data_length != length", mismatched_write, EINVAL},
      {"read data_length != length", mismatched_read, EINVAL},
      {"read past the end", make_io(Op::Read, kExportSize - 4095, 4096), EINVAL},
      {"read at the end", make_io(Op::Read, kExportSize, 1), EINVAL},
      {"write past the end", make_io(Op::Write, kExportSize - 1, 2), ENOSPC},
      {"write far past the end", make_io(Op::Write, 1ull << 62, 4096), ENOSPC},
      {"write-zeroes past the end", make_entry(Op::WriteZeroes, kExportSize - 4096, 8192), ENOSPC},
      {"trim past the end", make_entry(Op::Trim, kExportSize - 4096, 8192), EINVAL},
      {"cache past the end", make_entry(Op::Cache, kExportSize, 1), EINVAL},
      {"block status past the end", make_entry(Op::BlockStatus, kExportSize - 1, 2, 0, 64), EINVAL},
      {"offset + length wraps 64 bits", make_io(Op::Read, ~std::uint64_t{0} - 10, 4096), EINVAL},
      {"write offset + length wraps 64 bits", make_io(Op::Write, ~std::uint64_t{0} - 10, 4096), ENOSPC},
      {"huge read length", make_entry(Op::Read, 0, 0xffffffffu, 0, 0xffffffffu), EINVAL},
      {"huge trim length", make_entry(Op::Trim, 0, 0xffffffffu), EINVAL},
      {"huge write-zeroes length", make_entry(Op::WriteZeroes, 0, 0xffffffffu), ENOSPC},
      {"read longer than block_max", make_io(Op::Read, 0, block_max + 4096), EINVAL},
      {"write longer than block_max", make_io(Op::Write, 0, 2 * block_max), EINVAL},
  };
  for (const Bad& bad : cases) {
    CAPTURE(bad.what);
    CompletionEntry done = rig.call(bad.entry);
    CHECK(done.status == bad.expected);
    CHECK(done.result_length == 0);
    // The channel still serves valid traffic after each refusal.
    CHECK(rig.read(0, 4096, 8192) == content);
  }
  // Nothing the refused entries described reached the file.
  CHECK(file.read(0, 4096) == content);
  CHECK(file.all_hole(kExportSize - 4 * k64K, 4 * k64K));
  const ChannelControl& control = rig.driver->channel().control();
  CHECK(load_relaxed(control.handler_errors) == std::size(cases));

  // A batch mixing good and bad entries: completions come back for each,
  // the good ones succeed.
  const std::size_t kBatch = 40;
  std::map<std::uint64_t, int> expected;
  for (std::size_t i = 0; i < kBatch; ++i) {
    SubmissionEntry e = i % 2 ? cases[i % std::size(cases)].entry : make_io(Op::Read, 0, 4096, 8192);
    e.tag = 1000 + i;
    expected[e.tag] = i % 2 ? cases[i % std::size(cases)].expected : 0;
    REQUIRE(rig.driver->stage(e));
  }
  rig.driver->publish();
  for (std::size_t i = 0; i < kBatch; ++i) {
    auto done = rig.driver->pop();
    REQUIRE(done);
    REQUIRE(expected.count(done->tag) == 1);
    CHECK(done->status == expected[done->tag]);
    expected.erase(done->tag);
  }
  CHECK(expected.empty());
  CHECK(rig.read(0, 4096) == content);
}

TEST_CASE("backend on a read-only file refuses writes with EPERM") {
  BackingFile file("/dev/shm", kExportSize);
  const Bytes content = pattern(2 * k64K, 15);
  file.write(kMiB, content);
  Rig rig(file_store(file, true));
  CHECK((rig.service->caps() & kCapReadOnly) != 0);
  CHECK((load_acquire(rig.transport.backend(rig.service->backend_index()).caps) & kCapReadOnly) != 0);

  std::memcpy(rig.driver->data(0, 4096), pattern(4096, 16).data(), 4096);
  CHECK(rig.call(make_io(Op::Write, kMiB, 4096)).status == EPERM);
  CHECK(rig.call(make_io(Op::Write, kMiB, 4096, 0, kFlagFua)).status == EPERM);
  CHECK(rig.op(Op::Trim, kMiB, k64K) == EPERM);
  CHECK(rig.op(Op::WriteZeroes, kMiB, k64K) == EPERM);
  CHECK(rig.op(Op::WriteZeroes, kMiB, k64K, kFlagNoHole | kFlagFastZero) == EPERM);
  // Reads, flush, cache and block status still work.
  CHECK(rig.read(kMiB, 2 * k64K) == content);
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
  CHECK(rig.op(Op::Cache, 0, k64K) == 0);
  auto extents = rig.block_status(0, static_cast<std::uint32_t>(2 * kMiB));
  CHECK_MAP(runs_of(extents), file.map(0, 2 * kMiB));
  CHECK(file.read(kMiB, content.size()) == content);
  CHECK(file.all_data(kMiB, 2 * k64K));
}

TEST_CASE("backend on a memory store: write, read, zero, trim and block status") {
  auto memory = std::make_unique<MemoryStore>(kExportSize);
  MemoryStore& store = *memory;
  Rig rig(std::move(memory));
  CHECK(store.allocated_pages() == 0);

  const Bytes bytes = pattern(3 * MemoryStore::kPageSize + 123, 17);
  REQUIRE(rig.write(MemoryStore::kPageSize * 4 + 7, bytes) == 0);
  CHECK(rig.read(MemoryStore::kPageSize * 4 + 7, static_cast<std::uint32_t>(bytes.size()), 100) == bytes);
  Bytes direct(bytes.size());
  REQUIRE(store.pread(direct.data(), direct.size(), MemoryStore::kPageSize * 4 + 7) == 0);
  CHECK(direct == bytes);
  CHECK(store.allocated_pages() == 4);

  auto extents = rig.block_status(0, static_cast<std::uint32_t>(kExportSize));
  auto runs = runs_of(extents);
  REQUIRE(runs.size() == 3);
  CHECK(runs[0] == std::make_pair(4 * MemoryStore::kPageSize, true));
  CHECK(runs[1] == std::make_pair(4 * MemoryStore::kPageSize, false));
  CHECK(runs[2] == std::make_pair(kExportSize - 8 * MemoryStore::kPageSize, true));

  CHECK(rig.op(Op::WriteZeroes, MemoryStore::kPageSize * 5, static_cast<std::uint32_t>(MemoryStore::kPageSize)) == 0);
  CHECK(all_zero(rig.read(MemoryStore::kPageSize * 5, static_cast<std::uint32_t>(MemoryStore::kPageSize))));
  CHECK(store.allocated_pages() == 3);
  CHECK(rig.op(Op::WriteZeroes, MemoryStore::kPageSize * 6, static_cast<std::uint32_t>(MemoryStore::kPageSize),
               kFlagNoHole) == 0);
  CHECK(all_zero(rig.read(MemoryStore::kPageSize * 6, static_cast<std::uint32_t>(MemoryStore::kPageSize))));
  CHECK(rig.op(Op::Trim, MemoryStore::kPageSize * 4, static_cast<std::uint32_t>(MemoryStore::kPageSize)) == 0);
  CHECK(all_zero(rig.read(MemoryStore::kPageSize * 4, static_cast<std::uint32_t>(MemoryStore::kPageSize))));
  int fast = rig.op(Op::WriteZeroes, MemoryStore::kPageSize * 7, 64, kFlagFastZero);
  CHECK((fast == 0 || fast == ENOTSUP));
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
  CHECK(rig.op(Op::Cache, 0, 4096) == 0);
  CHECK(rig.call(make_io(Op::Write, kExportSize - 1, 2)).status == ENOSPC);
  CHECK(rig.call(make_io(Op::Read, 0, 4096, 0, kFlagFua)).status == EINVAL);
}

TEST_CASE("backend on a read-only memory store refuses writes with EPERM") {
  Rig rig(std::make_unique<MemoryStore>(kExportSize, true));
  CHECK(rig.call(make_io(Op::Write, 0, 4096)).status == EPERM);
  CHECK(rig.op(Op::Trim, 0, 4096) == EPERM);
  CHECK(rig.op(Op::WriteZeroes, 0, 4096) == EPERM);
  CHECK(all_zero(rig.read(0, 4096)));
}

TEST_CASE("stopping the backend with entries in flight completes every one and frees its slots") {
  // Several timings: stop at once, after the first completion, and after
  // the ring has been partly drained.
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    BackingFile file("/dev/shm", kExportSize);
    Rig rig(file_store(file));
    const std::uint32_t backend_index = rig.service->backend_index();
    const std::uint32_t host_index = rig.service->host_index();
    constexpr std::size_t kEntries = 200;
    constexpr std::uint32_t kLength = 16 * 1024;
    REQUIRE(kEntries * kLength <= rig.driver->data_size());
    REQUIRE(kEntries <= rig.driver->sq_capacity());

    std::map<std::uint64_t, std::size_t> index_of_tag;
    for (std::size_t i = 0; i < kEntries; ++i) {
      const bool write = i % 2 == 0;
      const auto data_offset = static_cast<std::uint32_t>(i * kLength);
      if (write) {
        Bytes bytes = pattern(kLength, static_cast<unsigned>(100 + i));
        std::memcpy(rig.driver->data(data_offset, kLength), bytes.data(), kLength);
      }
      SubmissionEntry e = make_io(write ? Op::Write : Op::Read, i * kLength, kLength, data_offset,
                                  write && i % 4 == 0 ? kFlagFua : 0);
      REQUIRE(rig.driver->stage(e));
      index_of_tag[e.tag] = i;
    }
    rig.driver->publish();

    std::vector<CompletionEntry> done;
    if (round >= 1) {
      auto first = rig.driver->pop();
      REQUIRE(first);
      done.push_back(*first);
    }
    if (round == 2) {
      while (done.size() < 20) {
        auto next = rig.driver->pop();
        REQUIRE(next);
        done.push_back(*next);
      }
    }
    const auto stop_started = std::chrono::steady_clock::now();
    rig.service->stop();
    // Well inside the shutdown grace: the completion ring has room for all.
    CHECK(std::chrono::steady_clock::now() - stop_started < std::chrono::seconds(5));
    CHECK_FALSE(rig.service->running());

    // Every entry has a completion already: stop() returned after the
    // handler published them all, so none may be missing now.
    while (done.size() < kEntries) {
      auto next = rig.driver->pop(std::chrono::milliseconds(100));
      if (!next) break;
      done.push_back(*next);
    }
    CHECK(done.size() == kEntries);
    std::map<std::uint64_t, int> seen;
    std::size_t ok = 0, shut_down = 0, other = 0;
    for (const CompletionEntry& c : done) {
      CHECK(index_of_tag.count(c.tag) == 1);
      CHECK(seen.count(c.tag) == 0);
      seen[c.tag] = c.status;
      if (c.status == 0)
        ++ok;
      else if (c.status == ESHUTDOWN)
        ++shut_down;
      else
        ++other;
    }
    CHECK(seen.size() == kEntries);
    CHECK(other == 0);
    MESSAGE("round ", round, ": ", ok, " completed, ", shut_down, " failed with ESHUTDOWN");
    // A write that succeeded is in the file; a read that succeeded holds
    // the file's bytes.
    for (const auto& [tag, status] : seen) {
      if (status != 0) continue;
      const std::size_t i = index_of_tag[tag];
      if (i % 2 == 0) CHECK(file.read(i * kLength, kLength) == pattern(kLength, static_cast<unsigned>(100 + i)));
    }
    // Nothing more arrives.
    CHECK_FALSE(rig.driver->pop(std::chrono::milliseconds(50)));

    CHECK(state_of(load_acquire(rig.transport.backend(backend_index).header.state)) == SlotState::Free);
    CHECK(load_acquire(rig.transport.backend(backend_index).export_size) == 0);
    CHECK(state_of(load_acquire(rig.transport.host(host_index).header.state)) == SlotState::Free);
    // The handler told the queue side it is gone; the channel itself stays
    // with its owner (the queue side).
    const ChannelControl& control = rig.driver->channel().control();
    CHECK(load_acquire(control.attached_generation) == 0);
    CHECK(state_of(load_acquire(control.header.state)) == SlotState::Live);
    rig.service->stop();  // idempotent
  }
}

TEST_CASE("start() publishes the backend slot; a second backend on a live slot is refused") {
  BackingFile file("/dev/shm", kExportSize);
  Rig rig(file_store(file));
  BackendService& service = *rig.service;
  const BackendSlot& slot = rig.transport.backend(service.backend_index());
  CHECK(service.running());
  CHECK(state_of(load_acquire(slot.header.state)) == SlotState::Live);
  CHECK(epoch_of(load_acquire(slot.header.state)) == service.backend_epoch());
  CHECK(load_acquire(slot.export_size) == kExportSize);
  CHECK(load_relaxed(slot.caps) == caps_for(rig.store->info()));
  CHECK(load_relaxed(slot.caps) == service.caps());
  CHECK(load_relaxed(slot.block_max) == block_max_for(kDataSize));
  CHECK(load_relaxed(slot.block_max) == service.limits().block_max);
  CHECK(load_relaxed(slot.block_min) == rig.store->info().block_min);
  CHECK(read_name(slot.export_name) == "unit");
  CHECK(load_relaxed(slot.header.owner_host) == service.host_index());
  const HostSlot& host = rig.transport.host(service.host_index());
  CHECK(state_of(load_acquire(host.header.state)) == SlotState::Live);
  CHECK(read_name(host.hostname) == "storage");
  // A file store can do all of these; it is not read-only.
  const std::uint32_t expected_caps =
      kCapFlush | kCapFua | kCapTrim | kCapZero | kCapFastZero | kCapExtents | kCapCache | kCapMultiConn;
  CHECK((service.caps() & expected_caps) == expected_caps);
  CHECK((service.caps() & kCapReadOnly) == 0);
  // The heartbeat moves.
  const std::uint64_t beat = load_acquire(slot.header.heartbeat);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (load_acquire(slot.header.heartbeat) == beat && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(load_acquire(slot.header.heartbeat) != beat);

  auto live_hosts = [&] {
    unsigned n = 0;
    for (std::uint32_t i = 0; i < rig.transport.host_count(); ++i)
      n += state_of(load_acquire(rig.transport.host(i).header.state)) != SlotState::Free;
    return n;
  };
  const unsigned hosts_before = live_hosts();  // the backend's and the queue driver's

  // A second backend asking for the same slot.
  MemoryStore other_store(kExportSize);
  BackendConfig config = backend_config();
  config.backend_id = service.backend_index();
  config.hostname = "intruder";
  BackendService second(rig.transport, other_store, config);
  std::string message;
  try {
    second.start();
  } catch (const Error& e) {
    message = e.what();
  }
  CAPTURE(message);
  REQUIRE_FALSE(message.empty());
  CHECK(message.find("backend slot " + std::to_string(service.backend_index())) != std::string::npos);
  CHECK(message.find("owned by a live backend") != std::string::npos);
  CHECK_FALSE(second.running());
  // Nothing of the refused backend stays claimed, and the first one is
  // untouched and still serving.
  CHECK(live_hosts() == hosts_before);
  CHECK(state_of(load_acquire(slot.header.state)) == SlotState::Live);
  CHECK(epoch_of(load_acquire(slot.header.state)) == service.backend_epoch());
  CHECK(load_acquire(slot.export_size) == kExportSize);
  CHECK(rig.op(Op::Flush, 0, 0) == 0);

  // A backend-id beyond the transport is refused with the range.
  config.backend_id = rig.transport.backend_count();
  BackendService out_of_range(rig.transport, other_store, config);
  CHECK_THROWS_WITH_AS(out_of_range.start(), doctest::Contains("backend slots"), Error);
  CHECK(live_hosts() == hosts_before);

  // Once the first one stopped, the slot is free and backend-id= takes it
  // with a new epoch.
  const std::uint64_t old_epoch = service.backend_epoch();
  const std::uint32_t index = service.backend_index();
  rig.driver.reset();
  service.stop();
  CHECK(state_of(load_acquire(slot.header.state)) == SlotState::Free);
  config.backend_id = index;
  BackendService third(rig.transport, other_store, config);
  third.start();
  CHECK(third.backend_index() == index);
  CHECK(third.backend_epoch() > old_epoch);
  CHECK(state_of(load_acquire(slot.header.state)) == SlotState::Live);
  CHECK(load_acquire(slot.export_size) == kExportSize);
  third.stop();
  CHECK(state_of(load_acquire(slot.header.state)) == SlotState::Free);
}

TEST_CASE("backend on a checksummed transport: data CRCs are verified and produced") {
  BackingFile file("/dev/shm", kExportSize);
  FormatOptions format = transport_options();
  format.checksum = true;
  Rig rig(file_store(file), backend_config(), format);
  REQUIRE(rig.transport.mode().checksum);

  const Bytes bytes = pattern(3 * 4096 + 5, 20);
  REQUIRE(rig.write(kMiB + 1, bytes, kFlagFua, 4096) == 0);
  CHECK(file.read(kMiB + 1, bytes.size()) == bytes);

  // A read's completion carries the CRC of the bytes it put in the extent.
  std::memset(rig.driver->data(0, bytes.size()), 0, bytes.size());
  CompletionEntry read = rig.call(make_io(Op::Read, kMiB + 1, static_cast<std::uint32_t>(bytes.size())));
  REQUIRE(read.status == 0);
  CHECK(read.result_length == bytes.size());
  CHECK(read.data_crc == crc32c(0, bytes.data(), bytes.size()));
  CHECK(Bytes(rig.driver->data(0, bytes.size()), rig.driver->data(0, bytes.size()) + bytes.size()) == bytes);

  // Write data that does not match its CRC never reaches the file.
  const Bytes other = pattern(4096, 21);
  std::memcpy(rig.driver->data(8192, 4096), other.data(), 4096);
  SubmissionEntry corrupt = make_io(Op::Write, kMiB + 1, 4096, 8192);
  corrupt.data_crc = crc32c(0, other.data(), 4096) ^ 1;
  CHECK(rig.call(corrupt).status == EIO);
  CHECK(file.read(kMiB + 1, bytes.size()) == bytes);

  // Block status results are checksummed too.
  CompletionEntry status = rig.call(make_entry(Op::BlockStatus, 0, static_cast<std::uint32_t>(2 * kMiB), 0, 64));
  REQUIRE(status.status == 0);
  REQUIRE(status.result_length > 0);
  CHECK(status.data_crc == crc32c(0, rig.driver->data(0, status.result_length), status.result_length));
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
}

TEST_CASE("backend on a flush-mode transport serves reads and writes") {
  BackingFile file("/dev/shm", kExportSize);
  FormatOptions format = transport_options();
  format.flush = true;
  Rig rig(file_store(file), backend_config(), format);
  REQUIRE(rig.transport.mode().flush);
  const Bytes bytes = pattern(k64K + 7, 22);
  REQUIRE(rig.write(5 * kMiB - 3, bytes) == 0);
  CHECK(file.read(5 * kMiB - 3, bytes.size()) == bytes);
  CHECK(rig.read(5 * kMiB - 3, static_cast<std::uint32_t>(bytes.size()), 999) == bytes);
  CHECK(rig.op(Op::WriteZeroes, 5 * kMiB, k64K) == 0);
  CHECK(all_zero(file.read(5 * kMiB, k64K)));
  CHECK(rig.op(Op::Flush, 0, 0) == 0);
}

TEST_CASE("a channel set up again (new generation) or handed to a new owner is served afresh") {
  BackingFile file("/dev/shm", kExportSize);
  const Bytes content = pattern(16 * 1024, 23);
  file.write(0, content);
  Rig rig(file_store(file));
  CHECK(rig.read(0, 16 * 1024) == content);

  // Abandon a ring full of work mid-flight and set the channel up again:
  // nothing of the old generation may surface in the new one.
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const std::uint64_t old_generation = rig.driver->generation();
    for (std::uint32_t i = 0; i < 200; ++i) {
      SubmissionEntry e = make_io(i % 2 ? Op::Read : Op::Write, 4 * kMiB + i * 16384ull, 16384, i * 16384);
      e.tag = 1'000'000 + i;
      REQUIRE(rig.driver->stage(e));
    }
    rig.driver->publish();
    if (round > 0) std::this_thread::sleep_for(std::chrono::milliseconds(round));
    REQUIRE(rig.driver->setup());
    CHECK(rig.driver->generation() > old_generation);
    for (int i = 0; i < 5; ++i) {
      SubmissionEntry read = make_io(Op::Read, 0, 16 * 1024, 3 * 1024 * 1024);
      std::memset(rig.driver->data(3 * 1024 * 1024, 16 * 1024), 0xee, 16 * 1024);
      CompletionEntry done = rig.call(read);  // throws on a completion with another tag
      CHECK(done.status == 0);
      CHECK(Bytes(rig.driver->data(3 * 1024 * 1024, 16 * 1024), rig.driver->data(3 * 1024 * 1024, 16 * 1024) + 16 * 1024) ==
            content);
    }
    CHECK_FALSE(rig.driver->pop(std::chrono::milliseconds(20)));
  }

  // The queue side goes away cleanly and another one claims a channel.
  rig.driver.reset();
  rig.driver = std::make_unique<test::QueueDriver>(rig.transport, rig.service->backend_index(),
                                                   rig.service->backend_epoch(), "compute-2");
  CHECK(rig.read(0, 16 * 1024) == content);
  REQUIRE(rig.write(kMiB, content) == 0);
  CHECK(file.read(kMiB, content.size()) == content);

  // A channel bound to a former epoch of the backend is never served.
  std::string refused;
  try {
    test::QueueDriver stale(rig.transport, rig.service->backend_index(), rig.service->backend_epoch() - 1, "stale",
                            std::chrono::milliseconds(500));
  } catch (const std::runtime_error& e) {
    refused = e.what();
  }
  CHECK(refused.find("no handler attached") != std::string::npos);
}

namespace {

// A memory store whose every operation fails with one errno.
class FailingStore final : public Store {
 public:
  FailingStore(std::uint64_t size, int error) : memory_(size), error_(error) {}
  const StoreInfo& info() const override { return memory_.info(); }
  int pread(void*, std::size_t, std::uint64_t) override { return error_; }
  int pwrite(const void*, std::size_t, std::uint64_t, bool) override { return error_; }
  int flush() override { return error_; }
  int trim(std::uint64_t, std::uint64_t, bool) override { return error_; }
  int zero(std::uint64_t, std::uint64_t, bool, bool, bool) override { return error_; }
  int extents(std::uint64_t, std::uint64_t, bool, ExtentSink&) override { return error_; }
  int cache(std::uint64_t, std::uint64_t) override { return error_; }

 private:
  MemoryStore memory_;
  int error_;
};

}  // namespace

TEST_CASE("backend service: a store that fails with ESHUTDOWN completes the request with EIO") {
  // ESHUTDOWN in a completion means "not executed, the backend is stopping":
  // the queue side keeps the entry for the next instance.  A store error of
  // that number (an nbdkit plugin below the filter, a network file system)
  // is a request that ran and failed; passed on as it is, the request would
  // wait for a set-up that never comes.
  Rig rig(std::make_unique<FailingStore>(1 << 20, ESHUTDOWN));
  CHECK(rig.write(0, Bytes(4096, std::byte{1})) == EIO);
  CHECK(rig.call(make_io(Op::Read, 0, 4096, 0)).status == EIO);
  CHECK(rig.op(Op::Flush, 0, 0) == EIO);
  CHECK(rig.op(Op::Trim, 0, 4096) == EIO);
  CHECK(rig.op(Op::WriteZeroes, 0, 4096) == EIO);
  CHECK(rig.call(make_entry(Op::BlockStatus, 0, 4096, 0, 256 * sizeof(ExtentDescriptor))).status == EIO);
}

namespace {

// A memory store that records every request it is given and can hold the
// handler thread inside one write (its InlineStoreQueue runs requests in
// place): the window in which a paused backend loses its slot.
class GatedStore final : public Store {
 public:
  explicit GatedStore(std::uint64_t size) : memory_(size) {}

  const StoreInfo& info() const override { return memory_.info(); }
  int pread(void* buffer, std::size_t length, std::uint64_t offset) override {
    record(offset);
    return memory_.pread(buffer, length, offset);
  }
  int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) override {
    record(offset);
    if (offset == gate_offset_) {
      std::unique_lock<std::mutex> lock(mutex_);
      held_ = true;
      held_changed_.notify_all();
      // Bounded: a test that fails never hangs the handler thread.
      held_changed_.wait_for(lock, std::chrono::seconds(30), [this] { return open_; });
    }
    return memory_.pwrite(buffer, length, offset, fua);
  }
  int flush() override {
    record(kFlushKey);
    return 0;
  }
  int trim(std::uint64_t offset, std::uint64_t length, bool fua) override {
    record(offset);
    return memory_.trim(offset, length, fua);
  }
  int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) override {
    record(offset);
    return memory_.zero(offset, length, no_hole, fast, fua);
  }
  int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) override {
    record(offset);
    return memory_.extents(offset, length, req_one, sink);
  }
  int cache(std::uint64_t offset, std::uint64_t) override {
    record(offset);
    return 0;
  }

  // A write at `offset` waits inside the store until open_gate().
  void gate_at(std::uint64_t offset) { gate_offset_ = offset; }
  bool wait_held(std::chrono::seconds timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    return held_changed_.wait_for(lock, timeout, [this] { return held_; });
  }
  void open_gate() {
    std::lock_guard<std::mutex> lock(mutex_);
    open_ = true;
    held_changed_.notify_all();
  }
  // How many requests at `offset` the store was given.
  unsigned seen(std::uint64_t offset) const {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = seen_.find(offset);
    return it == seen_.end() ? 0 : it->second;
  }

  static constexpr std::uint64_t kFlushKey = ~std::uint64_t{0};

 private:
  void record(std::uint64_t offset) {
    std::lock_guard<std::mutex> lock(mutex_);
    ++seen_[offset];
  }

  MemoryStore memory_;
  std::atomic<std::uint64_t> gate_offset_{~std::uint64_t{0} - 1};
  mutable std::mutex mutex_;
  std::condition_variable held_changed_;
  bool held_ = false;
  bool open_ = false;
  std::map<std::uint64_t, unsigned> seen_;
};

// The channel's handler-side words: none may move once the backend is fenced.
struct HandlerWords {
  std::uint64_t attached_generation, heartbeat, completed, errors, handler_epoch;
  std::uint32_t sq_tail, cq_tail;
  bool operator==(const HandlerWords&) const = default;
};

HandlerWords handler_words(const ChannelControl& control) {
  return {load_acquire(control.attached_generation), load_acquire(control.handler_heartbeat),
          load_acquire(control.handler_completed),   load_acquire(control.handler_errors),
          load_acquire(control.handler_backend_epoch), load_acquire(control.sq_tail.value),
          load_acquire(control.cq_tail.value)};
}

constexpr std::uint32_t kFenceLength = 4096;
constexpr unsigned kFencedEntries = 8;
// Export offsets of the entries queued behind the held write.
std::uint64_t fenced_offset(unsigned i) { return (i + 1) * kMiB; }

FormatOptions fence_options() {
  FormatOptions options = transport_options();
  options.heartbeat_interval_ms = 20;
  options.dead_after_ms = 200;
  return options;
}

// Pushes, in one batch, a write the store holds and kFencedEntries writes
// and reads behind it; returns once the handler thread is inside the held one.
void push_behind_held_write(Rig& rig, GatedStore& store) {
  store.gate_at(0);
  const Bytes bytes = pattern(kFenceLength, 40);
  std::memcpy(rig.driver->data(0, kFenceLength), bytes.data(), kFenceLength);
  SubmissionEntry held = make_io(Op::Write, 0, kFenceLength, 0);
  REQUIRE(rig.driver->stage(held));
  for (unsigned i = 0; i < kFencedEntries; ++i) {
    SubmissionEntry e = make_io(i % 2 ? Op::Read : Op::Write, fenced_offset(i), kFenceLength, (i + 1) * kFenceLength);
    REQUIRE(rig.driver->stage(e));
  }
  rig.driver->publish();
  REQUIRE_MESSAGE(store.wait_held(std::chrono::seconds(20)), "the handler never reached the held write");
}

void check_none_executed(const GatedStore& store) {
  for (unsigned i = 0; i < kFencedEntries; ++i) {
    CAPTURE(i);
    CHECK(store.seen(fenced_offset(i)) == 0);
  }
}

}  // namespace

TEST_CASE("fencing: entries taken before the backend slot is taken over never reach the store") {
  auto owned = std::make_unique<GatedStore>(kExportSize);
  GatedStore& store = *owned;
  Rig rig(std::move(owned), backend_config(), fence_options());
  const ChannelControl& control = rig.driver->channel().control();
  push_behind_held_write(rig, store);

  // The handler is "paused" inside the store; meanwhile another instance
  // takes the backend slot over (backend-id= after dead-after), which
  // stores a fresh heartbeat and bumps the epoch.
  SlotHeader& header = rig.transport.backend(rig.service->backend_index()).header;
  const std::uint64_t word = load_acquire(header.state);
  const auto taken_over = try_take_over(header, word, rig.driver->host_index());
  REQUIRE(taken_over);
  store.open_gate();

  // Give the old instance ample time to run what it took, had it not been
  // fenced, and to beat (and find its slot lost).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  const HandlerWords after_fence = handler_words(control);
  check_none_executed(store);
  // Nothing completed: not the held write, not the ones behind it.
  CHECK_FALSE(rig.driver->pop(std::chrono::milliseconds(100)));
  // The old instance writes nothing to the channel any more (heartbeat,
  // counters, indices, attached_generation) and not to the slot either.
  const std::uint64_t heartbeat = load_acquire(header.heartbeat);
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  CHECK(handler_words(control) == after_fence);
  CHECK(load_acquire(header.heartbeat) == heartbeat);
  CHECK(load_acquire(header.state) == *taken_over);
  // Its host slot is released: it holds nothing.
  CHECK(state_of(load_acquire(rig.transport.host(rig.service->host_index()).header.state)) == SlotState::Free);
  rig.service->stop();  // still stops cleanly
  CHECK(handler_words(control) == after_fence);
  CHECK(load_acquire(header.state) == *taken_over);
}

TEST_CASE("fencing: entries taken before the channel is set up again never reach the store") {
  auto owned = std::make_unique<GatedStore>(kExportSize);
  GatedStore& store = *owned;
  Rig rig(std::move(owned), backend_config(), fence_options());
  push_behind_held_write(rig, store);
  const std::uint64_t old_generation = rig.driver->generation();

  // The queue side re-initialises the channel (a stall, a restart) while
  // the handler is held; the handler re-attaches only once its I/O is done.
  auto setup = std::async(std::launch::async, [&] { return rig.driver->setup(); });
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (load_acquire(rig.driver->channel().control().generation) == old_generation &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  REQUIRE(load_acquire(rig.driver->channel().control().generation) != old_generation);
  store.open_gate();
  REQUIRE(setup.get());
  check_none_executed(store);

  // The new generation is served; nothing of the old one surfaces in it.
  const Bytes bytes = pattern(kFenceLength, 41);
  REQUIRE(rig.write(12 * kMiB, bytes) == 0);
  CHECK(rig.read(12 * kMiB, kFenceLength) == bytes);
  CHECK_FALSE(rig.driver->pop(std::chrono::milliseconds(50)));
  check_none_executed(store);
}

TEST_CASE("fencing: an entry stamped with another generation is dropped; completions carry the generation") {
  auto owned = std::make_unique<GatedStore>(kExportSize);
  GatedStore& store = *owned;
  Rig rig(std::move(owned), backend_config(), fence_options());
  REQUIRE(rig.driver->setup());  // so that an older generation exists
  const auto generation = static_cast<std::uint32_t>(rig.driver->generation());
  REQUIRE(generation >= 2);

  // Stale (an older generation) and forged (a future one): neither runs nor
  // completes; the entry behind them does.
  for (std::uint32_t other : {generation - 1, generation + 1}) {
    CAPTURE(other);
    SubmissionEntry stale = make_io(Op::Write, 3 * kMiB, kFenceLength, 0);
    stale.generation = other;
    REQUIRE(rig.driver->push(stale));
    CompletionEntry next = rig.call(make_io(Op::Read, 4 * kMiB, kFenceLength, 0));  // throws on stale's tag
    CHECK(next.status == 0);
    CHECK(next.generation == generation);
    CHECK(store.seen(3 * kMiB) == 0);
  }

  // Every completion carries the generation: success, refusal, failure.
  CompletionEntry refused = rig.call(make_io(Op::Read, kExportSize, kFenceLength, 0));
  CHECK(refused.status == EINVAL);
  CHECK(refused.generation == generation);
  CompletionEntry unknown = rig.call(make_entry(static_cast<Op>(99), 0, 0));
  CHECK(unknown.status == EINVAL);
  CHECK(unknown.generation == generation);
  CompletionEntry flush = rig.call(make_entry(Op::Flush, 0, 0));
  CHECK(flush.status == 0);
  CHECK(flush.generation == generation);
  CompletionEntry status = rig.call(make_entry(Op::BlockStatus, 0, k64K, 0, 64));
  CHECK(status.status == 0);
  CHECK(status.generation == generation);

  // After a new set-up, the new generation is stamped.
  REQUIRE(rig.driver->setup());
  CompletionEntry later = rig.call(make_entry(Op::Flush, 0, 0));
  CHECK(later.generation == static_cast<std::uint32_t>(rig.driver->generation()));
  CHECK(later.generation != generation);
}

TEST_CASE("file store queue: requests not yet started when the slot is lost never reach the file") {
  BackingFile file("/var/tmp", 1 << 20);
  auto store = file_store(file);
  auto queue = store->open_queue(8);
  std::vector<std::byte> data(4096, std::byte{0x77});
  StoreRequest write;
  write.op = StoreOp::Write;
  write.fua = true;  // never done in place: it waits in the submission queue
  write.offset = 65536;
  write.length = data.size();
  write.buffer = data.data();
  write.user_data = 42;
  queue->enqueue(write);
  queue->abandon_unstarted();  // the fence tripped before the batch was submitted
  queue->submit();
  std::vector<StoreCompletion> done;
  for (int i = 0; i < 100 && done.empty(); ++i) queue->reap(done, false);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 42);
  CHECK(done[0].error == ECANCELED);
  CHECK(queue->in_flight() == 0);
  queue.reset();
  CHECK(file.read(65536, 4096) == Bytes(4096, std::byte{0}));
}

// A 4 KiB O_DIRECT read at 8 KiB of a file 9 KiB long: O_DIRECT keeps it out
// of the in-place path, and io_uring comes back short at the end of the
// file, which prepares the remainder.
struct ShortDirectRead {
  BackingFile file{"/var/tmp", 8192 + 1024};
  FileStore store{options(file)};
  std::unique_ptr<void, decltype(&std::free)> buffer{aligned_page(), &std::free};

  static FileStoreOptions options(const BackingFile& file) {
    FileStoreOptions o;
    o.path = file.path();
    o.direct = true;
    return o;
  }
  static void* aligned_page() {
    void* memory = nullptr;
    REQUIRE(::posix_memalign(&memory, 4096, 4096) == 0);
    return memory;
  }
  StoreRequest request(std::uint64_t user_data) {
    StoreRequest read;
    read.op = StoreOp::Read;
    read.offset = 8192;
    read.length = 4096;
    read.buffer = static_cast<std::byte*>(buffer.get());
    read.user_data = user_data;
    return read;
  }
};

TEST_CASE("file store queue: reap() starts nothing; a short transfer's remainder waits for the next fenced submit") {
  ShortDirectRead short_read;
  auto queue = short_read.store.open_queue(8);
  queue->enqueue(short_read.request(5));
  queue->submit();
  std::vector<StoreCompletion> done;
  // Waits for the short first part; its remainder is prepared, not started.
  queue->reap(done, true);
  REQUIRE(done.empty());
  // The slot is lost before the handler submits again (a pause right after
  // reap(), say): the remainder must never reach the file.
  queue->abandon_unstarted();
  for (int i = 0; i < 100 && done.empty(); ++i) queue->reap(done, false);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 5);
  CHECK(done[0].error == ECANCELED);
  CHECK(queue->in_flight() == 0);
}

// A request for all of `buffer` at `offset`.
StoreRequest store_request(StoreOp op, std::uint64_t offset, std::vector<std::byte>& buffer, std::uint64_t user_data) {
  StoreRequest request;
  request.op = op;
  request.offset = offset;
  request.length = buffer.size();
  request.buffer = buffer.data();
  request.user_data = user_data;
  return request;
}

bool on_memory_file_system(const std::string& dir) {
  struct statfs fs {};
  return ::statfs(dir.c_str(), &fs) == 0 && (fs.f_type == TMPFS_MAGIC || fs.f_type == RAMFS_MAGIC);
}

TEST_CASE("file store queue: a file in memory is read and written in place; a short transfer carries on from there") {
  if (!on_memory_file_system("/var/tmp")) {
    BackingFile on_disk("/var/tmp", 1 << 20);
    CHECK_FALSE(file_store(on_disk)->memory_backed());
  }

  BackingFile file("/dev/shm", 1 << 20);
  auto store = file_store(file);
  REQUIRE(store->memory_backed());
  auto queue = store->open_queue(8);
  std::vector<std::byte> data(4096, std::byte{0x5a});
  queue->enqueue(store_request(StoreOp::Write, 8192, data, 7));
  std::vector<std::byte> back(4096);
  queue->enqueue(store_request(StoreOp::Read, 8192, back, 8));
  // Done in place, inside enqueue(): a request that had gone to io_uring
  // would be cancelled here instead.
  queue->abandon_unstarted();
  std::vector<StoreCompletion> done;
  queue->reap(done, false);
  REQUIRE(done.size() == 2);
  CHECK(done[0].user_data == 7);
  CHECK(done[0].error == 0);
  CHECK(done[1].user_data == 8);
  CHECK(done[1].error == 0);
  CHECK(file.read(8192, 4096) == Bytes(data.begin(), data.end()));
  CHECK(back == data);

  // The file shrank under a read: the copy in place moves the first 1 KiB
  // and io_uring carries on from there.  The head is rewritten and the tail
  // grown back between the two, so the result shows where each part was
  // read: the old head, then the new tail.
  queue = store->open_queue(8);
  REQUIRE(::truncate(file.path().c_str(), 8192 + 1024) == 0);
  std::fill(back.begin(), back.end(), std::byte{0});
  queue->enqueue(store_request(StoreOp::Read, 8192, back, 9));
  file.write(8192, Bytes(1024, std::byte{0x11}));
  file.write(8192 + 1024, Bytes(3072, std::byte{0x22}));
  queue->submit();
  done.clear();
  for (int i = 0; i < 100 && done.empty(); ++i) queue->reap(done, true);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 9);
  CHECK(done[0].error == 0);
  Bytes expected(1024, std::byte{0x5a});
  expected.insert(expected.end(), 3072, std::byte{0x22});
  CHECK(Bytes(back.begin(), back.end()) == expected);

  // When the rest is not there either, the asynchronous part reports it.
  REQUIRE(::truncate(file.path().c_str(), 8192 + 1024) == 0);
  queue->enqueue(store_request(StoreOp::Read, 8192, back, 10));
  queue->submit();
  done.clear();
  for (int i = 0; i < 100 && done.empty(); ++i) queue->reap(done, true);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 10);
  CHECK(done[0].error == EIO);
}

TEST_CASE("file store queue: after the slot is lost, a request that could run in place never reaches the file") {
  BackingFile file("/dev/shm", 1 << 20);
  auto store = file_store(file);
  REQUIRE(store->memory_backed());
  auto queue = store->open_queue(8);
  queue->abandon_unstarted();
  std::vector<std::byte> data(4096, std::byte{0x66});
  queue->enqueue(store_request(StoreOp::Write, 0, data, 3));
  std::vector<StoreCompletion> done;
  queue->reap(done, false);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 3);
  CHECK(done[0].error == ECANCELED);
  CHECK(queue->in_flight() == 0);
  CHECK(file.read(0, 4096) == Bytes(4096, std::byte{0}));
}

TEST_CASE("file store queue: in memory, a large request and the bytes past the per-reap bound go to io_uring") {
  constexpr std::uint64_t kPiece = kInPlaceMaxRequest;
  constexpr std::uint64_t kFits = kInPlaceBytesPerReap / kPiece;  // pieces copied in place between two reaps
  BackingFile file("/dev/shm", 8 << 20);
  auto store = file_store(file);
  REQUIRE(store->memory_backed());

  // A request in io_uring is still unstarted before submit(), so
  // abandon_unstarted() cancels it: what is not cancelled ran in place.
  auto queue = store->open_queue(16);
  std::vector<std::vector<std::byte>> pieces;
  for (std::uint64_t i = 0; i <= kFits; ++i) pieces.emplace_back(kPiece, std::byte{static_cast<unsigned char>(0x40 + i)});
  std::vector<std::byte> large(kPiece + 4096, std::byte{0x33});
  queue->enqueue(store_request(StoreOp::Write, 0, large, 100));
  for (std::uint64_t i = 0; i <= kFits; ++i) queue->enqueue(store_request(StoreOp::Write, (i + 1) * 2 * kPiece, pieces[i], i));
  queue->abandon_unstarted();
  std::vector<StoreCompletion> done;
  queue->reap(done, false);
  REQUIRE(done.size() == kFits + 2);
  std::map<std::uint64_t, int> error_of;
  for (const StoreCompletion& c : done) error_of[c.user_data] = c.error;
  CHECK(error_of[100] == ECANCELED);
  CHECK(file.read(0, large.size()) == Bytes(large.size(), std::byte{0}));
  for (std::uint64_t i = 0; i < kFits; ++i) {
    CHECK(error_of[i] == 0);
    CHECK(file.read((i + 1) * 2 * kPiece, kPiece) == Bytes(pieces[i].begin(), pieces[i].end()));
  }
  CHECK(error_of[kFits] == ECANCELED);
  CHECK(file.read((kFits + 1) * 2 * kPiece, kPiece) == Bytes(kPiece, std::byte{0}));

  // The bound is per reap: after one, a piece is copied in place again, and
  // what went to io_uring still completes.
  queue = store->open_queue(16);
  queue->enqueue(store_request(StoreOp::Write, 0, large, 100));
  for (std::uint64_t i = 0; i <= kFits; ++i) queue->enqueue(store_request(StoreOp::Write, (i + 1) * 2 * kPiece, pieces[i], i));
  queue->submit();
  done.clear();
  queue->reap(done, false);
  queue->enqueue(store_request(StoreOp::Write, 2 * kPiece, pieces[kFits], 200));
  queue->abandon_unstarted();
  for (int i = 0; i < 1000 && done.size() < kFits + 3; ++i) queue->reap(done, true);
  REQUIRE(done.size() == kFits + 3);
  error_of.clear();
  for (const StoreCompletion& c : done) error_of[c.user_data] = c.error;
  CHECK(error_of[100] == 0);
  CHECK(error_of[kFits] == 0);
  CHECK(error_of[200] == 0);
  CHECK(file.read(0, large.size()) == Bytes(large.begin(), large.end()));
  CHECK(file.read(2 * kPiece, kPiece) == Bytes(pieces[kFits].begin(), pieces[kFits].end()));
}

// Runs one queue's trim or zero to its end, a submit() and reap() at a time;
// returns how many submits it took.
int run_slices(StoreQueue& queue, std::vector<StoreCompletion>& done) {
  int submits = 0;
  for (; queue.wants_another_turn() && submits < 1000; ++submits) {
    queue.submit();
    queue.reap(done, false);
  }
  return submits;
}

// Checks the slicing contract on `queue` over `store`, which exports at
// least 4 slices and a page: a long zero runs a slice per submit() while a
// read queued behind it finishes at once; abandon_unstarted() cancels what
// is left and the slices not run stay untouched.
void check_zero_runs_in_slices(Store& store, StoreQueue& queue) {
  constexpr std::uint64_t kSlices = 4;
  const Bytes pattern(kRangeOpSlice, std::byte{0x5a});
  for (std::uint64_t i = 0; i < kSlices; ++i) REQUIRE(store.pwrite(pattern.data(), pattern.size(), i * kRangeOpSlice, false) == 0);
  StoreRequest zero;
  zero.op = StoreOp::Zero;
  zero.no_hole = true;  // tmpfs has no zero-range: every byte is written
  zero.offset = 0;
  zero.length = kSlices * kRangeOpSlice;
  zero.user_data = 1;
  queue.enqueue(zero);
  std::vector<std::byte> back(4096);
  StoreRequest read;
  read.op = StoreOp::Read;
  read.offset = kSlices * kRangeOpSlice;
  read.length = back.size();
  read.buffer = back.data();
  read.user_data = 2;
  queue.enqueue(read);
  queue.submit();
  std::vector<StoreCompletion> done;
  for (int i = 0; i < 100 && done.empty(); ++i) queue.reap(done, false);
  // The read did not wait for the whole zero: one slice ran, three wait.
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 2);
  CHECK(queue.wants_another_turn());
  CHECK(queue.in_flight() == 1);
  CHECK(run_slices(queue, done) == static_cast<int>(kSlices) - 1);
  REQUIRE(done.size() == 2);
  CHECK(done[1].user_data == 1);
  CHECK(done[1].error == 0);
  Bytes got(kRangeOpSlice);
  for (std::uint64_t i = 0; i < kSlices; ++i) {
    REQUIRE(store.pread(got.data(), got.size(), i * kRangeOpSlice) == 0);
    CHECK(got == Bytes(kRangeOpSlice, std::byte{0}));
  }

  // Lost after its first slice: the rest never runs.
  for (std::uint64_t i = 0; i < 2; ++i) REQUIRE(store.pwrite(pattern.data(), pattern.size(), i * kRangeOpSlice, false) == 0);
  zero.length = 2 * kRangeOpSlice;
  zero.user_data = 3;
  queue.enqueue(zero);
  queue.submit();
  queue.abandon_unstarted();
  CHECK(queue.wants_another_turn());  // the cancelled zero waits to be reaped
  done.clear();
  queue.reap(done, false);
  CHECK_FALSE(queue.wants_another_turn());
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 3);
  CHECK(done[0].error == ECANCELED);
  CHECK(queue.in_flight() == 0);
  REQUIRE(store.pread(got.data(), got.size(), 0) == 0);
  CHECK(got == Bytes(kRangeOpSlice, std::byte{0}));
  REQUIRE(store.pread(got.data(), got.size(), kRangeOpSlice) == 0);
  CHECK(got == pattern);
}

TEST_CASE("file store queue: a long zero runs a slice per submit, and the requests behind it do not wait for it") {
  BackingFile file("/dev/shm", 4 * kRangeOpSlice + 4096);
  auto store = file_store(file);
  auto queue = store->open_queue(8);
  check_zero_runs_in_slices(*store, *queue);
}

TEST_CASE("file store queue: a later part of a request its channel no longer wants never starts") {
  bool wanted = true;
  const auto check = [&wanted](std::uint64_t) { return wanted; };

  // A zero over two slices: the first runs, then its channel is detached.
  BackingFile file("/dev/shm", 2 * kRangeOpSlice);
  auto store = file_store(file);
  const Bytes pattern(kRangeOpSlice, std::byte{0x5a});
  for (std::uint64_t i = 0; i < 2; ++i) file.write(i * kRangeOpSlice, pattern);
  auto queue = store->open_queue(8);
  queue->set_start_check(check);
  StoreRequest zero;
  zero.op = StoreOp::Zero;
  zero.no_hole = true;
  zero.length = 2 * kRangeOpSlice;
  zero.user_data = 1;
  queue->enqueue(zero);
  queue->submit();
  std::vector<StoreCompletion> done;
  queue->reap(done, false);
  REQUIRE(done.empty());
  wanted = false;
  queue->submit();
  queue->reap(done, false);
  REQUIRE(done.size() == 1);
  CHECK(done[0].error == ECANCELED);
  CHECK_FALSE(queue->wants_another_turn());
  CHECK(file.read(0, kRangeOpSlice) == Bytes(kRangeOpSlice, std::byte{0}));
  CHECK(file.read(kRangeOpSlice, kRangeOpSlice) == pattern);

  // A short transfer's remainder, likewise (O_DIRECT keeps it in io_uring).
  wanted = true;
  ShortDirectRead short_read;
  auto direct_queue = short_read.store.open_queue(8);
  direct_queue->set_start_check(check);
  direct_queue->enqueue(short_read.request(2));
  direct_queue->submit();
  wanted = false;  // detached while the first part is in the kernel
  done.clear();
  for (int i = 0; i < 100 && done.empty(); ++i) direct_queue->reap(done, true);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 2);
  CHECK(done[0].error == ECANCELED);
}

TEST_CASE("inline store queue: a long zero runs a slice per submit, and the requests behind it do not wait for it") {
  MemoryStore store(4 * kRangeOpSlice + MemoryStore::kPageSize);
  InlineStoreQueue queue(store, 8);
  check_zero_runs_in_slices(store, queue);
}

// Runs handler turns (run_store_turn) over `queue` until one reports no
// work, as the handler thread does before it sleeps, and checks that by then
// a two-slice zero has been handed back: nothing finished waits for a turn
// that only comes after the sleep.
void check_turns_leave_nothing_finished(StoreQueue& queue) {
  SlotHeader backend{};
  store_relaxed(backend.state, make_state_word(1, SlotState::Live));
  BackendFence fence;
  fence.arm(backend, 1, MemoryMode{});
  InFlightTable table(8);  // goes before the queue: fine, as no start check asks it
  StoreRequest zero;
  zero.op = StoreOp::Zero;
  zero.no_hole = true;
  zero.length = 2 * kRangeOpSlice;
  zero.user_data = 1;
  queue.enqueue(zero);
  std::vector<StoreCompletion> turn, handed_back;
  for (int turns = 0; turns < 100; ++turns) {
    const unsigned work = run_store_turn(queue, table, fence, turn);
    handed_back.insert(handed_back.end(), turn.begin(), turn.end());
    if (work == 0) break;
  }
  REQUIRE(handed_back.size() == 1);
  CHECK(handed_back[0].user_data == 1);
  CHECK(handed_back[0].error == 0);
  CHECK(queue.in_flight() == 0);
}

TEST_CASE("store turn: once a turn reports no work, the last slice of a zero has been handed back (file and inline queues)") {
  BackingFile file("/dev/shm", 2 * kRangeOpSlice);
  auto store = file_store(file);
  auto file_queue = store->open_queue(8);
  check_turns_leave_nothing_finished(*file_queue);
  MemoryStore memory(2 * kRangeOpSlice);
  InlineStoreQueue inline_queue(memory, 8);
  check_turns_leave_nothing_finished(inline_queue);
}

TEST_CASE("range op slicer: slices end on slice boundaries; FUA flushes once at the end (or rides every slice); unwanted ops end unrun") {
  // Records what the slicer asks of the store.
  class Recorder final : public Store {
   public:
    const StoreInfo& info() const override { return info_; }
    int pread(void*, std::size_t, std::uint64_t) override { return EIO; }
    int pwrite(const void*, std::size_t, std::uint64_t, bool) override { return EIO; }
    int flush() override {
      calls.push_back({0, 0, true});
      return 0;
    }
    int trim(std::uint64_t offset, std::uint64_t length, bool fua) override {
      calls.push_back({offset, length, fua});
      return 0;
    }
    void can_flush(bool can) { info_.can_flush = can; }
    int zero(std::uint64_t offset, std::uint64_t length, bool, bool, bool fua) override {
      calls.push_back({offset, length, fua});
      return offset >= 2 * kRangeOpSlice ? ENOSPC : 0;
    }
    int extents(std::uint64_t, std::uint64_t, bool, ExtentSink&) override { return EIO; }
    int cache(std::uint64_t, std::uint64_t) override { return 0; }
    struct Call {
      std::uint64_t offset, length;
      bool flag;  // FUA on a trim or zero; true for a flush (offset and length 0)
      bool operator==(const Call& o) const { return offset == o.offset && length == o.length && flag == o.flag; }
    };
    std::vector<Call> calls;

   private:
    StoreInfo info_;
  } store;
  RangeOpSlicer slicer;
  const auto everything = [](std::uint64_t) { return true; };
  StoreRequest trim;
  trim.op = StoreOp::Trim;
  trim.fua = true;
  trim.offset = kRangeOpSlice - 512;
  trim.length = kRangeOpSlice + 1024;
  trim.user_data = 7;
  slicer.add(trim);
  std::vector<StoreCompletion> done;
  for (int i = 0; i < 10 && !slicer.empty(); ++i) slicer.step(store, done, everything);
  using Call = Recorder::Call;
  CHECK(store.calls == std::vector<Call>{{kRangeOpSlice - 512, 512, false},
                                          {kRangeOpSlice, kRangeOpSlice, false},
                                          {2 * kRangeOpSlice, 512, false},
                                          {0, 0, true}});
  REQUIRE(done.size() == 1);
  CHECK(done[0].error == 0);

  // A failed slice ends the operation with its error; nothing more runs.
  store.calls.clear();
  done.clear();
  StoreRequest zero;
  zero.op = StoreOp::Zero;
  zero.offset = kRangeOpSlice;
  zero.length = 4 * kRangeOpSlice;
  zero.user_data = 8;
  slicer.add(zero);
  for (int i = 0; i < 10 && !slicer.empty(); ++i) slicer.step(store, done, everything);
  CHECK(store.calls.size() == 2);
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 8);
  CHECK(done[0].error == ENOSPC);

  // A store that cannot flush gets FUA on every slice instead.
  store.can_flush(false);
  store.calls.clear();
  done.clear();
  slicer.add(trim);
  for (int i = 0; i < 10 && !slicer.empty(); ++i) slicer.step(store, done, everything);
  CHECK(store.calls == std::vector<Call>{{kRangeOpSlice - 512, 512, true},
                                          {kRangeOpSlice, kRangeOpSlice, true},
                                          {2 * kRangeOpSlice, 512, true}});
  REQUIRE(done.size() == 1);
  CHECK(done[0].error == 0);

  // One nobody waits for any more ends unrun, and the next one runs.
  store.calls.clear();
  done.clear();
  slicer.add(zero);
  trim.user_data = 9;
  slicer.add(trim);
  slicer.step(store, done, [](std::uint64_t user_data) { return user_data != 8; });
  REQUIRE(done.size() == 1);
  CHECK(done[0].user_data == 8);
  CHECK(done[0].error == ECANCELED);
  REQUIRE(store.calls.size() == 1);
  CHECK(store.calls[0].offset == kRangeOpSlice - 512);  // the trim's first slice
}

TEST_CASE("inline store queue: after the slot is lost, nothing reaches the store") {
  MemoryStore store(1 << 20);
  auto queue = store.open_queue(4);
  std::vector<std::byte> data(4096, std::byte{0x5c});
  queue->enqueue(store_request(StoreOp::Write, 0, data, 1));  // runs: the slot is still ours
  queue->abandon_unstarted();
  std::vector<std::byte> other(4096, std::byte{0x3d});
  queue->enqueue(store_request(StoreOp::Write, 4096, other, 2));
  std::vector<StoreCompletion> done;
  queue->reap(done, false);
  REQUIRE(done.size() == 2);
  CHECK(done[0].user_data == 1);
  CHECK(done[0].error == 0);
  CHECK(done[1].user_data == 2);
  CHECK(done[1].error == ECANCELED);
  CHECK(queue->in_flight() == 0);
  std::vector<std::byte> back(8192);
  REQUIRE(store.pread(back.data(), back.size(), 0) == 0);
  CHECK(std::vector<std::byte>(back.begin(), back.begin() + 4096) == data);
  CHECK(std::vector<std::byte>(back.begin() + 4096, back.end()) == std::vector<std::byte>(4096, std::byte{0}));
}
