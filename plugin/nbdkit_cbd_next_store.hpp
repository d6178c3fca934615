// The store behind the `cbd` nbdkit filter: whatever plugin (and filters)
// nbdkit has below the filter, reached through one shared context that the
// filter opens in .after_fork.  Every channel of the backend funnels into
// that one context.
//
// nbdkit asserts, rather than checks, that a caller stays inside the
// capabilities and the size of the layer below; a request from shared
// memory is untrusted, so every method checks both before it calls down.
//
// Calls nbdkit symbols: it lives in the filter module, never in the
// cbd-backend library that the unit tests link without nbdkit.
#pragma once

#ifndef NBDKIT_API_VERSION
#define NBDKIT_API_VERSION 2
#endif
#include <nbdkit-filter.h>

#include <cstdint>
#include <mutex>

#include "plugin/store.hpp"

namespace cbd::backend {

class NextStore final : public Store {
 public:
  // `serialize`: the layers below are not PARALLEL, so the store lets one
  // call at a time reach them (nbdkit's own request locks do not cover
  // calls made from the handler threads).
  explicit NextStore(bool serialize);
  // Does not close the context: that needs the layers below to still be
  // loaded, which only .cleanup guarantees.  See close().
  ~NextStore() override = default;
  NextStore(const NextStore&) = delete;
  NextStore& operator=(const NextStore&) = delete;

  // Opens the shared context into `backend` and reads its size, block size
  // and capabilities.  From .after_fork, before the handlers start.
  // Throws cbd::Error.
  void open(nbdkit_backend* backend, bool read_only);
  // Finalizes and closes the context.  From .cleanup, after the handlers
  // stopped.  Idempotent.
  void close();

  bool serialized() const { return serialize_; }
  // Held by the filter's own connections while they call down, so that with
  // a serialising thread model they take turns with the handler threads.
  // Owns nothing when the layers below are PARALLEL.
  std::unique_lock<std::mutex> lock_if_serialized() {
    return serialize_ ? std::unique_lock<std::mutex>(mutex_) : std::unique_lock<std::mutex>();
  }

  const StoreInfo& info() const override { return info_; }
  int pread(void* buffer, std::size_t length, std::uint64_t offset) override;
  int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) override;
  int flush() override;
  int trim(std::uint64_t offset, std::uint64_t length, bool fua) override;
  int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) override;
  int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) override;
  int cache(std::uint64_t offset, std::uint64_t length) override;

 private:
  // 0, or `error` when [offset, offset + length) leaves the export.
  int check_range(std::uint64_t offset, std::uint64_t length, int error) const;
  std::uint32_t fua_flag(bool fua) const { return fua && fua_mode_ != NBDKIT_FUA_NONE ? NBDKIT_FLAG_FUA : 0; }
  // Logs a call down that failed (rate-limited); returns `error`.
  int report(const char* what, std::uint64_t offset, std::uint64_t length, int error) {
    return report_store_error(error_limit_, "next plugin", what, offset, length, error);
  }

  const bool serialize_;
  std::mutex mutex_;
  nbdkit_next* next_ = nullptr;
  StoreInfo info_;
  // Largest count one call down may carry: the plugin's maximum block
  // size, else 2 GiB (a multiple of any minimum block size).
  std::uint32_t chunk_ = 1u << 31;
  int fua_mode_ = NBDKIT_FUA_NONE;
  int cache_mode_ = NBDKIT_CACHE_NONE;
  RateLimit error_limit_;
};

}  // namespace cbd::backend
