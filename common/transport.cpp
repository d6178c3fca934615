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
#include <vector>

#include "common/cache_lines.hpp"
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

// A byte range [begin, end) of the region or of a channel, for the overlap
// checks; `name` is the superblock field that places it.
struct Extent {
  const char* name;
  std::uint64_t begin;
  std::uint64_t end;
};

bool overlap(const Extent& a, const Extent& b) { return a.begin < b.end && b.begin < a.end; }

std::string range_text(const Extent& e) {
  return std::string(e.name) + " [" + std::to_string(e.begin) + ", " + std::to_string(e.end) + ")";
}

// Bounds of the superblock's timing fields (docs/design.md, "Transport
// format"): faster beats than 10 ms cost CPU for nothing, slower than a
// minute make failover useless; dead-after must leave room for one missed
// beat and stay below ten minutes.
constexpr std::uint64_t kMinHeartbeatMs = 10;
constexpr std::uint64_t kMaxHeartbeatMs = 60'000;
constexpr std::uint64_t kMaxDeadAfterMs = 600'000;
constexpr std::uint32_t kMaxSlots = 4096;
constexpr std::uint32_t kMaxRingEntries = 1u << 20;

// Checks that the geometry in `sb` is self-consistent and fits `mapped`
// bytes; returns an empty string or the reason it does not, naming the
// field and its value.  Every sum and product is checked for overflow in 64
// bits: the superblock comes from a peer, and its checksum (CRC32C) is no
// protection against one that forges it.
std::string geometry_problem(const Superblock& sb, std::uint64_t mapped) {
  const std::uint64_t interval = sb.heartbeat_interval_ms;
  const std::uint64_t dead_after = sb.dead_after_ms;
  if (interval < kMinHeartbeatMs || interval > kMaxHeartbeatMs)
    return "heartbeat_interval_ms " + std::to_string(interval) + " is outside 10 ms to 60 s";
  if (dead_after < 2 * interval || dead_after > kMaxDeadAfterMs)
    return "dead_after_ms " + std::to_string(dead_after) + " is outside twice heartbeat_interval_ms (" +
           std::to_string(2 * interval) + ") to 10 min";
  if (sb.region_size < kPageSize)
    return "region_size " + std::to_string(sb.region_size) + " is smaller than the superblock page";

  // The channel: control block, rings and data area inside one slot, apart.
  const ChannelGeometry& c = sb.channel;
  if (!std::has_single_bit(c.sq_entries) || c.sq_entries > kMaxRingEntries)
    return "channel.sq_entries " + std::to_string(c.sq_entries) + " is not a power of two up to 2^20";
  if (!std::has_single_bit(c.cq_entries) || c.cq_entries > kMaxRingEntries)
    return "channel.cq_entries " + std::to_string(c.cq_entries) + " is not a power of two up to 2^20";
  if (c.data_size == 0 || c.data_size > 0xffffffffull || c.data_size % kPageSize != 0)
    return "channel.data_size " + std::to_string(c.data_size) + " is not a page multiple below 4 GiB";
  if (c.sq_offset % kLineSize != 0)
    return "channel.sq_offset " + std::to_string(c.sq_offset) + " is not a multiple of 64";
  if (c.cq_offset % kLineSize != 0)
    return "channel.cq_offset " + std::to_string(c.cq_offset) + " is not a multiple of 64";
  if (c.data_offset % kPageSize != 0)
    return "channel.data_offset " + std::to_string(c.data_offset) + " is not a multiple of 4096";
  std::uint64_t data_end = 0;
  if (__builtin_add_overflow(c.data_offset, c.data_size, &data_end))
    return "channel.data_offset " + std::to_string(c.data_offset) + " + data_size overflows";
  const Extent parts[] = {
      {"channel control block", 0, sizeof(ChannelControl)},
      {"channel.sq_offset", c.sq_offset, std::uint64_t{c.sq_offset} + std::uint64_t{c.sq_entries} * sizeof(SubmissionEntry)},
      {"channel.cq_offset", c.cq_offset, std::uint64_t{c.cq_offset} + std::uint64_t{c.cq_entries} * sizeof(CompletionEntry)},
      {"channel.data_offset", c.data_offset, data_end},
  };
  const std::uint64_t channel_size = sb.channels.slot_size;
  for (const Extent& part : parts)
    if (part.end > channel_size)
      return range_text(part) + " runs past the end of the channel (channels.slot_size " +
             std::to_string(channel_size) + ")";
  for (std::size_t i = 0; i < std::size(parts); ++i)
    for (std::size_t j = i + 1; j < std::size(parts); ++j)
      if (overlap(parts[i], parts[j])) return range_text(parts[j]) + " overlaps " + range_text(parts[i]);

  // The areas: inside the formatted region, apart from each other and from
  // the superblock page.
  struct Area {
    const char* name;
    const char* offset_field;
    const AreaGeometry& geometry;
    std::uint64_t minimum_slot;
  };
  const Area areas[] = {{"hosts", "hosts.offset", sb.hosts, sizeof(HostSlot)},
                        {"backends", "backends.offset", sb.backends, sizeof(BackendSlot)},
                        {"blkdevs", "blkdevs.offset", sb.blkdevs, sizeof(BlkdevSlot)},
                        {"channels", "channels.offset", sb.channels, sizeof(ChannelControl)}};
  std::vector<Extent> extents{{"superblock", 0, kPageSize}};  // the names are the areas' offset fields
  for (const Area& area : areas) {
    const AreaGeometry& g = area.geometry;
    const std::string name = area.name;
    if (g.count == 0 || g.count > kMaxSlots)
      return name + ".count " + std::to_string(g.count) + " is outside 1 to " + std::to_string(kMaxSlots);
    if (g.slot_size < area.minimum_slot || g.slot_size % kLineSize != 0)
      return name + ".slot_size " + std::to_string(g.slot_size) + " is below " + std::to_string(area.minimum_slot) +
             " or not a multiple of 64";
    if (g.offset % kPageSize != 0)
      return name + ".offset " + std::to_string(g.offset) + " is not a multiple of 4096";
    std::uint64_t bytes = 0, end = 0;
    if (__builtin_mul_overflow(std::uint64_t{g.slot_size}, std::uint64_t{g.count}, &bytes))
      return name + ".count " + std::to_string(g.count) + " × slot_size " + std::to_string(g.slot_size) +
             " overflows 64 bits";
    if (__builtin_add_overflow(g.offset, bytes, &end))
      return name + ".offset " + std::to_string(g.offset) + " + " + std::to_string(bytes) +
             " bytes of slots overflows 64 bits";
    if (end > sb.region_size)
      return name + ".offset " + std::to_string(g.offset) + " + " + std::to_string(g.count) + " slots × " +
             std::to_string(g.slot_size) + " bytes ends at " + std::to_string(end) + ", past region_size " +
             std::to_string(sb.region_size);
    extents.push_back({area.offset_field, g.offset, end});
  }
  for (std::size_t i = 0; i < extents.size(); ++i)
    for (std::size_t j = i + 1; j < extents.size(); ++j)
      if (overlap(extents[i], extents[j]))
        return range_text(extents[j]) + " overlaps the " + (i == 0 ? std::string("superblock page [0, 4096)")
                                                                    : range_text(extents[i]));
  if (sb.region_size > mapped)
    return "region_size " + std::to_string(sb.region_size) + " is larger than the mapping's " + std::to_string(mapped) +
           " bytes";
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
  // Flush mode: each step is written back before the next, so a host that
  // sees the new superblock sees cleared slots.
  const bool flush = options.flush;
  std::memset(region.base(), 0, kPageSize);
  if (flush) write_back_lines(region.base(), kPageSize);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  for (const AreaGeometry* area : {&sb.hosts, &sb.backends, &sb.blkdevs}) {
    std::memset(region.base() + area->offset, 0, std::uint64_t{area->slot_size} * area->count);
    if (flush) write_back_lines(region.base() + area->offset, std::uint64_t{area->slot_size} * area->count);
  }
  for (std::uint32_t i = 0; i < sb.channels.count; ++i) {
    std::byte* control = region.base() + sb.channels.offset + std::uint64_t{i} * sb.channels.slot_size;
    std::memset(control, 0, sb.channel.data_offset);
    if (flush) write_back_lines(control, sb.channel.data_offset);
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
  std::memcpy(region.base(), &sb, sizeof sb);
  if (flush) write_back_lines(region.base(), sizeof sb);
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
    throw Error(where + ": inconsistent geometry: " + problem + " — cbd never formats this; reformat with `cbd-proxy format transport=" +
                region_.path() + " force` once nothing uses it");
  }
  mode_.checksum = sb.features_incompat & kFeatureChecksum;
  mode_.flush = sb.features_incompat & kFeatureFlush;
  // Slot headers and fields are written through bare pointers: let them
  // find out that this memory is in flush mode.
  if (mode_.flush) flush_range_ = FlushModeRange(region_.base(), region_.size());
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
  refresh_lines(field, kNameSize);
  char copy[kNameSize];
  std::memcpy(copy, field, kNameSize);  // one snapshot; a peer may be writing
  return std::string(copy, strnlen(copy, kNameSize));
}

void write_name(char (&field)[kNameSize], const std::string& value) {
  std::memset(field, 0, kNameSize);
  std::memcpy(field, value.data(), std::min<std::size_t>(value.size(), kNameSize));
  publish_lines(field, kNameSize);
}

}  // namespace cbd
