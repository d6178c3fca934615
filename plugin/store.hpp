// The backing store behind a backend: the one interface both the `cbd`
// plugin (file, block device, memory) and the later `cbd` filter (whatever
// nbdkit plugin sits below it) implement, so the channel handlers never know
// which one they serve.
//
// Synchronous methods are thread-safe and return 0 or a positive errno.
// Handlers reach the store through a StoreQueue opened per handler thread:
// a store with real asynchronous I/O (FileStore: io_uring) overrides
// open_queue(); any other store gets InlineStoreQueue, which runs the
// synchronous methods in place, so a store that implements only those works
// with the handlers unchanged.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/rate_limit.hpp"

namespace cbd::backend {

struct StoreInfo {
  std::uint64_t size = 0;             // bytes exported
  std::uint32_t block_min = 1;        // smallest I/O unit (4096 with O_DIRECT)
  std::uint32_t block_preferred = 4096;
  bool read_only = false;
  bool can_flush = true;
  bool can_fua = true;
  bool can_trim = true;
  bool can_zero = true;
  bool can_fast_zero = false;         // zero(fast=true) either is cheap or fails at once with ENOTSUP
  bool can_extents = true;
  bool can_cache = true;
  bool can_multi_conn = true;         // flush covers writes completed on every connection/channel
  bool rotational = false;
};

// Receives the allocation map of a range, in order, without gaps: each call
// continues where the previous one ended.  `flags` are kExtentHole |
// kExtentZero bits (the NBD base:allocation bits).  Returns false when it
// wants no more.
class ExtentSink {
 public:
  virtual bool add(std::uint64_t offset, std::uint64_t length, std::uint32_t flags) = 0;

 protected:
  ~ExtentSink() = default;
};

enum class StoreOp : std::uint8_t { Read, Write, Flush, Trim, Zero, Cache };

struct StoreRequest {
  StoreOp op = StoreOp::Read;
  bool fua = false;
  bool no_hole = false;     // zero: keep the range allocated
  bool fast_zero = false;   // zero: fail with ENOTSUP unless cheap
  std::uint64_t offset = 0;
  std::uint64_t length = 0;
  std::byte* buffer = nullptr;  // read/write: `length` bytes (the channel's data area; no copy)
  std::uint64_t user_data = 0;  // echoed in the completion
};

struct StoreCompletion {
  std::uint64_t user_data = 0;
  int error = 0;  // 0 or a positive errno
};

class Store;

// Per-thread queue of store requests (not thread-safe: one owner thread).
class StoreQueue {
 public:
  virtual ~StoreQueue() = default;
  // How many more requests enqueue() accepts before reap() frees room.
  virtual unsigned room() const = 0;
  // Queues a request; the caller checked room() > 0.  It may complete at
  // once (reap() then returns it).
  virtual void enqueue(const StoreRequest& request) = 0;
  // Starts everything queued since the last submit (one system call for a
  // batch), and runs one slice of a pending trim or zero
  // (range_op_slicer.hpp) — one per reap(), however often it is called.
  virtual void submit() = 0;
  // True while the queue has work for the caller's next turn even when
  // nothing new arrives and nothing is in the kernel: slices left for
  // submit() to run, or requests finished since the last reap() (a slice
  // run by a submit() after it, a request abandon_unstarted() cancelled).
  // The caller does not sleep while this holds.
  virtual bool wants_another_turn() const { return false; }
  // Asked before a request that was taken earlier starts another part — a
  // slice of a trim or zero, the remainder of a short transfer — with its
  // user_data: false when nobody waits for it any more (its channel was
  // detached or set up again, docs/design.md §4), and it then ends with
  // ECANCELED unrun.  Unset: every part runs.
  using StartCheck = std::function<bool(std::uint64_t user_data)>;
  void set_start_check(StartCheck check) { start_check_ = std::move(check); }

  // Appends finished requests to `out`.  With `wait`, blocks until at least
  // one finishes when some are in the kernel.  Never starts a request: what
  // it prepares (a short transfer's remainder) waits for the next submit(),
  // so every start goes through the caller's fence check.
  virtual void reap(std::vector<StoreCompletion>& out, bool wait) = 0;
  // Requests enqueued and not yet reaped.
  virtual unsigned in_flight() const = 0;
  // This backend lost its slot (docs/design.md §4): nothing queued and not
  // yet started may reach the store any more.  Such requests finish with
  // ECANCELED at the next reap(), and nothing is ever started again.  Only
  // requests already started (in the kernel) complete as usual.
  virtual void abandon_unstarted() {}

 protected:
  bool may_start(std::uint64_t user_data) const { return !start_check_ || start_check_(user_data); }

 private:
  StartCheck start_check_;
};

class Store {
 public:
  virtual ~Store() = default;
  virtual const StoreInfo& info() const = 0;

  virtual int pread(void* buffer, std::size_t length, std::uint64_t offset) = 0;
  virtual int pwrite(const void* buffer, std::size_t length, std::uint64_t offset, bool fua) = 0;
  // Makes every write that completed before the call durable, whichever
  // thread, channel or connection issued it.
  virtual int flush() = 0;
  // Advisory: may do nothing, but a trimmed range never reads back stale data.
  virtual int trim(std::uint64_t offset, std::uint64_t length, bool fua) = 0;
  virtual int zero(std::uint64_t offset, std::uint64_t length, bool no_hole, bool fast, bool fua) = 0;
  // Reports at least one extent starting at `offset` (unless it fails);
  // with `req_one` one is enough.
  virtual int extents(std::uint64_t offset, std::uint64_t length, bool req_one, ExtentSink& sink) = 0;
  virtual int cache(std::uint64_t offset, std::uint64_t length) = 0;

  // A queue for one handler thread holding up to `depth` requests.
  virtual std::unique_ptr<StoreQueue> open_queue(unsigned depth);
};

// Runs one request with the store's synchronous methods.
int run_request(Store& store, const StoreRequest& request);

// Logs a failed store operation where it failed — `where` names the store
// ("file /path", "next plugin"), then the operation, offset, length and
// errno — through `limit`, since a peer decides how often I/O is tried.
// Returns `error`.
int report_store_error(RateLimit& limit, const std::string& where, const char* what, std::uint64_t offset,
                       std::uint64_t length, int error);

}  // namespace cbd::backend
