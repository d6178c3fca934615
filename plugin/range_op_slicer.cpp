#include "plugin/range_op_slicer.hpp"

#include <algorithm>
#include <cerrno>

namespace cbd::backend {

void RangeOpSlicer::run_slice(Store& store, std::vector<StoreCompletion>& out) {
  if (pending_.empty()) return;
  Pending& op = pending_.front();
  const StoreRequest& r = op.request;
  int error = 0;
  if (op.done < r.length) {
    // Slices end on multiples of the slice size, so that only the first and
    // last can be unaligned, as they would be for the whole range.
    const std::uint64_t at = r.offset + op.done;
    const std::uint64_t end = std::min(r.offset + r.length, (at / kRangeOpSlice + 1) * kRangeOpSlice);
    // FUA makes the whole range durable: one flush after the last slice
    // does that for a store that can flush; one that cannot (a plugin below
    // the filter with native FUA only) gets FUA on every slice.
    const bool fua = r.fua && !store.info().can_flush;
    error = r.op == StoreOp::Trim ? store.trim(at, end - at, fua)
                                  : store.zero(at, end - at, r.no_hole, r.fast_zero, fua);
    op.done += end - at;
  }
  if (error == 0 && op.done < r.length) return;
  if (error == 0 && r.fua && store.info().can_flush) error = store.flush();
  out.push_back({r.user_data, error});
  pending_.pop_front();
}

void RangeOpSlicer::abandon(std::vector<StoreCompletion>& out) {
  for (const Pending& op : pending_) out.push_back({op.request.user_data, ECANCELED});
  pending_.clear();
}

}  // namespace cbd::backend
