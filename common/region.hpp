// A mapped shared-memory region that holds a transport: a regular file
// (tmpfs /dev/shm on one host), a device-DAX character device (/dev/daxX.Y,
// CXL shared memory) or a PCI BAR resource file (an ivshmem device in a VM).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

#include "common/mapping_fault.hpp"

namespace cbd {

inline constexpr const char* kDefaultTransport = "/dev/shm/cbd";

enum class RegionKind { File, DeviceDax, PciResource };
const char* region_kind_name(RegionKind kind);

struct RegionOptions {
  bool create = false;        // regular files only: create the file if missing
  std::uint64_t size = 0;     // regular files: size to create / grow to (0 = use the file's size)
};

class Region {
 public:
  // Throws cbd::Error with a message naming the path and what to do.
  static Region open(const std::string& path, const RegionOptions& options = {});

  Region(Region&& other) noexcept;
  Region& operator=(Region&& other) noexcept;
  Region(const Region&) = delete;
  Region& operator=(const Region&) = delete;
  ~Region();

  std::byte* base() const { return base_; }
  std::uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  RegionKind kind() const { return kind_; }
  // Set once a bus error in the mapping (the file was truncated or the
  // device went away) made the signal handler replace it with zero pages:
  // the offset of the fault.  See common/mapping_fault.hpp.
  std::optional<std::uint64_t> fault_offset() const { return fault_guard_.fault_offset(); }

 private:
  Region(std::string path, RegionKind kind, std::byte* base, std::uint64_t size)
      : path_(std::move(path)), kind_(kind), base_(base), size_(size), fault_guard_(base, size) {}
  void unmap();

  std::string path_;
  RegionKind kind_ = RegionKind::File;
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
  FaultGuardedMapping fault_guard_;  // unregistered before the unmap
};

// The size and alignment of a device-DAX device according to libdaxctl, or
// nullopt-like {0,0} when libdaxctl does not know it.
struct DaxGeometry {
  std::uint64_t size = 0;
  std::uint64_t alignment = 0;
};
DaxGeometry query_device_dax(const std::string& path);

}  // namespace cbd
