#include "plugin/range_op_slicer.hpp"

#include <algorithm>
#include <cerrno>

namespace cbd::backend {

void RangeOpSlicer::step(Store& store, std::vector<StoreCompletion>& out) {
  if (pending_.empty()) return;
  Pending& op = pending_.front();
  const StoreRequest& r = op.request;
  int error = 0;
  if (op.done < r.length) {
    // Slices end on multiples of the slice size, so that only the first and
    // last can be unaligned, as they would be for the whole range.
    const std::uint64_t at = r.offset + op.done;
    const std::uint64_t end = std::min(r.offset + r.length, (at / kRangeOpSlice + 1) * kRangeOpSlice);
    error = r.op == StoreOp::Trim ? store.trim(at, end - at, false)
                                  : store.zero(at, end - at, r.no_hole, r.fast_zero, false);
    op.done += end - at;
  }
  if (error == 0 && op.done < r.length) return;
  if (error == 0 && r.fua) error = store.flush();
  out.push_back({r.user_data, error});
  pending_.pop_front();
}

void RangeOpSlicer::abandon(std::vector<StoreCompletion>& out) {
  for (const Pending& op : pending_) out.push_back({op.request.user_data, ECANCELED});
  pending_.clear();
}

}  // namespace cbd::backend
