// A sparse in-memory store (`nbdkit cbd size=1G`): pages are allocated on
// first write and freed again when zeroed or trimmed, so a large export
// costs only what was written.  For trials and tests; data is lost on exit.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "plugin/store.hpp"

namespace cbd::backend {

class MemoryStore final : public Store {
 public:
  static constexpr std::uint64_t kPageSize = 64 * 1024;

  explicit MemoryStore(std::uint64_t size, bool read_only = false);

  const StoreInfo& info() const override { return info_; }
  int pread(void* buffer, std::size_t length, std::uint64_t offset) override;
  int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) override;
  int flush() override { return 0; }  // nothing is more durable than memory gets
  int trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) override;
  int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) override;
  int cache(std::uint64_t, std::uint64_t) override { return 0; }

  // Pages currently allocated (tests, statistics).
  std::size_t allocated_pages() const;

 private:
  using Page = std::unique_ptr<std::byte[]>;
  // Zeroes [offset, offset + length); whole pages are dropped unless `keep`.
  void zero_locked(std::uint64_t offset, std::uint64_t length, bool keep);

  StoreInfo info_;
  // One lock: the memory store is for trials, and memcpy under a mutex
  // still runs at memory speed.
  mutable std::mutex mutex_;
  std::map<std::uint64_t, Page> pages_;  // page index → kPageSize bytes
};

}  // namespace cbd::backend
