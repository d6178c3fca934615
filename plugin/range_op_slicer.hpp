// Trim and write-zeroes carry no data, so one entry may cover a gigabyte
// (4 GiB from a hostile peer).  Run whole, a zero that falls back to writing
// zeros — tmpfs has no zero-range, a device may have no write-zeroes — holds
// the handler thread, and with it every channel that thread serves, for as
// long as the whole range takes.  A store queue hands them here instead and
// runs them a bounded slice per submit(): the handler serves its other
// channels between two slices (docs/design.md §4).
#pragma once

#include <cerrno>
#include <cstdint>
#include <deque>
#include <vector>

#include "plugin/store.hpp"

namespace cbd::backend {

// Bytes of one slice: a punched hole of this size is one cheap call; zeros
// written over it take milliseconds, not seconds.
inline constexpr std::uint64_t kRangeOpSlice = 32u << 20;

class RangeOpSlicer {
 public:
  // True for the operations that are run here (trim, zero).
  static bool sliced(StoreOp op) { return op == StoreOp::Trim || op == StoreOp::Zero; }

  void add(const StoreRequest& request) { pending_.push_back({request, 0}); }
  std::size_t size() const { return pending_.size(); }
  bool empty() const { return pending_.empty(); }

  // Runs one slice of the oldest operation; appends it to `out` once it is
  // done or failed (a FUA one flushes after its last slice, or carries FUA
  // on every slice where the store cannot flush).  Operations
  // that `wanted(user_data)` says nobody waits for any more end with
  // ECANCELED, their remaining slices unrun.
  template <typename Wanted>
  void step(Store& store, std::vector<StoreCompletion>& out, Wanted&& wanted) {
    while (!pending_.empty() && !wanted(pending_.front().request.user_data)) {
      out.push_back({pending_.front().request.user_data, ECANCELED});
      pending_.pop_front();
    }
    run_slice(store, out);
  }
  // The slot was lost: what has not finished never runs another slice and
  // ends with ECANCELED (the slices already run stay done, as for any I/O
  // that reached the store before the loss).
  void abandon(std::vector<StoreCompletion>& out);

 private:
  void run_slice(Store& store, std::vector<StoreCompletion>& out);

  struct Pending {
    StoreRequest request;
    std::uint64_t done;  // bytes of the range handled so far
  };
  std::deque<Pending> pending_;
};

}  // namespace cbd::backend
