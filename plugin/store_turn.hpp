// One turn of a handler thread's store queue (docs/design.md §4, "Fencing"):
// what the channels took this turn starts, what finished goes back to its
// channel, and nothing starts unless our backend slot is still ours.  The
// handler thread and the channel handler's fuzz target both drive their
// queue through these, so the fuzzer runs the handler's own order.
#pragma once

#include <vector>

#include "plugin/backend_fence.hpp"
#include "plugin/handler.hpp"
#include "plugin/store.hpp"

namespace cbd::backend {

// Makes `queue` ask, before a request taken earlier starts another part (a
// trim or zero slice, a short transfer's remainder), whether the request's
// channel still serves the generation it was taken in.  `table` outlives
// the queue: its teardown still asks about requests in the kernel.
void check_starts_against(StoreQueue& queue, const InFlightTable& table);

// Starts what was enqueued since the last turn, reaps what finished and
// hands each completion to its channel (ChannelHandler::finish); every
// submit() is fenced, and after a lost fence the queue abandons what did not
// start.  Returns the work done: requests finished, plus one while the queue
// wants another turn (StoreQueue::wants_another_turn()).  `completions` is
// scratch space, kept by the caller so the turn allocates nothing.
unsigned run_store_turn(StoreQueue& queue, InFlightTable& table, const BackendFence& fence,
                        std::vector<StoreCompletion>& completions);

}  // namespace cbd::backend
