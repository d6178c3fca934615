#include "common/flush_ranges.hpp"

#include <atomic>
#include <cstdint>
#include <mutex>

#include "common/cache_lines.hpp"
#include "common/error.hpp"

namespace cbd {
namespace {

// A daemon maps one transport; tests map a few.
constexpr int kMaxRanges = 64;

struct Range {
  std::atomic<std::uintptr_t> begin{0};
  std::atomic<std::uintptr_t> end{0};  // 0: unused
};

Range ranges[kMaxRanges];
std::atomic<int> registered{0};
std::mutex registration;  // registration and removal only; lookups take no lock

}  // namespace

FlushModeRange::FlushModeRange(const void* base, std::size_t size) {
  std::lock_guard<std::mutex> lock(registration);
  for (int i = 0; i < kMaxRanges; ++i) {
    if (ranges[i].end.load(std::memory_order_relaxed) != 0) continue;
    const auto begin = reinterpret_cast<std::uintptr_t>(base);
    ranges[i].begin.store(begin, std::memory_order_relaxed);
    ranges[i].end.store(begin + size, std::memory_order_release);
    registered.fetch_add(1, std::memory_order_release);
    entry_ = i;
    return;
  }
  throw Error("more than " + std::to_string(kMaxRanges) + " flush-mode transports mapped at once");
}

FlushModeRange::FlushModeRange(FlushModeRange&& other) noexcept : entry_(other.entry_) { other.entry_ = -1; }

FlushModeRange& FlushModeRange::operator=(FlushModeRange&& other) noexcept {
  if (this != &other) {
    reset();
    entry_ = other.entry_;
    other.entry_ = -1;
  }
  return *this;
}

void FlushModeRange::reset() noexcept {
  if (entry_ < 0) return;
  std::lock_guard<std::mutex> lock(registration);
  ranges[entry_].end.store(0, std::memory_order_release);
  ranges[entry_].begin.store(0, std::memory_order_relaxed);
  registered.fetch_sub(1, std::memory_order_release);
  entry_ = -1;
}

bool in_flush_mode(const void* data) {
  if (registered.load(std::memory_order_acquire) == 0) return false;
  const auto address = reinterpret_cast<std::uintptr_t>(data);
  for (const Range& range : ranges) {
    const std::uintptr_t end = range.end.load(std::memory_order_acquire);
    if (end != 0 && address >= range.begin.load(std::memory_order_relaxed) && address < end) return true;
  }
  return false;
}

void publish_lines(const void* data, std::size_t length) {
  if (in_flush_mode(data)) write_back_lines(data, length);
}

void refresh_lines(const void* data, std::size_t length) {
  if (in_flush_mode(data)) invalidate_lines(data, length);
}

}  // namespace cbd
