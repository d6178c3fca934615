#include "plugin/memory_store.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>

#include "common/layout.hpp"

namespace cbd::backend {

MemoryStore::MemoryStore(std::uint64_t size, bool read_only) {
  info_.size = size;
  info_.read_only = read_only;
  info_.can_fast_zero = true;  // zeroing only drops or clears pages
  info_.rotational = false;
}

std::size_t MemoryStore::allocated_pages() const {
  std::lock_guard lock(mutex_);
  return pages_.size();
}

int MemoryStore::pread(void* buffer, std::size_t length, std::uint64_t offset) {
  if (offset > info_.size || length > info_.size - offset) return EINVAL;
  auto* out = static_cast<std::byte*>(buffer);
  std::lock_guard lock(mutex_);
  while (length > 0) {
    std::uint64_t index = offset / kPageSize;
    std::uint64_t within = offset % kPageSize;
    std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, kPageSize - within));
    auto it = pages_.find(index);
    if (it == pages_.end())
      std::memset(out, 0, chunk);
    else
      std::memcpy(out, it->second.get() + within, chunk);
    out += chunk;
    offset += chunk;
    length -= chunk;
  }
  return 0;
}

int MemoryStore::pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool /*fua*/) {
  if (info_.read_only) return EPERM;
  if (offset > info_.size || length > info_.size - offset) return ENOSPC;
  auto* in = static_cast<const std::byte*>(buffer);
  std::lock_guard lock(mutex_);
  while (length > 0) {
    std::uint64_t index = offset / kPageSize;
    std::uint64_t within = offset % kPageSize;
    std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(length, kPageSize - within));
    Page& page = pages_[index];
    if (!page) {
      // Value-initialised: the parts of the page not written read as zeros.
      page.reset(new (std::nothrow) std::byte[kPageSize]());
      if (!page) {
        pages_.erase(index);
        return ENOMEM;
      }
    }
    std::memcpy(page.get() + within, in, chunk);
    in += chunk;
    offset += chunk;
    length -= chunk;
  }
  return 0;
}

void MemoryStore::zero_locked(std::uint64_t offset, std::uint64_t length, bool keep) {
  std::uint64_t end = offset + length;
  auto it = pages_.lower_bound(offset / kPageSize);
  while (it != pages_.end() && it->first * kPageSize < end) {
    std::uint64_t page_start = it->first * kPageSize;
    std::uint64_t from = std::max(offset, page_start);
    std::uint64_t to = std::min(end, page_start + kPageSize);
    if (!keep && from == page_start && to == page_start + kPageSize) {
      it = pages_.erase(it);
      continue;
    }
    std::memset(it->second.get() + (from - page_start), 0, to - from);
    ++it;
  }
}

int MemoryStore::trim(std::uint64_t offset, std::uint64_t length, bool /*fua*/) {
  if (info_.read_only) return EPERM;
  if (offset > info_.size || length > info_.size - offset) return EINVAL;
  std::lock_guard lock(mutex_);
  zero_locked(offset, length, false);
  return 0;
}

int MemoryStore::zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool /*fast*/, bool /*fua*/) {
  if (info_.read_only) return EPERM;
  if (offset > info_.size || length > info_.size - offset) return ENOSPC;
  std::lock_guard lock(mutex_);
  zero_locked(offset, length, no_hole);
  return 0;
}

int MemoryStore::extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) {
  if (offset > info_.size || length > info_.size - offset) return EINVAL;
  std::uint64_t end = offset + length;
  std::lock_guard lock(mutex_);
  auto it = pages_.lower_bound(offset / kPageSize);
  std::uint64_t position = offset;
  while (position < end) {
    // Next allocated page at or after `position`, merged with the allocated
    // pages that follow it without a gap.
    std::uint64_t data_start = it == pages_.end() ? end : std::max(position, it->first * kPageSize);
    data_start = std::min(data_start, end);
    if (data_start > position) {
      if (!sink.add(position, data_start - position, kExtentHole | kExtentZero) || req_one) return 0;
      position = data_start;
      continue;
    }
    std::uint64_t run_end_page = it->first;
    ++it;
    while (it != pages_.end() && it->first == run_end_page + 1) {
      run_end_page = it->first;
      ++it;
    }
    std::uint64_t data_end = std::min(end, (run_end_page + 1) * kPageSize);
    if (!sink.add(position, data_end - position, 0) || req_one) return 0;
    position = data_end;
  }
  return 0;
}

}  // namespace cbd::backend
