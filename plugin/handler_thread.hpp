// A handler thread serves a fixed subset of the transport's channels: it
// discovers channels that attach to our backend, drives their entries
// through one StoreQueue (io_uring: all its channels share one ring), and
// polls adaptively so an idle backend costs about no CPU; when every
// channel it serves can ring its doorbell, it sleeps on that instead of
// waking on a timer (docs/design.md, Polling and doorbells).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "common/doorbell.hpp"
#include "common/poller.hpp"
#include "plugin/handler.hpp"
#include "plugin/serving_context.hpp"

namespace cbd::backend {

class HandlerThread {
 public:
  // `doorbell`: 1 + the index of this thread's word in the backend slot's
  // doorbell array, 0 for none (the thread only polls).
  HandlerThread(ServingContext& context, std::vector<std::uint32_t> channel_indices, std::uint32_t doorbell = 0);
  HandlerThread(const HandlerThread&) = delete;
  HandlerThread& operator=(const HandlerThread&) = delete;
  ~HandlerThread();

  // Asks the thread to stop: entries already taken complete, entries still
  // waiting fail with ESHUTDOWN, then the thread exits.
  void request_stop();
  void join();

 private:
  void run();
  void discover(std::chrono::steady_clock::time_point now);
  bool should_keep(const ChannelHandler& handler) const;
  std::uint32_t* doorbell_word() const;
  // Sleeps on the doorbell when that is safe, else for `pause_us`.
  void pause(DoorbellWaiter& waiter, const AdaptivePoller& poller, std::uint32_t pause_us, bool quiet);
  // How long a sleep on the doorbell may last before the timer ends it.
  std::uint32_t doorbell_sleep_us(const AdaptivePoller& poller) const;

  ServingContext& context_;
  const std::uint32_t doorbell_;
  std::vector<std::unique_ptr<ChannelHandler>> channels_;
  std::atomic<bool> stopping_{false};
  // The last doorbell sleep ended early and no work came of it: the next
  // pause is a timed one (a peer that rings for nothing gets the polling
  // rate, not a busy loop).
  bool woken_for_nothing_ = false;
  // False once a futex wait failed (a mapping the kernel takes no futex in).
  bool doorbell_works_ = true;
  std::thread thread_;
};

}  // namespace cbd::backend
