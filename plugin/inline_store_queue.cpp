#include "plugin/inline_store_queue.hpp"

#include <cerrno>

namespace cbd::backend {

void InlineStoreQueue::enqueue(const StoreRequest& request) {
  // Every request starts here or in submit(): after the slot was lost none may.
  if (abandoned_) {
    finished_.push_back({request.user_data, ECANCELED});
  } else if (RangeOpSlicer::sliced(request.op)) {
    slices_.add(request);
  } else {
    finished_.push_back({request.user_data, run_request(store_, request)});
  }
}

void InlineStoreQueue::submit() {
  if (abandoned_ || sliced_since_reap_) return;
  sliced_since_reap_ = true;
  slices_.step(store_, finished_, [this](std::uint64_t user_data) { return may_start(user_data); });
}

void InlineStoreQueue::abandon_unstarted() {
  abandoned_ = true;
  slices_.abandon(finished_);
}

void InlineStoreQueue::reap(std::vector<StoreCompletion>& out, bool /*wait: nothing is ever in the kernel*/) {
  sliced_since_reap_ = false;
  out.insert(out.end(), finished_.begin(), finished_.end());
  finished_.clear();
}

}  // namespace cbd::backend
