// Allocator for variable-length extents of a channel's data area (queue side
// only; the data area is private to the process that owns the channel, so no
// shared state is involved).
//
// Extents are handed out ring-style — contiguous, in address order, wrapping
// to the start when the end has no room — and may be released in any order.
// Space is reclaimed when the oldest extent is released, which is the same
// discipline as the completion order of a queue with mostly in-order
// completions, and never fragments beyond one wasted tail at the wrap.
#pragma once

#include <cstdint>
#include <deque>
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
  struct Extent {
    std::uint32_t offset;
    std::uint32_t length;  // rounded to the alignment
    bool released;
  };
  std::uint64_t size_ = 0;
  std::uint32_t alignment_ = 1;
  std::uint64_t head_ = 0;  // where the next extent goes
  std::deque<Extent> extents_;  // oldest first
  std::size_t live_ = 0;
};

}  // namespace cbd
