#include "common/data_area.hpp"

#include <bit>
#include <iterator>
#include <stdexcept>

namespace cbd {

DataAreaAllocator::DataAreaAllocator(std::uint64_t size, std::uint32_t alignment)
    : size_(size), alignment_(alignment) {
  if (!std::has_single_bit(alignment)) throw std::invalid_argument("alignment must be a power of two");
  if (size > 0xffffffffull) throw std::invalid_argument("data areas are addressed with 32-bit offsets");
  size_ -= size_ % alignment_;
  if (size_ > 0) free_.emplace(0, size_);
}

std::optional<std::uint32_t> DataAreaAllocator::allocate(std::uint32_t length) {
  // A zero-length extent still takes one unit, so every live extent has a
  // distinct offset for release().
  std::uint64_t rounded = (std::uint64_t{length} + alignment_ - 1) & ~std::uint64_t{alignment_ - 1};
  if (rounded == 0) rounded = alignment_;
  if (rounded > size_) return std::nullopt;
  for (auto range = free_.begin(); range != free_.end(); ++range) {
    if (range->second < rounded) continue;
    const std::uint64_t place = range->first;
    const std::uint64_t left = range->second - rounded;
    free_.erase(range);
    if (left > 0) free_.emplace(place + rounded, left);
    live_extents_.emplace(place, rounded);
    ++live_;
    return static_cast<std::uint32_t>(place);
  }
  return std::nullopt;
}

bool DataAreaAllocator::release(std::uint32_t offset) {
  auto extent = live_extents_.find(offset);
  if (extent == live_extents_.end()) return false;
  std::uint64_t start = extent->first;
  std::uint64_t length = extent->second;
  live_extents_.erase(extent);
  --live_;
  // Coalesce with the free neighbours on both sides.
  auto after = free_.lower_bound(start);
  if (after != free_.end() && after->first == start + length) {
    length += after->second;
    after = free_.erase(after);
  }
  if (after != free_.begin()) {
    auto before = std::prev(after);
    if (before->first + before->second == start) {
      start = before->first;
      length += before->second;
      free_.erase(before);
    }
  }
  free_.emplace(start, length);
  return true;
}

}  // namespace cbd
