// The queue every store gets unless it has real asynchronous I/O
// (Store::open_queue()): each request runs to completion inside enqueue(),
// except trim and zero, which run a slice per submit() (range_op_slicer.hpp).
#pragma once

#include <vector>

#include "plugin/range_op_slicer.hpp"
#include "plugin/store.hpp"

namespace cbd::backend {

class InlineStoreQueue final : public StoreQueue {
 public:
  InlineStoreQueue(Store& store, unsigned depth) : store_(store), depth_(depth == 0 ? 1 : depth) {
    finished_.reserve(depth_);  // no allocation per request
  }
  unsigned room() const override { return depth_ - in_flight(); }
  void enqueue(const StoreRequest& request) override;
  void submit() override;
  bool wants_another_turn() const override { return !slices_.empty() || !finished_.empty(); }
  void reap(std::vector<StoreCompletion>& out, bool wait) override;
  unsigned in_flight() const override { return static_cast<unsigned>(finished_.size() + slices_.size()); }
  void abandon_unstarted() override;

 private:
  Store& store_;
  unsigned depth_;
  std::vector<StoreCompletion> finished_;
  RangeOpSlicer slices_;
  bool sliced_since_reap_ = false;  // one slice per reap(), however often submit() runs
  bool abandoned_ = false;  // abandon_unstarted(): nothing runs any more
};

}  // namespace cbd::backend
