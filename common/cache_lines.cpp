#include "common/cache_lines.hpp"

#include <atomic>
#include <cstdint>

#include "common/layout.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace cbd {
namespace {

thread_local LineRecorder* recorder = nullptr;

void flush_range(const void* data, std::size_t length) {
#if defined(__x86_64__)
  auto first = reinterpret_cast<std::uintptr_t>(data) & ~(kLineSize - 1);
  auto end = reinterpret_cast<std::uintptr_t>(data) + length;
  for (auto line = first; line < end; line += kLineSize) _mm_clflush(reinterpret_cast<const void*>(line));
  _mm_mfence();
#else
  (void)data;
  (void)length;
  std::atomic_thread_fence(std::memory_order_seq_cst);
#endif
}

}  // namespace

// clflush both writes back and invalidates, so one primitive serves both
// directions; clflushopt/clwb would be faster but are not on every CPU.
void write_back_lines(const void* data, std::size_t length) {
  if (recorder) recorder->record(true, data, length);
  flush_range(data, length);
}
void invalidate_lines(const void* data, std::size_t length) {
  if (recorder) recorder->record(false, data, length);
  flush_range(data, length);
}

LineRecorder::LineRecorder() : previous_(recorder) { recorder = this; }
LineRecorder::~LineRecorder() { recorder = previous_; }

void LineRecorder::record(bool write_back, const void* data, std::size_t length) {
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  (write_back ? written_ : invalidated_).emplace_back(begin, begin + length);
}

bool LineRecorder::covered(const Ranges& ranges, const void* data, std::size_t length) {
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const auto end = begin + length;
  for (const auto& [first, last] : ranges)
    if (first <= begin && end <= last) return true;
  return false;
}

}  // namespace cbd
