// The on-media format (common/layout.hpp): sizes, offsets and properties two
// independently built peers rely on, checked at compile time, and the
// geometry a reader computes from a superblock, checked at run time.
#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <cstddef>
#include <string>
#include <cstring>
#include <type_traits>

#include "common/layout.hpp"
#include "common/ring.hpp"
#include "common/slot.hpp"
#include "common/transport.hpp"

using namespace cbd;

namespace {

template <typename T>
constexpr bool on_media = std::is_standard_layout_v<T> && std::is_trivially_copyable_v<T> &&
                          std::has_unique_object_representations_v<T>;

// Every on-media struct: no hidden padding (unique object representations
// means every byte belongs to a named field), standard layout, copyable with
// memcpy.
static_assert(on_media<AreaGeometry>);
static_assert(on_media<ChannelGeometry>);
static_assert(on_media<Superblock>);
static_assert(on_media<SlotHeader>);
static_assert(on_media<HostSlot>);
static_assert(on_media<BackendSlot>);
static_assert(on_media<BlkdevSlot>);
static_assert(on_media<SubmissionEntry>);
static_assert(on_media<CompletionEntry>);
static_assert(on_media<ExtentDescriptor>);
static_assert(on_media<RingIndex>);
static_assert(on_media<ChannelControl>);

// Sizes.
static_assert(kLineSize == 64 && kPageSize == 4096);
static_assert(sizeof(AreaGeometry) == 16);
static_assert(sizeof(ChannelGeometry) == 32);
static_assert(sizeof(Superblock) == 320);
static_assert(sizeof(Superblock) <= kPageSize);
static_assert(sizeof(SlotHeader) == 64);
static_assert(sizeof(HostSlot) == 256);
static_assert(sizeof(BackendSlot) == 256);
static_assert(sizeof(BlkdevSlot) == 256);
static_assert(sizeof(SubmissionEntry) == 64);
static_assert(sizeof(CompletionEntry) == 32);
static_assert(sizeof(ExtentDescriptor) == 8);
static_assert(sizeof(RingIndex) == 64 && alignof(RingIndex) == 64);
static_assert(sizeof(ChannelControl) == 512);
static_assert(alignof(ChannelControl) == 64);
// Entries tile a cache line exactly, so no entry straddles two lines.
static_assert(kLineSize % sizeof(SubmissionEntry) == 0 && kLineSize % sizeof(CompletionEntry) == 0);

// Superblock offsets.
static_assert(offsetof(Superblock, magic) == 0);
static_assert(offsetof(Superblock, version_major) == 8);
static_assert(offsetof(Superblock, version_minor) == 10);
static_assert(offsetof(Superblock, superblock_size) == 12);
static_assert(offsetof(Superblock, features_compat) == 16);
static_assert(offsetof(Superblock, features_incompat) == 24);
static_assert(offsetof(Superblock, uuid) == 32);
static_assert(offsetof(Superblock, region_size) == 48);
static_assert(offsetof(Superblock, hosts) == 56);
static_assert(offsetof(Superblock, backends) == 72);
static_assert(offsetof(Superblock, blkdevs) == 88);
static_assert(offsetof(Superblock, channels) == 104);
static_assert(offsetof(Superblock, channel) == 120);
static_assert(offsetof(Superblock, heartbeat_interval_ms) == 152);
static_assert(offsetof(Superblock, dead_after_ms) == 156);
static_assert(offsetof(Superblock, checksum) == sizeof(Superblock) - 4);
static_assert(offsetof(AreaGeometry, offset) == 0 && offsetof(AreaGeometry, slot_size) == 8 &&
              offsetof(AreaGeometry, count) == 12);
static_assert(offsetof(ChannelGeometry, sq_offset) == 0 && offsetof(ChannelGeometry, sq_entries) == 4 &&
              offsetof(ChannelGeometry, cq_offset) == 8 && offsetof(ChannelGeometry, cq_entries) == 12 &&
              offsetof(ChannelGeometry, data_offset) == 16 && offsetof(ChannelGeometry, data_size) == 24);

// Slots: the header is the first line of every slot kind.
static_assert(offsetof(SlotHeader, state) == 0 && offsetof(SlotHeader, heartbeat) == 8 &&
              offsetof(SlotHeader, owner_host) == 16 && offsetof(SlotHeader, owner_pid) == 20);
static_assert(offsetof(HostSlot, header) == 0 && offsetof(HostSlot, hostname) == 64);
static_assert(offsetof(BackendSlot, header) == 0 && offsetof(BackendSlot, export_name) == 64 &&
              offsetof(BackendSlot, export_size) == 128 && offsetof(BackendSlot, block_min) == 136 &&
              offsetof(BackendSlot, block_preferred) == 140 && offsetof(BackendSlot, block_max) == 144 &&
              offsetof(BackendSlot, caps) == 148);
static_assert(offsetof(BlkdevSlot, header) == 0 && offsetof(BlkdevSlot, backend_id) == 64 &&
              offsetof(BlkdevSlot, queue_count) == 68 && offsetof(BlkdevSlot, backend_epoch) == 72);
static_assert(offsetof(ChannelControl, header) == 0);

// Entries.
static_assert(offsetof(SubmissionEntry, seq) == 0 && offsetof(SubmissionEntry, op) == 4 &&
              offsetof(SubmissionEntry, flags) == 6 && offsetof(SubmissionEntry, tag) == 8 &&
              offsetof(SubmissionEntry, offset) == 16 && offsetof(SubmissionEntry, length) == 24 &&
              offsetof(SubmissionEntry, data_offset) == 28 && offsetof(SubmissionEntry, data_length) == 32 &&
              offsetof(SubmissionEntry, data_crc) == 36 && offsetof(SubmissionEntry, entry_crc) == 60);
static_assert(offsetof(CompletionEntry, seq) == 0 && offsetof(CompletionEntry, status) == 4 &&
              offsetof(CompletionEntry, tag) == 8 && offsetof(CompletionEntry, result_length) == 16 &&
              offsetof(CompletionEntry, data_crc) == 20 && offsetof(CompletionEntry, entry_crc) == 28);
// entry_crc is the last field, so the entry checksum covers everything else.
static_assert(offsetof(SubmissionEntry, entry_crc) + 4 == sizeof(SubmissionEntry));
static_assert(offsetof(CompletionEntry, entry_crc) + 4 == sizeof(CompletionEntry));

// Channel control block: producer and consumer index of each ring on lines
// of their own; each side's fields on separate lines.
static_assert(offsetof(ChannelControl, backend_id) == 64 && offsetof(ChannelControl, generation) == 80);
static_assert(offsetof(ChannelControl, sq_head) == 128 && offsetof(ChannelControl, sq_tail) == 192 &&
              offsetof(ChannelControl, cq_tail) == 256 && offsetof(ChannelControl, cq_head) == 320);
static_assert(offsetof(ChannelControl, attached_generation) == 384 && offsetof(ChannelControl, requests) == 448);
static_assert(offsetof(ChannelControl, sq_head) / kLineSize != offsetof(ChannelControl, sq_tail) / kLineSize);
static_assert(offsetof(ChannelControl, cq_head) / kLineSize != offsetof(ChannelControl, cq_tail) / kLineSize);

// Enumerations have fixed-width representations.
static_assert(sizeof(SlotState) == 1 && sizeof(Op) == 2);
static_assert(static_cast<std::uint16_t>(Op::Read) == 1 && static_cast<std::uint16_t>(Op::Cache) == kOpMax);
static_assert((kKnownIncompatFeatures & (kFeatureChecksum | kFeatureFlush)) == kKnownIncompatFeatures);

// The state word packs an epoch above an 8-bit state.
static_assert(make_state_word(5, SlotState::Live) == ((5u << 8) | 1u));
static_assert(epoch_of(make_state_word(0x00ffffffffffffull, SlotState::Stopping)) == 0x00ffffffffffffull);
static_assert(state_of(make_state_word(7, SlotState::Stopping)) == SlotState::Stopping);

}  // namespace

TEST_CASE("layout: the magic reads \"CBDTRANS\" in memory") {
  char bytes[8];
  std::memcpy(bytes, &kSuperblockMagic, sizeof bytes);
  CHECK(std::string(bytes, 8) == "CBDTRANS");
}

TEST_CASE("layout: a zeroed entry is never a valid operation") {
  SubmissionEntry entry{};
  CHECK(entry.op == 0);
  CHECK(entry.op < static_cast<std::uint16_t>(Op::Read));
}

TEST_CASE("layout: entry checksums cover every byte before entry_crc") {
  SubmissionEntry s{};
  s.tag = 42;
  std::uint32_t base = entry_checksum(s);
  // A change in the last covered byte changes the checksum...
  reinterpret_cast<unsigned char*>(&s)[offsetof(SubmissionEntry, entry_crc) - 1] ^= 1;
  CHECK(entry_checksum(s) != base);
  reinterpret_cast<unsigned char*>(&s)[offsetof(SubmissionEntry, entry_crc) - 1] ^= 1;
  // ...a change in entry_crc itself does not.
  s.entry_crc = 0xdeadbeef;
  CHECK(entry_checksum(s) == base);

  CompletionEntry c{};
  c.tag = 7;
  std::uint32_t cbase = entry_checksum(c);
  reinterpret_cast<unsigned char*>(&c)[offsetof(CompletionEntry, entry_crc) - 1] ^= 0x80;
  CHECK(entry_checksum(c) != cbase);
}

namespace {

// What a reader relies on for a planned geometry: every area in order,
// page aligned, non-overlapping, inside the region; rings and data inside a
// channel; sizes consistent with the entry structs.
void check_geometry(const Superblock& sb, std::uint64_t region_size) {
  CHECK(sb.magic == kSuperblockMagic);
  CHECK(sb.superblock_size == sizeof(Superblock));
  CHECK(sb.region_size == region_size);
  const AreaGeometry* areas[] = {&sb.hosts, &sb.backends, &sb.blkdevs, &sb.channels};
  const std::uint64_t minimum[] = {sizeof(HostSlot), sizeof(BackendSlot), sizeof(BlkdevSlot),
                                   sb.channel.data_offset + sb.channel.data_size};
  std::uint64_t end = kPageSize;  // the superblock's page
  for (int i = 0; i < 4; ++i) {
    CAPTURE(i);
    const AreaGeometry& a = *areas[i];
    CHECK(a.count > 0);
    CHECK(a.offset % kPageSize == 0);
    CHECK(a.offset >= end);
    CHECK(a.slot_size % kLineSize == 0);
    CHECK(a.slot_size >= minimum[i]);
    end = a.offset + std::uint64_t{a.slot_size} * a.count;
  }
  CHECK(end <= region_size);
  const ChannelGeometry& c = sb.channel;
  CHECK(std::has_single_bit(c.sq_entries));
  CHECK(std::has_single_bit(c.cq_entries));
  CHECK(c.sq_offset >= sizeof(ChannelControl));
  CHECK(c.sq_offset % kLineSize == 0);
  CHECK(c.cq_offset % kLineSize == 0);
  CHECK(c.data_offset % kPageSize == 0);
  CHECK(c.data_size % kPageSize == 0);
  CHECK(std::uint64_t{c.sq_offset} + std::uint64_t{c.sq_entries} * sizeof(SubmissionEntry) <= c.cq_offset);
  CHECK(std::uint64_t{c.cq_offset} + std::uint64_t{c.cq_entries} * sizeof(CompletionEntry) <= c.data_offset);
  CHECK(c.data_offset + c.data_size <= sb.channels.slot_size);
  CHECK(c.data_size <= 0xffffffffull);  // extents are addressed with 32-bit offsets
  CHECK(sb.dead_after_ms >= 2 * sb.heartbeat_interval_ms);
}

}  // namespace

TEST_CASE("layout: planned geometries satisfy what readers rely on") {
  SUBCASE("defaults for a 256 MiB /dev/shm transport") {
    FormatOptions o;
    Superblock sb = plan_format(o, 256ull << 20);
    check_geometry(sb, 256ull << 20);
    CHECK(sb.channels.count >= 1);
    CHECK(sb.channels.count <= 64);
  }
  SUBCASE("large rings, small data area") {
    FormatOptions o;
    o.sq_entries = 1u << 16;
    o.cq_entries = 1u << 12;
    o.data_size = kPageSize;
    o.channels = 3;
    Superblock sb = plan_format(o, 64ull << 20);
    check_geometry(sb, 64ull << 20);
    CHECK(sb.channels.count == 3);
  }
  SUBCASE("tiny rings, many slots") {
    FormatOptions o;
    o.sq_entries = 1;
    o.cq_entries = 2;
    o.hosts = 4096;
    o.backends = 1;
    o.blkdevs = 17;
    o.data_size = 64 << 10;
    o.channels = 0;
    Superblock sb = plan_format(o, 16ull << 20);
    check_geometry(sb, 16ull << 20);
    CHECK(sb.hosts.count == 4096);
    CHECK(sb.backends.count == 1);
    CHECK(sb.blkdevs.count == 17);
  }
}

TEST_CASE("layout: ring indices are lock-free 32-bit atomics") {
  CHECK(std::atomic_ref<std::uint32_t>::is_always_lock_free);
  CHECK(std::atomic_ref<std::uint64_t>::is_always_lock_free);
  ChannelControl control{};
  // The shared fields a peer updates are naturally aligned, so atomic_ref is valid on them.
  CHECK(reinterpret_cast<std::uintptr_t>(&control.sq_head.value) % alignof(std::uint32_t) == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(&control.generation) % alignof(std::uint64_t) == 0);
  CHECK(reinterpret_cast<std::uintptr_t>(&control.header.state) % alignof(std::uint64_t) == 0);
}
