#include "plugin/handler_thread.hpp"

#include <pthread.h>
#include <signal.h>
#include <time.h>

#include <cerrno>

#include "common/cache_lines.hpp"
#include "common/kernel_identity.hpp"
#include "common/log.hpp"
#include "common/shared_atomic.hpp"
#include "common/slot.hpp"
#include "common/thread_signals.hpp"
#include "plugin/store_turn.hpp"

namespace cbd::backend {
namespace {

// Entries taken from one channel per loop before the next channel gets a
// turn, so one busy channel cannot starve the others.  Small, so that the
// completions of a few entries are published while the queue loop still
// has work: with 32 per turn, at depth 32 the two sides took turns idling
// (docs/performance.md).
constexpr unsigned kTakeBudget = 4;
// How often a handler looks for channels that attached, detached or changed
// generation.  Also bounds how long a queue side waits for attachment.
constexpr auto kDiscoveryInterval = std::chrono::milliseconds(1);
// Sleep between discoveries while no channel is served at all.
constexpr long kUnattachedSleepNs = 5'000'000;
// Asleep on the doorbell once idle, the longest timed wake-up (see
// doorbell_sleep_us()).
constexpr auto kLongestIdleDoorbellSleep = std::chrono::milliseconds(50);

// The queue side's binding of a channel, read in the order the attach
// protocol publishes it: generation (acquire) first, then the fields stored
// before it.
struct Binding {
  std::uint64_t word;
  std::uint64_t generation;
  std::uint32_t backend_id;
  std::uint64_t backend_epoch;
  std::uint32_t owner_host;
};

Binding read_binding(const Channel& channel) {
  ChannelControl& control = channel.control();
  if (channel.mode().flush) invalidate_lines(&control, 2 * kLineSize);
  Binding binding{};
  binding.word = load_acquire(control.header.state);
  binding.generation = load_acquire(control.generation);
  binding.backend_id = load_relaxed(control.backend_id);
  binding.backend_epoch = load_relaxed(control.backend_epoch);
  binding.owner_host = load_relaxed(control.header.owner_host);
  return binding;
}

}  // namespace

HandlerThread::HandlerThread(ServingContext& context, std::vector<std::uint32_t> channel_indices,
                             std::uint32_t doorbell)
    : context_(context), doorbell_(doorbell <= kBackendDoorbells ? doorbell : 0) {
  channels_.reserve(channel_indices.size());
  for (std::uint32_t index : channel_indices)
    channels_.push_back(
        std::make_unique<ChannelHandler>(context.transport, index, context.store, context.limits, context.fence));
  thread_ = std::thread([this] { run(); });
}

HandlerThread::~HandlerThread() {
  request_stop();
  join();
}

void HandlerThread::request_stop() {
  stopping_.store(true, std::memory_order_release);
  // A thread asleep on its doorbell sees the stop now, not at the timeout.
  // Not once the backend slot is lost: the word is the next owner's (and
  // a thread that lost the fence no longer sleeps on it).
  if (std::uint32_t* word = doorbell_word(); word && context_.fence.holds()) ring_doorbell(*word);
}

std::uint32_t* HandlerThread::doorbell_word() const {
  if (doorbell_ == 0 || context_.transport.mode().flush || context_.backend_index >= context_.transport.backend_count())
    return nullptr;
  return &context_.transport.backend(context_.backend_index).doorbell[doorbell_ - 1];
}

void HandlerThread::pause(DoorbellWaiter& waiter, const AdaptivePoller& poller, std::uint32_t pause_us, bool quiet) {
  // The doorbell is only for a thread whose every served channel rings it
  // (a queue side on another kernel cannot), with nothing of its own to
  // look after on a timer: no store request in flight (their completions
  // arrive in the io_uring, not through the doorbell), no completion
  // waiting for room, no checksum re-check due.
  bool doorbell = quiet && doorbell_works_ && waiter.usable() && !woken_for_nothing_ && context_.fence.holds();
  woken_for_nothing_ = false;
  for (auto& handler : channels_)
    if (handler->serving() && (!handler->named_doorbell() || handler->rechecking())) doorbell = false;
  if (!doorbell) {
    sleep_for_us(pause_us);
    return;
  }
  waiter.arm();
  // Looked at once more after the waiter bit is visible: an entry published
  // before a producer could see the bit is found here.
  bool pending = stopping_.load(std::memory_order_acquire);
  for (auto& handler : channels_) pending = pending || handler->has_submissions();
  if (pending) {
    // Straight back to work.  Should the next turn take nothing after all,
    // its pause is a timed one (woken_for_nothing_): no spin.
    waiter.cancel();
    woken_for_nothing_ = true;
    return;
  }
  const DoorbellWaiter::Wake wake = waiter.sleep(doorbell_sleep_us(poller));
  if (wake == DoorbellWaiter::Wake::Failed) {
    // The kernel refuses a futex in this mapping (or at all): poll from
    // now on.  Our channels keep naming the doorbell until they attach
    // again; a ring costs their queue side a fence and a load.
    doorbell_works_ = false;
    log(LogLevel::Info, "handler: the transport's memory takes no futex; polling instead of sleeping on a doorbell");
    sleep_for_us(pause_us);
    return;
  }
  woken_for_nothing_ = wake == DoorbellWaiter::Wake::Woken;
}

std::uint32_t HandlerThread::doorbell_sleep_us(const AdaptivePoller& poller) const {
  // Asleep on the doorbell, the wake comes with the work: the timer only
  // bounds the checks a turn makes besides — a set-up to attach, the
  // channel heartbeat.  Once idle, a quarter of the heartbeat interval (at
  // most 50 ms) serves both, so an idle backend wakes about 20 times a
  // second instead of 100, and every wake costs a context switch
  // (docs/design.md, Polling and doorbells).
  const std::uint32_t ceiling = poller.ceiling_us();
  if (!poller.idle_for_long()) return ceiling;
  const auto quarter = std::chrono::duration_cast<std::chrono::microseconds>(context_.heartbeat_interval) / 4;
  const auto longest = std::min<std::chrono::microseconds>(quarter, kLongestIdleDoorbellSleep);
  return std::max<std::uint32_t>(ceiling, static_cast<std::uint32_t>(longest.count()));
}

void HandlerThread::join() {
  if (thread_.joinable()) thread_.join();
}

bool HandlerThread::should_keep(const ChannelHandler& handler) const {
  Binding binding = read_binding(handler.channel());
  SlotState state = state_of(binding.word);
  return context_.fence.holds() && binding.backend_id == context_.backend_index &&
         binding.backend_epoch == context_.backend_epoch && binding.generation == handler.generation() &&
         (state == SlotState::Live || state == SlotState::Stopping);
}

void HandlerThread::discover(std::chrono::steady_clock::time_point now) {
  const bool stopping = stopping_.load(std::memory_order_acquire);
  // Once our backend slot is lost, no channel is ours: every one is
  // detached and none attached again (no attached_generation store).
  const bool held = context_.fence.holds();
  for (auto& handler : channels_) {
    const std::uint32_t index = handler->index();
    Binding binding = read_binding(handler->channel());
    const bool ours = held && binding.backend_id == context_.backend_index &&
                      binding.backend_epoch == context_.backend_epoch &&
                      binding.owner_host < context_.transport.host_count() &&
                      context_.host_allowed[binding.owner_host].load(std::memory_order_relaxed) &&
                      context_.channel_condemned[index].load(std::memory_order_seq_cst) != binding.word;
    if (handler->serving()) {
      SlotState state = state_of(binding.word);
      bool keep = ours && binding.generation == handler->generation() &&
                  (state == SlotState::Live || state == SlotState::Stopping);
      if (!keep) handler->detach();
    }
    if (!handler->serving() && handler->in_flight() == 0) {
      // Attach only once the previous generation's I/O has finished, so
      // none of it lands in data extents of the new one.
      bool attach = !stopping && ours && state_of(binding.word) == SlotState::Live && binding.generation != 0 &&
                    binding.generation != handler->generation();
      if (attach) {
        // Announce first, then re-check the service's verdict: with both
        // sides seq_cst, the service either sees us serving (and does not
        // reclaim) or we see its condemnation (and do not attach).
        context_.channel_serving[index].store(true, std::memory_order_seq_cst);
        if (context_.channel_condemned[index].load(std::memory_order_seq_cst) == binding.word) attach = false;
      }
      // The fence once more, right before the attach writes the channel.
      if (attach && context_.fence.holds()) {
        // Only a queue side on our kernel can wake us, and only one that
        // says it rings, for this very set-up: an older one never would
        // (it leaves the field as the last set-up wrote it), and every
        // request would wait for the timeout.
        const bool rings =
            doorbell_word() != nullptr &&
            same_kernel(context_.transport.host(binding.owner_host), context_.kernel_id) &&
            load_relaxed(handler->channel().control().queue_rings) == rings_tag(binding.generation);
        handler->attach(binding.generation, context_.backend_epoch, rings && doorbell_works_ ? doorbell_ : 0);
      } else
        context_.channel_serving[index].store(false, std::memory_order_seq_cst);
    }
    // The queue side hands its wake socket over just before it publishes
    // the generation: it may arrive after we attached.
    if (handler->wants_queue_wake() && context_.wake_sockets)
      handler->set_queue_wake(context_.wake_sockets->take(index, handler->generation()));
    handler->heartbeat(now, context_.heartbeat_interval);
  }
}

void HandlerThread::run() {
  // Signals are for nbdkit's main thread.
  block_async_signals();

  // The table outlives the queue: the queue's teardown still asks about
  // requests in the kernel (start check below).
  InFlightTable table(context_.queue_depth);
  std::unique_ptr<StoreQueue> queue = context_.store.open_queue(context_.queue_depth);
  // A later part of a request (a trim or zero slice, a short transfer's
  // remainder) starts only while its channel still serves the generation it
  // was taken in (docs/design.md §4).
  check_starts_against(*queue, table);
  AdaptivePoller poller(context_.poll);
  DoorbellWaiter waiter(doorbell_word());
  std::vector<StoreCompletion> completions;
  completions.reserve(context_.queue_depth);
  auto next_discovery = std::chrono::steady_clock::now();
  bool draining = false;
  std::chrono::steady_clock::time_point deadline{};

  for (;;) {
    auto now = std::chrono::steady_clock::now();
    if (!draining && stopping_.load(std::memory_order_acquire)) {
      draining = true;
      deadline = now + context_.shutdown_grace;
    }
    if (now >= next_discovery || draining) {
      discover(now);
      next_discovery = now + kDiscoveryInterval;
    }

    unsigned work = 0;
    bool any_serving = false;
    for (auto& handler : channels_) {
      any_serving |= handler->serving();
      work += draining ? handler->fail_waiting(ESHUTDOWN) : handler->take_entries(*queue, table, kTakeBudget);
    }
    work += run_store_turn(*queue, table, context_.fence, completions);
    bool unposted = false;
    for (auto& handler : channels_) {
      handler->publish();
      unposted |= handler->has_unposted();
    }

    if (draining) {
      if (table.size() == 0 && !unposted) break;
      if (now >= deadline) {
        log(LogLevel::Error,
            "handler: stopping with %u requests still in flight or completions the queue side never made room for",
            table.size());
        break;
      }
    }
    if (work > 0) {
      poller.active();
      woken_for_nothing_ = false;
    } else if (!any_serving && table.size() == 0 && !draining) {
      // Nothing attached: look for new channels now and then, no faster.
      poller.quiesce();
      timespec pause{0, kUnattachedSleepNs};
      ::nanosleep(&pause, nullptr);
    } else if (const std::uint32_t pause_us = poller.next_pause_us()) {
      pause(waiter, poller, pause_us, !draining && table.size() == 0 && !unposted);
    }
  }

  // Tell the queue side this handler is gone (attached_generation is ours),
  // unless it already moved to another generation.
  for (auto& handler : channels_) {
    if (handler->serving() && should_keep(*handler)) {
      ChannelControl& control = handler->channel().control();
      store_release(control.attached_generation, std::uint64_t{0});
      if (handler->channel().mode().flush) write_back_lines(&control.attached_generation, kLineSize);
    }
    handler->detach();
    context_.channel_serving[handler->index()].store(false, std::memory_order_seq_cst);
  }
  // `queue` is destroyed here: it waits for any I/O still in the kernel.
}

}  // namespace cbd::backend
