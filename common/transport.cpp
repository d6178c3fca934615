#include "common/transport.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <bit>
#include <cstring>
#include <random>
#include <stdexcept>

#include "common/crc32c.hpp"
#include "common/error.hpp"
#include "common/shared_atomic.hpp"

namespace cbd {
namespace {

constexpr std::uint32_t kSlotSize = 256;  // host/backend/blkdev slots
constexpr std::uint32_t kMaxAutoChannels = 64;

std::uint64_t align_up(std::uint64_t value, std::uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

std::uint32_t superblock_checksum(const Superblock& sb) {
  Superblock copy = sb;
  copy.checksum = 0;
  return crc32c(0, &copy, sizeof copy);
}

void random_uuid(std::uint8_t (&uuid)[16]) {
  std::random_device random;
  for (auto& byte : uuid) byte = static_cast<std::uint8_t>(random());
  uuid[6] = (uuid[6] & 0x0f) | 0x40;  // version 4
  uuid[8] = (uuid[8] & 0x3f) | 0x80;  // variant 1
}

std::string hex(std::uint64_t value) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%#llx", static_cast<unsigned long long>(value));
  return buffer;
}

// Channel layout from ring sizes and data size: control page, rings, data,
// each page aligned.
ChannelGeometry channel_geometry(std::uint32_t sq_entries, std::uint32_t cq_entries, std::uint64_t data_size) {
  ChannelGeometry g{};
  g.sq_offset = static_cast<std::uint32_t>(align_up(sizeof(ChannelControl), kPageSize));
  g.sq_entries = sq_entries;
  g.cq_offset = static_cast<std::uint32_t>(align_up(g.sq_offset + std::uint64_t{sq_entries} * sizeof(SubmissionEntry), kPageSize));
  g.cq_entries = cq_entries;
  g.data_offset = align_up(g.cq_offset + std::uint64_t{cq_entries} * sizeof(CompletionEntry), kPageSize);
  g.data_size = data_size;
  return g;
}

// Checks that the geometry in `sb` is self-consistent and fits `mapped`
// bytes; returns an empty string or the reason it does not.
std::string geometry_problem(const Superblock& sb, std::uint64_t mapped) {
  const auto& c = sb.channel;
  if (!std::has_single_bit(c.sq_entries) || !std::has_single_bit(c.cq_entries) || c.sq_entries > (1u << 20) ||
      c.cq_entries > (1u << 20))
    return "ring sizes must be powers of two up to 2^20 (sq " + std::to_string(c.sq_entries) + ", cq " +
           std::to_string(c.cq_entries) + ")";
  if (c.data_size == 0 || c.data_size > 0xffffffffull || c.data_size % kPageSize != 0)
    return "channel data area size " + std::to_string(c.data_size) + " is not a page multiple below 4 GiB";
  ChannelGeometry expected = channel_geometry(c.sq_entries, c.cq_entries, c.data_size);
  if (std::memcmp(&expected, &c, sizeof c) != 0) return "channel ring/data offsets are inconsistent";
  if (sb.channels.slot_size < c.data_offset + c.data_size)
    return "channel slot size " + std::to_string(sb.channels.slot_size) + " is smaller than its contents";
  if (sb.heartbeat_interval_ms == 0 || sb.dead_after_ms < 2 * sb.heartbeat_interval_ms)
    return "dead_after_ms must be at least twice heartbeat_interval_ms";
  // Areas: in order, non-overlapping, page aligned, slots big enough.
  const AreaGeometry* areas[] = {&sb.hosts, &sb.backends, &sb.blkdevs, &sb.channels};
  const std::uint32_t minimum_slot[] = {sizeof(HostSlot), sizeof(BackendSlot), sizeof(BlkdevSlot),
                                        static_cast<std::uint32_t>(c.data_offset + c.data_size)};
  const char* names[] = {"host", "backend", "blkdev", "channel"};
  std::uint64_t end = kPageSize;
  for (int i = 0; i < 4; ++i) {
    const AreaGeometry& area = *areas[i];
    if (area.count == 0 || area.count > 4096) return std::string(names[i]) + " slot count " + std::to_string(area.count) + " out of range";
    if (area.slot_size < minimum_slot[i] || area.slot_size % kLineSize != 0)
      return std::string(names[i]) + " slot size " + std::to_string(area.slot_size) + " is too small or unaligned";
    if (area.offset < end || area.offset % kPageSize != 0)
      return std::string(names[i]) + " area at " + std::to_string(area.offset) + " overlaps the previous one";
    end = area.offset + std::uint64_t{area.slot_size} * area.count;
  }
  if (end > sb.region_size)
    return "areas end at " + std::to_string(end) + " bytes, past the formatted size " + std::to_string(sb.region_size);
  if (sb.region_size > mapped)
    return "formatted for " + std::to_string(sb.region_size) + " bytes but the mapping has only " + std::to_string(mapped);
  return {};
}

}  // namespace

Superblock plan_format(const FormatOptions& o, std::uint64_t region_size) {
  if (o.data_size == 0 || o.data_size % kPageSize != 0 || o.data_size > 0xfffff000ull)
    throw Error("data=" + std::to_string(o.data_size) + ": the channel data area must be a multiple of 4096 below 4 GiB");
  if (!std::has_single_bit(o.sq_entries) || !std::has_single_bit(o.cq_entries))
    throw Error("sq-entries and cq-entries must be powers of two");
  Superblock sb{};
  sb.magic = kSuperblockMagic;
  sb.version_major = kVersionMajor;
  sb.version_minor = kVersionMinor;
  sb.superblock_size = sizeof(Superblock);
  sb.features_incompat = (o.checksum ? kFeatureChecksum : 0) | (o.flush ? kFeatureFlush : 0);
  random_uuid(sb.uuid);
  sb.channel = channel_geometry(o.sq_entries, o.cq_entries, o.data_size);
  sb.heartbeat_interval_ms = o.heartbeat_interval_ms;
  sb.dead_after_ms = o.dead_after_ms;

  std::uint64_t offset = kPageSize;
  auto place = [&](AreaGeometry& area, std::uint32_t count, std::uint64_t slot_size) {
    area.offset = offset;
    area.slot_size = static_cast<std::uint32_t>(slot_size);
    area.count = count;
    offset = align_up(offset + slot_size * count, kPageSize);
  };
  place(sb.hosts, o.hosts, kSlotSize);
  place(sb.backends, o.backends, kSlotSize);
  place(sb.blkdevs, o.blkdevs, kSlotSize);
  std::uint64_t channel_size = align_up(sb.channel.data_offset + sb.channel.data_size, kPageSize);
  if (channel_size > 0xffffffffull) throw Error("a channel would exceed 4 GiB: lower data= or the ring sizes");
  std::uint32_t channels = o.channels;
  if (channels == 0) {
    std::uint64_t room = region_size > offset ? region_size - offset : 0;
    channels = static_cast<std::uint32_t>(std::min<std::uint64_t>(room / channel_size, kMaxAutoChannels));
    if (channels == 0)
      throw Error("transport of " + std::to_string(region_size) + " bytes has no room for one channel of " +
                  std::to_string(channel_size) + " bytes — give a larger size= or a smaller data=");
  }
  place(sb.channels, channels, channel_size);
  sb.region_size = region_size;
  if (auto problem = geometry_problem(sb, region_size); !problem.empty())
    throw Error("cannot format: " + problem + " (need " + std::to_string(offset) + " bytes, have " +
                std::to_string(region_size) + ")");
  sb.checksum = superblock_checksum(sb);
  return sb;
}

bool looks_formatted(const Region& region) {
  std::uint64_t magic;
  std::memcpy(&magic, region.base(), sizeof magic);
  return region.size() >= sizeof(Superblock) && magic == kSuperblockMagic;
}

void format(Region& region, const FormatOptions& options) {
  if (looks_formatted(region) && !options.force)
    throw Error("transport " + region.path() +
                ": already formatted — refusing to overwrite it (slots may be in use); add `force` to reformat");
  Superblock sb = plan_format(options, region.size());
  // Clear the superblock first so no one attaches to a half-written format,
  // then every slot and channel control block (data areas need no clearing).
  std::memset(region.base(), 0, kPageSize);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (const AreaGeometry* area : {&sb.hosts, &sb.backends, &sb.blkdevs})
    std::memset(region.base() + area->offset, 0, std::uint64_t{area->slot_size} * area->count);
  for (std::uint32_t i = 0; i < sb.channels.count; ++i)
    std::memset(region.base() + sb.channels.offset + std::uint64_t{i} * sb.channels.slot_size, 0, sb.channel.data_offset);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::memcpy(region.base(), &sb, sizeof sb);
  if (region.kind() == RegionKind::File) ::msync(region.base(), kPageSize, MS_SYNC);
}

Transport::Transport(Region region) : region_(std::move(region)) {
  const std::string where = "transport " + region_.path();
  if (region_.size() < kPageSize) throw Error(where + ": only " + std::to_string(region_.size()) + " bytes — too small to hold a transport");
  std::memcpy(&superblock_, region_.base(), sizeof superblock_);
  const Superblock& sb = superblock_;
  if (sb.magic != kSuperblockMagic)
    throw Error(where + ": bad magic " + hex(sb.magic) + " — not a cbd transport; run `cbd-proxy format transport=" +
                region_.path() + "`");
  if (sb.version_major != kVersionMajor)
    throw Error(where + ": unknown format version " + std::to_string(sb.version_major) + "." +
                std::to_string(sb.version_minor) + " (this build reads version " + std::to_string(kVersionMajor) +
                ") — upgrade cbd or reformat");
  if (sb.superblock_size < sizeof(Superblock) || sb.superblock_size > kPageSize)
    throw Error(where + ": superblock size " + std::to_string(sb.superblock_size) + " is invalid");
  if (superblock_checksum(sb) != sb.checksum)
    throw Error(where + ": superblock checksum mismatch (stored " + hex(sb.checksum) + ", computed " +
                hex(superblock_checksum(sb)) + ") — the superblock is corrupt; reformat with `force`");
  if (std::uint64_t unknown = sb.features_incompat & ~kKnownIncompatFeatures)
    throw Error(where + ": unknown incompatible feature flags " + hex(unknown) + " — upgrade cbd");
  if (auto problem = geometry_problem(sb, region_.size()); !problem.empty()) {
    if (sb.region_size > region_.size())
      throw Error(where + ": geometry larger than the mapping: " + problem);
    throw Error(where + ": inconsistent geometry: " + problem);
  }
  mode_.checksum = sb.features_incompat & kFeatureChecksum;
  mode_.flush = sb.features_incompat & kFeatureFlush;
}

Transport Transport::attach(const std::string& path) { return Transport(Region::open(path)); }

std::byte* Transport::slot(const AreaGeometry& area, std::uint32_t index) const {
  if (index >= area.count) throw std::out_of_range("slot index " + std::to_string(index) + " out of range");
  return region_.base() + area.offset + std::uint64_t{index} * area.slot_size;
}

HostSlot& Transport::host(std::uint32_t i) const { return *reinterpret_cast<HostSlot*>(slot(superblock_.hosts, i)); }
BackendSlot& Transport::backend(std::uint32_t i) const {
  return *reinterpret_cast<BackendSlot*>(slot(superblock_.backends, i));
}
BlkdevSlot& Transport::blkdev(std::uint32_t i) const { return *reinterpret_cast<BlkdevSlot*>(slot(superblock_.blkdevs, i)); }
ChannelControl& Transport::channel_control(std::uint32_t i) const {
  return *reinterpret_cast<ChannelControl*>(slot(superblock_.channels, i));
}
std::byte* Transport::channel_base(std::uint32_t i) const { return slot(superblock_.channels, i); }

std::string read_name(const char (&field)[kNameSize]) {
  char copy[kNameSize];
  std::memcpy(copy, field, kNameSize);  // one snapshot; a peer may be writing
  return std::string(copy, strnlen(copy, kNameSize));
}

void write_name(char (&field)[kNameSize], const std::string& value) {
  std::memset(field, 0, kNameSize);
  std::memcpy(field, value.data(), std::min<std::size_t>(value.size(), kNameSize));
}

}  // namespace cbd
