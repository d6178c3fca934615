#include "plugin/store_turn.hpp"

namespace cbd::backend {
namespace {

// Fenced (docs/design.md §4): prepared requests reach the kernel only while
// our backend slot is still ours.  A pause between this check and the
// system call is the one window left.
void submit_if_ours(StoreQueue& queue, const BackendFence& fence) {
  if (fence.holds())
    queue.submit();
  else
    queue.abandon_unstarted();
}

}  // namespace

void check_starts_against(StoreQueue& queue, const InFlightTable& table) {
  queue.set_start_check([&table](std::uint64_t user_data) {
    const InFlight* request = table.peek(user_data);
    return request && request->channel && request->channel->serves(request->generation);
  });
}

unsigned run_store_turn(StoreQueue& queue, InFlightTable& table, const BackendFence& fence,
                        std::vector<StoreCompletion>& completions) {
  submit_if_ours(queue, fence);
  completions.clear();
  queue.reap(completions, false);
  // Short transfers prepared their remainder in reap(), and the slice of a
  // trim or zero runs in the first submit() after a reap: both start here.
  // What they finish is reaped next turn (wants_another_turn() keeps the
  // caller awake for it).
  submit_if_ours(queue, fence);
  for (const StoreCompletion& done : completions) {
    InFlight request = table.take(done.user_data);
    if (request.channel) request.channel->finish(request, done.error);
  }
  unsigned work = static_cast<unsigned>(completions.size());
  if (queue.wants_another_turn()) ++work;
  return work;
}

}  // namespace cbd::backend
