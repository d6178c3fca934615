// Allocator for variable-length extents of a channel's data area (queue side
// only; the data area is private to the process that owns the channel, so no
// shared state is involved).
//
// Address-ordered first fit over a list of free ranges, coalesced on
// release.  An extent's space is free again the moment it is released,
// whatever is older: a request that holds its extent for long (a WRITE whose
// payload stops arriving, a reply its client does not read) pins only its
// own bytes, never the space behind it (docs/design.md, isolation bounds of
// an NbdSession).
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace cbd {

class DataAreaAllocator {
 public:
  DataAreaAllocator() = default;
  // `alignment` must be a power of two; extents start on it (O_DIRECT needs
  // 4096 on the backend side).
  explicit DataAreaAllocator(std::uint64_t size, std::uint32_t alignment = 4096);

  // An extent of at least `length` bytes (0 is allowed and takes no space but
  // still needs releasing), or nullopt when none fits now.
  std::optional<std::uint32_t> allocate(std::uint32_t length);
  // Releases the extent starting at `offset`.  False if there is none.
  bool release(std::uint32_t offset);

  std::uint64_t size() const { return size_; }
  // The largest single allocation that can ever succeed.
  std::uint64_t max_allocation() const { return size_; }
  std::size_t outstanding() const { return live_; }

 private:
  std::uint64_t size_ = 0;
  std::uint32_t alignment_ = 1;
  std::map<std::uint64_t, std::uint64_t> free_;  // offset -> length, disjoint, never adjacent
  std::map<std::uint64_t, std::uint64_t> live_extents_;  // offset -> length (rounded)
  std::size_t live_ = 0;
};

}  // namespace cbd
