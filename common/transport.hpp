// A formatted transport: the superblock's geometry validated against the
// mapping, and bounds-checked access to every slot and channel.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "common/flush_ranges.hpp"
#include "common/layout.hpp"
#include "common/region.hpp"

namespace cbd {

struct FormatOptions {
  std::uint64_t size = 256ull << 20;   // bytes of a regular-file transport to create/grow (0 = keep)
  std::uint32_t hosts = 16;
  std::uint32_t backends = 16;
  std::uint32_t blkdevs = 16;
  std::uint32_t channels = 0;          // 0 = as many as fit (at most 64)
  std::uint64_t data_size = 4ull << 20;  // per-channel data area
  std::uint32_t sq_entries = 256;
  std::uint32_t cq_entries = 256;
  bool checksum = false;
  bool flush = false;
  std::uint32_t heartbeat_interval_ms = 200;
  std::uint32_t dead_after_ms = 2000;
  bool force = false;                  // overwrite an already formatted transport
};

// The geometry format() would write, or throws cbd::Error explaining why the
// options cannot fit `region_size` bytes.
Superblock plan_format(const FormatOptions& options, std::uint64_t region_size);

// True when the region starts with the cbd magic (formatted, valid or not).
bool looks_formatted(const Region& region);

// Writes a fresh superblock and clears every slot and channel control block.
// Refuses (cbd::Error) to overwrite a formatted transport unless options.force.
void format(Region& region, const FormatOptions& options);

// Memory-ordering mode of a transport (design §3.7).
struct MemoryMode {
  bool checksum = false;
  bool flush = false;
};

class Transport {
 public:
  // Validates the superblock; throws cbd::Error with a distinct message for
  // bad magic, unknown major version, unknown incompatible feature, bad
  // checksum, inconsistent geometry and geometry larger than the mapping.
  explicit Transport(Region region);

  // Opens `path` and attaches (convenience).
  static Transport attach(const std::string& path);

  const Region& region() const { return region_; }
  const std::string& path() const { return region_.path(); }
  // A private copy taken at attach: peers cannot change it under us.
  const Superblock& superblock() const { return superblock_; }
  MemoryMode mode() const { return mode_; }

  std::uint32_t host_count() const { return superblock_.hosts.count; }
  std::uint32_t backend_count() const { return superblock_.backends.count; }
  std::uint32_t blkdev_count() const { return superblock_.blkdevs.count; }
  std::uint32_t channel_count() const { return superblock_.channels.count; }

  // Index must be < the matching count (checked: throws std::out_of_range).
  HostSlot& host(std::uint32_t index) const;
  BackendSlot& backend(std::uint32_t index) const;
  BlkdevSlot& blkdev(std::uint32_t index) const;
  ChannelControl& channel_control(std::uint32_t index) const;
  std::byte* channel_base(std::uint32_t index) const;

 private:
  std::byte* slot(const AreaGeometry& area, std::uint32_t index) const;

  Region region_;
  Superblock superblock_{};
  MemoryMode mode_{};
  FlushModeRange flush_range_;  // after region_: unregistered before it is unmapped
};

// Copies a NUL-padded name field out of shared memory (never reads past it).
std::string read_name(const char (&field)[kNameSize]);
void write_name(char (&field)[kNameSize], const std::string& value);

}  // namespace cbd
