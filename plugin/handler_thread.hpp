// A handler thread serves a fixed subset of the transport's channels: it
// discovers channels that attach to our backend, drives their entries
// through one StoreQueue (io_uring: all its channels share one ring), and
// polls adaptively so an idle backend costs about no CPU (design §3.10).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "plugin/handler.hpp"
#include "plugin/serving_context.hpp"

namespace cbd::backend {

class HandlerThread {
 public:
  HandlerThread(ServingContext& context, std::vector<std::uint32_t> channel_indices);
  HandlerThread(const HandlerThread&) = delete;
  HandlerThread& operator=(const HandlerThread&) = delete;
  ~HandlerThread();

  // Asks the thread to stop: entries already taken complete, entries still
  // waiting fail with ESHUTDOWN, then the thread exits.
  void request_stop() { stopping_.store(true, std::memory_order_release); }
  void join();

 private:
  void run();
  void discover(std::chrono::steady_clock::time_point now);
  bool should_keep(const ChannelHandler& handler) const;

  ServingContext& context_;
  std::vector<std::unique_ptr<ChannelHandler>> channels_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace cbd::backend
