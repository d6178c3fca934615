#include "common/data_area.hpp"

#include <bit>
#include <stdexcept>

namespace cbd {

DataAreaAllocator::DataAreaAllocator(std::uint64_t size, std::uint32_t alignment)
    : size_(size), alignment_(alignment) {
  if (!std::has_single_bit(alignment)) throw std::invalid_argument("alignment must be a power of two");
  if (size > 0xffffffffull) throw std::invalid_argument("data areas are addressed with 32-bit offsets");
  size_ -= size_ % alignment_;
}

std::optional<std::uint32_t> DataAreaAllocator::allocate(std::uint32_t length) {
  // A zero-length extent still takes one unit, so every live extent has a
  // distinct offset for release().
  std::uint64_t rounded = (std::uint64_t{length} + alignment_ - 1) & ~std::uint64_t{alignment_ - 1};
  if (rounded == 0) rounded = alignment_;
  if (rounded > size_) return std::nullopt;
  std::uint64_t place;
  if (extents_.empty()) {
    place = 0;  // everything is free: start over at the beginning
  } else {
    std::uint64_t tail = extents_.front().offset;
    if (head_ > tail) {
      // Live extents occupy [tail, head_); free are [head_, size_) and [0, tail).
      if (size_ - head_ >= rounded) {
        place = head_;
      } else if (tail >= rounded) {
        place = 0;  // wrap; [head_, size_) stays unused until the ring passes it
      } else {
        return std::nullopt;
      }
    } else {
      // Live extents wrap around; free is [head_, tail) (empty when equal: full).
      if (tail - head_ < rounded) return std::nullopt;
      place = head_;
    }
  }
  extents_.push_back({static_cast<std::uint32_t>(place), static_cast<std::uint32_t>(rounded), false});
  head_ = place + rounded;
  ++live_;
  return static_cast<std::uint32_t>(place);
}

bool DataAreaAllocator::release(std::uint32_t offset) {
  for (auto& extent : extents_) {
    if (extent.offset == offset && !extent.released) {
      extent.released = true;
      --live_;
      while (!extents_.empty() && extents_.front().released) extents_.pop_front();
      return true;
    }
  }
  return false;
}

}  // namespace cbd
