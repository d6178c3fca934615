// Cache-line write-back and invalidation for the optional flush mode
// (design §3.7).  Best effort by nature: flushing a CPU cache does not make a
// write visible to another host in a known order when buffers below the
// root complex reorder it; the default (hardware-coherent) mode never calls
// these.
#pragma once

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

namespace cbd {

// Writes back (and drops) every line covering [data, data + length), then
// orders that before later stores.
void write_back_lines(const void* data, std::size_t length);
// Drops every line covering the range so the next load reads memory.
void invalidate_lines(const void* data, std::size_t length);

// For tests: while one is alive, every range the calling thread writes back
// or invalidates is recorded (clflush itself leaves no trace to check).
class LineRecorder {
 public:
  LineRecorder();
  ~LineRecorder();
  LineRecorder(const LineRecorder&) = delete;
  LineRecorder& operator=(const LineRecorder&) = delete;

  // Was every byte of [data, data + length) written back (invalidated)?
  bool wrote_back(const void* data, std::size_t length) const { return covered(written_, data, length); }
  bool invalidated(const void* data, std::size_t length) const { return covered(invalidated_, data, length); }
  void clear() {
    written_.clear();
    invalidated_.clear();
  }
  void record(bool write_back, const void* data, std::size_t length);

 private:
  using Ranges = std::vector<std::pair<std::uintptr_t, std::uintptr_t>>;
  static bool covered(const Ranges& ranges, const void* data, std::size_t length);

  Ranges written_;
  Ranges invalidated_;
  LineRecorder* previous_;
};

}  // namespace cbd
