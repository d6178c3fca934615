// A regular file or block device as the backing store.
//
// Handlers reach it through an io_uring queue per handler thread (reads,
// writes — RWF_DSYNC for FUA — and fsync run asynchronously, straight
// between the channel's data area and the file, design §3.8); trim, zero,
// block status and cache are synchronous system calls, trim and zero run a
// bounded slice at a time (range_op_slicer.hpp).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "plugin/store.hpp"
#include "common/unique_fd.hpp"

namespace cbd::backend {

struct FileStoreOptions {
  std::string path;
  bool read_only = false;
  bool direct = false;  // O_DIRECT for aligned I/O (unaligned requests fall back to the page cache)
};

// On a file in memory, a queue copies small requests in place instead of
// handing them to io_uring's workers (docs/design.md §7), up to these bounds:
// a request larger than kInPlaceMaxRequest, or one that would take the bytes
// copied since the last reap() past kInPlaceBytesPerReap, goes to io_uring.
inline constexpr std::uint64_t kInPlaceMaxRequest = 256 * 1024;
inline constexpr std::uint64_t kInPlaceBytesPerReap = 1024 * 1024;

class FileStore final : public Store {
 public:
  // Throws cbd::Error naming the path and the problem.
  explicit FileStore(const FileStoreOptions& options);

  const StoreInfo& info() const override { return info_; }
  int pread(void* buffer, std::size_t length, std::uint64_t offset) override;
  int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) override;
  int flush() override;
  int trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) override;
  int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) override;
  int cache(std::uint64_t offset, std::uint64_t length) override;
  std::unique_ptr<StoreQueue> open_queue(unsigned depth) override;

  bool is_block_device() const { return block_device_; }
  // True when the file lives in memory (tmpfs, ramfs): a buffered transfer
  // there waits for no device, only for the copy.
  bool memory_backed() const { return memory_backed_; }
  const std::string& path() const { return path_; }
  // The descriptor for a transfer: the O_DIRECT one when the buffer, offset
  // and length suit it, else the buffered one.
  int fd_for(const void* buffer, std::uint64_t length, std::uint64_t offset) const;
  // True when a transfer goes through the page cache (not O_DIRECT).
  bool buffered(const void* buffer, std::uint64_t length, std::uint64_t offset) const {
    return fd_for(buffer, length, offset) == fd_.get();
  }
  // Logs an I/O error with this file's path (rate-limited); returns `error`.
  int report(const char* what, std::uint64_t offset, std::uint64_t length, int error) {
    return report_store_error(error_limit_, "file " + path_, what, offset, length, error);
  }

 private:
  int write_zeroes(std::uint64_t offset, std::uint64_t length);

  std::string path_;
  UniqueFd fd_;         // buffered
  UniqueFd direct_fd_;  // O_DIRECT, when direct=true
  bool block_device_ = false;
  bool memory_backed_ = false;
  StoreInfo info_;
  RateLimit error_limit_;  // shared by every handler thread's queue
};

}  // namespace cbd::backend
