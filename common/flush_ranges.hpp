// Which memory is used in flush mode (design §3.7, docs/design.md §2,
// "Flush mode").  Flush mode is a property of a transport's memory, not of
// the code that touches it: slot headers, names and slot fields are written
// by functions that get only a pointer (claims, heartbeats, reclaims,
// liveness checks, write_name), from both daemons and the admin commands.
// Each Transport in flush mode registers its mapping here, and those
// functions write back what they wrote and invalidate what they are about to
// read when the address lies in a registered range — so no caller can
// forget to.  With no flush-mode transport registered the check is one
// relaxed load.
#pragma once

#include <cstddef>

namespace cbd {

class FlushModeRange {
 public:
  FlushModeRange() = default;
  // Registers [base, base + size).  Throws cbd::Error when too many ranges
  // are registered at once.
  FlushModeRange(const void* base, std::size_t size);
  FlushModeRange(FlushModeRange&& other) noexcept;
  FlushModeRange& operator=(FlushModeRange&& other) noexcept;
  FlushModeRange(const FlushModeRange&) = delete;
  FlushModeRange& operator=(const FlushModeRange&) = delete;
  // Unregisters; before the range is unmapped.
  ~FlushModeRange() { reset(); }
  void reset() noexcept;

 private:
  int entry_ = -1;
};

// Does `data` lie in a transport mapped in flush mode?
bool in_flush_mode(const void* data);
// Write back [data, data + length) after writing it, when in flush mode.
void publish_lines(const void* data, std::size_t length);
// Invalidate [data, data + length) before reading it, when in flush mode.
void refresh_lines(const void* data, std::size_t length);

}  // namespace cbd
