// Fuzzes the backend's handling of a channel whose contents a hostile or
// broken queue side controls (design §3.6): the submission ring's producer
// index, the completion ring's consumer index, every submission entry and
// the data area come from the input; the real ChannelHandler (and with it
// validate()) takes the entries against a MemoryStore.
//
// Input layout:
//   [0]      config: bit 0 checksum transport, bit 1 read-only export,
//            bit 2 the harness stamps valid seq/generation/entry_crc on every entry
//            (so checksum mode reaches validation), bit 3 a second round
//            after moving sq_head on by the value in [9]
//   [1..4]   sq_head (little-endian), stored after the handler attached
//   [5..8]   cq_head
//   [9]      second-round advance of sq_head
//   [10..]   submission ring bytes, then data area bytes
//
// Besides the sanitizers, a checking store aborts when a store request's
// buffer is not inside the channel's data area or its range is outside the
// export: validate() promised both before the request reached the store.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/layout.hpp"
#include "common/log.hpp"
#include "common/region.hpp"
#include "common/ring.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"
#include "plugin/backend_fence.hpp"
#include "plugin/handler.hpp"
#include "plugin/memory_store.hpp"
#include "plugin/store_turn.hpp"

namespace {

using namespace cbd;
using namespace cbd::backend;

constexpr std::uint64_t kExportSize = 256 << 10;
constexpr std::uint32_t kRingEntries = 8;
constexpr std::uint64_t kDataSize = 64 << 10;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fuzz_channel_handler: %s\n", what);
  std::abort();
}

// Delegates to a MemoryStore after checking what validate() guarantees.
class CheckingStore final : public Store {
 public:
  CheckingStore(std::uint64_t size, bool read_only) : inner_(size, read_only) {}
  void set_data_area(const std::byte* begin, std::uint64_t size) {
    begin_ = begin;
    size_ = size;
  }

  const StoreInfo& info() const override { return inner_.info(); }
  int pread(void* buffer, std::size_t length, std::uint64_t offset) override {
    check(buffer, length, offset);
    return inner_.pread(buffer, length, offset);
  }
  int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) override {
    check(buffer, length, offset);
    if (inner_.info().read_only) die("write reached a read-only store");
    return inner_.pwrite(buffer, length, offset, fua);
  }
  int flush() override { return inner_.flush(); }
  int trim(std::uint64_t offset, std::uint64_t length, bool fua) override {
    check_range(offset, length);
    return inner_.trim(offset, length, fua);
  }
  int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) override {
    check_range(offset, length);
    return inner_.zero(offset, length, no_hole, fast, fua);
  }
  int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) override {
    check_range(offset, length);
    return inner_.extents(offset, length, req_one, sink);
  }
  int cache(std::uint64_t offset, std::uint64_t length) override {
    check_range(offset, length);
    return inner_.cache(offset, length);
  }

 private:
  void check_range(std::uint64_t offset, std::uint64_t length) const {
    if (offset > inner_.info().size || length > inner_.info().size - offset) die("store range outside the export");
  }
  void check(const void* buffer, std::size_t length, std::uint64_t offset) const {
    check_range(offset, length);
    const auto* p = static_cast<const std::byte*>(buffer);
    if (p < begin_ || p > begin_ + size_ || length > static_cast<std::size_t>(begin_ + size_ - p))
      die("store buffer outside the channel's data area");
  }

  MemoryStore inner_;
  const std::byte* begin_ = nullptr;
  std::uint64_t size_ = 0;
};

// One formatted transport per mode, made once: a /dev/shm file unlinked as
// soon as it is mapped.
Transport make_transport(bool checksum) {
  const std::string path = "/dev/shm/cbd-fuzz-handler-" + std::to_string(::getpid()) + (checksum ? "-c" : "-p");
  ::unlink(path.c_str());
  RegionOptions region_options;
  region_options.create = true;
  region_options.size = 1 << 20;
  Region region = Region::open(path, region_options);
  ::unlink(path.c_str());
  FormatOptions options;
  options.size = 0;
  options.hosts = 1;
  options.backends = 1;
  options.blkdevs = 1;
  options.channels = 1;
  options.data_size = kDataSize;
  options.sq_entries = kRingEntries;
  options.cq_entries = kRingEntries;
  options.checksum = checksum;
  format(region, options);
  return Transport(std::move(region));
}

// A transport and the fence of the backend that owns its slot 0, as the
// backend service arms it: the handler's fence checks pass, so entries run.
struct World {
  explicit World(bool checksum) : transport(make_transport(checksum)) {
    SlotHeader& header = transport.backend(0).header;
    const auto word = try_claim(header, kNoSlot);
    if (!word) std::abort();
    fence.arm(header, epoch_of(*word), transport.mode());
  }
  Transport transport;
  BackendFence fence;
};

World& world(bool checksum) {
  static World plain(false);
  static World with_checksum(true);
  return checksum ? with_checksum : plain;
}

std::uint32_t load32(const std::uint8_t* p) {
  std::uint32_t value;
  std::memcpy(&value, p, sizeof value);
  return value;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Refused entries are logged (rate limited); keep the fuzzer's output readable.
  set_log_sink([](LogLevel, const std::string&) {});
  world(false);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* input, std::size_t size) {
  if (size < 10) return 0;
  const std::uint8_t config = input[0];
  const bool checksum = config & 1;
  const bool read_only = config & 2;
  const bool stamp = config & 4;
  const bool second_round = config & 8;
  const std::uint32_t sq_head = load32(input + 1);
  const std::uint32_t cq_head = load32(input + 5);
  const std::uint32_t advance = input[9];
  input += 10;
  size -= 10;

  World& w = world(checksum);
  Transport& shm = w.transport;
  const ChannelGeometry& geometry = shm.superblock().channel;
  std::byte* base = shm.channel_base(0);
  // A fresh channel: zero control block, rings and data, as a queue side
  // that just set it up would leave them (minus the indices we forge).
  std::memset(base, 0, shm.superblock().channels.slot_size);

  CheckingStore store(kExportSize, read_only);
  ExportLimits limits;
  limits.size = kExportSize;
  limits.block_max = block_max_for(geometry.data_size);
  limits.read_only = read_only;
  ChannelHandler handler(shm, 0, store, limits, w.fence);
  store.set_data_area(handler.channel().data(0, geometry.data_size), geometry.data_size);
  // The queue side's step 1 of the attach protocol (generation 1), then ours.
  store_release(shm.channel_control(0).generation, std::uint64_t{1});
  handler.attach(1, 1);

  // The entries and the data area, from the input.
  const std::size_t ring_bytes = std::size_t{geometry.sq_entries} * sizeof(SubmissionEntry);
  auto* entries = reinterpret_cast<SubmissionEntry*>(base + geometry.sq_offset);
  const std::size_t to_ring = std::min(size, ring_bytes);
  std::memcpy(entries, input, to_ring);
  if (size > to_ring)
    std::memcpy(base + geometry.data_offset, input + to_ring, std::min<std::size_t>(size - to_ring, geometry.data_size));
  if (stamp) {
    // What an honest producer would have written for indices 0..n-1.
    for (std::uint32_t i = 0; i < geometry.sq_entries; ++i) {
      SubmissionEntry entry;
      std::memcpy(&entry, &entries[i], sizeof entry);
      entry.seq = i;
      entry.generation = 1;
      if (checksum) {
        std::byte* extent = handler.channel().data(entry.data_offset, entry.data_length);
        if (entry.op == static_cast<std::uint16_t>(Op::Write) && extent)
          entry.data_crc = crc32c(0, extent, entry.data_length);
        entry.entry_crc = entry_checksum(entry);
      }
      std::memcpy(&entries[i], &entry, sizeof entry);
    }
  }
  ChannelControl& control = shm.channel_control(0);
  control.sq_head.value = sq_head;
  control.cq_head.value = cq_head;

  constexpr unsigned kDepth = 16;  // store requests in flight at most
  InFlightTable table(kDepth);
  auto queue = store.open_queue(kDepth);
  check_starts_against(*queue, table);  // as the handler thread does
  std::vector<StoreCompletion> done;
  const int rounds = second_round ? 2 : 1;
  for (int round = 0; round < rounds; ++round) {
    if (round == 1) control.sq_head.value = sq_head + advance;
    // Enough passes to drain what one round can take, bounded whatever the
    // indices say.
    for (int pass = 0; pass < 8; ++pass) {
      handler.take_entries(*queue, table, 64);
      run_store_turn(*queue, table, w.fence, done);
      handler.publish();
    }
  }
  // What the last turns started is handed back within a turn per request
  // in flight (the export is one slice long, and a slice runs per turn); a
  // queue that wanted turns beyond that would keep a handler thread awake
  // for good.
  for (unsigned turn = 0; turn <= kDepth && queue->wants_another_turn(); ++turn) {
    run_store_turn(*queue, table, w.fence, done);
    handler.publish();
  }
  if (queue->wants_another_turn()) {
    std::fprintf(stderr, "the store queue still wants a turn after its work was handed back\n");
    std::abort();
  }
  if (rounds == 2) handler.fail_waiting(ESHUTDOWN);
  handler.publish();
  handler.detach();
  return 0;
}
